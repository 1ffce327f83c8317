//! `vmsnap create [-f qcow2|raw] [-o OPTIONS] IMAGE SIZE`, like `qemu-img create`.

use std::path::PathBuf;

use clap::Args;

use super::size::{parse_size, SizeError};
use crate::block::qcow2::{Compat, CreateOptions, Qcow2};
use crate::block::raw::Raw;
use crate::block::{self, Format};

/// Arguments of `create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Image format.
    #[arg(short = 'f', default_value = "qcow2")]
    pub format: String,
    /// Format options, `key=value` separated by commas (may be repeated): cluster_size,
    /// refcount_bits, compat, extended_l2, lazy_refcounts, backing_file, backing_fmt.
    #[arg(short = 'o')]
    pub options: Vec<String>,
    /// The image file to create.
    pub image: PathBuf,
    /// Virtual size (`64M`, `1G`, `512`).
    pub size: String,
}

/// Errors of `create`.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The format name is unknown.
    #[error("Unknown file format '{0}'")]
    UnknownFormat(String),
    /// The size or a size option could not be read.
    #[error(transparent)]
    Size(#[from] SizeError),
    /// An `-o` item is not `key=value` or the key is unknown for the format.
    #[error("Invalid parameter '{0}'")]
    InvalidOption(String),
    /// An `-o` value is not allowed.
    #[error("Invalid value '{value}' for option '{key}': {why}")]
    InvalidValue {
        /// The option.
        key: String,
        /// The value given.
        value: String,
        /// What is allowed.
        why: &'static str,
    },
    /// The driver refused to create the image.
    #[error("{0}: Could not create image")]
    Create(String, #[source] block::Error),
}

fn on_off(key: &str, value: &str) -> Result<bool, CreateError> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(CreateError::InvalidValue {
            key: key.into(),
            value: value.into(),
            why: "expected on or off",
        }),
    }
}

/// Applies `-o` items to qcow2 creation options.
///
/// # Errors
/// [`CreateError::InvalidOption`] or [`CreateError::InvalidValue`] naming the item.
pub fn apply_qcow2_options(opts: &mut CreateOptions, items: &[String]) -> Result<(), CreateError> {
    for item in items
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
    {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| CreateError::InvalidOption(item.to_owned()))?;
        let bad = |why| CreateError::InvalidValue {
            key: key.into(),
            value: value.into(),
            why,
        };
        match key {
            "cluster_size" => {
                let v = parse_size(value)?;
                if !v.is_power_of_two() || !(512..=2 << 20).contains(&v) {
                    return Err(bad("a power of two between 512 and 2M"));
                }
                opts.cluster_size = v as u32;
            }
            "refcount_bits" => {
                let v: u32 = value.parse().map_err(|_| bad("a power of two up to 64"))?;
                if !v.is_power_of_two() || v > 64 {
                    return Err(bad("a power of two up to 64"));
                }
                opts.refcount_bits = v;
            }
            "compat" => {
                opts.compat = match value {
                    "0.10" | "v2" => Compat::V2,
                    "1.1" | "v3" => Compat::V3,
                    _ => return Err(bad("0.10 or 1.1")),
                }
            }
            "extended_l2" => opts.extended_l2 = on_off(key, value)?,
            "lazy_refcounts" => opts.lazy_refcounts = on_off(key, value)?,
            "backing_file" => opts.backing_file = Some(value.to_owned()),
            "backing_fmt" => opts.backing_format = Some(value.to_owned()),
            "size" => opts.size = parse_size(value)?,
            _ => return Err(CreateError::InvalidOption(item.to_owned())),
        }
    }
    Ok(())
}

/// Builds the creation options for `args` (size and `-o` items).
///
/// # Errors
/// Bad size or options.
pub fn qcow2_options(args: &CreateArgs) -> Result<CreateOptions, CreateError> {
    let mut opts = CreateOptions {
        size: parse_size(&args.size)?,
        ..Default::default()
    };
    apply_qcow2_options(&mut opts, &args.options)?;
    Ok(opts)
}

fn flag(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// Whether `key` was given among the `-o` items.
fn has_option(items: &[String], key: &str) -> bool {
    items
        .iter()
        .flat_map(|s| s.split(','))
        .any(|i| i.split_once('=').is_some_and(|(k, _)| k == key))
}

/// The `Formatting '…', fmt=qcow2 …` line, in `qemu-img create`'s order (compat only when
/// given).
pub fn formatting_line(name: &str, o: &CreateOptions, show_compat: bool) -> String {
    let mut line = format!(
        "Formatting '{name}', fmt=qcow2 cluster_size={} extended_l2={} compression_type=zlib \
         size={}",
        o.cluster_size,
        flag(o.extended_l2),
        o.size
    );
    if let Some(b) = &o.backing_file {
        line.push_str(&format!(" backing_file={b}"));
    }
    if let Some(b) = &o.backing_format {
        line.push_str(&format!(" backing_fmt={b}"));
    }
    if show_compat {
        let compat = match o.compat {
            Compat::V2 => "0.10",
            Compat::V3 => "1.1",
        };
        line.push_str(&format!(" compat={compat}"));
    }
    line.push_str(&format!(
        " lazy_refcounts={} refcount_bits={}",
        flag(o.lazy_refcounts),
        o.refcount_bits
    ));
    line
}

/// Runs `create`.
///
/// # Errors
/// [`CreateError`].
pub fn create_command(args: &CreateArgs) -> Result<(), CreateError> {
    let format: Format = args
        .format
        .parse()
        .map_err(|_| CreateError::UnknownFormat(args.format.clone()))?;
    let name = args.image.display().to_string();
    match format {
        Format::Raw => {
            if let Some(o) = args.options.iter().find(|o| !o.is_empty()) {
                return Err(CreateError::InvalidOption(o.clone()));
            }
            let size = parse_size(&args.size)?;
            println!("Formatting '{name}', fmt=raw size={size}");
            Raw::create(&args.image, size).map_err(|e| CreateError::Create(name, e))
        }
        Format::Qcow2 => {
            let o = qcow2_options(args)?;
            println!(
                "{}",
                formatting_line(&name, &o, has_option(&args.options, "compat"))
            );
            Qcow2::create(&args.image, &o).map_err(|e| CreateError::Create(name, e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(items: &[&str]) -> Result<CreateOptions, CreateError> {
        let mut o = CreateOptions::default();
        let items: Vec<String> = items.iter().map(|s| s.to_string()).collect();
        apply_qcow2_options(&mut o, &items).map(|()| o)
    }

    #[test]
    fn parses_qemu_img_options() {
        let o = opts(&[
            "cluster_size=512,refcount_bits=64,compat=0.10",
            "lazy_refcounts=off,backing_file=b.img,backing_fmt=raw",
        ])
        .unwrap();
        assert_eq!(o.cluster_size, 512);
        assert_eq!(o.refcount_bits, 64);
        assert_eq!(o.compat, Compat::V2);
        assert_eq!(o.backing_file.as_deref(), Some("b.img"));
        assert_eq!(o.backing_format.as_deref(), Some("raw"));
        let o = opts(&["cluster_size=2M,extended_l2=on,compat=1.1"]).unwrap();
        assert_eq!(o.cluster_size, 2 << 20);
        assert!(o.extended_l2);
        assert_eq!(o.compat, Compat::V3);
        assert_eq!(opts(&["cluster_size=64k"]).unwrap().cluster_size, 65536);
    }

    #[test]
    fn formatting_line_as_qemu_img() {
        // `qemu-img create -f qcow2 -o compat=0.10 v2.qcow2 1M`, QEMU 7.2.
        let o = CreateOptions {
            size: 1 << 20,
            compat: Compat::V2,
            ..Default::default()
        };
        assert_eq!(
            formatting_line("v2.qcow2", &o, true),
            "Formatting 'v2.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off \
             compression_type=zlib size=1048576 compat=0.10 lazy_refcounts=off refcount_bits=16"
        );
        let o = CreateOptions {
            size: 1 << 20,
            backing_file: Some("a.raw".into()),
            backing_format: Some("raw".into()),
            ..Default::default()
        };
        assert_eq!(
            formatting_line("bk.qcow2", &o, false),
            "Formatting 'bk.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off \
             compression_type=zlib size=1048576 backing_file=a.raw backing_fmt=raw \
             lazy_refcounts=off refcount_bits=16"
        );
    }

    #[test]
    fn rejects_bad_options() {
        assert!(matches!(
            opts(&["cluster_size=1000"]),
            Err(CreateError::InvalidValue { .. })
        ));
        assert!(matches!(
            opts(&["cluster_size=4M"]),
            Err(CreateError::InvalidValue { .. })
        ));
        assert!(matches!(
            opts(&["refcount_bits=3"]),
            Err(CreateError::InvalidValue { .. })
        ));
        assert!(matches!(
            opts(&["refcount_bits=128"]),
            Err(CreateError::InvalidValue { .. })
        ));
        assert!(matches!(
            opts(&["compat=2"]),
            Err(CreateError::InvalidValue { .. })
        ));
        assert!(matches!(
            opts(&["extended_l2=maybe"]),
            Err(CreateError::InvalidValue { .. })
        ));
        assert!(matches!(
            opts(&["nonsense=1"]),
            Err(CreateError::InvalidOption(_))
        ));
        assert!(matches!(
            opts(&["novalue"]),
            Err(CreateError::InvalidOption(_))
        ));
        assert!(matches!(
            opts(&["cluster_size=zz"]),
            Err(CreateError::Size(_))
        ));
    }
}
