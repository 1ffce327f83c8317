//! `vmsnap run`: boot a built-in guest under KVM with disks, a serial console and a monitor.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::block::{self, Format, OpenOptions};
use crate::migrate::{self, uri::Listener, DriveOpen, MigrateUri, Migrator};
use crate::snapshot;
use crate::vmm::devices::SerialOut;
use crate::vmm::monitor::{self, Outcome};
use crate::vmm::termination;
use crate::vmm::{Guest, Vm, VmConfig, VmError, VmStatus};

/// Errors of `vmsnap run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A `capture=on` drive is not raw, too large or read-only.
    #[error(transparent)]
    Capture(snapshot::capture::CaptureError),
    /// A `--drive` could not be opened.
    #[error("drive '{path}': {source}")]
    OpenDrive {
        /// Image path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: block::Error,
    },
    /// The VM could not be built or started.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The monitor's channel failed.
    #[error("monitor {what}: {source}")]
    Monitor {
        /// The step.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Flushing the drives before exiting failed.
    #[error("flushing the drives: {0}")]
    Flush(#[source] block::Error),
    /// A vCPU stopped on an error.
    #[error("guest stopped: {0}")]
    GuestFailed(String),
    /// `--loadvm` failed.
    #[error("{0}")]
    Loadvm(#[source] snapshot::SnapshotError),
    /// `--incoming` could not listen.
    #[error("{0}")]
    Incoming(#[source] migrate::uri::UriError),
    /// `vmsnap restore` refused the checkpoint or could not load it.
    #[error(transparent)]
    Restore(Box<super::checkpoint::restore::RestoreError>),
}

/// One `--drive file=IMAGE[,format=raw|qcow2][,readonly=on][,capture=on]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveSpec {
    /// Image path.
    pub file: PathBuf,
    /// Forced format; probed when absent.
    pub format: Option<Format>,
    /// Open read-only.
    pub readonly: bool,
    /// Keep the whole contents in the VM state on savevm, write them back on loadvm (raw
    /// drives of at most 64 MiB; beyond QEMU).
    pub capture: bool,
}

fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        other => Err(format!("{key}='{other}': expected on or off")),
    }
}

impl FromStr for DriveSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut file = None;
        let mut format = None;
        let mut readonly = false;
        let mut capture = false;
        for opt in s.split(',') {
            let (k, v) = opt
                .split_once('=')
                .ok_or_else(|| format!("drive option '{opt}' is not key=value"))?;
            match k {
                "file" => file = Some(PathBuf::from(v)),
                "format" => format = Some(v.parse::<Format>().map_err(|e| e.to_string())?),
                "readonly" => readonly = on_off(k, v)?,
                "capture" => capture = on_off(k, v)?,
                other => return Err(format!("unknown drive option '{other}'")),
            }
        }
        let file = file.ok_or("drive needs file=IMAGE")?;
        if capture && format.is_some_and(|f| f != Format::Raw) {
            return Err("capture=on needs format=raw".to_string());
        }
        Ok(DriveSpec {
            file,
            format,
            readonly,
            capture,
        })
    }
}

/// A memory size: bytes, or with a K, M or G suffix (binary units, like QEMU's `-m`; a bare
/// number means MiB as in QEMU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemSize(pub u64);

impl FromStr for MemSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (digits, shift) = match s.as_bytes().last() {
            Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
            Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
            Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
            _ => (s, 20),
        };
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("invalid memory size '{s}'"))?;
        n.checked_mul(1 << shift)
            .map(MemSize)
            .ok_or_else(|| format!("memory size '{s}' is too large"))
    }
}

/// `--serial stdio|file:PATH|none`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialSpec {
    /// Standard output.
    Stdio,
    /// A file (truncated).
    File(PathBuf),
    /// Discard.
    None,
}

impl FromStr for SerialSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdio" => Ok(SerialSpec::Stdio),
            "none" | "null" => Ok(SerialSpec::None),
            _ => s
                .strip_prefix("file:")
                .map(|p| SerialSpec::File(PathBuf::from(p)))
                .ok_or_else(|| format!("unknown serial backend '{s}' (stdio, file:PATH, none)")),
        }
    }
}

/// `--monitor stdio|unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonitorSpec {
    /// Commands on standard input, replies on standard output.
    Stdio,
    /// A Unix socket server; connections are served one after the other.
    Unix(PathBuf),
}

impl FromStr for MonitorSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "stdio" {
            return Ok(MonitorSpec::Stdio);
        }
        s.strip_prefix("unix:")
            .map(|p| MonitorSpec::Unix(PathBuf::from(p.split(',').next().unwrap_or(p))))
            .ok_or_else(|| format!("unknown monitor backend '{s}' (stdio, unix:PATH)"))
    }
}

/// Arguments of `vmsnap run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// A disk: `file=IMAGE[,format=raw|qcow2][,readonly=on][,capture=on]`. Repeat for more
    /// disks. `capture=on` (raw, at most 64 MiB): savevm keeps the drive's contents in the VM
    /// state and loadvm writes them back.
    #[arg(long = "drive", value_name = "SPEC")]
    pub drives: Vec<DriveSpec>,
    /// Built-in guest to boot.
    #[arg(long, default_value = "counter")]
    pub guest: Guest,
    /// Resume from this snapshot (of every disk) instead of booting.
    #[arg(long, value_name = "TAG")]
    pub loadvm: Option<String>,
    /// How --loadvm brings RAM in: lazy (resume first, fill on demand and in the
    /// background; needs a snapshot saved by this vmsnap, else eager) or eager.
    #[arg(long, value_name = "MODE", default_value = "lazy")]
    pub loadvm_mode: snapshot::lazy::LoadMode,
    /// Guest RAM (e.g. 64M, 1G; a bare number is MiB).
    #[arg(long, short = 'm', default_value = "64M")]
    pub memory: MemSize,
    /// Fill guest RAM from this file before the guest image is loaded (the file must be
    /// exactly the RAM size; a private copy, like QEMU's `memory-backend-file,share=off`).
    #[arg(long, value_name = "FILE")]
    pub mem_path: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub smp: usize,
    /// Serial console backend: stdio, file:PATH or none.
    #[arg(long, default_value = "stdio")]
    pub serial: SerialSpec,
    /// Monitor: stdio or unix:PATH. Without one, the VM runs until a vCPU fails or SIGINT/SIGTERM.
    #[arg(long)]
    pub monitor: Option<MonitorSpec>,
    /// Make the counter guest dirty this many MiB of RAM per second (0 = off), spread over
    /// all RAM from 2 MiB up. A restored state (--loadvm, --incoming) brings its own setting.
    #[arg(long, value_name = "MIB", default_value_t = 0)]
    pub dirty_rate: u64,
    /// Wait for a live migration stream (tcp:HOST:PORT, unix:PATH, exec:CMD, file:PATH),
    /// load it and run the guest from there. The drives are the source's (shared storage):
    /// they are opened without locks until the stream is loaded.
    #[arg(long, value_name = "URI", conflicts_with = "loadvm")]
    pub incoming: Option<MigrateUri>,
}

/// Runs `vmsnap run`; returns the exit code.
pub fn run_command(args: RunArgs) -> Result<i32, RunError> {
    run_prepared(args, Prepare::default())
}

/// A state loaded into the built VM before it starts (`vmsnap restore`).
pub type LoadFn<'a> = Box<dyn FnOnce(&Vm) -> Result<(), RunError> + 'a>;

/// What happens between building the VM and starting it.
#[derive(Default)]
pub struct Prepare<'a> {
    /// Loads a state into the paused VM.
    pub load: Option<LoadFn<'a>>,
    /// Leave the VM paused (it waits for `cont`).
    pub paused: bool,
}

impl std::fmt::Debug for Prepare<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepare")
            .field("load", &self.load.is_some())
            .field("paused", &self.paused)
            .finish()
    }
}

/// [`run_command`] with `prepare`'s load step before the guest starts.
pub fn run_prepared(args: RunArgs, prepare: Prepare<'_>) -> Result<i32, RunError> {
    let mut drives = Vec::with_capacity(args.drives.len());
    let mut captured = Vec::new();
    let incoming = args.incoming.is_some();
    for (i, d) in args.drives.iter().enumerate() {
        // An incoming VM opens its drives "inactive" (no locks, read-only) until it has
        // the whole stream: the source still runs on them.
        let opts = OpenOptions {
            read_only: d.readonly || incoming,
            format: d.format,
            force_share: incoming,
        };
        let drive = block::open_image(&d.file, opts).map_err(|source| RunError::OpenDrive {
            path: d.file.clone(),
            source,
        })?;
        if d.capture {
            snapshot::capture::check(drive.as_ref(), &d.file.display().to_string())
                .map_err(RunError::Capture)?;
            captured.push(i);
        }
        drives.push(drive);
    }
    let serial = match &args.serial {
        SerialSpec::Stdio => SerialOut::Stdout,
        SerialSpec::File(p) => SerialOut::File(p.clone()),
        SerialSpec::None => SerialOut::Sink,
    };
    let config = VmConfig {
        mem_size: args.memory.0,
        vcpus: args.smp,
        drives,
        serial,
        guest: args.guest,
    };
    let mut vm = Vm::new_with_ram_file(config, args.mem_path.as_deref())?;
    vm.set_captured_drives(captured);
    if args.dirty_rate != 0 {
        crate::vmm::guest::counter::set_dirty_rate(vm.guest_memory(), args.dirty_rate)
            .map_err(VmError::from)?;
    }
    termination::install().map_err(|source| RunError::Monitor {
        what: "installing the SIGINT/SIGTERM handler",
        source,
    })?;
    if let Some(tag) = &args.loadvm {
        let paths = drive_paths(args.drives.iter().map(|d| (&d.file, d.format)));
        timed("loadvm", |p| {
            snapshot::lazy::loadvm(&vm, tag, args.loadvm_mode, &paths, p)
        })
        .map_err(RunError::Loadvm)?;
    }
    if let Some(load) = prepare.load {
        load(&vm)?;
    }
    let reopen: Vec<DriveOpen> = args
        .drives
        .iter()
        .map(|d| DriveOpen {
            path: d.file.clone(),
            format: d.format,
            read_only: d.readonly,
        })
        .collect();
    let mig = Migrator::new(reopen);
    let listener = match &args.incoming {
        Some(uri) => {
            mig.set_drives_inactive(true);
            vm.set_pause_reason(Some("inmigrate"));
            let listener = Listener::bind(uri).map_err(RunError::Incoming)?;
            migrate::incoming::announce(&listener, &mig);
            Some(listener)
        }
        None => {
            if !prepare.paused {
                vm.start();
            }
            None
        }
    };
    let cx = Cx { vm: &vm, mig: &mig };
    let done = AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        s.spawn(|| watch_termination(cx, &done));
        s.spawn(|| mig.serve(&vm));
        if let Some(l) = listener {
            s.spawn(|| receive(cx, l));
        }
        let r = match &args.monitor {
            None => wait_for_failure(&vm),
            Some(MonitorSpec::Stdio) => {
                let stdin = std::io::stdin();
                serve(cx, stdin.lock(), std::io::stdout(), true).map(|()| 0)
            }
            Some(MonitorSpec::Unix(path)) => serve_unix(cx, path).map(|()| 0),
        };
        done.store(true, Ordering::SeqCst);
        mig.shutdown();
        if r.is_ok() && vm.pause_reason() == Some("inmigrate") {
            // Quit before the stream was in: the receiving thread may be blocked in
            // accept or read, and the drives were never opened writable.
            eprintln!("vmsnap: quitting before the incoming migration completed");
            std::process::exit(0);
        }
        r
    });
    let flushed = stop_and_flush(cx);
    vm.shutdown();
    if let VmStatus::Failed(why) = vm.status() {
        return Err(RunError::GuestFailed(why));
    }
    flushed?;
    result
}

/// What the monitor acts on: the VM and its migration state.
#[derive(Debug, Clone, Copy)]
pub struct Cx<'a> {
    /// The VM.
    pub vm: &'a Vm,
    /// Its migration state.
    pub mig: &'a Migrator,
}

/// The incoming migration thread: a failed or partial stream ends the process with a
/// non-zero status before the guest ever runs (as QEMU does).
fn receive(cx: Cx<'_>, listener: Listener) {
    match migrate::incoming::run(cx.vm, listener, cx.mig) {
        Ok(report) => {
            cx.mig.set_drives_inactive(false);
            eprintln!(
                "vmsnap: incoming migration loaded {} MiB in {} ms",
                report.bytes >> 20,
                report.load.as_millis()
            );
        }
        Err(e) => {
            eprintln!("vmsnap: {e}");
            std::process::exit(1);
        }
    }
}

/// Stops the vCPUs and flushes every drive, as QEMU does before exiting (drives handed
/// over to a migration destination are not touched).
fn stop_and_flush(cx: Cx<'_>) -> Result<(), RunError> {
    // A VM whose vCPUs already failed still gets its disks flushed.
    let _ = cx.vm.pause();
    if cx.mig.drives_inactive() {
        return Ok(());
    }
    cx.vm.flush_drives().map_err(RunError::Flush)
}

/// On SIGINT/SIGTERM: stop, flush, exit 0 (QEMU: "terminating on signal").
fn watch_termination(cx: Cx<'_>, done: &AtomicBool) {
    while !done.load(Ordering::SeqCst) {
        if termination::requested() {
            let code = match stop_and_flush(cx) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("vmsnap: {e}");
                    1
                }
            };
            eprintln!("vmsnap: terminating on signal");
            std::process::exit(code);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for_failure(vm: &Vm) -> Result<i32, RunError> {
    loop {
        if let VmStatus::Failed(why) = vm.status() {
            return Err(RunError::GuestFailed(why));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Serves monitor commands from `input` until `quit` or end of input (which also quits).
fn serve(
    cx: Cx<'_>,
    input: impl BufRead,
    mut out: impl Write,
    prompt: bool,
) -> Result<(), RunError> {
    let io = |what| move |source| RunError::Monitor { what, source };
    writeln!(out, "vmsnap monitor - type 'help' for more information").map_err(io("write"))?;
    let mut lines = input.lines();
    loop {
        if prompt {
            write!(out, "(vmsnap) ").map_err(io("write"))?;
        }
        out.flush().map_err(io("flush"))?;
        let Some(line) = lines.next() else {
            return Ok(());
        };
        let line = line.map_err(io("read"))?;
        let (reply, quit) = match execute(cx, &line) {
            Outcome::Continue(r) => (r, false),
            Outcome::Quit(r) => (r, true),
        };
        if !reply.is_empty() {
            writeln!(out, "{reply}").map_err(io("write"))?;
        }
        if quit {
            out.flush().map_err(io("flush"))?;
            return Ok(());
        }
    }
}

/// The drives' paths for a lazy loadvm's own open of the VM-state image.
fn drive_paths<'a>(
    drives: impl Iterator<Item = (&'a PathBuf, Option<Format>)>,
) -> Vec<snapshot::lazy::DrivePath> {
    drives
        .map(|(path, format)| snapshot::lazy::DrivePath {
            path: path.clone(),
            format,
        })
        .collect()
}

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
migrate [-d] uri -- migrate to URI (tcp:HOST:PORT, unix:PATH, exec:CMD, file:PATH); -d: do not wait
migrate_cancel -- cancel the current VM migration
migrate_set_parameter parameter value -- set a migration parameter (max-bandwidth, downtime-limit, ...)
migrate_set_capability capability state -- enable or disable a migration capability
info migrate -- show migration status
info migrate_parameters -- show current migration parameters
info migrate_capabilities -- show current migration capabilities";

/// `migrate [-d] URI`: the URI is the rest of the line (an exec command may have spaces),
/// optionally in double quotes.
fn migrate_command(cx: Cx<'_>, rest: &str) -> String {
    let rest = rest.trim();
    let (detach, uri) = match rest.strip_prefix("-d") {
        Some(u) if u.starts_with(char::is_whitespace) => (true, u.trim()),
        _ => (false, rest),
    };
    let uri = uri
        .strip_prefix('"')
        .and_then(|u| u.strip_suffix('"'))
        .unwrap_or(uri);
    if uri.is_empty() {
        return "Parameter 'uri' is missing".to_string();
    }
    if let Err(e) = cx.mig.start(uri) {
        return format!("Error: {e}");
    }
    if detach {
        return String::new();
    }
    match cx.mig.wait().status {
        migrate::Status::Failed(why) => format!("Error: {why}"),
        migrate::Status::Cancelled => "Error: migration cancelled".to_string(),
        _ => String::new(),
    }
}

/// Migration commands, or None for other lines.
fn execute_migrate(cx: Cx<'_>, line: &str, words: &[&str]) -> Option<Result<String, String>> {
    let err = |e: migrate::CommandError| format!("Error: {e}");
    Some(match words {
        ["migrate", ..] if cx.vm.pause_reason() == Some("inmigrate") => {
            Err("Error: the guest is still being received (incoming migration)".to_string())
        }
        ["migrate", ..] => {
            let rest = line.trim_start().strip_prefix("migrate").unwrap_or("");
            Ok(migrate_command(cx, rest))
        }
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
        ["info", "migrate_parameters"] => Ok(cx.mig.parameters().to_hmp()),
        ["info", "migrate_capabilities"] => Ok(cx.mig.capabilities().to_hmp()),
        ["cont" | "c"] if cx.vm.pause_reason() == Some("inmigrate") => {
            Err("Error: the guest starts once the incoming migration is loaded".to_string())
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
            Ok(format!("{base}\n{SNAPSHOT_HELP}\n{MIGRATE_HELP}"))
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
pub(crate) fn timed<T>(
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

fn serve_unix(cx: Cx<'_>, path: &std::path::Path) -> Result<(), RunError> {
    let io = |what| move |source| RunError::Monitor { what, source };
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(io("bind"))?;
    let result = loop {
        let (stream, _) = match listener.accept() {
            Ok(c) => c,
            Err(e) => break Err(io("accept")(e)),
        };
        let reader = match stream.try_clone() {
            Ok(r) => BufReader::new(r),
            Err(e) => break Err(io("accept")(e)),
        };
        // A client that merely disconnects leaves the VM running for the next one.
        let mut quit = false;
        let mut lines = reader.lines();
        let mut w = &stream;
        let _ = writeln!(w, "vmsnap monitor - type 'help' for more information");
        while let Some(Ok(line)) = lines.next() {
            let (reply, q) = match execute(cx, &line) {
                Outcome::Continue(r) => (r, false),
                Outcome::Quit(r) => (r, true),
            };
            if !reply.is_empty() {
                let _ = writeln!(w, "{reply}");
            }
            if q {
                quit = true;
                break;
            }
        }
        if quit {
            break Ok(());
        }
    };
    let _ = std::fs::remove_file(path);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drive_specs_parse() {
        let d: DriveSpec = "file=/tmp/a.qcow2,format=qcow2,readonly=on"
            .parse()
            .unwrap();
        assert_eq!(d.file, PathBuf::from("/tmp/a.qcow2"));
        assert_eq!(d.format, Some(Format::Qcow2));
        assert!(d.readonly);
        let d: DriveSpec = "file=x".parse().unwrap();
        assert_eq!((d.format, d.readonly, d.capture), (None, false, false));
        let d: DriveSpec = "file=v.raw,format=raw,capture=on".parse().unwrap();
        assert!(d.capture);
        assert!("file=x,format=qcow2,capture=on"
            .parse::<DriveSpec>()
            .unwrap_err()
            .contains("capture=on needs format=raw"));
        assert!("format=raw"
            .parse::<DriveSpec>()
            .unwrap_err()
            .contains("file=IMAGE"));
        assert!("file=x,cache=none"
            .parse::<DriveSpec>()
            .unwrap_err()
            .contains("cache"));
        assert!("file=x,readonly=maybe"
            .parse::<DriveSpec>()
            .unwrap_err()
            .contains("maybe"));
        assert!("file=x,format=vmdk".parse::<DriveSpec>().is_err());
    }

    #[test]
    fn memory_sizes_parse() {
        assert_eq!("64M".parse::<MemSize>().unwrap(), MemSize(64 << 20));
        assert_eq!("1G".parse::<MemSize>().unwrap(), MemSize(1 << 30));
        assert_eq!("512k".parse::<MemSize>().unwrap(), MemSize(512 << 10));
        assert_eq!("16".parse::<MemSize>().unwrap(), MemSize(16 << 20));
        assert!("lots".parse::<MemSize>().unwrap_err().contains("lots"));
        assert!("99999999999999G".parse::<MemSize>().is_err());
    }

    #[test]
    fn serial_and_monitor_specs_parse() {
        assert_eq!("stdio".parse::<SerialSpec>().unwrap(), SerialSpec::Stdio);
        assert_eq!(
            "file:/tmp/s".parse::<SerialSpec>().unwrap(),
            SerialSpec::File("/tmp/s".into())
        );
        assert!("pty".parse::<SerialSpec>().is_err());
        assert_eq!(
            "unix:/tmp/m,server,nowait".parse::<MonitorSpec>().unwrap(),
            MonitorSpec::Unix("/tmp/m".into())
        );
        assert!("tcp:1".parse::<MonitorSpec>().is_err());
    }
}
