//! QEMU 7.2 itself, for the interop tests: the fixtures' RAM pattern (shared/fixtures/README.md)
//! and a `qemu-system-x86_64` run with 32 MiB of that pattern as RAM, the fixtures' device set
//! (virtio-blk, e1000, isa-serial) and its HMP monitor on a Unix socket. Killed when dropped.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const RAM: usize = 32 << 20;
pub const SEED: u64 = 0x5EED_5EED_5EED_5EED;

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The fixtures' RAM pattern (see shared/fixtures/README.md).
pub fn pattern() -> Vec<u8> {
    let mut ram = vec![0u8; RAM];
    for (n, page) in ram.chunks_mut(4096).enumerate() {
        if n % 8 == 7 {
            continue;
        }
        let gpa = (n * 4096) as u64;
        let mut st = SEED ^ gpa;
        page[..4].copy_from_slice(b"PAGE");
        page[4..12].copy_from_slice(&gpa.to_le_bytes());
        if n % 64 == 1 {
            page[12..16].copy_from_slice(b"RND!");
            for i in 0..510 {
                let v = splitmix(&mut st);
                page[16 + i * 8..24 + i * 8].copy_from_slice(&v.to_le_bytes());
            }
        } else {
            page[12..16].copy_from_slice(b"REP!");
            let mut unit = [0u8; 16];
            unit[..8].copy_from_slice(&splitmix(&mut st).to_le_bytes());
            unit[8..].copy_from_slice(&splitmix(&mut st).to_le_bytes());
            for c in page[16..].chunks_mut(16) {
                c.copy_from_slice(&unit);
            }
        }
    }
    ram
}

/// Ranges SeaBIOS leaves alone in every run (README: "pages that equal the pattern").
/// (Under TCG, SeaBIOS also clears most of 0x8000-0x5dfff and uses more below the top of RAM,
/// so those ranges are left out.)
pub const UNTOUCHED: &[(usize, usize)] = &[(0x1000, 0x6000), (0x100000, 0x1e00000)];

pub fn assert_pattern(mem: &[u8], pat: &[u8], what: &str) {
    for &(a, b) in UNTOUCHED {
        let bad: Vec<String> = (a..b)
            .step_by(4096)
            .filter(|&p| mem[p..p + 4096] != pat[p..p + 4096])
            .map(|p| format!("{p:#x}"))
            .collect();
        assert!(
            bad.is_empty(),
            "{what}: pages differ from the pattern: {bad:?}"
        );
    }
}

/// A running QEMU with its HMP monitor.
pub struct Qemu {
    child: Child,
    mon: UnixStream,
}

impl Qemu {
    /// Starts QEMU under TCG.
    pub fn start(machine: &str, img: &Path, pat: &Path, sock: &Path, extra: &[&str]) -> Qemu {
        Self::start_accel("tcg", machine, img, pat, sock, extra)
    }

    /// Starts QEMU with accelerator `accel` (`tcg`, `kvm`).
    pub fn start_accel(
        accel: &str,
        machine: &str,
        img: &Path,
        pat: &Path,
        sock: &Path,
        extra: &[&str],
    ) -> Qemu {
        let _ = std::fs::remove_file(sock);
        let mut args: Vec<String> = [
            "-accel",
            accel,
            "-display",
            "none",
            "-nodefaults",
            "-no-user-config",
            "-machine",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("{machine},memory-backend=ram0"));
        args.extend(["-m".into(), "32M".into(), "-object".into()]);
        args.push(format!(
            "memory-backend-file,id=ram0,size=32M,mem-path={},share=off",
            pat.display()
        ));
        args.push("-drive".into());
        args.push(format!(
            "if=none,id=drive0,file={},format=qcow2",
            img.display()
        ));
        for a in [
            "-device",
            "virtio-blk-pci,drive=drive0",
            "-netdev",
            "user,id=net0",
            "-device",
            "e1000,netdev=net0",
            "-chardev",
            "null,id=ser0",
            "-device",
            "isa-serial,chardev=ser0",
            "-monitor",
        ] {
            args.push(a.into());
        }
        args.push(format!("unix:{},server=on,wait=off", sock.display()));
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(&args, sock)
    }

    /// Starts `qemu-system-x86_64 ARGS`, whose HMP monitor listens on `sock`, and connects.
    pub fn spawn(args: &[String], sock: &Path) -> Qemu {
        let child = Command::new("qemu-system-x86_64")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qemu");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mon = loop {
            if let Ok(s) = UnixStream::connect(sock) {
                break s;
            }
            assert!(Instant::now() < deadline, "QEMU monitor never came up");
            std::thread::sleep(Duration::from_millis(50));
        };
        mon.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut q = Qemu { child, mon };
        q.read_prompt();
        q
    }

    pub fn read_prompt(&mut self) -> String {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while !out.ends_with(b"(qemu) ") {
            let n = self.mon.read(&mut buf).expect("monitor read");
            assert!(n > 0, "monitor closed: {}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Runs an HMP command and returns its output (echo and prompt stripped).
    pub fn hmp(&mut self, cmd: &str) -> String {
        self.mon.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        let raw = self.read_prompt();
        let text: String = raw.replace('\r', "");
        let body = text.strip_suffix("(qemu) ").unwrap_or(&text);
        // The echo of the command line (with readline escapes) ends at the first newline.
        body.split_once('\n')
            .map(|(_, rest)| rest.to_owned())
            .unwrap_or_default()
    }

    pub fn status(&mut self) -> String {
        self.hmp("info status").trim().to_owned()
    }

    /// Waits until the incoming migration is over and returns the status then.
    pub fn wait_incoming(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.status();
            if !s.contains("inmigrate") || Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn migrate_to(&mut self, file: &Path) {
        let out = self.hmp(&format!("migrate \"exec:cat > {}\"", file.display()));
        assert!(!out.contains("rror"), "migrate: {out}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let info = self.hmp("info migrate");
            if info.contains("Migration status: completed") {
                break;
            }
            assert!(!info.contains("failed"), "migration failed: {info}");
            assert!(
                Instant::now() < deadline,
                "migration never completed: {info}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pmemsave(&mut self, file: &Path) -> Vec<u8> {
        let out = self.hmp(&format!("pmemsave 0 {RAM} \"{}\"", file.display()));
        assert!(out.trim().is_empty(), "pmemsave: {out}");
        std::fs::read(file).unwrap()
    }

    pub fn quit(mut self) {
        let _ = self.mon.write_all(b"quit\n");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
