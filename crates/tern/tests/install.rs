//! Installing tern the way its packages do: `tern center init` and `tern host join` write
//! configs a real center and a real agent start from and connect with (TLS, the join token's
//! CA fingerprint); join checks the center against the token first; both refuse to overwrite
//! a machine already set up and refuse bad input;
//! `scripts/package.sh` builds the three .debs with the binary, the systemd units (verified
//! by systemd-analyze, the center's sandbox scored) and the config files as conffiles.
//! Under a booted systemd (a container over a copy of this machine's root), the packages
//! install and purge with dpkg, and the agent's unit keeps the VMs running across a restart, a
//! stop and a start, and the agent package's removal.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{raw_http, tern_exe, text};
use serde_json::Value;

/// A daemon killed when the test ends, whatever happens.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str], log: &Path) -> Daemon {
    spawn_as(None, &tern_exe(), args, log)
}

/// Runs `exe ARGS` as `user` (through util-linux's setpriv), or as this test's user.
fn spawn_as(user: Option<(&str, &str)>, exe: &Path, args: &[&str], log: &Path) -> Daemon {
    let log = std::fs::File::create(log).expect("log file");
    let err = log.try_clone().expect("log file");
    let mut c = match user {
        Some((u, g)) => {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={u}"),
                &format!("--regid={g}"),
                "--clear-groups",
            ])
            .arg(exe);
            c
        }
        None => Command::new(exe),
    };
    Daemon(
        c.args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("spawn tern"),
    )
}

fn tern(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(tern_exe());
    c.args(args)
        .env_remove("TERN_CENTER")
        .env_remove("TERN_TOKEN")
        .env_remove("TERN_LAB_DIR")
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run tern")
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

/// A loopback address of this test's own (all of 127/8 is loopback): fixed ports on it
/// cannot collide with anything else on the machine.
fn own_loopback() -> String {
    let pid = std::process::id();
    format!("127.66.{}.{}", (pid >> 8) % 250 + 1, pid % 250 + 1)
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> Option<String>, log: &Path) {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        match ok() {
            None => return,
            Some(why) => last = Some(why),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "{what}: not within {timeout:?} ({last:?}); log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

#[test]
fn init_and_join_make_a_center_and_a_host_that_connect() {
    // /var/tmp (1777, as every Debian has it) rather than $TMPDIR, which may be closed to the
    // center's unprivileged user.
    let tmp = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    // The center runs as an unprivileged user (as the package's `tern`): it must reach its
    // files through the test's directory.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let etc = tmp.path().join("etc/tern");
    let data = tmp.path().join("var/center");
    let state = tmp.path().join("var/host");
    let shared = tmp.path().join("shared");
    std::fs::create_dir_all(&shared).expect("shared dir");
    let socket = tmp.path().join("run/center.sock");
    let ip = own_loopback();
    let listen = format!("{ip}:8700");
    let center_conf = etc.join("center.toml");

    // The center: config, data dir, tokens and CA, made before it ever runs.
    let init = |extra: &[&str]| {
        let mut args = vec!["center", "init", "--no-enable", "-o", "json", "--config"];
        let (c, d, so) = (s(&center_conf), s(&data), s(&socket));
        let mut rest = vec![c, "--data-dir".into(), d, "--listen".into(), listen.clone()];
        rest.extend(["--socket".into(), so]);
        rest.extend(extra.iter().map(|e| e.to_string()));
        let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
        args.extend(rest);
        tern(&args, &[])
    };
    let out = init(&["--user", "nobody"]);
    assert!(out.status.success(), "{}", text(&out));
    let made: Value = serde_json::from_slice(&out.stdout).expect("init's JSON");
    assert_eq!(made["user"], "nobody", "{made}");
    let admin_file = PathBuf::from(made["admin_token_file"].as_str().expect("token file"));
    let fingerprint = made["ca_fingerprint"].as_str().expect("a CA").to_string();
    assert_eq!(fingerprint.len(), 64, "{made}");
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&admin_file), 0o600);
    use std::os::unix::fs::MetadataExt;
    for p in [&data, &admin_file, &data.join("center.db")] {
        assert_eq!(
            std::fs::metadata(p).expect("metadata").uid(),
            65534,
            "{}",
            p.display()
        );
    }
    let written = std::fs::read_to_string(&center_conf).expect("center.toml");
    assert!(
        written.contains(&format!("listen = \"{listen}\"")),
        "{written}"
    );
    // A machine set up already is not set up again.
    let again = init(&[]);
    assert!(!again.status.success());
    assert!(text(&again).contains("set up already"), "{}", text(&again));
    assert_eq!(
        std::fs::read_to_string(&center_conf).expect("center.toml"),
        written
    );

    // The center runs from that config alone, and without root.
    let run = socket.parent().expect("run dir");
    std::fs::create_dir_all(run).expect("run dir");
    nix::unistd::chown(run, Some(65534.into()), Some(65534.into())).expect("chown run dir");
    // A copy of the binary it may run wherever the build lives (a checkout under /root is
    // closed to other users).
    let exe = tmp.path().join("bin/tern");
    std::fs::create_dir_all(exe.parent().expect("bin")).expect("bin dir");
    std::fs::copy(tern_exe(), &exe).expect("copy tern");
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let center_log = tmp.path().join("center.log");
    let center = spawn_as(
        Some(("nobody", "nogroup")),
        &exe,
        &["center", "--config", &s(&center_conf)],
        &center_log,
    );
    let admin = std::fs::read_to_string(&admin_file).expect("admin token");
    let admin = admin.trim().to_string();
    wait_until(
        "the center answers on its socket",
        Duration::from_secs(30),
        || {
            if !socket.exists() {
                return Some("no socket yet".into());
            }
            let (status, body) = raw_http(&socket, "GET", "/api/v1/whoami", Some(&admin), None);
            (status != 200).then(|| format!("{status} {body}"))
        },
        &center_log,
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", center.0.id()))
        .expect("the center's status");
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default();
    assert!(
        uid.split_whitespace().skip(1).all(|u| u == "65534"),
        "{uid}"
    );
    let center_env = [
        ("TERN_CENTER", format!("unix:{}", s(&socket))),
        ("TERN_TOKEN", admin.clone()),
    ];
    let env: Vec<(&str, &str)> = center_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = tern(&["cluster", "create", "prod"], &env);
    assert!(out.status.success(), "{}", text(&out));
    let out = tern(&["host", "add", "h1", "-o", "json"], &env);
    assert!(out.status.success(), "{}", text(&out));
    let join: Value = serde_json::from_slice(&out.stdout).expect("join token JSON");
    let token = join["token"].as_str().expect("token").to_string();
    assert!(
        token.ends_with(&fingerprint),
        "{token} does not carry {fingerprint}"
    );

    // The host: bad input refused, with nothing written.
    let host_conf = etc.join("host.toml");
    let center_url = format!("https://{listen}");
    let join_args = |center: &str, token: &str| -> Vec<String> {
        [
            "host",
            "join",
            center,
            "--token",
            token,
            "--name",
            "h1",
            "--cluster",
            "prod",
            "--listen",
            &format!("{ip}:0"),
            "--shared-storage",
            &s(&shared),
            "--state-dir",
            &s(&state),
            "--config",
            &s(&host_conf),
            "--no-enable",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let run_join = |center: &str, token: &str| {
        let args = join_args(center, token);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tern(&args, &[])
    };
    let secret_only = token
        .split(tern_api::center::JOIN_TOKEN_CA_MARK)
        .next()
        .expect("secret");
    for (center, token, why) in [
        (center_url.as_str(), secret_only, "no CA fingerprint"),
        ("ftp://10.0.0.1:21", token.as_str(), "https://IP:PORT"),
        (center_url.as_str(), "two words", "has spaces"),
    ] {
        let out = run_join(center, token);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(text(&out).contains(why), "{}", text(&out));
        assert!(
            !host_conf.exists(),
            "a refused join wrote {}",
            host_conf.display()
        );
    }
    // Another center's token (its CA's fingerprint differs), and a wrong port: the join
    // checks the center first and says so, writing nothing.
    let last = token.chars().last().expect("a fingerprint");
    let other_ca = format!(
        "{}{}",
        &token[..token.len() - 1],
        if last == '0' { '1' } else { '0' }
    );
    for (center, token) in [
        (center_url.as_str(), other_ca.as_str()),
        (&format!("https://{ip}:8799"), token.as_str()),
    ] {
        let out = run_join(center, token);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(
            text(&out).contains("did not answer over TLS with the cluster CA"),
            "{}",
            text(&out)
        );
        assert!(
            !host_conf.exists(),
            "a refused join wrote {}",
            host_conf.display()
        );
    }
    let out = run_join(&center_url, &token);
    assert!(out.status.success(), "{}", text(&out));
    let token_file = etc.join("join.token");
    assert_eq!(mode(&token_file), 0o600);
    assert_eq!(
        std::fs::read_to_string(&token_file)
            .expect("token file")
            .trim(),
        token
    );

    // The agent runs from that config alone, checks the center against the token's CA, and
    // the host shows up connected.
    let agent_log = tmp.path().join("agent.log");
    let _agent = spawn(
        &[
            "host",
            "agent",
            "--config",
            &s(&host_conf),
            "--accel",
            "tcg",
        ],
        &agent_log,
    );
    wait_until(
        "h1 connected",
        Duration::from_secs(60),
        || {
            let out = tern(&["host", "show", "h1", "-o", "json"], &env);
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            (v["state"] != "connected").then(|| format!("{}", v["state"]))
        },
        &agent_log,
    );
    let out = tern(&["host", "show", "h1", "-o", "json"], &env);
    let h1: Value = serde_json::from_slice(&out.stdout).expect("host JSON");
    assert_eq!(h1["cluster"], "prod", "{h1}");
    assert!(
        h1["certificate"]["serial"].as_str().is_some(),
        "no certificate issued: {h1}"
    );
    // Joining twice is refused: the config has settings now.
    let out = run_join(&center_url, &token);
    assert!(!out.status.success());
    assert!(text(&out).contains("set up already"), "{}", text(&out));
}

/// The three .debs of this build, made by `scripts/package.sh` into `out`.
fn build_packages(out: &Path) {
    let run = Command::new("bash")
        .arg(common::repo_root().join("scripts/package.sh"))
        .args(["--binary", &s(&tern_exe()), "--out", &s(out), "--fast"])
        .output()
        .expect("run package.sh");
    assert!(run.status.success(), "{}", text(&run));
}

#[test]
fn packages_carry_the_binary_the_services_and_their_config_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    build_packages(tmp.path());
    let version = env!("CARGO_PKG_VERSION");
    let deb = |name: &str, arch: &str| tmp.path().join(format!("{name}_{version}_{arch}.deb"));
    let arch = String::from_utf8(
        Command::new("dpkg")
            .arg("--print-architecture")
            .output()
            .expect("dpkg")
            .stdout,
    )
    .expect("utf-8")
    .trim()
    .to_string();
    let dpkg_deb = |args: &[&str]| -> String {
        let o = Command::new("dpkg-deb")
            .args(args)
            .output()
            .expect("dpkg-deb");
        assert!(o.status.success(), "dpkg-deb {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let unpack = |deb: &Path| -> PathBuf {
        let dir = tmp.path().join(deb.file_stem().expect("name"));
        dpkg_deb(&["-x", &s(deb), &s(&dir)]);
        dpkg_deb(&["-e", &s(deb), &s(&dir.join("DEBIAN"))]);
        dir
    };

    // The binary package: the binary as built.
    let tern_deb = deb("tern", &arch);
    assert_eq!(dpkg_deb(&["-f", &s(&tern_deb), "Package"]).trim(), "tern");
    let t = unpack(&tern_deb);
    let packaged = t.join("usr/bin/tern");
    assert_eq!(mode(&packaged), 0o755);
    assert_eq!(
        std::fs::metadata(&packaged).expect("binary").len(),
        std::fs::metadata(tern_exe()).expect("binary").len()
    );

    // The service packages: their unit, their conffile, their dependencies.
    for (name, unit, conf, needs) in [
        (
            "tern-center",
            "tern-center.service",
            "center.toml",
            "adduser",
        ),
        (
            "tern-host",
            "tern-host.service",
            "host.toml",
            "qemu-system-x86",
        ),
    ] {
        let d = unpack(&deb(name, "all"));
        let depends = dpkg_deb(&["-f", &s(&deb(name, "all")), "Depends"]);
        assert!(
            depends.contains(&format!("tern (= {version})")),
            "{depends}"
        );
        assert!(depends.contains(needs), "{depends}");
        let conffiles = std::fs::read_to_string(d.join("DEBIAN/conffiles")).expect("conffiles");
        assert_eq!(conffiles.trim(), format!("/etc/tern/{conf}"));
        assert!(d.join("etc/tern").join(conf).exists());
        assert_eq!(mode(&d.join("DEBIAN/postinst")), 0o755);
        // The unit, pointed at the binary under test, passes systemd's own checks.
        let unit_text =
            std::fs::read_to_string(d.join("lib/systemd/system").join(unit)).expect("unit");
        let units = tmp.path().join("units");
        std::fs::create_dir_all(&units).expect("units dir");
        let verified = units.join(unit);
        std::fs::write(
            &verified,
            unit_text.replace("/usr/bin/tern", &s(&tern_exe())),
        )
        .expect("unit copy");
        let o = Command::new("systemd-analyze")
            .args(["verify", "--man=no", &s(&verified)])
            .output()
            .expect("systemd-analyze");
        assert!(o.status.success(), "{unit}: {}", text(&o));
        // Each daemon reads its packaged config (comments only) as a valid, empty one, and
        // init or join fills that template in.
        let template = std::fs::read_to_string(d.join("etc/tern").join(conf)).expect("conf");
        assert!(template
            .lines()
            .all(|l| l.trim().is_empty() || l.starts_with('#')));
        if name == "tern-center" {
            // A strict sandbox: systemd scores its exposure 2.0 or less of 10 (--threshold counts
            // tenths).
            let o = Command::new("systemd-analyze")
                .args(["security", "--offline=yes", "--threshold=20", &s(&verified)])
                .output()
                .expect("systemd-analyze security");
            assert!(o.status.success(), "{}", text(&o));
            let conf_path = d.join("etc/tern").join(conf);
            let o = tern(
                &[
                    "center",
                    "init",
                    "--no-enable",
                    "--config",
                    &s(&conf_path),
                    "--data-dir",
                    &s(&tmp.path().join("center-data")),
                    "--socket",
                    &s(&tmp.path().join("c.sock")),
                ],
                &[],
            );
            assert!(o.status.success(), "{}", text(&o));
            let filled = std::fs::read_to_string(&conf_path).expect("conf");
            assert!(filled.contains("data_dir = "), "{filled}");
        } else {
            // VMs outlive the agent; QEMU keeps its devices and its generated code.
            assert!(unit_text.contains("\nKillMode=process\n"), "{unit_text}");
            for forbidden in ["PrivateDevices=yes", "MemoryDenyWriteExecute=yes"] {
                assert!(!unit_text.contains(forbidden), "{forbidden} breaks QEMU");
            }
        }
    }
}

/// A writable copy of this machine's root (an overlay on a tmpfs: nothing reaches the real
/// one) booted by systemd in a container (systemd-nspawn, no network but its loopback), to
/// `basic.target` only: the machine's own enabled services stay down. Dropped: the container
/// and everything in it are killed and the overlay goes.
struct BootedSystemd {
    nspawn: Option<Child>,
    /// The container's PID 1, as this machine sees it.
    init: u32,
    /// The tmpfs holding the overlay's upper layer; the root is `base/root`.
    base: PathBuf,
}

impl BootedSystemd {
    fn boot(name: &str, log: &Path) -> BootedSystemd {
        let base = PathBuf::from(format!("/run/{name}"));
        let mut booted = BootedSystemd {
            nspawn: None,
            init: 0,
            base: base.clone(),
        };
        let mount = |args: &[&str]| {
            let out = Command::new("mount").args(args).output().expect("mount");
            assert!(out.status.success(), "mount {args:?}: {}", text(&out));
        };
        std::fs::create_dir_all(&base).expect("overlay base");
        mount(&["-t", "tmpfs", "tmpfs", &s(&base)]);
        for d in ["upper", "work", "root"] {
            std::fs::create_dir_all(base.join(d)).expect("overlay dirs");
        }
        let layers = format!(
            "lowerdir=/,upperdir={},workdir={}",
            s(&base.join("upper")),
            s(&base.join("work"))
        );
        mount(&[
            "-t",
            "overlay",
            "overlay",
            "-o",
            &layers,
            &s(&booted.root()),
        ]);
        // The root file system's own /dev holds a few static nodes (under the machine's
        // devtmpfs); nspawn wants an empty one.
        mount(&["-t", "tmpfs", "tmpfs", &s(&booted.root().join("dev"))]);
        let units = booted.root().join("etc/systemd/system");
        std::fs::write(
            units.join("tern-test.target"),
            "[Unit]\nDescription=tern test: basic.target only\nRequires=basic.target\n\
             After=basic.target\nAllowIsolate=yes\n",
        )
        .expect("test target");
        // Masked: with no network configuration in the container, network-online.target (which
        // the units want) would wait two minutes for it.
        let wait_online = units.join("systemd-networkd-wait-online.service");
        let _ = std::fs::remove_file(&wait_online);
        std::os::unix::fs::symlink("/dev/null", wait_online).expect("mask wait-online");

        let logfile = std::fs::File::create(log).expect("container log");
        let nspawn = Command::new("systemd-nspawn")
            .arg("-D")
            .arg(booted.root())
            .args(["--register=no", "--keep-unit", "--private-network"])
            .args(["-M", name, "--quiet", "-b", "systemd.unit=tern-test.target"])
            .stdin(Stdio::null())
            .stdout(logfile.try_clone().expect("log"))
            .stderr(logfile)
            .spawn()
            .expect("systemd-nspawn (scripts/setup.sh installs systemd-container)");
        let pid = nspawn.id();
        booted.nspawn = Some(nspawn);
        // The container's PID 1 is the child of nspawn in a PID namespace of its own, running
        // systemd: nspawn's first child may be a helper that forks it and exits, and a test
        // that took the helper entered a dead process's namespaces.
        let own_ns = std::fs::read_link("/proc/self/ns/pid").expect("own PID namespace");
        booted.init = common::wait_for("the container's init", Duration::from_secs(30), || {
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .ok()?
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
                .find(|c| {
                    let ns = std::fs::read_link(format!("/proc/{c}/ns/pid")).ok();
                    let comm = std::fs::read_to_string(format!("/proc/{c}/comm")).ok();
                    ns.is_some_and(|ns| ns != own_ns)
                        && comm.is_some_and(|comm| comm.trim() == "systemd")
                })
        });
        common::wait_for("systemd to boot", Duration::from_secs(60), || {
            let out = booted.systemctl(&["is-system-running"]);
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            matches!(state.as_str(), "running" | "degraded").then_some(())
        });
        booted
    }

    fn root(&self) -> PathBuf {
        self.base.join("root")
    }

    /// `cmd` inside the container's namespaces `ns` (nsenter's flags).
    fn run(&self, ns: &[&str], cmd: &[&str]) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.init.to_string()])
            .args(ns)
            .args(cmd)
            .stdin(Stdio::null())
            .output()
            .expect("nsenter")
    }

    /// `cmd` in the container, asserting success.
    fn ok(&self, cmd: &[&str]) -> String {
        let out = self.run(&["-m", "-p"], cmd);
        assert!(out.status.success(), "{cmd:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn systemctl(&self, args: &[&str]) -> Output {
        let mut cmd = vec!["systemctl"];
        cmd.extend(args);
        self.run(&["-m", "-p"], &cmd)
    }

    /// One property of the agent's unit.
    fn agent_unit(&self, property: &str) -> String {
        let out = self.systemctl(&["show", "tern-host", "-p", property, "--value"]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A file of the container, read through its PID 1 (its /proc too).
    fn read(&self, path: &str) -> Option<String> {
        std::fs::read_to_string(format!("/proc/{}/root{path}", self.init)).ok()
    }
}

impl Drop for BootedSystemd {
    fn drop(&mut self) {
        // Killing the container's PID 1 kills every process of its PID namespace (the VMs).
        if self.init != 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.init as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(mut n) = self.nspawn.take() {
            // Without a known init (the test failed before it was found), nspawn itself goes:
            // waiting for it would hang the test instead of failing it.
            if self.init == 0 {
                let _ = n.kill();
            }
            let _ = n.wait();
        }
        for m in [self.root().join("dev"), self.root(), self.base.clone()] {
            let _ = Command::new("umount").arg(&m).output();
        }
        let _ = std::fs::remove_dir(&self.base);
    }
}

/// The packages' whole life on a booted systemd (a container over a copy of this machine's
/// root): `dpkg -i` installs the binary, the disabled units and a system user; the agent,
/// enabled and started from its unit, runs a VM; `systemctl restart`, and a stop and a start
/// (an upgrade), leave the VM's QEMU running and each new agent adopts it (the unit's
/// `KillMode=process`: systemd's default would kill the VMs); `dpkg -r` stops the agent, not the
/// VM, and keeps the config; `dpkg -P` removes the config and the binary.
#[test]
fn packages_install_and_the_agent_unit_keeps_vms_across_restart_stop_and_removal() {
    let tmp = tempfile::tempdir().expect("tempdir");
    build_packages(tmp.path());
    let name = format!("tern-sd-{}", std::process::id());
    let c = BootedSystemd::boot(&name, &tmp.path().join("container.log"));
    let root = c.root();
    assert!(
        !Path::new("/usr/bin/tern").exists() || root.join("usr/bin/tern").exists(),
        "test precondition"
    );
    let debs = root.join("var/tmp/tern-debs");
    std::fs::create_dir_all(&debs).expect("debs dir");
    let version = env!("CARGO_PKG_VERSION");
    let mut install = vec!["dpkg".to_string(), "-i".into()];
    for deb in [
        format!("tern_{version}_amd64.deb"),
        format!("tern-center_{version}_all.deb"),
        format!("tern-host_{version}_all.deb"),
    ] {
        std::fs::copy(tmp.path().join(&deb), debs.join(&deb)).expect("copy a package");
        install.push(format!("/var/tmp/tern-debs/{deb}"));
    }
    let install: Vec<&str> = install.iter().map(String::as_str).collect();
    c.ok(&install);
    assert!(
        !Path::new("/usr/bin/tern").exists(),
        "the package reached this machine's own root"
    );
    let units = c.ok(&["systemctl", "list-unit-files", "tern-*", "--no-legend"]);
    for unit in ["tern-center.service", "tern-host.service"] {
        assert!(
            units
                .lines()
                .any(|l| l.starts_with(unit) && l.contains("disabled")),
            "{unit} not shipped disabled: {units}"
        );
    }
    assert!(c.ok(&["getent", "passwd", "tern"]).contains("nologin"));

    // The agent's config, as an operator (or `tern host join`) writes it; shared storage
    // outside /tmp and /var/tmp, which the unit makes private to the agent.
    std::fs::write(
        root.join("etc/tern/host.toml"),
        "name = \"h1\"\ncluster = \"lab\"\nlisten = \"127.0.0.1:8701\"\n\
         shared_storage = \"/srv/tern/shared\"\naccel = \"tcg\"\n",
    )
    .expect("host.toml");
    let shared = root.join("srv/tern/shared/guest");
    std::fs::create_dir_all(&shared).expect("shared dir");
    let guest = common::guest_dir();
    for f in ["vmlinuz", "initramfs.img"] {
        std::fs::copy(guest.join(f), shared.join(f)).expect("copy the guest");
    }
    c.ok(&["systemctl", "enable", "--now", "tern-host"]);

    let token = common::wait_for("the agent's token", Duration::from_secs(30), || {
        c.read("/var/lib/tern/host/agent.token")
            .filter(|t| !t.trim().is_empty())
    });
    let token = token.trim().to_string();
    let call = |method: &str, path: &str, body: Option<&str>| -> (u16, Value) {
        let auth = format!("authorization: Bearer {token}");
        let url = format!("http://127.0.0.1:8701{path}");
        let mut cmd = vec![
            "curl",
            "-s",
            "-m",
            "60",
            "-X",
            method,
            "-H",
            &auth,
            "-w",
            "\n%{http_code}",
        ];
        if let Some(b) = body {
            cmd.extend(["-H", "content-type: application/json", "--data", b]);
        }
        cmd.push(&url);
        let out = c.run(&["-n"], &cmd);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        (
            status.trim().parse().unwrap_or(0),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    };
    let id = uuid::Uuid::new_v4();
    let vm_path = format!("/v1/vms/{id}");
    let start = serde_json::json!({
        "spec": {
            "name": "sd1", "vcpus": 1, "memory_mib": 128,
            "boot": {
                "kind": "kernel",
                "kernel": "/srv/tern/shared/guest/vmlinuz",
                "initrd": "/srv/tern/shared/guest/initramfs.img",
                "cmdline": "console=ttyS0",
            },
            "disks": [], "nics": [],
        },
        "generation": 1,
    });
    common::wait_for("the agent's API", Duration::from_secs(60), || {
        (call("GET", "/v1/facts", None).0 == 200).then_some(())
    });
    let (status, vm) = call("PUT", &vm_path, Some(&start.to_string()));
    assert_eq!(status, 200, "starting the VM: {vm}");
    let qemu = common::wait_for("the VM running", Duration::from_secs(60), || {
        let (status, vm) = call("GET", &vm_path, None);
        (status == 200 && vm["state"] == "running").then(|| vm["pid"].as_u64())?
    });
    // Where the unit put QEMU: with the agent, in its cgroup (what KillMode governs).
    let cgroup = c.read(&format!("/proc/{qemu}/cgroup")).unwrap_or_default();
    assert!(cgroup.contains("tern-host.service"), "{cgroup}");
    let qemu_alive = || {
        c.read(&format!("/proc/{qemu}/cmdline"))
            .is_some_and(|cmd| cmd.starts_with("qemu-system"))
    };

    let agent_adopts = |what: &str, old_agent: &str| {
        common::wait_for(what, Duration::from_secs(60), || {
            let pid = c.agent_unit("MainPID");
            (pid != "0" && pid != old_agent).then_some(())?;
            let (status, vm) = call("GET", &vm_path, None);
            (status == 200).then_some(vm)
        })
    };
    let before = c.agent_unit("MainPID");
    c.ok(&["systemctl", "restart", "tern-host"]);
    let vm = agent_adopts("the restarted agent", &before);
    assert_eq!(vm["state"], "running", "the restart lost the VM: {vm}");
    assert_eq!(vm["pid"].as_u64(), Some(qemu), "{vm}");

    let before = c.agent_unit("MainPID");
    c.ok(&["systemctl", "stop", "tern-host"]);
    assert_eq!(c.agent_unit("ActiveState"), "inactive");
    assert!(qemu_alive(), "stopping the agent stopped the VM");
    c.ok(&["systemctl", "start", "tern-host"]);
    let vm = agent_adopts("the agent started again", &before);
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["pid"].as_u64(), Some(qemu), "{vm}");
    let journal = c.ok(&["journalctl", "-u", "tern-host", "--no-pager", "-o", "cat"]);
    assert_eq!(
        journal.matches("re-adopted running VM").count(),
        2,
        "{journal}"
    );

    // Removal stops the agent, not its VM, and keeps the operator's config; purge takes that.
    c.ok(&["dpkg", "-r", "tern-host"]);
    assert_eq!(c.agent_unit("ActiveState"), "inactive");
    assert!(qemu_alive(), "removing the agent's package stopped the VM");
    assert!(root.join("etc/tern/host.toml").exists());
    assert!(!root.join("lib/systemd/system/tern-host.service").exists());
    c.ok(&["dpkg", "-P", "tern-host"]);
    assert!(!root.join("etc/tern/host.toml").exists());
    c.ok(&["dpkg", "-P", "tern-center", "tern"]);
    assert!(!root.join("usr/bin/tern").exists());
    let left = c.run(
        &["-m", "-p"],
        &["dpkg-query", "-W", "-f", "${Package} ${Status}\\n", "tern*"],
    );
    assert!(
        !String::from_utf8_lossy(&left.stdout).contains("ok installed"),
        "packages left after purge: {}",
        text(&left)
    );
}
