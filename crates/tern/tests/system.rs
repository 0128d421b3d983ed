//! The whole product in the lab: real center, real agents, real QEMU (TCG) and the real test
//! guest. One lab serves every check here (a lab costs seconds, a guest boot more):
//! bad input is refused and changes nothing; a VM boots with what it asked for, serves the
//! client namespace and keeps its disk journal across a stop/start; the inventory survives a
//! center crash; a restarted agent re-adopts its running VM.

mod common;

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use common::{alive, kv, raw_http, text, wait_for, Lab};
use serde_json::{json, Value};

const READY: &str = "TERN-GUEST-READY";
const VM_IP: &str = "10.78.0.100";
const VM_ADDR: &str = "10.78.0.100:7000";
const VM_MAC: &str = "52:54:00:7e:00:01";
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// What must not change when a request is refused.
fn inventory(lab: &Lab) -> Value {
    let vms: Vec<Value> = lab.tern_json(&["vm", "list"]);
    let clusters: Vec<Value> = lab.tern_json(&["cluster", "list"]);
    let hosts: Vec<Value> = lab.tern_json(&["host", "list"]);
    json!({
        "vms": vms.iter().map(|v| json!({
            "id": v["id"], "spec": v["spec"], "cluster": v["cluster"], "host": v["host"],
            "desired_state": v["desired_state"], "generation": v["generation"],
        })).collect::<Vec<_>>(),
        "clusters": clusters.iter().map(|c| json!({
            "id": c["id"], "name": c["name"], "evc_mode": c["evc_mode"], "hosts": c["hosts"],
        })).collect::<Vec<_>>(),
        "hosts": hosts.iter().map(|h| json!({
            "id": h["id"], "name": h["name"], "cluster": h["cluster"], "vms": h["vms"],
        })).collect::<Vec<_>>(),
    })
}

/// `tern vm create` arguments for a guest of the lab's image.
fn create_args(lab: &Lab, name: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "vm",
        "create",
        name,
        "--cluster",
        "lab",
        "--vcpus",
        "1",
        "--memory-mib",
        "256",
        "--kernel",
        &lab.guest_kernel(),
        "--initrd",
        &lab.guest_initrd(),
        "--cmdline",
        "console=ttyS0 ipv6.disable=1 tern.ip=10.78.0.101/24 tern.serve=7000",
    ]
    .map(String::from)
    .to_vec();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Runs a command that must be refused with one of `codes`, and a message on stderr.
fn refused(lab: &Lab, what: &str, args: &[String], codes: &[i32], needle: &str) {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lab.tern(&a);
    assert!(
        codes.contains(&code(&out)),
        "{what}: want exit {codes:?}:\n{}",
        text(&out)
    );
    let err = stderr(&out);
    assert!(
        err.starts_with("error: ") && err.len() > 10 && err.contains(needle),
        "{what}: unclear message (want `{needle}`):\n{err}"
    );
}

fn bad_input(lab: &Lab) {
    let before = inventory(lab);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();

    // Through the CLI.
    let mut a = create_args(lab, "x1", &["--no-nic"]);
    a[4] = "nope".into();
    refused(lab, "unknown cluster", &a, &[3, 4], "nope");
    refused(
        lab,
        "unknown host",
        &create_args(lab, "x1", &["--host", "h9", "--no-nic"]),
        &[3, 4],
        "h9",
    );
    refused(
        lab,
        "duplicate name",
        &create_args(lab, "vm1", &["--no-nic"]),
        &[4],
        "vm1",
    );
    refused(
        lab,
        "duplicate MAC",
        &create_args(lab, "x1", &["--mac", VM_MAC]),
        &[4],
        VM_MAC,
    );
    let mut a = create_args(lab, "x1", &["--no-nic"]);
    a[8] = "0".into();
    refused(lab, "0 MiB", &a, &[4], "memory");
    a[8] = (1u64 << 40).to_string();
    refused(lab, "absurd memory", &a, &[4], "");
    let mut a = create_args(lab, "x1", &["--no-nic"]);
    a[6] = "0".into();
    refused(lab, "0 vcpus", &a, &[4], "vcpu");
    let missing = lab
        .shared()
        .join("guest/no-such-kernel")
        .display()
        .to_string();
    let mut a = create_args(lab, "x1", &["--no-nic"]);
    a[10] = missing.clone();
    refused(lab, "missing kernel", &a, &[4], &missing);
    refused(
        lab,
        "bad name",
        &create_args(lab, "Bad_Name", &["--no-nic"]),
        &[4],
        "Bad_Name",
    );
    refused(
        lab,
        "bad MAC syntax",
        &create_args(lab, "x1", &["--mac", "01:00:5e:00:00:01"]),
        &[2],
        "MAC",
    );
    refused(
        lab,
        "show unknown vm",
        &s(&["vm", "show", "nope"]),
        &[3],
        "nope",
    );
    refused(
        lab,
        "start unknown vm",
        &s(&["vm", "start", "nope"]),
        &[3],
        "nope",
    );
    refused(
        lab,
        "delete unknown vm",
        &s(&["vm", "delete", "nope"]),
        &[3],
        "nope",
    );
    refused(
        lab,
        "show unknown host",
        &s(&["host", "show", "h9"]),
        &[3],
        "h9",
    );
    refused(
        lab,
        "unknown task",
        &s(&["task", "show", "00000000-0000-4000-8000-000000000000"]),
        &[3],
        "",
    );
    refused(
        lab,
        "duplicate cluster",
        &s(&["cluster", "create", "lab"]),
        &[4],
        "lab",
    );
    refused(
        lab,
        "wrong token",
        &s(&["vm", "list", "--token", "wrong"]),
        &[4],
        "401",
    );
    refused(
        lab,
        "no center",
        &s(&["vm", "list", "--center", "unix:/nonexistent/center.sock"]),
        &[5],
        "cannot reach",
    );

    // Straight to the REST API: what the CLI cannot send.
    let sock = lab.socket();
    let token = lab.token();
    let error_of = |body: &str| -> String {
        serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_default()
    };
    let (st, body) = raw_http(
        &sock,
        "POST",
        "/api/v1/vms",
        Some(&token),
        Some("{\"spec\": {"),
    );
    assert!((400..500).contains(&st), "malformed JSON: {st} {body}");
    assert!(
        !error_of(&body).is_empty(),
        "malformed JSON: no error message: {body}"
    );
    let (st, body) = raw_http(
        &sock,
        "POST",
        "/api/v1/clusters",
        Some(&token),
        Some("{\"name\": 5}"),
    );
    assert!((400..500).contains(&st), "wrong JSON type: {st} {body}");
    assert!(
        !error_of(&body).is_empty(),
        "wrong JSON type: no error message: {body}"
    );
    let (st, body) = raw_http(&sock, "GET", "/api/v1/vms", None, None);
    assert_eq!(st, 401, "no token: {body}");
    assert!(
        !error_of(&body).is_empty(),
        "no token: no error message: {body}"
    );
    let (st, body) = raw_http(
        &sock,
        "POST",
        "/api/v1/clusters",
        None,
        Some("{\"name\": \"sneaky\"}"),
    );
    assert_eq!(st, 401, "create without token: {body}");
    let (st, _) = raw_http(&sock, "GET", "/openapi.json", None, None);
    assert_eq!(st, 200, "the OpenAPI document needs no token");

    assert_eq!(
        inventory(lab),
        before,
        "a refused request changed the inventory"
    );
}

fn vm_json(lab: &Lab) -> Value {
    lab.tern_json(&["vm", "show", "vm1"])
}

/// The guest's stats once its serve port answers for a boot other than `not_boot`.
fn stats_of_boot(lab: &Lab, not_boot: Option<&str>) -> Value {
    wait_for("the guest's stats", BOOT_TIMEOUT, || {
        let (_, json) = lab.guest_client(&["--addr", VM_ADDR, "--stats"]);
        json.filter(|s| not_boot.is_none_or(|b| s["boot_id"].as_str() != Some(b)))
    })
}

fn stream_ok(lab: &Lab, what: &str) {
    let r = lab.stream_report(VM_ADDR, 2000);
    assert!(
        r["records"].as_u64().unwrap_or(0) > 0,
        "{what}: no records: {r}"
    );
    assert_eq!(r["missing"], 0, "{what}: {r}");
    assert_eq!(r["duplicates"], 0, "{what}: {r}");
    assert_eq!(r["resets"], 0, "{what}: {r}");
}

fn qemu_pid(lab: &Lab, vm_id: &str) -> u32 {
    let path: PathBuf = lab.dir.join(format!("hosts/h1/vms/{vm_id}/qemu.pid"));
    let raw = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    raw.trim().parse().expect("pid in qemu.pid")
}

#[test]
fn vm_lifecycle_restarts_and_bad_input_in_the_lab() {
    let started = std::time::Instant::now();
    let mut lab = Lab::up("s", 2);

    // A raw journal disk on shared storage.
    let disk = lab.shared().join("vm1.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .expect("create disk");
    let disk_s = disk.display().to_string();
    let cmdline = format!(
        "console=ttyS0 ipv6.disable=1 tern.ip={VM_IP}/24 tern.serve=7000 tern.disk=/dev/vda"
    );
    let (kernel, initrd) = (lab.guest_kernel(), lab.guest_initrd());
    lab.tern_ok(&[
        "vm",
        "create",
        "vm1",
        "--cluster",
        "lab",
        "--host",
        "h1",
        "--vcpus",
        "2",
        "--memory-mib",
        "256",
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--cmdline",
        &cmdline,
        "--disk",
        &disk_s,
        "--mac",
        VM_MAC,
    ]);
    let vm = vm_json(&lab);
    assert_eq!(vm["host"], "h1");
    assert_eq!(vm["actual_state"], "stopped");
    let vm_id = vm["id"].as_str().expect("vm id").to_string();

    // (d) Bad input: clear refusals, nothing changed.
    bad_input(&lab);

    // (b) Boot: the guest gets what it asked for and serves the client namespace.
    let out = lab.tern_ok(&["vm", "start", "vm1"]);
    assert!(out.contains("running"), "{out}");
    let ready = lab.wait_console("vm1", READY, BOOT_TIMEOUT);
    assert_eq!(kv(&ready, "cpus").as_deref(), Some("2"), "{ready}");
    let mem: u64 = kv(&ready, "mem_mib")
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no mem_mib in {ready}"));
    assert!(
        (200..=256).contains(&mem),
        "guest sees {mem} MiB of 256: {ready}"
    );
    assert_eq!(kv(&ready, "ip").as_deref(), Some(VM_IP), "{ready}");
    stream_ok(&lab, "first boot");

    // The journal survives a stop/start.
    let s1 = wait_for("journal records", BOOT_TIMEOUT, || {
        let s = stats_of_boot(&lab, None);
        (s["disk"]["appended"].as_u64().unwrap_or(0) >= 10).then_some(s)
    });
    assert_eq!(s1["disk"]["errors"], 0, "{s1}");
    let out = lab.tern_ok(&["vm", "stop", "vm1"]);
    assert!(out.contains("stopped"), "{out}");
    assert_eq!(vm_json(&lab)["actual_state"], "stopped");
    lab.tern_ok(&["vm", "start", "vm1"]);
    // A new boot answers (the console log may or may not keep the previous boot's lines).
    let s2 = stats_of_boot(&lab, s1["boot_id"].as_str());
    let on_disk =
        s1["disk"]["verified"].as_u64().unwrap_or(0) + s1["disk"]["appended"].as_u64().unwrap_or(0);
    let verified = s2["disk"]["verified"].as_u64().unwrap_or(0);
    assert!(
        verified >= on_disk,
        "journal lost records over stop/start: {verified} verified < {on_disk} written\n{s1}\n{s2}"
    );
    assert_eq!(s2["disk"]["errors"], 0, "{s2}");

    // (c) The center crashes and comes back: the inventory is intact, hosts reconnect.
    let inv = inventory(&lab);
    let out = lab.lab_cmd(&["lab", "restart", "center", "--kill"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        inventory(&lab),
        inv,
        "the center lost inventory in a restart"
    );
    lab.wait_hosts_connected("hosts connected after a center restart");
    assert_eq!(vm_json(&lab)["actual_state"], "running");

    // The agent restarts: it re-adopts the same QEMU, which keeps serving.
    let qemu = qemu_pid(&lab, &vm_id);
    assert!(alive(qemu), "QEMU {qemu} is not running");
    // QEMU is no root: a uid of the agent's range, no capability, under its seccomp filter.
    let status = std::fs::read_to_string(format!("/proc/{qemu}/status")).expect("QEMU status");
    let field = |name: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    let uid: u32 = field("Uid:").parse().expect("QEMU uid");
    assert!(uid > 400_000_000, "QEMU runs as uid {uid}");
    assert_eq!(field("CapEff:"), "0000000000000000");
    assert_eq!(field("Seccomp:"), "2");
    let agent = lab.pid("h1");
    let out = lab.lab_cmd(&["lab", "restart", "h1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_ne!(lab.pid("h1"), agent, "the agent was not restarted");
    assert!(alive(qemu), "restarting the agent killed QEMU");
    assert_eq!(
        qemu_pid(&lab, &vm_id),
        qemu,
        "QEMU changed across an agent restart"
    );
    wait_for(
        "vm1 running after the agent restart",
        Duration::from_secs(30),
        || (vm_json(&lab)["actual_state"] == "running").then_some(()),
    );
    stream_ok(&lab, "after the agent restart");

    // Named tokens through the CLI: a viewer reads but cannot stop the VM (refused, exit 4);
    // once revoked it cannot read either; the event log names who did what.
    let viewer = lab
        .tern_ok(&["token", "create", "vera", "--role", "viewer"])
        .trim()
        .to_string();
    assert!(viewer.starts_with("tern_"), "{viewer}");
    let as_viewer = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend_from_slice(&["--token", &viewer]);
        lab.tern(&a)
    };
    let out = as_viewer(&["vm", "show", "vm1"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = as_viewer(&["vm", "stop", "vm1", "--force"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("needs operator"), "{}", text(&out));
    assert_eq!(vm_json(&lab)["actual_state"], "running");
    lab.tern_ok(&["token", "revoke", "vera"]);
    let out = as_viewer(&["vm", "show", "vm1"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let events: Vec<Value> = lab.tern_json(&["event", "list", "--vm", "vm1"]);
    assert!(
        events
            .iter()
            .any(|e| e["actor"] == "vera" && e["message"].as_str().unwrap_or("").contains("403")),
        "no refused stop by vera in {events:#?}"
    );
    // A host name cannot be removed while it holds a VM.
    let out = lab.tern(&["host", "remove", "h1"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("still has VMs"), "{}", text(&out));

    // The re-adopted VM is still under control: it stops, and goes.
    lab.tern_ok(&["vm", "stop", "vm1", "--force"]);
    assert_eq!(vm_json(&lab)["actual_state"], "stopped");
    wait_for("QEMU to exit", Duration::from_secs(10), || {
        (!alive(qemu)).then_some(())
    });
    lab.tern_ok(&["vm", "delete", "vm1"]);
    let vms: Vec<Value> = lab.tern_json(&["vm", "list"]);
    assert!(vms.is_empty(), "{vms:?}");
    let events = lab.tern_ok(&["event", "list", "--vm", "vm1"]);
    assert!(events.lines().count() > 1, "no events about vm1:\n{events}");

    lab.down();
    eprintln!("system test took {:.1?}", started.elapsed());
}
