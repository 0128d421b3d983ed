//! The CLI and a center's CA, with the built `tern` binary against a real center on loopback:
//! nothing is sent to an https:// center whose CA is not trusted; `tern trust` keeps the CA
//! only when the fingerprint is confirmed; a center whose certificate does not chain to the
//! kept CA is refused.

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn tern(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("TERN_CENTER")
        .env_remove("TERN_TOKEN")
        .env_remove("TERN_CA")
        .env("TERN_LAB_DIR", home.join("no-lab"))
        .stdin(Stdio::null())
        .output()
        .expect("run tern")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_trusts_a_center_only_after_its_fingerprint_is_confirmed() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let mut cfg = tern_center::CenterConfig::with_data_dir(tmp.path().join("center"));
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    let center = tern_center::serve(cfg).await.unwrap();
    let url = center.url();
    assert!(url.starts_with("https://"));
    let token = center.admin_token.clone();
    let fp = tern_pki::inspect_pem(center.ca_pem.as_deref().unwrap())
        .unwrap()
        .fingerprint
        .to_string();

    let list = |home: &Path, extra: &[&str]| {
        let mut a = vec!["host", "list", "--center", &url, "--token", &token];
        a.extend_from_slice(extra);
        tern(home, &a)
    };
    let h = home.clone();
    let run = move |args: Vec<String>| {
        let h = h.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                tern(&h, &a)
            })
            .await
            .unwrap()
        }
    };

    // Nothing trusted yet: refused before any request, and the hint says how to trust.
    let o = tokio::task::block_in_place(|| list(&home, &[]));
    assert!(!o.status.success());
    assert!(text(&o).contains("tern trust"), "{}", text(&o));

    // No terminal to ask and no fingerprint: nothing kept.
    let o = run(vec!["trust".into(), url.clone()]).await;
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&fp),
        "the fingerprint is shown: {}",
        text(&o)
    );
    let kept = home.join(".config/tern/ca");
    assert!(!kept.exists());

    // A wrong fingerprint: refused, nothing kept.
    let other = tern_pki::Ca::new("other").unwrap();
    let o = run(vec![
        "trust".into(),
        url.clone(),
        "--fingerprint".into(),
        other.fingerprint().to_string(),
    ])
    .await;
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("not the center you meant"),
        "{}",
        text(&o)
    );
    assert!(!kept.exists());

    // The right one: kept, and commands now reach the center.
    let o = run(vec![
        "trust".into(),
        url.clone(),
        "--fingerprint".into(),
        format!("sha256:{fp}"),
    ])
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let o = tokio::task::block_in_place(|| list(&home, &[]));
    assert!(o.status.success(), "{}", text(&o));

    // A CA file the center does not chain to (given, or in place of the kept one): refused.
    let foreign = tmp.path().join("foreign.pem");
    std::fs::write(&foreign, other.cert_pem()).unwrap();
    let o = tokio::task::block_in_place(|| list(&home, &["--ca", foreign.to_str().unwrap()]));
    assert!(!o.status.success(), "{}", text(&o));
    for entry in std::fs::read_dir(&kept).unwrap() {
        std::fs::write(entry.unwrap().path(), other.cert_pem()).unwrap();
    }
    let o = tokio::task::block_in_place(|| list(&home, &[]));
    assert!(!o.status.success(), "{}", text(&o));
    center.shutdown().await.unwrap();
}
