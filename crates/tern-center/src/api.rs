//! The REST API: routes under `/api/v1`, bearer-token checks, extractors that answer with
//! [`ErrorBody`], and the OpenAPI document generated from the handlers.

use std::sync::{Arc, OnceLock};

use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Extension, Router};
use tern_serve::PeerCertificate;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use uuid::Uuid;

use tern_api::center::{
    AddHost, ApiToken, CanMigrateQuery, CenterRef, Cluster, ClusterMigrationSettings,
    ClusterSummary, ConsoleQuery, ControlPlane, CreateCluster, CreateToken, CreateVm, CreatedToken,
    Event, EventLevel, EventQuery, Heartbeat, Host, HostMaintenance, JoinToken, ListQuery,
    MaintenanceAction, MaintenancePlan, MaintenanceResult, Ownership, OwnershipQuery, RegisterHost,
    Registered, Role, StopVm, Summary, Task, TaskKind, TaskQuery, TaskState, Vm, Whoami,
};
use tern_api::datastores::{AddDatastore, Datastore};
use tern_api::drs::{DrsApplyResult, DrsRecommendations, DrsRule, DrsSettings};
use tern_api::evc::{EvcModeChange, EvcModes, MigrationCheckReport, SetEvcMode};
use tern_api::health::DegradeHost;
use tern_api::history::{DrsHistory, HostLoadHistory, MigrationTimeline};
use tern_api::images::{Image, ImportImage};
use tern_api::migration::{MigrateVm, MigrationResult};
use tern_api::pools::{CreatePool, PoolSettings, ResourcePool, SetVmPool};
use tern_api::routes::center::{self as route, nested};
use tern_api::ErrorBody;
use tern_api::Resources;

use crate::api_error::ApiErr;
use crate::app::App;
use crate::auth::{self, bearer, token_eq, Caller};
use crate::error::CenterError;
use crate::inventory;
use crate::power;
use crate::store::{EventFilter, NewEvent};
use crate::tasks;

type AppState = State<Arc<App>>;

/// JSON body; a rejection answers 400 (415 without a JSON content type) with an ErrorBody.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiErr))]
pub struct Body<T>(pub T);

/// Path parameters; a bad value answers 400 with an ErrorBody.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiErr))]
pub struct PathArg<T>(pub T);

/// Query string; a bad value answers 400 with an ErrorBody.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiErr))]
pub struct QueryArg<T>(pub T);

type Json<T> = axum::Json<T>;
type ApiResult<T> = Result<T, ApiErr>;

/// Authenticates the caller, checks the role the route needs, and records every change asked
/// for (and every refusal) in the event log under the caller's name.
async fn authenticate(State(app): AppState, mut req: Request, next: Next) -> Response {
    let caller = match caller(&app, req.headers()).await {
        Ok(c) => c,
        Err(e) => return ApiErr::from(e).into_response(),
    };
    let method = req.method().clone();
    // Inside the nested router, paths come without the prefix.
    let full = |p: &str| {
        if p.starts_with(route::PREFIX) {
            p.to_string()
        } else {
            format!("{}{p}", route::PREFIX)
        }
    };
    let path = full(req.uri().path());
    let matched = full(
        req.extensions()
            .get::<MatchedPath>()
            .map(|m| m.as_str())
            .unwrap_or_default(),
    );
    let need = auth::required_role(&method, &matched);
    let changes = method != Method::GET && method != Method::HEAD;
    if caller.role < need {
        if changes {
            audit(&app, &caller, &method, &path, StatusCode::FORBIDDEN).await;
        }
        return ApiErr::from(CenterError::forbidden(format!(
            "token {} has the role {}; {method} {path} needs {need}: ask an admin for a token \
             with that role (tern token create NAME --role {need})",
            caller.name, caller.role
        )))
        .into_response();
    }
    req.extensions_mut().insert(caller.clone());
    let resp = next.run(req).await;
    if changes {
        audit(&app, &caller, &method, &path, resp.status()).await;
    }
    resp
}

/// Who presents the request's bearer token.
async fn caller(app: &Arc<App>, headers: &HeaderMap) -> Result<Caller, CenterError> {
    let Some(token) = bearer(headers) else {
        return Err(CenterError::unauthorized(format!(
            "missing Authorization: Bearer <token>: set TERN_TOKEN or --token to your API \
             token (the admin token is on the center host in {})",
            app.config.admin_token_file.display()
        )));
    };
    if token_eq(&token, &app.admin_token) {
        return Ok(Caller {
            name: auth::ADMIN_NAME.to_string(),
            role: Role::Admin,
        });
    }
    let hash = auth::token_hash(&token);
    match app.db.read(move |tx| tx.token_by_hash(&hash)).await? {
        Some(t) => Ok(Caller {
            name: t.name,
            role: t.role,
        }),
        None => Err(CenterError::unauthorized(format!(
            "wrong or revoked token: present a token from tern token create, or the admin \
             token (on the center host in {})",
            app.config.admin_token_file.display()
        ))),
    }
}

/// One line in the event log per change asked for: who, what, and how it was answered.
async fn audit(app: &Arc<App>, caller: &Caller, method: &Method, path: &str, status: StatusCode) {
    let level = if status.is_success() {
        EventLevel::Info
    } else {
        EventLevel::Warning
    };
    // Filed under the VM or host the path names, so `tern event list --vm` shows who did what.
    let named = |kind: &str| {
        path.strip_prefix(route::PREFIX)
            .and_then(|p| p.strip_prefix(kind))
            .and_then(|p| p.split('/').next())
            .filter(|n| tern_api::valid_name(n))
            .map(str::to_string)
    };
    let mut ev = NewEvent::new(
        level,
        format!(
            "{} ({}): {method} {path} → {status}",
            caller.name, caller.role
        ),
    )
    .actor(caller.name.clone())
    .host(named("/hosts/"));
    if let Some(vm) = named("/vms/") {
        ev = ev.vm(vm);
    }
    let r = app
        .db
        .write(move |tx| tx.add_event(ev, chrono::Utc::now()))
        .await;
    if let Err(e) = r {
        tracing::error!("recording the audit event: {e}");
    }
}

/// The API router (state attached), ready to serve on any listener.
pub fn router(app: Arc<App>) -> Router {
    let users = Router::new()
        .route(
            nested(route::CLUSTERS),
            post(create_cluster).get(list_clusters),
        )
        .route(nested(route::CLUSTER), get(get_cluster))
        .route(nested(route::CLUSTER_EVC), post(set_evc))
        .route(nested(route::CLUSTER_EVC_MODES), get(evc_modes))
        .route(nested(route::CLUSTER_DRS), get(get_drs).put(set_drs))
        .route(
            nested(route::CLUSTER_MIGRATION),
            get(get_cluster_migration).put(set_cluster_migration),
        )
        .route(
            nested(route::CLUSTER_DRS_RECOMMENDATIONS),
            get(drs_recommendations),
        )
        .route(nested(route::CLUSTER_DRS_APPLY), post(drs_apply))
        .route(
            nested(route::CLUSTER_RULES),
            get(list_rules).post(create_rule),
        )
        .route(nested(route::RULE), delete(remove_rule))
        .route(
            nested(route::CLUSTER_POOLS),
            get(list_pools).post(create_pool),
        )
        .route(
            nested(route::POOL),
            get(get_pool).put(update_pool).delete(remove_pool),
        )
        .route(nested(route::VM_POOL), put(set_vm_pool))
        .route(nested(route::IMAGES), get(list_images).post(import_image))
        .route(nested(route::IMAGE), get(get_image).delete(remove_image))
        .route(
            nested(route::DATASTORES),
            get(list_datastores).post(add_datastore),
        )
        .route(
            nested(route::DATASTORE),
            get(get_datastore).delete(remove_datastore),
        )
        .route(nested(route::HOSTS), get(list_hosts))
        .route(nested(route::HOST), get(get_host).delete(remove_host))
        .route(nested(route::HOST_JOIN_TOKEN), post(add_host))
        .route(nested(route::HOST_MAINTENANCE), post(host_maintenance))
        .route(nested(route::HOST_MAINTENANCE_PLAN), get(maintenance_plan))
        .route(nested(route::HOST_EVACUATE), post(host_evacuate))
        .route(
            nested(route::HOST_HEALTH),
            put(degrade_host).delete(restore_host),
        )
        .route(nested(route::VMS), post(create_vm).get(list_vms))
        .route(nested(route::VM), get(get_vm).delete(delete_vm))
        .route(nested(route::VM_START), post(start_vm))
        .route(nested(route::VM_STOP), post(stop_vm))
        .route(nested(route::VM_RESOURCES), put(set_vm_resources))
        .route(nested(route::VM_CONSOLE), get(vm_console))
        .route(nested(route::VM_CAN_MIGRATE), get(can_migrate))
        .route(nested(route::VM_MIGRATE), post(migrate_vm))
        .route(nested(route::TASKS), get(list_tasks))
        .route(nested(route::TASK), get(get_task))
        .route(nested(route::TASK_CANCEL), post(cancel_task))
        .route(nested(route::TASK_TIMELINE), get(task_timeline))
        .route(nested(route::HOST_LOAD_HISTORY), get(host_load_history))
        .route(nested(route::HOST_METRICS), get(host_metrics))
        .route(nested(route::CLUSTER_DRS_HISTORY), get(drs_history))
        .route(nested(route::SUMMARY), get(summary))
        .route(nested(route::CONTROL_PLANE), get(control_plane))
        .route(nested(route::EVENTS), get(list_events))
        .route(nested(route::STREAM), get(live_stream))
        .route(nested(route::WHOAMI), get(whoami))
        .route(nested(route::TOKENS), post(create_token).get(list_tokens))
        .route(nested(route::TOKEN), delete(revoke_token))
        .route_layer(middleware::from_fn_with_state(app.clone(), authenticate));
    // Registrations and heartbeats carry a host's own credential, checked by the handler
    // against the name or id they are for.
    let hosts = Router::new()
        .route(nested(route::HOST_REGISTER), post(register_host))
        .route(nested(route::HOST_HEARTBEAT), post(heartbeat))
        .route(nested(route::HOST_OWNERSHIP), get(ownership));
    let api = users.merge(hosts);
    Router::new()
        .nest(route::PREFIX, api)
        .route(route::OPENAPI.template(), get(openapi_json))
        .route("/metrics", get(metrics))
        .merge(crate::web::router())
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
        .layer(middleware::from_fn_with_state(app.clone(), leader_gate))
        .layer(middleware::from_fn_with_state(app.clone(), log_request))
        .with_state(app)
}

/// HA mode: a standby (or a leader still taking over) serves reads from its copy of the
/// store and refuses every change with 503, naming the leader in the message and in the
/// `tern-leader` header, so agents and clients go there.
async fn leader_gate(State(app): AppState, req: Request, next: Next) -> Response {
    let reads = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if reads || app.leadership.writable() {
        return next.run(req).await;
    }
    // Not through ApiErr: a standby refusing is no server error worth a log line.
    let mut resp = (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(ErrorBody {
            error: app.leadership.refusal(),
        }),
    )
        .into_response();
    if let Some(url) = app
        .leadership
        .leader()
        .and_then(|l| header::HeaderValue::from_str(&l.url).ok())
    {
        resp.headers_mut().insert(tern_api::LEADER_URL_HEADER, url);
    }
    resp
}

async fn log_request(State(app): AppState, req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    // The route's template, not the path: one series per route, whatever the names in it.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "other".into());
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    // A live stream's time is how long it was watched, not a latency.
    if route != route::STREAM.template() {
        app.metrics.request(
            method.as_str(),
            &route,
            resp.status().as_u16(),
            started.elapsed().as_secs_f64(),
        );
    }
    tracing::debug!(
        %method,
        path,
        status = resp.status().as_u16(),
        ms = started.elapsed().as_millis() as u64,
        "request"
    );
    resp
}

async fn no_route() -> ApiErr {
    CenterError::not_found("no such API path: see GET /openapi.json for the paths").into()
}

async fn no_method() -> ApiErr {
    ApiErr::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "this path does not take that method: see GET /openapi.json",
    )
}

// ---- clusters ----

#[utoipa::path(post, path = "/api/v1/clusters", tag = "clusters",
    request_body = CreateCluster,
    responses(
        (status = 201, description = "Cluster created", body = Cluster),
        (status = 400, description = "Invalid name or body", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 409, description = "Name taken", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn create_cluster(
    State(app): AppState,
    Body(req): Body<CreateCluster>,
) -> ApiResult<(StatusCode, Json<Cluster>)> {
    let c = inventory::create_cluster(&app, req).await?;
    Ok((StatusCode::CREATED, axum::Json(c)))
}

#[utoipa::path(get, path = "/api/v1/clusters", tag = "clusters",
    responses(
        (status = 200, description = "All clusters", body = Vec<Cluster>),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn list_clusters(State(app): AppState) -> ApiResult<Json<Vec<Cluster>>> {
    Ok(axum::Json(app.db.read(|tx| tx.clusters()).await?))
}

#[utoipa::path(get, path = "/api/v1/clusters/{name}", tag = "clusters",
    params(("name" = String, Path, description = "Cluster name")),
    responses(
        (status = 200, description = "The cluster", body = Cluster),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such cluster", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn get_cluster(
    State(app): AppState,
    PathArg(name): PathArg<String>,
) -> ApiResult<Json<Cluster>> {
    let c = app
        .db
        .read(move |tx| {
            tx.cluster(&name)?.ok_or_else(|| {
                CenterError::not_found(format!(
                    "cluster {name} does not exist: see tern cluster list"
                ))
            })
        })
        .await?;
    Ok(axum::Json(c))
}

#[utoipa::path(post, path = "/api/v1/clusters/{name}/evc", tag = "clusters",
    params(("name" = String, Path, description = "Cluster name")),
    request_body = SetEvcMode,
    responses(
        (status = 200, description = "Mode changed (or unchanged); says what it means for running VMs", body = EvcModeChange),
        (status = 400, description = "Unknown CPU model", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such cluster", body = ErrorBody),
        (status = 409, description = "Powered-on VMs use features above the new mode (named)", body = ErrorBody),
        (status = 422, description = "Hosts lack features of the new mode (named)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn set_evc(
    State(app): AppState,
    PathArg(name): PathArg<String>,
    Body(req): Body<SetEvcMode>,
) -> ApiResult<Json<EvcModeChange>> {
    Ok(axum::Json(crate::evc::set_evc(&app, name, req).await?))
}

#[utoipa::path(get, path = "/api/v1/clusters/{name}/evc-modes", tag = "clusters",
    params(("name" = String, Path, description = "Cluster name")),
    responses(
        (status = 200, description = "Modes every host supports, the best one, each host's view", body = EvcModes),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such cluster", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn evc_modes(
    State(app): AppState,
    PathArg(name): PathArg<String>,
) -> ApiResult<Json<EvcModes>> {
    Ok(axum::Json(
        app.db
            .read(move |tx| crate::evc::evc_modes(tx, &name))
            .await?,
    ))
}

#[utoipa::path(get, path = "/api/v1/clusters/{name}/drs", tag = "clusters",
    params(("name" = String, Path, description = "Cluster name")),
    responses(
        (status = 200, description = "The cluster's DRS settings (defaults: manual, threshold 3)", body = DrsSettings),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such cluster", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn get_drs(
    State(app): AppState,
    PathArg(name): PathArg<String>,
) -> ApiResult<Json<DrsSettings>> {
    Ok(axum::Json(crate::drs::settings(&app, name).await?))
}

#[utoipa::path(put, path = "/api/v1/clusters/{name}/drs", tag = "clusters",
    params(("name" = String, Path, description = "Cluster name")),
    request_body = DrsSettings,
    responses(
        (status = 200, description = "Settings stored; the scheduler runs a pass at once", body = DrsSettings),
        (status = 400, description = "Invalid body, unknown automation level or threshold outside 1..5", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such cluster", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn set_drs(
    State(app): AppState,
    PathArg(name): PathArg<String>,
    Body(req): Body<DrsSettings>,
) -> ApiResult<Json<DrsSettings>> {
    Ok(axum::Json(crate::drs::set_settings(&app, name, req).await?))
}

#[utoipa::path(get, path = "/api/v1/clusters/{name}/rules", tag = "clusters",
    params(("name" = String, Path, description = "Cluster name")),
    responses(
        (status = 200, description = "The cluster's placement rules, by name", body = Vec<DrsRule>),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such cluster", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn list_rules(
    State(app): AppState,
    PathArg(name): PathArg<String>,
) -> ApiResult<Json<Vec<DrsRule>>> {
    Ok(axum::Json(crate::rules::list(&app, name).await?))
}

#[utoipa::path(post, path = "/api/v1/clusters/{name}/rules", tag = "clusters",
    params(("name" = String, Path, description = "Cluster name")),
    request_body = DrsRule,
    responses(
        (status = 201, description = "Rule stored; DRS keeps it from its next decision on", body = DrsRule),
        (status = 400, description = "Invalid rule (name, members for its kind)", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such cluster, VM or host", body = ErrorBody),
        (status = 409, description = "Name taken, or the rule conflicts with another (named)", body = ErrorBody),
        (status = 422, description = "A VM or host of another cluster", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn create_rule(
    State(app): AppState,
    PathArg(name): PathArg<String>,
    Extension(by): Extension<Caller>,
    Body(rule): Body<DrsRule>,
) -> ApiResult<(StatusCode, Json<DrsRule>)> {
    let r = crate::rules::create(&app, name, rule, by.name.clone()).await?;
    Ok((StatusCode::CREATED, axum::Json(r)))
}

#[utoipa::path(delete, path = "/api/v1/rules/{name}", tag = "clusters",
    params(("name" = String, Path, description = "Rule name")),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such rule", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn remove_rule(
    State(app): AppState,
    PathArg(name): PathArg<String>,
    Extension(by): Extension<Caller>,
) -> ApiResult<StatusCode> {
    crate::rules::remove(&app, name, by.name.clone()).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/clusters/{name}/pools", tag = "clusters",
    params(("name" = String, Path, description = "Cluster name")),
    responses(
        (status = 200, description = "The cluster's resource pools, by name", body = Vec<ResourcePool>),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such cluster", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn list_pools(
    State(app): AppState,
    PathArg(name): PathArg<String>,
) -> ApiResult<Json<Vec<ResourcePool>>> {
    Ok(axum::Json(crate::pools::list(&app, name).await?))
}

#[utoipa::path(post, path = "/api/v1/clusters/{name}/pools", tag = "clusters",
    params(("name" = String, Path, description = "Cluster name")),
    request_body = CreatePool,
    responses(
        (status = 201, description = "Pool created", body = ResourcePool),
        (status = 400, description = "Invalid name or settings", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such cluster", body = ErrorBody),
        (status = 409, description = "Name taken", body = ErrorBody),
        (status = 422, description = "The tree would not hold (unknown parent, reservations that do not fit: each named)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn create_pool(
    State(app): AppState,
    PathArg(name): PathArg<String>,
    Extension(by): Extension<Caller>,
    Body(req): Body<CreatePool>,
) -> ApiResult<(StatusCode, Json<ResourcePool>)> {
    let p = crate::pools::create(&app, name, req, by.name.clone()).await?;
    Ok((StatusCode::CREATED, axum::Json(p)))
}

#[utoipa::path(get, path = "/api/v1/pools/{name}", tag = "clusters",
    params(("name" = String, Path, description = "Pool name")),
    responses(
        (status = 200, description = "The pool, its children and VMs", body = ResourcePool),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such pool", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn get_pool(
    State(app): AppState,
    PathArg(name): PathArg<String>,
) -> ApiResult<Json<ResourcePool>> {
    Ok(axum::Json(crate::pools::get(&app, name).await?))
}

#[utoipa::path(put, path = "/api/v1/pools/{name}", tag = "clusters",
    params(("name" = String, Path, description = "Pool name")),
    request_body = PoolSettings,
    responses(
        (status = 200, description = "New settings stored; the running members' hosts enforce the new division", body = ResourcePool),
        (status = 400, description = "Invalid settings", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such pool", body = ErrorBody),
        (status = 422, description = "The tree would not hold", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn update_pool(
    State(app): AppState,
    PathArg(name): PathArg<String>,
    Extension(by): Extension<Caller>,
    Body(settings): Body<PoolSettings>,
) -> ApiResult<Json<ResourcePool>> {
    Ok(axum::Json(
        crate::pools::update(&app, name, settings, by.name.clone()).await?,
    ))
}

#[utoipa::path(delete, path = "/api/v1/pools/{name}", tag = "clusters",
    params(("name" = String, Path, description = "Pool name")),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such pool", body = ErrorBody),
        (status = 409, description = "It still holds VMs or pools (named)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn remove_pool(
    State(app): AppState,
    PathArg(name): PathArg<String>,
    Extension(by): Extension<Caller>,
) -> ApiResult<StatusCode> {
    crate::pools::remove(&app, name, by.name.clone()).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/images", tag = "images",
    responses(
        (status = 200, description = "The image catalogue, by name", body = Vec<Image>),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn list_images(State(app): AppState) -> ApiResult<Json<Vec<Image>>> {
    Ok(axum::Json(crate::images::list(&app).await?))
}

#[utoipa::path(post, path = "/api/v1/images", tag = "images",
    request_body = ImportImage,
    responses(
        (status = 201, description = "Stored on the shared storage as qcow2, checked and checksummed", body = Image),
        (status = 400, description = "Invalid name or source path", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 409, description = "Name taken, or no host to do the work", body = ErrorBody),
        (status = 422, description = "The source is not a usable image (not qcow2 or raw, truncated, damaged, outside the shared storage, with a backing file): what is wrong", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn import_image(
    State(app): AppState,
    Extension(by): Extension<Caller>,
    Body(req): Body<ImportImage>,
) -> ApiResult<(StatusCode, Json<Image>)> {
    let img = crate::images::import(&app, req, by.name.clone()).await?;
    Ok((StatusCode::CREATED, axum::Json(img)))
}

#[utoipa::path(get, path = "/api/v1/images/{name}", tag = "images",
    params(("name" = String, Path, description = "Image name")),
    responses(
        (status = 200, description = "The image and the VMs using it", body = Image),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such image", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn get_image(State(app): AppState, PathArg(name): PathArg<String>) -> ApiResult<Json<Image>> {
    Ok(axum::Json(crate::images::get(&app, name).await?))
}

#[utoipa::path(delete, path = "/api/v1/images/{name}", tag = "images",
    params(("name" = String, Path, description = "Image name")),
    responses(
        (status = 204, description = "Removed, and its template deleted"),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such image", body = ErrorBody),
        (status = 409, description = "VMs use it (named)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn remove_image(
    State(app): AppState,
    PathArg(name): PathArg<String>,
    Extension(by): Extension<Caller>,
) -> ApiResult<StatusCode> {
    crate::images::remove(&app, name, by.name.clone()).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/datastores", tag = "datastores",
    responses(
        (status = 200, description = "The datastores, with the VMs using each and what every host last said it reaches", body = Vec<Datastore>),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn list_datastores(State(app): AppState) -> ApiResult<Json<Vec<Datastore>>> {
    Ok(axum::Json(crate::datastores::list(&app).await?))
}

#[utoipa::path(post, path = "/api/v1/datastores", tag = "datastores",
    request_body = AddDatastore,
    responses(
        (status = 201, description = "Added (a directory is marked), and every connected host asked whether it reaches it", body = Datastore),
        (status = 400, description = "Invalid name, path, portal, IQN or device id", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 409, description = "Name taken, the same storage is already a datastore, or no host to mark a directory", body = ErrorBody),
        (status = 422, description = "No host sees the directory beneath its storage root", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn add_datastore(
    State(app): AppState,
    Extension(by): Extension<Caller>,
    Body(req): Body<AddDatastore>,
) -> ApiResult<(StatusCode, Json<Datastore>)> {
    let ds = crate::datastores::add(&app, req, by.name.clone()).await?;
    Ok((StatusCode::CREATED, axum::Json(ds)))
}

#[utoipa::path(get, path = "/api/v1/datastores/{name}", tag = "datastores",
    params(("name" = String, Path, description = "Datastore name")),
    responses(
        (status = 200, description = "The datastore, the VMs using it, and each host's last answer", body = Datastore),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such datastore", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn get_datastore(
    State(app): AppState,
    PathArg(name): PathArg<String>,
) -> ApiResult<Json<Datastore>> {
    Ok(axum::Json(crate::datastores::get(&app, name).await?))
}

#[utoipa::path(delete, path = "/api/v1/datastores/{name}", tag = "datastores",
    params(("name" = String, Path, description = "Datastore name")),
    responses(
        (status = 204, description = "Removed from the catalogue; its storage is untouched"),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such datastore", body = ErrorBody),
        (status = 409, description = "VMs or images use it (named)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn remove_datastore(
    State(app): AppState,
    PathArg(name): PathArg<String>,
    Extension(by): Extension<Caller>,
) -> ApiResult<StatusCode> {
    crate::datastores::remove(&app, name, by.name.clone()).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(put, path = "/api/v1/vms/{name}/pool", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    request_body = SetVmPool,
    responses(
        (status = 200, description = "The VM in its new pool (the new division applied to the running members)", body = Vm),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such VM or pool", body = ErrorBody),
        (status = 422, description = "A pool of another cluster, or a tree that would not hold", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn set_vm_pool(
    State(app): AppState,
    PathArg(name): PathArg<String>,
    Extension(by): Extension<Caller>,
    Body(req): Body<SetVmPool>,
) -> ApiResult<Json<Vm>> {
    crate::pools::set_vm_pool(&app, name.clone(), req.pool, by.name.clone()).await?;
    get_vm(State(app), PathArg(name)).await
}

#[utoipa::path(get, path = "/api/v1/clusters/{name}/migration", tag = "clusters",
    params(("name" = String, Path, description = "Cluster name")),
    responses(
        (status = 200, description = "The cluster's migration policy (default: encryption required)", body = ClusterMigrationSettings),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such cluster", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn get_cluster_migration(
    State(app): AppState,
    PathArg(name): PathArg<String>,
) -> ApiResult<Json<ClusterMigrationSettings>> {
    Ok(axum::Json(
        crate::inventory::migration_settings(&app, name).await?,
    ))
}

#[utoipa::path(put, path = "/api/v1/clusters/{name}/migration", tag = "clusters",
    params(("name" = String, Path, description = "Cluster name")),
    request_body = ClusterMigrationSettings,
    responses(
        (status = 200, description = "Stored; migrations that start from now on follow it", body = ClusterMigrationSettings),
        (status = 400, description = "Invalid body or unknown encryption mode", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 403, description = "The token is not an admin's", body = ErrorBody),
        (status = 404, description = "No such cluster", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn set_cluster_migration(
    State(app): AppState,
    PathArg(name): PathArg<String>,
    Body(req): Body<ClusterMigrationSettings>,
) -> ApiResult<Json<ClusterMigrationSettings>> {
    Ok(axum::Json(
        crate::inventory::set_migration_settings(&app, name, req).await?,
    ))
}

#[utoipa::path(get, path = "/api/v1/clusters/{name}/drs/recommendations", tag = "clusters",
    params(("name" = String, Path, description = "Cluster name")),
    responses(
        (status = 200, description = "The engine's balance pass now: moves in order, with reasons", body = DrsRecommendations),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such cluster", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn drs_recommendations(
    State(app): AppState,
    PathArg(name): PathArg<String>,
) -> ApiResult<Json<DrsRecommendations>> {
    Ok(axum::Json(crate::drs::recommend(&app, name).await?))
}

#[utoipa::path(post, path = "/api/v1/clusters/{name}/drs/apply", tag = "clusters",
    params(("name" = String, Path, description = "Cluster name")),
    responses(
        (status = 202, description = "Task `drs_apply` queued: a fresh pass's moves run one at a time as live migrations; its result is a DrsApplyResult", body = Task),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such cluster", body = ErrorBody),
        (status = 409, description = "An apply task already runs on the cluster", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn drs_apply(
    State(app): AppState,
    PathArg(name): PathArg<String>,
) -> ApiResult<(StatusCode, Json<Task>)> {
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(crate::drs::apply(&app, name, "asked through the API").await?),
    ))
}

// ---- hosts ----

#[utoipa::path(post, path = "/api/v1/hosts/register", tag = "hosts",
    request_body = RegisterHost,
    responses(
        (status = 200, description = "Registered (again); heartbeat with the host token", body = Registered),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 401, description = "Missing or wrong enrolment token", body = ErrorBody),
        (status = 404, description = "No such cluster (the agent retries)", body = ErrorBody),
        (status = 409, description = "Host has VMs in another cluster", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn register_host(
    State(app): AppState,
    headers: HeaderMap,
    peer: Option<Extension<PeerCertificate>>,
    Body(req): Body<RegisterHost>,
) -> ApiResult<Json<Registered>> {
    let peer = crate::pki::peer_host(peer.as_ref().map(|p| &p.0));
    Ok(axum::Json(
        inventory::register_host(&app, bearer(&headers), peer, req).await?,
    ))
}

/// Longest and default lifetime of a join token.
const MAX_JOIN_TTL_S: u64 = 7 * 24 * 3600;
const DEFAULT_JOIN_TTL_S: u64 = 3600;

#[utoipa::path(post, path = "/api/v1/hosts/{name}/join-token", tag = "hosts",
    params(("name" = String, Path, description = "The host the token may register")),
    request_body = AddHost,
    responses(
        (status = 201, description = "A one-time join token, shown this once", body = JoinToken),
        (status = 400, description = "Invalid name or lifetime", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 403, description = "Only an admin adds hosts", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn add_host(
    State(app): AppState,
    Extension(by): Extension<Caller>,
    PathArg(name): PathArg<String>,
    Body(req): Body<AddHost>,
) -> ApiResult<(StatusCode, Json<JoinToken>)> {
    let ttl_s = req.ttl_s.unwrap_or(DEFAULT_JOIN_TTL_S);
    if ttl_s == 0 || ttl_s > MAX_JOIN_TTL_S {
        return Err(CenterError::invalid(format!(
            "ttl_s {ttl_s} is out of range: give 1 to {MAX_JOIN_TTL_S} seconds (a week)"
        ))
        .into());
    }
    let (token, expires_at) = inventory::add_host(
        &app,
        name.clone(),
        std::time::Duration::from_secs(ttl_s),
        by.name,
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(JoinToken {
            host: name,
            token,
            expires_at,
            ca_fingerprint: app.pki.as_ref().map(|p| p.ca.fingerprint().to_string()),
        }),
    ))
}

#[utoipa::path(delete, path = "/api/v1/hosts/{name}", tag = "hosts",
    params(("name" = String, Path, description = "Host name")),
    responses(
        (status = 204, description = "Removed: its secret no longer works"),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 403, description = "Only an admin removes hosts", body = ErrorBody),
        (status = 404, description = "No such host", body = ErrorBody),
        (status = 409, description = "The host still has VMs", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn remove_host(
    State(app): AppState,
    PathArg(name): PathArg<String>,
) -> ApiResult<StatusCode> {
    inventory::remove_host(&app, name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/hosts/{id}/heartbeat", tag = "hosts",
    params(("id" = Uuid, Path, description = "Host id from the registration")),
    request_body = Heartbeat,
    responses(
        (status = 204, description = "Recorded"),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 401, description = "Missing or wrong host token (register again)", body = ErrorBody),
        (status = 404, description = "Unknown host (register again)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn heartbeat(
    State(app): AppState,
    PathArg(id): PathArg<Uuid>,
    headers: HeaderMap,
    peer: Option<Extension<PeerCertificate>>,
    Body(hb): Body<Heartbeat>,
) -> ApiResult<StatusCode> {
    let peer = crate::pki::peer_host(peer.as_ref().map(|p| &p.0));
    inventory::heartbeat(&app, id, bearer(&headers), peer, hb).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Answered by standbys too (a read): the destination of a migration whose leader died right
/// after committing learns the commit here and runs the guest without waiting for the next
/// leader.
#[utoipa::path(get, path = "/api/v1/hosts/{id}/ownership", tag = "hosts",
    params(("id" = Uuid, Path, description = "Host id from the registration"), OwnershipQuery),
    responses(
        (status = 200, description = "Whether the store names this host the VM's owner", body = Ownership),
        (status = 401, description = "Missing or wrong host token (register again)", body = ErrorBody),
        (status = 404, description = "Unknown host (register again)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn ownership(
    State(app): AppState,
    PathArg(id): PathArg<Uuid>,
    QueryArg(q): QueryArg<OwnershipQuery>,
    headers: HeaderMap,
    peer: Option<Extension<PeerCertificate>>,
) -> ApiResult<Json<Ownership>> {
    let peer = crate::pki::peer_host(peer.as_ref().map(|p| &p.0));
    Ok(axum::Json(
        inventory::ownership(&app, id, bearer(&headers), peer, q.vm).await?,
    ))
}

#[utoipa::path(get, path = "/api/v1/hosts", tag = "hosts",
    params(ListQuery),
    responses(
        (status = 200, description = "The hosts, by name: all of them, or the page asked for", body = Vec<Host>),
        (status = 400, description = "limit is 0, or a VM filter (host, unplaced) was given", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn list_hosts(
    State(app): AppState,
    QueryArg(q): QueryArg<ListQuery>,
) -> ApiResult<Json<Vec<Host>>> {
    check_page(&q)?;
    if q.host.is_some() || q.unplaced.is_some() {
        return Err(CenterError::invalid(
            "host= and unplaced= filter VMs; hosts take q, after, limit and cluster",
        )
        .into());
    }
    let hosts = app
        .db
        .read(move |tx| {
            let mut hosts = tx.hosts()?;
            if let Some(c) = &q.cluster {
                hosts.retain(|h| &h.cluster == c);
            }
            q.page(hosts, |h| h.name.as_str())
                .iter()
                .map(|h| tx.host_view(h))
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
    Ok(axum::Json(hosts))
}

#[utoipa::path(get, path = "/api/v1/hosts/{name}", tag = "hosts",
    params(("name" = String, Path, description = "Host name")),
    responses(
        (status = 200, description = "The host", body = Host),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such host", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn get_host(State(app): AppState, PathArg(name): PathArg<String>) -> ApiResult<Json<Host>> {
    let h = app
        .db
        .read(move |tx| {
            let h = tx.host_by_name(&name)?.ok_or_else(|| {
                CenterError::not_found(format!("host {name} is not registered: see tern host list"))
            })?;
            Ok::<_, ApiErr>(tx.host_view(&h)?)
        })
        .await?;
    Ok(axum::Json(h))
}

#[utoipa::path(post, path = "/api/v1/hosts/{name}/maintenance", tag = "hosts",
    params(("name" = String, Path, description = "Host name")),
    request_body(content = HostMaintenance, description = "`enter`: flag the host at once (nothing new lands or starts there), then live-migrate its running VMs away (destinations chosen by the DRS engine) and re-home its stopped ones; the host stays flagged if it cannot be emptied. `exit`: return it to service."),
    responses(
        (status = 202, description = "enter: task `host_maintenance_enter` queued (or already succeeded when there is nothing to do); follow it with GET /api/v1/tasks/{id}; its result is a MaintenanceResult", body = Task),
        (status = 200, description = "exit: task `host_maintenance_exit`, already succeeded", body = Task),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such host", body = ErrorBody),
        (status = 409, description = "Host disconnected (enter), or a maintenance entry is already running on it", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn host_maintenance(
    State(app): AppState,
    PathArg(name): PathArg<String>,
    Body(req): Body<HostMaintenance>,
) -> ApiResult<(StatusCode, Json<Task>)> {
    Ok(match req.action {
        MaintenanceAction::Enter => (
            StatusCode::ACCEPTED,
            axum::Json(crate::maintenance::enter(&app, name).await?),
        ),
        MaintenanceAction::Exit => (
            StatusCode::OK,
            axum::Json(crate::maintenance::exit(&app, name).await?),
        ),
    })
}

#[utoipa::path(get, path = "/api/v1/hosts/{name}/maintenance-plan", tag = "hosts",
    params(("name" = String, Path, description = "Host name")),
    responses(
        (status = 200, description = "What entering maintenance would do now (nothing is moved): the scheduler's live migrations, the VMs that could not leave and why, the stopped VMs to re-home", body = MaintenancePlan),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such host", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn maintenance_plan(
    State(app): AppState,
    PathArg(name): PathArg<String>,
) -> ApiResult<Json<MaintenancePlan>> {
    Ok(axum::Json(crate::maintenance::plan(&app, name).await?))
}

#[utoipa::path(post, path = "/api/v1/hosts/{name}/evacuate", tag = "hosts",
    params(("name" = String, Path, description = "Host name")),
    responses(
        (status = 202, description = "Task `host_evacuate` queued: the host's running VMs move live to hosts the DRS engine picks, within the per-host limits; the host keeps its flags and its stopped VMs. Its result is a MaintenanceResult", body = Task),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such host", body = ErrorBody),
        (status = 409, description = "Host disconnected, or a task is already emptying it", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn host_evacuate(
    State(app): AppState,
    PathArg(name): PathArg<String>,
    Extension(by): Extension<Caller>,
) -> ApiResult<(StatusCode, Json<Task>)> {
    let why = format!("asked by {}", by.name);
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(crate::maintenance::evacuate(&app, name, why).await?),
    ))
}

#[utoipa::path(put, path = "/api/v1/hosts/{name}/health", tag = "hosts",
    params(("name" = String, Path, description = "Host name")),
    request_body(content = DegradeHost, description = "Mark the host degraded: it takes no new VMs, and the cluster's proactive mode acts (automatic: emptied live at once; recommend: an event recommends it)."),
    responses(
        (status = 200, description = "The host, degraded", body = Host),
        (status = 400, description = "Invalid reason", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such host", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn degrade_host(
    State(app): AppState,
    PathArg(name): PathArg<String>,
    Extension(by): Extension<Caller>,
    Body(req): Body<DegradeHost>,
) -> ApiResult<Json<Host>> {
    Ok(axum::Json(
        crate::health::degrade(&app, name, req.reason, by.name).await?,
    ))
}

#[utoipa::path(delete, path = "/api/v1/hosts/{name}/health", tag = "hosts",
    params(("name" = String, Path, description = "Host name")),
    responses(
        (status = 200, description = "The host, restored: it takes VMs again and its health counters are judged from their values now", body = Host),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such host", body = ErrorBody),
        (status = 409, description = "A task is emptying the host", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn restore_host(
    State(app): AppState,
    PathArg(name): PathArg<String>,
    Extension(by): Extension<Caller>,
) -> ApiResult<Json<Host>> {
    Ok(axum::Json(
        crate::health::restore(&app, name, by.name).await?,
    ))
}

// ---- VMs ----

#[utoipa::path(post, path = "/api/v1/vms", tag = "vms",
    request_body = CreateVm,
    responses(
        (status = 201, description = "VM created (stopped)", body = Vm),
        (status = 400, description = "Invalid spec", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such cluster or host", body = ErrorBody),
        (status = 409, description = "Name or MAC taken, host unusable, no host to ask", body = ErrorBody),
        (status = 422, description = "Does not fit the host, or files missing on its shared storage", body = ErrorBody),
        (status = 502, description = "The host's agent could not be asked", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn create_vm(
    State(app): AppState,
    Body(req): Body<CreateVm>,
) -> ApiResult<(StatusCode, Json<Vm>)> {
    let vm = inventory::create_vm(&app, req).await?;
    Ok((StatusCode::CREATED, axum::Json(vm)))
}

#[utoipa::path(get, path = "/api/v1/vms", tag = "vms",
    params(ListQuery),
    responses(
        (status = 200, description = "The VMs, by name: all of them, or the page asked for", body = Vec<Vm>),
        (status = 400, description = "limit is 0", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn list_vms(
    State(app): AppState,
    QueryArg(q): QueryArg<ListQuery>,
) -> ApiResult<Json<Vec<Vm>>> {
    check_page(&q)?;
    let mut vms = app
        .db
        .read(move |tx| {
            let mut index = tx.vm_index()?;
            index.retain(|v| {
                q.cluster.as_ref().is_none_or(|c| &v.cluster == c)
                    && q.host.as_ref().is_none_or(|h| v.host.as_ref() == Some(h))
                    && q.unplaced.is_none_or(|u| u == v.host.is_none())
            });
            // The page is chosen on the index first: only its VMs are read whole.
            let mut out = Vec::new();
            for row in q.page(index, |v| v.name.as_str()) {
                if let Some(vm) = tx.vm_by_name(&row.name)? {
                    out.push(crate::evc::vm_view(tx, &vm)?);
                }
            }
            Ok::<_, CenterError>(out)
        })
        .await?;
    for v in &mut vms {
        crate::pools::show_enforced(&app, v);
    }
    Ok(axum::Json(vms))
}

fn check_page(q: &ListQuery) -> Result<(), CenterError> {
    if q.limit == Some(0) {
        return Err(CenterError::invalid(format!(
            "limit must be 1 to {}",
            ListQuery::MAX_LIMIT
        )));
    }
    Ok(())
}

#[utoipa::path(get, path = "/api/v1/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses(
        (status = 200, description = "The VM", body = Vm),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such VM", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn get_vm(State(app): AppState, PathArg(name): PathArg<String>) -> ApiResult<Json<Vm>> {
    let mut vm = app
        .db
        .read(move |tx| {
            let vm = tx
                .vm_by_name(&name)?
                .ok_or_else(|| CenterError::vm_not_found(&name))?;
            Ok::<_, ApiErr>(crate::evc::vm_view(tx, &vm)?)
        })
        .await?;
    crate::pools::show_enforced(&app, &mut vm);
    Ok(axum::Json(vm))
}

#[utoipa::path(delete, path = "/api/v1/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such VM", body = ErrorBody),
        (status = 409, description = "VM running, state unknown, or a task is acting on it", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn delete_vm(State(app): AppState, PathArg(name): PathArg<String>) -> ApiResult<StatusCode> {
    inventory::delete_vm(&app, name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/start", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses(
        (status = 202, description = "Start task queued; follow it with GET /api/v1/tasks/{id}", body = Task),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such VM", body = ErrorBody),
        (status = 409, description = "Host unusable, or a task is acting on the VM", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn start_vm(
    State(app): AppState,
    PathArg(name): PathArg<String>,
) -> ApiResult<(StatusCode, Json<Task>)> {
    let t = power::start_vm(&app, name).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(t)))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/stop", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    request_body(content = StopVm, description = "Optional; an empty body is a graceful stop"),
    responses(
        (status = 202, description = "Stop task queued; follow it with GET /api/v1/tasks/{id}", body = Task),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such VM", body = ErrorBody),
        (status = 409, description = "Host disconnected, or a task is acting on the VM", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn stop_vm(
    State(app): AppState,
    PathArg(name): PathArg<String>,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Task>)> {
    let req: StopVm = if body.iter().all(u8::is_ascii_whitespace) {
        StopVm::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| CenterError::invalid(format!("invalid JSON body: {e}")))?
    };
    let t = power::stop_vm(&app, name, req).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(t)))
}

#[utoipa::path(put, path = "/api/v1/vms/{name}/resources", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    request_body(content = Resources, description = "The whole new policy: shares, reservations and limits (a field left out goes back to its default)"),
    responses(
        (status = 200, description = "The VM with its new policy, applied live by its host if it runs", body = Vm),
        (status = 400, description = "A policy that cannot hold (reservation above limit, memory limit below the VM's RAM, bad amount)", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such VM", body = ErrorBody),
        (status = 409, description = "A task acts on the VM, or its host cannot enforce policies", body = ErrorBody),
        (status = 502, description = "The host's agent could not apply it", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn set_vm_resources(
    State(app): AppState,
    PathArg(name): PathArg<String>,
    Extension(by): Extension<Caller>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Vm>> {
    let resources: Resources = serde_json::from_slice(&body)
        .map_err(|e| CenterError::invalid(format!("invalid resource policy: {e}")))?;
    let vm = crate::resources::set_resources(&app, name, resources, by.name.clone()).await?;
    Ok(axum::Json(vm))
}

#[utoipa::path(get, path = "/api/v1/vms/{name}/console", tag = "vms",
    params(("name" = String, Path, description = "VM name"), ConsoleQuery),
    responses(
        (status = 200, description = "The tail of the serial console log", body = String, content_type = "text/plain"),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such VM, or it never ran", body = ErrorBody),
        (status = 502, description = "The host's agent could not be asked", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn vm_console(
    State(app): AppState,
    PathArg(name): PathArg<String>,
    QueryArg(q): QueryArg<ConsoleQuery>,
) -> ApiResult<Response> {
    let text = inventory::console(&app, name, q.bytes).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

#[utoipa::path(get, path = "/api/v1/hosts/{name}/metrics", tag = "hosts",
    params(("name" = String, Path, description = "Host name")),
    responses(
        (status = 200, description = "The host agent's Prometheus metrics, fetched through the center (QEMU processes by state, migrations in progress and ended)", body = String, content_type = "application/openmetrics-text"),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such host", body = ErrorBody),
        (status = 502, description = "The host's agent could not be asked", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn host_metrics(State(app): AppState, PathArg(name): PathArg<String>) -> ApiResult<Response> {
    let n = name.clone();
    let host = app
        .db
        .read(move |tx| tx.host_by_name(&n))
        .await?
        .ok_or_else(|| CenterError::host_not_found(&name))?;
    let text = app.agent(&host).metrics().await.map_err(|e| {
        CenterError::agent(format!("could not read the metrics of host {name}: {e}"))
    })?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

#[utoipa::path(get, path = "/api/v1/vms/{name}/can-migrate", tag = "vms",
    params(("name" = String, Path, description = "VM name"), CanMigrateQuery),
    responses(
        (status = 200, description = "Every migration pre-check with its result (a dry run: nothing moves)", body = MigrationCheckReport),
        (status = 400, description = "No destination given", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such VM or host", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn can_migrate(
    State(app): AppState,
    PathArg(name): PathArg<String>,
    QueryArg(q): QueryArg<CanMigrateQuery>,
) -> ApiResult<Json<MigrationCheckReport>> {
    Ok(axum::Json(crate::evc::can_migrate(&app, name, q.to).await?))
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/migrate", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    request_body = MigrateVm,
    responses(
        (status = 202, description = "Migration task queued (kind `vm_migrate`); follow it with GET /api/v1/tasks/{id}; its result is a MigrationResult", body = Task),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such VM or host", body = ErrorBody),
        (status = 409, description = "Already on that host, or a task is acting on the VM", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn migrate_vm(
    State(app): AppState,
    PathArg(name): PathArg<String>,
    Body(req): Body<MigrateVm>,
) -> ApiResult<(StatusCode, Json<Task>)> {
    let t = crate::migrate::migrate_vm(&app, name, req).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(t)))
}

/// `GET /metrics`: Prometheus text format, for any valid token (a scraper's is a viewer's).
async fn metrics(State(app): AppState, headers: HeaderMap) -> Response {
    if let Err(e) = caller(&app, &headers).await {
        return ApiErr::from(e).into_response();
    }
    let streams = i64::try_from(app.feed.receiver_count()).unwrap_or(0);
    let read = app
        .db
        .read(move |tx| {
            let count = |items: Vec<String>| {
                let mut m: std::collections::BTreeMap<String, i64> = Default::default();
                for i in items {
                    *m.entry(i).or_default() += 1;
                }
                m.into_iter().collect::<Vec<_>>()
            };
            let text = |v: &dyn erased_text::Text| v.text();
            let hosts = tx.hosts()?;
            let vms = tx.vms()?;
            let active = tx.active_tasks(None)?;
            let mut by_kind: std::collections::BTreeMap<(String, String), i64> = Default::default();
            for t in &active {
                *by_kind
                    .entry((text(&t.task.kind), text(&t.task.state)))
                    .or_default() += 1;
            }
            Ok::<_, CenterError>(crate::metrics::Reading {
                hosts_by_state: count(hosts.iter().map(|h| text(&h.state())).collect()),
                vms_by_state: count(vms.iter().map(|v| text(&v.actual)).collect()),
                active_tasks: by_kind.into_iter().map(|((k, s), n)| (k, s, n)).collect(),
                host_load: hosts
                    .iter()
                    .filter_map(|h| {
                        let l = h.load.as_ref()?;
                        Some((
                            h.name.clone(),
                            l.cpu_percent / 100.0,
                            i64::try_from(l.memory_used_mib << 20).unwrap_or(i64::MAX),
                        ))
                    })
                    .collect(),
                streams,
            })
        })
        .await;
    match read.map(|r| app.metrics.render(r)) {
        Ok(Ok(text)) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Ok(Err(e)) => ApiErr::from(CenterError::internal(e.to_string())).into_response(),
        Err(e) => ApiErr::from(e).into_response(),
    }
}

/// Serde names of the enums metrics count by.
mod erased_text {
    pub trait Text {
        fn text(&self) -> String;
    }
    impl<T: serde::Serialize> Text for T {
        fn text(&self) -> String {
            serde_json::to_value(self)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| "unknown".into())
        }
    }
}

// ---- tasks and events ----

#[utoipa::path(get, path = "/api/v1/whoami", tag = "tokens",
    responses(
        (status = 200, description = "The token's name and role (what a client may show and do)", body = Whoami),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn whoami(Extension(by): Extension<Caller>) -> ApiResult<Json<Whoami>> {
    Ok(axum::Json(Whoami {
        name: by.name.clone(),
        role: by.role,
    }))
}

#[utoipa::path(get, path = "/api/v1/stream", tag = "events",
    responses(
        (status = 200, description = "Server-sent events, for as long as the client reads: `hello` (the caller's name and role), then `event` (each new Event, once), `task` (a Task whenever it is created or its state, progress, phase or result changes), `resync` (messages were missed: reload), and a keep-alive comment every 15 s", content_type = "text/event-stream", body = String),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn live_stream(
    State(app): AppState,
    Extension(by): Extension<Caller>,
) -> axum::response::sse::Sse<
    impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    use axum::response::sse::{Event as Sse, KeepAlive};
    use futures::StreamExt;
    use tokio::sync::broadcast::error::RecvError;
    let hello = serde_json::json!({"name": by.name, "role": by.role}).to_string();
    let first = futures::stream::once(async move { Ok(Sse::default().event("hello").data(hello)) });
    let rest = futures::stream::unfold(app.feed.subscribe(), |mut rx| async move {
        match rx.recv().await {
            Ok((name, data)) => Some((Ok(Sse::default().event(name).data(&*data)), rx)),
            Err(RecvError::Lagged(_)) => Some((Ok(Sse::default().event("resync").data("{}")), rx)),
            Err(RecvError::Closed) => None,
        }
    });
    axum::response::sse::Sse::new(first.chain(rest))
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
}

/// Most tasks or events one list call returns.
const MAX_LIST: u32 = 10_000;

#[utoipa::path(get, path = "/api/v1/tasks", tag = "tasks",
    params(TaskQuery),
    responses(
        (status = 200, description = "Tasks, newest last", body = Vec<Task>),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn list_tasks(
    State(app): AppState,
    QueryArg(q): QueryArg<TaskQuery>,
) -> ApiResult<Json<Vec<Task>>> {
    let limit = q.limit.unwrap_or(1000).min(MAX_LIST);
    let tasks = app
        .db
        .read(move |tx| tx.tasks(limit, q.vm.as_deref()))
        .await?;
    Ok(axum::Json(tasks))
}

#[utoipa::path(get, path = "/api/v1/tasks/{id}", tag = "tasks",
    params(("id" = Uuid, Path, description = "Task id")),
    responses(
        (status = 200, description = "The task", body = Task),
        (status = 400, description = "Not a task id", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn get_task(State(app): AppState, PathArg(id): PathArg<Uuid>) -> ApiResult<Json<Task>> {
    let t = app
        .db
        .read(move |tx| {
            tx.task(id)?.map(|t| t.task).ok_or_else(|| {
                CenterError::not_found(format!("task {id} does not exist: see tern task list"))
            })
        })
        .await?;
    Ok(axum::Json(t))
}

#[utoipa::path(get, path = "/api/v1/tasks/{id}/timeline", tag = "tasks",
    params(("id" = Uuid, Path, description = "Task id (a vm_migrate task)")),
    responses(
        (status = 200, description = "The migration's pre-copy readings and, once it switched over, its pause", body = MigrationTimeline),
        (status = 400, description = "Not a task id, or not a migration task", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn task_timeline(
    State(app): AppState,
    PathArg(id): PathArg<Uuid>,
) -> ApiResult<Json<MigrationTimeline>> {
    let t = app
        .db
        .read(move |tx| {
            let t = tx.task(id)?.map(|t| t.task).ok_or_else(|| {
                CenterError::not_found(format!("task {id} does not exist: see tern task list"))
            })?;
            if t.kind != TaskKind::VmMigrate {
                return Err(CenterError::invalid(format!(
                    "task {id} is a {} task: only migrations have a timeline",
                    serde_json::to_value(t.kind)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                )));
            }
            let samples = tx.migration_samples(id)?;
            let result: Option<MigrationResult> = t
                .result
                .clone()
                .and_then(|r| serde_json::from_value(r).ok());
            let since_start = |at: chrono::DateTime<chrono::Utc>| {
                u64::try_from((at - t.created_at).num_milliseconds()).ok()
            };
            Ok(MigrationTimeline {
                task: id,
                vm: t.vm.clone(),
                state: t.state,
                samples,
                pause_at_ms: result
                    .as_ref()
                    .and_then(|r| r.stopped_at)
                    .and_then(since_start),
                pause_ms: result.as_ref().and_then(|r| r.pause_ms),
                downtime_ms: result.as_ref().map(|r| r.downtime_ms),
                total_ms: result.as_ref().map(|r| r.total_ms),
            })
        })
        .await?;
    Ok(axum::Json(t))
}

#[utoipa::path(get, path = "/api/v1/hosts/{name}/load-history", tag = "hosts",
    params(("name" = String, Path, description = "Host name")),
    responses(
        (status = 200, description = "The host's load over the last hour, oldest first (kept in the center's memory)", body = HostLoadHistory),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such host", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn host_load_history(
    State(app): AppState,
    PathArg(name): PathArg<String>,
) -> ApiResult<Json<HostLoadHistory>> {
    let n = name.clone();
    let known = app.db.read(move |tx| tx.host_by_name(&n)).await?.is_some();
    if !known {
        return Err(CenterError::host_not_found(&name).into());
    }
    let period = std::time::Duration::from_millis(app.config.history_period_ms);
    Ok(axum::Json(app.history.host(&name, period)))
}

#[utoipa::path(get, path = "/api/v1/clusters/{name}/drs/history", tag = "clusters",
    params(("name" = String, Path, description = "Cluster name")),
    responses(
        (status = 200, description = "The cluster's DRS imbalance and target over the last hour, oldest first (kept in the center's memory)", body = DrsHistory),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such cluster", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn drs_history(
    State(app): AppState,
    PathArg(name): PathArg<String>,
) -> ApiResult<Json<DrsHistory>> {
    let settings = crate::drs::settings(&app, name.clone()).await?;
    let period = std::time::Duration::from_millis(app.config.history_period_ms);
    Ok(axum::Json(app.history.cluster(
        &name,
        settings.threshold,
        period,
    )))
}

#[utoipa::path(get, path = "/api/v1/control-plane", tag = "inventory",
    responses(
        (status = 200, description = "This center, whether it belongs to an HA group, which center leads and whether this one takes changes", body = ControlPlane),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn control_plane(State(app): AppState) -> ApiResult<Json<ControlPlane>> {
    let l = &app.leadership;
    Ok(axum::Json(ControlPlane {
        ha: l.is_ha(),
        center: app.config.ha.as_ref().map(|h| h.name.clone()),
        leader: l.leader().map(|i| CenterRef {
            name: i.name,
            url: i.url,
        }),
        term: l.term(),
        takes_changes: l.writable(),
    }))
}

#[utoipa::path(get, path = "/api/v1/summary", tag = "inventory",
    responses(
        (status = 200, description = "The inventory's counts: hosts and VMs by state, per cluster", body = Summary),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn summary(State(app): AppState) -> ApiResult<Json<Summary>> {
    let s = app
        .db
        .read(|tx| {
            let text = |v: &dyn erased_text::Text| v.text();
            let hosts = tx.hosts()?;
            let vms = tx.vm_index()?;
            let mut out = Summary {
                hosts: hosts.len() as u64,
                vms: vms.len() as u64,
                degraded_hosts: hosts.iter().filter(|h| h.health.is_degraded()).count() as u64,
                active_tasks: tx.active_tasks(None)?.len() as u64,
                ..Summary::default()
            };
            let mut clusters: std::collections::BTreeMap<String, ClusterSummary> = tx
                .clusters()?
                .into_iter()
                .map(|c| {
                    let s = ClusterSummary {
                        name: c.name.clone(),
                        ..Default::default()
                    };
                    (c.name, s)
                })
                .collect();
            for h in &hosts {
                *out.hosts_by_state.entry(text(&h.state())).or_default() += 1;
                if let Some(c) = clusters.get_mut(&h.cluster) {
                    c.hosts += 1;
                }
            }
            for v in &vms {
                *out.vms_by_state.entry(v.actual_state.clone()).or_default() += 1;
                if let Some(c) = clusters.get_mut(&v.cluster) {
                    c.vms += 1;
                    if v.actual_state == text(&tern_api::PowerState::Running) {
                        c.running_vms += 1;
                    }
                }
            }
            out.clusters = clusters.into_values().collect();
            Ok::<_, CenterError>(out)
        })
        .await?;
    Ok(axum::Json(s))
}

#[utoipa::path(post, path = "/api/v1/tasks/{id}/cancel", tag = "tasks",
    params(("id" = Uuid, Path, description = "Task id")),
    responses(
        (status = 200, description = "The task, cancelled", body = Task),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
        (status = 409, description = "The task has already ended", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn cancel_task(State(app): AppState, PathArg(id): PathArg<Uuid>) -> ApiResult<Json<Task>> {
    Ok(axum::Json(tasks::cancel(&app, id).await?))
}

#[utoipa::path(get, path = "/api/v1/events", tag = "events",
    params(EventQuery),
    responses(
        (status = 200, description = "Events, newest last", body = Vec<Event>),
        (status = 400, description = "Invalid query", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn list_events(
    State(app): AppState,
    QueryArg(q): QueryArg<EventQuery>,
) -> ApiResult<Json<Vec<Event>>> {
    let filter = EventFilter {
        limit: q.limit.unwrap_or(100).min(MAX_LIST),
        vm: q.vm,
        host: q.host,
    };
    Ok(axum::Json(app.db.read(move |tx| tx.events(&filter)).await?))
}

// ---- API tokens ----

#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens",
    request_body = CreateToken,
    responses(
        (status = 201, description = "Created; the secret is shown this once", body = CreatedToken),
        (status = 400, description = "Invalid name or role", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 403, description = "Only an admin manages tokens", body = ErrorBody),
        (status = 409, description = "A token of that name exists", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn create_token(
    State(app): AppState,
    Extension(by): Extension<Caller>,
    Body(req): Body<CreateToken>,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    if !tern_api::valid_name(&req.name) || req.name == auth::ADMIN_NAME {
        return Err(CenterError::invalid(format!(
            "token name {:?} is not valid: use 1 to 32 characters of a-z, 0-9 and '-' (not \
             \"{}\", the admin token file's name)",
            req.name,
            auth::ADMIN_NAME
        ))
        .into());
    }
    let secret = format!("tern_{}", crate::config::new_token());
    let hash = auth::token_hash(&secret);
    let CreateToken { name, role } = req;
    let created = app
        .db
        .write(move |tx| {
            let now = chrono::Utc::now();
            let t = tx.insert_token(&name, role, &hash, &by.name, now)?;
            tx.add_event(
                NewEvent::info(format!("token {name} ({role}) created by {}", by.name))
                    .actor(by.name.clone()),
                now,
            )?;
            Ok::<_, CenterError>(t)
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedToken {
            name: created.name,
            role: created.role,
            token: secret,
        }),
    ))
}

#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens",
    responses(
        (status = 200, description = "Every token, without its secret", body = Vec<ApiToken>),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 403, description = "Only an admin lists tokens", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn list_tokens(State(app): AppState) -> ApiResult<Json<Vec<ApiToken>>> {
    Ok(axum::Json(app.db.read(|tx| tx.tokens()).await?))
}

#[utoipa::path(delete, path = "/api/v1/tokens/{name}", tag = "tokens",
    params(("name" = String, Path, description = "Token name")),
    responses(
        (status = 204, description = "Revoked: the token fails from the next call on"),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 403, description = "Only an admin revokes tokens", body = ErrorBody),
        (status = 404, description = "No such token", body = ErrorBody),
    ),
    security(("bearer" = [])))]
async fn revoke_token(
    State(app): AppState,
    Extension(by): Extension<Caller>,
    PathArg(name): PathArg<String>,
) -> ApiResult<StatusCode> {
    app.db
        .write(move |tx| {
            if !tx.delete_token(&name)? {
                return Err(CenterError::not_found(format!(
                    "no token is named {name}: see tern token list"
                )));
            }
            tx.add_event(
                NewEvent::warning(format!("token {name} revoked by {}", by.name))
                    .actor(by.name.clone()),
                chrono::Utc::now(),
            )?;
            Ok(())
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- OpenAPI ----

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The OpenAPI document of the center's REST API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "tern center API",
        description = "Inventory (clusters, hosts, VMs), tasks and events of a tern center. \
            Every call needs `Authorization: Bearer <token>`: a user's named token (role \
            viewer, operator or admin) or the admin token file's, the enrolment token for host \
            registration, the host's own token for its heartbeats. \
            Errors answer `{\"error\": \"what to fix\"}`."
    ),
    paths(
        create_cluster, list_clusters, get_cluster, set_evc, evc_modes,
        get_cluster_migration, set_cluster_migration,
        get_drs, set_drs, drs_recommendations, drs_apply, list_rules, create_rule, remove_rule,
        list_pools, create_pool, get_pool, update_pool, remove_pool, set_vm_pool,
        list_images, import_image, get_image, remove_image,
        list_datastores, add_datastore, get_datastore, remove_datastore,
        register_host, heartbeat, ownership, list_hosts, get_host, host_maintenance, maintenance_plan,
        host_evacuate,
        degrade_host, restore_host, add_host, remove_host,
        create_vm, list_vms, get_vm, delete_vm, start_vm, stop_vm, set_vm_resources, vm_console, can_migrate,
        migrate_vm,
        list_tasks, get_task, cancel_task, task_timeline, host_load_history, host_metrics,
        drs_history,
        summary, control_plane, list_events, live_stream, whoami,
        create_token, list_tokens, revoke_token,
    ),
    components(schemas(ErrorBody, TaskKind, TaskState, EventLevel, MigrationResult,
        MaintenanceResult, DrsApplyResult)),
    modifiers(&BearerAuth),
    tags(
        (name = "clusters", description = "Clusters of hosts"),
        (name = "hosts", description = "Host agents: enrolment, heartbeats, inventory, maintenance mode"),
        (name = "vms", description = "Virtual machines"),
        (name = "datastores", description = "Storage VMs' disks live on, and which hosts reach it"),
        (name = "images", description = "Disk templates on the shared storage, VMs' disks are made from"),
        (name = "inventory", description = "The inventory at a glance: counts by state and cluster"),
        (name = "tasks", description = "Long-running operations"),
        (name = "events", description = "History of state changes, with who asked for each"),
        (name = "tokens", description = "Named API tokens and their roles (admin only)"),
    )
)]
pub struct ApiDoc;

/// The OpenAPI document as JSON text (built once).
pub fn openapi_text() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        ApiDoc::openapi()
            .to_pretty_json()
            .unwrap_or_else(|e| format!("{{\"error\": \"building the OpenAPI document: {e}\"}}"))
    })
}

async fn openapi_json() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_text()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare() {
        assert!(token_eq("abc", "abc"));
        assert!(!token_eq("abd", "abc"));
        assert!(!token_eq("ab", "abc"));
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer  tok ".parse().unwrap());
        assert_eq!(bearer(&h).as_deref(), Some("tok"));
        h.insert(header::AUTHORIZATION, "Basic tok".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }

    /// Every path of tern-api's table is documented, with the same methods.
    #[test]
    fn openapi_lists_every_path() {
        let doc: serde_json::Value = serde_json::from_str(openapi_text()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        let expected = [
            ("post", "/api/v1/clusters"),
            ("get", "/api/v1/clusters"),
            ("get", "/api/v1/clusters/{name}"),
            ("post", "/api/v1/clusters/{name}/evc"),
            ("get", "/api/v1/clusters/{name}/evc-modes"),
            ("get", "/api/v1/clusters/{name}/drs"),
            ("put", "/api/v1/clusters/{name}/drs"),
            ("get", "/api/v1/clusters/{name}/migration"),
            ("put", "/api/v1/clusters/{name}/migration"),
            ("get", "/api/v1/clusters/{name}/drs/recommendations"),
            ("post", "/api/v1/clusters/{name}/drs/apply"),
            ("get", "/api/v1/vms/{name}/can-migrate"),
            ("post", "/api/v1/vms/{name}/migrate"),
            ("post", "/api/v1/hosts/register"),
            ("post", "/api/v1/hosts/{id}/heartbeat"),
            ("get", "/api/v1/hosts/{id}/ownership"),
            ("get", "/api/v1/hosts"),
            ("get", "/api/v1/hosts/{name}"),
            ("post", "/api/v1/hosts/{name}/maintenance"),
            ("post", "/api/v1/hosts/{name}/evacuate"),
            ("put", "/api/v1/hosts/{name}/health"),
            ("delete", "/api/v1/hosts/{name}/health"),
            ("post", "/api/v1/vms"),
            ("get", "/api/v1/vms"),
            ("get", "/api/v1/vms/{name}"),
            ("post", "/api/v1/vms/{name}/start"),
            ("post", "/api/v1/vms/{name}/stop"),
            ("put", "/api/v1/vms/{name}/resources"),
            ("delete", "/api/v1/vms/{name}"),
            ("get", "/api/v1/vms/{name}/console"),
            ("get", "/api/v1/tasks"),
            ("get", "/api/v1/tasks/{id}"),
            ("post", "/api/v1/tasks/{id}/cancel"),
            ("get", "/api/v1/events"),
            ("post", "/api/v1/hosts/{name}/join-token"),
            ("delete", "/api/v1/hosts/{name}"),
            ("post", "/api/v1/tokens"),
            ("get", "/api/v1/tokens"),
            ("delete", "/api/v1/tokens/{name}"),
            ("get", "/api/v1/clusters/{name}/rules"),
            ("post", "/api/v1/clusters/{name}/rules"),
            ("delete", "/api/v1/rules/{name}"),
            ("get", "/api/v1/clusters/{name}/pools"),
            ("post", "/api/v1/clusters/{name}/pools"),
            ("get", "/api/v1/pools/{name}"),
            ("put", "/api/v1/pools/{name}"),
            ("delete", "/api/v1/pools/{name}"),
            ("put", "/api/v1/vms/{name}/pool"),
            ("get", "/api/v1/images"),
            ("post", "/api/v1/images"),
            ("get", "/api/v1/images/{name}"),
            ("delete", "/api/v1/images/{name}"),
            ("get", "/api/v1/datastores"),
            ("post", "/api/v1/datastores"),
            ("get", "/api/v1/datastores/{name}"),
            ("delete", "/api/v1/datastores/{name}"),
            ("get", "/api/v1/hosts/{name}/maintenance-plan"),
            ("get", "/api/v1/stream"),
            ("get", "/api/v1/whoami"),
            ("get", "/api/v1/tasks/{id}/timeline"),
            ("get", "/api/v1/hosts/{name}/load-history"),
            ("get", "/api/v1/hosts/{name}/metrics"),
            ("get", "/api/v1/clusters/{name}/drs/history"),
            ("get", "/api/v1/summary"),
            ("get", "/api/v1/control-plane"),
        ];
        for (method, path) in expected {
            assert!(
                paths.get(path).and_then(|p| p.get(method)).is_some(),
                "{method} {path} missing from the OpenAPI document"
            );
        }
        let n: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
        assert_eq!(n, expected.len());
        assert!(doc["components"]["schemas"].get("VmSpec").is_some());
        assert!(doc["components"]["schemas"].get("Resources").is_some());
        assert!(doc["components"]["securitySchemes"].get("bearer").is_some());
    }
}
