//! Maintenance evacuation: empties the host, overloads nothing, spreads the VMs, keeps the
//! rules, lists blockers with the reason, runs at limited concurrency.

mod common;

use std::collections::HashMap;

use common::*;
use tern_drs::{evacuate, Automation, BlockReason, HostState, Rejection, Rule, VmHostRelation};

#[test]
fn plan_empties_the_host_overloads_nothing_and_keeps_rules_over_random_clusters() {
    let mut emptied = 0;
    for seed in 0..300 {
        let mut snap = random_cluster(seed);
        snap.vms.retain(|v| v.host.is_some());
        let names: Vec<String> = snap.vms.iter().map(|v| v.name.clone()).collect();
        for r in &mut snap.rules {
            match r {
                Rule::Affinity { vms, .. }
                | Rule::AntiAffinity { vms, .. }
                | Rule::VmHost { vms, .. } => vms.retain(|v| names.contains(v)),
            }
        }
        let Some(target) = snap
            .hosts
            .iter()
            .find(|h| h.state == HostState::Connected)
            .map(|h| h.name.clone())
        else {
            continue;
        };
        let on_target: Vec<String> = snap
            .vms
            .iter()
            .filter(|v| v.host.as_deref() == Some(&target))
            .map(|v| v.name.clone())
            .collect();
        let before_sums = host_sums(&snap);
        let plan = evacuate(&snap, &target).expect("valid snapshot");
        // Every VM on the host is either moved or a blocker, once.
        let mut seen: Vec<&str> = plan.steps.iter().map(|s| s.migration.vm.as_str()).collect();
        seen.extend(plan.blockers.iter().map(|b| b.vm.as_str()));
        seen.sort_unstable();
        let mut expected: Vec<&str> = on_target.iter().map(String::as_str).collect();
        expected.sort_unstable();
        assert_eq!(seen, expected, "seed {seed}");
        let moves: Vec<_> = plan.steps.iter().map(|s| s.migration.clone()).collect();
        let violations_before = hard_violations(&snap).len();
        apply(&mut snap, &moves);
        let left = snap
            .vms
            .iter()
            .filter(|v| v.host.as_deref() == Some(&target))
            .count();
        assert_eq!(left, plan.blockers.len(), "seed {seed}");
        if plan.blockers.is_empty() {
            emptied += 1;
        }
        let sums = host_sums(&snap);
        for m in &moves {
            assert_ne!(m.to_host, target);
            let h = snap.hosts.iter().find(|h| h.name == m.to_host).unwrap();
            assert_eq!(h.state, HostState::Connected, "seed {seed}");
            let s = sums[&h.name];
            let b = before_sums.get(&h.name).copied().unwrap_or([0.0; 6]);
            // No destination overloaded (demand above capacity), nor its expected peak
            // pushed over capacity, unless it already was.
            assert!(
                s[4] <= h.cpu_mhz * (1.0 + 1e-9) || s[4] <= b[4],
                "seed {seed}: {} CPU overloaded",
                h.name
            );
            assert!(
                s[5] <= h.memory_mib * (1.0 + 1e-9) || s[5] <= b[5],
                "seed {seed}: {} memory overloaded",
                h.name
            );
            assert!(
                s[2] <= h.cpu_mhz * (1.0 + 1e-9) || s[2] <= b[2],
                "seed {seed}: {} CPU peak over capacity",
                h.name
            );
            assert!(
                s[3] <= h.memory_mib * (1.0 + 1e-9) || s[3] <= b[3],
                "seed {seed}: {} memory peak over capacity",
                h.name
            );
            assert!(
                s[0] <= h.memory_mib + 1e-6 || s[0] <= b[0],
                "seed {seed}: reservations on {}",
                h.name
            );
        }
        assert!(
            hard_violations(&snap).len() <= violations_before,
            "seed {seed}: evacuation broke a rule"
        );
        for b in &plan.blockers {
            let text = tern_drs::explain::blocker(b);
            assert!(text.contains("cannot move"), "{text}");
            if let BlockReason::NoHost { hosts, .. } = &b.reason {
                assert!(
                    !hosts.is_empty() || snap.hosts.len() == 1,
                    "seed {seed}: no reason given"
                );
            }
        }
    }
    assert!(
        emptied > 150,
        "most random hosts can be emptied ({emptied})"
    );
}

#[test]
fn evacuation_spreads_the_vms_instead_of_piling_them_on_one_host() {
    let mut vms = Vec::new();
    for i in 0..24 {
        vms.push(vm(
            &format!("v{i}"),
            Some("h1"),
            2000.0 + 100.0 * (i % 5) as f64,
            6000.0,
        ));
    }
    // The others start a little uneven; the emptiest must not get everything.
    for (h, n) in [("h2", 2), ("h3", 4), ("h4", 6), ("h5", 8)] {
        for i in 0..n {
            vms.push(vm(&format!("{h}-{i}"), Some(h), 2000.0, 6000.0));
        }
    }
    let hosts = (1..=5)
        .map(|i| host(&format!("h{i}"), 100_000.0, 262_144.0))
        .collect();
    let snap = snapshot(hosts, vms);
    let plan = evacuate(&snap, "h1").unwrap();
    assert!(plan.blockers.is_empty());
    assert_eq!(plan.steps.len(), 24);
    let mut per_host: HashMap<&str, usize> = HashMap::new();
    for s in &plan.steps {
        *per_host.entry(s.migration.to_host.as_str()).or_default() += 1;
    }
    assert_eq!(per_host.len(), 4, "{per_host:?}");
    // Final counts even out: 2+x, 4+y, 6+z, 8+w all within a VM or two of each other.
    let totals: Vec<usize> = [("h2", 2), ("h3", 4), ("h4", 6), ("h5", 8)]
        .iter()
        .map(|(h, n)| n + per_host.get(h).copied().unwrap_or(0))
        .collect();
    let (min, max) = (totals.iter().min().unwrap(), totals.iter().max().unwrap());
    assert!(max - min <= 2, "{totals:?}");
    assert!(plan.imbalance_after < 0.02, "{}", plan.imbalance_after);
}

#[test]
fn the_plan_runs_at_limited_concurrency() {
    let mut vms = Vec::new();
    for i in 0..10 {
        let mut v = vm(&format!("v{i}"), Some("h1"), 1000.0, 4000.0);
        v.memory_mib = 4096.0 * (1 + i % 3) as f64;
        vms.push(v);
    }
    let hosts = (1..=4)
        .map(|i| host(&format!("h{i}"), 100_000.0, 262_144.0))
        .collect();
    let mut snap = snapshot(hosts, vms);
    snap.config.max_concurrent_migrations_per_host = 2;
    let plan = evacuate(&snap, "h1").unwrap();
    assert_eq!(plan.steps.len(), 10);
    // Ordered by start; never more than 2 at once on any host.
    assert!(plan.steps.windows(2).all(|w| w[0].start_s <= w[1].start_s));
    let mut events: Vec<f64> = plan
        .steps
        .iter()
        .flat_map(|s| [s.start_s, s.end_s])
        .collect();
    events.sort_by(f64::total_cmp);
    for t in events {
        let mut per: HashMap<&str, usize> = HashMap::new();
        for s in plan.steps.iter().filter(|s| s.start_s <= t && t < s.end_s) {
            *per.entry(&s.migration.from_host).or_default() += 1;
            *per.entry(&s.migration.to_host).or_default() += 1;
        }
        assert!(per.values().all(|&n| n <= 2), "at {t}: {per:?}");
    }
    // Two slots on the source: the plan takes about half the serial time.
    let serial: f64 = plan
        .steps
        .iter()
        .map(|s| s.migration.numbers.migration.duration_s)
        .sum();
    assert!(plan.duration_s < 0.6 * serial && plan.duration_s >= 0.5 * serial - 1e-9);
    // Each step's numbers are in run order: imbalance_before of a step is after of the
    // previous (in the replayed order).
    for w in plan.steps.windows(2) {
        assert!(
            (w[0].migration.numbers.imbalance_after - w[1].migration.numbers.imbalance_before)
                .abs()
                < 1e-12
        );
    }
}

#[test]
fn blockers_say_why() {
    let mut snap = snapshot(
        vec![
            host("h1", 50_000.0, 65_536.0),
            host("h2", 50_000.0, 65_536.0),
            host("h3", 50_000.0, 65_536.0),
        ],
        vec![
            vm("pinned", Some("h1"), 1000.0, 2000.0),
            vm("manual-off", Some("h1"), 1000.0, 2000.0),
            vm("huge", Some("h1"), 1000.0, 60_000.0),
            vm("fill2", Some("h2"), 1000.0, 30_000.0),
            vm("fill3", Some("h3"), 1000.0, 30_000.0),
            vm("ok", Some("h1"), 1000.0, 2000.0),
        ],
    );
    snap.hosts[0].groups.push("lic".into());
    snap.rules.push(Rule::VmHost {
        name: "lic-only".into(),
        vms: vec!["pinned".into()],
        host_group: "lic".into(),
        relation: VmHostRelation::MustRunOn,
    });
    snap.vms[1].automation = Some(Automation::Disabled);
    let plan = evacuate(&snap, "h1").unwrap();
    assert_eq!(plan.steps.len(), 1);
    assert_eq!(plan.steps[0].migration.vm, "ok");
    let by_vm: HashMap<&str, &BlockReason> = plan
        .blockers
        .iter()
        .map(|b| (b.vm.as_str(), &b.reason))
        .collect();
    assert!(matches!(
        by_vm["manual-off"],
        BlockReason::AutomationDisabled { .. }
    ));
    let BlockReason::NoHost { hosts, .. } = by_vm["pinned"] else {
        panic!()
    };
    assert!(hosts
        .iter()
        .all(|r| matches!(r.rejection, Rejection::MustRule { .. })));
    let BlockReason::NoHost { hosts, .. } = by_vm["huge"] else {
        panic!()
    };
    assert!(hosts
        .iter()
        .all(|r| matches!(r.rejection, Rejection::Headroom { .. })));
    let text = tern_drs::explain::evacuation_plan(&plan);
    assert!(text.contains("pinned on h1 cannot move"), "{text}");
    assert!(text.contains("DRS automation is disabled"), "{text}");
    assert!(text.contains("memory peak demand would reach"), "{text}");
}

#[test]
fn an_affinity_group_moves_together() {
    let mut snap = snapshot(
        vec![
            host("h1", 50_000.0, 65_536.0),
            host("h2", 50_000.0, 65_536.0),
            host("h3", 50_000.0, 65_536.0),
        ],
        vec![
            vm("a", Some("h1"), 3000.0, 8000.0),
            vm("b", Some("h1"), 3000.0, 8000.0),
            vm("c", Some("h1"), 3000.0, 8000.0),
            vm("x", Some("h2"), 1000.0, 4000.0),
        ],
    );
    snap.rules.push(Rule::Affinity {
        name: "ab".into(),
        vms: vec!["a".into(), "b".into()],
    });
    let plan = evacuate(&snap, "h1").unwrap();
    assert!(plan.blockers.is_empty());
    let dest = |n: &str| {
        plan.steps
            .iter()
            .find(|s| s.migration.vm == n)
            .unwrap()
            .migration
            .to_host
            .clone()
    };
    assert_eq!(dest("a"), dest("b"));
}

/// CPU fit: a VM needing the newest CPU level leaves only for a host of that level, a VM of
/// an older level may go anywhere modelled at or above it, and with no such host left the
/// blocker names the missing features.
#[test]
fn vms_leave_only_for_hosts_whose_cpu_offers_their_features() {
    let mut snap = snapshot(
        vec![
            host("new1", 50_000.0, 65_536.0),
            host("old", 50_000.0, 65_536.0),
            host("new2", 50_000.0, 65_536.0),
            host("mid", 50_000.0, 65_536.0),
        ],
        vec![
            vm("needs-new", Some("new1"), 1000.0, 2000.0),
            vm("needs-mid", Some("new1"), 1000.0, 2000.0),
            vm("any", Some("new1"), 1000.0, 2000.0),
            // Loads new2 so plain balance would rather use old and mid.
            vm("busy", Some("new2"), 30_000.0, 30_000.0),
        ],
    );
    snap.hosts[0].cpu_features = Some(common::cpu_level(2));
    snap.hosts[1].cpu_features = Some(common::cpu_level(0));
    snap.hosts[2].cpu_features = Some(common::cpu_level(2));
    snap.hosts[3].cpu_features = Some(common::cpu_level(1));
    snap.vms[0].cpu_features = common::cpu_level(2);
    snap.vms[1].cpu_features = common::cpu_level(1);
    let plan = evacuate(&snap, "new1").unwrap();
    assert!(plan.blockers.is_empty(), "{:?}", plan.blockers);
    let to: HashMap<&str, &str> = plan
        .steps
        .iter()
        .map(|s| (s.migration.vm.as_str(), s.migration.to_host.as_str()))
        .collect();
    assert_eq!(to["needs-new"], "new2");
    assert!(["new2", "mid"].contains(&to["needs-mid"]), "{to:?}");

    // Without another host of the newest level, the VM is blocked and told why.
    snap.hosts[2].cpu_features = Some(common::cpu_level(1));
    let plan = evacuate(&snap, "new1").unwrap();
    let blocked: Vec<&str> = plan.blockers.iter().map(|b| b.vm.as_str()).collect();
    assert_eq!(blocked, ["needs-new"]);
    let BlockReason::NoHost { hosts, .. } = &plan.blockers[0].reason else {
        panic!("{:?}", plan.blockers[0].reason)
    };
    assert!(
        hosts.iter().all(|r| matches!(
            &r.rejection,
            Rejection::Cpu { missing } if missing == &["cpu-2".to_string()]
                || (r.host == "old" && missing == &["cpu-1".to_string(), "cpu-2".to_string()])
        )),
        "{hosts:?}"
    );
    let text = tern_drs::explain::evacuation_plan(&plan);
    assert!(text.contains("its CPU lacks cpu-2"), "{text}");
}
