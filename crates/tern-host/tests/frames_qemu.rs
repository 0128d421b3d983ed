//! A real QEMU whose guest is stopped keeps the first frame it reads off its tap, and the
//! source's recording of the tap names it ([`at_pause`]). Its own test binary: the QEMU it
//! forks would hold, until its exec, copies of the tap descriptors of tests running beside it.

use tern_api::migration::VnetHeader;
use tern_host::frames::{at_pause, plug_frame, AtPause, Frame, TapQueue, TapRecorder, TapWriter};
use tern_host::tap::tap_name;
use tern_testkit::NetNs;

/// A frame to `dst` with no offload: what a tap's reader gets is what was sent, byte for byte.
fn plain_frame(dst: [u8; 6], tag: &[u8]) -> Frame {
    let mut data = vec![0u8; 60];
    data[..6].copy_from_slice(&dst);
    data[6..12].copy_from_slice(&[0x52, 0x54, 0, 9, 9, 9]);
    data[12..14].copy_from_slice(&[0x88, 0xb6]);
    data[14..14 + tag.len()].copy_from_slice(tag);
    Frame {
        header: VnetHeader::default(),
        data,
    }
}

/// A QEMU reading a tap with its guest not running (`-S`), as a migration's source is at the
/// pause: it reads one frame, finds that the guest cannot take it, keeps it and stops reading.
struct StoppedQemu(std::process::Child);

impl StoppedQemu {
    fn start(tap: &str, mac: [u8; 6]) -> StoppedQemu {
        let mac = mac.map(|b| format!("{b:02x}")).join(":");
        let child = std::process::Command::new("qemu-system-x86_64")
            .args(["-S", "-nodefaults", "-display", "none", "-accel", "tcg"])
            .args([
                "-netdev",
                &format!("tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off"),
            ])
            .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={mac}")])
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("start qemu-system-x86_64");
        StoppedQemu(child)
    }
}

impl Drop for StoppedQemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes `frames` through `writer`, every one taken.
fn give(writer: &TapWriter, frames: &[Frame]) {
    assert_eq!(
        writer.write(frames),
        frames.len(),
        "the kernel took every frame"
    );
}

fn datas(frames: &[Frame]) -> Vec<&[u8]> {
    frames.iter().map(|f| f.data.as_slice()).collect()
}

#[test]
fn the_frame_a_stopped_qemu_keeps_ahead_of_the_plug_is_named_from_the_recording() {
    let ns = NetNs::new("th-parked");
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let taps = [0, 1].map(|_| tap_name(uuid::Uuid::new_v4(), 0));
    ns.run_in(|| {
        // The host's own chatter on a tap (IPv6 neighbour discovery, IGMP reports) would reach
        // QEMU too: the taps are on no bridge, without IPv6 and multicast.
        std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1")
            .expect("IPv6 off in the namespace");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _rt = rt.enter();
        let wait = std::time::Duration::from_secs(30);
        for (i, tap) in taps.iter().enumerate() {
            tern_testkit::netns::ip(&["tuntap", "add", "dev", tap, "mode", "tap"]).expect("tap");
            tern_testkit::netns::ip(&["link", "set", "dev", tap, "multicast", "off", "up"])
                .expect("tap up");
            let recorder = TapRecorder::start(tap).expect("recorder");
            let qemu = StoppedQemu::start(tap, mac);
            let pid = qemu.0.id();
            let queue = tern_testkit::wait_for("QEMU to open its tap", wait, || {
                TapQueue::of_process(pid, tap).ok()
            });
            let bridge = TapWriter::open_recorded(tap).expect("writer");
            let plug = plug_frame(mac);
            let [first, second, third] =
                [b"first", b"secnd", b"third"].map(|t| plain_frame(mac, t));
            if i == 0 {
                // A frame comes before the plug: QEMU takes it and parks it.
                give(&bridge, std::slice::from_ref(&first));
                tern_testkit::wait_for("QEMU to take the first frame", wait, || {
                    (!queue.has_frames().expect("poll the queue")).then_some(())
                });
                give(&bridge, &[plug.clone(), second.clone(), third.clone()]);
                let drained = queue.drain().expect("drain");
                assert_eq!(
                    datas(&drained),
                    datas(&[plug.clone(), second.clone(), third.clone()]),
                    "QEMU stopped reading at the frame it parked"
                );
                let named = recorder.with_recorded(|r| at_pause(r, &plug, &drained));
                let expected = AtPause {
                    kept: Some(first),
                    last_read: None,
                    read_before: None,
                    read: Vec::new(),
                };
                assert_eq!(named, Some(expected), "the kept frame is named");
            } else {
                // The plug comes first: QEMU parks it, and nothing else was lost.
                give(&bridge, std::slice::from_ref(&plug));
                tern_testkit::wait_for("QEMU to take the plug", wait, || {
                    (!queue.has_frames().expect("poll the queue")).then_some(())
                });
                give(&bridge, std::slice::from_ref(&second));
                let drained = queue.drain().expect("drain");
                assert_eq!(datas(&drained), datas(std::slice::from_ref(&second)));
                let named = recorder.with_recorded(|r| at_pause(r, &plug, &drained));
                let expected = AtPause {
                    kept: None,
                    last_read: None,
                    read_before: None,
                    read: Vec::new(),
                };
                assert_eq!(
                    named,
                    Some(expected),
                    "QEMU kept the plug: nothing is named"
                );
            }
            drop(queue);
            drop(qemu);
            tern_host::tap::remove_tap(tap).expect("remove");
        }
    });
}
