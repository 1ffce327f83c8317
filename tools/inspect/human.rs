//! Human-readable rendering: a section table, RAM statistics and a decoded device tree.

use std::fmt::Write;

use vmsnap::migration::analyze::Analysis;
use vmsnap::migration::value::{format_int, hex_bytes, Value};

use crate::Dump;

/// Longest byte string shown in full.
const MAX_BYTES_SHOWN: usize = 32;

fn opt<T: std::fmt::LowerHex>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:#x}"))
}

/// Renders the analysis for a terminal.
pub fn render(a: &Analysis, label: &str, dump: Dump) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "stream:    {label} ({:#x} bytes decoded)", a.bytes);
    if let Some(m) = &a.machine {
        let _ = writeln!(s, "machine:   {m}");
    }
    if !a.capabilities.is_empty() {
        let _ = writeln!(s, "capabilities: {}", a.capabilities.join(", "));
    }
    let _ = writeln!(s, "page size: {:#x}", a.page_size);
    if dump == Dump::Desc {
        render_desc(&mut s, a);
    } else {
        render_sections(&mut s, a);
        render_ram(&mut s, a);
        render_devices(&mut s, a);
    }
    if let Some(e) = &a.error {
        let _ = writeln!(s, "\nDECODING STOPPED at offset {:#x}: {e}", e.offset);
    }
    s
}

fn render_sections(s: &mut String, a: &Analysis) {
    let _ = writeln!(
        s,
        "\nSECTIONS\n{:>12}  {:<13} {:>6}  {:<32} {:>8} {:>7} {:>10}",
        "offset", "type", "id", "idstr", "instance", "version", "size"
    );
    for r in &a.rows {
        let _ = writeln!(
            s,
            "{:>12}  {:<13} {:>6}  {:<32} {:>8} {:>7} {:>10}",
            format!("{:#x}", r.offset),
            r.kind,
            opt(r.section_id),
            r.idstr,
            r.instance_id.map_or("-".into(), |v| v.to_string()),
            r.version_id.map_or("-".into(), |v| v.to_string()),
            format!("{:#x}", r.size),
        );
    }
}

fn render_ram(s: &mut String, a: &Analysis) {
    if a.ram_blocks.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nRAM\n{:<32} {:>12} {:>10} {:>10}",
        "block", "length", "pages", "zero pages"
    );
    for (name, st) in &a.ram_blocks {
        let _ = writeln!(
            s,
            "{:<32} {:>12} {:>10} {:>10}",
            name,
            format!("{:#x}", st.used_length),
            st.pages,
            st.zero_pages
        );
    }
    let lz4 = a
        .ram_blocks
        .iter()
        .map(|(n, st)| (n, st.lz4_pages, st.lz4_bytes));
    render_encoded(s, "LZ4 (x-vmsnap-lz4)", "compressed", lz4, a.page_size);
    let xbzrle = a
        .ram_blocks
        .iter()
        .map(|(n, st)| (n, st.xbzrle_pages, st.xbzrle_bytes));
    render_encoded(
        s,
        "XBZRLE (deltas of re-sent pages)",
        "encoded",
        xbzrle,
        a.page_size,
    );
}

/// A table of the blocks with pages sent encoded: count, encoded bytes, ratio to raw pages.
fn render_encoded<'a>(
    s: &mut String,
    title: &str,
    bytes_label: &str,
    rows: impl Iterator<Item = (&'a String, u64, u64)>,
    page_size: u64,
) {
    let rows: Vec<_> = rows.filter(|r| r.1 > 0).collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n{title}\n{:<32} {:>10} {:>14} {:>8}",
        "block", "pages", bytes_label, "ratio"
    );
    for (name, pages, bytes) in rows {
        let raw = pages * page_size;
        let _ = writeln!(
            s,
            "{:<32} {:>10} {:>14} {:>7.1}%",
            name,
            pages,
            format!("{bytes:#x}"),
            100.0 * bytes as f64 / raw.max(1) as f64
        );
    }
}

fn render_devices(s: &mut String, a: &Analysis) {
    let _ = writeln!(s, "\nDEVICES");
    for d in &a.devices {
        let _ = writeln!(
            s,
            "{} (section {:#x}, instance {})",
            d.idstr, d.section_id, d.instance_id
        );
        match &d.value {
            Some(v) => render_value(s, v, 1),
            None => {
                let _ = writeln!(s, "  (not decoded)");
            }
        }
    }
}

fn scalar(v: &Value) -> Option<String> {
    Some(match v {
        Value::Bool(b) => b.to_string(),
        Value::Int { size, signed, raw } => format_int(*size, *signed, *raw),
        Value::F64(f) => f.to_string(),
        Value::Timer(t) => {
            if *t < 0 {
                "timer off".into()
            } else {
                format!("timer @ {t} ns")
            }
        }
        Value::Null => "NULL".into(),
        Value::Bytes(b) if b.len() <= MAX_BYTES_SHOWN => format!("[{}]", hex_bytes(b)),
        Value::Bytes(b) => format!(
            "[{} …] ({} bytes)",
            hex_bytes(&b[..MAX_BYTES_SHOWN]),
            b.len()
        ),
        _ => return None,
    })
}

fn render_value(s: &mut String, v: &Value, depth: usize) {
    let pad = "  ".repeat(depth);
    match v {
        Value::Struct(fields) => {
            for (name, fv) in fields {
                match scalar(fv) {
                    Some(t) => {
                        let _ = writeln!(s, "{pad}{name} = {t}");
                    }
                    None => {
                        let _ = writeln!(s, "{pad}{name}:");
                        render_value(s, fv, depth + 1);
                    }
                }
            }
        }
        Value::Array(items) => {
            if items
                .iter()
                .all(|i| matches!(i, Value::Int { .. } | Value::Bool(_)))
            {
                let parts: Vec<String> = items.iter().filter_map(scalar).collect();
                let _ = writeln!(s, "{pad}[{}]", parts.join(", "));
                return;
            }
            for (i, item) in items.iter().enumerate() {
                match scalar(item) {
                    Some(t) => {
                        let _ = writeln!(s, "{pad}[{i}] = {t}");
                    }
                    None => {
                        let _ = writeln!(s, "{pad}[{i}]:");
                        render_value(s, item, depth + 1);
                    }
                }
            }
        }
        other => {
            if let Some(t) = scalar(other) {
                let _ = writeln!(s, "{pad}{t}");
            }
        }
    }
}

fn render_desc(s: &mut String, a: &Analysis) {
    let Some(desc) = &a.desc else {
        let _ = writeln!(s, "\n(no vmdesc in the stream)");
        return;
    };
    let _ = writeln!(
        s,
        "\nVMDESC\n{:<40} {:>8} {:<32} {:>7} {:>7}",
        "name", "instance", "vmsd_name", "version", "fields"
    );
    let devices = desc.get("devices").and_then(|d| d.as_array());
    for d in devices.into_iter().flatten() {
        let get = |k: &str| {
            d.get(k)
                .map_or("-".to_string(), |v| v.to_string().replace('"', ""))
        };
        let nfields = d
            .get("fields")
            .and_then(|f| f.as_array())
            .map_or(0, Vec::len);
        let _ = writeln!(
            s,
            "{:<40} {:>8} {:<32} {:>7} {:>7}",
            get("name"),
            get("instance_id"),
            get("vmsd_name"),
            get("version"),
            nfields
        );
    }
}
