//! `<dir>/lab.json`: the record of everything a lab made, so `lab down` can remove every trace
//! and the CLI can find the lab's center.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// File name of the record inside the lab directory.
pub const STATE_FILE: &str = "lab.json";

/// A process the lab started, and how to start it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabProcess {
    /// `center` or `h<i>`.
    pub name: String,
    pub namespace: String,
    /// Arguments after the `tern` executable.
    pub args: Vec<String>,
    pub log: PathBuf,
    /// Pid of the running process (the `ip netns exec` process execs into `tern`).
    pub pid: Option<u32>,
    /// The program, when it is not the lab's `tern` (etcd members).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<PathBuf>,
}

/// One host of the lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabHost {
    /// `h<i>`.
    pub name: String,
    pub namespace: String,
    /// Management (and migration) address, `10.77.0.<10+i>`.
    pub mgmt_ip: String,
    /// Agent API URL the center calls.
    pub agent_url: String,
    /// Per-VM run directories live below it.
    pub state_dir: PathBuf,
    /// Name of the host's management veth peer in the fabric namespace (shaped and cut there).
    pub fabric_mgmt_link: String,
    pub agent: LabProcess,
}

/// The lab's SAN (see `lab::san`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabSan {
    /// tgtd, in the storage namespace.
    pub process: LabProcess,
    /// tgtd's control port (`tgtadm -C`).
    pub control_port: u32,
    /// The exported LUNs, as a VM's disk names them (`iscsi://10.79.0.2:3260/IQN/N`).
    pub luns: Vec<String>,
}

/// Guest image files copied into shared storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabGuest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Everything `lab up` made. Written after every step, so a crash leaves a usable record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabState {
    pub prefix: String,
    pub dir: PathBuf,
    /// The `tern` executable the lab's daemons run.
    pub exe: PathBuf,
    /// `tcg`, `kvm` or `auto`, given to every agent.
    pub accel: String,
    /// Namespaces created so far, in creation order.
    pub namespaces: Vec<String>,
    pub fabric_namespace: String,
    pub center_namespace: String,
    pub client_namespace: String,
    /// `http://10.77.0.2:8700` (reachable inside the lab only).
    pub center_url: String,
    /// Unix socket of the center's API (reachable from the root namespace).
    pub socket: PathBuf,
    pub admin_token_file: PathBuf,
    pub shared_dir: PathBuf,
    pub guest: Option<LabGuest>,
    pub center: Option<LabProcess>,
    /// HA labs (`lab up --ha`): the other centers of the group (`center2`, `center3`)…
    #[serde(default)]
    pub standbys: Vec<LabProcess>,
    /// …and the etcd members they share (`etcd1`…`etcd3`).
    #[serde(default)]
    pub etcd: Vec<LabProcess>,
    pub hosts: Vec<LabHost>,
    /// The SAN, when the lab has one.
    #[serde(default)]
    pub san: Option<LabSan>,
    /// The block LUNs' /dev/disk/by-id names (`tern-<prefix>-<n>`).
    #[serde(default)]
    pub block_luns: Vec<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

impl LabState {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// Where host `name`'s one-time join token is written for its agent's first start.
    pub fn join_token_file(&self, name: &str) -> PathBuf {
        self.dir.join("join").join(format!("{name}.token"))
    }

    /// Reads the record of the lab in `dir`; `Ok(None)` when there is none.
    pub fn load(dir: &Path) -> anyhow::Result<Option<LabState>> {
        let path = Self::path(dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let state = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a lab record", path.display()))?;
        Ok(Some(state))
    }

    /// Writes the record atomically (temp file + rename).
    pub fn save(&self) -> anyhow::Result<()> {
        let path = Self::path(&self.dir);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Every process the lab started (centers first, etcd members after the hosts).
    pub fn processes(&self) -> impl Iterator<Item = &LabProcess> {
        self.center
            .iter()
            .chain(self.standbys.iter())
            .chain(self.hosts.iter().map(|h| &h.agent))
            .chain(self.etcd.iter())
    }

    /// The socket of center `name` (`center`, `center2`…).
    pub fn center_socket(&self, name: &str) -> PathBuf {
        if name == "center" {
            self.socket.clone()
        } else {
            self.dir.join(name).join("center.sock")
        }
    }

    pub fn admin_token(&self) -> anyhow::Result<String> {
        read_token(&self.admin_token_file)
    }

    pub fn host(&self, name: &str) -> Option<&LabHost> {
        self.hosts.iter().find(|h| h.name == name)
    }
}

/// Reads a one-line token file.
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    let t = std::fs::read_to_string(path)
        .with_context(|| format!("reading token file {}", path.display()))?;
    Ok(t.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_missing_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(LabState::load(dir.path()).expect("load"), None);
        let st = LabState {
            prefix: "t".into(),
            dir: dir.path().to_path_buf(),
            exe: "/bin/tern".into(),
            accel: "tcg".into(),
            namespaces: vec!["t-fab".into()],
            fabric_namespace: "t-fab".into(),
            center_namespace: "t-center".into(),
            client_namespace: "t-client".into(),
            center_url: "http://10.77.0.2:8700".into(),
            socket: dir.path().join("center/center.sock"),
            admin_token_file: dir.path().join("admin.token"),
            shared_dir: dir.path().join("shared"),
            guest: None,
            center: Some(LabProcess {
                name: "center".into(),
                namespace: "t-center".into(),
                args: vec!["center".into()],
                log: dir.path().join("logs/center.log"),
                pid: Some(42),
                exe: None,
            }),
            standbys: Vec::new(),
            etcd: Vec::new(),
            hosts: Vec::new(),
            created_at: chrono::Utc::now(),
            san: None,
            block_luns: Vec::new(),
        };
        st.save().expect("save");
        assert_eq!(LabState::load(dir.path()).expect("load"), Some(st));
        std::fs::write(LabState::path(dir.path()), "{").expect("write");
        assert!(LabState::load(dir.path()).is_err());
    }
}
