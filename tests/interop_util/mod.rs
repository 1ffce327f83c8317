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

/// Flips one bit of the stored VM state in the image file: finds the 64 bytes after the first
/// "random" pattern page marker (`RND!`) at or after stream offset `at` (unique in the image)
/// and flips bit 0 of their first byte.
pub fn flip_state_bit(img: &Path, state: &[u8], at: usize) {
    let marker = state[at..]
        .windows(4)
        .position(|w| w == b"RND!")
        .expect("a random pattern page after the offset");
    let start = at + marker + 4;
    let needle = &state[start..start + 64];
    let mut data = std::fs::read(img).unwrap();
    let pos = data
        .windows(64)
        .position(|w| w == needle)
        .expect("state bytes found in the image");
    assert!(
        data[pos + 1..].windows(64).all(|w| w != needle),
        "state bytes are not unique in the image"
    );
    data[pos] ^= 1;
    std::fs::write(img, data).unwrap();
}
