//! Geometry of an open image: cluster, L2 and refcount-block arithmetic.
//!
//! Every conversion between guest offsets, host offsets and table indices goes through
//! [`Layout`], so that `cluster_bits`, extended L2 and the refcount width are handled in one
//! place.

/// Smallest cluster size QEMU allows (`2^9`).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size QEMU allows (`2^21`, 2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limit on an L1 table: 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table: 8 MiB.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's limit on the number of snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// QEMU's limit on the size of the snapshot table: 64 MiB.
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
/// QEMU's limit on a snapshot's extra data.
pub const MAX_SNAPSHOT_EXTRA: u32 = 1024;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// Sizes derived from the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Extended L2 entries (128-bit, with a subcluster bitmap).
    pub extended_l2: bool,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
}

impl Layout {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes per L2 entry (8 or 16).
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// log2 of the number of entries per L2 table.
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2 { 4 } else { 3 }
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits()
    }

    /// Guest bytes mapped by one L1 entry.
    pub fn bytes_per_l1_entry(&self) -> u64 {
        1 << (self.cluster_bits + self.l2_bits())
    }

    /// Bytes per subcluster (the cluster size without extended L2).
    pub fn subcluster_size(&self) -> u64 {
        if self.extended_l2 {
            self.cluster_size() / u64::from(SUBCLUSTERS)
        } else {
            self.cluster_size()
        }
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Largest refcount the width can hold.
    pub fn max_refcount(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << self.refcount_bits()) - 1
        }
    }

    /// log2 of refcount entries per refcount block.
    pub fn refblock_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.refcount_order
    }

    /// Refcount entries per refcount block.
    pub fn refblock_entries(&self) -> u64 {
        1 << self.refblock_bits()
    }

    /// L1 entries needed for a disk of `size` bytes (QEMU's `size_to_l1`).
    pub fn size_to_l1(&self, size: u64) -> u64 {
        size.div_ceil(self.bytes_per_l1_entry())
    }

    /// L1 index of the VM state area (QEMU's `l1_vm_state_index`).
    pub fn l1_vm_state_index(&self, size: u64) -> u64 {
        self.size_to_l1(size)
    }

    /// Guest offset of the VM state area (QEMU's `qcow2_vm_state_offset`).
    pub fn vm_state_offset(&self, size: u64) -> u64 {
        self.l1_vm_state_index(size) << (self.cluster_bits + self.l2_bits())
    }

    /// L1 index of a guest offset.
    pub fn l1_index(&self, guest: u64) -> u64 {
        guest >> (self.cluster_bits + self.l2_bits())
    }

    /// L2 index of a guest offset.
    pub fn l2_index(&self, guest: u64) -> u64 {
        (guest >> self.cluster_bits) & (self.l2_entries() - 1)
    }

    /// Offset inside the cluster.
    pub fn offset_in_cluster(&self, off: u64) -> u64 {
        off & (self.cluster_size() - 1)
    }

    /// Start of the cluster containing `off`.
    pub fn cluster_start(&self, off: u64) -> u64 {
        off & !(self.cluster_size() - 1)
    }

    /// Cluster index of a host offset.
    pub fn cluster_index(&self, host: u64) -> u64 {
        host >> self.cluster_bits
    }

    /// Number of clusters covering `bytes`.
    pub fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }

    /// Whether a host offset is cluster aligned.
    pub fn is_aligned(&self, off: u64) -> bool {
        self.offset_in_cluster(off) == 0
    }

    /// Bits of a compressed-cluster descriptor used by the host offset (QEMU `csize_shift`).
    pub fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_state_offset_matches_fixture() {
        // snap-basic.qcow2: 64 MiB, 64 KiB clusters → l1_vm_state_index 1, offset 0x20000000.
        let l = Layout {
            cluster_bits: 16,
            extended_l2: false,
            refcount_order: 4,
        };
        assert_eq!(l.l1_vm_state_index(64 << 20), 1);
        assert_eq!(l.vm_state_offset(64 << 20), 0x2000_0000);
        // cluster-512.qcow2: 16 MiB → l1_size 512, vmstate at 0x1000000.
        let s = Layout {
            cluster_bits: 9,
            ..l
        };
        assert_eq!(s.size_to_l1(16 << 20), 512);
        assert_eq!(s.vm_state_offset(16 << 20), 0x100_0000);
        assert_eq!(s.refblock_entries(), 256);
        let e = Layout {
            extended_l2: true,
            ..l
        };
        assert_eq!(e.l2_bits(), 12);
        assert_eq!(e.subcluster_size(), 2048);
    }

    #[test]
    fn refcount_widths() {
        for order in 0..=6 {
            let l = Layout {
                cluster_bits: 16,
                extended_l2: false,
                refcount_order: order,
            };
            assert_eq!(
                l.refblock_entries() * u64::from(l.refcount_bits()),
                65536 * 8
            );
        }
    }
}
