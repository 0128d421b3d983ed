//! The DRS benchmark behind `bench/drs/run.sh`: synthetic clusters (16 hosts / 500 VMs,
//! 64 / 8,000, 96 / 10,000) and a trace replay under tern and the baselines, a threshold
//! sweep, single-pass timings on a cold 96 / 10,000 cluster, and the targets checked.
//! Prints markdown on stdout, progress on stderr.
//!
//! `drs_bench [--trace DIR] [--quick]` — `--quick` shortens every horizon 4× (smoke test).

use std::error::Error;
use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::time::Instant;

use tern_drs::rng::Rng;
use tern_drs::sim::report::{markdown, Row};
use tern_drs::sim::run::snapshot_at;
use tern_drs::sim::{self, simulate, synthetic, Policy, SimOptions, SimReport, SyntheticSpec};
use tern_drs::Threshold;

struct Scenario {
    label: String,
    rows: Vec<SimReport>,
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut trace: Option<PathBuf> = None;
    let mut quick = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--trace" => trace = args.next().map(PathBuf::from),
            "--quick" => quick = true,
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    let div = if quick { 4 } else { 1 };
    let t3 = Threshold::DEFAULT;
    let policies = [
        Policy::NoBalancing,
        Policy::Greedy,
        Policy::LowNodeUtilization,
        Policy::Tern(t3),
    ];
    let opts = SimOptions::default();
    let started = Instant::now();
    let mut scenarios = Vec::new();
    for (hosts, vms, steps, horizon) in [
        (16, 500, 576 / div, "2 days"),
        (64, 8000, 288 / div, "1 day"),
        (96, 10_000, 288 / div, "1 day"),
    ] {
        let w = synthetic(&SyntheticSpec::new(hosts, vms, steps, 1));
        let label = format!(
            "synthetic {hosts} hosts / {vms} VMs, {} 5-min steps ({})",
            steps,
            if quick { "quick" } else { horizon }
        );
        scenarios.push(run(&label, &w, &policies, &opts));
    }
    if let Some(dir) = &trace {
        let open = |name: &str| -> Result<BufReader<File>, Box<dyn Error>> {
            let p = dir.join(name);
            Ok(BufReader::new(
                File::open(&p).map_err(|e| format!("{}: {e}", p.display()))?,
            ))
        };
        let hosts = if dir.join("hosts.csv").exists() {
            Some(open("hosts.csv")?)
        } else {
            None
        };
        let mut w = sim::trace::read(hosts, open("vms.csv")?, open("demand.csv")?, None)?;
        if w.hosts.is_empty() {
            w.hosts = sim::workload::size_hosts(&w.vms, w.steps, 8, 0.65, 0.7, 1);
        }
        let label = format!(
            "trace {} ({} hosts / {} VMs, {} steps of {} s)",
            dir.display(),
            w.hosts.len(),
            w.vms.len(),
            w.steps,
            w.step_s
        );
        scenarios.push(run(&label, &w, &policies, &opts));
    }

    println!("## Simulations\n");
    println!(
        "Every policy replays the same workload; tern at its default threshold ({t3}). Imbalance: \
         √(½·var(CPU load) + ½·var(memory load)) over hosts, load = entitlement ÷ capacity, \
         measured every step. Overload: host-steps whose demand (plus running migrations) \
         exceeds capacity. Rule violations: VM-steps breaking an affinity, anti-affinity or \
         must rule (baselines are rule-blind). Pass time: one policy pass (snapshot → \
         decisions), one core.\n"
    );
    let rows: Vec<Row> = scenarios
        .iter()
        .flat_map(|s| {
            s.rows.iter().map(|r| Row {
                scenario: s.label.clone(),
                report: r.clone(),
            })
        })
        .collect();
    print!("{}", markdown(&rows));

    // Threshold sweep on the small cluster.
    eprintln!("threshold sweep");
    let w = synthetic(&SyntheticSpec::new(16, 500, 576 / div, 1));
    let sweep: Vec<Row> = (1..=5u8)
        .filter_map(Threshold::new)
        .map(|t| Row {
            scenario: format!("16 / 500, threshold {t}"),
            report: simulate(&w, Policy::Tern(t), &opts),
        })
        .collect();
    println!("\n## tern by threshold (16 hosts / 500 VMs)\n");
    print!("{}", markdown(&sweep));

    // Seed spread on small, lumpy clusters with office-hours peaks (the trace's shape).
    eprintln!("seed spread");
    println!(
        "\n## Seed spread: enterprise shape, 12 hosts / 200 VMs, {} 10-min steps, seeds 1–5\n",
        144 / div
    );
    println!("| seed | greedy imbalance | tern imbalance | tern ÷ greedy | greedy migrations | tern migrations | greedy overload host-h | tern overload host-h |\n|---:|---:|---:|---:|---:|---:|---:|---:|");
    for seed in 1..=5u64 {
        let mut spec = SyntheticSpec::new(12, 200, 144 / div, seed);
        spec.mix = sim::ShapeMix::enterprise();
        spec.step_s = 600;
        let w = synthetic(&spec);
        let g = simulate(&w, Policy::Greedy, &opts);
        let t = simulate(&w, Policy::Tern(t3), &opts);
        println!(
            "| {seed} | {:.4} | {:.4} | {:.2} | {} | {} | {:.1} | {:.1} |",
            g.imbalance_mean,
            t.imbalance_mean,
            t.imbalance_mean / g.imbalance_mean,
            g.migrations,
            t.migrations,
            g.overload_host_h,
            t.overload_host_h
        );
    }

    // A skewed start: a day's workload whose first VMs all start on an eighth of the hosts
    // (a replayed placement, or hosts back from maintenance). How many 5-minute steps until
    // the imbalance reaches the level greedy keeps over the rest of the day, and how many
    // migrations it took.
    eprintln!("skewed start");
    println!(
        "\n## Skewed start: 64 hosts / 2,000 VMs, the first VMs on 8 hosts, {} 5-min steps\n",
        96 / div
    );
    println!("| policy | steps until the imbalance is within target | migrations until then | migrations, whole run | mean imbalance |\n|---|---:|---:|---:|---:|");
    let mut w = synthetic(&SyntheticSpec::new(64, 2000, 96 / div, 1));
    let crowded: Vec<String> = w.hosts.iter().take(8).map(|h| h.name.clone()).collect();
    for (i, v) in w.vms.iter_mut().enumerate() {
        if v.alive(0) {
            v.vm.host = Some(crowded[i % crowded.len()].clone());
        }
    }
    let skew: Vec<SimReport> = [Policy::Greedy, Policy::Tern(t3)]
        .iter()
        .map(|p| simulate(&w, *p, &opts))
        .collect();
    // The target: 1.1× greedy's mean imbalance over the second half of the day (settled).
    let half = skew[0].imbalance_by_step.len() / 2;
    let tail = &skew[0].imbalance_by_step[half..];
    let target = 1.1 * tail.iter().sum::<f64>() / tail.len().max(1) as f64;
    for r in &skew {
        let (steps, moves) = match r.settled(target) {
            Some((k, m)) => (k.to_string(), m.to_string()),
            None => ("never".to_string(), "-".to_string()),
        };
        println!(
            "| {} | {steps} | {moves} | {} | {:.4} |",
            r.policy, r.migrations, r.imbalance_mean
        );
    }
    println!("\nTarget imbalance: {target:.4} (1.1 × greedy's mean over the second half).");

    // A cluster mid-refresh: hosts of three CPU generations, VMs created with host-model
    // CPUs and no EVC mode, so each needs its generation's features. QEMU refuses a start or
    // migration onto an older CPU; the baselines do not know, so their moves there fail.
    eprintln!("cpu generations");
    println!(
        "\n## Three CPU generations, no EVC mode: 16 hosts / 500 VMs, {} 5-min steps\n",
        288 / div
    );
    println!("| policy | mean imbalance | migrations | failed for CPU (moves and placements) | VMs left unplaced |\n|---|---:|---:|---:|---:|");
    let mut spec = SyntheticSpec::new(16, 500, 288 / div, 1);
    spec.cpu_generations = 3;
    let w = synthetic(&spec);
    for p in [Policy::Greedy, Policy::LowNodeUtilization, Policy::Tern(t3)] {
        let r = simulate(&w, p, &opts);
        println!(
            "| {} | {:.4} | {} | {} | {} |",
            r.policy, r.imbalance_mean, r.migrations, r.cpu_refused, r.placement_failures
        );
    }
    // What the CPU constraint costs: the same VMs and hosts with every CPU alike.
    let mut alike = w.clone();
    alike.hosts.iter_mut().for_each(|h| h.cpu_features = None);
    alike.vms.iter_mut().for_each(|v| v.vm.cpu_features.clear());
    let r = simulate(&alike, Policy::Tern(t3), &opts);
    println!(
        "| {} with every CPU alike (reference) | {:.4} | {} | {} | {} |",
        r.policy, r.imbalance_mean, r.migrations, r.cpu_refused, r.placement_failures
    );

    // Single passes on a cold, randomly placed 96 / 10,000 cluster.
    eprintln!("cold passes");
    println!("\n## Single engine calls on 96 hosts / 10,000 VMs (one core)\n");
    println!("| call | result | time |\n|---|---|---:|");
    let w = synthetic(&SyntheticSpec::new(96, 10_000, 2, 1));
    let mut rng = Rng::new(99);
    let host_of: Vec<Option<usize>> = w
        .vms
        .iter()
        .map(|v| v.alive(0).then(|| rng.below(w.hosts.len())))
        .collect();
    let (snap, _) = snapshot_at(&w, 0, &host_of, &opts);
    let mut worst_pass_s: f64 = 0.0;
    for (label, cap) in [
        ("balance, random placement, default cap", None),
        ("balance, random placement, no cap", Some(100_000)),
    ] {
        let mut s = snap.clone();
        s.config.max_moves_per_pass = cap;
        let t = Instant::now();
        let plan = tern_drs::balance(&s, t3)?;
        let el = t.elapsed().as_secs_f64();
        worst_pass_s = worst_pass_s.max(el);
        println!(
            "| {label} | {} moves ({} mandatory), imbalance {:.4} → {:.4} | {:.0} ms |",
            plan.moves.len(),
            plan.moves.iter().filter(|m| m.priority == 1).count(),
            plan.imbalance_before,
            plan.imbalance_after,
            el * 1000.0
        );
    }
    let busiest = snap
        .hosts
        .iter()
        .max_by_key(|h| {
            snap.vms
                .iter()
                .filter(|v| v.host.as_deref() == Some(h.name.as_str()))
                .count()
        })
        .map(|h| h.name.clone())
        .unwrap_or_default();
    let t = Instant::now();
    let plan = tern_drs::evacuate(&snap, &busiest)?;
    println!(
        "| evacuate {busiest} | {} moves, {} blockers, plan runs {:.0} s at 2 per host | {:.0} ms |",
        plan.steps.len(),
        plan.blockers.len(),
        plan.duration_s,
        t.elapsed().as_secs_f64() * 1000.0
    );
    let mut empty = snap.clone();
    for v in &mut empty.vms {
        v.host = None;
    }
    let names: Vec<&str> = empty.vms.iter().map(|v| v.name.as_str()).collect();
    let t = Instant::now();
    let placed = tern_drs::place_all(&empty, &names)?;
    let el = t.elapsed().as_secs_f64();
    println!(
        "| place {} VMs one by one into the empty cluster | {} placed, {} admission failures | {:.0} ms ({:.0} µs each) |",
        names.len(),
        placed.iter().filter(|p| p.is_ok()).count(),
        placed.iter().filter(|p| p.is_err()).count(),
        el * 1000.0,
        el * 1e6 / names.len() as f64
    );

    // Targets.
    println!("\n## Targets\n");
    println!("| scenario | tern imbalance ≤ 1.05 × greedy | tern migrations ≤ ½ greedy | least overload time | max pass |\n|---|---|---|---|---:|");
    for s in &scenarios {
        let find = |name: &str| s.rows.iter().find(|r| r.policy == name);
        let (Some(tern), Some(greedy)) = (find(&Policy::Tern(t3).name()), find("greedy")) else {
            continue;
        };
        let least = s
            .rows
            .iter()
            .filter(|r| r.policy != tern.policy)
            .all(|r| tern.overload_host_h <= r.overload_host_h);
        let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
        println!(
            "| {} | {} ({:.4} vs {:.4}) | {} ({} vs {}) | {} ({:.1} host-h) | {:.1} ms |",
            s.label,
            verdict(tern.imbalance_mean <= 1.05 * greedy.imbalance_mean),
            tern.imbalance_mean,
            greedy.imbalance_mean,
            verdict(2 * tern.migrations <= greedy.migrations),
            tern.migrations,
            greedy.migrations,
            verdict(least),
            tern.overload_host_h,
            tern.pass_ms_max
        );
    }
    println!(
        "\nA pass over 96 hosts / 10,000 VMs under 1 s: {} (worst single pass {:.0} ms).",
        if worst_pass_s < 1.0 { "met" } else { "NOT met" },
        worst_pass_s * 1000.0
    );
    println!(
        "\nWorkload: seed 1; VM sizes 1–16 vCPUs, 2–8 GiB per vCPU; 40 % steady, 35 % diurnal, \
         25 % bursty; 20 % of VMs replaced per day; hosts sized for 65 % CPU and 70 % memory \
         on average; 3 % of VMs in anti-affinity groups, 1 % in affinity pairs, 3 % with must \
         and 3 % with should VM-host rules; 10 % with memory reservations. Trace: {}. \
         Total bench time {:.0} s.",
        match &trace {
            Some(_) =>
                "a different shape — 40 % office hours, 30 % bursty, 20 % steady, 10 % batch jobs, \
                        10-minute steps — see bench/drs/README.md"
                    .to_string(),
            None => "not run (no --trace)".into(),
        },
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run(label: &str, w: &sim::Workload, policies: &[Policy], opts: &SimOptions) -> Scenario {
    let mut rows = Vec::new();
    for p in policies {
        let t = Instant::now();
        let r = simulate(w, *p, opts);
        eprintln!(
            "{label}: {} in {:.1} s",
            p.name(),
            t.elapsed().as_secs_f64()
        );
        rows.push(r);
    }
    Scenario {
        label: label.to_string(),
        rows,
    }
}
