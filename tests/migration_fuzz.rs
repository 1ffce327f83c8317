//! The decoder against hostile input: truncation at every offset of a real (QEMU-made) stream,
//! bit flips, garbage and lying lengths. It must never panic, must not allocate what the input
//! does not hold, and must name the offset where it stopped.

use proptest::prelude::*;
use vmsnap::migration::analyze::{analyze, AnalyzeOptions};
use vmsnap::migration::ram::RamRecord;
use vmsnap::migration::stream::{ErrorKind, Record, StreamModel};
use vmsnap::migration::vmdesc::to_qemu_json;

mod common;

use common::gunzip;

/// mig-pc.bin without its RAM pages and its three largest devices (the vmdesc trimmed to
/// match): every record kind of the real stream, small enough to cut at every offset.
fn compact_real_stream() -> Vec<u8> {
    let full = gunzip("mig-pc.bin.gz");
    let model = StreamModel::decode(&full[..]).unwrap();
    let big = [
        "0000:00:03.0/e1000",
        "0000:00:02.0/virtio-blk",
        "vmmouse",
        "0000:00:01.3/piix4_pm",
    ];
    let mut records = Vec::new();
    let mut skipping = false;
    for r in model.records {
        match &r {
            Record::Section(_, info) => skipping = big.contains(&info.idstr.as_str()),
            Record::Ram(RamRecord::Page { .. } | RamRecord::Zero { .. }, _) => continue,
            Record::Eof => skipping = false,
            Record::VmDescription(json) => {
                let mut j: serde_json::Value = serde_json::from_slice(json).unwrap();
                j["devices"]
                    .as_array_mut()
                    .unwrap()
                    .retain(|d| !big.contains(&d["name"].as_str().unwrap()));
                records.push(Record::VmDescription(to_qemu_json(&j)));
                continue;
            }
            _ => {}
        }
        let is_footer = matches!(r, Record::Footer(_));
        if !skipping {
            records.push(r);
        } else if is_footer {
            skipping = false;
        }
    }
    StreamModel { records }.encode(Vec::new()).unwrap()
}

#[test]
fn truncation_at_every_offset_of_a_real_stream() {
    let s = compact_real_stream();
    let whole = analyze(&s[..], &AnalyzeOptions::default()).unwrap();
    assert!(whole.error.is_none(), "{:?}", whole.error);
    assert!(whole.devices.iter().all(|d| d.value.is_some()));
    assert!(whole.devices.len() > 25);
    let vmdesc_at = whole.rows.last().unwrap().offset as usize;
    let mut clean_cuts = 0;
    for cut in 0..s.len() {
        // Inside the JSON trailer every 13th offset suffices: it is one length-checked read.
        if cut > vmdesc_at + 5 && cut % 13 != 0 && cut < s.len() - 8 {
            continue;
        }
        let a = analyze(&s[..cut], &AnalyzeOptions::default()).unwrap();
        match &a.error {
            Some(e) => {
                assert!(
                    e.offset <= cut as u64,
                    "cut {cut:#x}: error offset {:#x}",
                    e.offset
                );
                assert!(e.to_string().contains(&format!("{:#x}", e.offset)));
            }
            None => {
                // Only a cut right after EOF is a complete stream (one without vmdesc).
                assert_eq!(cut, vmdesc_at, "cut {cut:#x} decoded without error");
                clean_cuts += 1;
            }
        }
        if cut % 97 == 0 {
            assert!(StreamModel::decode(&s[..cut]).is_err() || cut == vmdesc_at);
        }
    }
    assert_eq!(clean_cuts, 1);
}

#[test]
fn bit_flips_in_a_real_stream_never_panic() {
    let s = compact_real_stream();
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut errors = 0;
    for _ in 0..1200 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut t = s.clone();
        let pos = (x % t.len() as u64) as usize;
        t[pos] ^= 1 << ((x >> 32) % 8);
        let a = analyze(&t[..], &AnalyzeOptions::default()).unwrap();
        if let Some(e) = &a.error {
            errors += 1;
            assert!(e.to_string().contains("offset 0x"));
        }
        let _ = StreamModel::decode(&t[..]);
    }
    // Most flips land in device payloads, which any bytes decode; some must be caught.
    assert!(errors > 12, "only {errors} flips detected");
}

#[test]
fn bit_flips_in_ram_headers_of_the_full_stream() {
    let s = gunzip("mig-q35.bin.gz");
    // Offsets of RAM record headers: flip flag and length bits there.
    for (pos, bit) in [
        (0x1a + 17, 2u8),
        (0xe1 + 5, 0),
        (0xe1 + 12, 3),
        (0x30, 7),
        (0x101c, 5),
    ] {
        let mut t = s.clone();
        t[pos] ^= 1 << bit;
        let a = analyze(&t[..], &AnalyzeOptions::default()).unwrap();
        if let Some(e) = &a.error {
            assert!(e.to_string().contains("offset 0x"));
        }
    }
}

#[test]
fn lying_lengths_are_refused_without_allocating() {
    // vmdesc claiming 4 GiB.
    let s = b"QEVM\0\0\0\x03\x00\x06\xff\xff\xff\xff{";
    let a = analyze(&s[..], &AnalyzeOptions::default()).unwrap();
    assert!(matches!(
        *a.error.unwrap().kind,
        ErrorKind::VmDescTooLarge(0xffff_ffff)
    ));
    // Configuration whose machine name claims 4 GiB.
    let s = b"QEVM\0\0\0\x03\x07\xff\xff\xff\xffpc";
    let a = analyze(&s[..], &AnalyzeOptions::default()).unwrap();
    let e = a.error.unwrap();
    assert!(e.to_string().contains("exceeds the limit"), "{e}");
    // RAM block list whose lengths exceed the announced total.
    let mut s = b"QEVM\0\0\0\x03\x01\0\0\0\x02\x03ram\0\0\0\0\0\0\0\x04".to_vec();
    s.extend_from_slice(&(0x1000u64 | 4).to_be_bytes());
    s.extend_from_slice(b"\x04ram0");
    s.extend_from_slice(&0xffff_ffff_0000u64.to_be_bytes());
    let a = analyze(&s[..], &AnalyzeOptions::default()).unwrap();
    let e = a.error.unwrap();
    assert!(e.to_string().contains("exceeds"), "{e}");
    assert!(e.to_string().contains("'ram'"), "{e}");
    // Unknown RAM version, obsolete and unknown stream versions.
    let s = b"QEVM\0\0\0\x03\x01\0\0\0\x02\x03ram\0\0\0\0\0\0\0\x05";
    let a = analyze(&s[..], &AnalyzeOptions::default()).unwrap();
    assert!(matches!(*a.error.unwrap().kind, ErrorKind::RamVersion(5)));
    let a = analyze(&b"QEVM\0\0\0\x02"[..], &AnalyzeOptions::default()).unwrap();
    let e = a.error.unwrap();
    assert!(e.to_string().contains("SaveVM v2 format is obsolete"));
}

proptest! {
    // No regression files: a failure prints its input, and the repository stays as it is.
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn garbage_never_panics(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut s = b"QEVM\0\0\0\x03".to_vec();
        s.extend_from_slice(&body);
        let a = analyze(&s[..], &AnalyzeOptions::default()).unwrap();
        if let Some(e) = a.error {
            prop_assert!(e.offset <= s.len() as u64);
        }
        let _ = StreamModel::decode(&s[..]);
        let _ = analyze(&body[..], &AnalyzeOptions::default()).unwrap();
    }

    #[test]
    fn spliced_real_records_never_panic(
        cut in 0usize..40_000,
        len in 0usize..400,
        fill in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let s = compact_stream_cached();
        let cut = cut.min(s.len());
        let end = (cut + len).min(s.len());
        let mut t = s[..cut].to_vec();
        t.extend_from_slice(&fill);
        t.extend_from_slice(&s[end..]);
        let a = analyze(&t[..], &AnalyzeOptions::default()).unwrap();
        if let Some(e) = a.error {
            prop_assert!(e.to_string().contains("offset 0x"));
        }
    }
}

fn compact_stream_cached() -> &'static [u8] {
    static S: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    S.get_or_init(compact_real_stream)
}
