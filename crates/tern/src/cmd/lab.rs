//! `tern lab up|down|status|client|link|memory-errors|restart|stop|start`: arguments and output; the lab
//! itself lives in `crate::lab`.

use std::path::{Path, PathBuf};

use super::output::{opt, print_json, Format, Table};
use crate::error::{CliError, ExitKind};
use crate::lab::{self, Accel, LinkFault, UpOptions};

#[derive(Debug, clap::Subcommand)]
pub enum LabCommand {
    /// Build a lab: namespaces, bridges, a center, N host agents, cluster `lab`.
    Up {
        /// Number of hosts (h1 … hN).
        #[arg(long)]
        hosts: u32,
        /// Prefix of the lab's namespace names (<prefix>-fab, -center, -client, -h<i>).
        #[arg(long, default_value = "tern")]
        prefix: String,
        /// Accelerator the agents run guests with.
        #[arg(long, value_enum, default_value_t = Accel::Tcg)]
        accel: Accel,
        /// Guest image to copy into shared storage [default: target/guest if it exists]
        #[arg(long)]
        guest_dir: Option<PathBuf>,
        /// Build only the network, directories and tokens (no center, no agents).
        #[arg(long)]
        network_only: bool,
        /// Cap a host's CPU capability at a model, `HOST=MODEL` (repeatable), e.g.
        /// `h2=Westmere`: the hosts share one CPU, so this makes one stand for an older one.
        #[arg(long, value_name = "HOST=MODEL", value_parser = lab::parse_host_ceiling)]
        cpu_ceiling: Vec<(String, String)>,
        /// Add a SAN: an iSCSI target (Debian's tgt) in namespace <prefix>-san on a storage
        /// network of its own (10.79.0.0/24), exporting this many LUNs; lab.json lists them as
        /// iscsi:// URLs a VM's --disk takes.
        #[arg(long, value_name = "N", default_value_t = 0)]
        san_luns: u32,
        /// Size of each SAN LUN (sparse files in the lab dir).
        #[arg(long, value_name = "MIB", default_value_t = 256)]
        san_lun_mib: u64,
        /// Add block LUNs, as a multipath or FC LUN appears on every host: loop devices named
        /// /dev/disk/by-id/tern-<prefix>-<n>, registered as block datastores block1…
        #[arg(long, value_name = "N", default_value_t = 0)]
        block_luns: u32,
        /// Size of each block LUN (files in the lab dir).
        #[arg(long, value_name = "MIB", default_value_t = 256)]
        block_lun_mib: u64,
        /// An HA control plane: three centers (`center`, `center2`, `center3`, on ports
        /// 8700, 8710, 8720) sharing a three-member etcd (`etcd1`…`etcd3`); one leads, the
        /// others stand by. `tern lab stop --kill center` takes the leader down.
        #[arg(long)]
        ha: bool,
    },
    /// Remove the lab: its processes (QEMU included), namespaces, links and directory.
    Down {
        /// Also remove namespaces of this prefix [default: the recorded lab's]
        #[arg(long)]
        prefix: Option<String>,
    },
    /// Show the lab's namespaces, processes and hosts.
    Status,
    /// Run a command in the client namespace (the VMs' users); exits with its exit code.
    Client {
        /// Prefix of the lab [default: the recorded lab's]
        #[arg(long)]
        prefix: Option<String>,
        /// The command, after `--`.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// Shape, cut or restore a host's management/migration link.
    #[command(subcommand)]
    Link(LinkCommand),
    /// Stop (kill) or start again the lab SAN's iSCSI target: a SAN failing under its hosts,
    /// and coming back with its LUNs' data.
    #[command(subcommand)]
    San(SanCommand),
    /// Set a host's fake EDAC memory-error counters (the lab's stand-in for failing
    /// memory): its agent reports them, and the center judges them (`tern host show`).
    MemoryErrors {
        /// The lab host (h1, h2, ...).
        host: String,
        /// Corrected errors so far (10 more than the center first saw degrade the host).
        #[arg(long)]
        corrected: Option<u64>,
        /// Uncorrected errors so far (one more degrades the host).
        #[arg(long)]
        uncorrected: Option<u64>,
    },
    /// Restart the center or a host agent (`center`, `h1`…) the way `lab up` starts it.
    Restart {
        name: String,
        /// SIGKILL instead of SIGTERM (a crash).
        #[arg(long)]
        kill: bool,
        #[command(flatten)]
        start: StartArgs,
    },
    /// Stop the center or a host agent.
    Stop {
        name: String,
        /// SIGKILL instead of SIGTERM (a crash).
        #[arg(long)]
        kill: bool,
    },
    /// Start a stopped center or host agent and wait until it is ready.
    Start {
        name: String,
        #[command(flatten)]
        start: StartArgs,
    },
    /// Fill the lab center's store with a synthetic inventory for scale tests and
    /// benchmarks: a new cluster of N hosts (s0001…, disconnected: no agent runs them) and
    /// M VMs (v00001…) spread over them. The center is stopped while its store is written,
    /// then started again.
    Seed {
        /// The new cluster's name.
        #[arg(long, default_value = "scale")]
        cluster: String,
        #[arg(long, default_value_t = 1000)]
        hosts: u32,
        #[arg(long, default_value_t = 20000)]
        vms: u32,
    },
}

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// Host agents: set the `--cpu-ceiling` it starts with from now on (`none` removes it).
    #[arg(long, value_name = "MODEL")]
    cpu_ceiling: Option<String>,
    /// Return once the process is spawned, without waiting until it is ready.
    #[arg(long)]
    no_wait: bool,
}

impl StartArgs {
    fn options(&self) -> lab::StartOptions {
        lab::StartOptions {
            cpu_ceiling: self
                .cpu_ceiling
                .as_deref()
                .map(|c| (!c.is_empty() && !c.eq_ignore_ascii_case("none")).then(|| c.to_string())),
            no_wait: self.no_wait,
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum SanCommand {
    /// Kill the target (sessions drop, the portal stops answering); the LUN files stay.
    Stop,
    /// Start the target again, serving the same LUNs.
    Start,
}

#[derive(Debug, clap::Subcommand)]
pub enum LinkCommand {
    /// Limit bandwidth and add delay on a host's management/migration link (each direction).
    Shape {
        /// The lab host whose link is shaped (h1, h2, ...).
        host: String,
        /// Rate in Mbit/s (10^6 bits), e.g. 1000 for a 1 Gbit/s link.
        #[arg(long)]
        rate_mbit: u32,
        /// One-way delay in ms (needs the kernel's netem qdisc).
        #[arg(long, default_value_t = 0)]
        delay_ms: u32,
    },
    /// Remove shaping from a host's link.
    Unshape {
        /// The lab host (h1, h2, ...).
        host: String,
    },
    /// Take a host's link down: the center, the other hosts and migrations lose it.
    Cut {
        /// The lab host (h1, h2, ...).
        host: String,
    },
    /// Bring a cut link back up and wait for carrier.
    Restore {
        /// The lab host (h1, h2, ...).
        host: String,
    },
}

pub async fn run(cmd: LabCommand, dir: &Path, fmt: Format) -> Result<(), CliError> {
    match cmd {
        LabCommand::Up {
            hosts,
            prefix,
            accel,
            guest_dir,
            network_only,
            cpu_ceiling,
            san_luns,
            san_lun_mib,
            block_luns,
            block_lun_mib,
            ha,
        } => {
            let o = UpOptions {
                hosts,
                prefix,
                dir: dir.to_path_buf(),
                accel,
                guest_dir,
                network_only,
                cpu_ceilings: cpu_ceiling,
                san_luns,
                san_lun_mib,
                block_luns,
                block_lun_mib,
                ha,
            };
            let st = lab::up(&o).await.map_err(|e| {
                CliError::from(e).hint(format!(
                    "the partial lab is left for inspection (logs in {}/logs); \
                     remove it with `tern lab down --dir {}`",
                    dir.display(),
                    dir.display()
                ))
            })?;
            if fmt == Format::Json {
                return print_json(&st);
            }
            println!(
                "lab `{}` is up: {} hosts in cluster lab, center at unix:{}",
                st.prefix,
                st.hosts.len(),
                st.socket.display()
            );
            let mut t = Table::new(&["NAME", "NAMESPACE", "ADDRESS", "PID", "LOG"]);
            if let Some(c) = &st.center {
                t.row(vec![
                    c.name.clone(),
                    c.namespace.clone(),
                    lab::plan::CENTER_IP.into(),
                    opt(&c.pid),
                    c.log.display().to_string(),
                ]);
            }
            for h in &st.hosts {
                t.row(vec![
                    h.name.clone(),
                    h.namespace.clone(),
                    h.mgmt_ip.clone(),
                    opt(&h.agent.pid),
                    h.agent.log.display().to_string(),
                ]);
            }
            t.row(vec![
                "client".into(),
                st.client_namespace.clone(),
                lab::plan::CLIENT_IP.into(),
                "-".into(),
                "-".into(),
            ]);
            t.print();
            if let Some(g) = &st.guest {
                println!("guest image: {} {}", g.kernel.display(), g.initrd.display());
            }
            println!(
                "`tern` finds this lab by itself; from elsewhere: TERN_CENTER=unix:{} \
                 TERN_TOKEN=$(cat {})",
                st.socket.display(),
                st.admin_token_file.display()
            );
            Ok(())
        }
        LabCommand::Down { prefix } => {
            let prefixes: Vec<String> = prefix.into_iter().collect();
            for p in &prefixes {
                lab::plan::check_prefix(p).map_err(|e| CliError::usage(format!("{e:#}")))?;
            }
            let removed = lab::teardown(dir, &prefixes)?;
            match fmt {
                Format::Json => print_json(&removed),
                Format::Table => {
                    if removed.is_empty() {
                        println!("no lab to remove");
                    } else {
                        println!("removed {}", removed.summary());
                    }
                    Ok(())
                }
            }
        }
        LabCommand::Status => {
            let s = lab::status(dir)
                .await
                .map_err(|e| CliError::new(ExitKind::NotFound, format!("{e:#}")))?;
            if fmt == Format::Json {
                return print_json(&s);
            }
            println!(
                "lab `{}` in {} (created {})",
                s.lab.prefix,
                s.lab.dir.display(),
                super::output::time(&s.lab.created_at)
            );
            let mut t = Table::new(&["PROCESS", "NAMESPACE", "PID", "RUNNING", "HOST_STATE"]);
            for p in &s.processes {
                let host_state = s
                    .hosts
                    .as_ref()
                    .and_then(|hs| hs.iter().find(|h| h.name == p.name))
                    .map(|h| h.state.to_string())
                    .unwrap_or_else(|| "-".into());
                t.row(vec![
                    p.name.clone(),
                    p.namespace.clone(),
                    opt(&p.pid),
                    if p.running { "yes" } else { "no" }.into(),
                    host_state,
                ]);
            }
            t.print();
            if !s.missing_namespaces.is_empty() {
                println!("missing namespaces: {}", s.missing_namespaces.join(", "));
            }
            if let Some(e) = &s.center_error {
                println!("center: not answering ({e})");
            }
            Ok(())
        }
        LabCommand::Client { prefix, cmd } => {
            let ns = lab::client_namespace(dir, prefix.as_deref())?;
            // Only returns on failure: on success this process becomes the command.
            Err(lab::exec_client(&ns, &cmd).into())
        }
        LabCommand::San(c) => {
            let what = match c {
                SanCommand::Stop => match lab::san::stop_target(dir)? {
                    Some(pid) => format!("SAN target stopped (pid {pid})"),
                    None => "SAN target was not running".to_string(),
                },
                SanCommand::Start => {
                    format!("SAN target started (pid {})", lab::san::start_target(dir)?)
                }
            };
            if fmt == Format::Table {
                println!("{what}");
            }
            Ok(())
        }
        LabCommand::Link(l) => {
            let (host, fault, what) = match l {
                LinkCommand::Shape {
                    host,
                    rate_mbit,
                    delay_ms,
                } => (
                    host,
                    LinkFault::Shape {
                        rate_mbit,
                        delay_ms,
                    },
                    format!("shaped to {rate_mbit} Mbit/s, {delay_ms} ms each way"),
                ),
                LinkCommand::Unshape { host } => (host, LinkFault::Unshape, "unshaped".into()),
                LinkCommand::Cut { host } => (host, LinkFault::Cut, "cut".into()),
                LinkCommand::Restore { host } => (host, LinkFault::Restore, "restored".into()),
            };
            lab::link(dir, &host, fault)?;
            if fmt == Format::Table {
                println!("link of {host} {what}");
            }
            Ok(())
        }
        LabCommand::MemoryErrors {
            host,
            corrected,
            uncorrected,
        } => {
            if corrected.is_none() && uncorrected.is_none() {
                return Err(CliError::usage(
                    "give --corrected N, --uncorrected N or both",
                ));
            }
            lab::memory_errors(dir, &host, corrected, uncorrected)?;
            if fmt == Format::Table {
                println!("host {host}: memory error counters set");
            }
            Ok(())
        }
        LabCommand::Restart { name, kill, start } => {
            let (old, new) = lab::restart(dir, &name, kill, &start.options()).await?;
            if fmt == Format::Table {
                println!("{name} restarted (pid {} → {new})", opt(&old));
            }
            Ok(())
        }
        LabCommand::Stop { name, kill } => {
            let old = lab::stop(dir, &name, kill)?;
            if fmt == Format::Table {
                match old {
                    Some(pid) => println!("{name} stopped (pid {pid})"),
                    None => println!("{name} was not running"),
                }
            }
            Ok(())
        }
        LabCommand::Seed {
            cluster,
            hosts,
            vms,
        } => {
            if !tern_api::valid_name(&cluster) {
                return Err(CliError::usage(format!(
                    "cluster name {cluster:?} is not valid: use [a-z0-9][a-z0-9-]{{0,31}}"
                )));
            }
            let plan = tern_center::seed::SeedPlan {
                cluster,
                hosts,
                vms,
            };
            let t = std::time::Instant::now();
            lab::stop(dir, "center", false)?;
            let db = dir.join("center").join("center.db");
            let seeded = tokio::task::spawn_blocking({
                let plan = plan.clone();
                move || -> Result<(), String> {
                    let mut store = tern_center::store::Store::open(&db)
                        .map_err(|e| format!("opening {}: {e}", db.display()))?;
                    tern_center::seed::seed(&mut store, &plan, chrono::Utc::now())
                        .map_err(|e| e.to_string())
                }
            })
            .await
            .map_err(|e| CliError::failed(format!("seeding: {e}")))?;
            // Started again whatever happened: a failed seed wrote nothing.
            let started = lab::start(dir, "center", &lab::StartOptions::default()).await;
            seeded.map_err(|e| CliError::failed(format!("seeding the store: {e}")))?;
            started?;
            if fmt == Format::Table {
                println!(
                    "cluster {} seeded with {} hosts and {} VMs in {:.1} s",
                    plan.cluster,
                    plan.hosts,
                    plan.vms,
                    t.elapsed().as_secs_f64()
                );
            }
            Ok(())
        }
        LabCommand::Start { name, start } => {
            let pid = lab::start(dir, &name, &start.options()).await?;
            if fmt == Format::Table {
                println!("{name} started (pid {pid})");
            }
            Ok(())
        }
    }
}
