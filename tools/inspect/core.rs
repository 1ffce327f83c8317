//! `--dump-guest-memory OUT.elf`: a snapshot's guest RAM and vCPU registers as the ELF64 core
//! QEMU's `dump-guest-memory` writes (QEMU's dump/dump.c and target/i386/arch_dump.c), so that
//! `readelf`, `gdb -c` and crash-style tools read a VM that was never running.
//!
//! Layout: the ELF header; one PT_NOTE and one PT_LOAD per RAM region (at its guest-physical
//! address); the notes (an `NT_PRSTATUS` "CORE" note per vCPU, then a "QEMU" note per vCPU
//! with QEMU's `QEMUCPUState`); then the RAM data. Two choices differ from QEMU's un-paged
//! dump, both for the tools that read the file: `p_vaddr` is the guest-physical address (QEMU
//! writes 0 there, which gdb cannot address), and each region's data starts page-aligned in
//! the file, so that zero pages are left as holes of a sparse file and take no disk space.
//!
//! Registers come from the `cpu` sections: QEMU's x86 `cpu` fields (`env.regs`, `env.eip`,
//! `env.segs`, …) for QEMU-made streams, vmsnap's own `cpu` description otherwise.
//!
//! Where RAM blocks live: vmsnap's machine has one block `pc.ram` at 0. QEMU's x86 machines:
//! the main RAM block (the largest) below 4 GiB up to the machine's low-memory limit (q35:
//! 2 GiB when the RAM reaches 0xb0000000; i440fx: 3 GiB when it reaches 0xe0000000) and the
//! rest at 4 GiB; `pc.bios` just below 4 GiB. Other ROM blocks (option ROMs, fw_cfg blobs) are
//! not in the guest's address space as themselves and are left out, as is the finer split QEMU
//! makes where devices overlay RAM (VGA window, PAM).
//!
//! The ELF structures are written by hand: they are a few fixed records (the layout of the
//! notes is QEMU's, not the OS's), which general ELF writers do not model.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vmsnap::migration::ram::is_zero;
use vmsnap::migration::value::Value;

use crate::pages::{Loc, PageIndex, PageReader, PagesError};
use crate::side::Side;

/// Failures writing a core.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// No decoded `cpu` section.
    #[error("no decoded cpu section: the core needs vCPU registers")]
    NoCpu,
    /// A register field missing from a cpu section.
    #[error("cpu {cpu}: field '{field}' is missing from the cpu section")]
    Register { cpu: u32, field: &'static str },
    /// A block the machine layout does not place.
    #[error("no RAM block to dump: the stream's blocks are {0}")]
    NoRam(String),
    /// The machine is unknown.
    #[error("machine '{0}': where its RAM blocks live in guest-physical memory is not known")]
    UnknownMachine(String),
    /// Reading pages.
    #[error(transparent)]
    Pages(#[from] PagesError),
    /// Writing the output.
    #[error("writing '{path}': {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// One segment as QEMU's `QEMUCPUSegment` holds it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seg {
    pub selector: u32,
    pub limit: u32,
    pub flags: u32,
    pub base: u64,
}

/// A vCPU's registers, as the notes need them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Regs {
    /// rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8 … r15.
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    /// cs, ds, es, fs, gs, ss.
    pub segs: [Seg; 6],
    pub ldt: Seg,
    pub tr: Seg,
    pub gdt: Seg,
    pub idt: Seg,
    pub cr: [u64; 5],
    pub kernel_gs_base: u64,
}

const CS: usize = 0;
const DS: usize = 1;
const ES: usize = 2;
const FS: usize = 3;
const GS: usize = 4;
const SS: usize = 5;

fn int(v: &Value, cpu: u32, field: &'static str) -> Result<u64, CoreError> {
    v.get(field)
        .and_then(Value::as_u64)
        .ok_or(CoreError::Register { cpu, field })
}

/// A QEMU `segment` struct (selector, base, limit, flags).
fn qemu_seg(v: Option<&Value>) -> Seg {
    let f = |n| {
        v.and_then(|v| v.get(n))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Seg {
        selector: f("selector") as u32,
        limit: f("limit") as u32,
        flags: f("flags") as u32,
        base: f("base"),
    }
}

/// Registers from QEMU's x86 `cpu` section.
fn qemu_regs(v: &Value, cpu: u32) -> Result<Regs, CoreError> {
    let regs: Vec<u64> = v
        .get("env.regs")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    if regs.len() != 16 {
        return Err(CoreError::Register {
            cpu,
            field: "env.regs",
        });
    }
    // QEMU's order: EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI, R8 … R15.
    let mut gpr = [0u64; 16];
    for (i, q) in [0, 3, 1, 2, 6, 7, 4, 5].into_iter().enumerate() {
        gpr[i] = regs[q];
    }
    gpr[8..].copy_from_slice(&regs[8..]);
    let segs = v.get("env.segs").and_then(Value::as_array).unwrap_or(&[]);
    // QEMU's order: ES, CS, SS, DS, FS, GS.
    let seg = |i: usize| qemu_seg(segs.get(i));
    let cr = |n: &str| v.get(n).and_then(Value::as_u64).unwrap_or(0);
    Ok(Regs {
        gpr,
        rip: int(v, cpu, "env.eip")?,
        rflags: int(v, cpu, "env.eflags")?,
        segs: [seg(1), seg(3), seg(0), seg(4), seg(5), seg(2)],
        ldt: qemu_seg(v.get("env.ldt")),
        tr: qemu_seg(v.get("env.tr")),
        gdt: qemu_seg(v.get("env.gdt")),
        idt: qemu_seg(v.get("env.idt")),
        cr: [
            cr("env.cr[0]"),
            0,
            cr("env.cr[2]"),
            cr("env.cr[3]"),
            cr("env.cr[4]"),
        ],
        kernel_gs_base: cr("env.kernelgsbase"),
    })
}

/// A vmsnap `cpu/segment` struct, with QEMU's descriptor flags from KVM's fields (as QEMU's
/// kvm_get_sregs computes them).
fn vmsnap_seg(v: Option<&Value>) -> Seg {
    let f = |n| {
        v.and_then(|v| v.get(n))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let flags = (f("type") << 8)
        | (f("s") << 12)
        | (f("dpl") << 13)
        | (f("present") << 15)
        | (f("avl") << 20)
        | (f("l") << 21)
        | (f("db") << 22)
        | (f("g") << 23);
    Seg {
        selector: f("selector") as u32,
        limit: f("limit") as u32,
        flags: flags as u32,
        base: f("base"),
    }
}

/// MSR number of KERNEL_GS_BASE.
const MSR_KERNEL_GS_BASE: u64 = 0xc000_0102;

/// Registers from vmsnap's own `cpu` section (src/vmm/vmstate.rs).
fn vmsnap_regs(v: &Value, cpu: u32) -> Result<Regs, CoreError> {
    const GPRS: [&str; 16] = [
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12",
        "r13", "r14", "r15",
    ];
    let mut gpr = [0u64; 16];
    for (g, name) in gpr.iter_mut().zip(GPRS) {
        *g = int(v, cpu, name)?;
    }
    let seg = |n| vmsnap_seg(v.get(n));
    let table = |n| {
        let t = v.get(n);
        let f = |k| {
            t.and_then(|t| t.get(k))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        Seg {
            limit: f("limit") as u32,
            base: f("base"),
            ..Seg::default()
        }
    };
    let cr = |n| v.get(n).and_then(Value::as_u64).unwrap_or(0);
    let kernel_gs_base = v
        .get("msrs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|m| m.get("index").and_then(Value::as_u64) == Some(MSR_KERNEL_GS_BASE))
        .and_then(|m| m.get("data").and_then(Value::as_u64))
        .unwrap_or(0);
    Ok(Regs {
        gpr,
        rip: int(v, cpu, "rip")?,
        rflags: int(v, cpu, "rflags")?,
        segs: [
            seg("cs"),
            seg("ds"),
            seg("es"),
            seg("fs"),
            seg("gs"),
            seg("ss"),
        ],
        ldt: seg("ldt"),
        tr: seg("tr"),
        gdt: table("gdt"),
        idt: table("idt"),
        cr: [cr("cr0"), 0, cr("cr2"), cr("cr3"), cr("cr4")],
        kernel_gs_base,
    })
}

/// Registers of every vCPU, by instance id.
pub fn cpu_regs(side: &Side) -> Result<Vec<Regs>, CoreError> {
    let mut cpus: Vec<(u32, &Value)> = side
        .analysis
        .devices
        .iter()
        .filter(|d| d.idstr == "cpu")
        .filter_map(|d| Some((d.instance_id, d.value.as_ref()?)))
        .collect();
    cpus.sort_by_key(|(i, _)| *i);
    if cpus.is_empty() {
        return Err(CoreError::NoCpu);
    }
    cpus.into_iter()
        .map(|(i, v)| {
            if v.get("env.regs").is_some() {
                qemu_regs(v, i)
            } else {
                vmsnap_regs(v, i)
            }
        })
        .collect()
}

/// A run of a RAM block at a guest-physical address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// Block name.
    pub block: String,
    /// Offset in the block.
    pub offset: u64,
    /// Guest-physical address.
    pub gpa: u64,
    /// Bytes.
    pub len: u64,
}

const GIB4: u64 = 1 << 32;

/// Where the blocks of `idx` live for `machine` (see the module doc).
pub fn layout(machine: &str, idx: &PageIndex) -> Result<Vec<Region>, CoreError> {
    let names = || {
        idx.blocks
            .iter()
            .map(|b| b.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if machine.starts_with("vmsnap") {
        let b = idx
            .block("pc.ram")
            .ok_or_else(|| CoreError::NoRam(names()))?;
        return Ok(vec![Region {
            block: b.name.clone(),
            offset: 0,
            gpa: 0,
            len: b.len,
        }]);
    }
    let q35 = machine.contains("q35");
    if !(q35 || machine.contains("i440fx") || machine == "pc") {
        return Err(CoreError::UnknownMachine(machine.to_string()));
    }
    let main = idx
        .blocks
        .iter()
        .filter(|b| b.name != "pc.bios")
        .max_by_key(|b| b.len)
        .ok_or_else(|| CoreError::NoRam(names()))?;
    let below = match (q35, main.len) {
        (true, l) if l >= 0xb000_0000 => 0x8000_0000,
        (false, l) if l >= 0xe000_0000 => 0xc000_0000,
        (_, l) => l,
    };
    let mut out = vec![Region {
        block: main.name.clone(),
        offset: 0,
        gpa: 0,
        len: below,
    }];
    if main.len > below {
        out.push(Region {
            block: main.name.clone(),
            offset: below,
            gpa: GIB4,
            len: main.len - below,
        });
    }
    if let Some(bios) = idx.block("pc.bios") {
        out.push(Region {
            block: bios.name.clone(),
            offset: 0,
            gpa: GIB4 - bios.len,
            len: bios.len,
        });
    }
    out.sort_by_key(|r| r.gpa);
    Ok(out)
}

const EHDR: u64 = 64;
const PHDR: u64 = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const NT_PRSTATUS: u32 = 1;
const EM_X86_64: u16 = 62;
const ET_CORE: u16 = 4;
/// `sizeof(struct x86_64_elf_prstatus)` in QEMU's arch_dump.c.
const PRSTATUS_SIZE: usize = 336;
/// `sizeof(QEMUCPUState)`: version, size, 18 registers, 10 segments, cr[5], kernel_gs_base.
const QEMU_CPUSTATE_SIZE: usize = 8 + 18 * 8 + 10 * 24 + 5 * 8 + 8;

fn note(out: &mut Vec<u8>, name: &str, kind: u32, desc: &[u8]) {
    let pad = |v: &mut Vec<u8>| v.resize(v.len().div_ceil(4) * 4, 0);
    out.extend_from_slice(&(name.len() as u32 + 1).to_le_bytes());
    out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad(out);
    out.extend_from_slice(desc);
    pad(out);
}

/// QEMU's `x86_64_elf_prstatus`: padding, pid, padding, `user_regs_struct`, padding.
fn prstatus(r: &Regs, id: u32) -> Vec<u8> {
    let mut d = vec![0u8; 32];
    d.extend_from_slice(&id.to_le_bytes());
    d.resize(32 + 4 + 76, 0);
    let g = &r.gpr;
    let sel = |i: usize| u64::from(r.segs[i].selector);
    let regs = [
        g[15],
        g[14],
        g[13],
        g[12],
        g[7],
        g[1],
        g[11],
        g[10],
        g[9],
        g[8],
        g[0],
        g[2],
        g[3],
        g[4],
        g[5],
        0,
        r.rip,
        sel(CS),
        r.rflags,
        g[6],
        sel(SS),
        r.segs[FS].base,
        r.segs[GS].base,
        sel(DS),
        sel(ES),
        sel(FS),
        sel(GS),
    ];
    for v in regs {
        d.extend_from_slice(&v.to_le_bytes());
    }
    d.resize(PRSTATUS_SIZE, 0);
    d
}

/// QEMU's `QEMUCPUState` (version 1).
fn qemu_cpustate(r: &Regs) -> Vec<u8> {
    let mut d = Vec::with_capacity(QEMU_CPUSTATE_SIZE);
    d.extend_from_slice(&1u32.to_le_bytes());
    d.extend_from_slice(&(QEMU_CPUSTATE_SIZE as u32).to_le_bytes());
    for v in r.gpr.iter().chain([&r.rip, &r.rflags]) {
        d.extend_from_slice(&v.to_le_bytes());
    }
    for s in r.segs.iter().chain([&r.ldt, &r.tr, &r.gdt, &r.idt]) {
        for v in [s.selector, s.limit, s.flags, 0] {
            d.extend_from_slice(&v.to_le_bytes());
        }
        d.extend_from_slice(&s.base.to_le_bytes());
    }
    for v in r.cr.iter().chain([&r.kernel_gs_base]) {
        d.extend_from_slice(&v.to_le_bytes());
    }
    d
}

#[allow(clippy::too_many_arguments)]
fn phdr(out: &mut Vec<u8>, kind: u32, offset: u64, addr: u64, filesz: u64, memsz: u64) {
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // p_flags, 0 as QEMU writes
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&addr.to_le_bytes()); // p_vaddr
    out.extend_from_slice(&addr.to_le_bytes()); // p_paddr
    out.extend_from_slice(&filesz.to_le_bytes());
    out.extend_from_slice(&memsz.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes()); // p_align
}

fn ehdr(phnum: u16) -> Vec<u8> {
    let mut h = Vec::with_capacity(EHDR as usize);
    h.extend_from_slice(b"\x7fELF");
    h.extend_from_slice(&[2, 1, 1, 0]); // ELFCLASS64, ELFDATA2LSB, EV_CURRENT, ELFOSABI_NONE
    h.resize(16, 0);
    h.extend_from_slice(&ET_CORE.to_le_bytes());
    h.extend_from_slice(&EM_X86_64.to_le_bytes());
    h.extend_from_slice(&1u32.to_le_bytes()); // e_version
    h.extend_from_slice(&0u64.to_le_bytes()); // e_entry
    h.extend_from_slice(&EHDR.to_le_bytes()); // e_phoff
    h.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    h.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    h.extend_from_slice(&(EHDR as u16).to_le_bytes());
    h.extend_from_slice(&(PHDR as u16).to_le_bytes());
    h.extend_from_slice(&phnum.to_le_bytes());
    h.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    h.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    h.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    h
}

/// Writes the core to a temporary file next to `out` and renames it into place, so that a
/// failure never leaves a partial core under the name asked for.
pub fn write_core(side: &mut Side, out: &Path) -> Result<String, crate::InspectError> {
    let regs = cpu_regs(side)?;
    let idx = side.page_index()?;
    let machine = side.analysis.machine.clone().unwrap_or_default();
    let regions = layout(&machine, &idx)?;
    let tmp = partial_name(out);
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| CoreError::Io { path, source }
    };
    let file = File::create(&tmp).map_err(io(&tmp))?;
    let mut src = side.input.read_at()?;
    let mut reader = PageReader::new(&mut *src);
    let r = write_to(&file, &tmp, &regs, &idx, &regions, &mut reader)
        .and_then(|s| {
            file.sync_all().map(|()| s).map_err(|e| CoreError::Io {
                path: tmp.display().to_string(),
                source: e,
            })
        })
        .and_then(|s| {
            std::fs::rename(&tmp, out).map_err(io(out))?;
            Ok(s)
        });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let (data, holes) = r?;
    Ok(format!(
        "wrote {}: {} vCPUs, {} PT_LOAD regions, {data:#x} bytes of RAM written, {holes} zero pages left as holes",
        out.display(),
        regs.len(),
        regions.len()
    ))
}

fn partial_name(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map_or_else(|| "core".into(), |n| n.to_string_lossy().into_owned());
    out.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Writes headers, notes and the non-zero pages; returns (bytes of page data, zero pages).
fn write_to(
    file: &File,
    path: &Path,
    regs: &[Regs],
    idx: &PageIndex,
    regions: &[Region],
    pages: &mut PageReader<'_>,
) -> Result<(u64, u64), CoreError> {
    let ioe = |source| CoreError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut notes = Vec::new();
    for (i, r) in regs.iter().enumerate() {
        note(&mut notes, "CORE", NT_PRSTATUS, &prstatus(r, i as u32 + 1));
    }
    for r in regs {
        note(&mut notes, "QEMU", 0, &qemu_cpustate(r));
    }
    let ps = idx.page_size;
    let phnum = 1 + regions.len();
    let note_off = EHDR + PHDR * phnum as u64;
    let mut head = ehdr(phnum as u16);
    phdr(
        &mut head,
        PT_NOTE,
        note_off,
        0,
        notes.len() as u64,
        notes.len() as u64,
    );
    let mut off = (note_off + notes.len() as u64).next_multiple_of(ps);
    let mut offsets = Vec::new();
    for r in regions {
        phdr(&mut head, PT_LOAD, off, r.gpa, r.len, r.len);
        offsets.push(off);
        off = (off + r.len).next_multiple_of(ps);
    }
    head.extend_from_slice(&notes);
    let mut w = file;
    w.write_all(&head).map_err(ioe)?;
    file.set_len(off).map_err(ioe)?;
    let mut page = vec![0u8; ps as usize];
    let (mut data, mut holes) = (0u64, 0u64);
    for (r, base) in regions.iter().zip(offsets) {
        let Some(block) = idx.block(&r.block) else {
            continue;
        };
        let mut at = 0;
        while at < r.len {
            let n = (r.offset + at) / ps;
            let len = ps.min(r.len - at) as usize;
            let loc = block.loc(n);
            if matches!(loc, Loc::Absent | Loc::Fill(0)) {
                holes += 1;
            } else {
                pages.read(loc, &mut page)?;
                if is_zero(&page[..len]) {
                    holes += 1;
                } else {
                    file.write_all_at(&page[..len], base + at).map_err(ioe)?;
                    data += len as u64;
                }
            }
            at += len as u64;
        }
    }
    Ok((data, holes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn note_structures_have_qemus_sizes() {
        let r = Regs {
            rip: 0x1234,
            ..Regs::default()
        };
        let p = prstatus(&r, 1);
        assert_eq!(p.len(), PRSTATUS_SIZE);
        // pr_reg starts at 112; rip is its 17th register.
        assert_eq!(&p[112 + 16 * 8..112 + 17 * 8], &0x1234u64.to_le_bytes());
        assert_eq!(qemu_cpustate(&r).len(), 440);
        let mut n = Vec::new();
        note(&mut n, "CORE", NT_PRSTATUS, &p);
        assert_eq!(n.len(), 12 + 8 + PRSTATUS_SIZE);
    }
}
