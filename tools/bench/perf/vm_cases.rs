//! Benchmark cases: vm — savevm and loadvm of a guest whose RAM (2 GiB by default) holds the
//! same random contents on both sides, timed over each side's monitor socket.
//!
//! ```text
//!  per run and side, one process:   savevm s1   (fresh qcow2)
//!                                   delvm s1
//!                                   savevm s2   (the deleted snapshot's clusters are free)
//!                                   loadvm s2   (first)
//!                                   loadvm s2   (repeated)
//! ```
//!
//! QEMU: `qemu-system-x86_64 -accel kvm (tcg if KVM fails) -m SIZE -object
//! memory-backend-file,…,share=off -machine memory-backend=m -S -nodefaults` with the image as
//! a virtio drive and an HMP monitor socket. vmsnap: `vmsnap run --mem-path FILE` with the
//! counter guest (its image is loaded on top of the file's contents: a few pages of 2 GiB).
//! QEMU stays paused (-S); vmsnap's guest runs between commands and is stopped by savevm.
//!
//! A command is timed from sending its line until the monitor answers the `info status` sent
//! right after it (both monitors answer only once the command has finished). Both sides flush:
//! QEMU's savevm ends in the qcow2 snapshot table update with its flushes, and vmsnap's
//! snapshot creation flushes (fdatasync) before committing the header the same way; neither
//! flushes on loadvm. `VMSNAP_BENCH_VM_MIB` sets the RAM size (default 2048).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{self, Harness, Row, Sample};

/// What one process measured.
#[derive(Debug, Clone, Copy, Default)]
struct RunTimes {
    save_fresh: Duration,
    save_reuse: Duration,
    load_first: Duration,
    load_again: Duration,
}

/// One side under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Vmsnap,
    Qemu,
}

/// A monitor connection (QEMU HMP or vmsnap's monitor; both line-based).
pub(crate) struct Monitor {
    pub(crate) stream: UnixStream,
    pub(crate) reader: BufReader<UnixStream>,
}

impl Monitor {
    pub(crate) fn connect(path: &Path, child: &mut Child, log: &Path) -> Result<Monitor, String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(s) = UnixStream::connect(path) {
                let reader = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
                s.set_read_timeout(Some(Duration::from_secs(600)))
                    .map_err(|e| e.to_string())?;
                return Ok(Monitor { stream: s, reader });
            }
            if let Ok(Some(st)) = child.try_wait() {
                let err = std::fs::read_to_string(log).unwrap_or_default();
                return Err(format!("exited ({st}) before its monitor came up: {err}"));
            }
            if Instant::now() > deadline {
                return Err(format!("no monitor at {}", path.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `line` then `info status`; returns everything read until the status answer and
    /// the time this took.
    pub(crate) fn cmd(&mut self, line: &str) -> Result<(String, Duration), String> {
        let t = Instant::now();
        self.stream
            .write_all(format!("{line}\ninfo status\n").as_bytes())
            .map_err(|e| format!("{line}: {e}"))?;
        let mut out = String::new();
        loop {
            let mut l = Vec::new();
            let n = self
                .reader
                .read_until(b'\n', &mut l)
                .map_err(|e| format!("{line}: {e}"))?;
            if n == 0 {
                return Err(format!("{line}: monitor closed; got {out:?}"));
            }
            let l = String::from_utf8_lossy(&l);
            if l.contains("VM status") {
                return Ok((out, t.elapsed()));
            }
            out.push_str(&l);
        }
    }

    /// [`Monitor::cmd`], failing if the answer carries an error.
    pub(crate) fn timed(&mut self, line: &str) -> Result<Duration, String> {
        let (out, d) = self.cmd(line)?;
        if out.contains("Error") || out.contains("rror:") {
            return Err(format!("{line}: {}", out.trim()));
        }
        Ok(d)
    }
}

impl Monitor {
    /// Sends raw bytes (a `quit` nobody waits an answer for).
    pub(crate) fn stream_write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(data)
    }
}

/// QEMU's `savevm` time for `mib` MiB of RAM from `ram_file` (fresh image, one process):
/// the vm-live cases' reference.
pub(crate) fn qemu_savevm_time(h: &Harness, ram_file: &Path, mib: u64) -> Result<Duration, String> {
    let mut s = Setup {
        ram_file: ram_file.to_path_buf(),
        ram_bytes: mib << 20,
        image: h.path("qlive.qcow2"),
        sock: h.path("qlive.sock"),
        log: h.path("qlive.log"),
        qemu_accel: "kvm",
    };
    s.qemu_accel = qemu_accel(&s).ok_or("qemu-system-x86_64 does not start")?;
    create_image(&s)?;
    let mut child = spawn(Side::Qemu, &s, s.qemu_accel)?;
    let r = Monitor::connect(&s.sock, &mut child, &s.log).and_then(|mut m| {
        m.cmd("")?;
        let d = m.timed("savevm t")?;
        let _ = m.stream_write(b"quit\n");
        Ok(d)
    });
    let _ = child.kill();
    let _ = child.wait();
    r
}

/// Paths and sizes shared by the runs.
struct Setup {
    ram_file: PathBuf,
    ram_bytes: u64,
    image: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    qemu_accel: &'static str,
}

fn create_image(s: &Setup) -> Result<(), String> {
    let _ = std::fs::remove_file(&s.image);
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&s.image)
        .arg("1G")
        .output()
        .map_err(|e| format!("qemu-img create: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img create: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn spawn(side: Side, s: &Setup, accel: &str) -> Result<Child, String> {
    let _ = std::fs::remove_file(&s.sock);
    let mib = s.ram_bytes >> 20;
    let mut cmd = match side {
        Side::Vmsnap => {
            let mut c = Command::new(harness::vmsnap_bin());
            c.arg("run")
                .arg("--drive")
                .arg(format!("file={},format=qcow2", s.image.display()))
                .args(["-m", &format!("{mib}M"), "--serial", "none"])
                .arg("--mem-path")
                .arg(&s.ram_file)
                .arg("--monitor")
                .arg(format!("unix:{}", s.sock.display()));
            c
        }
        Side::Qemu => {
            let mut c = Command::new("qemu-system-x86_64");
            c.args(["-accel", accel, "-m", &format!("{mib}M")])
                .arg("-object")
                .arg(format!(
                    "memory-backend-file,id=m,size={mib}M,mem-path={},share=off",
                    s.ram_file.display()
                ))
                .args(["-machine", "memory-backend=m", "-S", "-nodefaults"])
                .args(["-display", "none"])
                .arg("-drive")
                .arg(format!("file={},if=virtio,format=qcow2", s.image.display()))
                .arg("-monitor")
                .arg(format!("unix:{},server=on,wait=off", s.sock.display()));
            c
        }
    };
    // stderr into a file: a pipe nobody reads would fill with progress reports and block.
    let log = std::fs::File::create(&s.log).map_err(|e| format!("{}: {e}", s.log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{side:?}: {e}"))
}

/// One process: the five timed commands, then quit.
fn one_run(side: Side, s: &Setup) -> Result<RunTimes, String> {
    create_image(s)?;
    let mut child = spawn(side, s, s.qemu_accel)?;
    let r = (|| {
        let mut m = Monitor::connect(&s.sock, &mut child, &s.log)?;
        // Banner (and QEMU's first prompt) out of the way.
        m.cmd("")?;
        let save_fresh = m.timed("savevm s1")?;
        m.timed("delvm s1")?;
        let save_reuse = m.timed("savevm s2")?;
        let load_first = m.timed("loadvm s2")?;
        let load_again = m.timed("loadvm s2")?;
        let _ = m.stream.write_all(b"quit\n");
        Ok(RunTimes {
            save_fresh,
            save_reuse,
            load_first,
            load_again,
        })
    })();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            _ if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    r
}

/// VM-state sizes of the image's snapshots, by name (`qemu-img info --output=json`).
fn vm_state_sizes(image: &Path) -> Result<Vec<(String, u64)>, String> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(image)
        .output()
        .map_err(|e| format!("qemu-img info: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("qemu-img info: {e}"))?;
    Ok(v["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["name"].as_str().unwrap_or("").to_string(),
                        s["vm-state-size"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Picks the accelerator QEMU can start with here.
fn qemu_accel(s: &Setup) -> Option<&'static str> {
    for accel in ["kvm", "tcg"] {
        if create_image(s).is_err() {
            return None;
        }
        let Ok(mut child) = spawn(Side::Qemu, s, accel) else {
            return None;
        };
        let ok = Monitor::connect(&s.sock, &mut child, &s.log)
            .and_then(|mut m| m.cmd("").map(|_| ()))
            .is_ok();
        let _ = child.kill();
        let _ = child.wait();
        if ok {
            return Some(accel);
        }
    }
    None
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Runs the vm cases.
pub fn run(h: &mut Harness) {
    if !Path::new("/dev/kvm").exists() {
        h.info("SKIPPED: no /dev/kvm");
        return;
    }
    if !harness::have("qemu-system-x86_64") || !harness::have("qemu-img") {
        h.info("SKIPPED: qemu-system-x86_64 / qemu-img not installed");
        return;
    }
    let mib: u64 = std::env::var("VMSNAP_BENCH_VM_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let mut s = Setup {
        ram_file: h.path(&format!("ram-{mib}m")),
        ram_bytes: mib << 20,
        image: h.path("vm.qcow2"),
        sock: h.path("vm.sock"),
        log: h.path("vm.log"),
        qemu_accel: "kvm",
    };
    if let Err(e) = harness::random_file(&s.ram_file, s.ram_bytes, 0x5eed_0007) {
        h.info(&format!("SKIPPED: cannot write the RAM file: {e}"));
        return;
    }
    match qemu_accel(&s) {
        Some(a) => s.qemu_accel = a,
        None => {
            h.info("SKIPPED: qemu-system-x86_64 starts neither with kvm nor with tcg");
            return;
        }
    }
    h.info(&format!(
        "guest RAM {mib} MiB of random bytes (QEMU -accel {}; vmsnap: counter guest loaded on top)",
        s.qemu_accel
    ));
    let mut times: [Vec<RunTimes>; 2] = [Vec::new(), Vec::new()];
    let mut sizes: [Vec<(String, u64)>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..h.runs {
        for (i, side) in [Side::Vmsnap, Side::Qemu].into_iter().enumerate() {
            match one_run(side, &s) {
                Ok(t) => times[i].push(t),
                Err(e) => {
                    println!("vm: {side:?} failed: {e}");
                    return;
                }
            }
            sizes[i] = vm_state_sizes(&s.image).unwrap_or_default();
        }
    }
    let size_of = |i: usize, name: &str| {
        sizes[i]
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .unwrap_or(0)
    };
    type Pick = fn(&RunTimes) -> Duration;
    let cases: [(&str, Pick, Option<&str>); 4] = [
        (
            "savevm 2 GiB random RAM, fresh qcow2",
            |t| t.save_fresh,
            Some("s1"),
        ),
        (
            "savevm, deleted snapshot's space reused",
            |t| t.save_reuse,
            Some("s2"),
        ),
        ("loadvm (first)", |t| t.load_first, None),
        ("loadvm (repeated)", |t| t.load_again, None),
    ];
    // s1 was deleted; its size is that of s2 (same RAM, same devices).
    let state_v = size_of(0, "s2");
    let state_q = size_of(1, "s2");
    for (name, pick, saved) in cases {
        let v = median(times[0].iter().map(pick).collect());
        let q = median(times[1].iter().map(pick).collect());
        let name = name.replace("2 GiB", &format!("{} MiB", mib));
        let mut note = match saved {
            Some(_) => {
                let gibs = state_v as f64 / v.as_secs_f64() / 1073741824.0;
                let of_seq = if h.seq_write_bps > 0.0 {
                    format!(
                        ", {:.0} % of seq write",
                        100.0 * state_v as f64 / v.as_secs_f64() / h.seq_write_bps
                    )
                } else {
                    String::new()
                };
                format!(
                    "state {:.1} MiB (qemu {:.1} MiB), {gibs:.2} GiB/s{of_seq}",
                    state_v as f64 / 1048576.0,
                    state_q as f64 / 1048576.0
                )
            }
            None => format!(
                "{:.2} GiB/s",
                state_v as f64 / v.as_secs_f64() / 1073741824.0
            ),
        };
        note.push_str("; target ratio <= 0.25");
        h.record(Row {
            name,
            vmsnap: Sample::from(v),
            qemu: Some(Sample::from(q)),
            note,
        });
        if saved.is_some() && h.seq_write_bps > 0.0 && !q.is_zero() {
            // Random RAM does not compress and both sides flush. The limit writes first and
            // syncs after; vmsnap has the image synced while the state is still being
            // written, so it can beat that figure (a machine whose flushes reach a disk
            // rather than a host cache would bound both at the device's rate).
            let seq = state_v as f64 / h.seq_write_bps;
            h.info(&format!(
                "writing this state then syncing it, at the measured limit: {seq:.3} s \
                 (ratio {:.3} against this QEMU time); vmsnap overlaps the two",
                seq / q.as_secs_f64()
            ));
        }
    }
    h.info(
        "QEMU maps the RAM file privately, so its first loadvm also pays a copy-on-write \
         fault per page; vmsnap read the file in at start-up",
    );
}
