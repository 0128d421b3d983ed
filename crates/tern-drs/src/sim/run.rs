//! The simulator loop: replays a workload step by step, places arriving VMs, runs a policy
//! every period on a snapshot, applies its migrations with a modelled duration (per-host
//! concurrency slots, pre-copy cost) and measures imbalance, overload, migrations, rule
//! violations and the policy's time per pass.
//!
//! Measured at every step, identically for every policy: imbalance from entitlements of the
//! latest demand (the engine's metric); a host is overloaded when its demand — plus, while a
//! migration runs, the incoming VM's memory and the copy's CPU on both ends — exceeds its
//! capacity in CPU or memory.

use std::collections::HashMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::cost;
use crate::entitlement::{PoolTree, CPU, MEM};
use crate::model::{Config, LastMigration, Rule, Snapshot, Vm};
use crate::sim::baseline::Policy;
use crate::sim::workload::Workload;

/// Simulator settings.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// The policy runs every this many steps.
    pub period_steps: usize,
    /// Window of the peak demand in snapshots, in steps.
    pub window_steps: usize,
    /// Quantile of the window taken as peak demand.
    pub peak_quantile: f64,
    /// Engine settings; its migration model (bandwidth, downtime, CPU, concurrency) is also
    /// the simulator's for every policy.
    pub config: Config,
    /// A VM returning within this time to the host it left counts as a ping-pong.
    pub ping_pong_window_s: u64,
}

impl Default for SimOptions {
    fn default() -> SimOptions {
        SimOptions {
            period_steps: 1,
            window_steps: 12,
            peak_quantile: 0.95,
            config: Config::default(),
            ping_pong_window_s: 7200,
        }
    }
}

/// What a simulation measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimReport {
    pub policy: String,
    pub workload: String,
    pub hosts: usize,
    /// VMs that existed at some point.
    pub vms: usize,
    pub steps: usize,
    pub step_s: u64,
    pub imbalance_mean: f64,
    pub imbalance_p95: f64,
    /// Host-hours with demand above capacity.
    pub overload_host_h: f64,
    /// Share of host-time overloaded.
    pub overload_fraction: f64,
    pub migrations: usize,
    pub moved_gib: f64,
    /// Migrations that took a VM back to the host it left within the ping-pong window.
    pub ping_pongs: usize,
    /// VM-steps breaking an affinity, anti-affinity or must rule.
    pub violations: usize,
    /// VM-steps breaking a should-rule.
    pub should_violations: usize,
    pub placement_failures: usize,
    /// Placements and migrations that failed because the host's CPU lacks features the VM
    /// needs (QEMU refuses such a start or migration); not applied. Also counted in
    /// `placement_failures` for placements.
    #[serde(default)]
    pub cpu_refused: usize,
    pub passes: usize,
    pub pass_ms_mean: f64,
    pub pass_ms_max: f64,
    /// The imbalance measured at each step (before that step's pass).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub imbalance_by_step: Vec<f64>,
    /// Migrations each step's pass started.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub migrations_by_step: Vec<usize>,
}

impl SimReport {
    /// The first step whose imbalance is at most `target`, and the migrations started
    /// before it: how long a policy takes to undo a skewed start.
    pub fn settled(&self, target: f64) -> Option<(usize, usize)> {
        let k = self.imbalance_by_step.iter().position(|&x| x <= target)?;
        Some((k, self.migrations_by_step.iter().take(k).sum()))
    }
}

#[derive(Debug, Clone, Copy)]
struct Flight {
    from: usize,
    to: usize,
    start_s: f64,
    end_s: f64,
}

struct RuleIndex {
    anti: Vec<Vec<usize>>,
    affinity: Vec<Vec<usize>>,
    /// (members, allowed per host, is_must)
    host: Vec<(Vec<usize>, Vec<bool>, bool)>,
}

impl RuleIndex {
    fn new(w: &Workload, index: &HashMap<&str, usize>) -> RuleIndex {
        let members = |vms: &[String]| -> Vec<usize> {
            vms.iter()
                .filter_map(|n| index.get(n.as_str()).copied())
                .collect()
        };
        let mut r = RuleIndex {
            anti: Vec::new(),
            affinity: Vec::new(),
            host: Vec::new(),
        };
        for rule in &w.rules {
            match rule {
                Rule::AntiAffinity { vms, .. } => r.anti.push(members(vms)),
                Rule::Affinity { vms, .. } => r.affinity.push(members(vms)),
                Rule::VmHost {
                    vms,
                    host_group,
                    relation,
                    ..
                } => {
                    let allowed = w
                        .hosts
                        .iter()
                        .map(|h| relation.allows(h.groups.iter().any(|g| g == host_group)))
                        .collect();
                    r.host.push((members(vms), allowed, relation.is_must()));
                }
            }
        }
        r
    }

    /// (hard, should) violations, in VMs.
    fn count(&self, host_of: &[Option<usize>]) -> (usize, usize) {
        let mut hard = 0;
        let mut soft = 0;
        for group in &self.anti {
            let mut hosts: Vec<usize> = group.iter().filter_map(|&v| host_of[v]).collect();
            hosts.sort_unstable();
            let mut i = 0;
            while i < hosts.len() {
                let j = hosts[i..]
                    .iter()
                    .position(|&h| h != hosts[i])
                    .map_or(hosts.len(), |k| i + k);
                if j - i > 1 {
                    hard += j - i;
                }
                i = j;
            }
        }
        for group in &self.affinity {
            let hosts: Vec<usize> = group.iter().filter_map(|&v| host_of[v]).collect();
            if let Some(m) = crate::evacuate::most_common(&hosts) {
                hard += hosts.iter().filter(|&&h| h != m).count();
            }
        }
        for (members, allowed, must) in &self.host {
            let n = members
                .iter()
                .filter(|&&v| host_of[v].is_some_and(|h| !allowed[h]))
                .count();
            if *must {
                hard += n;
            } else {
                soft += n;
            }
        }
        (hard, soft)
    }
}

/// Replays `w` under `policy`. Deterministic: the same inputs give the same report (except
/// the measured pass times).
pub fn simulate(w: &Workload, policy: Policy, opts: &SimOptions) -> SimReport {
    let nv = w.vms.len();
    let nh = w.hosts.len();
    let cfg = &opts.config;
    let step_s = w.step_s.max(1);
    let index: HashMap<&str, usize> = w
        .vms
        .iter()
        .enumerate()
        .map(|(i, v)| (v.vm.name.as_str(), i))
        .collect();
    let rules = RuleIndex::new(w, &index);
    let templates: Vec<Vm> = w.vms.iter().map(|v| v.vm.clone()).collect();
    let tree = PoolTree::new(&w.pools, &templates).ok();
    let cap: Vec<[f64; 2]> = w.hosts.iter().map(|h| [h.cpu_mhz, h.memory_mib]).collect();
    let usable: Vec<bool> = w
        .hosts
        .iter()
        .map(|h| h.state == crate::model::HostState::Connected)
        .collect();
    let capacity = (0..nh)
        .filter(|&h| usable[h])
        .fold([0.0; 2], |a, h| [a[0] + cap[h][CPU], a[1] + cap[h][MEM]]);
    let mut host_of: Vec<Option<usize>> = vec![None; nv];
    let mut flight: Vec<Option<Flight>> = vec![None; nv];
    let mut last: Vec<Option<LastMigration>> = vec![None; nv];
    let mut last_from: Vec<Option<(u64, usize)>> = vec![None; nv];
    let slots = cfg.max_concurrent_migrations_per_host.max(1);
    let mut free_at: Vec<Vec<f64>> = vec![vec![0.0; slots]; nh];
    let mut arrivals: Vec<Vec<usize>> = vec![Vec::new(); w.steps + 1];
    for (v, wv) in w.vms.iter().enumerate() {
        if wv.arrive_step < w.steps {
            arrivals[wv.arrive_step].push(v);
        }
    }
    let period = opts.period_steps.max(1);

    let mut imbalances = Vec::with_capacity(w.steps);
    let mut overload_host_steps = 0usize;
    let mut migrations = 0usize;
    let mut migrations_by_step: Vec<usize> = Vec::with_capacity(w.steps);
    let mut moved_mib = 0.0;
    let mut ping_pongs = 0usize;
    let mut violations = 0usize;
    let mut should_violations = 0usize;
    let mut placement_failures = 0usize;
    let mut cpu_refused = 0usize;
    let mut pass_ms: Vec<f64> = Vec::new();
    let cpu_ok = |v: usize, h: usize| -> bool {
        match &w.hosts[h].cpu_features {
            None => true,
            Some(offered) => w.vms[v].vm.cpu_features.iter().all(|f| offered.contains(f)),
        }
    };

    for (k, arriving) in arrivals.iter().enumerate().take(w.steps) {
        let t = (k as u64 * step_s) as f64;
        // Migrations that finished.
        for v in 0..nv {
            if let Some(f) = flight[v] {
                if f.end_s <= t {
                    host_of[v] = Some(f.to);
                    flight[v] = None;
                }
            }
        }
        // Departures.
        for v in 0..nv {
            if host_of[v].is_some() && !w.vms[v].alive(k) {
                host_of[v] = None;
                flight[v] = None;
            }
        }
        // Arrivals: where the trace ran them (a replayed cluster), else placed by the policy.
        let mut arriving_free = Vec::with_capacity(arriving.len());
        for &v in arriving {
            let given = w.vms[v]
                .vm
                .host
                .as_deref()
                .and_then(|h| w.hosts.iter().position(|x| x.name == h));
            match given {
                Some(h) => host_of[v] = Some(h),
                None => arriving_free.push(v),
            }
        }
        let arriving = &arriving_free;
        if !arriving.is_empty() {
            let (snap, map) = snapshot(w, k, t, &host_of, &flight, &last, arriving, opts);
            let new: Vec<usize> = (0..map.len())
                .filter(|&i| snap.vms[i].host.is_none())
                .collect();
            let placed = policy.place(&snap, &new);
            for (i, h) in new.iter().zip(placed) {
                match h {
                    Some(h) if cpu_ok(map[*i], h) => host_of[map[*i]] = Some(h),
                    Some(_) => {
                        cpu_refused += 1;
                        placement_failures += 1;
                    }
                    None => placement_failures += 1,
                }
            }
        }

        // Measure this step.
        let mut demand = vec![[0.0f64; 2]; nh];
        let mut running = vec![false; nv];
        let mut dem_vm = vec![[0.0f64; 2]; nv];
        for v in 0..nv {
            if let Some(h) = host_of[v] {
                let d = w.vms[v].demand(k);
                demand[h][CPU] += d[CPU];
                demand[h][MEM] += d[MEM];
                running[v] = true;
                dem_vm[v] = d;
            }
        }
        for f in flight
            .iter()
            .enumerate()
            .filter_map(|(v, f)| f.map(|f| (v, f)))
        {
            let (v, f) = f;
            if f.start_s <= t && t < f.end_s {
                demand[f.to][MEM] += dem_vm[v][MEM];
                demand[f.to][CPU] += cfg.migration_cpu_mhz;
                demand[f.from][CPU] += cfg.migration_cpu_mhz;
            }
        }
        overload_host_steps += (0..nh)
            .filter(|&h| {
                usable[h] && (demand[h][CPU] > cap[h][CPU] || demand[h][MEM] > cap[h][MEM])
            })
            .count();
        let ent = match &tree {
            Some(tree) => tree.entitlements(&templates, &running, &dem_vm, capacity),
            None => dem_vm.clone(),
        };
        let mut load = vec![[0.0f64; 2]; nh];
        for v in 0..nv {
            if let Some(h) = host_of[v] {
                load[h][CPU] += ent[v][CPU] / cap[h][CPU];
                load[h][MEM] += ent[v][MEM] / cap[h][MEM];
            }
        }
        imbalances.push(imbalance(&load, &usable, cfg.cpu_weight));
        let (hard, soft) = rules.count(&host_of);
        violations += hard;
        should_violations += soft;

        // The policy's pass.
        let migrations_before = migrations;
        if k % period == 0 {
            let (snap, map) = snapshot(w, k, t, &host_of, &flight, &last, &[], opts);
            let started = Instant::now();
            let moves = policy.pass(&snap);
            pass_ms.push(started.elapsed().as_secs_f64() * 1000.0);
            for (si, to) in moves {
                let v = map[si];
                let Some(from) = host_of[v] else { continue };
                if flight[v].is_some() || from == to || to >= nh {
                    continue;
                }
                if !cpu_ok(v, to) {
                    cpu_refused += 1;
                    continue;
                }
                let vm = &w.vms[v].vm;
                let c = cost::estimate(
                    vm.memory_mib,
                    vm.dirty_mib_per_s,
                    cfg.migration_bandwidth_mib_per_s,
                    cfg.max_downtime_ms,
                );
                let (si_, s_free) = earliest(&free_at[from]);
                let (di_, d_free) = earliest(&free_at[to]);
                let start = t.max(s_free).max(d_free);
                let end = start + c.duration_s;
                free_at[from][si_] = end;
                free_at[to][di_] = end;
                flight[v] = Some(Flight {
                    from,
                    to,
                    start_s: start,
                    end_s: end,
                });
                if let Some((at, prev)) = last_from[v] {
                    if prev == to && (t as u64).saturating_sub(at) < opts.ping_pong_window_s {
                        ping_pongs += 1;
                    }
                }
                last_from[v] = Some((end as u64, from));
                last[v] = Some(LastMigration {
                    at_s: end as u64,
                    from_host: Some(w.hosts[from].name.clone()),
                });
                migrations += 1;
                moved_mib += c.copied_mib;
            }
        }
        migrations_by_step.push(migrations - migrations_before);
    }

    let mut sorted = imbalances.clone();
    sorted.sort_by(f64::total_cmp);
    let n_usable = usable.iter().filter(|u| **u).count().max(1);
    SimReport {
        policy: policy.name(),
        workload: w.name.clone(),
        hosts: nh,
        vms: nv,
        steps: w.steps,
        step_s,
        imbalance_mean: imbalances.iter().sum::<f64>() / imbalances.len().max(1) as f64,
        imbalance_p95: quantile(&sorted, 0.95),
        overload_host_h: overload_host_steps as f64 * step_s as f64 / 3600.0,
        overload_fraction: overload_host_steps as f64 / (w.steps.max(1) * n_usable) as f64,
        migrations,
        moved_gib: moved_mib / 1024.0,
        ping_pongs,
        violations,
        should_violations,
        placement_failures,
        cpu_refused,
        passes: pass_ms.len(),
        pass_ms_mean: pass_ms.iter().sum::<f64>() / pass_ms.len().max(1) as f64,
        pass_ms_max: pass_ms.iter().copied().fold(0.0, f64::max),
        imbalance_by_step: imbalances,
        migrations_by_step,
    }
}

fn earliest(slots: &[f64]) -> (usize, f64) {
    slots
        .iter()
        .copied()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((0, 0.0))
}

/// `q`-quantile of sorted values (nearest rank).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Combined imbalance of per-host loads over usable hosts (the engine's formula).
pub fn imbalance(load: &[[f64; 2]], usable: &[bool], cpu_weight: f64) -> f64 {
    let hs: Vec<usize> = (0..load.len()).filter(|&h| usable[h]).collect();
    if hs.is_empty() {
        return 0.0;
    }
    let n = hs.len() as f64;
    let mut var = 0.0;
    for (r, w) in [(CPU, cpu_weight), (MEM, 1.0 - cpu_weight)] {
        let m = hs.iter().map(|&h| load[h][r]).sum::<f64>() / n;
        let v = hs.iter().map(|&h| (load[h][r] - m).powi(2)).sum::<f64>() / n;
        var += w * v;
    }
    var.sqrt()
}

/// The snapshot of workload `w` at step `k` with VMs on `host_of` (indices into `w.hosts`;
/// `None` = not placed), latest and window-peak demand, and no migration history. Returns
/// it with the map from snapshot VM index to workload VM index.
pub fn snapshot_at(
    w: &Workload,
    k: usize,
    host_of: &[Option<usize>],
    opts: &SimOptions,
) -> (Snapshot, Vec<usize>) {
    let none = vec![None; w.vms.len()];
    let t = (k as u64 * w.step_s) as f64;
    snapshot(w, k, t, host_of, &vec![None; w.vms.len()], &none, &[], opts)
}

/// The snapshot a policy sees at step `k`: every placed VM (at its destination if a
/// migration is under way) plus `unplaced`, with latest and window-peak demand. Returns it
/// with the map from snapshot VM index to workload VM index.
#[allow(clippy::too_many_arguments)]
fn snapshot(
    w: &Workload,
    k: usize,
    t: f64,
    host_of: &[Option<usize>],
    flight: &[Option<Flight>],
    last: &[Option<LastMigration>],
    unplaced: &[usize],
    opts: &SimOptions,
) -> (Snapshot, Vec<usize>) {
    let mut vms = Vec::new();
    let mut map = Vec::new();
    let mut window = Vec::with_capacity(opts.window_steps.max(1));
    let mut push = |v: usize, host: Option<usize>| {
        let wv = &w.vms[v];
        let mut vm = wv.vm.clone();
        vm.host = host.map(|h| w.hosts[h].name.clone());
        let d = wv.demand(k);
        vm.cpu_demand_mhz = d[CPU];
        vm.memory_demand_mib = d[MEM];
        let from = wv
            .arrive_step
            .max((k + 1).saturating_sub(opts.window_steps.max(1)));
        for r in [CPU, MEM] {
            window.clear();
            window.extend((from..=k).map(|s| wv.demand(s)[r]));
            window.sort_by(f64::total_cmp);
            let peak = quantile(&window, opts.peak_quantile);
            if r == CPU {
                vm.cpu_peak_mhz = Some(peak);
            } else {
                vm.memory_peak_mib = Some(peak);
            }
        }
        vm.last_migration = last[v].clone();
        vms.push(vm);
        map.push(v);
    };
    for v in 0..w.vms.len() {
        if let Some(h) = host_of[v] {
            let at = flight[v].map_or(h, |f| f.to);
            push(v, Some(at));
        }
    }
    for &v in unplaced {
        if host_of[v].is_none() && w.vms[v].alive(k) {
            push(v, None);
        }
    }
    let present: std::collections::HashSet<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    let rules = w
        .rules
        .iter()
        .filter_map(|r| {
            let keep = |vms: &Vec<String>| -> Vec<String> {
                vms.iter()
                    .filter(|n| present.contains(n.as_str()))
                    .cloned()
                    .collect()
            };
            let r = match r {
                Rule::Affinity { name, vms } => Rule::Affinity {
                    name: name.clone(),
                    vms: keep(vms),
                },
                Rule::AntiAffinity { name, vms } => Rule::AntiAffinity {
                    name: name.clone(),
                    vms: keep(vms),
                },
                Rule::VmHost {
                    name,
                    vms,
                    host_group,
                    relation,
                } => Rule::VmHost {
                    name: name.clone(),
                    vms: keep(vms),
                    host_group: host_group.clone(),
                    relation: *relation,
                },
            };
            (!r.vms().is_empty()).then_some(r)
        })
        .collect();
    (
        Snapshot {
            now_s: t as u64,
            config: opts.config.clone(),
            hosts: w.hosts.clone(),
            vms,
            rules,
            pools: w.pools.clone(),
        },
        map,
    )
}
