//! Every error of the reader, and a round trip.

use std::io::{Read, Seek, SeekFrom, Write};

use super::*;

fn config() -> CheckpointConfig {
    CheckpointConfig {
        guest: "counter".into(),
        memory: 16 << 20,
        vcpus: 2,
        dirty_rate: 0,
        drives: vec![DriveConfig {
            file: "/x/d.qcow2".into(),
            format: "qcow2".into(),
            readonly: false,
            capture: false,
            size: 16 << 20,
            snapshot: true,
        }],
        disk_snapshot: Some("checkpoint-1".into()),
        date_sec: 1,
        vm_clock_nsec: 2,
        writer: "test".into(),
    }
}

fn write(dir: &std::path::Path, stream: &[u8]) -> std::path::PathBuf {
    let p = dir.join("c.ckpt");
    let mut w = CheckpointWriter::create(&p, &config(), FLAG_DISK_SNAPSHOT).unwrap();
    w.stream().write_all(stream).unwrap();
    let len = w.finish().unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), len);
    assert!(!temp_path(&p).exists());
    p
}

#[test]
fn round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    let p = write(dir.path(), &data);
    assert!(is_checkpoint(&p));
    let mut cp = Checkpoint::open(&p).unwrap();
    assert_eq!(cp.config, config());
    assert_eq!(cp.header.flags, FLAG_DISK_SNAPSHOT);
    assert_eq!(cp.header.stream_len, data.len() as u64);
    let mut seen = 0;
    cp.verify(&mut |n| seen = n).unwrap();
    assert_eq!(seen, cp.header.covered_len());
    let mut s = cp.stream().unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    assert_eq!(back, data);
    s.seek(SeekFrom::Start(10)).unwrap();
    let mut b = [0u8; 3];
    s.read_exact(&mut b).unwrap();
    assert_eq!(b, data[10..13]);
}

#[test]
fn an_unfinished_writer_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.ckpt");
    let mut w = CheckpointWriter::create(&p, &config(), 0).unwrap();
    w.stream().write_all(b"QEVM").unwrap();
    assert!(temp_path(&p).exists());
    drop(w);
    assert!(!temp_path(&p).exists() && !p.exists());
}

fn edit(p: &std::path::Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(p).unwrap();
    f(&mut b);
    std::fs::write(p, b).unwrap();
}

fn err(p: &std::path::Path) -> CheckpointError {
    let mut cp = match Checkpoint::open(p) {
        Ok(cp) => cp,
        Err(e) => return e,
    };
    cp.verify(&mut |_| {}).unwrap_err()
}

#[test]
fn bad_files_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let data = vec![7u8; 5000];
    let fresh = || write(dir.path(), &data);

    let p = fresh();
    edit(&p, |b| b[0] = b'X');
    assert!(matches!(err(&p), CheckpointError::Magic(_)));
    std::fs::write(&p, b"VMS").unwrap();
    assert!(matches!(err(&p), CheckpointError::Magic(_)));

    let p = fresh();
    edit(&p, |b| b[11] = 2);
    let e = err(&p);
    assert!(
        matches!(e, CheckpointError::Version { version: 2, .. }),
        "{e}"
    );
    assert!(e
        .to_string()
        .contains("version 2; this vmsnap reads versions 1 to 1"));

    let p = fresh();
    edit(&p, |b| b[15] |= 4);
    assert!(matches!(err(&p), CheckpointError::Flags { flags: 4, .. }));

    let p = fresh();
    edit(&p, |b| b[16] = 0x7f);
    assert!(matches!(err(&p), CheckpointError::TooLarge { .. }));

    for cut in [1, 24, 100, 4000] {
        let p = fresh();
        edit(&p, |b| b.truncate(b.len() - cut));
        let e = err(&p);
        assert!(
            matches!(e, CheckpointError::Length { .. }),
            "cut {cut}: {e}"
        );
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    let p = fresh();
    edit(&p, |b| {
        let n = b.len();
        b[n - 24] ^= 1;
    });
    assert!(matches!(err(&p), CheckpointError::Trailer { .. }));

    // A flipped bit anywhere else: in the header's reserved word, the configuration, the
    // stream, the stored CRC.
    let len = std::fs::metadata(fresh()).unwrap().len() as usize;
    for at in [21, 40, 300, len - 100, len - 7] {
        let p = fresh();
        edit(&p, |b| b[at] ^= 0x10);
        let e = err(&p);
        assert!(matches!(e, CheckpointError::Damaged { .. }), "at {at}: {e}");
    }
}
