//! tern-guest command line: `init` (PID 1), `serve`, `mem`, `disk`, `burn`, `client`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tern_guest::client::{self, ClientOptions};
use tern_guest::services::{boot_id_bytes, Services};
use tern_guest::{arp, burn, disk, init, mem, proto, rr, serve};

const USAGE: &str = "\
usage: tern-guest <command> [options]

  init                              run as the guest's PID 1 (reads tern.* from /proc/cmdline);
                                    also chosen when started as PID 1
  serve --port P [--rr-port P] [--mem-mib N] [--dirty-mib-s R] [--disk DEV] [--burn-percent P]
                                    serve the record stream and the request port (and run the
                                    other services)
  mem --mib N --dirty-mib-s R [--verify-percent V]
                                    fill N MiB, dirty R MiB/s, verify continuously
  disk --dev DEV [--rate N]         verify the journal on DEV, then append N records/s
  burn --percent P                  keep P% of all CPUs busy
  client --addr IP:PORT --duration-ms N [--json] [--connect-timeout-ms N] [--stop-file F]
                                    read the stream (until F exists, if given); exit 1 if it
                                    broke
  client --addr IP:PORT --stats     print the guest's stats JSON
  rr --addr IP:PORT [--interval-ms 1] --duration-ms N [--stop-file F] [--connect-timeout-ms N]
                                    send a numbered request every interval to the request
                                    port (7001) and check every answer; prints a JSON report
                                    (longest wait, TCP retransmits); exit 1 if any request
                                    went unanswered or the connection broke
  client --addr IP:PORT --cpuinfo   print the guest's /proc/cpuinfo
  arp --iface IF --source IP --target IP [--interval-ms 2] --duration-ms N [--stop-file F]
      [--ready-file F]
                                    broadcast an ARP request for TARGET every interval, as a
                                    client without an entry for it would, and note when each
                                    answer came; prints a JSON report (answering MACs, gaps
                                    between answers on CLOCK_REALTIME µs; F made at the first
                                    answer); exit 1 if nothing answered or two MACs did
";

/// `--key value` / `--key=value` options; flags without a value map to "".
struct Opts {
    values: HashMap<String, String>,
}

impl Opts {
    fn parse(args: &[String], flags: &[&str], valued: &[&str]) -> Result<Self, String> {
        let mut values = HashMap::new();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let Some(name) = arg.strip_prefix("--") else {
                return Err(format!("unexpected argument {arg:?}"));
            };
            let (name, inline) = match name.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (name, None),
            };
            if flags.contains(&name) {
                values.insert(name.to_string(), String::new());
            } else if valued.contains(&name) {
                let v = match inline {
                    Some(v) => v,
                    None => it
                        .next()
                        .cloned()
                        .ok_or_else(|| format!("--{name} needs a value"))?,
                };
                values.insert(name.to_string(), v);
            } else {
                return Err(format!("unknown option --{name}"));
            }
        }
        Ok(Self { values })
    }

    fn flag(&self, name: &str) -> bool {
        self.values.contains_key(name)
    }

    fn get<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, String> {
        self.values
            .get(name)
            .map(|v| {
                v.parse()
                    .map_err(|_| format!("--{name} {v:?}: invalid value"))
            })
            .transpose()
    }

    fn need<T: std::str::FromStr>(&self, name: &str) -> Result<T, String> {
        self.get(name)?
            .ok_or_else(|| format!("--{name} is required"))
    }
}

/// Parks the main thread while the service threads run.
fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

fn cmd_serve(o: &Opts) -> Result<ExitCode, String> {
    let port: u16 = o.get("port")?.unwrap_or(proto::DEFAULT_PORT);
    let mut services = Services::new().map_err(|e| e.to_string())?;
    if let Some(mib) = o.get::<u64>("mem-mib")? {
        let config = mem::MemConfig {
            mib,
            dirty_mib_s: o.get("dirty-mib-s")?.unwrap_or(0),
            verify_percent: init::DEFAULT_VERIFY_PERCENT,
        };
        services.mem = Some(mem::start(config).map_err(|e| e.to_string())?);
    }
    if let Some(dev) = o.get::<String>("disk")? {
        let state = disk::start(
            Path::new(&dev),
            disk::DEFAULT_RATE_PER_S,
            boot_id_bytes(&services.boot_id),
        )
        .map_err(|e| e.to_string())?;
        services.disk = Some((dev, state));
    }
    if let Some(percent) = o.get::<u32>("burn-percent")? {
        burn::start(percent).map_err(|e| e.to_string())?;
        services.burn_percent = Some(percent);
    }
    let rr_port: u16 = o.get("rr-port")?.unwrap_or(rr::DEFAULT_PORT);
    let services = Arc::new(services);
    let addr = serve::start(port, services.clone()).map_err(|e| e.to_string())?;
    let rr_addr = rr::start(rr_port, services).map_err(|e| e.to_string())?;
    eprintln!("tern-guest: serving on {addr}, requests on {rr_addr}");
    park_forever()
}

/// Prints a standalone service's stats every 10 s.
fn report_forever(services: &Services) -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(10));
        println!("{}", services.stats_json());
    }
}

fn cmd_mem(o: &Opts) -> Result<ExitCode, String> {
    let config = mem::MemConfig {
        mib: o.need("mib")?,
        dirty_mib_s: o.get("dirty-mib-s")?.unwrap_or(0),
        verify_percent: o
            .get("verify-percent")?
            .unwrap_or(init::DEFAULT_VERIFY_PERCENT),
    };
    let mut services = Services::new().map_err(|e| e.to_string())?;
    services.mem = Some(mem::start(config).map_err(|e| e.to_string())?);
    report_forever(&services)
}

fn cmd_disk(o: &Opts) -> Result<ExitCode, String> {
    let dev: String = o.need("dev")?;
    let rate = o.get("rate")?.unwrap_or(disk::DEFAULT_RATE_PER_S);
    let mut services = Services::new().map_err(|e| e.to_string())?;
    let state = disk::start(Path::new(&dev), rate, boot_id_bytes(&services.boot_id))
        .map_err(|e| e.to_string())?;
    services.disk = Some((dev, state));
    report_forever(&services)
}

fn cmd_burn(o: &Opts) -> Result<ExitCode, String> {
    burn::start(o.need("percent")?).map_err(|e| e.to_string())?;
    park_forever()
}

fn cmd_client(o: &Opts) -> Result<ExitCode, String> {
    let addr: SocketAddr = o.need("addr")?;
    let connect_timeout = Duration::from_millis(o.get("connect-timeout-ms")?.unwrap_or(5000));
    if o.flag("stats") {
        let json = client::fetch_stats(addr, connect_timeout.max(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        println!("{json}");
        return Ok(ExitCode::SUCCESS);
    }
    if o.flag("cpuinfo") {
        let text = client::fetch_cpuinfo(addr, connect_timeout.max(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        print!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    let mut options = ClientOptions::new(addr, Duration::from_millis(o.need("duration-ms")?));
    options.connect_timeout = connect_timeout;
    options.stop_file = o.values.get("stop-file").map(std::path::PathBuf::from);
    let report = client::run(&options).map_err(|e| e.to_string())?;
    if o.flag("json") {
        println!("{}", report.to_json());
    } else {
        println!("{}", report.to_text());
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn cmd_rr(o: &Opts) -> Result<ExitCode, String> {
    let options = rr::RrOptions {
        addr: o.need("addr")?,
        interval: Duration::from_millis(o.get("interval-ms")?.unwrap_or(1)),
        duration: Duration::from_millis(o.need("duration-ms")?),
        connect_timeout: Duration::from_millis(o.get("connect-timeout-ms")?.unwrap_or(5000)),
        stop_file: o.values.get("stop-file").map(std::path::PathBuf::from),
    };
    if options.interval.is_zero() {
        return Err("--interval-ms must be at least 1".into());
    }
    let report = rr::run(&options).map_err(|e| e.to_string())?;
    println!("{}", report.to_json());
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn cmd_arp(o: &Opts) -> Result<ExitCode, String> {
    let options = arp::ArpOptions {
        iface: o.need("iface")?,
        source: o.need("source")?,
        target: o.need("target")?,
        interval: Duration::from_millis(o.get("interval-ms")?.unwrap_or(2)),
        duration: Duration::from_millis(o.need("duration-ms")?),
        stop_file: o.values.get("stop-file").map(std::path::PathBuf::from),
        ready_file: o.values.get("ready-file").map(std::path::PathBuf::from),
    };
    if options.interval.is_zero() {
        return Err("--interval-ms must be at least 1".into());
    }
    let report = arp::run(&options).map_err(|e| format!("{}: {e}", options.iface))?;
    println!("{}", report.to_json());
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn main() -> ExitCode {
    if std::process::id() == 1 {
        init::run();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    let result = match command.as_str() {
        "init" => Err("init runs only as PID 1 (the guest's /init)".to_string()),
        "serve" => Opts::parse(
            rest,
            &[],
            &[
                "port",
                "rr-port",
                "mem-mib",
                "dirty-mib-s",
                "disk",
                "burn-percent",
            ],
        )
        .and_then(|o| cmd_serve(&o)),
        "mem" => Opts::parse(rest, &[], &["mib", "dirty-mib-s", "verify-percent"])
            .and_then(|o| cmd_mem(&o)),
        "disk" => Opts::parse(rest, &[], &["dev", "rate"]).and_then(|o| cmd_disk(&o)),
        "burn" => Opts::parse(rest, &[], &["percent"]).and_then(|o| cmd_burn(&o)),
        "client" => Opts::parse(
            rest,
            &["json", "stats", "cpuinfo"],
            &["addr", "duration-ms", "connect-timeout-ms", "stop-file"],
        )
        .and_then(|o| cmd_client(&o)),
        "rr" => Opts::parse(
            rest,
            &[],
            &[
                "addr",
                "interval-ms",
                "duration-ms",
                "stop-file",
                "connect-timeout-ms",
            ],
        )
        .and_then(|o| cmd_rr(&o)),
        "arp" => Opts::parse(
            rest,
            &[],
            &[
                "iface",
                "source",
                "target",
                "interval-ms",
                "duration-ms",
                "stop-file",
                "ready-file",
            ],
        )
        .and_then(|o| cmd_arp(&o)),
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        "--version" | "version" => {
            println!("tern-guest {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        other => Err(format!("unknown command {other:?}\n{USAGE}")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tern-guest: {e}");
            ExitCode::from(2)
        }
    }
}
