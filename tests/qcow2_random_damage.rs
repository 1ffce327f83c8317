//! Random damage to the metadata of QEMU-made images (issue 11, item 6).
//!
//! Each case copies a QEMU 7.2 fixture, damages one metadata field (tests/damage), then runs
//! `info` (text and JSON), `snapshot -l` and `check`, and one writing command (`snapshot -c`,
//! `snapshot -d` or `io write`), under a time and address-space limit. The rules:
//!
//! 1. no panic, no signal, no hang (every command finishes within [`TIMEOUT`]);
//! 2. `vmsnap check` exits as `qemu-img check` does (0 clean, 1 check failed, 2 corrupt,
//!    3 leaks), except where vmsnap's documented COPIED-flag rule differs: a missing COPIED
//!    flag on a cluster referenced once is a leak for vmsnap and a corruption for QEMU
//!    (README, formats/qcow2.md), and an image without a refcount table
//!    (`refcount_table_clusters` 0), which qemu-img check alone opens (BDRV_O_CHECK) and calls
//!    corrupt while vmsnap refuses it in check as everywhere (exit 1); `snapshot -l` and
//!    `info` succeed exactly when qemu-img's do, and list as many snapshots;
//! 3. a refused write leaves the file's bytes as they were;
//! 4. an accepted write leaves `qemu-img check` no worse: no more corruptions than before,
//!    and an image that was clean or only leaking stays so;
//! 5. `check -r all` of the damaged image (a fresh copy) that exits 0 leaves no corruption
//!    that `qemu-img check` finds.
//!
//! Rules 3 and 4 on an image that `qemu-img check` already calls corrupt (or cannot check)
//! are the write side
//! of issue 11 (overlap checks before writes, refcount sanity before freeing, refusals that
//! change nothing), built separately: such violations are counted and printed, and fail the
//! test only with `DAMAGE_STRICT_WRITES=1`. On an image qemu-img calls clean or leaking they
//! always fail it.
//!
//! `DAMAGE_CASES` (default 120), `DAMAGE_SEED` (default fixed), `DAMAGE_JOBS` (parallel cases,
//! default 2), `DAMAGE_ONLY=N` (one case)
//! `DAMAGE_KEEP=DIR` (keep the damaged images of failing cases) and `DAMAGE_VMSNAP=PATH` (test
//! that copy of the vmsnap binary) drive longer runs:
//! `tools/scripts/damage.sh --cases N [--seed S]`.

mod common;
mod damage;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{fixtures, only_missing_copied, require, s, vmsnap_bin, Rng, Run};

/// Longest any one command may take.
const TIMEOUT: Duration = Duration::from_secs(60);
/// Address-space limit for vmsnap (KiB).
const LIMIT_KIB: u64 = 1 << 20;

/// The QEMU-made images damaged (relative to the fixture directory).
const FIXTURES: &[&str] = &[
    "cluster-512.qcow2",
    "compat-0.10.qcow2.gz",
    "compressed.qcow2.gz",
    "refcount-bits-1.qcow2.gz",
    "refcount-bits-1-failed-snapshot.qcow2",
    "refcount-bits-64.qcow2.gz",
    "snap-basic.qcow2.gz",
    "cluster-2M.qcow2.gz",
    "two-disks/qq-disk0.qcow2.gz",
    "two-disks/qq-disk1.qcow2",
];

/// Runs `prog` with a time limit (killed after [`TIMEOUT`]); `limit` applies `ulimit -v`.
fn run_timed(prog: &str, args: &[&str], limit: bool) -> (Run, bool) {
    let mut cmd = if limit {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!("ulimit -v {LIMIT_KIB}; exec \"$0\" \"$@\""))
            .arg(prog);
        c
    } else {
        Command::new(prog)
    };
    let mut child = cmd
        .args(args)
        .env("TZ", "UTC")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        out.read_to_end(&mut v).ok();
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        err.read_to_end(&mut v).ok();
        v
    });
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > TIMEOUT {
            timed_out = true;
            child.kill().ok();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let run = Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&t_out.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&t_err.join().unwrap()).into_owned(),
    };
    (run, timed_out)
}

/// `qemu-img check`: exit code, corruption count (from "N errors were found") and findings;
/// `None` when qemu-img itself ran past [`TIMEOUT`] (it walks a huge damaged L1 table
/// entry by entry: case 2402 of the default seed takes it almost 6 minutes, vmsnap 0.4 s),
/// so there is nothing to compare with.
fn qemu_check(img: &Path) -> Option<(Option<i32>, u64, String)> {
    let (r, timed_out) = run_timed("qemu-img", &["check", "-U", "-f", "qcow2", s(img)], false);
    if timed_out {
        return None;
    }
    let corruptions = r
        .stdout
        .lines()
        .find_map(|l| l.strip_suffix(" errors were found on the image."))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    Some((r.code, corruptions, r.stderr))
}

/// Rows of a `snapshot -l` listing.
fn rows(listing: &str) -> usize {
    listing.lines().skip(2).filter(|l| !l.is_empty()).count()
}

#[derive(Default)]
struct Tally {
    cases: u64,
    failures: Vec<String>,
    write_side: Vec<String>,
    copied_difference: u64,
    qemu_timeouts: u64,
    no_reftable_difference: u64,
    refused_writes: u64,
    accepted_writes: u64,
    classes: [u64; 4],
}

struct Case<'a> {
    index: u64,
    seed: u64,
    dir: &'a Path,
    pristine: &'a [(String, Vec<u8>)],
}

/// vmsnap as built for this test, or the copy `DAMAGE_VMSNAP` names (so that a long run
/// keeps testing one binary while the tree is rebuilt).
fn vm(args: &[&str]) -> (Run, bool) {
    match std::env::var("DAMAGE_VMSNAP") {
        Ok(bin) => run_timed(&bin, args, true),
        Err(_) => run_timed(vmsnap_bin(), args, true),
    }
}

fn sane(what: &str, r: &(Run, bool), errs: &mut Vec<String>) {
    let (run, timed_out) = r;
    if *timed_out {
        errs.push(format!("`{what}` hung (killed after {TIMEOUT:?})"));
    } else if !matches!(run.code, Some(c) if c != 101) || run.stderr.contains("panicked") {
        errs.push(format!(
            "`{what}` crashed: exit {:?}: {}",
            run.code, run.stderr
        ));
    }
}

fn run_case(c: &Case, tally: &Mutex<Tally>) {
    let mut rng = Rng(c.seed ^ c.index.wrapping_mul(0x2545_F491_4F6C_DD1D));
    let (name, base) = &c.pristine[rng.below(c.pristine.len() as u64) as usize];
    let mut data = base.clone();
    let what = damage::damage(&mut data, &mut rng);
    let img = c.dir.join(format!("case{}.qcow2", c.index));
    std::fs::write(&img, &data).unwrap();
    let p = s(&img);
    let label = format!("case {} (seed {:#x}) {name}: {what}", c.index, c.seed);
    let mut errs = Vec::new();

    let q_check = qemu_check(&img);
    let qemu_timed_out = q_check.is_none();
    let (q_code, q_corrupt, q_msgs) = q_check.unwrap_or((None, 0, String::new()));
    // `qemu-img snapshot` has no `-f`: name the driver so that it does not probe as raw.
    let opts = format!("driver=qcow2,file.driver=file,file.filename={p}");
    let (q_list, _) = run_timed(
        "qemu-img",
        &["snapshot", "-U", "-l", "--image-opts", &opts],
        false,
    );
    let (q_info, _) = run_timed("qemu-img", &["info", "-U", "-f", "qcow2", p], false);
    let info = vm(&["info", "-f", "qcow2", p]);
    sane("info", &info, &mut errs);
    let info_json = vm(&["info", "-f", "qcow2", "--output", "json", p]);
    sane("info --output json", &info_json, &mut errs);
    let list = vm(&["snapshot", "-f", "qcow2", "-l", p]);
    sane("snapshot -l", &list, &mut errs);
    let check = vm(&["check", "-f", "qcow2", p]);
    sane("check", &check, &mut errs);
    let after_reads = std::fs::read(&img).unwrap();
    if after_reads != data {
        errs.push("a read command changed the file".into());
    }

    // Rule 2: classes and listings as qemu-img's.
    let v_code = check.0.code;
    let mut copied_difference = false;
    let mut no_reftable_difference = false;
    if qemu_timed_out {
        // Nothing to compare the class with; vmsnap's own check still had to finish (sane).
    } else if v_code != q_code {
        if q_code == Some(2) && v_code == Some(3) && only_missing_copied(&q_msgs) {
            copied_difference = true;
        } else if q_code == Some(2)
            && v_code == Some(1)
            && q_list
                .stderr
                .contains("does not contain a reference count table")
        {
            // qemu-img check opens with BDRV_O_CHECK, which skips the refusal of an empty
            // refcount table that every other open makes; vmsnap refuses it in check too.
            no_reftable_difference = true;
        } else {
            errs.push(format!(
                "check exit {v_code:?}, qemu-img check {q_code:?}\n  vmsnap: {}\n  qemu-img: {}",
                check.0.stderr.trim(),
                q_msgs.trim()
            ));
        }
    }
    if (list.0.code == Some(0)) != (q_list.code == Some(0)) {
        errs.push(format!(
            "snapshot -l exit {:?}, qemu-img's {:?}: {} / {}",
            list.0.code,
            q_list.code,
            list.0.stderr.trim(),
            q_list.stderr.trim()
        ));
    } else if list.0.code == Some(0) && rows(&list.0.stdout) != rows(&q_list.stdout) {
        errs.push(format!(
            "snapshot -l lists {} snapshots, qemu-img {}",
            rows(&list.0.stdout),
            rows(&q_list.stdout)
        ));
    }
    // qemu-img info opens without I/O (BDRV_O_NO_IO) and so accepts a few images that
    // qemu-img itself cannot read (e.g. data-file-raw without a data file); compare `info`
    // only where qemu-img's own listing agrees with it.
    let q_info_consistent = (q_info.code == Some(0)) == (q_list.code == Some(0));
    if q_info_consistent && (info.0.code == Some(0)) != (q_info.code == Some(0)) {
        errs.push(format!(
            "info exit {:?}, qemu-img info's {:?}: {} / {}",
            info.0.code,
            q_info.code,
            info.0.stderr.trim(),
            q_info.stderr.trim()
        ));
    }

    // Rules 3 and 4: one writing command.
    let snap = q_list
        .stdout
        .lines()
        .nth(2)
        .and_then(|l| l.split_whitespace().next())
        .map(str::to_owned);
    let write_cmd: Vec<String> = match (rng.below(3), snap) {
        (0, Some(id)) => vec!["snapshot".into(), "-d".into(), id],
        (1, _) => {
            let off = rng.below(64) * 4096;
            vec![
                "io".into(),
                "-f".into(),
                "qcow2".into(),
                p.into(),
                "-c".into(),
                format!("write -P 0x5a {off} 4k"),
            ]
        }
        _ => vec!["snapshot".into(), "-c".into(), "dmg".into()],
    };
    let mut args: Vec<&str> = write_cmd.iter().map(String::as_str).collect();
    if args[0] == "snapshot" {
        args.extend(["-f", "qcow2", p]);
    }
    let w = vm(&args);
    sane(&args.join(" "), &w, &mut errs);
    let mut write_errs = Vec::new();
    let accepted = w.0.code == Some(0);
    if !accepted {
        if std::fs::read(&img).unwrap() != data {
            write_errs.push(format!(
                "refused `{}` changed the file: {}",
                write_cmd.join(" "),
                w.0.stderr.trim()
            ));
        }
    } else if let Some((q2_code, q2_corrupt, q2_msgs)) =
        qemu_check(&img).filter(|_| !qemu_timed_out)
    {
        let was_ok = matches!(q_code, Some(0 | 3));
        if q2_corrupt > q_corrupt || was_ok && !matches!(q2_code, Some(0 | 3)) {
            write_errs.push(format!(
                "accepted `{}` made qemu-img check worse: exit {q_code:?} -> {q2_code:?}, corruptions {q_corrupt} -> {q2_corrupt}\n  {}",
                write_cmd.join(" "),
                q2_msgs.trim()
            ));
        }
    }
    // Rule 5: `check -r all` on the damaged image (a fresh copy): when it says it repaired
    // everything (exit 0), qemu-img finds no corruption left.
    std::fs::write(&img, &data).unwrap();
    let rep = vm(&["check", "-r", "all", p]);
    sane("check -r all", &rep, &mut errs);
    if rep.0.code == Some(0) {
        if let Some((code, corrupt, msgs)) = qemu_check(&img) {
            if corrupt > 0 || !matches!(code, Some(0 | 3)) {
                errs.push(format!(
                    "check -r all exited 0 but qemu-img check exits {code:?} with {corrupt} corruptions:\n  {}",
                    msgs.trim()
                ));
            }
        }
    }
    let strict = std::env::var("DAMAGE_STRICT_WRITES").is_ok_and(|v| v == "1");
    let write_side = !write_errs.is_empty() && !matches!(q_code, Some(0 | 3)) && !strict;
    if !write_side {
        errs.append(&mut write_errs);
    }
    if !errs.is_empty() {
        if let Ok(keep) = std::env::var("DAMAGE_KEEP") {
            std::fs::create_dir_all(&keep).ok();
            std::fs::write(
                Path::new(&keep).join(format!("case{}.qcow2", c.index)),
                &data,
            )
            .ok();
        }
    }
    std::fs::remove_file(&img).ok();

    let mut t = tally.lock().unwrap();
    t.cases += 1;
    if t.cases % 250 == 0 {
        eprintln!(
            "progress: {} cases, {} failures, {} write-side tolerated",
            t.cases,
            t.failures.len(),
            t.write_side.len()
        );
    }
    if let Some(k) = q_code.filter(|k| (0..4).contains(k)) {
        t.classes[k as usize] += 1;
    }
    t.copied_difference += u64::from(copied_difference);
    t.qemu_timeouts += u64::from(qemu_timed_out);
    t.no_reftable_difference += u64::from(no_reftable_difference);
    if accepted {
        t.accepted_writes += 1;
    } else {
        t.refused_writes += 1;
    }
    if write_side {
        t.write_side
            .push(format!("{label}\n  {}", write_errs.join("\n  ")));
    }
    if !errs.is_empty() {
        let f = format!("{label}\n  {}", errs.join("\n  "));
        eprintln!("FAILED: {f}\n");
        t.failures.push(f);
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| {
            let v = v.trim();
            v.strip_prefix("0x")
                .map_or_else(|| v.parse().ok(), |h| u64::from_str_radix(h, 16).ok())
        })
        .unwrap_or(default)
}

#[test]
fn random_damage_never_makes_things_worse() {
    if !require("random_damage_never_makes_things_worse", &["qemu-img"]) {
        return;
    }
    let cases = env_u64("DAMAGE_CASES", 120);
    let seed = env_u64("DAMAGE_SEED", 0x0011_da3a_6e5e_ed00);
    let only = std::env::var("DAMAGE_ONLY")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    let dir = tempfile::tempdir().unwrap();
    let pristine: Vec<(String, Vec<u8>)> = FIXTURES
        .iter()
        .filter(|f| fixtures().join(f).exists())
        .map(|f| {
            let path: PathBuf = common::fixture_copy(f, dir.path());
            let data = std::fs::read(&path).unwrap();
            std::fs::remove_file(&path).ok();
            (f.to_string(), data)
        })
        .collect();
    assert!(pristine.len() >= 6, "QEMU fixtures missing");
    let tally = Mutex::new(Tally::default());
    let next = Mutex::new(0u64);
    let start = Instant::now();
    std::thread::scope(|sc| {
        for _ in 0..env_u64("DAMAGE_JOBS", 2) {
            sc.spawn(|| loop {
                let index = {
                    let mut n = next.lock().unwrap();
                    let i = *n;
                    *n += 1;
                    i
                };
                if index >= cases {
                    break;
                }
                if only.is_some_and(|o| o != index) {
                    continue;
                }
                let c = Case {
                    index,
                    seed,
                    dir: dir.path(),
                    pristine: &pristine,
                };
                run_case(&c, &tally);
            });
        }
    });
    let t = tally.into_inner().unwrap();
    for w in &t.write_side {
        eprintln!("WRITE SIDE (tolerated, see the module doc): {w}\n");
    }
    eprintln!(
        "random damage: {} cases (seed {seed:#x}) in {:.1} s; qemu-img check classes 0/1/2/3: {:?}; \
         writes accepted {} refused {}; COPIED-rule differences {}; empty-refcount-table differences {}; qemu-img check past {TIMEOUT:?} (not compared) {}; write-side violations tolerated {}; failures {}",
        t.cases,
        start.elapsed().as_secs_f64(),
        t.classes,
        t.accepted_writes,
        t.refused_writes,
        t.copied_difference,
        t.no_reftable_difference,
        t.qemu_timeouts,
        t.write_side.len(),
        t.failures.len()
    );
    assert!(
        t.failures.is_empty(),
        "{} of {} cases failed",
        t.failures.len(),
        t.cases
    );
}
