//! The local backend's commit of staged objects, on both of its sync paths: a few files
//! (each synced, then its directories) and many (one `syncfs` before and after the renames).
//! Either way every object is readable under its key afterwards, in directories the session
//! created, and no staging file is left behind.

use bytes::Bytes;
use replica_store::backend::local::LocalBackend;
use replica_store::Backend;

fn walk(dir: &std::path::Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
}

async fn commit_n(n: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = LocalBackend::open(dir.path().join("store")).expect("open");
    let mut staged = Vec::new();
    for i in 0..n {
        // Keys in directories that do not exist yet (two levels), as chunk keys are.
        let key = format!("obj/{:02x}/k{i:05}", i % 7);
        let data = Bytes::from(vec![(i % 251) as u8; 5000 + i]);
        if let Some(s) = b.put_staged(&key, data).await.expect("stage") {
            staged.push(s);
        }
    }
    assert_eq!(staged.len(), n);
    b.commit_staged(staged).await.expect("commit");
    for i in 0..n {
        let key = format!("obj/{:02x}/k{i:05}", i % 7);
        let got = b.get(&key).await.expect("get");
        assert_eq!(got.len(), 5000 + i, "{key}");
        assert!(got.iter().all(|&x| x == (i % 251) as u8), "{key}");
    }
    let mut names = Vec::new();
    walk(&dir.path().join("store/obj"), &mut names);
    assert_eq!(names.len(), n, "only the objects remain: {names:?}");
    assert!(names.iter().all(|f| f.starts_with('k')), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_of_a_few_files_syncs_them_one_by_one() {
    commit_n(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_of_many_files_syncs_the_file_system() {
    commit_n(200).await;
}
