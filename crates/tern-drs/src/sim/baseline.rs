//! The policies the simulator compares: tern's engine and three baselines — no balancing,
//! greedy (most- to least-loaded host until no gain, the ProxLB / Proxmox CRS style), and a
//! descheduler-style LowNodeUtilization.
//!
//! Baselines see the same snapshots as tern but use what such tools use: the latest demand
//! sample, no rules, no cooldown, no migration cost. They leave VMs whose automation is
//! `manual` or `disabled` alone (the equivalent of an "ignore" tag). Their placement is
//! least-loaded (kube-scheduler's LeastAllocated, Proxmox's "basic" static placement).

use std::collections::HashMap;

use crate::entitlement::{CPU, MEM};
use crate::model::{Automation, HostState, Snapshot, Threshold};

/// A balancing policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Placement only; VMs never move.
    NoBalancing,
    /// Most- to least-loaded host, best VM each time, until no move lowers imbalance.
    Greedy,
    /// Descheduler LowNodeUtilization with deviation thresholds (±5 points of the mean).
    LowNodeUtilization,
    /// tern's engine at a threshold.
    Tern(Threshold),
}

impl Policy {
    pub fn name(&self) -> String {
        match self {
            Policy::NoBalancing => "none".into(),
            Policy::Greedy => "greedy".into(),
            Policy::LowNodeUtilization => "lownodeutil".into(),
            Policy::Tern(t) => format!("tern (t{t})"),
        }
    }

    /// One pass: migrations as (index into `snap.vms`, index into `snap.hosts`).
    pub fn pass(&self, snap: &Snapshot) -> Vec<(usize, usize)> {
        match self {
            Policy::NoBalancing => Vec::new(),
            Policy::Greedy => greedy(snap),
            Policy::LowNodeUtilization => low_node_utilization(snap, 0.05, 0.05),
            Policy::Tern(t) => {
                let Ok(plan) = crate::balance(snap, *t) else {
                    return Vec::new();
                };
                let hosts: HashMap<&str, usize> = snap
                    .hosts
                    .iter()
                    .enumerate()
                    .map(|(i, h)| (h.name.as_str(), i))
                    .collect();
                let vms: HashMap<&str, usize> = snap
                    .vms
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (v.name.as_str(), i))
                    .collect();
                plan.moves
                    .iter()
                    .filter(|m| m.automatic)
                    .filter_map(|m| {
                        Some((*vms.get(m.vm.as_str())?, *hosts.get(m.to_host.as_str())?))
                    })
                    .collect()
            }
        }
    }

    /// Places the unplaced VMs `vms` (indices into `snap.vms`, in order); `None` = no host.
    pub fn place(&self, snap: &Snapshot, vms: &[usize]) -> Vec<Option<usize>> {
        match self {
            Policy::Tern(_) => {
                let names: Vec<&str> = vms.iter().map(|&v| snap.vms[v].name.as_str()).collect();
                let hosts: HashMap<&str, usize> = snap
                    .hosts
                    .iter()
                    .enumerate()
                    .map(|(i, h)| (h.name.as_str(), i))
                    .collect();
                match crate::place_all(snap, &names) {
                    Ok(results) => results
                        .into_iter()
                        .map(|r| r.ok().and_then(|p| hosts.get(p.host.as_str()).copied()))
                        .collect(),
                    Err(_) => vec![None; vms.len()],
                }
            }
            _ => least_loaded(snap, vms),
        }
    }
}

/// Demand loads `[cpu, mem]` per host from the latest samples.
struct Loads {
    cap: Vec<[f64; 2]>,
    used: Vec<[f64; 2]>,
    usable: Vec<bool>,
    host_of: Vec<Option<usize>>,
    on_host: Vec<Vec<usize>>,
}

impl Loads {
    fn new(snap: &Snapshot) -> Loads {
        let index: HashMap<&str, usize> = snap
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (h.name.as_str(), i))
            .collect();
        let cap: Vec<[f64; 2]> = snap
            .hosts
            .iter()
            .map(|h| [h.cpu_mhz, h.memory_mib])
            .collect();
        let mut used = vec![[0.0; 2]; cap.len()];
        let mut on_host = vec![Vec::new(); cap.len()];
        let host_of: Vec<Option<usize>> = snap
            .vms
            .iter()
            .map(|v| v.host.as_deref().and_then(|h| index.get(h).copied()))
            .collect();
        for (v, h) in host_of.iter().enumerate() {
            if let Some(h) = *h {
                used[h][CPU] += snap.vms[v].cpu_demand_mhz;
                used[h][MEM] += snap.vms[v].memory_demand_mib;
                on_host[h].push(v);
            }
        }
        Loads {
            cap,
            used,
            usable: snap
                .hosts
                .iter()
                .map(|h| h.state == HostState::Connected)
                .collect(),
            host_of,
            on_host,
        }
    }

    fn load(&self, h: usize, r: usize) -> f64 {
        self.used[h][r] / self.cap[h][r]
    }

    fn score(&self, h: usize) -> f64 {
        0.5 * (self.load(h, CPU) + self.load(h, MEM))
    }

    fn mean(&self, r: usize) -> f64 {
        let hs: Vec<usize> = (0..self.cap.len()).filter(|&h| self.usable[h]).collect();
        hs.iter().map(|&h| self.load(h, r)).sum::<f64>() / hs.len().max(1) as f64
    }

    fn shift(&mut self, v: usize, d: [f64; 2], to: usize) {
        if let Some(s) = self.host_of[v] {
            self.used[s][CPU] -= d[CPU];
            self.used[s][MEM] -= d[MEM];
            if let Some(p) = self.on_host[s].iter().position(|&x| x == v) {
                self.on_host[s].swap_remove(p);
            }
        }
        self.used[to][CPU] += d[CPU];
        self.used[to][MEM] += d[MEM];
        self.on_host[to].push(v);
        self.host_of[v] = Some(to);
    }
}

fn movable(snap: &Snapshot, v: usize) -> bool {
    !matches!(
        snap.vms[v].automation.unwrap_or(snap.config.automation),
        Automation::Manual | Automation::Disabled
    )
}

fn demand(snap: &Snapshot, v: usize) -> [f64; 2] {
    [snap.vms[v].cpu_demand_mhz, snap.vms[v].memory_demand_mib]
}

fn least_loaded(snap: &Snapshot, vms: &[usize]) -> Vec<Option<usize>> {
    let mut l = Loads::new(snap);
    vms.iter()
        .map(|&v| {
            let d = demand(snap, v);
            let after = |l: &Loads, h: usize| {
                [
                    (l.used[h][CPU] + d[CPU]) / l.cap[h][CPU],
                    (l.used[h][MEM] + d[MEM]) / l.cap[h][MEM],
                ]
            };
            let best = (0..l.cap.len()).filter(|&h| l.usable[h]).min_by(|&a, &b| {
                let (x, y) = (after(&l, a), after(&l, b));
                let fit = |z: [f64; 2]| z[CPU] > 1.0 || z[MEM] > 1.0;
                fit(x)
                    .cmp(&fit(y))
                    .then((x[CPU] + x[MEM]).total_cmp(&(y[CPU] + y[MEM])))
                    .then(a.cmp(&b))
            })?;
            l.shift(v, d, best);
            Some(best)
        })
        .collect()
}

/// Reduction of the weighted sum of squared deviations when load moves from s to d.
fn gain(l: &Loads, n: f64, sums: [f64; 2], d: [f64; 2], s: usize, t: usize) -> f64 {
    let mut g = 0.0;
    for r in [CPU, MEM] {
        let a = d[r] / l.cap[s][r];
        let b = d[r] / l.cap[t][r];
        let (ls, lt) = (l.load(s, r), l.load(t, r));
        let sum = sums[r];
        let diff = b - a;
        g += 0.5
            * (2.0 * a * ls - a * a - 2.0 * b * lt - b * b + (2.0 * sum * diff + diff * diff) / n);
    }
    g
}

fn greedy(snap: &Snapshot) -> Vec<(usize, usize)> {
    let mut l = Loads::new(snap);
    let hosts: Vec<usize> = (0..l.cap.len()).filter(|&h| l.usable[h]).collect();
    if hosts.len() < 2 {
        return Vec::new();
    }
    let n = hosts.len() as f64;
    let mut moves = Vec::new();
    for _ in 0..(5 * snap.vms.len()).max(1) {
        let hi = *hosts
            .iter()
            .max_by(|&&a, &&b| l.score(a).total_cmp(&l.score(b)).then(b.cmp(&a)))
            .unwrap_or(&hosts[0]);
        let lo = *hosts
            .iter()
            .min_by(|&&a, &&b| l.score(a).total_cmp(&l.score(b)).then(a.cmp(&b)))
            .unwrap_or(&hosts[0]);
        if hi == lo {
            break;
        }
        let sums = [l.mean(CPU) * n, l.mean(MEM) * n];
        let mut best: Option<(f64, usize)> = None;
        for &v in &l.on_host[hi] {
            if !movable(snap, v) {
                continue;
            }
            let d = demand(snap, v);
            if (l.used[lo][CPU] + d[CPU]) > l.cap[lo][CPU]
                || (l.used[lo][MEM] + d[MEM]) > l.cap[lo][MEM]
            {
                continue;
            }
            let g = gain(&l, n, sums, d, hi, lo);
            if g > 1e-12 && best.is_none_or(|b| g > b.0) {
                best = Some((g, v));
            }
        }
        let Some((_, v)) = best else { break };
        l.shift(v, demand(snap, v), lo);
        moves.push((v, lo));
    }
    // A VM moved twice in a pass only needs its final destination.
    let mut last: HashMap<usize, usize> = HashMap::new();
    let mut order = Vec::new();
    for (v, h) in moves {
        if last.insert(v, h).is_none() {
            order.push(v);
        }
    }
    let original = Loads::new(snap).host_of;
    order
        .into_iter()
        .filter_map(|v| {
            let h = last[&v];
            (original[v] != Some(h)).then_some((v, h))
        })
        .collect()
}

fn low_node_utilization(snap: &Snapshot, low: f64, high: f64) -> Vec<(usize, usize)> {
    let mut l = Loads::new(snap);
    let hosts: Vec<usize> = (0..l.cap.len()).filter(|&h| l.usable[h]).collect();
    let mean = [l.mean(CPU), l.mean(MEM)];
    let under = |l: &Loads, h: usize| [CPU, MEM].iter().all(|&r| l.load(h, r) < mean[r] - low);
    let over = |l: &Loads, h: usize| [CPU, MEM].iter().any(|&r| l.load(h, r) > mean[r] + high);
    if !hosts.iter().any(|&h| under(&l, h)) {
        return Vec::new();
    }
    let mut overs: Vec<usize> = hosts.iter().copied().filter(|&h| over(&l, h)).collect();
    overs.sort_by(|&a, &b| l.score(b).total_cmp(&l.score(a)).then(a.cmp(&b)));
    let mut moves = Vec::new();
    for h in overs {
        // Evict the biggest users of the over-used resource first.
        let r = if l.load(h, CPU) - mean[CPU] >= l.load(h, MEM) - mean[MEM] {
            CPU
        } else {
            MEM
        };
        let mut vms: Vec<usize> = l.on_host[h]
            .iter()
            .copied()
            .filter(|&v| movable(snap, v))
            .collect();
        vms.sort_by(|&a, &b| {
            demand(snap, b)[r]
                .total_cmp(&demand(snap, a)[r])
                .then(a.cmp(&b))
        });
        for v in vms {
            if !over(&l, h) {
                break;
            }
            // The scheduler puts it on the least-allocated node that fits, if any is
            // still under the target thresholds.
            let d = demand(snap, v);
            let target = hosts
                .iter()
                .copied()
                .filter(|&t| t != h)
                .filter(|&t| {
                    [CPU, MEM]
                        .iter()
                        .all(|&r| (l.used[t][r] + d[r]) / l.cap[t][r] <= mean[r] + high)
                })
                .min_by(|&a, &b| l.score(a).total_cmp(&l.score(b)).then(a.cmp(&b)));
            let Some(t) = target else { break };
            if !hosts.iter().any(|&u| under(&l, u)) {
                break;
            }
            l.shift(v, d, t);
            moves.push((v, t));
        }
    }
    moves
}
