//! The one output path: every command's report goes through [`emit`], which writes JSON in
//! qemu-img's layout ([`write_qemu_json`]) or hands the value to the command's human renderer;
//! [`human_size`] is the one size formatter; [`write_info`] renders `info` like qemu-img.

use std::io::{self, Write};

use imagefmt::ops::info::{FormatSpecific, ImageInfo};

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
            writeln!(out, "    refcount bits: {}", q.refcount_bits)?;
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
    Ok(())
}

/// Writes `value` as qemu-img writes JSON: pretty, indented by four spaces, then a newline.
pub fn write_qemu_json<T: serde::Serialize + ?Sized>(
    out: &mut impl Write,
    value: &T,
) -> io::Result<()> {
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut serializer = serde_json::Serializer::with_formatter(&mut *out, formatter);
    value.serialize(&mut serializer).map_err(io::Error::from)?;
    writeln!(out)
}

#[cfg(test)]
mod tests {
    use super::human_size;

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
