//! The center's store: the SQLite schema, its migrations and the typed API over it (the only
//! place SQL lives).
//!
//! Access model: one connection behind a mutex, used from `spawn_blocking` ([`Db`]). SQLite
//! serialises writers anyway, so a pool would buy nothing for writes; one connection lets every
//! API call run its checks and changes (and the events that record them) in one transaction
//! written as a plain closure over [`Tx`], which makes "bad input never changes the store" and
//! "no duplicate name or MAC" hold under concurrent calls. Inventory queries are small, so the
//! lock is held for well under a millisecond in practice.

pub mod replica;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{params, OptionalExtension, Row, TransactionBehavior};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use tern_api::center::{
    ApiToken, Cluster, Event, EventLevel, Host, HostCertificate, Role, StopVm, Task, TaskState, Vm,
};
use tern_api::drs::{DrsAutomation, DrsRule, DrsSettings, DRS_THRESHOLDS};
use tern_api::health::HostHealth;
use tern_api::migration::MigrationEncryption;
use tern_api::pools::PoolSettings;
use tern_api::{HostFacts, HostLoad, HostState, PowerState, VmSpec};

/// Ordered schema migrations; `PRAGMA user_version` counts how many have been applied.
/// Append only: never edit a migration that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: the inventory, tasks and events.
    r#"
    CREATE TABLE clusters (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        evc_mode    TEXT,
        created_at  TEXT NOT NULL
    );
    CREATE TABLE hosts (
        id              TEXT PRIMARY KEY,
        name            TEXT NOT NULL UNIQUE,
        cluster_id      TEXT NOT NULL REFERENCES clusters(id),
        link            TEXT NOT NULL,          -- connected | disconnected
        maintenance     INTEGER NOT NULL DEFAULT 0,
        agent_url       TEXT NOT NULL,
        agent_token     TEXT NOT NULL,
        host_token      TEXT NOT NULL,
        facts           TEXT NOT NULL,          -- HostFacts JSON
        load            TEXT,                   -- HostLoad JSON
        last_heartbeat  TEXT,
        registered_at   TEXT NOT NULL
    );
    CREATE TABLE vms (
        id              TEXT PRIMARY KEY,
        name            TEXT NOT NULL UNIQUE,
        cluster_id      TEXT NOT NULL REFERENCES clusters(id),
        host_id         TEXT REFERENCES hosts(id),
        spec            TEXT NOT NULL,          -- VmSpec JSON
        desired_state   TEXT NOT NULL,
        actual_state    TEXT NOT NULL,
        generation      INTEGER NOT NULL,
        created_at      TEXT NOT NULL
    );
    CREATE INDEX vms_host ON vms(host_id);
    -- One row per NIC: the primary key keeps MACs unique across all VMs.
    CREATE TABLE vm_macs (
        mac     TEXT PRIMARY KEY,
        vm_id   TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE
    );
    CREATE TABLE tasks (
        id          TEXT PRIMARY KEY,
        kind        TEXT NOT NULL,
        vm_id       TEXT,                       -- kept after the VM is deleted (history)
        vm_name     TEXT,
        host_name   TEXT,
        state       TEXT NOT NULL,
        progress    INTEGER NOT NULL,
        phase       TEXT NOT NULL,
        intent      TEXT NOT NULL,              -- TaskIntent JSON: what to undo on failure
        result      TEXT,
        error       TEXT,
        created_at  TEXT NOT NULL,
        finished_at TEXT
    );
    CREATE INDEX tasks_vm ON tasks(vm_id);
    CREATE INDEX tasks_state ON tasks(state);
    CREATE TABLE events (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        time    TEXT NOT NULL,
        level   TEXT NOT NULL,
        message TEXT NOT NULL,
        vm      TEXT,
        host    TEXT,
        task    TEXT
    );
    CREATE INDEX events_vm ON events(vm);
    CREATE INDEX events_host ON events(host);
    "#,
    // 2: EVC: the CPU each VM was resolved to (at creation) and last powered on with.
    r#"
    CREATE TABLE vm_cpus (
        vm_id       TEXT PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
        cpu         TEXT NOT NULL,              -- tern_cpu::VmCpu JSON
        host        TEXT NOT NULL,              -- host it was resolved on
        powered_on  INTEGER NOT NULL,           -- 1 once the VM was started with it
        updated_at  TEXT NOT NULL
    );
    "#,
    // 3: live migrations: the ownership record of each hand-over (intent first, outcome last).
    r#"
    CREATE TABLE migrations (
        task_id         TEXT PRIMARY KEY,
        vm_id           TEXT NOT NULL,
        vm_name         TEXT NOT NULL,
        source_host_id  TEXT NOT NULL,
        dest_host_id    TEXT NOT NULL,
        generation_from INTEGER NOT NULL,
        generation_to   INTEGER NOT NULL,
        state           TEXT NOT NULL,          -- preparing | switching | committed | done | rolled_back
        detail          TEXT,                   -- JSON: settings and measurements
        created_at      TEXT NOT NULL,
        updated_at      TEXT NOT NULL
    );
    CREATE INDEX migrations_state ON migrations(state);
    "#,
    // 4: per-cluster DRS settings (a cluster without a row has the defaults).
    r#"
    CREATE TABLE cluster_drs (
        cluster_id  TEXT PRIMARY KEY REFERENCES clusters(id) ON DELETE CASCADE,
        automation  TEXT NOT NULL,              -- manual | partially | fully
        threshold   INTEGER NOT NULL,           -- 1..5
        updated_at  TEXT NOT NULL
    );
    "#,
    // 5: named API tokens with a role (only a hash of each secret is kept), and who asked
    // for what in the event log.
    r#"
    CREATE TABLE api_tokens (
        name        TEXT PRIMARY KEY,
        role        TEXT NOT NULL,              -- viewer | operator | admin
        hash        TEXT NOT NULL UNIQUE,       -- SHA-256 of the token, hex
        created_at  TEXT NOT NULL,
        created_by  TEXT NOT NULL
    );
    ALTER TABLE events ADD COLUMN actor TEXT;
    "#,
    // 6: one-time join tokens, each bound to the host name it may register; from here on
    // hosts.host_token holds the SHA-256 of the host's secret, not the secret.
    r#"
    CREATE TABLE join_tokens (
        hash        TEXT PRIMARY KEY,           -- SHA-256 of the token, hex
        host_name   TEXT NOT NULL,
        expires_at  TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        created_by  TEXT NOT NULL
    );
    "#,
    // 7: each cluster's migration encryption policy.
    r#"
    ALTER TABLE clusters ADD COLUMN migration_encryption TEXT NOT NULL DEFAULT 'required';
    "#,
    // 8: the one certificate of each host the center accepts (the last it issued): an older
    // one, or any after the host is removed, is refused.
    r#"
    CREATE TABLE host_certs (
        host_name   TEXT PRIMARY KEY,
        serial      TEXT NOT NULL,              -- hex
        not_after   TEXT NOT NULL,
        issued_at   TEXT NOT NULL
    );
    "#,
    // 9: DRS placement rules (affinity, anti-affinity, VM-host), one cluster each.
    r#"
    CREATE TABLE drs_rules (
        name        TEXT PRIMARY KEY,
        cluster_id  TEXT NOT NULL REFERENCES clusters(id),
        rule        TEXT NOT NULL,              -- DrsRule JSON
        created_at  TEXT NOT NULL
    );
    "#,
    // 10: host health (why a host is degraded, sticky until an operator restores it) and each
    // cluster's proactive mode (what happens to a degraded host's VMs).
    r#"
    ALTER TABLE hosts ADD COLUMN health TEXT;   -- HostHealth JSON; NULL: never judged
    ALTER TABLE cluster_drs ADD COLUMN proactive TEXT NOT NULL DEFAULT 'off';
    "#,
    // 11: resource pools (a tree per cluster) and each VM's pool.
    r#"
    CREATE TABLE resource_pools (
        name        TEXT PRIMARY KEY,
        cluster_id  TEXT NOT NULL REFERENCES clusters(id),
        settings    TEXT NOT NULL,              -- PoolSettings JSON
        created_at  TEXT NOT NULL
    );
    ALTER TABLE vms ADD COLUMN pool TEXT REFERENCES resource_pools(name);
    "#,
    // 12: the image catalogue, and the image each VM's disk was made from.
    r#"
    CREATE TABLE images (
        name          TEXT PRIMARY KEY,
        record        TEXT NOT NULL              -- Image JSON (used_by left empty)
    );
    ALTER TABLE vms ADD COLUMN image TEXT REFERENCES images(name);
    "#,
    // 13: the datastore catalogue (which VMs use one is read from their specs).
    r#"
    CREATE TABLE datastores (
        name          TEXT PRIMARY KEY,
        record        TEXT NOT NULL              -- Datastore JSON (used_by, hosts left empty)
    );
    "#,
    // 14: a migration's pre-copy readings, for its timeline chart.
    r#"
    CREATE TABLE migration_samples (
        task_id TEXT NOT NULL REFERENCES tasks(id) ON DELETE CASCADE,
        seq     INTEGER NOT NULL,
        sample  TEXT NOT NULL,                  -- MigrationSample JSON
        PRIMARY KEY (task_id, seq)
    );
    "#,
];

/// Most rows one prune call deletes of each kind: a pass is repeated until nothing goes, and
/// each stays one etcd transaction in HA mode (2 × 60 rows, under etcd's 128 operations).
pub const PRUNE_BATCH: u32 = 60;

/// Most pre-copy readings kept per migration (at one per 0.5 s: over 16 minutes of pre-copy;
/// a longer one keeps its first readings and its end shows in its result).
pub const MAX_MIGRATION_SAMPLES: u32 = 2000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store holds a bad record ({0}); the database may have been edited by hand")]
    Corrupt(String),
    #[error(
        "the store {path} has schema version {found}, newer than this tern knows ({known}); \
         run a newer tern"
    )]
    TooNew {
        path: String,
        found: u32,
        known: u32,
    },
    #[error("store worker failed: {0}")]
    Worker(String),
    /// HA mode: this center does not lead (or no longer does), so it changes nothing.
    #[error("{0}")]
    NotLeader(String),
    /// HA mode: the shared store (etcd) did not take the change.
    #[error("the shared store: {0}")]
    Shared(String),
    /// HA mode: the shared store took a change this center's copy then refused.
    #[error("this center's copy of the store diverged from the shared store: {0}")]
    Diverged(String),
}

/// Connection state of a host (maintenance is a separate flag, so it survives a disconnect).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    Connected,
    Disconnected,
}

/// A VM as listings filter it (see [`Tx::vm_index`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmIndexRow {
    pub name: String,
    pub cluster: String,
    pub host: Option<String>,
    /// As stored (`running`, `stopped`, …).
    pub actual_state: String,
}

/// A host as stored, secrets included (never sent to users as is: see [`HostRecord::to_api`]).
#[derive(Debug, Clone, PartialEq)]
pub struct HostRecord {
    pub id: Uuid,
    pub name: String,
    pub cluster_id: Uuid,
    pub cluster: String,
    pub link: Link,
    pub maintenance: bool,
    pub agent_url: String,
    pub agent_token: String,
    pub host_token: String,
    pub facts: HostFacts,
    pub load: Option<HostLoad>,
    pub last_heartbeat: Option<DateTime<Utc>>,
    /// Why the host is degraded, if it is, and its last health counters.
    pub health: HostHealth,
}

impl HostRecord {
    /// A connected host of cluster `lab` with 4 cores, for unit tests.
    #[cfg(test)]
    pub fn fake(name: &str, memory_mib: u64, maintenance: bool) -> HostRecord {
        HostRecord {
            id: Uuid::new_v4(),
            name: name.into(),
            cluster_id: Uuid::nil(),
            cluster: "lab".into(),
            link: Link::Connected,
            maintenance,
            agent_url: "http://127.0.0.1:1".into(),
            agent_token: "a".into(),
            host_token: "h".into(),
            facts: HostFacts {
                hostname: name.into(),
                ..tern_testkit::fixtures::host_facts(4, memory_mib)
            },
            load: None,
            last_heartbeat: None,
            health: HostHealth::default(),
        }
    }

    pub fn state(&self) -> HostState {
        match (self.link, self.maintenance) {
            (Link::Disconnected, _) => HostState::Disconnected,
            (Link::Connected, true) => HostState::Maintenance,
            (Link::Connected, false) => HostState::Connected,
        }
    }

    /// Connected, not in maintenance and not degraded: may receive new VMs and start them.
    pub fn usable(&self) -> bool {
        self.state() == HostState::Connected && !self.health.is_degraded()
    }

    pub fn to_api(&self, vms: Vec<String>) -> Host {
        Host {
            id: self.id,
            name: self.name.clone(),
            cluster: self.cluster.clone(),
            state: self.state(),
            agent_url: self.agent_url.clone(),
            facts: self.facts.clone(),
            load: self.load.clone(),
            last_heartbeat: self.last_heartbeat,
            vms,
            problems: self.problems(),
            health: self.health.clone(),
            certificate: None,
        }
    }

    /// What keeps the host from doing all its work (see [`Host::problems`]).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.facts.cpu.is_none() {
            out.push(
                "CPU capability unknown: its agent could not probe QEMU yet and keeps retrying; \
                 until then no VM migrates to it and clusters with an EVC mode refuse it"
                    .to_string(),
            );
        }
        if tern_motion::QemuVersion::parse(&self.facts.qemu_version).is_none() {
            out.push(format!(
                "QEMU version unknown ({:?}): no VM migrates to or from it until its agent \
                 reports one",
                self.facts.qemu_version
            ));
        }
        out
    }
}

/// A VM as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct VmRecord {
    pub id: Uuid,
    pub cluster_id: Uuid,
    pub cluster: String,
    pub host_id: Option<Uuid>,
    pub host: Option<String>,
    pub spec: VmSpec,
    pub desired: PowerState,
    pub actual: PowerState,
    pub generation: u64,
    pub created_at: DateTime<Utc>,
    /// Resource pool (`None`: the cluster's root).
    pub pool: Option<String>,
}

impl VmRecord {
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn to_api(&self) -> Vm {
        Vm {
            id: self.id,
            spec: self.spec.clone(),
            cluster: self.cluster.clone(),
            host: self.host.clone(),
            desired_state: self.desired,
            actual_state: self.actual,
            generation: self.generation,
            created_at: self.created_at,
            cpu: None,
            pool: self.pool.clone(),
            effective_resources: None,
        }
    }
}

/// The CPU a VM was resolved to (EVC): at creation, then again at each power-on.
#[derive(Debug, Clone, PartialEq)]
pub struct VmCpuRow {
    pub cpu: tern_cpu::VmCpu,
    /// Host it was resolved on.
    pub host: String,
    /// True once the VM was started with it.
    pub powered_on: bool,
}

/// What a task set out to do, recorded before it acts, so whoever ends it (its driver, a
/// cancel, a restarted center) knows what to undo.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskIntent {
    /// The VM's desired state before the task changed it.
    pub previous_desired: Option<PowerState>,
    /// Arguments of a stop.
    pub stop: Option<StopVm>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord {
    pub task: Task,
    pub vm_id: Option<Uuid>,
    pub intent: TaskIntent,
}

/// An event to record; `Tx::add_event` stamps it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub level: EventLevel,
    pub message: String,
    pub vm: Option<String>,
    pub host: Option<String>,
    pub task: Option<Uuid>,
    pub actor: Option<String>,
}

impl NewEvent {
    pub fn new(level: EventLevel, message: impl Into<String>) -> NewEvent {
        NewEvent {
            level,
            message: message.into(),
            vm: None,
            host: None,
            task: None,
            actor: None,
        }
    }
    /// Who asked for it (an API token's name).
    pub fn actor(mut self, name: impl Into<String>) -> NewEvent {
        self.actor = Some(name.into());
        self
    }
    pub fn info(message: impl Into<String>) -> NewEvent {
        NewEvent::new(EventLevel::Info, message)
    }
    pub fn warning(message: impl Into<String>) -> NewEvent {
        NewEvent::new(EventLevel::Warning, message)
    }
    pub fn error(message: impl Into<String>) -> NewEvent {
        NewEvent::new(EventLevel::Error, message)
    }
    pub fn vm(mut self, name: impl Into<String>) -> NewEvent {
        self.vm = Some(name.into());
        self
    }
    pub fn host(mut self, name: Option<impl Into<String>>) -> NewEvent {
        self.host = name.map(Into::into);
        self
    }
    pub fn task(mut self, id: Uuid) -> NewEvent {
        self.task = Some(id);
        self
    }
}

/// Which events to list: the newest `limit` matching ones, returned oldest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFilter {
    pub limit: u32,
    pub vm: Option<String>,
    pub host: Option<String>,
}

/// The SQLite store (synchronous; see [`Db`] for the async handle).
pub struct Store {
    conn: rusqlite::Connection,
    /// In HA mode: where each write transaction's rows go before SQLite commits them.
    replication: Option<Replication>,
}

/// Where a replicated store sends the rows each write transaction changed. `commit` returns
/// once they are durable in the shared store, or fails, and then the transaction rolls back.
pub trait CommitSink: Send {
    fn commit(&self, changes: Vec<replica::RowChange>) -> Result<(), StoreError>;
}

struct Replication {
    schema: replica::Schema,
    sink: Box<dyn CommitSink>,
}

impl Store {
    /// Opens (creating if needed) the store at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = rusqlite::Connection::open(path)?;
        // WAL: readers never block the writer and commits are one fsync of the log.
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(mode, "SQLite refused WAL mode; continuing");
        }
        Self::setup(conn, &path.display().to_string())
    }

    /// A store in memory (tests).
    pub fn open_in_memory() -> Result<Store, StoreError> {
        Self::setup(rusqlite::Connection::open_in_memory()?, ":memory:")
    }

    fn setup(conn: rusqlite::Connection, name: &str) -> Result<Store, StoreError> {
        conn.execute_batch(
            "PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;",
        )?;
        let mut store = Store {
            conn,
            replication: None,
        };
        store.migrate(name)?;
        Ok(store)
    }

    fn migrate(&mut self, name: &str) -> Result<(), StoreError> {
        let version = self.schema_version()?;
        let known = MIGRATIONS.len() as u32;
        if version > known {
            return Err(StoreError::TooNew {
                path: name.to_string(),
                found: version,
                known,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Exclusive)?;
            tx.execute_batch(sql)?;
            // user_version cannot take a bound parameter; the value is our own integer.
            tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))?;
            tx.commit()?;
            tracing::info!(store = name, version = i + 1, "applied store migration");
        }
        Ok(())
    }

    /// Number of migrations applied.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        Ok(self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    /// Runs `f` in a read transaction (a consistent snapshot).
    pub fn read<R, E: From<StoreError>>(
        &mut self,
        f: impl FnOnce(&Tx) -> Result<R, E>,
    ) -> Result<R, E> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(StoreError::from)?;
        f(&Tx { tx })
    }

    /// Runs `f` in a write transaction, committed if `f` returns `Ok`, rolled back otherwise.
    pub fn write<R, E: From<StoreError>>(
        &mut self,
        f: impl FnOnce(&Tx) -> Result<R, E>,
    ) -> Result<R, E> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(StoreError::from)?;
        let tx = Tx { tx };
        let out = f(&tx)?;
        let Some(replication) = &self.replication else {
            tx.tx.commit().map_err(StoreError::from)?;
            return Ok(out);
        };
        let changes = replica::Schema::take_changes(&tx.tx)?;
        if changes.is_empty() {
            tx.tx.commit().map_err(StoreError::from)?;
            return Ok(out);
        }
        replication.sink.commit(changes)?;
        if let Err(e) = tx.tx.commit() {
            // The shared store has rows this copy could not keep: the copy is wrong from here
            // on, and only a reload from the shared store mends it. A center restarts for that.
            tracing::error!("the shared store took a change this center's copy refused: {e}");
            return Err(StoreError::Diverged(e.to_string()).into());
        }
        Ok(out)
    }

    /// Makes this store a replica: its write transactions send their rows to `sink` first.
    pub fn replicate_to(&mut self, sink: Box<dyn CommitSink>) -> Result<(), StoreError> {
        let schema = replica::Schema::read(&self.conn)?;
        schema.install_capture(&self.conn)?;
        self.replication = Some(Replication { schema, sink });
        Ok(())
    }

    /// The replicated tables' shapes.
    pub fn replica_schema(&self) -> Result<replica::Schema, StoreError> {
        replica::Schema::read(&self.conn)
    }

    /// Applies rows the leader committed (one revision of the shared store), or with `reload`
    /// replaces every replicated row with `changes` (a first load, or after falling behind).
    pub fn apply_replicated(
        &mut self,
        changes: &[replica::RowChange],
        reload: bool,
    ) -> Result<(), StoreError> {
        let schema = match &self.replication {
            Some(r) => r.schema.clone(),
            None => replica::Schema::read(&self.conn)?,
        };
        // Rows arrive in any order within a revision, so foreign keys are checked by the
        // leader only; the pragma cannot change inside a transaction.
        self.conn.execute_batch("PRAGMA foreign_keys = OFF")?;
        let r = (|| -> Result<(), StoreError> {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            if reload {
                schema.load(&tx, changes)?;
            } else {
                schema.apply(&tx, changes)?;
            }
            if replica::capturing(&tx)? {
                tx.execute("DELETE FROM temp.tern_changes", [])?;
            }
            tx.commit()?;
            Ok(())
        })();
        self.conn.execute_batch("PRAGMA foreign_keys = ON")?;
        r
    }

    /// Every replicated row (tests compare replicas with it).
    pub fn replicated_rows(&self) -> Result<Vec<replica::RowChange>, StoreError> {
        replica::Schema::read(&self.conn)?.dump(&self.conn)
    }
}

/// Async handle on the store: runs closures over a [`Tx`] on the blocking pool.
#[derive(Clone)]
pub struct Db {
    store: Arc<Mutex<Store>>,
}

impl Db {
    pub fn new(store: Store) -> Db {
        Db {
            store: Arc::new(Mutex::new(store)),
        }
    }

    pub async fn read<R, E>(
        &self,
        f: impl FnOnce(&Tx) -> Result<R, E> + Send + 'static,
    ) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.run(move |s| s.read(f)).await
    }

    pub async fn write<R, E>(
        &self,
        f: impl FnOnce(&Tx) -> Result<R, E> + Send + 'static,
    ) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        self.run(move |s| s.write(f)).await
    }

    /// Runs `f` on the store itself (outside any transaction) on the blocking pool.
    pub async fn run<R, E>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<R, E> + Send + 'static,
    ) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            // A panic inside a closure rolled its transaction back when it unwound, so the
            // connection behind a poisoned lock is still sound.
            let mut guard = store.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| E::from(StoreError::Worker(e.to_string())))?
    }
}

/// One transaction: every query and change of the store.
pub struct Tx<'c> {
    tx: rusqlite::Transaction<'c>,
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn parse_ts(s: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt(format!("time {s:?}: {e}")))
}

fn parse_uuid(s: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(s).map_err(|e| StoreError::Corrupt(format!("id {s:?}: {e}")))
}

fn to_json<T: Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(format!("encoding: {e}")))
}

fn from_json<T: DeserializeOwned>(what: &str, s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// Text of a unit enum as serde names it (`"running"`), which is what the columns hold.
fn enum_text<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        other => format!("{other:?}"),
    }
}

fn token_row(c: &[Option<String>; 4]) -> Result<ApiToken, StoreError> {
    let role = need(&c[1], "token role")?;
    Ok(ApiToken {
        name: need(&c[0], "token name")?.to_string(),
        role: role
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("token role {role:?}")))?,
        created_at: parse_ts(need(&c[2], "token creation time")?)?,
        created_by: need(&c[3], "token creator")?.to_string(),
    })
}

fn parse_enum<T: DeserializeOwned>(what: &str, s: &str) -> Result<T, StoreError> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| StoreError::Corrupt(format!("{what} {s:?}")))
}

const HOST_COLUMNS: &str = "h.id, h.name, h.cluster_id, c.name, h.link, h.maintenance, \
     h.agent_url, h.agent_token, h.host_token, h.facts, h.load, h.last_heartbeat, h.health";

const VM_COLUMNS: &str = "v.id, v.cluster_id, c.name, v.host_id, h.name, v.spec, \
     v.desired_state, v.actual_state, v.generation, v.created_at, v.pool";

const TASK_COLUMNS: &str = "id, kind, vm_id, vm_name, host_name, state, progress, phase, \
     intent, result, error, created_at, finished_at";

/// Raw text columns of one row, decoded outside rusqlite's error type.
struct HostRow([Option<String>; 13]);
struct VmRow([Option<String>; 11]);
struct TaskRow([Option<String>; 13]);

fn text_cols<const N: usize>(r: &Row) -> rusqlite::Result<[Option<String>; N]> {
    let mut out: [Option<String>; N] = std::array::from_fn(|_| None);
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = match r.get_ref(i)? {
            rusqlite::types::ValueRef::Null => None,
            rusqlite::types::ValueRef::Integer(n) => Some(n.to_string()),
            rusqlite::types::ValueRef::Real(f) => Some(f.to_string()),
            rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                Some(String::from_utf8_lossy(t).into_owned())
            }
        };
    }
    Ok(out)
}

fn need<'a>(col: &'a Option<String>, what: &str) -> Result<&'a str, StoreError> {
    col.as_deref()
        .ok_or_else(|| StoreError::Corrupt(format!("{what} is missing")))
}

impl HostRow {
    fn decode(self) -> Result<HostRecord, StoreError> {
        let c = &self.0;
        Ok(HostRecord {
            id: parse_uuid(need(&c[0], "host id")?)?,
            name: need(&c[1], "host name")?.to_string(),
            cluster_id: parse_uuid(need(&c[2], "host cluster")?)?,
            cluster: need(&c[3], "host cluster name")?.to_string(),
            link: parse_enum("host link", need(&c[4], "host link")?)?,
            maintenance: need(&c[5], "maintenance")? != "0",
            agent_url: need(&c[6], "agent url")?.to_string(),
            agent_token: need(&c[7], "agent token")?.to_string(),
            host_token: need(&c[8], "host token")?.to_string(),
            facts: from_json("host facts", need(&c[9], "host facts")?)?,
            load: c[10]
                .as_deref()
                .map(|s| from_json("host load", s))
                .transpose()?,
            last_heartbeat: c[11].as_deref().map(parse_ts).transpose()?,
            health: c[12]
                .as_deref()
                .map(|s| from_json("host health", s))
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

impl VmRow {
    fn decode(self) -> Result<VmRecord, StoreError> {
        let c = &self.0;
        let generation = need(&c[8], "generation")?;
        Ok(VmRecord {
            id: parse_uuid(need(&c[0], "vm id")?)?,
            cluster_id: parse_uuid(need(&c[1], "vm cluster")?)?,
            cluster: need(&c[2], "vm cluster name")?.to_string(),
            host_id: c[3].as_deref().map(parse_uuid).transpose()?,
            host: c[4].clone(),
            spec: from_json("vm spec", need(&c[5], "vm spec")?)?,
            desired: parse_enum("desired state", need(&c[6], "desired state")?)?,
            actual: parse_enum("actual state", need(&c[7], "actual state")?)?,
            generation: generation
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("generation {generation:?}")))?,
            created_at: parse_ts(need(&c[9], "vm created_at")?)?,
            pool: c[10].clone(),
        })
    }
}

impl TaskRow {
    fn decode(self) -> Result<TaskRecord, StoreError> {
        let c = &self.0;
        let progress = need(&c[6], "progress")?;
        let task = Task {
            id: parse_uuid(need(&c[0], "task id")?)?,
            kind: parse_enum("task kind", need(&c[1], "task kind")?)?,
            vm: c[3].clone(),
            host: c[4].clone(),
            state: parse_enum("task state", need(&c[5], "task state")?)?,
            progress: progress
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("progress {progress:?}")))?,
            phase: need(&c[7], "phase")?.to_string(),
            result: c[9]
                .as_deref()
                .map(|s| from_json("task result", s))
                .transpose()?,
            error: c[10].clone(),
            created_at: parse_ts(need(&c[11], "task created_at")?)?,
            finished_at: c[12].as_deref().map(parse_ts).transpose()?,
        };
        Ok(TaskRecord {
            task,
            vm_id: c[2].as_deref().map(parse_uuid).transpose()?,
            intent: from_json("task intent", need(&c[8], "task intent")?)?,
        })
    }
}

/// States a task is still going in.
const ACTIVE_TASK_STATES: &str = "('queued', 'running')";

impl Tx<'_> {
    fn query_rows<T, const N: usize>(
        &self,
        sql: &str,
        args: impl rusqlite::Params,
        wrap: impl Fn([Option<String>; N]) -> T,
    ) -> Result<Vec<T>, StoreError> {
        let mut stmt = self.tx.prepare_cached(sql)?;
        let rows = stmt.query_map(args, text_cols::<N>)?;
        let mut out = Vec::new();
        for row in rows {
            out.push(wrap(row?));
        }
        Ok(out)
    }

    // ---- clusters ----

    pub fn insert_cluster(
        &self,
        name: &str,
        evc_mode: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Cluster, StoreError> {
        if self.cluster_id(name)?.is_some() {
            return Err(StoreError::Conflict(format!(
                "a cluster named {name} already exists; choose another name"
            )));
        }
        let id = Uuid::new_v4();
        self.tx.execute(
            "INSERT INTO clusters (id, name, evc_mode, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![id.to_string(), name, evc_mode, ts(now)],
        )?;
        Ok(Cluster {
            id,
            name: name.to_string(),
            evc_mode: evc_mode.map(str::to_string),
            migration_encryption: MigrationEncryption::default(),
            hosts: vec![],
            created_at: now,
        })
    }

    /// Sets a cluster's migration encryption; returns the one it had.
    pub fn set_migration_encryption(
        &self,
        cluster_id: Uuid,
        mode: MigrationEncryption,
    ) -> Result<MigrationEncryption, StoreError> {
        let before: String = self.tx.query_row(
            "SELECT migration_encryption FROM clusters WHERE id = ?1",
            [cluster_id.to_string()],
            |r| r.get(0),
        )?;
        self.tx.execute(
            "UPDATE clusters SET migration_encryption = ?1 WHERE id = ?2",
            params![mode.as_str(), cluster_id.to_string()],
        )?;
        parse_encryption(&before)
    }

    pub fn cluster_id(&self, name: &str) -> Result<Option<Uuid>, StoreError> {
        let id: Option<String> = self
            .tx
            .query_row("SELECT id FROM clusters WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        id.as_deref().map(parse_uuid).transpose()
    }

    pub fn clusters(&self) -> Result<Vec<Cluster>, StoreError> {
        let rows: Vec<[Option<String>; 5]> = self.query_rows(
            "SELECT id, name, evc_mode, created_at, migration_encryption FROM clusters ORDER BY \
             name",
            [],
            |c| c,
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for c in rows {
            let id = parse_uuid(need(&c[0], "cluster id")?)?;
            let hosts = self.query_rows(
                "SELECT name FROM hosts WHERE cluster_id = ?1 ORDER BY name",
                [id.to_string()],
                |[n]: [Option<String>; 1]| n.unwrap_or_default(),
            )?;
            out.push(Cluster {
                id,
                name: need(&c[1], "cluster name")?.to_string(),
                evc_mode: c[2].clone(),
                migration_encryption: parse_encryption(need(&c[4], "migration_encryption")?)?,
                hosts,
                created_at: parse_ts(need(&c[3], "cluster created_at")?)?,
            });
        }
        Ok(out)
    }

    pub fn cluster(&self, name: &str) -> Result<Option<Cluster>, StoreError> {
        Ok(self.clusters()?.into_iter().find(|c| c.name == name))
    }

    // ---- hosts ----

    fn hosts_where(&self, cond: &str, arg: &str) -> Result<Vec<HostRecord>, StoreError> {
        let sql = format!(
            "SELECT {HOST_COLUMNS} FROM hosts h JOIN clusters c ON c.id = h.cluster_id \
             WHERE {cond} ORDER BY h.name"
        );
        self.query_rows(&sql, [arg], HostRow)?
            .into_iter()
            .map(HostRow::decode)
            .collect()
    }

    pub fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        // A condition that is always true but still takes the one parameter `hosts_where` binds.
        self.hosts_where("?1 = ?1", "")
    }

    pub fn host_by_name(&self, name: &str) -> Result<Option<HostRecord>, StoreError> {
        Ok(self.hosts_where("h.name = ?1", name)?.into_iter().next())
    }

    pub fn host_by_id(&self, id: Uuid) -> Result<Option<HostRecord>, StoreError> {
        Ok(self
            .hosts_where("h.id = ?1", &id.to_string())?
            .into_iter()
            .next())
    }

    pub fn hosts_in_cluster(&self, cluster_id: Uuid) -> Result<Vec<HostRecord>, StoreError> {
        self.hosts_where("h.cluster_id = ?1", &cluster_id.to_string())
    }

    /// The API view of a host: the record without secrets, plus its VMs' names.
    pub fn host_view(&self, host: &HostRecord) -> Result<Host, StoreError> {
        let vms = self.query_rows(
            "SELECT name FROM vms WHERE host_id = ?1 ORDER BY name",
            [host.id.to_string()],
            |[n]: [Option<String>; 1]| n.unwrap_or_default(),
        )?;
        let mut view = host.to_api(vms);
        view.certificate = self.host_cert(&host.name)?;
        if let Some(c) = &view.certificate {
            if c.expires_at < Utc::now() {
                view.problems.push(format!(
                    "its certificate expired at {}: the agent renews it after two thirds of its \
                     life, so the host was down or cannot reach the center; until it joins \
                     again (tern host add {}) its calls are refused",
                    c.expires_at, host.name
                ));
            }
        }
        Ok(view)
    }

    pub fn insert_host(
        &self,
        host: &HostRecord,
        registered_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT INTO hosts (id, name, cluster_id, link, maintenance, agent_url, agent_token, \
             host_token, facts, load, last_heartbeat, registered_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                host.id.to_string(),
                host.name,
                host.cluster_id.to_string(),
                enum_text(&host.link),
                host.maintenance,
                host.agent_url,
                host.agent_token,
                host.host_token,
                to_json(&host.facts)?,
                host.load.as_ref().map(to_json).transpose()?,
                host.last_heartbeat.map(ts),
                ts(registered_at),
            ],
        )?;
        Ok(())
    }

    /// Rewrites what a (re-)registration changes; the id, maintenance flag and VMs stay.
    pub fn update_host_registration(&self, host: &HostRecord) -> Result<(), StoreError> {
        self.tx.execute(
            "UPDATE hosts SET cluster_id = ?2, link = ?3, agent_url = ?4, agent_token = ?5, \
             host_token = ?6, facts = ?7, last_heartbeat = ?8 WHERE id = ?1",
            params![
                host.id.to_string(),
                host.cluster_id.to_string(),
                enum_text(&host.link),
                host.agent_url,
                host.agent_token,
                host.host_token,
                to_json(&host.facts)?,
                host.last_heartbeat.map(ts),
            ],
        )?;
        Ok(())
    }

    pub fn record_heartbeat(
        &self,
        id: Uuid,
        facts: &HostFacts,
        load: &HostLoad,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.tx.execute(
            "UPDATE hosts SET facts = ?2, load = ?3, last_heartbeat = ?4 WHERE id = ?1",
            params![id.to_string(), to_json(facts)?, to_json(load)?, ts(now)],
        )?;
        Ok(())
    }

    pub fn set_host_link(&self, id: Uuid, link: Link) -> Result<(), StoreError> {
        self.tx.execute(
            "UPDATE hosts SET link = ?2 WHERE id = ?1",
            params![id.to_string(), enum_text(&link)],
        )?;
        Ok(())
    }

    /// Records a host's health (its findings and last counters).
    pub fn set_host_health(&self, id: Uuid, health: &HostHealth) -> Result<(), StoreError> {
        self.tx.execute(
            "UPDATE hosts SET health = ?2 WHERE id = ?1",
            params![id.to_string(), to_json(health)?],
        )?;
        Ok(())
    }

    /// Sets or clears a host's maintenance flag.
    pub fn set_host_maintenance(&self, id: Uuid, maintenance: bool) -> Result<(), StoreError> {
        self.tx.execute(
            "UPDATE hosts SET maintenance = ?2 WHERE id = ?1",
            params![id.to_string(), maintenance],
        )?;
        Ok(())
    }

    // ---- VMs ----

    /// Registers a stopped VM on another host: its host changes and its generation is bumped
    /// (ownership changed), only if it is still at `generation` and stopped.
    pub fn rehome_vm(&self, id: Uuid, host: Uuid, generation: u64) -> Result<(), StoreError> {
        let n = self.tx.execute(
            "UPDATE vms SET host_id = ?2, generation = generation + 1 \
             WHERE id = ?1 AND generation = ?3 AND actual_state IN ('stopped', 'crashed')",
            params![id.to_string(), host.to_string(), generation as i64],
        )?;
        if n != 1 {
            return Err(StoreError::Conflict(format!(
                "VM {id} changed (started, moved or deleted) while it was being re-homed"
            )));
        }
        Ok(())
    }

    fn vms_where(&self, cond: &str, arg: &str) -> Result<Vec<VmRecord>, StoreError> {
        let sql = format!(
            "SELECT {VM_COLUMNS} FROM vms v JOIN clusters c ON c.id = v.cluster_id \
             LEFT JOIN hosts h ON h.id = v.host_id WHERE {cond} ORDER BY v.name"
        );
        self.query_rows(&sql, [arg], VmRow)?
            .into_iter()
            .map(VmRow::decode)
            .collect()
    }

    /// Every VM's name, cluster, host and state, by name, without decoding their specs:
    /// what listings filter and page on, and what the summary counts (20,000 specs take
    /// tens of milliseconds to decode; these rows a few).
    pub fn vm_index(&self) -> Result<Vec<VmIndexRow>, StoreError> {
        let rows: Vec<[Option<String>; 4]> = self.query_rows(
            "SELECT v.name, c.name, h.name, v.actual_state FROM vms v \
             JOIN clusters c ON c.id = v.cluster_id LEFT JOIN hosts h ON h.id = v.host_id \
             ORDER BY v.name",
            [],
            |r| r,
        )?;
        Ok(rows
            .into_iter()
            .map(|[name, cluster, host, state]| VmIndexRow {
                name: name.unwrap_or_default(),
                cluster: cluster.unwrap_or_default(),
                host,
                actual_state: state.unwrap_or_default(),
            })
            .collect())
    }

    pub fn vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        // Always true; see `hosts`.
        self.vms_where("?1 = ?1", "")
    }

    pub fn vm_by_name(&self, name: &str) -> Result<Option<VmRecord>, StoreError> {
        Ok(self.vms_where("v.name = ?1", name)?.into_iter().next())
    }

    pub fn vm_by_id(&self, id: Uuid) -> Result<Option<VmRecord>, StoreError> {
        Ok(self
            .vms_where("v.id = ?1", &id.to_string())?
            .into_iter()
            .next())
    }

    pub fn vms_on_host(&self, host_id: Uuid) -> Result<Vec<VmRecord>, StoreError> {
        self.vms_where("v.host_id = ?1", &host_id.to_string())
    }

    /// Name of the VM that has a NIC with this MAC (lower case), if any.
    pub fn vm_with_mac(&self, mac: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .tx
            .query_row(
                "SELECT v.name FROM vm_macs m JOIN vms v ON v.id = m.vm_id WHERE m.mac = ?1",
                [mac],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Inserts a VM; refuses a taken name or MAC with a conflict.
    pub fn insert_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        if self.vm_by_name(vm.name())?.is_some() {
            return Err(StoreError::Conflict(format!(
                "a VM named {} already exists; choose another name",
                vm.name()
            )));
        }
        for nic in &vm.spec.nics {
            let mac = nic.mac.to_ascii_lowercase();
            if let Some(other) = self.vm_with_mac(&mac)? {
                return Err(StoreError::Conflict(format!(
                    "MAC {mac} is already used by VM {other}; every NIC needs its own MAC"
                )));
            }
        }
        self.tx.execute(
            "INSERT INTO vms (id, name, cluster_id, host_id, spec, desired_state, actual_state, \
             generation, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                vm.id.to_string(),
                vm.name(),
                vm.cluster_id.to_string(),
                vm.host_id.map(|h| h.to_string()),
                to_json(&vm.spec)?,
                enum_text(&vm.desired),
                enum_text(&vm.actual),
                vm.generation as i64,
                ts(vm.created_at),
            ],
        )?;
        for nic in &vm.spec.nics {
            self.tx.execute(
                "INSERT INTO vm_macs (mac, vm_id) VALUES (?1, ?2)",
                params![nic.mac.to_ascii_lowercase(), vm.id.to_string()],
            )?;
        }
        Ok(())
    }

    pub fn set_vm_desired(&self, id: Uuid, state: PowerState) -> Result<(), StoreError> {
        self.tx.execute(
            "UPDATE vms SET desired_state = ?2 WHERE id = ?1",
            params![id.to_string(), enum_text(&state)],
        )?;
        Ok(())
    }

    /// Replaces a VM's spec (its name and NICs stay: only settings that change in place).
    pub fn set_vm_spec(&self, id: Uuid, spec: &VmSpec) -> Result<(), StoreError> {
        self.tx.execute(
            "UPDATE vms SET spec = ?2 WHERE id = ?1",
            params![id.to_string(), to_json(spec)?],
        )?;
        Ok(())
    }

    /// Puts a VM in a pool (`None`: the cluster's root).
    pub fn set_vm_pool(&self, id: Uuid, pool: Option<&str>) -> Result<(), StoreError> {
        self.tx.execute(
            "UPDATE vms SET pool = ?2 WHERE id = ?1",
            params![id.to_string(), pool],
        )?;
        Ok(())
    }

    /// A cluster's pools with their settings, by name.
    pub fn pools(&self, cluster_id: Uuid) -> Result<Vec<(String, PoolSettings)>, StoreError> {
        let rows: Vec<[Option<String>; 2]> = self.query_rows(
            "SELECT name, settings FROM resource_pools WHERE cluster_id = ?1 ORDER BY name",
            [cluster_id.to_string()],
            |c| c,
        )?;
        rows.iter()
            .map(|[n, s]| {
                Ok((
                    need(n, "pool name")?.to_string(),
                    from_json("pool settings", need(s, "pool settings")?)?,
                ))
            })
            .collect()
    }

    /// A pool's cluster id and settings.
    pub fn pool(&self, name: &str) -> Result<Option<(Uuid, PoolSettings)>, StoreError> {
        let row: Option<(String, String)> = self
            .tx
            .query_row(
                "SELECT cluster_id, settings FROM resource_pools WHERE name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        row.map(|(c, s)| Ok((parse_uuid(&c)?, from_json("pool settings", &s)?)))
            .transpose()
    }

    pub fn image(&self, name: &str) -> Result<Option<tern_api::images::Image>, StoreError> {
        let row: Option<String> = self
            .tx
            .query_row("SELECT record FROM images WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(raw) = row else { return Ok(None) };
        let mut img: tern_api::images::Image = from_json("image", &raw)?;
        img.used_by = self.vms_using_image(name)?;
        Ok(Some(img))
    }

    /// The catalogue, by name.
    pub fn images(&self) -> Result<Vec<tern_api::images::Image>, StoreError> {
        let names: Vec<String> =
            self.query_rows("SELECT name FROM images ORDER BY name", [], |[n]| {
                n.unwrap_or_default()
            })?;
        let mut out = Vec::new();
        for n in names {
            out.extend(self.image(&n)?);
        }
        Ok(out)
    }

    /// Adds an image; `false` when the name is taken.
    pub fn insert_image(&self, img: &tern_api::images::Image) -> Result<bool, StoreError> {
        Ok(self.tx.execute(
            "INSERT INTO images (name, record) VALUES (?1, ?2) ON CONFLICT(name) DO NOTHING",
            params![img.name, to_json(img)?],
        )? > 0)
    }

    pub fn delete_image(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .tx
            .execute("DELETE FROM images WHERE name = ?1", [name])?
            > 0)
    }

    /// VMs whose disk was made from image `name`, by name.
    pub fn vms_using_image(&self, name: &str) -> Result<Vec<String>, StoreError> {
        self.query_rows(
            "SELECT name FROM vms WHERE image = ?1 ORDER BY name",
            [name],
            |[n]| n.unwrap_or_default(),
        )
    }

    /// The image VM `id`'s disk was made from.
    pub fn vm_image(&self, id: Uuid) -> Result<Option<String>, StoreError> {
        Ok(self
            .tx
            .query_row(
                "SELECT image FROM vms WHERE id = ?1",
                [id.to_string()],
                |r| r.get(0),
            )
            .optional()?
            .flatten())
    }

    pub fn set_vm_image(&self, id: Uuid, image: &str) -> Result<(), StoreError> {
        self.tx.execute(
            "UPDATE vms SET image = ?2 WHERE id = ?1",
            params![id.to_string(), image],
        )?;
        Ok(())
    }

    /// Adds a datastore; `false` when the name is taken.
    pub fn insert_datastore(
        &self,
        ds: &tern_api::datastores::Datastore,
    ) -> Result<bool, StoreError> {
        Ok(self.tx.execute(
            "INSERT INTO datastores (name, record) VALUES (?1, ?2) ON CONFLICT(name) DO NOTHING",
            params![ds.name, to_json(ds)?],
        )? > 0)
    }

    /// A datastore's record (without `used_by` and `hosts`, which are not stored).
    pub fn datastore(
        &self,
        name: &str,
    ) -> Result<Option<tern_api::datastores::Datastore>, StoreError> {
        let raw: Option<String> = self
            .tx
            .query_row(
                "SELECT record FROM datastores WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        raw.map(|r| from_json("datastore", &r)).transpose()
    }

    /// The datastore catalogue, by name.
    pub fn datastores(&self) -> Result<Vec<tern_api::datastores::Datastore>, StoreError> {
        let raws = self.query_rows("SELECT record FROM datastores ORDER BY name", [], |[r]| {
            r.unwrap_or_default()
        })?;
        raws.iter().map(|r| from_json("datastore", r)).collect()
    }

    pub fn delete_datastore(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .tx
            .execute("DELETE FROM datastores WHERE name = ?1", [name])?
            > 0)
    }

    /// Creates or replaces a pool.
    pub fn put_pool(
        &self,
        cluster_id: Uuid,
        name: &str,
        settings: &PoolSettings,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT INTO resource_pools (name, cluster_id, settings, created_at) \
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT(name) DO UPDATE SET settings = ?3",
            params![name, cluster_id.to_string(), to_json(settings)?, ts(now)],
        )?;
        Ok(())
    }

    pub fn delete_pool(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .tx
            .execute("DELETE FROM resource_pools WHERE name = ?1", [name])?
            > 0)
    }

    pub fn set_vm_actual(&self, id: Uuid, state: PowerState) -> Result<(), StoreError> {
        self.tx.execute(
            "UPDATE vms SET actual_state = ?2 WHERE id = ?1",
            params![id.to_string(), enum_text(&state)],
        )?;
        Ok(())
    }

    pub fn delete_vm(&self, id: Uuid) -> Result<(), StoreError> {
        self.tx
            .execute("DELETE FROM vms WHERE id = ?1", [id.to_string()])?;
        Ok(())
    }

    /// The cluster's placement rules, by name.
    pub fn drs_rules(&self, cluster_id: Uuid) -> Result<Vec<DrsRule>, StoreError> {
        let rows: Vec<[Option<String>; 1]> = self.query_rows(
            "SELECT rule FROM drs_rules WHERE cluster_id = ?1 ORDER BY name",
            [cluster_id.to_string()],
            |c| c,
        )?;
        rows.iter()
            .map(|[r]| from_json("DRS rule", need(r, "DRS rule")?))
            .collect()
    }

    /// A rule and the id of its cluster.
    pub fn drs_rule(&self, name: &str) -> Result<Option<(Uuid, DrsRule)>, StoreError> {
        let row: Option<(String, String)> = self
            .tx
            .query_row(
                "SELECT cluster_id, rule FROM drs_rules WHERE name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        row.map(|(c, r)| Ok((parse_uuid(&c)?, from_json("DRS rule", &r)?)))
            .transpose()
    }

    pub fn insert_drs_rule(
        &self,
        cluster_id: Uuid,
        rule: &DrsRule,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT INTO drs_rules (name, cluster_id, rule, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![rule.name, cluster_id.to_string(), to_json(rule)?, ts(now)],
        )?;
        Ok(())
    }

    pub fn delete_drs_rule(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .tx
            .execute("DELETE FROM drs_rules WHERE name = ?1", [name])?
            > 0)
    }

    /// Takes a deleted VM out of its cluster's rules (a later VM of the same name is not
    /// bound by them); returns the rules changed.
    pub fn forget_vm_in_rules(
        &self,
        cluster_id: Uuid,
        vm: &str,
    ) -> Result<Vec<String>, StoreError> {
        let mut changed = Vec::new();
        for mut rule in self.drs_rules(cluster_id)? {
            if !rule.vms.iter().any(|v| v == vm) {
                continue;
            }
            rule.vms.retain(|v| v != vm);
            self.tx.execute(
                "UPDATE drs_rules SET rule = ?2 WHERE name = ?1",
                params![rule.name, to_json(&rule)?],
            )?;
            changed.push(rule.name);
        }
        Ok(changed)
    }

    /// Records the CPU a VM was resolved to (replacing the previous record).
    pub fn set_vm_cpu(
        &self,
        vm_id: Uuid,
        row: &VmCpuRow,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT INTO vm_cpus (vm_id, cpu, host, powered_on, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(vm_id) DO UPDATE SET cpu = ?2, host = ?3, \
             powered_on = ?4, updated_at = ?5",
            params![
                vm_id.to_string(),
                to_json(&row.cpu)?,
                row.host,
                row.powered_on,
                ts(now)
            ],
        )?;
        Ok(())
    }

    /// The CPU a VM was last resolved to, if any.
    pub fn vm_cpu(&self, vm_id: Uuid) -> Result<Option<VmCpuRow>, StoreError> {
        let rows: Vec<[Option<String>; 3]> = self.query_rows(
            "SELECT cpu, host, powered_on FROM vm_cpus WHERE vm_id = ?1",
            [vm_id.to_string()],
            |c| c,
        )?;
        rows.into_iter()
            .next()
            .map(|c| {
                Ok(VmCpuRow {
                    cpu: from_json("vm cpu", need(&c[0], "vm cpu")?)?,
                    host: need(&c[1], "vm cpu host")?.to_string(),
                    powered_on: need(&c[2], "vm cpu powered_on")? != "0",
                })
            })
            .transpose()
    }

    /// Every VM's recorded CPU, by VM (one query for a whole cluster's snapshot).
    pub fn vm_cpus(&self) -> Result<HashMap<Uuid, VmCpuRow>, StoreError> {
        let rows: Vec<[Option<String>; 4]> = self.query_rows(
            "SELECT vm_id, cpu, host, powered_on FROM vm_cpus",
            [],
            |c| c,
        )?;
        rows.into_iter()
            .map(|c| {
                let id = parse_uuid(need(&c[0], "vm cpu vm_id")?)?;
                Ok((
                    id,
                    VmCpuRow {
                        cpu: from_json("vm cpu", need(&c[1], "vm cpu")?)?,
                        host: need(&c[2], "vm cpu host")?.to_string(),
                        powered_on: need(&c[3], "vm cpu powered_on")? != "0",
                    },
                ))
            })
            .collect()
    }

    pub fn set_cluster_evc_mode(&self, name: &str, mode: Option<&str>) -> Result<(), StoreError> {
        let n = self.tx.execute(
            "UPDATE clusters SET evc_mode = ?2 WHERE name = ?1",
            params![name, mode],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!(
                "cluster {name} does not exist: see tern cluster list"
            )));
        }
        Ok(())
    }

    // ---- tasks ----

    pub fn insert_task(&self, t: &TaskRecord) -> Result<(), StoreError> {
        let task = &t.task;
        self.tx.execute(
            &format!(
                "INSERT INTO tasks ({TASK_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
            ),
            params![
                task.id.to_string(),
                enum_text(&task.kind),
                t.vm_id.map(|v| v.to_string()),
                task.vm,
                task.host,
                enum_text(&task.state),
                task.progress,
                task.phase,
                to_json(&t.intent)?,
                task.result.as_ref().map(to_json).transpose()?,
                task.error,
                ts(task.created_at),
                task.finished_at.map(ts),
            ],
        )?;
        Ok(())
    }

    pub fn task(&self, id: Uuid) -> Result<Option<TaskRecord>, StoreError> {
        let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1");
        self.query_rows(&sql, [id.to_string()], TaskRow)?
            .into_iter()
            .next()
            .map(TaskRow::decode)
            .transpose()
    }

    /// The newest `limit` tasks (of one VM, by name, if given), oldest first.
    pub fn tasks(&self, limit: u32, vm: Option<&str>) -> Result<Vec<Task>, StoreError> {
        let sql = format!(
            "SELECT * FROM (SELECT {TASK_COLUMNS}, rowid AS seq FROM tasks \
             WHERE (?1 IS NULL OR vm_name = ?1) ORDER BY seq DESC LIMIT ?2) ORDER BY seq ASC"
        );
        let mut stmt = self.tx.prepare_cached(&sql)?;
        let rows = stmt.query_map(params![vm, limit], text_cols::<13>)?;
        let mut out = Vec::new();
        for row in rows {
            out.push(TaskRow(row?).decode()?.task);
        }
        Ok(out)
    }

    /// Tasks still queued or running (all of them, or of one VM).
    pub fn active_tasks(&self, vm_id: Option<Uuid>) -> Result<Vec<TaskRecord>, StoreError> {
        let sql = format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE state IN {ACTIVE_TASK_STATES} \
             AND (?1 IS NULL OR vm_id = ?1) ORDER BY rowid"
        );
        self.query_rows(&sql, [vm_id.map(|v| v.to_string())], TaskRow)?
            .into_iter()
            .map(TaskRow::decode)
            .collect()
    }

    /// Ids of the VMs a queued or running task is acting on.
    pub fn vms_with_active_tasks(&self) -> Result<HashSet<Uuid>, StoreError> {
        Ok(self
            .active_tasks(None)?
            .into_iter()
            .filter_map(|t| t.vm_id)
            .collect())
    }

    /// Moves a task still going to `state` with progress; false if it had already ended
    /// (cancelled meanwhile), in which case nothing changes.
    pub fn update_task_progress(
        &self,
        id: Uuid,
        state: TaskState,
        progress: u8,
        phase: &str,
    ) -> Result<bool, StoreError> {
        let n = self.tx.execute(
            &format!(
                "UPDATE tasks SET state = ?2, progress = ?3, phase = ?4 \
                 WHERE id = ?1 AND state IN {ACTIVE_TASK_STATES}"
            ),
            params![id.to_string(), enum_text(&state), progress, phase],
        )?;
        Ok(n == 1)
    }

    /// Ends a task still going; false if it had already ended, in which case nothing changes.
    pub fn finish_task(
        &self,
        id: Uuid,
        state: TaskState,
        phase: &str,
        result: Option<&serde_json::Value>,
        error: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let progress: u8 = if state == TaskState::Succeeded {
            100
        } else {
            0
        };
        let n = self.tx.execute(
            &format!(
                "UPDATE tasks SET state = ?2, phase = ?3, result = ?4, error = ?5, \
                 finished_at = ?6, progress = CASE WHEN ?7 = 100 THEN 100 ELSE progress END \
                 WHERE id = ?1 AND state IN {ACTIVE_TASK_STATES}"
            ),
            params![
                id.to_string(),
                enum_text(&state),
                phase,
                result.map(to_json).transpose()?,
                error,
                ts(now),
                progress,
            ],
        )?;
        Ok(n == 1)
    }

    // ---- events ----

    /// Records an event (and logs it).
    pub fn add_event(&self, ev: NewEvent, now: DateTime<Utc>) -> Result<i64, StoreError> {
        match ev.level {
            EventLevel::Info => tracing::info!(target: "tern_center::event", "{}", ev.message),
            EventLevel::Warning => tracing::warn!(target: "tern_center::event", "{}", ev.message),
            EventLevel::Error => tracing::error!(target: "tern_center::event", "{}", ev.message),
        }
        self.tx.execute(
            "INSERT INTO events (time, level, message, vm, host, task, actor) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                ts(now),
                enum_text(&ev.level),
                ev.message,
                ev.vm,
                ev.host,
                ev.task.map(|t| t.to_string()),
                ev.actor,
            ],
        )?;
        Ok(self.tx.last_insert_rowid())
    }

    /// The newest event's id (0 when there is none).
    pub fn last_event_id(&self) -> Result<i64, StoreError> {
        Ok(self
            .tx
            .query_row("SELECT COALESCE(MAX(id), 0) FROM events", [], |r| r.get(0))?)
    }

    /// Events with an id above `after`, oldest first, at most `limit`.
    pub fn events_after(&self, after: i64, limit: u32) -> Result<Vec<Event>, StoreError> {
        let newest = self.last_event_id()?;
        if newest <= after {
            return Ok(Vec::new());
        }
        let span = u32::try_from(newest - after).unwrap_or(u32::MAX).min(limit);
        Ok(self
            .events(&EventFilter {
                limit: span,
                vm: None,
                host: None,
            })?
            .into_iter()
            .filter(|e| e.id > after)
            .collect())
    }

    pub fn events(&self, filter: &EventFilter) -> Result<Vec<Event>, StoreError> {
        let sql = "SELECT * FROM (SELECT id, time, level, message, vm, host, task, actor \
                   FROM events WHERE (?1 IS NULL OR vm = ?1) AND (?2 IS NULL OR host = ?2) \
                   ORDER BY id DESC LIMIT ?3) ORDER BY id ASC";
        let rows: Vec<[Option<String>; 8]> =
            self.query_rows(sql, params![filter.vm, filter.host, filter.limit], |c| c)?;
        rows.into_iter()
            .map(|c| {
                let id = need(&c[0], "event id")?;
                Ok(Event {
                    id: id
                        .parse()
                        .map_err(|_| StoreError::Corrupt(format!("event id {id:?}")))?,
                    time: parse_ts(need(&c[1], "event time")?)?,
                    level: parse_enum("event level", need(&c[2], "event level")?)?,
                    message: need(&c[3], "event message")?.to_string(),
                    vm: c[4].clone(),
                    host: c[5].clone(),
                    task: c[6].as_deref().map(parse_uuid).transpose()?,
                    actor: c[7].clone(),
                })
            })
            .collect()
    }

    /// Forgets the oldest events beyond `keep` and those older than `max_age`; returns how
    /// many went. Bounds the log a chatty or hostile cluster could otherwise grow for ever.
    pub fn prune_events(
        &self,
        keep: u32,
        max_age: chrono::Duration,
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        let by_count = self.tx.execute(
            "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE id <= (SELECT id \
             FROM events ORDER BY id DESC LIMIT 1 OFFSET ?1) ORDER BY id LIMIT ?2)",
            params![keep, PRUNE_BATCH],
        )?;
        let by_age = self.tx.execute(
            "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE time < ?1 \
             ORDER BY id LIMIT ?2)",
            params![ts(now - max_age), PRUNE_BATCH],
        )?;
        Ok(by_count + by_age)
    }

    /// Forgets finished tasks beyond the newest `keep` and those that ended before
    /// `max_age`; running ones always stay. Returns how many went.
    /// Adds a reading to a migration task's timeline (nothing once it holds
    /// [`MAX_MIGRATION_SAMPLES`]); `at_ms` is filled from the task's start.
    pub fn add_migration_sample(
        &self,
        task: Uuid,
        mut sample: tern_api::history::MigrationSample,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let Some(t) = self.task(task)? else {
            return Ok(());
        };
        sample.at_ms = u64::try_from((now - t.task.created_at).num_milliseconds()).unwrap_or(0);
        let json = to_json(&sample)?;
        self.tx.execute(
            "INSERT INTO migration_samples (task_id, seq, sample) \
             SELECT ?1, COUNT(*), ?2 FROM migration_samples WHERE task_id = ?1 \
             HAVING COUNT(*) < ?3",
            params![task.to_string(), json, MAX_MIGRATION_SAMPLES],
        )?;
        Ok(())
    }

    /// A migration task's readings, oldest first.
    pub fn migration_samples(
        &self,
        task: Uuid,
    ) -> Result<Vec<tern_api::history::MigrationSample>, StoreError> {
        let rows: Vec<[Option<String>; 1]> = self.query_rows(
            "SELECT sample FROM migration_samples WHERE task_id = ?1 ORDER BY seq",
            [task.to_string()],
            |r| r,
        )?;
        rows.into_iter()
            .map(|[s]| from_json("migration sample", s.as_deref().unwrap_or_default()))
            .collect()
    }

    pub fn prune_tasks(
        &self,
        keep: u32,
        max_age: chrono::Duration,
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        let by_count = self.tx.execute(
            "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE finished_at IS NOT NULL \
             AND id IN (SELECT id FROM tasks WHERE finished_at IS NOT NULL \
             ORDER BY finished_at DESC LIMIT -1 OFFSET ?1) \
             AND id NOT IN (SELECT task_id FROM migrations) LIMIT ?2)",
            params![keep, PRUNE_BATCH],
        )?;
        let by_age = self.tx.execute(
            "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE finished_at IS NOT NULL \
             AND finished_at < ?1 AND id NOT IN (SELECT task_id FROM migrations) LIMIT ?2)",
            params![ts(now - max_age), PRUNE_BATCH],
        )?;
        Ok(by_count + by_age)
    }

    // ---- join tokens ----

    /// Records a one-time join token for `host_name` by its hash.
    pub fn insert_join_token(
        &self,
        hash: &str,
        host_name: &str,
        expires_at: DateTime<Utc>,
        created_by: &str,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT INTO join_tokens (hash, host_name, expires_at, created_at, created_by) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![hash, host_name, ts(expires_at), ts(now), created_by],
        )?;
        Ok(())
    }

    /// The join token whose secret hashes to `hash`: the host name it is bound to and when it
    /// expires.
    pub fn join_token(&self, hash: &str) -> Result<Option<(String, DateTime<Utc>)>, StoreError> {
        let rows: Vec<[Option<String>; 2]> = self.query_rows(
            "SELECT host_name, expires_at FROM join_tokens WHERE hash = ?1",
            [hash],
            |c| c,
        )?;
        rows.first()
            .map(|c| {
                Ok((
                    need(&c[0], "join token host")?.to_string(),
                    parse_ts(need(&c[1], "join token expiry")?)?,
                ))
            })
            .transpose()
    }

    /// Uses a join token up (and forgets expired ones).
    pub fn consume_join_token(&self, hash: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.tx
            .execute("DELETE FROM join_tokens WHERE hash = ?1", [hash])?;
        self.tx
            .execute("DELETE FROM join_tokens WHERE expires_at < ?1", [ts(now)])?;
        Ok(())
    }

    /// Forgets a host: its record, its secret and the join tokens issued for its name. The
    /// caller has checked that no VM is placed on it.
    pub fn delete_host(&self, id: Uuid, name: &str) -> Result<(), StoreError> {
        self.tx
            .execute("DELETE FROM join_tokens WHERE host_name = ?1", [name])?;
        self.tx
            .execute("DELETE FROM host_certs WHERE host_name = ?1", [name])?;
        self.tx
            .execute("DELETE FROM hosts WHERE id = ?1", [id.to_string()])?;
        Ok(())
    }

    // ---- host certificates ----

    /// The serial of the certificate host `name` must present, if it has one.
    pub fn host_cert_serial(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .tx
            .query_row(
                "SELECT serial FROM host_certs WHERE host_name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The certificate of host `name` the center accepts, if any.
    pub fn host_cert(&self, name: &str) -> Result<Option<HostCertificate>, StoreError> {
        let row: Option<(String, String, String)> = self
            .tx
            .query_row(
                "SELECT serial, not_after, issued_at FROM host_certs WHERE host_name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        row.map(|(serial, not_after, issued_at)| {
            Ok(HostCertificate {
                serial,
                expires_at: parse_ts(&not_after)?,
                issued_at: parse_ts(&issued_at)?,
            })
        })
        .transpose()
    }

    /// Makes `serial` the one certificate of host `name` the center accepts.
    pub fn set_host_cert(
        &self,
        name: &str,
        serial: &str,
        not_after: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT INTO host_certs (host_name, serial, not_after, issued_at) \
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT(host_name) DO UPDATE SET \
             serial = excluded.serial, not_after = excluded.not_after, \
             issued_at = excluded.issued_at",
            params![name, serial, ts(not_after), ts(now)],
        )?;
        Ok(())
    }

    // ---- API tokens ----

    /// Records a token by the hash of its secret.
    pub fn insert_token(
        &self,
        name: &str,
        role: Role,
        hash: &str,
        created_by: &str,
        now: DateTime<Utc>,
    ) -> Result<ApiToken, StoreError> {
        let taken: Option<String> = self
            .tx
            .query_row("SELECT name FROM api_tokens WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        if taken.is_some() {
            return Err(StoreError::Conflict(format!(
                "a token named {name} exists; revoke it first (tern token revoke {name}) or \
                 choose another name"
            )));
        }
        self.tx.execute(
            "INSERT INTO api_tokens (name, role, hash, created_at, created_by) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, role.as_str(), hash, ts(now), created_by],
        )?;
        Ok(ApiToken {
            name: name.to_string(),
            role,
            created_at: now,
            created_by: created_by.to_string(),
        })
    }

    pub fn tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        let rows: Vec<[Option<String>; 4]> = self.query_rows(
            "SELECT name, role, created_at, created_by FROM api_tokens ORDER BY name",
            [],
            |c| c,
        )?;
        rows.iter().map(token_row).collect()
    }

    /// The token whose secret hashes to `hash`, if any.
    pub fn token_by_hash(&self, hash: &str) -> Result<Option<ApiToken>, StoreError> {
        let rows: Vec<[Option<String>; 4]> = self.query_rows(
            "SELECT name, role, created_at, created_by FROM api_tokens WHERE hash = ?1",
            [hash],
            |c| c,
        )?;
        rows.first().map(token_row).transpose()
    }

    /// Deletes a token; false when there was none of that name.
    pub fn delete_token(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .tx
            .execute("DELETE FROM api_tokens WHERE name = ?1", [name])?
            == 1)
    }
}

/// Where a migration's hand-over stands: the ownership record the commit rule reads (its
/// states and legal changes are `tern-motion`'s).
pub use tern_motion::RecordState as MigrationRecordState;

/// One migration's ownership record.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationRow {
    pub task_id: Uuid,
    pub vm_id: Uuid,
    pub vm_name: String,
    pub source_host_id: Uuid,
    pub dest_host_id: Uuid,
    pub generation_from: u64,
    pub generation_to: u64,
    pub state: MigrationRecordState,
    pub detail: Option<serde_json::Value>,
}

const MIGRATION_COLUMNS: &str = "task_id, vm_id, vm_name, source_host_id, dest_host_id, \
                                 generation_from, generation_to, state, detail";

fn decode_migration(c: [Option<String>; 9]) -> Result<MigrationRow, StoreError> {
    let num = |i: usize, what: &str| -> Result<u64, StoreError> {
        need(&c[i], what)?
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("migration {what}: {e}")))
    };
    Ok(MigrationRow {
        task_id: parse_uuid(need(&c[0], "migration task")?)?,
        vm_id: parse_uuid(need(&c[1], "migration vm")?)?,
        vm_name: need(&c[2], "migration vm name")?.to_string(),
        source_host_id: parse_uuid(need(&c[3], "migration source")?)?,
        dest_host_id: parse_uuid(need(&c[4], "migration destination")?)?,
        generation_from: num(5, "generation_from")?,
        generation_to: num(6, "generation_to")?,
        state: parse_enum("migration state", need(&c[7], "migration state")?)?,
        detail: c[8]
            .as_deref()
            .map(|d| from_json("migration detail", d))
            .transpose()?,
    })
}

impl Tx<'_> {
    /// Records a migration's intent (state `preparing`).
    pub fn insert_migration(&self, m: &MigrationRow, now: DateTime<Utc>) -> Result<(), StoreError> {
        self.tx.execute(
            &format!(
                "INSERT INTO migrations ({MIGRATION_COLUMNS}, created_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10)"
            ),
            params![
                m.task_id.to_string(),
                m.vm_id.to_string(),
                m.vm_name,
                m.source_host_id.to_string(),
                m.dest_host_id.to_string(),
                m.generation_from as i64,
                m.generation_to as i64,
                enum_text(&m.state),
                m.detail.as_ref().map(to_json).transpose()?,
                ts(now),
            ],
        )?;
        Ok(())
    }

    pub fn migration(&self, task_id: Uuid) -> Result<Option<MigrationRow>, StoreError> {
        let sql = format!("SELECT {MIGRATION_COLUMNS} FROM migrations WHERE task_id = ?1");
        self.query_rows(&sql, [task_id.to_string()], |c| c)?
            .into_iter()
            .next()
            .map(decode_migration)
            .transpose()
    }

    /// Migrations recovery must finish, oldest first.
    pub fn unfinished_migrations(&self) -> Result<Vec<MigrationRow>, StoreError> {
        let sql = format!(
            "SELECT {MIGRATION_COLUMNS} FROM migrations \
             WHERE state IN ('preparing', 'switching', 'committed') ORDER BY rowid"
        );
        self.query_rows(&sql, [], |c| c)?
            .into_iter()
            .map(decode_migration)
            .collect()
    }

    /// Moves a migration from one of `from` to `to`; false (nothing changed) if it was in
    /// none of them.
    pub fn set_migration_state(
        &self,
        task_id: Uuid,
        from: &[MigrationRecordState],
        to: MigrationRecordState,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let mut changed = 0;
        for f in from {
            changed += self.tx.execute(
                "UPDATE migrations SET state = ?3, updated_at = ?4 \
                 WHERE task_id = ?1 AND state = ?2",
                params![task_id.to_string(), enum_text(f), enum_text(&to), ts(now)],
            )?;
        }
        Ok(changed == 1)
    }

    /// Sets what a migration's record says of its settings and measurements.
    pub fn set_migration_detail(
        &self,
        task_id: Uuid,
        detail: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.tx.execute(
            "UPDATE migrations SET detail = ?2 WHERE task_id = ?1",
            params![task_id.to_string(), to_json(detail)?],
        )?;
        Ok(())
    }

    /// Sets the result of a task (one that ended before its driver could record it).
    pub fn set_task_result(&self, id: Uuid, result: &serde_json::Value) -> Result<(), StoreError> {
        self.tx.execute(
            "UPDATE tasks SET result = ?2 WHERE id = ?1",
            params![id.to_string(), to_json(result)?],
        )?;
        Ok(())
    }

    /// The commit point of a migration: in one transaction the record turns `committed` and
    /// the VM's host and generation become the destination's. Refuses (changing nothing) if
    /// the record is not `preparing`/`switching` or the VM's generation moved meanwhile.
    pub fn commit_migration(&self, task_id: Uuid, now: DateTime<Utc>) -> Result<(), StoreError> {
        let m = self.migration(task_id)?.ok_or_else(|| {
            StoreError::NotFound(format!("no migration record for task {task_id}"))
        })?;
        if !matches!(
            m.state,
            MigrationRecordState::Preparing | MigrationRecordState::Switching
        ) {
            return Err(StoreError::Conflict(format!(
                "migration of VM {} is {:?}: it cannot commit",
                m.vm_name, m.state
            )));
        }
        let n = self.tx.execute(
            "UPDATE vms SET host_id = ?2, generation = ?3 WHERE id = ?1 AND generation = ?4",
            params![
                m.vm_id.to_string(),
                m.dest_host_id.to_string(),
                m.generation_to as i64,
                m.generation_from as i64
            ],
        )?;
        if n != 1 {
            return Err(StoreError::Conflict(format!(
                "VM {} is no longer at generation {}: the migration cannot commit",
                m.vm_name, m.generation_from
            )));
        }
        self.tx.execute(
            "UPDATE migrations SET state = 'committed', updated_at = ?2 WHERE task_id = ?1",
            params![task_id.to_string(), ts(now)],
        )?;
        Ok(())
    }
}

// ---- DRS settings ----

/// A VM's latest committed live migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastMove {
    pub at: DateTime<Utc>,
    /// The host it left (`None` if that host was removed since).
    pub from_host: Option<String>,
}

impl Tx<'_> {
    /// A cluster's DRS settings (the defaults when never set).
    pub fn drs_settings(&self, cluster_id: Uuid) -> Result<DrsSettings, StoreError> {
        let row: Option<(String, i64, String)> = self
            .tx
            .query_row(
                "SELECT automation, threshold, proactive FROM cluster_drs WHERE cluster_id = ?1",
                [cluster_id.to_string()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((automation, threshold, proactive)) = row else {
            return Ok(DrsSettings::default());
        };
        let automation = DrsAutomation::parse(&automation)
            .ok_or_else(|| StoreError::Corrupt(format!("DRS automation {automation:?}")))?;
        let threshold = u8::try_from(threshold)
            .ok()
            .filter(|t| DRS_THRESHOLDS.contains(t))
            .ok_or_else(|| StoreError::Corrupt(format!("DRS threshold {threshold}")))?;
        let proactive = proactive
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("proactive mode {proactive:?}")))?;
        Ok(DrsSettings {
            automation,
            threshold,
            proactive,
        })
    }

    /// When each VM last moved live (its latest committed migration) and from which host:
    /// the DRS cooldown keeps a VM that just moved from moving again (or back).
    pub fn last_migrations(&self) -> Result<HashMap<Uuid, LastMove>, StoreError> {
        let rows: Vec<[Option<String>; 3]> = self.query_rows(
            "SELECT m.vm_id, m.updated_at, h.name FROM migrations m \
             LEFT JOIN hosts h ON h.id = m.source_host_id \
             WHERE m.state IN ('committed', 'done') ORDER BY m.updated_at",
            [],
            |c| c,
        )?;
        let mut out = HashMap::new();
        for r in rows {
            let vm = parse_uuid(need(&r[0], "migration vm_id")?)?;
            let at = parse_ts(need(&r[1], "migration updated_at")?)?;
            out.insert(
                vm,
                LastMove {
                    at,
                    from_host: r[2].clone(),
                },
            );
        }
        Ok(out)
    }

    pub fn set_drs_settings(
        &self,
        cluster_id: Uuid,
        s: DrsSettings,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT INTO cluster_drs (cluster_id, automation, threshold, proactive, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(cluster_id) DO UPDATE SET \
             automation = ?2, threshold = ?3, proactive = ?4, updated_at = ?5",
            params![
                cluster_id.to_string(),
                s.automation.as_str(),
                i64::from(s.threshold),
                s.proactive.to_string(),
                ts(now)
            ],
        )?;
        Ok(())
    }
}

fn parse_encryption(s: &str) -> Result<MigrationEncryption, StoreError> {
    s.parse().map_err(StoreError::Corrupt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_api::center::TaskKind;
    use tern_api::{BootSource, NicSpec};

    pub(crate) fn facts(cores: u32, memory_mib: u64) -> HostFacts {
        HostFacts {
            migration_address: "10.0.0.1".into(),
            ..tern_testkit::fixtures::host_facts(cores, memory_mib)
        }
    }

    fn spec(name: &str, mac: &str) -> VmSpec {
        VmSpec {
            firmware: Default::default(),
            cloud_init: None,
            resources: Default::default(),
            name: name.into(),
            vcpus: 1,
            memory_mib: 128,
            cpu_model: None,
            boot: BootSource::Disk,
            disks: vec![],
            nics: vec![NicSpec { mac: mac.into() }],
        }
    }

    fn fill(store: &mut Store) -> (Uuid, Uuid) {
        store
            .write(|tx| {
                let now = Utc::now();
                let c = tx.insert_cluster("lab", None, now)?;
                let host = HostRecord {
                    id: Uuid::new_v4(),
                    name: "h1".into(),
                    cluster_id: c.id,
                    cluster: c.name.clone(),
                    link: Link::Connected,
                    maintenance: false,
                    agent_url: "http://127.0.0.1:1".into(),
                    agent_token: "a".into(),
                    host_token: "h".into(),
                    facts: facts(4, 4096),
                    load: None,
                    last_heartbeat: Some(now),
                    health: HostHealth::default(),
                };
                tx.insert_host(&host, now)?;
                let vm = VmRecord {
                    id: Uuid::new_v4(),
                    cluster_id: c.id,
                    cluster: c.name,
                    host_id: Some(host.id),
                    host: Some(host.name.clone()),
                    spec: spec("web-1", "52:54:00:00:00:01"),
                    desired: PowerState::Stopped,
                    actual: PowerState::Stopped,
                    generation: 1,
                    created_at: now,
                    pool: None,
                };
                tx.insert_vm(&vm)?;
                tx.add_event(NewEvent::info("hello").vm("web-1"), now)?;
                Ok::<_, StoreError>((host.id, vm.id))
            })
            .unwrap()
    }

    /// Collects what a replicated store sends, as etcd would, one batch per transaction.
    #[derive(Clone, Default)]
    struct Collect(Arc<Mutex<Vec<Vec<replica::RowChange>>>>);

    impl CommitSink for Collect {
        fn commit(&self, changes: Vec<replica::RowChange>) -> Result<(), StoreError> {
            self.0.lock().unwrap().push(changes);
            Ok(())
        }
    }

    struct Refuse;
    impl CommitSink for Refuse {
        fn commit(&self, _: Vec<replica::RowChange>) -> Result<(), StoreError> {
            Err(StoreError::NotLeader("deposed".into()))
        }
    }

    /// Applies every batch collected so far to `replica`, each as one revision.
    fn ship(sent: &Collect, replica: &mut Store) -> usize {
        let batches: Vec<_> = sent.0.lock().unwrap().drain(..).collect();
        for b in &batches {
            replica.apply_replicated(b, false).unwrap();
        }
        batches.len()
    }

    #[test]
    fn a_replica_fed_the_leaders_rows_holds_the_same_store() {
        let mut leader = Store::open_in_memory().unwrap();
        let sent = Collect::default();
        leader.replicate_to(Box::new(sent.clone())).unwrap();
        let mut replica = Store::open_in_memory().unwrap();

        let (host_id, vm_id) = fill(&mut leader);
        assert_eq!(ship(&sent, &mut replica), 1, "one transaction, one batch");
        assert_eq!(
            leader.replicated_rows().unwrap(),
            replica.replicated_rows().unwrap()
        );

        // A heartbeat rewrites only local columns: nothing is sent.
        let load = HostLoad {
            cpu_percent: 12.0,
            memory_used_mib: 100,
            memory_total_mib: 4096,
            vms: vec![],
        };
        leader
            .write(|tx| tx.record_heartbeat(host_id, &facts(4, 4096), &load, Utc::now()))
            .unwrap();
        assert_eq!(
            ship(&sent, &mut replica),
            0,
            "a heartbeat is not replicated"
        );

        // A change and a delete (its MAC row goes by cascade on the leader, by its own
        // delete on the replica), then a VM of the same name under a new id.
        leader
            .write(|tx| {
                tx.set_host_link(host_id, Link::Disconnected)?;
                tx.delete_vm(vm_id)?;
                let c = tx.cluster("lab")?.expect("cluster");
                let vm = VmRecord {
                    id: Uuid::new_v4(),
                    cluster_id: c.id,
                    cluster: c.name,
                    host_id: Some(host_id),
                    host: Some("h1".into()),
                    spec: spec("web-1", "52:54:00:00:00:01"),
                    desired: PowerState::Running,
                    actual: PowerState::Stopped,
                    generation: 1,
                    created_at: Utc::now(),
                    pool: None,
                };
                tx.insert_vm(&vm)?;
                tx.add_event(NewEvent::info("replaced").vm("web-1"), Utc::now())?;
                Ok::<_, StoreError>(())
            })
            .unwrap();
        assert_eq!(ship(&sent, &mut replica), 1);
        let rows = replica.replicated_rows().unwrap();
        assert_eq!(leader.replicated_rows().unwrap(), rows);
        let macs: Vec<_> = rows.iter().filter(|r| r.table == "vm_macs").collect();
        assert_eq!(macs.len(), 1, "{macs:?}");
        replica
            .read(|tx| {
                let h = tx.host_by_id(host_id)?.expect("host");
                assert_eq!(h.link, Link::Disconnected);
                assert_eq!(
                    tx.events(&EventFilter {
                        limit: 10,
                        ..Default::default()
                    })?
                    .len(),
                    2
                );
                Ok::<_, StoreError>(())
            })
            .unwrap();

        // A reload replaces everything, rows the replica had that the leader lost included.
        let mut stale = Store::open_in_memory().unwrap();
        fill(&mut stale);
        stale
            .apply_replicated(&leader.replicated_rows().unwrap(), true)
            .unwrap();
        assert_eq!(
            stale.replicated_rows().unwrap(),
            leader.replicated_rows().unwrap()
        );
    }

    #[test]
    fn a_write_the_shared_store_refuses_changes_nothing() {
        let mut store = Store::open_in_memory().unwrap();
        store.replicate_to(Box::new(Refuse)).unwrap();
        let r = store.write(|tx| tx.insert_cluster("lab", None, Utc::now()));
        assert!(matches!(r, Err(StoreError::NotLeader(_))), "{r:?}");
        let n = store
            .read(|tx| Ok::<_, StoreError>(tx.clusters()?.len()))
            .unwrap();
        assert_eq!(n, 0, "rolled back");
        // A read-only transaction sends nothing, so it works on a standby.
        store.write(|tx| tx.clusters()).unwrap();
    }

    #[test]
    fn migrates_from_empty() {
        let mut store = Store::open_in_memory().unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as u32);
        let n = store
            .read(|tx| Ok::<_, StoreError>(tx.clusters()?.len()))
            .unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn reopen_keeps_the_inventory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("center.db");
        let (host_id, vm_id) = {
            let mut store = Store::open(&path).unwrap();
            fill(&mut store)
        };
        let mut store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as u32);
        store
            .read(|tx| {
                let c = tx.cluster("lab")?.expect("cluster kept");
                assert_eq!(c.hosts, vec!["h1".to_string()]);
                let h = tx.host_by_id(host_id)?.expect("host kept");
                assert_eq!(h.facts.memory_mib, 4096);
                assert_eq!(h.state(), HostState::Connected);
                let vm = tx.vm_by_id(vm_id)?.expect("vm kept");
                assert_eq!(vm.name(), "web-1");
                assert_eq!(vm.host.as_deref(), Some("h1"));
                assert_eq!(
                    tx.vm_with_mac("52:54:00:00:00:01")?.as_deref(),
                    Some("web-1")
                );
                let ev = tx.events(&EventFilter {
                    limit: 10,
                    vm: Some("web-1".into()),
                    host: None,
                })?;
                assert_eq!(ev.len(), 1);
                Ok::<_, StoreError>(())
            })
            .unwrap();
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("center.db");
        drop(Store::open(&path).unwrap());
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch("PRAGMA user_version = 999").unwrap();
        }
        match Store::open(&path) {
            Err(StoreError::TooNew { found: 999, .. }) => {}
            other => panic!("expected TooNew, got {:?}", other.err()),
        }
    }

    #[test]
    fn failed_write_changes_nothing() {
        let mut store = Store::open_in_memory().unwrap();
        fill(&mut store);
        let r = store.write(|tx| {
            tx.insert_cluster("other", None, Utc::now())?;
            // Same MAC as web-1, in upper case: refused, and the cluster above rolls back.
            let mut vm = tx.vm_by_name("web-1")?.unwrap();
            vm.id = Uuid::new_v4();
            vm.spec = spec("web-2", "52:54:00:00:00:01".to_uppercase().as_str());
            tx.insert_vm(&vm)
        });
        assert!(matches!(r, Err(StoreError::Conflict(m)) if m.contains("web-1")));
        store
            .read(|tx| {
                assert!(tx.cluster("other")?.is_none());
                assert!(tx.vm_by_name("web-2")?.is_none());
                Ok::<_, StoreError>(())
            })
            .unwrap();
    }

    #[test]
    fn history_is_pruned_by_count_and_age_and_running_tasks_stay() {
        let mut store = Store::open_in_memory().unwrap();
        let (_, vm_id) = fill(&mut store);
        let now = Utc::now();
        let day = chrono::Duration::days(1);
        store
            .write(|tx| {
                for i in 0..10 {
                    tx.add_event(NewEvent::info(format!("e{i}")), now - day * (10 - i))?;
                }
                let all = EventFilter {
                    limit: 100,
                    ..Default::default()
                };
                let before = tx.events(&all)?.len();
                // Newest 5 kept by count; of those, the ones older than 3 days go by age (e7
                // is exactly 3 days old and stays).
                let gone = tx.prune_events(5, day * 3, now)?;
                let left = tx.events(&all)?;
                let msgs: Vec<_> = left.iter().map(|e| e.message.as_str()).collect();
                assert_eq!(msgs, ["e7", "e8", "e9"]);
                assert_eq!(gone, before - 3);

                let task = |id: Uuid, state: TaskState| TaskRecord {
                    task: Task {
                        id,
                        kind: TaskKind::VmStart,
                        vm: Some("web-1".into()),
                        host: Some("h1".into()),
                        state,
                        progress: 0,
                        phase: "queued".into(),
                        result: None,
                        error: None,
                        created_at: now - day * 30,
                        finished_at: None,
                    },
                    vm_id: Some(vm_id),
                    intent: TaskIntent {
                        previous_desired: Some(PowerState::Stopped),
                        stop: None,
                    },
                };
                let (old, recent, running) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
                for id in [old, recent, running] {
                    tx.insert_task(&task(id, TaskState::Running))?;
                }
                tx.finish_task(
                    old,
                    TaskState::Succeeded,
                    "done",
                    None,
                    None,
                    now - day * 20,
                )?;
                tx.finish_task(recent, TaskState::Succeeded, "done", None, None, now)?;
                assert_eq!(tx.prune_tasks(100, day * 10, now)?, 1);
                let ids: Vec<Uuid> = tx.tasks(100, None)?.iter().map(|t| t.id).collect();
                assert!(!ids.contains(&old) && ids.contains(&recent) && ids.contains(&running));
                // By count, only finished tasks go.
                assert_eq!(tx.prune_tasks(0, day * 10, now)?, 1);
                let ids: Vec<Uuid> = tx.tasks(100, None)?.iter().map(|t| t.id).collect();
                assert_eq!(ids, [running]);
                Ok::<_, StoreError>(())
            })
            .unwrap();
    }

    #[test]
    fn tasks_end_once() {
        let mut store = Store::open_in_memory().unwrap();
        let (_, vm_id) = fill(&mut store);
        let id = Uuid::new_v4();
        store
            .write(|tx| {
                tx.insert_task(&TaskRecord {
                    task: Task {
                        id,
                        kind: TaskKind::VmStart,
                        vm: Some("web-1".into()),
                        host: Some("h1".into()),
                        state: TaskState::Queued,
                        progress: 0,
                        phase: "queued".into(),
                        result: None,
                        error: None,
                        created_at: Utc::now(),
                        finished_at: None,
                    },
                    vm_id: Some(vm_id),
                    intent: TaskIntent {
                        previous_desired: Some(PowerState::Stopped),
                        stop: None,
                    },
                })?;
                assert!(tx.vms_with_active_tasks()?.contains(&vm_id));
                assert!(tx.update_task_progress(id, TaskState::Running, 10, "going")?);
                assert!(tx.finish_task(
                    id,
                    TaskState::Cancelled,
                    "cancelled",
                    None,
                    Some("cancelled by user"),
                    Utc::now()
                )?);
                // The driver's late outcome does not overwrite the cancel.
                assert!(!tx.finish_task(
                    id,
                    TaskState::Succeeded,
                    "done",
                    None,
                    None,
                    Utc::now()
                )?);
                let t = tx.task(id)?.unwrap();
                assert_eq!(t.task.state, TaskState::Cancelled);
                assert_eq!(t.task.progress, 10);
                assert_eq!(t.intent.previous_desired, Some(PowerState::Stopped));
                assert!(tx.active_tasks(None)?.is_empty());
                assert_eq!(tx.tasks(10, Some("web-1"))?.len(), 1);
                Ok::<_, StoreError>(())
            })
            .unwrap();
    }

    #[test]
    fn events_newest_last_with_limit() {
        let mut store = Store::open_in_memory().unwrap();
        store
            .write(|tx| {
                for i in 0..5 {
                    let ev = NewEvent::info(format!("e{i}")).host(Some(if i % 2 == 0 {
                        "h1"
                    } else {
                        "h2"
                    }));
                    tx.add_event(ev, Utc::now())?;
                }
                let all = tx.events(&EventFilter {
                    limit: 3,
                    ..Default::default()
                })?;
                let msgs: Vec<_> = all.iter().map(|e| e.message.as_str()).collect();
                assert_eq!(msgs, ["e2", "e3", "e4"]);
                let h1 = tx.events(&EventFilter {
                    limit: 10,
                    host: Some("h1".into()),
                    vm: None,
                })?;
                let msgs: Vec<_> = h1.iter().map(|e| e.message.as_str()).collect();
                assert_eq!(msgs, ["e0", "e2", "e4"]);
                Ok::<_, StoreError>(())
            })
            .unwrap();
    }

    /// The commit rule: a migration commits once, moving host and generation together, and
    /// only from the generation it recorded.
    #[test]
    fn migration_commit_moves_ownership_once() {
        use MigrationRecordState as R;
        let mut store = Store::open_in_memory().unwrap();
        let (h1, vm) = fill(&mut store);
        let h2 = store
            .write(|tx| {
                let mut h = tx.host_by_id(h1)?.unwrap();
                h.id = Uuid::new_v4();
                h.name = "h2".into();
                h.host_token = "h2".into();
                tx.insert_host(&h, Utc::now())?;
                Ok::<_, StoreError>(h.id)
            })
            .unwrap();
        let task = Uuid::new_v4();
        let row = MigrationRow {
            task_id: task,
            vm_id: vm,
            vm_name: "web-1".into(),
            source_host_id: h1,
            dest_host_id: h2,
            generation_from: 1,
            generation_to: 2,
            state: R::Preparing,
            detail: Some(serde_json::json!({"settings": {}})),
        };
        store
            .write(|tx| tx.insert_migration(&row, Utc::now()))
            .unwrap();
        let got = store.read(|tx| tx.migration(task)).unwrap().unwrap();
        assert_eq!(got, row);
        assert_eq!(
            store.read(|tx| tx.unfinished_migrations()).unwrap().len(),
            1
        );
        assert!(store
            .write(|tx| tx.set_migration_state(task, &[R::Preparing], R::Switching, Utc::now()))
            .unwrap());
        store
            .write(|tx| tx.commit_migration(task, Utc::now()))
            .unwrap();
        let v = store.read(|tx| tx.vm_by_id(vm)).unwrap().unwrap();
        assert_eq!((v.host_id, v.generation), (Some(h2), 2));
        assert_eq!(
            store.read(|tx| tx.migration(task)).unwrap().unwrap().state,
            R::Committed
        );
        // Once only; and a committed migration cannot be rolled back.
        assert!(matches!(
            store.write(|tx| tx.commit_migration(task, Utc::now())),
            Err(StoreError::Conflict(_))
        ));
        assert!(!store
            .write(|tx| tx.set_migration_state(
                task,
                &[R::Preparing, R::Switching],
                R::RolledBack,
                Utc::now()
            ))
            .unwrap());
        // A migration recorded at an older generation cannot commit, and changes nothing.
        let stale = MigrationRow {
            task_id: Uuid::new_v4(),
            source_host_id: h2,
            dest_host_id: h1,
            ..row.clone()
        };
        store
            .write(|tx| tx.insert_migration(&stale, Utc::now()))
            .unwrap();
        assert!(matches!(
            store.write(|tx| tx.commit_migration(stale.task_id, Utc::now())),
            Err(StoreError::Conflict(_))
        ));
        let v = store.read(|tx| tx.vm_by_id(vm)).unwrap().unwrap();
        assert_eq!((v.host_id, v.generation), (Some(h2), 2));
        assert!(store
            .write(|tx| tx.set_migration_state(task, &[R::Committed], R::Done, Utc::now()))
            .unwrap());
        let left: Vec<Uuid> = store
            .read(|tx| tx.unfinished_migrations())
            .unwrap()
            .iter()
            .map(|m| m.task_id)
            .collect();
        assert_eq!(left, vec![stale.task_id]);
    }
}
