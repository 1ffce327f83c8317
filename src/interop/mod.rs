//! Moving VM state between a qcow2 internal snapshot and a migration file, with integrity.
//!
//! ```text
//!   migration file ──validate──► import ──► vmstate area ──► snapshot entry (+ CRC32 tail)
//!   snapshot entry ──verify CRC32──► export ──► migration file (QEMU -incoming accepts it)
//! ```
//!
//! - [`integrity`]: the CRC32 record kept in the snapshot's extra data (spec:
//!   `formats/snapshot-integrity.md`), its parser and verification.
//! - [`validate`]: walking a migration file with the stream codec before it is stored.
//! - [`transfer`]: `export` and `import` over images, with progress reporting.
#![deny(unsafe_code)]

pub mod checkpoint;
pub mod integrity;
pub mod page_index_record;
pub mod transfer;
pub mod validate;
