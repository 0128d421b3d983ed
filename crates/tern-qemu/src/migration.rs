//! Migration control and statistics over QMP: the data path tern's live migration drives.
//!
//! A migration in tern: the destination starts with the same spec and `-incoming defer`;
//! both sides get the same capabilities and parameters; the destination listens
//! ([`QemuVm::migrate_incoming`]); the source sends ([`QemuVm::migrate`]) and is polled with
//! [`QemuVm::query_migrate`] (or watched through `MIGRATION`/`MIGRATION_PASS` events when the
//! `events` capability is on). A destination started with `-S` stays paused after the
//! memory is in, until `cont`.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::vm::QemuVm;
use tern_motion::{PrecopySample, SamplePhase};

/// Pages per GiB QEMU hashes to find the dirty rate (its default is 512). A short window sees
/// few of them change (64 MiB/s over 250 ms touches 1.6% of a GiB: 8 of 512 pages), so tern
/// samples 8× more: hashing 4096 pages twice is still well under a millisecond.
pub const DIRTY_SAMPLE_PAGES_PER_GIB: u32 = 4096;

/// How many of a receive ring's newest buffers [`QemuVm::receive_ring_tail`] reports: a
/// 64 KiB frame in buffers of 1.5 KiB (the smallest a Linux guest gives) takes 44.
pub const RING_TAIL_BUFFERS: u64 = 48;

/// The newest end of a virtio-net receive ring, as a stopped guest left it
/// ([`QemuVm::receive_ring_tail`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiveRingTail {
    /// The bytes the NIC wrote into each of its newest buffers, oldest first (at most
    /// [`RING_TAIL_BUFFERS`]; slots the NIC never filled read as 0).
    pub used_lens: Vec<u32>,
    /// The start of the newest buffer; empty when the guest has already given that buffer
    /// back and put a fresh one where it was (its bytes are then out of reach).
    pub last_buffer: Vec<u8>,
}

/// Status of a migration (QMP `MigrationStatus`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum MigrationStatus {
    /// No migration has started.
    None,
    Setup,
    Cancelling,
    Cancelled,
    /// Pre-copy in progress.
    Active,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecoverSetup,
    PostcopyRecover,
    Completed,
    Failed,
    Colo,
    /// Paused before switchover (capability `pause-before-switchover`), waiting for
    /// `migrate-continue`.
    PreSwitchover,
    /// Migrating device state after RAM.
    Device,
    WaitUnplug,
    /// A status this crate does not know.
    Other(String),
}

impl From<String> for MigrationStatus {
    fn from(s: String) -> Self {
        match s.as_str() {
            "none" => Self::None,
            "setup" => Self::Setup,
            "cancelling" => Self::Cancelling,
            "cancelled" => Self::Cancelled,
            "active" => Self::Active,
            "postcopy-active" => Self::PostcopyActive,
            "postcopy-paused" => Self::PostcopyPaused,
            "postcopy-recover-setup" => Self::PostcopyRecoverSetup,
            "postcopy-recover" => Self::PostcopyRecover,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "colo" => Self::Colo,
            "pre-switchover" => Self::PreSwitchover,
            "device" => Self::Device,
            "wait-unplug" => Self::WaitUnplug,
            _ => Self::Other(s),
        }
    }
}

impl From<MigrationStatus> for String {
    fn from(s: MigrationStatus) -> String {
        s.as_str().to_string()
    }
}

impl MigrationStatus {
    pub fn as_str(&self) -> &str {
        match self {
            Self::None => "none",
            Self::Setup => "setup",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
            Self::Active => "active",
            Self::PostcopyActive => "postcopy-active",
            Self::PostcopyPaused => "postcopy-paused",
            Self::PostcopyRecoverSetup => "postcopy-recover-setup",
            Self::PostcopyRecover => "postcopy-recover",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Colo => "colo",
            Self::PreSwitchover => "pre-switchover",
            Self::Device => "device",
            Self::WaitUnplug => "wait-unplug",
            Self::Other(s) => s,
        }
    }

    /// True when the migration has ended, well or not.
    pub fn is_finished(&self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

impl std::fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot of a migration (QMP `query-migrate`), on either side.
///
/// Byte counts are RAM only. Time fields are `None` until QEMU reports them (e.g.
/// `downtime_ms` only once completed, `expected_downtime_ms` only while active).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationStats {
    pub status: MigrationStatus,
    pub total_bytes: u64,
    pub remaining_bytes: u64,
    pub transferred_bytes: u64,
    /// Guest pages dirtied per second, as measured during the last pass.
    pub dirty_pages_rate: u64,
    pub page_size_bytes: u64,
    /// Throughput of the migration stream, megabits per second.
    pub mbps: f64,
    /// Number of dirty-bitmap syncs: 1 + the number of RAM passes done.
    pub dirty_sync_count: u64,
    pub expected_downtime_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub total_time_ms: Option<u64>,
    pub setup_time_ms: Option<u64>,
    /// Auto-converge throttle applied to the guest's vCPUs.
    pub cpu_throttle_percent: Option<u64>,
    pub precopy_bytes: u64,
    pub postcopy_bytes: u64,
    pub downtime_bytes: u64,
    pub multifd_bytes: u64,
    /// Guest bytes sent as whole pages (not zero pages), before compression.
    pub normal_bytes: u64,
    /// Why the migration failed, when it did.
    pub error: Option<String>,
    /// Where an incoming migration listens (`tcp:127.0.0.1:4444`): with port 0 in the URI,
    /// this is how the chosen port is learnt.
    pub socket_addresses: Vec<String>,
}

impl MigrationStats {
    /// What the convergence watcher (`tern-motion`) needs of this sample.
    pub fn precopy_sample(&self) -> PrecopySample {
        let phase = match self.status {
            MigrationStatus::None | MigrationStatus::Setup => SamplePhase::Setup,
            MigrationStatus::Active => SamplePhase::PreCopy,
            MigrationStatus::PostcopyActive
            | MigrationStatus::PostcopyPaused
            | MigrationStatus::PostcopyRecover
            | MigrationStatus::PostcopyRecoverSetup => SamplePhase::PostCopy,
            _ => SamplePhase::Past,
        };
        PrecopySample {
            phase,
            pass: self.dirty_sync_count,
            remaining_bytes: self.remaining_bytes,
            dirty_bytes_per_s: self.dirty_pages_rate as f64 * self.page_size_bytes.max(1) as f64,
            sent_mbit_s: self.mbps,
            // Multifd counts its pages in normal-bytes and its (compressed) packets in
            // multifd-bytes; without multifd there is no compression to account for.
            compression: if self.multifd_bytes > 0 && self.normal_bytes > 0 {
                self.normal_bytes as f64 / self.multifd_bytes as f64
            } else {
                1.0
            },
            expected_downtime_ms: self.expected_downtime_ms.unwrap_or(0),
            cpu_throttle_pct: self.cpu_throttle_percent.unwrap_or(0),
        }
    }

    /// Decodes a `query-migrate` answer; missing fields read as zero/none.
    pub fn from_qmp(v: &Value) -> MigrationStats {
        let ram = &v["ram"];
        let u = |x: &Value| x.as_u64().unwrap_or(0);
        let opt = |x: &Value| x.as_u64();
        MigrationStats {
            status: v["status"]
                .as_str()
                .map(|s| MigrationStatus::from(s.to_string()))
                .unwrap_or(MigrationStatus::None),
            total_bytes: u(&ram["total"]),
            remaining_bytes: u(&ram["remaining"]),
            transferred_bytes: u(&ram["transferred"]),
            dirty_pages_rate: u(&ram["dirty-pages-rate"]),
            page_size_bytes: u(&ram["page-size"]),
            mbps: ram["mbps"].as_f64().unwrap_or(0.0),
            dirty_sync_count: u(&ram["dirty-sync-count"]),
            expected_downtime_ms: opt(&v["expected-downtime"]),
            downtime_ms: opt(&v["downtime"]),
            total_time_ms: opt(&v["total-time"]),
            setup_time_ms: opt(&v["setup-time"]),
            cpu_throttle_percent: opt(&v["cpu-throttle-percentage"]),
            precopy_bytes: u(&ram["precopy-bytes"]),
            postcopy_bytes: u(&ram["postcopy-bytes"]),
            downtime_bytes: u(&ram["downtime-bytes"]),
            multifd_bytes: u(&ram["multifd-bytes"]),
            normal_bytes: u(&ram["normal-bytes"]),
            error: v["error-desc"].as_str().map(str::to_string),
            socket_addresses: v["socket-address"]
                .as_array()
                .map(|a| a.iter().filter_map(socket_address_uri).collect())
                .unwrap_or_default(),
        }
    }
}

/// QAPI `SocketAddress` → migration URI.
fn socket_address_uri(a: &Value) -> Option<String> {
    match a["type"].as_str()? {
        "inet" => {
            let host = a["host"].as_str()?;
            let port = a["port"].as_str()?;
            if host.contains(':') {
                Some(format!("tcp:[{host}]:{port}"))
            } else {
                Some(format!("tcp:{host}:{port}"))
            }
        }
        "unix" => Some(format!("unix:{}", a["path"].as_str()?)),
        "fd" => Some(format!("fd:{}", a["str"].as_str()?)),
        _ => None,
    }
}

/// State of a dirty-rate measurement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirtyRateStatus {
    Unstarted,
    Measuring,
    Measured,
}

/// Result of `calc-dirty-rate` (QMP `query-dirty-rate`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DirtyRate {
    pub status: DirtyRateStatus,
    /// Guest memory dirtied per second (QEMU calls the unit "MB/s"; it counts MiB). Set once
    /// measured.
    pub dirty_rate_mib_per_s: Option<u64>,
    pub calc_time_s: u64,
    /// `page-sampling`, `dirty-bitmap` or `dirty-ring`.
    pub mode: String,
}

/// Parameters of `announce-self`: self-announcements (RARP / gratuitous ARP and the virtio
/// guest announce) sent so the LAN learns the VM's new switch port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceParams {
    /// Delay before the first round.
    pub initial_ms: u64,
    /// Longest delay between rounds.
    pub max_ms: u64,
    pub rounds: u64,
    /// Increase of the delay after each round.
    pub step_ms: u64,
}

impl Default for AnnounceParams {
    /// QEMU's own defaults.
    fn default() -> Self {
        AnnounceParams {
            initial_ms: 50,
            max_ms: 550,
            rounds: 5,
            step_ms: 100,
        }
    }
}

/// Kind of CPU model expansion (QMP `CpuModelExpansionType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuExpansion {
    /// A migration-safe base model plus every property that differs from it.
    Static,
    /// The model with every property it has, as on this host and accelerator.
    Full,
}

impl QemuVm {
    /// Turns migration capabilities on or off (`migrate-set-capabilities`), e.g.
    /// `[("events", true), ("multifd", true)]`. Both sides need the same set.
    pub async fn set_migration_capabilities(&self, caps: &[(&str, bool)]) -> Result<()> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(name, on)| json!({"capability": name, "state": on}))
            .collect();
        self.qmp()
            .execute(
                "migrate-set-capabilities",
                Some(json!({ "capabilities": list })),
            )
            .await
            .map(drop)
    }

    /// The capabilities and whether each is on (`query-migrate-capabilities`).
    pub async fn migration_capabilities(&self) -> Result<Vec<(String, bool)>> {
        let v = self
            .qmp()
            .execute("query-migrate-capabilities", None)
            .await?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| {
                        Some((c["capability"].as_str()?.to_string(), c["state"].as_bool()?))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Sets migration parameters (`migrate-set-parameters`) from a JSON object in QEMU's
    /// names, e.g. `{"max-bandwidth": 125000000, "downtime-limit": 300, "multifd-channels": 4}`.
    pub async fn set_migration_parameters(&self, params: Value) -> Result<()> {
        self.qmp()
            .execute("migrate-set-parameters", Some(params))
            .await
            .map(drop)
    }

    /// The current migration parameters (`query-migrate-parameters`), in QEMU's names.
    pub async fn migration_parameters(&self) -> Result<Value> {
        self.qmp().execute("query-migrate-parameters", None).await
    }

    /// Makes a `-incoming defer` destination listen on `uri` (`tcp:IP:PORT`; port 0 picks
    /// one, read it from [`MigrationStats::socket_addresses`]).
    pub async fn migrate_incoming(&self, uri: &str) -> Result<()> {
        self.qmp()
            .execute("migrate-incoming", Some(json!({ "uri": uri })))
            .await
            .map(drop)
    }

    /// Starts sending this VM to a listening destination. Returns at once; poll
    /// [`QemuVm::query_migrate`] for progress.
    pub async fn migrate(&self, uri: &str) -> Result<()> {
        self.qmp()
            .execute("migrate", Some(json!({ "uri": uri })))
            .await
            .map(drop)
    }

    /// Progress of the current or last migration.
    pub async fn query_migrate(&self) -> Result<MigrationStats> {
        let v = self.qmp().execute("query-migrate", None).await?;
        Ok(MigrationStats::from_qmp(&v))
    }

    /// Cancels an outgoing migration; the source keeps running.
    pub async fn migrate_cancel(&self) -> Result<()> {
        self.qmp().execute("migrate_cancel", None).await.map(drop)
    }

    /// Shuts down every socket of the current migration (QMP `yank`, instance `migration`).
    ///
    /// `migrate_cancel` shuts down only the main channel: a multifd sender blocked on a link
    /// that went silent stays blocked until TCP gives up (minutes), and the migration stays
    /// `cancelling`. Yank shuts the multifd channels too; it changes no migration state and
    /// does not touch the guest. Sent out of band: a final copy stuck on a silent link holds
    /// QEMU's main loop, and only an out-of-band command is heard then.
    pub async fn yank_migration(&self) -> Result<()> {
        self.qmp()
            .execute_oob(
                "yank",
                Some(json!({ "instances": [{ "type": "migration" }] })),
            )
            .await
            .map(drop)
    }

    /// Lets a migration paused in `pre-switchover` proceed to switchover.
    pub async fn migrate_continue(&self) -> Result<()> {
        self.qmp()
            .execute(
                "migrate-continue",
                Some(json!({ "state": "pre-switchover" })),
            )
            .await
            .map(drop)
    }

    /// Switches a running pre-copy migration (with capability `postcopy-ram` on both sides) to
    /// post-copy: the destination takes over and fetches the remaining pages on demand.
    pub async fn migrate_start_postcopy(&self) -> Result<()> {
        self.qmp()
            .execute("migrate-start-postcopy", None)
            .await
            .map(drop)
    }

    /// Starts measuring the guest's dirty rate over `period` (page sampling; QEMU takes
    /// 50 ms to 60 s).
    pub async fn calc_dirty_rate(&self, period: std::time::Duration) -> Result<()> {
        let ms = period.as_millis();
        if !(50..=60_000).contains(&ms) {
            return Err(Error::Config(format!(
                "dirty rate measurement of {ms} ms: use 50 ms to 60 s"
            )));
        }
        self.qmp()
            .execute(
                "calc-dirty-rate",
                Some(json!({
                    "calc-time": ms as u64,
                    "calc-time-unit": "millisecond",
                    "sample-pages": DIRTY_SAMPLE_PAGES_PER_GIB,
                })),
            )
            .await
            .map(drop)
    }

    /// The result of the last [`QemuVm::calc_dirty_rate`].
    pub async fn query_dirty_rate(&self) -> Result<DirtyRate> {
        let v = self.qmp().execute("query-dirty-rate", None).await?;
        let status = match v["status"].as_str() {
            Some("measuring") => DirtyRateStatus::Measuring,
            Some("measured") => DirtyRateStatus::Measured,
            _ => DirtyRateStatus::Unstarted,
        };
        Ok(DirtyRate {
            status,
            dirty_rate_mib_per_s: v["dirty-rate"].as_i64().map(|r| r.max(0) as u64),
            calc_time_s: v["calc-time"].as_u64().unwrap_or(0),
            mode: v["mode"].as_str().unwrap_or_default().to_string(),
        })
    }

    /// Measures the dirty rate over `period` and waits for the result.
    pub async fn measure_dirty_rate(&self, period: std::time::Duration) -> Result<DirtyRate> {
        self.calc_dirty_rate(period).await?;
        let limit = period + std::time::Duration::from_secs(10);
        let deadline = std::time::Instant::now() + limit;
        // Nothing to ask before the period is over; then ask often (the caller waits).
        tokio::time::sleep(period).await;
        loop {
            let rate = self.query_dirty_rate().await?;
            if rate.status == DirtyRateStatus::Measured {
                return Ok(rate);
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: "the dirty rate measurement".into(),
                    timeout_ms: limit.as_millis() as u64,
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// The newest end of NIC `nic`'s receive ring (`nic<N>`, virtio-net): how many bytes
    /// each of the last buffers the NIC filled took, and the start (`len` bytes at most) of
    /// the last one, its virtio-net header first when a frame starts there. Only meaningful
    /// while the guest is stopped (the ring does not move then). None when the NIC has
    /// received nothing, or is still filling a buffer.
    ///
    /// Read through QEMU's own view of the ring (`x-query-virtio-queue-status` for the ring's
    /// place and indices, `x-query-virtio-queue-element` for the last buffer's address, and
    /// the monitor's `xp` for the used lengths and the buffer's bytes): a source uses it to
    /// tell whether the frame it read last reached the guest, a frame larger than one buffer
    /// included (merged receive buffers).
    pub async fn receive_ring_tail(
        &self,
        nic: usize,
        len: usize,
    ) -> Result<Option<ReceiveRingTail>> {
        let path = format!("/machine/peripheral/nic{nic}/virtio-backend");
        let status = self
            .qmp()
            .execute(
                "x-query-virtio-queue-status",
                Some(json!({ "path": path, "queue": 0 })),
            )
            .await?;
        let field = |k: &str| status.get(k).and_then(Value::as_u64);
        let (Some(avail), Some(used), Some(inuse), Some(num), Some(used_ring)) = (
            field("last-avail-idx"),
            field("used-idx"),
            field("inuse"),
            field("vring-num"),
            field("vring-used"),
        ) else {
            return Err(Error::Protocol(format!(
                "x-query-virtio-queue-status answered {status}"
            )));
        };
        if avail == 0 || avail != used || inuse != 0 || num == 0 || num > 32_768 {
            return Ok(None);
        }
        let element = self
            .qmp()
            .execute(
                "x-query-virtio-queue-element",
                Some(json!({ "path": path, "queue": 0, "index": (avail - 1) & 0xffff })),
            )
            .await?;
        let desc = element.get("descs").and_then(|d| d.get(0));
        let (Some(addr), Some(size)) = (
            desc.and_then(|d| d.get("addr")).and_then(Value::as_u64),
            desc.and_then(|d| d.get("len")).and_then(Value::as_u64),
        ) else {
            return Err(Error::Protocol(format!(
                "x-query-virtio-queue-element answered {element}"
            )));
        };
        // The used ring: flags and index (2 bytes each), then one {id, len} (4 bytes each,
        // little-endian) per slot; the newest `count` entries end at slot (used - 1) % num,
        // and may wrap around the ring's end.
        let count = RING_TAIL_BUFFERS.min(num);
        let first = (used + num * 0x1_0000 - count) % num;
        let mut entries = Vec::with_capacity(8 * count as usize);
        let to_end = count.min(num - first);
        for (slot, n) in [(first, to_end), (0, count - to_end)] {
            if n > 0 {
                entries.extend(
                    self.read_guest_bytes(used_ring + 4 + 8 * slot, 8 * n)
                        .await?,
                );
            }
        }
        let word = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let used_lens: Vec<u32> = entries.chunks_exact(8).map(|e| word(&e[4..])).collect();
        let last_used_id = entries.chunks_exact(8).next_back().map(word);
        // The avail slot QEMU took its last buffer from holds that buffer's descriptor only
        // until the guest refills its ring to the brim: a guest that already took the frame
        // and gave the buffer back may have put a fresh, empty one there. Its bytes then say
        // nothing about the last frame.
        let head = element
            .get("avail")
            .and_then(|a| a.get("ring"))
            .and_then(Value::as_u64);
        let take = if head.is_some() && head == last_used_id.map(u64::from) {
            (len as u64).min(size)
        } else {
            0
        };
        let last_buffer = if take == 0 {
            Vec::new()
        } else {
            self.read_guest_bytes(addr, take).await?
        };
        Ok(Some(ReceiveRingTail {
            used_lens,
            last_buffer,
        }))
    }

    /// `count` bytes of guest memory at guest-physical `addr` (the monitor's `xp`).
    async fn read_guest_bytes(&self, addr: u64, count: u64) -> Result<Vec<u8>> {
        let text = self
            .qmp()
            .execute(
                "human-monitor-command",
                Some(json!({ "command-line": format!("xp /{count}xb {addr:#x}") })),
            )
            .await?;
        let text = text.as_str().unwrap_or_default();
        parse_xp_bytes(text)
            .filter(|b| b.len() as u64 == count)
            .ok_or_else(|| Error::Protocol(format!("the monitor's xp answered {text:?}")))
    }

    /// Sends self-announcements from every NIC (`announce-self`).
    pub async fn announce_self(&self, params: &AnnounceParams) -> Result<()> {
        self.qmp()
            .execute(
                "announce-self",
                Some(json!({
                    "initial": params.initial_ms,
                    "max": params.max_ms,
                    "rounds": params.rounds,
                    "step": params.step_ms,
                })),
            )
            .await
            .map(drop)
    }

    /// Expands a CPU model into its properties as this QEMU (host, accelerator) sees it
    /// (`query-cpu-model-expansion`); answers `{"model": {"name": ..., "props": {...}}}`.
    pub async fn query_cpu_model_expansion(
        &self,
        model: &str,
        expansion: CpuExpansion,
    ) -> Result<Value> {
        self.qmp()
            .execute(
                "query-cpu-model-expansion",
                Some(json!({ "type": expansion, "model": { "name": model } })),
            )
            .await
    }
}

/// The bytes of the monitor's `xp /Nxb` output (`ADDRESS: 0x12 0x34 ...` lines), or None if a
/// line does not read so.
fn parse_xp_bytes(text: &str) -> Option<Vec<u8>> {
    let mut bytes = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (_, values) = line.split_once(": ")?;
        for v in values.split_whitespace() {
            bytes.push(u8::from_str_radix(v.strip_prefix("0x")?, 16).ok()?);
        }
    }
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_memory_dumps_read_as_bytes() {
        let text = "00000000031eb000: 0x00 0x01 0xff 0x52\r\n00000000031eb004: 0x54 \r\n";
        assert_eq!(parse_xp_bytes(text), Some(vec![0, 1, 0xff, 0x52, 0x54]));
        assert_eq!(parse_xp_bytes(""), Some(vec![]));
        for bad in ["Cannot access memory", "0000: 0xzz", "0000: 12"] {
            assert_eq!(parse_xp_bytes(bad), None, "{bad}");
        }
    }

    #[test]
    fn samples_for_the_watcher() {
        let s = MigrationStats::from_qmp(&json!({
            "status": "active",
            "expected-downtime": 120,
            "cpu-throttle-percentage": 20,
            "ram": {"remaining": 3_000_000, "dirty-sync-count": 4, "dirty-pages-rate": 256,
                    "page-size": 4096, "mbps": 950.5}
        }));
        let p = s.precopy_sample();
        assert_eq!(p.phase, SamplePhase::PreCopy);
        assert_eq!((p.pass, p.remaining_bytes), (4, 3_000_000));
        assert_eq!(p.dirty_bytes_per_s, (256 * 4096) as f64);
        assert_eq!(p.sent_mbit_s, 950.5);
        assert_eq!((p.expected_downtime_ms, p.cpu_throttle_pct), (120, 20));
        for (status, phase) in [
            ("setup", SamplePhase::Setup),
            ("none", SamplePhase::Setup),
            ("postcopy-active", SamplePhase::PostCopy),
            ("postcopy-paused", SamplePhase::PostCopy),
            ("pre-switchover", SamplePhase::Past),
            ("device", SamplePhase::Past),
            ("completed", SamplePhase::Past),
            ("failed", SamplePhase::Past),
            ("cancelling", SamplePhase::Past),
        ] {
            let s = MigrationStats::from_qmp(&json!({ "status": status }));
            assert_eq!(s.precopy_sample().phase, phase, "{status}");
        }
    }

    #[test]
    fn stats_decode() {
        let v = json!({
            "status": "active",
            "expected-downtime": 300,
            "total-time": 1234,
            "setup-time": 5,
            "ram": {"total": 268435456u64, "remaining": 1000, "transferred": 2000,
                    "dirty-pages-rate": 7, "page-size": 4096, "mbps": 812.5,
                    "dirty-sync-count": 3, "precopy-bytes": 1900}
        });
        let s = MigrationStats::from_qmp(&v);
        assert_eq!(s.status, MigrationStatus::Active);
        assert_eq!(s.total_bytes, 268435456);
        assert_eq!(s.remaining_bytes, 1000);
        assert_eq!(s.transferred_bytes, 2000);
        assert_eq!(s.dirty_pages_rate, 7);
        assert_eq!(s.mbps, 812.5);
        assert_eq!(s.dirty_sync_count, 3);
        assert_eq!(s.expected_downtime_ms, Some(300));
        assert_eq!(s.downtime_ms, None);
        assert_eq!(s.precopy_bytes, 1900);

        let empty = MigrationStats::from_qmp(&json!({}));
        assert_eq!(empty.status, MigrationStatus::None);
        assert_eq!(empty.total_bytes, 0);

        let inc = MigrationStats::from_qmp(&json!({
            "status": "setup",
            "socket-address": [{"type": "inet", "host": "127.0.0.1", "port": "40123"},
                               {"type": "inet", "host": "::1", "port": "40124"}]
        }));
        assert_eq!(
            inc.socket_addresses,
            vec!["tcp:127.0.0.1:40123", "tcp:[::1]:40124"]
        );
        let failed = MigrationStats::from_qmp(&json!({"status": "failed", "error-desc": "boom"}));
        assert!(failed.status.is_finished());
        assert_eq!(failed.error.as_deref(), Some("boom"));
        assert_eq!(
            MigrationStatus::from("brand-new".to_string()),
            MigrationStatus::Other("brand-new".into())
        );
    }
}
