//! The guest's PID 1: mounts the kernel filesystems, loads the virtio modules, configures eth0
//! from the kernel command line, starts the requested services, prints the readiness line and
//! powers off on the ACPI power button.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::disk::DiskState;
use crate::services::{boot_id_bytes, uptime_ms, Services};
use crate::{burn, disk, mem, serve};

/// Module files to load, in dependency order (written by guest/build.sh).
pub const MODULE_LIST: &str = "/etc/tern/modules";
/// Verify share of the memory verifier unless `tern.verify` says otherwise.
pub const DEFAULT_VERIFY_PERCENT: u32 = 25;

/// What the kernel command line asks for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GuestConfig {
    /// `tern.ip=A.B.C.D/PREFIX`
    pub ip: Option<(Ipv4Addr, u8)>,
    /// `tern.gw=A.B.C.D`
    pub gw: Option<Ipv4Addr>,
    /// `tern.serve=PORT`
    pub serve_port: Option<u16>,
    /// `tern.mem=MIB`
    pub mem_mib: Option<u64>,
    /// `tern.dirty=MIB_PER_S` (needs tern.mem)
    pub dirty_mib_s: u64,
    /// `tern.verify=PERCENT` of each tick the memory verifier spends checking.
    pub verify_percent: u32,
    /// `tern.disk=/dev/vda`
    pub disk: Option<String>,
    /// `tern.diskrate=RECORDS_PER_S`
    pub disk_rate_per_s: u32,
    /// `tern.burn=PERCENT`
    pub burn_percent: Option<u32>,
    /// `tern.shell=1`: a shell on the console after ready.
    pub shell: bool,
}

fn parse_num<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{key}={value}: not a valid number"))
}

/// Parses the `tern.*` parameters of a kernel command line; other parameters are ignored.
pub fn parse_cmdline(cmdline: &str) -> Result<GuestConfig, String> {
    let mut c = GuestConfig {
        verify_percent: DEFAULT_VERIFY_PERCENT,
        disk_rate_per_s: disk::DEFAULT_RATE_PER_S,
        ..GuestConfig::default()
    };
    for param in cmdline.split_whitespace() {
        let Some((key, value)) = param.split_once('=') else {
            continue;
        };
        match key {
            "tern.ip" => {
                let (addr, prefix) = value
                    .split_once('/')
                    .ok_or_else(|| format!("tern.ip={value}: expected A.B.C.D/PREFIX"))?;
                let addr: Ipv4Addr = addr
                    .parse()
                    .map_err(|_| format!("tern.ip={value}: bad address"))?;
                let prefix: u8 = parse_num(key, prefix)?;
                if prefix > 32 {
                    return Err(format!("tern.ip={value}: prefix above 32"));
                }
                c.ip = Some((addr, prefix));
            }
            "tern.gw" => {
                c.gw = Some(
                    value
                        .parse()
                        .map_err(|_| format!("tern.gw={value}: bad address"))?,
                )
            }
            "tern.serve" => c.serve_port = Some(parse_num(key, value)?),
            "tern.mem" => c.mem_mib = Some(parse_num(key, value)?),
            "tern.dirty" => c.dirty_mib_s = parse_num(key, value)?,
            "tern.verify" => c.verify_percent = parse_num::<u32>(key, value)?.min(100),
            "tern.disk" => c.disk = Some(value.to_string()),
            "tern.diskrate" => c.disk_rate_per_s = parse_num(key, value)?,
            "tern.burn" => c.burn_percent = Some(parse_num::<u32>(key, value)?.min(100)),
            "tern.shell" => c.shell = value == "1",
            k if k.starts_with("tern.") => return Err(format!("unknown parameter {param}")),
            _ => {}
        }
    }
    if c.dirty_mib_s > 0 && c.mem_mib.is_none() {
        return Err("tern.dirty needs tern.mem".into());
    }
    Ok(c)
}

fn mount(source: &str, target: &str, fstype: &str) -> io::Result<()> {
    std::fs::create_dir_all(target)?;
    let c = |s: &str| CString::new(s).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e));
    let (source, target_c, fstype) = (c(source)?, c(target)?, c(fstype)?);
    // SAFETY: mount(2) with valid NUL-terminated strings and no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(io::Error::new(e.kind(), format!("mount {target}: {e}")));
        }
    }
    Ok(())
}

fn load_module(path: &Path) -> io::Result<()> {
    let file = File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let params = c"";
    // SAFETY: finit_module(2) on an open file descriptor with an empty parameter string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(io::Error::new(
                e.kind(),
                format!("load {}: {e}", path.display()),
            ));
        }
    }
    Ok(())
}

fn load_modules() -> io::Result<()> {
    let list = std::fs::read_to_string(MODULE_LIST)
        .map_err(|e| io::Error::new(e.kind(), format!("{MODULE_LIST}: {e}")))?;
    for line in list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        load_module(Path::new(line))?;
    }
    Ok(())
}

fn run_ip(args: &[&str]) -> io::Result<()> {
    let status = Command::new("/bin/ip").args(args).status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {} failed: {status}",
            args.join(" ")
        )))
    }
}

fn wait_for(path: &Path, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} did not appear", path.display()),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn setup_network(config: &GuestConfig) -> io::Result<()> {
    run_ip(&["link", "set", "lo", "up"])?;
    let Some((addr, prefix)) = config.ip else {
        return Ok(());
    };
    wait_for(Path::new("/sys/class/net/eth0"), Duration::from_secs(10))?;
    run_ip(&["addr", "add", &format!("{addr}/{prefix}"), "dev", "eth0"])?;
    run_ip(&["link", "set", "eth0", "up"])?;
    if let Some(gw) = config.gw {
        run_ip(&["route", "add", "default", "via", &gw.to_string()])?;
    }
    // Tell the LAN where this MAC lives now; reaped by PID 1's loop.
    let _ = Command::new("/bin/arping")
        .args(["-q", "-U", "-c", "1", "-I", "eth0", &addr.to_string()])
        .spawn();
    Ok(())
}

/// RAM the VM was given, MiB: the firmware's (e820) "System RAM" ranges rounded up, which is the
/// `-m` size to within a MiB; MemTotal (smaller: the kernel's own share is gone) otherwise.
pub fn memory_mib() -> u64 {
    let mut bytes: u64 = 0;
    if let Ok(entries) = std::fs::read_dir("/sys/firmware/memmap") {
        for entry in entries.flatten() {
            let read =
                |name: &str| std::fs::read_to_string(entry.path().join(name)).unwrap_or_default();
            if read("type").trim() != "System RAM" {
                continue;
            }
            let hex = |s: String| u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok();
            if let (Some(start), Some(end)) = (hex(read("start")), hex(read("end"))) {
                bytes += end.saturating_sub(start) + 1;
            }
        }
    }
    if bytes > 0 {
        return bytes.div_ceil(1 << 20);
    }
    meminfo_mib("MemTotal").unwrap_or(0)
}

/// The journal to stop before powering off, once it runs.
static JOURNAL: OnceLock<Arc<DiskState>> = OnceLock::new();

/// Watches each ACPI power button input device; powers off on a press.
fn watch_power_buttons() {
    let Ok(entries) = std::fs::read_dir("/sys/class/input") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.starts_with("event") {
            continue;
        }
        let dev_name =
            std::fs::read_to_string(entry.path().join("device/name")).unwrap_or_default();
        if dev_name.trim() != "Power Button" {
            continue;
        }
        let spawned = std::thread::Builder::new()
            .name(format!("power-{name}"))
            .spawn(move || {
                if let Err(e) = wait_for_power_key(&format!("/dev/input/{name}")) {
                    eprintln!("tern-guest: power button {name}: {e}");
                    return;
                }
                power_off();
            });
        if let Err(e) = spawned {
            eprintln!("tern-guest: cannot watch power button: {e}");
        }
    }
}

/// Blocks until a KEY_POWER press arrives on an evdev device.
fn wait_for_power_key(path: &str) -> io::Result<()> {
    const EV_KEY: u16 = 1;
    const KEY_POWER: u16 = 116;
    let mut dev = File::open(path)?;
    // struct input_event on x86_64: timeval (16 bytes), type u16, code u16, value i32.
    let mut ev = [0u8; 24];
    loop {
        dev.read_exact(&mut ev)?;
        let kind = u16::from_ne_bytes([ev[16], ev[17]]);
        let code = u16::from_ne_bytes([ev[18], ev[19]]);
        let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
        if kind == EV_KEY && code == KEY_POWER && value == 1 {
            return Ok(());
        }
    }
}

fn power_off() -> ! {
    println!("TERN-GUEST-POWEROFF uptime_ms={}", uptime_ms().unwrap_or(0));
    if let Some(disk) = JOURNAL.get() {
        disk.stop_appending();
    }
    // SAFETY: sync(2) and reboot(2) take no pointers; PID 1 may power the machine off.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    let e = io::Error::last_os_error();
    eprintln!("TERN-GUEST-ERROR poweroff failed: {e}");
    reap_forever()
}

/// PID 1 duty: collect every orphan. (No `Command::status()` may run once this loop has started:
/// it would steal that child's exit status.)
fn reap_forever() -> ! {
    loop {
        let mut status = 0;
        // SAFETY: waitpid(2) with a valid pointer to a local int.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// A `/proc/meminfo` value in MiB.
fn meminfo_mib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = text
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?;
    kib.trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()
        .map(|k| k / 1024)
}

/// Headroom the kernel and the other services keep beyond `tern.mem`.
const MEM_HEADROOM_MIB: u64 = 16;

fn start_services(config: &GuestConfig) -> io::Result<Arc<Services>> {
    let mut services = Services::new()?;
    if let Some(mib) = config.mem_mib {
        // Fail with a message rather than an out-of-memory abort of PID 1 (a kernel panic).
        if let Some(available) = meminfo_mib("MemAvailable") {
            if mib + MEM_HEADROOM_MIB > available {
                return Err(io::Error::other(format!(
                    "tern.mem={mib} does not fit: {available} MiB available, {MEM_HEADROOM_MIB} MiB kept free"
                )));
            }
        }
        services.mem = Some(mem::start(mem::MemConfig {
            mib,
            dirty_mib_s: config.dirty_mib_s,
            verify_percent: config.verify_percent,
        })?);
    }
    if let Some(dev) = &config.disk {
        wait_for(Path::new(dev), Duration::from_secs(10))?;
        let state = disk::start(
            Path::new(dev),
            config.disk_rate_per_s,
            boot_id_bytes(&services.boot_id),
        )?;
        let _ = JOURNAL.set(state.clone());
        services.disk = Some((dev.clone(), state));
    }
    if let Some(percent) = config.burn_percent {
        burn::start(percent)?;
        services.burn_percent = Some(percent);
    }
    let services = Arc::new(services);
    if let Some(port) = config.serve_port {
        serve::start(port, services.clone())?;
        crate::rr::start(crate::rr::DEFAULT_PORT, services.clone())?;
    }
    Ok(services)
}

fn boot() -> Result<(GuestConfig, Arc<Services>), String> {
    for (source, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
    ] {
        mount(source, target, fstype).map_err(|e| e.to_string())?;
    }
    // Quiet console: only emergencies, alerts and critical kernel messages.
    let _ = std::fs::write("/proc/sys/kernel/printk", "3 4 1 7");
    load_modules().map_err(|e| e.to_string())?;
    // First, so that even a guest whose services failed powers off on request.
    watch_power_buttons();
    let cmdline =
        std::fs::read_to_string("/proc/cmdline").map_err(|e| format!("/proc/cmdline: {e}"))?;
    let config = parse_cmdline(&cmdline)?;
    setup_network(&config).map_err(|e| format!("network: {e}"))?;
    let services = start_services(&config).map_err(|e| format!("services: {e}"))?;
    Ok((config, services))
}

/// Runs as the guest's PID 1; never returns.
pub fn run() -> ! {
    match boot() {
        Ok((config, _services)) => {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            let ip = config
                .ip
                .map_or_else(|| "none".to_string(), |(a, _)| a.to_string());
            println!(
                "TERN-GUEST-READY uptime_ms={} cpus={cpus} mem_mib={} ip={ip}",
                uptime_ms().unwrap_or(0),
                memory_mib()
            );
            if config.shell {
                let _ = Command::new("/bin/setsid").args(["-c", "/bin/sh"]).spawn();
            }
        }
        Err(e) => eprintln!("TERN-GUEST-ERROR init: {e}"),
    }
    reap_forever()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_contract_parameters() {
        let c = parse_cmdline(
            "console=ttyS0 quiet tern.ip=10.78.0.100/24 tern.gw=10.78.0.1 tern.serve=7000 \
             tern.mem=64 tern.dirty=32 tern.disk=/dev/vda tern.burn=50 ipv6.disable=1",
        )
        .expect("valid cmdline");
        assert_eq!(c.ip, Some((Ipv4Addr::new(10, 78, 0, 100), 24)));
        assert_eq!(c.gw, Some(Ipv4Addr::new(10, 78, 0, 1)));
        assert_eq!(c.serve_port, Some(7000));
        assert_eq!(c.mem_mib, Some(64));
        assert_eq!(c.dirty_mib_s, 32);
        assert_eq!(c.disk.as_deref(), Some("/dev/vda"));
        assert_eq!(c.burn_percent, Some(50));
        assert_eq!(c.verify_percent, DEFAULT_VERIFY_PERCENT);
        assert!(!c.shell);
    }

    #[test]
    fn rejects_bad_parameters() {
        assert!(parse_cmdline("tern.ip=10.0.0.1").is_err());
        assert!(parse_cmdline("tern.ip=10.0.0.300/24").is_err());
        assert!(parse_cmdline("tern.ip=10.0.0.1/33").is_err());
        assert!(parse_cmdline("tern.serve=http").is_err());
        assert!(parse_cmdline("tern.dirty=5").is_err());
        assert!(parse_cmdline("tern.typo=1").is_err());
        assert_eq!(
            parse_cmdline("root=/dev/sda").expect("no tern params").ip,
            None
        );
    }
}
