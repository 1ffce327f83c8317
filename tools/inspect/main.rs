//! vmsnap-inspect: decode QEMU migration streams and snapshot VM state, offline.
//!
//! `vmsnap-inspect FILE` reads a migration stream file; `vmsnap-inspect IMAGE --snapshot TAG`
//! reads the VM state of a qcow2 internal snapshot, read-only and without KVM. `--output json`
//! prints what QEMU's `analyze-migration.py` prints for the same input.

mod human;
mod input;
mod integrity;
mod mapped;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};

use vmsnap::migration::analyze::{analyze, analyze_stream, Analysis, AnalyzeError, AnalyzeOptions};
use vmsnap::migration::stream::{ErrorKind, StreamReader};
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
    /// Migration stream file, or a qcow2 image with --snapshot.
    input: PathBuf,
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
enum InspectError {
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
    let mut analysis = analyze_input(&mut holder, &opts)?;
    if analysis.stopped_in_ram() {
        // The page size is only stated in the vmdesc at the end: try the other sizes QEMU
        // targets use and keep the one the vmdesc confirms.
        for ps in [8192, 16384, 65536, 1024, 2048] {
            let retry = AnalyzeOptions {
                page_size: Some(ps),
                ..opts.clone()
            };
            let a = analyze_input(&mut holder, &retry)?;
            if a.error.is_none() && a.vmdesc_page_size() == Some(ps) {
                eprintln!("note: RAM decoded with the vmdesc's page size {ps:#x}");
                analysis = a;
                break;
            }
        }
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

/// Analyzes the input: a stream file through a mapping with seeks over page bodies, anything
/// else by reading it.
fn analyze_input(
    holder: &mut input::Input,
    opts: &AnalyzeOptions,
) -> Result<Analysis, InspectError> {
    if let Some(m) = holder.mapped() {
        return Ok(analyze_stream(StreamReader::new_seekable(m), opts)?);
    }
    Ok(analyze(holder.reader()?, opts)?)
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
            eprintln!("vmsnap-inspect: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                eprintln!("  caused by: {s}");
                src = s.source();
            }
            ExitCode::FAILURE
        }
    }
}
