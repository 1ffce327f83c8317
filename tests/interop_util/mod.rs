//! Helpers shared by the interop tests: reading our integrity record out of an image and
//! damaging a stored VM state in place.
#![allow(dead_code)]

use std::path::Path;

use vmsnap::block::{open_image, OpenOptions};
use vmsnap::interop::integrity::{self, StateChecksum, Verification};

/// The integrity record of snapshot `tag` in `img`, if any (opened read-only, no locks).
pub fn record_of(img: &Path, tag: &str) -> Option<StateChecksum> {
    let mut d = open_image(
        img,
        OpenOptions {
            read_only: true,
            format: None,
            force_share: true,
        },
    )
    .unwrap();
    let store = d.snapshots().unwrap();
    let list = store.snapshot_list();
    let id = vmsnap::block::blockset::find_snapshot(&list, tag)
        .unwrap()
        .id
        .clone();
    integrity::parse_tail(&store.snapshot_extra_tail(&id).unwrap()).unwrap()
}

/// Verifies snapshot `tag` of `img` through the library.
pub fn verify(img: &Path, tag: &str) -> Result<Verification, integrity::IntegrityError> {
    let mut d = open_image(
        img,
        OpenOptions {
            read_only: true,
            format: None,
            force_share: true,
        },
    )
    .unwrap();
    integrity::verify_snapshot(d.snapshots().unwrap(), tag)
}

/// Host offset in the image file of the 64 bytes after the first "random" pattern page
/// marker (`RND!`) at or after stream offset `at` of `state`; they must be unique in the image.
/// A snapshot's VM state clusters never move, so the offset stays valid while QEMU works on
/// other snapshots.
pub fn find_state_bytes(img: &Path, state: &[u8], at: usize) -> usize {
    let marker = state[at..]
        .windows(4)
        .position(|w| w == b"RND!")
        .expect("a random pattern page after the offset");
    let start = at + marker + 4;
    let needle = &state[start..start + 64];
    let data = std::fs::read(img).unwrap();
    let pos = data
        .windows(64)
        .position(|w| w == needle)
        .expect("state bytes found in the image");
    assert!(
        data[pos + 1..].windows(64).all(|w| w != needle),
        "state bytes are not unique in the image"
    );
    pos
}

/// Flips bit 0 of the byte at `pos` of the image file.
pub fn flip_bit_at(img: &Path, pos: usize) {
    let mut data = std::fs::read(img).unwrap();
    data[pos] ^= 1;
    std::fs::write(img, data).unwrap();
}

/// Flips one bit of the stored VM state (see [`find_state_bytes`]).
pub fn flip_state_bit(img: &Path, state: &[u8], at: usize) {
    let pos = find_state_bytes(img, state, at);
    flip_bit_at(img, pos);
}

/// Like [`find_state_bytes`], for an image that already held copies of the same pattern
/// pages before the import: the occurrence that is new since `before` (the image's bytes then).
pub fn find_new_state_bytes(img: &Path, before: &[u8], state: &[u8], at: usize) -> usize {
    let marker = state[at..]
        .windows(4)
        .position(|w| w == b"RND!")
        .expect("a random pattern page after the offset");
    let start = at + marker + 4;
    let needle = &state[start..start + 64];
    let find_all = |data: &[u8]| -> Vec<usize> {
        data.windows(64)
            .enumerate()
            .filter(|(_, w)| *w == needle)
            .map(|(i, _)| i)
            .collect()
    };
    let old = find_all(before);
    let new: Vec<usize> = find_all(&std::fs::read(img).unwrap())
        .into_iter()
        .filter(|p| !old.contains(p) || before[*p..*p + 64] != *needle)
        .collect();
    assert_eq!(
        new.len(),
        1,
        "expected one new copy of the state bytes: {new:?}"
    );
    new[0]
}
