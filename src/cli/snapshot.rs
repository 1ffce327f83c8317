//! `vmsnap snapshot (-l | -c TAG | -a TAG | -d TAG) IMAGE... [--output human|json]`, like
//! `qemu-img snapshot`. Several images act as the disks of one VM: they form a [`BlockSet`],
//! so `-c` is all or nothing and `-a` first checks that every image has the snapshot.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{ArgGroup, Args};
use serde_json::{json, Value};

use super::image::{parse_format, Image};
use super::{table, OutputFormat};
use crate::block::{self, BlockSet, BlockSetError, OpenOptions, SnapshotParams};

/// Arguments of `snapshot`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("action").required(true).args(["list", "create", "apply", "delete"])))]
pub struct SnapshotArgs {
    /// List the snapshots.
    #[arg(short = 'l')]
    pub list: bool,
    /// Create a disk-only snapshot TAG on every image.
    #[arg(short = 'c', value_name = "TAG")]
    pub create: Option<String>,
    /// Revert every image to snapshot TAG (id or name).
    #[arg(short = 'a', value_name = "TAG")]
    pub apply: Option<String>,
    /// Delete snapshot TAG (id or name) from every image that has it.
    #[arg(short = 'd', value_name = "TAG")]
    pub delete: Option<String>,
    /// Image format (probed when absent).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Output format of `-l`.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Open without locks for `-l` (`-U`).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// The images of one VM, in drive order.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

/// Errors of `snapshot`.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// An image could not be opened.
    #[error("Could not open '{0}'")]
    Open(String, #[source] block::Error),
    /// `-U` with an action that writes.
    #[error("--force-share/-U is only allowed with -l")]
    ForceShareWrite,
    /// An all-devices operation failed.
    #[error(transparent)]
    Set(#[from] BlockSetError),
    /// `-c` with a tag that already exists on an image.
    #[error("Could not create snapshot '{tag}' on '{image}': a snapshot with this name exists")]
    Exists {
        /// The tag.
        tag: String,
        /// The image that has it.
        image: String,
    },
    /// `-a` with a tag some image lacks.
    #[error("Could not apply snapshot '{tag}': '{image}' has no such snapshot")]
    ApplyMissing {
        /// The tag.
        tag: String,
        /// The first image without it.
        image: String,
    },
    /// `-d` with a tag no image has.
    #[error("Could not delete snapshot '{0}': snapshot not found")]
    DeleteMissing(String),
    /// Flushing an image after the change failed.
    #[error("Could not flush the images")]
    Flush(#[source] block::Error),
}

fn open_all(args: &SnapshotArgs, read_only: bool) -> Result<BlockSet, SnapshotError> {
    let mut set = BlockSet::new();
    for path in &args.images {
        let name = path.display().to_string();
        let open_err = |e| SnapshotError::Open(name.clone(), e);
        let format = parse_format(args.format.as_deref()).map_err(open_err)?;
        let opts = OpenOptions {
            read_only,
            format: None,
            force_share: args.force_share,
        };
        let img = Image::open(path, format, opts).map_err(open_err)?;
        set.add(name.clone(), img.into_driver())?;
    }
    Ok(set)
}

fn list(args: &SnapshotArgs) -> Result<(), SnapshotError> {
    let mut set = open_all(args, true)?;
    let lists: Vec<(String, Vec<block::SnapshotInfo>)> = set
        .devices
        .iter_mut()
        .map(|d| {
            let l = d.driver.snapshots().map(|s| s.snapshot_list());
            (d.name.clone(), l.unwrap_or_default())
        })
        .collect();
    let several = lists.len() > 1;
    match args.output {
        OutputFormat::Json => {
            let v = if several {
                Value::Array(
                    lists
                        .iter()
                        .map(|(n, l)| json!({"filename": n, "snapshots": table::snapshots_json(l)}))
                        .collect(),
                )
            } else {
                lists
                    .first()
                    .map(|(_, l)| table::snapshots_json(l))
                    .unwrap_or_else(|| json!([]))
            };
            println!("{}", super::json_text(&v));
        }
        OutputFormat::Human => {
            for (name, l) in &lists {
                if several {
                    println!("image: {name}");
                }
                print!("{}", table::snapshot_table(l));
            }
        }
    }
    Ok(())
}

/// Creation parameters of a disk-only snapshot taken now (as `qemu-img snapshot -c`: no VM
/// state, guest clock 0, icount 0).
pub fn disk_only_params(tag: &str) -> SnapshotParams {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    SnapshotParams {
        name: tag.to_owned(),
        vm_state_size: 0,
        date_sec: u32::try_from(now.as_secs()).unwrap_or(u32::MAX),
        date_nsec: now.subsec_nanos(),
        vm_clock_nsec: 0,
        icount: Some(0),
        extra_tail: Vec::new(),
    }
}

fn has_name(set: &mut BlockSet, tag: &str) -> Option<String> {
    set.devices.iter_mut().find_map(|d| {
        let store = d.driver.snapshots()?;
        store
            .snapshot_list()
            .iter()
            .any(|s| s.name == tag)
            .then(|| d.name.clone())
    })
}

fn create(set: &mut BlockSet, tag: &str) -> Result<(), SnapshotError> {
    set.can_snapshot()?;
    if let Some(image) = has_name(set, tag) {
        return Err(SnapshotError::Exists {
            tag: tag.to_owned(),
            image,
        });
    }
    let vm = set.vmstate_device(None)?.name.clone();
    set.create(&disk_only_params(tag), &vm)?;
    Ok(())
}

fn apply(set: &mut BlockSet, tag: &str) -> Result<(), SnapshotError> {
    set.can_snapshot()?;
    if let Some(image) = set.find_missing(tag) {
        return Err(SnapshotError::ApplyMissing {
            tag: tag.to_owned(),
            image: image.to_owned(),
        });
    }
    set.goto(tag)?;
    Ok(())
}

fn delete(set: &mut BlockSet, tag: &str) -> Result<(), SnapshotError> {
    if set.delete(tag)? == 0 {
        return Err(SnapshotError::DeleteMissing(tag.to_owned()));
    }
    Ok(())
}

/// Runs `snapshot`.
///
/// # Errors
/// [`SnapshotError`].
pub fn snapshot_command(args: &SnapshotArgs) -> Result<(), SnapshotError> {
    if args.list {
        return list(args);
    }
    if args.force_share {
        return Err(SnapshotError::ForceShareWrite);
    }
    let mut set = open_all(args, false)?;
    let result = if let Some(tag) = &args.create {
        create(&mut set, tag)
    } else if let Some(tag) = &args.apply {
        apply(&mut set, tag)
    } else if let Some(tag) = &args.delete {
        delete(&mut set, tag)
    } else {
        Ok(())
    };
    // Flush even after a failure: a rollback may have changed metadata too.
    let flushed = set.flush().map_err(SnapshotError::Flush);
    result.and(flushed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_only_params_look_like_qemu_img() {
        let p = disk_only_params("t");
        assert_eq!(p.name, "t");
        assert_eq!(p.vm_state_size, 0);
        assert_eq!(p.vm_clock_nsec, 0);
        assert_eq!(p.icount, Some(0));
        assert!(p.date_sec > 1_600_000_000);
    }
}
