//! `tern vm migrate NAME --to HOST`: dry-runs the pre-checks (a failed one is a refusal,
//! exit 4, nothing queued), queues a live migration and follows it with a progress bar (phase,
//! pass, data left, rates) until the VM runs on the destination or is rolled back.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use tern_api::center::{Task, TaskState};
use tern_api::evc::MigrationCheckReport;
use tern_api::migration::{MigrateVm, MigrationResult};
use tern_api::{ApiError, CenterClient};

use super::output::{print_json, short_id, Format};
use super::task::parse_duration;
use crate::error::{CliError, ExitKind};

#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// The VM to move.
    name: String,
    /// Destination host.
    #[arg(long)]
    to: String,
    /// Largest pause the guest may see, in ms [center default: 300]
    #[arg(long)]
    downtime_ms: Option<u64>,
    /// Give up and leave the VM on the source after this long (`90s`, `5m`) [default: scales
    /// with memory ÷ bandwidth]
    #[arg(long, value_parser = parse_duration)]
    deadline: Option<Duration>,
    /// Cap on the migration stream, in Mbit/s [default: unlimited]
    #[arg(long, value_name = "MBIT")]
    bandwidth: Option<u64>,
    /// Allow switching to post-copy when pre-copy cannot converge.
    #[arg(long)]
    allow_postcopy: bool,
    /// Run the pre-checks only; nothing moves.
    #[arg(long)]
    dry_run: bool,
    /// Measure the link before choosing the settings, even when a figure measured between
    /// these two hosts in the last 10 minutes is known (use after changing the network).
    #[arg(long)]
    probe_link: bool,
    /// Print the task id and return at once instead of following it.
    #[arg(long)]
    detach: bool,
    /// Stop following after this long (the migration keeps going).
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    wait_timeout: Duration,
}

pub async fn run(api: &CenterClient, a: MigrateArgs, fmt: Format) -> Result<(), CliError> {
    let body = MigrateVm {
        to: a.to.clone(),
        downtime_ms: a.downtime_ms,
        deadline_ms: a.deadline.map(|d| d.as_millis() as u64),
        bandwidth_mbit: a.bandwidth,
        allow_postcopy: a.allow_postcopy,
        dry_run: a.dry_run,
        probe_link: a.probe_link,
    };
    let api_err = |e: ApiError| {
        let nf = e.is_not_found();
        let err = CliError::from_api(e, "tern vm list");
        if nf {
            err.hint_unless_told("check the VM and host names: `tern vm list`, `tern host list`")
        } else {
            err
        }
    };
    // The pre-checks as a dry run first: a migration that cannot pass them is refused (exit 4)
    // before a task is even queued, like `tern vm can-migrate`.
    let report: MigrationCheckReport = api.can_migrate(&a.name, &a.to).await.map_err(api_err)?;
    if !report.ok {
        if fmt == Format::Json {
            print_json(&report)?;
        }
        let failed = report.failures();
        return Err(CliError::new(
            ExitKind::Refused,
            format!(
                "vm {} cannot migrate to {}; nothing moved. Failed pre-check(s): {}",
                a.name,
                a.to,
                failed.join("; ")
            ),
        )
        .hint(format!(
            "every check: `tern vm can-migrate {} --to {}`",
            a.name, a.to
        )));
    }
    let task: Task = api.migrate(&a.name, &body).await.map_err(api_err)?;
    if a.detach {
        return match fmt {
            Format::Json => print_json(&task),
            Format::Table => {
                println!("{}", task.id);
                Ok(())
            }
        };
    }
    let task = follow(api, &task, a.wait_timeout, fmt).await?;
    if fmt == Format::Json {
        print_json(&task)?;
    }
    match task.state {
        TaskState::Succeeded if a.dry_run => {
            if fmt == Format::Table {
                println!(
                    "vm {} can migrate to {} (dry run: every pre-check passed, nothing moved)",
                    a.name, a.to
                );
            }
            Ok(())
        }
        TaskState::Succeeded => {
            if fmt == Format::Table {
                print_summary(&task);
            }
            Ok(())
        }
        TaskState::Cancelled => Err(CliError::failed(format!(
            "migration of vm {} was cancelled: {}",
            a.name,
            task.error.as_deref().unwrap_or("it runs where it was")
        ))
        .hint(format!("see `tern event list --vm {}`", a.name))),
        _ => Err(CliError::failed(format!(
            "migration of vm {} failed: {}",
            a.name,
            task.error.as_deref().unwrap_or("no reason given")
        ))
        .hint(format!(
            "every decision is in `tern event list --vm {}`; `tern task show {}` has the figures",
            a.name,
            short_id(&task.id)
        ))),
    }
}

fn print_summary(task: &Task) {
    let r: Option<MigrationResult> = task
        .result
        .as_ref()
        .and_then(|v| serde_json::from_value(v.clone()).ok());
    match r {
        Some(r) => println!(
            "vm {} migrated {} → {}: guest paused {} ms (QEMU downtime {} ms), {:.1} MiB in {} \
             passes, {:.1} s in all (task {})",
            r.vm,
            r.from,
            r.to,
            r.pause_ms.unwrap_or(r.downtime_ms),
            r.downtime_ms,
            r.bytes as f64 / (1024.0 * 1024.0),
            r.passes,
            r.total_ms as f64 / 1000.0,
            short_id(&task.id)
        ),
        None => println!(
            "vm {} migrated: {} (task {})",
            task.vm.as_deref().unwrap_or("-"),
            task.phase,
            short_id(&task.id)
        ),
    }
}

/// Shows the task's progress until it ends: a bar on a terminal, a line per phase change
/// otherwise, nothing for JSON.
async fn follow(
    api: &CenterClient,
    task: &Task,
    timeout: Duration,
    fmt: Format,
) -> Result<Task, CliError> {
    let start = Instant::now();
    let bar = (fmt == Format::Table && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(100);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {pos:>3}% {msg}")
        {
            b.set_style(style.progress_chars("=> "));
        }
        b.enable_steady_tick(Duration::from_millis(200));
        b
    });
    let mut last_line = String::new();
    let mut unreachable_since: Option<Instant> = None;
    let id = task.id;
    let result = loop {
        match api.task(id).await {
            Ok(t) => {
                unreachable_since = None;
                if let Some(b) = &bar {
                    b.set_position(u64::from(t.progress));
                    b.set_message(t.phase.clone());
                } else if fmt == Format::Table && t.phase != last_line {
                    eprintln!(
                        "{:>6.1}s {:>3}% {}",
                        start.elapsed().as_secs_f64(),
                        t.progress,
                        t.phase
                    );
                    last_line = t.phase.clone();
                }
                if t.state.is_done() {
                    break Ok(t);
                }
            }
            Err(e @ ApiError::Transport { .. }) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(15) {
                    break Err(CliError::from_api(e, "tern task list"));
                }
            }
            Err(e) => break Err(CliError::from_api(e, "tern task list")),
        }
        if start.elapsed() > timeout {
            break Err(CliError::failed(format!(
                "migration task {id} has not finished after {:.0} s",
                start.elapsed().as_secs_f64()
            ))
            .hint(format!(
                "it keeps going: `tern task wait {id}`, or cancel it: `tern task cancel {id}`"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    result
}
