//! DRS through the center's real API, with fake host agents: placement of a VM created
//! without a host is the engine's (not "most free memory"), the per-cluster settings
//! round-trip and are validated, recommendations follow the load hosts report in their
//! heartbeats, `manual` only records them (no migration), `fully` applies them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::extract::{Path as AxPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use tern_api::agent::{CheckPaths, PathsReport, StartVm, VmRuntime};
use tern_api::center::{CreateVm, Event, Heartbeat, Registered, Task, TaskKind, TaskState, Vm};
use tern_api::drs::{DrsAutomation, DrsRecommendations, DrsSettings};
use tern_api::evc::HostCpu;
use tern_api::{ApiClient, Endpoint, ErrorBody, HostFacts, HostLoad, PowerState, VmLoad};
use tern_center::{serve, CenterConfig, RunningCenter};
use uuid::Uuid;

mod common;
use common::{admin, config, kernel_spec, raw, setup_lab, started, status, wait_for, wait_task};

// ---------- a fake agent: starts and path checks, in memory ----------

type Shared = Arc<Mutex<HashMap<Uuid, VmRuntime>>>;

async fn check(Json(_): Json<CheckPaths>) -> Json<PathsReport> {
    Json(PathsReport {
        unreachable: vec![],
        missing: vec![],
        outside_shared_storage: vec![],
    })
}

async fn start(
    State(s): State<Shared>,
    AxPath(id): AxPath<Uuid>,
    Json(req): Json<StartVm>,
) -> Json<VmRuntime> {
    let rt = started(id, req);
    s.lock().unwrap().insert(id, rt.clone());
    Json(rt)
}

async fn vm(
    State(s): State<Shared>,
    AxPath(id): AxPath<Uuid>,
) -> Result<Json<VmRuntime>, (StatusCode, Json<ErrorBody>)> {
    s.lock().unwrap().get(&id).cloned().map(Json).ok_or((
        StatusCode::NOT_FOUND,
        Json(ErrorBody {
            error: "no such VM".into(),
        }),
    ))
}

async fn fake_agent() -> String {
    let app = Router::new()
        .route("/v1/check-paths", post(check))
        .route("/v1/vms/{id}", get(vm).put(start))
        .with_state(Shared::default());
    common::serve_router(app).await
}

// ---------- helpers ----------

/// A center whose DRS scheduler passes every `drs_period_ms`.
fn drs_config(dir: &Path, drs_period_ms: u64) -> CenterConfig {
    let mut c = config(dir, 60_000);
    c.drs_period_ms = drs_period_ms;
    c
}

/// A 4-core host whose CPU (x86-64-v3 features) runs the default VM CPU: migrations pass
/// the CPU pre-check.
fn facts(memory_mib: u64) -> HostFacts {
    HostFacts {
        cpu: Some(HostCpu {
            vendor: Some("AuthenticAMD".into()),
            uncapped: tern_cpu::catalogue()
                .get("x86-64-v3")
                .unwrap()
                .features
                .to_vec(),
            ..HostCpu::default()
        }),
        ..common::facts(4, memory_mib)
    }
}

/// Creates cluster `lab` and registers the hosts (name, memory); returns each host's
/// (id, token) for heartbeats.
async fn setup(c: &RunningCenter, hosts: &[(&str, u64)]) -> HashMap<String, Registered> {
    let mut list = Vec::new();
    for (name, memory_mib) in hosts {
        list.push((*name, facts(*memory_mib), fake_agent().await));
    }
    setup_lab(c, list).await
}

fn create_body(name: &str, host: Option<&str>, mac: &str, memory_mib: u64) -> CreateVm {
    CreateVm {
        image: None,
        spec: kernel_spec(name, mac, memory_mib),
        cluster: "lab".into(),
        host: host.map(str::to_string),
    }
}

/// Creates a VM on `host` and starts it.
async fn running(c: &RunningCenter, name: &str, host: &str, mac: &str) -> Vm {
    let api = admin(c);
    let vm: Vm = api
        .post("/api/v1/vms", &create_body(name, Some(host), mac, 512))
        .await
        .unwrap();
    let t: Task = api
        .post(&format!("/api/v1/vms/{name}/start"), &())
        .await
        .unwrap();
    assert_eq!(wait_task(c, t.id).await.state, TaskState::Succeeded);
    vm
}

/// Sends a heartbeat of `host` reporting `vms` (id, name, CPU percent of one core).
async fn heartbeat(c: &RunningCenter, reg: &Registered, vms: &[(Uuid, &str, f64)]) {
    let api = ApiClient::new(Endpoint::Tcp(c.url()), &reg.host_token).unwrap();
    let load = HostLoad {
        cpu_percent: vms.iter().map(|v| v.2).sum::<f64>() / 4.0,
        memory_used_mib: 1024,
        memory_total_mib: 8192,
        vms: vms
            .iter()
            .map(|(id, name, cpu)| VmLoad {
                vm_id: *id,
                name: name.to_string(),
                state: PowerState::Running,
                cpu_percent: *cpu,
                rss_mib: 512,
            })
            .collect(),
    };
    let _: () = api
        .post(
            &format!("/api/v1/hosts/{}/heartbeat", reg.host_id),
            &Heartbeat {
                facts: facts(8192),
                load,
                health: None,
            },
        )
        .await
        .unwrap();
}

async fn tasks(c: &RunningCenter) -> Vec<Task> {
    admin(c).get("/api/v1/tasks").await.unwrap()
}

async fn events(c: &RunningCenter) -> Vec<Event> {
    admin(c).get("/api/v1/events?limit=500").await.unwrap()
}

// ---------- tests ----------

#[tokio::test]
async fn placement_is_the_engines_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let c = serve(drs_config(dir.path(), 600_000)).await.unwrap();
    // h1 has the most free memory even with a VM running on it, so "most free memory" would
    // pick it; the engine balances memory load (with b: 1 GiB of 16 on h1 vs 0.5 of 8 on h2)
    // and picks h2.
    setup(&c, &[("h1", 16384), ("h2", 8192)]).await;
    let api = admin(&c);
    running(&c, "a", "h1", "52:54:00:00:01:01").await;
    let b: Vm = api
        .post(
            "/api/v1/vms",
            &create_body("b", None, "52:54:00:00:01:02", 512),
        )
        .await
        .unwrap();
    assert_eq!(b.host.as_deref(), Some("h2"), "{b:?}");
    let evs = events(&c).await;
    let placed = evs
        .iter()
        .find(|e| e.message.starts_with("DRS placed VM b on host h2"))
        .unwrap_or_else(|| panic!("no DRS placement event: {evs:#?}"));
    assert!(
        placed.message.contains("imbalance"),
        "the event gives the engine's reason: {}",
        placed.message
    );

    // No host has room: the old refusal (422, naming the free memory) still answers.
    let (code, msg) = status(
        api.post::<_, Vm>(
            "/api/v1/vms",
            &create_body("huge", None, "52:54:00:00:01:03", 20_000),
        )
        .await,
    );
    assert!(code == 422 || code == 409, "{code} {msg}");
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn drs_settings_round_trip_and_validation() {
    let dir = tempfile::tempdir().unwrap();
    let c = serve(drs_config(dir.path(), 600_000)).await.unwrap();
    setup(&c, &[("h1", 8192)]).await;
    let api = admin(&c);
    let s: DrsSettings = api.get("/api/v1/clusters/lab/drs").await.unwrap();
    assert_eq!(s, DrsSettings::default());
    assert_eq!(s.automation, DrsAutomation::Manual);
    assert_eq!(s.threshold, 3);

    let want = DrsSettings {
        automation: DrsAutomation::Fully,
        threshold: 4,
        proactive: tern_api::health::ProactiveMode::Automatic,
    };
    let got: DrsSettings = api.put("/api/v1/clusters/lab/drs", &want).await.unwrap();
    assert_eq!(got, want);
    let s: DrsSettings = api.get("/api/v1/clusters/lab/drs").await.unwrap();
    assert_eq!(s, want);

    for threshold in [0u8, 6] {
        let bad = DrsSettings {
            automation: DrsAutomation::Manual,
            threshold,
            proactive: Default::default(),
        };
        let (code, msg) = status(
            api.put::<_, DrsSettings>("/api/v1/clusters/lab/drs", &bad)
                .await,
        );
        assert_eq!(code, 400, "{msg}");
        assert!(msg.contains("use 1 (mandatory moves only) to 5"), "{msg}");
    }
    let resp = raw()
        .put(format!("{}/api/v1/clusters/lab/drs", c.url()))
        .bearer_auth(&c.admin_token)
        .json(&serde_json::json!({"automation": "sometimes", "threshold": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    // Refusals changed nothing.
    let s: DrsSettings = api.get("/api/v1/clusters/lab/drs").await.unwrap();
    assert_eq!(s, want);

    let (code, msg) = status(api.get::<DrsSettings>("/api/v1/clusters/nosuch/drs").await);
    assert_eq!(code, 404, "{msg}");
    let (code, _) = status(
        api.get::<DrsRecommendations>("/api/v1/clusters/nosuch/drs/recommendations")
            .await,
    );
    assert_eq!(code, 404);
    let (code, _) = status(
        api.post::<_, Task>("/api/v1/clusters/nosuch/drs/apply", &())
            .await,
    );
    assert_eq!(code, 404);
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn recommendations_follow_reported_load_and_manual_never_migrates() {
    let dir = tempfile::tempdir().unwrap();
    // A short DRS period: the loop runs many passes during the test.
    let c = serve(drs_config(dir.path(), 100)).await.unwrap();
    let regs = setup(&c, &[("h1", 8192), ("h2", 8192)]).await;
    let api = admin(&c);
    let mut vms = Vec::new();
    for (i, name) in ["v1", "v2", "v3"].iter().enumerate() {
        let vm = running(&c, name, "h1", &format!("52:54:00:00:02:0{i}")).await;
        vms.push((vm.id, *name, 95.0));
    }

    // Idle VMs: memory is balanced enough, nothing to move.
    let idle: Vec<(Uuid, &str, f64)> = vms.iter().map(|v| (v.0, v.1, 0.0)).collect();
    heartbeat(&c, &regs["h1"], &idle).await;
    heartbeat(&c, &regs["h2"], &[]).await;
    let r: DrsRecommendations = api
        .get("/api/v1/clusters/lab/drs/recommendations")
        .await
        .unwrap();
    let before = r.imbalance_before;

    // Busy VMs: h1 is at ~71% CPU, h2 idle; the engine moves load to h2 with a reason.
    heartbeat(&c, &regs["h1"], &vms).await;
    heartbeat(&c, &regs["h2"], &[]).await;
    let r: DrsRecommendations = api
        .get("/api/v1/clusters/lab/drs/recommendations")
        .await
        .unwrap();
    assert!(r.imbalance_before > before, "{r:#?}");
    assert!(!r.recommendations.is_empty(), "{}", r.text);
    let m = &r.recommendations[0];
    assert_eq!((m.from_host.as_str(), m.to_host.as_str()), ("h1", "h2"));
    assert!(m.imbalance_after < m.imbalance_before, "{m:?}");
    assert!(
        !m.reason.is_empty() && m.detail.contains("imbalance"),
        "{m:?}"
    );
    assert!(r.text.contains("h2"), "{}", r.text);

    // manual (the default): the loop records the recommendations, and never migrates.
    let api2 = api.clone();
    let ev = wait_for("the scheduler to record its recommendations", 20, || {
        let api = api2.clone();
        async move {
            let evs: Vec<Event> = api.get("/api/v1/events?limit=500").await.unwrap();
            evs.into_iter()
                .find(|e| e.message.contains("DRS recommends (automation manual"))
        }
    })
    .await;
    assert!(ev.message.contains("h1 → h2"), "{}", ev.message);
    let moved: Vec<Task> = tasks(&c)
        .await
        .into_iter()
        .filter(|t| matches!(t.kind, TaskKind::VmMigrate | TaskKind::DrsApply))
        .collect();
    assert!(moved.is_empty(), "manual must not migrate: {moved:?}");
    for v in ["v1", "v2", "v3"] {
        let vm: Vm = api.get(&format!("/api/v1/vms/{v}")).await.unwrap();
        assert_eq!(vm.host.as_deref(), Some("h1"));
    }

    // fully: the loop applies them (a drs_apply task runs the migrations).
    let _: DrsSettings = api
        .put(
            "/api/v1/clusters/lab/drs",
            &DrsSettings {
                automation: DrsAutomation::Fully,
                threshold: 3,
                proactive: Default::default(),
            },
        )
        .await
        .unwrap();
    let apply = wait_for("the scheduler to apply", 20, || {
        let c = &c;
        async move {
            tasks(c)
                .await
                .into_iter()
                .find(|t| t.kind == TaskKind::DrsApply)
        }
    })
    .await;
    // The fake agents cannot migrate: the task ends, naming each move it tried.
    let done = wait_task(&c, apply.id).await;
    let result: tern_api::drs::DrsApplyResult =
        serde_json::from_value(done.result.clone().expect("an apply result")).unwrap();
    assert!(!result.applied.is_empty(), "{done:?}");
    assert_eq!(result.applied[0].to_host, "h2", "{result:?}");
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_stopped_vm_of_an_unusable_host_starts_where_the_engine_places_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = drs_config(dir.path(), 600_000);
    cfg.heartbeat_timeout_ms = 600;
    cfg.heartbeat_interval_ms = 100;
    let c = serve(cfg).await.unwrap();
    let regs = setup(&c, &[("h1", 8192), ("h2", 8192)]).await;
    let api = admin(&c);
    let _: Vm = api
        .post(
            "/api/v1/vms",
            &create_body("parked", Some("h1"), "52:54:00:00:03:01", 512),
        )
        .await
        .unwrap();
    // h2 keeps calling in; h1 falls silent and is marked disconnected.
    let (c_url, h2) = (c.url(), regs["h2"].clone());
    let beats = tokio::spawn(async move {
        let api = ApiClient::new(Endpoint::Tcp(c_url), &h2.host_token).unwrap();
        loop {
            let hb = Heartbeat {
                facts: facts(8192),
                load: HostLoad {
                    cpu_percent: 0.0,
                    memory_used_mib: 0,
                    memory_total_mib: 8192,
                    vms: vec![],
                },
                health: None,
            };
            let _ = api
                .post::<_, ()>(&format!("/api/v1/hosts/{}/heartbeat", h2.host_id), &hb)
                .await;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
    let api2 = api.clone();
    wait_for("h1 to be disconnected", 20, || {
        let api = api2.clone();
        async move {
            let h: tern_api::center::Host = api.get("/api/v1/hosts/h1").await.unwrap();
            (h.state == tern_api::HostState::Disconnected).then_some(())
        }
    })
    .await;

    let t: Task = api.post("/api/v1/vms/parked/start", &()).await.unwrap();
    assert_eq!(t.host.as_deref(), Some("h2"), "{t:?}");
    assert_eq!(wait_task(&c, t.id).await.state, TaskState::Succeeded);
    let vm: Vm = api.get("/api/v1/vms/parked").await.unwrap();
    assert_eq!(vm.host.as_deref(), Some("h2"));
    assert_eq!(vm.generation, 2, "re-homing bumps the ownership generation");
    let evs = events(&c).await;
    assert!(
        evs.iter().any(|e| e
            .message
            .starts_with("DRS placed VM parked on host h2 to start it")),
        "{evs:#?}"
    );
    beats.abort();
    c.shutdown().await.unwrap();
}
