//! Who may connect: the listen policy beyond loopback, mutual TLS and per-export allow-lists,
//! with the real `standby serve` and real clients (nbdinfo, qemu-img/qemu-io).
//!
//! The listener binds `0.0.0.0`, which is "beyond loopback" for the policy; the tests reach it
//! through 127.0.0.1. Every key and certificate is made here with openssl.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use standby_e2e::nbd_client::*;
use standby_e2e::pki::{Pki, SERVER_EXT};
use standby_e2e::{require_tool, run, run_stdout, standby, test_dir, Gateway};

const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;

/// A server CA and certificate (for 127.0.0.1) and a client CA, laid out for the server; and
/// client credential directories as qemu (`tls-creds-x509,dir=`) and libnbd
/// (`tls-certificates=`) read them: ca-cert.pem (the server's CA), client-cert.pem,
/// client-key.pem.
struct AccessPki(Pki);

impl std::ops::Deref for AccessPki {
    type Target = Pki;
    fn deref(&self) -> &Pki {
        &self.0
    }
}

impl AccessPki {
    fn new(dir: &Path) -> AccessPki {
        let p = Pki::new(dir);
        p.ca("server-ca");
        p.ca("client-ca");
        p.ca("rogue-ca");
        // The server key is 2432 bits: a size some admins' keys have (the NBD reference
        // project's test key is one), which ring-based rustls refused to load.
        p.openssl(&["genrsa", "-out", "server-key.pem", "2432"]);
        p.sign("server", "server-ca", "/CN=localhost", SERVER_EXT);
        AccessPki(p)
    }

    /// A client credentials directory for a certificate with common name `cn` (and the DNS
    /// name `{cn}.example`) signed by `ca`.
    fn client(&self, cn: &str, ca: &str) -> PathBuf {
        let name = format!("client-{cn}-{ca}");
        self.sign(
            &name,
            ca,
            &format!("/CN={cn}"),
            &format!("extendedKeyUsage=clientAuth\nsubjectAltName=DNS:{cn}.example\n"),
        );
        let d = self.dir().join(&name);
        std::fs::create_dir_all(&d).unwrap();
        // The server's CA, and the client's own (qemu checks its certificate against the file).
        let mut cas = std::fs::read(self.file("server-ca-cert.pem")).unwrap();
        cas.extend(std::fs::read(self.file(&format!("{ca}-cert.pem"))).unwrap());
        std::fs::write(d.join("ca-cert.pem"), cas).unwrap();
        std::fs::copy(
            self.file(&format!("{name}-cert.pem")),
            d.join("client-cert.pem"),
        )
        .unwrap();
        std::fs::copy(
            self.file(&format!("{name}-key.pem")),
            d.join("client-key.pem"),
        )
        .unwrap();
        d
    }

    /// A directory with only the server's CA: a client without a certificate.
    fn anonymous(&self) -> PathBuf {
        let d = self.dir().join("anonymous");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(self.file("server-ca-cert.pem"), d.join("ca-cert.pem")).unwrap();
        d
    }

    /// `--tls-cert … --tls-key …` (and `--tls-client-ca` with `client_ca`).
    fn serve_args(&self, client_ca: bool) -> Vec<String> {
        let mut a = vec![
            "--tls-cert".to_string(),
            self.file("server-cert.pem"),
            "--tls-key".to_string(),
            self.file("server-key.pem"),
        ];
        if client_ca {
            a.push("--tls-client-ca".into());
            a.push(self.file("client-ca-cert.pem"));
        }
        a
    }
}

fn data_dir(t: &tempfile::TempDir) -> PathBuf {
    let dd = t.path().join("data");
    run(standby(&dd).args(["disk", "create", "vm1", "--size", "8M"]));
    run(standby(&dd).args(["disk", "create", "vm2", "--size", "4M"]));
    dd
}

/// `standby serve ARGS` must exit with an error (within 30 s); returns its stderr.
fn serve_must_fail(dd: &Path, args: &[String]) -> String {
    let log = dd.join("refused.log");
    let mut child = standby(dd)
        .arg("serve")
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "standby serve {args:?} kept running: it should have refused to start; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    std::fs::read_to_string(&log).unwrap()
}

fn start(dd: &Path, args: &[String]) -> Gateway {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    Gateway::start(dd, &a)
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// The TLS URI of an export for nbdinfo, with the client credentials in `creds`.
fn nbds(g: &Gateway, export: &str, creds: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{}/{export}?tls-certificates={}",
        g.port(),
        creds.display()
    )
}

fn nbdinfo(uri: &str) -> std::process::Output {
    require_tool("nbdinfo");
    Command::new("nbdinfo").arg(uri).output().unwrap()
}

fn nbdinfo_list(uri: &str) -> String {
    require_tool("nbdinfo");
    run_stdout(Command::new("nbdinfo").args(["--list", uri]))
}

/// How many TLS handshakes the server has refused so far (from its log).
fn tls_failures(g: &Gateway) -> usize {
    g.log().matches("TLS handshake failed").count()
}

/// Waits (up to 10 s) until `cond` holds, polling the server's log.
fn wait_for(cond: impl Fn() -> bool, g: &Gateway) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "server log:\n{}", g.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn connect(g: &Gateway) -> RawClient {
    RawClient::connect(format!("127.0.0.1:{}", g.port()).parse().unwrap()).unwrap()
}

#[test]
fn plaintext_beyond_loopback_is_refused_at_start() {
    let t = test_dir("access-plain-refused");
    let dd = data_dir(&t);
    let err = serve_must_fail(&dd, &strings(&["--listen", "0.0.0.0:0"]));
    assert!(
        err.contains("refusing to serve plaintext NBD on 0.0.0.0:0"),
        "{err}"
    );
    assert!(err.contains("--insecure-no-tls"), "{err}");
    assert!(err.contains("--tls-client-ca"), "{err}");
    // The configuration file is held to the same rule.
    std::fs::write(dd.join("standby.toml"), "[serve]\nlisten = \"0.0.0.0:0\"\n").unwrap();
    let err = serve_must_fail(&dd, &[]);
    assert!(err.contains("refusing to serve plaintext NBD"), "{err}");
}

#[test]
fn tls_without_client_ca_beyond_loopback_is_refused_at_start() {
    let t = test_dir("access-noca-refused");
    let dd = data_dir(&t);
    let pki = AccessPki::new(&t.path().join("pki"));
    let mut args = strings(&["--listen", "0.0.0.0:0"]);
    args.extend(pki.serve_args(false));
    let err = serve_must_fail(&dd, &args);
    assert!(err.contains("without client authentication"), "{err}");
    assert!(err.contains("--tls-client-ca"), "{err}");
}

#[test]
fn insecure_no_tls_serves_plaintext_and_says_so() {
    let t = test_dir("access-insecure");
    let dd = data_dir(&t);
    let g = start(
        &dd,
        &strings(&["--listen", "0.0.0.0:0", "--insecure-no-tls"]),
    );
    let out = nbdinfo(&format!("nbd://127.0.0.1:{}/vm1", g.port()));
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("without TLS"));
    let log = g.log();
    assert!(
        log.contains("--insecure-no-tls: plaintext NBD beyond loopback"),
        "{log}"
    );
}

#[test]
fn certificate_beyond_loopback_makes_starttls_mandatory() {
    let t = test_dir("access-tls-mandatory");
    let dd = data_dir(&t);
    let pki = AccessPki::new(&t.path().join("pki"));
    // No --tls-required: beyond loopback it is implied.
    let mut args = strings(&["--listen", "0.0.0.0:0", "--insecure-no-tls"]);
    args.extend(pki.serve_args(false));
    let g = start(&dd, &args);
    let mut c = connect(&g);
    assert_eq!(c.go("vm1").unwrap(), REP_ERR_TLS_REQD);
    let out = nbdinfo(&format!("nbd://127.0.0.1:{}/vm1", g.port()));
    assert!(
        !out.status.success(),
        "plaintext client was served: {out:?}"
    );
    // A TLS client without a certificate is served: clients are not authenticated here.
    let out = nbdinfo(&nbds(&g, "vm1", &pki.anonymous()));
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("with TLS"));
    assert!(
        g.log().contains("clients are NOT authenticated"),
        "{}",
        g.log()
    );
}

/// The server's key is 2432 bits (see [`AccessPki::new`]): it loads, and clients complete TLS.
#[test]
fn mutual_tls_with_nbdinfo() {
    let t = test_dir("access-mtls-nbdinfo");
    let dd = data_dir(&t);
    let pki = AccessPki::new(&t.path().join("pki"));
    let hv1 = pki.client("hv1", "client-ca");
    let rogue = pki.client("hv1", "rogue-ca");
    let mut args = strings(&["--listen", "0.0.0.0:0"]);
    args.extend(pki.serve_args(true));
    let g = start(&dd, &args);
    assert!(
        g.log().contains("clients must present a certificate"),
        "{}",
        g.log()
    );

    let out = nbdinfo(&nbds(&g, "vm1", &hv1));
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("with TLS") && text.contains("export-size: 8388608"),
        "{text}"
    );

    // No certificate, or one from another CA with the same name: the TLS handshake fails.
    for creds in [pki.anonymous(), rogue] {
        let before = tls_failures(&g);
        let out = nbdinfo(&nbds(&g, "vm1", &creds));
        assert!(!out.status.success(), "{creds:?} was served: {out:?}");
        // Refused by the server's certificate check, not by the client itself.
        wait_for(|| tls_failures(&g) > before, &g);
    }
    // Plaintext: refused before any export is named.
    let mut c = connect(&g);
    assert_eq!(c.go("vm1").unwrap(), REP_ERR_TLS_REQD);
    // The server is still serving the good client.
    assert!(nbdinfo(&nbds(&g, "vm2", &hv1)).status.success());
}

#[test]
fn mutual_tls_with_qemu() {
    require_tool("qemu-io");
    let t = test_dir("access-mtls-qemu");
    let dd = data_dir(&t);
    let pki = AccessPki::new(&t.path().join("pki"));
    let hv1 = pki.client("hv1", "client-ca");
    let rogue = pki.client("rogue", "rogue-ca");
    let mut args = strings(&["--listen", "0.0.0.0:0"]);
    args.extend(pki.serve_args(true));
    let g = start(&dd, &args);
    let qemu_io = |creds: &Path, cmds: &[&str]| {
        let obj = format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client,verify-peer=on",
            creds.display()
        );
        let opts = format!(
            "driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={},file.export=vm1,file.tls-creds=tls0",
            g.port()
        );
        let mut c = Command::new("qemu-io");
        c.args(["--object", &obj, "--image-opts", &opts]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        c.output().unwrap()
    };
    let out = qemu_io(&hv1, &["write -P 0x42 0 1M", "read -P 0x42 0 1M"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("Pattern verification failed"), "{stdout}");
    for creds in [pki.anonymous(), rogue] {
        let before = tls_failures(&g);
        let out = qemu_io(&creds, &["read 0 4k"]);
        wait_for(|| tls_failures(&g) > before, &g);
        let text = format!("{out:?}");
        assert!(
            !out.status.success() || text.contains("Could not open") || text.contains("failed"),
            "{creds:?} was served: {text}"
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("read 4096/4096"),
            "{text}"
        );
    }
    // qemu-img info with the good certificate still works afterwards.
    let obj = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client,verify-peer=on",
        hv1.display()
    );
    let info = run_stdout(Command::new("qemu-img").args([
        "info",
        "--object",
        &obj,
        "--image-opts",
        &format!(
            "driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={},file.export=vm1,file.tls-creds=tls0",
            g.port()
        ),
    ]));
    assert!(info.contains("8 MiB"), "{info}");
}

#[test]
fn allow_lists_hide_and_refuse_exports() {
    let t = test_dir("access-allow");
    let dd = data_dir(&t);
    let pki = AccessPki::new(&t.path().join("pki"));
    let hv1 = pki.client("hv1", "client-ca");
    let hv2 = pki.client("hv2", "client-ca");
    // vm1: hv1 by common name; vm2: hv2 by its DNS subject-alternative name.
    std::fs::write(
        dd.join("standby.toml"),
        "[serve.allow]\nvm1 = [\"hv1\"]\nvm2 = [\"hv2.example\"]\n",
    )
    .unwrap();
    let mut args = strings(&["--listen", "0.0.0.0:0"]);
    args.extend(pki.serve_args(true));
    let g = start(&dd, &args);

    let list1 = nbdinfo_list(&nbds(&g, "", &hv1));
    assert!(
        list1.contains("export=\"vm1\"") || list1.contains("vm1"),
        "{list1}"
    );
    assert!(!list1.contains("vm2"), "hv1 sees vm2: {list1}");
    let list2 = nbdinfo_list(&nbds(&g, "", &hv2));
    assert!(list2.contains("vm2") && !list2.contains("vm1"), "{list2}");

    assert!(nbdinfo(&nbds(&g, "vm1", &hv1)).status.success());
    let out = nbdinfo(&nbds(&g, "vm2", &hv1));
    assert!(!out.status.success(), "hv1 opened vm2: {out:?}");
    // Refused exactly like an unknown export: nothing tells the client it exists.
    let err = String::from_utf8_lossy(&out.stderr).replace("vm2", "NAME");
    let missing = nbdinfo(&nbds(&g, "vm9", &hv1));
    let missing = String::from_utf8_lossy(&missing.stderr).replace("vm9", "NAME");
    assert_eq!(err, missing);
    assert!(nbdinfo(&nbds(&g, "vm2", &hv2)).status.success());
    assert!(g.log().contains("not in its allow-list"), "{}", g.log());
}

/// An allow-list needs client certificates to check: without a client CA the server refuses
/// to start; with one, TLS is mandatory even on loopback, so no plaintext client reaches the
/// handshake options that name exports.
#[test]
fn allow_list_needs_a_client_ca_and_client_ca_implies_tls_on_loopback() {
    let t = test_dir("access-allow-plain");
    let dd = data_dir(&t);
    let pki = AccessPki::new(&t.path().join("pki"));
    std::fs::write(dd.join("standby.toml"), "[serve.allow]\nvm1 = [\"hv1\"]\n").unwrap();
    let err = serve_must_fail(&dd, &pki.serve_args(false));
    assert!(err.contains("no client CA is configured"), "{err}");
    let g = start(&dd, &pki.serve_args(true));
    let mut c = connect(&g);
    c.send_option(OPT_LIST, &[]).unwrap();
    assert_eq!(c.read_opt_reply().unwrap().kind, REP_ERR_TLS_REQD);
    let mut d = Vec::new();
    d.extend_from_slice(&3u32.to_be_bytes());
    d.extend_from_slice(b"vm1");
    d.extend_from_slice(&0u16.to_be_bytes());
    c.send_option(OPT_INFO, &d).unwrap();
    assert_eq!(c.read_opt_reply().unwrap().kind, REP_ERR_TLS_REQD);
}
