//! Benchmark case: XBZRLE (issue 15). A guest that keeps rewriting the first 10 % of the pages
//! it dirties (408 of 4096 bytes; `--dirty-span 408` for vmsnap's counter guest, `-append
//! 100,408` for QEMU's dirty.elf) migrates with the capability off and on, on each side: 256 MiB
//! of RAM dirtied at 100 MiB/s, QEMU's default 128 MiB/s cap, a 30 ms downtime limit, and an
//! XBZRLE cache as large as the RAM so that every re-sent page can be encoded. Without XBZRLE
//! every re-sent page costs 4 KiB and pre-copy converges slowly; with it a re-sent page costs
//! about the changed bytes. The rows give each side's total time; the notes the RAM bytes sent
//! and what an XBZRLE page cost, from each source's own counters.

use std::time::Duration;

use crate::harness::{Harness, Row, Sample};
use crate::migrate_run::{alternate, median, qemu_guest, Outcome, Setup};

const SPAN: u64 = 408;

fn setup(xbzrle: bool) -> Setup {
    Setup {
        mem: "256M",
        rate: 100,
        span: Some(SPAN),
        bandwidth_mib: Some(128),
        downtime_ms: Some(30),
        postcopy: false,
        xbzrle,
        xbzrle_cache_mib: xbzrle.then_some(256),
        give_up: Duration::from_secs(40),
        measure_rate: false,
    }
}

/// Runs the xbzrle cases.
pub fn run(h: &mut Harness) {
    let guest = qemu_guest(h);
    let mut sent = [[None; 2]; 2]; // [vmsnap, qemu][off, on]
    for (k, xbzrle) in [false, true].into_iter().enumerate() {
        let (v, q) = alternate(h, guest.as_deref(), &setup(xbzrle));
        let name = format!(
            "migrate 256M dirty 100 MiB/s, {SPAN} B/page, xbzrle {}",
            if xbzrle { "on" } else { "off" }
        );
        let vo = median(&name, "vmsnap", &v);
        let qo = median(&name, "qemu", &q);
        sent[0][k] = vo.map(|o| o.transferred);
        sent[1][k] = qo.map(|o| o.transferred);
        let Some(vo) = vo else {
            h.info(&format!("{name}: vmsnap completed no run"));
            continue;
        };
        h.record(Row {
            name: format!("{name}: total"),
            vmsnap: Sample::from(vo.total),
            qemu: qo.map(|o| Sample::from(o.total)),
            note: format!(
                "RAM sent vmsnap {}, qemu {}",
                describe(&vo),
                qo.as_ref().map_or("-".into(), describe)
            ),
        });
    }
    let ratio = |side: [Option<u64>; 2]| match side {
        [Some(off), Some(on)] if off > 0 => format!("{:.2}", on as f64 / off as f64),
        _ => "-".into(),
    };
    h.info(&format!(
        "xbzrle: RAM bytes sent with / without: vmsnap {}, qemu {} (target <= 0.30)",
        ratio(sent[0]),
        ratio(sent[1])
    ));
}

fn describe(o: &Outcome) -> String {
    let mut s = format!("{} MiB", o.transferred >> 20);
    if o.xbzrle_pages > 0 {
        s.push_str(&format!(
            " ({} xbzrle pages, {} B each)",
            o.xbzrle_pages,
            o.xbzrle_bytes / o.xbzrle_pages
        ));
    }
    s
}
