//! A real agent process joins a real center over TLS: it checks the center by the CA
//! fingerprint its join token carries, gets a certificate naming it, keeps it private, serves
//! its API to the center's certificate only, and renews its certificate on its own before it
//! expires — staying connected throughout.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{AgentProc, QemuReaper};
use tern_api::center::{AddHost, CreateCluster, Event, Host, JoinToken};
use tern_api::{ApiClient, Endpoint, HostFacts, HostState};
use tern_pki::tls::{client_config, ServerTrust};
use tern_pki::{Ca, LiveIdentity};
use tern_testkit::wait_until;

/// Not a test: the body of the agent processes the tests start (see `common::agent_entry`).
#[test]
#[ignore = "runs the agent when started by the other tests"]
fn agent_process_entry() {
    common::agent_entry();
}

/// The shortest lifetime the center allows: renewal comes after 20 s.
const LIFETIME_S: u64 = 30;

async fn issued_certificates(admin: &ApiClient) -> Vec<String> {
    let events: Vec<Event> = admin
        .get("/api/v1/events?host=h1&limit=200")
        .await
        .expect("events");
    events
        .into_iter()
        .map(|e| e.message)
        .filter(|m| m.starts_with("certificate issued to host h1"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_joins_over_tls_serves_only_the_center_and_renews_its_certificate() {
    common::init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let _reaper = QemuReaper {
        state_dir: state.clone(),
    };
    let mut cfg = tern_center::CenterConfig::with_data_dir(tmp.path().join("center"));
    cfg.listen = "127.0.0.1:0".parse().expect("addr");
    cfg.cert_lifetime_s = LIFETIME_S;
    cfg.heartbeat_interval_ms = 300;
    let center = tern_center::serve(cfg).await.expect("center");
    let admin = center.client(&center.admin_token).expect("admin client");
    admin
        .post::<_, serde_json::Value>(
            "/api/v1/clusters",
            &CreateCluster {
                name: "lab".into(),
                evc_mode: None,
                migration_encryption: None,
            },
        )
        .await
        .expect("cluster");
    let jt: JoinToken = admin
        .post("/api/v1/hosts/h1/join-token", &AddHost { ttl_s: Some(600) })
        .await
        .expect("join token");
    let enrol = tmp.path().join("enrol.token");
    std::fs::write(&enrol, &jt.token).expect("token file");

    let args =
        common::enrolled_agent_args(&center.url(), &enrol, &state, &["--heartbeat-ms", "300"]);
    let agent = AgentProc::spawn(&args, &tmp.path().join("agent.log"), None);
    // Joined: the center lists it, and the agent has kept the certificate it was given.
    let pem_path = state.join("tls/host.pem");
    let host: Host = wait_until("h1 joined", Duration::from_secs(60), || {
        let (admin, pem_path) = (admin.clone(), pem_path.clone());
        async move {
            let h: Host = admin.get("/api/v1/hosts/h1").await.ok()?;
            (h.state == HostState::Connected && pem_path.exists()).then_some(h)
        }
    })
    .await;
    assert!(host.agent_url.starts_with("https://"), "{}", host.agent_url);

    // The key and certificate are the host's own, kept private.
    let mode = std::fs::metadata(&pem_path)
        .expect("host.pem")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let pem = std::fs::read_to_string(&pem_path).expect("read host.pem");
    let first = tern_pki::inspect_pem(&pem).expect("certificate");
    assert_eq!(first.host(), Some("h1"));

    // Its API answers the center's certificate only (the agent token alone is not enough).
    let agent_token = std::fs::read_to_string(state.join("agent.token")).expect("agent token");
    let ca = Ca::load_or_create(&tmp.path().join("center/pki"), "unused").expect("the CA");
    let trust = ServerTrust::Ca {
        ca_pem: ca.cert_pem().into(),
        name: "h1.host.tern".into(),
    };
    let call_as = |names: Option<&[&str]>| {
        let id = names.map(|n| {
            let names: Vec<String> = n.iter().map(|s| s.to_string()).collect();
            LiveIdentity::new(&ca.issue_identity(&names, Duration::from_secs(600)).unwrap())
                .unwrap()
        });
        let c = ApiClient::with_tls(
            Endpoint::Tcp(host.agent_url.clone()),
            agent_token.trim(),
            Duration::from_secs(10),
            client_config(&trust, id).expect("client config"),
        )
        .expect("client");
        async move { c.get::<HostFacts>("/v1/facts").await }
    };
    call_as(Some(&[tern_pki::CENTER_NAME]))
        .await
        .expect("the center's certificate is served");
    assert!(call_as(Some(&["h2.host.tern"])).await.is_err());
    assert!(call_as(None).await.is_err());
    let plain = ApiClient::with_timeout(
        Endpoint::Tcp(host.agent_url.replace("https://", "http://")),
        agent_token.trim(),
        Duration::from_secs(10),
    )
    .expect("plain client");
    assert!(plain.get::<HostFacts>("/v1/facts").await.is_err());

    // Renewal: a second certificate is issued before the first expires, and the host keeps
    // heartbeating with it.
    assert_eq!(issued_certificates(&admin).await.len(), 1);
    // Seen on both sides: the center issued it, and the agent keeps it in place of the first.
    let renewed = wait_until(
        "the agent renews its certificate",
        Duration::from_secs(LIFETIME_S + 20),
        || {
            let (admin, pem_path, first) = (admin.clone(), pem_path.clone(), first.clone());
            async move {
                let pem = std::fs::read_to_string(&pem_path).ok()?;
                let now = tern_pki::inspect_pem(&pem).ok()?;
                (issued_certificates(&admin).await.len() >= 2 && now.serial != first.serial)
                    .then_some(now)
            }
        },
    )
    .await;
    assert!(renewed.not_after > first.not_after);
    let before: Host = admin.get("/api/v1/hosts/h1").await.expect("host");
    let shown = before
        .certificate
        .clone()
        .expect("the center shows the certificate");
    assert_eq!(shown.serial, renewed.serial);
    wait_until(
        "heartbeats after the renewal",
        Duration::from_secs(10),
        || {
            let admin = admin.clone();
            let last = before.last_heartbeat;
            async move {
                let h: Host = admin.get("/api/v1/hosts/h1").await.ok()?;
                (h.state == HostState::Connected && h.last_heartbeat > last).then_some(())
            }
        },
    )
    .await;
    drop(agent);
    center.shutdown().await.expect("center stops");
}
