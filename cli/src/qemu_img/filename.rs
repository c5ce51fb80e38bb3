//! qemu's ways of naming an image on the command line, for LOCAL files only: a plain path,
//! `file:PATH`, `json:{"driver":"qcow2","file":{"driver":"file","filename":PATH}}` and, with
//! `--image-opts`, `driver=qcow2,file.filename=PATH`. Any other protocol or driver is refused
//! with qemu's wording for one it does not know. This syntax is for the command line only:
//! backing file names read from images never get it (the engine refuses them).

use serde_json::Value;

/// A local image named by one of qemu's filename syntaxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The local path.
    pub path: String,
    /// The format the name asked for (`driver=qcow2`), if any.
    pub format: Option<String>,
    /// The external data file the options name for the image (`data-file.filename=PATH`),
    /// opened instead of the one its header names.
    pub data_file: Option<String>,
}

/// Formats cowclone reads and writes, named as qemu's drivers are.
const FORMATS: &[&str] = &["qcow2", "raw", "vdi"];

/// Options that change nothing for a local file opened by cowclone and may be given.
const HARMLESS: &[&str] = &[
    "node-name",
    "read-only",
    "auto-read-only",
    "aio",
    "cache.direct",
    "cache.no-flush",
    "discard",
    "detect-zeroes",
    "force-share",
    "l2-cache-size",
    "l2-cache-entry-size",
    "refcount-cache-size",
    "cache-clean-interval",
];

/// Resolves a filename given on the command line (not with `--image-opts`).
pub fn parse(name: &str) -> Result<Target, String> {
    if let Some(json) = name.strip_prefix("json:") {
        let value: Value = serde_json::from_str(&single_quotes_to_double(json)).map_err(|e| {
            format!("Could not open '{name}': Could not parse the JSON options: {e}")
        })?;
        let Value::Object(map) = value else {
            return Err(format!(
                "Could not open '{name}': Invalid JSON object given for 'json:' filename"
            ));
        };
        let mut flat = Vec::new();
        flatten("", &Value::Object(map), &mut flat);
        return from_options(name, &flat);
    }
    if let Some(protocol) = protocol_of(name) {
        return match protocol {
            "file" => Ok(Target {
                path: strip_file_prefix(name),
                format: None,
                data_file: None,
            }),
            other => Err(format!(
                "Could not open '{name}': Unknown protocol '{other}'"
            )),
        };
    }
    Ok(Target {
        path: name.to_owned(),
        format: None,
        data_file: None,
    })
}

/// Resolves an `--image-opts` option string (`driver=qcow2,file.filename=PATH`, `,,` escapes
/// a comma).
pub fn parse_image_opts(opts: &str) -> Result<Target, String> {
    let items = super::options::split(opts)
        .map_err(|_| format!("Invalid option list: {opts}"))?
        .into_iter()
        .map(|(key, value)| (key, value.unwrap_or_else(|| "on".to_owned())))
        .collect::<Vec<_>>();
    from_options(opts, &items)
}

/// qemu's JSON parser also takes 'single-quoted' strings: rewrites them as "double-quoted"
/// ones for a standard parser (a `"` inside becomes `\"`, `\'` becomes `'`).
fn single_quotes_to_double(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut quote = None;
    let mut chars = json.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '\'' | '"') => {
                quote = Some(c);
                out.push('"');
            }
            (Some(q), '\\') => match chars.next() {
                Some('\'') if q == '\'' => out.push('\''),
                Some(next) => {
                    out.push('\\');
                    out.push(next);
                }
                None => out.push('\\'),
            },
            (Some(q), c) if c == q => {
                quote = None;
                out.push('"');
            }
            (Some('\''), '"') => out.push_str("\\\""),
            (_, c) => out.push(c),
        }
    }
    out
}

/// The path a `file:NAME` name opens, as qemu's file driver takes it: `NAME`, or `./NAME` when
/// `NAME` would itself read as a protocol prefix (a `:` before any `/`, as in `file:a:b`). qemu
/// shows that path as the image's filename and resolves relative backing names against it.
fn strip_file_prefix(name: &str) -> String {
    let path = &name["file:".len()..];
    if protocol_of(path).is_some() {
        format!("./{path}")
    } else {
        path.to_owned()
    }
}

/// The protocol prefix of `name` (`nbd` in `nbd://host/x`): qemu's rule, a `:` before any `/`.
fn protocol_of(name: &str) -> Option<&str> {
    let colon = name.find(':')?;
    match name.find('/') {
        Some(slash) if slash < colon => None,
        _ => Some(&name[..colon]),
    }
}

/// Flattens a JSON object into qemu's dotted keys (`file.filename`), values as strings.
fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                let key = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&key, value, out);
            }
        }
        Value::String(text) => out.push((prefix.to_owned(), text.clone())),
        Value::Bool(flag) => out.push((prefix.to_owned(), if *flag { "on" } else { "off" }.into())),
        other => out.push((prefix.to_owned(), other.to_string())),
    }
}

/// A target from flattened options: `driver` (a format or `file`), the path in `filename`,
/// `file.filename` or `file` (a plain string), `file.driver` = `file` if given; a data file in
/// `data-file.filename` (`data-file.driver` = `file` if given). Without `driver` the format is
/// recognised from the file, as qemu probes it.
fn from_options(name: &str, items: &[(String, String)]) -> Result<Target, String> {
    let get = |key: &str| {
        items
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let refuse = |what: String| Err(format!("Could not open '{name}': {what}"));
    let driver = get("driver");
    if let Some(driver) = driver.filter(|d| *d != "file" && !FORMATS.contains(d)) {
        return refuse(format!("Unknown driver '{driver}'"));
    }
    for child in ["file.driver", "data-file.driver"] {
        if let Some(driver) = get(child).filter(|d| *d != "file") {
            return refuse(format!("Unknown driver '{driver}'"));
        }
    }
    if get("locking") == Some("off") || get("file.locking") == Some("off") {
        return refuse("locking=off is refused: cowclone always takes the image locks".into());
    }
    for (key, _) in items {
        let key_in_file = key
            .strip_prefix("file.")
            .or(key.strip_prefix("data-file."))
            .unwrap_or(key);
        let known = matches!(key.as_str(), "driver" | "filename" | "file" | "locking")
            || matches!(key_in_file, "driver" | "filename" | "locking")
            || HARMLESS.contains(&key_in_file);
        if !known {
            return refuse(format!(
                "Block format '{}' does not support the option '{key}'",
                driver.unwrap_or("file")
            ));
        }
    }
    let path = get("file.filename").or(get("filename")).or(get("file"));
    let Some(path) = path else {
        return refuse("A block device must be specified for \"file\"".into());
    };
    // A filename inside the options is a plain path, unless it names a protocol itself.
    let inner = parse(path)?;
    let data_file = match get("data-file.filename") {
        Some(name) => Some(parse(name)?.path),
        None => None,
    };
    Ok(Target {
        path: inner.path,
        format: driver.filter(|d| *d != "file").map(str::to_owned),
        data_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(path: &str, format: Option<&str>) -> Target {
        Target {
            path: path.into(),
            format: format.map(Into::into),
            data_file: None,
        }
    }

    #[test]
    fn a_data_file_in_the_options_is_the_images_data_file() {
        // iotest 061: no driver (the format is probed), the data file beside the image.
        assert_eq!(
            parse_image_opts("data-file.filename=/d/t.data,file.filename=/d/t.qcow2").unwrap(),
            Target {
                data_file: Some("/d/t.data".into()),
                ..target("/d/t.qcow2", None)
            }
        );
        assert_eq!(
            parse(r#"json:{"driver":"qcow2","file":{"filename":"/a"},"data-file":{"driver":"file","filename":"file:/b"}}"#)
                .unwrap(),
            Target {
                data_file: Some("/b".into()),
                ..target("/a", Some("qcow2"))
            }
        );
        assert!(
            parse_image_opts("data-file.driver=nbd,data-file.host=h,file.filename=/a")
                .unwrap_err()
                .contains("Unknown driver 'nbd'")
        );
        assert!(
            parse_image_opts("data-file.filename=nbd://h/x,file.filename=/a")
                .unwrap_err()
                .contains("Unknown protocol 'nbd'")
        );
    }

    #[test]
    fn local_names_in_every_syntax() {
        assert_eq!(parse("/a/b.qcow2").unwrap(), target("/a/b.qcow2", None));
        assert_eq!(parse("./x:y").unwrap(), target("./x:y", None));
        assert_eq!(parse("file:/a/b").unwrap(), target("/a/b", None));
        assert_eq!(parse("file:a:b").unwrap(), target("./a:b", None));
        assert_eq!(parse("file:d/a:b").unwrap(), target("d/a:b", None));
        assert_eq!(
            parse(r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"/a/b"}}"#).unwrap(),
            target("/a/b", Some("qcow2"))
        );
        assert_eq!(
            parse(r#"json:{'driver':'qcow2','file':{'driver':'file','filename':'/a"b\'c'}}"#)
                .unwrap(),
            target("/a\"b'c", Some("qcow2"))
        );
        assert_eq!(
            parse(r#"json:{"file.driver":"file","file.filename":"/c"}"#).unwrap(),
            target("/c", None)
        );
        assert_eq!(
            parse_image_opts("driver=qcow2,file.filename=/a,,b").unwrap(),
            target("/a,b", Some("qcow2"))
        );
        assert_eq!(
            parse_image_opts("driver=file,filename=/d").unwrap(),
            target("/d", None)
        );
    }

    #[test]
    fn network_protocols_and_unknown_drivers_are_refused() {
        assert_eq!(
            parse("nbd://localhost/x").unwrap_err(),
            "Could not open 'nbd://localhost/x': Unknown protocol 'nbd'"
        );
        assert!(
            parse(r#"json:{"driver":"qcow2","file":{"driver":"nbd","host":"h"}}"#)
                .unwrap_err()
                .contains("Unknown driver 'nbd'")
        );
        assert!(parse(r#"json:{"driver":"blkdebug","image":"/x"}"#)
            .unwrap_err()
            .contains("Unknown driver 'blkdebug'"));
        assert!(parse(r#"json:{"driver":"raw","file":"http://h/x"}"#)
            .unwrap_err()
            .contains("Unknown protocol 'http'"));
        assert!(
            parse_image_opts("driver=qcow2,file.filename=/x,file.locking=off")
                .unwrap_err()
                .contains("locking=off")
        );
    }
}
