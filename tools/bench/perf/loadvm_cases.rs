//! Benchmark cases: loadvm — how soon a guest saved with random RAM runs again in a new
//! process: vmsnap's lazy loadvm against its eager one and against QEMU 7.2's `-loadvm`.
//!
//! ```text
//!  once per size:  vmsnap run --mem-path RANDOM → savevm s1 → quit
//!                  qemu -S memory-backend-file RANDOM → savevm s1 → quit   (QEMU's own image)
//!  per run:        vmsnap run --loadvm s1 [--loadvm-mode eager]   t0 = spawn
//!                    start → first tick: the counter guest's first `tick` line on the serial
//!                    file (includes up to one 10 ms timer period after the resume)
//!                    restore: `info loadvm` time to resume (loadvm's start to the resume)
//!                    fill: `info loadvm` total time once `completed`
//!                  qemu -loadvm s1                                t0 = spawn
//!                    start → running: first `info status` answer saying running
//! ```
//!
//! Process start plus KVM set-up is start → first tick minus the restore. Sizes: 1 and 2 GiB
//! (`VMSNAP_BENCH_LOADVM_MIB=1024,2048,4096` to choose).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{self, Harness, Row, Sample};
use crate::vm_cases::Monitor;

struct Setup {
    mib: u64,
    ram_file: PathBuf,
    image: PathBuf,
    qemu_image: PathBuf,
    serial: PathBuf,
    sock: PathBuf,
    log: PathBuf,
}

fn qemu_img_create(path: &Path) -> Result<(), String> {
    let _ = std::fs::remove_file(path);
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg("1G")
        .output()
        .map_err(|e| format!("qemu-img create: {e}"))?;
    out.status
        .success()
        .then_some(())
        .ok_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned())
}

fn spawn(mut cmd: Command, s: &Setup) -> Result<Child, String> {
    let _ = std::fs::remove_file(&s.sock);
    let log = std::fs::File::create(&s.log).map_err(|e| e.to_string())?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| e.to_string())
}

fn vmsnap(s: &Setup, extra: &[&str]) -> Command {
    let mut c = Command::new(harness::vmsnap_bin());
    c.arg("run")
        .arg("--drive")
        .arg(format!("file={},format=qcow2", s.image.display()))
        .args(["-m", &format!("{}M", s.mib)])
        .arg("--serial")
        .arg(format!("file:{}", s.serial.display()))
        .arg("--monitor")
        .arg(format!("unix:{}", s.sock.display()))
        .args(extra);
    c
}

fn qemu(s: &Setup, extra: &[&str]) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-accel", "kvm", "-m", &format!("{}M", s.mib)])
        .arg("-object")
        .arg(format!(
            "memory-backend-file,id=m,size={}M,mem-path={},share=off",
            s.mib,
            s.ram_file.display()
        ))
        .args([
            "-machine",
            "memory-backend=m",
            "-nodefaults",
            "-display",
            "none",
        ])
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=qcow2",
            s.qemu_image.display()
        ))
        .arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", s.sock.display()))
        .args(extra);
    c
}

fn finish(mut child: Child, m: Option<Monitor>) {
    if let Some(mut m) = m {
        let _ = std::io::Write::write_all(&mut m.stream, b"quit\n");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Saves `s1` on both sides (vmsnap with its counter guest, QEMU paused) from the RAM file.
fn prepare(s: &Setup) -> Result<(), String> {
    qemu_img_create(&s.image)?;
    qemu_img_create(&s.qemu_image)?;
    let ram = s.ram_file.to_str().unwrap_or_default();
    for side in [vmsnap(s, &["--mem-path", ram]), qemu(s, &["-S"])] {
        let mut child = spawn(side, s)?;
        let mut m = Monitor::connect(&s.sock, &mut child, &s.log)?;
        m.cmd("")?;
        m.timed("savevm s1")?;
        finish(child, Some(m));
    }
    // Nothing left to write back (the RAM file, QEMU's image) while the loads are timed.
    let synced = Command::new("sync")
        .status()
        .map_err(|e| format!("sync: {e}"))?;
    synced
        .success()
        .then_some(())
        .ok_or_else(|| "sync failed".to_string())
}

/// One lazy or eager load: (start → first tick, restore, fill total).
fn vmsnap_load(s: &Setup, mode: &str) -> Result<(Duration, Duration, Duration), String> {
    let _ = std::fs::remove_file(&s.serial);
    let t0 = Instant::now();
    let mut child = spawn(vmsnap(s, &["--loadvm", "s1", "--loadvm-mode", mode]), s)?;
    let first_tick = loop {
        let text = std::fs::read_to_string(&s.serial).unwrap_or_default();
        if text.contains("tick ") {
            break t0.elapsed();
        }
        if t0.elapsed() > Duration::from_secs(120) {
            finish(child, None);
            return Err("no tick".into());
        }
        std::thread::sleep(Duration::from_micros(500));
    };
    let mut m = Monitor::connect(&s.sock, &mut child, &s.log)?;
    let info = loop {
        let (out, _) = m.cmd("info loadvm")?;
        if !out.contains("status: active") {
            break out;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    finish(child, Some(m));
    if !info.contains("status: completed") || !info.contains(&format!("mode: {mode}")) {
        return Err(format!("info loadvm: {info}"));
    }
    let ms = |key: &str| -> Result<Duration, String> {
        info.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches(" ms").parse::<f64>().ok())
            .map(|v| Duration::from_secs_f64(v / 1000.0))
            .ok_or_else(|| format!("no '{key}' in {info}"))
    };
    Ok((first_tick, ms("time to resume:")?, ms("total time:")?))
}

/// QEMU: spawn with `-loadvm s1` until `info status` says running.
fn qemu_load(s: &Setup) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut child = spawn(qemu(s, &["-loadvm", "s1"]), s)?;
    let mut m = Monitor::connect(&s.sock, &mut child, &s.log)?;
    let d = loop {
        use std::io::{BufRead, Write};
        m.stream
            .write_all(b"info status\n")
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        while !line.contains("VM status") {
            line.clear();
            if m.reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Err("QEMU's monitor closed".into());
            }
        }
        if line.contains("running") {
            break t0.elapsed();
        }
        if t0.elapsed() > Duration::from_secs(120) {
            finish(child, Some(m));
            return Err("QEMU never ran".into());
        }
    };
    finish(child, Some(m));
    Ok(d)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Runs the loadvm cases.
pub fn run(h: &mut Harness) {
    if !Path::new("/dev/kvm").exists() {
        h.info("SKIPPED: no /dev/kvm");
        return;
    }
    if !harness::have("qemu-system-x86_64") || !harness::have("qemu-img") {
        h.info("SKIPPED: qemu-system-x86_64 / qemu-img not installed");
        return;
    }
    let sizes: Vec<u64> = std::env::var("VMSNAP_BENCH_LOADVM_MIB")
        .unwrap_or_else(|_| "1024,2048".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    for mib in sizes {
        let s = Setup {
            mib,
            ram_file: h.path(&format!("ram-{mib}m")),
            image: h.path("loadvm.qcow2"),
            qemu_image: h.path("loadvm-qemu.qcow2"),
            serial: h.path("loadvm-serial.txt"),
            sock: h.path("loadvm.sock"),
            log: h.path("loadvm.log"),
        };
        if let Err(e) = harness::random_file(&s.ram_file, mib << 20, 0x5eed_0007) {
            h.info(&format!("SKIPPED: cannot write the RAM file: {e}"));
            return;
        }
        if let Err(e) = prepare(&s) {
            println!("loadvm {mib} MiB: preparing failed: {e}");
            return;
        }
        let mut lazy = Vec::new();
        let mut eager = Vec::new();
        let mut q = Vec::new();
        for _ in 0..h.runs {
            let r = vmsnap_load(&s, "lazy").and_then(|l| {
                let e = vmsnap_load(&s, "eager")?;
                Ok((l, e, qemu_load(&s)?))
            });
            match r {
                Ok((l, e, qt)) => {
                    lazy.push(l);
                    eager.push(e);
                    q.push(qt);
                }
                Err(e) => {
                    println!("loadvm {mib} MiB: failed: {e}");
                    return;
                }
            }
        }
        let pick = |v: &[(Duration, Duration, Duration)],
                    f: fn(&(Duration, Duration, Duration)) -> Duration| {
            median(v.iter().map(f).collect())
        };
        let qemu_run = median(q);
        let (l_tick, l_restore, l_fill) = (
            pick(&lazy, |t| t.0),
            pick(&lazy, |t| t.1),
            pick(&lazy, |t| t.2),
        );
        let (e_tick, e_restore, e_fill) = (
            pick(&eager, |t| t.0),
            pick(&eager, |t| t.1),
            pick(&eager, |t| t.2),
        );
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        h.record(Row {
            name: format!("loadvm {mib} MiB lazy: start to first tick"),
            vmsnap: Sample::from(l_tick),
            qemu: Some(Sample::from(qemu_run)),
            note: format!(
                "restore {:.1} ms (target <= 20), process start + KVM set-up + first timer tick \
                 {:.1} ms; qemu: -loadvm to running",
                ms(l_restore),
                ms(l_tick.saturating_sub(l_restore))
            ),
        });
        h.record(Row {
            name: format!("loadvm {mib} MiB eager: start to first tick"),
            vmsnap: Sample::from(e_tick),
            qemu: Some(Sample::from(qemu_run)),
            note: format!("restore {:.1} ms; qemu: -loadvm to running", ms(e_restore)),
        });
        h.record(Row {
            name: format!("loadvm {mib} MiB: lazy fill complete vs eager load"),
            vmsnap: Sample::from(l_fill),
            qemu: None,
            note: format!(
                "eager load {:.1} ms (target: lazy fill no slower)",
                ms(e_fill)
            ),
        });
        let _ = std::fs::remove_file(&s.ram_file);
    }
}
