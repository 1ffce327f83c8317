//! Benchmark cases: vm-live — the guest's pause during `savevm -l` (live) against plain
//! `savevm` and QEMU 7.2's `savevm`, for guests of random RAM (1, 2 and 4 GiB by default,
//! `VMSNAP_BENCH_LIVE_MIB=1024,2048`) with the counter guest dirtying 0 and 50 MiB/s.
//!
//! ```text
//!  per size, rate, mode and run:  vmsnap run -m SIZE --mem-path RANDOM --dirty-rate R
//!                                 --serial file:S    (a thread timestamps each tick line)
//!                                 wait 20 ticks → savevm [-l] t → info savevm → quit
//!  per size and run (QEMU):       qemu-system-x86_64 -m SIZE (same RAM file) -S
//!                                 savevm t           (stop-the-world: its pause is its time)
//! ```
//!
//! The guest's pause is the longest gap between consecutive `tick` lines seen on the serial
//! console from the savevm command to its answer, minus the 10 ms tick period (so a guest that
//! never stopped shows about 0); `info savevm`'s downtime is vmsnap's own figure.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::{self, Harness, Row, Sample};
use crate::vm_cases::{qemu_savevm_time, Monitor};

/// Timer tick period of the counter guest.
const TICK: Duration = Duration::from_millis(10);

/// What one vmsnap save measured.
#[derive(Debug, Clone, Copy, Default)]
struct LiveRun {
    total: Duration,
    gap: Duration,
    reported: Duration,
}

/// Timestamps of the tick lines appearing in a serial file, taken by a polling thread.
struct TickWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Instant>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TickWatch {
    fn start(path: PathBuf) -> TickWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (Arc::clone(&stop), Arc::clone(&seen));
        let thread = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut file = None;
            while !s.load(Ordering::Relaxed) {
                if file.is_none() {
                    file = std::fs::File::open(&path).ok();
                }
                if let Some(f) = file.as_mut() {
                    let before = buf.len();
                    let _ = f.read_to_end(&mut buf);
                    let lines = buf[before..].iter().filter(|&&b| b == b'\n').count();
                    if lines > 0 {
                        let now = Instant::now();
                        let mut v = v.lock().unwrap_or_else(|e| e.into_inner());
                        v.extend((0..lines).map(|_| now));
                    }
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        });
        TickWatch {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn count(&self) -> usize {
        self.seen.lock().map(|v| v.len()).unwrap_or(0)
    }

    /// Longest gap between consecutive lines within `[from, to]`, counting the gaps from
    /// `from` to the first line and from the last line to `to`.
    fn longest_gap(&self, from: Instant, to: Instant) -> Duration {
        let v = self.seen.lock().map(|v| v.clone()).unwrap_or_default();
        let mut last = from;
        let mut gap = Duration::ZERO;
        for &t in v.iter().filter(|&&t| t >= from && t <= to) {
            gap = gap.max(t - last);
            last = t;
        }
        gap.max(to.saturating_duration_since(last))
    }
}

impl Drop for TickWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn spawn_vmsnap(dir: &Path, ram_file: &Path, mib: u64, rate: u64) -> Result<Child, String> {
    let image = dir.join("live.qcow2");
    let _ = std::fs::remove_file(&image);
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("1G")
        .output()
        .map_err(|e| format!("qemu-img create: {e}"))?;
    if !out.status.success() {
        return Err("qemu-img create failed".into());
    }
    let _ = std::fs::remove_file(dir.join("live.sock"));
    let _ = std::fs::remove_file(dir.join("live-serial.txt"));
    let log = std::fs::File::create(dir.join("live.log")).map_err(|e| e.to_string())?;
    Command::new(harness::vmsnap_bin())
        .arg("run")
        .arg("--drive")
        .arg(format!("file={},format=qcow2", image.display()))
        .args(["-m", &format!("{mib}M"), "--dirty-rate", &rate.to_string()])
        .arg("--mem-path")
        .arg(ram_file)
        .arg("--serial")
        .arg(format!("file:{}", dir.join("live-serial.txt").display()))
        .arg("--monitor")
        .arg(format!("unix:{}", dir.join("live.sock").display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("vmsnap: {e}"))
}

/// `downtime: N ms` of `info savevm`.
fn reported_downtime(info: &str) -> Option<Duration> {
    let v = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("downtime: "))?;
    v.strip_suffix(" ms")?
        .parse()
        .ok()
        .map(Duration::from_millis)
}

/// One vmsnap process: boot, 20 ticks, one save, quit.
fn vmsnap_run(
    dir: &Path,
    ram_file: &Path,
    mib: u64,
    rate: u64,
    live: bool,
) -> Result<LiveRun, String> {
    let mut child = spawn_vmsnap(dir, ram_file, mib, rate)?;
    let r = (|| {
        let log = dir.join("live.log");
        let mut m = Monitor::connect(&dir.join("live.sock"), &mut child, &log)?;
        m.cmd("")?;
        let watch = TickWatch::start(dir.join("live-serial.txt"));
        let deadline = Instant::now() + Duration::from_secs(60);
        while watch.count() < 20 {
            if Instant::now() > deadline {
                return Err("the guest did not tick".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let from = Instant::now();
        let total = m.timed(if live { "savevm -l t" } else { "savevm t" })?;
        let to = Instant::now();
        // The ticks the pause held back come out right after it.
        std::thread::sleep(TICK * 3);
        let gap = watch.longest_gap(from, to).saturating_sub(TICK);
        let (info, _) = m.cmd("info savevm")?;
        let reported = reported_downtime(&info).ok_or(format!("info savevm: {info}"))?;
        let _ = m.stream_write(b"quit\n");
        Ok(LiveRun {
            total,
            gap,
            reported,
        })
    })();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(child.try_wait(), Ok(Some(_))) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    r
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// Runs the vm-live cases.
pub fn run(h: &mut Harness) {
    if !Path::new("/dev/kvm").exists() || !harness::have("qemu-img") {
        h.info("SKIPPED: vm-live needs /dev/kvm and qemu-img");
        return;
    }
    let sizes: Vec<u64> = std::env::var("VMSNAP_BENCH_LIVE_MIB")
        .unwrap_or_else(|_| "1024,2048,4096".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let dir = h.path("live");
    let _ = std::fs::create_dir_all(&dir);
    h.info("guest pause = longest gap between the counter guest's ticks during the save, less the 10 ms tick period; QEMU's savevm stops the guest for all of it");
    for mib in sizes {
        let ram_file = h.path(&format!("ram-{mib}m"));
        if let Err(e) = harness::random_file(&ram_file, mib << 20, 0x5eed_0007) {
            h.info(&format!(
                "SKIPPED {mib} MiB: cannot write the RAM file: {e}"
            ));
            continue;
        }
        let qemu: Vec<Duration> = (0..h.runs)
            .filter_map(|_| match qemu_savevm_time(h, &ram_file, mib) {
                Ok(d) => Some(d),
                Err(e) => {
                    h.info(&format!("QEMU savevm {mib} MiB failed: {e}"));
                    None
                }
            })
            .collect();
        let q = (!qemu.is_empty()).then(|| Sample::from(median(qemu)));
        for rate in [0u64, 50] {
            for live in [true, false] {
                let mut runs = Vec::new();
                for _ in 0..h.runs {
                    match vmsnap_run(&dir, &ram_file, mib, rate, live) {
                        Ok(r) => runs.push(r),
                        Err(e) => h.info(&format!("vmsnap {mib} MiB failed: {e}")),
                    }
                }
                if runs.is_empty() {
                    continue;
                }
                let gap = median(runs.iter().map(|r| r.gap).collect());
                let total = median(runs.iter().map(|r| r.total).collect());
                let reported = median(runs.iter().map(|r| r.reported).collect());
                let mode = if live { "savevm -l" } else { "savevm" };
                h.record(Row {
                    name: format!("{mode} {mib} MiB, dirty {rate} MiB/s: guest pause"),
                    vmsnap: Sample::from(gap),
                    qemu: q,
                    note: format!(
                        "info savevm downtime {}; target <= 20 ms (live)",
                        ms(reported)
                    ),
                });
                h.record(Row {
                    name: format!("{mode} {mib} MiB, dirty {rate} MiB/s: total"),
                    vmsnap: Sample::from(total),
                    qemu: q,
                    note: "target ratio <= 0.25".into(),
                });
            }
        }
        let _ = std::fs::remove_file(&ram_file);
    }
    let _ = std::io::stdout().flush();
}
