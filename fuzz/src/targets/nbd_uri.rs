//! `nbd_uri`: an NBD URI as given on the command line or to `-drive file=`, parsed with
//! QEMU's rules.

use vmsnap::block::storage::NbdUri;

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = NbdUri::is_nbd(s);
    if let Err(e) = NbdUri::parse(s) {
        let _ = e.to_string();
    }
}
