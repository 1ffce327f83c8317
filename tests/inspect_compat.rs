//! `vmsnap-inspect SRC --compat DST`: QEMU's vmstate-static-checker.py rules on the vmdesc of
//! two streams. Streams of one machine type pass; a changed field size, a removed field, a
//! newer version, a missing section or subsection are named and fail (exit 1); trouble is 2.

mod common;
mod inspect_util;

use std::path::{Path, PathBuf};

use common::{gunzip, s};
use inspect_util::{inspect, stdout, unpack};
use serde_json::Value;

/// `stream` with its vmdesc (the JSON after the 0x06 byte and its length, at the very end)
/// changed by `edit`, written to `dir/name`.
fn with_vmdesc(dir: &Path, name: &str, stream: &[u8], edit: impl Fn(&mut Value)) -> PathBuf {
    let at = (0..stream.len() - 5)
        .rev()
        .find(|&i| {
            stream[i] == 0x06
                && u32::from_be_bytes(stream[i + 1..i + 5].try_into().unwrap()) as usize
                    == stream.len() - i - 5
        })
        .expect("no vmdesc at the end of the stream");
    let mut desc: Value = serde_json::from_slice(&stream[at + 5..]).unwrap();
    edit(&mut desc);
    let json = serde_json::to_vec(&desc).unwrap();
    let mut out = stream[..at + 1].to_vec();
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    let path = dir.join(name);
    std::fs::write(&path, out).unwrap();
    path
}

fn device<'a>(desc: &'a mut Value, name: &str) -> &'a mut Value {
    desc["devices"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|d| d["name"] == name)
        .unwrap()
}

fn compat(src: &str, dst: &str) -> (Option<i32>, String) {
    let out = inspect(&[src, "--compat", dst]);
    (out.status.code(), stdout(&out))
}

#[test]
fn streams_of_one_machine_type_pass() {
    let dir = tempfile::tempdir().unwrap();
    let pc = unpack(dir.path(), "mig-pc.bin.gz");
    let img = unpack(dir.path(), "snap-basic.qcow2.gz");
    let snap = format!("{}@second", s(&img));
    for (a, b) in [(s(&pc), snap.as_str()), (snap.as_str(), s(&pc))] {
        let (code, text) = compat(a, b);
        assert_eq!(code, Some(0), "{text}");
        assert!(text.contains(" can load what "), "{text}");
        assert!(!text.contains("Section"), "{text}");
    }
}

#[test]
fn changed_size_and_removed_fields_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let pc = gunzip("mig-pc.bin.gz");
    let src = dir.path().join("src.bin");
    std::fs::write(&src, &pc).unwrap();
    // timer: cpu_ticks_offset (int64), unused (8 bytes), cpu_clock_offset (int64).
    let size4 = with_vmdesc(dir.path(), "size.bin", &pc, |d| {
        device(d, "timer")["fields"][0]["size"] = 4.into();
    });
    let (code, text) = compat(s(&src), s(&size4));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(
            "Section \"timer\" Description \"timer\" Field \"cpu_ticks_offset\" size mismatch: 8, 4\n"
        ),
        "{text}"
    );
    assert!(text.contains("\nincompatible (1 findings): "), "{text}");

    let removed = with_vmdesc(dir.path(), "removed.bin", &pc, |d| {
        device(d, "timer")["fields"]
            .as_array_mut()
            .unwrap()
            .remove(1);
    });
    let (code, text) = compat(s(&src), s(&removed));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(
            "Section \"timer\" Description \"timer\": expected field \"unused\", got \"cpu_clock_offset\"; skipping rest\n"
        ),
        "{text}"
    );
    let last_removed = with_vmdesc(dir.path(), "last.bin", &pc, |d| {
        device(d, "timer")["fields"].as_array_mut().unwrap().pop();
    });
    let (code, text) = compat(s(&src), s(&last_removed));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("expected field \"cpu_clock_offset\", while dest has no further fields"),
        "{text}"
    );
    // The other way round the destination only has a field more at the end, which the
    // script does not flag.
    let (code, text) = compat(s(&last_removed), s(&src));
    assert_eq!(code, Some(0), "{text}");
}

#[test]
fn versions_sections_and_subsections() {
    let dir = tempfile::tempdir().unwrap();
    let pc = gunzip("mig-pc.bin.gz");
    let src = dir.path().join("src.bin");
    std::fs::write(&src, &pc).unwrap();
    // The destination is older: version 1 of timer where the source wrote 2.
    let older = with_vmdesc(dir.path(), "older.bin", &pc, |d| {
        device(d, "timer")["version"] = 1.into();
    });
    let (code, text) = compat(s(&src), s(&older));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("Section \"timer\" Description \"timer\": version error: 2 > 1"),
        "{text}"
    );
    let (code, _) = compat(s(&older), s(&src));
    assert_eq!(code, Some(0));

    // A subsection the source sent that the destination does not have.
    let with_sub = with_vmdesc(dir.path(), "sub.bin", &pc, |d| {
        device(d, "timer")["subsections"] =
            serde_json::json!([{"vmsd_name": "timer/x", "version": 1, "fields": []}]);
    });
    let (code, text) = compat(s(&with_sub), s(&src));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("Description \"timer\": Subsection \"timer/x\" not found"),
        "{text}"
    );

    // Another machine type: a warning, and its missing sections by name.
    let q35 = unpack(dir.path(), "mig-q35.bin.gz");
    let (code, text) = compat(s(&src), s(&q35));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.starts_with(
            "warning: checking incompatible machine types: \"pc-i440fx-7.2\", \"pc-q35-7.2\"\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("Section \"0000:00:01.0/PIIX3\" does not exist in dest\n"),
        "{text}"
    );
}

#[test]
fn trouble_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let pc = unpack(dir.path(), "mig-pc.bin.gz");
    let out = inspect(&[s(&pc), "--compat", "/nonexistent/x.bin"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/x.bin"));
}
