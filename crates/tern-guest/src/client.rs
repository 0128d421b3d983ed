//! The client side of the serve port: reads a guest's record stream for a while and proves
//! (or disproves) that it had no gap, reset, loss, duplicate or corruption.

use std::io::{self, BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::json::JsonObject;
use crate::proto::{parse_server_line, ServerLine};

/// How to run the client.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub addr: SocketAddr,
    pub duration: Duration,
    /// How long to keep trying the first connection.
    pub connect_timeout: Duration,
    /// Interval between `PING` lines (echo round trips).
    pub ping_interval: Duration,
    /// Ends the run early (with its report) once this file exists: a caller that cannot know
    /// how long it will need the stream gives a long `duration` and stops it when done.
    pub stop_file: Option<PathBuf>,
}

impl ClientOptions {
    /// Defaults: 5 s to connect, a ping every 100 ms.
    pub fn new(addr: SocketAddr, duration: Duration) -> Self {
        Self {
            addr,
            duration,
            connect_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_millis(100),
            stop_file: None,
        }
    }
}

/// What the client saw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientReport {
    pub addr: String,
    pub duration_ms: u64,
    pub records: u64,
    /// Longest time without a record (connection start to first record, between records, and
    /// last record to the end of the run), ms.
    pub longest_gap_ms: f64,
    /// Longest step of the guest's own clock between two consecutive records, ms.
    pub longest_guest_gap_ms: f64,
    /// Connections that failed or closed before the end (each followed by a reconnect).
    pub resets: u64,
    /// Sequence numbers skipped within a stream.
    pub missing: u64,
    /// Records whose sequence number was not above the previous one.
    pub duplicates: u64,
    /// Record lines with a bad checksum or layout.
    pub corrupt: u64,
    /// Distinct guest boot ids seen minus one (a reboot, or a second VM answering).
    pub boot_changes: u64,
    pub boot_id: String,
    pub streams: u64,
    pub pings_sent: u64,
    pub echoes: u64,
    pub longest_echo_rtt_ms: f64,
    pub first_seq: u64,
    pub last_seq: u64,
}

impl ClientReport {
    /// True when the stream was unbroken: records arrived, no reset, loss, duplicate or
    /// corruption, and the same guest boot answered throughout.
    pub fn ok(&self) -> bool {
        self.records > 0
            && self.resets == 0
            && self.missing == 0
            && self.duplicates == 0
            && self.corrupt == 0
            && self.boot_changes == 0
    }

    /// One JSON object.
    pub fn to_json(&self) -> String {
        JsonObject::new()
            .str("addr", &self.addr)
            .u64("duration_ms", self.duration_ms)
            .bool("ok", self.ok())
            .u64("records", self.records)
            .f64("longest_gap_ms", self.longest_gap_ms)
            .f64("longest_guest_gap_ms", self.longest_guest_gap_ms)
            .u64("resets", self.resets)
            .u64("missing", self.missing)
            .u64("duplicates", self.duplicates)
            .u64("corrupt", self.corrupt)
            .u64("boot_changes", self.boot_changes)
            .str("boot_id", &self.boot_id)
            .u64("streams", self.streams)
            .u64("pings_sent", self.pings_sent)
            .u64("echoes", self.echoes)
            .f64("longest_echo_rtt_ms", self.longest_echo_rtt_ms)
            .u64("first_seq", self.first_seq)
            .u64("last_seq", self.last_seq)
            .finish()
    }

    /// One human-readable line.
    pub fn to_text(&self) -> String {
        format!(
            "{} records={} longest_gap_ms={:.1} resets={} missing={} duplicates={} corrupt={} \
             boot_changes={} echoes={}/{} longest_echo_rtt_ms={:.1}",
            if self.ok() { "OK" } else { "BROKEN" },
            self.records,
            self.longest_gap_ms,
            self.resets,
            self.missing,
            self.duplicates,
            self.corrupt,
            self.boot_changes,
            self.echoes,
            self.pings_sent,
            self.longest_echo_rtt_ms
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Connects, retrying until `deadline`.
pub(crate) fn connect_until(addr: SocketAddr, deadline: Instant) -> io::Result<TcpStream> {
    loop {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10));
        match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(2))) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(io::Error::new(e.kind(), format!("connect {addr}: {e}")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    stream: Option<u32>,
    last_seq: Option<u64>,
    last_guest_us: Option<u64>,
    partial: Vec<u8>,
}

impl Conn {
    fn new(stream: TcpStream) -> io::Result<Self> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_millis(20)))?;
        let writer = stream.try_clone()?;
        Ok(Self {
            reader: BufReader::new(stream),
            writer,
            stream: None,
            last_seq: None,
            last_guest_us: None,
            partial: Vec::new(),
        })
    }
}

/// Outcome of one read attempt.
enum Read {
    Line(String),
    Nothing,
    Broken,
}

fn read_line(conn: &mut Conn) -> Read {
    match conn.reader.read_until(b'\n', &mut conn.partial) {
        Ok(0) => Read::Broken,
        Ok(_) if conn.partial.ends_with(b"\n") => {
            let line = String::from_utf8_lossy(&conn.partial)
                .trim_end()
                .to_string();
            conn.partial.clear();
            Read::Line(line)
        }
        // EOF in the middle of a line.
        Ok(_) => Read::Broken,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
            ) =>
        {
            Read::Nothing
        }
        Err(_) => Read::Broken,
    }
}

/// How often the stop file is looked for.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// Reads the stream for `options.duration` (or until the stop file appears); reconnects
/// (counting a reset) if it breaks.
/// Errors only when the first connection cannot be made.
pub fn run(options: &ClientOptions) -> io::Result<ClientReport> {
    let mut report = ClientReport {
        addr: options.addr.to_string(),
        ..ClientReport::default()
    };
    let mut conn = Conn::new(connect_until(
        options.addr,
        Instant::now() + options.connect_timeout,
    )?)?;
    let start = Instant::now();
    let mut end = start + options.duration;
    let mut last_record_at = start;
    let mut next_ping = start;
    let mut boot_ids: Vec<String> = Vec::new();
    let mut next_stop_check = start;
    while Instant::now() < end {
        if let Some(f) = &options.stop_file {
            let now = Instant::now();
            if now >= next_stop_check {
                if f.exists() {
                    end = now;
                    break;
                }
                next_stop_check = now + STOP_CHECK;
            }
        }
        if Instant::now() >= next_ping {
            let line = format!(
                "PING {} {}\n",
                report.pings_sent,
                start.elapsed().as_micros()
            );
            if conn.writer.write_all(line.as_bytes()).is_ok() {
                report.pings_sent += 1;
            }
            next_ping += options.ping_interval;
        }
        match read_line(&mut conn) {
            Read::Nothing => {}
            Read::Line(line) => {
                let now = Instant::now();
                match parse_server_line(&line) {
                    ServerLine::Hello(h) => {
                        if !boot_ids.contains(&h.boot_id) {
                            boot_ids.push(h.boot_id.clone());
                        }
                        report.boot_id = h.boot_id;
                        conn.stream = Some(h.stream);
                        report.streams += 1;
                    }
                    ServerLine::Record(r) => {
                        report.records += 1;
                        report.longest_gap_ms = report.longest_gap_ms.max(ms(now - last_record_at));
                        last_record_at = now;
                        if report.first_seq == 0 {
                            report.first_seq = r.seq;
                        }
                        report.last_seq = r.seq;
                        if conn.stream.is_some_and(|s| s != r.stream) {
                            // A record of another stream on this connection: corruption.
                            report.corrupt += 1;
                        }
                        match conn.last_seq {
                            Some(prev) if r.seq <= prev => report.duplicates += 1,
                            Some(prev) => report.missing += r.seq - prev - 1,
                            None => report.missing += r.seq - 1,
                        }
                        conn.last_seq = Some(conn.last_seq.map_or(r.seq, |p| p.max(r.seq)));
                        if let Some(prev) = conn.last_guest_us {
                            let step = r.guest_us.saturating_sub(prev) as f64 / 1000.0;
                            report.longest_guest_gap_ms = report.longest_guest_gap_ms.max(step);
                        }
                        conn.last_guest_us = Some(r.guest_us);
                    }
                    ServerLine::Corrupt(_) => report.corrupt += 1,
                    ServerLine::Echo(text) => {
                        let sent_us = text
                            .strip_prefix("PING ")
                            .and_then(|t| t.split(' ').nth(1))
                            .and_then(|t| t.parse::<u64>().ok());
                        if let Some(sent_us) = sent_us {
                            report.echoes += 1;
                            let rtt = start
                                .elapsed()
                                .as_micros()
                                .saturating_sub(u128::from(sent_us));
                            report.longest_echo_rtt_ms =
                                report.longest_echo_rtt_ms.max(rtt as f64 / 1000.0);
                        }
                    }
                    ServerLine::Stats(_) | ServerLine::Cpuinfo(_) | ServerLine::Unknown(_) => {}
                }
            }
            Read::Broken => {
                report.resets += 1;
                match connect_until(options.addr, end) {
                    Ok(s) => conn = Conn::new(s)?,
                    Err(_) => break,
                }
            }
        }
    }
    let _ = conn.writer.write_all(b"QUIT\n");
    report.longest_gap_ms = report
        .longest_gap_ms
        .max(ms(Instant::now().min(end) - last_record_at));
    report.boot_changes = boot_ids.len().saturating_sub(1) as u64;
    report.duration_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok(report)
}

/// Asks the guest for its stats; returns the JSON object text.
pub fn fetch_stats(addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    ask(addr, timeout, b"STATS\n", "stats", |l| match l {
        ServerLine::Stats(json) => Some(json),
        _ => None,
    })
}

/// Asks the guest for its /proc/cpuinfo; returns the text.
pub fn fetch_cpuinfo(addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    ask(addr, timeout, b"CPUINFO\n", "cpuinfo", |l| match l {
        ServerLine::Cpuinfo(text) => Some(text),
        _ => None,
    })
}

/// Sends one request line and waits for the reply `pick` accepts (records stream meanwhile).
fn ask(
    addr: SocketAddr,
    timeout: Duration,
    request: &[u8],
    what: &str,
    pick: impl Fn(ServerLine) -> Option<String>,
) -> io::Result<String> {
    let deadline = Instant::now() + timeout;
    let mut conn = Conn::new(connect_until(addr, deadline)?)?;
    conn.writer.write_all(request)?;
    while Instant::now() < deadline {
        match read_line(&mut conn) {
            Read::Line(line) => {
                if let Some(reply) = pick(parse_server_line(&line)) {
                    let _ = conn.writer.write_all(b"QUIT\n");
                    return Ok(reply);
                }
            }
            Read::Nothing => {}
            Read::Broken => {
                return Err(io::Error::new(
                    ErrorKind::ConnectionReset,
                    format!("{addr} closed before the {what} reply"),
                ))
            }
        }
    }
    Err(io::Error::new(
        ErrorKind::TimedOut,
        format!("no {what} reply from {addr} within {timeout:?}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::Services;
    use std::sync::Arc;

    #[test]
    fn client_sees_an_unbroken_stream_and_stats() {
        let services = Arc::new(Services::new().expect("services"));
        let bound = crate::serve::start(0, services).expect("serve");
        let addr = SocketAddr::from(([127, 0, 0, 1], bound.port()));
        let report = run(&ClientOptions::new(addr, Duration::from_millis(600))).expect("client");
        assert!(report.ok(), "{}", report.to_text());
        // 10 ms records for 600 ms: allow for a slow, loaded machine but demand a real stream.
        assert!(report.records >= 20, "{}", report.to_text());
        assert_eq!(report.first_seq, 1);
        assert_eq!(report.last_seq, report.records);
        assert!(report.echoes >= 1, "{}", report.to_text());
        let stats = fetch_stats(addr, Duration::from_secs(5)).expect("stats");
        assert!(stats.starts_with("{\"boot_id\":"), "{stats}");
        assert!(stats.contains("\"streams\":{\"open\":"), "{stats}");
        let cpuinfo = fetch_cpuinfo(addr, Duration::from_secs(5)).expect("cpuinfo");
        assert_eq!(
            cpuinfo,
            std::fs::read_to_string("/proc/cpuinfo").expect("read /proc/cpuinfo")
        );
    }

    #[test]
    fn a_stop_file_ends_a_long_run_early_with_its_report() {
        let services = Arc::new(Services::new().expect("services"));
        let bound = crate::serve::start(0, services).expect("serve");
        let addr = SocketAddr::from(([127, 0, 0, 1], bound.port()));
        let dir = std::env::temp_dir().join(format!("tern-client-stop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let stop = dir.join("stop");
        let _ = std::fs::remove_file(&stop);
        let mut options = ClientOptions::new(addr, Duration::from_secs(120));
        options.stop_file = Some(stop.clone());
        let client = std::thread::spawn(move || run(&options).expect("client"));
        // Stop once the client is connected: the k-th stats query counts k connections
        // (itself included), one more once the client's is in.
        let deadline = Instant::now() + Duration::from_secs(30);
        for k in 1u64.. {
            let stats = fetch_stats(addr, Duration::from_secs(5)).expect("stats");
            let total: u64 = stats
                .split("\"total\":")
                .nth(1)
                .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|t| t.parse().ok())
                .expect("streams.total in the stats");
            if total > k {
                break;
            }
            assert!(Instant::now() < deadline, "the client never connected");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::write(&stop, b"").expect("create the stop file");
        let report = client.join().expect("client thread");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(report.ok(), "{}", report.to_text());
        assert!(report.records >= 1, "{}", report.to_text());
        assert!(report.duration_ms < 60_000, "{}", report.to_text());
    }

    #[test]
    fn client_counts_a_reset() {
        // A server that sends three records, skipping seq 2, then drops the connection.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for conn in listener.incoming().take(1) {
                let mut conn = conn.expect("accept");
                let hello = crate::proto::Hello {
                    boot_id: "b".into(),
                    stream: 1,
                    period_ms: 10,
                };
                let mut text = hello.to_line();
                for seq in [1, 3, 3] {
                    text += &crate::proto::Record {
                        seq,
                        guest_us: seq * 10_000,
                        stream: 1,
                    }
                    .to_line();
                }
                conn.write_all(text.as_bytes()).expect("write");
            }
        });
        let report = run(&ClientOptions::new(addr, Duration::from_millis(300))).expect("client");
        assert!(!report.ok());
        assert_eq!(report.records, 3);
        assert_eq!(report.missing, 1);
        assert_eq!(report.duplicates, 1);
        assert!(report.resets >= 1);
    }
}
