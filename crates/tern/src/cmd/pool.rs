//! `tern pool create|list|show|set|remove`: a cluster's resource pools.

use tern_api::pools::{CreatePool, PoolSettings, ResourcePool};
use tern_api::{CenterClient, CpuAmount, Shares};

use super::output::{opt, print_json, Format, Sheet, Table};
use super::vm::{parse_mib_setting, Setting};
use crate::error::{ApiResultExt, CliError};

const POOL_HELP: &str = "\
A pool divides its cluster's CPU and memory among its children (pools and VMs) by shares,
and holds what they reserve and use:
  --cpu-shares, --memory-shares   low, normal, high or a number: weight against siblings
  --cpu-reservation 2GHz          CPU the pool's VMs get whenever they ask, divided among
                                  them by shares
  --cpu-limit 4GHz                most CPU the pool's VMs use together, divided among them by
                                  shares (each VM's host enforces its part)
  --memory-reservation-mib N      memory kept for the pool's VMs
  --memory-limit-mib N            most memory the pool's running VMs are configured with
                                  together: a start beyond it is refused
  --cpu-expandable false          the children's reservations must fit in the pool's own
                                  (default true: they may borrow from the parent)

VMs join with `tern vm set VM --pool NAME` (`--pool none` leaves). The cluster's reservations
must fit in its usable hosts; a change that would not fit is refused naming the pool.

Examples:
  tern pool create prod gold --cpu-shares high
  tern pool create prod batch --cpu-limit 8GHz --memory-limit-mib 65536
  tern vm set report-1 --pool batch";

/// CPU or memory settings a command may change (`none` clears a reservation or limit).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PoolArgs {
    /// Parent pool (`none`: the cluster's root).
    #[arg(long, value_name = "POOL")]
    parent: Option<String>,
    /// CPU shares against the pool's siblings: low, normal, high or a number (4000 = normal).
    #[arg(long, value_name = "SHARES", value_parser = |s: &str| s.parse::<Shares>())]
    cpu_shares: Option<Shares>,
    /// CPU reserved for the pool's VMs, in MHz or GHz (e.g. 2GHz), or none.
    #[arg(long, value_name = "AMOUNT", value_parser = parse_mhz)]
    cpu_reservation: Option<Setting<u64>>,
    /// Most CPU the pool's VMs use together, in MHz or GHz, or none.
    #[arg(long, value_name = "AMOUNT", value_parser = parse_mhz)]
    cpu_limit: Option<Setting<u64>>,
    /// Whether the children's CPU reservations may exceed the pool's (borrowing upward).
    #[arg(long, value_name = "BOOL")]
    cpu_expandable: Option<bool>,
    /// Memory shares against the pool's siblings.
    #[arg(long, value_name = "SHARES", value_parser = |s: &str| s.parse::<Shares>())]
    memory_shares: Option<Shares>,
    /// Memory reserved for the pool's VMs in MiB, or none.
    #[arg(long, value_name = "MIB", value_parser = parse_mib_setting)]
    memory_reservation_mib: Option<Setting<u64>>,
    /// Most memory the pool's running VMs are configured with together, in MiB, or none.
    #[arg(long, value_name = "MIB", value_parser = parse_mib_setting)]
    memory_limit_mib: Option<Setting<u64>>,
    /// Whether the children's memory reservations may exceed the pool's.
    #[arg(long, value_name = "BOOL")]
    memory_expandable: Option<bool>,
}

fn parse_mhz(s: &str) -> Result<Setting<u64>, String> {
    if s == "none" {
        return Ok(Setting::Clear);
    }
    match s.parse::<CpuAmount>()? {
        CpuAmount::Mhz(m) => Ok(Setting::Set(u64::from(m))),
        CpuAmount::CorePercent(_) => Err(format!(
            "{s:?}: a pool spans hosts, give its CPU in MHz or GHz (e.g. 4GHz)"
        )),
    }
}

impl PoolArgs {
    fn apply(&self, mut s: PoolSettings) -> PoolSettings {
        if let Some(p) = &self.parent {
            s.parent = (p != "none").then(|| p.clone());
        }
        if let Some(v) = self.cpu_shares {
            s.cpu.shares = v;
        }
        if let Some(v) = self.cpu_reservation {
            s.cpu.reservation_mhz = v.value();
        }
        if let Some(v) = self.cpu_limit {
            s.cpu.limit_mhz = v.value();
        }
        if let Some(v) = self.cpu_expandable {
            s.cpu.expandable = v;
        }
        if let Some(v) = self.memory_shares {
            s.memory.shares = v;
        }
        if let Some(v) = self.memory_reservation_mib {
            s.memory.reservation_mib = v.value();
        }
        if let Some(v) = self.memory_limit_mib {
            s.memory.limit_mib = v.value();
        }
        if let Some(v) = self.memory_expandable {
            s.memory.expandable = v;
        }
        s
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum PoolCommand {
    /// Create a pool in a cluster.
    #[command(after_long_help = POOL_HELP)]
    Create {
        /// The cluster.
        cluster: String,
        /// The pool's name (unique in the center; a-z, 0-9, '-').
        name: String,
        #[command(flatten)]
        settings: PoolArgs,
    },
    /// List a cluster's pools.
    List { cluster: String },
    /// Show a pool: its settings, children and VMs.
    Show { name: String },
    /// Change a pool's settings (only those given); its running VMs get the new division at
    /// once.
    #[command(after_long_help = POOL_HELP)]
    Set {
        name: String,
        #[command(flatten)]
        settings: PoolArgs,
    },
    /// Remove a pool that holds no VMs or pools.
    Remove { name: String },
}

fn amount(v: Option<u64>, unit: &str) -> String {
    v.map_or("-".to_string(), |v| format!("{v} {unit}"))
}

fn settings_text(s: &PoolSettings) -> (String, String) {
    let c = &s.cpu;
    let m = &s.memory;
    (
        format!(
            "shares {}, reservation {}{}, limit {}",
            c.shares,
            amount(c.reservation_mhz, "MHz"),
            if c.expandable { " (expandable)" } else { "" },
            amount(c.limit_mhz, "MHz")
        ),
        format!(
            "shares {}, reservation {}{}, limit {}",
            m.shares,
            amount(m.reservation_mib, "MiB"),
            if m.expandable { " (expandable)" } else { "" },
            amount(m.limit_mib, "MiB")
        ),
    )
}

fn show(p: &ResourcePool, fmt: Format) -> Result<(), CliError> {
    if fmt == Format::Json {
        return print_json(p);
    }
    let (cpu, mem) = settings_text(&p.settings);
    let mut s = Sheet::new();
    s.add("name", &p.name)
        .add("cluster", &p.cluster)
        .add("parent", opt(&p.settings.parent))
        .add("cpu", cpu)
        .add("memory", mem)
        .add("children", super::cluster::join_or_dash(&p.children))
        .add("vms", super::cluster::join_or_dash(&p.vms));
    s.print();
    Ok(())
}

pub async fn run(cmd: PoolCommand, api: &CenterClient, fmt: Format) -> Result<(), CliError> {
    match cmd {
        PoolCommand::Create {
            cluster,
            name,
            settings,
        } => {
            let s = settings.apply(PoolSettings::default());
            let req = CreatePool {
                name,
                parent: s.parent,
                cpu: s.cpu,
                memory: s.memory,
            };
            let p = api
                .create_pool(&cluster, &req)
                .await
                .or_list(&format!("tern pool list {cluster}"))?;
            show(&p, fmt)
        }
        PoolCommand::List { cluster } => {
            let list = api.pools(&cluster).await.or_list("tern cluster list")?;
            if fmt == Format::Json {
                return print_json(&list);
            }
            let mut t = Table::new(&["NAME", "PARENT", "CPU", "MEMORY", "VMS"]);
            for p in &list {
                let (cpu, mem) = settings_text(&p.settings);
                t.row(vec![
                    p.name.clone(),
                    opt(&p.settings.parent),
                    cpu,
                    mem,
                    super::cluster::join_or_dash(&p.vms),
                ]);
            }
            t.print();
            Ok(())
        }
        PoolCommand::Show { name } => {
            let p = api.pool(&name).await.or_list("tern pool list CLUSTER")?;
            show(&p, fmt)
        }
        PoolCommand::Set { name, settings } => {
            let p = api.pool(&name).await.or_list("tern pool list CLUSTER")?;
            let s = settings.apply(p.settings.clone());
            let p = api
                .set_pool(&name, &s)
                .await
                .or_list("tern pool list CLUSTER")?;
            show(&p, fmt)
        }
        PoolCommand::Remove { name } => {
            api.remove_pool(&name)
                .await
                .or_list("tern pool list CLUSTER")?;
            if fmt == Format::Table {
                println!("pool {name} removed");
            }
            Ok(())
        }
    }
}
