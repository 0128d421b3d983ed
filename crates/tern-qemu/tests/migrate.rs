//! The migration driver end to end: two local QEMUs, the project's guest (or the tick guest),
//! settings chosen by the policy from real measurements, the source stopping at
//! pre-switchover, the hand-over, and the failure paths that must leave the source running.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tern_api::migration::{
    AgentMigrationState, Measurements, MigrateVm, MigrationSettings, MigrationUri,
};
use tern_api::NicSpec;
use tern_motion::{choose_settings, HostBudget};
use tern_qemu::{
    IncomingMigration, LaunchConfig, Outgoing, OutgoingOptions, OutgoingStatus, QemuVm, RunState,
    SwitchoverLeave, COMMIT_ANNOUNCE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, MutexGuard};

const BOOT: Duration = Duration::from_secs(90);
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const GUEST_IP: &str = "10.78.0.100";
const GUEST_MAC: &str = "52:54:00:77:00:01";

/// Two cores: one migration test at a time (an async lock: tests hold it across awaits, and
/// a failed test releases it without poisoning).
async fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::const_new(());
    LOCK.lock().await
}

/// Usable TCP bandwidth over loopback, measured like the agents' probe does.
async fn loopback_mbit() -> f64 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let receiver = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = s.read(&mut buf).await.unwrap();
            if k == 0 {
                return n;
            }
            n += k as u64;
        }
    });
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..128 {
        s.write_all(&chunk).await.unwrap();
    }
    s.shutdown().await.unwrap();
    let n = receiver.await.unwrap();
    n as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e6
}

/// Settings for migrating `src` as the center would choose them: measured dirty rate and
/// link, the machine's cores, the QEMU version.
async fn plan(src: &QemuVm, memory_mib: u64, req: MigrateVm) -> MigrationSettings {
    let rate = src
        .measure_dirty_rate(std::time::Duration::from_secs(1))
        .await
        .unwrap();
    let m = Measurements {
        memory_mib,
        dirty_rate_mib_s: Some(rate.dirty_rate_mib_per_s.unwrap_or(0) as f64),
        link_mbit: loopback_mbit().await,
        link_age_s: None,
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let hosts = HostBudget {
        spare_cores: cores,
        qemu: src.qmp().greeting().version,
        encrypted: false,
        relayed: false,
    };
    let s = choose_settings(&req, &m, &hosts);
    eprintln!("measured {m:?}");
    for r in &s.reasons {
        eprintln!("  setting: {r}");
    }
    s
}

fn request() -> MigrateVm {
    MigrateVm {
        to: "dst".into(),
        downtime_ms: None,
        deadline_ms: None,
        bandwidth_mbit: None,
        allow_postcopy: false,
        dry_run: false,
        probe_link: false,
    }
}

/// [`request`] with the stream capped at `mbit`.
fn capped(mbit: u64) -> MigrateVm {
    MigrateVm {
        bandwidth_mbit: Some(mbit),
        ..request()
    }
}

/// Boots the tick guest as a migration source in `dir` and waits for its first tick; the
/// guard kills it when the test ends.
/// A paused destination `name` of `src`, listening for `settings` on loopback; its guard
/// kills its QEMU when the test ends (dropped after the migration, declared before it).
async fn listening(
    src: &LaunchConfig,
    dir: &Path,
    name: &str,
    settings: &MigrationSettings,
) -> (LaunchConfig, KillGuard, IncomingMigration) {
    let cfg = destination(src, dir, name, true);
    let guard = KillGuard(cfg.run_dir.clone());
    let incoming = IncomingMigration::prepare(cfg.clone(), settings, None, LOOPBACK)
        .await
        .unwrap();
    (cfg, guard, incoming)
}

async fn tick_source(dir: &Path) -> (LaunchConfig, KillGuard, Arc<QemuVm>) {
    let cfg = config(dir, "src", "");
    let guard = KillGuard(cfg.run_dir.clone());
    let vm = Arc::new(QemuVm::launch(cfg.clone()).await.unwrap());
    wait_tick(&cfg.run_dir, 1, BOOT).await;
    (cfg, guard, vm)
}

fn print_events(s: &OutgoingStatus) {
    for e in &s.events {
        eprintln!("  event: {e}");
    }
}

/// Starts sending `src` to `incoming` with `settings` and the default options.
async fn send(
    src: &Arc<QemuVm>,
    incoming: &IncomingMigration,
    settings: &MigrationSettings,
) -> Outgoing {
    Outgoing::start(
        src.clone(),
        &incoming.uri().expect("the destination listens"),
        settings,
        None,
        OutgoingOptions::default(),
    )
    .await
    .unwrap()
}

/// The hand-over once pre-copy runs: waits (up to `wait`) for the source to pause at
/// pre-switchover, sends the final state, commits the destination, quits the source, and waits
/// for the guest's next tick on the destination.
async fn hand_over(
    out: &Outgoing,
    incoming: &IncomingMigration,
    src_dir: &Path,
    dst_dir: &Path,
    wait: Duration,
) {
    out.wait_pre_switchover(wait).await.unwrap();
    out.switchover().await.unwrap();
    incoming
        .wait_received(Duration::from_secs(30))
        .await
        .unwrap();
    let tick = last_tick(&console(src_dir)).unwrap();
    incoming.commit(&COMMIT_ANNOUNCE).await.unwrap();
    out.finish().await.unwrap();
    wait_tick(dst_dir, tick + 1, Duration::from_secs(30)).await;
}

/// Waits until pre-copy has sent its first MiB.
async fn precopy_going(out: &Outgoing) {
    let mut rx = out.watch();
    tokio::time::timeout(
        Duration::from_secs(30),
        rx.wait_for(|s| s.progress.transferred_bytes > 1 << 20),
    )
    .await
    .expect("pre-copy never got going")
    .unwrap();
}

/// Waits for the outgoing migration to reach a state matching `want`.
async fn wait_state(
    out: &Outgoing,
    want: impl Fn(AgentMigrationState) -> bool,
    timeout: Duration,
) -> OutgoingStatus {
    let mut rx = out.watch();
    let r = tokio::time::timeout(timeout, rx.wait_for(|s| want(s.state))).await;
    match r {
        Ok(Ok(s)) => s.clone(),
        _ => {
            let s = out.status();
            print_events(&s);
            panic!(
                "timed out waiting; migration is {:?}: {:?}",
                s.state, s.error
            );
        }
    }
}

/// The project's guest on a bridge in its own namespace: the test process reaches it through
/// the bridge's address with `tern-guest client`.
struct Lan {
    ns: NetNs,
    guest_bin: std::path::PathBuf,
}

impl Lan {
    fn new(tag: &str) -> Lan {
        let ns = NetNs::new(&format!("tq-{}", tag));
        ns.ip(&["link", "set", "lo", "up"]).expect("ip");
        ns.ip(&["link", "add", "br0", "type", "bridge"])
            .expect("ip");
        ns.ip(&["addr", "add", "10.78.0.1/24", "dev", "br0"])
            .expect("ip");
        ns.ip(&["link", "set", "br0", "up"]).expect("ip");
        for tap in ["tqsrc0", "tqdst0"] {
            ns.ip(&["tuntap", "add", "dev", tap, "mode", "tap"])
                .expect("ip");
            ns.ip(&["link", "set", tap, "master", "br0"]).expect("ip");
            ns.ip(&["link", "set", tap, "up"]).expect("ip");
        }
        let guest_bin = guest_image()
            .map(|(k, _)| k.with_file_name("tern-guest"))
            .expect("guest image");
        Lan { ns, guest_bin }
    }

    /// The bridge port the switch learnt the guest's MAC on.
    fn port_of_guest(&self) -> Option<String> {
        let out = run(&["bridge", "-n", &self.ns.name, "fdb", "show", "br", "br0"]);
        out.lines()
            .filter(|l| l.starts_with(GUEST_MAC))
            .find_map(|l| {
                let mut words = l.split_whitespace();
                words.find(|w| *w == "dev")?;
                words.next().map(str::to_string)
            })
    }

    fn client(&self, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &self.ns.name])
            .arg(&self.guest_bin)
            .arg("client")
            .args(["--addr", &format!("{GUEST_IP}:7000")])
            .args(args)
            .kill_on_drop(true);
        c
    }

    async fn stats(&self) -> Option<Value> {
        let out = self.client(&["--stats"]).output().await.ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }
}

/// A launch config for the project's guest with one NIC on `tap` (in `lan`'s namespace).
fn real_guest(
    dir: &Path,
    name: &str,
    lan: Option<&Lan>,
    memory_mib: u64,
    args: &str,
) -> LaunchConfig {
    let (kernel, initrd) = guest_image().expect("guest image");
    let mut cfg = config(dir, name, "");
    cfg.spec.memory_mib = memory_mib;
    let net = if lan.is_some() {
        format!("tern.ip={GUEST_IP}/24 tern.serve=7000 ")
    } else {
        String::new()
    };
    cfg.spec.boot = tern_api::BootSource::Kernel {
        kernel: kernel.to_string_lossy().into_owned(),
        initrd: Some(initrd.to_string_lossy().into_owned()),
        cmdline: format!("console=ttyS0 quiet panic=-1 ipv6.disable=1 {net}{args}"),
    };
    if let Some(lan) = lan {
        cfg.spec.nics = vec![NicSpec {
            mac: GUEST_MAC.into(),
        }];
        cfg.taps = vec!["tqsrc0".into()];
        cfg.qemu_binary = lan.ns.qemu_wrapper(dir);
    }
    cfg
}

fn destination_of(src: &LaunchConfig, dir: &Path, lan: bool) -> LaunchConfig {
    let mut cfg = destination(src, dir, "dst", true);
    if lan {
        cfg.taps = vec!["tqdst0".into()];
    }
    cfg
}

async fn wait_ready(run_dir: &Path) {
    wait_for("TERN-GUEST-READY", BOOT, || {
        console(run_dir).contains("TERN-GUEST-READY").then_some(())
    })
    .await;
}

fn skip_without_guest() -> bool {
    if guest_image().is_none() {
        eprintln!("NOTICE: target/guest/initramfs.img missing (run guest/build.sh): skipped");
        return true;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirtying_guest_moves_with_its_connections_and_memory_intact() {
    let _serial = serial().await;
    init_tracing();
    if skip_without_guest() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lan = Lan::new("hp");
    let src_cfg = real_guest(
        dir.path(),
        "src",
        Some(&lan),
        256,
        "tern.mem=64 tern.dirty=16",
    );
    let dst_cfg = destination_of(&src_cfg, dir.path(), true);
    let _g1 = KillGuard(src_cfg.run_dir.clone());
    let _g2 = KillGuard(dst_cfg.run_dir.clone());
    let src = Arc::new(QemuVm::launch(src_cfg.clone()).await.unwrap());
    wait_ready(&src_cfg.run_dir).await;

    // A client streams from the guest through the whole move.
    let client = lan
        .client(&["--duration-ms", "25000", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut before = None;
    for _ in 0..100 {
        if let Some(s) = lan.stats().await {
            if s["streams"]["open"].as_u64() >= Some(1) && s["mem"]["filled"] == true {
                before = Some(s);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = before.expect("guest stats with the client's stream open");
    assert_eq!(lan.port_of_guest().as_deref(), Some("tqsrc0"));

    let settings = plan(&src, 256, request()).await;
    let incoming = IncomingMigration::prepare(dst_cfg.clone(), &settings, None, LOOPBACK)
        .await
        .unwrap();
    let target = incoming.uri().expect("the destination listens");
    assert!(target.to_string().starts_with("tcp:127.0.0.1:"), "{target}");
    assert_ne!(target.addr().port(), 0);
    assert_eq!(incoming.vm().status().await.unwrap(), RunState::InMigrate);

    let started = Instant::now();
    let out = send(&src, &incoming, &settings).await;
    let at_switch = out
        .wait_pre_switchover(Duration::from_secs(120))
        .await
        .unwrap();
    let paused_at = Instant::now();
    assert_eq!(at_switch.state, AgentMigrationState::PreSwitchover);
    assert!(at_switch.progress.pass >= 1, "{at_switch:?}");
    // The source guest is paused and the destination has not run it.
    assert_eq!(src.status().await.unwrap(), RunState::FinishMigrate);
    assert_ne!(incoming.vm().status().await.unwrap(), RunState::Running);

    let report = out.switchover().await.unwrap();
    let received = incoming
        .wait_received(Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(received.state, AgentMigrationState::Completed);
    // All state is in, but nothing runs on the destination before the commit, and QEMU did
    // not announce the guest from there: the LAN still sends to the source's port.
    assert_eq!(incoming.vm().status().await.unwrap(), RunState::Paused);
    assert_eq!(src.status().await.unwrap(), RunState::PostMigrate);
    assert_eq!(lan.port_of_guest().as_deref(), Some("tqsrc0"));

    incoming.commit(&COMMIT_ANNOUNCE).await.unwrap();
    let pause_ms = paused_at.elapsed().as_millis();
    let total_ms = started.elapsed().as_millis();
    assert_eq!(incoming.vm().status().await.unwrap(), RunState::Running);
    wait_for(
        "the bridge to learn the destination port",
        Duration::from_secs(2),
        || (lan.port_of_guest().as_deref() == Some("tqdst0")).then_some(()),
    )
    .await;
    out.finish().await.unwrap();
    assert!(src.exit_reason().is_some());

    let status = out.status();
    print_events(&status);
    eprintln!(
        "MEASURED happy path: QEMU downtime {} ms, source paused {} ms until sent, guest \
         paused ~{pause_ms} ms until the commit ran it, total {total_ms} ms ({} ms in QEMU), \
         {:.1} MiB in {} passes",
        report.downtime_ms,
        report.paused_ms,
        report.total_ms,
        report.bytes as f64 / 1048576.0,
        report.passes
    );
    assert!(
        report.downtime_ms > 0 && report.downtime_ms < 5000,
        "{report:?}"
    );
    assert!(report.bytes > 0);
    assert!(report.passes >= 2, "{report:?}");
    assert!(!report.postcopy);

    // The client's stream went on: no reset, nothing missing or duplicated.
    let out_client = client.wait_with_output().await.unwrap();
    let report_client: Value = serde_json::from_slice(&out_client.stdout)
        .unwrap_or_else(|e| panic!("client output {:?}: {e}", out_client.stdout));
    eprintln!("client: {report_client}");
    assert_eq!(report_client["resets"], 0, "{report_client}");
    assert_eq!(report_client["missing"], 0, "{report_client}");
    assert_eq!(report_client["duplicates"], 0, "{report_client}");
    assert_eq!(report_client["boot_changes"], 0, "{report_client}");
    assert_eq!(report_client["ok"], true, "{report_client}");

    // Same boot, memory verified twice over on the destination with no error.
    let passes_before = before["mem"]["passes"].as_u64().unwrap();
    let mut after = None;
    for _ in 0..600 {
        if let Some(s) = lan.stats().await {
            if s["mem"]["passes"].as_u64().unwrap_or(0) >= passes_before + 2 {
                after = Some(s);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = after.expect("the verifier to complete two passes after the move");
    assert_eq!(after["boot_id"], before["boot_id"]);
    assert_eq!(after["mem"]["errors"], 0, "{after}");
    let text = console(&dst_cfg.run_dir);
    assert!(!text.contains("TERN-GUEST-ERROR"), "{text}");
    assert!(
        !text.contains("TERN-GUEST-READY"),
        "the destination rebooted: {text}"
    );
    incoming.vm().kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_before_commit_always_leaves_the_source_running() {
    let _serial = serial().await;
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (src_cfg, _g1, src) = tick_source(dir.path()).await;
    let settings = plan(&src, 192, request()).await;

    // 1. Abort while paused at pre-switchover.
    let (dst_cfg, _g2, incoming) = listening(&src_cfg, dir.path(), "dst1", &settings).await;
    let out = send(&src, &incoming, &settings).await;
    out.wait_pre_switchover(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(src.status().await.unwrap(), RunState::FinishMigrate);
    let tick = last_tick(&console(&src_cfg.run_dir)).unwrap();
    out.abort("test: abort at pre-switchover").await.unwrap();
    assert_eq!(src.status().await.unwrap(), RunState::Running);
    wait_tick(&src_cfg.run_dir, tick + 1, Duration::from_secs(30)).await;
    let s = out.status();
    assert_eq!(s.state, AgentMigrationState::Cancelled);
    assert!(s.error.unwrap().contains("test: abort"));
    // A second abort of an ended migration is harmless.
    out.abort("again").await.unwrap();
    incoming.abort().await.unwrap();
    assert!(incoming.vm().exit_reason().is_some());
    assert!(!dst_cfg.run_dir.join("qemu.pid").exists());
    assert!(!dst_cfg.run_dir.join("qmp.sock").exists());
    // A switchover after the abort is refused.
    assert!(out.switchover().await.is_err());

    // 2. Nobody decides: the source resumes itself after switchover_wait.
    let (_, _g3, incoming) = listening(&src_cfg, dir.path(), "dst2", &settings).await;
    let opts = OutgoingOptions {
        switchover_wait: Duration::from_millis(500),
        ..OutgoingOptions::default()
    };
    let out = Outgoing::start(
        src.clone(),
        &incoming.uri().expect("the destination listens"),
        &settings,
        None,
        opts,
    )
    .await
    .unwrap();
    let s = wait_state(
        &out,
        |st| st == AgentMigrationState::Cancelled,
        Duration::from_secs(60),
    )
    .await;
    assert!(
        s.error
            .as_deref()
            .unwrap_or("")
            .contains("no switchover decision"),
        "{s:?}"
    );
    assert_eq!(src.status().await.unwrap(), RunState::Running);
    incoming.abort().await.unwrap();

    // 3. Switchover done, commit never made (the destination never ran): roll back.
    let (_, _g4, incoming) = listening(&src_cfg, dir.path(), "dst3", &settings).await;
    let out = send(&src, &incoming, &settings).await;
    out.wait_pre_switchover(Duration::from_secs(60))
        .await
        .unwrap();
    let report = out.switchover().await.unwrap();
    assert!(report.downtime_ms > 0);
    incoming
        .wait_received(Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(src.status().await.unwrap(), RunState::PostMigrate);
    let tick = last_tick(&console(&src_cfg.run_dir)).unwrap();
    incoming.abort().await.unwrap();
    out.abort("test: commit failed").await.unwrap();
    assert_eq!(src.status().await.unwrap(), RunState::Running);
    wait_tick(&src_cfg.run_dir, tick + 1, Duration::from_secs(30)).await;
    assert_eq!(out.status().state, AgentMigrationState::Cancelled);

    // 4. A committed destination is never killed by an abort.
    let (dst_cfg, _g5, incoming) = listening(&src_cfg, dir.path(), "dst4", &settings).await;
    let out = send(&src, &incoming, &settings).await;
    out.wait_pre_switchover(Duration::from_secs(60))
        .await
        .unwrap();
    out.switchover().await.unwrap();
    incoming
        .wait_received(Duration::from_secs(30))
        .await
        .unwrap();
    incoming.commit(&COMMIT_ANNOUNCE).await.unwrap();
    // Idempotent.
    incoming.commit(&COMMIT_ANNOUNCE).await.unwrap();
    assert!(incoming.abort().await.is_err());
    assert_eq!(incoming.vm().status().await.unwrap(), RunState::Running);
    out.finish().await.unwrap();
    wait_tick(&dst_cfg.run_dir, tick + 2, Duration::from_secs(30)).await;
    incoming.vm().kill().await.unwrap();
}

/// Starts sending `src` on a leave to switch over at the pause that holds for `max_age`, with
/// a 500 ms wait for a decision, and waits until the migration has left pre-copy and the pause.
async fn send_on_leave(
    src: &Arc<QemuVm>,
    incoming: &IncomingMigration,
    settings: &MigrationSettings,
    max_age: Duration,
) -> (Outgoing, OutgoingStatus) {
    let opts = OutgoingOptions {
        switchover_wait: Duration::from_millis(500),
        switchover_leave: Some(SwitchoverLeave::new(max_age)),
        ..OutgoingOptions::default()
    };
    let out = Outgoing::start(
        src.clone(),
        &incoming.uri().expect("the destination listens"),
        settings,
        None,
        opts,
    )
    .await
    .unwrap();
    let s = wait_state(
        &out,
        |st| {
            !matches!(
                st,
                AgentMigrationState::Active | AgentMigrationState::PreSwitchover
            )
        },
        Duration::from_secs(60),
    )
    .await;
    (out, s)
}

/// On leave to switch over at its pause, a source sends its final state unasked (the
/// decision's round trip leaves the pause), answers a late `switchover` with the report, and
/// still gives the guest back on an abort: the destination never ran it. A leave its decider
/// let lapse is not used: that source waits for the decision, and without one gives the
/// guest back itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_on_leave_switches_over_at_its_pause_and_still_rolls_back() {
    let _serial = serial().await;
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (src_cfg, _g1, src) = tick_source(dir.path()).await;
    let settings = plan(&src, 192, request()).await;

    // 1. The decider went quiet: the leave has lapsed by the pause (it holds 0 ms).
    let (_, _g2, incoming) = listening(&src_cfg, dir.path(), "dst1", &settings).await;
    let (_out, s) = send_on_leave(&src, &incoming, &settings, Duration::ZERO).await;
    print_events(&s);
    assert_eq!(s.state, AgentMigrationState::Cancelled, "{s:?}");
    assert!(
        s.error
            .as_deref()
            .unwrap_or("")
            .contains("no switchover decision"),
        "{s:?}"
    );
    assert_eq!(src.status().await.unwrap(), RunState::Running);
    incoming.abort().await.unwrap();

    // 2. On leave (renewed, as the agent does on each of the center's calls).
    let (_, _g3, incoming) = listening(&src_cfg, dir.path(), "dst2", &settings).await;
    // A source that waited for a decision would give up after 500 ms, cancelled.
    let (out, s) = send_on_leave(&src, &incoming, &settings, Duration::from_secs(3600)).await;
    print_events(&s);
    assert_eq!(s.state, AgentMigrationState::Completed, "{s:?}");
    assert!(
        s.events.iter().any(|e| e.contains("sending it at once")),
        "{:?}",
        s.events
    );
    incoming
        .wait_received(Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(src.status().await.unwrap(), RunState::PostMigrate);
    // The center's switchover, late, gets the report of what was sent.
    let report = out.switchover().await.unwrap();
    assert!(report.downtime_ms > 0 && !report.postcopy, "{report:?}");
    // No commit came: the rollback resumes the source.
    let tick = last_tick(&console(&src_cfg.run_dir)).unwrap();
    incoming.abort().await.unwrap();
    out.abort("test: no commit").await.unwrap();
    assert_eq!(src.status().await.unwrap(), RunState::Running);
    wait_tick(&src_cfg.run_dir, tick + 1, Duration::from_secs(30)).await;
    assert_eq!(out.status().state, AgentMigrationState::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_killed_during_precopy_leaves_the_source_running() {
    let _serial = serial().await;
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (src_cfg, _g1, src) = tick_source(dir.path()).await;
    let dst_cfg = destination(&src_cfg, dir.path(), "dst", true);
    let _g2 = KillGuard(dst_cfg.run_dir.clone());
    let settings = plan(&src, 192, capped(16)).await;
    assert_eq!(settings.max_bandwidth_mib_s, Some(2));
    let incoming = IncomingMigration::prepare(dst_cfg.clone(), &settings, None, LOOPBACK)
        .await
        .unwrap();
    let out = send(&src, &incoming, &settings).await;
    precopy_going(&out).await;
    let tick = last_tick(&console(&src_cfg.run_dir)).unwrap();
    incoming.vm().kill().await.unwrap();
    let s = wait_state(
        &out,
        |st| st == AgentMigrationState::Failed,
        Duration::from_secs(30),
    )
    .await;
    print_events(&s);
    assert!(
        s.error.as_deref().unwrap_or("").contains("source running"),
        "{s:?}"
    );
    assert_eq!(src.status().await.unwrap(), RunState::Running);
    wait_tick(&src_cfg.run_dir, tick + 1, Duration::from_secs(30)).await;
    incoming.abort().await.unwrap();
    assert!(out.switchover().await.is_err());
    src.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_cancels_cleanly_and_the_source_runs_on() {
    let _serial = serial().await;
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (src_cfg, _g1, src) = tick_source(dir.path()).await;
    let dst_cfg = destination(&src_cfg, dir.path(), "dst", true);
    let _g2 = KillGuard(dst_cfg.run_dir.clone());
    let settings = plan(
        &src,
        192,
        MigrateVm {
            bandwidth_mbit: Some(16),
            deadline_ms: Some(4000),
            ..request()
        },
    )
    .await;
    assert_eq!(settings.deadline_ms, 4000);
    let incoming = IncomingMigration::prepare(dst_cfg.clone(), &settings, None, LOOPBACK)
        .await
        .unwrap();
    let started = Instant::now();
    let out = send(&src, &incoming, &settings).await;
    let s = wait_state(
        &out,
        |st| st != AgentMigrationState::Active,
        Duration::from_secs(60),
    )
    .await;
    let took = started.elapsed();
    print_events(&s);
    assert_eq!(s.state, AgentMigrationState::Cancelled, "{s:?}");
    assert!(
        s.error.as_deref().unwrap_or("").contains("deadline"),
        "{s:?}"
    );
    assert!(
        s.events
            .iter()
            .any(|e| e.contains("deadline of 4.0 s passed")),
        "{s:?}"
    );
    assert!(
        took >= Duration::from_millis(4000) && took < Duration::from_secs(20),
        "{took:?}"
    );
    assert_eq!(src.status().await.unwrap(), RunState::Running);
    let tick = last_tick(&console(&src_cfg.run_dir)).unwrap();
    wait_tick(&src_cfg.run_dir, tick + 1, Duration::from_secs(30)).await;
    // The destination's stream broke: it ends by itself; abort cleans up what is left.
    tokio::time::timeout(Duration::from_secs(30), incoming.vm().wait_exit())
        .await
        .expect("destination of a cancelled migration kept running");
    incoming.abort().await.unwrap();
    src.kill().await.unwrap();
}

// Load-sensitive: whether auto-converge wins against the test guest depends on how much CPU
// the 2-core machine leaves its vCPU. It passed alone (35 s) but timed out while a benchmark ran
// beside it, so it is kept out of CI until it is made robust; the escalation rules themselves
// are unit-tested in `tern-motion`. Run it with `--ignored` on an idle machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load-sensitive; run with --ignored on an idle machine"]
async fn guest_dirtying_faster_than_the_cap_converges_by_escalation() {
    let _serial = serial().await;
    init_tracing();
    if skip_without_guest() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lan = Lan::new("esc");
    // A dirty rate far above what the vCPU can do makes the dirtier CPU-bound, so slowing
    // the vCPU (auto-converge) slows the dirtying. 16 MiB working set.
    let src_cfg = real_guest(
        dir.path(),
        "src",
        Some(&lan),
        256,
        "tern.mem=16 tern.dirty=4096",
    );
    let dst_cfg = destination_of(&src_cfg, dir.path(), true);
    let _g1 = KillGuard(src_cfg.run_dir.clone());
    let _g2 = KillGuard(dst_cfg.run_dir.clone());
    let src = Arc::new(QemuVm::launch(src_cfg.clone()).await.unwrap());
    wait_ready(&src_cfg.run_dir).await;
    let before = wait_for_stats(&lan, |_| true).await;

    // 32 Mbit/s = 4 MiB/s, well under what the guest dirties.
    let settings = plan(
        &src,
        256,
        MigrateVm {
            bandwidth_mbit: Some(32),
            deadline_ms: Some(300_000),
            ..request()
        },
    )
    .await;
    assert!(
        settings
            .reasons
            .iter()
            .any(|r| r.starts_with("throttling: expected")),
        "{:#?}",
        settings.reasons
    );
    let incoming = IncomingMigration::prepare(dst_cfg.clone(), &settings, None, LOOPBACK)
        .await
        .unwrap();
    let started = Instant::now();
    let out = send(&src, &incoming, &settings).await;
    let mut rx = out.watch();
    let watcher = tokio::spawn(async move {
        let mut max_throttle = 0;
        let mut max_pass = 0;
        while rx.changed().await.is_ok() {
            let s = rx.borrow_and_update().clone();
            max_throttle = max_throttle.max(s.progress.cpu_throttle_pct);
            max_pass = max_pass.max(s.progress.pass);
            if s.state != AgentMigrationState::Active {
                break;
            }
        }
        (max_throttle, max_pass)
    });
    out.wait_pre_switchover(Duration::from_secs(300))
        .await
        .unwrap();
    let (max_throttle, max_pass) = watcher.await.unwrap();
    let report = out.switchover().await.unwrap();
    incoming
        .wait_received(Duration::from_secs(30))
        .await
        .unwrap();
    incoming.commit(&COMMIT_ANNOUNCE).await.unwrap();
    out.finish().await.unwrap();
    let status = out.status();
    print_events(&status);
    eprintln!(
        "MEASURED escalation: {:.1} s total, {} passes, throttle up to {max_throttle}%, QEMU \
         downtime {} ms, {:.1} MiB sent",
        started.elapsed().as_secs_f64(),
        report.passes,
        report.downtime_ms,
        report.bytes as f64 / 1048576.0
    );
    assert!(max_throttle > 0, "auto-converge never throttled");
    assert!(max_pass >= 3);
    assert!(
        report.downtime_ms <= settings.downtime_budget_ms + 1000,
        "{report:?}"
    );

    let passes_before = before["mem"]["passes"].as_u64().unwrap();
    let after = wait_for_stats(&lan, |s| {
        s["mem"]["passes"].as_u64().unwrap_or(0) >= passes_before + 2
    })
    .await;
    assert_eq!(after["boot_id"], before["boot_id"]);
    assert_eq!(after["mem"]["errors"], 0, "{after}");
    let text = console(&dst_cfg.run_dir);
    assert!(!text.contains("TERN-GUEST-ERROR"), "{text}");
    incoming.vm().kill().await.unwrap();
}

/// Polls the guest's stats until `ok` holds (up to 60 s).
async fn wait_for_stats(lan: &Lan, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = lan.stats().await {
            if s["mem"]["filled"] == true && ok(&s) {
                return s;
            }
        }
        assert!(Instant::now() < deadline, "guest stats never matched");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Post-copy when allowed: a guest dirtying faster than the cap makes the watcher switch to
/// post-copy; the source pauses at pre-switchover first, the destination runs only on commit
/// and pulls the remaining pages from the source, which is quit only once all are sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_when_allowed_completes_after_commit() {
    let _serial = serial().await;
    init_tracing();
    if skip_without_guest() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src_cfg = real_guest(dir.path(), "src", None, 256, "tern.mem=32 tern.dirty=4096");
    let dst_cfg = destination_of(&src_cfg, dir.path(), false);
    let _g1 = KillGuard(src_cfg.run_dir.clone());
    let _g2 = KillGuard(dst_cfg.run_dir.clone());
    let src = Arc::new(QemuVm::launch(src_cfg.clone()).await.unwrap());
    wait_ready(&src_cfg.run_dir).await;
    let settings = plan(
        &src,
        256,
        MigrateVm {
            bandwidth_mbit: Some(32),
            deadline_ms: Some(20_000),
            allow_postcopy: true,
            ..request()
        },
    )
    .await;
    assert!(settings.postcopy_allowed);
    assert_eq!(
        settings.multifd_channels, 0,
        "QEMU 10.0: no multifd with post-copy"
    );
    let incoming = IncomingMigration::prepare(dst_cfg.clone(), &settings, None, LOOPBACK)
        .await
        .unwrap();
    let out = send(&src, &incoming, &settings).await;
    let at = out
        .wait_pre_switchover(Duration::from_secs(120))
        .await
        .unwrap();
    print_events(&at);
    assert!(
        at.events
            .iter()
            .any(|e| e.contains("switching to post-copy")),
        "{:#?}",
        at.events
    );
    assert_eq!(at.state, AgentMigrationState::PreSwitchover);
    assert_ne!(incoming.vm().status().await.unwrap(), RunState::Running);
    let report = out.switchover().await.unwrap();
    assert!(report.postcopy, "{report:?}");
    let received = incoming
        .wait_received(Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(received.state, AgentMigrationState::Completed);
    assert_ne!(incoming.vm().status().await.unwrap(), RunState::Running);
    // Past the post-copy switchover the source can no longer take the VM back.
    assert!(out.abort("too late").await.is_err());
    incoming.commit(&COMMIT_ANNOUNCE).await.unwrap();
    out.finish().await.unwrap();
    assert!(src.exit_reason().is_some());
    assert_eq!(incoming.vm().status().await.unwrap(), RunState::Running);
    let stats = incoming.vm().query_migrate().await.unwrap();
    assert_eq!(
        stats.status,
        tern_qemu::MigrationStatus::Completed,
        "{stats:?}"
    );
    // The guest keeps dirtying there and its verifier saw no bad page.
    let rate = incoming
        .vm()
        .measure_dirty_rate(std::time::Duration::from_secs(1))
        .await
        .unwrap();
    assert!(rate.dirty_rate_mib_per_s.unwrap_or(0) > 0, "{rate:?}");
    let text = console(&dst_cfg.run_dir);
    assert!(!text.contains("TERN-GUEST-ERROR"), "{text}");
    incoming.vm().kill().await.unwrap();
}

/// True when `qemu-io` cannot open the image for writing because a QEMU holds its lock.
fn image_locked(path: &str) -> bool {
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512", path])
        .output()
        .expect("run qemu-io (from qemu-utils)");
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    if out.status.success() && !text.contains("lock") {
        return false;
    }
    assert!(text.contains("lock"), "qemu-io failed otherwise: {text}");
    true
}

/// Shared disks change owner only with the hand-over: after the final state is sent, neither
/// side holds the image (the destination activates it only when committed), so a rollback
/// lets the source take it back, and a commit gives it to the destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_disk_follows_the_hand_over_decision() {
    let _serial = serial().await;
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("shared.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let disk_s = disk.to_string_lossy().into_owned();
    let mut src_cfg = config(dir.path(), "src", "");
    src_cfg.spec.disks = vec![tern_api::DiskSpec {
        bus: Default::default(),
        path: disk_s.clone(),
        format: tern_api::DiskFormat::Raw,
        readonly: false,
        datastore: None,
        volume: None,
    }];
    // Each QEMU gets the disk as the agent hands it over: descriptors in an fd set, which the
    // caller closes once QEMU has started (its image lock lives on the open file, so a copy
    // kept open would hold the lock after QEMU is gone).
    let with_disk = |cfg: &LaunchConfig| LaunchConfig {
        files: opened_disk(&disk_s),
        ..cfg.clone()
    };
    let _g1 = KillGuard(src_cfg.run_dir.clone());
    let src = Arc::new(QemuVm::launch(with_disk(&src_cfg)).await.unwrap());
    wait_tick(&src_cfg.run_dir, 1, BOOT).await;
    assert!(image_locked(&disk_s));
    let argv = std::fs::read(format!("/proc/{}/cmdline", src.pid())).unwrap();
    let argv = String::from_utf8_lossy(&argv);
    assert!(
        argv.contains("/dev/fdset/1") && !argv.contains(&disk_s),
        "{argv}"
    );
    let settings = plan(&src, 192, request()).await;

    // Rollback after the switchover: the source gets its disk back and runs on.
    let dst_cfg = destination(&src_cfg, dir.path(), "dst1", true);
    let _g2 = KillGuard(dst_cfg.run_dir.clone());
    let incoming = IncomingMigration::prepare(with_disk(&dst_cfg), &settings, None, LOOPBACK)
        .await
        .unwrap();
    let out = send(&src, &incoming, &settings).await;
    out.wait_pre_switchover(Duration::from_secs(60))
        .await
        .unwrap();
    out.switchover().await.unwrap();
    incoming
        .wait_received(Duration::from_secs(30))
        .await
        .unwrap();
    assert!(
        !image_locked(&disk_s),
        "someone holds the image between the switchover and the decision"
    );
    incoming.abort().await.unwrap();
    out.abort("test: not committed").await.unwrap();
    assert_eq!(src.status().await.unwrap(), RunState::Running);
    assert!(
        image_locked(&disk_s),
        "the resumed source did not take its disk back"
    );

    // Commit: the destination takes the disk.
    let dst_cfg = destination(&src_cfg, dir.path(), "dst2", true);
    let _g3 = KillGuard(dst_cfg.run_dir.clone());
    let incoming = IncomingMigration::prepare(with_disk(&dst_cfg), &settings, None, LOOPBACK)
        .await
        .unwrap();
    let out = send(&src, &incoming, &settings).await;
    out.wait_pre_switchover(Duration::from_secs(60))
        .await
        .unwrap();
    out.switchover().await.unwrap();
    incoming
        .wait_received(Duration::from_secs(30))
        .await
        .unwrap();
    incoming.commit(&COMMIT_ANNOUNCE).await.unwrap();
    out.finish().await.unwrap();
    assert!(
        image_locked(&disk_s),
        "the committed destination does not hold the disk"
    );
    let t = last_tick(&console(&src_cfg.run_dir)).unwrap_or(0);
    wait_tick(&dst_cfg.run_dir, t + 1, Duration::from_secs(30)).await;
    incoming.vm().kill().await.unwrap();
    assert!(!image_locked(&disk_s));
}

/// `path` opened as the agent opens a writable disk for QEMU: read-only and read-write, both
/// O_DIRECT (QEMU opens the disk uncached and picks the descriptor of the mode it needs).
fn opened_disk(path: &str) -> Vec<tern_qemu::OpenedFile> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |write: bool| {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
            .open(path)
            .unwrap();
        Arc::new(std::os::fd::OwnedFd::from(f))
    };
    vec![tern_qemu::OpenedFile {
        path: path.to_string(),
        read: open(false),
        write: Some(open(true)),
        backing: Vec::new(),
        block_device: false,
    }]
}

/// A TCP relay between the source and the destination that the test can silence: once cut,
/// it stops carrying bytes either way but keeps every connection open — a link gone silent,
/// not a refused one.
struct SilenceableLink {
    uri: MigrationUri,
    cut: tokio::sync::watch::Sender<bool>,
}

impl SilenceableLink {
    async fn to(target: MigrationUri) -> SilenceableLink {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let uri = MigrationUri::new(listener.local_addr().unwrap()).unwrap();
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((from_src, _)) = listener.accept().await {
                let Ok(to_dst) = tokio::net::TcpStream::connect(target.addr()).await else {
                    continue;
                };
                let (src_r, src_w) = from_src.into_split();
                let (dst_r, dst_w) = to_dst.into_split();
                tokio::spawn(Self::carry(src_r, dst_w, cut_rx.clone()));
                tokio::spawn(Self::carry(dst_r, src_w, cut_rx.clone()));
            }
        });
        SilenceableLink { uri, cut }
    }

    async fn carry(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut cut: tokio::sync::watch::Receiver<bool>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = tokio::select! {
                r = from.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
                _ = cut.wait_for(|c| *c) => break,
            };
            if *cut.borrow() || to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        // Silent from now on: hold both ends open, carry nothing.
        std::future::pending::<()>().await;
        drop((from, to));
    }

    fn cut(&self) {
        let _ = self.cut.send(true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_gone_silent_at_switchover_gives_the_guest_back_within_its_pause_limit() {
    let _serial = serial().await;
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (src_cfg, _g1, src) = tick_source(dir.path()).await;
    let mut settings = plan(&src, 192, request()).await;
    // One stream, so the relay carries every byte of the migration.
    settings.multifd_channels = 0;
    settings.compression = tern_api::migration::Compression::None;
    settings.zero_page_detection = tern_api::migration::ZeroPageDetection::Legacy;
    settings.downtime_budget_ms = 300;
    settings.downtime_limit_ms = 300;
    let (_, _g2, incoming) = listening(&src_cfg, dir.path(), "dst", &settings).await;
    let link = SilenceableLink::to(incoming.uri().expect("the destination listens")).await;
    let margin = Duration::from_secs(1);
    let opts = OutgoingOptions {
        pause_margin: margin,
        ..OutgoingOptions::default()
    };
    let out = Outgoing::start(src.clone(), &link.uri, &settings, None, opts)
        .await
        .unwrap();
    out.wait_pre_switchover(Duration::from_secs(60))
        .await
        .unwrap();
    let paused = Instant::now();
    assert_eq!(src.status().await.unwrap(), RunState::FinishMigrate);
    let tick = last_tick(&console(&src_cfg.run_dir)).unwrap();

    // The worst moment: the link goes silent as the final copy starts.
    link.cut();
    // Without a watchdog this waits for TCP to give up (minutes): fail instead of hanging.
    let r = tokio::time::timeout(Duration::from_secs(30), out.switchover())
        .await
        .expect("the guest stayed paused: no switchover watchdog");
    let back = paused.elapsed();
    let err = r.expect_err("a final copy over a silent link cannot complete");
    assert!(err.to_string().contains("switchover watchdog"), "{err}");
    // The pause limit is budget + margin; the watchdog's own reaction (the yank, QEMU
    // failing the copy and resuming the guest) takes well under a second more.
    let limit = Duration::from_millis(300) + margin;
    eprintln!("the guest ran again {back:?} after it paused (pause limit {limit:?})");
    // `paused` was taken when the pause was seen, up to a sample later than it began: the
    // lower bound allows for that, and shows the watchdog waited out its limit.
    assert!(
        back + Duration::from_millis(500) >= limit && back < limit + Duration::from_secs(3),
        "the guest was given back after {back:?} (limit {limit:?})"
    );
    assert_eq!(src.status().await.unwrap(), RunState::Running);
    wait_tick(&src_cfg.run_dir, tick + 1, Duration::from_secs(30)).await;
    let s = out.status();
    assert_eq!(s.state, AgentMigrationState::Failed, "{s:?}");
    // Nothing was committed: the destination never ran and is removed.
    assert_ne!(incoming.vm().status().await.ok(), Some(RunState::Running));
    incoming.abort().await.unwrap();
}

/// A migration whose driver was lost (its agent restarted) is taken over from what the lost
/// driver knew (issue 18): in pre-copy it is followed on to completion; paused at
/// pre-switchover, where nobody can vouch for how long the guest has waited, the source is
/// given back at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_whose_driver_was_lost_is_taken_over() {
    let _serial = serial().await;
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (src_cfg, _g1, src) = tick_source(dir.path()).await;
    let settings = plan(&src, 192, capped(16)).await;
    let resume = |out: &Outgoing, started: Instant| tern_qemu::Resume {
        elapsed: started.elapsed(),
        was_running: out.was_running(),
        events: out.status().events,
    };

    // 1. Lost in pre-copy: taken over, and completed.
    let (dst_cfg, _g2, incoming) = listening(&src_cfg, dir.path(), "dst1", &settings).await;
    let started = Instant::now();
    let lost = send(&src, &incoming, &settings).await;
    precopy_going(&lost).await;
    lost.detach().await;
    let resume1 = resume(&lost, started);
    let before = resume1.events.len();
    drop(lost);
    // Nobody follows the migration now, and dropping a detached driver aborted nothing.
    let m = src.query_migrate().await.unwrap();
    assert_eq!(m.status, tern_qemu::MigrationStatus::Active, "{m:?}");
    let out = Outgoing::attach(src.clone(), &settings, OutgoingOptions::default(), resume1)
        .await
        .unwrap();
    let s = out.status();
    assert_eq!(s.state, AgentMigrationState::Active, "{s:?}");
    assert_eq!(s.events.len(), before + 1, "{:#?}", s.events);
    assert!(s.events[before].contains("re-attached"), "{:#?}", s.events);
    // The link gets faster: the taken-over migration converges and hands over.
    src.set_migration_parameters(serde_json::json!({ "max-bandwidth": 0 }))
        .await
        .unwrap();
    hand_over(
        &out,
        &incoming,
        &src_cfg.run_dir,
        &dst_cfg.run_dir,
        Duration::from_secs(60),
    )
    .await;
    print_events(&out.status());

    // 2. Lost at pre-switchover (the destination now is the source of the next move): the
    //    guest waits paused for a decision nobody will take; taking over gives it back.
    let src = incoming.vm().clone();
    let src_dir = dst_cfg.run_dir.clone();
    let mut fast = settings.clone();
    fast.max_bandwidth_mib_s = None;
    let dst_cfg = destination(&src_cfg, dir.path(), "dst2", true);
    let _g3 = KillGuard(dst_cfg.run_dir.clone());
    let back = IncomingMigration::prepare(dst_cfg.clone(), &fast, None, LOOPBACK)
        .await
        .unwrap();
    let started = Instant::now();
    let lost = send(&src, &back, &fast).await;
    lost.wait_pre_switchover(Duration::from_secs(60))
        .await
        .unwrap();
    lost.detach().await;
    let resume2 = resume(&lost, started);
    drop(lost);
    assert_eq!(src.status().await.unwrap(), RunState::FinishMigrate);
    let tick = last_tick(&console(&src_dir)).unwrap();
    let out = Outgoing::attach(src.clone(), &fast, OutgoingOptions::default(), resume2)
        .await
        .unwrap();
    let s = out.status();
    print_events(&s);
    assert_eq!(s.state, AgentMigrationState::Cancelled, "{s:?}");
    assert!(
        s.error
            .as_deref()
            .unwrap_or("")
            .contains("paused at pre-switchover while the agent was away"),
        "{s:?}"
    );
    assert_eq!(src.status().await.unwrap(), RunState::Running);
    wait_tick(&src_dir, tick + 1, Duration::from_secs(30)).await;
    assert!(out.switchover().await.is_err());
    back.abort().await.unwrap();

    // 3. Nothing to take over: a QEMU that never migrated is refused.
    let fresh_cfg = config(dir.path(), "fresh", "");
    let _g4 = KillGuard(fresh_cfg.run_dir.clone());
    let fresh = Arc::new(QemuVm::launch(fresh_cfg).await.unwrap());
    let err = Outgoing::attach(
        fresh.clone(),
        &fast,
        OutgoingOptions::default(),
        tern_qemu::Resume {
            elapsed: Duration::ZERO,
            was_running: true,
            events: Vec::new(),
        },
    )
    .await
    .expect_err("no migration to take over");
    assert!(err.to_string().contains("no migration"), "{err}");
    fresh.kill().await.unwrap();
    src.kill().await.unwrap();
}

/// A TCP relay that keeps a copy of every byte the source sends through it, for a look at what
/// a migration puts on the wire.
struct RecordingLink {
    uri: MigrationUri,
    sent: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl RecordingLink {
    async fn to(target: MigrationUri) -> RecordingLink {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let uri = MigrationUri::new(listener.local_addr().unwrap()).unwrap();
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = sent.clone();
        tokio::spawn(async move {
            while let Ok((from_src, _)) = listener.accept().await {
                let Ok(to_dst) = tokio::net::TcpStream::connect(target.addr()).await else {
                    continue;
                };
                let (mut src_r, mut src_w) = from_src.into_split();
                let (mut dst_r, mut dst_w) = to_dst.into_split();
                let record = record.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match src_r.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        record.lock().unwrap().extend_from_slice(&buf[..n]);
                        if dst_w.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = dst_w.shutdown().await;
                });
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut dst_r, &mut src_w).await;
                    let _ = src_w.shutdown().await;
                });
            }
        });
        RecordingLink { uri, sent }
    }

    /// How many bytes went through, and whether `needle` was among them.
    fn saw(&self, needle: &[u8]) -> (usize, bool) {
        let sent = self.sent.lock().unwrap();
        let found = sent
            .windows(needle.len())
            .any(|w| w[0] == needle[0] && w == needle);
        (sent.len(), found)
    }
}

/// Text every Debian kernel keeps in its memory (the banner of /proc/version).
const GUEST_MEMORY_MARK: &[u8] = b"Linux version ";

/// Encrypted migration (issue 11): the destination admits only a source holding this
/// migration's key — a process writing junk to its port and a source with another key are
/// turned away, and the destination keeps listening for the right one — and nothing of the
/// guest's memory shows on the wire. The same guest migrated back in clear shows it: the
/// look at the wire can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_stream_admits_only_the_key_holder_and_shows_no_guest_memory() {
    use tern_api::migration::{Compression, MigrationKey};
    let _serial = serial().await;
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (src_cfg, _g1, src) = tick_source(dir.path()).await;
    let mut settings = plan(&src, 192, request()).await;
    // Pages go on the wire as they are in memory (no compression) unless encrypted.
    settings.compression = Compression::None;
    settings.encrypted = true;
    let key = MigrationKey::from_bytes(rand::random());
    let dst_cfg = destination(&src_cfg, dir.path(), "dst", true);
    let _g2 = KillGuard(dst_cfg.run_dir.clone());
    let incoming = IncomingMigration::prepare(dst_cfg.clone(), &settings, Some(&key), LOOPBACK)
        .await
        .unwrap();
    let uri = incoming.uri().expect("the destination listens");
    let psk = dst_cfg.run_dir.join("migration-tls/keys.psk");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&psk).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the key file is {mode:o}");
    // The server end reads a standard DH group instead of generating one (which took QEMU
    // hundreds of milliseconds at each preparation).
    let dh = std::fs::read_to_string(dst_cfg.run_dir.join("migration-tls/dh-params.pem"))
        .expect("the DH group beside the key");
    assert!(dh.starts_with("-----BEGIN DH PARAMETERS-----"), "{dh}");

    // Junk from another process: before TLS, 64 such bytes killed the destination. The
    // destination may refuse it and reset the connection before all of it is written: that
    // is its right, so only the connection must succeed.
    let mut junk = tokio::net::TcpStream::connect(uri.addr()).await.unwrap();
    let _ = junk.write_all(&rand::random::<[u8; 64]>()).await;
    drop(junk);
    // A source that holds another key fails its handshake, and its guest runs on.
    let other = MigrationKey::from_bytes(rand::random());
    let impostor = Outgoing::start(
        src.clone(),
        &uri,
        &settings,
        Some(&other),
        OutgoingOptions::default(),
    )
    .await
    .unwrap();
    let s = wait_state(
        &impostor,
        |st| st == AgentMigrationState::Failed,
        Duration::from_secs(30),
    )
    .await;
    print_events(&s);
    drop(impostor);
    assert_eq!(src.status().await.unwrap(), RunState::Running);
    assert!(psk.exists(), "the destination's key stays while it listens");
    let s = incoming.status().await;
    assert_eq!(s.state, AgentMigrationState::Listening, "{s:?}");
    assert!(
        !src_cfg.run_dir.join("migration-tls/keys.psk").exists(),
        "the source's copy of the key is removed once QEMU has read it"
    );

    // The key holder, through a relay that records the wire.
    let wire = RecordingLink::to(uri).await;
    let out = Outgoing::start(
        src.clone(),
        &wire.uri,
        &settings,
        Some(&key),
        OutgoingOptions::default(),
    )
    .await
    .unwrap();
    hand_over(
        &out,
        &incoming,
        &src_cfg.run_dir,
        &dst_cfg.run_dir,
        Duration::from_secs(120),
    )
    .await;
    assert!(
        !psk.exists(),
        "the destination's key is removed once the stream is in"
    );
    let (bytes, seen) = wire.saw(GUEST_MEMORY_MARK);
    eprintln!("encrypted: {bytes} bytes on the wire");
    assert!(bytes > 4 << 20, "only {bytes} bytes went through the relay");
    assert!(
        !seen,
        "guest memory readable on an encrypted migration's wire"
    );

    // Back in clear, through the same kind of relay: the guest's memory shows.
    let src = incoming.vm().clone();
    let mut plain = settings.clone();
    plain.encrypted = false;
    let back_cfg = destination(&src_cfg, dir.path(), "back", true);
    let _g3 = KillGuard(back_cfg.run_dir.clone());
    let back = IncomingMigration::prepare(back_cfg.clone(), &plain, None, LOOPBACK)
        .await
        .unwrap();
    let wire = RecordingLink::to(back.uri().unwrap()).await;
    let out = Outgoing::start(
        src.clone(),
        &wire.uri,
        &plain,
        None,
        OutgoingOptions::default(),
    )
    .await
    .unwrap();
    out.wait_pre_switchover(Duration::from_secs(120))
        .await
        .unwrap();
    out.switchover().await.unwrap();
    back.wait_received(Duration::from_secs(30)).await.unwrap();
    back.commit(&COMMIT_ANNOUNCE).await.unwrap();
    out.finish().await.unwrap();
    let (bytes, seen) = wire.saw(GUEST_MEMORY_MARK);
    eprintln!("plain: {bytes} bytes on the wire");
    assert!(
        seen,
        "the guest's kernel banner is not in a plain stream of {bytes} bytes"
    );
    back.vm().kill().await.unwrap();
}
