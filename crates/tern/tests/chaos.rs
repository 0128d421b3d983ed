//! The chaos soak: a lab of hosts and two guests that dirty memory and stream to clients;
//! round after round, one guest migrates to another host while one random fault strikes at a
//! random moment — a QEMU killed, an agent or the center killed and restarted, the
//! destination's link cut, a cancel, a second migrate request. After every round:
//!
//! - exactly one copy of every guest runs, on the host the inventory names (inventory = reality);
//! - the guest's memory verifier finds no bad page, and it is the same boot — unless the fault
//!   killed the copy that ran;
//! - the client's TCP stream saw nothing corrupt or duplicated (and no reset or loss unless
//!   the running copy was killed);
//! - the guest was paused no longer than its budget plus the switchover margin.
//!
//! It prints one table row per fault kind. Seeded and sized from the environment:
//! `TERN_CHAOS_SEED` (default 1), `TERN_CHAOS_ROUNDS` (default 12), `TERN_CHAOS_HOSTS`
//! (default 3), `TERN_CHAOS_FAULTS` (comma-separated kinds, default all). CI runs the default;
//! `bench/chaos/run.sh` runs long soaks.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{qemus_of, text, wait_for, Lab};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// The downtime budget tern uses when the request names none, plus the switchover
/// watchdog's margin: no pause may outlast it unless the running copy was killed.
const PAUSE_LIMIT_MS: u64 = 300 + 2000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    None,
    KillDestinationQemu,
    KillSourceQemu,
    RestartDestinationAgent,
    RestartSourceAgent,
    RestartCenter,
    CutDestinationLink,
    Cancel,
    SecondMigrate,
}

impl Fault {
    const ALL: [Fault; 9] = [
        Fault::None,
        Fault::KillDestinationQemu,
        Fault::KillSourceQemu,
        Fault::RestartDestinationAgent,
        Fault::RestartSourceAgent,
        Fault::RestartCenter,
        Fault::CutDestinationLink,
        Fault::Cancel,
        Fault::SecondMigrate,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::KillDestinationQemu => "kill-destination-qemu",
            Fault::KillSourceQemu => "kill-source-qemu",
            Fault::RestartDestinationAgent => "restart-destination-agent",
            Fault::RestartSourceAgent => "restart-source-agent",
            Fault::RestartCenter => "restart-center",
            Fault::CutDestinationLink => "cut-destination-link",
            Fault::Cancel => "cancel",
            Fault::SecondMigrate => "second-migrate",
        }
    }

    fn parse(s: &str) -> Fault {
        Fault::ALL
            .into_iter()
            .find(|f| f.name() == s.trim())
            .unwrap_or_else(|| {
                panic!(
                    "TERN_CHAOS_FAULTS: unknown fault {s:?} (known: {})",
                    Fault::ALL.map(Fault::name).join(", ")
                )
            })
    }
}

/// A soak guest.
struct Guest {
    name: String,
    id: String,
    addr: String,
}

/// What one round did and saw.
struct Round {
    fault: Fault,
    /// How the migration's task ended: succeeded, failed, cancelled.
    task_state: String,
    /// The fault struck while the migration was still running.
    during: bool,
    /// The fault killed the copy that ran the guest.
    killed_running: bool,
    pause_ms: Option<u64>,
    client_gap_ms: u64,
    violations: Vec<String>,
}

/// Per fault kind: rounds, how their migrations ended, the worst pause and client gap.
#[derive(Default)]
struct Row {
    rounds: u32,
    during: u32,
    moved: u32,
    stayed: u32,
    killed: u32,
    max_pause_ms: u64,
    max_gap_ms: u64,
    violations: u32,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

fn task(lab: &Lab, id: &str) -> Value {
    lab.tern_json(&["task", "show", id])
}

fn ended(t: &Value) -> bool {
    matches!(
        t["state"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// The pid in a QEMU pidfile of the lab, if it is there.
fn qemu_pid(lab: &Lab, host: &str, id: &str) -> Option<i32> {
    std::fs::read_to_string(lab.dir.join(format!("hosts/{host}/vms/{id}/qemu.pid")))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Strikes `fault` at a migration of `g` along `route` (from, to; task `task_id`); a link cut
/// lasts `cut`. Returns whether a second migration was accepted (once the first had ended) and
/// moved the guest on.
fn strike(
    lab: &Lab,
    fault: Fault,
    g: &Guest,
    route: (&str, &str),
    task_id: &str,
    cut: Duration,
) -> bool {
    let (from, to) = route;
    let restart = |name: &str| {
        let out = lab.lab_cmd(&["lab", "restart", name, "--kill"]);
        assert!(out.status.success(), "restart {name}: {}", text(&out));
    };
    match fault {
        Fault::None => false,
        // After the switchover these kill the copy that runs: the soak sees whether any copy
        // is left, not which one was meant.
        Fault::KillDestinationQemu => {
            qemu_pid(lab, to, &g.id).into_iter().for_each(kill);
            false
        }
        Fault::KillSourceQemu => {
            qemu_pid(lab, from, &g.id).into_iter().for_each(kill);
            false
        }
        Fault::RestartDestinationAgent => {
            restart(to);
            false
        }
        Fault::RestartSourceAgent => {
            restart(from);
            false
        }
        Fault::RestartCenter => {
            restart("center");
            false
        }
        Fault::CutDestinationLink => {
            let out = lab.lab_cmd(&["lab", "link", "cut", to]);
            assert!(out.status.success(), "cut {to}: {}", text(&out));
            // The fault's length is the point here, not a wait for a condition.
            std::thread::sleep(cut);
            let out = lab.lab_cmd(&["lab", "link", "restore", to]);
            assert!(out.status.success(), "restore {to}: {}", text(&out));
            false
        }
        Fault::Cancel => {
            let _ = lab.tern(&["task", "cancel", task_id]);
            false
        }
        Fault::SecondMigrate => {
            // To a third host where there is one: refused while the first runs.
            let other = (1..=lab.hosts)
                .map(|i| format!("h{i}"))
                .find(|h| h != from && h != to)
                .unwrap_or_else(|| to.to_string());
            let out = lab.tern(&["vm", "migrate", &g.name, "--to", &other, "--detach"]);
            if out.status.success() {
                let second = String::from_utf8_lossy(&out.stdout).trim().to_string();
                assert!(
                    ended(&task(lab, task_id)),
                    "a second migration of {} ({second}) was accepted while {task_id} ran",
                    g.name
                );
                let t = wait_for("the second migration", Duration::from_secs(300), || {
                    let t = task(lab, &second);
                    ended(&t).then_some(t)
                });
                return t["state"] == "succeeded";
            }
            false
        }
    }
}

/// Waits until the guest runs once, on the host the inventory names. Returns that host, and
/// whether no copy of the guest was left (it is started again then).
fn settle(lab: &Lab, g: &Guest) -> (String, bool) {
    // A copy on its way out (a rolled-back destination, a finished source) ends by itself.
    let lost = wait_for(
        &format!("{} to run once, or not at all", g.name),
        Duration::from_secs(120),
        || {
            let copies = qemus_of(&g.id).len();
            if copies == 0 {
                return Some(true);
            }
            let vm: Value = lab.tern_json(&["vm", "show", &g.name]);
            (copies == 1 && vm["actual_state"] == "running").then_some(false)
        },
    );
    if lost {
        wait_for(
            &format!("the center to see {} down", g.name),
            Duration::from_secs(120),
            || {
                let vm: Value = lab.tern_json(&["vm", "show", &g.name]);
                (vm["actual_state"] != "running" && vm["actual_state"] != "migrating").then_some(())
            },
        );
        let readies = lab.console_count(&g.name, "TERN-GUEST-READY");
        let out = lab.tern(&["vm", "start", &g.name]);
        assert!(
            out.status.success(),
            "start {} again: {}",
            g.name,
            text(&out)
        );
        lab.wait_console_nth(
            &g.name,
            "TERN-GUEST-READY",
            readies + 1,
            Duration::from_secs(180),
        );
    }
    let host = wait_for(
        &format!("{} to settle", g.name),
        Duration::from_secs(180),
        || {
            let vm: Value = lab.tern_json(&["vm", "show", &g.name]);
            (vm["actual_state"] == "running")
                .then(|| vm["host"].as_str().map(str::to_string))
                .flatten()
        },
    );
    lab.one_copy_on(&g.name, &g.id, &host);
    (host, lost)
}

fn run_round(lab: &Lab, rng: &mut StdRng, g: &Guest, fault: Fault) -> Round {
    let vm: Value = lab.tern_json(&["vm", "show", &g.name]);
    let from = vm["host"].as_str().expect("the guest's host").to_string();
    let others: Vec<String> = (1..=lab.hosts)
        .map(|i| format!("h{i}"))
        .filter(|h| *h != from)
        .collect();
    let to = others[rng.random_range(0..others.len())].clone();
    let before = lab.guest_stats(&format!("{}:7000", g.addr));
    let streamer = lab.spawn_stream_client(&format!("{}:7000", g.addr), 0);

    // Slow enough that most faults find pre-copy running (the guests are mostly zero pages).
    let bandwidth = ["100", "200", "400"][rng.random_range(0..3)];
    let task_id = lab
        .tern_ok(&[
            "vm",
            "migrate",
            &g.name,
            "--to",
            &to,
            "--bandwidth",
            bandwidth,
            "--detach",
        ])
        .trim()
        .to_string();
    let delay = Duration::from_millis(rng.random_range(0..2500));
    let started = Instant::now();
    let mut during = false;
    while started.elapsed() < delay {
        if ended(&task(lab, &task_id)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !ended(&task(lab, &task_id)) {
        during = true;
    }
    let cut = Duration::from_secs(rng.random_range(1..=8));
    let moved_on = strike(lab, fault, g, (&from, &to), &task_id, cut);
    let t = wait_for(
        &format!("migration task {task_id} to end"),
        Duration::from_secs(300),
        || {
            let t = task(lab, &task_id);
            ended(&t).then_some(t)
        },
    );
    let (host, killed_running) = settle(lab, g);
    let report = streamer.finish();
    let after = lab.guest_stats(&format!("{}:7000", g.addr));

    let mut violations = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            violations.push(what);
        }
    };
    let state = t["state"].as_str().unwrap_or("?").to_string();
    check(
        !killed_running || matches!(fault, Fault::KillSourceQemu | Fault::KillDestinationQemu),
        format!("no copy of the guest was left after {}", fault.name()),
    );
    check(
        state != "succeeded" || host == to || moved_on,
        format!("the task succeeded but the guest runs on {host}, not {to}"),
    );
    for k in ["corrupt", "duplicates"] {
        check(report[k] == 0, format!("client stream {k}: {report}"));
    }
    check(
        after["mem"]["errors"] == 0,
        format!("memory verifier errors: {after}"),
    );
    if !killed_running {
        for k in ["resets", "missing", "boot_changes"] {
            check(report[k] == 0, format!("client stream {k}: {report}"));
        }
        check(
            after["boot_id"] == before["boot_id"],
            format!("the guest rebooted: {before} → {after}"),
        );
    }
    let pause_ms = t["result"]["pause_ms"].as_u64();
    if let Some(p) = pause_ms.filter(|_| !killed_running) {
        check(
            p <= PAUSE_LIMIT_MS,
            format!("guest paused {p} ms (limit {PAUSE_LIMIT_MS}): {t}"),
        );
    }
    let gap = report["longest_gap_ms"].as_f64().unwrap_or(0.0) as u64;
    eprintln!(
        "round: {} {from}→{to} at {bandwidth} Mbit/s, fault {} after {:?}{}: task {state} ({}), \
         now on {host}; pause {pause_ms:?} ms, client gap {gap} ms{}",
        g.name,
        fault.name(),
        delay,
        if during { "" } else { " (after the end)" },
        t["error"].as_str().unwrap_or("-"),
        if violations.is_empty() {
            String::new()
        } else {
            format!("; VIOLATIONS: {violations:#?}")
        }
    );
    Round {
        fault,
        task_state: state,
        during,
        killed_running,
        pause_ms,
        client_gap_ms: gap,
        violations,
    }
}

fn print_table(seed: u64, rounds: &[Round]) {
    let mut rows: BTreeMap<Fault, Row> = BTreeMap::new();
    for r in rounds {
        let row = rows.entry(r.fault).or_default();
        row.rounds += 1;
        row.during += u32::from(r.during);
        match r.task_state.as_str() {
            "succeeded" => row.moved += 1,
            _ => row.stayed += 1,
        }
        row.killed += u32::from(r.killed_running);
        if !r.killed_running {
            row.max_pause_ms = row.max_pause_ms.max(r.pause_ms.unwrap_or(0));
            row.max_gap_ms = row.max_gap_ms.max(r.client_gap_ms);
        }
        row.violations += r.violations.len() as u32;
    }
    println!("\nchaos soak, seed {seed}, {} rounds", rounds.len());
    println!(
        "| fault | rounds | struck mid-migration | moved | stayed (rolled back, cancelled, refused) | running copy killed | max pause ms | max client gap ms | violations |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (fault, r) in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            fault.name(),
            r.rounds,
            r.during,
            r.moved,
            r.stayed,
            r.killed,
            r.max_pause_ms,
            r.max_gap_ms,
            r.violations
        );
    }
    println!("(pause and gap leave out rounds whose fault killed the running copy)\n");
}

#[test]
fn chaos_soak_keeps_one_copy_and_every_byte() {
    let seed: u64 = env_or("TERN_CHAOS_SEED", 1);
    let rounds: u32 = env_or("TERN_CHAOS_ROUNDS", 12);
    let hosts: u32 = env_or("TERN_CHAOS_HOSTS", 3);
    assert!(hosts >= 2, "TERN_CHAOS_HOSTS must be at least 2");
    let faults: Vec<Fault> = match std::env::var("TERN_CHAOS_FAULTS") {
        Ok(v) => v.split(',').map(Fault::parse).collect(),
        Err(_) => Fault::ALL.to_vec(),
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let lab = Lab::up("chaos", hosts);
    let guests: Vec<Guest> = [
        ("c1", "10.78.0.120", "52:54:00:7e:02:01"),
        ("c2", "10.78.0.121", "52:54:00:7e:02:02"),
    ]
    .iter()
    .map(|(name, ip, mac)| Guest {
        name: name.to_string(),
        id: lab.create_vm(name, "h1", ip, mac, 256, "tern.mem=32 tern.dirty=8", &[]),
        addr: ip.to_string(),
    })
    .collect();

    let mut order = Vec::new();
    let mut results = Vec::new();
    for i in 0..rounds {
        // Every kind once before any twice, in a seeded order.
        if i as usize % faults.len() == 0 {
            order = faults.clone();
            for k in (1..order.len()).rev() {
                order.swap(k, rng.random_range(0..=k));
            }
        }
        let fault = order[i as usize % faults.len()];
        let g = &guests[i as usize % guests.len()];
        eprintln!("round {} of {rounds}: {} ({})", i + 1, fault.name(), g.name);
        let mut round = run_round(&lab, &mut rng, g, fault);
        // The other guest must not have been disturbed by this round's fault.
        let other = &guests[(i as usize + 1) % guests.len()];
        let vm: Value = lab.tern_json(&["vm", "show", &other.name]);
        let host = vm["host"].as_str().unwrap_or("?").to_string();
        if qemus_of(&other.id).len() != 1 || vm["actual_state"] != "running" {
            round.violations.push(format!(
                "{} is not running once on {host}: {vm}",
                other.name
            ));
        }
        results.push(round);
    }
    print_table(seed, &results);
    let violations: Vec<&String> = results.iter().flat_map(|r| &r.violations).collect();
    assert!(violations.is_empty(), "violations: {violations:#?}");
    lab.down();
}
