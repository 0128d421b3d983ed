//! What this host is: CPU, memory and QEMU figures read from /proc and the QEMU binary.

use std::path::Path;

use anyhow::Context;
use tern_api::{Accelerator, HostFacts};

use crate::config::AgentConfig;

/// The first CPU's description from /proc/cpuinfo, and the number of CPUs listed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CpuInfo {
    pub processors: u32,
    pub model_name: String,
    pub mhz: u32,
    pub flags: Vec<String>,
}

/// Parses /proc/cpuinfo (x86 layout: `key\t: value`, one block per processor).
pub fn parse_cpuinfo(text: &str) -> CpuInfo {
    let mut info = CpuInfo::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "processor" => info.processors += 1,
            // Values of the first processor only: hosts are assumed homogeneous.
            "model name" if info.model_name.is_empty() => info.model_name = value.to_string(),
            "cpu MHz" if info.mhz == 0 => {
                info.mhz = value.parse::<f64>().map(|m| m.round() as u32).unwrap_or(0)
            }
            "flags" if info.flags.is_empty() => {
                info.flags = value.split_whitespace().map(str::to_string).collect()
            }
            _ => {}
        }
    }
    info
}

/// Memory figures of /proc/meminfo, in MiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemInfo {
    pub total_mib: u64,
    pub available_mib: u64,
}

/// Parses /proc/meminfo (`MemTotal:  24594200 kB`).
pub fn parse_meminfo(text: &str) -> MemInfo {
    let mut m = MemInfo::default();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let kib: u64 = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        match key {
            "MemTotal" => m.total_mib = kib / 1024,
            "MemAvailable" => m.available_mib = kib / 1024,
            _ => {}
        }
    }
    m
}

/// Reads /proc/meminfo.
pub fn read_meminfo() -> anyhow::Result<MemInfo> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    Ok(parse_meminfo(&text))
}

/// Extracts `10.0.2` from `QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)`.
pub fn parse_qemu_version(output: &str) -> Option<String> {
    let first = output.lines().next()?;
    let rest = first.split("version").nth(1)?;
    let version = rest.split_whitespace().next()?;
    version
        .chars()
        .next()
        .filter(char::is_ascii_digit)
        .map(|_| version.to_string())
}

/// Runs `QEMU --version` and returns its version number.
pub async fn qemu_version(qemu: &Path) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(qemu)
        .arg("--version")
        .output()
        .await
        .with_context(|| {
            format!(
                "running {} --version (is QEMU installed? set --qemu)",
                qemu.display()
            )
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_qemu_version(&text).with_context(|| {
        format!(
            "{} --version printed no version: {:?}",
            qemu.display(),
            text.trim()
        )
    })
}

/// Collects the facts the agent reports, once at start (none of them changes while it runs).
pub async fn gather(cfg: &AgentConfig, accelerator: Accelerator) -> anyhow::Result<HostFacts> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").context("reading /proc/cpuinfo")?;
    let cpu = parse_cpuinfo(&cpuinfo);
    let cores = if cpu.processors > 0 {
        cpu.processors
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
    };
    let mem = read_meminfo()?;
    Ok(HostFacts {
        hostname: cfg.name.clone(),
        cores,
        memory_mib: mem.total_mib,
        cpu_mhz: cpu.mhz,
        cpu_model_name: cpu.model_name,
        cpu_flags: cpu.flags,
        qemu_version: qemu_version(&cfg.qemu).await?,
        accelerator,
        migration_address: cfg.migration_address.to_string(),
        shared_storage: cfg
            .shared_storage
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        cpu_capability: Vec::new(),
        cpu_ceiling: cfg.cpu_ceiling.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPUINFO: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n\
cpu MHz\t\t: 2599.998\nflags\t\t: fpu vme sse2 lm\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) Processor\n\
cpu MHz\t\t: 2400.000\nflags\t\t: fpu vme sse2 lm\n";

    #[test]
    fn cpuinfo() {
        let c = parse_cpuinfo(CPUINFO);
        assert_eq!(c.processors, 2);
        assert_eq!(c.model_name, "Intel(R) Xeon(R) Processor");
        assert_eq!(c.mhz, 2600);
        assert_eq!(c.flags, vec!["fpu", "vme", "sse2", "lm"]);
    }

    #[test]
    fn meminfo() {
        let m = parse_meminfo(
            "MemTotal:       24594200 kB\nMemFree:  100 kB\nMemAvailable:   20480000 kB\n",
        );
        assert_eq!(m.total_mib, 24017);
        assert_eq!(m.available_mib, 20000);
    }

    #[test]
    fn qemu_versions() {
        assert_eq!(
            parse_qemu_version(
                "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright"
            ),
            Some("10.0.2".to_string())
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 7.2.15\n"),
            Some("7.2.15".to_string())
        );
        assert_eq!(parse_qemu_version("something else"), None);
    }

    #[test]
    fn this_machine() {
        let text = std::fs::read_to_string("/proc/cpuinfo").expect("cpuinfo");
        let c = parse_cpuinfo(&text);
        assert!(c.processors >= 1);
        assert!(!c.flags.is_empty());
        assert!(read_meminfo().expect("meminfo").total_mib > 0);
    }
}
