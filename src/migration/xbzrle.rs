//! XBZRLE ("XOR-based zero run-length encoding"), QEMU's delta encoding of a page against the
//! copy of it sent before (`migration/xbzrle.c`), and the source's cache of sent pages
//! (`migration/page_cache.c`).
//!
//! Hand-written because no crate implements QEMU's wire format. An encoded page is a
//! sequence of `zrun nzrun` pairs over the XOR of old and new page:
//!
//! ```text
//! page  = zrun nzrun | zrun nzrun page
//! zrun  = length                 (bytes equal in both pages; 0 only as the very first run)
//! nzrun = length byte...         (length ≥ 1 bytes that differ, then the new bytes)
//! length = ULEB128, at most 14 bits (1 or 2 bytes)
//! ```
//!
//! A trailing run of equal bytes is not encoded. QEMU's encoder makes every run maximal (a
//! zrun ends at the first differing byte, an nzrun at the first equal one), so the encoding
//! of an (old, new) pair is unique, and ours gives the same bytes. It gives up (overflow)
//! when the encoding would not fit in `dlen` bytes, checking as QEMU does: two bytes must be
//! free before each run length, and the nzrun's data must fit.
//!
//! In the RAM section an XBZRLE page is `be64 (offset | 0x40 [| CONTINUE])`, the block idstr
//! unless CONTINUE, the byte [`ENCODING_FLAG_XBZRLE`], `be16 len` (≤ page size), and `len`
//! encoded bytes, applied on top of the destination's current copy of the page.

#![deny(unsafe_code)]

/// The encoding byte that follows an XBZRLE record's header (the only one QEMU defines).
pub const ENCODING_FLAG_XBZRLE: u8 = 0x1;

/// Largest run length the 14-bit ULEB128 carries.
const MAX_RUN: usize = 0x3fff;

/// Why an encoded page could not be applied (QEMU: "Failed to load XBZRLE page - decode
/// error!").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XbzrleError {
    /// The data ends inside a run length or before an nzrun's length.
    #[error("XBZRLE data ends inside a run at byte {at:#x}")]
    Truncated {
        /// Offset in the encoded data.
        at: usize,
    },
    /// A run length with more than 14 bits.
    #[error("XBZRLE run length at byte {at:#x} exceeds 14 bits")]
    LongLength {
        /// Offset in the encoded data.
        at: usize,
    },
    /// A zero-length zrun after the first pair, or a zero-length nzrun.
    #[error("XBZRLE empty run at byte {at:#x}")]
    EmptyRun {
        /// Offset in the encoded data.
        at: usize,
    },
    /// Runs reaching past the end of the page.
    #[error(
        "XBZRLE run at byte {at:#x} reaches page byte {end:#x}, past the page of {page:#x} bytes"
    )]
    PastPage {
        /// Offset in the encoded data.
        at: usize,
        /// Page offset the run would end at.
        end: usize,
        /// Page size.
        page: usize,
    },
    /// An nzrun longer than the data left.
    #[error("XBZRLE run at byte {at:#x} has {len:#x} bytes, only {left:#x} are left")]
    ShortData {
        /// Offset in the encoded data.
        at: usize,
        /// The run's length.
        len: usize,
        /// Bytes left in the encoded data.
        left: usize,
    },
}

fn put_len(dst: &mut Vec<u8>, n: usize) {
    debug_assert!(n <= MAX_RUN);
    if n < 0x80 {
        dst.push(n as u8);
    } else {
        dst.push((n & 0x7f) as u8 | 0x80);
        dst.push((n >> 7) as u8);
    }
}

/// Reads a 14-bit ULEB128 at `src[at..]`; `None` if its second byte has the high bit.
fn get_len(src: &[u8], at: usize) -> Option<(usize, usize)> {
    let b0 = src[at];
    if b0 & 0x80 == 0 {
        return Some((usize::from(b0), 1));
    }
    let b1 = src[at + 1];
    if b1 & 0x80 != 0 {
        return None;
    }
    Some((usize::from(b0 & 0x7f) | usize::from(b1) << 7, 2))
}

/// Encodes `new` against `old` (same length, at most 16 KiB so that every run fits 14 bits)
/// into `dst` (cleared first), QEMU's `xbzrle_encode_buffer` with `dlen`: `Some(0)` when the
/// pages are equal (nothing to send), `None` on overflow (the encoding needs more than
/// `dlen` bytes), else `Some(len)` with `dst` holding the `len` encoded bytes.
pub fn encode(old: &[u8], new: &[u8], dlen: usize, dst: &mut Vec<u8>) -> Option<usize> {
    assert_eq!(old.len(), new.len(), "XBZRLE pages of different sizes");
    assert!(old.len() <= MAX_RUN + 1, "XBZRLE page larger than 16 KiB");
    dst.clear();
    let n = old.len();
    let mut i = 0;
    while i < n {
        if dst.len() + 2 > dlen {
            return None;
        }
        let z = run_len(old, new, i, true);
        i += z;
        if i == n {
            // Equal to the end: a trailing zrun is not encoded.
            return Some(dst.len());
        }
        put_len(dst, z);
        if dst.len() + 2 > dlen {
            return None;
        }
        let nz = run_len(old, new, i, false);
        put_len(dst, nz);
        if dst.len() + nz > dlen {
            return None;
        }
        dst.extend_from_slice(&new[i..i + nz]);
        i += nz;
    }
    Some(dst.len())
}

/// Length of the run starting at `from` of bytes that are equal (`equal`) or differ.
fn run_len(old: &[u8], new: &[u8], from: usize, equal: bool) -> usize {
    // Eight bytes at a time while a whole word is equal (zrun) or has no equal byte (nzrun).
    let mut i = from;
    while i + 8 <= old.len() {
        let a = u64::from_ne_bytes(old[i..i + 8].try_into().unwrap_or_default());
        let b = u64::from_ne_bytes(new[i..i + 8].try_into().unwrap_or_default());
        let x = a ^ b;
        let whole = if equal {
            x == 0
        } else {
            // No zero byte in x (the classic has-zero-byte test, negated).
            x.wrapping_sub(0x0101_0101_0101_0101) & !x & 0x8080_8080_8080_8080 == 0
        };
        if !whole {
            break;
        }
        i += 8;
    }
    while i < old.len() && (old[i] == new[i]) == equal {
        i += 1;
    }
    i - from
}

/// Applies `src` (one encoded page) to `page` in place, with QEMU's `xbzrle_decode_buffer`
/// rules: every run stays inside the page and the data, lengths are at most 14 bits, only
/// the first zrun may be empty, no nzrun is. On error `page` may be partly updated (the
/// destination's copy of a page is undefined after a failed load, as in QEMU).
pub fn decode(src: &[u8], page: &mut [u8]) -> Result<usize, XbzrleError> {
    let (mut i, mut d) = (0usize, 0usize);
    while i < src.len() {
        if src.len() - i < 2 {
            return Err(XbzrleError::Truncated { at: i });
        }
        let (z, w) = get_len(src, i).ok_or(XbzrleError::LongLength { at: i })?;
        if i != 0 && z == 0 {
            return Err(XbzrleError::EmptyRun { at: i });
        }
        let at = i;
        i += w;
        d += z;
        if d > page.len() {
            return Err(XbzrleError::PastPage {
                at,
                end: d,
                page: page.len(),
            });
        }
        if src.len() - i < 2 {
            return Err(XbzrleError::Truncated { at: i });
        }
        let at = i;
        let (nz, w) = get_len(src, i).ok_or(XbzrleError::LongLength { at })?;
        if nz == 0 {
            return Err(XbzrleError::EmptyRun { at });
        }
        i += w;
        if d + nz > page.len() {
            return Err(XbzrleError::PastPage {
                at,
                end: d + nz,
                page: page.len(),
            });
        }
        if nz > src.len() - i {
            return Err(XbzrleError::ShortData {
                at,
                len: nz,
                left: src.len() - i,
            });
        }
        page[d..d + nz].copy_from_slice(&src[i..i + nz]);
        d += nz;
        i += nz;
    }
    Ok(d)
}

/// The source's copy of pages already sent, QEMU's `PageCache`: `cache size / page size`
/// slots rounded down to a power of two, a page's slot chosen by its page number; a slot
/// holding another page is taken over only once that page is two dirty-bitmap syncs old.
#[derive(Debug)]
pub struct PageCache {
    page_size: usize,
    slots: Vec<Slot>,
    data: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Page address + 1 (0 = empty).
    tag: u64,
    age: u64,
}

impl PageCache {
    /// A cache of at most `cache_size` bytes of `page_size` pages (at least one slot). The
    /// page data is allocated as slots fill.
    pub fn new(cache_size: u64, page_size: usize) -> Self {
        let pages = (cache_size / page_size as u64).max(1);
        let slots = 1usize << (63 - pages.leading_zeros()).min(40);
        PageCache {
            page_size,
            slots: vec![Slot { tag: 0, age: 0 }; slots],
            data: Vec::new(),
        }
    }

    /// Number of page slots.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Bytes the cache may hold.
    pub fn size(&self) -> u64 {
        (self.slots.len() * self.page_size) as u64
    }

    fn index(&self, addr: u64) -> usize {
        ((addr / self.page_size as u64) as usize) & (self.slots.len() - 1)
    }

    /// The cached copy of the page at `addr`, if it is cached; a hit makes the entry as
    /// young as `age` (QEMU's `cache_is_cached`).
    pub fn get_mut(&mut self, addr: u64, age: u64) -> Option<&mut [u8]> {
        let i = self.index(addr);
        if self.slots[i].tag != addr.wrapping_add(1) {
            return None;
        }
        self.slots[i].age = age;
        let ps = self.page_size;
        self.data.get_mut(i * ps..(i + 1) * ps)
    }

    /// Caches `page` as the copy of `addr` at sync `age`; false when the slot holds another
    /// page cached less than two syncs ago (QEMU keeps fresh entries).
    pub fn insert(&mut self, addr: u64, page: &[u8], age: u64) -> bool {
        let i = self.index(addr);
        let s = self.slots[i];
        if s.tag != 0 && s.tag != addr.wrapping_add(1) && s.age + 2 > age {
            return false;
        }
        let ps = self.page_size;
        if self.data.len() < (i + 1) * ps {
            self.data.resize((i + 1) * ps, 0);
        }
        self.data[i * ps..(i + 1) * ps].copy_from_slice(page);
        self.slots[i] = Slot {
            tag: addr.wrapping_add(1),
            age,
        };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(old: &[u8], new: &[u8]) -> Option<usize> {
        let mut enc = Vec::new();
        let n = encode(old, new, old.len(), &mut enc)?;
        assert_eq!(n, enc.len());
        let mut page = old.to_vec();
        decode(&enc, &mut page).unwrap();
        assert_eq!(page, new);
        Some(n)
    }

    #[test]
    fn runs_are_maximal_and_bytes_as_qemu_writes_them() {
        let old = vec![0u8; 4096];
        let mut new = old.clone();
        assert_eq!(roundtrip(&old, &new), Some(0));
        new[0] = 1;
        let mut enc = Vec::new();
        encode(&old, &new, 4096, &mut enc).unwrap();
        // first zrun empty, nzrun of 1, the byte, no trailing zrun
        assert_eq!(enc, [0, 1, 1]);
        new[200..203].copy_from_slice(&[7, 8, 9]);
        encode(&old, &new, 4096, &mut enc).unwrap();
        // zrun 199 = 0xc7 0x01 (ULEB128)
        assert_eq!(enc, [0, 1, 1, 0xc7, 0x01, 3, 7, 8, 9]);
        new[4095] = 5;
        assert_eq!(roundtrip(&old, &new), Some(13));
    }

    #[test]
    fn random_pairs_roundtrip_or_overflow() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..300 {
            let old: Vec<u8> = (0..4096).map(|_| rnd() as u8).collect();
            let mut new = old.clone();
            let changes = (rnd() % (round as u64 * 8 + 1)) as usize;
            for _ in 0..changes {
                let at = (rnd() % 4096) as usize;
                new[at] = new[at].wrapping_add(1 + (rnd() % 255) as u8);
            }
            if roundtrip(&old, &new).is_none() {
                assert!(changes > 1000, "overflow with only {changes} changes");
            }
        }
        // Every byte different: always overflows.
        let new: Vec<u8> = vec![1; 4096];
        assert_eq!(roundtrip(&[0; 4096], &new), None);
    }

    #[test]
    fn malformed_data_is_an_error_not_a_write_past_the_page() {
        let mut page = vec![0u8; 4096];
        let cases: &[(&[u8], &str)] = &[
            (&[0], "ends inside"),
            (&[0, 1], "ends inside"),
            (&[0xff, 0xff, 1, 1], "exceeds 14 bits"),
            (&[0, 0, 1], "empty run"),
            (&[0, 1, 1, 0, 1, 1], "empty run"),
            (&[0x80, 0x20, 1, 1], "past the page"),
            (&[0xff, 0x1f, 2, 1, 1], "past the page"),
            (&[0, 4, 1, 2], "only 0x2 are left"),
        ];
        for (data, msg) in cases {
            let e = decode(data, &mut page).unwrap_err().to_string();
            assert!(e.contains(msg), "{data:?}: {e}");
        }
        assert_eq!(decode(&[0xff, 0x1f, 1, 9], &mut page), Ok(4096));
        assert_eq!(page[4095], 9);
    }

    #[test]
    fn cache_is_bounded_and_keeps_fresh_entries() {
        let mut c = PageCache::new(3 * 4096 + 100, 4096);
        assert_eq!((c.slots(), c.size()), (2, 8192));
        assert!(c.insert(0, &[1; 4096], 1));
        assert!(c.get_mut(4096, 1).is_none());
        // page 2 maps to slot 0, which page 0 took one sync ago: kept
        assert!(!c.insert(2 * 4096, &[2; 4096], 2));
        assert_eq!(c.get_mut(0, 1).unwrap()[0], 1);
        assert!(c.insert(2 * 4096, &[2; 4096], 3));
        assert!(c.get_mut(0, 3).is_none());
        assert_eq!(c.get_mut(2 * 4096, 3).unwrap()[0], 2);
        assert_eq!(PageCache::new(0, 4096).slots(), 1);
    }
}
