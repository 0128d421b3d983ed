//! The serve port's line protocol: record, hello, echo and stats lines, and their checksums.
//!
//! Every line is ASCII and ends with `\n`. Server to client:
//!
//! - `H tern-guest <version> boot=<boot_id> stream=<id:08x> period_ms=<n>` once, first.
//! - `R <seq:016x> <guest_us:016x> <stream:08x> <sum:08x>` every `period_ms`: `seq` starts at 1
//!   and grows by exactly 1 per record of a stream; `guest_us` is the guest's monotonic clock;
//!   `sum` is FNV-1a 32 of the line text before ` <sum>`.
//! - `E <line>` echoes each line the client sent that is not a command.
//! - `S <json>` answers `STATS` with the guest's counters (see [`crate::services::Services`]).
//! - `C <text>` answers `CPUINFO` with the guest's /proc/cpuinfo, `\` and line ends escaped
//!   ([`escape_text`]), so tests see the CPU features the guest kernel found.
//!
//! Client to server: `STATS`, `CPUINFO`, `QUIT` (server closes), anything else is echoed (the
//! client sends `PING <n> <client_us>` and times the echo).

/// The serve port tern's tests and lab use.
pub const DEFAULT_PORT: u16 = 7000;
/// Interval between two records of a stream.
pub const RECORD_PERIOD_MS: u64 = 10;

/// FNV-1a, 32 bits: cheap, dependency-free, catches any flipped byte in a short line.
pub fn fnv1a32(data: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in data {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// FNV-1a, 64 bits (disk journal records).
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// One stream record, as sent and as parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub guest_us: u64,
    pub stream: u32,
}

impl Record {
    /// The record's line, `\n` included.
    pub fn to_line(&self) -> String {
        let body = format!(
            "R {:016x} {:016x} {:08x}",
            self.seq, self.guest_us, self.stream
        );
        let sum = fnv1a32(body.as_bytes());
        format!("{body} {sum:08x}\n")
    }
}

/// The hello line the server sends first on each connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub boot_id: String,
    pub stream: u32,
    pub period_ms: u64,
}

impl Hello {
    /// The hello's line, `\n` included.
    pub fn to_line(&self) -> String {
        format!(
            "H tern-guest {} boot={} stream={:08x} period_ms={}\n",
            env!("CARGO_PKG_VERSION"),
            self.boot_id,
            self.stream,
            self.period_ms
        )
    }
}

/// A line the client received, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerLine {
    Hello(Hello),
    Record(Record),
    /// A record line whose checksum or layout is wrong.
    Corrupt(String),
    Echo(String),
    Stats(String),
    /// The guest's /proc/cpuinfo, unescaped.
    Cpuinfo(String),
    Unknown(String),
}

/// Escapes text onto one protocol line: `\` → `\\`, newline → `\n`, CR → `\r`.
pub fn escape_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 16);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

/// Undoes [`escape_text`].
pub fn unescape_text(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// Classifies one received line (without its `\n`).
pub fn parse_server_line(line: &str) -> ServerLine {
    if let Some(rest) = line.strip_prefix("R ") {
        return parse_record(line, rest).unwrap_or_else(|| ServerLine::Corrupt(line.to_string()));
    }
    if let Some(rest) = line.strip_prefix("E ") {
        return ServerLine::Echo(rest.to_string());
    }
    if let Some(rest) = line.strip_prefix("S ") {
        return ServerLine::Stats(rest.to_string());
    }
    if let Some(rest) = line.strip_prefix("C ") {
        return ServerLine::Cpuinfo(unescape_text(rest));
    }
    if line.starts_with("H ") {
        if let Some(h) = parse_hello(line) {
            return ServerLine::Hello(h);
        }
    }
    ServerLine::Unknown(line.to_string())
}

fn parse_record(line: &str, rest: &str) -> Option<ServerLine> {
    let fields: Vec<&str> = rest.split(' ').collect();
    if fields.len() != 4 || fields[0].len() != 16 || fields[1].len() != 16 {
        return None;
    }
    let body_len = line.len().checked_sub(9)?;
    let sum = u32::from_str_radix(fields[3], 16).ok()?;
    if fnv1a32(line.as_bytes().get(..body_len)?) != sum {
        return None;
    }
    Some(ServerLine::Record(Record {
        seq: u64::from_str_radix(fields[0], 16).ok()?,
        guest_us: u64::from_str_radix(fields[1], 16).ok()?,
        stream: u32::from_str_radix(fields[2], 16).ok()?,
    }))
}

fn parse_hello(line: &str) -> Option<Hello> {
    let mut boot_id = None;
    let mut stream = None;
    let mut period_ms = None;
    for field in line.split(' ') {
        if let Some(v) = field.strip_prefix("boot=") {
            boot_id = Some(v.to_string());
        } else if let Some(v) = field.strip_prefix("stream=") {
            stream = u32::from_str_radix(v, 16).ok();
        } else if let Some(v) = field.strip_prefix("period_ms=") {
            period_ms = v.parse().ok();
        }
    }
    Some(Hello {
        boot_id: boot_id?,
        stream: stream?,
        period_ms: period_ms?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_detects_corruption() {
        let r = Record {
            seq: 42,
            guest_us: 123_456_789,
            stream: 7,
        };
        let line = r.to_line();
        assert!(line.ends_with('\n'));
        let text = line.trim_end();
        assert_eq!(parse_server_line(text), ServerLine::Record(r));
        // Flip one digit of the sequence number: the checksum must catch it.
        let bad = text.replacen("2a", "2b", 1);
        assert!(matches!(parse_server_line(&bad), ServerLine::Corrupt(_)));
        assert!(matches!(
            parse_server_line("R short"),
            ServerLine::Corrupt(_)
        ));
    }

    #[test]
    fn hello_echo_stats_parse() {
        let h = Hello {
            boot_id: "abc-def".into(),
            stream: 3,
            period_ms: 10,
        };
        assert_eq!(
            parse_server_line(h.to_line().trim_end()),
            ServerLine::Hello(h)
        );
        assert_eq!(
            parse_server_line("E PING 1 2"),
            ServerLine::Echo("PING 1 2".into())
        );
        assert_eq!(parse_server_line("S {}"), ServerLine::Stats("{}".into()));
        let cpuinfo = "processor\t: 0\nflags\t\t: fpu sse4_2\n\\odd\r\n";
        let line = format!("C {}", escape_text(cpuinfo));
        assert!(!line.contains('\n'));
        assert_eq!(
            parse_server_line(&line),
            ServerLine::Cpuinfo(cpuinfo.into())
        );
        assert_eq!(
            parse_server_line("what"),
            ServerLine::Unknown("what".into())
        );
    }

    #[test]
    fn fnv_reference_values() {
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
