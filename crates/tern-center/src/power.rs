//! VM power tasks (start and stop): recorded first with the new desired state, run by the
//! task runner against the host's agent, their outcome recorded last.

use std::sync::Arc;

use chrono::Utc;
use serde_json::json;
use tern_api::agent::{StartVm, VmRuntime};
use tern_api::center::{StopVm, Task, TaskKind, TaskState};
use tern_api::{HostState, PowerState};
use uuid::Uuid;

use crate::app::App;
use crate::error::CenterError;
use crate::store::{HostRecord, NewEvent, StoreError, TaskIntent, TaskRecord, VmRecord};
use crate::tasks::{self, kind_text, task_event, TaskEnd};

/// Queues a start of the VM and drives it in the background. A stopped VM whose host cannot
/// run it (maintenance, disconnected) is first placed elsewhere by the DRS engine.
pub async fn start_vm(app: &Arc<App>, name: String) -> Result<Task, CenterError> {
    crate::drs::rehome_for_start(app, &name).await?;
    begin(app, name, TaskKind::VmStart, None).await
}

/// Queues a stop of the VM and drives it in the background.
pub async fn stop_vm(app: &Arc<App>, name: String, req: StopVm) -> Result<Task, CenterError> {
    begin(app, name, TaskKind::VmStop, Some(req)).await
}

async fn begin(
    app: &Arc<App>,
    name: String,
    kind: TaskKind,
    stop: Option<StopVm>,
) -> Result<Task, CenterError> {
    // Intent first: the task and the new desired state are recorded before anything acts.
    let rec = app
        .db
        .write(move |tx| {
            let now = Utc::now();
            let vm = tx
                .vm_by_name(&name)?
                .ok_or_else(|| CenterError::vm_not_found(&name))?;
            let host = vm
                .host_id
                .map(|h| tx.host_by_id(h))
                .transpose()?
                .flatten()
                .ok_or_else(|| CenterError::conflict(format!("VM {name} has no host to run on")))?;
            if let Some(t) = tx.active_tasks(Some(vm.id))?.first() {
                return Err(CenterError::conflict(format!(
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
                    return Err(CenterError::conflict(format!(
                        "host {} of VM {name} is disconnected: wait for its agent to reconnect \
                         (tern host list)",
                        host.name
                    )))
                }
                (HostState::Maintenance, TaskKind::VmStart) => {
                    return Err(CenterError::conflict(format!(
                        "host {} of VM {name} is in maintenance mode: VMs do not start there",
                        host.name
                    )))
                }
                _ => {}
            }
            if kind == TaskKind::VmStart {
                crate::pools::admit_start(tx, &vm)?;
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
    let (app2, task) = (app.clone(), rec.task.clone());
    tasks::spawn(app, rec.task.id, move |ctl| async move {
        // A cancel is recorded by the cancel call; the work only stops waiting for the agent.
        let outcome = ctl.until_cancelled(work(&app2, ctl.id())).await;
        outcome.and_then(|o| o.end(&task))
    });
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
            // Pools: the VM starts with its part of its pools' settings.
            let rec = vm.clone();
            let resources = match app
                .db
                .read(move |tx| crate::pools::effective_for(tx, &rec))
                .await
            {
                Ok(r) => r,
                Err(e) => return Outcome::Failed(format!("center store: {e}")),
            };
            let mut spec = crate::evc::launch_spec(&vm.spec, &cpu);
            spec.resources = resources;
            let req = StartVm {
                spec,
                generation: vm.generation,
            };
            match agent.start(vm.id, &req).await {
                Ok(rt) if rt.state == PowerState::Running => {
                    crate::pools::member_changed(app, &vm, true).await;
                    Outcome::Done {
                        actual: rt.state,
                        phase: format!("running on {}", host.name),
                        result: runtime_summary(&rt),
                    }
                }
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
                    crate::pools::member_changed(app, &vm, false).await;
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
        | TaskKind::DrsApply
        | TaskKind::HostEvacuate => Outcome::Failed(format!(
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

impl Outcome {
    /// The end to record: a done task sets the VM's actual state; a failed one leaves the
    /// desired state as it found it.
    fn end(self, t: &Task) -> Option<TaskEnd> {
        let what = format!(
            "task {}: {} of VM {}",
            t.id,
            kind_text(t.kind),
            t.vm.as_deref().unwrap_or_default()
        );
        match self {
            Outcome::Done {
                actual,
                phase,
                result,
            } => Some(
                TaskEnd::succeeded(phase.clone(), format!("{what} succeeded: {phase}"))
                    .result(Some(result))
                    .changes(move |tx, t, ended| match (ended, t.vm_id) {
                        (true, Some(vm)) => tx.set_vm_actual(vm, actual),
                        _ => Ok(()),
                    }),
            ),
            Outcome::Failed(msg) => Some(
                TaskEnd::failed(msg.clone(), format!("{what} failed: {msg}")).changes(
                    |tx, t, ended| match (ended, t.vm_id, t.intent.previous_desired) {
                        (true, Some(vm), Some(prev)) => tx.set_vm_desired(vm, prev),
                        _ => Ok(()),
                    },
                ),
            ),
            Outcome::Gone => None,
        }
    }
}
