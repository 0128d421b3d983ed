//! The cluster PKI against a real center serving TLS: a host joins with a one-time token that
//! carries the CA's fingerprint and a signing request, gets a certificate naming it, and from
//! then on every call for that host needs that certificate (mutual TLS); renewal replaces it,
//! host removal revokes it. The center's own side: plain HTTP, foreign CAs and wrong names are
//! refused, and the center's calls to agents accept only the certificate of the host they are
//! meant for.

mod common;

use std::time::Duration;

use common::{admin, config, create_cluster, facts, idle_heartbeat, status};
use tern_api::center::{AddHost, JoinToken, RegisterHost, Registered};
use tern_api::{ApiClient, ApiError, Endpoint};
use tern_center::RunningCenter;
use tern_pki::tls::{client_config, server_config, ClientPolicy, ServerTrust};
use tern_pki::{Ca, Fingerprint, Identity, LiveIdentity};

const T: Duration = Duration::from_secs(20);

async fn tls_center(dir: &std::path::Path) -> RunningCenter {
    let mut cfg = config(dir, 60_000);
    cfg.tls = true;
    cfg.shared_enrolment = false;
    tern_center::serve(cfg).await.unwrap()
}

/// A host-side client of the center: trusting `trust`, presenting `identity` if any.
fn host_client(
    c: &RunningCenter,
    token: &str,
    trust: &ServerTrust,
    identity: Option<&Identity>,
) -> ApiClient {
    let live = identity.map(|id| LiveIdentity::new(id).unwrap());
    let cfg = client_config(trust, live).unwrap();
    ApiClient::with_tls(Endpoint::Tcp(c.url()), token, T, cfg).unwrap()
}

fn ca_trust(c: &RunningCenter) -> ServerTrust {
    ServerTrust::Ca {
        ca_pem: c.ca_pem.clone().unwrap(),
        name: tern_pki::CENTER_NAME.into(),
    }
}

fn register_req(name: &str, csr: Option<String>) -> RegisterHost {
    RegisterHost {
        name: name.into(),
        cluster: "lab".into(),
        agent_url: "https://127.0.0.1:9".into(),
        agent_token: "agent-secret".into(),
        facts: facts(4, 8192),
        csr,
    }
}

async fn join_token(c: &RunningCenter, name: &str) -> JoinToken {
    admin(c)
        .post(
            &format!("/api/v1/hosts/{name}/join-token"),
            &AddHost { ttl_s: Some(600) },
        )
        .await
        .unwrap()
}

/// Joins host `name` as its agent does: trusting the CA by the fingerprint in the token,
/// sending a signing request for a new key. Returns the registration and the host's identity.
async fn join(c: &RunningCenter, name: &str) -> (Registered, Identity) {
    let jt = join_token(c, name).await;
    let fp: Fingerprint = tern_api::center::join_token_ca(&jt.token)
        .expect("the join token carries the CA fingerprint")
        .parse()
        .unwrap();
    assert_eq!(Some(fp.to_string()), jt.ca_fingerprint);
    let pinned = ServerTrust::Pinned {
        ca: fp,
        name: tern_pki::CENTER_NAME.into(),
    };
    let (key, csr) = tern_pki::new_host_key(name).unwrap();
    let reg: Registered = host_client(c, &jt.token, &pinned, None)
        .post("/api/v1/hosts/register", &register_req(name, Some(csr)))
        .await
        .unwrap();
    let chain = reg.certificate.clone().expect("a certificate for the host");
    assert_eq!(reg.ca, c.ca_pem);
    let id = Identity {
        chain_pem: chain,
        key_pem: key,
    };
    (reg, id)
}

async fn heartbeat(
    c: &RunningCenter,
    reg: &Registered,
    id: Option<&Identity>,
) -> Result<(), ApiError> {
    host_client(c, &reg.host_token, &ca_trust(c), id)
        .post::<_, ()>(
            &format!("/api/v1/hosts/{}/heartbeat", reg.host_id),
            &idle_heartbeat(),
        )
        .await
}

fn is_tls_failure(e: &ApiError) -> bool {
    matches!(e, ApiError::Transport { .. })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_join_with_certificates_and_every_call_for_them_needs_theirs() {
    let dir = tempfile::tempdir().unwrap();
    let c = tls_center(dir.path()).await;
    assert!(c.url().starts_with("https://"), "{}", c.url());
    create_cluster(&c, "lab").await;

    // Plain HTTP to the TLS port gets no answer.
    let plain = ApiClient::new(
        Endpoint::Tcp(c.url().replace("https://", "http://")),
        &c.admin_token,
    )
    .unwrap();
    let e = plain
        .get::<serde_json::Value>("/api/v1/hosts")
        .await
        .unwrap_err();
    assert!(is_tls_failure(&e), "{e}");

    // A client that trusts another CA, or a pin that is not this CA, refuses the center.
    let other = Ca::new("other").unwrap();
    let foreign = ServerTrust::Ca {
        ca_pem: other.cert_pem().into(),
        name: tern_pki::CENTER_NAME.into(),
    };
    let e = host_client(&c, &c.admin_token, &foreign, None)
        .get::<serde_json::Value>("/api/v1/hosts")
        .await
        .unwrap_err();
    assert!(is_tls_failure(&e), "{e}");
    let wrong_pin = ServerTrust::Pinned {
        ca: other.fingerprint(),
        name: tern_pki::CENTER_NAME.into(),
    };
    let e = host_client(&c, &c.admin_token, &wrong_pin, None)
        .get::<serde_json::Value>("/api/v1/hosts")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not the one pinned"), "{e}");

    // A join without a signing request is refused: the host would have no certificate.
    let jt = join_token(&c, "h0").await;
    let (code, msg) = status(
        host_client(&c, &jt.token, &ca_trust(&c), None)
            .post::<_, Registered>("/api/v1/hosts/register", &register_req("h0", None))
            .await,
    );
    assert_eq!(code, 400, "{msg}");
    assert!(msg.contains("csr"), "{msg}");

    let (r1, id1) = join(&c, "h1").await;
    let (r2, id2) = join(&c, "h2").await;
    let info1 = id1.info().unwrap();
    assert_eq!(info1.dns_names, vec!["h1.host.tern".to_string()]);

    // Heartbeats need the host's certificate, not only its secret.
    heartbeat(&c, &r1, Some(&id1)).await.unwrap();
    let (code, msg) = status(heartbeat(&c, &r1, None).await);
    assert_eq!(code, 401, "{msg}");
    assert!(msg.contains("client certificate"), "{msg}");
    // h2's (valid) certificate with h1's secret is refused: it names another host.
    let (code, msg) = status(heartbeat(&c, &r1, Some(&id2)).await);
    assert_eq!(code, 401, "{msg}");
    assert!(msg.contains("names host h2"), "{msg}");
    // A certificate for h1 from another CA fails the handshake.
    let forged = other
        .issue_identity(&["h1.host.tern".into()], Duration::from_secs(600))
        .unwrap();
    let e = heartbeat(&c, &r1, Some(&forged)).await.unwrap_err();
    assert!(is_tls_failure(&e), "{e}");
    heartbeat(&c, &r2, Some(&id2)).await.unwrap();

    // Registering again with the secret needs the certificate too.
    let again = |id: Option<&Identity>, csr: Option<String>| {
        let client = host_client(&c, &r1.host_token, &ca_trust(&c), id);
        async move {
            client
                .post::<_, Registered>("/api/v1/hosts/register", &register_req("h1", csr))
                .await
        }
    };
    let (code, msg) = status(again(None, None).await);
    assert_eq!(code, 401, "{msg}");
    let (code, msg) = status(again(Some(&id2), None).await);
    assert_eq!(code, 401, "{msg}");
    let same = again(Some(&id1), None).await.unwrap();
    assert_eq!(same.host_id, r1.host_id);
    assert!(same.certificate.is_none());

    // Renewal: a new key and certificate; the old one stops working at once.
    let (key, csr) = tern_pki::new_host_key("h1").unwrap();
    let renewed = again(Some(&id1), Some(csr)).await.unwrap();
    let id1b = Identity {
        chain_pem: renewed.certificate.clone().unwrap(),
        key_pem: key,
    };
    assert_ne!(id1b.info().unwrap().serial, info1.serial);
    heartbeat(&c, &r1, Some(&id1b)).await.unwrap();
    let (code, msg) = status(heartbeat(&c, &r1, Some(&id1)).await);
    assert_eq!(code, 401, "{msg}");
    assert!(msg.contains("not its current one"), "{msg}");

    // Removing h2 revokes its certificate (and secret).
    admin(&c).delete("/api/v1/hosts/h2").await.unwrap();
    let e = heartbeat(&c, &r2, Some(&id2)).await.unwrap_err();
    assert!(matches!(e.status(), Some(401 | 404)), "{e}");
    let (code, _) = status(
        host_client(&c, &r2.host_token, &ca_trust(&c), Some(&id2))
            .post::<_, Registered>("/api/v1/hosts/register", &register_req("h2", None))
            .await,
    );
    assert_eq!(code, 401);

    // The CA's key is the center's alone.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("center/pki/ca.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    c.shutdown().await.unwrap();
}

/// Serves a stand-in agent API with `identity`, accepting only the center's certificate.
async fn agent_server(ca_pem: &str, identity: &Identity) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", l.local_addr().unwrap());
    let cfg = server_config(
        LiveIdentity::new(identity).unwrap(),
        &ClientPolicy::Named {
            ca_pem: ca_pem.into(),
            name: tern_pki::CENTER_NAME.into(),
        },
    )
    .unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(Some(cfg));
    let router = axum::Router::new().route(
        "/v1/facts",
        axum::routing::get(|| async { axum::Json(facts(4, 8192)) }),
    );
    tokio::spawn(async move {
        let _keep = _tx;
        tern_serve::serve(
            l,
            router,
            &tern_serve::Limits::default(),
            Some(rx),
            std::future::pending(),
        )
        .await
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_center_calls_only_the_host_it_means_and_agents_take_only_the_center() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(&dir.path().join("pki"), "t").unwrap();
    let life = Duration::from_secs(600);
    let center = ca.issue_center(&[], life).unwrap();
    let h1 = ca.issue_identity(&["h1.host.tern".into()], life).unwrap();
    let h2 = ca.issue_identity(&["h2.host.tern".into()], life).unwrap();
    let h1_url = agent_server(ca.cert_pem(), &h1).await;

    let pool =
        tern_api::HttpPool::with_tls(ca.cert_pem(), LiveIdentity::new(&center).unwrap()).unwrap();
    // Calling h1 at h1's address works; calling "h2" at that address (a rogue or stale URL)
    // fails: the certificate there does not name h2.
    let ok = ApiClient::pooled(&pool, "h1", &h1_url, "t");
    ok.get::<serde_json::Value>("/v1/facts").await.unwrap();
    let wrong = ApiClient::pooled(&pool, "h2", &h1_url, "t");
    let e = wrong
        .get::<serde_json::Value>("/v1/facts")
        .await
        .unwrap_err();
    assert!(is_tls_failure(&e), "{e}");

    // An agent accepts only the center: a host's certificate (valid, same CA) is refused, and
    // so is a client without one.
    let as_host =
        tern_api::HttpPool::with_tls(ca.cert_pem(), LiveIdentity::new(&h2).unwrap()).unwrap();
    let e = ApiClient::pooled(&as_host, "h1", &h1_url, "t")
        .get::<serde_json::Value>("/v1/facts")
        .await
        .unwrap_err();
    assert!(is_tls_failure(&e), "{e}");
    let trust = ServerTrust::Ca {
        ca_pem: ca.cert_pem().into(),
        name: "h1.host.tern".into(),
    };
    let anonymous = ApiClient::with_tls(
        Endpoint::Tcp(h1_url.clone()),
        "t",
        T,
        client_config(&trust, None).unwrap(),
    )
    .unwrap();
    let e = anonymous
        .get::<serde_json::Value>("/v1/facts")
        .await
        .unwrap_err();
    assert!(is_tls_failure(&e), "{e}");
}
