//! The trace format: three CSV tables (hosts, VMs, demand samples) read from and written to
//! any reader/writer the caller opens, so the engine crate does no file I/O of its own.
//!
//! Plain comma-separated values with a header line; no quoting (names hold no commas);
//! columns are found by header name, in any order; unknown columns are ignored; empty
//! optional cells take the default; lines starting with `#` are comments.
//!
//! `vms.csv` — one line per VM:
//!
//! | column | required | meaning |
//! | --- | --- | --- |
//! | `vm` | yes | unique name |
//! | `vcpus` | yes | virtual CPUs |
//! | `memory_mib` | yes | configured memory |
//! | `dirty_mib_per_s` | no (0) | memory dirty rate (migration cost) |
//! | `cpu_reservation_mhz`, `memory_reservation_mib` | no (0) | reservations |
//! | `cpu_limit_mhz`, `memory_limit_mib` | no (none) | limits |
//! | `cpu_shares`, `memory_shares` | no (`normal`) | `low`, `normal`, `high` or a number |
//! | `pool` | no (root) | resource pool (created with default settings) |
//! | `automation` | no (cluster's) | `fully_automated`, `partially_automated`, `manual`, `disabled` |
//! | `anti_affinity` | no | anti-affinity group name: VMs sharing it never share a host |
//! | `affinity` | no | affinity group name: VMs sharing it run together |
//! | `host_rule` | no | `RELATION:GROUP`, e.g. `must_run_on:licensed`, `should_not_run_on:rack-b` |
//! | `host` | no (placed) | the host the VM runs on when it arrives (a real cluster's placement, to replay it); needs `hosts.csv` |
//! | `cpu_features` | no (any host) | CPU features the VM's CPU needs, separated by `;` (its EVC baseline's) |
//!
//! `demand.csv` — one line per VM per sample: `timestamp_s,vm,cpu_mhz,memory_mib`.
//! Timestamps are seconds on any clock; samples are bucketed into steps of `step_s` from the
//! first timestamp (default: the smallest gap between distinct timestamps). A VM exists from
//! its first to its last sample; a missing sample repeats the previous one; an empty
//! `memory_mib` repeats the previous value (70 % of configured memory at first). A trace
//! spans at most [`MAX_STEPS`] steps (a stray timestamp would otherwise ask for years of
//! steps); the line of the timestamp that goes beyond is named.
//!
//! `hosts.csv` (optional: without it the caller sizes hosts, see
//! [`super::workload::size_hosts`]) — `host,cpu_mhz,memory_mib[,groups][,state][,cpu_features]`,
//! `groups` separated by `;`, `state` one of `connected`, `maintenance`, `disconnected`,
//! `degraded`; `cpu_features` (separated by `;`) are what the host's CPU offers a guest
//! (empty: not modelled, any VM runs there). A migration or placement onto a host that lacks
//! a VM's features fails in the simulator, as QEMU's would.
//!
//! Converting Azure's public VM traces (AzurePublicDataset v1/v2): take `vmtable.csv`
//! (vm id, subscription, deployment, created, deleted, max/avg/p95 CPU, category, core
//! bucket, memory bucket) to `vms.csv` with `vcpus` from the core bucket and `memory_mib`
//! from the memory bucket (GB × 1024), and the `vm_cpu_readings` files (timestamp, vm id,
//! min, max, avg CPU %) to `demand.csv` with `cpu_mhz = avg% / 100 × vcpus × MHz per core`;
//! Azure has no memory series, so leave `memory_mib` empty (a constant fraction of size).
//! `bench/drs/azure_to_tern.py` does exactly this.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::BufRead;

use crate::model::{Automation, Host, HostState, Pool, Rule, Shares, Vm, VmHostRelation};
use crate::sim::workload::{Workload, WorkloadVm};

/// Most steps a trace may span.
pub const MAX_STEPS: usize = 1_000_000;

/// A trace that cannot be read: the table, line and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{table}: line {line}: {message}")]
    Bad {
        table: &'static str,
        line: usize,
        message: String,
    },
    #[error("{table}: missing required column {column:?} in the header")]
    MissingColumn {
        table: &'static str,
        column: &'static str,
    },
    #[error("{table}: {source}")]
    Io {
        table: &'static str,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

struct Table {
    name: &'static str,
    header: HashMap<String, usize>,
    rows: Vec<(usize, Vec<String>)>,
}

impl Table {
    fn read(name: &'static str, reader: impl BufRead) -> Result<Table, TraceError> {
        let mut header = None;
        let mut rows = Vec::new();
        for (i, line) in reader.lines().enumerate() {
            let line = line.map_err(|source| TraceError::Io {
                table: name,
                source,
            })?;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let cells: Vec<String> = line.split(',').map(|c| c.trim().to_string()).collect();
            if header.is_none() {
                header = Some(
                    cells
                        .iter()
                        .enumerate()
                        .map(|(k, c)| (c.to_ascii_lowercase(), k))
                        .collect(),
                );
            } else {
                rows.push((i + 1, cells));
            }
        }
        Ok(Table {
            name,
            header: header.unwrap_or_default(),
            rows,
        })
    }

    fn col(&self, name: &'static str) -> Result<usize, TraceError> {
        self.header
            .get(name)
            .copied()
            .ok_or(TraceError::MissingColumn {
                table: self.name,
                column: name,
            })
    }

    fn opt(&self, name: &str) -> Option<usize> {
        self.header.get(name).copied()
    }

    fn bad(&self, line: usize, message: impl Into<String>) -> TraceError {
        TraceError::Bad {
            table: self.name,
            line,
            message: message.into(),
        }
    }
}

fn cell(row: &[String], col: Option<usize>) -> Option<&str> {
    col.and_then(|c| row.get(c))
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

fn num(t: &Table, line: usize, what: &str, s: &str) -> Result<f64, TraceError> {
    s.parse::<f64>()
        .ok()
        .filter(|x| x.is_finite() && *x >= 0.0)
        .ok_or_else(|| t.bad(line, format!("{what}: {s:?} is not a non-negative number")))
}

fn shares(t: &Table, line: usize, s: &str) -> Result<Shares, TraceError> {
    Ok(match s {
        "low" => Shares::Low,
        "normal" => Shares::Normal,
        "high" => Shares::High,
        n => Shares::Custom(n.parse().map_err(|_| {
            t.bad(
                line,
                format!("shares: {n:?} is not low, normal, high or a number"),
            )
        })?),
    })
}

/// A `;`-separated list of CPU feature names (letters, digits, `_`, `-`, `.`).
fn features(t: &Table, line: usize, s: &str) -> Result<Vec<String>, TraceError> {
    let mut out = Vec::new();
    for f in s.split(';').map(str::trim).filter(|f| !f.is_empty()) {
        if f.len() > 64
            || !f
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(t.bad(line, format!("cpu_features: {f:?} is not a feature name")));
        }
        out.push(f.to_string());
    }
    Ok(out)
}

fn relation(s: &str) -> Option<VmHostRelation> {
    Some(match s {
        "must_run_on" => VmHostRelation::MustRunOn,
        "must_not_run_on" => VmHostRelation::MustNotRunOn,
        "should_run_on" => VmHostRelation::ShouldRunOn,
        "should_not_run_on" => VmHostRelation::ShouldNotRunOn,
        _ => return None,
    })
}

/// Reads a trace. `hosts` may be `None` (the caller sizes hosts afterwards); `step_s`
/// overrides the step inferred from the timestamps.
pub fn read(
    hosts: Option<impl BufRead>,
    vms: impl BufRead,
    demand: impl BufRead,
    step_s: Option<u64>,
) -> Result<Workload, TraceError> {
    let host_list = match hosts {
        Some(r) => read_hosts(r)?,
        None => Vec::new(),
    };
    let vt = Table::read("vms.csv", vms)?;
    let (c_vm, c_vcpus, c_mem) = (vt.col("vm")?, vt.col("vcpus")?, vt.col("memory_mib")?);
    let mut templates: Vec<Vm> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut groups: HashMap<(u8, String), Vec<String>> = HashMap::new();
    let mut host_rules: HashMap<(VmHostRelation, String), Vec<String>> = HashMap::new();
    let mut pools: Vec<String> = Vec::new();
    for (line, row) in &vt.rows {
        let line = *line;
        let name = cell(row, Some(c_vm)).ok_or_else(|| vt.bad(line, "empty vm name"))?;
        let vcpus = cell(row, Some(c_vcpus))
            .and_then(|s| s.parse::<u32>().ok())
            .filter(|v| *v > 0)
            .ok_or_else(|| vt.bad(line, "vcpus must be a positive integer"))?;
        let mem = num(
            &vt,
            line,
            "memory_mib",
            cell(row, Some(c_mem)).unwrap_or(""),
        )?;
        let mut vm = Vm::new(name, vcpus, mem);
        let f = |col: &str| cell(row, vt.opt(col));
        if let Some(s) = f("dirty_mib_per_s") {
            vm.dirty_mib_per_s = num(&vt, line, "dirty_mib_per_s", s)?;
        }
        if let Some(s) = f("cpu_reservation_mhz") {
            vm.cpu_reservation_mhz = num(&vt, line, "cpu_reservation_mhz", s)?;
        }
        if let Some(s) = f("memory_reservation_mib") {
            vm.memory_reservation_mib = num(&vt, line, "memory_reservation_mib", s)?;
        }
        if let Some(s) = f("cpu_limit_mhz") {
            vm.cpu_limit_mhz = Some(num(&vt, line, "cpu_limit_mhz", s)?);
        }
        if let Some(s) = f("memory_limit_mib") {
            vm.memory_limit_mib = Some(num(&vt, line, "memory_limit_mib", s)?);
        }
        if let Some(s) = f("cpu_shares") {
            vm.cpu_shares = shares(&vt, line, s)?;
        }
        if let Some(s) = f("memory_shares") {
            vm.memory_shares = shares(&vt, line, s)?;
        }
        if let Some(s) = f("pool") {
            if !pools.iter().any(|p| p == s) {
                pools.push(s.to_string());
            }
            vm.pool = Some(s.to_string());
        }
        if let Some(s) = f("automation") {
            vm.automation = Some(match s {
                "fully_automated" => Automation::FullyAutomated,
                "partially_automated" => Automation::PartiallyAutomated,
                "manual" => Automation::Manual,
                "disabled" => Automation::Disabled,
                x => return Err(vt.bad(line, format!("automation: unknown level {x:?}"))),
            });
        }
        if let Some(s) = f("anti_affinity") {
            groups
                .entry((0, s.to_string()))
                .or_default()
                .push(name.to_string());
        }
        if let Some(s) = f("affinity") {
            groups
                .entry((1, s.to_string()))
                .or_default()
                .push(name.to_string());
        }
        if let Some(s) = f("host_rule") {
            let (rel, group) = s
                .split_once(':')
                .and_then(|(r, g)| relation(r).map(|r| (r, g.to_string())))
                .ok_or_else(|| vt.bad(line, format!("host_rule: {s:?} is not RELATION:GROUP")))?;
            host_rules
                .entry((rel, group))
                .or_default()
                .push(name.to_string());
        }
        if let Some(s) = f("cpu_features") {
            vm.cpu_features = features(&vt, line, s)?;
        }
        if let Some(h) = f("host") {
            if host_list.is_empty() {
                return Err(vt.bad(
                    line,
                    format!("host {h:?}: a placement needs hosts.csv, which names the hosts"),
                ));
            }
            if !host_list.iter().any(|x| x.name == h) {
                return Err(vt.bad(line, format!("host {h:?} is not in hosts.csv")));
            }
            vm.host = Some(h.to_string());
        }
        if index.insert(name.to_string(), templates.len()).is_some() {
            return Err(vt.bad(line, format!("duplicate vm {name:?}")));
        }
        templates.push(vm);
    }

    let dt = Table::read("demand.csv", demand)?;
    let (c_t, c_v, c_c) = (dt.col("timestamp_s")?, dt.col("vm")?, dt.col("cpu_mhz")?);
    let c_m = dt.opt("memory_mib");
    let mut samples: Vec<(u64, usize, f64, Option<f64>)> = Vec::with_capacity(dt.rows.len());
    let mut lines: Vec<usize> = Vec::with_capacity(dt.rows.len());
    for (line, row) in &dt.rows {
        let line = *line;
        let t = cell(row, Some(c_t))
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|x| x.is_finite() && *x >= 0.0)
            .ok_or_else(|| dt.bad(line, "timestamp_s must be a non-negative number"))?
            as u64;
        let name = cell(row, Some(c_v)).ok_or_else(|| dt.bad(line, "empty vm"))?;
        let v = *index
            .get(name)
            .ok_or_else(|| dt.bad(line, format!("vm {name:?} is not in vms.csv")))?;
        let cpu = num(&dt, line, "cpu_mhz", cell(row, Some(c_c)).unwrap_or(""))?;
        let mem = match cell(row, c_m) {
            Some(s) => Some(num(&dt, line, "memory_mib", s)?),
            None => None,
        };
        samples.push((t, v, cpu, mem));
        lines.push(line);
    }
    if samples.is_empty() {
        return Err(TraceError::Invalid("demand.csv has no samples".into()));
    }
    let t0 = samples.iter().map(|s| s.0).min().unwrap_or(0);
    let step_s = match step_s {
        Some(s) if s > 0 => s,
        _ => {
            let mut ts: Vec<u64> = samples.iter().map(|s| s.0).collect();
            ts.sort_unstable();
            ts.dedup();
            ts.windows(2)
                .map(|w| w[1] - w[0])
                .min()
                .unwrap_or(300)
                .max(1)
        }
    };
    let step_of = |t: u64| ((t - t0) / step_s) as usize;
    if let Some((i, s)) = samples
        .iter()
        .enumerate()
        .find(|(_, s)| (s.0 - t0) / step_s >= MAX_STEPS as u64)
    {
        return Err(dt.bad(
            lines[i],
            format!(
                "timestamp_s {} is {} steps of {step_s} s after the first ({t0}): a trace spans \
                 at most {MAX_STEPS} steps (a wrong clock or unit?)",
                s.0,
                (s.0 - t0) / step_s
            ),
        ));
    }
    let steps = samples.iter().map(|s| step_of(s.0)).max().unwrap_or(0) + 1;
    let mut first = vec![usize::MAX; templates.len()];
    let mut last = vec![0usize; templates.len()];
    for s in &samples {
        let k = step_of(s.0);
        first[s.1] = first[s.1].min(k);
        last[s.1] = last[s.1].max(k);
    }
    let mut vms: Vec<WorkloadVm> = Vec::new();
    let mut slot = vec![usize::MAX; templates.len()];
    for (v, vm) in templates.iter().enumerate() {
        if first[v] == usize::MAX {
            continue;
        }
        let n = last[v] - first[v] + 1;
        slot[v] = vms.len();
        vms.push(WorkloadVm {
            vm: vm.clone(),
            arrive_step: first[v],
            cpu_mhz: vec![f32::NAN; n],
            memory_mib: vec![f32::NAN; n],
        });
    }
    for (t, v, cpu, mem) in samples {
        let w = &mut vms[slot[v]];
        let i = step_of(t) - w.arrive_step;
        w.cpu_mhz[i] = cpu as f32;
        if let Some(m) = mem {
            w.memory_mib[i] = m as f32;
        }
    }
    for w in &mut vms {
        let mut prev_cpu = 0.0f32;
        let mut prev_mem = (0.7 * w.vm.memory_mib) as f32;
        for i in 0..w.cpu_mhz.len() {
            if w.cpu_mhz[i].is_nan() {
                w.cpu_mhz[i] = prev_cpu;
            }
            if w.memory_mib[i].is_nan() {
                w.memory_mib[i] = prev_mem;
            }
            prev_cpu = w.cpu_mhz[i];
            prev_mem = w.memory_mib[i];
        }
    }
    let mut rules = Vec::new();
    let mut keys: Vec<_> = groups.into_iter().collect();
    keys.sort();
    for ((kind, name), members) in keys {
        let members: Vec<String> = members
            .into_iter()
            .filter(|m| index.contains_key(m))
            .collect();
        rules.push(if kind == 0 {
            Rule::AntiAffinity {
                name: format!("aa:{name}"),
                vms: members,
            }
        } else {
            Rule::Affinity {
                name: format!("af:{name}"),
                vms: members,
            }
        });
    }
    let mut hr: Vec<_> = host_rules.into_iter().collect();
    hr.sort();
    for ((relation, group), members) in hr {
        rules.push(Rule::VmHost {
            name: format!("{}:{group}", rel_name(relation)),
            vms: members,
            host_group: group,
            relation,
        });
    }
    Ok(Workload {
        name: "trace".into(),
        step_s,
        steps,
        hosts: host_list,
        vms,
        rules,
        pools: pools
            .into_iter()
            .map(|name| Pool {
                name,
                parent: None,
                cpu: Default::default(),
                memory: Default::default(),
            })
            .collect(),
    })
}

fn rel_name(r: VmHostRelation) -> &'static str {
    match r {
        VmHostRelation::MustRunOn => "must_run_on",
        VmHostRelation::MustNotRunOn => "must_not_run_on",
        VmHostRelation::ShouldRunOn => "should_run_on",
        VmHostRelation::ShouldNotRunOn => "should_not_run_on",
    }
}

fn read_hosts(r: impl BufRead) -> Result<Vec<Host>, TraceError> {
    let t = Table::read("hosts.csv", r)?;
    let (c_h, c_c, c_m) = (t.col("host")?, t.col("cpu_mhz")?, t.col("memory_mib")?);
    let (c_g, c_s, c_f) = (t.opt("groups"), t.opt("state"), t.opt("cpu_features"));
    let mut out = Vec::new();
    for (line, row) in &t.rows {
        let line = *line;
        let name = cell(row, Some(c_h)).ok_or_else(|| t.bad(line, "empty host"))?;
        let cpu = num(&t, line, "cpu_mhz", cell(row, Some(c_c)).unwrap_or(""))?;
        let mem = num(&t, line, "memory_mib", cell(row, Some(c_m)).unwrap_or(""))?;
        if cpu <= 0.0 || mem <= 0.0 {
            return Err(t.bad(line, "capacity must be positive"));
        }
        let groups = cell(row, c_g)
            .map(|g| {
                g.split(';')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        let state = match cell(row, c_s) {
            None | Some("connected") => HostState::Connected,
            Some("maintenance") => HostState::Maintenance,
            Some("disconnected") => HostState::Disconnected,
            Some("degraded") => HostState::Degraded,
            Some(x) => return Err(t.bad(line, format!("state: unknown {x:?}"))),
        };
        let cpu_features = cell(row, c_f).map(|s| features(&t, line, s)).transpose()?;
        if out.iter().any(|h: &Host| h.name == name) {
            return Err(t.bad(line, format!("duplicate host {name:?}")));
        }
        out.push(Host {
            name: name.to_string(),
            cpu_mhz: cpu,
            memory_mib: mem,
            state,
            groups,
            cpu_features,
        });
    }
    Ok(out)
}

/// The three tables of a workload as CSV text.
#[derive(Debug, Clone)]
pub struct TraceFiles {
    pub hosts_csv: String,
    pub vms_csv: String,
    pub demand_csv: String,
}

/// Writes a workload in the trace format (rules become group columns; pools keep only
/// their names).
pub fn write(w: &Workload) -> TraceFiles {
    let mut hosts_csv = String::from("host,cpu_mhz,memory_mib,groups,state,cpu_features\n");
    for h in &w.hosts {
        let state = match h.state {
            HostState::Connected => "connected",
            HostState::Maintenance => "maintenance",
            HostState::Disconnected => "disconnected",
            HostState::Degraded => "degraded",
        };
        let _ = writeln!(
            hosts_csv,
            "{},{},{},{},{},{}",
            h.name,
            h.cpu_mhz,
            h.memory_mib,
            h.groups.join(";"),
            state,
            h.cpu_features.as_deref().unwrap_or(&[]).join(";"),
        );
    }
    let mut anti: HashMap<&str, &str> = HashMap::new();
    let mut aff: HashMap<&str, &str> = HashMap::new();
    let mut hrule: HashMap<&str, String> = HashMap::new();
    for r in &w.rules {
        match r {
            Rule::AntiAffinity { name, vms } => vms.iter().for_each(|v| {
                anti.insert(v, name);
            }),
            Rule::Affinity { name, vms } => vms.iter().for_each(|v| {
                aff.insert(v, name);
            }),
            Rule::VmHost {
                vms,
                host_group,
                relation,
                ..
            } => vms.iter().for_each(|v| {
                hrule.insert(v, format!("{}:{host_group}", rel_name(*relation)));
            }),
        }
    }
    let mut vms_csv = String::from(
        "vm,vcpus,memory_mib,dirty_mib_per_s,cpu_reservation_mhz,memory_reservation_mib,cpu_shares,memory_shares,pool,automation,anti_affinity,affinity,host_rule,host,cpu_features\n",
    );
    let sh = |s: Shares| match s {
        Shares::Low => "low".to_string(),
        Shares::Normal => "normal".to_string(),
        Shares::High => "high".to_string(),
        Shares::Custom(n) => n.to_string(),
    };
    for wv in &w.vms {
        let v = &wv.vm;
        let automation = match v.automation {
            None => "",
            Some(Automation::FullyAutomated) => "fully_automated",
            Some(Automation::PartiallyAutomated) => "partially_automated",
            Some(Automation::Manual) => "manual",
            Some(Automation::Disabled) => "disabled",
        };
        let _ = writeln!(
            vms_csv,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            v.name,
            v.vcpus,
            v.memory_mib,
            v.dirty_mib_per_s,
            v.cpu_reservation_mhz,
            v.memory_reservation_mib,
            sh(v.cpu_shares),
            sh(v.memory_shares),
            v.pool.as_deref().unwrap_or(""),
            automation,
            anti.get(v.name.as_str()).copied().unwrap_or(""),
            aff.get(v.name.as_str()).copied().unwrap_or(""),
            hrule.get(v.name.as_str()).map(String::as_str).unwrap_or(""),
            v.host.as_deref().unwrap_or(""),
            v.cpu_features.join(";"),
        );
    }
    let mut demand_csv = String::from("timestamp_s,vm,cpu_mhz,memory_mib\n");
    for k in 0..w.steps {
        let t = k as u64 * w.step_s;
        for wv in &w.vms {
            if wv.alive(k) {
                let d = wv.demand(k);
                let _ = writeln!(demand_csv, "{t},{},{:.0},{:.0}", wv.vm.name, d[0], d[1]);
            }
        }
    }
    TraceFiles {
        hosts_csv,
        vms_csv,
        demand_csv,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::workload::{synthetic, SyntheticSpec};

    /// Reads the three tables from text (`hosts.csv` given).
    fn read_text(hosts: &str, vms: &str, demand: &str) -> Result<Workload, TraceError> {
        read(
            Some(hosts.as_bytes()),
            vms.as_bytes(),
            demand.as_bytes(),
            None,
        )
    }

    #[test]
    fn write_then_read_round_trips() {
        let w = synthetic(&SyntheticSpec::new(4, 60, 24, 5));
        let files = write(&w);
        let r = read_text(&files.hosts_csv, &files.vms_csv, &files.demand_csv).unwrap();
        assert_eq!(r.step_s, w.step_s);
        assert_eq!(r.steps, w.steps);
        assert_eq!(r.hosts, w.hosts);
        assert_eq!(r.vms.len(), w.vms.len());
        for (a, b) in r.vms.iter().zip(&w.vms) {
            assert_eq!(a.vm.name, b.vm.name);
            assert_eq!(a.arrive_step, b.arrive_step);
            assert_eq!(a.cpu_mhz.len(), b.cpu_mhz.len());
            assert!((a.cpu_mhz[0] - b.cpu_mhz[0].round()).abs() < 1.0);
        }
        let count = |w: &Workload| w.rules.iter().map(|r| r.vms().len()).sum::<usize>();
        assert_eq!(count(&r), count(&w));
    }

    #[test]
    fn errors_name_table_and_line() {
        let vms = "vm,vcpus,memory_mib\na,2,4096\n";
        let demand = "timestamp_s,vm,cpu_mhz,memory_mib\n0,a,100,\n300,b,100,\n";
        let err = read(None::<&[u8]>, vms.as_bytes(), demand.as_bytes(), None).unwrap_err();
        assert!(err.to_string().contains("demand.csv: line 3"), "{err}");
        let err = read(
            None::<&[u8]>,
            "vm,memory_mib\n".as_bytes(),
            demand.as_bytes(),
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("vcpus"), "{err}");
    }

    #[test]
    fn bad_traces_are_refused_with_the_line() {
        let hosts = "host,cpu_mhz,memory_mib\nh1,8000,16384\nh1,8000,16384\n";
        let vms = "vm,vcpus,memory_mib\na,2,4096\n";
        let demand = "timestamp_s,vm,cpu_mhz,memory_mib\n0,a,100,\n";
        let err = read_text(hosts, vms, demand).unwrap_err().to_string();
        assert!(
            err.contains("hosts.csv: line 3") && err.contains("duplicate host"),
            "{err}"
        );
        // A stray timestamp (milliseconds among seconds) would ask for billions of steps.
        let demand = "timestamp_s,vm,cpu_mhz\n0,a,100\n300,a,100\n1700000000000,a,1\n";
        let err = read(None::<&[u8]>, vms.as_bytes(), demand.as_bytes(), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("demand.csv: line 4") && err.contains("at most"),
            "{err}"
        );
        for (vms, needle) in [
            ("vm,vcpus,memory_mib\na,2,inf\n", "line 2"),
            ("vm,vcpus,memory_mib\na,2,NaN\n", "line 2"),
            ("vm,vcpus,memory_mib,host\na,2,4096,h1\n", "needs hosts.csv"),
        ] {
            let err = read(None::<&[u8]>, vms.as_bytes(), demand.as_bytes(), None)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{vms:?}: {err}");
        }
        let err = read(
            None::<&[u8]>,
            "vm,vcpus,memory_mib\n".as_bytes(),
            "timestamp_s,vm,cpu_mhz\n".as_bytes(),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no samples"), "{err}");
    }

    #[test]
    fn cpu_features_are_read_written_and_checked() {
        let hosts =
            "host,cpu_mhz,memory_mib,cpu_features\nh1,8000,16384,sse2;avx2\nh2,8000,16384,\n";
        let vms = "vm,vcpus,memory_mib,cpu_features\na,2,4096,avx2; sse2\nb,2,4096,\n";
        let demand = "timestamp_s,vm,cpu_mhz\n0,a,100\n0,b,100\n";
        let w = read_text(hosts, vms, demand).unwrap();
        assert_eq!(
            w.hosts[0].cpu_features,
            Some(vec!["sse2".into(), "avx2".into()])
        );
        assert_eq!(w.hosts[1].cpu_features, None);
        assert_eq!(w.vms[0].vm.cpu_features, ["avx2", "sse2"]);
        assert!(w.vms[1].vm.cpu_features.is_empty());
        let again = write(&w);
        let back = read_text(&again.hosts_csv, &again.vms_csv, &again.demand_csv).unwrap();
        assert_eq!(back.hosts, w.hosts);
        assert_eq!(back.vms[0].vm.cpu_features, w.vms[0].vm.cpu_features);
        let bad = "vm,vcpus,memory_mib,cpu_features\na,2,4096,sse2\nb,2,4096,avx2;$(id)\n";
        let err = read(None::<&[u8]>, bad.as_bytes(), demand.as_bytes(), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 3") && err.contains("not a feature name"),
            "{err}"
        );
    }

    #[test]
    fn a_host_column_places_vms_where_the_cluster_ran_them() {
        let hosts = "host,cpu_mhz,memory_mib\nh1,8000,16384\nh2,8000,16384\n";
        let vms = "vm,vcpus,memory_mib,host\na,2,4096,h2\nb,2,4096,\n";
        let demand = "timestamp_s,vm,cpu_mhz\n0,a,100\n0,b,100\n";
        let w = read_text(hosts, vms, demand).unwrap();
        assert_eq!(w.vms[0].vm.host.as_deref(), Some("h2"));
        assert_eq!(w.vms[1].vm.host, None);
        let again = write(&w);
        assert!(
            again.vms_csv.lines().nth(1).unwrap().ends_with(",h2,"),
            "{}",
            again.vms_csv
        );
        let bad = "vm,vcpus,memory_mib,host\na,2,4096,h9\n";
        let err = read_text(hosts, bad, demand).unwrap_err().to_string();
        assert!(
            err.contains("vms.csv: line 2") && err.contains("h9"),
            "{err}"
        );
    }

    #[test]
    fn gaps_repeat_previous_samples() {
        let vms = "vm,vcpus,memory_mib\na,2,4096\nb,1,1024\n";
        let demand = "timestamp_s,vm,cpu_mhz,memory_mib\n0,a,100,2000\n0,b,5,\n600,a,300,\n";
        let w = read(None::<&[u8]>, vms.as_bytes(), demand.as_bytes(), Some(300)).unwrap();
        assert_eq!(w.steps, 3);
        let a = &w.vms[0];
        assert_eq!(a.cpu_mhz, vec![100.0, 100.0, 300.0]);
        assert_eq!(a.memory_mib, vec![2000.0, 2000.0, 2000.0]);
        assert_eq!(w.vms[1].memory_mib, vec![(0.7 * 1024.0) as f32]);
    }
}
