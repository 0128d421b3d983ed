//! The agent as a real process with real QEMU guests (TCG): registration and heartbeats with
//! a fake center, the VM lifecycle through its API, crash detection, and restart safety.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{pid_alive, qemu_pid, spec, AgentProc, FakeCenter, QemuReaper};
use tern_api::agent::{CheckPaths, PathsReport, StartVm, VmRuntime};
use tern_api::center::StopVm;
use tern_api::{Accelerator, ApiClient, ApiError, Endpoint, HostFacts, HostLoad, PowerState};
use tern_testkit::wait_until;
use uuid::Uuid;

const LONG: Duration = Duration::from_secs(60);

/// Not a test: the body of the agent processes the tests start (see `common::agent_entry`).
#[test]
#[ignore = "runs the agent when started by the other tests"]
fn agent_process_entry() {
    common::agent_entry();
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn vm_path(id: Uuid) -> String {
    format!("/v1/vms/{id}")
}

async fn get_vm(c: &ApiClient, id: Uuid) -> VmRuntime {
    c.get(&vm_path(id)).await.expect("GET vm")
}

async fn console_len(c: &ApiClient, id: Uuid) -> usize {
    c.get_text(&format!("/v1/vms/{id}/console?bytes=1000000"))
        .await
        .expect("console")
        .len()
}

/// Waits until the agent answers on `url`.
async fn wait_api(url: &str, token: &str) -> ApiClient {
    let c = ApiClient::with_timeout(
        Endpoint::Tcp(url.to_string()),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_runs_vms_and_survives_restarts() {
    common::init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let shared = tmp.path().join("shared");
    std::fs::create_dir_all(&shared).expect("shared dir");
    let _reaper = QemuReaper {
        state_dir: state.clone(),
    };
    let enrol = tmp.path().join("enrol.token");
    std::fs::write(&enrol, "enrol-secret\n").expect("enrol token");
    let center = FakeCenter::start("enrol-secret").await;
    // The first registration finds no cluster: the agent must retry.
    center.with(|l| l.refuse_cluster = 1);

    let args = common::enrolled_agent_args(
        &center.url,
        &enrol,
        &state,
        &["--shared-storage", &s(&shared), "--heartbeat-ms", "300"],
    );
    let log = tmp.path().join("agent.log");
    let mut agent = AgentProc::spawn(&args, &log, None);

    // Registration carries the facts; the agent token is the one in the state dir.
    let reg = wait_until("registration", LONG, || async {
        center.with(|l| l.registrations.first().cloned())
    })
    .await;
    let token = std::fs::read_to_string(state.join("agent.token")).expect("agent token");
    assert_eq!(reg.agent_token, token.trim());
    assert_eq!((reg.name.as_str(), reg.cluster.as_str()), ("h1", "lab"));
    assert!(
        reg.agent_url.starts_with("http://127.0.0.1:"),
        "{}",
        reg.agent_url
    );
    let f = &reg.facts;
    assert_eq!(f.hostname, "h1");
    assert!(f.cores >= 1 && f.memory_mib > 0, "{f:?}");
    assert!(
        !f.cpu_flags.is_empty() && !f.cpu_model_name.is_empty(),
        "{f:?}"
    );
    assert!(
        f.qemu_version
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit()),
        "{f:?}"
    );
    assert_eq!(f.accelerator, Accelerator::Tcg);
    assert_eq!(f.shared_storage, s(&shared));
    assert!(
        agent.log_text().contains("no such cluster"),
        "retry reason logged"
    );

    let api = wait_api(&reg.agent_url, token.trim()).await;

    // Every call needs the token.
    let bad = ApiClient::new(Endpoint::Tcp(reg.agent_url.clone()), "wrong").expect("client");
    match bad.get::<Vec<VmRuntime>>("/v1/vms").await {
        Err(ApiError::Status {
            status: 401,
            message,
        }) => assert!(message.contains("token")),
        other => panic!("wrong token accepted: {other:?}"),
    }

    // check-paths: missing, outside shared storage, fine.
    let inside = shared.join("vmlinuz");
    std::fs::write(&inside, b"kernel").expect("write");
    let outside = tmp.path().join("local.img");
    std::fs::write(&outside, b"disk").expect("write");
    let report: PathsReport = api
        .post(
            "/v1/check-paths",
            &CheckPaths {
                paths: vec![s(&inside), s(&outside), s(&shared.join("absent"))],
            },
        )
        .await
        .expect("check-paths");
    assert_eq!(report.missing, vec![s(&shared.join("absent"))]);
    assert_eq!(report.outside_shared_storage, vec![s(&outside)]);

    // A kernel that does not exist: a clear 4xx naming it, nothing left behind.
    let mut broken = spec("broken", &shared);
    broken.boot = tern_api::BootSource::Kernel {
        kernel: "/nonexistent/vmlinuz".into(),
        initrd: None,
        cmdline: String::new(),
    };
    let bad_id = Uuid::new_v4();
    match api
        .put::<_, VmRuntime>(
            &vm_path(bad_id),
            &StartVm {
                spec: broken,
                generation: 1,
            },
        )
        .await
    {
        Err(ApiError::Status {
            status: 400,
            message,
        }) => {
            assert!(message.contains("/nonexistent/vmlinuz"), "{message}")
        }
        other => panic!("bad kernel not refused: {other:?}"),
    }
    assert_eq!(
        api.get::<Vec<VmRuntime>>("/v1/vms")
            .await
            .expect("list")
            .len(),
        0
    );
    assert!(!state.join("vms").join(bad_id.to_string()).exists());

    // QEMU itself refusing (unknown CPU model): its own words come back.
    let mut odd = spec("odd", &shared);
    odd.cpu_model = Some("NoSuchCpu".into());
    match api
        .put::<_, VmRuntime>(
            &vm_path(Uuid::new_v4()),
            &StartVm {
                spec: odd,
                generation: 1,
            },
        )
        .await
    {
        Err(ApiError::Status { status, message }) if status >= 400 => {
            assert!(message.contains("NoSuchCpu"), "{message}")
        }
        other => panic!("QEMU error not reported: {other:?}"),
    }

    // Start a VM: running, with a live QEMU, and its console grows.
    let id = Uuid::new_v4();
    let vm_spec = spec("vm1", &shared);
    let start = StartVm {
        spec: vm_spec.clone(),
        generation: 1,
    };
    let rt: VmRuntime = api.put(&vm_path(id), &start).await.expect("start");
    assert_eq!(rt.state, PowerState::Running);
    assert_eq!(rt.accelerator, Accelerator::Tcg);
    let pid = rt.pid.expect("pid");
    assert!(pid_alive(pid));
    assert_eq!(qemu_pid(&state.join("vms").join(id.to_string())), Some(pid));
    assert!(state
        .join("vms")
        .join(id.to_string())
        .join("spec.json")
        .is_file());
    // QEMU got descriptors, not paths (issue 11): its command line names no file of the
    // shared storage, and the kernel it loaded is the file the agent opened beneath it.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("QEMU's cmdline");
    let argv: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert!(!argv.iter().any(|a| a.contains(&s(&shared))), "{argv:?}");
    let kernel = argv
        .iter()
        .skip_while(|a| *a != "-kernel")
        .nth(1)
        .expect("-kernel");
    let fd = kernel
        .strip_prefix("/proc/self/fd/")
        .unwrap_or_else(|| panic!("QEMU was given the kernel as {kernel}"));
    let held = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).expect("QEMU holds the kernel");
    assert!(
        held.starts_with(shared.canonicalize().expect("shared")),
        "{}",
        held.display()
    );
    let first = wait_until("console output", LONG, || async {
        let n = console_len(&api, id).await;
        (n > 0).then_some(n)
    })
    .await;
    wait_until("the console to grow", LONG, || async {
        (console_len(&api, id).await > first).then_some(())
    })
    .await;
    let tail = api
        .get_text(&format!("/v1/vms/{id}/console?bytes=10"))
        .await
        .expect("tail");
    assert!(tail.len() <= 10, "{tail:?}");

    // A spec naming a file outside the shared storage is refused: `-initrd` would copy a
    // host secret into guest memory, a raw disk would hand the guest a host device.
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, b"host secret").expect("secret");
    let mut leaky = spec("leaky", &shared);
    if let tern_api::BootSource::Kernel { initrd, .. } = &mut leaky.boot {
        *initrd = Some(s(&secret));
    }
    let mut raw = spec("raw", &shared);
    raw.disks.push(tern_api::DiskSpec {
        bus: Default::default(),
        path: "/dev/null".into(),
        format: Default::default(),
        readonly: false,
        datastore: None,
        volume: None,
    });
    for bad in [leaky, raw] {
        let name = bad.name.clone();
        match api
            .put::<_, VmRuntime>(
                &vm_path(Uuid::new_v4()),
                &StartVm {
                    spec: bad,
                    generation: 1,
                },
            )
            .await
        {
            Err(ApiError::Status { status, message }) => {
                assert_eq!(status, 400, "{name}: {message}");
                assert!(
                    message.contains("shared storage") || message.contains("not a file"),
                    "{name}: {message}"
                );
            }
            other => panic!("{name}: a VM naming a host file was started: {other:?}"),
        }
    }

    // A hostile migration target is refused before it reaches QEMU: `exec:` would have QEMU
    // run a shell command; an odd compression would go to QEMU as a parameter.
    let owned = tmp.path().join("owned");
    let settings = serde_json::json!({
        "multifd_channels": 0, "max_bandwidth_mib_s": null, "downtime_limit_ms": 300,
        "compression": "none", "auto_converge": true, "postcopy_allowed": false,
        "deadline_ms": 60000, "reasons": []
    });
    let mut odd_settings = settings.clone();
    odd_settings["compression"] = serde_json::json!("zstd\",\"x\":\"y");
    let outgoing = format!("/v1/migrations/{id}/outgoing");
    for body in [
        serde_json::json!({ "uri": format!("exec:touch {}", s(&owned)), "settings": settings }),
        serde_json::json!({ "uri": "tcp:127.0.0.1:1", "settings": odd_settings }),
    ] {
        match api.post::<_, serde_json::Value>(&outgoing, &body).await {
            Err(ApiError::Status { status, message }) => {
                assert!((400..500).contains(&status), "{status}: {message}");
            }
            other => panic!("hostile migration request accepted: {other:?}"),
        }
    }
    assert!(!owned.exists(), "QEMU ran the exec: target");
    let still: VmRuntime = api.get(&vm_path(id)).await.expect("vm");
    assert_eq!((still.state, still.pid), (PowerState::Running, Some(pid)));

    // Same spec again: idempotent. A different spec while running: refused.
    let again: VmRuntime = api.put(&vm_path(id), &start).await.expect("start again");
    assert_eq!(again.pid, Some(pid));
    let mut other = vm_spec.clone();
    other.memory_mib += 64;
    match api
        .put::<_, VmRuntime>(
            &vm_path(id),
            &StartVm {
                spec: other,
                generation: 1,
            },
        )
        .await
    {
        Err(ApiError::Status { status: 409, .. }) => {}
        r => panic!("different spec accepted: {r:?}"),
    }

    // Heartbeats carry the load, with the VM's CPU and memory.
    let vm_load = wait_until("a heartbeat with the VM's load", LONG, || async {
        center.with(|l| {
            l.heartbeats.last().and_then(|h| {
                h.load
                    .vms
                    .iter()
                    .find(|v| v.vm_id == id && v.cpu_percent > 0.0 && v.rss_mib > 0)
                    .cloned()
                    .map(|v| (v, h.load.clone()))
            })
        })
    })
    .await;
    assert_eq!(vm_load.0.state, PowerState::Running);
    assert_eq!(vm_load.0.name, "vm1");
    assert!(vm_load.1.memory_total_mib > 0 && vm_load.1.memory_used_mib > 0);
    assert!(vm_load.1.cpu_percent > 0.0, "{:?}", vm_load.1);
    let load: HostLoad = api.get("/v1/load").await.expect("load");
    assert_eq!(load.vms.len(), 1);

    // Pause and resume through QMP.
    let p: VmRuntime = api
        .post(&format!("/v1/vms/{id}/pause"), &())
        .await
        .expect("pause");
    assert_eq!(p.state, PowerState::Paused);
    let r: VmRuntime = api
        .post(&format!("/v1/vms/{id}/resume"), &())
        .await
        .expect("resume");
    assert_eq!(r.state, PowerState::Running);

    // The agent crashes (SIGKILL) and comes back: the VM is adopted, untouched.
    agent.kill9();
    assert!(pid_alive(pid), "QEMU outlives the agent");
    let regs_before = center.with(|l| l.registrations.len());
    let mut agent = AgentProc::spawn(&args, &log, None);
    let reg2 = wait_until("registration after restart", LONG, || async {
        center.with(|l| l.registrations.get(regs_before).cloned())
    })
    .await;
    assert_eq!(
        reg2.agent_token,
        token.trim(),
        "the agent token survives restarts"
    );
    let api = wait_api(&reg2.agent_url, token.trim()).await;
    let rt = get_vm(&api, id).await;
    assert_eq!((rt.state, rt.pid), (PowerState::Running, Some(pid)));
    assert_eq!(rt.generation, 1);
    // QMP works on the adopted process.
    let p: VmRuntime = api
        .post(&format!("/v1/vms/{id}/pause"), &())
        .await
        .expect("pause adopted");
    assert_eq!(p.state, PowerState::Paused);
    let r: VmRuntime = api
        .post(&format!("/v1/vms/{id}/resume"), &())
        .await
        .expect("resume adopted");
    assert_eq!((r.state, r.pid), (PowerState::Running, Some(pid)));

    // The center forgets the host (data wiped): the agent registers again.
    let regs_before = center.with(|l| {
        l.forget_hosts = true;
        l.registrations.len()
    });
    wait_until("re-registration after a 404 heartbeat", LONG, || async {
        center.with(|l| (l.registrations.len() > regs_before).then_some(()))
    })
    .await;
    let beats = center.with(|l| l.heartbeats.len());
    wait_until("heartbeats after re-registration", LONG, || async {
        center.with(|l| (l.heartbeats.len() > beats).then_some(()))
    })
    .await;

    // QEMU killed behind the agent's back: reported crashed, with a reason.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill QEMU");
    let crashed = wait_until("the crash to be recorded", LONG, || async {
        let rt = get_vm(&api, id).await;
        (rt.state == PowerState::Crashed).then_some(rt)
    })
    .await;
    assert_eq!(crashed.pid, None);
    let reason = crashed.exit_reason.expect("exit reason");
    assert!(reason.contains("without a SHUTDOWN"), "{reason}");

    // Started again with a new generation, then stopped gracefully.
    let rt: VmRuntime = api
        .put(
            &vm_path(id),
            &StartVm {
                spec: vm_spec.clone(),
                generation: 2,
            },
        )
        .await
        .expect("restart");
    assert_eq!((rt.state, rt.generation), (PowerState::Running, 2));
    let pid2 = rt.pid.expect("pid");
    assert_ne!(pid2, pid);
    let stopped: VmRuntime = api
        .post(
            &format!("/v1/vms/{id}/stop"),
            &StopVm {
                force: false,
                timeout_ms: Some(3000),
            },
        )
        .await
        .expect("stop");
    assert_eq!(
        (stopped.state, stopped.pid, stopped.exit_reason.clone()),
        (PowerState::Stopped, None, None)
    );
    assert!(!pid_alive(pid2));
    // Stopping a stopped VM answers as it is.
    let again: VmRuntime = api
        .post(&format!("/v1/vms/{id}/stop"), &StopVm::default())
        .await
        .expect("stop again");
    assert_eq!(again.state, PowerState::Stopped);
    // Pausing a stopped VM is refused.
    match api
        .post::<_, VmRuntime>(&format!("/v1/vms/{id}/pause"), &())
        .await
    {
        Err(ApiError::Status { status: 409, .. }) => {}
        r => panic!("pause of a stopped VM: {r:?}"),
    }

    // Delete: gone from the API and from disk.
    api.delete(&vm_path(id)).await.expect("delete");
    match api.get::<VmRuntime>(&vm_path(id)).await {
        Err(ApiError::Status { status: 404, .. }) => {}
        r => panic!("deleted VM still there: {r:?}"),
    }
    assert!(!state.join("vms").join(id.to_string()).exists());

    let status = agent.terminate(Duration::from_secs(20));
    assert!(status.success(), "agent exit on SIGTERM: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_outlive_the_agent_and_deaths_while_away_are_seen() {
    common::init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let shared = tmp.path().join("shared");
    std::fs::create_dir_all(&shared).expect("shared dir");
    let _reaper = QemuReaper {
        state_dir: state.clone(),
    };
    // No center: the agent serves its API alone; a fixed port is found by binding first.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let args: Vec<String> = [
        "--name",
        "solo",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--state-dir",
        &s(&state),
        "--shared-storage",
        &s(&shared),
        "--accel",
        "tcg",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let log = tmp.path().join("agent.log");
    let mut agent = AgentProc::spawn(&args, &log, None);
    let token = wait_until("the agent token", LONG, || async {
        std::fs::read_to_string(state.join("agent.token")).ok()
    })
    .await;
    let api = wait_api(&url, token.trim()).await;

    // A second agent on the same state dir refuses to run (it would fight over the VMs).
    let log2 = tmp.path().join("agent2.log");
    let mut second = AgentProc::spawn(&args, &log2, None);
    let status = wait_until("the second agent to give up", LONG, || {
        let status = second.child.try_wait().expect("wait second agent");
        async move { status }
    })
    .await;
    assert!(!status.success());
    assert!(
        second.log_text().contains("another agent"),
        "{}",
        second.log_text()
    );

    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let pa = api
        .put::<_, VmRuntime>(
            &vm_path(a),
            &StartVm {
                spec: spec("a", &shared),
                generation: 1,
            },
        )
        .await
        .expect("start a")
        .pid
        .expect("pid a");
    let pb = api
        .put::<_, VmRuntime>(
            &vm_path(b),
            &StartVm {
                spec: spec("b", &shared),
                generation: 1,
            },
        )
        .await
        .expect("start b")
        .pid
        .expect("pid b");

    // A clean stop of the agent leaves its VMs running.
    let status = agent.terminate(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    assert!(
        pid_alive(pa) && pid_alive(pb),
        "VMs keep running after SIGTERM"
    );

    // While no agent runs, VM b dies.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pb as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill b");
    wait_until("b to die", LONG, || async {
        (!pid_alive(pb)).then_some(())
    })
    .await;

    let _agent = AgentProc::spawn(&args, &log, None);
    let api = wait_api(&url, token.trim()).await;
    let ra = get_vm(&api, a).await;
    assert_eq!((ra.state, ra.pid), (PowerState::Running, Some(pa)));
    let rb = get_vm(&api, b).await;
    assert_eq!((rb.state, rb.pid), (PowerState::Crashed, None));
    let why = rb.exit_reason.expect("reason");
    assert!(why.contains("not running"), "{why}");
    let list: Vec<VmRuntime> = api.get("/v1/vms").await.expect("list");
    assert_eq!(
        list.iter()
            .map(|v| v.spec.name.as_str())
            .collect::<Vec<_>>(),
        vec!["a", "b"]
    );

    // A forced stop kills at once.
    let stopped: VmRuntime = api
        .post(
            &format!("/v1/vms/{a}/stop"),
            &StopVm {
                force: true,
                timeout_ms: None,
            },
        )
        .await
        .expect("force stop");
    assert_eq!(stopped.state, PowerState::Stopped);
    assert!(!pid_alive(pa));
}
