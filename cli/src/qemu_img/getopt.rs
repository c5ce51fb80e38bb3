//! qemu-img's option syntax: POSIX short options that cluster (`-qf qcow2`, `-fqcow2`), GNU
//! long options (`--output=json`, `--output json`, unambiguous prefixes), options and operands
//! in any order, `--` ending the options. Error messages are qemu-img's.

/// The options one qemu-img subcommand takes.
pub struct Spec {
    /// getopt's short option string: each letter, followed by `:` if it takes a value.
    pub short: &'static str,
    /// Long options: name, whether it takes a value, and the key it is reported under (the
    /// short letter for aliases such as `--format` = `-f`, else the name itself).
    pub long: &'static [(&'static str, bool, &'static str)],
}

/// One option as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opt {
    /// The short letter (`"f"`) or the long option's key.
    pub key: &'static str,
    /// Its value, for options that take one.
    pub value: Option<String>,
}

/// A parsed command line: options in order, then the operands in order.
#[derive(Debug, Default)]
pub struct Parsed {
    /// Options in the order given.
    pub opts: Vec<Opt>,
    /// Everything that is not an option (file names, sizes).
    pub operands: Vec<String>,
}

impl Parsed {
    /// Whether the option `key` was given.
    pub fn has(&self, key: &str) -> bool {
        self.opts.iter().any(|o| o.key == key)
    }

    /// The value of the last `key` option given (later ones win, as in qemu-img).
    pub fn last(&self, key: &str) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|o| o.key == key)
            .and_then(|o| o.value.as_deref())
    }

    /// The values of every `key` option given, in order.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.opts
            .iter()
            .filter(|o| o.key == key)
            .filter_map(|o| o.value.as_deref())
            .collect()
    }
}

/// A usage error, worded as qemu-img's option parser (glibc's getopt) words it; it is printed
/// after "PROGRAM COMMAND: ", then qemu-img's "Try ... --help" line.
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError(pub String);

/// Parses `args` (the words after the subcommand) by `spec`.
pub fn parse(spec: &Spec, args: &[String]) -> Result<Parsed, UsageError> {
    let mut parsed = Parsed::default();
    let mut i = 0;
    while i < args.len() {
        let word = &args[i];
        i += 1;
        if word == "--" {
            parsed.operands.extend(args[i..].iter().cloned());
            break;
        }
        if let Some(long) = word.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((name, value)) => (name, Some(value.to_owned())),
                None => (long, None),
            };
            let (long_name, takes_value, key) = find_long(spec, name)?;
            let value = match (takes_value, inline) {
                (true, Some(value)) => Some(value),
                (true, None) => {
                    let value = args.get(i).cloned().ok_or_else(|| {
                        UsageError(format!("option '--{long_name}' requires an argument"))
                    })?;
                    i += 1;
                    Some(value)
                }
                (false, Some(_)) => {
                    return Err(UsageError(format!(
                        "option '--{long_name}' doesn't allow an argument"
                    )));
                }
                (false, None) => None,
            };
            parsed.opts.push(Opt { key, value });
            continue;
        }
        let Some(cluster) = word.strip_prefix('-').filter(|c| !c.is_empty()) else {
            parsed.operands.push(word.clone());
            continue;
        };
        for (at, letter) in cluster.char_indices() {
            let Some(key) = short_key(spec.short, letter) else {
                return Err(UsageError(format!("invalid option -- '{letter}'")));
            };
            if takes_value(spec.short, letter) {
                let rest = &cluster[at + letter.len_utf8()..];
                let value = if !rest.is_empty() {
                    rest.to_owned()
                } else {
                    let value = args.get(i).cloned().ok_or_else(|| {
                        UsageError(format!("option requires an argument -- '{letter}'"))
                    })?;
                    i += 1;
                    value
                };
                parsed.opts.push(Opt {
                    key,
                    value: Some(value),
                });
                break;
            }
            parsed.opts.push(Opt { key, value: None });
        }
    }
    Ok(parsed)
}

/// The command line `parsed` came from, spelled with each option's short form where it has one
/// (`--format qcow2` becomes `-f qcow2`), other long options as `--key [value]`, then the
/// operands (after `--` if one of them starts with `-`). Commands whose cowclone form has
/// qemu-img's syntax take it as it is.
pub fn canonical(parsed: &Parsed) -> Vec<String> {
    let mut words = Vec::with_capacity(parsed.opts.len() * 2 + parsed.operands.len() + 1);
    for opt in &parsed.opts {
        if opt.key.chars().count() == 1 {
            words.push(format!("-{}", opt.key));
        } else {
            words.push(format!("--{}", opt.key));
        }
        words.extend(opt.value.clone());
    }
    if parsed.operands.iter().any(|o| o.starts_with('-')) {
        words.push("--".to_owned());
    }
    words.extend(parsed.operands.iter().cloned());
    words
}

/// The long option `name` names: an exact match, else the one long option it is a prefix of
/// (options that differ only in name count once, as in getopt).
fn find_long(spec: &Spec, name: &str) -> Result<(&'static str, bool, &'static str), UsageError> {
    if let Some(exact) = spec.long.iter().find(|(long, ..)| *long == name) {
        return Ok(*exact);
    }
    let candidates: Vec<_> = spec
        .long
        .iter()
        .filter(|(long, ..)| !name.is_empty() && long.starts_with(name))
        .collect();
    match candidates.as_slice() {
        [] => Err(UsageError(format!("unrecognized option '--{name}'"))),
        [first, rest @ ..] if rest.iter().all(|o| (o.1, o.2) == (first.1, first.2)) => Ok(**first),
        all => Err(UsageError(format!(
            "option '--{name}' is ambiguous; possibilities:{}",
            all.iter()
                .map(|(long, ..)| format!(" '--{long}'"))
                .collect::<String>()
        ))),
    }
}

/// The static key for the short option `letter`, if `short` lists it.
fn short_key(short: &'static str, letter: char) -> Option<&'static str> {
    if letter == ':' {
        return None;
    }
    short
        .char_indices()
        .find(|(_, c)| *c == letter)
        .map(|(at, c)| &short[at..at + c.len_utf8()])
}

/// Whether the short option `letter` takes a value (`short` has `:` after it).
fn takes_value(short: &str, letter: char) -> bool {
    let mut chars = short.chars().peekable();
    while let Some(c) = chars.next() {
        if c == letter {
            return chars.peek() == Some(&':');
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: Spec = Spec {
        short: "f:hqU",
        long: &[
            ("format", true, "f"),
            ("output", true, "output"),
            ("force-share", false, "U"),
        ],
    };

    fn words(line: &str) -> Vec<String> {
        line.split(' ').map(str::to_owned).collect()
    }

    #[test]
    fn clusters_values_and_permutation() {
        let parsed = parse(
            &SPEC,
            &words("a -qUfqcow2 b --output=json --form raw -- -c"),
        )
        .unwrap();
        let keys: Vec<_> = parsed
            .opts
            .iter()
            .map(|o| (o.key, o.value.as_deref()))
            .collect();
        assert_eq!(
            keys,
            [
                ("q", None),
                ("U", None),
                ("f", Some("qcow2")),
                ("output", Some("json")),
                ("f", Some("raw"))
            ]
        );
        assert_eq!(parsed.operands, ["a", "b", "-c"]);
        assert_eq!(parsed.last("f"), Some("raw"));
    }

    #[test]
    fn canonical_spells_long_options_short() {
        let parsed = parse(
            &SPEC,
            &words("--format qcow2 a --force-share --output=json -- -b"),
        )
        .unwrap();
        assert_eq!(
            canonical(&parsed),
            ["-f", "qcow2", "-U", "--output", "json", "--", "a", "-b"]
        );
    }

    #[test]
    fn errors_are_qemu_img_wording() {
        let err = |line| parse(&SPEC, &words(line)).unwrap_err().0;
        assert_eq!(err("-x a"), "invalid option -- 'x'");
        assert_eq!(err("a -f"), "option requires an argument -- 'f'");
        assert_eq!(err("--output"), "option '--output' requires an argument");
        assert_eq!(err("--foo"), "unrecognized option '--foo'");
        assert_eq!(
            err("--force-share=on"),
            "option '--force-share' doesn't allow an argument"
        );
        assert_eq!(
            err("--f x"),
            "option '--f' is ambiguous; possibilities: '--format' '--force-share'"
        );
    }
}
