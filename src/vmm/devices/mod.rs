//! Emulated devices and the port-I/O bus that dispatches guest `in`/`out` to them.
//!
//! Every device implements [`Persist`] (Firecracker's idea: an associated `State` of plain data
//! that `save` produces and `restore` consumes). When the migration codec lands, each `State`
//! gets a VMState description and is written as a FULL section under the section name its
//! device reports through [`PortDevice::section_name`].

pub mod control;
pub mod pvblock;
pub mod serial;

use std::fmt;

pub use control::{Control, ControlState};
pub use pvblock::{PvBlock, PvBlockError, PvBlockState};
pub use serial::{Serial, SerialCapture, SerialOut, SerialState};

/// Save and restore of one device's guest-visible state.
pub trait Persist {
    /// Plain data describing the device's state.
    type State;
    /// Why a state could not be applied.
    type Error;
    /// Captures the current state.
    fn save(&self) -> Self::State;
    /// Applies a state captured by [`Persist::save`] (possibly in another process).
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error>;
}

/// A device reached through x86 port I/O.
pub trait PortDevice: Send {
    /// Section name under which the device's state is saved (QEMU's `idstr`, e.g. `serial`).
    fn section_name(&self) -> &'static str;
    /// Guest `in` at `offset` from the device's base port; fills `data`.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Guest `out` at `offset` from the device's base port.
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// COM1 base port.
pub const SERIAL_PORT: u16 = 0x3f8;
/// Base port of the first paravirtual block device; device `i` is at `PVBLOCK_PORT + 0x20 * i`.
pub const PVBLOCK_PORT: u16 = 0x500;
/// Ports per paravirtual block device.
pub const PVBLOCK_PORTS: u16 = 0x20;
/// Base port of the test-control device.
pub const CONTROL_PORT: u16 = 0x600;
/// The control device's idle port (see [`control`]).
pub const IDLE_PORT: u16 = CONTROL_PORT + control::IDLE_OFFSET;

/// Saved state of all devices of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStates {
    /// COM1.
    pub serial: SerialState,
    /// One per drive, in `--drive` order.
    pub blocks: Vec<PvBlockState>,
    /// The test-control device.
    pub control: ControlState,
}

/// Errors restoring device states.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    /// The saved state has a different number of block devices than this VM.
    #[error("saved state has {saved} block devices, this VM has {present}")]
    BlockCount {
        /// Devices in the saved state.
        saved: usize,
        /// Devices in this VM.
        present: usize,
    },
    /// A block device refused its state.
    #[error("block device {index}: {source}")]
    Block {
        /// Drive index.
        index: usize,
        /// The cause.
        #[source]
        source: PvBlockError,
    },
}

/// The port-I/O bus: all devices of a VM.
pub struct Devices {
    /// COM1.
    pub serial: Serial,
    /// One paravirtual block device per drive.
    pub blocks: Vec<PvBlock>,
    /// The test-control device.
    pub control: Control,
}

impl fmt::Debug for Devices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Devices")
            .field("blocks", &self.blocks.len())
            .finish_non_exhaustive()
    }
}

impl Devices {
    /// Finds the device at `port` and the offset inside it.
    fn route(&mut self, port: u16) -> Option<(&mut dyn PortDevice, u16)> {
        if (SERIAL_PORT..SERIAL_PORT + 8).contains(&port) {
            return Some((&mut self.serial, port - SERIAL_PORT));
        }
        if (CONTROL_PORT..CONTROL_PORT + 3).contains(&port) {
            return Some((&mut self.control, port - CONTROL_PORT));
        }
        if port >= PVBLOCK_PORT {
            let rel = port - PVBLOCK_PORT;
            let index = usize::from(rel / PVBLOCK_PORTS);
            if let Some(dev) = self.blocks.get_mut(index) {
                return Some((dev, rel % PVBLOCK_PORTS));
            }
        }
        None
    }

    /// Guest `in`: unclaimed ports read as all ones, like an empty ISA bus.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        match self.route(port) {
            Some((dev, off)) => dev.read(off, data),
            None => data.fill(0xff),
        }
    }

    /// Guest `out`: unclaimed ports ignore writes.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) {
        if let Some((dev, off)) = self.route(port) {
            dev.write(off, data);
        }
    }

    /// Captures every device's state.
    pub fn save(&self) -> DeviceStates {
        DeviceStates {
            serial: self.serial.save(),
            blocks: self.blocks.iter().map(Persist::save).collect(),
            control: self.control.save(),
        }
    }

    /// Restores every device's state.
    pub fn restore(&mut self, states: &DeviceStates) -> Result<(), DevicesError> {
        if states.blocks.len() != self.blocks.len() {
            return Err(DevicesError::BlockCount {
                saved: states.blocks.len(),
                present: self.blocks.len(),
            });
        }
        // Infallible restores first, so a failing block device leaves nothing half-applied
        // that the caller did not already have to discard (the VM is fresh and paused).
        let _: Result<(), std::convert::Infallible> = self.serial.restore(&states.serial);
        let _: Result<(), std::convert::Infallible> = self.control.restore(&states.control);
        for (index, (dev, st)) in self.blocks.iter_mut().zip(&states.blocks).enumerate() {
            dev.restore(st)
                .map_err(|source| DevicesError::Block { index, source })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{raw::Raw, OpenOptions};
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn devices(drives: usize) -> (Devices, SerialCapture, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let blocks = (0..drives)
            .map(|i| {
                let p = dir.path().join(format!("d{i}.raw"));
                std::fs::write(&p, vec![0u8; 512 * (i + 1)]).unwrap();
                let drive = Raw::open(&p, OpenOptions::default()).unwrap();
                let dirty = std::sync::Arc::new(crate::vmm::memory::DmaDirtyLog::new(0x10000));
                PvBlock::new(Box::new(drive), mem.clone(), dirty)
            })
            .collect();
        let cap = SerialCapture::new();
        let serial = Serial::new(&SerialOut::Capture(cap.clone())).unwrap();
        (
            Devices {
                serial,
                blocks,
                control: Control::new(),
            },
            cap,
            dir,
        )
    }

    #[test]
    fn ports_route_to_their_devices() {
        let (mut d, cap, _dir) = devices(2);
        d.pio_write(SERIAL_PORT, b"A");
        assert_eq!(cap.text(), "A");
        // Capacity register (offset 20) of each block device: 1 and 2 sectors.
        let mut b = [0u8; 4];
        d.pio_read(PVBLOCK_PORT + 20, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1);
        d.pio_read(PVBLOCK_PORT + PVBLOCK_PORTS + 20, &mut b);
        assert_eq!(u32::from_le_bytes(b), 2);
        // No third device, and nothing at all elsewhere: all ones.
        d.pio_read(PVBLOCK_PORT + 2 * PVBLOCK_PORTS + 20, &mut b);
        assert_eq!(b, [0xff; 4]);
        d.pio_read(0x80, &mut b);
        assert_eq!(b, [0xff; 4]);
        d.control.shared().request_check();
        let mut c = [0u8; 1];
        d.pio_read(CONTROL_PORT, &mut c);
        assert_eq!(c[0], 1);
    }

    #[test]
    fn restore_checks_the_block_device_count() {
        let (d, _cap, _dir) = devices(2);
        let st = d.save();
        let (mut one, _cap1, _dir1) = devices(1);
        assert!(matches!(
            one.restore(&st),
            Err(DevicesError::BlockCount {
                saved: 2,
                present: 1
            })
        ));
        let (mut two, _cap2, _dir2) = devices(2);
        two.restore(&st).unwrap();
        assert_eq!(two.save(), st);
    }
}
