//! `vmsnap run` end to end: boots the counter guest from the command line and drives the
//! monitor over stdio and over a Unix socket.
mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the child process if the test fails before it exits.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits until the serial file holds `n` lines starting with `tick `.
fn wait_for_ticks(path: &std::path::Path, n: usize) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().filter(|l| l.starts_with("tick ")).count() >= n {
            return text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "not {n} ticks in serial:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn run_with_stdio_monitor_stops_continues_and_quits() {
    if !common::kvm(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let serial = dir.path().join("serial.txt");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmsnap"))
        .args(["run", "--drive"])
        .arg(format!("file={},format=raw", disk.display()))
        .args([
            "--guest", "counter", "--memory", "16M", "--smp", "2", "--serial",
        ])
        .arg(format!("file:{}", serial.display()))
        .args(["--monitor", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut guard = KillOnDrop(Some(child));
    writeln!(stdin, "info status").unwrap();
    wait_for_ticks(&serial, 3);
    writeln!(stdin, "stop").unwrap();
    writeln!(stdin, "info status").unwrap();
    writeln!(stdin, "bogus").unwrap();
    writeln!(stdin, "cont").unwrap();
    writeln!(stdin, "info status").unwrap();
    writeln!(stdin, "quit").unwrap();
    let out = guard.0.take().unwrap().wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let statuses: Vec<&str> = stdout.lines().filter(|l| l.contains("VM status")).collect();
    assert_eq!(
        statuses
            .iter()
            .map(|l| l.trim_start_matches("(vmsnap) "))
            .collect::<Vec<_>>(),
        [
            "VM status: running",
            "VM status: paused",
            "VM status: running"
        ],
        "{stdout}"
    );
    assert!(stdout.contains("unknown command: 'bogus'"), "{stdout}");
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(text.starts_with("tick "), "{text}");
    assert!(!text.contains("CHECK FAIL"), "{text}");
}

#[test]
fn run_with_unix_monitor() {
    if !common::kvm(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path().join("mon.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_vmsnap"))
        .args(["run", "--drive"])
        .arg(format!("file={}", disk.display()))
        .args(["--memory", "16M", "--serial", "none", "--monitor"])
        .arg(format!("unix:{}", sock.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = KillOnDrop(Some(child));
    let start = Instant::now();
    let stream = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("monitor socket never appeared: {e}"),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut w = &stream;
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("monitor"), "{line}");
    writeln!(w, "stop").unwrap();
    writeln!(w, "info status").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line.trim_end(), "VM status: paused");
    writeln!(w, "info registers").unwrap();
    let mut regs = String::new();
    for _ in 0..7 {
        reader.read_line(&mut regs).unwrap();
    }
    assert!(regs.starts_with("CPU#0\nRAX="), "{regs}");
    assert!(regs.contains("CR3=0000000000008000"), "{regs}");
    writeln!(w, "quit").unwrap();
    let status = guard.0.take().unwrap().wait().unwrap();
    assert!(status.success());
    assert!(!sock.exists(), "socket removed on quit");
}

#[test]
fn run_reports_a_missing_drive() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmsnap"))
        .args([
            "run",
            "--drive",
            "file=/nonexistent/disk.img",
            "--serial",
            "none",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/disk.img"), "{err}");
}

#[test]
fn run_rejects_a_bad_vcpu_count() {
    for smp in ["0", "9"] {
        let out = Command::new(env!("CARGO_BIN_EXE_vmsnap"))
            .args(["run", "--smp", smp, "--serial", "none"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("{smp} vCPUs requested")), "{err}");
    }
}

#[test]
fn sigterm_stops_flushes_and_exits_cleanly() {
    if !common::kvm(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let serial = dir.path().join("serial.txt");
    let child = Command::new(env!("CARGO_BIN_EXE_vmsnap"))
        .args(["run", "--drive"])
        .arg(format!("file={}", disk.display()))
        .args(["--memory", "16M", "--serial"])
        .arg(format!("file:{}", serial.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = KillOnDrop(Some(child));
    wait_for_ticks(&serial, 10);
    let pid = guard.0.as_ref().unwrap().id();
    let st = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = guard.0.take().unwrap().wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("terminating on signal"), "{err}");
    // Every record the guest finished writing (it writes at ticks divisible by 4, after
    // printing the tick; a tick followed by another printed tick is finished) is in the file.
    let text = std::fs::read_to_string(&serial).unwrap();
    let ticks: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .collect();
    let finished = &ticks[..ticks.len().saturating_sub(1)];
    if let Some(&n) = finished.iter().filter(|&&n| n % 4 == 0).max() {
        let bytes = std::fs::read(&disk).unwrap();
        assert_eq!(&bytes[512..520], b"TICKCTNR");
        let on_disk = u64::from_le_bytes(bytes[520..528].try_into().unwrap());
        assert!(
            on_disk >= n,
            "record {on_disk} on disk, tick {n} was finished"
        );
    }
}
