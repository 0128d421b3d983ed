//! Helpers shared by the QEMU tests: a bootable test guest, launch configs, a kill guard.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use tern_api::{Accelerator, BootSource, VmSpec};
use tern_qemu::{Incoming, LaunchConfig, RunPaths};
use uuid::Uuid;

/// The /init of the tiny test initramfs: prints a tick a second (so a test can see the
/// guest run and carry on after a migration), or powers off when asked on the cmdline.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo TERN-TEST-READY
if /bin/busybox grep -q test.poweroff /proc/cmdline; then
    /bin/busybox poweroff -f
fi
i=0
while true; do
    echo "tick $i"
    i=$((i+1))
    /bin/busybox sleep 1
done
"#;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "tern_qemu=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// The guest kernel: the project's guest image when built, else the host's cloud kernel.
pub fn kernel() -> PathBuf {
    let k = tern_testkit::paths::guest_kernel()
        .expect("no guest kernel: run guest/build.sh or install linux-image-cloud-amd64");
    std::path::absolute(k).expect("absolute path")
}

/// Writes the tiny test initramfs (static busybox + [`INIT`]) into `dir`.
pub fn tiny_initramfs(dir: &Path) -> PathBuf {
    let busybox = std::fs::read("/bin/busybox")
        .expect("the tests need a static /bin/busybox (apt-get install busybox-static)");
    let out = tern_testkit::cpio::Cpio::new()
        .dir("bin")
        .dir("dev")
        .dir("proc")
        .char_dev("dev/console", 5, 1)
        .file("bin/busybox", 0o755, &busybox)
        .file("init", 0o755, INIT.as_bytes())
        .finish();
    let path = dir.join("initramfs-test.cpio");
    std::fs::write(&path, out).expect("write the test initramfs");
    path
}

/// A launch config for a TCG guest booting the tiny initramfs in `dir/<name>`.
pub fn config(dir: &Path, name: &str, extra_cmdline: &str) -> LaunchConfig {
    let initrd = dir.join("initramfs-test.cpio");
    if !initrd.exists() {
        tiny_initramfs(dir);
    }
    LaunchConfig {
        cgroup_procs: Vec::new(),
        id: Uuid::new_v4(),
        spec: VmSpec {
            firmware: Default::default(),
            cloud_init: None,
            resources: Default::default(),
            name: name.to_string(),
            vcpus: 1,
            memory_mib: 192,
            cpu_model: None,
            boot: BootSource::Kernel {
                kernel: kernel().to_string_lossy().into_owned(),
                initrd: Some(initrd.to_string_lossy().into_owned()),
                cmdline: format!("console=ttyS0 quiet panic=-1 {extra_cmdline}"),
            },
            disks: vec![],
            nics: vec![],
        },
        run_dir: dir.join(name),
        taps: vec![],
        accel: Accelerator::Tcg,
        qemu_binary: PathBuf::from("qemu-system-x86_64"),
        default_cpu_model: "qemu64".into(),
        incoming: None,
        start_paused: false,
        files: Vec::new(),
        run_as: None,
        guest_files: Default::default(),
    }
}

/// A destination config: same spec and id as `src`, its own run dir, `-incoming defer`.
pub fn destination(src: &LaunchConfig, dir: &Path, name: &str, start_paused: bool) -> LaunchConfig {
    let mut cfg = src.clone();
    cfg.run_dir = dir.join(name);
    cfg.incoming = Some(Incoming::Defer);
    cfg.start_paused = start_paused;
    cfg
}

/// A line of `/proc/PID/status` (`name` with its colon), its values separated by one space.
pub fn proc_status(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| panic!("{name} missing in /proc/{pid}/status"))
}

/// Kills the QEMU of a run dir when dropped, so a failing test leaves no process behind.
pub struct KillGuard(pub PathBuf);

impl Drop for KillGuard {
    fn drop(&mut self) {
        let paths = RunPaths::new(&self.0);
        let Ok(text) = std::fs::read_to_string(&paths.pidfile) else {
            return;
        };
        let Ok(pid) = text.trim().parse::<i32>() else {
            return;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        // QEMU names its pidfile relative to its working directory, the run dir: that
        // directory, not the command line, says the process is this guard's.
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
        let is_qemu = String::from_utf8_lossy(&cmdline).contains("-pidfile");
        if is_qemu && cwd.as_deref() == Some(self.0.as_path()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Polls `f` until it returns `Some`, or panics after `timeout`.
pub async fn wait_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    tern_testkit::poll_until(what, timeout, f).await
}

pub fn console(run_dir: &Path) -> String {
    std::fs::read_to_string(RunPaths::new(run_dir).console_log).unwrap_or_default()
}

/// The highest `tick N` the guest printed on a console, if any.
pub fn last_tick(text: &str) -> Option<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("tick "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
}

/// Waits until the guest's console shows tick `n` or higher.
pub async fn wait_tick(run_dir: &Path, n: u64, timeout: Duration) -> u64 {
    wait_for(
        &format!("tick {n} on {}", run_dir.display()),
        timeout,
        || last_tick(&console(run_dir)).filter(|t| *t >= n),
    )
    .await
}

#[allow(unused_imports)] // not every test binary that includes this module makes a namespace
pub use tern_testkit::NetNs;

/// Runs a command, panicking with its stderr when it fails.
pub fn run(argv: &[&str]) -> String {
    let out = std::process::Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("run {argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `(vmlinuz, initramfs.img)` of the project's guest image, when built.
pub fn guest_image() -> Option<(PathBuf, PathBuf)> {
    let dir = std::path::absolute(tern_testkit::paths::guest_image_dir()).ok()?;
    let (k, i) = (dir.join("vmlinuz"), dir.join("initramfs.img"));
    (k.exists() && i.exists()).then_some((k, i))
}
