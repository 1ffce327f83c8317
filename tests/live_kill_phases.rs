//! SIGKILL at every phase of the live operations inside `vmsnap run` (issue 11): live savevm
//! (`savevm -l`), lazy loadvm (`loadvm` in the running VM and `--loadvm` in a fresh
//! process), eager loadvm in the running VM (`loadvm -e`) and live pre-copy migration with
//! the disk shared (the same image), to a `file:` URI (the destination started from the
//! file afterwards) and over a unix socket and tcp on loopback (both sides running), the
//! source and the destination killed in turn.
//!
//! Each operation is first run to completion with `VMSNAP_TEST_KILL_TRACE` on a copy of
//! the base image, and the kill points it passes are read from the trace (only the part
//! written while the operation ran, when it is driven through the monitor). Then, on a
//! fresh copy each time, the counter guest boots, the operation runs with
//! `VMSNAP_TEST_KILL_AT` set, and after the kill:
//!
//! - the process died of SIGKILL (a kill point that never fires fails the test);
//! - `qemu-img check` and `vmsnap check` exit 0 or 3 (leaks allowed; the documented
//!   COPIED-flag difference only if `qemu-img check -r all` then leaves it clean);
//! - `qemu-img snapshot -l` lists the snapshots before or after the operation (for savevm
//!   of a tag that exists, also without it: the old one is dropped first, as in QEMU);
//! - every snapshot's disk layer is its own (old or new, told apart by a marker region),
//!   the active layer is the old one or the loaded snapshot's, and each listed snapshot
//!   that matters loads in a fresh `vmsnap run --loadvm`: the guest prints its next tick
//!   and `CHECK OK`; in that run a `savevm -l` of the image the kill left succeeds, and
//!   the image is sound after it;
//! - over a socket, the side left goes on: a destination whose stream broke ends or quits
//!   (one that had the whole stream runs the guest), a source whose destination died runs
//!   the guest again (after `cont` once the migration had completed).
//!
//! The default run (a 16 MiB guest) kills at the first, middle and last occurrence of each
//! named step and at the first and last of a few qcow2 phases; `VMSNAP_KILL_ALL=1` kills at
//! the first, middle and last occurrence of every traced phase but the guest's data writes,
//! with a 64 MiB guest of random RAM dirtying 20 MiB/s (about 5 minutes). Some phase counts
//! depend on timing (pre-copy rounds), so the kill runs are traced too and one that passed a
//! phase fewer times than the traced run is run again (see [`Lab::kill_at`]).
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::kill_trace::{self, assert_sound, await_kill, names, Guard, Kill, Tally, Trace};
use common::run_vm::{self, assert_check, create_qcow2, kvm_and_qemu_img, RunVm};
use common::ticks::ticks_of;
use common::{qemu_io, qemu_layer, s};

/// The tests boot guests whose timing matters: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The guest of the default run: 16 MiB, not dirtying RAM beyond its own counters.
const SMALL: Guest = Guest {
    memory: "16M",
    ram: 16 << 20,
    dirty_rate: "0",
};
/// The guest of the full campaign: 64 MiB of random bytes (`--mem-path`), dirtying 20 MiB/s
/// (more pre-copy rounds, a state of 64 MiB and more).
const LARGE: Guest = Guest {
    memory: "64M",
    ram: 64 << 20,
    dirty_rate: "20",
};

/// The counter guest's shape.
#[derive(Debug, Clone, Copy)]
struct Guest {
    memory: &'static str,
    ram: usize,
    /// `--dirty-rate` in MiB/s.
    dirty_rate: &'static str,
}
/// The disk region (1 MiB + 64 KiB) each layer marks with its own byte; the counter guest
/// writes sector 1 only.
const MARK_AT: usize = 1 << 20;
const MARK_LEN: usize = 64 << 10;
/// Longest a kill run may take to reach its kill point.
const KILL_LIMIT: Duration = Duration::from_secs(30);
/// Ticks the guest runs before the operation starts.
const WARM: u64 = 8;

/// Metadata and flush phases worth killing at in the default run (when traced).
const QCOW2: &[&str] = &[
    "qcow2:write:snapshot-table",
    "qcow2:write:header",
    "qcow2:write:inactive-l1",
    "qcow2:write:active-l1",
    "qcow2:write:refcount-block",
    "qcow2:write:l2",
    "qcow2:flush",
];
/// Phases the running guest reaches too, at moments the test does not control (its disk
/// writes): never killed at.
const GUEST: &[&str] = &["qcow2:write:data", "qcow2:wrote:data"];

/// A work directory with the base image and a counter for run numbers (monitor sockets and
/// serial files are per run).
struct Lab {
    dir: tempfile::TempDir,
    guest: Guest,
    /// The RAM file of the large guest.
    mem_path: Option<PathBuf>,
    base: PathBuf,
    run: u32,
    tally: Tally,
    copied: u32,
    /// Kill runs that took a shorter path than the trace and were run again.
    missed: u32,
    /// The other side of a migration during a kill run.
    peer: Option<RunVm>,
    /// The phase the counts of traced and kill runs start at (`VMSNAP_TEST_KILL_FROM`).
    arm: Option<&'static str>,
}

/// Env pairs for a run.
type Env<'a> = [(&'a str, &'a str)];
/// Polls a kill run for its end (the run is killed when this is dropped).
type Poll = Box<dyn FnMut() -> Option<ExitStatus>>;

impl Lab {
    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn next_run(&mut self) -> u32 {
        self.run += 1;
        self.run
    }

    /// The image the operations run on.
    fn img(&self) -> PathBuf {
        self.dir().join("d.qcow2")
    }

    /// A fresh copy of the base image.
    fn fresh(&self) -> PathBuf {
        let img = self.img();
        std::fs::copy(&self.base, &img).unwrap();
        img
    }

    /// `vmsnap run` of the counter guest on `img` with `env` set, as run `run`.
    fn command(&self, img: &Path, loadvm: Option<&str>, run: u32, env: &Env<'_>) -> Command {
        let g = self.guest;
        let mut cmd =
            run_vm::command_with_memory(self.dir(), &drives(img), 1, loadvm, run, g.memory);
        if let Some(p) = &self.mem_path {
            cmd.arg("--mem-path").arg(p);
        }
        cmd.args(["--dirty-rate", g.dirty_rate])
            .envs(env.iter().copied());
        if let Some(from) = self.arm {
            cmd.env("VMSNAP_TEST_KILL_FROM", from);
        }
        cmd
    }

    /// Boots the counter guest on `img` with `env` set and lets it run [`WARM`] ticks.
    fn boot(&mut self, img: &Path, env: &Env<'_>) -> RunVm {
        let run = self.next_run();
        let vm = RunVm::spawn(self.command(img, None, run, env), self.dir(), run);
        vm.wait_past(WARM);
        vm
    }

    /// Spawns `cmd` (its monitor may never come up) and polls it.
    fn spawn(cmd: &mut Command) -> Poll {
        let mut g = Guard(
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        Box::new(move || g.0.try_wait().ok().flatten())
    }

    /// Starts kill runs armed at `point` (and traced) with `start` until one dies there;
    /// returns the point it died at. A run that ends the operation `done` by a shorter path
    /// than the traced one (fewer pre-copy rounds, a shorter state) is run again; after two
    /// such runs the kill moves to the last occurrence those runs reached, then (the count
    /// still varying) to nine tenths of it. A phase the runs never reach fails.
    fn kill_at(
        &mut self,
        point: &str,
        done: &str,
        what: &str,
        start: &mut dyn FnMut(&mut Lab, &Env<'_>) -> Poll,
    ) -> String {
        let trace = self.dir().join("kill-trace.txt");
        let phase = point.rsplit_once(':').map_or(point, |(p, _)| p);
        let mut point = point.to_owned();
        let mut lowest = u64::MAX;
        for attempt in 0..5 {
            let _ = std::fs::remove_file(&trace);
            let env = [
                ("VMSNAP_TEST_KILL_AT", point.as_str()),
                ("VMSNAP_TEST_KILL_TRACE", s(&trace)),
            ];
            let mut poll = start(self, &env);
            match await_kill(&mut *poll, &trace, &point, done, KILL_LIMIT, what) {
                Kill::Killed => return point,
                Kill::Missed(n) => {
                    eprintln!("{what}: the run passed {phase} {n} times only; once more");
                    // Both processes of this run end before the next starts on a fresh
                    // copy of the same image (a live peer still holds its lock).
                    drop(poll);
                    self.peer = None;
                    self.missed += 1;
                    lowest = lowest.min(n);
                    if attempt >= 1 && n > 0 {
                        let at = if attempt >= 2 {
                            lowest * 9 / 10
                        } else {
                            lowest
                        };
                        point = format!("{phase}:{}", at.max(1));
                    }
                }
            }
        }
        let last = std::fs::read_to_string(&trace).unwrap_or_default();
        panic!(
            "{what}: five runs in a row did not reach it; the last:\n{}",
            without_data(&last)
        );
    }

    /// The checks every kill shares; counts the kill.
    fn after_kill(&mut self, img: &Path, what: &str, point: &str) {
        if assert_sound(img, what) {
            self.copied += 1;
        }
        self.tally.add(point);
    }

    /// Snapshot `tag` of `img` loads in a fresh process: the guest's first tick is the one
    /// after the snapshot's and it prints `CHECK OK`.
    fn assert_loads(&mut self, img: &Path, tag: &str, what: &str) {
        self.load(img, tag, what).quit();
    }

    /// [`Lab::assert_loads`], then a live savevm `again` in that run: the image a kill
    /// left takes the next snapshot, which is sound and holds a whole state.
    fn assert_loads_and_saves(&mut self, img: &Path, tag: &str, again: &str, what: &str) {
        let mut vm = self.load(img, tag, what);
        vm.ok(&format!("savevm -l {again}"));
        vm.quit();
        let what = format!("{what}, then savevm -l {again}");
        assert_sound(img, &what);
        assert!(names(img).iter().any(|n| n == again), "{what}");
        assert!(
            self.last_tick(img, again) > self.last_tick(img, tag),
            "{what}"
        );
    }

    /// Starts `--loadvm tag` and checks how the guest goes on; returns the run.
    fn load(&mut self, img: &Path, tag: &str, what: &str) -> RunVm {
        let n = self.last_tick(img, tag);
        let run = self.next_run();
        let vm = RunVm::spawn(self.command(img, Some(tag), run, &[]), self.dir(), run);
        let text = vm.wait_check();
        assert!(
            text.contains("CHECK OK") && !text.contains("CHECK FAIL"),
            "{what}: --loadvm {tag}: {text}"
        );
        assert_eq!(
            ticks_of(&text).first(),
            Some(&(n + 1)),
            "{what}: --loadvm {tag} does not go on at tick {}: {text}",
            n + 1
        );
        vm
    }

    /// The last tick the guest handled in snapshot `tag` (its whole state decoded).
    fn last_tick(&self, img: &Path, tag: &str) -> u64 {
        let ram = run_vm::snapshot_ram_of(img, tag, self.guest.ram, 1, 1);
        run_vm::guest_word(&ram, vmsnap::vmm::guest::counter::LAST_ADDR)
    }

    fn report(&self, op: &str, started: Instant) {
        eprintln!(
            "{op}: {} kills in {:.1} s, all consistent ({} left only COPIED flags missing, \
             {} runs again after a shorter path): {}",
            self.tally.total(),
            started.elapsed().as_secs_f64(),
            self.copied,
            self.missed,
            self.tally.summary()
        );
    }
}

/// Trace lines but the data writes.
fn without_data(trace: &str) -> String {
    trace
        .lines()
        .filter(|l| !l.contains(":data "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn drives(img: &Path) -> Vec<String> {
    vec![format!("file={}", img.display())]
}

/// Writes the marker byte `b` over the marker region of the active layer.
fn mark(img: &Path, b: u8) {
    let cmd = format!("write -P {b:#x} {MARK_AT} {MARK_LEN}");
    qemu_io("qcow2", img, &[cmd]).ok();
}

/// The marker byte of a layer (`None`: the active one), which must fill its region.
fn marker(img: &Path, tag: Option<&str>, tmp: &Path, what: &str) -> u8 {
    let data = qemu_layer(img, tag, tmp);
    let region = &data[MARK_AT..MARK_AT + MARK_LEN];
    assert!(
        region.iter().all(|&b| b == region[0]),
        "{what}: layer {tag:?} holds a mixed marker region"
    );
    region[0]
}

/// The base image: snapshot `a` (marker 0x11), snapshot `b` (marker 0x22) taken by two
/// boots of the counter guest, and the active layer marked 0x33.
fn lab() -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    create_qcow2(&base);
    let guest = if kill_trace::kill_all() { LARGE } else { SMALL };
    let mem_path = (guest.ram > SMALL.ram).then(|| {
        let mut rng = common::Rng(0x6b11_1a11);
        let data: Vec<u8> = (0..guest.ram / 8)
            .flat_map(|_| rng.next().to_le_bytes())
            .collect();
        let p = dir.path().join("ram.bin");
        std::fs::write(&p, data).unwrap();
        p
    });
    let mut lab = Lab {
        dir,
        guest,
        mem_path,
        base: base.clone(),
        run: 0,
        tally: Tally::default(),
        copied: 0,
        missed: 0,
        peer: None,
        arm: None,
    };
    for (tag, m) in [("a", 0x11), ("b", 0x22)] {
        mark(&base, m);
        let run = lab.next_run();
        let mut vm = RunVm::spawn(lab.command(&base, None, run, &[]), lab.dir(), run);
        vm.wait_past(WARM);
        vm.stop();
        vm.ok(&format!("savevm {tag}"));
        vm.quit();
    }
    mark(&base, 0x33);
    assert_check(&base);
    lab
}

/// Traces the operation `op` drives on a booted guest (from just before it to its end)
/// and returns the kill points to try.
fn trace_live(lab: &mut Lab, named: &[&str], op: &mut dyn FnMut(&mut RunVm)) -> Vec<String> {
    let img = lab.fresh();
    let path = lab.dir().join("trace.txt");
    let _ = std::fs::remove_file(&path);
    let mut vm = lab.boot(&img, &[("VMSNAP_TEST_KILL_TRACE", s(&path))]);
    let t = Trace::mark(&path);
    op(&mut vm);
    let window = t.since();
    vm.quit();
    let phases = kill_trace::phases(&window);
    for n in named {
        assert!(
            phases.iter().any(|p| p.name.starts_with(n)),
            "no {n} phase in the trace:\n{window}"
        );
    }
    kill_trace::pick(&phases, named, QCOW2, GUEST)
}

/// Kills `line` (sent to a booted guest) at `point`; `done`: the operation's last phase.
fn kill_live(lab: &mut Lab, point: &str, done: &str, line: &str, before: fn(&mut RunVm)) -> String {
    let what = format!("{line} at {point}");
    lab.kill_at(point, done, &what, &mut |lab, env| {
        let img = lab.fresh();
        let mut vm = lab.boot(&img, env);
        before(&mut vm);
        vm.send(line);
        Box::new(move || vm.exited())
    })
}

#[test]
fn sigkill_at_every_phase_of_live_savevm() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_and_qemu_img(module_path!()) {
        return;
    }
    // Replacing a tag (its old snapshot dropped first); the full campaign also saves a new
    // one (no space freed to reuse, no discards held back).
    live_savevm_campaign("b");
    if kill_trace::kill_all() {
        live_savevm_campaign("c");
    }
}

/// Kills `savevm -l tag` at every phase; `b` exists in the base image, another tag not.
fn live_savevm_campaign(tag: &str) {
    let started = Instant::now();
    let mut lab = lab();
    let tmp = lab.dir().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let line = format!("savevm -l {tag}");
    let points = trace_live(&mut lab, &["savevm-live:"], &mut |vm| {
        let (r, st) = vm.cmd(&line);
        assert_eq!((r.as_str(), st.as_str()), ("", "running"));
    });
    let after: Vec<String> = if tag == "b" {
        vec!["a".into(), "b".into()]
    } else {
        vec!["a".into(), "b".into(), tag.into()]
    };
    let mut outcomes = [0u32; 3];
    for p in &points {
        let p = &kill_live(&mut lab, p, "savevm-live:resumed", &line, |_| {});
        let img = lab.img();
        let what = format!("{line} killed at {p}");
        lab.after_kill(&img, &what, p);
        let now = names(&img);
        // Before, after, or (replacing) the old snapshot dropped and the new one not made.
        assert!(
            now == ["a", "b"] || now == after || tag == "b" && now == ["a"],
            "{what}: snapshots {now:?}"
        );
        assert_eq!(marker(&img, Some("a"), &tmp, &what), 0x11, "{what}");
        assert_eq!(marker(&img, None, &tmp, &what), 0x33, "{what}");
        if tag != "b" {
            assert_eq!(marker(&img, Some("b"), &tmp, &what), 0x22, "{what}");
        }
        lab.assert_loads_and_saves(&img, "a", "n", &what);
        if now.iter().any(|n| n == tag) {
            // The old `b` (0x22) or the new snapshot, of the active layer as it was (0x33).
            let m = marker(&img, Some(tag), &tmp, &what);
            assert!(
                m == 0x33 || tag == "b" && m == 0x22,
                "{what}: {tag}'s marker {m:#x}"
            );
            lab.assert_loads(&img, tag, &what);
            outcomes[usize::from(m == 0x33)] += 1;
        } else {
            outcomes[2] += 1;
        }
    }
    lab.report(&line, started);
    eprintln!(
        "{line}: old snapshot kept {}, new one {}, none {}",
        outcomes[0], outcomes[1], outcomes[2]
    );
}

/// The checks after a killed loadvm of `b`: the snapshots are the same, `b`'s layer is its
/// own, the active layer is the old one or `b`'s, and `b` still loads.
fn after_loadvm_kill(lab: &mut Lab, img: &Path, tmp: &Path, what: &str) -> u8 {
    assert_eq!(names(img), ["a", "b"], "{what}");
    assert_eq!(marker(img, Some("b"), tmp, what), 0x22, "{what}");
    let m = marker(img, None, tmp, what);
    assert!(
        m == 0x33 || m == 0x22,
        "{what}: the active layer is neither the old one nor b's ({m:#x})"
    );
    lab.assert_loads_and_saves(img, "b", "n", what);
    m
}

#[test]
fn sigkill_at_every_phase_of_lazy_loadvm_in_the_running_vm() {
    loadvm_in_the_running_vm_campaign("loadvm b", "lazy", "loadvm-lazy:", "loadvm-lazy:filled");
}

#[test]
fn sigkill_at_every_phase_of_eager_loadvm_in_the_running_vm() {
    loadvm_in_the_running_vm_campaign("loadvm -e b", "eager", "loadvm:", "loadvm:reverted");
}

/// Kills `line` (a loadvm of `b` in `mode`) in a running VM at every phase named `named`
/// and the qcow2 phases on its way; `done`: its last traced phase.
fn loadvm_in_the_running_vm_campaign(line: &str, mode: &str, named: &str, done: &str) {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_and_qemu_img(module_path!()) {
        return;
    }
    let started = Instant::now();
    let mut lab = lab();
    let tmp = lab.dir().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let points = trace_live(&mut lab, &[named], &mut |vm| {
        vm.ok(line);
        let info = vm.wait_loaded();
        assert!(
            info.contains(&format!("mode: {mode}")) && info.contains("status: completed"),
            "{info}"
        );
    });
    let mut reverted = 0;
    for p in &points {
        let p = &kill_live(&mut lab, p, done, line, |_| {});
        let img = lab.img();
        let what = format!("{line} killed at {p}");
        lab.after_kill(&img, &what, p);
        if after_loadvm_kill(&mut lab, &img, &tmp, &what) == 0x22 {
            reverted += 1;
        }
    }
    let op = format!("loadvm {mode} (running VM)");
    lab.report(&op, started);
    eprintln!("{op}: active layer reverted to b in {reverted} kills");
}

#[test]
fn sigkill_at_every_phase_of_lazy_loadvm_in_a_new_process() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_and_qemu_img(module_path!()) {
        return;
    }
    let started = Instant::now();
    let mut lab = lab();
    let tmp = lab.dir().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    // The whole process is the operation: its trace from the start to the fill's end.
    let img = lab.fresh();
    let path = lab.dir().join("trace.txt");
    let _ = std::fs::remove_file(&path);
    let run = lab.next_run();
    let cmd = lab.command(
        &img,
        Some("b"),
        run,
        &[("VMSNAP_TEST_KILL_TRACE", s(&path))],
    );
    let mut vm = RunVm::spawn(cmd, lab.dir(), run);
    let info = vm.wait_loaded();
    assert!(
        info.contains("mode: lazy") && info.contains("status: completed"),
        "{info}"
    );
    let trace = std::fs::read_to_string(&path).unwrap();
    vm.quit();
    let named = ["loadvm-lazy:"];
    let phases = kill_trace::phases(&trace);
    assert!(
        phases.iter().any(|p| p.name == "loadvm-lazy:filled"),
        "{trace}"
    );
    let mut reverted = 0;
    for p in kill_trace::pick(&phases, &named, QCOW2, GUEST) {
        let what = format!("--loadvm killed at {p}");
        let p = lab.kill_at(&p, "loadvm-lazy:filled", &what, &mut |lab, env| {
            let img = lab.fresh();
            let run = lab.next_run();
            Lab::spawn(&mut lab.command(&img, Some("b"), run, env))
        });
        let img = lab.img();
        lab.after_kill(&img, &what, &p);
        if after_loadvm_kill(&mut lab, &img, &tmp, &what) == 0x22 {
            reverted += 1;
        }
    }
    lab.report("--loadvm (new process)", started);
    eprintln!("--loadvm (new process): active layer reverted to b in {reverted} kills");
}

/// The checks after a killed migration source or destination: the image is the source's,
/// with the snapshot the source took before migrating, which still loads.
fn after_migrate_kill(lab: &mut Lab, img: &Path, tmp: &Path, what: &str) {
    assert_eq!(names(img), ["a", "b", "c"], "{what}");
    for (tag, m) in [
        (Some("a"), 0x11),
        (Some("b"), 0x22),
        (Some("c"), 0x33),
        (None, 0x33),
    ] {
        assert_eq!(marker(img, tag, tmp, what), m, "{what}: layer {tag:?}");
    }
    lab.assert_loads_and_saves(img, "c", "n", what);
}

/// The source's part: a snapshot `c`, a few more ticks, then `migrate`.
fn before_migrate(vm: &mut RunVm) {
    vm.ok("savevm c");
    let t = vm.last_tick().unwrap_or(0);
    vm.wait_past(t + 2);
}

#[test]
fn sigkill_at_every_phase_of_live_migration_on_both_sides() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_and_qemu_img(module_path!()) {
        return;
    }
    let started = Instant::now();
    let mut lab = lab();
    let tmp = lab.dir().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let stream = lab.dir().join("vm.mig");
    let migrate = format!("migrate file:{}", stream.display());

    // The source, traced from the start of `migrate` to its end (counted from there: the
    // guest's copy-on-write after `savevm c` falls before or after the command by timing);
    // its image and stream are the destination's input.
    lab.arm = Some("migrate:started");
    let img = lab.fresh();
    let path = lab.dir().join("trace-src.txt");
    let mut vm = lab.boot(&img, &[("VMSNAP_TEST_KILL_TRACE", s(&path))]);
    before_migrate(&mut vm);
    let t = Trace::mark(&path);
    let (r, st) = vm.cmd(&migrate);
    assert_eq!((r.as_str(), st.as_str()), ("", "paused (postmigrate)"));
    let window = t.since();
    vm.quit();
    let migrated = lab.dir().join("migrated.qcow2");
    std::fs::copy(&img, &migrated).unwrap();
    let saved_stream = lab.dir().join("saved.mig");
    std::fs::copy(&stream, &saved_stream).unwrap();
    let src_points = kill_trace::pick(&kill_trace::phases(&window), &["migrate:"], QCOW2, GUEST);
    assert!(
        src_points.iter().any(|p| p.starts_with("migrate:finished")),
        "{window}"
    );
    for p in &src_points {
        let p = &kill_live(&mut lab, p, "migrate:finished", &migrate, before_migrate);
        let what = format!("migration source killed at {p}");
        let img = lab.img();
        lab.after_kill(&img, &what, p);
        after_migrate_kill(&mut lab, &img, &tmp, &what);
    }
    lab.report("migrate (source)", started);
    lab.arm = None;

    // The destination, on the same image once the source is done, traced whole.
    let dst = |lab: &mut Lab, env: &Env<'_>| -> (Command, u32) {
        let img = lab.dir().join("d.qcow2");
        std::fs::copy(&migrated, &img).unwrap();
        std::fs::copy(&saved_stream, &stream).unwrap();
        let run = lab.next_run();
        let mut cmd = lab.command(&img, None, run, env);
        cmd.arg("--incoming")
            .arg(format!("file:{}", stream.display()));
        (cmd, run)
    };
    let path = lab.dir().join("trace-dst.txt");
    let (cmd, run) = dst(&mut lab, &[("VMSNAP_TEST_KILL_TRACE", s(&path))]);
    let vm = RunVm::spawn(cmd, lab.dir(), run);
    let text = vm.wait_check();
    assert!(text.contains("CHECK OK"), "{text}");
    let trace = std::fs::read_to_string(&path).unwrap();
    vm.quit();
    let phases = kill_trace::phases(&trace);
    assert!(
        phases.iter().any(|p| p.name == "incoming:activated"),
        "{trace}"
    );
    let before = lab.tally.total();
    for p in kill_trace::pick(&phases, &["incoming:"], QCOW2, GUEST) {
        let what = format!("migration destination killed at {p}");
        let p = lab.kill_at(&p, "incoming:activated", &what, &mut |lab, env| {
            Lab::spawn(&mut dst(lab, env).0)
        });
        let img = lab.img();
        lab.after_kill(&img, &what, &p);
        after_migrate_kill(&mut lab, &img, &tmp, &what);
    }
    eprintln!(
        "migrate (destination): {} kills",
        lab.tally.total() - before
    );
    lab.report("migrate (both sides)", started);
}

/// A destination of the counter guest on `img` listening on `uri`, with `env` set.
fn destination(lab: &mut Lab, img: &Path, uri: &str, env: &Env<'_>) -> RunVm {
    let run = lab.next_run();
    let mut cmd = lab.command(img, None, run, env);
    cmd.args(["--incoming", uri]);
    RunVm::spawn(cmd, lab.dir(), run)
}

/// After a kill on one side of a migration over a socket, the side left: it ends on its
/// own or quits cleanly (a destination whose stream broke), or (a source whose destination
/// died) it runs the guest again, at once or after `cont` if the migration had completed,
/// and quits cleanly.
fn survivor(mut vm: RunVm, source: bool, what: &str) {
    if !source {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Some(st) = vm.exited() {
                eprintln!("{what}: the destination ended ({st})");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let (info, st) = vm.cmd("info migrate");
        eprintln!(
            "{what}: the destination is {st}: {}",
            info.trim_end().replace('\n', "; ")
        );
        vm.quit();
        return;
    }
    // The migrate command's reply, then the status.
    let (_, st) = vm.cmd("info migrate");
    eprintln!("{what}: the source is {st}");
    if st != "running" {
        assert_eq!(st, "paused (postmigrate)", "{what}: the source is {st}");
        let (r, st) = vm.cmd("cont");
        assert_eq!((r.as_str(), st.as_str()), ("", "running"), "{what}: cont");
    }
    let t = vm.last_tick().unwrap_or(0);
    vm.wait_past(t + 5);
    vm.quit();
}

#[test]
fn sigkill_at_every_phase_of_live_migration_over_a_unix_socket() {
    socket_migration_campaign("unix");
}

#[test]
fn sigkill_at_every_phase_of_live_migration_over_tcp() {
    socket_migration_campaign("tcp");
}

/// A fresh address of `transport` for a destination to listen on: the lab's unix socket
/// (its old file removed), or a tcp port on loopback that was free a moment ago.
fn listen_uri(lab: &Lab, transport: &str) -> String {
    if transport == "tcp" {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        format!("tcp:127.0.0.1:{port}")
    } else {
        let sock = lab.dir().join("mig.sock");
        let _ = std::fs::remove_file(&sock);
        format!("unix:{}", sock.display())
    }
}

/// Kills each side of a live migration over a `transport` socket at every phase it passes.
fn socket_migration_campaign(transport: &str) {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kvm_and_qemu_img(module_path!()) {
        return;
    }
    let started = Instant::now();
    let mut lab = lab();
    let tmp = lab.dir().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let uri = listen_uri(&lab, transport);
    let migrate = format!("migrate {uri}");

    // Both sides traced: the source from just before `migrate`, the destination whole.
    let img = lab.fresh();
    let (src_path, dst_path) = (
        lab.dir().join("trace-src.txt"),
        lab.dir().join("trace-dst.txt"),
    );
    let mut src = lab.boot(&img, &[("VMSNAP_TEST_KILL_TRACE", s(&src_path))]);
    before_migrate(&mut src);
    let dst = destination(
        &mut lab,
        &img,
        &uri,
        &[("VMSNAP_TEST_KILL_TRACE", s(&dst_path))],
    );
    let t = Trace::mark(&src_path);
    let (r, st) = src.cmd(&migrate);
    assert_eq!((r.as_str(), st.as_str()), ("", "paused (postmigrate)"));
    let window = t.since();
    let text = dst.wait_check();
    assert!(text.contains("CHECK OK"), "{text}");
    let dst_trace = std::fs::read_to_string(&dst_path).unwrap();
    src.quit();
    dst.quit();
    assert_sound(&img, "traced migration");
    let sides = [
        (
            true,
            kill_trace::pick(&kill_trace::phases(&window), &["migrate:"], QCOW2, GUEST),
        ),
        (
            false,
            kill_trace::pick(
                &kill_trace::phases(&dst_trace),
                &["incoming:"],
                QCOW2,
                GUEST,
            ),
        ),
    ];
    for (source, points) in sides {
        let (side, done) = if source {
            ("source", "migrate:finished")
        } else {
            ("destination", "incoming:activated")
        };
        for p in points {
            let what = format!("{transport} migration, {side} killed at {p}");
            let p = lab.kill_at(&p, done, &what, &mut |lab, env| {
                let img = lab.fresh();
                let uri = listen_uri(lab, transport);
                let migrate = format!("migrate {uri}");
                let (src_env, dst_env): (&Env<'_>, &Env<'_>) =
                    if source { (env, &[]) } else { (&[], env) };
                let mut src = lab.boot(&img, src_env);
                before_migrate(&mut src);
                let dst = destination(lab, &img, &uri, dst_env);
                src.send(&migrate);
                let (mut killed, other) = if source { (src, dst) } else { (dst, src) };
                lab.peer = Some(other);
                Box::new(move || killed.exited())
            });
            let peer = lab.peer.take().expect("the other side");
            survivor(peer, !source, &what);
            let img = lab.img();
            lab.after_kill(&img, &what, &p);
            after_migrate_kill(&mut lab, &img, &tmp, &what);
        }
    }
    lab.report(&format!("migrate over {transport} (both sides)"), started);
}
