//! A QEMU process seen from outside: pidfds, liveness, /proc figures.
//!
//! QEMU outlives the agent that started it, so after an agent restart it is no longer the
//! agent's child: its exit cannot be waited for with waitpid. A pidfd (Linux ≥ 5.3) becomes readable when the process ends and signals sent
//! through it cannot hit a recycled pid; where pidfds are missing, /proc is polled.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Resource figures of a QEMU process, from /proc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStats {
    /// CPU time used by the whole process (all threads, user + system) since it started.
    pub cpu_time_ms: u64,
    /// Resident memory.
    pub rss_mib: u64,
    /// vCPU threads (named `CPU n/KVM` or `CPU n/TCG` thanks to `debug-threads=on`).
    pub vcpu_threads: u32,
    /// All threads of the process.
    pub threads: u32,
}

/// Opens a pidfd for `pid`.
pub(crate) fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sends `signal` through a pidfd. `ESRCH` (already gone) counts as success.
pub(crate) fn pidfd_send_signal(fd: &OwnedFd, signal: i32) -> std::io::Result<()> {
    // SAFETY: plain integer arguments; a null siginfo means "as kill(2) would send it".
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// The weakest CPU priority (nice 19).
pub(crate) const NICE_LOWEST: i32 = 19;

/// Gives every thread of process `pid` the weakest CPU priority (nice is per thread on Linux,
/// and the threads that exit last do the teardown); returns how many threads took it.
pub(crate) fn lowest_priority(pid: u32) -> std::io::Result<usize> {
    let mut done = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Some(tid) = task?
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<libc::id_t>().ok())
        else {
            continue;
        };
        // SAFETY: setpriority takes plain integers and touches no memory of ours.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, NICE_LOWEST) };
        if rc == 0 {
            done += 1;
        }
    }
    Ok(done)
}

/// The state letter of /proc/PID/stat (`R`, `S`, `Z`…), `None` when there is no such pid.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain anything: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().next()?.chars().next()
}

/// True while the process exists and is not a zombie (an exited process not reaped yet: the
/// agent reaps its own children in the background, and an adopted QEMU's parent is init).
pub fn pid_alive(pid: u32) -> bool {
    matches!(proc_state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// The process's command line, arguments split.
pub(crate) fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
    )
}

/// True when `pid` is a live QEMU started with `-pidfile pidfile` (guards against a pid
/// recycled by an unrelated process).
pub(crate) fn is_qemu_of(pid: u32, pidfile: &Path) -> bool {
    if !pid_alive(pid) {
        return false;
    }
    let Some(args) = cmdline(pid) else {
        return false;
    };
    // QEMU is given its pidfile relative to its working directory (its run dir).
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
    args.windows(2).any(|w| {
        w[0] == "-pidfile"
            && match &cwd {
                Some(cwd) => cwd.join(&w[1]) == pidfile,
                None => Path::new(&w[1]) == pidfile,
            }
    })
}

/// The real uid and gid a process runs as, from /proc.
pub fn owner(pid: u32) -> Option<(u32, u32)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let first = |key: &str| -> Option<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((first("Uid:")?, first("Gid:")?))
}

/// Reads a pidfile (`NNN\n`).
pub(crate) fn read_pidfile(path: &Path) -> std::io::Result<u32> {
    let text = std::fs::read_to_string(path)?;
    text.trim().parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} does not hold a pid: {:?}", path.display(), text.trim()),
        )
    })
}

/// CPU time, memory and threads of `pid` from /proc.
pub fn process_stats(pid: u32) -> std::io::Result<VmStats> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "unparsable /proc stat");
    let rest = &stat[stat.rfind(')').ok_or_else(bad)? + 1..];
    // Fields after the name: [0] state, ... [11] utime, [12] stime, [21] rss (pages).
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> std::io::Result<u64> {
        fields.get(i).and_then(|f| f.parse().ok()).ok_or_else(bad)
    };
    if fields.first() == Some(&"Z") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("process {pid} has exited"),
        ));
    }
    let ticks = field(11)? + field(12)?;
    let rss_pages = field(21)?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|v| *v > 0)
        .unwrap_or(100) as u64;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .filter(|v| *v > 0)
        .unwrap_or(4096) as u64;

    let mut threads = 0;
    let mut vcpu_threads = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        threads += 1;
        if let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) {
            if comm.starts_with("CPU ") {
                vcpu_threads += 1;
            }
        }
    }
    Ok(VmStats {
        cpu_time_ms: ticks * 1000 / hz,
        rss_mib: rss_pages * page / (1024 * 1024),
        vcpu_threads,
        threads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process() {
        let me = std::process::id();
        assert!(pid_alive(me));
        let stats = process_stats(me).unwrap();
        assert!(stats.threads >= 1);
        assert!(stats.rss_mib < 100_000);
        assert!(cmdline(me).is_some());
        assert!(!is_qemu_of(me, Path::new("/nonexistent/qemu.pid")));
        let fd = pidfd_open(me).unwrap();
        // Signal 0 only checks the target exists.
        pidfd_send_signal(&fd, 0).unwrap();
    }

    /// Every thread of a process takes the weakest priority, not only its main thread.
    #[test]
    fn lowest_priority_reaches_every_thread() {
        // An idle QEMU (no machine, no display) runs at least two threads.
        let mut child = std::process::Command::new("qemu-system-x86_64")
            .args(["-machine", "none", "-nodefaults", "-display", "none", "-S"])
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("start qemu-system-x86_64 (scripts/setup.sh installs it)");
        let pid = child.id();
        let tasks = || {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .count()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while tasks() < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "QEMU never ran 2 threads"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(lowest_priority(pid).unwrap() >= 2);
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let stat = std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap();
            // The fields after the command's closing parenthesis; nice is the 19th of stat.
            let after = &stat[stat.rfind(')').unwrap() + 2..];
            let nice: i32 = after.split(' ').nth(16).unwrap().parse().unwrap();
            assert_eq!(nice, NICE_LOWEST, "{stat}");
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn missing_pid() {
        // pid_max is at most 2^22: this pid cannot exist.
        assert!(!pid_alive(u32::MAX - 1));
        assert!(process_stats(u32::MAX - 1).is_err());
    }

    #[test]
    fn pidfile_parse() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("qemu.pid");
        std::fs::write(&p, "1234\n").unwrap();
        assert_eq!(read_pidfile(&p).unwrap(), 1234);
        std::fs::write(&p, "x\n").unwrap();
        assert!(read_pidfile(&p).is_err());
    }
}
