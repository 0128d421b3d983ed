//! The host's health counters, sent with every heartbeat (`tern_api::health::HealthReport`):
//! EDAC memory errors, machine checks, the I/O errors of the disk under the VMs' storage, the
//! errors of the migration interface, CPU steal and run queue.
//!
//! Only counters are read here; the center judges them. Sysfs is read under a configurable
//! root (`--health-sysfs`), so a lab can stand a file tree in for the hardware: the signal
//! source is faked, never the decision.

use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tern_api::health::HealthReport;

/// Reads the counters; keeps the previous /proc/stat sample for steal over the interval.
#[derive(Debug)]
pub struct HealthProbe {
    sysfs: PathBuf,
    storage: Option<PathBuf>,
    migration_address: IpAddr,
    cores: u32,
    prev_stat: Option<StealTimes>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct StealTimes {
    steal: u64,
    total: u64,
}

impl HealthProbe {
    pub fn new(
        sysfs: PathBuf,
        storage: Option<PathBuf>,
        migration_address: IpAddr,
        cores: u32,
    ) -> HealthProbe {
        HealthProbe {
            sysfs,
            storage,
            migration_address,
            cores: cores.max(1),
            prev_stat: None,
        }
    }

    /// The counters now (steal over the time since the previous call).
    pub fn sample(&mut self) -> HealthReport {
        let (memory_corrected, memory_uncorrected) = edac_counts(&self.sysfs);
        let steal = std::fs::read_to_string("/proc/stat")
            .ok()
            .as_deref()
            .and_then(parse_steal);
        let cpu_steal_percent = match (steal, self.prev_stat) {
            (Some(now), Some(prev)) if now.total > prev.total => {
                (now.steal.saturating_sub(prev.steal)) as f64 * 100.0
                    / (now.total - prev.total) as f64
            }
            _ => 0.0,
        };
        if steal.is_some() {
            self.prev_stat = steal;
        }
        let load1 = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        HealthReport {
            memory_corrected,
            memory_uncorrected,
            machine_checks: std::fs::read_to_string("/proc/interrupts")
                .ok()
                .as_deref()
                .and_then(parse_machine_checks),
            disk_errors: self
                .storage
                .as_deref()
                .and_then(|p| disk_errors(&self.sysfs, p)),
            nic_errors: nic_errors(self.migration_address),
            cpu_steal_percent: cpu_steal_percent.clamp(0.0, 100.0),
            run_queue_per_core: load1 / f64::from(self.cores),
        }
    }
}

/// Sums `ce_count` and `ue_count` over `SYSFS/devices/system/edac/mc/mc*`; `None` for each
/// when no memory controller is registered (no EDAC driver).
pub fn edac_counts(sysfs: &Path) -> (Option<u64>, Option<u64>) {
    let dir = sysfs.join("devices/system/edac/mc");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return (None, None);
    };
    let (mut ce, mut ue) = (None::<u64>, None::<u64>);
    for e in entries.flatten() {
        let name = e.file_name();
        let is_mc = name
            .to_str()
            .and_then(|n| n.strip_prefix("mc"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !is_mc {
            continue;
        }
        for (file, sum) in [("ce_count", &mut ce), ("ue_count", &mut ue)] {
            if let Some(n) = read_count(&e.path().join(file)) {
                *sum = Some(sum.unwrap_or(0).saturating_add(n));
            }
        }
    }
    (ce, ue)
}

/// A counter file: decimal, or hex with `0x` (SCSI's `ioerr_cnt`).
fn read_count(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let t = text.trim();
    match t.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    }
}

/// The steal and total ticks of /proc/stat's `cpu` line.
fn parse_steal(text: &str) -> Option<StealTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    if f.len() < 8 {
        return None;
    }
    Some(StealTimes {
        steal: f[7],
        total: f.iter().take(8).sum(),
    })
}

/// Machine-check exceptions: the `MCE:` line of /proc/interrupts, summed over CPUs.
pub fn parse_machine_checks(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.trim_start().starts_with("MCE:"))?;
    let counts = line.trim_start()["MCE:".len()..]
        .split_whitespace()
        .map_while(|f| f.parse::<u64>().ok());
    Some(counts.sum())
}

/// I/O errors of the disk holding `path`: the SCSI `device/ioerr_cnt` of its block device
/// (or of the whole disk when it is a partition). `None` for devices without the counter
/// (virtio disks, tmpfs).
fn disk_errors(sysfs: &Path, path: &Path) -> Option<u64> {
    let dev = std::fs::metadata(path).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let base = sysfs.join(format!("dev/block/{major}:{minor}"));
    read_count(&base.join("device/ioerr_cnt"))
        .or_else(|| read_count(&base.join("../device/ioerr_cnt")))
}

/// Receive and transmit errors of the interface holding `addr`, from /proc/net/dev (which
/// shows the reader's network namespace). `None` when no interface holds it.
fn nic_errors(addr: IpAddr) -> Option<u64> {
    let ifname = nix::ifaddrs::getifaddrs().ok()?.find_map(|i| {
        let a = i.address?;
        let ip: Option<IpAddr> = a
            .as_sockaddr_in()
            .map(|s| IpAddr::V4(s.ip()))
            .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())));
        (ip == Some(addr)).then_some(i.interface_name)
    })?;
    let text = std::fs::read_to_string("/proc/net/dev").ok()?;
    parse_net_dev_errors(&text, &ifname)
}

/// `rx errs + tx errs` of `ifname` in /proc/net/dev.
pub fn parse_net_dev_errors(text: &str, ifname: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (name, rest) = l.split_once(':')?;
        if name.trim() != ifname {
            return None;
        }
        // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets errs …
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        Some(f.get(2)?.saturating_add(*f.get(10)?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edac_sums_the_controllers_and_says_none_without_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(edac_counts(dir.path()), (None, None));
        for (mc, ce, ue) in [("mc0", "3\n", "0\n"), ("mc1", "4\n", "1\n")] {
            let d = dir.path().join("devices/system/edac/mc").join(mc);
            std::fs::create_dir_all(&d).expect("mkdir");
            std::fs::write(d.join("ce_count"), ce).expect("write");
            std::fs::write(d.join("ue_count"), ue).expect("write");
        }
        // Not a controller: ignored.
        std::fs::create_dir_all(dir.path().join("devices/system/edac/mc/power")).expect("mkdir");
        assert_eq!(edac_counts(dir.path()), (Some(7), Some(1)));
    }

    #[test]
    fn machine_checks_sum_over_cpus() {
        let text = "           CPU0       CPU1\n  0:         45          0   IO-APIC   2-edge      timer\n MCE:          2          3   Machine check exceptions\n MCP:         10         10   Machine check polls\n";
        assert_eq!(parse_machine_checks(text), Some(5));
        assert_eq!(parse_machine_checks("  0: 1 2 timer\n"), None);
    }

    #[test]
    fn net_dev_errors_of_one_interface() {
        let text = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    lo:  100  2    0    0    0     0          0         0      100  2    0    0    0     0       0          0\n  eth0: 5000 40    7    1    0     0          0         0     6000 50    5    0    0     0       0          0\n";
        assert_eq!(parse_net_dev_errors(text, "eth0"), Some(12));
        assert_eq!(parse_net_dev_errors(text, "lo"), Some(0));
        assert_eq!(parse_net_dev_errors(text, "eth1"), None);
    }

    #[test]
    fn steal_is_the_eighth_field() {
        let s = parse_steal("cpu  10 0 10 70 0 0 0 10 0 0\ncpu0 1 2 3\n").expect("parsed");
        assert_eq!(
            s,
            StealTimes {
                steal: 10,
                total: 100
            }
        );
    }

    #[test]
    fn counters_read_decimal_and_hex() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("c");
        std::fs::write(&p, "0x1f\n").expect("write");
        assert_eq!(read_count(&p), Some(31));
        std::fs::write(&p, "12\n").expect("write");
        assert_eq!(read_count(&p), Some(12));
        std::fs::write(&p, "junk").expect("write");
        assert_eq!(read_count(&p), None);
    }
}
