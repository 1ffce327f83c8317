//! Named kill points, for crash tests that kill the process at every phase of an operation.
//!
//! Compiled in always and inert unless the environment asks for them:
//!
//! - `VMSNAP_TEST_KILL_AT=PHASE[:N]`: the process sends itself SIGKILL the `N`th time
//!   (default the first) it reaches `PHASE`. Nothing after that point runs: no destructor, no
//!   flush, as when an operator kills a VMM or the OOM killer picks it.
//! - `VMSNAP_TEST_KILL_TRACE=FILE`: every phase reached is appended to `FILE` as a line
//!   `PHASE N` (its `N`th occurrence), so a test first traces an operation and then kills it
//!   at each phase the trace lists.
//! - `VMSNAP_TEST_KILL_FROM=PHASE`: nothing is counted, traced or killed before the process
//!   first reaches `PHASE`, and the counts start there. A test of a running VM arms at the
//!   operation's first step, so that the guest's own writes before it (whose number depends
//!   on timing) do not shift the counts.
//!
//! The phases (listed in `formats/kill-points.md`): every qcow2 write before and after it goes
//! out (`qcow2:write:CATEGORY`, `qcow2:wrote:CATEGORY` with CATEGORY one of `header`,
//! `active-l1`, `l2`, `refcount-table`, `refcount-block`, `snapshot-table`, `inactive-l1`,
//! `data`; and `qcow2:write:autoclear`), every flush that reaches storage (`qcow2:flush`,
//! `qcow2:flushed`), and the named steps of the operations above the block layer
//! (`savevm:…`, `loadvm:…`, `savevm-live:…`, `loadvm-lazy:…`, `vmstate-import:…`,
//! `vmstate-export:…`, `migrate:…`, `incoming:…`).
//!
//! When neither variable is set a kill point costs one atomic load.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// What the environment asked for.
struct Config {
    /// Phase name and the occurrence (1-based) to die at.
    kill: Option<(String, u64)>,
    /// Trace file.
    trace: Option<std::fs::File>,
    /// The phase whose first occurrence starts the counts, when one was named.
    from: Option<String>,
    /// Whether the counts have started.
    armed: AtomicBool,
    /// Occurrences per phase so far.
    seen: Mutex<HashMap<String, u64>>,
}

fn config() -> Option<&'static Config> {
    static CONFIG: OnceLock<Option<Config>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let kill =
                std::env::var("VMSNAP_TEST_KILL_AT")
                    .ok()
                    .map(|v| match v.rsplit_once(':') {
                        Some((p, n)) if n.parse::<u64>().is_ok() => {
                            (p.to_owned(), n.parse().unwrap_or(1))
                        }
                        _ => (v, 1),
                    });
            let trace = std::env::var_os("VMSNAP_TEST_KILL_TRACE").and_then(|p| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .ok()
            });
            let from = std::env::var("VMSNAP_TEST_KILL_FROM").ok();
            (kill.is_some() || trace.is_some()).then(|| Config {
                kill,
                trace,
                armed: AtomicBool::new(from.is_none()),
                from,
                seen: Mutex::new(HashMap::new()),
            })
        })
        .as_ref()
}

/// Marks that the process reached `phase`: records it when tracing, and dies here with
/// SIGKILL when this is the occurrence `VMSNAP_TEST_KILL_AT` names.
pub fn at(phase: &str) {
    let Some(c) = config() else {
        return;
    };
    let n = {
        let mut seen = c.seen.lock().unwrap_or_else(|e| e.into_inner());
        // Checked under the lock, so that no thread counts a phase before the arming one.
        if !c.armed.load(Ordering::Relaxed) {
            if c.from.as_deref() != Some(phase) {
                return;
            }
            c.armed.store(true, Ordering::Relaxed);
        }
        let n = seen.entry(phase.to_owned()).or_default();
        *n += 1;
        *n
    };
    if let Some(mut f) = c.trace.as_ref() {
        // One write per line, so that concurrent threads do not interleave within a line.
        let _ = f.write_all(format!("{phase} {n}\n").as_bytes());
    }
    if c.kill.as_ref().is_some_and(|(p, k)| p == phase && *k == n) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::SIGKILL);
        // SIGKILL cannot be caught; should delivery lag, never run on past the point.
        loop {
            std::thread::park();
        }
    }
}
