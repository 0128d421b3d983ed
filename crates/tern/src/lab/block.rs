//! The lab's block LUNs (`lab up --block-luns N`): loop devices over files in `<dir>/block/`,
//! named the way a multipath or FC LUN is on a real host, by a stable id under
//! `/dev/disk/by-id` (`tern-<prefix>-<n>`, a link to the loop device). Every host namespace
//! sees the same devices (devices are not namespaced), as every host of a SAN fabric sees the
//! same LUN. Teardown finds them again by the lab's files and prefix, even without lab.json.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// Where udev keeps stable names; the lab adds its own links there.
const BY_ID: &str = "/dev/disk/by-id";
/// Most block LUNs a lab makes.
pub const MAX_BLOCK_LUNS: u32 = 8;

/// The by-id name of the lab's LUN `n`.
pub fn device_id(prefix: &str, n: u32) -> String {
    format!("tern-{prefix}-{n}")
}

fn backing_file(dir: &Path, n: u32) -> PathBuf {
    dir.join("block").join(format!("lun{n}.img"))
}

fn losetup(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("losetup")
        .args(args)
        .output()
        .context("running losetup")?;
    if !out.status.success() {
        bail!(
            "losetup {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Makes `luns` LUNs of `mib` MiB; returns their by-id names.
pub fn create(dir: &Path, prefix: &str, luns: u32, mib: u64) -> anyhow::Result<Vec<String>> {
    if luns == 0 || luns > MAX_BLOCK_LUNS {
        bail!("a lab has 1–{MAX_BLOCK_LUNS} block LUNs, not {luns}");
    }
    if mib == 0 || mib > 64 * 1024 {
        bail!("a lab block LUN has 1–65536 MiB, not {mib}");
    }
    std::fs::create_dir_all(dir.join("block")).context("making the block LUNs' dir")?;
    std::fs::create_dir_all(BY_ID).with_context(|| format!("making {BY_ID}"))?;
    let mut ids = Vec::new();
    for n in 1..=luns {
        let file = backing_file(dir, n);
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(mib << 20))
            .with_context(|| format!("making {}", file.display()))?;
        let file_s = file.display().to_string();
        let dev = losetup(&["--find", "--show", "--direct-io=on", &file_s])?;
        let id = device_id(prefix, n);
        let link = Path::new(BY_ID).join(&id);
        let _ = std::fs::remove_file(&link);
        // Relative, as udev makes them: ../../loopN.
        let target = Path::new("../..").join(
            Path::new(&dev)
                .file_name()
                .context("the loop device's name")?,
        );
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("linking {} to {dev}", link.display()))?;
        ids.push(id);
    }
    Ok(ids)
}

/// Removes the lab's by-id links and detaches its loop devices.
pub fn remove(dir: &Path, prefixes: &[String]) {
    if let Ok(entries) = std::fs::read_dir(BY_ID) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if prefixes
                .iter()
                .any(|p| name.starts_with(&format!("tern-{p}-")))
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    for n in 1..=MAX_BLOCK_LUNS {
        let file = backing_file(dir, n);
        if !file.exists() {
            continue;
        }
        let file_s = file.display().to_string();
        let Ok(list) = losetup(&["--associated", &file_s, "--noheadings", "--output", "NAME"])
        else {
            continue;
        };
        for dev in list
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("/dev/loop"))
        {
            if let Err(e) = losetup(&["--detach", dev]) {
                super::say(&format!("cannot detach {dev}: {e:#}"));
            }
        }
    }
}
