//! The web console in a real headless browser: Debian's chromium driven by chromedriver over
//! the W3C WebDriver HTTP protocol (plain JSON requests with curl), against a real
//! `standby serve`.
//!
//! What it checks: the console is served (redirect from `/`, content types, CSP); a wrong token
//! is refused with the API's message; signing in with the keyboard; protecting a VM from the
//! console and seeing it reach Protected; the API's error for a refused action shown on the
//! page; the VM view (state, health, RPO, recovery points timeline); a resync started from the
//! console and its job seen finishing in the Jobs tab, with its steps; unprotect behind a
//! confirmation dialog (cancel changes nothing, confirm unprotects); a test failover started
//! from the VM view behind a confirmation whose "Boot the VM" box is checked (a failover
//! command is configured), its job seen finishing, its export served (nbdinfo) and its
//! launched VM shown running on the VM view, then its cleanup, which stops that process.
//!
//! The store page's "Verify store" starts a verification job, followed to its result.
//! Screenshots (PNG) are saved under `target/console-screenshots/` as test artifacts.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use standby_e2e::api::{origin, request, token};
use standby_e2e::repl::site;
use standby_e2e::{require_tool, test_dir, Gateway};

/// The W3C element reference key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// chromedriver, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    fn start(log: &Path) -> Driver {
        let chromedriver = require_tool("chromedriver");
        // A free port for chromedriver (it cannot report one it chose itself).
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let d = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        until("chromedriver to be ready", Duration::from_secs(30), || {
            let o = Command::new("curl")
                .args(["-sS", "--max-time", "5"])
                .arg(format!("{}/status", d.url))
                .output()
                .ok()?;
            let v: Value = serde_json::from_slice(&o.stdout).ok()?;
            (v["value"]["ready"] == true).then_some(())
        });
        d
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string());
        let a = request(
            method,
            &format!("{}{path}", self.url),
            None,
            body.as_deref(),
            &[],
        );
        let v = a.json();
        assert_eq!(a.status, 200, "WebDriver {method} {path}: {}", a.body);
        v["value"].clone()
    }
}

/// One browser session.
struct Browser<'a> {
    d: &'a Driver,
    session: String,
    shots: PathBuf,
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        let _ = request(
            "DELETE",
            &format!("{}/session/{}", self.d.url, self.session),
            None,
            None,
            &[],
        );
    }
}

impl<'a> Browser<'a> {
    fn open(d: &'a Driver, profile: &Path, shots: PathBuf) -> Browser<'a> {
        let chromium = require_tool("chromium");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.display().to_string(),
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1366,900",
                         format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let v = d.call("POST", "/session", Some(caps));
        let session = v["sessionId"].as_str().expect("session id").to_string();
        std::fs::create_dir_all(&shots).unwrap();
        Browser { d, session, shots }
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.d
            .call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn go(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    /// Runs a script in the page; its return value.
    fn js(&self, script: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
    }

    /// The element matching `css`, waiting for it to exist and be displayed.
    fn find(&self, css: &str) -> String {
        let found = until_or(Duration::from_secs(20), || {
            let shown = self.js(
                "const e = document.querySelector(arguments[0]); \
                 return !!e && !!(e.offsetWidth || e.offsetHeight || e.getClientRects().length);",
                json!([css]),
            );
            if shown != true {
                return None;
            }
            let v = self.cmd(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            );
            v[ELEMENT].as_str().map(str::to_string)
        });
        found.unwrap_or_else(|| {
            self.screenshot("failure");
            let page = self.js(
                "return location.href + ' ' + document.documentElement.outerHTML.slice(0, 3000)",
                json!([]),
            );
            panic!("timed out waiting for element {css}; the page: {page}")
        })
    }

    fn click(&self, css: &str) {
        let e = self.find(css);
        self.cmd("POST", &format!("/element/{e}/click"), Some(json!({})));
    }

    fn type_in(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.cmd("POST", &format!("/element/{e}/clear"), Some(json!({})));
        self.cmd(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        );
    }

    /// The text content of `css` ("" when absent).
    fn text(&self, css: &str) -> String {
        self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';",
            json!([css]),
        )
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// Waits until the text of `css` satisfies `ok`; returns it.
    fn wait_text(
        &self,
        css: &str,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> String {
        let mut last = String::new();
        let r = until_or(timeout, || {
            last = self.text(css);
            ok(&last).then(|| last.clone())
        });
        r.unwrap_or_else(|| {
            self.screenshot("failure");
            panic!(
                "timed out after {timeout:?} waiting for {what} in {css}; it reads {last:?}; \
                 page errors: {:?} {:?}",
                self.text("#action-error"),
                self.text("#error")
            )
        })
    }

    /// Saves a PNG of the viewport as `NAME.png` in the artifacts directory.
    fn screenshot(&self, name: &str) -> PathBuf {
        let v = self.cmd("GET", "/screenshot", None);
        let png = base64_decode(v.as_str().expect("base64 screenshot"));
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
        let p = self.shots.join(format!("{name}.png"));
        std::fs::write(&p, png).unwrap();
        p
    }
}

/// Polls `f` every 100 ms until it returns `Some` or `timeout` passes.
fn until_or<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn until<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    until_or(timeout, f).unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Standard base64 (the WebDriver screenshot encoding).
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let clean: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(clean.len() / 4 * 3);
    for quad in clean.chunks(4) {
        let data: Vec<u8> = quad.iter().copied().filter(|&c| c != b'=').collect();
        let mut n = 0u32;
        for (i, &c) in data.iter().enumerate() {
            n |= val(c) << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..data.len().saturating_sub(1)]);
    }
    out
}

/// `target/console-screenshots` (the test binary lives in `target/<profile>/deps`).
fn artifacts_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .expect("target dir");
    target.join("console-screenshots")
}

fn vm_state(base: &str, t: &str, vm: &str) -> (u16, String) {
    let a = request(
        "GET",
        &format!("{base}/api/v1/vms/{vm}"),
        Some(t),
        None,
        &[],
    );
    let s = if a.status == 200 {
        a.json()["state"].as_str().unwrap_or_default().to_string()
    } else {
        String::new()
    };
    (a.status, s)
}

#[test]
fn console_in_a_headless_browser() {
    let t = test_dir("console");
    let dd = site(t.path(), &[("d1", "8M"), ("d2", "8M")]);
    // Data on d1 (not only zeroes), so its points hold chunks for the store verification below.
    standby_e2e::random_file(&dd.join("disks").join("d1.img"), 8 << 20, 31);
    let admin = token(&dd, "ops", false);
    let g = Gateway::start(&dd, &["--api-listen", "127.0.0.1:0"]);
    let base = origin(&g.api.clone().expect("the gateway prints its API address"));

    // Served with its own content types and a strict CSP; `/` redirects to the console.
    let o = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-D", "-"])
        .arg(format!("{base}/"))
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&o.stdout).to_lowercase();
    assert!(head.starts_with("http/1.1 303"), "{head}");
    assert!(head.contains("location: /console/"), "{head}");
    for (path, ctype) in [
        ("/console/", "text/html; charset=utf-8"),
        ("/console/app.js", "text/javascript; charset=utf-8"),
        ("/console/style.css", "text/css; charset=utf-8"),
    ] {
        let o = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "-D", "-"])
            .arg(format!("{base}{path}"))
            .output()
            .unwrap();
        let head = String::from_utf8_lossy(&o.stdout).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{path}: {head}");
        assert!(
            head.contains(&format!("content-type: {ctype}")),
            "{path}: {head}"
        );
        assert!(
            head.contains("content-security-policy: default-src 'none'; script-src 'self'"),
            "{path}: {head}"
        );
        assert!(head.contains("x-content-type-options: nosniff"), "{path}");
        assert!(head.contains("etag: \""), "{path}");
    }
    // The API behind it still needs a token.
    let a = request("GET", &format!("{base}/api/v1/vms"), None, None, &[]);
    a.assert_error(401, "unauthorized");

    let driver = Driver::start(&t.path().join("chromedriver.log"));
    let shots = artifacts_dir();
    let b = Browser::open(&driver, &t.path().join("profile"), shots.clone());

    // A wrong token: refused, with the API's sentence, and nothing of the console shown.
    b.go(&format!("{base}/"));
    b.find("#token");
    b.type_in("#token", &format!("sbt_{}", "0".repeat(64)));
    b.click("#login-button");
    let err = b.wait_text(
        "#login-error",
        "the refusal",
        Duration::from_secs(10),
        |s| !s.is_empty(),
    );
    assert!(err.contains("not valid"), "{err}");
    assert_eq!(b.text("#view"), "", "nothing shown without a valid token");
    b.screenshot("01-login-refused");

    // The right token, signed in with the keyboard (Enter in the field).
    b.type_in("#token", &format!("{admin}\u{E007}"));
    b.wait_text(
        "#page-title",
        "the VMs page",
        Duration::from_secs(10),
        |s| s == "Virtual machines",
    );
    assert!(b.text("#live").contains("No VM is protected yet"));
    let stored = b.js("return sessionStorage.getItem('standby.token')", json!([]));
    assert_eq!(stored, admin.as_str(), "the token is kept for this tab");

    // Protect v1 (disk d1) from the console; it reaches Protected on the page.
    b.type_in("#protect-vm", "v1");
    b.click("#protect-form input[value=d1]");
    b.click("#protect-button");
    let n = b.wait_text(
        "#notice",
        "the protect notice",
        Duration::from_secs(20),
        |s| s.contains("protected"),
    );
    assert!(n.contains("VM v1"), "{n}");
    b.wait_text(
        "tr[data-vm=v1] .state",
        "v1 Protected",
        Duration::from_secs(90),
        |s| s.trim() == "Protected",
    );
    assert_eq!(vm_state(&base, &admin, "v1").1, "Protected");
    b.wait_text(
        "tr[data-vm=v1] .health",
        "health",
        Duration::from_secs(10),
        |s| s == "normal",
    );

    // A refused action shows the API's message: d1 is already in v1.
    b.type_in("#protect-vm", "v2");
    b.click("#protect-form input[value=d2]");
    let free = b.js(
        "return [...document.querySelectorAll('#protect-form input[name=disk]')].map(e => e.value)",
        json!([]),
    );
    assert_eq!(free, json!(["d2"]), "only the free disk is offered");
    b.type_in("#protect-vm", "bad name");
    b.click("#protect-button");
    let err = b.wait_text(
        "#action-error",
        "the API's refusal",
        Duration::from_secs(10),
        |s| !s.is_empty(),
    );
    assert!(err.starts_with("Protect: "), "{err}");
    assert!(err.len() > 20, "{err}");
    let vms = request(
        "GET",
        &format!("{base}/api/v1/vms"),
        Some(&admin),
        None,
        &[],
    )
    .json();
    assert_eq!(
        vms.as_array().map(Vec::len),
        Some(1),
        "nothing was recorded: {vms}"
    );
    b.screenshot("02-vms-protected-and-refusal");

    // The VM view: state, health, RPO, disks, recovery points timeline.
    b.click("tr[data-vm=v1] a");
    b.wait_text("#page-title", "the VM view", Duration::from_secs(10), |s| {
        s == "VM v1"
    });
    b.wait_text("#vm-state", "state", Duration::from_secs(10), |s| {
        s.starts_with("Protected")
    });
    until(
        "a recovery point on the timeline",
        Duration::from_secs(30),
        || {
            let marks = b.js(
                "return document.querySelectorAll('.timeline .mark').length",
                json!([]),
            );
            (marks.as_u64() >= Some(1)).then_some(())
        },
    );
    let live = b.text("#live");
    assert!(live.contains("d1") && live.contains("RPO"), "{live}");
    b.screenshot("03-vm-view");

    // A resync from the console; its job finishes in the Jobs tab.
    b.click("#resync");
    b.wait_text("#notice", "resync notice", Duration::from_secs(10), |s| {
        // The resync of 8 MiB may finish before this looks: then the state change was announced.
        s.contains("resync requested") || s.contains("is now")
    });
    assert_eq!(b.text("#action-error"), "");
    b.click("#nav a[data-page=jobs]");
    b.wait_text("#page-title", "Jobs", Duration::from_secs(10), |s| {
        s == "Jobs"
    });
    let job = until(
        "the resync job to succeed in the Jobs tab",
        Duration::from_secs(90),
        || {
            let v = b.js(
                "const r = [...document.querySelectorAll('#live tr[data-job]')]\
               .find(r => r.querySelector('.kind').textContent === 'resync'); \
             return r ? [r.dataset.job, r.querySelector('.state').textContent] : null;",
                json!([]),
            );
            (v[1] == "succeeded").then(|| v[0].as_str().unwrap().to_string())
        },
    );
    b.screenshot("04-jobs");
    b.click(&format!("tr[data-job=\"{job}\"] a[data-key=job-{job}]"));
    b.wait_text("#job-state", "job state", Duration::from_secs(10), |s| {
        s == "succeeded"
    });
    let steps = b.js(
        "return document.querySelectorAll('#live tbody tr').length",
        json!([]),
    );
    assert!(steps.as_u64() >= Some(1), "the job's steps: {steps}");

    // A test failover from the console, behind a confirmation; its job finishes and the test
    // export is served; then its cleanup.
    b.go(&format!("{base}/console/#/vms/v1"));
    b.wait_text("#vm-state", "state", Duration::from_secs(10), |s| {
        s.starts_with("Protected")
    });
    let a = request(
        "POST",
        &format!("{base}/api/v1/policy"),
        Some(&admin),
        Some(r#"{"failover_command": "sleep 120"}"#),
        &[],
    );
    assert_eq!(a.status, 200, "{}", a.body);
    b.click("#test-failover");
    b.find("#confirm[open]");
    assert!(b.text("#confirm-text").contains("VM v1"));
    assert_eq!(
        b.js(
            "return document.getElementById('boot-vm').checked",
            json!([])
        ),
        json!(true),
        "the boot box is checked when a failover command is configured"
    );
    assert!(b.text("#confirm-extra").contains("sleep 120"));
    b.screenshot("05-confirm-test-failover");
    b.click("#confirm-ok");
    let notice = b.wait_text(
        "#notice",
        "test failover notice",
        Duration::from_secs(30),
        |s| s.contains("test failover from point"),
    );
    assert_eq!(b.text("#action-error"), "");
    let job = notice
        .split("job #")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("job id in {notice:?}"))
        .to_string();
    b.go(&format!("{base}/console/#/jobs/{job}"));
    b.wait_text(
        "#job-state",
        "test failover job",
        Duration::from_secs(60),
        |s| s == "succeeded",
    );
    assert!(b.text("#live").contains("test-failover"));
    b.screenshot("06-test-failover-job");
    let nbdinfo = standby_e2e::require_tool("nbdinfo");
    let o = Command::new(&nbdinfo)
        .args(["--size", &g.uri("v1.d1.test")])
        .output()
        .unwrap();
    assert!(o.status.success(), "the test export is served");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        (8u64 << 20).to_string()
    );
    b.go(&format!("{base}/console/#/vms/v1"));
    b.wait_text(
        "#live",
        "the test export on the VM view",
        Duration::from_secs(10),
        |s| s.contains("v1.d1.test"),
    );
    b.wait_text(
        "#test-vm-state",
        "the launched VM",
        Duration::from_secs(10),
        |s| s.starts_with("running"),
    );
    let pid: u32 = b
        .text("#test-vm-pid")
        .trim_start_matches("pid ")
        .parse()
        .expect("the VM's pid");
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    b.screenshot("06b-test-failover-vm");
    b.click("#test-cleanup");
    b.find("#confirm[open]");
    b.click("#confirm-ok");
    b.wait_text("#notice", "cleanup notice", Duration::from_secs(30), |s| {
        s.contains("test failover removed") && s.contains(&format!("VM process {pid} stopped"))
    });
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the VM survived the cleanup"
    );
    let o = Command::new(&nbdinfo)
        .arg(g.uri("v1.d1.test"))
        .output()
        .unwrap();
    assert!(!o.status.success(), "the test export is gone after cleanup");

    // Unprotect needs a confirmation: cancel changes nothing; confirm unprotects.
    b.go(&format!("{base}/console/#/vms/v1"));
    b.wait_text("#vm-state", "state", Duration::from_secs(10), |s| {
        s.starts_with("Protected")
    });
    b.click("#unprotect");
    b.find("#confirm[open]");
    assert!(b.text("#confirm-text").contains("Stop protecting VM v1"));
    b.screenshot("07-confirm-unprotect");
    b.click("#confirm-cancel");
    b.wait_text("#notice", "cancel notice", Duration::from_secs(10), |s| {
        s.contains("cancelled")
    });
    assert_eq!(
        vm_state(&base, &admin, "v1").1,
        "Protected",
        "cancel changed nothing"
    );
    b.click("#unprotect");
    b.click("#confirm-ok");
    b.wait_text(
        "#notice",
        "unprotect notice",
        Duration::from_secs(10),
        |s| s.contains("no longer protected"),
    );
    b.wait_text("#page-title", "back to VMs", Duration::from_secs(10), |s| {
        s == "Virtual machines"
    });
    assert_eq!(vm_state(&base, &admin, "v1").0, 404);

    // The other pages render from the API.
    b.click("#nav a[data-page=disks]");
    b.wait_text(
        "tr[data-disk=d1]",
        "disk d1",
        Duration::from_secs(10),
        |s| s.contains("8.00 MiB"),
    );
    b.click("#nav a[data-page=store]");
    b.wait_text("#live", "store info", Duration::from_secs(10), |s| {
        s.contains("Recovery points per VM") && s.contains("Replication policy")
    });
    b.screenshot("08-store");

    // Verify the store from its page: the job's page opens, the job succeeds with its result;
    // the Jobs tab lists it as a job of the store.
    b.click("#verify-store");
    b.wait_text(
        "#page-title",
        "the verification's job",
        Duration::from_secs(10),
        |s| s.starts_with("Job #"),
    );
    b.wait_text(
        "#job-state",
        "store verify job",
        Duration::from_secs(60),
        |s| s == "succeeded",
    );
    b.wait_text("#verify-verdict", "verdict", Duration::from_secs(10), |s| {
        s == "intact"
    });
    let live = b.text("#live");
    assert!(
        live.contains("store-verify") && live.contains("Chunks checked"),
        "{live}"
    );
    // The verification read real chunks (d1 holds 8 MiB of random bytes), and the page shows
    // the count the API gives.
    let jobs = request(
        "GET",
        &format!("{base}/api/v1/jobs"),
        Some(&admin),
        None,
        &[],
    )
    .json();
    let verify = jobs
        .as_array()
        .and_then(|a| a.iter().find(|j| j["kind"] == "store-verify"))
        .unwrap_or_else(|| panic!("no store-verify job: {jobs}"));
    let one = request(
        "GET",
        &format!("{base}/api/v1/jobs/{}", verify["id"]),
        Some(&admin),
        None,
        &[],
    )
    .json();
    let chunks = one["result"]["chunks_checked"].as_u64().unwrap_or(0);
    assert!(chunks > 0, "the verification checked no chunk: {one}");
    assert!(live.contains(&format!("{chunks} (")), "{live}");
    assert!(b.text("#notice").contains("Store verification started"));
    b.screenshot("09-store-verify-job");
    b.click("#nav a[data-page=jobs]");
    until(
        "the verification in the Jobs tab",
        Duration::from_secs(10),
        || {
            let v = b.js(
                "const r = [...document.querySelectorAll('#live tr[data-job]')]\
               .find(r => r.querySelector('.kind').textContent === 'store-verify'); \
             return r ? [r.children[1].textContent, r.querySelector('.state').textContent] : null;",
                json!([]),
            );
            (v[0] == "replica store" && v[1] == "succeeded").then_some(())
        },
    );

    // Signing out forgets the token.
    b.click("#logout");
    b.find("#token");
    let stored = b.js("return sessionStorage.getItem('standby.token')", json!([]));
    assert_eq!(stored, Value::Null);
    drop(b);
    eprintln!("console screenshots in {}", shots.display());
    g.stop();
}
