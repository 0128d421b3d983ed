//! Helpers the center's API tests share: a center on 127.0.0.1, its admin client, waiting
//! on conditions, error statuses, fake hosts' facts and VMs.
#![allow(dead_code)] // each test binary uses its own subset

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use tern_api::agent::{StartVm, VmRuntime};
use tern_api::center::{Cluster, CreateCluster, RegisterHost, Registered, Task};
use tern_api::{
    Accelerator, ApiClient, ApiError, BootSource, Endpoint, HostFacts, NicSpec, PowerState, VmSpec,
};
use tern_center::{CenterConfig, RunningCenter};
use uuid::Uuid;

/// Serves a fake agent's router on a free port of 127.0.0.1; returns its `http://` URL.
pub async fn serve_router(app: axum::Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    url
}

/// A center in `dir` listening on a free port of 127.0.0.1.
pub fn config(dir: &Path, heartbeat_timeout_ms: u64) -> CenterConfig {
    let mut c = CenterConfig::with_data_dir(dir.join("center"));
    c.listen = "127.0.0.1:0".parse().unwrap();
    // The fake agents join with the shared enrolment token (host_identity.rs covers both).
    c.shared_enrolment = true;
    // These tests check the API's rules with fake agents over plain HTTP; tls.rs covers the
    // cluster PKI and mutual TLS, and the lab tests run real agents over TLS.
    c.tls = false;
    c.heartbeat_timeout_ms = heartbeat_timeout_ms;
    c.heartbeat_interval_ms = (heartbeat_timeout_ms / 4).clamp(1, 100);
    // The same suite on the HA store: scripts/test.sh runs it again with an etcd.
    if let Ok(endpoints) = std::env::var("TERN_TEST_ETCD") {
        let unique = dir
            .file_name()
            .map(|n| {
                n.to_string_lossy()
                    .replace(|c: char| !c.is_ascii_alphanumeric(), "")
            })
            .unwrap_or_default();
        c.ha = Some(tern_center::config::HaSettings {
            endpoints: endpoints.split(',').map(String::from).collect(),
            prefix: format!("/tern-test-{unique}"),
            name: "c1".into(),
            advertise_url: "http://127.0.0.1:1".into(),
            lease_ttl: Duration::from_secs(3),
            tls: None,
        });
    }
    c
}

pub fn admin(c: &RunningCenter) -> ApiClient {
    c.client(&c.admin_token).unwrap()
}

/// The heartbeat of an idle 4-core, 8 GiB host with no VMs.
pub fn idle_heartbeat() -> tern_api::center::Heartbeat {
    tern_api::center::Heartbeat {
        facts: facts(4, 8192),
        load: tern_api::HostLoad {
            cpu_percent: 1.0,
            memory_used_mib: 100,
            memory_total_mib: 8192,
            vms: vec![],
        },
        health: None,
    }
}

/// A plain HTTP client (for bodies the typed client cannot send).
pub fn raw() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .use_preconfigured_tls(tern_pki::tls::refusing_client_config())
        .build()
        .unwrap()
}

/// The status and message of a call that must fail with an HTTP error.
pub fn status(r: Result<impl std::fmt::Debug, ApiError>) -> (u16, String) {
    match r.expect_err("the call should fail") {
        ApiError::Status { status, message } => (status, message),
        other => panic!("expected an HTTP error status, got {other}"),
    }
}

/// Polls `f` until it returns Some, or panics after `secs`.
pub async fn wait_for<T, F, Fut>(what: &str, secs: u64, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    tern_testkit::wait_until(what, Duration::from_secs(secs), f).await
}

/// Waits (30 s at most) for a task to end.
pub async fn wait_task(c: &RunningCenter, id: Uuid) -> Task {
    let api = admin(c);
    wait_for("the task to end", 30, || {
        let api = api.clone();
        async move {
            let t: Task = api.get(&format!("/api/v1/tasks/{id}")).await.unwrap();
            t.state.is_done().then_some(t)
        }
    })
    .await
}

/// What a fake agent answers once it has "started" a VM.
pub fn started(id: Uuid, req: StartVm) -> VmRuntime {
    VmRuntime {
        id,
        spec: req.spec,
        generation: req.generation,
        state: PowerState::Running,
        pid: Some(4242),
        accelerator: Accelerator::Tcg,
        exit_reason: None,
        console_log: "/tmp/console.log".into(),
        taps: vec![],
        cgroup: None,
    }
}

#[allow(unused_imports)] // not every test binary reads facts
pub use tern_testkit::fixtures::host_facts as facts;

/// A 1-vCPU VM booting a kernel from the shared storage, with one NIC.
pub fn kernel_spec(name: &str, mac: &str, memory_mib: u64) -> VmSpec {
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
            initrd: None,
            cmdline: "console=ttyS0".into(),
        },
        disks: vec![],
        nics: vec![NicSpec { mac: mac.into() }],
    }
}

/// Creates cluster `name` with no EVC baseline.
pub async fn create_cluster(c: &RunningCenter, name: &str) -> Cluster {
    admin(c)
        .post(
            "/api/v1/clusters",
            &CreateCluster {
                name: name.into(),
                evc_mode: None,
                migration_encryption: None,
            },
        )
        .await
        .unwrap()
}

/// Creates cluster `lab` and registers `hosts` (name, facts, agent URL) in it; returns each
/// host's registration (id and token, for heartbeats) by name.
pub async fn setup_lab(
    c: &RunningCenter,
    hosts: Vec<(&str, HostFacts, String)>,
) -> HashMap<String, Registered> {
    create_cluster(c, "lab").await;
    let enrol = ApiClient::new(Endpoint::Tcp(c.url()), &c.enrol_token).unwrap();
    let mut out = HashMap::new();
    for (name, facts, agent_url) in hosts {
        let r: Registered = enrol
            .post(
                "/api/v1/hosts/register",
                &RegisterHost {
                    name: name.to_string(),
                    cluster: "lab".into(),
                    agent_url,
                    agent_token: "agent-secret".into(),
                    facts,
                    csr: None,
                },
            )
            .await
            .unwrap();
        out.insert(name.to_string(), r);
    }
    out
}

/// A migration's ownership-record state, read from the store beside the running center (WAL
/// lets a reader in).
pub fn migration_record(dir: &Path, task: Uuid) -> tern_center::store::MigrationRecordState {
    let mut store = tern_center::store::Store::open(&dir.join("center/center.db")).unwrap();
    store
        .read(|tx| tx.migration(task))
        .unwrap()
        .expect("the migration record")
        .state
}
