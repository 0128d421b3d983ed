//! The center's Prometheus metrics (`GET /metrics`, text format): what it counts as things
//! happen (API requests, finished tasks and migrations, DRS passes) and what it reads from the
//! store at each scrape (hosts, VMs, tasks in flight, host load).
//!
//! Labels are bounded sets only: route templates (not paths), task kinds and states, host and
//! cluster names. VM names never become labels (20,000 VMs would be 20,000 series).

use prometheus_client::encoding::{text::encode, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use tern_api::center::{Task, TaskState};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    /// The matched route template (`/api/v1/vms/{name}`), or `other`.
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub kind: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostLabels {
    pub host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Every metric of the center, registered once.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Histogram>,
    tasks_finished: Family<TaskLabels, Counter>,
    migrations: Family<OutcomeLabels, Counter>,
    migration_seconds: Histogram,
    migration_downtime_seconds: Histogram,
    migration_pause_seconds: Histogram,
    migration_bytes: Histogram,
    drs_passes: Family<ClusterLabels, Counter>,
    drs_imbalance: Family<ClusterLabels, FloatGauge>,
    hosts: Family<StateLabels, Gauge>,
    vms: Family<StateLabels, Gauge>,
    tasks_active: Family<TaskLabels, Gauge>,
    host_cpu: Family<HostLabels, FloatGauge>,
    host_memory_used: Family<HostLabels, Gauge>,
    streams: Gauge,
    /// Serializes scrapes: each clears and refills the store-read gauges.
    scrape: Mutex<()>,
}

/// A scrape's reading of the store.
pub struct Reading {
    pub hosts_by_state: Vec<(String, i64)>,
    pub vms_by_state: Vec<(String, i64)>,
    pub active_tasks: Vec<(String, String, i64)>,
    /// (host, CPU busy 0–1, memory used bytes).
    pub host_load: Vec<(String, f64, i64)>,
    pub streams: i64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("tern");
        let requests = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        r.register(
            "api_request_duration_seconds",
            "API requests by route template and status",
            requests.clone(),
        );
        let tasks_finished = Family::<TaskLabels, Counter>::default();
        r.register(
            "tasks_finished",
            "Tasks that ended, by kind and end state",
            tasks_finished.clone(),
        );
        let migrations = Family::<OutcomeLabels, Counter>::default();
        r.register(
            "migrations",
            "Migrations that ended, by outcome (completed, rolled_back, failed, cancelled)",
            migrations.clone(),
        );
        let migration_seconds = Histogram::new(exponential_buckets(0.25, 2.0, 12));
        r.register(
            "migration_duration_seconds",
            "End-to-end time of completed migrations",
            migration_seconds.clone(),
        );
        let migration_downtime_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        r.register(
            "migration_downtime_seconds",
            "Guest pause of completed migrations as QEMU reports it",
            migration_downtime_seconds.clone(),
        );
        let migration_pause_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        r.register(
            "migration_pause_seconds",
            "Guest pause of completed migrations from the source's stop to the destination's \
             run, as the center measured it",
            migration_pause_seconds.clone(),
        );
        let migration_bytes = Histogram::new(exponential_buckets(1_048_576.0, 2.0, 16));
        r.register(
            "migration_bytes",
            "Bytes sent by completed migrations",
            migration_bytes.clone(),
        );
        let drs_passes = Family::<ClusterLabels, Counter>::default();
        r.register(
            "drs_passes",
            "DRS balance passes, by cluster",
            drs_passes.clone(),
        );
        let drs_imbalance = Family::<ClusterLabels, FloatGauge>::default();
        r.register(
            "drs_imbalance",
            "Load imbalance the last DRS pass found, by cluster",
            drs_imbalance.clone(),
        );
        let hosts = Family::<StateLabels, Gauge>::default();
        r.register("hosts", "Hosts by state", hosts.clone());
        let vms = Family::<StateLabels, Gauge>::default();
        r.register("vms", "VMs by actual power state", vms.clone());
        let tasks_active = Family::<TaskLabels, Gauge>::default();
        r.register(
            "tasks_active",
            "Queued and running tasks, by kind and state",
            tasks_active.clone(),
        );
        let host_cpu = Family::<HostLabels, FloatGauge>::default();
        r.register(
            "host_cpu_busy_ratio",
            "Each host's CPU busy fraction, as last reported",
            host_cpu.clone(),
        );
        let host_memory_used = Family::<HostLabels, Gauge>::default();
        r.register(
            "host_memory_used_bytes",
            "Each host's memory in use, as last reported",
            host_memory_used.clone(),
        );
        let streams = Gauge::default();
        r.register("event_streams", "Open live streams", streams.clone());
        Metrics {
            registry: r,
            requests,
            tasks_finished,
            migrations,
            migration_seconds,
            migration_downtime_seconds,
            migration_pause_seconds,
            migration_bytes,
            drs_passes,
            drs_imbalance,
            hosts,
            vms,
            tasks_active,
            host_cpu,
            host_memory_used,
            streams,
            scrape: Mutex::new(()),
        }
    }

    pub fn request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_string(),
                route: route.to_string(),
                status,
            })
            .observe(seconds);
    }

    /// A task ended: counted, and a migration's figures observed.
    pub fn task_finished(&self, t: &Task) {
        let kind = enum_text(&t.kind);
        self.tasks_finished
            .get_or_create(&TaskLabels {
                kind: kind.clone(),
                state: enum_text(&t.state),
            })
            .inc();
        if kind != "vm_migrate" {
            return;
        }
        let result = t.result.as_ref();
        let outcome = result
            .and_then(|r| r["status"].as_str())
            .map(str::to_string)
            .unwrap_or_else(|| enum_text(&t.state));
        self.migrations
            .get_or_create(&OutcomeLabels {
                outcome: outcome.clone(),
            })
            .inc();
        if t.state != TaskState::Succeeded || outcome != "completed" {
            return;
        }
        let Some(r) = result else { return };
        let ms = |k: &str| r[k].as_f64().map(|v| v / 1000.0);
        if let Some(s) = ms("total_ms") {
            self.migration_seconds.observe(s);
        }
        if let Some(s) = ms("downtime_ms") {
            self.migration_downtime_seconds.observe(s);
        }
        if let Some(s) = ms("pause_ms") {
            self.migration_pause_seconds.observe(s);
        }
        if let Some(b) = r["bytes"].as_f64() {
            self.migration_bytes.observe(b);
        }
    }

    pub fn drs_pass(&self, cluster: &str, imbalance: f64) {
        let l = ClusterLabels {
            cluster: cluster.to_string(),
        };
        self.drs_passes.get_or_create(&l).inc();
        self.drs_imbalance.get_or_create(&l).set(imbalance);
    }

    /// The text exposition, with the store-read gauges set from `reading`.
    pub fn render(&self, reading: Reading) -> Result<String, std::fmt::Error> {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        self.hosts.clear();
        for (state, n) in reading.hosts_by_state {
            self.hosts.get_or_create(&StateLabels { state }).set(n);
        }
        self.vms.clear();
        for (state, n) in reading.vms_by_state {
            self.vms.get_or_create(&StateLabels { state }).set(n);
        }
        self.tasks_active.clear();
        for (kind, state, n) in reading.active_tasks {
            self.tasks_active
                .get_or_create(&TaskLabels { kind, state })
                .set(n);
        }
        self.host_cpu.clear();
        self.host_memory_used.clear();
        for (host, cpu, mem) in reading.host_load {
            let l = HostLabels { host };
            self.host_cpu.get_or_create(&l).set(cpu);
            self.host_memory_used.get_or_create(&l).set(mem);
        }
        self.streams.set(reading.streams);
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// An enum's serde name (`vm_migrate`, `succeeded`).
fn enum_text<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_migration_moves_its_counters_and_histograms() {
        let m = Metrics::new();
        let mut t = Task::queued(
            tern_api::center::TaskKind::VmMigrate,
            Some("vm1".into()),
            Some("h1".into()),
            chrono::Utc::now(),
        );
        t.state = TaskState::Succeeded;
        t.result = Some(serde_json::json!({
            "status": "completed", "total_ms": 900, "downtime_ms": 40, "pause_ms": 60,
            "bytes": 50_000_000u64
        }));
        m.task_finished(&t);
        m.drs_pass("lab", 0.25);
        let text = m
            .render(Reading {
                hosts_by_state: vec![("connected".into(), 2)],
                vms_by_state: vec![("running".into(), 1)],
                active_tasks: vec![],
                host_load: vec![("h1".into(), 0.5, 1 << 30)],
                streams: 1,
            })
            .unwrap();
        for want in [
            "tern_migrations_total{outcome=\"completed\"} 1",
            "tern_tasks_finished_total{kind=\"vm_migrate\",state=\"succeeded\"} 1",
            "tern_migration_duration_seconds_count 1",
            "tern_migration_downtime_seconds_sum 0.04",
            "tern_drs_imbalance{cluster=\"lab\"} 0.25",
            "tern_hosts{state=\"connected\"} 2",
            "tern_host_cpu_busy_ratio{host=\"h1\"} 0.5",
            "# EOF",
        ] {
            assert!(text.contains(want), "no {want:?} in\n{text}");
        }
    }
}
