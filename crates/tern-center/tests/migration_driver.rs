//! The center's migration driver, stage by stage, through its real store, task runner and
//! agent client, against fake host agents that follow the agent API (the real agents and
//! QEMU are driven by the lab tests): a failure at each stage before the commit rolls back —
//! the source runs the guest, the destination is removed, the VM stays where it was — and
//! after a post-copy switchover a commit that the store keeps refusing is retried until it
//! lands, never rolled back: the destination is run, never removed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as AxPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use tern_api::agent::{CheckPaths, PathsReport, StartVm, VmRuntime};
use tern_api::center::{CreateVm, Event, Task, TaskState, Vm};
use tern_api::evc::HostCpu;
use tern_api::migration::{
    AbortMigration, AgentMigrationState, AgentMigrationStatus, BandwidthReport, BandwidthSink,
    Commit, Committed, HandedFrame, IncomingReady, MigrateVm, PrepareIncoming, QueuedFrames,
    StartOutgoing,
};
use tern_api::routes::{agent as route, center};
use tern_api::{ErrorBody, HostFacts, PowerState};
use tern_center::store::MigrationRecordState;
use tern_center::{serve, RunningCenter};
use uuid::Uuid;

mod common;
use common::{
    admin, config, facts, kernel_spec, migration_record, setup_lab, started, wait_for, wait_task,
};

// ---------- a fake agent that can fail one call ----------

#[derive(Default)]
struct FakeState {
    /// This host is the migration's source (else its destination).
    source: bool,
    /// (Source) the switchover goes post-copy.
    postcopy: bool,
    /// The call (by its name in `calls`) that answers 500.
    fail: Option<&'static str>,
    /// (Source) the QEMU dies at the switchover: the VM is crashed from then on.
    dies_at_switchover: bool,
    /// (Source) at the switchover, lock the center's store for this long before answering.
    lock_store: Option<(PathBuf, Duration)>,
    /// True while that lock is held (shared by both fakes).
    store_locked: Arc<AtomicBool>,
    /// (Source) the first time it reports the guest paused at pre-switchover, lock the
    /// center's store for this long first (the center's writes of that moment then fail).
    lock_store_at_pause: Option<(PathBuf, Duration)>,
    /// (Source) the switchover answers (or fails) only after this long.
    switchover_takes: Option<Duration>,
    /// (Destination) its status answers `listening` after holding the question this long
    /// (a long poll whose wait ran out), noting `status answered`.
    listening_for: Option<Duration>,
    /// (Source) the migration stays in pre-copy (status `active`) while set.
    hold_precopy: bool,
    /// (Source) the agent knows no migration (status 404), as after a restart without a
    /// record.
    forgot: bool,
    /// (Source) it sends its final state at the pause when asked to, and has sent it all by
    /// the time its status answers (status `completed`, never `pre_switchover`).
    sent_at_pause: bool,
    /// (Source) what the center's `outgoing` call asked: to switch over at the pause.
    asked_to_switch_over_at_pause: Option<bool>,
    vms: Vec<VmRuntime>,
    /// Migration calls in the order they came.
    calls: Vec<String>,
}

type Shared = Arc<Mutex<FakeState>>;
type R<T> = Result<T, (StatusCode, Json<ErrorBody>)>;

/// Notes a call; the error answer if it is the one to fail.
fn call(s: &Shared, name: &'static str) -> R<()> {
    let mut s = s.lock().unwrap();
    s.calls.push(name.to_string());
    if s.fail == Some(name) {
        return Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(ErrorBody {
                error: format!("injected failure at {name}"),
            }),
        ));
    }
    Ok(())
}

async fn start(
    State(s): State<Shared>,
    AxPath(id): AxPath<Uuid>,
    Json(req): Json<StartVm>,
) -> Json<VmRuntime> {
    let rt = started(id, req);
    let mut s = s.lock().unwrap();
    s.vms.retain(|v| v.id != id);
    s.vms.push(rt.clone());
    Json(rt)
}

async fn vm(State(s): State<Shared>, AxPath(id): AxPath<Uuid>) -> R<Json<VmRuntime>> {
    let s = s.lock().unwrap();
    s.vms.iter().find(|v| v.id == id).cloned().map(Json).ok_or((
        StatusCode::NOT_FOUND,
        Json(ErrorBody {
            error: "no such VM".into(),
        }),
    ))
}

async fn vms(State(s): State<Shared>) -> Json<Vec<VmRuntime>> {
    Json(s.lock().unwrap().vms.clone())
}

async fn delete_vm(State(s): State<Shared>, AxPath(id): AxPath<Uuid>) -> StatusCode {
    let mut s = s.lock().unwrap();
    s.calls.push("delete".into());
    s.vms.retain(|v| v.id != id);
    StatusCode::NO_CONTENT
}

async fn check_paths(Json(_): Json<CheckPaths>) -> Json<PathsReport> {
    Json(PathsReport::default())
}

const LISTEN_URI: &str = "tcp:127.0.0.1:49152";

/// Starts the destination; given the settings it also listens (one call instead of two).
async fn incoming(
    State(s): State<Shared>,
    AxPath(_): AxPath<Uuid>,
    Json(req): Json<PrepareIncoming>,
) -> R<Json<IncomingReady>> {
    call(&s, "incoming")?;
    if req.settings.is_some() {
        s.lock()
            .unwrap()
            .calls
            .push("incoming with settings".into());
    }
    Ok(Json(IncomingReady {
        uri: req
            .settings
            .map(|_| LISTEN_URI.parse().expect("a tcp target")),
    }))
}

async fn bandwidth_sink(State(s): State<Shared>) -> R<Json<BandwidthSink>> {
    call(&s, "sink")?;
    Ok(Json(BandwidthSink {
        address: "127.0.0.1:49153".into(),
    }))
}

async fn bandwidth_probe(State(s): State<Shared>) -> R<Json<BandwidthReport>> {
    call(&s, "probe")?;
    Ok(Json(BandwidthReport {
        bytes: 100 << 20,
        elapsed_ms: 100,
        mbit_s: 8390.0,
    }))
}

async fn listen(State(s): State<Shared>, AxPath(_): AxPath<Uuid>) -> R<Json<IncomingReady>> {
    call(&s, "listen")?;
    Ok(Json(IncomingReady {
        uri: Some(LISTEN_URI.parse().expect("a tcp target")),
    }))
}

async fn outgoing(
    State(s): State<Shared>,
    AxPath(_): AxPath<Uuid>,
    Json(req): Json<StartOutgoing>,
) -> R<StatusCode> {
    call(&s, "outgoing")?;
    s.lock().unwrap().asked_to_switch_over_at_pause = Some(req.switch_over_at_pause);
    Ok(StatusCode::NO_CONTENT)
}

/// The source is at pre-switchover at once; the destination holds the guest after it.
async fn status(
    State(s): State<Shared>,
    AxPath(id): AxPath<Uuid>,
) -> R<Json<AgentMigrationStatus>> {
    call(&s, "status")?;
    let (source, hold, forgot, sent) = {
        let s = s.lock().unwrap();
        let sent = s.sent_at_pause;
        (s.source, s.hold_precopy, s.forgot, sent)
    };
    if source && forgot {
        return Err((
            StatusCode::NOT_FOUND,
            Json(ErrorBody {
                error: format!("no migration of VM {id} on this host"),
            }),
        ));
    }
    let state = match (source, hold) {
        (true, true) => AgentMigrationState::Active,
        (true, false) if sent => AgentMigrationState::Completed,
        (true, false) => AgentMigrationState::PreSwitchover,
        (false, _) => AgentMigrationState::Completed,
    };
    let (lock, listening_for) = {
        let mut s = s.lock().unwrap();
        let lock = match state {
            AgentMigrationState::PreSwitchover => s.lock_store_at_pause.take(),
            _ => None,
        };
        (lock, s.listening_for.filter(|_| !source))
    };
    if let Some((db, hold)) = lock {
        lock_store(db, hold, Arc::new(AtomicBool::new(false))).await;
    }
    if let Some(held) = listening_for {
        tokio::time::sleep(held).await;
        s.lock().unwrap().calls.push("status answered".into());
        return Ok(Json(AgentMigrationStatus::new(
            id,
            AgentMigrationState::Listening,
        )));
    }
    Ok(Json(AgentMigrationStatus::new(id, state)))
}

/// Locks the center's store (`db`) for `hold` from another connection, as another writer
/// would; returns once the lock is held. `flag` says while it is. The lock is taken on a
/// thread of its own and awaited, so that the center (on this runtime) can finish a write it
/// is in the middle of (its record goes beside the switchover).
async fn lock_store(db: PathBuf, hold: Duration, flag: Arc<AtomicBool>) {
    let (locked, taken) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.busy_timeout(Duration::from_secs(30)).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        flag.store(true, Ordering::SeqCst);
        locked.send(()).unwrap();
        std::thread::sleep(hold);
        flag.store(false, Ordering::SeqCst);
        conn.execute_batch("COMMIT").unwrap();
    });
    taken.await.unwrap();
}

async fn steer(State(s): State<Shared>, AxPath(id): AxPath<Uuid>) -> R<Json<AgentMigrationStatus>> {
    call(&s, "steer")?;
    Ok(Json(AgentMigrationStatus::new(
        id,
        AgentMigrationState::Listening,
    )))
}

async fn switchover(
    State(s): State<Shared>,
    AxPath(id): AxPath<Uuid>,
) -> R<Json<AgentMigrationStatus>> {
    let takes = s.lock().unwrap().switchover_takes;
    if let Some(takes) = takes {
        tokio::time::sleep(takes).await;
    }
    call(&s, "switchover")?;
    {
        let mut s = s.lock().unwrap();
        if s.dies_at_switchover {
            for v in s.vms.iter_mut().filter(|v| v.id == id) {
                v.state = PowerState::Crashed;
                v.pid = None;
                v.exit_reason = Some("killed by signal 9".into());
            }
            return Err((
                StatusCode::BAD_GATEWAY,
                Json(ErrorBody {
                    error: "the source QEMU ended: killed by signal 9".into(),
                }),
            ));
        }
    }
    let (postcopy, lock, flag) = {
        let s = s.lock().unwrap();
        (s.postcopy, s.lock_store.clone(), s.store_locked.clone())
    };
    if let Some((db, hold)) = lock {
        // Taken before answering, so the center's commit starts while the store is locked.
        lock_store(db, hold, flag).await;
    }
    Ok(Json(AgentMigrationStatus {
        postcopy,
        ..AgentMigrationStatus::new(id, AgentMigrationState::Completed)
    }))
}

async fn commit(
    State(s): State<Shared>,
    AxPath(_): AxPath<Uuid>,
    Json(c): Json<Commit>,
) -> R<Json<Committed>> {
    call(&s, "commit")?;
    let mut s = s.lock().unwrap();
    if s.store_locked.load(Ordering::SeqCst) {
        s.calls.push("commit while the store was locked".into());
    }
    for v in &mut s.vms {
        v.state = PowerState::Running;
        v.generation = c.generation;
    }
    Ok(Json(Committed::default()))
}

/// The destination's taps hold one frame for the VM when a rollback asks for them.
async fn frames(State(s): State<Shared>) -> R<Json<QueuedFrames>> {
    call(&s, "frames")?;
    let mut data = vec![0u8; 60];
    data[..6].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
    Ok(Json(QueuedFrames {
        frames: vec![HandedFrame {
            nic: 0,
            header: Default::default(),
            data,
        }],
        ..QueuedFrames::default()
    }))
}

async fn abort(
    State(s): State<Shared>,
    AxPath(id): AxPath<Uuid>,
    Json(req): Json<AbortMigration>,
) -> R<StatusCode> {
    call(&s, "abort")?;
    let mut s = s.lock().unwrap();
    if !req.frames.is_empty() {
        s.calls
            .push(format!("abort with {} frame(s)", req.frames.len()));
    }
    if s.source && s.postcopy {
        return Err((
            StatusCode::CONFLICT,
            Json(ErrorBody {
                error: "the migration went post-copy: the source cannot resume".into(),
            }),
        ));
    }
    if !s.source {
        s.vms.retain(|v| v.id != id);
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn finish(State(s): State<Shared>, AxPath(id): AxPath<Uuid>) -> R<StatusCode> {
    call(&s, "finish")?;
    s.lock().unwrap().vms.retain(|v| v.id != id);
    Ok(StatusCode::NO_CONTENT)
}

struct FakeAgent {
    url: String,
    state: Shared,
}

impl FakeAgent {
    async fn start(source: bool) -> FakeAgent {
        let state = Arc::new(Mutex::new(FakeState {
            source,
            ..FakeState::default()
        }));
        let app = Router::new()
            .route(route::CHECK_PATHS.template(), post(check_paths))
            .route(route::VMS.template(), get(vms))
            .route(route::VM.template(), get(vm).put(start).delete(delete_vm))
            .route(route::MIGRATION.template(), get(status))
            .route(route::MIGRATION_INCOMING.template(), post(incoming))
            .route(route::BANDWIDTH_SINK.template(), post(bandwidth_sink))
            .route(route::BANDWIDTH_PROBE.template(), post(bandwidth_probe))
            .route(route::MIGRATION_LISTEN.template(), post(listen))
            .route(route::MIGRATION_OUTGOING.template(), post(outgoing))
            .route(route::MIGRATION_STEER.template(), post(steer))
            .route(route::MIGRATION_SWITCHOVER.template(), post(switchover))
            .route(route::MIGRATION_COMMIT.template(), post(commit))
            .route(route::MIGRATION_ABORT.template(), post(abort))
            .route(route::MIGRATION_FRAMES.template(), post(frames))
            .route(route::MIGRATION_FINISH.template(), post(finish))
            .with_state(state.clone());
        let url = common::serve_router(app).await;
        FakeAgent { url, state }
    }

    fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }
}

// ---------- the scenario ----------

/// Facts of a host whose agent probed its CPU (both hosts alike).
fn probed() -> HostFacts {
    // x86-64-v2, the baseline the center gives a VM when its cluster sets no EVC mode.
    let features: Vec<String> = "apic clflush cmov cx16 cx8 de fpu fxsr hypervisor lahf-lm lm \
                                 mca mce mmx msr mtrr nx pae pat pge pni popcnt pse pse36 sep \
                                 sse sse2 sse4.1 sse4.2 ssse3 syscall tsc"
        .split_whitespace()
        .map(String::from)
        .collect();
    HostFacts {
        cpu_capability: features.clone(),
        cpu: Some(HostCpu {
            vendor: Some("GenuineIntel".into()),
            uncapped: features,
            ..HostCpu::default()
        }),
        ..facts(4, 8192)
    }
}

/// A center with hosts h1 (source) and h2, and VM `web` running on h1.
async fn running_vm(dir: &Path) -> (RunningCenter, FakeAgent, FakeAgent, Vm) {
    // Hosts stay connected without heartbeats for the whole test.
    let c: RunningCenter = serve(config(dir, 120_000)).await.unwrap();
    let h1 = FakeAgent::start(true).await;
    let h2 = FakeAgent::start(false).await;
    setup_lab(
        &c,
        vec![
            ("h1", probed(), h1.url.clone()),
            ("h2", probed(), h2.url.clone()),
        ],
    )
    .await;
    let _: Vm = admin(&c)
        .post(
            &center::VMS.path(),
            &CreateVm {
                image: None,
                spec: kernel_spec("web", "52:54:00:00:00:01", 256),
                cluster: "lab".into(),
                host: Some("h1".into()),
            },
        )
        .await
        .unwrap();
    let t: Task = admin(&c)
        .post(&center::VM_START.with_name("web").unwrap(), &())
        .await
        .unwrap();
    assert_eq!(wait_task(&c, t.id).await.state, TaskState::Succeeded);
    let vm: Vm = admin(&c)
        .get(&center::VM.with_name("web").unwrap())
        .await
        .unwrap();
    assert_eq!(vm.actual_state, PowerState::Running);
    (c, h1, h2, vm)
}

/// Asks for a migration of `web` to h2; returns its task at once.
async fn start_migration(c: &RunningCenter, allow_postcopy: bool) -> Task {
    admin(c)
        .post(
            &center::VM_MIGRATE.with_name("web").unwrap(),
            &MigrateVm {
                to: "h2".into(),
                downtime_ms: None,
                deadline_ms: None,
                bandwidth_mbit: None,
                allow_postcopy,
                dry_run: false,
                probe_link: false,
            },
        )
        .await
        .unwrap()
}

/// Migrates `web` to h2 and waits (up to `secs`) for the task to end.
async fn migrate(c: &RunningCenter, allow_postcopy: bool, secs: u64) -> Task {
    let t = start_migration(c, allow_postcopy).await;
    let api = admin(c);
    wait_for("the migration to end", secs, || {
        let api = api.clone();
        async move {
            let t: Task = api.get(&center::TASK.with_id(t.id)).await.unwrap();
            t.state.is_done().then_some(t)
        }
    })
    .await
}

async fn task_events(c: &RunningCenter, task: Uuid) -> Vec<String> {
    let events: Vec<Event> = admin(c)
        .get(&format!("{}?limit=500", center::EVENTS.path()))
        .await
        .unwrap();
    events
        .into_iter()
        .filter(|e| e.task == Some(task))
        .map(|e| e.message)
        .collect()
}

/// A failure at `call` on `host` (1 = source, 2 = destination) rolls the migration back:
/// the task fails, the VM stays on h1 under its generation, the destination's copy is gone
/// and the source's runs.
async fn rolls_back_when(host: u8, failing: &'static str) {
    let dir = tempfile::tempdir().unwrap();
    let (c, h1, h2, vm) = running_vm(dir.path()).await;
    let target = if host == 1 { &h1 } else { &h2 };
    target.with(|s| s.fail = Some(failing));

    let t = migrate(&c, false, 60).await;
    assert_eq!(t.state, TaskState::Failed, "{failing}: {t:?}");
    let err = t.error.clone().unwrap_or_default();
    assert!(err.contains("injected failure"), "{failing}: {err}");
    let now: Vm = admin(&c)
        .get(&center::VM.with_name("web").unwrap())
        .await
        .unwrap();
    assert_eq!(now.host.as_deref(), Some("h1"), "{failing}: {now:?}");
    assert_eq!(now.generation, vm.generation, "{failing}");
    assert_eq!(
        migration_record(dir.path(), t.id),
        MigrationRecordState::RolledBack
    );
    // The destination was told to go (once it had been asked to start) and never to run.
    let (c1, c2) = (h1.calls(), h2.calls());
    assert!(!c2.contains(&"commit".to_string()), "{failing}: {c2:?}");
    assert!(c2.contains(&"abort".to_string()), "{failing}: {c2:?}");
    // The source is told to cancel once it had been asked to send.
    assert_eq!(
        c1.contains(&"abort".to_string()),
        c1.contains(&"outgoing".to_string()),
        "{failing}: {c1:?}"
    );
    assert!(!c1.contains(&"finish".to_string()), "{failing}: {c1:?}");
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_destination_that_cannot_start_rolls_back() {
    rolls_back_when(2, "incoming").await;
}

#[tokio::test]
async fn a_failed_link_probe_assumes_a_speed_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (c, h1, _h2, _vm) = running_vm(dir.path()).await;
    h1.with(|s| s.fail = Some("probe"));
    let t = migrate(&c, false, 60).await;
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    let events = task_events(&c, t.id).await;
    assert!(
        events
            .iter()
            .any(|e| e.contains("bandwidth probe failed") && e.contains("injected failure")),
        "{events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.contains("no measurement, assuming")),
        "{events:#?}"
    );
    c.shutdown().await.unwrap();
}

/// The link measured for one migration stands for the next between the same hosts: no probe,
/// and the destination starts listening in the same call that starts it.
#[tokio::test]
async fn a_link_measured_once_is_not_probed_again() {
    let dir = tempfile::tempdir().unwrap();
    let (c, h1, h2, _vm) = running_vm(dir.path()).await;
    // The first attempt measures the link, then fails at the source (rolled back).
    h1.with(|s| s.fail = Some("outgoing"));
    let t = migrate(&c, false, 60).await;
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
    let count = |calls: &[String], name: &str| calls.iter().filter(|c| *c == name).count();
    assert_eq!(count(&h1.calls(), "probe"), 1, "{:?}", h1.calls());
    assert_eq!(count(&h2.calls(), "listen"), 1, "{:?}", h2.calls());
    let events = task_events(&c, t.id).await;
    assert!(
        events
            .iter()
            .any(|e| e.contains("measured: link") && e.contains("8390 Mbit/s")),
        "{events:#?}"
    );

    h1.with(|s| s.fail = None);
    let t = migrate(&c, false, 60).await;
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    let (c1, c2) = (h1.calls(), h2.calls());
    assert_eq!(count(&c1, "probe"), 1, "probed again: {c1:?}");
    assert_eq!(count(&c2, "sink"), 1, "probed again: {c2:?}");
    assert_eq!(count(&c2, "listen"), 1, "listened in a second call: {c2:?}");
    assert_eq!(count(&c2, "incoming with settings"), 1, "{c2:?}");
    let events = task_events(&c, t.id).await;
    assert!(
        events
            .iter()
            .any(|e| e.contains("8390 Mbit/s, measured") && e.contains("not probed again")),
        "{events:#?}"
    );
    let result: tern_api::migration::MigrationResult =
        serde_json::from_value(t.result.clone().expect("a result")).expect("a migration result");
    assert_eq!(result.measurements.link_mbit, 8390.0);
    assert!(result.measurements.link_age_s.is_some(), "{result:?}");
    assert_eq!(result.measurements.dirty_rate_mib_s, None);
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_destination_that_cannot_listen_rolls_back() {
    rolls_back_when(2, "listen").await;
}

/// A switchover that fails after the destination steered the LAN: the source steers it back,
/// then the destination hands over what its taps queued meanwhile, and the source gets those
/// frames with its abort (to deliver before its guest resumes); only then is the destination
/// removed.
#[tokio::test]
async fn a_rollback_after_the_steer_hands_the_steered_frames_back() {
    let dir = tempfile::tempdir().unwrap();
    let (c, h1, h2, _vm) = running_vm(dir.path()).await;
    h1.with(|s| s.fail = Some("switchover"));
    let t = migrate(&c, false, 60).await;
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
    let (c1, c2) = (h1.calls(), h2.calls());
    let at = |calls: &[String], name: &str| {
        calls
            .iter()
            .rposition(|c| c == name)
            .unwrap_or_else(|| panic!("no {name}: {calls:?}"))
    };
    // The source steers back after the failed switchover, then aborts with the frame.
    assert!(at(&c1, "switchover") < at(&c1, "steer"), "{c1:?}");
    assert!(at(&c1, "steer") < at(&c1, "abort"), "{c1:?}");
    assert!(c1.contains(&"abort with 1 frame(s)".to_string()), "{c1:?}");
    // The destination steered first, gave its frames up, and was removed after.
    assert!(at(&c2, "steer") < at(&c2, "frames"), "{c2:?}");
    assert!(at(&c2, "frames") < at(&c2, "abort"), "{c2:?}");
    let events = task_events(&c, t.id).await;
    assert!(
        events.iter().any(|e| e.contains(
            "1 frame(s) that reached h2 after the LAN was steered there handed back to h1"
        )),
        "{events:#?}"
    );
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_source_that_cannot_send_rolls_back() {
    rolls_back_when(1, "outgoing").await;
}

#[tokio::test]
async fn a_failed_switchover_rolls_back() {
    rolls_back_when(1, "switchover").await;
}

#[tokio::test]
async fn a_destination_that_did_not_load_the_state_rolls_back() {
    rolls_back_when(2, "status").await;
}

/// Task `t` succeeded: VM `web` (as `vm` was before) is owned by h2 under the next
/// generation, and its migration record is done.
async fn moved_to_h2(c: &RunningCenter, dir: &Path, t: &Task, vm: &Vm) {
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    let now: Vm = admin(c)
        .get(&center::VM.with_name("web").unwrap())
        .await
        .unwrap();
    assert_eq!(now.host.as_deref(), Some("h2"), "{now:?}");
    assert_eq!(now.generation, vm.generation + 1);
    assert_eq!(migration_record(dir, t.id), MigrationRecordState::Done);
}

/// The source fails the switchover while the destination holds the center's question
/// whether it loaded the state (asked during the final copy): the rollback goes ahead without
/// waiting for that answer.
#[tokio::test]
async fn a_failed_switchover_does_not_wait_for_the_destinations_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (c, h1, h2, _vm) = running_vm(dir.path()).await;
    // The source fails after a second of final copy; the destination holds its answer four.
    h1.with(|s| {
        s.fail = Some("switchover");
        s.switchover_takes = Some(Duration::from_secs(1));
    });
    h2.with(|s| s.listening_for = Some(Duration::from_secs(4)));
    let t = migrate(&c, false, 60).await;
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
    assert_eq!(
        migration_record(dir.path(), t.id),
        MigrationRecordState::RolledBack
    );
    let c2 = h2.calls();
    let asked = c2.iter().position(|c| c == "status");
    let aborted = c2.iter().position(|c| c == "abort");
    let answered = c2.iter().position(|c| c == "status answered");
    assert!(asked.is_some() && aborted.is_some(), "{c2:?}");
    assert!(
        answered.is_none_or(|a| Some(a) > aborted),
        "the rollback waited for the destination's answer: {c2:?}"
    );
    c.shutdown().await.unwrap();
}

/// The store is locked (another writer) when the source pauses the guest, longer than the
/// store waits: the record cannot say the state is being sent. That write guards nothing —
/// the commit moves the record from where it is — so the migration goes on, says so, and
/// commits once the store is free.
#[tokio::test]
async fn a_record_the_store_refuses_at_the_pause_leaves_the_decision_to_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (c, h1, h2, vm) = running_vm(dir.path()).await;
    // The store waits 5 s for a lock: held 8 s, the record's write fails whatever the
    // scheduling, and the commit after it finds the store free within its own wait.
    let db = dir.path().join("center/center.db");
    h1.with(|s| s.lock_store_at_pause = Some((db, Duration::from_secs(8))));
    let t = migrate(&c, false, 90).await;
    moved_to_h2(&c, dir.path(), &t, &vm).await;
    assert!(h2.calls().contains(&"commit".to_string()));
    let events = task_events(&c, t.id).await;
    let said = events
        .iter()
        .find(|m| m.contains("the record could not say"))
        .unwrap_or_else(|| panic!("no event tells of the refused record: {events:#?}"));
    assert!(said.contains("database is locked"), "{said}");
    c.shutdown().await.unwrap();
}

/// The center does not let the source send its final state unasked (a center that hung right
/// after would then hold the guest paused past the watchdog's bound), yet a source that has
/// sent it all before the center heard of its pause (an agent asked by an earlier center) is
/// switched over and committed like one caught at the pause.
#[tokio::test]
async fn a_source_that_sent_everything_before_the_center_heard_of_its_pause_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let (c, h1, h2, vm) = running_vm(dir.path()).await;
    h1.with(|s| s.sent_at_pause = true);
    let t = migrate(&c, false, 60).await;
    assert_eq!(
        h1.with(|s| s.asked_to_switch_over_at_pause),
        Some(false),
        "the center let the source switch over unasked: a center hung after its last status \
         call would hold the guest paused"
    );
    moved_to_h2(&c, dir.path(), &t, &vm).await;
    assert!(
        h2.calls().contains(&"commit".to_string()),
        "{:?}",
        h2.calls()
    );
    c.shutdown().await.unwrap();
}

/// The source QEMU itself dies at the switchover: the migration rolls back (nothing was
/// committed), and the task says the VM crashed on the source and how to start it — not that
/// it "runs as before".
#[tokio::test]
async fn a_source_that_dies_is_not_said_to_run_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let (c, h1, _h2, _vm) = running_vm(dir.path()).await;
    h1.with(|s| s.dies_at_switchover = true);
    let t = migrate(&c, false, 60).await;
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
    assert_eq!(
        migration_record(dir.path(), t.id),
        MigrationRecordState::RolledBack
    );
    let events = task_events(&c, t.id).await;
    let summary = events
        .iter()
        .find(|e| e.contains("rolled back"))
        .unwrap_or_else(|| panic!("no rollback summary: {events:#?}"));
    assert!(!summary.contains("as before"), "{summary}");
    assert!(
        summary.contains("crashed on h1") && summary.contains("tern vm start web"),
        "{summary}"
    );
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_whole_migration_commits_and_runs_the_destination() {
    let dir = tempfile::tempdir().unwrap();
    let (c, h1, h2, vm) = running_vm(dir.path()).await;
    let t = migrate(&c, false, 60).await;
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_eq!(t.progress, 100);
    let now: Vm = admin(&c)
        .get(&center::VM.with_name("web").unwrap())
        .await
        .unwrap();
    assert_eq!(now.host.as_deref(), Some("h2"));
    assert_eq!(now.generation, vm.generation + 1);
    assert_eq!(
        migration_record(dir.path(), t.id),
        MigrationRecordState::Done
    );
    assert!(h2.calls().contains(&"commit".to_string()));
    assert!(!h2.calls().contains(&"abort".to_string()));
    assert!(
        h1.calls().ends_with(&["finish".to_string()]),
        "{:?}",
        h1.calls()
    );
    c.shutdown().await.unwrap();
}

/// After a post-copy switchover the store refuses the commit (another writer holds its lock
/// longer than the store waits): the destination runs the guest at once anyway (the source can
/// never resume), the driver keeps trying the commit instead of rolling back, and once the
/// store takes it the source is finished. Nothing ever asks the destination to go.
#[tokio::test]
async fn after_postcopy_a_commit_the_store_refuses_is_retried_never_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let (c, h1, h2, vm) = running_vm(dir.path()).await;
    // The store waits 5 s for a lock: held 12 s, the first commit attempt (and the one 2 s
    // later) must fail whatever the scheduling.
    let db = dir.path().join("center/center.db");
    let locked = Arc::new(AtomicBool::new(false));
    h1.with(|s| {
        s.postcopy = true;
        s.lock_store = Some((db, Duration::from_secs(12)));
        s.store_locked = locked.clone();
    });
    h2.with(|s| s.store_locked = locked.clone());

    let t = migrate(&c, true, 90).await;
    moved_to_h2(&c, dir.path(), &t, &vm).await;
    let (c1, c2) = (h1.calls(), h2.calls());
    assert!(!c2.contains(&"abort".to_string()), "{c2:?}");
    assert!(!c2.contains(&"delete".to_string()), "{c2:?}");
    assert!(c2.contains(&"commit".to_string()), "{c2:?}");
    // The guest ran on the destination at once, not only once the store took the commit.
    assert!(
        c2.contains(&"commit while the store was locked".to_string()),
        "{c2:?}"
    );
    assert!(!c1.contains(&"abort".to_string()), "{c1:?}");
    assert!(c1.ends_with(&["finish".to_string()]), "{c1:?}");
    let events = task_events(&c, t.id).await;
    let retried = events
        .iter()
        .find(|m| m.contains("committed after"))
        .unwrap_or_else(|| panic!("no event tells of the retried commit: {events:#?}"));
    assert!(retried.contains("database is locked"), "{retried}");
    c.shutdown().await.unwrap();
}

/// Starts a migration of `web` to h2 whose source stays in pre-copy; returns once the source
/// was told to send.
async fn migrate_held_in_precopy(c: &RunningCenter, h1: &FakeAgent) -> Task {
    h1.with(|s| s.hold_precopy = true);
    let t = start_migration(c, false).await;
    wait_for("the source to be told to send", 30, || {
        let calls = h1.calls();
        async move { calls.contains(&"outgoing".to_string()).then_some(()) }
    })
    .await;
    t
}

/// The center restarts while the source copies in pre-copy (issue 18): the restarted center
/// drives the migration on from its store and the source's word — the task keeps running and
/// says so, and once the source reaches pre-switchover the hand-over commits as usual.
#[tokio::test]
async fn a_restarted_center_drives_on_a_migration_left_in_precopy() {
    let dir = tempfile::tempdir().unwrap();
    let (c, h1, h2, vm) = running_vm(dir.path()).await;
    let t = migrate_held_in_precopy(&c, &h1).await;
    c.shutdown().await.unwrap();

    let c: RunningCenter = serve(config(dir.path(), 120_000)).await.unwrap();
    let now: Task = admin(&c).get(&center::TASK.with_id(t.id)).await.unwrap();
    assert_eq!(now.state, TaskState::Running, "{now:?}");
    assert_eq!(
        migration_record(dir.path(), t.id),
        MigrationRecordState::Preparing
    );
    let events = task_events(&c, t.id).await;
    assert!(
        events.iter().any(|e| e.contains("driven on from there")),
        "{events:#?}"
    );
    h1.with(|s| s.hold_precopy = false);
    let done = wait_task(&c, t.id).await;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    assert_eq!(
        migration_record(dir.path(), t.id),
        MigrationRecordState::Done
    );
    let moved: Vm = admin(&c)
        .get(&center::VM.with_name("web").unwrap())
        .await
        .unwrap();
    assert_eq!(moved.host.as_deref(), Some("h2"), "{moved:?}");
    assert_eq!(moved.generation, vm.generation + 1);
    // The source was never told to send twice, nor to cancel.
    let c1 = h1.calls();
    assert_eq!(c1.iter().filter(|c| *c == "outgoing").count(), 1, "{c1:?}");
    assert!(!c1.contains(&"abort".to_string()), "{c1:?}");
    assert!(h2.calls().contains(&"commit".to_string()));
    c.shutdown().await.unwrap();
}

/// The center restarts while a migration's source no longer knows it (its agent restarted
/// without a record): nothing to drive on, so the restarted center fails the task and rolls
/// the migration back by the ownership rule.
#[tokio::test]
async fn a_restarted_center_rolls_back_a_migration_its_source_forgot() {
    let dir = tempfile::tempdir().unwrap();
    let (c, h1, h2, vm) = running_vm(dir.path()).await;
    let t = migrate_held_in_precopy(&c, &h1).await;
    c.shutdown().await.unwrap();
    h1.with(|s| s.forgot = true);

    let c: RunningCenter = serve(config(dir.path(), 120_000)).await.unwrap();
    let now: Task = admin(&c).get(&center::TASK.with_id(t.id)).await.unwrap();
    assert_eq!(now.state, TaskState::Failed, "{now:?}");
    assert_eq!(
        now.error.as_deref(),
        Some("center restarted during the task")
    );
    wait_for("the rollback to settle", 30, || {
        let calls = h2.calls();
        async move { calls.contains(&"abort".to_string()).then_some(()) }
    })
    .await;
    let still: Vm = admin(&c)
        .get(&center::VM.with_name("web").unwrap())
        .await
        .unwrap();
    assert_eq!(still.host.as_deref(), Some("h1"), "{still:?}");
    assert_eq!(still.generation, vm.generation);
    assert!(!h2.calls().contains(&"commit".to_string()));
    c.shutdown().await.unwrap();
}
