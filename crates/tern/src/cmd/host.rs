//! `tern host add|remove|list|show|maintenance|evacuate|degrade|restore` (the agent daemon
//! itself is `tern host agent`, wired in main).

use tern_api::center::{
    AddHost, Host, HostMaintenance, JoinToken, MaintenanceAction, MaintenanceResult, Task,
};
use tern_api::CenterClient;

use super::cluster::join_or_dash;
use super::output::{ago, opt, print_json, short_id, time, Format, Sheet, Table};
use crate::error::{ApiResultExt, CliError};

/// Parses a lifetime: seconds, or a number with s, m, h or d.
pub fn parse_ttl(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a lifetime: write e.g. 90s, 30m, 2h or 1d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit is s, m, h or d")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// `tern host add`: a one-time join token for a new (or re-installed) host.
pub async fn add(api: &CenterClient, name: &str, ttl_s: u64, fmt: Format) -> Result<(), CliError> {
    let t: JoinToken = api
        .add_host(name, &AddHost { ttl_s: Some(ttl_s) })
        .await
        .or_list("tern host list")?;
    if fmt == Format::Json {
        return print_json(&t);
    }
    eprintln!(
        "join token for host {} (one use, valid until {}): write it to a file on that host \
         and start its agent with --name {} --enrol-token-file FILE",
        t.host, t.expires_at, t.host
    );
    println!("{}", t.token);
    Ok(())
}

/// `tern host remove`: forgets a host with no VMs and revokes its secret.
pub async fn remove(api: &CenterClient, name: &str, fmt: Format) -> Result<(), CliError> {
    api.remove_host(name).await.or_list("tern host list")?;
    if fmt == Format::Table {
        println!("removed host {name}; its agent can no longer reach the cluster");
    }
    Ok(())
}

pub async fn list(api: &CenterClient, fmt: Format) -> Result<(), CliError> {
    let hosts: Vec<Host> = api.hosts().await.or_list("tern host list")?;
    if fmt == Format::Json {
        return print_json(&hosts);
    }
    let mut t = Table::new(&[
        "NAME",
        "CLUSTER",
        "STATE",
        "ACCEL",
        "CORES",
        "CPU%",
        "MEM_USED_MIB",
        "MEM_MIB",
        "VMS",
        "HEARTBEAT",
    ]);
    for h in &hosts {
        let (cpu, used) = match &h.load {
            Some(l) => (
                format!("{:.0}", l.cpu_percent),
                l.memory_used_mib.to_string(),
            ),
            None => ("-".into(), "-".into()),
        };
        t.row(vec![
            h.name.clone(),
            h.cluster.clone(),
            state_text(h),
            h.facts.accelerator.to_string(),
            h.facts.cores.to_string(),
            cpu,
            used,
            h.facts.memory_mib.to_string(),
            h.vms.len().to_string(),
            h.last_heartbeat
                .as_ref()
                .map(ago)
                .unwrap_or_else(|| "never".into()),
        ]);
    }
    t.print();
    Ok(())
}

pub async fn show(api: &CenterClient, name: &str, fmt: Format) -> Result<(), CliError> {
    let h: Host = api.host(name).await.or_list("tern host list")?;
    if fmt == Format::Json {
        return print_json(&h);
    }
    let f = &h.facts;
    let mut s = Sheet::new();
    s.add("name", &h.name)
        .add("id", h.id)
        .add("cluster", &h.cluster)
        .add("state", state_text(&h))
        .add("agent_url", &h.agent_url)
        .add("hostname", &f.hostname)
        .add(
            "cpu",
            format!("{} cores, {} MHz, {}", f.cores, f.cpu_mhz, f.cpu_model_name),
        )
        .add("cpu_ceiling", opt(&f.cpu_ceiling));
    super::evc::host_cpu_lines(&h, &mut s);
    s.add("memory_mib", f.memory_mib)
        .add("accelerator", f.accelerator)
        .add("qemu", &f.qemu_version)
        .add("agent_version", &f.agent_version)
        .add("migration_address", &f.migration_address)
        .add("shared_storage", &f.shared_storage)
        .add(
            "uefi",
            if f.uefi {
                "yes (OVMF)"
            } else {
                "no: VMs with firmware uefi do not start here (install ovmf)"
            },
        )
        .add(
            "resource_control",
            f.resource_control.as_deref().unwrap_or(
                "none: no cgroup CPU controller, VMs with shares, reservations or limits do \
                 not start here",
            ),
        );
    if let Some(l) = &h.load {
        s.add("cpu_percent", format!("{:.1}", l.cpu_percent)).add(
            "memory_used_mib",
            format!("{} of {}", l.memory_used_mib, l.memory_total_mib),
        );
    }
    s.add(
        "last_heartbeat",
        h.last_heartbeat
            .as_ref()
            .map(ago)
            .unwrap_or_else(|| "never".into()),
    )
    .add("vms", join_or_dash(&h.vms));
    if let Some(c) = &h.certificate {
        s.add(
            "certificate",
            format!(
                "serial {}, issued {}, valid until {} (the agent renews it)",
                c.serial,
                time(&c.issued_at),
                time(&c.expires_at)
            ),
        );
    }
    for p in &h.problems {
        s.add("problem", p);
    }
    health_lines(&h, &mut s);
    s.print();
    Ok(())
}

fn health_lines(h: &Host, s: &mut Sheet) {
    if h.health.degraded.is_empty() {
        s.add("health", "healthy");
    }
    for f in &h.health.degraded {
        s.add("health", format!("degraded since {}: {f}", time(&f.at)));
    }
    for f in &h.health.ignored {
        s.add(
            "health_signal",
            format!("{f} (seen {}; proactive mode off)", time(&f.at)),
        );
    }
    if let Some(r) = &h.health.report {
        let n = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        s.add(
            "health_counters",
            format!(
                "memory errors {} corrected / {} uncorrected, machine checks {}, disk errors \
                 {}, NIC errors {}, steal {:.0}%, run queue {:.1}/core",
                n(r.memory_corrected),
                n(r.memory_uncorrected),
                n(r.machine_checks),
                n(r.disk_errors),
                n(r.nic_errors),
                r.cpu_steal_percent,
                r.run_queue_per_core
            ),
        );
    }
}

/// The host's state, with "degraded" when its health is (or it reports problems; `tern host
/// show` says which).
fn state_text(h: &Host) -> String {
    if h.health.is_degraded() {
        let signals: Vec<String> = h
            .health
            .degraded
            .iter()
            .map(|f| f.signal.to_string())
            .collect();
        format!("{} (degraded: {})", h.state, signals.join(", "))
    } else if h.problems.is_empty() {
        h.state.to_string()
    } else {
        format!("{} (degraded)", h.state)
    }
}

/// How a command that starts a task follows it.
#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// Print the task id and return at once instead of following it.
    #[arg(long)]
    pub detach: bool,
    /// Stop following after this long (`90s`, `30m`); the task keeps going.
    #[arg(long, value_parser = super::task::parse_duration, default_value = "2h")]
    pub wait_timeout: std::time::Duration,
}

/// `tern host evacuate HOST`.
pub async fn evacuate(
    api: &CenterClient,
    host: &str,
    wait: WaitArgs,
    fmt: Format,
) -> Result<(), CliError> {
    let task: Task = api.evacuate(host).await.or_list("tern host list")?;
    follow_emptying(api, host, task, wait.detach, wait.wait_timeout, fmt).await
}

/// `tern host degrade HOST --reason TEXT`.
pub async fn degrade(
    api: &CenterClient,
    host: &str,
    reason: &str,
    fmt: Format,
) -> Result<(), CliError> {
    let h = api
        .degrade_host(host, reason)
        .await
        .or_list("tern host list")?;
    if fmt == Format::Json {
        return print_json(&h);
    }
    println!(
        "host {host} is degraded ({}): nothing new is placed there; the cluster's proactive \
         mode decides whether its VMs leave (tern event list --host {host})",
        h.health.summary()
    );
    Ok(())
}

/// `tern host restore HOST`.
pub async fn restore(api: &CenterClient, host: &str, fmt: Format) -> Result<(), CliError> {
    let h = api.restore_host(host).await.or_list("tern host list")?;
    if fmt == Format::Json {
        return print_json(&h);
    }
    println!("host {host} is healthy again: VMs may be placed there");
    Ok(())
}

/// `tern host maintenance enter|exit HOST`.
#[derive(Debug, clap::Subcommand)]
pub enum MaintenanceCommand {
    /// Put a host in maintenance mode and empty it live.
    #[command(long_about = "\
Put a host in maintenance mode and empty it live, so its hardware can be serviced.

What happens, in order:
  1. The host is flagged at once: from then on no VM is placed, started or migrated there.
  2. Tasks already acting on its VMs (a start, a migration) are waited for.
  3. The DRS engine plans where each running VM goes (memory fit, rules, spread over the
     other hosts), after dry-running the migration pre-checks (CPU, storage, size) against
     every other host; VMs no host can take are listed as blockers with the reason.
  4. The running VMs are live-migrated in the plan's order, up to 2 at once leaving the
     host (and 2 arriving at any one destination); the guests keep running and keep their
     connections. Progress counts the VMs handled.
  5. Stopped VMs are registered on another host (they start there next time); one that no
     host can take stays registered here, with a warning.

If a running VM cannot leave (a blocker, a failed migration), the command fails (exit 1)
naming each VM and why, and the host STAYS in maintenance mode so nothing new lands there:
fix the cause and run `enter` again, or `exit` to return the host to service. Every
decision is in `tern event list --host HOST`. A host already in maintenance with no VMs is a
no-op; a disconnected host is refused (exit 4).")]
    Enter {
        /// The host to empty (as `tern host list` names it).
        host: String,
        /// Print the task id and return at once instead of following it.
        #[arg(long)]
        detach: bool,
        /// Stop following after this long (`90s`, `30m`); the evacuation keeps going.
        #[arg(long, value_parser = super::task::parse_duration, default_value = "2h")]
        wait_timeout: std::time::Duration,
    },
    /// Return a host to service: VMs may be placed, started and migrated there again.
    #[command(long_about = "\
Return a host to service: it leaves maintenance mode, and VMs may be placed, started and
migrated there again. Nothing moves back by itself. Refused (exit 4) while `enter` is still
emptying the host: cancel that task first (`tern task cancel ID`).")]
    Exit {
        /// The host to return to service.
        host: String,
    },
}

pub async fn maintenance(
    api: &CenterClient,
    cmd: MaintenanceCommand,
    fmt: Format,
) -> Result<(), CliError> {
    let (host, action) = match &cmd {
        MaintenanceCommand::Enter { host, .. } => (host.clone(), MaintenanceAction::Enter),
        MaintenanceCommand::Exit { host } => (host.clone(), MaintenanceAction::Exit),
    };
    let task: Task = api
        .maintenance(&host, &HostMaintenance { action })
        .await
        .or_list("tern host list")?;
    let MaintenanceCommand::Enter {
        detach,
        wait_timeout,
        ..
    } = cmd
    else {
        if fmt == Format::Json {
            return print_json(&task);
        }
        println!("{}", task.phase);
        return Ok(());
    };
    follow_emptying(api, &host, task, detach, wait_timeout, fmt).await
}

/// Follows a task that empties a host (maintenance entry, evacuation) and prints its moves.
async fn follow_emptying(
    api: &CenterClient,
    host: &str,
    task: Task,
    detach: bool,
    wait_timeout: std::time::Duration,
    fmt: Format,
) -> Result<(), CliError> {
    if detach {
        return super::task::print_detached(&task, fmt);
    }
    let done = match super::task::wait(api, task.id, Some(wait_timeout), fmt).await {
        Ok(t) => t,
        Err(e) => {
            if fmt == Format::Json {
                if let Ok(t) = api.task(task.id).await {
                    print_json(&t)?;
                }
            }
            return Err(e.hint(format!(
                "every decision is in `tern event list --host {host}`; `tern task show {}` has \
                 the result",
                short_id(&task.id)
            )));
        }
    };
    if fmt == Format::Json {
        return print_json(&done);
    }
    let r: Option<MaintenanceResult> = done
        .result
        .as_ref()
        .and_then(|v| serde_json::from_value(v.clone()).ok());
    println!("{}", done.phase);
    if let Some(r) = r {
        for m in &r.migrated {
            println!("  migrated  {} → {}", m.vm, m.to);
        }
        for m in &r.rehomed {
            println!("  re-homed  {} → {} (stopped)", m.vm, m.to);
        }
        for l in &r.left {
            println!("  stays     {}: {}", l.vm, l.why);
        }
    }
    Ok(())
}

/// `tern center status`.
pub async fn control_plane(api: &CenterClient, fmt: Format) -> Result<(), CliError> {
    let cp = api.control_plane().await.or_list("tern center status")?;
    match fmt {
        Format::Json => print_json(&cp),
        Format::Table => {
            if !cp.ha {
                println!("a single center (state in its own SQLite store); it takes changes");
                return Ok(());
            }
            let me = cp.center.clone().unwrap_or_default();
            match &cp.leader {
                Some(l) if l.name == me && cp.takes_changes => {
                    println!("center {me} leads (term {}) and takes changes", cp.term)
                }
                Some(l) if l.name == me => println!("center {me} was elected and is taking over"),
                Some(l) => println!(
                    "center {me} stands by; the leader is {} at {} (send changes there)",
                    l.name, l.url
                ),
                None => {
                    println!("center {me} stands by; no center leads (an election is under way)")
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_ttl;

    #[test]
    fn lifetimes_parse_with_units() {
        assert_eq!(parse_ttl("90"), Ok(90));
        assert_eq!(parse_ttl("30m"), Ok(1800));
        assert_eq!(parse_ttl("2h"), Ok(7200));
        assert_eq!(parse_ttl("1d"), Ok(86_400));
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("99999999999999999999d").is_err());
    }
}
