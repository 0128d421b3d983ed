//! A real, headless Chromium for the web client's tests, driven over the W3C WebDriver
//! protocol by Debian's `chromedriver`.
//!
//! The WebDriver calls are a handful of JSON requests over HTTP/1.1 on loopback, written here
//! with std: the crates for it (fantoccini, thirtyfour) build the `webdriver` crate and ICU,
//! minutes of compiling on a 2-core machine for eight requests.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The key under which WebDriver names an element.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Wraps `fetch` to note each request's method and URL in `window.__ternRequests`
/// (installed through the DevTools protocol, which the page's CSP does not govern).
const RECORD_REQUESTS: &str = "(() => {\n\
  const real = window.fetch;\n\
  window.__ternRequests = [];\n\
  window.fetch = function (input, init) {\n\
    try {\n\
      const method = (init && init.method) || (input && input.method) || 'GET';\n\
      const url = typeof input === 'string' ? input : String(input && input.url);\n\
      window.__ternRequests.push([String(method).toUpperCase(), url]);\n\
    } catch (_) { /* recording must never break the page */ }\n\
    return real.apply(this, arguments);\n\
  };\n\
})();";

/// A headless Chromium session; chromedriver and the browser end on drop.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a fresh profile.
    pub fn start() -> Browser {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("a free port");
            l.local_addr().expect("addr").port()
        };
        let driver = Command::new(chromedriver())
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver (Debian's chromium-driver; scripts/setup.sh installs it)");
        let profile = tempfile::tempdir().expect("profile dir");
        let mut b = Browser {
            driver,
            port,
            session: String::new(),
            _profile: profile,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while b.request("GET", "/status", None).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not answer in 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": chromium(),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1000",
                         format!("--user-data-dir={}", b._profile.path().display())],
            },
        }}});
        let v = b
            .request("POST", "/session", Some(&caps))
            .expect("a Chromium session");
        b.session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {v}"))
            .to_string();
        // Every page records the requests it makes (method and URL), from its first script
        // on: the performance timeline has URLs but not methods.
        b.cmd(
            "POST",
            "/goog/cdp/execute",
            Some(json!({"cmd": "Page.addScriptToEvaluateOnNewDocument",
                        "params": {"source": RECORD_REQUESTS}})),
        )
        .expect("install the request recorder");
        b
    }

    /// `[method, url]` of every `fetch` the page made since it loaded.
    pub fn requests(&self) -> Vec<(String, String)> {
        let v = self.run("return window.__ternRequests || [];");
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| {
                Some((
                    r.get(0)?.as_str()?.to_string(),
                    r.get(1)?.as_str()?.to_string(),
                ))
            })
            .collect()
    }

    /// One WebDriver command; the answer's JSON, or the driver's error.
    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(60))).ok();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        // chromedriver keeps the connection open whatever the request says: read the head,
        // then exactly Content-Length bytes.
        let mut resp = Vec::new();
        let mut buf = [0u8; 8192];
        let (head, body) = loop {
            let n = s.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed before a whole response".into());
            }
            resp.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&resp).into_owned();
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                continue;
            };
            let length = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= length {
                break (head.to_string(), body[..length].to_string());
            }
        };
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or("no status")?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if status >= 400 {
            return Err(format!("{status}: {}", v["value"]));
        }
        Ok(v)
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        self.request(
            method,
            &format!("/session/{}{path}", self.session),
            body.as_ref(),
        )
        .map(|v| v["value"].clone())
    }

    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })))
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// The element `css` selects now, if any.
    pub fn find(&self, css: &str) -> Option<String> {
        self.cmd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        )
        .ok()
        .and_then(|v| v[ELEMENT].as_str().map(str::to_string))
    }

    /// How many elements `css` selects now.
    pub fn count(&self, css: &str) -> usize {
        self.cmd(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        )
        .ok()
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or(0)
    }

    /// The visible text of element `css` selects now.
    pub fn text(&self, css: &str) -> Option<String> {
        let id = self.find(css)?;
        self.cmd("GET", &format!("/element/{id}/text"), None)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
    }

    /// Waits until element `css` exists and its text satisfies `ok`; returns the text.
    pub fn wait_text(&self, css: &str, timeout: Duration, ok: impl Fn(&str) -> bool) -> String {
        self.wait_value(css, timeout, || self.text(css), ok)
    }

    /// Waits until `read` gives a value that satisfies `ok`; returns it. `what` names the
    /// value in the failure message.
    fn wait_value(
        &self,
        what: &str,
        timeout: Duration,
        read: impl Fn() -> Option<String>,
        ok: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            if let Some(t) = read() {
                if ok(&t) {
                    return t;
                }
                last = Some(t);
            }
            if Instant::now() > deadline {
                panic!(
                    "{what}: not as expected within {timeout:?}; last {last:?}; page:\n{}",
                    self.page_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The value of attribute `name` of the element `css` selects now.
    pub fn attribute(&self, css: &str, name: &str) -> Option<String> {
        let id = self.find(css)?;
        self.cmd("GET", &format!("/element/{id}/attribute/{name}"), None)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
    }

    /// Waits until element `css` exists and its attribute `name` satisfies `ok`; returns
    /// the attribute.
    pub fn wait_text_attr(
        &self,
        css: &str,
        name: &str,
        timeout: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> String {
        let what = format!("{css} [{name}]");
        self.wait_value(&what, timeout, || self.attribute(css, name), ok)
    }

    /// Waits until `css` selects an element; returns its id.
    pub fn wait_for(&self, css: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(id) = self.find(css) {
                return id;
            }
            if Instant::now() > deadline {
                panic!("no {css} within {timeout:?}; page:\n{}", self.page_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Clicks the element `css` selects. A live page may rebuild it between finding and
    /// clicking (the driver then calls the element stale): it is found again.
    pub fn click(&self, css: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let id = self.wait_for(css, Duration::from_secs(10));
            match self.cmd("POST", &format!("/element/{id}/click"), Some(json!({}))) {
                Ok(_) => return,
                Err(e) if e.contains("stale element reference") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("click {css}: {e}"),
            }
        }
    }

    pub fn type_into(&self, css: &str, text: &str) {
        let id = self.wait_for(css, Duration::from_secs(10));
        self.cmd("POST", &format!("/element/{id}/clear"), Some(json!({})))
            .unwrap_or_else(|e| panic!("clear {css}: {e}"));
        self.cmd(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        )
        .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    /// Whether element `css` is enabled (a button that may be clicked).
    pub fn enabled(&self, css: &str) -> bool {
        self.find(css).is_some_and(|id| {
            self.cmd("GET", &format!("/element/{id}/enabled"), None)
                .ok()
                .and_then(|v| v.as_bool())
                .unwrap_or(false)
        })
    }

    /// Runs `script` in the page (`return …` gives a value).
    pub fn run(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .unwrap_or_else(|e| panic!("script: {e}"))
    }

    /// Saves a PNG of the page at `path` (for a person to look at).
    pub fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let v = self
            .cmd("GET", "/screenshot", None)
            .unwrap_or_else(|e| panic!("screenshot: {e}"));
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .expect("base64 PNG");
        std::fs::write(path, png).expect("write the screenshot");
    }

    /// The browser console's error lines since the last call (script errors, failed loads).
    pub fn console_errors(&self) -> Vec<String> {
        let v = self
            .cmd("POST", "/se/log", Some(json!({"type": "browser"})))
            .unwrap_or_else(|e| panic!("the browser's log: {e}"));
        v.as_array()
            .map(|entries| {
                entries
                    .iter()
                    .filter(|e| e["level"] == "SEVERE")
                    .map(|e| e["message"].as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Runs `script` in the page asynchronously: it ends by calling its last argument with
    /// the value to return.
    pub fn run_async(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/async",
            Some(json!({"script": script, "args": []})),
        )
        .unwrap_or_else(|e| panic!("async script: {e}"))
    }

    /// The serious and critical accessibility violations axe-core finds in the page as it is
    /// now (`[]` when none), with up to three offending elements each. axe-core is the one
    /// scripts/setup.sh installs from npm.
    pub fn accessibility_violations(&self) -> Vec<Value> {
        if self.run("return typeof axe") != "object" {
            let src = std::fs::read_to_string(axe_core()).unwrap_or_else(|e| {
                panic!("axe-core is not installed ({e}): run scripts/setup.sh")
            });
            self.run(&format!("{src}\n;return typeof axe;"));
        }
        let found = self.run_async(
            "const done = arguments[arguments.length - 1];\n\
             axe.run(document, {resultTypes: ['violations']}).then(r => done(JSON.stringify(\n\
               r.violations.filter(v => v.impact === 'serious' || v.impact === 'critical')\n\
                 .map(v => ({id: v.id, impact: v.impact, help: v.help,\n\
                   nodes: v.nodes.slice(0, 3).map(n => n.target.join(' '))})))))\n\
               .catch(e => done('\"axe failed: ' + e + '\"'));",
        );
        let text = found.as_str().unwrap_or("[]");
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Array(v)) => v,
            other => panic!("axe-core answered {other:?}"),
        }
    }

    /// The page's text, for failure messages.
    pub fn page_text(&self) -> String {
        self.run("return document.body ? document.body.innerText : ''")
            .as_str()
            .unwrap_or_default()
            .chars()
            .take(4000)
            .collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.request("DELETE", &format!("/session/{}", self.session), None);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn chromedriver() -> PathBuf {
    ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("chromedriver"))
}

fn chromium() -> String {
    // Debian's /usr/bin/chromium is a wrapper script; the binary is under /usr/lib.
    ["/usr/lib/chromium/chromium", "/usr/bin/chromium"]
        .iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or(&"chromium")
        .to_string()
}

/// axe.min.js as scripts/setup.sh caches it (`~/.cache/tern/npm/axe-core-<version>/`).
fn axe_core() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"))
        .join("tern/npm");
    std::fs::read_dir(&cache)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("node_modules/axe-core/axe.min.js"))
        .find(|p| p.exists())
        .unwrap_or_else(|| cache.join("axe-core-?/node_modules/axe-core/axe.min.js"))
}

/// `tern ui` (the loopback forward an operator on this machine opens) and its URL.
pub fn open_ui(lab: &super::Lab) -> (std::process::Child, String) {
    open_ui_with(&["--lab-dir".as_ref(), lab.dir.as_os_str()])
}

/// `tern ui` forwarding to the center on unix socket `socket` (an HA lab's standby, say).
pub fn open_ui_at(socket: &Path) -> (std::process::Child, String) {
    open_ui_with(&["--socket".as_ref(), socket.as_os_str()])
}

fn open_ui_with(args: &[&std::ffi::OsStr]) -> (std::process::Child, String) {
    let mut ui = std::process::Command::new(super::tern_exe())
        .args(["ui", "--listen", "127.0.0.1:0"])
        .args(args)
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
    (ui, base)
}

/// Signs in with `token` and waits for the role to show.
pub fn sign_in(b: &Browser, base: &str, token: &str, role: &str) {
    b.goto(base);
    b.wait_for("#login-form", Duration::from_secs(10));
    b.type_into("#token", token);
    b.click("#login");
    b.wait_text("#whoami", Duration::from_secs(10), |t| t.contains(role));
}
