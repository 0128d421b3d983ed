//! The task runner: every long operation (VM start and stop, migration, maintenance entry,
//! DRS apply) is recorded queued first, then run here in the background with progress, a
//! cancel signal and one way of recording its end; cancel, and recovery after a center
//! restart. What each kind of task does lives with its domain ([`crate::power`],
//! [`crate::migrate`], [`crate::maintenance`], [`crate::drs`]).

use std::future::Future;
use std::sync::Arc;

use chrono::Utc;
use tern_api::center::{EventLevel, Task, TaskKind, TaskState};
use tern_api::PowerState;
use tokio::sync::watch;
use uuid::Uuid;

use crate::app::App;
use crate::error::CenterError;
use crate::store::{NewEvent, StoreError, TaskRecord, Tx};

/// Error a task left going by a crashed or stopped center ends with.
pub const RESTART_ERROR: &str = "center restarted during the task";

pub(crate) fn kind_text(kind: TaskKind) -> &'static str {
    match kind {
        TaskKind::VmStart => "start",
        TaskKind::VmStop => "stop",
        TaskKind::VmMigrate => "migration",
        TaskKind::HostMaintenanceEnter => "maintenance entry",
        TaskKind::HostMaintenanceExit => "maintenance exit",
        TaskKind::DrsApply => "DRS apply",
        TaskKind::HostEvacuate => "host evacuation",
    }
}

/// An event about a task, tagged with the task, its VM and its host.
pub(crate) fn task_event(t: &Task, ev: NewEvent) -> NewEvent {
    let ev = ev.task(t.id).host(t.host.as_deref());
    match &t.vm {
        Some(vm) => ev.vm(vm),
        None => ev,
    }
}

/// The kind's own store changes at a task's end, made in the same transaction. Told whether
/// this end was recorded as the task's state (`false`: a cancel was recorded first).
type EndChanges = Box<dyn FnOnce(&Tx, &TaskRecord, bool) -> Result<(), StoreError> + Send>;

/// How a task's work ended, for [`finish`] to record.
pub struct TaskEnd {
    state: TaskState,
    phase: String,
    result: Option<serde_json::Value>,
    error: Option<String>,
    level: EventLevel,
    summary: String,
    /// Record the event even when a cancel ended the task first (what happened still matters).
    tell_after_cancel: bool,
    changes: Option<EndChanges>,
}

impl TaskEnd {
    /// The work was done; `summary` is the event's text.
    pub fn succeeded(phase: impl Into<String>, summary: impl Into<String>) -> TaskEnd {
        TaskEnd {
            state: TaskState::Succeeded,
            phase: phase.into(),
            result: None,
            error: None,
            level: EventLevel::Info,
            summary: summary.into(),
            tell_after_cancel: false,
            changes: None,
        }
    }

    /// The work failed with `error` (what to fix); `summary` is the event's text.
    pub fn failed(error: impl Into<String>, summary: impl Into<String>) -> TaskEnd {
        TaskEnd {
            state: TaskState::Failed,
            phase: "failed".into(),
            result: None,
            error: Some(error.into()),
            level: EventLevel::Error,
            summary: summary.into(),
            tell_after_cancel: false,
            changes: None,
        }
    }

    /// Ends in `state` instead (a rollback the user asked for ends cancelled, not failed).
    pub fn state(mut self, state: TaskState) -> TaskEnd {
        self.state = state;
        self
    }

    pub fn phase(mut self, phase: impl Into<String>) -> TaskEnd {
        self.phase = phase.into();
        self
    }

    /// The task's result document (recorded even when a cancel ended the task first).
    pub fn result(mut self, result: Option<serde_json::Value>) -> TaskEnd {
        self.result = result;
        self
    }

    pub fn level(mut self, level: EventLevel) -> TaskEnd {
        self.level = level;
        self
    }

    pub fn tell_after_cancel(mut self) -> TaskEnd {
        self.tell_after_cancel = true;
        self
    }

    /// The kind's own store changes, in the transaction that records the end.
    pub fn changes(
        mut self,
        f: impl FnOnce(&Tx, &TaskRecord, bool) -> Result<(), StoreError> + Send + 'static,
    ) -> TaskEnd {
        self.changes = Some(Box::new(f));
        self
    }
}

/// What a task's work is handed: its id, its progress, its cancel signal.
pub struct TaskCtl {
    app: Arc<App>,
    id: Uuid,
    cancelled: watch::Receiver<bool>,
}

impl TaskCtl {
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// Records progress; `Ok(false)` when the task has ended meanwhile (cancelled).
    pub async fn progress(&self, progress: u8, phase: String) -> Result<bool, String> {
        record_progress(&self.app, self.id, progress, phase).await
    }

    /// Whether a user has cancelled the task (work that cannot stop at any point polls this).
    pub fn is_cancelled(&self) -> bool {
        *self.cancelled.borrow()
    }

    /// Runs `work` until it ends or the task is cancelled (`None`), whichever comes first.
    pub async fn until_cancelled<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        let mut rx = self.cancelled.clone();
        tokio::select! {
            out = work => Some(out),
            _ = rx.wait_for(|c| *c) => None,
        }
    }
}

/// Runs a recorded task's work in the background. The cancel signal is registered before this
/// returns, so a cancel arriving at once is not lost; the end the work returns is recorded by
/// [`finish`] (`None`: the work recorded its end itself, or a cancel ended it).
pub fn spawn<W, Fut>(app: &Arc<App>, id: Uuid, work: W)
where
    W: FnOnce(TaskCtl) -> Fut + Send + 'static,
    Fut: Future<Output = Option<TaskEnd>> + Send + 'static,
{
    let signal = app.cancel_signal(id);
    let (tell, cancelled) = watch::channel(false);
    let ctl = TaskCtl {
        app: app.clone(),
        id,
        cancelled,
    };
    let app2 = app.clone();
    app.spawn(async move {
        let relay = async move {
            signal.notified().await;
            let _ = tell.send(true);
            // Stays pending: the work decides when it is done.
            std::future::pending::<std::convert::Infallible>().await
        };
        let end = tokio::select! {
            end = work(ctl) => end,
            never = relay => match never {},
        };
        app2.forget_cancel_signal(id);
        if let Some(end) = end {
            finish(&app2, id, end).await;
        }
    });
}

/// Records a task's end in one transaction: its final state (unless a cancel was recorded
/// first: then only its result), the event, and the kind's own changes.
pub async fn finish(app: &Arc<App>, id: Uuid, end: TaskEnd) {
    let app2 = app.clone();
    let w = app
        .db
        .write(move |tx| {
            let now = Utc::now();
            let Some(t) = tx.task(id)? else {
                return Ok(());
            };
            if let Some(vm) = t.vm_id {
                app2.settle(vm);
            }
            let ended = tx.finish_task(
                id,
                end.state,
                &end.phase,
                end.result.as_ref(),
                end.error.as_deref(),
                now,
            )?;
            if !ended {
                if let Some(r) = &end.result {
                    tx.set_task_result(id, r)?;
                }
            }
            if let Some(changes) = end.changes {
                changes(tx, &t, ended)?;
            }
            if ended || end.tell_after_cancel {
                tx.add_event(
                    task_event(&t.task, NewEvent::new(end.level, end.summary)),
                    now,
                )?;
            }
            Ok::<_, StoreError>(())
        })
        .await;
    if let Err(e) = w {
        tracing::error!(task = %id, "cannot record the task's end: {e}");
    }
}

/// Records a running task's progress; `Ok(false)` when the task has ended meanwhile (the user
/// cancelled it), which long tasks take as their signal to stop.
pub async fn record_progress(
    app: &App,
    task: Uuid,
    progress: u8,
    phase: String,
) -> Result<bool, String> {
    app.db
        .write(move |tx| tx.update_task_progress(task, TaskState::Running, progress, &phase))
        .await
        .map_err(|e| format!("center store: {e}"))
}

/// Cancels a queued or running task: records it, then wakes its driver.
pub async fn cancel(app: &Arc<App>, id: Uuid) -> Result<Task, CenterError> {
    let app2 = app.clone();
    let task = app
        .db
        .write(move |tx| {
            let now = Utc::now();
            let t = tx.task(id)?.ok_or_else(|| {
                CenterError::not_found(format!("task {id} does not exist: see tern task list"))
            })?;
            if t.task.state.is_done() {
                return Err(CenterError::conflict(format!(
                    "task {id} has already {}; there is nothing to cancel",
                    t.task.state
                )));
            }
            // A migration belongs to its destination once committed: there is no way back.
            if let Some(m) = tx.migration(id)? {
                if m.state.owner() == tern_motion::Side::Destination {
                    return Err(CenterError::conflict(format!(
                        "the migration of VM {} is committed (the destination owns it): it can \
                         no longer be cancelled; move it back with another migration",
                        m.vm_name
                    )));
                }
            }
            if let Some(vm) = t.vm_id {
                app2.settle(vm);
            }
            tx.finish_task(
                id,
                TaskState::Cancelled,
                "cancelled",
                None,
                Some("cancelled by user"),
                now,
            )?;
            let vm = t.vm_id.map(|v| tx.vm_by_id(v)).transpose()?.flatten();
            if let (Some(vm), Some(prev)) = (&vm, t.intent.previous_desired) {
                tx.set_vm_desired(vm.id, prev)?;
            }
            tx.add_event(
                task_event(
                    &t.task,
                    NewEvent::warning(format!(
                        "task {id}: {} of VM {} cancelled by user; the host may still finish \
                         it (the VM's state follows its heartbeats)",
                        kind_text(t.task.kind),
                        t.task.vm.as_deref().unwrap_or("-")
                    )),
                ),
                now,
            )?;
            tx.task(id)?
                .map(|t| t.task)
                .ok_or_else(|| CenterError::internal(format!("task {id} vanished")))
        })
        .await?;
    app.signal_cancel(id);
    Ok(task)
}

/// At center start: ends the tasks a previous center left going (but those `driven_on`: the
/// migrations [`crate::migrate::recover`] drives on), then (in the background)
/// re-reads their VMs' states from their agents.
pub async fn recover(app: &Arc<App>, driven_on: &[Uuid]) -> Result<usize, CenterError> {
    let driven_on = driven_on.to_vec();
    let left = app
        .db
        .write(move |tx| {
            let now = Utc::now();
            let mut left = Vec::new();
            for t in tx.active_tasks(None)? {
                if driven_on.contains(&t.task.id) {
                    continue;
                }
                tx.finish_task(
                    t.task.id,
                    TaskState::Failed,
                    "failed",
                    None,
                    Some(RESTART_ERROR),
                    now,
                )?;
                tx.add_event(
                    task_event(
                        &t.task,
                        NewEvent::error(format!(
                            "task {}: {} of VM {} failed: {RESTART_ERROR}",
                            t.task.id,
                            kind_text(t.task.kind),
                            t.task.vm.as_deref().unwrap_or("-")
                        )),
                    ),
                    now,
                )?;
                if let Some(vm) = t.vm_id {
                    left.push((vm, t.intent.previous_desired));
                }
            }
            Ok::<_, CenterError>(left)
        })
        .await?;
    let n = left.len();
    for (vm, prev) in left {
        let app2 = app.clone();
        app.spawn(async move {
            if let Err(e) = reread(&app2, vm, prev).await {
                tracing::warn!(vm = %vm, "could not re-read the VM's state after the restart: {e}");
            }
        });
    }
    Ok(n)
}

/// Asks a VM's agent what state it is in, and adopts it as the VM's actual (and desired) state.
async fn reread(
    app: &Arc<App>,
    vm_id: Uuid,
    previous: Option<PowerState>,
) -> Result<(), CenterError> {
    let found = app
        .db
        .read(move |tx| {
            let vm = tx.vm_by_id(vm_id)?;
            let host = vm
                .as_ref()
                .and_then(|v| v.host_id)
                .map(|h| tx.host_by_id(h))
                .transpose()?
                .flatten();
            Ok::<_, CenterError>(vm.zip(host))
        })
        .await?;
    let Some((vm, host)) = found else {
        return Ok(());
    };
    let (actual, note) = match app.agent(&host).vm(vm_id).await {
        Ok(Some(rt)) => (
            rt.state,
            format!("host {} reports it {}", host.name, rt.state),
        ),
        Ok(None) => (
            PowerState::Stopped,
            format!("host {} does not run it", host.name),
        ),
        Err(e) => (PowerState::Unknown, format!("{e}")),
    };
    app.db
        .write(move |tx| {
            // A task started since the restart owns the VM now.
            if !tx.active_tasks(Some(vm_id))?.is_empty() || tx.vm_by_id(vm_id)?.is_none() {
                return Ok(());
            }
            let desired = match actual {
                PowerState::Running | PowerState::Paused => PowerState::Running,
                PowerState::Stopped | PowerState::Crashed => PowerState::Stopped,
                PowerState::Unknown => previous.unwrap_or(vm.desired),
            };
            tx.set_vm_actual(vm_id, actual)?;
            tx.set_vm_desired(vm_id, desired)?;
            tx.add_event(
                NewEvent::new(
                    if actual == PowerState::Unknown {
                        tern_api::center::EventLevel::Warning
                    } else {
                        tern_api::center::EventLevel::Info
                    },
                    format!(
                        "VM {} after the center restart: {note}; actual state {actual}, desired \
                         {desired}",
                        vm.name()
                    ),
                )
                .vm(vm.name())
                .host(Some(&host.name)),
                Utc::now(),
            )?;
            Ok::<_, CenterError>(())
        })
        .await
}
