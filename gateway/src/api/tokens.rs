//! API tokens: created by `standby token create NAME [--read-only]`, shown once, stored hashed.
//!
//! A token is `sbt_` + 64 hex digits (32 random bytes from the OS). Only the SHA-256 of the
//! whole token string is stored, in the `api_tokens` table of the data directory's state
//! database (`replication.db`), with its name, scope and creation time: a copy of the database
//! does not let anyone call the API. Verification hashes the presented token and looks the hash
//! up (the lookup is by a hash of a 256-bit secret, so timing tells an attacker nothing useful).
//! Revoking deletes the row; the next request with that token is refused.
//!
//! Synchronous (SQLite): the API calls [`TokenStore::verify`] on a blocking thread.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rand::RngCore;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::replication::db::DB_FILE;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// GET only: resources, the OpenAPI document and `/metrics`.
    ReadOnly,
    /// Everything, actions included.
    Admin,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Scope::ReadOnly => "read_only",
            Scope::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "read_only" => Some(Scope::ReadOnly),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

/// A stored token (without its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenInfo {
    pub name: String,
    pub scope: Scope,
    pub created_ms: u64,
}

#[derive(Debug, Error)]
pub enum TokenError {
    #[error("API token database {path}: {source}")]
    Sql {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("a token named {0:?} already exists: revoke it first (`standby token revoke {0}`) or pick another name")]
    Exists(String),
    #[error("no token named {0:?} (see `standby token list`)")]
    NotFound(String),
    #[error("invalid token name {0:?}: use 1-64 characters from A-Z a-z 0-9 . _ -")]
    BadName(String),
    #[error("API token {name:?} has an unknown scope {scope:?} in the database")]
    BadScope { name: String, scope: String },
}

/// Prefix of every token (lets secret scanners and admins recognise one).
pub const TOKEN_PREFIX: &str = "sbt_";

fn hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The token table of a data directory.
pub struct TokenStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenStore({})", self.path.display())
    }
}

impl TokenStore {
    /// Opens (creating the table if needed) the tokens of a data directory.
    pub fn open(data_dir: &Path) -> Result<Self, TokenError> {
        let path = data_dir.join(DB_FILE);
        let e = |source| TokenError::Sql {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(e)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(e)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS api_tokens(
                name TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, scope TEXT NOT NULL,
                created_ms INTEGER NOT NULL);",
        )
        .map_err(e)?;
        Ok(Self {
            path,
            conn: Mutex::new(conn),
        })
    }

    fn err(&self, source: rusqlite::Error) -> TokenError {
        TokenError::Sql {
            path: self.path.clone(),
            source,
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection usable (SQLite rolls back).
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates a token and returns its secret (the only time it is available).
    pub fn create(&self, name: &str, scope: Scope) -> Result<String, TokenError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !valid {
            return Err(TokenError::BadName(name.to_string()));
        }
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let token = format!(
            "{TOKEN_PREFIX}{}",
            secret
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        let conn = self.conn();
        let n = conn
            .execute(
                "INSERT INTO api_tokens(name, hash, scope, created_ms) VALUES(?1, ?2, ?3, ?4)
                 ON CONFLICT(name) DO NOTHING",
                params![
                    name,
                    hash(&token),
                    scope.as_str(),
                    crate::replication::now_ms() as i64
                ],
            )
            .map_err(|e| self.err(e))?;
        if n == 0 {
            return Err(TokenError::Exists(name.to_string()));
        }
        Ok(token)
    }

    /// Every token, by name.
    pub fn list(&self) -> Result<Vec<TokenInfo>, TokenError> {
        let conn = self.conn();
        let mut st = conn
            .prepare("SELECT name, scope, created_ms FROM api_tokens ORDER BY name")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        rows.into_iter()
            .map(|(name, scope, created)| {
                let s = Scope::parse(&scope).ok_or_else(|| TokenError::BadScope {
                    name: name.clone(),
                    scope,
                })?;
                Ok(TokenInfo {
                    name,
                    scope: s,
                    created_ms: created.max(0) as u64,
                })
            })
            .collect()
    }

    /// Deletes a token.
    pub fn revoke(&self, name: &str) -> Result<(), TokenError> {
        let n = self
            .conn()
            .execute("DELETE FROM api_tokens WHERE name=?1", [name])
            .map_err(|e| self.err(e))?;
        if n == 0 {
            return Err(TokenError::NotFound(name.to_string()));
        }
        Ok(())
    }

    /// The token presented, if it is a current one.
    pub fn verify(&self, token: &str) -> Result<Option<TokenInfo>, TokenError> {
        if !token.starts_with(TOKEN_PREFIX) {
            return Ok(None);
        }
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT name, scope, created_ms FROM api_tokens WHERE hash=?1",
                [hash(token)],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                },
            )
            .optional()
            .map_err(|e| self.err(e))?;
        match row {
            None => Ok(None),
            Some((name, scope, created)) => match Scope::parse(&scope) {
                Some(s) => Ok(Some(TokenInfo {
                    name,
                    scope: s,
                    created_ms: created.max(0) as u64,
                })),
                None => Err(TokenError::BadScope { name, scope }),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_verify_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::open(dir.path()).unwrap();
        let admin = s.create("ops", Scope::Admin).unwrap();
        let ro = s.create("grafana", Scope::ReadOnly).unwrap();
        assert!(admin.starts_with(TOKEN_PREFIX) && admin.len() == 4 + 64);
        assert_ne!(admin, ro);
        assert_eq!(s.verify(&admin).unwrap().unwrap().scope, Scope::Admin);
        assert_eq!(s.verify(&ro).unwrap().unwrap().name, "grafana");
        assert!(s.verify("sbt_00").unwrap().is_none());
        assert!(s.verify("").unwrap().is_none());
        assert!(matches!(
            s.create("ops", Scope::ReadOnly),
            Err(TokenError::Exists(_))
        ));
        assert!(matches!(
            s.create("a b", Scope::ReadOnly),
            Err(TokenError::BadName(_))
        ));
        // Only the hash is stored.
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        let stored: Vec<String> = conn
            .prepare("SELECT hash FROM api_tokens")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert!(stored.iter().all(|h| h.len() == 64 && *h != admin[4..]));
        assert_eq!(s.list().unwrap().len(), 2);
        s.revoke("ops").unwrap();
        assert!(s.verify(&admin).unwrap().is_none());
        assert!(matches!(s.revoke("ops"), Err(TokenError::NotFound(_))));
    }
}
