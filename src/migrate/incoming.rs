//! The destination side (`vmsnap run --incoming URI`): wait for the stream with the guest
//! stopped (`inmigrate`) and the disks open without locks, load the whole stream with the
//! same reader loadvm uses, take the disks over, then let the guest run. Nothing of the
//! guest runs before the stream has been read to its end and checked.

use std::time::{Duration, Instant};

use crate::snapshot::state_io::{self, StateIoError};
use crate::vmm::{Vm, VmError};

use super::disks::{self, DiskError, DriveOpen};
use super::uri::{Listener, UriError};

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

/// Accepts the stream on `listener`, loads it into the paused `vm`, activates the drives
/// and resumes the guest.
pub fn run(vm: &Vm, listener: Listener, drives: &[DriveOpen]) -> Result<Report, IncomingError> {
    vm.set_pause_reason(Some("inmigrate"));
    let channel = listener.accept()?;
    let start = Instant::now();
    let (vcpus, ndrives) = (vm.vcpu_count(), vm.drive_count());
    let mut input = Counting(channel, 0);
    let state = vm.with_ram_mut(|ram| state_io::read_state(vcpus, ndrives, ram, &mut input))??;
    let load = start.elapsed();
    let bytes = input.1;
    input.0.close(DRAIN_LIMIT);
    vm.restore_state(&state)?;
    disks::activate(vm, drives)?;
    vm.set_pause_reason(None);
    vm.resume();
    Ok(Report { load, bytes })
}
