//! The dirty-rate commands ([`crate::migrate::dirty_rate`]): HMP `calc_dirty_rate [-r] [-b]
//! second [sample_pages_per_GB]` and `info dirty_rate`, QMP `calc-dirty-rate` and
//! `query-dirty-rate`, with QEMU 7.2's replies.

use serde_json::Value;

use crate::migrate::dirty_rate;

use super::qmp::args::Args;
use super::qmp::QmpError;
use super::Cx;

/// `help`'s lines.
pub const HELP: &str = "\
calc_dirty_rate [-r] [-b] second [sample_pages_per_GB] -- start a round of guest dirty rate measurement (page sampling; -r, -b: the dirty ring and dirty bitmap methods, which vmsnap refuses)
info dirty_rate -- show dirty rate information";

/// QEMU's reply to a number HMP cannot parse.
fn bad_number(word: Option<&str>) -> String {
    let why = match word.and_then(|w| w.chars().find(|c| !c.is_ascii_digit())) {
        Some(c) => format!("invalid char '{c}' in expression"),
        None => "unexpected end of expression".to_string(),
    };
    format!("{why}\nTry \"help calc_dirty_rate\" for more information")
}

/// Runs the HMP dirty-rate commands; `None` when `words` is another command.
pub fn hmp(cx: Cx<'_>, words: &[&str]) -> Option<String> {
    match words {
        ["info", "dirty_rate"] => Some(dirty_rate::query().to_hmp()),
        ["calc_dirty_rate", rest @ ..] => Some(calc_hmp(cx, rest)),
        _ => None,
    }
}

fn calc_hmp(cx: Cx<'_>, args: &[&str]) -> String {
    let flags = args.iter().take_while(|w| w.starts_with('-')).count();
    let (ring, bitmap) = (args[..flags].contains(&"-r"), args[..flags].contains(&"-b"));
    if ring && bitmap {
        return "Either dirty ring or dirty bitmap can be specified!".to_string();
    }
    let number = |w: Option<&&str>| -> Result<u64, String> {
        let w = w.copied();
        match w.map(str::parse::<u64>) {
            Some(Ok(n)) => Ok(n),
            _ => Err(bad_number(w)),
        }
    };
    let seconds = match number(args.get(flags)) {
        Ok(n) => n,
        Err(e) => return e,
    };
    let pages = match args.get(flags + 1) {
        Some(_) => match number(args.get(flags + 1)) {
            Ok(n) => Some(n),
            Err(e) => return e,
        },
        None => None,
    };
    if args.len() > flags + 2 {
        return "calc_dirty_rate: extraneous characters at the end of line".to_string();
    }
    if seconds == 0 {
        return "Incorrect period length specified!".to_string();
    }
    let mode = match (ring, bitmap) {
        (true, _) => Some("dirty-ring"),
        (_, true) => Some("dirty-bitmap"),
        _ => None,
    };
    match dirty_rate::start(cx.vm.guest_memory(), seconds, pages, mode) {
        Ok(()) => format!(
            "Starting dirty rate measurement with period {seconds} seconds\n\
             [Please use 'info dirty_rate' to check results]"
        ),
        Err(e) => format!("Error: {e}"),
    }
}

/// Runs the QMP dirty-rate commands; `None` when `name` is another command.
pub fn qmp(cx: Cx<'_>, name: &str, a: &Args<'_>) -> Option<Result<Value, QmpError>> {
    match name {
        "query-dirty-rate" => Some(a.finish().map(|()| dirty_rate::query().to_qmp())),
        "calc-dirty-rate" => Some(calc_qmp(cx, a)),
        _ => None,
    }
}

fn calc_qmp(cx: Cx<'_>, a: &Args<'_>) -> Result<Value, QmpError> {
    let seconds = a.u64("calc-time")?;
    let pages = a.opt_u64("sample-pages")?;
    let mode = a.opt_str("mode")?;
    a.finish()?;
    dirty_rate::start(cx.vm.guest_memory(), seconds, pages, mode)
        .map(|()| serde_json::json!({}))
        .map_err(|e| QmpError::generic(e.to_string()))
}
