//! Our stream through a real qcow2 vmstate area: `save_state` writes it with the
//! `VmstateWriter` adapter, a snapshot records it, and both `vmsnap-inspect --snapshot` and
//! `load_state` (through `VmstateReader`) read it back unchanged.

use std::io::{Read, Write};
use std::process::Command;
use std::sync::Arc;

use vmsnap::block::qcow2::{CreateOptions, Qcow2};
use vmsnap::block::vmstate_io::{VmstateReader, VmstateWriter};
use vmsnap::block::{open_image, OpenOptions, SnapshotParams};
use vmsnap::migration::analyze::{analyze, AnalyzeOptions};
use vmsnap::migration::ram_state::RamState;
use vmsnap::migration::savevm::{load_state, save_state, Registry};
use vmsnap::migration::vmdesc::to_python_json;
use vmsnap::migration::{Count, Field, VMStateDescription, Value};

mod common;
use common::Dev;

fn vmsd() -> Arc<VMStateDescription> {
    Arc::new(
        VMStateDescription::new("board", 2, 1)
            .field(Field::uint("regs", 4).count(Count::Fixed(8)))
            .field(Field::bool("on")),
    )
}

fn board() -> Value {
    Value::structure([
        (
            "regs",
            Value::Array((0..8).map(|i| Value::u32(i * 3)).collect()),
        ),
        ("on", Value::Bool(true)),
    ])
}

#[test]
fn stream_saved_into_a_qcow2_snapshot_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.qcow2");
    let create = CreateOptions {
        size: 16 << 20,
        ..Default::default()
    };
    match Qcow2::create(&path, &create) {
        Ok(()) => {}
        Err(e) if e.to_string().contains("not implemented") => {
            eprintln!("SKIPPED: the qcow2 driver is not implemented on this branch yet: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    }
    // 3 MiB of RAM (so the vmstate spans several 1 MiB chunks), one page in four zero.
    let ram: Vec<u8> = (0..3u32 << 20)
        .map(|i| {
            if (i >> 12) % 4 == 3 {
                0
            } else {
                (i % 253) as u8
            }
        })
        .collect();

    let len = {
        let mut img = open_image(&path, OpenOptions::default()).unwrap();
        let store = img.snapshots().unwrap();
        let mut w = VmstateWriter::new(store);
        let mut mem = RamState::for_save(vec![("pc.ram".into(), &ram[..])], 4096);
        let mut dev = Dev(board());
        let mut reg = Registry::new("vmsnap-board");
        reg.register_iterative("ram", 0, 4, &mut mem);
        reg.register_device("board", 0, vmsd(), &mut dev);
        let len = save_state(&mut reg, &mut w).unwrap();
        w.flush().unwrap();
        assert_eq!(w.len(), len);
        drop(w);
        let store = img.snapshots().unwrap();
        store
            .snapshot_create(&SnapshotParams {
                name: "s1".into(),
                vm_state_size: len,
                ..Default::default()
            })
            .unwrap();
        img.flush().unwrap();
        len
    };

    // The inspector reads the snapshot's VM state straight out of the image.
    let out = Command::new(env!("CARGO_BIN_EXE_vmsnap-inspect"))
        .args([
            path.to_str().unwrap(),
            "--snapshot",
            "s1",
            "--output",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["board (1)"], board().to_analyze_json());
    assert_eq!(
        json["ram (0)"]["section sizes"]["pc.ram"],
        "0x0000000000300000"
    );

    // load_state through the reader adapter restores RAM and the device.
    let mut img = open_image(
        &path,
        OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let store = img.snapshots().unwrap();
    let mut r = VmstateReader::for_snapshot(store, "s1").unwrap();
    assert_eq!(r.size(), len);
    let mut bytes = Vec::new();
    r.read_to_end(&mut bytes).unwrap();
    let a = analyze(&bytes[..], &AnalyzeOptions::default()).unwrap();
    assert!(a.error.is_none());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        to_python_json(&a.state) + "\n"
    );
    let mut back = vec![0u8; ram.len()];
    let mut dev = Dev(Value::Null);
    {
        let mut mem = RamState::for_load(vec![("pc.ram".into(), &mut back[..])], 4096);
        let mut reg = Registry::new("vmsnap-board");
        reg.register_iterative("ram", 0, 4, &mut mem);
        reg.register_device("board", 0, vmsd(), &mut dev);
        let store = img.snapshots().unwrap();
        let mut r = VmstateReader::for_snapshot(store, "s1").unwrap();
        load_state(&mut reg, &mut r).unwrap();
    }
    assert!(back == ram);
    assert_eq!(dev.0, board());
    drop(img);

    // QEMU sees the snapshot with its VM state size.
    match Command::new("qemu-img")
        .args(["snapshot", "-U", "-l", path.to_str().unwrap()])
        .output()
    {
        Ok(o) => {
            let list = String::from_utf8_lossy(&o.stdout);
            assert!(o.status.success() && list.contains("s1"), "{list}");
            let check = Command::new("qemu-img")
                .args(["check", "-U", path.to_str().unwrap()])
                .output()
                .unwrap();
            assert!(
                check.status.success(),
                "qemu-img check: {}",
                String::from_utf8_lossy(&check.stdout)
            );
        }
        Err(e) => eprintln!("SKIPPED: qemu-img not available: {e}"),
    }
}
