//! Maintenance mode through the center's real API, with fake host agents: the flag's
//! transitions (enter, again, exit, exit again), what a host in maintenance refuses, a running
//! VM no host has room for (the task fails, naming it; the host stays flagged), a stopped VM
//! re-homed by the scheduler (ownership moved, the old host told to forget it), and the
//! refusals (unknown host, bad body, disconnected host).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::extract::{Path as AxPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use tern_api::agent::{CheckPaths, PathsReport, StartVm, VmRuntime};
use tern_api::center::{
    CreateVm, Event, Host, HostMaintenance, MaintenanceAction, MaintenanceResult, StopVm, Task,
    TaskKind, TaskState, Vm,
};
use tern_api::{ApiError, ErrorBody, HostState, PowerState};
use tern_center::{serve, RunningCenter};
use uuid::Uuid;

mod common;
use common::{
    admin, config, facts, kernel_spec, raw, setup_lab, started, status, wait_for, wait_task,
};

// ---------- a fake agent: starts, stops, deletes and path checks, all in memory ----------

#[derive(Default)]
struct FakeState {
    vms: HashMap<Uuid, VmRuntime>,
    /// Paths check-paths reports outside the shared storage.
    outside: HashSet<String>,
    /// Starts never answer (the VM stays busy with its start task).
    hang_starts: bool,
    calls: Vec<String>,
}

type Shared = Arc<Mutex<FakeState>>;
type R<T> = Result<T, (StatusCode, Json<ErrorBody>)>;

fn gone() -> (StatusCode, Json<ErrorBody>) {
    (
        StatusCode::NOT_FOUND,
        Json(ErrorBody {
            error: "no such VM".into(),
        }),
    )
}

async fn check(State(s): State<Shared>, Json(req): Json<CheckPaths>) -> Json<PathsReport> {
    let s = s.lock().unwrap();
    Json(PathsReport {
        unreachable: vec![],
        missing: vec![],
        outside_shared_storage: req
            .paths
            .into_iter()
            .filter(|p| s.outside.contains(p))
            .collect(),
    })
}

async fn start(
    State(s): State<Shared>,
    AxPath(id): AxPath<Uuid>,
    Json(req): Json<StartVm>,
) -> Json<VmRuntime> {
    let rt = started(id, req);
    let hang = {
        let mut s = s.lock().unwrap();
        s.calls.push(format!("start {id}"));
        s.vms.insert(id, rt.clone());
        s.hang_starts
    };
    if hang {
        std::future::pending::<()>().await;
    }
    Json(rt)
}

async fn stop(
    State(s): State<Shared>,
    AxPath(id): AxPath<Uuid>,
    Json(_): Json<StopVm>,
) -> R<Json<VmRuntime>> {
    let mut s = s.lock().unwrap();
    let rt = s.vms.get_mut(&id).ok_or_else(gone)?;
    rt.state = PowerState::Stopped;
    rt.pid = None;
    Ok(Json(rt.clone()))
}

async fn vm(State(s): State<Shared>, AxPath(id): AxPath<Uuid>) -> R<Json<VmRuntime>> {
    let s = s.lock().unwrap();
    s.vms.get(&id).cloned().map(Json).ok_or_else(gone)
}

async fn delete(State(s): State<Shared>, AxPath(id): AxPath<Uuid>) -> StatusCode {
    let mut s = s.lock().unwrap();
    s.calls.push(format!("delete {id}"));
    s.vms.remove(&id);
    StatusCode::NO_CONTENT
}

struct FakeAgent {
    url: String,
    state: Shared,
}

impl FakeAgent {
    async fn start() -> FakeAgent {
        let state = Shared::default();
        let app = Router::new()
            .route("/v1/check-paths", post(check))
            .route("/v1/vms/{id}", get(vm).put(start).delete(delete))
            .route("/v1/vms/{id}/stop", post(stop))
            .with_state(state.clone());
        let url = common::serve_router(app).await;
        FakeAgent { url, state }
    }

    fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }
}

// ---------- helpers ----------

async fn setup(c: &RunningCenter, hosts: &[(&str, u64, &FakeAgent)]) {
    let hosts = hosts
        .iter()
        .map(|(name, memory_mib, agent)| (*name, facts(4, *memory_mib), agent.url.clone()))
        .collect();
    setup_lab(c, hosts).await;
}

async fn create(c: &RunningCenter, name: &str, host: &str, mac: &str, memory_mib: u64) -> Vm {
    admin(c)
        .post("/api/v1/vms", &create_body(name, host, mac, memory_mib))
        .await
        .unwrap()
}

fn create_body(name: &str, host: &str, mac: &str, memory_mib: u64) -> CreateVm {
    CreateVm {
        image: None,
        spec: kernel_spec(name, mac, memory_mib),
        cluster: "lab".into(),
        host: Some(host.into()),
    }
}

async fn maintenance(
    c: &RunningCenter,
    host: &str,
    action: MaintenanceAction,
) -> Result<Task, ApiError> {
    admin(c)
        .post(
            &format!("/api/v1/hosts/{host}/maintenance"),
            &HostMaintenance { action },
        )
        .await
}

async fn host(c: &RunningCenter, name: &str) -> Host {
    admin(c)
        .get(&format!("/api/v1/hosts/{name}"))
        .await
        .unwrap()
}

async fn get_vm(c: &RunningCenter, name: &str) -> Vm {
    admin(c).get(&format!("/api/v1/vms/{name}")).await.unwrap()
}

fn result(t: &Task) -> MaintenanceResult {
    serde_json::from_value(t.result.clone().expect("a maintenance result")).unwrap()
}

// ---------- tests ----------

#[tokio::test]
async fn maintenance_flag_transitions_blockers_and_rehoming() {
    let dir = tempfile::tempdir().unwrap();
    let c = serve(config(dir.path(), 60_000)).await.unwrap();
    let (a1, a2) = (FakeAgent::start().await, FakeAgent::start().await);
    // h2 is small and its agent reports no CPU capability: it can take the stopped 64 MiB VM
    // (its CPU is resolved afresh at power-on), not the running 1 GiB one (whose CPU cannot
    // be checked there).
    setup(&c, &[("h1", 8192, &a1), ("h2", 512, &a2)]).await;
    let api = admin(&c);

    // Refusals that change nothing.
    let (code, msg) = status(maintenance(&c, "nosuch", MaintenanceAction::Enter).await);
    assert_eq!(code, 404, "{msg}");
    assert!(msg.contains("nosuch"), "{msg}");
    let resp = raw()
        .post(format!("{}/api/v1/hosts/h1/maintenance", c.url()))
        .bearer_auth(&c.admin_token)
        .json(&serde_json::json!({"action": "sideways"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(host(&c, "h1").await.state, HostState::Connected);

    let big = create(&c, "big", "h1", "52:54:00:00:00:01", 1024).await;
    let small = create(&c, "small", "h1", "52:54:00:00:00:02", 64).await;
    let t: Task = api.post("/api/v1/vms/big/start", &()).await.unwrap();
    assert_eq!(wait_task(&c, t.id).await.state, TaskState::Succeeded);

    // Enter: flagged at once; big has nowhere to go, small is re-homed to h2.
    let t = maintenance(&c, "h1", MaintenanceAction::Enter)
        .await
        .unwrap();
    assert_eq!(t.kind, TaskKind::HostMaintenanceEnter);
    assert_eq!(t.host.as_deref(), Some("h1"));
    let done = wait_task(&c, t.id).await;
    assert_eq!(done.state, TaskState::Failed, "{done:?}");
    let err = done.error.clone().unwrap_or_default();
    assert!(
        err.contains("host h1 stays in maintenance; VMs still on it: big (")
            && err.contains("pre-check cpu")
            && err.contains("reported no CPU capability"),
        "{err}"
    );
    assert!(!err.contains("small"), "{err}");
    let r = result(&done);
    assert!(r.migrated.is_empty(), "{r:?}");
    assert_eq!(r.rehomed.len(), 1, "{r:?}");
    assert_eq!(
        (r.rehomed[0].vm.as_str(), r.rehomed[0].to.as_str()),
        ("small", "h2")
    );
    assert_eq!(host(&c, "h1").await.state, HostState::Maintenance);
    let s = get_vm(&c, "small").await;
    assert_eq!(s.host.as_deref(), Some("h2"));
    assert_eq!(s.generation, small.generation + 1);
    assert!(a1.calls().contains(&format!("delete {}", small.id)));
    let b = get_vm(&c, "big").await;
    assert_eq!(
        (b.host.as_deref(), b.actual_state, b.generation),
        (Some("h1"), PowerState::Running, big.generation)
    );
    let events: Vec<Event> = api.get("/api/v1/events?host=h1&limit=100").await.unwrap();
    for needle in [
        "entered maintenance mode",
        "VM big cannot leave host h1",
        "decision: stopped VM small re-homed from h1 to h2",
    ] {
        assert!(
            events.iter().any(|e| e.message.contains(needle)),
            "no `{needle}` event: {events:#?}"
        );
    }

    // A host in maintenance takes nothing new.
    let (code, msg) = status(
        api.post::<_, Vm>(
            "/api/v1/vms",
            &create_body("late", "h1", "52:54:00:00:00:03", 64),
        )
        .await,
    );
    assert_eq!(code, 409, "{msg}");
    assert!(msg.contains("maintenance"), "{msg}");

    // Exit, and exit again: both succeed at once.
    let t = maintenance(&c, "h1", MaintenanceAction::Exit)
        .await
        .unwrap();
    assert_eq!(
        (t.kind, t.state),
        (TaskKind::HostMaintenanceExit, TaskState::Succeeded)
    );
    assert_eq!(host(&c, "h1").await.state, HostState::Connected);
    let t = maintenance(&c, "h1", MaintenanceAction::Exit)
        .await
        .unwrap();
    assert!(t.phase.contains("was not in maintenance"), "{t:?}");

    // Stopped, big only warns: the host is in maintenance with big registered on it.
    let t: Task = api
        .post(
            "/api/v1/vms/big/stop",
            &StopVm {
                force: true,
                timeout_ms: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(wait_task(&c, t.id).await.state, TaskState::Succeeded);
    let t = maintenance(&c, "h1", MaintenanceAction::Enter)
        .await
        .unwrap();
    let done = wait_task(&c, t.id).await;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    let r = result(&done);
    assert_eq!(r.left.len(), 1, "{r:?}");
    assert_eq!(r.left[0].vm, "big");
    assert!(
        done.phase
            .contains("stopped VM(s) still registered on it: big"),
        "{done:?}"
    );
    // A VM of a host in maintenance does not start.
    let (code, msg) = status(api.post::<_, Task>("/api/v1/vms/big/start", &()).await);
    assert_eq!(code, 409, "{msg}");
    assert!(msg.contains("maintenance"), "{msg}");

    // Empty and in maintenance: entering again is a no-op that has already succeeded.
    api.delete("/api/v1/vms/big").await.unwrap();
    let t = maintenance(&c, "h1", MaintenanceAction::Enter)
        .await
        .unwrap();
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert!(t.phase.contains("already in maintenance"), "{t:?}");
    assert_eq!(host(&c, "h1").await.state, HostState::Maintenance);
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_disconnected_host_cannot_enter_maintenance() {
    let dir = tempfile::tempdir().unwrap();
    let c = serve(config(dir.path(), 300)).await.unwrap();
    let a1 = FakeAgent::start().await;
    setup(&c, &[("h1", 8192, &a1)]).await;
    // No heartbeats: the monitor marks it disconnected.
    wait_for("h1 to be disconnected", 10, || async {
        (host(&c, "h1").await.state == HostState::Disconnected).then_some(())
    })
    .await;
    let (code, msg) = status(maintenance(&c, "h1", MaintenanceAction::Enter).await);
    assert_eq!(code, 409, "{msg}");
    assert!(msg.contains("disconnected"), "{msg}");
    let tasks: Vec<Task> = admin(&c).get("/api/v1/tasks").await.unwrap();
    assert!(
        tasks.is_empty(),
        "a refused entry records no task: {tasks:?}"
    );
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_entry_waits_for_busy_vms_and_can_be_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let c = serve(config(dir.path(), 60_000)).await.unwrap();
    let (a1, a2) = (FakeAgent::start().await, FakeAgent::start().await);
    setup(&c, &[("h1", 8192, &a1), ("h2", 8192, &a2)]).await;
    let api = admin(&c);
    create(&c, "slow", "h1", "52:54:00:00:00:01", 64).await;
    a1.state.lock().unwrap().hang_starts = true;
    let start: Task = api.post("/api/v1/vms/slow/start", &()).await.unwrap();

    // The entry waits for the start to end before it plans anything.
    let t = maintenance(&c, "h1", MaintenanceAction::Enter)
        .await
        .unwrap();
    wait_for("the entry to wait for the busy VM", 10, || {
        let api = api.clone();
        async move {
            let now: Task = api.get(&format!("/api/v1/tasks/{}", t.id)).await.unwrap();
            (now.state == TaskState::Running && now.phase.contains("waiting for tasks"))
                .then_some(())
        }
    })
    .await;
    // Flagged already: nothing new lands there meanwhile.
    assert_eq!(host(&c, "h1").await.state, HostState::Maintenance);
    // A second entry and an exit are refused while it runs, naming the task.
    let (code, msg) = status(maintenance(&c, "h1", MaintenanceAction::Enter).await);
    assert_eq!(code, 409, "{msg}");
    assert!(msg.contains(&t.id.to_string()), "{msg}");
    let (code, msg) = status(maintenance(&c, "h1", MaintenanceAction::Exit).await);
    assert_eq!(code, 409, "{msg}");
    assert!(msg.contains("tern task cancel"), "{msg}");

    // Cancelled: it ends so, and the host stays in maintenance (exit returns it).
    let _: Task = api
        .post(&format!("/api/v1/tasks/{}/cancel", t.id), &())
        .await
        .unwrap();
    assert_eq!(wait_task(&c, t.id).await.state, TaskState::Cancelled);
    wait_for("the cancel to be recorded", 10, || {
        let api = api.clone();
        async move {
            let ev: Vec<Event> = api.get("/api/v1/events?host=h1&limit=100").await.unwrap();
            ev.iter()
                .any(|e| {
                    e.message
                        .contains("cancelled: host h1 stays in maintenance")
                })
                .then_some(())
        }
    })
    .await;
    assert_eq!(host(&c, "h1").await.state, HostState::Maintenance);
    let _: Task = api
        .post(&format!("/api/v1/tasks/{}/cancel", start.id), &())
        .await
        .unwrap();
    let t = maintenance(&c, "h1", MaintenanceAction::Exit)
        .await
        .unwrap();
    assert_eq!(t.state, TaskState::Succeeded);
    assert_eq!(host(&c, "h1").await.state, HostState::Connected);
    c.shutdown().await.unwrap();
}
