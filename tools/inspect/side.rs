//! One side of `--diff`/`--compat`/`--dump-guest-memory`: a stream file or `IMAGE@TAG`,
//! opened and analyzed, with positioned access to its page bodies.

use std::path::{Path, PathBuf};

use vmsnap::migration::analyze::{analyze, analyze_stream, Analysis, AnalyzeOptions};
use vmsnap::migration::stream::StreamReader;

use crate::input::{self, Input};
use crate::pages::{self, PageIndex};
use crate::InspectError;

/// Splits `SPEC` into a path and a snapshot tag: `IMAGE@TAG` names a snapshot unless `SPEC`
/// itself is an existing file (a stream file may have `@` in its name).
pub fn parse_spec(spec: &str) -> (PathBuf, Option<String>) {
    if Path::new(spec).exists() {
        return (PathBuf::from(spec), None);
    }
    match spec.rsplit_once('@') {
        Some((path, tag)) if !path.is_empty() && !tag.is_empty() => {
            (PathBuf::from(path), Some(tag.to_string()))
        }
        _ => (PathBuf::from(spec), None),
    }
}

/// An opened and analyzed side.
pub struct Side {
    /// The input.
    pub input: Input,
    /// What the decoder found (state, vmdesc, sections, RAM statistics).
    pub analysis: Analysis,
}

impl Side {
    /// Opens and analyzes `path` (with `tag`, a snapshot of the image `path`). A stream that
    /// fails its integrity record or does not decode to its end is trouble, not a side to
    /// compare (`vmsnap-inspect FILE` alone still decodes a damaged state, with a warning).
    pub fn open(path: &Path, tag: Option<&str>) -> Result<Side, InspectError> {
        let mut input = input::open(path, tag)?;
        if let Some(why) = input.damage() {
            return Err(InspectError::Side {
                label: input.label(),
                reason: format!("damaged: {why}"),
            });
        }
        let (analysis, _) = analyze_best(&mut input, &AnalyzeOptions::default())?;
        if let Some(e) = &analysis.error {
            return Err(InspectError::Side {
                label: input.label(),
                reason: e.to_string(),
            });
        }
        Ok(Side { input, analysis })
    }

    /// What is being read, for headings.
    pub fn label(&self) -> String {
        self.input.label()
    }

    /// Where each RAM page is (a second pass, seeking over page bodies of stream files).
    pub fn page_index(&mut self) -> Result<PageIndex, InspectError> {
        let ps = self.analysis.page_size;
        let label = self.input.label();
        let r = match self.input.mapped() {
            Some(m) => pages::index(StreamReader::new_seekable(m), ps),
            None => pages::index(StreamReader::new(self.input.reader()?), ps),
        };
        r.map_err(|e| InspectError::Side {
            label,
            reason: e.to_string(),
        })
    }
}

/// Analyzes the input: a stream file through a mapping with seeks over page bodies, anything
/// else by reading it.
pub fn analyze_input(holder: &mut Input, opts: &AnalyzeOptions) -> Result<Analysis, InspectError> {
    if let Some(m) = holder.mapped() {
        return Ok(analyze_stream(StreamReader::new_seekable(m), opts)?);
    }
    Ok(analyze(holder.reader()?, opts)?)
}

/// [`analyze_input`]; when decoding stops in RAM (a wrong guess of the target page size, which
/// only the vmdesc at the end states), the other sizes QEMU targets use are tried and the one
/// the vmdesc confirms is kept. Returns the analysis and the page size if one was retried.
pub fn analyze_best(
    holder: &mut Input,
    opts: &AnalyzeOptions,
) -> Result<(Analysis, Option<u64>), InspectError> {
    let analysis = analyze_input(holder, opts)?;
    if analysis.stopped_in_ram() {
        for ps in [8192, 16384, 65536, 1024, 2048] {
            let retry = AnalyzeOptions {
                page_size: Some(ps),
                ..opts.clone()
            };
            let a = analyze_input(holder, &retry)?;
            if a.error.is_none() && a.vmdesc_page_size() == Some(ps) {
                return Ok((a, Some(ps)));
            }
        }
    }
    Ok((analysis, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_name_snapshots_unless_the_file_exists() {
        assert_eq!(
            parse_spec("/nonexistent/disk.qcow2@first"),
            ("/nonexistent/disk.qcow2".into(), Some("first".into()))
        );
        assert_eq!(
            parse_spec("/nonexistent/s.bin"),
            ("/nonexistent/s.bin".into(), None)
        );
        assert_eq!(
            parse_spec("/nonexistent/x@"),
            ("/nonexistent/x@".into(), None)
        );
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("a@b");
        std::fs::write(&odd, b"").unwrap();
        assert_eq!(parse_spec(odd.to_str().unwrap()), (odd.clone(), None));
    }
}
