//! `vmsnap io IMAGE [-f fmt] -c CMD...`: guest I/O on the active layer with qemu-io's command
//! syntax, for tests and debugging.
//!
//! Commands (sizes with qemu's units, e.g. `64k`, `1M`, `0x1000`):
//! - `read [-P pattern] [-q] OFF LEN` — with `-P`, fails at the first byte that differs;
//! - `write [-P pattern] [-z [-u]] [-q] OFF LEN` — pattern 0xcd by default, `-z` writes zeroes;
//! - `discard [-q] OFF LEN` (alias `d`), `flush`.

use std::path::PathBuf;

use clap::Args;

use super::image::{parse_format, Image};
use super::size::{parse_size, size_to_str, SizeError};
use crate::block::{self, BlockDriver, OpenOptions};

/// Bytes moved per driver call, bounding memory whatever LEN says.
const CHUNK: u64 = 1 << 20;

/// Arguments of `io`.
#[derive(Debug, Args)]
pub struct IoArgs {
    /// The image file.
    pub image: PathBuf,
    /// Image format (probed when absent).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// A qemu-io command; repeat for several, run in order.
    #[arg(short = 'c', required = true, value_name = "CMD")]
    pub commands: Vec<String>,
}

/// Errors of `io`.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The image could not be opened.
    #[error("Could not open '{0}'")]
    Open(String, #[source] block::Error),
    /// A command could not be parsed.
    #[error("Invalid command '{cmd}': {why}")]
    Parse {
        /// The command text.
        cmd: String,
        /// What is wrong.
        why: String,
    },
    /// A size or offset could not be read.
    #[error("Invalid command '{0}'")]
    Size(String, #[source] SizeError),
    /// The driver failed a command.
    #[error("{cmd} failed")]
    Driver {
        /// The command text.
        cmd: String,
        /// The cause.
        #[source]
        source: block::Error,
    },
    /// `read -P` found other data.
    #[error("Pattern verification failed at offset {offset} ({offset:#x}): expected {expected:#04x}, found {found:#04x}")]
    PatternMismatch {
        /// Guest offset of the first differing byte.
        offset: u64,
        /// The pattern byte.
        expected: u8,
        /// The byte read.
        found: u8,
    },
}

/// One parsed qemu-io command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoCommand {
    /// `read`, optionally verifying a pattern.
    Read {
        /// Guest offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Expected byte.
        pattern: Option<u8>,
    },
    /// `write` of a pattern byte.
    Write {
        /// Guest offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Byte written.
        pattern: u8,
    },
    /// `write -z`.
    WriteZeroes {
        /// Guest offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `discard`.
    Discard {
        /// Guest offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `flush`.
    Flush,
}

impl IoCommand {
    /// Whether the command changes the image (the image is then opened writable).
    pub fn writes(&self) -> bool {
        !matches!(self, IoCommand::Read { .. })
    }
}

/// Parses a pattern like qemu-io (`strtol` base 0: `0xab`, `171`, `0253`), keeping the low byte.
fn parse_pattern(s: &str) -> Option<u8> {
    let v = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()?
    } else if s.len() > 1 && s.starts_with('0') {
        i64::from_str_radix(&s[1..], 8).ok()?
    } else {
        s.parse::<i64>().ok()?
    };
    if v < 0 {
        return None;
    }
    Some((v & 0xff) as u8)
}

/// Parses one `-c` command.
///
/// # Errors
/// [`IoError::Parse`] or [`IoError::Size`] naming the command.
pub fn parse_command(cmd: &str) -> Result<IoCommand, IoError> {
    let bad = |why: &str| IoError::Parse {
        cmd: cmd.to_owned(),
        why: why.to_owned(),
    };
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let Some((&name, rest)) = words.split_first() else {
        return Err(bad("empty command"));
    };
    let mut pattern = None;
    let mut zero = false;
    let mut pos = Vec::new();
    let mut it = rest.iter();
    while let Some(&w) = it.next() {
        match w {
            "-P" => {
                let p = it.next().ok_or_else(|| bad("-P needs a pattern"))?;
                pattern = Some(parse_pattern(p).ok_or_else(|| bad("bad pattern"))?);
            }
            "-z" => zero = true,
            "-q" | "-u" => {}
            w if w.starts_with('-') && w.len() > 1 => {
                return Err(bad(&format!("unsupported option {w}")))
            }
            w => pos.push(w),
        }
    }
    let size = |s: &str| parse_size(s).map_err(|e| IoError::Size(cmd.to_owned(), e));
    let range = |pos: &[&str]| -> Result<(u64, u64), IoError> {
        match pos {
            [o, l] => Ok((size(o)?, size(l)?)),
            _ => Err(bad("expected OFFSET LENGTH")),
        }
    };
    match name {
        "read" | "r" => {
            let (offset, len) = range(&pos)?;
            if zero {
                return Err(bad("-z is not a read option"));
            }
            Ok(IoCommand::Read {
                offset,
                len,
                pattern,
            })
        }
        "write" | "w" => {
            let (offset, len) = range(&pos)?;
            match (zero, pattern) {
                (true, Some(_)) => Err(bad("-z and -P cannot be specified at the same time")),
                (true, None) => Ok(IoCommand::WriteZeroes { offset, len }),
                (false, p) => Ok(IoCommand::Write {
                    offset,
                    len,
                    pattern: p.unwrap_or(0xcd),
                }),
            }
        }
        "discard" | "d" => {
            let (offset, len) = range(&pos)?;
            if zero || pattern.is_some() {
                return Err(bad("discard takes no -P or -z"));
            }
            Ok(IoCommand::Discard { offset, len })
        }
        "flush" | "f" if pos.is_empty() => Ok(IoCommand::Flush),
        _ => Err(bad("unknown command (read, write, discard, flush)")),
    }
}

/// Reads `[offset, offset + len)` in chunks, checking each byte against `pattern`.
fn read_verify(
    d: &mut dyn BlockDriver,
    offset: u64,
    len: u64,
    pattern: Option<u8>,
    text: &str,
) -> Result<(), IoError> {
    let drv = |source| IoError::Driver {
        cmd: text.to_owned(),
        source,
    };
    block::check_range(offset, len, d.size()).map_err(drv)?;
    let mut buf = vec![0u8; len.min(CHUNK) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        d.read_at(offset + done, &mut buf[..n]).map_err(drv)?;
        if let Some(p) = pattern {
            if let Some(i) = buf[..n].iter().position(|&b| b != p) {
                return Err(IoError::PatternMismatch {
                    offset: offset + done + i as u64,
                    expected: p,
                    found: buf[i],
                });
            }
        }
        done += n as u64;
    }
    Ok(())
}

fn write_pattern(d: &mut dyn BlockDriver, offset: u64, len: u64, p: u8) -> block::Result<()> {
    block::check_range(offset, len, d.size())?;
    let buf = vec![p; len.min(CHUNK) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        d.write_at(offset + done, &buf[..n])?;
        done += n as u64;
    }
    Ok(())
}

/// Runs one command on a driver; returns qemu-io's report line.
///
/// # Errors
/// [`IoError::Driver`] or [`IoError::PatternMismatch`].
pub fn execute(d: &mut dyn BlockDriver, cmd: &IoCommand, text: &str) -> Result<String, IoError> {
    let drv = |source| IoError::Driver {
        cmd: text.to_owned(),
        source,
    };
    let (verb, offset, len) = match *cmd {
        IoCommand::Read {
            offset,
            len,
            pattern,
        } => {
            read_verify(d, offset, len, pattern, text)?;
            ("read", offset, len)
        }
        IoCommand::Write {
            offset,
            len,
            pattern,
        } => {
            write_pattern(d, offset, len, pattern).map_err(drv)?;
            ("wrote", offset, len)
        }
        IoCommand::WriteZeroes { offset, len } => {
            d.write_zeroes(offset, len).map_err(drv)?;
            ("wrote", offset, len)
        }
        IoCommand::Discard { offset, len } => {
            d.discard(offset, len).map_err(drv)?;
            ("discard", offset, len)
        }
        IoCommand::Flush => {
            d.flush().map_err(drv)?;
            return Ok(String::new());
        }
    };
    Ok(format!(
        "{verb} {len}/{len} bytes at offset {offset}\n{}, 1 ops",
        size_to_str(len)
    ))
}

/// Runs `io`: parses every command first, opens the image (writable only if a command
/// writes), runs the commands in order and flushes.
///
/// # Errors
/// [`IoError`] of the first failing command.
pub fn io_command(args: &IoArgs) -> Result<(), IoError> {
    let cmds = args
        .commands
        .iter()
        .map(|c| parse_command(c).map(|p| (p, c)))
        .collect::<Result<Vec<_>, _>>()?;
    let writes = cmds.iter().any(|(c, _)| c.writes());
    let name = args.image.display().to_string();
    let open_err = |e| IoError::Open(name.clone(), e);
    let format = parse_format(args.format.as_deref()).map_err(open_err)?;
    let opts = OpenOptions {
        read_only: !writes,
        format: None,
        force_share: false,
    };
    let mut img = Image::open(&args.image, format, opts).map_err(open_err)?;
    let d = img.driver();
    let mut result = Ok(());
    for (cmd, text) in &cmds {
        match execute(d, cmd, text) {
            Ok(line) if line.is_empty() => {}
            Ok(line) => println!("{line}"),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if writes {
        let flushed = d.flush().map_err(|source| IoError::Driver {
            cmd: "flush".into(),
            source,
        });
        result = result.and(flushed);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::raw::Raw;
    use crate::block::MemStorage;

    #[test]
    fn parses_qemu_io_commands() {
        assert_eq!(
            parse_command("write -P 0xab 0 64k").unwrap(),
            IoCommand::Write {
                offset: 0,
                len: 65536,
                pattern: 0xab
            }
        );
        assert_eq!(
            parse_command("read -P 171 1M 512").unwrap(),
            IoCommand::Read {
                offset: 1 << 20,
                len: 512,
                pattern: Some(0xab)
            }
        );
        assert_eq!(
            parse_command("write -z -u 4k 4k").unwrap(),
            IoCommand::WriteZeroes {
                offset: 4096,
                len: 4096
            }
        );
        assert_eq!(
            parse_command("discard 0 2M").unwrap(),
            IoCommand::Discard {
                offset: 0,
                len: 2 << 20
            }
        );
        assert_eq!(
            parse_command("write 130560 1536").unwrap(),
            IoCommand::Write {
                offset: 130560,
                len: 1536,
                pattern: 0xcd
            }
        );
        assert_eq!(parse_command("flush").unwrap(), IoCommand::Flush);
    }

    #[test]
    fn rejects_bad_commands() {
        for c in [
            "",
            "frob 0 1",
            "read 0",
            "read 0 1 2",
            "write -P 0 1",
            "write -P zz 0 1",
            "write -z -P 1 0 1",
            "read -c 0 1",
            "read 0 1x",
        ] {
            assert!(parse_command(c).is_err(), "{c:?} should be refused");
        }
    }

    #[test]
    fn runs_and_verifies_on_raw() {
        let mem = MemStorage::from_vec(vec![0; 1 << 16]);
        let mut r = Raw::from_storage(Box::new(mem), false).unwrap();
        let run = |r: &mut Raw, c: &str| execute(r, &parse_command(c).unwrap(), c);
        assert_eq!(
            run(&mut r, "write -P 0x11 4096 8k").unwrap(),
            "wrote 8192/8192 bytes at offset 4096\n8 KiB, 1 ops"
        );
        run(&mut r, "read -P 0x11 4096 8k").unwrap();
        run(&mut r, "write -z 8192 512").unwrap();
        let err = run(&mut r, "read -P 0x11 4096 8k").unwrap_err();
        assert!(matches!(
            err,
            IoError::PatternMismatch {
                offset: 8192,
                expected: 0x11,
                found: 0
            }
        ));
        assert!(err.to_string().contains("offset 8192 (0x2000)"));
        assert!(matches!(
            run(&mut r, "read 60k 8k"),
            Err(IoError::Driver { .. })
        ));
        assert!(matches!(
            run(&mut r, "write 0xffffffffffff 8k"),
            Err(IoError::Driver { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics(cmd in "[ -~]{0,40}") {
            let _ = parse_command(&cmd);
        }

        #[test]
        fn write_commands_roundtrip(off in 0u64..(1 << 40), len in 0u64..(1 << 30), p: u8) {
            let cmd = format!("write -P {p:#x} {off} {len}");
            proptest::prop_assert_eq!(
                parse_command(&cmd).unwrap(),
                IoCommand::Write { offset: off, len, pattern: p }
            );
        }
    }
}
