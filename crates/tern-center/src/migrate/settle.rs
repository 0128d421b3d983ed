//! How a migration ends: forward after the commit, back before it, and the background
//! convergence that brings both hosts in line with the ownership record.

use super::*;

impl Mig {
    /// After the commit: run the guest on the destination, remove it from the source, record
    /// the result. Steps that cannot be done now are left to a background convergence.
    pub(super) async fn forward(&self, done: AgentMigrationStatus) {
        let Some(row) = self.row.clone() else {
            return;
        };
        let resumed = Instant::now();
        let running = self.run_destination(row.generation_to).await;
        if running.is_ok() {
            // The stream is over and the guest runs on the destination: the slots go to the
            // next migration now, not after the source's QEMU is gone and the records written.
            self.free_slots().await;
        }
        let resumed_at = running.as_ref().ok().and_then(|c| c.resumed_at);
        let pause_ms = self
            .paused_for
            .or_else(|| self.pause_started.map(|t| t.elapsed()))
            .map(|d| d.as_millis() as u64);
        let mut timeline = self.timeline.clone();
        timeline.step("destination runs", resumed.elapsed());
        self.flush_held().await;
        self.event(
            EventLevel::Info,
            format!("switchover timeline (the guest's pause, as the center saw it): {timeline}"),
        )
        .await;
        if let Err(e) = running {
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
        let by_qemu = match (self.stopped_at, resumed_at) {
            (Some(stop), Some(resume)) => format!(
                " (QEMU's STOP on {} to its RESUME on {}: {:.1} ms by the two hosts' clocks)",
                self.source.name,
                self.dest.name,
                (resume - stop).num_microseconds().unwrap_or(0) as f64 / 1000.0
            ),
            _ => String::new(),
        };
        self.event(
            EventLevel::Info,
            format!(
                "destination {} runs the guest and announced its MAC; guest paused about {} \
                 ms{by_qemu}",
                self.dest.name,
                pause_ms.unwrap_or(0)
            ),
        )
        .await;
        if self.remove_source().await {
            let _ = self.set_record(&[Rec::Committed], Rec::Done).await;
        } else {
            self.event(
                EventLevel::Warning,
                format!(
                    "could not remove the migrated source QEMU from {} yet (it stays paused and \
                     never resumes); the center keeps trying",
                    self.source.name
                ),
            )
            .await;
            self.app.spawn(converge(self.app.clone(), row));
        }
        let result = MigrationResult {
            downtime_ms: done.downtime_ms.unwrap_or(0),
            setup_ms: done.setup_ms.unwrap_or(0),
            bytes: done.bytes.unwrap_or(0),
            passes: done.passes.unwrap_or(0),
            pause_ms,
            resumed_at: resumed_at.or(self.resumed_at),
            ..self.result(MigrationOutcome::Completed, None)
        };
        let summary = format!(
            "migration of VM {} to {} done: QEMU downtime {} ms, guest paused {} ms, {:.1} MiB \
             in {} passes, {} ms in all",
            self.name(),
            self.dest.name,
            result.downtime_ms,
            pause_ms.unwrap_or(0),
            result.bytes as f64 / MIB,
            result.passes,
            result.total_ms
        );
        self.finish_task(
            TaskState::Succeeded,
            format!("running on {}", self.dest.name),
            serde_json::to_value(&result).ok(),
            None,
            summary,
        )
        .await;
    }

    /// What became of the guest on the source after a rollback, as its agent tells it: the
    /// source QEMU may have been what failed (killed, crashed), and then the VM does not run
    /// "as before" — say so, and what to do.
    async fn source_fate(&self) -> String {
        let src = &self.source.name;
        match self.app.agent(&self.source).vm(self.vm.id).await {
            Ok(Some(rt)) if rt.state == PowerState::Running => {
                format!("the VM runs on {src} as before")
            }
            Ok(Some(rt)) => format!(
                "the VM is {} on {src}{}: nothing else runs it; start it again with tern vm \
                 start {}",
                rt.state,
                rt.exit_reason
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default(),
                self.name()
            ),
            Ok(None) => format!(
                "host {src} no longer has the VM: nothing runs it; start it again with tern vm \
                 start {}",
                self.name()
            ),
            Err(e) => format!("the VM's state on {src} is not known yet ({e})"),
        }
    }

    /// Asks the destination to run the committed guest, a few times; says so after the first
    /// refusal.
    async fn run_destination(&self, generation_to: u64) -> Result<Committed, String> {
        let dst = self.app.agent(&self.dest);
        DRIVER_RETRY
            .run(|failures| {
                let dst = &dst;
                async move {
                    let commit = Commit {
                        generation: generation_to,
                        frames: self.handed.clone(),
                    };
                    let r = dst.migration_commit(self.vm.id, &commit).await;
                    if let (Err(e), 0) = (&r, failures) {
                        self.event(
                            EventLevel::Warning,
                            format!(
                                "destination {} did not run the guest yet ({e}); retrying",
                                self.dest.name
                            ),
                        )
                        .await;
                    }
                    r.map_err(|e| e.to_string())
                }
            })
            .await
    }

    /// Quits the migrated source QEMU and removes the VM from the source host, a few times;
    /// whether it is gone.
    async fn remove_source(&self) -> bool {
        let src = self.app.agent(&self.source);
        DRIVER_RETRY
            .run(|_| {
                let src = &src;
                async move {
                    match src.migration_finish(self.vm.id).await {
                        // It no longer knows the migration: remove the VM itself.
                        Err(e) if e.is_not_found() => src.delete(self.vm.id).await,
                        r => r,
                    }
                }
            })
            .await
            .is_ok()
    }

    /// The task's result document as far as the center knows it (the source's figures are
    /// filled in by the caller when it has them).
    fn result(&self, status: MigrationOutcome, error: Option<String>) -> MigrationResult {
        MigrationResult {
            task: self.task,
            vm: self.name().to_string(),
            from: self.source.name.clone(),
            to: self.dest.name.clone(),
            status,
            total_ms: self.started.elapsed().as_millis() as u64,
            downtime_ms: 0,
            setup_ms: 0,
            bytes: 0,
            passes: 0,
            settings: self.settings.clone().unwrap_or_else(empty_settings),
            measurements: self.measurements.clone().unwrap_or(Measurements {
                memory_mib: self.vm.spec.memory_mib,
                dirty_rate_mib_s: None,
                link_mbit: 0.0,
                link_age_s: None,
            }),
            error,
            pause_ms: None,
            stopped_at: self.stopped_at,
            resumed_at: self.resumed_at,
        }
    }

    /// Before the commit: cancel on the source (the guest runs there as before), remove the
    /// destination, record why.
    ///
    /// The guest may be paused at the source (a switchover got this far): it runs again
    /// before anything is written to the store; the events of these steps are held until then.
    pub(super) async fn rollback(&self, why: &Abort) {
        let touched = self.incoming_attempted || self.outgoing_attempted;
        if touched {
            self.hold(EventLevel::Warning, format!("rolling back: {why}"));
        }
        let mut ok = true;
        let handed_back = self.take_back_steered_frames().await;
        let mut undone = Ok(());
        if self.outgoing_attempted {
            undone = undo_source(&self.app, &self.source, self.vm.id, handed_back).await;
        }
        // How long the guest was paused, when a switchover had paused it.
        let pause_ms = self
            .pause_started
            .filter(|_| undone.is_ok())
            .map(|t| t.elapsed().as_millis() as u64);
        self.flush_held().await;
        if let Err(e) = undone {
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
        // Only a migration that got as far as its settings has figures worth a result.
        let result = self.settings.is_some().then(|| MigrationResult {
            pause_ms,
            ..self.result(MigrationOutcome::RolledBack, Some(why.to_string()))
        });
        let state = match why {
            Abort::Cancelled => TaskState::Cancelled,
            Abort::Failed(_) => TaskState::Failed,
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
                "migration of VM {} to {} rolled back: {why}; {}",
                self.name(),
                self.dest.name,
                self.source_fate().await
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

    /// A rollback after the destination steered the LAN to its taps: the source steers it
    /// back first (so nothing more reaches the destination), then the destination gives up
    /// what its taps queued meanwhile, for the source to deliver before its guest resumes.
    /// Each step is best effort: a frame that is lost here is one its sender retransmits.
    async fn take_back_steered_frames(&self) -> Vec<HandedFrame> {
        if !self.steered {
            return Vec::new();
        }
        let (src, dst) = (self.app.agent(&self.source), self.app.agent(&self.dest));
        // Held, not written: the guest is paused at the source until the rollback resumes it.
        if let Err(e) = src.migration_steer(self.vm.id).await {
            self.hold(
                EventLevel::Warning,
                format!(
                    "{} could not steer the LAN back to itself ({e}); the guest announces \
                     itself when it resumes",
                    self.source.name
                ),
            );
        }
        match dst.migration_frames(self.vm.id).await {
            Ok(q) => {
                self.hold(
                    EventLevel::Info,
                    format!(
                        "{} frame(s) that reached {} after the LAN was steered there handed \
                         back to {} (left out: {} broadcast/multicast, {} for other MACs, {} \
                         over the limit)",
                        q.frames.len(),
                        self.dest.name,
                        self.source.name,
                        q.skipped_flooded,
                        q.skipped_foreign,
                        q.skipped_over_limit
                    ),
                );
                q.frames
            }
            Err(e) => {
                self.hold(
                    EventLevel::Warning,
                    format!(
                        "the frames queued at {} could not be handed back ({e}); their senders \
                         retransmit them",
                        self.dest.name
                    ),
                );
                Vec::new()
            }
        }
    }

    /// Records the migration's end through the task runner. Its event is recorded even when
    /// the user cancelled the task first: a rollback or a commit still happened.
    pub(super) async fn finish_task(
        &self,
        state: TaskState,
        phase: String,
        result: Option<serde_json::Value>,
        error: Option<String>,
        summary: String,
    ) {
        self.free_slots().await;
        let end = match (state, error) {
            (TaskState::Succeeded, _) => {
                TaskEnd::succeeded(phase, summary).changes(|tx, t, _| match t.vm_id {
                    Some(vm) => tx.set_vm_actual(vm, PowerState::Running),
                    None => Ok(()),
                })
            }
            (state, error) => TaskEnd::failed(error.unwrap_or_default(), summary)
                .state(state)
                .phase(phase)
                .level(EventLevel::Warning),
        };
        tasks::finish(&self.app, self.task, end.result(result).tell_after_cancel()).await;
    }
}

/// Source side of a rollback: cancel and resume (or, if the agent no longer knows the
/// migration, resume a paused guest), delivering `frames` (the destination's, handed back)
/// first.
pub(super) async fn undo_source(
    app: &App,
    host: &HostRecord,
    vm: Uuid,
    frames: Vec<HandedFrame>,
) -> Result<(), String> {
    let a = app.agent(host);
    match a.migration_abort(vm, &AbortMigration { frames }).await {
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
pub(super) async fn undo_destination(
    app: &App,
    host: &HostRecord,
    vm: Uuid,
    generation_to: u64,
) -> Result<(), String> {
    let a = app.agent(host);
    match a.migration_abort(vm, &AbortMigration::default()).await {
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
pub(super) async fn redo_destination(
    app: &App,
    host: &HostRecord,
    vm: Uuid,
    generation: u64,
) -> Result<(), String> {
    app.agent(host)
        .migration_commit(
            vm,
            &Commit {
                generation,
                frames: Vec::new(),
            },
        )
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Source side after the commit: quit and remove the paused QEMU.
pub(super) async fn redo_source(app: &App, host: &HostRecord, vm: Uuid) -> Result<(), String> {
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
    let warned = std::sync::atomic::AtomicBool::new(false);
    let _ = Retry::forever(RETRY)
        .run(|_| reconcile(&app, &row, &warned))
        .await;
}

/// One pass of [`converge`]: plans from the record and the source's word, carries the plan
/// out. `Ok` when the migration is settled (or can never be: a host is gone); `Err` to be run
/// again — said once, as a warning event.
async fn reconcile(
    app: &Arc<App>,
    row: &MigrationRow,
    warned: &std::sync::atomic::AtomicBool,
) -> Result<(), String> {
    let task = row.task_id;
    let (vm_id, vm, generation_to) = (row.vm_id, row.vm_name.as_str(), row.generation_to);
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
            return Ok(());
        }
        Ok((None, _, _)) => return Err(format!("the record of migration {task} is missing")),
        Err(e) => return Err(format!("center store: {e}")),
    };
    // Only an uncommitted record needs the source's word (can it still resume?).
    let source = match record {
        Rec::Preparing | Rec::Switching => source_state(app, &src, vm_id).await,
        _ => SourceState::Unknown,
    };
    let (way, steps) = tern_motion::settle(record, source);
    let outcome = match way {
        Way::Settled => return Ok(()),
        Way::Wait => Err(format!("cannot ask {} about its migration", src.name)),
        Way::Back | Way::Forward => {
            let mut r = Ok(());
            for step in steps {
                r = settle_step(app, task, &src, &dst, vm_id, generation_to, step).await;
                if r.is_err() {
                    break;
                }
            }
            r
        }
    };
    let (on, off) = match way {
        Way::Forward => (&dst.name, &src.name),
        _ => (&src.name, &dst.name),
    };
    match outcome {
        Ok(()) => {
            // Undone is not the same as running: the source's copy may have ended meanwhile.
            let ended_there = match way {
                // Only a state the source reports counts (an unreachable agent proves nothing).
                Way::Back => match app.agent(&src).vm(vm_id).await {
                    Ok(Some(rt)) if rt.state != PowerState::Running => Some(rt.state.to_string()),
                    _ => None,
                },
                _ => None,
            };
            let e = match ended_there {
                None => NewEvent::info(format!(
                    "migration of VM {vm} settled: it runs on {on} only"
                )),
                Some(state) => NewEvent::warning(format!(
                    "migration of VM {vm} settled: removed from {off}; on {on} it is {state} \
                     (its copy there ended during the migration): `tern vm start {vm}` runs it \
                     again"
                )),
            };
            app.add_event(e.task(task).vm(vm).host(Some(on))).await;
            Ok(())
        }
        Err(e) => {
            if !warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                let msg = format!(
                    "migration of VM {vm}: waiting for the hosts to run it on {on} and remove \
                     it from {off} ({e}); retrying"
                );
                let e = NewEvent::warning(msg)
                    .task(task)
                    .vm(vm)
                    .host(Some(&src.name));
                app.add_event(e).await;
            }
            Err(e)
        }
    }
}

/// What the source's agent says of its outgoing migration: post-copy (it can never resume),
/// whole (it runs, or can), or unknown (unreachable).
pub(super) async fn source_state(app: &App, src: &HostRecord, vm: Uuid) -> SourceState {
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
pub(super) async fn settle_step(
    app: &Arc<App>,
    task: Uuid,
    src: &HostRecord,
    dst: &HostRecord,
    vm: Uuid,
    generation_to: u64,
    step: SettleStep,
) -> Result<(), String> {
    match step {
        SettleStep::ResumeSource => undo_source(app, src, vm, Vec::new()).await,
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

/// What a restarted center did with the migrations the previous one left going.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Ended by the ownership rule, in the background.
    pub settled: usize,
    /// Tasks driven on from pre-copy (the source still copies): their tasks go on running.
    pub resumed: Vec<Uuid>,
}

/// At center start, before tasks are recovered: an uncommitted migration whose source still
/// copies in pre-copy is driven on from there, as if the center had never gone; the others
/// end by the ownership rule (committed → forward, else backward), in the background.
pub async fn recover(app: &Arc<App>) -> Result<Recovered, CenterError> {
    let rows = app.db.read(|tx| tx.unfinished_migrations()).await?;
    // The sources are asked all at once: an unreachable one costs its time limit once, not
    // once per migration before it.
    let mut asks = tokio::task::JoinSet::new();
    for row in &rows {
        let (app, row) = (app.clone(), row.clone());
        asks.spawn(async move { super::resume::resumable(&app, &row).await });
    }
    let mut resumable = Vec::new();
    while let Some(answer) = asks.join_next().await {
        if let Ok(Some(r)) = answer {
            resumable.push(r);
        }
    }
    let resumed: Vec<Uuid> = resumable.iter().map(|r| r.task()).collect();
    let skip = resumed.clone();
    let settle = app
        .db
        .write(move |tx| {
            let now = Utc::now();
            let mut settle = Vec::new();
            for row in rows {
                if skip.contains(&row.task_id) {
                    tx.add_event(
                        NewEvent::warning(format!(
                            "the center restarted during the migration of VM {}; its source still \
                             copies in pre-copy, so the migration is driven on from there",
                            row.vm_name
                        ))
                        .task(row.task_id)
                        .vm(&row.vm_name),
                        now,
                    )?;
                    continue;
                }
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
                settle.push(row);
            }
            Ok::<_, CenterError>(settle)
        })
        .await?;
    let settled = settle.len();
    for row in settle {
        app.spawn(converge(app.clone(), row));
    }
    for r in resumable {
        r.drive(app);
    }
    Ok(Recovered { settled, resumed })
}

pub(super) fn empty_settings() -> MigrationSettings {
    MigrationSettings {
        multifd_channels: 0,
        max_bandwidth_mib_s: None,
        downtime_limit_ms: 0,
        compression: Default::default(),
        auto_converge: false,
        postcopy_allowed: false,
        deadline_ms: 0,
        reasons: Vec::new(),
        downtime_budget_ms: 0,
        zero_page_detection: Default::default(),
        throttle: Default::default(),
        paced_from_link_mbit: None,
        encrypted: false,
        relayed: false,
        relay_source: None,
    }
}
