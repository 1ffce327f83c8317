//! Benchmark case: save — `save FILE` (a checkpoint file) of a guest whose RAM (2 GiB of
//! random bytes by default, `VMSNAP_BENCH_VM_MIB`) comes from a file, against vmsnap's own
//! `savevm` into qcow2 in the same process, QEMU's `savevm` of the same RAM, and the machine's
//! sequential write limit measured in the same run.
//!
//! ```text
//!  per run, one vmsnap process:  savevm s1 (fresh qcow2)  →  save FILE (the process exits)
//!  per run, one QEMU process:    savevm t
//! ```
//! `save` is timed from sending the line until the monitor closes: the file is written,
//! fsynced and renamed by then.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{self, Harness, Row, Sample};
use crate::vm_cases::{qemu_savevm_time, Monitor};

/// One vmsnap process: (savevm time, save time, checkpoint bytes).
fn one_run(h: &Harness, ram_file: &Path, mib: u64) -> Result<(Duration, Duration, u64), String> {
    let image = h.path("save.qcow2");
    let sock = h.path("save.sock");
    let log = h.path("save.log");
    let file = h.path("save.ckpt");
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(&sock);
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("1G")
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Err("qemu-img create failed".into());
    }
    let logf = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let mut child = Command::new(harness::vmsnap_bin())
        .arg("run")
        .arg("--drive")
        .arg(format!("file={},format=qcow2", image.display()))
        .args(["-m", &format!("{mib}M"), "--serial", "none"])
        .arg("--mem-path")
        .arg(ram_file)
        .arg("--monitor")
        .arg(format!("unix:{}", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logf)
        .spawn()
        .map_err(|e| e.to_string())?;
    let r = (|| {
        let mut m = Monitor::connect(&sock, &mut child, &log)?;
        m.cmd("")?;
        let savevm = m.timed("savevm s1")?;
        let t = Instant::now();
        m.stream
            .write_all(format!("save {}\n", file.display()).as_bytes())
            .map_err(|e| e.to_string())?;
        let mut reply = String::new();
        let _ = m.reader.read_to_string(&mut reply);
        let save = t.elapsed();
        if !reply.contains("saved") {
            return Err(format!("save: {}", reply.trim()));
        }
        let len = std::fs::metadata(&file).map_err(|e| e.to_string())?.len();
        Ok((savevm, save, len))
    })();
    let _ = child.kill();
    let _ = child.wait();
    r
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Runs the save case.
pub fn run(h: &mut Harness) {
    if !Path::new("/dev/kvm").exists() || !harness::have("qemu-img") {
        h.info("SKIPPED: needs /dev/kvm and qemu-img");
        return;
    }
    let mib: u64 = std::env::var("VMSNAP_BENCH_VM_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let ram_file = h.path(&format!("ram-{mib}m"));
    if let Err(e) = harness::random_file(&ram_file, mib << 20, 0x5eed_0007) {
        h.info(&format!("SKIPPED: cannot write the RAM file: {e}"));
        return;
    }
    let (mut saves, mut savevms, mut qemus) = (Vec::new(), Vec::new(), Vec::new());
    let mut len = 0;
    for _ in 0..h.runs {
        match one_run(h, &ram_file, mib) {
            Ok((sv, s, l)) => {
                savevms.push(sv);
                saves.push(s);
                len = l;
            }
            Err(e) => {
                println!("save: vmsnap failed: {e}");
                return;
            }
        }
        if harness::have("qemu-system-x86_64") {
            match qemu_savevm_time(h, &ram_file, mib) {
                Ok(d) => qemus.push(d),
                Err(e) => h.info(&format!("QEMU savevm not measured: {e}")),
            }
        }
    }
    let (save, savevm) = (median(saves), median(savevms));
    let qemu = (!qemus.is_empty()).then(|| median(qemus));
    let rate = |d: Duration| len as f64 / d.as_secs_f64();
    let of_seq = if h.seq_write_bps > 0.0 {
        format!(
            ", {:.0} % of seq write",
            100.0 * rate(save) / h.seq_write_bps
        )
    } else {
        String::new()
    };
    h.record(Row {
        name: format!("save {mib} MiB random RAM (checkpoint file) vs QEMU savevm"),
        vmsnap: Sample::from(save),
        qemu: qemu.map(Sample::from),
        note: format!(
            "file {:.1} MiB, {:.2} GiB/s{of_seq}; vmsnap savevm into qcow2 {:.3} s",
            len as f64 / 1048576.0,
            rate(save) / 1073741824.0,
            savevm.as_secs_f64()
        ),
    });
}
