//! Host maintenance mode and migration refusals in the lab, through the CLI (one lab, three
//! hosts, real QEMU guests under TCG):
//! - `tern host maintenance enter h1` live-migrates h1's two running VMs to h2 and h3 (one
//!   each: the engine spreads them; both at once, within the per-host limit) while the client namespace streams from one of them (no
//!   reset, nothing missing or duplicated), re-homes a small stopped VM, leaves a stopped VM no
//!   host has room for where it is (with a warning), and leaves h1 in maintenance with exactly
//!   one QEMU per VM;
//! - while h1 is in maintenance, migrating to it, creating a VM on it and starting a VM
//!   registered on it are refused naming maintenance (exit 4), nothing moving;
//! - a migration is refused before anything moves (exit 4, VM untouched, no QEMU on the
//!   destination) when the destination lacks memory or the VM's disk is not on the shared
//!   storage; an unknown destination is "not found" (exit 3);
//! - `tern host maintenance exit h1` returns h1 to service and a migration to it works again.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::{text, Lab};
use serde_json::Value;

const READY: &str = "TERN-GUEST-READY";
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `tern vm create NAME --host HOST ...`, not started.
fn create_args(
    lab: &Lab,
    name: &str,
    host: &str,
    memory_mib: &str,
    ip: &str,
    mac: &str,
) -> Vec<String> {
    let memory = memory_mib.parse().expect("memory in MiB");
    lab.vm_create_args(name, host, ip, mac, memory, "", &[])
}

fn tern_s(lab: &Lab, args: &[String]) -> Output {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.tern(&a)
}

fn vm_json(lab: &Lab, name: &str) -> Value {
    lab.tern_json(&["vm", "show", name])
}

/// `tern vm migrate NAME --to TO` must be refused with `exit` before anything moved: the
/// message names `needle`, the VM stays alone on `host`, nothing of it exists on `to`.
fn refused(lab: &Lab, name: &str, id: &str, host: &str, to: &str, exit: i32, needle: &str) {
    let tasks_before: Vec<Value> = lab.tern_json(&["task", "list"]);
    let o = lab.tern(&["vm", "migrate", name, "--to", to]);
    assert_eq!(code(&o), exit, "migrate {name} --to {to}:\n{}", text(&o));
    assert!(
        stderr(&o).contains(needle),
        "the refusal of {name} → {to} should name `{needle}`:\n{}",
        text(&o)
    );
    eprintln!("REFUSED {name} → {to}: {}", stderr(&o).trim());
    let tasks_after: Vec<Value> = lab.tern_json(&["task", "list"]);
    assert_eq!(
        tasks_after.len(),
        tasks_before.len(),
        "a refused migration queues no task"
    );
    assert!(
        !lab.dir.join(format!("hosts/{to}/vms/{id}")).exists(),
        "{to} was prepared for {name}"
    );
    lab.one_copy_on(name, id, host);
    let vm = vm_json(lab, name);
    assert_eq!(vm["generation"], 2, "{vm}");
}

#[test]
fn maintenance_empties_a_host_live_and_refusals_leave_vms_alone() {
    let lab = Lab::up("mnt", 3);

    // Two running VMs on h1 (b with a disk on the shared storage), two stopped ones: a small
    // one the scheduler can re-home, and one so big that no other host has room for it.
    let disk = lab.shared().join("b-disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create b's disk");
    let disk_s = disk.display().to_string();
    let mut b_args = create_args(&lab, "b", "h1", "256", "10.78.0.111", "52:54:00:4d:00:02");
    b_args.extend(["--disk".to_string(), disk_s.clone()]);
    for args in [
        create_args(&lab, "a", "h1", "256", "10.78.0.110", "52:54:00:4d:00:01"),
        b_args,
        create_args(
            &lab,
            "parked",
            "h1",
            "64",
            "10.78.0.112",
            "52:54:00:4d:00:03",
        ),
    ] {
        let o = tern_s(&lab, &args);
        assert!(o.status.success(), "{args:?}:\n{}", text(&o));
    }
    let h1: Value = lab.tern_json(&["host", "show", "h1"]);
    let host_mib = h1["facts"]["memory_mib"].as_u64().expect("host memory");
    let huge_mib = (host_mib - 128).to_string();
    let o = tern_s(
        &lab,
        &create_args(
            &lab,
            "huge",
            "h1",
            &huge_mib,
            "10.78.0.113",
            "52:54:00:4d:00:04",
        ),
    );
    assert!(o.status.success(), "create huge:\n{}", text(&o));
    for vm in ["a", "b"] {
        lab.tern_ok(&["vm", "start", vm]);
    }
    for vm in ["a", "b"] {
        lab.wait_console(vm, READY, BOOT_TIMEOUT);
    }
    let id = |vm: &str| vm_json(&lab, vm)["id"].as_str().expect("id").to_string();
    let (a_id, b_id) = (id("a"), id("b"));
    let parked_gen = vm_json(&lab, "parked")["generation"].as_u64();

    // The client streams from a through the whole evacuation (connected before it starts).
    let streamer = lab.spawn_stream_client("10.78.0.110:7000", 25_000);

    // 1. Enter maintenance: both running VMs leave h1 live, spread over h2 and h3.
    let started = std::time::Instant::now();
    let o = lab.tern(&["host", "maintenance", "enter", "h1", "-o", "json"]);
    assert!(o.status.success(), "maintenance enter h1:\n{}", text(&o));
    let evacuation = started.elapsed();
    assert!(
        !streamer.is_finished(),
        "the evacuation ({evacuation:?}) outlasted the client's stream: make the stream longer"
    );
    let task: Value = serde_json::from_slice(&o.stdout).expect("task JSON");
    assert_eq!(task["kind"], "host_maintenance_enter", "{task}");
    assert_eq!(task["state"], "succeeded", "{task}");
    let r = &task["result"];
    let dest = |vm: &str| -> String {
        r["migrated"]
            .as_array()
            .and_then(|m| m.iter().find(|x| x["vm"] == vm))
            .and_then(|x| x["to"].as_str())
            .unwrap_or_else(|| panic!("{vm} was not migrated: {r}"))
            .to_string()
    };
    let (a_host, b_host) = (dest("a"), dest("b"));
    assert!(
        ["h2", "h3"].contains(&a_host.as_str()) && ["h2", "h3"].contains(&b_host.as_str()),
        "{r}"
    );
    assert_ne!(a_host, b_host, "the scheduler should spread the VMs: {r}");
    // The two migrations ran at once (the per-host limit is 2): each began before the other
    // ended.
    let span = |vm: &str| {
        let id = r["migrated"]
            .as_array()
            .and_then(|m| m.iter().find(|x| x["vm"] == vm))
            .and_then(|x| x["task"].as_str())
            .unwrap_or_else(|| panic!("{vm}'s migration task: {r}"))
            .to_string();
        let t: Value = lab.tern_json(&["task", "show", &id]);
        let at = |k: &str| {
            chrono::DateTime::parse_from_rfc3339(t[k].as_str().unwrap_or_default())
                .unwrap_or_else(|e| panic!("{k} of task {id}: {e}: {t}"))
        };
        (at("created_at"), at("finished_at"))
    };
    let (sa, ea) = span("a");
    let (sb, eb) = span("b");
    assert!(
        sa < eb && sb < ea,
        "the evacuation's migrations overlap: a {sa}..{ea}, b {sb}..{eb}"
    );
    eprintln!(
        "MEASURED maintenance enter h1: 2 VMs migrated (a → {a_host}, b → {b_host}) in {:.1} s",
        evacuation.as_secs_f64()
    );
    // The small stopped VM was re-homed (ownership moved: generation bumped); the huge one
    // stays with a reason.
    let rehomed = r["rehomed"].as_array().cloned().unwrap_or_default();
    assert_eq!(rehomed.len(), 1, "{r}");
    assert_eq!(rehomed[0]["vm"], "parked", "{r}");
    let parked = vm_json(&lab, "parked");
    assert_eq!(parked["host"], rehomed[0]["to"], "{parked}");
    assert_ne!(parked["host"], "h1");
    assert_eq!(
        parked["generation"].as_u64(),
        parked_gen.map(|g| g + 1),
        "{parked}"
    );
    let left = r["left"].as_array().cloned().unwrap_or_default();
    assert_eq!(left.len(), 1, "{r}");
    assert_eq!(left[0]["vm"], "huge", "{r}");
    assert_eq!(vm_json(&lab, "huge")["host"], "h1");

    let h1: Value = lab.tern_json(&["host", "show", "h1"]);
    assert_eq!(h1["state"], "maintenance", "{h1}");
    assert_eq!(h1["vms"], serde_json::json!(["huge"]), "{h1}");
    lab.one_copy_on("a", &a_id, &a_host);
    lab.one_copy_on("b", &b_id, &b_host);
    let events: Vec<Value> = lab.tern_json(&["event", "list", "--host", "h1", "--limit", "500"]);
    let said = |needle: &str| {
        events
            .iter()
            .any(|e| e["message"].as_str().unwrap_or("").contains(needle))
    };
    for needle in [
        "entered maintenance mode",
        "decision: VM a goes to",
        "decision: VM b goes to",
        "host h1 is entering maintenance",
        "decision: stopped VM parked re-homed",
        "stopped VM huge stays on host h1",
    ] {
        assert!(said(needle), "no `{needle}` event: {events:#?}");
    }

    // 2. Entering again is a no-op for the VMs: huge has no room anywhere, so it stays.
    let o = lab.tern(&["host", "maintenance", "enter", "h1", "-o", "json"]);
    assert!(o.status.success(), "enter again:\n{}", text(&o));

    // 3. h1 in maintenance takes nothing: no migration, no new VM, no start.
    refused(&lab, "a", &a_id, &a_host, "h1", 4, "maintenance");
    let o = tern_s(
        &lab,
        &create_args(
            &lab,
            "late",
            "h1",
            "256",
            "10.78.0.114",
            "52:54:00:4d:00:05",
        ),
    );
    assert_eq!(code(&o), 4, "create on h1:\n{}", text(&o));
    assert!(stderr(&o).contains("maintenance"), "{}", text(&o));
    let o = lab.tern(&["vm", "start", "huge"]);
    assert_eq!(code(&o), 4, "start huge on h1:\n{}", text(&o));
    assert!(stderr(&o).contains("maintenance"), "{}", text(&o));
    assert_eq!(vm_json(&lab, "huge")["actual_state"], "stopped");

    // 4. Other refusals, each before anything moves.
    refused(&lab, "a", &a_id, &a_host, "nosuch", 3, "nosuch");
    // The destination lacks memory: a stopped VM placed there holds nearly all of it.
    let fill_mib = (host_mib - 256 - 128).to_string();
    let o = tern_s(
        &lab,
        &create_args(
            &lab,
            "filler",
            &b_host,
            &fill_mib,
            "10.78.0.115",
            "52:54:00:4d:00:06",
        ),
    );
    assert!(o.status.success(), "create filler:\n{}", text(&o));
    refused(&lab, "a", &a_id, &a_host, &b_host, 4, "memory");
    lab.tern_ok(&["vm", "delete", "filler"]);
    // b's disk leaves the shared storage (QEMU keeps its open file): the destination could
    // not open it, so the migration is refused.
    let local = lab.dir.join("b-disk-local.img");
    std::fs::rename(&disk, &local).expect("move b's disk");
    std::os::unix::fs::symlink(&local, &disk).expect("link b's disk");
    refused(&lab, "b", &b_id, &b_host, &a_host, 4, "storage");
    restore_disk(&disk, &local);

    // The stream from a never broke (it ran through the evacuation and the refusals).
    let report = streamer.finish();
    eprintln!(
        "MEASURED client during the evacuation: longest gap {} ms, records {}",
        report["longest_gap_ms"], report["records"]
    );
    for k in ["resets", "missing", "duplicates", "corrupt", "boot_changes"] {
        assert_eq!(report[k], 0, "{k}: {report}");
    }
    assert!(report["records"].as_u64().unwrap_or(0) > 100, "{report}");

    // 5. Exit: h1 serves again; a moves there.
    lab.tern_ok(&["vm", "delete", "huge"]);
    let o = lab.tern(&["host", "maintenance", "exit", "h1", "-o", "json"]);
    assert!(o.status.success(), "maintenance exit h1:\n{}", text(&o));
    let t: Value = serde_json::from_slice(&o.stdout).expect("task JSON");
    assert_eq!(t["kind"], "host_maintenance_exit", "{t}");
    let h1: Value = lab.tern_json(&["host", "show", "h1"]);
    assert_eq!(h1["state"], "connected", "{h1}");
    let o = lab.tern(&["vm", "migrate", "a", "--to", "h1"]);
    assert!(o.status.success(), "migrate a to h1:\n{}", text(&o));
    lab.one_copy_on("a", &a_id, "h1");
    lab.down();
}

fn restore_disk(disk: &Path, local: &Path) {
    std::fs::remove_file(disk).expect("remove the link");
    std::fs::rename(local, disk).expect("put b's disk back");
}
