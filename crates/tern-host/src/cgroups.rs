//! Resource control: each VM's QEMU runs in a cgroup of its own, and the agent maps the VM's
//! resource policy ([`tern_api::Resources`]) onto it.
//!
//! - shares → CPU weight (`cpu.weight` in cgroup v2, `cpu.shares` in v1);
//! - CPU reservation → a floor on that weight: among the host's VMs, a VM's weight is raised
//!   until its fraction of all the weights is at least its reservation's fraction of the host,
//!   so under full contention it still gets what it reserved (CFS has no hard reservation);
//! - CPU limit → a CFS quota (`cpu.max`, `cpu.cfs_quota_us`) per 100 ms period;
//! - memory reservation → `memory.min` (v2; v1 has only `memory.soft_limit_in_bytes`: above it
//!   the group is reclaimed first);
//! - memory limit → `memory.max` (v2), `memory.limit_in_bytes` (v1).
//!
//! The groups live under one parent per agent (default `tern/<host name>`): in cgroup v2 at the
//! root of the hierarchy (its no-internal-process rule forbids placing them under the agent's
//! own group), in v1 under the agent's own group of each hierarchy (so a host that runs the
//! agent inside a resource-limited group keeps its VMs inside it). The parent's CPU weight is
//! the sum of its VMs', so the VMs together compete with the host's other work as if each
//! stood on its own.
//!
//! A migration's threads (QEMU's migration thread, its multifd channels compressing and
//! sealing pages, or receiving them) run in the VM's group too, beside its vCPUs: while a VM
//! migrates, its group on either host weighs one normal vCPU more per migration thread, and a
//! limited one gets a core more of quota each ([`ResourceControl::set_migration_threads`]).
//! The copy then competes with the host's other work as if its threads stood on their own, as
//! vMotion's helpers do in ESXi's VMkernel, instead of taking its CPU from the guest it moves
//! (or being held to the VM's limit). The groups the configured parent path makes above the
//! VMs' parent weigh what they hold as well: at the kernel's default, one of them would hold
//! every VM below it to a single task's share.
//!
//! QEMU joins its groups between fork and exec (`tern_qemu::LaunchConfig::cgroup_procs`), so
//! every page and thread it makes is charged to the VM from the start.

use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use tern_api::VmSpec;
use uuid::Uuid;

/// CFS period of CPU limits.
pub const CPU_PERIOD_US: u64 = 100_000;
/// Smallest quota the kernel accepts per period.
const MIN_QUOTA_US: u64 = 1_000;
/// Share of the host reservations may take together; beyond it they are scaled down (the
/// host's own work needs some CPU too).
const MAX_RESERVED_FRACTION: f64 = 0.95;

/// Which cgroup hierarchy the host uses for CPU and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// Where the VM groups live and how to write their limits.
#[derive(Debug, Clone)]
pub struct ResourceControl {
    version: Version,
    /// v2: the VM parent group; v1: the parent in the `cpu` hierarchy.
    cpu_parent: PathBuf,
    /// v1 only, when `cpuacct` is mounted apart from `cpu`.
    cpuacct_parent: Option<PathBuf>,
    /// v1: the parent in the `memory` hierarchy; v2: the same as `cpu_parent`, when the
    /// memory controller is available.
    memory_parent: Option<PathBuf>,
    cores: u32,
    core_mhz: u32,
    description: String,
    /// How many groups the configured parent path makes (`tern/h1`: 2): the parent and the
    /// groups above it that tern made, each weighted by what it holds.
    parent_depth: usize,
    /// Migration threads of each VM migrating out ([`Self::set_migration_threads`]).
    migration_threads: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<Uuid, u32>>>,
}

/// One normal vCPU's shares: what each migration thread adds to its VM's weight.
const MIGRATION_THREAD_SHARES: u64 = 1000;

/// `limits` of a VM whose migration runs `threads` threads in its group: each adds a normal
/// vCPU's shares and, to a limited VM, a core of quota.
pub fn with_migration_threads(limits: GroupLimits, threads: u32) -> GroupLimits {
    if threads == 0 {
        return limits;
    }
    GroupLimits {
        cpu_shares: limits
            .cpu_shares
            .saturating_add(MIGRATION_THREAD_SHARES * u64::from(threads)),
        cpu_quota_cores: limits.cpu_quota_cores.map(|q| q + f64::from(threads)),
        ..limits
    }
}

/// The limits of one VM's group, in kernel-neutral terms.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupLimits {
    /// vSphere-style CPU shares after the reservation floor (1000 = one normal vCPU).
    pub cpu_shares: u64,
    /// Most cores the group may use, if limited.
    pub cpu_quota_cores: Option<f64>,
    pub memory_min_bytes: Option<u64>,
    pub memory_max_bytes: Option<u64>,
}

/// A parsed `/proc/self/mountinfo` line of a cgroup file system.
#[derive(Debug, Clone, PartialEq)]
struct CgroupMount {
    point: PathBuf,
    v2: bool,
    /// v1: the controllers of this hierarchy (from the super options).
    controllers: Vec<String>,
}

fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(point) = left.split(' ').nth(4) else {
            continue;
        };
        let mut r = right.split(' ');
        let fstype = r.next().unwrap_or_default();
        let _source = r.next();
        let superopts = r.next().unwrap_or_default();
        // Octal escapes (`\040`) only appear in odd mount points; such a mount is skipped.
        if point.contains('\\') {
            continue;
        }
        match fstype {
            "cgroup2" => out.push(CgroupMount {
                point: point.into(),
                v2: true,
                controllers: Vec::new(),
            }),
            "cgroup" => out.push(CgroupMount {
                point: point.into(),
                v2: false,
                controllers: superopts
                    .split(',')
                    .filter(|o| matches!(*o, "cpu" | "cpuacct" | "memory"))
                    .map(String::from)
                    .collect(),
            }),
            _ => {}
        }
    }
    out
}

/// The cgroup file systems this process sees. (A process started by `ip netns exec` sees
/// none: that mounts a fresh /sys for the namespace, hiding /sys/fs/cgroup.)
fn cgroup_mounts() -> anyhow::Result<Vec<CgroupMount>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text))
}

/// This process's group in the v1 hierarchy holding `controller`, from `/proc/self/cgroup`.
fn own_v1_group(proc_cgroup: &str, controller: &str) -> Option<PathBuf> {
    proc_cgroup.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let _id = f.next()?;
        let ctrls = f.next()?;
        let path = f.next()?;
        ctrls
            .split(',')
            .any(|c| c == controller)
            .then(|| PathBuf::from(path))
    })
}

/// `rel` below `base`, refusing anything but plain names (the parent comes from a config file).
fn join_relative(base: &Path, rel: &Path) -> anyhow::Result<PathBuf> {
    let mut out = base.to_path_buf();
    for c in rel.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            _ => bail!("cgroup path {} may only hold plain names", rel.display()),
        }
    }
    Ok(out)
}

/// Checks a configured cgroup parent: plain names of `[A-Za-z0-9._-]`, nothing else.
pub fn check_parent(parent: &str) -> anyhow::Result<()> {
    let ok = !parent.is_empty()
        && parent.split('/').filter(|c| !c.is_empty()).all(|c| {
            c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
        && parent.split('/').any(|c| !c.is_empty());
    if !ok {
        bail!("cgroup parent {parent:?}: expected names of [A-Za-z0-9._-] separated by /");
    }
    Ok(())
}

/// Checks that a parent group takes new groups. One that exists but does not (a read-only
/// cgroup mount, as a container gets) is found when the agent starts, instead of failing the
/// first VM's start.
fn check_takes_groups(dir: &Path) -> anyhow::Result<()> {
    let probe = dir.join(format!("tern-probe-{}", std::process::id()));
    match std::fs::create_dir(&probe) {
        Ok(()) => {}
        // Left by an earlier agent of the same pid that died between the two calls.
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(e).with_context(|| {
                format!("creating cgroup {} (a group for each VM)", probe.display())
            })
        }
    }
    std::fs::remove_dir(&probe).with_context(|| format!("removing cgroup {}", probe.display()))
}

impl ResourceControl {
    /// Finds the host's cgroup hierarchy and makes the VMs' parent group `parent` (relative,
    /// see the module doc). `Ok(None)`: this host has no cgroup CPU controller, so policies
    /// cannot be enforced (the caller says so).
    pub fn detect(parent: &str, cores: u32, core_mhz: u32) -> anyhow::Result<Option<Self>> {
        check_parent(parent)?;
        let own =
            std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
        let mounts = cgroup_mounts()?;
        let rel = Path::new(parent);
        // cgroup v2 when its root offers the cpu controller (pure v2, or a hybrid that moved
        // cpu there); else the v1 hierarchies.
        if let Some(m) = mounts.iter().find(|m| m.v2) {
            let ctrls =
                std::fs::read_to_string(m.point.join("cgroup.controllers")).unwrap_or_default();
            let has = |c: &str| ctrls.split_whitespace().any(|x| x == c);
            if has("cpu") {
                let dir = join_relative(&m.point, rel)?;
                let memory = has("memory");
                enable_v2_controllers(&m.point, rel, memory)?;
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating cgroup {}", dir.display()))?;
                check_takes_groups(&dir)?;
                return Ok(Some(ResourceControl {
                    version: Version::V2,
                    description: format!(
                        "cgroup v2 (cpu{}) at {}",
                        if memory { ", memory" } else { "" },
                        dir.display()
                    ),
                    memory_parent: memory.then(|| dir.clone()),
                    cpu_parent: dir,
                    cpuacct_parent: None,
                    cores,
                    core_mhz,
                    parent_depth: rel.components().count(),
                    migration_threads: Default::default(),
                }));
            }
        }
        let v1 = |ctrl: &str| -> anyhow::Result<Option<PathBuf>> {
            let Some(m) = mounts
                .iter()
                .find(|m| !m.v2 && m.controllers.iter().any(|c| c == ctrl))
            else {
                return Ok(None);
            };
            let own = own_v1_group(&own, ctrl).unwrap_or_else(|| PathBuf::from("/"));
            let dir = join_relative(&join_relative(&m.point, &own)?, rel)?;
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating cgroup {}", dir.display()))?;
            check_takes_groups(&dir)?;
            Ok(Some(dir))
        };
        let Some(cpu) = v1("cpu")? else {
            return Ok(None);
        };
        let cpuacct = v1("cpuacct")?.filter(|d| *d != cpu);
        let memory = v1("memory")?;
        let mut names = vec!["cpu"];
        if cpuacct.is_some() || mounts.iter().any(|m| m.controllers.len() > 1) {
            names.push("cpuacct");
        }
        if memory.is_some() {
            names.push("memory");
        }
        Ok(Some(ResourceControl {
            version: Version::V1,
            description: format!("cgroup v1 ({}) at {}", names.join(", "), cpu.display()),
            cpu_parent: cpu,
            cpuacct_parent: cpuacct,
            memory_parent: memory,
            cores,
            core_mhz,
            parent_depth: rel.components().count(),
            migration_threads: Default::default(),
        }))
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// One line for the host's facts, e.g. `cgroup v1 (cpu, cpuacct, memory) at …`.
    pub fn describe(&self) -> &str {
        &self.description
    }

    fn group_name(id: Uuid) -> String {
        format!("vm-{id}")
    }

    /// The VM's group in every hierarchy tern uses (v2: one).
    fn dirs(&self, id: Uuid) -> Vec<PathBuf> {
        let name = Self::group_name(id);
        let mut out = vec![self.cpu_parent.join(&name)];
        for p in [&self.cpuacct_parent, &self.memory_parent]
            .into_iter()
            .flatten()
        {
            let d = p.join(&name);
            if !out.contains(&d) {
                out.push(d);
            }
        }
        out
    }

    /// The VM's CPU group (where its weight and quota are written).
    pub fn cpu_dir(&self, id: Uuid) -> PathBuf {
        self.cpu_parent.join(Self::group_name(id))
    }

    /// Makes the VM's groups; returns the `cgroup.procs` files its QEMU must join.
    pub fn prepare(&self, id: Uuid) -> anyhow::Result<Vec<PathBuf>> {
        let mut procs = Vec::new();
        for d in self.dirs(id) {
            std::fs::create_dir_all(&d)
                .with_context(|| format!("creating cgroup {}", d.display()))?;
            procs.push(d.join("cgroup.procs"));
        }
        Ok(procs)
    }

    /// Puts a helper of the VM's migration (its relay) into the VM's CPU group, so the copy's
    /// CPU counts to the VM being moved, with the weight given to its migration threads. Not
    /// into a v1 memory group: a helper's buffers must not count against the guest's limit.
    pub fn join_cpu(&self, id: Uuid, pid: u32) -> anyhow::Result<()> {
        let procs = self.cpu_dir(id).join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .with_context(|| format!("moving process {pid} into {}", procs.display()))
    }

    /// Puts a running QEMU (adopted after an agent restart, or started before tern had
    /// resource control) into the VM's groups.
    pub fn adopt(&self, id: Uuid, pid: u32) -> anyhow::Result<()> {
        for procs in self.prepare(id)? {
            write_file(&procs, &pid.to_string())?;
        }
        Ok(())
    }

    /// Removes the VM's groups once its QEMU has ended (a group still holding a process is
    /// left, with a warning). A migration's threads ended with it: the VM no longer counts as
    /// migrating (else the next [`Self::enforce`] would write into the groups just removed,
    /// as it did for every source whose QEMU quit after its migration).
    pub fn remove(&self, id: Uuid) {
        self.set_migration_threads(id, 0);
        for d in self.dirs(id) {
            match std::fs::remove_dir(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(cgroup = %d.display(), error = %e, "cannot remove a VM's cgroup")
                }
            }
        }
    }

    /// CPU time the VM's group has used, in nanoseconds.
    pub fn cpu_usage_ns(&self, id: Uuid) -> anyhow::Result<u64> {
        let name = Self::group_name(id);
        match self.version {
            Version::V2 => {
                let f = self.cpu_parent.join(&name).join("cpu.stat");
                let text = read_file(&f)?;
                let usec = text
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or_else(|| anyhow!("{} has no usage_usec", f.display()))?;
                Ok(usec.saturating_mul(1000))
            }
            Version::V1 => {
                let dir = self.cpuacct_parent.as_ref().unwrap_or(&self.cpu_parent);
                let f = dir.join(&name).join("cpuacct.usage");
                read_file(&f)?
                    .trim()
                    .parse::<u64>()
                    .with_context(|| format!("{} is not a number", f.display()))
            }
        }
    }

    /// Whether VM `id` migrates (its group's limits are written even before its QEMU runs
    /// the guest: a destination's threads receive into it).
    pub fn is_migrating(&self, id: Uuid) -> bool {
        self.migration_threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&id)
    }

    /// Says that VM `id` migrates with `threads` migration threads in its group (0: no
    /// longer); the next [`Self::enforce`] writes its limits with them.
    pub fn set_migration_threads(&self, id: Uuid, threads: u32) {
        let mut m = self
            .migration_threads
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if threads == 0 {
            m.remove(&id);
        } else {
            m.insert(id, threads);
        }
    }

    /// Writes every VM's limits (and the parent's weight), from the policies of the VMs
    /// running here. One VM's failure does not stop the others'; the errors are returned by VM.
    pub fn enforce(&self, vms: &[(Uuid, &VmSpec)]) -> Vec<(Uuid, anyhow::Error)> {
        let threads = self
            .migration_threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let plan: Vec<(Uuid, GroupLimits)> = plan(self.cores, self.core_mhz, vms)
            .into_iter()
            .map(|(id, l)| {
                let n = threads.get(&id).copied().unwrap_or(0);
                (id, with_migration_threads(l, n))
            })
            .collect();
        let mut errors = Vec::new();
        let mut total = 0u64;
        for (id, limits) in &plan {
            total = total.saturating_add(limits.cpu_shares);
            if let Err(e) = self.write_limits(*id, limits) {
                errors.push((*id, e));
            }
        }
        // The VMs together weigh what they would if each stood alone at the parent's level.
        let parent = total.max(1000);
        if let Err(e) = self.write_weight(&self.cpu_parent, parent) {
            tracing::warn!(error = %format!("{e:#}"), "cannot set the VM parent group's CPU weight");
        }
        // And so up the groups the configured path made: left at the kernel's default, one of
        // them would hold every VM below it to one task's share (a lab's `tern-lab` holds all
        // its hosts' VMs; a host's `tern` all of its own).
        let mut dir = self.cpu_parent.parent();
        for _ in 1..self.parent_depth {
            let Some(d) = dir else { break };
            if let Err(e) = self.weigh_by_children(d) {
                tracing::warn!(cgroup = %d.display(), error = %format!("{e:#}"), "cannot set a VM group's ancestor's CPU weight");
            }
            dir = d.parent();
        }
        errors
    }

    /// Sets group `dir`'s CPU weight to the sum of its child groups' (as the kernel holds
    /// them), within the kernel's range.
    fn weigh_by_children(&self, dir: &Path) -> anyhow::Result<()> {
        let (file, max) = match self.version {
            Version::V2 => ("cpu.weight", 10_000u64),
            Version::V1 => ("cpu.shares", 262_144u64),
        };
        let mut sum = 0u64;
        for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let entry = entry?;
            if !entry.file_type()?.is_dir() {
                continue;
            }
            // A group going away meanwhile simply does not count.
            if let Ok(w) = read_file(&entry.path().join(file)) {
                sum = sum.saturating_add(w.trim().parse::<u64>().unwrap_or(0));
            }
        }
        if sum == 0 {
            return Ok(());
        }
        write_file(&dir.join(file), &sum.clamp(1, max).to_string())
    }

    fn write_weight(&self, dir: &Path, shares: u64) -> anyhow::Result<()> {
        match self.version {
            Version::V2 => write_file(&dir.join("cpu.weight"), &v2_weight(shares).to_string()),
            Version::V1 => write_file(&dir.join("cpu.shares"), &v1_shares(shares).to_string()),
        }
    }

    fn write_limits(&self, id: Uuid, l: &GroupLimits) -> anyhow::Result<()> {
        let name = Self::group_name(id);
        let cpu = self.cpu_parent.join(&name);
        self.write_weight(&cpu, l.cpu_shares)?;
        let quota = l
            .cpu_quota_cores
            .map(|c| ((c * CPU_PERIOD_US as f64).round() as u64).max(MIN_QUOTA_US));
        match self.version {
            Version::V2 => {
                let max = match quota {
                    Some(q) => format!("{q} {CPU_PERIOD_US}"),
                    None => format!("max {CPU_PERIOD_US}"),
                };
                write_file(&cpu.join("cpu.max"), &max)?;
                if let Some(mem) = &self.memory_parent {
                    let m = mem.join(&name);
                    write_file(
                        &m.join("memory.min"),
                        &l.memory_min_bytes.unwrap_or(0).to_string(),
                    )?;
                    write_file(
                        &m.join("memory.max"),
                        &l.memory_max_bytes
                            .map_or_else(|| "max".to_string(), |b| b.to_string()),
                    )?;
                }
            }
            Version::V1 => {
                write_file(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write_file(
                    &cpu.join("cpu.cfs_quota_us"),
                    &quota.map_or_else(|| "-1".to_string(), |q| q.to_string()),
                )?;
                if let Some(mem) = &self.memory_parent {
                    let m = mem.join(&name);
                    write_file(
                        &m.join("memory.soft_limit_in_bytes"),
                        &l.memory_min_bytes
                            .map_or_else(|| "-1".to_string(), |b| b.to_string()),
                    )?;
                    write_file(
                        &m.join("memory.limit_in_bytes"),
                        &l.memory_max_bytes
                            .map_or_else(|| "-1".to_string(), |b| b.to_string()),
                    )?;
                }
            }
        }
        Ok(())
    }
}

/// What the kernel says of a process's groups: read from `/proc/PID/cgroup` and the group
/// files, independently of what the agent wrote (for reports and tests).
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessGroups {
    /// The group holding the CPU controller.
    pub cpu_dir: PathBuf,
    /// CPU time used by the group, in nanoseconds.
    pub cpu_usage_ns: u64,
    /// The weight as written (v1 `cpu.shares`, v2 `cpu.weight`).
    pub cpu_weight: u64,
    /// The quota in cores, if limited.
    pub cpu_quota_cores: Option<f64>,
    /// The hard memory limit in bytes, if any.
    pub memory_max_bytes: Option<u64>,
    pub version: Version,
}

impl ProcessGroups {
    pub fn of(pid: u32) -> anyhow::Result<ProcessGroups> {
        let own = read_file(Path::new(&format!("/proc/{pid}/cgroup")))?;
        let mounts = cgroup_mounts()?;
        let v1_dir = |ctrl: &str| -> Option<PathBuf> {
            let m = mounts
                .iter()
                .find(|m| !m.v2 && m.controllers.iter().any(|c| c == ctrl))?;
            join_relative(&m.point, &own_v1_group(&own, ctrl)?).ok()
        };
        let unlimited =
            |v: &str| v == "-1" || v == "max" || v.parse::<u64>().is_ok_and(|b| b >= 1 << 62);
        if let Some(cpu) = v1_dir("cpu") {
            let acct = v1_dir("cpuacct").unwrap_or_else(|| cpu.clone());
            let quota = read_file(&cpu.join("cpu.cfs_quota_us"))?;
            let period = read_file(&cpu.join("cpu.cfs_period_us"))?;
            let memory = v1_dir("memory")
                .map(|m| read_file(&m.join("memory.limit_in_bytes")))
                .transpose()?;
            return Ok(ProcessGroups {
                cpu_usage_ns: parse_u64(&read_file(&acct.join("cpuacct.usage"))?)?,
                cpu_weight: parse_u64(&read_file(&cpu.join("cpu.shares"))?)?,
                cpu_quota_cores: if unlimited(quota.trim()) {
                    None
                } else {
                    Some(parse_u64(&quota)? as f64 / parse_u64(&period)?.max(1) as f64)
                },
                memory_max_bytes: memory
                    .filter(|m| !unlimited(m.trim()))
                    .map(|m| parse_u64(&m))
                    .transpose()?,
                cpu_dir: cpu,
                version: Version::V1,
            });
        }
        let m = mounts
            .iter()
            .find(|m| m.v2)
            .ok_or_else(|| anyhow!("no cgroup file system is mounted"))?;
        let path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| anyhow!("process {pid} has no cgroup v2 group"))?;
        let dir = join_relative(&m.point, Path::new(path))?;
        let stat = read_file(&dir.join("cpu.stat"))?;
        let usec = stat
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .ok_or_else(|| anyhow!("{} has no usage_usec", dir.display()))?;
        let max = read_file(&dir.join("cpu.max"))?;
        let mut max = max.split_whitespace();
        let (q, p) = (max.next().unwrap_or("max"), max.next().unwrap_or("100000"));
        let memory = std::fs::read_to_string(dir.join("memory.max")).ok();
        Ok(ProcessGroups {
            cpu_usage_ns: parse_u64(usec)?.saturating_mul(1000),
            cpu_weight: parse_u64(&read_file(&dir.join("cpu.weight"))?)?,
            cpu_quota_cores: if unlimited(q) {
                None
            } else {
                Some(parse_u64(q)? as f64 / parse_u64(p)?.max(1) as f64)
            },
            memory_max_bytes: memory
                .filter(|m| !unlimited(m.trim()))
                .map(|m| parse_u64(&m))
                .transpose()?,
            cpu_dir: dir,
            version: Version::V2,
        })
    }
}

fn parse_u64(s: &str) -> anyhow::Result<u64> {
    s.trim()
        .parse()
        .with_context(|| format!("{:?} is not a number", s.trim()))
}

/// Removes the groups under `parent` (as given to [`ResourceControl::detect`]) in every
/// hierarchy, deepest first; groups still holding a process stay. Returns how many were
/// removed. For tearing down what a set of agents made (the lab).
pub fn remove_tree(parent: &str) -> anyhow::Result<usize> {
    check_parent(parent)?;
    let own = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let rel = Path::new(parent);
    let mut roots = Vec::new();
    for m in cgroup_mounts()? {
        if m.v2 {
            roots.push(join_relative(&m.point, rel)?);
        }
        for c in &m.controllers {
            let group = own_v1_group(&own, c).unwrap_or_else(|| PathBuf::from("/"));
            roots.push(join_relative(&join_relative(&m.point, &group)?, rel)?);
        }
    }
    roots.sort();
    roots.dedup();
    let mut removed = 0;
    for r in roots {
        removed += remove_dirs_below(&r);
    }
    Ok(removed)
}

/// rmdir of `dir` and every group below it, children first.
fn remove_dirs_below(dir: &Path) -> usize {
    let mut n = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                n += remove_dirs_below(&e.path());
            }
        }
    }
    if std::fs::remove_dir(dir).is_ok() {
        n += 1;
    }
    n
}

/// Turns on the cpu (and memory) controllers for the groups below the v2 root down to the
/// VM parent (each level must hand them down to the next).
fn enable_v2_controllers(root: &Path, rel: &Path, memory: bool) -> anyhow::Result<()> {
    let want = if memory { "+cpu +memory" } else { "+cpu" };
    let mut dir = root.to_path_buf();
    write_file(&dir.join("cgroup.subtree_control"), want)?;
    for c in rel.components() {
        if let Component::Normal(n) = c {
            dir.push(n);
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating cgroup {}", dir.display()))?;
            write_file(&dir.join("cgroup.subtree_control"), want)?;
        }
    }
    Ok(())
}

fn write_file(path: &Path, value: &str) -> anyhow::Result<()> {
    std::fs::write(path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
}

fn read_file(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// vSphere-style shares → cgroup v2 `cpu.weight` (100 = one normal vCPU; 1..10000).
pub fn v2_weight(shares: u64) -> u64 {
    (shares / 10).clamp(1, 10_000)
}

/// vSphere-style shares → cgroup v1 `cpu.shares` (1024 = one normal vCPU; 2..262144).
pub fn v1_shares(shares: u64) -> u64 {
    (shares.saturating_mul(1024) / 1000).clamp(2, 262_144)
}

/// Every VM's group limits from the policies of the VMs on a host of `cores` cores at
/// `core_mhz` each.
///
/// The reservation floor: a VM reserving the fraction `r` of the host needs a weight of at
/// least `r × W`, `W` being the sum of all weights. With `B` the shares of the VMs not raised
/// and `R` the reserved fractions of those raised, `W = B / (1 - R)`; the set of raised VMs
/// grows until it is stable (at most one round per VM).
pub fn plan(cores: u32, core_mhz: u32, vms: &[(Uuid, &VmSpec)]) -> Vec<(Uuid, GroupLimits)> {
    let host_cores = f64::from(cores.max(1));
    let base: Vec<f64> = vms
        .iter()
        .map(|(_, s)| s.resources.cpu_shares.cpu_shares(s.vcpus) as f64)
        .collect();
    let mut reserved: Vec<f64> = vms
        .iter()
        .map(|(_, s)| {
            s.resources
                .cpu_reservation
                .map_or(0.0, |r| r.cores(core_mhz) / host_cores)
        })
        .collect();
    let sum: f64 = reserved.iter().sum();
    if sum > MAX_RESERVED_FRACTION {
        tracing::warn!(
            reserved_percent = sum * 100.0,
            "the VMs here reserve more CPU than the host has: reservations scaled down"
        );
        for r in &mut reserved {
            *r *= MAX_RESERVED_FRACTION / sum;
        }
    }
    let mut raised = vec![false; vms.len()];
    let mut total = base.iter().sum::<f64>();
    for _ in 0..=vms.len() {
        let free: f64 = (0..vms.len())
            .filter(|&i| !raised[i])
            .map(|i| base[i])
            .sum();
        let held: f64 = (0..vms.len())
            .filter(|&i| raised[i])
            .map(|i| reserved[i])
            .sum();
        // Every VM raised: only the reservations' proportions matter.
        total = if free <= 0.0 {
            base.iter().sum::<f64>()
        } else if held < 1.0 {
            free / (1.0 - held)
        } else {
            free
        };
        let mut changed = false;
        for i in 0..vms.len() {
            if !raised[i] && reserved[i] * total > base[i] {
                raised[i] = true;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    vms.iter()
        .enumerate()
        .map(|(i, (id, s))| {
            let r = &s.resources;
            let shares = if raised[i] {
                (reserved[i] * total).ceil()
            } else {
                base[i]
            };
            (
                *id,
                GroupLimits {
                    cpu_shares: shares.max(1.0) as u64,
                    cpu_quota_cores: r.cpu_limit.map(|l| l.cores(core_mhz)),
                    memory_min_bytes: r.memory_reservation_mib.map(|m| m << 20),
                    memory_max_bytes: r.memory_limit_mib.map(|m| m << 20),
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tern_api::{CpuAmount, Resources, Shares};

    #[test]
    fn a_migrating_vm_weighs_one_normal_vcpu_more_per_migration_thread() {
        let limited = GroupLimits {
            cpu_shares: 1000,
            cpu_quota_cores: Some(0.5),
            memory_min_bytes: None,
            memory_max_bytes: Some(1 << 30),
        };
        let moving = with_migration_threads(limited.clone(), 2);
        assert_eq!(moving.cpu_shares, 3000);
        assert_eq!(moving.cpu_quota_cores, Some(2.5));
        assert_eq!(
            moving.memory_max_bytes,
            Some(1 << 30),
            "memory stays the VM's"
        );
        assert_eq!(with_migration_threads(limited.clone(), 0), limited);
        let unlimited = GroupLimits {
            cpu_quota_cores: None,
            ..limited
        };
        assert_eq!(with_migration_threads(unlimited, 1).cpu_quota_cores, None);
    }

    /// The plan by VM.
    fn plan_by_id(
        cores: u32,
        core_mhz: u32,
        vms: &[(Uuid, &VmSpec)],
    ) -> HashMap<Uuid, GroupLimits> {
        plan(cores, core_mhz, vms).into_iter().collect()
    }

    fn spec(vcpus: u32, resources: Resources) -> VmSpec {
        VmSpec {
            firmware: Default::default(),
            cloud_init: None,
            name: "v".into(),
            vcpus,
            memory_mib: 256,
            cpu_model: None,
            boot: tern_api::BootSource::Disk,
            disks: Vec::new(),
            nics: Vec::new(),
            resources,
        }
    }

    #[test]
    fn mountinfo_gives_v1_controllers_and_the_v2_mount() {
        let text = "\
35 25 0:30 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu
36 25 0:31 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
37 25 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
38 25 0:33 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
39 25 0:34 / /proc rw - proc proc rw
40 25 0:35 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 5);
        assert_eq!(m[0].controllers, vec!["cpu"]);
        assert!(m[3].v2);
        assert_eq!(m[4].controllers, vec!["cpu", "cpuacct"]);
        let own = "4:memory:/process_api/abc\n2:cpu,cpuacct:/\n0::/";
        assert_eq!(
            own_v1_group(own, "memory"),
            Some(PathBuf::from("/process_api/abc"))
        );
        assert_eq!(own_v1_group(own, "cpuacct"), Some(PathBuf::from("/")));
        assert_eq!(own_v1_group(own, "pids"), None);
    }

    #[test]
    fn a_parent_from_the_config_is_plain_names_only() {
        for ok in ["tern", "tern/h1", "tern-lab/abc_1.x/h2"] {
            assert!(check_parent(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/",
            "../x",
            "tern/../..",
            "a b",
            "tern/$(x)",
            "a\nb",
            ".",
        ] {
            assert!(check_parent(bad).is_err(), "{bad:?}");
        }
        assert!(join_relative(Path::new("/c"), Path::new("a/../b")).is_err());
    }

    #[test]
    fn shares_become_weights_in_both_versions() {
        assert_eq!(v1_shares(1000), 1024);
        assert_eq!(v1_shares(2000), 2048);
        assert_eq!(v1_shares(1), 2);
        assert_eq!(v2_weight(1000), 100);
        assert_eq!(v2_weight(5), 1);
        assert_eq!(v2_weight(10_000_000), 10_000);
    }

    #[test]
    fn reservations_raise_weights_to_their_fraction_of_the_host() {
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        let c = Uuid::from_u128(3);
        let plain = spec(1, Resources::default());
        let high = spec(
            1,
            Resources {
                cpu_shares: Shares::High,
                cpu_limit: Some(CpuAmount::CorePercent(25)),
                memory_limit_mib: Some(512),
                ..Resources::default()
            },
        );
        // Half of a 2-core host (one core at 2000 MHz) reserved by a low-shares VM.
        let reserving = spec(
            1,
            Resources {
                cpu_shares: Shares::Low,
                cpu_reservation: Some(CpuAmount::Mhz(2000)),
                ..Resources::default()
            },
        );
        let p = plan_by_id(2, 2000, &[(a, &plain), (b, &high), (c, &reserving)]);
        assert_eq!(p[&a].cpu_shares, 1000);
        assert_eq!(p[&b].cpu_shares, 2000);
        assert_eq!(p[&b].cpu_quota_cores, Some(0.25));
        assert_eq!(p[&b].memory_max_bytes, Some(512 << 20));
        // 3000 unraised shares and half the host reserved: the total is 6000, c gets 3000.
        assert_eq!(p[&c].cpu_shares, 3000);
        let total: u64 = p.values().map(|l| l.cpu_shares).sum();
        assert!(p[&c].cpu_shares as f64 / total as f64 >= 0.5);
        // Without the reservation c keeps its low shares.
        let p = plan_by_id(
            2,
            2000,
            &[
                (a, &plain),
                (
                    c,
                    &spec(
                        1,
                        Resources {
                            cpu_shares: Shares::Low,
                            ..Resources::default()
                        },
                    ),
                ),
            ],
        );
        assert_eq!(p[&c].cpu_shares, 500);
    }

    #[test]
    fn reservations_beyond_the_host_are_scaled_down_not_divided_by_zero() {
        let big = spec(
            2,
            Resources {
                cpu_reservation: Some(CpuAmount::CorePercent(200)),
                ..Resources::default()
            },
        );
        let ids = [Uuid::from_u128(1), Uuid::from_u128(2)];
        let p = plan(2, 2000, &[(ids[0], &big), (ids[1], &big)]);
        for (_, l) in &p {
            assert!(l.cpu_shares >= 1 && l.cpu_shares < u64::MAX / 2, "{l:?}");
        }
    }
}
