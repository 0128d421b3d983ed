//! Entitlements: what each VM deserves of the cluster's CPU and memory, from its demand,
//! reservation, limit and shares, divided down the resource-pool tree; and reservation
//! admission control through the tree (expandable reservations borrow from the parent).
//!
//! Uncontended, a VM is entitled to its demand, raised to its reservation and capped at its
//! limit. A pool's demand is the sum of its children's, raised to its reservation and capped
//! at its limit. Top down, the root gets the cluster's capacity; each node gives every child
//! its reservation first and shares the rest in proportion to shares, never giving a child
//! more than its demand (max-min fair water-filling). So entitlements equal demands until the
//! cluster is contended, and then shares decide.

use std::collections::HashMap;

use crate::model::{Pool, SnapshotError, Vm};

/// CPU (index 0) and memory (index 1): the two resources DRS schedules.
pub const CPU: usize = 0;
pub const MEM: usize = 1;

/// Compiled pool tree: node 0 is the root (the whole cluster), node `i + 1` is `pools[i]`.
#[derive(Debug, Clone)]
pub struct PoolTree {
    names: Vec<String>,
    parent: Vec<usize>,
    reservation: Vec<[f64; 2]>,
    limit: Vec<[f64; 2]>,
    shares: Vec<[f64; 2]>,
    expandable: Vec<[bool; 2]>,
    /// Nodes children first (post-order), root last.
    bottom_up: Vec<usize>,
    /// Pool node of each VM (index into the snapshot's `vms`).
    vm_node: Vec<usize>,
}

impl PoolTree {
    /// Builds the tree; errors name the pool or VM to fix.
    pub fn new(pools: &[Pool], vms: &[Vm]) -> Result<PoolTree, SnapshotError> {
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, p) in pools.iter().enumerate() {
            if index.insert(p.name.as_str(), i + 1).is_some() {
                return Err(SnapshotError::DuplicatePool(p.name.clone()));
            }
        }
        let n = pools.len() + 1;
        let mut parent = vec![0usize; n];
        let mut names = vec!["(root)".to_string()];
        let mut reservation = vec![[0.0, 0.0]];
        let mut limit = vec![[f64::INFINITY, f64::INFINITY]];
        let mut shares = vec![[1.0, 1.0]];
        let mut expandable = vec![[false, false]];
        for (i, p) in pools.iter().enumerate() {
            parent[i + 1] = match &p.parent {
                None => 0,
                Some(name) => {
                    *index
                        .get(name.as_str())
                        .ok_or_else(|| SnapshotError::UnknownParent {
                            pool: p.name.clone(),
                            parent: name.clone(),
                        })?
                }
            };
            names.push(p.name.clone());
            reservation.push([
                p.cpu.reservation_mhz.max(0.0),
                p.memory.reservation_mib.max(0.0),
            ]);
            limit.push([
                p.cpu.limit_mhz.unwrap_or(f64::INFINITY),
                p.memory.limit_mib.unwrap_or(f64::INFINITY),
            ]);
            shares.push([p.cpu.shares.pool_cpu(), p.memory.shares.pool_memory()]);
            expandable.push([
                p.cpu.expandable_reservation,
                p.memory.expandable_reservation,
            ]);
        }
        // Depth of each node; a walk longer than the number of pools is a cycle.
        let mut depth = vec![0usize; n];
        for (start, d) in depth.iter_mut().enumerate().skip(1) {
            let mut node = start;
            let mut steps = 0;
            while node != 0 {
                node = parent[node];
                steps += 1;
                if steps > n {
                    return Err(SnapshotError::PoolCycle(names[start].clone()));
                }
            }
            *d = steps;
        }
        let mut bottom_up: Vec<usize> = (0..n).collect();
        bottom_up.sort_by_key(|&i| std::cmp::Reverse(depth[i]));
        let mut vm_node = Vec::with_capacity(vms.len());
        for vm in vms {
            vm_node.push(match &vm.pool {
                None => 0,
                Some(p) => *index
                    .get(p.as_str())
                    .ok_or_else(|| SnapshotError::UnknownPool {
                        vm: vm.name.clone(),
                        pool: p.clone(),
                    })?,
            });
        }
        Ok(PoolTree {
            names,
            parent,
            reservation,
            limit,
            shares,
            expandable,
            bottom_up,
            vm_node,
        })
    }

    /// Name of a pool node (`(root)` for node 0).
    pub fn name(&self, node: usize) -> &str {
        &self.names[node]
    }

    /// Pool node a VM belongs to.
    pub fn node_of(&self, vm: usize) -> usize {
        self.vm_node[vm]
    }

    /// Entitlement of every VM (index = `vms` index; 0 where `running[i]` is false), given
    /// each VM's demand `[cpu_mhz, memory_mib]` and the cluster's capacity.
    pub fn entitlements(
        &self,
        vms: &[Vm],
        running: &[bool],
        demand: &[[f64; 2]],
        capacity: [f64; 2],
    ) -> Vec<[f64; 2]> {
        let n = self.names.len();
        let mut out = vec![[0.0; 2]; vms.len()];
        // Children of each node, as (is_vm, index).
        let mut child_pools: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut child_vms: Vec<Vec<usize>> = vec![Vec::new(); n];
        for node in 1..n {
            child_pools[self.parent[node]].push(node);
        }
        for (i, vm_running) in running.iter().enumerate() {
            if *vm_running {
                child_vms[self.vm_node[i]].push(i);
            }
        }
        for r in [CPU, MEM] {
            let vm_res = |i: usize| -> f64 {
                let v = &vms[i];
                (if r == CPU {
                    v.cpu_reservation_mhz
                } else {
                    v.memory_reservation_mib
                })
                .max(0.0)
            };
            let vm_limit = |i: usize| -> f64 {
                let v = &vms[i];
                if r == CPU {
                    v.cpu_limit_mhz.unwrap_or(f64::INFINITY)
                } else {
                    v.memory_limit_mib.unwrap_or(f64::INFINITY)
                }
            };
            let vm_shares = |i: usize| -> f64 {
                let v = &vms[i];
                if r == CPU {
                    v.cpu_shares.vm_cpu(v.vcpus)
                } else {
                    v.memory_shares.vm_memory(v.memory_mib)
                }
            };
            let vm_demand = |i: usize| -> f64 {
                let res = vm_res(i);
                res.max(demand[i][r].max(0.0).min(vm_limit(i)))
            };
            // Bottom-up: uncontended demand of each pool node.
            let mut node_demand = vec![0.0f64; n];
            for &node in &self.bottom_up {
                let sum: f64 = child_vms[node].iter().map(|&i| vm_demand(i)).sum::<f64>()
                    + child_pools[node]
                        .iter()
                        .map(|&c| node_demand[c])
                        .sum::<f64>();
                node_demand[node] = self.reservation[node][r].max(sum.min(self.limit[node][r]));
            }
            // Top-down division.
            let mut alloc = vec![0.0f64; n];
            alloc[0] = capacity[r].min(node_demand[0]).max(0.0);
            let mut items: Vec<Share> = Vec::new();
            for &node in self.bottom_up.iter().rev() {
                items.clear();
                for &c in &child_pools[node] {
                    items.push(Share {
                        reservation: self.reservation[c][r],
                        demand: node_demand[c],
                        weight: self.shares[c][r],
                    });
                }
                for &i in &child_vms[node] {
                    items.push(Share {
                        reservation: vm_res(i),
                        demand: vm_demand(i),
                        weight: vm_shares(i),
                    });
                }
                let given = divide(alloc[node], &items);
                let (pools_part, vms_part) = given.split_at(child_pools[node].len());
                for (&c, a) in child_pools[node].iter().zip(pools_part) {
                    alloc[c] = *a;
                }
                for (&i, a) in child_vms[node].iter().zip(vms_part) {
                    out[i][r] = *a;
                }
            }
        }
        out
    }

    /// Reservation admission: can `extra` more (cpu MHz, memory MiB) be reserved for a VM in
    /// pool `node`, given what running VMs already reserve and the cluster's capacity?
    pub fn admit(
        &self,
        vms: &[Vm],
        running: &[bool],
        node: usize,
        extra: [f64; 2],
        capacity: [f64; 2],
    ) -> Result<(), PoolShortfall> {
        self.admit_with(&self.vm_reservations(vms, running), node, extra, capacity)
    }

    /// The reservations of the running VMs directly in each node (CPU MHz, memory MiB):
    /// what [`PoolTree::admit_with`] reads, kept by callers that admit many VMs in a row.
    pub fn vm_reservations(&self, vms: &[Vm], running: &[bool]) -> Vec<[f64; 2]> {
        let mut out = vec![[0.0f64; 2]; self.names.len()];
        for (i, vm) in vms.iter().enumerate() {
            if running[i] {
                out[self.vm_node[i]][CPU] += vm.cpu_reservation_mhz.max(0.0);
                out[self.vm_node[i]][MEM] += vm.memory_reservation_mib.max(0.0);
            }
        }
        out
    }

    /// [`PoolTree::admit`] from the running VMs' reservations per node (see
    /// [`PoolTree::vm_reservations`]): O(pools) rather than O(VMs).
    pub fn admit_with(
        &self,
        vm_reserved: &[[f64; 2]],
        node: usize,
        extra: [f64; 2],
        capacity: [f64; 2],
    ) -> Result<(), PoolShortfall> {
        for r in [CPU, MEM] {
            if extra[r] <= 0.0 {
                continue;
            }
            // Reserved use of each node: its VMs' reservations plus its child pools' held
            // reservation (a pool holds max(own reservation, what its children use)).
            let mut used: Vec<f64> = vm_reserved.iter().map(|u| u[r]).collect();
            for &node in &self.bottom_up {
                if node != 0 {
                    let held = self.reservation[node][r].max(used[node]);
                    used[self.parent[node]] += held;
                }
            }
            let mut node = node;
            let mut add = extra[r];
            loop {
                let own = if node == 0 {
                    capacity[r]
                } else {
                    self.reservation[node][r]
                };
                let held_before = if node == 0 {
                    used[0]
                } else {
                    own.max(used[node])
                };
                let want = used[node] + add;
                if node != 0 && want > self.limit[node][r] + 1e-9 {
                    return Err(PoolShortfall {
                        pool: self.names[node].clone(),
                        resource: r,
                        needed: add,
                        available: (self.limit[node][r] - used[node]).max(0.0),
                        why: ShortfallKind::Limit,
                    });
                }
                if want <= own + 1e-9 {
                    break;
                }
                if node == 0 || !self.expandable[node][r] {
                    return Err(PoolShortfall {
                        pool: self.names[node].clone(),
                        resource: r,
                        needed: add,
                        available: (own - used[node]).max(0.0),
                        why: if node == 0 {
                            ShortfallKind::Cluster
                        } else {
                            ShortfallKind::NotExpandable
                        },
                    });
                }
                // Expandable: the part above what this pool already holds comes from the parent.
                add = want - held_before;
                node = self.parent[node];
            }
        }
        Ok(())
    }
}

/// Why a pool cannot take a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShortfallKind {
    /// The whole cluster's unreserved capacity is too small.
    Cluster,
    /// The pool's own reservation is used up and it may not borrow.
    NotExpandable,
    /// Reserving would take the pool over its limit.
    Limit,
}

/// A reservation a pool cannot admit, with the numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolShortfall {
    pub pool: String,
    /// [`CPU`] or [`MEM`].
    pub resource: usize,
    /// Reservation asked of this pool (MHz or MiB).
    pub needed: f64,
    /// What it still has (MHz or MiB).
    pub available: f64,
    pub why: ShortfallKind,
}

#[derive(Debug, Clone, Copy)]
struct Share {
    reservation: f64,
    demand: f64,
    weight: f64,
}

/// Divides `amount` among children: reservations first, then water-filling by weight up to
/// each child's demand. If reservations alone exceed `amount` they are scaled down.
fn divide(amount: f64, items: &[Share]) -> Vec<f64> {
    let total_res: f64 = items.iter().map(|s| s.reservation).sum();
    if amount <= total_res {
        let scale = if total_res > 0.0 {
            amount / total_res
        } else {
            0.0
        };
        return items.iter().map(|s| s.reservation * scale).collect();
    }
    let total_demand: f64 = items.iter().map(|s| s.demand).sum();
    if amount >= total_demand {
        return items.iter().map(|s| s.demand).collect();
    }
    let mut out: Vec<f64> = items.iter().map(|s| s.reservation).collect();
    let mut order: Vec<usize> = (0..items.len()).collect();
    let need = |i: usize| (items[i].demand - items[i].reservation).max(0.0);
    let weight = |i: usize| items[i].weight.max(1e-9);
    order.sort_by(|&a, &b| (need(a) / weight(a)).total_cmp(&(need(b) / weight(b))));
    let mut extra = amount - total_res;
    let mut weight_left: f64 = order.iter().map(|&i| weight(i)).sum();
    for (k, &i) in order.iter().enumerate() {
        let fair = extra * weight(i) / weight_left;
        if need(i) <= fair {
            out[i] += need(i);
            extra -= need(i);
            weight_left -= weight(i);
        } else {
            for &j in &order[k..] {
                out[j] += extra * weight(j) / weight_left;
            }
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PoolCpu, PoolMemory, Shares};

    fn vm(name: &str, cpu: f64, mem: f64) -> Vm {
        let mut v = Vm::new(name, 4, 8192.0);
        v.cpu_demand_mhz = cpu;
        v.memory_demand_mib = mem;
        v
    }

    #[test]
    fn uncontended_entitlement_is_demand_clamped_by_reservation_and_limit() {
        let mut a = vm("a", 1000.0, 1000.0);
        a.cpu_reservation_mhz = 2000.0;
        let mut b = vm("b", 5000.0, 1000.0);
        b.cpu_limit_mhz = Some(3000.0);
        let vms = vec![a, b];
        let tree = PoolTree::new(&[], &vms).unwrap();
        let demand: Vec<[f64; 2]> = vms
            .iter()
            .map(|v| [v.cpu_demand_mhz, v.memory_demand_mib])
            .collect();
        let e = tree.entitlements(&vms, &[true, true], &demand, [1e6, 1e6]);
        assert_eq!(e[0][CPU], 2000.0);
        assert_eq!(e[1][CPU], 3000.0);
        assert_eq!(e[0][MEM], 1000.0);
    }

    #[test]
    fn contention_is_divided_by_shares_down_the_tree() {
        let pools = vec![
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
                memory: PoolMemory::default(),
            },
        ];
        let mut a = vm("a", 10_000.0, 0.0);
        a.pool = Some("prod".into());
        let mut b = vm("b", 10_000.0, 0.0);
        b.pool = Some("dev".into());
        let mut c = vm("c", 1_000.0, 0.0);
        c.pool = Some("dev".into());
        let vms = vec![a, b, c];
        let tree = PoolTree::new(&pools, &vms).unwrap();
        let demand: Vec<[f64; 2]> = vms.iter().map(|v| [v.cpu_demand_mhz, 0.0]).collect();
        // 10,000 MHz for 21,000 demanded: prod (high, 8000 shares) vs dev (low, 2000).
        let e = tree.entitlements(&vms, &[true; 3], &demand, [10_000.0, 1e6]);
        assert!((e[0][CPU] - 8000.0).abs() < 1e-6, "{e:?}");
        // dev's 2000 is shared between b and c by VM shares (equal), c capped at 1000.
        assert!((e[2][CPU] - 1000.0).abs() < 1e-6, "{e:?}");
        assert!((e[1][CPU] - 1000.0).abs() < 1e-6, "{e:?}");
        let total: f64 = e.iter().map(|x| x[CPU]).sum();
        assert!((total - 10_000.0).abs() < 1e-6);
    }

    #[test]
    fn admission_borrows_only_through_expandable_pools() {
        let pools = vec![Pool {
            name: "fixed".into(),
            parent: None,
            cpu: PoolCpu::default(),
            memory: PoolMemory {
                reservation_mib: 4096.0,
                expandable_reservation: false,
                ..Default::default()
            },
        }];
        let mut a = vm("a", 0.0, 0.0);
        a.pool = Some("fixed".into());
        a.memory_reservation_mib = 3072.0;
        let vms = vec![a];
        let tree = PoolTree::new(&pools, &vms).unwrap();
        assert!(tree
            .admit(&vms, &[true], 1, [0.0, 1024.0], [1e6, 1e6])
            .is_ok());
        let err = tree
            .admit(&vms, &[true], 1, [0.0, 2048.0], [1e6, 1e6])
            .unwrap_err();
        assert_eq!(err.pool, "fixed");
        assert_eq!(err.why, ShortfallKind::NotExpandable);
        assert!((err.available - 1024.0).abs() < 1e-9);
        // The root is bounded by the cluster.
        let err = tree
            .admit(&vms, &[true], 0, [0.0, 8192.0], [1e6, 8192.0])
            .unwrap_err();
        assert_eq!(err.why, ShortfallKind::Cluster);
    }

    #[test]
    fn pool_cycles_are_rejected() {
        let pools = vec![
            Pool {
                name: "a".into(),
                parent: Some("b".into()),
                cpu: PoolCpu::default(),
                memory: PoolMemory::default(),
            },
            Pool {
                name: "b".into(),
                parent: Some("a".into()),
                cpu: PoolCpu::default(),
                memory: PoolMemory::default(),
            },
        ];
        assert!(matches!(
            PoolTree::new(&pools, &[]),
            Err(SnapshotError::PoolCycle(_))
        ));
    }
}
