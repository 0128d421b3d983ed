//! The datastore catalogue, and what each host reaches of it.
//!
//! The center keeps the records; the hosts are asked which datastores they reach, on a period
//! ([`monitor`]) and again right before a VM is placed on or moved to one ([`check_host`]).
//! Every answer lands in the reach table; a change (a LUN's target stopped, a mount gone)
//! becomes an event naming the host, the datastore and the VMs there that use it. Disks name
//! a datastore and a volume; [`resolve_disks`] turns those into what a host opens.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tern_api::datastores::{
    AddDatastore, Datastore, DatastoreBackend, DatastoreProbe, DatastoreReach, HostReach,
    MarkDatastore,
};
use tern_api::VmSpec;
use tokio::sync::watch;
use uuid::Uuid;

use crate::app::App;
use crate::error::CenterError;
use crate::store::{HostRecord, NewEvent};

/// The datastores a spec's disks name.
pub fn spec_datastores(spec: &VmSpec) -> BTreeSet<String> {
    spec.disks
        .iter()
        .filter_map(|d| d.datastore.clone())
        .collect()
}

/// Whether the last answers say host `host` lacks one of the spec's datastores: the reason
/// (placement skips such hosts; a host never asked is not ruled out here, the check before
/// the VM goes there asks it).
pub fn known_unreachable(app: &App, host: Uuid, spec: &VmSpec) -> Option<String> {
    spec_datastores(spec).into_iter().find_map(|ds| {
        app.datastore_reach
            .get(&ds, host)
            .filter(|r| !r.reachable)
            .map(|r| format!("host {} cannot reach datastore {ds}: {}", r.host, r.detail))
    })
}

/// Fills in each disk's path from its datastore and volume, or names the datastore holding
/// a disk given by path. A disk naming a datastore that does not exist, a volume that cannot
/// be in it, or a path that disagrees with them is refused.
pub fn resolve_disks(spec: &mut VmSpec, stores: &[Datastore]) -> Result<(), CenterError> {
    for (i, disk) in spec.disks.iter_mut().enumerate() {
        match (&disk.datastore, &disk.volume) {
            (Some(name), Some(volume)) => {
                let ds = stores.iter().find(|d| &d.name == name).ok_or_else(|| {
                    CenterError::unsatisfiable(format!(
                        "disk {i}: no datastore named {name} (see tern datastore list)"
                    ))
                })?;
                if matches!(ds.backend, DatastoreBackend::Block { .. })
                    && disk.format != tern_api::DiskFormat::Raw
                {
                    return Err(CenterError::invalid(format!(
                        "disk {i}: a block datastore's device is a raw disk: format=raw"
                    )));
                }
                let located = ds
                    .backend
                    .locate(volume)
                    .map_err(|e| CenterError::invalid(format!("disk {i}: {e}")))?;
                if !disk.path.is_empty() && disk.path != located {
                    return Err(CenterError::invalid(format!(
                        "disk {i}: path {} is not volume {volume} of datastore {name} ({located}); \
                         give either the path or the datastore and volume",
                        disk.path
                    )));
                }
                disk.path = located;
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(CenterError::invalid(format!(
                    "disk {i}: give both a datastore and a volume (or a path alone)"
                )))
            }
            (None, None) => {
                if let Some((ds, volume)) = stores
                    .iter()
                    .find_map(|d| d.backend.volume_of(&disk.path).map(|v| (d, v)))
                {
                    disk.datastore = Some(ds.name.clone());
                    disk.volume = Some(volume);
                }
            }
        }
    }
    Ok(())
}

/// The datastore a path or URL lies in, with the volume it is there.
pub fn locate_in(stores: &[Datastore], location: &str) -> Option<(String, String)> {
    stores
        .iter()
        .find_map(|d| d.backend.volume_of(location).map(|v| (d.name.clone(), v)))
}

fn probes(stores: &[Datastore]) -> Vec<DatastoreProbe> {
    stores
        .iter()
        .map(|d| DatastoreProbe {
            name: d.name.clone(),
            id: d.id.clone(),
            backend: d.backend.clone(),
        })
        .collect()
}

/// Asks `host` about `stores` now; records the answers and raises events on changes.
/// `Err` when the host could not be asked.
pub async fn refresh_host(
    app: &App,
    host: &HostRecord,
    stores: &[Datastore],
) -> Result<Vec<DatastoreReach>, CenterError> {
    if stores.is_empty() {
        return Ok(Vec::new());
    }
    let answers = app
        .agent(host)
        .probe_datastores(probes(stores))
        .await
        .map_err(|e| CenterError::agent(format!("could not ask host {}: {e}", host.name)))?;
    let now = Utc::now();
    let mut changes = Vec::new();
    for a in &answers {
        if !stores.iter().any(|d| d.name == a.name) {
            continue; // not asked: an agent's answer names only what it was asked
        }
        let before = app.datastore_reach.record(
            &a.name,
            host.id,
            HostReach {
                host: host.name.clone(),
                reachable: a.reachable,
                detail: a.detail.clone(),
                checked_at: now,
            },
        );
        let changed = match before {
            None => !a.reachable,
            Some(was) => was != a.reachable,
        };
        if changed {
            changes.push(a.clone());
        }
    }
    if !changes.is_empty() {
        record_changes(app, host, changes).await;
    }
    Ok(answers)
}

/// Events for datastores a host lost or regained: one for the host, one per VM there with a
/// disk on it (the VM may now be stalled on I/O; it will not be moved to a host without it).
async fn record_changes(app: &App, host: &HostRecord, changes: Vec<DatastoreReach>) {
    let (host_id, host_name) = (host.id, host.name.clone());
    let r = app
        .db
        .write(move |tx| {
            let vms = tx.vms()?;
            for c in &changes {
                let users: Vec<String> = vms
                    .iter()
                    .filter(|v| v.host_id == Some(host_id))
                    .filter(|v| spec_datastores(&v.spec).contains(&c.name))
                    .map(|v| v.spec.name.clone())
                    .collect();
                let ev = if c.reachable {
                    NewEvent::info(format!(
                        "datastore {} is reachable again from host {host_name}: {}",
                        c.name, c.detail
                    ))
                } else {
                    let on = if users.is_empty() {
                        String::new()
                    } else {
                        format!("; VMs there with disks on it: {}", users.join(", "))
                    };
                    NewEvent::warning(format!(
                        "datastore {} is unreachable from host {host_name}: {}{on}",
                        c.name, c.detail
                    ))
                };
                tx.add_event(ev.host(Some(host_name.clone())), Utc::now())?;
                for vm in &users {
                    let ev = if c.reachable {
                        NewEvent::info(format!(
                            "VM {vm}: its host {host_name} reaches datastore {} again",
                            c.name
                        ))
                    } else {
                        NewEvent::warning(format!(
                            "VM {vm}: its host {host_name} lost datastore {} ({}); the VM's \
                             disk I/O waits until it returns, and the VM moves only to hosts \
                             that reach it",
                            c.name, c.detail
                        ))
                    };
                    tx.add_event(ev.vm(vm.clone()).host(Some(host_name.clone())), Utc::now())?;
                }
            }
            Ok::<_, CenterError>(())
        })
        .await;
    if let Err(e) = r {
        tracing::error!("recording datastore changes: {e}");
    }
}

/// Asks `host` now whether it reaches every datastore `spec`'s disks name; the reason, naming
/// the datastore, when it does not.
pub async fn check_host(app: &App, host: &HostRecord, spec: &VmSpec) -> Result<(), String> {
    let names = spec_datastores(spec);
    if names.is_empty() {
        return Ok(());
    }
    let all = app
        .db
        .read(|tx| Ok::<_, CenterError>(tx.datastores()?))
        .await
        .map_err(|e| e.to_string())?;
    let stores: Vec<Datastore> = all
        .into_iter()
        .filter(|d| names.contains(&d.name))
        .collect();
    if let Some(gone) = names.iter().find(|n| !stores.iter().any(|d| &d.name == *n)) {
        return Err(format!("datastore {gone} is no longer in the catalogue"));
    }
    let answers = refresh_host(app, host, &stores)
        .await
        .map_err(|e| e.to_string())?;
    let lacking: Vec<String> = answers
        .iter()
        .filter(|a| !a.reachable)
        .map(|a| format!("datastore {} ({})", a.name, a.detail))
        .collect();
    if lacking.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "host {} cannot reach {}",
            host.name,
            lacking.join(", ")
        ))
    }
}

/// Asks every connected host about every datastore each `datastore_check_ms`.
pub async fn monitor(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let period = Duration::from_millis(app.config.datastore_check_ms);
    loop {
        if !crate::app::tick(period, &mut shutdown).await {
            return;
        }
        let read = app
            .db
            .read(|tx| Ok::<_, CenterError>((tx.datastores()?, tx.hosts()?)))
            .await;
        let (stores, hosts) = match read {
            Ok(x) => x,
            Err(e) => {
                tracing::error!("datastore monitor: {e}");
                continue;
            }
        };
        if stores.is_empty() {
            continue;
        }
        let asks = hosts
            .iter()
            .filter(|h| h.link == crate::store::Link::Connected)
            .map(|h| refresh_host(&app, h, &stores));
        for r in futures::future::join_all(asks).await {
            if let Err(e) = r {
                tracing::debug!("datastore monitor: {e}");
            }
        }
    }
}

fn not_found(name: &str) -> CenterError {
    CenterError::not_found(format!(
        "no datastore named {name}: see tern datastore list"
    ))
}

/// Two backends that are the same storage (or, for directories, one inside the other: a
/// volume would then be in two datastores).
fn overlaps(a: &DatastoreBackend, b: &DatastoreBackend) -> bool {
    use DatastoreBackend as B;
    match (a, b) {
        (B::Directory { path: x }, B::Directory { path: y }) => {
            let (x, y) = (std::path::Path::new(x), std::path::Path::new(y));
            x.starts_with(y) || y.starts_with(x)
        }
        (B::Iscsi { portal: p, iqn: i }, B::Iscsi { portal: q, iqn: j }) => p == q && i == j,
        (B::Block { device_id: x }, B::Block { device_id: y }) => x == y,
        _ => false,
    }
}

pub async fn add(app: &Arc<App>, req: AddDatastore, by: String) -> Result<Datastore, CenterError> {
    if !tern_api::datastores::valid_datastore_name(&req.name) {
        return Err(CenterError::invalid(format!(
            "datastore name {:?} is not valid: 1 to 64 of a-z, 0-9, '.' and '-', starting \
             with a letter or digit, without '..'",
            req.name
        )));
    }
    req.backend.check().map_err(CenterError::invalid)?;
    let (name, backend) = (req.name.clone(), req.backend.clone());
    app.db
        .read(move |tx| {
            if tx.datastore(&name)?.is_some() {
                return Err(CenterError::conflict(format!(
                    "a datastore named {name} exists already; remove it first or pick another \
                     name"
                )));
            }
            if let Some(other) = tx
                .datastores()?
                .into_iter()
                .find(|d| overlaps(&d.backend, &backend))
            {
                return Err(CenterError::conflict(format!(
                    "datastore {} is already {} ({}); one storage is one datastore",
                    other.name,
                    other.backend.location(),
                    other.backend.kind()
                )));
            }
            Ok(())
        })
        .await?;
    let ds = Datastore {
        name: req.name.clone(),
        id: Uuid::new_v4().to_string(),
        backend: req.backend.clone(),
        added_at: Utc::now(),
        added_by: by.clone(),
        used_by: Vec::new(),
        hosts: Vec::new(),
    };
    // A directory gets its marker first, written by a host that sees it: from then on every
    // host can tell the shared directory from a local one.
    if let DatastoreBackend::Directory { path } = &ds.backend {
        let host = crate::images::storage_host(app).await?;
        app.agent(&host)
            .mark_datastore(&MarkDatastore {
                name: ds.name.clone(),
                id: ds.id.clone(),
                path: path.clone(),
            })
            .await
            .map_err(|e| {
                CenterError::unsatisfiable(format!(
                    "host {} cannot mark {path} as datastore {}: {}",
                    host.name,
                    ds.name,
                    crate::images::from_agent(e)
                ))
            })?;
    }
    let rec = ds.clone();
    let stored = app
        .db
        .write(move |tx| {
            if !tx.insert_datastore(&rec)? {
                return Ok(false);
            }
            tx.add_event(
                NewEvent::info(format!(
                    "datastore {} added: {} {}",
                    rec.name,
                    rec.backend.kind(),
                    rec.backend.location()
                ))
                .actor(by),
                Utc::now(),
            )?;
            Ok::<_, CenterError>(true)
        })
        .await?;
    if !stored {
        return Err(CenterError::conflict(format!(
            "a datastore named {} was added meanwhile by someone else",
            ds.name
        )));
    }
    // Ask the hosts now, so the answer shows who reaches it.
    let hosts = app.db.read(|tx| Ok::<_, CenterError>(tx.hosts()?)).await?;
    let one = [ds.clone()];
    let asks = hosts
        .iter()
        .filter(|h| h.link == crate::store::Link::Connected)
        .map(|h| refresh_host(app, h, &one));
    futures::future::join_all(asks).await;
    get(app, ds.name).await
}

/// Datastores with the VMs using them and the hosts' last answers.
pub async fn list(app: &Arc<App>) -> Result<Vec<Datastore>, CenterError> {
    let (stores, vms) = app
        .db
        .read(|tx| Ok::<_, CenterError>((tx.datastores()?, tx.vms()?)))
        .await?;
    Ok(stores
        .into_iter()
        .map(|mut d| {
            d.used_by = vms
                .iter()
                .filter(|v| spec_datastores(&v.spec).contains(&d.name))
                .map(|v| v.spec.name.clone())
                .collect();
            d.used_by.sort();
            d.hosts = app.datastore_reach.of_datastore(&d.name);
            d
        })
        .collect())
}

pub async fn get(app: &Arc<App>, name: String) -> Result<Datastore, CenterError> {
    list(app)
        .await?
        .into_iter()
        .find(|d| d.name == name)
        .ok_or_else(|| not_found(&name))
}

/// Removes a datastore no VM and no image uses. Its storage is left as it is.
pub async fn remove(app: &Arc<App>, name: String, by: String) -> Result<(), CenterError> {
    let n = name.clone();
    app.db
        .write(move |tx| {
            let ds = tx.datastore(&n)?.ok_or_else(|| not_found(&n))?;
            let mut users: Vec<String> = tx
                .vms()?
                .into_iter()
                .filter(|v| spec_datastores(&v.spec).contains(&n))
                .map(|v| v.spec.name.clone())
                .collect();
            if !users.is_empty() {
                users.sort();
                return Err(CenterError::conflict(format!(
                    "datastore {n} is in use by VM(s) {}: their disks are on it; move or \
                     delete them first",
                    users.join(", ")
                )));
            }
            let images: Vec<String> = tx
                .images()?
                .into_iter()
                .filter(|i| ds.backend.volume_of(&i.path).is_some())
                .map(|i| i.name)
                .collect();
            if !images.is_empty() {
                return Err(CenterError::conflict(format!(
                    "datastore {n} holds image(s) {}: remove them first",
                    images.join(", ")
                )));
            }
            tx.delete_datastore(&n)?;
            tx.add_event(
                NewEvent::info(format!("datastore {n} removed (its storage is untouched)"))
                    .actor(by),
                Utc::now(),
            )?;
            Ok::<_, CenterError>(())
        })
        .await?;
    app.datastore_reach.forget_datastore(&name);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_api::DiskSpec;

    fn store(name: &str, backend: DatastoreBackend) -> Datastore {
        Datastore {
            name: name.into(),
            id: "id".into(),
            backend,
            added_at: Utc::now(),
            added_by: "t".into(),
            used_by: vec![],
            hosts: vec![],
        }
    }

    fn stores() -> Vec<Datastore> {
        vec![
            store(
                "shared",
                DatastoreBackend::Directory {
                    path: "/srv/shared".into(),
                },
            ),
            store(
                "san",
                DatastoreBackend::Iscsi {
                    portal: "10.79.0.2:3260".parse().unwrap(),
                    iqn: "iqn.2026-12.lab.tern:san".into(),
                },
            ),
        ]
    }

    fn disk(path: &str, ds: Option<&str>, volume: Option<&str>) -> DiskSpec {
        DiskSpec {
            path: path.into(),
            format: Default::default(),
            readonly: false,
            bus: Default::default(),
            datastore: ds.map(Into::into),
            volume: volume.map(Into::into),
        }
    }

    fn spec_with(disks: Vec<DiskSpec>) -> VmSpec {
        VmSpec {
            firmware: Default::default(),
            cloud_init: None,
            resources: Default::default(),
            name: "vm1".into(),
            vcpus: 1,
            memory_mib: 64,
            cpu_model: None,
            boot: tern_api::BootSource::Disk,
            disks,
            nics: vec![],
        }
    }

    #[test]
    fn disks_get_their_paths_and_datastores() {
        let mut s = spec_with(vec![
            disk("", Some("san"), Some("2")),
            disk("/srv/shared/vms/a.qcow2", None, None),
            disk("/elsewhere/b.raw", None, None),
        ]);
        resolve_disks(&mut s, &stores()).unwrap();
        assert_eq!(
            s.disks[0].path,
            "iscsi://10.79.0.2:3260/iqn.2026-12.lab.tern:san/2"
        );
        assert_eq!(s.disks[1].datastore.as_deref(), Some("shared"));
        assert_eq!(s.disks[1].volume.as_deref(), Some("vms/a.qcow2"));
        assert_eq!(s.disks[2].datastore, None);
    }

    #[test]
    fn bad_disks_are_refused() {
        for d in [
            disk("", Some("shared"), Some("../etc/passwd")),
            disk("", Some("nope"), Some("a.raw")),
            disk("", Some("shared"), None),
            disk("/srv/shared/x.raw", Some("shared"), Some("y.raw")),
            disk("", Some("san"), Some("lun1")),
        ] {
            let mut s = spec_with(vec![d.clone()]);
            assert!(resolve_disks(&mut s, &stores()).is_err(), "{d:?}");
        }
    }

    #[test]
    fn one_storage_is_one_datastore() {
        let d = |p: &str| DatastoreBackend::Directory { path: p.into() };
        assert!(overlaps(&d("/srv/a"), &d("/srv/a/b")));
        assert!(overlaps(&d("/srv/a/b"), &d("/srv/a")));
        assert!(!overlaps(&d("/srv/a"), &d("/srv/ab")));
        assert!(overlaps(&stores()[1].backend, &stores()[1].backend));
    }
}
