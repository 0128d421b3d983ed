//! A restarted center driving on the migrations its predecessor left in pre-copy.
//!
//! vCenter restarting does not stop a vMotion the hosts are carrying out, and neither does
//! tern's center: the source's agent goes on copying without it. What the center needs to
//! drive a migration on from pre-copy is in its store (the ownership record in `preparing`,
//! the settings and measurements it chose) and in the source's word (the migration is still
//! copying). With both, the same stages as before run from [`Mig::watch_precopy`] on; without
//! either, the migration ends by the ownership rule ([`super::settle::recover`]).

use super::*;

/// A migration the restarted center can drive on.
pub(super) struct Resumable {
    row: MigrationRow,
    vm: VmRecord,
    source: HostRecord,
    dest: HostRecord,
    settings: MigrationSettings,
    measurements: Measurements,
    /// How long the source has been migrating, as it says.
    elapsed: Duration,
    /// Source events the previous center may have recorded already.
    events_seen: usize,
}

/// Whether the migration of `row` can be driven on: uncommitted and not yet switching, its
/// settings recorded, its VM still the source's under the record's generation, its task
/// still running, and the source's agent reporting it copying in pre-copy. Anything else —
/// including an agent that does not answer now — is left to the ownership rule.
pub(super) async fn resumable(app: &Arc<App>, row: &MigrationRow) -> Option<Resumable> {
    if row.state != Rec::Preparing {
        return None;
    }
    let detail = row.detail.as_ref()?;
    let settings: MigrationSettings = serde_json::from_value(detail["settings"].clone()).ok()?;
    let measurements = recorded_measurements(&detail["measurements"])?;
    let (task, vm, s, d) = (row.task_id, row.vm_id, row.source_host_id, row.dest_host_id);
    let found = app
        .db
        .read(move |tx| {
            Ok::<_, StoreError>((
                tx.task(task)?,
                tx.vm_by_id(vm)?,
                tx.host_by_id(s)?,
                tx.host_by_id(d)?,
            ))
        })
        .await;
    let Ok((Some(task), Some(vm), Some(source), Some(dest))) = found else {
        return None;
    };
    if task.task.state != TaskState::Running
        || vm.host_id != Some(source.id)
        || vm.generation != row.generation_from
    {
        return None;
    }
    let status = match app
        .agent(&source)
        .migration_status(row.vm_id, None, Duration::ZERO)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(task = %row.task_id, error = %e, "cannot ask the source about the migration: it ends by the ownership rule");
            return None;
        }
    };
    if status.state != AgentMigrationState::Active {
        return None;
    }
    let elapsed = Duration::from_millis(status.progress.as_ref().map_or(0, |p| p.elapsed_ms));
    Some(Resumable {
        row: row.clone(),
        vm,
        source,
        dest,
        settings,
        measurements,
        elapsed,
        events_seen: status.events.len(),
    })
}

/// The measurements as recorded (a link that could not be measured is NaN in memory and
/// `null` in JSON, read back as NaN: see [`Measurements`]).
fn recorded_measurements(v: &serde_json::Value) -> Option<Measurements> {
    serde_json::from_value(v.clone()).ok()
}

impl Resumable {
    pub(super) fn task(&self) -> Uuid {
        self.row.task_id
    }

    /// Drives the migration on in its own task, under its task id.
    pub(super) fn drive(self, app: &Arc<App>) {
        let app2 = app.clone();
        let task = self.row.task_id;
        tracing::info!(%task, vm = %self.row.vm_name, "driving on a migration the previous center left in pre-copy");
        tasks::spawn(app, task, move |ctl| async move {
            let now = Instant::now();
            let req = MigrateVm {
                to: self.dest.name.clone(),
                downtime_ms: Some(self.settings.downtime_budget_ms),
                deadline_ms: Some(self.settings.deadline_ms),
                bandwidth_mbit: None,
                allow_postcopy: self.settings.postcopy_allowed,
                dry_run: false,
                probe_link: false,
            };
            let m = Mig {
                app: app2,
                task: ctl.id(),
                req,
                vm: self.vm,
                source: self.source,
                dest: self.dest,
                ctl,
                started: now.checked_sub(self.elapsed).unwrap_or(now),
                row: Some(self.row),
                settings: Some(self.settings.clone()),
                // The stream already flows: QEMU holds its credentials.
                key: None,
                measurements: Some(self.measurements),
                // Both ends exist: a rollback must undo both.
                incoming_attempted: true,
                outgoing_attempted: true,
                pause_started: None,
                paused_for: None,
                events_seen: self.events_seen,
                held: std::sync::Mutex::new(Vec::new()),
                held_sample: std::sync::Mutex::new(None),
                timeline: Timeline::default(),
                handed: Vec::new(),
                steered: false,
                stopped_at: None,
                resumed_at: None,
                ticket: std::sync::Mutex::new(None),
            };
            m.drive(Some(self.settings)).await;
            None
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measurements_that_failed_are_read_back_as_unknown() {
        let m = Measurements {
            memory_mib: 256,
            dirty_rate_mib_s: Some(3.5),
            link_mbit: f64::NAN,
            link_age_s: None,
        };
        let v = serde_json::to_value(&m).expect("serialize");
        assert!(v["link_mbit"].is_null(), "{v}");
        let back = recorded_measurements(&v).expect("read back");
        assert_eq!(back.memory_mib, 256);
        assert_eq!(back.dirty_rate_mib_s, Some(3.5));
        assert!(back.link_mbit.is_nan());
        assert!(recorded_measurements(&serde_json::json!({})).is_none());
        // A record from before the dirty rate became optional, and one without it.
        let old =
            serde_json::json!({"memory_mib": 64, "dirty_rate_mib_s": 1.0, "link_mbit": 900.0});
        assert_eq!(
            recorded_measurements(&old).and_then(|m| m.dirty_rate_mib_s),
            Some(1.0)
        );
        let new = serde_json::json!({"memory_mib": 64, "link_mbit": 900.0, "link_age_s": 12});
        let new = recorded_measurements(&new).expect("read back");
        assert_eq!((new.dirty_rate_mib_s, new.link_age_s), (None, Some(12)));
    }
}
