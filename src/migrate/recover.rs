//! Postcopy recovery (QEMU's `migrate_recover` on the destination, `migrate -r` on the
//! source; `migration/migration.c`, `ram.c` `ram_dirty_bitmap_reload`).
//!
//! ```text
//!  destination (postcopy-paused)                 source (postcopy-paused)
//!  migrate_recover URI: listen
//!  accept ◀──────────── "VPCR", page count ────── migrate -r URI: connect
//!  ── RECV_BITMAP, page count, received bitmap ─▶ missing = not received
//!  ── REQ_PAGE (faults that waited) ────────────▶ answered first
//!  ◀── PAGE/ZERO records …, EOS ───────────────── every missing page once
//!  ── DONE ─────────────────────────────────────▶ completed
//! ```
//!
//! While paused, both sides keep what they have: the source its stopped guest's RAM, the
//! destination the pages it received (its vCPUs block on the faults of missing pages, its
//! monitor answers). The records are vmsnap's own (both ends are vmsnap); they are
//! documented in `formats/live-migration.md`.

use std::io::{self, Read, Write};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::snapshot::state_io::PAGE_SIZE;
use crate::vmm::Vm;

use super::info::{MigrationInfo, RamInfo, Status};
use super::postcopy::{self, PostcopyCounters, ReturnPath, RP_RECV_BITMAP};
use super::source::{self, Completed, MigrateError, Observer};
use super::uri::{Listener, MigrateUri};

/// First word of a recovered channel, from the source: "VPCR".
pub const RESUME_MAGIC: u32 = 0x5650_4352;
/// How long either side waits for the other's first message on a recovered channel.
pub const RESUME_WAIT: Duration = Duration::from_secs(10);
/// How long the source waits for the destination to close after DONE.
const FINISH_WAIT: Duration = Duration::from_secs(10);

fn words(pages: u64) -> usize {
    usize::try_from(pages.div_ceil(64)).unwrap_or(usize::MAX)
}

/// Writes the source's resume header: magic and the guest RAM's page count.
pub fn write_resume_header(out: &mut dyn Write, pages: u64) -> io::Result<()> {
    let mut b = [0u8; 12];
    b[..4].copy_from_slice(&RESUME_MAGIC.to_be_bytes());
    b[4..].copy_from_slice(&pages.to_be_bytes());
    out.write_all(&b)?;
    out.flush()
}

/// Reads the resume header of a recovered channel for a RAM of `pages` pages.
pub fn read_resume_header(r: &mut dyn Read, pages: u64) -> Result<(), String> {
    let mut b = [0u8; 12];
    r.read_exact(&mut b)
        .map_err(|e| format!("reading the resume header: {e}"))?;
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if magic != RESUME_MAGIC {
        return Err(format!(
            "expected a postcopy resume (migrate -r), found {magic:#010x}"
        ));
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&b[4..]);
    let theirs = u64::from_be_bytes(n);
    if theirs != pages {
        return Err(format!(
            "the source has {theirs} pages of RAM, this VM {pages}"
        ));
    }
    Ok(())
}

/// Sends the pages received so far (bit i = page i) on the return path.
pub fn write_received(w: &mut dyn Write, pages: u64, received: &[u64]) -> io::Result<()> {
    let mut b = Vec::with_capacity(16 + received.len() * 8);
    b.extend_from_slice(&postcopy::rp_word(RP_RECV_BITMAP, 0));
    b.extend_from_slice(&pages.to_be_bytes());
    for w in received {
        b.extend_from_slice(&w.to_be_bytes());
    }
    w.write_all(&b)?;
    w.flush()
}

/// Reads a received bitmap after its [`RP_RECV_BITMAP`] word, for a RAM of `pages` pages:
/// the count must match and no bit may lie beyond RAM. The allocation is sized by our
/// own RAM, never by the stream.
pub fn read_received(r: &mut dyn Read, pages: u64) -> io::Result<Vec<u64>> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let mut w = [0u8; 8];
    r.read_exact(&mut w)?;
    let theirs = u64::from_be_bytes(w);
    if theirs != pages {
        return Err(bad(format!(
            "the destination's received bitmap has {theirs} pages, this VM {pages}"
        )));
    }
    let mut bits = vec![0u64; words(pages)];
    for b in bits.iter_mut() {
        r.read_exact(&mut w)?;
        *b = u64::from_be_bytes(w);
    }
    if pages % 64 != 0 && bits.last().is_some_and(|l| l >> (pages % 64) != 0) {
        return Err(bad("received pages beyond RAM".into()));
    }
    Ok(bits)
}

/// The pages of a RAM of `pages` pages that `received` lacks.
pub fn missing_of(received: &[u64], pages: u64) -> Vec<u64> {
    let mut missing: Vec<u64> = (0..words(pages))
        .map(|i| !received.get(i).copied().unwrap_or(0))
        .collect();
    if pages % 64 != 0 {
        if let Some(last) = missing.last_mut() {
            *last &= (1u64 << (pages % 64)) - 1;
        }
    }
    missing
}

/// The destination's channel state during postcopy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// Pages flow.
    Up,
    /// The channel broke (why); waiting for `migrate_recover` and then for the source's
    /// connection.
    Paused(String),
    /// The source connected; the recovered channel is being set up.
    Recovering,
}

/// Why `migrate_recover` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Postcopy is not paused.
    NotPaused,
    /// An earlier `migrate_recover` still waits for the source.
    Pending,
}

#[derive(Debug)]
struct RelinkState {
    link: Link,
    listener: Option<Listener>,
    /// A listener was taken and waits for the source's connection.
    accepting: bool,
}

/// Where the destination's page reader waits for a new channel while postcopy is paused,
/// and where `migrate_recover` hands it the listener.
#[derive(Debug)]
pub struct Relink {
    state: Mutex<RelinkState>,
    cond: Condvar,
}

impl Default for Relink {
    fn default() -> Self {
        Relink {
            state: Mutex::new(RelinkState {
                link: Link::Up,
                listener: None,
                accepting: false,
            }),
            cond: Condvar::new(),
        }
    }
}

impl Relink {
    /// The state now.
    pub fn link(&self) -> Link {
        crate::vmm::lock(&self.state).link.clone()
    }

    /// The channel broke (or a recovery failed): paused until a listener is offered.
    pub fn pause(&self, why: String) {
        let mut st = crate::vmm::lock(&self.state);
        st.link = Link::Paused(why);
        st.accepting = false;
        self.cond.notify_all();
    }

    /// Whether `migrate_recover` would be taken now.
    pub fn check_offer(&self) -> Result<(), Refusal> {
        let st = crate::vmm::lock(&self.state);
        match st.link {
            Link::Paused(_) if st.accepting || st.listener.is_some() => Err(Refusal::Pending),
            Link::Paused(_) => Ok(()),
            Link::Up | Link::Recovering => Err(Refusal::NotPaused),
        }
    }

    /// The source connected to the recovery listener.
    pub fn recovering(&self) {
        let mut st = crate::vmm::lock(&self.state);
        st.link = Link::Recovering;
        st.accepting = false;
    }

    /// The recovered channel carries pages again.
    pub fn up(&self) {
        crate::vmm::lock(&self.state).link = Link::Up;
    }

    /// `migrate_recover`: hands over a bound listener (dropped if refused, see
    /// [`Relink::check_offer`]).
    pub fn offer(&self, listener: Listener) -> Result<(), Refusal> {
        self.check_offer()?;
        let mut st = crate::vmm::lock(&self.state);
        st.listener = Some(listener);
        self.cond.notify_all();
        Ok(())
    }

    /// Waits for a listener while paused (the state stays paused until
    /// [`Relink::recovering`]).
    pub fn next_listener(&self) -> Listener {
        let mut st = crate::vmm::lock(&self.state);
        loop {
            if let Some(l) = st.listener.take() {
                st.accepting = true;
                return l;
            }
            st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// `migrate -r URI` on a source in postcopy-paused: connects, learns which pages the
/// destination has, sends the rest (requests first) and waits for DONE. `prev` is the
/// paused migration's figures, which the new ones add to. Every failure leaves the
/// migration paused again ([`MigrateError::PostcopyLost`]).
pub fn resume(
    vm: &Vm,
    uri: &MigrateUri,
    obs: &dyn Observer,
    prev: &MigrationInfo,
) -> Result<Completed, MigrateError> {
    let start = Instant::now();
    let lost = MigrateError::PostcopyLost;
    let base = prev.ram.clone().unwrap_or_default();
    let info = |status: Status, c: &PostcopyCounters| MigrationInfo {
        status,
        total_time_ms: prev
            .total_time_ms
            .saturating_add(start.elapsed().as_millis().try_into().unwrap_or(u64::MAX)),
        ram: Some(RamInfo {
            transferred: base.transferred + c.bytes,
            remaining: c.remaining * PAGE_SIZE,
            duplicate: base.duplicate + c.zero,
            normal: base.normal + c.normal,
            postcopy_requests: base.postcopy_requests + c.requests,
            postcopy_bytes: base.postcopy_bytes + c.bytes,
            ..base.clone()
        }),
        ..prev.clone()
    };
    let ram = vm.ram();
    let pages = ram.len() as u64 / PAGE_SIZE;
    let mut out = source::connect(uri, obs).map_err(|e| lost(e.to_string()))?;
    obs.channel_open(out.aborter());
    let r = out
        .return_path()
        .ok_or_else(|| lost("postcopy recovery needs a tcp: or unix: URI".into()))?
        .map_err(|e| lost(format!("opening the return path: {e}")))?;
    let rp =
        ReturnPath::start(r, pages).map_err(|e| lost(format!("starting the return path: {e}")))?;
    write_resume_header(&mut out, pages)
        .map_err(|e| lost(format!("sending the resume header: {e}")))?;
    let received = rp.expect_bitmap(RESUME_WAIT).map_err(lost)?;
    let missing = missing_of(&received, pages);
    let bandwidth = obs.parameters().map_or(0, |p| p.max_postcopy_bandwidth);
    let c = postcopy::send_pages(&mut out, ram, missing, &rp, bandwidth, &mut |c| {
        obs.progress(&info(Status::PostcopyActive, c));
    })
    .map_err(lost)?;
    let _ = out.finish(FINISH_WAIT);
    Ok(Completed {
        info: info(Status::Completed, &c),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_header_round_trips_and_is_checked() {
        let mut b = Vec::new();
        write_resume_header(&mut b, 70).unwrap();
        assert_eq!(read_resume_header(&mut &b[..], 70), Ok(()));
        assert!(read_resume_header(&mut &b[..], 64)
            .unwrap_err()
            .contains("70 pages"));
        assert!(read_resume_header(&mut &b[..5], 70).is_err());
        let mut fresh = b"QEVM".to_vec();
        fresh.extend_from_slice(&[0; 8]);
        assert!(read_resume_header(&mut &fresh[..], 70)
            .unwrap_err()
            .contains("migrate -r"));
    }

    #[test]
    fn received_bitmap_is_bounded_by_our_ram() {
        let mut b = Vec::new();
        write_received(&mut b, 70, &[!0, 0b101]).unwrap();
        assert_eq!(
            u64::from_be_bytes(b[..8].try_into().unwrap()),
            RP_RECV_BITMAP
        );
        assert_eq!(read_received(&mut &b[8..], 70).unwrap(), vec![!0, 0b101]);
        // A count that is not ours is refused before anything is allocated for it.
        let mut huge = Vec::new();
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(read_received(&mut &huge[..], 70).is_err());
        assert!(read_received(&mut &b[8..20], 70).is_err());
        let mut beyond = Vec::new();
        write_received(&mut beyond, 70, &[0, 1 << 6]).unwrap();
        assert!(read_received(&mut &beyond[8..], 70).is_err());
    }

    #[test]
    fn missing_is_what_was_not_received_within_ram() {
        assert_eq!(missing_of(&[!0, 0b101], 70), vec![0, 0b11_1010]);
        assert_eq!(missing_of(&[], 64), vec![!0]);
    }

    #[test]
    fn a_listener_is_taken_only_while_paused() {
        let dir = tempfile::tempdir().unwrap();
        let uri = MigrateUri::Unix(dir.path().join("r.sock"));
        let relink = Relink::default();
        assert_eq!(
            relink.offer(Listener::bind(&uri).unwrap()),
            Err(Refusal::NotPaused)
        );
        relink.pause("cut".into());
        assert_eq!(relink.link(), Link::Paused("cut".into()));
        relink.offer(Listener::bind(&uri).unwrap()).unwrap();
        assert_eq!(relink.check_offer(), Err(Refusal::Pending));
        let _l = relink.next_listener();
        // Still paused (and still refusing a second listener) until the source connects.
        assert_eq!(relink.check_offer(), Err(Refusal::Pending));
        assert_eq!(relink.link(), Link::Paused("cut".into()));
        relink.recovering();
        assert_eq!(relink.link(), Link::Recovering);
        relink.pause("again".into());
        assert_eq!(relink.check_offer(), Ok(()));
        relink.up();
        assert_eq!(relink.link(), Link::Up);
    }
}
