//! Kill-point traces (`VMSNAP_TEST_KILL_TRACE`, src/killpoint.rs) and the checks after a
//! kill, shared by the tests that SIGKILL `vmsnap run` at every phase of a live operation.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use super::{only_missing_copied, qemu_img, qemu_snapshot_ids, s};

/// One phase of a trace: its name and the occurrences (1-based, counted from the start of
/// the process, as `VMSNAP_TEST_KILL_AT` counts) seen inside the traced window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phase {
    /// `savevm-live:paused`, `qcow2:write:l2`, …
    pub name: String,
    /// First occurrence inside the window.
    pub first: u64,
    /// Last occurrence inside the window.
    pub last: u64,
}

/// The phases of trace lines `PHASE N`, in the order they first appear.
pub fn phases(lines: &str) -> Vec<Phase> {
    let mut out: Vec<Phase> = Vec::new();
    for line in lines.lines() {
        let Some((name, n)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else {
            continue;
        };
        match out.iter_mut().find(|p| p.name == name) {
            Some(p) => {
                p.first = p.first.min(n);
                p.last = p.last.max(n);
            }
            None => out.push(Phase {
                name: name.to_owned(),
                first: n,
                last: n,
            }),
        }
    }
    out
}

/// Whether the full campaign was asked for (`VMSNAP_KILL_ALL=1`).
pub fn kill_all() -> bool {
    std::env::var("VMSNAP_KILL_ALL").is_ok_and(|v| v == "1")
}

/// The `PHASE:N` kill points to try: first, middle and last occurrence of every phase
/// whose name starts with one of `named` (the operation's own steps), and first and last of
/// the qcow2 phases listed in `qcow2`. With `VMSNAP_KILL_ALL=1`: first, middle and last
/// of every phase in the trace but those in `skip` (phases the running guest also reaches,
/// at moments the test does not control).
pub fn pick(trace: &[Phase], named: &[&str], qcow2: &[&str], skip: &[&str]) -> Vec<String> {
    let all = kill_all();
    let mut out = Vec::new();
    for p in trace {
        let own = named.iter().any(|n| p.name.starts_with(n));
        let ns = if all && !skip.contains(&p.name.as_str()) || own {
            vec![p.first, p.first + (p.last - p.first) / 2, p.last]
        } else if qcow2.contains(&p.name.as_str()) {
            vec![p.first, p.last]
        } else {
            continue;
        };
        let mut ns = ns;
        ns.dedup();
        out.extend(ns.into_iter().map(|n| format!("{}:{n}", p.name)));
    }
    out
}

/// A trace file being written by a running process: the window between two marks.
pub struct Trace {
    path: std::path::PathBuf,
    from: usize,
}

impl Trace {
    /// Marks the current end of the trace at `path` (it may not exist yet).
    pub fn mark(path: &Path) -> Trace {
        Trace {
            path: path.to_path_buf(),
            from: std::fs::read(path).map(|b| b.len()).unwrap_or(0),
        }
    }

    /// The lines written since the mark.
    pub fn since(&self) -> String {
        let b = std::fs::read(&self.path).unwrap_or_default();
        String::from_utf8_lossy(b.get(self.from..).unwrap_or_default()).into_owned()
    }
}

/// How a kill run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    /// The process died (of SIGKILL: asserted).
    Killed,
    /// The operation ended having reached the phase only this many times, fewer than the
    /// kill point's `N`: it took a shorter path than the traced run (fewer pre-copy rounds,
    /// the guest's disk write elsewhere).
    Missed(u64),
}

/// How often `phase` occurs in the trace file `trace`.
pub fn count(trace: &Path, phase: &str) -> u64 {
    let text = std::fs::read_to_string(trace).unwrap_or_default();
    phases(&text)
        .into_iter()
        .find(|p| p.name == phase)
        .map_or(0, |p| p.last)
}

/// Waits for a run armed with the kill point `point` (`PHASE:N`) and traced into `trace`,
/// polling `exited` for its end. Once the operation's last phase `done` is in the trace and
/// a grace period passed without the kill, the run missed it if `PHASE` came fewer than `N`
/// times; a run that reached `PHASE` `N` times or never got to `done` within `limit` fails.
pub fn await_kill(
    exited: &mut dyn FnMut() -> Option<ExitStatus>,
    trace: &Path,
    point: &str,
    done: &str,
    limit: Duration,
    what: &str,
) -> Kill {
    const GRACE: Duration = Duration::from_secs(3);
    let (phase, n) = point.rsplit_once(':').unwrap();
    let n: u64 = n.parse().unwrap();
    let start = Instant::now();
    let mut ended: Option<Instant> = None;
    loop {
        if let Some(st) = exited() {
            assert_killed(st, "", what);
            return Kill::Killed;
        }
        if ended.is_none() && count(trace, done) > 0 {
            ended = Some(Instant::now());
        }
        let seen = count(trace, phase);
        if ended.is_some_and(|t| t.elapsed() > GRACE) && seen < n {
            return Kill::Missed(seen);
        }
        assert!(
            start.elapsed() < limit,
            "{what}: still running after {limit:?}, {phase} reached {seen} times (the kill point never fired)"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed when dropped.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The process died of SIGKILL.
pub fn assert_killed(st: ExitStatus, stderr: &str, what: &str) {
    assert_eq!(
        st.signal(),
        Some(9),
        "{what}: not killed by SIGKILL ({st}): {stderr}"
    );
}

fn check_exit(prog: &str, img: &Path) -> (Option<i32>, String) {
    let o = Command::new(prog).args(["check", s(img)]).output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

/// `qemu-img check` and `vmsnap check` exit 0 or 3 (leaks allowed, no corruption); the
/// documented COPIED difference (formats/kill-points.md) is accepted when `qemu-img check -r
/// all` leaves a copy clean. Returns whether that difference was seen.
pub fn assert_sound(img: &Path, what: &str) -> bool {
    let (q, out) = check_exit("qemu-img", img);
    let copied = q == Some(2) && only_missing_copied(&out);
    if copied {
        let fixed = img.with_extension("fixed.qcow2");
        std::fs::copy(img, &fixed).unwrap();
        qemu_img(&["check", "-q", "-r", "all", s(&fixed)]);
        let (q2, out2) = check_exit("qemu-img", &fixed);
        assert_eq!(q2, Some(0), "{what}: after qemu-img check -r all:\n{out2}");
        let _ = std::fs::remove_file(&fixed);
    } else {
        assert!(
            matches!(q, Some(0 | 3)),
            "{what}: qemu-img check {q:?}\n{out}"
        );
    }
    let (v, out) = check_exit(env!("CARGO_BIN_EXE_vmsnap"), img);
    assert!(
        matches!(v, Some(0 | 3)),
        "{what}: vmsnap check {v:?}\n{out}"
    );
    copied
}

/// The snapshot names `qemu-img snapshot -l` lists, in table order.
pub fn names(img: &Path) -> Vec<String> {
    qemu_snapshot_ids(img).into_iter().map(|(_, n)| n).collect()
}

/// A table of kills made per phase, printed at the end of a campaign.
#[derive(Default)]
pub struct Tally(BTreeMap<String, u32>);

impl Tally {
    /// Counts a kill at `point` (`PHASE:N`).
    pub fn add(&mut self, point: &str) {
        let phase = point.rsplit_once(':').map_or(point, |(p, _)| p);
        *self.0.entry(phase.to_owned()).or_default() += 1;
    }

    /// Total kills.
    pub fn total(&self) -> u32 {
        self.0.values().sum()
    }

    /// `phase×n` list.
    pub fn summary(&self) -> String {
        self.0
            .iter()
            .map(|(p, n)| format!("{p}×{n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}
