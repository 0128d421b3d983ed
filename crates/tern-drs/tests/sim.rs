//! The simulator: deterministic for a seed, and tern against the baselines on a small
//! synthetic cluster.

use tern_drs::sim::{simulate, synthetic, trace, Policy, SimOptions, SimReport, SyntheticSpec};
use tern_drs::Threshold;

fn without_times(mut r: SimReport) -> SimReport {
    r.pass_ms_mean = 0.0;
    r.pass_ms_max = 0.0;
    r
}

#[test]
fn simulations_are_deterministic_for_a_seed() {
    let spec = SyntheticSpec::new(6, 150, 72, 3);
    let opts = SimOptions::default();
    for p in [Policy::Greedy, Policy::Tern(Threshold::DEFAULT)] {
        let a = without_times(simulate(&synthetic(&spec), p, &opts));
        let b = without_times(simulate(&synthetic(&spec), p, &opts));
        assert_eq!(a, b);
    }
    let other = without_times(simulate(
        &synthetic(&SyntheticSpec::new(6, 150, 72, 4)),
        Policy::Tern(Threshold::DEFAULT),
        &opts,
    ));
    let first = without_times(simulate(
        &synthetic(&spec),
        Policy::Tern(Threshold::DEFAULT),
        &opts,
    ));
    assert_ne!(other.imbalance_mean, first.imbalance_mean);
}

#[test]
fn tern_balances_with_few_migrations_and_no_rule_violations() {
    let w = synthetic(&SyntheticSpec::new(8, 240, 144, 7));
    let opts = SimOptions::default();
    let none = simulate(&w, Policy::NoBalancing, &opts);
    let greedy = simulate(&w, Policy::Greedy, &opts);
    let tern = simulate(&w, Policy::Tern(Threshold::DEFAULT), &opts);
    assert_eq!(none.migrations, 0);
    assert!(
        tern.imbalance_mean < 0.8 * none.imbalance_mean,
        "{tern:?}\n{none:?}"
    );
    assert!(
        tern.migrations > 0 && tern.migrations < greedy.migrations,
        "{tern:?}\n{greedy:?}"
    );
    assert_eq!(tern.violations, 0, "{tern:?}");
    assert_eq!(tern.placement_failures, 0, "{tern:?}");
    assert_eq!(tern.ping_pongs, 0);
    assert!(
        greedy.violations > 0,
        "baselines are rule-blind: {greedy:?}"
    );
    assert!(tern.moved_gib > 0.0 && tern.passes == w.steps);
}

#[test]
fn a_written_trace_replays_like_the_workload() {
    let w = synthetic(&SyntheticSpec::new(4, 60, 48, 9));
    let files = trace::write(&w);
    let r = trace::read(
        Some(files.hosts_csv.as_bytes()),
        files.vms_csv.as_bytes(),
        files.demand_csv.as_bytes(),
        None,
    )
    .unwrap();
    let opts = SimOptions::default();
    let a = simulate(&w, Policy::NoBalancing, &opts);
    let b = simulate(&r, Policy::NoBalancing, &opts);
    // Demand is written rounded to whole MHz/MiB: the same to three decimals.
    assert!(
        (a.imbalance_mean - b.imbalance_mean).abs() < 1e-3,
        "{a:?}\n{b:?}"
    );
    assert_eq!(a.vms, b.vms);
}

#[test]
fn a_replayed_placement_is_where_the_vms_start_and_balancing_undoes_it() {
    // Four busy VMs the real cluster ran all on h1, for two hours of 5-minute steps.
    let hosts = "host,cpu_mhz,memory_mib\nh1,8000,32768\nh2,8000,32768\n";
    let mut vms = String::from("vm,vcpus,memory_mib,host\n");
    let mut demand = String::from("timestamp_s,vm,cpu_mhz,memory_mib\n");
    for i in 0..4 {
        vms.push_str(&format!("v{i},2,2048,h1\n"));
        for k in 0..24 {
            demand.push_str(&format!("{},v{i},1500,1500\n", k * 300));
        }
    }
    let placed = trace::read(
        Some(hosts.as_bytes()),
        vms.as_bytes(),
        demand.as_bytes(),
        None,
    )
    .unwrap();
    let opts = SimOptions::default();
    // Left alone, the replayed skew stays: h1 carries 6000 MHz, h2 nothing.
    let stay = simulate(&placed, Policy::NoBalancing, &opts);
    assert_eq!(stay.migrations, 0);
    // Placed by the policy instead (no host column), the VMs start spread.
    let free = trace::read(
        Some(hosts.as_bytes()),
        vms.replace(",h1\n", ",\n").as_bytes(),
        demand.as_bytes(),
        None,
    )
    .unwrap();
    let spread = simulate(&free, Policy::NoBalancing, &opts);
    assert!(
        stay.imbalance_mean > spread.imbalance_mean + 0.1,
        "replayed {stay:?}\npolicy-placed {spread:?}"
    );
    // tern's balancing moves VMs off the replayed hot host.
    let tern = simulate(&placed, Policy::Tern(Threshold::DEFAULT), &opts);
    assert!(tern.migrations >= 1, "{tern:?}");
    assert!(
        tern.imbalance_mean < stay.imbalance_mean,
        "{tern:?}\n{stay:?}"
    );
}

/// Across CPU generations tern never proposes a move or placement QEMU would refuse, still
/// balances, and the CPU-blind greedy baseline's refused moves are counted, not applied.
#[test]
fn tern_keeps_vms_on_hosts_whose_cpu_runs_them() {
    let mut spec = SyntheticSpec::new(9, 200, 96, 3);
    spec.cpu_generations = 3;
    let w = synthetic(&spec);
    assert!(w.hosts.iter().all(|h| h.cpu_features.is_some()));
    let levels: std::collections::HashSet<usize> =
        w.vms.iter().map(|v| v.vm.cpu_features.len()).collect();
    assert_eq!(levels.len(), 3, "VMs of three generations: {levels:?}");
    let opts = SimOptions::default();
    let none = simulate(&w, Policy::NoBalancing, &opts);
    let greedy = simulate(&w, Policy::Greedy, &opts);
    let tern = simulate(&w, Policy::Tern(Threshold::DEFAULT), &opts);
    assert_eq!(tern.cpu_refused, 0, "{tern:?}");
    assert!(tern.migrations > 0, "{tern:?}");
    assert!(greedy.cpu_refused > 0, "greedy is CPU-blind: {greedy:?}");
    assert!(
        none.cpu_refused > 0,
        "least-loaded placement is CPU-blind: {none:?}"
    );
}
