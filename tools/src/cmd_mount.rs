//! `standby mount DIR`: the FUSE view of every disk (see docs/fuse.md).

use std::path::PathBuf;

use anyhow::{Context, Result};
use gateway::fuse::{serve_mount, MountOptions};
use gateway::DataDir;

#[derive(clap::Args)]
pub struct MountArgs {
    /// Directory to mount on (must exist and be empty of other mounts).
    pub dir: PathBuf,
    /// Let other users use the mount (as a normal user this needs `user_allow_other` in
    /// /etc/fuse.conf).
    #[arg(long)]
    pub allow_other: bool,
    /// Threads reading FUSE requests (I/O itself runs in parallel regardless).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,
    /// Show only replicas/ (recovery points), not the live disks: use it beside a running
    /// `standby serve`, which owns the live disks.
    #[arg(long)]
    pub replicas_only: bool,
}

/// Mounts, serves until SIGINT/SIGTERM, unmounts.
pub fn run_mount(dd: &DataDir, args: MountArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if dd.disks()?.is_empty() && !args.replicas_only {
        eprintln!(
            "standby: no disks yet: {}/disks will be empty (create one with `standby disk create NAME --size 20G`)",
            args.dir.display()
        );
    }
    let opts = MountOptions {
        allow_other: args.allow_other,
        threads: usize::from(args.threads),
        replicas_only: args.replicas_only,
    };
    serve_mount(dd, &args.dir, &opts, &rt)?;
    Ok(())
}
