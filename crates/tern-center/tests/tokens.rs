//! Named tokens and roles against a real center: what each role may do, revocation, the
//! event log naming who did what, and secrets kept only as hashes.

mod common;

use common::{admin, config, status};
use tern_api::center::{ApiToken, CreateCluster, CreateToken, CreatedToken, Event, Role};
use tern_api::{ApiClient, CenterClient, Endpoint};

fn client(c: &tern_center::RunningCenter, token: &str) -> CenterClient {
    CenterClient::new(ApiClient::new(Endpoint::Tcp(c.url()), token).unwrap())
}

async fn create(api: &ApiClient, name: &str, role: Role) -> CreatedToken {
    api.post(
        "/api/v1/tokens",
        &CreateToken {
            name: name.into(),
            role,
        },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn each_role_may_do_what_it_is_given_and_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    let c = tern_center::serve(config(dir.path(), 5_000)).await.unwrap();
    let root = admin(&c);
    let viewer = create(&root, "vera", Role::Viewer).await;
    let operator = create(&root, "otto", Role::Operator).await;
    let boss = create(&root, "ada", Role::Admin).await;
    assert_ne!(viewer.token, operator.token);
    let (v, o, a) = (
        client(&c, &viewer.token),
        client(&c, &operator.token),
        client(&c, &boss.token),
    );

    // An admin token made through the API may create clusters; the others may not.
    a.create_cluster(&CreateCluster {
        name: "lab".into(),
        evc_mode: None,
        migration_encryption: None,
    })
    .await
    .unwrap();
    for who in [&v, &o] {
        let (code, msg) = status(
            who.create_cluster(&CreateCluster {
                name: "lab2".into(),
                evc_mode: None,
                migration_encryption: None,
            })
            .await,
        );
        assert_eq!(code, 403, "{msg}");
        assert!(msg.contains("needs admin"), "{msg}");
    }
    // A viewer reads, and cannot create, start, stop, migrate or delete a VM.
    assert_eq!(v.clusters().await.unwrap().len(), 1);
    assert!(v.vms().await.unwrap().is_empty());
    let spec = serde_json::json!({
        "cluster": "lab",
        "spec": {
            "name": "web-1", "vcpus": 1, "memory_mib": 64,
            "boot": { "kind": "kernel", "kernel": "/shared/k", "initrd": null }
        }
    });
    let raw_v = ApiClient::new(Endpoint::Tcp(c.url()), &viewer.token).unwrap();
    let attempts: [(&str, &str); 5] = [
        ("post", "/api/v1/vms"),
        ("post", "/api/v1/vms/web-1/start"),
        ("post", "/api/v1/vms/web-1/stop"),
        ("post", "/api/v1/vms/web-1/migrate"),
        ("delete", "/api/v1/vms/web-1"),
    ];
    for (method, path) in attempts {
        let r: Result<serde_json::Value, _> = match method {
            "post" => raw_v.post(path, &spec).await,
            _ => raw_v.delete(path).await.map(|()| serde_json::Value::Null),
        };
        let (code, msg) = status(r);
        assert_eq!(code, 403, "{method} {path}: {msg}");
        assert!(msg.contains("needs operator"), "{msg}");
    }
    // An operator gets past the role check (the call then fails on its merits: no host).
    let raw_o = ApiClient::new(Endpoint::Tcp(c.url()), &operator.token).unwrap();
    let r: Result<serde_json::Value, _> = raw_o.post("/api/v1/vms", &spec).await;
    let (code, msg) = status(r);
    assert_ne!(code, 403, "{msg}");
    assert_ne!(code, 401, "{msg}");
    // Only an admin manages tokens.
    for who in [&v, &o] {
        assert_eq!(status(who.tokens().await).0, 403);
        let (code, _) = status(
            who.create_token(&CreateToken {
                name: "sneaky".into(),
                role: Role::Admin,
            })
            .await,
        );
        assert_eq!(code, 403);
    }
    let names: Vec<String> = a
        .tokens()
        .await
        .unwrap()
        .into_iter()
        .map(|t: ApiToken| t.name)
        .collect();
    assert_eq!(names, ["ada", "otto", "vera"]);

    // The event log names who asked for each change, refused ones included.
    let events: Vec<Event> = root.get("/api/v1/events?limit=500").await.unwrap();
    let by = |who: &str, needle: &str| {
        events
            .iter()
            .any(|e| e.actor.as_deref() == Some(who) && e.message.contains(needle))
    };
    assert!(by("ada", "POST /api/v1/clusters → 201"), "{events:#?}");
    assert!(
        by("vera", "POST /api/v1/vms/web-1/migrate → 403"),
        "{events:#?}"
    );
    assert!(by("otto", "POST /api/v1/vms →"), "{events:#?}");
    assert!(
        by("admin", "token vera (viewer) created by admin"),
        "{events:#?}"
    );
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_revoked_token_fails_at_once_and_secrets_are_stored_hashed() {
    let dir = tempfile::tempdir().unwrap();
    let c = tern_center::serve(config(dir.path(), 5_000)).await.unwrap();
    let root = admin(&c);
    let t = create(&root, "ci-bot", Role::Operator).await;
    let bot = client(&c, &t.token);
    assert!(bot.vms().await.unwrap().is_empty());

    // A second token of the same name is refused; the name `admin` is the token file's.
    for (name, want) in [("ci-bot", 409), ("admin", 400)] {
        let (code, msg) = status(
            client(&c, &c.admin_token)
                .create_token(&CreateToken {
                    name: name.into(),
                    role: Role::Viewer,
                })
                .await,
        );
        assert_eq!(code, want, "{name}: {msg}");
    }

    // Nothing the center keeps holds the secret itself.
    for f in std::fs::read_dir(&c.config.data_dir).unwrap() {
        let p = f.unwrap().path();
        if p.is_file() {
            let bytes = std::fs::read(&p).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                !text.contains(&t.token),
                "{} holds the token in clear",
                p.display()
            );
        }
    }

    client(&c, &c.admin_token)
        .revoke_token("ci-bot")
        .await
        .unwrap();
    let (code, msg) = status(bot.vms().await);
    assert_eq!(code, 401, "{msg}");
    assert!(msg.contains("revoked"), "{msg}");
    let (code, _) = status(client(&c, &c.admin_token).revoke_token("ci-bot").await);
    assert_eq!(code, 404);
    c.shutdown().await.unwrap();
}
