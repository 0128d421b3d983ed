//! Power tasks (VM start and stop): recorded first, driven against the host's agent in the
//! background, their outcome recorded last; cancel, and recovery after a center restart.

use std::sync::Arc;

use chrono::Utc;
use serde_json::json;
use tern_api::agent::{StartVm, VmRuntime};
use tern_api::center::{StopVm, Task, TaskKind, TaskState};
use tern_api::{HostState, PowerState};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::app::App;
use crate::error::ApiErr;
use crate::inventory::vm_not_found;
use crate::store::{HostRecord, NewEvent, StoreError, TaskIntent, TaskRecord, VmRecord};

/// Error a task left going by a crashed or stopped center ends with.
pub const RESTART_ERROR: &str = "center restarted during the task";

fn kind_text(kind: TaskKind) -> &'static str {
    match kind {
        TaskKind::VmStart => "start",
        TaskKind::VmStop => "stop",
        TaskKind::VmMigrate => "migration",
        TaskKind::HostMaintenanceEnter => "maintenance entry",
        TaskKind::HostMaintenanceExit => "maintenance exit",
        TaskKind::DrsApply => "DRS apply",
    }
}

fn task_event(t: &Task, ev: NewEvent) -> NewEvent {
    let ev = ev.task(t.id).host(t.host.as_deref());
    match &t.vm {
        Some(vm) => ev.vm(vm),
        None => ev,
    }
}

/// Queues a start of the VM and drives it in the background. A stopped VM whose host cannot
/// run it (maintenance, disconnected) is first placed elsewhere by the DRS engine.
pub async fn start_vm(app: &Arc<App>, name: String) -> Result<Task, ApiErr> {
    crate::drs::rehome_for_start(app, &name).await?;
    begin(app, name, TaskKind::VmStart, None).await
}

/// Queues a stop of the VM and drives it in the background.
pub async fn stop_vm(app: &Arc<App>, name: String, req: StopVm) -> Result<Task, ApiErr> {
    begin(app, name, TaskKind::VmStop, Some(req)).await
}

async fn begin(
    app: &Arc<App>,
    name: String,
    kind: TaskKind,
    stop: Option<StopVm>,
) -> Result<Task, ApiErr> {
    // Intent first: the task and the new desired state are recorded before anything acts.
    let rec = app
        .db
        .write(move |tx| {
            let now = Utc::now();
            let vm = tx.vm_by_name(&name)?.ok_or_else(|| vm_not_found(&name))?;
            let host = vm
                .host_id
                .map(|h| tx.host_by_id(h))
                .transpose()?
                .flatten()
                .ok_or_else(|| ApiErr::conflict(format!("VM {name} has no host to run on")))?;
            if let Some(t) = tx.active_tasks(Some(vm.id))?.first() {
                return Err(ApiErr::conflict(format!(
                    "task {} ({}) is still {} on VM {name}: wait for it, or cancel it with: \
                     tern task cancel {}",
                    t.task.id,
                    kind_text(t.task.kind),
                    t.task.state,
                    t.task.id
                )));
            }
            match (host.state(), kind) {
                (HostState::Disconnected, _) => {
                    return Err(ApiErr::conflict(format!(
                        "host {} of VM {name} is disconnected: wait for its agent to reconnect \
                         (tern host list)",
                        host.name
                    )))
                }
                (HostState::Maintenance, TaskKind::VmStart) => {
                    return Err(ApiErr::conflict(format!(
                        "host {} of VM {name} is in maintenance mode: VMs do not start there",
                        host.name
                    )))
                }
                _ => {}
            }
            let desired = match kind {
                TaskKind::VmStop => PowerState::Stopped,
                _ => PowerState::Running,
            };
            let task = Task::queued(kind, Some(name.clone()), Some(host.name.clone()), now);
            let rec = TaskRecord {
                task,
                vm_id: Some(vm.id),
                intent: TaskIntent {
                    previous_desired: Some(vm.desired),
                    stop,
                },
            };
            tx.insert_task(&rec)?;
            tx.set_vm_desired(vm.id, desired)?;
            tx.add_event(
                task_event(
                    &rec.task,
                    NewEvent::info(format!(
                        "task {}: {} VM {name} on host {} queued",
                        rec.task.id,
                        kind_text(kind),
                        host.name
                    )),
                ),
                now,
            )?;
            Ok(rec)
        })
        .await?;
    // Registered before the driver runs, so a cancel arriving at once is not lost.
    let cancel = app.cancel_signal(rec.task.id);
    app.spawn(drive(app.clone(), rec.task.id, cancel));
    Ok(rec.task)
}

/// How a task's work ended.
enum Outcome {
    /// The agent did it; the VM is now `actual`.
    Done {
        actual: PowerState,
        phase: String,
        result: serde_json::Value,
    },
    Failed(String),
    /// The task had already ended (cancelled) before it could run.
    Gone,
}

async fn drive(app: Arc<App>, id: Uuid, cancel: Arc<Notify>) {
    let outcome = tokio::select! {
        o = work(&app, id) => Some(o),
        // The cancel is recorded by the cancel call; the driver only stops waiting.
        _ = cancel.notified() => None,
    };
    app.forget_cancel_signal(id);
    match outcome {
        None => tracing::info!(task = %id, "task cancelled; stopped waiting for the agent"),
        Some(Outcome::Gone) => {}
        Some(o) => {
            if let Err(e) = record_outcome(&app, id, o).await {
                tracing::error!(task = %id, "could not record the task's outcome: {e}");
            }
        }
    }
}

/// What a driver needs: the task, its VM and the VM's host.
type Ctx = (TaskRecord, VmRecord, HostRecord);

async fn work(app: &Arc<App>, id: Uuid) -> Outcome {
    let ctx = app
        .db
        .write(
            move |tx| -> Result<Result<Option<Ctx>, String>, StoreError> {
                let Some(t) = tx.task(id)? else {
                    return Ok(Ok(None));
                };
                let vm = t.vm_id.map(|v| tx.vm_by_id(v)).transpose()?.flatten();
                let host = vm
                    .as_ref()
                    .and_then(|v| v.host_id)
                    .map(|h| tx.host_by_id(h))
                    .transpose()?
                    .flatten();
                let (Some(vm), Some(host)) = (vm, host) else {
                    return Ok(Err(format!(
                        "VM {} or its host no longer exists",
                        t.task.vm.as_deref().unwrap_or("-")
                    )));
                };
                let phase = match t.task.kind {
                    TaskKind::VmStop => format!("stopping on {}", host.name),
                    _ => format!("starting on {}", host.name),
                };
                if !tx.update_task_progress(id, TaskState::Running, 10, &phase)? {
                    return Ok(Ok(None));
                }
                tx.add_event(
                    task_event(
                        &t.task,
                        NewEvent::info(format!("task {id}: VM {} {phase}", vm.name())),
                    ),
                    Utc::now(),
                )?;
                Ok(Ok(Some((t, vm, host))))
            },
        )
        .await;
    let (t, vm, host) = match ctx {
        Ok(Ok(Some(c))) => c,
        Ok(Ok(None)) => return Outcome::Gone,
        Ok(Err(why)) => return Outcome::Failed(why),
        Err(e) => return Outcome::Failed(format!("center store: {e}")),
    };
    let agent = app.agent(&host);
    match t.task.kind {
        TaskKind::VmStart => {
            // EVC: the CPU is resolved under the cluster's mode now, recorded, and given to
            // QEMU as an exact `-cpu` argument with `enforce`.
            let cpu = match crate::evc::prepare_start(app, &vm, &host).await {
                Ok(cpu) => cpu,
                Err(e) => return Outcome::Failed(format!("VM {}: {e}", vm.name())),
            };
            let req = StartVm {
                spec: crate::evc::launch_spec(&vm.spec, &cpu),
                generation: vm.generation,
            };
            match agent.start(vm.id, &req).await {
                Ok(rt) if rt.state == PowerState::Running => Outcome::Done {
                    actual: rt.state,
                    phase: format!("running on {}", host.name),
                    result: runtime_summary(&rt),
                },
                Ok(rt) => Outcome::Failed(format!(
                    "host {} started the VM but it is {}{}",
                    host.name,
                    rt.state,
                    rt.exit_reason.map(|r| format!(": {r}")).unwrap_or_default()
                )),
                Err(e) => Outcome::Failed(e.to_string()),
            }
        }
        TaskKind::VmStop => {
            let req = t.intent.stop.clone().unwrap_or_default();
            match agent.stop(vm.id, &req).await {
                Ok(rt) if matches!(rt.state, PowerState::Stopped | PowerState::Crashed) => {
                    Outcome::Done {
                        actual: PowerState::Stopped,
                        phase: format!("stopped on {}", host.name),
                        result: runtime_summary(&rt),
                    }
                }
                Ok(rt) => Outcome::Failed(format!(
                    "host {} answered the stop but the VM is still {}",
                    host.name, rt.state
                )),
                // The agent does not know the VM: it is not running there.
                Err(e) if e.is_not_found() => Outcome::Done {
                    actual: PowerState::Stopped,
                    phase: format!("was not running on {}", host.name),
                    result: json!({ "state": PowerState::Stopped }),
                },
                Err(e) => Outcome::Failed(e.to_string()),
            }
        }
        // Driven by their own modules (migrate, maintenance, drs), never by this driver.
        TaskKind::VmMigrate
        | TaskKind::HostMaintenanceEnter
        | TaskKind::HostMaintenanceExit
        | TaskKind::DrsApply => Outcome::Failed(format!(
            "{} tasks are not driven here",
            kind_text(t.task.kind)
        )),
    }
}

fn runtime_summary(rt: &VmRuntime) -> serde_json::Value {
    json!({
        "state": rt.state,
        "pid": rt.pid,
        "accelerator": rt.accelerator,
        "taps": rt.taps,
    })
}

async fn record_outcome(app: &Arc<App>, id: Uuid, outcome: Outcome) -> Result<(), ApiErr> {
    let app2 = app.clone();
    app.db
        .write(move |tx| {
            let now = Utc::now();
            let Some(t) = tx.task(id)? else {
                return Ok(());
            };
            if let Some(vm) = t.vm_id {
                app2.settle(vm);
            }
            let vm = t.vm_id.map(|v| tx.vm_by_id(v)).transpose()?.flatten();
            let what = kind_text(t.task.kind);
            let vm_name = t.task.vm.clone().unwrap_or_default();
            match outcome {
                Outcome::Done {
                    actual,
                    phase,
                    result,
                } => {
                    if !tx.finish_task(
                        id,
                        TaskState::Succeeded,
                        &phase,
                        Some(&result),
                        None,
                        now,
                    )? {
                        return Ok(());
                    }
                    if let Some(vm) = &vm {
                        tx.set_vm_actual(vm.id, actual)?;
                    }
                    tx.add_event(
                        task_event(
                            &t.task,
                            NewEvent::info(format!(
                                "task {id}: {what} of VM {vm_name} succeeded: {phase}"
                            )),
                        ),
                        now,
                    )?;
                }
                Outcome::Failed(msg) => {
                    if !tx.finish_task(id, TaskState::Failed, "failed", None, Some(&msg), now)? {
                        return Ok(());
                    }
                    // A failed task leaves the desired state as it found it.
                    if let (Some(vm), Some(prev)) = (&vm, t.intent.previous_desired) {
                        tx.set_vm_desired(vm.id, prev)?;
                    }
                    tx.add_event(
                        task_event(
                            &t.task,
                            NewEvent::error(format!(
                                "task {id}: {what} of VM {vm_name} failed: {msg}"
                            )),
                        ),
                        now,
                    )?;
                }
                Outcome::Gone => {}
            }
            Ok(())
        })
        .await
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
pub async fn cancel(app: &Arc<App>, id: Uuid) -> Result<Task, ApiErr> {
    let app2 = app.clone();
    let task = app
        .db
        .write(move |tx| {
            let now = Utc::now();
            let t = tx.task(id)?.ok_or_else(|| {
                ApiErr::not_found(format!("task {id} does not exist: see tern task list"))
            })?;
            if t.task.state.is_done() {
                return Err(ApiErr::conflict(format!(
                    "task {id} has already {}; there is nothing to cancel",
                    t.task.state
                )));
            }
            if let Some(why) = crate::migrate::cancel_refusal(tx, id)? {
                return Err(ApiErr::conflict(why));
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
                .ok_or_else(|| ApiErr::internal(format!("task {id} vanished")))
        })
        .await?;
    app.signal_cancel(id);
    Ok(task)
}

/// At center start: ends the tasks a previous center left going, then (in the background)
/// re-reads their VMs' states from their agents.
pub async fn recover(app: &Arc<App>) -> Result<usize, ApiErr> {
    let left = app
        .db
        .write(|tx| {
            let now = Utc::now();
            let mut left = Vec::new();
            for t in tx.active_tasks(None)? {
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
            Ok::<_, ApiErr>(left)
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
async fn reread(app: &Arc<App>, vm_id: Uuid, previous: Option<PowerState>) -> Result<(), ApiErr> {
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
            Ok::<_, ApiErr>(vm.zip(host))
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
            Ok::<_, ApiErr>(())
        })
        .await
}
