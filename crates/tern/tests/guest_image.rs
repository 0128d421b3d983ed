//! The test guest image end to end: `guest/build.sh` builds it from scratch (reproducibly, and a
//! second run does nothing), and plain QEMU (TCG, user networking on loopback) boots it: the
//! readiness line, an unbroken record stream, a clean memory verifier, and a disk journal that
//! survives a power-off and a second boot.
//!
//! Needs what `scripts/setup.sh` installs (QEMU, apt lists for the kernel and busybox packages).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

const OUTPUTS: [&str; 4] = ["vmlinuz", "initramfs.img", "tern-guest", "MANIFEST"];
const READY_TIMEOUT: Duration = Duration::from_secs(180);
const GUEST_IP: &str = "10.0.2.15";
const GUEST_PORT: u16 = 7000;

use tern_testkit::repo_root;

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).expect("clear scratch dir");
    }
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

fn run_build(out: &Path) -> (Output, Duration) {
    let start = Instant::now();
    let output = Command::new(repo_root().join("guest/build.sh"))
        .arg(out)
        .stdin(Stdio::null())
        .output()
        .expect("run guest/build.sh");
    (output, start.elapsed())
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The image every test uses, built once from scratch (the .deb cache may be reused).
struct Image {
    dir: PathBuf,
    cold_build: Duration,
}

fn image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let dir = scratch("guest-image");
        let (output, cold_build) = run_build(&dir);
        assert!(
            output.status.success(),
            "guest/build.sh failed:\n{}",
            text(&output)
        );
        for name in OUTPUTS {
            assert!(
                dir.join(name).is_file(),
                "build made no {name}:\n{}",
                text(&output)
            );
        }
        eprintln!("guest image: cold build {cold_build:.1?}");
        Image { dir, cold_build }
    })
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>, SystemTime)> {
    OUTPUTS
        .iter()
        .map(|name| {
            let path = dir.join(name);
            let bytes = std::fs::read(&path).expect("read output");
            let mtime = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .expect("mtime");
            (name.to_string(), bytes, mtime)
        })
        .collect()
}

#[test]
fn build_is_cached_reproducible_and_recorded() {
    let image = image();
    let before = snapshot(&image.dir);

    let (output, warm) = run_build(&image.dir);
    let log = text(&output);
    assert!(output.status.success(), "second build failed:\n{log}");
    assert!(
        log.contains("up to date"),
        "second build did not say up to date:\n{log}"
    );
    assert!(
        !log.contains("building the guest image"),
        "second build rebuilt:\n{log}"
    );
    assert!(
        before == snapshot(&image.dir),
        "second build changed the outputs"
    );
    eprintln!(
        "guest image: warm build {warm:.1?} (cold {:.1?})",
        image.cold_build
    );

    // The MANIFEST names both packages and hashes every output correctly.
    let manifest = std::fs::read_to_string(image.dir.join("MANIFEST")).expect("MANIFEST");
    let package_lines: Vec<&str> = manifest
        .lines()
        .filter(|l| l.starts_with("package "))
        .collect();
    assert_eq!(package_lines.len(), 2, "{manifest}");
    assert!(
        package_lines[0].starts_with("package linux-image-")
            && package_lines[0].contains("-cloud-amd64 ")
    );
    assert!(package_lines[1].starts_with("package busybox-static "));
    for line in &package_lines {
        let sha = line.rsplit(' ').next().unwrap_or_default();
        assert!(
            sha.len() == 64 && sha.chars().all(|c| c.is_ascii_hexdigit()),
            "{line}"
        );
    }
    for name in ["vmlinuz", "initramfs.img", "tern-guest"] {
        let path = image.dir.join(name);
        let size = std::fs::metadata(&path).expect("output size").len();
        let want = format!("output {} {size} {name}", sha256(&path));
        assert!(
            manifest.lines().any(|l| l == want),
            "MANIFEST lacks {want:?}:\n{manifest}"
        );
    }
    let modules = manifest
        .lines()
        .find_map(|l| l.strip_prefix("modules "))
        .expect("modules line");
    let order: Vec<&str> = modules.split(' ').collect();
    let pos = |m: &str| {
        order
            .iter()
            .position(|x| *x == m)
            .unwrap_or_else(|| panic!("{m} missing: {modules}"))
    };
    assert!(
        pos("virtio_ring") < pos("virtio") && pos("virtio") < pos("virtio_pci"),
        "{modules}"
    );
    assert!(
        pos("failover") < pos("net_failover") && pos("net_failover") < pos("virtio_net"),
        "{modules}"
    );
    assert!(pos("virtio") < pos("virtio_blk"), "{modules}");
    let initramfs = std::fs::metadata(image.dir.join("initramfs.img"))
        .expect("initramfs")
        .len();
    eprintln!("guest image: initramfs.img {initramfs} bytes");
    assert!(initramfs < 8 << 20, "initramfs grew to {initramfs} bytes");

    // A fresh build elsewhere gives the same bytes.
    let other = scratch("guest-image-repro");
    let (output, _) = run_build(&other);
    assert!(
        output.status.success(),
        "rebuild failed:\n{}",
        text(&output)
    );
    for name in OUTPUTS {
        assert!(
            std::fs::read(image.dir.join(name)).ok() == std::fs::read(other.join(name)).ok(),
            "{name} differs between two builds"
        );
    }
    let _ = std::fs::remove_dir_all(&other);
}

/// One QEMU process running the image; killed on drop.
struct Guest {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    booted: Instant,
}

/// QEMU boots run one at a time: TCG guests on a 2-core machine slow each other down.
fn qemu_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

impl Guest {
    fn boot(image: &Path, params: &str, disk: Option<&Path>) -> Guest {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let append = format!(
            "console=ttyS0 quiet ipv6.disable=1 tern.ip={GUEST_IP}/24 tern.gw=10.0.2.2 \
             tern.serve={GUEST_PORT} {params}"
        );
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg",
            "-m",
            "256",
            "-smp",
            "2",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", dir.path().join("serial.log").display()))
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            dir.path().join("qmp.sock").display()
        ))
        .arg("-kernel")
        .arg(image.join("vmlinuz"))
        .arg("-initrd")
        .arg(image.join("initramfs.img"))
        .args(["-append", &append])
        .arg("-netdev")
        .arg(format!(
            "user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:{GUEST_PORT}"
        ))
        .args(["-device", "virtio-net-pci,netdev=n0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("qemu.err")).expect("qemu.err"),
        ));
        if let Some(disk) = disk {
            cmd.arg("-drive")
                .arg(format!("file={},format=raw,if=virtio", disk.display()));
        }
        let child = cmd
            .spawn()
            .expect("start qemu-system-x86_64 (installed by scripts/setup.sh)");
        Guest {
            child,
            dir,
            port,
            booted: Instant::now(),
        }
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serial.log")).unwrap_or_default()
    }

    fn diagnostics(&self) -> String {
        let err = std::fs::read_to_string(self.dir.path().join("qemu.err")).unwrap_or_default();
        format!("serial console:\n{}\nqemu stderr:\n{err}", self.serial())
    }

    /// Waits for the readiness line; returns it and the time since QEMU started.
    fn wait_ready(&mut self) -> (String, Duration) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let log = self.serial();
            if let Some(line) = log.lines().find(|l| l.starts_with("TERN-GUEST-READY ")) {
                return (line.to_string(), self.booted.elapsed());
            }
            assert!(
                !log.contains("TERN-GUEST-ERROR") && !log.contains("Kernel panic"),
                "guest failed to boot:\n{}",
                self.diagnostics()
            );
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "qemu exited ({status}) before ready:\n{}",
                    self.diagnostics()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no TERN-GUEST-READY within {READY_TIMEOUT:?}:\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn stats(&self, image: &Path) -> Value {
        let out = Command::new(image.join("tern-guest"))
            .args(["client", "--addr", &self.addr(), "--stats"])
            .output()
            .expect("run tern-guest client --stats");
        assert!(
            out.status.success(),
            "stats failed: {}\n{}",
            text(&out),
            self.diagnostics()
        );
        serde_json::from_slice(&out.stdout).expect("stats is JSON")
    }

    /// Presses the ACPI power button and waits for QEMU to exit.
    fn power_down(&mut self) -> Duration {
        let start = Instant::now();
        let sock = UnixStream::connect(self.dir.path().join("qmp.sock")).expect("connect QMP");
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("QMP timeout");
        let mut reader = BufReader::new(sock.try_clone().expect("clone QMP socket"));
        let mut writer = sock;
        let mut line = String::new();
        reader.read_line(&mut line).expect("QMP greeting");
        for command in ["qmp_capabilities", "system_powerdown"] {
            writeln!(writer, "{{\"execute\":\"{command}\"}}").expect("QMP write");
            loop {
                line.clear();
                reader.read_line(&mut line).expect("QMP reply");
                assert!(!line.contains("\"error\""), "QMP {command}: {line}");
                if line.contains("\"return\"") {
                    break;
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait qemu") {
                assert!(status.success(), "qemu exit status {status}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "guest did not power off:\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            self.serial().contains("TERN-GUEST-POWEROFF"),
            "{}",
            self.diagnostics()
        );
        start.elapsed()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn field(line: &str, key: &str) -> String {
    line.split(' ')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key}= missing in {line:?}"))
        .to_string()
}

fn num(v: &Value, path: &str) -> u64 {
    v.pointer(path)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{path} missing in {v}"))
}

/// Polls the guest's stats until `done` holds.
fn stats_until(guest: &Guest, image: &Path, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = guest.stats(image);
        if done(&stats) {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "stats never showed {what}: {stats}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn guest_boots_streams_and_verifies_memory() {
    let image = &image().dir;
    let _one_at_a_time = qemu_lock();
    let mut guest = Guest::boot(image, "tern.mem=64 tern.dirty=32", None);
    let (ready, elapsed) = guest.wait_ready();
    eprintln!("guest ready after {elapsed:.1?}: {ready}");
    assert_eq!(field(&ready, "cpus"), "2", "{ready}");
    let mem_mib: u64 = field(&ready, "mem_mib")
        .parse()
        .expect("mem_mib is a number");
    assert!((255..=256).contains(&mem_mib), "{ready}");
    assert_eq!(field(&ready, "ip"), GUEST_IP, "{ready}");
    let uptime_ms: u64 = field(&ready, "uptime_ms")
        .parse()
        .expect("uptime_ms is a number");
    assert!(
        uptime_ms > 0 && uptime_ms < elapsed.as_millis() as u64,
        "{ready}"
    );

    let out = Command::new(image.join("tern-guest"))
        .args([
            "client",
            "--addr",
            &guest.addr(),
            "--duration-ms",
            "3000",
            "--json",
        ])
        .output()
        .expect("run tern-guest client");
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("client output is not JSON ({e}): {}", text(&out)));
    eprintln!("client: {report}");
    assert!(
        out.status.success(),
        "client says the stream broke: {report}"
    );
    assert_eq!(report["ok"], Value::Bool(true), "{report}");
    // 10 ms records for 3 s; a slow TCG guest on a loaded machine still sends far more than 50.
    assert!(num(&report, "/records") >= 50, "{report}");
    for key in [
        "/resets",
        "/missing",
        "/duplicates",
        "/corrupt",
        "/boot_changes",
    ] {
        assert_eq!(num(&report, key), 0, "{key}: {report}");
    }
    assert_eq!(num(&report, "/first_seq"), 1, "{report}");
    assert_eq!(
        num(&report, "/last_seq"),
        num(&report, "/records"),
        "{report}"
    );
    assert!(num(&report, "/echoes") >= 1, "{report}");

    let stats = stats_until(&guest, image, "a full verifier pass", |s| {
        s.pointer("/mem/passes")
            .and_then(Value::as_u64)
            .unwrap_or(0)
            >= 1
    });
    eprintln!("stats: {stats}");
    assert_eq!(num(&stats, "/mem/mib"), 64, "{stats}");
    assert_eq!(num(&stats, "/mem/pages"), 64 * 256, "{stats}");
    assert!(num(&stats, "/mem/pages_verified") >= 64 * 256, "{stats}");
    assert_eq!(num(&stats, "/mem/errors"), 0, "{stats}");
    assert!(num(&stats, "/mem/bytes_dirtied") > 0, "{stats}");
    assert_eq!(
        stats["boot_id"], report["boot_id"],
        "stats and stream come from one boot"
    );
    assert!(stats["disk"].is_null(), "{stats}");

    let down = guest.power_down();
    eprintln!("guest powered off {down:.1?} after the power button");
}

#[test]
fn disk_journal_survives_power_off_and_second_boot() {
    let image = &image().dir;
    let _one_at_a_time = qemu_lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("journal.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(8 << 20))
        .expect("create disk");

    let mut first = Guest::boot(image, "tern.disk=/dev/vda", Some(&disk));
    first.wait_ready();
    let stats = stats_until(&first, image, "20 appended records", |s| {
        s.pointer("/disk/appended")
            .and_then(Value::as_u64)
            .unwrap_or(0)
            >= 20
    });
    assert_eq!(
        num(&stats, "/disk/verified"),
        0,
        "a new disk holds no records: {stats}"
    );
    assert_eq!(num(&stats, "/disk/errors"), 0, "{stats}");
    assert_eq!(
        num(&stats, "/disk/capacity_records"),
        (8 << 20) / 4096,
        "{stats}"
    );
    let appended = num(&stats, "/disk/appended");
    first.power_down();
    drop(first);

    let mut second = Guest::boot(image, "tern.disk=/dev/vda", Some(&disk));
    second.wait_ready();
    let stats = second.stats(image);
    eprintln!("second boot: {stats} (first boot appended at least {appended})");
    assert!(num(&stats, "/disk/verified") >= appended, "{stats}");
    assert_eq!(num(&stats, "/disk/errors"), 0, "{stats}");
    assert!(
        num(&stats, "/disk/next_seq") >= num(&stats, "/disk/verified"),
        "{stats}"
    );
    second.power_down();
}
