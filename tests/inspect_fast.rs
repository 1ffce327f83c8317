//! The inspector's fast path: stream files are read through a mapping and page bodies are
//! seeked over. Same answers as reading every byte; truncation still reported where it is.

use std::io::Cursor;
use std::process::{Command, Output};
use std::sync::Arc;

use vmsnap::migration::analyze::{analyze, analyze_stream, AnalyzeOptions};
use vmsnap::migration::ram_state::RamState;
use vmsnap::migration::savevm::{save_state, Registry};
use vmsnap::migration::stream::{Event, StreamReader};
use vmsnap::migration::vmdesc::to_python_json;
use vmsnap::migration::{Field, VMStateDescription, Value};

mod common;

use common::Dev;

/// RAM of 64 pages: every third page zero, the others a pattern; one device.
fn sample_stream() -> Vec<u8> {
    let mut ram = vec![0u8; 64 * 4096];
    for (n, p) in ram.chunks_mut(4096).enumerate() {
        if n % 3 != 0 {
            p.iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i + n) as u8);
        }
    }
    let vmsd = Arc::new(VMStateDescription::new("dev", 2, 1).field(Field::uint("v", 4)));
    let mut dev = Dev(Value::structure([("v", Value::u32(0x1234))]));
    let mut mem = RamState::for_save(vec![("pc.ram".into(), &ram[..])], 4096);
    mem.pages_per_round = 10;
    let mut reg = Registry::new("pc-test");
    reg.register_iterative(RamState::IDSTR, 0, RamState::VERSION, &mut mem);
    reg.register_device("dev", 0, vmsd, &mut dev);
    let mut out = Vec::new();
    save_state(&mut reg, &mut out).unwrap();
    out
}

fn inspect(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmsnap-inspect"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn seekable_reader_gives_the_same_events_and_analysis() {
    let bytes = sample_stream();
    let mut plain = StreamReader::new(&bytes[..]);
    let mut seek = StreamReader::new_seekable(Cursor::new(&bytes[..]));
    let mut n = 0;
    loop {
        let a = plain.next_event().unwrap();
        let b = seek.next_event().unwrap();
        assert_eq!(a, b);
        assert_eq!(plain.position(), seek.position());
        n += 1;
        if a == Event::End {
            break;
        }
    }
    assert!(n > 64, "only {n} events");
    let a = analyze(&bytes[..], &AnalyzeOptions::default()).unwrap();
    let b = analyze_stream(
        StreamReader::new_seekable(Cursor::new(&bytes[..])),
        &AnalyzeOptions::default(),
    )
    .unwrap();
    assert!(b.error.is_none(), "{:?}", b.error);
    assert_eq!(to_python_json(&a.state), to_python_json(&b.state));
    assert_eq!(b.ram_blocks[0].1.pages, 42);
    assert_eq!(b.ram_blocks[0].1.zero_pages, 22);
}

#[test]
fn inspector_on_a_file_matches_the_library_and_the_script() {
    let bytes = sample_stream();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.bin");
    std::fs::write(&path, &bytes).unwrap();
    let p = path.to_str().unwrap();
    let out = inspect(&[p, "--dump", "state"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lib = analyze(&bytes[..], &AnalyzeOptions::default()).unwrap();
    let expected = to_python_json(&lib.state) + "\n";
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
    assert!(expected.contains("\"v\": \"0x00001234\""), "{expected}");

    if let Some(py) = common::analyze_migration(module_path!(), &["-f", p]) {
        assert_eq!(py.ok().stdout, expected);
    }
}

#[test]
fn truncated_page_body_is_reported_at_its_offset() {
    let bytes = sample_stream();
    // Cut inside the last page body: the PART section's data stops short.
    let full = analyze(&bytes[..], &AnalyzeOptions::default()).unwrap();
    let end_row = full.rows.iter().find(|r| r.kind == "END").unwrap();
    let cut = end_row.offset as usize - 100;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.bin");
    std::fs::write(&path, &bytes[..cut]).unwrap();
    let out = inspect(&[path.to_str().unwrap(), "--dump", "state"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unexpected end of stream"), "{err}");
    // The plain reader stops in the same section.
    let plain = analyze(&bytes[..cut], &AnalyzeOptions::default()).unwrap();
    let e = plain.error.unwrap();
    assert!(e.to_string().contains("unexpected end of stream"), "{e}");
    assert!(err.contains("in section 'ram'"), "{err}");
}

/// `--memory` prints what analyze-migration.py's `-m` prints, byte for byte. The script at the
/// commit the fixtures name formats a page's bytes with `ord(c)`, which Python 3 refuses for
/// the ints that iterating `bytes` gives (QEMU later formats `c` itself): the comparison runs
/// the script unchanged with `ord` accepting an int, the format QEMU's fix prints.
#[test]
fn memory_dump_matches_the_script() {
    let Some(script) = common::analyze_migration_script("--memory against -m") else {
        return;
    };
    let bytes = sample_stream();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.bin");
    std::fs::write(&path, &bytes).unwrap();
    let p = path.to_str().unwrap();
    let ours = inspect(&[p, "--memory"]);
    assert!(
        ours.status.success(),
        "{}",
        String::from_utf8_lossy(&ours.stderr)
    );
    let ours = String::from_utf8(ours.stdout).unwrap();
    assert!(
        ours.contains("\"pc.ram (0x0000000000001000)\": \"01 02 03"),
        "{}",
        &ours[..400]
    );
    assert!(ours.contains("\"pc.ram (0x0000000000003000)\": \"Filled with 0x00\""));

    let run = "import builtins, runpy, sys\n\
               o = builtins.ord\n\
               builtins.ord = lambda c: c if isinstance(c, int) else o(c)\n\
               sys.argv = [sys.argv[1], '-f', sys.argv[2], '-m']\n\
               runpy.run_path(sys.argv[0], run_name='__main__')\n";
    let py = common::run("python3", &["-c", run, common::s(&script), p]).ok();
    assert_eq!(py.stdout, ours);
}
