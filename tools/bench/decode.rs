//! Benchmark (not a test): writes a migration stream with `VMSNAP_BENCH_MIB` MiB of RAM
//! (default 1280, giving a stream of about 1.1 GiB) through `save_state`, then decodes it with the inspector's analysis and prints
//! the throughput. With QEMU's analyze-migration.py present (`VMSNAP_ANALYZE_MIGRATION`, default
//! `oracle/analyze-migration.py` beside the project) it times that script on the same file too.
//!
//! Run: `cargo bench --bench decode`.
//!
//! Measured on the shared 2-core build machine (2026-11-22), stream of 1 177 068 423 bytes
//! (1280 MiB RAM, 1 page in 8 zero), two runs: encode 371–372 MiB/s; vmsnap decode reading
//! every byte 548–1252 MiB/s (2.05 / 0.90 s) with a peak RSS of 2.4 MB; analyze-migration.py
//! --dump state on the same file 238–395 MiB/s (4.71 / 2.84 s): 2.3–3.2×. Since then the
//! inspector binary maps the file in 8 MiB windows and seeks over page bodies: 0.12–0.16 s on
//! an idle machine, 0.3–0.4 s with the other helpers' builds running (peak RSS 11 MB); the
//! harness case `cargo bench --bench perf -- inspect` measures it against the script.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use vmsnap::migration::analyze::{analyze, AnalyzeOptions};
use vmsnap::migration::savevm::{save_state, DeviceState, Registry};
use vmsnap::migration::{Count, Field, VMStateDescription, Value};

#[path = "synthetic_ram.rs"]
mod synthetic_ram;
use synthetic_ram::SyntheticRam;

struct Regs(Value);

impl DeviceState for Regs {
    fn save(&self) -> Value {
        self.0.clone()
    }
    fn load(&mut self, v: &Value, _: u32) -> Result<(), String> {
        self.0 = v.clone();
        Ok(())
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it,
    // and then a small smoke run is enough.
    let full = std::env::args().any(|a| a == "--bench");
    let mib: u64 = std::env::var("VMSNAP_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 1280 } else { 8 });
    if !full {
        println!("smoke run with {mib} MiB (use `cargo bench --bench decode` for the figure)");
    }
    let dir = std::env::temp_dir().join(format!("vmsnap-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create bench dir");
    let path: PathBuf = dir.join("stream.bin");

    let vmsd = Arc::new(
        VMStateDescription::new("regs", 1, 1).field(Field::uint("r", 8).count(Count::Fixed(64))),
    );
    let mut regs = Regs(Value::structure([(
        "r",
        Value::Array((0..64).map(Value::u64).collect()),
    )]));
    let mut ram = SyntheticRam::new(mib << 20);
    let t = Instant::now();
    let len = {
        let mut reg = Registry::new("bench");
        reg.register_iterative("ram", 0, 4, &mut ram);
        reg.register_device("regs", 0, vmsd, &mut regs);
        let mut out = BufWriter::new(File::create(&path).expect("create stream"));
        let len = save_state(&mut reg, &mut out).expect("save_state");
        out.flush().expect("flush");
        len
    };
    let secs = t.elapsed().as_secs_f64();
    println!(
        "encode: {len} bytes in {secs:.2} s = {:.0} MiB/s",
        len as f64 / secs / 1048576.0
    );

    let t = Instant::now();
    let a = analyze(File::open(&path).expect("open"), &AnalyzeOptions::default()).expect("analyze");
    let secs = t.elapsed().as_secs_f64();
    assert!(a.error.is_none(), "{:?}", a.error);
    println!(
        "vmsnap library decode, reading every byte: {len} bytes in {secs:.2} s = {:.0} MiB/s",
        len as f64 / secs / 1048576.0
    );
    // The inspector binary: mapped file, page bodies seeked over.
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_vmsnap-inspect"))
        .args([path.to_str().unwrap_or_default(), "--dump", "state"])
        .output()
        .expect("run vmsnap-inspect");
    let secs = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "vmsnap-inspect --dump state (mapped, seeks over pages): {secs:.2} s = {:.0} MiB/s",
        len as f64 / secs / 1048576.0
    );

    if !full {
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    // Peak resident memory of this process (encode and decode both stream).
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(l) = status.lines().find(|l| l.starts_with("VmHWM")) {
            println!("peak RSS: {}", l.trim_start_matches("VmHWM:").trim());
        }
    }
    let script = std::env::var("VMSNAP_ANALYZE_MIGRATION").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../oracle/analyze-migration.py"
        )
        .into()
    });
    if std::path::Path::new(&script).exists() {
        let t = Instant::now();
        let out = Command::new("python3")
            .args([
                &script,
                "-f",
                path.to_str().unwrap_or_default(),
                "--dump",
                "state",
            ])
            .output();
        let secs = t.elapsed().as_secs_f64();
        match out {
            Ok(o) if o.status.success() => println!(
                "analyze-migration.py --dump state: {secs:.2} s = {:.0} MiB/s",
                len as f64 / secs / 1048576.0
            ),
            Ok(o) => println!(
                "analyze-migration.py failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => println!("SKIPPED analyze-migration.py: {e}"),
        }
    } else {
        println!("SKIPPED analyze-migration.py: not found at {script}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
