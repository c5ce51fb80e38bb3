//! The image name of `qemu-img amend` and `qemu-img bitmap` for cowclone's commands of the same
//! syntax: `--image-opts` option lists and `json:`/`file:` names are resolved to a local path
//! (and the format they name) by the personality's filename module, as for the other commands.

use super::{error, filename, Failure};

/// amend's options that take a value (the image name is the argument that is none of them).
pub(super) const AMEND_WITH_VALUE: &[&str] = &["-o", "-f", "-t", "--object"];

/// bitmap's options that take a value, spelled as [`super::getopt::canonical`] spells them
/// (the image name is the first argument that is none of them, the bitmap's name the second).
pub(super) const BITMAP_WITH_VALUE: &[&str] = &["-b", "-f", "-F", "-g", "--merge", "--object"];

/// `args` (after the command; `with_value`: its options that take a value) with
/// `--image-opts` dropped and the image name (the first operand) replaced by its local path,
/// preceded by `-f FMT` when the name gives a format and `-f` does not.
pub(super) fn resolve_image(args: &[String], with_value: &[&str]) -> Result<Vec<String>, Failure> {
    let image_opts = args.iter().any(|a| a == "--image-opts");
    let mut out = Vec::with_capacity(args.len() + 2);
    let mut has_format = false;
    let mut format_at: Option<usize> = None;
    let mut image = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        if arg == "--image-opts" {
            continue;
        }
        if with_value.contains(&arg.as_str()) {
            if arg == "-f" {
                // The last -f counts, as in qemu-img (`amend -f foo -f qcow2`, iotest 082).
                if let Some(at) = format_at.replace(out.len()) {
                    out.drain(at..(at + 2).min(out.len()));
                    if let Some(i) = image.as_mut().filter(|i| **i > at) {
                        *i -= 2;
                    }
                    format_at = Some(out.len());
                }
                has_format = true;
            }
            out.push(arg.clone());
            if let Some(value) = rest.next() {
                out.push(value.clone());
            }
            continue;
        }
        if arg.starts_with('-') && arg.len() > 1 {
            has_format |= arg.starts_with("-f");
            out.push(arg.clone());
            continue;
        }
        image = image.or(Some(out.len()));
        out.push(arg.clone());
    }
    if let Some(at) = image {
        let target = if image_opts {
            filename::parse_image_opts(&out[at])
        } else {
            filename::parse(&out[at])
        }
        .map_err(error)?;
        super::messages::remember_given_name(&target.path, &out[at]);
        out[at] = target.path;
        if let (Some(format), false) = (target.format, has_format) {
            out.splice(at..at, ["-f".to_owned(), format]);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::resolve_image;

    fn resolved(args: &[&str]) -> Vec<String> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        resolve_image(&args, super::AMEND_WITH_VALUE).unwrap_or_else(|_| panic!("{args:?} refused"))
    }

    #[test]
    fn the_last_format_counts_wherever_the_image_name_stands() {
        assert_eq!(
            resolved(&[
                "-f",
                "foo",
                "-f",
                "qcow2",
                "-o",
                "lazy_refcounts=on",
                "t.qcow2"
            ]),
            ["-f", "qcow2", "-o", "lazy_refcounts=on", "t.qcow2"]
        );
        assert_eq!(
            resolved(&["-f", "foo", "t.qcow2", "-f", "qcow2", "-o", "compat=1.1"]),
            ["t.qcow2", "-f", "qcow2", "-o", "compat=1.1"]
        );
    }
}
