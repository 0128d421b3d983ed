//! The lab's processes: start `tern` daemons detached inside namespaces, tell whether a pid is
//! still one of ours, and end them (TERM, then KILL).

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::state::LabProcess;

/// Starts `exe args...` in the process's network namespace, in its own session, output
/// appended to its log.
///
/// It enters only the network namespace (setns), not a mount namespace of its own as
/// `ip netns exec` would: that one mounts a fresh /sys for the namespace, which hides
/// /sys/fs/cgroup, and the agents put their VMs' QEMUs into cgroups. Nothing the daemons do
/// depends on /sys showing their namespace (the agent asks the kernel about interfaces with
/// ioctls and netlink).
pub fn spawn(exe: &Path, p: &LabProcess) -> anyhow::Result<Child> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p.log)
        .with_context(|| format!("opening log {}", p.log.display()))?;
    let log2 = log.try_clone()?;
    let netns_path = Path::new("/run/netns").join(&p.namespace);
    let netns = std::fs::File::open(&netns_path)
        .with_context(|| format!("opening network namespace {}", netns_path.display()))?;
    let mut cmd = Command::new(exe);
    cmd.args(&p.args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    // SAFETY: setsid(2) and setns(2) are async-signal-safe and touch no memory of the parent;
    // `netns` stays open until spawn returns. The daemon gets its own session so it outlives
    // `tern lab up` and a terminal hang-up.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("starting {} in {}", p.name, p.namespace))
}

/// State letter from /proc/PID/stat (`R`, `S`, `Z`…), `None` when there is no such process.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces; the state follows the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}

/// Alive = exists and has not finished exiting. A zombie counts as dead (nothing reaps orphans
/// on some machines), except a zombie thread-group leader whose other threads still run their
/// exit: the process still holds its files (and so its state-dir lock) until the last one is
/// gone, and a restart that starts a new daemon before then finds the lock taken.
pub fn alive(pid: u32) -> bool {
    match proc_state(pid) {
        None => false,
        Some('Z' | 'X') => threads(pid) > 1,
        Some(_) => true,
    }
}

/// How many threads /proc lists for the process (0 when it is gone).
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

/// The process's command line, arguments joined by spaces.
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" ")
            .trim_end()
            .to_string(),
    )
}

/// Is the recorded pid still the lab's process (alive, and its command line names the lab
/// dir)? Guards against a reused pid after a crash.
pub fn is_ours(pid: u32, dir: &Path) -> bool {
    alive(pid) && cmdline(pid).is_some_and(|c| c.contains(dir.to_string_lossy().as_ref()))
}

/// Sends `sig` to each pid (errors for vanished processes are ignored).
pub fn signal_all(pids: &[u32], sig: Signal) {
    for &pid in pids {
        let Ok(raw) = i32::try_from(pid) else {
            continue;
        };
        if raw <= 1 {
            continue;
        }
        let _ = kill(Pid::from_raw(raw), sig);
    }
}

/// Waits until none of `pids` is alive; returns those still alive at the deadline.
pub fn wait_dead(pids: &[u32], timeout: Duration) -> Vec<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// TERM, wait up to `grace`, then KILL; fails if any survives KILL.
pub fn terminate(pids: &[u32], grace: Duration) -> anyhow::Result<()> {
    if pids.is_empty() {
        return Ok(());
    }
    signal_all(pids, Signal::SIGTERM);
    let left = wait_dead(pids, grace);
    kill_now(&left)
}

/// KILL and wait until gone.
pub fn kill_now(pids: &[u32]) -> anyhow::Result<()> {
    if pids.is_empty() {
        return Ok(());
    }
    signal_all(pids, Signal::SIGKILL);
    let left = wait_dead(pids, Duration::from_secs(10));
    if !left.is_empty() {
        anyhow::bail!("processes {left:?} survive SIGKILL");
    }
    Ok(())
}

/// The last `n` lines of a log, for error messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n);
            let mut s = format!("--- last lines of {} ---\n", path.display());
            for l in &lines[start..] {
                s.push_str(l);
                s.push('\n');
            }
            s
        }
        Err(e) => format!("(no log at {}: {e})\n", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_has_a_cmdline() {
        let me = std::process::id();
        assert!(alive(me));
        assert!(cmdline(me).is_some_and(|c| !c.is_empty()));
        assert!(!alive(u32::MAX));
    }
}
