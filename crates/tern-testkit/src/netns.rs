//! A throwaway network namespace, removed on drop (even when a test fails). Every address a
//! test uses lives inside one of these.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `ip ARGS...`; its stdout, or its stderr as the error.
pub fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip netns add PREFIX-PID` with loopback up.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// A new namespace named `PREFIX-PID`; one left over from a crashed run of the same pid is
    /// removed first.
    pub fn new(prefix: &str) -> NetNs {
        let name = format!("{prefix}-{}", std::process::id());
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name]).expect("create netns");
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]).expect("lo up");
        ns
    }

    /// Adds bridge `name` (up, no address) inside the namespace.
    pub fn with_bridge(self, name: &str) -> NetNs {
        self.ip(&["link", "add", name, "type", "bridge"])
            .expect("add bridge");
        self.ip(&["link", "set", name, "up"]).expect("bridge up");
        self
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<String, String> {
        let mut v = vec!["-n", self.name.as_str()];
        v.extend_from_slice(args);
        ip(&v)
    }

    /// Master of `dev` in the namespace, if it has one.
    pub fn master_of(&self, dev: &str) -> Option<String> {
        let out = self.ip(&["-o", "link", "show", "dev", dev]).ok()?;
        let mut words = out.split_whitespace();
        while let Some(w) = words.next() {
            if w == "master" {
                return words.next().map(str::to_string);
            }
        }
        None
    }

    pub fn has_link(&self, dev: &str) -> bool {
        self.ip(&["link", "show", "dev", dev]).is_ok()
    }

    /// Runs `f` on a thread moved into the namespace (network namespaces are per thread, so
    /// ioctls and sockets made there act in it).
    pub fn run_in<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).expect("open netns");
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("namespace thread panicked")
        })
    }

    /// A script in `dir` that runs QEMU inside this namespace (for a `qemu_binary` setting).
    pub fn qemu_wrapper(&self, dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(format!("qemu-in-{}", self.name));
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\nexec ip netns exec {} qemu-system-x86_64 \"$@\"\n",
                self.name
            ),
        )
        .expect("write the QEMU wrapper");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("make the QEMU wrapper executable");
        path
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}
