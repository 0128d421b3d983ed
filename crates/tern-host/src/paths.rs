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
use tern_api::{BootSource, VmSpec};
use tern_qemu::OpenedFile;

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

/// Why a file of a spec could not be opened for QEMU.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error("{0} is not a file on this host")]
    Missing(String),
    #[error("{0} is outside this host's shared storage {1}: a VM may only use files there")]
    Outside(String, String),
    #[error("cannot open {0}: {1}")]
    Other(String, String),
}

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
            });
        }
    }
    for d in &spec.disks {
        let write = if d.readonly {
            None
        } else {
            Some(Arc::new(open_beneath(root, &d.path, true, true)?))
        };
        out.push(OpenedFile {
            path: d.path.clone(),
            read: Arc::new(open_beneath(root, &d.path, false, true)?),
            write,
        });
    }
    Ok(out)
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
}
