//! The provision report a guest writes on its second serial port (guest-controlled bytes):
//! `cloner::vm::provision::parse_report`.
//!
//! Properties: never a panic on arbitrary text; and for an arbitrary output and status, the
//! report framed as the wrapper frames it (base64 in 76-column lines, CRLF line ends as a serial
//! port may add, surrounded by noise) parses back to exactly that output and status.
#![no_main]

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use cloner::vm::provision::parse_report;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = parse_report(&text, "n0nce");

    // Round trip: the first byte picks the status, the rest is the output.
    let (status, output) = match data.split_first() {
        Some((s, rest)) => (i32::from(*s) - 128, rest),
        None => (0, data),
    };
    let encoded = STANDARD.encode(output);
    let mut log = String::from("noise before\r\nCOWCLONE-BEGIN n0nce\r\n");
    for chunk in encoded.as_bytes().chunks(76) {
        log.push_str(std::str::from_utf8(chunk).unwrap());
        log.push_str("\r\n");
    }
    log.push_str(&format!("COWCLONE-END n0nce {status}\r\nnoise after"));
    let parsed = parse_report(&log, "n0nce").expect("a complete report is found");
    assert_eq!(
        parsed,
        Ok((String::from_utf8_lossy(output).into_owned(), status)),
        "round trip"
    );
});
