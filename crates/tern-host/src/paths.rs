//! Checks of the files a VM spec names: present on this host, and on its shared storage.

use std::path::Path;

use tern_api::agent::PathsReport;

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
}
