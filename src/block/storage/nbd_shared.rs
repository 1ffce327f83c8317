//! One NBD connection per export and process: a second open of a URI this process already
//! has open shares the first one's connection.
//!
//! An NBD server may serve one client at a time (`qemu-nbd` without `--shared`), so a second
//! connection from the same process would wait for the first to go away: a lazy loadvm's
//! page source, opened beside the VM's drive, or a drive reopened while an older handle still
//! lives. The process is one client either way (the single-writer rule is about processes,
//! `formats/nbd.md`), and requests on the shared connection are serialized by its lock,
//! which is held only for the request itself (never while guest memory is touched: block
//! devices copy through their own buffers). A connection that failed is not handed out
//! again: the next open connects afresh.

use std::sync::{Arc, Mutex, Weak};

use super::nbd::Link;

/// Open connections by URI (dead entries are dropped on every look-up).
static LINKS: Mutex<Vec<(String, Weak<Link>)>> = Mutex::new(Vec::new());

/// The working connection to `uri` that another open of this process holds, if any.
pub(crate) fn find(uri: &str) -> Option<Arc<Link>> {
    let mut l = super::nbd_wire::lock(&LINKS);
    l.retain(|(_, w)| w.strong_count() > 0);
    l.iter()
        .filter(|(u, _)| u == uri)
        .filter_map(|(_, w)| w.upgrade())
        .find(|link| link.is_up())
}

/// Records `link` as the connection to `uri`.
pub(crate) fn add(uri: &str, link: &Arc<Link>) {
    super::nbd_wire::lock(&LINKS).push((uri.to_string(), Arc::downgrade(link)));
}
