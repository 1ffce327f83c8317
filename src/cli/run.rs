//! `vmsnap run`: boot a built-in guest under KVM with disks, a serial console and a monitor.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::block::{self, Format, OpenOptions};
use crate::migrate::{self, uri::Listener, DriveOpen, MigrateUri, Migrator};
use crate::monitor::{self, drive_paths, Cx};
use crate::snapshot;
use crate::vmm::devices::SerialOut;
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
    /// Serving the monitor failed.
    #[error(transparent)]
    Serve(#[from] monitor::MonitorError),
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

/// One `--drive file=IMAGE[,format=raw|qcow2][,readonly=on][,capture=on][,reconnect-delay=SECS]`.
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
    /// The QMP node name (`drive<i>` when absent).
    pub node_name: Option<String>,
    /// An incoming migration that carries this drive (`migrate -b`) may replace the
    /// existing non-empty image (`overwrite=on`).
    pub overwrite: bool,
    /// For an NBD export: how long a lost connection is dialed again (QEMU's
    /// `reconnect-delay`, seconds; `formats/nbd.md`).
    pub reconnect_delay: Option<std::time::Duration>,
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
        let mut node_name = None;
        let mut overwrite = false;
        let mut reconnect_delay = None;
        for opt in s.split(',') {
            let (k, v) = opt
                .split_once('=')
                .ok_or_else(|| format!("drive option '{opt}' is not key=value"))?;
            match k {
                "file" => file = Some(PathBuf::from(v)),
                "format" => format = Some(v.parse::<Format>().map_err(|e| e.to_string())?),
                "readonly" => readonly = on_off(k, v)?,
                "capture" => capture = on_off(k, v)?,
                "node-name" => node_name = Some(v.to_string()),
                "overwrite" => overwrite = on_off(k, v)?,
                "reconnect-delay" => {
                    let secs = v
                        .parse::<u32>()
                        .ok()
                        .filter(|s| *s <= 3600)
                        .ok_or_else(|| {
                            format!("reconnect-delay='{v}': expected whole seconds, 0 to 3600")
                        })?;
                    reconnect_delay = Some(std::time::Duration::from_secs(secs.into()));
                }
                other => return Err(format!("unknown drive option '{other}'")),
            }
        }
        let file: PathBuf = file.ok_or("drive needs file=IMAGE")?;
        if reconnect_delay.is_some() && !crate::block::storage::is_nbd(&file) {
            return Err("reconnect-delay is for NBD exports (file=nbd://… or nbd+unix://…)".into());
        }
        if capture && format.is_some_and(|f| f != Format::Raw) {
            return Err("capture=on needs format=raw".to_string());
        }
        Ok(DriveSpec {
            file,
            format,
            readonly,
            capture,
            node_name,
            overwrite,
            reconnect_delay,
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

/// `--incoming URI` or `--incoming defer` (QEMU's syntax).
#[derive(Debug, Clone)]
pub enum IncomingSpec {
    /// Wait for QMP's `migrate-incoming URI`.
    Defer,
    /// Listen on this URI at once.
    Uri(MigrateUri),
}

impl FromStr for IncomingSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "defer" {
            return Ok(IncomingSpec::Defer);
        }
        s.parse()
            .map(IncomingSpec::Uri)
            .map_err(|e: migrate::uri::UriError| e.to_string())
    }
}

/// Arguments of `vmsnap run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// A disk: `file=IMAGE[,format=raw|qcow2][,readonly=on][,capture=on][,node-name=NAME]
    /// [,reconnect-delay=SECS]` (NAME is the QMP node name, `drive<i>` by default). Repeat for
    /// more disks. `capture=on` (raw, at most 64 MiB): savevm keeps the drive's contents in
    /// the VM state and loadvm writes them back. `reconnect-delay` (NBD exports): a lost
    /// connection is dialed again for that long; writes go on only if everything written
    /// before the loss had been flushed (formats/nbd.md).
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
    /// QMP server: `unix:PATH[,server=on,wait=off]` or `tcp:HOST:PORT[,server=on,wait=off]`
    /// (QEMU's `-qmp` syntax; the VM never waits for a client).
    #[arg(long, value_name = "SPEC")]
    pub qmp: Option<monitor::qmp::QmpSpec>,
    /// Make the counter guest dirty this many MiB of RAM per second (0 = off), spread over
    /// all RAM from 2 MiB up. A restored state (--loadvm, --incoming) brings its own setting.
    #[arg(long, value_name = "MIB", default_value_t = 0)]
    pub dirty_rate: u64,
    /// With --dirty-rate: the counter guest stores into the first BYTES of each page it
    /// dirties (a multiple of 8 up to 4096; default 8). XBZRLE sends only the changed bytes of
    /// a page sent before, so this sets how much it saves.
    #[arg(long, value_name = "BYTES", requires = "dirty_rate")]
    pub dirty_span: Option<u64>,
    /// Wait for a live migration stream (tcp:HOST:PORT, unix:PATH, exec:CMD, file:PATH),
    /// load it and run the guest from there. The drives are the source's (shared storage):
    /// they are opened without locks until the stream is loaded. `defer`: the URI comes
    /// later, from QMP's `migrate-incoming`.
    #[arg(long, value_name = "URI", conflicts_with = "loadvm")]
    pub incoming: Option<IncomingSpec>,
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
    for d in &args.drives {
        if let (Some(delay), Some(uri)) = (d.reconnect_delay, d.file.to_str()) {
            crate::block::storage::set_reconnect_delay(uri, delay);
        }
    }
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
        let drive = if incoming && migrate::block::recv::arrives(&d.file) {
            // No image yet: a migration that carries its disks (`migrate -b`) creates it.
            Box::new(block::absent::Absent)
        } else {
            block::open_image(&d.file, opts).map_err(|source| RunError::OpenDrive {
                path: d.file.clone(),
                source,
            })?
        };
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
    if let Some(bytes) = args.dirty_span {
        crate::vmm::guest::counter::set_dirty_span(vm.guest_memory(), bytes)
            .map_err(VmError::from)?;
    }
    termination::install().map_err(|source| RunError::Monitor {
        what: "installing the SIGINT/SIGTERM handler",
        source,
    })?;
    if let Some(tag) = &args.loadvm {
        let paths = drive_paths(args.drives.iter().map(|d| (&d.file, d.format)));
        monitor::hmp::timed("loadvm", |p| {
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
            overwrite: d.overwrite,
        })
        .collect();
    let mig = Migrator::new(reopen);
    let listener = match &args.incoming {
        Some(spec) => {
            mig.set_drives_inactive(true);
            vm.set_pause_reason(Some("inmigrate"));
            match spec {
                IncomingSpec::Uri(uri) => {
                    let listener = Listener::bind(uri).map_err(RunError::Incoming)?;
                    migrate::incoming::announce(&listener, &mig);
                    Some(listener)
                }
                IncomingSpec::Defer => {
                    monitor::incoming::defer();
                    None
                }
            }
        }
        None => {
            if !prepare.paused {
                vm.start();
            }
            None
        }
    };
    let nodes: Vec<String> = args
        .drives
        .iter()
        .map(|d| d.node_name.clone().unwrap_or_default())
        .collect();
    let cx = Cx {
        vm: &vm,
        mig: &mig,
        nodes: &nodes,
    };
    let qmp = match &args.qmp {
        Some(spec) => Some(monitor::qmp::QmpListener::bind(spec)?),
        None => None,
    };
    let done = AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        s.spawn(|| watch_termination(cx, &done));
        s.spawn(|| mig.serve(&vm));
        if let Some(l) = qmp {
            s.spawn(|| monitor::qmp::serve(cx, l, &done));
        }
        if let Some(l) = listener {
            s.spawn(|| monitor::incoming::receive(cx, l));
        }
        let r = match &args.monitor {
            None => wait_for_failure(&vm),
            Some(MonitorSpec::Stdio) => {
                let stdin = std::io::stdin();
                monitor::serve::serve(cx, stdin.lock(), std::io::stdout(), true)
                    .map(|()| 0)
                    .map_err(RunError::from)
            }
            Some(MonitorSpec::Unix(path)) => monitor::serve::serve_unix(cx, path)
                .map(|()| 0)
                .map_err(RunError::from),
        };
        done.store(true, Ordering::SeqCst);
        mig.shutdown();
        if r.is_ok() && vm.pause_reason() == Some("inmigrate") {
            // Quit before the stream was in: the receiving thread may be blocked in
            // accept or read, and the drives were never opened writable.
            eprintln!("vmsnap: quitting before the incoming migration completed");
            std::process::exit(0);
        }
        if let Some(why) = mig.incoming_postcopy_interrupted() {
            // The receiving thread waits for migrate_recover, the vCPUs for missing pages:
            // the guest cannot run on here, so it is lost; keep what it wrote to its disks.
            let _ = stop_and_flush(cx);
            eprintln!("vmsnap: quitting with postcopy paused ({why}): the guest's RAM is incomplete, the VM is lost");
            std::process::exit(1);
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

/// Stops the vCPUs and flushes every drive before exiting.
fn stop_and_flush(cx: Cx<'_>) -> Result<(), RunError> {
    monitor::stop_and_flush(cx).map_err(RunError::Flush)
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
        let d: DriveSpec = "file=x,node-name=disk0".parse().unwrap();
        assert_eq!(d.node_name.as_deref(), Some("disk0"));
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
        let d: DriveSpec = "file=nbd+unix:///?socket=/run/s,reconnect-delay=5"
            .parse()
            .unwrap();
        assert_eq!(d.reconnect_delay, Some(std::time::Duration::from_secs(5)));
        assert!("file=x.qcow2,reconnect-delay=5"
            .parse::<DriveSpec>()
            .unwrap_err()
            .contains("for NBD exports"));
        assert!("file=nbd://h/e,reconnect-delay=soon"
            .parse::<DriveSpec>()
            .unwrap_err()
            .contains("whole seconds"));
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
