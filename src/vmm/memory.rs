//! Guest RAM: one anonymous mmap (vm-memory) registered as KVM memory slot 0 at GPA 0.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

/// Smallest guest RAM accepted.
pub const MIN_MEM_SIZE: u64 = 2 << 20;
/// Largest guest RAM accepted (the guests map only the first GiB).
pub const MAX_MEM_SIZE: u64 = 1 << 30;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Size outside the accepted range or not page aligned.
    #[error("guest memory size {0:#x} must be page aligned and within [{MIN_MEM_SIZE:#x}, {MAX_MEM_SIZE:#x}]")]
    BadSize(u64),
    /// mmap failed.
    #[error("allocating {size:#x} bytes of guest memory: {source}")]
    Allocate {
        /// Requested size.
        size: u64,
        /// The cause.
        #[source]
        source: vm_memory::mmap::Error,
    },
    /// A host address could not be obtained.
    #[error("guest memory region at {0:#x} has no host mapping")]
    HostAddress(u64),
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("KVM_SET_USER_MEMORY_REGION slot {slot} at {gpa:#x}: {source}")]
    SetRegion {
        /// Slot number.
        slot: u32,
        /// Guest-physical base.
        gpa: u64,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Allocates guest RAM of `size` bytes.
pub fn create(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if !(MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&size) || size % 4096 != 0 {
        return Err(MemoryError::BadSize(size));
    }
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
        .map_err(|source| MemoryError::Allocate { size, source })
}

/// Registers every region of `mem` with KVM, slot numbers from 0.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let gpa = region.start_addr().0;
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| MemoryError::HostAddress(gpa))?;
        let slot = slot as u32;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mmap owned by `mem`; the VM keeps a clone of `mem` (an
        // Arc to the same mappings) for as long as the VM fd exists, so KVM never sees the
        // memory unmapped while the slot is registered.
        unsafe { vm.set_user_memory_region(desc) }.map_err(|source| MemoryError::SetRegion {
            slot,
            gpa,
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked() {
        assert!(matches!(create(4096), Err(MemoryError::BadSize(4096))));
        assert!(matches!(
            create((4 << 20) + 1),
            Err(MemoryError::BadSize(_))
        ));
        let m = create(4 << 20).unwrap();
        assert_eq!(m.iter().map(|r| r.len()).sum::<u64>(), 4 << 20);
    }
}
