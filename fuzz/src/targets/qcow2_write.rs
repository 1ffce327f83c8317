//! `qcow2_write`: snapshot create/apply/delete, guest writes, zero writes, discards and VM
//! state writes, chosen by the input, on a (mutated) image in memory, with issue 11's rules:
//!
//! - an operation that fails leaves the image's bytes as they were (the open too);
//! - an operation that succeeds never adds corruptions to what `check` reports: an image
//!   that checked clean or leaking only (exit 0 or 3) still does.
//!
//! As in the random-damage test (`tests/qcow2_random_damage.rs`), the two rules hold on an
//! image that checks clean or leaking before the operation; on an image `check` already calls
//! corrupt they are enforced only with `VMSNAP_FUZZ_STRICT=1` (formats/fuzzing.md lists what
//! that mode still finds).
//!
//! Input: [`OPS`] operations of 4 bytes each (`kind, a, b, c`), then the image.

use std::sync::OnceLock;

use vmsnap::block::qcow2::{CheckReport, Qcow2};
use vmsnap::block::{BlockDriver, MemStorage, SnapshotParams, SnapshotStore};

/// Operations at the start of the input.
pub const OPS: usize = 8;
/// Bytes of one operation.
const OP_LEN: usize = 4;
/// Size of the in-memory device the image lives on.
const MAX_IMAGE: usize = 64 << 20;
/// Largest guest write, in 512-byte sectors.
const MAX_SECTORS: u64 = 64;

fn tag(a: u8) -> String {
    format!("s{}", a % 4)
}

fn params(name: String) -> SnapshotParams {
    SnapshotParams {
        name,
        date_sec: 1_700_000_000,
        ..Default::default()
    }
}

/// One operation; `Ok` when the library accepted it.
fn apply(img: &mut Qcow2, op: &[u8]) -> vmsnap::block::Result<()> {
    let (kind, a, b, c) = (op[0], op[1], op[2], op[3]);
    let size = img.size();
    // Sector-aligned or not (low bit of c), inside the disk or just past its end.
    let sector = u64::from(u16::from_be_bytes([a, b]));
    let offset = if size == 0 {
        0
    } else {
        (sector * 512 + u64::from(c & 1) * 7) % (size + 512)
    };
    let len = (u64::from(c >> 1) % MAX_SECTORS + 1) * 512;
    match kind % 8 {
        0 => img.snapshot_create(&params(tag(a))).map(drop),
        1 => img.snapshot_goto(&tag(a)),
        2 => img.snapshot_delete(&tag(a)),
        3 => img.write_at(offset, &vec![c | 1; len as usize]),
        4 => img.write_zeroes(offset, len),
        5 => img.discard(offset, len),
        6 => img.vmstate_write(u64::from(b) * 512, &vec![a; len as usize]),
        _ => img.flush(),
    }
}

/// Whether the rules hold on images already corrupt too (`VMSNAP_FUZZ_STRICT=1`).
fn strict() -> bool {
    static STRICT: OnceLock<bool> = OnceLock::new();
    *STRICT.get_or_init(|| std::env::var_os("VMSNAP_FUZZ_STRICT").is_some_and(|v| v == "1"))
}

fn check(img: &mut Qcow2) -> Option<CheckReport> {
    img.check(None).ok().filter(|r| r.check_errors == 0)
}

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    run_with(data, strict());
}

/// Runs the target on one input with the rules held on images already corrupt too (the
/// replay of strict-mode findings that were fixed).
pub fn run_strict(data: &[u8]) {
    run_with(data, true);
}

fn run_with(data: &[u8], strict: bool) {
    if data.len() < OPS * OP_LEN {
        return;
    }
    let (ops, image) = data.split_at(OPS * OP_LEN);
    let mem = MemStorage::from_vec(image.to_vec());
    // A device of 64 MiB: an entry pointing petabytes past the end fails the write there
    // (as a real file's size limit would) instead of growing the buffer.
    mem.set_max_len(MAX_IMAGE);
    let mut img = match Qcow2::open_storage(Box::new(mem.clone()), false) {
        Ok(img) => img,
        Err(e) => {
            assert!(
                mem.with_data(|d| d == image),
                "refused open changed the bytes: {e}"
            );
            return;
        }
    };
    let mut before = check(&mut img);
    // The bytes before each operation, kept only when the rules hold (one buffer reused).
    let mut bytes = Vec::new();
    for op in ops.chunks_exact(OP_LEN) {
        let held = strict || before.as_ref().is_some_and(|r| r.corruptions == 0);
        if held {
            bytes.clear();
            mem.with_data(|d| bytes.extend_from_slice(d));
        }
        match apply(&mut img, op) {
            Err(e) => {
                assert!(
                    !held || mem.with_data(|d| d == bytes),
                    "refused op {op:?} changed the bytes: {e}"
                );
            }
            Ok(()) => {
                let after = check(&mut img);
                if let (true, Some(b), Some(a)) = (held, &before, &after) {
                    assert!(
                        a.corruptions <= b.corruptions,
                        "op {op:?} took corruptions from {} to {}: {:?}",
                        b.corruptions,
                        a.corruptions,
                        a.messages
                    );
                }
                before = after;
            }
        }
    }
}
