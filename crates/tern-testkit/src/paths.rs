//! The repository and the guest artifacts the project's own scripts build there.

use std::path::{Path, PathBuf};

/// The repository's root (this crate lives in `crates/tern-testkit`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// The guest image directory `guest/build.sh` writes (`target/guest`).
pub fn guest_image_dir() -> PathBuf {
    repo_root().join("target/guest")
}

/// A guest kernel: the project's guest image's when built, else the host's cloud kernel
/// (`linux-image-cloud-amd64`); `None` when neither exists.
pub fn guest_kernel() -> Option<PathBuf> {
    let built = guest_image_dir().join("vmlinuz");
    if built.exists() {
        return Some(built);
    }
    std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("vmlinuz-") && name.ends_with("-cloud-amd64")
        })
        .max()
}
