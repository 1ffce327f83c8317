//! `--diff`: what differs between two streams or snapshots. Sections on one side only;
//! per device the fields whose decoded values differ (paths as in the `--dump state` JSON),
//! subsections that appear or disappear, and description changes (types, sizes, versions);
//! per RAM block how many pages differ and where. RAM is compared page by page from the page
//! positions of [`crate::pages`], never through JSON.

use serde::Serialize;
use serde_json::{Map, Value as Json};

use crate::pages::{PageIndex, PageReader, PagesError};
use crate::side::Side;

/// Most page ranges listed per block in the human output (the JSON has all).
const HUMAN_RANGES: usize = 16;

/// A device section, by idstr and instance id (section ids are stream-local).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SectionKey {
    /// idstr.
    pub idstr: String,
    /// Instance id.
    pub instance_id: u32,
}

impl std::fmt::Display for SectionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (instance {})", self.idstr, self.instance_id)
    }
}

/// A field whose value differs (`null` on the side that lacks it).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldChange {
    /// Path: JSON keys joined with `.`, array elements as `[i]`.
    pub path: String,
    /// Value on the left side.
    pub old: Json,
    /// Value on the right side.
    pub new: Json,
}

/// Everything that differs in one device.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DeviceDiff {
    /// idstr.
    pub idstr: String,
    /// Instance id.
    pub instance_id: u32,
    /// Fields whose values differ.
    pub fields: Vec<FieldChange>,
    /// Subsections sent only on the right side.
    pub subsections_added: Vec<String>,
    /// Subsections sent only on the left side.
    pub subsections_removed: Vec<String>,
    /// Differences of the vmdesc descriptions.
    pub description: Vec<String>,
}

impl DeviceDiff {
    fn is_empty(&self) -> bool {
        self.fields.is_empty()
            && self.subsections_added.is_empty()
            && self.subsections_removed.is_empty()
            && self.description.is_empty()
    }
}

/// RAM differences of one block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RamDiff {
    /// Block name.
    pub block: String,
    /// Length on the left side (`None`: the block is only on the right).
    pub old_length: Option<u64>,
    /// Length on the right side.
    pub new_length: Option<u64>,
    /// Pages whose contents differ (pages beyond the shorter length count as different).
    pub pages_differ: u64,
    /// Inclusive byte ranges `0xSTART-0xEND` of the differing pages (offsets in the block).
    pub ranges: Vec<String>,
}

/// The whole comparison.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// Left side.
    pub old: String,
    /// Right side.
    pub new: String,
    /// Machine names, when they differ.
    pub machine: Option<[Option<String>; 2]>,
    /// Sections only on the left side.
    pub only_old: Vec<SectionKey>,
    /// Sections only on the right side.
    pub only_new: Vec<SectionKey>,
    /// Devices that differ.
    pub devices: Vec<DeviceDiff>,
    /// RAM blocks that differ.
    pub ram: Vec<RamDiff>,
}

impl Report {
    /// True when nothing differs.
    pub fn is_same(&self) -> bool {
        self.machine.is_none()
            && self.only_old.is_empty()
            && self.only_new.is_empty()
            && self.devices.is_empty()
            && self.ram.is_empty()
    }
}

/// START/FULL sections of a side, in stream order.
fn sections(side: &Side) -> Vec<SectionKey> {
    let mut out: Vec<SectionKey> = Vec::new();
    for r in &side.analysis.rows {
        if let (Some(_), Some(inst), "START" | "FULL") = (r.section_id, r.instance_id, r.kind) {
            let k = SectionKey {
                idstr: r.idstr.clone(),
                instance_id: inst,
            };
            if !out.contains(&k) {
                out.push(k);
            }
        }
    }
    out
}

/// The vmdesc entry of a device.
fn desc_of<'a>(side: &'a Side, k: &SectionKey) -> Option<&'a Json> {
    side.analysis
        .desc
        .as_ref()?
        .get("devices")?
        .as_array()?
        .iter()
        .find(|d| {
            d.get("name").and_then(Json::as_str) == Some(&k.idstr)
                && d.get("instance_id").and_then(Json::as_u64) == Some(u64::from(k.instance_id))
        })
}

/// Names of all subsections a description has, at any depth.
fn subsection_names(desc: &Json, out: &mut Vec<String>) {
    match desc {
        Json::Object(m) => {
            if let Some(Json::Array(subs)) = m.get("subsections") {
                for s in subs {
                    if let Some(n) = s.get("vmsd_name").and_then(Json::as_str) {
                        out.push(n.to_string());
                    }
                }
            }
            for v in m.values() {
                subsection_names(v, out);
            }
        }
        Json::Array(a) => a.iter().for_each(|v| subsection_names(v, out)),
        _ => {}
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Compares two decoded values (analyze JSON) and records what differs.
fn diff_values(path: &str, a: &Json, b: &Json, subs: &[String], d: &mut DeviceDiff) {
    match (a, b) {
        (Json::Object(x), Json::Object(y)) => diff_objects(path, x, y, subs, d),
        (Json::Array(x), Json::Array(y)) if x.len() == y.len() => {
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                diff_values(&format!("{path}[{i}]"), u, v, subs, d);
            }
        }
        (Json::String(x), Json::String(y)) if x != y && byte_runs(path, x, y, d) => {}
        _ if a != b => d.fields.push(FieldChange {
            path: path.to_string(),
            old: a.clone(),
            new: b.clone(),
        }),
        _ => {}
    }
}

/// The bytes of a byte string as the JSON prints buffers (`"0a 1b …"`), if it is one.
fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    if s.len() < 5 || s.len() % 3 != 2 {
        return None;
    }
    s.split(' ')
        .map(|t| {
            (t.len() == 2)
                .then(|| u8::from_str_radix(t, 16).ok())
                .flatten()
        })
        .collect()
}

/// For two byte strings of one length, one change per run of differing bytes
/// (`path[0x10..0x13]`, end exclusive) instead of the whole buffers. False if they are not
/// such strings.
fn byte_runs(path: &str, a: &str, b: &str, d: &mut DeviceDiff) -> bool {
    let (Some(x), Some(y)) = (hex_bytes(a), hex_bytes(b)) else {
        return false;
    };
    if x.len() != y.len() {
        return false;
    }
    let hex = |v: &[u8]| {
        Json::from(
            v.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" "),
        )
    };
    let mut i = 0;
    while i < x.len() {
        if x[i] == y[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < x.len() && x[i] != y[i] {
            i += 1;
        }
        let at = if i - start == 1 {
            format!("{path}[{start:#x}]")
        } else {
            format!("{path}[{start:#x}..{i:#x}]")
        };
        d.fields.push(FieldChange {
            path: at,
            old: hex(&x[start..i]),
            new: hex(&y[start..i]),
        });
    }
    true
}

fn diff_objects(
    path: &str,
    x: &Map<String, Json>,
    y: &Map<String, Json>,
    subs: &[String],
    d: &mut DeviceDiff,
) {
    for (k, u) in x {
        match y.get(k) {
            Some(v) => diff_values(&join(path, k), u, v, subs, d),
            None if subs.contains(k) => d.subsections_removed.push(join(path, k)),
            None => d.fields.push(FieldChange {
                path: join(path, k),
                old: u.clone(),
                new: Json::Null,
            }),
        }
    }
    for (k, v) in y {
        if x.contains_key(k) {
            continue;
        }
        if subs.contains(k) {
            d.subsections_added.push(join(path, k));
        } else {
            d.fields.push(FieldChange {
                path: join(path, k),
                old: Json::Null,
                new: v.clone(),
            });
        }
    }
}

fn short(j: Option<&Json>) -> String {
    j.map_or_else(|| "-".to_string(), |v| v.to_string().replace('"', ""))
}

/// Description differences of two vmdesc entries (device or struct): name, version, fields by
/// position (name, type, size, array length, nested structs) and subsections.
fn diff_desc(path: &str, a: &Json, b: &Json, out: &mut Vec<String>) {
    for key in ["vmsd_name", "version"] {
        if a.get(key) != b.get(key) {
            out.push(format!(
                "{}{key} {} -> {}",
                if path.is_empty() {
                    String::new()
                } else {
                    format!("{path}: ")
                },
                short(a.get(key)),
                short(b.get(key))
            ));
        }
    }
    let empty = Vec::new();
    let fa = a.get("fields").and_then(Json::as_array).unwrap_or(&empty);
    let fb = b.get("fields").and_then(Json::as_array).unwrap_or(&empty);
    for i in 0..fa.len().max(fb.len()) {
        match (fa.get(i), fb.get(i)) {
            (Some(x), Some(y)) => {
                let name = short(x.get("name"));
                if x.get("name") != y.get("name") {
                    out.push(format!(
                        "field #{i} of {}: {name} -> {}",
                        if path.is_empty() { "the device" } else { path },
                        short(y.get("name"))
                    ));
                    continue;
                }
                let p = join(path, &name);
                for key in ["type", "size", "array_len"] {
                    if x.get(key) != y.get(key) {
                        out.push(format!(
                            "{p}: {key} {} -> {}",
                            short(x.get(key)),
                            short(y.get(key))
                        ));
                    }
                }
                match (x.get("struct"), y.get("struct")) {
                    (Some(s), Some(t)) => diff_desc(&p, s, t, out),
                    _ if x.get("fields").is_some() => diff_desc(&p, x, y, out),
                    _ => {}
                }
            }
            (Some(x), None) => out.push(format!(
                "{}: field only in the old description",
                join(path, &short(x.get("name")))
            )),
            (None, Some(y)) => out.push(format!(
                "{}: field only in the new description",
                join(path, &short(y.get("name")))
            )),
            (None, None) => {}
        }
    }
    let subs = |d: &Json| -> Vec<Json> {
        d.get("subsections")
            .and_then(Json::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let (sa, sb) = (subs(a), subs(b));
    for s in &sa {
        let name = s.get("vmsd_name");
        match sb.iter().find(|t| t.get("vmsd_name") == name) {
            Some(t) => diff_desc(&join(path, &short(name)), s, t, out),
            None => out.push(format!(
                "subsection {} only in the old description",
                short(name)
            )),
        }
    }
    for t in &sb {
        if !sa.iter().any(|s| s.get("vmsd_name") == t.get("vmsd_name")) {
            out.push(format!(
                "subsection {} only in the new description",
                short(t.get("vmsd_name"))
            ));
        }
    }
}

/// Compares the device sections of two sides.
fn diff_devices(a: &Side, b: &Side, r: &mut Report) {
    let (sa, sb) = (sections(a), sections(b));
    r.only_old = sa
        .iter()
        .filter(|k| !sb.contains(k) && k.idstr != "ram")
        .cloned()
        .collect();
    r.only_new = sb
        .iter()
        .filter(|k| !sa.contains(k) && k.idstr != "ram")
        .cloned()
        .collect();
    for k in sa.iter().filter(|k| sb.contains(k) && k.idstr != "ram") {
        let mut d = DeviceDiff {
            idstr: k.idstr.clone(),
            instance_id: k.instance_id,
            ..DeviceDiff::default()
        };
        let (da, db) = (desc_of(a, k), desc_of(b, k));
        if let (Some(x), Some(y)) = (da, db) {
            diff_desc("", x, y, &mut d.description);
        }
        let mut subs = Vec::new();
        da.into_iter()
            .chain(db)
            .for_each(|x| subsection_names(x, &mut subs));
        let value = |s: &Side| {
            s.analysis
                .devices
                .iter()
                .find(|dev| dev.idstr == k.idstr && dev.instance_id == k.instance_id)
                .and_then(|dev| dev.value.as_ref())
                .map(vmsnap::migration::value::Value::to_analyze_json)
        };
        match (value(a), value(b)) {
            (Some(x), Some(y)) => diff_values("", &x, &y, &subs, &mut d),
            (x, y) if x.is_some() != y.is_some() => d.description.push(format!(
                "decoded only on the {} side",
                if x.is_some() { "old" } else { "new" }
            )),
            _ => {}
        }
        if !d.is_empty() {
            r.devices.push(d);
        }
    }
}

/// Inclusive byte ranges of runs of page numbers.
fn ranges(pages: &[u64], page_size: u64) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < pages.len() {
        let start = pages[i];
        let mut end = start;
        while i + 1 < pages.len() && pages[i + 1] == end + 1 {
            i += 1;
            end += 1;
        }
        out.push(format!(
            "{:#x}-{:#x}",
            start * page_size,
            (end + 1) * page_size - 1
        ));
        i += 1;
    }
    out
}

/// Compares RAM page by page.
fn diff_ram(
    ia: &PageIndex,
    ib: &PageIndex,
    ra: &mut PageReader<'_>,
    rb: &mut PageReader<'_>,
) -> Result<Vec<RamDiff>, PagesError> {
    let ps = ia.page_size;
    let mut out = Vec::new();
    let mut names: Vec<&str> = ia.blocks.iter().map(|b| b.name.as_str()).collect();
    for b in &ib.blocks {
        if !names.contains(&b.name.as_str()) {
            names.push(&b.name);
        }
    }
    let (mut pa, mut pb) = (vec![0u8; ps as usize], vec![0u8; ps as usize]);
    for name in names {
        let (ba, bb) = (ia.block(name), ib.block(name));
        let count = |b: Option<&crate::pages::Block>| b.map_or(0, |b| b.page_count(ps));
        let (na, nb) = (count(ba), count(bb));
        let mut differ = Vec::new();
        for n in 0..na.max(nb) {
            let (Some(x), Some(y), true) = (ba, bb, n < na.min(nb)) else {
                differ.push(n);
                continue;
            };
            let (la, lb) = (x.loc(n), y.loc(n));
            if ps_equal_fast(la, lb) {
                continue;
            }
            ra.read(la, &mut pa)?;
            rb.read(lb, &mut pb)?;
            if pa != pb {
                differ.push(n);
            }
        }
        let (old_length, new_length) = (ba.map(|b| b.len), bb.map(|b| b.len));
        if !differ.is_empty() || old_length != new_length {
            out.push(RamDiff {
                block: name.to_string(),
                old_length,
                new_length,
                pages_differ: differ.len() as u64,
                ranges: ranges(&differ, ps),
            });
        }
    }
    Ok(out)
}

/// Pages known equal without reading them: the same fill byte (absent pages read as zeros).
fn ps_equal_fast(a: crate::pages::Loc, b: crate::pages::Loc) -> bool {
    use crate::pages::Loc;
    let fill = |l: Loc| match l {
        Loc::Absent => Some(0),
        Loc::Fill(f) => Some(f),
        _ => None,
    };
    matches!((fill(a), fill(b)), (Some(x), Some(y)) if x == y)
}

/// Compares side `a` (old) with side `b` (new).
pub fn diff(a: &mut Side, b: &mut Side) -> Result<Report, crate::InspectError> {
    let mut r = Report {
        old: a.label(),
        new: b.label(),
        ..Report::default()
    };
    if a.analysis.machine != b.analysis.machine {
        r.machine = Some([a.analysis.machine.clone(), b.analysis.machine.clone()]);
    }
    diff_devices(a, b, &mut r);
    if a.analysis.page_size != b.analysis.page_size {
        return Err(crate::InspectError::Side {
            label: b.label(),
            reason: format!(
                "target page size {:#x} differs from the other side's {:#x}",
                b.analysis.page_size, a.analysis.page_size
            ),
        });
    }
    let (ia, ib) = (a.page_index()?, b.page_index()?);
    let (la, lb) = (a.label(), b.label());
    let mut sa = a.input.read_at()?;
    let mut sb = b.input.read_at()?;
    let (mut ra, mut rb) = (PageReader::new(&mut *sa), PageReader::new(&mut *sb));
    r.ram = diff_ram(&ia, &ib, &mut ra, &mut rb).map_err(|e| crate::InspectError::Side {
        label: format!("{la} / {lb}"),
        reason: e.to_string(),
    })?;
    Ok(r)
}

fn show(j: &Json) -> String {
    match j {
        Json::Null => "(absent)".into(),
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The report for a terminal (empty when nothing differs, as `cmp` prints nothing).
pub fn render_human(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    if r.is_same() {
        return s;
    }
    let _ = writeln!(s, "--- {}\n+++ {}", r.old, r.new);
    if let Some([a, b]) = &r.machine {
        let _ = writeln!(
            s,
            "machine: {} -> {}",
            a.as_deref().unwrap_or("-"),
            b.as_deref().unwrap_or("-")
        );
    }
    for k in &r.only_old {
        let _ = writeln!(s, "section only in old: {k}");
    }
    for k in &r.only_new {
        let _ = writeln!(s, "section only in new: {k}");
    }
    for d in &r.devices {
        let _ = writeln!(s, "\n{} (instance {})", d.idstr, d.instance_id);
        for c in &d.description {
            let _ = writeln!(s, "  description: {c}");
        }
        for n in &d.subsections_removed {
            let _ = writeln!(s, "  - subsection {n}");
        }
        for n in &d.subsections_added {
            let _ = writeln!(s, "  + subsection {n}");
        }
        for f in &d.fields {
            let _ = writeln!(s, "  {}: {} -> {}", f.path, show(&f.old), show(&f.new));
        }
    }
    if !r.ram.is_empty() {
        let _ = writeln!(s, "\nRAM");
    }
    for b in &r.ram {
        let len = |l: Option<u64>| l.map_or("absent".to_string(), |l| format!("{l:#x}"));
        if b.old_length != b.new_length {
            let _ = writeln!(
                s,
                "  {}: length {} -> {}",
                b.block,
                len(b.old_length),
                len(b.new_length)
            );
        }
        let _ = write!(s, "  {}: {} pages differ", b.block, b.pages_differ);
        if !b.ranges.is_empty() {
            let shown: Vec<&str> = b
                .ranges
                .iter()
                .take(HUMAN_RANGES)
                .map(String::as_str)
                .collect();
            let _ = write!(s, ": {}", shown.join(", "));
            if b.ranges.len() > HUMAN_RANGES {
                let _ = write!(s, ", … ({} ranges in all)", b.ranges.len());
            }
        }
        let _ = writeln!(s);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn page_runs_become_inclusive_byte_ranges() {
        assert_eq!(
            ranges(&[0, 1, 2, 5, 7, 8], 0x1000),
            ["0x0-0x2fff", "0x5000-0x5fff", "0x7000-0x8fff"]
        );
        assert!(ranges(&[], 0x1000).is_empty());
    }

    #[test]
    fn values_differ_by_path_and_subsection() {
        let a = json!({"env.regs": ["0x1", "0x2"], "x": {"y": "0x0"}, "cpu/old": {"f": "0x1"}});
        let b = json!({"env.regs": ["0x1", "0x3"], "x": {"y": "0x0"}, "cpu/new": {"g": "0x1"}, "z": "0x9"});
        let mut d = DeviceDiff::default();
        let subs = vec!["cpu/old".to_string(), "cpu/new".to_string()];
        diff_values("", &a, &b, &subs, &mut d);
        assert_eq!(
            d.fields,
            [
                FieldChange {
                    path: "env.regs[1]".into(),
                    old: json!("0x2"),
                    new: json!("0x3")
                },
                FieldChange {
                    path: "z".into(),
                    old: Json::Null,
                    new: json!("0x9")
                }
            ]
        );
        assert_eq!(d.subsections_removed, ["cpu/old"]);
        assert_eq!(d.subsections_added, ["cpu/new"]);
    }

    #[test]
    fn buffers_differ_by_byte_runs() {
        let mut d = DeviceDiff::default();
        diff_values(
            "cmos",
            &json!("00 11 22 33 44"),
            &json!("01 11 2f 3f 44"),
            &[],
            &mut d,
        );
        assert_eq!(
            d.fields,
            [
                FieldChange {
                    path: "cmos[0x0]".into(),
                    old: json!("00"),
                    new: json!("01")
                },
                FieldChange {
                    path: "cmos[0x2..0x4]".into(),
                    old: json!("22 33"),
                    new: json!("2f 3f")
                }
            ]
        );
    }

    #[test]
    fn descriptions_differ_in_sizes_types_versions() {
        let a = json!({"vmsd_name": "t", "version": 1, "fields": [
            {"name": "a", "type": "uint32", "size": 4},
            {"name": "s", "type": "struct", "size": 2, "struct": {"vmsd_name": "in", "version": 1,
                "fields": [{"name": "b", "type": "uint16", "size": 2}]}}]});
        let b = json!({"vmsd_name": "t", "version": 2, "fields": [
            {"name": "a", "type": "uint64", "size": 8},
            {"name": "s", "type": "struct", "size": 2, "struct": {"vmsd_name": "in", "version": 1,
                "fields": [{"name": "b", "type": "int16", "size": 2}]}},
            {"name": "c", "type": "uint8", "size": 1}],
            "subsections": [{"vmsd_name": "t/sub", "version": 1, "fields": []}]});
        let mut out = Vec::new();
        diff_desc("", &a, &b, &mut out);
        assert_eq!(
            out,
            [
                "version 1 -> 2",
                "a: type uint32 -> uint64",
                "a: size 4 -> 8",
                "s.b: type uint16 -> int16",
                "c: field only in the new description",
                "subsection t/sub only in the new description"
            ]
        );
    }
}
