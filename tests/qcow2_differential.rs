//! Differential test against QEMU: seeded random sequences of writes, zero-writes, discards
//! and snapshot create/apply/delete run once through vmsnap's library and once through
//! `qemu-io`/`qemu-img` on a twin image. After every snapshot operation `qemu-img check` on
//! vmsnap's image must be clean; at the end the active layer and every snapshot are
//! byte-identical between the twins (read by `qemu-img convert`, and the active layer also by
//! vmsnap), and `qemu-img snapshot -l` shows the same ids and names.
//!
//! Discards are whole clusters: QEMU drops the unaligned head and tail of a qcow2 discard, which
//! is allowed (discard is advisory) but would make the contents differ for a reason that has
//! nothing to do with correctness.

mod common;

use std::path::Path;

use common::{qemu_img, qemu_io, qemu_layer, qemu_snapshot_ids, require, s, Rng};
use vmsnap::block::qcow2::{Compat, CreateOptions, Qcow2};
use vmsnap::block::{BlockDriver, OpenOptions, SnapshotParams};

const STEPS: usize = 200;
const MAX_SNAPSHOTS: usize = 5;

#[derive(Debug, Clone)]
struct Config {
    name: &'static str,
    cluster_size: u64,
    refcount_bits: u32,
    compat: Compat,
    extended_l2: bool,
    size: u64,
    seed: u64,
}

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, pat: u8 },
    Zero { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
    Create(String),
    Apply(String),
    Delete(String),
}

impl Op {
    /// The qemu-io command for an I/O op.
    fn qemu_io(&self) -> Option<String> {
        Some(match self {
            Op::Write { off, len, pat } => format!("write -P {pat:#x} {off} {len}"),
            Op::Zero { off, len } => format!("write -z {off} {len}"),
            Op::Discard { off, len } => format!("discard {off} {len}"),
            _ => return None,
        })
    }
}

/// Draws the op sequence up front so that a failure can print it.
fn generate(cfg: &Config) -> Vec<Op> {
    let mut rng = Rng(cfg.seed);
    let mut live: Vec<String> = Vec::new();
    let mut next_name = 1;
    let sectors = cfg.size / 512;
    let max_len = (4 * cfg.cluster_size).clamp(64 << 10, 1 << 20);
    let mut ops = Vec::with_capacity(STEPS);
    while ops.len() < STEPS {
        let roll = rng.below(100);
        let io_range = |rng: &mut Rng| {
            let len = (1 + rng.below(max_len / 512)) * 512;
            // Half of the I/O goes to a hot area so that ops overlap and COW is exercised.
            let span = if rng.below(2) == 0 {
                (2 << 20).min(cfg.size) / 512
            } else {
                sectors
            };
            let off = rng.below(span) * 512;
            let off = off.min(cfg.size - len);
            (off, len)
        };
        let op = match roll {
            0..=44 => {
                let (off, len) = io_range(&mut rng);
                Op::Write {
                    off,
                    len,
                    pat: rng.below(256) as u8,
                }
            }
            45..=56 => {
                let (off, len) = io_range(&mut rng);
                Op::Zero { off, len }
            }
            57..=69 => {
                let clusters = cfg.size / cfg.cluster_size;
                let n = 1 + rng.below(4.min(clusters));
                let first = rng.below(clusters - n + 1);
                Op::Discard {
                    off: first * cfg.cluster_size,
                    len: n * cfg.cluster_size,
                }
            }
            70..=81 => {
                if live.len() >= MAX_SNAPSHOTS {
                    let i = rng.below(live.len() as u64) as usize;
                    Op::Delete(live.remove(i))
                } else {
                    let n = format!("snap{next_name}");
                    next_name += 1;
                    live.push(n.clone());
                    Op::Create(n)
                }
            }
            82..=90 if !live.is_empty() => {
                Op::Apply(live[rng.below(live.len() as u64) as usize].clone())
            }
            91..=99 if !live.is_empty() => {
                let i = rng.below(live.len() as u64) as usize;
                Op::Delete(live.remove(i))
            }
            _ => continue,
        };
        ops.push(op);
    }
    ops
}

fn params(name: &str) -> SnapshotParams {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    SnapshotParams {
        name: name.to_owned(),
        vm_state_size: 0,
        date_sec: now.as_secs() as u32,
        date_nsec: now.subsec_nanos(),
        vm_clock_nsec: 0,
        icount: Some(0),
        extra_tail: Vec::new(),
    }
}

fn apply_vmsnap(img: &mut Qcow2, op: &Op) -> vmsnap::block::Result<()> {
    match op {
        Op::Write { off, len, pat } => img.write_at(*off, &vec![*pat; *len as usize]),
        Op::Zero { off, len } => img.write_zeroes(*off, *len),
        Op::Discard { off, len } => img.discard(*off, *len),
        Op::Create(n) => img
            .snapshots()
            .expect("qcow2 has snapshots")
            .snapshot_create(&params(n))
            .map(drop),
        Op::Apply(n) => img.snapshots().expect("snapshots").snapshot_goto(n),
        Op::Delete(n) => img.snapshots().expect("snapshots").snapshot_delete(n),
    }
}

fn apply_qemu(twin: &Path, op: &Op) {
    let (flag, n) = match op {
        Op::Create(n) => ("-c", n),
        Op::Apply(n) => ("-a", n),
        Op::Delete(n) => ("-d", n),
        _ => unreachable!("I/O ops go through qemu-io batches"),
    };
    qemu_img(&["snapshot", flag, n, s(twin)]).ok();
}

fn flush_qemu_batch(twin: &Path, batch: &mut Vec<String>) {
    if batch.is_empty() {
        return;
    }
    let r = qemu_io("qcow2", twin, batch);
    assert_eq!(r.code, Some(0), "qemu-io failed: {r:?}");
    assert!(
        !r.stdout.contains("failed"),
        "qemu-io reported an error: {r:?}"
    );
    batch.clear();
}

fn context(ops: &[Op], i: usize) -> String {
    let from = i.saturating_sub(15);
    let lines: Vec<String> = ops[from..=i]
        .iter()
        .enumerate()
        .map(|(k, op)| format!("  step {}: {op:?}", from + k))
        .collect();
    lines.join("\n")
}

fn vmsnap_active(path: &Path, size: u64) -> Vec<u8> {
    let ro = OpenOptions {
        read_only: true,
        format: None,
        force_share: true,
    };
    let mut img = Qcow2::open(path, ro).unwrap();
    let mut data = vec![0u8; size as usize];
    for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
        img.read_at(i as u64 * (1 << 20), chunk).unwrap();
    }
    data
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn run(cfg: Config) {
    let test = format!("qcow2_differential::{}", cfg.name);
    if !require(&test, &["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("vmsnap.qcow2");
    let twin = dir.path().join("qemu.qcow2");
    let opts = CreateOptions {
        size: cfg.size,
        cluster_size: cfg.cluster_size as u32,
        refcount_bits: cfg.refcount_bits,
        compat: cfg.compat,
        extended_l2: cfg.extended_l2,
        ..Default::default()
    };
    Qcow2::create(&ours, &opts).unwrap();
    let o = format!(
        "cluster_size={},refcount_bits={},compat={},extended_l2={}",
        cfg.cluster_size,
        cfg.refcount_bits,
        if cfg.compat == Compat::V2 {
            "0.10"
        } else {
            "1.1"
        },
        if cfg.extended_l2 { "on" } else { "off" }
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &o,
        s(&twin),
        &cfg.size.to_string(),
    ])
    .ok();

    let ops = generate(&cfg);
    let rw = OpenOptions {
        read_only: false,
        format: None,
        force_share: false,
    };
    let mut img = Qcow2::open(&ours, rw).unwrap();
    let mut batch = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        if let Err(e) = apply_vmsnap(&mut img, op) {
            panic!(
                "{test}: vmsnap failed at step {i}: {e}\n{}",
                context(&ops, i)
            );
        }
        if let Some(cmd) = op.qemu_io() {
            batch.push(cmd);
            continue;
        }
        flush_qemu_batch(&twin, &mut batch);
        apply_qemu(&twin, op);
        img.flush().unwrap();
        let r = qemu_img(&["check", "-U", "--output=json", s(&ours)]);
        assert_eq!(
            r.code,
            Some(0),
            "{test}: qemu-img check after step {i} {op:?}: {r:#?}\n{}",
            context(&ops, i)
        );
    }
    flush_qemu_batch(&twin, &mut batch);
    img.flush().unwrap();
    drop(img);

    let r = qemu_img(&["check", s(&ours)]);
    assert_eq!(r.code, Some(0), "{test}: final qemu-img check: {r:#?}");
    assert!(r.stdout.contains("No errors were found"), "{r:#?}");

    let ids_ours = qemu_snapshot_ids(&ours);
    let ids_twin = qemu_snapshot_ids(&twin);
    assert_eq!(ids_ours, ids_twin, "{test}: snapshot ids and names differ");

    let active_twin = qemu_layer(&twin, None, dir.path());
    let active_ours = qemu_layer(&ours, None, dir.path());
    assert_eq!(
        first_difference(&active_ours, &active_twin),
        None,
        "{test}: active layer differs (qemu-img convert)"
    );
    let read_by_vmsnap = vmsnap_active(&ours, cfg.size);
    assert_eq!(
        first_difference(&read_by_vmsnap, &active_twin),
        None,
        "{test}: active layer read by vmsnap differs"
    );
    for (_, name) in &ids_twin {
        let a = qemu_layer(&ours, Some(name), dir.path());
        let b = qemu_layer(&twin, Some(name), dir.path());
        assert_eq!(
            first_difference(&a, &b),
            None,
            "{test}: snapshot {name} differs"
        );
    }
    eprintln!(
        "{test}: {} steps, {} snapshots at the end, twins identical",
        ops.len(),
        ids_twin.len()
    );
}

fn cfg(name: &'static str, cluster_size: u64, refcount_bits: u32, seed: u64) -> Config {
    Config {
        name,
        cluster_size,
        refcount_bits,
        compat: Compat::V3,
        extended_l2: false,
        size: 16 << 20,
        seed,
    }
}

#[test]
fn cluster_512() {
    run(cfg("cluster_512", 512, 16, 0x5121));
}

#[test]
fn cluster_64k() {
    run(cfg("cluster_64k", 65536, 16, 0x6464));
}

#[test]
fn cluster_2m() {
    run(Config {
        size: 32 << 20,
        ..cfg("cluster_2m", 2 << 20, 16, 0x2222)
    });
}

#[test]
fn refcount_bits_64() {
    run(cfg("refcount_bits_64", 65536, 64, 0x6401));
}

#[test]
fn compat_0_10() {
    run(Config {
        compat: Compat::V2,
        ..cfg("compat_0_10", 65536, 16, 0x0010)
    });
}

#[test]
fn extended_l2() {
    run(Config {
        extended_l2: true,
        ..cfg("extended_l2", 65536, 16, 0xe12)
    });
}

#[test]
fn cluster_512_compat_0_10() {
    run(Config {
        compat: Compat::V2,
        ..cfg("cluster_512_compat_0_10", 512, 16, 0x51200)
    });
}

#[test]
fn generator_is_deterministic_and_mixed() {
    let c = cfg("gen", 65536, 16, 7);
    let a = generate(&c);
    let b = generate(&c);
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
    assert_eq!(a.len(), STEPS);
    let count = |f: fn(&Op) -> bool| a.iter().filter(|o| f(o)).count();
    assert!(count(|o| matches!(o, Op::Write { .. })) > 50);
    assert!(count(|o| matches!(o, Op::Zero { .. })) > 5);
    assert!(count(|o| matches!(o, Op::Discard { .. })) > 5);
    assert!(count(|o| matches!(o, Op::Create(_))) > 5);
    assert!(count(|o| matches!(o, Op::Apply(_))) > 3);
    assert!(count(|o| matches!(o, Op::Delete(_))) > 3);
    for o in &a {
        match *o {
            Op::Write { off, len, .. } | Op::Zero { off, len } => {
                assert!(off % 512 == 0 && len % 512 == 0 && off + len <= c.size)
            }
            Op::Discard { off, len } => {
                assert!(off % c.cluster_size == 0 && len % c.cluster_size == 0);
                assert!(off + len <= c.size);
            }
            _ => {}
        }
    }
}
