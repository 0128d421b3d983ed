//! A real operating system, as users bring one: Debian 12 from the project's OS image
//! (guest/build-os.sh), booted by firmware — SeaBIOS and UEFI — from both kinds of datastore:
//! a linked clone and a full copy on the shared directory, and full copies written onto two
//! LUNs of the lab's iSCSI SAN. cloud-init configures each from a seed the host writes (host
//! name, SSH key, static address, user data); the client logs in over SSH, and each VM's screen
//! answers on its VNC socket.
//!
//! Then the VMs move back and forth between two hosts while an SSH session stays open on each:
//! after every move the guest's uptime has gone on, systemd says the system is running (not
//! degraded), and the session still echoes what it is sent. A UEFI VM's variables store sits
//! on the shared storage and moves with it; it goes when the VM is deleted.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{repo_root, text, wait_for, Lab};
use serde_json::Value;

/// The OS image (`target/os/debian-12.qcow2`), built with guest/build-os.sh when missing.
fn os_image() -> PathBuf {
    common::built_image("guest/build-os.sh", "os", &["debian-12.qcow2", "MANIFEST"])
        .join("debian-12.qcow2")
}

/// Puts the OS image on the lab's shared storage and imports it as `debian-12`, as an
/// operator would.
fn import_image(lab: &Lab) {
    let incoming = lab.shared().join("incoming");
    std::fs::create_dir_all(&incoming).expect("incoming dir");
    let source = incoming.join("debian-12.qcow2");
    if std::fs::hard_link(os_image(), &source).is_err() {
        std::fs::copy(os_image(), &source).expect("copy the OS image");
    }
    let s = source.display().to_string();
    lab.tern_ok(&["image", "import", &s, "--name", "debian-12"]);
}

/// Creates VM `name` (1 vCPU, 1 GiB) on h1 from the imported image, with the NIC `mac` at
/// `ip`/24 and the user data in `user_data`; `extra` adds options. Does not start it.
fn create_os_vm(lab: &Lab, name: &str, mac: &str, ip: &str, user_data: &Path, extra: &[&str]) {
    let (ip, ud) = (format!("{ip}/24"), user_data.display().to_string());
    let mut args = vec![
        "vm",
        "create",
        name,
        "--cluster",
        "lab",
        "--host",
        "h1",
        "--vcpus",
        "1",
        "--memory-mib",
        "1024",
        "--image",
        "debian-12",
        "--mac",
        mac,
        "--ip",
        &ip,
        "--user-data",
        &ud,
    ];
    args.extend_from_slice(extra);
    lab.tern_ok(&args);
}

/// `tern ARGS` fails, saying `why`.
fn refused(lab: &Lab, args: &[&str], why: &str) {
    let out = lab.tern(args);
    let t = text(&out);
    assert!(!out.status.success(), "tern {args:?} was not refused: {t}");
    assert!(t.contains(why), "tern {args:?}: no {why:?} in {t}");
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().expect("run");
    assert!(out.status.success(), "{cmd:?}:\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One guest of the test: its name, address, firmware, disk and how often it moves.
struct Os {
    name: &'static str,
    ip: &'static str,
    mac: &'static str,
    firmware: &'static str,
    /// How its disk is made from the image (`vm create` options).
    disk: &'static [&'static str],
    /// The root file system's device in the guest (the bus the spec names).
    root: &'static str,
    moves: usize,
}

/// Both firmwares on both kinds of datastore: a linked clone (grown, on virtio-scsi) and a
/// full copy on the shared directory, and full copies written onto two LUNs of the SAN.
const GUESTS: [Os; 4] = [
    Os {
        name: "deb-bios",
        ip: "10.78.0.131",
        mac: "52:54:00:0d:e0:01",
        firmware: "bios",
        disk: &["--disk-size", "4G", "--disk-bus", "scsi"],
        root: "/dev/sda2",
        moves: 2,
    },
    Os {
        name: "deb-uefi",
        ip: "10.78.0.132",
        mac: "52:54:00:0d:e0:02",
        firmware: "uefi",
        disk: &["--full-copy"],
        root: "/dev/vda2",
        moves: 10,
    },
    Os {
        name: "deb-san-bios",
        ip: "10.78.0.133",
        mac: "52:54:00:0d:e0:03",
        firmware: "bios",
        disk: &["--full-copy", "--image-on", "san:1"],
        root: "/dev/vda2",
        moves: 2,
    },
    Os {
        name: "deb-san-uefi",
        ip: "10.78.0.134",
        mac: "52:54:00:0d:e0:04",
        firmware: "uefi",
        disk: &["--full-copy", "--image-on", "san:2", "--disk-bus", "scsi"],
        root: "/dev/sda2",
        moves: 10,
    },
];

/// The SSH command line that logs into `ip` as the image's default user from the client
/// namespace.
fn ssh_args(key: &Path, ip: &str, remote: &str) -> Vec<String> {
    [
        "ssh",
        "-i",
        &key.display().to_string(),
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=5",
        &format!("debian@{ip}"),
        remote,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Runs `remote` in the guest over a fresh SSH login; `None` when the login or command fails.
fn ssh(lab: &Lab, key: &Path, ip: &str, remote: &str) -> Option<String> {
    let args = ssh_args(key, ip, remote);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lab
        .client_command(&args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A login kept open for the whole test: the guest runs `cat`, so every line sent comes back.
struct Session {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Session {
    fn open(lab: &Lab, key: &Path, ip: &str) -> Session {
        let args = ssh_args(key, ip, "echo session-open; exec cat");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = lab
            .client_command(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ssh");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut s = Session {
            child,
            stdin,
            lines,
        };
        s.expect("session-open");
        s
    }

    fn expect(&mut self, want: &str) {
        match self.lines.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => assert_eq!(line, want),
            Err(e) => panic!("the SSH session gave no {want:?} ({e}): it did not survive"),
        }
    }

    /// Sends a line and waits for its echo.
    fn echo(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("write to the SSH session");
        self.stdin.flush().expect("flush");
        self.expect(line);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Seconds the guest has been up.
fn uptime(lab: &Lab, key: &Path, ip: &str) -> f64 {
    let out = ssh(lab, key, ip, "cat /proc/uptime").expect("ssh: cat /proc/uptime");
    out.split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("uptime {out:?}"))
}

/// systemd's verdict once boot has settled (`running`, or `degraded` with its failed units).
fn system_state(lab: &Lab, key: &Path, ip: &str) -> String {
    wait_for(
        &format!("{ip}'s boot to settle"),
        Duration::from_secs(120),
        || {
            let s = ssh(lab, key, ip, "systemctl is-system-running || true")?;
            match s.as_str() {
                "starting" | "initializing" => None,
                "running" => Some(s),
                _ => Some(format!(
                    "{s}; failed units: {}",
                    ssh(lab, key, ip, "systemctl --failed --no-legend --plain").unwrap_or_default()
                )),
            }
        },
    )
}

#[test]
fn debian_boots_by_bios_and_uefi_with_cloud_init_and_keeps_its_ssh_session_across_moves() {
    // Two LUNs big enough for the image (1.1 GiB).
    let lab = Lab::up_with("os", 2, &["--san-luns", "2", "--san-lun-mib", "1280"]);
    let shared = lab.shared();
    import_image(&lab);

    // Bad input, each refused with a clear error, the catalogue unchanged.
    let source = shared
        .join("incoming/debian-12.qcow2")
        .display()
        .to_string();
    refused(
        &lab,
        &["image", "import", &source, "--name", "debian-12"],
        "exists already",
    );
    refused(
        &lab,
        &["image", "import", "/etc/passwd", "--name", "x"],
        "outside",
    );
    refused(
        &lab,
        &["image", "import", &source, "--name", "../x"],
        "not valid",
    );
    let truncated = shared.join("incoming/truncated.qcow2");
    {
        let mut from = std::fs::File::open(&source).expect("image");
        let mut to = std::fs::File::create(&truncated).expect("truncated copy");
        std::io::copy(&mut (&mut from).take(64 << 20), &mut to).expect("copy");
    }
    let t = truncated.display().to_string();
    refused(
        &lab,
        &["image", "import", &t, "--name", "broken"],
        "consistency check",
    );
    let raw = shared.join("incoming/disk.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).expect("raw file");
    let r = raw.display().to_string();
    refused(&lab, &["image", "import", &r, "--name", "raw"], "--convert");
    let images: Vec<Value> = lab.tern_json(&["image", "list"]);
    let names: Vec<&str> = images.iter().filter_map(|i| i["name"].as_str()).collect();
    assert_eq!(names, vec!["debian-12"]);

    let key = lab.dir.join("id_ed25519");
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "tern-test", "-f"])
        .arg(&key));
    let pub_key = lab.dir.join("id_ed25519.pub");
    // User data passed through as it is: it marks the console once cloud-init has run it.
    let user_data = lab.dir.join("user-data");
    std::fs::write(
        &user_data,
        "#cloud-config\nruncmd:\n  - [ sh, -c, 'echo TERN-OS-READY > /dev/ttyS0' ]\n",
    )
    .expect("user data");

    let pub_s = pub_key.display().to_string();
    let started = Instant::now();
    for g in &GUESTS {
        let mut extra = vec!["--firmware", g.firmware, "--gateway", "10.78.0.2"];
        extra.extend(["--ssh-key", &pub_s]);
        extra.extend_from_slice(g.disk);
        create_os_vm(&lab, g.name, g.mac, g.ip, &user_data, &extra);
        lab.tern_ok(&["vm", "start", g.name]);
    }
    // A LUN takes a full copy only, and holds one VM's disk.
    let ud = user_data.display().to_string();
    let base = [
        "vm",
        "create",
        "deb-x",
        "--cluster",
        "lab",
        "--vcpus",
        "1",
        "--memory-mib",
        "512",
        "--image",
        "debian-12",
        "--user-data",
        &ud,
    ];
    refused(
        &lab,
        &[&base[..], &["--image-on", "san:1"]].concat(),
        "add --full-copy",
    );
    refused(
        &lab,
        &[&base[..], &["--full-copy", "--image-on", "san:1"]].concat(),
        "already a disk of VM deb-san-bios",
    );
    refused(
        &lab,
        &[&base[..], &["--full-copy", "--image-on", "san:9"]].concat(),
        "reading the LUN",
    );
    for g in &GUESTS {
        lab.wait_console(g.name, "TERN-OS-READY", Duration::from_secs(300));
        eprintln!(
            "{} ({}): cloud-init done {:.1?} after the starts",
            g.name,
            g.firmware,
            started.elapsed()
        );
    }

    // cloud-init did what the spec says: host name, key (the login itself), address.
    let mut sessions = Vec::new();
    let mut uptimes = Vec::new();
    for g in &GUESTS {
        let hostname = wait_for(
            &format!("an SSH login to {}", g.name),
            Duration::from_secs(120),
            || ssh(&lab, &key, g.ip, "hostname"),
        );
        assert_eq!(hostname, g.name, "cloud-init's host name");
        let addr = ssh(&lab, &key, g.ip, "ip -o -4 addr show scope global").expect("ip addr");
        assert!(addr.contains(&format!("{}/24", g.ip)), "{addr}");
        let fw = ssh(
            &lab,
            &key,
            g.ip,
            "test -d /sys/firmware/efi && echo uefi || echo bios",
        )
        .expect("firmware");
        let root = ssh(&lab, &key, g.ip, "findmnt -no SOURCE /").expect("root device");
        assert_eq!(
            root, g.root,
            "{}: the root disk is on the bus its spec names",
            g.name
        );
        assert_eq!(
            fw, g.firmware,
            "the guest booted by the firmware its spec names"
        );
        let state = system_state(&lab, &key, g.ip);
        assert_eq!(state, "running", "{}: systemd says {state}", g.name);
        uptimes.push(uptime(&lab, &key, g.ip));
        sessions.push(Session::open(&lab, &key, g.ip));
    }
    // Each has a screen: VNC on a unix socket in its run dir, answering with RFB's greeting.
    for g in &GUESTS {
        let vm: Value = lab.tern_json(&["vm", "show", g.name]);
        let id = vm["id"].as_str().expect("id");
        let qemus = common::qemus_of(id);
        assert_eq!(qemus.len(), 1, "{qemus:?}");
        let sock = format!("/proc/{}/cwd/vnc.sock", qemus[0].0);
        let mut conn = std::os::unix::net::UnixStream::connect(&sock)
            .unwrap_or_else(|e| panic!("{}: {sock}: {e}", g.name));
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut hello = [0u8; 12];
        conn.read_exact(&mut hello).expect("the VNC greeting");
        assert_eq!(&hello[..4], b"RFB ", "{}: {hello:?}", g.name);
    }
    let uefi_id = {
        let vm: Value = lab.tern_json(&["vm", "show", "deb-uefi"]);
        vm["id"].as_str().expect("id").to_string()
    };
    let nvram = shared.join(format!(".tern/nvram/{uefi_id}.fd"));
    let template_size = std::fs::metadata("/usr/share/OVMF/OVMF_VARS_4M.fd")
        .expect("OVMF vars")
        .len();
    assert_eq!(
        std::fs::metadata(&nvram)
            .expect("the UEFI VM's variables store")
            .len(),
        template_size
    );

    // Moves: ten for the UEFI VM of each datastore (its variables store moving with it), two
    // for the BIOS one.
    let mut host = ["h1"; GUESTS.len()];
    for round in 0..10 {
        for (i, g) in GUESTS.iter().enumerate() {
            if round >= g.moves {
                continue;
            }
            let to = if host[i] == "h1" { "h2" } else { "h1" };
            let (out, task) = lab.migrate_json(&[g.name, "--to", to]);
            assert!(
                out.status.success(),
                "{} move {round}: {}",
                g.name,
                text(&out)
            );
            let task = task.expect("task JSON");
            assert_eq!(task["result"]["status"], "completed", "{task}");
            host[i] = to;
            let up = uptime(&lab, &key, g.ip);
            assert!(
                up > uptimes[i],
                "{}: uptime {up} after move {round}, {} before: it rebooted",
                g.name,
                uptimes[i]
            );
            uptimes[i] = up;
            let state = system_state(&lab, &key, g.ip);
            assert_eq!(
                state, "running",
                "{} after move {round}: systemd says {state}",
                g.name
            );
            sessions[i].echo(&format!("{} move {round} to {to}", g.name));
            eprintln!(
                "{} move {round} → {to}: pause {} ms, total {} ms",
                g.name, task["result"]["pause_ms"], task["result"]["total_ms"]
            );
        }
    }
    for (i, g) in GUESTS.iter().enumerate() {
        let vm: Value = lab.tern_json(&["vm", "show", g.name]);
        lab.one_copy_on(g.name, vm["id"].as_str().expect("id"), host[i]);
        sessions[i].echo("still here");
    }
    assert_eq!(
        std::fs::metadata(&nvram).expect("variables store").len(),
        template_size
    );
    drop(sessions);

    // An image in use cannot go; once its VMs are deleted (their disks with them), it can.
    refused(
        &lab,
        &["image", "remove", "debian-12"],
        "deb-bios, deb-san-bios, deb-san-uefi, deb-uefi",
    );
    for g in &GUESTS {
        lab.tern_ok(&["vm", "stop", g.name, "--force"]);
        lab.tern_ok(&["vm", "delete", g.name]);
        let disk = lab.shared().join(format!("vms/{}.qcow2", g.name));
        assert!(!disk.exists(), "{} is left behind", disk.display());
    }
    assert!(!nvram.exists(), "{} is left behind", nvram.display());
    lab.tern_ok(&["image", "remove", "debian-12"]);
    assert!(!lab.shared().join("images/debian-12.qcow2").exists());
    lab.down();
}

/// PostgreSQL in the guest (configured by the user data), pgbench's TPC-B-like load from the
/// client namespace across ten migrations: no failed or aborted transaction, no reconnect, and
/// afterwards the bank's books balance and every committed transaction is in the history.
#[test]
fn postgresql_loses_no_transaction_across_ten_migrations() {
    let lab = Lab::up("pg", 2);
    import_image(&lab);
    // The same user data as bench/migrate's pgbench workload.
    let user_data = repo_root().join("guest/cloud-init/postgresql-bench.yaml");
    let ip = "10.78.0.140";
    create_os_vm(&lab, "db", "52:54:00:0d:b0:01", ip, &user_data, &[]);
    lab.tern_ok(&["vm", "start", "db"]);
    lab.wait_console("db", "TERN-DB-READY", Duration::from_secs(300));

    let pg = |args: &[&str]| -> std::process::Output {
        let mut cmd = vec!["env", "PGPASSWORD=bench", "PGCONNECT_TIMEOUT=10"];
        cmd.extend_from_slice(args);
        lab.client(&cmd)
    };
    let conn = ["-h", ip, "-U", "bench", "bench"];
    let init = pg(&[&["pgbench", "-i", "-s", "2", "-q"][..], &conn[..]].concat());
    assert!(init.status.success(), "pgbench -i: {}", text(&init));

    // The load: 2 clients for 75 s, progress every second; the moves happen inside it.
    let load_s = 75;
    let load_secs = load_s.to_string();
    let mut args: Vec<&str> = vec![
        "env",
        "PGPASSWORD=bench",
        "pgbench",
        "-c",
        "2",
        "-j",
        "1",
        "-T",
        &load_secs,
        "-P",
        "1",
    ];
    args.extend_from_slice(&conn);
    let load = lab
        .client_command(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pgbench");
    let load_started = Instant::now();
    // The first move waits until the load commits: its transactions are rows in the history.
    let history = [
        &["psql", "-At", "-c", "select count(*) from pgbench_history"][..],
        &conn[..],
    ]
    .concat();
    wait_for("pgbench's load to commit", Duration::from_secs(60), || {
        let out = pg(&history);
        let rows: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
        (rows >= 20).then_some(())
    });
    let mut host = "h1";
    for i in 0..10 {
        let to = if host == "h1" { "h2" } else { "h1" };
        let (out, task) = lab.migrate_json(&["db", "--to", to]);
        assert!(out.status.success(), "move {i}: {}", text(&out));
        let task = task.expect("task JSON");
        assert_eq!(task["result"]["status"], "completed", "{task}");
        eprintln!(
            "db move {i} → {to}: pause {} ms",
            task["result"]["pause_ms"]
        );
        host = to;
    }
    let moved_in = load_started.elapsed();
    assert!(
        moved_in < Duration::from_secs(load_s - 2),
        "the ten moves took {moved_in:?}, longer than the load ran ({load_s} s): nothing \
         proves they happened under it"
    );
    let out = load.wait_with_output().expect("pgbench");
    let report = text(&out);
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "pgbench failed (a client aborted): {report}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |name: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {name:?} in pgbench's report: {report}"))
    };
    let committed = field("number of transactions actually processed: ");
    assert_eq!(field("number of failed transactions: "), 0, "{report}");
    assert!(committed > 0, "{report}");

    let sql = |q: &str| -> String {
        let out = pg(&[&["psql", "-At", "-c", q][..], &conn[..]].concat());
        assert!(out.status.success(), "psql {q}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let history: u64 = sql("SELECT count(*) FROM pgbench_history")
        .parse()
        .expect("count");
    assert_eq!(
        history, committed,
        "every committed transaction is in pgbench_history"
    );
    let accounts = sql("SELECT sum(abalance) FROM pgbench_accounts");
    let deltas = sql("SELECT sum(delta) FROM pgbench_history");
    let branches = sql("SELECT sum(bbalance) FROM pgbench_branches");
    let tellers = sql("SELECT sum(tbalance) FROM pgbench_tellers");
    assert_eq!(accounts, deltas, "accounts against history");
    assert_eq!(branches, tellers, "branches against tellers");
    assert_eq!(branches, deltas, "branches against history");
    eprintln!(
        "pgbench: {committed} transactions committed across 10 moves, books balance ({deltas})"
    );
    let vm: Value = lab.tern_json(&["vm", "show", "db"]);
    lab.one_copy_on("db", vm["id"].as_str().expect("id"), host);
    lab.down();
}
