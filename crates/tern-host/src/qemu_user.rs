//! Which user each QEMU runs as.
//!
//! Every running VM gets a uid (and a gid of the same number) of its own, from a range no
//! login uses (`--qemu-uid-base`, 65,536 ids). Per VM, not per host: QEMUs sharing one uid
//! could ptrace each other or read each other's memory, so one compromised QEMU would hold
//! every guest of the host. No passwd entry is needed: the agent sets the ids between fork and
//! exec (`tern_qemu::RunAs`), as Firecracker's jailer does.
//!
//! What such a QEMU needs, and gets:
//! - its run dir and the files it opens there by name (tern-qemu chowns them at launch, and the
//!   migration key file when it is written);
//! - its taps, owned by its uid ([`crate::tap::ensure_tap`]);
//! - `/dev/kvm` through that device's group, when the host uses KVM;
//! - `/dev/userfaultfd` for post-copy: the agent gives the device to the range's own group
//!   (the base id, mode 0660) and every QEMU that group, so no other user gains it;
//! - the VM's files as descriptors the agent opened (disks through fd sets; kernel and initrd
//!   through `/proc/self/fd`, which re-opens them with QEMU's rights: they must be readable by
//!   others, as a distribution's kernel is).
//!
//! A uid is in use while a QEMU runs under it (read from `/proc/PID/status`, so QEMUs adopted
//! after an agent restart count) or while a launch holds it ([`Reserved`]).

use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tern_api::Accelerator;
use tern_qemu::RunAs;

/// Ids in the range: one per VM running at once.
pub const RANGE: u32 = 65_536;

/// The device that lets a process handle page faults of its own memory (post-copy).
const USERFAULTFD: &str = "/dev/userfaultfd";

/// The uid range of this host's QEMUs.
#[derive(Debug)]
pub struct QemuUsers {
    /// The range's own group; VM uids start right after it.
    base: u32,
    /// Supplementary groups of every QEMU.
    groups: Vec<u32>,
    launching: Mutex<HashSet<u32>>,
}

impl QemuUsers {
    /// Takes the range starting at `base` and prepares the devices QEMU needs.
    pub fn new(base: u32, accel: Accelerator) -> anyhow::Result<QemuUsers> {
        if base < 1000 || base.checked_add(RANGE).is_none() {
            anyhow::bail!(
                "--qemu-uid-base {base} must be at least 1000 and leave {RANGE} ids below 2^32"
            );
        }
        let mut groups = vec![base];
        if accel == Accelerator::Kvm {
            let kvm = std::fs::metadata("/dev/kvm").context("reading /dev/kvm")?;
            groups.push(kvm.gid());
        }
        give_userfaultfd(base);
        Ok(QemuUsers {
            base,
            groups,
            launching: Mutex::new(HashSet::new()),
        })
    }

    /// Reserves the lowest free uid, given the uids of the QEMUs running now.
    pub fn reserve(
        self: &Arc<Self>,
        running: impl IntoIterator<Item = u32>,
    ) -> anyhow::Result<Reserved> {
        let mut launching = self.launching.lock().unwrap_or_else(|p| p.into_inner());
        let used: HashSet<u32> = running
            .into_iter()
            .chain(launching.iter().copied())
            .collect();
        let uid = (self.base + 1..self.base + RANGE)
            .find(|u| !used.contains(u))
            .context("every QEMU uid of the range is in use")?;
        launching.insert(uid);
        Ok(Reserved {
            users: self.clone(),
            uid,
        })
    }

    /// Whether `uid` belongs to this range (a QEMU this agent would have started).
    pub fn contains(&self, uid: u32) -> bool {
        uid > self.base && uid < self.base + RANGE
    }
}

/// A uid held for a QEMU being started; released when dropped (by then the QEMU runs under
/// it, and counts as running, or failed).
#[derive(Debug)]
pub struct Reserved {
    users: Arc<QemuUsers>,
    uid: u32,
}

impl Reserved {
    pub fn run_as(&self) -> RunAs {
        RunAs {
            uid: self.uid,
            gid: self.uid,
            groups: self.users.groups.clone(),
        }
    }

    pub fn owner(&self) -> (u32, u32) {
        (self.uid, self.uid)
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.users
            .launching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.uid);
    }
}

/// Gives `/dev/userfaultfd` to the range's group (0660), so post-copy works for tern's QEMUs
/// and for no other unprivileged user. Without the device (kernels before 6.1) post-copy needs
/// `vm.unprivileged_userfaultfd=1`; the migration's pre-checks then fail it with QEMU's reason.
fn give_userfaultfd(group: u32) {
    let path = std::path::Path::new(USERFAULTFD);
    if !path.exists() {
        tracing::warn!(
            "{USERFAULTFD} is missing: post-copy needs vm.unprivileged_userfaultfd=1 for QEMUs \
             that run unprivileged"
        );
        return;
    }
    let r =
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(group))).and_then(|()| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
                .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)))
        });
    match r {
        Ok(()) => tracing::info!(group, "{USERFAULTFD} given to the QEMU users' group (0660)"),
        Err(e) => tracing::warn!("cannot give {USERFAULTFD} to the QEMU users: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users() -> Arc<QemuUsers> {
        Arc::new(QemuUsers {
            base: 400_000_000,
            groups: vec![400_000_000],
            launching: Mutex::new(HashSet::new()),
        })
    }

    #[test]
    fn each_running_or_starting_qemu_has_its_own_uid() {
        let u = users();
        let a = u.reserve([]).unwrap();
        assert_eq!(a.uid, 400_000_001);
        // Held while starting: the next start gets another.
        let b = u.reserve([]).unwrap();
        assert_eq!(b.uid, 400_000_002);
        // A running QEMU's uid is skipped; a released one is reused.
        drop(a);
        let c = u.reserve([400_000_001]).unwrap();
        assert_eq!(c.uid, 400_000_003);
        drop(c);
        let d = u.reserve([]).unwrap();
        assert_eq!(d.uid, 400_000_001);
        assert_eq!(d.run_as().groups, vec![400_000_000]);
        assert!(u.contains(400_000_001) && !u.contains(400_000_000) && !u.contains(0));
    }

    #[test]
    fn a_range_that_does_not_fit_is_refused() {
        assert!(QemuUsers::new(10, Accelerator::Tcg).is_err());
        assert!(QemuUsers::new(u32::MAX - 10, Accelerator::Tcg).is_err());
    }
}
