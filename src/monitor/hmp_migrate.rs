//! HMP's migration commands: `migrate [-d] [-b] [-r] URI`, `migrate_recover URI`,
//! `migrate_cancel`, the parameters and
//! capabilities, `info migrate*`, and the guards that keep snapshot commands and `cont` off a
//! VM that is migrating or being received.

use crate::migrate;

use super::vm_commands::{self as monitor, Outcome};
use super::Cx;

/// `migrate [-d] [-b] [-r] URI`: the URI is the rest of the line (an exec command may have
/// spaces), optionally in double quotes. `-b` carries the writable drives along (block
/// migration), `-r` resumes a paused postcopy over a new channel; flags may be combined
/// (`-db`), as QEMU's monitor allows.
fn migrate_command(cx: Cx<'_>, rest: &str) -> String {
    let mut uri = rest.trim();
    let (mut detach, mut block, mut resume) = (false, false, false);
    while let Some(flags) = uri.strip_prefix('-') {
        let end = flags.find(char::is_whitespace).unwrap_or(flags.len());
        if end == 0
            || !flags[..end]
                .chars()
                .all(|c| matches!(c, 'd' | 'b' | 'i' | 'r'))
        {
            break;
        }
        if flags[..end].contains('i') {
            return "Error: migrate -i (incremental copy over a shared base image) is not supported; use -b".to_string();
        }
        detach |= flags[..end].contains('d');
        block |= flags[..end].contains('b');
        resume |= flags[..end].contains('r');
        uri = flags[end..].trim_start();
    }
    let uri = uri
        .strip_prefix('"')
        .and_then(|u| u.strip_suffix('"'))
        .unwrap_or(uri);
    if uri.is_empty() {
        return "Parameter 'uri' is missing".to_string();
    }
    let started = match resume {
        true if block => return "Error: migrate -r cannot be combined with -b".to_string(),
        true => cx.mig.start_resume(uri),
        false => cx.mig.start_with(uri, block),
    };
    if let Err(e) = started {
        return format!("Error: {e}");
    }
    if detach {
        return String::new();
    }
    match cx.mig.wait().status {
        migrate::Status::Failed(why) | migrate::Status::PostcopyPaused(why) => {
            format!("Error: {why}")
        }
        migrate::Status::Cancelled => "Error: migration cancelled".to_string(),
        _ => String::new(),
    }
}

/// Migration commands, or None for other lines.
pub(super) fn execute_migrate(
    cx: Cx<'_>,
    line: &str,
    words: &[&str],
) -> Option<Result<String, String>> {
    let err = |e: migrate::CommandError| format!("Error: {e}");
    Some(match words {
        ["migrate", ..] if cx.vm.pause_reason() == Some("inmigrate") => {
            Err("Error: the guest is still being received (incoming migration)".to_string())
        }
        ["migrate", ..] => {
            let rest = line.trim_start().strip_prefix("migrate").unwrap_or("");
            Ok(migrate_command(cx, rest))
        }
        ["migrate_recover", uri] => cx.mig.recover(uri).map(|()| String::new()).map_err(err),
        ["migrate_recover", ..] => Ok("migrate_recover: expected URI".to_string()),
        ["migrate_start_postcopy"] => cx.mig.start_postcopy().map(|()| String::new()).map_err(err),
        ["migrate_cancel"] => {
            cx.mig.cancel();
            Ok(String::new())
        }
        ["migrate_set_parameter", name, value] => cx
            .mig
            .set_parameter(name, value)
            .map(|()| String::new())
            .map_err(err),
        ["migrate_set_capability", name, state] => cx
            .mig
            .set_capability(name, state)
            .map(|()| String::new())
            .map_err(err),
        ["migrate_set_parameter" | "migrate_set_capability", ..] => {
            Ok(format!("{}: expected NAME VALUE", words[0]))
        }
        ["info", "migrate"] => Ok(cx.mig.info().to_hmp()),
        [cmd @ ("getfd" | "closefd"), name] => Ok(migrate::fd_registry::command(cmd, name)),
        ["info", "migrate_parameters"] => Ok(cx.mig.parameters().to_hmp()),
        ["info", "migrate_capabilities"] => Ok(cx.mig.capabilities().to_hmp()),
        ["cont" | "c"] if cx.vm.pause_reason() == Some("inmigrate") => {
            Err("Error: the guest starts once the incoming migration is loaded".to_string())
        }
        ["cont" | "c"] if cx.mig.check_cont().is_err() => {
            cx.mig.check_cont().map(|()| String::new()).map_err(err)
        }
        ["cont" | "c"] if cx.mig.is_active() => {
            // QEMU lets the guest run again during the iterations; the final copy stops it.
            let Outcome::Continue(r) = monitor::execute(cx.vm, line) else {
                return None;
            };
            Ok(r)
        }
        ["cont" | "c"] if cx.mig.drives_inactive() => match cx.mig.reactivate(cx.vm) {
            Ok(()) => {
                let Outcome::Continue(r) = monitor::execute(cx.vm, line) else {
                    return None;
                };
                Ok(r)
            }
            Err(e) => Err(err(e)),
        },
        ["savevm" | "loadvm" | "delvm", ..] if cx.mig.is_active() => {
            Err(format!("Error: {}", migrate::CommandError::Busy))
        }
        ["savevm" | "loadvm" | "delvm", ..] if cx.mig.drives_inactive() => {
            Err(format!("Error: {}", migrate::CommandError::Inactive))
        }
        _ => return None,
    })
}
