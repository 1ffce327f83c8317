//! `--compat`: the rules of QEMU's `scripts/vmstate-static-checker.py`, applied to the vmdesc
//! descriptions at the end of two streams instead of `-dump-vmstate` output. SRC is the side
//! that saved, DST the side that must load:
//!
//! * every SRC section must exist in DST (matched by name and instance id);
//! * a description's version must not be newer in SRC than in DST;
//! * descriptions must have the same name, fields must match in order (a DST struct whose first
//!   field is the SRC field, or the reverse, is entered: moving fields into a struct keeps the
//!   wire format), and a non-struct field must have the same size (and array length);
//! * a struct field must have a description on both sides;
//! * every SRC subsection must exist in DST;
//! * different machine types only warn.
//!
//! Fields DST has after SRC's last one are not flagged (as in the script). Differences from the
//! script: the vmdesc has no `minimum_version_id`, so only the version rule applies; the
//! script's table of known field renames is not applied; and a vmdesc lists only the
//! subsections that were sent, so a subsection SRC sent that DST did not send is reported even
//! if DST's QEMU knows it.

use serde::Serialize;
use serde_json::Value as Json;

use crate::side::Side;

/// The findings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The saving side.
    pub src: String,
    /// The loading side.
    pub dst: String,
    /// Incompatibilities.
    pub errors: Vec<String>,
    /// Findings that do not break loading (machine types differ, no vmdesc).
    pub warnings: Vec<String>,
}

impl Report {
    /// True when nothing would break.
    pub fn compatible(&self) -> bool {
        self.errors.is_empty()
    }
}

fn s<'a>(j: &'a Json, key: &str) -> &'a str {
    j.get(key).and_then(Json::as_str).unwrap_or("")
}

fn n(j: &Json, key: &str) -> Option<u64> {
    j.get(key).and_then(Json::as_u64)
}

fn list<'a>(j: &'a Json, key: &str) -> &'a [Json] {
    j.get(key)
        .and_then(Json::as_array)
        .map_or(&[][..], Vec::as_slice)
}

/// The description a field carries: a struct's (`"struct"`), or the field itself for QEMU's
/// `tmp` fields, which list their fields inline.
fn description(field: &Json) -> Option<&Json> {
    field
        .get("struct")
        .or_else(|| field.get("fields").map(|_| field))
}

struct Checker<'r> {
    sec: String,
    errors: &'r mut Vec<String>,
}

impl Checker<'_> {
    fn error(&mut self, msg: String) {
        self.errors.push(format!("Section \"{}\" {msg}", self.sec));
    }

    fn version(&mut self, s: &Json, d: &Json, desc: &str) {
        if let (Some(a), Some(b)) = (n(s, "version"), n(d, "version")) {
            if a > b {
                self.error(format!("Description \"{desc}\": version error: {a} > {b}"));
            }
        }
    }

    fn descriptions(&mut self, s: &Json, d: &Json) {
        let name = s_name(s);
        self.version(s, d, name);
        if name != s_name(d) {
            self.error(format!(
                "Description \"{name}\" missing, got \"{}\" instead; skipping",
                s_name(d)
            ));
            return;
        }
        self.fields(list(s, "fields"), list(d, "fields"), name);
        self.subsections(list(s, "subsections"), list(d, "subsections"), name);
    }

    fn fields(&mut self, src: &[Json], dst: &[Json], desc: &str) {
        // Iterators as (slice, next index) stacks, to enter structs that only one side has.
        let mut s_stack: Vec<(&[Json], usize)> = vec![(src, 0)];
        let mut d_stack: Vec<(&[Json], usize)> = vec![(dst, 0)];
        let mut s_item: Option<&Json> = None;
        let mut d_item: Option<&Json> = None;
        let (mut advance_src, mut advance_dst) = (true, true);
        loop {
            if advance_src {
                let Some((sl, i)) = s_stack.last_mut() else {
                    break;
                };
                if let Some(f) = sl.get(*i) {
                    *i += 1;
                    s_item = Some(f);
                } else {
                    s_stack.pop();
                    if s_stack.is_empty() {
                        break;
                    }
                    continue;
                }
            } else {
                advance_src = true;
            }
            let Some(sf) = s_item else { break };
            if advance_dst {
                let (dl, i) = d_stack.last_mut().expect("never empty here");
                if let Some(f) = dl.get(*i) {
                    *i += 1;
                    d_item = Some(f);
                } else {
                    d_stack.pop();
                    if d_stack.is_empty() {
                        self.error(format!(
                            "Description \"{desc}\": expected field \"{}\", while dest has no further fields",
                            s(sf, "name")
                        ));
                        break;
                    }
                    advance_src = false;
                    continue;
                }
            } else {
                advance_dst = true;
            }
            let Some(df) = d_item else { break };
            if s(sf, "name") != s(df, "name") {
                if let Some(inner) = first_field_is(df, s(sf, "name")) {
                    d_stack.push((inner, 0));
                    advance_src = false;
                    continue;
                }
                if let Some(inner) = first_field_is(sf, s(df, "name")) {
                    s_stack.push((inner, 0));
                    advance_dst = false;
                    continue;
                }
                self.error(format!(
                    "Description \"{desc}\": expected field \"{}\", got \"{}\"; skipping rest",
                    s(sf, "name"),
                    s(df, "name")
                ));
                break;
            }
            let field = s(sf, "name");
            match (description(sf), description(df)) {
                (Some(a), Some(b)) => {
                    self.descriptions(a, b);
                }
                (Some(_), None) => self.error(format!(
                    "Description \"{desc}\", Field \"{field}\": missing description"
                )),
                (None, _) => {
                    if n(sf, "size") != n(df, "size") {
                        self.error(format!(
                            "Description \"{desc}\" Field \"{field}\" size mismatch: {}, {}",
                            n(sf, "size").unwrap_or(0),
                            n(df, "size").unwrap_or(0)
                        ));
                    }
                }
            }
            if n(sf, "array_len") != n(df, "array_len") {
                let len = |j| n(j, "array_len").map_or("-".to_string(), |v| v.to_string());
                self.error(format!(
                    "Description \"{desc}\" Field \"{field}\" array length mismatch: {}, {}",
                    len(sf),
                    len(df)
                ));
            }
        }
    }

    fn subsections(&mut self, src: &[Json], dst: &[Json], desc: &str) {
        for sub in src {
            match dst.iter().find(|d| s_name(d) == s_name(sub)) {
                Some(d) => self.descriptions(sub, d),
                None => self.error(format!(
                    "Description \"{desc}\": Subsection \"{}\" not found",
                    s_name(sub)
                )),
            }
        }
    }
}

fn s_name(j: &Json) -> &str {
    s(j, "vmsd_name")
}

/// The fields of `field`'s description if its first field is called `name`.
fn first_field_is<'a>(field: &'a Json, name: &str) -> Option<&'a [Json]> {
    let fields = list(description(field)?, "fields");
    (fields.first().map(|f| s(f, "name")) == Some(name)).then_some(fields)
}

/// Applies the rules to the vmdesc of `src` (saved) and `dst` (loads).
pub fn check(src: &Side, dst: &Side) -> Report {
    let mut r = Report {
        src: src.label(),
        dst: dst.label(),
        ..Report::default()
    };
    if src.analysis.machine != dst.analysis.machine {
        r.warnings.push(format!(
            "checking incompatible machine types: \"{}\", \"{}\"",
            src.analysis.machine.as_deref().unwrap_or("-"),
            dst.analysis.machine.as_deref().unwrap_or("-")
        ));
    }
    let (Some(sd), Some(dd)) = (&src.analysis.desc, &dst.analysis.desc) else {
        r.errors
            .push("a side has no VM description (vmdesc) to check".to_string());
        return r;
    };
    let dst_devices = list(dd, "devices");
    for sdev in list(sd, "devices") {
        let (name, inst) = (s(sdev, "name"), n(sdev, "instance_id").unwrap_or(0));
        let sec = if inst == 0 {
            name.to_string()
        } else {
            format!("{name} (instance {inst})")
        };
        let Some(ddev) = dst_devices
            .iter()
            .find(|d| s(d, "name") == name && n(d, "instance_id").unwrap_or(0) == inst)
        else {
            r.errors
                .push(format!("Section \"{sec}\" does not exist in dest"));
            continue;
        };
        let mut c = Checker {
            sec,
            errors: &mut r.errors,
        };
        c.descriptions(sdev, ddev);
    }
    r
}

/// The findings for a terminal.
pub fn render_human(r: &Report) -> String {
    let mut out = String::new();
    for w in &r.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    for e in &r.errors {
        out.push_str(&format!("{e}\n"));
    }
    if r.compatible() {
        out.push_str(&format!("{} can load what {} saved\n", r.dst, r.src));
    } else {
        out.push_str(&format!(
            "incompatible ({} findings): {} cannot load what {} saved\n",
            r.errors.len(),
            r.dst,
            r.src
        ));
    }
    out
}
