//! Live migration in the lab, through the CLI: a VM moves h1 → h2 while the client namespace
//! streams from it (no reset, nothing missing or duplicated, same IP and MAC, same boot); a
//! dirtying guest moves with its memory verifier finding no error; and every fault — the
//! destination QEMU killed during pre-copy, `tern task cancel`, the deadline, the center
//! restarting mid-way (the migration is driven on, then cancelled) — ends with exactly one
//! running copy, on the source; and a post-copy
//! migration whose commit the center's store refuses for a while still goes forward; a center
//! frozen through the switchover cannot hold the guest paused beyond its limit; a link that was
//! slow only while tern measured it does not pace the migration.

mod common;

use std::time::Duration;

use common::{text, wait_for, Lab};
use serde_json::Value;

fn create(lab: &Lab, name: &str, ip: &str, mac: &str, extra_cmdline: &str) -> String {
    lab.create_vm(name, "h1", ip, mac, 256, extra_cmdline, &[])
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

/// Waits for two more passes of the guest's memory verifier than in `before` (its stats
/// then); asserts the same boot and no bad page.
fn verifier_clean_after(lab: &Lab, addr: &str, before: &Value) {
    let passes = before["mem"]["passes"].as_u64().unwrap_or(0);
    let after = wait_for(
        "two verifier passes after the move",
        Duration::from_secs(120),
        || {
            let s = lab.guest_stats(addr);
            (s["mem"]["passes"].as_u64().unwrap_or(0) >= passes + 2).then_some(s)
        },
    );
    assert_eq!(after["boot_id"], before["boot_id"]);
    assert_eq!(after["mem"]["errors"], 0, "{after}");
}

/// `tern task cancel` on a running migration: the task ends cancelled, its result says rolled
/// back, and the VM runs on `source` alone.
fn cancel_rolls_back(lab: &Lab, task: &str, name: &str, id: &str, source: &str) {
    lab.tern_ok(&["task", "cancel", task]);
    let t = wait_task(lab, task);
    assert_eq!(t["state"], "cancelled", "{t}");
    wait_for("the rollback's result", Duration::from_secs(30), || {
        let t: Value = lab.tern_json(&["task", "show", task]);
        (t["result"]["status"] == "rolled_back").then_some(())
    });
    lab.one_copy_on(name, id, source);
}

#[test]
fn live_migration_moves_vms_and_every_fault_leaves_one_copy() {
    let mut lab = Lab::up("mig", 2);

    // 1. An idle VM moves with the client streaming from it.
    let idle = create(&lab, "idle", "10.78.0.100", "52:54:00:7e:01:01", "");
    let before = lab.guest_stats("10.78.0.100:7000");
    let streamer = lab.spawn_stream_client("10.78.0.100:7000", 15000);
    let (out, task) = lab.migrate_json(&["idle", "--to", "h2"]);
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
    let report = streamer.finish();
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
    lab.one_copy_on("idle", &idle, "h2");
    let events: Vec<Value> = lab.tern_json(&["event", "list", "--vm", "idle"]);
    let said = |needle: &str| {
        events
            .iter()
            .any(|e| e["message"].as_str().unwrap_or("").contains(needle))
    };
    for needle in [
        "pre-check cpu: ok",
        "pre-check encryption: ok",
        // The lab's cluster keeps the default policy: every stream encrypted.
        "setting: encryption: on (cluster policy required)",
        // The destination's relay takes the stream from the source's address alone.
        "encrypted by the hosts' relays (taken from 10.77.0.11 only), compression",
        "setting: max-bandwidth",
        "ownership intent recorded",
        "steered the LAN to",
        "switchover timeline",
        "committed:",
    ] {
        assert!(said(needle), "no `{needle}` event: {events:#?}");
    }

    // 1b. With encryption disabled for the cluster, the next migration goes in clear and
    //     says so; the policy is back to required for everything after.
    let set = |mode: &str| {
        let out = lab.tern(&["cluster", "set-migration", "lab", "--encryption", mode]);
        assert!(out.status.success(), "{}", text(&out));
    };
    set("disabled");
    let (out, task) = lab.migrate_json(&["idle", "--to", "h1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(task.expect("task JSON")["result"]["status"], "completed");
    set("required");
    let cluster: Value = lab.tern_json(&["cluster", "show", "lab"]);
    assert_eq!(cluster["migration_encryption"], "required", "{cluster}");
    let events: Vec<Value> = lab.tern_json(&["event", "list", "--vm", "idle"]);
    assert!(
        events.iter().any(|e| e["message"]
            .as_str()
            .unwrap_or("")
            .contains("setting: encryption: off, as the cluster's policy says")),
        "{events:#?}"
    );
    lab.one_copy_on("idle", &idle, "h1");

    // 2. A guest dirtying its memory moves, and its verifier finds every page right.
    let busy = create(
        &lab,
        "busy",
        "10.78.0.101",
        "52:54:00:7e:01:02",
        "tern.mem=64 tern.dirty=32",
    );
    let before = lab.guest_stats("10.78.0.101:7000");
    let (out, task) = lab.migrate_json(&["busy", "--to", "h2"]);
    assert!(out.status.success(), "{}", text(&out));
    let r = task.expect("task JSON")["result"].clone();
    eprintln!(
        "MEASURED dirtying VM h1→h2: QEMU downtime {} ms, guest pause {} ms, total {} ms, {} passes",
        r["downtime_ms"], r["pause_ms"], r["total_ms"], r["passes"]
    );
    lab.one_copy_on("busy", &busy, "h2");
    verifier_clean_after(&lab, "10.78.0.101:7000", &before);

    // 3. Faults, each on a slow migration back to h1; the VM must stay on h2, alone.
    // 3a. The destination QEMU dies during pre-copy.
    let task = lab.start_slow_migration("busy", "h1", &busy);
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
    lab.one_copy_on("busy", &busy, "h2");

    // 3b. The user cancels.
    let task = lab.start_slow_migration("busy", "h1", &busy);
    cancel_rolls_back(&lab, &task, "busy", &busy, "h2");

    // 3c. The deadline passes.
    let (out, task) = lab.migrate_json(&[
        "busy",
        "--to",
        "h1",
        "--bandwidth",
        "16",
        "--deadline",
        "4s",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = task.expect("task JSON");
    assert!(
        t["error"].as_str().unwrap_or("").contains("deadline"),
        "{t}"
    );
    lab.one_copy_on("busy", &busy, "h2");

    // 3d. The center dies in pre-copy. The source goes on copying without it, and the
    // restarted center drives the migration on from the record and the source's word: the
    // task is still running, in pre-copy, and says so. It can still be cancelled: the
    // rollback then undoes both ends.
    let task = lab.start_slow_migration("busy", "h1", &busy);
    let center = lab.pid("center");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(center as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the center");
    // kill(2) returns before the process is gone; the lab refuses to start a second center.
    common::wait_gone(center, "the killed center", Duration::from_secs(10));
    let out = lab.lab_cmd(&["lab", "start", "center"]);
    assert!(out.status.success(), "{}", text(&out));
    let t: Value = lab.tern_json(&["task", "show", &task]);
    assert_eq!(
        t["state"], "running",
        "the restarted center ended the task: {t}"
    );
    wait_for(
        "the resumed task to report pre-copy",
        Duration::from_secs(30),
        || {
            let t: Value = lab.tern_json(&["task", "show", &task]);
            assert_eq!(t["state"], "running", "{t}");
            t["phase"]
                .as_str()
                .unwrap_or("")
                .starts_with("pre-copy pass")
                .then_some(())
        },
    );
    let events: Vec<Value> = lab.tern_json(&["event", "list", "--vm", "busy"]);
    assert!(
        events
            .iter()
            .any(|e| e["task"].as_str() == Some(task.as_str())
                && e["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("driven on from there")),
        "the task does not say it was driven on: {events:#?}"
    );
    cancel_rolls_back(&lab, &task, "busy", &busy, "h2");

    // And it still moves once nothing is in the way.
    let (out, _) = lab.migrate_json(&["busy", "--to", "h1"]);
    assert!(out.status.success(), "{}", text(&out));
    lab.one_copy_on("busy", &busy, "h1");
    let s = lab.guest_stats("10.78.0.101:7000");
    assert_eq!(s["mem"]["errors"], 0, "{s}");

    // 4. Post-copy, and the center's store refuses the commit: the VM must go forward.
    postcopy_with_a_store_that_refuses_the_commit(&lab, &busy);

    // 5. The center hangs while the guest is paused for the switchover: the source gives it
    // back within its pause limit, and the migration rolls back.
    a_hung_center_cannot_hold_the_guest_paused(&mut lab, &busy);

    // 6. The link is slow while tern measures it and fast again when the migration runs: the
    // pace chosen from the measurement is re-judged, and the guest is not throttled for it.
    a_link_misjudged_while_measured_does_not_hold_the_migration_back(&lab, &busy);
    lab.down();
}

/// A migration that cannot converge under its 32 Mbit/s cap switches to post-copy (allowed, at
/// 75% of a 10 s deadline); while the switchover runs, another writer locks the center's
/// store until the center has failed to commit at least once. The destination runs the guest
/// at once all the same (the source can never resume), and once the lock is gone the commit
/// lands: the task succeeds, exactly one copy runs (on the destination, which was never
/// removed), the guest's memory verifier and a client's TCP stream see nothing lost.
fn postcopy_with_a_store_that_refuses_the_commit(lab: &Lab, busy: &str) {
    let before = lab.guest_stats("10.78.0.101:7000");
    let streamer = lab.spawn_stream_client("10.78.0.101:7000", 5000);
    let task = lab
        .tern_ok(&[
            "vm",
            "migrate",
            "busy",
            "--to",
            "h2",
            "--bandwidth",
            "32",
            "--deadline",
            "10s",
            "--allow-postcopy",
            "--detach",
        ])
        .trim()
        .to_string();
    // The last write before the switchover call is its phase; after a post-copy switchover
    // the next one is the commit. The window between them is short (the source sends only
    // the device state), so the store itself is watched, from beside the center (WAL lets a
    // reader in at any time), and locked the moment the phase is there.
    let path = lab.dir.join("center/center.db");
    let watch = rusqlite::Connection::open(&path).expect("center store");
    let db = rusqlite::Connection::open(&path).expect("center store");
    db.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (state, phase): (String, String) = watch
            .query_row(
                "SELECT state, phase FROM tasks WHERE id = ?1",
                [&task],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("the task's row");
        assert!(
            !matches!(state.as_str(), "succeeded" | "failed" | "cancelled"),
            "the migration ended before its switchover: {state}, {phase}"
        );
        if phase.starts_with("switchover") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no switchover in 120 s: {phase}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    db.execute_batch("BEGIN IMMEDIATE").expect("lock the store");
    let log = lab.dir.join("logs/center.log");
    wait_for(
        "the center to fail a commit",
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("post-copy migration cannot be committed yet")
                .then_some(())
        },
    );
    db.execute_batch("COMMIT").expect("release the store");
    drop(db);

    let t = wait_task(lab, &task);
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(t["result"]["status"], "completed", "{t}");
    lab.one_copy_on("busy", busy, "h2");
    let events: Vec<Value> = lab.tern_json(&["event", "list", "--vm", "busy", "--limit", "500"]);
    let said = |needle: &str| {
        events.iter().any(|e| {
            e["task"].as_str() == Some(task.as_str())
                && e["message"].as_str().unwrap_or("").contains(needle)
        })
    };
    for needle in ["switching to post-copy", "committed after", "committed:"] {
        assert!(said(needle), "no `{needle}` event: {events:#?}");
    }
    let report = streamer.finish();
    eprintln!(
        "MEASURED post-copy with the store locked: guest paused {} ms, {} passes, total {} ms; \
         client: longest gap {} ms",
        t["result"]["pause_ms"],
        t["result"]["passes"],
        t["result"]["total_ms"],
        report["longest_gap_ms"]
    );
    for k in ["resets", "missing", "duplicates", "corrupt", "boot_changes"] {
        assert_eq!(report[k], 0, "{k}: {report}");
    }
    // The destination ran the guest before the commit: the pause did not wait out the lock
    // (held at least the store's 5 s busy timeout).
    let pause = t["result"]["pause_ms"].as_u64().unwrap_or(u64::MAX);
    assert!(pause < 3000, "guest paused {pause} ms: {t}");
    verifier_clean_after(lab, "10.78.0.101:7000", &before);
}

/// The center is frozen (SIGSTOP) during pre-copy, so nobody can decide the switchover. The
/// source agent carries the migration on alone, pauses the guest at pre-switchover, and —
/// the switchover watchdog — gives it back after the downtime budget plus its margin
/// (300 ms + 2 s), well before the center runs again. Thawed, the center finds the source's
/// migration ended and rolls back: one copy, on the source, with the client's stream and the
/// guest's memory intact and the stall no longer than that limit.
fn a_hung_center_cannot_hold_the_guest_paused(lab: &mut Lab, busy: &str) {
    let before = lab.guest_stats("10.78.0.101:7000");
    let streamer = lab.spawn_stream_client("10.78.0.101:7000", 5000);
    let task = lab
        .tern_ok(&[
            "vm",
            "migrate",
            "busy",
            "--to",
            "h1",
            "--bandwidth",
            "400",
            "--detach",
        ])
        .trim()
        .to_string();
    wait_for("pre-copy to run", Duration::from_secs(60), || {
        let t: Value = lab.tern_json(&["task", "show", &task]);
        t["phase"]
            .as_str()
            .unwrap_or("")
            .starts_with("pre-copy")
            .then_some(())
    });
    let center = nix::unistd::Pid::from_raw(lab.pid("center") as i32);
    nix::sys::signal::kill(center, nix::sys::signal::Signal::SIGSTOP).expect("freeze the center");
    // Thawed on every way out, so a failing assertion does not leave a frozen center behind.
    struct Thaw(nix::unistd::Pid);
    impl Drop for Thaw {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
        }
    }
    let thaw = Thaw(center);
    let log = lab.dir.join("logs/h2.log");
    wait_for(
        "the source to give the guest back on its own",
        Duration::from_secs(120),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("no switchover decision within")
                .then_some(())
        },
    );
    drop(thaw);

    let t = wait_task(lab, &task);
    assert_eq!(t["state"], "failed", "{t}");
    assert!(
        t["error"]
            .as_str()
            .unwrap_or("")
            .contains("switchover watchdog"),
        "{t}"
    );
    lab.one_copy_on("busy", busy, "h2");
    let report = streamer.finish();
    eprintln!(
        "MEASURED center frozen through the switchover: client longest gap {} ms (pause limit \
         2300 ms)",
        report["longest_gap_ms"]
    );
    for k in ["resets", "missing", "duplicates", "corrupt", "boot_changes"] {
        assert_eq!(report[k], 0, "{k}: {report}");
    }
    // The stall the client saw is the watchdog's limit, not the time the center was frozen.
    let gap = report["longest_gap_ms"].as_f64().unwrap_or(f64::MAX);
    assert!(gap < 2300.0 + 1500.0, "client stalled {gap} ms: {report}");
    verifier_clean_after(lab, "10.78.0.101:7000", &before);
}

/// The destination's link is shaped to 40 Mbit/s while tern measures it, and freed as soon as
/// the measurement is in: the migration starts paced at ~6 MiB/s, far below both the link and
/// the guest's 32 MiB/s of dirtying. Plain pacing would crawl and throttle the guest for
/// minutes; tern sees the stream held back by its own cap, lifts it, paces at what the link
/// carries, and the migration converges without throttling the guest.
fn a_link_misjudged_while_measured_does_not_hold_the_migration_back(lab: &Lab, busy: &str) {
    let before = lab.guest_stats("10.78.0.101:7000");
    let streamer = lab.spawn_stream_client("10.78.0.101:7000", 5000);
    let out = lab.lab_cmd(&["lab", "link", "shape", "h1", "--rate-mbit", "40"]);
    assert!(out.status.success(), "{}", text(&out));
    // Unshaped on every way out, so a failing assertion leaves the lab's link as it was.
    struct Unshape<'a>(&'a Lab);
    impl Drop for Unshape<'_> {
        fn drop(&mut self) {
            let _ = self.0.lab_cmd(&["lab", "link", "unshape", "h1"]);
        }
    }
    let unshape = Unshape(lab);
    let task = lab
        .tern_ok(&[
            "vm",
            "migrate",
            "busy",
            "--to",
            "h1",
            "--detach",
            "--probe-link",
        ])
        .trim()
        .to_string();
    let task_said = |needle: &str| {
        let events: Vec<Value> =
            lab.tern_json(&["event", "list", "--vm", "busy", "--limit", "500"]);
        events.into_iter().find(|e| {
            e["task"].as_str() == Some(task.as_str())
                && e["message"].as_str().unwrap_or("").contains(needle)
        })
    };
    let measured = wait_for("the link measurement", Duration::from_secs(60), || {
        task_said("measured: link")
    });
    drop(unshape);
    let message = measured["message"].as_str().unwrap_or("");
    let mbit: f64 = message
        .split(" Mbit/s")
        .next()
        .and_then(|m| m.rsplit(' ').next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no rate in {message:?}"));
    assert!(
        mbit < 60.0,
        "the shaped link measured {mbit} Mbit/s: {message}"
    );

    let t = wait_task(lab, &task);
    assert_eq!(t["state"], "succeeded", "{t}");
    lab.one_copy_on("busy", busy, "h1");
    // (Unpaced, it may converge before tern has seen enough to pace it anew.)
    assert!(
        task_said("lifting the cap").is_some(),
        "no `lifting the cap` event for {task}"
    );
    assert!(
        task_said("throttling the guest").is_none(),
        "the guest was throttled: {:?}",
        task_said("throttling the guest")
    );
    let report = streamer.finish();
    eprintln!(
        "MEASURED link measured at {mbit} Mbit/s, then unshaped: total {} ms, guest paused {} \
         ms, {} passes; client: longest gap {} ms",
        t["result"]["total_ms"],
        t["result"]["pause_ms"],
        t["result"]["passes"],
        report["longest_gap_ms"]
    );
    for k in ["resets", "missing", "duplicates", "corrupt", "boot_changes"] {
        assert_eq!(report[k], 0, "{k}: {report}");
    }
    verifier_clean_after(lab, "10.78.0.101:7000", &before);
}
