//! Disks and NICs of the command builder, checked against a real QEMU: the images are opened
//! as asked, the tap is opened with the spec's MAC, and a shared disk survives a migration
//! between two QEMUs holding image locks.

mod common;

use std::time::Duration;

use common::*;
use tern_api::{BootSource, DiskFormat, DiskSpec, NicSpec};
use tern_qemu::{MigrationStatus, QemuVm, RunState};

const BOOT: Duration = Duration::from_secs(90);

fn disks(dir: &std::path::Path) -> Vec<DiskSpec> {
    let raw = dir.join("data.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let qcow = dir.join("base,1.qcow2");
    run(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        qcow.to_str().unwrap(),
        "64M",
    ]);
    vec![
        DiskSpec {
            bus: Default::default(),
            path: raw.to_string_lossy().into_owned(),
            format: DiskFormat::Raw,
            readonly: false,
            datastore: None,
            volume: None,
        },
        DiskSpec {
            bus: Default::default(),
            path: qcow.to_string_lossy().into_owned(),
            format: DiskFormat::Qcow2,
            readonly: true,
            datastore: None,
            volume: None,
        },
    ]
}

/// True when `qemu-io` cannot write the image because another process holds its lock.
fn second_writer_refused(path: &str) -> bool {
    let write = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512", path])
        .output()
        .expect("run qemu-io (from qemu-utils)");
    let out = String::from_utf8_lossy(&write.stderr).to_string()
        + &String::from_utf8_lossy(&write.stdout);
    if write.status.success() && !out.contains("lock") {
        return false;
    }
    assert!(out.contains("lock"), "qemu-io failed otherwise: {out}");
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_open_as_specified() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "disks", "");
    cfg.spec.disks = disks(dir.path());
    let _guard = KillGuard(cfg.run_dir.clone());
    let vm = QemuVm::launch(cfg.clone()).await.unwrap();
    let blocks = vm.qmp().execute("query-block", None).await.unwrap();
    let blocks = blocks.as_array().unwrap();
    assert_eq!(blocks.len(), 2, "{blocks:?}");
    let find = |path: &str| {
        blocks
            .iter()
            .find(|b| b["inserted"]["file"].as_str() == Some(path))
            .unwrap_or_else(|| panic!("{path} not open: {blocks:?}"))
    };
    let raw = find(&cfg.spec.disks[0].path);
    assert_eq!(raw["inserted"]["ro"], false);
    assert_eq!(raw["inserted"]["drv"], "raw");
    assert_eq!(raw["inserted"]["cache"]["direct"], true);
    let qcow = find(&cfg.spec.disks[1].path);
    assert_eq!(qcow["inserted"]["ro"], true);
    assert_eq!(qcow["inserted"]["drv"], "qcow2");

    // The image lock keeps a second writer out.
    assert!(second_writer_refused(&cfg.spec.disks[0].path));
    vm.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nic_opens_its_tap_with_the_spec_mac() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new(&format!("tq-{}", "nic"));
    ns.ip(&["tuntap", "add", "dev", "tqtap0", "mode", "tap"])
        .expect("ip");
    ns.ip(&["link", "set", "tqtap0", "up"]).expect("ip");
    let mut cfg = config(dir.path(), "nic", "");
    cfg.spec.nics = vec![NicSpec {
        mac: "52:54:00:12:34:56".into(),
    }];
    cfg.taps = vec!["tqtap0".into()];
    cfg.qemu_binary = ns.qemu_wrapper(dir.path());
    let _guard = KillGuard(cfg.run_dir.clone());
    let vm = QemuVm::launch(cfg).await.unwrap();
    let filters = vm
        .qmp()
        .execute("query-rx-filter", Some(serde_json::json!({"name": "nic0"})))
        .await
        .unwrap();
    assert_eq!(filters[0]["main-mac"], "52:54:00:12:34:56", "{filters}");
    // A tap has carrier only while QEMU holds it open.
    let link = ns.ip(&["link", "show", "tqtap0"]).expect("ip");
    assert!(!link.contains("NO-CARRIER"), "{link}");
    vm.kill().await.unwrap();
    let link = wait_for("tap carrier to drop", Duration::from_secs(10), || {
        let l = ns.ip(&["link", "show", "tqtap0"]).expect("ip");
        l.contains("NO-CARRIER").then_some(l)
    })
    .await;
    assert!(link.contains("tqtap0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_disk_changes_owner_during_migration() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut src_cfg = config(dir.path(), "src", "");
    src_cfg.spec.disks = disks(dir.path());
    let dst_cfg = destination(&src_cfg, dir.path(), "dst", false);
    let _g1 = KillGuard(src_cfg.run_dir.clone());
    let _g2 = KillGuard(dst_cfg.run_dir.clone());
    let src = QemuVm::launch(src_cfg.clone()).await.unwrap();
    // The destination opens the same images while the source holds their locks.
    let dst = QemuVm::launch(dst_cfg).await.unwrap();
    dst.migrate_incoming("tcp:127.0.0.1:0").await.unwrap();
    let uri = dst.query_migrate().await.unwrap().socket_addresses[0].clone();
    src.migrate(&uri).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let stats = loop {
        let s = src.query_migrate().await.unwrap();
        if s.status.is_finished() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "{s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(stats.status, MigrationStatus::Completed, "{stats:?}");
    dst.wait_status(|s| *s == RunState::Running, Duration::from_secs(30))
        .await
        .unwrap();
    src.shutdown(Duration::from_secs(1)).await.unwrap();
    // The destination activated the image and holds its write lock now.
    assert!(second_writer_refused(&src_cfg.spec.disks[0].path));
    dst.kill().await.unwrap();
    assert!(!second_writer_refused(&src_cfg.spec.disks[0].path));
}

/// One ping from namespace `ns` to the ring test's guest (10.99.0.2), its payload the
/// pattern "tern", with `extra` options; waits (a minute at most) until it is answered.
fn ping_with_pattern(ns: &NetNs, extra: &[&str]) {
    let mut args = vec![
        "netns", "exec", &ns.name, "ping", "-c", "1", "-W", "1", "-w", "60",
    ];
    args.extend_from_slice(extra);
    args.extend(["-p", "7465726e", "10.99.0.2"]);
    tern_testkit::netns::ip(&args).expect("the guest answers a ping");
}

/// The guest's receive ring as QEMU shows it: with the guest stopped, the buffer its NIC filled
/// last holds the last frame sent to it (here: a ping's echo request), after the virtio-net
/// header. A source tells from it whether a frame it read at the pause reached the guest.
/// Skipped, with a notice, until the guest image is built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_frame_the_guest_received_is_read_from_its_ring() {
    init_tracing();
    let Some((kernel, initrd)) = guest_image() else {
        eprintln!("NOTICE: target/guest/initramfs.img missing (run guest/build.sh): skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new("tq-ring");
    ns.ip(&["tuntap", "add", "dev", "tqtap1", "mode", "tap"])
        .expect("ip");
    ns.ip(&["addr", "add", "10.99.0.1/24", "dev", "tqtap1"])
        .expect("ip");
    tern_testkit::netns::ip(&[
        "netns",
        "exec",
        &ns.name,
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.disable_ipv6=1",
    ])
    .expect("IPv6 off");
    ns.ip(&["link", "set", "tqtap1", "up"]).expect("ip");
    let mut cfg = config(dir.path(), "ring", "");
    cfg.spec.memory_mib = 256;
    cfg.spec.boot = BootSource::Kernel {
        kernel: kernel.to_string_lossy().into_owned(),
        initrd: Some(initrd.to_string_lossy().into_owned()),
        cmdline: "console=ttyS0 quiet ipv6.disable=1 tern.mem=16 tern.ip=10.99.0.2/24".into(),
    };
    cfg.spec.nics = vec![NicSpec {
        mac: "52:54:00:12:34:57".into(),
    }];
    cfg.taps = vec!["tqtap1".into()];
    cfg.qemu_binary = ns.qemu_wrapper(dir.path());
    let _guard = KillGuard(cfg.run_dir.clone());
    let vm = QemuVm::launch(cfg.clone()).await.unwrap();
    wait_for("TERN-GUEST-READY", BOOT, || {
        console(&cfg.run_dir)
            .contains("TERN-GUEST-READY")
            .then_some(())
    })
    .await;
    // A ping whose echo request carries a pattern, answered: the guest received it. Nothing
    // else is sent to the guest (the namespace has no IPv6), so with the guest stopped its
    // last buffer holds that request; a stray frame in between only makes the test ping again.
    let mut last = None;
    for _ in 0..5 {
        ping_with_pattern(&ns, &[]);
        vm.qmp().execute("stop", None).await.unwrap();
        let ring = vm.receive_ring_tail(0, 12 + 98).await.unwrap();
        if let Some(r) = ring.filter(|r| {
            let b = &r.last_buffer;
            b.len() == 110 && b[46] == 8 && b.ends_with(b"tern")
        }) {
            last = Some(r);
            break;
        }
        vm.qmp().execute("cont", None).await.unwrap();
    }
    let ring = last.expect("the guest's last buffer holds the echo request");
    // One buffer took the header and the 98-byte frame.
    assert_eq!(ring.used_lens.len() as u64, tern_qemu::RING_TAIL_BUFFERS);
    assert_eq!(
        ring.used_lens.last(),
        Some(&(12 + 98)),
        "{:?}",
        ring.used_lens
    );
    let last = ring.last_buffer;
    // A merged-buffers header of one buffer, then the frame to the NIC's MAC.
    assert_eq!(&last[10..12], &[1, 0], "{last:02x?}");
    assert_eq!(
        &last[12..18],
        &[0x52, 0x54, 0, 0x12, 0x34, 0x57],
        "{last:02x?}"
    );
    assert_eq!(&last[24..26], &[0x08, 0x00], "IPv4: {last:02x?}");
    // A frame larger than a receive buffer: a jumbo echo request (the tap's MTU allows it;
    // the guest answers in fragments) fills several buffers, whose used lengths add up to the
    // header and the frame, and the last holds the frame's end: the pattern.
    vm.qmp().execute("cont", None).await.unwrap();
    ns.ip(&["link", "set", "tqtap1", "mtu", "9000"])
        .expect("ip");
    let frame_len = 14 + 20 + 8 + 8000;
    let mut large = None;
    for _ in 0..5 {
        ping_with_pattern(&ns, &["-M", "dont", "-s", "8000"]);
        vm.qmp().execute("stop", None).await.unwrap();
        let ring = vm.receive_ring_tail(0, 64).await.unwrap().expect("a ring");
        // The newest buffers, until they hold the header and the frame.
        let (mut sum, mut buffers) = (0, 0);
        for len in ring.used_lens.iter().rev() {
            if sum >= 12 + frame_len {
                break;
            }
            sum += *len as usize;
            buffers += 1;
        }
        if sum == 12 + frame_len {
            large = Some((buffers, ring));
            break;
        }
        vm.qmp().execute("cont", None).await.unwrap();
    }
    let (buffers, ring) = large.expect("the ring ends with the jumbo echo request");
    assert!(buffers > 1, "{buffers} buffer(s): {:?}", ring.used_lens);
    let tail = ring.last_buffer;
    assert!(!tail.is_empty() && tail.len() <= 64, "{tail:02x?}");
    let pattern = b"terntern";
    assert!(
        tail.windows(4).all(|w| pattern.windows(4).any(|p| p == w)),
        "the last buffer holds the pattern's end: {tail:02x?}"
    );
    // A NIC that does not exist has no ring.
    assert!(vm.receive_ring_tail(7, 64).await.is_err());
    vm.kill().await.unwrap();
}
