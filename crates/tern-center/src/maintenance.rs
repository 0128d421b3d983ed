//! Host maintenance mode (`POST /api/v1/hosts/{name}/maintenance`): entering flags the host
//! and empties it live, leaving clears the flag.
//!
//! Entering is a task (`host_maintenance_enter`):
//! 1. The host's maintenance flag is set in the same transaction that records the task, so
//!    from that instant no placement, start or migration targets it (vmcheck, tasks and the
//!    migration pre-checks all refuse a host in maintenance).
//! 2. It waits for tasks already acting on the host's VMs to end.
//! 3. Every usable host is dry-run checked for every VM (the migration pre-checks: CPU,
//!    storage, size…); a failed check becomes a must-not-run-on rule of a DRS snapshot of the
//!    cluster, and `tern_drs::evacuate` plans the moves (memory fit, rules, spread) and names
//!    the blockers with the reason.
//! 4. The running VMs move by ordinary live migrations ([`crate::migrate::migrate_vm_as`]),
//!    queued in the plan's order as mandatory moves: the center's migration scheduler
//!    ([`crate::migration_slots`]) runs as many at once as the hosts' limits allow, whoever
//!    else migrates meanwhile; progress is VMs handled ÷ VMs on the host.
//! 5. Stopped VMs are re-homed in the inventory (their host changes, their generation is
//!    bumped) to the host `tern_drs::place` picks among those passing the same checks; the old
//!    host is asked to forget them.
//!
//! Semantics (differs from vSphere on purpose): the flag is set at once and is NOT undone if
//! the host cannot be emptied (a blocker, a failed migration, a cancel). The task then fails
//! naming each running VM still there and why ("host h1 stays in maintenance; VMs still on it:
//! …"), so the operator who asked for maintenance never sees new VMs land on the host while
//! they fix the blockers; `enter` again retries the evacuation, `exit` returns the host to
//! service. A stopped VM that no host can take stays registered on the host with a warning
//! event: it does not run, so it does not keep the host from being serviced.
//!
//! Entering a host already in maintenance with no VMs succeeds at once; a disconnected host
//! is refused (its VMs cannot be moved live). Exiting is recorded as a task that is done when
//! it is returned (`host_maintenance_exit`); it is refused while an entry task runs on the host.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tern_api::center::{
    EventLevel, MaintenanceLeft, MaintenanceMove, MaintenanceResult, Task, TaskKind, TaskState,
};
use tern_api::{HostState, PowerState};
use tern_drs::{explain, Snapshot};
use uuid::Uuid;

use crate::app::{lock, App};
use crate::drs::{precheck_text, Refused};
use crate::error::CenterError;
use crate::store::{HostRecord, NewEvent, StoreError, TaskIntent, TaskRecord, Tx, VmRecord};
use crate::tasks::{self, TaskCtl, TaskEnd};

/// How long entry waits for tasks already acting on the host's VMs.
const BUSY_WAIT: Duration = Duration::from_secs(120);
/// How often a busy VM is polled.
const POLL: Duration = Duration::from_millis(300);

fn ev(task: Uuid, host: &str, level: EventLevel, msg: String) -> NewEvent {
    NewEvent::new(level, format!("task {task}: {msg}"))
        .task(task)
        .host(Some(host))
}

/// The task emptying a host (a maintenance entry or an evacuation), if any.
pub fn active_emptying(tx: &Tx, host: &str) -> Result<Option<Task>, StoreError> {
    Ok(tx
        .active_tasks(None)?
        .into_iter()
        .map(|t| t.task)
        .find(|t| {
            matches!(
                t.kind,
                TaskKind::HostMaintenanceEnter | TaskKind::HostEvacuate
            ) && t.host.as_deref() == Some(host)
        }))
}

/// A task recorded as already succeeded (nothing left to do for it).
fn done_task(kind: TaskKind, host: &str, phase: String) -> TaskRecord {
    let now = Utc::now();
    let mut task = Task::queued(kind, None, Some(host.to_string()), now);
    task.state = TaskState::Succeeded;
    task.progress = 100;
    task.phase = phase;
    task.finished_at = Some(now);
    TaskRecord {
        task,
        vm_id: None,
        intent: TaskIntent::default(),
    }
}

/// Host `name`, if it can be emptied now: connected, and no task emptying it already. The
/// refusals end with `after_disconnect` and `after_busy` (what to do next).
fn emptyable_host(
    tx: &Tx,
    name: &str,
    after_disconnect: &str,
    after_busy: &str,
) -> Result<HostRecord, CenterError> {
    let host = tx
        .host_by_name(name)?
        .ok_or_else(|| CenterError::host_not_found(name))?;
    if host.state() == HostState::Disconnected {
        return Err(CenterError::conflict(format!(
            "host {name} is disconnected: its VMs cannot be moved live while its agent is \
             unreachable{after_disconnect}"
        )));
    }
    if let Some(t) = active_emptying(tx, name)? {
        return Err(CenterError::conflict(format!(
            "task {} ({}) is already emptying host {name}: follow it with tern task wait \
             {}{after_busy}",
            t.id,
            tasks::kind_text(t.kind),
            t.id
        )));
    }
    Ok(host)
}

/// Puts host `name` in maintenance mode and empties it in the background.
pub async fn enter(app: &Arc<App>, name: String) -> Result<Task, CenterError> {
    let (rec, start) = app
        .db
        .write(move |tx| {
            let now = Utc::now();
            let host = emptyable_host(
                tx,
                &name,
                "; wait for it to reconnect (tern host list), then enter maintenance again",
                ", then enter maintenance",
            )?;
            let vms = tx.vms_on_host(host.id)?;
            if host.maintenance && vms.is_empty() {
                let rec = done_task(
                    TaskKind::HostMaintenanceEnter,
                    &name,
                    format!("host {name} is already in maintenance and has no VMs"),
                );
                tx.insert_task(&rec)?;
                tx.add_event(
                    ev(
                        rec.task.id,
                        &name,
                        EventLevel::Info,
                        format!(
                            "host {name} is already in maintenance and has no VMs: nothing to do"
                        ),
                    ),
                    now,
                )?;
                return Ok::<_, CenterError>((rec, false));
            }
            let rec = TaskRecord {
                task: Task::queued(
                    TaskKind::HostMaintenanceEnter,
                    None,
                    Some(name.clone()),
                    now,
                ),
                vm_id: None,
                intent: TaskIntent::default(),
            };
            tx.insert_task(&rec)?;
            let msg = if host.maintenance {
                format!(
                    "host {name} is in maintenance; emptying it again ({} VM(s) on it)",
                    vms.len()
                )
            } else {
                tx.set_host_maintenance(host.id, true)?;
                format!(
                    "host {name} entered maintenance mode: no VM lands or starts there from now \
                     on; emptying it ({} VM(s) on it)",
                    vms.len()
                )
            };
            tx.add_event(ev(rec.task.id, &name, EventLevel::Info, msg), now)?;
            Ok((rec, true))
        })
        .await?;
    if start {
        let host = rec.task.host.clone().unwrap_or_default();
        let app2 = app.clone();
        tasks::spawn(app, rec.task.id, move |ctl| {
            drive(app2, ctl, host, Purpose::Maintenance)
        });
    }
    Ok(rec.task)
}

/// Empties host `name` live without maintenance mode (`host_evacuate`): its running VMs
/// move by the same plan and limits as a maintenance entry; stopped VMs stay registered (a
/// start places them elsewhere while the host is degraded). `why` is recorded with the task:
/// the health signal of a proactive evacuation, or the operator's request.
pub async fn evacuate(app: &Arc<App>, name: String, why: String) -> Result<Task, CenterError> {
    let rec = app
        .db
        .write(move |tx| {
            let now = Utc::now();
            let host = emptyable_host(tx, &name, "", "")?;
            let running = tx
                .vms_on_host(host.id)?
                .iter()
                .filter(|v| v.actual == PowerState::Running)
                .count();
            let rec = TaskRecord {
                task: Task::queued(TaskKind::HostEvacuate, None, Some(name.clone()), now),
                vm_id: None,
                intent: TaskIntent::default(),
            };
            tx.insert_task(&rec)?;
            tx.add_event(
                ev(
                    rec.task.id,
                    &name,
                    EventLevel::Warning,
                    format!("emptying host {name} live ({running} running VM(s)): {why}"),
                ),
                now,
            )?;
            Ok::<_, CenterError>(rec)
        })
        .await?;
    let host = rec.task.host.clone().unwrap_or_default();
    let app2 = app.clone();
    tasks::spawn(app, rec.task.id, move |ctl| {
        drive(app2, ctl, host, Purpose::Evacuate)
    });
    Ok(rec.task)
}

/// Why a host is being emptied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// Maintenance mode: running VMs leave, stopped ones are re-homed.
    Maintenance,
    /// An evacuation: running VMs leave; the host keeps its flags and its stopped VMs.
    Evacuate,
}

/// Returns host `name` to service (clears its maintenance flag).
pub async fn exit(app: &Arc<App>, name: String) -> Result<Task, CenterError> {
    app.db
        .write(move |tx| {
            let now = Utc::now();
            let host = tx
                .host_by_name(&name)?
                .ok_or_else(|| CenterError::host_not_found(&name))?;
            if let Some(t) =
                active_emptying(tx, &name)?.filter(|t| t.kind == TaskKind::HostMaintenanceEnter)
            {
                return Err(CenterError::conflict(format!(
                    "task {} is emptying host {name} for maintenance: cancel it first with \
                     tern task cancel {}",
                    t.id, t.id
                )));
            }
            let (phase, msg) = if host.maintenance {
                tx.set_host_maintenance(host.id, false)?;
                (
                    format!("host {name} is back in service"),
                    format!(
                        "host {name} left maintenance mode: VMs may be placed, started and \
                         migrated there again"
                    ),
                )
            } else {
                let p = format!("host {name} was not in maintenance: nothing to do");
                (p.clone(), p)
            };
            let rec = done_task(TaskKind::HostMaintenanceExit, &name, phase);
            tx.insert_task(&rec)?;
            tx.add_event(ev(rec.task.id, &name, EventLevel::Info, msg), now)?;
            Ok(rec.task)
        })
        .await
}

/// What entering maintenance on host `name` would do now: the same pre-checks and scheduler
/// plan the entry itself makes, without moving anything.
pub async fn plan(
    app: &Arc<App>,
    name: String,
) -> Result<tern_api::center::MaintenancePlan, CenterError> {
    use tern_api::center::{MaintenancePlan, PlanBlocker, PlannedMove};
    let n = name.clone();
    let (host, vms) = app
        .db
        .read(move |tx| {
            let host = tx
                .host_by_name(&n)?
                .ok_or_else(|| CenterError::not_found(format!("host {n} is not registered")))?;
            let vms = tx.vms_on_host(host.id)?;
            Ok::<_, CenterError>((host, vms))
        })
        .await?;
    let mut out = MaintenancePlan {
        host: name.clone(),
        moves: Vec::new(),
        blockers: Vec::new(),
        stopped: Vec::new(),
        other: Vec::new(),
        imbalance_before: 0.0,
        imbalance_after: 0.0,
    };
    let mut running = Vec::new();
    for vm in vms {
        match vm.actual {
            PowerState::Running => running.push(vm),
            PowerState::Stopped | PowerState::Crashed => out.stopped.push(vm.name().to_string()),
            state => out.other.push(PlanBlocker {
                vm: vm.name().to_string(),
                why: format!(
                    "it is {state}: only a running VM moves live and only a stopped one is \
                     re-homed"
                ),
            }),
        }
    }
    if running.is_empty() {
        return Ok(out);
    }
    let mut on_host = Vec::new();
    for vm in running {
        let refused = crate::drs::prechecks(app, &vm, &name).await;
        on_host.push(OnHost { vm, refused });
    }
    let rules = crate::drs::precheck_rules(on_host.iter().map(|o| (o.vm.name(), &o.refused)));
    let snap = crate::drs::cluster_snapshot(app, host.cluster_id, rules, None)
        .await
        .map_err(CenterError::agent)?;
    let p = tern_drs::evacuate(&snap, &name).map_err(|e| {
        CenterError::conflict(format!("the scheduler cannot read the cluster: {e}"))
    })?;
    out.imbalance_before = p.imbalance_before;
    out.imbalance_after = p.imbalance_after;
    out.moves = p
        .steps
        .iter()
        .map(|s| PlannedMove {
            vm: s.migration.vm.clone(),
            to: s.migration.to_host.clone(),
            reason: explain::move_line(&s.migration),
        })
        .collect();
    out.blockers = p
        .blockers
        .iter()
        .map(|b| {
            let mut why = explain::blocker(b);
            if let Some(o) = on_host.iter().find(|o| o.vm.name() == b.vm) {
                why.push_str(&precheck_text(&o.refused));
            }
            PlanBlocker {
                vm: b.vm.clone(),
                why,
            }
        })
        .collect();
    Ok(out)
}

/// One maintenance entry being driven.
struct Entry {
    app: Arc<App>,
    task: Uuid,
    host: String,
    /// The migration task in flight (cancelled with this task).
    /// Migration tasks in flight (several at once, within the per-host limit).
    children: Arc<Mutex<Vec<Uuid>>>,
    result: Arc<Mutex<MaintenanceResult>>,
    purpose: Purpose,
}

async fn drive(app: Arc<App>, ctl: TaskCtl, host: String, purpose: Purpose) -> Option<TaskEnd> {
    let e = Entry {
        purpose,
        app: app.clone(),
        task: ctl.id(),
        host: host.clone(),
        children: Arc::default(),
        result: Arc::new(Mutex::new(MaintenanceResult {
            host: host.clone(),
            ..Default::default()
        })),
    };
    match ctl.until_cancelled(e.run()).await {
        Some(r) => Some(e.end(r).await),
        None => {
            // The cancel call recorded the task's end; stop the migration in flight too.
            for err in crate::drs::cancel_children(&app, &e.children).await {
                e.event(EventLevel::Warning, err).await;
            }
            let left = e.vms_left().await;
            let left = if left.is_empty() {
                "none".to_string()
            } else {
                left.join(", ")
            };
            e.event(
                EventLevel::Warning,
                match purpose {
                    Purpose::Maintenance => format!(
                        "maintenance entry cancelled: host {host} stays in maintenance; VMs \
                         still on it: {left}"
                    ),
                    Purpose::Evacuate => {
                        format!("evacuation cancelled: VMs still on host {host}: {left}")
                    }
                },
            )
            .await;
            None
        }
    }
}

/// A VM on the host as the run sees it.
struct OnHost {
    vm: VmRecord,
    /// Failed destination pre-checks by host name: (check, detail).
    refused: Refused,
}

impl Entry {
    async fn event(&self, level: EventLevel, msg: String) {
        self.event_vm(level, None, msg).await
    }

    async fn event_vm(&self, level: EventLevel, vm: Option<&str>, msg: String) {
        let mut e = ev(self.task, &self.host, level, msg);
        if let Some(vm) = vm {
            e = e.vm(vm);
        }
        self.app.add_event(e).await;
    }

    /// Records progress; an error when the task has ended meanwhile (cancelled).
    async fn phase(&self, progress: u8, phase: String) -> Result<(), String> {
        if crate::tasks::record_progress(&self.app, self.task, progress, phase).await? {
            Ok(())
        } else {
            Err("the task ended meanwhile (cancelled)".into())
        }
    }

    async fn host_record(&self) -> Result<HostRecord, String> {
        let name = self.host.clone();
        self.app
            .db
            .read(move |tx| tx.host_by_name(&name))
            .await
            .map_err(|e| format!("center store: {e}"))?
            .ok_or_else(|| format!("host {} is no longer registered", self.host))
    }

    async fn vms_on_host(&self) -> Result<Vec<VmRecord>, String> {
        let h = self.host_record().await?;
        self.app
            .db
            .read(move |tx| tx.vms_on_host(h.id))
            .await
            .map_err(|e| format!("center store: {e}"))
    }

    /// Names (with state) of the VMs still on the host, for messages.
    async fn vms_left(&self) -> Vec<String> {
        self.vms_on_host()
            .await
            .unwrap_or_default()
            .iter()
            .map(|v| format!("{} ({})", v.name(), v.actual))
            .collect()
    }

    /// Everything up to the host being empty of running VMs.
    async fn run(&self) -> Result<(), String> {
        self.phase(1, "waiting for tasks on the host's VMs".into())
            .await?;
        self.wait_idle().await?;
        let vms = self.vms_on_host().await?;
        let (running, rest): (Vec<VmRecord>, Vec<VmRecord>) = vms
            .into_iter()
            .partition(|v| v.actual == PowerState::Running);
        let (stopped, other): (Vec<VmRecord>, Vec<VmRecord>) = rest
            .into_iter()
            .partition(|v| matches!(v.actual, PowerState::Stopped | PowerState::Crashed));
        let total = running.len() + stopped.len() + other.len();
        for v in &other {
            let why = format!(
                "it is {}: only a running VM moves live and only a stopped one is re-homed; \
                 resume or stop it, then enter maintenance again",
                v.actual
            );
            self.leave(v.name(), why).await;
        }
        let mut handled = other.len();

        // Running VMs: a DRS plan, then its live migrations, several at once.
        if !running.is_empty() {
            self.phase(3, format!("planning {} live migration(s)", running.len()))
                .await?;
            let mut on_host = Vec::new();
            for vm in running {
                let refused = self.prechecks(&vm).await;
                on_host.push(OnHost { vm, refused });
            }
            let snap = self.snapshot(&on_host, None).await?;
            let plan = tern_drs::evacuate(&snap, &self.host)
                .map_err(|e| format!("the scheduler cannot read the cluster: {e}"))?;
            self.event(
                EventLevel::Info,
                format!(
                    "plan: {} move(s), {} blocker(s); imbalance of the other hosts {:.4} → {:.4}",
                    plan.steps.len(),
                    plan.blockers.len(),
                    plan.imbalance_before,
                    plan.imbalance_after
                ),
            )
            .await;
            for b in &plan.blockers {
                let mut why = explain::blocker(b);
                if let Some(o) = on_host.iter().find(|o| o.vm.name() == b.vm) {
                    why.push_str(&precheck_text(&o.refused));
                }
                self.leave(&b.vm, why).await;
                handled += 1;
            }
            handled += self.migrate_all(&plan.steps, handled, total).await?;
        }

        // Stopped VMs: registered on another host if one can take them (an evacuation
        // leaves them: they do not run, and a start places them anew).
        let stopped = if self.purpose == Purpose::Maintenance {
            stopped
        } else {
            Vec::new()
        };
        for vm in stopped {
            self.phase(
                progress(handled, total),
                format!("re-homing stopped VM {}", vm.name()),
            )
            .await?;
            self.rehome(vm).await?;
            handled += 1;
        }
        Ok(())
    }

    /// Queues the plan's live migrations in its order, then waits for them: the center's
    /// migration scheduler runs as many at once as the hosts' limits allow (mandatory moves,
    /// ahead of any DRS balance move). Returns how many were handled (moved or left with the
    /// reason).
    async fn migrate_all(
        &self,
        steps: &[tern_drs::EvacuationStep],
        handled_before: usize,
        total: usize,
    ) -> Result<usize, String> {
        use crate::migrate::MoveClass;
        let moves = steps.len();
        let mut queued: Vec<(&tern_drs::Move, String, Uuid)> = Vec::new();
        let mut handled = 0;
        for (i, step) in steps.iter().enumerate() {
            let m = &step.migration;
            let reason = format!(
                "{}; imbalance of the other hosts {:.4} → {:.4}",
                explain::reason(&m.reason),
                m.numbers.imbalance_before,
                m.numbers.imbalance_after
            );
            self.event_vm(
                EventLevel::Info,
                Some(&m.vm),
                format!("decision: VM {} goes to {}: {reason}", m.vm, m.to_host),
            )
            .await;
            self.phase(
                progress(handled_before, total),
                format!(
                    "queueing the migration of VM {} to {} ({} of {moves})",
                    m.vm,
                    m.to_host,
                    i + 1
                ),
            )
            .await?;
            match crate::drs::start_migration(
                &self.app,
                &m.vm,
                &m.to_host,
                MoveClass::Mandatory,
                &self.children,
            )
            .await
            {
                Ok(id) => queued.push((m, reason, id)),
                Err(why) => {
                    self.leave(&m.vm, why).await;
                    handled += 1;
                }
            }
        }
        let done = std::sync::atomic::AtomicUsize::new(handled);
        let waits = queued.iter().map(|(m, reason, id)| {
            let done = &done;
            async move {
                let outcome =
                    crate::drs::wait_migration(&self.app, *id, &m.to_host, &self.children).await;
                match outcome {
                    Ok(id) => lock(&self.result).migrated.push(MaintenanceMove {
                        vm: m.vm.clone(),
                        to: m.to_host.clone(),
                        task: Some(id),
                        reason: reason.clone(),
                    }),
                    Err(why) => self.leave(&m.vm, why).await,
                }
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                self.phase(
                    progress(handled_before + n, total),
                    format!("{n} of {moves} migration(s) ended; VM {} done", m.vm),
                )
                .await
            }
        });
        let results = futures::future::join_all(waits).await;
        results.into_iter().collect::<Result<Vec<()>, String>>()?;
        Ok(done.into_inner())
    }

    /// Waits until no task acts on a VM of the host (a start or migration begun before the
    /// flag was set).
    async fn wait_idle(&self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + BUSY_WAIT;
        loop {
            let h = self.host_record().await?;
            let busy = self
                .app
                .db
                .read(move |tx| {
                    let active = tx.vms_with_active_tasks()?;
                    Ok::<_, StoreError>(
                        tx.vms_on_host(h.id)?
                            .into_iter()
                            .filter(|v| active.contains(&v.id))
                            .map(|v| v.name().to_string())
                            .collect::<Vec<_>>(),
                    )
                })
                .await
                .map_err(|e| format!("center store: {e}"))?;
            if busy.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "tasks still act on VM(s) {} after {} s: wait for them (tern task list), \
                     then enter maintenance again",
                    busy.join(", "),
                    BUSY_WAIT.as_secs()
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Dry-runs the migration pre-checks of `vm` against every other usable host.
    async fn prechecks(&self, vm: &VmRecord) -> Refused {
        crate::drs::prechecks(&self.app, vm, &self.host).await
    }

    /// The cluster of the host as the DRS engine sees it. Stopped VMs hold memory on their
    /// host (they may start any time), so they shrink its capacity; a failed pre-check
    /// becomes a must-not-run-on rule. `placing` is a VM added without a host.
    async fn snapshot(
        &self,
        on_host: &[OnHost],
        placing: Option<&OnHost>,
    ) -> Result<Snapshot, String> {
        let h = self.host_record().await?;
        let rules = crate::drs::precheck_rules(
            on_host
                .iter()
                .chain(placing)
                .map(|o| (o.vm.name(), &o.refused)),
        );
        crate::drs::cluster_snapshot(&self.app, h.cluster_id, rules, placing.map(|p| p.vm.id)).await
    }

    /// Registers a stopped VM on the host the scheduler picks, or leaves it with a warning.
    async fn rehome(&self, vm: VmRecord) -> Result<(), String> {
        let name = vm.name().to_string();
        let refused = self.prechecks(&vm).await;
        let o = OnHost { vm, refused };
        let snap = self.snapshot(&[], Some(&o)).await?;
        let placed = match tern_drs::place(&snap, &name) {
            Ok(p) if !p.over_high_water => p,
            Ok(p) => {
                let why = format!(
                    "no host has room for it (the best, {}, would go over capacity); it stays \
                     registered on {} and does not run",
                    p.host, self.host
                );
                self.warn_stays(&name, why).await;
                return Ok(());
            }
            Err(tern_drs::PlaceError::Admission(f)) => {
                let why = format!(
                    "{}{}; it stays registered on {} and does not run",
                    explain::admission_failure(&f),
                    precheck_text(&o.refused),
                    self.host
                );
                self.warn_stays(&name, why).await;
                return Ok(());
            }
            Err(e) => return Err(format!("the scheduler cannot place VM {name}: {e}")),
        };
        let (vm_id, generation, to) = (o.vm.id, o.vm.generation, placed.host.clone());
        let source = self.host.clone();
        let moved = self
            .app
            .db
            .write(move |tx| -> Result<HostRecord, RehomeErr> {
                let dest = tx
                    .host_by_name(&to)?
                    .filter(HostRecord::usable)
                    .ok_or_else(|| RehomeErr(format!("host {to} is no longer usable")))?;
                let vm = tx
                    .vm_by_id(vm_id)?
                    .filter(|v| v.host.as_deref() == Some(source.as_str()))
                    .ok_or_else(|| RehomeErr(format!("the VM left host {source} meanwhile")))?;
                if !tx.active_tasks(Some(vm_id))?.is_empty() {
                    return Err(RehomeErr(format!(
                        "a task began on VM {} meanwhile",
                        vm.name()
                    )));
                }
                tx.rehome_vm(vm_id, dest.id, generation)?;
                Ok(dest)
            })
            .await;
        match moved {
            Ok(dest) => {
                let reason = format!(
                    "imbalance {:.4} → {:.4} with it there",
                    placed.imbalance_before, placed.imbalance_after
                );
                self.event_vm(
                    EventLevel::Info,
                    Some(&name),
                    format!(
                        "decision: stopped VM {name} re-homed from {} to {} ({reason}); it \
                         starts there next time",
                        self.host, dest.name
                    ),
                )
                .await;
                lock(&self.result).rehomed.push(MaintenanceMove {
                    vm: name.clone(),
                    to: dest.name.clone(),
                    task: None,
                    reason,
                });
                // The old host keeps no copy of a VM it no longer owns.
                if let Ok(old) = self.host_record().await {
                    if let Err(e) = self.app.agent(&old).delete(vm_id).await {
                        if !e.is_not_found() {
                            self.event_vm(
                                EventLevel::Warning,
                                Some(&name),
                                format!(
                                    "host {} could not forget re-homed VM {name}: {e}",
                                    self.host
                                ),
                            )
                            .await;
                        }
                    }
                }
            }
            Err(e) => {
                self.warn_stays(&name, format!("not re-homed: {}", e.0))
                    .await
            }
        }
        Ok(())
    }

    async fn warn_stays(&self, vm: &str, why: String) {
        self.event_vm(
            EventLevel::Warning,
            Some(vm),
            format!("stopped VM {vm} stays on host {}: {why}", self.host),
        )
        .await;
        lock(&self.result).left.push(MaintenanceLeft {
            vm: vm.to_string(),
            why,
        });
    }

    /// Records that a VM that should leave could not.
    async fn leave(&self, vm: &str, why: String) {
        self.event_vm(
            EventLevel::Error,
            Some(vm),
            format!("VM {vm} cannot leave host {}: {why}", self.host),
        )
        .await;
        lock(&self.result).left.push(MaintenanceLeft {
            vm: vm.to_string(),
            why,
        });
    }

    /// The outcome: succeeded when no running VM is left on the host.
    async fn end(&self, r: Result<(), String>) -> TaskEnd {
        let result = lock(&self.result).clone();
        let running_left: Vec<String> = match self.vms_on_host().await {
            Ok(vms) => vms
                .iter()
                .filter(|v| !matches!(v.actual, PowerState::Stopped | PowerState::Crashed))
                .map(|v| {
                    let why = result
                        .left
                        .iter()
                        .find(|l| l.vm == v.name())
                        .map(|l| l.why.clone())
                        .unwrap_or_else(|| format!("it is {}", v.actual));
                    format!("{} ({why})", v.name())
                })
                .collect(),
            Err(e) => vec![format!("(could not list them: {e})")],
        };
        let value = serde_json::to_value(&result).ok();
        match (&r, running_left.is_empty()) {
            (Ok(()), true) => {
                let stays = if result.left.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; stopped VM(s) still registered on it: {}",
                        result
                            .left
                            .iter()
                            .map(|l| l.vm.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                let phase = match self.purpose {
                    Purpose::Maintenance => format!(
                        "host {} is in maintenance: {} VM(s) migrated, {} re-homed{stays}",
                        self.host,
                        result.migrated.len(),
                        result.rehomed.len()
                    ),
                    Purpose::Evacuate => format!(
                        "host {} runs no VM: {} VM(s) migrated",
                        self.host,
                        result.migrated.len()
                    ),
                };
                TaskEnd::succeeded(phase.clone(), phase).result(value)
            }
            (r, _) => {
                let left = if running_left.is_empty() {
                    "none running".to_string()
                } else {
                    running_left.join("; ")
                };
                let mut msg = match self.purpose {
                    Purpose::Maintenance => {
                        format!(
                            "host {} stays in maintenance; VMs still on it: {left}",
                            self.host
                        )
                    }
                    Purpose::Evacuate => format!("VMs still on host {}: {left}", self.host),
                };
                if let Err(e) = r {
                    msg.push_str(&format!(" — the evacuation stopped: {e}"));
                }
                msg.push_str(&match self.purpose {
                    Purpose::Maintenance => format!(
                        ". Fix that, then run tern host maintenance enter {} again (or exit \
                         to return it to service)",
                        self.host
                    ),
                    Purpose::Evacuate => format!(
                        ". Fix that, then run tern host evacuate {} again",
                        self.host
                    ),
                });
                TaskEnd::failed(msg.clone(), msg).result(value)
            }
        }
    }
}

/// A store error or a refusal text, for the re-home transaction.
struct RehomeErr(String);

impl From<StoreError> for RehomeErr {
    fn from(e: StoreError) -> Self {
        RehomeErr(format!("center store: {e}"))
    }
}

fn progress(done: usize, total: usize) -> u8 {
    if total == 0 {
        return 99;
    }
    (5 + done * 94 / total).min(99) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drs::drs_snapshot;
    use tern_api::{BootSource, VmSpec};
    use tern_drs::{Rule, VmHostRelation};

    fn host(name: &str, memory_mib: u64, maintenance: bool) -> HostRecord {
        HostRecord::fake(name, memory_mib, maintenance)
    }

    fn vm(name: &str, on: &HostRecord, memory_mib: u64, actual: PowerState) -> VmRecord {
        VmRecord {
            id: Uuid::new_v4(),
            cluster_id: Uuid::nil(),
            cluster: "lab".into(),
            host_id: Some(on.id),
            host: Some(on.name.clone()),
            spec: VmSpec {
                firmware: Default::default(),
                cloud_init: None,
                resources: Default::default(),
                name: name.into(),
                vcpus: 1,
                memory_mib,
                cpu_model: None,
                boot: BootSource::Disk,
                disks: vec![],
                nics: vec![],
            },
            desired: actual,
            actual,
            generation: 1,
            created_at: Utc::now(),
            pool: None,
        }
    }

    #[test]
    fn evacuation_spreads_and_respects_memory_and_prechecks() {
        let h1 = host("h1", 8192, true);
        let h2 = host("h2", 8192, false);
        let h3 = host("h3", 8192, false);
        // A stopped 7.5 GiB VM on h3 leaves it room for nothing big.
        let vms = vec![
            vm("a", &h1, 1024, PowerState::Running),
            vm("b", &h1, 1024, PowerState::Running),
            vm("big", &h1, 2048, PowerState::Running),
            vm("parked", &h3, 7680, PowerState::Stopped),
        ];
        let hosts = vec![h1, h2, h3];
        let snap = drs_snapshot(&hosts, &vms, None, vec![]);
        assert_eq!(snap.hosts[2].memory_mib, 512.0);
        assert_eq!(
            snap.vms.len(),
            3,
            "stopped VMs are not placed: {:?}",
            snap.vms
        );
        let plan = tern_drs::evacuate(&snap, "h1").unwrap();
        assert!(plan.blockers.is_empty(), "{plan:?}");
        assert!(plan.steps.iter().all(|s| s.migration.to_host == "h2"));

        // Room everywhere: the VMs spread over h2 and h3.
        let mut roomy = vms.clone();
        roomy.pop();
        let snap = drs_snapshot(&hosts, &roomy, None, vec![]);
        let plan = tern_drs::evacuate(&snap, "h1").unwrap();
        let dests: std::collections::HashSet<&str> = plan
            .steps
            .iter()
            .map(|s| s.migration.to_host.as_str())
            .collect();
        assert_eq!(dests.len(), 2, "{plan:?}");

        // A failed pre-check keeps a VM off that host; with no host left it is a blocker.
        let rules = ["h2", "h3"]
            .iter()
            .map(|h| Rule::VmHost {
                name: format!("pre-check cpu of big on {h}"),
                vms: vec!["big".into()],
                host_group: h.to_string(),
                relation: VmHostRelation::MustNotRunOn,
            })
            .collect();
        let snap = drs_snapshot(&hosts, &roomy, None, rules);
        let plan = tern_drs::evacuate(&snap, "h1").unwrap();
        assert_eq!(plan.blockers.len(), 1, "{plan:?}");
        assert_eq!(plan.blockers[0].vm, "big");
        assert!(explain::blocker(&plan.blockers[0]).contains("pre-check cpu"));
        assert_eq!(plan.steps.len(), 2);
    }

    #[test]
    fn a_placed_vm_has_no_host_and_holds_no_capacity() {
        let h1 = host("h1", 4096, true);
        let h2 = host("h2", 4096, false);
        let parked = vm("parked", &h1, 1024, PowerState::Stopped);
        let snap = drs_snapshot(
            &[h1, h2],
            std::slice::from_ref(&parked),
            Some(parked.id),
            vec![],
        );
        assert_eq!(snap.vms.len(), 1);
        assert_eq!(snap.vms[0].host, None);
        assert_eq!(snap.hosts[0].memory_mib, 4096.0);
        let p = tern_drs::place(&snap, "parked").unwrap();
        assert_eq!(p.host, "h2");
    }

    #[test]
    fn a_migration_in_flight_holds_room_on_its_destination() {
        let h1 = host("h1", 4096, false);
        let h2 = host("h2", 4096, false);
        let a = vm("a", &h1, 3072, PowerState::Running);
        let b = vm("b", &h1, 2048, PowerState::Running);
        let row = |vm: &VmRecord, state| crate::store::MigrationRow {
            task_id: Uuid::new_v4(),
            vm_id: vm.id,
            vm_name: vm.name().to_string(),
            source_host_id: h1.id,
            dest_host_id: h2.id,
            generation_from: 1,
            generation_to: 2,
            state,
            detail: None,
        };
        let hosts = vec![h1.clone(), h2.clone()];
        let vms = vec![a.clone(), b.clone()];
        let mut snap = drs_snapshot(&hosts, &vms, None, vec![]);
        crate::drs::add_in_flight(
            &mut snap,
            &hosts,
            &vms,
            &[row(&a, crate::store::MigrationRecordState::Preparing)],
        );
        // a still runs on h1 (until the commit), and h2 already gives it its 3 GiB: b, which
        // needs 2 GiB, no longer fits there.
        assert_eq!(snap.vms[0].host.as_deref(), Some("h1"));
        assert_eq!(snap.hosts[1].memory_mib, 1024.0);
        let plan = tern_drs::evacuate(&snap, "h1").unwrap();
        assert!(
            plan.blockers.iter().any(|x| x.vm == "b"),
            "b was planned into room promised to a: {plan:?}"
        );
        // Once committed (a's host is h2 in the store), nothing is counted twice.
        let mut moved = a.clone();
        moved.host_id = Some(h2.id);
        moved.host = Some("h2".into());
        let vms = vec![moved.clone(), b];
        let mut snap = drs_snapshot(&hosts, &vms, None, vec![]);
        crate::drs::add_in_flight(
            &mut snap,
            &hosts,
            &vms,
            &[row(&moved, crate::store::MigrationRecordState::Committed)],
        );
        assert_eq!(snap.hosts[1].memory_mib, 4096.0);
    }

    #[test]
    fn progress_stays_below_done() {
        assert_eq!(progress(0, 0), 99);
        assert_eq!(progress(0, 4), 5);
        assert!(progress(4, 4) <= 99);
    }
}
