//! vmsnap: VM snapshots inside disk images, the way QEMU's `savevm`/`loadvm` keep them.
//!
//! ```text
//!  cli (vmsnap)                 tools/inspect (vmsnap-inspect)
//!       |                                |
//!  snapshot (savevm/loadvm across all disks)     migrate (live)
//!       |               \                        /
//!       |                migration (QEMU stream: header, sections, vmdesc, RAM)
//!       |                                |
//!  block (BlockSet → qcow2, raw → storage)     vmm (KVM vm, vcpus, memory, devices)
//! ```
//!
//! - [`block`]: qcow2 (v2/v3) and raw images behind one driver trait, qcow2 internal snapshots
//!   bit-compatible with QEMU, `check`, QEMU-compatible image locking.
//! - [`migration`]: QEMU's migration stream format, the one codec used by savevm, loadvm, live
//!   migration and the inspector.
//! - [`vmm`]: a small KVM VMM whose guest can be saved mid-run and resumed in a new process.
#![warn(missing_docs)]

pub mod block;
pub mod cli;
pub mod interop;
pub mod killpoint;
pub mod migrate;
pub mod migration;
pub mod monitor;
pub mod snapshot;
pub mod vmm;
