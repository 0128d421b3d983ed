//! The limits hold against real sockets: floods from one peer, idle and slow-header
//! connections, a full listener, oversize bodies. Loopback only (127.0.0.0/8).

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use tern_serve::{serve, Limits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;

fn router() -> Router {
    Router::new()
        .route("/hello", get(|| async { "hello" }))
        .route(
            "/echo",
            post(|body: String| async move { body.len().to_string() }),
        )
}

fn limits() -> Limits {
    Limits {
        max_connections: 40,
        max_connections_per_peer: 10,
        header_timeout: Duration::from_millis(700),
        body_timeout: Duration::from_secs(2),
        max_body_bytes: 1024,
        shutdown_grace: Duration::from_millis(500),
    }
}

struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

async fn start(limits: Limits) -> Running {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    let done = tokio::spawn(async move {
        serve(l, router(), &limits, None, async {
            let _ = rx.await;
        })
        .await
    });
    Running {
        addr,
        stop: Some(tx),
        done,
    }
}

/// A connection from `from` (any 127.x.y.z address) to `to`.
async fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::from((from, 0))).unwrap();
    s.connect(to).await.unwrap()
}

/// Sends one GET on a fresh connection from `from`; the whole answer.
async fn get_from(from: [u8; 4], to: SocketAddr, path: &str) -> String {
    let mut c = connect_from(from, to).await;
    c.write_all(format!("GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_string(&mut out))
        .await
        .expect("the server answers within 10 s")
        .unwrap();
    out
}

/// Reads until the server closes the connection (EOF or reset); what it sent first.
async fn until_closed(c: &mut TcpStream, within: Duration) -> String {
    let mut out = Vec::new();
    let r = tokio::time::timeout(within, async {
        let mut buf = [0u8; 512];
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        r.is_ok(),
        "the server did not close the connection within {within:?}"
    );
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_flood_from_one_peer_does_not_stop_another_peer() {
    let srv = start(limits()).await;
    // Ten slow-header and twenty more idle connections from 127.0.0.2: the per-peer cap (10)
    // lets the first ten in and answers the rest 503 at once.
    let mut held = Vec::new();
    for _ in 0..10 {
        let mut c = connect_from([127, 0, 0, 2], srv.addr).await;
        c.write_all(b"GET /hello HTTP/1.1\r\nhost: t\r\n")
            .await
            .unwrap();
        held.push(c);
    }
    let mut refused = 0;
    for _ in 0..20 {
        let mut c = connect_from([127, 0, 0, 2], srv.addr).await;
        let said = until_closed(&mut c, Duration::from_secs(5)).await;
        assert!(said.starts_with("HTTP/1.1 503"), "over the cap: {said:?}");
        refused += 1;
    }
    assert_eq!(refused, 20);
    // Another peer is served while the flood holds its slots.
    let ok = get_from([127, 0, 0, 1], srv.addr, "/hello").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.ends_with("hello"), "{ok}");
    // The slow-header connections are closed by the header timeout, with no answer.
    for c in &mut held {
        let said = until_closed(c, Duration::from_secs(5)).await;
        assert!(
            !said.contains("200 OK"),
            "a half-sent request was answered: {said}"
        );
    }
    // Their slots are free again: the flooding peer itself is served now.
    let ok = get_from([127, 0, 0, 2], srv.addr, "/hello").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    stop(srv).await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let srv = start(limits()).await;
    let mut c = connect_from([127, 0, 0, 3], srv.addr).await;
    c.write_all(b"GET /hello HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    // The answer arrives, then the connection stays open (keep-alive) until the idle timer.
    let said = until_closed(&mut c, Duration::from_secs(5)).await;
    assert!(said.starts_with("HTTP/1.1 200"), "{said}");
    assert!(said.ends_with("hello"), "{said}");
    stop(srv).await;
}

#[tokio::test]
async fn a_full_listener_refuses_and_recovers() {
    let srv = start(limits()).await;
    // 40 connections from four peers fill the listener (10 each, the per-peer cap).
    let mut held = Vec::new();
    for peer in 10..14u8 {
        for _ in 0..10 {
            held.push(connect_from([127, 0, 1, peer], srv.addr).await);
        }
    }
    // Wait until the server has taken all forty: a forty-first is answered 503.
    let said = get_from([127, 0, 0, 1], srv.addr, "/hello").await;
    assert!(said.starts_with("HTTP/1.1 503"), "{said}");
    assert!(said.contains("too many connections"), "{said}");
    // The idle ones time out, and the listener serves again.
    for c in &mut held {
        until_closed(c, Duration::from_secs(5)).await;
    }
    let ok = get_from([127, 0, 0, 1], srv.addr, "/hello").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    stop(srv).await;
}

#[tokio::test]
async fn an_oversize_body_is_refused() {
    let srv = start(limits()).await;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tern_pki::tls::refusing_client_config())
        .build()
        .unwrap();
    let url = format!("http://{}/echo", srv.addr);
    let ok = client
        .post(&url)
        .body("x".repeat(1000))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.text().await.unwrap(), "1000");
    let big = client
        .post(&url)
        .body("x".repeat(5000))
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413);
    stop(srv).await;
}

#[tokio::test]
async fn a_body_that_never_arrives_times_out() {
    let srv = start(limits()).await;
    let mut c = connect_from([127, 0, 0, 4], srv.addr).await;
    c.write_all(b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 100\r\n\r\nabc")
        .await
        .unwrap();
    let said = until_closed(&mut c, Duration::from_secs(10)).await;
    assert!(
        !said.starts_with("HTTP/1.1 200"),
        "a body never sent was accepted: {said}"
    );
    stop(srv).await;
}

#[tokio::test]
async fn shutdown_cuts_connections_after_the_grace_time() {
    let srv = start(limits()).await;
    let mut held = connect_from([127, 0, 0, 5], srv.addr).await;
    held.write_all(b"GET /hello HTTP/1.1\r\nhost: t\r\n")
        .await
        .unwrap();
    let addr = srv.addr;
    stop(srv).await;
    until_closed(&mut held, Duration::from_secs(5)).await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still listening after shutdown"
    );
}

async fn stop(mut srv: Running) {
    let _ = srv.stop.take().map(|tx| tx.send(()));
    tokio::time::timeout(Duration::from_secs(10), srv.done)
        .await
        .expect("serve returns within the grace time")
        .unwrap();
}

type TlsSettings = Option<std::sync::Arc<tokio_rustls::rustls::ServerConfig>>;

/// A TLS listener with settings `cfg` (`None`: none yet), and the sender that changes them.
async fn start_tls(
    limits: Limits,
    cfg: TlsSettings,
) -> (Running, tokio::sync::watch::Sender<TlsSettings>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    let (cfg_tx, cfg_rx) = tokio::sync::watch::channel(cfg);
    let router = router().route(
        "/whoami",
        get(
            |peer: Option<axum::Extension<tern_serve::PeerCertificate>>| async move {
                match peer {
                    Some(p) => tern_pki::inspect(p.0 .0.as_ref())
                        .unwrap()
                        .dns_names
                        .join(","),
                    None => "anonymous".to_string(),
                }
            },
        ),
    );
    let done = tokio::spawn(async move {
        serve(l, router, &limits, Some(cfg_rx), async {
            let _ = rx.await;
        })
        .await
    });
    let running = Running {
        addr,
        stop: Some(tx),
        done,
    };
    (running, cfg_tx)
}

#[tokio::test]
async fn tls_handshakes_are_bounded_and_client_certificates_reach_handlers() {
    let ca = tern_pki::Ca::new("t").unwrap();
    let life = Duration::from_secs(600);
    let server_id = ca.issue_center(&[], life).unwrap();
    let cfg = tern_pki::tls::server_config(
        tern_pki::LiveIdentity::new(&server_id).unwrap(),
        &tern_pki::tls::ClientPolicy::OptionalFromCa {
            ca_pem: ca.cert_pem().into(),
        },
    )
    .unwrap();
    let (srv, _settings) = start_tls(limits(), Some(cfg.clone())).await;

    // A client that connects and never starts its handshake is closed by the header timer.
    let mut silent = connect_from([127, 0, 0, 20], srv.addr).await;
    until_closed(&mut silent, Duration::from_secs(5)).await;
    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut plain = connect_from([127, 0, 0, 21], srv.addr).await;
    plain
        .write_all(b"GET /hello HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let said = until_closed(&mut plain, Duration::from_secs(5)).await;
    assert!(!said.contains("hello"), "{said}");

    // A TLS client is served; its certificate, when it shows one, reaches the handler.
    let trust = tern_pki::tls::ServerTrust::Ca {
        ca_pem: ca.cert_pem().into(),
        name: tern_pki::CENTER_NAME.into(),
    };
    let call = |addr: SocketAddr, id: Option<tern_pki::Identity>| {
        let cfg = tern_pki::tls::client_config(
            &trust,
            id.map(|i| tern_pki::LiveIdentity::new(&i).unwrap()),
        )
        .unwrap();
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(cfg)
            .build()
            .unwrap();
        let url = format!("https://{addr}/whoami");
        async move { client.get(url).send().await.unwrap().text().await.unwrap() }
    };
    assert_eq!(call(srv.addr, None).await, "anonymous");
    let host = ca.issue_identity(&["h1.host.tern".into()], life).unwrap();
    assert_eq!(call(srv.addr, Some(host)).await, "h1.host.tern");
    stop(srv).await;

    // Without settings yet (an agent before it joined), a connection waits for them within
    // the handshake's time: closed when none come...
    let (srv, _settings) = start_tls(limits(), None).await;
    let mut c = connect_from([127, 0, 0, 22], srv.addr).await;
    until_closed(&mut c, Duration::from_secs(5)).await;
    stop(srv).await;
    let patient = Limits {
        header_timeout: Duration::from_secs(60),
        ..limits()
    };
    let (srv, settings) = start_tls(patient, None).await;
    // ... and served when they do (an agent reading the answer to its enrolment while the
    // center already calls it). The listener holds a peer's ten connections (its cap) while
    // it waits: the eleventh is refused.
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        tern_pki::tls::client_config(&trust, None).unwrap(),
    ));
    let mut waiting = Vec::new();
    for _ in 0..limits().max_connections_per_peer {
        let stream = connect_from([127, 0, 0, 23], srv.addr).await;
        let (connector, name) = (connector.clone(), tern_pki::CENTER_NAME.try_into().unwrap());
        waiting.push(tokio::spawn(async move {
            connector.connect(name, stream).await.map(|_| ())
        }));
    }
    let mut over = connect_from([127, 0, 0, 23], srv.addr).await;
    let said = until_closed(&mut over, Duration::from_secs(5)).await;
    assert!(said.contains("503"), "{said}");
    settings.send_replace(Some(cfg));
    for w in waiting {
        w.await.unwrap().expect("handshake once the settings came");
    }
    stop(srv).await;
}
