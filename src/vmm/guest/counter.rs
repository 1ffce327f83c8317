//! The `counter` guest: `testdata/guest/counter.S`, assembled by `testdata/guest/build.sh`.
//!
//! vCPU 0 programs the PIC and the PIT (100 Hz), drops to user mode and, at each tick N,
//! prints `tick N`, optionally checks (when the control device asks, and every 64 ticks) that
//! the RAM region and the disk record agree with its counters (`CHECK OK` / `CHECK FAIL`),
//! rewrites a 64 KiB RAM region from N, and every 4 ticks writes `{magic, N, !N}` to sector 1
//! of disk 0. Ticks are handled one by one: when two interrupts fall within one round of the
//! loop (a vCPU preempted on a busy host, or throttled), the next round handles the second, so
//! the printed ticks always count on by one. Other vCPUs count in user mode, each in its own
//! RAM slot.
//!
//! Memory dirtying (for live migration): [`set_dirty_rate`] writes parameters into the image
//! before the VM starts; the user loop then also stores the tick number into the first qword
//! of a number of pages per handled tick, cycling page by page through all RAM from
//! [`DIRTY_AREA_START`] up (at most the first GiB, which the page tables map). The work is
//! per handled tick, and the PIT drops ticks a sleeping vCPU misses, so a throttled vCPU
//! dirties less. The area lies outside the region `CHECK` verifies.

use kvm_bindings::kvm_regs;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use super::{long_mode, GuestError};

/// The assembled guest (loaded at [`LOAD_ADDR`]).
pub static IMAGE: &[u8] = include_bytes!("../../../testdata/guest/counter.bin");
/// Guest-physical load address of [`IMAGE`].
pub const LOAD_ADDR: u64 = 0x10000;
const KERNEL_ENTRY: u64 = LOAD_ADDR;
const AP_ENTRY: u64 = LOAD_ADDR + 0x80;
const TIMER_ISR: u64 = LOAD_ADDR + 0x100;
const OTHER_ISR: u64 = LOAD_ADDR + 0x140;
/// Vector of IRQ 0 after the guest programs the PIC.
pub const TIMER_VECTOR: u8 = 0x20;
/// Address of the tick counter the timer interrupt increments.
pub const TICKS_ADDR: u64 = LOAD_ADDR + 0xc00;
/// Address of the last tick the user loop handled (printed).
pub const LAST_ADDR: u64 = LOAD_ADDR + 0xc08;
/// Address of the tick the RAM region was last filled from (equals the handled tick once
/// that tick's work is done).
pub const FILLED_ADDR: u64 = LOAD_ADDR + 0xc10;
/// Address of the N of the last record written to disk 0 (0 before the first).
pub const DISK_N_ADDR: u64 = LOAD_ADDR + 0xc18;
/// Address of the count of unexpected exceptions.
pub const FAULTS_ADDR: u64 = LOAD_ADDR + 0xc20;
/// Address of the count of failed checks.
pub const CHECK_FAILS_ADDR: u64 = LOAD_ADDR + 0xc28;
/// Address of the number of pages dirtied per handled tick (0 = no dirtying).
pub const DIRTY_PER_TICK_ADDR: u64 = LOAD_ADDR + 0xc38;
/// Address of the start of the dirtied area.
pub const DIRTY_START_ADDR: u64 = LOAD_ADDR + 0xc40;
/// Address of the end of the dirtied area.
pub const DIRTY_END_ADDR: u64 = LOAD_ADDR + 0xc48;
/// Address of the next page the guest dirties.
pub const DIRTY_CURSOR_ADDR: u64 = LOAD_ADDR + 0xc50;
/// Address of the count of pages dirtied so far.
pub const DIRTY_TOTAL_ADDR: u64 = LOAD_ADDR + 0xc58;
/// Address of the number of qwords stored from the start of each dirtied page (0 = 1).
pub const DIRTY_QWORDS_ADDR: u64 = LOAD_ADDR + 0xc60;
/// Per-vCPU counters of the user loops of vCPUs 1.. (u64 each, indexed by vCPU).
pub const AP_COUNTERS_ADDR: u64 = LOAD_ADDR + 0xd00;
/// The RAM region rewritten from the tick count.
pub const REGION_ADDR: u64 = 0x10_0000;
/// Size of that region.
pub const REGION_SIZE: u64 = 0x1_0000;
/// RAM the guest needs.
pub const MIN_MEMORY: u64 = REGION_ADDR + REGION_SIZE;

/// First byte of the RAM area the guest dirties (above everything the layout fixes).
pub const DIRTY_AREA_START: u64 = 0x20_0000;
/// End of the RAM the page tables map (the dirtied area stops there).
pub const MAPPED_END: u64 = 0x4000_0000;
/// Timer ticks per second (the guest programs the PIT to 100 Hz).
pub const TICKS_PER_SEC: u64 = 100;
const PAGE_SIZE: u64 = 0x1000;

/// The dirtying parameters written into a loaded guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyParams {
    /// Pages dirtied per handled tick.
    pub pages_per_tick: u64,
    /// Start of the area.
    pub start: u64,
    /// End of the area (exclusive).
    pub end: u64,
}

impl DirtyParams {
    /// Parameters for `mib_per_s` MiB/s in a guest with `mem_size` bytes of RAM; `None` when
    /// the rate is 0. Pages per tick round up, so the rate is at least the one asked for.
    pub fn for_rate(mib_per_s: u64, mem_size: u64) -> Result<Option<DirtyParams>, GuestError> {
        if mib_per_s == 0 {
            return Ok(None);
        }
        let end = mem_size.min(MAPPED_END) & !(PAGE_SIZE - 1);
        if end <= DIRTY_AREA_START {
            return Err(GuestError::MemoryTooSmall {
                need: DIRTY_AREA_START + PAGE_SIZE,
                have: mem_size,
            });
        }
        let pages_per_sec = mib_per_s.saturating_mul(1 << 20) / PAGE_SIZE;
        Ok(Some(DirtyParams {
            pages_per_tick: pages_per_sec.div_ceil(TICKS_PER_SEC),
            start: DIRTY_AREA_START,
            end,
        }))
    }
}

/// Makes the loaded (not yet started) guest dirty `mib_per_s` MiB of RAM per second (0 =
/// off, the guest's behaviour without this call). Returns what was written.
pub fn set_dirty_rate(
    mem: &GuestMemoryMmap,
    mib_per_s: u64,
) -> Result<Option<DirtyParams>, GuestError> {
    let have = mem.iter().map(GuestMemoryRegion::len).sum::<u64>();
    let params = DirtyParams::for_rate(mib_per_s, have)?;
    let words = match params {
        Some(p) => [p.pages_per_tick, p.start, p.end, p.start],
        None => [0; 4],
    };
    for (i, w) in words.iter().enumerate() {
        let addr = DIRTY_PER_TICK_ADDR + 8 * i as u64;
        mem.write_obj(*w, GuestAddress(addr))
            .map_err(|source| GuestError::Write {
                what: "dirtying parameters",
                addr,
                source,
            })?;
    }
    Ok(params)
}

/// Makes the loaded (not yet started) guest store into the first `bytes` of each page it
/// dirties (a multiple of 8 from 8 to 4096; the guest's default is 8): how much of a page
/// changes matters to XBZRLE. Returns the qwords written.
pub fn set_dirty_span(mem: &GuestMemoryMmap, bytes: u64) -> Result<u64, GuestError> {
    if bytes == 0 || bytes > PAGE_SIZE || bytes % 8 != 0 {
        return Err(GuestError::DirtySpan(bytes));
    }
    let qwords = bytes / 8;
    mem.write_obj(qwords, GuestAddress(DIRTY_QWORDS_ADDR))
        .map_err(|source| GuestError::Write {
            what: "dirtying span",
            addr: DIRTY_QWORDS_ADDR,
            source,
        })?;
    Ok(qwords)
}

/// Writes tables and code.
pub fn load(mem: &GuestMemoryMmap, vcpus: usize) -> Result<(), GuestError> {
    let have = mem.iter().map(GuestMemoryRegion::len).sum::<u64>();
    if have < MIN_MEMORY {
        return Err(GuestError::MemoryTooSmall {
            need: MIN_MEMORY,
            have,
        });
    }
    long_mode::write_tables(mem, vcpus, |v| {
        if v == TIMER_VECTOR {
            TIMER_ISR
        } else {
            OTHER_ISR
        }
    })?;
    mem.write_slice(IMAGE, GuestAddress(LOAD_ADDR))
        .map_err(|source| GuestError::Write {
            what: "guest image",
            addr: LOAD_ADDR,
            source,
        })
}

/// vCPU 0 starts at the kernel entry; the others at the AP entry with their index in `rdi`
/// and their user stack in `rsi`.
pub fn initial_regs(index: usize) -> kvm_regs {
    kvm_regs {
        rip: if index == 0 { KERNEL_ENTRY } else { AP_ENTRY },
        rsp: long_mode::kernel_stack(index),
        rflags: 0x2,
        rdi: index as u64,
        rsi: long_mode::user_stack(index),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_rate_turns_into_pages_per_tick() {
        assert_eq!(DirtyParams::for_rate(0, 1 << 30).unwrap(), None);
        let p = DirtyParams::for_rate(200, 1 << 30).unwrap().unwrap();
        assert_eq!(p.pages_per_tick, 512); // 200 MiB/s = 51200 pages/s at 100 Hz
        assert_eq!((p.start, p.end), (DIRTY_AREA_START, 1 << 30));
        let p = DirtyParams::for_rate(1, 64 << 20).unwrap().unwrap();
        assert_eq!(p.pages_per_tick, 3); // 2.56 rounds up
        assert_eq!(p.end, 64 << 20);
        // beyond the mapped first GiB the area stops at 1 GiB
        let p = DirtyParams::for_rate(50, 4 << 30).unwrap().unwrap();
        assert_eq!(p.end, MAPPED_END);
        assert!(matches!(
            DirtyParams::for_rate(10, 0x1f_0000),
            Err(GuestError::MemoryTooSmall {
                have: 0x1f_0000,
                ..
            })
        ));
    }

    #[test]
    fn set_dirty_rate_writes_the_parameter_words() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        load(&mem, 1).unwrap();
        let p = set_dirty_rate(&mem, 50).unwrap().unwrap();
        let word = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(word(DIRTY_PER_TICK_ADDR), p.pages_per_tick);
        assert_eq!(word(DIRTY_START_ADDR), DIRTY_AREA_START);
        assert_eq!(word(DIRTY_END_ADDR), 8 << 20);
        assert_eq!(word(DIRTY_CURSOR_ADDR), DIRTY_AREA_START);
        assert_eq!(set_dirty_rate(&mem, 0).unwrap(), None);
        assert_eq!(word(DIRTY_PER_TICK_ADDR), 0);
        assert_eq!(word(DIRTY_QWORDS_ADDR), 0);
        assert_eq!(set_dirty_span(&mem, 408).unwrap(), 51);
        assert_eq!(word(DIRTY_QWORDS_ADDR), 51);
        for bad in [0, 7, 4104] {
            assert!(matches!(set_dirty_span(&mem, bad), Err(GuestError::DirtySpan(b)) if b == bad));
        }
        assert_eq!(word(DIRTY_QWORDS_ADDR), 51);
    }

    #[test]
    fn image_entry_points_hold_the_expected_code() {
        assert_eq!(IMAGE.len(), 0x1000);
        // kernel_entry: mov al, 0x11 ; out 0x20, al
        assert_eq!(&IMAGE[0..4], &[0xb0, 0x11, 0xe6, 0x20]);
        // ap_entry: push 0x23
        assert_eq!(&IMAGE[0x80..0x82], &[0x6a, 0x23]);
        // timer_isr: push rax ; inc qword ptr [ticks]
        assert_eq!(
            &IMAGE[0x100..0x108],
            &[0x50, 0x48, 0xff, 0x04, 0x25, 0x00, 0x0c, 0x01]
        );
    }
}
