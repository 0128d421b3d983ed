//! Changing a VM's resource policy (shares, reservations, limits): checked, applied live by
//! the agent of the host running the VM, then stored in the VM's spec, so the inventory never
//! says what the host does not enforce.

use std::sync::Arc;

use chrono::Utc;
use tern_api::center::Vm;
use tern_api::{PowerState, Resources};

use crate::app::App;
use crate::error::CenterError;
use crate::store::NewEvent;
use crate::tasks::kind_text;

/// Replaces VM `name`'s resource policy; `by` is the caller's token name.
pub async fn set_resources(
    app: &Arc<App>,
    name: String,
    resources: Resources,
    by: String,
) -> Result<Vm, CenterError> {
    let n = name.clone();
    let resources2 = resources.clone();
    let vm = app
        .db
        .read(move |tx| {
            let vm = tx
                .vm_by_name(&n)?
                .ok_or_else(|| CenterError::vm_not_found(&n))?;
            // A migration or power task works from the spec it read: changing it underneath
            // would leave the two hosts disagreeing.
            if let Some(t) = tx.active_tasks(Some(vm.id))?.first() {
                return Err(CenterError::conflict(format!(
                    "task {} ({}) is still {} on VM {n}: change its resources once it ends",
                    t.task.id,
                    kind_text(t.task.kind),
                    t.task.state
                )));
            }
            let host = vm.host_id.map(|h| tx.host_by_id(h)).transpose()?.flatten();
            // In a cluster with pools the host enforces the VM's part of them: computed
            // with the new policy in place.
            let mut changed = vm.clone();
            changed.spec.resources = resources2;
            let pooled = !tx.pools(vm.cluster_id)?.is_empty();
            let enforced = crate::pools::effective_for(tx, &changed)?;
            Ok::<_, CenterError>((vm, host, enforced, pooled))
        })
        .await?;
    let (vm, host, enforced, pooled) = (vm.0, vm.1, vm.2, vm.3);
    resources
        .check(vm.spec.vcpus, vm.spec.memory_mib)
        .map_err(|e| CenterError::invalid(format!("VM {name}: {e}")))?;
    let running = matches!(vm.actual, PowerState::Running | PowerState::Paused);
    let applied_on = match (&host, running) {
        (Some(h), true) => {
            if h.facts.resource_control.is_none() && !resources.is_default() {
                return Err(CenterError::conflict(format!(
                    "host {} of VM {name} cannot enforce resource policies (its agent found no \
                     cgroup CPU controller): move the VM to a host that can (tern host show \
                     NAME says which)",
                    h.name
                )));
            }
            app.agent(h)
                .set_resources(vm.id, &enforced)
                .await
                .map_err(|e| match e.status() {
                    Some(400) => CenterError::invalid(format!("VM {name}: {e}")),
                    _ => CenterError::agent(format!(
                        "host {} could not apply VM {name}'s resource policy: {e}",
                        h.name
                    )),
                })?;
            Some(h.name.clone())
        }
        _ => None,
    };
    let mut spec = vm.spec.clone();
    spec.resources = resources;
    let (id, host_name, cluster_id) = (vm.id, host.map(|h| h.name), vm.cluster_id);
    let vm = app
        .db
        .write(move |tx| {
            tx.set_vm_spec(id, &spec)?;
            let where_ = match &applied_on {
                Some(h) => format!("applied on host {h}"),
                None => "applied when it next starts".to_string(),
            };
            tx.add_event(
                NewEvent::info(format!(
                    "VM {}: resource policy {} ({where_})",
                    spec.name, spec.resources
                ))
                .vm(spec.name.clone())
                .host(host_name)
                .actor(by),
                Utc::now(),
            )?;
            let rec = tx
                .vm_by_name(&spec.name)?
                .ok_or_else(|| CenterError::vm_not_found(&spec.name))?;
            Ok::<_, CenterError>(crate::evc::vm_view(tx, &rec)?)
        })
        .await?;
    if pooled {
        // Its siblings' parts changed with its shares.
        crate::pools::apply(app, cluster_id).await?;
    }
    Ok(vm)
}
