//! `tern task list|show|wait|cancel`, and the task waiter `vm start|stop` use.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use tern_api::center::{Task, TaskQuery, TaskState};
use tern_api::{ApiError, CenterClient};
use uuid::Uuid;

use super::output::{opt, print_json, short_id, time, Format, Sheet, Table};
use crate::error::{ApiResultExt, CliError};

#[derive(Debug, clap::Subcommand)]
pub enum TaskCommand {
    /// List tasks, newest first.
    List,
    /// Show one task (ID or a unique prefix of it).
    Show { id: String },
    /// Wait until a task ends; exits 1 if it failed or was cancelled.
    Wait {
        id: String,
        /// Give up after this long (`90`, `30s`, `500ms`, `5m`); the task keeps running.
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
    },
    /// Ask the center to cancel a task.
    Cancel { id: String },
}

pub async fn run(cmd: TaskCommand, api: &CenterClient, fmt: Format) -> Result<(), CliError> {
    match cmd {
        TaskCommand::List => {
            let mut tasks: Vec<Task> = api
                .tasks(&TaskQuery::default())
                .await
                .or_list("tern task list")?;
            tasks.sort_by_key(|t| std::cmp::Reverse(t.created_at));
            if fmt == Format::Json {
                return print_json(&tasks);
            }
            let mut t = Table::new(&[
                "ID", "KIND", "VM", "HOST", "STATE", "PROGRESS", "CREATED", "PHASE",
            ]);
            for k in &tasks {
                t.row(vec![
                    short_id(&k.id),
                    kind_name(k),
                    opt(&k.vm),
                    opt(&k.host),
                    k.state.to_string(),
                    format!("{}%", k.progress),
                    time(&k.created_at),
                    k.error.clone().unwrap_or_else(|| k.phase.clone()),
                ]);
            }
            t.print();
            Ok(())
        }
        TaskCommand::Show { id } => {
            let id = resolve_id(api, &id).await?;
            let task = get(api, id).await?;
            print_task(&task, fmt)
        }
        TaskCommand::Wait { id, timeout } => {
            let id = resolve_id(api, &id).await?;
            let task = wait(api, id, timeout, fmt).await?;
            print_task(&task, fmt)
        }
        TaskCommand::Cancel { id } => {
            let id = resolve_id(api, &id).await?;
            let task: Task = api.cancel_task(id).await.or_list("tern task list")?;
            if fmt == Format::Json {
                return print_json(&task);
            }
            println!("cancel requested for task {} ({})", task.id, task.state);
            Ok(())
        }
    }
}

fn kind_name(t: &Task) -> String {
    serde_json::to_value(t.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{:?}", t.kind))
}

pub fn print_task(task: &Task, fmt: Format) -> Result<(), CliError> {
    if fmt == Format::Json {
        return print_json(task);
    }
    let mut s = Sheet::new();
    s.add("id", task.id)
        .add("kind", kind_name(task))
        .add("vm", opt(&task.vm))
        .add("host", opt(&task.host))
        .add("state", task.state)
        .add("progress", format!("{}%", task.progress))
        .add("phase", &task.phase)
        .add("error", opt(&task.error))
        .add("created", time(&task.created_at))
        .add(
            "finished",
            task.finished_at
                .as_ref()
                .map(time)
                .unwrap_or_else(|| "-".into()),
        );
    if let Some(r) = &task.result {
        s.add("result", r.to_string());
    }
    s.print();
    Ok(())
}

async fn get(api: &CenterClient, id: Uuid) -> Result<Task, CliError> {
    api.task(id).await.or_list("tern task list")
}

/// A full UUID, or a prefix that matches exactly one task.
pub async fn resolve_id(api: &CenterClient, id: &str) -> Result<Uuid, CliError> {
    if let Ok(u) = Uuid::parse_str(id) {
        return Ok(u);
    }
    let prefix = id.to_ascii_lowercase();
    if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(CliError::usage(format!("`{id}` is not a task id")));
    }
    let tasks: Vec<Task> = api
        .tasks(&TaskQuery::default())
        .await
        .or_list("tern task list")?;
    let hits: Vec<&Task> = tasks
        .iter()
        .filter(|t| t.id.to_string().starts_with(&prefix))
        .collect();
    match hits.as_slice() {
        [one] => Ok(one.id),
        [] => Err(
            CliError::not_found(format!("no task id starts with `{id}`"))
                .hint("see the tasks with `tern task list`"),
        ),
        many => Err(CliError::usage(format!(
            "`{id}` matches {} tasks; give more characters",
            many.len()
        ))),
    }
}

/// Shows progress on stderr: a spinner on a terminal, one line per change otherwise, nothing
/// when the output is JSON (scripts read stdout and exit codes).
enum Progress {
    Spinner(indicatif::ProgressBar),
    Lines(String),
    Quiet,
}

impl Progress {
    fn new(fmt: Format) -> Self {
        if fmt == Format::Json {
            return Progress::Quiet;
        }
        if !std::io::stderr().is_terminal() {
            return Progress::Lines(String::new());
        }
        let b = indicatif::ProgressBar::new_spinner();
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
            b.set_style(style);
        }
        b.enable_steady_tick(Duration::from_millis(120));
        Progress::Spinner(b)
    }

    fn update(&mut self, t: &Task) {
        let what = match &t.vm {
            Some(vm) => format!("{} {vm}", kind_name(t)),
            None => kind_name(t),
        };
        let line = format!("{what}: {} {}% {}", t.state, t.progress, t.phase);
        match self {
            Progress::Spinner(b) => b.set_message(line),
            Progress::Lines(last) if *last != line => {
                eprintln!("{line}");
                *last = line;
            }
            _ => {}
        }
    }

    fn finish(&self) {
        if let Progress::Spinner(b) = self {
            b.finish_and_clear();
        }
    }
}

/// What `--detach` prints of a task just queued: its id (or the task as JSON).
pub fn print_detached(task: &Task, fmt: Format) -> Result<(), CliError> {
    match fmt {
        Format::Json => print_json(task),
        Format::Table => {
            println!("{}", task.id);
            Ok(())
        }
    }
}

/// Polls a task until it ends. Succeeded → `Ok`; failed, cancelled or timed out → an error
/// with what to do next. Rides out a center restart (transport errors) within the timeout.
pub async fn wait(
    api: &CenterClient,
    id: Uuid,
    timeout: Option<Duration>,
    fmt: Format,
) -> Result<Task, CliError> {
    let start = Instant::now();
    let deadline = timeout.map(|t| start + t);
    let mut progress = Progress::new(fmt);
    let mut unreachable_since: Option<Instant> = None;
    let result = loop {
        match api.task(id).await {
            Ok(t) => {
                unreachable_since = None;
                progress.update(&t);
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
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break Err(CliError::failed(format!(
                "task {id} has not finished after {:.1} s",
                start.elapsed().as_secs_f64()
            ))
            .hint(format!(
                "it keeps running: follow it with `tern task wait {id}`, or cancel it with \
                 `tern task cancel {id}`"
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    progress.finish();
    let task = result?;
    match task.state {
        TaskState::Succeeded => Ok(task),
        TaskState::Cancelled => Err(CliError::failed(format!("task {id} was cancelled"))),
        _ => {
            let what = task
                .vm
                .as_ref()
                .map(|v| format!("`tern event list --vm {v}`"))
                .unwrap_or_else(|| "`tern event list`".into());
            Err(CliError::failed(format!(
                "task {id} failed: {}",
                task.error.as_deref().unwrap_or("no reason given")
            ))
            .hint(format!("see {what} and `tern task show {id}`")))
        }
    }
}

/// `90` (seconds), `30s`, `500ms`, `5m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 30s, 500ms, 5m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit in `{s}` (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("3d").is_err());
    }
}
