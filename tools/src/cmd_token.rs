//! `standby token create|list|revoke`: API tokens for the HTTP API and `/metrics`.
//!
//! The token is printed once, on stdout alone (so `TOKEN=$(standby token create ci)` works);
//! only its hash is stored. Works whether or not `standby serve` runs: the gateway checks
//! tokens against the same table at every request, so a revoked token stops working at once.

use anyhow::Result;
use clap::Subcommand;
use gateway::api::tokens::{Scope, TokenStore};
use gateway::DataDir;

use crate::cmd_store::time_of;

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it (shown only this once).
    Create {
        /// A name for the token (who or what uses it), e.g. grafana, ci.
        name: String,
        /// Only reads: resources, the OpenAPI document and /metrics (no actions).
        #[arg(long)]
        read_only: bool,
    },
    /// List tokens (names and scopes; secrets are not stored).
    List {
        /// JSON: an array of `name`, `scope` (`read_only` or `admin`), `created_ms`.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: requests with it are refused from now on.
    Revoke { name: String },
}

pub fn run(dd: &DataDir, cmd: TokenCommand) -> Result<()> {
    let store = TokenStore::open(dd.root())?;
    match cmd {
        TokenCommand::Create { name, read_only } => {
            let scope = if read_only {
                Scope::ReadOnly
            } else {
                Scope::Admin
            };
            let token = store.create(&name, scope)?;
            eprintln!(
                "standby: token {name:?} ({}) created; it is shown only now, keep it secret:",
                if read_only { "read-only" } else { "admin" }
            );
            println!("{token}");
        }
        TokenCommand::List { json } => {
            let tokens = store.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&tokens)?);
                return Ok(());
            }
            if tokens.is_empty() {
                println!("no API tokens (create one with `standby token create NAME`)");
                return Ok(());
            }
            println!("{:<32} {:<10} CREATED", "NAME", "SCOPE");
            for t in tokens {
                let scope = match t.scope {
                    Scope::ReadOnly => "read-only",
                    Scope::Admin => "admin",
                };
                println!("{:<32} {:<10} {}", t.name, scope, time_of(t.created_ms));
            }
        }
        TokenCommand::Revoke { name } => {
            store.revoke(&name)?;
            println!("token {name:?} revoked");
        }
    }
    Ok(())
}
