//! The center's own benchmark (run by `bench/center/run.sh`, ignored in the suite): API write
//! latency and throughput and the time to get a working leader back after the leader dies,
//! with the embedded SQLite store against an HA group of three centers on a three-member
//! etcd, each under 1,000 simulated hosts heartbeating every 2 s; the center's CPU and memory
//! meanwhile. Prints one table; SQLite, measured in the same run, is the baseline of every
//! ratio.
//!
//! Simulated hosts register and heartbeat over the real API (the same requests an agent
//! sends); the centers serve plain HTTP so that the client's TLS does not weigh on two
//! cores (the same for both stores).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::etcd::{free_port, EtcdCluster};
use common::tern_exe;
use tern_api::center::{CreateCluster, CreateVm, Heartbeat, RegisterHost, Registered};
use tern_api::routes::center as route;
use tern_api::{ApiClient, BootSource, CenterClient, Endpoint, HostLoad, NicSpec, VmSpec};
use tern_testkit::wait::wait_for;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Center {
    name: String,
    port: u16,
    child: Option<Child>,
}

impl Center {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Center {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn start_center(root: &Path, name: &str, port: u16, etcd: Option<&EtcdCluster>) -> Center {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("data dir");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join(format!("{name}.log")))
        .expect("log");
    let mut cmd = Command::new(tern_exe());
    cmd.arg("center")
        .arg("--data-dir")
        .arg(&dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--admin-token-file")
        .arg(root.join("admin.token"))
        .arg("--enrol-token-file")
        .arg(root.join("enrol.token"))
        .args(["--insecure-http", "--shared-enrolment"]);
    if let Some(e) = etcd {
        cmd.args(["--ha-name", name])
            .args(["--advertise-url", &format!("http://127.0.0.1:{port}")]);
        for u in e.endpoints() {
            cmd.args(["--etcd", &u]);
        }
    }
    let child = cmd
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start tern center");
    let sock = dir.join("center.sock");
    wait_for(&format!("{name} to serve"), Duration::from_secs(60), || {
        sock.exists().then_some(())
    });
    Center {
        name: name.into(),
        port,
        child: Some(child),
    }
}

fn token(root: &Path, file: &str) -> String {
    wait_for(file, Duration::from_secs(10), || {
        std::fs::read_to_string(root.join(file))
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    })
}

fn api(url: &str, token: &str) -> ApiClient {
    ApiClient::with_timeout(Endpoint::Tcp(url.into()), token, Duration::from_secs(30))
        .expect("client")
}

fn spec(i: u64) -> VmSpec {
    VmSpec {
        firmware: Default::default(),
        cloud_init: None,
        resources: Default::default(),
        name: format!("b{i}"),
        vcpus: 1,
        memory_mib: 128,
        cpu_model: None,
        boot: BootSource::Kernel {
            kernel: "/shared/vmlinuz".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
        },
        disks: vec![],
        nics: vec![NicSpec {
            mac: format!(
                "52:54:01:{:02x}:{:02x}:{:02x}",
                (i >> 16) & 0xff,
                (i >> 8) & 0xff,
                i & 0xff
            ),
        }],
    }
}

/// (utime + stime in clock ticks, RSS in KiB) of a process.
fn cpu_and_rss(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (ticks, rss)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[derive(Debug, Default, Clone)]
struct Row {
    store: String,
    heartbeats_per_s: f64,
    heartbeat_failures: u64,
    cpu_percent: f64,
    rss_mib: f64,
    small_p50_ms: f64,
    small_p99_ms: f64,
    create_p50_ms: f64,
    create_p99_ms: f64,
    creates_per_s: f64,
    recover_s: f64,
    recover_how: String,
}

/// Which of the centers takes a VM create now; returns its index.
async fn try_create(centers: &[&Center], admin: &str, i: u64) -> Option<usize> {
    for (k, c) in centers.iter().enumerate() {
        if c.child.is_none() {
            continue;
        }
        let client = CenterClient::new(api(&c.url(), admin));
        let req = CreateVm {
            spec: spec(i),
            cluster: "bench".into(),
            host: None,
            image: None,
        };
        if client.create_vm(&req).await.is_ok() {
            return Some(k);
        }
    }
    None
}

async fn run_store(root: &Path, ha: bool, hosts: u64, window_s: u64) -> Row {
    let etcd = ha.then(|| EtcdCluster::start(root, 3));
    let names: &[&str] = if ha { &["c1", "c2", "c3"] } else { &["c1"] };
    let mut centers: Vec<Center> = Vec::new();
    for n in names {
        centers.push(start_center(root, n, free_port(), etcd.as_ref()));
    }
    let admin = token(root, "admin.token");
    let enrol = token(root, "enrol.token");
    // The first center leads (it started alone).
    let leader_url = centers[0].url();
    let client = CenterClient::new(api(&leader_url, &admin));
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .create_cluster(&CreateCluster {
            name: "bench".into(),
            evc_mode: None,
            migration_encryption: None,
        })
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "no center takes changes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every simulated host's agent is one stand-in that finds every file (a VM create asks
    // the chosen host whether the VM's files are there).
    let agent_url = fake_agent().await;
    // Hosts join (16 at a time), then heartbeat every 2 s, spread over the period.
    let register = api(&leader_url, &enrol);
    let mut regs: Vec<Registered> = Vec::new();
    for chunk in (0..hosts).collect::<Vec<_>>().chunks(16) {
        let calls = chunk.iter().map(|i| {
            let (register, agent_url) = (register.clone(), agent_url.clone());
            async move {
                let body = RegisterHost {
                    name: format!("sim{i}"),
                    cluster: "bench".into(),
                    agent_url: agent_url.clone(),
                    agent_token: "x".into(),
                    facts: tern_testkit::fixtures::host_facts(32, 262_144),
                    csr: None,
                };
                register
                    .post::<_, Registered>(&route::HOST_REGISTER.path(), &body)
                    .await
                    .expect("register a simulated host")
            }
        });
        regs.extend(futures::future::join_all(calls).await);
    }
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let urls: Vec<String> = centers.iter().map(Center::url).collect();
    let stop = tokio_util_stop();
    let mut beats = Vec::new();
    for (k, reg) in regs.into_iter().enumerate() {
        let (ok, failed, urls, stop) = (ok.clone(), failed.clone(), urls.clone(), stop.clone());
        beats.push(tokio::spawn(async move {
            let offset = Duration::from_millis((k as u64 * 2000) / hosts.max(1));
            tokio::time::sleep(offset).await;
            let mut at = 0usize;
            let body = Heartbeat {
                facts: tern_testkit::fixtures::host_facts(32, 262_144),
                load: HostLoad {
                    cpu_percent: 10.0,
                    memory_used_mib: 1024,
                    memory_total_mib: 262_144,
                    vms: vec![],
                },
                health: None,
            };
            let path = route::HOST_HEARTBEAT.with_id(reg.host_id);
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let c = api(&urls[at % urls.len()], &reg.host_token);
                match c.post::<_, serde_json::Value>(&path, &body).await {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    // Like an agent: the next center of the group.
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        at += 1;
                    }
                }
            }
        }));
    }
    // Warm up, then the window: the heartbeat rate and the leader's CPU and memory.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let pid = centers[0].pid();
    let (t0, _) = cpu_and_rss(pid);
    let ok0 = ok.load(Ordering::Relaxed);
    let failed0 = failed.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(window_s)).await;
    let secs = started.elapsed().as_secs_f64();
    let (t1, rss) = cpu_and_rss(pid);
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let mut row = Row {
        store: if ha {
            "etcd (3 centers, 3 members)".into()
        } else {
            "SQLite (1 center)".into()
        },
        heartbeats_per_s: (ok.load(Ordering::Relaxed) - ok0) as f64 / secs,
        heartbeat_failures: failed.load(Ordering::Relaxed) - failed0,
        cpu_percent: (t1 - t0) as f64 / ticks / secs * 100.0,
        rss_mib: rss as f64 / 1024.0,
        ..Row::default()
    };

    // Latency: one create after another.
    let n_seq = env_or("TERN_BENCH_CREATES", 200);
    let mut lat = Vec::new();
    for i in 0..n_seq {
        let req = CreateVm {
            spec: spec(i),
            cluster: "bench".into(),
            host: None,
            image: None,
        };
        let t = Instant::now();
        client.create_vm(&req).await.expect("create a VM");
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    row.create_p50_ms = percentile(&lat, 0.5);
    row.create_p99_ms = percentile(&lat, 0.99);
    // A write with no placement: the store's own cost (a cluster and its event).
    let mut lat = Vec::new();
    for i in 0..n_seq {
        let t = Instant::now();
        client
            .create_cluster(&CreateCluster {
                name: format!("k{i}"),
                evc_mode: None,
                migration_encryption: None,
            })
            .await
            .expect("create a cluster");
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    row.small_p50_ms = percentile(&lat, 0.5);
    row.small_p99_ms = percentile(&lat, 0.99);
    // Throughput: 8 clients at once.
    let n_par = n_seq * 2;
    let t = Instant::now();
    let workers = (0..8u64).map(|w| {
        let client = client.clone();
        async move {
            let mut i = n_seq + w;
            while i < n_seq + n_par {
                let req = CreateVm {
                    spec: spec(i),
                    cluster: "bench".into(),
                    host: None,
                    image: None,
                };
                client.create_vm(&req).await.expect("create a VM");
                i += 8;
            }
        }
    });
    futures::future::join_all(workers).await;
    row.creates_per_s = n_par as f64 / t.elapsed().as_secs_f64();

    // The leader dies (SIGKILL). SQLite: its service manager starts it again; etcd: another
    // center takes over. Recovered = the next VM create succeeds.
    let next = n_seq + n_par;
    let killed = Instant::now();
    centers[0].kill9();
    row.recover_how = if ha {
        "another center takes over (lease 15 s)".into()
    } else {
        // As systemd would, at once.
        let port = centers[0].port;
        centers[0] = start_center(root, "c1", port, None);
        "the center restarts (as systemd would)".into()
    };
    let refs: Vec<&Center> = centers.iter().collect();
    while try_create(&refs, &admin, next).await.is_none() {
        assert!(
            killed.elapsed() < Duration::from_secs(120),
            "no center takes changes after the leader died"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    row.recover_s = killed.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for b in beats {
        b.abort();
    }
    for c in &mut centers {
        eprintln!("{}: done", c.name);
        c.kill9();
    }
    drop(etcd);
    row
}

/// A stand-in agent on loopback: every path of the file check is there; any other call gets
/// an empty JSON list. One request per connection. Returns its URL.
async fn fake_agent() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                let mut n = 0;
                // Headers, then as much body as Content-Length says.
                loop {
                    match s.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => n += k,
                    }
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .and_then(|v| v.trim().parse::<usize>().ok())
                            })
                            .unwrap_or(0);
                        if n >= end + 4 + len || n == buf.len() {
                            break;
                        }
                    }
                }
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let body = if head.contains("check-paths") {
                    r#"{"missing":[],"outside_shared_storage":[],"unreachable":[]}"#
                } else {
                    "[]"
                };
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    url
}

fn tokio_util_stop() -> Arc<std::sync::atomic::AtomicBool> {
    Arc::new(std::sync::atomic::AtomicBool::new(false))
}

#[test]
#[ignore = "a benchmark: bench/center/run.sh"]
fn center_store_benchmark() {
    let hosts = env_or("TERN_BENCH_HOSTS", 1000);
    let window = env_or("TERN_BENCH_WINDOW_S", 20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut rows = Vec::new();
    // TERN_BENCH_STORES=sqlite (or etcd) runs one store alone (profiling).
    let stores = std::env::var("TERN_BENCH_STORES").unwrap_or_else(|_| "sqlite,etcd".into());
    for ha in [false, true] {
        if !stores
            .split(',')
            .any(|s| s == if ha { "etcd" } else { "sqlite" })
        {
            continue;
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let root: PathBuf = tmp.path().to_path_buf();
        rows.push(rt.block_on(run_store(&root, ha, hosts, window)));
    }
    let Some(base) = rows.first().cloned() else {
        panic!("TERN_BENCH_STORES names no store (sqlite, etcd)");
    };
    println!();
    println!(
        "center store benchmark: {hosts} simulated hosts heartbeating every 2 s; VM creates placed by the center"
    );
    println!();
    println!("| store | heartbeats/s (failed) | leader CPU % | leader RSS MiB | cluster create p50 / p99 ms | VM create p50 ms | VM create p99 ms | VM creates/s (8 clients) | leader back after | how |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.0} ({}) | {:.0} | {:.0} | {:.1} / {:.1} ({:.2}×) | {:.1} ({:.2}×) | {:.1} ({:.2}×) | {:.0} ({:.2}×) | {:.1} s | {} |",
            r.store,
            r.heartbeats_per_s,
            r.heartbeat_failures,
            r.cpu_percent,
            r.rss_mib,
            r.small_p50_ms,
            r.small_p99_ms,
            r.small_p50_ms / base.small_p50_ms,
            r.create_p50_ms,
            r.create_p50_ms / base.create_p50_ms,
            r.create_p99_ms,
            r.create_p99_ms / base.create_p99_ms,
            r.creates_per_s,
            r.creates_per_s / base.creates_per_s,
            r.recover_s,
            r.recover_how
        );
    }
    for r in &rows {
        assert!(r.heartbeats_per_s > 0.0, "no heartbeat went through: {r:?}");
    }
}
