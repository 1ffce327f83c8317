//! Checkpoint files, Xen `xl save`/`xl restore` style: `vmsnap restore FILE` ([`restore`]) and
//! the wrapping of a migration file into a checkpoint ([`convert`]). The monitor's
//! `save [-c] FILE` is [`crate::monitor::checkpoint`]; the file format is
//! [`crate::interop::checkpoint`] (`formats/checkpoint.md`).

pub mod convert;
pub mod restore;
