//! The last hour, for the web client's charts: each host's load and each cluster's DRS
//! imbalance, sampled every `history_period_ms` (by `history_sampler`) and kept in memory.
//!
//! Memory, not the store: these figures are for looking at (decisions read the live ones), a
//! restarted center simply starts drawing again, and 1,000 hosts sampled every 10 s for an
//! hour are 360,000 small samples (~10 MB) that would otherwise cost a write each. A
//! migration's own readings are different (they belong to its record) and live in the store
//! with its task (`migration_samples`).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tern_api::history::{DrsHistory, HostLoadHistory, ImbalanceSample, LoadSample};

/// How far back the charts look.
pub const SPAN: Duration = Duration::from_secs(3600);

/// The samples kept: per host and per cluster, oldest first, never older than [`SPAN`].
#[derive(Default)]
pub struct History {
    hosts: Mutex<HashMap<String, VecDeque<LoadSample>>>,
    clusters: Mutex<HashMap<String, VecDeque<ImbalanceSample>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding it leaves plain data behind: keep using it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Appends `sample` and drops what is older than the span (and, whatever the clocks do,
/// never keeps more than `cap`).
fn push<T>(ring: &mut VecDeque<T>, sample: T, at: impl Fn(&T) -> DateTime<Utc>, cap: usize) {
    let now = at(&sample);
    ring.push_back(sample);
    let oldest = now - chrono::Duration::from_std(SPAN).unwrap_or_default();
    while ring.front().is_some_and(|s| at(s) < oldest) || ring.len() > cap {
        ring.pop_front();
    }
}

impl History {
    /// Samples kept per series at `period`: an hour's worth, and one more.
    fn cap(period: Duration) -> usize {
        (SPAN.as_millis() / period.as_millis().max(1)) as usize + 1
    }

    pub fn record_load(&self, host: &str, sample: LoadSample, period: Duration) {
        let mut hosts = lock(&self.hosts);
        let ring = hosts.entry(host.to_string()).or_default();
        push(ring, sample, |s| s.at, Self::cap(period));
    }

    pub fn record_imbalance(&self, cluster: &str, sample: ImbalanceSample, period: Duration) {
        let mut clusters = lock(&self.clusters);
        let ring = clusters.entry(cluster.to_string()).or_default();
        push(ring, sample, |s| s.at, Self::cap(period));
    }

    /// Drops hosts and clusters no longer in the inventory.
    pub fn retain(&self, hosts: &[String], clusters: &[String]) {
        lock(&self.hosts).retain(|h, _| hosts.contains(h));
        lock(&self.clusters).retain(|c, _| clusters.contains(c));
    }

    pub fn host(&self, name: &str, period: Duration) -> HostLoadHistory {
        HostLoadHistory {
            host: name.to_string(),
            period_ms: period.as_millis() as u64,
            samples: lock(&self.hosts)
                .get(name)
                .map(|r| r.iter().cloned().collect())
                .unwrap_or_default(),
        }
    }

    pub fn cluster(&self, name: &str, threshold: u8, period: Duration) -> DrsHistory {
        DrsHistory {
            cluster: name.to_string(),
            period_ms: period.as_millis() as u64,
            threshold,
            samples: lock(&self.clusters)
                .get(name)
                .map(|r| r.iter().cloned().collect())
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(at: DateTime<Utc>, cpu: f64) -> LoadSample {
        LoadSample {
            at,
            cpu_percent: cpu,
            memory_used_percent: 10.0,
        }
    }

    #[test]
    fn keeps_the_last_hour_oldest_first() {
        let h = History::default();
        let period = Duration::from_secs(600);
        let t0 = Utc::now() - chrono::Duration::hours(2);
        for i in 0..13 {
            h.record_load(
                "h1",
                load(t0 + chrono::Duration::minutes(10 * i), i as f64),
                period,
            );
        }
        let got = h.host("h1", period);
        let cpus: Vec<f64> = got.samples.iter().map(|s| s.cpu_percent).collect();
        // 0 … 120 minutes: the samples within the hour before the newest (60 … 120).
        assert_eq!(cpus, vec![6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0]);
        assert_eq!(got.period_ms, 600_000);
        assert!(h.host("h2", period).samples.is_empty());
    }

    #[test]
    fn never_keeps_more_than_an_hour_of_periods_and_forgets_removed_hosts() {
        let h = History::default();
        let period = Duration::from_secs(60);
        let now = Utc::now();
        // A clock stuck at one instant must not grow the ring without bound.
        for _ in 0..500 {
            h.record_load("h1", load(now, 1.0), period);
        }
        assert_eq!(h.host("h1", period).samples.len(), 61);
        h.retain(&["h2".to_string()], &[]);
        assert!(h.host("h1", period).samples.is_empty());
    }
}
