//! The destination side (`vmsnap run --incoming URI`): wait for the stream with the guest
//! stopped (`inmigrate`) and the disks open without locks, load the whole stream with the
//! same reader loadvm uses, take the disks over, then let the guest run. Nothing of the
//! guest runs before the stream has been read to its end and checked.

use std::time::{Duration, Instant};

use std::io::Read;

use crate::snapshot::state_io::{self, StateIoError, PAGE_SIZE, RAM_BLOCK};
use crate::vmm::page_server::LoadState;
use crate::vmm::{Vm, VmError, VmState};

use super::block::recv::{BlockReceiver, BlockRecvError};
use super::disks::{self, DiskError};
use super::live_ram::IncomingRam;
use super::postcopy;
use super::postcopy_pages::{self, ChannelPages, PostcopyError};
use super::uri::{Listener, UriError};
use super::{Migrator, Status};

/// Why an incoming migration failed.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    /// Accepting the connection, starting the command or opening the file failed.
    #[error(transparent)]
    Channel(#[from] UriError),
    /// The stream was cut short, malformed, or not this VM's.
    #[error("load of migration failed: {0}")]
    Load(#[from] StateIoError),
    /// Applying the loaded state failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Taking the disks over failed (the source still holds them?).
    #[error(transparent)]
    Disks(#[from] DiskError),
    /// Putting the images a block migration carried in place failed.
    #[error(transparent)]
    Block(#[from] BlockRecvError),
    /// The postcopy part could not be read (before the guest ran).
    #[error("load of migration failed: {0}")]
    Postcopy(#[from] PostcopyError),
    /// Postcopy failed after the guest started here: it is stopped, its RAM incomplete.
    #[error("postcopy migration failed: {0}")]
    PostcopyLost(String),
}

/// How the incoming migration went.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// From accepting the channel to the end of the stream.
    pub load: Duration,
    /// Bytes read.
    pub bytes: u64,
}

/// Most bytes read after the end of the stream before closing (an orderly close lets the
/// source know the stream was taken whole).
const DRAIN_LIMIT: u64 = 64 << 20;

struct Counting<R>(R, u64);

impl<R: std::io::Read> std::io::Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        self.1 += n as u64;
        Ok(n)
    }
}

/// Reads a whole migration stream: the sections savevm writes (`state_io`'s layout and
/// machine name), RAM into `ram` with [`IncomingRam`], carried disks into `block`.
fn read_stream(
    vcpus: usize,
    drives: usize,
    ram: &mut [u8],
    block: &mut BlockReceiver,
    input: &mut dyn Read,
) -> Result<VmState, StateIoError> {
    let mut ram = IncomingRam::new(RAM_BLOCK, ram, PAGE_SIZE).skip_untouched();
    let extra: state_io::ExtraSection<'_> = (super::block::IDSTR, super::block::VERSION, block);
    let (state, _) = state_io::load_with_extra(vcpus, drives, &[], &mut ram, Some(extra), input)?;
    Ok(state)
}

/// Shows the listening socket in the destination's `info migrate`, as QEMU's does while it
/// waits. Called before the monitor answers, so that its first `info migrate` has it.
pub fn announce(listener: &Listener, mig: &Migrator) {
    mig.set_incoming(Status::None, listener.socket_address());
}

/// Accepts the stream on `listener` (already [`announce`]d), loads it into the paused `vm`,
/// activates the drives and resumes the guest.
/// The destination's `info migrate` follows in `mig`: `active` while loading, `completed`
/// once the guest runs (or `failed`).
pub fn run(vm: &Vm, listener: Listener, mig: &Migrator) -> Result<Report, IncomingError> {
    let socket = listener.socket_address();
    let r = receive(vm, listener, mig, || {
        mig.set_incoming(Status::Active, socket.clone())
    });
    match &r {
        Ok(_) => mig.set_incoming(Status::Completed, None),
        Err(e) => mig.set_incoming(Status::Failed(e.to_string()), None),
    }
    r
}

fn receive(
    vm: &Vm,
    listener: Listener,
    mig: &Migrator,
    accepted: impl FnOnce(),
) -> Result<Report, IncomingError> {
    let drives = mig.drives();
    vm.set_pause_reason(Some("inmigrate"));
    let channel = listener.accept()?;
    accepted();
    // postcopy-ram on: offer the return path at once (the source waits for it).
    let rp = match channel.return_path() {
        Some(w) if mig.capabilities().postcopy_ram() => {
            let mut w = w.map_err(PostcopyError::Io)?;
            postcopy_pages::send(&mut *w, postcopy::RP_ADVISE, 0).map_err(PostcopyError::Io)?;
            Some(w)
        }
        _ => None,
    };
    crate::killpoint::at("incoming:accepted");
    let start = Instant::now();
    let (vcpus, ndrives) = (vm.vcpu_count(), vm.drive_count());
    let mut input = Counting(channel, 0);
    // Images a block migration carries are built aside and removed if anything fails.
    let mut block = BlockReceiver::new(drives);
    let state =
        vm.with_ram_mut(|ram| read_stream(vcpus, ndrives, ram, &mut block, &mut input))??;
    let load = start.elapsed();
    let bytes = input.1;
    if let Some(mut w) = rp {
        postcopy_pages::send(&mut *w, postcopy::RP_LOADED, 0).map_err(PostcopyError::Io)?;
        let ram_len = vm.ram().len() as u64;
        if let Some(missing) = postcopy_pages::read_header(&mut input, ram_len / PAGE_SIZE)? {
            let pages = ChannelPages::new(Box::new(input), w, ram_len, &missing);
            postcopy_run(vm, mig, &state, missing, pages)?;
            return Ok(Report { load, bytes });
        }
    }
    input.0.close(DRAIN_LIMIT);
    crate::killpoint::at("incoming:loaded");
    vm.restore_state(&state)?;
    block.finish()?;
    disks::activate(vm, drives)?;
    crate::killpoint::at("incoming:activated");
    vm.set_pause_reason(None);
    vm.resume();
    Ok(Report { load, bytes })
}

/// Postcopy on the destination: the pages in `missing` are still on the source. The guest
/// starts at once, its faults served over the channel by the page server lazy loadvm uses;
/// returns once every page is in, or with the failure that stopped the guest.
fn postcopy_run(
    vm: &Vm,
    mig: &Migrator,
    state: &VmState,
    missing: Vec<u64>,
    pages: ChannelPages,
) -> Result<(), IncomingError> {
    let pages = std::sync::Arc::new(pages);
    mig.set_incoming_pages(Some(pages.clone()));
    let r = postcopy_serve(vm, mig, state, &missing, pages);
    mig.set_incoming_pages(None);
    r
}

fn postcopy_serve(
    vm: &Vm,
    mig: &Migrator,
    state: &VmState,
    missing: &[u64],
    pages: std::sync::Arc<ChannelPages>,
) -> Result<(), IncomingError> {
    let status =
        vm.load_missing_ram_lazily(pages.clone(), Instant::now(), "postcopy migration", missing)?;
    vm.restore_state(state)?;
    disks::activate(vm, mig.drives())?;
    mig.set_drives_inactive(false);
    crate::killpoint::at("incoming:activated");
    vm.set_pause_reason(None);
    vm.resume();
    status.set_resumed();
    mig.set_incoming(Status::PostcopyActive, None);
    match vm.finish_lazy_ram() {
        Some(LoadState::Completed) => Ok(()),
        Some(LoadState::Failed(why)) => Err(IncomingError::PostcopyLost(why)),
        Some(LoadState::Active) | None => Err(IncomingError::PostcopyLost(
            "the page server stopped".into(),
        )),
    }
}
