//! The agent's Prometheus metrics (`GET /metrics`, text format, behind the agent token): its
//! QEMU processes by state, its migrations in progress and ended by how, the guest state it
//! sent, and the host's load as it reports it to the center.
//!
//! Every figure is read at scrape time from what the agent already keeps (the VM manager, the
//! migration slots and their counters), so a fresh registry per scrape costs nothing and can
//! never disagree with the API. Labels are bounded: VM states and migration roles, no VM ids.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{text::encode, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tern_api::{HostLoad, PowerState};

use crate::migrations::{ActiveMigrations, MigrationCounts};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndLabels {
    role: String,
    outcome: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// What one scrape reports.
pub struct Reading<'a> {
    pub vm_states: Vec<PowerState>,
    pub active: ActiveMigrations,
    pub ended: &'a MigrationCounts,
    pub load: HostLoad,
}

/// The metrics in the OpenMetrics text format.
pub fn render(r: Reading<'_>) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::with_prefix("tern_agent");

    let vms = Family::<StateLabels, Gauge>::default();
    for s in [
        PowerState::Running,
        PowerState::Paused,
        PowerState::Stopped,
        PowerState::Crashed,
    ] {
        let n = r.vm_states.iter().filter(|v| **v == s).count();
        vms.get_or_create(&StateLabels {
            state: s.to_string(),
        })
        .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    reg.register(
        "vms",
        "VMs this agent holds, by state (a running one is a QEMU process)",
        vms,
    );

    let active = Family::<RoleLabels, Gauge>::default();
    for (role, n) in [
        ("source", r.active.outgoing),
        ("destination", r.active.incoming),
    ] {
        active
            .get_or_create(&RoleLabels { role: role.into() })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    reg.register(
        "migrations_active",
        "Migrations in progress on this host, by its role in them",
        active,
    );

    let ended = Family::<EndLabels, Counter>::default();
    let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
    for (role, outcome, n) in [
        ("source", "completed", read(&r.ended.sent)),
        ("destination", "completed", read(&r.ended.received)),
        ("source", "aborted", read(&r.ended.aborted_as_source)),
        (
            "destination",
            "aborted",
            read(&r.ended.aborted_as_destination),
        ),
    ] {
        ended
            .get_or_create(&EndLabels {
                role: role.into(),
                outcome: outcome.into(),
            })
            .inc_by(n);
    }
    reg.register(
        "migrations",
        "Migrations that ended on this host since the agent started, by role and outcome",
        ended,
    );

    let from_store: Counter = Counter::default();
    from_store.inc_by(read(&r.ended.committed_from_store));
    reg.register(
        "migrations_committed_from_store",
        "Incoming migrations this host ran on the store's word because no center's commit call \
         came (its leader died after committing)",
        from_store,
    );

    let sent: Counter = Counter::default();
    sent.inc_by(read(&r.ended.bytes_sent));
    reg.register(
        "migration_sent_bytes",
        "Guest state sent by migrations that completed from this host",
        sent,
    );

    let cpu = FloatGauge::default();
    cpu.set(r.load.cpu_percent / 100.0);
    reg.register(
        "cpu_busy_ratio",
        "Host CPU busy over the last sample, 0-1",
        cpu,
    );
    let mem: Gauge = Gauge::default();
    mem.set(i64::try_from(r.load.memory_used_mib << 20).unwrap_or(i64::MAX));
    reg.register("memory_used_bytes", "Host memory in use", mem);

    let mut out = String::new();
    encode(&mut out, &reg)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_vms_by_state_and_migrations_by_outcome() {
        let ended = MigrationCounts::default();
        ended.sent.store(3, Ordering::Relaxed);
        ended.bytes_sent.store(4096, Ordering::Relaxed);
        let text = render(Reading {
            vm_states: vec![
                PowerState::Running,
                PowerState::Running,
                PowerState::Stopped,
            ],
            active: ActiveMigrations {
                outgoing: 1,
                incoming: 0,
            },
            ended: &ended,
            load: HostLoad {
                cpu_percent: 50.0,
                memory_used_mib: 1,
                memory_total_mib: 2,
                vms: vec![],
            },
        })
        .expect("encodes");
        for line in [
            "tern_agent_vms{state=\"running\"} 2",
            "tern_agent_vms{state=\"stopped\"} 1",
            "tern_agent_migrations_active{role=\"source\"} 1",
            "tern_agent_migrations_total{role=\"source\",outcome=\"completed\"} 3",
            "tern_agent_migration_sent_bytes_total 4096",
            "tern_agent_cpu_busy_ratio 0.5",
            "tern_agent_memory_used_bytes 1048576",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
