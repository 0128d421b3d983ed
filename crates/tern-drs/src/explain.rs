//! Human-readable explanations of decisions: every move, placement, blocker and note in
//! words with the numbers behind it (used by `tern drs explain` and the center's events).

use std::fmt::Write as _;

use crate::decision::{
    AdmissionFailure, BalancePlan, BlockReason, Blocker, EvacuationPlan, HostRejection,
    HostSummary, Move, MoveReason, Note, Placement, Rejection, Resource,
};

fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

fn amount(r: Resource, x: f64) -> String {
    format!("{:.0} {}", x, r.unit())
}

/// Why a VM moves, in one phrase.
pub fn reason(r: &MoveReason) -> String {
    match r {
        MoveReason::HostMaintenance { host } => format!("host {host} is entering maintenance"),
        MoveReason::AntiAffinity { rule, other_vm } => {
            format!("anti-affinity rule {rule}: shares a host with {other_vm}")
        }
        MoveReason::Affinity { rule } => {
            format!("affinity rule {rule}: joins the rest of its group")
        }
        MoveReason::MustRule {
            rule,
            relation,
            host_group,
        } => format!("rule {rule}: {relation} host group {host_group}, and its host breaks it"),
        MoveReason::ReservationOvercommit {
            host,
            resource,
            reserved,
            capacity,
        } => format!(
            "host {host} has {} {resource} reserved but only {}",
            amount(*resource, *reserved),
            amount(*resource, *capacity)
        ),
        MoveReason::ShouldRule {
            rule,
            relation,
            host_group,
        } => format!("rule {rule}: {relation} host group {host_group}; a compliant host has room"),
        MoveReason::HotHost {
            host,
            resource,
            demand,
            capacity,
            high_water,
        } => format!(
            "host {host} is hot: {resource} demand {} of {} ({}, high water {})",
            amount(*resource, *demand),
            amount(*resource, *capacity),
            pct(demand / capacity),
            pct(*high_water)
        ),
        MoveReason::Imbalance { gap, min_gap } => format!(
            "balance: closes a load gap of {:.1} points between the hosts (threshold needs {:.1})",
            gap * 100.0,
            min_gap * 100.0
        ),
        MoveReason::WithGroup { rule, leader } => {
            format!("moves with {leader} (affinity rule {rule})")
        }
    }
}

/// Why a host cannot take a VM, in one phrase.
pub fn rejection(r: &Rejection) -> String {
    match r {
        Rejection::HostState { state } => format!(
            "host is {}",
            match state {
                crate::model::HostState::Maintenance => "in maintenance",
                s => state_name(*s),
            }
        ),
        Rejection::Source => "it is the source".to_string(),
        Rejection::Cpu { missing } => {
            const SHOWN: usize = 6;
            let more = missing.len().saturating_sub(SHOWN);
            let names = missing.iter().take(SHOWN).cloned().collect::<Vec<_>>();
            format!(
                "its CPU lacks {}{}",
                names.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            )
        }
        Rejection::MustRule {
            rule,
            relation,
            host_group,
        } => format!("rule {rule}: VM {relation} host group {host_group}"),
        Rejection::AntiAffinity { rule, vm } => {
            format!("anti-affinity rule {rule}: {vm} runs there")
        }
        Rejection::AffinityElsewhere { rule, host } => {
            format!("affinity rule {rule}: its group runs on {host}")
        }
        Rejection::CpuReservation {
            needed_mhz,
            unreserved_mhz,
        } => format!("CPU reservation {needed_mhz:.0} MHz > {unreserved_mhz:.0} MHz unreserved"),
        Rejection::MemoryReservation {
            needed_mib,
            unreserved_mib,
        } => format!("memory reservation {needed_mib:.0} MiB > {unreserved_mib:.0} MiB unreserved"),
        Rejection::Headroom {
            resource,
            load_after,
            limit,
        } => format!(
            "{resource} peak demand would reach {} (limit {})",
            pct(*load_after),
            pct(*limit)
        ),
        Rejection::NoGain => "no gain worth the migration".to_string(),
    }
}

fn state_name(s: crate::model::HostState) -> &'static str {
    match s {
        crate::model::HostState::Connected => "connected",
        crate::model::HostState::Maintenance => "maintenance",
        crate::model::HostState::Disconnected => "disconnected",
        crate::model::HostState::Degraded => "degraded",
    }
}

/// Rejections grouped by phrase: "h1, h2: reason; h3: reason".
pub fn rejections(list: &[HostRejection]) -> String {
    let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
    for r in list {
        let text = rejection(&r.rejection);
        match groups.iter_mut().find(|(t, _)| *t == text) {
            Some((_, hosts)) => hosts.push(&r.host),
            None => groups.push((text, vec![&r.host])),
        }
    }
    if groups.is_empty() {
        return "no usable host".to_string();
    }
    groups
        .iter()
        .map(|(t, hosts)| format!("{}: {t}", hosts.join(", ")))
        .collect::<Vec<_>>()
        .join("; ")
}

/// One move: what, why, and the numbers.
pub fn move_line(m: &Move) -> String {
    let n = &m.numbers;
    let mut s = format!(
        "[P{}] {}: {} -> {}{} — {}.",
        m.priority,
        m.vm,
        m.from_host,
        m.to_host,
        if m.automatic { "" } else { " (recommendation)" },
        reason(&m.reason)
    );
    let _ = write!(
        s,
        "\n      imbalance {:.4} -> {:.4}; gain {:.5} (gap {:.1} pts), benefit {:.5}, cost {:.5} ({:.1} GiB in {:.1} s{}), net {:+.5}",
        n.imbalance_before,
        n.imbalance_after,
        n.gain,
        n.gap * 100.0,
        n.benefit,
        n.cost,
        n.migration.copied_mib / 1024.0,
        n.migration.duration_s,
        if n.migration.throttled { ", throttled" } else { "" },
        n.net
    );
    let _ = write!(
        s,
        "\n      {} CPU {} -> {}, mem {} -> {};  {} CPU {} -> {}, mem {} -> {} (peak CPU {}, mem {})",
        m.from_host,
        pct(n.source_before.cpu),
        pct(n.source_after.cpu),
        pct(n.source_before.memory),
        pct(n.source_after.memory),
        m.to_host,
        pct(n.dest_before.cpu),
        pct(n.dest_after.cpu),
        pct(n.dest_before.memory),
        pct(n.dest_after.memory),
        pct(n.dest_peak_after.cpu),
        pct(n.dest_peak_after.memory),
    );
    if !m.broken_should_rules.is_empty() {
        let _ = write!(
            s,
            "\n      breaks should-rule(s) {}: no compliant host has room",
            m.broken_should_rules.join(", ")
        );
    }
    s
}

/// A blocker in words.
pub fn blocker(b: &Blocker) -> String {
    match &b.reason {
        BlockReason::AutomationDisabled { why_move } => format!(
            "{} on {} cannot move ({}): DRS automation is disabled for it — move it by hand",
            b.vm,
            b.host,
            reason(why_move)
        ),
        BlockReason::NoHost { why_move, hosts } => format!(
            "{} on {} cannot move ({}): {}",
            b.vm,
            b.host,
            reason(why_move),
            rejections(hosts)
        ),
    }
}

/// A note in words.
pub fn note(n: &Note) -> String {
    match n {
        Note::WithinBand {
            best_gap,
            start_above,
        } => format!(
            "balanced enough: the best move closes a gap of {:.1} points; a pass starts balancing above {:.1} (hysteresis)",
            best_gap * 100.0,
            start_above * 100.0
        ),
        Note::Balanced { imbalance, min_gap } => format!(
            "balanced at imbalance {imbalance:.4}: no further move closes a gap of {:.1} points and gains more than it costs",
            min_gap * 100.0
        ),
        Note::MoveCapReached { cap } => format!("stopped at the cap of {cap} balancing moves per pass"),
        Note::CoolingDown { vms, cooldown_s } => {
            format!("{vms} VM(s) migrated within the last {cooldown_s} s: not moved (cooldown)")
        }
        Note::HotUnrelieved {
            host,
            resource,
            load,
        } => format!(
            "host {host} is hot ({resource} demand {}) and no VM can move off it without making another host hot",
            pct(*load)
        ),
        Note::Blocked(b) => format!("blocked: {}", blocker(b)),
        Note::ShouldRuleKept { vm, rule, why } => {
            format!("{vm} still breaks should-rule {rule}: {why}")
        }
    }
}

fn host_table(s: &mut String, hosts: &[HostSummary]) {
    let _ = writeln!(
        s,
        "  {:<16} {:<12} {:>5} {:>5}  {:>7} {:>7}  {:>7} {:>7}  {:>7} {:>7}",
        "host", "state", "vms", "after", "cpu", "after", "mem", "after", "cpu dem", "mem dem"
    );
    for h in hosts {
        let _ = writeln!(
            s,
            "  {:<16} {:<12} {:>5} {:>5}  {:>7} {:>7}  {:>7} {:>7}  {:>7} {:>7}",
            h.host,
            state_name(h.state),
            h.vms_before,
            h.vms_after,
            pct(h.load_before.cpu),
            pct(h.load_after.cpu),
            pct(h.load_before.memory),
            pct(h.load_after.memory),
            pct(h.demand_after.cpu),
            pct(h.demand_after.memory),
        );
    }
}

/// A balancing pass: summary, host loads, moves, notes.
pub fn balance_plan(p: &BalancePlan) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "DRS pass at threshold {} ({}): imbalance {:.4} -> {:.4}, {} move(s)",
        p.threshold,
        if p.min_gap.is_finite() {
            format!(
                "balancing moves close gaps of {:.1}+ load points",
                p.min_gap * 100.0
            )
        } else {
            "mandatory moves only".to_string()
        },
        p.imbalance_before,
        p.imbalance_after,
        p.moves.len()
    );
    let _ = writeln!(s, "\nHosts (load = entitlement / capacity):");
    host_table(&mut s, &p.hosts);
    if !p.moves.is_empty() {
        let _ = writeln!(s, "\nMoves, in order:");
        for (i, m) in p.moves.iter().enumerate() {
            let _ = writeln!(s, "  {:>3}. {}", i + 1, move_line(m));
        }
    }
    if !p.notes.is_empty() {
        let _ = writeln!(s, "\nNotes:");
        for n in &p.notes {
            let _ = writeln!(s, "  - {}", note(n));
        }
    }
    s
}

/// A maintenance plan: steps with their schedule, blockers.
pub fn evacuation_plan(p: &EvacuationPlan) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Evacuation of {}: {} move(s), {} blocker(s), about {:.0} s; imbalance of the other hosts {:.4} -> {:.4}",
        p.host,
        p.steps.len(),
        p.blockers.len(),
        p.duration_s,
        p.imbalance_before,
        p.imbalance_after
    );
    let _ = writeln!(s, "\nHosts:");
    host_table(&mut s, &p.hosts);
    if !p.steps.is_empty() {
        let _ = writeln!(s, "\nSteps (start..end s from plan start):");
        for (i, st) in p.steps.iter().enumerate() {
            let _ = writeln!(
                s,
                "  {:>3}. [{:>6.1}..{:>6.1}] {}",
                i + 1,
                st.start_s,
                st.end_s,
                move_line(&st.migration)
            );
        }
    }
    if !p.blockers.is_empty() {
        let _ = writeln!(
            s,
            "\nBlockers (the host is not empty until these are resolved):"
        );
        for b in &p.blockers {
            let _ = writeln!(s, "  - {}", blocker(b));
        }
    }
    s
}

/// A placement in words.
pub fn placement(p: &Placement) -> String {
    let mut s = format!(
        "{} -> {}{}: lowest imbalance after placement ({:.4} -> {:.4}); {} then at CPU {}, memory {} (peak CPU {}, memory {})",
        p.vm,
        p.host,
        if p.automatic { "" } else { " (recommendation)" },
        p.imbalance_before,
        p.imbalance_after,
        p.host,
        pct(p.host_after.cpu),
        pct(p.host_after.memory),
        pct(p.host_peak_after.cpu),
        pct(p.host_peak_after.memory),
    );
    if p.over_high_water {
        s.push_str("\n  warning: no host has room for its peak demand below the high-water mark");
    }
    if !p.broken_should_rules.is_empty() {
        let _ = write!(
            s,
            "\n  breaks should-rule(s) {}: no compliant host has room",
            p.broken_should_rules.join(", ")
        );
    }
    if !p.alternatives.is_empty() {
        let alts: Vec<String> = p
            .alternatives
            .iter()
            .map(|(h, i)| format!("{h} ({i:.4})"))
            .collect();
        let _ = write!(s, "\n  next best: {}", alts.join(", "));
    }
    if !p.rejected.is_empty() {
        let _ = write!(s, "\n  not eligible: {}", rejections(&p.rejected));
    }
    s.push('\n');
    s
}

/// An admission failure in words.
pub fn admission_failure(f: &AdmissionFailure) -> String {
    if let Some(p) = &f.pool {
        return format!(
            "cannot place {}: pool {} cannot admit its {} reservation of {} ({} available; {})",
            f.vm,
            p.pool,
            p.resource,
            amount(p.resource, p.needed),
            amount(p.resource, p.available),
            match p.why.as_str() {
                "cluster" => "the cluster has no more unreserved capacity",
                "not expandable" => "the pool's reservation is not expandable",
                _ => "it would exceed the pool's limit",
            }
        );
    }
    format!("cannot place {}: {}", f.vm, rejections(&f.hosts))
}
