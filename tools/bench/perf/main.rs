//! The performance harness (issue 7, and the live-migration benchmark of issue 5): vmsnap
//! against QEMU's tools on the same work, on this machine, in the same run. Not a test: it
//! prints medians and ratios and never fails on a slow number.
//!
//! Run: `tools/scripts/bench.sh [CASE...] [--runs N]` (= `cargo bench --bench perf -- ...`).
//! Cases: `limits` (always first), `block`, `convert`, `vm`, `vm-live`, `inspect`, `migrate`, `xbzrle`,
//! `loadvm`, `nbd`, `save`; none named = all.

mod block_cases;
mod convert_cases;
mod harness;
mod inspect_cases;
mod loadvm_cases;
mod migrate_cases;
mod migrate_ctl;
mod migrate_run;
mod nbd_cases;
mod save_cases;
#[path = "../synthetic_ram.rs"]
mod synthetic_ram;
mod vm_cases;
mod vm_live_cases;
mod xbzrle_cases;

use harness::Harness;

/// A group of cases: its name and the function that measures it.
type Case = (&'static str, fn(&mut Harness));

const CASES: &[Case] = &[
    ("block", block_cases::run),
    ("convert", convert_cases::run),
    ("vm", vm_cases::run),
    ("vm-live", vm_live_cases::run),
    ("inspect", inspect_cases::run),
    ("migrate", migrate_cases::run),
    ("xbzrle", xbzrle_cases::run),
    ("loadvm", loadvm_cases::run),
    ("nbd", nbd_cases::run),
    ("save", save_cases::run),
];

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it
    // (with test-harness flags): the harness takes minutes and measures, it does not test.
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "performance harness: run it with tools/scripts/bench.sh (cargo bench --bench perf)"
        );
        return;
    }
    let mut runs = 3usize;
    let mut wanted: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bench" => {}
            "--runs" => {
                runs = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| {
                        eprintln!("--runs needs a positive number");
                        std::process::exit(2)
                    })
            }
            "-h" | "--help" => {
                println!(
                    "usage: tools/scripts/bench.sh [block|convert|vm|vm-live|inspect|migrate|xbzrle|loadvm|nbd|save ...] [--runs N]"
                );
                return;
            }
            other => wanted.push(other.to_string()),
        }
    }
    for w in &wanted {
        if w != "limits" && !CASES.iter().any(|(n, _)| n == w) {
            eprintln!("unknown case '{w}'");
            std::process::exit(2);
        }
    }
    let mut h = match Harness::new(runs) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("cannot set up the harness: {e}");
            std::process::exit(1);
        }
    };
    h.machine_limits();
    for (name, run) in CASES {
        if wanted.is_empty() || wanted.iter().any(|w| w == name) {
            println!("\n== {name} ==");
            run(&mut h);
        }
    }
    h.print_summary();
}
