//! Built-in guests: the code the VMM loads instead of a firmware and kernel.
//!
//! The VMM itself puts the vCPUs into 64-bit mode: it writes the descriptor tables and page
//! tables ([`long_mode`]) and the guest's flat binary, then sets each vCPU's registers.

pub mod counter;
pub mod long_mode;

use std::str::FromStr;

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::GuestMemoryMmap;

/// Errors loading a guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Guest memory is smaller than the guest needs.
    #[error("guest needs at least {need:#x} bytes of RAM, the VM has {have:#x}")]
    MemoryTooSmall {
        /// Bytes needed.
        need: u64,
        /// Bytes present.
        have: u64,
    },
    /// More vCPUs than the guest's tables have room for.
    #[error("guest supports at most {max} vCPUs, {requested} requested")]
    TooManyVcpus {
        /// Limit.
        max: usize,
        /// Requested.
        requested: usize,
    },
    /// Writing into guest memory failed.
    #[error("writing {what} at {addr:#x}: {source}")]
    Write {
        /// What was written.
        what: &'static str,
        /// Guest-physical address.
        addr: u64,
        /// The cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A dirtying span that is not a whole number of qwords within one page.
    #[error("dirty span {0} bytes: must be a multiple of 8 from 8 to 4096")]
    DirtySpan(u64),
}

/// Which built-in guest to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Guest {
    /// Counts timer ticks, prints `tick N`, keeps RAM and disk in step and checks them.
    #[default]
    Counter,
}

impl FromStr for Guest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "counter" => Ok(Guest::Counter),
            other => Err(format!("unknown guest '{other}' (known: counter)")),
        }
    }
}

impl Guest {
    /// Writes the guest into `mem` for `vcpus` vCPUs.
    pub fn load(self, mem: &GuestMemoryMmap, vcpus: usize) -> Result<(), GuestError> {
        match self {
            Guest::Counter => counter::load(mem, vcpus),
        }
    }

    /// Initial general-purpose registers of vCPU `index`.
    pub fn initial_regs(self, index: usize) -> kvm_regs {
        match self {
            Guest::Counter => counter::initial_regs(index),
        }
    }

    /// Initial special registers of vCPU `index`, starting from the vCPU's reset values.
    pub fn initial_sregs(self, index: usize, reset: &kvm_sregs) -> kvm_sregs {
        long_mode::sregs(index, reset)
    }
}
