//! Streams our writer produces from descriptions of our own (nested structs, arrays,
//! subsections, RAM with zero pages): they load back, decode identically through their own
//! vmdesc, re-encode byte for byte, and QEMU's analyze-migration.py (when present) reads them
//! the same way our inspector does. The loader's checks each give a clear error.

use std::path::PathBuf;
use std::sync::Arc;

use vmsnap::migration::analyze::{analyze, AnalyzeOptions};
use vmsnap::migration::ram_state::RamState;
use vmsnap::migration::savevm::{load_state, save_state, Registry};
use vmsnap::migration::stream::{ErrorKind, Record, StreamModel};
use vmsnap::migration::vmdesc::to_python_json;
use vmsnap::migration::{Count, Field, FieldType, VMStateDescription, Value};

mod common;
use common::Dev;

fn seg() -> Arc<VMStateDescription> {
    Arc::new(
        VMStateDescription::new("seg", 1, 1)
            .field(Field::uint("selector", 4))
            .field(Field::uint("base", 8))
            .field(Field::int("flags", 2))
            // A subsection inside a nested struct (sent for the ldt only).
            .subsection(
                VMStateDescription::new("seg/hidden", 1, 1).field(Field::uint("attr", 2)),
                None,
            ),
    )
}

fn cpu_vmsd() -> Arc<VMStateDescription> {
    Arc::new(
        VMStateDescription::new("testcpu", 5, 3)
            .field(Field::uint("regs", 8).count(Count::Fixed(4)))
            .field(Field::int("eip", 8))
            .field(Field::new("halted", FieldType::Bool))
            .field(Field::structure("segs", seg()).count(Count::Fixed(3)))
            .field(Field::structure("ldt", seg()))
            .field(Field::uint("nmsr", 4))
            .field(Field::uint("msrs", 8).count(Count::FromField("nmsr".into())))
            .field(Field::new(
                "version_check",
                FieldType::Equal {
                    size: 4,
                    signed: true,
                    expected: None,
                },
            ))
            .field(Field::new("depth", FieldType::Int32Le { max: Some(100) }))
            .field(Field::new("fp", FieldType::Float64).since(4))
            .field(Field::new("timer", FieldType::Timer))
            .field(Field::new("pad", FieldType::Unused(3)))
            .field(Field::new("bm", FieldType::Bitmap { bits: 100 }))
            .field(Field::uint("blen", 2))
            .field(Field::new(
                "blob",
                FieldType::VBuffer {
                    len_field: "blen".into(),
                },
            ))
            .subsection(
                VMStateDescription::new("testcpu/pending", 2, 1)
                    .field(Field::uint("vector", 1))
                    .field(Field::structure("where", seg())),
                Some(|v: &Value| v.get("testcpu/pending").is_some()),
            )
            .subsection(
                VMStateDescription::new("testcpu/never", 1, 1).field(Field::uint("x", 1)),
                Some(|_: &Value| false),
            ),
    )
}

fn seg_value(i: u64) -> Value {
    let mut v = Value::structure([
        ("selector", Value::u32(0x10 + i as u32)),
        ("base", Value::u64(i << 32)),
        ("flags", Value::i16(-(i as i16))),
    ]);
    if i == 9 {
        v.push("seg/hidden", Value::structure([("attr", Value::u16(0x82))]));
    }
    v
}

fn cpu_value(k: u64) -> Value {
    Value::structure([
        (
            "regs",
            Value::Array((0..4).map(|i| Value::u64(k * 100 + i)).collect()),
        ),
        ("eip", Value::i64(-1)),
        ("halted", Value::Bool(k % 2 == 1)),
        ("segs", Value::Array((0..3).map(seg_value).collect())),
        ("ldt", seg_value(9)),
        ("nmsr", Value::u32(2)),
        (
            "msrs",
            Value::Array(vec![Value::u64(0xc000_0080), Value::u64(k)]),
        ),
        ("version_check", Value::i32(7)),
        ("depth", Value::i32(42)),
        ("fp", Value::F64(2.5)),
        ("timer", Value::Timer(123_456_789)),
        ("pad", Value::Bytes(vec![0; 3])),
        ("bm", Value::Bytes(vec![0xa5; 16])),
        ("blen", Value::u16(5)),
        ("blob", Value::Bytes(b"hello".to_vec())),
        (
            "testcpu/pending",
            Value::structure([("vector", Value::u8(0x20)), ("where", seg_value(3))]),
        ),
    ])
}

fn serial_vmsd() -> Arc<VMStateDescription> {
    Arc::new(
        VMStateDescription::new("serial", 3, 2)
            .field(Field::uint("divider", 2))
            .field(Field::uint("rbr", 1))
            .field(Field::int("fifo", 1).count(Count::Fixed(16))),
    )
}

fn serial_value() -> Value {
    Value::structure([
        ("divider", Value::u16(12)),
        ("rbr", Value::u8(0x41)),
        (
            "fifo",
            Value::Array((0..16).map(|i| Value::i8(i - 8)).collect()),
        ),
    ])
}

/// 64 pages of "RAM" with every 4th page zero, and a small ROM.
fn guest_memory() -> (Vec<u8>, Vec<u8>) {
    let mut ram = vec![0u8; 64 * 4096];
    for (n, page) in ram.chunks_mut(4096).enumerate() {
        if n % 4 != 3 {
            page.fill(n as u8 + 1);
            page[..8].copy_from_slice(&(n as u64).to_le_bytes());
        }
    }
    let rom = (0..8192).map(|i| (i % 251) as u8).collect();
    (ram, rom)
}

fn make_stream(rounds: u64) -> Vec<u8> {
    let (ram, rom) = guest_memory();
    stream_for(&ram, &rom, rounds)
}

fn stream_for(ram: &[u8], rom: &[u8], rounds: u64) -> Vec<u8> {
    let mut mem = RamState::for_save(vec![("pc.ram".into(), ram), ("pc.rom".into(), rom)], 4096);
    mem.pages_per_round = rounds;
    let mut cpu0 = Dev(cpu_value(0));
    let mut cpu1 = Dev(cpu_value(1));
    let mut serial = Dev(serial_value());
    let mut reg = Registry::new("vmsnap-test");
    reg.register_iterative("ram", 0, 4, &mut mem);
    reg.register_device("cpu", 0, cpu_vmsd(), &mut cpu0);
    reg.register_device("cpu", 1, cpu_vmsd(), &mut cpu1);
    reg.register_device("serial", 0, serial_vmsd(), &mut serial);
    let mut out = Vec::new();
    let len = save_state(&mut reg, &mut out).unwrap();
    assert_eq!(len, out.len() as u64);
    out
}

#[test]
fn our_stream_loads_back_into_devices_and_ram() {
    let bytes = make_stream(10);
    let (ram, rom) = guest_memory();
    let mut ram2 = vec![0xffu8; ram.len()];
    let mut rom2 = vec![0u8; rom.len()];
    {
        let mut mem = RamState::for_load(
            vec![
                ("pc.ram".into(), &mut ram2[..]),
                ("pc.rom".into(), &mut rom2[..]),
            ],
            4096,
        );
        let mut cpu0 = Dev(Value::Null);
        let mut cpu1 = Dev(Value::Null);
        let mut serial = Dev(Value::Null);
        let mut reg = Registry::new("vmsnap-test");
        reg.register_iterative("ram", 0, 4, &mut mem);
        reg.register_device("cpu", 0, cpu_vmsd(), &mut cpu0);
        reg.register_device("cpu", 1, cpu_vmsd(), &mut cpu1);
        reg.register_device("serial", 0, serial_vmsd(), &mut serial);
        load_state(&mut reg, &mut &bytes[..]).unwrap();
        drop(reg);
        assert_eq!(cpu0.0, cpu_value(0));
        assert_eq!(cpu1.0, cpu_value(1));
        assert_eq!(serial.0, serial_value());
    }
    assert!(ram2 == ram, "RAM differs after load");
    assert!(rom2 == rom);
}

#[test]
fn our_stream_decodes_identically_by_its_own_vmdesc_and_round_trips() {
    let bytes = make_stream(0);
    let model = StreamModel::decode(&bytes[..]).unwrap();
    let devices: Vec<&Value> = model
        .records
        .iter()
        .filter_map(|r| match r {
            Record::Device(v, _) => Some(v),
            _ => None,
        })
        .collect();
    assert_eq!(devices.len(), 3);
    assert!(!model.records.iter().any(|r| matches!(r, Record::Raw(_))));
    assert_eq!(model.encode(Vec::new()).unwrap(), bytes);

    // Zero pages went out as ZERO records, the others as PAGE.
    let a = analyze(&bytes[..], &AnalyzeOptions::default()).unwrap();
    assert!(a.error.is_none(), "{:?}", a.error);
    let ram = &a.ram_blocks[0].1;
    assert_eq!((ram.pages, ram.zero_pages), (48, 16));

    // What the inspector prints equals the devices' own values in analyze format.
    assert_eq!(a.state["cpu (1)"], cpu_value(0).to_analyze_json());
    assert_eq!(a.state["cpu (2)"], cpu_value(1).to_analyze_json());
    assert_eq!(a.state["serial (3)"], serial_value().to_analyze_json());
    assert_eq!(a.state["cpu (1)"]["eip"], "0xffffffffffffffff (-1)");
    assert_eq!(a.state["cpu (1)"]["segs"][2]["flags"], "0xfffe (-2)");
    assert_eq!(
        a.state["ram (0)"]["section sizes"]["pc.ram"],
        "0x0000000000040000"
    );
    let desc = a.desc.unwrap();
    assert_eq!(desc["devices"][0]["fields"][0]["array_len"], 4);
    assert_eq!(
        desc["devices"][0]["subsections"][0]["vmsd_name"],
        "testcpu/pending"
    );
    assert!(desc["devices"][0]["subsections"].as_array().unwrap().len() == 1);
}

#[test]
fn analyze_migration_py_reads_our_stream_like_we_do() {
    if common::analyze_migration_script(module_path!()).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ours.bin");
    let bytes = make_stream(7);
    std::fs::write(&path, &bytes).unwrap();
    let a = analyze(&bytes[..], &AnalyzeOptions::default()).unwrap();
    for (dump, ours) in [
        ("state", to_python_json(&a.state)),
        ("desc", to_python_json(a.desc.as_ref().unwrap())),
    ] {
        let args = ["-f", common::s(&path), "--dump", dump];
        let out = common::analyze_migration(module_path!(), &args).map(common::Run::ok);
        assert_eq!(out.map(|o| o.stdout), Some(ours + "\n"), "--dump {dump}");
    }
}

fn load_err(bytes: &[u8], machine: &str, with_serial: bool, cpu_version: u32) -> ErrorKind {
    let (ram, rom) = guest_memory();
    let mut ram2 = vec![0u8; ram.len()];
    let mut rom2 = vec![0u8; rom.len()];
    let mut mem = RamState::for_load(
        vec![
            ("pc.ram".into(), &mut ram2[..]),
            ("pc.rom".into(), &mut rom2[..]),
        ],
        4096,
    );
    let mut cpu_desc = (*cpu_vmsd()).clone();
    cpu_desc.version_id = cpu_version;
    // A version above 5 stands for a destination that no longer reads version 5.
    if cpu_version > 5 {
        cpu_desc.minimum_version_id = cpu_version;
    }
    let cpu_desc = Arc::new(cpu_desc);
    let (mut c0, mut c1, mut s) = (Dev(Value::Null), Dev(Value::Null), Dev(Value::Null));
    let mut reg = Registry::new(machine);
    reg.register_iterative("ram", 0, 4, &mut mem);
    reg.register_device("cpu", 0, cpu_desc.clone(), &mut c0);
    reg.register_device("cpu", 1, cpu_desc, &mut c1);
    if with_serial {
        reg.register_device("serial", 0, serial_vmsd(), &mut s);
    }
    let e = load_state(&mut reg, &mut &bytes[..]).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("offset 0x"), "{msg}");
    *e.kind
}

#[test]
fn loader_checks_give_clear_errors() {
    let bytes = make_stream(0);
    assert!(matches!(
        load_err(&bytes, "other-machine", true, 5),
        ErrorKind::ConfigurationMismatch { .. }
    ));
    assert!(matches!(
        load_err(&bytes, "vmsnap-test", false, 5),
        ErrorKind::UnknownSection { ref idstr, .. } if idstr == "serial"
    ));
    assert!(matches!(
        load_err(&bytes, "vmsnap-test", true, 4),
        ErrorKind::VmState(vmsnap::migration::vmstate::VmStateError::VersionTooNew { .. })
    ));
    assert!(matches!(
        load_err(&bytes, "vmsnap-test", true, 6),
        ErrorKind::VmState(vmsnap::migration::vmstate::VmStateError::VersionTooOld {
            version: 5,
            min: 6,
            ..
        })
    ));
    // Corrupt the footer of the first cpu section: it names another section.
    let model = StreamModel::decode(&bytes[..]).unwrap();
    let mut m2 = model.clone();
    for r in m2.records.iter_mut() {
        if let Record::Footer(id) = r {
            if *id == 1 {
                *id = 7;
                break;
            }
        }
    }
    let bad = m2.encode(Vec::new()).unwrap();
    assert!(matches!(
        load_err(&bad, "vmsnap-test", true, 5),
        ErrorKind::FooterMismatch {
            expected: 1,
            found: 7
        }
    ));
    // Drop the serial footer entirely.
    let mut m3 = model.clone();
    let idx = m3
        .records
        .iter()
        .rposition(|r| matches!(r, Record::Footer(3)))
        .unwrap();
    m3.records.remove(idx);
    let bad = m3.encode(Vec::new()).unwrap();
    assert!(matches!(
        load_err(&bad, "vmsnap-test", true, 5),
        ErrorKind::MissingFooter { .. }
    ));
    // Version 2 and garbage headers.
    let mut v2 = bytes.clone();
    v2[7] = 2;
    assert!(matches!(
        load_err(&v2, "vmsnap-test", true, 5),
        ErrorKind::ObsoleteVersion
    ));
    v2[7] = 9;
    assert!(matches!(
        load_err(&v2, "vmsnap-test", true, 5),
        ErrorKind::UnsupportedVersion(9)
    ));
}

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/stream")
}

/// A small stream of ours is pinned byte for byte, and what analyze-migration.py printed for
/// it (recorded in testdata/stream, see its README) is what our inspector prints.
#[test]
fn small_stream_matches_golden_bytes_and_recorded_analyze_output() {
    let (ram, rom) = guest_memory();
    let bytes = stream_for(&ram[..8 * 4096], &rom[..4096], 3);
    let golden = testdata().join("own-small.bin");
    if std::env::var_os("VMSNAP_BLESS").is_some() {
        std::fs::write(&golden, &bytes).unwrap();
    }
    assert!(
        std::fs::read(&golden).unwrap() == bytes,
        "writer output changed"
    );
    let a = analyze(&bytes[..], &AnalyzeOptions::default()).unwrap();
    assert!(a.error.is_none());
    let state = std::fs::read_to_string(testdata().join("own-small.state.json")).unwrap();
    assert_eq!(to_python_json(&a.state) + "\n", state);
    let desc = std::fs::read_to_string(testdata().join("own-small.desc.json")).unwrap();
    assert_eq!(to_python_json(a.desc.as_ref().unwrap()) + "\n", desc);
}
