//! The web client's benchmark (`bench/ui/run.sh`; ignored in the test suite, which runs
//! `web_client.rs` instead), on a lab center seeded with 1,000 hosts and 20,000 VMs:
//! - the REST API's whole listings (`/vms`, `/hosts`) against what the page asks for (the
//!   summary and one page of hosts): time and bytes, each the median of 5;
//! - in headless Chromium: time to first render (navigation start until the counts and the
//!   first page of the tree are on screen) and to a search result (typing a name until its
//!   link shows, the page's 250 ms debounce included), each the median of 5;
//! - the center's resident memory just started, after the runs above with no stream open,
//!   and with 50 open event streams.
//!
//! Prints a markdown table.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::browser::{open_ui, sign_in, Browser};
use common::{raw_http, Lab};
use serde_json::Value;

const RUNS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median time and the size of a GET over the center's unix socket.
fn time_get(lab: &Lab, path: &str) -> (f64, usize) {
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..RUNS {
        let t = Instant::now();
        let (status, body) = raw_http(&lab.socket(), "GET", path, Some(&lab.token()), None);
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(status, 200, "{path}: {body}");
        size = body.len();
    }
    (median(times), size)
}

/// The center's resident memory, from /proc.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("center status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kib / 1024.0
}

/// The open streams the center's metrics count.
fn open_streams(lab: &Lab) -> i64 {
    let (_, body) = raw_http(&lab.socket(), "GET", "/metrics", Some(&lab.token()), None);
    body.lines()
        .find_map(|l| l.strip_prefix("tern_event_streams "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1)
}

#[test]
#[ignore = "a benchmark: bench/ui/run.sh runs it"]
fn ui_at_a_thousand_hosts() {
    let mut lab = Lab::up("uibench", 1);
    let seeded = lab.lab_cmd(&["lab", "seed", "--hosts", "1000", "--vms", "20000"]);
    assert!(seeded.status.success(), "{}", common::text(&seeded));

    let pid = lab.pid("center");
    let fresh_rss = rss_mib(pid);
    // The REST API: everything, against what the page asks for at first.
    let (all_vms_ms, all_vms_b) = time_get(&lab, "/api/v1/vms");
    let (all_hosts_ms, all_hosts_b) = time_get(&lab, "/api/v1/hosts");
    let (summary_ms, summary_b) = time_get(&lab, "/api/v1/summary");
    let (page_ms, page_b) = time_get(&lab, "/api/v1/hosts?cluster=scale&limit=100");
    let (search_api_ms, _) = time_get(&lab, "/api/v1/vms?q=v19999&limit=50");

    // The page, in Chromium.
    let (mut ui, base) = open_ui(&lab);
    let b = Browser::start();
    sign_in(&b, &base, &lab.token(), "admin");
    let mut first_render = Vec::new();
    let mut page_bytes = 0.0;
    for _ in 0..RUNS {
        b.goto(&format!("{base}#/"));
        // A reload signs in again from the session's saved token.
        b.run("location.reload(); return 1;");
        let ms = b.run_async(
            "const done = arguments[arguments.length - 1];\n\
             const t0 = Date.now();\n\
             (function poll() {\n\
               const c = document.querySelector('#overview-vms');\n\
               const h = document.querySelector('a.tree-host[data-host=s0001]');\n\
               if (c && /20\\D?000/.test(c.textContent) && h) {\n\
                 const bytes = performance.getEntriesByType('resource')\n\
                   .reduce((s, e) => s + (e.transferSize || 0), 0);\n\
                 return done([performance.now(), bytes]);\n\
               }\n\
               if (Date.now() - t0 > 60000) return done([-1, 0]);\n\
               setTimeout(poll, 5);\n\
             })();",
        );
        let got = ms.as_array().cloned().unwrap_or_default();
        let t = got.first().and_then(Value::as_f64).unwrap_or(-1.0);
        assert!(
            t > 0.0,
            "the page did not render the inventory: {}",
            b.page_text()
        );
        first_render.push(t);
        page_bytes = got.get(1).and_then(Value::as_f64).unwrap_or(0.0);
    }
    let mut search = Vec::new();
    for name in ["v19999", "v12345", "v00777", "v15000", "v08888"] {
        b.run("const s = document.querySelector('#search'); s.value = ''; s.dispatchEvent(new Event('input', {bubbles: true})); return 1;");
        let ms = b.run_async(&format!(
            "const done = arguments[arguments.length - 1];\n\
             const s = document.querySelector('#search');\n\
             const t0 = performance.now();\n\
             s.value = '{name}';\n\
             s.dispatchEvent(new Event('input', {{bubbles: true}}));\n\
             (function poll() {{\n\
               if (document.querySelector('#search-results a.tree-vm[data-vm={name}]'))\n\
                 return done(performance.now() - t0);\n\
               if (performance.now() - t0 > 60000) return done(-1);\n\
               setTimeout(poll, 5);\n\
             }})();"
        ));
        let t = ms.as_f64().unwrap_or(-1.0);
        assert!(t > 0.0, "no search result for {name}: {}", b.page_text());
        search.push(t);
    }
    drop(b);
    let _ = ui.kill();
    let _ = ui.wait();

    // Memory: no stream, then 50 streams held open.
    let idle_rss = rss_mib(pid);
    let mut streams = Vec::new();
    for _ in 0..50 {
        let mut s = std::os::unix::net::UnixStream::connect(lab.socket()).expect("connect");
        write!(
            s,
            "GET /api/v1/stream HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\r\n",
            lab.token()
        )
        .expect("ask for a stream");
        let mut first = [0u8; 12];
        s.read_exact(&mut first).expect("stream answer");
        assert!(first.starts_with(b"HTTP/1.1 200"), "{first:?}");
        streams.push(s);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while open_streams(&lab) < 50 {
        assert!(
            Instant::now() < deadline,
            "the center counts {} streams",
            open_streams(&lab)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let streams_rss = rss_mib(pid);
    drop(streams);

    println!("| what | time (median of {RUNS}) | bytes |");
    println!("|---|---|---|");
    println!("| REST: all 20,000 VMs (`GET /vms`) | {all_vms_ms:.0} ms | {all_vms_b} |");
    println!("| REST: all 1,001 hosts (`GET /hosts`) | {all_hosts_ms:.0} ms | {all_hosts_b} |");
    println!("| REST: the counts (`GET /summary`) | {summary_ms:.0} ms | {summary_b} |");
    println!("| REST: one page of 100 hosts | {page_ms:.0} ms | {page_b} |");
    println!("| REST: a search (`GET /vms?q=v19999&limit=50`) | {search_api_ms:.0} ms | |");
    println!(
        "| page: first render, counts and tree (navigation start to on screen) | {:.0} ms | {page_bytes:.0} transferred |",
        median(first_render.clone())
    );
    println!(
        "| page: a search result (typing to link shown, 250 ms debounce included) | {:.0} ms | |",
        median(search.clone())
    );
    println!(
        "| page vs whole listings: first render / (GET /vms + GET /hosts) | {:.2}× | {:.3}× |",
        median(first_render) / (all_vms_ms + all_hosts_ms),
        page_bytes / (all_vms_b + all_hosts_b) as f64
    );
    println!("| center memory, just started on the seeded store | {fresh_rss:.1} MiB | |");
    println!(
        "| center memory after the listings above and the page's runs, no stream open | {idle_rss:.1} MiB | |"
    );
    println!(
        "| center memory, 50 event streams open | {streams_rss:.1} MiB ({:+.1} MiB, {:.0} KiB per stream) | |",
        streams_rss - idle_rss,
        (streams_rss - idle_rss) * 1024.0 / 50.0
    );
    lab.down();
}
