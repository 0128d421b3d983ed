//! A real center against clients that do not play by the rules: connection floods, typos,
//! oversize bodies, numbers meant to overflow. Each finding of issue 11's attack on 9938c76
//! that these cover would have failed here. Loopback addresses only.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{admin, config, raw, status};
use tern_api::center::{Cluster, CreateCluster};
use tern_api::{ApiClient, Endpoint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

async fn connect_from(from: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::from((from, 0)))?;
    s.connect(to).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_does_not_stop_other_clients() {
    let dir = tempfile::tempdir().unwrap();
    let c = tern_center::serve(config(dir.path(), 5_000)).await.unwrap();
    let addr = c.tcp_addr;

    // 2,400 connections from 16 addresses, half of them with half a request header, plus
    // 600 from one more address (over its per-peer cap). Before the limits, about 1,100 idle
    // connections stopped the center answering on TCP and on its unix socket.
    let mut held = Vec::new();
    let mut refused = 0;
    for peer in 1..=16u8 {
        for i in 0..150 {
            let mut s = connect_from([127, 0, 2, peer], addr).await.unwrap();
            if i % 2 == 0 {
                s.write_all(b"GET /api/v1/clusters HTTP/1.1\r\nhost: x\r\n")
                    .await
                    .unwrap();
            }
            held.push(s);
        }
    }
    for _ in 0..600 {
        match connect_from([127, 0, 3, 1], addr).await {
            Ok(s) => held.push(s),
            Err(_) => refused += 1,
        }
    }
    eprintln!(
        "flood: {} connections held, {refused} refused at connect",
        held.len()
    );

    // Other clients are served at once, on TCP and on the unix socket.
    let tcp = admin(&c);
    let unix = ApiClient::new(Endpoint::Unix(c.socket_path.clone()), &c.admin_token).unwrap();
    for api in [&tcp, &unix] {
        let listed = tokio::time::timeout(
            Duration::from_secs(10),
            api.get::<Vec<Cluster>>("/api/v1/clusters"),
        )
        .await
        .expect("the center answers within 10 s during the flood");
        assert_eq!(listed.unwrap(), vec![]);
    }
    // The half-sent requests do not hold their sockets for ever: the header timer (10 s)
    // closes them, and the idle ones alike.
    let closed = tokio::time::timeout(Duration::from_secs(40), async {
        for s in &mut held {
            let mut buf = [0u8; 256];
            while !matches!(s.read(&mut buf).await, Ok(0) | Err(_)) {}
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "flood connections were still open after 40 s"
    );
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_misspelt_field_is_refused_by_name_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let c = tern_center::serve(config(dir.path(), 5_000)).await.unwrap();
    // `evcmode` for `evc_mode`: before, the field was ignored and a cluster without its
    // baseline was created.
    let r = raw()
        .post(format!("{}/api/v1/clusters", c.url()))
        .bearer_auth(&c.admin_token)
        .json(&serde_json::json!({ "name": "lab", "evcmode": "x86-64-v2" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body = r.text().await.unwrap();
    assert!(body.contains("evcmode"), "{body}");
    let clusters: Vec<Cluster> = admin(&c).get("/api/v1/clusters").await.unwrap();
    assert!(clusters.is_empty(), "a cluster was created: {clusters:?}");
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_oversize_body_is_refused_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let c = tern_center::serve(config(dir.path(), 5_000)).await.unwrap();
    let huge = CreateCluster {
        name: "lab".into(),
        evc_mode: Some("x".repeat(1 << 20)),
        migration_encryption: None,
    };
    let r = raw()
        .post(format!("{}/api/v1/clusters", c.url()))
        .bearer_auth(&c.admin_token)
        .json(&huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let clusters: Vec<Cluster> = admin(&c).get("/api/v1/clusters").await.unwrap();
    assert!(clusters.is_empty());
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn numbers_meant_to_overflow_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let c = tern_center::serve(config(dir.path(), 5_000)).await.unwrap();
    let api = admin(&c);
    // No VM is needed: the numbers are checked before anything is looked up.
    for (body, field) in [
        (
            serde_json::json!({ "to": "h2", "bandwidth_mbit": 200_000_000_000_000u64 }),
            "bandwidth_mbit",
        ),
        (
            serde_json::json!({ "to": "h2", "deadline_ms": u64::MAX }),
            "deadline_ms",
        ),
        (
            serde_json::json!({ "to": "h2", "downtime_ms": u64::MAX }),
            "downtime_ms",
        ),
    ] {
        let r: Result<serde_json::Value, _> = api.post("/api/v1/vms/web-1/migrate", &body).await;
        let (code, msg) = status(r);
        assert_eq!(code, 400, "{field}: {msg}");
        assert!(msg.contains(field), "{msg}");
    }
    let tasks: Vec<serde_json::Value> = api.get("/api/v1/tasks").await.unwrap();
    assert!(tasks.is_empty(), "a task was queued: {tasks:?}");
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_misspelt_query_parameter_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let c = tern_center::serve(config(dir.path(), 5_000)).await.unwrap();
    // `lmit` for `limit`: before, it was ignored and the default number of events came back.
    let r: Result<serde_json::Value, _> = admin(&c).get("/api/v1/events?lmit=5").await;
    let (code, msg) = status(r);
    assert_eq!(code, 400, "{msg}");
    assert!(msg.contains("lmit"), "{msg}");
    let ok: Vec<serde_json::Value> = admin(&c).get("/api/v1/events?limit=5").await.unwrap();
    assert!(ok.len() <= 5);
    c.shutdown().await.unwrap();
}
