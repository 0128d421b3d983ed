//! The center through its real listeners (TCP on 127.0.0.1 and the unix socket), with a fake
//! host agent (an axum server answering the agent API) where the center calls one.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as AxPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use tern_api::agent::{CheckPaths, PathsReport, StartVm, VmRuntime};
use tern_api::center::{
    AddHost, Cluster, CreateCluster, CreateVm, Event, Heartbeat, Host, JoinToken, Ownership,
    OwnershipQuery, RegisterHost, Registered, StopVm, Summary, Task, TaskState, Vm,
};
use tern_api::history::{DrsHistory, HostLoadHistory, MigrationTimeline};
use tern_api::{
    ApiClient, ApiError, BootSource, Endpoint, ErrorBody, HostFacts, HostLoad, HostState, NicSpec,
    PowerState, Resources, VmLoad, VmSpec,
};
use tern_center::{serve, RunningCenter};
use uuid::Uuid;

mod common;
use common::{admin, config, create_cluster, facts, raw, started, wait_for, wait_task};

const AGENT_TOKEN: &str = "agent-secret";

// ---------- fake agent ----------

#[derive(Default)]
struct FakeState {
    vms: HashMap<Uuid, VmRuntime>,
    /// Paths check-paths reports missing / outside shared storage.
    missing: HashSet<String>,
    outside: HashSet<String>,
    /// Starts never answer (the center must not hang on them).
    hang_starts: bool,
    calls: Vec<String>,
}

#[derive(Clone)]
struct FakeAgent {
    addr: SocketAddr,
    state: Arc<Mutex<FakeState>>,
}

type Fake = State<Arc<Mutex<FakeState>>>;

fn agent_auth(h: &HeaderMap) -> Result<(), (StatusCode, Json<ErrorBody>)> {
    let ok = h
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {AGENT_TOKEN}"));
    if ok {
        Ok(())
    } else {
        Err((
            StatusCode::UNAUTHORIZED,
            Json(ErrorBody {
                error: "bad agent token".into(),
            }),
        ))
    }
}

type R<T> = Result<T, (StatusCode, Json<ErrorBody>)>;

fn not_found() -> (StatusCode, Json<ErrorBody>) {
    (
        StatusCode::NOT_FOUND,
        Json(ErrorBody {
            error: "no such VM".into(),
        }),
    )
}

async fn fake_check(
    State(s): Fake,
    h: HeaderMap,
    Json(req): Json<CheckPaths>,
) -> R<Json<PathsReport>> {
    agent_auth(&h)?;
    let s = s.lock().unwrap();
    Ok(Json(PathsReport {
        unreachable: vec![],
        missing: req
            .paths
            .iter()
            .filter(|p| s.missing.contains(*p))
            .cloned()
            .collect(),
        outside_shared_storage: req
            .paths
            .iter()
            .filter(|p| s.outside.contains(*p))
            .cloned()
            .collect(),
    }))
}

async fn fake_start(
    State(s): Fake,
    h: HeaderMap,
    AxPath(id): AxPath<Uuid>,
    Json(req): Json<StartVm>,
) -> R<Json<VmRuntime>> {
    agent_auth(&h)?;
    let (rt, hang) = {
        let mut s = s.lock().unwrap();
        s.calls.push(format!("start {id} gen {}", req.generation));
        let rt = VmRuntime {
            taps: vec!["tap0".into()],
            ..started(id, req)
        };
        s.vms.insert(id, rt.clone());
        (rt, s.hang_starts)
    };
    if hang {
        std::future::pending::<()>().await;
    }
    Ok(Json(rt))
}

async fn fake_stop(
    State(s): Fake,
    h: HeaderMap,
    AxPath(id): AxPath<Uuid>,
    Json(req): Json<StopVm>,
) -> R<Json<VmRuntime>> {
    agent_auth(&h)?;
    let mut s = s.lock().unwrap();
    s.calls.push(format!("stop {id} force {}", req.force));
    let mut rt = s.vms.remove(&id).ok_or_else(not_found)?;
    rt.state = PowerState::Stopped;
    rt.pid = None;
    s.vms.insert(id, rt.clone());
    Ok(Json(rt))
}

async fn fake_resources(
    State(s): Fake,
    h: HeaderMap,
    AxPath(id): AxPath<Uuid>,
    Json(req): Json<Resources>,
) -> R<Json<VmRuntime>> {
    agent_auth(&h)?;
    let mut s = s.lock().unwrap();
    s.calls.push(format!("resources {id}: {req}"));
    let rt = s.vms.get_mut(&id).ok_or_else(not_found)?;
    rt.spec.resources = req;
    Ok(Json(rt.clone()))
}

async fn fake_get(State(s): Fake, h: HeaderMap, AxPath(id): AxPath<Uuid>) -> R<Json<VmRuntime>> {
    agent_auth(&h)?;
    let s = s.lock().unwrap();
    s.vms.get(&id).cloned().map(Json).ok_or_else(not_found)
}

async fn fake_delete(State(s): Fake, h: HeaderMap, AxPath(id): AxPath<Uuid>) -> R<StatusCode> {
    agent_auth(&h)?;
    let mut s = s.lock().unwrap();
    s.calls.push(format!("delete {id}"));
    s.vms.remove(&id);
    Ok(StatusCode::NO_CONTENT)
}

async fn fake_console(State(s): Fake, h: HeaderMap, AxPath(id): AxPath<Uuid>) -> R<String> {
    agent_auth(&h)?;
    let s = s.lock().unwrap();
    s.vms
        .get(&id)
        .map(|_| "TERN-GUEST-READY uptime_ms=1\n".to_string())
        .ok_or_else(not_found)
}

impl FakeAgent {
    async fn start() -> FakeAgent {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let app = Router::new()
            .route("/v1/check-paths", post(fake_check))
            .route(
                "/v1/vms/{id}",
                get(fake_get).put(fake_start).delete(fake_delete),
            )
            .route("/v1/vms/{id}/stop", post(fake_stop))
            .route("/v1/vms/{id}/resources", axum::routing::put(fake_resources))
            .route("/v1/vms/{id}/console", get(fake_console))
            .with_state(state.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        FakeAgent { addr, state }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    /// What the agent would report in a heartbeat.
    fn load(&self) -> HostLoad {
        let s = self.state.lock().unwrap();
        HostLoad {
            cpu_percent: 1.0,
            memory_used_mib: 100,
            memory_total_mib: 8192,
            vms: s
                .vms
                .values()
                .map(|rt| VmLoad {
                    vm_id: rt.id,
                    name: rt.spec.name.clone(),
                    state: rt.state,
                    cpu_percent: 0.5,
                    rss_mib: 64,
                })
                .collect(),
        }
    }
}

// ---------- helpers ----------

fn client(c: &RunningCenter, token: &str) -> ApiClient {
    ApiClient::new(Endpoint::Tcp(c.url()), token).unwrap()
}

fn spec(name: &str, mac: &str, memory_mib: u64) -> VmSpec {
    VmSpec {
        firmware: Default::default(),
        cloud_init: None,
        resources: Default::default(),
        name: name.into(),
        vcpus: 1,
        memory_mib,
        cpu_model: None,
        boot: BootSource::Kernel {
            kernel: "/shared/vmlinuz".into(),
            initrd: Some("/shared/initramfs.img".into()),
            cmdline: "console=ttyS0".into(),
        },
        disks: vec![],
        nics: vec![NicSpec { mac: mac.into() }],
    }
}

fn status(e: ApiError) -> (u16, String) {
    match e {
        ApiError::Status { status, message } => (status, message),
        other => panic!("expected an HTTP error status, got {other}"),
    }
}

async fn expect_status<T: std::fmt::Debug>(
    r: Result<T, ApiError>,
    want: u16,
    contains: &str,
) -> String {
    let (got, msg) = status(r.expect_err("call should fail"));
    assert_eq!(got, want, "status for: {msg}");
    assert!(
        msg.contains(contains),
        "message {msg:?} should contain {contains:?}"
    );
    msg
}

async fn register(c: &RunningCenter, name: &str, agent: &FakeAgent, f: HostFacts) -> Registered {
    client(c, &c.enrol_token)
        .post(
            "/api/v1/hosts/register",
            &RegisterHost {
                name: name.into(),
                cluster: "lab".into(),
                agent_url: agent.url(),
                agent_token: AGENT_TOKEN.into(),
                facts: f,
                csr: None,
            },
        )
        .await
        .unwrap()
}

/// Creates VM `name` (256 MiB, one NIC with `mac`) in cluster `lab` on `host`.
async fn create_vm_on(api: &ApiClient, name: &str, mac: &str, host: &str) -> Vm {
    api.post(
        "/api/v1/vms",
        &CreateVm {
            image: None,
            spec: spec(name, mac, 256),
            cluster: "lab".into(),
            host: Some(host.into()),
        },
    )
    .await
    .unwrap()
}

async fn heartbeat(c: &RunningCenter, reg: &Registered, load: HostLoad) -> Result<(), ApiError> {
    client(c, &reg.host_token)
        .post(
            &format!("/api/v1/hosts/{}/heartbeat", reg.host_id),
            &Heartbeat {
                facts: facts(4, 8192),
                load,
                health: None,
            },
        )
        .await
}

async fn get_vm(c: &RunningCenter, name: &str) -> Vm {
    admin(c).get(&format!("/api/v1/vms/{name}")).await.unwrap()
}

async fn events(c: &RunningCenter, query: &str) -> Vec<Event> {
    admin(c)
        .get(&format!("/api/v1/events?{query}"))
        .await
        .unwrap()
}

// ---------- tests ----------

#[tokio::test]
async fn tokens_are_required_and_nothing_changes_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let c = serve(config(dir.path(), 10_000)).await.unwrap();

    let body = CreateCluster {
        name: "lab".into(),
        evc_mode: None,
        migration_encryption: None,
    };
    // No token.
    let resp = raw()
        .post(format!("{}/api/v1/clusters", c.url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let err: ErrorBody = resp.json().await.unwrap();
    assert!(err.error.contains("Bearer"), "{}", err.error);
    // Wrong token; the enrolment token is not an admin token either.
    for token in ["nope", c.enrol_token.as_str()] {
        let r: Result<Cluster, _> = client(&c, token).post("/api/v1/clusters", &body).await;
        expect_status(r, 401, "admin token").await;
    }
    // The admin token cannot register hosts.
    let agent = FakeAgent::start().await;
    let r: Result<Registered, _> = admin(&c)
        .post(
            "/api/v1/hosts/register",
            &RegisterHost {
                name: "h1".into(),
                cluster: "lab".into(),
                agent_url: agent.url(),
                agent_token: AGENT_TOKEN.into(),
                facts: facts(4, 8192),
                csr: None,
            },
        )
        .await;
    expect_status(r, 401, "join token").await;
    let r: Result<Vec<Vm>, _> = client(&c, "nope").get("/api/v1/vms").await;
    expect_status(r, 401, "").await;

    let clusters: Vec<Cluster> = admin(&c).get("/api/v1/clusters").await.unwrap();
    assert!(clusters.is_empty(), "refused calls changed the store");
    let hosts: Vec<Host> = admin(&c).get("/api/v1/hosts").await.unwrap();
    assert!(hosts.is_empty());
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn malformed_requests_answer_400_with_an_error_body() {
    let dir = tempfile::tempdir().unwrap();
    let c = serve(config(dir.path(), 10_000)).await.unwrap();
    let http = raw();
    let cases: [(&str, &str); 3] = [
        ("/api/v1/clusters", "{not json"),
        ("/api/v1/clusters", "{\"nme\": \"lab\"}"),
        (
            "/api/v1/vms",
            "{\"cluster\": \"lab\", \"spec\": {\"name\": 3}}",
        ),
    ];
    for (path, body) in cases {
        let resp = http
            .post(format!("{}{path}", c.url()))
            .bearer_auth(&c.admin_token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{path} {body}");
        let err: ErrorBody = resp.json().await.unwrap();
        assert!(err.error.contains("invalid JSON"), "{}", err.error);
    }
    // Not a task id.
    let resp = http
        .get(format!("{}/api/v1/tasks/not-a-uuid", c.url()))
        .bearer_auth(&c.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let _: ErrorBody = resp.json().await.unwrap();
    // Bad cluster name.
    let r: Result<Cluster, _> = admin(&c)
        .post(
            "/api/v1/clusters",
            &CreateCluster {
                name: "Bad Name".into(),
                evc_mode: None,
                migration_encryption: None,
            },
        )
        .await;
    expect_status(r, 400, "not valid").await;
    // Unknown path.
    let resp = http
        .get(format!("{}/api/v1/nothing", c.url()))
        .bearer_auth(&c.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let _: ErrorBody = resp.json().await.unwrap();
    let clusters: Vec<Cluster> = admin(&c).get("/api/v1/clusters").await.unwrap();
    assert!(clusters.is_empty());
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn openapi_is_served_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let c = serve(config(dir.path(), 10_000)).await.unwrap();
    let resp = raw()
        .get(format!("{}/openapi.json", c.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let doc: serde_json::Value = resp.json().await.unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for p in [
        "/api/v1/clusters",
        "/api/v1/hosts/register",
        "/api/v1/hosts/{id}/heartbeat",
        "/api/v1/vms/{name}/start",
        "/api/v1/tasks/{id}/cancel",
        "/api/v1/events",
    ] {
        assert!(doc["paths"].get(p).is_some(), "{p} missing");
    }
    c.shutdown().await.unwrap();
}

/// A host whose agent could not probe its CPU (or tell its QEMU version) is shown degraded,
/// with the reason, until a heartbeat brings what was missing.
#[tokio::test]
async fn a_host_without_cpu_capability_is_degraded_until_it_reports_one() {
    let dir = tempfile::tempdir().unwrap();
    let c = serve(config(dir.path(), 10_000)).await.unwrap();
    create_cluster(&c, "lab").await;
    let agent = FakeAgent::start().await;
    let reg = register(&c, "h1", &agent, facts(4, 8192)).await;
    let h: Host = admin(&c).get("/api/v1/hosts/h1").await.unwrap();
    assert_eq!(h.state, HostState::Connected);
    assert_eq!(h.problems.len(), 1, "{:?}", h.problems);
    assert!(
        h.problems[0].contains("CPU capability unknown"),
        "{:?}",
        h.problems
    );

    let probed = HostFacts {
        cpu: Some(tern_api::evc::HostCpu {
            vendor: Some("GenuineIntel".into()),
            uncapped: vec!["sse2".into()],
            ..Default::default()
        }),
        ..facts(4, 8192)
    };
    client(&c, &reg.host_token)
        .post::<_, ()>(
            &format!("/api/v1/hosts/{}/heartbeat", reg.host_id),
            &Heartbeat {
                facts: probed,
                load: agent.load(),
                health: None,
            },
        )
        .await
        .unwrap();
    let h: Host = admin(&c).get("/api/v1/hosts/h1").await.unwrap();
    assert!(h.problems.is_empty(), "{:?}", h.problems);

    // An agent that could not tell its QEMU version is degraded too.
    let other = FakeAgent::start().await;
    let unknown = HostFacts {
        qemu_version: String::new(),
        ..facts(4, 8192)
    };
    register(&c, "h2", &other, unknown).await;
    let h: Host = admin(&c).get("/api/v1/hosts/h2").await.unwrap();
    assert!(
        h.problems
            .iter()
            .any(|p| p.contains("QEMU version unknown")),
        "{:?}",
        h.problems
    );
    c.shutdown().await.unwrap();
}

/// The OpenAPI document describes exactly the routes of `tern_api::routes::center`, and the
/// router serves every path and method the document names (none falls to the "no such API
/// path" or "no such method" answers).
#[tokio::test]
async fn openapi_document_and_router_serve_the_same_paths() {
    let dir = tempfile::tempdir().unwrap();
    let c = serve(config(dir.path(), 10_000)).await.unwrap();
    let doc: serde_json::Value = raw()
        .get(format!("{}/openapi.json", c.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let paths = doc["paths"].as_object().expect("paths");
    let documented: std::collections::BTreeSet<&str> = paths.keys().map(String::as_str).collect();
    let named: std::collections::BTreeSet<&str> = tern_api::routes::center::ALL
        .iter()
        .map(|r| r.template())
        .collect();
    assert_eq!(documented, named, "documented paths vs tern_api::routes");
    let mut calls = 0;
    for (path, item) in paths {
        let concrete = path
            .replace("{name}", "contract-probe")
            .replace("{id}", &Uuid::nil().to_string());
        for method in ["get", "post", "put", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            let req = raw().request(
                method.to_uppercase().parse().unwrap(),
                format!("{}{concrete}", c.url()),
            );
            let resp = req.json(&serde_json::json!({})).send().await.unwrap();
            let status = resp.status().as_u16();
            let body = resp.text().await.unwrap();
            assert!(
                !body.contains("no such API path") && !body.contains("does not take that method"),
                "{method} {path} is documented but not served: {status} {body}"
            );
            calls += 1;
        }
    }
    assert!(calls >= named.len(), "every path has a method");
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn unix_socket_serves_the_same_api() {
    let dir = tempfile::tempdir().unwrap();
    // A stale socket file left by a crashed center is replaced.
    let cfg = config(dir.path(), 10_000);
    std::fs::create_dir_all(cfg.socket.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&cfg.socket).unwrap());
    let c = serve(cfg).await.unwrap();

    use std::os::unix::fs::PermissionsExt;
    for f in [c.socket_path.clone(), c.config.data_dir.join("center.db")] {
        let mode = std::fs::metadata(&f).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", f.display());
    }

    let unix = ApiClient::new(Endpoint::Unix(c.socket_path.clone()), &c.admin_token).unwrap();
    let _: Cluster = unix
        .post(
            "/api/v1/clusters",
            &CreateCluster {
                name: "lab".into(),
                evc_mode: None,
                migration_encryption: None,
            },
        )
        .await
        .unwrap();
    // Seen over TCP too.
    let clusters: Vec<Cluster> = admin(&c).get("/api/v1/clusters").await.unwrap();
    assert_eq!(clusters.len(), 1);
    let wrong = ApiClient::new(Endpoint::Unix(c.socket_path.clone()), "wrong").unwrap();
    let r: Result<Vec<Cluster>, _> = wrong.get("/api/v1/clusters").await;
    expect_status(r, 401, "").await;

    // A second center on the same data directory is refused.
    let second = serve(config(dir.path(), 10_000)).await;
    let err = format!("{:#}", second.err().expect("second center must be refused"));
    assert!(err.contains("another tern center"), "{err}");

    let path = c.socket_path.clone();
    c.shutdown().await.unwrap();
    assert!(!path.exists(), "socket removed at shutdown");
}

#[tokio::test]
async fn registration_and_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let c = serve(config(dir.path(), 10_000)).await.unwrap();
    let agent = FakeAgent::start().await;
    let req = RegisterHost {
        name: "h1".into(),
        cluster: "lab".into(),
        agent_url: agent.url(),
        agent_token: AGENT_TOKEN.into(),
        facts: facts(4, 8192),
        csr: None,
    };
    // The cluster does not exist yet: 404 with the command to create it.
    let r: Result<Registered, _> = client(&c, &c.enrol_token)
        .post("/api/v1/hosts/register", &req)
        .await;
    expect_status(r, 404, "tern cluster create lab").await;

    create_cluster(&c, "lab").await;
    let reg: Registered = client(&c, &c.enrol_token)
        .post("/api/v1/hosts/register", &req)
        .await
        .unwrap();
    assert_eq!(reg.heartbeat_interval_ms, c.config.heartbeat_interval_ms);
    let host: Host = admin(&c).get("/api/v1/hosts/h1").await.unwrap();
    assert_eq!(host.state, HostState::Connected);
    assert_eq!(host.cluster, "lab");
    let cluster: Cluster = admin(&c).get("/api/v1/clusters/lab").await.unwrap();
    assert_eq!(cluster.hosts, vec!["h1".to_string()]);

    // Heartbeats need the host's own token.
    for token in ["wrong", c.enrol_token.as_str(), c.admin_token.as_str()] {
        let r: Result<(), _> = client(&c, token)
            .post(
                &format!("/api/v1/hosts/{}/heartbeat", reg.host_id),
                &Heartbeat {
                    facts: facts(4, 8192),
                    load: agent.load(),
                    health: None,
                },
            )
            .await;
        expect_status(r, 401, "register again").await;
    }
    let r = client(&c, &reg.host_token)
        .post::<_, ()>(
            &format!("/api/v1/hosts/{}/heartbeat", Uuid::new_v4()),
            &Heartbeat {
                facts: facts(4, 8192),
                load: agent.load(),
                health: None,
            },
        )
        .await;
    expect_status(r, 404, "register again").await;
    heartbeat(&c, &reg, agent.load()).await.unwrap();
    let host: Host = admin(&c).get("/api/v1/hosts/h1").await.unwrap();
    assert!(host.last_heartbeat.is_some());
    assert_eq!(host.load.as_ref().map(|l| l.memory_total_mib), Some(8192));

    // The enrolment token joins new hosts only: it cannot take over h1's name.
    let r: Result<Registered, _> = client(&c, &c.enrol_token)
        .post("/api/v1/hosts/register", &req)
        .await;
    expect_status(r, 401, "registered already").await;
    // The host's own secret registers it again: same id, same secret.
    let again: Registered = client(&c, &reg.host_token)
        .post("/api/v1/hosts/register", &req)
        .await
        .unwrap();
    assert_eq!(again.host_id, reg.host_id);
    assert_eq!(again.host_token, reg.host_token);
    heartbeat(&c, &again, agent.load()).await.unwrap();
    // A join token an admin issued for h1 re-joins it with a new secret; the old one fails.
    let join: JoinToken = admin(&c)
        .post("/api/v1/hosts/h1/join-token", &AddHost::default())
        .await
        .unwrap();
    let rejoined: Registered = client(&c, &join.token)
        .post("/api/v1/hosts/register", &req)
        .await
        .unwrap();
    assert_eq!(rejoined.host_id, reg.host_id);
    assert_ne!(rejoined.host_token, reg.host_token);
    expect_status(heartbeat(&c, &reg, agent.load()).await, 401, "").await;
    heartbeat(&c, &rejoined, agent.load()).await.unwrap();

    // A wildcard agent URL is refused with advice.
    let mut bad = req.clone();
    bad.agent_url = "http://0.0.0.0:8701".into();
    let r: Result<Registered, _> = client(&c, &c.enrol_token)
        .post("/api/v1/hosts/register", &bad)
        .await;
    expect_status(r, 400, "--advertise-url").await;

    let r: Result<Host, _> = admin(&c).get("/api/v1/hosts/h9").await;
    expect_status(r, 404, "h9").await;
    let ev = events(&c, "host=h1").await;
    assert!(
        ev.iter().any(|e| e.message.contains("joined cluster lab")),
        "{ev:?}"
    );
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn silent_hosts_are_marked_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let c = serve(config(dir.path(), 400)).await.unwrap();
    let agent = FakeAgent::start().await;
    create_cluster(&c, "lab").await;
    let reg = register(&c, "h1", &agent, facts(4, 8192)).await;
    let vm: Vm = admin(&c)
        .post(
            "/api/v1/vms",
            &CreateVm {
                image: None,
                spec: spec("web-1", "52:54:00:00:00:01", 256),
                cluster: "lab".into(),
                host: None,
            },
        )
        .await
        .unwrap();
    let t: Task = admin(&c)
        .post("/api/v1/vms/web-1/start", &())
        .await
        .unwrap();
    assert_eq!(wait_task(&c, t.id).await.state, TaskState::Succeeded);

    let api = admin(&c);
    wait_for("h1 disconnected", 10, || {
        let api = api.clone();
        async move {
            let h: Host = api.get("/api/v1/hosts/h1").await.unwrap();
            (h.state == HostState::Disconnected).then_some(())
        }
    })
    .await;
    // Its VM keeps running as far as anyone knows: unknown, not restarted elsewhere.
    let v = get_vm(&c, "web-1").await;
    assert_eq!(v.actual_state, PowerState::Unknown);
    assert_eq!(v.desired_state, PowerState::Running);
    assert_eq!(v.host.as_deref(), Some("h1"));
    assert_eq!(
        agent
            .calls()
            .iter()
            .filter(|c| c.starts_with("start"))
            .count(),
        1
    );
    let ev = events(&c, "host=h1").await;
    assert!(
        ev.iter().any(|e| e.message.contains("disconnected")),
        "{ev:?}"
    );

    // The next heartbeat reconnects it and brings the VM's state back.
    heartbeat(&c, &reg, agent.load()).await.unwrap();
    let h: Host = admin(&c).get("/api/v1/hosts/h1").await.unwrap();
    assert_eq!(h.state, HostState::Connected);
    wait_for("the VM's state back", 10, || async {
        heartbeat(&c, &reg, agent.load()).await.unwrap();
        (get_vm(&c, "web-1").await.actual_state == PowerState::Running).then_some(())
    })
    .await;
    let ev = events(&c, "host=h1").await;
    assert!(
        ev.iter().any(|e| e.message.contains("connected again")),
        "{ev:?}"
    );
    assert_eq!(vm.generation, 1);
    c.shutdown().await.unwrap();
}

/// A destination whose commit call never came asks whether the store names it the VM's owner:
/// only with its own host token, and only the owner learns the generation.
#[tokio::test]
async fn a_host_learns_whether_the_store_names_it_a_vms_owner() {
    let dir = tempfile::tempdir().unwrap();
    let c = serve(config(dir.path(), 10_000)).await.unwrap();
    let (a1, a2) = (FakeAgent::start().await, FakeAgent::start().await);
    create_cluster(&c, "lab").await;
    let r1 = register(&c, "h1", &a1, facts(4, 8192)).await;
    let r2 = register(&c, "h2", &a2, facts(4, 8192)).await;
    let vm = create_vm_on(&admin(&c), "web-1", "52:54:00:00:00:01", "h1").await;
    let ask = |reg: &Registered, token: &str, vm: Uuid| {
        let (api, path) = (
            client(&c, token),
            format!("/api/v1/hosts/{}/ownership", reg.host_id),
        );
        async move {
            api.get_query::<_, Ownership>(&path, &OwnershipQuery { vm })
                .await
        }
    };
    let owner = ask(&r1, &r1.host_token, vm.id).await.unwrap();
    assert_eq!(
        owner,
        Ownership {
            vm: vm.id,
            owned_here: true,
            generation: Some(vm.generation),
        }
    );
    let other = ask(&r2, &r2.host_token, vm.id).await.unwrap();
    assert!(!other.owned_here && other.generation.is_none(), "{other:?}");
    let unknown = ask(&r1, &r1.host_token, Uuid::new_v4()).await.unwrap();
    assert!(!unknown.owned_here, "{unknown:?}");
    // Another host's token, the admin's, or none at all: refused.
    expect_status(ask(&r1, &r2.host_token, vm.id).await, 401, "wrong token").await;
    expect_status(ask(&r1, &c.admin_token, vm.id).await, 401, "wrong token").await;
    let r = raw()
        .get(format!(
            "{}/api/v1/hosts/{}/ownership?vm={}",
            c.url(),
            r1.host_id,
            vm.id
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A VM id that is not one is refused before any lookup.
    let r = raw()
        .get(format!(
            "{}/api/v1/hosts/{}/ownership?vm=..%2Fetc",
            c.url(),
            r1.host_id
        ))
        .bearer_auth(&r1.host_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn vm_creation_checks_everything_before_changing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let c = serve(config(dir.path(), 10_000)).await.unwrap();
    let a1 = FakeAgent::start().await;
    let a2 = FakeAgent::start().await;
    create_cluster(&c, "lab").await;
    create_cluster(&c, "other").await;
    register(&c, "h1", &a1, facts(4, 8192)).await;
    register(&c, "h2", &a2, facts(2, 4096)).await;
    let api = admin(&c);
    let create = |spec: VmSpec, cluster: &str, host: Option<&str>| {
        let api = api.clone();
        let req = CreateVm {
            image: None,
            spec,
            cluster: cluster.into(),
            host: host.map(str::to_string),
        };
        async move { api.post::<_, Vm>("/api/v1/vms", &req).await }
    };

    // Placed on the host with the most free memory.
    let vm = create(spec("web-1", "52:54:00:00:00:01", 1024), "lab", None)
        .await
        .unwrap();
    assert_eq!(vm.host.as_deref(), Some("h1"));
    assert_eq!(vm.desired_state, PowerState::Stopped);
    assert_eq!(vm.actual_state, PowerState::Stopped);
    let ev = events(&c, "vm=web-1").await;
    assert!(
        ev.iter()
            .any(|e| e.message.contains("placed VM web-1 on host h1")),
        "{ev:?}"
    );
    // h1 now has 7168 MiB free, h2 4096: 7000 goes to h1, 3500 to h2 then.
    let vm = create(spec("web-2", "52:54:00:00:00:02", 7000), "lab", None)
        .await
        .unwrap();
    assert_eq!(vm.host.as_deref(), Some("h1"));
    let vm = create(spec("web-3", "52:54:00:00:00:03", 3500), "lab", None)
        .await
        .unwrap();
    assert_eq!(vm.host.as_deref(), Some("h2"));
    // A named host.
    let vm = create(spec("db-1", "52:54:00:00:00:0a", 512), "lab", Some("h2"))
        .await
        .unwrap();
    assert_eq!(vm.host.as_deref(), Some("h2"));

    // Refusals.
    expect_status(
        create(spec("web-1", "52:54:00:00:01:01", 256), "lab", None).await,
        409,
        "already exists",
    )
    .await;
    expect_status(
        create(spec("web-9", "52:54:00:00:00:01", 256), "lab", None).await,
        409,
        "web-1",
    )
    .await;
    // Upper case of a taken MAC is the same MAC.
    expect_status(
        create(spec("web-9", "52:54:00:00:00:0A", 256), "lab", None).await,
        409,
        "db-1",
    )
    .await;
    expect_status(
        create(spec("web-9", "52:54:00:00:09:09", 0), "lab", None).await,
        400,
        "at least 16",
    )
    .await;
    expect_status(
        create(
            spec("web-9", "52:54:00:00:09:09", 1 << 23),
            "lab",
            Some("h1"),
        )
        .await,
        422,
        "more than host h1",
    )
    .await;
    expect_status(
        create(spec("web-9", "52:54:00:00:09:09", 1 << 23), "lab", None).await,
        422,
        "big enough",
    )
    .await;
    // Beyond any machine: refused as a bad value before any host is looked at.
    expect_status(
        create(spec("web-9", "52:54:00:00:09:09", 1 << 30), "lab", None).await,
        400,
        "memory_mib",
    )
    .await;
    let mut s = spec("web-9", "52:54:00:00:09:09", 256);
    s.vcpus = 64;
    expect_status(create(s, "lab", Some("h1")).await, 422, "cores").await;
    expect_status(
        create(spec("web-9", "52:54:00:00:09:09", 256), "nope", None).await,
        404,
        "tern cluster create nope",
    )
    .await;
    expect_status(
        create(spec("web-9", "52:54:00:00:09:09", 256), "lab", Some("h9")).await,
        404,
        "h9",
    )
    .await;
    expect_status(
        create(spec("web-9", "01:00:5e:00:00:01", 256), "lab", None).await,
        400,
        "unicast",
    )
    .await;
    expect_status(
        create(spec("web-9", "52:54:00:00:09:09", 256), "other", Some("h1")).await,
        422,
        "cluster lab",
    )
    .await;
    expect_status(
        create(spec("web-9", "52:54:00:00:09:09", 256), "other", None).await,
        409,
        "no connected, healthy host",
    )
    .await;
    let mut s = spec("web-9", "52:54:00:00:09:09", 256);
    s.boot = BootSource::Kernel {
        kernel: "vmlinuz".into(),
        initrd: None,
        cmdline: String::new(),
    };
    expect_status(create(s, "lab", None).await, 400, "absolute").await;
    // Files the host does not have, or not on its shared storage.
    a1.state
        .lock()
        .unwrap()
        .missing
        .insert("/shared/initramfs.img".into());
    expect_status(
        create(spec("web-9", "52:54:00:00:09:09", 256), "lab", Some("h1")).await,
        422,
        "/shared/initramfs.img",
    )
    .await;
    a1.state.lock().unwrap().missing.clear();
    a1.state
        .lock()
        .unwrap()
        .outside
        .insert("/shared/vmlinuz".into());
    expect_status(
        create(spec("web-9", "52:54:00:00:09:09", 256), "lab", Some("h1")).await,
        422,
        "shared storage",
    )
    .await;

    let vms: Vec<Vm> = api.get("/api/v1/vms").await.unwrap();
    let names: Vec<&str> = vms.iter().map(|v| v.spec.name.as_str()).collect();
    assert_eq!(
        names,
        ["db-1", "web-1", "web-2", "web-3"],
        "refused creations left no trace"
    );
    let h1: Host = api.get("/api/v1/hosts/h1").await.unwrap();
    assert_eq!(h1.vms, vec!["web-1".to_string(), "web-2".to_string()]);
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn start_stop_delete_through_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let c = serve(config(dir.path(), 10_000)).await.unwrap();
    let agent = FakeAgent::start().await;
    create_cluster(&c, "lab").await;
    let reg = register(&c, "h1", &agent, facts(4, 8192)).await;
    let api = admin(&c);
    let vm: Vm = api
        .post(
            "/api/v1/vms",
            &CreateVm {
                image: None,
                spec: spec("web-1", "52:54:00:00:00:01", 256),
                cluster: "lab".into(),
                host: None,
            },
        )
        .await
        .unwrap();

    let t: Task = api.post("/api/v1/vms/web-1/start", &()).await.unwrap();
    assert_eq!(t.vm.as_deref(), Some("web-1"));
    assert!(matches!(t.state, TaskState::Queued | TaskState::Running));
    let done = wait_task(&c, t.id).await;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    assert_eq!(done.progress, 100);
    assert!(done.finished_at.is_some());
    assert_eq!(done.result.as_ref().unwrap()["pid"], 4242);
    assert_eq!(agent.calls(), vec![format!("start {} gen 1", vm.id)]);
    let v = get_vm(&c, "web-1").await;
    assert_eq!(
        (v.desired_state, v.actual_state),
        (PowerState::Running, PowerState::Running)
    );

    // Running: cannot be deleted.
    let r = api.delete("/api/v1/vms/web-1").await;
    expect_status(r, 409, "tern vm stop web-1").await;

    // The console comes from the agent.
    let text = api
        .get_text("/api/v1/vms/web-1/console?bytes=100")
        .await
        .unwrap();
    assert!(text.contains("TERN-GUEST-READY"));

    // Heartbeats that no longer list it: crashed, with an event (once the task's outcome is
    // older than the heartbeats' figures can be).
    let saved = agent.state.lock().unwrap().vms.remove(&vm.id).unwrap();
    wait_for("the VM marked crashed", 10, || async {
        heartbeat(&c, &reg, agent.load()).await.unwrap();
        (get_vm(&c, "web-1").await.actual_state == PowerState::Crashed).then_some(())
    })
    .await;
    let ev = events(&c, "vm=web-1").await;
    assert!(
        ev.iter().any(|e| e.message.contains("marked crashed")),
        "{ev:?}"
    );
    // Listed again as running.
    agent.state.lock().unwrap().vms.insert(vm.id, saved);
    heartbeat(&c, &reg, agent.load()).await.unwrap();
    assert_eq!(get_vm(&c, "web-1").await.actual_state, PowerState::Running);

    let t: Task = api
        .post(
            "/api/v1/vms/web-1/stop",
            &StopVm {
                force: true,
                timeout_ms: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(wait_task(&c, t.id).await.state, TaskState::Succeeded);
    let v = get_vm(&c, "web-1").await;
    assert_eq!(
        (v.desired_state, v.actual_state),
        (PowerState::Stopped, PowerState::Stopped)
    );
    assert!(agent
        .calls()
        .contains(&format!("stop {} force true", vm.id)));
    // A stopped VM missing from heartbeats stays stopped, quietly (watched for longer than
    // the settling time after the task).
    agent.state.lock().unwrap().vms.clear();
    let watch_until = tokio::time::Instant::now()
        + Duration::from_millis(c.config.heartbeat_interval_ms * 2 + 300);
    while tokio::time::Instant::now() < watch_until {
        heartbeat(&c, &reg, agent.load()).await.unwrap();
        assert_eq!(get_vm(&c, "web-1").await.actual_state, PowerState::Stopped);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    api.delete("/api/v1/vms/web-1").await.unwrap();
    expect_status(api.get::<Vm>("/api/v1/vms/web-1").await, 404, "web-1").await;
    assert!(agent.calls().contains(&format!("delete {}", vm.id)));
    let tasks: Vec<Task> = api.get("/api/v1/tasks").await.unwrap();
    assert_eq!(tasks.len(), 2);
    // The deletion, then the audit line naming who asked for it.
    let ev = events(&c, "vm=web-1&limit=2").await;
    assert_eq!(ev.len(), 2);
    assert!(ev[0].message.contains("deleted"), "{ev:?}");
    assert_eq!(ev[1].actor.as_deref(), Some("admin"), "{ev:?}");
    assert!(
        ev[1].message.contains("DELETE /api/v1/vms/web-1 → 204"),
        "{ev:?}"
    );
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_task_can_be_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let c = serve(config(dir.path(), 10_000)).await.unwrap();
    let agent = FakeAgent::start().await;
    agent.state.lock().unwrap().hang_starts = true;
    create_cluster(&c, "lab").await;
    register(&c, "h1", &agent, facts(4, 8192)).await;
    let api = admin(&c);
    let _: Vm = api
        .post(
            "/api/v1/vms",
            &CreateVm {
                image: None,
                spec: spec("web-1", "52:54:00:00:00:01", 256),
                cluster: "lab".into(),
                host: None,
            },
        )
        .await
        .unwrap();
    let t: Task = api.post("/api/v1/vms/web-1/start", &()).await.unwrap();
    // A second task on the same VM waits its turn.
    let r = api
        .post::<_, Task>("/api/v1/vms/web-1/stop", &StopVm::default())
        .await;
    expect_status(r, 409, "tern task cancel").await;
    let cancelled: Task = api
        .post(&format!("/api/v1/tasks/{}/cancel", t.id), &())
        .await
        .unwrap();
    assert_eq!(cancelled.state, TaskState::Cancelled);
    assert_eq!(cancelled.error.as_deref(), Some("cancelled by user"));
    let again = api
        .post::<_, Task>(&format!("/api/v1/tasks/{}/cancel", t.id), &())
        .await;
    expect_status(again, 409, "cancelled").await;
    expect_status(
        api.post::<_, Task>(&format!("/api/v1/tasks/{}/cancel", Uuid::new_v4()), &())
            .await,
        404,
        "tern task list",
    )
    .await;
    // The desired state is back to what it was; the task stays cancelled.
    assert_eq!(get_vm(&c, "web-1").await.desired_state, PowerState::Stopped);
    let t2: Task = api.get(&format!("/api/v1/tasks/{}", t.id)).await.unwrap();
    assert_eq!(t2.state, TaskState::Cancelled);
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_restarted_center_keeps_its_inventory_and_ends_orphaned_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let c = serve(config(dir.path(), 10_000)).await.unwrap();
    let agent = FakeAgent::start().await;
    agent.state.lock().unwrap().hang_starts = true;
    create_cluster(&c, "lab").await;
    let reg = register(&c, "h1", &agent, facts(4, 8192)).await;
    let vm: Vm = admin(&c)
        .post(
            "/api/v1/vms",
            &CreateVm {
                image: None,
                spec: spec("web-1", "52:54:00:00:00:01", 256),
                cluster: "lab".into(),
                host: None,
            },
        )
        .await
        .unwrap();
    let t: Task = admin(&c)
        .post("/api/v1/vms/web-1/start", &())
        .await
        .unwrap();
    let api = admin(&c);
    wait_for("the start to reach the agent", 10, || {
        let agent = agent.clone();
        async move { (!agent.calls().is_empty()).then_some(()) }
    })
    .await;
    let t_running: Task = api.get(&format!("/api/v1/tasks/{}", t.id)).await.unwrap();
    assert_eq!(t_running.state, TaskState::Running);
    let (admin_token, enrol_token) = (c.admin_token.clone(), c.enrol_token.clone());
    c.shutdown().await.unwrap();

    // The agent did start the VM (its answer was lost with the center).
    let c = serve(config(dir.path(), 10_000)).await.unwrap();
    assert_eq!(c.admin_token, admin_token);
    assert_eq!(c.enrol_token, enrol_token);
    let t: Task = admin(&c)
        .get(&format!("/api/v1/tasks/{}", t.id))
        .await
        .unwrap();
    assert_eq!(t.state, TaskState::Failed);
    assert_eq!(t.error.as_deref(), Some("center restarted during the task"));
    let h: Host = admin(&c).get("/api/v1/hosts/h1").await.unwrap();
    assert_eq!(h.id, reg.host_id);
    assert_eq!(h.vms, vec!["web-1".to_string()]);
    // The VM's state is read back from its agent.
    let api = admin(&c);
    let v = wait_for("the VM's state re-read", 10, || {
        let api = api.clone();
        async move {
            let v: Vm = api.get("/api/v1/vms/web-1").await.unwrap();
            (v.actual_state == PowerState::Running).then_some(v)
        }
    })
    .await;
    assert_eq!(v.id, vm.id);
    assert_eq!(v.desired_state, PowerState::Running);
    // The host token issued before the restart still works.
    heartbeat(&c, &reg, agent.load()).await.unwrap();
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn resource_policies_are_checked_stored_and_applied_by_the_running_vms_host() {
    let dir = tempfile::tempdir().unwrap();
    let c = serve(config(dir.path(), 10_000)).await.unwrap();
    let agent = FakeAgent::start().await;
    let plain = FakeAgent::start().await;
    create_cluster(&c, "lab").await;
    let mut enforcing = facts(4, 8192);
    enforcing.resource_control = Some("cgroup v2 (cpu, memory) at /sys/fs/cgroup/tern/h1".into());
    register(&c, "h1", &agent, enforcing).await;
    register(&c, "h2", &plain, facts(4, 8192)).await;
    let api = admin(&c);
    for (name, mac, host) in [
        ("web-1", "52:54:00:00:00:01", "h1"),
        ("web-2", "52:54:00:00:00:02", "h2"),
    ] {
        create_vm_on(&api, name, mac, host).await;
    }

    // Stopped: stored only, applied when it starts.
    let vm: Vm = api
        .put(
            "/api/v1/vms/web-1/resources",
            &serde_json::json!({"cpu_shares": "high", "memory_reservation_mib": 128}),
        )
        .await
        .unwrap();
    assert_eq!(vm.spec.resources.cpu_shares, tern_api::Shares::High);
    assert_eq!(get_vm(&c, "web-1").await.spec.resources, vm.spec.resources);
    assert!(agent.calls().is_empty(), "{:?}", agent.calls());
    let ev = events(&c, "vm=web-1").await;
    assert!(
        ev.iter()
            .any(|e| e.message.contains("cpu shares high") && e.message.contains("next starts")),
        "{ev:?}"
    );

    // Policies that cannot hold, or are not policies at all: 400, nothing changes.
    for (body, needle) in [
        (
            serde_json::json!({"cpu_limit": "25"}),
            "percent of one core",
        ),
        (
            serde_json::json!({"cpu_limit": "25%; reboot"}),
            "CPU amount",
        ),
        (
            serde_json::json!({"memory_limit_mib": 100}),
            "below the VM's 256 MiB",
        ),
        (
            serde_json::json!({"cpu_reservation": "60%", "cpu_limit": "50%"}),
            "above the CPU limit",
        ),
        (serde_json::json!({"cpu_quota": "25%"}), "unknown field"),
        (serde_json::json!({"cpu_shares": "0"}), "shares"),
    ] {
        let r = api.put::<_, Vm>("/api/v1/vms/web-1/resources", &body).await;
        expect_status(r, 400, needle).await;
    }
    assert_eq!(get_vm(&c, "web-1").await.spec.resources, vm.spec.resources);

    // Running: the host applies it first, then the center stores it.
    let t: Task = api.post("/api/v1/vms/web-1/start", &()).await.unwrap();
    assert_eq!(wait_task(&c, t.id).await.state, TaskState::Succeeded);
    let vm: Vm = api
        .put(
            "/api/v1/vms/web-1/resources",
            &serde_json::json!({"cpu_limit": "25%"}),
        )
        .await
        .unwrap();
    assert_eq!(
        vm.spec.resources.cpu_limit,
        Some(tern_api::CpuAmount::CorePercent(25))
    );
    assert_eq!(vm.spec.resources.cpu_shares, tern_api::Shares::Normal);
    assert!(
        agent.calls().contains(&format!(
            "resources {}: cpu shares normal, limit 25%; memory shares normal",
            vm.id
        )),
        "{:?}",
        agent.calls()
    );

    // A running VM whose host cannot enforce a policy: 409, nothing stored or sent.
    let t: Task = api.post("/api/v1/vms/web-2/start", &()).await.unwrap();
    assert_eq!(wait_task(&c, t.id).await.state, TaskState::Succeeded);
    let r = api
        .put::<_, Vm>(
            "/api/v1/vms/web-2/resources",
            &serde_json::json!({"cpu_limit": "50%"}),
        )
        .await;
    expect_status(r, 409, "cannot enforce").await;
    assert!(get_vm(&c, "web-2").await.spec.resources.is_default());
    assert!(!plain.calls().iter().any(|c| c.starts_with("resources")));
    expect_status(
        api.put::<_, Vm>("/api/v1/vms/nope/resources", &serde_json::json!({}))
            .await,
        404,
        "nope",
    )
    .await;

    // A VM with a policy is not created where nothing enforces it.
    let mut pol = spec("web-3", "52:54:00:00:00:03", 256);
    pol.resources.cpu_reservation = Some(tern_api::CpuAmount::Mhz(5000));
    let r = api
        .post::<_, Vm>(
            "/api/v1/vms",
            &CreateVm {
                image: None,
                spec: pol.clone(),
                cluster: "lab".into(),
                host: Some("h2".into()),
            },
        )
        .await;
    expect_status(r, 422, "cannot enforce").await;

    // Admission control: h1 has 8000 MHz; web-1 reserves 4000, so web-3's 5000 is refused at
    // power-on (h2 cannot enforce a policy, so it cannot take web-3 either)...
    let _: Vm = api
        .post(
            "/api/v1/vms",
            &CreateVm {
                image: None,
                spec: pol,
                cluster: "lab".into(),
                host: Some("h1".into()),
            },
        )
        .await
        .unwrap();
    let _: Vm = api
        .put(
            "/api/v1/vms/web-1/resources",
            &serde_json::json!({"cpu_reservation": "4000MHz"}),
        )
        .await
        .unwrap();
    let r = api.post::<_, Task>("/api/v1/vms/web-3/start", &()).await;
    let msg = expect_status(r, 409, "cannot admit it").await;
    eprintln!("refused: {msg}");
    assert!(msg.contains("h1") && msg.contains("4000"), "{msg}");
    let web3 = get_vm(&c, "web-3").await.id;
    assert!(
        !agent
            .calls()
            .iter()
            .any(|c| c.starts_with(&format!("start {web3}"))),
        "{:?}",
        agent.calls()
    );
    // ...and admitted once web-1 reserves less.
    let _: Vm = api
        .put(
            "/api/v1/vms/web-1/resources",
            &serde_json::json!({"cpu_reservation": "2000MHz"}),
        )
        .await
        .unwrap();
    let t: Task = api.post("/api/v1/vms/web-3/start", &()).await.unwrap();
    assert_eq!(wait_task(&c, t.id).await.state, TaskState::Succeeded);
    assert_eq!(get_vm(&c, "web-3").await.host.as_deref(), Some("h1"));
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn listings_come_in_pages_by_name_with_a_search() {
    let dir = tempfile::tempdir().unwrap();
    let c = serve(config(dir.path(), 10_000)).await.unwrap();
    let agent = FakeAgent::start().await;
    create_cluster(&c, "lab").await;
    register(&c, "h1", &agent, facts(4, 8192)).await;
    let api = admin(&c);
    for (i, name) in ["db-2", "web-1", "db-1", "web-3", "web-2"]
        .iter()
        .enumerate()
    {
        let _: Vm = api
            .post(
                "/api/v1/vms",
                &CreateVm {
                    image: None,
                    spec: spec(name, &format!("52:54:00:00:01:{i:02x}"), 64),
                    cluster: "lab".into(),
                    host: None,
                },
            )
            .await
            .unwrap();
    }
    let names = |vms: Vec<Vm>| -> Vec<String> { vms.into_iter().map(|v| v.spec.name).collect() };
    // No query: everything, by name.
    let all: Vec<Vm> = api.get("/api/v1/vms").await.unwrap();
    assert_eq!(names(all), ["db-1", "db-2", "web-1", "web-2", "web-3"]);
    // Pages of two, each after the last name of the one before.
    let p1: Vec<Vm> = api.get("/api/v1/vms?limit=2").await.unwrap();
    assert_eq!(names(p1), ["db-1", "db-2"]);
    let p2: Vec<Vm> = api.get("/api/v1/vms?limit=2&after=db-2").await.unwrap();
    assert_eq!(names(p2), ["web-1", "web-2"]);
    let p3: Vec<Vm> = api.get("/api/v1/vms?limit=2&after=web-2").await.unwrap();
    assert_eq!(names(p3), ["web-3"]);
    // A search, paged too.
    let found: Vec<Vm> = api.get("/api/v1/vms?q=WEB&limit=2").await.unwrap();
    assert_eq!(names(found), ["web-1", "web-2"]);
    let hosts: Vec<Host> = api.get("/api/v1/hosts?q=h&limit=1").await.unwrap();
    assert_eq!(hosts.len(), 1);
    // A page of nothing, and an unknown parameter, are refused.
    let r = api.get::<Vec<Vm>>("/api/v1/vms?limit=0").await;
    expect_status(r, 400, "limit").await;
    let r = api.get::<Vec<Vm>>("/api/v1/vms?page=2").await;
    expect_status(r, 400, "page").await;

    // Filters: by host, by cluster, and the VMs no host owns (none here).
    let on_h1: Vec<Vm> = api.get("/api/v1/vms?host=h1&limit=3").await.unwrap();
    assert_eq!(names(on_h1), ["db-1", "db-2", "web-1"]);
    let on_h2: Vec<Vm> = api.get("/api/v1/vms?host=h2").await.unwrap();
    assert!(on_h2.is_empty());
    let in_lab: Vec<Vm> = api.get("/api/v1/vms?cluster=lab&q=db").await.unwrap();
    assert_eq!(names(in_lab), ["db-1", "db-2"]);
    let elsewhere: Vec<Vm> = api.get("/api/v1/vms?cluster=other").await.unwrap();
    assert!(elsewhere.is_empty());
    let unplaced: Vec<Vm> = api.get("/api/v1/vms?unplaced=true").await.unwrap();
    assert!(unplaced.is_empty());
    let placed: Vec<Vm> = api.get("/api/v1/vms?unplaced=false").await.unwrap();
    assert_eq!(placed.len(), 5);
    let hosts: Vec<Host> = api.get("/api/v1/hosts?cluster=lab").await.unwrap();
    assert_eq!(hosts.len(), 1);
    // A VM filter on hosts is a mistake, said so.
    let r = api.get::<Vec<Host>>("/api/v1/hosts?host=h1").await;
    expect_status(r, 400, "filter VMs").await;

    // The counts, without listing anything.
    let s: Summary = api.get("/api/v1/summary").await.unwrap();
    assert_eq!((s.hosts, s.vms), (1, 5));
    assert_eq!(s.hosts_by_state.get("connected"), Some(&1));
    assert_eq!(s.vms_by_state.get("stopped"), Some(&5));
    assert_eq!(s.clusters.len(), 1);
    assert_eq!(
        (
            s.clusters[0].name.as_str(),
            s.clusters[0].hosts,
            s.clusters[0].vms
        ),
        ("lab", 1, 5)
    );
    assert_eq!(s.clusters[0].running_vms, 0);
}

#[tokio::test]
async fn host_load_and_drs_imbalance_are_kept_for_an_hour_of_charts() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 10_000);
    cfg.history_period_ms = 200;
    let c = serve(cfg).await.unwrap();
    let agent = FakeAgent::start().await;
    create_cluster(&c, "lab").await;
    let h1 = register(&c, "h1", &agent, facts(4, 8192)).await;
    let h2 = register(&c, "h2", &agent, facts(4, 8192)).await;
    let api = admin(&c);
    let load = |cpu: f64, used: u64| HostLoad {
        cpu_percent: cpu,
        memory_used_mib: used,
        memory_total_mib: 8192,
        vms: vec![],
    };
    heartbeat(&c, &h1, load(75.0, 2048)).await.unwrap();
    heartbeat(&c, &h2, load(5.0, 4096)).await.unwrap();
    // Sampled each period: h1's figures appear, as percentages.
    let history: HostLoadHistory = wait_for("h1's load in its history", 20, || async {
        let h: HostLoadHistory = admin(&c).get("/api/v1/hosts/h1/load-history").await.ok()?;
        (h.samples.len() >= 2).then_some(h)
    })
    .await;
    assert_eq!(history.period_ms, 200);
    let last = history.samples.last().unwrap();
    assert_eq!((last.cpu_percent, last.memory_used_percent), (75.0, 25.0));
    assert!(history.samples.windows(2).all(|w| w[0].at <= w[1].at));
    let h2_history: HostLoadHistory = api.get("/api/v1/hosts/h2/load-history").await.unwrap();
    assert!(h2_history
        .samples
        .iter()
        .all(|s| s.cpu_percent == 5.0 && s.memory_used_percent == 50.0));
    // The cluster's imbalance, with the threshold it is judged at.
    let drs: DrsHistory = wait_for("the imbalance history", 20, || async {
        let h: DrsHistory = admin(&c)
            .get("/api/v1/clusters/lab/drs/history")
            .await
            .ok()?;
        (!h.samples.is_empty()).then_some(h)
    })
    .await;
    assert_eq!(drs.threshold, 3);
    assert!(drs
        .samples
        .iter()
        .all(|s| s.imbalance >= s.target && s.target >= 0.0));
    // Unknown names are 404s; a task that is not a migration has no timeline.
    let r = api
        .get::<HostLoadHistory>("/api/v1/hosts/h9/load-history")
        .await;
    expect_status(r, 404, "h9").await;
    let r = api
        .get::<DrsHistory>("/api/v1/clusters/nope/drs/history")
        .await;
    expect_status(r, 404, "nope").await;
    create_vm_on(&api, "web-1", "52:54:00:00:02:01", "h1").await;
    let t: Task = api.post("/api/v1/vms/web-1/start", &()).await.unwrap();
    let r = api
        .get::<MigrationTimeline>(&format!("/api/v1/tasks/{}/timeline", t.id))
        .await;
    expect_status(r, 400, "only migrations").await;
    let r = api
        .get::<MigrationTimeline>(&format!("/api/v1/tasks/{}/timeline", Uuid::new_v4()))
        .await;
    expect_status(r, 404, "does not exist").await;
    // A viewer may look: these are reads.
    let viewer: tern_api::center::CreatedToken = api
        .post(
            "/api/v1/tokens",
            &tern_api::center::CreateToken {
                name: "vera".into(),
                role: tern_api::center::Role::Viewer,
            },
        )
        .await
        .unwrap();
    let seen: HostLoadHistory = client(&c, &viewer.token)
        .get("/api/v1/hosts/h1/load-history")
        .await
        .unwrap();
    assert!(!seen.samples.is_empty());
}
