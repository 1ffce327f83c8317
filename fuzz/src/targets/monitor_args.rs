//! `monitor_args`: the argument parsers behind the monitor and the command line: qemu-io
//! commands (`vmsnap io -c`, the monitor's `qemu-io`), sizes (`64M`, `0x1000`), migration URIs
//! and parameters/capabilities (`migrate`, `migrate_set_parameter`,
//! `migrate_set_capability`). The first byte picks the parser, the rest is the text.

use std::str::FromStr;

use vmsnap::cli::io::parse_command;
use vmsnap::cli::size::parse_size;
use vmsnap::migrate::params::parse_size_mib;
use vmsnap::migrate::{Capabilities, MigrateUri, Parameters};

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(s) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 6 {
        0 => drop(parse_command(s)),
        1 => drop(parse_size(s)),
        2 => drop(parse_size_mib(s)),
        3 => drop(MigrateUri::from_str(s)),
        4 | 5 => {
            let (name, value) = s.split_once(' ').unwrap_or((s, ""));
            if which % 6 == 4 {
                drop(Parameters::default().set(name, value));
            } else {
                drop(Capabilities::default().set(name, value));
            }
        }
        _ => unreachable!(),
    }
}
