//! A real etcd cluster for HA tests: members as child processes on loopback ports, each in
//! its own data directory under the test's temporary directory; killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tern_testkit::wait::wait_for;

/// A free loopback TCP port (bound, then released for the child to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

pub struct Member {
    pub name: String,
    pub client_url: String,
    peer_url: String,
    dir: PathBuf,
    child: Option<Child>,
}

pub struct EtcdCluster {
    pub members: Vec<Member>,
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster answers.
    pub fn start(dir: &Path, n: usize) -> EtcdCluster {
        let mut members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_url: format!("http://127.0.0.1:{}", free_port()),
                peer_url: format!("http://127.0.0.1:{}", free_port()),
                dir: dir.join(format!("etcd-m{i}")),
                child: None,
            })
            .collect();
        let initial: Vec<String> = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect();
        let initial = initial.join(",");
        for m in &mut members {
            m.spawn(&initial);
        }
        let c = EtcdCluster { members };
        c.wait_healthy(Duration::from_secs(30));
        c
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    fn live_endpoints(&self) -> String {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.client_url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until the running members agree on a leader.
    pub fn wait_healthy(&self, timeout: Duration) {
        wait_for("etcd to elect a leader", timeout, || {
            self.leader_index().map(|_| ())
        });
    }

    /// Which member leads (by `etcdctl endpoint status`).
    pub fn leader_index(&self) -> Option<usize> {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &self.live_endpoints(),
                "endpoint",
                "status",
                "-w",
                "json",
            ])
            .args(["--command-timeout", "2s"])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let status: Value = serde_json::from_slice(&out.stdout).ok()?;
        let leader = status
            .as_array()?
            .iter()
            .find_map(|s| s["Status"]["leader"].as_u64().filter(|l| *l != 0))?;
        let endpoint = status
            .as_array()?
            .iter()
            .find(|s| s["Status"]["header"]["member_id"].as_u64() == Some(leader))?["Endpoint"]
            .as_str()?
            .to_string();
        self.members.iter().position(|m| m.client_url == endpoint)
    }

    /// Kills member `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Member {
    fn spawn(&mut self, initial: &str) {
        std::fs::create_dir_all(&self.dir).expect("etcd data dir");
        let log = std::fs::File::create(self.dir.with_extension("log")).expect("etcd log");
        let child = Command::new("etcd")
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &self.client_url])
            .args(["--advertise-client-urls", &self.client_url])
            .args(["--listen-peer-urls", &self.peer_url])
            .args(["--initial-advertise-peer-urls", &self.peer_url])
            .args(["--initial-cluster", initial])
            .args(["--initial-cluster-token", "tern-test"])
            .args(["--initial-cluster-state", "new"])
            // Loopback members: fast heartbeats, so a lost leader is replaced within seconds.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd (installed by scripts/setup.sh)");
        self.child = Some(child);
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
