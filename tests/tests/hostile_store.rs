//! A hostile or corrupted replica store: what whoever can write the store (or its bucket)
//! can put there must not escape the data directory, run a command, stop failover, listing
//! or GC of the valid points, exhaust memory, or roll the gateway back unnoticed.
//!
//! The crafted-store scenarios of the replica store's suite run here against Garage (their
//! local-directory and in-memory runs are in `replica-store/tests/backends.rs`); the
//! end-to-end checks drive the `standby` CLI and a gateway on a local store.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use replica_store::backend::local::LocalBackend;
use replica_store::testing;
use replica_store::{Backend, PointMeta, Store};
use standby_e2e::garage::S3Factory;
use standby_e2e::repl::{points, wait_for};
use standby_e2e::{run, run_stdout, standby, test_dir, Gateway};

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_points_are_reported_and_skipped_s3() {
    let f = S3Factory::start().await;
    testing::hostile::junk_points_are_reported_and_skipped(&f).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_output_bounded_by_chunk_size_s3() {
    let f = S3Factory::start().await;
    testing::hostile::zstd_output_bounded_by_chunk_size(&f).await
}

/// A data directory with a local store and one imported point of VM `vm` (disk `os`).
fn site_with_point(root: &Path) -> PathBuf {
    let dd = root.join("dd");
    run(standby(&dd).args(["store", "init"]));
    let img = root.join("os.img");
    standby_e2e::random_file(&img, 1 << 20, 7);
    run(standby(&dd).args(["store", "import", "vm/os"]).arg(&img));
    dd
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

async fn local_store(dd: &Path) -> Store {
    let b: Arc<dyn Backend> = Arc::new(LocalBackend::open(dd.join("store")).unwrap());
    Store::open(b, None).await.unwrap()
}

/// Writes a crafted point newer than every other: `good` with `edit` applied.
fn craft_newer(dd: &Path, edit: impl FnOnce(&mut PointMeta)) -> PointMeta {
    rt().block_on(async {
        let store = local_store(dd).await;
        let good = store.list_points(Some("vm")).await.unwrap().pop().unwrap();
        let p = testing::hostile::crafted(&good, "vm", good.created_unix_ms + 60_000, edit);
        testing::hostile::put_point(&store, &p).await;
        p
    })
}

fn stderr_of(cmd: &mut std::process::Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{:?}: {}",
        cmd,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The newest point names its disk `../../../sentinel`: before, a test failover removed
/// `<data-dir>/sentinel` (its overlay "directory") and served an overlay outside the data
/// directory. Now the point is junk: reported, skipped, and failover uses the valid one.
#[test]
fn crafted_point_cannot_escape_the_data_directory_or_stop_failover() {
    let t = test_dir("hostile-escape");
    let dd = site_with_point(t.path());
    let sentinel = dd.join("sentinel");
    std::fs::create_dir_all(&sentinel).unwrap();
    std::fs::write(sentinel.join("keep"), b"admin data").unwrap();
    let evil = craft_newer(&dd, |p| p.disks[0].name = "../../../sentinel".into());
    // Also one plain garbage object.
    std::fs::write(dd.join("store/points/vm/garbage.point"), b"junk").unwrap();

    let err = stderr_of(standby(&dd).args(["points", "list", "vm"]));
    assert!(
        err.contains(&evil.id) && err.contains("garbage.point"),
        "{err}"
    );
    let listed = points(&dd, "vm");
    assert!(!listed.contains(&format!("vm/{}", evil.id)), "{listed:?}");
    run(standby(&dd).args(["store", "gc", "--grace", "0s"]));

    let g = Gateway::start(&dd, &[]);
    let out = run_stdout(standby(&dd).args(["failover", "test", "vm", "--no-launch"]));
    assert!(!out.contains(&evil.id), "{out}");
    assert!(out.contains("nbd://"), "{out}");
    assert!(dd.join("failover/vm/test/os").is_dir());
    run(standby(&dd).args(["failover", "cleanup", "vm"]));
    assert_eq!(std::fs::read(sentinel.join("keep")).unwrap(), b"admin data");
    drop(g);
}

/// The failover command's values are arguments, never shell text: a data directory whose
/// path holds a space and `$(…)` reaches the command as one argument, and nothing runs.
#[test]
fn failover_command_values_are_arguments_not_shell() {
    let t = test_dir("hostile-launch");
    let root = t.path().join("a b $(touch INJECTED)");
    std::fs::create_dir_all(&root).unwrap();
    let dd = site_with_point(&root);
    run(standby(&dd)
        .args(["policy", "set", "--failover-command"])
        .arg(r#"sh -c 'touch "$STANDBY_DIR/env-$STANDBY_VM" "$0"' {dir}/ran-{vm}"#));
    let g = Gateway::start(&dd, &[]);
    let out = run_stdout(
        standby(&dd)
            .current_dir(t.path())
            .args(["failover", "test", "vm"]),
    );
    assert!(out.contains("VM launched"), "{out}");
    let ran = dd.join("failover/vm/test/ran-vm");
    wait_for(&dd, "the failover command to run", T, || {
        (ran.exists() || t.path().join("INJECTED").exists()).then_some(())
    });
    assert!(ran.exists());
    // The gateway runs the command in the test failover's directory.
    for cwd in [t.path(), &dd.join("failover/vm/test"), &dd] {
        assert!(!cwd.join("INJECTED").exists(), "the shell ran $(…)");
    }
    // The values are in the environment too.
    assert!(dd.join("failover/vm/test/env-vm").exists());
    run(standby(&dd).args(["failover", "cleanup", "vm"]));
    drop(g);
}

/// The newest point of a VM vanishes from the store (deleted elsewhere, or an old copy of
/// the store put back): failover refuses until the admin accepts it.
#[test]
fn store_rollback_is_detected() {
    let t = test_dir("hostile-rollback");
    let dd = site_with_point(t.path());
    let img = t.path().join("os2.img");
    standby_e2e::random_file(&img, 1 << 20, 8);
    run(standby(&dd).args(["store", "import", "vm/os"]).arg(&img));
    let listed = points(&dd, "vm");
    let newest = rt().block_on(async {
        let s = local_store(&dd).await;
        s.list_points(Some("vm")).await.unwrap().pop().unwrap()
    });
    assert!(listed.contains(&format!("vm/{}", newest.id)), "{listed:?}");
    std::fs::remove_file(dd.join(format!("store/points/vm/{}.point", newest.id))).unwrap();

    let err = stderr_of(standby(&dd).args(["points", "list", "vm"]));
    assert!(err.contains("went back in time"), "{err}");
    let o = standby(&dd)
        .args(["failover", "test", "vm", "--no-launch"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("went back in time") && e.contains(&newest.id),
        "{e}"
    );
    // Accepted explicitly, failover goes on with the older point.
    let g = Gateway::start(&dd, &[]);
    let out = run_stdout(standby(&dd).args([
        "failover",
        "test",
        "vm",
        "--no-launch",
        "--accept-store-rollback",
    ]));
    assert!(out.contains("test failover"), "{out}");
    run(standby(&dd).args(["failover", "cleanup", "vm"]));
    drop(g);
}
