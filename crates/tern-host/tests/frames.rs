//! Handed-over frames through real taps: what [`deliver`] writes into a tap's transmit path is
//! what the tap's reader gets, in order and with its offload header, and [`TapQueue`] reads
//! a queue through the descriptor another process (here: this one) holds on the tap.

mod common;

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};

use tern_api::migration::VnetHeader;
use tern_host::frames::{deliver, queue_first, Frame, TapQueue, TapWriter};
use tern_host::tap::{ensure_tap, tap_name};
use tern_testkit::NetNs;

const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;

/// Holds the tests that use a namespace to one at a time: one test's `ip` child, forked while
/// another test holds a tap's descriptor, holds that tap too until it execs (its removal then
/// fails as busy).
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` in a namespace of its own, with bridge `br0` and one tap on it attached as QEMU
/// attaches: `f` gets the tap's name and its queue, seen through a duplicate of that
/// descriptor found by the tap's name (as an agent sees QEMU's). The tap is removed after.
fn with_attached_tap<R: Send>(prefix: &str, f: impl FnOnce(&str, &TapQueue) -> R + Send) -> R {
    let _serial = one_at_a_time();
    let ns = NetNs::new(prefix).with_bridge("br0");
    let tap = tap_name(uuid::Uuid::new_v4(), 0);
    ns.run_in(|| {
        ensure_tap(&tap, "br0", None).expect("tap");
        let qemu = attach_like_qemu(&tap);
        let queue = TapQueue::of_process(std::process::id(), &tap).expect("queue of our fd");
        let r = f(&tap, &queue);
        drop(queue);
        drop(qemu);
        tern_host::tap::remove_tap(&tap).expect("remove");
        r
    })
}

/// `frames` without those the tap's own IPv6 neighbour discovery (multicast) may queue.
fn unicast(frames: Vec<Frame>) -> Vec<Frame> {
    frames.into_iter().filter(|f| !f.is_flooded()).collect()
}

/// Attaches to tap `name` the way QEMU does (virtio-net header of 12 bytes, checksum offload
/// on) and keeps the descriptor, as QEMU keeps its.
fn attach_like_qemu(name: &str) -> OwnedFd {
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    // SAFETY: ifreq is plain old data.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short | IFF_VNET_HDR;
    // SAFETY: ioctls on the descriptor we own with arguments we own.
    unsafe {
        assert!(
            libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) >= 0,
            "TUNSETIFF"
        );
        let size: libc::c_int = 12;
        assert!(libc::ioctl(tun.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) >= 0);
        assert!(libc::ioctl(tun.as_raw_fd(), libc::TUNSETOFFLOAD, TUN_F_CSUM) >= 0);
    }
    tun.into()
}

/// A UDP/IPv4 frame to `dst` whose UDP checksum is left to the NIC: only correct with its
/// header, which the hand-over must carry.
fn udp_frame(dst: [u8; 6], payload: &[u8]) -> Frame {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&[0x52, 0x54, 0, 9, 9, 9]);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    f.extend_from_slice(&[0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0]);
    f[16..18].copy_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
    f.extend_from_slice(&[0x1f, 0x40, 0x1f, 0x41]);
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0x12, 0x34]); // the pseudo-header sum a sender leaves for the NIC
    f.extend_from_slice(payload);
    Frame {
        header: VnetHeader {
            flags: 1, // VIRTIO_NET_HDR_F_NEEDS_CSUM
            csum_start: 34,
            csum_offset: 6,
            ..VnetHeader::default()
        },
        data: f,
    }
}

#[test]
fn delivered_frames_reach_the_taps_reader_in_order_with_their_headers() {
    let mac = [0x52, 0x54, 0, 1, 2, 3];
    let sent: Vec<Frame> = (0..50u8).map(|i| udp_frame(mac, &[i; 40])).collect();
    let got = with_attached_tap("th-frames", |tap, queue| {
        let delivered = deliver(tap, &sent).expect("deliver");
        assert_eq!(delivered, sent.len(), "the kernel took every frame");
        // The frames are queued when `deliver` returns (no qdisc in between).
        let got = queue.drain().expect("drain");
        assert!(queue.drain().expect("drain again").is_empty(), "drained");
        got
    });
    let got = unicast(got);
    assert_eq!(got.len(), sent.len());
    for (i, (g, s)) in got.iter().zip(&sent).enumerate() {
        assert_eq!(g.data, s.data, "frame {i} unchanged and in order");
        assert_eq!(g.header.flags, 1, "frame {i} still asks for its checksum");
        assert_eq!(g.header.csum_start, 34);
        assert_eq!(g.header.csum_offset, 6);
    }
}

/// The hand-over at a destination: the frames handed over go ahead of those the tap queued
/// since the steer, also where the bridge brings one more while they are being written.
#[test]
fn handed_frames_go_first_though_the_bridge_brings_one_while_they_are_written() {
    let mac = [0x52, 0x54, 0, 1, 2, 4];
    let handed: Vec<Frame> = (0..20u8).map(|i| udp_frame(mac, &[0xa0, i])).collect();
    let lan = |i: u8| udp_frame(mac, &[0xb0, i]);
    let (done, calm, got) = with_attached_tap("th-first", |tap, queue| {
        // The LAN: frames for the guest's MAC sent into the bridge, which floods them to the tap.
        let bridge = TapWriter::open_recorded("br0").expect("a writer on the bridge");
        // The bridge forwards to a port once the kernel has seen its carrier come up (after
        // the attach, asynchronously): until a frame of the LAN's reaches the queue.
        let ready = std::time::Instant::now();
        while !queue
            .drain()
            .expect("drain")
            .iter()
            .any(|f| f.data == lan(0).data)
        {
            assert!(
                ready.elapsed().as_secs() < 10,
                "the bridge never forwarded to the tap"
            );
            bridge.write(&[lan(0)]);
            std::thread::yield_now();
        }
        assert_eq!(bridge.write(&[lan(1), lan(2)]), 2, "queued since the steer");
        let done = queue_first(queue, tap, |held| {
            // After the queue was taken, before ours are written: without a second look it
            // would be read first.
            assert_eq!(bridge.write(&[lan(3)]), 1, "brought meanwhile");
            handed.iter().cloned().chain(held).collect()
        })
        .expect("queued first");
        let got = queue.drain().expect("drain");
        // Nothing brought meanwhile: ours go first at once.
        let calm = queue_first(queue, tap, |held| {
            handed.iter().cloned().chain(held).collect()
        })
        .expect("queued first");
        (done, calm, got)
    });
    // Each of ours ends in its two tag bytes.
    let data = |frames: Vec<Frame>| -> Vec<Vec<u8>> {
        unicast(frames)
            .into_iter()
            .map(|f| f.data[f.data.len() - 2..].to_vec())
            .collect()
    };
    let want: Vec<Frame> = handed
        .iter()
        .cloned()
        .chain([lan(1), lan(2), lan(3)])
        .collect();
    assert_eq!(
        data(got),
        data(want),
        "handed over first, then the LAN's in order"
    );
    assert!(done.requeued >= 1 && done.in_order, "{done:?}");
    assert!(done.held >= 2, "{done:?}");
    assert!(calm.in_order && calm.written >= handed.len(), "{calm:?}");
}

/// Runs [`queue_first`] with `handed` first on a tap whose root qdisc is a token bucket of
/// `tbf` (`tc` words: rate, burst, limit); returns what it did and the queue once the qdisc
/// let everything through.
fn queue_first_behind_tbf(
    prefix: &str,
    tbf: &[&str],
    handed: &[Frame],
) -> (tern_host::frames::QueuedFirst, Vec<Frame>) {
    with_attached_tap(prefix, |tap, queue| {
        let tc = std::process::Command::new("tc")
            .args(["qdisc", "add", "dev", tap, "root", "tbf"])
            .args(tbf)
            .status()
            .expect("run tc");
        assert!(tc.success(), "tc: {tc}");
        let done = queue_first(queue, tap, |held| {
            handed.iter().cloned().chain(held).collect()
        })
        .expect("queued first");
        wait_for_empty_qdisc(tap);
        (done, queue.drain().expect("drain"))
    })
}

/// Each frame by its payload's first byte (after the Ethernet, IPv4 and UDP headers).
fn tags(frames: &[Frame]) -> Vec<Option<u8>> {
    frames.iter().map(|f| f.data.get(42).copied()).collect()
}

/// Where the tap's transmit path loses frames (here a qdisc that drops all; a tap whose
/// carrier came up moments ago has none yet), the handed-over frames still go first: straight
/// into the queue.
#[test]
fn handed_frames_go_first_though_the_taps_transmit_path_loses_them() {
    let mac = [0x52, 0x54, 0, 1, 2, 5];
    let handed: Vec<Frame> = (0..5u8).map(|i| udp_frame(mac, &[i, 0xa0])).collect();
    let tbf = ["rate", "8bit", "burst", "1600", "limit", "1"];
    let (done, got) = queue_first_behind_tbf("th-lossy", &tbf, &handed);
    assert_eq!(tags(&unicast(got)), tags(&handed), "{done:?}");
    assert!(!done.in_order && done.unwatched, "{done:?}");
    assert_eq!(done.written, handed.len(), "{done:?}");
}

/// Where the tap's qdisc holds some of the handed-over frames back (here a shaper; on a host,
/// a frame queued behind one another core is sending), they still go first, each once: a
/// frame written again while its first copy waits in the qdisc would reach the guest twice.
#[test]
fn handed_frames_a_qdisc_holds_back_go_first_and_once() {
    let mac = [0x52, 0x54, 0, 1, 2, 6];
    let handed: Vec<Frame> = (0..5u8).map(|i| udp_frame(mac, &[i; 1000])).collect();
    // The first frame passes at once, each next one about 1 ms later.
    let tbf = ["rate", "8mbit", "burst", "1600", "limit", "100000"];
    let (done, got) = queue_first_behind_tbf("th-late", &tbf, &handed);
    assert_eq!(tags(&unicast(got)), tags(&handed), "{done:?}");
    assert!(done.in_order && !done.unwatched, "{done:?}");
}

/// Waits (up to 10 s) until tap `tap`'s root qdisc holds no frame.
fn wait_for_empty_qdisc(tap: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = std::process::Command::new("tc")
            .args(["-s", "qdisc", "show", "dev", tap])
            .output()
            .expect("run tc");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text.contains("backlog 0b 0p") {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the qdisc keeps frames: {text}"
        );
        std::thread::yield_now();
    }
}

#[test]
fn a_process_without_the_tap_has_no_queue_of_it() {
    let e = TapQueue::of_process(std::process::id(), "tn-none-0")
        .err()
        .expect("no such queue");
    assert!(e.to_string().contains("holds no queue"), "{e}");
    // A tap that does not exist cannot be written to.
    let e = deliver("tn-none-0", &[udp_frame([0x52, 0, 0, 0, 0, 1], b"x")]).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
}
