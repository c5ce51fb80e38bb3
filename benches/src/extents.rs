//! How much of a file's allocation is its own: the extents `filefrag -v` (e2fsprogs; FIEMAP)
//! lists without the `shared` flag. A reflink clone shares every extent with its base until
//! one of them is written, so its `st_blocks` counts space it does not add; this is what it
//! adds.

use std::path::Path;

use crate::tools;

/// Bytes in extents of `path` not shared with another file, as `filefrag -v` reports them; `None`
/// if filefrag is not installed or its output is not understood.
pub fn unshared_bytes(path: &Path) -> Option<u64> {
    let output = tools::run_ok("filefrag", &["-v".as_ref(), path.as_os_str()]).ok()?;
    parse_filefrag(&String::from_utf8_lossy(&output.stdout))
}

/// The unshared bytes in `filefrag -v` output: the block size from its `File size of … (N
/// blocks of B bytes)` line, then per extent line (`ext: logical: physical: length: [expected:]
/// flags`) the length in blocks, unless the flags say `shared`.
fn parse_filefrag(text: &str) -> Option<u64> {
    let block: u64 = text
        .lines()
        .find_map(|l| l.split(" blocks of ").nth(1))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let mut own = 0;
    for line in text.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        let is_extent = fields.len() >= 5
            && fields[0].trim().chars().all(|c| c.is_ascii_digit())
            && !fields[0].trim().is_empty();
        if !is_extent {
            continue;
        }
        let length: u64 = fields[3].trim().parse().ok()?;
        let flags = fields[fields.len() - 1];
        if !flags.split(',').any(|f| f.trim() == "shared") {
            own += length * block;
        }
    }
    Some(own)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_extents_are_not_counted() {
        let text = "Filesystem type is: 9123683e\n\
            File size of /m/r.qcow2 is 268763136 (65616 blocks of 4096 bytes)\n \
            ext:     logical_offset:        physical_offset: length:   expected: flags:\n   \
            0:        0..     255:       3328..      3583:    256:             shared\n   \
            1:      256..     511:      90000..     90255:    256:       3584:\n   \
            2:      512..   65615:       3840..     68943:  65104:      90256: last,shared,eof\n\
            /m/r.qcow2: 3 extents found\n";
        assert_eq!(parse_filefrag(text), Some(256 * 4096));
        assert_eq!(parse_filefrag("nonsense"), None);
    }
}
