//! tern-cpu against the installed QEMU: the catalogue equals QEMU's expansions, the TCG `max`
//! capability predicts exactly which models QEMU starts with `enforce`, and a booted guest sees
//! the features its record says.
//!
//! Each test prints "skipped" and passes when qemu-system-x86_64 (or, for the boot test, a
//! kernel and busybox) is not installed. `TERN_QEMU` overrides the QEMU binary.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tern_cpu::cpuinfo::{compare_guest, flag_for_feature, parse_cpuinfo};
use tern_cpu::{catalogue, parse_expansion, Accel, HostCapability, Source};

const QMP_TIMEOUT: Duration = Duration::from_secs(30);

fn qemu_bin() -> Option<String> {
    let bin = std::env::var("TERN_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let ok = Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok.then_some(bin)
}

macro_rules! require_qemu {
    () => {
        match qemu_bin() {
            Some(q) => q,
            None => {
                eprintln!("skipped: qemu-system-x86_64 not found");
                return;
            }
        }
    };
}

/// A QEMU process driven over QMP on its stdio.
struct Qemu {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Qemu {
    /// Starts QEMU with `args` plus `-qmp stdio`, and negotiates capabilities. Errors with
    /// QEMU's stderr when it exits before answering.
    fn start(bin: &str, args: &[&str]) -> Result<Qemu, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let stderr = dir.path().join("stderr");
        let err_file = std::fs::File::create(&stderr).map_err(|e| e.to_string())?;
        let mut child = Command::new(bin)
            .args(args)
            .args(["-qmp", "stdio"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err_file)
            .spawn()
            .map_err(|e| format!("spawn {bin}: {e}"))?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut q = Qemu {
            child,
            stdin,
            lines,
            stderr,
            _dir: dir,
        };
        q.read_reply()?; // greeting
        q.cmd("qmp_capabilities", None)?;
        Ok(q)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn read_reply(&mut self) -> Result<Value, String> {
        let deadline = Instant::now() + QMP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let v: Value = serde_json::from_str(&line)
                        .map_err(|e| format!("bad QMP line {line:?}: {e}"))?;
                    if v.get("event").is_none() {
                        return Ok(v);
                    }
                }
                Err(RecvTimeoutError::Timeout) => return Err("QMP timed out".into()),
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.child.wait();
                    return Err(format!("QEMU exited: {}", self.stderr().trim()));
                }
            }
        }
    }

    fn cmd(&mut self, name: &str, args: Option<Value>) -> Result<Value, String> {
        let mut req = json!({ "execute": name });
        if let Some(a) = args {
            req["arguments"] = a;
        }
        writeln!(self.stdin, "{req}").map_err(|e| format!("write QMP: {e}"))?;
        let reply = self.read_reply()?;
        match reply.get("return") {
            Some(r) => Ok(r.clone()),
            None => Err(format!("{name}: {reply}")),
        }
    }

    fn expand(&mut self, kind: &str, model: &str) -> Result<Value, String> {
        self.cmd(
            "query-cpu-model-expansion",
            Some(json!({"type": kind, "model": {"name": model}})),
        )
    }

    fn quit(mut self) {
        let _ = self.cmd("quit", None);
        let _ = self.child.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn info_qemu(bin: &str) -> Qemu {
    Qemu::start(
        bin,
        &[
            "-machine",
            "none",
            "-accel",
            "tcg",
            "-nodefaults",
            "-nographic",
        ],
    )
    .expect("start QEMU for queries")
}

use tern_testkit::cpio::Cpio;
use tern_testkit::repo_root;

#[test]
fn catalogue_matches_qemu() {
    let bin = require_qemu!();

    // 1. The generator, run again, writes exactly the checked-in file.
    match Command::new("python3")
        .arg(repo_root().join("scripts/gen-cpu-models.py"))
        .args(["--qemu", &bin, "--out", "-"])
        .output()
    {
        Err(e) => eprintln!("skipped the generator comparison: python3: {e}"),
        Ok(out) => {
            assert!(
                out.status.success(),
                "generator failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let fresh = String::from_utf8(out.stdout).expect("generator output is UTF-8");
            let fresh_data = tern_cpu::data::parse(&fresh).expect("generator output parses");
            let embedded = tern_cpu::data::qemu_data();
            assert_eq!(
                fresh_data.qemu_version, embedded.qemu_version,
                "installed QEMU differs from the one the data came from; run \
                 scripts/gen-cpu-models.py"
            );
            assert!(
                fresh == tern_cpu::data::QEMU_MODELS_JSON,
                "data/qemu-cpu-models.json is stale; run scripts/gen-cpu-models.py and review \
                 the diff"
            );
        }
    }

    // 2. Independently of the script: each catalogue model's expansion, parsed by this crate,
    // is the catalogue's set, and names the versioned model the catalogue puts on -cpu.
    let mut q = info_qemu(&bin);
    let defs = q
        .cmd("query-cpu-definitions", None)
        .expect("cpu definitions");
    let alias_of = |name: &str| -> Option<String> {
        defs.as_array()?
            .iter()
            .find(|d| d["name"] == name)
            .map(|d| d["alias-of"].as_str().unwrap_or(name).to_string())
    };
    let cat = catalogue();
    for b in cat.all() {
        if b.source == Source::PsAbi {
            // QEMU has no model of that name: the level is built on qemu64.
            assert!(
                alias_of(&b.name).is_none(),
                "QEMU has {} now: regenerate",
                b.name
            );
            let base =
                parse_expansion(&q.expand("static", &b.qemu_model).unwrap().to_string()).unwrap();
            assert_eq!(&base.features, b.base_features(), "{}", b.qemu_model);
            continue;
        }
        assert_eq!(alias_of(&b.name).as_deref(), Some(b.qemu_model.as_str()));
        for kind in ["static", "full"] {
            let exp = q.expand(kind, &b.name).unwrap();
            let parsed = parse_expansion(&exp.to_string()).unwrap();
            assert_eq!(
                parsed.features,
                b.features,
                "{} ({kind}): QEMU has {:?} more, {:?} fewer",
                b.name,
                parsed.features.missing_in(&b.features),
                b.features.missing_in(&parsed.features)
            );
            assert_eq!(parsed.vendor, b.vendor, "{}", b.name);
            assert!(
                parsed.unknown_bools.is_empty(),
                "{:?}",
                parsed.unknown_bools
            );
        }
        if b.line == tern_cpu::Line::X86_64 {
            let psabi = tern_cpu::catalogue::psabi_features(&b.name).unwrap();
            assert!(
                psabi.is_subset(&b.features),
                "{} lacks psABI features",
                b.name
            );
        }
    }
    q.quit();
}

/// Whether QEMU starts (paused, -S) with `-cpu arg` under TCG: `Ok` when it answers
/// `query-status`, `Err(stderr)` when it refuses.
fn starts_under_tcg(bin: &str, cpu: &str) -> Result<(), String> {
    let mut q = Qemu::start(
        bin,
        &[
            "-accel",
            "tcg",
            "-machine",
            "q35",
            "-cpu",
            cpu,
            "-m",
            "128",
            "-nodefaults",
            "-display",
            "none",
            "-S",
        ],
    )?;
    let status = q.cmd("query-status", None)?;
    assert_eq!(status["status"], "prelaunch", "{status}");
    q.quit();
    Ok(())
}

#[test]
fn tcg_max_predicts_enforce() {
    let bin = require_qemu!();
    let mut q = info_qemu(&bin);
    let max = q.expand("full", "max").expect("expand max");
    q.quit();
    let exp = parse_expansion(&max.to_string()).expect("parse max");
    let cap = HostCapability::from_expansion(&exp, Accel::Tcg, None).expect("capability");
    eprintln!(
        "TCG max: vendor {:?}, {} features, avx2: {}",
        exp.vendor,
        cap.features.len(),
        cap.features.contains("avx2")
    );
    assert!(
        cap.features.contains("avx2"),
        "TCG max offers avx2 since QEMU 7.2"
    );

    let mut table = Vec::new();
    for b in catalogue().all() {
        let predicted = cap.check("tcg", b);
        let started = starts_under_tcg(&bin, &b.qemu_cpu_arg());
        table.push(format!(
            "{:<20} {:<6} {}",
            b.name,
            if started.is_ok() { "starts" } else { "fails" },
            match &predicted {
                Ok(()) => String::new(),
                Err(e) => e.to_string(),
            }
        ));
        assert_eq!(
            predicted.is_ok(),
            started.is_ok(),
            "{}: predicted {:?}, QEMU said {:?}",
            b.name,
            predicted,
            started
        );
    }
    eprintln!("{}", table.join("\n"));
    // The models tests rely on for avx2 under TCG.
    assert!(cap.supports(catalogue().get("x86-64-v3").unwrap()));
    let passthrough =
        tern_cpu::vm::resolve(&tern_cpu::CpuRequest::HostPassthrough, None, "tcg", &cap).unwrap();
    assert_eq!(passthrough.qemu_cpu, "max");
    starts_under_tcg(&bin, &passthrough.qemu_cpu).expect("max starts");
}

/// A minimal newc initramfs: busybox, an /init that prints /proc/cpuinfo between markers and
/// powers off, and /dev/console.
fn initramfs(busybox: &Path) -> Vec<u8> {
    let init = "#!/bin/busybox sh\n\
        /bin/busybox mount -t proc proc /proc\n\
        echo TERN-CPUINFO-BEGIN\n\
        /bin/busybox cat /proc/cpuinfo\n\
        echo TERN-CPUINFO-END\n\
        /bin/busybox poweroff -f\n";
    let bb = std::fs::read(busybox).expect("read busybox");
    Cpio::new()
        .dir("bin")
        .file("bin/busybox", 0o755, &bb)
        .file("init", 0o755, init.as_bytes())
        .dir("proc")
        .dir("dev")
        .char_dev("dev/console", 5, 1)
        .finish()
}

/// The guest kernel (the project's image's, else the host's cloud kernel).
fn find_kernel() -> Option<PathBuf> {
    tern_testkit::paths::guest_kernel()
}

/// Boots the guest with `-cpu arg` under TCG and returns its /proc/cpuinfo.
fn guest_cpuinfo(bin: &str, kernel: &Path, initrd: &Path, cpu: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.log");
    let mut child = Command::new(bin)
        .args(["-accel", "tcg", "-machine", "q35", "-cpu", cpu, "-m", "256"])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start guest");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let text = std::fs::read_to_string(&serial).unwrap_or_default();
            let start = text.find("TERN-CPUINFO-BEGIN");
            let end = text.find("TERN-CPUINFO-END");
            match (start, end) {
                (Some(s), Some(e)) if s < e => return text[s..e].to_string(),
                _ => panic!("guest with -cpu {cpu} exited ({status}) without cpuinfo:\n{text}"),
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("guest with -cpu {cpu} did not power off within 120 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn guest_sees_its_recorded_cpu() {
    let bin = require_qemu!();
    let (Some(kernel), Ok(busybox)) = (find_kernel(), which_busybox()) else {
        eprintln!("skipped: no /boot/vmlinuz-* or static busybox");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd.cpio");
    std::fs::write(&initrd, initramfs(&busybox)).unwrap();

    // (cpu, expected features, guest vendor, a flag that must show, whether every expected
    // feature must show: Linux 6.1 does not print features newer than itself, which `max` has).
    let cat = catalogue();
    let mut q = info_qemu(&bin);
    let max = parse_expansion(&q.expand("full", "max").unwrap().to_string()).unwrap();
    q.quit();
    let max_cap = HostCapability::from_expansion(&max, Accel::Tcg, None).unwrap();
    let cases = [
        (
            "x86-64-v3",
            cat.get("x86-64-v3").unwrap().qemu_cpu_arg(),
            cat.get("x86-64-v3").unwrap().features.clone(),
            "AuthenticAMD",
            "avx2",
            true,
        ),
        (
            "Westmere",
            cat.get("Westmere").unwrap().qemu_cpu_arg(),
            cat.get("Westmere").unwrap().features.clone(),
            "GenuineIntel",
            "aes",
            true,
        ),
        (
            "max",
            "max".to_string(),
            max_cap.features.clone(),
            "AuthenticAMD",
            "avx2",
            false,
        ),
    ];
    for (model, cpu, expected, vendor, must_have, all_shown) in cases {
        let text = guest_cpuinfo(&bin, &kernel, &initrd, &cpu);
        let info = parse_cpuinfo(&text).expect("cpuinfo has flags");
        let check = compare_guest(&expected, &info);
        eprintln!(
            "{model}: guest vendor {:?}; unexpected {:?}; implied by Linux {:?}; absent {:?}; \
             unmapped {:?}",
            info.vendor_id, check.unexpected, check.implied_by_linux, check.absent, info.unmapped
        );
        // Under TCG the guest sees the model's own vendor (qemu64 is AMD's for the levels).
        assert_eq!(info.vendor_id.as_deref(), Some(vendor), "{model}");
        assert!(
            check.unexpected.is_empty(),
            "{model}: guest sees features outside its record: {:?}",
            check.unexpected
        );
        if all_shown {
            assert!(
                check.absent.is_empty(),
                "{model}: guest lacks recorded features: {:?}",
                check.absent
            );
        }
        let flag = flag_for_feature(must_have).unwrap();
        assert!(
            info.raw.contains(&flag),
            "{model}: no {flag} in /proc/cpuinfo"
        );
    }
}

fn which_busybox() -> Result<PathBuf, ()> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or(())
}
