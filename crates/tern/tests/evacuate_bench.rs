//! The evacuation benchmark (`bench/evacuate/run.sh`; ignored in the test suite, which runs
//! `evacuation.rs` instead): empties a host holding N small VMs, each with a client
//! streaming from it, two ways on the same lab and guests:
//! - one at a time, as Proxmox's and oVirt's host evacuation do by default: `tern vm
//!   migrate` per VM, each waited for, spread over the other hosts;
//! - tern's plan: `tern host maintenance enter`, the migration scheduler running as many at
//!   once as the hosts' limits allow.
//!
//! Between the two the VMs go back to h1 (untimed). Prints one table row per N: both times,
//! their ratio and the worst client gap of each (the longest silence any client saw).
//! `TERN_BENCH_EVACUATE_NS` sets the Ns (default `2,4,8`).

mod common;

use std::time::{Duration, Instant};

use common::{text, Lab, StreamClient};
use serde_json::Value;

struct Row {
    n: usize,
    serial_s: f64,
    parallel_s: f64,
    serial_gap_ms: f64,
    parallel_gap_ms: f64,
    peak: i64,
}

fn host_of(lab: &Lab, vm: &str) -> String {
    let v: Value = lab.tern_json(&["vm", "show", vm]);
    v["host"].as_str().unwrap_or_default().to_string()
}

/// Streams from every VM; returns the clients (started, each connected).
fn clients(lab: &Lab, n: usize) -> Vec<StreamClient> {
    (0..n)
        .map(|i| lab.spawn_stream_client(&format!("10.78.0.{}:7000", 200 + i), 1_000))
        .collect()
}

/// Ends the clients; the worst gap any saw (ms). Every stream must be intact.
fn worst_gap(cs: Vec<StreamClient>) -> f64 {
    let mut worst: f64 = 0.0;
    for c in cs {
        let r = c.finish();
        for k in ["resets", "missing", "duplicates", "corrupt"] {
            assert_eq!(r[k], 0, "{k}: {r}");
        }
        worst = worst.max(r["longest_gap_ms"].as_f64().unwrap_or(0.0));
    }
    worst
}

fn migrate(lab: &Lab, vm: &str, to: &str) {
    let o = lab.tern(&["vm", "migrate", vm, "--to", to]);
    assert!(o.status.success(), "migrate {vm} → {to}: {}", text(&o));
}

fn run(n: usize) -> Row {
    let lab = Lab::up(&format!("eb{n}"), 3);
    let names: Vec<String> = (0..n).map(|i| format!("v{i}")).collect();
    for (i, vm) in names.iter().enumerate() {
        let ip = format!("10.78.0.{}", 200 + i);
        let mac = format!("52:54:00:7e:07:{:02x}", i + 1);
        let args = lab.vm_create_args(vm, "h1", &ip, &mac, 128, "", &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lab.tern_ok(&args);
        lab.tern_ok(&["vm", "start", vm]);
    }
    for vm in &names {
        lab.wait_console(vm, "TERN-GUEST-READY", Duration::from_secs(300));
    }

    // One at a time, spread over h2 and h3.
    let cs = clients(&lab, n);
    let t = Instant::now();
    for (i, vm) in names.iter().enumerate() {
        migrate(&lab, vm, if i % 2 == 0 { "h2" } else { "h3" });
    }
    let serial_s = t.elapsed().as_secs_f64();
    let serial_gap_ms = worst_gap(cs);

    // Back to h1, untimed.
    for vm in &names {
        migrate(&lab, vm, "h1");
    }
    assert!(names.iter().all(|v| host_of(&lab, v) == "h1"));

    // tern's plan.
    let first_event = {
        let e: Vec<Value> = lab.tern_json(&["event", "list", "--limit", "1"]);
        e.first().and_then(|e| e["id"].as_i64()).unwrap_or(0)
    };
    let cs = clients(&lab, n);
    let t = Instant::now();
    let o = lab.tern(&["host", "maintenance", "enter", "h1"]);
    assert!(o.status.success(), "maintenance: {}", text(&o));
    let parallel_s = t.elapsed().as_secs_f64();
    let parallel_gap_ms = worst_gap(cs);
    assert!(names.iter().all(|v| host_of(&lab, v) != "h1"));
    // How many h1 sent at once, from the scheduler's slot events.
    let events: Vec<Value> = lab.tern_json(&["event", "list", "--limit", "5000"]);
    let (mut now, mut peak) = (0i64, 0i64);
    for e in events
        .iter()
        .filter(|e| e["id"].as_i64().unwrap_or(0) > first_event)
    {
        let m = e["message"].as_str().unwrap_or_default();
        if m.contains("migration slot taken: h1 sends") {
            now += 1;
        } else if m.contains("migration slot freed: h1 sends") {
            now -= 1;
        }
        peak = peak.max(now);
    }
    lab.down();
    Row {
        n,
        serial_s,
        parallel_s,
        serial_gap_ms,
        parallel_gap_ms,
        peak,
    }
}

#[test]
#[ignore = "a benchmark: bench/evacuate/run.sh"]
fn evacuate_bench() {
    let ns: Vec<usize> = std::env::var("TERN_BENCH_EVACUATE_NS")
        .unwrap_or_else(|_| "2,4,8".into())
        .split(',')
        .map(|s| s.trim().parse().expect("TERN_BENCH_EVACUATE_NS: numbers"))
        .collect();
    let rows: Vec<Row> = ns.into_iter().map(run).collect();
    println!();
    println!(
        "| N VMs | one at a time | tern (parallel) | ratio | worst gap, one at a time | \
         worst gap, tern | h1 sent at once |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| {} | {:.1} s | {:.1} s | {:.2}× | {:.0} ms | {:.0} ms | {} |",
            r.n,
            r.serial_s,
            r.parallel_s,
            r.parallel_s / r.serial_s,
            r.serial_gap_ms,
            r.parallel_gap_ms,
            r.peak
        );
    }
}
