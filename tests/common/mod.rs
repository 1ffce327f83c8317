//! Helpers shared by the integration tests: fixture paths, the vmsnap binary, QEMU's tools
//! (skipping loudly when absent), gunzipping fixtures, hashing and a seeded RNG.
#![allow(dead_code)]

pub mod kill_trace;
pub mod monitor;
pub mod qemu;
pub mod qmp;
pub mod run_vm;
pub mod ticks;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Whether `/dev/kvm` can be opened for reading and writing; says loudly, naming `what`,
/// that the caller skips when it cannot.
pub fn kvm(what: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("SKIPPED: {what}: /dev/kvm is missing or not accessible");
    }
    ok
}

/// The QEMU 7.2 fixture directory: `../shared/fixtures/qemu-7.2` next to the crate, or
/// `/work/shared/fixtures/qemu-7.2`.
pub fn fixtures() -> PathBuf {
    let near = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/qemu-7.2");
    if near.exists() {
        near
    } else {
        PathBuf::from("/work/shared/fixtures/qemu-7.2")
    }
}

/// The bytes of a gzipped fixture file, e.g. `mig-pc.bin.gz`.
pub fn gunzip(name: &str) -> Vec<u8> {
    let f = std::fs::File::open(fixtures().join(name)).unwrap();
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(f)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// Whether `tool` runs (`tool --version` succeeds).
pub fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Returns false (after printing a loud SKIPPED line) if any tool is missing.
pub fn require(test: &str, tools: &[&str]) -> bool {
    for t in tools {
        if !have(t) {
            eprintln!("SKIPPED: {test}: `{t}` is not installed");
            return false;
        }
    }
    true
}

/// The vmsnap binary under test.
pub fn vmsnap_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vmsnap")
}

/// Output of a finished process, for assertions and messages.
#[derive(Debug)]
pub struct Run {
    /// Exit code; `None` if killed by a signal.
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Asserts exit status 0 and returns self.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.code, Some(0), "command failed: {self:#?}");
        self
    }

    /// Asserts a clean failure: a non-zero exit code that is not a panic (101) or a signal.
    #[track_caller]
    pub fn fails_cleanly(self) -> Self {
        assert!(
            matches!(self.code, Some(c) if c != 0 && c != 101),
            "expected a clean error exit: {self:#?}"
        );
        assert!(!self.stderr.contains("panicked"), "panic: {self:#?}");
        self
    }
}

/// Runs a program with arguments, `TZ=UTC` so that dates are comparable.
pub fn run(prog: &str, args: &[&str]) -> Run {
    run_command(Command::new(prog).args(args))
}

/// Runs a prepared command to its end, `TZ=UTC`, nothing on its standard input.
pub fn run_command(cmd: &mut Command) -> Run {
    let o = cmd
        .env("TZ", "UTC")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", cmd.get_program()));
    Run::from(o)
}

/// Runs vmsnap.
pub fn vmsnap(args: &[&str]) -> Run {
    run(vmsnap_bin(), args)
}

/// Runs vmsnap with its address space limited (`ulimit -v`, KiB), so that an allocation the
/// input does not justify fails instead of succeeding quietly.
pub fn vmsnap_limited(kib: u64, args: &[&str]) -> Run {
    let mut sh_args = vec![
        "-c".to_owned(),
        format!("ulimit -v {kib}; exec \"$0\" \"$@\""),
        vmsnap_bin().to_owned(),
    ];
    sh_args.extend(args.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = sh_args.iter().map(String::as_str).collect();
    run("sh", &refs)
}

/// Runs `qemu-img`.
pub fn qemu_img(args: &[&str]) -> Run {
    run("qemu-img", args)
}

/// Runs `qemu-io` with `-c` commands.
pub fn qemu_io(fmt: &str, img: &Path, cmds: &[String]) -> Run {
    let mut args = vec!["-f".to_owned(), fmt.to_owned()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(img.display().to_string());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run("qemu-io", &refs)
}

/// Path as `&str` (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Copies a fixture (gunzipping `*.gz`) into `dir`, returning the new path without `.gz`.
pub fn fixture_copy(rel: &str, dir: &Path) -> PathBuf {
    let src = fixtures().join(rel);
    let name = Path::new(rel).file_name().unwrap().to_str().unwrap();
    if let Some(stem) = name.strip_suffix(".gz") {
        let dst = dir.join(stem);
        let mut data = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&src).unwrap())
            .read_to_end(&mut data)
            .unwrap();
        std::fs::write(&dst, data).unwrap();
        dst
    } else {
        let dst = dir.join(name);
        std::fs::copy(&src, &dst).unwrap();
        // Fixtures are read-only; the copy must be writable.
        let mut perm = std::fs::metadata(&dst).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perm.set_readonly(false);
        std::fs::set_permissions(&dst, perm).unwrap();
        dst
    }
}

/// SHA-256 of bytes, as lowercase hex (through `sha256sum`).
pub fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    {
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(data).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// SHA-256 of a file.
pub fn sha256_file(p: &Path) -> String {
    sha256(&std::fs::read(p).unwrap())
}

/// Guest content of an image layer as raw bytes, through `qemu-img convert` (`snapshot`:
/// a snapshot name, or `None` for the active layer).
pub fn qemu_layer(img: &Path, snapshot: Option<&str>, tmp: &Path) -> Vec<u8> {
    let out = tmp.join("layer.raw");
    let _ = std::fs::remove_file(&out);
    let mut args = vec!["convert", "-U", "-O", "raw"];
    let l;
    if let Some(n) = snapshot {
        l = format!("snapshot.name={n}");
        args.push("-l");
        args.push(&l);
    }
    args.push(s(img));
    args.push(s(&out));
    qemu_img(&args).ok();
    let data = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    data
}

/// `(id, name)` pairs of `qemu-img snapshot -l`.
pub fn qemu_snapshot_ids(img: &Path) -> Vec<(String, String)> {
    let r = qemu_img(&["snapshot", "-U", "-l", s(img)]).ok();
    r.stdout
        .lines()
        .skip(2)
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_owned(), w.next()?.to_owned()))
        })
        .collect()
}

/// Bytes of the file, for before/after comparisons.
pub fn file_hash(p: &Path) -> String {
    sha256_file(p)
}

/// A small deterministic RNG (splitmix64).
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// Next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A device whose whole state is one VMState value: saves it, and loads into it.
pub struct Dev(pub vmsnap::migration::Value);

impl vmsnap::migration::savevm::DeviceState for Dev {
    fn save(&self) -> vmsnap::migration::Value {
        self.0.clone()
    }
    fn load(&mut self, value: &vmsnap::migration::Value, _version: u32) -> Result<(), String> {
        self.0 = value.clone();
        Ok(())
    }
}

/// Runs the build script `script` (relative to the crate) and returns what it made, to
/// compare with the committed binary; None (after a loud SKIPPED line) without GNU as/ld.
pub fn rebuild(script: &str) -> Option<Vec<u8>> {
    if !have("as") || !have("ld") {
        eprintln!("SKIPPED: GNU as/ld not installed; cannot run {script}");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("guest.bin");
    let status = Command::new("sh")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(script))
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "{script} failed");
    Some(std::fs::read(&out).unwrap())
}

/// The number after `key` in a monitor reply such as `info migrate` (`key` includes the
/// colon: `"xbzrle pages:"`).
pub fn info_field(info: &str, key: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no '{key}' in:\n{info}"))
}

/// Whether every error `qemu-img check` printed is a COPIED flag missing on a cluster whose
/// refcount is 1: a leak for vmsnap, a corruption for qemu-img (formats/qcow2.md; a kill
/// inside snapshot create leaves it, see formats/kill-points.md).
pub fn only_missing_copied(qemu_msgs: &str) -> bool {
    let errors: Vec<&str> = qemu_msgs
        .lines()
        .filter(|l| l.starts_with("ERROR"))
        .collect();
    // The entry is printed in hex after `l1_entry=` or `l2_entry=`; bit 63 is COPIED.
    let flag_clear = |l: &str| {
        l.split_whitespace()
            .find_map(|w| {
                w.strip_prefix("l1_entry=")
                    .or_else(|| w.strip_prefix("l2_entry="))
            })
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .is_some_and(|e| e >> 63 == 0)
    };
    !errors.is_empty()
        && errors.iter().all(|l| {
            l.starts_with("ERROR OFLAG_COPIED") && l.ends_with(" refcount=1") && flag_clear(l)
        })
}

/// QEMU's `scripts/analyze-migration.py`, the tests' live oracle: `$VMSNAP_ANALYZE_MIGRATION`,
/// else `oracle/analyze-migration.py` beside the project's folder. `None`, after a loud
/// SKIPPED line naming `what`, when it or python3 is missing.
pub fn analyze_migration_script(what: &str) -> Option<PathBuf> {
    let script = std::env::var_os("VMSNAP_ANALYZE_MIGRATION")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../oracle/analyze-migration.py")
        });
    if !script.exists() || !have("python3") {
        eprintln!(
            "SKIPPED: {what}: analyze-migration.py ({}) or python3 is missing",
            script.display()
        );
        return None;
    }
    Some(script)
}

/// Runs the oracle with `args` (`-f FILE`, `--dump desc`, …); `None` when it is missing.
pub fn analyze_migration(what: &str, args: &[&str]) -> Option<Run> {
    let script = analyze_migration_script(what)?;
    Some(run_command(Command::new("python3").arg(script).args(args)))
}
