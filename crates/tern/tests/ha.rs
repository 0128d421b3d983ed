//! HA centers on a real three-member etcd: one leader takes changes, standbys serve reads and
//! name it; a killed leader is replaced within its lease and nothing it committed is lost; a
//! leader paused past its lease is fenced out and stops when it wakes; a restarted center
//! rejoins as a standby; the group survives losing etcd's own leader. In a lab (`lab up
//! --ha`), live migrations outlive their leader's death.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::browser::{open_ui_at, sign_in, Browser};
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
        self.spawn(etcd);
        let sock = self.socket();
        wait_for(
            &format!("{} to serve", self.name),
            Duration::from_secs(40),
            || sock.exists().then_some(()),
        );
    }

    /// Starts a center that must refuse to run: waits for it to exit, returns its log.
    fn refused(&mut self, etcd: &EtcdCluster) -> String {
        self.spawn(etcd);
        let mut child = self.child.take().expect("started");
        let status = wait_for(
            &format!("{} to give up", self.name),
            Duration::from_secs(40),
            || child.try_wait().ok().flatten(),
        );
        assert!(!status.success(), "{} ran", self.name);
        assert!(!self.socket().exists(), "{} served", self.name);
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    fn spawn(&mut self, etcd: &EtcdCluster) {
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
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    /// What a service manager does for a center that stopped (a deposed leader stops by
    /// design): starts it again, as a standby. Returns whether it had stopped.
    fn restart_if_stopped(&mut self, etcd: &EtcdCluster) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        match child.try_wait() {
            Ok(Some(status)) => {
                eprintln!("{} stopped ({status}): starting it again", self.name);
                self.child = None;
                self.spawn(etcd);
                true
            }
            _ => false,
        }
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
    let status: Value =
        serde_json::from_slice(&c1.tern(&token, &["center", "status", "-o", "json"]).stdout)
            .expect("center status");
    assert_eq!(status["ha"], true, "{status}");
    assert_eq!(status["center"], "c1", "{status}");
    assert_eq!(status["leader"]["name"], "c0", "{status}");
    assert_eq!(status["takes_changes"], false, "{status}");
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

    // etcd loses its own leader: after its re-election, the group takes changes again. An
    // election longer than two thirds of the lease (a loaded machine) deposes the leading
    // center, which stops; the other then leads, unless etcd was still unsettled when it won
    // and it is deposed in turn. A stopped center is started again as its service manager
    // would, so the group always comes back.
    let i = etcd.leader_index().expect("an etcd leader");
    etcd.kill(i);
    etcd.wait_healthy(Duration::from_secs(30));
    let last_refusal = std::cell::RefCell::new(None::<String>);
    wait_for(
        "a change after etcd's re-election",
        Duration::from_secs(60),
        || {
            // (A try whose answer was lost may have taken it already.)
            let took = |c: &Center| match c.create_cluster(&token, "zeta") {
                Ok(()) => Some(()),
                Err(e) if e.contains("already exists") => Some(()),
                Err(e) => {
                    if last_refusal.replace(Some(e.clone())).as_deref() != Some(e.as_str()) {
                        eprintln!("{} refused the change: {e}", c.name);
                    }
                    None
                }
            };
            for c in [&mut *standby, &mut *leader] {
                c.restart_if_stopped(&etcd);
            }
            took(standby).or_else(|| took(leader))
        },
    );
    wait_for("the standby to see zeta", Duration::from_secs(10), || {
        leader
            .clusters(&token)
            .contains(&"zeta".to_string())
            .then_some(())
    });
}

/// The lease of the center that dies after a commit: long enough that no standby leads
/// before the destination has found the commit on its own.
const LONG_LEASE_S: u64 = 20;

/// The lab's centers as `lab up --ha` names them.
const LAB_CENTERS: [&str; 3] = ["center", "center2", "center3"];

/// Which lab center takes changes now (`tern center status`, asked of each live one).
fn lab_leader(lab: &common::Lab) -> Option<&'static str> {
    for name in LAB_CENTERS {
        lab.use_center(name);
        let out = lab.tern(&["center", "status", "-o", "json"]);
        let Ok(cp) = serde_json::from_slice::<Value>(&out.stdout) else {
            continue;
        };
        if cp["takes_changes"] == true && cp["leader"]["name"] == name {
            return Some(name);
        }
    }
    None
}

/// The leader center dies (SIGKILL) while a live migration is in pre-copy, and then (another
/// migration) the moment its commit is durable: each time another center takes over within
/// the lease, finishes the migration by the record, exactly one copy of the VM runs, and the
/// client's TCP stream through it is intact.
#[test]
fn migrations_outlive_the_leader_center_killed_in_pre_copy_and_after_the_commit() {
    let mut lab = common::Lab::up_with("ha", 2, &["--ha"]);
    lab.use_center("center");
    let id = lab.create_vm(
        "web",
        "h1",
        "10.78.0.100",
        "52:54:00:7e:0a:01",
        256,
        "",
        &[],
    );
    let streamer = lab.spawn_stream_client("10.78.0.100:7000", 20_000);
    let task = lab.start_slow_migration("web", "h2", &id);

    let leader = lab.pid("center");
    kill(Pid::from_raw(leader as i32), Signal::SIGKILL).expect("kill the leader center");
    common::wait_gone(leader, "the killed leader", Duration::from_secs(10));
    let killed = Instant::now();
    let next = wait_for("a new leader", Duration::from_secs(30), || lab_leader(&lab));
    eprintln!(
        "MEASURED leader killed in pre-copy: {next} leads after {:?}",
        killed.elapsed()
    );
    lab.use_center(next);
    // Fencing at the agents: the new leader told every host its term; a call under any lower
    // term (the dead leader's) is refused, one under the new term goes through.
    let cp: Value = lab.tern_json(&["center", "status"]);
    let term = cp["term"].as_u64().expect("the new leader's term");
    assert_eq!(
        agent_answer_under_term(&lab, term - 1),
        409,
        "a stale term was let through"
    );
    assert_eq!(agent_answer_under_term(&lab, term), 200);

    let t = lab.wait_task_end(&task, Duration::from_secs(240));
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(t["result"]["status"], "completed", "{t}");
    lab.one_copy_on("web", &id, "h2");
    let report = streamer.finish();
    eprintln!(
        "MEASURED client across the takeover: longest gap {} ms, {} records",
        report["longest_gap_ms"], report["records"]
    );
    common::assert_stream_intact(&report);
    let events: Vec<Value> = lab.tern_json(&["event", "list", "--vm", "web"]);
    assert!(
        events.iter().any(|e| e["message"]
            .as_str()
            .unwrap_or("")
            .contains("driven on from there")),
        "the new leader does not say it drove the migration on: {events:#?}"
    );
    // Every host heartbeats to the new leader.
    lab.wait_hosts_connected("both hosts connected to the new leader");

    // The leader dies the moment a migration's commit is durable, before either host hears
    // of it (the guest is paused on both). The first center comes back with that fault set,
    // and a lease long enough that no other center can lead for seconds after it dies, and is
    // made the leader: the other standby stops, the leader is killed.
    let lab_dir = lab.dir.clone();
    let lab_start = |name: &str, fault: Option<&str>| {
        let mut cmd = std::process::Command::new(tern_exe());
        cmd.args(["lab", "--dir"])
            .arg(&lab_dir)
            .args(["start", name])
            .env_remove("TERN_INJECT_FAULT")
            .env_remove("TERN_LAB_LEASE_TTL_S")
            .stdin(Stdio::null());
        if let Some(f) = fault {
            cmd.env("TERN_INJECT_FAULT", f);
            cmd.env("TERN_LAB_LEASE_TTL_S", LONG_LEASE_S.to_string());
        }
        let out = cmd.output().expect("tern lab start");
        assert!(out.status.success(), "lab start {name}: {}", text(&out));
    };
    let other = if next == "center2" {
        "center3"
    } else {
        "center2"
    };
    let out = lab.lab_cmd(&["lab", "stop", other]);
    assert!(out.status.success(), "{}", text(&out));
    lab_start("center", Some("crash-after-commit"));
    let leading = lab.pid(next);
    kill(Pid::from_raw(leading as i32), Signal::SIGKILL).expect("kill the leader");
    common::wait_gone(leading, next, Duration::from_secs(10));
    wait_for(
        "the first center to lead again",
        Duration::from_secs(30),
        || (lab_leader(&lab) == Some("center")).then_some(()),
    );
    lab_start("center2", None);
    lab_start("center3", None);

    let streamer = lab.spawn_stream_client("10.78.0.100:7000", 15_000);
    let first = lab.pid("center");
    lab.use_center("center");
    let task = lab
        .tern_ok(&["vm", "migrate", "web", "--to", "h1", "--detach"])
        .trim()
        .to_string();
    common::wait_gone(first, "the center that committed", Duration::from_secs(120));
    let died = Instant::now();
    // The destination does not wait for the next leader: it asks the standbys, whose copies
    // of the store hold the commit, and runs the guest itself. The dead leader's lease keeps
    // every other center from leading for at least two thirds of LONG_LEASE_S, so a guest
    // running before any center leads again was run on the store's word.
    wait_for(
        "h1's agent to run web after the leader died",
        Duration::from_secs(LONG_LEASE_S / 2),
        || {
            let (status, body) = agent_get(&lab, "h1", &format!("/v1/vms/{id}"), None);
            let vm: Value = serde_json::from_str(&body).unwrap_or_default();
            (status == 200 && vm["state"] == "running").then_some(())
        },
    );
    eprintln!(
        "MEASURED leader killed right after a commit: the destination ran the guest {:?} after",
        died.elapsed()
    );
    assert_eq!(
        lab_leader(&lab),
        None,
        "a center leads already: the guest may have waited for it"
    );
    let next = wait_for(
        "a new leader once the dead one's lease is over",
        Duration::from_secs(LONG_LEASE_S + 25),
        || lab_leader(&lab),
    );
    eprintln!(
        "MEASURED leader killed right after a commit: {next} leads after {:?}",
        died.elapsed()
    );
    lab.use_center(next);
    let t = lab.wait_task_end(&task, Duration::from_secs(120));
    assert_eq!(
        t["state"], "succeeded",
        "committed, so it goes forward: {t}"
    );
    lab.one_copy_on("web", &id, "h1");
    let report = streamer.finish();
    eprintln!(
        "MEASURED client across a takeover after the commit: longest gap {} ms, {} records",
        report["longest_gap_ms"], report["records"]
    );
    common::assert_stream_intact(&report);

    // The web client of a standby says what it is and where changes go; the leader's says it
    // leads.
    let standby = if next == "center2" {
        "center3"
    } else {
        "center2"
    };
    let b = Browser::start();
    let ui_of = |name: &str| open_ui_at(&lab.dir.join(name).join("center.sock"));
    let (mut ui, base) = ui_of(standby);
    sign_in(&b, &base, &lab.token(), "admin");
    let banner = b.wait_text("#standby-banner", Duration::from_secs(20), |t| {
        t.contains("standby")
    });
    assert!(banner.contains("takes no changes"), "{banner}");
    assert_eq!(b.text("#standby-leader-link").as_deref(), Some(next));
    let indicator = b.wait_text("#control-plane", Duration::from_secs(10), |t| {
        t.starts_with("standby")
    });
    assert!(
        indicator.contains(standby) && indicator.contains(next),
        "{indicator}"
    );
    let violations = b.accessibility_violations();
    assert!(violations.is_empty(), "{violations:#?}");
    let _ = ui.kill();
    let _ = ui.wait();
    let (mut ui, base) = ui_of(next);
    sign_in(&b, &base, &lab.token(), "admin");
    b.wait_text("#control-plane", Duration::from_secs(20), |t| {
        t.starts_with(&format!("leader {next} · term"))
    });
    assert!(
        b.attribute("#standby-banner", "hidden").is_some(),
        "the leader shows the standby banner"
    );
    let _ = ui.kill();
    let _ = ui.wait();
}

/// etcd with TLS and client certificates (as production runs it): a center given the CA and
/// its client certificate keeps its state there; one without a client certificate never
/// serves, and says why.
#[test]
fn a_center_reaches_etcd_over_mutual_tls_and_one_without_a_certificate_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let ca = tern_pki::Ca::new("etcd-test").expect("CA");
    let life = Duration::from_secs(3600);
    let server = ca
        .issue_identity(&["127.0.0.1".into()], life)
        .expect("server certificate");
    let client = ca
        .issue_identity(&["center-a".into()], life)
        .expect("client certificate");
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write PEM");
        p
    };
    let ca_file = write("ca.pem", ca.cert_pem());
    let server_crt = write("server.pem", &server.chain_pem);
    let server_key = write("server.key", &server.key_pem);
    let client_crt = write("client.pem", &client.chain_pem);
    let client_key = write("client.key", &client.key_pem);
    let url = format!("https://127.0.0.1:{}", free_port());
    let peer = format!("http://127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.join("etcd.log")).expect("log");
    let etcd = Command::new("etcd")
        .args(["--name", "tls", "--data-dir"])
        .arg(dir.join("etcd"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &format!("tls={peer}")])
        .arg("--cert-file")
        .arg(&server_crt)
        .arg("--key-file")
        .arg(&server_key)
        .arg("--trusted-ca-file")
        .arg(&ca_file)
        .args([
            "--client-cert-auth",
            "--logger",
            "zap",
            "--log-level",
            "warn",
        ])
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start etcd");
    let _etcd = Reap(etcd);
    let start = |name: &str, with_cert: bool| {
        let data = dir.join(name);
        std::fs::create_dir_all(&data).expect("data dir");
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log");
        let mut cmd = Command::new(tern_exe());
        cmd.arg("center")
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--etcd", &url, "--ha-name", name])
            .arg("--etcd-ca-file")
            .arg(&ca_file);
        if with_cert {
            cmd.arg("--etcd-cert-file")
                .arg(&client_crt)
                .arg("--etcd-key-file")
                .arg(&client_key);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start a center");
        (Reap(child), data.join("center.sock"))
    };
    let (_a, sock) = start("center-a", true);
    wait_for("center-a to serve", Duration::from_secs(40), || {
        sock.exists().then_some(())
    });
    let token = std::fs::read_to_string(dir.join("center-a/admin.token"))
        .expect("token")
        .trim()
        .to_string();
    let tern = |args: &[&str]| {
        Command::new(tern_exe())
            .args(args)
            .arg("--center")
            .arg(format!("unix:{}", sock.display()))
            .args(["--token", &token])
            .env("TERN_LAB_DIR", dir.join("no-lab"))
            .output()
            .expect("tern")
    };
    // It serves (as a standby) before it has taken over as the leader.
    wait_for("center-a to take changes", Duration::from_secs(40), || {
        let out = tern(&["center", "status", "-o", "json"]);
        let cp: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (cp["takes_changes"] == true).then_some(())
    });
    let out = tern(&["cluster", "create", "tls1"]);
    assert!(
        out.status.success(),
        "{}\ncenter-a's log:\n{}",
        text(&out),
        std::fs::read_to_string(dir.join("center-a.log")).unwrap_or_default()
    );
    let keys = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &url, "--cacert"])
        .arg(&ca_file)
        .arg("--cert")
        .arg(&client_crt)
        .arg("--key")
        .arg(&client_key)
        .args(["get", "--prefix", "/tern/rows/clusters/", "--keys-only"])
        .output()
        .expect("etcdctl");
    assert!(keys.status.success(), "{}", text(&keys));
    assert!(
        !String::from_utf8_lossy(&keys.stdout).trim().is_empty(),
        "the cluster's row is not in etcd"
    );

    // Without a client certificate: etcd refuses the handshake, the center never serves.
    let (mut b, sock_b) = start("center-b", false);
    let log_b = dir.join("center-b.log");
    wait_for("center-b to say why", Duration::from_secs(30), || {
        std::fs::read_to_string(&log_b)
            .ok()
            .filter(|l| l.contains("from etcd"))
            .map(|_| ())
    });
    assert!(!sock_b.exists(), "a center etcd refused serves anyway");
    let _ = b.0.kill();
}

/// Kills and reaps a child on drop.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Calls h1's agent the way a center does, under leader term `term`; returns the HTTP status.
fn agent_answer_under_term(lab: &common::Lab, term: u64) -> u16 {
    agent_get(lab, "h1", "/v1/vms", Some(term)).0
}

/// GETs `path` from `host`'s agent the way a center does (a certificate from the lab's CA
/// naming the center, the agent's token), under leader term `term` if given, from the center
/// namespace; returns the HTTP status and the body.
fn agent_get(lab: &common::Lab, host: &str, path: &str, term: Option<u64>) -> (u16, String) {
    let ip = match host {
        "h1" => "10.77.0.11",
        "h2" => "10.77.0.12",
        other => panic!("no address known for lab host {other}"),
    };
    let pki = lab.dir.join("center/pki");
    let ca = tern_pki::Ca::load_or_create(&pki, "lab").expect("the lab's CA");
    let id = ca
        .issue_center(&[], Duration::from_secs(600))
        .expect("a center certificate");
    let (crt, key) = (
        lab.dir.join("fence-test.crt"),
        lab.dir.join("fence-test.key"),
    );
    std::fs::write(&crt, &id.chain_pem).expect("write the certificate");
    std::fs::write(&key, &id.key_pem).expect("write the key");
    let token = std::fs::read_to_string(lab.dir.join(format!("hosts/{host}/agent.token")))
        .expect("the agent's token")
        .trim()
        .to_string();
    let name = tern_pki::host_cert_name(host);
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &format!("{}-center", lab.prefix),
        "curl",
        "-s",
    ])
    .args(["-w", "\n%{http_code}", "--cacert"])
    .arg(pki.join("ca.crt"))
    .arg("--cert")
    .arg(&crt)
    .arg("--key")
    .arg(&key)
    .args(["--resolve", &format!("{name}:8701:{ip}")])
    .args(["-H", &format!("authorization: Bearer {token}")]);
    if let Some(term) = term {
        cmd.args(["-H", &format!("{}: {term}", tern_api::LEADER_TERM_HEADER)]);
    }
    let out = cmd
        .arg(format!("https://{name}:8701{path}"))
        .output()
        .expect("curl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let status = status
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no HTTP status from curl: {}", text(&out)));
    (status, body.to_string())
}

/// Compaction leaves etcd's database file as large as ever (it counts against the quota): the
/// leader defragments members whose files are mostly free space, one at a time, and leaves
/// the others alone.
#[test]
fn members_whose_files_are_mostly_free_are_defragmented() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let etcd = EtcdCluster::start(tmp.path(), 2);
    let ctl = |args: &[&str], stdin: Option<&[u8]>| -> Output {
        let mut c = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &etcd.endpoints().join(",")])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("etcdctl");
        if let Some(data) = stdin {
            use std::io::Write;
            c.stdin
                .take()
                .expect("stdin")
                .write_all(data)
                .expect("write to etcdctl");
        }
        let out = c.wait_with_output().expect("etcdctl");
        assert!(out.status.success(), "etcdctl {args:?}: {}", text(&out));
        out
    };
    // Each member's file size, or the bytes of it in use.
    let db_sizes = |field: &str| -> Vec<u64> {
        let out = ctl(&["endpoint", "status", "-w", "json"], None);
        let status: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        status
            .as_array()
            .expect("members")
            .iter()
            .map(|m| m["Status"][field].as_u64().unwrap_or(0))
            .collect()
    };
    // 48 MiB written and deleted, then compacted: the files keep their size.
    let value = vec![b'x'; 1 << 20];
    for i in 0..48 {
        ctl(&["put", &format!("/fill/{i}")], Some(&value));
    }
    ctl(&["del", "--prefix", "/fill/"], None);
    let out = ctl(&["put", "/fill-done", "1", "-w", "json"], None);
    let rev: Value = serde_json::from_slice(&out.stdout).expect("put JSON");
    let rev = rev["header"]["revision"].as_u64().expect("revision");
    ctl(&["compact", &rev.to_string(), "--physical"], None);
    // etcd frees the compacted pages in batches after it answered.
    wait_for(
        "the compacted space to be free",
        Duration::from_secs(60),
        || {
            ctl(&["put", "/tick", "1"], None);
            db_sizes("dbSizeInUse")
                .iter()
                .all(|s| *s < 8 << 20)
                .then_some(())
        },
    );
    let before = db_sizes("dbSize");
    assert!(
        before.iter().all(|s| *s > 40 << 20),
        "the files did not grow: {before:?}"
    );

    let settings = tern_center::config::HaSettings {
        endpoints: etcd.endpoints(),
        prefix: "/tern".into(),
        name: "defrag-test".into(),
        advertise_url: "https://127.0.0.1:1".into(),
        lease_ttl: Duration::from_secs(15),
        tls: None,
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let done = rt.block_on(async {
        let client = tern_center::ha::Etcd::connect(&settings)
            .await
            .expect("connect");
        // A bar higher than what is free: nothing is touched.
        assert_eq!(
            tern_center::ha::defragment_members(&client, 1 << 30).await,
            vec![]
        );
        tern_center::ha::defragment_members(&client, 16 << 20).await
    });
    assert_eq!(done.len(), 2, "{done:?}");
    let after = db_sizes("dbSize");
    eprintln!("MEASURED etcd member files before {before:?}, after defragmentation {after:?}");
    assert!(
        after.iter().all(|s| *s < 8 << 20),
        "still large after defragmentation: {after:?}"
    );
    // Nothing left to gain: a second round leaves them.
    let again = rt.block_on(async {
        let client = tern_center::ha::Etcd::connect(&settings)
            .await
            .expect("connect");
        tern_center::ha::defragment_members(&client, 16 << 20).await
    });
    assert!(again.is_empty(), "{again:?}");
}

/// Every center of a group reads and writes one store layout: the first records it in etcd,
/// a center of another layout (an older or newer tern with other store migrations) is refused
/// at start with the reason, and one of the same layout joins.
#[test]
fn a_center_of_another_store_layout_is_refused_with_the_reason() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let etcd = EtcdCluster::start(tmp.path(), 1);
    let ctl = |args: &[&str]| -> String {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &etcd.endpoints().join(",")])
            .args(args)
            .output()
            .expect("etcdctl");
        assert!(out.status.success(), "etcdctl {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let mut first = Center::new(tmp.path(), "first");
    first.start(&etcd);
    let layout: u32 = ctl(&["get", "/tern/layout", "--print-value-only"])
        .parse()
        .expect("the first center recorded its layout");
    first.kill9();
    for (i, (recorded, says)) in [
        ((layout + 1).to_string(), "newer than this center's"),
        ((layout - 1).to_string(), "older than this center's"),
        ("two".to_string(), "not a store layout number"),
    ]
    .into_iter()
    .enumerate()
    {
        ctl(&["put", "/tern/layout", &recorded]);
        let mut other = Center::new(tmp.path(), &format!("other{i}"));
        let log = other.refused(&etcd);
        assert!(log.contains(says), "layout {recorded}: {log}");
    }
    ctl(&["put", "/tern/layout", &layout.to_string()]);
    let mut same = Center::new(tmp.path(), "same");
    same.start(&etcd);
    same.kill9();
}
