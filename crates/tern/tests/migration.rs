//! Live migration in the lab, through the CLI: a VM moves h1 → h2 while the client namespace
//! streams from it (no reset, nothing missing or duplicated, same IP and MAC, same boot); a
//! dirtying guest moves with its memory verifier finding no error; and every fault — the
//! destination QEMU killed during pre-copy, `tern task cancel`, the deadline, the center
//! restarting mid-way — ends with exactly one running copy, on the source.

mod common;

use std::time::Duration;

use common::{processes_mentioning, text, wait_for, Lab};
use serde_json::Value;

const READY: &str = "TERN-GUEST-READY";
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn create(lab: &Lab, name: &str, ip: &str, mac: &str, extra_cmdline: &str) -> String {
    let cmdline =
        format!("console=ttyS0 ipv6.disable=1 tern.ip={ip}/24 tern.serve=7000 {extra_cmdline}");
    let kernel = lab.guest_kernel();
    let initrd = lab.guest_initrd();
    lab.tern_ok(&[
        "vm",
        "create",
        name,
        "--cluster",
        "lab",
        "--host",
        "h1",
        "--vcpus",
        "1",
        "--memory-mib",
        "256",
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--cmdline",
        &cmdline,
        "--mac",
        mac,
    ]);
    lab.tern_ok(&["vm", "start", name]);
    lab.wait_console(name, READY, BOOT_TIMEOUT);
    let vm: Value = lab.tern_json(&["vm", "show", name]);
    vm["id"].as_str().expect("vm id").to_string()
}

/// Exactly one QEMU runs the VM, on `host`; the inventory says so; the other host keeps no
/// trace of it.
fn one_copy_on(lab: &Lab, name: &str, id: &str, host: &str) {
    let vm: Value = lab.tern_json(&["vm", "show", name]);
    assert_eq!(vm["host"], host, "{vm}");
    let qemus: Vec<(u32, String)> = processes_mentioning(&format!("-uuid {id}"))
        .into_iter()
        .filter(|(_, c)| c.contains("qemu-system"))
        .collect();
    assert_eq!(qemus.len(), 1, "QEMUs of VM {name}: {qemus:#?}");
    assert!(
        qemus[0].1.contains(&format!("/hosts/{host}/vms/{id}")),
        "the copy is not {host}'s: {}",
        qemus[0].1
    );
    let other = if host == "h1" { "h2" } else { "h1" };
    let leftover = lab.dir.join(format!("hosts/{other}/vms/{id}"));
    wait_for(
        &format!("{} to disappear", leftover.display()),
        Duration::from_secs(30),
        || (!leftover.exists()).then_some(()),
    );
    wait_for(
        &format!("VM {name} to be running"),
        Duration::from_secs(30),
        || {
            let v: Value = lab.tern_json(&["vm", "show", name]);
            (v["actual_state"] == "running").then_some(())
        },
    );
}

/// The migration task's result, from `tern vm migrate ... -o json`.
fn migrate_json(lab: &Lab, args: &[&str]) -> (std::process::Output, Option<Value>) {
    let mut a = vec!["vm", "migrate"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["-o", "json"]);
    let out = lab.tern(&a);
    let task = serde_json::from_slice::<Value>(&out.stdout).ok();
    (out, task)
}

/// Waits for a task to end; returns it.
fn wait_task(lab: &Lab, id: &str) -> Value {
    wait_for(
        &format!("task {id} to end"),
        Duration::from_secs(180),
        || {
            let t: Value = lab.tern_json(&["task", "show", id]);
            matches!(
                t["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            )
            .then_some(t)
        },
    )
}

/// Starts a slow migration (2 MiB/s) in the background; returns its task id once pre-copy
/// runs and the destination QEMU exists.
fn start_slow(lab: &Lab, name: &str, to: &str, id: &str) -> String {
    let task = lab
        .tern_ok(&[
            "vm",
            "migrate",
            name,
            "--to",
            to,
            "--bandwidth",
            "16",
            "--detach",
        ])
        .trim()
        .to_string();
    let pidfile = lab.dir.join(format!("hosts/{to}/vms/{id}/qemu.pid"));
    wait_for("pre-copy to run", Duration::from_secs(60), || {
        let t: Value = lab.tern_json(&["task", "show", &task]);
        (pidfile.exists() && t["phase"].as_str().unwrap_or("").starts_with("pre-copy"))
            .then_some(())
    });
    task
}

#[test]
fn live_migration_moves_vms_and_every_fault_leaves_one_copy() {
    let mut lab = Lab::up("mig", 2);

    // 1. An idle VM moves with the client streaming from it.
    let idle = create(&lab, "idle", "10.78.0.100", "52:54:00:7e:01:01", "");
    let before = lab.guest_stats("10.78.0.100:7000");
    let streamer = {
        let dir = lab.dir.clone();
        let prefix = lab.prefix.clone();
        let exe = common::guest_dir().join("tern-guest");
        std::thread::spawn(move || {
            std::process::Command::new(common::tern_exe())
                .args(["lab", "--dir"])
                .arg(&dir)
                .args(["client", "--prefix", &prefix, "--"])
                .arg(exe)
                .args([
                    "client",
                    "--addr",
                    "10.78.0.100:7000",
                    "--duration-ms",
                    "15000",
                    "--json",
                ])
                .env("TERN_LAB_DIR", &dir)
                .output()
                .expect("run the client")
        })
    };
    // Let the stream run a little before the move.
    std::thread::sleep(Duration::from_secs(2));
    let (out, task) = migrate_json(&lab, &["idle", "--to", "h2"]);
    assert!(out.status.success(), "{}", text(&out));
    let task = task.expect("task JSON");
    let r = &task["result"];
    assert_eq!(r["status"], "completed", "{task}");
    assert_eq!(
        (r["from"].as_str(), r["to"].as_str()),
        (Some("h1"), Some("h2"))
    );
    let (downtime, pause, total) = (
        r["downtime_ms"].as_u64().unwrap_or(0),
        r["pause_ms"].as_u64().unwrap_or(0),
        r["total_ms"].as_u64().unwrap_or(0),
    );
    assert!(downtime > 0 && downtime < 2000, "{r}");
    assert!(pause >= downtime && pause < 3000, "{r}");
    let client = streamer.join().expect("client thread");
    let report: Value = String::from_utf8_lossy(&client.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l.trim()).ok())
        .unwrap_or_else(|| panic!("no client report:\n{}", text(&client)));
    eprintln!(
        "MEASURED idle VM h1→h2: QEMU downtime {downtime} ms, guest pause {pause} ms, total \
         {total} ms; client: longest gap {} ms, records {}",
        report["longest_gap_ms"], report["records"]
    );
    for k in ["resets", "missing", "duplicates", "corrupt", "boot_changes"] {
        assert_eq!(report[k], 0, "{k}: {report}");
    }
    assert!(report["records"].as_u64().unwrap_or(0) > 100, "{report}");
    // Same guest, same IP (it answers there), same MAC, now on h2 under a new generation.
    let after = lab.guest_stats("10.78.0.100:7000");
    assert_eq!(after["boot_id"], before["boot_id"]);
    let vm: Value = lab.tern_json(&["vm", "show", "idle"]);
    assert_eq!(vm["spec"]["nics"][0]["mac"], "52:54:00:7e:01:01");
    assert_eq!(vm["generation"], 2, "{vm}");
    one_copy_on(&lab, "idle", &idle, "h2");
    let events: Vec<Value> = lab.tern_json(&["event", "list", "--vm", "idle"]);
    let said = |needle: &str| {
        events
            .iter()
            .any(|e| e["message"].as_str().unwrap_or("").contains(needle))
    };
    for needle in [
        "pre-check cpu: ok",
        "setting: max-bandwidth",
        "ownership intent recorded",
        "steered the LAN to",
        "switchover timeline",
        "committed:",
    ] {
        assert!(said(needle), "no `{needle}` event: {events:#?}");
    }

    // 2. A guest dirtying its memory moves, and its verifier finds every page right.
    let busy = create(
        &lab,
        "busy",
        "10.78.0.101",
        "52:54:00:7e:01:02",
        "tern.mem=64 tern.dirty=32",
    );
    let before = lab.guest_stats("10.78.0.101:7000");
    let (out, task) = migrate_json(&lab, &["busy", "--to", "h2"]);
    assert!(out.status.success(), "{}", text(&out));
    let r = task.expect("task JSON")["result"].clone();
    eprintln!(
        "MEASURED dirtying VM h1→h2: QEMU downtime {} ms, guest pause {} ms, total {} ms, {} passes",
        r["downtime_ms"], r["pause_ms"], r["total_ms"], r["passes"]
    );
    one_copy_on(&lab, "busy", &busy, "h2");
    let passes = before["mem"]["passes"].as_u64().unwrap_or(0);
    let after = wait_for(
        "two verifier passes after the move",
        Duration::from_secs(120),
        || {
            let s = lab.guest_stats("10.78.0.101:7000");
            (s["mem"]["passes"].as_u64().unwrap_or(0) >= passes + 2).then_some(s)
        },
    );
    assert_eq!(after["boot_id"], before["boot_id"]);
    assert_eq!(after["mem"]["errors"], 0, "{after}");

    // 3. Faults, each on a slow migration back to h1; the VM must stay on h2, alone.
    // 3a. The destination QEMU dies during pre-copy.
    let task = start_slow(&lab, "busy", "h1", &busy);
    let pid: i32 = std::fs::read_to_string(lab.dir.join(format!("hosts/h1/vms/{busy}/qemu.pid")))
        .expect("destination pidfile")
        .trim()
        .parse()
        .expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the destination QEMU");
    let t = wait_task(&lab, &task);
    assert_eq!(t["state"], "failed", "{t}");
    assert_eq!(t["result"]["status"], "rolled_back", "{t}");
    one_copy_on(&lab, "busy", &busy, "h2");

    // 3b. The user cancels.
    let task = start_slow(&lab, "busy", "h1", &busy);
    lab.tern_ok(&["task", "cancel", &task]);
    let t = wait_task(&lab, &task);
    assert_eq!(t["state"], "cancelled", "{t}");
    wait_for("the rollback's result", Duration::from_secs(30), || {
        let t: Value = lab.tern_json(&["task", "show", &task]);
        (t["result"]["status"] == "rolled_back").then_some(())
    });
    one_copy_on(&lab, "busy", &busy, "h2");

    // 3c. The deadline passes.
    let (out, task) = migrate_json(
        &lab,
        &[
            "busy",
            "--to",
            "h1",
            "--bandwidth",
            "16",
            "--deadline",
            "4s",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = task.expect("task JSON");
    assert!(
        t["error"].as_str().unwrap_or("").contains("deadline"),
        "{t}"
    );
    one_copy_on(&lab, "busy", &busy, "h2");

    // 3d. The center dies mid-way; the restarted center reads the ownership record (not
    // committed) and rolls back.
    let task = start_slow(&lab, "busy", "h1", &busy);
    let center = lab.pid("center");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(center as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the center");
    let out = lab.lab_cmd(&["lab", "start", "center"]);
    assert!(out.status.success(), "{}", text(&out));
    let t = wait_task(&lab, &task);
    assert_eq!(t["state"], "failed", "{t}");
    one_copy_on(&lab, "busy", &busy, "h2");
    wait_for("the recovery to settle", Duration::from_secs(60), || {
        let events: Vec<Value> = lab.tern_json(&["event", "list", "--vm", "busy"]);
        events
            .iter()
            .any(|e| {
                e["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("settled: it runs on h2 only")
            })
            .then_some(())
    });

    // And it still moves once nothing is in the way.
    let (out, _) = migrate_json(&lab, &["busy", "--to", "h1"]);
    assert!(out.status.success(), "{}", text(&out));
    one_copy_on(&lab, "busy", &busy, "h1");
    let s = lab.guest_stats("10.78.0.101:7000");
    assert_eq!(s["mem"]["errors"], 0, "{s}");
    lab.down();
}
