//! vmsnap-inspect against the QEMU 7.2 fixtures: JSON output equal to what
//! analyze-migration.py recorded, the snapshot path, decoded RAM against the guest pattern,
//! --memory, --extract and the human output.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vmsnap::migration::ram::RamRecord;
use vmsnap::migration::stream::{Event, StreamReader};

mod common;

use common::{fixtures, gunzip};

fn read_fixture(name: &str) -> Vec<u8> {
    if name.ends_with(".gz") {
        gunzip(name)
    } else {
        std::fs::read(fixtures().join(name)).unwrap()
    }
}

/// Decompresses a fixture into `dir` and returns its path.
fn unpack(dir: &Path, gz: &str) -> PathBuf {
    let path = dir.join(gz.trim_end_matches(".gz"));
    std::fs::write(&path, gunzip(gz)).unwrap();
    path
}

fn inspect(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmsnap-inspect"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "vmsnap-inspect failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn check_json(actual: &str, expected_fixture: &str) {
    let expected = String::from_utf8(read_fixture(expected_fixture)).unwrap();
    let a: serde_json::Value = serde_json::from_str(actual).unwrap();
    let e: serde_json::Value = serde_json::from_str(&expected).unwrap();
    assert_eq!(a, e, "JSON differs from {expected_fixture}");
    // Key order and formatting as Python prints them.
    assert_eq!(actual, expected, "text differs from {expected_fixture}");
}

fn check_stream(stream_gz: &str, stem: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = unpack(dir.path(), stream_gz);
    let p = path.to_str().unwrap();
    let state = stdout_ok(&inspect(&[p, "--dump", "state", "--output", "json"]));
    check_json(&state, &format!("{stem}.state.json.gz"));
    let desc = stdout_ok(&inspect(&[p, "--dump", "desc", "--output", "json"]));
    check_json(&desc, &format!("{stem}.desc.json"));
}

#[test]
fn mig_pc_state_and_desc_match_analyze_migration() {
    check_stream("mig-pc.bin.gz", "mig-pc");
}

#[test]
fn mig_q35_state_and_desc_match_analyze_migration() {
    check_stream("mig-q35.bin.gz", "mig-q35");
}

#[test]
fn savevm_state_and_desc_match_analyze_migration() {
    check_stream("vmstate-basic-first.bin.gz", "vmstate-basic-first");
}

#[test]
fn snapshot_vm_state_read_from_qcow2_equals_extracted_stream() {
    let dir = tempfile::tempdir().unwrap();
    let image = unpack(dir.path(), "snap-basic.qcow2.gz");
    let img = image.to_str().unwrap();
    let out = inspect(&[
        img,
        "--snapshot",
        "first",
        "--dump",
        "state",
        "--output",
        "json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("not implemented") {
        eprintln!("SKIPPED: the qcow2 driver is not implemented on this branch yet: {stderr}");
        return;
    }
    let state = stdout_ok(&out);
    check_json(&state, "vmstate-basic-first.state.json.gz");
    let desc = stdout_ok(&inspect(&[img, "--snapshot", "first", "--dump", "desc"]));
    check_json(&desc, "vmstate-basic-first.desc.json");
    // A disk-only snapshot has no VM state: a clear error, not a decode failure.
    let out = inspect(&[img, "--snapshot", "disk-only"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no VM state"));
    let out = inspect(&[img, "--snapshot", "nope"]);
    assert!(!out.status.success());
}

/// The guest RAM pattern described in fixtures/README.md.
fn pattern_page(n: u64, seed: u64) -> Vec<u8> {
    let gpa = n * 4096;
    let mut page = vec![0u8; 4096];
    if n % 8 == 7 {
        return page;
    }
    let mut state = seed ^ gpa;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    page[..4].copy_from_slice(b"PAGE");
    page[4..12].copy_from_slice(&gpa.to_le_bytes());
    if n % 64 == 1 {
        page[12..16].copy_from_slice(b"RND!");
        for i in 0..510 {
            page[16 + i * 8..24 + i * 8].copy_from_slice(&next().to_le_bytes());
        }
    } else {
        page[12..16].copy_from_slice(b"REP!");
        let mut unit = [0u8; 16];
        unit[..8].copy_from_slice(&next().to_le_bytes());
        unit[8..].copy_from_slice(&next().to_le_bytes());
        for c in page[16..].chunks_mut(16) {
            c.copy_from_slice(&unit);
        }
    }
    page
}

fn parse_ranges(j: &serde_json::Value) -> Vec<(u64, u64)> {
    j.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let (a, b) = r.as_str().unwrap().split_once('-').unwrap();
            let p = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
            (p(a), p(b))
        })
        .collect()
}

fn check_ram(stream_gz: &str, ramcheck: &str) {
    check_ram_bytes(&gunzip(stream_gz), stream_gz, ramcheck);
}

fn check_ram_bytes(bytes: &[u8], stream_gz: &str, ramcheck: &str) {
    let check: serde_json::Value = serde_json::from_slice(&read_fixture(ramcheck)).unwrap();
    let seed = u64::from_str_radix(
        check["pattern_seed"]
            .as_str()
            .unwrap()
            .trim_start_matches("0x"),
        16,
    )
    .unwrap();
    let block = check["pattern_block"].as_str().unwrap().to_string();
    let unchanged = parse_ranges(&check["unchanged_page_ranges_gpa"]);
    let mut ram = vec![0u8; 32 << 20];
    let mut zero_pages = 0u64;
    let mut r = StreamReader::new(bytes);
    loop {
        match r.next_event().unwrap() {
            Event::Ram {
                record: RamRecord::Page { block: b, addr, .. },
                ..
            } if b == block => {
                let a = addr as usize;
                r.read_page_into(&mut ram[a..a + 4096]).unwrap();
            }
            Event::Ram {
                record:
                    RamRecord::Zero {
                        block: b,
                        fill,
                        addr,
                        ..
                    },
                ..
            } if b == block => {
                zero_pages += 1;
                let a = addr as usize;
                ram[a..a + 4096].fill(fill);
            }
            Event::Ram {
                record: RamRecord::MemSize { blocks, .. },
                ..
            } => {
                let sizes = &check["ram_blocks"];
                for b in &blocks {
                    let want = sizes[&b.idstr].as_str().unwrap();
                    assert_eq!(format!("{:#x}", b.used_length), want, "{}", b.idstr);
                }
            }
            Event::End => break,
            _ => {}
        }
    }
    assert_eq!(
        zero_pages,
        check["pages_sent_as_zero_page"].as_u64().unwrap()
    );
    let mut checked = 0;
    for (start, end) in unchanged {
        for gpa in (start..=end).step_by(4096) {
            let n = gpa / 4096;
            let got = &ram[gpa as usize..gpa as usize + 4096];
            assert!(
                got == pattern_page(n, seed),
                "{stream_gz}: page {gpa:#x} differs"
            );
            checked += 1;
        }
    }
    assert!(checked > 7900, "only {checked} pages checked");
}

#[test]
fn decoded_ram_equals_the_guest_pattern() {
    check_ram("mig-pc.bin.gz", "mig-pc.ramcheck.json");
    check_ram("mig-q35.bin.gz", "mig-q35.ramcheck.json");
    check_ram(
        "vmstate-basic-first.bin.gz",
        "vmstate-basic-first.ramcheck.json",
    );
}

#[test]
fn memory_dump_and_extract() {
    let dir = tempfile::tempdir().unwrap();
    let path = unpack(dir.path(), "mig-pc.bin.gz");
    let p = path.to_str().unwrap();
    let out = stdout_ok(&inspect(&[p, "--memory"]));
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mem = &j["ram (2)"]["memory"];
    assert_eq!(mem["ram0 (0x0000000000007000)"], "Filled with 0x00");
    let page = mem["ram0 (0x0000000000100000)"].as_str().unwrap();
    assert!(
        page.starts_with("50 41 47 45 00 00 10 00"),
        "{}",
        &page[..40]
    );
    assert_eq!(page.len(), 4096 * 3 - 1);

    let x = dir.path().join("x");
    let out = inspect(&[p, "--extract", x.to_str().unwrap()]);
    stdout_ok(&out);
    let ram0 = std::fs::read(x.join("ram0")).unwrap();
    assert_eq!(ram0.len(), 32 << 20);
    for n in [1u64, 0x100, 0x101, 0x1000] {
        let a = (n * 4096) as usize;
        assert!(ram0[a..a + 4096] == pattern_page(n, 0x5eed_5eed_5eed_5eed));
    }
    assert_eq!(
        std::fs::metadata(x.join("rom@etc/acpi/rsdp"))
            .unwrap()
            .len(),
        0x1000
    );
    let desc = std::fs::read_to_string(x.join("desc.json")).unwrap();
    assert_eq!(
        desc + "\n",
        String::from_utf8(read_fixture("mig-pc.desc.json")).unwrap()
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(x.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["timer (0)"]["unused"], "00 00 00 00 00 00 00 00");
}

#[test]
fn human_output_and_truncated_stream() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = gunzip("mig-q35.bin.gz");
    let full = dir.path().join("full.bin");
    std::fs::write(&full, &bytes).unwrap();
    let out = stdout_ok(&inspect(&[full.to_str().unwrap()]));
    assert!(out.contains("machine:   pc-q35-7.2"));
    assert!(out.contains("VMDESCRIPTION"));
    assert!(out.contains("0000:00:1f.0/ICH9LPC"));
    assert!(out.contains("env.eip = 0x"));
    let desc = stdout_ok(&inspect(&[
        full.to_str().unwrap(),
        "--dump",
        "desc",
        "--output",
        "human",
    ]));
    assert!(desc.contains("vmsd_name"));

    // Cut inside the device sections: the table is printed, the error names offset and section.
    let cut = bytes.len() - 120_000;
    let trunc = dir.path().join("trunc.bin");
    std::fs::write(&trunc, &bytes[..cut]).unwrap();
    let out = inspect(&[trunc.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("offset 0x"), "{stderr}");
    assert!(stderr.contains("in section"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("DECODING STOPPED"));
    assert!(stdout.contains("ram0"));

    // Not a stream at all.
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, b"hello world").unwrap();
    let out = inspect(&[junk.to_str().unwrap(), "--output", "json"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad magic"));

    // A qcow2 image without --snapshot: a hint, not a decoding error.
    let img = unpack(dir.path(), "compat-0.10.qcow2.gz");
    let out = inspect(&[img.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("add --snapshot TAG"), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
}

#[test]
fn without_vmdesc_sections_and_ram_are_still_decoded() {
    let bytes = gunzip("mig-pc.bin.gz");
    // The vmdesc record starts right after the EOF byte; drop it.
    let model = vmsnap::migration::stream::StreamModel::decode(&bytes[..]).unwrap();
    let mut records = model.records;
    assert!(matches!(
        records.pop(),
        Some(vmsnap::migration::stream::Record::VmDescription(_))
    ));
    let cut = vmsnap::migration::stream::StreamModel { records }
        .encode(Vec::new())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("novmdesc.bin");
    std::fs::write(&path, &cut).unwrap();
    let p = path.to_str().unwrap();

    let out = inspect(&[p]);
    let human = stdout_ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no vmdesc"));
    assert!(human.contains("0000:00:03.0/e1000"));
    assert!(human.contains("(not decoded)"));
    assert!(human.contains("ram0                                0x2000000       7085       1107"));

    let state = stdout_ok(&inspect(&[p, "--output", "json"]));
    let j: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(
        j["ram (2)"]["section sizes"]["pc.bios"],
        "0x0000000000040000"
    );
    assert_eq!(j.as_object().unwrap().len(), 1);
    // --dump desc has nothing to show: a clear error.
    let out = inspect(&[p, "--dump", "desc"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no VM description"));
}

#[test]
fn page_size_other_than_4k_is_found_through_the_vmdesc() {
    use vmsnap::migration::ram_state::RamState;
    use vmsnap::migration::savevm::{save_state, Registry};

    let ram: Vec<u8> = (0..0x10000u32).map(|i| (i / 8192) as u8 + 1).collect();
    let mut out = Vec::new();
    {
        let mut mem = RamState::for_save(vec![("ram".into(), &ram[..])], 8192);
        let mut reg = Registry::new("big-pages");
        reg.page_size = 8192;
        reg.register_iterative("ram", 0, 4, &mut mem);
        save_state(&mut reg, &mut out).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("8k.bin");
    std::fs::write(&path, &out).unwrap();
    let x = dir.path().join("x");
    let res = inspect(&[path.to_str().unwrap(), "--extract", x.to_str().unwrap()]);
    stdout_ok(&res);
    assert!(String::from_utf8_lossy(&res.stderr).contains("page size 0x2000"));
    assert!(std::fs::read(x.join("ram")).unwrap() == ram);
}

#[test]
fn snapshot_second_ram_equals_the_guest_pattern() {
    use vmsnap::block::vmstate_io::VmstateReader;
    use vmsnap::block::{open_image, OpenOptions};

    let dir = tempfile::tempdir().unwrap();
    let image = unpack(dir.path(), "snap-basic.qcow2.gz");
    let opts = OpenOptions {
        read_only: true,
        force_share: true,
        ..Default::default()
    };
    let mut img = match open_image(&image, opts) {
        Ok(i) => i,
        Err(e) if e.to_string().contains("not implemented") => {
            eprintln!("SKIPPED: the qcow2 driver is not implemented on this branch yet: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let store = img.snapshots().unwrap();
    let mut r = VmstateReader::for_snapshot(store, "second").unwrap();
    assert_eq!(r.size(), 29_885_809);
    let mut bytes = Vec::new();
    r.read_to_end(&mut bytes).unwrap();
    check_ram_bytes(
        &bytes,
        "snap-basic second",
        "vmstate-basic-second.ramcheck.json",
    );
}
