//! QEMU's migration stream: the codec shared by savevm, loadvm, migration and the inspector.
//!
//! - [`qemu_file`]: buffered big-endian reader/writer with position tracking.
//! - [`protocol`]: record types, commands and RAM flags.
//! - [`value`] and [`vmstate`]: the generic value model and the VMState descriptions that
//!   encode, decode and describe (vmdesc JSON) device state.
//! - [`vmdesc`]: the JSON trailer: QEMU's formatting, and descriptions built from it.
//! - [`ram`]: the "ram" section (version 4).
//! - [`configuration`]: the CONFIGURATION section.
//! - [`stream`]: walking a whole stream record by record; the decoded stream model.
//! - [`ram_state`]: guest RAM as a save-state entry (save from / load into memory slices).
//! - [`savevm`]: `save_state` / `load_state` over a registry of save-state entries.
//! - [`xbzrle`]: QEMU's XBZRLE delta encoding of re-sent pages and the source's page cache.
//! - [`analyze`]: the output of `analyze-migration.py` (`--dump state|desc`, `-m`, `-x`).
#![deny(unsafe_code)]

pub mod analyze;
pub mod configuration;
pub mod page_index;
pub mod protocol;
pub mod qemu_file;
pub mod ram;
pub mod ram_state;
pub mod savevm;
pub mod stream;
pub mod value;
pub mod vmdesc;
pub mod vmstate;
pub mod xbzrle;

pub use qemu_file::{QemuFileReader, QemuFileWriter};
pub use value::Value;
pub use vmstate::{Count, Field, FieldType, VMStateDescription};
