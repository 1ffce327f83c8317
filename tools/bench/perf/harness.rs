#![allow(dead_code)] // parts are used by only some cases
//! What every case uses: a scratch directory, timing of closures and child processes
//! (wall time and peak RSS), alternating vmsnap/QEMU runs, medians, ratios, and the machine's
//! own limits (sequential write with fdatasync, memcpy).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The result of one measured run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// Wall time.
    pub time: Duration,
    /// Peak resident set of the measured child process in bytes (0 when not measured).
    pub max_rss: u64,
}

impl From<Duration> for Sample {
    fn from(time: Duration) -> Self {
        Sample { time, max_rss: 0 }
    }
}

/// One line of the summary.
#[derive(Debug, Clone)]
pub struct Row {
    /// Case name.
    pub name: String,
    /// Median of vmsnap's runs.
    pub vmsnap: Sample,
    /// Median of the reference's runs, when there is one.
    pub qemu: Option<Sample>,
    /// Free text (sizes, targets, throughput).
    pub note: String,
}

/// The harness: scratch space, run count, collected rows.
#[derive(Debug)]
pub struct Harness {
    /// Runs per side per case.
    pub runs: usize,
    /// Scratch directory (removed at exit).
    pub dir: PathBuf,
    rows: Vec<Row>,
    /// Sequential write bandwidth with fdatasync in bytes/s (measured by `machine_limits`).
    pub seq_write_bps: f64,
    /// memcpy bandwidth in bytes/s.
    pub memcpy_bps: f64,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `env!("CARGO_BIN_EXE_vmsnap")`.
pub fn vmsnap_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vmsnap")
}

/// `env!("CARGO_BIN_EXE_vmsnap-inspect")`.
pub fn inspect_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vmsnap-inspect")
}

/// True when `prog` can be run (found on PATH or an existing path).
pub fn have(prog: &str) -> bool {
    Command::new(prog)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Resets this process's peak RSS to its current RSS (`/proc/self/clear_refs`, value 5).
///
/// The child is spawned with vfork semantics, and Linux folds the peak RSS of the memory
/// it had before exec (ours) into the child's `ru_maxrss`: without the reset, every child
/// would report at least the harness's own peak (the 512 MiB memcpy buffers of
/// `machine_limits`).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Runs `cmd` to completion and measures wall time and the child's peak RSS (wait4).
/// Fails with the command's stderr if it exits non-zero.
pub fn run_measured(cmd: &mut Command) -> Result<Sample, String> {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    reset_peak_rss();
    let t = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("{cmd:?}: {e}"))?;
    let mut stderr = child.stderr.take();
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value for the out-parameter of wait4.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let mut err = String::new();
    if let Some(s) = stderr.as_mut() {
        use std::io::Read;
        let _ = s.read_to_string(&mut err);
    }
    // SAFETY: pid is our own child, not yet reaped; status and ru are valid out-pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let time = t.elapsed();
    if r != pid {
        return Err(format!(
            "wait4 {cmd:?}: {}",
            std::io::Error::last_os_error()
        ));
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!("{cmd:?} failed ({status:#x}): {}", err.trim()));
    }
    Ok(Sample {
        time,
        max_rss: (ru.ru_maxrss as u64) * 1024,
    })
}

fn median(mut v: Vec<Sample>) -> Sample {
    v.sort_by_key(|s| s.time);
    let m = v[v.len() / 2];
    Sample {
        time: m.time,
        max_rss: v.iter().map(|s| s.max_rss).max().unwrap_or(0),
    }
}

impl Harness {
    /// A harness with a scratch directory under `VMSNAP_BENCH_DIR` (default: the system temp
    /// directory). Large files go there: it needs a few GiB free.
    pub fn new(runs: usize) -> std::io::Result<Harness> {
        let base = std::env::var_os("VMSNAP_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("vmsnap-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Harness {
            runs,
            dir,
            rows: Vec::new(),
            seq_write_bps: 0.0,
            memcpy_bps: 0.0,
        })
    }

    /// A path in the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Runs `vmsnap` and `qemu` alternately `runs` times each (after `setup` before every
    /// single run, untimed) and records the medians and their ratio.
    pub fn compare(
        &mut self,
        name: &str,
        setup: &mut dyn FnMut() -> Result<(), String>,
        vmsnap: &mut dyn FnMut() -> Result<Sample, String>,
        qemu: &mut dyn FnMut() -> Result<Sample, String>,
        note: &str,
    ) {
        let mut a = Vec::new();
        let mut b = Vec::new();
        for _ in 0..self.runs {
            for (side, out) in [(0, &mut a), (1, &mut b)] {
                let r = setup().and_then(|_| if side == 0 { vmsnap() } else { qemu() });
                match r {
                    Ok(s) => out.push(s),
                    Err(e) => {
                        let who = if side == 0 { "vmsnap" } else { "qemu" };
                        println!("{name}: {who} failed: {e}");
                        return;
                    }
                }
            }
        }
        self.record(Row {
            name: name.to_string(),
            vmsnap: median(a),
            qemu: Some(median(b)),
            note: note.to_string(),
        });
    }

    /// Runs `f` `runs` times (after `setup`, untimed) and records the median; no reference.
    pub fn measure(
        &mut self,
        name: &str,
        setup: &mut dyn FnMut() -> Result<(), String>,
        f: &mut dyn FnMut() -> Result<Sample, String>,
        note: &str,
    ) {
        let mut a = Vec::new();
        for _ in 0..self.runs {
            match setup().and_then(|_| f()) {
                Ok(s) => a.push(s),
                Err(e) => {
                    println!("{name}: failed: {e}");
                    return;
                }
            }
        }
        self.record(Row {
            name: name.to_string(),
            vmsnap: median(a),
            qemu: None,
            note: note.to_string(),
        });
    }

    /// Records a row measured by the case itself (e.g. migration downtime).
    pub fn record(&mut self, row: Row) {
        println!("{}", format_row(&row));
        self.rows.push(row);
    }

    /// Prints a free-form line and keeps it out of the summary.
    pub fn info(&self, text: &str) {
        println!("  {text}");
    }

    /// Measures sequential write with fdatasync (1 GiB in 8 MiB writes, into the scratch
    /// directory) and memcpy (256 MiB, 4 times); records both.
    pub fn machine_limits(&mut self) {
        println!("== limits ==");
        let size: usize = std::env::var("VMSNAP_BENCH_SEQ_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1024)
            << 20;
        let chunk = vec![0x5au8; 8 << 20];
        let path = self.path("seqwrite");
        let mut best = Vec::new();
        for _ in 0..self.runs {
            let r = (|| -> std::io::Result<Duration> {
                let mut f = File::create(&path)?;
                let t = Instant::now();
                let mut done = 0;
                while done < size {
                    f.write_all(&chunk)?;
                    done += chunk.len();
                }
                f.sync_data()?;
                Ok(t.elapsed())
            })();
            let _ = std::fs::remove_file(&path);
            match r {
                Ok(d) => best.push(Sample::from(d)),
                Err(e) => println!("seq write failed: {e}"),
            }
        }
        if !best.is_empty() {
            let m = median(best);
            self.seq_write_bps = size as f64 / m.time.as_secs_f64();
            self.record(Row {
                name: "limit: sequential write + fdatasync".into(),
                vmsnap: m,
                qemu: None,
                note: format!(
                    "{:.0} MiB/s ({} MiB)",
                    self.seq_write_bps / 1048576.0,
                    size >> 20
                ),
            });
        }
        let src = vec![0xa5u8; 256 << 20];
        let mut dst = vec![0u8; 256 << 20];
        dst.copy_from_slice(&src);
        let t = Instant::now();
        for _ in 0..4 {
            dst.copy_from_slice(std::hint::black_box(&src));
        }
        let d = t.elapsed();
        std::hint::black_box(&dst);
        self.memcpy_bps = (4 * src.len()) as f64 / d.as_secs_f64();
        self.record(Row {
            name: "limit: memcpy".into(),
            vmsnap: Sample::from(d / 4),
            qemu: None,
            note: format!("{:.0} MiB/s", self.memcpy_bps / 1048576.0),
        });
    }

    /// Prints every recorded row again as the final table.
    pub fn print_summary(&self) {
        println!(
            "\n== summary (medians of {} runs; ratio = vmsnap / qemu) ==",
            self.runs
        );
        for r in &self.rows {
            println!("{}", format_row(r));
        }
    }
}

fn fmt_rss(b: u64) -> String {
    if b == 0 {
        String::new()
    } else {
        format!(" rss {:.1} MiB", b as f64 / 1048576.0)
    }
}

/// One summary line: name, vmsnap median, QEMU median, ratio, note.
pub fn format_row(r: &Row) -> String {
    let v = format!(
        "{:>9.3} s{}",
        r.vmsnap.time.as_secs_f64(),
        fmt_rss(r.vmsnap.max_rss)
    );
    match r.qemu {
        Some(q) => format!(
            "{:<44} vmsnap {v}  qemu {:>9.3} s{}  ratio {:.3}  {}",
            r.name,
            q.time.as_secs_f64(),
            fmt_rss(q.max_rss),
            r.vmsnap.time.as_secs_f64() / q.time.as_secs_f64().max(1e-9),
            r.note
        ),
        None => format!("{:<44} {v}  {}", r.name, r.note),
    }
}

/// Writes `len` bytes of deterministic pseudo-random data (xorshift) to `path`, unless a
/// file of that size is already there.
pub fn random_file(path: &Path, len: u64, seed: u64) -> std::io::Result<()> {
    if std::fs::metadata(path)
        .map(|m| m.len() == len)
        .unwrap_or(false)
    {
        return Ok(());
    }
    let f = File::create(path)?;
    let mut x = seed | 1;
    let mut buf = vec![0u8; 8 << 20];
    let mut off = 0u64;
    while off < len {
        for c in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        let n = (len - off).min(buf.len() as u64) as usize;
        f.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    f.sync_data()
}

/// Copies `src` to `dst` keeping holes (`cp --sparse=always`, reflinked where the file system
/// can) and syncs the copy, so that a measured run does not pay for writing it back.
pub fn copy_synced(src: &Path, dst: &Path) -> Result<(), String> {
    let _ = std::fs::remove_file(dst);
    let out = Command::new("cp")
        .args(["--reflink=auto", "--sparse=always"])
        .arg(src)
        .arg(dst)
        .output()
        .map_err(|e| format!("cp: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cp {} {}: {}",
            src.display(),
            dst.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    File::open(dst)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("sync {}: {e}", dst.display()))
}
