//! HA centers on a real three-member etcd: one leader takes changes, standbys serve reads and
//! name it; a killed leader is replaced within its lease and nothing it committed is lost; a
//! leader paused past its lease is fenced out and stops when it wakes; a restarted center
//! rejoins as a standby; the group survives losing etcd's own leader.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::etcd::{free_port, EtcdCluster};
use common::{tern_exe, text};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tern_testkit::wait::wait_for;

/// The lease the test's centers hold (short, so takeovers take seconds).
const LEASE_S: u64 = 4;

struct Center {
    name: String,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Center {
    fn new(root: &Path, name: &str) -> Center {
        Center {
            name: name.into(),
            dir: root.join(name),
            port: free_port(),
            child: None,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("center.sock")
    }

    fn log(&self) -> PathBuf {
        self.dir.with_extension("log")
    }

    fn start(&mut self, etcd: &EtcdCluster) {
        std::fs::create_dir_all(&self.dir).expect("data dir");
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("log");
        let mut cmd = Command::new(tern_exe());
        cmd.arg("center")
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--ha-name", &self.name])
            .args([
                "--advertise-url",
                &format!("https://127.0.0.1:{}", self.port),
            ])
            .args(["--lease-ttl-s", &LEASE_S.to_string()]);
        for e in etcd.endpoints() {
            cmd.args(["--etcd", &e]);
        }
        let child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start tern center");
        self.child = Some(child);
        let sock = self.socket();
        wait_for(
            &format!("{} to serve", self.name),
            Duration::from_secs(40),
            || sock.exists().then_some(()),
        );
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn tern(&self, token: &str, args: &[&str]) -> Output {
        Command::new(tern_exe())
            .args(args)
            .arg("--center")
            .arg(format!("unix:{}", self.socket().display()))
            .args(["--token", token])
            .env_remove("TERN_CENTER")
            .env_remove("TERN_TOKEN")
            .env("TERN_LAB_DIR", self.dir.join("no-lab"))
            .stdin(Stdio::null())
            .output()
            .expect("run tern")
    }

    fn clusters(&self, token: &str) -> Vec<String> {
        let out = self.tern(token, &["cluster", "list", "-o", "json"]);
        if !out.status.success() {
            return Vec::new();
        }
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn create_cluster(&self, token: &str, name: &str) -> Result<(), String> {
        let out = self.tern(token, &["cluster", "create", name]);
        if out.status.success() {
            Ok(())
        } else {
            Err(text(&out))
        }
    }
}

impl Drop for Center {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGCONT);
        }
        self.kill9();
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        let dest = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).expect("copy");
        }
    }
}

/// Which of `centers` takes a change now (by creating cluster `name` on each in turn).
fn create_anywhere(centers: &[&Center], token: &str, name: &str) -> Option<usize> {
    centers
        .iter()
        .position(|c| c.child.is_some() && c.create_cluster(token, name).is_ok())
}

fn dump_logs(centers: &[&Center]) {
    for c in centers {
        let log = std::fs::read_to_string(c.log()).unwrap_or_default();
        eprintln!("---- {} ----\n{}", c.name, common::tail(&log, 40));
    }
}

#[test]
fn a_group_of_three_centers_survives_losing_its_leader_and_fences_a_paused_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut etcd = EtcdCluster::start(tmp.path(), 3);
    let mut c0 = Center::new(tmp.path(), "c0");
    let mut c1 = Center::new(tmp.path(), "c1");
    let mut c2 = Center::new(tmp.path(), "c2");

    // The first center makes the cluster's CA and tokens; the others get copies (as an
    // operator copies /var/lib/tern/center/pki and the token files to each center machine).
    c0.start(&etcd);
    let token = std::fs::read_to_string(c0.dir.join("admin.token"))
        .expect("admin token")
        .trim()
        .to_string();
    wait_for("c0 to lead", Duration::from_secs(30), || {
        c0.create_cluster(&token, "alpha").ok()
    });
    for c in [&c1, &c2] {
        copy_dir(&c0.dir.join("pki"), &c.dir.join("pki"));
        for f in ["admin.token", "enrol.token"] {
            std::fs::copy(c0.dir.join(f), c.dir.join(f)).expect("copy token");
        }
    }
    c1.start(&etcd);
    c2.start(&etcd);

    // Standbys serve what the leader wrote, and refuse changes naming the leader.
    for c in [&c1, &c2] {
        assert!(c.clusters(&token).contains(&"alpha".to_string()));
        let refused = c
            .create_cluster(&token, "nope")
            .expect_err("a standby refuses");
        assert!(
            refused.contains("standby") && refused.contains("c0"),
            "{}: {refused}",
            c.name
        );
    }

    // The leader dies (SIGKILL): another takes over within the lease (plus an election).
    c0.kill9();
    let killed = Instant::now();
    let next = wait_for("a new leader", Duration::from_secs(30), || {
        create_anywhere(&[&c1, &c2], &token, "beta")
    });
    let takeover = killed.elapsed();
    eprintln!("takeover after SIGKILL: {takeover:?} (lease {LEASE_S} s)");
    if takeover > Duration::from_secs(LEASE_S * 3) {
        dump_logs(&[&c0, &c1, &c2]);
        panic!("takeover took {takeover:?}");
    }
    let (leader, standby) = if next == 0 {
        (&mut c1, &mut c2)
    } else {
        (&mut c2, &mut c1)
    };
    wait_for("the standby to see beta", Duration::from_secs(10), || {
        let names = standby.clusters(&token);
        (names.contains(&"alpha".to_string()) && names.contains(&"beta".to_string())).then_some(())
    });

    // Fencing: the leader is paused past its lease; the standby takes over; when the old
    // leader wakes it changes nothing and stops.
    kill(leader.pid(), Signal::SIGSTOP).expect("SIGSTOP");
    let paused = Instant::now();
    wait_for("the standby to take over", Duration::from_secs(30), || {
        standby.create_cluster(&token, "gamma").ok()
    });
    eprintln!("takeover after SIGSTOP: {:?}", paused.elapsed());
    kill(leader.pid(), Signal::SIGCONT).expect("SIGCONT");
    let woke = leader.create_cluster(&token, "delta");
    assert!(woke.is_err(), "a deposed leader took a change");
    let mut old = leader.child.take().expect("child");
    let status = wait_for(
        "the deposed leader to stop",
        Duration::from_secs(20),
        || old.try_wait().expect("wait"),
    );
    assert!(!status.success(), "it stops with an error: {status}");
    let log = std::fs::read_to_string(leader.log()).unwrap_or_default();
    assert!(
        log.contains("lost the leadership"),
        "{}",
        common::tail(&log, 30)
    );
    let names = standby.clusters(&token);
    assert!(!names.contains(&"delta".to_string()), "{names:?}");

    // Restarted (as its service manager would), it rejoins as a standby with every change.
    leader.start(&etcd);
    wait_for(
        "the restarted center to load the state",
        Duration::from_secs(10),
        || {
            let names = leader.clusters(&token);
            ["alpha", "beta", "gamma"]
                .iter()
                .all(|n| names.contains(&n.to_string()))
                .then_some(())
        },
    );
    let refused = leader
        .create_cluster(&token, "epsilon")
        .expect_err("standby");
    assert!(refused.contains(&standby.name), "{refused}");

    // etcd loses its own leader: after its re-election, the group takes changes again.
    let i = etcd.leader_index().expect("an etcd leader");
    etcd.kill(i);
    etcd.wait_healthy(Duration::from_secs(30));
    wait_for(
        "a change after etcd's re-election",
        Duration::from_secs(30),
        || standby.create_cluster(&token, "zeta").ok(),
    );
    wait_for("the standby to see zeta", Duration::from_secs(10), || {
        leader
            .clusters(&token)
            .contains(&"zeta".to_string())
            .then_some(())
    });
}
