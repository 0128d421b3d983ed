//! This host's side of live migrations (`/v1/migrations/...`): the source's
//! [`Outgoing`] or the destination's [`IncomingMigration`] of each VM being moved, the guest
//! dirty-rate measurement, and the bandwidth probe between two agents.
//!
//! The agent obeys the center and decides nothing about ownership: it commits, aborts and
//! finishes only when told, and switches over when told or, where the center asked for it, at
//! the pause while the center has been asking within [`SWITCHOVER_LEAVE`]. The one thing it
//! does alone is what `tern_qemu`'s drivers do (a source paused at pre-switchover with nobody
//! deciding resumes itself). At most one migration per VM; each VM's calls run one at a time.
//!
//! Each side of a migration is written to the VM's run dir ([`MigrationRecord`]) while it is
//! under way. QEMU does not need its agent to go on migrating, so a restarted agent
//! re-attaches to what it finds ([`Migrations::recover`]) and the center's next call carries
//! on where the last one left, instead of rolling the migration back.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_api::migration::{
    AbortMigration, AgentMigrationState, AgentMigrationStatus, BandwidthProbe, BandwidthReport,
    BandwidthSink, Commit, Committed, DirtyRateReport, HandedFrame, IncomingReady, ListenIncoming,
    MigrationPhase, MigrationUri, PrepareIncoming, QueuedFrames, StartOutgoing, MAX_HANDED_BYTES,
    MAX_HANDED_FRAMES,
};
use tern_qemu::{
    IncomingMigration, Outgoing, OutgoingOptions, OutgoingStatus, Resume, SwitchoverLeave,
    COMMIT_ANNOUNCE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast::error::RecvError;
use uuid::Uuid;

use crate::error::AgentError;
use crate::frames::{Frame, TapQueue};
use crate::relay::{Relay, RelayCommand};
use crate::store::{MigrationRecord, RunDir};
use crate::vms::VmManager;

/// Longest a status call waits for a state change.
const MAX_WAIT: Duration = Duration::from_secs(10);
/// How recently the center must have asked for a source's status for the source to send its
/// final state at the pause unasked ([`SwitchoverLeave`]): the center asks at least every
/// 0.5 s while it follows pre-copy, so a center silent for longer is hung or gone, and the
/// source then waits for a decision (or its watchdog) as before.
const SWITCHOVER_LEAVE: Duration = Duration::from_secs(1);
/// How long a bandwidth sink waits for its one connection.
const SINK_ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the probe sends at most: short, because the user waits for it. The sink leaves
/// out the first [`PROBE_WARMUP`] of arrivals, so TCP's slow start and a shaper's burst do
/// not count.
const PROBE_TIME: Duration = Duration::from_millis(250);
/// Arrivals the sink leaves out of its steady rate, from the first byte on.
const PROBE_WARMUP: Duration = Duration::from_millis(40);
/// Shortest steady window the sink's rate is trusted for; below, the whole transfer counts.
const PROBE_MIN_STEADY: Duration = Duration::from_millis(100);
/// Chunk the probe writes.
const PROBE_CHUNK: usize = 1 << 20;

enum Role {
    Source(Outgoing),
    Destination(IncomingMigration),
}

struct Slot {
    role: Role,
    /// Serialises the calls on this VM's migration.
    op: tokio::sync::Mutex<()>,
    record: Arc<RecordFile>,
    /// Taken over after an agent restart, and not yet said so to the center (a destination
    /// says it in its answer to the steering call).
    reattached: std::sync::atomic::AtomicBool,
    /// Source: the frames taken off the paused VM's taps for the destination (NIC index,
    /// frame), given back to the taps here if the migration is aborted.
    drained: Mutex<Vec<(usize, Frame)>>,
    /// Destination: the VM's taps take the bridge's floods again (they take none from their
    /// creation until the steer).
    flooded: std::sync::atomic::AtomicBool,
    /// Destination: handed-over frames were delivered (a retried commit must not repeat it).
    delivered: std::sync::atomic::AtomicBool,
    /// Source: when QEMU stopped the guest for the switchover (its `STOP` event).
    stopped_at: Arc<Mutex<Option<chrono::DateTime<chrono::Utc>>>>,
    /// Source: each tap's recording and the plug written into it at the pause, to name the
    /// frames QEMU loses there ([`crate::frames::at_pause`]).
    watched_taps: Mutex<Vec<WatchedTap>>,
    /// Source: the newest end of each NIC's receive ring, read once the guest paused (locked
    /// by the reader until then).
    rings: Arc<tokio::sync::Mutex<HashMap<usize, tern_qemu::ReceiveRingTail>>>,
    /// Destination: the generation it will own the VM under (unknown after an agent restart).
    generation: std::sync::OnceLock<u64>,
    /// Destination: a [`crate::commit_watch`] runs for it.
    watched: std::sync::atomic::AtomicBool,
    /// The relay carrying this migration's encrypted stream, when this agent started one
    /// (stopped if the migration is aborted; it also ends by itself with its streams).
    relay: Mutex<Option<Relay>>,
}

impl Slot {
    fn new(role: Role, record: Arc<RecordFile>) -> Arc<Slot> {
        Arc::new(Slot {
            role,
            op: tokio::sync::Mutex::new(()),
            record,
            reattached: std::sync::atomic::AtomicBool::new(false),
            drained: Mutex::new(Vec::new()),
            flooded: std::sync::atomic::AtomicBool::new(false),
            delivered: std::sync::atomic::AtomicBool::new(false),
            stopped_at: Arc::new(Mutex::new(None)),
            watched_taps: Mutex::new(Vec::new()),
            rings: Arc::new(tokio::sync::Mutex::new(HashMap::new())),
            generation: std::sync::OnceLock::new(),
            watched: std::sync::atomic::AtomicBool::new(false),
            relay: Mutex::new(None),
        })
    }

    /// The source's status, with the moment its guest stopped once known.
    fn source_status(&self, id: Uuid, out: &Outgoing) -> AgentMigrationStatus {
        AgentMigrationStatus {
            stopped_at: *lock(&self.stopped_at),
            ..source_status(id, &out.status())
        }
    }
}

/// The on-disk [`MigrationRecord`] of one migration. Once removed it is never written again:
/// a source's events keep coming for a moment after the center ended its part, and a record
/// written then would make a later agent re-attach to a migration nobody follows.
struct RecordFile {
    run: RunDir,
    /// False once removed.
    live: Mutex<bool>,
}

impl RecordFile {
    fn new(run: RunDir) -> Arc<RecordFile> {
        Arc::new(RecordFile {
            run,
            live: Mutex::new(true),
        })
    }

    fn write(&self, rec: &MigrationRecord) {
        let live = lock(&self.live);
        if !*live {
            return;
        }
        // Not fatal: without the record a restart rolls the migration back, as before.
        if let Err(e) = self.run.write_migration(rec) {
            tracing::warn!(vm = %self.run.id, error = %format!("{e:#}"), "cannot write the migration record");
        }
    }

    fn remove(&self) {
        let mut live = lock(&self.live);
        *live = false;
        self.run.remove_migration();
    }

    /// Keeps a source's record up to date with its events until the migration's driver
    /// and every handle on its status are gone.
    fn follow(
        self: Arc<Self>,
        base: MigrationRecord,
        mut rx: tokio::sync::watch::Receiver<OutgoingStatus>,
    ) {
        tokio::spawn(async move {
            let mut written = None;
            loop {
                let events = rx.borrow_and_update().events.clone();
                if written != Some(events.len()) {
                    written = Some(events.len());
                    let mut rec = base.clone();
                    if let MigrationRecord::Source { events: e, .. } = &mut rec {
                        *e = events;
                    }
                    self.write(&rec);
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The migrations of this host.
pub struct Migrations {
    vms: Arc<VmManager>,
    migration_address: IpAddr,
    /// The program whose `host relay` carries relayed streams (the agent's own binary).
    relay_program: std::path::PathBuf,
    slots: Mutex<HashMap<Uuid, Arc<Slot>>>,
    steerer: crate::steer::Steerer,
    /// How this host's migrations ended since the agent started (for `/metrics`).
    pub ended: MigrationCounts,
}

/// Migrations that ended on this host, by how, since the agent started.
#[derive(Debug, Default)]
pub struct MigrationCounts {
    /// Source: committed elsewhere and finished here.
    pub sent: AtomicU64,
    /// Destination: committed here.
    pub received: AtomicU64,
    /// Source: aborted (the guest runs here again).
    pub aborted_as_source: AtomicU64,
    /// Destination: aborted (the incoming QEMU was removed).
    pub aborted_as_destination: AtomicU64,
    /// Destination: run on the store's word, the commit call having not come
    /// ([`crate::commit_watch`]); also counted in `received`.
    pub committed_from_store: AtomicU64,
    /// Bytes of guest state sent by migrations that completed from here.
    pub bytes_sent: AtomicU64,
}

/// A source's tap during a migration: what the LAN gave it, and the plug for its pause.
struct WatchedTap {
    nic: usize,
    recorder: crate::frames::TapRecorder,
    plug: Frame,
}

/// Migrations in progress on this host, by its role in them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ActiveMigrations {
    pub outgoing: u64,
    pub incoming: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn qemu(e: tern_qemu::Error) -> AgentError {
    match e {
        tern_qemu::Error::Migration(m) => AgentError::Conflict(m),
        other => AgentError::Qemu(other.to_string()),
    }
}

/// How much of a receive ring's last buffer a source reads at the pause: a virtio-net header
/// and a full Ethernet frame (with a VLAN tag). A larger frame spans buffers, and the end it
/// leaves in the last one is told from as much of it.
const LAST_BUFFER_BYTES: usize = 12 + 1518 + 4;

/// How long a source's hand-over waits for the rings read at the pause (read in well under a
/// millisecond; past it, the frame QEMU dropped is judged without them: see
/// [`recover_at_pause`]).
const RING_WAIT: Duration = Duration::from_millis(20);

/// How often a destination's status is read again while the center waits for it to change
/// (QEMU's events wake it sooner).
const DESTINATION_POLL: Duration = Duration::from_millis(5);

/// How long a source's status waits for the moment its paused guest stopped, where the
/// task that hears it has not yet run.
const STOP_WAIT: Duration = Duration::from_secs(1);

/// One tap's queue as a drain found it.
pub(crate) struct DrainedTap {
    nic: usize,
    mac: [u8; 6],
    frames: Vec<Frame>,
}

/// The frames a source's QEMU lost on one tap at the pause ([`crate::frames`]).
pub(crate) struct RecoveredAtPause {
    /// Read and thrown away while the guest was being stopped: handed over, and given back to
    /// a resuming source.
    dropped: Option<Frame>,
    /// `dropped` is presumed, not shown by the guest's receive ring: the guest may get it
    /// twice.
    presumed: bool,
    /// Read after the pause and kept by QEMU: handed over only (a resuming QEMU delivers it).
    kept: Option<Frame>,
}

/// Source, the guest stopped and its taps drained: the frames its QEMU lost on each watched
/// tap, from the tap's recording, its queue, and (for a frame QEMU may have dropped) the
/// newest end of the guest's receive ring (`rings`, by NIC).
fn recover_at_pause(
    id: Uuid,
    watched: &[WatchedTap],
    drained: &[DrainedTap],
    rings: &HashMap<usize, tern_qemu::ReceiveRingTail>,
) -> HashMap<usize, RecoveredAtPause> {
    let mut recovered = HashMap::new();
    for w in watched {
        let Some(tap) = drained.iter().find(|d| d.nic == w.nic) else {
            continue;
        };
        let Some(at) = w
            .recorder
            .with_recorded(|r| crate::frames::at_pause(r, &w.plug, &tap.frames))
        else {
            tracing::info!(vm = %id, nic = w.nic, "the tap's recording does not match its queue: no frame recovered from QEMU");
            continue;
        };
        // A ring QEMU could not show (the commands are experimental, and time-boxed) is read
        // as one that cannot tell: only a plain TCP segment is then named.
        let unknown = tern_qemu::ReceiveRingTail::default();
        let ring = rings.get(&w.nic).unwrap_or(&unknown);
        let dropped = crate::frames::dropped_at_pause(&at, ring, tap.mac);
        let presumed = dropped
            .as_ref()
            .is_some_and(|d| d.proof == crate::frames::DropProof::Presumed);
        recovered.insert(
            w.nic,
            RecoveredAtPause {
                dropped: dropped.map(|d| d.frame),
                presumed,
                kept: at.kept,
            },
        );
    }
    recovered
}

/// The time of the STOP among the QMP events `events` already holds, if any.
fn queued_stop(
    events: &mut tokio::sync::broadcast::Receiver<tern_qemu::QmpEvent>,
) -> Option<chrono::DateTime<chrono::Utc>> {
    use tokio::sync::broadcast::error::TryRecvError;
    loop {
        match events.try_recv() {
            Ok(e) if e.name == "STOP" => return Some(e.timestamp),
            Ok(_) | Err(TryRecvError::Lagged(_)) => {}
            Err(TryRecvError::Empty | TryRecvError::Closed) => return None,
        }
    }
}

/// From drained taps: the frames for the VM's MACs (and broadcast and multicast ones, with
/// `keep_flooded`), oldest first, within the hand-over's limits, with what was left out
/// counted; and every frame kept that came off a tap or that QEMU dropped (NIC index,
/// frame), those over the limits included, for a source to give back if the migration is
/// aborted. Plugs are left out. What QEMU lost on a NIC (`recovered`) is older than its queue.
///
/// A source keeps broadcasts: they reached it after its guest stopped, and the
/// destination's taps took none before its steer (the commit drops those both got after
/// it). A destination handing frames back keeps none: the source's taps got their own.
pub(crate) fn select_for_hand_over(
    drained: Vec<DrainedTap>,
    recovered: &HashMap<usize, RecoveredAtPause>,
    keep_flooded: bool,
) -> (QueuedFrames, Vec<(usize, Frame)>) {
    let mut queued = QueuedFrames::default();
    let mut taken = Vec::new();
    let mut bytes = 0usize;
    for DrainedTap { nic, mac, frames } in drained {
        let lost = recovered.get(&nic);
        // (frame, recovered from QEMU, given back on an abort)
        let from_qemu = lost.into_iter().flat_map(|l| {
            let dropped = l.dropped.iter().map(|f| (f.clone(), true, true));
            dropped.chain(l.kept.iter().map(|f| (f.clone(), true, false)))
        });
        let all = from_qemu.chain(frames.into_iter().map(|f| (f, false, true)));
        for (f, recovered_here, give_back) in all {
            if f.is_plug() {
                continue;
            }
            if f.is_flooded() && !keep_flooded {
                queued.skipped_flooded += 1;
                continue;
            }
            if !f.is_flooded() && f.destination() != Some(mac) {
                queued.skipped_foreign += 1;
                continue;
            }
            if queued.frames.len() >= MAX_HANDED_FRAMES || bytes + f.data.len() > MAX_HANDED_BYTES {
                queued.skipped_over_limit += 1;
            } else {
                bytes += f.data.len();
                queued.recovered += u32::from(recovered_here);
                queued.frames.push(HandedFrame {
                    nic: nic as u16,
                    header: f.header,
                    data: f.data.clone(),
                });
            }
            if give_back {
                taken.push((nic, f));
            }
        }
    }
    (queued, taken)
}

/// The frames a resuming source's NIC `nic` gets, in arrival order: those taken off its tap
/// for the destination (`own`, the oldest), those the destination's taps got after the steer
/// and handed back (`handed`: only frames for this NIC's MAC), then those its tap got since
/// the LAN was steered back (`queued`, the newest). Plugs are left out.
pub(crate) fn hand_back_order(
    nic: usize,
    mac: [u8; 6],
    own: Vec<Frame>,
    handed: &[HandedFrame],
    queued: Vec<Frame>,
) -> Vec<Frame> {
    let mut frames = own;
    frames.extend(
        handed
            .iter()
            .filter(|f| usize::from(f.nic) == nic)
            .map(|f| Frame {
                header: f.header,
                data: f.data.clone(),
            })
            .filter(|f| f.data.len() >= 14 && f.destination() == Some(mac))
            .take(MAX_HANDED_FRAMES),
    );
    frames.extend(queued);
    frames.retain(|f| !f.is_plug());
    frames
}

/// What a destination's guest reads at the commit on one NIC: the frames `handed` over from
/// the source, then those this host's tap queued since the steer (`own`, oldest first), less
/// the broadcasts and multicasts both taps got (from the steer until the source's were
/// drained): the longest run of flooded frames that ends the handed ones and begins this
/// tap's own. Returns the frames and how many copies were left out.
pub(crate) fn merge_handed(handed: Vec<Frame>, own: Vec<Frame>) -> (Vec<Frame>, usize) {
    let theirs: Vec<&[u8]> = handed
        .iter()
        .filter(|f| f.is_flooded())
        .map(|f| f.data.as_slice())
        .collect();
    let ours: Vec<usize> = (0..own.len()).filter(|&i| own[i].is_flooded()).collect();
    let mut overlap = theirs.len().min(ours.len());
    while overlap > 0
        && !(0..overlap).all(|k| theirs[theirs.len() - overlap + k] == own[ours[k]].data.as_slice())
    {
        overlap -= 1;
    }
    let copies = &ours[..overlap];
    let mut frames = handed;
    frames.extend(
        own.into_iter()
            .enumerate()
            .filter(|(i, _)| !copies.contains(i))
            .map(|(_, f)| f),
    );
    (frames, overlap)
}

fn source_status(id: Uuid, s: &OutgoingStatus) -> AgentMigrationStatus {
    AgentMigrationStatus {
        vm: id,
        state: s.state,
        progress: Some(s.progress.clone()),
        downtime_ms: s.report.as_ref().map(|r| r.downtime_ms),
        setup_ms: s.report.as_ref().map(|r| r.setup_ms),
        total_ms: s.report.as_ref().map(|r| r.total_ms),
        error: s.error.clone(),
        events: s.events.clone(),
        bytes: s.report.as_ref().map(|r| r.bytes),
        passes: s.report.as_ref().map(|r| r.passes),
        paused_ms: s.report.as_ref().map(|r| r.paused_ms),
        postcopy: s.report.as_ref().is_some_and(|r| r.postcopy)
            || s.progress.phase == MigrationPhase::PostCopy,
        stopped_at: None,
    }
}

impl Migrations {
    /// `relay_program host relay` carries the streams the settings say are relayed.
    pub fn new(
        vms: Arc<VmManager>,
        migration_address: IpAddr,
        relay_program: std::path::PathBuf,
    ) -> Arc<Migrations> {
        Arc::new(Migrations {
            vms,
            migration_address,
            relay_program,
            slots: Mutex::new(HashMap::new()),
            steerer: crate::steer::Steerer::default(),
            ended: MigrationCounts::default(),
        })
    }

    /// The migrations in progress here now.
    pub fn active(&self) -> ActiveMigrations {
        let mut a = ActiveMigrations::default();
        for slot in lock(&self.slots).values() {
            match slot.role {
                Role::Source(_) => a.outgoing += 1,
                Role::Destination(_) => a.incoming += 1,
            }
        }
        a
    }

    fn slot(&self, id: Uuid) -> Result<Arc<Slot>, AgentError> {
        lock(&self.slots)
            .get(&id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("no migration of VM {id} on this host")))
    }

    /// Refuses a second migration of a VM while one is going; a finished one is forgotten.
    async fn make_room(&self, id: Uuid) -> Result<(), AgentError> {
        let Ok(slot) = self.slot(id) else {
            return Ok(());
        };
        let busy = match &slot.role {
            Role::Source(o) => !matches!(
                o.status().state,
                AgentMigrationState::Failed | AgentMigrationState::Cancelled
            ),
            Role::Destination(i) => !matches!(
                i.status().await.state,
                AgentMigrationState::Failed | AgentMigrationState::Cancelled
            ),
        };
        if busy {
            return Err(AgentError::Conflict(format!(
                "VM {id} is already being migrated on this host: abort that migration first"
            )));
        }
        self.forget(id, &slot);
        Ok(())
    }

    /// Ends this host's part in a migration: no restart re-attaches to it.
    /// Destination: the generation a [`crate::commit_watch`] should look for, the first time
    /// it is asked for this migration (`None` after that, for a source, or when unknown).
    pub fn watch_for_commit(&self, id: Uuid) -> Option<u64> {
        let slot = self.slot(id).ok()?;
        if !matches!(slot.role, Role::Destination(_)) || slot.watched.swap(true, Ordering::Relaxed)
        {
            return None;
        }
        slot.generation.get().copied()
    }

    /// Destination: the migration is neither committed nor aborted yet.
    pub fn awaits_commit(&self, id: Uuid) -> bool {
        self.slot(id)
            .is_ok_and(|s| matches!(s.role, Role::Destination(_)))
    }

    /// Counts a commit [`crate::commit_watch`] made from the store's word.
    pub fn count_self_commit(&self) {
        self.ended
            .committed_from_store
            .fetch_add(1, Ordering::Relaxed);
    }

    fn forget(&self, id: Uuid, slot: &Slot) {
        slot.record.remove();
        self.vms.set_migration_threads(id, 0);
        let mut slots = lock(&self.slots);
        if slots
            .get(&id)
            .is_some_and(|s| std::ptr::eq(Arc::as_ptr(s), slot))
        {
            slots.remove(&id);
        }
    }

    /// At agent start, before the API serves: re-attaches to every migration the run dirs
    /// record and whose QEMU still runs. A source found paused at pre-switchover is resumed
    /// at once ([`Outgoing::attach`]); a source whose migration cannot be taken over is
    /// cancelled, as one with no record would be.
    pub async fn recover(&self) {
        let runs = match self.vms.run_dirs() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot list the run dirs for migrations to re-attach to");
                return;
            }
        };
        for run in runs {
            let Some(rec) = run.read_migration() else {
                continue;
            };
            let id = run.id;
            let Ok(vm) = self.vms.live_qemu(id) else {
                tracing::warn!(vm = %id, "a migration was under way but its QEMU is gone or does not answer: not re-attaching (the center rolls the migration back)");
                run.remove_migration();
                continue;
            };
            let record = RecordFile::new(run.clone());
            match rec {
                MigrationRecord::Source {
                    uri,
                    settings,
                    started_unix_ms,
                    was_running,
                    events,
                } => {
                    let resume = Resume {
                        elapsed: Duration::from_millis(
                            unix_ms_now().saturating_sub(started_unix_ms),
                        ),
                        was_running,
                        events,
                    };
                    match Outgoing::attach(
                        vm.clone(),
                        &settings,
                        OutgoingOptions::default(),
                        resume,
                    )
                    .await
                    {
                        Ok(out) => {
                            tracing::info!(vm = %id, state = ?out.status().state, "re-attached to an outgoing migration after a restart");
                            record.clone().follow(
                                MigrationRecord::Source {
                                    uri,
                                    settings,
                                    started_unix_ms,
                                    was_running,
                                    events: Vec::new(),
                                },
                                out.watch(),
                            );
                            lock(&self.slots).insert(id, Slot::new(Role::Source(out), record));
                        }
                        Err(e) => {
                            tracing::warn!(vm = %id, error = %e, "cannot re-attach to the outgoing migration: cancelling it");
                            record.remove();
                            let name = self.vms.get(id).map(|r| r.spec.name).unwrap_or_default();
                            tokio::spawn(async move {
                                crate::vms::cancel_orphan_migration(&vm, &name).await
                            });
                        }
                    }
                }
                MigrationRecord::Destination { uri } => {
                    tracing::info!(vm = %id, ?uri, "re-attached to an incoming migration after a restart");
                    let slot =
                        Slot::new(Role::Destination(IncomingMigration::adopt(vm, uri)), record);
                    slot.reattached
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    lock(&self.slots).insert(id, slot);
                }
            }
        }
    }

    /// Agent shutdown: lets every outgoing migration go on in QEMU alone. Their records stay,
    /// so the next agent re-attaches to them; incoming ones need nothing (QEMU listens on).
    pub async fn release(&self) {
        let slots: Vec<Arc<Slot>> = lock(&self.slots).drain().map(|(_, s)| s).collect();
        for slot in slots {
            if let Role::Source(out) = &slot.role {
                out.detach().await;
            }
        }
    }

    /// Destination: starts the paused QEMU and (given the settings) listens for this VM's
    /// stream.
    pub async fn incoming(
        &self,
        id: Uuid,
        req: PrepareIncoming,
    ) -> Result<IncomingReady, AgentError> {
        self.make_room(id).await?;
        // A relayed destination's QEMU listens once its relay is set up, below.
        let relayed = req
            .settings
            .as_ref()
            .filter(|s| self.relay_for(s, req.key.as_ref()).is_some());
        let incoming = self
            .vms
            .prepare_incoming(
                id,
                req.spec,
                req.generation,
                if relayed.is_some() {
                    None
                } else {
                    req.settings.as_ref()
                },
                req.key.as_ref(),
                self.migration_address,
            )
            .await?;
        let mut relay = None;
        if let Some(settings) = relayed {
            match self
                .listen_relayed(id, &incoming, settings, req.key.as_ref())
                .await
            {
                Ok(r) => relay = Some(r),
                Err(e) => {
                    if let Err(e) = self.vms.remove_idle(id).await {
                        tracing::warn!(vm = %id, error = %e, "removing the destination whose relay did not start");
                    }
                    return Err(e);
                }
            }
        }
        let uri = incoming.uri();
        let record = RecordFile::new(self.vms.run_dir(id));
        record.write(&MigrationRecord::Destination { uri });
        let slot = Slot::new(Role::Destination(incoming), record);
        *lock(&slot.relay) = relay;
        let _ = slot.generation.set(req.generation);
        lock(&self.slots).insert(id, slot);
        // QEMU's incoming coroutine and each multifd channel's thread work in the VM's
        // cgroup (a destination prepared without settings gets its channels at `listen`).
        let channels = req.settings.as_ref().map_or(0, |s| s.multifd_channels);
        self.vms.set_migration_threads(id, 1 + channels);
        // This host will steer the LAN at switchover: have the netlink connection ready.
        self.steerer.warm_up().await;
        Ok(IncomingReady { uri })
    }

    /// Destination prepared without settings: configures QEMU like the source and listens.
    pub async fn listen(&self, id: Uuid, req: ListenIncoming) -> Result<IncomingReady, AgentError> {
        let slot = self.slot(id)?;
        let _op = slot.op.lock().await;
        let Role::Destination(incoming) = &slot.role else {
            return Err(AgentError::Conflict(format!(
                "VM {id} is the source of its migration here, not the destination"
            )));
        };
        let uri = if self.relay_for(&req.settings, req.key.as_ref()).is_some() {
            let relay = self
                .listen_relayed(id, incoming, &req.settings, req.key.as_ref())
                .await?;
            *lock(&slot.relay) = Some(relay);
            incoming.uri().ok_or_else(|| {
                AgentError::Internal(anyhow::anyhow!("the relayed destination has no address"))
            })?
        } else {
            incoming
                .listen(&req.settings, req.key.as_ref(), self.migration_address)
                .await
                .map_err(qemu)?
        };
        self.vms
            .set_migration_threads(id, 1 + req.settings.multifd_channels);
        slot.record
            .write(&MigrationRecord::Destination { uri: Some(uri) });
        Ok(IncomingReady { uri: Some(uri) })
    }

    /// Source: starts sending the running VM to `req.uri`.
    pub async fn outgoing(&self, id: Uuid, req: StartOutgoing) -> Result<(), AgentError> {
        self.make_room(id).await?;
        let vm = self.vms.live_qemu(id)?;
        // Recorded before QEMU is told to migrate: an agent killed right after `migrate`
        // must find the record to re-attach to (without one it would cancel the migration
        // the center believes started). A record whose QEMU never migrated is dropped at
        // the restart.
        let record = RecordFile::new(self.vms.run_dir(id));
        let base = MigrationRecord::Source {
            uri: req.uri,
            settings: req.settings.clone(),
            started_unix_ms: unix_ms_now(),
            was_running: matches!(vm.status().await, Ok(tern_qemu::RunState::Running)),
            events: Vec::new(),
        };
        record.write(&base);
        let mut opts = OutgoingOptions {
            switchover_leave: req
                .switch_over_at_pause
                .then(|| SwitchoverLeave::new(SWITCHOVER_LEAVE)),
            ..OutgoingOptions::default()
        };
        let mut relay = None;
        if let (Some(program), Some(key)) = (
            self.relay_for(&req.settings, req.key.as_ref()),
            req.key.as_ref(),
        ) {
            let socket = match tern_qemu::relay_socket(&vm) {
                Ok(s) => s,
                Err(e) => {
                    record.remove();
                    return Err(qemu(e));
                }
            };
            let command = RelayCommand::Send {
                from: socket.clone(),
                owner: tern_qemu::process_owner(vm.pid()),
                to: req.uri.addr(),
                bind: req.settings.relay_source,
            };
            match self.start_relay(id, program, &command, key).await {
                Ok(r) => relay = Some(r),
                Err(e) => {
                    record.remove();
                    return Err(e);
                }
            }
            opts.relay = Some(socket);
        }
        let out = match Outgoing::start(vm, &req.uri, &req.settings, req.key.as_ref(), opts).await {
            Ok(out) => out,
            Err(e) => {
                record.remove();
                if let Some(r) = relay {
                    r.stop();
                }
                return Err(qemu(e));
            }
        };
        record.clone().follow(base, out.watch());
        // QEMU's migration thread and each multifd channel's work in the VM's cgroup.
        self.vms
            .set_migration_threads(id, 1 + req.settings.multifd_channels);
        let slot = Slot::new(Role::Source(out), record);
        *lock(&slot.relay) = relay;
        if let Role::Source(out) = &slot.role {
            self.plug_at_pause(id, out, &slot);
        }
        lock(&self.slots).insert(id, slot);
        Ok(())
    }

    /// The relay program that carries a migration with these settings, if one does: a
    /// relayed encrypted stream (else QEMU's TLS carries it, or it is clear).
    fn relay_for(
        &self,
        settings: &tern_api::migration::MigrationSettings,
        key: Option<&tern_api::migration::MigrationKey>,
    ) -> Option<&std::path::Path> {
        (settings.encrypted && settings.relayed && key.is_some())
            .then_some(self.relay_program.as_path())
    }

    /// Starts a relay for VM `id`'s migration, logging to its run dir, in the VM's CPU group.
    async fn start_relay(
        &self,
        id: Uuid,
        program: &std::path::Path,
        command: &RelayCommand,
        key: &tern_api::migration::MigrationKey,
    ) -> Result<Relay, AgentError> {
        let log = self.vms.run_dir(id).dir.join("relay.log");
        let relay = Relay::spawn(program, command, key, &log)
            .await
            .map_err(|e| AgentError::Internal(e.context("starting the migration relay")))?;
        self.vms.join_migration_cpu(id, relay.pid);
        tracing::info!(vm = %id, pid = relay.pid, endpoint = %relay.endpoint, "migration relay started");
        Ok(relay)
    }

    /// Destination: QEMU listens in clear on its run dir's socket, and a relay on the
    /// migration address receives the encrypted stream for it; the relay's address is the
    /// destination's URI.
    async fn listen_relayed(
        &self,
        id: Uuid,
        incoming: &IncomingMigration,
        settings: &tern_api::migration::MigrationSettings,
        key: Option<&tern_api::migration::MigrationKey>,
    ) -> Result<Relay, AgentError> {
        let (Some(program), Some(key)) = (self.relay_for(settings, key), key) else {
            return Err(AgentError::Internal(anyhow::anyhow!(
                "a relayed destination needs encrypted settings and a key"
            )));
        };
        let socket = incoming.listen_for_relay(settings).await.map_err(qemu)?;
        let command = RelayCommand::Receive {
            on: self.migration_address,
            to: socket,
            from: settings.relay_source,
        };
        let relay = self.start_relay(id, program, &command, key).await?;
        let uri = relay
            .endpoint
            .parse::<SocketAddr>()
            .map_err(|e| e.to_string())
            .and_then(MigrationUri::new)
            .map_err(|e| {
                relay.stop();
                AgentError::Internal(anyhow::anyhow!(
                    "the relay's address {:?}: {e}",
                    relay.endpoint
                ))
            })?;
        incoming.relayed_at(uri);
        Ok(relay)
    }

    /// Writes back into a resuming source's taps what it took off them for the destination,
    /// what the destination hands back, and what arrived since ([`hand_back_order`]).
    fn give_back(&self, id: Uuid, pid: u32, drained: Vec<(usize, Frame)>, handed: &[HandedFrame]) {
        if drained.is_empty() && handed.is_empty() {
            return;
        }
        let Ok(rt) = self.vms.get(id) else {
            return;
        };
        let mut own: HashMap<usize, Vec<Frame>> = HashMap::new();
        for (i, f) in drained {
            own.entry(i).or_default().push(f);
        }
        for (i, nic) in rt.spec.nics.iter().enumerate() {
            let Ok(mac) = crate::steer::parse_mac(&nic.mac) else {
                continue;
            };
            let mine = own.remove(&i).unwrap_or_default();
            if mine.is_empty() && !handed.iter().any(|f| usize::from(f.nic) == i) {
                continue;
            }
            let tap = crate::tap::tap_name(id, i);
            let result = TapQueue::of_process(pid, &tap)
                .and_then(|q| q.drain())
                .and_then(|queued| {
                    let frames = hand_back_order(i, mac, mine, handed, queued);
                    crate::frames::deliver(&tap, &frames)
                });
            match result {
                Ok(n) => tracing::info!(vm = %id, tap, n, "frames given back to the source's tap"),
                Err(e) => tracing::warn!(vm = %id, tap, error = %e, "frames not given back"),
            }
        }
    }

    /// Source: from now on, records what the LAN gives each of the VM's taps; and the moment
    /// the guest pauses (QEMU's `STOP` event, read straight off the QMP socket: the driver's
    /// next status is a round trip later), writes a plug into each of them for QEMU to park
    /// instead of a real frame ([`crate::frames`]).
    fn plug_at_pause(&self, id: Uuid, out: &Outgoing, slot: &Slot) {
        let Ok(rt) = self.vms.get(id) else {
            return;
        };
        let stopped_at = slot.stopped_at.clone();
        let mut watched = Vec::new();
        // Bound now: at the pause there is no time for it.
        let mut writers: Vec<(crate::frames::TapWriter, Frame)> = Vec::new();
        for (nic, n) in rt.spec.nics.iter().enumerate() {
            let Ok(mac) = crate::steer::parse_mac(&n.mac) else {
                continue;
            };
            let tap = crate::tap::tap_name(id, nic);
            let plug = crate::frames::plug_frame(mac);
            // The plug takes the bridge's path, so the recording holds it in its place.
            match crate::frames::TapWriter::open_recorded(&tap) {
                Ok(w) => writers.push((w, plug.clone())),
                Err(e) => {
                    tracing::warn!(vm = %id, tap, error = %e, "no plug for this tap");
                    continue;
                }
            }
            match crate::frames::TapRecorder::start(&tap) {
                Ok(recorder) => watched.push(WatchedTap {
                    nic,
                    recorder,
                    plug,
                }),
                Err(e) => {
                    tracing::warn!(vm = %id, tap, error = %e, "this tap's frames are not recorded")
                }
            }
        }
        let nics: Vec<usize> = watched.iter().map(|w| w.nic).collect();
        *lock(&slot.watched_taps) = watched;
        let mut events = out.vm().qmp().events();
        let mut status = out.watch();
        let vm = out.vm().clone();
        // Held until the rings are read (or the migration ends without a pause).
        let Ok(mut rings) = slot.rings.clone().try_lock_owned() else {
            return;
        };
        tokio::spawn(async move {
            let stopped = loop {
                // QEMU's events first: a starved agent may run this task only once the
                // migration has ended, with its STOP queued all the while.
                tokio::select! {
                    biased;
                    ev = events.recv() => match ev {
                        Ok(e) if e.name == "STOP" => break (e.timestamp, chrono::Utc::now()),
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    changed = status.changed() => {
                        let ended = changed.is_err() || !matches!(
                            status.borrow().state,
                            AgentMigrationState::Active | AgentMigrationState::PreSwitchover
                        );
                        if ended {
                            // QEMU sends its STOP before it reports the migration over, so a
                            // pause is among what has come in by now; without one, the
                            // migration ended unpaused: nothing to plug.
                            match queued_stop(&mut events) {
                                Some(at) => break (at, chrono::Utc::now()),
                                None => return,
                            }
                        }
                    }
                }
            };
            for (writer, plug) in &writers {
                writer.write(std::slice::from_ref(plug));
            }
            let (stopped, heard) = stopped;
            *lock(&stopped_at) = Some(stopped);
            let us = |d: chrono::TimeDelta| d.num_microseconds().unwrap_or(-1);
            let (after_us, heard_us) = (us(chrono::Utc::now() - stopped), us(heard - stopped));
            tracing::info!(vm = %id, after_us, heard_us, "plugged the paused guest's taps");
            // The guest's receive rings no longer move: read each NIC's newest buffers now, while
            // the source waits for the hand-over decision, not on the way to the commit.
            for nic in nics {
                match vm.receive_ring_tail(nic, LAST_BUFFER_BYTES).await {
                    Ok(Some(ring)) => {
                        rings.insert(nic, ring);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::info!(vm = %id, nic, error = %e, "cannot read the guest's receive ring: of what QEMU dropped at the pause, only a plain TCP segment is recovered")
                    }
                }
            }
        });
    }

    /// The migration's state; with `wait`, answers as soon as the state differs from
    /// `unless` (or when `wait` is over).
    pub async fn status(
        &self,
        id: Uuid,
        unless: Option<AgentMigrationState>,
        wait: Duration,
    ) -> Result<AgentMigrationStatus, AgentError> {
        let slot = self.slot(id)?;
        let wait = wait.min(MAX_WAIT);
        match &slot.role {
            Role::Source(out) => {
                // The center asks, so it is there: the source may switch over at its pause.
                out.decider_heard();
                if let Some(unless) = unless {
                    let mut rx = out.watch();
                    let _ = tokio::time::timeout(wait, rx.wait_for(|s| s.state != unless)).await;
                }
                // Once all is sent, the moment the guest stopped is set by the task that heard
                // QEMU's STOP, which holds the rings until it is done; a starved agent may run
                // it after the state moved on. (Not at pre-switchover: that answer is on the
                // pause's path and needs no stop time.)
                let sent = out.status().state == AgentMigrationState::Completed;
                if sent && lock(&slot.stopped_at).is_none() {
                    let _ = tokio::time::timeout(STOP_WAIT, slot.rings.lock()).await;
                }
                Ok(slot.source_status(id, out))
            }
            Role::Destination(inc) => {
                let deadline = Instant::now() + wait;
                // QEMU's MIGRATION event says the stream is in the moment it is: the center
                // asks while the final state is still on its way, and that answer is on the
                // pause's path. The poll is the fallback for an event missed.
                let mut events = inc.vm().qmp().events();
                let mut events_open = true;
                loop {
                    let s = inc.status().await;
                    if unless.is_none_or(|u| u != s.state) || Instant::now() >= deadline {
                        return Ok(AgentMigrationStatus {
                            error: s.error,
                            ..AgentMigrationStatus::new(id, s.state)
                        });
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    tokio::select! {
                        _ = tokio::time::sleep(DESTINATION_POLL.min(left)) => {}
                        e = events.recv(), if events_open => {
                            events_open = !matches!(e, Err(RecvError::Closed));
                        }
                    }
                }
            }
        }
    }

    /// Destination, while the source holds the guest paused at pre-switchover: checks this
    /// host still listens for the VM's stream, then steers the LAN to the VM's taps here
    /// ([`crate::steer`]) so frames sent during the switchover wait in this host's tap queue
    /// instead of dying at the paused source. Steering is an optimisation: when it fails the
    /// answer still says `Listening`, with the failure in `events`, and the hand-over goes on
    /// (the guest announces itself when it runs, as without steering).
    pub async fn steer(&self, id: Uuid) -> Result<AgentMigrationStatus, AgentError> {
        let slot = self.slot(id)?;
        // No lock and no QMP: the destination QEMU's monitor does not answer while it loads
        // the stream, and this runs while the guest is paused. Racing an abort is harmless
        // (a removed tap fails the steering, and the source re-announces when it resumes).
        let inc = match &slot.role {
            Role::Destination(inc) => inc,
            Role::Source(out) => return self.steer_back(id, slot.source_status(id, out)).await,
        };
        let ended = inc.vm().exit_reason();
        // Only a commit runs the guest here: alive means listening or holding it paused.
        let state = if ended.is_some() {
            AgentMigrationState::Failed
        } else {
            AgentMigrationState::Listening
        };
        let mut status = AgentMigrationStatus {
            error: ended.map(|r| format!("destination QEMU ended: {r}")),
            ..AgentMigrationStatus::new(id, state)
        };
        if slot
            .reattached
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            status.events.push(
                "re-attached to this migration after the agent restarted: the incoming QEMU \
                 went on receiving meanwhile"
                    .into(),
            );
        }
        if status.state != AgentMigrationState::Listening {
            return Ok(status);
        }
        let Some(bridge) = self.vms.bridge() else {
            return Ok(status);
        };
        let spec = self.vms.get(id)?.spec;
        let mut flooded = true;
        for (i, nic) in spec.nics.iter().enumerate() {
            let tap = crate::tap::tap_name(id, i);
            let started = Instant::now();
            let r = match crate::steer::parse_mac(&nic.mac) {
                Ok(mac) => {
                    // The paused QEMU here parks the first frame it reads, ahead of everything
                    // handed over: let that be a plug, not the first frame steered here.
                    if let Err(e) = crate::frames::deliver(&tap, &[crate::frames::plug_frame(mac)])
                    {
                        tracing::warn!(vm = %id, tap, error = %e, "no plug for the destination's tap");
                    }
                    // From here broadcasts queue for the guest here too (the paused source
                    // still gets its copies: the commit's hand-over merges the two).
                    if let Err(e) = self.steerer.set_flooding(&tap, true).await {
                        flooded = false;
                        tracing::warn!(vm = %id, tap, error = %e, "floods not let through at the steer");
                    }
                    self.steerer.steer(bridge, &tap, mac).await
                }
                Err(e) => Err(e),
            };
            status.events.push(match r {
                Ok(()) => format!(
                    "steered the LAN to {tap} for MAC {} ({} µs): {bridge}'s entry points at the \
                     tap and a RARP taught the switches",
                    nic.mac,
                    started.elapsed().as_micros()
                ),
                Err(e) => {
                    tracing::warn!(vm = %id, error = %e, "steering failed");
                    format!("could not steer the LAN to {tap} ({e}); the guest announces itself when it runs")
                }
            });
        }
        slot.flooded
            .store(flooded, std::sync::atomic::Ordering::Relaxed);
        Ok(status)
    }

    /// Destination, before the guest runs: its taps take the bridge's floods (the steer does
    /// it; this is for a commit without one, or after one that failed). Best effort: a guest
    /// that gets no broadcasts cannot be found by new clients, so failures are logged loudly.
    async fn let_floods_in(&self, id: Uuid) {
        if self.vms.bridge().is_none() {
            return;
        }
        let Ok(rt) = self.vms.get(id) else {
            return;
        };
        for i in 0..rt.spec.nics.len() {
            let tap = crate::tap::tap_name(id, i);
            if let Err(e) = self.steerer.set_flooding(&tap, true).await {
                tracing::error!(vm = %id, tap, error = %e, "the guest's tap takes no floods: it gets no broadcasts");
            }
        }
    }

    /// Source, in a rollback after the destination steered the LAN: points the LAN back at
    /// this host's taps (bridge entry and RARP), so frames for the VM queue here for the guest
    /// that is about to resume instead of at the destination that is about to go.
    async fn steer_back(
        &self,
        id: Uuid,
        mut status: AgentMigrationStatus,
    ) -> Result<AgentMigrationStatus, AgentError> {
        let Some(bridge) = self.vms.bridge() else {
            return Ok(status);
        };
        let spec = self.vms.get(id)?.spec;
        for (i, nic) in spec.nics.iter().enumerate() {
            let tap = crate::tap::tap_name(id, i);
            let r = match crate::steer::parse_mac(&nic.mac) {
                Ok(mac) => self.steerer.steer(bridge, &tap, mac).await,
                Err(e) => Err(e),
            };
            status.events.push(match r {
                Ok(()) => format!("steered the LAN back to {tap} for MAC {}", nic.mac),
                Err(e) => {
                    tracing::warn!(vm = %id, error = %e, "steering back failed");
                    format!("could not steer the LAN back to {tap} ({e}); the guest announces itself when it resumes")
                }
            });
        }
        Ok(status)
    }

    /// Source: the guest's dirty rate, measured by QEMU over `duration_ms`.
    pub async fn measure(&self, id: Uuid, duration_ms: u32) -> Result<DirtyRateReport, AgentError> {
        let vm = self.vms.live_qemu(id)?;
        let period = Duration::from_millis(u64::from(duration_ms));
        let rate = vm.measure_dirty_rate(period).await.map_err(|e| match e {
            tern_qemu::Error::Config(m) => AgentError::BadRequest(m),
            other => AgentError::Qemu(other.to_string()),
        })?;
        Ok(DirtyRateReport {
            dirty_rate_mib_s: rate.dirty_rate_mib_per_s.unwrap_or(0) as f64,
            duration_ms,
        })
    }

    /// Source: sends the final state; answers once everything is sent (or it failed).
    pub async fn switchover(&self, id: Uuid) -> Result<AgentMigrationStatus, AgentError> {
        let slot = self.slot(id)?;
        let _op = slot.op.lock().await;
        let Role::Source(out) = &slot.role else {
            return Err(AgentError::Conflict(format!(
                "this host is the destination of VM {id}'s migration: switch over at the source"
            )));
        };
        out.switchover().await.map_err(qemu)?;
        Ok(slot.source_status(id, out))
    }

    /// Source, once the final state is sent: takes the frames the stopped QEMU left unread on
    /// the VM's taps ([`crate::frames`]), keeps them in case the migration is aborted, and
    /// returns those addressed to the VM's MACs, oldest first, within the hand-over's limits.
    pub async fn frames(&self, id: Uuid) -> Result<QueuedFrames, AgentError> {
        let slot = self.slot(id)?;
        let _op = slot.op.lock().await;
        let out = match &slot.role {
            Role::Source(out) => out,
            Role::Destination(inc) => return self.frames_to_hand_back(id, inc),
        };
        let state = out.status().state;
        if state != AgentMigrationState::Completed {
            return Err(AgentError::Conflict(format!(
                "VM {id}'s migration is {state:?}: frames are taken once the final state is sent"
            )));
        }
        let drained = self.drain_taps(id, out.vm().pid())?;
        let watched = std::mem::take(&mut *lock(&slot.watched_taps));
        let rings = match tokio::time::timeout(RING_WAIT, slot.rings.lock()).await {
            Ok(mut rings) => std::mem::take(&mut *rings),
            Err(_) => HashMap::new(),
        };
        let recovered = recover_at_pause(id, &watched, &drained, &rings);
        drop(watched);
        // Recovered frames whose drop the ring could not show (a duplicate at worst).
        let presumed = recovered.values().filter(|r| r.presumed).count();
        let (queued, kept) = select_for_hand_over(drained, &recovered, true);
        lock(&slot.drained).extend(kept);
        tracing::info!(
            vm = %id,
            handed = queued.frames.len(),
            recovered = queued.recovered,
            presumed,
            flooded = queued.skipped_flooded,
            foreign = queued.skipped_foreign,
            over_limit = queued.skipped_over_limit,
            "took the frames the paused guest left on its taps"
        );
        Ok(queued)
    }

    /// Destination, in a rollback: takes the frames for the VM's MACs that the LAN brought to
    /// this host's taps since the steer (the paused QEMU here never read them), for the source
    /// to deliver. The destination is removed next, so nothing is kept.
    fn frames_to_hand_back(
        &self,
        id: Uuid,
        inc: &IncomingMigration,
    ) -> Result<QueuedFrames, AgentError> {
        let drained = self.drain_taps(id, inc.vm().pid())?;
        let (queued, _) = select_for_hand_over(drained, &HashMap::new(), false);
        tracing::info!(vm = %id, handed_back = queued.frames.len(), "took the frames steered here for the source");
        Ok(queued)
    }

    /// Drains the VM's taps as QEMU `pid` left them: each NIC's index, MAC and queued frames,
    /// oldest first.
    fn drain_taps(&self, id: Uuid, pid: u32) -> Result<Vec<DrainedTap>, AgentError> {
        let spec = self.vms.get(id)?.spec;
        let mut drained = Vec::new();
        for (nic, n) in spec.nics.iter().enumerate() {
            let tap = crate::tap::tap_name(id, nic);
            let mac = crate::steer::parse_mac(&n.mac)
                .map_err(|e| AgentError::Internal(anyhow::anyhow!("{e}")))?;
            let frames = TapQueue::of_process(pid, &tap)
                .and_then(|q| q.drain())
                .map_err(|e| AgentError::Internal(anyhow::anyhow!("{e}")))?;
            drained.push(DrainedTap { nic, mac, frames });
        }
        Ok(drained)
    }

    /// Destination, before the guest runs: delivers the frames handed over from the source
    /// ahead of those this host's taps queued since the steer (they are newer), so the guest
    /// reads them in arrival order. Frames that are not for the NIC they name are dropped.
    fn deliver_handed(&self, id: Uuid, pid: u32, handed: &[HandedFrame]) {
        let spec = match self.vms.get(id) {
            Ok(rt) => rt.spec,
            Err(e) => {
                tracing::warn!(vm = %id, error = %e, "handed-over frames not delivered");
                return;
            }
        };
        let mut bytes = 0usize;
        for (i, nic) in spec.nics.iter().enumerate() {
            let Ok(mac) = crate::steer::parse_mac(&nic.mac) else {
                continue;
            };
            let mut frames: Vec<Frame> = Vec::new();
            let mut refused = 0usize;
            for f in handed.iter().filter(|f| usize::from(f.nic) == i) {
                let frame = Frame {
                    header: f.header,
                    data: f.data.clone(),
                };
                bytes += f.data.len();
                if frame.data.len() < 14
                    || (!frame.is_flooded() && frame.destination() != Some(mac))
                    || frames.len() >= MAX_HANDED_FRAMES
                    || bytes > MAX_HANDED_BYTES
                {
                    refused += 1;
                    continue;
                }
                frames.push(frame);
            }
            if frames.is_empty() {
                continue;
            }
            let tap = crate::tap::tap_name(id, i);
            let handed_count = frames.len();
            let mut copies = 0;
            let result = TapQueue::of_process(pid, &tap).and_then(|q| {
                crate::frames::queue_first(&q, &tap, |own| {
                    let merged;
                    (merged, copies) = merge_handed(std::mem::take(&mut frames), own);
                    merged
                })
            });
            match result {
                Ok(done) => tracing::info!(
                    vm = %id, tap, handed = handed_count, queued_here = done.held, copies,
                    delivered = done.written, refused, requeued = done.requeued, in_order = done.in_order, unwatched = done.unwatched,
                    "delivered the handed-over frames ahead of this tap's own"
                ),
                Err(e) => {
                    tracing::warn!(vm = %id, tap, error = %e, "handed-over frames not delivered")
                }
            }
        }
    }

    /// Destination: the center recorded this host as the owner: deliver the frames handed
    /// over, announce and run the guest. Idempotent.
    pub async fn commit(&self, id: Uuid, req: Commit) -> Result<Committed, AgentError> {
        let slot = match self.slot(id) {
            Ok(s) => s,
            // Already committed (and forgotten), or the agent restarted: a running VM here with
            // this generation is a done commit.
            Err(e) => {
                let rt = self.vms.get(id)?;
                if rt.generation == req.generation && rt.state == tern_api::PowerState::Running {
                    return Ok(Committed::default());
                }
                let vm = self.vms.live_qemu(id).map_err(|_| e)?;
                self.let_floods_in(id).await;
                vm.announce_self(&COMMIT_ANNOUNCE).await.map_err(qemu)?;
                vm.resume().await.map_err(qemu)?;
                self.vms.set_generation(id, req.generation)?;
                return Ok(Committed::default());
            }
        };
        let _op = slot.op.lock().await;
        let Role::Destination(inc) = &slot.role else {
            return Err(AgentError::Conflict(format!(
                "this host is the source of VM {id}'s migration: commit at the destination"
            )));
        };
        if !req.frames.is_empty()
            && inc.status().await.state == AgentMigrationState::Completed
            && !slot
                .delivered
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            self.deliver_handed(id, inc.vm().pid(), &req.frames);
        }
        if !slot.flooded.load(std::sync::atomic::Ordering::Relaxed) {
            self.let_floods_in(id).await;
            slot.flooded
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let resumed_at = inc.commit(&COMMIT_ANNOUNCE).await.map_err(qemu)?;
        self.vms.set_generation(id, req.generation)?;
        self.forget(id, &slot);
        self.ended.received.fetch_add(1, Ordering::Relaxed);
        tracing::info!(vm = %id, generation = req.generation, "migration committed: the VM runs here");
        Ok(Committed { resumed_at })
    }

    /// Source: cancel and run the guest again. Destination: kill the incoming QEMU.
    pub async fn abort(&self, id: Uuid, req: AbortMigration) -> Result<(), AgentError> {
        let slot = self.slot(id)?;
        let _op = slot.op.lock().await;
        // Told to end it: a restart from here on must not re-attach to it.
        slot.record.remove();
        match &slot.role {
            Role::Source(out) => {
                // Frames taken off the taps for the destination, and those the destination's
                // taps got after the steer, go back where the guest will read them when it
                // resumes, ahead of what arrived here since.
                let drained = std::mem::take(&mut *lock(&slot.drained));
                if out.vm().exit_reason().is_none() {
                    self.give_back(id, out.vm().pid(), drained, &req.frames);
                }
                // A source QEMU that has ended has nothing left to cancel or resume (the VM's
                // own state says how it ended); insisting would fail the rollback for ever.
                if out.vm().exit_reason().is_none() {
                    out.abort("the center aborted the migration")
                        .await
                        .map_err(qemu)?;
                }
            }
            Role::Destination(_) => match self.vms.remove_idle(id).await {
                Ok(()) => {}
                Err(AgentError::NotFound(_)) => {}
                Err(e) => return Err(e),
            },
        }
        // An aborted migration's relay may still wait for its first stream. A committed
        // one's ends with its streams: post-copy still fetches pages through it after the
        // commit.
        if let Some(relay) = lock(&slot.relay).take() {
            relay.stop();
        }
        self.forget(id, &slot);
        match &slot.role {
            Role::Source(_) => &self.ended.aborted_as_source,
            Role::Destination(_) => &self.ended.aborted_as_destination,
        }
        .fetch_add(1, Ordering::Relaxed);
        tracing::info!(vm = %id, "migration aborted");
        Ok(())
    }

    /// Source, after the commit: quits the paused QEMU and removes the VM from this host.
    pub async fn finish(&self, id: Uuid) -> Result<(), AgentError> {
        let slot = self.slot(id)?;
        let _op = slot.op.lock().await;
        let Role::Source(out) = &slot.role else {
            return Err(AgentError::Conflict(format!(
                "this host is the destination of VM {id}'s migration: finish at the source"
            )));
        };
        if out.status().state != AgentMigrationState::Completed {
            return Err(AgentError::Conflict(format!(
                "VM {id}'s migration is {:?}, not completed: nothing to finish",
                out.status().state
            )));
        }
        slot.record.remove();
        // A source QEMU that has already ended (a retried finish) has nothing left to quit.
        if out.vm().exit_reason().is_none() {
            out.finish().await.map_err(qemu)?;
        }
        match self.vms.remove_idle(id).await {
            Ok(()) | Err(AgentError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        self.forget(id, &slot);
        self.ended.sent.fetch_add(1, Ordering::Relaxed);
        if let Some(r) = &out.status().report {
            self.ended.bytes_sent.fetch_add(r.bytes, Ordering::Relaxed);
        }
        tracing::info!(vm = %id, "migrated away: removed from this host");
        Ok(())
    }

    /// Destination: listens once on the migration address for the bandwidth probe.
    pub async fn sink(&self) -> Result<BandwidthSink, AgentError> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(self.migration_address, 0))
            .await
            .map_err(|e| {
                AgentError::Internal(anyhow::anyhow!(
                    "listening for the bandwidth probe on {}: {e}",
                    self.migration_address
                ))
            })?;
        let addr = listener
            .local_addr()
            .map_err(|e| AgentError::Internal(anyhow::anyhow!("probe sink address: {e}")))?;
        tokio::spawn(async move {
            let Ok(Ok((mut conn, peer))) =
                tokio::time::timeout(SINK_ACCEPT_TIMEOUT, listener.accept()).await
            else {
                tracing::warn!(%addr, "nobody came to the bandwidth probe sink");
                return;
            };
            let mut buf = vec![0u8; PROBE_CHUNK];
            let mut n: u64 = 0;
            let mut first: Option<Instant> = None;
            // Bytes and time when the warm-up ended.
            let mut warm: Option<(u64, Instant)> = None;
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(k) => {
                        let now = Instant::now();
                        let t0 = *first.get_or_insert(now);
                        if warm.is_none() && now.duration_since(t0) >= PROBE_WARMUP {
                            warm = Some((n, now));
                        }
                        n += k as u64;
                    }
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "bandwidth probe broke");
                        return;
                    }
                }
            }
            // Receipt: all bytes, then the steady part (bytes, µs) after the warm-up.
            let (steady_bytes, steady_us) = warm
                .map(|(at, t)| (n - at, t.elapsed().as_micros() as u64))
                .unwrap_or((0, 0));
            let mut receipt = [0u8; 24];
            receipt[..8].copy_from_slice(&n.to_be_bytes());
            receipt[8..16].copy_from_slice(&steady_bytes.to_be_bytes());
            receipt[16..].copy_from_slice(&steady_us.to_be_bytes());
            let _ = conn.write_all(&receipt).await;
        });
        Ok(BandwidthSink {
            address: addr.to_string(),
        })
    }

    /// Source: sends to a destination's sink for a quarter of a second (or `bytes`) and reports
    /// what arrived.
    pub async fn probe(&self, req: BandwidthProbe) -> Result<BandwidthReport, AgentError> {
        let to: SocketAddr = req.to_migration_address.parse().map_err(|_| {
            AgentError::BadRequest(format!(
                "{:?} is not an IP:PORT probe address",
                req.to_migration_address
            ))
        })?;
        let fail = |what: &str, e: std::io::Error| {
            AgentError::Internal(anyhow::anyhow!("bandwidth probe to {to}: {what}: {e}"))
        };
        let start = Instant::now();
        let mut conn =
            tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(to))
                .await
                .map_err(|_| {
                    AgentError::Internal(anyhow::anyhow!(
                        "bandwidth probe: connecting to {to} timed out"
                    ))
                })?
                .map_err(|e| fail("connect", e))?;
        let chunk = vec![0xa5u8; PROBE_CHUNK];
        let mut sent: u64 = 0;
        while sent < req.bytes.max(PROBE_CHUNK as u64) && start.elapsed() < PROBE_TIME {
            conn.write_all(&chunk).await.map_err(|e| fail("send", e))?;
            sent += PROBE_CHUNK as u64;
        }
        conn.shutdown().await.map_err(|e| fail("shutdown", e))?;
        let mut count = [0u8; 8];
        tokio::time::timeout(Duration::from_secs(30), conn.read_exact(&mut count))
            .await
            .map_err(|_| {
                AgentError::Internal(anyhow::anyhow!("bandwidth probe: no receipt from {to}"))
            })?
            .map_err(|e| fail("receipt", e))?;
        let received = u64::from_be_bytes(count);
        let elapsed = start.elapsed();
        // The steady part of the receipt (a sink of an older agent sends none).
        let mut steady = [0u8; 16];
        let steady = match tokio::time::timeout(
            Duration::from_secs(1),
            conn.read_exact(&mut steady),
        )
        .await
        {
            Ok(Ok(_)) => {
                let bytes = u64::from_be_bytes(steady[..8].try_into().unwrap_or_default());
                let us = u64::from_be_bytes(steady[8..].try_into().unwrap_or_default());
                (Duration::from_micros(us) >= PROBE_MIN_STEADY && bytes > 0)
                    .then(|| (bytes, Duration::from_micros(us)))
            }
            _ => None,
        };
        let (bytes, over) = steady.unwrap_or((received, elapsed));
        Ok(BandwidthReport {
            bytes,
            elapsed_ms: over.as_millis().max(1) as u64,
            mbit_s: bytes as f64 * 8.0 / over.as_secs_f64().max(1e-6) / 1e6,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StateDir;
    use crate::vms::VmHostConfig;

    /// A frame for `mac` numbered `n` (in its last byte).
    fn frame_to(mac: [u8; 6], n: u8) -> Frame {
        let mut data = vec![0u8; 60];
        data[..6].copy_from_slice(&mac);
        data[59] = n;
        Frame {
            header: Default::default(),
            data,
        }
    }

    #[test]
    fn a_resuming_source_reads_its_own_frames_then_the_handed_back_then_the_newest() {
        let mac = [0x52, 0x54, 0, 0, 0, 1];
        let other = [0x52, 0x54, 0, 0, 0, 2];
        let handed: Vec<HandedFrame> = [(0, mac, 3), (0, other, 99), (1, mac, 98), (0, mac, 4)]
            .iter()
            .map(|&(nic, to, n)| {
                let f = frame_to(to, n);
                HandedFrame {
                    nic,
                    header: f.header,
                    data: f.data,
                }
            })
            .collect();
        let own = vec![frame_to(mac, 1), frame_to(mac, 2)];
        let queued = vec![crate::frames::plug_frame(mac), frame_to(mac, 5)];
        let order: Vec<u8> = hand_back_order(0, mac, own, &handed, queued)
            .iter()
            .map(|f| f.data[59])
            .collect();
        // Another MAC's frame and another NIC's are not this NIC's to read; plugs go.
        assert_eq!(order, vec![1, 2, 3, 4, 5]);
    }

    /// A broadcast numbered `n`.
    fn broadcast(n: u8) -> Frame {
        frame_to([0xff; 6], n)
    }

    #[test]
    fn broadcasts_both_hosts_got_reach_the_destination_guest_once() {
        let mac = [0x52, 0x54, 0, 0, 0, 1];
        let numbers = |frames: &[Frame]| frames.iter().map(|f| f.data[59]).collect::<Vec<u8>>();
        // The source got broadcasts 10 and 11 before the steer, 12 and 13 after it; the
        // destination got 12 and 13 and, after the source's drain, 14. Unicast 1 reached the
        // source, 2 the destination.
        let handed = vec![
            frame_to(mac, 1),
            broadcast(10),
            broadcast(11),
            broadcast(12),
            broadcast(13),
        ];
        let own = vec![
            broadcast(12),
            frame_to(mac, 2),
            broadcast(13),
            broadcast(14),
        ];
        let (frames, copies) = merge_handed(handed.clone(), own);
        assert_eq!(numbers(&frames), vec![1, 10, 11, 12, 13, 2, 14]);
        assert_eq!(copies, 2);
        // Nothing in common: everything, in order.
        let (frames, copies) = merge_handed(handed.clone(), vec![broadcast(20), frame_to(mac, 3)]);
        assert_eq!(numbers(&frames), vec![1, 10, 11, 12, 13, 20, 3]);
        assert_eq!(copies, 0);
        // The same broadcast twice (an ARP request retried): only the overlap is one copy.
        let (frames, copies) = merge_handed(
            vec![broadcast(7), broadcast(7)],
            vec![broadcast(7), broadcast(8)],
        );
        assert_eq!(numbers(&frames), vec![7, 7, 8]);
        assert_eq!(copies, 1);
        // Only the end of the handed run can be in the destination's queue, not the middle.
        let (frames, copies) = merge_handed(
            vec![broadcast(10), broadcast(11), broadcast(12)],
            vec![broadcast(11), broadcast(13)],
        );
        assert_eq!(numbers(&frames), vec![10, 11, 12, 11, 13]);
        assert_eq!(copies, 0);
        // Nothing handed: the tap's own, untouched.
        let (frames, copies) = merge_handed(Vec::new(), vec![broadcast(1), frame_to(mac, 2)]);
        assert_eq!(numbers(&frames), vec![1, 2]);
        assert_eq!(copies, 0);
    }

    fn migrations(dir: &std::path::Path) -> Arc<Migrations> {
        let vms = VmManager::new(VmHostConfig {
            store: StateDir::open(dir).expect("state dir"),
            accelerator: tern_api::Accelerator::Tcg,
            bridge: None,
            qemu: "qemu-system-x86_64".into(),
            default_cpu_model: "qemu64".into(),
            shared_storage: None,
            qemu_users: None,
            resource_control: None,
            uefi: crate::firmware::UefiFirmware {
                code: crate::firmware::DEFAULT_CODE.into(),
                vars_template: crate::firmware::DEFAULT_VARS.into(),
            },
        });
        Migrations::new(
            vms,
            IpAddr::from([127, 0, 0, 1]),
            std::path::PathBuf::from("tern"),
        )
    }

    #[tokio::test]
    async fn bandwidth_probe_measures_what_arrived_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = migrations(dir.path());
        let sink = m.sink().await.expect("sink");
        assert!(sink.address.starts_with("127.0.0.1:"), "{sink:?}");
        let r = m
            .probe(BandwidthProbe {
                to_migration_address: sink.address.clone(),
                bytes: 64 << 20,
            })
            .await
            .expect("probe");
        // What the sink counted, once: all of it, or its steady part where sending took long
        // enough for one (a loaded machine); never more than was sent.
        assert!(r.bytes > 0 && r.bytes <= 64 << 20, "{r:?}");
        assert!(r.elapsed_ms >= 1, "{r:?}");
        // The rate is those bytes over that time (`elapsed_ms` is rounded down).
        let rate = |ms: u64| r.bytes as f64 * 8.0 / (ms as f64 / 1000.0) / 1e6;
        assert!(
            rate(r.elapsed_ms + 1) <= r.mbit_s && r.mbit_s <= rate(r.elapsed_ms),
            "{r:?}"
        );
        // The sink served its one connection and is gone.
        assert!(m
            .probe(BandwidthProbe {
                to_migration_address: sink.address,
                bytes: 1 << 20,
            })
            .await
            .is_err());
        assert!(m
            .probe(BandwidthProbe {
                to_migration_address: "not an address".into(),
                bytes: 1,
            })
            .await
            .is_err());
    }

    #[tokio::test]
    async fn calls_without_a_migration_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = migrations(dir.path());
        let id = Uuid::new_v4();
        assert!(matches!(
            m.status(id, None, Duration::ZERO).await,
            Err(AgentError::NotFound(_))
        ));
        assert!(matches!(
            m.switchover(id).await,
            Err(AgentError::NotFound(_))
        ));
        assert!(matches!(
            m.abort(id, AbortMigration::default()).await,
            Err(AgentError::NotFound(_))
        ));
        assert!(matches!(m.finish(id).await, Err(AgentError::NotFound(_))));
        assert!(matches!(
            m.measure(id, 1000).await,
            Err(AgentError::NotFound(_))
        ));
        assert!(m
            .commit(
                id,
                Commit {
                    generation: 2,
                    frames: Vec::new()
                }
            )
            .await
            .is_err());
    }
}
