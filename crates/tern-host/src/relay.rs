//! The carrier of encrypted migration streams between two hosts (`tern host relay`).
//!
//! QEMU's own TLS costs more than the copy: it writes one TLS record, and one system call, per
//! guest page. Measured on the lab machine with a 1 GiB guest holding 512 MiB of data, on
//! loopback: 0.3 s in clear, 1.9–2.3 s through QEMU's TLS (one stream, or two multifd channels
//! with or without zstd), 0.7 s through a relay that encrypts 16 KiB records in large writes.
//! So each QEMU streams in clear over a unix socket in its run dir to a relay process on its
//! own host, and the two relays carry each of QEMU's connections (main channel, multifd
//! channels, post-copy's) over a TLS 1.3 connection of their own.
//!
//! Authentication is the migration's key, as it was with QEMU's pre-shared key: after the
//! handshake each side proves it holds the key with an HMAC-SHA256 over the session's exported
//! keying material, the source first. A machine in the middle holds two sessions with
//! different keying material and cannot forward a proof from one to the other, so the
//! receiver's certificate (made afresh by each receiving relay) needs no checking; a
//! connection without the proof never reaches the destination's QEMU, and the source sends
//! nothing of the guest to a peer that has not proved the key. Where the center names the
//! source's migration address, the sender connects from it and the receiver closes any
//! connection from elsewhere before TLS: a stranger on the migration network cannot hold the
//! receiver's places (it handles [`MAX_CONNECTIONS`] at once) to keep the source out.
//!
//! A relay is a process of its own, not a task of the agent, so that an agent restart leaves
//! the stream going as it leaves QEMU. It ends when the last of its streams closes, or when
//! none came within [`FIRST_STREAM_WAIT`]; the agent also ends it when the migration ends.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tern_api::migration::MigrationKey;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::task::JoinSet;

/// How long a relay waits for its first stream before it gives up.
pub const FIRST_STREAM_WAIT: Duration = Duration::from_secs(120);
/// Longest a TLS handshake and the key proofs may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the sender tries to reach the receiver.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Each direction's copy buffer: large reads and writes are what makes the relay cheap (the
/// TLS layer cuts them into 16 KiB records and writes many records per system call).
const COPY_BUFFER: usize = 256 * 1024;
/// Most connections a receiver handles at once, proven or not: QEMU opens at most 1 + 16
/// multifd channels + 1 post-copy channel; more is someone else. A receiver told the source's
/// address counts only connections from it, so strangers cannot use up these places.
const MAX_CONNECTIONS: usize = 32;
/// How long the agent waits for a relay it started to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Label of the keying material the proofs cover (RFC 8446 section 7.5).
const EXPORTER_LABEL: &[u8] = b"EXPERIMENTAL tern migration relay key proof";
/// What each side's proof covers besides the keying material, so a proof cannot be
/// reflected back to its sender.
const SOURCE_PROOF: &[u8] = b"tern migration relay: source";
const DESTINATION_PROOF: &[u8] = b"tern migration relay: destination";
/// The first line a relay prints on its standard output once it listens.
const READY_PREFIX: &str = "ready ";

/// What one relay does.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum RelayCommand {
    /// Source side: listen on a unix socket for the source QEMU's connections and carry
    /// each, encrypted, to the receiving relay at --to.
    Send {
        /// The unix socket to create for QEMU (replaced if it exists).
        #[arg(long, value_name = "SOCKET")]
        from: PathBuf,
        /// Owner of the socket: the QEMU user that connects to it.
        #[arg(long, value_name = "UID:GID", value_parser = parse_owner)]
        owner: Option<(u32, u32)>,
        /// The receiving relay.
        #[arg(long, value_name = "IP:PORT")]
        to: SocketAddr,
        /// Connect from this address of the host (its migration address): the one the
        /// receiving relay takes connections from.
        #[arg(long, value_name = "IP")]
        bind: Option<IpAddr>,
    },
    /// Destination side: listen on an ephemeral TCP port of --on (printed once ready) and
    /// carry each connection that proves the key, in clear, to the destination QEMU's socket.
    Receive {
        /// The IP to listen on (the host's migration address).
        #[arg(long, value_name = "IP")]
        on: IpAddr,
        /// The unix socket the destination QEMU listens on.
        #[arg(long, value_name = "SOCKET")]
        to: PathBuf,
        /// Take connections from this address only (the source host's migration address);
        /// any other is closed at once, before TLS, and holds no place among the
        /// connections a relay handles at once.
        #[arg(long, value_name = "IP")]
        from: Option<IpAddr>,
    },
}

/// `tern host relay`: the migration key is read from standard input (64 hex digits, never an
/// argument: arguments are visible to every user of the host).
#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    #[command(subcommand)]
    pub command: RelayCommand,
}

fn parse_owner(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = s
        .split_once(':')
        .ok_or_else(|| format!("expected UID:GID, not {s:?}"))?;
    let id = |x: &str| {
        x.parse::<u32>()
            .map_err(|_| format!("expected UID:GID as numbers, not {s:?}"))
    };
    Ok((id(u)?, id(g)?))
}

/// Runs `tern host relay`: reads the key, listens, prints `ready <endpoint>` and carries
/// streams until the last one closes.
pub async fn run(args: RelayArgs) -> Result<()> {
    let mut line = String::new();
    tokio::io::stdin()
        .take(256)
        .read_to_string(&mut line)
        .await
        .context("reading the migration key from standard input")?;
    let key = MigrationKey::try_from(line.trim().to_string())
        .map_err(|e| anyhow!("the migration key on standard input: {e}"))?;
    let announce = |endpoint: String| {
        // The agent reads this one line, then nothing more comes on standard output.
        println!("{READY_PREFIX}{endpoint}");
    };
    match args.command {
        RelayCommand::Send {
            from,
            owner,
            to,
            bind,
        } => send(&from, owner, Peer { addr: to, bind }, key, announce).await,
        RelayCommand::Receive { on, to, from } => receive(on, from, &to, key, announce).await,
    }
}

/// Where a sending relay carries QEMU's connections: the receiving relay's address, and the
/// local address to connect from (None: the one routing picks).
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub addr: SocketAddr,
    pub bind: Option<IpAddr>,
}

/// Source side: QEMU connects to `socket`; each connection is carried to `to`.
pub async fn send(
    socket: &Path,
    owner: Option<(u32, u32)>,
    to: Peer,
    key: MigrationKey,
    ready: impl FnOnce(String),
) -> Result<()> {
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", socket.display())),
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("listening on {}", socket.display()))?;
    let _remove = RemoveOnDrop(socket.to_path_buf());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", socket.display()))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(socket, Some(uid), Some(gid))
            .with_context(|| format!("giving {} to {uid}:{gid}", socket.display()))?;
    }
    let connector = tokio_rustls::TlsConnector::from(Arc::new(
        tern_pki::tls::relay_client_config().context("the relay's TLS settings")?,
    ));
    ready(format!("unix:{}", socket.display()));
    let key = Arc::new(key);
    let mut streams = JoinSet::new();
    let mut served = 0usize;
    let first = tokio::time::sleep(FIRST_STREAM_WAIT);
    tokio::pin!(first);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (qemu, _) = accepted.context("accepting QEMU's connection")?;
                served += 1;
                let (connector, key) = (connector.clone(), key.clone());
                streams.spawn(async move { send_one(qemu, &connector, to, &key).await });
            }
            Some(done) = streams.join_next(), if !streams.is_empty() => {
                log_stream_end(done, to.addr);
                if streams.is_empty() {
                    tracing::info!(streams = served, "every stream closed: the relay ends");
                    return Ok(());
                }
            }
            () = &mut first, if served == 0 => bail!("QEMU did not connect within {FIRST_STREAM_WAIT:?}"),
        }
    }
}

/// Destination side: listens on an ephemeral port of `on`; each connection (from `from`
/// alone, when given) that proves the key is carried to QEMU's unix socket `qemu`.
pub async fn receive(
    on: IpAddr,
    from: Option<IpAddr>,
    qemu: &Path,
    key: MigrationKey,
    ready: impl FnOnce(String),
) -> Result<()> {
    let listener = TcpListener::bind(SocketAddr::new(on, 0))
        .await
        .with_context(|| format!("listening on {on}"))?;
    let addr = listener.local_addr().context("the relay's own address")?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
        tern_pki::tls::relay_server_config().context("the relay's TLS settings")?,
    ));
    ready(addr.to_string());
    let key = Arc::new(key);
    let proven = Arc::new(AtomicUsize::new(0));
    let mut streams = JoinSet::new();
    let first = tokio::time::sleep(FIRST_STREAM_WAIT);
    tokio::pin!(first);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = accepted.context("accepting a connection")?;
                if from.is_some_and(|from| !same_ip(from, peer.ip())) {
                    tracing::warn!(%peer, "refused: not the source's address");
                    drop(tcp);
                    continue;
                }
                if streams.len() >= MAX_CONNECTIONS {
                    tracing::warn!(%peer, "refused: {MAX_CONNECTIONS} connections already");
                    continue;
                }
                let (acceptor, key, proven) = (acceptor.clone(), key.clone(), proven.clone());
                let qemu = qemu.to_path_buf();
                streams.spawn(async move { receive_one(tcp, &acceptor, &key, &proven, &qemu).await });
            }
            Some(done) = streams.join_next(), if !streams.is_empty() => {
                log_stream_end(done, addr);
                // Only the source's streams count: a stranger's refused connection does
                // not end the wait for them.
                if streams.is_empty() && proven.load(Ordering::SeqCst) > 0 {
                    tracing::info!("every stream closed: the relay ends");
                    return Ok(());
                }
            }
            () = &mut first, if proven.load(Ordering::SeqCst) == 0 => {
                bail!("no source proved the key within {FIRST_STREAM_WAIT:?}")
            }
        }
    }
}

fn log_stream_end(done: Result<Result<(u64, u64)>, tokio::task::JoinError>, peer: SocketAddr) {
    match done {
        Ok(Ok((out, back))) => {
            tracing::info!(%peer, sent = out, received = back, "stream closed")
        }
        Ok(Err(e)) => tracing::warn!(%peer, "stream failed: {e:#}"),
        Err(e) => tracing::warn!(%peer, "stream task failed: {e}"),
    }
}

/// Whether two addresses are one, an IPv4 address and its IPv6-mapped form included (a
/// dual-stack listener sees IPv4 peers so).
fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

/// A TCP connection to `to.addr`, from `to.bind` when given.
async fn connect(to: Peer) -> Result<TcpStream> {
    let connecting = async {
        match to.bind {
            None => TcpStream::connect(to.addr).await,
            Some(ip) => {
                let socket = match to.addr {
                    SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                    SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                };
                socket.bind(SocketAddr::new(ip, 0))?;
                socket.connect(to.addr).await
            }
        }
    };
    let from = to.bind.map(|ip| format!(" from {ip}")).unwrap_or_default();
    tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| anyhow!("{} did not answer within {CONNECT_TIMEOUT:?}", to.addr))?
        .with_context(|| format!("connecting to {}{from}", to.addr))
}

async fn send_one(
    mut qemu: UnixStream,
    connector: &tokio_rustls::TlsConnector,
    to: Peer,
    key: &MigrationKey,
) -> Result<(u64, u64)> {
    let tcp = connect(to).await?;
    tcp.set_nodelay(true).context("TCP_NODELAY")?;
    let name = rustls::pki_types::ServerName::try_from(tern_pki::tls::RELAY_SERVER_NAME)
        .context("the relay's server name")?;
    let mut tls = within(connector.connect(name, tcp), "the TLS handshake").await?;
    let material = keying_material(tls.get_ref().1)?;
    tls.write_all(proof(key, SOURCE_PROOF, &material).as_ref())
        .await
        .context("sending the key proof")?;
    tls.flush().await.context("sending the key proof")?;
    let mut theirs = [0u8; 32];
    within(tls.read_exact(&mut theirs), "the receiver's key proof").await?;
    check_proof(key, DESTINATION_PROOF, &material, &theirs)
        .context("the receiver does not hold the migration key")?;
    carry(&mut qemu, &mut tls).await
}

async fn receive_one(
    tcp: TcpStream,
    acceptor: &tokio_rustls::TlsAcceptor,
    key: &MigrationKey,
    proven: &AtomicUsize,
    qemu: &Path,
) -> Result<(u64, u64)> {
    tcp.set_nodelay(true).context("TCP_NODELAY")?;
    let mut tls = within(acceptor.accept(tcp), "the TLS handshake").await?;
    let material = keying_material(tls.get_ref().1)?;
    let mut theirs = [0u8; 32];
    within(tls.read_exact(&mut theirs), "the sender's key proof").await?;
    check_proof(key, SOURCE_PROOF, &material, &theirs)
        .context("the sender does not hold the migration key")?;
    proven.fetch_add(1, Ordering::SeqCst);
    tls.write_all(proof(key, DESTINATION_PROOF, &material).as_ref())
        .await
        .context("sending the key proof")?;
    tls.flush().await.context("sending the key proof")?;
    let mut q = UnixStream::connect(qemu)
        .await
        .with_context(|| format!("connecting to QEMU at {}", qemu.display()))?;
    carry(&mut tls, &mut q).await
}

/// Copies both ways until both ends have closed; returns the bytes each way.
async fn carry<A, B>(a: &mut A, b: &mut B) -> Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUFFER, COPY_BUFFER)
        .await
        .context("carrying the stream")
}

async fn within<T, E>(f: impl std::future::Future<Output = Result<T, E>>, what: &str) -> Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    tokio::time::timeout(HANDSHAKE_TIMEOUT, f)
        .await
        .map_err(|_| anyhow!("{what} took longer than {HANDSHAKE_TIMEOUT:?}"))?
        .with_context(|| what.to_string())
}

fn keying_material<D>(conn: &rustls::ConnectionCommon<D>) -> Result<[u8; 32]> {
    conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None)
        .map_err(|e| anyhow!("exporting the session's keying material: {e}"))
}

fn proof(key: &MigrationKey, side: &[u8], material: &[u8; 32]) -> ring::hmac::Tag {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes());
    let mut ctx = ring::hmac::Context::with_key(&k);
    ctx.update(side);
    ctx.update(material);
    ctx.sign()
}

fn check_proof(key: &MigrationKey, side: &[u8], material: &[u8; 32], theirs: &[u8]) -> Result<()> {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes());
    let mut msg = Vec::with_capacity(side.len() + material.len());
    msg.extend_from_slice(side);
    msg.extend_from_slice(material);
    // Constant-time comparison.
    ring::hmac::verify(&k, &msg, theirs).map_err(|_| anyhow!("wrong key proof"))
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A relay process the agent started.
#[derive(Debug)]
pub struct Relay {
    pub pid: u32,
    /// Set once the process was reaped (its pid may then be anyone's).
    ended: Arc<std::sync::atomic::AtomicBool>,
    /// What it printed once ready: `unix:<socket>` for a sender, `IP:PORT` for a receiver.
    pub endpoint: String,
}

impl Relay {
    /// Starts `exe host relay <command>` in a process group of its own (an agent restart
    /// leaves it running), hands it the key on standard input, logs its standard error to
    /// `log` and waits for it to say it is ready. The child is reaped by a task of its own.
    pub async fn spawn(
        exe: &Path,
        command: &RelayCommand,
        key: &MigrationKey,
        log: &Path,
    ) -> Result<Relay> {
        let mut args: Vec<std::ffi::OsString> = vec!["host".into(), "relay".into()];
        match command {
            RelayCommand::Send {
                from,
                owner,
                to,
                bind,
            } => {
                args.extend(["send".into(), "--from".into(), from.into()]);
                if let Some((u, g)) = owner {
                    args.extend(["--owner".into(), format!("{u}:{g}").into()]);
                }
                args.extend(["--to".into(), to.to_string().into()]);
                if let Some(bind) = bind {
                    args.extend(["--bind".into(), bind.to_string().into()]);
                }
            }
            RelayCommand::Receive { on, to, from } => {
                args.extend(["receive".into(), "--on".into(), on.to_string().into()]);
                args.extend(["--to".into(), to.into()]);
                if let Some(from) = from {
                    args.extend(["--from".into(), from.to_string().into()]);
                }
            }
        }
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut child = tokio::process::Command::new(exe)
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {} host relay", exe.display()))?;
        let pid = child.id().unwrap_or(0);
        let result = async {
            let mut stdin = child.stdin.take().context("the relay's standard input")?;
            stdin
                .write_all(format!("{}\n", key.to_hex()).as_bytes())
                .await
                .context("giving the relay its key")?;
            drop(stdin);
            let stdout = child.stdout.take().context("the relay's standard output")?;
            let mut line = String::new();
            tokio::time::timeout(
                READY_TIMEOUT,
                tokio::io::BufReader::new(stdout).read_line(&mut line),
            )
            .await
            .map_err(|_| anyhow!("the relay was not ready within {READY_TIMEOUT:?}"))?
            .context("reading the relay's ready line")?;
            line.trim()
                .strip_prefix(READY_PREFIX)
                .map(str::to_string)
                .ok_or_else(|| {
                    anyhow!(
                        "the relay did not start (see {}): it said {:?}",
                        log.display(),
                        line.trim()
                    )
                })
        }
        .await;
        match result {
            Ok(endpoint) => {
                let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let reaped = ended.clone();
                tokio::spawn(async move {
                    let status = child.wait().await;
                    reaped.store(true, Ordering::SeqCst);
                    match status {
                        Ok(st) if st.success() => tracing::debug!(pid, "migration relay ended"),
                        Ok(st) => tracing::warn!(pid, "migration relay ended: {st}"),
                        Err(e) => tracing::warn!(pid, "waiting for the migration relay: {e}"),
                    }
                });
                Ok(Relay {
                    pid,
                    ended,
                    endpoint,
                })
            }
            Err(e) => {
                let _ = child.kill().await;
                Err(e)
            }
        }
    }

    /// Ends the relay (its streams with it); nothing if it already ended.
    pub fn stop(&self) {
        if self.ended.load(Ordering::SeqCst) {
            return;
        }
        if let Ok(pid) = i32::try_from(self.pid) {
            if pid > 0 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> MigrationKey {
        MigrationKey::from_bytes([b; 32])
    }

    fn client() -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(Arc::new(tern_pki::tls::relay_client_config().unwrap()))
    }

    /// A stand-in for the destination QEMU: echoes what it reads, reversed per chunk, so
    /// the test sees both directions carried.
    async fn qemu_stand_in(path: PathBuf) -> tokio::task::JoinHandle<Vec<u8>> {
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(&got[..got.len().min(1000)]).await.unwrap();
            s.shutdown().await.unwrap();
            got
        })
    }

    async fn start_receiver(
        dir: &Path,
        k: MigrationKey,
    ) -> (SocketAddr, tokio::task::JoinHandle<Result<()>>) {
        start_receiver_from(dir, k, None).await
    }

    async fn start_receiver_from(
        dir: &Path,
        k: MigrationKey,
        from: Option<IpAddr>,
    ) -> (SocketAddr, tokio::task::JoinHandle<Result<()>>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let qemu = dir.join("in.sock");
        let task = tokio::spawn(async move {
            receive(IpAddr::from([127, 0, 0, 1]), from, &qemu, k, |e| {
                let _ = tx.send(e);
            })
            .await
        });
        let addr: SocketAddr = rx.await.unwrap().parse().unwrap();
        (addr, task)
    }

    #[tokio::test]
    async fn a_stream_crosses_both_relays_intact_and_encrypted_and_both_end() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = qemu_stand_in(dir.path().join("in.sock")).await;
        let (addr, receiver) = start_receiver(dir.path(), key(7)).await;
        let out = dir.path().join("out.sock");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let o = out.clone();
        let sender = tokio::spawn(async move {
            let to = Peer { addr, bind: None };
            send(&o, None, to, key(7), |e| {
                let _ = tx.send(e);
            })
            .await
        });
        assert_eq!(rx.await.unwrap(), format!("unix:{}", out.display()));
        // 8 MiB of a recognisable pattern, as QEMU would write guest pages.
        let page: Vec<u8> = b"GUEST-PAGE-".iter().copied().cycle().take(4096).collect();
        let data: Vec<u8> = page.iter().copied().cycle().take(8 << 20).collect();
        let mut s = UnixStream::connect(&out).await.unwrap();
        s.write_all(&data).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, data[..1000], "the return path was not carried");
        assert!(qemu.await.unwrap() == data, "the stream arrived altered");
        drop(s);
        // Both relays end once their one stream closed, and the sender's socket goes.
        tokio::time::timeout(Duration::from_secs(10), sender)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), receiver)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(!out.exists(), "the sender left its socket behind");
    }

    #[tokio::test]
    async fn a_sender_with_another_key_reaches_nothing_and_the_receiver_waits_on() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, receiver) = start_receiver(dir.path(), key(7)).await;
        // No QEMU stand-in: a connection that got through would fail at the unix socket,
        // but the proof fails first.
        let connector = client();
        let (a, b) = UnixStream::pair().unwrap();
        let to = Peer { addr, bind: None };
        let err = send_one(a, &connector, to, &key(8)).await.unwrap_err();
        drop(b);
        assert!(
            format!("{err:#}").contains("the receiver's key proof"),
            "unexpected failure: {err:#}"
        );
        // Plain junk, not even TLS.
        let mut junk = TcpStream::connect(addr).await.unwrap();
        junk.write_all(&[0x42; 64]).await.unwrap();
        let mut rest = Vec::new();
        let _ = junk.read_to_end(&mut rest).await;
        // The receiver still waits for its source.
        assert!(
            !receiver.is_finished(),
            "a stranger's connection ended the relay"
        );
        receiver.abort();
    }

    #[tokio::test]
    async fn a_receiver_without_the_key_gets_no_guest_memory() {
        let dir = tempfile::tempdir().unwrap();
        // An impostor receiver with another key.
        let (addr, receiver) = start_receiver(dir.path(), key(9)).await;
        let connector = client();
        let (a, mut b) = UnixStream::pair().unwrap();
        // QEMU's side writes guest memory at once; the relay must not forward it.
        b.write_all(&[0x55; 4096]).await.unwrap();
        let to = Peer { addr, bind: None };
        let err = send_one(a, &connector, to, &key(7)).await.unwrap_err();
        assert!(format!("{err:#}").contains("key"), "{err:#}");
        // The impostor closed the connection after the bad proof; nothing reached its QEMU
        // socket, which does not even exist.
        assert!(!dir.path().join("in.sock").exists());
        receiver.abort();
    }

    /// The attack the connection limit invites: a stranger on the migration network holds
    /// more connections open than a receiver takes, before the source connects. A receiver
    /// told the source's address closes the stranger's at once; the source, connecting from
    /// that address, gets through and its stream is carried.
    #[tokio::test]
    async fn strangers_holding_connections_cannot_keep_the_source_out() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = qemu_stand_in(dir.path().join("in.sock")).await;
        let source = IpAddr::from([127, 0, 0, 2]);
        let (addr, receiver) = start_receiver_from(dir.path(), key(7), Some(source)).await;
        let mut strangers = Vec::new();
        for _ in 0..MAX_CONNECTIONS + 8 {
            strangers.push(TcpStream::connect(addr).await.unwrap());
        }
        // Each was closed before any TLS: it reads its end at once.
        for s in &mut strangers {
            let mut rest = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest));
            let _ = read.await.expect("a stranger's connection stayed open");
            assert!(rest.is_empty(), "a stranger was answered: {rest:?}");
        }
        let (a, mut b) = UnixStream::pair().unwrap();
        let carried = tokio::spawn(async move {
            let to = Peer {
                addr,
                bind: Some(source),
            };
            send_one(a, &client(), to, &key(7)).await
        });
        b.write_all(b"guest pages").await.unwrap();
        b.shutdown().await.unwrap();
        let mut back = Vec::new();
        b.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"guest pages", "the source's stream was not carried");
        carried.await.unwrap().unwrap();
        assert_eq!(qemu.await.unwrap(), b"guest pages");
        tokio::time::timeout(Duration::from_secs(10), receiver)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[test]
    fn ipv4_peers_seen_through_a_dual_stack_listener_are_the_same_address() {
        let v4 = IpAddr::from([10, 77, 0, 11]);
        let mapped: IpAddr = "::ffff:10.77.0.11".parse().unwrap();
        assert!(same_ip(v4, mapped) && same_ip(mapped, v4) && same_ip(v4, v4));
        assert!(!same_ip(v4, IpAddr::from([10, 77, 0, 12])));
    }

    #[test]
    fn proofs_depend_on_key_side_and_session() {
        let m1 = [1u8; 32];
        let m2 = [2u8; 32];
        let p = proof(&key(1), SOURCE_PROOF, &m1);
        assert!(check_proof(&key(1), SOURCE_PROOF, &m1, p.as_ref()).is_ok());
        assert!(check_proof(&key(2), SOURCE_PROOF, &m1, p.as_ref()).is_err());
        assert!(check_proof(&key(1), DESTINATION_PROOF, &m1, p.as_ref()).is_err());
        assert!(check_proof(&key(1), SOURCE_PROOF, &m2, p.as_ref()).is_err());
    }

    #[test]
    fn owners_parse_as_numbers_only() {
        assert_eq!(parse_owner("1000:1000"), Ok((1000, 1000)));
        for bad in ["1000", "a:b", "1:2:3", "-1:0", ""] {
            assert!(parse_owner(bad).is_err(), "{bad} was accepted");
        }
    }
}
