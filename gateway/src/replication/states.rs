//! The states the replication database keeps, as enums: a VM's [`Phase`], a job's
//! [`JobKind`] and [`JobState`], a step's [`StepState`], a checkpoint's [`CheckpointKind`] and
//! an attachment's [`AttachmentState`] (its kind is [`crate::failover::replica::OverlayKind`]).
//!
//! Each is declared with [`stored_enum!`], which gives it exactly one string conversion
//! (`as_str` / `parse`), used by SQLite (`ToSql` / `FromSql`), JSON and `Display`. The strings
//! are the ones schema 1 stored, so existing databases open unchanged; an unknown string read
//! from the database is an error that names it, never a guess.

/// Declares an enum stored as a string: `as_str` / `parse` are its one conversion, used by
/// SQLite (`ToSql` / `FromSql`), JSON (`Serialize` / `Deserialize`) and `Display`.
macro_rules! stored_enum {
    ($(#[$m:meta])* $vis:vis enum $name:ident ($what:literal) {
        $($(#[$vm:meta])* $v:ident = $s:literal),+ $(,)?
    }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name { $($(#[$vm])* $v),+ }

        impl $name {
            /// Every value.
            pub const ALL: &'static [$name] = &[$($name::$v),+];

            /// The stored form.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$v => $s),+ }
            }

            /// The value of a stored form.
            pub fn parse(s: &str) -> Option<$name> {
                match s { $($s => Some($name::$v),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl rusqlite::types::ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(rusqlite::types::ToSqlOutput::from(self.as_str()))
            }
        }

        impl rusqlite::types::FromSql for $name {
            fn column_result(
                v: rusqlite::types::ValueRef<'_>,
            ) -> rusqlite::types::FromSqlResult<Self> {
                let s = v.as_str()?;
                $name::parse(s).ok_or_else(|| {
                    rusqlite::types::FromSqlError::Other(
                        format!(
                            "unknown {} {s:?} (written by a newer standby?)",
                            $what
                        )
                        .into(),
                    )
                })
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                $name::parse(&s).ok_or_else(|| {
                    serde::de::Error::custom(format!("unknown {} {s:?}", $what))
                })
            }
        }
    };
}
pub(crate) use stored_enum;

stored_enum! {
    /// Protection state as stored (the percent lives in [`super::db::VmRow::progress`]).
    pub enum Phase("protection state") {
        EnablingProtection = "EnablingProtection",
        InitialReplication = "InitialReplication",
        FinalizeProtection = "FinalizeProtection",
        Protected = "Protected",
        ResyncRequired = "ResyncRequired",
        Resyncing = "Resyncing",
        Critical = "Critical",
    }
}

stored_enum! {
    /// What a job does.
    pub enum JobKind("job kind") {
        EnableProtection = "enable-protection",
        InitialReplication = "initial-replication",
        FinalizeProtection = "finalize-protection",
        DeltaReplication = "delta-replication",
        Resync = "resync",
        TestFailover = "test-failover",
        TestFailoverCleanup = "test-failover-cleanup",
        Failover = "failover",
        FailoverPrepare = "failover-prepare",
        FailoverCommit = "failover-commit",
        /// Re-read and re-hash the replica store (or one point); a job of no VM.
        StoreVerify = "store-verify",
    }
}

stored_enum! {
    /// Where a job is.
    pub enum JobState("job state") {
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        /// The gateway stopped while it ran (it resumes in a new job).
        Interrupted = "interrupted",
    }
}

impl JobState {
    /// The state a job's unfinished step takes when the job ends this way.
    pub fn step_end(self) -> StepState {
        match self {
            JobState::Running => StepState::Running,
            JobState::Succeeded => StepState::Done,
            JobState::Failed => StepState::Failed,
            JobState::Interrupted => StepState::Interrupted,
        }
    }
}

stored_enum! {
    /// Where a step of a job is.
    pub enum StepState("step state") {
        Running = "running",
        Done = "done",
        Failed = "failed",
        Interrupted = "interrupted",
    }
}

stored_enum! {
    /// The long pass a [`super::db::Checkpoint`] resumes.
    pub enum CheckpointKind("checkpoint kind") {
        Initial = "initial",
        Resync = "resync",
    }
}

stored_enum! {
    /// Where a served recovery point ([`super::db::Attachment`]) is. The CLI and API write
    /// `Requested` and `Commit`; the engine the others.
    pub enum AttachmentState("attachment state") {
        /// Asked for; the engine has not served it yet.
        Requested = "requested",
        /// Served as an export (a failover disk: hydrating).
        Served = "served",
        /// A failover disk whose every chunk is local.
        Hydrated = "hydrated",
        /// Asked to adopt a hydrated failover disk as a local disk.
        Commit = "commit",
        /// The engine cannot serve it (`error` says why).
        Error = "error",
    }
}
