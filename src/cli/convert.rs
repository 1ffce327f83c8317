//! `vmsnap convert [-f FMT] [-O qcow2|raw] [-o OPTIONS] [-c] [-p] [-l SNAPSHOT] [--active-only]
//! SRC DST`, like `qemu-img convert` for the options they share, except that a qcow2 output
//! keeps every internal snapshot of a qcow2 source (table, layers, VM states, sharing)
//! unless `--active-only` or `-l` asks for one layer.
//!
//! DST is written under a temporary name in its directory and renamed over DST only when
//! complete and synced (qemu-img overwrites DST too, but in place): a failed or interrupted
//! convert never leaves a half-written image under the requested name. `-t writeback` (the
//! default) syncs the output before the rename; `-t unsafe` (qemu-img's default) does not,
//! for a copy that may be lost on a crash.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;

use super::create::{apply_qcow2_options, CreateError};
use super::image::{parse_format, Image};
use crate::block::qcow2::copy::{self, CopyError, CopyOptions, Select, SourceImage};
use crate::block::qcow2::CreateOptions;
use crate::block::storage::{FileStorage, Storage};
use crate::block::{self, Format, OpenOptions};

/// Arguments of `convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source format (probed if not given).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Output format (qemu-img's default: raw).
    #[arg(short = 'O', default_value = "raw")]
    pub output_format: String,
    /// Output options, `key=value` separated by commas: cluster_size, refcount_bits, compat,
    /// extended_l2, compression_type.
    #[arg(short = 'o')]
    pub options: Vec<String>,
    /// Compress data clusters (qcow2 output).
    #[arg(short = 'c')]
    pub compress: bool,
    /// Show progress.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Output cache mode, as qemu-img's `-t`: `writeback` (default here) syncs the output
    /// and its directory before DST appears; `unsafe` (qemu-img's default for convert)
    /// skips both, so a crash soon after may lose the copy.
    #[arg(short = 't', default_value = "writeback", value_parser = ["writeback", "unsafe"])]
    pub cache: String,
    /// Copy one snapshot as the active layer: `snapshot.name=TAG`, `snapshot.id=ID` or
    /// `ID_OR_NAME`.
    #[arg(short = 'l')]
    pub snapshot: Option<String>,
    /// Copy the active layer only and drop the snapshots, as `qemu-img convert` does.
    #[arg(long = "active-only")]
    pub active_only: bool,
    /// Open the source without taking locks (`-U`, force-share).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Source image.
    pub src: PathBuf,
    /// Output image (replaced if it exists, as qemu-img does).
    pub dst: PathBuf,
}

/// Errors of `convert`.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The source could not be opened.
    #[error("Could not open '{0}'")]
    Open(String, #[source] block::Error),
    /// A format name is unknown.
    #[error(transparent)]
    Format(block::Error),
    /// An option is invalid.
    #[error(transparent)]
    Option(#[from] CreateError),
    /// Options that do not go together.
    #[error("{0}")]
    Unsupported(String),
    /// The source is damaged: copying it would carry the damage on, or read past its end.
    #[error(
        "'{0}' is damaged ({1} corruptions, {2} check errors): run 'vmsnap check {0}'; convert copies only images that check clean or with leaks"
    )]
    Damaged(String, u64, u64),
    /// SRC and DST name the same file.
    #[error("'{0}' is both the source and the output")]
    SameFile(String),
    /// DST exists and is not a regular file.
    #[error("'{0}' exists and is not a regular file; refusing to replace it")]
    NotRegular(String),
    /// The copy failed.
    #[error("Could not convert '{src}' to '{dst}'")]
    Copy {
        /// Source path.
        src: String,
        /// Output path.
        dst: String,
        /// Cause.
        #[source]
        source: CopyError,
    },
    /// Reading the source for raw output failed.
    #[error("error while reading '{0}'")]
    Read(String, #[source] block::Error),
    /// Creating, writing, syncing or renaming the output failed.
    #[error("{what} '{path}'")]
    Output {
        /// The step.
        what: &'static str,
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Runs `convert`.
///
/// # Errors
/// See [`ConvertError`].
pub fn convert_command(args: &ConvertArgs) -> Result<(), ConvertError> {
    let in_fmt = parse_format(args.format.as_deref()).map_err(ConvertError::Format)?;
    let out_fmt: Format = args.output_format.parse().map_err(ConvertError::Format)?;
    let opts = copy_options(args, out_fmt)?;
    check_paths(&args.src, &args.dst)?;
    let src_name = args.src.display().to_string();
    let open = OpenOptions {
        read_only: true,
        format: None,
        force_share: args.force_share,
    };
    let mut img = Image::open(&args.src, in_fmt, open)
        .map_err(|e| ConvertError::Open(src_name.clone(), e))?;
    // A damaged source (a truncated file, a table past its end) opens read-only, as QEMU
    // opens it, but is not copied: the copy would read zeroes where the data is gone.
    if let Image::Qcow2(q) = &mut img {
        let r = q
            .check(None)
            .map_err(|e| ConvertError::Open(src_name.clone(), e))?;
        if r.corruptions > 0 || r.check_errors > 0 {
            return Err(ConvertError::Damaged(
                src_name,
                r.corruptions,
                r.check_errors,
            ));
        }
    }
    let select = match (&args.snapshot, args.active_only) {
        (Some(l), _) => Select::parse_l(l),
        (None, true) => Select::Active,
        (None, false) => Select::All,
    };
    if let (Image::Raw(_), Some(_)) = (&img, &args.snapshot) {
        return Err(ConvertError::Unsupported(format!(
            "'{src_name}' is a raw image and has no snapshots"
        )));
    }
    announce(&img, &select, out_fmt, &src_name);
    let tmp = temp_path(&args.dst);
    let result = write_output(&mut img, &select, out_fmt, &opts, &tmp, args);
    match result {
        Ok(()) => finish(&tmp, &args.dst, args.cache != "unsafe"),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// The output options from `-o` and `-c`.
fn copy_options(args: &ConvertArgs, out_fmt: Format) -> Result<CopyOptions, ConvertError> {
    if out_fmt == Format::Raw {
        if args.compress {
            return Err(ConvertError::Unsupported(
                "Compression not supported for this file format".into(),
            ));
        }
        if let Some(item) = args.options.iter().find(|o| !o.is_empty()) {
            return Err(CreateError::InvalidOption(item.clone()).into());
        }
        return Ok(CopyOptions::default());
    }
    let mut zstd = false;
    let mut rest = Vec::new();
    for item in args
        .options
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
    {
        match item.split_once('=') {
            Some(("compression_type", v)) => {
                zstd = match v {
                    "zlib" => false,
                    "zstd" => true,
                    _ => {
                        return Err(CreateError::InvalidValue {
                            key: "compression_type".into(),
                            value: v.into(),
                            why: "zlib or zstd",
                        }
                        .into())
                    }
                }
            }
            Some(("cluster_size" | "refcount_bits" | "compat" | "extended_l2", _)) => {
                rest.push(item.to_owned())
            }
            _ => return Err(CreateError::InvalidOption(item.to_owned()).into()),
        }
    }
    let mut c = CreateOptions::default();
    apply_qcow2_options(&mut c, &rest)?;
    let opts = CopyOptions {
        cluster_size: c.cluster_size,
        refcount_bits: c.refcount_bits,
        compat: c.compat,
        extended_l2: c.extended_l2,
        zstd,
        compress: args.compress,
    };
    opts.validate()
        .map_err(|e| ConvertError::Unsupported(e.to_string()))?;
    Ok(opts)
}

/// Refuses a DST that is the source itself or not a regular file.
fn check_paths(src: &Path, dst: &Path) -> Result<(), ConvertError> {
    use std::os::unix::fs::MetadataExt;
    let Ok(d) = std::fs::metadata(dst) else {
        return Ok(());
    };
    if let Ok(s) = std::fs::metadata(src) {
        if s.dev() == d.dev() && s.ino() == d.ino() {
            return Err(ConvertError::SameFile(dst.display().to_string()));
        }
    }
    if !d.is_file() {
        return Err(ConvertError::NotRegular(dst.display().to_string()));
    }
    Ok(())
}

/// Says on stderr what happens to the source's snapshots.
fn announce(img: &Image, select: &Select, out_fmt: Format, src: &str) {
    let Image::Qcow2(q) = img else { return };
    let snaps = q.snapshot_entries();
    if snaps.is_empty() || !matches!(select, Select::All) {
        return;
    }
    let list: Vec<String> = snaps
        .iter()
        .map(|s| format!("{} '{}'", s.id, s.name))
        .collect();
    if out_fmt == Format::Qcow2 {
        eprintln!(
            "vmsnap convert: keeping all {} internal snapshots of '{src}' with their VM state \
             ({}); --active-only copies the active layer only, as qemu-img does",
            snaps.len(),
            list.join(", ")
        );
    } else {
        eprintln!(
            "vmsnap convert: raw output holds the active layer only; the {} internal snapshots \
             of '{src}' are not copied (-O qcow2 keeps them)",
            snaps.len()
        );
    }
}

/// `DIR/.NAME.vmsnap-convert-PID` next to `dst`.
fn temp_path(dst: &Path) -> PathBuf {
    let name = dst
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    dst.with_file_name(format!(".{name}.vmsnap-convert-{}", std::process::id()))
}

fn write_output(
    img: &mut Image,
    select: &Select,
    out_fmt: Format,
    opts: &CopyOptions,
    tmp: &Path,
    args: &ConvertArgs,
) -> Result<(), ConvertError> {
    let tmp_name = tmp.display().to_string();
    let storage = FileStorage::create(tmp).map_err(|source| ConvertError::Output {
        what: "Could not create",
        path: tmp_name.clone(),
        source,
    })?;
    let mut progress = Progress::new(args.progress);
    match out_fmt {
        Format::Qcow2 => {
            let mut src = match img {
                Image::Qcow2(q) => SourceImage::Qcow2(q.as_mut()),
                Image::Raw(r) => SourceImage::Plain(r),
            };
            copy::copy_image(&mut src, select, &storage, opts, &mut |d, t| {
                progress.update(d, t)
            })
            .map_err(|source| ConvertError::Copy {
                src: args.src.display().to_string(),
                dst: args.dst.display().to_string(),
                source,
            })?;
        }
        Format::Raw => write_raw(img, select, &storage, &mut progress, &args.src)?,
    }
    progress.done();
    if args.cache == "unsafe" {
        return Ok(());
    }
    storage.flush().map_err(|source| ConvertError::Output {
        what: "Could not sync",
        path: tmp_name,
        source,
    })
}

/// Writes the selected layer as a sparse raw file.
fn write_raw(
    img: &mut Image,
    select: &Select,
    out: &dyn Storage,
    progress: &mut Progress,
    src: &Path,
) -> Result<(), ConvertError> {
    const CHUNK: u64 = 2 << 20;
    let rd = |e| ConvertError::Read(src.display().to_string(), e);
    let snap = match img {
        Image::Qcow2(q) => select
            .find(q.snapshot_entries())
            .map_err(|source| ConvertError::Copy {
                src: src.display().to_string(),
                dst: String::new(),
                source,
            })?
            .map(|s| (s.id.clone(), s.disk_size)),
        Image::Raw(_) => None,
    };
    let size = snap.as_ref().map_or_else(|| img.driver().size(), |s| s.1);
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = 0u64;
    while off < size {
        let n = CHUNK.min(size - off) as usize;
        match (&snap, &mut *img) {
            (Some((id, _)), Image::Qcow2(q)) => q.read_snapshot(id, off, &mut buf[..n]),
            _ => img.driver().read_at(off, &mut buf[..n]),
        }
        .map_err(rd)?;
        if buf[..n].iter().any(|&b| b != 0) {
            out.write_at(off, &buf[..n])
                .map_err(|source| ConvertError::Output {
                    what: "Could not write",
                    path: "output".into(),
                    source,
                })?;
        }
        off += n as u64;
        progress.update(off, size);
    }
    out.set_len(size).map_err(|source| ConvertError::Output {
        what: "Could not resize",
        path: "output".into(),
        source,
    })
}

/// Renames the complete temporary file over `dst` and, with `sync`, syncs the directory.
fn finish(tmp: &Path, dst: &Path, sync: bool) -> Result<(), ConvertError> {
    std::fs::rename(tmp, dst).map_err(|source| {
        let _ = std::fs::remove_file(tmp);
        ConvertError::Output {
            what: "Could not rename the finished output to",
            path: dst.display().to_string(),
            source,
        }
    })?;
    if !sync {
        return Ok(());
    }
    let dir = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| ConvertError::Output {
            what: "Could not sync directory",
            path: dir.display().to_string(),
            source,
        })
}

/// `qemu-img -p` progress: `    (PERCENT/100%)` rewritten in place on stdout.
struct Progress {
    on: bool,
    shown: Option<u32>,
}

impl Progress {
    fn new(on: bool) -> Self {
        let mut p = Self { on, shown: None };
        p.update(0, 1);
        p
    }

    fn update(&mut self, done: u64, total: u64) {
        if !self.on {
            return;
        }
        let hundredths = (done as f64 / total.max(1) as f64 * 10000.0) as u32;
        // Redraw at every whole percent, as qemu-img does.
        if self.shown.is_some_and(|s| s / 100 == hundredths / 100) {
            return;
        }
        self.shown = Some(hundredths);
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "    ({:.2}/100%)\r", f64::from(hundredths) / 100.0);
        let _ = out.flush();
    }

    fn done(&mut self) {
        if self.on {
            println!("    (100.00/100%)");
        }
    }
}
