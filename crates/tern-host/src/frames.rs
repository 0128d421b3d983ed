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
//! order. A frame arriving during that re-write (microseconds) can overtake part of it.
//!
//! QEMU itself keeps one frame from this: a QEMU whose guest is stopped still reads the next
//! frame from its tap, finds the guest cannot take it, and parks it in a queue of its own
//! (not migrated, lost with the source) before it stops reading. So the moment the source
//! pauses, its agent writes a [`plug_frame`] into each of the VM's taps: QEMU parks that one
//! instead, and the frames behind it stay in the tap's queue for the hand-over. A frame that
//! arrives between the pause and the plug (well under a millisecond) is still lost. The plug
//! is harmless wherever it ends up: a guest drops its unknown EtherType, and the hand-over
//! leaves it out.
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

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tern_api::migration::VnetHeader;

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
/// in place of a frame that matters (see the module docs).
pub fn plug_frame(mac: [u8; 6]) -> Frame {
    let mut data = vec![0u8; 60];
    data[0..6].copy_from_slice(&mac);
    data[6..12].copy_from_slice(&PLUG_SOURCE);
    data[12..14].copy_from_slice(&PLUG_ETHERTYPE);
    data[14..34].copy_from_slice(b"tern switchover plug");
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

/// Sets the packet-socket option `option` (an int flag) to 1.
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

fn switch_on(
    sock: &PacketSocket,
    option: libc::c_int,
    name: &'static str,
    tap: &str,
) -> Result<(), FrameError> {
    let on: libc::c_int = 1;
    // SAFETY: the option takes an int we own, of the size passed; the socket is open.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_PACKET,
            option,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(sys(name, tap));
    }
    Ok(())
}

/// A packet socket bound to a tap, for writing frames into its transmit path: its reader (the
/// VM's QEMU) receives them as if the bridge had forwarded them, and no bridge or switch sees
/// them. Opened ahead of time where the write is urgent (binding can take milliseconds).
pub struct TapWriter {
    sock: PacketSocket,
    tap: String,
}

impl TapWriter {
    pub fn open(tap: &str) -> Result<TapWriter, FrameError> {
        let c = CString::new(tap).map_err(|_| FrameError::NoInterface(tap.into()))?;
        // SAFETY: `c` is a valid NUL-terminated string that lives across the call.
        let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
        if index == 0 {
            return Err(FrameError::NoInterface(tap.into()));
        }
        let sock = PacketSocket::for_sending().map_err(|_| sys("opening a packet socket", tap))?;
        switch_on(&sock, PACKET_VNET_HDR, "PACKET_VNET_HDR", tap)?;
        // Straight into the tap's queue, not through its qdisc: the frame is queued when
        // `send` returns (a plug must be there at once), and ahead of anything the bridge
        // forwarded that still waits in the qdisc (handed-over frames are older).
        switch_on(&sock, PACKET_QDISC_BYPASS, "PACKET_QDISC_BYPASS", tap)?;
        // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
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

/// Writes `frames`, in order, into tap `tap`'s transmit path ([`TapWriter`]). Returns how
/// many the kernel took.
pub fn deliver(tap: &str, frames: &[Frame]) -> Result<usize, FrameError> {
    if frames.is_empty() {
        return Ok(0);
    }
    Ok(TapWriter::open(tap)?.write(frames))
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
