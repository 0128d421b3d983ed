//! A VM whose disk is a LUN of a real iSCSI target: the lab's SAN (Debian's `tgt` in a storage
//! namespace, on a storage network of its own), registered as datastore `san` and opened on
//! each host by QEMU's userspace initiator. The guest appends a checksummed journal to the LUN
//! while it moves four times between two hosts with a client streaming from it: the journal
//! verifies after every move (nothing written before a hand-over is lost or torn), the stream
//! stays intact, and one copy runs.
//!
//! Around that: the datastore catalogue refuses bad input (a name reused, the same storage
//! twice, a path outside the hosts' storage root, a volume climbing out, a datastore in use);
//! a move to a host whose storage link is down is refused naming the datastore; and the target
//! killed mid-run is noticed by the center (host and VM events), blocks every move, and once
//! it is back the VM's journal goes on where it stopped and the VM moves again.

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

    // The lab registered its storage: both datastores, reached by both hosts.
    let stores: Vec<Value> = wait_for("both hosts to report", Duration::from_secs(30), || {
        let l: Vec<Value> = lab.tern_json(&["datastore", "list"]);
        let all_reach = l.len() == 2
            && l.iter().all(|d| {
                d["hosts"]
                    .as_array()
                    .is_some_and(|h| h.len() == 2 && h.iter().all(|r| r["reachable"] == true))
            });
        all_reach.then_some(l)
    });
    let kinds: Vec<(&str, &str)> = stores
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap_or(""),
                d["backend"]["kind"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [("san", "iscsi"), ("shared", "directory")],
        "{stores:?}"
    );

    // Bad datastores: refused with the reason, the catalogue unchanged.
    let outside = lab.dir.join("not-shared");
    std::fs::create_dir_all(&outside).expect("mkdir");
    let outside = outside.display().to_string();
    let shared = lab.shared().display().to_string();
    for (args, why) in [
        (vec!["shared2", "--directory", &shared], "already"),
        (
            vec!["shared", "--directory", "/srv/elsewhere"],
            "exists already",
        ),
        (vec!["up", "--directory", "/srv/../etc"], "without '..'"),
        (vec!["local", "--directory", &outside], "not beneath"),
        (
            vec![
                "san2",
                "--iscsi",
                "10.79.0.2:3260",
                "--iqn",
                "iqn.2026-12.lab.tern:san",
            ],
            "already",
        ),
        (
            vec!["bad", "--iscsi", "10.79.0.2:3260", "--iqn", "IQN;reboot"],
            "not an iSCSI name",
        ),
        (vec!["Bad_Name", "--block", "wwn-0x1"], "not valid"),
    ] {
        let mut a = vec!["datastore", "add"];
        a.extend(args.iter().copied());
        let out = lab.tern(&a);
        assert!(!out.status.success(), "{a:?} was accepted: {}", text(&out));
        assert!(text(&out).contains(why), "{a:?}: {}", text(&out));
    }
    let after: Vec<Value> = lab.tern_json(&["datastore", "list"]);
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(!std::path::Path::new(&outside)
        .join(".tern-datastore")
        .exists());

    // Bad disks first: refused with the reason, nothing created.
    for (disk, why) in [
        ("san:../1", "LUN number"),
        ("shared:../../etc/passwd", "starting with '.'"),
        ("nosuch:1", "no datastore named nosuch"),
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

    // The VM's disk named by datastore and volume: LUN 1 of the SAN.
    let disk = "san:1,format=raw".to_string();
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
    let vm: Value = lab.tern_json(&["vm", "show", "sanvm"]);
    assert_eq!(vm["spec"]["disks"][0]["path"], lun.as_str(), "{vm}");
    assert_eq!(vm["spec"]["disks"][0]["datastore"], "san", "{vm}");
    let san: Value = lab.tern_json(&["datastore", "show", "san"]);
    assert_eq!(san["used_by"], serde_json::json!(["sanvm"]), "{san}");
    let out = lab.tern(&["datastore", "remove", "san"]);
    assert!(
        !out.status.success() && text(&out).contains("in use by VM(s) sanvm"),
        "{}",
        text(&out)
    );
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
    assert!(t.contains("cannot reach datastore san"), "{t}");
    // The center's own periodic check notices too, and says so once.
    wait_event(&lab, "datastore san is unreachable from host h2");
    set_link("up");
    wait_event(&lab, "datastore san is reachable again from host h2");
    let vm: Value = lab.tern_json(&["vm", "show", "sanvm"]);
    assert_eq!(vm["host"], "h1", "{vm}");

    let mut host = "h1";
    let mut seq = first["disk"]["next_seq"].as_u64().unwrap_or(0);
    for i in 0..4 {
        host = if host == "h1" { "h2" } else { "h1" };
        seq = move_keeping_the_journal(&lab, "sanvm", host, &addr, seq, &boot_id);
        eprintln!("move {i} → {host}: journal at record {seq}");
    }
    let report: Value = client.finish();
    for k in ["resets", "missing", "duplicates", "corrupt", "boot_changes"] {
        assert_eq!(report[k], 0, "{k}: {report}");
    }
    lab.one_copy_on("sanvm", &id, host);

    // The SAN fails under the running VM: the center raises it for the host and the VM, and no
    // move is allowed while no host reaches the disk.
    let out = lab.lab_cmd(&["lab", "san", "stop"]);
    assert!(out.status.success(), "lab san stop: {}", text(&out));
    wait_event(
        &lab,
        &format!("datastore san is unreachable from host {host}"),
    );
    wait_event(
        &lab,
        &format!("VM sanvm: its host {host} lost datastore san"),
    );
    let other = if host == "h1" { "h2" } else { "h1" };
    let (out, _) = lab.migrate_json(&["sanvm", "--to", other]);
    assert!(!out.status.success(), "moved without a SAN: {}", text(&out));
    assert!(
        text(&out).contains("cannot reach datastore san"),
        "{}",
        text(&out)
    );
    // Back: the initiator logs in again, the journal goes on from where it was, and the VM
    // moves again.
    let out = lab.lab_cmd(&["lab", "san", "start"]);
    assert!(out.status.success(), "lab san start: {}", text(&out));
    wait_event(
        &lab,
        &format!("datastore san is reachable again from host {host}"),
    );
    let before = lab.guest_stats(&addr)["disk"]["next_seq"]
        .as_u64()
        .unwrap_or(0);
    let s = wait_for("the journal to resume", Duration::from_secs(120), || {
        let s = lab.guest_stats(&addr);
        (s["disk"]["next_seq"].as_u64().unwrap_or(0) > before + 2).then_some(s)
    });
    assert_eq!(
        s["disk"]["errors"], 0,
        "journal after the SAN came back: {s}"
    );
    assert_eq!(s["boot_id"], boot_id, "{s}");
    let resumed = s["disk"]["next_seq"].as_u64().unwrap_or(0);
    host = other;
    seq = move_keeping_the_journal(&lab, "sanvm", host, &addr, resumed, &boot_id);
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

/// Moves `vm` to `to` and waits for its journal (served at `addr`) to append past `seq` on
/// the new host, on top of everything written before: the same boot, no journal or memory
/// error. Returns the journal's next record.
fn move_keeping_the_journal(
    lab: &Lab,
    vm: &str,
    to: &str,
    addr: &str,
    seq: u64,
    boot_id: &Value,
) -> u64 {
    let (out, task) = lab.migrate_json(&[vm, "--to", to]);
    assert!(out.status.success(), "{vm} → {to}: {}", text(&out));
    let task = task.expect("task JSON");
    assert_eq!(task["result"]["status"], "completed", "{task}");
    let s = wait_for("the journal to advance", Duration::from_secs(60), || {
        let s = lab.guest_stats(addr);
        (s["disk"]["next_seq"].as_u64().unwrap_or(0) > seq).then_some(s)
    });
    assert_eq!(&s["boot_id"], boot_id, "the guest rebooted: {s}");
    assert_eq!(
        s["disk"]["errors"], 0,
        "disk journal after {vm} → {to}: {s}"
    );
    assert_eq!(
        s["mem"]["errors"], 0,
        "memory verifier after {vm} → {to}: {s}"
    );
    s["disk"]["next_seq"].as_u64().unwrap_or(0)
}

/// Waits until an event's message contains `needle` (the center's checks run every 2 s in the
/// lab).
fn wait_event(lab: &Lab, needle: &str) {
    wait_for(
        &format!("an event saying {needle:?}"),
        Duration::from_secs(30),
        || {
            let ev: Vec<Value> = lab.tern_json(&["event", "list", "--limit", "200"]);
            ev.iter()
                .any(|e| e["message"].as_str().is_some_and(|m| m.contains(needle)))
                .then_some(())
        },
    );
}

/// A VM whose disk is a block LUN named by its stable id, as a multipath or FC LUN is on a
/// real host (`/dev/disk/by-id/…`; the lab's are loop devices every host namespace sees),
/// registered as a block datastore: the agent opens the device beneath /dev and QEMU gets the
/// descriptor (`host_device`). The guest's journal on it survives three moves, checked on the
/// LUN's backing file. A block datastore naming a device no host has is reported unreachable
/// by every host.
#[test]
fn a_vm_on_a_block_lun_moves_with_its_journal_intact() {
    let lab = Lab::up_with("blk", 2, &["--block-luns", "1", "--block-lun-mib", "64"]);
    let block: Value = wait_for("both hosts to report", Duration::from_secs(30), || {
        let d: Value = lab.tern_json(&["datastore", "show", "block1"]);
        let reached = d["hosts"]
            .as_array()
            .is_some_and(|h| h.len() == 2 && h.iter().all(|r| r["reachable"] == true));
        reached.then_some(d)
    });
    assert_eq!(block["backend"]["kind"], "block", "{block}");

    // A device no host has: added, and every host says it does not reach it.
    lab.tern_ok(&["datastore", "add", "ghost", "--block", "wwn-0xdeadbeef"]);
    let ghost: Value = wait_for("both hosts to answer", Duration::from_secs(30), || {
        let d: Value = lab.tern_json(&["datastore", "show", "ghost"]);
        (d["hosts"].as_array().map(Vec::len) == Some(2)).then_some(d)
    });
    for h in ghost["hosts"].as_array().into_iter().flatten() {
        assert_eq!(h["reachable"], false, "{ghost}");
    }
    // A VM cannot be put on it, naming why.
    let args = lab.vm_create_args(
        "ghostvm",
        "h1",
        "10.78.0.170",
        "52:54:00:5b:00:09",
        128,
        "",
        &["ghost:disk,format=raw"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lab.tern(&args);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("cannot reach datastore ghost"),
        "{}",
        text(&out)
    );
    lab.tern_ok(&["datastore", "remove", "ghost"]);

    let ip = "10.78.0.171";
    let id = lab.create_vm(
        "blkvm",
        "h1",
        ip,
        "52:54:00:5b:00:01",
        256,
        "tern.mem=64 tern.dirty=8 tern.disk=/dev/vda",
        &["block1:disk,format=raw"],
    );
    let addr = format!("{ip}:7000");
    let first = wait_for("the journal to append", Duration::from_secs(60), || {
        let s = lab.guest_stats(&addr);
        (s["disk"]["next_seq"].as_u64().unwrap_or(0) > 0).then_some(s)
    });
    let boot_id = first["boot_id"].clone();
    let mut seq = first["disk"]["next_seq"].as_u64().unwrap_or(0);
    let mut host = "h1";
    for _ in 0..3 {
        host = if host == "h1" { "h2" } else { "h1" };
        seq = move_keeping_the_journal(&lab, "blkvm", host, &addr, seq, &boot_id);
    }
    lab.one_copy_on("blkvm", &id, host);
    lab.tern_ok(&["vm", "stop", "blkvm", "--force"]);
    let bytes = std::fs::read(lab.dir.join("block/lun1.img")).expect("the LUN's backing file");
    let records = journal_records(&bytes, None);
    assert!(
        records >= seq,
        "the LUN holds {records} journal records; the guest had written {seq}"
    );
    lab.down();
}
