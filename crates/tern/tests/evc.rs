//! EVC in the lab: real center, agents, QEMU (TCG) and guests. Lab hosts share one physical
//! CPU, so h2 runs under `--cpu-ceiling Westmere` to stand for an older machine.
//!
//! One lab serves every check: host capabilities and `evc-modes` follow the weakest host;
//! a mode h2 lacks is refused naming its features; guests see exactly their model's features
//! in /proc/cpuinfo (x86-64-v2: no AVX; x86-64-v3: AVX2); `can-migrate` names what a
//! destination lacks; raising the mode leaves running VMs as they are until a power cycle,
//! lowering it under them is refused naming VM and features; a host whose ceiling falls below
//! the mode is refused when it registers, with the features named. When `tern vm migrate`
//! exists, a VM whose CPU the destination lacks is refused before anything moves, and one that
//! fits keeps its /proc/cpuinfo across the move.

mod common;

use std::process::Output;
use std::time::Duration;

use common::{text, wait_for, Lab};
use serde_json::Value;
use tern_cpu::cpuinfo::{compare_guest, parse_cpuinfo, CpuinfoFlags};
use tern_cpu::FeatureSet;

const READY: &str = "TERN-GUEST-READY";
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Creates a VM of the lab's guest image on `host` serving on `ip`.
fn create(lab: &Lab, name: &str, host: &str, ip: &str, model: Option<&str>) {
    let cmdline = format!("console=ttyS0 ipv6.disable=1 tern.ip={ip}/24 tern.serve=7000");
    let (kernel, initrd) = (lab.guest_kernel(), lab.guest_initrd());
    let mut args = vec![
        "vm",
        "create",
        name,
        "--cluster",
        "lab",
        "--host",
        host,
        "--vcpus",
        "1",
        "--memory-mib",
        "256",
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--cmdline",
        &cmdline,
    ];
    if let Some(m) = model {
        args.extend(["--cpu-model", m]);
    }
    lab.tern_ok(&args);
}

/// The guest's /proc/cpuinfo, read through its serve port from the client namespace.
fn guest_cpuinfo(lab: &Lab, ip: &str) -> CpuinfoFlags {
    let exe = common::guest_dir().join("tern-guest").display().to_string();
    let addr = format!("{ip}:7000");
    let o = lab.client(&[&exe, "client", "--addr", &addr, "--cpuinfo"]);
    assert!(
        o.status.success(),
        "tern-guest client --cpuinfo:\n{}",
        text(&o)
    );
    parse_cpuinfo(&out(&o))
        .unwrap_or_else(|| panic!("no flags in the guest's cpuinfo:\n{}", out(&o)))
}

/// The CPU record of a VM (`tern vm show -o json`).
fn vm_cpu(lab: &Lab, name: &str) -> Value {
    let vm: Value = lab.tern_json(&["vm", "show", name]);
    assert!(vm["cpu"].is_object(), "VM {name} has no CPU record: {vm}");
    vm["cpu"].clone()
}

/// Checks that a guest shows no feature beyond its recorded CPU and returns its flags.
fn check_guest_matches_record(lab: &Lab, vm: &str, ip: &str) -> CpuinfoFlags {
    let info = guest_cpuinfo(lab, ip);
    let record = FeatureSet::from_names(strs(&vm_cpu(lab, vm)["features"]));
    let cmp = compare_guest(&record, &info);
    assert!(
        cmp.unexpected.is_empty(),
        "VM {vm} sees features its record lacks: {:?} (flags: {:?})",
        cmp.unexpected,
        info.raw
    );
    info
}

fn has_flag(info: &CpuinfoFlags, flag: &str) -> bool {
    info.raw.contains(flag)
}

/// A command the center must refuse (exit 4) with all of `needles` in the message.
fn refused(lab: &Lab, args: &[&str], needles: &[&str]) -> String {
    let o = lab.tern(args);
    let e = err(&o);
    assert_eq!(
        code(&o),
        4,
        "tern {args:?} should be refused:\n{}",
        text(&o)
    );
    for n in needles {
        assert!(e.contains(n), "tern {args:?}: `{n}` not in:\n{e}");
    }
    e
}

fn set_evc(lab: &Lab, mode: &str) -> Value {
    lab.tern_json(&["cluster", "set-evc", "lab", mode])
}

fn cluster_mode(lab: &Lab) -> Option<String> {
    let c: Value = lab.tern_json(&["cluster", "show", "lab"]);
    c["evc_mode"].as_str().map(str::to_string)
}

#[test]
fn evc_end_to_end() {
    let mut lab = Lab::up_with("evc", 2, &["--cpu-ceiling", "h2=Westmere"]);

    // Host capabilities: h1 is QEMU's TCG `max`, h2 stops at Westmere.
    let h1: Value = lab.tern_json(&["host", "show", "h1"]);
    let h2: Value = lab.tern_json(&["host", "show", "h2"]);
    let h1_modes = strs(&h1["facts"]["cpu"]["supported_baselines"]);
    let h2_modes = strs(&h2["facts"]["cpu"]["supported_baselines"]);
    assert!(h1_modes.iter().any(|m| m == "x86-64-v3"), "{h1_modes:?}");
    assert!(!h2_modes.iter().any(|m| m == "x86-64-v3"), "{h2_modes:?}");
    assert_eq!(h2["facts"]["cpu"]["best_baseline"], "Westmere");
    assert_eq!(h2["facts"]["cpu_ceiling"], "Westmere");
    let shown = lab.tern_ok(&["host", "show", "h2"]);
    assert!(
        shown.contains("cpu_baselines") && shown.contains("Westmere"),
        "{shown}"
    );

    // evc-modes follows the weakest host.
    let modes: Value = lab.tern_json(&["cluster", "evc-modes", "lab"]);
    assert_eq!(modes["best"], "Westmere", "{modes}");
    let common = strs(&modes["modes"]);
    assert!(common.iter().all(|m| h2_modes.contains(m)), "{modes}");
    assert!(!common.iter().any(|m| m == "x86-64-v3"), "{modes}");

    // Cluster modes are catalogue baselines, stored in their canonical spelling.
    refused(
        &lab,
        &["cluster", "create", "c1", "--evc", "Pentium9"],
        &["Pentium9", "known models", "Westmere"],
    );
    let c: Value = lab.tern_json(&["cluster", "create", "c2", "--evc", "westmere"]);
    assert_eq!(c["evc_mode"], "Westmere", "{c}");

    // A mode h2 lacks is refused, naming h2 and the features; nothing changes.
    refused(
        &lab,
        &["cluster", "set-evc", "lab", "x86-64-v3"],
        &["host h2", "avx2", "fma"],
    );
    assert_eq!(cluster_mode(&lab), None);

    // Guests see exactly their model: x86-64-v2 has no AVX, x86-64-v3 has AVX2.
    create(&lab, "v2", "h1", "10.78.0.100", Some("x86-64-v2"));
    create(&lab, "v3", "h1", "10.78.0.101", Some("x86-64-v3"));
    lab.tern_ok(&["vm", "start", "v2"]);
    lab.tern_ok(&["vm", "start", "v3"]);
    let cpu = vm_cpu(&lab, "v3");
    assert_eq!(cpu["model"], "x86-64-v3");
    assert_eq!(cpu["powered_on"], true);
    assert!(
        cpu["qemu_cpu"].as_str().unwrap_or("").ends_with(",enforce"),
        "{cpu}"
    );
    lab.wait_console("v2", READY, BOOT_TIMEOUT);
    lab.wait_console("v3", READY, BOOT_TIMEOUT);
    let v2_info = check_guest_matches_record(&lab, "v2", "10.78.0.100");
    assert!(
        !has_flag(&v2_info, "avx") && !has_flag(&v2_info, "avx2"),
        "x86-64-v2 guest shows AVX: {:?}",
        v2_info.raw
    );
    assert!(has_flag(&v2_info, "sse4_2"), "{:?}", v2_info.raw);
    let v3_info = check_guest_matches_record(&lab, "v3", "10.78.0.101");
    assert!(
        has_flag(&v3_info, "avx2") && has_flag(&v3_info, "fma"),
        "x86-64-v3 guest lacks AVX2: {:?}",
        v3_info.raw
    );

    // Dry runs: v3 needs what h2 lacks (named, before anything moves); v2 fits.
    let o = lab.tern(&["vm", "can-migrate", "v3", "--to", "h2"]);
    assert_eq!(code(&o), 4, "{}", text(&o));
    let report = out(&o);
    let cpu_line = report
        .lines()
        .find(|l| l.contains(" cpu "))
        .unwrap_or_else(|| panic!("no cpu line:\n{report}"));
    assert!(
        cpu_line.starts_with('✗') && cpu_line.contains("avx2") && cpu_line.contains("host h2"),
        "{report}"
    );
    for check in ["state", "host", "vcpus", "memory", "storage"] {
        assert!(
            report
                .lines()
                .any(|l| l.starts_with('✓') && l.contains(&format!(" {check} "))),
            "{check} should pass:\n{report}"
        );
    }
    let o = lab.tern(&["vm", "can-migrate", "v2", "--to", "h2"]);
    assert!(o.status.success(), "{}", text(&o));
    // state, host, vcpus, memory, storage, cpu, encryption, resources, rules.
    assert_eq!(out(&o).matches('✓').count(), 9, "{}", out(&o));
    let o = lab.tern(&["vm", "can-migrate", "v2", "--to", "h1"]);
    assert_eq!(code(&o), 4, "same host: {}", text(&o));

    // Live migration, once the product has it: refused for v3 before any memory moves; v2
    // moves and its guest sees the same CPU on h2.
    let o = lab.tern(&["vm", "migrate", "v3", "--to", "h2"]);
    if code(&o) == 2 && err(&o).contains("unrecognized subcommand") {
        eprintln!("tern vm migrate does not exist yet: migration checks skipped");
    } else {
        assert_ne!(code(&o), 0, "v3 must not migrate to h2:\n{}", text(&o));
        assert!(err(&o).contains("avx2"), "{}", text(&o));
        let v3: Value = lab.tern_json(&["vm", "show", "v3"]);
        assert_eq!(v3["host"], "h1");
        assert_eq!(v3["actual_state"], "running");
        let o = lab.tern(&["vm", "migrate", "v2", "--to", "h2"]);
        assert!(o.status.success(), "migrate v2:\n{}", text(&o));
        let v2: Value = lab.tern_json(&["vm", "show", "v2"]);
        assert_eq!(v2["host"], "h2");
        let after = guest_cpuinfo(&lab, "10.78.0.100");
        assert_eq!(
            after.raw, v2_info.raw,
            "v2's CPU changed across the migration"
        );
        assert_eq!(after.vendor_id, v2_info.vendor_id);
    }

    // Maintenance of h1: v3's CPU fits nowhere else, so the scheduler keeps it there and the
    // blocker names what h2's CPU lacks; h1 goes back to service and v3 never stopped.
    let o = lab.tern(&["host", "maintenance", "enter", "h1"]);
    assert!(!o.status.success(), "{}", text(&o));
    let why = text(&o);
    assert!(
        why.contains("v3 on h1 cannot move")
            && why.contains("h2: its CPU lacks")
            && why.contains("avx2"),
        "{why}"
    );
    eprintln!("maintenance of h1 blocked: {why}");
    lab.tern_ok(&["host", "maintenance", "exit", "h1"]);
    let v3: Value = lab.tern_json(&["vm", "show", "v3"]);
    assert_eq!(
        (v3["host"].as_str(), v3["actual_state"].as_str()),
        (Some("h1"), Some("running"))
    );

    // Setting a mode is refused while a running VM uses features above it (v3: AVX2).
    refused(
        &lab,
        &["cluster", "set-evc", "lab", "x86-64-v2"],
        &["VM v3 uses", "avx2"],
    );
    assert_eq!(cluster_mode(&lab), None);
    lab.tern_ok(&["vm", "stop", "v3", "--force"]);
    let ch = set_evc(&lab, "x86-64-v2");
    assert_eq!(ch["kind"], "set", "{ch}");
    assert_eq!(cluster_mode(&lab).as_deref(), Some("x86-64-v2"));
    // Now a named model above the mode is refused at creation, naming the features.
    let (kernel, initrd) = (lab.guest_kernel(), lab.guest_initrd());
    refused(
        &lab,
        &[
            "vm",
            "create",
            "hi",
            "--cluster",
            "lab",
            "--vcpus",
            "1",
            "--memory-mib",
            "64",
            "--kernel",
            &kernel,
            "--initrd",
            &initrd,
            "--no-nic",
            "--cpu-model",
            "x86-64-v3",
        ],
        &["x86-64-v3", "avx2"],
    );

    // w follows the mode. Raising the mode leaves it as it started until a power cycle.
    create(&lab, "w", "h1", "10.78.0.102", None);
    lab.tern_ok(&["vm", "start", "w"]);
    assert_eq!(vm_cpu(&lab, "w")["model"], "x86-64-v2");
    assert_eq!(vm_cpu(&lab, "w")["source"], "cluster_mode");
    let raised = lab.tern_ok(&["cluster", "set-evc", "lab", "Westmere"]);
    assert!(
        raised.contains("x86-64-v2 → Westmere (raise)")
            && raised.contains("running VMs w keep")
            && raised.contains("powered off and on"),
        "{raised}"
    );
    assert_eq!(
        vm_cpu(&lab, "w")["model"],
        "x86-64-v2",
        "a running VM keeps its CPU until a power cycle"
    );
    let again = set_evc(&lab, "Westmere");
    assert_eq!(again["kind"], "unchanged", "{again}");
    lab.tern_ok(&["vm", "stop", "w", "--force"]);
    lab.tern_ok(&["vm", "start", "w"]);
    assert_eq!(vm_cpu(&lab, "w")["model"], "Westmere");

    // Lowering under w (now Westmere: AES) is refused naming the VM and the features.
    refused(
        &lab,
        &["cluster", "set-evc", "lab", "x86-64-v2"],
        &["VM w uses", "aes", "pclmulqdq"],
    );
    assert_eq!(cluster_mode(&lab).as_deref(), Some("Westmere"));
    // Raising above h2 is refused naming it.
    refused(
        &lab,
        &["cluster", "set-evc", "lab", "SandyBridge"],
        &["host h2", "avx"],
    );

    // A host whose ceiling falls below the mode is refused when it registers.
    let o = lab.lab_cmd(&[
        "lab",
        "restart",
        "h2",
        "--cpu-ceiling",
        "x86-64-v2",
        "--no-wait",
    ]);
    assert!(o.status.success(), "lab restart h2:\n{}", text(&o));
    let refusal = wait_for("h2's refusal event", Duration::from_secs(30), || {
        let evs: Vec<Value> = lab.tern_json(&["event", "list", "--host", "h2"]);
        evs.iter()
            .filter_map(|e| e["message"].as_str())
            .find(|m| m.contains("cannot join"))
            .map(str::to_string)
    });
    for needle in ["host h2", "Westmere", "aes", "pclmulqdq"] {
        assert!(refusal.contains(needle), "`{needle}` not in: {refusal}");
    }
    // The agent logs the center's answer.
    let log = lab.dir.join("logs/h2.log");
    wait_for("the refusal in h2's log", Duration::from_secs(10), || {
        let t = std::fs::read_to_string(&log).unwrap_or_default();
        (t.contains("cannot join") && t.contains("aes")).then_some(())
    });
    // Back under Westmere, h2 joins again.
    let o = lab.lab_cmd(&["lab", "restart", "h2", "--cpu-ceiling", "Westmere"]);
    assert!(o.status.success(), "lab restart h2:\n{}", text(&o));
    let _ = lab.pid("h2");
    lab.down();
}
