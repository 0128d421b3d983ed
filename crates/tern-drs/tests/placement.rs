//! Placement: never breaks reservations or must-rules; explains admission failures;
//! should-rules broken only when nothing else fits, and reported.

mod common;

use common::*;
use tern_drs::{
    place, place_all, HostState, PlaceError, PoolMemory, Rejection, Rule, VmHostRelation,
};

#[test]
fn placement_never_breaks_reservations_or_hard_rules_over_random_clusters() {
    let mut placed = 0;
    let mut failed = 0;
    for seed in 0..300 {
        let mut snap = random_cluster(seed);
        let new: Vec<String> = snap
            .vms
            .iter()
            .filter(|v| v.host.is_none())
            .map(|v| v.name.clone())
            .collect();
        let names: Vec<&str> = new.iter().map(String::as_str).collect();
        let before_violations = hard_violations(&snap).len();
        let results = place_all(&snap, &names).expect("valid snapshot");
        for (name, result) in new.iter().zip(results) {
            match result {
                Ok(p) => {
                    placed += 1;
                    let h = snap.hosts.iter().find(|h| h.name == p.host).unwrap();
                    assert_eq!(
                        h.state,
                        HostState::Connected,
                        "seed {seed}: {name} on {}",
                        p.host
                    );
                    snap.vms.iter_mut().find(|v| &v.name == name).unwrap().host =
                        Some(p.host.clone());
                    let sums = host_sums(&snap);
                    let s = sums[&p.host];
                    // Reservations of the VMs already on the host may exceed it (the random
                    // cluster can start overcommitted); a placement must not add to that.
                    let v = snap.vms.iter().find(|v| &v.name == name).unwrap();
                    if v.memory_reservation_mib > 0.0 {
                        assert!(
                            s[0] <= h.memory_mib + 1e-6,
                            "seed {seed}: memory reservation {} > {}",
                            s[0],
                            h.memory_mib
                        );
                    }
                    if v.cpu_reservation_mhz > 0.0 {
                        assert!(s[1] <= h.cpu_mhz + 1e-6, "seed {seed}: cpu reservation");
                    }
                    // Must-rules and anti-affinity of the placed VM hold.
                    for rule in &snap.rules {
                        match rule {
                            Rule::VmHost {
                                vms,
                                host_group,
                                relation,
                                ..
                            } if relation.is_must() && vms.contains(name) => {
                                assert!(
                                    relation.allows(h.groups.contains(host_group)),
                                    "seed {seed}: {name} breaks {}",
                                    rule.name()
                                );
                            }
                            Rule::AntiAffinity { vms, .. } if vms.contains(name) => {
                                for other in vms.iter().filter(|o| *o != name) {
                                    let oh = snap
                                        .vms
                                        .iter()
                                        .find(|v| &v.name == other)
                                        .unwrap()
                                        .host
                                        .clone();
                                    assert_ne!(
                                        oh.as_deref(),
                                        Some(p.host.as_str()),
                                        "seed {seed}: {name} with {other}"
                                    );
                                }
                            }
                            _ => {}
                        }
                    }
                }
                Err(f) => {
                    failed += 1;
                    assert_eq!(&f.vm, name);
                    assert!(
                        f.pool.is_some() || !f.hosts.is_empty(),
                        "seed {seed}: failure without a reason"
                    );
                    let text = f.to_string();
                    assert!(text.starts_with(&format!("cannot place {name}")), "{text}");
                    // Each reservation rejection is true.
                    for r in &f.hosts {
                        if let Rejection::MemoryReservation {
                            needed_mib,
                            unreserved_mib,
                        } = r.rejection
                        {
                            assert!(needed_mib > unreserved_mib);
                        }
                    }
                }
            }
        }
        // Placement adds no hard-rule violation.
        assert!(
            hard_violations(&snap).len() <= before_violations,
            "seed {seed}"
        );
    }
    assert!(
        placed > 100 && failed > 5,
        "placed {placed}, failed {failed}: the random clusters must exercise both"
    );
}

#[test]
fn admission_failure_names_the_memory_reservation() {
    let mut a = vm("a", Some("h1"), 1000.0, 1000.0);
    a.memory_reservation_mib = 12_288.0;
    let mut b = vm("b", Some("h2"), 1000.0, 1000.0);
    b.memory_reservation_mib = 12_288.0;
    let mut new = vm("new", None, 1000.0, 1000.0);
    new.memory_reservation_mib = 8192.0;
    let snap = snapshot(
        vec![
            host("h1", 20_000.0, 16_384.0),
            host("h2", 20_000.0, 16_384.0),
        ],
        vec![a, b, new],
    );
    let Err(PlaceError::Admission(f)) = place(&snap, "new") else {
        panic!("must fail");
    };
    assert_eq!(f.hosts.len(), 2);
    for r in &f.hosts {
        assert_eq!(
            r.rejection,
            Rejection::MemoryReservation {
                needed_mib: 8192.0,
                unreserved_mib: 4096.0
            }
        );
    }
    let text = f.to_string();
    assert!(
        text.contains("memory reservation 8192 MiB > 4096 MiB unreserved"),
        "{text}"
    );
    assert!(text.contains("h1, h2"), "{text}");
}

#[test]
fn admission_failure_names_the_pool_and_the_rule() {
    let mut new = vm("new", None, 1000.0, 1000.0);
    new.memory_reservation_mib = 8192.0;
    new.pool = Some("small".into());
    let mut snap = snapshot(vec![host("h1", 20_000.0, 65_536.0)], vec![new]);
    snap.pools.push(tern_drs::Pool {
        name: "small".into(),
        parent: None,
        cpu: Default::default(),
        memory: PoolMemory {
            reservation_mib: 4096.0,
            expandable_reservation: false,
            ..Default::default()
        },
    });
    let Err(PlaceError::Admission(f)) = place(&snap, "new") else {
        panic!("must fail");
    };
    let pool = f.pool.as_ref().expect("pool rejection");
    assert_eq!(pool.pool, "small");
    assert_eq!(pool.available, 4096.0);
    assert!(f.to_string().contains("not expandable"), "{f}");
    // Expandable: borrows from the root and fits.
    snap.pools[0].memory.expandable_reservation = true;
    assert!(place(&snap, "new").is_ok());

    // A must-rule whose group has only a host in maintenance.
    let mut snap = snapshot(
        vec![
            host("h1", 20_000.0, 65_536.0),
            host("h2", 20_000.0, 65_536.0),
        ],
        vec![vm("new", None, 1000.0, 1000.0)],
    );
    snap.hosts[1].groups.push("lic".into());
    snap.hosts[1].state = HostState::Maintenance;
    snap.rules.push(Rule::VmHost {
        name: "lic-only".into(),
        vms: vec!["new".into()],
        host_group: "lic".into(),
        relation: VmHostRelation::MustRunOn,
    });
    let Err(PlaceError::Admission(f)) = place(&snap, "new") else {
        panic!("must fail");
    };
    let text = f.to_string();
    assert!(
        text.contains("h1: rule lic-only: VM must run on host group lic"),
        "{text}"
    );
    assert!(text.contains("h2: host is in maintenance"), "{text}");
}

#[test]
fn should_rule_is_broken_only_when_nothing_compliant_fits_and_is_reported() {
    // h1 is in the preferred group but busier than h2: the rule wins over balance.
    let mut snap = snapshot(
        vec![
            host("h1", 20_000.0, 65_536.0),
            host("h2", 20_000.0, 65_536.0),
        ],
        vec![
            vm("busy", Some("h1"), 8000.0, 20_000.0),
            vm("new", None, 2000.0, 4096.0),
        ],
    );
    snap.hosts[0].groups.push("pref".into());
    snap.rules.push(Rule::VmHost {
        name: "prefer-h1".into(),
        vms: vec!["new".into()],
        host_group: "pref".into(),
        relation: VmHostRelation::ShouldRunOn,
    });
    let p = place(&snap, "new").unwrap();
    assert_eq!(p.host, "h1");
    assert!(p.broken_should_rules.is_empty());

    // Now h1 has no room for the VM's peak: it goes to h2 and says which rule it broke.
    snap.vms[0].cpu_demand_mhz = 19_000.0;
    let p = place(&snap, "new").unwrap();
    assert_eq!(p.host, "h2");
    assert_eq!(p.broken_should_rules, vec!["prefer-h1".to_string()]);
    assert!(tern_drs::explain::placement(&p).contains("breaks should-rule(s) prefer-h1"));
}

#[test]
fn placement_prefers_the_host_that_keeps_the_cluster_balanced() {
    let snap = snapshot(
        vec![
            host("h1", 20_000.0, 65_536.0),
            host("h2", 20_000.0, 65_536.0),
            host("h3", 20_000.0, 65_536.0),
        ],
        vec![
            vm("a", Some("h1"), 10_000.0, 30_000.0),
            vm("b", Some("h2"), 2_000.0, 8_000.0),
            vm("c", Some("h3"), 6_000.0, 20_000.0),
            vm("new", None, 3000.0, 8192.0),
        ],
    );
    let p = place(&snap, "new").unwrap();
    assert_eq!(p.host, "h2");
    assert!(p.imbalance_after < p.imbalance_before);
    assert_eq!(p.alternatives.len(), 2);
    assert!(p.alternatives[0].1 >= p.imbalance_after);
}

#[test]
fn admission_on_a_host_counts_the_reservations_already_running_there() {
    let mut running = vm("db", Some("h1"), 500.0, 1024.0);
    running.cpu_reservation_mhz = 3000.0;
    let mut new = vm("web", Some("h1"), 100.0, 512.0);
    new.cpu_reservation_mhz = 2000.0;
    let snap = snapshot(
        vec![host("h1", 4000.0, 8192.0), host("h2", 4000.0, 8192.0)],
        vec![running, new.clone()],
    );
    // 1000 MHz of h1 is unreserved: 2000 cannot power on there, though h2 could take it.
    let Err(PlaceError::Admission(f)) = tern_drs::admit_on(&snap, "web", "h1") else {
        panic!("web admitted on h1");
    };
    assert_eq!(f.hosts.len(), 1);
    assert_eq!(f.hosts[0].host, "h1");
    assert_eq!(
        f.hosts[0].rejection,
        Rejection::CpuReservation {
            needed_mhz: 2000.0,
            unreserved_mhz: 1000.0
        }
    );
    assert!(tern_drs::admit_on(&snap, "web", "h2").is_ok());
    // Its own place on h1 does not count against it: 1000 MHz fits.
    let mut snap = snap;
    snap.vms[1].cpu_reservation_mhz = 1000.0;
    assert!(tern_drs::admit_on(&snap, "web", "h1").is_ok());
    assert!(matches!(
        tern_drs::admit_on(&snap, "web", "h9"),
        Err(PlaceError::NoSuchHost(_))
    ));
    assert!(matches!(
        tern_drs::admit_on(&snap, "nope", "h1"),
        Err(PlaceError::NoSuchVm(_))
    ));
}
