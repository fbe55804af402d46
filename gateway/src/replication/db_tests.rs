//! Tests of the state database: round trips, and a database written with string states.

use super::*;

#[test]
fn vm_jobs_and_checkpoints_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let db = Db::open(d.path()).unwrap();
    db.insert_vm("web", &["a".into(), "b".into()]).unwrap();
    assert!(matches!(
        db.insert_vm("web", &[]),
        Err(DbError::AlreadyProtected(..))
    ));
    let v = db
        .modify_vm("web", |v| {
            v.phase = Phase::Critical;
            v.resume_phase = Some(Phase::Protected);
            v.next_retry_ms = Some(5);
        })
        .unwrap();
    let db2 = Db::open(d.path()).unwrap();
    assert_eq!(db2.vm("web").unwrap().unwrap(), v);
    assert_eq!(v.disks, vec!["a", "b"]);
    let j = db.start_job("web", JobKind::InitialReplication).unwrap();
    db.step(j, "copy a", "").unwrap();
    db.step(j, "copy b", "").unwrap();
    db.finish_job(j, JobState::Succeeded, "", "").unwrap();
    let (jr, steps) = db.job(j).unwrap().unwrap();
    assert_eq!(jr.state, JobState::Succeeded);
    assert_eq!(jr.kind, JobKind::InitialReplication);
    assert!(steps.iter().all(|s| s.state == StepState::Done));
    assert_eq!(steps.len(), 2);
    assert!(steps.iter().all(|s| s.finished_ms.is_some()));
    // A site-wide job runs alone and keeps its figures and outcome.
    let v = db
        .start_job_alone("", JobKind::StoreVerify)
        .unwrap()
        .unwrap();
    assert_eq!(
        db.start_job_alone("", JobKind::StoreVerify).unwrap(),
        Err(v)
    );
    assert_eq!(db.job_data(v).unwrap(), (None, None));
    db.set_job_data(v, Some(r#"{"n":1}"#), None).unwrap();
    db.set_job_data(v, None, Some(r#"{"ok":true}"#)).unwrap();
    assert_eq!(
        db.job_data(v).unwrap(),
        (Some(r#"{"n":1}"#.into()), Some(r#"{"ok":true}"#.into()))
    );
    db.finish_job(v, JobState::Failed, "", "bad").unwrap();
    let w = db
        .start_job_alone("", JobKind::StoreVerify)
        .unwrap()
        .unwrap();
    assert_ne!(v, w);
    assert_eq!(db.job(w).unwrap().unwrap().0.vm, "");
    // A gateway stop leaves it interrupted, saying nothing resumes it.
    db.interrupt_running_jobs().unwrap();
    let (jw, _) = db.job(w).unwrap().unwrap();
    assert_eq!(jw.state, JobState::Interrupted);
    assert!(jw.error.contains("nothing resumes it"), "{}", jw.error);
    let c = Checkpoint {
        vm: "web".into(),
        disk: "a".into(),
        kind: CheckpointKind::Initial,
        chain: "x".into(),
        start_lsn: 3,
        position: 10,
        total: 20,
        bytes_read: 1,
        bytes_sent: 2,
        index: vec![1, 2, 3],
        todo: vec![],
        done: false,
    };
    db.put_checkpoint(&c).unwrap();
    assert_eq!(db.checkpoint("web", "a").unwrap().unwrap(), c);
    assert!(db.delete_vm("web").unwrap());
    assert!(db.checkpoint("web", "a").unwrap().is_none());
}

/// A database as schema 1 wrote it (states as their strings) opens with every state
/// typed, and the typed API writes the same strings back.
#[test]
fn a_database_written_with_string_states_opens() {
    let d = tempfile::tempdir().unwrap();
    {
        let db = Db::open(d.path()).unwrap();
        db.conn
            .execute_batch(
                "INSERT INTO vms(name, disks, phase, resume_phase, created_ms)
                   VALUES('web', 'a', 'Critical', 'Resyncing', 1);
                 INSERT INTO jobs(vm, kind, state, created_ms)
                   VALUES('web', 'delta-replication', 'failed', 1),
                         ('web', 'failover-commit', 'running', 2);
                 INSERT INTO job_steps(job, seq, name, started_ms, state)
                   VALUES(1, 1, 'cut and ship', 1, 'failed');
                 INSERT INTO checkpoints(vm, disk, kind, chain, start_lsn, position, total,
                   bytes_read, bytes_sent, idx, todo, done)
                   VALUES('web', 'a', 'resync', 'c', 0, 0, 0, 0, 0, x'', x'', 0);
                 INSERT INTO attachments(export, vm, disk, point, rw, kind, dir, created_ms)
                   VALUES('web-a-test', 'web', 'a', 'p1', 1, 'test', '/x', 1);
                 INSERT INTO attachments(export, vm, disk, point, rw, kind, dir, created_ms,
                   state) VALUES('web-a', 'web', 'a', 'p1', 1, 'failover', '/y', 1, 'commit');",
            )
            .unwrap();
    }
    let db = Db::open(d.path()).unwrap();
    let v = db.vm("web").unwrap().unwrap();
    assert_eq!(
        (v.phase, v.resume_phase),
        (Phase::Critical, Some(Phase::Resyncing))
    );
    let jobs = db.jobs(10, None).unwrap();
    assert_eq!(
        jobs.iter().map(|j| (j.kind, j.state)).collect::<Vec<_>>(),
        vec![
            (JobKind::FailoverCommit, JobState::Running),
            (JobKind::DeltaReplication, JobState::Failed)
        ]
    );
    assert_eq!(db.job(1).unwrap().unwrap().1[0].state, StepState::Failed);
    assert_eq!(
        db.checkpoint("web", "a").unwrap().unwrap().kind,
        CheckpointKind::Resync
    );
    let a = db.attachments().unwrap();
    assert_eq!(
        a.iter().map(|a| (a.kind, a.state)).collect::<Vec<_>>(),
        vec![
            (OverlayKind::Failover, AttachmentState::Commit),
            (OverlayKind::Test, AttachmentState::Requested)
        ]
    );
    // Written back as the same strings an older standby reads.
    db.set_attachment("web-a-test", AttachmentState::Served, "", 0.0)
        .unwrap();
    assert_eq!(db.interrupt_running_jobs().unwrap(), 1);
    let raw: Vec<String> = [
        "SELECT state FROM attachments WHERE export='web-a-test'",
        "SELECT state FROM jobs WHERE id=2",
    ]
    .iter()
    .map(|q| db.conn.query_row(q, [], |r| r.get(0)).unwrap())
    .collect();
    assert_eq!(raw, vec!["served", "interrupted"]);
    assert!(db.attachments().unwrap()[1].served_ms.is_some());
    // A state this version does not know is an error naming it, not a guess.
    db.conn
        .execute("UPDATE jobs SET state='paused' WHERE id=1", [])
        .unwrap();
    let e = db.jobs(10, None).unwrap_err().to_string();
    assert!(e.contains("unknown job state \"paused\""), "{e}");
}

#[test]
fn every_stored_form_parses_back() {
    fn check<T: Copy + PartialEq + std::fmt::Debug>(
        all: &[T],
        s: fn(T) -> &'static str,
        p: fn(&str) -> Option<T>,
    ) {
        for &v in all {
            assert_eq!(p(s(v)), Some(v));
        }
    }
    check(Phase::ALL, Phase::as_str, Phase::parse);
    check(JobKind::ALL, JobKind::as_str, JobKind::parse);
    check(JobState::ALL, JobState::as_str, JobState::parse);
    check(StepState::ALL, StepState::as_str, StepState::parse);
    check(
        CheckpointKind::ALL,
        CheckpointKind::as_str,
        CheckpointKind::parse,
    );
    check(
        AttachmentState::ALL,
        AttachmentState::as_str,
        AttachmentState::parse,
    );
    check(OverlayKind::ALL, OverlayKind::as_str, OverlayKind::parse);
    assert_eq!(
        serde_json::to_string(&JobKind::DeltaReplication).unwrap(),
        "\"delta-replication\""
    );
    assert_eq!(format!("{:<10}|", JobState::Failed), "failed    |");
}

/// A checkpoint records the index once, then only the chunks stored since the last record;
/// reading it back applies them. A new pass of the disk starts from its own index.
#[test]
fn checkpoints_record_only_the_chunks_stored_since_the_last_one() {
    use replica_store::{ChunkId, DiskIndex};
    let d = tempfile::tempdir().unwrap();
    let db = Db::open(d.path()).unwrap();
    let base = DiskIndex::new(10 * 65536, 65536).unwrap();
    let mut c = Checkpoint {
        vm: "web".into(),
        disk: "a".into(),
        kind: CheckpointKind::Initial,
        chain: "x".into(),
        start_lsn: 1,
        position: 0,
        total: 10,
        bytes_read: 0,
        bytes_sent: 0,
        index: base.to_bytes(),
        todo: vec![],
        done: false,
    };
    db.put_checkpoint(&c).unwrap();
    let id = |b: u8| ChunkId([b; 32]);
    c.position = 4;
    c.bytes_read = 4 * 65536;
    db.checkpoint_progress(&c.progress(vec![(0, id(1)), (3, id(2))]))
        .unwrap();
    c.position = 10;
    c.done = true;
    db.checkpoint_progress(&c.progress(vec![(3, id(3)), (9, id(4))]))
        .unwrap();
    // The stored row still holds the starting index; the chunks are separate rows.
    let raw: Vec<u8> = db
        .conn
        .query_row("SELECT idx FROM checkpoints", [], |r| r.get(0))
        .unwrap();
    assert_eq!(raw, base.to_bytes());
    let back = db.checkpoint("web", "a").unwrap().unwrap();
    assert_eq!((back.position, back.done), (10, true));
    let idx = DiskIndex::from_bytes(&back.index, "t").unwrap();
    assert_eq!(idx.get(0), Some(id(1)));
    assert_eq!(idx.get(3), Some(id(3)), "the later record wins");
    assert_eq!(idx.get(9), Some(id(4)));
    assert_eq!(idx.get(5), base.get(5));
    // A new pass drops the old pass's chunks.
    c.position = 0;
    c.done = false;
    db.put_checkpoint(&c).unwrap();
    let again = db.checkpoint("web", "a").unwrap().unwrap();
    assert_eq!(again.index, base.to_bytes());
    db.clear_checkpoints("web").unwrap();
    assert!(db.checkpoint("web", "a").unwrap().is_none());
    let n: i64 = db
        .conn
        .query_row("SELECT COUNT(*) FROM checkpoint_chunks", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
}

/// A schema-1 database (checkpoints with whole indexes, no chunk table) opens and is
/// migrated; a database of a newer schema is refused with its version.
#[test]
fn a_schema_1_database_is_migrated_and_a_newer_one_refused() {
    let d = tempfile::tempdir().unwrap();
    {
        let db = Db::open(d.path()).unwrap();
        db.conn
            .execute_batch(
                "DROP TABLE checkpoint_chunks; UPDATE meta SET value='1' WHERE key='schema';
                 INSERT INTO checkpoints(vm, disk, kind, chain, start_lsn, position, total,
                   bytes_read, bytes_sent, idx, todo, done)
                   VALUES('web', 'a', 'initial', 'c', 0, 5, 10, 0, 0, x'0102', x'', 0);",
            )
            .unwrap();
    }
    let db = Db::open(d.path()).unwrap();
    assert_eq!(db.meta("schema").unwrap().as_deref(), Some("2"));
    let c = db.checkpoint("web", "a").unwrap().unwrap();
    assert_eq!((c.position, c.index.as_slice()), (5, &[1u8, 2][..]));
    db.set_meta("schema", "3").unwrap();
    drop(db);
    let e = Db::open(d.path()).unwrap_err().to_string();
    assert!(e.contains("schema version 3"), "{e}");
}

#[test]
fn upload_totals_add_up_and_go_with_the_vm() {
    let d = tempfile::tempdir().unwrap();
    let db = Db::open(d.path()).unwrap();
    db.insert_vm("web", &["a".into()]).unwrap();
    db.add_upload("web", 0, 5, 1000).unwrap();
    db.add_upload("web", 1, 2, 24).unwrap();
    assert_eq!(db.uploads().unwrap(), vec![("web".to_string(), 1, 7, 1024)]);
    assert!(db.delete_vm("web").unwrap());
    assert!(db.uploads().unwrap().is_empty());
}

#[test]
fn a_hydrations_updates_never_undo_a_commit_request() {
    let d = tempfile::tempdir().unwrap();
    let db = Db::open(d.path()).unwrap();
    for export in ["web.a", "web.b"] {
        db.add_attachment(&Attachment {
            export: export.into(),
            vm: "web".into(),
            disk: export[4..].into(),
            point: "p1".into(),
            rw: true,
            kind: OverlayKind::Failover,
            dir: "/x".into(),
            created_ms: 1,
            state: AttachmentState::Requested,
            error: String::new(),
            progress: 0.0,
            served_ms: None,
            pid: None,
        })
        .unwrap();
        db.set_attachment(export, AttachmentState::Served, "", 10.0)
            .unwrap();
    }
    // `failover commit` while web.a hydrates; web.b is not being committed.
    db.set_attachment("web.a", AttachmentState::Commit, "", 10.0)
        .unwrap();
    let states = |db: &Db| {
        db.attachments()
            .unwrap()
            .into_iter()
            .map(|a| (a.export, a.state, a.progress))
            .collect::<Vec<_>>()
    };
    for export in ["web.a", "web.b"] {
        db.set_hydration(export, false, "", 55.0).unwrap();
    }
    assert_eq!(
        states(&db),
        vec![
            ("web.a".into(), AttachmentState::Commit, 55.0),
            ("web.b".into(), AttachmentState::Served, 55.0)
        ]
    );
    for export in ["web.a", "web.b"] {
        db.set_hydration(export, true, "", 100.0).unwrap();
    }
    assert_eq!(
        states(&db),
        vec![
            ("web.a".into(), AttachmentState::Commit, 100.0),
            ("web.b".into(), AttachmentState::Hydrated, 100.0)
        ]
    );
    // A failed hydration records its error and keeps the request too.
    db.set_hydration("web.a", false, "hydration: store unreachable", 0.0)
        .unwrap();
    let a = &db.attachments().unwrap()[0];
    assert_eq!(
        (a.state, a.error.as_str()),
        (AttachmentState::Commit, "hydration: store unreachable")
    );
}
