//! The `counter` guest: `testdata/guest/counter.S`, assembled by `testdata/guest/build.sh`.
//!
//! vCPU 0 programs the PIC and the PIT (100 Hz), drops to user mode and, at each tick N,
//! prints `tick N`, optionally checks (when the control device asks, and every 64 ticks) that
//! the RAM region and the disk record agree with its counters (`CHECK OK` / `CHECK FAIL`),
//! rewrites a 64 KiB RAM region from N, and every 4 ticks writes `{magic, N, !N}` to sector 1
//! of disk 0. Other vCPUs count in user mode, each in its own RAM slot.

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
/// Per-vCPU counters of the user loops of vCPUs 1.. (u64 each, indexed by vCPU).
pub const AP_COUNTERS_ADDR: u64 = LOAD_ADDR + 0xd00;
/// The RAM region rewritten from the tick count.
pub const REGION_ADDR: u64 = 0x10_0000;
/// Size of that region.
pub const REGION_SIZE: u64 = 0x1_0000;
/// RAM the guest needs.
pub const MIN_MEMORY: u64 = REGION_ADDR + REGION_SIZE;

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

    /// The committed binary is what `build.sh` makes from the committed source.
    #[test]
    fn image_matches_its_source() {
        let have = |tool: &str| {
            std::process::Command::new(tool)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !have("as") || !have("ld") {
            eprintln!("SKIPPED: GNU as/ld not installed; cannot rebuild the counter guest");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("counter.bin");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/guest/build.sh");
        let status = std::process::Command::new("sh")
            .arg(script)
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success());
        assert!(
            std::fs::read(&out).unwrap() == IMAGE,
            "testdata/guest/counter.bin is stale: run testdata/guest/build.sh"
        );
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
