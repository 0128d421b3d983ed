//! The lab's SAN (`lab up --san-luns N`): a userspace iSCSI target — Debian's `tgt` — in the
//! storage namespace `<p>-san` (10.79.0.2), reached by every host over a storage network of
//! its own (`stor0`, 10.79.0.<10+i>). Each LUN is a sparse file in `<dir>/san/`. QEMU opens
//! the LUNs itself with its userspace initiator, so no host needs a kernel initiator (the
//! build machines have none).
//!
//! tgtd is configured with `tgtadm`, the stock tool, over tgtd's control socket
//! (`/var/run/tgtd/socket.<port>`), the port derived from the lab's prefix so two labs do not
//! share one. `lab down` ends tgtd with the rest of the namespace's processes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::plan::{SAN_IP, SAN_PORT, SAN_TARGET};
use super::procs;
use super::state::{LabProcess, LabSan};

/// Largest LUN the lab makes (sparse: only what guests write takes space).
pub const MAX_LUN_MIB: u64 = 64 * 1024;
/// Most LUNs the lab's target exports.
pub const MAX_LUNS: u32 = 16;

/// A Debian tool from /usr/sbin, also when PATH lacks sbin.
fn sbin(tool: &str) -> PathBuf {
    let p = Path::new("/usr/sbin").join(tool);
    if p.exists() {
        p
    } else {
        PathBuf::from(tool)
    }
}

/// tgtd's control port for a lab prefix (FNV-1a, 1000–8999).
fn control_port(prefix: &str) -> u32 {
    let h = prefix.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    1000 + h % 8000
}

fn tgtadm(port: u32, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(sbin("tgtadm"))
        .args(["-C", &port.to_string(), "--lld", "iscsi"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running tgtadm (install Debian's tgt: scripts/setup.sh)")?;
    if !out.status.success() {
        bail!(
            "tgtadm {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The iSCSI URL of LUN `n` of the lab's target.
pub fn lun_url(n: u32) -> String {
    format!("iscsi://{SAN_IP}:{SAN_PORT}/{SAN_TARGET}/{n}")
}

/// Starts tgtd in `namespace` and exports `luns` LUNs of `lun_mib` MiB each (LUN 1 …).
pub fn start(
    dir: &Path,
    prefix: &str,
    namespace: &str,
    luns: u32,
    lun_mib: u64,
) -> anyhow::Result<LabSan> {
    if luns == 0 || luns > MAX_LUNS {
        bail!("a lab SAN has 1–{MAX_LUNS} LUNs, not {luns}");
    }
    if lun_mib == 0 || lun_mib > MAX_LUN_MIB {
        bail!("a lab LUN has 1–{MAX_LUN_MIB} MiB, not {lun_mib}");
    }
    let store = dir.join("san");
    std::fs::create_dir_all(&store).with_context(|| format!("creating {}", store.display()))?;
    let port = control_port(prefix);
    let mut process = LabProcess {
        name: "san".into(),
        namespace: namespace.into(),
        args: vec!["-f".into(), "-C".into(), port.to_string()],
        log: dir.join("logs/san.log"),
        pid: None,
        exe: None,
    };
    let child = procs::spawn(&sbin("tgtd"), &process).context("starting tgtd (Debian's tgt)")?;
    process.pid = Some(child.id());
    // tgtd answers on its control socket once it is ready for configuration.
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Err(e) = tgtadm(port, &["--op", "show", "--mode", "sys"]) {
        if Instant::now() > deadline {
            return Err(e).context("tgtd did not answer within 15 s (see logs/san.log)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    tgtadm(
        port,
        &[
            "--op", "new", "--mode", "target", "--tid", "1", "-T", SAN_TARGET,
        ],
    )?;
    let mut urls = Vec::new();
    for n in 1..=luns {
        let file = store.join(format!("lun{n}.img"));
        // A restarted target serves the LUNs it had: never truncate one.
        std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&file)
            .and_then(|f| {
                if f.metadata()?.len() == 0 {
                    f.set_len(lun_mib << 20)?;
                }
                Ok(())
            })
            .with_context(|| format!("making {}", file.display()))?;
        let (n_s, path) = (n.to_string(), file.display().to_string());
        tgtadm(
            port,
            &[
                "--op",
                "new",
                "--mode",
                "logicalunit",
                "--tid",
                "1",
                "--lun",
                &n_s,
                "-b",
                &path,
            ],
        )?;
        urls.push(lun_url(n));
    }
    // Every initiator of the storage network may log in: it is the lab's own.
    tgtadm(
        port,
        &[
            "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL",
        ],
    )?;
    Ok(LabSan {
        process,
        control_port: port,
        luns: urls,
    })
}

/// The lab's tgtd pid, when it is running (its command line names its control port).
fn running_target(san: &LabSan) -> Option<u32> {
    let port = san.control_port.to_string();
    san.process
        .pid
        .filter(|pid| procs::cmdline(*pid).is_some_and(|c| c.contains("tgtd") && c.contains(&port)))
}

/// Kills the lab's target at once (a SAN that fails, as hosts see it: every session drops
/// and no portal answers); its LUN files stay. Returns the pid it had.
pub fn stop_target(dir: &Path) -> anyhow::Result<Option<u32>> {
    let mut st = super::load(&super::absolute(dir)?)?;
    let san = st
        .san
        .as_mut()
        .context("this lab has no SAN (tern lab up --san-luns N)")?;
    let pid = running_target(san);
    if let Some(pid) = pid {
        procs::kill_now(&[pid])?;
    }
    san.process.pid = None;
    st.save()?;
    Ok(pid)
}

/// Starts the lab's target again with the same LUNs and their data. Returns the new pid.
pub fn start_target(dir: &Path) -> anyhow::Result<u32> {
    let mut st = super::load(&super::absolute(dir)?)?;
    let san = st
        .san
        .as_ref()
        .context("this lab has no SAN (tern lab up --san-luns N)")?;
    if let Some(pid) = running_target(san) {
        bail!("the SAN's target is already running (pid {pid})");
    }
    let luns = u32::try_from(san.luns.len()).context("LUN count")?;
    let lun1 = st.dir.join("san/lun1.img");
    let lun_mib = std::fs::metadata(&lun1)
        .with_context(|| format!("{}", lun1.display()))?
        .len()
        >> 20;
    let namespace = san.process.namespace.clone();
    let new = start(&st.dir, &st.prefix, &namespace, luns, lun_mib)?;
    let pid = new.process.pid.context("tgtd's pid")?;
    st.san = Some(new);
    st.save()?;
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_ports_are_in_range_and_follow_the_prefix() {
        for p in ["tern", "tos1x0", "a"] {
            let port = control_port(p);
            assert!((1000..9000).contains(&port));
            assert_eq!(port, control_port(p));
        }
        assert_ne!(control_port("tern"), control_port("tern2"));
        assert_eq!(
            tern_api::IscsiLun::parse(&lun_url(3)).map(|l| l.lun),
            Some(3)
        );
    }
}
