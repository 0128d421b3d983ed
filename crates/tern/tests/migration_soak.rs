//! Live migration soak and destination faults in the lab, through the CLI, with real guests:
//! one VM moves ten times between h1 and h2 while its memory verifier dirties memory, its disk
//! journal (a qcow2 image on shared storage) appends, and one client run streams from it across
//! every move; then the destination agent killed during pre-copy, and the destination's
//! migration link cut until the deadline, each end with exactly one running copy, on the source.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{journal_records, qemus_of, text, wait_for, Lab, StreamClient};
use serde_json::Value;

const MOVES: u32 = 10;

/// Copies the lab's daemon logs to /tmp/tern-test-logs/<prefix>/ when the test fails (the lab's
/// directory goes with `lab down`). Declare it after the `Lab` so it drops first.
struct KeepLogs {
    dir: PathBuf,
    prefix: String,
}

impl KeepLogs {
    fn of(lab: &Lab) -> KeepLogs {
        KeepLogs {
            dir: lab.dir.join("logs"),
            prefix: lab.prefix.clone(),
        }
    }
}

impl Drop for KeepLogs {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let to = Path::new("/tmp/tern-test-logs").join(&self.prefix);
        if std::fs::create_dir_all(&to).is_err() {
            return;
        }
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let _ = std::fs::copy(e.path(), to.join(e.file_name()));
        }
        eprintln!("the lab's logs are kept in {}", to.display());
    }
}

/// A test VM with a verifier, a journal disk and the serve port.
struct Guest {
    name: String,
    id: String,
    addr: String,
    disk: PathBuf,
    /// The disk image's format (raw, qcow2).
    format: String,
    /// The guest's boot, from its first stats.
    boot_id: Value,
}

/// Creates and boots a VM on h1 with the memory verifier (64 MiB, 16 MiB/s dirtied) and the disk
/// journal on a new 64 MiB image (`format`: raw or qcow2) made with `qemu-img create` on the
/// lab's shared storage; returns once the verifier filled its memory and the journal appends.
fn create(lab: &Lab, name: &str, ip: &str, mac: &str, format: &str) -> Guest {
    create_dirtying(lab, name, ip, mac, format, 16)
}

/// [`create`] with the verifier dirtying `dirty_mib_s` MiB/s.
fn create_dirtying(
    lab: &Lab,
    name: &str,
    ip: &str,
    mac: &str,
    format: &str,
    dirty_mib_s: u32,
) -> Guest {
    let disk = lab.shared().join(format!("{name}.{format}"));
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(&disk)
        .arg("64M")
        .output()
        .expect("run qemu-img");
    assert!(out.status.success(), "qemu-img create: {}", text(&out));
    let spec = format!("{},format={format}", disk.display());
    let id = lab.create_vm(
        name,
        "h1",
        ip,
        mac,
        256,
        &format!("tern.mem=64 tern.dirty={dirty_mib_s} tern.disk=/dev/vda"),
        &[&spec],
    );
    let addr = format!("{ip}:7000");
    let ready = wait_for("the journal to append", Duration::from_secs(60), || {
        let s = lab.guest_stats(&addr);
        (s["disk"]["next_seq"].as_u64().unwrap_or(0) > 0 && s["mem"]["filled"] == true).then_some(s)
    });
    Guest {
        name: name.to_string(),
        id,
        addr,
        disk,
        format: format.to_string(),
        boot_id: ready["boot_id"].clone(),
    }
}

fn task_ended(t: &Value) -> bool {
    matches!(
        t["state"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

/// Starts a migration capped at `mbit` (16 Mbit/s: a guest dirtying 16 MiB/s never converges)
/// with an optional deadline; returns its task id once pre-copy runs and the destination QEMU
/// exists.
fn start_migration(lab: &Lab, g: &Guest, to: &str, mbit: u32, deadline: Option<&str>) -> String {
    let mbit = mbit.to_string();
    let mut args = vec!["vm", "migrate", &g.name, "--to", to, "--bandwidth", &mbit];
    if let Some(d) = deadline {
        args.extend(["--deadline", d]);
    }
    args.push("--detach");
    let task = lab.tern_ok(&args).trim().to_string();
    let pidfile = lab.dir.join(format!("hosts/{to}/vms/{}/qemu.pid", g.id));
    wait_for("pre-copy to run", Duration::from_secs(60), || {
        let t: Value = lab.tern_json(&["task", "show", &task]);
        assert!(!task_ended(&t), "the migration ended early: {t}");
        (pidfile.exists() && t["phase"].as_str().unwrap_or("").starts_with("pre-copy"))
            .then_some(())
    });
    task
}

/// One unbroken stream from one boot: no reset, loss, duplicate or corruption.
fn assert_stream_intact(report: &Value, min_records: u64) {
    for k in ["resets", "missing", "duplicates", "corrupt", "boot_changes"] {
        assert_eq!(report[k], 0, "{k}: {report}");
    }
    assert!(
        report["records"].as_u64().unwrap_or(0) >= min_records,
        "{report}"
    );
}

fn u64_at(v: &Value, section: &str, key: &str) -> u64 {
    v[section][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {section}.{key} in {v}"))
}

/// The guest's stats with the verifier and journal clean, from boot `boot_id`.
fn clean_stats(lab: &Lab, g: &Guest, boot_id: &Value) -> Value {
    let s = lab.guest_stats(&g.addr);
    assert_eq!(&s["boot_id"], boot_id, "the guest rebooted: {s}");
    assert_eq!(s["mem"]["errors"], 0, "memory verifier: {s}");
    assert_eq!(s["disk"]["errors"], 0, "disk journal: {s}");
    assert_eq!(s["disk"]["full"], false, "disk journal: {s}");
    s
}

/// Waits until the verifier completed two more passes and the journal appended more records
/// than `before` shows; asserts both stayed clean.
fn verifier_and_journal_advance(lab: &Lab, g: &Guest, before: &Value) -> Value {
    let (passes, next_seq) = (
        u64_at(before, "mem", "passes"),
        u64_at(before, "disk", "next_seq"),
    );
    let s = wait_for(
        "two verifier passes and new journal records",
        Duration::from_secs(120),
        || {
            let s = clean_stats(lab, g, &before["boot_id"]);
            (u64_at(&s, "mem", "passes") >= passes + 2 && u64_at(&s, "disk", "next_seq") > next_seq)
                .then_some(s)
        },
    );
    // A fresh journal: every record was appended by this boot.
    assert_eq!(
        u64_at(&s, "disk", "appended"),
        u64_at(&s, "disk", "next_seq"),
        "{s}"
    );
    s
}

/// The guest's boot id as the journal stores it (16 bytes from the uuid's hex digits).
fn boot_id_bytes(id: &str) -> Vec<u8> {
    let hex: String = id.chars().filter(char::is_ascii_hexdigit).collect();
    assert_eq!(hex.len(), 32, "boot id {id}");
    (0..16)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

/// Reads the journal from the stopped VM's disk image on the host (converted to raw with
/// `qemu-img`): every record from 0 on is whole (magic, position, checksum) and of boot
/// `boot_id`, and the journal is unbroken up to its end. Returns the record count.
fn journal_on_disk(lab: &Lab, image: &Path, format: &str, boot_id: &str) -> u64 {
    let raw = lab.dir.join("journal-check.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", format, "-O", "raw"])
        .arg(image)
        .arg(&raw)
        .output()
        .expect("run qemu-img");
    assert!(out.status.success(), "qemu-img convert: {}", text(&out));
    let bytes = std::fs::read(&raw).expect("read the converted journal");
    let _ = std::fs::remove_file(&raw);
    journal_records(&bytes, Some(&boot_id_bytes(boot_id)))
}

/// The migration result of a finished `vm migrate` that must have completed `from` → `to`.
fn completed(out: &Output, task: Option<Value>, from: &str, to: &str) -> Value {
    assert!(out.status.success(), "{}", text(out));
    let task = task.expect("task JSON");
    let r = task["result"].clone();
    assert_eq!(r["status"], "completed", "{task}");
    assert_eq!(
        (r["from"].as_str(), r["to"].as_str()),
        (Some(from), Some(to))
    );
    r
}

/// Log file of a lab process (`h1`…), from lab.json.
fn agent_log(lab: &Lab, host: &str) -> PathBuf {
    lab.state["hosts"]
        .as_array()
        .and_then(|hs| hs.iter().find(|h| h["name"] == host))
        .and_then(|h| h["agent"]["log"].as_str())
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no log of {host} in lab.json"))
}

/// Lines of a host agent's log saying it ran VM `id` after a migration.
fn commits_logged(lab: &Lab, host: &str, id: &str) -> usize {
    std::fs::read_to_string(agent_log(lab, host))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("migration committed") && l.contains(id))
        .count()
}

/// Lines of a host agent's log saying it re-attached to a migration of VM `id` after a
/// restart.
fn reattached_logged(lab: &Lab, host: &str, id: &str) -> usize {
    std::fs::read_to_string(agent_log(lab, host))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("after a restart") && l.contains("re-attached") && l.contains(id))
        .count()
}

/// Prints the warnings and errors the hosts' agents logged (evidence for the lead; races
/// that a passing run survived still show here).
fn print_agent_warnings(lab: &Lab) {
    for host in ["h1", "h2"] {
        let log = std::fs::read_to_string(agent_log(lab, host)).unwrap_or_default();
        for l in log
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        {
            eprintln!("AGENT {host}: {l}");
        }
    }
}

/// Events of a task.
fn task_events(lab: &Lab, vm: &str, task: &str) -> Vec<String> {
    let events: Vec<Value> = lab.tern_json(&["event", "list", "--vm", vm]);
    events
        .iter()
        .filter(|e| e["task"].as_str() == Some(task))
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .collect()
}

/// While a faulty migration from `source` runs: the inventory keeps the VM on the source, the
/// source QEMU stays up, and no other QEMU of the VM exists but the destination's incoming one.
fn watch_until_ended(lab: &Lab, g: &Guest, task: &str, source: &str, limit: Duration) -> Value {
    let source_dir = format!("/hosts/{source}/vms/{}", g.id);
    wait_for(&format!("task {task} to end"), limit, || {
        let vm: Value = lab.tern_json(&["vm", "show", &g.name]);
        assert_eq!(vm["host"], source, "the inventory moved the VM: {vm}");
        let qemus = qemus_of(&g.id);
        assert!(
            qemus.iter().any(|(_, c)| c.contains(&source_dir)),
            "the source QEMU is gone: {qemus:#?}"
        );
        for (pid, cmd) in &qemus {
            assert!(
                cmd.contains(&source_dir) || cmd.contains("-incoming"),
                "QEMU {pid} of the VM is neither the source's nor an incoming one: {cmd}"
            );
        }
        let t: Value = lab.tern_json(&["task", "show", task]);
        task_ended(&t).then_some(t)
    })
}

/// A faulty migration ended as a rollback: the task failed, the VM runs on the source alone
/// and was never committed to the destination.
fn rolled_back(lab: &Lab, g: &Guest, task: &str, t: &Value, source: &str) {
    assert_eq!(t["state"], "failed", "{t}");
    assert_eq!(t["result"]["status"], "rolled_back", "{t}");
    lab.one_copy_on(&g.name, &g.id, source);
    let events = task_events(lab, &g.name, task);
    assert!(
        !events.iter().any(|e| e.contains("committed:")),
        "the task committed: {events:#?}"
    );
}

/// The report of a client run that must have outlasted what it watched (`started` ago), with
/// the stream unbroken.
fn stream_outlasted(client: StreamClient, started: Instant, what: &str) -> Value {
    assert!(
        !client.is_finished(),
        "the client run ended before {what} did ({:.1?})",
        started.elapsed()
    );
    let report = client.finish();
    eprintln!(
        "MEASURED {what}: client longest gap {} ms over {} records",
        report["longest_gap_ms"], report["records"]
    );
    assert_stream_intact(&report, 1000);
    report
}

#[test]
fn ten_moves_keep_memory_disk_and_stream_intact() {
    let lab = Lab::up("soak", 2);
    let _logs = KeepLogs::of(&lab);
    let g = create(&lab, "soak", "10.78.0.100", "52:54:00:7e:02:01", "qcow2");
    let boot_id = g.boot_id.clone();
    let mut last = clean_stats(&lab, &g, &boot_id);

    // One client run across all ten moves (2–4 s each here, checks included), lasting at least
    // 45 s; it must outlast them (asserted after the last move).
    let stream_ms = 45_000;
    let started = Instant::now();
    let client = lab.spawn_stream_client(&g.addr, stream_ms);
    let mut figures = Vec::new();
    for n in 1..=MOVES {
        let (from, to) = if n % 2 == 1 {
            ("h1", "h2")
        } else {
            ("h2", "h1")
        };
        let (out, task) = lab.migrate_json(&[&g.name, "--to", to]);
        let task_id = task
            .as_ref()
            .and_then(|t| t["id"].as_str())
            .unwrap_or_default()
            .to_string();
        let r = completed(&out, task, from, to);
        // PRODUCT BUG seen once in 15 moves (reported to the lead): the source agent could not
        // finish the migrated source, and the center's background convergence then ran the
        // rollback of a committed migration, deleting the only running copy. Named here so
        // the failure says what happened rather than timing out below.
        let events = task_events(&lab, &g.name, &task_id);
        assert!(
            !events
                .iter()
                .any(|e| e.contains("could not remove the migrated source")),
            "PRODUCT BUG: move {n}: the source of a committed migration was not removed: \
             {events:#?}"
        );
        let (total, downtime, pause) = (
            r["total_ms"].as_u64().unwrap_or(0),
            r["downtime_ms"].as_u64().unwrap_or(0),
            r["pause_ms"].as_u64().unwrap_or(0),
        );
        eprintln!(
            "MEASURED soak move {n} {from}→{to}: total {total} ms, QEMU downtime {downtime} ms, \
             guest pause {pause} ms, {} passes, {:.1} MiB",
            r["passes"],
            r["bytes"].as_u64().unwrap_or(0) as f64 / (1024.0 * 1024.0)
        );
        assert!(downtime > 0 && downtime < 2000, "move {n}: {r}");
        figures.push((total, downtime, pause));
        lab.one_copy_on(&g.name, &g.id, to);
        let vm: Value = lab.tern_json(&["vm", "show", &g.name]);
        assert_eq!(vm["generation"], u64::from(n) + 1, "{vm}");
        assert_eq!(vm["spec"]["nics"][0]["mac"], "52:54:00:7e:02:01");
        let s = clean_stats(&lab, &g, &boot_id);
        assert!(
            u64_at(&s, "disk", "next_seq") > u64_at(&last, "disk", "next_seq"),
            "the journal did not advance across move {n}: {last} → {s}"
        );
        assert!(
            u64_at(&s, "mem", "bytes_dirtied") > u64_at(&last, "mem", "bytes_dirtied"),
            "the verifier did not dirty across move {n}: {last} → {s}"
        );
        last = s;
    }
    let moves_done = started.elapsed();
    assert!(
        !client.is_finished(),
        "the client run ended before the tenth move did ({moves_done:.1?})"
    );
    // After the last move: the verifier checks every page twice more, the journal goes on.
    let end = verifier_and_journal_advance(&lab, &g, &last);
    let report = client.finish();
    let totals: Vec<u64> = figures.iter().map(|f| f.0).collect();
    let downtimes: Vec<u64> = figures.iter().map(|f| f.1).collect();
    let pauses: Vec<u64> = figures.iter().map(|f| f.2).collect();
    eprintln!(
        "MEASURED soak {MOVES} moves in {moves_done:.1?}: total ms {totals:?}, QEMU downtime ms \
         {downtimes:?}, guest pause ms {pauses:?}; client over {} ms: longest gap {} ms, \
         longest guest-clock gap {} ms, longest echo RTT {} ms, {} records; verifier {} passes, \
         journal {} records",
        report["duration_ms"],
        report["longest_gap_ms"],
        report["longest_guest_gap_ms"],
        report["longest_echo_rtt_ms"],
        report["records"],
        end["mem"]["passes"],
        end["disk"]["next_seq"]
    );
    assert_stream_intact(&report, 1000);
    let vm: Value = lab.tern_json(&["vm", "show", &g.name]);
    assert_eq!(vm["host"], "h1", "{vm}");
    lab.one_copy_on(&g.name, &g.id, "h1");

    // The journal on the image itself: stop the VM (the guest stops appending before it powers
    // off) and read every record on the host.
    print_agent_warnings(&lab);
    let before_stop = clean_stats(&lab, &g, &boot_id);
    lab.tern_ok(&["vm", "stop", &g.name]);
    wait_for("the QEMU to end", Duration::from_secs(60), || {
        qemus_of(&g.id).is_empty().then_some(())
    });
    let boot = boot_id.as_str().expect("boot id");
    let records = journal_on_disk(&lab, &g.disk, &g.format, boot);
    let seen = u64_at(&before_stop, "disk", "next_seq");
    assert!(
        records >= seen && records <= seen + 200,
        "{records} records on disk; the guest had appended {seen} shortly before it stopped"
    );
    eprintln!("MEASURED soak journal: {records} records intact on the image after {MOVES} moves");
    lab.down();
}

#[test]
fn destination_faults_leave_one_copy_on_the_source() {
    let mut lab = Lab::up("fault", 2);
    let _logs = KeepLogs::of(&lab);
    let g = create(&lab, "fault", "10.78.0.101", "52:54:00:7e:02:02", "raw");
    let boot_id = g.boot_id.clone();

    // a. The destination agent is killed during pre-copy and started again: the migration
    // rolls back, the destination QEMU it left is removed, the guest never runs on h2.
    let commits_before = commits_logged(&lab, "h2", &g.id);
    let before = clean_stats(&lab, &g, &boot_id);
    let client = lab.spawn_stream_client(&g.addr, 60_000);
    let started = Instant::now();
    let task = start_migration(&lab, &g, "h2", 16, Some("15s"));
    let dest_pid: u32 =
        std::fs::read_to_string(lab.dir.join(format!("hosts/h2/vms/{}/qemu.pid", g.id)))
            .expect("destination pidfile")
            .trim()
            .parse()
            .expect("pid");
    let agent = lab.pid("h2");
    let out = lab.lab_cmd(&["lab", "stop", "h2", "--kill"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !common::alive(agent),
        "the h2 agent {agent} survived SIGKILL"
    );
    // QEMU outlives its agent; pre-copy goes on without it: the source reports new progress
    // while h2's agent is down.
    let phase_at_kill = lab.tern_json::<Value>(&["task", "show", &task])["phase"].clone();
    wait_for(
        "pre-copy to progress without h2's agent",
        Duration::from_secs(30),
        || {
            let t: Value = lab.tern_json(&["task", "show", &task]);
            assert!(
                !task_ended(&t),
                "the migration ended while h2's agent was down: {t}"
            );
            let phase = t["phase"].as_str().unwrap_or("");
            (phase.starts_with("pre-copy") && t["phase"] != phase_at_kill).then_some(())
        },
    );
    assert!(
        common::alive(dest_pid),
        "the destination QEMU died with its agent"
    );
    let out = lab.lab_cmd(&["lab", "start", "h2"]);
    assert!(out.status.success(), "{}", text(&out));
    let t = watch_until_ended(&lab, &g, &task, "h1", Duration::from_secs(120));
    eprintln!(
        "MEASURED fault a (destination agent killed in pre-copy): task ended {} after {:.1?}: {}",
        t["state"],
        started.elapsed(),
        t["error"]
    );
    rolled_back(&lab, &g, &task, &t, "h1");
    common::wait_gone(dest_pid, "the destination QEMU", Duration::from_secs(30));
    assert_eq!(
        commits_logged(&lab, "h2", &g.id),
        commits_before,
        "h2's agent ran the guest"
    );
    stream_outlasted(client, started, "fault a's rollback");
    let after_a = verifier_and_journal_advance(&lab, &g, &before);

    // b. The destination's management/migration link is cut during pre-copy until the
    // deadline: the task fails naming it, the VM runs on the source; once the link is back
    // the destination's leftover is removed and a migration succeeds.
    let client = lab.spawn_stream_client(&g.addr, 100_000);
    let started = Instant::now();
    let task = start_migration(&lab, &g, "h2", 16, Some("15s"));
    let out = lab.lab_cmd(&["lab", "link", "cut", "h2"]);
    assert!(out.status.success(), "{}", text(&out));
    let t = watch_until_ended(&lab, &g, &task, "h1", Duration::from_secs(120));
    let out = lab.lab_cmd(&["lab", "link", "restore", "h2"]);
    assert!(out.status.success(), "{}", text(&out));
    eprintln!(
        "MEASURED fault b (h2 link cut in pre-copy): task ended {} after {:.1?}: {}",
        t["state"],
        started.elapsed(),
        t["error"]
    );
    let error = t["error"].as_str().unwrap_or("");
    assert!(
        error.contains("deadline") || error.contains("stall"),
        "the error names neither the deadline nor a stall: {t}"
    );
    rolled_back(&lab, &g, &task, &t, "h1");
    clean_stats(&lab, &g, &boot_id);
    // The cut outlasted the heartbeat timeout: h2 comes back once it heartbeats again.
    wait_for("h2 to reconnect", Duration::from_secs(60), || {
        let h: Value = lab.tern_json(&["host", "show", "h2"]);
        (h["state"] == "connected").then_some(())
    });
    let (out, task) = lab.migrate_json(&[&g.name, "--to", "h2"]);
    // The source's cancel has ended (QEMU's cancel leaves multifd senders blocked on the
    // silent link: tern yanks the migration's sockets), so the VM can move again at once.
    let r = completed(&out, task, "h1", "h2");
    eprintln!(
        "MEASURED fault b, then h1→h2 with the link back: total {} ms, QEMU downtime {} ms, \
         guest pause {} ms",
        r["total_ms"], r["downtime_ms"], r["pause_ms"]
    );
    lab.one_copy_on(&g.name, &g.id, "h2");
    stream_outlasted(client, started, "fault b and the migration after it");
    verifier_and_journal_advance(&lab, &g, &after_a);
    print_agent_warnings(&lab);
    lab.down();
}

/// Restarts during pre-copy (issue 18): QEMU goes on migrating while its agent is away, the
/// restarted agent re-attaches to the migration from its record, a restarted center drives it
/// on from its store and the source's word, and the migration completes — with the
/// destination's agent killed and restarted (h1 → h2), the source's stopped gracefully and
/// restarted (h2 → h1), then the center killed and restarted (h1 → h2). Each time exactly one copy runs, where the inventory says, with the guest's
/// memory, journal and stream intact, and the task says how it carried on.
#[test]
fn restarts_during_precopy_do_not_stop_the_migration() {
    let mut lab = Lab::up("restart", 2);
    let _logs = KeepLogs::of(&lab);
    // 4 MiB/s dirtied under an 80 Mbit/s cap: the migration converges whether or not a spare
    // core lets it compress, after a first pass of several seconds (64 MiB of verifier pages
    // and the guest's own), many times what a restart takes.
    let g = create_dirtying(&lab, "rs", "10.78.0.102", "52:54:00:7e:02:03", "raw", 4);
    let before = clean_stats(&lab, &g, &g.boot_id);
    let client = lab.spawn_stream_client(&g.addr, 30_000);
    let started = Instant::now();
    // (from, to, who restarts, how): SIGKILL, or a graceful stop (SIGTERM), after which the
    // agent must have let its migration go on rather than abort it.
    for (from, to, restarted, how) in [
        ("h1", "h2", "h2", "--kill"),
        ("h2", "h1", "h2", "--graceful"),
        ("h1", "h2", "center", "--kill"),
    ] {
        let role = if restarted == "center" {
            "center"
        } else if restarted == to {
            "destination"
        } else {
            "source"
        };
        let reattached_before =
            (role != "center").then(|| reattached_logged(&lab, restarted, &g.id));
        let task = start_migration(&lab, &g, to, 80, None);
        let agent = lab.pid(restarted);
        let restart_started = Instant::now();
        let mut args = vec!["lab", "restart", restarted];
        if how == "--kill" {
            args.push("--kill");
        }
        let out = lab.lab_cmd(&args);
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            !common::alive(agent),
            "the {restarted} process {agent} survived its restart"
        );
        eprintln!(
            "MEASURED the {role}'s restart ({how}) took {:.1?}",
            restart_started.elapsed()
        );
        // The premise: the restart happened inside pre-copy. If the migration had reached
        // its switchover meanwhile, this test would not be testing what it says.
        let t: Value = lab.tern_json(&["task", "show", &task]);
        assert!(
            !task_ended(&t) && t["phase"].as_str().unwrap_or("").starts_with("pre-copy"),
            "the {role}'s restart outlasted pre-copy (lower the cap?): {t}"
        );
        let t = wait_for(
            &format!("task {task} to end"),
            Duration::from_secs(150),
            || {
                let t: Value = lab.tern_json(&["task", "show", &task]);
                task_ended(&t).then_some(t)
            },
        );
        let events = task_events(&lab, &g.name, &task);
        eprintln!(
            "MEASURED {role} ({restarted}) restarted in pre-copy, {from}→{to}: task {} \
             after {:.1?}: {} {}\n{events:#?}",
            t["state"],
            started.elapsed(),
            t["result"]["status"],
            t["error"]
        );
        assert_eq!(t["state"], "succeeded", "{t}\n{events:#?}");
        lab.one_copy_on(&g.name, &g.id, to);
        // The restarted agent took the migration over from its record (and did not merely
        // fall back on a commit it could still carry out without it).
        if let Some(before) = reattached_before {
            assert_eq!(
                reattached_logged(&lab, restarted, &g.id),
                before + 1,
                "the {role} agent did not re-attach to the migration"
            );
        }
        if role == "center" {
            assert!(
                events.iter().any(|e| e.contains("driven on from there")),
                "the task does not say the restarted center drove it on: {events:#?}"
            );
        }
        if role == "source" {
            assert!(
                events
                    .iter()
                    .any(|e| e.contains("re-attached after the agent restarted")),
                "the task does not say the source's agent re-attached: {events:#?}"
            );
        }
        if role == "destination" {
            assert!(
                events
                    .iter()
                    .any(|e| e.contains(&format!("destination {to}: re-attached"))),
                "the task does not say the destination's agent re-attached: {events:#?}"
            );
        }
        // Both sides forgot the migration once it ended: a later restart re-attaches to nothing.
        for host in [from, to] {
            let record = lab
                .dir
                .join(format!("hosts/{host}/vms/{}/migration.json", g.id));
            assert!(!record.exists(), "{} is left behind", record.display());
        }
    }
    stream_outlasted(client, started, "three restarts and their migrations");
    verifier_and_journal_advance(&lab, &g, &before);
    print_agent_warnings(&lab);
    lab.down();
}
