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

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;
use tern_api::center::{EventLevel, Task, TaskKind, TaskState};
use tern_api::evc::{CheckKind, MigrationCheck, MigrationCheckReport};
use tern_api::migration::{
    AgentMigrationState, AgentMigrationStatus, BandwidthProbe, ListenIncoming, Measurements,
    MigrateVm, MigrationOutcome, MigrationPhase, MigrationResult, MigrationSettings,
    PrepareIncoming, StartOutgoing,
};
use tern_api::{HostState, PowerState};
use tern_motion::{
    choose_settings, HostBudget, QemuVersion, SourceState, Step as SettleStep, Way, MACHINE_TYPE,
};
use tokio::sync::watch;
use uuid::Uuid;

use crate::agent::{Agent, AgentError};
use crate::app::App;
use crate::error::ApiErr;
use crate::inventory::vm_not_found;
use crate::store::{
    HostRecord, MigrationRecordState as Rec, MigrationRow, NewEvent, StoreError, TaskIntent,
    TaskRecord, VmRecord,
};

/// How long the guest's dirty rate is measured: as long as the link probe (they run at once),
/// with 8× QEMU's default sample of pages so that the short window still sees enough change.
const DIRTY_RATE_MS: u32 = 250;
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
/// Retry period of a convergence step whose agent did not answer.
const RETRY: Duration = Duration::from_secs(2);
/// Attempts a driver makes at a step after the commit before leaving it to the background.
const DRIVER_ATTEMPTS: u32 = 15;

const MIB: f64 = 1024.0 * 1024.0;

fn ev(task: Uuid, vm: &str, host: &str, level: EventLevel, msg: String) -> NewEvent {
    NewEvent::new(level, format!("task {task}: {msg}"))
        .task(task)
        .vm(vm)
        .host(Some(host))
}

/// Queues a migration of VM `name` and drives it in the background.
pub async fn migrate_vm(app: &Arc<App>, name: String, req: MigrateVm) -> Result<Task, ApiErr> {
    if req.bandwidth_mbit == Some(0) {
        return Err(ApiErr::bad_request(
            "bandwidth_mbit 0 would never send anything: give a cap above 0, or none",
        ));
    }
    if req.deadline_ms == Some(0) {
        return Err(ApiErr::bad_request("deadline_ms must be above 0"));
    }
    let to = req.to.clone();
    let rec = app
        .db
        .write(move |tx| {
            let now = Utc::now();
            let vm = tx.vm_by_name(&name)?.ok_or_else(|| vm_not_found(&name))?;
            let dest = tx.host_by_name(&to)?.ok_or_else(|| {
                ApiErr::not_found(format!("host {to} is not registered: see tern host list"))
            })?;
            let source = vm
                .host_id
                .map(|h| tx.host_by_id(h))
                .transpose()?
                .flatten()
                .ok_or_else(|| ApiErr::conflict(format!("VM {name} has no host")))?;
            if source.id == dest.id {
                return Err(ApiErr::conflict(format!(
                    "VM {name} already runs on host {to}"
                )));
            }
            if let Some(t) = tx.active_tasks(Some(vm.id))?.first() {
                return Err(ApiErr::conflict(format!(
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
            Ok::<_, ApiErr>((rec, vm, source, dest, req))
        })
        .await?;
    let (rec, vm, source, dest, req) = rec;
    let cancel = app.cancel_signal(rec.task.id);
    let (tx, cancelled) = watch::channel(false);
    let waiter = tokio::spawn(async move {
        cancel.notified().await;
        let _ = tx.send(true);
    });
    let m = Mig {
        app: app.clone(),
        task: rec.task.id,
        req,
        vm,
        source,
        dest,
        cancelled,
        started: Instant::now(),
        row: None,
        settings: None,
        measurements: None,
        incoming_attempted: false,
        outgoing_attempted: false,
        pause_started: None,
        events_seen: 0,
        held: std::sync::Mutex::new(Vec::new()),
        timeline: Timeline::default(),
    };
    let app2 = app.clone();
    app.spawn(async move {
        let task = m.task;
        m.drive().await;
        waiter.abort();
        app2.forget_cancel_signal(task);
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
    cancelled: watch::Receiver<bool>,
    started: Instant,
    row: Option<MigrationRow>,
    settings: Option<MigrationSettings>,
    measurements: Option<Measurements>,
    incoming_attempted: bool,
    outgoing_attempted: bool,
    pause_started: Option<Instant>,
    /// Source events already recorded.
    events_seen: usize,
    /// Events noted while the guest is paused, written once it runs again (on either side):
    /// the pause is no time for store writes.
    held: std::sync::Mutex<Vec<NewEvent>>,
    /// Where the guest's pause went, step by step.
    timeline: Timeline,
}

/// The steps of a switchover and how long each took, for the record.
#[derive(Debug, Default, Clone)]
struct Timeline(Vec<(&'static str, Duration)>);

impl Timeline {
    fn step(&mut self, what: &'static str, took: Duration) {
        self.0.push((what, took));
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

/// How a driver's forward run ended.
enum Finished {
    DryRun(MigrationCheckReport),
    /// Committed, with the source's final status.
    Committed(AgentMigrationStatus),
}

impl Mig {
    fn name(&self) -> &str {
        self.vm.name()
    }

    async fn event(&self, level: EventLevel, msg: String) {
        let e = ev(self.task, self.name(), &self.source.name, level, msg);
        if let Err(err) = self
            .app
            .db
            .write(move |tx| tx.add_event(e, Utc::now()))
            .await
        {
            tracing::error!(task = %self.task, "cannot record an event: {err}");
        }
    }

    /// Notes an event to be written by [`Mig::flush_held`].
    fn hold(&self, level: EventLevel, msg: String) {
        let e = ev(self.task, self.name(), &self.source.name, level, msg);
        self.held.lock().unwrap_or_else(|p| p.into_inner()).push(e);
    }

    /// Writes the held events, in one transaction.
    async fn flush_held(&self) {
        let held: Vec<NewEvent> =
            std::mem::take(&mut *self.held.lock().unwrap_or_else(|p| p.into_inner()));
        if held.is_empty() {
            return;
        }
        let r = self
            .app
            .db
            .write(move |tx| {
                let now = Utc::now();
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
    async fn phase(&self, progress: u8, phase: String) -> Result<(), String> {
        if crate::tasks::record_progress(&self.app, self.task, progress, phase).await? {
            Ok(())
        } else {
            Err("cancelled by user".into())
        }
    }

    fn check_cancel(&self) -> Result<(), String> {
        if *self.cancelled.borrow() {
            Err("cancelled by user".into())
        } else {
            Ok(())
        }
    }

    async fn drive(mut self) {
        let outcome = self.run().await;
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
    }

    /// Everything up to and including the commit.
    async fn run(&mut self) -> Result<Finished, String> {
        // Pre-checks: nothing moves before they all pass.
        self.phase(2, "pre-checks".into()).await?;
        let report = self.prechecks().await?;
        for c in &report.checks {
            self.event(
                if c.ok {
                    EventLevel::Info
                } else {
                    EventLevel::Error
                },
                format!(
                    "pre-check {}: {} — {}",
                    c.check,
                    if c.ok { "ok" } else { "FAILED" },
                    c.detail
                ),
            )
            .await;
        }
        if !report.ok {
            let failed: Vec<String> = report
                .checks
                .iter()
                .filter(|c| !c.ok)
                .map(|c| format!("{}: {}", c.check, c.detail))
                .collect();
            return Err(format!("pre-checks failed: {}", failed.join("; ")));
        }
        if self.req.dry_run {
            return Ok(Finished::DryRun(report));
        }
        self.check_cancel()?;

        // Intent: the ownership record, before the destination exists.
        self.phase(5, "recording the ownership intent".into())
            .await?;
        let row = self.record_intent().await?;
        self.event(
            EventLevel::Info,
            format!(
                "ownership intent recorded: VM {} stays on {} (generation {}) until the \
                 center commits it to {} (generation {})",
                self.name(),
                self.source.name,
                row.generation_from,
                self.dest.name,
                row.generation_to
            ),
        )
        .await;
        self.row = Some(row.clone());

        // Measurements, and the settings chosen from them; meanwhile the destination starts
        // (same spec as the source runs, paused, not listening until it has the settings).
        self.phase(
            8,
            format!(
                "measuring dirty rate and link; starting the destination on {}",
                self.dest.name
            ),
        )
        .await?;
        let src = self.app.agent(&self.source);
        let dst = self.app.agent(&self.dest);
        let rt = src
            .vm(self.vm.id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("host {} does not run VM {}", self.source.name, self.name()))?;
        if rt.state != PowerState::Running {
            return Err(format!(
                "VM {} is {} on {}, not running",
                self.name(),
                rt.state,
                self.source.name
            ));
        }
        self.incoming_attempted = true;
        let prepare = PrepareIncoming {
            spec: rt.spec.clone(),
            generation: row.generation_to,
            settings: None,
        };
        let start_destination = dst.migration_incoming(self.vm.id, &prepare);
        let (measured, started) = tokio::join!(self.measure(), start_destination);
        started.map_err(|e| format!("starting the destination: {e}"))?;
        let (settings, m) = measured?;
        for r in &settings.reasons {
            self.event(EventLevel::Info, format!("setting: {r}")).await;
        }
        self.settings = Some(settings.clone());
        self.measurements = Some(m.clone());
        self.record_settings(&settings, &m).await?;
        self.check_cancel()?;

        // Destination: configured like the source, listening for this VM only.
        self.phase(10, format!("preparing {}", self.dest.name))
            .await?;
        let ready = dst
            .migration_listen(
                self.vm.id,
                &ListenIncoming {
                    settings: settings.clone(),
                },
            )
            .await
            .map_err(|e| format!("preparing the destination: {e}"))?;
        let uri = ready.uri.ok_or_else(|| {
            format!(
                "the destination {} did not say where it listens",
                self.dest.name
            )
        })?;
        self.event(
            EventLevel::Info,
            format!(
                "destination {} ready: paused QEMU listening on {uri} for this VM only",
                self.dest.name
            ),
        )
        .await;
        self.check_cancel()?;

        // Pre-copy.
        self.phase(12, "starting pre-copy".into()).await?;
        self.outgoing_attempted = true;
        src.migration_outgoing(
            self.vm.id,
            &StartOutgoing {
                uri,
                settings: settings.clone(),
            },
        )
        .await
        .map_err(|e| format!("starting the migration on {}: {e}", self.source.name))?;
        let at_switch = self.watch_precopy(&src, &settings).await?;

        // Switchover. The guest is paused at the source from here until the destination runs
        // it (or the source resumes): every step is timed, nothing waits for anything it does
        // not need, and events are held until the guest runs.
        self.pause_started = Some(Instant::now());
        let mut timeline = Timeline::default();
        self.check_cancel()?;
        let final_mib = at_switch
            .progress
            .as_ref()
            .map(|p| p.remaining_bytes as f64 / MIB)
            .unwrap_or(0.0);
        // The destination steers the LAN to its taps (frames sent during the switchover then
        // wait there instead of dying at the paused source) while the record says the state
        // may now leave the source and the source sends it.
        let steer = async {
            let t = Instant::now();
            let r = dst.migration_steer(self.vm.id).await;
            (r, t.elapsed())
        };
        let hand_over = async {
            let t = Instant::now();
            self.set_record(&[Rec::Preparing], Rec::Switching).await?;
            self.phase(90, format!("switchover: final {final_mib:.1} MiB"))
                .await?;
            let recorded = t.elapsed();
            let done = src
                .migration_switchover(self.vm.id)
                .await
                .map_err(|e| format!("switchover: {e}"))?;
            Ok::<_, String>((recorded, t.elapsed() - recorded, done))
        };
        let ((steered, steer_time), handed) = tokio::join!(steer, hand_over);
        timeline.step("steer (in parallel)", steer_time);
        match steered {
            Ok(s) => {
                for e in s.events {
                    self.hold(
                        EventLevel::Info,
                        format!("destination {}: {e}", self.dest.name),
                    );
                }
            }
            Err(e) => self.hold(
                EventLevel::Warning,
                format!(
                    "destination {} could not steer the LAN ({e}); the guest announces itself \
                     when it runs",
                    self.dest.name
                ),
            ),
        }
        let (recorded, sent, done) = handed?;
        timeline.step("record", recorded);
        timeline.step("final copy", sent);
        let mut seen = self.events_seen;
        self.hold_agent_events(&done, &mut seen);
        self.events_seen = seen;
        if done.state != AgentMigrationState::Completed {
            return Err(format!(
                "switchover ended {:?}: {}",
                done.state,
                done.error.clone().unwrap_or_default()
            ));
        }
        let postcopy = done.postcopy
            || done
                .progress
                .as_ref()
                .is_some_and(|p| p.phase == MigrationPhase::PostCopy);
        if postcopy {
            self.flush_held().await;
            // The source's memory is no longer whole: the only way is forward, whatever
            // happens now (the price of allowing post-copy).
            self.event(
                EventLevel::Warning,
                format!(
                    "post-copy switchover done: the source can no longer take the VM back; \
                     committing to {}",
                    self.dest.name
                ),
            )
            .await;
            // A failed commit must never fall into the rollback: it would remove the paused
            // destination, which holds the device state, while the source cannot resume — the
            // VM would be lost. Keep trying (the store's trouble is the only obstacle), and say
            // so once.
            let mut attempt = 0u32;
            loop {
                match self.commit(true).await {
                    Ok(()) => return Ok(Finished::Committed(done)),
                    Err(e) => {
                        attempt += 1;
                        if attempt == 1 || attempt % DRIVER_ATTEMPTS == 0 {
                            tracing::error!(task = %self.task, attempt, "post-copy migration cannot be committed yet: {e}");
                            let _ = self
                                .phase(
                                    90,
                                    format!(
                                        "post-copy switchover done; committing to {} (attempt \
                                         {attempt}: {e})",
                                        self.dest.name
                                    ),
                                )
                                .await;
                        }
                    }
                }
                tokio::time::sleep(RETRY).await;
            }
        }
        let t = Instant::now();
        let received = dst
            .migration_status(
                self.vm.id,
                Some(AgentMigrationState::Listening),
                RECEIVE_WAIT,
            )
            .await
            .map_err(|e| format!("destination after switchover: {e}"))?;
        timeline.step("destination loaded", t.elapsed());
        if received.state != AgentMigrationState::Completed {
            return Err(format!(
                "destination {} is {:?} after switchover, not holding the paused guest: {}",
                self.dest.name,
                received.state,
                received.error.unwrap_or_default()
            ));
        }
        self.timeline = timeline;

        // The commit point.
        let t = Instant::now();
        self.commit(false).await?;
        self.timeline.step("commit", t.elapsed());
        Ok(Finished::Committed(done))
    }

    /// The pre-checks of the EVC dry run, plus: source connected, MAC not live elsewhere,
    /// destination QEMU able to load the source's stream.
    async fn prechecks(&self) -> Result<MigrationCheckReport, String> {
        let mut report =
            crate::evc::can_migrate(&self.app, self.name().to_string(), self.dest.name.clone())
                .await
                .map_err(|e| e.message)?;
        report.checks.retain(|c| c.check != CheckKind::State);
        let mut add = |check: CheckKind, r: Result<String, String>| {
            let (ok, detail) = match r {
                Ok(d) => (true, d),
                Err(d) => (false, d),
            };
            report.checks.push(MigrationCheck { check, ok, detail });
        };
        // The dry run's state check counts this very task as busy: judge it here instead.
        let (vm_id, task) = (self.vm.id, self.task);
        let now = self
            .app
            .db
            .read(move |tx| {
                let others: Vec<Uuid> = tx
                    .active_tasks(Some(vm_id))?
                    .into_iter()
                    .map(|t| t.task.id)
                    .filter(|t| *t != task)
                    .collect();
                Ok::<_, StoreError>((tx.vm_by_id(vm_id)?, others))
            })
            .await
            .map_err(|e| format!("center store: {e}"))?;
        add(
            CheckKind::State,
            match now {
                (None, _) => Err("the VM was deleted".into()),
                (_, others) if !others.is_empty() => Err(format!(
                    "task {} is acting on the VM: wait for it to end",
                    others[0]
                )),
                (Some(vm), _) if vm.actual == PowerState::Running => Ok(format!(
                    "VM {} is running on {}",
                    vm.name(),
                    vm.host.as_deref().unwrap_or("-")
                )),
                (Some(vm), _) => Err(format!(
                    "VM {} is {}: only a running VM migrates live",
                    vm.name(),
                    vm.actual
                )),
            },
        );
        add(
            CheckKind::Source,
            match self.source.state() {
                HostState::Disconnected => Err(format!(
                    "source host {} is disconnected: wait for its agent",
                    self.source.name
                )),
                s => Ok(format!("source host {} is {s}", self.source.name)),
            },
        );
        add(CheckKind::Qemu, qemu_check(&self.source, &self.dest));
        add(CheckKind::Mac, self.mac_check().await);
        report.ok = report.checks.iter().all(|c| c.ok);
        Ok(report)
    }

    /// No other VM with one of this VM's MACs is live on any connected host of the cluster;
    /// a stopped leftover of this VM on the destination is removed.
    async fn mac_check(&self) -> Result<String, String> {
        let macs: Vec<String> = self
            .vm
            .spec
            .nics
            .iter()
            .map(|n| n.mac.to_ascii_lowercase())
            .collect();
        let cluster = self.vm.cluster_id;
        let hosts = self
            .app
            .db
            .read(move |tx| tx.hosts_in_cluster(cluster))
            .await
            .map_err(|e| format!("center store: {e}"))?;
        let mut asked = 0;
        for h in hosts
            .iter()
            .filter(|h| h.state() != HostState::Disconnected)
        {
            let list = match self.app.agent(h).vms().await {
                Ok(l) => l,
                Err(e) if h.id == self.dest.id => {
                    return Err(format!("cannot ask the destination: {e}"))
                }
                Err(_) => continue,
            };
            asked += 1;
            for rt in list {
                let live = matches!(rt.state, PowerState::Running | PowerState::Paused);
                if rt.id == self.vm.id {
                    if h.id == self.dest.id {
                        if live {
                            return Err(format!(
                                "VM {} already has a live QEMU on {} ({}): two copies must \
                                 never run; investigate before migrating",
                                self.name(),
                                h.name,
                                rt.state
                            ));
                        }
                        self.app
                            .agent(h)
                            .delete(rt.id)
                            .await
                            .map_err(|e| format!("removing a leftover on {}: {e}", h.name))?;
                    }
                    continue;
                }
                if let Some(mac) = rt
                    .spec
                    .nics
                    .iter()
                    .map(|n| n.mac.to_ascii_lowercase())
                    .find(|m| live && macs.contains(m))
                {
                    return Err(format!(
                        "MAC {mac} is live on host {} (VM {}): the LAN would see it twice",
                        h.name, rt.spec.name
                    ));
                }
            }
        }
        Ok(if macs.is_empty() {
            "the VM has no NIC".into()
        } else {
            format!(
                "{} not live on any other VM ({asked} host(s) asked)",
                macs.join(", ")
            )
        })
    }

    async fn measure(&self) -> Result<(MigrationSettings, Measurements), String> {
        let src = self.app.agent(&self.source);
        let dst = self.app.agent(&self.dest);
        // Both at once: QEMU samples the guest's pages while the agents time the link (the
        // user waits for this phase; neither disturbs the other's figure much).
        let link = async {
            let sink = dst.bandwidth_sink().await?;
            src.bandwidth_probe(&BandwidthProbe {
                to_migration_address: sink.address.clone(),
                bytes: PROBE_BYTES,
            })
            .await
            .map(|r| (sink.address, r))
        };
        let (dirty, link) = tokio::join!(src.migration_measure(self.vm.id, DIRTY_RATE_MS), link);
        let dirty = dirty.map_err(|e| format!("measuring the dirty rate: {e}"))?;
        let link_mbit = match link {
            Ok((addr, r)) => {
                self.event(
                    EventLevel::Info,
                    format!(
                        "measured: link {} → {addr}: {:.0} Mbit/s ({:.1} MiB in {} ms); guest \
                         dirties {:.1} MiB/s",
                        self.source.name,
                        r.mbit_s,
                        r.bytes as f64 / MIB,
                        r.elapsed_ms,
                        dirty.dirty_rate_mib_s
                    ),
                )
                .await;
                r.mbit_s
            }
            Err(e) => {
                self.event(
                    EventLevel::Warning,
                    format!("bandwidth probe failed ({e}); the settings assume a link speed"),
                )
                .await;
                f64::NAN
            }
        };
        let m = Measurements {
            memory_mib: self.vm.spec.memory_mib,
            dirty_rate_mib_s: dirty.dirty_rate_mib_s,
            link_mbit,
        };
        let budget = HostBudget {
            spare_cores: spare_cores(&self.source).min(spare_cores(&self.dest)),
            qemu: QemuVersion::parse(&self.source.facts.qemu_version)
                .min(QemuVersion::parse(&self.dest.facts.qemu_version))
                .unwrap_or(QemuVersion {
                    major: 0,
                    minor: 0,
                    micro: 0,
                }),
        };
        Ok((choose_settings(&self.req, &m, &budget), m))
    }

    async fn record_intent(&self) -> Result<MigrationRow, String> {
        let (task, vm_id, source, dest) = (self.task, self.vm.id, self.source.id, self.dest.id);
        self.app
            .db
            .write(
                move |tx| -> Result<Result<MigrationRow, String>, StoreError> {
                    let Some(vm) = tx.vm_by_id(vm_id)? else {
                        return Ok(Err("the VM was deleted".into()));
                    };
                    if vm.host_id != Some(source) {
                        return Ok(Err("the VM changed host meanwhile".into()));
                    }
                    let row = MigrationRow {
                        task_id: task,
                        vm_id,
                        vm_name: vm.name().to_string(),
                        source_host_id: source,
                        dest_host_id: dest,
                        generation_from: vm.generation,
                        generation_to: vm.generation + 1,
                        state: Rec::Preparing,
                        detail: None,
                    };
                    tx.insert_migration(&row, Utc::now())?;
                    Ok(Ok(row))
                },
            )
            .await
            .map_err(|e| format!("center store: {e}"))?
    }

    /// Adds the chosen settings and their measurements to the ownership record.
    async fn record_settings(
        &self,
        settings: &MigrationSettings,
        m: &Measurements,
    ) -> Result<(), String> {
        let task = self.task;
        let detail = json!({ "settings": settings, "measurements": m });
        self.app
            .db
            .write(move |tx| tx.set_migration_detail(task, &detail))
            .await
            .map_err(|e| format!("center store: {e}"))
    }

    async fn set_record(&self, from: &[Rec], to: Rec) -> Result<(), String> {
        let task = self.task;
        let from = from.to_vec();
        self.app
            .db
            .write(move |tx| tx.set_migration_state(task, &from, to, Utc::now()))
            .await
            .map(drop)
            .map_err(|e| format!("center store: {e}"))
    }

    /// Records the source's decisions (with their reasons) not recorded yet.
    async fn record_agent_events(&self, s: &AgentMigrationStatus, seen: &mut usize) {
        if s.events.len() <= *seen {
            return;
        }
        let new: Vec<String> = s.events[*seen..].to_vec();
        *seen = s.events.len();
        let (task, vm, host) = (self.task, self.name().to_string(), self.source.name.clone());
        let r = self
            .app
            .db
            .write(move |tx| {
                let now = Utc::now();
                for line in new {
                    tx.add_event(
                        ev(
                            task,
                            &vm,
                            &host,
                            EventLevel::Info,
                            format!("source {host}: {line}"),
                        ),
                        now,
                    )?;
                }
                Ok::<_, StoreError>(())
            })
            .await;
        if let Err(e) = r {
            tracing::error!(task = %self.task, "cannot record agent events: {e}");
        }
    }

    /// Follows pre-copy until the source pauses at pre-switchover.
    async fn watch_precopy(
        &mut self,
        src: &Agent,
        settings: &MigrationSettings,
    ) -> Result<AgentMigrationStatus, String> {
        let mut seen = self.events_seen;
        let mut unreachable_since: Option<Instant> = None;
        let backstop = Duration::from_millis(settings.deadline_ms) + DEADLINE_MARGIN;
        let mut cancelled = self.cancelled.clone();
        loop {
            self.check_cancel()?;
            if self.started.elapsed() > backstop {
                return Err(format!(
                    "the {} s deadline passed and the source did not end the migration",
                    settings.deadline_ms / 1000
                ));
            }
            let answer = tokio::select! {
                r = src.migration_status(self.vm.id, Some(AgentMigrationState::Active), STATUS_WAIT) => r,
                _ = cancelled.changed() => continue,
            };
            let s = match answer {
                Ok(s) => {
                    unreachable_since = None;
                    s
                }
                Err(e) => {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > UNREACHABLE_LIMIT
                        || matches!(e, AgentError::Refused { .. })
                    {
                        return Err(format!("lost the source's migration: {e}"));
                    }
                    tokio::time::sleep(STATUS_WAIT).await;
                    continue;
                }
            };
            if s.state == AgentMigrationState::PreSwitchover {
                // The guest is paused now: its events wait.
                self.hold_agent_events(&s, &mut seen);
                self.events_seen = seen;
                return Ok(s);
            }
            self.record_agent_events(&s, &mut seen).await;
            self.events_seen = seen;
            match s.state {
                AgentMigrationState::Active => {
                    if let Some(p) = &s.progress {
                        let sent = p.transferred_bytes as f64;
                        let left = p.remaining_bytes as f64;
                        let share = if sent + left > 0.0 {
                            sent / (sent + left)
                        } else {
                            0.0
                        };
                        let progress = 12 + (share * 76.0) as u8;
                        self.phase(
                            progress.min(88),
                            format!(
                                "pre-copy pass {}: {:.1} MiB left at {:.0} Mbit/s, guest dirties \
                                 {:.1} MiB/s, throttle {}%, expected downtime {} ms",
                                p.pass,
                                left / MIB,
                                p.mbit_s,
                                p.dirty_rate_mib_s,
                                p.cpu_throttle_pct,
                                p.expected_downtime_ms
                            ),
                        )
                        .await?;
                    }
                }
                other => {
                    return Err(format!(
                        "the source's migration ended {other:?}: {}",
                        s.error.unwrap_or_default()
                    ))
                }
            }
        }
    }

    /// The commit point: one transaction that re-checks the task was not cancelled and moves
    /// the VM's ownership to the destination.
    /// `forced` (after a post-copy switchover) commits even if the task was cancelled meanwhile.
    async fn commit(&self, forced: bool) -> Result<(), String> {
        let (task, vm, dest) = (self.task, self.name().to_string(), self.dest.name.clone());
        let source = self.source.name.clone();
        self.app
            .db
            .write(move |tx| -> Result<Result<(), String>, StoreError> {
                let running = tx
                    .task(task)?
                    .is_some_and(|t| t.task.state == TaskState::Running);
                if !running && !forced {
                    return Ok(Err("cancelled by user".into()));
                }
                if let Err(e) = tx.commit_migration(task, Utc::now()) {
                    return Ok(Err(format!("commit refused: {e}")));
                }
                let gen = tx.migration(task)?.map(|m| m.generation_to).unwrap_or(0);
                tx.add_event(
                    ev(
                        task,
                        &vm,
                        &source,
                        EventLevel::Info,
                        format!(
                            "committed: VM {vm} is owned by host {dest} under generation {gen}; \
                             the source will never run it again"
                        ),
                    ),
                    Utc::now(),
                )?;
                Ok(Ok(()))
            })
            .await
            .map_err(|e| format!("center store (not committed): {e}"))?
    }

    /// After the commit: run the guest on the destination, remove it from the source, record
    /// the result. Steps that cannot be done now are left to a background convergence.
    async fn forward(&self, done: AgentMigrationStatus) {
        let Some(row) = self.row.clone() else {
            return;
        };
        let dst = self.app.agent(&self.dest);
        let mut committed = Err(String::new());
        let resumed = Instant::now();
        for attempt in 0..DRIVER_ATTEMPTS {
            committed = dst
                .migration_commit(self.vm.id, row.generation_to)
                .await
                .map_err(|e| e.to_string());
            if committed.is_ok() {
                break;
            }
            if attempt == 0 {
                self.event(
                    EventLevel::Warning,
                    format!(
                        "destination {} did not run the guest yet ({}); retrying",
                        self.dest.name,
                        committed.as_ref().err().cloned().unwrap_or_default()
                    ),
                )
                .await;
            }
            tokio::time::sleep(RETRY).await;
        }
        let pause_ms = self.pause_started.map(|t| t.elapsed().as_millis() as u64);
        let mut timeline = self.timeline.clone();
        timeline.step("destination runs", resumed.elapsed());
        self.flush_held().await;
        self.event(
            EventLevel::Info,
            format!("switchover timeline (the guest's pause, as the center saw it): {timeline}"),
        )
        .await;
        if let Err(e) = committed {
            self.finish_task(
                TaskState::Failed,
                "committed; destination not confirmed".into(),
                None,
                Some(format!(
                    "the hand-over is committed to {} but it did not confirm running the guest \
                     ({e}); the center keeps trying",
                    self.dest.name
                )),
                format!(
                    "VM {} committed to {}, not yet running there",
                    self.name(),
                    self.dest.name
                ),
            )
            .await;
            self.app.spawn(converge(self.app.clone(), row));
            return;
        }
        self.event(
            EventLevel::Info,
            format!(
                "destination {} runs the guest and announced its MAC; guest paused about {} ms",
                self.dest.name,
                pause_ms.unwrap_or(0)
            ),
        )
        .await;
        let src = self.app.agent(&self.source);
        let mut finished = false;
        for _ in 0..DRIVER_ATTEMPTS {
            match src.migration_finish(self.vm.id).await {
                Ok(()) => {
                    finished = true;
                    break;
                }
                Err(e) if e.is_not_found() => match src.delete(self.vm.id).await {
                    Ok(()) => {
                        finished = true;
                        break;
                    }
                    Err(_) => tokio::time::sleep(RETRY).await,
                },
                Err(_) => tokio::time::sleep(RETRY).await,
            }
        }
        if !finished {
            self.event(
                EventLevel::Warning,
                format!(
                    "could not remove the migrated source QEMU from {} yet (it stays paused and \
                     never resumes); the center keeps trying",
                    self.source.name
                ),
            )
            .await;
            self.app.spawn(converge(self.app.clone(), row.clone()));
        } else {
            let _ = self.set_record(&[Rec::Committed], Rec::Done).await;
        }
        let total_ms = self.started.elapsed().as_millis() as u64;
        let result = MigrationResult {
            task: self.task,
            vm: self.name().to_string(),
            from: self.source.name.clone(),
            to: self.dest.name.clone(),
            status: MigrationOutcome::Completed,
            total_ms,
            downtime_ms: done.downtime_ms.unwrap_or(0),
            setup_ms: done.setup_ms.unwrap_or(0),
            bytes: done.bytes.unwrap_or(0),
            passes: done.passes.unwrap_or(0),
            settings: self.settings.clone().unwrap_or_else(empty_settings),
            measurements: self.measurements.clone().unwrap_or(Measurements {
                memory_mib: self.vm.spec.memory_mib,
                dirty_rate_mib_s: 0.0,
                link_mbit: 0.0,
            }),
            error: None,
            pause_ms,
        };
        self.finish_task(
            TaskState::Succeeded,
            format!("running on {}", self.dest.name),
            serde_json::to_value(&result).ok(),
            None,
            format!(
                "migration of VM {} to {} done: QEMU downtime {} ms, guest paused {} ms, {:.1} \
                 MiB in {} passes, {} ms in all",
                self.name(),
                self.dest.name,
                result.downtime_ms,
                pause_ms.unwrap_or(0),
                result.bytes as f64 / MIB,
                result.passes,
                total_ms
            ),
        )
        .await;
    }

    /// Before the commit: cancel on the source (the guest runs there as before), remove the
    /// destination, record why.
    async fn rollback(&self, why: &str) {
        self.flush_held().await;
        let touched = self.incoming_attempted || self.outgoing_attempted;
        if touched {
            self.event(EventLevel::Warning, format!("rolling back: {why}"))
                .await;
        }
        let mut ok = true;
        if self.outgoing_attempted {
            if let Err(e) = undo_source(&self.app, &self.source, self.vm.id).await {
                ok = false;
                self.event(
                    EventLevel::Error,
                    format!(
                        "could not make {} run the guest again yet: {e}",
                        self.source.name
                    ),
                )
                .await;
            }
        }
        // The destination goes only once the source runs the guest again: a source that
        // refused (its migration went post-copy after all) leaves the destination holding
        // what it lacks, and the convergence below takes the migration forward.
        if self.incoming_attempted && ok {
            let generation_to = self.row.as_ref().map_or(u64::MAX, |r| r.generation_to);
            if let Err(e) = undo_destination(&self.app, &self.dest, self.vm.id, generation_to).await
            {
                ok = false;
                self.event(
                    EventLevel::Error,
                    format!(
                        "could not remove the destination QEMU on {} yet: {e}",
                        self.dest.name
                    ),
                )
                .await;
            }
        }
        if let Some(row) = &self.row {
            if ok {
                let _ = self
                    .set_record(&[Rec::Preparing, Rec::Switching], Rec::RolledBack)
                    .await;
            } else {
                self.app.spawn(converge(self.app.clone(), row.clone()));
            }
        }
        let result = self.settings.clone().map(|settings| MigrationResult {
            task: self.task,
            vm: self.name().to_string(),
            from: self.source.name.clone(),
            to: self.dest.name.clone(),
            status: MigrationOutcome::RolledBack,
            total_ms: self.started.elapsed().as_millis() as u64,
            downtime_ms: 0,
            setup_ms: 0,
            bytes: 0,
            passes: 0,
            settings,
            measurements: self.measurements.clone().unwrap_or(Measurements {
                memory_mib: self.vm.spec.memory_mib,
                dirty_rate_mib_s: 0.0,
                link_mbit: 0.0,
            }),
            error: Some(why.to_string()),
            pause_ms: None,
        });
        let state = if why == "cancelled by user" {
            TaskState::Cancelled
        } else {
            TaskState::Failed
        };
        let summary = if touched && !ok {
            // Not yet known which way it ends (a source that went post-copy goes forward):
            // the convergence's events say.
            format!(
                "migration of VM {} to {} stopped: {why}; the hosts are being brought in line \
                 with the ownership record (see the task's events)",
                self.name(),
                self.dest.name
            )
        } else if touched {
            format!(
                "migration of VM {} to {} rolled back: {why}; the VM runs on {} as before",
                self.name(),
                self.dest.name,
                self.source.name
            )
        } else {
            format!(
                "migration of VM {} to {} did not start: {why}",
                self.name(),
                self.dest.name
            )
        };
        self.finish_task(
            state,
            if touched { "rolled back" } else { "failed" }.into(),
            result.and_then(|r| serde_json::to_value(&r).ok()),
            Some(why.to_string()),
            summary,
        )
        .await;
    }

    async fn finish_task(
        &self,
        state: TaskState,
        phase: String,
        result: Option<serde_json::Value>,
        error: Option<String>,
        summary: String,
    ) {
        let (task, vm_id) = (self.task, self.vm.id);
        let (vm, host) = (self.name().to_string(), self.source.name.clone());
        let app = self.app.clone();
        let r = self
            .app
            .db
            .write(move |tx| {
                let now = Utc::now();
                app.settle(vm_id);
                // A task the user cancelled stays cancelled; its outcome is still recorded.
                let ended =
                    tx.finish_task(task, state, &phase, result.as_ref(), error.as_deref(), now)?;
                if !ended {
                    if let Some(r) = &result {
                        tx.set_task_result(task, r)?;
                    }
                }
                if state == TaskState::Succeeded {
                    tx.set_vm_actual(vm_id, PowerState::Running)?;
                }
                tx.add_event(
                    ev(
                        task,
                        &vm,
                        &host,
                        if state == TaskState::Succeeded {
                            EventLevel::Info
                        } else {
                            EventLevel::Warning
                        },
                        summary,
                    ),
                    now,
                )?;
                Ok::<_, StoreError>(())
            })
            .await;
        if let Err(e) = r {
            tracing::error!(task = %self.task, "cannot record the migration's outcome: {e}");
        }
    }
}

/// Source side of a rollback: cancel and resume (or, if the agent no longer knows the
/// migration, resume a paused guest).
async fn undo_source(app: &App, host: &HostRecord, vm: Uuid) -> Result<(), String> {
    let a = app.agent(host);
    match a.migration_abort(vm).await {
        Ok(()) => Ok(()),
        Err(e) if e.is_not_found() => match a.vm(vm).await.map_err(|e| e.to_string())? {
            Some(rt) if rt.state == PowerState::Paused => {
                a.resume(vm).await.map(drop).map_err(|e| e.to_string())
            }
            Some(_) => Ok(()),
            None => Err(format!("host {} no longer has VM {vm}", host.name)),
        },
        Err(e) => Err(e.to_string()),
    }
}

/// Destination side of a rollback: kill and remove the incoming QEMU — never a copy that
/// runs there under this migration's generation or a later one (that one owns the VM).
async fn undo_destination(
    app: &App,
    host: &HostRecord,
    vm: Uuid,
    generation_to: u64,
) -> Result<(), String> {
    let a = app.agent(host);
    match a.migration_abort(vm).await {
        Ok(()) => Ok(()),
        Err(e) if e.is_not_found() => match a.vm(vm).await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(rt) if rt.state == PowerState::Running && rt.generation >= generation_to => {
                Err(format!(
                    "host {} runs VM {vm} under generation {} (this migration's is {}): \
                         it is not a leftover; refusing to remove it",
                    host.name, rt.generation, generation_to
                ))
            }
            Some(_) => a.delete(vm).await.map_err(|e| e.to_string()),
        },
        Err(e) => Err(e.to_string()),
    }
}

/// Destination side after the commit: run the guest (idempotent).
async fn redo_destination(
    app: &App,
    host: &HostRecord,
    vm: Uuid,
    generation: u64,
) -> Result<(), String> {
    app.agent(host)
        .migration_commit(vm, generation)
        .await
        .map_err(|e| e.to_string())
}

/// Source side after the commit: quit and remove the paused QEMU.
async fn redo_source(app: &App, host: &HostRecord, vm: Uuid) -> Result<(), String> {
    let a = app.agent(host);
    match a.migration_finish(vm).await {
        Ok(()) => Ok(()),
        Err(e) if e.is_not_found() => a.delete(vm).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Brings both hosts in line with a migration's record — forward if committed (or if the
/// source went post-copy and so can never resume), backward otherwise — retrying until both
/// agents have done their part, then records the end. The way and the order of the steps are
/// `tern_motion::settle`'s.
pub async fn converge(app: Arc<App>, row: MigrationRow) {
    let task = row.task_id;
    let (vm_id, vm, generation_to) = (row.vm_id, row.vm_name.clone(), row.generation_to);
    let mut warned = false;
    loop {
        // The store's record is the truth: a caller's copy may predate the commit, and rolling
        // back a committed migration would remove the only running copy. The host records may
        // have new agent URLs (re-registration): read them again too.
        let (s, d) = (row.source_host_id, row.dest_host_id);
        let fresh = app
            .db
            .read(move |tx| {
                Ok::<_, StoreError>((tx.migration(task)?, tx.host_by_id(s)?, tx.host_by_id(d)?))
            })
            .await;
        let (record, src, dst) = match fresh {
            Ok((Some(m), Some(a), Some(b))) => (m.state, a, b),
            Ok((_, None, _) | (_, _, None)) => {
                tracing::error!(task = %task, "a host of the migration is gone; nothing to converge");
                return;
            }
            _ => {
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        // Only an uncommitted record needs the source's word (can it still resume?).
        let source = match record {
            Rec::Preparing | Rec::Switching => source_state(&app, &src, vm_id).await,
            _ => SourceState::Unknown,
        };
        let (way, steps) = tern_motion::settle(record, source);
        let outcome = match way {
            Way::Settled => return,
            Way::Wait => Err(format!("cannot ask {} about its migration", src.name)),
            Way::Back | Way::Forward => {
                let mut r = Ok(());
                for step in steps {
                    r = settle_step(&app, task, &src, &dst, vm_id, generation_to, step).await;
                    if r.is_err() {
                        break;
                    }
                }
                r
            }
        };
        match outcome {
            Ok(()) => {
                let host = if way == Way::Forward {
                    &dst.name
                } else {
                    &src.name
                };
                let e = NewEvent::info(format!(
                    "migration of VM {vm} settled: it runs on {host} only"
                ))
                .task(task)
                .vm(&vm)
                .host(Some(host));
                let _ = app.db.write(move |tx| tx.add_event(e, Utc::now())).await;
                return;
            }
            Err(e) => {
                if !warned {
                    warned = true;
                    let (on, off) = match way {
                        Way::Forward => (&dst.name, &src.name),
                        _ => (&src.name, &dst.name),
                    };
                    let msg = format!(
                        "migration of VM {vm}: waiting for the hosts to run it on {on} and \
                         remove it from {off} ({e}); retrying"
                    );
                    let e = NewEvent::warning(msg)
                        .task(task)
                        .vm(&vm)
                        .host(Some(&src.name));
                    let _ = app.db.write(move |tx| tx.add_event(e, Utc::now())).await;
                }
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// What the source's agent says of its outgoing migration: post-copy (it can never resume),
/// whole (it runs, or can), or unknown (unreachable).
async fn source_state(app: &App, src: &HostRecord, vm: Uuid) -> SourceState {
    match app
        .agent(src)
        .migration_status(vm, None, Duration::ZERO)
        .await
    {
        Ok(s) if s.postcopy => SourceState::PostCopy,
        Ok(_) => SourceState::Whole,
        // It no longer knows the migration: its guest runs or is paused whole.
        Err(e) if e.is_not_found() => SourceState::Whole,
        Err(_) => SourceState::Unknown,
    }
}

/// Carries out one step of settling a migration.
async fn settle_step(
    app: &Arc<App>,
    task: Uuid,
    src: &HostRecord,
    dst: &HostRecord,
    vm: Uuid,
    generation_to: u64,
    step: SettleStep,
) -> Result<(), String> {
    match step {
        SettleStep::ResumeSource => undo_source(app, src, vm).await,
        SettleStep::RemoveDestination => undo_destination(app, dst, vm, generation_to).await,
        SettleStep::RunDestination => redo_destination(app, dst, vm, generation_to).await,
        SettleStep::QuitSource => redo_source(app, src, vm).await,
        SettleStep::CommitRecord => {
            let (source, dest) = (src.name.clone(), dst.name.clone());
            app.db
                .write(move |tx| -> Result<Result<(), String>, StoreError> {
                    if let Err(e) = tx.commit_migration(task, Utc::now()) {
                        return Ok(Err(format!("commit refused: {e}")));
                    }
                    let m = tx.migration(task)?;
                    let (vm, gen) = m.map_or((String::new(), 0), |m| (m.vm_name, m.generation_to));
                    tx.add_event(
                        ev(
                            task,
                            &vm,
                            &source,
                            EventLevel::Warning,
                            format!(
                                "committed: the source's migration went post-copy and cannot \
                                 resume, so VM {vm} goes forward to host {dest} under \
                                 generation {gen}"
                            ),
                        ),
                        Utc::now(),
                    )?;
                    Ok(Ok(()))
                })
                .await
                .map_err(|e| format!("center store (not committed): {e}"))?
        }
        SettleStep::Finish(to) => app
            .db
            .write(move |tx| tx.set_migration_state(task, &Rec::predecessors(to), to, Utc::now()))
            .await
            .map(drop)
            .map_err(|e| format!("center store: {e}")),
    }
}

/// At center start, before tasks are recovered: ends the migrations a previous center left
/// going by the ownership rule (committed → forward, else backward), in the background.
pub async fn recover(app: &Arc<App>) -> Result<usize, ApiErr> {
    let rows = app
        .db
        .write(|tx| {
            let now = Utc::now();
            let rows = tx.unfinished_migrations()?;
            for row in &rows {
                let (state, phase, msg) = if row.state == Rec::Committed {
                    (
                        TaskState::Succeeded,
                        "committed before the center restarted; completing",
                        format!(
                            "migration of VM {} was committed before the center restarted: \
                             completing it (the destination runs it, the source is removed)",
                            row.vm_name
                        ),
                    )
                } else {
                    (
                        TaskState::Failed,
                        "rolled back after a center restart",
                        format!(
                            "migration of VM {} was not committed when the center restarted: \
                             rolling it back (the source runs it, the destination is removed) \
                             — or, if the source went post-copy and cannot resume, forward",
                            row.vm_name
                        ),
                    )
                };
                let error = (state == TaskState::Failed).then_some(crate::tasks::RESTART_ERROR);
                tx.finish_task(row.task_id, state, phase, None, error, now)?;
                tx.add_event(
                    NewEvent::warning(msg).task(row.task_id).vm(&row.vm_name),
                    now,
                )?;
            }
            Ok::<_, ApiErr>(rows)
        })
        .await?;
    let n = rows.len();
    for row in rows {
        app.spawn(converge(app.clone(), row));
    }
    Ok(n)
}

/// A migration task may be cancelled until its hand-over is committed.
pub fn cancel_refusal(tx: &crate::store::Tx, task: Uuid) -> Result<Option<String>, StoreError> {
    Ok(tx.migration(task)?.and_then(|m| {
        matches!(m.state, Rec::Committed | Rec::Done).then(|| {
            format!(
                "the migration of VM {} is committed (the destination owns it): it can no \
                 longer be cancelled; move it back with another migration",
                m.vm_name
            )
        })
    }))
}

fn qemu_check(source: &HostRecord, dest: &HostRecord) -> Result<String, String> {
    match (
        QemuVersion::parse(&source.facts.qemu_version),
        QemuVersion::parse(&dest.facts.qemu_version),
    ) {
        (Some(s), Some(d)) if d >= s => Ok(format!(
            "QEMU {d} on {} loads streams of QEMU {s} on {} (same machine type {})",
            dest.name, source.name, MACHINE_TYPE
        )),
        (Some(s), Some(d)) => Err(format!(
            "QEMU {d} on {} is older than QEMU {s} on {}: an older QEMU cannot be relied on to \
             load a newer one's stream; upgrade {}",
            dest.name, source.name, dest.name
        )),
        _ => Err(format!(
            "unknown QEMU version on {} ({:?}) or {} ({:?})",
            source.name, source.facts.qemu_version, dest.name, dest.facts.qemu_version
        )),
    }
}

/// Cores a host can spare for migration threads, from its last load figures.
fn spare_cores(h: &HostRecord) -> u32 {
    let busy = h
        .load
        .as_ref()
        .map(|l| l.cpu_percent.clamp(0.0, 100.0))
        .unwrap_or(50.0);
    (f64::from(h.facts.cores) * (100.0 - busy) / 100.0).floor() as u32
}

fn empty_settings() -> MigrationSettings {
    MigrationSettings {
        multifd_channels: 0,
        max_bandwidth_mib_s: None,
        downtime_limit_ms: 0,
        compression: "none".into(),
        auto_converge: false,
        postcopy_allowed: false,
        deadline_ms: 0,
        reasons: Vec::new(),
        downtime_budget_ms: 0,
        zero_page_detection: "legacy".into(),
        throttle: Default::default(),
    }
}
