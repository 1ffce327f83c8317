//! The test-control device: lets the VMM ask the guest for a self-check, and lets the guest
//! report an unexpected exception.
//!
//! Ports (from [`super::CONTROL_PORT`]): offset 0 read → 1 if a check was requested since the
//! last read (the read clears it), else 0; offset 1 write → the guest's fault marker (the value
//! is kept, and the VMM stops the VM when it is non-zero); offset 2 read → 0 after the vCPU
//! thread idled for [`IDLE`] (the guest's user mode cannot `hlt`, so it waits here instead of
//! spinning; the vCPU loop does the sleeping, outside the device lock).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use super::{Persist, PortDevice};

/// Offset of the idle port.
pub const IDLE_OFFSET: u16 = 2;
/// How long a read of the idle port keeps the vCPU off the host CPU.
pub const IDLE: std::time::Duration = std::time::Duration::from_millis(1);

/// Handles shared between the device and the VMM.
#[derive(Debug, Default)]
pub struct ControlShared {
    check_requested: AtomicBool,
    fault: AtomicU8,
}

impl ControlShared {
    /// Asks the guest to verify RAM and disk at its next tick.
    pub fn request_check(&self) {
        self.check_requested.store(true, Ordering::SeqCst);
    }

    /// The fault marker the guest wrote, 0 if none.
    pub fn fault(&self) -> u8 {
        self.fault.load(Ordering::SeqCst)
    }
}

/// Saved state of the control device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ControlState {
    /// A check request not yet seen by the guest.
    pub check_requested: bool,
    /// Fault marker written by the guest.
    pub fault: u8,
}

/// The device.
#[derive(Debug, Default)]
pub struct Control {
    shared: Arc<ControlShared>,
}

impl Control {
    /// A new device with no request pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// The handle the VMM keeps.
    pub fn shared(&self) -> Arc<ControlShared> {
        Arc::clone(&self.shared)
    }
}

impl PortDevice for Control {
    fn section_name(&self) -> &'static str {
        "vmsnap-control"
    }

    fn read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(first) = data.first_mut() {
                *first = u8::from(self.shared.check_requested.swap(false, Ordering::SeqCst));
            }
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if let (1, Some(&v)) = (offset, data.first()) {
            self.shared.fault.store(v, Ordering::SeqCst);
        }
    }
}

impl Persist for Control {
    type State = ControlState;
    type Error = std::convert::Infallible;

    fn save(&self) -> ControlState {
        ControlState {
            check_requested: self.shared.check_requested.load(Ordering::SeqCst),
            fault: self.shared.fault(),
        }
    }

    fn restore(&mut self, state: &ControlState) -> Result<(), Self::Error> {
        self.shared
            .check_requested
            .store(state.check_requested, Ordering::SeqCst);
        self.shared.fault.store(state.fault, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_is_read_once() {
        let mut c = Control::new();
        c.shared().request_check();
        let mut b = [0u8; 1];
        c.read(0, &mut b);
        assert_eq!(b[0], 1);
        c.read(0, &mut b);
        assert_eq!(b[0], 0);
    }

    #[test]
    fn state_round_trips() {
        let mut c = Control::new();
        c.write(1, &[0xee]);
        c.shared().request_check();
        let st = c.save();
        assert_eq!(
            st,
            ControlState {
                check_requested: true,
                fault: 0xee
            }
        );
        let mut d = Control::new();
        d.restore(&st).unwrap();
        assert_eq!(d.save(), st);
    }
}
