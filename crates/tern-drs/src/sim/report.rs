//! Simulation reports as a markdown table, one row per scenario and policy.

use std::fmt::Write as _;

use crate::sim::run::SimReport;

/// A row: a scenario label and what a policy measured in it.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub report: SimReport,
}

/// Renders rows as a markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str(
        "| scenario | policy | mean imbalance | p95 imbalance | overload (% host-time) | overload host-h | migrations | GiB moved | ping-pongs | rule violations (VM-steps) | should-rule breaks | unplaced VMs | CPU refusals | pass ms mean | pass ms max |\n",
    );
    s.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let p = &r.report;
        let _ = writeln!(
            s,
            "| {} | {} | {:.4} | {:.4} | {:.3} | {:.1} | {} | {:.0} | {} | {} | {} | {} | {} | {:.2} | {:.1} |",
            r.scenario,
            p.policy,
            p.imbalance_mean,
            p.imbalance_p95,
            p.overload_fraction * 100.0,
            p.overload_host_h,
            p.migrations,
            p.moved_gib,
            p.ping_pongs,
            p.violations,
            p.should_violations,
            p.placement_failures,
            p.cpu_refused,
            p.pass_ms_mean,
            p.pass_ms_max,
        );
    }
    s
}
