//! The serve port: streams sequence-numbered records to each client, echoes its lines and
//! answers `STATS` and `CPUINFO` (protocol in [`crate::proto`]).

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::proto::{Hello, Record, RECORD_PERIOD_MS};
use crate::services::Services;

/// Binds `0.0.0.0:port` now (so callers report ready only once it listens) and serves on a
/// background thread. Returns the bound address (port 0 picks one).
pub fn start(port: u16, services: Arc<Services>) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        .map_err(|e| io::Error::new(e.kind(), format!("bind serve port {port}: {e}")))?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("serve".into())
        .spawn(move || accept_loop(listener, services))?;
    Ok(addr)
}

fn accept_loop(listener: TcpListener, services: Arc<Services>) {
    let mut next_stream: u32 = 1;
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                eprintln!("tern-guest: accept: {e}");
                continue;
            }
        };
        let stream_id = next_stream;
        next_stream = next_stream.wrapping_add(1);
        let s = services.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("stream{stream_id}"))
            .spawn(move || {
                s.streams.open.fetch_add(1, Ordering::Relaxed);
                s.streams.total.fetch_add(1, Ordering::Relaxed);
                if serve_conn(conn, stream_id, &s).is_err() {
                    s.streams.broken.fetch_add(1, Ordering::Relaxed);
                }
                s.streams.open.fetch_sub(1, Ordering::Relaxed);
            });
        if let Err(e) = spawned {
            eprintln!("tern-guest: cannot start stream thread: {e}");
        }
    }
}

/// Streams records until the client quits or the connection fails (Err).
fn serve_conn(conn: TcpStream, stream_id: u32, services: &Arc<Services>) -> io::Result<()> {
    conn.set_nodelay(true)?;
    let reader = conn.try_clone()?;
    let writer = Arc::new(Mutex::new(conn));
    let done = Arc::new(AtomicBool::new(false));
    {
        let w = writer.clone();
        let d = done.clone();
        let s = services.clone();
        std::thread::Builder::new()
            .name(format!("stream{stream_id}-rx"))
            .spawn(move || {
                read_requests(reader, &w, &s);
                d.store(true, Ordering::SeqCst);
            })?;
    }
    let hello = Hello {
        boot_id: services.boot_id.clone(),
        stream: stream_id,
        period_ms: RECORD_PERIOD_MS,
    };
    send(&writer, hello.to_line().as_bytes())?;
    let period = Duration::from_millis(RECORD_PERIOD_MS);
    let mut seq: u64 = 1;
    let mut next = Instant::now();
    while !done.load(Ordering::SeqCst) {
        let guest_us = u64::try_from(services.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let record = Record {
            seq,
            guest_us,
            stream: stream_id,
        };
        send(&writer, record.to_line().as_bytes())?;
        seq += 1;
        next += period;
        // Late (paused, starved): carry on from now rather than send a burst.
        match next.checked_duration_since(Instant::now()) {
            Some(wait) => std::thread::sleep(wait),
            None => next = Instant::now(),
        }
    }
    let conn = writer.lock().unwrap_or_else(|p| p.into_inner());
    let _ = conn.shutdown(std::net::Shutdown::Both);
    Ok(())
}

fn send(writer: &Mutex<TcpStream>, bytes: &[u8]) -> io::Result<()> {
    let mut conn = writer.lock().unwrap_or_else(|p| p.into_inner());
    conn.write_all(bytes)
}

fn read_requests(reader: TcpStream, writer: &Mutex<TcpStream>, services: &Services) {
    let mut lines = BufReader::new(reader);
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let request = line.trim_end_matches(['\r', '\n']);
        let reply = match request {
            "QUIT" => return,
            "STATS" => format!("S {}\n", services.stats_json()),
            "CPUINFO" => match std::fs::read_to_string("/proc/cpuinfo") {
                Ok(text) => format!("C {}\n", crate::proto::escape_text(&text)),
                Err(e) => format!("C {}\n", crate::proto::escape_text(&format!("error: {e}"))),
            },
            other => format!("E {other}\n"),
        };
        if send(writer, reply.as_bytes()).is_err() {
            return;
        }
    }
}
