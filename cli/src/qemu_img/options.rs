//! qemu's option lists (`-o key=value,key2=value2`, `--image-opts` strings): items separated by
//! `,`, where `,,` is a literal comma inside a value.

/// Whether qemu-img accepts `list` as one `-o` argument: not empty, not starting with a comma,
/// and not ending in an odd run of commas (a dangling separator).
pub fn is_valid_list(list: &str) -> bool {
    if list.is_empty() || list.starts_with(',') {
        return false;
    }
    let trailing = list.len() - list.trim_end_matches(',').len();
    trailing % 2 == 0
}

/// Splits `list` into `(key, value)` items; an item without `=` has no value (`help`, or a flag).
/// `Err(())` if an item is empty.
#[allow(clippy::result_unit_err)]
pub fn split(list: &str) -> Result<Vec<(String, Option<String>)>, ()> {
    let mut items = Vec::new();
    let mut item = String::new();
    let mut chars = list.chars().peekable();
    loop {
        match chars.next() {
            Some(',') if chars.peek() == Some(&',') => {
                chars.next();
                item.push(',');
            }
            Some(',') | None => {
                if item.is_empty() {
                    return Err(());
                }
                items.push(match item.split_once('=') {
                    Some((key, value)) => (key.to_owned(), Some(value.to_owned())),
                    None => (item.clone(), None),
                });
                item.clear();
                if chars.peek().is_none() {
                    break;
                }
            }
            Some(c) => item.push(c),
        }
    }
    Ok(items)
}

/// A value as qemu writes it in an option list (and prints it in create's "Formatting" line):
/// every comma doubled.
pub fn escape_value(value: &str) -> String {
    value.replace(',', ",,")
}

/// Joins items back into one list, escaping commas in values as `,,`.
pub fn join(items: &[(String, Option<String>)]) -> String {
    items
        .iter()
        .map(|(key, value)| match value {
            Some(value) => format!("{key}={}", escape_value(value)),
            None => key.clone(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_validity() {
        assert_eq!(
            split("a=1,b=x,,y,help").unwrap(),
            [
                ("a".to_owned(), Some("1".to_owned())),
                ("b".to_owned(), Some("x,y".to_owned())),
                ("help".to_owned(), None)
            ]
        );
        assert!(split("a=1,,,").is_err() || !is_valid_list("a=1,,,"));
        assert!(!is_valid_list(",help"));
        assert!(!is_valid_list(",,"));
        assert!(!is_valid_list("a=1,"));
        assert!(is_valid_list("a=1,,"));
        assert_eq!(join(&split("b=x,,y,c").unwrap()), "b=x,,y,c");
    }
}
