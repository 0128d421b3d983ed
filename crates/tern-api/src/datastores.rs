//! Datastores: the named storage a VM's disks live on, and what each host reaches of them.
//!
//! A datastore is a directory every host mounts (NFS, a cluster file system), an iSCSI target
//! whose LUNs QEMU opens with its own initiator, or a block device named by its stable
//! `/dev/disk/by-id` name. A disk names a datastore and a volume in it; the center turns that
//! into the path or URL a host opens (see [`DatastoreBackend::locate`]), so no host path comes
//! from a user. Hosts are asked, on a period and before every placement or migration, which
//! datastores they reach; the answer is checked, not assumed (a directory must hold the
//! datastore's marker, so a host's empty local directory is not taken for the shared one).

use std::net::SocketAddr;
use std::path::{Component, Path};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The file a directory datastore holds at its top, naming it: the check that a host's
/// directory is the shared one and not a local stand-in.
pub const MARKER_FILE: &str = ".tern-datastore";

/// Where a datastore's volumes are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DatastoreBackend {
    /// A directory at the same path on every host (an NFS or cluster file system mount),
    /// beneath the hosts' storage root (`--shared-storage`); volumes are files in it.
    Directory { path: String },
    /// An iSCSI target that QEMU opens with its userspace initiator; volumes are its LUNs,
    /// named by number (`"1"`).
    Iscsi {
        #[schema(value_type = String, example = "10.79.0.2:3260")]
        portal: SocketAddr,
        /// The target's IQN (or EUI/NAA name).
        iqn: String,
    },
    /// A multipath or FC LUN every host sees, by its `/dev/disk/by-id` name; the one volume is
    /// the whole device (`"disk"`, raw), opened by the agent and handed to QEMU.
    Block { device_id: String },
}

/// The name of the one volume of a block datastore.
pub const BLOCK_VOLUME: &str = "disk";

/// Longest path a directory datastore or volume may have.
const MAX_PATH: usize = 1024;

impl DatastoreBackend {
    /// The kind, as the CLI and events write it.
    pub fn kind(&self) -> &'static str {
        match self {
            DatastoreBackend::Directory { .. } => "directory",
            DatastoreBackend::Iscsi { .. } => "iscsi",
            DatastoreBackend::Block { .. } => "block",
        }
    }

    /// Where it is, in one line (`/srv/ds1`, `10.79.0.2:3260 iqn…`, `/dev/disk/by-id/…`).
    pub fn location(&self) -> String {
        match self {
            DatastoreBackend::Directory { path } => path.clone(),
            DatastoreBackend::Iscsi { portal, iqn } => format!("{portal} {iqn}"),
            DatastoreBackend::Block { device_id } => {
                format!("{}/{device_id}", crate::spec::BY_ID_DIR)
            }
        }
    }

    /// Checks what a user wrote; the reason when it is not usable.
    pub fn check(&self) -> Result<(), String> {
        match self {
            DatastoreBackend::Directory { path } => {
                let p = Path::new(path);
                if path.len() > MAX_PATH
                    || !p.is_absolute()
                    || p.components().any(|c| c == Component::ParentDir)
                    || path.chars().any(char::is_control)
                    || p.parent().is_none()
                {
                    return Err(format!(
                        "directory {path:?} must be an absolute path (not /) without '..' or \
                         control characters, at most {MAX_PATH} bytes"
                    ));
                }
                Ok(())
            }
            DatastoreBackend::Iscsi { portal, iqn } => {
                if !crate::spec::valid_iscsi_name(iqn) {
                    return Err(format!(
                        "{iqn:?} is not an iSCSI name: iqn.YYYY-MM.reversed.domain[:name] (or \
                         eui./naa.), lower-case"
                    ));
                }
                if portal.port() == 0 || portal.ip().is_unspecified() {
                    return Err(format!("portal {portal} needs a real address and port"));
                }
                Ok(())
            }
            DatastoreBackend::Block { device_id } => {
                if !crate::spec::valid_device_id(device_id) {
                    return Err(format!(
                        "device id {device_id:?} must be one /dev/disk/by-id name: letters, \
                         digits, '-', '_', '.', ':' and '+', not starting with '.'"
                    ));
                }
                Ok(())
            }
        }
    }

    /// The path or URL a host opens for `volume` of this datastore; the reason when the
    /// volume name cannot be one of it. Directory volumes are relative paths of plain
    /// components (no `..`, none starting with '.', so the marker and tern's own
    /// `.tern/` stay out of reach).
    pub fn locate(&self, volume: &str) -> Result<String, String> {
        match self {
            DatastoreBackend::Directory { path } => {
                let good = |c: &str| {
                    !c.is_empty()
                        && !c.starts_with('.')
                        && c.len() <= 255
                        && c.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                };
                if volume.len() > MAX_PATH || !volume.split('/').all(good) {
                    return Err(format!(
                        "volume {volume:?} must be a relative path in the datastore: components \
                         of letters, digits, '-', '_' and '.', none empty or starting with '.' \
                         (so no '..')"
                    ));
                }
                Ok(format!("{}/{volume}", path.trim_end_matches('/')))
            }
            DatastoreBackend::Iscsi { portal, iqn } => {
                let lun = volume
                    .parse::<u16>()
                    .ok()
                    .filter(|l| *l < 16384 && volume.len() <= 5);
                match lun {
                    Some(lun) => Ok(crate::spec::IscsiLun {
                        portal: *portal,
                        target: iqn.clone(),
                        lun,
                    }
                    .url()),
                    None => Err(format!(
                        "volume {volume:?} of an iSCSI datastore is a LUN number (0 to 16383)"
                    )),
                }
            }
            DatastoreBackend::Block { device_id } => {
                if volume != BLOCK_VOLUME {
                    return Err(format!(
                        "a block datastore has one volume, {BLOCK_VOLUME:?} (the whole device)"
                    ));
                }
                Ok(format!("{}/{device_id}", crate::spec::BY_ID_DIR))
            }
        }
    }

    /// The volume `location` (a path or URL) is in this datastore, when it is one.
    pub fn volume_of(&self, location: &str) -> Option<String> {
        let volume = match self {
            DatastoreBackend::Directory { path } => location
                .strip_prefix(path.trim_end_matches('/'))?
                .strip_prefix('/')?
                .to_string(),
            DatastoreBackend::Iscsi { portal, iqn } => {
                let lun = crate::spec::IscsiLun::parse(location)?;
                if lun.portal != *portal || &lun.target != iqn {
                    return None;
                }
                lun.lun.to_string()
            }
            DatastoreBackend::Block { .. } => BLOCK_VOLUME.to_string(),
        };
        // Only a volume that locates back to the same place is one of ours.
        (self.locate(&volume).ok()? == location).then_some(volume)
    }
}

/// `POST /api/v1/datastores`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddDatastore {
    /// `[a-z0-9][a-z0-9.-]{0,63}`.
    pub name: String,
    pub backend: DatastoreBackend,
}

/// What one host found of a datastore, last time it was asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostReach {
    pub host: String,
    pub reachable: bool,
    /// What was checked, or why it is not reachable.
    pub detail: String,
    pub checked_at: DateTime<Utc>,
}

/// A datastore in the catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Datastore {
    pub name: String,
    /// Written into a directory datastore's marker; changes when a datastore is re-added.
    pub id: String,
    pub backend: DatastoreBackend,
    pub added_at: DateTime<Utc>,
    pub added_by: String,
    /// VMs with a disk on it (it cannot be removed while any remain).
    #[serde(default)]
    pub used_by: Vec<String>,
    /// Each connected host's last answer (empty until the first check).
    #[serde(default)]
    pub hosts: Vec<HostReach>,
}

/// Agent API: `POST /v1/datastores/probe`: which of these does the host reach?
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeDatastores {
    pub datastores: Vec<DatastoreProbe>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatastoreProbe {
    pub name: String,
    pub id: String,
    pub backend: DatastoreBackend,
}

/// Agent API: one datastore's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatastoreReach {
    pub name: String,
    pub reachable: bool,
    pub detail: String,
}

/// Agent API: `POST /v1/datastores/mark`: write a directory datastore's marker (when it is
/// added), so every host can tell the shared directory from a local one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarkDatastore {
    pub name: String,
    pub id: String,
    /// The directory (checked again by the agent: beneath its storage root).
    pub path: String,
}

/// What a directory datastore's marker file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub name: String,
    pub id: String,
}

/// Datastore names: as image names, one plain word.
pub fn valid_datastore_name(name: &str) -> bool {
    crate::images::valid_image_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(p: &str) -> DatastoreBackend {
        DatastoreBackend::Directory { path: p.into() }
    }

    fn san() -> DatastoreBackend {
        DatastoreBackend::Iscsi {
            portal: "10.79.0.2:3260".parse().unwrap(),
            iqn: "iqn.2026-12.lab.tern:san".into(),
        }
    }

    #[test]
    fn bad_backends_are_refused() {
        for p in ["relative/x", "/a/../b", "/", "/a\nb", ""] {
            assert!(dir(p).check().is_err(), "{p:?}");
        }
        assert!(dir("/srv/ds1").check().is_ok());
        let bad_iqn = DatastoreBackend::Iscsi {
            portal: "10.0.0.1:3260".parse().unwrap(),
            iqn: "IQN.Upper;rm".into(),
        };
        assert!(bad_iqn.check().is_err());
        let unspecified = DatastoreBackend::Iscsi {
            portal: "0.0.0.0:3260".parse().unwrap(),
            iqn: "iqn.2026-12.lab.tern:san".into(),
        };
        assert!(unspecified.check().is_err());
        assert!(san().check().is_ok());
        for id in ["../sda", "a/b", ".hidden", "", "x y"] {
            let b = DatastoreBackend::Block {
                device_id: id.into(),
            };
            assert!(b.check().is_err(), "{id:?}");
        }
        let wwn = DatastoreBackend::Block {
            device_id: "wwn-0x5000c500a1b2c3d4".into(),
        };
        assert!(wwn.check().is_ok());
    }

    #[test]
    fn volumes_cannot_climb_out() {
        let d = dir("/srv/ds1/");
        for v in [
            "../etc/passwd",
            "a/../../b",
            "/abs",
            ".tern/nvram/x.fd",
            "a//b",
            "",
            "a/.",
        ] {
            assert!(d.locate(v).is_err(), "{v:?}");
        }
        assert_eq!(d.locate("vms/a.qcow2").unwrap(), "/srv/ds1/vms/a.qcow2");
        assert!(san().locate("x").is_err());
        assert!(san().locate("16384").is_err());
        assert_eq!(
            san().locate("3").unwrap(),
            "iscsi://10.79.0.2:3260/iqn.2026-12.lab.tern:san/3"
        );
    }

    #[test]
    fn a_location_maps_back_to_its_volume() {
        let d = dir("/srv/ds1");
        assert_eq!(
            d.volume_of("/srv/ds1/vms/a.qcow2").as_deref(),
            Some("vms/a.qcow2")
        );
        assert_eq!(d.volume_of("/srv/ds10/a.qcow2"), None);
        assert_eq!(d.volume_of("/srv/ds1/../x"), None);
        assert_eq!(
            san()
                .volume_of("iscsi://10.79.0.2:3260/iqn.2026-12.lab.tern:san/2")
                .as_deref(),
            Some("2")
        );
        assert_eq!(
            san().volume_of("iscsi://10.79.0.3:3260/iqn.2026-12.lab.tern:san/2"),
            None
        );
    }

    #[test]
    fn the_backend_reads_as_json_with_its_kind() {
        let b: DatastoreBackend = serde_json::from_str(
            r#"{"kind":"iscsi","portal":"10.79.0.2:3260","iqn":"iqn.2026-12.lab.tern:san"}"#,
        )
        .unwrap();
        assert_eq!(b, san());
        assert!(serde_json::from_str::<DatastoreBackend>(
            r#"{"kind":"directory","path":"/x","extra":1}"#
        )
        .is_err());
    }
}
