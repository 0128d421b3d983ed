//! Test support for the system tests: a `Lab` guard that brings a whole tern lab up (real
//! center, agents, QEMU under TCG) with a unique prefix and directory, and takes it down on
//! drop (also after a panic); helpers that run the built `tern` binary against it, wait for
//! console lines and run `tern-guest client` in the client namespace.
//!
//! One lab at a time, machine-wide: labs take a file lock (tests of one binary run on
//! parallel threads, and several test binaries may run at once).

#![allow(dead_code)]

pub mod browser;
pub mod etcd;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The `tern` binary under test.
pub fn tern_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tern"))
}

pub use tern_testkit::{repo_root, wait_for};

/// The guest image (`target/guest`), built with guest/build.sh when missing (it caches).
pub fn guest_dir() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            built_image(
                "guest/build.sh",
                "guest",
                &["vmlinuz", "initramfs.img", "tern-guest"],
            )
        })
        .clone()
}

/// `target/SUBDIR`, made by the project's `script` (which caches) unless every file of
/// `files` is there already.
pub fn built_image(script: &str, subdir: &str, files: &[&str]) -> PathBuf {
    let root = repo_root();
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join(subdir);
    if !files.iter().all(|f| dir.join(f).is_file()) {
        eprintln!("building {} with {script}", dir.display());
        let out = Command::new("bash")
            .arg(root.join(script))
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {script}: {e}"));
        assert!(
            out.status.success(),
            "{script} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}

/// Holds the machine-wide lab lock: a process-wide mutex plus a file lock.
pub struct LabLock {
    _file: Flock<File>,
    _guard: MutexGuard<'static, ()>,
}

pub fn lab_lock() -> LabLock {
    static MUTEX: Mutex<()> = Mutex::new(());
    // A test that panicked while holding the lock has already cleaned up (its Lab dropped).
    let guard = MUTEX.lock().unwrap_or_else(|e| e.into_inner());
    let file = File::create("/var/tmp/tern-lab-tests.lock").expect("create lock file");
    let file = Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock the lab lock file");
    LabLock {
        _file: file,
        _guard: guard,
    }
}

/// A unique, short prefix for this test's lab.
pub fn unique_prefix(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{tag}{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Output of a command as text, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Longest run of a test's stream client: far beyond what any test needs, so a slow machine
/// never ends a stream before what it watches is over.
pub const STREAM_CLIENT_MAX_MS: u64 = 600_000;

/// A `tern-guest client` streaming from a guest (see [`Lab::spawn_stream_client`]).
pub struct StreamClient {
    handle: JoinHandle<Value>,
    stop_file: PathBuf,
    started: Instant,
    min: Duration,
}

impl StreamClient {
    /// Has the run ended already (it should not have, before `finish`)?
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Ends the run once it has lasted its minimum, and returns the client's report.
    pub fn finish(self) -> Value {
        if let Some(left) = self.min.checked_sub(self.started.elapsed()) {
            std::thread::sleep(left);
        }
        std::fs::write(&self.stop_file, b"").expect("create the client's stop file");
        let report = self.handle.join().expect("client thread");
        let _ = std::fs::remove_file(&self.stop_file);
        report
    }
}

/// A running lab; `Drop` runs `tern lab down`.
pub struct Lab {
    pub prefix: String,
    pub dir: PathBuf,
    pub hosts: u32,
    /// lab.json as written by `lab up`.
    pub state: Value,
    down: bool,
    /// HA labs: the center `tern` talks to, when not the first (see [`Lab::use_center`]).
    center: Mutex<Option<String>>,
    _lock: LabLock,
}

impl Lab {
    /// Brings up a lab with `hosts` hosts and the guest image in shared storage.
    pub fn up(tag: &str, hosts: u32) -> Lab {
        Self::up_with(tag, hosts, &[])
    }

    pub fn up_with(tag: &str, hosts: u32, extra: &[&str]) -> Lab {
        let guest = guest_dir();
        let lock = lab_lock();
        let prefix = unique_prefix(tag);
        let dir = PathBuf::from(format!("/var/tmp/tern-test-{prefix}"));
        let mut lab = Lab {
            prefix,
            dir,
            hosts,
            state: Value::Null,
            down: false,
            center: Mutex::new(None),
            _lock: lock,
        };
        let started = Instant::now();
        let hosts_s = hosts.to_string();
        let guest_s = guest.display().to_string();
        let mut args = vec!["lab", "up", "--hosts", &hosts_s, "--guest-dir", &guest_s];
        args.extend_from_slice(extra);
        let out = lab.lab_cmd(&args);
        assert!(out.status.success(), "lab up failed:\n{}", text(&out));
        eprintln!("lab {} up in {:.1?}", lab.prefix, started.elapsed());
        lab.reload_state();
        lab
    }

    pub fn reload_state(&mut self) {
        let raw = std::fs::read_to_string(self.dir.join("lab.json")).expect("read lab.json");
        self.state = serde_json::from_str(&raw).expect("parse lab.json");
    }

    /// `tern lab --dir D SUB [--prefix P] REST...` (args start with "lab"; the prefix is added
    /// to the subcommands that take one).
    pub fn lab_cmd(&self, args: &[&str]) -> Output {
        assert_eq!(args.first(), Some(&"lab"), "lab_cmd runs lab commands");
        let dir = self.dir.display().to_string();
        let mut full: Vec<&str> = vec!["lab", "--dir", &dir];
        full.extend_from_slice(&args[1..]);
        if matches!(args.get(1), Some(&"up") | Some(&"down") | Some(&"client")) {
            full.splice(4..4, ["--prefix", self.prefix.as_str()]);
        }
        Command::new(tern_exe())
            .args(&full)
            .env_remove("TERN_CENTER")
            .env_remove("TERN_TOKEN")
            .env("TERN_LAB_DIR", &self.dir)
            .stdin(Stdio::null())
            .output()
            .expect("run tern")
    }

    /// Runs `tern ARGS` against this lab's center (found through lab.json, or the one
    /// [`Lab::use_center`] chose).
    pub fn tern(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(tern_exe());
        cmd.args(args)
            .env_remove("TERN_CENTER")
            .env_remove("TERN_TOKEN")
            .env("TERN_LAB_DIR", &self.dir)
            .stdin(Stdio::null());
        if let Some(name) = self
            .center
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            cmd.env(
                "TERN_CENTER",
                format!("unix:{}", self.dir.join(name).join("center.sock").display()),
            )
            .env("TERN_TOKEN", self.token());
        }
        cmd.output().expect("run tern")
    }

    /// HA labs: `tern` talks to center `name` (`center`, `center2`, `center3`) from now on.
    pub fn use_center(&self, name: &str) {
        *self.center.lock().unwrap_or_else(|p| p.into_inner()) = Some(name.to_string());
    }

    /// Runs `tern ARGS`, asserting success; returns stdout.
    pub fn tern_ok(&self, args: &[&str]) -> String {
        let out = self.tern(args);
        assert!(
            out.status.success(),
            "tern {args:?} failed:\n{}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `tern ARGS -o json`, asserting success, and decodes stdout.
    pub fn tern_json<T: DeserializeOwned>(&self, args: &[&str]) -> T {
        let mut a = args.to_vec();
        a.extend_from_slice(&["-o", "json"]);
        let out = self.tern_ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("tern {a:?}: bad JSON ({e}): {out}"))
    }

    /// The admin token.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join("admin.token"))
            .expect("admin token")
            .trim()
            .to_string()
    }

    /// The center's unix socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("center/center.sock")
    }

    pub fn shared(&self) -> PathBuf {
        self.dir.join("shared")
    }

    pub fn guest_kernel(&self) -> String {
        self.shared().join("guest/vmlinuz").display().to_string()
    }

    pub fn guest_initrd(&self) -> String {
        self.shared()
            .join("guest/initramfs.img")
            .display()
            .to_string()
    }

    /// Pid of a lab process (`center`, `h1`…) from lab.json.
    pub fn pid(&mut self, name: &str) -> u32 {
        self.reload_state();
        let standby = self.state["standbys"]
            .as_array()
            .and_then(|s| s.iter().find(|p| p["name"] == name));
        let p = if name == "center" {
            &self.state["center"]
        } else if let Some(s) = standby {
            s
        } else {
            self.state["hosts"]
                .as_array()
                .and_then(|hs| hs.iter().find(|h| h["name"] == name))
                .map(|h| &h["agent"])
                .unwrap_or(&Value::Null)
        };
        p["pid"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or_else(|| panic!("no pid for {name} in lab.json"))
    }

    /// Waits until a VM's console has a line containing `needle`; returns that line.
    pub fn wait_console(&self, vm: &str, needle: &str, timeout: Duration) -> String {
        self.wait_console_nth(vm, needle, 1, timeout)
    }

    /// How many console lines of a VM contain `needle` now (the log spans every boot).
    pub fn console_count(&self, vm: &str, needle: &str) -> usize {
        let out = self.tern(&["vm", "console", vm, "--bytes", "1048576"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until the console holds `n` lines containing `needle`; returns the n-th.
    pub fn wait_console_nth(&self, vm: &str, needle: &str, n: usize, timeout: Duration) -> String {
        let mut last = String::new();
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.tern(&["vm", "console", vm, "--bytes", "1048576"]);
            if out.status.success() {
                last = String::from_utf8_lossy(&out.stdout).into_owned();
                if let Some(line) = last.lines().filter(|l| l.contains(needle)).nth(n - 1) {
                    return line.trim().to_string();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no `{needle}` (#{n}) on {vm}'s console after {timeout:?}; console tail:\n{}",
                tail(&last, 40)
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// `tern lab client -- CMD` as a command not yet run: the caller chooses its stdio.
    pub fn client_command(&self, cmd: &[&str]) -> Command {
        let dir = self.dir.display().to_string();
        let mut c = Command::new(tern_exe());
        c.args([
            "lab",
            "--dir",
            &dir,
            "client",
            "--prefix",
            &self.prefix,
            "--",
        ])
        .args(cmd)
        .env_remove("TERN_CENTER")
        .env_remove("TERN_TOKEN")
        .env("TERN_LAB_DIR", &self.dir);
        c
    }

    /// Runs a command in the client namespace through `tern lab client`.
    pub fn client(&self, cmd: &[&str]) -> Output {
        let mut args = vec!["lab", "client", "--"];
        args.extend_from_slice(cmd);
        self.lab_cmd(&args)
    }

    /// Runs `tern-guest client ARGS --json` in the client namespace and decodes its report.
    pub fn guest_client(&self, args: &[&str]) -> (Output, Option<Value>) {
        let exe = guest_dir().join("tern-guest").display().to_string();
        let mut cmd = vec![exe.as_str(), "client"];
        cmd.extend_from_slice(args);
        let out = self.client(&cmd);
        let json = String::from_utf8_lossy(&out.stdout)
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<Value>(l.trim()).ok());
        (out, json)
    }

    /// Streams from the guest for `ms` and returns the report (asserting it parsed).
    pub fn stream_report(&self, addr: &str, ms: u64) -> Value {
        let ms = ms.to_string();
        let (out, json) = self.guest_client(&["--addr", addr, "--duration-ms", &ms, "--json"]);
        json.unwrap_or_else(|| panic!("tern-guest client gave no JSON report:\n{}", text(&out)))
    }

    /// The guest's stats JSON (`tern-guest client --stats`).
    pub fn guest_stats(&self, addr: &str) -> Value {
        let (out, json) = self.guest_client(&["--addr", addr, "--stats"]);
        json.unwrap_or_else(|| panic!("tern-guest client --stats gave no JSON:\n{}", text(&out)))
    }

    /// The arguments of `tern vm create NAME` for a test guest on `host` (1 vCPU, serving its
    /// stream on port 7000 at `ip`), not started.
    #[allow(clippy::too_many_arguments)]
    pub fn vm_create_args(
        &self,
        name: &str,
        host: &str,
        ip: &str,
        mac: &str,
        memory_mib: u32,
        extra_cmdline: &str,
        disks: &[&str],
    ) -> Vec<String> {
        let cmdline =
            format!("console=ttyS0 ipv6.disable=1 tern.ip={ip}/24 tern.serve=7000 {extra_cmdline}");
        let mut args: Vec<String> = [
            "vm",
            "create",
            name,
            "--cluster",
            "lab",
            "--host",
            host,
            "--vcpus",
            "1",
            "--memory-mib",
            &memory_mib.to_string(),
            "--kernel",
            &self.guest_kernel(),
            "--initrd",
            &self.guest_initrd(),
            "--cmdline",
            cmdline.trim_end(),
            "--mac",
            mac,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for d in disks {
            args.extend(["--disk".to_string(), d.to_string()]);
        }
        args
    }

    /// Creates a VM of the lab's guest image (1 vCPU) on `host`, serving on `ip`:7000, with
    /// `extra_cmdline` added to its kernel command line and `disks` (`--disk` specs) attached;
    /// starts it and waits for the guest's ready line. Returns the VM's id.
    #[allow(clippy::too_many_arguments)]
    pub fn create_vm(
        &self,
        name: &str,
        host: &str,
        ip: &str,
        mac: &str,
        memory_mib: u32,
        extra_cmdline: &str,
        disks: &[&str],
    ) -> String {
        let args = self.vm_create_args(name, host, ip, mac, memory_mib, extra_cmdline, disks);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.tern_ok(&args);
        self.tern_ok(&["vm", "start", name]);
        self.wait_console(name, "TERN-GUEST-READY", Duration::from_secs(120));
        let vm: Value = self.tern_json(&["vm", "show", name]);
        vm["id"].as_str().expect("vm id").to_string()
    }

    /// Runs `tern-guest client --json` against `addr` in the client namespace on its own
    /// thread, for at least `min_ms` and at most [`STREAM_CLIENT_MAX_MS`]: whatever the caller
    /// does meanwhile may take as long as the machine's load makes it, and
    /// [`StreamClient::finish`] ends the run (not before `min_ms`) and gives the report.
    /// Returns once the guest has accepted the client's connection, so what the caller does
    /// next happens while the client streams.
    pub fn spawn_stream_client(&self, addr: &str, min_ms: u64) -> StreamClient {
        let args = ["client", "--addr", addr, "--json"];
        // Every stats query is a serve connection of its own.
        self.spawn_guest_client(addr, &args, min_ms, true, |stats| {
            stats["streams"]["total"].as_u64()
        })
    }

    /// Like [`Self::spawn_stream_client`], for the guest's request/response port (`IP:7001`;
    /// `stats_addr` is its serve port): `tern-guest rr`, one request per millisecond. Returns
    /// once the guest has accepted the connection.
    pub fn spawn_rr_client(&self, addr: &str, stats_addr: &str, min_ms: u64) -> StreamClient {
        let args = ["rr", "--addr", addr, "--interval-ms", "1"];
        self.spawn_guest_client(stats_addr, &args, min_ms, false, |stats| {
            stats["rr"]["connections"].as_u64()
        })
    }

    /// Runs `tern-guest arp` in the client namespace: an ARP request for `ip` every 2 ms, as
    /// clients without an entry for the guest send. Returns once the guest has answered one.
    pub fn spawn_arp_prober(&self, ip: &str) -> StreamClient {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let stop_file = self.dir.join(format!("arp-stop-{n}"));
        let ready = self.dir.join(format!("arp-ready-{n}"));
        let _ = std::fs::remove_file(&stop_file);
        let _ = std::fs::remove_file(&ready);
        let ready_arg = ready.display().to_string();
        let args = [
            "arp",
            "--iface",
            "eth0",
            "--source",
            "10.78.0.2",
            "--target",
            ip,
            "--interval-ms",
            "2",
            "--ready-file",
            &ready_arg,
        ];
        let handle = self.spawn_guest_client_unwatched(&args, &stop_file);
        wait_for(
            "the guest's first answer to the ARP prober",
            Duration::from_secs(30),
            || {
                assert!(
                    !handle.is_finished(),
                    "the ARP prober ended before any answer"
                );
                ready.exists().then_some(())
            },
        );
        StreamClient {
            handle,
            stop_file,
            started: Instant::now(),
            min: Duration::ZERO,
        }
    }

    /// Runs a `tern-guest` client (`args`, to which the duration and stop file are added) in
    /// the client namespace on its own thread; returns once `connections` (read from the
    /// guest's stats at `stats_addr`, which count each query too when `queries_count`) shows
    /// the guest accepted it.
    fn spawn_guest_client(
        &self,
        stats_addr: &str,
        args: &[&str],
        min_ms: u64,
        queries_count: bool,
        connections: impl Fn(&Value) -> Option<u64>,
    ) -> StreamClient {
        static N: AtomicU32 = AtomicU32::new(0);
        let stop_file = self
            .dir
            .join(format!("client-stop-{}", N.fetch_add(1, Ordering::Relaxed)));
        let _ = std::fs::remove_file(&stop_file);
        let started = Instant::now();
        let count = |lab: &Lab| {
            let s = lab.guest_stats(stats_addr);
            connections(&s).unwrap_or_else(|| panic!("no connection count in the stats: {s}"))
        };
        // When every stats query is a connection of its own, the k-th query after `before`
        // sees `before + k`, one more once the client has connected.
        let before = count(self);
        let client = self.spawn_guest_client_unwatched(args, &stop_file);
        let mut queries = 0;
        wait_for(
            "the client's connection to the guest",
            Duration::from_secs(30),
            || {
                assert!(
                    !client.is_finished(),
                    "the client run ended before the guest saw it connect"
                );
                if queries_count {
                    queries += 1;
                }
                (count(self) > before + queries).then_some(())
            },
        );
        StreamClient {
            handle: client,
            stop_file,
            started,
            min: Duration::from_millis(min_ms),
        }
    }

    fn spawn_guest_client_unwatched(&self, args: &[&str], stop_file: &Path) -> JoinHandle<Value> {
        let stop_file = stop_file.to_path_buf();
        let dir = self.dir.clone();
        let prefix = self.prefix.clone();
        let exe = guest_dir().join("tern-guest");
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        std::thread::spawn(move || {
            let out = Command::new(tern_exe())
                .args(["lab", "--dir"])
                .arg(&dir)
                .args(["client", "--prefix", &prefix, "--"])
                .arg(exe)
                .args(&args)
                .arg("--duration-ms")
                .arg(STREAM_CLIENT_MAX_MS.to_string())
                .arg("--stop-file")
                .arg(&stop_file)
                .env("TERN_LAB_DIR", &dir)
                .stdin(Stdio::null())
                .output()
                .expect("run the client");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str(l.trim()).ok())
                .unwrap_or_else(|| panic!("no client report:\n{}", text(&out)))
        })
    }

    /// Exactly one QEMU runs VM `name` (id `id`), on `host`; the inventory says so and that it
    /// runs; no other host of the lab keeps a run dir of it.
    pub fn one_copy_on(&self, name: &str, id: &str, host: &str) {
        let vm: Value = self.tern_json(&["vm", "show", name]);
        assert_eq!(vm["host"], host, "{vm}");
        for other in (1..=self.hosts).map(|i| format!("h{i}")) {
            if other == host {
                continue;
            }
            let leftover = self.dir.join(format!("hosts/{other}/vms/{id}"));
            wait_for(
                &format!("{} to disappear", leftover.display()),
                Duration::from_secs(60),
                || (!leftover.exists()).then_some(()),
            );
        }
        // A copy being removed may still be on its way out when its run dir is gone: wait for
        // it to end rather than count it.
        let mut qemus = qemus_of(id);
        let deadline = Instant::now() + Duration::from_secs(30);
        while qemus.len() > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            qemus = qemus_of(id);
        }
        assert_eq!(qemus.len(), 1, "QEMUs of VM {name}: {qemus:#?}");
        assert!(
            qemus[0].1.contains(&format!("/hosts/{host}/vms/{id}")),
            "the copy is not {host}'s: {}",
            qemus[0].1
        );
        wait_for(
            &format!("VM {name} to be running"),
            Duration::from_secs(30),
            || {
                let v: Value = self.tern_json(&["vm", "show", name]);
                (v["actual_state"] == "running").then_some(())
            },
        );
    }

    /// Starts a slow migration (2 MiB/s) of VM `name` (id `id`) to `to` in the background;
    /// returns its task id once pre-copy runs and the destination QEMU exists.
    pub fn start_slow_migration(&self, name: &str, to: &str, id: &str) -> String {
        let task = self
            .tern_ok(&[
                "vm",
                "migrate",
                name,
                "--to",
                to,
                "--bandwidth",
                "16",
                "--detach",
            ])
            .trim()
            .to_string();
        let pidfile = self.dir.join(format!("hosts/{to}/vms/{id}/qemu.pid"));
        wait_for("pre-copy to run", Duration::from_secs(60), || {
            let t: Value = self.tern_json(&["task", "show", &task]);
            (pidfile.exists() && t["phase"].as_str().unwrap_or("").starts_with("pre-copy"))
                .then_some(())
        });
        task
    }

    /// Waits until task `id` ends (succeeded, failed or cancelled); returns it.
    pub fn wait_task_end(&self, id: &str, timeout: Duration) -> Value {
        wait_for(&format!("task {id} to end"), timeout, || {
            let t: Value = self.tern_json(&["task", "show", id]);
            matches!(
                t["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            )
            .then_some(t)
        })
    }

    /// Waits until the center sees every host connected.
    pub fn wait_hosts_connected(&self, what: &str) {
        wait_for(what, Duration::from_secs(30), || {
            let hosts: Vec<Value> = self.tern_json(&["host", "list"]);
            hosts
                .iter()
                .all(|h| h["state"] == "connected")
                .then_some(())
        });
    }

    /// `tern vm migrate ARGS -o json` (it follows the task to its end): the command's output
    /// and the task it printed.
    pub fn migrate_json(&self, args: &[&str]) -> (Output, Option<Value>) {
        let mut a = vec!["vm", "migrate"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        let out = self.tern(&a);
        let task = serde_json::from_slice::<Value>(&out.stdout).ok();
        (out, task)
    }

    /// Takes the lab down now (Drop does it otherwise); asserts it succeeded.
    pub fn down(mut self) {
        self.down = true;
        let out = self.lab_cmd(&["lab", "down"]);
        assert!(out.status.success(), "lab down failed:\n{}", text(&out));
    }

    /// Shows the logs of the lab's daemons (for a failing test).
    pub fn dump_logs(&self) {
        if let Ok(rd) = std::fs::read_dir(self.dir.join("logs")) {
            for e in rd.flatten() {
                let t = std::fs::read_to_string(e.path()).unwrap_or_default();
                eprintln!("=== {}\n{}", e.path().display(), tail(&t, 60));
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.down {
            return;
        }
        if std::thread::panicking() {
            self.dump_logs();
        }
        let out = self.lab_cmd(&["lab", "down"]);
        if !out.status.success() {
            eprintln!("lab down failed:\n{}", text(&out));
        }
    }
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Parses `key=value` words of a line (e.g. the guest's ready line).
pub fn kv(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
}

/// A raw HTTP/1.1 request over the center's unix socket: (status, body). Used for requests
/// the typed client cannot make (malformed JSON, no token).
pub fn raw_http(
    socket: &Path,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect center socket");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" || method == "PUT" {
        req.push_str("Content-Type: application/json\r\n");
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("send request");
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).expect("read response");
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {resp:?}"));
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, dechunk(&body))
}

/// Undoes chunked transfer encoding if the body looks chunked.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size_line, after)) = rest.split_once("\r\n") else {
            return body.to_string();
        };
        let Ok(size) = usize::from_str_radix(size_line.trim(), 16) else {
            return body.to_string();
        };
        if size == 0 {
            return out;
        }
        if after.len() < size {
            return body.to_string();
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
}

/// Namespaces that exist now.
pub fn namespaces() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Link names in the root namespace.
pub fn root_links() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let name = l.split(':').nth(1)?.trim();
            Some(name.split('@').next()?.to_string())
        })
        .collect()
}

/// What /proc says of a process now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcState {
    /// Running (or sleeping): not exiting.
    Live,
    /// Inside its exit: `PF_EXITING` is set, or it is a zombie leader whose other threads are
    /// still exiting. Its command line may read short or empty (its memory is being torn down),
    /// so nothing read from it may be trusted.
    Exiting,
    /// No such process, or a zombie whose threads are all gone.
    Gone,
}

/// The kernel's `PF_EXITING` task flag (include/linux/sched.h), field 9 of /proc/PID/stat.
const PF_EXITING: u64 = 0x4;

pub fn proc_state(pid: u32) -> ProcState {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return ProcState::Gone;
    };
    // The command name is in parentheses and may hold spaces: fields after it split cleanly.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return ProcState::Gone;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is the state (field 3), fields[6] the flags (field 9).
    let flags = fields
        .get(6)
        .and_then(|f| f.parse::<u64>().ok())
        .unwrap_or(0);
    match fields.first() {
        None => ProcState::Gone,
        Some(&("Z" | "X")) => {
            let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
            if threads > 1 {
                ProcState::Exiting
            } else {
                ProcState::Gone
            }
        }
        Some(_) if flags & PF_EXITING != 0 => ProcState::Exiting,
        Some(_) => ProcState::Live,
    }
}

/// Live processes whose command line contains `needle`. A process that is exiting (before or
/// after its command line is read) is left out: it is no copy of anything any more, and what
/// its command line reads is unreliable.
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || proc_state(pid) != ProcState::Live {
            continue;
        }
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        // A QEMU names its files relative to its run dir: where it works counts too.
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        // Read the state again: a process that began exiting while we read may have given a
        // command line cut short.
        if (cmd.contains(needle) || cwd.contains(needle)) && proc_state(pid) == ProcState::Live {
            v.push((pid, cmd));
        }
    }
    v
}

/// Live QEMU processes of VM `id` (`-uuid ID` on their command line), anywhere on this
/// machine: the pid, and the command line followed by the run dir it works in (QEMU names its
/// files relative to it, so the host shows there, not in the arguments).
pub fn qemus_of(id: &str) -> Vec<(u32, String)> {
    processes_mentioning(&format!("-uuid {id}"))
        .into_iter()
        .filter(|(_, c)| c.contains("qemu-system"))
        .map(|(pid, c)| {
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "?".into());
            (pid, format!("{c} (in {cwd})"))
        })
        .collect()
}

/// Does the process still exist (live or exiting)? "Not alive" means it is gone for good.
pub fn alive(pid: u32) -> bool {
    proc_state(pid) != ProcState::Gone
}

/// Waits until the process is gone (it may take a moment to finish exiting after whatever
/// ended it); panics naming `what` after `timeout`.
pub fn wait_gone(pid: u32, what: &str, timeout: Duration) {
    wait_for(&format!("{what} (pid {pid}) to be gone"), timeout, || {
        (!alive(pid)).then_some(())
    });
}

/// Asserts a stream client's report shows an intact stream: no reset, nothing missing,
/// duplicated or corrupt, the same boot, and more than 100 records.
pub fn assert_stream_intact(report: &Value) {
    for k in ["resets", "missing", "duplicates", "corrupt", "boot_changes"] {
        assert_eq!(report[k], 0, "{k}: {report}");
    }
    assert!(report["records"].as_u64().unwrap_or(0) > 100, "{report}");
}

/// Journal record layout of the test guest's disk journal (crates/tern-guest/src/disk.rs).
pub const JOURNAL_RECORD_BYTES: usize = 4096;
pub const JOURNAL_MAGIC: &[u8; 8] = b"TERNJRN1";

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Reads a journal from a raw device image: asserts that its records run in order from 0, each
/// with its checksum (and the boot id `boot`, when given), and that none follows its end;
/// returns how many there are.
pub fn journal_records(bytes: &[u8], boot: Option<&[u8]>) -> u64 {
    let mut records = 0u64;
    for (index, block) in bytes.chunks_exact(JOURNAL_RECORD_BYTES).enumerate() {
        if &block[..8] != JOURNAL_MAGIC {
            // The end: nothing may follow it.
            let rest = &bytes[index * JOURNAL_RECORD_BYTES..];
            assert!(
                rest.chunks_exact(JOURNAL_RECORD_BYTES)
                    .all(|b| &b[..8] != JOURNAL_MAGIC),
                "journal records after the end at record {index}"
            );
            break;
        }
        let word = |at: usize| u64::from_le_bytes(block[at..at + 8].try_into().expect("8 bytes"));
        assert_eq!(word(8), index as u64, "record {index}: sequence number");
        assert_eq!(
            fnv1a64(&block[..JOURNAL_RECORD_BYTES - 8]),
            word(JOURNAL_RECORD_BYTES - 8),
            "record {index}: checksum"
        );
        if let Some(boot) = boot {
            assert_eq!(&block[24..40], boot, "record {index}: boot id");
        }
        records += 1;
    }
    records
}
