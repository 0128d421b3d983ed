//! Host facts heal themselves: an agent whose first CPU-capability probe fails (here a QEMU
//! wrapper that fails its first `-machine none` start) reports the host without a capability,
//! probes again in the background, and its heartbeats carry the capability once known — the
//! center learns it without an operator.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::{AgentProc, FakeCenter};

/// Not a test: the body of the agent processes the tests start (see `common::agent_entry`).
#[test]
#[ignore = "runs the agent when started by the other tests"]
fn agent_process_entry() {
    common::agent_entry();
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_cpu_probe_is_retried_and_reaches_the_center() {
    common::init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let enrol = tmp.path().join("enrol.token");
    std::fs::write(&enrol, "enrol-secret\n").expect("enrol token");
    // QEMU that fails its first probe start (as a probe killed by a signal would), then works.
    let marker = tmp.path().join("probe-failed-once");
    let wrapper = tmp.path().join("qemu-wrapper");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \" $* \" in *' -machine none '*)\n  if [ ! -e '{m}' ]; then : > '{m}'; \
             echo 'probe fails once' >&2; exit 1; fi;;\nesac\nexec qemu-system-x86_64 \"$@\"\n",
            m = marker.display()
        ),
    )
    .expect("write the wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let center = FakeCenter::start("enrol-secret").await;
    let args = common::enrolled_agent_args(
        &center.url,
        &enrol,
        &state,
        &["--qemu", &s(&wrapper), "--heartbeat-ms", "200"],
    );
    let log = tmp.path().join("agent.log");
    let agent = AgentProc::spawn(&args, &log, None);

    // The agent starts and registers although its probe failed: the host is known, without
    // a capability (the center refuses it in EVC clusters meanwhile).
    let reg = tern_testkit::wait_until("registration", Duration::from_secs(60), || async {
        center.with(|l| l.registrations.first().cloned())
    })
    .await;
    assert!(marker.exists(), "the wrapper's failing start was not used");
    assert!(
        reg.facts.cpu_capability.is_empty() && reg.facts.cpu.is_none(),
        "registered with a capability although the probe failed: {:?}",
        reg.facts.cpu
    );
    // A later probe succeeds and the heartbeats carry the capability.
    let facts = tern_testkit::wait_until(
        "a heartbeat with the CPU capability",
        Duration::from_secs(60),
        || async {
            center.with(|l| {
                l.heartbeats
                    .iter()
                    .rev()
                    .find(|h| !h.facts.cpu_capability.is_empty())
                    .map(|h| h.facts.clone())
            })
        },
    )
    .await;
    let cpu = facts.cpu.expect("the capability's summary");
    assert!(cpu.best_baseline.is_some(), "{cpu:?}");
    assert!(
        agent.log_text().contains("CPU capability known now"),
        "{}",
        agent.log_text()
    );
}
