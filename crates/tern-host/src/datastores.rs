//! What this host reaches of the cluster's datastores, checked rather than assumed.
//!
//! - A directory must lie beneath this host's storage root and hold the datastore's marker with
//!   the datastore's id: a missing mount leaves an empty (or local) directory at the same path,
//!   and that must not pass for the shared one.
//! - An iSCSI target's portal must accept a TCP connection from this host's namespace (what
//!   QEMU's initiator does first).
//! - A block device's `/dev/disk/by-id` name must resolve to a block device.

use std::path::Path;
use std::time::Duration;

use tern_api::datastores::{
    DatastoreBackend, DatastoreProbe, DatastoreReach, MarkDatastore, Marker,
};

/// How long a portal may take to accept a connection before it counts as unreachable.
const PORTAL_TIMEOUT: Duration = Duration::from_secs(2);

/// Answers for each datastore, in the order asked.
pub fn probe(root: Option<&Path>, datastores: &[DatastoreProbe]) -> Vec<DatastoreReach> {
    datastores
        .iter()
        .map(|d| {
            let (reachable, detail) = match reach(root, d) {
                Ok(detail) => (true, detail),
                Err(why) => (false, why),
            };
            DatastoreReach {
                name: d.name.clone(),
                reachable,
                detail,
            }
        })
        .collect()
}

fn reach(root: Option<&Path>, d: &DatastoreProbe) -> Result<String, String> {
    d.backend.check()?;
    match &d.backend {
        DatastoreBackend::Directory { path } => {
            let dir = beneath_root(root, path)?;
            let marker = dir.join(tern_api::datastores::MARKER_FILE);
            let text = std::fs::read_to_string(&marker).map_err(|e| {
                format!(
                    "{path} has no readable datastore marker ({e}): it is not the shared \
                     directory the other hosts see (is the storage mounted here?)"
                )
            })?;
            let found: Marker = serde_json::from_str(&text)
                .map_err(|e| format!("{}: not a datastore marker: {e}", marker.display()))?;
            if found.id != d.id {
                return Err(format!(
                    "{path} holds the marker of datastore {} ({}), not of {} ({}): another \
                     storage is mounted there",
                    found.name, found.id, d.name, d.id
                ));
            }
            Ok(format!("{path} mounted, marker {} found", d.id))
        }
        DatastoreBackend::Iscsi { portal, .. } => {
            std::net::TcpStream::connect_timeout(portal, PORTAL_TIMEOUT)
                .map_err(|e| format!("portal {portal}: {e}"))?;
            Ok(format!("portal {portal} accepts connections"))
        }
        DatastoreBackend::Block { device_id } => {
            let p = Path::new("/dev/disk/by-id").join(device_id);
            let meta = std::fs::metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_block_device() {
                return Err(format!("{} is not a block device", p.display()));
            }
            Ok(format!("{} is a block device", p.display()))
        }
    }
}

/// `path` resolved (symlinks and all), when it is a directory beneath the storage root.
fn beneath_root(root: Option<&Path>, path: &str) -> Result<std::path::PathBuf, String> {
    let Some(root) = root else {
        return Err("this host has no storage root (--shared-storage)".into());
    };
    let root = root
        .canonicalize()
        .map_err(|e| format!("storage root {}: {e}", root.display()))?;
    let dir = Path::new(path)
        .canonicalize()
        .map_err(|e| format!("{path}: {e}"))?;
    if !dir.starts_with(&root) {
        return Err(format!(
            "{path} is not beneath this host's storage root {}: the agent opens VM storage \
             only there",
            root.display()
        ));
    }
    if !dir.is_dir() {
        return Err(format!("{path} is not a directory"));
    }
    Ok(dir)
}

/// Writes a directory datastore's marker (replacing it atomically, so a host reading it
/// never sees half of one).
pub fn mark(root: Option<&Path>, req: &MarkDatastore) -> Result<(), String> {
    DatastoreBackend::Directory {
        path: req.path.clone(),
    }
    .check()?;
    if !tern_api::datastores::valid_datastore_name(&req.name)
        || req.id.is_empty()
        || req.id.len() > 64
        || !req.id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
    {
        return Err(format!(
            "datastore {:?} / id {:?} is not valid",
            req.name, req.id
        ));
    }
    let dir = beneath_root(root, &req.path)?;
    let marker = dir.join(tern_api::datastores::MARKER_FILE);
    let tmp = dir.join(format!("{}.{}", tern_api::datastores::MARKER_FILE, req.id));
    let text = serde_json::to_string(&Marker {
        name: req.name.clone(),
        id: req.id.clone(),
    })
    .map_err(|e| e.to_string())?;
    std::fs::write(&tmp, text + "\n").map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &marker).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: {e}", marker.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_probe(path: &Path, id: &str) -> DatastoreProbe {
        DatastoreProbe {
            name: "ds1".into(),
            id: id.into(),
            backend: DatastoreBackend::Directory {
                path: path.display().to_string(),
            },
        }
    }

    #[test]
    fn a_directory_counts_only_with_its_marker() {
        let root = tempfile::tempdir().unwrap();
        let ds = root.path().join("ds1");
        std::fs::create_dir(&ds).unwrap();
        let id = "0b6f1f7e-1d2a-4a55-9f8e-3f9b2c1d0a11";
        // An empty directory at the path: a mount that is missing.
        let r = probe(Some(root.path()), &[dir_probe(&ds, id)]);
        assert!(!r[0].reachable && r[0].detail.contains("marker"), "{r:?}");
        mark(
            Some(root.path()),
            &MarkDatastore {
                name: "ds1".into(),
                id: id.into(),
                path: ds.display().to_string(),
            },
        )
        .unwrap();
        let r = probe(Some(root.path()), &[dir_probe(&ds, id)]);
        assert!(r[0].reachable, "{r:?}");
        // Another datastore's marker: some other storage is mounted there.
        let r = probe(
            Some(root.path()),
            &[dir_probe(&ds, "99999999-1d2a-4a55-9f8e-3f9b2c1d0a11")],
        );
        assert!(!r[0].reachable && r[0].detail.contains("another"), "{r:?}");
    }

    #[test]
    fn nothing_outside_the_root_is_reached_or_marked() {
        let root = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let id = "0b6f1f7e-1d2a-4a55-9f8e-3f9b2c1d0a11";
        // A symlink inside the root pointing out of it.
        std::os::unix::fs::symlink(other.path(), root.path().join("link")).unwrap();
        let req = MarkDatastore {
            name: "ds1".into(),
            id: id.into(),
            path: root.path().join("link").display().to_string(),
        };
        assert!(mark(Some(root.path()), &req)
            .unwrap_err()
            .contains("not beneath"));
        assert!(!other
            .path()
            .join(tern_api::datastores::MARKER_FILE)
            .exists());
        let r = probe(Some(root.path()), &[dir_probe(other.path(), id)]);
        assert!(
            !r[0].reachable && r[0].detail.contains("not beneath"),
            "{r:?}"
        );
        assert!(!probe(None, &[dir_probe(other.path(), id)])[0].reachable);
    }

    #[test]
    fn a_closed_portal_is_unreachable() {
        let ask = |portal| {
            probe(
                None,
                &[DatastoreProbe {
                    name: "san".into(),
                    id: "x".into(),
                    backend: DatastoreBackend::Iscsi {
                        portal,
                        iqn: "iqn.2026-12.lab.tern:san".into(),
                    },
                }],
            )
            .remove(0)
        };
        // A port nobody listens on: bind one, learn its number, close it.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let portal = l.local_addr().unwrap();
        let open = ask(portal);
        assert!(open.reachable, "{open:?}");
        drop(l);
        let closed = ask(portal);
        assert!(
            !closed.reachable && closed.detail.contains("refused"),
            "{closed:?}"
        );
    }
}
