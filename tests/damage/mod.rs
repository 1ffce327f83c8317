//! Seeded random damage to a qcow2 image's metadata, for tests/qcow2_random_damage.rs.
//!
//! The image is parsed just enough to aim at its metadata (header fields, active and
//! snapshot L1 entries, L2 entries, refcount table entries, refcount block entries, snapshot
//! table fields); one field is then changed in one of a few ways that real damage takes: a
//! flipped bit, zero, all ones, a random value, a small shift, another structure's offset, an
//! offset past the end of the file, or reserved bits set.

use super::common::Rng;

/// Big-endian field access.
fn get(d: &[u8], off: usize, w: usize) -> u64 {
    d.get(off..off + w)
        .map_or(0, |b| b.iter().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
}

fn put(d: &mut [u8], off: usize, w: usize, v: u64) {
    if let Some(b) = d.get_mut(off..off + w) {
        for (i, x) in b.iter_mut().enumerate() {
            *x = (v >> (8 * (w - 1 - i))) as u8;
        }
    }
}

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// What the damage aims at.
#[derive(Debug, Default)]
struct Map {
    cs: u64,
    file_len: u64,
    /// (offset, width, what) of every field that may be hit.
    header: Vec<(usize, usize, &'static str)>,
    l1: Vec<usize>,
    l2: Vec<usize>,
    reftable: Vec<usize>,
    refblock: Vec<(usize, usize)>,
    snap_fields: Vec<(usize, usize, &'static str)>,
    snap_l1: Vec<usize>,
    /// Offsets of metadata structures, to point damaged entries at.
    structures: Vec<u64>,
}

fn aligned_inside(off: u64, cs: u64, len: u64) -> bool {
    off != 0 && off % cs == 0 && off + cs <= len
}

fn map(d: &[u8]) -> Map {
    let len = d.len() as u64;
    let cluster_bits = get(d, 20, 4);
    if !(9..=21).contains(&cluster_bits) || len < 104 {
        return Map::default();
    }
    let cs = 1u64 << cluster_bits;
    let version = get(d, 4, 4);
    let mut m = Map {
        cs,
        file_len: len,
        ..Default::default()
    };
    m.header = vec![
        (4, 4, "version"),
        (20, 4, "cluster_bits"),
        (24, 8, "size"),
        (36, 4, "l1_size"),
        (40, 8, "l1_table_offset"),
        (48, 8, "refcount_table_offset"),
        (56, 4, "refcount_table_clusters"),
        (60, 4, "nb_snapshots"),
        (64, 8, "snapshots_offset"),
    ];
    if version >= 3 {
        m.header.extend([
            (72, 8, "incompatible_features"),
            (80, 8, "compatible_features"),
            (88, 8, "autoclear_features"),
            (96, 4, "refcount_order"),
            (100, 4, "header_length"),
        ]);
    }
    let refcount_order = if version >= 3 { get(d, 96, 4) } else { 4 };
    let l1_off = get(d, 40, 8);
    let l1_size = get(d, 36, 4).min(1 << 16);
    let rt_off = get(d, 48, 8);
    let rt_len = (get(d, 56, 4) * cs).min(1 << 20);
    m.structures.extend([0, l1_off, rt_off]);
    let add_l1 = |m: &mut Map, off: u64, n: u64, active: bool| {
        for i in 0..n {
            let at = off + i * 8;
            if at + 8 > len {
                break;
            }
            if active {
                m.l1.push(at as usize);
            } else {
                m.snap_l1.push(at as usize);
            }
            let l2 = get(d, at as usize, 8) & OFFSET_MASK;
            if aligned_inside(l2, cs, len) {
                m.structures.push(l2);
                let es = if get(d, 72, 8) & 16 != 0 { 16 } else { 8 };
                for j in 0..cs / es {
                    m.l2.push((l2 + j * es) as usize);
                }
            }
        }
    };
    add_l1(&mut m, l1_off, l1_size, true);
    for i in 0..rt_len / 8 {
        let at = rt_off + i * 8;
        if at + 8 > len {
            break;
        }
        m.reftable.push(at as usize);
        let rb = get(d, at as usize, 8) & OFFSET_MASK;
        if aligned_inside(rb, cs, len) && refcount_order <= 6 {
            m.structures.push(rb);
            let bits = 1u64 << refcount_order;
            for j in 0..(cs * 8 / bits).min(len.div_ceil(cs)) {
                let bit = j * bits;
                // Byte-sized (or wider) fields are hit whole; narrower ones through their byte.
                m.refblock
                    .push(((rb + bit / 8) as usize, (bits / 8).max(1) as usize));
            }
        }
    }
    let mut p = get(d, 64, 8);
    m.structures.push(p);
    for _ in 0..get(d, 60, 4).min(64) {
        if p + 40 > len {
            break;
        }
        let e = p as usize;
        m.snap_fields.extend([
            (e, 8, "snapshot l1_table_offset"),
            (e + 8, 4, "snapshot l1_size"),
            (e + 12, 2, "snapshot id_str_size"),
            (e + 14, 2, "snapshot name_size"),
            (e + 32, 4, "snapshot vm_state_size"),
            (e + 36, 4, "snapshot extra_data_size"),
        ]);
        let extra = get(d, e + 36, 4);
        if extra >= 16 {
            m.snap_fields.push((e + 48, 8, "snapshot disk_size"));
        }
        let sl1 = get(d, e, 8);
        m.structures.push(sl1);
        add_l1(&mut m, sl1, get(d, e + 8, 4).min(1 << 16), false);
        p += (40 + extra + get(d, e + 12, 2) + get(d, e + 14, 2)).div_ceil(8) * 8;
    }
    m
}

/// A new value for a field of `w` bytes holding `old`.
fn mutate(rng: &mut Rng, m: &Map, old: u64, w: usize, entry: bool) -> (u64, &'static str) {
    let mask = if w == 8 {
        u64::MAX
    } else {
        (1u64 << (w * 8)) - 1
    };
    let flags = old & !OFFSET_MASK;
    let v = match rng.below(if entry { 10 } else { 7 }) {
        0 => return ((old ^ (1 << rng.below(w as u64 * 8))) & mask, "bit flip"),
        1 => return (0, "zero"),
        2 => return (mask, "all ones"),
        3 => return (rng.next() & mask, "random"),
        4 => {
            let delta = [1, 8, 0x200, m.cs][rng.below(4) as usize];
            let v = if rng.below(2) == 0 {
                old.wrapping_add(delta)
            } else {
                old.wrapping_sub(delta)
            };
            return (v & mask, "shifted");
        }
        5 => {
            let t = m.structures[rng.below(m.structures.len() as u64) as usize];
            return (
                (if entry { flags | t } else { t }) & mask,
                "another structure",
            );
        }
        6 => {
            let past = [
                m.file_len.div_ceil(m.cs) * m.cs,
                m.file_len + 8 * m.cs,
                1 << 40,
            ];
            let t = past[rng.below(3) as usize];
            return ((if entry { flags | t } else { t }) & mask, "past EOF");
        }
        7 => (old | (1 << (1 + rng.below(8)))) & mask,
        8 => (old | (1 << (56 + rng.below(6)))) & mask,
        _ => (old ^ (1 << 63)) & mask,
    };
    (v, "reserved or flag bits")
}

/// Damages one metadata field of `d` in place; returns a description (empty when the
/// image gave nothing to aim at).
pub fn damage(d: &mut [u8], rng: &mut Rng) -> String {
    let m = map(d);
    if m.cs == 0 {
        return String::new();
    }
    for _ in 0..16 {
        let (at, w, what, entry) = match rng.below(7) {
            0 => {
                let (o, w, n) = m.header[rng.below(m.header.len() as u64) as usize];
                (o, w, n, false)
            }
            1 => pick(rng, d, &m.l1, "active L1 entry"),
            2 => pick(rng, d, &m.l2, "L2 entry"),
            3 => pick(rng, d, &m.reftable, "refcount table entry"),
            4 if !m.refblock.is_empty() => {
                let (o, w) = m.refblock[rng.below(m.refblock.len() as u64) as usize];
                (o, w, "refcount block entry", false)
            }
            5 if !m.snap_fields.is_empty() => {
                let (o, w, n) = m.snap_fields[rng.below(m.snap_fields.len() as u64) as usize];
                (o, w, n, false)
            }
            6 => pick(rng, d, &m.snap_l1, "snapshot L1 entry"),
            _ => continue,
        };
        if what.is_empty() {
            continue;
        }
        let old = get(d, at, w);
        let (new, how) = if what == "refcount block entry" && rng.below(2) == 0 {
            let v = if rng.below(2) == 0 {
                old.wrapping_add(1)
            } else {
                old.wrapping_sub(1)
            };
            (
                v & if w == 8 { u64::MAX } else { (1 << (w * 8)) - 1 },
                "off by one",
            )
        } else {
            mutate(rng, &m, old, w, entry)
        };
        if new == old {
            continue;
        }
        put(d, at, w, new);
        return format!("{what} at {at:#x}: {old:#x} -> {new:#x} ({how})");
    }
    String::new()
}

/// A table entry to damage, preferring entries in use (7 times in 8).
fn pick(
    rng: &mut Rng,
    d: &[u8],
    list: &[usize],
    what: &'static str,
) -> (usize, usize, &'static str, bool) {
    if list.is_empty() {
        return (0, 0, "", true);
    }
    let mut at = list[rng.below(list.len() as u64) as usize];
    if rng.below(8) != 0 {
        for _ in 0..64 {
            if get(d, at, 8) != 0 {
                break;
            }
            at = list[rng.below(list.len() as u64) as usize];
        }
    }
    (at, 8, what, true)
}
