//! The center's shared state: store, settings, tokens, host liveness, running task drivers.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::config::CenterConfig;
use crate::store::Db;

/// The DRS scheduler's shared state (the scheduler itself is [`crate::drs`]).
#[derive(Default)]
pub struct DrsState {
    /// Wakes the scheduler loop early (a host joined).
    pub wake: Notify,
    /// The apply task running per cluster name.
    pub(crate) applying: Mutex<HashMap<String, Uuid>>,
    /// The recommendations last recorded per cluster (recorded again only when they change).
    pub(crate) last_recorded: Mutex<HashMap<String, String>>,
}

/// What the center remembers of one host's health between heartbeats: the counters it
/// judges from (see `health`, which owns the rules).
#[derive(Debug, Clone)]
pub struct HealthTracker {
    pub(crate) cluster: Uuid,
    pub(crate) baseline: tern_api::health::HealthReport,
    pub(crate) last: tern_api::health::HealthReport,
    pub(crate) crashes: u64,
    pub(crate) disconnections: u64,
    pub(crate) pressure_since: Option<chrono::DateTime<chrono::Utc>>,
}

/// The hosts' last answers, by (datastore, host id). In memory: a restarted center asks again.
#[derive(Default)]
pub struct ReachTable {
    entries: Mutex<std::collections::BTreeMap<(String, Uuid), tern_api::datastores::HostReach>>,
}

impl ReachTable {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::BTreeMap<(String, Uuid), tern_api::datastores::HostReach>,
    > {
        // A panic while holding it leaves only answers that are re-asked anyway.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `host`'s answer; returns the reachability it replaced (`None`: first answer).
    pub(crate) fn record(
        &self,
        ds: &str,
        host: Uuid,
        reach: tern_api::datastores::HostReach,
    ) -> Option<bool> {
        self.lock()
            .insert((ds.to_string(), host), reach)
            .map(|old| old.reachable)
    }

    /// Every host's last answer for datastore `ds`, by host name.
    pub fn of_datastore(&self, ds: &str) -> Vec<tern_api::datastores::HostReach> {
        let mut out: Vec<tern_api::datastores::HostReach> = self
            .lock()
            .iter()
            .filter(|((d, _), _)| d == ds)
            .map(|(_, r)| r.clone())
            .collect();
        out.sort_by(|a, b| a.host.cmp(&b.host));
        out
    }

    /// The last known answer of host `host` for datastore `ds`.
    pub fn get(&self, ds: &str, host: Uuid) -> Option<tern_api::datastores::HostReach> {
        self.lock().get(&(ds.to_string(), host)).cloned()
    }

    pub(crate) fn forget_datastore(&self, ds: &str) {
        self.lock().retain(|(d, _), _| d != ds);
    }
}

/// Everything request handlers, task drivers and the monitor share.
pub struct App {
    pub db: Db,
    pub config: CenterConfig,
    pub admin_token: String,
    pub enrol_token: String,
    /// When each host's last heartbeat (or registration) arrived, on the monotonic clock.
    /// Only touched inside store transactions, so it changes in step with the hosts table.
    pub liveness: Mutex<HashMap<Uuid, Instant>>,
    /// When a task last ended on each VM: heartbeats sampled before that moment may arrive
    /// after it, so for a short while they do not overrule the task's outcome.
    settled: Mutex<HashMap<Uuid, Instant>>,
    /// Wakes the driver of a task when a user cancels it.
    cancels: Mutex<HashMap<Uuid, Arc<Notify>>>,
    /// Task drivers and other background work, awaited (briefly) at shutdown.
    workers: Mutex<JoinSet<()>>,
    /// The DRS scheduler's wake-up signal and running applies.
    pub drs: DrsState,
    /// Each host's health baseline and recent signals (see [`crate::health`]).
    pub health: Mutex<HashMap<Uuid, HealthTracker>>,
    /// The migration scheduler: per-host concurrent migration limits, across all tasks.
    pub slots: Arc<crate::migration_slots::MigrationSlots>,
    /// The CPU limit (MHz) the pools' division last gave each running VM under a pool
    /// limit, as its host was told (`crate::pools`).
    pub pool_limits: Mutex<HashMap<Uuid, u32>>,
    /// Connections to the agents, reused from call to call (see [`App::agent`]).
    pub http: tern_api::HttpPool,
    /// The cluster's CA and the center's certificate; `None` when the center serves plain
    /// HTTP (`--insecure-http`).
    pub pki: Option<Arc<crate::pki::CenterPki>>,
    /// What each host last said it reaches of the datastores (see `datastores`).
    pub datastore_reach: ReachTable,
    /// The live feed (`GET /api/v1/stream`): (SSE event name, JSON data), published by
    /// `stream::publisher`, one receiver per open stream.
    pub feed: tokio::sync::broadcast::Sender<(&'static str, Arc<str>)>,
    /// What `GET /metrics` reports.
    pub metrics: crate::metrics::Metrics,
    /// Host load and DRS imbalance over the last hour, for charts.
    pub history: crate::history::History,
    /// Whether this center may change anything (always, unless it is an HA standby).
    pub leadership: Arc<crate::leadership::Leadership>,
}

impl App {
    pub fn new(
        db: Db,
        config: CenterConfig,
        admin_token: String,
        enrol_token: String,
        http: tern_api::HttpPool,
        pki: Option<Arc<crate::pki::CenterPki>>,
    ) -> App {
        App {
            http,
            pki,
            datastore_reach: Default::default(),
            // A slow reader that falls this far behind is told to resync instead.
            feed: tokio::sync::broadcast::channel(1024).0,
            metrics: crate::metrics::Metrics::new(),
            history: Default::default(),
            db,
            config,
            admin_token,
            enrol_token,
            liveness: Mutex::new(HashMap::new()),
            settled: Mutex::new(HashMap::new()),
            cancels: Mutex::new(HashMap::new()),
            workers: Mutex::new(JoinSet::new()),
            drs: DrsState::default(),
            health: Mutex::new(HashMap::new()),
            slots: Arc::default(),
            pool_limits: Mutex::new(HashMap::new()),
            leadership: Arc::new(crate::leadership::Leadership::single()),
        }
    }

    /// The same app with HA mode's standing (see [`crate::leadership`]).
    pub fn with_leadership(mut self, leadership: Arc<crate::leadership::Leadership>) -> App {
        self.leadership = leadership;
        self
    }

    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(self.config.heartbeat_timeout_ms)
    }

    /// Records that a host was heard from now.
    pub fn mark_alive(&self, host: Uuid) {
        lock(&self.liveness).insert(host, Instant::now());
    }

    /// Time since a host was last heard from; a host never heard from by this process counts
    /// from `now` (a restarted center gives every host a full timeout to call in).
    pub fn silence(&self, host: Uuid) -> Duration {
        let mut map = lock(&self.liveness);
        map.entry(host).or_insert_with(Instant::now).elapsed()
    }

    /// Records that a task on `vm` just ended.
    pub fn settle(&self, vm: Uuid) {
        lock(&self.settled).insert(vm, Instant::now());
    }

    /// Whether a task ended on `vm` too recently for heartbeats to be trusted about it: two
    /// heartbeat periods, the age of a heartbeat's figures at worst.
    pub fn settling(&self, vm: Uuid) -> bool {
        let grace = Duration::from_millis(self.config.heartbeat_interval_ms.saturating_mul(2));
        let mut map = lock(&self.settled);
        map.retain(|_, t| t.elapsed() < grace);
        map.contains_key(&vm)
    }

    /// Runs background work the center waits for (a little) at shutdown.
    pub fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let mut set = lock(&self.workers);
        while set.try_join_next().is_some() {}
        set.spawn(fut);
    }

    /// Waits up to `grace` for background work, then aborts what is left; returns how many
    /// were aborted.
    pub async fn drain(&self, grace: Duration) -> usize {
        let mut set = std::mem::take(&mut *lock(&self.workers));
        let deadline = tokio::time::Instant::now() + grace;
        while !set.is_empty() {
            match tokio::time::timeout_at(deadline, set.join_next()).await {
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let left = set.len();
        set.shutdown().await;
        left
    }

    /// Records an event; a store that refuses it is logged, never an error of the caller's
    /// work (events describe it, they do not decide it).
    pub async fn add_event(&self, e: crate::store::NewEvent) {
        if let Err(err) = self
            .db
            .write(move |tx| tx.add_event(e, chrono::Utc::now()))
            .await
        {
            tracing::error!("cannot record an event: {err}");
        }
    }

    /// Registers the cancel signal of a task about to be driven.
    pub fn cancel_signal(&self, task: Uuid) -> Arc<Notify> {
        lock(&self.cancels).entry(task).or_default().clone()
    }

    pub fn forget_cancel_signal(&self, task: Uuid) {
        lock(&self.cancels).remove(&task);
    }

    /// Wakes a task's driver, if one runs; the permit is kept if it is not waiting yet.
    pub fn signal_cancel(&self, task: Uuid) {
        if let Some(n) = lock(&self.cancels).get(&task) {
            n.notify_one();
        }
    }
}

/// Locks a mutex whose data stays valid even if a holder panicked (plain maps).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Waits one `period` of a background loop; `false` once shutdown is asked (the loop ends).
pub async fn tick(
    period: std::time::Duration,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(period) => {}
        _ = shutdown.changed() => return false,
    }
    !*shutdown.borrow()
}
