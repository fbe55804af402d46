//! STARTTLS with real clients (nbdinfo over nbds://, qemu-img with tls-creds-x509).

use std::path::Path;
use std::process::Command;

use standby_e2e::nbd_client::*;
use standby_e2e::pki::{Pki, SERVER_EXT};
use standby_e2e::{require_tool, run, run_stdout, standby, test_dir, Gateway};

/// A CA and a server certificate for 127.0.0.1/localhost, laid out as both libnbd and qemu
/// expect a credentials directory (ca-cert.pem; server-cert.pem / server-key.pem).
fn make_pki(dir: &Path) {
    let pki = Pki::new(dir);
    pki.ca("ca");
    pki.sign("server", "ca", "/CN=localhost", SERVER_EXT);
}

fn tls_gateway(name: &str, required: bool) -> (tempfile::TempDir, Gateway) {
    let t = test_dir(name);
    let dd = t.path().join("data");
    let pki = t.path().join("pki");
    make_pki(&pki);
    run(standby(&dd).args(["disk", "create", "vm1", "--size", "8M"]));
    let cert = pki.join("server-cert.pem").display().to_string();
    let key = pki.join("server-key.pem").display().to_string();
    let mut args = vec!["--tls-cert", &cert, "--tls-key", &key];
    if required {
        args.push("--tls-required");
    }
    let g = Gateway::start(&dd, &args);
    (t, g)
}

#[test]
fn nbdinfo_over_tls() {
    require_tool("nbdinfo");
    let (t, g) = tls_gateway("tls-nbdinfo", false);
    let uri = format!(
        "nbds://{}/vm1?tls-certificates={}",
        g.addr,
        t.path().join("pki").display()
    );
    let out = run_stdout(Command::new("nbdinfo").arg(&uri));
    assert!(out.contains("with TLS"), "{out}");
    assert!(out.contains("export-size: 8388608"), "{out}");
    // Plaintext still allowed when TLS is optional.
    let out = run_stdout(Command::new("nbdinfo").arg(g.uri("vm1")));
    assert!(out.contains("without TLS"), "{out}");
}

#[test]
fn qemu_img_over_tls_with_required_mode() {
    require_tool("qemu-img");
    let (t, g) = tls_gateway("tls-qemu", true);
    let pki = t.path().join("pki");
    let obj = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        pki.display()
    );
    let opts = format!(
        "driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={},file.export=vm1,file.tls-creds=tls0",
        g.port()
    );
    run(Command::new("qemu-io").args([
        "--object",
        &obj,
        "--image-opts",
        &opts,
        "-c",
        "write -P 0x42 0 1M",
        "-c",
        "read -P 0x42 0 1M",
    ]));
    let info = run_stdout(Command::new("qemu-img").args([
        "info",
        "--object",
        &obj,
        "--image-opts",
        &opts,
    ]));
    assert!(info.contains("8 MiB"), "{info}");
    // Without TLS the server refuses: the client gets a clear failure, the server stays up.
    let out = Command::new("qemu-img")
        .args(["info", &g.uri("vm1")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let mut c = RawClient::connect(g.addr).unwrap();
    assert_eq!(c.go("vm1").unwrap(), REP_ERR_TLS_REQD);
}

#[test]
fn bad_tls_files_are_reported() {
    let t = test_dir("tls-bad");
    let dd = t.path().join("data");
    run(standby(&dd).args(["disk", "create", "vm1", "--size", "1M"]));
    std::fs::write(t.path().join("junk.pem"), "not a certificate").unwrap();
    let out = standby(&dd)
        .args(["serve", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(t.path().join("junk.pem"))
        .arg("--tls-key")
        .arg(t.path().join("junk.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no PEM certificate"), "{err}");
}
