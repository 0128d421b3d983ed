//! The QMP client: one unix-socket connection to a QEMU monitor, commands and events.
//!
//! Written by hand rather than with the `qapi` crate: its `Command` trait names each command
//! with a compile-time constant, so sending a command by name with JSON arguments (what the
//! agent and the migration code need) is not possible; its generated types follow one QEMU
//! schema and fail to decode replies that a newer QEMU extends (new status values, new
//! fields); and without QEMU's OOB capability it holds the socket until each reply arrives,
//! so commands cannot overlap. The protocol itself is small: newline-delimited JSON, a
//! greeting, `qmp_capabilities`, replies correlated by `id`, and asynchronous events.
//!
//! A reader task owns the socket's read half: it routes replies to their waiting command by
//! `id` and publishes events on a broadcast channel. When the socket closes (QEMU exited),
//! every waiting and later command fails with [`Error::QmpClosed`]. Dropping the last
//! [`Qmp`] clone closes the connection (QEMU serves one QMP client at a time, so a handle
//! that lingered would lock out the next one).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot, watch};

use crate::error::{Error, QmpErrorClass, Result};

/// How long to wait for QEMU's greeting after connecting: it only greets once the previous
/// client (if any) has gone.
const GREETING_TIMEOUT: Duration = Duration::from_secs(10);
/// Events buffered per subscriber before a slow one starts missing them.
const EVENT_BUFFER: usize = 1024;

/// One asynchronous QMP event (`{"event": NAME, "data": {...}, "timestamp": {...}}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QmpEvent {
    /// e.g. `SHUTDOWN`, `STOP`, `RESUME`, `MIGRATION`, `MIGRATION_PASS`.
    pub name: String,
    /// The event's `data` (`Null` when it has none).
    pub data: Value,
    /// When QEMU emitted it (QEMU's clock).
    pub timestamp: DateTime<Utc>,
}

pub use tern_motion::QemuVersion;

/// What QEMU says when a client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpGreeting {
    pub version: QemuVersion,
    /// Distribution package string, e.g. `Debian 1:10.0.2+ds-2...`.
    pub package: String,
    /// Capabilities QEMU offers; this client enables `oob` when offered (see
    /// [`Qmp::execute_oob`]).
    pub capabilities: Vec<String>,
}

type Reply = std::result::Result<Value, (String, String)>;

struct Pending {
    waiters: HashMap<u64, oneshot::Sender<Reply>>,
    closed: bool,
}

/// State shared by the handle and the reader task.
pub(crate) struct Shared {
    pending: Mutex<Pending>,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Sender<bool>,
    last_shutdown: Mutex<Option<QmpEvent>>,
}

impl Shared {
    /// Resolves once the connection has closed.
    pub(crate) async fn closed(&self) {
        let mut rx = self.closed.subscribe();
        // An error means the sender is gone, which only happens once closed.
        let _ = rx.wait_for(|c| *c).await;
    }

    pub(crate) fn last_shutdown(&self) -> Option<QmpEvent> {
        lock(&self.last_shutdown).clone()
    }
}

/// Locks a std mutex, ignoring poisoning (the data stays consistent: every critical section
/// is a single insert/remove).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Handle {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    greeting: QmpGreeting,
    socket: PathBuf,
    reader: tokio::task::AbortHandle,
    /// Out-of-band execution was negotiated.
    oob: std::sync::atomic::AtomicBool,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The reader owns the read half: stopping it closes the socket.
        self.reader.abort();
    }
}

/// An async QMP connection. Cheap to clone; all clones share the connection.
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<Handle>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("socket", &self.inner.socket)
            .field("version", &self.inner.greeting.version)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Qmp {
    /// Connects to a QMP socket, reads the greeting and leaves negotiation mode.
    pub async fn connect(socket: &Path) -> Result<Qmp> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| Error::io(format!("connect to QMP socket {}", socket.display()), e))?;
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut line = String::new();
        let n = tokio::time::timeout(GREETING_TIMEOUT, reader.read_line(&mut line))
            .await
            .map_err(|_| Error::Timeout {
                what: format!(
                    "the QMP greeting on {} (is another client connected?)",
                    socket.display()
                ),
                timeout_ms: GREETING_TIMEOUT.as_millis() as u64,
            })?
            .map_err(|e| Error::io("read the QMP greeting", e))?;
        if n == 0 {
            return Err(Error::QmpClosed);
        }
        let greeting = parse_greeting(&line)?;
        tracing::debug!(socket = %socket.display(), version = %greeting.version, "QMP connected");

        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                waiters: HashMap::new(),
                closed: false,
            }),
            events,
            closed: watch::channel(false).0,
            last_shutdown: Mutex::new(None),
        });
        let reader = tokio::spawn(read_loop(reader, shared.clone())).abort_handle();
        let qmp = Qmp {
            inner: Arc::new(Handle {
                writer: tokio::sync::Mutex::new(write),
                shared,
                next_id: AtomicU64::new(1),
                greeting,
                socket: socket.to_path_buf(),
                reader,
                oob: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        // Out-of-band lets a command run while QEMU's main loop is blocked (a migration
        // holding its lock while its socket is stuck): the one way to end such a stall.
        let offers_oob = qmp.greeting().capabilities.iter().any(|c| c == "oob");
        if offers_oob {
            qmp.execute("qmp_capabilities", Some(json!({ "enable": ["oob"] })))
                .await?;
            qmp.inner.oob.store(true, Ordering::Relaxed);
        } else {
            qmp.execute("qmp_capabilities", None).await?;
        }
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value.
    ///
    /// `arguments` must be a JSON object (or `None`). Commands may run concurrently from
    /// several tasks; replies are matched by id. QEMU's refusal is [`Error::Qmp`] with its
    /// class and description; a closed connection is [`Error::QmpClosed`]. There is no
    /// timeout here: wrap the call when the command may block.
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.send("execute", command, arguments).await
    }

    /// Runs a command out of band: QEMU answers it even while its main loop is blocked.
    /// Only commands QEMU marks `allow-oob` (e.g. `yank`) may be; without negotiated
    /// out-of-band support this is [`Qmp::execute`].
    pub async fn execute_oob(&self, command: &str, arguments: Option<Value>) -> Result<Value> {
        if self.inner.oob.load(Ordering::Relaxed) {
            self.send("exec-oob", command, arguments).await
        } else {
            self.send("execute", command, arguments).await
        }
    }

    /// Whether out-of-band execution was negotiated.
    pub fn has_oob(&self) -> bool {
        self.inner.oob.load(Ordering::Relaxed)
    }

    async fn send(&self, key: &str, command: &str, arguments: Option<Value>) -> Result<Value> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ key: command, "id": id });
        if let Some(args) = arguments {
            if !args.is_object() {
                return Err(Error::Protocol(format!(
                    "arguments of `{command}` must be a JSON object, not {args}"
                )));
            }
            msg["arguments"] = args;
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(b'\n');

        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&self.inner.shared.pending);
            if pending.closed {
                return Err(Error::QmpClosed);
            }
            pending.waiters.insert(id, tx);
        }
        tracing::trace!(command, id, "QMP execute");
        let written = {
            let mut w = self.inner.writer.lock().await;
            w.write_all(&bytes).await
        };
        if let Err(e) = written {
            lock(&self.inner.shared.pending).waiters.remove(&id);
            return Err(if self.is_closed() {
                Error::QmpClosed
            } else {
                Error::io(format!("send QMP command `{command}`"), e)
            });
        }
        match rx.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err((class, desc))) => Err(Error::Qmp {
                command: command.to_string(),
                class: QmpErrorClass::parse(&class),
                desc,
            }),
            Err(_) => Err(Error::QmpClosed),
        }
    }

    /// [`Qmp::execute`], decoding the answer into `T`.
    pub async fn execute_as<T: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<T> {
        let value = self.execute(command, arguments).await?;
        serde_json::from_value(value)
            .map_err(|e| Error::Protocol(format!("unexpected answer to `{command}`: {e}")))
    }

    /// A receiver of every event from now on.
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.inner.shared.events.subscribe()
    }

    /// The greeting QEMU sent.
    pub fn greeting(&self) -> &QmpGreeting {
        &self.inner.greeting
    }

    /// True once the socket has closed.
    pub fn is_closed(&self) -> bool {
        *self.inner.shared.closed.borrow()
    }

    /// Resolves when the socket closes (QEMU exited or closed the monitor).
    pub async fn closed(&self) {
        self.inner.shared.closed().await
    }

    /// The `SHUTDOWN` event, if QEMU sent one on this connection (kept because the process
    /// watcher needs it after the fact to tell a shutdown from a crash).
    pub fn last_shutdown(&self) -> Option<QmpEvent> {
        self.inner.shared.last_shutdown()
    }

    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.inner.shared.clone()
    }
}

/// Waits for the next event named `name` on `rx`, up to `timeout`.
///
/// Subscribe (with [`Qmp::events`]) before the action that triggers the event, or it may be
/// missed.
pub async fn wait_event(
    rx: &mut broadcast::Receiver<QmpEvent>,
    name: &str,
    timeout: Duration,
) -> Result<QmpEvent> {
    let wait = async {
        loop {
            match rx.recv().await {
                Ok(ev) if ev.name == name => return Ok(ev),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "QMP event subscriber lagged");
                }
                Err(broadcast::error::RecvError::Closed) => return Err(Error::QmpClosed),
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| Error::Timeout {
            what: format!("QMP event {name}"),
            timeout_ms: timeout.as_millis() as u64,
        })?
}

fn parse_greeting(line: &str) -> Result<QmpGreeting> {
    let v: Value = serde_json::from_str(line)
        .map_err(|e| Error::Protocol(format!("greeting is not JSON ({e}): {line}")))?;
    let qmp = v
        .get("QMP")
        .ok_or_else(|| Error::Protocol(format!("not a QMP greeting: {line}")))?;
    let ver = &qmp["version"]["qemu"];
    let num = |k: &str| ver[k].as_u64().unwrap_or(0) as u32;
    Ok(QmpGreeting {
        version: QemuVersion {
            major: num("major"),
            minor: num("minor"),
            micro: num("micro"),
        },
        package: qmp["version"]["package"]
            .as_str()
            .unwrap_or_default()
            .trim()
            .to_string(),
        capabilities: qmp["capabilities"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

async fn read_loop(mut reader: BufReader<OwnedReadHalf>, shared: Arc<Shared>) {
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) => break,
            Ok(_) => dispatch(&line, &shared),
            Err(e) => {
                tracing::debug!(error = %e, "QMP read failed");
                break;
            }
        }
    }
    close(&shared);
}

fn close(shared: &Shared) {
    {
        let mut pending = lock(&shared.pending);
        pending.closed = true;
        // Dropping the senders fails every waiting command with QmpClosed.
        pending.waiters.clear();
    }
    shared.closed.send_replace(true);
    tracing::debug!("QMP connection closed");
}

fn dispatch(line: &str, shared: &Shared) {
    let v: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, line, "QMP: ignoring a line that is not JSON");
            return;
        }
    };
    if let Some(name) = v.get("event").and_then(Value::as_str) {
        let ts = &v["timestamp"];
        let timestamp = DateTime::from_timestamp(
            ts["seconds"].as_i64().unwrap_or(0),
            (ts["microseconds"].as_u64().unwrap_or(0) * 1000) as u32,
        )
        .unwrap_or_default();
        let event = QmpEvent {
            name: name.to_string(),
            data: v.get("data").cloned().unwrap_or(Value::Null),
            timestamp,
        };
        tracing::debug!(event = %event.name, data = %event.data, "QMP event");
        if event.name == "SHUTDOWN" {
            *lock(&shared.last_shutdown) = Some(event.clone());
        }
        // No subscriber is fine.
        let _ = shared.events.send(event);
        return;
    }
    let reply: Reply = if let Some(ret) = v.get("return") {
        Ok(ret.clone())
    } else if let Some(err) = v.get("error") {
        Err((
            err["class"].as_str().unwrap_or("GenericError").to_string(),
            err["desc"].as_str().unwrap_or_default().to_string(),
        ))
    } else {
        tracing::warn!(line, "QMP: ignoring an unknown message");
        return;
    };
    let Some(id) = v.get("id").and_then(Value::as_u64) else {
        tracing::warn!(line, "QMP: reply without our id");
        return;
    };
    let waiter = lock(&shared.pending).waiters.remove(&id);
    match waiter {
        // The caller may have given up waiting; nothing to do then.
        Some(tx) => {
            let _ = tx.send(reply);
        }
        None => tracing::debug!(id, "QMP: reply for a command nobody waits for"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    /// A scripted fake QEMU: greets, acks capabilities, then answers per `answer`.
    async fn fake_server(
        listener: UnixListener,
        answer: impl Fn(&Value) -> Vec<String> + Send + 'static,
    ) {
        let (stream, _) = listener.accept().await.unwrap();
        let (r, mut w) = stream.into_split();
        w.write_all(
            b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \
              \"package\": \"test\"}, \"capabilities\": [\"oob\"]}}\r\n",
        )
        .await
        .unwrap();
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let cmd: Value = serde_json::from_str(&line).unwrap();
            for out in answer(&cmd) {
                w.write_all(out.as_bytes()).await.unwrap();
                w.write_all(b"\r\n").await.unwrap();
            }
        }
    }

    #[tokio::test]
    async fn commands_errors_events_and_close() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("q.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(fake_server(listener, |cmd| {
            let id = cmd["id"].clone();
            match cmd["execute"].as_str().unwrap() {
                "qmp_capabilities" => vec![json!({"return": {}, "id": id}).to_string()],
                "echo" => vec![
                    json!({"event": "STOP", "timestamp": {"seconds": 1700000000, "microseconds": 5}})
                        .to_string(),
                    json!({"return": cmd["arguments"], "id": id}).to_string(),
                ],
                // Answers out of order: the reply of "slow" comes with the next command's.
                "slow" => vec![],
                "fast" => vec![
                    json!({"return": "fast", "id": id}).to_string(),
                    json!({"return": "slow", "id": id.as_u64().unwrap() - 1}).to_string(),
                ],
                "bye" => vec![],
                other => vec![json!({"error": {"class": "CommandNotFound",
                    "desc": format!("The command {other} has not been found")}, "id": id})
                .to_string()],
            }
        }));
        let qmp = Qmp::connect(&sock).await.unwrap();
        assert_eq!(qmp.greeting().version.to_string(), "10.0.2");
        assert_eq!(qmp.greeting().capabilities, vec!["oob".to_string()]);

        let mut events = qmp.events();
        let v = qmp.execute("echo", Some(json!({"a": 1}))).await.unwrap();
        assert_eq!(v, json!({"a": 1}));
        let ev = wait_event(&mut events, "STOP", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(ev.timestamp.timestamp(), 1700000000);

        let err = qmp.execute("nope", None).await.unwrap_err();
        assert_eq!(err.qmp_class(), Some(&QmpErrorClass::CommandNotFound));
        assert!(err.to_string().contains("nope"), "{err}");

        assert!(qmp.execute("x", Some(json!([1]))).await.is_err());

        // Two commands in flight, answered in reverse order.
        let q2 = qmp.clone();
        let slow = tokio::spawn(async move { q2.execute("slow", None).await });
        // Make sure "slow" is sent first.
        tokio::time::timeout(Duration::from_secs(5), async {
            while lock(&qmp.inner.shared.pending).waiters.is_empty() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        let fast = qmp.execute("fast", None).await.unwrap();
        assert_eq!(fast, json!("fast"));
        assert_eq!(slow.await.unwrap().unwrap(), json!("slow"));

        // The server goes away with a command in flight.
        let q3 = qmp.clone();
        let hung = tokio::spawn(async move { q3.execute("bye", None).await });
        tokio::time::timeout(Duration::from_secs(5), async {
            while lock(&qmp.inner.shared.pending).waiters.is_empty() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        server.abort();
        let _ = server.await;
        assert!(matches!(hung.await.unwrap(), Err(Error::QmpClosed)));
        tokio::time::timeout(Duration::from_secs(5), qmp.closed())
            .await
            .unwrap();
        assert!(matches!(
            qmp.execute("echo", None).await,
            Err(Error::QmpClosed)
        ));
    }

    #[tokio::test]
    async fn dropping_the_handle_closes_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("q.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            stream
                .write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": []}}\n")
                .await
                .unwrap();
            let mut buf = vec![0u8; 4096];
            let n = stream.read(&mut buf).await.unwrap();
            let cmd: Value = serde_json::from_slice(&buf[..n]).unwrap();
            stream
                .write_all(format!("{}\n", json!({"return": {}, "id": cmd["id"]})).as_bytes())
                .await
                .unwrap();
            // Reads until the client hangs up.
            loop {
                if stream.read(&mut buf).await.unwrap() == 0 {
                    return true;
                }
            }
        });
        let qmp = Qmp::connect(&sock).await.unwrap();
        let clone = qmp.clone();
        drop(qmp);
        drop(clone);
        let eof = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        assert!(eof);
    }

    #[test]
    fn greeting_parse() {
        assert!(parse_greeting("{\"return\": {}}").is_err());
        assert!(parse_greeting("garbage").is_err());
    }
}
