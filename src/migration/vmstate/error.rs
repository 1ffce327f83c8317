//! Errors of VMState encoding and decoding.

use crate::migration::qemu_file::QemuFileError;

/// Largest single field (buffer, array) a stream may make us allocate.
pub const MAX_FIELD_BYTES: u64 = 256 << 20;

/// Errors while encoding or decoding device state.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    /// The stream source or sink failed or ended.
    #[error(transparent)]
    File(#[from] QemuFileError),
    /// The stream's version is newer than the description's.
    #[error("{vmsd}: stream version {version} is newer than the supported {max}")]
    VersionTooNew {
        /// Description name.
        vmsd: String,
        /// Version in the stream.
        version: u32,
        /// Our version_id.
        max: u32,
    },
    /// The stream's version is older than the description's minimum.
    #[error("{vmsd}: stream version {version} is older than the minimum {min}")]
    VersionTooOld {
        /// Description name.
        vmsd: String,
        /// Version in the stream.
        version: u32,
        /// Our minimum_version_id.
        min: u32,
    },
    /// An "equal" field differs from the value it must have.
    #[error("{vmsd}.{field}: value {got:#x} in stream at {offset:#x} must equal {expected:#x}")]
    NotEqual {
        /// Description name.
        vmsd: String,
        /// Field name.
        field: String,
        /// Stream offset of the value.
        offset: u64,
        /// Value required.
        expected: u64,
        /// Value found.
        got: u64,
    },
    /// An "int32 le" field is negative or above its limit.
    #[error("{vmsd}.{field}: value {got} at {offset:#x} is not within 0..={max}")]
    OutOfRange {
        /// Description name.
        vmsd: String,
        /// Field name.
        field: String,
        /// Stream offset of the value.
        offset: u64,
        /// Upper limit.
        max: i32,
        /// Value found.
        got: i32,
    },
    /// A subsection in the stream that the description does not know.
    #[error("{vmsd}: unknown subsection '{name}' at {offset:#x}")]
    UnknownSubsection {
        /// Description name.
        vmsd: String,
        /// Subsection name found.
        name: String,
        /// Stream offset of the subsection marker.
        offset: u64,
    },
    /// A NULL-pointer marker was expected but something else was found.
    #[error(
        "{vmsd}.{field}[{index}]: expected NULL marker 0x30 at {offset:#x}, found {found:#04x}"
    )]
    BadNullMarker {
        /// Description name.
        vmsd: String,
        /// Field name.
        field: String,
        /// Element index.
        index: u32,
        /// Stream offset.
        offset: u64,
        /// Byte found.
        found: u8,
    },
    /// A length taken from the stream is too large to allocate.
    #[error("{vmsd}.{field}: length {len:#x} at {offset:#x} exceeds the limit {max:#x}")]
    TooLarge {
        /// Description name.
        vmsd: String,
        /// Field name.
        field: String,
        /// Stream offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Limit.
        max: u64,
    },
    /// Encoding: the value has no field of this name.
    #[error("{vmsd}: value has no field '{field}'")]
    MissingField {
        /// Description name.
        vmsd: String,
        /// Field name.
        field: String,
    },
    /// Encoding: the value does not fit the field's type.
    #[error("{vmsd}.{field}: value {value} does not fit type {ty}")]
    WrongType {
        /// Description name.
        vmsd: String,
        /// Field name.
        field: String,
        /// QEMU type name.
        ty: String,
        /// Short rendering of the offending value.
        value: String,
    },
    /// A length field refers to a field that is missing or not an integer.
    #[error("{vmsd}.{field}: length field '{len_field}' missing or not an integer")]
    BadLengthField {
        /// Description name.
        vmsd: String,
        /// Field name.
        field: String,
        /// The length field named by the description.
        len_field: String,
    },
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, VmStateError>;
