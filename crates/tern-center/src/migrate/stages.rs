//! The stages of a migration up to and including the commit.

use super::checks::spare_cores;
use super::*;

impl Mig {
    /// Everything up to and including the commit, one stage after the other; the first stage
    /// that fails ends the run (the caller rolls back what was touched).
    pub(super) async fn run(&mut self) -> Result<Finished, Abort> {
        let mut prep = Timeline::default();
        prep.step("queued", self.started.elapsed());
        let report = prep.time("pre-checks", self.stage_prechecks()).await?;
        if self.req.dry_run {
            return Ok(Finished::DryRun(report));
        }
        self.check_cancel()?;
        prep.time("slot", self.take_slots()).await?;
        let row = prep.time("intent", self.stage_intent()).await?;
        let t = Instant::now();
        let (settings, listening) = self.stage_settings(&row, &mut prep).await?;
        prep.step("settings and destination", t.elapsed());
        self.check_cancel()?;
        let uri = match listening {
            Some(uri) => uri,
            None => prep.time("listen", self.stage_prepare(&settings)).await?,
        };
        self.check_cancel()?;
        let at_switch = self.stage_precopy(uri, &settings, prep).await?;
        self.hand_over(at_switch).await
    }

    /// A restarted center's run of a migration its predecessor left in pre-copy: the same
    /// stages from watching pre-copy on.
    pub(super) async fn run_resumed(
        &mut self,
        settings: MigrationSettings,
    ) -> Result<Finished, Abort> {
        self.phase(
            Stage::Precopy {
                sent: 0,
                remaining: 0,
            },
            "pre-copy, driven on after a center restart".into(),
        )
        .await?;
        let src = self.app.agent(&self.source);
        let at_switch = self.watch_precopy(&src, &settings).await?;
        self.hand_over(at_switch).await
    }

    /// From the source paused at pre-switchover to the commit. The reading at the pause
    /// ends the timeline's pre-copy (a short migration may have no other); it is written
    /// with the held events, once the guest runs.
    async fn hand_over(&mut self, at_switch: AgentMigrationStatus) -> Result<Finished, Abort> {
        if let Some(p) = &at_switch.progress {
            self.hold_sample(p);
        }
        self.switch_and_commit(at_switch).await
    }

    async fn switch_and_commit(
        &mut self,
        at_switch: AgentMigrationStatus,
    ) -> Result<Finished, Abort> {
        self.check_cancel()?;
        match self.stage_switchover(at_switch).await? {
            Switched::PostCopy(done) => {
                self.stage_commit_after_postcopy().await;
                Ok(Finished::Committed(done))
            }
            Switched::Whole(_)
                if self.app.config.inject_fault == Some(crate::config::FaultPoint::AfterSteer) =>
            {
                Err(Abort::Failed(
                    "fault injected after the steer (--inject-fault after-steer): rolling back"
                        .into(),
                ))
            }
            Switched::Whole(done) => {
                // The guest is paused: the commit is the one store write it waits for (no
                // progress line first). Meanwhile the source gives up the frames its taps
                // queued since the STOP (the LAN was steered by now, so no more arrive there).
                let t = Instant::now();
                let src = self.app.agent(&self.source);
                let (committed, queued) =
                    tokio::join!(self.commit(false), src.migration_frames(self.vm.id));
                committed?;
                if self.app.config.inject_fault == Some(crate::config::FaultPoint::CrashAfterCommit)
                {
                    tracing::error!("fault injected: the center dies right after the commit");
                    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
                }
                self.timeline.step("commit", t.elapsed());
                match queued {
                    Ok(q) => {
                        self.hold(
                            EventLevel::Info,
                            format!(
                                "{} frame(s) that reached {} after the guest stopped, broadcasts \
                                 included, handed to {} ({} of them recovered from QEMU, which \
                                 read them after the pause; left out: {} for other MACs, {} over \
                                 the limit)",
                                q.frames.len(),
                                self.source.name,
                                self.dest.name,
                                q.recovered,
                                q.skipped_foreign,
                                q.skipped_over_limit
                            ),
                        );
                        self.handed = q.frames;
                    }
                    Err(e) => self.hold(
                        EventLevel::Warning,
                        format!(
                            "the frames queued at {} could not be handed over ({e}); their \
                             senders retransmit them",
                            self.source.name
                        ),
                    ),
                }
                Ok(Finished::Committed(done))
            }
        }
    }

    /// Nothing moves before every pre-check passes.
    async fn stage_prechecks(&self) -> Result<MigrationCheckReport, Abort> {
        self.phase(Stage::Prechecks, "pre-checks".into()).await?;
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
            let failed = report.failures();
            return Err(Abort::Failed(format!(
                "pre-checks failed: {}",
                failed.join("; ")
            )));
        }
        Ok(report)
    }

    /// The ownership record, written before the destination exists.
    async fn stage_intent(&mut self) -> Result<MigrationRow, Abort> {
        self.phase(Stage::Intent, "recording the ownership intent".into())
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
        Ok(row)
    }

    /// The settings, and the destination started (same spec as the source runs, paused).
    ///
    /// Nothing is measured that QEMU's own figures tell once copying runs: the guest's dirty
    /// rate is judged from the first pass (`ConvergenceWatcher`), and a pace taken from a
    /// wrong link figure is re-judged from the stream (`Pacer`). The one probe left is the
    /// link's, which the choice of compression and channels and the pace need before the
    /// stream opens; a figure measured between the same two hosts within [`LINK_MEMORY`] is
    /// used instead. Then the settings are known at once and the destination starts listening
    /// in the same call; otherwise the link is probed while the destination starts, and the
    /// destination listens once the settings are chosen (the returned address is `None`).
    async fn stage_settings(
        &mut self,
        row: &MigrationRow,
        prep: &mut Timeline,
    ) -> Result<(MigrationSettings, Option<MigrationUri>), Abort> {
        let remembered = if self.req.probe_link {
            None
        } else {
            self.app
                .slots
                .pair_link(self.source.id, self.dest.id, LINK_MEMORY)
        };
        self.phase(
            Stage::Measure,
            match remembered {
                Some(_) => format!("starting the destination on {}", self.dest.name),
                None => format!(
                    "measuring the link; starting the destination on {}",
                    self.dest.name
                ),
            },
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
            return Err(Abort::Failed(format!(
                "VM {} is {} on {}, not running",
                self.name(),
                rt.state,
                self.source.name
            )));
        }
        let (encrypted, why) = self.encryption().await?;
        let mut prepare = PrepareIncoming {
            spec: rt.spec.clone(),
            generation: row.generation_to,
            settings: None,
            key: None,
        };
        self.incoming_attempted = true;
        let (mut settings, m, uri) = match remembered {
            Some((link_mbit, age)) => {
                let m = Measurements {
                    memory_mib: self.vm.spec.memory_mib,
                    dirty_rate_mib_s: None,
                    link_mbit,
                    link_age_s: Some(age.as_secs()),
                };
                self.event(
                    EventLevel::Info,
                    format!(
                        "link {} ↔ {}: {link_mbit:.0} Mbit/s, measured {} s ago (not probed \
                         again: a figure younger than {} s stands; the stream re-judges its \
                         pace); the guest's dirty rate is judged from QEMU's first pass",
                        self.source.name,
                        self.dest.name,
                        age.as_secs(),
                        LINK_MEMORY.as_secs()
                    ),
                )
                .await;
                let mut settings = self.choose(&m, encrypted);
                settings.encrypted = encrypted;
                self.relay(&mut settings);
                self.key = encrypted.then(|| MigrationKey::from_bytes(rand::random()));
                prepare.settings = Some(settings.clone());
                prepare.key = self.key.clone();
                let t = Instant::now();
                let ready = dst
                    .migration_incoming(self.vm.id, &prepare)
                    .await
                    .map_err(|e| format!("starting the destination: {e}"))?;
                prep.step("(destination start and listen)", t.elapsed());
                let answered = ready.uri.ok_or_else(|| {
                    format!(
                        "the destination {} did not say where it listens",
                        self.dest.name
                    )
                })?;
                (settings, m, Some(migration_target(&self.dest, answered)?))
            }
            None => {
                let start_destination = async {
                    let t = Instant::now();
                    (
                        dst.migration_incoming(self.vm.id, &prepare).await,
                        t.elapsed(),
                    )
                };
                let probe = async {
                    let t = Instant::now();
                    (self.probe_link().await, t.elapsed())
                };
                let ((m, probe_time), (started, start_time)) =
                    tokio::join!(probe, start_destination);
                prep.step("(link probe", probe_time);
                prep.step("destination start)", start_time);
                started.map_err(|e| format!("starting the destination: {e}"))?;
                let mut settings = self.choose(&m, encrypted);
                settings.encrypted = encrypted;
                self.relay(&mut settings);
                self.key = encrypted.then(|| MigrationKey::from_bytes(rand::random()));
                (settings, m, None)
            }
        };
        settings.reasons.push(why);
        for r in &settings.reasons {
            self.event(EventLevel::Info, format!("setting: {r}")).await;
        }
        self.settings = Some(settings.clone());
        self.measurements = Some(m.clone());
        if m.link_age_s.is_none() {
            self.app
                .slots
                .measured(self.source.id, self.dest.id, m.link_mbit);
        }
        self.record_settings(&settings, &m).await?;
        Ok((settings, uri))
    }

    /// Whether this migration is encrypted: the cluster's policy now (it may have changed since
    /// the pre-checks) against the two hosts' QEMUs.
    async fn encryption(&self) -> Result<(bool, String), Abort> {
        let cluster = self.vm.cluster.clone();
        let policy = self
            .app
            .db
            .read(move |tx| tx.cluster(&cluster))
            .await
            .map_err(|e| format!("center store: {e}"))?
            .map(|c| c.migration_encryption)
            .unwrap_or_default();
        Ok(crate::evc::encryption_check(
            policy,
            Some(&self.source),
            &self.dest,
        )?)
    }

    /// The destination, configured like the source, listens for this VM only; returns where.
    async fn stage_prepare(&self, settings: &MigrationSettings) -> Result<MigrationUri, Abort> {
        self.phase(Stage::Prepare, format!("preparing {}", self.dest.name))
            .await?;
        let dst = self.app.agent(&self.dest);
        let listen = ListenIncoming {
            settings: settings.clone(),
            key: self.key.clone(),
        };
        // An agent restarting refuses connections for a moment; its incoming QEMU waits, and
        // the restarted agent re-attaches to it. Any answer it gives is final.
        let ready = UNREACHABLE_RETRY
            .run(|_| async {
                match dst.migration_listen(self.vm.id, &listen).await {
                    Err(e @ AgentError::Unreachable { .. }) => Err(e),
                    answer => Ok(answer),
                }
            })
            .await
            .and_then(|answer| answer)
            .map_err(|e| format!("preparing the destination: {e}"))?;
        let answered = ready.uri.ok_or_else(|| {
            format!(
                "the destination {} did not say where it listens",
                self.dest.name
            )
        })?;
        let uri = migration_target(&self.dest, answered)?;
        self.event(
            EventLevel::Info,
            format!(
                "destination {} ready: paused QEMU listening on {uri} for this VM only",
                self.dest.name
            ),
        )
        .await;
        Ok(uri)
    }

    /// Pre-copy, followed until the source pauses the guest at pre-switchover.
    async fn stage_precopy(
        &mut self,
        uri: MigrationUri,
        settings: &MigrationSettings,
        mut prep: Timeline,
    ) -> Result<AgentMigrationStatus, Abort> {
        self.phase(
            Stage::Precopy {
                sent: 0,
                remaining: 0,
            },
            "starting pre-copy".into(),
        )
        .await?;
        self.outgoing_attempted = true;
        let src = self.app.agent(&self.source);
        let t = Instant::now();
        src.migration_outgoing(
            self.vm.id,
            &StartOutgoing {
                uri,
                settings: settings.clone(),
                key: self.key.clone(),
                // Not asked: a source that sends its final state unasked saves the guest a
                // round trip (~6 ms of median pause on the lab), but a center that hangs just
                // after its last status call then leaves the guest paused on both hosts until
                // it comes back, since once everything is sent only a commit or rollback may
                // end the pause. Waiting for this center's word keeps the watchdog's bound:
                // a silent center costs the guest at most its pause limit. (Seen in CI: the
                // lab test that freezes the center in pre-copy.)
                switch_over_at_pause: false,
            },
        )
        .await
        .map_err(|e| format!("starting the migration on {}: {e}", self.source.name))?;
        prep.step("start", t.elapsed());
        self.event(
            EventLevel::Info,
            format!("preparation timeline (request to pre-copy): {prep}"),
        )
        .await;
        self.watch_precopy(&src, settings).await
    }

    /// The switchover. The guest is paused at the source from here until the destination
    /// runs it (or the source resumes): every step is timed, nothing waits for anything it
    /// does not need, and events are held until the guest runs.
    async fn stage_switchover(
        &mut self,
        at_switch: AgentMigrationStatus,
    ) -> Result<Switched, Abort> {
        self.pause_started = Some(Instant::now());
        let mut timeline = Timeline::default();
        let final_mib = at_switch
            .progress
            .as_ref()
            .map(|p| p.remaining_bytes as f64 / MIB)
            .unwrap_or(0.0);
        let src = self.app.agent(&self.source);
        let dst = self.app.agent(&self.dest);
        // The destination steers the LAN to its taps (frames sent during the switchover then
        // wait there instead of dying at the paused source) while the record says the state
        // may now leave the source and the source sends it.
        self.steered = true;
        let steer_answered = tokio::sync::Notify::new();
        let steer = async {
            let t = Instant::now();
            let r = dst.migration_steer(self.vm.id).await;
            steer_answered.notify_one();
            (r, t.elapsed())
        };
        // Neither the record nor the destination's answer holds the final copy up. A record
        // that says Preparing is settled the same way as one that says Switching
        // (`tern_motion::settle`), and the commit, not this write, guards the hand-over: it
        // moves the record from either, and fails on one that someone else ended. The
        // destination is asked while the state is on its way, so its answer comes the moment
        // it has loaded it.
        let record = async {
            let t = Instant::now();
            self.set_record(&[Rec::Preparing], Rec::Switching).await?;
            self.phase(
                Stage::Switchover,
                format!("switchover: final {final_mib:.1} MiB"),
            )
            .await?;
            Ok::<_, Abort>(t.elapsed())
        };
        let ((steered, steer_time), sent) = tokio::join!(
            steer,
            self.send_final_state(&src, &dst, &steer_answered, record)
        );
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
        let FinalState {
            sent,
            done,
            loaded,
            recorded,
        } = sent?;
        match recorded {
            Some(Ok(took)) => timeline.step("record (in parallel)", took),
            // A cancel that came with the pause is honoured, unless the guest went post-copy
            // (its only way is forward).
            Some(Err(Abort::Cancelled)) if !went_postcopy(&done) => return Err(Abort::Cancelled),
            Some(Err(Abort::Cancelled)) => {}
            Some(Err(Abort::Failed(e))) => self.hold(
                EventLevel::Warning,
                format!(
                    "the record could not say the state is being sent ({e}); the commit decides"
                ),
            ),
            None => {}
        }
        timeline.step("final copy", sent);
        self.stopped_at = done.stopped_at;
        let mut seen = self.events_seen;
        self.hold_agent_events(&done, &mut seen);
        self.events_seen = seen;
        if done.state != AgentMigrationState::Completed {
            return Err(Abort::Failed(format!(
                "switchover ended {:?}: {}",
                done.state,
                done.error.clone().unwrap_or_default()
            )));
        }
        if went_postcopy(&done) {
            self.timeline = timeline;
            return Ok(Switched::PostCopy(done));
        }
        let t = Instant::now();
        let received = match loaded {
            Some(r) => Ok(r),
            // Not in by then (an answer lost, or a final copy longer than the wait): ask again.
            None => {
                dst.migration_status(
                    self.vm.id,
                    Some(AgentMigrationState::Listening),
                    RECEIVE_WAIT,
                )
                .await
            }
        }
        .map_err(|e| format!("destination after switchover: {e}"))?;
        timeline.step("destination loaded", t.elapsed());
        self.timeline = timeline;
        if received.state != AgentMigrationState::Completed {
            return Err(Abort::Failed(format!(
                "destination {} is {:?} after switchover, not holding the paused guest: {}",
                self.dest.name,
                received.state,
                received.error.unwrap_or_default()
            )));
        }
        Ok(Switched::Whole(done))
    }

    /// The source sends its final state while, in the same breath, the destination is asked
    /// whether it holds it and `record` is written. The destination's question is put once
    /// the steer (`steered`) has answered, down the connection the steer used: a second TLS
    /// handshake would take the CPU the final copy needs. Neither is waited for where it
    /// cannot matter: not after a failed switchover, not after a post-copy one (the guest
    /// waits for the destination to run it, not for the store).
    async fn send_final_state(
        &self,
        src: &Agent,
        dst: &Agent,
        steered: &tokio::sync::Notify,
        record: impl std::future::Future<Output = Result<Duration, Abort>>,
    ) -> Result<FinalState, Abort> {
        let t = Instant::now();
        let switchover = src.migration_switchover(self.vm.id);
        let loaded = async {
            steered.notified().await;
            dst.migration_status(
                self.vm.id,
                Some(AgentMigrationState::Listening),
                RECEIVE_WAIT,
            )
            .await
        };
        tokio::pin!(switchover, loaded, record);
        let (mut early, mut recorded) = (None, None);
        let done = loop {
            tokio::select! {
                done = &mut switchover => break done,
                l = &mut loaded, if early.is_none() => early = Some(l),
                r = &mut record, if recorded.is_none() => recorded = Some(r),
            }
        };
        let done = done.map_err(|e| format!("switchover: {e}"))?;
        let sent = t.elapsed();
        if done.state != AgentMigrationState::Completed || went_postcopy(&done) {
            return Ok(FinalState {
                sent,
                done,
                loaded: None,
                recorded,
            });
        }
        let answer = match early {
            Some(answer) => answer,
            None => loaded.await,
        };
        let recorded = match recorded {
            Some(r) => r,
            None => record.await,
        };
        Ok(FinalState {
            sent,
            done,
            loaded: answer
                .ok()
                .filter(|s| s.state != AgentMigrationState::Listening),
            recorded: Some(recorded),
        })
    }

    /// After a post-copy switchover the source's memory is no longer whole: the only way is
    /// forward, whatever happens now (the price of allowing post-copy). So the destination runs
    /// the guest at once — no second copy can ever run, and the guest is not held paused while
    /// the store is in trouble — and the commit follows. A failed commit must never fall into
    /// the rollback (it would remove the destination, which holds the guest, while the source
    /// cannot resume: the VM would be lost); it is retried until the store takes it (its
    /// trouble is the only obstacle), said once, and every few attempts.
    async fn stage_commit_after_postcopy(&mut self) {
        let generation_to = self.row.as_ref().map_or(0, |r| r.generation_to);
        let t = Instant::now();
        match self
            .app
            .agent(&self.dest)
            .migration_commit(
                self.vm.id,
                &Commit {
                    generation: generation_to,
                    frames: Vec::new(),
                },
            )
            .await
        {
            Ok(c) => {
                self.resumed_at = c.resumed_at;
                self.timeline.step(
                    "destination runs (post-copy, before the commit)",
                    t.elapsed(),
                );
                self.paused_for = self.pause_started.map(|p| p.elapsed());
            }
            Err(e) => self.hold(
                EventLevel::Warning,
                format!(
                    "destination {} did not run the guest yet ({e}); asked again after the \
                     commit",
                    self.dest.name
                ),
            ),
        }
        // Its only obstacle is the store's trouble; giving up would lose the VM.
        let last = std::sync::Mutex::new((0u32, String::new()));
        let this = &*self;
        let _ = Retry::forever(RETRY)
            .run(|failures| {
                let last = &last;
                async move {
                    let Err(e) = this.commit(true).await else {
                        return Ok(());
                    };
                    let failed = failures + 1;
                    *lock(last) = (failed, e.to_string());
                    if failed == 1 || failed % DRIVER_ATTEMPTS == 0 {
                        tracing::error!(task = %this.task, failed, "post-copy migration cannot be committed yet: {e}");
                        let phase = format!(
                            "post-copy switchover done; committing to {} (attempt {failed} \
                             failed: {e})",
                            this.dest.name
                        );
                        let _ = this.ctl.progress(Stage::Commit.progress(), phase).await;
                    }
                    Err(e)
                }
            })
            .await;
        let (failed, last) = lock(&last).clone();
        self.flush_held().await;
        self.event(
            EventLevel::Warning,
            format!(
                "post-copy switchover done: the source could no longer take the VM back; \
                 committed to {}",
                self.dest.name
            ),
        )
        .await;
        if failed > 0 {
            self.event(
                EventLevel::Warning,
                format!(
                    "committed after {failed} failed attempt(s) (the last: {last}); the \
                     destination kept the guest meanwhile"
                ),
            )
            .await;
        }
    }

    /// Times the link from the source to the destination's migration address (about a
    /// quarter second). A failed probe is no failure: the settings then assume a link speed.
    async fn probe_link(&self) -> Measurements {
        let src = self.app.agent(&self.source);
        let dst = self.app.agent(&self.dest);
        let link = async {
            let sink = dst.bandwidth_sink().await?;
            src.bandwidth_probe(&BandwidthProbe {
                to_migration_address: sink.address.clone(),
                bytes: PROBE_BYTES,
            })
            .await
            .map(|r| (sink.address, r))
        };
        let link_mbit = match link.await {
            Ok((addr, r)) => {
                self.event(
                    EventLevel::Info,
                    format!(
                        "measured: link {} → {addr}: {:.0} Mbit/s ({:.1} MiB in {} ms); the \
                         guest's dirty rate is judged from QEMU's first pass",
                        self.source.name,
                        r.mbit_s,
                        r.bytes as f64 / MIB,
                        r.elapsed_ms,
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
        Measurements {
            memory_mib: self.vm.spec.memory_mib,
            dirty_rate_mib_s: None,
            link_mbit,
            link_age_s: None,
        }
    }

    /// Both hosts' agents carry encrypted streams with their relays.
    fn both_relay(&self) -> bool {
        self.source.facts.migration_relay && self.dest.facts.migration_relay
    }

    /// Sets how `settings` (encrypted or not) are carried: by the hosts' relays when both
    /// have them, held to the source's migration address when both can be.
    fn relay(&self, settings: &mut MigrationSettings) {
        settings.relayed = settings.encrypted && self.both_relay();
        let checked =
            self.source.facts.relay_source_checked && self.dest.facts.relay_source_checked;
        settings.relay_source = (settings.relayed && checked)
            .then(|| self.source.facts.migration_address.parse().ok())
            .flatten();
    }

    /// The settings for what is known (`m`) and what the two hosts can spare.
    fn choose(&self, m: &Measurements, encrypted: bool) -> MigrationSettings {
        let budget = HostBudget {
            spare_cores: spare_cores(&self.source).min(spare_cores(&self.dest)),
            qemu: QemuVersion::parse(&self.source.facts.qemu_version)
                .min(QemuVersion::parse(&self.dest.facts.qemu_version))
                .unwrap_or(QemuVersion {
                    major: 0,
                    minor: 0,
                    micro: 0,
                }),
            encrypted,
            relayed: encrypted && self.both_relay(),
        };
        choose_settings(&self.req, m, &budget)
    }

    pub(super) async fn record_intent(&self) -> Result<MigrationRow, String> {
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
    pub(super) async fn record_settings(
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

    pub(super) async fn set_record(&self, from: &[Rec], to: Rec) -> Result<(), String> {
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
    pub(super) async fn record_agent_events(&self, s: &AgentMigrationStatus, seen: &mut usize) {
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
    pub(super) async fn watch_precopy(
        &mut self,
        src: &Agent,
        settings: &MigrationSettings,
    ) -> Result<AgentMigrationStatus, Abort> {
        let mut seen = self.events_seen;
        let mut unreachable_since: Option<Instant> = None;
        let backstop = Duration::from_millis(settings.deadline_ms) + DEADLINE_MARGIN;
        loop {
            self.check_cancel()?;
            if self.started.elapsed() > backstop {
                return Err(Abort::Failed(format!(
                    "the {} s deadline passed and the source did not end the migration",
                    settings.deadline_ms / 1000
                )));
            }
            let status =
                src.migration_status(self.vm.id, Some(AgentMigrationState::Active), STATUS_WAIT);
            let Some(answer) = self.ctl.until_cancelled(status).await else {
                continue;
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
                        return Err(Abort::Failed(format!("lost the source's migration: {e}")));
                    }
                    tokio::time::sleep(STATUS_WAIT).await;
                    continue;
                }
            };
            // A source that sends its final state at the pause may have sent it all by the
            // time its answer comes.
            if matches!(
                s.state,
                AgentMigrationState::PreSwitchover | AgentMigrationState::Completed
            ) {
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
                        self.record_sample(p).await;
                        let left = p.remaining_bytes as f64;
                        self.phase(
                            Stage::Precopy {
                                sent: p.transferred_bytes,
                                remaining: p.remaining_bytes,
                            },
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
                    return Err(Abort::Failed(format!(
                        "the source's migration ended {other:?}: {}",
                        s.error.unwrap_or_default()
                    )))
                }
            }
        }
    }

    /// The commit point: one transaction that re-checks the task was not cancelled and moves
    /// the VM's ownership to the destination.
    /// `forced` (after a post-copy switchover) commits even if the task was cancelled meanwhile.
    pub(super) async fn commit(&self, forced: bool) -> Result<(), Abort> {
        let (task, vm, dest) = (self.task, self.name().to_string(), self.dest.name.clone());
        let source = self.source.name.clone();
        self.app
            .db
            .write(move |tx| -> Result<Result<(), Abort>, StoreError> {
                let running = tx
                    .task(task)?
                    .is_some_and(|t| t.task.state == TaskState::Running);
                if !running && !forced {
                    return Ok(Err(Abort::Cancelled));
                }
                if let Err(e) = tx.commit_migration(task, Utc::now()) {
                    return Ok(Err(Abort::Failed(format!("commit refused: {e}"))));
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
}

/// Where the source sends: the destination's registered migration address, with the port its
/// agent listens on. An agent's answer naming any other address is refused, so a rogue or
/// confused destination cannot point the source (and the guest's memory) elsewhere.
pub(super) fn migration_target(
    dest: &HostRecord,
    answered: MigrationUri,
) -> Result<MigrationUri, String> {
    let registered: std::net::IpAddr = dest.facts.migration_address.parse().map_err(|_| {
        format!(
            "host {} has no valid registered migration address ({:?})",
            dest.name, dest.facts.migration_address
        )
    })?;
    if answered.addr().ip() != registered {
        return Err(format!(
            "the destination {} answered that it listens on {answered}, not on its registered \
             migration address {registered}: refused",
            dest.name
        ));
    }
    MigrationUri::new(std::net::SocketAddr::new(
        registered,
        answered.addr().port(),
    ))
}

/// What [`Mig::send_final_state`] found.
struct FinalState {
    /// How long the source took to send it.
    sent: Duration,
    /// The source's answer.
    done: AgentMigrationStatus,
    /// The destination's answer, once it left `Listening` (`None`: ask again if needed).
    loaded: Option<AgentMigrationStatus>,
    /// The record's write, where it was waited for.
    recorded: Option<Result<Duration, Abort>>,
}

/// Did the source's switchover end in post-copy (the destination runs the guest already)?
fn went_postcopy(done: &AgentMigrationStatus) -> bool {
    done.postcopy
        || done
            .progress
            .as_ref()
            .is_some_and(|p| p.phase == MigrationPhase::PostCopy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_sends_only_to_the_destinations_registered_address() {
        let mut dest = HostRecord::fake("h2", 4096, false);
        dest.facts.migration_address = "10.77.0.12".into();
        let ok: MigrationUri = "tcp:10.77.0.12:49152".parse().unwrap();
        assert_eq!(migration_target(&dest, ok), Ok(ok));
        for elsewhere in [
            "tcp:10.77.0.13:49152",
            "tcp:127.0.0.1:22",
            "tcp:[fd00::12]:49152",
        ] {
            let e = migration_target(&dest, elsewhere.parse().unwrap()).unwrap_err();
            assert!(e.contains("refused"), "{e}");
        }
        dest.facts.migration_address = "not an address".into();
        assert!(migration_target(&dest, ok).is_err());
    }
}
