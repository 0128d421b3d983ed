//! Proactive evacuation in the lab, through the CLI (one lab, two hosts, real QEMU guests):
//! - proactive mode automatic: h1's fake EDAC counter of uncorrected memory errors rises, its
//!   agent reports it, the center marks h1 degraded naming the signal and empties it live (a
//!   `host_evacuate` task) while a client streams from its VM (no reset, nothing missing);
//!   nothing new is placed, created or migrated there;
//! - `tern host restore` returns it to service, and the counter it already reported does not
//!   degrade it again;
//! - proactive mode recommend: `tern host degrade h2 --reason ...` marks h2 degraded and an
//!   event recommends `tern host evacuate h2`, but nothing moves until that command runs;
//! - proactive mode off: corrected memory errors beyond the limit are shown, not acted on;
//! - proactive mode automatic again: a host an operator marks degraded is emptied live.
//!
//! The signal's source is faked (the lab's sysfs tree the agent reads), never the decision.

mod common;

use std::time::{Duration, Instant};

use common::{text, Lab};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);

fn host(lab: &Lab, name: &str) -> Value {
    lab.tern_json(&["host", "show", name])
}

fn host_of(lab: &Lab, vm: &str) -> String {
    let v: Value = lab.tern_json(&["vm", "show", vm]);
    v["host"].as_str().unwrap_or_default().to_string()
}

/// Polls `cond` on host `name` (its JSON) until it holds; panics with the last JSON after
/// [`WAIT`].
fn wait_host(lab: &Lab, name: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let h = host(lab, name);
        if cond(&h) {
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "host {name}: {what}, never: {h:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The tasks of `kind` on host `name`.
fn tasks_on(lab: &Lab, kind: &str, name: &str) -> Vec<Value> {
    let all: Vec<Value> = lab.tern_json(&["task", "list"]);
    all.into_iter()
        .filter(|t| t["kind"] == kind && t["host"] == name)
        .collect()
}

fn events(lab: &Lab, host: &str) -> Vec<String> {
    let e: Vec<Value> = lab.tern_json(&["event", "list", "--host", host, "--limit", "500"]);
    e.iter()
        .map(|e| e["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn degraded_signals(h: &Value) -> Vec<String> {
    h["health"]["degraded"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| f["signal"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn degraded_hosts_are_emptied_live_or_recommended_by_mode() {
    let lab = Lab::up("pro", 2);
    let id = lab.create_vm("a", "h1", "10.78.0.150", "52:54:00:7e:05:01", 256, "", &[]);
    let h1 = host(&lab, "h1");
    assert_eq!(h1["health"]["degraded"], serde_json::json!([]), "{h1:#}");
    assert_eq!(
        h1["health"]["report"]["memory_uncorrected"], 0,
        "the lab's EDAC tree reads 0: {h1:#}"
    );

    // 1. Automatic: failing memory on h1 empties it live.
    let set = lab.tern_ok(&["cluster", "set-drs", "lab", "--proactive", "automatic"]);
    assert!(set.contains("proactive automatic"), "{set}");
    let streamer = lab.spawn_stream_client("10.78.0.150:7000", 5_000);
    let started = Instant::now();
    lab.tern_ok(&["lab", "memory-errors", "h1", "--uncorrected", "1"]);
    let h1 = wait_host(&lab, "h1", "degraded", |h| !degraded_signals(h).is_empty());
    assert_eq!(degraded_signals(&h1), vec!["memory_uncorrected"], "{h1:#}");
    let deadline = Instant::now() + WAIT;
    let task = loop {
        let t = tasks_on(&lab, "host_evacuate", "h1");
        if let Some(t) = t.iter().find(|t| {
            matches!(
                t["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            )
        }) {
            break t.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no evacuation of h1 ended: {t:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let emptied = started.elapsed();
    assert_eq!(task["state"], "succeeded", "{task:#}");
    assert_eq!(host_of(&lab, "a"), "h2");
    lab.one_copy_on("a", &id, "h2");
    eprintln!(
        "MEASURED proactive evacuation: EDAC counter raised → h1 empty in {:.1} s",
        emptied.as_secs_f64()
    );
    let said = events(&lab, "h1");
    for needle in [
        "host h1 is degraded: uncorrected memory errors: 0 → 1",
        "emptying host h1 live (1 running VM(s)): uncorrected memory errors",
        "decision: VM a goes to h2",
    ] {
        assert!(
            said.iter().any(|m| m.contains(needle)),
            "no `{needle}` event: {said:#?}"
        );
    }
    let report = streamer.finish();
    eprintln!(
        "MEASURED client during the proactive evacuation: longest gap {} ms",
        report["longest_gap_ms"]
    );
    for k in ["resets", "missing", "duplicates", "corrupt", "boot_changes"] {
        assert_eq!(report[k], 0, "{k}: {report}");
    }

    // Nothing new lands on a degraded host: no migration, no VM created on it, and a VM
    // created without a host goes elsewhere.
    let o = lab.tern(&["vm", "migrate", "a", "--to", "h1"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(text(&o).contains("degraded"), "{}", text(&o));
    let args = lab.vm_create_args("b", "h1", "10.78.0.151", "52:54:00:7e:05:02", 128, "", &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = lab.tern(&args);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(text(&o).contains("degraded"), "{}", text(&o));
    let unplaced: Vec<&str> = {
        let i = args.iter().position(|a| *a == "--host").expect("--host");
        args.iter()
            .enumerate()
            .filter(|(j, _)| *j != i && *j != i + 1)
            .map(|(_, a)| *a)
            .collect()
    };
    lab.tern_ok(&unplaced);
    assert_eq!(host_of(&lab, "b"), "h2");
    let listed = lab.tern_ok(&["host", "list"]);
    assert!(
        listed.contains("degraded: uncorrected memory errors"),
        "{listed}"
    );

    // 2. Restored after the repair: healthy, and the error it already reported does not count
    // again (a heartbeat after the restore is judged from the new baseline).
    let restored_at = chrono::Utc::now();
    let o = lab.tern_ok(&["host", "restore", "h1"]);
    assert!(o.contains("healthy again"), "{o}");
    let h1 = wait_host(&lab, "h1", "a heartbeat after the restore", |h| {
        h["last_heartbeat"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .is_some_and(|t| t > restored_at + chrono::Duration::seconds(1))
    });
    assert!(degraded_signals(&h1).is_empty(), "{h1:#}");

    // 3. Recommend: an operator marks h2 degraded; the center recommends, nothing moves.
    lab.tern_ok(&["cluster", "set-drs", "lab", "--proactive", "recommend"]);
    let o = lab.tern_ok(&["host", "degrade", "h2", "--reason", "fan 3 failing"]);
    assert!(o.contains("marked by an operator: fan 3 failing"), "{o}");
    assert!(
        tasks_on(&lab, "host_evacuate", "h2").is_empty(),
        "recommend mode started an evacuation"
    );
    let said = events(&lab, "h2");
    assert!(
        said.iter().any(|m| m.contains(
            "recommendation: empty degraded host h2 (marked by an operator: fan 3 failing) \
             with tern host evacuate h2"
        )),
        "{said:#?}"
    );
    assert_eq!(host_of(&lab, "a"), "h2");
    // The operator follows the recommendation: a moves back to h1, live.
    let o = lab.tern(&["host", "evacuate", "h2", "-o", "json"]);
    assert!(o.status.success(), "{}", text(&o));
    let t: Value = serde_json::from_slice(&o.stdout).expect("task JSON");
    assert_eq!(t["kind"], "host_evacuate", "{t}");
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(host_of(&lab, "a"), "h1");
    lab.one_copy_on("a", &id, "h1");
    // The stopped VM b stays registered where it was (an evacuation moves running VMs).
    assert_eq!(host_of(&lab, "b"), "h2");
    lab.tern_ok(&["host", "restore", "h2"]);

    // 4. Off: corrected errors beyond the limit are shown, and h1 stays in service.
    lab.tern_ok(&["cluster", "set-drs", "lab", "--proactive", "off"]);
    lab.tern_ok(&["lab", "memory-errors", "h1", "--corrected", "25"]);
    let h1 = wait_host(&lab, "h1", "an ignored signal", |h| {
        h["health"]["ignored"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
    });
    assert!(degraded_signals(&h1).is_empty(), "{h1:#}");
    assert_eq!(
        h1["health"]["ignored"][0]["signal"], "memory_corrected",
        "{h1:#}"
    );
    let said = events(&lab, "h1");
    assert!(
        said.iter()
            .any(|m| m.contains("reports corrected memory errors") && m.contains("mode is off")),
        "{said:#?}"
    );
    assert_eq!(host_of(&lab, "a"), "h1");

    // 5. Automatic, marked by an operator: emptied live at once, like a signal.
    lab.tern_ok(&["cluster", "set-drs", "lab", "--proactive", "automatic"]);
    lab.tern_ok(&["host", "degrade", "h1", "--reason", "DIMM B2 replacement"]);
    let deadline = Instant::now() + WAIT;
    loop {
        let done: Vec<Value> = tasks_on(&lab, "host_evacuate", "h1")
            .into_iter()
            .filter(|t| t["state"] == "succeeded")
            .collect();
        if done.len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "h1 not emptied again: {done:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(host_of(&lab, "a"), "h2");
    lab.one_copy_on("a", &id, "h2");
    let said = events(&lab, "h1");
    assert!(
        said.iter().any(|m| m.contains(
            "emptying host h1 live (1 running VM(s)): marked by an operator: DIMM B2 replacement"
        )),
        "{said:#?}"
    );
    lab.down();
}
