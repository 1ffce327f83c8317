//! `export` (a snapshot's VM state → a migration stream) and `import` (a migration stream →
//! a new internal snapshot on every disk of a VM), as library calls with a progress callback.
//!
//! Import, in order: refuse an existing tag → validate the whole stream (first pass, with its
//! CRC32) → write it into the vmstate device's active vmstate area (second pass; the CRC32
//! must match the first) → create the snapshot on every included device, all or nothing, the
//! vmstate device with `vm_state_size` and the integrity tail → read the state back through
//! the new snapshot and verify it.

use std::io::{self, Read, Seek, SeekFrom, Write};

use super::integrity::{self, CrcReader, IntegrityError, StateChecksum};
use super::validate::{validate_stream, StreamSummary, ValidateError};
use crate::block::blockset::find_snapshot;
use crate::block::vmstate_io::{VmstateReader, VmstateWriter, CHUNK};
use crate::block::{BlockSet, BlockSetError, SnapshotParams, SnapshotStore};

/// The pass a progress report belongs to; each counts bytes from 0 up to the state's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Import: walking the file as a migration stream.
    Validate,
    /// Import: copying the file into the vmstate area.
    Write,
    /// Import: reading the new snapshot's state back and checking its CRC32.
    Verify,
    /// Export: copying the snapshot's state out.
    Export,
}

impl Phase {
    /// The kill point (see [`crate::killpoint`]) reached after each chunk of this pass.
    fn kill_point(self) -> &'static str {
        match self {
            Phase::Validate => "vmstate-import:validate",
            Phase::Write => "vmstate-import:write",
            Phase::Verify => "vmstate-import:verify",
            Phase::Export => "vmstate-export:copy",
        }
    }
}

/// Progress callback: the phase and the bytes done in it.
pub type ProgressFn<'a> = &'a mut dyn FnMut(Phase, u64);

/// A reader that reports the running byte count.
struct ProgressReader<'a, 'b, R> {
    inner: R,
    done: u64,
    phase: Phase,
    progress: &'a mut ProgressFn<'b>,
}

impl<R: Read> Read for ProgressReader<'_, '_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        (self.progress)(self.phase, self.done);
        Ok(n)
    }
}

/// Errors of [`export_state`].
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// No snapshot with that id or name.
    #[error("Can't find snapshot '{0}'")]
    NotFound(String),
    /// The snapshot has no VM state.
    #[error("snapshot '{0}' is a disk-only snapshot: it has no VM state to export")]
    DiskOnly(String),
    /// Reading the VM state or writing the output failed.
    #[error("copying the VM state of snapshot '{snapshot}' failed")]
    Copy {
        /// Snapshot name.
        snapshot: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The checksum record is malformed or the state does not match it.
    #[error(transparent)]
    Integrity(#[from] IntegrityError),
}

/// Errors of [`import_state`].
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A device already has a snapshot with this name.
    #[error("device '{device}' already has a snapshot named '{tag}'")]
    Exists {
        /// The device.
        device: String,
        /// The tag.
        tag: String,
    },
    /// The file is not an acceptable migration stream.
    #[error("refusing to import: not a complete migration stream")]
    Invalid(#[from] ValidateError),
    /// Reading the file failed.
    #[error("reading the migration file failed")]
    Read(#[source] io::Error),
    /// Writing into the vmstate area failed.
    #[error("writing the VM state into device '{device}' failed")]
    Write {
        /// The vmstate device.
        device: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file changed between validation and copying.
    #[error(
        "the migration file changed while importing: validated {validated_len:#x} bytes with \
         CRC32 {validated_crc:#010x}, copied {copied_len:#x} bytes with CRC32 {copied_crc:#010x}"
    )]
    Changed {
        /// Length seen by validation.
        validated_len: u64,
        /// CRC32 seen by validation.
        validated_crc: u32,
        /// Length copied.
        copied_len: u64,
        /// CRC32 copied.
        copied_crc: u32,
    },
    /// A BlockSet operation failed (not capable, unknown device, create failed).
    #[error(transparent)]
    Set(#[from] BlockSetError),
    /// The state read back from the new snapshot does not verify.
    #[error("the imported VM state does not read back intact")]
    ReadBack(#[source] IntegrityError),
}

/// Creation parameters of an imported snapshot, besides the state itself.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// The tag.
    pub tag: String,
    /// The device to hold the VM state (default: first snapshot-capable included device).
    pub vmstate_device: Option<String>,
    /// Guest clock to record, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
}

/// What [`import_state`] did.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// The validated stream.
    pub summary: StreamSummary,
    /// The device holding the VM state.
    pub vmstate_device: String,
    /// Devices that got the snapshot, in order.
    pub devices: Vec<String>,
}

/// What [`export_state`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportReport {
    /// Bytes written.
    pub len: u64,
    /// Their CRC32.
    pub crc: u32,
    /// The checksum record that was verified, if the snapshot had one.
    pub verified: Option<StateChecksum>,
}

/// Copies `r` to `w` in [`CHUNK`]s, reporting the running byte count.
fn copy_with_progress<R: Read, W: Write + ?Sized>(
    mut r: R,
    w: &mut W,
    phase: Phase,
    progress: ProgressFn<'_>,
) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n])?;
        total += n as u64;
        progress(phase, total);
        crate::killpoint::at(phase.kill_point());
    }
    w.flush()?;
    Ok(total)
}

/// Writes snapshot `tag`'s VM state to `out` and verifies its checksum record, if any.
///
/// The output is complete only when this returns `Ok`: on a checksum mismatch the bytes
/// written are damaged state, and the caller should discard them.
///
/// # Errors
/// [`ExportError`]; a damaged state is [`IntegrityError::Mismatch`] naming the snapshot.
pub fn export_state(
    store: &mut dyn SnapshotStore,
    tag: &str,
    out: &mut dyn Write,
    progress: ProgressFn<'_>,
) -> Result<ExportReport, ExportError> {
    let list = store.snapshot_list();
    let info = find_snapshot(&list, tag)
        .ok_or_else(|| ExportError::NotFound(tag.to_owned()))?
        .clone();
    if info.vm_state_size == 0 {
        return Err(ExportError::DiskOnly(info.name));
    }
    let record = integrity::parse_tail(
        &store
            .snapshot_extra_tail(&info.id)
            .map_err(|e| ExportError::Integrity(IntegrityError::Block(e)))?,
    )?;
    let reader = VmstateReader::for_snapshot(store, &info.id)
        .map_err(|e| ExportError::Integrity(IntegrityError::Block(e)))?;
    let mut crc = CrcReader::new(reader);
    copy_with_progress(&mut crc, out, Phase::Export, progress).map_err(|source| {
        ExportError::Copy {
            snapshot: info.name.clone(),
            source,
        }
    })?;
    let (len, c) = crc.finish();
    if let Some(rec) = &record {
        integrity::verify(&info.name, rec, len, c)?;
    }
    Ok(ExportReport {
        len,
        crc: c,
        verified: record,
    })
}

/// Creates snapshot `opts.tag` on every included device of `set` from the current disk
/// contents, with the migration stream in `file` as its VM state.
///
/// `file` is read twice (validation, then copy) and must not change in between.
///
/// # Errors
/// [`ImportError`]; nothing is written before the stream has validated.
pub fn import_state<F: Read + Seek>(
    set: &mut BlockSet,
    file: &mut F,
    opts: &ImportOptions,
    mut progress: ProgressFn<'_>,
) -> Result<ImportReport, ImportError> {
    set.can_snapshot()?;
    refuse_existing(set, &opts.tag)?;
    let summary = validate_stream(io::BufReader::new(ProgressReader {
        inner: &mut *file,
        done: 0,
        phase: Phase::Validate,
        progress: &mut progress,
    }))?;
    file.seek(SeekFrom::Start(0)).map_err(ImportError::Read)?;
    let vm_name = set
        .vmstate_device(opts.vmstate_device.as_deref())?
        .name
        .clone();
    write_vmstate(set, &vm_name, file, &summary, progress)?;
    let params = SnapshotParams {
        name: opts.tag.clone(),
        vm_state_size: summary.len,
        date_sec: opts.date_sec,
        date_nsec: opts.date_nsec,
        vm_clock_nsec: opts.vm_clock_nsec,
        icount: None,
        extra_tail: integrity::tail_for(summary.crc, summary.len),
    };
    set.create(&params, &vm_name)?;
    read_back(set, &vm_name, &opts.tag, progress)?;
    Ok(ImportReport {
        summary,
        vmstate_device: vm_name,
        devices: set.included().into_iter().map(str::to_owned).collect(),
    })
}

/// Refuses a tag that any device already has as a name.
fn refuse_existing(set: &mut BlockSet, tag: &str) -> Result<(), ImportError> {
    for dev in &mut set.devices {
        let name = dev.name.clone();
        if let Some(store) = dev.driver.snapshots() {
            if store.snapshot_list().iter().any(|s| s.name == tag) {
                return Err(ImportError::Exists {
                    device: name,
                    tag: tag.to_owned(),
                });
            }
        }
    }
    Ok(())
}

/// Second pass: the file into the vmstate area, checked against the first pass.
fn write_vmstate<F: Read>(
    set: &mut BlockSet,
    vm_name: &str,
    file: &mut F,
    summary: &StreamSummary,
    progress: ProgressFn<'_>,
) -> Result<(), ImportError> {
    let dev = set
        .device_mut(vm_name)
        .ok_or_else(|| BlockSetError::NoSuchDevice(vm_name.to_owned()))?;
    let store = dev
        .driver
        .snapshots()
        .ok_or_else(|| BlockSetError::NoVmStateSupport(vm_name.to_owned()))?;
    store
        .vmstate_reserve(summary.len)
        .map_err(|e| ImportError::Write {
            device: vm_name.to_owned(),
            source: std::io::Error::other(e),
        })?;
    let mut w = VmstateWriter::new(store);
    let mut crc = CrcReader::new(file);
    copy_with_progress(&mut crc, &mut w, Phase::Write, progress).map_err(|source| {
        ImportError::Write {
            device: vm_name.to_owned(),
            source,
        }
    })?;
    let (copied_len, copied_crc) = crc.finish();
    if (copied_len, copied_crc) != (summary.len, summary.crc) {
        return Err(ImportError::Changed {
            validated_len: summary.len,
            validated_crc: summary.crc,
            copied_len,
            copied_crc,
        });
    }
    Ok(())
}

/// Verifies the new snapshot's state through its own L1 table.
fn read_back(
    set: &mut BlockSet,
    vm_name: &str,
    tag: &str,
    progress: ProgressFn<'_>,
) -> Result<(), ImportError> {
    let dev = set
        .device_mut(vm_name)
        .ok_or_else(|| BlockSetError::NoSuchDevice(vm_name.to_owned()))?;
    let store = dev
        .driver
        .snapshots()
        .ok_or_else(|| BlockSetError::NoVmStateSupport(vm_name.to_owned()))?;
    let mut report = |n| progress(Phase::Verify, n);
    match integrity::verify_snapshot_with_progress(store, tag, &mut report)
        .map_err(ImportError::ReadBack)?
    {
        integrity::Verification::Verified(_) => Ok(()),
        integrity::Verification::NoRecord => Err(ImportError::ReadBack(IntegrityError::Block(
            crate::block::Error::Format(format!("snapshot '{tag}' lost its integrity record")),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::block::qcow2::{CreateOptions, Qcow2};
    use crate::block::MemStorage;
    use crate::interop::integrity::{damaged, verify_all, Verification};

    /// A tiny valid stream: one FULL section with an empty body, EOF, an empty vmdesc.
    fn stream() -> Vec<u8> {
        let mut s =
            b"QEVM\0\0\0\x03\x04\0\0\0\x01\x03dev\0\0\0\0\0\0\0\x01\x7e\0\0\0\x01\x00".to_vec();
        s.extend([0x06, 0, 0, 0, 2]);
        s.extend(b"{}");
        s
    }

    fn set_with(n: usize) -> BlockSet {
        let mut set = BlockSet::new();
        for i in 0..n {
            let mem = MemStorage::new();
            let opts = CreateOptions {
                size: 1 << 20,
                ..Default::default()
            };
            Qcow2::create_on(Box::new(mem.clone()), &opts).unwrap();
            let img = Qcow2::open_storage(Box::new(mem), false).unwrap();
            set.add(format!("d{i}"), Box::new(img)).unwrap();
        }
        set
    }

    fn opts(tag: &str) -> ImportOptions {
        ImportOptions {
            tag: tag.into(),
            ..Default::default()
        }
    }

    #[test]
    fn import_export_round_trip_with_record() {
        let mut set = set_with(2);
        let data = stream();
        let mut seen = Vec::new();
        let rep = import_state(
            &mut set,
            &mut Cursor::new(&data),
            &opts("t"),
            &mut |p, n| seen.push((p, n)),
        )
        .unwrap();
        let len = data.len() as u64;
        for phase in [Phase::Validate, Phase::Write, Phase::Verify] {
            assert!(
                seen.contains(&(phase, len)),
                "{phase:?} did not reach {len}: {seen:?}"
            );
        }
        assert_eq!(rep.vmstate_device, "d0");
        assert_eq!(rep.devices, ["d0", "d1"]);
        assert_eq!(rep.summary.len, data.len() as u64);
        let store = set.devices[0].driver.snapshots().unwrap();
        let all = verify_all(store);
        assert_eq!(all.len(), 1);
        assert!(matches!(all[0].result, Ok(Verification::Verified(_))));
        assert!(damaged(&all).is_empty());
        let mut out = Vec::new();
        let r = export_state(store, "t", &mut out, &mut |_, _| {}).unwrap();
        assert_eq!(out, data);
        assert_eq!(r.crc, crc32fast::hash(&data));
        assert!(r.verified.is_some());
        // The second disk holds no state.
        let other = set.devices[1].driver.snapshots().unwrap();
        assert!(verify_all(other).is_empty());
        let e = export_state(other, "t", &mut Vec::new(), &mut |_, _| {}).unwrap_err();
        assert!(matches!(e, ExportError::DiskOnly(_)));
    }

    #[test]
    fn damaged_state_is_named() {
        let mut set = set_with(1);
        let data = stream();
        import_state(
            &mut set,
            &mut Cursor::new(&data),
            &opts("t"),
            &mut |_, _| {},
        )
        .unwrap();
        // Re-create the entry with a wrong checksum over the same stored state.
        let store = set.devices[0].driver.snapshots().unwrap();
        let mut w = VmstateWriter::new(store);
        w.write_all(&data).unwrap();
        w.flush().unwrap();
        drop(w);
        let params = SnapshotParams {
            name: "bad".into(),
            vm_state_size: data.len() as u64,
            extra_tail: integrity::tail_for(crc32fast::hash(&data) ^ 4, data.len() as u64),
            ..Default::default()
        };
        store.snapshot_create(&params).unwrap();
        let all = verify_all(store);
        assert_eq!(
            damaged(&all),
            [format!(
                "snapshot 'bad': VM state is damaged: CRC32 is {:#010x}, stored {:#010x}",
                crc32fast::hash(&data),
                crc32fast::hash(&data) ^ 4
            )]
        );
        let named = integrity::damaged_snapshots(store);
        assert_eq!(named.len(), 1);
        assert_eq!(named[0].0, "bad");
        let e = export_state(store, "bad", &mut Vec::new(), &mut |_, _| {}).unwrap_err();
        assert!(e.to_string().contains("'bad'"), "{e}");
    }

    /// A file whose contents change when it is rewound.
    struct Changing {
        first: Cursor<Vec<u8>>,
        second: Cursor<Vec<u8>>,
        rewound: bool,
    }

    impl Read for Changing {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.rewound {
                self.second.read(buf)
            } else {
                self.first.read(buf)
            }
        }
    }

    impl Seek for Changing {
        fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
            self.rewound = true;
            self.second.seek(pos)
        }
    }

    #[test]
    fn a_file_that_changes_between_passes_is_refused() {
        let mut set = set_with(1);
        let mut other = stream();
        other[9] ^= 1;
        let mut f = Changing {
            first: Cursor::new(stream()),
            second: Cursor::new(other),
            rewound: false,
        };
        let e = import_state(&mut set, &mut f, &opts("t"), &mut |_, _| {}).unwrap_err();
        assert!(matches!(e, ImportError::Changed { .. }), "{e}");
        assert!(set.devices[0]
            .driver
            .snapshots()
            .unwrap()
            .snapshot_list()
            .is_empty());
    }

    #[test]
    fn refused_import_writes_nothing() {
        let mut set = set_with(1);
        let e = import_state(
            &mut set,
            &mut Cursor::new(b"junk"),
            &opts("t"),
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(matches!(e, ImportError::Invalid(_)));
        assert!(set.devices[0]
            .driver
            .snapshots()
            .unwrap()
            .snapshot_list()
            .is_empty());
        let e = import_state(
            &mut set,
            &mut Cursor::new(stream()),
            &ImportOptions {
                vmstate_device: Some("nope".into()),
                ..opts("t")
            },
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
