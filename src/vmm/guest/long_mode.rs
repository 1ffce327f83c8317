//! Descriptor tables, TSSs and identity page tables for a 64-bit guest without firmware.
//!
//! Guest-physical layout (below 1 MiB):
//!
//! | address   | what                                                              |
//! |-----------|-------------------------------------------------------------------|
//! | `0x1000`  | GDT: null, kernel code 0x08, kernel data 0x10, user code 0x18,    |
//! |           | user data 0x20, then one 16-byte TSS descriptor per vCPU (0x28+16i)|
//! | `0x2000`  | IDT: 256 interrupt gates                                          |
//! | `0x8000`  | PML4, `0x9000` PDPT, `0xa000` PD: first 1 GiB, 2 MiB pages, user   |
//! | `0x20000` | TSS of vCPU i at `0x20000 + 0x3000 * i` with an all-zero I/O bitmap|
//! | stacks    | kernel `0x70000 - 0x1000 * i`, user `0x80000 - 0x1000 * i`        |
//!
//! The I/O bitmap matters on kvm_pvm: port I/O from CPL 3 faults there unless the TSS has a
//! bitmap allowing the port, even with IOPL 3.

use kvm_bindings::{kvm_dtable, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::GuestError;

/// GDT base.
pub const GDT_ADDR: u64 = 0x1000;
/// IDT base.
pub const IDT_ADDR: u64 = 0x2000;
/// PML4 base (CR3).
pub const PML4_ADDR: u64 = 0x8000;
const PDPT_ADDR: u64 = 0x9000;
const PD_ADDR: u64 = 0xa000;
const TSS_BASE: u64 = 0x20000;
const TSS_STRIDE: u64 = 0x3000;
/// Size of the TSS proper; the I/O bitmap follows it.
const TSS_SIZE: u64 = 0x68;
/// 65536 ports / 8, plus the terminating 0xff byte.
const IOBITMAP_SIZE: u64 = 0x2001;
/// Most vCPUs the tables have room for.
pub const MAX_VCPUS: usize = 8;
/// Kernel code selector.
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data selector.
pub const KERNEL_DS: u16 = 0x10;
const TSS_SEL_BASE: u16 = 0x28;
/// Memory the layout uses (the guest's code and data come on top).
pub const LOW_MEMORY: u64 = 0x10_0000;

/// Top of vCPU `i`'s kernel stack.
pub fn kernel_stack(i: usize) -> u64 {
    0x70000 - 0x1000 * i as u64
}

/// Top of vCPU `i`'s user stack.
pub fn user_stack(i: usize) -> u64 {
    0x80000 - 0x1000 * i as u64
}

fn tss_addr(i: usize) -> u64 {
    TSS_BASE + TSS_STRIDE * i as u64
}

fn write(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    buf: &[u8],
) -> Result<(), GuestError> {
    mem.write_slice(buf, GuestAddress(addr))
        .map_err(|source| GuestError::Write { what, addr, source })
}

/// Writes GDT, IDT, TSSs and page tables. `isr(vector)` gives each vector's handler address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    vcpus: usize,
    isr: impl Fn(u8) -> u64,
) -> Result<(), GuestError> {
    if vcpus > MAX_VCPUS {
        return Err(GuestError::TooManyVcpus {
            max: MAX_VCPUS,
            requested: vcpus,
        });
    }
    // GDT: flat 64-bit segments; access bytes 0x9a/0x92 (DPL 0) and 0xfa/0xf2 (DPL 3), L bit.
    let mut gdt: Vec<u64> = vec![
        0,
        0x0020_9a00_0000_0000,
        0x0000_9200_0000_0000,
        0x0020_fa00_0000_0000,
        0x0000_f200_0000_0000,
    ];
    for i in 0..vcpus {
        let base = tss_addr(i);
        let limit = TSS_SIZE + IOBITMAP_SIZE - 1;
        // Available 64-bit TSS (type 9), present, byte granular.
        let low = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        gdt.push(low);
        gdt.push(base >> 32);
    }
    let gdt_bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    write(mem, "GDT", GDT_ADDR, &gdt_bytes)?;

    // IDT: 64-bit interrupt gates (type 0xe), DPL 0, present, kernel code selector.
    let mut idt = Vec::with_capacity(256 * 16);
    for v in 0..=255u8 {
        let off = isr(v);
        let low = (off & 0xffff)
            | (u64::from(KERNEL_CS) << 16)
            | (0x8e << 40)
            | (((off >> 16) & 0xffff) << 48);
        idt.extend_from_slice(&low.to_le_bytes());
        idt.extend_from_slice(&(off >> 32).to_le_bytes());
    }
    write(mem, "IDT", IDT_ADDR, &idt)?;

    // TSS: rsp0 at offset 4, I/O map base at offset 0x66, then the bitmap and its 0xff end.
    for i in 0..vcpus {
        let mut tss = vec![0u8; (TSS_SIZE + IOBITMAP_SIZE) as usize];
        tss[4..12].copy_from_slice(&kernel_stack(i).to_le_bytes());
        tss[0x66..0x68].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes());
        if let Some(last) = tss.last_mut() {
            *last = 0xff;
        }
        write(mem, "TSS", tss_addr(i), &tss)?;
    }

    // Page tables: present | writable | user at every level, 2 MiB pages for the first GiB.
    write(mem, "PML4", PML4_ADDR, &(PDPT_ADDR | 0x7).to_le_bytes())?;
    write(mem, "PDPT", PDPT_ADDR, &(PD_ADDR | 0x7).to_le_bytes())?;
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | 0x87).to_le_bytes())
        .collect();
    write(mem, "PD", PD_ADDR, &pd)
}

fn segment(selector: u16, type_: u8, s: u8, l: u8, db: u8, g: u8, limit: u32) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s,
        l,
        g,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Special registers for 64-bit kernel mode on vCPU `i` (paging, long mode, this vCPU's TSS).
pub fn sregs(i: usize, reset: &kvm_sregs) -> kvm_sregs {
    let mut s = *reset;
    let code = segment(KERNEL_CS, 0xb, 1, 1, 0, 1, 0xffff_ffff);
    let data = segment(KERNEL_DS, 0x3, 1, 0, 1, 1, 0xffff_ffff);
    s.cs = code;
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_segment {
        base: tss_addr(i),
        // Busy 64-bit TSS, as after LTR.
        ..segment(
            TSS_SEL_BASE + 16 * i as u16,
            0xb,
            0,
            0,
            0,
            0,
            (TSS_SIZE + IOBITMAP_SIZE - 1) as u32,
        )
    };
    s.ldt = kvm_segment {
        unusable: 1,
        ..segment(0, 0x2, 0, 0, 0, 0, 0)
    };
    s.gdt = kvm_dtable {
        base: GDT_ADDR,
        limit: (0x28 + 16 * MAX_VCPUS - 1) as u16,
        ..Default::default()
    };
    s.idt = kvm_dtable {
        base: IDT_ADDR,
        limit: 0xfff,
        ..Default::default()
    };
    // CR0: PE | MP | ET | NE | WP | PG. CR4: PAE | OSFXSR | OSXMMEXCPT. EFER: LME | LMA.
    s.cr0 = 0x8005_0033;
    s.cr3 = PML4_ADDR;
    s.cr4 = 0x620;
    s.efer = 0x500;
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_land_where_documented() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        write_tables(&mem, 2, |v| 0x10000 + u64::from(v)).unwrap();
        let gdt1: u64 = mem.read_obj(GuestAddress(GDT_ADDR + 8)).unwrap();
        assert_eq!(gdt1, 0x0020_9a00_0000_0000);
        // TSS descriptor of vCPU 1 points at its TSS.
        let d: u64 = mem.read_obj(GuestAddress(GDT_ADDR + 0x38)).unwrap();
        let base = ((d >> 16) & 0xff_ffff) | (((d >> 56) & 0xff) << 24);
        assert_eq!(base, tss_addr(1));
        let rsp0: u64 = mem.read_obj(GuestAddress(tss_addr(1) + 4)).unwrap();
        assert_eq!(rsp0, kernel_stack(1));
        let end: u8 = mem
            .read_obj(GuestAddress(tss_addr(0) + TSS_SIZE + IOBITMAP_SIZE - 1))
            .unwrap();
        assert_eq!(end, 0xff);
        // IDT gate 0x20 points at handler 0x10020.
        let lo: u64 = mem.read_obj(GuestAddress(IDT_ADDR + 0x20 * 16)).unwrap();
        assert_eq!((lo & 0xffff) | (((lo >> 48) & 0xffff) << 16), 0x10020);
        let pde: u64 = mem.read_obj(GuestAddress(PD_ADDR + 8)).unwrap();
        assert_eq!(pde, 0x20_0000 | 0x87);
    }

    #[test]
    fn too_many_vcpus_is_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        assert!(matches!(
            write_tables(&mem, MAX_VCPUS + 1, |_| 0),
            Err(GuestError::TooManyVcpus { requested: 9, .. })
        ));
    }
}
