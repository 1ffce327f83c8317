//! Migration parameters and capabilities, with QEMU 7.2's names, defaults and HMP parsing
//! (`migrate_set_parameter`, `migrate_set_capability`, `info migrate_parameters`,
//! `info migrate_capabilities`).

use std::fmt::Write as _;

/// Errors setting a parameter or capability.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParamError {
    /// The name is not a parameter or capability QEMU knows.
    #[error("invalid parameter value: {0}")]
    UnknownName(String),
    /// QEMU knows it, vmsnap does not implement it.
    #[error("'{0}' is not supported by vmsnap")]
    Unsupported(String),
    /// A size with a bad number or suffix (QEMU's wording).
    #[error("Invalid size {0}")]
    InvalidSize(String),
    /// A value out of the parameter's range.
    #[error("Parameter '{name}' expects {expects}")]
    OutOfRange {
        /// The parameter.
        name: &'static str,
        /// What it accepts.
        expects: &'static str,
    },
    /// A capability state that is not on/off.
    #[error("Parameter 'state' expects 'on' or 'off', got '{0}'")]
    BadState(String),
    /// Parameters cannot change while a migration runs.
    #[error("There's a migration process in progress")]
    Busy,
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, ParamError>;

/// QEMU 7.2's default `max-bandwidth`: 128 MiB/s.
pub const DEFAULT_MAX_BANDWIDTH: u64 = 128 << 20;
/// QEMU 7.2's default `downtime-limit` in ms.
pub const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 300;
/// Largest `downtime-limit` QEMU accepts (2000 s).
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;

/// QEMU 7.2's default `xbzrle-cache-size`: 64 MiB.
pub const DEFAULT_XBZRLE_CACHE_SIZE: u64 = 64 << 20;

/// The parameters vmsnap uses (others are printed with QEMU's defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parameters {
    /// Bytes per second the source may send while the guest runs (0 = no limit). The
    /// stop-and-copy phase is never limited.
    pub max_bandwidth: u64,
    /// Longest acceptable stop-and-copy, in ms.
    pub downtime_limit_ms: u64,
    /// Auto-converge trigger: dirtied bytes above this percentage of the bytes sent in a
    /// period count as "dirtying too fast".
    pub throttle_trigger_threshold: u8,
    /// First throttle step, percent.
    pub cpu_throttle_initial: u8,
    /// Later throttle steps, percent.
    pub cpu_throttle_increment: u8,
    /// Highest throttle, percent.
    pub max_cpu_throttle: u8,
    /// Bytes of the source's XBZRLE page cache (a power of two, at least one page).
    pub xbzrle_cache_size: u64,
    /// Bytes per second of the background pages in postcopy (0 = no limit); the pages the
    /// destination asks for are never held back.
    pub max_postcopy_bandwidth: u64,
}

impl Default for Parameters {
    fn default() -> Self {
        Parameters {
            max_bandwidth: DEFAULT_MAX_BANDWIDTH,
            downtime_limit_ms: DEFAULT_DOWNTIME_LIMIT_MS,
            throttle_trigger_threshold: 50,
            cpu_throttle_initial: 20,
            cpu_throttle_increment: 10,
            max_cpu_throttle: 99,
            xbzrle_cache_size: DEFAULT_XBZRLE_CACHE_SIZE,
            max_postcopy_bandwidth: 0,
        }
    }
}

/// Parses a size the way QEMU's HMP `migrate_set_parameter max-bandwidth` does
/// (`qemu_strtosz_MiB`): a number, possibly fractional, with an optional suffix B, K, M, G,
/// T, P or E (binary units, any case); without a suffix the unit is MiB.
pub fn parse_size_mib(s: &str) -> Result<u64> {
    parse_size(s, 20)
}

/// Parses a size with `qemu_strtosz`'s syntax; a number without suffix is in units of
/// `1 << default_shift` bytes.
fn parse_size(s: &str, default_shift: u32) -> Result<u64> {
    let bad = || ParamError::InvalidSize(s.to_string());
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() {
        return Err(bad());
    }
    let shift = match suffix {
        "" => default_shift,
        "B" | "b" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        "P" | "p" => 50,
        "E" | "e" => 60,
        _ => return Err(bad()),
    };
    let mult = 1u64 << shift;
    if let Some((int, frac)) = num.split_once('.') {
        if frac.contains('.') {
            return Err(bad());
        }
        // Fractions are allowed with a unit above bytes, as QEMU does.
        if shift == 0 {
            return Err(bad());
        }
        let whole: u64 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| bad())?
        };
        let f: f64 = format!("0.{frac}").parse().map_err(|_| bad())?;
        let base = whole.checked_mul(mult).ok_or_else(bad)?;
        base.checked_add((f * mult as f64) as u64).ok_or_else(bad)
    } else {
        let n: u64 = num.parse().map_err(|_| bad())?;
        n.checked_mul(mult).ok_or_else(bad)
    }
}

fn parse_percent(name: &'static str, v: &str, lo: u8, hi: u8) -> Result<u8> {
    let expects = match (lo, hi) {
        (1, 99) => "an integer in the range of 1 to 99",
        (1, 100) => "an integer in the range of 1 to 100",
        _ => "an integer in the range of 0 to 100",
    };
    v.parse::<u8>()
        .ok()
        .filter(|p| (lo..=hi).contains(p))
        .ok_or(ParamError::OutOfRange { name, expects })
}

impl Parameters {
    /// `migrate_set_parameter NAME VALUE`.
    pub fn set(&mut self, name: &str, value: &str) -> Result<()> {
        match name {
            "max-bandwidth" => self.max_bandwidth = parse_size_mib(value)?,
            "downtime-limit" => {
                self.downtime_limit_ms = value
                    .parse::<u64>()
                    .ok()
                    .filter(|&ms| ms <= MAX_DOWNTIME_LIMIT_MS)
                    .ok_or(ParamError::OutOfRange {
                        name: "downtime_limit",
                        expects: "an integer in the range of 0 to 2000 seconds",
                    })?
            }
            "throttle-trigger-threshold" => {
                self.throttle_trigger_threshold =
                    parse_percent("throttle_trigger_threshold", value, 1, 100)?
            }
            "cpu-throttle-initial" => {
                self.cpu_throttle_initial = parse_percent("cpu_throttle_initial", value, 1, 99)?
            }
            "cpu-throttle-increment" => {
                self.cpu_throttle_increment = parse_percent("cpu_throttle_increment", value, 1, 99)?
            }
            "max-cpu-throttle" => {
                self.max_cpu_throttle = parse_percent("max_cpu_throttle", value, 1, 99)?
            }
            "xbzrle-cache-size" => {
                // HMP reads this one in bytes (visit_type_size); QEMU checks it against the
                // target page size, vmsnap's is 4 KiB.
                let n = parse_size(value, 0)?;
                if n < 4096 || !n.is_power_of_two() {
                    return Err(ParamError::OutOfRange {
                        name: "xbzrle_cache_size",
                        expects: "a power of two no less than the target page size",
                    });
                }
                self.xbzrle_cache_size = n;
            }
            // HMP reads it in bytes (visit_type_size), as xbzrle-cache-size.
            "max-postcopy-bandwidth" => self.max_postcopy_bandwidth = parse_size(value, 0)?,
            other if QEMU_OTHER_PARAMETERS.contains(&other) => {
                return Err(ParamError::Unsupported(other.to_string()))
            }
            other => return Err(ParamError::UnknownName(other.to_string())),
        }
        Ok(())
    }

    /// `info migrate_parameters`, in QEMU 7.2's order and wording (parameters vmsnap does
    /// not use show QEMU's defaults).
    pub fn to_hmp(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "announce-initial: 50 ms\n\
             announce-max: 550 ms\n\
             announce-rounds: 5\n\
             announce-step: 100 ms\n\
             compress-level: 1\n\
             compress-threads: 8\n\
             compress-wait-thread: on\n\
             decompress-threads: 2\n\
             throttle-trigger-threshold: {}\n\
             cpu-throttle-initial: {}\n\
             cpu-throttle-increment: {}\n\
             cpu-throttle-tailslow: off\n\
             max-cpu-throttle: {}\n\
             tls-creds: ''\n\
             tls-hostname: ''\n\
             max-bandwidth: {} bytes/second\n\
             downtime-limit: {} ms\n\
             x-checkpoint-delay: 20000 ms\n\
             block-incremental: off\n\
             multifd-channels: 2\n\
             multifd-compression: none\n\
             xbzrle-cache-size: {} bytes\n\
             max-postcopy-bandwidth: {}\n\
             tls-authz: ''",
            self.throttle_trigger_threshold,
            self.cpu_throttle_initial,
            self.cpu_throttle_increment,
            self.max_cpu_throttle,
            self.max_bandwidth,
            self.downtime_limit_ms,
            self.xbzrle_cache_size,
            self.max_postcopy_bandwidth,
        );
        s
    }
}

/// Parameters QEMU 7.2 has that vmsnap does not implement.
const QEMU_OTHER_PARAMETERS: &[&str] = &[
    "announce-initial",
    "announce-max",
    "announce-rounds",
    "announce-step",
    "compress-level",
    "compress-threads",
    "compress-wait-thread",
    "decompress-threads",
    "cpu-throttle-tailslow",
    "tls-creds",
    "tls-hostname",
    "tls-authz",
    "x-checkpoint-delay",
    "block-incremental",
    "multifd-channels",
    "multifd-compression",
    "multifd-zlib-level",
    "multifd-zstd-level",
    "block-bitmap-mapping",
];

/// QEMU 7.2's capabilities, in `info migrate_capabilities` order.
pub const QEMU_CAPABILITIES: &[&str] = &[
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "compress",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "block",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
];

/// Capabilities vmsnap implements (others can only be set to off). Capabilities beyond
/// QEMU's are added to [`EXTRA_CAPABILITIES`] and listed after QEMU's.
pub const SUPPORTED_CAPABILITIES: &[&str] = &[
    "xbzrle",
    "auto-converge",
    "events",
    "postcopy-ram",
    crate::migration::ram::LZ4_CAPABILITY,
];

/// vmsnap's own capabilities: `x-vmsnap-lz4` sends RAM pages LZ4-compressed (announced in
/// the stream's configuration; QEMU refuses such a stream, so it is off by default).
pub const EXTRA_CAPABILITIES: &[&str] = &[crate::migration::ram::LZ4_CAPABILITY];

/// The capability switches, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    on: Vec<&'static str>,
}

impl Capabilities {
    fn known(name: &str) -> Option<&'static str> {
        QEMU_CAPABILITIES
            .iter()
            .chain(EXTRA_CAPABILITIES)
            .find(|n| **n == name)
            .copied()
    }

    /// Whether `name` is on.
    pub fn is_on(&self, name: &str) -> bool {
        self.on.contains(&name)
    }

    /// Shorthand for the `x-vmsnap-lz4` capability.
    pub fn lz4(&self) -> bool {
        self.is_on(crate::migration::ram::LZ4_CAPABILITY)
    }

    /// Shorthand for the xbzrle capability.
    pub fn xbzrle(&self) -> bool {
        self.is_on("xbzrle")
    }

    /// Shorthand for the postcopy-ram capability.
    pub fn postcopy_ram(&self) -> bool {
        self.is_on("postcopy-ram")
    }

    /// Shorthand for the auto-converge capability.
    pub fn auto_converge(&self) -> bool {
        self.is_on("auto-converge")
    }

    /// `migrate_set_capability NAME on|off`.
    pub fn set(&mut self, name: &str, state: &str) -> Result<()> {
        let on = match state {
            "on" | "true" | "yes" => true,
            "off" | "false" | "no" => false,
            other => return Err(ParamError::BadState(other.to_string())),
        };
        let known = Self::known(name).ok_or_else(|| ParamError::UnknownName(name.to_string()))?;
        self.on.retain(|n| *n != known);
        if on {
            if !SUPPORTED_CAPABILITIES.contains(&known) {
                return Err(ParamError::Unsupported(known.to_string()));
            }
            self.on.push(known);
        }
        Ok(())
    }

    /// `info migrate_capabilities`: every capability with on/off.
    pub fn to_hmp(&self) -> String {
        QEMU_CAPABILITIES
            .iter()
            .chain(EXTRA_CAPABILITIES)
            .map(|n| format!("{n}: {}", if self.is_on(n) { "on" } else { "off" }))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_qemu_strtosz_mib() {
        assert_eq!(parse_size_mib("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size_mib("100").unwrap(), 100 << 20);
        assert_eq!(parse_size_mib("512k").unwrap(), 512 << 10);
        assert_eq!(parse_size_mib("4096B").unwrap(), 4096);
        assert_eq!(parse_size_mib("1.5M").unwrap(), 3 << 19);
        assert_eq!(
            parse_size_mib("12x").unwrap_err().to_string(),
            "Invalid size 12x"
        );
        assert!(parse_size_mib("").is_err());
        assert!(parse_size_mib("1.5B").is_err());
        assert!(parse_size_mib("99999999999E").is_err());
    }

    #[test]
    fn parameters_set_and_print_like_qemu() {
        let mut p = Parameters::default();
        assert!(p
            .to_hmp()
            .contains("max-bandwidth: 134217728 bytes/second\ndowntime-limit: 300 ms"));
        p.set("max-bandwidth", "1G").unwrap();
        p.set("downtime-limit", "50").unwrap();
        assert_eq!((p.max_bandwidth, p.downtime_limit_ms), (1 << 30, 50));
        assert!(p.set("downtime-limit", "2000001").is_err());
        assert!(p.set("downtime-limit", "-1").is_err());
        assert_eq!(
            p.set("bogus", "1").unwrap_err().to_string(),
            "invalid parameter value: bogus"
        );
        assert!(matches!(
            p.set("multifd-channels", "4"),
            Err(ParamError::Unsupported(_))
        ));
        p.set("cpu-throttle-initial", "30").unwrap();
        assert!(p.set("cpu-throttle-initial", "0").is_err());
        assert!(p.to_hmp().contains("cpu-throttle-initial: 30\n"));
        assert_eq!(p.to_hmp().lines().count(), 24);
        assert!(p.to_hmp().contains("xbzrle-cache-size: 67108864 bytes\n"));
        p.set("xbzrle-cache-size", "8M").unwrap();
        p.set("xbzrle-cache-size", "65536").unwrap();
        assert_eq!(p.xbzrle_cache_size, 65536);
        for bad in ["1024", "12288"] {
            assert_eq!(
                p.set("xbzrle-cache-size", bad).unwrap_err().to_string(),
                "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size"
            );
        }
    }

    #[test]
    fn capabilities_toggle_and_list() {
        let mut c = Capabilities::default();
        assert!(!c.auto_converge());
        c.set("auto-converge", "on").unwrap();
        assert!(c.auto_converge());
        assert!(c.to_hmp().contains("\nauto-converge: on\n"));
        assert_eq!(
            c.to_hmp().lines().count(),
            QEMU_CAPABILITIES.len() + EXTRA_CAPABILITIES.len()
        );
        assert!(c.to_hmp().ends_with("\nx-vmsnap-lz4: off"));
        c.set("x-vmsnap-lz4", "on").unwrap();
        assert!(c.lz4() && c.to_hmp().ends_with("\nx-vmsnap-lz4: on"));
        c.set("auto-converge", "off").unwrap();
        assert!(!c.auto_converge());
        c.set("xbzrle", "on").unwrap();
        assert!(c.xbzrle() && c.to_hmp().starts_with("xbzrle: on\n"));
        c.set("xbzrle", "off").unwrap();
        assert!(matches!(
            c.set("x-colo", "on"),
            Err(ParamError::Unsupported(_))
        ));
        assert!(matches!(
            c.set("bogus", "on"),
            Err(ParamError::UnknownName(_))
        ));
        assert!(matches!(
            c.set("auto-converge", "maybe"),
            Err(ParamError::BadState(_))
        ));
    }
}
