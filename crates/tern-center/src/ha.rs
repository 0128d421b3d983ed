//! HA mode: several centers share the cluster's state in etcd and elect one leader.
//!
//! Layout under the prefix (default `/tern`): `leader` (the leader's name and URL, attached to
//! its lease) and `rows/TABLE/KEY` (one key per row of the store, its columns as JSON).
//!
//! - **State.** Every center keeps a full SQLite copy (its usual store file) and follows etcd:
//!   it loads every row at start, then applies each revision etcd reports in one SQLite
//!   transaction ([`follow`]). The leader's write transactions send their rows to etcd before
//!   SQLite commits ([`EtcdSink`]): one etcd transaction per store transaction, which succeeds
//!   only while the leader key is still the one this center created. That compare is the
//!   fence: a center that lost its lease (paused, cut off) can change nothing in etcd, whatever
//!   it still believes. A write etcd did not answer may have been taken while this copy rolls
//!   it back: the leader then stops, and comes back as a standby that reloads every row.
//! - **Election** ([`campaign`]): create the leader key if absent, attached to a lease of
//!   `lease_ttl` renewed every third of it. The term is the revision that created the key: it
//!   grows with every election. The winner catches up to that revision, then the caller
//!   recovers unfinished work and starts the scheduler and monitors. A leader that cannot
//!   renew within two thirds of the lease time gives up before etcd can elect another, and the
//!   process stops (its service manager starts it again as a standby), as Kubernetes'
//!   controllers do: half-stopped in-process work is never trusted to wind down by itself.
//! - **History.** The leader compacts etcd's history to what is older than
//!   [`COMPACT_EVERY`]; a standby that falls further behind reloads every row.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use tokio::sync::watch;

use crate::config::HaSettings;
use crate::leadership::{LeaderInfo, Leadership};
use crate::store::replica::{RowChange, Schema};
use crate::store::{CommitSink, Db, StoreError};

/// How long one etcd call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Rows read per page when loading the state.
const LOAD_PAGE: i64 = 500;
/// Most operations in one etcd transaction (etcd's `--max-txn-ops` default).
pub const MAX_TXN_OPS: usize = 128;
/// How much of etcd's history the leader keeps (older revisions are compacted away).
pub const COMPACT_EVERY: Duration = Duration::from_secs(300);
/// Compaction frees space inside a member's database file but never shrinks the file, which
/// counts against etcd's quota (2 GiB by default): a member is defragmented once this much of
/// its file is free...
const DEFRAG_MIN_FREE: i64 = 64 << 20;
/// ...and that is at least this share of the file. A defragmentation blocks the member while
/// it rewrites the file, so members are done one after the other, and only when it pays.
const DEFRAG_FREE_SHARE: f64 = 0.5;
/// How long one member's defragmentation may take.
const DEFRAG_TIMEOUT: Duration = Duration::from_secs(120);

impl HaSettings {
    fn leader_key(&self) -> String {
        format!("{}/leader", self.prefix)
    }
    fn rows_prefix(&self) -> String {
        format!("{}/rows/", self.prefix)
    }
    /// The store layout the group's rows are written in (see [`Etcd::check_layout`]).
    fn layout_key(&self) -> String {
        format!("{}/layout", self.prefix)
    }
}

/// Whether a center whose store layout is `ours` may join a group whose rows are written in
/// layout `group`; the refusal says what to do.
fn layout_verdict(group: u32, ours: u32) -> Result<(), String> {
    match group.cmp(&ours) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Greater => Err(format!(
            "the cluster's state in etcd is written in store layout {group}, newer than this \
             center's {ours} (tern {}): run this center at the version of the group's other \
             centers",
            env!("CARGO_PKG_VERSION")
        )),
        std::cmp::Ordering::Less => Err(format!(
            "the cluster's state in etcd is written in store layout {group}, older than this \
             center's {ours} (tern {}): every center of a group must read and write one \
             layout, and this version cannot convert the group's rows yet; run this center at \
             the group's version",
            env!("CARGO_PKG_VERSION")
        )),
    }
}

/// etcd, as this center uses it.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    settings: HaSettings,
}

fn shared(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Shared(format!("{what}: {e}"))
}

async fn timed<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| shared(what, e)),
        Err(_) => Err(shared(what, format!("no answer in {CALL_TIMEOUT:?}"))),
    }
}

impl Etcd {
    /// A client of the etcd cluster (it connects on first use and fails over between
    /// endpoints by itself).
    pub async fn connect(settings: &HaSettings) -> Result<Etcd, StoreError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if let Some(tls) = &settings.tls {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|e| shared(&format!("reading {}", p.display()), e))
            };
            let mut t = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca_file)?));
            if let Some((cert, key)) = &tls.client {
                t = t.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            opts = opts.with_tls(t);
        }
        let client = timed(
            "connecting to etcd",
            Client::connect(settings.endpoints.clone(), Some(opts)),
        )
        .await?;
        Ok(Etcd {
            client,
            settings: settings.clone(),
        })
    }

    /// Checks that the group's rows are written in this center's store layout `ours` (the
    /// number of store migrations it knows); the first center of a group records its own.
    /// Versions of tern with the same layout mix freely in a group (a rolling upgrade); a
    /// center of another layout would write rows the others misread, so it is refused with
    /// the reason. The outer error is etcd's (worth retrying), the inner one the refusal.
    pub async fn check_layout(&self, ours: u32) -> Result<Result<(), String>, StoreError> {
        let key = self.settings.layout_key();
        let mut client = self.client.clone();
        // Claimed if absent; either way the answer holds what is recorded now.
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(key.clone(), ours.to_string(), None)])
            .or_else(vec![TxnOp::get(key.clone(), None)]);
        let resp = timed(
            "reading the group's store layout from etcd",
            client.txn(txn),
        )
        .await?;
        if resp.succeeded() {
            tracing::info!(layout = ours, "recorded the group's store layout in etcd");
            return Ok(Ok(()));
        }
        let recorded = resp.op_responses().into_iter().find_map(|r| match r {
            etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        let Some(recorded) = recorded else {
            return Err(shared(
                "reading the group's store layout from etcd",
                "no value",
            ));
        };
        let Some(group) = std::str::from_utf8(&recorded)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
        else {
            return Ok(Err(format!(
                "etcd's {key} holds {:?}, not a store layout number: is this prefix another \
                 program's?",
                String::from_utf8_lossy(&recorded)
            )));
        };
        Ok(layout_verdict(group, ours))
    }

    /// Every row at one revision: (rows, revision).
    pub async fn load(&self, schema: &Schema) -> Result<(Vec<RowChange>, i64), StoreError> {
        let prefix = self.settings.rows_prefix();
        let end = prefix_end(&prefix);
        let mut client = self.client.clone();
        let mut rows = Vec::new();
        let mut from = prefix.clone().into_bytes();
        let mut revision = 0;
        loop {
            let mut opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LOAD_PAGE);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            let resp = timed("reading the state", client.get(from.clone(), Some(opts))).await?;
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            for kv in resp.kvs() {
                rows.push(self.row_change(schema, kv.key(), Some(kv.value()))?);
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok((rows, revision))
    }

    /// A row key and value from etcd, checked against the schema: a key this tern does not
    /// know is refused, never turned into SQL.
    fn row_change(
        &self,
        schema: &Schema,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<RowChange, StoreError> {
        let bad = |why: &str| {
            StoreError::Corrupt(format!(
                "etcd key {:?}: {why}",
                String::from_utf8_lossy(key)
            ))
        };
        let key = std::str::from_utf8(key).map_err(|_| bad("not UTF-8"))?;
        let rest = key
            .strip_prefix(&self.settings.rows_prefix())
            .ok_or_else(|| bad("outside the rows prefix"))?;
        let (table, row_key) = rest.split_once('/').ok_or_else(|| bad("no table"))?;
        if !schema.has(table) {
            return Err(bad("names no replicated table"));
        }
        let parsed: serde_json::Value =
            serde_json::from_str(row_key).map_err(|_| bad("its row key is not JSON"))?;
        if !parsed.is_array() {
            return Err(bad("its row key is not a JSON array"));
        }
        let row = match value {
            Some(v) => {
                let text = std::str::from_utf8(v).map_err(|_| bad("value not UTF-8"))?;
                let parsed: serde_json::Value =
                    serde_json::from_str(text).map_err(|_| bad("value not JSON"))?;
                if !parsed.is_object() {
                    return Err(bad("value not a JSON object"));
                }
                Some(text.to_string())
            }
            None => None,
        };
        Ok(RowChange {
            table: table.to_string(),
            key: row_key.to_string(),
            row,
        })
    }

    fn row_key(&self, c: &RowChange) -> String {
        format!("{}{}/{}", self.settings.rows_prefix(), c.table, c.key)
    }

    /// Sends one store transaction's rows (at most [`MAX_TXN_OPS`]), fenced by `term`.
    async fn commit(&self, changes: Vec<RowChange>, term: u64) -> Result<(), StoreError> {
        let ops: Vec<TxnOp> = changes
            .iter()
            .map(|c| match &c.row {
                Some(row) => TxnOp::put(self.row_key(c), row.as_bytes(), None),
                None => TxnOp::delete(self.row_key(c), None),
            })
            .collect();
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                self.settings.leader_key(),
                CompareOp::Equal,
                term as i64,
            )])
            .and_then(ops);
        let mut client = self.client.clone();
        let resp = timed("writing the state", client.txn(txn)).await?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(StoreError::NotLeader(format!(
                "this center's leadership (term {term}) ended: another center leads now"
            )))
        }
    }
}

/// Resolves when the shutdown signal is set (holding no borrow of it across an await).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The store's commit hook in HA mode: blocks its (blocking-pool) thread on the etcd call.
pub struct EtcdSink {
    etcd: Etcd,
    leadership: Arc<Leadership>,
    runtime: tokio::runtime::Handle,
}

impl EtcdSink {
    pub fn new(etcd: Etcd, leadership: Arc<Leadership>) -> EtcdSink {
        EtcdSink {
            etcd,
            leadership,
            runtime: tokio::runtime::Handle::current(),
        }
    }
}

impl CommitSink for EtcdSink {
    fn commit(&self, changes: Vec<RowChange>) -> Result<(), StoreError> {
        let term = self.leadership.term();
        if term == 0 {
            return Err(StoreError::NotLeader(self.leadership.refusal()));
        }
        if changes.len() > MAX_TXN_OPS {
            return Err(StoreError::Shared(format!(
                "one change touches {} rows, more than etcd takes in one transaction \
                 ({MAX_TXN_OPS})",
                changes.len()
            )));
        }
        let r = self.runtime.block_on(self.etcd.commit(changes, term));
        match &r {
            Err(StoreError::NotLeader(why)) => self.leadership.lose(why),
            // No answer (a timeout, a broken connection): etcd may have taken the rows that
            // this copy now rolls back. Only a reload mends that, so the leader stops and
            // comes back as a standby that loads every row.
            Err(StoreError::Shared(why)) => self.leadership.lose(&format!(
                "a write's outcome in etcd is unknown ({why}), so this center's copy may \
                 differ from it"
            )),
            _ => {}
        }
        r
    }
}

/// Loads every row into the store, then applies what etcd reports, for as long as the center
/// runs. `applied` carries the last revision seen (rows applied, or skipped as this center's
/// own). Returns only when the shutdown signal is set.
pub async fn follow(
    etcd: Etcd,
    db: Db,
    schema: Schema,
    leadership: Arc<Leadership>,
    applied: watch::Sender<i64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut from = *applied.borrow();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let r = tokio::select! {
            r = follow_from(&etcd, &db, &schema, &leadership, &applied, from) => r,
            _ = stopped(&mut shutdown) => return,
        };
        match r {
            // Fell behind the compacted history: reload everything.
            Ok(()) => from = 0,
            Err(e) => {
                tracing::warn!("following etcd: {e}; retrying in 1 s");
                from = *applied.borrow();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The first load (when `from` is 0) and the watch from there; returns Ok when the watch
/// must restart from a fresh load (compacted past).
async fn follow_from(
    etcd: &Etcd,
    db: &Db,
    schema: &Schema,
    leadership: &Arc<Leadership>,
    applied: &watch::Sender<i64>,
    mut from: i64,
) -> Result<(), StoreError> {
    if from == 0 {
        let (rows, revision) = etcd.load(schema).await?;
        // A leader is the source of every row from its win on: it never reloads.
        if leadership.won_at() == 0 {
            let n = rows.len();
            db.run(move |s| s.apply_replicated(&rows, true)).await?;
            tracing::info!(rows = n, revision, "loaded the cluster's state from etcd");
        }
        let leader = read_leader(etcd).await?;
        leadership.set_leader(leader);
        applied.send_replace(revision);
        from = revision;
    }
    let mut client = etcd.client.clone();
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(from + 1)
        .with_progress_notify();
    let mut stream = timed(
        "watching the state",
        client.watch(format!("{}/", etcd.settings.prefix), Some(opts)),
    )
    .await?;
    let leader_key = etcd.settings.leader_key();
    loop {
        let Some(resp) = stream
            .message()
            .await
            .map_err(|e| shared("watching the state", e))?
        else {
            return Err(shared("watching the state", "etcd ended the watch"));
        };
        if resp.compact_revision() > 0 {
            tracing::warn!(
                compacted = resp.compact_revision(),
                "this center fell behind etcd's compacted history; reloading the state"
            );
            return Ok(());
        }
        if resp.canceled() {
            return Err(shared("watching the state", resp.cancel_reason()));
        }
        // Events arrive in revision order; one revision is one store transaction.
        let mut by_revision: BTreeMap<i64, Vec<RowChange>> = BTreeMap::new();
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            if kv.key() == leader_key.as_bytes() {
                let leader = match ev.event_type() {
                    EventType::Put => serde_json::from_slice::<LeaderInfo>(kv.value()).ok(),
                    EventType::Delete => None,
                };
                leadership.set_leader(leader);
                continue;
            }
            let value = match ev.event_type() {
                EventType::Put => Some(kv.value()),
                EventType::Delete => None,
            };
            match etcd.row_change(schema, kv.key(), value) {
                Ok(c) => by_revision.entry(kv.mod_revision()).or_default().push(c),
                Err(e) => tracing::error!("ignoring a row from etcd: {e}"),
            }
        }
        for (revision, changes) in by_revision {
            let won = leadership.won_at();
            if won == 0 || revision < won {
                db.run(move |s| s.apply_replicated(&changes, false)).await?;
            }
            applied.send_replace(revision);
        }
        if let Some(h) = resp.header() {
            // Progress notifications and the leader key's own revisions move this on too.
            applied.send_if_modified(|r| {
                let newer = h.revision() > *r;
                if newer {
                    *r = h.revision();
                }
                newer
            });
        }
    }
}

async fn read_leader(etcd: &Etcd) -> Result<Option<LeaderInfo>, StoreError> {
    let mut client = etcd.client.clone();
    let resp = timed(
        "reading the leader",
        client.get(etcd.settings.leader_key(), None),
    )
    .await?;
    Ok(resp
        .kvs()
        .first()
        .and_then(|kv| serde_json::from_slice(kv.value()).ok()))
}

/// Runs for election until this center wins, then returns its term once the replica has
/// caught up to it; keeps the lease alive in the background (losing it calls
/// [`Leadership::lose`]).
pub async fn campaign(
    etcd: Etcd,
    leadership: Arc<Leadership>,
    mut applied: watch::Receiver<i64>,
    mut shutdown: watch::Receiver<bool>,
) -> Option<u64> {
    let me = LeaderInfo {
        name: etcd.settings.name.clone(),
        url: etcd.settings.advertise_url.clone(),
    };
    loop {
        let attempt = tokio::select! {
            r = try_lead(&etcd, &me) => r,
            _ = stopped(&mut shutdown) => return None,
        };
        match attempt {
            Ok(Attempt::Won { revision, lease }) => {
                leadership.won(revision);
                tracing::info!(
                    center = me.name,
                    term = revision,
                    "elected leader; catching up"
                );
                tokio::spawn(keep_lease(
                    etcd.clone(),
                    lease,
                    leadership.clone(),
                    shutdown.clone(),
                ));
                if applied.wait_for(|r| *r >= revision).await.is_err() {
                    return None;
                }
                leadership.lead(revision as u64);
                return Some(revision as u64);
            }
            Ok(Attempt::Lost { leader, revision }) => {
                if let Some(l) = &leader {
                    tracing::info!(leader = l.name, url = l.url, "standing by");
                }
                leadership.set_leader(leader);
                tokio::select! {
                    r = leader_gone(&etcd, revision) => {
                        if let Err(e) = r {
                            tracing::warn!("watching the leader: {e}");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                    _ = stopped(&mut shutdown) => return None,
                }
            }
            Err(e) => {
                tracing::warn!("running for leader: {e}; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

enum Attempt {
    Won {
        revision: i64,
        lease: i64,
    },
    Lost {
        leader: Option<LeaderInfo>,
        revision: i64,
    },
}

async fn try_lead(etcd: &Etcd, me: &LeaderInfo) -> Result<Attempt, StoreError> {
    let mut client = etcd.client.clone();
    let ttl = etcd.settings.lease_ttl.as_secs().max(2) as i64;
    let lease = timed("granting a lease", client.lease_grant(ttl, None))
        .await?
        .id();
    let key = etcd.settings.leader_key();
    let value = serde_json::to_vec(me).map_err(|e| shared("encoding the leader", e))?;
    let txn = Txn::new()
        .when(vec![Compare::create_revision(
            key.clone(),
            CompareOp::Equal,
            0,
        )])
        .and_then(vec![TxnOp::put(
            key.clone(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else(vec![TxnOp::get(key, None)]);
    let resp = timed("running for leader", client.txn(txn)).await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    if resp.succeeded() {
        return Ok(Attempt::Won { revision, lease });
    }
    // Not needed: let it go now rather than at its expiry.
    let _ = timed("revoking a lease", client.lease_revoke(lease)).await;
    let leader = resp.op_responses().into_iter().find_map(|r| match r {
        etcd_client::TxnOpResponse::Get(g) => g
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice::<LeaderInfo>(kv.value()).ok()),
        _ => None,
    });
    Ok(Attempt::Lost { leader, revision })
}

/// Resolves when the leader key is deleted after `revision` (its lease expired or was
/// revoked).
async fn leader_gone(etcd: &Etcd, revision: i64) -> Result<(), StoreError> {
    let mut client = etcd.client.clone();
    let opts = WatchOptions::new().with_start_revision(revision + 1);
    let mut stream = timed(
        "watching the leader",
        client.watch(etcd.settings.leader_key(), Some(opts)),
    )
    .await?;
    loop {
        let Some(resp) = stream
            .message()
            .await
            .map_err(|e| shared("watching the leader", e))?
        else {
            return Err(shared("watching the leader", "etcd ended the watch"));
        };
        if resp.compact_revision() > 0 || resp.canceled() {
            return Ok(());
        }
        if resp
            .events()
            .iter()
            .any(|e| e.event_type() == EventType::Delete)
        {
            return Ok(());
        }
    }
}

/// Renews the lease every third of its time; gives the leadership up when two thirds of it
/// passed since the last renewal etcd confirmed (before etcd itself could let it expire), or
/// at once when etcd says it expired.
async fn keep_lease(
    etcd: Etcd,
    lease: i64,
    leadership: Arc<Leadership>,
    mut shutdown: watch::Receiver<bool>,
) {
    let ttl = etcd.settings.lease_ttl;
    let deadline = ttl * 2 / 3;
    let mut last_ok = Instant::now();
    let mut client = etcd.client.clone();
    let mut keeper = None;
    loop {
        if last_ok.elapsed() >= deadline {
            leadership.lose(&format!(
                "its lease was not renewed for {:?} (etcd unreachable?)",
                last_ok.elapsed()
            ));
            return;
        }
        if keeper.is_none() {
            keeper = timed("renewing the lease", client.lease_keep_alive(lease))
                .await
                .ok();
        }
        if let Some((k, s)) = keeper.as_mut() {
            let renewed = timed("renewing the lease", async {
                k.keep_alive().await?;
                s.message().await
            })
            .await;
            match renewed {
                Ok(Some(r)) if r.ttl() > 0 => last_ok = Instant::now(),
                Ok(Some(_)) => {
                    leadership.lose("etcd says its lease expired");
                    return;
                }
                Ok(None) | Err(_) => keeper = None,
            }
        }
        let pause = if keeper.is_some() {
            ttl / 3
        } else {
            Duration::from_millis(500)
        };
        let stopping = tokio::select! {
            _ = tokio::time::sleep(pause) => false,
            _ = stopped(&mut shutdown) => true,
        };
        if stopping {
            // Stepping down on a clean stop lets another center take over at once.
            let _ = timed("revoking the lease", client.lease_revoke(lease)).await;
            return;
        }
    }
}

/// The leader's housekeeping: compacts etcd's history every [`COMPACT_EVERY`] to the
/// revision seen one period before.
pub async fn compactor(etcd: Etcd, mut shutdown: watch::Receiver<bool>) {
    let mut client = etcd.client.clone();
    let mut previous: Option<i64> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(COMPACT_EVERY) => {}
            _ = stopped(&mut shutdown) => return,
        }
        let now = timed(
            "reading the revision",
            client.get(etcd.settings.leader_key(), None),
        )
        .await
        .ok()
        .and_then(|r| r.header().map(|h| h.revision()));
        if let Some(rev) = previous {
            match timed("compacting etcd", client.compact(rev, None)).await {
                Ok(_) => tracing::debug!(revision = rev, "compacted etcd's history"),
                Err(e) => tracing::warn!("{e}"),
            }
            defragment_members(&etcd, DEFRAG_MIN_FREE).await;
        }
        previous = now;
    }
}

/// What [`defragment_members`] did to one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defragmented {
    pub endpoint: String,
    pub before: i64,
    pub after: i64,
}

/// Whether a member whose database file is `size` bytes with `in_use` bytes in use is worth
/// defragmenting (at least `min_free` bytes and [`DEFRAG_FREE_SHARE`] of it free).
fn worth_defragmenting(size: i64, in_use: i64, min_free: i64) -> bool {
    let free = size - in_use;
    free >= min_free && free as f64 >= size as f64 * DEFRAG_FREE_SHARE
}

/// Defragments, one after the other, the members whose files are mostly free space (at least
/// `min_free` bytes); says what each one did. A member that does not answer is left for the
/// next round.
pub async fn defragment_members(etcd: &Etcd, min_free: i64) -> Vec<Defragmented> {
    let mut done = Vec::new();
    for endpoint in &etcd.settings.endpoints {
        let one = HaSettings {
            endpoints: vec![endpoint.clone()],
            ..etcd.settings.clone()
        };
        let mut client = match Etcd::connect(&one).await {
            Ok(e) => e.client,
            Err(e) => {
                tracing::debug!(endpoint, "no defragmentation check: {e}");
                continue;
            }
        };
        let Ok(before) = timed("reading a member's status", client.status()).await else {
            continue;
        };
        if !worth_defragmenting(before.db_size(), before.raft_used_db_size(), min_free) {
            continue;
        }
        let started = std::time::Instant::now();
        match tokio::time::timeout(DEFRAG_TIMEOUT, client.defragment()).await {
            Ok(Ok(_)) => {
                let after = timed("reading a member's status", client.status())
                    .await
                    .map(|s| s.db_size())
                    .unwrap_or(0);
                tracing::info!(
                    endpoint,
                    before_bytes = before.db_size(),
                    after_bytes = after,
                    took_ms = started.elapsed().as_millis() as u64,
                    "defragmented an etcd member's database"
                );
                done.push(Defragmented {
                    endpoint: endpoint.clone(),
                    before: before.db_size(),
                    after,
                });
            }
            Ok(Err(e)) => tracing::warn!(endpoint, "defragmenting an etcd member: {e}"),
            Err(_) => tracing::warn!(
                endpoint,
                "defragmenting an etcd member took over {DEFRAG_TIMEOUT:?}; left for the next round"
            ),
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_store_layout_per_group() {
        assert_eq!(layout_verdict(30, 30), Ok(()));
        let newer = layout_verdict(31, 30).unwrap_err();
        assert!(newer.contains("newer than this center's 30"), "{newer}");
        let older = layout_verdict(29, 30).unwrap_err();
        assert!(older.contains("older than this center's 30"), "{older}");
    }

    #[test]
    fn only_a_mostly_free_file_is_worth_a_members_pause() {
        let mib = 1 << 20;
        assert!(worth_defragmenting(200 * mib, 50 * mib, DEFRAG_MIN_FREE));
        // Little free in absolute terms, or a small share of a big file: left alone.
        assert!(!worth_defragmenting(100 * mib, 50 * mib, DEFRAG_MIN_FREE));
        assert!(!worth_defragmenting(1000 * mib, 800 * mib, DEFRAG_MIN_FREE));
        assert!(!worth_defragmenting(mib, 0, DEFRAG_MIN_FREE));
    }

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end("/tern/rows/"), b"/tern/rows0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }
}
