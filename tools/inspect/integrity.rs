//! Verifying vmsnap's CRC32 record of a snapshot's VM state before decoding it
//! (formats/snapshot-integrity.md). A damaged state is still decoded, for debugging, but the
//! inspector warns first and exits with failure afterwards.

use std::path::Path;

use vmsnap::block::{open_image, OpenOptions};
use vmsnap::interop::integrity::verify_snapshot;

/// The damage message for snapshot `tag` of `image`, if its state fails its record. Problems
/// opening the image or finding the snapshot are left to the decoder, which reports them.
pub fn damaged_state(image: &Path, tag: &str) -> Option<String> {
    let opts = OpenOptions {
        read_only: true,
        force_share: true,
        ..Default::default()
    };
    let mut driver = open_image(image, opts).ok()?;
    let store = driver.snapshots()?;
    match verify_snapshot(store, tag) {
        Err(vmsnap::interop::integrity::IntegrityError::Block(_)) => None,
        Err(e) => Some(e.to_string()),
        Ok(_) => None,
    }
}
