//! vmsnap's opt-in LZ4 RAM pages (`x-vmsnap-lz4`): announced in the configuration, decoded by
//! `load_state`, the stream model and the inspector; refused cleanly by readers that were not
//! told (our own reader without the capability, analyze-migration.py, QEMU); off by default.

use std::process::Command;
use std::sync::Arc;

use vmsnap::migration::analyze::{analyze, AnalyzeOptions};
use vmsnap::migration::configuration::configuration_capabilities;
use vmsnap::migration::qemu_file::QemuFileWriter;
use vmsnap::migration::ram::{RamBlockInfo, RamWriter, LZ4_CAPABILITY, RAM_SAVE_FLAG_LZ4};
use vmsnap::migration::ram_state::RamState;
use vmsnap::migration::savevm::{load_state, save_state, Registry};
use vmsnap::migration::stream::{Record, StreamModel};
use vmsnap::migration::vmdesc::to_python_json;
use vmsnap::migration::{Field, VMStateDescription, Value};

mod common;

const PAGE: usize = 4096;

use common::Dev;

fn vmsd() -> Arc<VMStateDescription> {
    Arc::new(VMStateDescription::new("dev", 1, 1).field(Field::uint("v", 4)))
}

/// 48 pages: zero pages, English-like text, and pseudo-random (incompressible) pages.
fn typical_ram() -> Vec<u8> {
    const WORDS: &[&str] = &[
        "the ",
        "kernel ",
        "page ",
        "of ",
        "memory ",
        "and ",
        "a ",
        "snapshot ",
        "is ",
        "saved ",
        "to ",
        "disk ",
        "while ",
        "guest ",
        "runs\n",
    ];
    let mut ram = vec![0u8; 48 * PAGE];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for (n, p) in ram.chunks_mut(PAGE).enumerate() {
        match n % 4 {
            0 => {}
            3 => p.chunks_mut(8).for_each(|c| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }),
            _ => {
                let mut at = 0;
                while at < PAGE {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    let w = WORDS[(x >> 33) as usize % WORDS.len()].as_bytes();
                    let n = w.len().min(PAGE - at);
                    p[at..at + n].copy_from_slice(&w[..n]);
                    at += n;
                }
            }
        }
    }
    ram
}

/// Saves `ram` (one block "pc.ram") and a device; `lz4` turns the capability on.
fn save(ram: &[u8], lz4: bool) -> Vec<u8> {
    let mut mem = RamState::for_save(vec![("pc.ram".into(), ram)], PAGE as u64);
    mem.set_lz4(lz4);
    mem.pages_per_round = 20;
    let mut dev = Dev(Value::structure([("v", Value::u32(7))]));
    let mut reg = Registry::new("pc-test");
    if lz4 {
        reg.add_capability(LZ4_CAPABILITY);
    }
    reg.register_iterative(RamState::IDSTR, 0, RamState::VERSION, &mut mem);
    reg.register_device("dev", 0, vmsd(), &mut dev);
    let mut out = Vec::new();
    save_state(&mut reg, &mut out).unwrap();
    out
}

fn load(stream: &[u8], len: usize) -> Result<Vec<u8>, String> {
    let mut back = vec![0xeeu8; len];
    let mut dev = Dev(Value::Null);
    {
        let mut mem = RamState::for_load(vec![("pc.ram".into(), &mut back[..])], PAGE as u64);
        let mut reg = Registry::new("pc-test");
        reg.register_iterative(RamState::IDSTR, 0, RamState::VERSION, &mut mem);
        reg.register_device("dev", 0, vmsd(), &mut dev);
        load_state(&mut reg, &mut &stream[..]).map_err(|e| e.to_string())?;
    }
    assert_eq!(dev.0.get("v"), Some(&Value::u32(7)));
    Ok(back)
}

#[test]
fn lz4_stream_loads_back_and_is_smaller() {
    let ram = typical_ram();
    let plain = save(&ram, false);
    let packed = save(&ram, true);
    assert_eq!(load(&packed, ram.len()).unwrap(), ram);
    // 24 text pages shrink a lot, 12 random pages go out raw, 12 zero pages stay ZERO.
    assert!(
        packed.len() < plain.len() - 12 * PAGE,
        "{} vs {}",
        packed.len(),
        plain.len()
    );
    let a = analyze(&packed[..], &AnalyzeOptions::default()).unwrap();
    assert!(a.error.is_none(), "{:?}", a.error);
    let st = &a.ram_blocks[0].1;
    assert_eq!((st.pages, st.zero_pages, st.lz4_pages), (36, 12, 24));
    assert!(st.lz4_bytes < 24 * PAGE as u64 / 2, "{}", st.lz4_bytes);
}

#[test]
fn off_by_default_and_announced_when_on() {
    let ram = typical_ram();
    let plain = save(&ram, false);
    // Configuration without a capabilities subsection: 0x07, be32 len, name, then START.
    let name = b"pc-test";
    assert_eq!(plain[8], 0x07);
    assert_eq!(plain[13..13 + name.len()], name[..]);
    assert_eq!(plain[13 + name.len()], 0x01);
    let a = analyze(&plain[..], &AnalyzeOptions::default()).unwrap();
    assert_eq!(a.ram_blocks[0].1.lz4_pages, 0);

    let packed = save(&ram, true);
    let model = StreamModel::decode(&packed[..]).unwrap();
    let Record::Configuration(conf) = &model.records[0] else {
        panic!("{:?}", model.records[0]);
    };
    assert_eq!(configuration_capabilities(conf), [LZ4_CAPABILITY]);
    // The model holds pages decompressed and re-encodes the stream byte for byte.
    let pages: Vec<&Vec<u8>> = model
        .records
        .iter()
        .filter_map(|r| match r {
            Record::Ram(_, d) if !d.is_empty() => Some(d),
            _ => None,
        })
        .collect();
    assert_eq!(pages.len(), 36);
    assert_eq!(pages[0][..], ram[PAGE..2 * PAGE]);
    assert_eq!(model.encode(Vec::new()).unwrap(), packed);
}

#[test]
fn inspector_json_is_the_same_as_for_the_plain_stream() {
    let ram = typical_ram();
    let plain = save(&ram, false);
    let packed = save(&ram, true);
    for memory in [false, true] {
        let opts = AnalyzeOptions {
            memory,
            ..Default::default()
        };
        let a = analyze(&plain[..], &opts).unwrap();
        let b = analyze(&packed[..], &opts).unwrap();
        assert!(b.error.is_none(), "{:?}", b.error);
        assert_eq!(to_python_json(&a.state), to_python_json(&b.state));
    }
    // The binary, through its mapped-file path, and its human view of the compression.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lz4.bin");
    std::fs::write(&path, &packed).unwrap();
    let p = path.to_str().unwrap();
    let json = common::run(
        env!("CARGO_BIN_EXE_vmsnap-inspect"),
        &[p, "--dump", "state"],
    )
    .ok();
    let a = analyze(&plain[..], &AnalyzeOptions::default()).unwrap();
    assert_eq!(json.stdout, to_python_json(&a.state) + "\n");
    let human = common::run(env!("CARGO_BIN_EXE_vmsnap-inspect"), &[p]).ok();
    assert!(
        human.stdout.contains("LZ4 (x-vmsnap-lz4)"),
        "{}",
        human.stdout
    );
    assert!(
        human.stdout.contains("capabilities: x-vmsnap-lz4"),
        "{}",
        human.stdout
    );
}

/// A stream whose RAM has LZ4 records but whose configuration does not announce them.
fn unannounced() -> Vec<u8> {
    let mut f = QemuFileWriter::new(Vec::new());
    f.put_buffer(b"QEVM\0\0\0\x03\x07\0\0\0\x01m").unwrap();
    f.put_buffer(b"\x01\0\0\0\0\x03ram\0\0\0\0\0\0\0\x04")
        .unwrap();
    let mut w = RamWriter::new(PAGE as u64, false).unwrap();
    w.set_lz4(true);
    let blocks = [RamBlockInfo {
        idstr: "pc.ram".into(),
        used_length: 4 * PAGE as u64,
        mr_addr: None,
    }];
    w.write_mem_size(&mut f, &blocks).unwrap();
    w.write_page(&mut f, "pc.ram", 0, &[b'a'; PAGE]).unwrap();
    w.write_eos(&mut f).unwrap();
    f.into_inner().unwrap()
}

#[test]
fn readers_that_were_not_told_fail_cleanly() {
    let s = unannounced();
    let a = analyze(&s[..], &AnalyzeOptions::default()).unwrap();
    let e = a.error.unwrap().to_string();
    assert!(e.contains("does not announce the x-vmsnap-lz4"), "{e}");
    assert!(e.contains(&format!("flags {RAM_SAVE_FLAG_LZ4:#x}")), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lz4.bin");
    std::fs::write(&path, save(&typical_ram(), true)).unwrap();
    if let Some(out) = common::analyze_migration(module_path!(), &["-f", common::s(&path)]) {
        assert_ne!(out.code, Some(0), "the script read an LZ4 stream");
    }
}

#[test]
fn load_state_refuses_capabilities_it_cannot_honour() {
    let ram = typical_ram();
    let mut mem = RamState::for_save(vec![("pc.ram".into(), &ram[..])], PAGE as u64);
    let mut dev = Dev(Value::structure([("v", Value::u32(7))]));
    let mut reg = Registry::new("pc-test");
    reg.add_capability("mapped-ram");
    reg.add_capability("mapped-ram");
    assert_eq!(reg.capabilities(), ["mapped-ram"]);
    reg.register_iterative(RamState::IDSTR, 0, RamState::VERSION, &mut mem);
    reg.register_device("dev", 0, vmsd(), &mut dev);
    let mut out = Vec::new();
    save_state(&mut reg, &mut out).unwrap();
    let e = load(&out, ram.len()).unwrap_err();
    assert!(e.contains("Received unknown capability mapped-ram"), "{e}");
    assert!(e.contains("at stream offset 0x8"), "{e}");
}

#[test]
fn qemu_refuses_the_capability_before_any_page() {
    if !common::require(
        "qemu_refuses_the_capability_before_any_page",
        &["qemu-system-x86_64"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lz4.bin");
    std::fs::write(&path, save(&typical_ram(), true)).unwrap();
    let incoming = format!("exec:cat {}", path.display());
    let out = Command::new("timeout")
        .args([
            "60",
            "qemu-system-x86_64",
            "-nodefaults",
            "-display",
            "none",
            "-machine",
            "pc",
            "-accel",
            "tcg",
            "-incoming",
            &incoming,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("Received unknown capability x-vmsnap-lz4"),
        "{err}"
    );
}

#[test]
fn damaged_lz4_pages_are_errors_not_panics() {
    let ram = typical_ram();
    let packed = save(&ram, true);
    let a = analyze(&packed[..], &AnalyzeOptions::default()).unwrap();
    let start = a.rows.iter().find(|r| r.kind == "PART").unwrap().offset as usize;
    // Flip bytes all over the first PART section: every outcome must be an Err or Ok.
    for at in (start..start + 3 * PAGE).step_by(7) {
        let mut bad = packed.clone();
        bad[at] ^= 0x5a;
        let _ = load(&bad, ram.len());
        let opts = AnalyzeOptions {
            memory: true,
            ..Default::default()
        };
        let _ = analyze(&bad[..], &opts).unwrap();
    }
    // A length field of 0 and one of a whole page are refused by name.
    // Page 1 is text, right after the zero page 0 that named the block: CONTINUE | LZ4.
    let word = (PAGE as u64 | RAM_SAVE_FLAG_LZ4 | 0x20).to_be_bytes();
    let first_lz4 = (start..packed.len())
        .find(|&i| packed[i..i + 8] == word)
        .unwrap();
    let len_at = first_lz4 + 8;
    for len in [0u16, PAGE as u16] {
        let mut bad = packed.clone();
        bad[len_at..len_at + 2].copy_from_slice(&len.to_be_bytes());
        let e = load(&bad, ram.len()).unwrap_err();
        assert!(e.contains("compressed length"), "{e}");
    }
    // A body one byte short does not decompress to a page.
    let mut bad = packed.clone();
    let n = u16::from_be_bytes([bad[len_at], bad[len_at + 1]]);
    bad[len_at..len_at + 2].copy_from_slice(&(n - 1).to_be_bytes());
    let e = load(&bad, ram.len()).unwrap_err();
    assert!(e.contains("does not decompress"), "{e}");
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// A page from a few runs of repeated bytes and literal noise: compressible or not.
    fn page() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec((any::<u8>(), 1usize..600, any::<bool>()), 1..20).prop_map(
            |runs| {
                let mut p = Vec::with_capacity(PAGE);
                let mut x = 0x1234_5678u32;
                for (b, n, noisy) in runs {
                    for _ in 0..n {
                        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        p.push(if noisy { (x >> 24) as u8 } else { b });
                    }
                }
                p.resize(PAGE, 0);
                p
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 64,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn any_ram_round_trips_with_lz4(pages in proptest::collection::vec(page(), 1..12)) {
            let ram = pages.concat();
            let plain = save(&ram, false);
            let packed = save(&ram, true);
            prop_assert!(packed.len() <= plain.len() + 64);
            prop_assert_eq!(load(&packed, ram.len()).unwrap(), ram);
            let model = StreamModel::decode(&packed[..]).unwrap();
            prop_assert_eq!(model.encode(Vec::new()).unwrap(), packed);
        }
    }
}
