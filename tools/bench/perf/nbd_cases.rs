//! Benchmark cases: nbd — savevm, loadvm and offline `snapshot -c` with the qcow2 image on an
//! NBD export (`qemu-nbd -f raw --shared=8` serving the qcow2 file, over a Unix socket and
//! over tcp on loopback) next to the same work on the local file. Target: each NBD figure at least 0.8×
//! the local one (local time / NBD time ≥ 0.8).
//!
//! ```text
//!  per run and target (file, nbd+unix, nbd tcp), one process:
//!      savevm s1      (fresh qcow2 in a pre-sized export)
//!      loadvm s1      lazy: the monitor's answer comes at the resume;
//!                     `info loadvm` total time once the RAM fill is `completed`
//!      loadvm -e s1   eager: all of RAM read before the resume
//!  then, offline:  vmsnap snapshot -c d1 URI   (whole process)
//! ```
//!
//! Guest RAM: `VMSNAP_BENCH_NBD_MIB` MiB of random bytes (default 512), read in with
//! `--mem-path` as the vm cases do. Both sides flush: vmsnap's flush is `fdatasync` on the
//! file and NBD_CMD_FLUSH over NBD (the server then syncs the file).
//!
//! `VMSNAP_BENCH_NBD_SERVER=nbdkit` serves the file with nbdkit's file plugin instead
//! (several threads per export, multi-conn), for a comparison of servers.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{self, Harness, Row, Sample};
use crate::vm_cases::Monitor;

/// Where the image is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    File,
    Unix,
    Tcp,
}

impl Target {
    fn label(self) -> &'static str {
        match self {
            Target::File => "local file",
            Target::Unix => "nbd+unix",
            Target::Tcp => "nbd tcp loopback",
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Times {
    save: Duration,
    load: Duration,
    filled: Duration,
    eager: Duration,
    snap_c: Duration,
}

struct Setup {
    ram_file: PathBuf,
    mib: u64,
    image: PathBuf,
    nbd_sock: PathBuf,
    mon: PathBuf,
    log: PathBuf,
}

/// A running qemu-nbd; killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(10809)
}

/// A fresh 1 GiB qcow2 in a file sized to hold two states; served when `t` is NBD.
fn prepare(t: Target, s: &Setup) -> Result<(String, Option<Server>), String> {
    let _ = std::fs::remove_file(&s.image);
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&s.image)
        .arg("1G")
        .output()
        .map_err(|e| format!("qemu-img create: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let export = (2 * s.mib + 256) << 20;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&s.image)
        .and_then(|f| f.set_len(export))
        .map_err(|e| format!("sizing the export: {e}"))?;
    let nbdkit = server_name() == "nbdkit";
    let mut c = Command::new(server_name());
    if nbdkit {
        // Its file plugin serves requests from a pool of threads and advertises multi-conn.
        c.args(["--foreground", "--exit-with-parent"]);
    } else {
        // Eight clients at once, as a store serving several hosts would: qemu-nbd then
        // advertises multi-conn, and vmsnap uses up to four connections (formats/nbd.md).
        c.args(["-f", "raw", "-t", "--shared=8"]);
    }
    let (uri, probe): (String, Box<dyn Fn() -> bool>) = match t {
        Target::File => return Ok((s.image.display().to_string(), None)),
        Target::Unix => {
            let _ = std::fs::remove_file(&s.nbd_sock);
            c.arg(if nbdkit { "-U" } else { "-k" }).arg(&s.nbd_sock);
            let sock = s.nbd_sock.clone();
            (
                format!("nbd+unix:///?socket={}", s.nbd_sock.display()),
                Box::new(move || std::os::unix::net::UnixStream::connect(&sock).is_ok()),
            )
        }
        Target::Tcp => {
            let port = free_port();
            let addr = if nbdkit { "-i" } else { "-b" };
            c.args([addr, "127.0.0.1", "-p", &port.to_string()]);
            (
                format!("nbd://127.0.0.1:{port}/"),
                Box::new(move || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()),
            )
        }
    };
    if nbdkit {
        c.arg("file");
    }
    let child = c
        .arg(&s.image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", server_name()))?;
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !probe() {
        if Instant::now() > deadline {
            return Err(format!("{} did not come up", server_name()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((uri, Some(server)))
}

/// The NBD server the cases start: `qemu-nbd`, or `nbdkit` when asked for.
fn server_name() -> &'static str {
    match std::env::var("VMSNAP_BENCH_NBD_SERVER").as_deref() {
        Ok("nbdkit") => "nbdkit",
        _ => "qemu-nbd",
    }
}

fn one_run(t: Target, s: &Setup) -> Result<Times, String> {
    let (uri, _server) = prepare(t, s)?;
    let _ = std::fs::remove_file(&s.mon);
    let log = std::fs::File::create(&s.log).map_err(|e| e.to_string())?;
    let mut child = Command::new(harness::vmsnap_bin())
        .arg("run")
        .arg("--drive")
        .arg(format!("file={uri},format=qcow2"))
        .args(["-m", &format!("{}M", s.mib), "--serial", "none"])
        .arg("--mem-path")
        .arg(&s.ram_file)
        .arg("--monitor")
        .arg(format!("unix:{}", s.mon.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("vmsnap run: {e}"))?;
    let r = (|| {
        let mut m = Monitor::connect(&s.mon, &mut child, &s.log)?;
        m.cmd("")?;
        let save = m.timed("savevm s1")?;
        let load = m.timed("loadvm s1")?;
        let filled = lazy_fill_time(&mut m)?;
        let eager = m.timed("loadvm -e s1")?;
        let _ = m.stream.write_all(b"quit\n");
        Ok::<_, String>((save, load, filled, eager))
    })();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(child.try_wait(), Ok(Some(_))) {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (save, load, filled, eager) = r?;
    let t0 = Instant::now();
    let out = Command::new(harness::vmsnap_bin())
        .args(["snapshot", "-c", "d1", &uri])
        .output()
        .map_err(|e| format!("snapshot -c: {e}"))?;
    let snap_c = t0.elapsed();
    if !out.status.success() {
        return Err(format!(
            "snapshot -c: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(Times {
        save,
        load,
        filled,
        eager,
        snap_c,
    })
}

/// Waits for the lazy loadvm's RAM fill to complete; its `info loadvm` total time.
fn lazy_fill_time(m: &mut Monitor) -> Result<Duration, String> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let info = loop {
        let (out, _) = m.cmd("info loadvm")?;
        if !out.contains("status: active") {
            break out;
        }
        if Instant::now() > deadline {
            return Err(format!("lazy fill still active: {out}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if !info.contains("status: completed") || !info.contains("mode: lazy") {
        return Err(format!("info loadvm: {info}"));
    }
    info.lines()
        .find_map(|l| l.strip_prefix("total time:"))
        .and_then(|v| v.trim().trim_end_matches(" ms").parse::<f64>().ok())
        .map(|v| Duration::from_secs_f64(v / 1000.0))
        .ok_or_else(|| format!("no total time in {info}"))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Runs the nbd cases.
pub fn run(h: &mut Harness) {
    if !Path::new("/dev/kvm").exists() {
        h.info("SKIPPED: no /dev/kvm");
        return;
    }
    if !harness::have("qemu-img") || !harness::have(server_name()) {
        h.info(&format!(
            "SKIPPED: qemu-img / {} not installed",
            server_name()
        ));
        return;
    }
    let mib: u64 = std::env::var("VMSNAP_BENCH_NBD_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let s = Setup {
        ram_file: h.path(&format!("nbd-ram-{mib}m")),
        mib,
        image: h.path("nbd.qcow2"),
        nbd_sock: h.path("nbd.sock"),
        mon: h.path("nbd-mon.sock"),
        log: h.path("nbd.log"),
    };
    if let Err(e) = harness::random_file(&s.ram_file, mib << 20, 0x5eed_0017) {
        h.info(&format!("SKIPPED: cannot write the RAM file: {e}"));
        return;
    }
    h.info(&format!(
        "guest RAM {mib} MiB of random bytes; qcow2 in a {} MiB export served by {}",
        2 * mib + 256,
        server_name()
    ));
    let targets = [Target::File, Target::Unix, Target::Tcp];
    let mut times: Vec<Vec<Times>> = vec![Vec::new(); targets.len()];
    for _ in 0..h.runs {
        for (i, t) in targets.into_iter().enumerate() {
            match one_run(t, &s) {
                Ok(x) => times[i].push(x),
                Err(e) => {
                    println!("nbd: {} failed: {e}", t.label());
                    return;
                }
            }
        }
    }
    type Pick = fn(&Times) -> Duration;
    let picks: [(&str, Pick); 5] = [
        ("savevm", |t| t.save),
        ("loadvm (lazy, to the resume)", |t| t.load),
        ("loadvm (lazy, RAM filled)", |t| t.filled),
        ("loadvm -e (eager)", |t| t.eager),
        ("snapshot -c (offline, whole process)", |t| t.snap_c),
    ];
    for (what, pick) in picks {
        let local = median(times[0].iter().map(pick).collect());
        for (i, t) in targets.into_iter().enumerate() {
            let m = median(times[i].iter().map(pick).collect());
            let note = if t == Target::File {
                String::from("reference")
            } else {
                format!(
                    "local/nbd {:.2} (target >= 0.8)",
                    local.as_secs_f64() / m.as_secs_f64().max(1e-9)
                )
            };
            let server = match (t, server_name()) {
                (Target::File, _) | (_, "qemu-nbd") => String::new(),
                (_, other) => format!(" ({other})"),
            };
            h.record(Row {
                name: format!("nbd: {what} {mib} MiB, {}{server}", t.label()),
                vmsnap: Sample::from(m),
                qemu: None,
                note,
            });
        }
    }
}
