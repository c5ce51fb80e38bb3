//! `size::parse_size` on arbitrary UTF-8 (sizes come from the command line and `-o` options).
//!
//! Properties checked (beyond "never panics"):
//! 1. An error echoes the input unchanged.
//! 2. A result re-parses from its plain decimal form: `parse_size(v.to_string()) == Ok(v)`.
//! 3. Surrounding whitespace and the case of the suffix letter do not change the answer.
//! 4. The value lies where the text says: a `0x` hex number is exactly its digits (all of them:
//!    qemu-img takes no suffix after hex, so `0XD` is 13); with suffix shift `s`, an integer `n`
//!    is exactly `n << s`, and a decimal `w.f` is in `[w << s, (w + 1) << s)`.
#![no_main]

use imagefmt::size::parse_size;
use libfuzzer_sys::{fuzz_target, Corpus};

/// The suffix shift and the number part of `text` (already trimmed), as the grammar defines.
fn split_suffix(text: &str) -> Option<(&str, u32)> {
    match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                'e' => 60,
                _ => return None,
            };
            Some((&text[..i], shift))
        }
        _ => Some((text, 0)),
    }
}

fuzz_target!(|data: &[u8]| -> Corpus {
    let Ok(input) = std::str::from_utf8(data) else {
        return Corpus::Reject;
    };
    if input.len() > 256 {
        return Corpus::Reject;
    }
    let result = parse_size(input);

    // 3. Whitespace around and suffix case are irrelevant.
    assert_eq!(
        parse_size(input.trim()).ok(),
        result.as_ref().ok().copied(),
        "trim"
    );
    let text = input.trim();
    if let Some(last) = text.chars().last().filter(char::is_ascii_alphabetic) {
        let swapped = if last.is_ascii_uppercase() {
            last.to_ascii_lowercase()
        } else {
            last.to_ascii_uppercase()
        };
        let other = format!("{}{swapped}", &text[..text.len() - 1]);
        assert_eq!(
            parse_size(&other).ok(),
            result.as_ref().ok().copied(),
            "suffix case"
        );
    }

    let value = match result {
        Err(e) => {
            // 1.
            assert_eq!(e.input, input);
            return Corpus::Keep;
        }
        Ok(value) => value,
    };

    // 2.
    assert_eq!(
        parse_size(&value.to_string()),
        Ok(value),
        "decimal round trip"
    );

    // 4.
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        // Hex as qemu-img reads it (strtoull, and no suffix after it): every hex digit
        // belongs to the number, so "0XD" is 13, not 0 with an unknown suffix `D`.
        let n = u64::from_str_radix(hex, 16).expect("accepted hex is hex digits only");
        assert_eq!(value, n, "{input:?}: hex");
        return Corpus::Keep;
    }
    let (number, shift) = split_suffix(text).expect("accepted decimal has a known suffix");
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().expect("accepted whole part is decimal")
    };
    let low = whole << shift; // whole < 2^64 here or the value could not fit: no overflow
    if fraction.is_empty() {
        assert_eq!(u128::from(value), low, "{input:?}: integer × 2^{shift}");
    } else {
        let high = whole.saturating_add(1) << shift;
        assert!(
            low <= u128::from(value) && u128::from(value) < high,
            "{input:?} parsed to {value}, outside [{low}, {high})"
        );
    }
    Corpus::Keep
});
