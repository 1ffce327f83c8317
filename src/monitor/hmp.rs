//! HMP: QEMU's human monitor syntax, one text line per command, over the commands of the
//! snapshot and migration layers and the VMM's own ([`super::vm_commands`]).

use std::time::Duration;

use crate::snapshot;

use super::vm_commands::{self as monitor, Outcome};
use super::{drive_paths, hmp_migrate::execute_migrate, Cx};

/// Monitor commands of the snapshot layer, then the VMM's own.
const SNAPSHOT_HELP: &str = "\
savevm [-l] [tag] -- save a VM snapshot; without a tag, a name is made from the date;
                  -l: live, the guest runs while its RAM is written
info savevm -- show the status of the last savevm
loadvm [-e] tag -- restore a VM snapshot from its tag (lazily: RAM is filled after the resume; -e: read all RAM first)
info loadvm -- show the status of the last loadvm
delvm tag   -- delete a VM snapshot from its tag
info snapshots -- show the currently saved VM snapshots
save [-c] file -- save the VM into a checkpoint file and end (-c: the guest runs on, the disks get a snapshot)";

/// Monitor commands of live migration.
const MIGRATE_HELP: &str = "\
migrate [-d] [-b] [-r] uri -- migrate to URI (tcp:HOST:PORT, unix:PATH, exec:CMD, file:PATH); -d: do not wait, -b: with the disks, -r: resume a paused postcopy
migrate_recover uri -- on a destination whose postcopy is paused: listen on URI for the source's migrate -r
migrate_start_postcopy -- switch the running migration to postcopy
migrate_cancel -- cancel the current VM migration
migrate_set_parameter parameter value -- set a migration parameter (max-bandwidth, downtime-limit, ...)
migrate_set_capability capability state -- enable or disable a migration capability
info migrate -- show migration status
info migrate_parameters -- show current migration parameters
info migrate_capabilities -- show current migration capabilities";

/// Runs one monitor line: snapshot and migration commands here, the rest in
/// [`monitor::execute`].
pub fn execute(cx: Cx<'_>, line: &str) -> Outcome {
    let vm = cx.vm;
    let words: Vec<&str> = line.split_whitespace().collect();
    // A lazy loadvm still filling RAM is finished first by anything that saves or moves RAM
    // or changes the snapshots (its snapshot's clusters stay in use until then).
    if let ["savevm" | "delvm" | "loadvm" | "migrate", ..] = words.as_slice() {
        if let Err(e) = snapshot::lazy::settle(vm) {
            return Outcome::Continue(format!("Error: {e}"));
        }
    }
    if let Some(r) = super::dirty_rate_cmds::hmp(cx, &words) {
        return Outcome::Continue(r);
    }
    if let Some(r) = execute_migrate(cx, line, &words) {
        return Outcome::Continue(r.unwrap_or_else(|e| e));
    }
    // savevm honours the x-vmsnap-lz4 migration capability, as QEMU's savevm honours the
    // migration capabilities that change the stream.
    let save = |tag: Option<&str>, live: bool| {
        let mut reply = Ok(String::new());
        let _ = timed("savevm", |p| {
            reply = super::savevm::savevm(cx, tag, live, p);
            Ok(())
        });
        Outcome::Continue(reply.unwrap_or_else(|e| e))
    };
    let paths = drive_paths(cx.mig.drives().iter().map(|d| (&d.path, d.format)));
    let lazy_load = |tag: &str, mode, p: snapshot::ProgressFn<'_>| {
        snapshot::lazy::loadvm(vm, tag, mode, &paths, p).map(|()| String::new())
    };
    let result = match words.as_slice() {
        ["savevm"] => return save(None, false),
        ["savevm", "-l"] => return save(None, true),
        ["savevm", "-l", tag] => return save(Some(tag), true),
        ["savevm", tag] => return save(Some(tag), false),
        ["info", "savevm"] => Ok(super::savevm::info_savevm()),
        ["loadvm", "-e", tag] => timed("loadvm", |p| {
            lazy_load(tag, snapshot::lazy::LoadMode::Eager, p)
        }),
        ["loadvm", tag] => timed("loadvm", |p| {
            lazy_load(tag, snapshot::lazy::LoadMode::Lazy, p)
        }),
        ["info", "loadvm"] => Ok(snapshot::lazy::info_loadvm(vm)),
        ["delvm", tag] => snapshot::delvm(vm, tag).map(|()| String::new()),
        ["info", "snapshots"] => snapshot::info_snapshots(vm),
        ["save", ..] => {
            let rest = line.trim_start().strip_prefix("save").unwrap_or("");
            return super::checkpoint::save_command(cx, rest);
        }
        ["loadvm" | "delvm"] => Ok("Parameter 'name' is missing".to_string()),
        ["savevm" | "loadvm" | "delvm", ..] => Ok(format!(
            "{}: extraneous characters at the end of line",
            words[0]
        )),
        ["help" | "?"] => {
            let Outcome::Continue(base) = monitor::execute(vm, line) else {
                return Outcome::Continue(String::new());
            };
            Ok(format!(
                "{base}\n{SNAPSHOT_HELP}\n{MIGRATE_HELP}\n{}",
                super::dirty_rate_cmds::HELP
            ))
        }
        _ => return monitor::execute(vm, line),
    };
    Outcome::Continue(match result {
        Ok(reply) => reply,
        Err(e) => format!("Error: {e}"),
    })
}

/// Runs a long snapshot operation, showing its progress on standard error once it has taken
/// more than a second (the monitor itself answers when it is done, as QEMU's HMP does).
pub fn timed<T>(
    what: &str,
    f: impl FnOnce(snapshot::ProgressFn<'_>) -> snapshot::Result<T>,
) -> snapshot::Result<T> {
    let start = std::time::Instant::now();
    let mut shown = false;
    let mut report = |p: snapshot::Progress| {
        if start.elapsed() > Duration::from_secs(1) {
            shown = true;
            let pct = p.done.saturating_mul(100) / p.total.max(1);
            eprint!(
                "\r{what}: {} MiB of {} MiB ({pct}%)",
                p.done >> 20,
                p.total >> 20
            );
        }
    };
    let r = f(&mut report);
    if shown || start.elapsed() > Duration::from_secs(1) {
        eprintln!("\r{what}: done in {:.1} s", start.elapsed().as_secs_f64());
    }
    r
}
