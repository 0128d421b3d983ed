//! The agent's HTTP API (`/v1`, see `tern_api::agent`): routing, the bearer-token check, and
//! JSON in and out.

use std::sync::Arc;
use tern_api::routes::agent as route;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use tern_api::agent::{CheckPaths, PathsReport, StartVm, VmRuntime};
use tern_api::center::StopVm;
use tern_api::migration::{
    AbortMigration, AgentMigrationState, AgentMigrationStatus, BandwidthProbe, BandwidthReport,
    BandwidthSink, Commit, Committed, DirtyRateReport, IncomingReady, ListenIncoming,
    MeasureDirtyRate, PrepareIncoming, QueuedFrames, StartOutgoing,
};
use tern_api::{ErrorBody, HostFacts, HostLoad};
use uuid::Uuid;

use crate::error::AgentError;
use crate::Agent;

/// Default and largest console tail served.
const CONSOLE_DEFAULT_BYTES: u64 = 16 * 1024;
const CONSOLE_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// The router of the agent API, every route behind the token check.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route(route::FACTS.template(), get(facts))
        .route(route::LOAD.template(), get(load))
        .route(route::VMS.template(), get(list_vms))
        .route(
            route::VM.template(),
            get(get_vm).put(start_vm).delete(delete_vm),
        )
        .route(route::VM_STOP.template(), post(stop_vm))
        .route(route::VM_PAUSE.template(), post(pause_vm))
        .route(route::VM_RESUME.template(), post(resume_vm))
        .route(route::VM_RESOURCES.template(), put(set_resources))
        .route(route::VM_CONSOLE.template(), get(console))
        .route(route::CHECK_PATHS.template(), post(check_paths))
        .route(route::NVRAM_REMOVE.template(), post(remove_nvram))
        .route(route::DATASTORES_PROBE.template(), post(probe_datastores))
        .route(route::DATASTORES_MARK.template(), post(mark_datastore))
        .route(route::IMAGE_IMPORT.template(), post(import_image))
        .route(route::VOLUME_CLONE.template(), post(clone_volume))
        .route(
            route::IMAGE_REMOVE.template(),
            post(|s, r| remove_file(s, r, false)),
        )
        .route(
            route::VOLUME_REMOVE.template(),
            post(|s, r| remove_file(s, r, true)),
        )
        .route(route::MIGRATION.template(), get(migration_status))
        .route(
            route::MIGRATION_INCOMING.template(),
            post(migration_incoming),
        )
        .route(route::MIGRATION_LISTEN.template(), post(migration_listen))
        .route(
            route::MIGRATION_OUTGOING.template(),
            post(migration_outgoing),
        )
        .route(route::MIGRATION_MEASURE.template(), post(migration_measure))
        .route(route::MIGRATION_STEER.template(), post(migration_steer))
        .route(route::MIGRATION_FRAMES.template(), post(migration_frames))
        .route(
            route::MIGRATION_SWITCHOVER.template(),
            post(migration_switchover),
        )
        .route(route::MIGRATION_COMMIT.template(), post(migration_commit))
        .route(route::MIGRATION_ABORT.template(), post(migration_abort))
        .route(route::MIGRATION_FINISH.template(), post(migration_finish))
        .route(route::BANDWIDTH_SINK.template(), post(bandwidth_sink))
        .route(route::BANDWIDTH_PROBE.template(), post(bandwidth_probe))
        .route(route::METRICS.template(), get(metrics))
        .fallback(not_found)
        // Inside the token check: only a caller holding the agent token can raise the term.
        .layer(axum::middleware::from_fn_with_state(agent.clone(), fence))
        .layer(axum::middleware::from_fn_with_state(
            agent.clone(),
            require_token,
        ))
        .with_state(agent)
}

/// Compares in time independent of where the strings differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(agent): State<Arc<Agent>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(t) if same_secret(t.as_bytes(), agent.token.as_bytes()) => next.run(req).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            Json(ErrorBody {
                error: "missing or wrong agent token: send `Authorization: Bearer <token>` with \
                        the token of the agent's STATE_DIR/agent.token"
                    .to_string(),
            }),
        )
            .into_response(),
    }
}

/// Refuses a call from an HA leader older than the newest one seen (see [`crate::fence`]).
async fn fence(State(agent): State<Arc<Agent>>, req: Request, next: Next) -> Response {
    let Some(raw) = req.headers().get(tern_api::LEADER_TERM_HEADER) else {
        return next.run(req).await;
    };
    let term = match raw.to_str().ok().and_then(|t| t.parse::<u64>().ok()) {
        Some(t) => t,
        None => {
            return AgentError::BadRequest(format!(
                "the {} header must be a decimal number",
                tern_api::LEADER_TERM_HEADER
            ))
            .into_response()
        }
    };
    match agent.fence.admit(term) {
        Ok(()) => next.run(req).await,
        Err(why) => AgentError::Conflict(why).into_response(),
    }
}

async fn not_found() -> AgentError {
    AgentError::NotFound("no such agent API path (see tern_api::agent)".to_string())
}

fn vm_id(raw: &str) -> Result<Uuid, AgentError> {
    Uuid::parse_str(raw)
        .map_err(|_| AgentError::BadRequest(format!("{raw:?} is not a VM id (UUID)")))
}

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, AgentError> {
    b.map(|Json(v)| v)
        .map_err(|e| AgentError::BadRequest(format!("bad request body: {}", e.body_text())))
}

async fn facts(State(agent): State<Arc<Agent>>) -> Json<HostFacts> {
    Json(agent.facts())
}

/// `GET /metrics`: Prometheus text format.
async fn metrics(State(agent): State<Arc<Agent>>) -> Response {
    let reading = crate::metrics::Reading {
        vm_states: agent.vms.list().into_iter().map(|v| v.state).collect(),
        active: agent.migrations.active(),
        ended: &agent.migrations.ended,
        load: agent.load().await,
    };
    match crate::metrics::render(reading) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            AgentError::Internal(anyhow::anyhow!("encoding the metrics: {e}")).into_response()
        }
    }
}

async fn load(State(agent): State<Arc<Agent>>) -> Json<HostLoad> {
    Json(agent.load().await)
}

async fn list_vms(State(agent): State<Arc<Agent>>) -> Json<Vec<VmRuntime>> {
    Json(agent.vms.list())
}

async fn get_vm(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<Json<VmRuntime>, AgentError> {
    agent.vms.get(vm_id(&id)?).map(Json)
}

async fn start_vm(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    req: Result<Json<StartVm>, JsonRejection>,
) -> Result<Json<VmRuntime>, AgentError> {
    let id = vm_id(&id)?;
    let req = body(req)?;
    agent.vms.clone().start(id, req).await.map(Json)
}

async fn stop_vm(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    req: Result<Json<StopVm>, JsonRejection>,
) -> Result<Json<VmRuntime>, AgentError> {
    let id = vm_id(&id)?;
    let req = body(req)?;
    agent.vms.stop(id, req).await.map(Json)
}

async fn pause_vm(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<Json<VmRuntime>, AgentError> {
    agent.vms.pause(vm_id(&id)?).await.map(Json)
}

async fn set_resources(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    req: Result<Json<tern_api::Resources>, JsonRejection>,
) -> Result<Json<VmRuntime>, AgentError> {
    let id = vm_id(&id)?;
    let resources = body(req)?;
    agent.vms.set_resources(id, resources).await.map(Json)
}

async fn resume_vm(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<Json<VmRuntime>, AgentError> {
    agent.vms.resume(vm_id(&id)?).await.map(Json)
}

async fn delete_vm(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<Json<()>, AgentError> {
    agent.vms.delete(vm_id(&id)?).await.map(Json)
}

#[derive(Debug, Deserialize)]
struct ConsoleQuery {
    bytes: Option<u64>,
}

async fn console(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    Query(q): Query<ConsoleQuery>,
) -> Result<Response, AgentError> {
    let bytes = q
        .bytes
        .unwrap_or(CONSOLE_DEFAULT_BYTES)
        .min(CONSOLE_MAX_BYTES);
    let text = agent.vms.console_tail(vm_id(&id)?, bytes).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

async fn check_paths(
    State(agent): State<Arc<Agent>>,
    req: Result<Json<CheckPaths>, JsonRejection>,
) -> Result<Json<PathsReport>, AgentError> {
    let req = body(req)?;
    let shared = agent.cfg.shared_storage.clone();
    let report =
        tokio::task::spawn_blocking(move || crate::paths::check(&req.paths, shared.as_deref()))
            .await
            .map_err(|e| AgentError::Internal(anyhow::anyhow!("path check task failed: {e}")))?;
    Ok(Json(report))
}

async fn remove_nvram(
    State(agent): State<Arc<Agent>>,
    req: Result<Json<tern_api::images::RemoveNvram>, JsonRejection>,
) -> Result<Json<serde_json::Value>, AgentError> {
    let req = body(req)?;
    let Some(root) = agent.cfg.shared_storage.clone() else {
        return Ok(Json(serde_json::json!({})));
    };
    // Named by the VM's id alone (a UUID): no path comes from the request.
    let path = crate::firmware::UefiFirmware::vars_path(&root, req.id);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            tracing::info!(vm = %req.id, "removed the UEFI variables store {}", path.display());
            Ok(Json(serde_json::json!({})))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Json(serde_json::json!({}))),
        Err(e) => Err(AgentError::Internal(anyhow::anyhow!(
            "{}: {e}",
            path.display()
        ))),
    }
}

async fn probe_datastores(
    State(agent): State<Arc<Agent>>,
    req: Result<Json<tern_api::datastores::ProbeDatastores>, JsonRejection>,
) -> Result<Json<Vec<tern_api::datastores::DatastoreReach>>, AgentError> {
    let req = body(req)?;
    if req.datastores.len() > 256 {
        return Err(AgentError::BadRequest(
            "at most 256 datastores per probe".into(),
        ));
    }
    let root = agent.cfg.shared_storage.clone();
    let found = tokio::task::spawn_blocking(move || {
        crate::datastores::probe(root.as_deref(), &req.datastores)
    })
    .await
    .map_err(|e| AgentError::Internal(anyhow::anyhow!("datastore probe failed: {e}")))?;
    Ok(Json(found))
}

async fn mark_datastore(
    State(agent): State<Arc<Agent>>,
    req: Result<Json<tern_api::datastores::MarkDatastore>, JsonRejection>,
) -> Result<Json<serde_json::Value>, AgentError> {
    let req = body(req)?;
    let root = agent.cfg.shared_storage.clone();
    tokio::task::spawn_blocking(move || crate::datastores::mark(root.as_deref(), &req))
        .await
        .map_err(|e| AgentError::Internal(anyhow::anyhow!("datastore mark failed: {e}")))?
        .map_err(AgentError::BadRequest)?;
    Ok(Json(serde_json::json!({})))
}

/// Runs image file work on the blocking pool, beneath this host's shared storage.
async fn image_work<T: Send + 'static>(
    agent: &Agent,
    work: impl FnOnce(&std::path::Path) -> Result<T, crate::images::ImageError> + Send + 'static,
) -> Result<T, AgentError> {
    use crate::images::ImageError as E;
    let Some(root) = agent.cfg.shared_storage.clone() else {
        return Err(AgentError::BadRequest(
            "this host has no shared storage (--shared-storage): it keeps no images".into(),
        ));
    };
    let done = tokio::task::spawn_blocking(move || work(&root))
        .await
        .map_err(|e| AgentError::Internal(anyhow::anyhow!("image task failed: {e}")))?;
    done.map_err(|e| match e {
        E::Invalid(_) | E::Open(_) => AgentError::BadRequest(e.to_string()),
        E::Exists(_) => AgentError::Conflict(e.to_string()),
        E::Failed(_) => AgentError::Internal(anyhow::anyhow!(e)),
    })
}

async fn import_image(
    State(agent): State<Arc<Agent>>,
    req: Result<Json<tern_api::images::ImportImageFile>, JsonRejection>,
) -> Result<Json<tern_api::images::ImageFile>, AgentError> {
    let req = body(req)?;
    let name = req.name.clone();
    let done = image_work(&agent, move |root| crate::images::import(root, &req)).await?;
    tracing::info!(image = %name, path = %done.path, sha256 = %done.sha256, "image imported");
    Ok(Json(done))
}

async fn clone_volume(
    State(agent): State<Arc<Agent>>,
    req: Result<Json<tern_api::images::CloneVolume>, JsonRejection>,
) -> Result<Json<tern_api::images::Volume>, AgentError> {
    let req = body(req)?;
    Ok(Json(
        image_work(&agent, move |root| crate::images::clone(root, &req)).await?,
    ))
}

async fn remove_file(
    State(agent): State<Arc<Agent>>,
    req: Result<Json<tern_api::images::RemoveFile>, JsonRejection>,
    volume: bool,
) -> Result<Json<serde_json::Value>, AgentError> {
    let req = body(req)?;
    image_work(&agent, move |root| {
        crate::images::remove(root, volume, &req.name)
    })
    .await?;
    Ok(Json(serde_json::json!({})))
}

// ---- migrations (tern_api::migration) ----

#[derive(Debug, Deserialize)]
struct MigrationQuery {
    /// Answer once the state differs from this one...
    state: Option<AgentMigrationState>,
    /// ...or after this long.
    wait_ms: Option<u64>,
}

async fn migration_status(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    Query(q): Query<MigrationQuery>,
) -> Result<Json<AgentMigrationStatus>, AgentError> {
    let wait = std::time::Duration::from_millis(q.wait_ms.unwrap_or(0));
    agent
        .migrations
        .status(vm_id(&id)?, q.state, wait)
        .await
        .map(Json)
}

async fn migration_incoming(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    req: Result<Json<PrepareIncoming>, JsonRejection>,
) -> Result<Json<IncomingReady>, AgentError> {
    let id = vm_id(&id)?;
    let req = body(req)?;
    agent.migrations.incoming(id, req).await.map(Json)
}

async fn migration_listen(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    req: Result<Json<ListenIncoming>, JsonRejection>,
) -> Result<Json<IncomingReady>, AgentError> {
    let id = vm_id(&id)?;
    let req = body(req)?;
    agent.migrations.listen(id, req).await.map(Json)
}

async fn migration_outgoing(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    req: Result<Json<StartOutgoing>, JsonRejection>,
) -> Result<Json<()>, AgentError> {
    let id = vm_id(&id)?;
    let req = body(req)?;
    agent.migrations.outgoing(id, req).await.map(Json)
}

async fn migration_measure(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    req: Result<Json<MeasureDirtyRate>, JsonRejection>,
) -> Result<Json<DirtyRateReport>, AgentError> {
    let id = vm_id(&id)?;
    let req = body(req)?;
    agent
        .migrations
        .measure(id, req.duration_ms)
        .await
        .map(Json)
}

async fn migration_steer(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<Json<AgentMigrationStatus>, AgentError> {
    let id = vm_id(&id)?;
    let status = agent.migrations.steer(id).await?;
    // From here the guest is paused at the source: if the commit call does not come, the
    // store is asked whether it was made.
    crate::commit_watch::after_steer(agent.clone(), id);
    Ok(Json(status))
}

async fn migration_frames(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<Json<QueuedFrames>, AgentError> {
    agent.migrations.frames(vm_id(&id)?).await.map(Json)
}

async fn migration_switchover(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<Json<AgentMigrationStatus>, AgentError> {
    agent.migrations.switchover(vm_id(&id)?).await.map(Json)
}

async fn migration_commit(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    req: Result<Json<Commit>, JsonRejection>,
) -> Result<Json<Committed>, AgentError> {
    let id = vm_id(&id)?;
    let req = body(req)?;
    agent.migrations.commit(id, req).await.map(Json)
}

async fn migration_abort(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    req: Result<Json<Option<AbortMigration>>, JsonRejection>,
) -> Result<Json<()>, AgentError> {
    let id = vm_id(&id)?;
    let req = body(req)?.unwrap_or_default();
    agent.migrations.abort(id, req).await.map(Json)
}

async fn migration_finish(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<Json<()>, AgentError> {
    agent.migrations.finish(vm_id(&id)?).await.map(Json)
}

async fn bandwidth_sink(
    State(agent): State<Arc<Agent>>,
) -> Result<Json<BandwidthSink>, AgentError> {
    agent.migrations.sink().await.map(Json)
}

async fn bandwidth_probe(
    State(agent): State<Arc<Agent>>,
    req: Result<Json<BandwidthProbe>, JsonRejection>,
) -> Result<Json<BandwidthReport>, AgentError> {
    let req = body(req)?;
    agent.migrations.probe(req).await.map(Json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
    }
}
