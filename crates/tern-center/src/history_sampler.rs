//! Fills [`crate::history`] each `history_period_ms`: every connected host's load and every
//! cluster's DRS imbalance.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tern_api::center::Cluster;
use tern_api::history::{ImbalanceSample, LoadSample};
use tokio::sync::watch;

use crate::app::App;
use crate::store::{HostRecord, Link, StoreError};

/// A connected host's load as a sample (none for a disconnected host or one that has not
/// reported load yet: a chart shows a gap rather than a stale figure).
fn load_sample(h: &HostRecord, at: DateTime<Utc>) -> Option<LoadSample> {
    if h.link != Link::Connected {
        return None;
    }
    let l = h.load.as_ref()?;
    let total = l.memory_total_mib.max(1) as f64;
    Some(LoadSample {
        at,
        cpu_percent: l.cpu_percent.clamp(0.0, 100.0),
        memory_used_percent: (l.memory_used_mib as f64 / total * 100.0).clamp(0.0, 100.0),
    })
}

/// Samples every host's load and every cluster's imbalance each period, until shutdown.
pub async fn sampler(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let period = Duration::from_millis(app.config.history_period_ms);
    loop {
        if !crate::app::tick(period, &mut shutdown).await {
            return;
        }
        if let Err(e) = sample(&app, period).await {
            tracing::warn!("history: {e}");
        }
    }
}

async fn sample(app: &Arc<App>, period: Duration) -> Result<(), String> {
    let (hosts, clusters) = app
        .db
        .read(|tx| {
            let clusters: Vec<(Cluster, u8)> = tx
                .clusters()?
                .into_iter()
                .map(|c| {
                    let t = tx.drs_settings(c.id)?.threshold;
                    Ok::<_, StoreError>((c, t))
                })
                .collect::<Result<_, _>>()?;
            Ok::<_, StoreError>((tx.hosts()?, clusters))
        })
        .await
        .map_err(|e| format!("center store: {e}"))?;
    let now = Utc::now();
    for h in &hosts {
        if let Some(s) = load_sample(h, now) {
            app.history.record_load(&h.name, s, period);
        }
    }
    for (c, threshold) in &clusters {
        // The same engine pass the recommendations come from, without the per-VM pre-checks
        // (they ask the hosts; a chart must not): the imbalance is the same, the target is
        // what the engine's moves would reach were every move allowed.
        let snap = crate::drs::cluster_snapshot(app, c.id, Vec::new(), None).await?;
        if snap.hosts.is_empty() {
            continue;
        }
        let threshold = tern_drs::Threshold::new(*threshold).unwrap_or_default();
        let Ok(plan) = tern_drs::balance(&snap, threshold) else {
            continue;
        };
        app.history.record_imbalance(
            &c.name,
            ImbalanceSample {
                at: now,
                imbalance: plan.imbalance_before,
                target: plan.imbalance_after,
                moves: u32::try_from(plan.moves.len()).unwrap_or(u32::MAX),
            },
            period,
        );
    }
    let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
    let cluster_names: Vec<String> = clusters.iter().map(|(c, _)| c.name.clone()).collect();
    app.history.retain(&names, &cluster_names);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disconnected_host_gives_no_sample() {
        let mut host = HostRecord::fake("h1", 4096, false);
        host.load = Some(tern_api::spec::HostLoad {
            cpu_percent: 150.0,
            memory_used_mib: 1024,
            memory_total_mib: 4096,
            vms: Vec::new(),
        });
        let s = load_sample(&host, Utc::now()).expect("a sample");
        assert_eq!(s.cpu_percent, 100.0);
        assert_eq!(s.memory_used_percent, 25.0);
        host.link = Link::Disconnected;
        assert!(load_sample(&host, Utc::now()).is_none());
    }
}
