//! Round trip: every QEMU-made stream, decoded with its own vmdesc into the codec's model and
//! re-encoded by our writer, is byte-identical to the original.

use std::io::Read;
use std::path::PathBuf;

use vmsnap::migration::stream::{Record, StreamModel};

fn fixtures() -> PathBuf {
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/qemu-7.2");
    if local.exists() {
        local
    } else {
        PathBuf::from("/work/shared/fixtures/qemu-7.2")
    }
}

fn gunzip(name: &str) -> Vec<u8> {
    let f = std::fs::File::open(fixtures().join(name)).unwrap();
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(f)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn round_trip(name: &str) {
    let original = gunzip(name);
    let model = StreamModel::decode(&original[..]).unwrap();
    let devices = model
        .records
        .iter()
        .filter(|r| matches!(r, Record::Device(..)))
        .count();
    let raw = model
        .records
        .iter()
        .filter(|r| matches!(r, Record::Raw(..)))
        .count();
    assert!(devices > 20, "{name}: only {devices} device bodies decoded");
    assert_eq!(raw, 0, "{name}: {raw} device bodies were left undecoded");
    let pages = model
        .records
        .iter()
        .filter(|r| matches!(r, Record::Ram(..)))
        .count();
    assert!(pages > 7000, "{name}: {pages} RAM records");
    let again = model.encode(Vec::new()).unwrap();
    assert_eq!(again.len(), original.len(), "{name}: length differs");
    if let Some(i) = again.iter().zip(&original).position(|(a, b)| a != b) {
        panic!("{name}: first difference at offset {i:#x}");
    }
}

#[test]
fn mig_pc_round_trips_byte_for_byte() {
    round_trip("mig-pc.bin.gz");
}

#[test]
fn mig_q35_round_trips_byte_for_byte() {
    round_trip("mig-q35.bin.gz");
}

#[test]
fn savevm_state_round_trips_byte_for_byte() {
    round_trip("vmstate-basic-first.bin.gz");
}
