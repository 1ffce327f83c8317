//! vmsnap-inspect: decode QEMU migration streams and snapshot VM state, offline.
//!
//! `vmsnap-inspect FILE` reads a migration stream file; `vmsnap-inspect IMAGE --snapshot TAG`
//! reads the VM state of a qcow2 internal snapshot, read-only and without KVM. `--output json`
//! prints what QEMU's `analyze-migration.py` prints for the same input. `A --diff B` compares
//! two streams or snapshots (`IMAGE@TAG`), `SRC --compat DST` checks that DST can load what SRC
//! wrote, and `--dump-guest-memory OUT.elf` writes the guest's RAM and registers as an ELF core.

mod compat;
mod core;
mod diff;
mod human;
mod input;
mod integrity;
mod mapped;
mod pages;
mod side;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};

use vmsnap::migration::analyze::{AnalyzeError, AnalyzeOptions};
use vmsnap::migration::stream::ErrorKind;
use vmsnap::migration::vmdesc::to_python_json;

/// `QFI\xfb`, the first bytes of a qcow2 image.
const QCOW2_MAGIC: u32 = 0x5146_49fb;

/// What to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Dump {
    /// The decoded device state (analyze-migration.py `--dump state`).
    State,
    /// The stream's VM description JSON (analyze-migration.py `--dump desc`).
    Desc,
}

/// Output style.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// JSON exactly as analyze-migration.py prints it.
    Json,
    /// A section table and a decoded device tree.
    Human,
}

/// Decode a QEMU migration stream or the VM state of a qcow2 snapshot.
#[derive(Debug, Parser)]
#[command(name = "vmsnap-inspect", version)]
struct Cli {
    /// Migration stream file, or a qcow2 image with --snapshot (with --diff, --compat and
    /// --dump-guest-memory also IMAGE@TAG).
    input: PathBuf,
    /// Compare with B (a stream file or IMAGE@TAG); exit status as cmp: 0 same, 1 different,
    /// 2 trouble.
    #[arg(long, value_name = "B", conflicts_with_all = ["compat", "dump", "memory", "extract"])]
    diff: Option<String>,
    /// Check that a VM with DST's descriptions (a stream file or IMAGE@TAG) can load what
    /// INPUT's VM saved (QEMU's vmstate-static-checker.py rules); exit 1 naming each
    /// incompatibility, 2 on trouble.
    #[arg(long, value_name = "DST", conflicts_with_all = ["dump", "memory", "extract"])]
    compat: Option<String>,
    /// Write guest RAM and vCPU registers as an ELF core, as QEMU's dump-guest-memory does.
    #[arg(long, value_name = "OUT.elf", conflicts_with_all = ["diff", "compat", "dump", "memory", "extract"])]
    dump_guest_memory: Option<PathBuf>,
    /// Read the VM state of this snapshot (id or name) of the qcow2 image INPUT.
    #[arg(long, value_name = "TAG")]
    snapshot: Option<String>,
    /// What to dump (default: state).
    #[arg(long, short = 'd', value_enum)]
    dump: Option<Dump>,
    /// Include RAM page contents (as analyze-migration.py -m).
    #[arg(long, short = 'm')]
    memory: bool,
    /// Write desc.json, state.json and each RAM block as a sparse file into DIR (as -x).
    #[arg(long, short = 'x', value_name = "DIR")]
    extract: Option<PathBuf>,
    /// Output style; defaults to json when --dump or --memory is given, else human.
    #[arg(long, value_enum)]
    output: Option<Output>,
}

/// Failures of the inspector.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Input(#[from] input::InputError),
    #[error(transparent)]
    Analyze(#[from] AnalyzeError),
    #[error("cannot create '{path}': {source}")]
    ExtractDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("decoding stopped: {0}")]
    Stream(String),
    #[error("the stream has no VM description (vmdesc) to dump")]
    NoDesc,
    #[error("INPUT is a qcow2 image, not a migration stream: add --snapshot TAG to read a snapshot's VM state")]
    Qcow2WithoutSnapshot,
    #[error("writing to stdout: {0}")]
    Stdout(#[source] std::io::Error),
    #[error("{label}: {reason}")]
    Side { label: String, reason: String },
    #[error(transparent)]
    Core(#[from] core::CoreError),
}

fn run(cli: &Cli) -> Result<(), InspectError> {
    let output = cli.output.unwrap_or(if cli.dump.is_some() || cli.memory {
        Output::Json
    } else {
        Output::Human
    });
    let dump = cli.dump.unwrap_or(Dump::State);
    if let Some(dir) = &cli.extract {
        std::fs::create_dir_all(dir).map_err(|source| InspectError::ExtractDir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let opts = AnalyzeOptions {
        memory: cli.memory && dump == Dump::State,
        extract_dir: cli.extract.clone(),
        page_size: None,
    };
    let mut holder = input::open(&cli.input, cli.snapshot.as_deref())?;
    if let Some(summary) = holder.checkpoint_summary() {
        // JSON output stays what analyze-migration.py prints for the stream part.
        if output == Output::Human {
            emit(&format!("{summary}\n"))?;
        } else {
            eprint!("{summary}");
        }
    }
    let (analysis, retried) = side::analyze_best(&mut holder, &opts)?;
    if let Some(ps) = retried {
        eprintln!("note: RAM decoded with the vmdesc's page size {ps:#x}");
    }
    if cli.extract.is_some() {
        // The listing analyze-migration.py -x prints (names relative to DIR).
        let mut list = String::from("desc.json\n");
        for (name, _) in &analysis.ram_blocks {
            list.push_str(name);
            list.push('\n');
        }
        list.push_str("state.json\n");
        emit(&list)?;
    }
    if let Some(e) = &analysis.error {
        if matches!(*e.kind, ErrorKind::BadMagic(QCOW2_MAGIC)) && cli.snapshot.is_none() {
            return Err(InspectError::Qcow2WithoutSnapshot);
        }
    }
    for w in &analysis.warnings {
        eprintln!("warning: {w}");
    }
    if let Some(e) = &analysis.error {
        if output == Output::Human {
            emit(&human::render(&analysis, &holder.label(), dump))?;
        }
        return Err(InspectError::Stream(e.to_string()));
    }
    if cli.extract.is_some() {
        return Ok(());
    }
    let text = match (output, dump) {
        (Output::Json, Dump::State) => to_python_json(&analysis.state) + "\n",
        (Output::Json, Dump::Desc) => {
            to_python_json(analysis.desc.as_ref().ok_or(InspectError::NoDesc)?) + "\n"
        }
        (Output::Human, _) => human::render(&analysis, &holder.label(), dump),
    };
    emit(&text)
}

/// The left side: INPUT with --snapshot, else INPUT as a stream file or IMAGE@TAG.
fn left_side(cli: &Cli) -> Result<side::Side, InspectError> {
    match &cli.snapshot {
        Some(tag) => side::Side::open(&cli.input, Some(tag)),
        None => {
            let (path, tag) = side::parse_spec(&cli.input.to_string_lossy());
            side::Side::open(&path, tag.as_deref())
        }
    }
}

fn right_side(spec: &str) -> Result<side::Side, InspectError> {
    let (path, tag) = side::parse_spec(spec);
    side::Side::open(&path, tag.as_deref())
}

/// `--diff`/`--compat`: true when the sides are the same / compatible.
fn run_compare(cli: &Cli) -> Result<bool, InspectError> {
    let output = cli.output.unwrap_or(Output::Human);
    let mut a = left_side(cli)?;
    if let Some(spec) = &cli.diff {
        let mut b = right_side(spec)?;
        let report = diff::diff(&mut a, &mut b)?;
        let text = match output {
            Output::Json => serde_json::to_string_pretty(&report).unwrap_or_default() + "\n",
            Output::Human => diff::render_human(&report),
        };
        emit(&text)?;
        return Ok(report.is_same());
    }
    let spec = cli.compat.as_deref().unwrap_or_default();
    let b = right_side(spec)?;
    let report = compat::check(&a, &b);
    let text = match output {
        Output::Json => serde_json::to_string_pretty(&report).unwrap_or_default() + "\n",
        Output::Human => compat::render_human(&report),
    };
    emit(&text)?;
    Ok(report.compatible())
}

/// `--dump-guest-memory`.
fn run_core(cli: &Cli, out: &std::path::Path) -> Result<(), InspectError> {
    let mut a = left_side(cli)?;
    let summary = core::write_core(&mut a, out)?;
    eprintln!("{summary}");
    Ok(())
}

fn report_error(e: &InspectError) {
    eprintln!("vmsnap-inspect: {e}");
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        eprintln!("  caused by: {s}");
        src = s.source();
    }
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> Result<(), InspectError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(InspectError::Stdout(e)),
        _ => Ok(()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.diff.is_some() || cli.compat.is_some() {
        // Exit status as cmp: 0 same (compatible), 1 different (incompatible), 2 trouble.
        return match run_compare(&cli) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                report_error(&e);
                ExitCode::from(2)
            }
        };
    }
    if let Some(out) = &cli.dump_guest_memory {
        return match run_core(&cli, out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                report_error(&e);
                ExitCode::FAILURE
            }
        };
    }
    // vmsnap's CRC32 record of a snapshot's VM state: warn before decoding, fail after.
    let damaged = cli
        .snapshot
        .as_deref()
        .and_then(|tag| integrity::damaged_state(&cli.input, tag));
    if let Some(msg) = &damaged {
        eprintln!("warning: {msg}");
    }
    match run(&cli) {
        Ok(()) if damaged.is_some() => ExitCode::FAILURE,
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report_error(&e);
            ExitCode::FAILURE
        }
    }
}
