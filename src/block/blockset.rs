//! QEMU's `bdrv_all_*` semantics over the disks of one VM.
//!
//! A VM's disks take snapshots together: `savevm TAG` puts a snapshot called TAG on every
//! included disk, the VM state goes to exactly one of them, and `loadvm TAG` needs TAG on all.
//!
//! ```text
//!   BlockSet ── devices (creation order) ── Device { name, driver }
//!      │
//!      ├─ included(): every writable device, or the explicit list (QMP `devices`)
//!      ├─ can_snapshot / has_snapshot / find_missing        (bdrv_all_can_snapshot, …)
//!      ├─ create (all or nothing: roll back on failure)     (bdrv_all_create_snapshot)
//!      ├─ goto / delete                                     (bdrv_all_goto/delete_snapshot)
//!      └─ vmstate_device(name)                              (bdrv_all_find_vmstate_bs)
//! ```

use super::{BlockDriver, SnapshotInfo, SnapshotParams};

/// One disk of a VM.
#[derive(Debug)]
pub struct Device {
    /// Device name (QEMU: the drive id, e.g. `drive0`).
    pub name: String,
    /// The open image.
    pub driver: Box<dyn BlockDriver>,
}

impl Device {
    /// Whether this device takes part in snapshots when no explicit list is given
    /// (QEMU: inserted and not read-only).
    fn writable(&self) -> bool {
        !self.driver.is_read_only()
    }

    /// Whether this device can hold a snapshot (QEMU `bdrv_can_snapshot`): writable and a
    /// format with internal snapshots.
    fn can_snapshot(&mut self) -> bool {
        self.writable() && self.driver.snapshots().is_some()
    }

    /// Whether the device has a snapshot with this id or name.
    fn has_snapshot(&mut self, tag: &str) -> bool {
        match self.driver.snapshots() {
            Some(store) => find_snapshot(&store.snapshot_list(), tag).is_some(),
            None => false,
        }
    }
}

/// Finds a snapshot by id first, then by name (QEMU `bdrv_snapshot_find`).
pub fn find_snapshot<'a>(list: &'a [SnapshotInfo], tag: &str) -> Option<&'a SnapshotInfo> {
    list.iter()
        .find(|s| s.id == tag)
        .or_else(|| list.iter().find(|s| s.name == tag))
}

/// The disks of one VM, in creation order.
#[derive(Debug, Default)]
pub struct BlockSet {
    /// The devices, in creation order (QEMU: `-drive` order).
    pub devices: Vec<Device>,
}

/// The devices of a [`BlockSet`] that an operation includes: every writable device
/// ([`BlockSet::all`]), or an explicit list ([`BlockSet::select`], QMP's `devices`).
#[derive(Debug)]
pub struct Selection<'a> {
    devices: &'a mut Vec<Device>,
    /// Explicit list of included device names; `None` means every writable device.
    include: Option<Vec<String>>,
}

/// Errors of all-devices operations.
#[derive(Debug, thiserror::Error)]
pub enum BlockSetError {
    /// A writable device cannot take snapshots (QEMU's exact message).
    #[error("Device '{0}' is writable but does not support snapshots")]
    NotSnapshotCapable(String),
    /// A device name given by the caller does not exist.
    #[error("Cannot find device '{0}'")]
    NoSuchDevice(String),
    /// A device was added twice under the same name.
    #[error("Duplicate device name '{0}'")]
    DuplicateDevice(String),
    /// The named vmstate device cannot hold VM state.
    #[error("Device '{0}' does not support VM state snapshots")]
    NoVmStateSupport(String),
    /// No included device can hold the VM state.
    #[error("No block device can accept snapshots")]
    NoCapableDevice,
    /// An included device lacks the snapshot.
    #[error("Device '{device}' does not have the requested snapshot '{tag}'")]
    SnapshotMissing {
        /// The first device without it.
        device: String,
        /// The tag looked for.
        tag: String,
    },
    /// Creating the snapshot failed on a device (the others were rolled back).
    #[error("Error while creating snapshot on '{device}'")]
    Create {
        /// The device that failed.
        device: String,
        /// The cause.
        #[source]
        source: super::Error,
    },
    /// Reverting to the snapshot failed on a device.
    #[error("Could not load snapshot '{tag}' on '{device}'")]
    Goto {
        /// The device that failed.
        device: String,
        /// The tag.
        tag: String,
        /// The cause.
        #[source]
        source: super::Error,
    },
    /// Deleting the snapshot failed on a device.
    #[error("Could not delete snapshot '{tag}' on '{device}'")]
    Delete {
        /// The device that failed.
        device: String,
        /// The tag.
        tag: String,
        /// The cause.
        #[source]
        source: super::Error,
    },
}

/// Result type of [`BlockSet`] operations.
pub type Result<T> = std::result::Result<T, BlockSetError>;

impl BlockSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a device at the end (creation order matters for the vmstate device).
    ///
    /// # Errors
    /// [`BlockSetError::DuplicateDevice`] if the name is taken.
    pub fn add(&mut self, name: impl Into<String>, driver: Box<dyn BlockDriver>) -> Result<()> {
        let name = name.into();
        if self.devices.iter().any(|d| d.name == name) {
            return Err(BlockSetError::DuplicateDevice(name));
        }
        self.devices.push(Device { name, driver });
        Ok(())
    }

    /// The writable devices, which snapshot operations include by default.
    pub fn all(&mut self) -> Selection<'_> {
        Selection {
            devices: &mut self.devices,
            include: None,
        }
    }

    /// Only the named devices (QMP `snapshot-save devices`), read-only ones included.
    ///
    /// # Errors
    /// [`BlockSetError::NoSuchDevice`] naming the first unknown device.
    pub fn select(&mut self, names: &[String]) -> Result<Selection<'_>> {
        if let Some(bad) = names
            .iter()
            .find(|n| !self.devices.iter().any(|d| d.name == **n))
        {
            return Err(BlockSetError::NoSuchDevice(bad.clone()));
        }
        Ok(Selection {
            devices: &mut self.devices,
            include: Some(names.to_vec()),
        })
    }

    /// Names of the devices included by default (the writable ones), in creation order.
    pub fn included(&self) -> Vec<&str> {
        self.devices
            .iter()
            .filter(|d| d.writable())
            .map(|d| d.name.as_str())
            .collect()
    }

    /// [`Selection::can_snapshot`] over the writable devices.
    ///
    /// # Errors
    /// See [`Selection::can_snapshot`].
    pub fn can_snapshot(&mut self) -> Result<()> {
        self.all().can_snapshot()
    }

    /// [`Selection::find_missing`] over the writable devices.
    pub fn find_missing(&mut self, tag: &str) -> Option<String> {
        self.all().find_missing(tag).map(str::to_owned)
    }

    /// [`Selection::has_snapshot`] over the writable devices.
    pub fn has_snapshot(&mut self, tag: &str) -> bool {
        self.all().has_snapshot(tag)
    }

    /// [`Selection::vmstate_device`] over the writable devices.
    ///
    /// # Errors
    /// See [`Selection::vmstate_device`].
    pub fn vmstate_device(&mut self, name: Option<&str>) -> Result<&mut Device> {
        self.all().vmstate_device(name)
    }

    /// [`Selection::create`] over the writable devices.
    ///
    /// # Errors
    /// See [`Selection::create`].
    pub fn create(
        &mut self,
        params: &SnapshotParams,
        vmstate_device: &str,
    ) -> Result<Vec<SnapshotInfo>> {
        self.all().create(params, vmstate_device)
    }

    /// [`Selection::goto`] over the writable devices.
    ///
    /// # Errors
    /// See [`Selection::goto`].
    pub fn goto(&mut self, tag: &str) -> Result<()> {
        self.all().goto(tag)
    }

    /// [`Selection::delete`] over the writable devices.
    ///
    /// # Errors
    /// See [`Selection::delete`].
    pub fn delete(&mut self, tag: &str) -> Result<usize> {
        self.all().delete(tag)
    }

    /// Looks a device up by name.
    pub fn device_mut(&mut self, name: &str) -> Option<&mut Device> {
        self.devices.iter_mut().find(|d| d.name == name)
    }

    /// Flushes every device (included or not), stopping at the first error.
    ///
    /// # Errors
    /// The first driver error.
    pub fn flush(&mut self) -> super::Result<()> {
        for dev in &mut self.devices {
            dev.driver.flush()?;
        }
        Ok(())
    }
}

impl<'a> Selection<'a> {
    fn index_of(&self, name: &str) -> Option<usize> {
        self.devices.iter().position(|d| d.name == name)
    }

    /// Indices of the included devices, in creation order.
    fn included_indices(&self) -> Vec<usize> {
        self.devices
            .iter()
            .enumerate()
            .filter(|(_, d)| match &self.include {
                Some(list) => list.contains(&d.name),
                None => d.writable(),
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Names of the included devices, in creation order.
    pub fn included(&self) -> Vec<&str> {
        self.included_indices()
            .into_iter()
            .map(|i| self.devices[i].name.as_str())
            .collect()
    }

    /// Checks that every included device can take snapshots (QEMU `bdrv_all_can_snapshot`).
    ///
    /// # Errors
    /// [`BlockSetError::NotSnapshotCapable`] naming the first device that cannot.
    pub fn can_snapshot(&mut self) -> Result<()> {
        for i in self.included_indices() {
            let dev = &mut self.devices[i];
            if !dev.can_snapshot() {
                return Err(BlockSetError::NotSnapshotCapable(dev.name.clone()));
            }
        }
        Ok(())
    }

    /// The first included device that lacks `tag` (by id or name), if any.
    pub fn find_missing(&mut self, tag: &str) -> Option<&str> {
        let missing = self
            .included_indices()
            .into_iter()
            .find(|&i| !self.devices[i].has_snapshot(tag))?;
        Some(self.devices[missing].name.as_str())
    }

    /// True only if every included device has `tag` (QEMU `bdrv_all_has_snapshot`).
    /// An empty set has no snapshots.
    pub fn has_snapshot(&mut self, tag: &str) -> bool {
        !self.included_indices().is_empty() && self.find_missing(tag).is_none()
    }

    /// The device that gets the VM state: the named one, or the first snapshot-capable
    /// included device in creation order (QEMU `bdrv_all_find_vmstate_bs`).
    ///
    /// # Errors
    /// [`BlockSetError::NoSuchDevice`], [`BlockSetError::NoVmStateSupport`] for a named device
    /// that cannot hold it, [`BlockSetError::NoCapableDevice`] when none can.
    pub fn vmstate_device(self, name: Option<&str>) -> Result<&'a mut Device> {
        let idx = match name {
            Some(n) => {
                let i = self
                    .index_of(n)
                    .ok_or_else(|| BlockSetError::NoSuchDevice(n.to_owned()))?;
                if !self.devices[i].can_snapshot() {
                    return Err(BlockSetError::NoVmStateSupport(n.to_owned()));
                }
                i
            }
            None => self
                .included_indices()
                .into_iter()
                .find(|&i| self.devices[i].can_snapshot())
                .ok_or(BlockSetError::NoCapableDevice)?,
        };
        Ok(&mut self.devices[idx])
    }

    /// Creates the snapshot on every included device: the vmstate device gets
    /// `params.vm_state_size`, the others 0. All or nothing: when one device fails, the
    /// snapshot is deleted again from the devices already done.
    ///
    /// Returns the new entries in device order.
    ///
    /// # Errors
    /// [`BlockSetError::NotSnapshotCapable`] before anything is written,
    /// [`BlockSetError::NoSuchDevice`] for an unknown vmstate device, or
    /// [`BlockSetError::Create`] naming the first device that failed.
    pub fn create(
        &mut self,
        params: &SnapshotParams,
        vmstate_device: &str,
    ) -> Result<Vec<SnapshotInfo>> {
        self.can_snapshot()?;
        if self.index_of(vmstate_device).is_none() {
            return Err(BlockSetError::NoSuchDevice(vmstate_device.to_owned()));
        }
        let mut done: Vec<(usize, String)> = Vec::new();
        let mut created = Vec::new();
        for i in self.included_indices() {
            let dev = &mut self.devices[i];
            let mut p = params.clone();
            if dev.name != vmstate_device {
                p.vm_state_size = 0;
            }
            let result = match dev.driver.snapshots() {
                Some(store) => store.snapshot_create(&p),
                None => return Err(BlockSetError::NotSnapshotCapable(dev.name.clone())),
            };
            match result {
                Ok(info) => {
                    done.push((i, info.id.clone()));
                    created.push(info);
                }
                Err(source) => {
                    let device = dev.name.clone();
                    self.roll_back(&done);
                    return Err(BlockSetError::Create { device, source });
                }
            }
        }
        Ok(created)
    }

    /// Deletes the snapshots just created (by id) after a failed [`BlockSet::create`].
    /// Failures here are ignored: the first error is the one reported, as QEMU does.
    fn roll_back(&mut self, done: &[(usize, String)]) {
        for (i, id) in done.iter().rev() {
            if let Some(store) = self.devices[*i].driver.snapshots() {
                let _ = store.snapshot_delete(id);
            }
        }
    }

    /// Reverts every included device to `tag`, stopping at the first error.
    ///
    /// # Errors
    /// [`BlockSetError::Goto`] naming the device that failed.
    pub fn goto(&mut self, tag: &str) -> Result<()> {
        for i in self.included_indices() {
            let dev = &mut self.devices[i];
            let result = match dev.driver.snapshots() {
                Some(store) => store.snapshot_goto(tag),
                None => Err(super::Error::SnapshotsNotSupported {
                    format: dev.driver.format().name(),
                }),
            };
            result.map_err(|source| BlockSetError::Goto {
                device: dev.name.clone(),
                tag: tag.to_owned(),
                source,
            })?;
        }
        Ok(())
    }

    /// Deletes `tag` from every included device that has it (QEMU skips devices without
    /// it), stopping at the first error. Returns how many devices had it.
    ///
    /// # Errors
    /// [`BlockSetError::Delete`] naming the device that failed.
    pub fn delete(&mut self, tag: &str) -> Result<usize> {
        let mut count = 0;
        for i in self.included_indices() {
            let dev = &mut self.devices[i];
            if !dev.has_snapshot(tag) {
                continue;
            }
            if let Some(store) = dev.driver.snapshots() {
                store
                    .snapshot_delete(tag)
                    .map_err(|source| BlockSetError::Delete {
                        device: dev.name.clone(),
                        tag: tag.to_owned(),
                        source,
                    })?;
                count += 1;
            }
        }
        Ok(count)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::block::raw::Raw;
    use crate::block::{Error, Format, MemStorage, SnapshotStore};

    /// An in-memory driver with a snapshot list and a switch to make `snapshot_create` or
    /// `snapshot_goto` fail, for the rollback paths.
    #[derive(Debug, Default)]
    pub(crate) struct MockSnap {
        pub(crate) list: Vec<SnapshotInfo>,
        pub(crate) fail_create: bool,
        pub(crate) fail_goto: bool,
        pub(crate) read_only: bool,
        pub(crate) gotos: Vec<String>,
    }

    impl BlockDriver for MockSnap {
        fn format(&self) -> Format {
            Format::Qcow2
        }
        fn size(&self) -> u64 {
            0
        }
        fn is_read_only(&self) -> bool {
            self.read_only
        }
        fn read_at(&mut self, _offset: u64, _buf: &mut [u8]) -> crate::block::Result<()> {
            Ok(())
        }
        fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> crate::block::Result<()> {
            Ok(())
        }
        fn write_zeroes(&mut self, _offset: u64, _len: u64) -> crate::block::Result<()> {
            Ok(())
        }
        fn discard(&mut self, _offset: u64, _len: u64) -> crate::block::Result<()> {
            Ok(())
        }
        fn flush(&mut self) -> crate::block::Result<()> {
            Ok(())
        }
        fn snapshots(&mut self) -> Option<&mut dyn SnapshotStore> {
            Some(self)
        }
    }

    impl SnapshotStore for MockSnap {
        fn snapshot_list(&self) -> Vec<SnapshotInfo> {
            self.list.clone()
        }
        fn snapshot_create(&mut self, p: &SnapshotParams) -> crate::block::Result<SnapshotInfo> {
            if self.fail_create {
                return Err(Error::Format("injected create failure".into()));
            }
            let next = self
                .list
                .iter()
                .filter_map(|s| s.id.parse::<u64>().ok())
                .max()
                .unwrap_or(0)
                + 1;
            let info = SnapshotInfo {
                id: next.to_string(),
                name: p.name.clone(),
                vm_state_size: p.vm_state_size,
                date_sec: p.date_sec,
                date_nsec: p.date_nsec,
                vm_clock_nsec: p.vm_clock_nsec,
                disk_size: Some(0),
                icount: p.icount,
            };
            self.list.push(info.clone());
            Ok(info)
        }
        fn snapshot_goto(&mut self, tag: &str) -> crate::block::Result<()> {
            if self.fail_goto {
                return Err(Error::Format("injected goto failure".into()));
            }
            find_snapshot(&self.list, tag).ok_or(Error::SnapshotNotFound(tag.into()))?;
            self.gotos.push(tag.to_owned());
            Ok(())
        }
        fn snapshot_delete(&mut self, tag: &str) -> crate::block::Result<()> {
            let id = find_snapshot(&self.list, tag)
                .ok_or(Error::SnapshotNotFound(tag.into()))?
                .id
                .clone();
            self.list.retain(|s| s.id != id);
            Ok(())
        }
        fn vmstate_write(&mut self, _pos: u64, _buf: &[u8]) -> crate::block::Result<()> {
            Ok(())
        }
        fn vmstate_read(&mut self, _pos: u64, _buf: &mut [u8]) -> crate::block::Result<()> {
            Ok(())
        }
        fn snapshot_vmstate_read(
            &mut self,
            _id: &str,
            _pos: u64,
            _buf: &mut [u8],
        ) -> crate::block::Result<()> {
            Ok(())
        }
        fn snapshot_extra_tail(&self, _id: &str) -> crate::block::Result<Vec<u8>> {
            Ok(Vec::new())
        }
    }

    fn raw(read_only: bool) -> Box<dyn BlockDriver> {
        let mem = MemStorage::from_vec(vec![0; 4096]);
        Box::new(Raw::from_storage(Box::new(mem), read_only).unwrap())
    }

    fn params(name: &str, vm_state_size: u64) -> SnapshotParams {
        SnapshotParams {
            name: name.into(),
            vm_state_size,
            date_sec: 1_700_000_000,
            icount: None,
            ..Default::default()
        }
    }

    fn list_of(set: &mut BlockSet, name: &str) -> Vec<SnapshotInfo> {
        set.device_mut(name)
            .unwrap()
            .driver
            .snapshots()
            .unwrap()
            .snapshot_list()
    }

    #[test]
    fn writable_raw_device_blocks_snapshots() {
        let mut set = BlockSet::new();
        set.add("drive0", Box::new(MockSnap::default())).unwrap();
        set.add("drive1", raw(false)).unwrap();
        let err = set.can_snapshot().unwrap_err();
        assert_eq!(
            err.to_string(),
            "Device 'drive1' is writable but does not support snapshots"
        );
        assert!(matches!(
            set.create(&params("s1", 10), "drive0"),
            Err(BlockSetError::NotSnapshotCapable(ref d)) if d == "drive1"
        ));
        assert!(list_of(&mut set, "drive0").is_empty());
    }

    #[test]
    fn read_only_raw_device_is_skipped() {
        let mut set = BlockSet::new();
        set.add("drive0", Box::new(MockSnap::default())).unwrap();
        set.add("drive1", raw(true)).unwrap();
        assert_eq!(set.included(), vec!["drive0"]);
        set.can_snapshot().unwrap();
        let created = set.create(&params("s1", 100), "drive0").unwrap();
        assert_eq!(created.len(), 1);
        assert_eq!(created[0].vm_state_size, 100);
        assert!(set.has_snapshot("s1"));
    }

    #[test]
    fn vmstate_goes_to_one_device_only() {
        let mut set = BlockSet::new();
        set.add("drive0", Box::new(MockSnap::default())).unwrap();
        set.add("drive1", Box::new(MockSnap::default())).unwrap();
        let vm = set.vmstate_device(None).unwrap().name.clone();
        assert_eq!(vm, "drive0");
        set.create(&params("s1", 4242), &vm).unwrap();
        assert_eq!(list_of(&mut set, "drive0")[0].vm_state_size, 4242);
        assert_eq!(list_of(&mut set, "drive1")[0].vm_state_size, 0);
        assert_eq!(list_of(&mut set, "drive1")[0].name, "s1");
        // A named vmstate device wins.
        set.create(&params("s2", 7), "drive1").unwrap();
        assert_eq!(list_of(&mut set, "drive0")[1].vm_state_size, 0);
        assert_eq!(list_of(&mut set, "drive1")[1].vm_state_size, 7);
    }

    #[test]
    fn vmstate_device_errors() {
        let mut set = BlockSet::new();
        set.add("ro", raw(true)).unwrap();
        set.add("rw", raw(false)).unwrap();
        assert!(matches!(
            set.vmstate_device(None),
            Err(BlockSetError::NoCapableDevice)
        ));
        assert!(matches!(
            set.vmstate_device(Some("rw")),
            Err(BlockSetError::NoVmStateSupport(ref n)) if n == "rw"
        ));
        assert!(matches!(
            set.vmstate_device(Some("nope")),
            Err(BlockSetError::NoSuchDevice(ref n)) if n == "nope"
        ));
        assert!(matches!(
            set.add("rw", raw(false)),
            Err(BlockSetError::DuplicateDevice(_))
        ));
    }

    #[test]
    fn failed_create_rolls_back_earlier_devices() {
        let mut set = BlockSet::new();
        set.add("drive0", Box::new(MockSnap::default())).unwrap();
        set.add("drive1", Box::new(MockSnap::default())).unwrap();
        let failing = MockSnap {
            fail_create: true,
            ..Default::default()
        };
        set.add("drive2", Box::new(failing)).unwrap();
        let err = set.create(&params("s1", 10), "drive0").unwrap_err();
        assert!(matches!(err, BlockSetError::Create { ref device, .. } if device == "drive2"));
        assert_eq!(err.to_string(), "Error while creating snapshot on 'drive2'");
        assert!(list_of(&mut set, "drive0").is_empty());
        assert!(list_of(&mut set, "drive1").is_empty());
        assert!(!set.has_snapshot("s1"));
    }

    #[test]
    fn rollback_keeps_older_snapshots_with_the_same_name() {
        let mut set = BlockSet::new();
        set.add("drive0", Box::new(MockSnap::default())).unwrap();
        set.create(&params("s1", 0), "drive0").unwrap();
        set.add(
            "drive1",
            Box::new(MockSnap {
                fail_create: true,
                ..Default::default()
            }),
        )
        .unwrap();
        assert!(set.create(&params("s1", 0), "drive0").is_err());
        let l = list_of(&mut set, "drive0");
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].id, "1");
    }

    #[test]
    fn has_snapshot_needs_every_device_and_finds_by_id_or_name() {
        let mut set = BlockSet::new();
        set.add("drive0", Box::new(MockSnap::default())).unwrap();
        set.add("drive1", Box::new(MockSnap::default())).unwrap();
        set.create(&params("both", 0), "drive0").unwrap();
        set.select(&["drive0".into()])
            .unwrap()
            .create(&params("only0", 0), "drive0")
            .unwrap();
        assert!(set.has_snapshot("both"));
        assert!(set.has_snapshot("1"));
        assert!(!set.has_snapshot("only0"));
        assert_eq!(set.find_missing("only0").as_deref(), Some("drive1"));
        assert_eq!(set.find_missing("both"), None);
        assert!(matches!(
            set.select(&["drive9".into()]),
            Err(BlockSetError::NoSuchDevice(ref n)) if n == "drive9"
        ));
        assert!(!BlockSet::new().has_snapshot("x"));
    }

    #[test]
    fn goto_stops_at_first_failing_device() {
        let mut set = BlockSet::new();
        set.add("drive0", Box::new(MockSnap::default())).unwrap();
        set.add("drive1", Box::new(MockSnap::default())).unwrap();
        set.create(&params("s1", 0), "drive0").unwrap();
        set.goto("s1").unwrap();
        let err = set.goto("zzz").unwrap_err();
        assert_eq!(err.to_string(), "Could not load snapshot 'zzz' on 'drive0'");
        set.add(
            "drive2",
            Box::new(MockSnap {
                fail_goto: true,
                ..Default::default()
            }),
        )
        .unwrap();
        let err = set.goto("s1").unwrap_err();
        assert!(matches!(err, BlockSetError::Goto { ref device, .. } if device == "drive2"));
    }

    #[test]
    fn delete_skips_devices_without_the_tag() {
        let mut set = BlockSet::new();
        set.add("drive0", Box::new(MockSnap::default())).unwrap();
        set.add("drive1", Box::new(MockSnap::default())).unwrap();
        set.select(&["drive1".into()])
            .unwrap()
            .create(&params("s1", 0), "drive1")
            .unwrap();
        assert_eq!(set.delete("s1").unwrap(), 1);
        assert!(list_of(&mut set, "drive1").is_empty());
        assert_eq!(set.delete("s1").unwrap(), 0);
    }

    #[test]
    fn explicit_list_includes_read_only_devices() {
        let mut set = BlockSet::new();
        set.add("drive0", Box::new(MockSnap::default())).unwrap();
        set.add("cdrom", raw(true)).unwrap();
        set.can_snapshot().unwrap();
        let mut sel = set.select(&["drive0".into(), "cdrom".into()]).unwrap();
        assert_eq!(sel.included(), vec!["drive0", "cdrom"]);
        assert!(matches!(
            sel.can_snapshot(),
            Err(BlockSetError::NotSnapshotCapable(ref n)) if n == "cdrom"
        ));
        let sel = set.select(&["drive0".into()]).unwrap();
        assert_eq!(sel.vmstate_device(None).unwrap().name, "drive0");
    }

    #[test]
    fn find_snapshot_prefers_id() {
        let mk = |id: &str, name: &str| SnapshotInfo {
            id: id.into(),
            name: name.into(),
            vm_state_size: 0,
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            disk_size: None,
            icount: None,
        };
        let list = vec![mk("1", "2"), mk("2", "a")];
        assert_eq!(find_snapshot(&list, "2").unwrap().name, "a");
        assert_eq!(find_snapshot(&list, "a").unwrap().id, "2");
        assert!(find_snapshot(&list, "3").is_none());
    }
}
