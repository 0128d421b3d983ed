//! Lifecycle of real QEMU processes under TCG: launch, state, pause/resume, stats, shutdown,
//! kill, crash detection, adopt, and launch errors.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tern_api::BootSource;
use tern_qemu::{Error, ExitReason, QemuVm, RunState};

const BOOT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_pause_resume_stats_kill() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "life", "");
    cfg.spec.vcpus = 2;
    let _guard = KillGuard(cfg.run_dir.clone());
    let vm = QemuVm::launch(cfg.clone()).await.unwrap();
    assert!(vm.pid() > 0);
    assert_eq!(vm.qmp().greeting().version.major, 10);
    assert_eq!(vm.status().await.unwrap(), RunState::Running);

    // Confined: under a seccomp filter (mode 2), with no way to gain privileges, in a session
    // of its own (not this process's), and no daemonizing fork left behind a launcher.
    let field = |name: &str| proc_status(vm.pid(), name);
    assert_eq!(field("Seccomp:"), "2");
    assert_eq!(field("NoNewPrivs:"), "1");
    let qemu_sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(vm.pid() as i32))).unwrap();
    assert_eq!(
        qemu_sid.as_raw(),
        vm.pid() as i32,
        "QEMU leads its own session"
    );
    assert_ne!(qemu_sid, nix::unistd::getsid(None).unwrap());
    assert_eq!(
        std::fs::read_to_string(&vm.paths().pidfile).unwrap().trim(),
        vm.pid().to_string()
    );

    // The guest really runs: its init prints ticks.
    wait_tick(&cfg.run_dir, 1, BOOT).await;

    let mut events = vm.qmp().events();
    vm.pause().await.unwrap();
    assert_eq!(vm.status().await.unwrap(), RunState::Paused);
    tern_qemu::wait_event(&mut events, "STOP", Duration::from_secs(10))
        .await
        .unwrap();
    vm.resume().await.unwrap();
    assert_eq!(vm.status().await.unwrap(), RunState::Running);
    tern_qemu::wait_event(&mut events, "RESUME", Duration::from_secs(10))
        .await
        .unwrap();

    let stats = vm.stats().unwrap();
    assert!(stats.cpu_time_ms > 0, "{stats:?}");
    assert!(stats.rss_mib > 0, "{stats:?}");
    assert_eq!(stats.vcpu_threads, 2, "{stats:?}");
    assert!(stats.threads > stats.vcpu_threads, "{stats:?}");

    assert!(vm.exit_reason().is_none());
    let reason = vm.kill().await.unwrap();
    assert_eq!(reason, ExitReason::Killed);
    assert_eq!(vm.wait_exit().await, ExitReason::Killed);
    assert!(matches!(vm.status().await, Err(Error::QmpClosed)));
    assert!(vm.stats().is_err());
    QemuVm::cleanup(&cfg.run_dir).unwrap();
    assert!(!vm.paths().qmp_socket.exists());
    assert!(!vm.paths().pidfile.exists());
    assert!(vm.paths().console_log.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_poweroff_is_a_clean_shutdown() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "poweroff", "test.poweroff");
    let _guard = KillGuard(cfg.run_dir.clone());
    let vm = QemuVm::launch(cfg).await.unwrap();
    let reason = tokio::time::timeout(BOOT, vm.wait_exit())
        .await
        .expect("guest did not power off");
    assert_eq!(
        reason,
        ExitReason::Shutdown {
            guest: true,
            reason: "guest-shutdown".into()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_falls_back_to_quit_when_the_guest_ignores_acpi() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "stubborn", "");
    let _guard = KillGuard(cfg.run_dir.clone());
    let vm = QemuVm::launch(cfg.clone()).await.unwrap();
    // The test init has no ACPI handler: the power button does nothing.
    wait_tick(&cfg.run_dir, 0, BOOT).await;
    let t0 = Instant::now();
    let reason = vm.shutdown(Duration::from_secs(2)).await.unwrap();
    assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(
        reason,
        ExitReason::Shutdown {
            guest: false,
            reason: "host-qmp-quit".into()
        }
    );
    // Idempotent once exited.
    assert_eq!(vm.shutdown(Duration::from_secs(1)).await.unwrap(), reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_sigkill_is_a_crash() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "crash", "");
    let _guard = KillGuard(cfg.run_dir.clone());
    let vm = QemuVm::launch(cfg).await.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vm.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(10), vm.wait_exit())
        .await
        .expect("exit not detected");
    match &reason {
        ExitReason::Crashed { reason } => {
            assert!(reason.contains(&vm.pid().to_string()), "{reason}");
            assert!(reason.contains("without a SHUTDOWN"), "{reason}");
        }
        other => panic!("expected a crash, got {other:?}"),
    }
    assert!(!reason.is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_as_the_unprivileged_user_it_is_given() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "user", "");
    // The test's own directory stays 0700 root: QEMU needs no right above its run dir.
    let (uid, group) = (400_000_123u32, 400_000_000u32);
    cfg.run_as = Some(tern_qemu::RunAs {
        uid,
        gid: uid,
        groups: vec![group],
    });
    let _guard = KillGuard(cfg.run_dir.clone());
    let vm = QemuVm::launch(cfg.clone()).await.unwrap();
    wait_tick(&cfg.run_dir, 1, BOOT).await;
    assert_eq!(vm.status().await.unwrap(), RunState::Running);

    let field = |name: &str| proc_status(vm.pid(), name);
    assert_eq!(field("Uid:"), format!("{uid} {uid} {uid} {uid}"));
    assert_eq!(field("Gid:"), format!("{uid} {uid} {uid} {uid}"));
    assert_eq!(field("Groups:"), group.to_string());
    assert_eq!(field("CapEff:"), "0000000000000000");
    assert_eq!(field("Seccomp:"), "2");
    // What QEMU made in its run dir is its user's.
    use std::os::unix::fs::MetadataExt;
    for f in [
        &vm.paths().qmp_socket,
        &vm.paths().console_log,
        &vm.paths().pidfile,
    ] {
        assert_eq!(std::fs::metadata(f).unwrap().uid(), uid, "{}", f.display());
    }
    // Adopted again by its pidfile (named relative to its run dir).
    let pid = vm.pid();
    drop(vm);
    let again = QemuVm::adopt(&cfg.run_dir).await.unwrap();
    assert_eq!(again.pid(), pid);
    again.kill().await.unwrap();
    QemuVm::cleanup(&cfg.run_dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopt_after_dropping_the_handle() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "adopt", "");
    let _guard = KillGuard(cfg.run_dir.clone());
    let vm = QemuVm::launch(cfg.clone()).await.unwrap();
    let pid = vm.pid();
    wait_tick(&cfg.run_dir, 1, BOOT).await;

    // A second launch from the same run dir is refused while the first runs.
    match QemuVm::launch(cfg.clone()).await {
        Err(Error::AlreadyRunning { pid: p, .. }) => assert_eq!(p, pid),
        other => panic!("expected AlreadyRunning, got {other:?}"),
    }
    assert!(matches!(
        QemuVm::cleanup(&cfg.run_dir),
        Err(Error::AlreadyRunning { .. })
    ));

    drop(vm);
    let vm = QemuVm::adopt(&cfg.run_dir).await.unwrap();
    assert_eq!(vm.pid(), pid);
    assert_eq!(vm.status().await.unwrap(), RunState::Running);
    // The guest was not disturbed: its ticks go on.
    let before = last_tick(&console(&cfg.run_dir)).unwrap();
    wait_tick(&cfg.run_dir, before + 2, Duration::from_secs(30)).await;

    // Adopting twice in a row works too (the previous connection is closed on drop).
    drop(vm);
    let vm = QemuVm::adopt(&cfg.run_dir).await.unwrap();
    assert_eq!(vm.kill().await.unwrap(), ExitReason::Killed);

    match QemuVm::adopt(&cfg.run_dir).await {
        Err(Error::NotRunning { detail, .. }) => assert!(detail.contains("gone"), "{detail}"),
        other => panic!("expected NotRunning, got {other:?}"),
    }
    QemuVm::cleanup(&cfg.run_dir).unwrap();
    match QemuVm::adopt(&cfg.run_dir).await {
        Err(Error::NotRunning { detail, .. }) => assert!(detail.contains("pidfile"), "{detail}"),
        other => panic!("expected NotRunning, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_paused_until_resumed() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "paused", "");
    cfg.start_paused = true;
    let _guard = KillGuard(cfg.run_dir.clone());
    let vm = QemuVm::launch(cfg.clone()).await.unwrap();
    assert_eq!(vm.status().await.unwrap(), RunState::Prelaunch);
    vm.resume().await.unwrap();
    vm.wait_status(|s| *s == RunState::Running, Duration::from_secs(10))
        .await
        .unwrap();
    wait_tick(&cfg.run_dir, 0, BOOT).await;
    vm.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_errors_name_the_problem() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();

    // Missing kernel: named before QEMU runs.
    let mut cfg = config(dir.path(), "nokernel", "");
    let missing = dir.path().join("no-such-vmlinuz");
    cfg.spec.boot = BootSource::Kernel {
        kernel: missing.to_string_lossy().into_owned(),
        initrd: None,
        cmdline: String::new(),
    };
    let err = QemuVm::launch(cfg).await.unwrap_err();
    assert!(
        matches!(err, Error::MissingFile { what: "kernel", .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("no-such-vmlinuz"), "{err}");

    // A CPU model TCG cannot provide: refused by `enforce`, QEMU's words quoted.
    let mut cfg = config(dir.path(), "badcpu", "");
    cfg.spec.cpu_model = Some("Haswell".into());
    let _guard = KillGuard(cfg.run_dir.clone());
    let err = QemuVm::launch(cfg).await.unwrap_err();
    match &err {
        Error::Launch { stderr_tail, .. } => {
            assert!(
                stderr_tail.contains("doesn't support requested feature"),
                "{stderr_tail}"
            )
        }
        other => panic!("expected a launch error, got {other:?}"),
    }

    // An unknown CPU model.
    let mut cfg = config(dir.path(), "nocpu", "");
    cfg.spec.cpu_model = Some("nosuchcpu".into());
    let _guard2 = KillGuard(cfg.run_dir.clone());
    let err = QemuVm::launch(cfg).await.unwrap_err();
    assert!(err.to_string().contains("nosuchcpu"), "{err}");

    // A missing QEMU binary.
    let mut cfg = config(dir.path(), "noqemu", "");
    cfg.qemu_binary = dir.path().join("qemu-nope");
    let err = QemuVm::launch(cfg).await.unwrap_err();
    assert!(err.to_string().contains("qemu-nope"), "{err}");

    // Inconsistent config: a NIC without a tap.
    let mut cfg = config(dir.path(), "notap", "");
    cfg.spec.nics.push(tern_api::NicSpec {
        mac: "52:54:00:00:00:09".into(),
    });
    assert!(matches!(
        QemuVm::launch(cfg).await.unwrap_err(),
        Error::Config(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_reports_models_and_host_features() {
    init_tracing();
    let probe = tern_qemu::probe_cpu(
        std::path::Path::new("qemu-system-x86_64"),
        tern_api::Accelerator::Tcg,
    )
    .await
    .unwrap();
    assert_eq!(probe.qemu_version.major, 10);
    assert_eq!(probe.host_model, "max");
    assert_eq!(probe.host_features.get("sse2"), Some(&true));
    let model = |name: &str| {
        probe
            .models
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("{name} not listed"))
    };
    assert!(model("qemu64").runnable());
    assert!(model("qemu64").migration_safe);
    // TCG cannot give Haswell's TSX and PCID: the same reason `enforce` refuses it.
    assert!(!model("Haswell").runnable());
    assert!(model("Haswell")
        .unavailable_features
        .contains(&"pcid".to_string()));

    let err = tern_qemu::probe_cpu(
        std::path::Path::new("/nonexistent/qemu"),
        tern_api::Accelerator::Tcg,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/qemu"), "{err}");
}

#[test]
fn handles_are_shareable_across_tasks() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<QemuVm>();
    assert_send_sync::<tern_qemu::Qmp>();
}

/// The project's guest image (guest/build.sh) powers off on the ACPI power button: a
/// shutdown is then the guest's own. Skipped, with a notice, until the image is built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_guest_powers_off_on_the_power_button() {
    init_tracing();
    let Some((kernel, initrd)) = guest_image() else {
        eprintln!("NOTICE: target/guest/initramfs.img missing (run guest/build.sh): skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), "realguest", "");
    cfg.spec.memory_mib = 256;
    cfg.spec.boot = BootSource::Kernel {
        kernel: kernel.to_string_lossy().into_owned(),
        initrd: Some(initrd.to_string_lossy().into_owned()),
        cmdline: "console=ttyS0 quiet ipv6.disable=1 tern.mem=16".into(),
    };
    let _guard = KillGuard(cfg.run_dir.clone());
    let vm = QemuVm::launch(cfg.clone()).await.unwrap();
    // The whole line: the serial console file can be read while the guest is still writing it.
    let ready = wait_for("TERN-GUEST-READY", BOOT, || {
        let text = console(&cfg.run_dir);
        assert!(!text.contains("TERN-GUEST-ERROR"), "{text}");
        text.split_inclusive('\n')
            .find(|l| l.starts_with("TERN-GUEST-READY") && l.ends_with('\n'))
            .map(str::to_string)
    })
    .await;
    assert!(ready.contains("cpus=1"), "{ready}");
    let reason = vm.shutdown(Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        reason,
        ExitReason::Shutdown {
            guest: true,
            reason: "guest-shutdown".into()
        },
        "console: {}",
        console(&cfg.run_dir)
    );
    assert!(console(&cfg.run_dir).contains("TERN-GUEST-POWEROFF"));
}
