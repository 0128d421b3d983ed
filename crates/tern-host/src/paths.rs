//! The files a VM spec names: checked (present on this host, on its shared storage) and
//! opened for QEMU without leaving the shared storage.
//!
//! The check resolves paths for a clear answer before anything starts; the opening is what
//! confines. It resolves each path with `openat2(RESOLVE_BENEATH)` under a descriptor of the
//! storage root, so no `..`, absolute symlink or symlink pointing out can lead outside it, and
//! QEMU gets the descriptors instead of paths: a path swapped for a symlink after the check
//! changes nothing QEMU opens.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{open, openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, Mode, SFlag};
use tern_api::agent::PathsReport;
use tern_api::{BootSource, DiskFormat, VmSpec};
use tern_qemu::{OpenedBacking, OpenedFile, SharedFd};

/// Sorts `paths` into missing (absent or not a regular file) and outside the shared storage
/// (after resolving symlinks and `..`, so a link cannot smuggle a local file in). Without a
/// shared storage root every existing path is outside it.
pub fn check(paths: &[String], shared_storage: Option<&Path>) -> PathsReport {
    let root = shared_storage.and_then(|r| match r.canonicalize() {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(root = %r.display(), error = %e, "shared storage root cannot be resolved");
            None
        }
    });
    let mut report = PathsReport::default();
    for p in paths {
        if p.starts_with(tern_api::IscsiLun::SCHEME) {
            if let Some(why) = iscsi_unreachable(p) {
                report.unreachable.push(why);
            }
            continue;
        }
        if p.starts_with(tern_api::BY_ID_DIR) {
            // A block datastore's device: present here, and a block device.
            if open_device(p, false).is_err() {
                report.missing.push(p.clone());
            }
            continue;
        }
        match Path::new(p).canonicalize() {
            Ok(c) if c.is_file() => {
                if !root.as_ref().is_some_and(|r| c.starts_with(r)) {
                    report.outside_shared_storage.push(p.clone());
                }
            }
            _ => report.missing.push(p.clone()),
        }
    }
    report
}

/// How long a host waits for an iSCSI portal to accept a connection before calling it
/// unreachable: a LAN answers in milliseconds; a silent one is as good as down.
const PORTAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether this host reaches the portal of LUN `url` (a TCP connection to it, as QEMU's
/// initiator would make from the same network namespace); `Some(reason)` when not.
fn iscsi_unreachable(url: &str) -> Option<String> {
    let Some(lun) = tern_api::IscsiLun::parse(url) else {
        return Some(format!("{url} (not an iscsi://IP:PORT/IQN/LUN URL)"));
    };
    match std::net::TcpStream::connect_timeout(&lun.portal, PORTAL_TIMEOUT) {
        Ok(_) => None,
        Err(e) => Some(format!("{url} (its portal {}: {e})", lun.portal)),
    }
}

/// Why a file of a spec could not be opened for QEMU.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error("{0} is not a file on this host")]
    Missing(String),
    #[error("{0} is outside this host's shared storage {1}: a VM may only use files there")]
    Outside(String, String),
    #[error("cannot open {0}: {1}")]
    Other(String, String),
    #[error("disk {0}: {1}")]
    Image(String, crate::qcow2::HeaderError),
    #[error("disk {0}: its backing chain is deeper than {MAX_BACKING_DEPTH} images")]
    ChainTooDeep(String),
}

/// Deepest backing chain a disk may have (a template, its clone, a snapshot or two).
pub const MAX_BACKING_DEPTH: usize = 8;

/// Opens `path`, which must lie under `root`, without its resolution leaving `root`: `..`,
/// absolute symlinks, symlinks pointing out and magic links are refused. Must be a regular
/// file. `write` opens it read-write; `direct` adds O_DIRECT (a disk QEMU uses uncached).
pub fn open_beneath(
    root: &Path,
    path: &str,
    write: bool,
    direct: bool,
) -> Result<OwnedFd, OpenError> {
    let outside = || OpenError::Outside(path.to_string(), root.display().to_string());
    let other = |e: Errno| OpenError::Other(path.to_string(), e.desc().to_string());
    let canonical = root
        .canonicalize()
        .map_err(|e| OpenError::Other(root.display().to_string(), e.to_string()))?;
    let p = Path::new(path);
    // The spec may name the root as configured or as resolved; the rest is resolved below it.
    let rel = p
        .strip_prefix(root)
        .or_else(|_| p.strip_prefix(&canonical))
        .map_err(|_| outside())?;
    if !p.is_absolute() || rel.as_os_str().is_empty() {
        return Err(outside());
    }
    let dir = open(
        &canonical,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(other)?;
    let mut flags = OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK;
    flags |= if write {
        OFlag::O_RDWR
    } else {
        OFlag::O_RDONLY
    };
    if direct {
        flags |= OFlag::O_DIRECT;
    }
    let how = OpenHow::new()
        .flags(flags)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = match openat2(&dir, rel, how) {
        Ok(fd) => fd,
        Err(Errno::EXDEV | Errno::ELOOP) => return Err(outside()),
        Err(Errno::ENOENT | Errno::ENOTDIR) => return Err(OpenError::Missing(path.to_string())),
        Err(e) => return Err(other(e)),
    };
    let st = fstat(&fd).map_err(other)?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(OpenError::Missing(path.to_string()));
    }
    // O_NONBLOCK only kept a FIFO from blocking the open; QEMU wants ordinary blocking I/O.
    let keep = if direct {
        OFlag::O_DIRECT
    } else {
        OFlag::empty()
    };
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(keep)).map_err(other)?;
    Ok(fd)
}

/// Opens the block device `path` (`/dev/disk/by-id/ID`) without its resolution leaving
/// `/dev`: udev's by-id names are relative links to the device (`../../sdb`); anything else
/// (a link out of /dev, a magic link, a file that is not a block device) is refused. `write`
/// opens it read-write; both are O_DIRECT (QEMU uses the disk uncached).
pub fn open_device(path: &str, write: bool) -> Result<OwnedFd, OpenError> {
    let other = |e: Errno| OpenError::Other(path.to_string(), e.desc().to_string());
    let id = path
        .strip_prefix(tern_api::BY_ID_DIR)
        .and_then(|r| r.strip_prefix('/'))
        .filter(|id| tern_api::valid_device_id(id))
        .ok_or_else(|| OpenError::Missing(path.to_string()))?;
    let dev = open(
        "/dev",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(other)?;
    let mut flags = OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_DIRECT;
    flags |= if write {
        OFlag::O_RDWR
    } else {
        OFlag::O_RDONLY
    };
    let how = OpenHow::new()
        .flags(flags)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let rel = format!("disk/by-id/{id}");
    let fd = match openat2(&dev, rel.as_str(), how) {
        Ok(fd) => fd,
        Err(Errno::ENOENT | Errno::ENOTDIR | Errno::EXDEV | Errno::ELOOP) => {
            return Err(OpenError::Missing(path.to_string()))
        }
        Err(e) => return Err(other(e)),
    };
    let st = fstat(&fd).map_err(other)?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFBLK {
        return Err(OpenError::Missing(path.to_string()));
    }
    Ok(fd)
}

/// Opens every file of `spec` for QEMU under `root` (see [`open_beneath`]): kernel and initrd
/// read-only, each disk read-only and, unless it is read-only, read-write, both O_DIRECT.
pub fn open_for_qemu(spec: &VmSpec, root: &Path) -> Result<Vec<OpenedFile>, OpenError> {
    let mut out = Vec::new();
    if let BootSource::Kernel { kernel, initrd, .. } = &spec.boot {
        for p in std::iter::once(kernel).chain(initrd) {
            out.push(OpenedFile {
                path: p.clone(),
                read: Arc::new(open_beneath(root, p, false, false)?),
                write: None,
                backing: Vec::new(),
                block_device: false,
            });
        }
    }
    // iSCSI LUNs are opened by QEMU's own initiator, over the network.
    for d in spec.disks.iter().filter(|d| d.block_device().is_some()) {
        out.push(OpenedFile {
            path: d.path.clone(),
            read: Arc::new(open_device(&d.path, false)?),
            write: if d.readonly {
                None
            } else {
                Some(Arc::new(open_device(&d.path, true)?))
            },
            backing: Vec::new(),
            block_device: true,
        });
    }
    for d in spec
        .disks
        .iter()
        .filter(|d| !d.is_iscsi() && d.block_device().is_none())
    {
        let write = if d.readonly {
            None
        } else {
            Some(Arc::new(open_beneath(root, &d.path, true, true)?))
        };
        out.push(OpenedFile {
            path: d.path.clone(),
            read: Arc::new(open_beneath(root, &d.path, false, true)?),
            write,
            backing: match d.format {
                DiskFormat::Qcow2 => open_backing_chain(root, &d.path)?,
                DiskFormat::Raw => Vec::new(),
            },
            block_device: false,
        });
    }
    Ok(out)
}

/// Opens the images under the qcow2 image at `path`, nearest first, each beneath `root` like
/// the disk itself: a header naming `/etc/shadow` or `../../elsewhere` is refused the same way
/// a spec naming it would be.
fn open_backing_chain(root: &Path, path: &str) -> Result<Vec<OpenedBacking>, OpenError> {
    let mut chain = Vec::new();
    let mut image = path.to_string();
    let mut format = DiskFormat::Qcow2;
    while format == DiskFormat::Qcow2 {
        // A cached descriptor for the header: the disk's own are O_DIRECT (aligned reads only).
        let header = std::fs::File::from(open_beneath(root, &image, false, false)?);
        let Some(backing) =
            crate::qcow2::backing(header).map_err(|e| OpenError::Image(image.clone(), e))?
        else {
            break;
        };
        if chain.len() == MAX_BACKING_DEPTH {
            return Err(OpenError::ChainTooDeep(path.to_string()));
        }
        let next = Path::new(&image)
            .parent()
            .unwrap_or(Path::new("/"))
            .join(&backing.name);
        image = next.to_string_lossy().into_owned();
        format = backing.format;
        chain.push(OpenedBacking {
            read: SharedFd(Arc::new(open_beneath(root, &image, false, true)?)),
            format,
        });
    }
    Ok(chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_paths() {
        let shared = tempfile::tempdir().expect("tempdir");
        let local = tempfile::tempdir().expect("tempdir");
        let inside = shared.path().join("vmlinuz");
        std::fs::write(&inside, b"k").expect("write");
        let outside = local.path().join("disk.img");
        std::fs::write(&outside, b"d").expect("write");
        let link = shared.path().join("sneaky");
        std::os::unix::fs::symlink(&outside, &link).expect("symlink");
        let dotdot = format!(
            "{}/../{}/disk.img",
            shared.path().display(),
            local
                .path()
                .file_name()
                .and_then(|n| n.to_str())
                .expect("name")
        );
        let s = |p: &Path| p.display().to_string();
        let paths = vec![
            s(&inside),
            s(&outside),
            s(&link),
            dotdot.clone(),
            s(&shared.path().join("absent")),
            s(shared.path()),
        ];
        let r = check(&paths, Some(shared.path()));
        assert_eq!(
            r.missing,
            vec![s(&shared.path().join("absent")), s(shared.path())]
        );
        assert_eq!(
            r.outside_shared_storage,
            vec![s(&outside), s(&link), dotdot]
        );
        let r = check(&[s(&inside)], None);
        assert_eq!(r.outside_shared_storage, vec![s(&inside)]);
    }

    fn s(p: &Path) -> String {
        p.display().to_string()
    }

    #[test]
    fn files_open_only_beneath_the_storage_root() {
        let shared = tempfile::tempdir().expect("tempdir");
        let local = tempfile::tempdir().expect("tempdir");
        let root = shared.path();
        std::fs::create_dir(root.join("images")).expect("dir");
        std::fs::write(root.join("images/vmlinuz"), b"kernel").expect("write");
        std::fs::write(local.path().join("secret"), b"host secret").expect("write");
        let symlink = |target: &str, at: &str| {
            std::os::unix::fs::symlink(target, root.join(at)).expect("symlink")
        };
        symlink("images/vmlinuz", "inside-link");
        symlink(&s(&local.path().join("secret")), "absolute-out");
        symlink("../../../../../../../../etc/passwd", "relative-out");
        symlink("/proc/self/root/etc/passwd", "magic-out");
        let at = |p: &str| s(&root.join(p));
        let read = |p: &str| {
            open_beneath(root, p, false, false).map(|fd| {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut text)
                    .expect("read");
                text
            })
        };
        assert_eq!(read(&at("images/vmlinuz")), Ok("kernel".into()));
        assert_eq!(read(&at("inside-link")), Ok("kernel".into()));
        for escape in [
            at("absolute-out"),
            at("relative-out"),
            at("magic-out"),
            at("images/../../x"),
            s(&local.path().join("secret")),
            "/etc/passwd".into(),
            "relative/vmlinuz".into(),
            s(root),
        ] {
            assert!(
                matches!(read(&escape), Err(OpenError::Outside(..))),
                "{escape}: {:?}",
                read(&escape)
            );
        }
        assert!(matches!(read(&at("absent")), Err(OpenError::Missing(_))));
        assert!(matches!(read(&at("images")), Err(OpenError::Missing(_))));
    }

    #[test]
    fn a_path_swapped_after_opening_changes_nothing_the_descriptor_reads() {
        let shared = tempfile::tempdir().expect("tempdir");
        let local = tempfile::tempdir().expect("tempdir");
        let kernel = shared.path().join("vmlinuz");
        std::fs::write(&kernel, b"kernel").expect("write");
        std::fs::write(local.path().join("secret"), b"host secret").expect("write");
        let fd = open_beneath(shared.path(), &s(&kernel), false, false).expect("open");
        std::fs::remove_file(&kernel).expect("remove");
        std::os::unix::fs::symlink(local.path().join("secret"), &kernel).expect("swap");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut text).expect("read");
        assert_eq!(text, "kernel");
        // And opened again now, the swapped path is refused.
        assert!(matches!(
            open_beneath(shared.path(), &s(&kernel), false, false),
            Err(OpenError::Outside(..))
        ));
    }

    /// `qemu-img create` of a qcow2 image at `path` over `backing` (format `fmt`).
    fn qcow2(path: &Path, backing: Option<(&str, &str)>) {
        let mut cmd = std::process::Command::new("qemu-img");
        cmd.args(["create", "-q", "-f", "qcow2"]);
        if let Some((b, fmt)) = backing {
            cmd.args(["-b", b, "-F", fmt]);
        }
        let out = cmd.arg(path).arg("64M").output().expect("run qemu-img");
        assert!(out.status.success(), "{out:?}");
    }

    fn disk(path: &Path) -> VmSpec {
        let mut spec: VmSpec = serde_json::from_value(serde_json::json!({
            "name": "c", "vcpus": 1, "memory_mib": 64, "boot": {"kind": "disk"},
            "disks": [{"path": s(path), "format": "qcow2"}]
        }))
        .expect("spec");
        spec.disks[0].format = DiskFormat::Qcow2;
        spec
    }

    #[test]
    fn an_iscsi_lun_counts_as_reachable_when_its_portal_accepts() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let open = listener.local_addr().expect("addr");
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let url = |a: std::net::SocketAddr| format!("iscsi://{a}/iqn.2026-12.lab.tern:san/1");
        let r = check(&[url(open), url(closed), "iscsi://nowhere/x".into()], None);
        assert_eq!(r.unreachable.len(), 2, "{r:?}");
        assert!(r.unreachable[0].contains(&closed.to_string()), "{r:?}");
        assert!(r.unreachable[1].contains("not an iscsi://"), "{r:?}");
        assert!(r.missing.is_empty() && r.outside_shared_storage.is_empty());
    }

    #[test]
    fn a_backing_chain_is_opened_beneath_the_storage_root_too() {
        let shared = tempfile::tempdir().expect("tempdir");
        let local = tempfile::tempdir().expect("tempdir");
        let root = shared.path();
        std::fs::create_dir(root.join("images")).expect("dir");
        std::fs::create_dir(root.join("vms")).expect("dir");
        qcow2(&root.join("images/base.qcow2"), None);
        qcow2(
            &root.join("images/mid.qcow2"),
            Some(("base.qcow2", "qcow2")),
        );
        let clone = root.join("vms/clone.qcow2");
        qcow2(&clone, Some(("../images/mid.qcow2", "qcow2")));
        let files = open_for_qemu(&disk(&clone), root).expect("open the chain");
        let formats: Vec<DiskFormat> = files[0].backing.iter().map(|b| b.format).collect();
        assert_eq!(formats, vec![DiskFormat::Qcow2, DiskFormat::Qcow2]);

        // A header naming a file outside, absolutely or through a link, is refused like a spec.
        let secret = local.path().join("secret.raw");
        std::fs::write(&secret, b"host secret").expect("write");
        let evil = root.join("vms/evil.qcow2");
        qcow2(&evil, Some((&s(&secret), "raw")));
        assert!(matches!(
            open_for_qemu(&disk(&evil), root),
            Err(OpenError::Outside(..))
        ));
        std::os::unix::fs::symlink(&secret, root.join("images/link.raw")).expect("symlink");
        let sneaky = root.join("vms/sneaky.qcow2");
        qcow2(&sneaky, Some(("../images/link.raw", "raw")));
        assert!(matches!(
            open_for_qemu(&disk(&sneaky), root),
            Err(OpenError::Outside(..))
        ));
        // An image that is not qcow2 at all.
        let fake = root.join("vms/fake.qcow2");
        std::fs::write(&fake, vec![0u8; 4096]).expect("write");
        assert!(matches!(
            open_for_qemu(&disk(&fake), root),
            Err(OpenError::Image(_, crate::qcow2::HeaderError::NotQcow2))
        ));
    }
}
