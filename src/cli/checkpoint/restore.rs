//! `vmsnap restore FILE`: rebuilds the VM from a checkpoint alone and resumes it.
//!
//! ```text
//!  open FILE (magic, version, flags, lengths, configuration) → CRC32 of the whole file →
//!  --drive-path → every drive there, of its size, with the -c snapshot → guest RAM fits the
//!  host → build the VM as `vmsnap run` does (drives opened with locks) → parse the stream
//!  against the VM (nothing loaded) → revert the -c drives (unless --keep-disks) → capture=on
//!  drives written back → RAM and devices loaded → resume, or wait for `cont` (--paused)
//! ```
//!
//! Everything that can refuse does so before a vCPU runs and before an image changes.

use std::io::BufReader;
use std::path::{Path, PathBuf};

use clap::Args;

use crate::block::{self, Format, OpenOptions};
use crate::interop::checkpoint::{Checkpoint, CheckpointConfig, CheckpointError};
use crate::snapshot::progress::Counting;
use crate::snapshot::{capture, disks, state_io, ProgressFn, SnapshotError};
use crate::vmm::Vm;

use super::super::run::{
    run_prepared, DriveSpec, MemSize, MonitorSpec, Prepare, RunArgs, RunError, SerialSpec,
};

/// Arguments of `vmsnap restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The checkpoint file (`save FILE` on the monitor).
    pub file: PathBuf,
    /// Do not resume: wait for `cont` on the monitor (as `xl restore -p`).
    #[arg(long, short = 'p')]
    pub paused: bool,
    /// Serial console backend: stdio, file:PATH or none.
    #[arg(long, default_value = "stdio")]
    pub serial: SerialSpec,
    /// Monitor: stdio or unix:PATH.
    #[arg(long)]
    pub monitor: Option<MonitorSpec>,
    /// QMP server, as `vmsnap run --qmp` (`unix:PATH[,server=on,wait=off]`, `tcp:HOST:PORT`).
    #[arg(long, value_name = "SPEC")]
    pub qmp: Option<crate::monitor::qmp::QmpSpec>,
    /// Leave the drives of a `save -c` checkpoint as they are now instead of reverting them to
    /// the checkpoint's disk snapshot (the guest then finds disks that moved on without it).
    #[arg(long)]
    pub keep_disks: bool,
    /// A drive that moved: the checkpoint's path OLD is opened at NEW. Repeatable.
    #[arg(long = "drive-path", value_name = "OLD=NEW")]
    pub drive_path: Vec<String>,
}

/// Errors of `vmsnap restore` before the VM is built, and of loading its state.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The file is not a usable checkpoint.
    #[error(transparent)]
    File(#[from] CheckpointError),
    /// A `--drive-path` is malformed or names no drive of the checkpoint.
    #[error("--drive-path '{0}': {1}")]
    DrivePath(String, &'static str),
    /// The configuration names something this vmsnap does not have.
    #[error("checkpoint '{path}': {what}")]
    Config {
        /// The file.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// A drive is missing.
    #[error("drive {index} '{file}' of the checkpoint is missing (use --drive-path OLD=NEW if it moved)")]
    MissingDrive {
        /// Drive index.
        index: usize,
        /// Its path.
        file: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A drive could not be opened (locked by another process, damaged).
    #[error("drive {index} '{file}'")]
    OpenDrive {
        /// Drive index.
        index: usize,
        /// Its path.
        file: String,
        /// The cause.
        #[source]
        source: block::Error,
    },
    /// A drive's size is not the checkpoint's.
    #[error("drive {index} '{file}' has {actual} bytes, the checkpoint's drive had {expected}")]
    DriveSize {
        /// Drive index.
        index: usize,
        /// Its path.
        file: String,
        /// Size now.
        actual: u64,
        /// Size in the checkpoint.
        expected: u64,
    },
    /// A `save -c` drive lacks the checkpoint's disk snapshot.
    #[error("drive {index} '{file}' has no snapshot '{tag}' (the disks of the checkpoint's instant); --keep-disks restores without it")]
    NoDiskSnapshot {
        /// Drive index.
        index: usize,
        /// Its path.
        file: String,
        /// The snapshot.
        tag: String,
    },
    /// The guest's RAM is more than the host has.
    #[error("the checkpoint's guest has {need} MiB of RAM, more than this host's {have} MiB (MemTotal in /proc/meminfo)")]
    Memory {
        /// MiB needed.
        need: u64,
        /// MiB the host has.
        have: u64,
    },
    /// The VM state does not fit the VM, or a drive step failed.
    #[error(transparent)]
    Load(#[from] SnapshotError),
}

/// Runs `vmsnap restore`; returns the exit code.
///
/// # Errors
/// [`RunError`]; every refusal of the checkpoint comes before a vCPU runs or an image
/// changes.
pub fn restore_command(args: RestoreArgs) -> Result<i32, RunError> {
    let mut cp = Checkpoint::open(&args.file).map_err(restore_err)?;
    let total = cp.header.covered_len();
    let mut verified = Ok(());
    let _ = crate::monitor::hmp::timed("verify", |p| {
        verified = cp.verify(&mut |done| p(crate::snapshot::Progress { done, total }));
        Ok(())
    });
    verified.map_err(restore_err)?;
    let mut config = cp.config.clone();
    apply_drive_paths(&mut config, &args.drive_path).map_err(restore_err)?;
    let run = run_args(&cp, &config, &args).map_err(restore_err)?;
    check_drives(&config, args.keep_disks).map_err(restore_err)?;
    check_memory(config.memory).map_err(restore_err)?;
    if args.keep_disks {
        if let Some(tag) = &config.disk_snapshot {
            eprintln!(
                "vmsnap: --keep-disks: the drives keep their current contents instead of \
                 snapshot '{tag}' of the checkpoint's instant; the guest finds them as they are"
            );
        }
    }
    let revert = config.disk_snapshot.clone().filter(|_| !args.keep_disks);
    let snapshot_drives: Vec<usize> = config
        .drives
        .iter()
        .enumerate()
        .filter(|(_, d)| d.snapshot)
        .map(|(i, _)| i)
        .collect();
    let load = |vm: &Vm| {
        let mut loaded = Ok(());
        let _ = crate::monitor::hmp::timed("restore", |p| {
            loaded = load(vm, &cp, revert.as_deref(), &snapshot_drives, p);
            Ok(())
        });
        loaded.map_err(restore_err)
    };
    run_prepared(
        run,
        Prepare {
            load: Some(Box::new(load)),
            paused: args.paused,
        },
    )
}

fn restore_err(e: impl Into<RestoreError>) -> RunError {
    RunError::Restore(Box::new(e.into()))
}

/// Applies `--drive-path OLD=NEW`.
fn apply_drive_paths(config: &mut CheckpointConfig, maps: &[String]) -> Result<(), RestoreError> {
    for m in maps {
        let (old, new) = m
            .split_once('=')
            .ok_or_else(|| RestoreError::DrivePath(m.clone(), "expected OLD=NEW"))?;
        let d = config
            .drives
            .iter_mut()
            .find(|d| d.file == old)
            .ok_or_else(|| {
                RestoreError::DrivePath(m.clone(), "no drive of the checkpoint has that path")
            })?;
        d.file = new.to_string();
    }
    Ok(())
}

/// `vmsnap run`'s arguments for the checkpoint's VM.
fn run_args(
    cp: &Checkpoint,
    config: &CheckpointConfig,
    args: &RestoreArgs,
) -> Result<RunArgs, RestoreError> {
    let bad = |what: String| RestoreError::Config {
        path: cp.path().to_string(),
        what,
    };
    let guest = config.guest.parse().map_err(bad)?;
    let mut drives = Vec::with_capacity(config.drives.len());
    for d in &config.drives {
        drives.push(DriveSpec {
            file: PathBuf::from(&d.file),
            format: Some(d.format.parse::<Format>().map_err(|e| bad(e.to_string()))?),
            readonly: d.readonly,
            capture: d.capture,
            node_name: None,
            overwrite: false,
            reconnect_delay: None,
        });
    }
    Ok(RunArgs {
        drives,
        guest,
        loadvm: None,
        loadvm_mode: crate::snapshot::lazy::LoadMode::Eager,
        memory: MemSize(config.memory),
        mem_path: None,
        smp: config.vcpus,
        serial: args.serial.clone(),
        monitor: args.monitor.clone(),
        qmp: args.qmp.clone(),
        dirty_rate: 0,
        dirty_span: None,
        incoming: None,
    })
}

/// Every drive is there, of its size, and holds the `-c` snapshot (read-only opens, shared:
/// the locks are taken when the VM opens them for real).
fn check_drives(config: &CheckpointConfig, keep_disks: bool) -> Result<(), RestoreError> {
    for (index, d) in config.drives.iter().enumerate() {
        let file = d.file.clone();
        std::fs::metadata(&d.file).map_err(|source| RestoreError::MissingDrive {
            index,
            file: file.clone(),
            source,
        })?;
        let opts = OpenOptions {
            read_only: true,
            format: d.format.parse().ok(),
            force_share: true,
        };
        let mut drv = block::open_image(Path::new(&d.file), opts).map_err(|source| {
            RestoreError::OpenDrive {
                index,
                file: file.clone(),
                source,
            }
        })?;
        if drv.size() != d.size {
            return Err(RestoreError::DriveSize {
                index,
                file,
                actual: drv.size(),
                expected: d.size,
            });
        }
        if let (Some(tag), true, false) = (&config.disk_snapshot, d.snapshot, keep_disks) {
            let has = drv
                .snapshots()
                .is_some_and(|s| s.snapshot_list().iter().any(|i| &i.name == tag));
            if !has {
                return Err(RestoreError::NoDiskSnapshot {
                    index,
                    file,
                    tag: tag.clone(),
                });
            }
        }
    }
    Ok(())
}

/// The host's RAM in bytes (`MemTotal` of /proc/meminfo), if it can be read.
fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn check_memory(need: u64) -> Result<(), RestoreError> {
    match host_memory() {
        Some(have) if need > have => Err(RestoreError::Memory {
            need: need >> 20,
            have: have >> 20,
        }),
        _ => Ok(()),
    }
}

/// Loads the checkpoint into the built, not yet started VM: the stream is parsed against
/// the VM first (nothing changes if it does not fit), then the disks are reverted and the
/// state loaded.
fn load(
    vm: &Vm,
    cp: &Checkpoint,
    revert: Option<&str>,
    snapshot_drives: &[usize],
    progress: ProgressFn<'_>,
) -> Result<(), RestoreError> {
    // Progress over both passes: the total is twice the stream.
    let len = cp.header.stream_len;
    let total = len.saturating_mul(2);
    let (vcpus, ndrives) = (vm.vcpu_count(), vm.drive_count());
    let ram_len = vm.ram().len() as u64;
    let captured = vm.captured_drives();
    let specs = vm
        .with_block_set(|set| capture::specs(set, &captured))
        .map_err(SnapshotError::from)?;
    let mut stream = Counting::new(
        BufReader::with_capacity(1 << 20, cp.stream()?),
        total,
        &mut *progress,
    );
    let checked = state_io::check_state_with(vcpus, ndrives, &specs, ram_len, &mut stream)
        .map_err(SnapshotError::Load)?;
    vm.with_block_set(|set| {
        if let Some(tag) = revert {
            disks::goto(set, snapshot_drives, tag)?;
        }
        capture::write_back(set, &specs, &checked.captured).map_err(SnapshotError::from)
    })?;
    let mut stream = Counting::continuing(
        BufReader::with_capacity(1 << 20, cp.stream()?),
        len,
        total,
        progress,
    );
    let state = vm
        .with_ram_mut(|mem| {
            if !checked.all_ram {
                mem.fill(0);
            }
            state_io::read_state_with(vcpus, ndrives, &specs, mem, &mut stream)
        })
        .map_err(SnapshotError::from)?
        .map_err(SnapshotError::Load)?;
    vm.restore_state(&state.0).map_err(SnapshotError::from)?;
    Ok(())
}
