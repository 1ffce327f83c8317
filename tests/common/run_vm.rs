//! A `vmsnap run` of the counter guest (16 MiB) with its serial console in a file and its
//! monitor on a Unix socket, as the savevm tests drive it. Killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::monitor::Monitor;
use super::ticks::ticks_of;

/// KVM and qemu-img are both there; says loudly what is missing otherwise.
pub fn kvm_and_qemu_img(what: &str) -> bool {
    super::kvm(what) && super::require(what, &["qemu-img"])
}

/// A fresh 16 MiB qcow2 image made by qemu-img.
pub fn create_qcow2(path: &Path) {
    super::qemu_img(&["create", "-f", "qcow2", super::s(path), "16M"]).ok();
}

/// `qemu-img check` of `path` passes.
pub fn assert_check(path: &Path) {
    let out = super::qemu_img(&["check", super::s(path)]);
    assert_eq!(
        out.code,
        Some(0),
        "qemu-img check {}: {}{}",
        path.display(),
        out.stdout,
        out.stderr
    );
}

/// The command line of run number `run` in `dir` (monitor `mon{run}.sock`, serial
/// `serial{run}.txt`).
pub fn command(dir: &Path, drives: &[String], smp: u32, loadvm: Option<&str>, run: u32) -> Command {
    command_with_memory(dir, drives, smp, loadvm, run, "16M")
}

/// [`command`] with `memory` of guest RAM.
pub fn command_with_memory(
    dir: &Path,
    drives: &[String],
    smp: u32,
    loadvm: Option<&str>,
    run: u32,
    memory: &str,
) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmsnap"));
    cmd.arg("run");
    for d in drives {
        cmd.args(["--drive", d]);
    }
    cmd.args(["--guest", "counter", "--memory", memory, "--smp"])
        .arg(smp.to_string());
    console_args(&mut cmd, dir, run);
    if let Some(tag) = loadvm {
        cmd.args(["--loadvm", tag]);
    }
    cmd
}

/// `--serial file:DIR/serial{run}.txt --monitor unix:DIR/mon{run}.sock`.
fn console_args(cmd: &mut Command, dir: &Path, run: u32) {
    cmd.arg("--serial")
        .arg(format!(
            "file:{}",
            dir.join(format!("serial{run}.txt")).display()
        ))
        .arg("--monitor")
        .arg(format!(
            "unix:{}",
            dir.join(format!("mon{run}.sock")).display()
        ));
}

/// A running `vmsnap run`.
pub struct RunVm {
    child: Option<Child>,
    mon: Monitor,
    serial: PathBuf,
}

impl Drop for RunVm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl RunVm {
    /// Starts run number `run` (see [`command`]) and connects to its monitor.
    pub fn start(dir: &Path, drives: &[String], smp: u32, loadvm: Option<&str>, run: u32) -> RunVm {
        Self::start_with(dir, drives, smp, loadvm, run, &[])
    }

    /// [`RunVm::start`] with more `vmsnap run` arguments (`--mem-path`, `--dirty-rate`,
    /// `--memory SIZE` instead of 16M).
    pub fn start_with(
        dir: &Path,
        drives: &[String],
        smp: u32,
        loadvm: Option<&str>,
        run: u32,
        extra: &[&str],
    ) -> RunVm {
        let at = extra.iter().position(|a| *a == "--memory");
        let memory = at.and_then(|i| extra.get(i + 1)).copied().unwrap_or("16M");
        let rest: Vec<&str> = extra
            .iter()
            .enumerate()
            .filter(|(i, _)| !matches!(at, Some(a) if *i == a || *i == a + 1))
            .map(|(_, a)| *a)
            .collect();
        let mut cmd = command_with_memory(dir, drives, smp, loadvm, run, memory);
        cmd.args(rest);
        Self::spawn(cmd, dir, run)
    }

    /// Runs `vmsnap restore FILE` as run number `run` (serial `serial{run}.txt`, monitor
    /// `mon{run}.sock`), with `extra` arguments (`--paused`, `--drive-path OLD=NEW`).
    pub fn restore(dir: &Path, file: &Path, run: u32, extra: &[&str]) -> RunVm {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmsnap"));
        cmd.arg("restore").arg(file);
        console_args(&mut cmd, dir, run);
        cmd.args(extra);
        Self::spawn(cmd, dir, run)
    }

    /// Starts a prepared command line of run number `run` in `dir` (one from [`command`],
    /// perhaps with more arguments or run on another host) and connects to its monitor.
    pub fn spawn(mut cmd: Command, dir: &Path, run: u32) -> RunVm {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mon = Monitor::connect(&dir.join(format!("mon{run}.sock")), || {
            let st = child.try_wait().ok()??;
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut()?, &mut err).ok()?;
            Some(format!("{st}: {err}"))
        });
        RunVm {
            child: Some(child),
            mon,
            serial: dir.join(format!("serial{run}.txt")),
        }
    }

    /// Sends `line`, a command that ends the process (`save FILE`); returns the monitor's
    /// last words and the process's exit status.
    pub fn finish_with(mut self, line: &str) -> (String, std::process::ExitStatus) {
        self.mon.send(line);
        let reply = self.mon.read_to_end();
        let child = self.child.take().unwrap();
        let out = child.wait_with_output().unwrap();
        (reply, out.status)
    }

    /// Sends `line` without waiting for a reply (a command the process is to die in).
    #[allow(dead_code)]
    pub fn send(&mut self, line: &str) {
        self.mon.send(line);
    }

    /// Sends a command; returns its reply and the VM status after it.
    pub fn cmd(&mut self, line: &str) -> (String, String) {
        self.mon.cmd(line)
    }

    /// Sends a command with a descriptor (SCM_RIGHTS); returns its reply and the status.
    pub fn cmd_with_fd(&mut self, line: &str, fd: std::os::fd::BorrowedFd<'_>) -> (String, String) {
        self.mon.cmd_with_fd(line, fd)
    }

    /// Sends a command whose reply must not be an error; returns the reply.
    pub fn ok(&mut self, line: &str) -> String {
        self.mon.ok(line)
    }

    /// Polls `info loadvm` until the last load is no longer `active` (its background fill
    /// ended); returns the reply.
    #[allow(dead_code)]
    pub fn wait_loaded(&mut self) -> String {
        let start = std::time::Instant::now();
        loop {
            let r = self.ok("info loadvm");
            if !r.contains("status: active") {
                return r;
            }
            assert!(start.elapsed() < std::time::Duration::from_secs(60), "{r}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The serial console so far.
    pub fn serial_text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// The ticks printed so far.
    pub fn ticks(&self) -> Vec<u64> {
        ticks_of(&self.serial_text())
    }

    /// The last tick printed.
    pub fn last_tick(&self) -> Option<u64> {
        self.ticks().last().copied()
    }

    /// Waits until a tick above `n` has been printed.
    pub fn wait_past(&self, n: u64) {
        let start = Instant::now();
        while !self.last_tick().is_some_and(|t| t > n) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no tick past {n}:\n{}",
                self.serial_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the serial output has a `CHECK` line; returns the text.
    pub fn wait_check(&self) -> String {
        let start = Instant::now();
        loop {
            let t = self.serial_text();
            // The whole line: a half-printed "CHECK O" must not be judged.
            if t.find("CHECK ").is_some_and(|i| t[i..].contains('\n')) {
                return t;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "no CHECK:\n{t}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the guest; returns the last tick printed.
    pub fn stop(&mut self) -> u64 {
        let (r, st) = self.cmd("stop");
        assert_eq!((r.as_str(), st.as_str()), ("", "paused"));
        self.last_tick().expect("no tick before stop")
    }

    /// Waits (up to `limit`) for the process to end on its own; returns its exit status and
    /// standard error.
    #[allow(dead_code)]
    pub fn wait_exit(mut self, limit: Duration) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > limit {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "still running after {limit:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The process's exit status, if it ended.
    #[allow(dead_code)]
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok()?
    }

    /// Quits through the monitor; the process must exit with success.
    pub fn quit(mut self) {
        self.mon.quit();
        let child = self.child.take().unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Snapshot `tag`'s guest RAM (`len` bytes, of a VM with `vcpus` vCPUs and `drives` drives),
/// decoded by the library's loader from a shared read-only open (the image may still be open
/// in a running vmsnap).
pub fn snapshot_ram_of(
    image: &Path,
    tag: &str,
    len: usize,
    vcpus: usize,
    drives: usize,
) -> Vec<u8> {
    use vmsnap::block::vmstate_io::VmstateReader;
    use vmsnap::block::{open_image, OpenOptions};
    let opts = OpenOptions {
        read_only: true,
        force_share: true,
        ..Default::default()
    };
    let mut drv = open_image(image, opts).unwrap();
    let mut r = VmstateReader::for_snapshot(drv.snapshots().unwrap(), tag).unwrap();
    let mut ram = vec![0u8; len];
    vmsnap::snapshot::state_io::read_state(vcpus, drives, &mut ram, &mut r).unwrap();
    ram
}

/// The little-endian 64-bit word at guest address `addr` of `ram`.
pub fn guest_word(ram: &[u8], addr: u64) -> u64 {
    let a = addr as usize;
    u64::from_le_bytes(ram[a..a + 8].try_into().unwrap())
}
