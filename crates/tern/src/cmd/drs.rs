//! `tern drs`: run the DRS engine offline (simulate, explain), or ask the center for a
//! cluster's balance recommendations (recommend) and run them (apply).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tern_api::center::Task;
use tern_api::drs::{DrsApplyResult, DrsRecommendations};
use tern_api::CenterClient;
use tern_drs::sim::{self, report, Policy, ShapeMix, SimOptions, SyntheticSpec, Workload};
use tern_drs::{explain, Snapshot, Threshold};

use super::output::{print_json, Format};
use crate::error::{ApiResultExt, CliError};

#[derive(Debug, clap::Subcommand)]
pub enum DrsCommand {
    /// Show what DRS would do with a cluster snapshot, and why: a balancing pass, a
    /// maintenance plan (--evacuate) or a placement (--place).
    Explain(ExplainArgs),
    /// Replay a cluster over time under tern's engine and baseline policies; print a
    /// markdown table (or JSON) of imbalance, overload, migrations and engine time.
    Simulate(SimulateArgs),
    /// The center's balance recommendations for a cluster now, with their reasons (from the
    /// load the hosts report); nothing moves.
    Recommend {
        cluster: String,
        #[command(flatten)]
        connect: super::connect::ConnectArgs,
    },
    /// Run a cluster's balance recommendations now: live migrations, several at once, as a task
    /// (followed until it ends unless --detach).
    Apply {
        cluster: String,
        /// Print the task id and return at once instead of following it.
        #[arg(long)]
        detach: bool,
        /// Stop following after this long (`90s`, `30m`); the migrations keep going.
        #[arg(long, value_parser = super::task::parse_duration, default_value = "2h")]
        wait_timeout: std::time::Duration,
        #[command(flatten)]
        connect: super::connect::ConnectArgs,
    },
}

impl DrsCommand {
    /// Whether the command talks to a center.
    pub fn online(&self) -> bool {
        matches!(
            self,
            DrsCommand::Recommend { .. } | DrsCommand::Apply { .. }
        )
    }
}

/// `tern drs recommend CLUSTER` (also `tern cluster drs CLUSTER`).
pub async fn recommend(api: &CenterClient, cluster: &str, fmt: Format) -> Result<(), CliError> {
    let r: DrsRecommendations = api
        .drs_recommendations(cluster)
        .await
        .or_list("tern cluster list")?;
    if fmt == Format::Json {
        return print_json(&r);
    }
    println!(
        "cluster {}: DRS automation {}, threshold {}; {} recommendation(s), imbalance {:.4} -> {:.4}",
        r.cluster,
        r.settings.automation,
        r.settings.threshold,
        r.recommendations.len(),
        r.imbalance_before,
        r.imbalance_after
    );
    for (i, m) in r.recommendations.iter().enumerate() {
        println!(
            "  {}. move VM {} from {} to {} (priority {}): {}",
            i + 1,
            m.vm,
            m.from_host,
            m.to_host,
            m.priority,
            m.reason
        );
    }
    println!("\n{}", r.text.trim_end());
    Ok(())
}

/// Runs the online subcommands.
pub async fn run_online(cmd: DrsCommand, fmt: Format) -> Result<(), CliError> {
    match cmd {
        DrsCommand::Recommend { cluster, connect } => {
            recommend(&connect.client()?, &cluster, fmt).await
        }
        DrsCommand::Apply {
            cluster,
            detach,
            wait_timeout,
            connect,
        } => {
            let api = connect.client()?;
            let task: Task = api.drs_apply(&cluster).await.or_list("tern cluster list")?;
            if detach {
                return super::task::print_detached(&task, fmt);
            }
            let done = super::task::wait(&api, task.id, Some(wait_timeout), fmt)
                .await
                .map_err(|e| {
                    e.hint(format!(
                        "each move is in `tern event list`; `tern task show {}` has the result",
                        task.id
                    ))
                })?;
            if fmt == Format::Json {
                return print_json(&done);
            }
            println!("{}", done.phase);
            let result: Option<DrsApplyResult> = done
                .result
                .clone()
                .and_then(|v| serde_json::from_value(v).ok());
            for a in result.iter().flat_map(|r| &r.applied) {
                match &a.error {
                    None => println!(
                        "  moved {} {} -> {}: {}",
                        a.vm, a.from_host, a.to_host, a.reason
                    ),
                    Some(e) => {
                        println!("  NOT moved {} {} -> {}: {e}", a.vm, a.from_host, a.to_host)
                    }
                }
            }
            Ok(())
        }
        other => run(other, fmt).map_err(CliError::from),
    }
}

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// Snapshot JSON (format: crates/tern-drs/README.md; example:
    /// crates/tern-drs/examples/snapshot.json).
    snapshot: PathBuf,
    /// Migration threshold, 1 (mandatory moves only) to 5 (aggressive).
    #[arg(long, default_value_t = 3)]
    threshold: u8,
    /// Plan emptying this host for maintenance instead of a balancing pass.
    #[arg(long, value_name = "HOST", conflicts_with = "place")]
    evacuate: Option<String>,
    /// Place this VM of the snapshot (normally one with no host) instead of balancing.
    #[arg(long, value_name = "VM")]
    place: Option<String>,
    /// Print the decision as JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// Replay a trace directory holding vms.csv, demand.csv and optionally hosts.csv
    /// (format: crates/tern-drs/README.md). Without it, a synthetic cluster is generated.
    #[arg(long, value_name = "DIR")]
    trace: Option<PathBuf>,
    /// Hosts of the synthetic cluster, or of a trace without hosts.csv (sized to the
    /// trace's demand at --cpu-utilization / --memory-utilization).
    #[arg(long, default_value_t = 16)]
    hosts: usize,
    /// VMs of the synthetic cluster (present at any time; churn replaces some).
    #[arg(long, default_value_t = 500)]
    vms: usize,
    /// Simulated steps (synthetic).
    #[arg(long, default_value_t = 288)]
    steps: usize,
    /// Step length in seconds (synthetic; for a trace, overrides the inferred step).
    #[arg(long)]
    step_s: Option<u64>,
    /// Seed of the synthetic generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Demand shapes of the synthetic cluster: standard (steady, diurnal, bursty) or
    /// enterprise (office hours, batch jobs, bursts).
    #[arg(long, default_value = "standard")]
    mix: String,
    /// Mean CPU demand ÷ capacity when sizing hosts.
    #[arg(long, default_value_t = 0.65)]
    cpu_utilization: f64,
    /// Mean memory demand ÷ capacity when sizing hosts.
    #[arg(long, default_value_t = 0.7)]
    memory_utilization: f64,
    /// Policies to compare, comma-separated: none, greedy, lownodeutil, tern.
    #[arg(long, default_value = "none,greedy,lownodeutil,tern")]
    policies: String,
    /// tern's migration threshold, 1 to 5.
    #[arg(long, default_value_t = 3)]
    threshold: u8,
    /// Run the policy every this many steps.
    #[arg(long, default_value_t = 1)]
    period_steps: usize,
    /// Spread the synthetic cluster's hosts over this many CPU generations (0 to 4; 0: no
    /// CPU model). Each VM then needs the CPU features of the generation it was created on,
    /// as a host-model CPU without an EVC mode does; a move onto an older host fails, and
    /// the report counts such failures as CPU refusals.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=4))]
    cpu_generations: u8,
    /// Write the simulated workload as a trace (hosts.csv, vms.csv, demand.csv) to DIR.
    #[arg(long, value_name = "DIR")]
    save_trace: Option<PathBuf>,
    /// Print the reports as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// The offline commands; `-o json` is the same as their `--json`.
pub fn run(cmd: DrsCommand, fmt: Format) -> anyhow::Result<()> {
    let json = fmt == Format::Json;
    match cmd {
        DrsCommand::Explain(mut a) => {
            a.json |= json;
            explain_cmd(a)
        }
        DrsCommand::Simulate(mut a) => {
            a.json |= json;
            simulate_cmd(a)
        }
        DrsCommand::Recommend { .. } | DrsCommand::Apply { .. } => {
            bail!("tern drs recommend|apply talk to a center: they run in the async runtime")
        }
    }
}

fn threshold(level: u8) -> anyhow::Result<Threshold> {
    Threshold::new(level).with_context(|| format!("--threshold must be 1..5, got {level}"))
}

fn explain_cmd(a: ExplainArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.snapshot)
        .with_context(|| format!("reading snapshot {}", a.snapshot.display()))?;
    let snap: Snapshot = serde_json::from_str(&text)
        .with_context(|| format!("parsing snapshot {}", a.snapshot.display()))?;
    if let Some(host) = &a.evacuate {
        let plan = tern_drs::evacuate(&snap, host)?;
        print_out(a.json, &plan, || explain::evacuation_plan(&plan))
    } else if let Some(vm) = &a.place {
        match tern_drs::place(&snap, vm) {
            Ok(p) => print_out(a.json, &p, || explain::placement(&p)),
            Err(tern_drs::PlaceError::Admission(f)) => {
                if a.json {
                    println!("{}", serde_json::to_string_pretty(&f)?);
                }
                bail!(explain::admission_failure(&f))
            }
            Err(e) => Err(e.into()),
        }
    } else {
        let plan = tern_drs::balance(&snap, threshold(a.threshold)?)?;
        print_out(a.json, &plan, || explain::balance_plan(&plan))
    }
}

fn print_out<T: serde::Serialize>(
    json: bool,
    value: &T,
    text: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", text());
    }
    Ok(())
}

fn open(dir: &Path, name: &str) -> anyhow::Result<BufReader<File>> {
    let path = dir.join(name);
    Ok(BufReader::new(
        File::open(&path).with_context(|| format!("opening {}", path.display()))?,
    ))
}

/// Reads a trace directory; hosts are sized when it has no hosts.csv.
pub fn read_trace(
    dir: &Path,
    hosts: usize,
    cpu_util: f64,
    mem_util: f64,
    step_s: Option<u64>,
) -> anyhow::Result<Workload> {
    let hosts_file = dir.join("hosts.csv");
    let host_reader = if hosts_file.exists() {
        Some(open(dir, "hosts.csv")?)
    } else {
        None
    };
    let mut w = sim::trace::read(
        host_reader,
        open(dir, "vms.csv")?,
        open(dir, "demand.csv")?,
        step_s,
    )
    .with_context(|| format!("reading trace {}", dir.display()))?;
    if w.hosts.is_empty() {
        w.hosts = sim::workload::size_hosts(&w.vms, w.steps, hosts, cpu_util, mem_util, 1);
    }
    w.name = format!("trace {}", dir.display());
    Ok(w)
}

fn simulate_cmd(a: SimulateArgs) -> anyhow::Result<()> {
    let t = threshold(a.threshold)?;
    let mut policies = Vec::new();
    for p in a
        .policies
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        policies.push(match p {
            "none" => Policy::NoBalancing,
            "greedy" => Policy::Greedy,
            "lownodeutil" => Policy::LowNodeUtilization,
            "tern" => Policy::Tern(t),
            other => bail!("unknown policy {other:?}: use none, greedy, lownodeutil, tern"),
        });
    }
    let workload = match &a.trace {
        Some(dir) => read_trace(
            dir,
            a.hosts,
            a.cpu_utilization,
            a.memory_utilization,
            a.step_s,
        )?,
        None => {
            let mut spec = SyntheticSpec::new(a.hosts, a.vms, a.steps, a.seed);
            spec.step_s = a.step_s.unwrap_or(spec.step_s);
            spec.cpu_utilization = a.cpu_utilization;
            spec.cpu_generations = usize::from(a.cpu_generations);
            spec.memory_utilization = a.memory_utilization;
            spec.mix = match a.mix.as_str() {
                "standard" => ShapeMix::standard(),
                "enterprise" => ShapeMix::enterprise(),
                other => bail!("unknown --mix {other:?}: use standard or enterprise"),
            };
            sim::synthetic(&spec)
        }
    };
    if let Some(dir) = &a.save_trace {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let files = sim::trace::write(&workload);
        for (name, body) in [
            ("hosts.csv", &files.hosts_csv),
            ("vms.csv", &files.vms_csv),
            ("demand.csv", &files.demand_csv),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, body).with_context(|| format!("writing {}", path.display()))?;
        }
        tracing::info!(dir = %dir.display(), "trace written");
    }
    let opts = SimOptions {
        period_steps: a.period_steps,
        ..SimOptions::default()
    };
    let scenario = format!(
        "{} ({} hosts, {} VMs, {} steps of {} s)",
        workload.name,
        workload.hosts.len(),
        workload.vms.len(),
        workload.steps,
        workload.step_s
    );
    let mut rows = Vec::new();
    for p in policies {
        tracing::info!(policy = %p.name(), "simulating");
        rows.push(report::Row {
            scenario: scenario.clone(),
            report: sim::simulate(&workload, p, &opts),
        });
    }
    if a.json {
        let reports: Vec<_> = rows.iter().map(|r| &r.report).collect();
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print!("{}", report::markdown(&rows));
    }
    Ok(())
}
