//! Host identity against a real center: one-time join tokens bound to a name and an expiry,
//! no takeover of a registered name, host removal revoking the host's secret. Before (at
//! 9938c76), any holder of the shared enrolment token could re-register `h1` with its own
//! agent URL and receive h1's calls.

mod common;

use common::{admin, config, create_cluster, facts, idle_heartbeat, status, wait_for};
use tern_api::center::{AddHost, Host, JoinToken, RegisterHost, Registered};
use tern_api::{ApiClient, Endpoint};

fn client(c: &tern_center::RunningCenter, token: &str) -> ApiClient {
    ApiClient::new(Endpoint::Tcp(c.url()), token).unwrap()
}

fn register_req(name: &str, agent_url: &str) -> RegisterHost {
    RegisterHost {
        name: name.into(),
        cluster: "lab".into(),
        agent_url: agent_url.into(),
        agent_token: "agent-secret".into(),
        facts: facts(4, 8192),
        csr: None,
    }
}

async fn register(
    c: &tern_center::RunningCenter,
    token: &str,
    name: &str,
    agent_url: &str,
) -> Result<Registered, tern_api::ApiError> {
    client(c, token)
        .post("/api/v1/hosts/register", &register_req(name, agent_url))
        .await
}

async fn join_token(c: &tern_center::RunningCenter, name: &str, ttl_s: u64) -> JoinToken {
    admin(c)
        .post(
            &format!("/api/v1/hosts/{name}/join-token"),
            &AddHost { ttl_s: Some(ttl_s) },
        )
        .await
        .unwrap()
}

async fn heartbeat(
    c: &tern_center::RunningCenter,
    reg: &Registered,
) -> Result<(), tern_api::ApiError> {
    client(c, &reg.host_token)
        .post::<_, ()>(
            &format!("/api/v1/hosts/{}/heartbeat", reg.host_id),
            &idle_heartbeat(),
        )
        .await
}

const H1_URL: &str = "http://127.0.0.1:9";
const ROGUE_URL: &str = "http://127.0.0.1:666";

#[tokio::test]
async fn a_registered_name_cannot_be_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let c = tern_center::serve(config(dir.path(), 60_000))
        .await
        .unwrap();
    create_cluster(&c, "lab").await;

    // h1 joins with its one-time token; the token is then used up.
    let t1 = join_token(&c, "h1", 3600).await;
    let h1 = register(&c, &t1.token, "h1", H1_URL).await.unwrap();
    let (code, msg) = status(register(&c, &t1.token, "h1", ROGUE_URL).await);
    assert_eq!(code, 401, "a used join token worked again: {msg}");

    // A valid join token for another name does not register h1.
    let t2 = join_token(&c, "h2", 3600).await;
    let (code, msg) = status(register(&c, &t2.token, "h1", ROGUE_URL).await);
    assert_eq!(code, 401, "{msg}");
    assert!(msg.contains("for host h2"), "{msg}");
    // Nor does the shared enrolment token, nor no token, nor an admin or another host's.
    let (code, msg) = status(register(&c, &c.enrol_token, "h1", ROGUE_URL).await);
    assert_eq!(code, 401, "{msg}");
    assert!(msg.contains("registered already"), "{msg}");
    for token in ["", "guess", c.admin_token.as_str()] {
        assert_eq!(status(register(&c, token, "h1", ROGUE_URL).await).0, 401);
    }
    let h2 = register(&c, &t2.token, "h2", "http://127.0.0.1:10")
        .await
        .unwrap();
    assert_eq!(
        status(register(&c, &h2.host_token, "h1", ROGUE_URL).await).0,
        401
    );

    // An expired token is refused (one second of life, waited out on the clock).
    let t3 = join_token(&c, "h3", 1).await;
    wait_for("the join token to expire", 10, || async {
        (chrono::Utc::now() > t3.expires_at).then_some(())
    })
    .await;
    let (code, msg) = status(register(&c, &t3.token, "h3", "http://127.0.0.1:11").await);
    assert_eq!(code, 401, "{msg}");
    assert!(msg.contains("expired"), "{msg}");

    // h1 is untouched: the center still calls its agent, and its secret still works.
    let host: Host = admin(&c).get("/api/v1/hosts/h1").await.unwrap();
    assert_eq!(host.agent_url, H1_URL);
    heartbeat(&c, &h1).await.unwrap();
    let again = register(&c, &h1.host_token, "h1", H1_URL).await.unwrap();
    assert_eq!(again.host_id, h1.host_id);
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_removed_host_loses_its_secret() {
    let dir = tempfile::tempdir().unwrap();
    let c = tern_center::serve(config(dir.path(), 60_000))
        .await
        .unwrap();
    create_cluster(&c, "lab").await;
    let t = join_token(&c, "h1", 3600).await;
    let h1 = register(&c, &t.token, "h1", H1_URL).await.unwrap();
    heartbeat(&c, &h1).await.unwrap();
    // Only an admin removes hosts, not an operator.
    let operator: tern_api::center::CreatedToken = admin(&c)
        .post(
            "/api/v1/tokens",
            &tern_api::center::CreateToken {
                name: "otto".into(),
                role: tern_api::center::Role::Operator,
            },
        )
        .await
        .unwrap();
    let r: Result<(), _> = client(&c, &operator.token).delete("/api/v1/hosts/h1").await;
    assert_eq!(status(r).0, 403);
    admin(&c).delete("/api/v1/hosts/h1").await.unwrap();
    let r: Result<Host, _> = admin(&c).get("/api/v1/hosts/h1").await;
    assert_eq!(status(r).0, 404);
    // Its secret neither heartbeats nor registers again.
    assert!(heartbeat(&c, &h1).await.is_err());
    let (code, _) = status(register(&c, &h1.host_token, "h1", H1_URL).await);
    assert_eq!(code, 401);
    let r: Result<(), _> = admin(&c).delete("/api/v1/hosts/h1").await;
    assert_eq!(status(r).0, 404);
    // A new join token brings it back.
    let t = join_token(&c, "h1", 3600).await;
    let back = register(&c, &t.token, "h1", H1_URL).await.unwrap();
    assert_ne!(back.host_id, h1.host_id);
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_shared_enrolment_token_joins_nothing_unless_enabled() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 60_000);
    cfg.shared_enrolment = false; // the default
    let c = tern_center::serve(cfg).await.unwrap();
    create_cluster(&c, "lab").await;
    let (code, msg) = status(register(&c, &c.enrol_token, "h9", H1_URL).await);
    assert_eq!(code, 401, "{msg}");
    assert!(msg.contains("tern host add h9"), "{msg}");
    let hosts: Vec<Host> = admin(&c).get("/api/v1/hosts").await.unwrap();
    assert!(hosts.is_empty());
    c.shutdown().await.unwrap();
}
