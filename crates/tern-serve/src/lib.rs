//! How every tern daemon serves its HTTP API on a network it does not trust.
//!
//! `axum::serve` keeps a connection as long as the peer likes: a client that sends half a
//! header, or opens a keep-alive connection and says nothing, holds a socket for ever, and a
//! thousand of them exhaust the daemon's descriptors (then it cannot even accept on its unix
//! socket). This module owns the accept loop instead:
//!
//! - a cap on connections per listener, and on TCP a cap per peer address, so one client cannot
//!   take every slot; a connection over a cap gets `503` and is closed at once;
//! - hyper's header timer: a request's headers must arrive within [`Limits::header_timeout`],
//!   and an idle keep-alive connection is closed after the same time;
//! - a body timeout and a body size limit on every route;
//! - accept errors (descriptor exhaustion included) back off instead of spinning;
//! - graceful shutdown: open requests get [`Limits::shutdown_grace`], then are cut.
//!
//! - TLS on TCP listeners, under the same limits: the handshake must end within the header
//!   timeout, and the client's certificate (when it gave one) reaches the handlers as a
//!   [`PeerCertificate`] request extension. The settings come from a watch channel, so a
//!   renewed certificate (or an agent's first one) takes effect without a restart.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::ServerConfig;
use tower::ServiceExt;
use tower_http::timeout::RequestBodyTimeoutLayer;

/// Where a TCP listener gets its TLS settings: `None` while it has none yet (an agent before
/// it joined). A connection then waits for them within the handshake's time, so a client that
/// learnt of the listener from its owner's enrolment (whose answer the owner may not have read
/// yet) is served, not cut.
pub type TlsSource = tokio::sync::watch::Receiver<Option<Arc<ServerConfig>>>;

/// The leaf certificate a TLS client presented, verified by the listener's settings; handlers
/// read it as a request extension.
#[derive(Debug, Clone)]
pub struct PeerCertificate(pub Arc<CertificateDer<'static>>);

/// What one listener allows its clients.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections open at once on the listener; one more is answered `503` and closed.
    pub max_connections: usize,
    /// Connections open at once from one IP address (TCP listeners only).
    pub max_connections_per_peer: usize,
    /// A request's headers must arrive within this; an idle keep-alive connection is closed
    /// after it.
    pub header_timeout: Duration,
    /// A request's body must arrive within this.
    pub body_timeout: Duration,
    /// Largest request body, in bytes (routes may set less).
    pub max_body_bytes: usize,
    /// After shutdown is asked, how long open requests may run before they are cut.
    pub shutdown_grace: Duration,
}

/// Descriptors a daemon keeps for its own files, outside every listener's connection cap.
const OWN_FILES: u64 = 512;

impl Limits {
    /// The defaults, with the connection cap lowered so that `listeners` listeners, each at
    /// its cap, stay under `open_files` (the process's limit) with room for the daemon's own
    /// files: a flood then meets the cap, never descriptor exhaustion.
    pub fn within_open_files(open_files: u64, listeners: u64) -> Limits {
        let d = Limits::default();
        let budget = open_files.saturating_sub(OWN_FILES) / listeners.max(1);
        let max_connections = (d.max_connections as u64).min(budget).max(16) as usize;
        Limits {
            max_connections,
            max_connections_per_peer: d.max_connections_per_peer.min(max_connections),
            ..d
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            max_connections_per_peer: 256,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_body_bytes: 256 * 1024,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// A bound listener to serve on.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Listener::Tcp(l)
    }
}

impl From<UnixListener> for Listener {
    fn from(l: UnixListener) -> Self {
        Listener::Unix(l)
    }
}

/// The answer to a connection over a cap, so a refused client learns why.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-type: \
text/plain\r\ncontent-length: 41\r\n\r\ntoo many connections; try again shortly\r\n";

/// Refused connections answered at once, and how long each may take.
const MAX_LINGERING_REFUSALS: usize = 64;
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// How long the loop pauses after an accept error such as descriptor exhaustion.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Largest header block hyper buffers for one request.
const MAX_HEADER_BUFFER: usize = 64 * 1024;

/// Serves `router` on `listener` under `limits` until `shutdown` resolves, then lets open
/// requests finish for the grace time and cuts the rest. With `tls`, a TCP listener speaks
/// only TLS (a unix socket stays plain: its file mode guards it).
pub async fn serve(
    listener: impl Into<Listener>,
    router: Router,
    limits: &Limits,
    tls: Option<TlsSource>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let listener = listener.into();
    let router = router
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(RequestBodyTimeoutLayer::new(limits.body_timeout));
    let mut http = hyper::server::conn::http1::Builder::new();
    // Without a timer hyper silently disables the header timeout.
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEADER_BUFFER);
    let server = Server {
        http,
        router,
        graceful: GracefulShutdown::new(),
        open: Arc::new(Semaphore::new(limits.max_connections)),
        peers: Arc::new(Mutex::new(HashMap::new())),
        per_peer: limits.max_connections_per_peer,
        conns: JoinSet::new(),
        refusing: Arc::new(Semaphore::new(MAX_LINGERING_REFUSALS)),
        refused: 0,
        tls,
        handshake_timeout: limits.header_timeout,
    };
    server.run(listener, shutdown, limits.shutdown_grace).await;
}

struct Server {
    http: hyper::server::conn::http1::Builder,
    router: Router,
    graceful: GracefulShutdown,
    open: Arc<Semaphore>,
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    per_peer: usize,
    conns: JoinSet<()>,
    refusing: Arc<Semaphore>,
    refused: u64,
    tls: Option<TlsSource>,
    handshake_timeout: Duration,
}

impl Server {
    async fn run(
        mut self,
        listener: Listener,
        shutdown: impl Future<Output = ()> + Send,
        grace: Duration,
    ) {
        tokio::pin!(shutdown);
        loop {
            while self.conns.try_join_next().is_some() {}
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                accepted = accept(&listener) => match accepted {
                    Ok(Accepted::Tcp(stream, peer)) => {
                        if let Some(slots) = self.slots(Some(peer)) {
                            let _ = stream.set_nodelay(true);
                            match self.tls.clone() {
                                None => self.spawn(stream, slots),
                                Some(tls) => self.spawn_tls(stream, slots, tls),
                            }
                        } else {
                            self.refuse(stream, Some(peer));
                        }
                    }
                    Ok(Accepted::Unix(stream)) => {
                        if let Some(slots) = self.slots(None) {
                            self.spawn(stream, slots);
                        } else {
                            self.refuse(stream, None);
                        }
                    }
                    Err(e) => accept_failed(e).await,
                },
            }
        }
        drop(listener);
        if self.refused > 0 {
            tracing::info!(refused = self.refused, "connections refused over the caps");
        }
        let graceful = self.graceful;
        tokio::select! {
            () = graceful.shutdown() => {}
            () = tokio::time::sleep(grace) => {
                tracing::warn!("closing connections still open after the grace time");
            }
        }
        self.conns.abort_all();
        while self.conns.join_next().await.is_some() {}
    }

    /// Takes a connection slot, and the peer's slot for TCP; `None` when a cap is reached.
    fn slots(&self, peer: Option<IpAddr>) -> Option<Slots> {
        let permit = self.open.clone().try_acquire_owned().ok()?;
        let peer = match peer {
            Some(ip) => Some(PeerSlot::take(&self.peers, ip, self.per_peer)?),
            None => None,
        };
        Some(Slots {
            _permit: permit,
            _peer: peer,
        })
    }

    /// Answers `503` and closes. Closing with the client's request unread would reset the
    /// connection and could discard the answer, so a few refusals at a time linger to read
    /// what the client sent (briefly); past that, connections are dropped outright.
    fn refuse<I>(&mut self, mut io: I, peer: Option<IpAddr>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        if let Ok(permit) = self.refusing.clone().try_acquire_owned() {
            self.conns.spawn(async move {
                let _ = tokio::time::timeout(REFUSAL_LINGER, async {
                    io.write_all(BUSY).await?;
                    io.shutdown().await?;
                    let mut sink = [0u8; 1024];
                    while io.read(&mut sink).await? > 0 {}
                    io::Result::Ok(())
                })
                .await;
                drop(permit);
            });
        }
        self.refused += 1;
        // One line per power of two keeps a flood from flooding the log too.
        if self.refused.is_power_of_two() {
            tracing::warn!(
                peer = ?peer,
                refused = self.refused,
                "connection refused: too many open (per listener or per peer)"
            );
        }
    }

    fn spawn<I>(&mut self, io: I, slots: Slots)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let conn = self.http.serve_connection(
            TokioIo::new(io),
            TowerToHyperService::new(self.router.clone()),
        );
        let conn = self.graceful.watch(conn);
        self.conns.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection ended: {e}");
            }
            drop(slots);
        });
    }
}

impl Server {
    /// Completes the TLS handshake (within the header timeout, waiting for the listener's
    /// first settings if it has none yet) in the connection's own task, then serves it with
    /// the client's certificate attached to every request.
    fn spawn_tls(&mut self, stream: tokio::net::TcpStream, slots: Slots, mut tls: TlsSource) {
        let (http, router) = (self.http.clone(), self.router.clone());
        let watcher = self.graceful.watcher();
        let timeout = self.handshake_timeout;
        self.conns.spawn(async move {
            let handshake = async {
                let cfg = match tls.wait_for(Option::is_some).await {
                    Ok(cfg) => cfg.clone(),
                    Err(_) => None,
                };
                let Some(cfg) = cfg else {
                    return Err(io::Error::other("the listener's TLS settings are gone"));
                };
                tokio_rustls::TlsAcceptor::from(cfg).accept(stream).await
            };
            let tls = match tokio::time::timeout(timeout, handshake).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!("TLS handshake refused: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(
                        "TLS handshake not done within {timeout:?} (or no certificate yet): closing"
                    );
                    return;
                }
            };
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|c| PeerCertificate(Arc::new(c.clone().into_owned())));
            let svc = router.map_request(move |mut req: Request<hyper::body::Incoming>| {
                if let Some(p) = &peer {
                    req.extensions_mut().insert(p.clone());
                }
                req
            });
            let conn = http.serve_connection(TokioIo::new(tls), TowerToHyperService::new(svc));
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!("connection ended: {e}");
            }
            drop(slots);
        });
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream, IpAddr),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> io::Result<Accepted> {
    match listener {
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            Ok(Accepted::Tcp(s, peer.ip()))
        }
        Listener::Unix(l) => Ok(Accepted::Unix(l.accept().await?.0)),
    }
}

async fn accept_failed(e: io::Error) {
    // EMFILE/ENFILE leave the connection in the backlog: accepting again at once would spin.
    match e.raw_os_error() {
        Some(libc_errno)
            if libc_errno == nix::errno::Errno::EMFILE as i32
                || libc_errno == nix::errno::Errno::ENFILE as i32 =>
        {
            tracing::warn!("accept: out of file descriptors ({e}); pausing");
        }
        _ => tracing::debug!("accept: {e}"),
    }
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// A connection's share of the caps, given back when the connection ends.
struct Slots {
    _permit: OwnedSemaphorePermit,
    _peer: Option<PeerSlot>,
}

struct PeerSlot {
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl PeerSlot {
    fn take(peers: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr, cap: usize) -> Option<Self> {
        let mut map = peers.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peers: peers.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut map = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Raises this process's soft limit on open files to its hard limit, so the connection caps
/// (not the descriptor limit) are what a flood meets. Returns the limit now in force.
pub fn raise_open_files_limit() -> io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
    }
    Ok(hard.max(soft))
}
