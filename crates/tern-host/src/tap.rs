//! The VMs' tap devices: created persistent in the agent's network namespace, attached to the
//! VM bridge, brought up, and removed again — all through ioctls on /dev/net/tun and a socket.
//!
//! A tap has no carrier (its bridge port stays `disabled`) until QEMU opens it, so nothing
//! here can check that frames flow; QEMU's open does that.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use uuid::Uuid;

/// `SIOCBRADDIF` from linux/sockios.h (not exported by libc for every target).
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?} is not a valid interface name")]
    BadName(String),
    #[error(
        "bridge {0:?} does not exist in the agent's network namespace (create it, or fix --bridge)"
    )]
    NoBridge(String),
    #[error("{0:?} exists and is not a tap device")]
    NotATap(String),
    #[error("tap {0} is still held open (is its QEMU still running?)")]
    Busy(String),
    #[error("{what} {name}: {source}")]
    Sys {
        what: &'static str,
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// Tap name of NIC `index` of VM `vm`: `tn` + 10 hex digits of the id + `-` + index, at most
/// 15 characters (IFNAMSIZ - 1). Deterministic, so a restarted agent finds the taps again.
pub fn tap_name(vm: Uuid, index: usize) -> String {
    let hex = vm.simple().to_string();
    format!("tn{}-{}", &hex[..10], index)
}

/// The most NICs a VM may have (keeps tap names within 15 characters).
pub const MAX_NICS: usize = 100;

fn ifreq_for(name: &str) -> Result<libc::ifreq, TapError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(TapError::BadName(name.to_string()));
    }
    // SAFETY: ifreq is plain old data (arrays and a union of integers/pointers); all-zero is
    // a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn sys_err(what: &'static str, name: &str) -> TapError {
    TapError::Sys {
        what,
        name: name.to_string(),
        source: std::io::Error::last_os_error(),
    }
}

/// Interface index of `name` in the calling process's network namespace, if it exists.
fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string that lives across the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// Whether `name` exists in the agent's network namespace.
pub fn exists(name: &str) -> bool {
    ifindex(name).is_some()
}

fn open_tun() -> Result<std::fs::File, TapError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| TapError::Sys {
            what: "opening /dev/net/tun for",
            name: String::new(),
            source: e,
        })
}

/// Attaches to tap `name` through /dev/net/tun (creating it if missing) and sets its
/// persistence, and its owner when given (an unprivileged QEMU may attach only to a tap its
/// user owns). EBUSY means QEMU holds it.
fn set_persist(name: &str, persist: bool, owner: Option<(u32, u32)>) -> Result<(), TapError> {
    let tun = open_tun()?;
    let mut req = ifreq_for(name)?;
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq we own; the fd is open.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EBUSY) => TapError::Busy(name.to_string()),
            Some(libc::EINVAL) => TapError::NotATap(name.to_string()),
            _ => TapError::Sys {
                what: "TUNSETIFF",
                name: name.to_string(),
                source: e,
            },
        });
    }
    // SAFETY: TUNSETPERSIST takes an integer argument; the fd is attached to the tap.
    let rc = unsafe {
        libc::ioctl(
            tun.as_raw_fd(),
            libc::TUNSETPERSIST,
            libc::c_ulong::from(persist),
        )
    };
    if rc < 0 {
        return Err(sys_err("TUNSETPERSIST", name));
    }
    if let Some((uid, gid)) = owner {
        for (what, op, id) in [
            ("TUNSETOWNER", libc::TUNSETOWNER, uid),
            ("TUNSETGROUP", libc::TUNSETGROUP, gid),
        ] {
            // SAFETY: both take an integer argument; the fd is attached to the tap.
            let rc = unsafe { libc::ioctl(tun.as_raw_fd(), op, libc::c_ulong::from(id)) };
            if rc < 0 {
                return Err(sys_err(what, name));
            }
        }
    }
    Ok(())
}

fn control_socket() -> Result<OwnedFd, TapError> {
    // SAFETY: plain socket(2) call; the returned fd is checked and then owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(sys_err("socket for interface ioctls", ""));
    }
    // SAFETY: fd is a freshly created, valid descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Master device of `name` according to sysfs, if sysfs shows this network namespace.
/// (`ip netns exec` remounts /sys for the namespace; a bare `nsenter --net` does not, so the
/// answer is only trusted when sysfs's ifindex matches the kernel's.)
fn sysfs_master(name: &str, index: u32) -> Option<Option<String>> {
    let base = std::path::Path::new("/sys/class/net").join(name);
    let idx: u32 = std::fs::read_to_string(base.join("ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if idx != index {
        return None;
    }
    Some(
        std::fs::read_link(base.join("master"))
            .ok()
            .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned())),
    )
}

fn attach_to_bridge(tap: &str, bridge: &str) -> Result<(), TapError> {
    let tap_index = ifindex(tap).ok_or_else(|| TapError::Sys {
        what: "finding",
        name: tap.to_string(),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })?;
    if ifindex(bridge).is_none() {
        return Err(TapError::NoBridge(bridge.to_string()));
    }
    if let Some(Some(master)) = sysfs_master(tap, tap_index) {
        if master == bridge {
            return Ok(());
        }
    }
    let sock = control_socket()?;
    let mut req = ifreq_for(bridge)?;
    req.ifr_ifru.ifru_ifindex = tap_index as libc::c_int;
    // SAFETY: SIOCBRADDIF reads the ifreq we own (bridge name + port ifindex).
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCBRADDIF, &mut req) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            // Already enslaved. Sysfs said otherwise or could not tell; only an agent
            // re-running on its own taps gets here, and those were attached to this bridge.
            Some(libc::EBUSY) if sysfs_master(tap, tap_index).is_none() => Ok(()),
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => {
                Err(TapError::NoBridge(bridge.to_string()))
            }
            _ => Err(TapError::Sys {
                what: "attaching to the bridge the tap",
                name: tap.to_string(),
                source: e,
            }),
        };
    }
    Ok(())
}

/// Sets interface `name` up (nothing if it is).
pub fn bring_up(name: &str) -> Result<(), TapError> {
    let sock = control_socket()?;
    let mut req = ifreq_for(name)?;
    // SAFETY: SIOCGIFFLAGS fills the flags of the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(sys_err("reading the flags of", name));
    }
    // SAFETY: reading the union member SIOCGIFFLAGS just wrote.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) } < 0 {
        return Err(sys_err("bringing up", name));
    }
    Ok(())
}

/// Frames a tap holds for its reader: QEMU reads nothing while its guest is paused, and a
/// switchover's worth of frames sent to the VM must wait there, not be dropped (Linux's
/// default is 1000). The queue is of pointers; frames take memory only while queued.
pub const TAP_QUEUE_LEN: u32 = 4096;

fn set_queue_len(name: &str, len: u32) -> Result<(), TapError> {
    let sock = control_socket()?;
    let mut req = ifreq_for(name)?;
    req.ifr_ifru.ifru_metric = len as libc::c_int;
    // SAFETY: SIOCSIFTXQLEN reads the queue length (ifr_qlen, the int of the union) of the
    // ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFTXQLEN, &mut req) } < 0 {
        return Err(sys_err("setting the queue length of", name));
    }
    Ok(())
}

/// Makes sure tap `name` exists, is a port of `bridge` and is up. Idempotent: an existing tap
/// (left by a crashed agent, or held by a running QEMU) is reused as it is.
pub fn ensure_tap(name: &str, bridge: &str, owner: Option<(u32, u32)>) -> Result<(), TapError> {
    ensure_tap_down(name, bridge, owner)?;
    bring_up(name)
}

/// [`ensure_tap`] but leaves a new tap down (a port that is down gets nothing from its
/// bridge), for its port to be set up before the first frame arrives; [`bring_up`] follows.
pub fn ensure_tap_down(
    name: &str,
    bridge: &str,
    owner: Option<(u32, u32)>,
) -> Result<(), TapError> {
    ifreq_for(name)?;
    if ifindex(bridge).is_none() {
        return Err(TapError::NoBridge(bridge.to_string()));
    }
    // An existing tap is given to the new owner too (the VM's QEMU user changes per start).
    if !exists(name) || owner.is_some() {
        match set_persist(name, true, owner) {
            Ok(()) => {}
            // Created meanwhile and held by someone: reuse it.
            Err(TapError::Busy(_)) => {}
            Err(e) => return Err(e),
        }
    }
    attach_to_bridge(name, bridge)?;
    set_queue_len(name, TAP_QUEUE_LEN)
}

/// Removes tap `name`; a missing tap is not an error. Fails with [`TapError::Busy`] while a
/// process (QEMU) holds it.
pub fn remove_tap(name: &str) -> Result<(), TapError> {
    ifreq_for(name)?;
    if !exists(name) {
        return Ok(());
    }
    // Attaching then dropping persistence deletes the device when our fd closes.
    set_persist(name, false, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_ifnamsiz() {
        let id = Uuid::parse_str("0123456789abcdef0123456789abcdef").expect("uuid");
        assert_eq!(tap_name(id, 0), "tn0123456789-0");
        assert!(tap_name(id, MAX_NICS - 1).len() <= 15);
        assert_ne!(tap_name(id, 1), tap_name(id, 0));
    }

    #[test]
    fn bad_names_refused() {
        assert!(matches!(
            ensure_tap("this-name-is-too-long", "br0", None),
            Err(TapError::BadName(_))
        ));
        assert!(matches!(remove_tap(""), Err(TapError::BadName(_))));
    }

    #[test]
    fn missing_tap_removal_is_ok() {
        assert!(remove_tap("tnnothere-0").is_ok());
    }
}
