//! Rendering results: human tables, CSV, and the JSON written for plotting.

use std::io::Write;
use std::path::Path;

use crate::clone_methods::{self, MethodResult};
use crate::{io, ops, BenchError, Result};

/// Writes the clone comparison as a table for people, with the run's circumstances.
pub fn clone_human(report: &clone_methods::Report, out: &mut dyn Write) -> std::io::Result<()> {
    let env = &report.environment;
    writeln!(
        out,
        "bench clone: {} clone(s) per method, base {} bytes virtual, {}, filesystem {} ({})",
        env.count,
        env.size,
        if env.durable {
            "durable (file and directory fsynced inside the clock)"
        } else {
            "not durable"
        },
        env.machine.filesystem,
        env.dir.display()
    )?;
    writeln!(
        out,
        "bases: {} {} B long, {} B allocated (every cluster written with pseudo-random data){}",
        clone_methods::BASE_QCOW2,
        env.base_qcow2_bytes.0,
        env.base_qcow2_bytes.1,
        match env.base_vdi_bytes {
            Some((len, alloc)) => format!(
                "; {} {len} B long, {alloc} B allocated",
                clone_methods::BASE_VDI
            ),
            None => String::new(),
        }
    )?;
    if let Some(version) = &env.machine.qemu_img_version {
        writeln!(out, "{version}")?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<13} {:>12} {:>12} {:>14} {:>14} {:>14} {:>10}",
        "method", "median µs", "p90 µs", "apparent B", "allocated B", "unshared B", "vs qemu-img"
    )?;
    for r in &report.results {
        match &r.skipped {
            Some(reason) => writeln!(out, "{:<13} skipped: {reason}", r.method)?,
            None => writeln!(
                out,
                "{:<13} {:>12} {:>12} {:>14} {:>14} {:>14} {:>10}",
                r.method,
                float(r.median_us),
                float(r.p90_us),
                int(r.apparent_bytes),
                int(r.allocated_bytes),
                int(r.unshared_bytes),
                r.ratio_vs_qemu_img
                    .map_or("-".to_owned(), |x| format!("{x}×")),
            )?,
        }
    }
    writeln!(out)?;
    for r in &report.results {
        writeln!(out, "{:<13} {}", r.method, r.description)?;
    }
    Ok(())
}

/// Writes the clone comparison as CSV: a header line, then one line per method with the JSON
/// keys as columns (empty cells for nulls).
pub fn clone_csv(results: &[MethodResult], out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "method,median_us,p90_us,apparent_bytes,allocated_bytes,ratio_vs_qemu_img,clones,skipped"
    )?;
    for r in results {
        let opt = |v: Option<String>| v.unwrap_or_default();
        writeln!(
            out,
            "{},{},{},{},{},{},{},{}",
            r.method,
            opt(r.median_us.map(|v| v.to_string())),
            opt(r.p90_us.map(|v| v.to_string())),
            opt(r.apparent_bytes.map(|v| v.to_string())),
            opt(r.allocated_bytes.map(|v| v.to_string())),
            opt(r.ratio_vs_qemu_img.map(|v| v.to_string())),
            r.clones,
            csv_field(r.skipped.as_deref().unwrap_or("")),
        )?;
    }
    Ok(())
}

/// Writes the I/O comparison as a table for people.
pub fn io_human(report: &io::Report, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "bench io: {} ({}, {} bytes virtual), {} {}, {} requests of {} B, depth {}",
        report.image.display(),
        report.format,
        report.virtual_size,
        format!("{:?}", report.rw).to_lowercase(),
        format!("{:?}", report.pattern).to_lowercase(),
        report.count,
        report.block_size,
        report.depth
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<9} {:>9} {:>10} {:>14} {:>11} {:>12} {:>6}",
        "tool", "MB/s", "median µs", "p90 µs", "mean µs", "pattern", "depth"
    )?;
    for side in &report.results {
        match &side.skipped {
            Some(reason) => writeln!(out, "{:<9} skipped: {reason}", side.tool)?,
            None => writeln!(
                out,
                "{:<9} {:>9} {:>10} {:>14} {:>11} {:>12} {:>6}",
                side.tool,
                float(side.mb_per_s),
                float(side.median_latency_us),
                float(side.p90_latency_us),
                float(side.mean_latency_us),
                format!("{:?}", side.pattern).to_lowercase(),
                side.depth_used,
            )?,
        }
    }
    for side in &report.results {
        if side.skipped.is_none() {
            writeln!(out, "\n{}: {}", side.tool, side.command)?;
        }
        if let Some(note) = &side.note {
            writeln!(out, "  note: {note}")?;
        }
    }
    Ok(())
}

/// Writes the whole-image operations comparison as a table for people, with the run's
/// circumstances and how each operation's outputs were judged.
pub fn ops_human(report: &ops::Report, out: &mut dyn Write) -> std::io::Result<()> {
    let env = &report.environment;
    let work = &report.workload;
    writeln!(
        out,
        "bench ops: {}: {} B image, {} B of data; built in {} s",
        work.source, work.virtual_size, work.data_bytes, work.build_seconds
    )?;
    writeln!(
        out,
        "{}, kernel {}, {} CPUs, load average {} at the start, {} at the end",
        env.machine.host,
        env.machine.kernel,
        env.machine.cpus,
        env.load_average_start,
        env.load_average_end
    )?;
    writeln!(
        out,
        "{} | {} ({}) | bench directory in {} ({}) | {}",
        env.machine.qemu_img_version.as_deref().unwrap_or_default(),
        env.machine.cowclone_version,
        env.cowclone_binary.display(),
        env.dir.display(),
        env.machine.filesystem,
        env.machine.date
    )?;
    let runs = report.operations.first().map_or(0, |o| o.runs);
    writeln!(
        out,
        "median wall time of {runs} timed runs per tool, ms (durable = until the output is on \
         disk: the command, then fsync of what it wrote); speedup = qemu-img ÷ cowclone (above \
         1: cowclone faster); RSS = peak over all runs; out = allocated output bytes"
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<25} {:>12} {:>9} {:>12} {:>9} {:>8} {:>10} {:>10} {:>14} {:>14}",
        "operation",
        "cowclone ms",
        "(durable)",
        "qemu-img ms",
        "(durable)",
        "speedup",
        "RSS MiB",
        "qemu MiB",
        "out B",
        "qemu out B"
    )?;
    for op in &report.operations {
        writeln!(
            out,
            "{:<25} {:>12.1} {:>9.1} {:>12.1} {:>9.1} {:>7}× {:>10.1} {:>10.1} {:>14} {:>14}",
            op.operation,
            op.cowclone.median_ms,
            op.cowclone.durable_median_ms,
            op.qemu_img.median_ms,
            op.qemu_img.durable_median_ms,
            op.speedup,
            op.cowclone.peak_rss_kib as f64 / 1024.0,
            op.qemu_img.peak_rss_kib as f64 / 1024.0,
            int(op.cowclone.output_allocated_bytes),
            int(op.qemu_img.output_allocated_bytes),
        )?;
    }
    writeln!(out)?;
    for op in &report.operations {
        writeln!(out, "{:<25} judged: {}", op.operation, op.verified)?;
    }
    Ok(())
}

/// Writes the whole-image operations comparison as CSV: one line per operation.
pub fn ops_csv(report: &ops::Report, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "operation,runs,cowclone_median_ms,qemu_img_median_ms,speedup,cowclone_peak_rss_kib,\
         qemu_img_peak_rss_kib,cowclone_output_allocated_bytes,qemu_img_output_allocated_bytes"
    )?;
    for op in &report.operations {
        writeln!(
            out,
            "{},{},{},{},{},{},{},{},{}",
            csv_field(op.operation),
            op.runs,
            op.cowclone.median_ms,
            op.qemu_img.median_ms,
            op.speedup,
            op.cowclone.peak_rss_kib,
            op.qemu_img.peak_rss_kib,
            op.cowclone
                .output_allocated_bytes
                .map_or(String::new(), |v| v.to_string()),
            op.qemu_img
                .output_allocated_bytes
                .map_or(String::new(), |v| v.to_string()),
        )?;
    }
    Ok(())
}

/// A duration given in milliseconds, for chart labels: `1.23 s`, `456 ms`, `7.8 ms`.
pub fn milliseconds(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else if ms >= 10.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

/// Writes `value` as pretty JSON to `path` (replacing it), for plotting elsewhere.
pub fn write_json_file(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| BenchError::Invalid(format!("encoding JSON: {e}")))?;
    text.push('\n');
    std::fs::write(path, text).map_err(BenchError::io(format!("writing {}", path.display())))
}

fn float(value: Option<f64>) -> String {
    value.map_or("-".to_owned(), |v| format!("{v:.1}"))
}

fn int(value: Option<u64>) -> String {
    value.map_or("-".to_owned(), |v| v.to_string())
}

/// Quotes a CSV field if it holds a comma, quote or newline (RFC 4180).
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_read_as_people_write_them() {
        assert_eq!(milliseconds(1234.5), "1.23 s");
        assert_eq!(milliseconds(456.4), "456 ms");
        assert_eq!(milliseconds(7.84), "7.8 ms");
    }

    #[test]
    fn csv_quotes_reasons_with_commas_and_leaves_nulls_empty() {
        let results = vec![MethodResult {
            method: "reflink",
            description: "",
            clones: 0,
            median_us: None,
            p90_us: None,
            apparent_bytes: None,
            allocated_bytes: None,
            unshared_bytes: None,
            ratio_vs_qemu_img: None,
            skipped: Some("not here, \"ext4\"".into()),
        }];
        let mut out = Vec::new();
        clone_csv(&results, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text.lines().nth(1),
            Some("reflink,,,,,,0,\"not here, \"\"ext4\"\"\"")
        );
    }
}
