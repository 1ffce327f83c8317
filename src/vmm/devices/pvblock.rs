//! A minimal paravirtual block device over port I/O, backed by a block-layer driver.
//!
//! Registers (32-bit, offsets from the device's base port):
//!
//! | off | access | meaning                                                          |
//! |-----|--------|------------------------------------------------------------------|
//! | 0   | rw     | sector number, low 32 bits                                       |
//! | 4   | rw     | sector number, high 32 bits                                      |
//! | 8   | rw     | guest-physical address of the data buffer                        |
//! | 12  | rw     | sector count (at most [`MAX_SECTORS`])                           |
//! | 16  | w      | command: 1 read, 2 write, 3 flush; runs synchronously            |
//! | 16  | r      | status of the last command ([`STATUS_OK`] etc.)                   |
//! | 20  | r      | capacity in sectors, low 32 bits                                 |
//! | 24  | r      | capacity in sectors, high 32 bits                                |
//!
//! Requests complete before the `out` returns, so no request is ever in flight when the vCPUs
//! are paused: the saved state is just the registers.

use std::fmt;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use std::sync::Arc;

use super::{Persist, PortDevice};
use crate::block::dirty::DirtyChunks;
use crate::block::BlockDriver;
use crate::vmm::memory::DmaDirtyLog;

/// Sector size of the device.
pub const SECTOR_SIZE: u64 = 512;
/// Largest request, in sectors (bounds the bounce buffer).
pub const MAX_SECTORS: u32 = 256;
/// Command completed.
pub const STATUS_OK: u32 = 0;
/// The block layer reported an error.
pub const STATUS_IO_ERROR: u32 = 1;
/// Bad command, count, range or buffer address.
pub const STATUS_BAD_REQUEST: u32 = 2;
/// Write to a read-only drive.
pub const STATUS_READ_ONLY: u32 = 3;

const CMD_READ: u32 = 1;
const CMD_WRITE: u32 = 2;
const CMD_FLUSH: u32 = 3;

/// Errors applying a saved state.
#[derive(Debug, thiserror::Error)]
pub enum PvBlockError {
    /// The saved sector count exceeds what the device accepts.
    #[error("saved sector count {0} exceeds the maximum {MAX_SECTORS}")]
    Count(u32),
}

/// Saved registers of the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PvBlockState {
    /// Sector register.
    pub sector: u64,
    /// Buffer address register.
    pub addr: u32,
    /// Sector count register.
    pub count: u32,
    /// Status of the last command.
    pub status: u32,
}

/// The device.
pub struct PvBlock {
    regs: PvBlockState,
    drive: Box<dyn BlockDriver>,
    mem: GuestMemoryMmap,
    dirty: Arc<DmaDirtyLog>,
    /// Block-layer errors so far (the first few are reported on stderr).
    io_errors: u64,
    /// Chunks the guest writes, while a block migration runs.
    written: Option<Arc<DirtyChunks>>,
}

impl fmt::Debug for PvBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PvBlock")
            .field("regs", &self.regs)
            .field("drive", &self.drive)
            .finish_non_exhaustive()
    }
}

impl PvBlock {
    /// A device serving `drive`, doing DMA into `mem` and recording the pages it writes in
    /// `dirty`.
    pub fn new(drive: Box<dyn BlockDriver>, mem: GuestMemoryMmap, dirty: Arc<DmaDirtyLog>) -> Self {
        PvBlock {
            regs: PvBlockState::default(),
            drive,
            mem,
            dirty,
            io_errors: 0,
            written: None,
        }
    }

    /// Reports why a request got [`STATUS_IO_ERROR`] (e.g. a write refused because it would
    /// overwrite qcow2 metadata): the guest sees only the status, the operator reads this.
    /// After 8 reports only every 1024th is printed, so a guest retrying cannot flood stderr.
    fn io_error(&mut self, what: &str, e: &crate::block::Error) -> u32 {
        self.io_errors += 1;
        if self.io_errors <= 8 || self.io_errors % 1024 == 0 {
            eprintln!(
                "vmsnap: pvblock: {what} failed, the guest gets an I/O error ({} so far): {e}",
                self.io_errors
            );
        }
        STATUS_IO_ERROR
    }

    /// The drive behind the device (for flushing it before a snapshot).
    pub fn drive_mut(&mut self) -> &mut dyn BlockDriver {
        self.drive.as_mut()
    }

    /// Lends the drive out (for snapshot operations across all disks); until
    /// [`PvBlock::attach`] gives it back, guest requests fail (non-zero status).
    pub fn detach(&mut self) -> Box<dyn BlockDriver> {
        std::mem::replace(&mut self.drive, Box::new(Detached))
    }

    /// Records the ranges the guest writes into `log` from now on (None: stop).
    pub fn set_write_log(&mut self, log: Option<Arc<DirtyChunks>>) {
        self.written = log;
    }

    /// Gives the drive back after [`PvBlock::detach`].
    pub fn attach(&mut self, drive: Box<dyn BlockDriver>) {
        self.drive = drive;
    }

    fn execute(&mut self, cmd: u32) -> u32 {
        if cmd == CMD_FLUSH {
            return match self.drive.flush() {
                Ok(()) => STATUS_OK,
                Err(e) => self.io_error("flush", &e),
            };
        }
        if cmd != CMD_READ && cmd != CMD_WRITE {
            return STATUS_BAD_REQUEST;
        }
        let count = self.regs.count;
        if count == 0 || count > MAX_SECTORS {
            return STATUS_BAD_REQUEST;
        }
        let len = u64::from(count) * SECTOR_SIZE;
        let Some(offset) = self.regs.sector.checked_mul(SECTOR_SIZE) else {
            return STATUS_BAD_REQUEST;
        };
        match offset.checked_add(len) {
            Some(end) if end <= self.drive.size() => {}
            _ => return STATUS_BAD_REQUEST,
        }
        let gpa = GuestAddress(u64::from(self.regs.addr));
        // len <= MAX_SECTORS * 512, so the buffer is bounded.
        let mut buf = vec![0u8; len as usize];
        if cmd == CMD_READ {
            if let Err(e) = self.drive.read_at(offset, &mut buf) {
                return self.io_error(&format!("read of {len} bytes at {offset:#x}"), &e);
            }
            if self.mem.write_slice(&buf, gpa).is_err() {
                return STATUS_BAD_REQUEST;
            }
            self.dirty.mark(gpa.0, len);
        } else {
            if self.drive.is_read_only() {
                return STATUS_READ_ONLY;
            }
            if self.mem.read_slice(&mut buf, gpa).is_err() {
                return STATUS_BAD_REQUEST;
            }
            if let Some(log) = &self.written {
                log.mark(offset, len);
            }
            if let Err(e) = self.drive.write_at(offset, &buf) {
                return self.io_error(&format!("write of {len} bytes at {offset:#x}"), &e);
            }
        }
        STATUS_OK
    }
}

/// Stands in for a drive that is lent out: every request fails.
#[derive(Debug)]
struct Detached;

impl Detached {
    fn err() -> crate::block::Error {
        crate::block::Error::io(
            "drive is detached from the VM",
            std::io::Error::from(std::io::ErrorKind::NotConnected),
        )
    }
}

impl BlockDriver for Detached {
    fn format(&self) -> crate::block::Format {
        crate::block::Format::Raw
    }
    fn size(&self) -> u64 {
        0
    }
    fn is_read_only(&self) -> bool {
        true
    }
    fn read_at(&mut self, _offset: u64, _buf: &mut [u8]) -> crate::block::Result<()> {
        Err(Self::err())
    }
    fn write_at(&mut self, _offset: u64, _buf: &[u8]) -> crate::block::Result<()> {
        Err(Self::err())
    }
    fn write_zeroes(&mut self, _offset: u64, _len: u64) -> crate::block::Result<()> {
        Err(Self::err())
    }
    fn discard(&mut self, _offset: u64, _len: u64) -> crate::block::Result<()> {
        Err(Self::err())
    }
    fn flush(&mut self) -> crate::block::Result<()> {
        Err(Self::err())
    }
}

fn dword(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

impl PortDevice for PvBlock {
    fn section_name(&self) -> &'static str {
        "vmsnap-pvblock"
    }

    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let sectors = self.drive.size() / SECTOR_SIZE;
        let v: u32 = match offset {
            0 => self.regs.sector as u32,
            4 => (self.regs.sector >> 32) as u32,
            8 => self.regs.addr,
            12 => self.regs.count,
            16 => self.regs.status,
            20 => sectors as u32,
            24 => (sectors >> 32) as u32,
            _ => u32::MAX,
        };
        let bytes = v.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let v = dword(data);
        match offset {
            0 => self.regs.sector = (self.regs.sector & !0xffff_ffff) | u64::from(v),
            4 => self.regs.sector = (self.regs.sector & 0xffff_ffff) | (u64::from(v) << 32),
            8 => self.regs.addr = v,
            12 => self.regs.count = v,
            16 => self.regs.status = self.execute(v),
            _ => {}
        }
    }
}

impl Persist for PvBlock {
    type State = PvBlockState;
    type Error = PvBlockError;

    fn save(&self) -> PvBlockState {
        self.regs
    }

    fn restore(&mut self, state: &PvBlockState) -> Result<(), PvBlockError> {
        if state.count > MAX_SECTORS {
            return Err(PvBlockError::Count(state.count));
        }
        self.regs = *state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{raw::Raw, OpenOptions};

    fn device() -> (PvBlock, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
        let drive = Raw::open(&path, OpenOptions::default()).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let dirty = Arc::new(DmaDirtyLog::new(0x10000));
        dirty.set_enabled(true);
        (PvBlock::new(Box::new(drive), mem, dirty), dir)
    }

    fn out(d: &mut PvBlock, off: u16, v: u32) {
        d.write(off, &v.to_le_bytes());
    }

    fn status(d: &mut PvBlock) -> u32 {
        let mut b = [0u8; 4];
        d.read(16, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn write_then_read_back_through_guest_memory() {
        let (mut d, _dir) = device();
        d.mem
            .write_slice(&[0xab; 512], GuestAddress(0x1000))
            .unwrap();
        out(&mut d, 0, 3);
        out(&mut d, 8, 0x1000);
        out(&mut d, 12, 1);
        out(&mut d, 16, CMD_WRITE);
        assert_eq!(status(&mut d), STATUS_OK);
        out(&mut d, 8, 0x2000);
        out(&mut d, 16, CMD_READ);
        assert_eq!(status(&mut d), STATUS_OK);
        let mut back = [0u8; 512];
        d.mem.read_slice(&mut back, GuestAddress(0x2000)).unwrap();
        assert_eq!(back, [0xab; 512]);
        assert_eq!(
            d.dirty.take()[0],
            1 << 2,
            "the read's DMA dirtied page 2 only"
        );
    }

    #[test]
    fn refused_qcow2_write_is_an_io_error_and_the_device_goes_on() {
        use crate::block::qcow2::{CreateOptions, Qcow2};
        use crate::block::{MemStorage, Storage};
        let store = MemStorage::new();
        let opts = CreateOptions {
            size: 1 << 20,
            ..Default::default()
        };
        Qcow2::create_on(Box::new(store.clone()), &opts).unwrap();
        // iotests 060: L1 entry 0 names the L1 table itself (0x30000) as its L2 table.
        let l1 = 0x30000u64;
        store
            .write_at(l1, &((1u64 << 63) | l1).to_be_bytes())
            .unwrap();
        let drive = Qcow2::open_storage(Box::new(store.clone()), false).unwrap();
        let before = store.data();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut d = PvBlock::new(Box::new(drive), mem, Arc::new(DmaDirtyLog::new(0x10000)));
        out(&mut d, 8, 0x1000);
        out(&mut d, 12, 1);
        out(&mut d, 16, CMD_WRITE);
        assert_eq!(status(&mut d), STATUS_IO_ERROR);
        assert_eq!(d.io_errors, 1);
        assert_eq!(before, store.data(), "the refused write changed the image");
        // The device keeps serving: reads work, flush works, writes keep failing.
        out(&mut d, 16, CMD_READ);
        assert_eq!(status(&mut d), STATUS_OK);
        out(&mut d, 16, CMD_FLUSH);
        assert_eq!(status(&mut d), STATUS_OK);
        out(&mut d, 0, 100);
        out(&mut d, 16, CMD_WRITE);
        assert_eq!(status(&mut d), STATUS_IO_ERROR);
        assert_eq!(before, store.data());
    }

    #[test]
    fn detached_drive_fails_requests_until_attached() {
        let (mut d, _dir) = device();
        let drive = d.detach();
        out(&mut d, 12, 1);
        out(&mut d, 16, CMD_FLUSH);
        assert_eq!(status(&mut d), STATUS_IO_ERROR);
        d.attach(drive);
        out(&mut d, 16, CMD_FLUSH);
        assert_eq!(status(&mut d), STATUS_OK);
    }

    #[test]
    fn rejects_bad_requests() {
        let (mut d, _dir) = device();
        out(&mut d, 12, MAX_SECTORS + 1);
        out(&mut d, 16, CMD_READ);
        assert_eq!(status(&mut d), STATUS_BAD_REQUEST);
        out(&mut d, 12, 1);
        out(&mut d, 0, 128); // one past the 64 KiB disk
        out(&mut d, 16, CMD_READ);
        assert_eq!(status(&mut d), STATUS_BAD_REQUEST);
        out(&mut d, 0, 0);
        out(&mut d, 8, 0xffff_0000); // outside guest memory
        out(&mut d, 16, CMD_READ);
        assert_eq!(status(&mut d), STATUS_BAD_REQUEST);
        out(&mut d, 16, 99);
        assert_eq!(status(&mut d), STATUS_BAD_REQUEST);
        assert!(matches!(
            d.restore(&PvBlockState {
                count: MAX_SECTORS + 1,
                ..Default::default()
            }),
            Err(PvBlockError::Count(_))
        ));
    }
}
