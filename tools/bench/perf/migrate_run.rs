//! One migration of a dirtying guest between two processes of one side, vmsnap or QEMU 7.2,
//! over tcp loopback, as the migrate and xbzrle cases set it up; what each source's
//! `info migrate` / `query-migrate` reported at the end.
//!
//! vmsnap: two `vmsnap run --dirty-rate R [--dirty-span B]` processes (the destination with
//! `--incoming tcp:…`), driven through their unix-socket monitors. QEMU: two
//! `qemu-system-x86_64 -accel tcg` processes booting `tools/bench/guest/dirty.elf` with
//! `-append R[,B]` (the same dirtying per 100 Hz tick), driven through QMP. See
//! migrate_cases.rs for why QEMU runs TCG.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{have, vmsnap_bin, Harness};
use crate::migrate_ctl::{free_port, hmp_field, hmp_ms, spawn, Hmp, Procs, Qmp};

const QEMU: &str = "qemu-system-x86_64";
/// How long the guest runs before the migration starts (dirtying reaches its pace).
const WARMUP: Duration = Duration::from_secs(2);
/// With postcopy: how long pre-copy runs before `migrate_start_postcopy`.
const POSTCOPY_AFTER: Duration = Duration::from_secs(1);

/// What one migration does.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    /// Guest RAM (`-m`).
    pub mem: &'static str,
    /// Dirtying rate, MiB/s.
    pub rate: u64,
    /// Bytes stored from the start of each dirtied page (None: the guests' default, one
    /// word).
    pub span: Option<u64>,
    /// `max-bandwidth` in MiB/s (None: the side's default, 128 MiB/s on both).
    pub bandwidth_mib: Option<u64>,
    /// `downtime-limit` in ms (None: the default, 300 ms on both).
    pub downtime_ms: Option<u64>,
    /// Capability `postcopy-ram` on both ends, `migrate_start_postcopy` after
    /// [`POSTCOPY_AFTER`].
    pub postcopy: bool,
    /// Capability `xbzrle` on both ends.
    pub xbzrle: bool,
    /// `xbzrle-cache-size` in MiB (None: the default, 64 MiB on both).
    pub xbzrle_cache_mib: Option<u64>,
    /// Give up (cancel) after this long.
    pub give_up: Duration,
    /// Before migrating, measure the guest's dirty rate with the side's own
    /// `calc_dirty_rate 1` (page sampling, QEMU's default method).
    pub measure_rate: bool,
}

/// How one migration ended.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    /// `total time` as the source reports it.
    pub total: Duration,
    /// `downtime` as the source reports it.
    pub downtime: Duration,
    /// Dirty-bitmap syncs (rounds), when reported.
    pub syncs: u64,
    /// Highest dirty-page rate (pages/s) the source reported (it is computed over periods of
    /// at least a second, so a shorter migration reports none).
    pub dirty_pages_rate: u64,
    /// RAM bytes sent (`transferred ram`).
    pub transferred: u64,
    /// Pages sent XBZRLE-encoded, and their bytes.
    pub xbzrle_pages: u64,
    pub xbzrle_bytes: u64,
    /// The guest's dirty rate in MiB/s as `calc_dirty_rate` measured it before the migration.
    pub measured_rate: Option<u64>,
}

fn guest_elf() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/bench/guest/dirty.elf")
}

/// QEMU's guest, or `None` (said) when QEMU or the guest is missing; says so too when
/// /dev/kvm is (the vmsnap side then skips each run).
pub fn qemu_guest(h: &Harness) -> Option<PathBuf> {
    if !Path::new("/dev/kvm").exists() {
        h.info("SKIPPED (vmsnap side): /dev/kvm missing");
    }
    let guest = guest_elf();
    if have(QEMU) && guest.exists() {
        return Some(guest);
    }
    h.info("SKIPPED (QEMU side): qemu-system-x86_64 or tools/bench/guest/dirty.elf missing");
    None
}

/// Outcomes of a run.
pub type Runs = Vec<Result<Outcome, String>>;

/// `s` run `h.runs` times on each side, alternating (QEMU's only with `guest`): vmsnap's
/// outcomes and QEMU's.
pub fn alternate(h: &Harness, guest: Option<&Path>, s: &Setup) -> (Runs, Runs) {
    let (mut v, mut q) = (Vec::new(), Vec::new());
    for _ in 0..h.runs {
        v.push(migrate_vmsnap(h, s));
        if let Some(g) = guest {
            q.push(migrate_qemu(h, g, s));
        }
    }
    (v, q)
}

/// `NAME: N UNIT` from an `info migrate` reply.
fn hmp_num(reply: &str, name: &str, unit: &str) -> Option<u64> {
    hmp_field(reply, name)?
        .strip_suffix(unit)?
        .trim()
        .parse()
        .ok()
}

pub fn migrate_vmsnap(h: &Harness, s: &Setup) -> Result<Outcome, String> {
    if !Path::new("/dev/kvm").exists() {
        return Err("SKIPPED: /dev/kvm missing".into());
    }
    let port = free_port()?;
    let src_mon = h.path("vmsnap-src.sock");
    let dst_mon = h.path("vmsnap-dst.sock");
    let run = |mon: &Path| {
        let mut c = Command::new(vmsnap_bin());
        c.args(["run", "-m", s.mem, "--serial", "none", "--dirty-rate"])
            .arg(s.rate.to_string())
            .arg("--monitor")
            .arg(format!("unix:{}", mon.display()));
        if let (Some(span), true) = (s.span, s.rate > 0) {
            c.arg("--dirty-span").arg(span.to_string());
        }
        c
    };
    let _ = std::fs::remove_file(&src_mon);
    let _ = std::fs::remove_file(&dst_mon);
    let mut procs = Procs(Vec::new());
    procs.0.push(spawn(
        run(&dst_mon)
            .arg("--incoming")
            .arg(format!("tcp:127.0.0.1:{port}")),
    )?);
    procs.0.push(spawn(&mut run(&src_mon))?);
    let mut src = Hmp::connect(&src_mon)?;
    let mut caps = Vec::new();
    if s.postcopy {
        caps.push("postcopy-ram");
    }
    if s.xbzrle {
        caps.push("xbzrle");
    }
    if !caps.is_empty() {
        let mut dst = Hmp::connect(&dst_mon)?;
        for c in &caps {
            dst.cmd(&format!("migrate_set_capability {c} on"))?;
            src.cmd(&format!("migrate_set_capability {c} on"))?;
        }
    }
    std::thread::sleep(WARMUP);
    let measured_rate = if s.measure_rate {
        Some(measure_rate(|l| src.cmd(l))?)
    } else {
        None
    };
    if let Some(mib) = s.bandwidth_mib {
        src.cmd(&format!("migrate_set_parameter max-bandwidth {mib}M"))?;
    }
    if let Some(ms) = s.downtime_ms {
        src.cmd(&format!("migrate_set_parameter downtime-limit {ms}"))?;
    }
    if let Some(mib) = s.xbzrle_cache_mib {
        src.cmd(&format!("migrate_set_parameter xbzrle-cache-size {mib}M"))?;
    }
    let r = src.cmd(&format!("migrate -d tcp:127.0.0.1:{port}"))?;
    if r.to_lowercase().contains("error") || r.contains("unknown command") {
        return Err(format!("migrate: {}", r.trim()));
    }
    let start = Instant::now();
    let mut out = Outcome {
        measured_rate,
        ..Outcome::default()
    };
    let mut switch = s.postcopy.then_some(start + POSTCOPY_AFTER);
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if switch.is_some_and(|at| Instant::now() >= at) {
            src.cmd("migrate_start_postcopy")?;
            switch = None;
        }
        let info = src.cmd("info migrate")?;
        let status = hmp_field(&info, "Migration status").unwrap_or("");
        if let Some(r) = hmp_num(&info, "dirty pages rate", " pages") {
            out.dirty_pages_rate = out.dirty_pages_rate.max(r);
        }
        let kib = |name| hmp_num(&info, name, " kbytes").unwrap_or(0) << 10;
        out.transferred = kib("transferred ram");
        out.xbzrle_bytes = kib("xbzrle transferred");
        out.xbzrle_pages = hmp_num(&info, "xbzrle pages", " pages").unwrap_or(0);
        if status == "completed" {
            out.total = hmp_ms(&info, "total time").ok_or("no total time")?;
            out.downtime = hmp_ms(&info, "downtime").ok_or("no downtime")?;
            out.syncs = hmp_field(&info, "dirty sync count")
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            // The destination runs the guest on.
            let mut dst = Hmp::connect(&dst_mon)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let (_, st) = dst.cmd_status("")?;
                if st == "VM status: running" {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!("destination after migration: {st}"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = dst.cmd("quit");
            let _ = src.cmd("quit");
            return Ok(out);
        }
        if status.starts_with("failed")
            || status.starts_with("postcopy-paused")
            || status == "cancelled"
        {
            return Err(format!("migration {status}"));
        }
        if status.is_empty() && start.elapsed() > Duration::from_secs(2) {
            return Err(format!("info migrate without a status: {}", info.trim()));
        }
        if start.elapsed() > s.give_up {
            let _ = src.cmd("migrate_cancel");
            return Err(gave_up(s, &out));
        }
    }
}

/// Why a run that did not converge by `give_up` failed.
fn gave_up(s: &Setup, out: &Outcome) -> String {
    format!(
        "not completed after {:?} (cancelled); dirty pages rate {} pages/s",
        s.give_up, out.dirty_pages_rate
    )
}

/// `calc_dirty_rate 1` through the HMP command function `hmp`, then `info dirty_rate` until
/// measured: MiB/s.
fn measure_rate(mut hmp: impl FnMut(&str) -> Result<String, String>) -> Result<u64, String> {
    let r = hmp("calc_dirty_rate 1")?;
    if !r.starts_with("Starting dirty rate measurement") {
        return Err(format!("calc_dirty_rate: {}", r.trim()));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    std::thread::sleep(Duration::from_millis(1000));
    loop {
        let info = hmp("info dirty_rate")?;
        if info.contains("Status: measured") {
            return info
                .lines()
                .find_map(|l| l.strip_prefix("Dirty rate: ")?.strip_suffix(" (MB/s)"))
                .and_then(|v| v.trim().parse().ok())
                .ok_or(format!("info dirty_rate: {}", info.trim()));
        }
        if Instant::now() >= deadline {
            return Err(format!("info dirty_rate: {}", info.trim()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn qemu_cmd(guest: &Path, s: &Setup, qmp: &Path) -> Command {
    let mut c = Command::new(QEMU);
    let append = match s.span {
        Some(span) => format!("{},{span}", s.rate),
        None => s.rate.to_string(),
    };
    c.args([
        "-accel", "tcg", "-m", s.mem, "-display", "none", "-serial", "none",
    ])
    .args(["-nodefaults", "-no-user-config", "-kernel"])
    .arg(guest)
    .arg("-append")
    .arg(append)
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    c
}

pub fn migrate_qemu(h: &Harness, guest: &Path, s: &Setup) -> Result<Outcome, String> {
    let port = free_port()?;
    let src_qmp = h.path("qemu-src.qmp");
    let dst_qmp = h.path("qemu-dst.qmp");
    let _ = std::fs::remove_file(&src_qmp);
    let _ = std::fs::remove_file(&dst_qmp);
    let mut procs = Procs(Vec::new());
    procs.0.push(spawn(
        qemu_cmd(guest, s, &dst_qmp)
            .arg("-incoming")
            .arg(format!("tcp:127.0.0.1:{port}")),
    )?);
    procs.0.push(spawn(&mut qemu_cmd(guest, s, &src_qmp))?);
    let mut src = Qmp::connect(&src_qmp)?;
    let mut dst = Qmp::connect(&dst_qmp)?;
    std::thread::sleep(WARMUP);
    let measured_rate = if s.measure_rate {
        Some(measure_rate(|l| {
            let r = src.cmd("human-monitor-command", json!({ "command-line": l }))?;
            Ok(r.as_str().unwrap_or_default().replace('\r', ""))
        })?)
    } else {
        None
    };
    let mut params = serde_json::Map::new();
    if let Some(mib) = s.bandwidth_mib {
        params.insert("max-bandwidth".into(), json!(mib << 20));
    }
    if let Some(ms) = s.downtime_ms {
        params.insert("downtime-limit".into(), json!(ms));
    }
    if let Some(mib) = s.xbzrle_cache_mib {
        params.insert("xbzrle-cache-size".into(), json!(mib << 20));
    }
    if !params.is_empty() {
        src.cmd("migrate-set-parameters", Value::Object(params))?;
    }
    let mut caps = Vec::new();
    if s.postcopy {
        caps.push(json!({"capability": "postcopy-ram", "state": true}));
    }
    if s.xbzrle {
        caps.push(json!({"capability": "xbzrle", "state": true}));
    }
    if !caps.is_empty() {
        let caps = json!({ "capabilities": caps });
        dst.cmd("migrate-set-capabilities", caps.clone())?;
        src.cmd("migrate-set-capabilities", caps)?;
    }
    src.cmd("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))?;
    let start = Instant::now();
    let mut out = Outcome {
        measured_rate,
        ..Outcome::default()
    };
    let mut switch = s.postcopy.then_some(start + POSTCOPY_AFTER);
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if switch.is_some_and(|at| Instant::now() >= at) {
            src.cmd("migrate-start-postcopy", json!({}))?;
            switch = None;
        }
        let info = src.cmd("query-migrate", json!({}))?;
        let status = info.get("status").and_then(Value::as_str).unwrap_or("");
        let num = |p: &str| info.pointer(p).and_then(Value::as_u64);
        if let Some(r) = num("/ram/dirty-pages-rate") {
            out.dirty_pages_rate = out.dirty_pages_rate.max(r);
        }
        out.transferred = num("/ram/transferred").unwrap_or(out.transferred);
        out.xbzrle_bytes = num("/xbzrle-cache/bytes").unwrap_or(out.xbzrle_bytes);
        out.xbzrle_pages = num("/xbzrle-cache/pages").unwrap_or(out.xbzrle_pages);
        match status {
            "completed" => {
                let ms = |k: &str| {
                    info.get(k)
                        .and_then(Value::as_u64)
                        .map(Duration::from_millis)
                        .ok_or(format!("query-migrate without {k}: {info}"))
                };
                out.syncs = num("/ram/dirty-sync-count").unwrap_or(0);
                out.total = ms("total-time")?;
                out.downtime = ms("downtime")?;
                // The destination runs the guest on (it may still be finishing the load).
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let st = dst.cmd("query-status", json!({}))?;
                    if st.get("status").and_then(Value::as_str) == Some("running") {
                        return Ok(out);
                    }
                    if Instant::now() >= deadline {
                        return Err(format!("destination not running after migration: {st}"));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            "failed" | "cancelled" | "postcopy-paused" => {
                return Err(format!("migration {status}: {info}"))
            }
            _ => {}
        }
        if start.elapsed() > s.give_up {
            let _ = src.cmd("migrate_cancel", json!({}));
            return Err(gave_up(s, &out));
        }
    }
}

/// The run of median total time, with the median downtime of all; the failed runs printed
/// under `name` and `who`.
pub fn median(name: &str, who: &str, runs: &[Result<Outcome, String>]) -> Option<Outcome> {
    for e in runs.iter().filter_map(|r| r.as_ref().err()) {
        println!("{name}: {who}: {e}");
    }
    let mut ok: Vec<Outcome> = runs
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    if ok.is_empty() {
        return None;
    }
    ok.sort_by_key(|o| o.downtime);
    let downtime = ok[ok.len() / 2].downtime;
    ok.sort_by_key(|o| o.total);
    Some(Outcome {
        downtime,
        ..ok[ok.len() / 2]
    })
}
