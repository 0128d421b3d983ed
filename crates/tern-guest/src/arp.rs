//! `tern-guest arp`: clients that must resolve a guest's address afresh. From the lab's client
//! namespace it broadcasts an ARP request for the guest's IP every interval, as each new client
//! (or one whose entry expired) does before its first packet, and notes when each answer
//! arrives on CLOCK_REALTIME, the clock QEMU stamps its STOP and RESUME events with. The gaps
//! between answers show how soon a guest that moved is reachable again by such a client: the
//! broadcast must reach the host the guest now runs on, and the guest must answer from there.
//!
//! Raw `AF_PACKET` frames rather than the kernel's own resolution: the kernel would keep (and
//! reuse) an entry, and it retries on its own timers, which would hide the gap being measured.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::json::JsonObject;
use crate::rr::realtime_us;

/// EtherType of ARP.
const ETH_P_ARP: u16 = 0x0806;
/// A gap between two answers longer than this is listed.
pub const MIN_GAP: Duration = Duration::from_millis(10);
/// Most gaps a report lists.
pub const MAX_GAPS: usize = 64;
/// How long answers are awaited once the last request is sent.
const GRACE: Duration = Duration::from_millis(300);

/// How to run the prober.
#[derive(Debug, Clone)]
pub struct ArpOptions {
    /// The interface the requests leave by (the client namespace's `eth0` in the lab).
    pub iface: String,
    /// The address the requests are asked from (the interface's own).
    pub source: Ipv4Addr,
    /// The guest's address.
    pub target: Ipv4Addr,
    pub interval: Duration,
    pub duration: Duration,
    /// Ends the run early once this file exists.
    pub stop_file: Option<PathBuf>,
    /// Created once the first answer has come (for a caller to wait on).
    pub ready_file: Option<PathBuf>,
}

/// What the prober saw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ArpReport {
    pub target: String,
    pub requests: u64,
    pub replies: u64,
    /// Every MAC that answered for the target (one, unless two machines claim the address).
    pub macs: Vec<String>,
    /// Gaps over [`MIN_GAP`] between answers: (the last answer before, the first after),
    /// CLOCK_REALTIME µs, at most [`MAX_GAPS`].
    pub gaps: Vec<(u64, u64)>,
    pub longest_gap_ms: f64,
}

impl ArpReport {
    /// The guest answered, and only ever from one MAC.
    pub fn ok(&self) -> bool {
        self.replies > 0 && self.macs.len() == 1
    }

    pub fn to_json(&self) -> String {
        let macs: Vec<String> = self.macs.iter().map(|m| format!("\"{m}\"")).collect();
        let gaps: Vec<String> = self
            .gaps
            .iter()
            .map(|(a, b)| format!("[{a},{b}]"))
            .collect();
        JsonObject::new()
            .str("target", &self.target)
            .u64("requests", self.requests)
            .u64("replies", self.replies)
            .raw("macs", &format!("[{}]", macs.join(",")))
            .raw("gaps", &format!("[{}]", gaps.join(",")))
            .f64("longest_gap_ms", self.longest_gap_ms)
            .bool("ok", self.ok())
            .finish()
    }
}

/// An ARP request (who has `target`? tell `source` at `mac`), padded to Ethernet's minimum.
pub fn request_frame(mac: [u8; 6], source: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    // Ethernet, IPv4, 6-byte and 4-byte addresses, request.
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&source.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f.resize(60, 0);
    f
}

/// The MAC of an ARP reply from `target` to `source`, if `frame` is one.
pub fn reply_from(frame: &[u8], source: Ipv4Addr, target: Ipv4Addr) -> Option<[u8; 6]> {
    if frame.len() < 42 || frame[12..14] != ETH_P_ARP.to_be_bytes() {
        return None;
    }
    let arp = &frame[14..42];
    if arp[..8] != [0, 1, 0x08, 0, 6, 4, 0, 2]
        || arp[14..18] != target.octets()
        || arp[24..28] != source.octets()
    {
        return None;
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&arp[8..14]);
    Some(mac)
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A packet socket bound to `iface` for ARP frames, with its index and the interface's MAC.
fn open(iface: &str) -> io::Result<(OwnedFd, [u8; 6])> {
    let name = std::ffi::CString::new(iface).map_err(|_| io::Error::other("bad interface name"))?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::other(format!("no interface {iface:?} here")));
    }
    // SAFETY: socket(2) with constant arguments; the result is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(iface.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills the ifreq we own; the fd is open.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFHWADDR set the hardware-address member of the union.
    let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(hw.sa_data.iter()) {
        *d = *s as u8;
    }
    // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ARP.to_be();
    addr.sll_ifindex = index as i32;
    // SAFETY: `addr` is a valid sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 20_000,
    };
    // SAFETY: SO_RCVTIMEO takes the timeval we own, of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((fd, mac))
}

/// Runs the prober until `duration` is over or the stop file exists.
pub fn run(o: &ArpOptions) -> io::Result<ArpReport> {
    let (fd, mac) = open(&o.iface)?;
    let fd = Arc::new(fd);
    let frame = request_frame(mac, o.source, o.target);
    let sending = Arc::new(AtomicBool::new(true));
    let sent = Arc::new(AtomicU64::new(0));
    let sender = {
        let (fd, sending, sent) = (fd.clone(), sending.clone(), sent.clone());
        let (interval, duration, stop_file) = (o.interval, o.duration, o.stop_file.clone());
        std::thread::Builder::new()
            .name("arp-send".into())
            .spawn(move || {
                let start = Instant::now();
                let mut next = start;
                while start.elapsed() < duration && !stop_file.as_ref().is_some_and(|f| f.exists())
                {
                    // SAFETY: sends the frame we own on the bound socket.
                    let n = unsafe {
                        libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0)
                    };
                    if n > 0 {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    next += interval;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                sending.store(false, Ordering::Relaxed);
            })?
    };
    let mut report = ArpReport {
        target: o.target.to_string(),
        ..ArpReport::default()
    };
    let mut macs: Vec<[u8; 6]> = Vec::new();
    let mut last: Option<u64> = None;
    let mut stopped_at: Option<Instant> = None;
    let mut buf = [0u8; 2048];
    loop {
        if !sending.load(Ordering::Relaxed) {
            let at = *stopped_at.get_or_insert_with(Instant::now);
            if at.elapsed() > GRACE {
                break;
            }
        }
        // SAFETY: reads at most buf.len() bytes into the buffer we own.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
            ) {
                continue;
            }
            return Err(e);
        }
        let Some(from) = reply_from(&buf[..n as usize], o.source, o.target) else {
            continue;
        };
        let now = realtime_us();
        if report.replies == 0 {
            if let Some(ready) = &o.ready_file {
                std::fs::write(ready, b"")?;
            }
        }
        report.replies += 1;
        if !macs.contains(&from) {
            macs.push(from);
        }
        if let Some(prev) = last {
            let gap = now.saturating_sub(prev);
            report.longest_gap_ms = report.longest_gap_ms.max(gap as f64 / 1000.0);
            if gap > MIN_GAP.as_micros() as u64 && report.gaps.len() < MAX_GAPS {
                report.gaps.push((prev, now));
            }
        }
        last = Some(now);
    }
    let _ = sender.join();
    report.requests = sent.load(Ordering::Relaxed);
    report.macs = macs.into_iter().map(mac_text).collect();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_recognised_only_from_the_target_to_the_asker() {
        let mac = [0x02, 0, 0, 0, 0, 1];
        let guest = [0x52, 0x54, 0, 0x7e, 2, 1];
        let (me, target) = (Ipv4Addr::new(10, 78, 0, 2), Ipv4Addr::new(10, 78, 0, 120));
        let request = request_frame(mac, me, target);
        assert_eq!(request.len(), 60);
        assert_eq!(
            reply_from(&request, me, target),
            None,
            "a request is no reply"
        );
        // The reply the guest's kernel sends: its MAC and IP to ours.
        let mut reply = Vec::new();
        reply.extend_from_slice(&mac);
        reply.extend_from_slice(&guest);
        reply.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
        reply.extend_from_slice(&guest);
        reply.extend_from_slice(&target.octets());
        reply.extend_from_slice(&mac);
        reply.extend_from_slice(&me.octets());
        assert_eq!(reply_from(&reply, me, target), Some(guest));
        assert_eq!(mac_text(guest), "52:54:00:7e:02:01");
        // For another address, or to another asker: not ours.
        assert_eq!(reply_from(&reply, me, Ipv4Addr::new(10, 78, 0, 121)), None);
        assert_eq!(
            reply_from(&reply, Ipv4Addr::new(10, 78, 0, 3), target),
            None
        );
        assert_eq!(reply_from(&reply[..30], me, target), None, "truncated");
    }

    #[test]
    fn the_report_is_ok_only_with_answers_from_one_mac() {
        let mut r = ArpReport::default();
        assert!(!r.ok());
        r.replies = 3;
        r.macs = vec!["52:54:00:7e:02:01".into()];
        r.gaps = vec![(1, 2)];
        assert!(r.ok());
        assert!(r.to_json().contains("\"gaps\":[[1,2]]"), "{}", r.to_json());
        r.macs.push("52:54:00:7e:02:02".into());
        assert!(!r.ok(), "two machines answer for one address");
    }
}
