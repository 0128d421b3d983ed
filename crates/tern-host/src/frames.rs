//! Frames a paused VM's QEMU left unread on its taps, and their delivery to the VM's QEMU on
//! another host: the part of a switchover that loses no frame sent to a migrating VM.
//!
//! While a guest is stopped its QEMU reads nothing from its taps: a frame that reaches the
//! source between the STOP and the moment the LAN is steered to the destination waits in the
//! source tap's queue and would die with the source QEMU (its sender then waits for TCP's
//! retransmit timer, ≥ 200 ms). After the final state is sent, the source agent reads that
//! queue through its own descriptor on it — QEMU's, duplicated with `pidfd_getfd(2)`, so it
//! works for QEMUs started before an agent restart too — and the destination agent writes the
//! frames, oldest first, into its tap's transmit path through a packet socket: a tap's
//! "transmit" is what its reader (QEMU) receives, and a frame sent there never crosses the
//! bridge, so no switch learns a wrong port from it.
//!
//! Order: frames steered to the destination since the steer already wait in its tap's queue
//! and are newer than everything handed over. The destination reads them out, then writes the
//! handed-over frames and its own back behind them, so the guest receives one queue in arrival
//! order ([`queue_first`]). A frame the bridge brings during that re-write lands among them;
//! the re-write goes through the tap's own transmit path, where a packet socket sees both in
//! the tap's order, and is done again with such a frame behind. (Linux's plug qdisc would hold
//! the bridge's frames instead, but not every kernel has it; this one has not.)
//!
//! QEMU itself keeps one frame from this: a QEMU whose guest is stopped still reads the next
//! frame from its tap, finds the guest cannot take it, and parks it in a queue of its own
//! (not migrated, lost with the source) before it stops reading. So the moment the source
//! pauses, its agent writes a [`plug_frame`] into each of the VM's taps: QEMU parks that one
//! instead, and the frames behind it stay in the tap's queue for the hand-over. The plug is
//! harmless wherever it ends up: a guest drops its unknown EtherType, and the hand-over
//! leaves it out.
//!
//! QEMU can still lose a frame or two at the pause, and the source names them from what it
//! recorded ([`TapRecorder`]: from the migration's start, a packet socket on each tap sees
//! every frame as it is queued for QEMU, plug included, since the plug goes through the tap's
//! transmit path like the bridge's frames), what its drain finds, and the guest's receive
//! ring ([`at_pause`]):
//! - QEMU can read a real frame before the plug lands (its main loop runs the moment the
//!   migration thread lets go of the guest, 40–1000 µs before the agent hears of the pause).
//!   The plug is then still queued, and the frame QEMU keeps is the one recorded just before
//!   the first frame still queued. It goes to the destination; a resuming source's QEMU
//!   delivers it itself.
//! - While QEMU stops the guest it waits for the vCPUs without its big lock, and its main loop
//!   may read a frame then; once the guest is stopped QEMU throws that frame away, and reads
//!   the next. That frame is the one read before the kept one (or before the plug), and it was
//!   lost exactly when the guest's ring ends with the frame read before it
//!   ([`dropped_at_pause`]). It goes to the destination, and back to a resuming source. The
//!   ring tells it by the last buffer's bytes (the frame's end, where it filled several), or,
//!   where the guest already took that buffer back and refilled its ring, by the lengths of
//!   its newest buffers against what QEMU read; where even those cannot tell, a plain TCP
//!   segment goes over all the same (a copy too many costs a duplicate ACK, one too few a
//!   resend), anything else only when known lost.
//!
//! Broadcast and multicast (what a bridge floods to every port): a destination's taps take no
//! floods from their creation until the steer, since the guest still runs at the source and
//! reads its own copies there. So what the source's taps queued after the pause goes over,
//! broadcasts included; and the ones both hosts got between the steer and the source's drain
//! reach the guest once (the commit drops the destination's copies: the run of broadcasts that
//! ends the handed frames and begins its own queue). Unicast to other MACs (flooded when a
//! bridge has not learned them) is not the guest's and is left out.
//!
//! Offloads: a frame whose checksum the sender left to the NIC, or a segment larger than the
//! MTU, is correct only with its virtio-net header, so the header travels with the frame and
//! the packet socket is given it back (`PACKET_VNET_HDR`; the kernel checks it). Headers are
//! little-endian, as on every host tern runs on (x86-64).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tern_api::migration::VnetHeader;
use tern_qemu::ReceiveRingTail;

/// `PACKET_VNET_HDR` and `PACKET_QDISC_BYPASS` from linux/if_packet.h (not exported by libc).
const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_QDISC_BYPASS: libc::c_int = 20;
/// `IFF_VNET_HDR` from linux/if_tun.h.
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// A virtio-net header's fixed part: what `PACKET_VNET_HDR` takes.
const VNET_HDR_LEN: usize = 10;
/// The largest frame a tap hands out (a 64 KiB GSO segment plus headers).
const MAX_FRAME: usize = 65_536 + 256;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("QEMU (pid {pid}) holds no queue of tap {tap}")]
    NoQueue { pid: u32, tap: String },
    #[error("interface {0:?} does not exist in the agent's network namespace")]
    NoInterface(String),
    #[error("{what} ({name}): {source}")]
    Sys {
        what: &'static str,
        name: String,
        #[source]
        source: std::io::Error,
    },
}

fn sys(what: &'static str, name: &str) -> FrameError {
    FrameError::Sys {
        what,
        name: name.to_string(),
        source: std::io::Error::last_os_error(),
    }
}

/// EtherType of the plug: IEEE 802 local experimental, which no guest stack handles.
const PLUG_ETHERTYPE: [u8; 2] = [0x88, 0xb5];
/// Source MAC of the plug (locally administered, never a VM's).
const PLUG_SOURCE: [u8; 6] = [0x02, 0x74, 0x65, 0x72, 0x6e, 0x00];

/// The frame written into a VM's taps when its guest pauses at the source, for QEMU to park
/// in place of a frame that matters (see the module docs). Each plug carries a fresh random
/// tag, so a source can tell its own plug from any other frame (one sent from outside that
/// merely looks like a plug included).
pub fn plug_frame(mac: [u8; 6]) -> Frame {
    let mut data = vec![0u8; 60];
    data[0..6].copy_from_slice(&mac);
    data[6..12].copy_from_slice(&PLUG_SOURCE);
    data[12..14].copy_from_slice(&PLUG_ETHERTYPE);
    data[14..34].copy_from_slice(b"tern switchover plug");
    data[34..50].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    Frame {
        header: VnetHeader::default(),
        data,
    }
}

/// One frame as a tap queued it for its reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: VnetHeader,
    /// From the destination MAC on.
    pub data: Vec<u8>,
}

impl Frame {
    /// The destination MAC, if the frame has an Ethernet header.
    pub fn destination(&self) -> Option<[u8; 6]> {
        self.data.get(..6)?.try_into().ok()
    }

    /// Broadcast or multicast: a bridge floods these to every port.
    pub fn is_flooded(&self) -> bool {
        self.destination().is_some_and(|d| d[0] & 1 == 1)
    }

    /// A TCP segment that carries no SYN, FIN or RST (data or a bare ACK), over IPv4 or IPv6
    /// (without extension headers), VLAN-tagged or not: a second copy of one costs its receiver
    /// a duplicate ACK and nothing else, as any duplicate the network makes.
    pub fn is_plain_tcp_segment(&self) -> bool {
        let d = &self.data;
        let mut at = 12;
        if d.get(at..at + 2) == Some(&[0x81, 0x00]) {
            at += 4;
        }
        let tcp = match d.get(at..at + 2) {
            Some([0x08, 0x00]) => {
                let ip = at + 2;
                let Some(&vihl) = d.get(ip) else { return false };
                let fragment = d
                    .get(ip + 6..ip + 8)
                    .is_some_and(|f| f[0] & 0x3f != 0 || f[1] != 0);
                if vihl >> 4 != 4 || d.get(ip + 9) != Some(&6) || fragment {
                    return false;
                }
                ip + usize::from(vihl & 0x0f) * 4
            }
            Some([0x86, 0xdd]) => {
                let ip = at + 2;
                if d.get(ip).map(|v| v >> 4) != Some(6) || d.get(ip + 6) != Some(&6) {
                    return false;
                }
                ip + 40
            }
            _ => return false,
        };
        // SYN 0x02, RST 0x04, FIN 0x01.
        d.get(tcp + 13).is_some_and(|flags| flags & 0x07 == 0)
    }

    /// A [`plug_frame`].
    pub fn is_plug(&self) -> bool {
        self.data
            .get(6..14)
            .is_some_and(|h| h[..6] == PLUG_SOURCE && h[6..] == PLUG_ETHERTYPE)
    }
}

fn parse_header(b: &[u8]) -> VnetHeader {
    let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    VnetHeader {
        flags: b[0],
        gso_type: b[1],
        hdr_len: u16_at(2),
        gso_size: u16_at(4),
        csum_start: u16_at(6),
        csum_offset: u16_at(8),
    }
}

fn header_bytes(h: &VnetHeader) -> [u8; VNET_HDR_LEN] {
    let mut b = [0u8; VNET_HDR_LEN];
    b[0] = h.flags;
    b[1] = h.gso_type;
    b[2..4].copy_from_slice(&h.hdr_len.to_le_bytes());
    b[4..6].copy_from_slice(&h.gso_size.to_le_bytes());
    b[6..8].copy_from_slice(&h.csum_start.to_le_bytes());
    b[8..10].copy_from_slice(&h.csum_offset.to_le_bytes());
    b
}

/// A descriptor on a tap's queue: reads what the tap queued for its reader.
pub struct TapQueue {
    fd: OwnedFd,
    tap: String,
    /// Bytes of virtio-net header before each frame (0: the tap has none).
    header_len: usize,
}

impl TapQueue {
    /// The queue of tap `tap` that process `pid` (a VM's QEMU) holds open: its descriptor,
    /// duplicated into this process. Found by the tap name the kernel shows in the
    /// descriptor's fdinfo (`iff:`).
    pub fn of_process(pid: u32, tap: &str) -> Result<TapQueue, FrameError> {
        let target = find_tap_fd(pid, tap)?;
        // SAFETY: pidfd_open(2) takes a pid and flags; the result is owned below.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0u32) };
        if pidfd < 0 {
            return Err(sys("pidfd_open", tap));
        }
        // SAFETY: `pidfd` is a fresh descriptor nobody else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
        // SAFETY: pidfd_getfd(2) with a pidfd we own and a descriptor number of that process;
        // the result is a new descriptor (close-on-exec) owned below.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0u32) };
        if fd < 0 {
            return Err(sys("pidfd_getfd", tap));
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        TapQueue::from_fd(fd, tap)
    }

    /// Wraps a descriptor already attached to tap `tap` (TUNSETIFF done).
    pub fn from_fd(fd: OwnedFd, tap: &str) -> Result<TapQueue, FrameError> {
        // SAFETY: ifreq is plain old data; all-zero is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF fills the ifreq we own; the fd is open.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut req) } < 0 {
            return Err(sys("TUNGETIFF", tap));
        }
        // SAFETY: TUNGETIFF set the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        let header_len = if flags & IFF_VNET_HDR != 0 {
            let mut size: libc::c_int = 0;
            // SAFETY: TUNGETVNETHDRSZ writes one int we own.
            if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETVNETHDRSZ, &mut size) } < 0 {
                return Err(sys("TUNGETVNETHDRSZ", tap));
            }
            usize::try_from(size)
                .unwrap_or(VNET_HDR_LEN)
                .max(VNET_HDR_LEN)
        } else {
            0
        };
        Ok(TapQueue {
            fd,
            tap: tap.to_string(),
            header_len,
        })
    }

    /// Whether a frame is queued now.
    pub fn has_frames(&self) -> Result<bool, FrameError> {
        self.ready()
    }

    fn ready(&self) -> Result<bool, FrameError> {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own, zero timeout.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        if n < 0 {
            return Err(sys("poll", &self.tap));
        }
        Ok(n > 0 && p.revents & libc::POLLIN != 0)
    }

    /// Takes every frame queued now, oldest first (never waits). Only call it while the
    /// queue's other reader (QEMU) does not read: while its guest is stopped.
    pub fn drain(&self) -> Result<Vec<Frame>, FrameError> {
        let mut frames = Vec::new();
        let mut buf = vec![0u8; MAX_FRAME + self.header_len];
        while self.ready()? {
            // SAFETY: reads at most buf.len() bytes into the buffer we own.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    break;
                }
                return Err(FrameError::Sys {
                    what: "reading the tap queue",
                    name: self.tap.clone(),
                    source: e,
                });
            }
            let n = n as usize;
            if n < self.header_len {
                continue;
            }
            let header = if self.header_len > 0 {
                parse_header(&buf[..VNET_HDR_LEN])
            } else {
                VnetHeader::default()
            };
            frames.push(Frame {
                header,
                data: buf[self.header_len..n].to_vec(),
            });
        }
        Ok(frames)
    }
}

/// The descriptor number under which `pid` holds tap `tap`.
fn find_tap_fd(pid: u32, tap: &str) -> Result<i32, FrameError> {
    let dir = format!("/proc/{pid}/fdinfo");
    let entries = std::fs::read_dir(&dir).map_err(|e| FrameError::Sys {
        what: "listing descriptors",
        name: dir.clone(),
        source: e,
    })?;
    let wanted = format!("iff:\t{tap}");
    for entry in entries.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // A descriptor closed meanwhile is simply not it.
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if info.lines().any(|l| l == wanted) {
            return Ok(fd);
        }
    }
    Err(FrameError::NoQueue {
        pid,
        tap: tap.to_string(),
    })
}

/// An `AF_PACKET` socket whose close happens on a background thread. Closing a packet socket
/// waits for a kernel RCU grace period (`synchronize_net` in `packet_release`): measured at
/// 8–24 ms on the lab machine, which on the switchover path (a plug, the RARP, handed-over
/// frames) is the guest's pause, and which would block an async worker besides.
pub struct PacketSocket(Option<OwnedFd>);

impl PacketSocket {
    /// A raw packet socket that receives nothing (protocol 0): for sending only.
    pub fn for_sending() -> std::io::Result<PacketSocket> {
        // SAFETY: plain socket(2) call; the returned descriptor is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(PacketSocket(Some(unsafe { OwnedFd::from_raw_fd(fd) })))
    }
}

impl AsRawFd for PacketSocket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_ref().map_or(-1, |fd| fd.as_raw_fd())
    }
}

impl Drop for PacketSocket {
    fn drop(&mut self) {
        if let Some(fd) = self.0.take() {
            close_later(fd);
        }
    }
}

/// Hands `fd` to the one thread that closes packet sockets (started on first use); closes it
/// here if that thread cannot be had.
fn close_later(fd: OwnedFd) {
    static CLOSER: std::sync::OnceLock<Option<std::sync::Mutex<std::sync::mpsc::Sender<OwnedFd>>>> =
        std::sync::OnceLock::new();
    let closer = CLOSER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<OwnedFd>();
        std::thread::Builder::new()
            .name("packet-close".into())
            .spawn(move || {
                for fd in rx {
                    drop(fd);
                }
            })
            .ok()
            .map(|_| std::sync::Mutex::new(tx))
    });
    if let Some(tx) = closer {
        let tx = tx.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(std::sync::mpsc::SendError(fd)) = tx.send(fd) {
            drop(fd);
        }
    }
}

/// Sets the packet-socket option `option` (an int flag) to 1.
fn switch_on(
    sock: &PacketSocket,
    option: libc::c_int,
    name: &'static str,
    tap: &str,
) -> Result<(), FrameError> {
    if !set_int(sock, libc::SOL_PACKET, option, 1) {
        return Err(sys(name, tap));
    }
    Ok(())
}

/// Sets the int-valued socket option `option` of `level` on `sock`; whether the kernel took it
/// (its error is left in errno).
fn set_int(
    sock: &PacketSocket,
    level: libc::c_int,
    option: libc::c_int,
    value: libc::c_int,
) -> bool {
    // SAFETY: the option takes an int we own, of the size passed; the socket is open.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// A packet socket bound to a tap, for writing frames into its transmit path: its reader (the
/// VM's QEMU) receives them as if the bridge had forwarded them, and no bridge or switch sees
/// them. Opened ahead of time where the write is urgent (binding can take milliseconds).
pub struct TapWriter {
    sock: PacketSocket,
    tap: String,
}

impl TapWriter {
    /// A writer whose frames go straight into the tap's queue (see [`TapWriter`]).
    pub fn open(tap: &str) -> Result<TapWriter, FrameError> {
        TapWriter::open_with(tap, true)
    }

    /// A writer whose frames take the path the bridge's frames take (the tap's qdisc, then its
    /// queue; a tap never holds frames in its qdisc), so that a [`TapRecorder`] sees them in
    /// their place among the bridge's: for the source's plug, and [`queue_first`].
    pub fn open_recorded(tap: &str) -> Result<TapWriter, FrameError> {
        TapWriter::open_with(tap, false)
    }

    fn open_with(tap: &str, bypass_qdisc: bool) -> Result<TapWriter, FrameError> {
        let index = if_index(tap)?;
        let sock = PacketSocket::for_sending().map_err(|_| sys("opening a packet socket", tap))?;
        switch_on(&sock, PACKET_VNET_HDR, "PACKET_VNET_HDR", tap)?;
        // Straight into the tap's queue, not through its qdisc: the frame is queued when
        // `send` returns, and ahead of anything the bridge forwarded that still waits in the
        // qdisc (handed-over frames are older).
        if bypass_qdisc {
            switch_on(&sock, PACKET_QDISC_BYPASS, "PACKET_QDISC_BYPASS", tap)?;
        }
        bind_to(&sock, index, 0, tap)?;
        Ok(TapWriter {
            sock,
            tap: tap.to_string(),
        })
    }

    /// Writes `frames` in order; returns how many the kernel took (a frame it refuses, for a
    /// header that does not fit it, does not stop the others).
    pub fn write(&self, frames: &[Frame]) -> usize {
        let mut sent = 0;
        let mut buf = Vec::with_capacity(VNET_HDR_LEN + 1600);
        for f in frames {
            buf.clear();
            buf.extend_from_slice(&header_bytes(&f.header));
            buf.extend_from_slice(&f.data);
            // SAFETY: sends buf.len() bytes of the buffer we own on the bound socket.
            let n = unsafe { libc::send(self.sock.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                tracing::warn!(tap = %self.tap, error = %std::io::Error::last_os_error(), "a frame was refused");
                continue;
            }
            sent += 1;
        }
        sent
    }
}

/// The interface index of `tap` in this network namespace.
fn if_index(tap: &str) -> Result<u32, FrameError> {
    crate::steer::ifindex(tap).map_err(|_| FrameError::NoInterface(tap.into()))
}

/// Binds packet socket `sock` to interface `index`, receiving frames of EtherType `protocol`
/// (network order; 0: none).
fn bind_to(sock: &PacketSocket, index: u32, protocol: u16, tap: &str) -> Result<(), FrameError> {
    // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = index as i32;
    // SAFETY: `addr` is a valid sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(sys("binding a packet socket", tap));
    }
    Ok(())
}

/// The most frames, and frame bytes, a [`TapRecorder`] keeps: far more than a tap's queue holds
/// while its guest is paused, which is what the recording must reach back over.
const MAX_RECORDED_FRAMES: usize = 4096;
const MAX_RECORDED_BYTES: usize = 16 << 20;

/// How often a [`TapRecorder`] moves what its socket holds into the recording.
const RECORDER_READS_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

/// What the LAN gave one tap during a migration, newest last, as the kernel queued it for the
/// tap's reader: a packet socket on the tap that takes only the frames the tap transmits
/// (those its reader, QEMU, receives), read by a task as they come. Used by a source to name
/// the frames QEMU kept or dropped at the pause ([`at_pause`]). Dropping it ends the task.
pub struct TapRecorder {
    recorded: std::sync::Arc<Recorded>,
    task: tokio::task::JoinHandle<()>,
}

struct Recorded {
    sock: PacketSocket,
    tap: String,
    header_len: usize,
    frames: std::sync::Mutex<(std::collections::VecDeque<Frame>, usize)>,
}

impl TapRecorder {
    /// Starts recording tap `tap` (within a tokio runtime).
    pub fn start(tap: &str) -> Result<TapRecorder, FrameError> {
        let recorded = std::sync::Arc::new(Recorded::open(tap)?);
        // Read in batches, not on each frame's arrival: a migrating guest under a stream of
        // ACKs would otherwise wake the agent tens of thousands of times a second, on a host
        // whose cores the migration itself needs (measured: a 1 Gbit/s compressed migration
        // took 5.7–10.1 s instead of 3.2–4.2 s).
        let r = recorded.clone();
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(RECORDER_READS_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                r.read_pending();
            }
        });
        Ok(TapRecorder { recorded, task })
    }

    /// Calls `f` with every frame recorded so far, oldest first (within the recorder's
    /// limits), without copying them: it runs on the switchover's path.
    pub fn with_recorded<R>(&self, f: impl FnOnce(&[Frame]) -> R) -> R {
        self.recorded.read_pending();
        let mut frames = self
            .recorded
            .frames
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        f(frames.0.make_contiguous())
    }
}

impl Drop for TapRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorded {
    /// Starts recording what tap `tap` transmits; frames are read by [`Recorded::read_pending`].
    fn open(tap: &str) -> Result<Recorded, FrameError> {
        let index = if_index(tap)?;
        // Protocol 0 until bound: a socket that took every EtherType from its creation would
        // see every interface's frames until the bind.
        let sock = PacketSocket::for_sending().map_err(|_| sys("opening a packet socket", tap))?;
        switch_on(&sock, PACKET_VNET_HDR, "PACKET_VNET_HDR", tap)?;
        only_transmitted(&sock, tap)?;
        // Room for what comes between two reads (best effort: the kernel caps a plain
        // SO_RCVBUF; only root may force more). Frames beyond it are dropped by the kernel,
        // and a recording with a gap names nothing ([`at_pause`]).
        set_int(&sock, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 16 << 20);
        bind_to(&sock, index, (libc::ETH_P_ALL as u16).to_be(), tap)?;
        Ok(Recorded {
            sock,
            tap: tap.to_string(),
            header_len: VNET_HDR_LEN,
            frames: std::sync::Mutex::new((std::collections::VecDeque::new(), 0)),
        })
    }

    /// Waits up to `timeout` for a frame to reach the socket; whether one did.
    fn wait(&self, timeout: std::time::Duration) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let ms = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: polls one descriptor we own, through a slice that outlives the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
        n > 0
    }

    /// Every frame recorded since the last take, oldest first.
    fn take(&self) -> Vec<Frame> {
        self.read_pending();
        let mut frames = self.frames.lock().unwrap_or_else(|p| p.into_inner());
        frames.1 = 0;
        std::mem::take(&mut frames.0).into()
    }

    /// Moves every frame the socket holds into the recording. Reads under the recording's
    /// lock, so frames keep their order whoever reads.
    fn read_pending(&self) {
        let mut frames = self.frames.lock().unwrap_or_else(|p| p.into_inner());
        let mut buf = vec![0u8; MAX_FRAME + self.header_len];
        loop {
            // SAFETY: reads at most buf.len() bytes into the buffer we own.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    tracing::warn!(tap = %self.tap, error = %e, "recording the tap's frames");
                }
                return;
            }
            let n = n as usize;
            if n < self.header_len {
                continue;
            }
            // A full recording gives its oldest frame's buffer to the newest.
            let mut data = if frames.0.len() >= MAX_RECORDED_FRAMES {
                frames.0.pop_front().map(|old| old.data).unwrap_or_default()
            } else {
                Vec::new()
            };
            frames.1 -= data.len();
            data.clear();
            data.extend_from_slice(&buf[self.header_len..n]);
            let frame = Frame {
                header: parse_header(&buf[..VNET_HDR_LEN]),
                data,
            };
            frames.1 += frame.data.len();
            frames.0.push_back(frame);
            while frames.0.len() > MAX_RECORDED_FRAMES || frames.1 > MAX_RECORDED_BYTES {
                match frames.0.pop_front() {
                    Some(old) => frames.1 -= old.data.len(),
                    None => break,
                }
            }
        }
    }
}

/// A classic BPF program on `sock` that keeps only the frames the interface transmits
/// (`PACKET_OUTGOING`): for a tap, what its reader receives. A guest's own traffic (the tap
/// receives it from QEMU) is never copied to the recorder.
fn only_transmitted(sock: &PacketSocket, tap: &str) -> Result<(), FrameError> {
    const SKF_AD_PKTTYPE: u32 = 0xffff_f000 + 4; // SKF_AD_OFF + SKF_AD_PKTTYPE
    const PACKET_OUTGOING: u32 = 4;
    let mut program = [
        // A = skb->pkt_type
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: SKF_AD_PKTTYPE,
        },
        // if A == PACKET_OUTGOING: keep it whole, else drop it
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: PACKET_OUTGOING,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: u32::MAX,
        },
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
    ];
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: the option takes a sock_fprog pointing at `program`, both alive across the call
    // (the kernel copies the program).
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(sys("SO_ATTACH_FILTER", tap));
    }
    Ok(())
}

/// What a source's QEMU did with the last frames it read off a tap around the pause, as the
/// tap's recording and its queue after the pause tell it ([`at_pause`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AtPause {
    /// The frame QEMU read after the pause and keeps (never delivered; a resuming QEMU
    /// delivers it); None when it kept the plug.
    pub kept: Option<Frame>,
    /// The frame QEMU read just before the one it keeps. If it read it while the guest was
    /// being stopped, it dropped it (see the module docs); else the guest has it.
    pub last_read: Option<Frame>,
    /// The frame QEMU read before `last_read`: the guest's newest if `last_read` was dropped.
    pub read_before: Option<Frame>,
    /// The newest frames QEMU read, `last_read` last (at most [`READ_HISTORY`]): each one's
    /// length and destination, to match against the lengths the guest's ring took.
    pub read: Vec<(usize, [u8; 6])>,
}

/// How many of the frames a QEMU read before the pause [`AtPause::read`] keeps.
pub const READ_HISTORY: usize = 64;

/// The fewest ring entries a length match needs before it names a frame.
const MIN_LENGTH_MATCH: usize = 8;

/// The largest frame that always fits one receive buffer (a Linux guest's smallest merged
/// buffer takes a full 1500-byte MTU frame and its header).
const ONE_BUFFER_FRAME: usize = 1514;

/// The last frames a source's QEMU read off a tap, and the one it keeps (see the module docs):
/// `drained` is the tap's queue as the source's drain found it, `plug` the plug this source
/// wrote, `recorded` what the tap was given, oldest first ([`TapRecorder`]).
///
/// A plug still queued means QEMU kept something else before reaching it: the last frame it
/// read, which the recording holds right before the first frame still queued. A plug gone
/// means QEMU kept the plug, and read everything recorded before it.
///
/// None if the recording does not agree with the queue (frames it missed, or a race that put
/// the plug out of its place): nothing is then named, so nothing is ever delivered twice.
pub fn at_pause(recorded: &[Frame], plug: &Frame, drained: &[Frame]) -> Option<AtPause> {
    let at = recorded.iter().rposition(|f| f.data == plug.data)?;
    let agree = |recorded: &[Frame], queued: &[Frame]| {
        recorded.len() >= queued.len() && recorded.iter().zip(queued).all(|(r, d)| r.data == d.data)
    };
    let (first_unread, kept) = match drained.iter().position(|f| f.data == plug.data) {
        Some(queued_before) => {
            let first_unread = at.checked_sub(queued_before)?;
            // The frames queued before and after the plug are those recorded around it.
            if !agree(&recorded[first_unread..at], &drained[..queued_before])
                || !agree(&recorded[at + 1..], &drained[queued_before + 1..])
            {
                return None;
            }
            let kept = recorded.get(first_unread.checked_sub(1)?)?;
            if kept.is_plug() {
                return None;
            }
            (first_unread - 1, Some(kept.clone()))
        }
        None => {
            if !agree(&recorded[at + 1..], drained) {
                return None;
            }
            (at, None)
        }
    };
    // `first_unread` now indexes the frame QEMU keeps (or the plug): what it read before.
    let read = |back: usize| {
        first_unread
            .checked_sub(back)
            .and_then(|i| recorded.get(i))
            .filter(|f| !f.is_plug())
            .cloned()
    };
    let read_all: Vec<(usize, [u8; 6])> = recorded[..first_unread]
        .iter()
        .filter(|f| !f.is_plug())
        .map(|f| (f.data.len(), f.destination().unwrap_or_default()))
        .collect();
    let history = read_all[read_all.len().saturating_sub(READ_HISTORY)..].to_vec();
    Some(AtPause {
        kept,
        last_read: read(1),
        read_before: read(2),
        read: history,
    })
}

/// The frame QEMU dropped at the pause, if the guest's receive ring shows it did: `ring` is
/// the ring's newest end (the used lengths of its last buffers, and the start of the last),
/// `mac` the NIC's address. If the ring ends with the frame read before `at.last_read`,
/// `last_read` never reached the guest; if it ends with `last_read` itself, or anything else,
/// nothing is named.
///
/// Where the last buffer's bytes are out of reach or hold neither frame (the guest took the
/// frame and refilled its ring, putting a fresh buffer where it was), the ring's used lengths
/// decide: they must match the lengths of what QEMU read up to the frame before `last_read`
/// and not up to `last_read` itself, over at least [`MIN_LENGTH_MATCH`] frames (those the NIC
/// takes: for its MAC, multicast and broadcast).
/// Where they cannot tell (frames of one length, as a stream of equal requests sends), a plain
/// TCP segment is named all the same: if the guest had it, the copy costs one duplicate ACK;
/// if not, its sender need not resend it. Anything else is named only when known lost, so the
/// guest never sees it twice.
pub fn dropped_at_pause(
    at: &AtPause,
    ring: &ReceiveRingTail,
    mac: [u8; 6],
) -> Option<DroppedAtPause> {
    let last_read = at.last_read.as_ref()?;
    let read_before = at.read_before.as_ref()?;
    let (has_before, has_last) = (
        ring_ends_with(ring, read_before),
        ring_ends_with(ring, last_read),
    );
    let (dropped, proof) = if has_before || has_last {
        (has_before && !has_last, DropProof::RingBytes)
    } else {
        match lengths_show(at, ring, mac) {
            Some(dropped) => (dropped, DropProof::RingLengths),
            None => (
                last_read.is_plain_tcp_segment() && last_read.destination() == Some(mac),
                DropProof::Presumed,
            ),
        }
    };
    dropped.then(|| DroppedAtPause {
        frame: last_read.clone(),
        proof,
    })
}

/// A frame [`dropped_at_pause`] names, and how it knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedAtPause {
    pub frame: Frame,
    pub proof: DropProof,
}

/// How the guest's receive ring showed a frame dropped at the pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropProof {
    /// Its last buffer ends with the frame read before the dropped one.
    RingBytes,
    /// Its newest used lengths match what QEMU read without the dropped one.
    RingLengths,
    /// It could not tell: a plain TCP segment is handed over all the same, and the guest may
    /// then get it twice (its TCP drops the copy and reports it in a duplicate ACK).
    Presumed,
}

/// Do the ring's used lengths show the guest missing QEMU's last read frame (see
/// [`dropped_at_pause`])? Some(true) if they fit what QEMU read without it and not with it,
/// Some(false) the other way round or when the NIC would not take it, None if they cannot
/// tell. Each frame the NIC takes, up to [`ONE_BUFFER_FRAME`] bytes, fills one buffer with its
/// 12-byte header.
fn lengths_show(at: &AtPause, ring: &ReceiveRingTail, mac: [u8; 6]) -> Option<bool> {
    let taken = |to: &[u8; 6]| *to == mac || to[0] & 1 == 1;
    // The last frame read must be one the NIC takes, else it was not the guest's anyway.
    match at.read.last() {
        Some((_, to)) if taken(to) => {}
        _ => return Some(false),
    }
    // Newest first, up to the first frame that might have filled more than one buffer.
    let read: Vec<u32> = at
        .read
        .iter()
        .rev()
        .filter(|(_, to)| taken(to))
        .take_while(|(len, _)| *len <= ONE_BUFFER_FRAME)
        .map(|(len, _)| (12 + len) as u32)
        .collect();
    let used: Vec<u32> = ring
        .used_lens
        .iter()
        .rev()
        .take_while(|l| **l != 0)
        .copied()
        .collect();
    let n = used.len().min(read.len().saturating_sub(1));
    if n < MIN_LENGTH_MATCH {
        return None;
    }
    let got_it = used[..n] == read[..n];
    let missed_it = used[..n] == read[1..=n];
    (got_it != missed_it).then_some(missed_it)
}

/// Does the guest's receive ring end with frame `f`? In one buffer, the frame follows the
/// virtio-net header (12 bytes with merged buffers or virtio 1.0, a merged header counting one
/// buffer; else 10). In several (merged buffers), the newest buffers' used lengths add up to
/// exactly the header and the frame, and the last buffer holds the frame's end.
fn ring_ends_with(ring: &ReceiveRingTail, f: &Frame) -> bool {
    let buffer = &ring.last_buffer;
    let in_one = [12usize, 10].iter().any(|&h| {
        let single = h == 10 || buffer.get(10..12) == Some(&[1, 0]);
        single && buffer.get(h..h + f.data.len()) == Some(f.data.as_slice())
    });
    if in_one {
        return true;
    }
    let total = 12 + f.data.len();
    let mut sum = 0usize;
    let mut buffers = 0usize;
    for len in ring.used_lens.iter().rev() {
        sum += *len as usize;
        buffers += 1;
        if sum >= total {
            break;
        }
    }
    let Some(&last) = ring.used_lens.last() else {
        return false;
    };
    let Some(start) = f.data.len().checked_sub(last as usize) else {
        return false;
    };
    let end = &f.data[start..];
    let seen = buffer.len().min(end.len());
    sum == total && buffers > 1 && seen > 0 && buffer[..seen] == end[..seen]
}

/// Writes `frames`, in order, into tap `tap`'s transmit path ([`TapWriter`]). Returns how
/// many the kernel took.
pub fn deliver(tap: &str, frames: &[Frame]) -> Result<usize, FrameError> {
    if frames.is_empty() {
        return Ok(0);
    }
    Ok(TapWriter::open(tap)?.write(frames))
}

/// Most times [`queue_first`] takes a tap's queue back to put behind its frames those the
/// bridge slipped among them: on a LAN that brings a frame faster than the queue is written
/// again, no number of tries settles it.
const MAX_REQUEUES: usize = 3;

/// What [`queue_first`] did on one tap.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueuedFirst {
    /// Frames the tap's queue held when it was first taken.
    pub held: usize,
    /// Frames the kernel took in the last write.
    pub written: usize,
    /// Times the queue was taken back because the bridge slipped frames among ours.
    pub requeued: usize,
    /// Whether the last write was seen in order: no frame of the bridge's ahead of ours.
    pub in_order: bool,
    /// Whether the tap's transmit path lost some of ours, so they went straight into the
    /// queue, unwatched.
    pub unwatched: bool,
}

/// How long [`queue_first`] waits for the last of our frames to pass the tap's qdisc, where
/// one is late (the qdisc queued it behind a frame another core is sending, or a shaper
/// held it): written again past that, it would reach the guest twice.
const WATCH_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// Puts frames at the head of tap `tap`'s queue, whose reader (a paused QEMU) reads nothing
/// meanwhile: takes what the queue holds, and writes back `order(held)` (the frames to go
/// first, then those held).
///
/// The bridge keeps forwarding to the tap all the while, and a frame it brings after the
/// queue was taken lands ahead of some of ours though it is newer (the guest's TCP would take
/// it out of order). So the writing goes through the tap's own transmit path, where a packet
/// socket sees our frames and the bridge's in the order the tap queued them; where the
/// bridge's came before our last, the queue is taken back and written again with them
/// behind, up to `MAX_REQUEUES` (3) times. Where the socket does not see all of ours (a tap
/// whose carrier came up moments ago may drop them on that path, without a word), they go
/// straight into the queue, unwatched.
pub fn queue_first(
    queue: &TapQueue,
    tap: &str,
    order: impl FnOnce(Vec<Frame>) -> Vec<Frame>,
) -> Result<QueuedFirst, FrameError> {
    let watch = Recorded::open(tap)?;
    let writer = TapWriter::open_recorded(tap)?;
    let mut taken = queue.drain()?;
    taken.retain(|f| !f.is_plug());
    let mut done = QueuedFirst {
        held: taken.len(),
        ..QueuedFirst::default()
    };
    let mut ours = order(taken.clone());
    loop {
        // What the bridge brought after the queue was taken is ahead of ours.
        let early = !not_in(watch.take(), &taken).is_empty();
        done.written = writer.write(&ours);
        let mut seen = watch.take();
        let mut verdict = look(&seen, &ours);
        let deadline = std::time::Instant::now() + WATCH_WAIT;
        while verdict.is_none() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || !watch.wait(left) {
                break;
            }
            seen.extend(watch.take());
            verdict = look(&seen, &ours);
        }
        match verdict {
            Some(slipped) if !(early || slipped) => {
                done.in_order = true;
                return Ok(done);
            }
            Some(_) if done.requeued < MAX_REQUEUES => {}
            Some(_) => return Ok(done),
            None => {
                done.unwatched = true;
                let mut all = ours.clone();
                all.extend(not_in(queue.drain()?, &ours));
                done.written = TapWriter::open(tap)?.write(&all);
                return Ok(done);
            }
        }
        taken = queue.drain()?;
        ours = ours_first(taken.clone(), &ours);
        done.requeued += 1;
    }
}

/// Counts of frames by their bytes.
fn tally<'a>(frames: impl IntoIterator<Item = &'a Frame>) -> HashMap<&'a [u8], usize> {
    let mut counts = HashMap::new();
    for f in frames {
        *counts.entry(f.data.as_slice()).or_insert(0) += 1;
    }
    counts
}

/// Takes one of `f` from `counts`; whether there was one.
fn take_one(counts: &mut HashMap<&[u8], usize>, f: &Frame) -> bool {
    match counts.get_mut(f.data.as_slice()) {
        Some(n) if *n > 0 => {
            *n -= 1;
            true
        }
        _ => false,
    }
}

/// What `recorded` (what the tap queued since the last look, in its order) says of `ours`,
/// just written: whether a frame of the bridge's came before the last of them; None where the
/// recording does not hold them all.
fn look(recorded: &[Frame], ours: &[Frame]) -> Option<bool> {
    let mut left = tally(ours);
    let mut missing = ours.len();
    let mut slipped = false;
    for f in recorded {
        if missing == 0 {
            break;
        }
        if take_one(&mut left, f) {
            missing -= 1;
        } else {
            slipped = true;
        }
    }
    (missing == 0).then_some(slipped)
}

/// The frames of `frames` that are not among `known` (each of `known` accounts for one), in
/// their order.
fn not_in(frames: Vec<Frame>, known: &[Frame]) -> Vec<Frame> {
    split_ours(frames, known).1
}

/// `queue` (a tap's queue taken back after `ours` were written) with `ours` first, in their
/// order, and the bridge's frames behind them, in theirs.
fn ours_first(queue: Vec<Frame>, ours: &[Frame]) -> Vec<Frame> {
    let (mut first, theirs) = split_ours(queue, ours);
    first.extend(theirs);
    first
}

/// `queue` split into the frames that are `ours` and the bridge's, each in queue order.
fn split_ours(queue: Vec<Frame>, ours: &[Frame]) -> (Vec<Frame>, Vec<Frame>) {
    let mut wanted = tally(ours);
    let (mut mine, mut theirs) = (Vec::with_capacity(queue.len()), Vec::new());
    for f in queue {
        if take_one(&mut wanted, &f) {
            mine.push(f);
        } else {
            theirs.push(f);
        }
    }
    (mine, theirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_little_endian() {
        let h = VnetHeader {
            flags: 1,
            gso_type: 3,
            hdr_len: 0x0102,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let b = header_bytes(&h);
        assert_eq!(&b[2..4], &[0x02, 0x01]);
        assert_eq!(parse_header(&b), h);
    }

    fn frame(tag: u8) -> Frame {
        let mut data = vec![0u8; 60];
        data[..6].copy_from_slice(&[0x52, 0x54, 0, 1, 2, 3]);
        data[14] = tag;
        Frame {
            header: VnetHeader::default(),
            data,
        }
    }

    #[test]
    fn a_frame_of_the_bridges_ahead_of_our_last_is_out_of_order() {
        let ours: Vec<Frame> = (10..13).map(frame).collect();
        let with = |at: usize, extra: &[u8]| {
            let mut r = ours.clone();
            for (k, t) in extra.iter().enumerate() {
                r.insert(at + k, frame(*t));
            }
            r
        };
        assert_eq!(look(&ours, &ours), Some(false));
        // One the bridge brought after ours: behind them, in order.
        assert_eq!(look(&with(3, &[20]), &ours), Some(false));
        // One it brought before the last of ours, or before the first.
        assert_eq!(look(&with(2, &[21]), &ours), Some(true));
        assert_eq!(look(&with(0, &[21]), &ours), Some(true));
        // A second copy of one of ours counts as the bridge's.
        assert_eq!(look(&with(1, &[10]), &ours), Some(true));
        // Not all of ours in the recording: it cannot tell.
        assert_eq!(look(&ours[..2], &ours), None);
        assert_eq!(look(&[frame(21)], &ours), None);
        // What the bridge brought besides what the queue held, once each.
        let tags = |fs: Vec<Frame>| fs.iter().map(|f| f.data[14]).collect::<Vec<u8>>();
        let held = vec![frame(1), frame(2), frame(2)];
        let recorded = vec![frame(2), frame(5), frame(2), frame(2), frame(1)];
        assert_eq!(tags(not_in(recorded, &held)), vec![5, 2]);
        // Taken back: ours first in their order, the bridge's behind in theirs.
        let queue = vec![frame(10), frame(21), frame(11), frame(22), frame(12)];
        assert_eq!(tags(ours_first(queue, &ours)), vec![10, 11, 12, 21, 22]);
    }

    /// A guest's receive buffer holding `f`: a merged-buffers header, then the frame.
    fn buffer_with(f: &Frame) -> Vec<u8> {
        let mut b = vec![0u8; 12];
        b[10] = 1;
        b.extend_from_slice(&f.data);
        b.extend_from_slice(&[0xee; 40]);
        b
    }

    #[test]
    fn the_kept_frame_is_the_one_recorded_before_the_first_still_queued() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let plug = plug_frame(mac);
        let [a, b, kept, e, g, late] = [1, 2, 3, 4, 5, 6].map(frame);
        // Frames after the kept one and before the plug stay queued ahead of it; a frame
        // recorded after the drain (`late`) changes nothing.
        let recorded = [&a, &b, &kept, &e, &plug, &g, &late].map(Frame::clone);
        let found = at_pause(&recorded, &plug, &[e.clone(), plug.clone(), g.clone()]);
        let expected = AtPause {
            kept: Some(kept.clone()),
            last_read: Some(b.clone()),
            read_before: Some(a.clone()),
            read: vec![(60, mac); 2],
        };
        assert_eq!(found, Some(expected.clone()));
        // The plug first in the queue, or alone in it.
        let recorded = [&a, &b, &kept, &plug, &g].map(Frame::clone);
        let found = at_pause(&recorded, &plug, &[plug.clone(), g.clone()]);
        assert_eq!(found, Some(expected.clone()));
        let found = at_pause(&recorded[..4], &plug, std::slice::from_ref(&plug));
        assert_eq!(found, Some(expected));
        // QEMU kept the plug: it read everything recorded before it.
        let found = at_pause(&recorded, &plug, std::slice::from_ref(&g));
        let expected = AtPause {
            kept: None,
            last_read: Some(kept.clone()),
            read_before: Some(b.clone()),
            read: vec![(60, mac); 3],
        };
        assert_eq!(found, Some(expected));
    }

    #[test]
    fn nothing_is_named_where_the_recording_and_the_queue_disagree() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let plug = plug_frame(mac);
        let [a, b, e, g] = [1, 2, 3, 4].map(frame);
        let recorded = [&a, &b, &plug, &g].map(Frame::clone);
        // A frame queued before the plug that the recording lacks: out of step.
        let drained = [e.clone(), plug.clone(), g.clone()];
        assert_eq!(at_pause(&recorded, &plug, &drained), None);
        // A frame queued after the plug that the recording lacks, or holds elsewhere.
        assert_eq!(at_pause(&recorded, &plug, &[plug.clone(), e.clone()]), None);
        assert_eq!(at_pause(&recorded, &plug, std::slice::from_ref(&e)), None);
        // A recording that does not reach back to the kept frame.
        assert_eq!(
            at_pause(&recorded[2..], &plug, &[plug.clone(), g.clone()]),
            None
        );
        // Our plug is not in the recording at all.
        assert_eq!(at_pause(&[a.clone(), b.clone()], &plug, &[]), None);
        // Another plug (an earlier one, or a look-alike from outside) is neither ours nor a
        // frame to hand over.
        let other = plug_frame(mac);
        assert_ne!(other.data, plug.data);
        let recorded = [&a, &other, &plug].map(Frame::clone);
        assert_eq!(
            at_pause(&recorded, &plug, std::slice::from_ref(&plug)),
            None
        );
        let found = at_pause(&recorded, &plug, &[]).expect("QEMU kept our plug");
        assert_eq!((found.kept, found.last_read), (None, None));
    }

    /// The MAC of [`frame`]'s destination: the NIC's.
    const MAC: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];

    fn dropped(at: &AtPause, ring: &ReceiveRingTail) -> Option<Frame> {
        dropped_at_pause(at, ring, MAC).map(|d| d.frame)
    }

    fn proof(at: &AtPause, ring: &ReceiveRingTail) -> Option<DropProof> {
        dropped_at_pause(at, ring, MAC).map(|d| d.proof)
    }

    /// A ring whose last buffer is `buffer` (used lengths unknown).
    fn ring(buffer: Vec<u8>) -> ReceiveRingTail {
        ReceiveRingTail {
            used_lens: Vec::new(),
            last_buffer: buffer,
        }
    }

    #[test]
    fn a_frame_is_dropped_only_if_the_guest_got_the_one_before_it() {
        let [a, b] = [1, 2].map(frame);
        let at = AtPause {
            kept: None,
            last_read: Some(b.clone()),
            read_before: Some(a.clone()),
            read: Vec::new(),
        };
        assert_eq!(dropped(&at, &ring(buffer_with(&a))), Some(b.clone()));
        assert_eq!(
            proof(&at, &ring(buffer_with(&a))),
            Some(DropProof::RingBytes)
        );
        // The guest got `b`: nothing was dropped.
        assert_eq!(dropped(&at, &ring(buffer_with(&b))), None);
        // A ring that shows anything else says nothing: no frame twice.
        assert_eq!(dropped(&at, &ring(buffer_with(&frame(9)))), None);
        assert_eq!(dropped(&at, &ring(Vec::new())), None);
        // A buffer that continues a larger frame does not start one.
        let mut continued = buffer_with(&a);
        continued[10] = 0;
        assert_eq!(dropped(&at, &ring(continued)), None);
        // A 10-byte header (no merged buffers) works too.
        let mut short = vec![0u8; 10];
        short.extend_from_slice(&a.data);
        assert_eq!(dropped(&at, &ring(short)), Some(b.clone()));
        // Two identical frames cannot be told apart.
        let same = AtPause {
            read_before: Some(b.clone()),
            ..at
        };
        assert_eq!(dropped(&same, &ring(buffer_with(&b))), None);
    }

    /// A frame of `len` bytes (a TCP segment of a bulk transfer: distinct bytes throughout).
    fn large_frame(len: usize, seed: u8) -> Frame {
        let mut f = frame(seed);
        f.data = (0..len)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect();
        f.data[..6].copy_from_slice(&[0x52, 0x54, 0, 1, 2, 3]);
        f
    }

    /// The ring after the guest's NIC put `frames` in buffers of `size` bytes (the first
    /// holding the 12-byte header): every used length, and the start of the last buffer.
    fn ring_after(frames: &[&Frame], size: usize) -> ReceiveRingTail {
        let mut used_lens = Vec::new();
        let mut last = Vec::new();
        for f in frames {
            let mut bytes = vec![0u8; 12];
            bytes.extend_from_slice(&f.data);
            let chunks: Vec<&[u8]> = bytes.chunks(size).collect();
            bytes[10] = chunks.len() as u8;
            for chunk in bytes.chunks(size) {
                used_lens.push(chunk.len() as u32);
                last = chunk.to_vec();
            }
        }
        last.truncate(12 + 1518 + 4);
        ReceiveRingTail {
            used_lens,
            last_buffer: last,
        }
    }

    /// An IPv4 TCP segment to [`MAC`] with TCP `flags`.
    fn tcp_frame(flags: u8) -> Frame {
        let mut f = frame(0);
        f.data = vec![0u8; 14 + 20 + 20 + 36];
        f.data[..6].copy_from_slice(&MAC);
        f.data[12..14].copy_from_slice(&[0x08, 0x00]);
        f.data[14] = 0x45;
        f.data[23] = 6;
        f.data[14 + 20 + 12] = 0x50;
        f.data[14 + 20 + 13] = flags;
        f
    }

    #[test]
    fn plain_tcp_segments_are_told_apart() {
        assert!(tcp_frame(0x10).is_plain_tcp_segment());
        assert!(tcp_frame(0x18).is_plain_tcp_segment());
        for control in [0x02, 0x12, 0x04, 0x14, 0x11] {
            assert!(!tcp_frame(control).is_plain_tcp_segment(), "{control:#x}");
        }
        // VLAN-tagged and IPv6 segments too; UDP, fragments and other frames are not.
        let mut tagged = tcp_frame(0x10);
        tagged.data.splice(12..12, [0x81, 0x00, 0x00, 0x07]);
        assert!(tagged.is_plain_tcp_segment());
        let mut v6 = frame(0);
        v6.data = vec![0u8; 14 + 40 + 20];
        v6.data[12..14].copy_from_slice(&[0x86, 0xdd]);
        v6.data[14] = 0x60;
        v6.data[14 + 6] = 6;
        v6.data[14 + 40 + 13] = 0x10;
        assert!(v6.is_plain_tcp_segment());
        let mut udp = tcp_frame(0x10);
        udp.data[23] = 17;
        assert!(!udp.is_plain_tcp_segment());
        let mut fragment = tcp_frame(0x10);
        fragment.data[14 + 7] = 1;
        assert!(!fragment.is_plain_tcp_segment());
        assert!(!frame(1).is_plain_tcp_segment());
        assert!(!Frame {
            header: VnetHeader::default(),
            data: vec![0; 13]
        }
        .is_plain_tcp_segment());
    }

    #[test]
    fn a_refilled_ring_is_told_from_its_lengths() {
        // What QEMU read, oldest first: requests (102 bytes) and pure ACKs (66) for the NIC, a
        // broadcast, and a frame for another MAC that the NIC throws away without a buffer.
        let other = [0x52, 0x54, 0, 9, 9, 9];
        let mut read: Vec<(usize, [u8; 6])> = Vec::new();
        for i in 0..20 {
            read.push((if i % 5 == 3 { 66 } else { 102 }, MAC));
            if i == 7 {
                read.push((60, [0xff; 6]));
                read.push((102, other));
            }
        }
        let (b, a) = (frame(2), frame(1));
        let at = AtPause {
            kept: None,
            last_read: Some(b.clone()),
            read_before: Some(a.clone()),
            read: read.clone(),
        };
        // The lengths the guest's ring took for the frames up to `upto` (exclusive).
        let ring_upto = |upto: usize| ReceiveRingTail {
            used_lens: read[..upto]
                .iter()
                .filter(|(_, to)| *to != other)
                .map(|(len, _)| (12 + len) as u32)
                .collect(),
            last_buffer: Vec::new(),
        };
        let n = read.len();
        // The guest took everything but the last frame read: that one was dropped.
        assert_eq!(dropped(&at, &ring_upto(n - 1)), Some(b.clone()));
        assert_eq!(proof(&at, &ring_upto(n - 1)), Some(DropProof::RingLengths));
        // It took the last one too: nothing is named.
        assert_eq!(dropped(&at, &ring_upto(n)), None);
        // Lengths that fit both (every frame alike) or too few to judge name nothing.
        let alike = AtPause {
            read: vec![(102, MAC); 20],
            ..at.clone()
        };
        let ring_alike = ReceiveRingTail {
            used_lens: vec![114; 19],
            last_buffer: Vec::new(),
        };
        assert_eq!(dropped(&alike, &ring_alike), None);
        // ... except a plain TCP segment for the NIC: a copy too many costs a duplicate ACK.
        let segment = tcp_frame(0x18);
        let tcp_alike = AtPause {
            last_read: Some(segment.clone()),
            ..alike.clone()
        };
        assert_eq!(dropped(&tcp_alike, &ring_alike), Some(segment.clone()));
        assert_eq!(proof(&tcp_alike, &ring_alike), Some(DropProof::Presumed));
        // So does a ring out of reach (QEMU's commands that show it are experimental), which a
        // source reads as an empty one: no frame but a plain TCP segment is named.
        assert_eq!(
            dropped(&tcp_alike, &ReceiveRingTail::default()),
            Some(segment)
        );
        assert_eq!(dropped(&alike, &ReceiveRingTail::default()), None);
        for control in [0x02, 0x12, 0x04, 0x11] {
            let at = AtPause {
                last_read: Some(tcp_frame(control)),
                ..alike.clone()
            };
            assert_eq!(dropped(&at, &ring_alike), None, "flags {control:#x}");
        }
        let short = AtPause {
            read: read[n - 6..].to_vec(),
            ..at.clone()
        };
        assert_eq!(dropped(&short, &ring_upto(n - 1)), None);
        // A last frame for another MAC was never the guest's to miss.
        let mut foreign = at.clone();
        foreign.read.push((102, other));
        assert_eq!(dropped(&foreign, &ring_upto(n)), None);
        // A fresh buffer where the frame was (the guest reused the slot): the lengths decide.
        let mut fresh = ring_upto(n - 1);
        fresh.last_buffer = vec![0; 64];
        assert_eq!(dropped(&at, &fresh), Some(b.clone()));
        let mut fresh = ring_upto(n);
        fresh.last_buffer = vec![0; 64];
        assert_eq!(dropped(&at, &fresh), None);
        // Where the last buffer's bytes are there, they decide.
        let mut with_bytes = ring_upto(n - 1);
        with_bytes.last_buffer = buffer_with(&b);
        assert_eq!(dropped(&at, &with_bytes), None);
    }

    #[test]
    fn a_frame_larger_than_a_buffer_is_told_from_its_end() {
        let small = frame(1);
        let [a, b] = [(20_000, 3), (9_000, 4)].map(|(n, s)| large_frame(n, s));
        let at = AtPause {
            kept: None,
            last_read: Some(b.clone()),
            read_before: Some(a.clone()),
            read: Vec::new(),
        };
        // The guest got `a` in 1.5 KiB buffers (14 of them), not `b`: `b` was dropped.
        let got_a = ring_after(&[&small, &a], 1536);
        assert_eq!(got_a.used_lens.len(), 15);
        assert_eq!(dropped(&at, &got_a), Some(b.clone()));
        // In 4 KiB buffers too, and with the last buffer read only in part.
        assert_eq!(dropped(&at, &ring_after(&[&a], 4096)), Some(b.clone()));
        // The guest got `b` after `a`: nothing was dropped.
        assert_eq!(dropped(&at, &ring_after(&[&a, &b], 1536)), None);
        // A small frame dropped after a large one, and the other way round.
        let at_small = AtPause {
            last_read: Some(small.clone()),
            ..at.clone()
        };
        assert_eq!(
            dropped(&at_small, &ring_after(&[&a], 1536)),
            Some(small.clone())
        );
        let at_large = AtPause {
            last_read: Some(a.clone()),
            read_before: Some(small.clone()),
            kept: None,
            read: Vec::new(),
        };
        assert_eq!(
            dropped(&at_large, &ring_after(&[&small], 1536)),
            Some(a.clone())
        );
        // Lengths that add up but an end that differs (only the end is read: the ring
        // ends with the frame read last or the one before it, and those two differ there), or bytes that match but lengths that do
        // not add up (a buffer missing from the tail read): nothing is named.
        let mut other = a.clone();
        let n = other.data.len();
        other.data[n - 10] ^= 0xff;
        assert_eq!(dropped(&at, &ring_after(&[&other], 1536)), None);
        let mut cut = ring_after(&[&a], 1536);
        cut.used_lens.drain(..3);
        assert_eq!(dropped(&at, &cut), None);
        // An empty tail names nothing.
        assert_eq!(dropped(&at, &ReceiveRingTail::default()), None);
    }

    #[test]
    fn flooded_frames_are_told_apart() {
        let mut data = vec![0u8; 60];
        data[..6].copy_from_slice(&[0xff; 6]);
        let f = Frame {
            header: VnetHeader::default(),
            data: data.clone(),
        };
        assert!(f.is_flooded());
        data[..6].copy_from_slice(&[0x01, 0x00, 0x5e, 0, 0, 1]);
        assert!(Frame {
            data: data.clone(),
            ..f.clone()
        }
        .is_flooded());
        data[..6].copy_from_slice(&[0x52, 0x54, 0, 1, 2, 3]);
        let unicast = Frame { data, ..f };
        assert!(!unicast.is_flooded());
        assert!(!unicast.is_plug());
        let plug = plug_frame([0x52, 0x54, 0, 1, 2, 3]);
        assert!(plug.is_plug() && !plug.is_flooded());
        assert_eq!(plug.destination(), Some([0x52, 0x54, 0, 1, 2, 3]));
        assert_eq!(unicast.destination(), Some([0x52, 0x54, 0, 1, 2, 3]));
        assert_eq!(
            Frame {
                header: VnetHeader::default(),
                data: vec![1, 2]
            }
            .destination(),
            None
        );
    }
}
