//! A VM whose disk is a LUN of a real iSCSI target: the lab's SAN (Debian's `tgt` in a storage
//! namespace, on a storage network of its own), opened on each host by QEMU's userspace
//! initiator. The guest appends a checksummed journal to the LUN while it moves four times
//! between two hosts with a client streaming from it: the journal verifies after every move
//! (nothing written before a hand-over is lost or torn), the stream stays intact, and one copy
//! runs. A disk naming a host name instead of an address, or a format other than raw, is
//! refused before anything starts, and so is a move to a host whose storage link is down.

mod common;

use std::time::Duration;

use common::{journal_records, text, wait_for, Lab};
use serde_json::Value;

#[test]
fn a_vm_on_an_iscsi_lun_moves_with_its_journal_intact() {
    let lab = Lab::up_with("san", 2, &["--san-luns", "1", "--san-lun-mib", "64"]);
    let lun = lab.state["san"]["luns"][0]
        .as_str()
        .expect("lab.json lists the SAN's LUNs")
        .to_string();

    // Bad input first: refused with the reason, nothing created.
    for (disk, why) in [
        (
            "iscsi://san.example:3260/iqn.2026-12.lab.tern:san/1,format=raw",
            "not an iSCSI LUN",
        ),
        (&format!("{lun},format=qcow2") as &str, "format=raw"),
    ] {
        let args = lab.vm_create_args(
            "bad",
            "h1",
            "10.78.0.150",
            "52:54:00:5a:00:09",
            128,
            "",
            &[disk],
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = lab.tern(&args);
        assert!(!out.status.success(), "{disk} was accepted: {}", text(&out));
        assert!(text(&out).contains(why), "{disk}: {}", text(&out));
    }

    let disk = format!("{lun},format=raw");
    let ip = "10.78.0.151";
    let id = lab.create_vm(
        "sanvm",
        "h1",
        ip,
        "52:54:00:5a:00:01",
        256,
        "tern.mem=64 tern.dirty=8 tern.disk=/dev/vda",
        &[&disk],
    );
    let addr = format!("{ip}:7000");
    let first = wait_for("the journal to append", Duration::from_secs(60), || {
        let s = lab.guest_stats(&addr);
        (s["disk"]["next_seq"].as_u64().unwrap_or(0) > 0).then_some(s)
    });
    let boot_id = first["boot_id"].clone();
    let client = lab.spawn_stream_client(&addr, 3000);

    // A destination that cannot reach the SAN is refused before anything moves, naming the
    // LUN: h2's storage link down.
    let h2 = format!("{}-h2", lab.prefix);
    let set_link = |state: &str| {
        let out = std::process::Command::new("ip")
            .args(["-n", &h2, "link", "set", "stor0", state])
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip link set stor0 {state}: {}",
            text(&out)
        );
    };
    set_link("down");
    let (out, _) = lab.migrate_json(&["sanvm", "--to", "h2"]);
    assert!(
        !out.status.success(),
        "a move to a host without the SAN: {}",
        text(&out)
    );
    let t = text(&out);
    assert!(
        t.contains("cannot reach the SAN") && t.contains(&lun),
        "{t}"
    );
    set_link("up");
    let vm: Value = lab.tern_json(&["vm", "show", "sanvm"]);
    assert_eq!(vm["host"], "h1", "{vm}");

    let mut host = "h1";
    let mut seq = first["disk"]["next_seq"].as_u64().unwrap_or(0);
    for i in 0..4 {
        let to = if host == "h1" { "h2" } else { "h1" };
        let (out, task) = lab.migrate_json(&["sanvm", "--to", to]);
        assert!(out.status.success(), "move {i}: {}", text(&out));
        let task = task.expect("task JSON");
        assert_eq!(task["result"]["status"], "completed", "{task}");
        host = to;
        // The journal goes on appending on the new host, on top of everything written before.
        let s = wait_for("the journal to advance", Duration::from_secs(60), || {
            let s = lab.guest_stats(&addr);
            (s["disk"]["next_seq"].as_u64().unwrap_or(0) > seq).then_some(s)
        });
        assert_eq!(s["boot_id"], boot_id, "the guest rebooted: {s}");
        assert_eq!(s["disk"]["errors"], 0, "disk journal after move {i}: {s}");
        assert_eq!(s["mem"]["errors"], 0, "memory verifier after move {i}: {s}");
        seq = s["disk"]["next_seq"].as_u64().unwrap_or(0);
        eprintln!(
            "move {i} → {to}: pause {} ms, journal at record {seq}",
            task["result"]["pause_ms"]
        );
    }
    let report: Value = client.finish();
    for k in ["resets", "missing", "duplicates", "corrupt", "boot_changes"] {
        assert_eq!(report[k], 0, "{k}: {report}");
    }
    lab.one_copy_on("sanvm", &id, host);

    // On the target's own backing file: every record the guest reported written is there, in
    // order, with its checksum (the layout of crates/tern-guest/src/disk.rs).
    lab.tern_ok(&["vm", "stop", "sanvm", "--force"]);
    let lun_file = lab.dir.join("san/lun1.img");
    let bytes = std::fs::read(&lun_file).expect("the LUN's backing file");
    let records = journal_records(&bytes, None);
    assert!(
        records >= seq,
        "the LUN holds {records} journal records; the guest had written {seq}"
    );
    lab.down();
}
