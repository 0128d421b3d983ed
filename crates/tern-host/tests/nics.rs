//! A VM with a NIC: the agent runs inside a throwaway network namespace with a bridge, creates
//! the VM's tap there, keeps it across an agent restart and removes it when the VM stops.

mod common;

use std::future::Future;
use std::time::Duration;

use common::{pid_alive, spec, AgentProc, QemuReaper};
use tern_api::agent::{StartVm, VmRuntime};
use tern_api::center::StopVm;
use tern_api::{ApiClient, Endpoint, HostFacts, NicSpec, PowerState};
use tern_testkit::wait_until;
use tern_testkit::NetNs;
use uuid::Uuid;

const LONG: Duration = Duration::from_secs(60);
const AGENT_URL: &str = "http://127.0.0.1:8701";

/// Not a test: the body of the agent processes the tests start (see `common::agent_entry`).
#[test]
#[ignore = "runs the agent when started by the other tests"]
fn agent_process_entry() {
    common::agent_entry();
}

/// Runs a future on a thread inside the namespace, so its sockets reach the agent's
/// loopback there.
fn in_ns<T: Send, Fut: Future<Output = T>>(ns: &NetNs, make: impl FnOnce() -> Fut + Send) -> T {
    ns.run_in(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(make())
    })
}

async fn client(token: &str) -> ApiClient {
    let c = ApiClient::with_timeout(
        Endpoint::Tcp(AGENT_URL.to_string()),
        token,
        Duration::from_secs(90),
    )
    .expect("client");
    wait_until("the agent API", LONG, || {
        let c = c.clone();
        async move { c.get::<HostFacts>("/v1/facts").await.ok() }
    })
    .await;
    c
}

/// `ip -o link show dev TAP` inside the namespace.
fn link(ns: &NetNs, tap: &str) -> Option<String> {
    ns.ip(&["-o", "link", "show", "dev", tap]).ok()
}

#[test]
fn nic_taps_follow_the_vm() {
    common::init_tracing();
    // Dropped last to first: the agent, then its QEMUs, then the namespace and its devices.
    let ns = NetNs::new("th-nics").with_bridge("br0");
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let shared = tmp.path().join("shared");
    std::fs::create_dir_all(&shared).expect("shared dir");
    let _reaper = QemuReaper {
        state_dir: state.clone(),
    };
    let args: Vec<String> = [
        "--name",
        "nh",
        "--listen",
        "127.0.0.1:8701",
        "--state-dir",
        &state.display().to_string(),
        "--shared-storage",
        &shared.display().to_string(),
        "--bridge",
        "br0",
        "--accel",
        "tcg",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let log = tmp.path().join("agent.log");
    let mut agent = AgentProc::spawn(&args, &log, Some(&ns.name));
    let token = in_ns(&ns, || {
        wait_until("the agent token", LONG, || async {
            std::fs::read_to_string(state.join("agent.token")).ok()
        })
    });
    let token = token.trim().to_string();

    let id = Uuid::new_v4();
    let mut vm = spec("netvm", &shared);
    vm.nics.push(NicSpec {
        mac: "52:54:00:7e:00:01".into(),
    });
    let start = StartVm {
        spec: vm,
        generation: 1,
    };
    let rt: VmRuntime = in_ns(&ns, || async {
        client(&token)
            .await
            .put(&format!("/v1/vms/{id}"), &start)
            .await
            .expect("start with a NIC")
    });
    assert_eq!(rt.state, PowerState::Running);
    let pid = rt.pid.expect("pid");
    let tap = tern_host::tap::tap_name(id, 0);
    assert_eq!(rt.taps, vec![tap.clone()]);
    assert!(tap.len() <= 15);
    assert_eq!(ns.master_of(&tap).as_deref(), Some("br0"));
    // QEMU holds the tap open, so it has carrier; the root namespace has no such device.
    let shown = link(&ns, &tap).expect("tap exists");
    assert!(shown.contains("LOWER_UP"), "tap has carrier: {shown}");
    assert!(tern_testkit::netns::ip(&["link", "show", "dev", &tap]).is_err());

    // Agent crash and restart: the VM and its tap are taken back as they are.
    agent.kill9();
    assert!(pid_alive(pid));
    let _agent = AgentProc::spawn(&args, &log, Some(&ns.name));
    let rt: VmRuntime = in_ns(&ns, || async {
        client(&token)
            .await
            .get(&format!("/v1/vms/{id}"))
            .await
            .expect("get")
    });
    assert_eq!((rt.state, rt.pid), (PowerState::Running, Some(pid)));
    assert_eq!(ns.master_of(&tap).as_deref(), Some("br0"));

    // Starting it again is idempotent, also for the tap.
    let again: VmRuntime = in_ns(&ns, || async {
        client(&token)
            .await
            .put(&format!("/v1/vms/{id}"), &start)
            .await
            .expect("start again")
    });
    assert_eq!(again.pid, Some(pid));

    // Stopped: the tap goes. Started again: it comes back. Deleted: gone.
    let stopped: VmRuntime = in_ns(&ns, || async {
        client(&token)
            .await
            .post(
                &format!("/v1/vms/{id}/stop"),
                &StopVm {
                    force: true,
                    timeout_ms: None,
                },
            )
            .await
            .expect("stop")
    });
    assert_eq!(stopped.state, PowerState::Stopped);
    assert!(link(&ns, &tap).is_none(), "tap removed after stop");
    let rt: VmRuntime = in_ns(&ns, || async {
        client(&token)
            .await
            .put(&format!("/v1/vms/{id}"), &start)
            .await
            .expect("restart")
    });
    assert_eq!(rt.state, PowerState::Running);
    assert_eq!(ns.master_of(&tap).as_deref(), Some("br0"));
    in_ns(&ns, || async {
        client(&token)
            .await
            .delete(&format!("/v1/vms/{id}"))
            .await
            .expect("delete")
    });
    assert!(link(&ns, &tap).is_none(), "tap removed after delete");
    assert!(!rt.pid.is_some_and(pid_alive), "QEMU killed by delete");
}
