//! The `vmsnap` command line: one module per subcommand, each with its own error type and a
//! `*_command()` entry point.
//!
//! ```text
//!   main ── Cli::parse ── run ──┬─ create    (create.rs)    qemu-img create
//!                               ├─ info      (info.rs)      qemu-img info
//!                               ├─ check     (check.rs)     qemu-img check
//!                               ├─ snapshot  (snapshot.rs)  qemu-img snapshot, over a BlockSet
//!                               ├─ io        (io.rs)        qemu-io -c
//!                               └─ run       (run.rs)       boot a built-in guest under KVM
//!   helpers: sizes (size.rs), snapshot tables and dates (table.rs, localtime.rs)
//! ```
//!
//! Names and outputs follow `qemu-img`/`qemu-io` so that scripts and tests can compare them.

pub mod check;
pub mod checkpoint;
pub mod convert;
pub mod create;
pub mod image;
pub mod info;
pub mod io;
pub mod localtime;
pub mod run;
pub mod size;
pub mod snapshot;
pub mod table;
pub mod vmstate;

use clap::{Parser, Subcommand, ValueEnum};

/// Keep VM snapshots inside disk images, like QEMU's savevm/loadvm.
#[derive(Debug, Parser)]
#[command(name = "vmsnap", version, about)]
pub struct Cli {
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new disk image (like `qemu-img create`).
    Create(create::CreateArgs),
    /// Show facts about an image (like `qemu-img info`).
    Info(info::InfoArgs),
    /// Check an image's metadata (like `qemu-img check`).
    Check(check::CheckArgs),
    /// List, create, apply or delete internal snapshots (like `qemu-img snapshot`).
    Snapshot(snapshot::SnapshotArgs),
    /// Guest I/O on the active layer with qemu-io commands.
    Io(io::IoArgs),
    /// Boot a built-in guest under KVM.
    Run(run::RunArgs),
    /// Export a snapshot's VM state as a migration file, or import one as a snapshot.
    Vmstate(vmstate::VmstateArgs),
    /// Convert an image (like `qemu-img convert`), keeping its internal snapshots.
    Convert(convert::ConvertArgs),
    /// Rebuild a VM from a checkpoint file (`save FILE` on the monitor) and resume it.
    Restore(checkpoint::restore::RestoreArgs),
}

/// `--output` of the reporting subcommands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum OutputFormat {
    /// Text as `qemu-img` prints it.
    #[default]
    Human,
    /// JSON with `qemu-img --output=json`'s keys.
    Json,
}

/// Any subcommand's error.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// `create` failed.
    #[error(transparent)]
    Create(#[from] create::CreateError),
    /// `info` failed.
    #[error(transparent)]
    Info(#[from] info::InfoError),
    /// `check` failed.
    #[error(transparent)]
    Check(#[from] check::CheckError),
    /// `snapshot` failed.
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    /// `io` failed.
    #[error(transparent)]
    Io(#[from] io::IoError),
    /// `run` failed.
    #[error(transparent)]
    Run(#[from] run::RunError),
    /// `vmstate` failed.
    #[error(transparent)]
    Vmstate(#[from] vmstate::VmstateError),
    /// `convert` failed.
    #[error(transparent)]
    Convert(#[from] convert::ConvertError),
}

/// Runs the command line; returns the process exit code on success (0, or a `check` status).
///
/// # Errors
/// The subcommand's error; `main` prints its chain and exits with 1.
pub fn run(cli: Cli) -> Result<i32, CliError> {
    match cli.command {
        Command::Create(a) => create::create_command(&a).map(|()| 0).map_err(Into::into),
        Command::Info(a) => info::info_command(&a).map(|()| 0).map_err(Into::into),
        Command::Check(a) => check::check_command(&a).map_err(Into::into),
        Command::Snapshot(a) => snapshot::snapshot_command(&a)
            .map(|()| 0)
            .map_err(Into::into),
        Command::Io(a) => io::io_command(&a).map(|()| 0).map_err(Into::into),
        Command::Run(a) => run::run_command(a).map_err(Into::into),
        Command::Vmstate(a) => vmstate::vmstate_command(&a).map(|()| 0).map_err(Into::into),
        Command::Convert(a) => convert::convert_command(&a).map(|()| 0).map_err(Into::into),
        Command::Restore(a) => checkpoint::restore::restore_command(a).map_err(Into::into),
    }
}

/// JSON text indented by four spaces, as `qemu-img --output=json` prints it.
pub fn json_text(v: &serde_json::Value) -> String {
    use serde::Serialize;
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    match v.serialize(&mut ser) {
        Ok(()) => String::from_utf8_lossy(&out).into_owned(),
        Err(_) => v.to_string(),
    }
}

/// Formats an error and its causes as one line: `outer: cause: root cause`.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let msg = e.to_string();
        // `#[error(transparent)]` layers repeat their source's message; print it once.
        if !s.ends_with(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = e.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn json_is_indented_like_qemu_img() {
        let v = serde_json::json!({"a": [1], "b": {"c": true}});
        assert_eq!(
            json_text(&v),
            "{\n    \"a\": [\n        1\n    ],\n    \"b\": {\n        \"c\": true\n    }\n}"
        );
    }

    #[test]
    fn error_chain_joins_causes() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "outer: inner");
    }

    #[test]
    fn cli_parses_every_subcommand() {
        let p = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.command);
        assert!(matches!(
            p(&["vmsnap", "create", "x", "1M"]),
            Ok(Command::Create(_))
        ));
        assert!(matches!(p(&["vmsnap", "info", "x"]), Ok(Command::Info(_))));
        assert!(matches!(
            p(&["vmsnap", "check", "x", "-r", "all"]),
            Ok(Command::Check(_))
        ));
        assert!(matches!(
            p(&["vmsnap", "snapshot", "-l", "x", "y"]),
            Ok(Command::Snapshot(_))
        ));
        assert!(matches!(
            p(&["vmsnap", "io", "x", "-c", "read 0 1"]),
            Ok(Command::Io(_))
        ));
        assert!(matches!(
            p(&["vmsnap", "restore", "f", "--paused", "--drive-path", "a=b"]),
            Ok(Command::Restore(_))
        ));
        assert!(p(&["vmsnap", "restore"]).is_err());
        assert!(p(&["vmsnap", "snapshot", "-l", "-c", "t", "x"]).is_err());
        assert!(p(&["vmsnap", "snapshot", "x"]).is_err());
        assert!(p(&["vmsnap", "check", "x", "-r", "some"]).is_err());
    }
}
