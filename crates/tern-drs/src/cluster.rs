//! The engine's working state: a snapshot compiled to indices (hosts, VMs, rules, affinity
//! groups, entitlements), with O(1) evaluation of a move's effect on imbalance and the
//! feasibility checks every decision shares. Decisions apply moves here as they plan them.

use std::collections::HashMap;

use crate::cost::{self, MigrationCost};
use crate::decision::{
    HostRejection, HostSummary, Loads, Move, MoveNumbers, MoveReason, Rejection, Resource,
};
use crate::entitlement::{PoolTree, CPU, MEM};
use crate::model::{Automation, Config, HostState, Rule, Snapshot, SnapshotError, VmHostRelation};

/// How strict a destination search is about headroom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fit {
    /// Peak demand must stay under the high-water mark (balancing).
    HighWater,
    /// Prefer under high water, accept up to capacity, never beyond (mandatory moves).
    Capacity,
    /// Prefer fitting, accept anything that passes the hard checks (placement).
    Any,
}

/// A VM-host rule compiled to a host mask.
#[derive(Debug, Clone)]
pub(crate) struct HostRule {
    pub rule: usize,
    pub relation: VmHostRelation,
    pub in_group: Vec<bool>,
}

pub(crate) struct Cluster<'s> {
    pub snap: &'s Snapshot,
    pub cfg: &'s Config,
    pub weights: [f64; 2],
    pub tree: PoolTree,
    /// Reservations of the running VMs directly in each pool node (kept by `place_vm` and
    /// `unplace_vm`), for admission without a pass over every VM.
    pub node_res: Vec<[f64; 2]>,
    // Hosts.
    pub cap: Vec<[f64; 2]>,
    pub active: Vec<bool>,
    pub n_active: usize,
    pub ent_sum: Vec<[f64; 2]>,
    pub now_sum: Vec<[f64; 2]>,
    /// Σ over a host's VMs of (peak − latest)²: bursts add up in quadrature.
    pub burst2_sum: Vec<[f64; 2]>,
    pub res_sum: Vec<[f64; 2]>,
    pub host_vms: Vec<Vec<usize>>,
    sum_l: [f64; 2],
    sum_l2: [f64; 2],
    // VMs.
    pub vm_index: HashMap<&'s str, usize>,
    pub vm_host: Vec<Option<usize>>,
    pub running: Vec<bool>,
    pub ent: Vec<[f64; 2]>,
    pub now: Vec<[f64; 2]>,
    /// (peak − latest)² per resource.
    pub burst2: Vec<[f64; 2]>,
    pub res: Vec<[f64; 2]>,
    pub automation: Vec<Automation>,
    pub cooling: Vec<bool>,
    /// Host a VM left recently and may not return to by balancing (return cooldown).
    pub left: Vec<Option<usize>>,
    pub cost: Vec<MigrationCost>,
    // Rules.
    pub anti_members: Vec<(usize, Vec<usize>)>,
    pub vm_anti: Vec<Vec<usize>>,
    anti_count: Vec<Vec<u32>>,
    pub host_rules: Vec<HostRule>,
    pub vm_host_rules: Vec<Vec<usize>>,
    /// Affinity groups: every VM's unit (a group or itself) and the members of each unit.
    pub unit_of: Vec<usize>,
    pub units: Vec<Vec<usize>>,
    pub unit_rule: Vec<Option<usize>>,
    // CPU fit: feature sets interned into classes, and which VM class runs on which host
    // class (a cluster has few CPU generations, so the matrix is small).
    host_cpu: Vec<Option<usize>>,
    vm_cpu: Vec<Option<usize>>,
    cpu_fit: Vec<Vec<bool>>,
}

/// Distinct CPU feature sets of a snapshot: `class` interns a set (sorted, deduplicated).
#[derive(Default)]
struct CpuClasses<'s> {
    index: HashMap<Vec<&'s str>, usize>,
    sets: Vec<Vec<&'s str>>,
}

impl<'s> CpuClasses<'s> {
    fn class(&mut self, features: &'s [String]) -> usize {
        let mut key: Vec<&str> = features.iter().map(String::as_str).collect();
        key.sort_unstable();
        key.dedup();
        let next = self.sets.len();
        *self.index.entry(key.clone()).or_insert_with(|| {
            self.sets.push(key);
            next
        })
    }
}

/// Whether sorted `needed` ⊆ sorted `offered`.
fn sorted_subset(needed: &[&str], offered: &[&str]) -> bool {
    let mut it = offered.iter();
    needed.iter().all(|n| it.any(|o| o == n))
}

impl<'s> Cluster<'s> {
    pub fn new(snap: &'s Snapshot) -> Result<Cluster<'s>, SnapshotError> {
        let cfg = &snap.config;
        if !(0.0..=1.0).contains(&cfg.cpu_weight) {
            return Err(SnapshotError::BadConfig(format!(
                "cpu_weight must be in 0..=1, got {}",
                cfg.cpu_weight
            )));
        }
        if !(cfg.high_water > 0.0 && cfg.high_water <= 1.0) {
            return Err(SnapshotError::BadConfig(format!(
                "high_water must be in (0, 1], got {}",
                cfg.high_water
            )));
        }
        let nh = snap.hosts.len();
        let mut host_index: HashMap<&str, usize> = HashMap::with_capacity(nh);
        let mut cap = Vec::with_capacity(nh);
        let mut active = Vec::with_capacity(nh);
        for (i, h) in snap.hosts.iter().enumerate() {
            if host_index.insert(h.name.as_str(), i).is_some() {
                return Err(SnapshotError::DuplicateHost(h.name.clone()));
            }
            if !(h.cpu_mhz.is_finite()
                && h.cpu_mhz > 0.0
                && h.memory_mib.is_finite()
                && h.memory_mib > 0.0)
            {
                return Err(SnapshotError::BadCapacity {
                    host: h.name.clone(),
                });
            }
            cap.push([h.cpu_mhz, h.memory_mib]);
            active.push(h.state == HostState::Connected);
        }
        let nv = snap.vms.len();
        let mut vm_index: HashMap<&str, usize> = HashMap::with_capacity(nv);
        let mut vm_host = Vec::with_capacity(nv);
        let mut running = Vec::with_capacity(nv);
        for (i, vm) in snap.vms.iter().enumerate() {
            if vm_index.insert(vm.name.as_str(), i).is_some() {
                return Err(SnapshotError::DuplicateVm(vm.name.clone()));
            }
            for (field, v) in [
                ("memory_mib", vm.memory_mib),
                ("cpu_demand_mhz", vm.cpu_demand_mhz),
                ("memory_demand_mib", vm.memory_demand_mib),
                ("cpu_reservation_mhz", vm.cpu_reservation_mhz),
                ("memory_reservation_mib", vm.memory_reservation_mib),
                ("dirty_mib_per_s", vm.dirty_mib_per_s),
            ] {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(SnapshotError::BadNumber {
                        vm: vm.name.clone(),
                        field,
                    });
                }
            }
            let h = match &vm.host {
                None => None,
                Some(name) => Some(*host_index.get(name.as_str()).ok_or_else(|| {
                    SnapshotError::UnknownHost {
                        vm: vm.name.clone(),
                        host: name.clone(),
                    }
                })?),
            };
            // VMs on a disconnected host are out of reach: ignored.
            let is_running = h.is_some_and(|h| snap.hosts[h].state != HostState::Disconnected);
            vm_host.push(if is_running { h } else { None });
            running.push(is_running);
        }
        let tree = PoolTree::new(&snap.pools, &snap.vms)?;
        let node_res = tree.vm_reservations(&snap.vms, &running);
        let mut capacity = [0.0; 2];
        for (h, c) in cap.iter().enumerate() {
            if active[h] {
                capacity[CPU] += c[CPU];
                capacity[MEM] += c[MEM];
            }
        }
        let now: Vec<[f64; 2]> = snap
            .vms
            .iter()
            .map(|v| [v.cpu_demand_mhz, v.memory_demand_mib])
            .collect();
        let ent = tree.entitlements(&snap.vms, &running, &now, capacity);
        let burst2: Vec<[f64; 2]> = snap
            .vms
            .iter()
            .map(|v| {
                [
                    (v.cpu_peak() - v.cpu_demand_mhz).powi(2),
                    (v.memory_peak() - v.memory_demand_mib).powi(2),
                ]
            })
            .collect();
        let res: Vec<[f64; 2]> = snap
            .vms
            .iter()
            .map(|v| [v.cpu_reservation_mhz, v.memory_reservation_mib])
            .collect();
        let automation: Vec<Automation> = snap
            .vms
            .iter()
            .map(|v| v.automation.unwrap_or(cfg.automation))
            .collect();
        let cooling: Vec<bool> = snap
            .vms
            .iter()
            .map(|v| {
                v.last_migration
                    .as_ref()
                    .is_some_and(|m| snap.now_s < m.at_s.saturating_add(cfg.cooldown_s))
            })
            .collect();
        let left: Vec<Option<usize>> = snap
            .vms
            .iter()
            .map(|v| {
                let m = v.last_migration.as_ref()?;
                if snap.now_s >= m.at_s.saturating_add(cfg.return_cooldown_s) {
                    return None;
                }
                host_index.get(m.from_host.as_deref()?).copied()
            })
            .collect();
        let cost: Vec<MigrationCost> = snap
            .vms
            .iter()
            .map(|v| {
                cost::estimate(
                    v.memory_mib,
                    v.dirty_mib_per_s,
                    cfg.migration_bandwidth_mib_per_s,
                    cfg.max_downtime_ms,
                )
            })
            .collect();

        // Rules.
        let mut anti_members = Vec::new();
        let mut vm_anti = vec![Vec::new(); nv];
        let mut host_rules = Vec::new();
        let mut vm_host_rules = vec![Vec::new(); nv];
        let mut parent: Vec<usize> = (0..nv).collect();
        let mut unit_rule_of_root: HashMap<usize, usize> = HashMap::new();
        fn find(parent: &mut [usize], mut x: usize) -> usize {
            while parent[x] != x {
                parent[x] = parent[parent[x]];
                x = parent[x];
            }
            x
        }
        let mut affinity_rules = Vec::new();
        for (ri, rule) in snap.rules.iter().enumerate() {
            let mut members = Vec::with_capacity(rule.vms().len());
            for name in rule.vms() {
                let v =
                    *vm_index
                        .get(name.as_str())
                        .ok_or_else(|| SnapshotError::UnknownRuleVm {
                            rule: rule.name().to_string(),
                            vm: name.clone(),
                        })?;
                if !members.contains(&v) {
                    members.push(v);
                }
            }
            match rule {
                Rule::AntiAffinity { .. } => {
                    let id = anti_members.len();
                    for &v in &members {
                        vm_anti[v].push(id);
                    }
                    anti_members.push((ri, members));
                }
                Rule::Affinity { .. } => {
                    for w in members.windows(2) {
                        let (a, b) = (find(&mut parent, w[0]), find(&mut parent, w[1]));
                        if a != b {
                            parent[b] = a;
                        }
                    }
                    affinity_rules.push((ri, members));
                }
                Rule::VmHost {
                    host_group,
                    relation,
                    ..
                } => {
                    let id = host_rules.len();
                    let in_group = snap
                        .hosts
                        .iter()
                        .map(|h| h.groups.iter().any(|g| g == host_group))
                        .collect();
                    host_rules.push(HostRule {
                        rule: ri,
                        relation: *relation,
                        in_group,
                    });
                    for &v in &members {
                        vm_host_rules[v].push(id);
                    }
                }
            }
        }
        let mut unit_of = vec![usize::MAX; nv];
        let mut units: Vec<Vec<usize>> = Vec::with_capacity(nv);
        let mut root_unit: HashMap<usize, usize> = HashMap::new();
        for (v, unit) in unit_of.iter_mut().enumerate() {
            let root = find(&mut parent, v);
            let u = *root_unit.entry(root).or_insert_with(|| {
                units.push(Vec::new());
                units.len() - 1
            });
            units[u].push(v);
            *unit = u;
        }
        for (ri, members) in &affinity_rules {
            if let Some(&v) = members.first() {
                let root = find(&mut parent, v);
                unit_rule_of_root.entry(root).or_insert(*ri);
            }
        }
        let mut unit_rule = vec![None; units.len()];
        for (root, ri) in unit_rule_of_root {
            unit_rule[unit_of[root]] = Some(ri);
        }

        // CPU fit.
        let mut vm_classes = CpuClasses::default();
        let mut host_classes = CpuClasses::default();
        let host_cpu: Vec<Option<usize>> = snap
            .hosts
            .iter()
            .map(|h| h.cpu_features.as_deref().map(|f| host_classes.class(f)))
            .collect();
        let vm_cpu: Vec<Option<usize>> = snap
            .vms
            .iter()
            .map(|v| (!v.cpu_features.is_empty()).then(|| vm_classes.class(&v.cpu_features)))
            .collect();
        let cpu_fit = vm_classes
            .sets
            .iter()
            .map(|needed| {
                host_classes
                    .sets
                    .iter()
                    .map(|offered| sorted_subset(needed, offered))
                    .collect()
            })
            .collect();

        let mut c = Cluster {
            snap,
            cfg,
            weights: [cfg.cpu_weight, 1.0 - cfg.cpu_weight],
            tree,
            node_res,
            cap,
            active,
            n_active: 0,
            ent_sum: vec![[0.0; 2]; nh],
            now_sum: vec![[0.0; 2]; nh],
            burst2_sum: vec![[0.0; 2]; nh],
            res_sum: vec![[0.0; 2]; nh],
            host_vms: vec![Vec::new(); nh],
            sum_l: [0.0; 2],
            sum_l2: [0.0; 2],
            vm_index,
            vm_host,
            running,
            ent,
            now,
            burst2,
            res,
            automation,
            cooling,
            left,
            cost,
            anti_members,
            vm_anti,
            anti_count: Vec::new(),
            host_rules,
            vm_host_rules,
            unit_of,
            units,
            unit_rule,
            host_cpu,
            vm_cpu,
            cpu_fit,
        };
        c.anti_count = vec![vec![0; nh]; c.anti_members.len()];
        for v in 0..nv {
            if let Some(h) = c.vm_host[v] {
                c.add_to_host(v, h);
            }
        }
        c.recompute_sums();
        Ok(c)
    }

    fn add_to_host(&mut self, v: usize, h: usize) {
        for r in [CPU, MEM] {
            self.ent_sum[h][r] += self.ent[v][r];
            self.now_sum[h][r] += self.now[v][r];
            self.burst2_sum[h][r] += self.burst2[v][r];
            self.res_sum[h][r] += self.res[v][r];
        }
        self.host_vms[h].push(v);
        for &a in &self.vm_anti[v] {
            self.anti_count[a][h] += 1;
        }
        self.vm_host[v] = Some(h);
    }

    fn remove_from_host(&mut self, v: usize, h: usize) {
        for r in [CPU, MEM] {
            self.ent_sum[h][r] -= self.ent[v][r];
            self.now_sum[h][r] -= self.now[v][r];
            self.burst2_sum[h][r] -= self.burst2[v][r];
            self.res_sum[h][r] -= self.res[v][r];
        }
        if let Some(pos) = self.host_vms[h].iter().position(|&x| x == v) {
            self.host_vms[h].swap_remove(pos);
        }
        for &a in &self.vm_anti[v] {
            self.anti_count[a][h] -= 1;
        }
        self.vm_host[v] = None;
    }

    /// Recomputes the metric's running sums (also limits floating-point drift).
    pub fn recompute_sums(&mut self) {
        self.sum_l = [0.0; 2];
        self.sum_l2 = [0.0; 2];
        self.n_active = 0;
        for h in 0..self.cap.len() {
            if self.active[h] {
                self.n_active += 1;
                for r in [CPU, MEM] {
                    let l = self.load(h, r);
                    self.sum_l[r] += l;
                    self.sum_l2[r] += l * l;
                }
            }
        }
    }

    /// Entitlement load of host `h` in resource `r`.
    pub fn load(&self, h: usize, r: usize) -> f64 {
        self.ent_sum[h][r] / self.cap[h][r]
    }

    pub fn loads(&self, h: usize) -> Loads {
        Loads {
            cpu: self.load(h, CPU),
            memory: self.load(h, MEM),
        }
    }

    pub fn demand_loads(&self, h: usize) -> Loads {
        Loads {
            cpu: self.now_sum[h][CPU] / self.cap[h][CPU],
            memory: self.now_sum[h][MEM] / self.cap[h][MEM],
        }
    }

    /// Expected peak demand ÷ capacity of host `h` (see [`Cluster::peak_after`]).
    pub fn peak_loads(&self, h: usize) -> Loads {
        let p = |r: usize| {
            (self.now_sum[h][r] + self.burst2_sum[h][r].max(0.0).sqrt()) / self.cap[h][r]
        };
        Loads {
            cpu: p(CPU),
            memory: p(MEM),
        }
    }

    /// Mean entitlement load of the usable hosts, per resource.
    pub fn mean(&self, r: usize) -> f64 {
        if self.n_active == 0 {
            0.0
        } else {
            self.sum_l[r] / self.n_active as f64
        }
    }

    fn sigma_of(&self, sum_l: [f64; 2], sum_l2: [f64; 2]) -> f64 {
        if self.n_active == 0 {
            return 0.0;
        }
        let n = self.n_active as f64;
        let mut var = 0.0;
        for r in [CPU, MEM] {
            let m = sum_l[r] / n;
            var += self.weights[r] * (sum_l2[r] / n - m * m).max(0.0);
        }
        var.sqrt()
    }

    /// The imbalance: √(Σ_r w_r · variance of host load in r) over usable hosts.
    pub fn imbalance(&self) -> f64 {
        self.sigma_of(self.sum_l, self.sum_l2)
    }

    /// Sums after moving entitlement `e` from `s` to `d` (either may be `None` or unusable).
    fn sums_after(&self, e: [f64; 2], s: Option<usize>, d: Option<usize>) -> ([f64; 2], [f64; 2]) {
        let mut sl = self.sum_l;
        let mut sl2 = self.sum_l2;
        for r in [CPU, MEM] {
            if let Some(s) = s.filter(|&s| self.active[s]) {
                let l = self.load(s, r);
                let l2 = l - e[r] / self.cap[s][r];
                sl[r] += l2 - l;
                sl2[r] += l2 * l2 - l * l;
            }
            if let Some(d) = d.filter(|&d| self.active[d]) {
                let l = self.load(d, r);
                let l2 = l + e[r] / self.cap[d][r];
                sl[r] += l2 - l;
                sl2[r] += l2 * l2 - l * l;
            }
        }
        (sl, sl2)
    }

    /// Imbalance after moving entitlement `e` from `s` to `d`, and the gain (reduction of
    /// the weighted sum of squared deviations).
    pub fn eval(&self, e: [f64; 2], s: Option<usize>, d: Option<usize>) -> (f64, f64) {
        let (sl, sl2) = self.sums_after(e, s, d);
        let after = self.sigma_of(sl, sl2);
        let n = self.n_active as f64;
        let before = self.imbalance();
        (after, n * (before * before - after * after))
    }

    /// Gain of moving entitlement `e` from usable host `s` to usable host `d`: the same
    /// number as [`Cluster::eval`]'s, without square roots (the balancing search's hot path).
    pub fn gain(&self, e: [f64; 2], s: usize, d: usize) -> f64 {
        let n = self.n_active as f64;
        let mut g = 0.0;
        for r in [CPU, MEM] {
            let a = e[r] / self.cap[s][r];
            let b = e[r] / self.cap[d][r];
            let ls = self.load(s, r);
            let ld = self.load(d, r);
            let diff = b - a;
            g += self.weights[r]
                * (2.0 * a * ls - a * a - 2.0 * b * ld - b * b
                    + (2.0 * self.sum_l[r] * diff + diff * diff) / n);
        }
        g
    }

    /// Price of migrating `members` to `d`, in gain units.
    pub fn move_cost(&self, members: &[usize], d: usize) -> f64 {
        let mib: f64 = members.iter().map(|&v| self.cost[v].charged_mib()).sum();
        self.cfg.cost_weight * mib / self.cap[d][MEM]
    }

    /// Load a move of entitlement `e` off `s` takes: the weighted norm of `e ÷ capacity`.
    pub fn moved_load(&self, e: [f64; 2], s: usize) -> f64 {
        [CPU, MEM]
            .iter()
            .map(|&r| self.weights[r] * (e[r] / self.cap[s][r]).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    /// Aggregate of a unit's members that are on `h` (or all members with `h = None`).
    pub fn unit_sum(&self, u: usize, h: Option<usize>, what: &[[f64; 2]]) -> [f64; 2] {
        let mut s = [0.0; 2];
        for &v in &self.units[u] {
            if h.is_none() || self.vm_host[v] == h {
                s[CPU] += what[v][CPU];
                s[MEM] += what[v][MEM];
            }
        }
        s
    }

    /// Whether balancing may move the VMs of `members` to `d` (not back to a host one of
    /// them left within the return cooldown).
    pub fn may_return(&self, members: &[usize], d: usize) -> bool {
        members.iter().all(|&v| self.left[v] != Some(d))
    }

    /// Hard checks of VM `v` on host `d`: state, must-rules, anti-affinity. Members of
    /// `moving` (moving with `v`) do not count as conflicts.
    pub fn hard_check(&self, v: usize, d: usize, moving: &[usize]) -> Result<(), Rejection> {
        if !self.active[d] {
            return Err(Rejection::HostState {
                state: self.snap.hosts[d].state,
            });
        }
        if !self.cpu_fits(v, d) {
            return Err(Rejection::Cpu {
                missing: self.cpu_missing(v, d),
            });
        }
        for &hr in &self.vm_host_rules[v] {
            let rule = &self.host_rules[hr];
            if rule.relation.is_must() && !rule.relation.allows(rule.in_group[d]) {
                return Err(self.must_rejection(hr));
            }
        }
        for &a in &self.vm_anti[v] {
            if self.anti_count[a][d] > 0 {
                let (ri, members) = &self.anti_members[a];
                if let Some(&other) = members
                    .iter()
                    .find(|&&o| o != v && self.vm_host[o] == Some(d) && !moving.contains(&o))
                {
                    return Err(Rejection::AntiAffinity {
                        rule: self.snap.rules[*ri].name().to_string(),
                        vm: self.snap.vms[other].name.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Whether host `d`'s CPU offers every feature VM `v`'s CPU needs.
    pub fn cpu_fits(&self, v: usize, d: usize) -> bool {
        match (self.vm_cpu[v], self.host_cpu[d]) {
            (Some(vc), Some(hc)) => self.cpu_fit[vc][hc],
            _ => true,
        }
    }

    /// The features VM `v` needs that host `d` lacks, sorted.
    fn cpu_missing(&self, v: usize, d: usize) -> Vec<String> {
        let offered = self.snap.hosts[d].cpu_features.as_deref().unwrap_or(&[]);
        let mut missing: Vec<String> = self.snap.vms[v]
            .cpu_features
            .iter()
            .filter(|f| !offered.contains(f))
            .cloned()
            .collect();
        missing.sort_unstable();
        missing.dedup();
        missing
    }

    fn must_rejection(&self, hr: usize) -> Rejection {
        let rule = &self.host_rules[hr];
        let (name, group) = self.rule_name_group(rule.rule);
        Rejection::MustRule {
            rule: name,
            relation: rule.relation,
            host_group: group,
        }
    }

    pub fn rule_name_group(&self, ri: usize) -> (String, String) {
        match &self.snap.rules[ri] {
            Rule::VmHost {
                name, host_group, ..
            } => (name.clone(), host_group.clone()),
            r => (r.name().to_string(), String::new()),
        }
    }

    /// Should-rules of `v` that host `d` breaks (rule indices into `snap.rules`).
    pub fn should_broken(&self, v: usize, d: usize) -> Vec<usize> {
        self.vm_host_rules[v]
            .iter()
            .map(|&hr| &self.host_rules[hr])
            .filter(|r| !r.relation.is_must() && !r.relation.allows(r.in_group[d]))
            .map(|r| r.rule)
            .collect()
    }

    /// Reservation check of adding `res` to host `d`.
    pub fn reservation_check(&self, res: [f64; 2], d: usize) -> Result<(), Rejection> {
        let free_cpu = self.cap[d][CPU] - self.res_sum[d][CPU];
        if res[CPU] > 0.0 && res[CPU] > free_cpu + 1e-9 {
            return Err(Rejection::CpuReservation {
                needed_mhz: res[CPU],
                unreserved_mhz: free_cpu.max(0.0),
            });
        }
        let free_mem = self.cap[d][MEM] - self.res_sum[d][MEM];
        if res[MEM] > 0.0 && res[MEM] > free_mem + 1e-9 {
            return Err(Rejection::MemoryReservation {
                needed_mib: res[MEM],
                unreserved_mib: free_mem.max(0.0),
            });
        }
        Ok(())
    }

    /// Latest demand and squared burst of `members` together.
    pub fn demand_of(&self, members: &[usize]) -> Demand {
        let mut d = Demand::default();
        for &v in members {
            for r in [CPU, MEM] {
                d.now[r] += self.now[v][r];
                d.burst2[r] += self.burst2[v][r];
            }
        }
        d
    }

    /// Headroom rule of balancing moves: in each resource the destination's expected peak
    /// after the move stays under the high-water mark, or under the source's after the
    /// move (the pair's hottest point drops: the move cools a hot spot, never makes one).
    pub fn headroom_ok(&self, add: &Demand, s: usize, d: usize) -> bool {
        let hw = self.cfg.high_water;
        [CPU, MEM].iter().all(|&r| {
            let dest = (self.now_sum[d][r]
                + add.now[r]
                + (self.burst2_sum[d][r] + add.burst2[r]).max(0.0).sqrt())
                / self.cap[d][r];
            if dest <= hw + 1e-9 {
                return true;
            }
            let src = (self.now_sum[s][r] - add.now[r]
                + (self.burst2_sum[s][r] - add.burst2[r]).max(0.0).sqrt())
                / self.cap[s][r];
            dest < src
        })
    }

    /// Fallback for an over-capacity source when no destination stays below high water:
    /// the destination's latest demand stays within capacity in every resource and below
    /// the source's after the move.
    pub fn fits_cooler(&self, add: &Demand, s: usize, d: usize) -> bool {
        [CPU, MEM].iter().all(|&r| {
            let dest = (self.now_sum[d][r] + add.now[r]) / self.cap[d][r];
            let src = (self.now_sum[s][r] - add.now[r]) / self.cap[s][r];
            dest <= 1.0 && dest < src.max(self.cfg.high_water)
        })
    }

    /// Expected peak of `add` alone, as a fraction of host `h`'s capacity.
    pub fn peak_after_alone(&self, add: &Demand, h: usize) -> [f64; 2] {
        [CPU, MEM].map(|r| (add.now[r] + add.burst2[r].max(0.0).sqrt()) / self.cap[h][r])
    }

    /// Expected peak load of `d` after adding `add`: `(worst resource, load)`.
    ///
    /// A host's peak is its latest demand plus the root of the sum of its VMs' squared
    /// bursts (peak − latest): independent bursts rarely coincide, so they add in
    /// quadrature, while a single big bursty VM still counts in full.
    pub fn peak_after(&self, add: &Demand, d: usize) -> (usize, f64) {
        let p = |r: usize| {
            (self.now_sum[d][r]
                + add.now[r]
                + (self.burst2_sum[d][r] + add.burst2[r]).max(0.0).sqrt())
                / self.cap[d][r]
        };
        let (c, m) = (p(CPU), p(MEM));
        if c >= m {
            (CPU, c)
        } else {
            (MEM, m)
        }
    }

    /// Checks every hard constraint of moving `members` (all currently on one host, or
    /// unplaced) to `d`. Returns the first rejection.
    pub fn check_members(&self, members: &[usize], d: usize) -> Result<(), Rejection> {
        if members.iter().any(|&v| self.vm_host[v] == Some(d)) {
            return Err(Rejection::Source);
        }
        for &v in members {
            self.hard_check(v, d, members)?;
        }
        let mut res = [0.0; 2];
        for &v in members {
            res[CPU] += self.res[v][CPU];
            res[MEM] += self.res[v][MEM];
        }
        self.reservation_check(res, d)
    }

    /// Best destination for `members` by the order: fits capacity, keeps should-rules,
    /// fits high water, lowest imbalance after; with every rejected host and why. `allowed`
    /// restricts the candidates (an affinity group's host).
    pub fn best_host(
        &self,
        members: &[usize],
        fit: Fit,
        allowed: Option<&[usize]>,
    ) -> (Option<Choice>, Vec<HostRejection>) {
        let mut e = [0.0; 2];
        for &v in members {
            for r in [CPU, MEM] {
                e[r] += self.ent[v][r];
            }
        }
        let pk = self.demand_of(members);
        let src = members.first().and_then(|&v| self.vm_host[v]);
        let mut best: Option<(Choice, (u8, usize, u8, f64))> = None;
        let mut rejected = Vec::new();
        for d in 0..self.cap.len() {
            if let Some(allowed) = allowed {
                if !allowed.contains(&d) {
                    if self.active[d] && Some(d) != src {
                        let rule = members
                            .iter()
                            .find_map(|&v| self.unit_rule[self.unit_of[v]])
                            .map(|ri| self.snap.rules[ri].name().to_string())
                            .unwrap_or_default();
                        rejected.push(HostRejection {
                            host: self.snap.hosts[d].name.clone(),
                            rejection: Rejection::AffinityElsewhere {
                                rule,
                                host: allowed
                                    .first()
                                    .map(|&a| self.snap.hosts[a].name.clone())
                                    .unwrap_or_default(),
                            },
                        });
                    }
                    continue;
                }
            }
            if let Err(rej) = self.check_members(members, d) {
                if rej != Rejection::Source {
                    rejected.push(HostRejection {
                        host: self.snap.hosts[d].name.clone(),
                        rejection: rej,
                    });
                }
                continue;
            }
            let (worst_r, peak_load) = self.peak_after(&pk, d);
            let fits_hw = peak_load <= self.cfg.high_water + 1e-9;
            let fits_cap = peak_load <= 1.0 + 1e-9;
            let reject_headroom = match fit {
                Fit::HighWater => !fits_hw,
                Fit::Capacity => !fits_cap,
                Fit::Any => false,
            };
            if reject_headroom {
                rejected.push(HostRejection {
                    host: self.snap.hosts[d].name.clone(),
                    rejection: Rejection::Headroom {
                        resource: Resource::from_index(worst_r),
                        load_after: peak_load,
                        limit: if fit == Fit::HighWater {
                            self.cfg.high_water
                        } else {
                            1.0
                        },
                    },
                });
                continue;
            }
            let mut broken: Vec<usize> = Vec::new();
            for &v in members {
                for ri in self.should_broken(v, d) {
                    if !broken.contains(&ri) {
                        broken.push(ri);
                    }
                }
            }
            let (after, gain) = self.eval(e, src, Some(d));
            let key = (
                u8::from(!fits_cap),
                broken.len(),
                u8::from(!fits_hw),
                // Overcommitted hosts: least overcommitted first; otherwise best balance.
                if fits_cap { after } else { peak_load },
            );
            let better = match &best {
                None => true,
                Some((_, k)) => {
                    (key.0, key.1, key.2) < (k.0, k.1, k.2)
                        || ((key.0, key.1, key.2) == (k.0, k.1, k.2) && key.3 < k.3 - 1e-12)
                }
            };
            if better {
                best = Some((
                    Choice {
                        host: d,
                        imbalance_after: after,
                        gain,
                        broken_should: broken,
                        fits_high_water: fits_hw,
                    },
                    key,
                ));
            }
        }
        (best.map(|(c, _)| c), rejected)
    }

    /// Moves `members` to `d`, returning one [`Move`] per VM with the numbers; the first
    /// member carries `reason`, the others follow it as [`MoveReason::WithGroup`].
    pub fn apply(
        &mut self,
        members: &[usize],
        d: usize,
        priority: u8,
        reason: MoveReason,
        broken_should: &[usize],
    ) -> Vec<Move> {
        let mut out = Vec::with_capacity(members.len());
        let leader = members[0];
        for (k, &v) in members.iter().enumerate() {
            let Some(s) = self.vm_host[v] else { continue };
            let before = self.imbalance();
            let e = self.ent[v];
            let (after, gain) = self.eval(e, Some(s), Some(d));
            let source_before = self.loads(s);
            let dest_before = self.loads(d);
            let migration = self.cost[v];
            let benefit = gain * (1.0 - migration.duration_s / self.cfg.benefit_horizon_s).max(0.0);
            let cost = self.move_cost(&[v], d);
            let moved = self.moved_load(e, s);
            let gap = if moved > 0.0 {
                gain / (2.0 * moved)
            } else {
                0.0
            };
            self.move_vm(v, s, d);
            let reason = if k == 0 {
                reason.clone()
            } else {
                MoveReason::WithGroup {
                    rule: self.unit_rule[self.unit_of[v]]
                        .map(|ri| self.snap.rules[ri].name().to_string())
                        .unwrap_or_default(),
                    leader: self.snap.vms[leader].name.clone(),
                }
            };
            out.push(Move {
                vm: self.snap.vms[v].name.clone(),
                from_host: self.snap.hosts[s].name.clone(),
                to_host: self.snap.hosts[d].name.clone(),
                priority,
                reason,
                numbers: MoveNumbers {
                    imbalance_before: before,
                    imbalance_after: after,
                    gain,
                    gap,
                    benefit,
                    cost,
                    net: benefit - cost,
                    migration,
                    source_before,
                    source_after: self.loads(s),
                    dest_before,
                    dest_after: self.loads(d),
                    dest_peak_after: self.peak_loads(d),
                },
                automatic: self.automation[v].migrates_automatically(),
                broken_should_rules: broken_should
                    .iter()
                    .filter(|&&ri| {
                        self.snap.rules[ri]
                            .vms()
                            .iter()
                            .any(|n| *n == self.snap.vms[v].name)
                    })
                    .map(|&ri| self.snap.rules[ri].name().to_string())
                    .collect(),
            });
        }
        out
    }

    /// Moves one VM between hosts, keeping the metric's sums exact.
    pub fn move_vm(&mut self, v: usize, s: usize, d: usize) {
        let e = self.ent[v];
        let (sl, sl2) = self.sums_after(e, Some(s), Some(d));
        self.remove_from_host(v, s);
        self.add_to_host(v, d);
        self.sum_l = sl;
        self.sum_l2 = sl2;
    }

    /// Takes a VM off its host as if powered off (placement of a VM that has a host).
    pub fn unplace_vm(&mut self, v: usize) {
        if let Some(s) = self.vm_host[v] {
            let e = self.ent[v];
            let (sl, sl2) = self.sums_after(e, Some(s), None);
            self.remove_from_host(v, s);
            self.sum_l = sl;
            self.sum_l2 = sl2;
        }
        if self.running[v] {
            self.count_reservation(v, -1.0);
        }
        self.running[v] = false;
    }

    /// Adds (`sign` 1) or removes (−1) VM `v`'s reservation from its pool node's sum.
    fn count_reservation(&mut self, v: usize, sign: f64) {
        let vm = &self.snap.vms[v];
        let node = self.tree.node_of(v);
        self.node_res[node][CPU] += sign * vm.cpu_reservation_mhz.max(0.0);
        self.node_res[node][MEM] += sign * vm.memory_reservation_mib.max(0.0);
    }

    /// Puts an unplaced VM on `d` (placement).
    pub fn place_vm(&mut self, v: usize, d: usize) {
        let e = self.ent[v];
        let (sl, sl2) = self.sums_after(e, None, Some(d));
        self.add_to_host(v, d);
        if !self.running[v] {
            self.count_reservation(v, 1.0);
        }
        self.running[v] = true;
        self.sum_l = sl;
        self.sum_l2 = sl2;
    }

    /// Per-host summaries against a `before` copy of the per-host figures.
    pub fn summaries(&self, before: &HostFigures) -> Vec<HostSummary> {
        (0..self.cap.len())
            .map(|h| HostSummary {
                host: self.snap.hosts[h].name.clone(),
                state: self.snap.hosts[h].state,
                vms_before: before.vms[h],
                vms_after: self.host_vms[h].len(),
                load_before: before.load[h],
                load_after: self.loads(h),
                demand_before: before.demand[h],
                demand_after: self.demand_loads(h),
            })
            .collect()
    }

    pub fn figures(&self) -> HostFigures {
        HostFigures {
            vms: self.host_vms.iter().map(Vec::len).collect(),
            load: (0..self.cap.len()).map(|h| self.loads(h)).collect(),
            demand: (0..self.cap.len()).map(|h| self.demand_loads(h)).collect(),
        }
    }

    /// Whether every member of unit `u` is on the same host, and which.
    pub fn unit_host(&self, u: usize) -> Option<usize> {
        let mut h = None;
        for &v in &self.units[u] {
            match (h, self.vm_host[v]) {
                (_, None) => {}
                (None, Some(x)) => h = Some(x),
                (Some(a), Some(b)) if a != b => return None,
                _ => {}
            }
        }
        h
    }

    /// Members of unit `u` that are on `h`.
    pub fn members_on(&self, u: usize, h: usize) -> Vec<usize> {
        self.units[u]
            .iter()
            .copied()
            .filter(|&v| self.vm_host[v] == Some(h))
            .collect()
    }
}

/// Latest demand and squared burst of some VMs (for headroom checks).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Demand {
    pub now: [f64; 2],
    pub burst2: [f64; 2],
}

/// Per-host figures captured before a plan, for [`HostSummary`].
pub(crate) struct HostFigures {
    vms: Vec<usize>,
    load: Vec<Loads>,
    demand: Vec<Loads>,
}

/// A chosen destination.
#[derive(Debug, Clone)]
pub(crate) struct Choice {
    pub host: usize,
    pub imbalance_after: f64,
    #[allow(dead_code)]
    pub gain: f64,
    pub broken_should: Vec<usize>,
    pub fits_high_water: bool,
}
