//! Shared helpers of the integration tests: seeded random clusters, applying plans, and
//! independent rule and capacity checks (written apart from the engine's own).

#![allow(dead_code)]

use std::collections::HashMap;

use tern_drs::rng::Rng;
use tern_drs::{
    Host, HostState, LastMigration, Move, Pool, PoolCpu, PoolMemory, Rule, Shares, Snapshot, Vm,
    VmHostRelation,
};

pub fn host(name: &str, cpu_mhz: f64, memory_mib: f64) -> Host {
    Host {
        name: name.into(),
        cpu_mhz,
        memory_mib,
        state: HostState::Connected,
        groups: Vec::new(),
        cpu_features: None,
    }
}

pub fn vm(name: &str, host: Option<&str>, cpu_mhz: f64, memory_mib: f64) -> Vm {
    let mut v = Vm::new(name, 4, memory_mib.max(1024.0) * 1.25);
    v.host = host.map(str::to_string);
    v.cpu_demand_mhz = cpu_mhz;
    v.memory_demand_mib = memory_mib;
    v
}

pub fn snapshot(hosts: Vec<Host>, vms: Vec<Vm>) -> Snapshot {
    Snapshot {
        now_s: 1_000_000,
        config: Default::default(),
        hosts,
        vms,
        rules: Vec::new(),
        pools: Vec::new(),
    }
}

/// A random cluster: connected, maintenance and disconnected hosts, host groups, VMs with
/// demand, reservations and automation overrides, rules (possibly violated now), pools, and
/// a few unplaced VMs (`new-*`).
pub fn random_cluster(seed: u64) -> Snapshot {
    let mut r = Rng::new(seed);
    let nh = 3 + r.below(8);
    let mut hosts = Vec::new();
    for i in 0..nh {
        let mut h = host(
            &format!("h{i}"),
            (16 + 8 * r.below(5)) as f64 * 2600.0,
            (128 + 64 * r.below(6)) as f64 * 1024.0,
        );
        if i % 3 == 0 {
            h.groups.push("g1".into());
        }
        h.groups
            .push(if i % 2 == 0 { "rack-a" } else { "rack-b" }.into());
        hosts.push(h);
    }
    if r.chance(0.3) {
        hosts[nh - 1].state = HostState::Maintenance;
    }
    if nh > 4 && r.chance(0.15) {
        hosts[nh - 2].state = HostState::Disconnected;
    }
    let nv = 10 + r.below(70);
    let mut reserved = vec![0.0f64; nh];
    let mut vms = Vec::new();
    for i in 0..nv {
        let vcpus = [1u32, 2, 4, 8][r.below(4)];
        let mem = f64::from(vcpus) * [2048.0, 4096.0, 8192.0][r.below(3)];
        let mut v = Vm::new(format!("vm{i}"), vcpus, mem);
        v.cpu_demand_mhz = (f64::from(vcpus) * 2600.0 * r.range_f64(0.05, 0.9)).round();
        v.memory_demand_mib = (mem * r.range_f64(0.3, 0.95)).round();
        if r.chance(0.3) {
            v.cpu_peak_mhz = Some(v.cpu_demand_mhz * r.range_f64(1.0, 1.6));
        }
        if r.chance(0.2) {
            v.memory_reservation_mib = (mem * r.range_f64(0.25, 1.0)).round();
        }
        if r.chance(0.1) {
            v.cpu_reservation_mhz = (v.cpu_demand_mhz * 0.5).round();
        }
        if r.chance(0.05) {
            v.automation = Some(tern_drs::Automation::Disabled);
        }
        v.dirty_mib_per_s = r.range_f64(0.0, 200.0).round();
        // Place it where its memory reservation fits (not on disconnected hosts).
        for _ in 0..10 {
            let h = r.below(nh);
            if hosts[h].state != HostState::Disconnected
                && reserved[h] + v.memory_reservation_mib <= hosts[h].memory_mib
            {
                reserved[h] += v.memory_reservation_mib;
                v.host = Some(hosts[h].name.clone());
                break;
            }
        }
        if v.host.is_none() {
            v.memory_reservation_mib = 0.0;
            v.host = Some(hosts[0].name.clone());
        }
        vms.push(v);
    }
    for i in 0..(1 + r.below(4)) {
        let mut v = Vm::new(format!("new-{i}"), 2, 4096.0);
        v.cpu_demand_mhz = r.range_f64(500.0, 4000.0).round();
        v.memory_demand_mib = 3000.0;
        if r.chance(0.5) {
            v.memory_reservation_mib = 4096.0 * r.range_f64(0.5, 40.0).round();
        }
        vms.push(v);
    }
    let names: Vec<String> = vms.iter().map(|v| v.name.clone()).collect();
    let pick = |k: usize, r: &mut Rng| -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        while out.len() < k.min(names.len()) {
            let n = names[r.below(names.len())].clone();
            if !out.contains(&n) {
                out.push(n);
            }
        }
        out
    };
    let mut rules = Vec::new();
    for k in 0..r.below(4) {
        rules.push(Rule::AntiAffinity {
            name: format!("aa{k}"),
            vms: pick(2 + r.below(2), &mut r),
        });
    }
    if r.chance(0.5) {
        rules.push(Rule::Affinity {
            name: "af".into(),
            vms: pick(2, &mut r),
        });
    }
    if r.chance(0.6) {
        rules.push(Rule::VmHost {
            name: "must-g1".into(),
            vms: pick(1 + r.below(3), &mut r),
            host_group: "g1".into(),
            relation: VmHostRelation::MustRunOn,
        });
    }
    if r.chance(0.6) {
        rules.push(Rule::VmHost {
            name: "should-a".into(),
            vms: pick(1 + r.below(4), &mut r),
            host_group: "rack-a".into(),
            relation: VmHostRelation::ShouldRunOn,
        });
    }
    // A VM may not be in two rule kinds that contradict each other in a way no cluster can
    // satisfy; the tests only check what the engine claims, so overlap is allowed.
    let pools = if r.chance(0.5) {
        vec![
            Pool {
                name: "prod".into(),
                parent: None,
                cpu: PoolCpu {
                    shares: Shares::High,
                    ..Default::default()
                },
                memory: PoolMemory::default(),
            },
            Pool {
                name: "dev".into(),
                parent: None,
                cpu: PoolCpu {
                    shares: Shares::Low,
                    ..Default::default()
                },
                memory: PoolMemory {
                    reservation_mib: 64.0 * 1024.0,
                    expandable_reservation: false,
                    ..Default::default()
                },
            },
        ]
    } else {
        Vec::new()
    };
    if !pools.is_empty() {
        for v in &mut vms {
            v.pool = Some(if r.chance(0.5) { "prod" } else { "dev" }.into());
        }
        // Keep dev's existing reservations within its fixed reservation.
        let mut dev = 0.0;
        for v in &mut vms {
            if v.pool.as_deref() == Some("dev") && v.host.is_some() {
                if dev + v.memory_reservation_mib > 64.0 * 1024.0 {
                    v.pool = Some("prod".into());
                } else {
                    dev += v.memory_reservation_mib;
                }
            }
        }
    }
    add_cpu_generations(seed, &mut hosts, &mut vms);
    Snapshot {
        now_s: 1_000_000,
        config: Default::default(),
        hosts,
        vms,
        rules,
        pools,
    }
}

/// Features of CPU level `l`: `cpu-0` … `cpu-l` (each level adds one).
pub fn cpu_level(l: usize) -> Vec<String> {
    (0..=l).map(|i| format!("cpu-{i}")).collect()
}

/// In some clusters, hosts of up to three CPU levels (one host possibly unmodelled) and VMs
/// needing at most their host's level (as they run there now); unplaced VMs any level. Its own
/// random stream, so the rest of a seed's cluster stays what it was.
fn add_cpu_generations(seed: u64, hosts: &mut [Host], vms: &mut [Vm]) {
    let mut r = Rng::new(seed ^ 0x5eed_c0de);
    if !r.chance(0.5) {
        return;
    }
    let mut level = HashMap::new();
    for h in hosts.iter_mut() {
        if r.chance(0.1) {
            continue; // not modelled: runs any CPU
        }
        let l = r.below(3);
        h.cpu_features = Some(cpu_level(l));
        level.insert(h.name.clone(), l);
    }
    for v in vms.iter_mut() {
        let max = match &v.host {
            Some(h) => level.get(h).copied().unwrap_or(2),
            None => 2,
        };
        if r.chance(0.8) {
            v.cpu_features = cpu_level(r.below(max + 1));
        }
    }
}

/// Applies moves to a snapshot (as if they completed now).
pub fn apply(snap: &mut Snapshot, moves: &[Move]) {
    for m in moves {
        let v = snap
            .vms
            .iter_mut()
            .find(|v| v.name == m.vm)
            .expect("moved VM exists");
        assert_eq!(
            v.host.as_deref(),
            Some(m.from_host.as_str()),
            "{} moved from where it is",
            m.vm
        );
        v.host = Some(m.to_host.clone());
        v.last_migration = Some(LastMigration {
            at_s: snap.now_s,
            from_host: Some(m.from_host.clone()),
        });
    }
}

pub fn host_of(snap: &Snapshot) -> HashMap<String, String> {
    snap.vms
        .iter()
        .filter_map(|v| Some((v.name.clone(), v.host.clone()?)))
        .collect()
}

fn host_by_name<'a>(snap: &'a Snapshot, name: &str) -> &'a Host {
    snap.hosts
        .iter()
        .find(|h| h.name == name)
        .expect("host exists")
}

/// Hard-rule violations among VMs on usable hosts: anti-affinity pairs sharing a host,
/// must-rules broken, affinity groups split.
pub fn hard_violations(snap: &Snapshot) -> Vec<String> {
    let at = host_of(snap);
    let mut out = Vec::new();
    for rule in &snap.rules {
        match rule {
            Rule::AntiAffinity { name, vms } => {
                for (i, a) in vms.iter().enumerate() {
                    for b in &vms[i + 1..] {
                        if let (Some(x), Some(y)) = (at.get(a), at.get(b)) {
                            if x == y && host_by_name(snap, x).state != HostState::Disconnected {
                                out.push(format!("{name}: {a} and {b} on {x}"));
                            }
                        }
                    }
                }
            }
            Rule::Affinity { name, vms } => {
                let mut hs: Vec<&String> = vms.iter().filter_map(|v| at.get(v)).collect();
                hs.sort();
                hs.dedup();
                if hs.len() > 1 {
                    out.push(format!("{name}: split over {hs:?}"));
                }
            }
            Rule::VmHost {
                name,
                vms,
                host_group,
                relation,
            } if relation.is_must() => {
                for v in vms {
                    if let Some(h) = at.get(v) {
                        let host = host_by_name(snap, h);
                        if host.state == HostState::Disconnected {
                            continue;
                        }
                        let in_group = host.groups.contains(host_group);
                        if !relation.allows(in_group) {
                            out.push(format!("{name}: {v} on {h}"));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    for v in &snap.vms {
        let Some(h) = &v.host else { continue };
        let host = host_by_name(snap, h);
        if host.state == HostState::Disconnected {
            continue;
        }
        if let Some(offered) = &host.cpu_features {
            if let Some(f) = v.cpu_features.iter().find(|f| !offered.contains(f)) {
                out.push(format!("cpu: {} on {h} lacking {f}", v.name));
            }
        }
    }
    out
}

/// Per-host (Σ memory reservation, Σ cpu reservation, expected peak cpu, expected peak
/// memory, Σ latest cpu, Σ latest memory). The expected peak is the engine's documented
/// rule: Σ latest + √Σ (peak − latest)².
pub fn host_sums(snap: &Snapshot) -> HashMap<String, [f64; 6]> {
    let mut m: HashMap<String, [f64; 8]> = HashMap::new();
    for v in &snap.vms {
        if let Some(h) = &v.host {
            let e = m.entry(h.clone()).or_insert([0.0; 8]);
            e[0] += v.memory_reservation_mib;
            e[1] += v.cpu_reservation_mhz;
            e[4] += v.cpu_demand_mhz;
            e[5] += v.memory_demand_mib;
            e[6] += (v.cpu_peak() - v.cpu_demand_mhz).powi(2);
            e[7] += (v.memory_peak() - v.memory_demand_mib).powi(2);
        }
    }
    m.into_iter()
        .map(|(h, e)| {
            (
                h,
                [
                    e[0],
                    e[1],
                    e[4] + e[6].sqrt(),
                    e[5] + e[7].sqrt(),
                    e[4],
                    e[5],
                ],
            )
        })
        .collect()
}
