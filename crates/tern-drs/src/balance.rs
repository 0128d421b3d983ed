//! Load balancing: one DRS pass from a snapshot to ordered migration recommendations.
//!
//! Phases, in order:
//! 1. Mandatory (priority 1, not capped, cooldown ignored): empty maintenance hosts; fix
//!    anti-affinity, affinity and must-rule violations; fix hosts with more reserved than
//!    they have.
//! 2. Should-rule corrections (priority 2), when a compliant host has headroom.
//! 3. Hot hosts (priority 2): a host whose latest demand is above the high-water mark sheds
//!    VMs to hosts whose expected peak stays below it (a host over capacity, when no such
//!    host exists, to hosts that stay within capacity and cooler than it). Moves off a host
//!    over capacity relieve contention and are not capped; the others count to the cap.
//! 4. Balancing (priorities 2–5): repeatedly, among moves that close a load gap of at least
//!    the threshold's minimum, the one with the best net benefit (gain − migration cost) is
//!    taken, if positive. The first move of a pass must close a gap `hysteresis` above the
//!    minimum, so a cluster left balanced does not move again for drift; VMs that migrated
//!    within the cooldown are not moved, so nothing ping-pongs; moves per pass are capped so
//!    a pass never becomes a migration storm.
//!
//! Balancing acts on entitlements from the latest demand and judges a destination's
//! headroom on peak demand, so a move never lands a VM where its usual peaks make the host
//! hot.

use crate::cluster::{Cluster, Fit};
use crate::decision::{BalancePlan, BlockReason, Blocker, Move, MoveReason, Note, Resource};
use crate::entitlement::{CPU, MEM};
use crate::evacuate::{evacuate_host, most_common};
use crate::model::{Automation, HostState, Snapshot, SnapshotError, Threshold, MIN_GAPS};

/// Source hosts the balancing search considers per move (the most overloaded).
const SOURCES_PER_MOVE: usize = 8;

/// Runs one DRS pass at `threshold`.
pub fn balance(snap: &Snapshot, threshold: Threshold) -> Result<BalancePlan, SnapshotError> {
    let mut c = Cluster::new(snap)?;
    let figures = c.figures();
    let before = c.imbalance();
    let mut moves: Vec<Move> = Vec::new();
    let mut notes: Vec<Note> = Vec::new();

    for h in 0..snap.hosts.len() {
        if snap.hosts[h].state == HostState::Maintenance && !c.host_vms[h].is_empty() {
            let (m, b) = evacuate_host(&mut c, h);
            moves.extend(m);
            notes.extend(b.into_iter().map(Note::Blocked));
        }
    }
    fix_anti_affinity(&mut c, &mut moves, &mut notes);
    fix_affinity(&mut c, &mut moves, &mut notes);
    fix_must_rules(&mut c, &mut moves, &mut notes);
    fix_reservations(&mut c, &mut moves, &mut notes);

    if threshold.level() >= 2 {
        let cap = snap.config.max_moves_per_pass.unwrap_or_else(|| {
            let base = (c.n_active / 4).max(4);
            // Far from balance (a replayed placement, hosts back from maintenance), the
            // pass may make every move the skew needs; near it, the usual cap keeps a
            // drifting cluster from churning.
            if c.imbalance() > FAR_FROM_BALANCE * threshold.min_gap() {
                base.max(moves_to_mean(&c))
            } else {
                base
            }
        });
        let mut budget = cap;
        let cooling = (0..snap.vms.len())
            .filter(|&v| c.cooling[v] && c.vm_host[v].is_some())
            .count();
        if cooling > 0 {
            notes.push(Note::CoolingDown {
                vms: cooling,
                cooldown_s: snap.config.cooldown_s,
            });
        }
        fix_should_rules(&mut c, &mut moves, &mut notes, &mut budget);
        relieve_hot_hosts(&mut c, &mut moves, &mut notes, &mut budget);
        rebalance(&mut c, threshold, &mut moves, &mut notes, &mut budget, cap);
    }

    Ok(BalancePlan {
        threshold,
        min_gap: threshold.min_gap(),
        imbalance_before: before,
        imbalance_after: c.imbalance(),
        moves,
        notes,
        hosts: c.summaries(&figures),
    })
}

/// Moves `members` (all on one host) somewhere that fits, at priority 1, or records why not.
fn mandatory_move(
    c: &mut Cluster,
    members: &[usize],
    reason: MoveReason,
    allowed: Option<&[usize]>,
    moves: &mut Vec<Move>,
    notes: &mut Vec<Note>,
) -> bool {
    let host = members.first().and_then(|&v| c.vm_host[v]);
    let host_name = host
        .map(|h| c.snap.hosts[h].name.clone())
        .unwrap_or_default();
    if let Some(&v) = members
        .iter()
        .find(|&&v| c.automation[v] == Automation::Disabled)
    {
        notes.push(Note::Blocked(Blocker {
            vm: c.snap.vms[v].name.clone(),
            host: host_name,
            reason: BlockReason::AutomationDisabled { why_move: reason },
        }));
        return false;
    }
    let (choice, rejected) = c.best_host(members, Fit::Capacity, allowed);
    match choice {
        Some(choice) => {
            moves.extend(c.apply(members, choice.host, 1, reason, &choice.broken_should));
            true
        }
        None => {
            notes.push(Note::Blocked(Blocker {
                vm: c.snap.vms[members[0]].name.clone(),
                host: host_name,
                reason: BlockReason::NoHost {
                    why_move: reason,
                    hosts: rejected,
                },
            }));
            false
        }
    }
}

fn fix_anti_affinity(c: &mut Cluster, moves: &mut Vec<Move>, notes: &mut Vec<Note>) {
    for a in 0..c.anti_members.len() {
        let (ri, members) = c.anti_members[a].clone();
        let rule = c.snap.rules[ri].name().to_string();
        let mut hosts: Vec<usize> = members.iter().filter_map(|&v| c.vm_host[v]).collect();
        hosts.sort_unstable();
        hosts.dedup();
        for h in hosts {
            if !c.active[h] {
                continue;
            }
            let mut here: Vec<usize> = members
                .iter()
                .copied()
                .filter(|&v| c.vm_host[v] == Some(h))
                .collect();
            if here.len() < 2 {
                continue;
            }
            // Keep the one that cannot move or costs most to move.
            here.sort_by(|&x, &y| {
                (c.automation[y] == Automation::Disabled)
                    .cmp(&(c.automation[x] == Automation::Disabled))
                    .then(c.cost[y].copied_mib.total_cmp(&c.cost[x].copied_mib))
                    .then(x.cmp(&y))
            });
            let keep = c.snap.vms[here[0]].name.clone();
            for &v in &here[1..] {
                if c.vm_host[v] != Some(h) {
                    continue;
                }
                let group = c.members_on(c.unit_of[v], h);
                let reason = MoveReason::AntiAffinity {
                    rule: rule.clone(),
                    other_vm: keep.clone(),
                };
                mandatory_move(c, &group, reason, None, moves, notes);
            }
        }
    }
}

fn fix_affinity(c: &mut Cluster, moves: &mut Vec<Move>, notes: &mut Vec<Note>) {
    for u in 0..c.units.len() {
        if c.units[u].len() < 2 || c.unit_host(u).is_some() {
            continue;
        }
        let placed: Vec<usize> = c.units[u].iter().filter_map(|&v| c.vm_host[v]).collect();
        if placed.is_empty() {
            continue;
        }
        let rule = c.unit_rule[u]
            .map(|ri| c.snap.rules[ri].name().to_string())
            .unwrap_or_default();
        // Join the host holding most of the group, if usable.
        let mut candidates: Vec<usize> = placed.clone();
        candidates.sort_unstable();
        candidates.dedup();
        let first = most_common(&placed);
        candidates.sort_by_key(|&x| (Some(x) != first, x));
        for target in candidates {
            if !c.active[target] {
                continue;
            }
            let movers: Vec<usize> = c.units[u]
                .iter()
                .copied()
                .filter(|&v| c.vm_host[v].is_some_and(|h| h != target))
                .collect();
            if movers
                .iter()
                .all(|&v| c.automation[v] != Automation::Disabled)
                && movers
                    .iter()
                    .all(|&v| c.check_members(&[v], target).is_ok())
            {
                let (choice, _) = c.best_host(&movers, Fit::Capacity, Some(&[target]));
                if let Some(choice) = choice {
                    let reason = MoveReason::Affinity { rule: rule.clone() };
                    // Each mover leaves its own host; apply them one by one.
                    for &v in &movers {
                        moves.extend(c.apply(
                            &[v],
                            choice.host,
                            1,
                            reason.clone(),
                            &choice.broken_should,
                        ));
                    }
                    break;
                }
            }
        }
        if c.unit_host(u).is_none() {
            let v = c.units[u][0];
            let allowed = first.map(|f| vec![f]);
            let (_, rejected) = c.best_host(&[v], Fit::Capacity, allowed.as_deref());
            notes.push(Note::Blocked(Blocker {
                vm: c.snap.vms[v].name.clone(),
                host: c.vm_host[v]
                    .map(|h| c.snap.hosts[h].name.clone())
                    .unwrap_or_default(),
                reason: BlockReason::NoHost {
                    why_move: MoveReason::Affinity { rule },
                    hosts: rejected,
                },
            }));
        }
    }
}

fn fix_must_rules(c: &mut Cluster, moves: &mut Vec<Move>, notes: &mut Vec<Note>) {
    for v in 0..c.snap.vms.len() {
        let Some(h) = c.vm_host[v] else { continue };
        if !c.active[h] {
            continue;
        }
        let broken = c.vm_host_rules[v].iter().copied().find(|&hr| {
            let r = &c.host_rules[hr];
            r.relation.is_must() && !r.relation.allows(r.in_group[h])
        });
        let Some(hr) = broken else { continue };
        let (rule, group) = c.rule_name_group(c.host_rules[hr].rule);
        let reason = MoveReason::MustRule {
            rule,
            relation: c.host_rules[hr].relation,
            host_group: group,
        };
        let members = c.members_on(c.unit_of[v], h);
        mandatory_move(c, &members, reason, None, moves, notes);
    }
}

fn fix_reservations(c: &mut Cluster, moves: &mut Vec<Move>, notes: &mut Vec<Note>) {
    for h in 0..c.cap.len() {
        if !c.active[h] {
            continue;
        }
        for r in [CPU, MEM] {
            if c.res_sum[h][r] <= c.cap[h][r] + 1e-9 {
                continue;
            }
            let reason = MoveReason::ReservationOvercommit {
                host: c.snap.hosts[h].name.clone(),
                resource: Resource::from_index(r),
                reserved: c.res_sum[h][r],
                capacity: c.cap[h][r],
            };
            let mut with_res: Vec<usize> = c.host_vms[h]
                .iter()
                .copied()
                .filter(|&v| c.res[v][r] > 0.0)
                .collect();
            // Smallest reservations first: free just enough with the cheapest moves.
            with_res.sort_by(|&a, &b| c.res[a][r].total_cmp(&c.res[b][r]).then(a.cmp(&b)));
            let excess = c.res_sum[h][r] - c.cap[h][r];
            // Prefer a single VM whose reservation covers the excess.
            if let Some(pos) = with_res.iter().position(|&v| c.res[v][r] >= excess) {
                let v = with_res.remove(pos);
                with_res.insert(0, v);
            }
            for v in with_res {
                if c.res_sum[h][r] <= c.cap[h][r] + 1e-9 {
                    break;
                }
                if c.vm_host[v] != Some(h) {
                    continue;
                }
                let members = c.members_on(c.unit_of[v], h);
                mandatory_move(c, &members, reason.clone(), None, moves, notes);
            }
        }
    }
}

fn movable(c: &Cluster, members: &[usize]) -> bool {
    members
        .iter()
        .all(|&v| !c.cooling[v] && c.automation[v] != Automation::Disabled)
}

fn fix_should_rules(
    c: &mut Cluster,
    moves: &mut Vec<Move>,
    notes: &mut Vec<Note>,
    budget: &mut usize,
) {
    for v in 0..c.snap.vms.len() {
        let Some(h) = c.vm_host[v] else { continue };
        if !c.active[h] {
            continue;
        }
        let broken = c.should_broken(v, h);
        let Some(&ri) = broken.first() else { continue };
        let members = c.members_on(c.unit_of[v], h);
        let rule = c.snap.rules[ri].name().to_string();
        // The reason told is the first that holds: no room anywhere compliant, then the VM
        // itself, then this pass's budget.
        let (choice, _) = c.best_host(&members, Fit::HighWater, None);
        let kept = |why: &str| Note::ShouldRuleKept {
            vm: c.snap.vms[v].name.clone(),
            rule: rule.clone(),
            why: why.to_string(),
        };
        let Some(choice) = choice.filter(|ch| ch.broken_should.is_empty()) else {
            notes.push(kept("no compliant host has room"));
            continue;
        };
        if !movable(c, &members) {
            notes.push(kept(
                "it cannot move now (it migrated within the cooldown, or its automation is \
                 disabled)",
            ));
            continue;
        }
        if *budget == 0 {
            notes.push(kept("this pass's move budget is spent"));
            continue;
        }
        let (name, group) = c.rule_name_group(ri);
        let relation = c
            .host_rules
            .iter()
            .find(|r| r.rule == ri)
            .map(|r| r.relation)
            .unwrap_or(crate::model::VmHostRelation::ShouldRunOn);
        let reason = MoveReason::ShouldRule {
            rule: name,
            relation,
            host_group: group,
        };
        moves.extend(c.apply(&members, choice.host, 2, reason, &[]));
        *budget -= 1;
    }
}

/// The worst resource of a hot host: `(resource, demand ÷ capacity)` above high water.
fn hot(c: &Cluster, h: usize) -> Option<(usize, f64)> {
    let hw = c.cfg.high_water;
    let cpu = c.now_sum[h][CPU] / c.cap[h][CPU];
    let mem = c.now_sum[h][MEM] / c.cap[h][MEM];
    let (r, l) = if cpu - hw >= mem - hw {
        (CPU, cpu)
    } else {
        (MEM, mem)
    };
    (l > hw + 1e-9).then_some((r, l))
}

fn relieve_hot_hosts(
    c: &mut Cluster,
    moves: &mut Vec<Move>,
    notes: &mut Vec<Note>,
    budget: &mut usize,
) {
    let hw = c.cfg.high_water;
    let mut given_up = vec![false; c.cap.len()];
    loop {
        let Some((h, r, _)) = (0..c.cap.len())
            .filter(|&h| c.active[h] && !given_up[h])
            .filter_map(|h| hot(c, h).map(|(r, l)| (h, r, l)))
            .max_by(|a, b| a.2.total_cmp(&b.2).then(b.0.cmp(&a.0)))
        else {
            return;
        };
        let excess = c.now_sum[h][r] - hw * c.cap[h][r];
        let overloaded = c.now_sum[h][r] > c.cap[h][r];
        // Relieving a host over capacity is contention relief, not balancing: the move
        // cap does not stop it (the destinations' headroom bounds it).
        if *budget == 0 && !overloaded {
            return;
        }
        // Best move off h: to a host that stays below high water at its expected peak (or,
        // when h is over capacity and no such host exists, to one that stays within
        // capacity and cooler than h); most relief (capped at the excess); best net.
        let mut best: Option<((u8, f64, f64), usize, usize)> = None;
        let mut units_here: Vec<usize> = c.host_vms[h].iter().map(|&v| c.unit_of[v]).collect();
        units_here.sort_unstable();
        units_here.dedup();
        for u in units_here {
            let members = c.members_on(u, h);
            let v = members[0];
            if members.len() != c.units[u].len() || !movable(c, &members) {
                continue;
            }
            let now = c.unit_sum(u, Some(h), &c.now);
            if now[r] <= 0.0 {
                continue;
            }
            let relief = now[r].min(excess) / c.cap[h][r];
            let e = c.unit_sum(u, Some(h), &c.ent);
            let pk = c.demand_of(&members);
            for d in 0..c.cap.len() {
                if d == h || !c.active[d] {
                    continue;
                }
                let cool = c.peak_after(&pk, d).1 <= hw + 1e-9;
                let tier = if cool {
                    0
                } else if overloaded && c.fits_cooler(&pk, h, d) {
                    1
                } else {
                    continue;
                };
                let net = c.gain(e, h, d) - c.move_cost(&members, d);
                let key = (tier, -relief, -net);
                if best.is_some_and(|(k, _, _)| {
                    (k.0, k.1, k.2).partial_cmp(&key) != Some(std::cmp::Ordering::Greater)
                }) {
                    continue;
                }
                if !c.may_return(&members, d)
                    || c.check_members(&members, d).is_err()
                    || members.iter().any(|&m| !c.should_broken(m, d).is_empty())
                {
                    continue;
                }
                best = Some((key, v, d));
            }
        }
        match best {
            Some((_, v, d)) => {
                let members = c.members_on(c.unit_of[v], h);
                let reason = MoveReason::HotHost {
                    host: c.snap.hosts[h].name.clone(),
                    resource: Resource::from_index(r),
                    demand: c.now_sum[h][r],
                    capacity: c.cap[h][r],
                    high_water: hw,
                };
                moves.extend(c.apply(&members, d, 2, reason, &[]));
                if !overloaded {
                    *budget -= 1;
                }
            }
            None => {
                given_up[h] = true;
                notes.push(Note::HotUnrelieved {
                    host: c.snap.hosts[h].name.clone(),
                    resource: Resource::from_index(r),
                    load: c.now_sum[h][r] / c.cap[h][r],
                });
            }
        }
    }
}

/// Priority of a balancing move closing `gap`.
fn priority_of(gap: f64) -> u8 {
    (2..=5u8)
        .find(|&p| gap >= MIN_GAPS[usize::from(p)])
        .unwrap_or(5)
}

/// Imbalance, in multiples of the threshold's smallest gap, beyond which a pass's move
/// budget grows to what the skew needs. Measured with bench/drs: at 4× the trace's
/// office-hours surges crossed it, and the extra moves (cooling down together) left it less
/// balanced (0.0530 against 0.0501) and longer overloaded; at 8× no benchmark scenario
/// changes, while a cluster piled on one host is fixed in one pass instead of ten.
const FAR_FROM_BALANCE: f64 = 8.0;

/// Distance from the target in moves: the entitlement the hosts above the mean hold beyond
/// it, in units of an average VM's, for the resource furthest off. A skewed cluster (a
/// replayed placement, hosts back from maintenance) needs that many moves, and a pass
/// capped at a quarter of the hosts would take a day of passes to make them. Every move must still close a gap and pay
/// for itself, so the larger budget never buys a move that would not be made later anyway.
fn moves_to_mean(c: &Cluster) -> usize {
    let vms: Vec<usize> = (0..c.vm_host.len())
        .filter(|&v| c.vm_host[v].is_some_and(|h| c.active[h]))
        .collect();
    if vms.is_empty() {
        return 0;
    }
    let mut worst = 0.0f64;
    for r in [CPU, MEM] {
        let avg = vms.iter().map(|&v| c.ent[v][r]).sum::<f64>() / vms.len() as f64;
        if avg <= 0.0 {
            continue;
        }
        let mean = c.mean(r);
        let excess: f64 = (0..c.cap.len())
            .filter(|&h| c.active[h])
            .map(|h| (c.load(h, r) - mean).max(0.0) * c.cap[h][r])
            .sum();
        worst = worst.max(excess / avg);
    }
    (worst.ceil() as usize).min(vms.len())
}

fn rebalance(
    c: &mut Cluster,
    threshold: Threshold,
    moves: &mut Vec<Move>,
    notes: &mut Vec<Note>,
    budget: &mut usize,
    cap: usize,
) {
    let min_gap = threshold.min_gap();
    let start = min_gap * (1.0 + c.cfg.hysteresis);
    let mut first = true;
    loop {
        if *budget == 0 {
            notes.push(Note::MoveCapReached { cap });
            return;
        }
        let need = if first { start } else { min_gap };
        match best_balancing_move(c, need) {
            Some(m) => {
                let members = c.members_on(m.unit, m.from);
                let priority = priority_of(m.gap).max(2).min(threshold.level());
                let reason = MoveReason::Imbalance {
                    gap: m.gap,
                    min_gap,
                };
                moves.extend(c.apply(&members, m.to, priority, reason, &[]));
                *budget -= 1;
                first = false;
            }
            None if first => {
                let best_gap = best_balancing_move(c, 0.0).map_or(0.0, |m| m.gap);
                notes.push(Note::WithinBand {
                    best_gap,
                    start_above: start,
                });
                return;
            }
            None => {
                notes.push(Note::Balanced {
                    imbalance: c.imbalance(),
                    min_gap,
                });
                return;
            }
        }
    }
}

/// A candidate balancing move.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    unit: usize,
    from: usize,
    to: usize,
    gap: f64,
    net: f64,
}

/// The feasible move closing a gap of at least `min_gap` with the highest positive net
/// benefit.
fn best_balancing_move(c: &Cluster, min_gap: f64) -> Option<Candidate> {
    let w = c.weights;
    let means = [c.mean(CPU), c.mean(MEM)];
    let mut sources: Vec<(f64, usize)> = (0..c.cap.len())
        .filter(|&h| c.active[h])
        .map(|h| {
            let e: f64 = [CPU, MEM]
                .iter()
                .map(|&r| w[r] * (c.load(h, r) - means[r]).max(0.0).powi(2))
                .sum();
            (e, h)
        })
        .filter(|(e, _)| *e > 0.0)
        .collect();
    sources.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    sources.truncate(SOURCES_PER_MOVE);
    let dests: Vec<usize> = (0..c.cap.len()).filter(|&h| c.active[h]).collect();
    let horizon_s = c.cfg.benefit_horizon_s;
    let mut best: Option<Candidate> = None;
    for &(_, s) in &sources {
        for &v in &c.host_vms[s] {
            let u = c.unit_of[v];
            let (e, pk, members) = if c.units[u].len() == 1 {
                if c.cooling[v] || c.automation[v] == Automation::Disabled {
                    continue;
                }
                (c.ent[v], c.demand_of(&[v]), None)
            } else {
                // A group moves as one, considered once (from its first member).
                if c.units[u][0] != v || c.unit_host(u) != Some(s) {
                    continue;
                }
                let members = c.units[u].clone();
                if !movable(c, &members) {
                    continue;
                }
                let pk = c.demand_of(&members);
                (c.unit_sum(u, None, &c.ent), pk, Some(members))
            };
            let ms: &[usize] = members.as_deref().unwrap_or(std::slice::from_ref(&v));
            let moved = c.moved_load(e, s);
            if moved <= 0.0 {
                continue;
            }
            let duration_s: f64 = ms.iter().map(|&m| c.cost[m].duration_s).sum();
            let keep = (1.0 - duration_s / horizon_s).max(0.0);
            // gap >= min_gap  <=>  gain >= 2 · min_gap · moved.
            let min_gain = 2.0 * min_gap * moved;
            for &d in &dests {
                if d == s {
                    continue;
                }
                let g = c.gain(e, s, d);
                if g <= 0.0 || g < min_gain {
                    continue;
                }
                let net = g * keep - c.move_cost(ms, d);
                if net <= 0.0 || best.is_some_and(|b| net <= b.net) {
                    continue;
                }
                if !c.headroom_ok(&pk, s, d) {
                    continue;
                }
                if !c.may_return(ms, d)
                    || c.check_members(ms, d).is_err()
                    || ms.iter().any(|&m| !c.should_broken(m, d).is_empty())
                {
                    continue;
                }
                best = Some(Candidate {
                    unit: u,
                    from: s,
                    to: d,
                    gap: g / (2.0 * moved),
                    net,
                });
            }
        }
    }
    best
}
