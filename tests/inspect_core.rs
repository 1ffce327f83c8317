//! `vmsnap-inspect … --dump-guest-memory OUT.elf`, read back by the real tools: `readelf`
//! lists the RAM as PT_LOADs at the guest-physical addresses and the notes QEMU writes, `gdb
//! -c` shows the cpu section's rip and rsp and reads the snapshot's RAM at guest addresses;
//! zero pages are holes. For a QEMU 7.2 snapshot and for the counter guest.

mod common;
mod inspect_util;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use common::{kvm, require, s};
use inspect_util::{counter_snapshots, extract_ram, hex, inspect, section, stdout, unpack};
use serde_json::Value;

fn tools(test: &str) -> bool {
    require(test, &["gdb", "readelf"])
}

fn dump(args: &[&str], out: &Path) {
    let mut all = args.to_vec();
    all.extend(["--dump-guest-memory", s(out)]);
    let o = inspect(&all);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn readelf(args: &[&str], core: &Path) -> String {
    let o = Command::new("readelf")
        .args(args)
        .arg(core)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// (offset, vaddr, paddr, filesz, memsz) of each PT_LOAD, from `readelf -l -W`.
fn loads(core: &Path) -> Vec<[u64; 5]> {
    readelf(&["-l", "-W"], core)
        .lines()
        .filter(|l| l.trim_start().starts_with("LOAD"))
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .take(5)
                .map(|x| u64::from_str_radix(x.trim_start_matches("0x"), 16).unwrap())
                .collect();
            [f[0], f[1], f[2], f[3], f[4]]
        })
        .collect()
}

/// gdb on the core alone: rip, rsp and two u64 at each address.
fn gdb(core: &Path, addrs: &[u64]) -> (u64, u64, Vec<[u64; 2]>) {
    let mut cmd = Command::new("gdb");
    cmd.args(["-batch", "-nx", "-c", s(core)])
        .args(["-ex", "p/x $rip", "-ex", "p/x $rsp"]);
    for a in addrs {
        cmd.args(["-ex", &format!("x/2gx {a:#x}")]);
    }
    let o = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let num = |t: &str| u64::from_str_radix(t.trim().trim_start_matches("0x"), 16).unwrap();
    let vals: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix('$').and_then(|r| r.split_once(" = ")))
        .map(|(_, v)| num(v))
        .collect();
    let mem: Vec<[u64; 2]> = text
        .lines()
        .filter(|l| l.starts_with("0x") && l.contains(':'))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            [num(w[1]), num(w[2])]
        })
        .collect();
    assert_eq!(
        vals.len(),
        2,
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        mem.len(),
        addrs.len(),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    (vals[0], vals[1], mem)
}

fn two_u64(ram: &[u8], off: usize) -> [u64; 2] {
    let w = |o: usize| u64::from_le_bytes(ram[o..o + 8].try_into().unwrap());
    [w(off), w(off + 8)]
}

/// Notes by owner and type, from `readelf -n`.
fn notes(core: &Path) -> Vec<(String, String)> {
    readelf(&["-n"], core)
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 3 && (w[0] == "CORE" || w[0] == "QEMU"))
                .then(|| (w[0].to_string(), w[2..].join(" ")))
        })
        .collect()
}

#[test]
fn qemu_snapshot_as_elf_core() {
    if !tools(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = unpack(dir.path(), "snap-basic.qcow2.gz");
    let core = dir.path().join("first.elf");
    let spec = format!("{}@first", s(&img));
    dump(&[&spec], &core);

    // 32 MiB of ram0 at 0 and the 256 KiB BIOS just below 4 GiB; vaddr = paddr.
    let l = loads(&core);
    assert_eq!(l.len(), 2, "{l:x?}");
    assert_eq!(l[0][1..], [0, 0, 32 << 20, 32 << 20]);
    assert_eq!(l[1][1..], [0xfffc_0000, 0xfffc_0000, 0x40000, 0x40000]);
    assert_eq!(
        notes(&core),
        [
            ("CORE".into(), "NT_PRSTATUS (prstatus structure)".into()),
            ("QEMU".into(), "Unknown note type: (0x00000000)".into())
        ]
    );

    let state: Value = serde_json::from_str(&stdout(&inspect(&[
        s(&img),
        "--snapshot",
        "first",
        "--dump",
        "state",
    ])))
    .unwrap();
    let cpu = section(&state, "cpu");
    let ram = extract_ram(dir.path(), &[s(&img), "--snapshot", "first"]);
    // A "random" page, a "repeat" page, an all-zero page (a hole), a page SeaBIOS changed,
    // the reset vector in the BIOS.
    let addrs = [0x1000u64, 0x10_0000, 0x7000, 0x6000, 0xffff_fff0];
    let (rip, rsp, mem) = gdb(&core, &addrs);
    assert_eq!(rip, hex(&cpu["env.eip"]));
    assert_eq!(rsp, hex(&cpu["env.regs"][4]));
    for (a, m) in addrs.iter().zip(&mem) {
        let want = if *a >= 0xfffc_0000 {
            two_u64(&ram["pc.bios"], (*a - 0xfffc_0000) as usize)
        } else {
            two_u64(&ram["ram0"], *a as usize)
        };
        assert_eq!(*m, want, "at {a:#x}");
    }
    // The pattern's header: "PAGE", then the gpa.
    assert_eq!(mem[0][0], 0x0000_1000_4547_4150);
    assert_eq!(mem[2], [0, 0]);
    // Zero pages are holes: at least the pattern's 1 in 8 zero pages take no space.
    let md = std::fs::metadata(&core).unwrap();
    assert!(
        md.blocks() * 512 < md.len() - (4 << 20),
        "{} of {}",
        md.blocks() * 512,
        md.len()
    );
}

#[test]
fn counter_guest_as_elf_core() {
    if !kvm(module_path!()) || !tools(module_path!()) || !require(module_path!(), &["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = counter_snapshots(dir.path());
    let core = dir.path().join("s2.elf");
    dump(&[s(&img), "--snapshot", "s2"], &core);
    let l = loads(&core);
    assert_eq!(l.len(), 1, "{l:x?}");
    assert_eq!(l[0][1..], [0, 0, 16 << 20, 16 << 20]);

    let state: Value = serde_json::from_str(&stdout(&inspect(&[
        s(&img),
        "--snapshot",
        "s2",
        "--dump",
        "state",
    ])))
    .unwrap();
    let cpu = section(&state, "cpu");
    let ram = extract_ram(dir.path(), &[s(&img), "--snapshot", "s2"]);
    use vmsnap::vmm::guest::counter;
    let addrs = [
        counter::LOAD_ADDR,
        counter::TICKS_ADDR,
        counter::REGION_ADDR,
    ];
    let (rip, rsp, mem) = gdb(&core, &addrs);
    assert_eq!(rip, hex(&cpu["rip"]));
    assert_eq!(rsp, hex(&cpu["rsp"]));
    for (a, m) in addrs.iter().zip(&mem) {
        assert_eq!(*m, two_u64(&ram["pc.ram"], *a as usize), "at {a:#x}");
    }
    // The tick counter is there and non-zero.
    assert_ne!(mem[1][0], 0);
}
