//! Benchmark cases: live migration (issue 5, done-means 6). A 1 GiB guest dirtying 0, 50 and
//! 200 MiB/s migrates over tcp loopback, source → destination on this machine; the rows give
//! total time and downtime as each side's `info migrate` / `query-migrate` reports them.
//!
//! vmsnap: two `vmsnap run -m 1G --dirty-rate R` processes (the destination with
//! `--incoming tcp:…`), driven through their unix-socket monitors. QEMU 7.2: two
//! `qemu-system-x86_64 -accel tcg -m 1G` processes booting `tools/bench/guest/dirty.elf`
//! (which dirties at the same rate, per 100 Hz tick like vmsnap's counter guest), driven
//! through QMP. QEMU runs TCG because it cannot boot our guest and kvm_pvm emulates guest
//! kernel mode (where that guest's loop runs, and SeaBIOS before it) too slowly: with
//! `-accel kvm` QEMU is still in SeaBIOS after 3 s. Both sides run uncapped
//! (`max-bandwidth` 100 GiB/s) with their default downtime limit; an extra row shows QEMU and
//! vmsnap under QEMU's default 128 MiB/s cap at 200 MiB/s, and one more the same with
//! postcopy (`postcopy-ram` on both sides, `migrate_start_postcopy` [`POSTCOPY_AFTER`] into
//! the migration): there pre-copy cannot converge, and postcopy's downtime is the figure.
//!
//! The note column gives the highest dirty-page rate each source measured (200 MiB/s is
//! 51200 pages/s). Under kvm_pvm the counter guest pays for the first store to each page
//! (host allocation plus a KVM fault): during its first lap through 1 GiB (about 5 s at
//! 200 MiB/s, longer than the warm-up) it reaches only some 15000-35000 pages/s, later
//! 46000-51200 (and 51200 from the start when the RAM is backed by transparent huge pages).
//! So at 200 MiB/s vmsnap's guest dirties less than QEMU's TCG guest; the note shows by how
//! much.

use std::path::Path;
use std::time::Duration;

use crate::harness::{have, Harness, Row, Sample};
use crate::migrate_run::{guest_elf, median, migrate_qemu, migrate_vmsnap, Outcome, Setup, QEMU};

const MEM: &str = "1G";
const RATES: [u64; 3] = [0, 50, 200];
/// Give up on a migration that has not completed after this long (then cancel it).
const GIVE_UP: Duration = Duration::from_secs(30);
/// "Uncapped": far above what loopback carries.
const UNCAPPED_MIB: u64 = 100 << 10;
/// The dirty-rate probe: a migration capped this low, cancelled after [`PROBE_FOR`].
const PROBE_MIB: u64 = 32;
const PROBE_FOR: Duration = Duration::from_millis(3500);

fn setup(rate: u64, bandwidth_mib: Option<u64>, postcopy: bool) -> Setup {
    Setup {
        mem: MEM,
        rate,
        span: None,
        bandwidth_mib,
        downtime_ms: None,
        postcopy,
        xbzrle: false,
        xbzrle_cache_mib: None,
        give_up: GIVE_UP,
        probe: false,
    }
}

/// Runs the migrate cases.
pub fn run(h: &mut Harness) {
    let guest = guest_elf();
    let qemu_ok = have(QEMU) && guest.exists();
    if !qemu_ok {
        h.info("SKIPPED (QEMU side): qemu-system-x86_64 or tools/bench/guest/dirty.elf missing");
    }
    if !Path::new("/dev/kvm").exists() {
        h.info("SKIPPED (vmsnap side): /dev/kvm missing");
    }
    for rate in RATES {
        if rate > 0 {
            probe(h, &guest, qemu_ok, rate);
        }
        let mut v = Vec::new();
        let mut q = Vec::new();
        let s = setup(rate, Some(UNCAPPED_MIB), false);
        for _ in 0..h.runs {
            v.push(migrate_vmsnap(h, &s));
            if qemu_ok {
                q.push(migrate_qemu(h, &guest, &s));
            }
        }
        record(h, &format!("migrate 1G dirty {rate} MiB/s uncapped"), v, q);
    }
    // QEMU's default bandwidth cap (128 MiB/s) at the highest rate: QEMU does not converge.
    for postcopy in [false, true] {
        let s = setup(200, Some(128), postcopy);
        let v = (0..h.runs).map(|_| migrate_vmsnap(h, &s)).collect();
        let q = if qemu_ok {
            (0..h.runs).map(|_| migrate_qemu(h, &guest, &s)).collect()
        } else {
            Vec::new()
        };
        let name = "migrate 1G dirty 200 MiB/s cap 128 MiB/s";
        let name = if postcopy {
            format!("{name} postcopy")
        } else {
            name.to_string()
        };
        record(h, &name, v, q);
    }
}

/// Whether both guests really dirty at `rate`: each side's own `dirty pages rate` (computed
/// over periods of a second or more, which the uncapped migrations end before) from a
/// migration capped at [`PROBE_MIB`] and cancelled after [`PROBE_FOR`].
fn probe(h: &Harness, guest: &Path, qemu_ok: bool, rate: u64) {
    let s = Setup {
        give_up: PROBE_FOR,
        probe: true,
        ..setup(rate, Some(PROBE_MIB), false)
    };
    let show = |r: Result<Outcome, String>| match r {
        Ok(o) => format!(
            "{} pages/s ({} MiB/s)",
            o.dirty_pages_rate,
            (o.dirty_pages_rate * 4096) >> 20
        ),
        Err(e) => e,
    };
    let v = show(migrate_vmsnap(h, &s));
    let q = if qemu_ok {
        show(migrate_qemu(h, guest, &s))
    } else {
        "not run".into()
    };
    h.info(&format!(
        "dirty rate {rate} MiB/s ({} pages/s nominal), as each source measures it: \
         vmsnap {v}, qemu {q}",
        rate * 256
    ));
}

/// Records a total-time row and a downtime row from the runs of both sides.
fn record(
    h: &mut Harness,
    name: &str,
    v: Vec<Result<Outcome, String>>,
    q: Vec<Result<Outcome, String>>,
) {
    let describe = |who: &str, runs: &[Result<Outcome, String>]| median(name, who, runs);
    let completed = |runs: &[Result<Outcome, String>]| {
        format!(
            "{}/{}",
            runs.iter().filter(|r| r.is_ok()).count(),
            runs.len()
        )
    };
    let vo = describe("vmsnap", &v);
    let qo = describe("qemu", &q);
    let Some(vo) = vo else {
        if let Some(qo) = qo {
            h.info(&format!(
                "{name}: qemu only ({} completed): total {} ms, downtime {} ms, {} syncs, \
                 {} dirty pages/s",
                completed(&q),
                qo.total.as_millis(),
                qo.downtime.as_millis(),
                qo.syncs,
                qo.dirty_pages_rate
            ));
        } else {
            h.info(&format!(
                "{name}: no run completed (vmsnap {}, qemu {})",
                completed(&v),
                completed(&q)
            ));
        }
        return;
    };
    let syncs = match qo {
        Some(qo) => format!(
            "completed vmsnap {} qemu {}; syncs vmsnap {} qemu {}; \
             dirty pages/s vmsnap {} qemu {}",
            completed(&v),
            completed(&q),
            vo.syncs,
            qo.syncs,
            vo.dirty_pages_rate,
            qo.dirty_pages_rate
        ),
        None => format!(
            "completed vmsnap {} (median of those); syncs {}, dirty pages/s {}; \
             qemu: completed {}",
            completed(&v),
            vo.syncs,
            vo.dirty_pages_rate,
            completed(&q)
        ),
    };
    h.record(Row {
        name: format!("{name}: total"),
        vmsnap: Sample::from(vo.total),
        qemu: qo.map(|o| Sample::from(o.total)),
        note: syncs,
    });
    h.record(Row {
        name: format!("{name}: downtime"),
        vmsnap: Sample::from(vo.downtime),
        qemu: qo.map(|o| Sample::from(o.downtime)),
        note: "target: vmsnap <= 0.030 s".into(),
    });
}
