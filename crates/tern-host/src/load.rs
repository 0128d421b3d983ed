//! How busy this host and its QEMU processes are: CPU and memory figures sampled from /proc.

use std::collections::HashMap;
use std::time::Instant;

/// Aggregate CPU times of the host (first line of /proc/stat), in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostCpuTimes {
    pub busy: u64,
    pub total: u64,
}

/// Parses the `cpu  user nice system idle iowait irq softirq steal guest guest_nice` line.
pub fn parse_proc_stat(text: &str) -> Option<HostCpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    if fields.len() < 4 {
        return None;
    }
    // guest and guest_nice (fields 8, 9) are already counted in user and nice.
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    Some(HostCpuTimes {
        busy: total.saturating_sub(idle),
        total,
    })
}

/// CPU time and start time of one process from /proc/PID/stat, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcTimes {
    /// utime + stime.
    pub cpu_ticks: u64,
    /// Start time after boot (identifies the process across pid reuse).
    pub start_ticks: u64,
}

/// Parses /proc/PID/stat. The command name may hold spaces and parentheses, so fields are
/// counted from the last `)`.
pub fn parse_pid_stat(text: &str) -> Option<ProcTimes> {
    let after = &text[text.rfind(')')? + 1..];
    // Fields after the name start at field 3 (state); utime is 14, stime 15, starttime 22.
    let f: Vec<&str> = after.split_whitespace().collect();
    let get = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(ProcTimes {
        cpu_ticks: get(14)? + get(15)?,
        start_ticks: get(22)?,
    })
}

/// Resident set size from /proc/PID/status (`VmRSS:   123456 kB`), in KiB.
pub fn parse_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// CPU and memory use of one process over the last sample.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcLoad {
    /// Percent of one core.
    pub cpu_percent: f64,
    pub rss_mib: u64,
}

/// Host-wide figures of the last sample.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostFigures {
    /// Percent of all cores.
    pub cpu_percent: f64,
    pub memory_used_mib: u64,
    pub memory_total_mib: u64,
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory effects; it only returns a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn boot_uptime_s() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Keeps the previous sample so figures are deltas over the sampling period.
#[derive(Debug)]
pub struct LoadSampler {
    ticks_per_s: f64,
    prev_host: Option<HostCpuTimes>,
    prev_procs: HashMap<u32, (Instant, ProcTimes)>,
}

impl Default for LoadSampler {
    fn default() -> Self {
        LoadSampler {
            ticks_per_s: clock_ticks_per_second(),
            prev_host: None,
            prev_procs: HashMap::new(),
        }
    }
}

impl LoadSampler {
    /// Samples the host. The first call reports the average since boot.
    pub fn sample_host(&mut self) -> HostFigures {
        let mut fig = HostFigures::default();
        if let Some(now) = std::fs::read_to_string("/proc/stat")
            .ok()
            .as_deref()
            .and_then(parse_proc_stat)
        {
            let prev = self.prev_host.unwrap_or_default();
            let total = now.total.saturating_sub(prev.total);
            let busy = now.busy.saturating_sub(prev.busy);
            if total > 0 {
                fig.cpu_percent = (busy as f64 * 100.0 / total as f64).clamp(0.0, 100.0);
            }
            self.prev_host = Some(now);
        }
        if let Ok(mem) = crate::facts::read_meminfo() {
            fig.memory_total_mib = mem.total_mib;
            fig.memory_used_mib = mem.total_mib.saturating_sub(mem.available_mib);
        }
        fig
    }

    /// Samples the given processes; forgets processes no longer asked about. A process seen
    /// for the first time reports its average since it started.
    pub fn sample_procs(&mut self, pids: &[u32]) -> HashMap<u32, ProcLoad> {
        let now = Instant::now();
        let mut out = HashMap::new();
        let mut next = HashMap::new();
        for &pid in pids {
            let Some(times) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .as_deref()
                .and_then(parse_pid_stat)
            else {
                continue;
            };
            let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .as_deref()
                .and_then(parse_rss_kib)
                .unwrap_or(0);
            let cpu_percent = match self.prev_procs.get(&pid) {
                Some((at, prev)) if prev.start_ticks == times.start_ticks => {
                    let secs = now.duration_since(*at).as_secs_f64();
                    let ticks = times.cpu_ticks.saturating_sub(prev.cpu_ticks) as f64;
                    if secs > 0.0 {
                        ticks / self.ticks_per_s / secs * 100.0
                    } else {
                        0.0
                    }
                }
                _ => {
                    let age_s = boot_uptime_s()
                        .map(|up| up - times.start_ticks as f64 / self.ticks_per_s)
                        .unwrap_or(0.0);
                    if age_s > 0.0 {
                        times.cpu_ticks as f64 / self.ticks_per_s / age_s * 100.0
                    } else {
                        0.0
                    }
                }
            };
            next.insert(pid, (now, times));
            out.insert(
                pid,
                ProcLoad {
                    cpu_percent,
                    rss_mib: rss_kib.div_ceil(1024),
                },
            );
        }
        self.prev_procs = next;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat() {
        let t = parse_proc_stat("cpu  100 5 50 800 20 1 2 3 40 0\ncpu0 1 2 3 4\n").expect("parses");
        assert_eq!(t.total, 981);
        assert_eq!(t.busy, 981 - 820);
    }

    #[test]
    fn pid_stat_with_odd_name() {
        let text = "4242 (qemu (x) y) S 1 4242 4242 0 -1 4194624 100 0 0 0 350 150 0 0 20 0 3 0 98765 1000 50 18446744073709551615";
        let t = parse_pid_stat(text).expect("parses");
        assert_eq!(t.cpu_ticks, 500);
        assert_eq!(t.start_ticks, 98765);
    }

    #[test]
    fn rss() {
        assert_eq!(
            parse_rss_kib("Name:\tqemu\nVmRSS:\t  204800 kB\n"),
            Some(204800)
        );
    }

    #[test]
    fn samples_this_process() {
        let mut s = LoadSampler::default();
        let pid = std::process::id();
        let host = s.sample_host();
        assert!(host.memory_total_mib > 0);
        assert!(host.memory_used_mib <= host.memory_total_mib);
        let own_ticks = || {
            let stat = std::fs::read_to_string("/proc/self/stat").expect("own stat");
            parse_pid_stat(&stat).expect("own stat parses").cpu_ticks
        };
        let wall = Instant::now();
        let first = s.sample_procs(&[pid]);
        assert!(first.get(&pid).expect("own pid sampled").rss_mib > 0);
        // Burn 20 ticks of CPU time (not of wall time: a loaded machine may lend this thread
        // little of it), then the delta must show at least those ticks over the wall time
        // that enclosed both samples.
        let (from, burn) = (own_ticks(), 20);
        let mut x: u64 = 0;
        while own_ticks() < from + burn {
            for _ in 0..100_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            assert!(
                wall.elapsed().as_secs() < 60,
                "20 ticks of CPU not burnt in 60 s"
            );
        }
        std::hint::black_box(x);
        let second = s.sample_procs(&[pid]);
        let at_least = burn as f64 / s.ticks_per_s / wall.elapsed().as_secs_f64() * 100.0;
        let got = second.get(&pid).expect("own pid").cpu_percent;
        assert!(got >= at_least, "{got}% CPU, at least {at_least}% burnt");
        assert!(s.sample_procs(&[]).is_empty());
    }
}
