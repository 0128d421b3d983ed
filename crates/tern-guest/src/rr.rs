//! The request/response port: a client sends numbered requests towards the guest and waits
//! for each answer, as users of a database or an RPC service do. Unlike the record stream
//! (guest → client, where the client mostly sends ACKs), every request that reaches a paused
//! or moving VM and is lost shows here: the client's TCP retransmits it after its timer
//! (≥ 200 ms), the service sees the gap.
//!
//! Protocol, one ASCII line each way per request:
//! - client → guest: `Q <seq:016x> <client_us:016x>`; `seq` starts at 1 and grows by 1;
//! - guest → client: `A <seq:016x> <client_us:016x> <guest_us:016x>`, sent at once.
//!
//! The service counts, per connection, sequence numbers skipped (`lost`) and repeated or out of
//! order (`repeated`), reported in the guest's stats (`rr`). The client ([`run`]) sends one
//! request per interval whatever the answers, checks every answer, and reports the longest wait,
//! when it ended (CLOCK_MONOTONIC, the clock other processes of the host read too) and its
//! socket's TCP retransmissions.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::json::JsonObject;
use crate::services::Services;

/// The request/response port tern's tests and lab use.
pub const DEFAULT_PORT: u16 = 7001;

/// The service's counters, over all connections.
#[derive(Debug, Default)]
pub struct RrCounters {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    /// Sequence numbers skipped: requests that never arrived.
    pub lost: AtomicU64,
    /// Requests whose number was not above the previous one: repeated or reordered.
    pub repeated: AtomicU64,
    pub malformed: AtomicU64,
}

impl RrCounters {
    pub fn to_json(&self) -> String {
        JsonObject::new()
            .u64("connections", self.connections.load(Ordering::Relaxed))
            .u64("requests", self.requests.load(Ordering::Relaxed))
            .u64("lost", self.lost.load(Ordering::Relaxed))
            .u64("repeated", self.repeated.load(Ordering::Relaxed))
            .u64("malformed", self.malformed.load(Ordering::Relaxed))
            .finish()
    }
}

/// Most stalls a report lists.
pub const MAX_STALLS: usize = 64;

/// `[[end_us,wait_ms],...]`.
fn stalls_json(stalls: &[(u64, f64)]) -> String {
    let items: Vec<String> = stalls
        .iter()
        .map(|(end, wait)| format!("[{end},{wait:.3}]"))
        .collect();
    format!("[{}]", items.join(","))
}

/// `clock` in µs.
fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1000
}

/// CLOCK_REALTIME in µs (the clock QEMU stamps its events with).
pub fn realtime_us() -> u64 {
    clock_us(libc::CLOCK_REALTIME)
}

/// CLOCK_MONOTONIC in µs: comparable across the processes of one machine.
pub fn monotonic_us() -> u64 {
    clock_us(libc::CLOCK_MONOTONIC)
}

/// A request line: `(seq, client_us)`.
pub fn parse_request(line: &str) -> Option<(u64, u64)> {
    let mut f = line.split(' ');
    if f.next()? != "Q" {
        return None;
    }
    let seq = u64::from_str_radix(f.next()?, 16).ok()?;
    let us = u64::from_str_radix(f.next()?, 16).ok()?;
    f.next().is_none().then_some((seq, us))
}

/// An answer line: `(seq, client_us, guest_us)`.
pub fn parse_answer(line: &str) -> Option<(u64, u64, u64)> {
    let mut f = line.split(' ');
    if f.next()? != "A" {
        return None;
    }
    let seq = u64::from_str_radix(f.next()?, 16).ok()?;
    let client_us = u64::from_str_radix(f.next()?, 16).ok()?;
    let guest_us = u64::from_str_radix(f.next()?, 16).ok()?;
    f.next().is_none().then_some((seq, client_us, guest_us))
}

/// Binds `0.0.0.0:port` now and answers on background threads.
pub fn start(port: u16, services: Arc<Services>) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        .map_err(|e| io::Error::new(e.kind(), format!("bind request port {port}: {e}")))?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("rr".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let s = services.clone();
                let _ = std::thread::Builder::new()
                    .name("rr-conn".into())
                    .spawn(move || answer(conn, &s));
            }
        })?;
    Ok(addr)
}

fn answer(conn: TcpStream, services: &Services) {
    let c = &services.rr;
    c.connections.fetch_add(1, Ordering::Relaxed);
    if conn.set_nodelay(true).is_err() {
        return;
    }
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut lines = BufReader::new(conn);
    let mut line = String::new();
    let mut expected = 1u64;
    loop {
        line.clear();
        match lines.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let Some((seq, client_us)) = parse_request(line.trim_end()) else {
            c.malformed.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        c.requests.fetch_add(1, Ordering::Relaxed);
        if seq < expected {
            c.repeated.fetch_add(1, Ordering::Relaxed);
        } else {
            c.lost.fetch_add(seq - expected, Ordering::Relaxed);
            expected = seq + 1;
        }
        let guest_us = u64::try_from(services.started.elapsed().as_micros()).unwrap_or(0);
        let reply = format!("A {seq:016x} {client_us:016x} {guest_us:016x}\n");
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// How to run the client.
#[derive(Debug, Clone)]
pub struct RrOptions {
    pub addr: SocketAddr,
    /// One request per interval.
    pub interval: Duration,
    pub duration: Duration,
    pub connect_timeout: Duration,
    /// Ends the run early once this file exists.
    pub stop_file: Option<PathBuf>,
}

/// What the client saw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RrReport {
    pub addr: String,
    pub duration_ms: u64,
    pub requests: u64,
    pub answers: u64,
    /// Requests without an answer at the end (after a grace period).
    pub unanswered: u64,
    /// Answers that did not match the oldest outstanding request.
    pub out_of_order: u64,
    pub malformed: u64,
    /// The connection failed or closed before the end.
    pub broken: bool,
    pub longest_wait_ms: f64,
    /// CLOCK_MONOTONIC µs at which the longest wait ended (its answer arrived).
    pub longest_wait_end_us: u64,
    /// Answers that took longer than 50 ms.
    pub waits_over_50ms: u64,
    /// Stalls: runs of answers over 50 ms, each as (when its longest wait ended, CLOCK_REALTIME
    /// µs — the clock of QEMU's event timestamps; that wait, ms), at most [`MAX_STALLS`].
    pub stalls: Vec<(u64, f64)>,
    pub mean_wait_ms: f64,
    /// Segments the client's TCP retransmitted over the connection (`tcpi_total_retrans`).
    /// While a guest is paused the client's loss probe resends its last request after a few
    /// ms even when nothing was lost; the guest then reports the duplicate (D-SACK).
    pub retransmits: u64,
    /// Retransmissions the guest reported as duplicates (`tcpi_dsack_dups`): not needed.
    pub spurious_retransmits: u64,
    /// Retransmissions that were needed: segments the guest never got the first time.
    pub lost_segments: u64,
}

impl RrReport {
    /// Every request answered, in order, on one unbroken connection.
    pub fn ok(&self) -> bool {
        self.requests > 0
            && self.answers == self.requests
            && self.unanswered == 0
            && self.out_of_order == 0
            && self.malformed == 0
            && !self.broken
    }

    pub fn to_json(&self) -> String {
        JsonObject::new()
            .str("addr", &self.addr)
            .u64("duration_ms", self.duration_ms)
            .u64("requests", self.requests)
            .u64("answers", self.answers)
            .u64("unanswered", self.unanswered)
            .u64("out_of_order", self.out_of_order)
            .u64("malformed", self.malformed)
            .bool("broken", self.broken)
            .f64("longest_wait_ms", self.longest_wait_ms)
            .u64("longest_wait_end_us", self.longest_wait_end_us)
            .u64("waits_over_50ms", self.waits_over_50ms)
            .raw("stalls", &stalls_json(&self.stalls))
            .f64("mean_wait_ms", self.mean_wait_ms)
            .u64("retransmits", self.retransmits)
            .u64("spurious_retransmits", self.spurious_retransmits)
            .u64("lost_segments", self.lost_segments)
            .bool("ok", self.ok())
            .finish()
    }
}

/// Retransmission counters of a connected TCP socket: `(tcpi_total_retrans,
/// tcpi_dsack_dups)`, the second `None` on kernels older than 5.4. Read from the kernel's
/// `struct tcp_info` by offset: libc's copy of the struct stops before `tcpi_dsack_dups`.
fn retransmissions(conn: &TcpStream) -> io::Result<(u64, Option<u64>)> {
    const TOTAL_RETRANS: usize = 100;
    const DSACK_DUPS: usize = 216;
    let mut info = [0u8; 512];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: TCP_INFO writes at most `len` bytes into the buffer we own.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = len as usize;
    let u32_at = |at: usize| {
        (len >= at + 4).then(|| {
            u64::from(u32::from_ne_bytes([
                info[at],
                info[at + 1],
                info[at + 2],
                info[at + 3],
            ]))
        })
    };
    let total = u32_at(TOTAL_RETRANS).ok_or_else(|| io::Error::other("short TCP_INFO"))?;
    Ok((total, u32_at(DSACK_DUPS)))
}

/// How long the client waits for the last answers once it stops sending.
const GRACE: Duration = Duration::from_secs(3);

/// Runs the client until `duration` is over or the stop file exists.
pub fn run(o: &RrOptions) -> io::Result<RrReport> {
    let conn = crate::client::connect_until(o.addr, Instant::now() + o.connect_timeout)?;
    conn.set_nodelay(true)?;
    let mut writer = conn.try_clone()?;
    let outstanding: Arc<Mutex<VecDeque<(u64, Instant)>>> = Arc::default();
    let sending = Arc::new(AtomicBool::new(true));
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let sender = {
        let (outstanding, sending, sent) = (outstanding.clone(), sending.clone(), sent.clone());
        let (interval, duration, stop_file) = (o.interval, o.duration, o.stop_file.clone());
        std::thread::Builder::new()
            .name("rr-send".into())
            .spawn(move || -> io::Result<()> {
                let mut next = Instant::now();
                let mut seq = 0u64;
                while started.elapsed() < duration
                    && !stop_file.as_ref().is_some_and(|f| f.exists())
                {
                    seq += 1;
                    let line = format!("Q {seq:016x} {:016x}\n", monotonic_us());
                    lock(&outstanding).push_back((seq, Instant::now()));
                    writer.write_all(line.as_bytes())?;
                    sent.store(seq, Ordering::SeqCst);
                    next += interval;
                    // Late (starved): carry on from now rather than send a burst.
                    match next.checked_duration_since(Instant::now()) {
                        Some(wait) => std::thread::sleep(wait),
                        None => next = Instant::now(),
                    }
                }
                sending.store(false, Ordering::SeqCst);
                Ok(())
            })?
    };
    let mut report = RrReport {
        addr: o.addr.to_string(),
        ..RrReport::default()
    };
    let mut total_wait = 0.0f64;
    // Whether the last answer belonged to the stall `report.stalls` ends with.
    let mut in_stall = false;
    let reader_conn = conn.try_clone()?;
    reader_conn.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut lines = BufReader::new(reader_conn);
    let mut line = String::new();
    let mut stopped_at: Option<Instant> = None;
    loop {
        if !sending.load(Ordering::SeqCst) {
            let at = *stopped_at.get_or_insert_with(Instant::now);
            if lock(&outstanding).is_empty() || at.elapsed() > GRACE {
                break;
            }
        }
        match lines.read_line(&mut line) {
            Ok(0) => {
                report.broken = true;
                break;
            }
            Ok(_) if !line.ends_with('\n') => continue,
            Ok(_) => {}
            // What was read of a line stays in `line`; the next read completes it.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => {
                report.broken = true;
                break;
            }
        }
        let answer = parse_answer(line.trim_end());
        line.clear();
        let Some((seq, _, _)) = answer else {
            report.malformed += 1;
            continue;
        };
        let now = Instant::now();
        let mut q = lock(&outstanding);
        let sent_at = match q.front() {
            Some(&(front, at)) if front == seq => {
                q.pop_front();
                at
            }
            _ => {
                report.out_of_order += 1;
                match q.iter().position(|&(s, _)| s == seq) {
                    Some(i) => q.remove(i).map(|(_, at)| at).unwrap_or(now),
                    None => continue,
                }
            }
        };
        drop(q);
        report.answers += 1;
        let wait_ms = now.duration_since(sent_at).as_secs_f64() * 1000.0;
        total_wait += wait_ms;
        if wait_ms > 50.0 {
            report.waits_over_50ms += 1;
            if in_stall {
                if let Some(last) = report.stalls.last_mut().filter(|l| wait_ms > l.1) {
                    *last = (realtime_us(), wait_ms);
                }
            } else if report.stalls.len() < MAX_STALLS {
                report.stalls.push((realtime_us(), wait_ms));
                in_stall = true;
            }
        } else {
            in_stall = false;
        }
        if wait_ms > report.longest_wait_ms {
            report.longest_wait_ms = wait_ms;
            report.longest_wait_end_us = monotonic_us();
        }
    }
    sending.store(false, Ordering::SeqCst);
    let send_result = sender
        .join()
        .map_err(|_| io::Error::other("sender thread panicked"))?;
    if send_result.is_err() {
        report.broken = true;
    }
    report.requests = sent.load(Ordering::SeqCst);
    report.unanswered = lock(&outstanding).len() as u64;
    report.duration_ms = started.elapsed().as_millis() as u64;
    report.mean_wait_ms = if report.answers > 0 {
        total_wait / report.answers as f64
    } else {
        0.0
    };
    match retransmissions(&conn) {
        Ok((total, dsack)) => {
            report.retransmits = total;
            // Without the duplicate count every retransmission counts as needed.
            report.spurious_retransmits = dsack.unwrap_or(0);
            report.lost_segments = total.saturating_sub(report.spurious_retransmits);
        }
        Err(_) => {
            report.retransmits = u64::MAX;
            report.lost_segments = u64::MAX;
        }
    }
    let _ = conn.shutdown(std::net::Shutdown::Both);
    Ok(report)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_info_offsets_match_the_kernels_struct() {
        // libc's struct names total_retrans: its offset must be the one read by hand.
        // SAFETY: tcp_info is plain old data; all-zero is valid.
        let info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let base = &info as *const libc::tcp_info as usize;
        let at = &info.tcpi_total_retrans as *const u32 as usize - base;
        assert_eq!(at, 100);
    }

    #[test]
    fn lines_parse_strictly() {
        assert_eq!(
            parse_request("Q 0000000000000001 00000000000003e8"),
            Some((1, 1000))
        );
        assert_eq!(parse_request("Q 1 2 3"), None);
        assert_eq!(parse_request("A 1 2"), None);
        assert_eq!(parse_request("Q zz 2"), None);
        assert_eq!(parse_answer("A 2 3 4"), Some((2, 3, 4)));
        assert_eq!(parse_answer("A 2 3"), None);
    }

    #[test]
    fn the_service_answers_every_request_and_counts_gaps() {
        let services = Arc::new(Services::new().expect("services"));
        let addr = start(0, services.clone()).expect("start");
        let addr = SocketAddr::from(([127, 0, 0, 1], addr.port()));
        let report = run(&RrOptions {
            addr,
            interval: Duration::from_millis(1),
            duration: Duration::from_millis(300),
            connect_timeout: Duration::from_secs(2),
            stop_file: None,
        })
        .expect("run");
        assert!(report.ok(), "{report:?}");
        assert!(report.requests > 50, "{report:?}");
        assert_eq!(report.retransmits, 0, "loopback loses nothing");
        assert_eq!(report.lost_segments, 0);
        let rr = &services.rr;
        assert_eq!(rr.requests.load(Ordering::Relaxed), report.requests);
        assert_eq!(rr.lost.load(Ordering::Relaxed), 0);
        assert_eq!(rr.repeated.load(Ordering::Relaxed), 0);

        // A client that skips and repeats numbers is caught by the service.
        let mut c = TcpStream::connect(addr).expect("connect");
        c.write_all(
            b"Q 0000000000000001 0\nQ 0000000000000004 0\nQ 0000000000000002 0\nnonsense\n",
        )
        .expect("write");
        let mut lines = BufReader::new(c.try_clone().expect("clone"));
        let mut l = String::new();
        for want in [1u64, 4, 2] {
            l.clear();
            lines.read_line(&mut l).expect("answer");
            assert_eq!(parse_answer(l.trim_end()).map(|a| a.0), Some(want));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while rr.malformed.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            rr.lost.load(Ordering::Relaxed),
            2,
            "3 and 2 skipped at first"
        );
        assert_eq!(rr.repeated.load(Ordering::Relaxed), 1, "2 came after 4");
        assert_eq!(rr.malformed.load(Ordering::Relaxed), 1);
    }
}
