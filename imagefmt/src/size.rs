//! Numbers as qemu-img reads them: human sizes (`1G`, `512M`, `64k`, `1.5T`, plain bytes) and
//! plain integers in C's base-0 syntax.

use thiserror::Error;

/// A size string that is not a size.
#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "invalid size {input:?}: expected a number of bytes with an optional suffix k, M, G, T, P or E"
)]
pub struct InvalidSize {
    /// The text given.
    pub input: String,
}

/// Parses a size as qemu-img does: a decimal number (a fraction only with a suffix other than
/// bytes) with an optional binary suffix `b`/`B` (bytes), `k`/`K`, `M`, `G`, `T`, `P`, `E`
/// (powers of 1024), or a `0x` hex number without a suffix.
pub fn parse_size(input: &str) -> Result<u64, InvalidSize> {
    let err = || InvalidSize {
        input: input.to_owned(),
    };
    let text = input.trim();
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        // As qemu-img 10 reads it (qemu_strtosz): hex digits only, every one of them part of
        // the number ("0x1e" is 30, "0XD" is 13), and no suffix ("0x10M" is refused; qemu 6.0
        // deprecated hex with a suffix, and later releases refuse it).
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err());
        }
        return u64::from_str_radix(hex, 16).map_err(|_| err());
    }
    let (number, shift) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c {
                'b' | 'B' => 0,
                'k' | 'K' => 10,
                'm' | 'M' => 20,
                'g' | 'G' => 30,
                't' | 'T' => 40,
                'p' | 'P' => 50,
                'e' | 'E' => 60,
                _ => return Err(err()),
            };
            (&text[..i], shift)
        }
        _ => (text, 0),
    };
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(err());
    }
    if number.contains('.') && shift == 0 {
        // qemu-img refuses fractional byte counts such as "1.5".
        return Err(err());
    }
    match number.split_once('.') {
        None => number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(1u64 << shift))
            .ok_or_else(err),
        Some((whole, fraction)) if !fraction.is_empty() && !fraction.contains('.') => {
            // Exact decimal arithmetic: value = (whole.fraction) × 2^shift, rounded down.
            let digits = u32::try_from(fraction.len()).map_err(|_| err())?;
            let scale = 10u128.checked_pow(digits).ok_or_else(err)?;
            let whole: u128 = if whole.is_empty() {
                0
            } else {
                whole.parse().map_err(|_| err())?
            };
            let fraction: u128 = fraction.parse().map_err(|_| err())?;
            let value = (whole
                .checked_mul(scale)
                .and_then(|w| w.checked_add(fraction))
                .ok_or_else(err)?)
            .checked_mul(1u128 << shift)
            .ok_or_else(err)?
                / scale;
            u64::try_from(value).map_err(|_| err())
        }
        Some(_) => Err(err()),
    }
}

/// An integer in the syntax C's `strtol` family reads with base 0, as qemu-img reads counts and
/// option values: leading blanks, an optional sign, then `0x`/`0X` and hex digits, a leading `0`
/// and octal digits, or decimal digits, and nothing after them (no suffix). `None` when the text
/// is not such a number. A magnitude past `i128`'s range saturates, so every caller's range
/// check refuses it.
pub fn parse_c_integer(text: &str) -> Option<i128> {
    let text = text.trim_start();
    let (negative, unsigned) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let (digits, radix) = if let Some(hex) = unsigned
        .strip_prefix("0x")
        .or_else(|| unsigned.strip_prefix("0X"))
    {
        (hex, 16)
    } else if unsigned.len() > 1 && unsigned.starts_with('0') {
        (&unsigned[1..], 8)
    } else {
        (unsigned, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let magnitude = i128::from_str_radix(digits, radix).unwrap_or(i128::MAX);
    Some(if negative { -magnitude } else { magnitude })
}

#[cfg(test)]
mod tests {
    use super::{parse_c_integer, parse_size};

    #[test]
    fn suffixes_are_powers_of_1024_and_plain_numbers_are_bytes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("512b").unwrap(), 512);
        assert_eq!(parse_size("0x100000").unwrap(), 1 << 20);
        assert_eq!(parse_size("0x1e").unwrap(), 30);
        assert_eq!(parse_size("0x1b").unwrap(), 27);
        assert_eq!(parse_size("0XD").unwrap(), 13);
    }

    #[test]
    fn hex_takes_no_suffix_as_in_current_qemu() {
        // qemu-io 10.0.2: "read 0 0x10k" -> "Parsing error: non-numeric argument, or
        // extraneous/unrecognized suffix"; "read 0 0x10b" reads 267 bytes (b is a hex digit).
        for bad in [
            "0x10k", "0x10M", "0X1g", "0x1T", "0x1p", "0x", "0x1.5", "0x-1",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_size("0x10b").unwrap(), 0x10b);
        assert_eq!(parse_size("0xffffffffffffffff").unwrap(), u64::MAX);
        assert!(parse_size("0x10000000000000000").is_err());
    }

    #[test]
    fn garbage_and_overflow_are_refused() {
        for bad in [
            "",
            "G",
            "1X",
            "-1",
            "1..5G",
            "1.G",
            "20E",
            "18446744073709551616",
            "1 G",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn c_integers_take_hex_octal_decimal_and_a_sign_but_no_suffix() {
        assert_eq!(parse_c_integer("010"), Some(8));
        assert_eq!(parse_c_integer("0x10"), Some(16));
        assert_eq!(parse_c_integer("0X1f"), Some(31));
        assert_eq!(parse_c_integer(" +5"), Some(5));
        assert_eq!(parse_c_integer("-0x2"), Some(-2));
        assert_eq!(parse_c_integer("0"), Some(0));
        assert_eq!(parse_c_integer("-0"), Some(0));
        for bad in ["", "10k", "0x", "08", "--1", "- 1", "1 ", "abc", "+"] {
            assert_eq!(parse_c_integer(bad), None, "{bad:?} accepted");
        }
        assert_eq!(parse_c_integer(&"9".repeat(60)), Some(i128::MAX));
    }
}
