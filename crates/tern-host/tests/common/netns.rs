//! A throwaway network namespace with a bridge, removed on drop (even when a test fails).

use std::process::Command;

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

/// `ip netns add NAME` with bridge `br0` (up, no address) and loopback up.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(prefix: &str) -> NetNs {
        let name = format!("{prefix}-{}", std::process::id());
        // Left over from a crashed run of the same pid: remove first.
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name]).expect("create netns");
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]).expect("lo up");
        ns.ip(&["link", "add", "br0", "type", "bridge"])
            .expect("add bridge");
        ns.ip(&["link", "set", "br0", "up"]).expect("bridge up");
        ns
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
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}
