//! Guest RAM: one anonymous mmap, optionally filled from a file first (`vmsnap run
//! --mem-path`), mapped into the guest as QEMU's pc machine maps its one `pc.ram` block:
//! all of it from GPA 0 (KVM slot 0) when it fits below the 32-bit PCI hole, else the first
//! 3 GiB from GPA 0 and the rest from 4 GiB up (slot 1). The RAM offsets the migration
//! stream uses are offsets into the one mapping, whatever the GPA.
//!
//! ```text
//!  host mapping:  [0 ............ below)[below ............ size)
//!  guest (GPA):   [0 ............ below)  hole  [4G ... 4G + size - below)
//! ```

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

/// Smallest guest RAM accepted.
pub const MIN_MEM_SIZE: u64 = 2 << 20;
/// Largest guest RAM accepted: 64 GiB (the built-in guests map and use only the first GiB;
/// the rest is plain memory, allocated by the host when first touched, that savevm/loadvm
/// move like any other).
pub const MAX_MEM_SIZE: u64 = 64 << 30;
/// QEMU's default `max-ram-below-4g`: RAM smaller than this lies wholly below 4 GiB.
pub const MAX_RAM_BELOW_4G: u64 = 0xe000_0000;
/// Where RAM below 4 GiB ends when it does not fit (pc-i440fx's `gigabyte_align`).
pub const LOWMEM_SPLIT: u64 = 0xc000_0000;
/// GPA of the RAM above the 32-bit hole.
pub const HIGH_RAM_START: u64 = 1 << 32;

/// QEMU's pc machine RAM split (hw/i386/pc_piix.c `pc_init1`, pc-i440fx with
/// `gigabyte_align`): RAM of at least [`MAX_RAM_BELOW_4G`] gets [`LOWMEM_SPLIT`] bytes below
/// 4 GiB and the rest above; smaller RAM lies wholly below. Returns (below, above).
pub fn split(size: u64) -> (u64, u64) {
    if size >= MAX_RAM_BELOW_4G {
        (LOWMEM_SPLIT, size - LOWMEM_SPLIT)
    } else {
        (size, 0)
    }
}

/// The RAM offset (into the one mapping, as the stream counts) of guest-physical `gpa` in a
/// guest with `size` bytes of RAM, or `None` in the hole or beyond RAM.
pub fn ram_offset(gpa: u64, size: u64) -> Option<u64> {
    let (below, above) = split(size);
    if gpa < below {
        Some(gpa)
    } else if gpa >= HIGH_RAM_START && gpa - HIGH_RAM_START < above {
        Some(gpa - HIGH_RAM_START + below)
    } else {
        None
    }
}

/// An anonymous mapping that two guest regions share and that vm-memory does not own:
/// unmapped on drop.
#[derive(Debug)]
pub struct RamMapping {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory; the pointer is only used to unmap it on drop.
unsafe impl Send for RamMapping {}
// SAFETY: as above; `RamMapping` offers no access to the memory.
unsafe impl Sync for RamMapping {}

impl Drop for RamMapping {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are the mapping made in `create_split`, unmapped only here;
        // its owner (the VM) drops it after the guest memory regions that point into it.
        unsafe {
            libc::munmap(self.addr.cast(), self.len);
        }
    }
}

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Size outside the accepted range or not page aligned.
    #[error(
        "guest memory size {0:#x} must be page aligned and within \
         [{MIN_MEM_SIZE:#x}, {MAX_MEM_SIZE:#x}]"
    )]
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
    /// `KVM_GET_DIRTY_LOG` failed (dirty logging not enabled, or not supported).
    #[error("KVM_GET_DIRTY_LOG slot {slot}: {source}")]
    DirtyLog {
        /// Slot number.
        slot: u32,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The RAM file could not be opened or read.
    #[error("guest RAM file '{path}': {source}")]
    RamFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The RAM file's size differs from the guest RAM size.
    #[error("guest RAM file '{path}' has {len:#x} bytes, guest RAM has {want:#x}")]
    RamFileSize {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
        /// Guest RAM size.
        want: u64,
    },
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

/// Allocates guest RAM of `size` bytes, laid out as [`split`] says. With RAM above 4 GiB the
/// returned [`RamMapping`] owns the memory and must outlive the regions.
pub fn create_ram(size: u64) -> Result<(GuestMemoryMmap, Option<RamMapping>), MemoryError> {
    if !(MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&size) || size % 4096 != 0 {
        return Err(MemoryError::BadSize(size));
    }
    match split(size) {
        (_, 0) => Ok((create(size)?, None)),
        (below, above) => create_split(size, below, above).map(|(m, o)| (m, Some(o))),
    }
}

/// One anonymous mapping of `size` bytes seen as two guest regions: `below` bytes at GPA 0,
/// `above` bytes at [`HIGH_RAM_START`].
fn create_split(
    size: u64,
    below: u64,
    above: u64,
) -> Result<(GuestMemoryMmap, RamMapping), MemoryError> {
    let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: a fresh anonymous mapping at an address the kernel picks; checked below.
    let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, -1, 0) };
    if addr == libc::MAP_FAILED {
        return Err(MemoryError::Allocate {
            size,
            source: vm_memory::mmap::Error::MmapRegion(vm_memory::mmap::MmapRegionError::Mmap(
                std::io::Error::last_os_error(),
            )),
        });
    }
    let owner = RamMapping {
        addr: addr.cast(),
        len,
    };
    // SAFETY: as in `create`: advice only, on the live mapping just made.
    unsafe {
        libc::madvise(addr, len, libc::MADV_HUGEPAGE);
    }
    let alloc = |source| MemoryError::Allocate { size, source };
    let region = |offset: u64, n: u64, gpa: u64| {
        // SAFETY: `[addr + offset, addr + offset + n)` lies inside the mapping `owner` keeps
        // alive (the VM holds it past its guest memory); the two regions do not overlap.
        let r = unsafe {
            vm_memory::MmapRegion::build_raw(
                owner.addr.add(offset as usize),
                n as usize,
                prot,
                flags,
            )
        }
        .map_err(|e| alloc(vm_memory::mmap::Error::MmapRegion(e)))?;
        vm_memory::GuestRegionMmap::new(r, GuestAddress(gpa)).map_err(alloc)
    };
    let low = region(0, below, 0)?;
    let high = region(below, above, HIGH_RAM_START)?;
    let mem = GuestMemoryMmap::from_regions(vec![low, high]).map_err(alloc)?;
    Ok((mem, owner))
}

/// Allocates guest RAM of `size` bytes as one region at GPA 0 (RAM below the PCI hole).
pub fn create(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if !(MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&size) || size % 4096 != 0 || split(size).1 != 0 {
        return Err(MemoryError::BadSize(size));
    }
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
        .map_err(|source| MemoryError::Allocate { size, source })?;
    for region in mem.iter() {
        if let Ok(host) = mem.get_host_address(region.start_addr()) {
            // SAFETY: `host` and `region.len()` describe a live anonymous mapping owned by
            // `mem`; MADV_HUGEPAGE only changes how the kernel backs it (transparent huge
            // pages, as QEMU asks for its RAM), never its contents. A failure (THP disabled)
            // changes nothing and is ignored.
            unsafe {
                libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE);
            }
        }
    }
    Ok(mem)
}

/// Chunk of the RAM file reads.
const FILL_CHUNK: usize = 8 << 20;

/// Copies the file at `path`, which must be exactly as large as guest RAM, into `mem`: the
/// equivalent of QEMU's `memory-backend-file,share=off` (a private copy: guest writes never
/// reach the file). Read in rather than mapped, so the pages are resident before the guest
/// runs.
pub fn fill_from_file(mem: &GuestMemoryMmap, path: &Path) -> Result<(), MemoryError> {
    let io = |source| MemoryError::RamFile {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let want: u64 = mem.iter().map(|r| r.len()).sum();
    if len != want {
        return Err(MemoryError::RamFileSize {
            path: path.to_path_buf(),
            len,
            want,
        });
    }
    let mut file_off = 0u64;
    for region in mem.iter() {
        let gpa = region.start_addr().0;
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| MemoryError::HostAddress(gpa))?;
        // SAFETY: `host` is the start of the region's live mapping of `region.len()` bytes,
        // owned by `mem` for the whole call. The VM has not started (no vCPU runs yet) and
        // no device holds the memory, so nothing else accesses it while this slice exists;
        // any byte value is valid for plain memory.
        let dst = unsafe { std::slice::from_raw_parts_mut(host, region.len() as usize) };
        for chunk in dst.chunks_mut(FILL_CHUNK) {
            file.read_exact_at(chunk, file_off).map_err(io)?;
            file_off += chunk.len() as u64;
        }
    }
    Ok(())
}

/// Registers every region of `mem` with KVM, slot numbers from 0. With `log_dirty`, KVM
/// tracks the pages the vCPUs write (`KVM_MEM_LOG_DIRTY_PAGES`); registering again with the
/// same slots switches tracking on or off without touching the memory.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap, log_dirty: bool) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let gpa = region.start_addr().0;
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| MemoryError::HostAddress(gpa))?;
        let slot = slot as u32;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
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

/// Fetches and clears KVM's dirty bitmap of every slot: one `u64` word per 64 pages, slot after
/// slot, bit `i` of word `w` set if page `64 * w + i` of that slot was written by a vCPU since
/// the last call. Writes the VMM makes itself (device DMA) are not in it.
pub fn dirty_bitmap(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<u64>, MemoryError> {
    let mut out = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let bitmap = vm
            .get_dirty_log(slot, region.len() as usize)
            .map_err(|source| MemoryError::DirtyLog { slot, source })?;
        out.extend_from_slice(&bitmap);
    }
    Ok(out)
}

/// Guest pages written by the VMM itself (device DMA), which KVM's dirty log cannot see.
/// Same layout as [`dirty_bitmap`] (bits per page of the RAM mapping); only recorded while
/// enabled.
#[derive(Debug)]
pub struct DmaDirtyLog {
    enabled: AtomicBool,
    words: Vec<AtomicU64>,
    mem_size: u64,
}

impl DmaDirtyLog {
    /// A log for `mem_size` bytes of guest RAM, disabled.
    pub fn new(mem_size: u64) -> Self {
        let pages = mem_size.div_ceil(PAGE_SIZE);
        DmaDirtyLog {
            enabled: AtomicBool::new(false),
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            mem_size,
        }
    }

    /// Starts or stops recording (stopping also forgets what was recorded).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::SeqCst);
        if !on {
            self.take();
        }
    }

    /// Records that `[gpa, gpa + len)` was written.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 || !self.enabled.load(Ordering::SeqCst) {
            return;
        }
        let first = gpa / PAGE_SIZE;
        let last = gpa.saturating_add(len - 1) / PAGE_SIZE;
        for gpage in first..=last {
            // Bits are per page of the RAM mapping, as the stream and KVM's slots count.
            let Some(page) = ram_offset(gpage * PAGE_SIZE, self.mem_size).map(|o| o / PAGE_SIZE)
            else {
                continue;
            };
            if let Some(w) = self.words.get((page / 64) as usize) {
                w.fetch_or(1 << (page % 64), Ordering::SeqCst);
            }
        }
    }

    /// Returns and clears the recorded pages.
    pub fn take(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.swap(0, Ordering::SeqCst))
            .collect()
    }
}

const PAGE_SIZE: u64 = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dma_log_records_only_while_enabled() {
        let log = DmaDirtyLog::new(1 << 20);
        log.mark(0x1000, 1);
        assert!(log.take().iter().all(|&w| w == 0));
        log.set_enabled(true);
        log.mark(0x1fff, 2); // pages 1 and 2
        log.mark(64 * 4096, 4096); // page 64, second word
        log.mark(u64::MAX - 10, 5); // beyond RAM: ignored, no overflow
        let words = log.take();
        assert_eq!(words[0], 0b110);
        assert_eq!(words[1], 1);
        assert!(log.take().iter().all(|&w| w == 0), "take clears");
    }

    #[test]
    fn ram_is_filled_from_a_file_of_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let m = create(4 << 20).unwrap();
        fill_from_file(&m, &path).unwrap();
        let mut back = vec![0u8; 4 << 20];
        vm_memory::Bytes::read_slice(&m, &mut back, GuestAddress(0)).unwrap();
        assert!(back == data);
        let small = create(2 << 20).unwrap();
        let err = fill_from_file(&small, &path).unwrap_err();
        assert!(
            matches!(err, MemoryError::RamFileSize { len, want, .. } if len == 4 << 20 && want == 2 << 20),
            "{err}"
        );
        assert!(err.to_string().contains("0x400000"), "{err}");
        let err = fill_from_file(&m, &dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn ram_is_split_around_the_pci_hole_as_qemu_pc() {
        // hw/i386/pc_piix.c: below 3.5 GiB all low; from 3.5 GiB on, 3 GiB low.
        assert_eq!(split(2 << 30), (2 << 30, 0));
        assert_eq!(split(0xdfff_f000), (0xdfff_f000, 0));
        assert_eq!(split(0xe000_0000), (0xc000_0000, 0x2000_0000));
        assert_eq!(split(5 << 30), (3 << 30, 2 << 30));
        assert_eq!(ram_offset(0x1000, 5 << 30), Some(0x1000));
        assert_eq!(ram_offset(3 << 30, 5 << 30), None);
        assert_eq!(
            ram_offset((4 << 30) + 0x1000, 5 << 30),
            Some((3 << 30) + 0x1000)
        );
        assert_eq!(ram_offset(6 << 30, 5 << 30), None);
        let (mem, owner) = create_ram(5 << 30).unwrap();
        assert!(owner.is_some());
        let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(regions, [(0, 3 << 30), (4 << 30, 2 << 30)]);
        // One mapping: the high region starts where the low one ends.
        let lo = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        let hi = mem.get_host_address(GuestAddress(4 << 30)).unwrap() as usize;
        assert_eq!(hi - lo, 3 << 30);
        // DMA to high RAM is logged at its RAM offset.
        let log = DmaDirtyLog::new(5 << 30);
        log.set_enabled(true);
        log.mark((4 << 30) + 64 * 4096, 1);
        let words = log.take();
        assert_eq!(words[((3u64 << 30) / 4096 / 64 + 1) as usize], 1);
        assert!(matches!(create(5 << 30), Err(MemoryError::BadSize(_))));
    }

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
