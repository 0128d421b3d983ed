//! A center restarted in the middle of a hand-over settles the migration the only safe way,
//! through its real store, recovery and agent client, with fake host agents: a source that
//! went post-copy (it can never resume) takes the migration forward although nothing was
//! committed — the destination is run, never removed — and a source whose memory is whole
//! takes it back, resuming the source before the destination is removed.

use std::sync::{Arc, Mutex};

use axum::extract::{Path as AxPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use tern_api::agent::{CheckPaths, PathsReport};
use tern_api::center::{CreateVm, Event, Host, Vm};
use tern_api::migration::{AgentMigrationState, AgentMigrationStatus, Commit};
use tern_api::ErrorBody;
use tern_center::store::{MigrationRecordState, MigrationRow, Store};
use tern_center::{serve, RunningCenter};
use uuid::Uuid;

mod common;
use common::{admin, config, facts, kernel_spec, migration_record, setup_lab, wait_for};

// ---------- a fake agent: one migration, in memory ----------

#[derive(Default)]
struct FakeState {
    /// This host is the migration's source.
    source: bool,
    /// (Source) the migration went post-copy: it refuses to resume.
    postcopy: bool,
    calls: Vec<String>,
}

type Shared = Arc<Mutex<FakeState>>;
type R<T> = Result<T, (StatusCode, Json<ErrorBody>)>;

async fn status(State(s): State<Shared>, AxPath(id): AxPath<Uuid>) -> Json<AgentMigrationStatus> {
    let s = s.lock().unwrap();
    let state = if s.source {
        AgentMigrationState::Completed
    } else {
        AgentMigrationState::Listening
    };
    Json(AgentMigrationStatus {
        postcopy: s.source && s.postcopy,
        ..AgentMigrationStatus::new(id, state)
    })
}

async fn abort(State(s): State<Shared>, AxPath(_): AxPath<Uuid>) -> R<StatusCode> {
    let mut s = s.lock().unwrap();
    s.calls.push("abort".into());
    if s.source && s.postcopy {
        return Err((
            StatusCode::CONFLICT,
            Json(ErrorBody {
                error: "the migration went post-copy: the source cannot resume".into(),
            }),
        ));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Answers nothing, as agents did before `Committed`: the center takes it as a commit.
async fn commit(
    State(s): State<Shared>,
    AxPath(_): AxPath<Uuid>,
    Json(c): Json<Commit>,
) -> StatusCode {
    s.lock()
        .unwrap()
        .calls
        .push(format!("commit {}", c.generation));
    StatusCode::NO_CONTENT
}

async fn check_paths(Json(_): Json<CheckPaths>) -> Json<PathsReport> {
    Json(PathsReport {
        unreachable: vec![],
        missing: vec![],
        outside_shared_storage: vec![],
    })
}

async fn finish(State(s): State<Shared>, AxPath(_): AxPath<Uuid>) -> StatusCode {
    s.lock().unwrap().calls.push("finish".into());
    StatusCode::NO_CONTENT
}

struct FakeAgent {
    url: String,
    state: Shared,
}

impl FakeAgent {
    async fn start(source: bool, postcopy: bool) -> FakeAgent {
        let state = Arc::new(Mutex::new(FakeState {
            source,
            postcopy,
            calls: vec![],
        }));
        let app = Router::new()
            .route("/v1/check-paths", post(check_paths))
            .route("/v1/migrations/{id}", get(status))
            .route("/v1/migrations/{id}/abort", post(abort))
            .route("/v1/migrations/{id}/commit", post(commit))
            .route("/v1/migrations/{id}/finish", post(finish))
            .with_state(state.clone());
        let url = common::serve_router(app).await;
        FakeAgent { url, state }
    }

    fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }
}

// ---------- the scenario ----------

/// A VM on h1, then a center stopped while the VM's migration to h2 stood `Switching` (the
/// record written into its store as the driver would have); returns the VM as it was.
async fn stopped_mid_handover(dir: &std::path::Path, h1: &FakeAgent, h2: &FakeAgent) -> (Vm, Uuid) {
    let c: RunningCenter = serve(config(dir, 10_000)).await.unwrap();
    setup_lab(
        &c,
        vec![
            ("h1", facts(4, 8192), h1.url.clone()),
            ("h2", facts(4, 8192), h2.url.clone()),
        ],
    )
    .await;
    let vm: Vm = admin(&c)
        .post(
            "/api/v1/vms",
            &CreateVm {
                image: None,
                spec: kernel_spec("web", "52:54:00:00:00:01", 256),
                cluster: "lab".into(),
                host: Some("h1".into()),
            },
        )
        .await
        .unwrap();
    let hosts: Vec<Host> = admin(&c).get("/api/v1/hosts").await.unwrap();
    let id_of = |n: &str| hosts.iter().find(|h| h.name == n).unwrap().id;
    let (source, dest) = (id_of("h1"), id_of("h2"));
    c.shutdown().await.unwrap();

    let task = Uuid::new_v4();
    let mut store = Store::open(&dir.join("center/center.db")).unwrap();
    store
        .write(|tx| {
            tx.insert_migration(
                &MigrationRow {
                    task_id: task,
                    vm_id: vm.id,
                    vm_name: vm.spec.name.clone(),
                    source_host_id: source,
                    dest_host_id: dest,
                    generation_from: vm.generation,
                    generation_to: vm.generation + 1,
                    state: MigrationRecordState::Preparing,
                    detail: None,
                },
                chrono::Utc::now(),
            )?;
            tx.set_migration_state(
                task,
                &[MigrationRecordState::Preparing],
                MigrationRecordState::Switching,
                chrono::Utc::now(),
            )
        })
        .unwrap();
    (vm, task)
}

/// Starts the center again on `dir` and waits until it has settled migration `task`: the
/// running center, the VM as it is then, and the event that said so.
async fn restart_and_settle(dir: &std::path::Path, task: Uuid) -> (RunningCenter, Vm, String) {
    let c = serve(config(dir, 10_000)).await.unwrap();
    let settled = wait_for("the migration to settle", 30, || async {
        let events: Vec<Event> = admin(&c).get("/api/v1/events?limit=200").await.unwrap();
        events
            .into_iter()
            .filter(|e| e.task == Some(task))
            .map(|e| e.message)
            .find(|m| m.contains("settled"))
    })
    .await;
    let vm: Vm = admin(&c).get("/api/v1/vms/web").await.unwrap();
    (c, vm, settled)
}

#[tokio::test]
async fn a_source_that_went_postcopy_is_taken_forward_never_back() {
    let dir = tempfile::tempdir().unwrap();
    let h1 = FakeAgent::start(true, true).await;
    let h2 = FakeAgent::start(false, false).await;
    let (vm, task) = stopped_mid_handover(dir.path(), &h1, &h2).await;

    let (c, now, settled) = restart_and_settle(dir.path(), task).await;
    assert!(settled.contains("runs on h2 only"), "{settled}");
    assert_eq!(now.host.as_deref(), Some("h2"), "{now:?}");
    assert_eq!(now.generation, vm.generation + 1);
    assert_eq!(
        migration_record(dir.path(), task),
        MigrationRecordState::Done
    );
    // The destination was run under the new generation and never removed; the source was
    // asked once whether it can resume (it refused) and then finished.
    assert_eq!(h2.calls(), vec![format!("commit {}", vm.generation + 1)]);
    assert!(
        h1.calls().ends_with(&["finish".to_string()]),
        "{:?}",
        h1.calls()
    );
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_whole_source_takes_the_vm_back_before_the_destination_goes() {
    let dir = tempfile::tempdir().unwrap();
    let h1 = FakeAgent::start(true, false).await;
    let h2 = FakeAgent::start(false, false).await;
    let (vm, task) = stopped_mid_handover(dir.path(), &h1, &h2).await;

    let (c, now, settled) = restart_and_settle(dir.path(), task).await;
    assert!(settled.contains("runs on h1 only"), "{settled}");
    assert_eq!(now.host.as_deref(), Some("h1"), "{now:?}");
    assert_eq!(now.generation, vm.generation);
    assert_eq!(
        migration_record(dir.path(), task),
        MigrationRecordState::RolledBack
    );
    assert_eq!(h1.calls(), vec!["abort".to_string()]);
    assert_eq!(h2.calls(), vec!["abort".to_string()]);
    c.shutdown().await.unwrap();
}
