//! Initial placement (power-on): the best host for a VM, or an admission failure that says
//! which reservation or rule fails where.
//!
//! Hard checks (never broken): host connected, must-rules, anti-affinity, the affinity
//! group's host, unreserved CPU and memory on the host, the resource pool's reservation
//! (expandable reservations borrow up the tree). Among hosts passing them, the order is:
//! room for the VM's peak demand, should-rules kept, below the high-water mark, then the
//! lowest cluster imbalance after placement. A should-rule is broken only when no compliant
//! host has room, and the placement says so.

use crate::cluster::{Cluster, Fit};
use crate::decision::{AdmissionFailure, HostRejection, Placement, PoolRejection};
use crate::entitlement::{ShortfallKind, CPU, MEM};

use crate::model::{Snapshot, SnapshotError};

/// Failure of [`place`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlaceError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Admission(AdmissionFailure),
    #[error("no VM named {0:?} in the snapshot")]
    NoSuchVm(String),
    #[error("no host named {0:?} in the snapshot")]
    NoSuchHost(String),
}

/// Places one VM of the snapshot (its `host` is ignored: it is treated as powered off).
pub fn place(snap: &Snapshot, vm: &str) -> Result<Placement, PlaceError> {
    let mut all = place_all(snap, &[vm])?;
    match all.pop() {
        Some(Ok(p)) => Ok(p),
        Some(Err(f)) => Err(PlaceError::Admission(f)),
        None => Err(PlaceError::NoSuchVm(vm.to_string())),
    }
}

/// Admission control of powering `vm` on at `host` (where it is registered): its pool must
/// admit its reservation and the host must take it (unreserved capacity for its
/// reservations, must-rules, state). The VM's own place in the snapshot is ignored: it is
/// treated as powered off. The failure names the one host and why.
pub fn admit_on(snap: &Snapshot, vm: &str, host: &str) -> Result<(), PlaceError> {
    let mut c = Cluster::new(snap)?;
    let v = *c
        .vm_index
        .get(vm)
        .ok_or_else(|| PlaceError::NoSuchVm(vm.to_string()))?;
    let Some(d) = snap.hosts.iter().position(|h| h.name == host) else {
        return Err(PlaceError::NoSuchHost(host.to_string()));
    };
    c.unplace_vm(v);
    let capacity = active_capacity(&c);
    admit_in_pool(&c, v, capacity).map_err(PlaceError::Admission)?;
    c.check_members(&[v], d).map_err(|rejection| {
        PlaceError::Admission(AdmissionFailure {
            vm: vm.to_string(),
            pool: None,
            hosts: vec![HostRejection {
                host: host.to_string(),
                rejection,
            }],
        })
    })
}

/// CPU and memory of the usable hosts together.
fn active_capacity(c: &Cluster) -> [f64; 2] {
    let mut capacity = [0.0; 2];
    for h in 0..c.cap.len() {
        if c.active[h] {
            capacity[CPU] += c.cap[h][CPU];
            capacity[MEM] += c.cap[h][MEM];
        }
    }
    capacity
}

/// Whether VM `v`'s resource pool (and those above it) admit its reservation.
fn admit_in_pool(c: &Cluster, v: usize, capacity: [f64; 2]) -> Result<(), AdmissionFailure> {
    let node = c.tree.node_of(v);
    c.tree
        .admit_with(&c.node_res, node, c.res[v], capacity)
        .map_err(|short| AdmissionFailure {
            vm: c.snap.vms[v].name.clone(),
            pool: Some(PoolRejection {
                pool: short.pool,
                resource: crate::decision::Resource::from_index(short.resource),
                needed: short.needed,
                available: short.available,
                why: match short.why {
                    ShortfallKind::Cluster => "cluster",
                    ShortfallKind::NotExpandable => "not expandable",
                    ShortfallKind::Limit => "limit",
                }
                .to_string(),
            }),
            hosts: Vec::new(),
        })
}

/// Places several VMs in order, each seeing the ones placed before it.
pub fn place_all(
    snap: &Snapshot,
    vms: &[&str],
) -> Result<Vec<Result<Placement, AdmissionFailure>>, PlaceError> {
    let mut c = Cluster::new(snap)?;
    let mut indices = Vec::with_capacity(vms.len());
    for name in vms {
        let v = *c
            .vm_index
            .get(name)
            .ok_or_else(|| PlaceError::NoSuchVm(name.to_string()))?;
        indices.push(v);
    }
    // Treat them as powered off.
    for &v in &indices {
        c.unplace_vm(v);
    }
    let capacity = active_capacity(&c);
    let mut out = Vec::with_capacity(indices.len());
    for v in indices {
        out.push(place_one(&mut c, v, capacity));
    }
    Ok(out)
}

fn place_one(c: &mut Cluster, v: usize, capacity: [f64; 2]) -> Result<Placement, AdmissionFailure> {
    let vm = &c.snap.vms[v];
    let name = vm.name.clone();
    // Uncontended entitlement: demand raised to the reservation, capped at the limit.
    c.ent[v] = [
        vm.cpu_reservation_mhz.max(
            vm.cpu_demand_mhz
                .min(vm.cpu_limit_mhz.unwrap_or(f64::INFINITY)),
        ),
        vm.memory_reservation_mib.max(
            vm.memory_demand_mib
                .min(vm.memory_limit_mib.unwrap_or(f64::INFINITY)),
        ),
    ];
    admit_in_pool(c, v, capacity)?;
    let u = c.unit_of[v];
    let group_hosts: Vec<usize> = c.units[u]
        .iter()
        .filter(|&&m| m != v)
        .filter_map(|&m| c.vm_host[m])
        .collect();
    let allowed = crate::evacuate::most_common(&group_hosts).map(|h| vec![h]);
    let before = c.imbalance();
    let (choice, rejected) = c.best_host(&[v], Fit::Any, allowed.as_deref());
    let Some(choice) = choice else {
        return Err(AdmissionFailure {
            vm: name,
            pool: None,
            hosts: rejected,
        });
    };
    // Alternatives: the three best other hosts passing the hard checks, by imbalance after
    // (then name). Selected, not sorted: a big cluster has thousands of hosts.
    let mut scored: Vec<(usize, f64)> = (0..c.cap.len())
        .filter(|&d| d != choice.host)
        .filter(|&d| allowed.as_ref().is_none_or(|a| a.contains(&d)))
        .filter(|&d| c.check_members(&[v], d).is_ok())
        .map(|d| (d, c.eval(c.ent[v], None, Some(d)).0))
        .collect();
    let hosts = &c.snap.hosts;
    let order = |a: &(usize, f64), b: &(usize, f64)| {
        a.1.total_cmp(&b.1)
            .then_with(|| hosts[a.0].name.cmp(&hosts[b.0].name))
    };
    if scored.len() > 3 {
        scored.select_nth_unstable_by(2, order);
        scored.truncate(3);
    }
    scored.sort_by(order);
    let alternatives: Vec<(String, f64)> = scored
        .into_iter()
        .map(|(d, e)| (hosts[d].name.clone(), e))
        .collect();
    c.place_vm(v, choice.host);
    Ok(Placement {
        vm: name,
        host: c.snap.hosts[choice.host].name.clone(),
        automatic: c.automation[v].places_automatically(),
        imbalance_before: before,
        imbalance_after: choice.imbalance_after,
        host_after: c.loads(choice.host),
        host_peak_after: c.peak_loads(choice.host),
        broken_should_rules: choice
            .broken_should
            .iter()
            .map(|&ri| c.snap.rules[ri].name().to_string())
            .collect(),
        over_high_water: !choice.fits_high_water,
        alternatives,
        rejected,
    })
}
