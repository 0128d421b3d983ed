//! The `tern` binary: command line parsing and output only; the daemons and engines live in
//! their crates, the lab in `lab`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;
mod error;
mod lab;

use cmd::connect::{ConnectArgs, LabDirArgs};
use cmd::output::Format;
use error::CliError;

const LONG_ABOUT: &str = "\
Live migration and cluster scheduling for QEMU/KVM.

The CLI talks to `tern center` over its REST API. It finds the center with --center /
TERN_CENTER (unix:/path or http://IP:PORT) and --token / TERN_TOKEN; when neither is given
and a lab is up (`tern lab up`), it uses the lab's.

Exit codes:
  0  success
  1  the operation failed (a task failed or timed out, or the center failed: HTTP 5xx)
  2  usage error (bad command line)
  3  not found (the VM, host, cluster or task named does not exist: HTTP 404)
  4  refused by the center (bad request, conflict, missing token: HTTP 4xx other than 404)
  5  cannot reach the center";

#[derive(Debug, Parser)]
#[command(
    name = "tern",
    version,
    about = "Live migration and cluster scheduling for QEMU/KVM",
    long_about = LONG_ABOUT
)]
struct Cli {
    /// Output format of listings and shows: aligned tables, or the API's JSON objects.
    #[arg(short = 'o', long, value_enum, global = true, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

/// A command group that talks to the center: connection flags, then the subcommand.
macro_rules! client_group {
    ($name:ident, $sub:ty) => {
        client_group!($name, $sub, ConnectArgs);
    };
    ($name:ident, $sub:ty, $connect:ty) => {
        #[derive(Debug, clap::Args)]
        struct $name {
            #[command(flatten)]
            connect: $connect,
            #[command(subcommand)]
            cmd: $sub,
        }
    };
}

client_group!(ClusterArgs, cmd::cluster::ClusterCommand);
client_group!(VmArgs, cmd::vm::VmCommand);
client_group!(TaskArgs, cmd::task::TaskCommand);
client_group!(EventArgs, cmd::event::EventCommand);
client_group!(TokenArgs, cmd::token::TokenCommand);
client_group!(RuleArgs, cmd::rule::RuleCommand);
client_group!(PoolArgs, cmd::pool::PoolCommand);
client_group!(ImageArgs, cmd::image::ImageCommand);
client_group!(DatastoreArgs, cmd::datastore::DatastoreCommand);
client_group!(LabArgs, cmd::lab::LabCommand, LabDirArgs);

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the cluster manager daemon, or prepare one (`tern center init`).
    Center(CenterCmd),
    /// Hosts: run the agent, add (join token) and remove, list and show, maintenance mode.
    #[command(subcommand)]
    Host(HostCommand),
    /// Clusters: create, list, show.
    Cluster(ClusterArgs),
    /// Virtual machines: create, start, stop, set (resource policy), list, show, console, delete.
    Vm(VmArgs),
    /// Tasks (long operations): list, show, wait, cancel.
    Task(TaskArgs),
    /// The event history: what changed, and who asked.
    Event(EventArgs),
    /// API tokens: create one per person or tool with a role, list, revoke (admin only).
    Token(TokenArgs),
    /// A cluster on this machine from network namespaces, for tests and demos.
    Lab(LabArgs),
    /// DRS placement rules of a cluster: VMs together, apart, or on (or off) some hosts.
    Rule(RuleArgs),
    /// Resource pools of a cluster: a tree dividing its CPU and memory by shares,
    /// reservations and limits.
    Pool(PoolArgs),
    /// Disk templates on the shared storage: import, list, show, remove; VMs' disks are made
    /// from them (`tern vm create --image`).
    Image(ImageArgs),
    /// Datastores VMs' disks live on (directory, iSCSI target, block device), and which hosts
    /// reach each: add, list, show, remove.
    Datastore(DatastoreArgs),
    /// DRS: a cluster's recommendations from the center (recommend, apply), or the engine
    /// offline (simulate, explain).
    #[command(subcommand)]
    Drs(cmd::drs::DrsCommand),
    /// Trust a center's CA once (shows its fingerprint first), for --center https://….
    Trust(cmd::trust::TrustArgs),
    /// Open the web client: forwards a loopback port to the center's (or the lab's) unix
    /// socket, for a browser on this machine.
    Ui(cmd::ui::UiArgs),
}

/// `tern center [FLAGS]` runs the daemon; `tern center init` prepares a machine for it.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct CenterCmd {
    #[command(subcommand)]
    sub: Option<CenterSub>,
    #[command(flatten)]
    run: Box<tern_center::CenterArgs>,
}

#[derive(Debug, Subcommand)]
enum CenterSub {
    /// Prepare this machine to run the center: its config file, data directory, admin token
    /// and cluster CA, and the tern-center service enabled.
    Init(cmd::install::CenterInitArgs),
    /// Show the control plane: this center, whether it is one of an HA group, which center
    /// leads and whether this one takes changes.
    Status {
        #[command(flatten)]
        connect: cmd::connect::ConnectArgs,
    },
}

// The daemons take their own flags (the agent has its own --center), so the CLI's
// connection flags live in each client command, not on `tern` itself.
#[derive(Debug, Subcommand)]
enum HostCommand {
    /// Run the host agent daemon (one per host).
    Agent(Box<tern_host::AgentArgs>),
    /// Carry one migration's encrypted stream between this host's QEMU and another host's
    /// relay (started by the agent, one per migration and side; the key comes on stdin).
    Relay(tern_host::RelayArgs),
    /// Make this machine a host of a center: the agent's config file, the join token, and
    /// the tern-host service enabled.
    Join(Box<cmd::install::HostJoinArgs>),
    /// Print a one-time join token for a host: its agent registers with it once (given
    /// with --enrol-token-file), then with its own secret. Re-issue one to re-join a host
    /// that lost its state dir.
    Add {
        name: String,
        /// How long the token may be used: seconds, or with s, m, h, d (at most 7d).
        #[arg(long, default_value = "1h", value_parser = cmd::host::parse_ttl)]
        ttl: u64,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Forget a host that has no VMs left; its agent's secret stops working at once.
    Remove {
        name: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// List hosts.
    List {
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Show one host.
    Show {
        name: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Maintenance mode: `enter` empties a host live and keeps new VMs off it; `exit` returns
    /// it to service.
    Maintenance {
        #[command(subcommand)]
        cmd: cmd::host::MaintenanceCommand,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Empty a host live without maintenance mode (a degraded host, a recommendation).
    #[command(long_about = "\
Empty a host live without maintenance mode: its running VMs move to the hosts the DRS
engine picks, several at once within the per-host limit, keeping their connections. The
host keeps its state and its stopped VMs. This is what the proactive mode `automatic` runs
by itself on a degraded host; under `recommend` an event tells you to run it.
Fails (exit 1) naming each VM that could not leave and why.")]
    Evacuate {
        /// The host (as `tern host list` names it).
        host: String,
        #[command(flatten)]
        wait: cmd::host::WaitArgs,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Mark a host degraded (failing hardware): it takes no new VMs, and the cluster's
    /// proactive mode acts on it (`tern cluster set-drs --proactive`).
    Degrade {
        /// The host (as `tern host list` names it).
        host: String,
        /// Why, for the event log and `tern host show` (one line, up to 200 characters).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Clear a host's degradation after the repair: it takes VMs again, and its health
    /// counters are judged from their values now. Nothing moves back by itself.
    Restore {
        /// The host (as `tern host list` names it).
        host: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let daemon = matches!(
        cli.command,
        Command::Center(CenterCmd { sub: None, .. })
            | Command::Host(HostCommand::Agent(_) | HostCommand::Relay(_))
    );
    // Daemons log at info; the CLI only says more when asked (RUST_LOG).
    let default_filter = if daemon { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        // Daemons log to files in the lab: colour codes only belong on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message);
            if let Some(h) = &e.hint {
                eprintln!("hint: {h}");
            }
            ExitCode::from(e.kind.code())
        }
    }
}

fn run(cli: Cli) -> Result<(), CliError> {
    let Cli { output, command } = cli;
    let command = match command {
        Command::Drs(c) if !c.online() => return cmd::drs::run(c, output).map_err(CliError::from),
        other => other,
    };
    let rt = tokio::runtime::Runtime::new()
        .map_err(|e| CliError::failed(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(async move {
        match command {
            Command::Center(CenterCmd { sub: None, run }) => {
                tern_center::run(*run).await.map_err(CliError::from)
            }
            Command::Center(CenterCmd {
                sub: Some(CenterSub::Init(a)),
                ..
            }) => cmd::install::center_init(a, output),
            Command::Center(CenterCmd {
                sub: Some(CenterSub::Status { connect }),
                ..
            }) => cmd::host::control_plane(&connect.client()?, output).await,
            Command::Host(HostCommand::Join(a)) => cmd::install::host_join(*a, output).await,
            Command::Host(HostCommand::Agent(a)) => {
                tern_host::run(*a).await.map_err(CliError::from)
            }
            Command::Host(HostCommand::Relay(a)) => {
                tern_host::relay::run(a).await.map_err(CliError::from)
            }
            Command::Host(HostCommand::Add { name, ttl, connect }) => {
                cmd::host::add(&connect.client()?, &name, ttl, output).await
            }
            Command::Host(HostCommand::Remove { name, connect }) => {
                cmd::host::remove(&connect.client()?, &name, output).await
            }
            Command::Host(HostCommand::List { connect }) => {
                cmd::host::list(&connect.client()?, output).await
            }
            Command::Host(HostCommand::Show { name, connect }) => {
                cmd::host::show(&connect.client()?, &name, output).await
            }
            Command::Host(HostCommand::Maintenance { cmd, connect }) => {
                cmd::host::maintenance(&connect.client()?, cmd, output).await
            }
            Command::Host(HostCommand::Evacuate {
                host,
                wait,
                connect,
            }) => cmd::host::evacuate(&connect.client()?, &host, wait, output).await,
            Command::Host(HostCommand::Degrade {
                host,
                reason,
                connect,
            }) => cmd::host::degrade(&connect.client()?, &host, &reason, output).await,
            Command::Host(HostCommand::Restore { host, connect }) => {
                cmd::host::restore(&connect.client()?, &host, output).await
            }
            Command::Cluster(g) => cmd::cluster::run(g.cmd, &g.connect.client()?, output).await,
            Command::Vm(g) => cmd::vm::run(g.cmd, &g.connect.client()?, output).await,
            Command::Task(g) => cmd::task::run(g.cmd, &g.connect.client()?, output).await,
            Command::Event(g) => cmd::event::run(g.cmd, &g.connect.client()?, output).await,
            Command::Token(g) => cmd::token::run(g.cmd, &g.connect.client()?, output).await,
            Command::Rule(g) => cmd::rule::run(g.cmd, &g.connect.client()?, output).await,
            Command::Pool(g) => cmd::pool::run(g.cmd, &g.connect.client()?, output).await,
            Command::Image(g) => cmd::image::run(g.cmd, &g.connect.client()?, output).await,
            Command::Datastore(g) => cmd::datastore::run(g.cmd, &g.connect.client()?, output).await,
            Command::Lab(g) => cmd::lab::run(g.cmd, &g.connect.lab_dir(), output).await,
            Command::Drs(c) => cmd::drs::run_online(c, output).await,
            Command::Trust(a) => cmd::trust::run(a).await,
            Command::Ui(a) => cmd::ui::run(a).await,
        }
    })
}
