//! Resource pools: each cluster's tree of pools, its checks, VMs joining and leaving pools,
//! and the division of the pools' settings down to the VMs the hosts enforce.
//!
//! The checks keep the tree sound: a parent in the same cluster, no cycle, and reservations
//! that fit (a pool that is not expandable holds its children's reservations within its own;
//! the root holds the top pools' within the cluster's usable capacity). A pool with children
//! or VMs cannot be removed.
//!
//! The division ([`effective`]). Every VM of a cluster with pools gets, instead of its own
//! policy alone:
//! - CPU shares that are its fraction of the cluster down the tree (its shares among its
//!   siblings × its pool's among the pool's siblings × …), so a VM of a `high` pool outweighs
//!   one of a `normal` pool wherever they meet on a host;
//! - a CPU limit no higher than its part of each ancestor pool's limit (divided by shares
//!   among siblings), and a CPU and memory reservation no lower than its part of each
//!   ancestor's reservation.
//!
//! A VM starts with that division by shares over every member. From then on the leader
//! divides among the running members only (a stopped VM holds no part of a reservation or a
//! limit), on every start, stop and change, and re-divides every pool CPU limit by demand
//! every `pool_division_period_ms` ([`divide_limits`]): each member gets its shares' part
//! but no more than it wants (its demand from the heartbeats plus a margin; all it can use
//! while it runs at the limit it was given), and what the idle leave goes to the busy, by
//! shares, like vSphere's division by entitlement. A VM that wakes up gets its part back
//! within a period. Between starts and stops, hosts are told only of changed limits.
//!
//! A pool's memory limit cannot be held by cgroups without a balloon (a QEMU held below its
//! guest's RAM is killed), so it is held at power-on instead: a start that would take the
//! pool's running members beyond it is refused, naming the pool.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::Utc;
use tern_api::pools::{CreatePool, PoolSettings, ResourcePool};
use tern_api::{CpuAmount, PowerState, Resources, Shares};
use uuid::Uuid;

use crate::app::{lock, App};
use crate::error::CenterError;
use crate::store::{HostRecord, NewEvent, StoreError, Tx, VmRecord};

/// A pool's shares against its siblings (vSphere's pool figures: 4000 at normal for CPU).
fn pool_cpu_shares(s: Shares) -> f64 {
    match s {
        Shares::Low => 2000.0,
        Shares::Normal => 4000.0,
        Shares::High => 8000.0,
        Shares::Custom(n) => f64::from(n.max(1)),
    }
}

/// The cluster's tree as the division and the checks read it.
struct Tree<'a> {
    pools: &'a [(String, PoolSettings)],
    vms: &'a [VmRecord],
    /// MHz of one core, to turn VM amounts given in percent of a core into MHz.
    core_mhz: u32,
}

/// A node: a pool (index into `pools`) or the root.
type Node = Option<usize>;

impl Tree<'_> {
    fn pool_index(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|(n, _)| n == name)
    }

    fn parent_of(&self, p: usize) -> Node {
        self.pools[p]
            .1
            .parent
            .as_deref()
            .and_then(|n| self.pool_index(n))
    }

    fn node_of_vm(&self, v: &VmRecord) -> Node {
        v.pool.as_deref().and_then(|n| self.pool_index(n))
    }

    fn child_pools(&self, n: Node) -> Vec<usize> {
        (0..self.pools.len())
            .filter(|&p| self.parent_of(p) == n)
            .collect()
    }

    fn child_vms(&self, n: Node) -> Vec<&VmRecord> {
        self.vms
            .iter()
            .filter(|v| self.node_of_vm(v) == n)
            .collect()
    }

    fn vm_cpu_mhz(&self, a: CpuAmount) -> f64 {
        a.mhz(self.core_mhz)
    }

    /// Shares of the node's children, pools then VMs, and their sum.
    fn sibling_shares(&self, n: Node) -> f64 {
        let pools: f64 = self
            .child_pools(n)
            .iter()
            .map(|&p| pool_cpu_shares(self.pools[p].1.cpu.shares))
            .sum();
        let vms: f64 = self
            .child_vms(n)
            .iter()
            .map(|v| v.spec.resources.cpu_shares.cpu_shares(v.spec.vcpus) as f64)
            .sum();
        pools + vms
    }

    /// Memory shares of the node's children (pools: 327,680 at normal, VMs: per MiB).
    fn sibling_memory_shares(&self, n: Node) -> f64 {
        let pools: f64 = self
            .child_pools(n)
            .iter()
            .map(|&p| pool_memory_shares(self.pools[p].1.memory.shares))
            .sum();
        let vms: f64 = self
            .child_vms(n)
            .iter()
            .map(|v| vm_memory_shares(v.spec.resources.memory_shares, v.spec.memory_mib))
            .sum();
        pools + vms
    }

    /// What a node's subtree reserves of CPU (MHz) and memory (MiB): its own reservation,
    /// or its children's when it is expandable and they reserve more.
    fn reserved(&self, n: Node) -> [f64; 2] {
        let mut kids = [0.0, 0.0];
        for p in self.child_pools(n) {
            let r = self.reserved(Some(p));
            kids[0] += r[0];
            kids[1] += r[1];
        }
        for v in self.child_vms(n) {
            let r = &v.spec.resources;
            kids[0] += r.cpu_reservation.map_or(0.0, |a| self.vm_cpu_mhz(a));
            kids[1] += r.memory_reservation_mib.map_or(0.0, |m| m as f64);
        }
        let Some(p) = n else {
            return kids;
        };
        let s = &self.pools[p].1;
        let own = [
            s.cpu.reservation_mhz.unwrap_or(0) as f64,
            s.memory.reservation_mib.unwrap_or(0) as f64,
        ];
        [
            if s.cpu.expandable {
                own[0].max(kids[0])
            } else {
                own[0]
            },
            if s.memory.expandable {
                own[1].max(kids[1])
            } else {
                own[1]
            },
        ]
    }

    /// What the node's children reserve together (without the node's own reservation).
    fn children_reserve(&self, n: Node) -> [f64; 2] {
        let mut sum = [0.0, 0.0];
        for p in self.child_pools(n) {
            let r = self.reserved(Some(p));
            sum[0] += r[0];
            sum[1] += r[1];
        }
        for v in self.child_vms(n) {
            let r = &v.spec.resources;
            sum[0] += r.cpu_reservation.map_or(0.0, |a| self.vm_cpu_mhz(a));
            sum[1] += r.memory_reservation_mib.map_or(0.0, |m| m as f64);
        }
        sum
    }

    /// The tree's faults, each naming the pool and the figures; `capacity` is the cluster's
    /// usable CPU (MHz) and memory (MiB).
    fn faults(&self, capacity: [f64; 2]) -> Vec<String> {
        let mut out = Vec::new();
        let mut names = HashSet::new();
        for (i, (name, s)) in self.pools.iter().enumerate() {
            if !names.insert(name.as_str()) {
                out.push(format!("pool {name} is defined twice"));
            }
            if let Some(parent) = &s.parent {
                if self.pool_index(parent).is_none() {
                    out.push(format!(
                        "pool {name}: parent {parent} is not a pool of the cluster"
                    ));
                    continue;
                }
            }
            // Walk up: a cycle comes back to i.
            let mut seen = HashSet::new();
            let mut at = self.parent_of(i);
            while let Some(p) = at {
                if p == i || !seen.insert(p) {
                    out.push(format!("pool {name} would be its own ancestor"));
                    break;
                }
                at = self.parent_of(p);
            }
        }
        if !out.is_empty() {
            return out;
        }
        for (i, (name, s)) in self.pools.iter().enumerate() {
            let kids = self.children_reserve(Some(i));
            if !s.cpu.expandable {
                let own = s.cpu.reservation_mhz.unwrap_or(0) as f64;
                if kids[0] > own {
                    out.push(format!(
                        "pool {name} reserves {own:.0} MHz of CPU and is not expandable, but \
                         its children reserve {:.0} MHz",
                        kids[0]
                    ));
                }
            }
            if !s.memory.expandable {
                let own = s.memory.reservation_mib.unwrap_or(0) as f64;
                if kids[1] > own {
                    out.push(format!(
                        "pool {name} reserves {own:.0} MiB of memory and is not expandable, \
                         but its children reserve {:.0} MiB",
                        kids[1]
                    ));
                }
            }
            if let (Some(l), true) = (s.cpu.limit_mhz, kids[0] > 0.0) {
                if kids[0] > l as f64 {
                    out.push(format!(
                        "pool {name}'s CPU limit {l} MHz is below what its children reserve \
                         ({:.0} MHz)",
                        kids[0]
                    ));
                }
            }
        }
        let top = self.reserved(None);
        for (r, what, unit) in [(0, "CPU", "MHz"), (1, "memory", "MiB")] {
            if top[r] > capacity[r] {
                out.push(format!(
                    "the cluster's pools and VMs reserve {:.0} {unit} of {what}, more than its \
                     usable hosts have ({:.0} {unit})",
                    top[r], capacity[r]
                ));
            }
        }
        out
    }

    /// The pools a VM's node descends from, nearest first.
    fn ancestors(&self, n: Node) -> Vec<usize> {
        let mut out = Vec::new();
        let mut at = n;
        while let Some(p) = at {
            if out.contains(&p) {
                break; // a cycle (refused on write; never loop on a bad store)
            }
            out.push(p);
            at = self.parent_of(p);
        }
        out
    }
}

fn pool_memory_shares(s: Shares) -> f64 {
    match s {
        Shares::Low => 163_840.0,
        Shares::Normal => 327_680.0,
        Shares::High => 655_360.0,
        Shares::Custom(n) => f64::from(n.max(1)),
    }
}

fn vm_memory_shares(s: Shares, mib: u64) -> f64 {
    let per_mib = match s {
        Shares::Low => 5.0,
        Shares::Normal => 10.0,
        Shares::High => 20.0,
        Shares::Custom(n) => return f64::from(n.max(1)),
    };
    per_mib * mib as f64
}

/// What each VM of a cluster is enforced with (see the module doc): `vms` are the cluster's
/// VMs, `pools` its pools. A cluster without pools enforces each VM's own policy.
pub fn effective(
    pools: &[(String, PoolSettings)],
    vms: &[VmRecord],
    core_mhz: u32,
) -> HashMap<Uuid, Resources> {
    let mut out: HashMap<Uuid, Resources> = vms
        .iter()
        .map(|v| (v.id, v.spec.resources.clone()))
        .collect();
    if pools.is_empty() {
        return out;
    }
    let t = Tree {
        pools,
        vms,
        core_mhz: core_mhz.max(1),
    };
    // The average VM of the cluster keeps about its usual figure (1000 per vCPU).
    let vcpus: u64 = vms.iter().map(|v| u64::from(v.spec.vcpus.max(1))).sum();
    let scale = 1000.0 * vcpus.max(1) as f64;
    for v in vms {
        let r = &v.spec.resources;
        let node = t.node_of_vm(v);
        let own_shares = r.cpu_shares.cpu_shares(v.spec.vcpus) as f64;
        let own_mem_shares = vm_memory_shares(r.memory_shares, v.spec.memory_mib);
        // The VM's fraction of the node being looked at, from its own pool up to the root:
        // a pool's limit or reservation reaches it times this fraction.
        let mut frac = own_shares / t.sibling_shares(node).max(1.0);
        let mut mem_frac = own_mem_shares / t.sibling_memory_shares(node).max(1.0);
        // Limits and reservations that reach the VM: a node's part of its pool's figure.
        let mut cpu_limit = f64::INFINITY;
        let mut cpu_res: f64 = 0.0;
        let mut mem_res: f64 = 0.0;
        for p in t.ancestors(node) {
            let s = &pools[p].1;
            if let Some(l) = s.cpu.limit_mhz {
                cpu_limit = cpu_limit.min(l as f64 * frac);
            }
            if let Some(res) = s.cpu.reservation_mhz {
                cpu_res = cpu_res.max(res as f64 * frac);
            }
            if let Some(res) = s.memory.reservation_mib {
                mem_res = mem_res.max(res as f64 * mem_frac);
            }
            let parent = t.parent_of(p);
            let pf = pool_cpu_shares(s.cpu.shares) / t.sibling_shares(parent).max(1.0);
            let pmf =
                pool_memory_shares(s.memory.shares) / t.sibling_memory_shares(parent).max(1.0);
            frac *= pf;
            mem_frac *= pmf;
        }
        let mut e = r.clone();
        e.cpu_shares = Shares::Custom(
            (frac * scale)
                .round()
                .clamp(1.0, f64::from(tern_api::resources::MAX_CUSTOM_SHARES)) as u32,
        );
        let own_limit = r.cpu_limit.map(|a| t.vm_cpu_mhz(a));
        let own_res = r.cpu_reservation.map(|a| t.vm_cpu_mhz(a));
        let limit = own_limit.unwrap_or(f64::INFINITY).min(cpu_limit);
        // Never more than the VM's vCPUs can use (the host would refuse it).
        let vcpu_mhz = f64::from(v.spec.vcpus.max(1)) * f64::from(t.core_mhz);
        let limit = limit.min(vcpu_mhz);
        let res = own_res.unwrap_or(0.0).max(cpu_res).min(limit);
        // Amounts in MHz from here (a reservation and a limit must share their unit).
        if limit.is_finite() && (own_limit.is_some() || cpu_limit.is_finite()) {
            e.cpu_limit = Some(CpuAmount::Mhz((limit.round() as u32).max(1)));
        }
        e.cpu_reservation = (res >= 1.0).then(|| CpuAmount::Mhz(res.round() as u32));
        let own_mem = r.memory_reservation_mib.unwrap_or(0) as f64;
        let mem = own_mem.max(mem_res).min(v.spec.memory_mib as f64).round() as u64;
        e.memory_reservation_mib = (mem >= 1).then_some(mem);
        out.insert(v.id, e);
    }
    out
}

/// A VM counts as wanting all it can use when it runs at this fraction of its limit or more.
const AT_LIMIT: f64 = 0.9;
/// What a VM below its limit is given beyond its demand: this factor…
const DEMAND_MARGIN: f64 = 1.25;
/// …plus this part of a core, so an idle VM can still wake up.
const IDLE_FLOOR_CORES: f64 = 0.05;

/// One child of a node in the division: a running VM or a pool with running VMs below it.
struct Part {
    shares: f64,
    /// The most it takes (MHz): its own limit, or for a VM all its vCPUs.
    cap: f64,
    /// What it asks for now (≤ cap).
    want: f64,
    kind: PartKind,
}

enum PartKind {
    Vm(Uuid),
    Pool(usize),
}

/// Whether a VM takes part in the division: it runs, or `now` says it just started (true)
/// or stopped (false) and the store does not show it yet.
fn member_runs(v: &VmRecord, now: Option<(Uuid, bool)>) -> bool {
    match now {
        Some((id, runs)) if id == v.id => runs,
        _ => matches!(v.actual, PowerState::Running | PowerState::Paused),
    }
}

/// The CPU limits (MHz) of the running VMs under a pool CPU limit, divided by demand (see
/// the module doc). `demand_mhz` is each VM's latest CPU use; `given_mhz` the limit the last
/// division gave it (missing: none yet, so it is treated as running at its limit); `now` a VM
/// that just started or stopped.
pub fn divide_limits(
    pools: &[(String, PoolSettings)],
    vms: &[VmRecord],
    core_mhz: u32,
    demand_mhz: &HashMap<Uuid, f64>,
    given_mhz: &HashMap<Uuid, u32>,
    now: Option<(Uuid, bool)>,
) -> HashMap<Uuid, u32> {
    let running: Vec<VmRecord> = vms
        .iter()
        .filter(|v| member_runs(v, now))
        .cloned()
        .collect();
    let t = Tree {
        pools,
        vms: &running,
        core_mhz: core_mhz.max(1),
    };
    let mut out = HashMap::new();
    divide_node(&t, None, f64::INFINITY, demand_mhz, given_mhz, &mut out);
    out
}

/// What node `n`'s subtree asks for and can take at most: `(want, cap)` in MHz; `None`
/// when no VM runs below it.
fn node_want(
    t: &Tree,
    n: Node,
    demand: &HashMap<Uuid, f64>,
    given: &HashMap<Uuid, u32>,
) -> Option<(f64, f64)> {
    let parts = parts_of(t, n, demand, given);
    if parts.is_empty() {
        return None;
    }
    let want: f64 = parts.iter().map(|p| p.want).sum();
    let cap: f64 = parts.iter().map(|p| p.cap).sum();
    let own = n
        .and_then(|p| t.pools[p].1.cpu.limit_mhz)
        .map_or(f64::INFINITY, |l| l as f64);
    Some((want.min(own), cap.min(own)))
}

fn parts_of(
    t: &Tree,
    n: Node,
    demand: &HashMap<Uuid, f64>,
    given: &HashMap<Uuid, u32>,
) -> Vec<Part> {
    let mut parts = Vec::new();
    for p in t.child_pools(n) {
        if let Some((want, cap)) = node_want(t, Some(p), demand, given) {
            parts.push(Part {
                shares: pool_cpu_shares(t.pools[p].1.cpu.shares),
                cap,
                want,
                kind: PartKind::Pool(p),
            });
        }
    }
    for v in t.child_vms(n) {
        let r = &v.spec.resources;
        let vcpu_mhz = f64::from(v.spec.vcpus.max(1)) * f64::from(t.core_mhz);
        let cap = r
            .cpu_limit
            .map_or(vcpu_mhz, |a| t.vm_cpu_mhz(a).min(vcpu_mhz));
        let used = demand.get(&v.id).copied();
        let at_limit = match (used, given.get(&v.id)) {
            (Some(u), Some(&g)) => u >= AT_LIMIT * f64::from(g),
            _ => true,
        };
        let want = if at_limit {
            cap
        } else {
            let u = used.unwrap_or(0.0);
            (u * DEMAND_MARGIN + IDLE_FLOOR_CORES * f64::from(t.core_mhz)).min(cap)
        };
        parts.push(Part {
            shares: r.cpu_shares.cpu_shares(v.spec.vcpus) as f64,
            cap,
            want,
            kind: PartKind::Vm(v.id),
        });
    }
    parts
}

/// Divides `budget` MHz among node `n`'s parts and recurses into its pools.
fn divide_node(
    t: &Tree,
    n: Node,
    budget: f64,
    demand: &HashMap<Uuid, f64>,
    given: &HashMap<Uuid, u32>,
    out: &mut HashMap<Uuid, u32>,
) {
    let own = n
        .and_then(|p| t.pools[p].1.cpu.limit_mhz)
        .map_or(f64::INFINITY, |l| l as f64);
    let budget = budget.min(own);
    let parts = parts_of(t, n, demand, given);
    let alloc: Vec<f64> = if budget.is_finite() {
        // First what each wants, then the rest by shares up to what each can take.
        let wants: Vec<f64> = parts.iter().map(|p| p.want).collect();
        let first = water_fill(&parts, &wants, budget);
        let left = budget - first.iter().sum::<f64>();
        let room: Vec<f64> = parts
            .iter()
            .zip(&first)
            .map(|(p, a)| (p.cap - a).max(0.0))
            .collect();
        let extra = water_fill(&parts, &room, left.max(0.0));
        first.iter().zip(&extra).map(|(a, b)| a + b).collect()
    } else {
        vec![f64::INFINITY; parts.len()]
    };
    for (p, a) in parts.iter().zip(alloc) {
        match p.kind {
            PartKind::Pool(c) => divide_node(t, Some(c), a, demand, given, out),
            PartKind::Vm(id) if a.is_finite() => {
                out.insert(id, (a.round() as u32).max(1));
            }
            PartKind::Vm(_) => {}
        }
    }
}

/// Splits `budget` among parts by their shares, none beyond its `limit`; what a capped part
/// leaves goes to the others. Returns each part's amount.
fn water_fill(parts: &[Part], limit: &[f64], budget: f64) -> Vec<f64> {
    let mut got = vec![0.0; parts.len()];
    let mut open: Vec<usize> = (0..parts.len()).filter(|&i| limit[i] > 0.0).collect();
    let mut left = budget;
    while left > 1e-6 && !open.is_empty() {
        let total: f64 = open.iter().map(|&i| parts[i].shares.max(1e-9)).sum();
        let mut next = Vec::with_capacity(open.len());
        let mut spent = 0.0;
        for &i in &open {
            let offer = left * parts[i].shares.max(1e-9) / total;
            let take = offer.min(limit[i] - got[i]);
            got[i] += take;
            spent += take;
            if limit[i] - got[i] > 1e-6 {
                next.push(i);
            }
        }
        left -= spent;
        if next.len() == open.len() {
            break; // nobody was capped: the budget is spent
        }
        open = next;
    }
    got
}

/// Re-divides every pool CPU limit of the cluster by demand and tells the hosts of the VMs
/// whose limit changed (by more than 2 % of a core). `force` tells every host (after a
/// change of the tree or a policy, which also reset the other figures); `now` is a VM that
/// just started or stopped (see [`divide_limits`]).
pub async fn redivide(
    app: &Arc<App>,
    cluster_id: Uuid,
    force: bool,
    now: Option<(Uuid, bool)>,
) -> Result<(), CenterError> {
    let (pools, hosts, vms) = app
        .db
        .read(move |tx| {
            Ok::<_, StoreError>((
                tx.pools(cluster_id)?,
                tx.hosts_in_cluster(cluster_id)?,
                cluster_vms(tx, cluster_id)?,
            ))
        })
        .await?;
    let core = core_mhz(&hosts);
    let mut demand = HashMap::new();
    for h in &hosts {
        let mhz = f64::from(if h.facts.cpu_mhz > 0 {
            h.facts.cpu_mhz
        } else {
            core
        });
        for l in h.load.iter().flat_map(|l| &l.vms) {
            demand.insert(l.vm_id, l.cpu_percent / 100.0 * mhz);
        }
    }
    // A start or a stop changes who shares: every member starts again from its part by
    // shares (as if it wanted all), and demand moves the parts from the next division on.
    // A start or a stop moves shares and reservations too: every member is told.
    let force = force || now.is_some();
    let given = if now.is_some() {
        HashMap::new()
    } else {
        lock(&app.pool_limits).clone()
    };
    if let Some((id, false)) = now {
        lock(&app.pool_limits).remove(&id);
    }
    let limits = divide_limits(&pools, &vms, core, &demand, &given, now);
    // Shares and reservations among the running members only: a stopped VM holds no part
    // of its pools' reservations (it gets one again when it starts).
    let members: Vec<VmRecord> = vms
        .iter()
        .filter(|v| member_runs(v, now))
        .cloned()
        .collect();
    let base = effective(&pools, &members, core);
    let step = (f64::from(core) * 0.02).max(1.0);
    // Parts that shrink are told first, then those that grow: the pool's members never hold
    // more than its limit between two of the hosts' writes.
    let growth = |vm: &VmRecord| {
        let told = lock(&app.pool_limits).get(&vm.id).copied();
        let limit = limits.get(&vm.id).copied().unwrap_or(u32::MAX);
        i64::from(limit) - i64::from(told.unwrap_or(0))
    };
    let mut running: Vec<&VmRecord> = vms.iter().filter(|v| member_runs(v, now)).collect();
    running.sort_by_cached_key(|vm| growth(vm));
    for vm in running {
        let Some(mut e) = base.get(&vm.id).cloned() else {
            continue;
        };
        let limit = limits.get(&vm.id).copied();
        let told = lock(&app.pool_limits).get(&vm.id).copied();
        let changed = match (limit, told.as_ref()) {
            (Some(l), Some(&g)) => (f64::from(l) - f64::from(g)).abs() >= step,
            (None, None) => false,
            _ => true,
        };
        if !force && !changed {
            continue;
        }
        if let Some(l) = limit {
            e.cpu_limit = Some(CpuAmount::Mhz(l));
            if let Some(r) = e.cpu_reservation {
                e.cpu_reservation = Some(CpuAmount::Mhz((r.mhz(core).round() as u32).min(l)));
            }
        }
        let Some(h) = hosts.iter().find(|h| Some(h.id) == vm.host_id) else {
            continue;
        };
        if h.facts.resource_control.is_none() {
            continue;
        }
        match app.agent(h).set_resources(vm.id, &e).await {
            Ok(_) => {
                let mut g = lock(&app.pool_limits);
                match limit {
                    Some(l) => g.insert(vm.id, l),
                    None => g.remove(&vm.id),
                };
            }
            Err(err) => {
                app.add_event(
                    NewEvent::warning(format!(
                        "host {} could not apply VM {}'s policy from its pools ({e}): {err}",
                        h.name,
                        vm.name()
                    ))
                    .vm(vm.name())
                    .host(Some(&h.name)),
                )
                .await;
            }
        }
    }
    Ok(())
}

/// Shows in the API's view of a VM the CPU limit its host holds now when the pools'
/// division by demand set it (known to the leader, which divides; a standby shows the
/// division by shares the VM started with).
pub fn show_enforced(app: &App, vm: &mut tern_api::center::Vm) {
    let Some(limit) = lock(&app.pool_limits).get(&vm.id).copied() else {
        return;
    };
    if let Some(e) = vm.effective_resources.as_mut() {
        e.cpu_limit = Some(CpuAmount::Mhz(limit));
        if let Some(CpuAmount::Mhz(r)) = e.cpu_reservation {
            e.cpu_reservation = Some(CpuAmount::Mhz(r.min(limit)));
        }
    }
}

/// The leader's pool division loop: every cluster with pools, every `period`.
pub async fn divider(app: Arc<App>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let period = std::time::Duration::from_millis(app.config.pool_division_period_ms);
    // Every so often every host is told again, whatever the leader thinks it holds: a VM
    // that migrated started on its new host with its division by shares.
    const FORCE_EVERY: u64 = 6;
    let mut round: u64 = 0;
    loop {
        round += 1;
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        let clusters = match app.db.read(|tx| tx.clusters()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("pool division: {e}");
                continue;
            }
        };
        for c in clusters {
            let has_pools = app
                .db
                .read(move |tx| Ok::<_, StoreError>(!tx.pools(c.id)?.is_empty()))
                .await
                .unwrap_or(false);
            if has_pools {
                let force = round % FORCE_EVERY == 0;
                if let Err(e) = redivide(&app, c.id, force, None).await {
                    tracing::warn!(cluster = %c.name, "pool division: {e}");
                }
            }
        }
    }
}

/// MHz of one core in the cluster: its hosts' (the first that says), else 2 GHz.
fn core_mhz(hosts: &[HostRecord]) -> u32 {
    hosts
        .iter()
        .map(|h| h.facts.cpu_mhz)
        .find(|m| *m > 0)
        .unwrap_or(2000)
}

/// The usable capacity of a cluster's hosts: CPU MHz and memory MiB.
fn capacity(hosts: &[HostRecord]) -> [f64; 2] {
    hosts
        .iter()
        .filter(|h| h.usable())
        .fold([0.0, 0.0], |acc, h| {
            [
                acc[0] + f64::from(h.facts.cores) * f64::from(h.facts.cpu_mhz),
                acc[1] + h.facts.memory_mib as f64,
            ]
        })
}

/// Checks a cluster's tree as it would be; the error lists every fault.
fn check(
    tx: &Tx,
    cluster_id: Uuid,
    pools: &[(String, PoolSettings)],
    vms: &[VmRecord],
) -> Result<(), CenterError> {
    let hosts = tx.hosts_in_cluster(cluster_id)?;
    let t = Tree {
        pools,
        vms,
        core_mhz: core_mhz(&hosts),
    };
    let faults = t.faults(capacity(&hosts));
    if faults.is_empty() {
        Ok(())
    } else {
        Err(CenterError::unsatisfiable(faults.join("; ")))
    }
}

fn cluster_vms(tx: &Tx, cluster_id: Uuid) -> Result<Vec<VmRecord>, StoreError> {
    Ok(tx
        .vms()?
        .into_iter()
        .filter(|v| v.cluster_id == cluster_id)
        .collect())
}

fn view(
    name: &str,
    cluster: &str,
    settings: &PoolSettings,
    pools: &[(String, PoolSettings)],
    vms: &[VmRecord],
) -> ResourcePool {
    ResourcePool {
        name: name.to_string(),
        cluster: cluster.to_string(),
        settings: settings.clone(),
        children: pools
            .iter()
            .filter(|(_, s)| s.parent.as_deref() == Some(name))
            .map(|(n, _)| n.clone())
            .collect(),
        vms: vms
            .iter()
            .filter(|v| v.pool.as_deref() == Some(name))
            .map(|v| v.name().to_string())
            .collect(),
    }
}

fn cluster_name(tx: &Tx, id: Uuid) -> Result<String, StoreError> {
    Ok(tx
        .clusters()?
        .into_iter()
        .find(|c| c.id == id)
        .map(|c| c.name)
        .unwrap_or_default())
}

/// `POST /clusters/{name}/pools`.
pub async fn create(
    app: &Arc<App>,
    cluster: String,
    req: CreatePool,
    by: String,
) -> Result<ResourcePool, CenterError> {
    if !tern_api::valid_name(&req.name) {
        return Err(CenterError::invalid(format!(
            "pool name {:?}: use 1-32 of a-z, 0-9 and -, starting with a letter or digit",
            req.name
        )));
    }
    let settings = req.settings();
    settings
        .check()
        .map_err(|e| CenterError::invalid(format!("pool {}: {e}", req.name)))?;
    let name = req.name.clone();
    let pool = app
        .db
        .write(move |tx| {
            let cid = tx
                .cluster_id(&cluster)?
                .ok_or_else(|| CenterError::cluster_not_found(&cluster))?;
            if let Some((other, _)) = tx.pool(&name)? {
                let where_ = cluster_name(tx, other)?;
                return Err(CenterError::conflict(format!(
                    "pool {name} already exists (in cluster {where_})"
                )));
            }
            let mut pools = tx.pools(cid)?;
            pools.push((name.clone(), settings.clone()));
            let vms = cluster_vms(tx, cid)?;
            check(tx, cid, &pools, &vms)?;
            tx.put_pool(cid, &name, &settings, Utc::now())?;
            tx.add_event(
                NewEvent::info(format!("cluster {cluster}: pool {name} created")).actor(by),
                Utc::now(),
            )?;
            Ok::<_, CenterError>(view(&name, &cluster, &settings, &pools, &vms))
        })
        .await?;
    Ok(pool)
}

/// `GET /clusters/{name}/pools`.
pub async fn list(app: &Arc<App>, cluster: String) -> Result<Vec<ResourcePool>, CenterError> {
    app.db
        .read(move |tx| {
            let cid = tx
                .cluster_id(&cluster)?
                .ok_or_else(|| CenterError::cluster_not_found(&cluster))?;
            let pools = tx.pools(cid)?;
            let vms = cluster_vms(tx, cid)?;
            Ok::<_, CenterError>(
                pools
                    .iter()
                    .map(|(n, s)| view(n, &cluster, s, &pools, &vms))
                    .collect(),
            )
        })
        .await
}

fn pool_not_found(name: &str) -> CenterError {
    CenterError::not_found(format!(
        "pool {name} does not exist: see tern pool list CLUSTER"
    ))
}

/// `GET /pools/{name}`.
pub async fn get(app: &Arc<App>, name: String) -> Result<ResourcePool, CenterError> {
    app.db
        .read(move |tx| {
            let (cid, settings) = tx.pool(&name)?.ok_or_else(|| pool_not_found(&name))?;
            let pools = tx.pools(cid)?;
            let vms = cluster_vms(tx, cid)?;
            Ok::<_, CenterError>(view(
                &name,
                &cluster_name(tx, cid)?,
                &settings,
                &pools,
                &vms,
            ))
        })
        .await
}

/// `PUT /pools/{name}`: new settings (parent included); the running members get the new
/// division at once.
pub async fn update(
    app: &Arc<App>,
    name: String,
    settings: PoolSettings,
    by: String,
) -> Result<ResourcePool, CenterError> {
    settings
        .check()
        .map_err(|e| CenterError::invalid(format!("pool {name}: {e}")))?;
    let (cid, pool) = app
        .db
        .write(move |tx| {
            let (cid, _) = tx.pool(&name)?.ok_or_else(|| pool_not_found(&name))?;
            let mut pools = tx.pools(cid)?;
            for p in pools.iter_mut().filter(|(n, _)| *n == name) {
                p.1 = settings.clone();
            }
            let vms = cluster_vms(tx, cid)?;
            check(tx, cid, &pools, &vms)?;
            tx.put_pool(cid, &name, &settings, Utc::now())?;
            let cluster = cluster_name(tx, cid)?;
            tx.add_event(
                NewEvent::info(format!("cluster {cluster}: pool {name} changed")).actor(by),
                Utc::now(),
            )?;
            Ok::<_, CenterError>((cid, view(&name, &cluster, &settings, &pools, &vms)))
        })
        .await?;
    apply(app, cid).await?;
    Ok(pool)
}

/// `DELETE /pools/{name}`: only a pool without children or VMs.
pub async fn remove(app: &Arc<App>, name: String, by: String) -> Result<(), CenterError> {
    let cid = app
        .db
        .write(move |tx| {
            let (cid, _) = tx.pool(&name)?.ok_or_else(|| pool_not_found(&name))?;
            let pools = tx.pools(cid)?;
            let vms = cluster_vms(tx, cid)?;
            let children: Vec<&str> = pools
                .iter()
                .filter(|(_, s)| s.parent.as_deref() == Some(name.as_str()))
                .map(|(n, _)| n.as_str())
                .collect();
            let members: Vec<&str> = vms
                .iter()
                .filter(|v| v.pool.as_deref() == Some(name.as_str()))
                .map(|v| v.name())
                .collect();
            if !children.is_empty() || !members.is_empty() {
                return Err(CenterError::conflict(format!(
                    "pool {name} still holds {}{}: move them out first (tern vm set VM \
                     --pool ..., tern pool set POOL --parent ...)",
                    if members.is_empty() {
                        String::new()
                    } else {
                        format!("VMs {}", members.join(", "))
                    },
                    if children.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "{}pools {}",
                            if members.is_empty() { "" } else { " and " },
                            children.join(", ")
                        )
                    }
                )));
            }
            tx.delete_pool(&name)?;
            let cluster = cluster_name(tx, cid)?;
            tx.add_event(
                NewEvent::info(format!("cluster {cluster}: pool {name} removed")).actor(by),
                Utc::now(),
            )?;
            Ok::<_, CenterError>(cid)
        })
        .await?;
    apply(app, cid).await
}

/// `PUT /vms/{name}/pool`: moves a VM into a pool (`None`: the root) and re-divides.
pub async fn set_vm_pool(
    app: &Arc<App>,
    vm: String,
    pool: Option<String>,
    by: String,
) -> Result<(), CenterError> {
    let cid = app
        .db
        .write(move |tx| {
            let rec = tx
                .vm_by_name(&vm)?
                .ok_or_else(|| CenterError::vm_not_found(&vm))?;
            if let Some(p) = &pool {
                match tx.pool(p)? {
                    Some((cid, _)) if cid == rec.cluster_id => {}
                    Some(_) => {
                        return Err(CenterError::unsatisfiable(format!(
                            "pool {p} belongs to another cluster than VM {vm} ({})",
                            rec.cluster
                        )))
                    }
                    None => return Err(pool_not_found(p)),
                }
            }
            let pools = tx.pools(rec.cluster_id)?;
            let mut vms = cluster_vms(tx, rec.cluster_id)?;
            for v in vms.iter_mut().filter(|v| v.id == rec.id) {
                v.pool = pool.clone();
            }
            check(tx, rec.cluster_id, &pools, &vms)?;
            if let Some(why) = memory_limit_breach(&pools, &vms, &rec)? {
                return Err(CenterError::unsatisfiable(why));
            }
            tx.set_vm_pool(rec.id, pool.as_deref())?;
            tx.add_event(
                NewEvent::info(format!(
                    "VM {vm} is now in {}",
                    pool.as_deref()
                        .map_or("the cluster's root".to_string(), |p| format!("pool {p}"))
                ))
                .vm(vm.clone())
                .actor(by),
                Utc::now(),
            )?;
            Ok::<_, CenterError>(rec.cluster_id)
        })
        .await?;
    apply(app, cid).await
}

/// Whether VM `vm` running would take one of its pools beyond the pool's memory limit
/// (counting the pool's running members); the reason, naming the pool.
fn memory_limit_breach(
    pools: &[(String, PoolSettings)],
    vms: &[VmRecord],
    vm: &VmRecord,
) -> Result<Option<String>, StoreError> {
    let t = Tree {
        pools,
        vms,
        core_mhz: 1,
    };
    let running = |v: &VmRecord| {
        v.id != vm.id
            && matches!(
                v.actual,
                PowerState::Running | PowerState::Paused | PowerState::Unknown
            )
    };
    let node = vms
        .iter()
        .find(|v| v.id == vm.id)
        .map_or(t.node_of_vm(vm), |v| t.node_of_vm(v));
    for p in t.ancestors(node) {
        let Some(limit) = pools[p].1.memory.limit_mib else {
            continue;
        };
        let in_subtree = |v: &VmRecord| t.ancestors(t.node_of_vm(v)).contains(&p);
        let used: u64 = vms
            .iter()
            .filter(|v| running(v) && in_subtree(v))
            .map(|v| v.spec.memory_mib)
            .sum();
        if used + vm.spec.memory_mib > limit {
            return Ok(Some(format!(
                "pool {}'s memory limit is {limit} MiB: its running VMs have {used} MiB and VM \
                 {} needs {} MiB more",
                pools[p].0,
                vm.name(),
                vm.spec.memory_mib
            )));
        }
    }
    Ok(None)
}

/// Power-on admission for pools: refuses a start that would break a pool's memory limit.
pub fn admit_start(tx: &Tx, vm: &VmRecord) -> Result<(), CenterError> {
    let pools = tx.pools(vm.cluster_id)?;
    if pools.is_empty() {
        return Ok(());
    }
    let vms = cluster_vms(tx, vm.cluster_id)?;
    match memory_limit_breach(&pools, &vms, vm)? {
        Some(why) => Err(CenterError::unsatisfiable(format!(
            "VM {} cannot start: {why}",
            vm.name()
        ))),
        None => Ok(()),
    }
}

/// The policy VM `vm` is enforced with now (read inside a transaction).
pub fn effective_for(tx: &Tx, vm: &VmRecord) -> Result<Resources, StoreError> {
    let pools = tx.pools(vm.cluster_id)?;
    if pools.is_empty() {
        return Ok(vm.spec.resources.clone());
    }
    let hosts = tx.hosts_in_cluster(vm.cluster_id)?;
    let vms = cluster_vms(tx, vm.cluster_id)?;
    Ok(effective(&pools, &vms, core_mhz(&hosts))
        .remove(&vm.id)
        .unwrap_or_else(|| vm.spec.resources.clone()))
}

/// Pushes the cluster's current division to the hosts of its running VMs (after a change
/// of the tree, a policy or a membership). A host that cannot take it is recorded in a
/// warning event (the next division tries again); the change that led here stays.
pub async fn apply(app: &Arc<App>, cluster_id: Uuid) -> Result<(), CenterError> {
    redivide(app, cluster_id, true, None).await
}

/// After VM `vm` started (`runs`) or stopped: its pool's members are divided again, so a
/// start never finds its siblings holding what was its part. Failures are logged: the next
/// division tries again.
pub async fn member_changed(app: &Arc<App>, vm: &VmRecord, runs: bool) {
    if vm.pool.is_none() {
        return;
    }
    if let Err(e) = redivide(app, vm.cluster_id, false, Some((vm.id, runs))).await {
        tracing::warn!(vm = %vm.name(), "pool division: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_api::pools::{PoolCpu, PoolMemory};

    fn vm(name: &str, pool: Option<&str>, resources: Resources) -> VmRecord {
        VmRecord {
            id: Uuid::new_v4(),
            cluster_id: Uuid::nil(),
            cluster: "lab".into(),
            host_id: None,
            host: None,
            spec: tern_api::VmSpec {
                firmware: Default::default(),
                cloud_init: None,
                resources,
                name: name.into(),
                vcpus: 1,
                memory_mib: 256,
                cpu_model: None,
                boot: tern_api::BootSource::Disk,
                disks: vec![],
                nics: vec![],
            },
            desired: PowerState::Running,
            actual: PowerState::Running,
            generation: 1,
            created_at: Utc::now(),
            pool: pool.map(str::to_string),
        }
    }

    fn pool(name: &str, parent: Option<&str>, cpu: PoolCpu) -> (String, PoolSettings) {
        (
            name.to_string(),
            PoolSettings {
                parent: parent.map(str::to_string),
                cpu,
                memory: PoolMemory::default(),
            },
        )
    }

    fn shares(r: &Resources) -> u32 {
        match r.cpu_shares {
            Shares::Custom(n) => n,
            s => panic!("shares {s} not divided"),
        }
    }

    #[test]
    fn a_pool_limit_divides_by_shares_and_pools_weigh_against_each_other() {
        let pools = vec![
            pool(
                "capped",
                None,
                PoolCpu {
                    limit_mhz: Some(1000),
                    ..Default::default()
                },
            ),
            pool(
                "gold",
                None,
                PoolCpu {
                    shares: Shares::High,
                    ..Default::default()
                },
            ),
        ];
        let high = Resources {
            cpu_shares: Shares::High,
            ..Default::default()
        };
        let vms = vec![
            vm("a", Some("capped"), high.clone()),
            vm("b", Some("capped"), Resources::default()),
            vm("g", Some("gold"), Resources::default()),
            vm("r", None, Resources::default()),
        ];
        let e = effective(&pools, &vms, 2000);
        let get = |i: usize| &e[&vms[i].id];
        // capped's 1000 MHz split 2 : 1 by its members' shares.
        assert_eq!(get(0).cpu_limit, Some(CpuAmount::Mhz(667)));
        assert_eq!(get(1).cpu_limit, Some(CpuAmount::Mhz(333)));
        assert_eq!(get(2).cpu_limit, None);
        // gold (high, 8000) against capped (normal, 4000) and r (1000): g outweighs both
        // capped VMs together, r is the smallest.
        let (sa, sb, sg, sr) = (
            shares(get(0)),
            shares(get(1)),
            shares(get(2)),
            shares(get(3)),
        );
        assert!(sg > sa + sb, "{sg} vs {sa} + {sb}");
        assert!(
            (2 * sb).abs_diff(sa) <= 1,
            "2:1 within rounding: {sa} vs {sb}"
        );
        assert!(sr < sb, "{sr} vs {sb}");
        // No pools: each VM's own policy, untouched.
        let own = effective(&[], &vms, 2000);
        assert_eq!(own[&vms[0].id], high);
    }

    #[test]
    fn reservations_reach_the_members_and_the_tree_must_fit() {
        let pools = vec![pool(
            "res",
            None,
            PoolCpu {
                reservation_mhz: Some(1000),
                expandable: false,
                ..Default::default()
            },
        )];
        let vms = vec![
            vm("a", Some("res"), Resources::default()),
            vm("b", Some("res"), Resources::default()),
        ];
        let e = effective(&pools, &vms, 2000);
        assert_eq!(e[&vms[0].id].cpu_reservation, Some(CpuAmount::Mhz(500)));
        let t = Tree {
            pools: &pools,
            vms: &vms,
            core_mhz: 2000,
        };
        assert!(t.faults([8000.0, 8192.0]).is_empty());
        // A member reserving more than the fixed pool holds: refused, naming the pool.
        let greedy = Resources {
            cpu_reservation: Some(CpuAmount::Mhz(1500)),
            ..Default::default()
        };
        let vms = vec![vm("a", Some("res"), greedy)];
        let t = Tree {
            pools: &pools,
            vms: &vms,
            core_mhz: 2000,
        };
        let f = t.faults([8000.0, 8192.0]);
        assert!(f[0].contains("pool res reserves 1000 MHz"), "{f:?}");
        // More reserved than the cluster has.
        let t = Tree {
            pools: &pools,
            vms: &[],
            core_mhz: 2000,
        };
        assert!(t.faults([500.0, 8192.0])[0].contains("more than its usable hosts"));
    }

    #[test]
    fn cycles_and_unknown_parents_are_faults() {
        let pools = vec![
            pool("a", Some("b"), PoolCpu::default()),
            pool("b", Some("a"), PoolCpu::default()),
            pool("c", Some("nope"), PoolCpu::default()),
        ];
        let t = Tree {
            pools: &pools,
            vms: &[],
            core_mhz: 2000,
        };
        let f = t.faults([1e9, 1e9]).join("; ");
        assert!(f.contains("pool a would be its own ancestor"), "{f}");
        assert!(f.contains("parent nope is not a pool"), "{f}");
    }

    #[test]
    fn a_pool_memory_limit_is_held_at_power_on() {
        let mut p = pool("small", None, PoolCpu::default());
        p.1.memory.limit_mib = Some(400);
        let pools = vec![p];
        let mut off = vm("d", Some("small"), Resources::default());
        off.actual = PowerState::Stopped;
        let vms = vec![vm("c", Some("small"), Resources::default()), off.clone()];
        let why = memory_limit_breach(&pools, &vms, &off)
            .unwrap()
            .expect("refused");
        assert!(
            why.contains("pool small's memory limit is 400 MiB"),
            "{why}"
        );
        assert!(memory_limit_breach(&pools, &vms, &vms[0])
            .unwrap()
            .is_none());
    }

    fn two_vcpus(mut v: VmRecord) -> VmRecord {
        v.spec.vcpus = 2;
        v
    }

    fn capped(
        name: &str,
        parent: Option<&str>,
        limit: u64,
        shares: Shares,
    ) -> (String, PoolSettings) {
        pool(
            name,
            parent,
            PoolCpu {
                limit_mhz: Some(limit),
                shares,
                ..Default::default()
            },
        )
    }

    /// What idle members leave goes to busy ones; busy members split by shares; a stopped
    /// member holds nothing; the parts never add up to more than the limit.
    #[test]
    fn a_pools_cpu_limit_is_divided_by_demand() {
        let core = 2000;
        let pools = vec![capped("p", None, 1000, Shares::Normal)];
        let busy = two_vcpus(vm("busy", Some("p"), Resources::default()));
        let idle = two_vcpus(vm("idle", Some("p"), Resources::default()));
        let mut off = two_vcpus(vm("off", Some("p"), Resources::default()));
        off.actual = PowerState::Stopped;
        let vms = vec![busy.clone(), idle.clone(), off.clone()];
        // First division: nothing known, every running member is taken to want all: halves.
        let none: HashMap<Uuid, f64> = HashMap::new();
        let no_limits: HashMap<Uuid, u32> = HashMap::new();
        let l = divide_limits(&pools, &vms, core, &none, &no_limits, None);
        assert_eq!((l[&busy.id], l[&idle.id]), (500, 500));
        assert!(!l.contains_key(&off.id));
        // busy runs at its part, idle uses 20 MHz: idle keeps 20 × 1.25 + 100, busy the rest.
        let demand = HashMap::from([(busy.id, 495.0), (idle.id, 20.0)]);
        let l2 = divide_limits(&pools, &vms, core, &demand, &l, None);
        assert_eq!(l2[&idle.id], 125, "{l2:?}");
        assert_eq!(l2[&busy.id], 875, "{l2:?}");
        // idle wakes up and runs at its small part: it wants all again, and gets half back.
        let demand = HashMap::from([(busy.id, 870.0), (idle.id, 124.0)]);
        let l3 = divide_limits(&pools, &vms, core, &demand, &l2, None);
        assert_eq!((l3[&busy.id], l3[&idle.id]), (500, 500), "{l3:?}");
        // Shares weigh when both want all: high (2 vCPUs: 4000) against normal (2000).
        let mut high = busy.clone();
        high.spec.resources.cpu_shares = Shares::High;
        let vms = vec![high.clone(), idle.clone()];
        let l4 = divide_limits(&pools, &vms, core, &none, &no_limits, None);
        assert_eq!((l4[&high.id], l4[&idle.id]), (667, 333), "{l4:?}");
        // A VM that just started counts before the store says it runs; one that stopped not.
        let vms = vec![busy.clone(), idle.clone(), off.clone()];
        let l5 = divide_limits(&pools, &vms, core, &none, &no_limits, Some((off.id, true)));
        assert_eq!(l5.len(), 3);
        assert!(l5.values().all(|&x| x == 333), "{l5:?}");
        let l6 = divide_limits(
            &pools,
            &vms,
            core,
            &none,
            &no_limits,
            Some((idle.id, false)),
        );
        assert_eq!(l6.get(&busy.id), Some(&1000));
        assert!(!l6.contains_key(&idle.id));
    }

    /// A parent's limit goes to its child pools by their demand, then down to their VMs; a
    /// VM's own limit caps what it is given, and the rest goes to its siblings.
    #[test]
    fn nested_pools_divide_the_parents_limit_by_their_demand() {
        let core = 2000;
        let pools = vec![
            capped("top", None, 3000, Shares::Normal),
            pool("a", Some("top"), PoolCpu::default()),
            pool("b", Some("top"), PoolCpu::default()),
        ];
        let a1 = two_vcpus(vm("a1", Some("a"), Resources::default()));
        let mut a2 = two_vcpus(vm("a2", Some("a"), Resources::default()));
        a2.spec.resources.cpu_limit = Some(CpuAmount::Mhz(200));
        let b1 = two_vcpus(vm("b1", Some("b"), Resources::default()));
        let vms = vec![a1.clone(), a2.clone(), b1.clone()];
        let none: HashMap<Uuid, f64> = HashMap::new();
        let no_limits: HashMap<Uuid, u32> = HashMap::new();
        let l = divide_limits(&pools, &vms, core, &none, &no_limits, None);
        // a and b get 1500 each; in a, a2 takes 200 (its own limit) and a1 the other 1300.
        assert_eq!(
            (l[&a1.id], l[&a2.id], l[&b1.id]),
            (1300, 200, 1500),
            "{l:?}"
        );
        // b idles: a's VMs get what b leaves, up to what they can use (a1: 2 cores).
        let demand = HashMap::from([(a1.id, 1290.0), (a2.id, 199.0), (b1.id, 0.0)]);
        let l2 = divide_limits(&pools, &vms, core, &demand, &l, None);
        assert_eq!(l2[&b1.id], 100, "{l2:?}");
        assert_eq!(l2[&a2.id], 200, "{l2:?}");
        assert_eq!(l2[&a1.id], 2700, "{l2:?}");
        let total: u32 = l2.values().sum();
        assert!(total <= 3000, "{l2:?}");
    }
}
