//! Live migration tasks (`POST /api/v1/vms/{name}/migrate`): pre-checks, measurements and the
//! settings chosen from them, the ownership record, the hand-over and its commit rule,
//! rollback, and recovery after a center restart.
//!
//! The commit rule. A VM belongs to the host its record names, under the record's
//! generation. A migration records its intent (`preparing`, generation N → N+1) before the
//! destination is prepared. The destination runs the guest only after the center has
//! committed — migration record `committed`, the VM's host and generation changed, in one
//! transaction, which also re-checks that nobody cancelled the task — and the source never
//! resumes after that. Whoever finds a migration unfinished (its driver after a failure, a
//! restarted center) reads the record: `committed` is finished forward (the destination runs,
//! the source is removed), anything else backward (the source runs, the destination is
//! removed). Every step is idempotent and retried until the agent answers, so the end state
//! is exactly one running copy.
//!
//! Post-copy is the one exception, and it only narrows the rule: once the source has switched
//! to post-copy its memory is no longer whole and it can never resume, so the destination runs
//! the guest at once and the commit follows, retried until it lands; a migration found
//! unfinished whose source says post-copy goes forward whatever its record says
//! (`tern_motion::settle`).
//!
//! Layout: [`checks`] (pre-checks), [`stages`] (one function per stage up to the commit),
//! [`settle`] (forward, rollback, the background convergence, recovery), [`resume`] (a
//! restarted center driving on a migration left in pre-copy).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;
use tern_api::center::{EventLevel, Task, TaskKind, TaskState};
use tern_api::evc::{CheckKind, MigrationCheck, MigrationCheckReport};
use tern_api::migration::{
    AbortMigration, AgentMigrationState, AgentMigrationStatus, BandwidthProbe, Commit, Committed,
    HandedFrame, ListenIncoming, Measurements, MigrateVm, MigrationKey, MigrationOutcome,
    MigrationPhase, MigrationResult, MigrationSettings, MigrationUri, PrepareIncoming,
    StartOutgoing,
};
use tern_api::{HostState, PowerState};
use tern_motion::{
    choose_settings, HostBudget, QemuVersion, SourceState, Stage, Step as SettleStep, Way,
    MACHINE_TYPE,
};
use uuid::Uuid;

use crate::agent::{Agent, AgentError};
use crate::app::{lock, App};
use crate::error::CenterError;
pub use crate::migration_slots::MoveClass;
use crate::migration_slots::{host_limit, link_limit, SlotCounts, SlotRequest, Ticket};
use crate::retry::Retry;
use crate::store::{
    HostRecord, MigrationRecordState as Rec, MigrationRow, NewEvent, StoreError, TaskIntent,
    TaskRecord, VmRecord,
};
use crate::tasks::{self, TaskCtl, TaskEnd};

/// How long a link measured between two hosts is used for their next migrations instead of
/// probing again. A link that became slower meanwhile costs pace (the stream re-judges it),
/// never correctness.
const LINK_MEMORY: Duration = Duration::from_secs(600);
/// Most bytes the bandwidth probe sends (it also stops after a quarter of a second).
const PROBE_BYTES: u64 = 1 << 30;
/// How long a status call waits for the source's state to change.
const STATUS_WAIT: Duration = Duration::from_millis(500);
/// How long an agent may stay unreachable during pre-copy before the migration rolls back.
const UNREACHABLE_LIMIT: Duration = Duration::from_secs(20);
/// Beyond the migration's own deadline (which the source enforces), when the center gives
/// up waiting.
const DEADLINE_MARGIN: Duration = Duration::from_secs(30);
/// How long the destination may take to report all state received after the switchover.
const RECEIVE_WAIT: Duration = Duration::from_secs(10);
/// Attempts at a call before the migration starts whose agent does not answer (restarting).
const UNREACHABLE_RETRY: Retry = Retry::times(4, Duration::from_secs(1));
/// Retry period of a convergence step whose agent did not answer.
const RETRY: Duration = Duration::from_secs(2);
/// Attempts a driver makes at a step after the commit before leaving it to the background.
const DRIVER_ATTEMPTS: u32 = 15;
/// Retries of a step the driver itself sees through before it leaves it to [`converge`].
const DRIVER_RETRY: Retry = Retry::times(DRIVER_ATTEMPTS, RETRY);

const MIB: f64 = 1024.0 * 1024.0;

fn ev(task: Uuid, vm: &str, host: &str, level: EventLevel, msg: String) -> NewEvent {
    NewEvent::new(level, format!("task {task}: {msg}"))
        .task(task)
        .vm(vm)
        .host(Some(host))
}

/// Queues a migration of VM `name` and drives it in the background (an operator's request:
/// a mandatory move for the scheduler).
pub async fn migrate_vm(app: &Arc<App>, name: String, req: MigrateVm) -> Result<Task, CenterError> {
    migrate_vm_as(app, name, req, MoveClass::Mandatory).await
}

/// Queues a migration whose place in the migration scheduler's queue is `class`; the queue
/// place is taken before this returns, so callers queue in the order they call.
pub async fn migrate_vm_as(
    app: &Arc<App>,
    name: String,
    req: MigrateVm,
    class: MoveClass,
) -> Result<Task, CenterError> {
    req.check().map_err(CenterError::invalid)?;
    let to = req.to.clone();
    let rec = app
        .db
        .write(move |tx| {
            let now = Utc::now();
            let vm = tx
                .vm_by_name(&name)?
                .ok_or_else(|| CenterError::vm_not_found(&name))?;
            let dest = tx.host_by_name(&to)?.ok_or_else(|| {
                CenterError::not_found(format!("host {to} is not registered: see tern host list"))
            })?;
            let source = vm
                .host_id
                .map(|h| tx.host_by_id(h))
                .transpose()?
                .flatten()
                .ok_or_else(|| CenterError::conflict(format!("VM {name} has no host")))?;
            if source.id == dest.id {
                return Err(CenterError::conflict(format!(
                    "VM {name} already runs on host {to}"
                )));
            }
            if let Some(t) = tx.active_tasks(Some(vm.id))?.first() {
                return Err(CenterError::conflict(format!(
                    "task {} is still {} on VM {name}: wait for it, or cancel it with: tern \
                     task cancel {}",
                    t.task.id, t.task.state, t.task.id
                )));
            }
            let task = Task::queued(
                TaskKind::VmMigrate,
                Some(name.clone()),
                Some(source.name.clone()),
                now,
            );
            let rec = TaskRecord {
                task,
                vm_id: Some(vm.id),
                intent: TaskIntent {
                    previous_desired: Some(vm.desired),
                    stop: None,
                },
            };
            tx.insert_task(&rec)?;
            tx.add_event(
                ev(
                    rec.task.id,
                    &name,
                    &source.name,
                    EventLevel::Info,
                    format!(
                        "{}migration of VM {name} from {} to {} queued",
                        if req.dry_run { "dry run of the " } else { "" },
                        source.name,
                        dest.name
                    ),
                ),
                now,
            )?;
            Ok::<_, CenterError>((rec, vm, source, dest, req))
        })
        .await?;
    let (rec, vm, source, dest, req) = rec;
    let ticket = (!req.dry_run).then(|| {
        app.slots.ticket(SlotRequest {
            source: source.id,
            source_limit: host_limit(app.slots.link_mbit(source.id), source.facts.cores),
            dest: dest.id,
            dest_limit: host_limit(app.slots.link_mbit(dest.id), dest.facts.cores),
            link_limit: link_limit(
                app.slots
                    .pair_link(source.id, dest.id, LINK_MEMORY)
                    .map(|l| l.0),
            ),
            class,
        })
    });
    let app2 = app.clone();
    tasks::spawn(app, rec.task.id, move |ctl| async move {
        let m = Mig {
            app: app2,
            task: ctl.id(),
            req,
            vm,
            source,
            dest,
            ctl,
            started: Instant::now(),
            row: None,
            settings: None,
            key: None,
            measurements: None,
            incoming_attempted: false,
            outgoing_attempted: false,
            pause_started: None,
            paused_for: None,
            events_seen: 0,
            held: std::sync::Mutex::new(Vec::new()),
            held_sample: std::sync::Mutex::new(None),
            timeline: Timeline::default(),
            handed: Vec::new(),
            steered: false,
            stopped_at: None,
            resumed_at: None,
            ticket: std::sync::Mutex::new(ticket),
        };
        // A migration cannot be dropped halfway: it polls the cancel signal at safe points and
        // records its own end (a rollback or a commit comes first).
        m.drive(None).await;
        None
    });
    Ok(rec.task)
}

/// One migration being driven.
struct Mig {
    app: Arc<App>,
    task: Uuid,
    req: MigrateVm,
    vm: VmRecord,
    source: HostRecord,
    dest: HostRecord,
    /// Progress and the cancel signal, polled at safe points.
    ctl: TaskCtl,
    started: Instant,
    row: Option<MigrationRow>,
    settings: Option<MigrationSettings>,
    /// This migration's TLS key, when its settings say `encrypted`: made here, given to the
    /// two agents, never stored (a center that restarts after the stream started no longer
    /// needs it; one that restarts before rolls the migration back).
    key: Option<MigrationKey>,
    measurements: Option<Measurements>,
    incoming_attempted: bool,
    outgoing_attempted: bool,
    pause_started: Option<Instant>,
    /// How long the guest was paused, once known before [`Mig::forward`] (post-copy: the
    /// destination runs before the commit).
    paused_for: Option<Duration>,
    /// Source events already recorded.
    events_seen: usize,
    /// Events noted while the guest is paused, written once it runs again (on either side):
    /// the pause is no time for store writes.
    held: std::sync::Mutex<Vec<NewEvent>>,
    /// The pre-copy reading at the pause, written with the held events (see
    /// [`Mig::hold_sample`]).
    held_sample: std::sync::Mutex<Option<tern_api::history::MigrationSample>>,
    /// Where the guest's pause went, step by step.
    timeline: Timeline,
    /// Frames the paused source left on the VM's taps, for the destination's commit.
    handed: Vec<HandedFrame>,
    /// The destination was asked to steer the LAN to its taps (a rollback steers it back).
    steered: bool,
    /// QEMU's `STOP` at the source and `RESUME` at the destination, as the agents report them.
    stopped_at: Option<chrono::DateTime<Utc>>,
    resumed_at: Option<chrono::DateTime<Utc>>,
    /// The migration scheduler's ticket: queued at creation, holding the two hosts' slots
    /// from [`Mig::take_slots`] until the migration ends (`None`: a dry run, or a migration a
    /// restarted center drives on).
    ticket: std::sync::Mutex<Option<Ticket>>,
}

/// The steps of a switchover (or of the preparation) and how long each took, for the record.
#[derive(Debug, Default, Clone)]
struct Timeline(Vec<(&'static str, Duration)>);

impl Timeline {
    fn step(&mut self, what: &'static str, took: Duration) {
        self.0.push((what, took));
    }

    /// Runs `step` and records how long it took as `what`.
    async fn time<T>(
        &mut self,
        what: &'static str,
        step: impl std::future::Future<Output = T>,
    ) -> T {
        let t = Instant::now();
        let out = step.await;
        self.step(what, t.elapsed());
        out
    }
}

impl std::fmt::Display for Timeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let steps: Vec<String> = self
            .0
            .iter()
            .map(|(what, took)| format!("{what} {:.1} ms", took.as_secs_f64() * 1000.0))
            .collect();
        f.write_str(&steps.join(", "))
    }
}

/// Why a migration stopped before its commit.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Abort {
    /// The user cancelled the task.
    Cancelled,
    /// A stage failed; what went wrong, for users.
    Failed(String),
}

impl From<String> for Abort {
    fn from(why: String) -> Abort {
        Abort::Failed(why)
    }
}

impl std::fmt::Display for Abort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Abort::Cancelled => f.write_str("cancelled by user"),
            Abort::Failed(why) => f.write_str(why),
        }
    }
}

/// How the switchover ended.
enum Switched {
    /// All state reached the destination, which holds the paused guest: the source could
    /// still resume until the commit.
    Whole(AgentMigrationStatus),
    /// The destination runs the guest while it fetches the pages it lacks: only forward.
    PostCopy(AgentMigrationStatus),
}

/// How a driver's forward run ended.
enum Finished {
    DryRun(MigrationCheckReport),
    /// Committed, with the source's final status.
    Committed(AgentMigrationStatus),
}

/// A pre-copy reading for the timeline (`at_ms` is filled in when stored).
fn sample_of(p: &tern_api::migration::MigrationProgress) -> tern_api::history::MigrationSample {
    tern_api::history::MigrationSample {
        at_ms: 0,
        pass: p.pass,
        transferred_bytes: p.transferred_bytes,
        remaining_bytes: p.remaining_bytes,
        mbit_s: p.mbit_s,
        dirty_rate_mib_s: p.dirty_rate_mib_s,
        expected_downtime_ms: p.expected_downtime_ms,
        throttle_percent: p.cpu_throttle_pct,
    }
}

impl Mig {
    fn name(&self) -> &str {
        self.vm.name()
    }

    async fn event(&self, level: EventLevel, msg: String) {
        let e = ev(self.task, self.name(), &self.source.name, level, msg);
        self.app.add_event(e).await;
    }

    /// Notes an event to be written by [`Mig::flush_held`].
    fn hold(&self, level: EventLevel, msg: String) {
        let e = ev(self.task, self.name(), &self.source.name, level, msg);
        self.held.lock().unwrap_or_else(|p| p.into_inner()).push(e);
    }

    /// Notes the reading at the pause, to be added to the timeline by [`Mig::flush_held`]
    /// (nothing is written while the guest is paused).
    fn hold_sample(&self, p: &tern_api::migration::MigrationProgress) {
        *self.held_sample.lock().unwrap_or_else(|e| e.into_inner()) = Some(sample_of(p));
    }

    /// Writes the held events and sample, in one transaction.
    async fn flush_held(&self) {
        let held: Vec<NewEvent> =
            std::mem::take(&mut *self.held.lock().unwrap_or_else(|p| p.into_inner()));
        let sample = self
            .held_sample
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if held.is_empty() && sample.is_none() {
            return;
        }
        let task = self.task;
        let r = self
            .app
            .db
            .write(move |tx| {
                let now = Utc::now();
                if let Some(s) = sample {
                    tx.add_migration_sample(task, s, now)?;
                }
                for e in held {
                    tx.add_event(e, now)?;
                }
                Ok::<_, StoreError>(())
            })
            .await;
        if let Err(e) = r {
            tracing::error!(task = %self.task, "cannot record events: {e}");
        }
    }

    /// Holds the source's events not seen yet (see [`Mig::hold`]).
    fn hold_agent_events(&self, s: &AgentMigrationStatus, seen: &mut usize) {
        for line in s.events.iter().skip(*seen) {
            self.hold(
                EventLevel::Info,
                format!("source {}: {line}", self.source.name),
            );
        }
        *seen = (*seen).max(s.events.len());
    }

    /// Records progress; an error when the task has ended meanwhile (cancelled).
    /// Records the stage reached (its progress and a line for users); [`Abort::Cancelled`]
    /// when the task has ended meanwhile (cancelled).
    async fn phase(&self, stage: Stage, phase: String) -> Result<(), Abort> {
        if self.ctl.progress(stage.progress(), phase).await? {
            Ok(())
        } else {
            Err(Abort::Cancelled)
        }
    }

    /// Adds a pre-copy reading to the task's timeline (a failure to record it costs the
    /// chart a point, not the migration).
    async fn record_sample(&self, p: &tern_api::migration::MigrationProgress) {
        let sample = sample_of(p);
        let task = self.task;
        let r = self
            .app
            .db
            .write(move |tx| tx.add_migration_sample(task, sample, Utc::now()))
            .await;
        if let Err(e) = r {
            tracing::warn!(task = %self.task, "cannot record a migration sample: {e}");
        }
    }

    fn check_cancel(&self) -> Result<(), Abort> {
        if self.ctl.is_cancelled() {
            Err(Abort::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Runs the migration to its end and records it. `resumed` (a restarted center driving
    /// on a migration left in pre-copy) starts from watching pre-copy, with the settings
    /// chosen before.
    async fn drive(mut self, resumed: Option<MigrationSettings>) {
        let outcome = match resumed {
            None => self.run().await,
            Some(settings) => self.run_resumed(settings).await,
        };
        match outcome {
            Ok(Finished::DryRun(report)) => {
                let result = serde_json::to_value(&report).unwrap_or_default();
                self.finish_task(
                    TaskState::Succeeded,
                    "pre-checks passed; dry run, nothing moved".into(),
                    Some(result),
                    None,
                    format!(
                        "dry run: VM {} can migrate from {} to {}",
                        self.name(),
                        self.source.name,
                        self.dest.name
                    ),
                )
                .await;
            }
            Ok(Finished::Committed(status)) => self.forward(status).await,
            Err(why) => self.rollback(&why).await,
        }
        // Freed with the task's end (see `finish_task`); this only covers a path that ended
        // without one.
        self.free_slots().await;
    }

    /// Waits for the scheduler's slots on both hosts (cancellable), and records the counts.
    async fn take_slots(&self) -> Result<(), Abort> {
        let Some(mut ticket) = lock(&self.ticket).take() else {
            return Ok(());
        };
        self.phase(
            Stage::Prechecks,
            format!(
                "waiting for a migration slot ({} sends, {} receives a limited number at once)",
                self.source.name, self.dest.name
            ),
        )
        .await?;
        let counts = self.ctl.until_cancelled(ticket.wait()).await;
        if counts.is_none() {
            return Err(Abort::Cancelled);
        }
        {
            // Logged with the counts as they stand now, one slot event at a time.
            let _order = ticket.record_order().await;
            if let Some((src, dst)) = ticket.counts_now() {
                self.slot_event("taken", src, dst).await;
            }
        }
        *lock(&self.ticket) = Some(ticket);
        Ok(())
    }

    /// `migration slot taken|freed: h1 sends 2 of 2, h2 receives 1 of 2`: the counts tests
    /// and the benchmark replay.
    async fn slot_event(&self, what: &str, src: SlotCounts, dst: SlotCounts) {
        let link = if src.link_limit == usize::MAX {
            String::new()
        } else {
            format!(", the link carries {} of {}", src.on_link, src.link_limit)
        };
        self.event(
            EventLevel::Info,
            format!(
                "migration slot {what}: {} sends {} of {}, {} receives {} of {}{link}",
                self.source.name,
                src.sending,
                src.send_limit,
                self.dest.name,
                dst.receiving,
                dst.receive_limit
            ),
        )
        .await;
    }

    /// Frees the scheduler's slots (the migration ended either way) and records the counts,
    /// before the task's end is: whoever waits for the task sees the slots free.
    pub(super) async fn free_slots(&self) {
        let Some(ticket) = lock(&self.ticket).take() else {
            return;
        };
        // The event first, the slots after: a migration that takes a freed slot records it
        // after this, so the log never shows more at once than ran.
        let order = ticket.record_order().await;
        let Some((src, dst)) = ticket.counts_after_release() else {
            return;
        };
        self.slot_event("freed", src, dst).await;
        drop(order);
        drop(ticket);
    }
}

mod checks;
mod resume;
mod settle;
mod stages;

pub use settle::{converge, recover, Recovered};
