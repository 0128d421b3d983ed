//! Live migration between two local QEMU processes over loopback TCP (TCG guests).

mod common;

use std::time::{Duration, Instant};

use common::*;
use tern_qemu::{
    AnnounceParams, CpuExpansion, DirtyRateStatus, ExitReason, MigrationStats, MigrationStatus,
    QemuVm, RunState,
};

const BOOT: Duration = Duration::from_secs(90);

/// Polls the source until the migration ends; returns the final stats.
async fn wait_migration(src: &QemuVm, timeout: Duration) -> MigrationStats {
    let deadline = Instant::now() + timeout;
    loop {
        let stats = src.query_migrate().await.unwrap();
        if stats.status.is_finished() {
            return stats;
        }
        assert!(Instant::now() < deadline, "migration still {:?}", stats);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Makes `dst` listen on a free loopback port; returns its URI.
async fn listen(dst: &QemuVm) -> String {
    dst.migrate_incoming("tcp:127.0.0.1:0").await.unwrap();
    let stats = dst.query_migrate().await.unwrap();
    let uri = stats
        .socket_addresses
        .first()
        .cloned()
        .unwrap_or_else(|| panic!("no listen address in {stats:?}"));
    assert!(
        uri.starts_with("tcp:127.0.0.1:") && !uri.ends_with(":0"),
        "{uri}"
    );
    uri
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_running_guest_over_loopback() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let src_cfg = config(dir.path(), "src", "");
    let dst_cfg = destination(&src_cfg, dir.path(), "dst", false);
    let _g1 = KillGuard(src_cfg.run_dir.clone());
    let _g2 = KillGuard(dst_cfg.run_dir.clone());

    let src = QemuVm::launch(src_cfg.clone()).await.unwrap();
    wait_tick(&src_cfg.run_dir, 2, BOOT).await;
    let dst = QemuVm::launch(dst_cfg.clone()).await.unwrap();
    assert_eq!(dst.status().await.unwrap(), RunState::InMigrate);

    // Dirty rate of the idle guest: measured, small.
    let rate = src
        .measure_dirty_rate(std::time::Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(rate.status, DirtyRateStatus::Measured);
    assert!(rate.dirty_rate_mib_per_s.is_some(), "{rate:?}");

    for vm in [&src, &dst] {
        vm.set_migration_capabilities(&[("events", true)])
            .await
            .unwrap();
        vm.set_migration_parameters(serde_json::json!({"downtime-limit": 300}))
            .await
            .unwrap();
    }
    let caps = src.migration_capabilities().await.unwrap();
    assert!(caps.contains(&("events".to_string(), true)), "{caps:?}");
    assert_eq!(
        src.migration_parameters().await.unwrap()["downtime-limit"],
        300
    );

    let uri = listen(&dst).await;
    let mut src_events = src.qmp().events();
    let tick_before = last_tick(&console(&src_cfg.run_dir)).unwrap();
    src.migrate(&uri).await.unwrap();
    let stats = wait_migration(&src, Duration::from_secs(120)).await;
    assert_eq!(stats.status, MigrationStatus::Completed, "{stats:?}");
    assert!(stats.total_bytes >= 150 * 1024 * 1024, "{stats:?}");
    assert!(stats.transferred_bytes > 0, "{stats:?}");
    assert!(stats.downtime_ms.is_some(), "{stats:?}");
    assert!(stats.total_time_ms.is_some(), "{stats:?}");
    assert!(stats.dirty_sync_count >= 1, "{stats:?}");

    // The MIGRATION events (capability `events`) reported the way to completion.
    let mut statuses = Vec::new();
    while let Ok(ev) = src_events.try_recv() {
        if ev.name == "MIGRATION" {
            statuses.push(ev.data["status"].as_str().unwrap_or_default().to_string());
        }
    }
    assert!(statuses.contains(&"completed".to_string()), "{statuses:?}");

    assert_eq!(src.status().await.unwrap(), RunState::PostMigrate);
    dst.wait_status(|s| *s == RunState::Running, Duration::from_secs(30))
        .await
        .unwrap();
    let dst_stats = dst.query_migrate().await.unwrap();
    assert_eq!(dst_stats.status, MigrationStatus::Completed);

    // The guest goes on where it was: ticks on the destination's console continue the
    // source's count (a fresh boot would start again at 0).
    let first = wait_for("ticks on the destination", Duration::from_secs(30), || {
        last_tick(&console(&dst_cfg.run_dir))
    })
    .await;
    assert!(
        first >= tick_before,
        "dst tick {first} < src tick {tick_before}"
    );
    assert!(!console(&dst_cfg.run_dir).contains("TERN-TEST-READY"));
    wait_tick(&dst_cfg.run_dir, first + 1, Duration::from_secs(30)).await;

    // After switchover the destination announces itself (no NIC here: a no-op that must
    // still be accepted).
    dst.announce_self(&AnnounceParams::default()).await.unwrap();

    // The source is done: quit it.
    let reason = src.shutdown(Duration::from_secs(1)).await.unwrap();
    assert!(
        matches!(reason, ExitReason::Shutdown { guest: false, .. }),
        "{reason:?}"
    );
    dst.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_destination_waits_for_cont_and_cancel_keeps_source() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let src_cfg = config(dir.path(), "src", "");
    let _g1 = KillGuard(src_cfg.run_dir.clone());
    let src = QemuVm::launch(src_cfg.clone()).await.unwrap();
    wait_tick(&src_cfg.run_dir, 1, BOOT).await;

    // CPU model expansion, as EVC reads it.
    let exp = src
        .query_cpu_model_expansion("qemu64", CpuExpansion::Static)
        .await
        .unwrap();
    assert!(exp["model"]["props"]["sse2"].as_bool().unwrap(), "{exp}");
    assert!(src
        .query_cpu_model_expansion("nosuchcpu", CpuExpansion::Full)
        .await
        .is_err());

    // First attempt: throttled to a crawl, then cancelled; the source keeps running.
    let dst1_cfg = destination(&src_cfg, dir.path(), "dst1", true);
    let _g2 = KillGuard(dst1_cfg.run_dir.clone());
    let dst1 = QemuVm::launch(dst1_cfg).await.unwrap();
    let uri = listen(&dst1).await;
    src.set_migration_parameters(serde_json::json!({"max-bandwidth": 1_000_000}))
        .await
        .unwrap();
    src.migrate(&uri).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = src.query_migrate().await.unwrap();
        if s.status == MigrationStatus::Active && s.transferred_bytes > 0 {
            assert!(s.remaining_bytes > 0, "{s:?}");
            break;
        }
        assert!(Instant::now() < deadline, "never active: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    src.migrate_cancel().await.unwrap();
    let s = wait_migration(&src, Duration::from_secs(30)).await;
    assert_eq!(s.status, MigrationStatus::Cancelled, "{s:?}");
    assert_eq!(src.status().await.unwrap(), RunState::Running);
    // The failed destination exits on its own once its stream breaks.
    let dst1_exit = tokio::time::timeout(Duration::from_secs(30), dst1.wait_exit())
        .await
        .expect("destination of a cancelled migration kept running");
    tracing::info!(%dst1_exit, "cancelled destination ended");
    let t = last_tick(&console(&src_cfg.run_dir)).unwrap();
    wait_tick(&src_cfg.run_dir, t + 1, Duration::from_secs(30)).await;

    // Second attempt at full speed to a destination started with -S: it stays paused.
    src.set_migration_parameters(serde_json::json!({"max-bandwidth": 10_000_000_000u64}))
        .await
        .unwrap();
    let dst_cfg = destination(&src_cfg, dir.path(), "dst2", true);
    let _g3 = KillGuard(dst_cfg.run_dir.clone());
    let dst = QemuVm::launch(dst_cfg.clone()).await.unwrap();
    let uri = listen(&dst).await;
    src.migrate(&uri).await.unwrap();
    let stats = wait_migration(&src, Duration::from_secs(120)).await;
    assert_eq!(stats.status, MigrationStatus::Completed, "{stats:?}");
    let state = dst
        .wait_status(|s| *s != RunState::InMigrate, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(state, RunState::Paused);
    let paused_tick = last_tick(&console(&dst_cfg.run_dir));
    assert!(
        paused_tick.is_none(),
        "paused destination printed {paused_tick:?}"
    );

    dst.resume().await.unwrap();
    assert_eq!(dst.status().await.unwrap(), RunState::Running);
    let first = wait_for("ticks on the destination", Duration::from_secs(30), || {
        last_tick(&console(&dst_cfg.run_dir))
    })
    .await;
    assert!(first > t, "destination tick {first} <= source tick {t}");

    src.kill().await.unwrap();
    dst.kill().await.unwrap();
}

/// The project's guest, dirtying and verifying its memory, survives a migration: the
/// destination keeps dirtying (measured), its verifier finds no bad page, and it still
/// answers the power button. Skipped, with a notice, until guest/build.sh has run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_guest_memory_survives_migration() {
    init_tracing();
    let Some((kernel, initrd)) = guest_image() else {
        eprintln!("NOTICE: target/guest/initramfs.img missing (run guest/build.sh): skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut src_cfg = config(dir.path(), "src", "");
    src_cfg.spec.memory_mib = 256;
    src_cfg.spec.boot = tern_api::BootSource::Kernel {
        kernel: kernel.to_string_lossy().into_owned(),
        initrd: Some(initrd.to_string_lossy().into_owned()),
        cmdline: "console=ttyS0 quiet ipv6.disable=1 tern.mem=64 tern.dirty=16".into(),
    };
    let dst_cfg = destination(&src_cfg, dir.path(), "dst", false);
    let _g1 = KillGuard(src_cfg.run_dir.clone());
    let _g2 = KillGuard(dst_cfg.run_dir.clone());
    let src = QemuVm::launch(src_cfg.clone()).await.unwrap();
    wait_for("TERN-GUEST-READY", BOOT, || {
        console(&src_cfg.run_dir)
            .contains("TERN-GUEST-READY")
            .then_some(())
    })
    .await;
    let rate = src
        .measure_dirty_rate(std::time::Duration::from_secs(1))
        .await
        .unwrap();
    assert!(rate.dirty_rate_mib_per_s.unwrap_or(0) > 0, "{rate:?}");

    let dst = QemuVm::launch(dst_cfg.clone()).await.unwrap();
    let uri = listen(&dst).await;
    src.migrate(&uri).await.unwrap();
    let stats = wait_migration(&src, Duration::from_secs(120)).await;
    assert_eq!(stats.status, MigrationStatus::Completed, "{stats:?}");
    dst.wait_status(|s| *s == RunState::Running, Duration::from_secs(30))
        .await
        .unwrap();
    src.shutdown(Duration::from_secs(1)).await.unwrap();

    // Still dirtying memory on the destination, and every verified page is right.
    let rate = dst
        .measure_dirty_rate(std::time::Duration::from_secs(2))
        .await
        .unwrap();
    assert!(rate.dirty_rate_mib_per_s.unwrap_or(0) > 0, "{rate:?}");
    let text = console(&dst_cfg.run_dir);
    assert!(!text.contains("TERN-GUEST-ERROR"), "{text}");
    assert!(
        !text.contains("TERN-GUEST-READY"),
        "the destination rebooted: {text}"
    );

    let reason = dst.shutdown(Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        reason,
        ExitReason::Shutdown {
            guest: true,
            reason: "guest-shutdown".into()
        }
    );
    let text = console(&dst_cfg.run_dir);
    assert!(text.contains("TERN-GUEST-POWEROFF"), "{text}");
    assert!(!text.contains("TERN-GUEST-ERROR"), "{text}");
}
