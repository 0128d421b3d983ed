//! The web client in a real, headless Chromium, against a real lab: sign in with a token (a
//! wrong one refused with the API's reason), find the VM in the inventory tree under its host,
//! open its page, migrate it from the dialog (which lists the other host with its pre-check
//! verdict before anything moves), and watch the page follow the migration live — progress in
//! the dialog, the result, and the VM's host and generation changing — without reloading.
//! Then the cluster page (EVC, DRS), a VM created and started from the page, and a host put
//! into maintenance from its page (the plan shown first) and emptied live, then returned. A
//! viewer's token shows the same pages without any button it could not use, and a request it
//! forces is refused. The page logs no error; `/metrics` counts the migration; each view's
//! screenshot is kept under target/web-screenshots.
//!
//! The browser reaches the center the way an operator on its machine does: `tern ui`, a
//! loopback forward to the center's unix socket.

mod common;

use std::time::Duration;

use common::browser::{open_ui, sign_in, Browser};
use common::{raw_http, Lab};
use serde_json::Value;

/// Where each view's screenshot goes, for review (CI keeps target/).
fn shots_dir() -> std::path::PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| common::repo_root().join("target"))
        .join("web-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

/// Saves a screenshot of the view as `name`.png and checks it has no serious accessibility
/// violation.
fn view(b: &Browser, shots: &std::path::Path, name: &str) {
    b.screenshot(&shots.join(format!("{name}.png")));
    let found = b.accessibility_violations();
    assert!(
        found.is_empty(),
        "{name}: serious accessibility violations: {}",
        serde_json::to_string_pretty(&found).unwrap_or_default()
    );
}

/// `tern_migrations_total{outcome="completed"}` as `/metrics` reports it, read with a
/// Prometheus text-format parser (0 when absent).
fn completed_migrations(lab: &Lab) -> f64 {
    let (status, body) = raw_http(&lab.socket(), "GET", "/metrics", Some(&lab.token()), None);
    assert_eq!(status, 200, "{body}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{body}"));
    assert!(
        scrape.samples.iter().any(|s| s.metric == "tern_hosts"),
        "no tern_hosts in {body}"
    );
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "tern_migrations_total" && s.labels.get("outcome") == Some("completed")
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("tern_migrations_total is not a number: {:?}", s.value),
        })
        .unwrap_or(0.0)
}

/// A sample's value from a Prometheus text scrape (`None` when the series is absent).
fn sample(body: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("metrics do not parse: {e}\n{body}"));
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{metric} is not a number: {:?}", s.value),
        })
}

/// A host agent's metrics, fetched through the center.
fn agent_metrics(lab: &Lab, host: &str) -> String {
    let (status, body) = raw_http(
        &lab.socket(),
        "GET",
        &format!("/api/v1/hosts/{host}/metrics"),
        Some(&lab.token()),
        None,
    );
    assert_eq!(status, 200, "{body}");
    body
}

/// Listings of hosts or VMs the page asked for without a page size (none may be: the
/// inventory can hold 20,000 VMs).
fn unbounded_listings(b: &Browser) -> Vec<String> {
    let listing = |u: &str| {
        let path = u.split_once("/api/v1/").map_or("", |(_, p)| p);
        let (what, query) = path.split_once('?').unwrap_or((path, ""));
        (what == "vms" || what == "hosts") && !query.split('&').any(|kv| kv.starts_with("limit="))
    };
    let requests = b.requests();
    assert!(
        !requests.is_empty(),
        "the page's requests were not recorded"
    );
    requests
        .into_iter()
        .filter(|(m, u)| m == "GET" && listing(u))
        .map(|(_, u)| u)
        .collect()
}

/// Fails on any error the page logged (a failed request logs one).
fn no_console_errors(b: &Browser) {
    let errors = b.console_errors();
    assert!(errors.is_empty(), "console errors: {errors:?}");
}

/// Ends a test: the browser, `tern ui` and the lab go.
fn shut(b: Browser, mut ui: std::process::Child, lab: Lab) {
    drop(b);
    let _ = ui.kill();
    let _ = ui.wait();
    lab.down();
}

#[test]
fn an_operator_migrates_a_vm_from_the_browser_and_watches_it_live() {
    let lab = Lab::up("web", 2);
    lab.create_vm(
        "web1",
        "h1",
        "10.78.0.161",
        "52:54:00:0e:b0:01",
        128,
        "",
        &[],
    );
    let viewer: Value = lab.tern_json(&["token", "create", "vera", "--role", "viewer"]);
    let viewer = viewer["token"].as_str().expect("token").to_string();

    let (ui, base) = open_ui(&lab);
    let shots = shots_dir();
    let migrations_before = completed_migrations(&lab);
    let b = Browser::start();
    b.goto(&base);
    b.wait_for("#login-form", Duration::from_secs(10));
    view(&b, &shots, "sign-in");

    // A wrong token is refused with the API's own reason; nothing else shows.
    b.type_into("#token", "not-a-token");
    b.click("#login");
    b.wait_text("#login-error", Duration::from_secs(10), |t| {
        t.contains("wrong or revoked token")
    });
    assert_eq!(b.count("a.tree-vm"), 0);

    // The refused sign-in is the one failed request the page may log.
    let expected: Vec<String> = b.console_errors();
    assert!(
        expected.iter().all(|e| e.contains("401")),
        "console errors at sign-in: {expected:?}"
    );

    // The admin: the inventory shows the VM under its host.
    b.type_into("#token", &lab.token());
    b.click("#login");
    b.wait_text("#whoami", Duration::from_secs(10), |t| t.contains("admin"));
    b.wait_for("#overview", Duration::from_secs(10));
    view(&b, &shots, "overview");
    // A single center: the overview says so, and the header shows no HA role.
    b.wait_text("#overview-control-plane", Duration::from_secs(10), |t| {
        t.contains("single center")
    });
    assert!(
        b.attribute("#control-plane", "hidden").is_some(),
        "a single center shows an HA role"
    );
    b.wait_for("a.tree-host[data-host=h2]", Duration::from_secs(10));
    b.wait_for("a.tree-vm[data-vm=web1]", Duration::from_secs(10));
    let under_h1 = b.run(
        "const h = document.querySelector('a.tree-host[data-host=h1]');\n\
         const v = document.querySelector('a.tree-vm[data-vm=web1]');\n\
         const li = h && h.closest('li');\n\
         return !!(li && v && li.contains(v));",
    );
    assert_eq!(under_h1, true, "web1 is not under h1 in the tree");

    // Its page, then the migrate dialog: h2 with its verdict, enabled.
    b.click("a.tree-vm[data-vm=web1]");
    b.wait_text("#vm-host", Duration::from_secs(10), |t| t.contains("h1"));
    b.wait_text("#vm-state", Duration::from_secs(10), |t| {
        t.contains("running")
    });
    b.click("#vm-migrate");
    b.wait_for(
        ".migrate-target[data-host=h2] button.migrate-to",
        Duration::from_secs(30),
    );
    let verdict_wait = std::time::Instant::now();
    while !b.enabled("button.migrate-to[data-host=h2]") {
        assert!(
            verdict_wait.elapsed() < Duration::from_secs(30),
            "h2 is not offered: {}",
            b.text(".migrate-target[data-host=h2]").unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The source is not offered as a destination.
    assert_eq!(b.count(".migrate-target[data-host=h1] button:enabled"), 0);
    b.click("button.migrate-to[data-host=h2]");

    // Live: progress, then the result with its figures, and the page's host follows.
    b.wait_for("#migrate-progress", Duration::from_secs(10));
    let result = b.wait_text("#migrate-result", Duration::from_secs(120), |t| {
        t.contains("succeeded") || t.contains("failed") || t.contains("cancelled")
    });
    assert!(result.contains("succeeded"), "{result}");
    assert!(result.contains("ms"), "no figures in the result: {result}");
    // The timeline: the pre-copy's readings and the pause, drawn in the dialog.
    let (status, body) = raw_http(
        &lab.socket(),
        "GET",
        "/api/v1/tasks?vm=web1&limit=20",
        Some(&lab.token()),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let migrations: Value = serde_json::from_str(&body).expect("tasks JSON");
    let migrate_task = migrations
        .as_array()
        .and_then(|ts| ts.iter().rev().find(|t| t["kind"] == "vm_migrate"))
        .unwrap_or_else(|| panic!("no migration task in {migrations}"))
        .clone();
    let (status, body) = raw_http(
        &lab.socket(),
        "GET",
        &format!(
            "/api/v1/tasks/{}/timeline",
            migrate_task["id"].as_str().expect("id")
        ),
        Some(&lab.token()),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let timeline: Value = serde_json::from_str(&body).expect("timeline JSON");
    let samples = timeline["samples"].as_array().cloned().unwrap_or_default();
    assert!(!samples.is_empty(), "no pre-copy reading: {timeline}");
    assert!(
        samples.iter().all(|s| s["pass"].as_u64().is_some()),
        "{timeline}"
    );
    assert!(timeline["pause_ms"].as_u64().is_some(), "{timeline}");
    assert!(timeline["pause_at_ms"].as_u64().is_some(), "{timeline}");
    let chart = b.wait_for("#migrate-chart svg[role=img]", Duration::from_secs(10));
    assert!(!chart.is_empty());
    let label = b.wait_text_attr(
        "#migrate-chart svg[role=img]",
        "aria-label",
        Duration::from_secs(10),
        |l| l.contains("pause"),
    );
    assert!(label.contains("pause"), "{label}");
    view(&b, &shots, "migrate-dialog");
    b.click("#migrate-close");
    b.wait_text("#vm-host", Duration::from_secs(10), |t| t.contains("h2"));
    let vm: Value = lab.tern_json(&["vm", "show", "web1"]);
    assert_eq!(vm["host"], "h2", "{vm}");
    // The page shows the generation the hand-over moved the VM to.
    let generation = vm["generation"].as_u64().expect("generation").to_string();
    b.wait_text("#vm-generation", Duration::from_secs(10), |t| {
        t.contains(&generation)
    });
    // The center's metrics counted it, and so did each host's agent, by its role.
    assert_eq!(completed_migrations(&lab), migrations_before + 1.0);
    let h1 = agent_metrics(&lab, "h1");
    let sent = [("role", "source"), ("outcome", "completed")];
    assert_eq!(
        sample(&h1, "tern_agent_migrations_total", &sent),
        Some(1.0),
        "{h1}"
    );
    assert!(
        sample(&h1, "tern_agent_migration_sent_bytes_total", &[]).is_some_and(|b| b > 0.0),
        "{h1}"
    );
    let h2 = agent_metrics(&lab, "h2");
    let received = [("role", "destination"), ("outcome", "completed")];
    assert_eq!(
        sample(&h2, "tern_agent_migrations_total", &received),
        Some(1.0),
        "{h2}"
    );
    assert_eq!(
        sample(&h2, "tern_agent_vms", &[("state", "running")]),
        Some(1.0),
        "{h2}"
    );
    // The VM page draws its last migration.
    b.wait_for("#vm-migration-chart svg[role=img]", Duration::from_secs(10));
    b.wait_for("#tasks .task", Duration::from_secs(10));
    let tasks = b.text("#tasks").unwrap_or_default();
    assert!(tasks.contains("migrat"), "{tasks}");
    // The tasks panel's filters: none failed, the migration found by text.
    b.run(
        "const s = document.querySelector('#tasks-state'); s.value = 'failed';\n\
         s.dispatchEvent(new Event('change', {bubbles: true})); return 1;",
    );
    b.wait_text("#tasks-none", Duration::from_secs(10), |t| {
        t.contains("No task matches")
    });
    b.run(
        "const s = document.querySelector('#tasks-state'); s.value = 'all';\n\
         s.dispatchEvent(new Event('change', {bubbles: true})); return 1;",
    );
    b.type_into("#tasks-filter", "migrat");
    b.wait_text("#tasks", Duration::from_secs(10), |t| !t.contains("start"));
    assert!(b.count("#tasks .task") >= 1);
    b.type_into("#tasks-filter", "");
    b.run(
        "const f = document.querySelector('#tasks-filter');\n\
         f.dispatchEvent(new Event('input', {bubbles: true})); return 1;",
    );
    // The tree moved it too, without a reload.
    let under_h2 = b.run(
        "const h = document.querySelector('a.tree-host[data-host=h2]');\n\
         const v = document.querySelector('a.tree-vm[data-vm=web1]');\n\
         const li = h && h.closest('li');\n\
         return !!(li && v && li.contains(v));",
    );
    assert_eq!(under_h2, true, "the tree still shows web1 elsewhere");

    view(&b, &shots, "vm");

    // The cluster page: EVC mode, DRS settings and the engine's current verdict.
    b.click("a.tree-cluster[data-cluster=lab]");
    b.wait_for("#cluster-view", Duration::from_secs(10));
    b.wait_text("#drs-imbalance", Duration::from_secs(30), |t| {
        t.contains('→')
    });
    b.wait_text("#cluster-evc", Duration::from_secs(10), |t| !t.is_empty());
    // The imbalance over time, sampled every second in the lab.
    b.wait_for("#drs-history-chart svg[role=img]", Duration::from_secs(20));
    view(&b, &shots, "cluster");

    // A VM created and started from the page (the lab's test guest, by kernel).
    b.click("#vm-create-open");
    b.wait_for("#vm-create-form", Duration::from_secs(10));
    b.type_into("#vm-create-name", "web2");
    b.type_into("#vm-create-memory", "128");
    b.run(
        "const s = document.querySelector('#vm-create-boot'); s.value = 'kernel';\n\
         s.dispatchEvent(new Event('change', {bubbles: true}));\n\
         const h = document.querySelector('#vm-create-host'); h.value = 'h1';\n\
         h.dispatchEvent(new Event('change', {bubbles: true}));",
    );
    b.type_into("#vm-create-kernel", &lab.guest_kernel());
    b.type_into("#vm-create-initrd", &lab.guest_initrd());
    b.type_into(
        "#vm-create-cmdline",
        "console=ttyS0 ipv6.disable=1 tern.ip=10.78.0.162/24 tern.serve=7000",
    );
    b.type_into("#vm-create-mac", "52:54:00:0e:b0:02");
    view(&b, &shots, "vm-create");
    b.click("#vm-create-submit");
    b.wait_text("#vm-view h1", Duration::from_secs(30), |t| {
        t.contains("web2")
    });
    b.wait_text("#vm-state", Duration::from_secs(60), |t| {
        t.contains("running")
    });
    lab.wait_console("web2", "TERN-GUEST-READY", Duration::from_secs(120));
    let web2: Value = lab.tern_json(&["vm", "show", "web2"]);
    assert_eq!(web2["host"], "h1", "{web2}");
    assert_eq!(web2["actual_state"], "running", "{web2}");

    // Maintenance from the host page: the plan first, then the host empties live.
    b.click("a.tree-host[data-host=h2]");
    b.wait_for("#host-view", Duration::from_secs(10));
    b.wait_text("#host-vms", Duration::from_secs(10), |t| t.contains("web1"));
    // Its load over the last hour.
    b.wait_text_attr(
        "#host-load-chart svg[role=img]",
        "aria-label",
        Duration::from_secs(20),
        |l| l.contains('%'),
    );
    b.click("#host-maintenance-enter");
    b.wait_for(".plan-move[data-vm=web1]", Duration::from_secs(60));
    let plan = b.text("#maintenance-plan").unwrap_or_default();
    assert!(plan.contains("h1"), "the plan names no destination: {plan}");
    view(&b, &shots, "maintenance-plan");
    b.click("#maintenance-confirm");
    let status = b.wait_text("#maintenance-status", Duration::from_secs(180), |t| {
        t.contains("succeeded") || t.contains("failed") || t.contains("cancelled")
    });
    assert!(status.contains("succeeded"), "{status}");
    b.wait_text("#host-state", Duration::from_secs(10), |t| {
        t.contains("maintenance")
    });
    b.wait_text("#host-vms", Duration::from_secs(10), |t| {
        !t.contains("web1")
    });
    view(&b, &shots, "host-maintenance");
    let vm: Value = lab.tern_json(&["vm", "show", "web1"]);
    assert_eq!(vm["host"], "h1", "{vm}");
    assert_eq!(vm["actual_state"], "running", "{vm}");
    b.click("#host-maintenance-exit");
    b.wait_text("#host-state", Duration::from_secs(10), |t| {
        !t.contains("maintenance")
    });
    let h2: Value = lab.tern_json(&["host", "show", "h2"]);
    assert_eq!(h2["state"], "connected", "{h2}");

    // A host that cannot take the VM is listed with its reason, and cannot be picked.
    lab.tern_ok(&["host", "maintenance", "enter", "h2"]);
    b.click("a.tree-vm[data-vm=web1]");
    b.wait_text("#vm-host", Duration::from_secs(10), |t| t.contains("h1"));
    b.click("#vm-migrate");
    let refused = b.wait_text(
        ".migrate-target[data-host=h2]",
        Duration::from_secs(30),
        |t| t.contains("maintenance"),
    );
    assert!(
        !b.enabled("button.migrate-to[data-host=h2]"),
        "a host in maintenance is offered: {refused}"
    );
    view(&b, &shots, "migrate-refused");
    b.click("#migrate-close");
    lab.tern_ok(&["host", "maintenance", "exit", "h2"]);

    // A viewer sees the VM but no button to change it.
    b.click("#logout");
    b.wait_for("#login-form", Duration::from_secs(10));
    b.type_into("#token", &viewer);
    b.click("#login");
    b.wait_text("#whoami", Duration::from_secs(10), |t| t.contains("viewer"));
    b.goto(&format!("{base}#/vm/web1"));
    b.wait_text("#vm-host", Duration::from_secs(10), |t| t.contains("h1"));
    for button in ["#vm-migrate", "#vm-stop", "#vm-start"] {
        assert_eq!(b.count(button), 0, "a viewer is shown {button}");
    }
    // And a mutating request forced with the viewer's token is refused by the API.
    let (status, body) = raw_http(
        &lab.socket(),
        "POST",
        "/api/v1/vms/web1/migrate",
        Some(&viewer),
        Some(r#"{"to":"h1"}"#),
    );
    assert_eq!(status, 403, "{body}");
    // Nothing failed in the page after sign-in: no script error, no failed request, and no
    // listing asked for without a page size.
    no_console_errors(&b);
    assert_eq!(unbounded_listings(&b), Vec::<String>::new());
    // The accessibility check can fail: a page with an unlabelled image and input does.
    b.goto("data:text/html,<html><body><img src='x.png'><input type='text'></body></html>");
    let found = b.accessibility_violations();
    assert!(
        found.iter().any(|v| v["id"] == "image-alt"),
        "axe-core missed an image without alt text: {found:?}"
    );
    shut(b, ui, lab);
}

/// The inventory of a large center: 1,000 hosts and 20,000 VMs seeded into the store. The
/// page shows the counts, one page of hosts per cluster (more on demand), finds any VM by
/// name through the API's search, opens it, and never asks for a whole listing.
#[test]
fn a_thousand_hosts_and_twenty_thousand_vms_render_in_pages_and_search() {
    let lab = Lab::up("webscale", 1);
    let seeded = lab.lab_cmd(&["lab", "seed", "--hosts", "1000", "--vms", "20000"]);
    assert!(seeded.status.success(), "{}", common::text(&seeded));
    let (ui, base) = open_ui(&lab);
    let shots = shots_dir();
    let b = Browser::start();
    sign_in(&b, &base, &lab.token(), "admin");
    let digits = |t: &str| t.chars().filter(char::is_ascii_digit).collect::<String>();
    // The lab's own host and the seeded ones, and every VM, counted without a listing.
    b.wait_text("#overview-hosts", Duration::from_secs(30), |t| {
        digits(t) == "1001"
    });
    b.wait_text("#overview-vms", Duration::from_secs(10), |t| {
        digits(t) == "20000"
    });
    // One page of the seeded cluster's hosts, with their VMs by name.
    b.wait_for("a.tree-host[data-host=s0001]", Duration::from_secs(30));
    let shown = b.count("a.tree-host[data-host^=s]");
    assert!(
        (1..=100).contains(&shown),
        "{shown} seeded hosts in the tree"
    );
    assert_eq!(b.count("a.tree-host[data-host=s0101]"), 0);
    view(&b, &shots, "scale-overview");
    b.click(".tree-more[data-cluster=scale]");
    b.wait_for("a.tree-host[data-host=s0101]", Duration::from_secs(30));
    let shown = b.count("a.tree-host[data-host^=s]");
    assert!(
        (101..=200).contains(&shown),
        "{shown} seeded hosts after one more page"
    );
    // A search reaches a VM no page shows, and its page opens.
    b.type_into("#search", "v19999");
    b.wait_for(
        "#search-results a.tree-vm[data-vm=v19999]",
        Duration::from_secs(30),
    );
    view(&b, &shots, "scale-search");
    b.click("#search-results a.tree-vm[data-vm=v19999]");
    b.wait_text("#vm-host", Duration::from_secs(30), |t| t.contains("s0999"));
    // A search that matches nothing says so.
    b.type_into("#search", "no-such-vm");
    b.wait_text("#search-results", Duration::from_secs(30), |t| {
        t.contains("Nothing matches")
    });
    assert_eq!(unbounded_listings(&b), Vec::<String>::new());
    no_console_errors(&b);
    shut(b, ui, lab);
}

/// DRS from the cluster page: h1 runs two VMs burning CPU, h2 none; the page lists the
/// engine's recommendation to move one to h2, "Apply all" runs it live, and the page then
/// shows the move done and no further recommendation.
#[test]
fn drs_recommendations_show_and_apply_from_the_cluster_page() {
    let lab = Lab::up("webdrs", 2);
    lab.tern_ok(&[
        "cluster",
        "set-drs",
        "lab",
        "--automation",
        "manual",
        "--threshold",
        "3",
    ]);
    for (name, ip, mac) in [
        ("burn1", "10.78.0.170", "52:54:00:0e:d5:01"),
        ("burn2", "10.78.0.171", "52:54:00:0e:d5:02"),
    ] {
        lab.create_vm(name, "h1", ip, mac, 128, "tern.burn=90", &[]);
    }
    let (ui, base) = open_ui(&lab);
    let shots = shots_dir();
    let b = Browser::start();
    sign_in(&b, &base, &lab.token(), "admin");
    b.goto(&format!("{base}#/cluster/lab"));
    b.wait_for("#cluster-view", Duration::from_secs(10));
    // The agents report the burn in their heartbeats; the page refreshes its
    // recommendations as the load changes.
    let wait = std::time::Instant::now();
    while b.count(".drs-rec[data-to=h2]") == 0 {
        assert!(
            wait.elapsed() < Duration::from_secs(120),
            "no move to h2 recommended: {}",
            b.text("#drs-recs").unwrap_or_default()
        );
        if b.count("#drs-refresh") > 0 {
            b.click("#drs-refresh");
        }
        b.wait_text("#drs-imbalance", Duration::from_secs(30), |t| {
            t.contains('→')
        });
        std::thread::sleep(Duration::from_millis(500));
    }
    view(&b, &shots, "drs-recommendations");
    b.click("#drs-apply");
    let status = b.wait_text("#drs-apply-status", Duration::from_secs(180), |t| {
        t.contains("succeeded") || t.contains("failed") || t.contains("cancelled")
    });
    assert!(status.contains("succeeded"), "{status}");
    // The apply runs the engine's pass as it stands then: one of the two burners moved, live,
    // and the page's result names it.
    let on_h2: Vec<String> = ["burn1", "burn2"]
        .into_iter()
        .filter(|vm| {
            let v: Value = lab.tern_json(&["vm", "show", vm]);
            assert_eq!(v["actual_state"], "running", "{v}");
            v["host"] == "h2"
        })
        .map(str::to_string)
        .collect();
    assert_eq!(on_h2.len(), 1, "burners on h2 after the apply: {on_h2:?}");
    assert!(
        status.contains(&on_h2[0]),
        "the result does not name {}: {status}",
        on_h2[0]
    );
    // The recommendations are read again once the apply ended: that move is done.
    let moved = format!(".drs-rec[data-vm={}]", on_h2[0]);
    let wait = std::time::Instant::now();
    while b.count(&moved) > 0 {
        assert!(
            wait.elapsed() < Duration::from_secs(30),
            "the page still recommends moving {}: {}",
            on_h2[0],
            b.text("#drs-recs").unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    view(&b, &shots, "drs-applied");
    no_console_errors(&b);
    shut(b, ui, lab);
}
