//! Benchmark cases: live migration (issue 5, done-means 6). A 1 GiB guest dirtying 0, 50 and
//! 200 MiB/s migrates over tcp loopback, source → destination on this machine; the rows give
//! total time and downtime as each side's `info migrate` / `query-migrate` reports them.
//!
//! How the two sides run: tools/bench/perf/migrate_run.rs. Both sides run uncapped
//! (`max-bandwidth` 100 GiB/s) with their default downtime limit; an extra row shows QEMU and
//! vmsnap under QEMU's default 128 MiB/s cap at 200 MiB/s, and one more the same with
//! postcopy (`postcopy-ram` on both sides, `migrate_start_postcopy` a second into the
//! migration): there pre-copy cannot converge, and postcopy's downtime is the figure.
//!
//! QEMU runs TCG because it cannot boot our guest and kvm_pvm emulates guest kernel mode
//! (where that guest's loop runs, and SeaBIOS before it) too slowly: with `-accel kvm` QEMU is
//! still in SeaBIOS after 3 s. Whether both guests then do the same work is measured, not
//! assumed: before each migration each source runs its own `calc_dirty_rate 1` (QEMU's
//! page-sampling method, which vmsnap implements too), and the note column gives both
//! figures. (The sources' `dirty pages rate` in `info migrate` cannot serve: it is computed
//! over periods of a second or more, which these migrations end before.)

use std::time::Duration;

use crate::harness::{Harness, Row, Sample};
use crate::migrate_run::{alternate, median, qemu_guest, Outcome, Runs, Setup};

const MEM: &str = "1G";
const RATES: [u64; 3] = [0, 50, 200];
/// Give up on a migration that has not completed after this long (then cancel it).
const GIVE_UP: Duration = Duration::from_secs(30);
/// "Uncapped": far above what loopback carries.
const UNCAPPED_MIB: u64 = 100 << 10;

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
        measure_rate: rate > 0,
    }
}

/// Runs the migrate cases.
pub fn run(h: &mut Harness) {
    let guest = qemu_guest(h);
    let guest = guest.as_deref();
    for rate in RATES {
        let (v, q) = alternate(h, guest, &setup(rate, Some(UNCAPPED_MIB), false));
        record(h, &format!("migrate 1G dirty {rate} MiB/s uncapped"), v, q);
    }
    // The same work under one downtime bound: QEMU stops as soon as the remainder fits its
    // 300 ms default (51-143 ms of downtime at 200 MiB/s here), vmsnap keeps going until it
    // fits a few ms; with `downtime-limit 30` on both, both must reach <= 30 ms.
    let s = Setup {
        downtime_ms: Some(30),
        ..setup(200, Some(UNCAPPED_MIB), false)
    };
    let (v, q) = alternate(h, guest, &s);
    record(
        h,
        "migrate 1G dirty 200 MiB/s uncapped downtime-limit 30",
        v,
        q,
    );
    // QEMU's default bandwidth cap (128 MiB/s) at the highest rate: pre-copy alone converges
    // on neither side; postcopy finishes.
    for postcopy in [false, true] {
        let (v, q) = alternate(h, guest, &setup(200, Some(128), postcopy));
        let name = "migrate 1G dirty 200 MiB/s cap 128 MiB/s";
        let name = if postcopy {
            format!("{name} postcopy")
        } else {
            name.to_string()
        };
        record(h, &name, v, q);
    }
}

/// The guest's dirty rate as `calc_dirty_rate` measured it before the migration.
fn rate(o: &Outcome) -> String {
    o.measured_rate.map_or("-".into(), |r| format!("{r} MiB/s"))
}

/// Records a total-time row and a downtime row from the runs of both sides.
fn record(h: &mut Harness, name: &str, v: Runs, q: Runs) {
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
                 measured dirty rate {}",
                completed(&q),
                qo.total.as_millis(),
                qo.downtime.as_millis(),
                qo.syncs,
                rate(&qo)
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
             measured dirty rate vmsnap {} qemu {}",
            completed(&v),
            completed(&q),
            vo.syncs,
            qo.syncs,
            rate(&vo),
            rate(&qo)
        ),
        None => format!(
            "completed vmsnap {} (median of those); syncs {}, measured dirty rate {}; \
             qemu: completed {}",
            completed(&v),
            vo.syncs,
            rate(&vo),
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
