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

use common::browser::Browser;
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

    // `tern ui`: the loopback forward an operator on this machine opens.
    let mut ui = std::process::Command::new(common::tern_exe())
        .args(["ui", "--listen", "127.0.0.1:0", "--lab-dir"])
        .arg(&lab.dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("tern ui");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(ui.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("tern ui's first line");
    let base = line
        .split_whitespace()
        .find(|w| w.starts_with("http://127.0.0.1:"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_string();
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
    // The center's metrics counted it.
    assert_eq!(completed_migrations(&lab), migrations_before + 1.0);
    b.wait_for("#tasks .task", Duration::from_secs(10));
    let tasks = b.text("#tasks").unwrap_or_default();
    assert!(tasks.contains("migrat"), "{tasks}");
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
    // Nothing failed in the page after sign-in: no script error, no failed request.
    let errors = b.console_errors();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    // The accessibility check can fail: a page with an unlabelled image and input does.
    b.goto("data:text/html,<html><body><img src='x.png'><input type='text'></body></html>");
    let found = b.accessibility_violations();
    assert!(
        found.iter().any(|v| v["id"] == "image-alt"),
        "axe-core missed an image without alt text: {found:?}"
    );
    drop(b);
    let _ = ui.kill();
    let _ = ui.wait();
    lab.down();
}
