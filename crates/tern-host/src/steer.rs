//! Teaching the LAN a migrating VM's new port while its guest is paused at the source, so no
//! frame sent to the VM during the switchover is lost.
//!
//! Measured in the lab (bench/migrate `--experiment`): with QEMU's own flow the switch learns
//! the new port only when the destination runs the guest; every frame that reached the paused
//! source in between is dropped and the client's TCP waits for its retransmit timer (≥ 200 ms).
//! A RARP from the destination host alone does not help: the destination bridge still maps
//! the VM's MAC to its uplink (learned while the VM ran elsewhere) and a frame sent by the
//! bridge device itself teaches it nothing. Pointing the destination bridge's entry at the new
//! tap first, then one RARP with the VM's MAC out of that bridge, makes the fabric deliver
//! every frame to the new tap, where it waits in the tap's queue until the guest runs there:
//! in the experiment, 22 of 22 pings sent during the pause were answered instead of 4 lost.
//!
//! Undo is implicit on the destination (a removed tap takes its bridge entries with it); the
//! source announces the VM again when an aborted migration resumes it (`tern_qemu`).
//!
//! Not earlier: steering while the guest still runs at the source was tried (pre-copy held at
//! convergence, the LAN steered, then the guest paused) and measured worse. Every frame the
//! running guest sends teaches the switches its old port again, so by the pause the fabric
//! points back at the source; in the lab 0–75 frames per switchover then reached the paused
//! source instead of 1–5. The pause is the first moment the guest is silent, so the steer
//! goes there, and what reached the source before it is handed over ([`crate::frames`]).

use std::ffi::CString;
use std::os::fd::AsRawFd;

use rtnetlink::packet_route::neighbour::{NeighbourFlags, NeighbourState};

#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    #[error("MAC {0:?} is not six hex bytes separated by colons")]
    BadMac(String),
    #[error("interface {0:?} does not exist in the agent's network namespace")]
    NoInterface(String),
    #[error("pointing {bridge}'s entry for {mac} at {tap}: {source}")]
    Fdb {
        bridge: String,
        tap: String,
        mac: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("turning the bridge's flooding to {tap} {state}: {source}")]
    Flooding {
        tap: String,
        state: &'static str,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("{what} on {ifname}: {source}")]
    Sys {
        what: &'static str,
        ifname: String,
        #[source]
        source: std::io::Error,
    },
}

/// Parses `52:54:00:12:34:56`.
pub fn parse_mac(text: &str) -> Result<[u8; 6], SteerError> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut mac {
        let part = parts
            .next()
            .ok_or_else(|| SteerError::BadMac(text.into()))?;
        if part.len() != 2 {
            return Err(SteerError::BadMac(text.into()));
        }
        *b = u8::from_str_radix(part, 16).map_err(|_| SteerError::BadMac(text.into()))?;
    }
    if parts.next().is_some() {
        return Err(SteerError::BadMac(text.into()));
    }
    Ok(mac)
}

/// The index of interface `name` in this network namespace.
pub(crate) fn ifindex(name: &str) -> Result<u32, SteerError> {
    let c = CString::new(name).map_err(|_| SteerError::NoInterface(name.into()))?;
    // SAFETY: `c` is a valid NUL-terminated string that lives across the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(SteerError::NoInterface(name.into()));
    }
    Ok(idx)
}

/// The RARP "request reverse" frame QEMU's `announce-self` sends, with `mac` as source: what
/// switches (and Linux bridges) learn a station's port from.
pub fn rarp_frame(mac: [u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&[0x80, 0x35]); // EtherType RARP
                                              // htype Ethernet, ptype IPv4, hlen 6, plen 4, op 3 (request reverse).
    f[14..22].copy_from_slice(&[0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x03]);
    f[22..28].copy_from_slice(&mac); // sender hardware address; sender IP stays 0
    f[32..38].copy_from_slice(&mac); // target hardware address; target IP stays 0
    f
}

/// Sends one frame out of `ifname` through an AF_PACKET socket (no process spawned: this
/// runs while the guest is paused).
pub fn send_frame(ifname: &str, frame: &[u8]) -> Result<(), SteerError> {
    let index = ifindex(ifname)?;
    let sys = |what| SteerError::Sys {
        what,
        ifname: ifname.into(),
        source: std::io::Error::last_os_error(),
    };
    // Send only (receives no protocol), closed off this thread.
    let sock =
        crate::frames::PacketSocket::for_sending().map_err(|_| sys("opening a packet socket"))?;
    // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = index as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: `frame` and `addr` are valid for the lengths passed and outlive the call.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(sys("sending a frame"));
    }
    Ok(())
}

/// A netlink connection opened once and kept (opening one costs milliseconds, and steering
/// runs while a guest is paused).
#[derive(Default)]
pub struct Steerer {
    netlink: tokio::sync::OnceCell<rtnetlink::Handle>,
}

impl Steerer {
    async fn handle(&self) -> Result<&rtnetlink::Handle, SteerError> {
        self.netlink
            .get_or_try_init(|| async {
                let (conn, handle, _) =
                    rtnetlink::new_connection().map_err(|e| SteerError::Sys {
                        what: "opening a netlink socket",
                        ifname: "-".into(),
                        source: e,
                    })?;
                tokio::spawn(conn);
                Ok(handle)
            })
            .await
    }

    /// Opens the netlink connection now, so the first steering does not pay for it.
    pub async fn warm_up(&self) {
        if let Err(e) = self.handle().await {
            tracing::warn!(error = %e, "no netlink connection for steering");
        }
    }

    /// Points `bridge`'s forwarding entry for `mac` at its port `tap`, as a learned (dynamic)
    /// entry: like `bridge fdb replace MAC dev TAP master dynamic`, over rtnetlink.
    pub async fn point_fdb(&self, bridge: &str, tap: &str, mac: [u8; 6]) -> Result<(), SteerError> {
        let index = ifindex(tap)?;
        let fdb = |source| SteerError::Fdb {
            bridge: bridge.into(),
            tap: tap.into(),
            mac: format_mac(mac),
            source,
        };
        self.handle()
            .await?
            .neighbours()
            .add_bridge(index, &mac)
            .state(NeighbourState::Reachable)
            .flags(NeighbourFlags::Controller)
            .replace()
            .execute()
            .await
            .map_err(|e| fdb(Box::new(e)))
    }

    /// Lets bridge port `tap` receive what its bridge floods (broadcast, multicast, and unicast
    /// for addresses it has not learned), or stops that: like `ip link set TAP type
    /// bridge_slave flood on|off mcast_flood on|off bcast_flood on|off`.
    ///
    /// A destination's taps take no floods until the steer: the guest still runs at the source
    /// and gets every broadcast there, so copies queued here would reach it twice, and late
    /// (all of them at once when it resumes).
    pub async fn set_flooding(&self, tap: &str, on: bool) -> Result<(), SteerError> {
        let index = ifindex(tap)?;
        let message = rtnetlink::LinkBridgePort::new(index)
            .flood(on)
            .mcast_flood(on)
            .bcast_flood(on)
            .build();
        self.handle()
            .await?
            .link()
            .change(message)
            .execute()
            .await
            .map_err(|e| SteerError::Flooding {
                tap: tap.into(),
                state: if on { "on" } else { "off" },
                source: Box::new(e),
            })
    }

    /// Steers the LAN to a destination's tap: the bridge's entry first, then the RARP that
    /// teaches every switch upstream.
    pub async fn steer(&self, bridge: &str, tap: &str, mac: [u8; 6]) -> Result<(), SteerError> {
        self.point_fdb(bridge, tap, mac).await?;
        send_frame(bridge, &rarp_frame(mac))
    }
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_print() {
        let m = parse_mac("52:54:00:AB:cd:01").expect("mac");
        assert_eq!(m, [0x52, 0x54, 0, 0xab, 0xcd, 1]);
        assert_eq!(format_mac(m), "52:54:00:ab:cd:01");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:01:02",
            "52:54:00:ab:cd:1",
            "zz:54:00:ab:cd:01",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rarp_frame_is_what_switches_learn_from() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = rarp_frame(mac);
        assert_eq!(&f[0..6], &[0xff; 6], "broadcast");
        assert_eq!(&f[6..12], &mac, "source MAC is the VM's");
        assert_eq!(&f[12..14], &[0x80, 0x35], "RARP");
        assert_eq!(&f[20..22], &[0, 3], "request reverse");
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[32..38], &mac);
    }
}
