//! Sizes as `qemu-img` and `qemu-io` read and print them.
//!
//! Reading follows `qemu_strtosz`: a decimal or `0x` hexadecimal number, an optional decimal
//! fraction (only with a unit), and an optional unit `B K M G T P E` (either case, powers of
//! 1024). Printing follows `size_to_str`: three significant digits of the largest binary unit
//! that keeps the number below 1000 (`28.7 MiB`, `0 B`, `1 KiB`).

/// A size string that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// No digits, an unknown unit or trailing garbage.
    #[error("Invalid size '{0}': expected a number with an optional unit (B, K, M, G, T, P, E)")]
    Invalid(String),
    /// A fraction without a unit, or a hexadecimal number with a unit or fraction.
    #[error("Invalid size '{0}': fractions need a unit and hexadecimal numbers take neither")]
    BadFraction(String),
    /// The value does not fit in 63 bits.
    #[error("Size '{0}' is too large")]
    TooLarge(String),
}

fn unit_shift(c: char) -> Option<u32> {
    Some(match c.to_ascii_uppercase() {
        'B' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        'T' => 40,
        'P' => 50,
        'E' => 60,
        _ => return None,
    })
}

/// Parses a size like `64M`, `1G`, `512`, `0x1000`, `1.5k`.
///
/// # Errors
/// [`SizeError`] naming the input.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let invalid = || SizeError::Invalid(s.to_owned());
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        if hex.is_empty() {
            return Err(invalid());
        }
        if !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(SizeError::BadFraction(s.to_owned()));
        }
        let v = u64::from_str_radix(hex, 16).map_err(|_| SizeError::TooLarge(s.to_owned()))?;
        return check_limit(v, s);
    }
    let int_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if int_end == 0 {
        return Err(invalid());
    }
    let int: u64 = t[..int_end]
        .parse()
        .map_err(|_| SizeError::TooLarge(s.to_owned()))?;
    let mut rest = &t[int_end..];
    let mut frac = "";
    if let Some(r) = rest.strip_prefix('.') {
        let end = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
        frac = &r[..end];
        rest = &r[end..];
    }
    let mut chars = rest.chars();
    let shift = match chars.next() {
        None => None,
        Some(c) => Some(unit_shift(c).ok_or_else(invalid)?),
    };
    if chars.next().is_some() {
        return Err(invalid());
    }
    let shift = shift.unwrap_or(0);
    if !frac.is_empty() && shift == 0 {
        return Err(SizeError::BadFraction(s.to_owned()));
    }
    let whole = int
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::TooLarge(s.to_owned()))?;
    // The fraction of a unit, truncated to whole bytes: digits / 10^n * 2^shift.
    let mut part = 0u64;
    if !frac.is_empty() {
        let digits = &frac[..frac.len().min(15)];
        let num: u128 = digits.parse().map_err(|_| invalid())?;
        let den = 10u128.pow(digits.len() as u32);
        part = u64::try_from((num << shift) / den).map_err(|_| SizeError::TooLarge(s.into()))?;
    }
    let v = whole
        .checked_add(part)
        .ok_or_else(|| SizeError::TooLarge(s.to_owned()))?;
    check_limit(v, s)
}

fn check_limit(v: u64, s: &str) -> Result<u64, SizeError> {
    if v > i64::MAX as u64 {
        Err(SizeError::TooLarge(s.to_owned()))
    } else {
        Ok(v)
    }
}

/// Formats `v` like C's `printf("%0.3g", v)` for finite `v >= 0`.
pub fn format_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".to_owned();
    }
    let e_form = format!("{v:.2e}");
    let (mant, exp) = e_form.split_once('e').unwrap_or((&e_form, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..3).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{}e{sign}{:02}", strip_zeros(mant), exp.abs());
    }
    let prec = (2 - exp) as usize;
    strip_zeros(&format!("{v:.prec$}")).to_owned()
}

fn strip_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// The binary exponent C's `frexp` returns for `x > 0` (`x = m * 2^e`, `0.5 <= m < 1`).
fn frexp_exp(x: f64) -> i32 {
    if x <= 0.0 || !x.is_finite() {
        return 0;
    }
    let biased = ((x.to_bits() >> 52) & 0x7ff) as i32;
    if biased == 0 {
        // Subnormal: cannot happen for the integers we format.
        return -1021;
    }
    biased - 1022
}

/// Formats a byte count like QEMU's `size_to_str` (`28.7 MiB`, `0 B`, `64 KiB`).
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let e = frexp_exp(val as f64 / (1000.0 / 1024.0));
    let i = (((e - 1) / 10).max(0) as usize).min(SUFFIXES.len() - 1);
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", format_g3(val as f64 / div), SUFFIXES[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
        assert_eq!(parse_size("100b"), Ok(100));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("15M"), Ok(15 << 20));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(parse_size(""), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size("k"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size("12x"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size("12kk"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size("-1"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size("1.5"), Err(SizeError::BadFraction(_))));
        assert!(matches!(
            parse_size("0x10k"),
            Err(SizeError::BadFraction(_))
        ));
        assert!(matches!(parse_size("16E"), Err(SizeError::TooLarge(_))));
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::TooLarge(_))
        ));
        assert_eq!(
            parse_size("12x").unwrap_err().to_string(),
            "Invalid size '12x': expected a number with an optional unit (B, K, M, G, T, P, E)"
        );
    }

    #[test]
    fn g3_matches_printf() {
        assert_eq!(format_g3(0.0), "0");
        assert_eq!(format_g3(28.66), "28.7");
        assert_eq!(format_g3(64.0), "64");
        assert_eq!(format_g3(1.0), "1");
        assert_eq!(format_g3(0.977), "0.977");
        assert_eq!(format_g3(999.7), "1e+03");
        assert_eq!(format_g3(123.4), "123");
        assert_eq!(format_g3(0.5), "0.5");
    }

    #[test]
    fn size_to_str_matches_qemu() {
        // From the fixtures' `qemu-img snapshot -l`: 30057799 bytes print as 28.7 MiB.
        assert_eq!(size_to_str(30_057_799), "28.7 MiB");
        assert_eq!(size_to_str(29_885_809), "28.5 MiB");
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(65536), "64 KiB");
        assert_eq!(size_to_str(64 << 20), "64 MiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
    }

    proptest::proptest! {
        #[test]
        fn parse_size_roundtrips(v in 0u64..(1 << 53), shift in 0usize..4) {
            let unit = ["", "K", "M", "G"][shift];
            let text = format!("{v}{unit}");
            let want = v.checked_mul(1 << (10 * shift)).filter(|&x| x <= i64::MAX as u64);
            proptest::prop_assert_eq!(parse_size(&text).ok(), want);
            proptest::prop_assert_eq!(parse_size(&format!("{v:#x}")), Ok(v));
        }

        #[test]
        fn size_to_str_keeps_three_digits(v in 0u64..u64::MAX) {
            let out = size_to_str(v);
            let (num, unit) = out.split_once(' ').unwrap();
            proptest::prop_assert!(unit.ends_with('B'));
            let digits = num.chars().filter(|c| c.is_ascii_digit()).count();
            proptest::prop_assert!(digits <= 4 || num.contains('e'), "{}", out);
        }
    }
}
