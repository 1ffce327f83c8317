//! `vmsnap vmstate export IMAGE TAG -o FILE` and `vmsnap vmstate import IMAGE... TAG FILE`:
//! move a VM state between an internal snapshot and a QEMU migration file.
//!
//! Export writes the snapshot's state (checked against vmsnap's CRC32 record when present)
//! to a temporary file next to FILE, checks it is a whole migration stream, then renames it.
//! Import validates FILE as a stream before writing anything, then creates TAG on every image
//! (one VM's disks: a [`BlockSet`]) with FILE as the VM state and a CRC32 record.

use std::fs::File;
use std::io::{BufWriter, IsTerminal};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use super::image::{parse_format, Image};
use crate::block::{self, BlockSet, BlockSetError, OpenOptions};
use crate::interop::transfer::{
    export_state, import_state, ExportError, ImportError, ImportOptions, Phase,
};
use crate::interop::validate::{validate_stream, ValidateError};

/// Arguments of `vmstate`.
#[derive(Debug, Args)]
pub struct VmstateArgs {
    /// export or import.
    #[command(subcommand)]
    pub action: VmstateAction,
}

/// The `vmstate` actions.
#[derive(Debug, Subcommand)]
pub enum VmstateAction {
    /// Write a snapshot's VM state out as a migration file (for QEMU `-incoming`).
    Export {
        /// The image holding the VM state.
        image: PathBuf,
        /// Snapshot id or name.
        tag: String,
        /// Output migration file.
        #[arg(short = 'o', value_name = "FILE")]
        output: PathBuf,
        /// Image format (probed when absent).
        #[arg(short = 'f')]
        format: Option<String>,
        /// Write a checkpoint file (for `vmsnap restore`) instead of a bare stream: IMAGE
        /// is its drive.
        #[arg(long)]
        checkpoint: bool,
    },
    /// Make a checkpoint file from a migration stream file and the VM's drives.
    Checkpoint {
        /// The migration stream file (`migrate file:…` output).
        stream: PathBuf,
        /// Output checkpoint file.
        #[arg(short = 'o', value_name = "FILE")]
        output: PathBuf,
        /// The VM's drives, as `vmsnap run --drive` takes them, in order.
        #[arg(long = "drive", value_name = "SPEC")]
        drives: Vec<super::run::DriveSpec>,
        /// The built-in guest.
        #[arg(long, default_value = "counter")]
        guest: crate::vmm::Guest,
    },
    /// Create snapshot TAG on every image from the current disks and a migration file.
    Import {
        /// The images of one VM, in drive order, then TAG, then FILE.
        #[arg(required = true, num_args = 3.., value_name = "IMAGE... TAG FILE")]
        args: Vec<String>,
        /// Image that gets the VM state (default: the first).
        #[arg(long, value_name = "NAME")]
        vmstate_device: Option<String>,
        /// Guest clock to record, nanoseconds.
        #[arg(long, value_name = "NS", default_value_t = 0)]
        vm_clock: u64,
        /// Creation date: `@SECONDS` or `YYYY-MM-DD HH:MM:SS` (UTC); default now.
        #[arg(long)]
        date: Option<String>,
        /// Image format (probed when absent).
        #[arg(short = 'f')]
        format: Option<String>,
    },
}

/// Errors of `vmstate`.
#[derive(Debug, thiserror::Error)]
pub enum VmstateError {
    /// An image could not be opened.
    #[error("Could not open '{0}'")]
    Open(String, #[source] block::Error),
    /// The migration file could not be opened or created.
    #[error("Could not open '{0}'")]
    File(String, #[source] std::io::Error),
    /// `--date` could not be parsed.
    #[error("invalid --date '{0}': expected @SECONDS or 'YYYY-MM-DD HH:MM:SS'")]
    Date(String),
    /// Export failed.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// The exported file is not a whole stream.
    #[error("the exported VM state of snapshot '{0}' is not a valid migration stream")]
    ExportInvalid(String, #[source] ValidateError),
    /// Import failed.
    #[error(transparent)]
    Import(#[from] ImportError),
    /// Adding an image to the set failed.
    #[error(transparent)]
    Set(#[from] BlockSetError),
    /// Flushing the images failed.
    #[error("Could not flush the images")]
    Flush(#[source] block::Error),
    /// Making or reading a checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] super::checkpoint::convert::WrapError),
    /// The checkpoint to import is not usable.
    #[error(transparent)]
    CheckpointFile(#[from] crate::interop::checkpoint::CheckpointError),
}

/// Runs `vmstate`.
///
/// # Errors
/// [`VmstateError`].
pub fn vmstate_command(args: &VmstateArgs) -> Result<(), VmstateError> {
    match &args.action {
        VmstateAction::Export {
            image,
            tag,
            output,
            format,
            checkpoint: false,
        } => export(image, tag, output, format.as_deref()),
        VmstateAction::Export {
            image,
            tag,
            output,
            format,
            checkpoint: true,
        } => export_checkpoint(image, tag, output, format.as_deref()),
        VmstateAction::Checkpoint {
            stream,
            output,
            drives,
            guest,
        } => super::checkpoint::convert::wrap_stream(stream, output, drives, *guest)
            .map(|_| ())
            .map_err(Into::into),
        VmstateAction::Import {
            args,
            vmstate_device,
            vm_clock,
            date,
            format,
        } => {
            let (images, rest) = args.split_at(args.len() - 2);
            let (date_sec, date_nsec) = match date {
                Some(d) => parse_date(d).ok_or_else(|| VmstateError::Date(d.clone()))?,
                None => now(),
            };
            let opts = ImportOptions {
                tag: rest[0].clone(),
                vmstate_device: vmstate_device.clone(),
                vm_clock_nsec: *vm_clock,
                date_sec,
                date_nsec,
            };
            import(images, Path::new(&rest[1]), &opts, format.as_deref())
        }
    }
}

/// A byte-count progress bar on stderr, drawn only when stderr is a terminal.
fn progress_bar(len: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}

fn export(
    image: &Path,
    tag: &str,
    output: &Path,
    format: Option<&str>,
) -> Result<(), VmstateError> {
    let name = image.display().to_string();
    let open_err = |e| VmstateError::Open(name.clone(), e);
    let opts = OpenOptions {
        read_only: true,
        format: None,
        force_share: false,
    };
    let mut img =
        Image::open(image, parse_format(format).map_err(open_err)?, opts).map_err(open_err)?;
    let driver = img.driver();
    let format_name = driver.format().name();
    let store = driver.snapshots().ok_or_else(|| {
        open_err(block::Error::SnapshotsNotSupported {
            format: format_name,
        })
    })?;
    let size =
        block::blockset::find_snapshot(&store.snapshot_list(), tag).map_or(0, |s| s.vm_state_size);
    let tmp = temp_path(output);
    let file_err = |e| VmstateError::File(tmp.display().to_string(), e);
    let mut out = BufWriter::new(File::create(&tmp).map_err(file_err)?);
    let bar = progress_bar(size, "export");
    let result = export_state(store, tag, &mut out, &mut |_, n| bar.set_position(n));
    bar.finish_and_clear();
    drop(out);
    let finished = result.map_err(VmstateError::from).and_then(|_| {
        let f = File::open(&tmp).map_err(file_err)?;
        validate_stream(std::io::BufReader::new(f))
            .map_err(|e| VmstateError::ExportInvalid(tag.to_owned(), e))?;
        crate::killpoint::at("vmstate-export:rename");
        std::fs::rename(&tmp, output)
            .map_err(|e| VmstateError::File(output.display().to_string(), e))?;
        crate::killpoint::at("vmstate-export:renamed");
        Ok(())
    });
    if finished.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    finished
}

/// `export --checkpoint`: the state exported to a hidden stream file next to `output`, then
/// wrapped with IMAGE as the checkpoint's drive.
fn export_checkpoint(
    image: &Path,
    tag: &str,
    output: &Path,
    format: Option<&str>,
) -> Result<(), VmstateError> {
    let stream = output.with_file_name(format!(
        ".{}.stream",
        output
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let r = export(image, tag, &stream, format).and_then(|()| {
        let drive = super::run::DriveSpec {
            file: image.to_path_buf(),
            format: parse_format(format)
                .map_err(|e| VmstateError::Open(image.display().to_string(), e))?,
            readonly: false,
            capture: false,
            node_name: None,
            overwrite: false,
            reconnect_delay: None,
        };
        super::checkpoint::convert::wrap_stream(&stream, output, &[drive], Default::default())
            .map(|_| ())
            .map_err(Into::into)
    });
    let _ = std::fs::remove_file(&stream);
    r
}

/// `DIR/.NAME.vmsnap-tmp` next to `output` (as checkpoints are written).
fn temp_path(output: &Path) -> PathBuf {
    crate::interop::checkpoint::temp_path(output)
}

fn import(
    images: &[String],
    file: &Path,
    opts: &ImportOptions,
    format: Option<&str>,
) -> Result<(), VmstateError> {
    let mut set = BlockSet::new();
    for path in images {
        let open_err = |e| VmstateError::Open(path.clone(), e);
        let fmt = parse_format(format).map_err(open_err)?;
        let img = Image::open(Path::new(path), fmt, OpenOptions::default()).map_err(open_err)?;
        set.add(path.clone(), img.into_driver())?;
    }
    if crate::interop::checkpoint::is_checkpoint(file) {
        // A checkpoint: its stream part, once the whole file's CRC32 checks.
        let mut cp = crate::interop::checkpoint::Checkpoint::open(file)?;
        cp.verify(&mut |_| {})?;
        let mut s = cp.stream()?;
        let len = s.len();
        return import_from(&mut set, &mut s, len, opts);
    }
    let file_err = |e| VmstateError::File(file.display().to_string(), e);
    let mut f = File::open(file).map_err(file_err)?;
    let len = f.metadata().map_err(file_err)?.len();
    import_from(&mut set, &mut f, len, opts)
}

/// Imports the stream `f` of `len` bytes into `set`, then flushes it.
fn import_from<F: std::io::Read + std::io::Seek>(
    set: &mut BlockSet,
    f: &mut F,
    len: u64,
    opts: &ImportOptions,
) -> Result<(), VmstateError> {
    let bar = progress_bar(len, "validate");
    let mut phase = Phase::Validate;
    let result = import_state(set, f, opts, &mut |p, n| {
        if p != phase {
            phase = p;
            bar.set_message(match p {
                Phase::Validate => "validate",
                Phase::Write => "write",
                Phase::Verify => "verify",
                Phase::Export => "export",
            });
            bar.reset();
        }
        bar.set_position(n);
    });
    bar.finish_and_clear();
    let flushed = set.flush().map_err(VmstateError::Flush);
    result?;
    flushed
}

fn now() -> (u32, u32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (
        u32::try_from(d.as_secs()).unwrap_or(u32::MAX),
        d.subsec_nanos(),
    )
}

/// Parses `@SECONDS` or `YYYY-MM-DD HH:MM:SS` / `YYYY-MM-DDTHH:MM:SS` (UTC).
fn parse_date(s: &str) -> Option<(u32, u32)> {
    if let Some(secs) = s.strip_prefix('@') {
        return Some((secs.parse().ok()?, 0));
    }
    let (date, time) = s.split_once([' ', 'T'])?;
    let d: Vec<i64> = date
        .split('-')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let t: Vec<i64> = time
        .split(':')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let ([y, m, day], [hh, mm, ss]) = (d.as_slice(), t.as_slice()) else {
        return None;
    };
    let valid = (1..=12).contains(m)
        && (1..=31).contains(day)
        && (0..24).contains(hh)
        && (0..60).contains(mm)
        && (0..61).contains(ss);
    if !valid {
        return None;
    }
    let secs = days_from_civil(*y, *m, *day) * 86_400 + hh * 3600 + mm * 60 + ss;
    Some((u32::try_from(secs).ok()?, 0))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_parse_as_utc() {
        assert_eq!(parse_date("@1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(parse_date("1970-01-01 00:00:00"), Some((0, 0)));
        assert_eq!(parse_date("2026-11-22T04:28:50"), Some((1_795_321_730, 0)));
        assert_eq!(parse_date("2000-03-01 00:00:01"), Some((951_868_801, 0)));
        assert_eq!(parse_date("2026-13-01 00:00:00"), None);
        assert_eq!(parse_date("yesterday"), None);
        assert_eq!(parse_date("1969-12-31 23:59:59"), None);
    }

    #[test]
    fn temp_file_is_hidden_next_to_the_output() {
        assert_eq!(
            temp_path(Path::new("/a/b/mig.bin")),
            PathBuf::from("/a/b/.mig.bin.vmsnap-tmp")
        );
    }
}
