//! `vmsnap check IMAGE [-r leaks|all] [--output human|json]`, like `qemu-img check`.
//!
//! Exit status as `qemu-img check`: 0 clean, 1 check failed, 2 corruptions, 3 leaks only,
//! 63 when the format has no checks (raw).

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde_json::{json, Map, Value};

use super::image::{parse_format, Image};
use super::OutputFormat;
use crate::block::qcow2::{CheckReport, Repair};
use crate::block::{self, OpenOptions};

/// `-r` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RepairArg {
    /// Repair leaked clusters only.
    Leaks,
    /// Repair leaks and corruptions.
    All,
}

/// Arguments of `check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The image file.
    pub image: PathBuf,
    /// Image format (probed when absent).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Repair what was found (opens the image writable).
    #[arg(short = 'r', value_enum)]
    pub repair: Option<RepairArg>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Open without locks (`-U`); not with `-r`.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
}

/// Errors of `check` that prevent a report.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The image could not be opened.
    #[error("Could not open '{0}'")]
    Open(String, #[source] block::Error),
    /// `-U` together with `-r`.
    #[error("--force-share/-U cannot be used with -r (repair needs write access)")]
    ForceShareRepair,
}

/// Exit status for "the check itself failed".
pub const EXIT_CHECK_FAILED: i32 = 1;
/// Exit status for corruptions found.
pub const EXIT_CORRUPTIONS: i32 = 2;
/// Exit status for leaks only.
pub const EXIT_LEAKS: i32 = 3;
/// Exit status when the format has no consistency checks.
pub const EXIT_NOT_SUPPORTED: i32 = 63;

/// The exit status `qemu-img check` gives a report.
pub fn exit_code(r: &CheckReport) -> i32 {
    if r.check_errors > 0 {
        EXIT_CHECK_FAILED
    } else if r.corruptions > 0 {
        EXIT_CORRUPTIONS
    } else if r.leaks > 0 {
        EXIT_LEAKS
    } else {
        0
    }
}

fn insert_nonzero(m: &mut Map<String, Value>, key: &str, v: u64) {
    if v != 0 {
        m.insert(key.into(), json!(v));
    }
}

/// `qemu-img check --output=json`'s object: optional counters only when non-zero, keys in
/// the order QEMU 7.2 prints them (its QDict's hash-bucket order, checked against qemu-img
/// on damaged and repaired images).
pub fn report_json(r: &CheckReport, filename: &str) -> Value {
    let mut m = Map::new();
    insert_nonzero(&mut m, "image-end-offset", r.image_end_offset);
    insert_nonzero(&mut m, "compressed-clusters", r.compressed_clusters);
    insert_nonzero(&mut m, "total-clusters", r.total_clusters);
    insert_nonzero(&mut m, "corruptions", r.corruptions);
    insert_nonzero(&mut m, "corruptions-fixed", r.corruptions_fixed);
    m.insert("check-errors".into(), json!(r.check_errors));
    insert_nonzero(&mut m, "leaks", r.leaks);
    insert_nonzero(&mut m, "leaks-fixed", r.leaks_fixed);
    insert_nonzero(&mut m, "allocated-clusters", r.allocated_clusters);
    m.insert("filename".into(), json!(filename));
    m.insert("format".into(), json!("qcow2"));
    insert_nonzero(&mut m, "fragmented-clusters", r.fragmented_clusters);
    Value::Object(m)
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// `qemu-img check`'s text summary (the per-cluster findings go to stderr separately).
pub fn report_human(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.corruptions_fixed > 0 || r.leaks_fixed > 0 {
        s.push_str(&format!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    \
             {} corruptions\n\nDouble checking the fixed image now...\n",
            r.leaks_fixed, r.corruptions_fixed
        ));
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes \
                 to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, \
                 but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors > 0 {
            s.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters, r.total_clusters),
            pct(r.fragmented_clusters, r.allocated_clusters),
            pct(r.compressed_clusters, r.allocated_clusters)
        ));
    }
    if r.image_end_offset != 0 {
        s.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    s
}

/// Runs `check`; returns the exit status.
///
/// # Errors
/// [`CheckError`] when the image cannot be opened. A check that starts but fails prints
/// `qemu-img: Check failed: …` and returns status 1 instead.
pub fn check_command(args: &CheckArgs) -> Result<i32, CheckError> {
    if args.force_share && args.repair.is_some() {
        return Err(CheckError::ForceShareRepair);
    }
    let name = args.image.display().to_string();
    let open_err = |e| CheckError::Open(name.clone(), e);
    let format = parse_format(args.format.as_deref()).map_err(open_err)?;
    let opts = OpenOptions {
        read_only: args.repair.is_none(),
        format: None,
        force_share: args.force_share,
    };
    let img = Image::open(&args.image, format, opts).map_err(open_err)?;
    let Image::Qcow2(mut q) = img else {
        eprintln!("vmsnap: This image format does not support checks");
        return Ok(EXIT_NOT_SUPPORTED);
    };
    let repair = args.repair.map(|r| match r {
        RepairArg::Leaks => Repair::Leaks,
        RepairArg::All => Repair::All,
    });
    let result = q.check(repair);
    let flushed = if args.repair.is_some() {
        use crate::block::BlockDriver;
        q.flush()
    } else {
        Ok(())
    };
    let report = match result.and_then(|r| flushed.map(|()| r)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "vmsnap: Check failed: {}",
                super::error_chain(&e as &dyn std::error::Error)
            );
            return Ok(EXIT_CHECK_FAILED);
        }
    };
    for m in &report.messages {
        eprintln!("{m}");
    }
    let damaged = vmstate_integrity(q.as_mut());
    let room = q.fixed_size().zip(q.room_left().ok().flatten());
    match args.output {
        OutputFormat::Json => {
            let mut v = report_json(&report, &name);
            if let (Value::Object(m), false) = (&mut v, damaged.is_empty()) {
                m.insert("vmstate-damaged".into(), json!(damaged));
            }
            if let (Value::Object(m), Some((size, left))) = (&mut v, room) {
                m.insert("export-size".into(), json!(size));
                m.insert("room-left".into(), json!(left));
            }
            println!("{}", super::json_text(&v))
        }
        OutputFormat::Human => {
            print!("{}", report_human(&report));
            if let Some((size, left)) = room {
                println!("Room left on the export: {left} of {size} bytes");
            }
        }
    }
    Ok(exit_code_with_vmstate(exit_code(&report), &damaged))
}

// ---- vmsnap integrity records (src/interop, formats/snapshot-integrity.md) ----

/// Verifies every snapshot's VM state against its CRC32 record; prints one line per damaged
/// snapshot on stderr and returns their names. QEMU-made snapshots have no record and pass.
fn vmstate_integrity(store: &mut dyn crate::block::SnapshotStore) -> Vec<String> {
    crate::interop::integrity::damaged_snapshots(store)
        .into_iter()
        .map(|(name, msg)| {
            eprintln!("ERROR {msg}");
            name
        })
        .collect()
}

/// A damaged VM state counts as a corruption (exit 2) unless the check itself failed.
fn exit_code_with_vmstate(code: i32, damaged: &[String]) -> i32 {
    if damaged.is_empty() || code == EXIT_CHECK_FAILED {
        code
    } else {
        EXIT_CORRUPTIONS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> CheckReport {
        CheckReport {
            image_end_offset: 32256,
            total_clusters: 32768,
            allocated_clusters: 27,
            fragmented_clusters: 2,
            ..Default::default()
        }
    }

    #[test]
    fn json_matches_fixture_keys() {
        // fixtures/qemu-7.2/cluster-512.check.json
        let v = report_json(&report(), "cluster-512.qcow2");
        let want: Value = serde_json::from_str(
            r#"{"image-end-offset": 32256, "total-clusters": 32768, "check-errors": 0,
                "allocated-clusters": 27, "filename": "cluster-512.qcow2", "format": "qcow2",
                "fragmented-clusters": 2}"#,
        )
        .unwrap();
        assert_eq!(v, want);
        let leaky = CheckReport {
            leaks: 1,
            ..report()
        };
        assert_eq!(report_json(&leaky, "x")["leaks"], 1);
        assert!(report_json(&leaky, "x").get("corruptions").is_none());
    }

    #[test]
    fn exit_codes_follow_qemu_img() {
        assert_eq!(exit_code(&report()), 0);
        let r = CheckReport {
            leaks: 1,
            ..report()
        };
        assert_eq!(exit_code(&r), 3);
        let r = CheckReport {
            leaks: 1,
            corruptions: 1,
            ..report()
        };
        assert_eq!(exit_code(&r), 2);
        let r = CheckReport {
            check_errors: 1,
            corruptions: 1,
            ..report()
        };
        assert_eq!(exit_code(&r), 1);
    }

    #[test]
    fn damaged_vmstate_is_a_corruption() {
        let d = ["s".to_string()];
        assert_eq!(exit_code_with_vmstate(0, &d), EXIT_CORRUPTIONS);
        assert_eq!(exit_code_with_vmstate(EXIT_LEAKS, &d), EXIT_CORRUPTIONS);
        assert_eq!(
            exit_code_with_vmstate(EXIT_CHECK_FAILED, &d),
            EXIT_CHECK_FAILED
        );
        assert_eq!(exit_code_with_vmstate(EXIT_LEAKS, &[]), EXIT_LEAKS);
    }

    #[test]
    fn human_summary() {
        let s = report_human(&report());
        assert_eq!(
            s,
            "No errors were found on the image.\n\
             27/32768 = 0.08% allocated, 7.41% fragmented, 0.00% compressed clusters\n\
             Image end offset: 32256\n"
        );
        let r = CheckReport {
            leaks: 1,
            ..report()
        };
        assert!(report_human(&r).contains("\n1 leaked clusters were found on the image.\n"));
    }
}
