//! Probing what this host's QEMU offers, without a VM: version, CPU models and the host's
//! CPU features under the chosen accelerator (what EVC compares baselines against).
//!
//! A probe is a `qemu -machine none` child process with a QMP socket in a temporary
//! directory; it is killed when the [`QemuProbe`] is dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tern_api::Accelerator;

use crate::error::{Error, Result};
use crate::migration::CpuExpansion;
use crate::qmp::{QemuVersion, Qmp};

const PROBE_START_TIMEOUT: Duration = Duration::from_secs(20);

/// A CPU model as this QEMU knows it (QMP `query-cpu-definitions`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuModelInfo {
    pub name: String,
    /// Features of the model this host cannot provide under the probe's accelerator; empty
    /// means the model runs here (with `enforce`).
    pub unavailable_features: Vec<String>,
    /// The model is the same on every host (not `host`/`max`).
    pub migration_safe: bool,
    pub deprecated: bool,
    /// Versioned model this name points to (`Haswell` → `Haswell-v1`).
    pub alias_of: Option<String>,
}

impl CpuModelInfo {
    pub fn runnable(&self) -> bool {
        self.unavailable_features.is_empty()
    }
}

/// What [`probe_cpu`] found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuProbe {
    pub qemu_version: QemuVersion,
    pub accel: Accelerator,
    /// The model whose full expansion is the host's capability: `host` under KVM, `max`
    /// under TCG.
    pub host_model: String,
    /// Boolean properties of that expansion: CPUID features in QEMU's names (`sse4.2`,
    /// `avx2`…) with whether the host can give them, plus some non-feature switches
    /// (`check`, `enforce`, `hv-*`…) that callers comparing features should ignore.
    pub host_features: BTreeMap<String, bool>,
    pub models: Vec<CpuModelInfo>,
}

/// A running `-machine none` QEMU for queries.
pub struct QemuProbe {
    child: tokio::process::Child,
    qmp: Qmp,
    accel: Accelerator,
    _dir: TempDir,
}

/// A private temporary directory, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl QemuProbe {
    /// Starts the probe QEMU.
    pub async fn start(qemu_binary: &Path, accel: Accelerator) -> Result<QemuProbe> {
        let dir = std::env::temp_dir().join(format!(
            "tern-qemu-probe-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let dir = TempDir(dir);
        let socket = dir.0.join("qmp.sock");
        let log = dir.0.join("stderr.log");
        let stderr = std::fs::File::create(&log)
            .map_err(|e| Error::io(format!("create {}", log.display()), e))?;
        let mut child = tokio::process::Command::new(qemu_binary)
            .args([
                "-machine",
                "none",
                "-accel",
                &accel.to_string(),
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-chardev",
                &format!(
                    "socket,id=qmp,path={},server=on,wait=off",
                    socket.to_string_lossy().replace(',', ",,")
                ),
                "-mon",
                "chardev=qmp,mode=control",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::io(format!("run {}", qemu_binary.display()), e))?;
        let deadline = Instant::now() + PROBE_START_TIMEOUT;
        let qmp = loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::Launch {
                    status: status.to_string(),
                    stderr_tail: crate::vm::log_tail(&log),
                });
            }
            match Qmp::connect(&socket).await {
                Ok(qmp) => break qmp,
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        Ok(QemuProbe {
            child,
            qmp,
            accel,
            _dir: dir,
        })
    }

    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    pub fn version(&self) -> QemuVersion {
        self.qmp.greeting().version
    }

    /// Every CPU model and whether it runs here.
    pub async fn cpu_definitions(&self) -> Result<Vec<CpuModelInfo>> {
        let v = self.qmp.execute("query-cpu-definitions", None).await?;
        let list = v
            .as_array()
            .ok_or_else(|| Error::Protocol(format!("query-cpu-definitions answered {v}")))?;
        Ok(list
            .iter()
            .filter_map(|d| {
                Some(CpuModelInfo {
                    name: d["name"].as_str()?.to_string(),
                    unavailable_features: d["unavailable-features"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|f| f.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default(),
                    migration_safe: d["migration-safe"].as_bool().unwrap_or(false),
                    deprecated: d["deprecated"].as_bool().unwrap_or(false),
                    alias_of: d["alias-of"].as_str().map(str::to_string),
                })
            })
            .collect())
    }

    /// `query-cpu-model-expansion` of `model` (see [`crate::QemuVm::query_cpu_model_expansion`]).
    pub async fn expand_cpu_model(&self, model: &str, expansion: CpuExpansion) -> Result<Value> {
        self.qmp
            .execute(
                "query-cpu-model-expansion",
                Some(json!({ "type": expansion, "model": { "name": model } })),
            )
            .await
    }

    /// The boolean properties of a model's full expansion.
    pub async fn cpu_features(&self, model: &str) -> Result<BTreeMap<String, bool>> {
        let v = self.expand_cpu_model(model, CpuExpansion::Full).await?;
        let props = v["model"]["props"].as_object().ok_or_else(|| {
            Error::Protocol(format!("expansion of {model} has no properties: {v}"))
        })?;
        Ok(props
            .iter()
            .filter_map(|(k, v)| v.as_bool().map(|b| (k.clone(), b)))
            .collect())
    }

    /// Asks QEMU to quit and waits for it (dropping the probe kills it instead).
    pub async fn stop(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.qmp.execute("quit", None)).await;
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Probes QEMU's version, its CPU models and the host CPU's features under `accel`.
pub async fn probe_cpu(qemu_binary: &Path, accel: Accelerator) -> Result<CpuProbe> {
    let probe = QemuProbe::start(qemu_binary, accel).await?;
    let host_model = match probe.accel {
        Accelerator::Kvm => "host",
        Accelerator::Tcg => "max",
    };
    let result = async {
        Ok(CpuProbe {
            qemu_version: probe.version(),
            accel,
            host_model: host_model.to_string(),
            host_features: probe.cpu_features(host_model).await?,
            models: probe.cpu_definitions().await?,
        })
    }
    .await;
    probe.stop().await;
    result
}
