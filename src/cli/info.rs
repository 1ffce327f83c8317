//! `vmsnap info IMAGE [--output human|json]`, like `qemu-img info`.

use std::path::PathBuf;

use clap::Args;
use serde_json::{json, Map, Value};

use super::image::{actual_size, parse_format, Image};
use super::size::size_to_str;
use super::{table, OutputFormat};
use crate::block::qcow2::ImageInfo;
use crate::block::{self, OpenOptions, SnapshotInfo};

/// Arguments of `info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The image file.
    pub image: PathBuf,
    /// Image format (probed when absent).
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Open without locks, even if another process uses the image (`-U`).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
}

/// Errors of `info`.
#[derive(Debug, thiserror::Error)]
pub enum InfoError {
    /// The image could not be opened.
    #[error("Could not open '{0}'")]
    Open(String, #[source] block::Error),
}

/// What `info` reports, gathered once for both output forms.
#[derive(Debug)]
pub struct InfoReport {
    /// The image path as given.
    pub filename: String,
    /// `qcow2` or `raw`.
    pub format: &'static str,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Host bytes allocated.
    pub actual_size: u64,
    /// qcow2 header facts.
    pub qcow2: Option<ImageInfo>,
    /// Snapshots in table order.
    pub snapshots: Vec<SnapshotInfo>,
    /// On fixed-size storage (an NBD export): its size and the bytes still free in it.
    pub room: Option<(u64, u64)>,
}

impl InfoReport {
    /// `qemu-img info --output=json`'s object.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        if !self.snapshots.is_empty() {
            m.insert("snapshots".into(), table::snapshots_json(&self.snapshots));
        }
        m.insert("virtual-size".into(), json!(self.virtual_size));
        m.insert("filename".into(), json!(self.filename));
        if let Some(q) = &self.qcow2 {
            m.insert("cluster-size".into(), json!(q.cluster_size));
        }
        m.insert("format".into(), json!(self.format));
        m.insert("actual-size".into(), json!(self.actual_size));
        if let Some(q) = &self.qcow2 {
            if let Some(b) = &q.backing_file {
                m.insert("backing-filename".into(), json!(b));
            }
            let mut data = json!({
                "compat": q.compat,
                "compression-type": q.compression_type,
                "lazy-refcounts": q.lazy_refcounts,
                "refcount-bits": q.refcount_bits,
                "corrupt": q.corrupt,
                "extended-l2": q.extended_l2,
            });
            if q.compat == "0.10" {
                // QEMU reports no feature flags for version 2 images.
                data = json!({
                    "compat": q.compat,
                    "compression-type": q.compression_type,
                    "refcount-bits": q.refcount_bits,
                });
            }
            m.insert(
                "format-specific".into(),
                json!({"type": "qcow2", "data": data}),
            );
        }
        m.insert(
            "dirty-flag".into(),
            json!(self.qcow2.as_ref().is_some_and(|q| q.dirty)),
        );
        if let Some((size, room)) = self.room {
            m.insert("export-size".into(), json!(size));
            m.insert("room-left".into(), json!(room));
        }
        Value::Object(m)
    }

    /// `qemu-img info`'s text.
    pub fn to_human(&self) -> String {
        let mut s = format!(
            "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
            self.filename,
            self.format,
            size_to_str(self.virtual_size),
            self.virtual_size,
            size_to_str(self.actual_size)
        );
        if let Some((size, room)) = self.room {
            s.push_str(&format!(
                "export size: {} ({size} bytes)\nroom left: {} ({room} bytes)\n",
                size_to_str(size),
                size_to_str(room)
            ));
        }
        if let Some(q) = &self.qcow2 {
            s.push_str(&format!("cluster_size: {}\n", q.cluster_size));
            if let Some(b) = &q.backing_file {
                s.push_str(&format!("backing file: {b}\n"));
            }
        }
        s.push_str(&table::snapshot_table(&self.snapshots));
        if let Some(q) = &self.qcow2 {
            s.push_str("Format specific information:\n");
            s.push_str(&format!("    compat: {}\n", q.compat));
            s.push_str(&format!("    compression type: {}\n", q.compression_type));
            if q.compat != "0.10" {
                s.push_str(&format!("    lazy refcounts: {}\n", q.lazy_refcounts));
            }
            s.push_str(&format!("    refcount bits: {}\n", q.refcount_bits));
            if q.compat != "0.10" {
                s.push_str(&format!("    corrupt: {}\n", q.corrupt));
                s.push_str(&format!("    extended l2: {}\n", q.extended_l2));
            }
        }
        s
    }
}

/// Gathers the report for `args`.
///
/// # Errors
/// [`InfoError::Open`].
pub fn gather(args: &InfoArgs) -> Result<InfoReport, InfoError> {
    let name = args.image.display().to_string();
    let open_err = |e| InfoError::Open(name.clone(), e);
    let format = parse_format(args.format.as_deref()).map_err(open_err)?;
    let opts = OpenOptions {
        read_only: true,
        format: None,
        force_share: args.force_share,
    };
    let mut img = Image::open(&args.image, format, opts).map_err(open_err)?;
    let qcow2 = match &img {
        Image::Qcow2(q) => Some(q.info()),
        Image::Raw(_) => None,
    };
    let room = match &mut img {
        Image::Qcow2(q) => match (q.fixed_size(), q.room_left().map_err(open_err)?) {
            (Some(size), Some(room)) => Some((size, room)),
            _ => None,
        },
        Image::Raw(_) => None,
    };
    let driver = img.driver();
    let snapshots = driver
        .snapshots()
        .map(|s| s.snapshot_list())
        .unwrap_or_default();
    Ok(InfoReport {
        filename: name.clone(),
        format: driver.format().name(),
        virtual_size: driver.size(),
        actual_size: actual_size(&args.image),
        qcow2,
        snapshots,
        room,
    })
}

/// Runs `info`.
///
/// # Errors
/// [`InfoError`].
pub fn info_command(args: &InfoArgs) -> Result<(), InfoError> {
    let report = gather(args)?;
    match args.output {
        OutputFormat::Json => println!("{}", super::json_text(&report.to_json())),
        OutputFormat::Human => print!("{}", report.to_human()),
    }
    Ok(())
}
