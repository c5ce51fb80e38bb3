//! The one output path: every command's report goes through [`emit`], which writes JSON in
//! qemu-img's layout ([`write_qemu_json`]) or hands the value to the command's human renderer;
//! [`human_size`] is the one size formatter; [`write_info`] renders `info` like qemu-img.

use std::io::{self, Write};

use imagefmt::ops::info::{FormatSpecific, ImageInfo, SnapshotInfo};

use crate::args::OutputFormat;

/// Writes `value` in the chosen format: JSON as qemu-img writes it, or for people with `human`.
pub fn emit<W: Write, T: serde::Serialize + ?Sized>(
    out: &mut W,
    format: OutputFormat,
    value: &T,
    human: impl FnOnce(&mut W, &T) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => Ok(write_qemu_json(out, value)?),
        OutputFormat::Human => human(out, value),
    }
}

/// A table for people: a header row, then one row per item, columns as wide as their widest
/// cell (long names are never cut or wrapped), separated by two spaces, no borders.
pub fn table<I, S>(header: I) -> comfy_table::Table
where
    I: IntoIterator<Item = S>,
    S: Into<comfy_table::Cell>,
{
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(header);
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    table
}

/// Writes `table` (see [`table`]) with its lines' trailing spaces trimmed.
pub fn write_table(out: &mut impl Write, table: &comfy_table::Table) -> io::Result<()> {
    for line in table.lines() {
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// Orders names as people count: `web-1, web-2, web-10` (digit runs compare as numbers).
pub fn natural_order(a: &str, b: &str) -> std::cmp::Ordering {
    natord::compare(a, b)
}

/// A size the way qemu prints it: three significant digits and a binary unit ("196 KiB").
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    let digits = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    };
    let text = format!("{value:.digits$}");
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    };
    format!("{text} {}", UNITS[unit])
}

/// Writes one image's facts as `qemu-img info` does.
pub fn write_info(out: &mut impl Write, info: &ImageInfo) -> io::Result<()> {
    writeln!(out, "image: {}", info.filename)?;
    writeln!(out, "file format: {}", info.format)?;
    writeln!(
        out,
        "virtual size: {} ({} bytes)",
        human_size(info.virtual_size),
        info.virtual_size
    )?;
    writeln!(out, "disk size: {}", human_size(info.actual_size))?;
    if let Some(cluster_size) = info.cluster_size {
        writeln!(out, "cluster_size: {cluster_size}")?;
    }
    if let Some(backing) = &info.backing_filename {
        match &info.full_backing_filename {
            Some(full) if full != backing => {
                writeln!(out, "backing file: {backing} (actual path: {full})")?
            }
            _ => writeln!(out, "backing file: {backing}")?,
        }
    }
    if let Some(format) = &info.backing_filename_format {
        writeln!(out, "backing file format: {format}")?;
    }
    if let Some(snapshots) = &info.snapshots {
        write_snapshot_list(out, snapshots)?;
    }
    match &info.format_specific {
        Some(FormatSpecific::Qcow2(q)) => {
            writeln!(out, "Format specific information:")?;
            writeln!(out, "    compat: {}", q.compat)?;
            if let Some(c) = &q.compression_type {
                writeln!(out, "    compression type: {c}")?;
            }
            if let Some(v) = q.lazy_refcounts {
                writeln!(out, "    lazy refcounts: {v}")?;
            }
            if let Some(bitmaps) = &q.bitmaps {
                write_bitmaps(out, bitmaps)?;
            }
            writeln!(out, "    refcount bits: {}", q.refcount_bits)?;
            if let Some(name) = &q.data_file {
                writeln!(out, "    data file: {name}")?;
            }
            if let Some(raw) = q.data_file_raw {
                writeln!(out, "    data file raw: {raw}")?;
            }
            if let Some(v) = q.corrupt {
                writeln!(out, "    corrupt: {v}")?;
            }
            if let Some(v) = q.extended_l2 {
                writeln!(out, "    extended l2: {v}")?;
            }
        }
        Some(FormatSpecific::Vdi(v)) => {
            writeln!(out, "Format specific information:")?;
            writeln!(out, "    image type: {}", v.image_type)?;
            writeln!(out, "    uuid: {}", v.uuid)?;
            writeln!(out, "    modification uuid: {}", v.modification_uuid)?;
            if let Some(p) = &v.parent_uuid {
                writeln!(out, "    parent uuid: {p}")?;
            }
            if let Some(p) = &v.parent_modification_uuid {
                writeln!(out, "    parent modification uuid: {p}")?;
            }
        }
        None => {}
    }
    if info.dirty_flag {
        writeln!(out, "dirty flag: true")?;
    }
    write_children(out, &info.children)
}

/// Writes the "Child node" sections `qemu-img info` ends an image with (qemu-img 10).
pub fn write_children(
    out: &mut impl Write,
    children: &[imagefmt::ops::info::ChildInfo],
) -> io::Result<()> {
    for child in children {
        let node = &child.info;
        writeln!(out, "Child node '/{}':", child.name)?;
        writeln!(out, "    filename: {}", node.filename)?;
        writeln!(out, "    protocol type: {}", node.format)?;
        writeln!(
            out,
            "    file length: {} ({} bytes)",
            human_size(node.virtual_size),
            node.virtual_size
        )?;
        writeln!(out, "    disk size: {}", human_size(node.actual_size))?;
    }
    Ok(())
}

/// Writes qcow2's `bitmaps:` section of `qemu-img info` (indented as qemu-img indents it).
fn write_bitmaps(
    out: &mut impl Write,
    bitmaps: &[imagefmt::ops::info::BitmapInfo],
) -> io::Result<()> {
    writeln!(out, "    bitmaps:")?;
    for (i, bitmap) in bitmaps.iter().enumerate() {
        writeln!(out, "        [{i}]:")?;
        writeln!(out, "            flags:")?;
        for (j, flag) in bitmap.flags.iter().enumerate() {
            writeln!(out, "                [{j}]: {flag}")?;
        }
        writeln!(out, "            name: {}", bitmap.name)?;
        writeln!(out, "            granularity: {}", bitmap.granularity)?;
    }
    Ok(())
}

/// Writes "Snapshot list:" and the table of `snapshots` as qemu-img prints it (`snapshot -l`,
/// `info`): qemu's columns ID, TAG, VM_SIZE, DATE (local time), VM_CLOCK, ICOUNT.
pub fn write_snapshot_list(out: &mut impl Write, snapshots: &[SnapshotInfo]) -> io::Result<()> {
    writeln!(out, "Snapshot list:")?;
    writeln!(
        out,
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    )?;
    for sn in snapshots {
        let date = chrono::DateTime::from_timestamp(sn.date_sec as i64, 0)
            .map(|d| {
                d.with_timezone(&chrono::Local)
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string()
            })
            .unwrap_or_default();
        let secs = sn.vm_clock_sec;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            sn.vm_clock_nsec / 1_000_000
        );
        let icount = sn.icount.map_or_else(|| "--".to_owned(), |i| i.to_string());
        writeln!(
            out,
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
            sn.id,
            sn.name,
            human_size(sn.vm_state_size),
            date,
            clock,
            icount
        )?;
    }
    Ok(())
}

/// Writes `value` as qemu-img writes JSON: qemu's pretty layout (four-space indentation, an
/// empty array or object still spread over two lines), qemu's string escapes (everything outside
/// printable ASCII as `\uXXXX`), every object's keys in qemu's dictionary order
/// ([`qdict_order`]), then a newline. Arrays keep their order. Numbers are written as
/// serde_json writes them.
pub fn write_qemu_json<T: serde::Serialize + ?Sized>(
    out: &mut impl Write,
    value: &T,
) -> io::Result<()> {
    // Serialized in declaration order, then read back as an ordered tree: the order of keys
    // that share a hash bucket depends on the order they were inserted in.
    let text = serde_json::to_string(value).map_err(io::Error::from)?;
    let node: JsonNode = serde_json::from_str(&text).map_err(io::Error::from)?;
    let mut written = String::with_capacity(text.len() * 2);
    node.write_pretty(&mut written, 0);
    written.push('\n');
    out.write_all(written.as_bytes())
}

/// The bucket qemu's `QDict` puts `key` in: the tdb hash of the key (from gdbm, as qemu's
/// `qobject/qdict.c` computes it, on 32-bit unsigned integers) modulo its 512 buckets.
fn qdict_bucket(key: &str) -> u32 {
    const BUCKETS: u32 = 512;
    let bytes = key.as_bytes();
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &byte) in bytes.iter().enumerate() {
        value = value.wrapping_add(u32::from(byte) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % BUCKETS
}

/// Orders `(key, value)` items, given in the order they were inserted, as qemu iterates a `QDict`
/// holding them: bucket by bucket from 0 to 511, and inside a bucket the last inserted first
/// (qemu inserts at the head of the bucket's list). qemu-img builds every JSON object it prints
/// (info, check, measure) from such a dictionary, so this is the order of its keys.
pub fn qdict_order<V>(items: Vec<(String, V)>) -> Vec<(String, V)> {
    let mut numbered: Vec<_> = items.into_iter().enumerate().collect();
    numbered.sort_by_key(|(inserted, (key, _))| (qdict_bucket(key), std::cmp::Reverse(*inserted)));
    numbered.into_iter().map(|(_, item)| item).collect()
}

/// A JSON value with its objects' keys in the order they were written (serde_json's `Value`
/// sorts them), for [`write_qemu_json`].
enum JsonNode {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<JsonNode>),
    Object(Vec<(String, JsonNode)>),
}

impl<'de> serde::Deserialize<'de> for JsonNode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonNodeVisitor)
    }
}

struct JsonNodeVisitor;

impl<'de> serde::de::Visitor<'de> for JsonNodeVisitor {
    type Value = JsonNode;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<JsonNode, E> {
        Ok(JsonNode::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<JsonNode, E> {
        Ok(JsonNode::Bool(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<JsonNode, E> {
        Ok(JsonNode::Number(v.into()))
    }
    fn visit_i64<E>(self, v: i64) -> Result<JsonNode, E> {
        Ok(JsonNode::Number(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<JsonNode, E> {
        Ok(serde_json::Number::from_f64(v).map_or(JsonNode::Null, JsonNode::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<JsonNode, E> {
        Ok(JsonNode::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<JsonNode, E> {
        Ok(JsonNode::String(v))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<JsonNode, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(JsonNode::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<JsonNode, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = map.next_entry::<String, JsonNode>()? {
            items.push(item);
        }
        Ok(JsonNode::Object(qdict_order(items)))
    }
}

impl JsonNode {
    /// Appends the value as qemu's JSON writer prints it in pretty mode, `depth` containers deep:
    /// a member starts on a new line indented by four spaces per level, and so does the closing
    /// bracket (also of an empty container).
    fn write_pretty(&self, out: &mut String, depth: usize) {
        let newline = |out: &mut String, depth: usize| {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', depth * 4));
        };
        match self {
            JsonNode::Null => out.push_str("null"),
            JsonNode::Bool(v) => out.push_str(if *v { "true" } else { "false" }),
            JsonNode::Number(n) => out.push_str(&n.to_string()),
            JsonNode::String(s) => push_qemu_quoted(out, s),
            JsonNode::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    newline(out, depth + 1);
                    item.write_pretty(out, depth + 1);
                }
                newline(out, depth);
                out.push(']');
            }
            JsonNode::Object(items) => {
                out.push('{');
                for (i, (key, item)) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    newline(out, depth + 1);
                    push_qemu_quoted(out, key);
                    out.push_str(": ");
                    item.write_pretty(out, depth + 1);
                }
                newline(out, depth);
                out.push('}');
            }
        }
    }
}

/// Appends `text` as a JSON string with qemu's escapes: `\"`, `\\`, `\b`, `\f`, `\n`, `\r`,
/// `\t`, and `\uXXXX` (upper-case hex, surrogate pairs beyond the BMP) for every other character
/// below 0x20 or from 0x7F on.
fn push_qemu_quoted(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04X}"));
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::{human_size, qdict_order, write_qemu_json};

    #[test]
    fn keys_come_in_qemus_dictionary_order() {
        // ImageInfo's fields in qemu's schema order, and the order qemu-img 10.0.2 printed them
        // in (`children` and `backing-filename-format` share bucket 206: the later one first).
        let declared = [
            "filename",
            "format",
            "dirty-flag",
            "actual-size",
            "virtual-size",
            "cluster-size",
            "backing-filename",
            "full-backing-filename",
            "backing-filename-format",
            "snapshots",
            "format-specific",
            "children",
        ];
        let printed = [
            "children",
            "backing-filename-format",
            "snapshots",
            "virtual-size",
            "filename",
            "cluster-size",
            "format",
            "actual-size",
            "format-specific",
            "full-backing-filename",
            "backing-filename",
            "dirty-flag",
        ];
        let items = declared.iter().map(|k| (k.to_string(), ())).collect();
        let ordered: Vec<String> = qdict_order(items).into_iter().map(|(k, _)| k).collect();
        assert_eq!(ordered, printed);
    }

    #[test]
    fn layout_and_escapes_are_qemus() {
        let value = serde_json::json!({"data": {}, "list": [], "name": "a\"b\\c\u{7f}é😀\n"});
        let mut out = Vec::new();
        write_qemu_json(&mut out, &value).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\n    \"name\": \"a\\\"b\\\\c\\u007F\\u00E9\\uD83D\\uDE00\\n\",\n    \"list\": [\n    ],\n    \"data\": {\n    }\n}\n"
        );
    }

    #[test]
    fn sizes_read_like_qemu_img() {
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(200704), "196 KiB");
        assert_eq!(human_size(197120), "192 KiB");
        assert_eq!(human_size(1536 << 20), "1.5 GiB");
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(10 << 40), "10 TiB");
    }
}
