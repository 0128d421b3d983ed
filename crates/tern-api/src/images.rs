//! Images: disk templates kept on the hosts' shared storage (`images/<name>.qcow2`), from
//! which VMs get their disks as linked clones (a qcow2 over the template) or full copies
//! (`vms/<vm>.qcow2`).
//!
//! The center keeps the catalogue; a host agent does the file work, on files it opens beneath
//! its shared storage (see `tern_host::images`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /api/v1/images`: stores a template from a file already on the shared storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportImage {
    /// Image name, `[a-z0-9][a-z0-9.-]{0,63}`.
    pub name: String,
    /// Absolute path of the source file on the shared storage (qcow2, or raw with `convert`).
    pub source: String,
    /// Accept a raw source and store it as qcow2.
    #[serde(default)]
    pub convert: bool,
}

/// An image in the catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Image {
    pub name: String,
    /// Where the template is, on every host's shared storage.
    pub path: String,
    /// The guest-visible disk size.
    pub virtual_size_bytes: u64,
    /// Bytes the template takes on the storage.
    pub file_size_bytes: u64,
    /// sha256 of the stored template file, recorded at import.
    pub sha256: String,
    /// What the source was (`qcow2`, or `raw` converted).
    pub source_format: String,
    pub imported_at: DateTime<Utc>,
    pub imported_by: String,
    /// VMs whose disk was made from this image (it cannot be removed while any remain).
    #[serde(default)]
    pub used_by: Vec<String>,
}

/// How a new VM's boot disk is made from an image (`CreateVm.image`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskFromImage {
    pub image: String,
    /// The new disk's size [default: the image's]; never smaller than the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// A full, independent copy instead of a linked clone (qcow2 over the template).
    #[serde(default)]
    pub full_copy: bool,
    /// How the guest sees the disk.
    #[serde(default, skip_serializing_if = "crate::DiskBus::is_default")]
    pub bus: crate::DiskBus,
    /// The datastore the disk goes on [default: the image's]. On an iSCSI datastore the disk
    /// is a LUN (`volume`) holding a full, raw copy of the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datastore: Option<String>,
    /// The volume on `datastore` (an iSCSI LUN number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
}

/// Agent API: `POST /v1/images/import`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportImageFile {
    pub name: String,
    pub source: String,
    pub convert: bool,
}

/// Agent API: what an import stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFile {
    pub path: String,
    pub virtual_size_bytes: u64,
    pub file_size_bytes: u64,
    pub sha256: String,
    pub source_format: String,
}

/// Agent API: `POST /v1/volumes/clone`: a VM's disk from an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneVolume {
    /// The image's name (its template is `images/<name>.qcow2` on the shared storage).
    pub image: String,
    /// The VM's name: the disk is `vms/<vm>.qcow2`.
    pub vm: String,
    pub size_bytes: Option<u64>,
    pub full_copy: bool,
    /// Write the copy onto this iSCSI LUN (`iscsi://IP:PORT/IQN/LUN`, raw) instead of a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lun: Option<String>,
}

/// Agent API: `POST /v1/images/remove` (the template) or `/v1/volumes/remove` (a VM's disk
/// made from an image): the name alone, the agent derives the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveFile {
    pub name: String,
}

/// Agent API: `POST /v1/nvram/remove`: a deleted UEFI VM's variables store
/// (`.tern/nvram/<id>.fd` on the shared storage), by the VM's id alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveNvram {
    pub id: uuid::Uuid,
}

/// Agent API: the disk a clone made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub path: String,
    pub virtual_size_bytes: u64,
}

/// Image names: lower-case letters, digits, `.` and `-`, starting with a letter or digit, so a
/// name is always one plain file name (no `..`, no `/`).
pub fn valid_image_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.len() <= 64
        && !name.contains("..")
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_are_plain_file_names() {
        for ok in ["debian-12", "ubuntu-24.04", "a"] {
            assert!(valid_image_name(ok), "{ok}");
        }
        for bad in [
            "",
            "../etc",
            "a/b",
            "a..b",
            ".hidden",
            "-x",
            "Debian",
            "a b",
            &"x".repeat(65),
        ] {
            assert!(!valid_image_name(bad), "{bad}");
        }
    }
}
