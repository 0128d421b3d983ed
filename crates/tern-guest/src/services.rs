//! The services one tern-guest process runs, and the stats reply that reports them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::disk::DiskState;
use crate::json::JsonObject;
use crate::mem::MemCounters;

/// Watches its own loop for pauses: the longest interval between two wake-ups of a thread that
/// sleeps 5 ms shows a VM pause (as far as the guest clock sees it) or CPU starvation.
#[derive(Debug, Default)]
pub struct GapMonitor {
    longest_gap_us: AtomicU64,
    /// Guest uptime (monitor's clock, ms since start) at which the longest gap ended.
    longest_gap_end_ms: AtomicU64,
}

impl GapMonitor {
    const SLEEP: Duration = Duration::from_millis(5);

    /// Starts the monitor thread.
    pub fn start() -> std::io::Result<Arc<Self>> {
        let monitor = Arc::new(Self::default());
        let m = monitor.clone();
        std::thread::Builder::new()
            .name("gap".into())
            .spawn(move || {
                let start = Instant::now();
                let mut last = Instant::now();
                loop {
                    std::thread::sleep(Self::SLEEP);
                    let now = Instant::now();
                    let gap_us =
                        u64::try_from(now.duration_since(last).as_micros()).unwrap_or(u64::MAX);
                    if gap_us > m.longest_gap_us.load(Ordering::Relaxed) {
                        m.longest_gap_us.store(gap_us, Ordering::Relaxed);
                        let at = u64::try_from(now.duration_since(start).as_millis()).unwrap_or(0);
                        m.longest_gap_end_ms.store(at, Ordering::Relaxed);
                    }
                    last = now;
                }
            })?;
        Ok(monitor)
    }

    /// Longest interval between two wake-ups, in ms.
    pub fn longest_gap_ms(&self) -> f64 {
        self.longest_gap_us.load(Ordering::Relaxed) as f64 / 1000.0
    }
}

/// Connection counters of the serve port.
#[derive(Debug, Default)]
pub struct StreamCounters {
    pub open: AtomicU64,
    pub total: AtomicU64,
    /// Streams that ended with a write error (the peer vanished or reset).
    pub broken: AtomicU64,
}

/// Everything the stats reply reports.
#[derive(Debug)]
pub struct Services {
    pub started: Instant,
    pub boot_id: String,
    pub mem: Option<Arc<MemCounters>>,
    /// Journal device path and its counters.
    pub disk: Option<(String, Arc<DiskState>)>,
    pub burn_percent: Option<u32>,
    pub gap: Arc<GapMonitor>,
    pub streams: StreamCounters,
    /// The request/response port's counters ([`crate::rr`]).
    pub rr: crate::rr::RrCounters,
}

impl Services {
    /// Services with nothing running but the gap monitor.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            started: Instant::now(),
            boot_id: boot_id_string(),
            mem: None,
            disk: None,
            burn_percent: None,
            gap: GapMonitor::start()?,
            streams: StreamCounters::default(),
            rr: crate::rr::RrCounters::default(),
        })
    }

    /// The stats reply: one JSON object.
    ///
    /// `{"boot_id","uptime_ms","longest_gap_ms","streams":{"open","total","broken"},
    /// "rr":{connections,requests,lost,repeated,malformed},
    /// "mem":{mib,dirty_mib_s,pages,pages_verified,errors,passes,bytes_dirtied,filled}|null,
    /// "disk":{dev,verified,appended,errors,next_seq,capacity_records,full}|null,
    /// "burn_percent":n|null,"tcp":{ofo_queued,dsack_sent}|null}`
    pub fn stats_json(&self) -> String {
        let streams = JsonObject::new()
            .u64("open", self.streams.open.load(Ordering::Relaxed))
            .u64("total", self.streams.total.load(Ordering::Relaxed))
            .u64("broken", self.streams.broken.load(Ordering::Relaxed))
            .finish();
        let mut o = JsonObject::new()
            .str("boot_id", &self.boot_id)
            .u64(
                "uptime_ms",
                uptime_ms().unwrap_or_else(|| self.started.elapsed().as_millis() as u64),
            )
            .f64("longest_gap_ms", self.gap.longest_gap_ms())
            .raw("streams", &streams)
            .raw("rr", &self.rr.to_json());
        o = match tcp_counters() {
            Some(c) => o.raw(
                "tcp",
                &JsonObject::new()
                    .u64("ofo_queued", c.ofo_queued)
                    .u64("dsack_sent", c.dsack_sent)
                    .finish(),
            ),
            None => o.null("tcp"),
        };
        o = match &self.mem {
            Some(m) => o.raw("mem", &m.to_json()),
            None => o.null("mem"),
        };
        o = match &self.disk {
            Some((dev, d)) => o.raw("disk", &d.to_json(dev)),
            None => o.null("disk"),
        };
        o = match self.burn_percent {
            Some(p) => o.u64("burn_percent", u64::from(p)),
            None => o.null("burn_percent"),
        };
        o.finish()
    }
}

/// This kernel's TCP receive counters (`TcpExt` of /proc/net/netstat), all connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpCounters {
    /// Segments that arrived ahead of a missing one (`TCPOFOQueue`): each run of them means
    /// the guest saw a hole, a segment lost (or overtaken) on its way in.
    pub ofo_queued: u64,
    /// Duplicates the guest reported to their senders (`TCPDSACKOldSent` + `TCPDSACKOfoSent`).
    pub dsack_sent: u64,
}

/// Reads [`TcpCounters`], if /proc/net/netstat is there.
pub fn tcp_counters() -> Option<TcpCounters> {
    parse_tcp_counters(&std::fs::read_to_string("/proc/net/netstat").ok()?)
}

fn parse_tcp_counters(netstat: &str) -> Option<TcpCounters> {
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let get = |key: &str| {
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.parse::<u64>().ok())
    };
    Some(TcpCounters {
        ofo_queued: get("TCPOFOQueue")?,
        dsack_sent: get("TCPDSACKOldSent").unwrap_or(0) + get("TCPDSACKOfoSent").unwrap_or(0),
    })
}

/// Kernel uptime in ms (/proc/uptime), if readable.
pub fn uptime_ms() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some((secs * 1000.0) as u64)
}

/// This boot's id (the kernel's random boot_id), or a value derived from the clock.
pub fn boot_id_string() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            format!("t{:x}-{:x}", now.as_nanos(), std::process::id())
        })
}

/// The boot id as 16 bytes (hex digits of the uuid; FNV-derived for other forms).
pub fn boot_id_bytes(id: &str) -> [u8; 16] {
    let hex: String = id.chars().filter(char::is_ascii_hexdigit).collect();
    let mut out = [0u8; 16];
    if hex.len() == 32 {
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0);
        }
    } else {
        let h = crate::proto::fnv1a64(id.as_bytes()).to_le_bytes();
        out[..8].copy_from_slice(&h);
        out[8..].copy_from_slice(&h);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_receive_counters_are_read_from_netstat() {
        let text = "TcpExt: SyncookiesSent TCPOFOQueue TCPDSACKOldSent TCPDSACKOfoSent\n\
                    TcpExt: 0 7 3 1\n\
                    IpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(
            parse_tcp_counters(text),
            Some(TcpCounters {
                ofo_queued: 7,
                dsack_sent: 4
            })
        );
        assert_eq!(parse_tcp_counters("IpExt: a\nIpExt: 1\n"), None);
        assert_eq!(parse_tcp_counters("TcpExt: TCPOFOQueue\nTcpExt: x\n"), None);
    }
}
