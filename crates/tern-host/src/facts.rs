//! What this host is: CPU, memory and QEMU figures read from /proc and the QEMU binary, and
//! the CPU capability it offers guests (EVC), probed from QEMU once at start.

use std::path::Path;

use anyhow::Context;
use tern_api::evc::HostCpu;
use tern_api::{Accelerator, HostFacts};
use tern_cpu::{Accel, CpuModelExpansion, HostCapability};

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

/// QEMU's `host` (KVM) or `max` (TCG) CPU model expanded: what guests can be given here
/// before any ceiling. A `-machine none` QEMU answers `query-cpu-model-expansion`.
pub async fn probe_expansion(
    qemu: &Path,
    accelerator: Accelerator,
) -> anyhow::Result<CpuModelExpansion> {
    let probe = tern_qemu::QemuProbe::start(qemu, accelerator)
        .await
        .with_context(|| format!("starting {} -machine none", qemu.display()))?;
    let model = accel_of(accelerator).passthrough_model();
    let answer = probe
        .expand_cpu_model(model, tern_qemu::CpuExpansion::Full)
        .await;
    probe.stop().await;
    let answer = answer.with_context(|| format!("expanding QEMU's `{model}` CPU model"))?;
    Ok(tern_cpu::expansion::expansion_from_value(&answer)?)
}

pub fn accel_of(accelerator: Accelerator) -> Accel {
    match accelerator {
        Accelerator::Kvm => Accel::Kvm,
        Accelerator::Tcg => Accel::Tcg,
    }
}

/// The facts' view of a capability.
pub fn host_cpu(cap: &HostCapability) -> HostCpu {
    HostCpu {
        vendor: cap.identity.vendor.as_ref().map(|v| v.cpuid().to_string()),
        family: cap.identity.family,
        model: cap.identity.model,
        stepping: cap.identity.stepping,
        model_id: cap.identity.model_id.clone(),
        uncapped: cap.uncapped.to_vec(),
        supported_baselines: cap
            .supported_baselines()
            .iter()
            .map(|b| b.name.clone())
            .collect(),
        best_baseline: cap.best_baseline().map(|b| b.name.clone()),
    }
}

/// What this host offers guests from QEMU's expansion, under the configured ceiling; fails
/// only on a ceiling this host cannot have (a configuration error).
fn capability_of(
    cfg: &AgentConfig,
    exp: &CpuModelExpansion,
    accelerator: Accelerator,
) -> anyhow::Result<HostCapability> {
    let ceiling = cfg.cpu_ceiling.as_deref().filter(|c| !c.trim().is_empty());
    let cap = HostCapability::from_expansion(exp, accel_of(accelerator), ceiling)
        .context("--cpu-ceiling")?;
    tracing::info!(
        ceiling = ceiling.unwrap_or("-"),
        best_baseline = cap.best_baseline().map_or("-", |b| b.name.as_str()),
        features = cap.features.len(),
        "CPU capability probed"
    );
    Ok(cap)
}

/// Puts a probed capability into the facts.
pub fn set_capability(facts: &mut HostFacts, cap: &HostCapability) {
    facts.cpu_capability = cap.features.to_vec();
    facts.cpu = Some(host_cpu(cap));
}

/// Probes the CPU capability again until it succeeds (back-off from 1 s to 60 s), then puts it
/// into `facts` — heartbeats carry it to the center from then on. For an agent whose probe
/// failed at start: a transient failure must not leave the host refused by EVC clusters.
pub async fn reprobe_until_known(
    cfg: &AgentConfig,
    accelerator: Accelerator,
    facts: &std::sync::RwLock<HostFacts>,
    stop: &tokio_util::sync::CancellationToken,
) {
    let mut wait = std::time::Duration::from_secs(1);
    for attempt in 2u32.. {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        match probe_expansion(&cfg.qemu, accelerator).await {
            Ok(exp) => {
                let cap = match capability_of(cfg, &exp, accelerator) {
                    Ok(cap) => cap,
                    Err(e) => {
                        tracing::error!("{e:#}");
                        return;
                    }
                };
                let mut f = facts.write().unwrap_or_else(|e| e.into_inner());
                set_capability(&mut f, &cap);
                tracing::info!(
                    attempt,
                    "CPU capability known now; the center learns it with the next heartbeat"
                );
                return;
            }
            Err(e) => {
                tracing::warn!(
                    attempt,
                    "CPU capability probe failed again ({e:#}); retrying in {} s",
                    (wait * 2).min(MAX_REPROBE_WAIT).as_secs()
                );
                wait = (wait * 2).min(MAX_REPROBE_WAIT);
            }
        }
    }
}

/// Longest pause between two probes of a capability that failed.
const MAX_REPROBE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Collects the facts the agent reports, once at start (only a CPU capability that could not
/// be probed then fills in later, through [`reprobe_until_known`]).
///
/// A `--cpu-ceiling` that is no catalogue model (or, under KVM, of the other vendor) fails the
/// start; a QEMU that cannot be probed leaves the CPU capability empty (the center refuses
/// the host in a cluster with an EVC mode until it is known) with a warning.
pub async fn gather(cfg: &AgentConfig, accelerator: Accelerator) -> anyhow::Result<HostFacts> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").context("reading /proc/cpuinfo")?;
    let cpu = parse_cpuinfo(&cpuinfo);
    let cores = if cpu.processors > 0 {
        cpu.processors
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
    };
    let mem = read_meminfo()?;
    let ceiling = cfg.cpu_ceiling.as_deref().filter(|c| !c.trim().is_empty());
    if let Some(c) = ceiling {
        tern_cpu::catalogue().require(c).context("--cpu-ceiling")?;
    }
    let capability = match probe_expansion(&cfg.qemu, accelerator).await {
        Ok(exp) => Some(capability_of(cfg, &exp, accelerator)?),
        Err(e) => {
            tracing::warn!(
                "cannot probe the CPU capability ({e:#}); clusters with an EVC mode refuse \
                 this host until a later probe succeeds (retried in the background)"
            );
            None
        }
    };
    Ok(HostFacts {
        resource_control: None,
        uefi: false,
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
        cpu_capability: capability
            .as_ref()
            .map(|c| c.features.to_vec())
            .unwrap_or_default(),
        cpu_ceiling: ceiling.map(str::to_string),
        cpu: capability.as_ref().map(host_cpu),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        migration_tls: qemu_has_object(&cfg.qemu, "tls-creds-psk").await,
        migration_relay: !cfg.qemu_migration_tls,
        relay_source_checked: !cfg.qemu_migration_tls,
    })
}

/// Whether `qemu -object help` lists the object type `kind` (a QEMU built without GnuTLS has
/// no TLS credentials); `false` when QEMU cannot be asked.
pub async fn qemu_has_object(qemu: &Path, kind: &str) -> bool {
    let out = tokio::process::Command::new(qemu)
        .args(["-object", "help"])
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    match out {
        Ok(o) if o.status.success() => lists_object(&String::from_utf8_lossy(&o.stdout), kind),
        Ok(o) => {
            tracing::warn!("{} -object help failed ({})", qemu.display(), o.status);
            false
        }
        Err(e) => {
            tracing::warn!("cannot run {} -object help: {e}", qemu.display());
            false
        }
    }
}

/// `kind` is one of the lines of QEMU's `-object help` list.
fn lists_object(help: &str, kind: &str) -> bool {
    help.lines().any(|l| l.trim() == kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPUINFO: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n\
cpu MHz\t\t: 2599.998\nflags\t\t: fpu vme sse2 lm\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) Processor\n\
cpu MHz\t\t: 2400.000\nflags\t\t: fpu vme sse2 lm\n";

    #[test]
    fn object_types_are_matched_whole() {
        let help = "List of user creatable objects:\n  tls-cipher-suites\n  tls-creds-anon\n  \
                    tls-creds-psk\n  tls-creds-x509\n";
        assert!(lists_object(help, "tls-creds-psk"));
        assert!(!lists_object(help, "tls-creds"));
        assert!(!lists_object("  tls-creds-anon\n", "tls-creds-psk"));
    }

    #[tokio::test]
    async fn this_machines_qemu_can_encrypt_migrations() {
        assert!(qemu_has_object(Path::new("qemu-system-x86_64"), "tls-creds-psk").await);
        assert!(!qemu_has_object(Path::new("/nonexistent/qemu"), "tls-creds-psk").await);
    }

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

    /// The real QEMU under TCG: `max` has AVX2; a Westmere ceiling takes AVX away.
    #[tokio::test]
    async fn probes_qemu_tcg_capability() {
        let exp = probe_expansion(Path::new("qemu-system-x86_64"), Accelerator::Tcg)
            .await
            .expect("probe QEMU");
        assert_eq!(exp.model_name, "max");
        let cap = HostCapability::from_expansion(&exp, Accel::Tcg, None).unwrap();
        assert!(cap.features.contains("avx2"), "{:?}", cap.features);
        let cpu = host_cpu(&cap);
        assert!(cpu.supported_baselines.iter().any(|b| b == "x86-64-v3"));
        let capped = HostCapability::from_expansion(&exp, Accel::Tcg, Some("Westmere")).unwrap();
        assert!(!capped.features.contains("avx") && capped.features.contains("sse4.2"));
        assert_eq!(host_cpu(&capped).best_baseline.as_deref(), Some("Westmere"));
        assert!(HostCapability::from_expansion(&exp, Accel::Tcg, Some("Pentium9")).is_err());
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
