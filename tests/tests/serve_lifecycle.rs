//! `standby serve` start-up and shutdown behaviour.

use standby_e2e::nbd_client::*;
use standby_e2e::{run, standby, test_dir, Gateway};

#[test]
fn sigterm_finishes_cleanly_and_data_is_durable() {
    let t = test_dir("sigterm");
    let dd = t.path().join("data");
    run(standby(&dd).args(["disk", "create", "d", "--size", "4M"]));
    let g = Gateway::start(&dd, &[]);
    let mut c = RawClient::connect(g.addr).unwrap();
    assert_eq!(c.go("d").unwrap(), REP_ACK);
    assert_eq!(c.write(8192, &[0xabu8; 4096]).unwrap(), 0);
    let status = g.stop();
    assert!(status.success(), "exit status {status}");
    let img = std::fs::read(dd.join("disks/d.img")).unwrap();
    assert_eq!(&img[8192..12288], &[0xabu8; 4096][..]);
}

#[test]
fn bad_input_on_the_command_line_gets_clear_errors() {
    let t = test_dir("cli");
    let dd = t.path().join("data");
    let out = standby(&dd)
        .args(["disk", "create", "x", "--size", "12Q"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a size"));
    let out = standby(&dd)
        .args(["disk", "create", "../evil", "--size", "1M"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid disk name"));
    run(standby(&dd).args(["disk", "create", "x", "--size", "1M"]));
    let out = standby(&dd)
        .args(["disk", "create", "x", "--size", "1M"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    // A port in use: a clear error and a non-zero exit.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let out = standby(&dd)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot listen"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A configuration typo is named.
    std::fs::write(dd.join("standby.toml"), "[serve]\nlisen = \"x\"\n").unwrap();
    let out = standby(&dd).args(["disk", "list"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lisen"));
}

#[test]
fn disks_declared_in_the_config_are_served() {
    let t = test_dir("config");
    let dd = t.path().join("data");
    std::fs::create_dir_all(&dd).unwrap();
    std::fs::write(t.path().join("decl.raw"), vec![0x11u8; 65536]).unwrap();
    std::fs::write(
        dd.join("standby.toml"),
        format!(
            "[[disk]]\nname = \"decl\"\nimage = \"{}\"\nread_only = true\n",
            t.path().join("decl.raw").display()
        ),
    )
    .unwrap();
    let list = standby_e2e::run_stdout(standby(&dd).args(["disk", "list"]));
    assert!(list.contains("decl") && list.contains("config"), "{list}");
    let g = Gateway::start(&dd, &[]);
    let mut c = RawClient::connect(g.addr).unwrap();
    assert_eq!(c.go("decl").unwrap(), REP_ACK);
    assert_eq!(c.read(0, 16).unwrap().data, vec![0x11u8; 16]);
    assert_eq!(c.write(0, &[0u8; 16]).unwrap(), EPERM);
}

#[test]
fn unix_socket_serves_qemu_img() {
    standby_e2e::require_tool("qemu-img");
    let t = test_dir("unix");
    let dd = t.path().join("data");
    run(standby(&dd).args(["disk", "create", "u1", "--size", "2M"]));
    let sock = t.path().join("standby.sock");
    let g = Gateway::start(&dd, &["--socket", sock.to_str().unwrap()]);
    let uri = format!("nbd+unix:///u1?socket={}", sock.display());
    run(std::process::Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x3c 0 64k",
        "-c",
        "read -P 0x3c 0 64k",
        &uri,
    ]));
    let info = standby_e2e::run_stdout(std::process::Command::new("qemu-img").args(["info", &uri]));
    assert!(info.contains("2 MiB"), "{info}");
    assert!(g.stop().success());
    assert!(!sock.exists(), "socket removed on shutdown");
}
