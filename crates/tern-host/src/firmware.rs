//! UEFI for VMs that ask for it: the host's OVMF code, and each VM's own variables store.
//!
//! The variables store is where the guest's firmware keeps its boot entries, so it belongs to
//! the VM, not the host: it lives on the shared storage at `.tern/nvram/<vm id>.fd`, is made
//! from the host's empty template the first time the VM starts, and is handed over between
//! hosts like a disk (QEMU flushes and inactivates it on the source, the destination takes the
//! write lock). The path is derived from the VM's id, never taken from a spec.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tern_qemu::{SharedFd, UefiFiles};
use uuid::Uuid;

use crate::paths::{open_beneath, OpenError};

/// Debian's `ovmf` package: the 4 MiB build (the 2 MiB one cannot hold Secure Boot's keys, and
/// the size must be the same on every host a VM moves between).
pub const DEFAULT_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const DEFAULT_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// Directory under the shared storage holding the VMs' variables stores.
pub const NVRAM_DIR: &str = ".tern/nvram";

/// The host's UEFI firmware files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UefiFirmware {
    pub code: PathBuf,
    pub vars_template: PathBuf,
}

/// Why a UEFI VM cannot start here.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error(
        "this host has no UEFI firmware: {0} is missing (install Debian's ovmf, or set \
         --uefi-code and --uefi-vars-template)"
    )]
    Missing(String),
    #[error("a UEFI VM keeps its variables on shared storage, and this host has none")]
    NoSharedStorage,
    #[error(
        "UEFI variables of VM {0} are not on the shared storage ({1}); it was never started \
         with UEFI, or the store was removed"
    )]
    NoVars(Uuid, String),
    #[error("UEFI variables: {0}")]
    Open(#[from] OpenError),
    #[error("making the UEFI variables store {0}: {1}")]
    Io(String, std::io::Error),
}

impl UefiFirmware {
    /// Whether this host can start UEFI VMs (both files present).
    pub fn available(&self) -> bool {
        self.code.is_file() && self.vars_template.is_file()
    }

    /// The VM's variables store under `root`.
    pub fn vars_path(root: &Path, id: Uuid) -> PathBuf {
        root.join(NVRAM_DIR).join(format!("{id}.fd"))
    }

    /// Opens the code and the VM's variables for QEMU. `create`: make the store from the
    /// template when the VM has none yet (a start; a migration destination never creates one).
    pub fn open(&self, root: &Path, id: Uuid, create: bool) -> Result<UefiFiles, FirmwareError> {
        for f in [&self.code, &self.vars_template] {
            if !f.is_file() {
                return Err(FirmwareError::Missing(f.display().to_string()));
            }
        }
        let vars = Self::vars_path(root, id);
        if !vars.exists() {
            if !create {
                return Err(FirmwareError::NoVars(id, vars.display().to_string()));
            }
            self.make_vars(&vars)?;
        }
        let io = |e| FirmwareError::Io(self.code.display().to_string(), e);
        let code = std::fs::File::open(&self.code).map_err(io)?;
        let vars = vars.to_string_lossy();
        Ok(UefiFiles {
            code: SharedFd(Arc::new(code.into())),
            vars_read: SharedFd(Arc::new(open_beneath(root, &vars, false, true)?)),
            vars_write: SharedFd(Arc::new(open_beneath(root, &vars, true, true)?)),
        })
    }

    /// Copies the template next to `vars` and links it into place: the store appears whole,
    /// and two hosts racing to make it cannot overwrite one another.
    fn make_vars(&self, vars: &Path) -> Result<(), FirmwareError> {
        let io = |e| FirmwareError::Io(vars.display().to_string(), e);
        let dir = vars.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            vars.file_name().and_then(|n| n.to_str()).unwrap_or("vars"),
            std::process::id()
        ));
        std::fs::copy(&self.vars_template, &tmp).map_err(io)?;
        let linked = std::fs::hard_link(&tmp, vars);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_is_made_once_and_found_by_a_destination() {
        let fw_dir = tempfile::tempdir().unwrap();
        let shared = tempfile::tempdir().unwrap();
        let fw = UefiFirmware {
            code: fw_dir.path().join("code.fd"),
            vars_template: fw_dir.path().join("vars.fd"),
        };
        let id = Uuid::from_u128(3);
        assert!(matches!(
            fw.open(shared.path(), id, true),
            Err(FirmwareError::Missing(_))
        ));
        std::fs::write(&fw.code, vec![1u8; 4096]).unwrap();
        std::fs::write(&fw.vars_template, vec![2u8; 4096]).unwrap();
        assert!(fw.available());
        assert!(matches!(
            fw.open(shared.path(), id, false),
            Err(FirmwareError::NoVars(..))
        ));
        fw.open(shared.path(), id, true).unwrap();
        let path = UefiFirmware::vars_path(shared.path(), id);
        // The guest's writes survive: a second open never copies the template again.
        std::fs::write(&path, vec![9u8; 4096]).unwrap();
        fw.open(shared.path(), id, true).unwrap();
        fw.open(shared.path(), id, false).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), vec![9u8; 4096]);
    }
}
