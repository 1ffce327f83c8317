//! XBZRLE against QEMU 7.2: `testdata/stream/qemu-xbzrle.mig.zst` is a stream QEMU sent with
//! the xbzrle capability on, `qemu-xbzrle.ram.zst` the guest RAM QEMU's own destination
//! loaded from it (`pmemsave`; both made by tools/scripts/make-xbzrle-fixture.sh).
//!
//! - Our reader applies the stream's XBZRLE records and ends with QEMU's RAM.
//! - Each QEMU-made record is a test vector for our encoder: encoding the page as it was
//!   before the record against the page after it gives QEMU's bytes.
//! - vmsnap-inspect reads the stream and applies the records for `--extract` and `--memory`.

use std::path::{Path, PathBuf};
use std::process::Command;

use vmsnap::migration::ram::RamRecord;
use vmsnap::migration::stream::{Event, StreamReader};
use vmsnap::migration::xbzrle;

const RAM: usize = 32 << 20;
const PAGE: usize = 4096;
/// Legacy VGA window and BIOS ROMs: pmemsave reads devices there, not pc.ram.
const HOLE: std::ops::Range<usize> = 0xa0000..0x100000;

fn testdata(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/stream")
        .join(name);
    zstd::decode_all(std::fs::File::open(&path).unwrap()).unwrap()
}

fn assert_ram_equal(ours: &[u8], qemu: &[u8]) {
    assert_eq!(ours.len(), qemu.len());
    for (i, (a, b)) in ours.chunks(PAGE).zip(qemu.chunks(PAGE)).enumerate() {
        if HOLE.contains(&(i * PAGE)) {
            continue;
        }
        assert!(
            a == b,
            "page {:#x} differs from QEMU's destination",
            i * PAGE
        );
    }
}

#[test]
fn qemu_xbzrle_stream_loads_to_qemus_ram_and_its_records_match_our_encoder() {
    let stream = testdata("qemu-xbzrle.mig.zst");
    let qemu_ram = testdata("qemu-xbzrle.ram.zst");
    let mut ram = vec![0u8; RAM];
    let mut r = StreamReader::new(&stream[..]);
    let (mut records, mut same_bytes) = (0, 0);
    let mut ours = Vec::new();
    loop {
        match r.next_event().unwrap() {
            Event::Ram {
                record: RamRecord::Page { block, addr, .. },
                ..
            } if block == "pc.ram" => {
                let page = &mut ram[addr as usize..addr as usize + PAGE];
                let Some(len) = r.page_xbzrle_len() else {
                    r.read_page_into(page).unwrap();
                    continue;
                };
                let at = r.position() as usize;
                let theirs = &stream[at..at + len as usize];
                let old = page.to_vec();
                r.read_page_into(page).unwrap();
                records += 1;
                // QEMU's record, decoded on its own, gives the same page.
                let mut again = old.clone();
                xbzrle::decode(theirs, &mut again).unwrap();
                assert_eq!(again, page);
                // Our encoding of the same (old, new) pair is QEMU's, byte for byte.
                let n = xbzrle::encode(&old, page, PAGE, &mut ours);
                assert_eq!(n, Some(theirs.len()), "record at {at:#x}");
                if ours == theirs {
                    same_bytes += 1;
                }
            }
            Event::Ram {
                record:
                    RamRecord::Zero {
                        block, addr, fill, ..
                    },
                ..
            } if block == "pc.ram" => ram[addr as usize..addr as usize + PAGE].fill(fill),
            Event::End => break,
            _ => {}
        }
    }
    assert!(
        records > 100,
        "only {records} XBZRLE records in the fixture"
    );
    assert_eq!(same_bytes, records, "our encoder differs from QEMU's");
    assert_ram_equal(&ram, &qemu_ram);
}

fn inspect(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vmsnap-inspect"))
        .args(args)
        .output()
        .unwrap()
}

fn unpack(dir: &Path) -> PathBuf {
    let path = dir.join("qemu-xbzrle.mig");
    std::fs::write(&path, testdata("qemu-xbzrle.mig.zst")).unwrap();
    path
}

#[test]
fn inspect_extracts_and_dumps_memory_with_xbzrle_pages_applied() {
    let dir = tempfile::tempdir().unwrap();
    let mig = unpack(dir.path());
    let x = dir.path().join("x");
    let out = inspect(&[mig.to_str().unwrap(), "--extract", x.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let extracted = std::fs::read(x.join("pc.ram")).unwrap();
    assert_ram_equal(&extracted, &testdata("qemu-xbzrle.ram.zst"));

    // The human summary counts the XBZRLE records (4096 in this stream, as QEMU's
    // `info migrate` reported "xbzrle pages: 4096").
    let out = inspect(&[mig.to_str().unwrap()]);
    let human = String::from_utf8_lossy(&out.stdout);
    let row = human
        .split_once("XBZRLE (deltas of re-sent pages)\n")
        .and_then(|(_, t)| t.lines().nth(1))
        .unwrap_or_else(|| panic!("no XBZRLE table:\n{human}"));
    assert_eq!(
        row.split_whitespace().take(2).collect::<Vec<_>>(),
        ["pc.ram", "4096"]
    );

    let out = inspect(&[mig.to_str().unwrap(), "--memory"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ram = &json["ram (2)"]["memory"]["pc.ram (0x0000000000200000)"];
    let hex = ram
        .as_str()
        .expect("pc.ram page 0x200000 in --memory output");
    let want: Vec<String> = extracted[0x200000..0x200000 + PAGE]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(hex, want.join(" "));
}

#[test]
fn a_damaged_xbzrle_record_is_an_error_not_a_panic() {
    let mut stream = testdata("qemu-xbzrle.mig.zst");
    // Find the first XBZRLE record and point its first run past the page.
    let mut r = StreamReader::new(&stream[..]);
    let at = loop {
        match r.next_event().unwrap() {
            Event::Ram {
                record: RamRecord::Page { .. },
                ..
            } if r.page_xbzrle_len().is_some() => break r.position() as usize,
            Event::End => panic!("no XBZRLE record"),
            _ => {}
        }
    };
    stream[at] = 0xff;
    stream[at + 1] = 0x7f;
    let mut ram = vec![0u8; RAM];
    let mut r = StreamReader::new(&stream[..]);
    let err = loop {
        match r.next_event() {
            Ok(Event::Ram {
                record: RamRecord::Page { addr, .. },
                ..
            }) => {
                if let Err(e) = r.read_page_into(&mut ram[addr as usize..addr as usize + PAGE]) {
                    break e;
                }
            }
            Ok(Event::End) => panic!("damaged stream loaded"),
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    let msg = err.to_string();
    assert!(
        msg.contains("Failed to load XBZRLE page - decode error!"),
        "{msg}"
    );
}
