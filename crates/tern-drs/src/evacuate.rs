//! Maintenance evacuation: a plan that moves every VM off a host, spread over the others
//! within capacity and rules, ordered to run at limited concurrency, with the VMs that
//! cannot leave listed as blockers and the reason.
//!
//! VMs are assigned most-constrained first (rules, reservations), then largest first, each to
//! the host that keeps the cluster most balanced after it lands (so the VMs spread instead
//! of piling onto the emptiest host), never beyond any host's capacity (peak demand), and
//! preferring hosts below the high-water mark. The plan is then list-scheduled
//! longest-first on `max_concurrent_migrations_per_host` slots per host.

use crate::cluster::{Cluster, Fit};
use crate::decision::{BlockReason, Blocker, EvacuationPlan, EvacuationStep, Move, MoveReason};
use crate::entitlement::{CPU, MEM};
use crate::model::{Automation, Snapshot, SnapshotError};

/// Plans emptying `host` (normally before it enters maintenance; also works on a host
/// already in maintenance).
pub fn evacuate(snap: &Snapshot, host: &str) -> Result<EvacuationPlan, SnapshotError> {
    let mut c = Cluster::new(snap)?;
    let h = snap
        .hosts
        .iter()
        .position(|x| x.name == host)
        .ok_or_else(|| SnapshotError::NoSuchHost(host.to_string()))?;
    let figures = c.figures();
    // The host leaves the balance metric and takes nothing from now on; imbalance is over
    // the hosts that stay.
    c.active[h] = false;
    c.recompute_sums();
    let before = c.imbalance();
    let (moves, blockers) = evacuate_host(&mut c, h);
    let mut steps = schedule(&moves, c.cfg.max_concurrent_migrations_per_host);
    // Replay the moves in the order they run, so each step's numbers (imbalance and loads
    // before and after) are those the cluster will see at that step.
    let mut replay = Cluster::new(snap)?;
    replay.active[h] = false;
    replay.recompute_sums();
    for step in &mut steps {
        let m = &step.migration;
        let (Some(&v), Some(d)) = (
            replay.vm_index.get(m.vm.as_str()),
            snap.hosts.iter().position(|x| x.name == m.to_host),
        ) else {
            continue;
        };
        let broken: Vec<usize> = m
            .broken_should_rules
            .iter()
            .filter_map(|name| snap.rules.iter().position(|r| r.name() == name))
            .collect();
        if let Some(again) = replay
            .apply(&[v], d, m.priority, m.reason.clone(), &broken)
            .pop()
        {
            step.migration = again;
        }
    }
    let duration_s = steps.iter().map(|s| s.end_s).fold(0.0, f64::max);
    Ok(EvacuationPlan {
        host: host.to_string(),
        steps,
        blockers,
        duration_s,
        imbalance_before: before,
        imbalance_after: replay.imbalance(),
        hosts: replay.summaries(&figures),
    })
}

/// Assigns every VM on `h` (which must not be usable) a destination, applying the moves.
pub(crate) fn evacuate_host(c: &mut Cluster, h: usize) -> (Vec<Move>, Vec<Blocker>) {
    let mut units: Vec<usize> = c.host_vms[h].iter().map(|&v| c.unit_of[v]).collect();
    units.sort_unstable();
    units.dedup();
    // Most constrained first, then largest (normalized peak) first.
    let key = |c: &Cluster, u: usize| {
        let members = c.members_on(u, h);
        let constrained = members.iter().any(|&v| {
            !c.vm_host_rules[v].is_empty()
                || !c.vm_anti[v].is_empty()
                || c.res[v][CPU] > 0.0
                || c.res[v][MEM] > 0.0
        }) || c.units[u].len() > 1;
        let pk = c.peak_after_alone(&c.demand_of(&members), h);
        let size = pk[CPU] + pk[MEM];
        (constrained, size)
    };
    let mut keyed: Vec<(bool, f64, usize)> = units
        .iter()
        .map(|&u| {
            let (k, s) = key(c, u);
            (k, s, u)
        })
        .collect();
    keyed.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.total_cmp(&a.1)).then(a.2.cmp(&b.2)));
    let reason = MoveReason::HostMaintenance {
        host: c.snap.hosts[h].name.clone(),
    };
    let mut moves = Vec::new();
    let mut blockers = Vec::new();
    for (_, _, u) in keyed {
        let members = c.members_on(u, h);
        if members.is_empty() {
            continue;
        }
        if let Some(&v) = members
            .iter()
            .find(|&&v| c.automation[v] == Automation::Disabled)
        {
            for &m in &members {
                blockers.push(Blocker {
                    vm: c.snap.vms[m].name.clone(),
                    host: c.snap.hosts[h].name.clone(),
                    reason: BlockReason::AutomationDisabled {
                        why_move: if m == v {
                            reason.clone()
                        } else {
                            MoveReason::WithGroup {
                                rule: group_rule(c, u),
                                leader: c.snap.vms[v].name.clone(),
                            }
                        },
                    },
                });
            }
            continue;
        }
        // Members of the group already elsewhere decide where the rest goes.
        let elsewhere: Vec<usize> = c.units[u]
            .iter()
            .filter_map(|&v| c.vm_host[v])
            .filter(|&x| x != h)
            .collect();
        let allowed = most_common(&elsewhere).map(|x| vec![x]);
        let (choice, rejected) = c.best_host(&members, Fit::Capacity, allowed.as_deref());
        match choice {
            Some(choice) => {
                moves.extend(c.apply(
                    &members,
                    choice.host,
                    1,
                    reason.clone(),
                    &choice.broken_should,
                ));
            }
            None => {
                for &m in &members {
                    blockers.push(Blocker {
                        vm: c.snap.vms[m].name.clone(),
                        host: c.snap.hosts[h].name.clone(),
                        reason: BlockReason::NoHost {
                            why_move: reason.clone(),
                            hosts: rejected.clone(),
                        },
                    });
                }
            }
        }
    }
    (moves, blockers)
}

fn group_rule(c: &Cluster, u: usize) -> String {
    c.unit_rule[u]
        .map(|ri| c.snap.rules[ri].name().to_string())
        .unwrap_or_default()
}

/// Most frequent value (ties: smallest).
pub(crate) fn most_common(xs: &[usize]) -> Option<usize> {
    let mut v = xs.to_vec();
    v.sort_unstable();
    let mut best: Option<(usize, usize)> = None;
    let mut i = 0;
    while i < v.len() {
        let j = v[i..]
            .iter()
            .position(|&x| x != v[i])
            .map_or(v.len(), |k| i + k);
        if best.is_none_or(|(_, n)| j - i > n) {
            best = Some((v[i], j - i));
        }
        i = j;
    }
    best.map(|(x, _)| x)
}

/// List-schedules moves longest first on `slots` concurrent migrations per host (source and
/// destination both count); affinity-group followers go right after their leader.
pub(crate) fn schedule(moves: &[Move], slots: usize) -> Vec<EvacuationStep> {
    let slots = slots.max(1);
    // Chains: a leader and its followers run back to back in one slot.
    let mut chains: Vec<Vec<usize>> = Vec::new();
    for (i, m) in moves.iter().enumerate() {
        match &m.reason {
            MoveReason::WithGroup { .. } if !chains.is_empty() => {
                if let Some(last) = chains.last_mut() {
                    last.push(i);
                }
            }
            _ => chains.push(vec![i]),
        }
    }
    let chain_len = |ch: &Vec<usize>| -> f64 {
        ch.iter()
            .map(|&i| moves[i].numbers.migration.duration_s)
            .sum()
    };
    chains.sort_by(|a, b| chain_len(b).total_cmp(&chain_len(a)).then(a[0].cmp(&b[0])));
    let mut free: std::collections::HashMap<&str, Vec<f64>> = std::collections::HashMap::new();
    let mut steps = Vec::with_capacity(moves.len());
    for ch in chains {
        for i in ch {
            let m = &moves[i];
            let src = earliest(
                free.entry(m.from_host.as_str())
                    .or_insert_with(|| vec![0.0; slots]),
            );
            let dst = earliest(
                free.entry(m.to_host.as_str())
                    .or_insert_with(|| vec![0.0; slots]),
            );
            let start = src.1.max(dst.1);
            let end = start + m.numbers.migration.duration_s;
            if let Some(s) = free.get_mut(m.from_host.as_str()) {
                s[src.0] = end;
            }
            if let Some(d) = free.get_mut(m.to_host.as_str()) {
                d[dst.0] = end;
            }
            steps.push(EvacuationStep {
                migration: m.clone(),
                start_s: start,
                end_s: end,
            });
        }
    }
    steps.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));
    steps
}

fn earliest(slots: &[f64]) -> (usize, f64) {
    let mut best = (0, f64::INFINITY);
    for (i, &t) in slots.iter().enumerate() {
        if t < best.1 {
            best = (i, t);
        }
    }
    best
}
