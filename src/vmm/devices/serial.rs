//! A 16550A-compatible UART (COM1) whose transmitter writes to stdout, a file or a buffer.
//!
//! Only what a polling driver needs is modelled: the transmitter is always ready (LSR reports
//! THRE and TEMT), nothing is ever received, and no interrupt is raised (IER is stored and read
//! back but has no effect). Every register a guest can write is kept, so that save/restore
//! gives the guest back exactly what it programmed. The state mirrors the fields of QEMU's
//! `serial` VMState (`divider`, `rbr`, `ier`, `iir`, `lcr`, `mcr`, `lsr`, `msr`, `scr`, `fcr`).

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{Persist, PortDevice};

const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;
const LCR_DLAB: u8 = 0x80;
const IIR_NO_INT: u8 = 0x01;
const MCR_LOOP: u8 = 0x10;
/// MSR bits reported when not in loopback: CTS, DSR, DCD.
const MSR_IDLE: u8 = 0xb0;

/// Where the transmitter's bytes go.
#[derive(Debug, Clone, Default)]
pub enum SerialOut {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// A file, created or truncated when the VM is built.
    File(PathBuf),
    /// An in-memory buffer that tests can wait on.
    Capture(SerialCapture),
    /// Discard.
    Sink,
}

/// A shared, growing buffer of serial output with a way to wait for text to appear.
#[derive(Debug, Clone, Default)]
pub struct SerialCapture {
    inner: Arc<(Mutex<Vec<u8>>, Condvar)>,
}

impl SerialCapture {
    /// A new, empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&self, byte: u8) {
        let (buf, cond) = &*self.inner;
        if let Ok(mut b) = buf.lock() {
            b.push(byte);
            if byte == b'\n' {
                cond.notify_all();
            }
        }
    }

    /// Everything written so far, lossily decoded.
    pub fn text(&self) -> String {
        let (buf, _) = &*self.inner;
        buf.lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Number of bytes written so far.
    pub fn len(&self) -> usize {
        self.inner.0.lock().map(|b| b.len()).unwrap_or(0)
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until the text after byte `from` contains `needle`; returns the byte offset just
    /// past the match, or `None` on timeout.
    pub fn wait_for(&self, needle: &str, from: usize, timeout: Duration) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        let (buf, cond) = &*self.inner;
        let mut guard = buf.lock().ok()?;
        loop {
            if let Some(tail) = guard.get(from..) {
                if let Some(pos) = find(tail, needle.as_bytes()) {
                    return Some(from + pos + needle.len());
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            guard = cond.wait_timeout(guard, deadline - now).ok()?.0;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

enum Sink {
    Stdout,
    File(File),
    Capture(SerialCapture),
    Discard,
}

/// Saved state of the UART (QEMU `serial` VMState field names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SerialState {
    /// Baud-rate divisor (DLM:DLL).
    pub divider: u16,
    /// Receive buffer.
    pub rbr: u8,
    /// Interrupt enable register.
    pub ier: u8,
    /// Interrupt identification register.
    pub iir: u8,
    /// Line control register.
    pub lcr: u8,
    /// Modem control register.
    pub mcr: u8,
    /// Line status register.
    pub lsr: u8,
    /// Modem status register.
    pub msr: u8,
    /// Scratch register.
    pub scr: u8,
    /// FIFO control register (last value written).
    pub fcr: u8,
}

impl Default for SerialState {
    fn default() -> Self {
        SerialState {
            divider: 12, // 9600 baud
            rbr: 0,
            ier: 0,
            iir: IIR_NO_INT,
            lcr: 0x03, // 8N1
            mcr: 0x08, // OUT2
            lsr: LSR_THRE | LSR_TEMT,
            msr: MSR_IDLE,
            scr: 0,
            fcr: 0,
        }
    }
}

/// The UART.
pub struct Serial {
    regs: SerialState,
    sink: Sink,
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serial")
            .field("regs", &self.regs)
            .finish_non_exhaustive()
    }
}

impl Serial {
    /// A UART in its reset state writing to `out`.
    pub fn new(out: &SerialOut) -> std::io::Result<Self> {
        let sink = match out {
            SerialOut::Stdout => Sink::Stdout,
            SerialOut::File(p) => Sink::File(File::create(p)?),
            SerialOut::Capture(c) => Sink::Capture(c.clone()),
            SerialOut::Sink => Sink::Discard,
        };
        Ok(Serial {
            regs: SerialState::default(),
            sink,
        })
    }

    fn transmit(&mut self, byte: u8) {
        if self.regs.mcr & MCR_LOOP != 0 {
            self.regs.rbr = byte; // loopback: what is sent is received
            return;
        }
        // Console output is best effort: a full disk must not stop the guest.
        match &mut self.sink {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&[byte]);
                if byte == b'\n' {
                    let _ = out.flush();
                }
            }
            Sink::File(f) => {
                let _ = f.write_all(&[byte]);
            }
            Sink::Capture(c) => c.push(byte),
            Sink::Discard => {}
        }
    }
}

impl PortDevice for Serial {
    fn section_name(&self) -> &'static str {
        "serial"
    }

    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let dlab = self.regs.lcr & LCR_DLAB != 0;
        let [dll, dlm] = self.regs.divider.to_le_bytes();
        let v = match offset {
            0 if dlab => dll,
            0 => self.regs.rbr,
            1 if dlab => dlm,
            1 => self.regs.ier,
            2 => self.regs.iir | if self.regs.fcr & 1 != 0 { 0xc0 } else { 0 },
            3 => self.regs.lcr,
            4 => self.regs.mcr,
            5 => self.regs.lsr,
            6 => self.regs.msr,
            7 => self.regs.scr,
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = v;
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        let dlab = self.regs.lcr & LCR_DLAB != 0;
        let [dll, dlm] = self.regs.divider.to_le_bytes();
        match offset {
            0 if dlab => self.regs.divider = u16::from_le_bytes([v, dlm]),
            0 => self.transmit(v),
            1 if dlab => self.regs.divider = u16::from_le_bytes([dll, v]),
            1 => self.regs.ier = v & 0x0f,
            2 => self.regs.fcr = v,
            3 => self.regs.lcr = v,
            4 => self.regs.mcr = v & 0x1f,
            7 => self.regs.scr = v,
            _ => {} // LSR and MSR are read-only
        }
    }
}

impl Persist for Serial {
    type State = SerialState;
    type Error = std::convert::Infallible;

    fn save(&self) -> SerialState {
        self.regs
    }

    fn restore(&mut self, state: &SerialState) -> Result<(), Self::Error> {
        self.regs = *state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmits_to_capture_and_reports_ready() {
        let cap = SerialCapture::new();
        let mut s = Serial::new(&SerialOut::Capture(cap.clone())).unwrap();
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(cap.text(), "hi\n");
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
        assert_eq!(cap.wait_for("hi", 0, Duration::from_millis(1)), Some(2));
        assert_eq!(cap.wait_for("zz", 0, Duration::from_millis(1)), None);
    }

    #[test]
    fn divisor_latch_and_scratch_survive_save_restore() {
        let mut s = Serial::new(&SerialOut::Sink).unwrap();
        s.write(3, &[LCR_DLAB | 0x03]);
        s.write(0, &[0x01]);
        s.write(1, &[0x02]);
        s.write(3, &[0x03]);
        s.write(7, &[0x5a]);
        let st = s.save();
        assert_eq!(st.divider, 0x0201);
        let mut t = Serial::new(&SerialOut::Sink).unwrap();
        t.restore(&st).unwrap();
        let mut b = [0u8];
        t.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        assert_eq!(t.save(), st);
    }

    #[test]
    fn loopback_receives_what_is_sent() {
        let cap = SerialCapture::new();
        let mut s = Serial::new(&SerialOut::Capture(cap.clone())).unwrap();
        s.write(4, &[MCR_LOOP]);
        s.write(0, b"x");
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b[0], b'x');
        assert!(cap.is_empty());
    }
}
