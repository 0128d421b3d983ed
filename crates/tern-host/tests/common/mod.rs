//! Helpers shared by the agent's integration tests: the agent as a real process, a fake
//! center, a test guest, guards that clean up QEMU processes, and condition waits.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use tern_api::center::{Heartbeat, RegisterHost, Registered};
use tern_api::{BootSource, ErrorBody, VmSpec};
use uuid::Uuid;

/// Env var that turns the test binary into an agent process (JSON array of agent flags).
pub const AGENT_ARGS_ENV: &str = "TERN_HOST_TEST_AGENT_ARGS";
/// Name of the (ignored) test that runs the agent in a child process.
pub const AGENT_ENTRY_TEST: &str = "agent_process_entry";

pub use tern_testkit::repo_root as workspace_root;

/// A bootable guest, copied into the agent's shared storage `shared` (an agent runs only
/// files from there): the project's guest image when built (guest/build.sh), else the host's
/// cloud kernel without initrd (it panics for want of a root fs, but QEMU keeps running,
/// which is all the lifecycle tests need).
pub fn guest_boot(shared: &Path) -> BootSource {
    let into = shared.join("guest");
    std::fs::create_dir_all(&into).expect("guest dir in shared storage");
    let copy = |from: &Path, name: &str| -> String {
        let to = into.join(name);
        if !to.is_file() {
            std::fs::copy(from, &to).expect("copy a guest file into shared storage");
        }
        std::path::absolute(&to)
            .expect("absolute")
            .display()
            .to_string()
    };
    let dir = workspace_root().join("target/guest");
    let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initramfs.img"));
    if kernel.is_file() && initrd.is_file() {
        return BootSource::Kernel {
            kernel: copy(&kernel, "vmlinuz"),
            initrd: Some(copy(&initrd, "initramfs.img")),
            cmdline: "console=ttyS0 ipv6.disable=1 tern.ip=10.78.0.100/24".to_string(),
        };
    }
    let kernel = tern_testkit::paths::guest_kernel()
        .expect("no guest kernel: run guest/build.sh or install linux-image-cloud-amd64");
    BootSource::Kernel {
        kernel: copy(&kernel, "vmlinuz"),
        initrd: None,
        cmdline: "console=ttyS0".to_string(),
    }
}

/// A 1-vCPU, 192 MiB VM booting the guest from the agent's shared storage `shared`.
pub fn spec(name: &str, shared: &Path) -> VmSpec {
    VmSpec {
        firmware: Default::default(),
        cloud_init: None,
        resources: Default::default(),
        name: name.to_string(),
        vcpus: 1,
        memory_mib: 192,
        cpu_model: None,
        boot: guest_boot(shared),
        disks: vec![],
        nics: vec![],
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Flags of agent `h1` of cluster `lab` that enrols with the center at `center_url` (token in
/// `enrol`), keeps its state in `state`, listens on a free port of 127.0.0.1 and runs guests
/// under TCG; `extra` flags follow.
pub fn enrolled_agent_args(
    center_url: &str,
    enrol: &Path,
    state: &Path,
    extra: &[&str],
) -> Vec<String> {
    let (enrol, state) = (enrol.display().to_string(), state.display().to_string());
    let mut args: Vec<String> = [
        "--name",
        "h1",
        "--cluster",
        "lab",
        "--center",
        center_url,
        "--enrol-token-file",
        &enrol,
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        &state,
        "--accel",
        "tcg",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// The body of the child process: runs the agent with the flags in [`AGENT_ARGS_ENV`].
pub fn agent_entry() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: tern_host::AgentArgs,
    }
    let Ok(json) = std::env::var(AGENT_ARGS_ENV) else {
        return;
    };
    let mut argv: Vec<String> = serde_json::from_str(&json).expect("agent args JSON");
    argv.insert(0, "agent".to_string());
    let cli = Cli::parse_from(argv);
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let code = match rt.block_on(tern_host::run(cli.args)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("agent failed: {e:#}");
            1
        }
    };
    // Leave without the test harness's own output and exit code.
    std::process::exit(code);
}

/// The agent running as a real process (this test binary re-executed), killed on drop.
pub struct AgentProc {
    pub child: Child,
    pub log: PathBuf,
}

impl AgentProc {
    /// Starts the agent with `args`, optionally inside network namespace `netns`.
    pub fn spawn(args: &[String], log: &Path, netns: Option<&str>) -> AgentProc {
        let exe = std::env::current_exe().expect("test binary path");
        let harness = [
            "--exact",
            AGENT_ENTRY_TEST,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ];
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let logfile = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("agent log");
        cmd.args(harness)
            .env(
                AGENT_ARGS_ENV,
                serde_json::to_string(args).expect("args JSON"),
            )
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(logfile.try_clone().expect("log fd"))
            .stderr(logfile);
        let child = cmd.spawn().expect("spawn the agent");
        AgentProc {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL (a crash): nothing of the agent's shutdown path runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        // With `ip netns exec` the child is `ip`, which execs the agent: same pid.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM the agent");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait agent") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit on SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- agent log {} ----\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// Kills, on drop, every QEMU started from a state dir (run even when a test fails).
pub struct QemuReaper {
    pub state_dir: PathBuf,
}

/// Pid of the QEMU of a run dir, if one runs.
pub fn qemu_pid(run_dir: &Path) -> Option<u32> {
    let pidfile = run_dir.join("qemu.pid");
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // QEMU runs in its run dir (and names its pidfile relative to it).
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    (cwd == run_dir && String::from_utf8_lossy(&cmdline).contains("-pidfile")).then_some(pid)
}

pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(str::to_string))
        })
        .is_some_and(|state| state != "Z" && state != "X")
}

impl Drop for QemuReaper {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.state_dir.join("vms")) else {
            return;
        };
        for e in entries.flatten() {
            if let Some(pid) = qemu_pid(&e.path()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// What the fake center saw.
#[derive(Default)]
pub struct CenterLog {
    pub registrations: Vec<RegisterHost>,
    pub heartbeats: Vec<Heartbeat>,
    /// Registrations refused with 404 (cluster missing) before one is accepted.
    pub refuse_cluster: u32,
    /// Answer heartbeats with 404, as a center whose data was wiped.
    pub forget_hosts: bool,
    pub host_token: String,
    pub enrol_token: String,
    pub host_id: Uuid,
}

/// An axum server on 127.0.0.1 that plays the center's registration and heartbeat API.
#[derive(Clone)]
pub struct FakeCenter {
    pub url: String,
    pub log: Arc<Mutex<CenterLog>>,
}

fn bearer(h: &HeaderMap) -> String {
    h.get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string()
}

type Answer<T> = Result<Json<T>, (StatusCode, Json<ErrorBody>)>;

fn refuse<T>(status: StatusCode, msg: &str) -> Answer<T> {
    Err((
        status,
        Json(ErrorBody {
            error: msg.to_string(),
        }),
    ))
}

async fn register(
    State(log): State<Arc<Mutex<CenterLog>>>,
    headers: HeaderMap,
    Json(body): Json<RegisterHost>,
) -> Answer<Registered> {
    let mut l = log.lock().expect("center log");
    if bearer(&headers) != l.enrol_token {
        return refuse(StatusCode::UNAUTHORIZED, "bad enrolment token");
    }
    if l.refuse_cluster > 0 {
        l.refuse_cluster -= 1;
        return refuse(StatusCode::NOT_FOUND, "no such cluster");
    }
    l.forget_hosts = false;
    l.host_token = format!("host-{}", Uuid::new_v4());
    l.registrations.push(body);
    Ok(Json(Registered {
        host_id: l.host_id,
        host_token: l.host_token.clone(),
        heartbeat_interval_ms: 300,
        certificate: None,
        ca: None,
    }))
}

async fn heartbeat(
    State(log): State<Arc<Mutex<CenterLog>>>,
    UrlPath(id): UrlPath<Uuid>,
    headers: HeaderMap,
    Json(body): Json<Heartbeat>,
) -> Answer<()> {
    let mut l = log.lock().expect("center log");
    if l.forget_hosts || id != l.host_id {
        return refuse(StatusCode::NOT_FOUND, "no such host");
    }
    if bearer(&headers) != l.host_token {
        return refuse(StatusCode::UNAUTHORIZED, "bad host token");
    }
    l.heartbeats.push(body);
    Ok(Json(()))
}

impl FakeCenter {
    pub async fn start(enrol_token: &str) -> FakeCenter {
        let log = Arc::new(Mutex::new(CenterLog {
            enrol_token: enrol_token.to_string(),
            host_id: Uuid::new_v4(),
            ..CenterLog::default()
        }));
        let app = Router::new()
            .route("/api/v1/hosts/register", post(register))
            .route("/api/v1/hosts/{id}/heartbeat", post(heartbeat))
            .with_state(log.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake center");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeCenter {
            url: format!("http://{addr}"),
            log,
        }
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut CenterLog) -> T) -> T {
        f(&mut self.log.lock().expect("center log"))
    }
}
