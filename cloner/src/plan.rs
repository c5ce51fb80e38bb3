//! Provisioning plans from script metadata: `/* rexxjs-vm-KEY: VALUE */` lines among the first
//! [`SCAN_LINES`] lines of a script, parsed into a typed, validated [`Plan`].
//!
//! Keys: `base` (a registered name, required), `memory` (a size: `2G`), `cpus`,
//! `ingress-port` (1–65535), `egress-ports` (comma-separated ports, or `none`), `timeout`
//! (`90`, `30s`, `5m`, `1h`). Unknown keys are reported, not fatal; invalid values, duplicates
//! and malformed directive lines are errors, all reported at once with their line numbers.

use std::time::Duration;

use serde::Serialize;

/// How many leading lines are searched for directives.
pub const SCAN_LINES: usize = 50;
/// The directive prefix inside the comment.
pub const PREFIX: &str = "rexxjs-vm-";
/// Memory bounds, bytes.
pub const MEMORY_RANGE: (u64, u64) = (16 << 20, 1 << 40);
/// Most CPUs a plan may ask for.
pub const MAX_CPUS: u32 = 256;
/// Timeout bounds.
pub const TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(7 * 24 * 3600));
/// The keys a plan understands.
pub const KEYS: &[&str] = &[
    "base",
    "memory",
    "cpus",
    "ingress-port",
    "egress-ports",
    "timeout",
];

/// A validated provisioning plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Plan {
    /// The base (or clone) to clone for the run.
    pub base: String,
    /// Guest memory in bytes.
    pub memory: Option<u64>,
    /// Guest CPUs.
    pub cpus: Option<u32>,
    /// Host port forwarded into the guest.
    pub ingress_port: Option<u16>,
    /// Ports the guest may reach out to (empty: none).
    pub egress_ports: Vec<u16>,
    /// Run time limit in seconds.
    pub timeout_secs: Option<u64>,
    /// Directives with keys this version does not know: `(line, key)`.
    pub unknown_keys: Vec<(usize, String)>,
}

/// One problem found in a script's directives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Problem {
    /// 1-based line number (0: the script as a whole).
    pub line: usize,
    /// The key concerned, if known.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

/// The problems that make a script's plan invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid provisioning plan: {}", self.problems.iter().map(|p| {
    let key = p.key.as_deref().map(|k| format!(" {k}")).unwrap_or_default();
    format!("line {}{key}: {}", p.line, p.message)
}).collect::<Vec<_>>().join("; "))]
pub struct PlanError {
    /// Every problem, in line order.
    pub problems: Vec<Problem>,
}

/// Parses the directives of `script` into a plan.
pub fn parse_plan(script: &str) -> Result<Plan, PlanError> {
    let mut plan = Plan::default();
    let mut base = None;
    let mut seen: Vec<String> = Vec::new();
    let mut problems = Vec::new();
    for (index, line) in script.lines().take(SCAN_LINES).enumerate() {
        let number = index + 1;
        let (key, value) = match directive(line) {
            Ok(Some(found)) => found,
            Ok(None) => continue,
            Err(message) => {
                problems.push(Problem {
                    line: number,
                    key: None,
                    message,
                });
                continue;
            }
        };
        let mut problem = |message: String| {
            problems.push(Problem {
                line: number,
                key: Some(key.clone()),
                message,
            })
        };
        if !KEYS.contains(&key.as_str()) {
            plan.unknown_keys.push((number, key));
            continue;
        }
        if seen.contains(&key) {
            problem("given more than once".into());
            continue;
        }
        seen.push(key.clone());
        if value.is_empty() {
            problem("no value".into());
            continue;
        }
        let parsed = match key.as_str() {
            "base" => crate::registry::validate_name(&value)
                .map(|()| base = Some(value.clone()))
                .map_err(|e| e.to_string()),
            "memory" => parse_memory(&value).map(|m| plan.memory = Some(m)),
            "cpus" => parse_cpus(&value).map(|c| plan.cpus = Some(c)),
            "ingress-port" => parse_port(&value).map(|p| plan.ingress_port = Some(p)),
            "egress-ports" => parse_ports(&value).map(|p| plan.egress_ports = p),
            _ => parse_timeout(&value).map(|t| plan.timeout_secs = Some(t)),
        };
        if let Err(message) = parsed {
            problem(message);
        }
    }
    match base {
        Some(base) => plan.base = base,
        None if !seen.iter().any(|k| k == "base") => problems.push(Problem {
            line: 0,
            key: Some("base".into()),
            message: format!(
                "missing: no /* {PREFIX}base: NAME */ line in the first {SCAN_LINES} lines"
            ),
        }),
        None => {}
    }
    if problems.is_empty() {
        Ok(plan)
    } else {
        Err(PlanError { problems })
    }
}

/// `Some((key, value))` for a directive line, `None` for any other line, an error for a line
/// that mentions the prefix in a comment but is not a well-formed directive.
fn directive(line: &str) -> Result<Option<(String, String)>, String> {
    let trimmed = line.trim();
    let Some(inner) = trimmed.strip_prefix("/*") else {
        return Ok(None);
    };
    let inner_trimmed = inner.trim_start();
    let Some(rest) = inner_trimmed.strip_prefix(PREFIX) else {
        return Ok(None);
    };
    let Some(body) = rest.trim_end().strip_suffix("*/") else {
        return Err(format!("malformed directive (no closing */): {trimmed}"));
    };
    let Some((key, value)) = body.split_once(':') else {
        return Err(format!(
            "malformed directive (no ':' after the key): {trimmed}"
        ));
    };
    Ok(Some((
        key.trim().to_ascii_lowercase(),
        value.trim().to_owned(),
    )))
}

pub(crate) fn parse_memory(value: &str) -> Result<u64, String> {
    let bytes = imagefmt::size::parse_size(value).map_err(|e| e.to_string())?;
    let (min, max) = MEMORY_RANGE;
    if (min..=max).contains(&bytes) {
        Ok(bytes)
    } else {
        Err(format!("{value} is outside 16M to 1T"))
    }
}

pub(crate) fn parse_cpus(value: &str) -> Result<u32, String> {
    match value.parse::<u32>() {
        Ok(n) if (1..=MAX_CPUS).contains(&n) => Ok(n),
        _ => Err(format!("{value:?} is not a CPU count from 1 to {MAX_CPUS}")),
    }
}

fn parse_port(value: &str) -> Result<u16, String> {
    match value.trim().parse::<u16>() {
        Ok(p) if p >= 1 => Ok(p),
        _ => Err(format!("{value:?} is not a port from 1 to 65535")),
    }
}

fn parse_ports(value: &str) -> Result<Vec<u16>, String> {
    if value.eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    let mut ports = Vec::new();
    for item in value.split(',') {
        let port = parse_port(item)?;
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    Ok(ports)
}

pub(crate) fn parse_timeout(value: &str) -> Result<u64, String> {
    let duration = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(value)
            .map_err(|e| format!("{value:?} is not a duration (90, 30s, 5m, 1h): {e}"))?,
    };
    let (min, max) = TIMEOUT_RANGE;
    if (min..=max).contains(&duration) {
        Ok(duration.as_secs())
    } else {
        Err(format!("{value} is outside 1s to 7 days"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_plan_parses_into_types() {
        let script = "#!/usr/bin/env rexx\n\
            /* rexxjs-vm-base: deb12 */\n\
            /* rexxjs-vm-memory: 2G */\n\
            /*rexxjs-vm-CPUS:4*/\n\
            /* rexxjs-vm-ingress-port: 8080 */\n\
            /* rexxjs-vm-egress-ports: 443, 53,443 */\n\
            /* rexxjs-vm-timeout: 5m */\n\
            /* rexxjs-vm-colour: blue */\n\
            say 'hi' /* rexxjs-vm-base: ignored, not at line start */\n";
        let plan = parse_plan(script).unwrap();
        assert_eq!(
            plan,
            Plan {
                base: "deb12".into(),
                memory: Some(2 << 30),
                cpus: Some(4),
                ingress_port: Some(8080),
                egress_ports: vec![443, 53],
                timeout_secs: Some(300),
                unknown_keys: vec![(8, "colour".into())],
            }
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let script = "/* rexxjs-vm-memory: 1k */\n\
            /* rexxjs-vm-cpus: 0 */\n\
            /* rexxjs-vm-ingress-port: 65536 */\n\
            /* rexxjs-vm-egress-ports: 80,0 */\n\
            /* rexxjs-vm-timeout: forever */\n\
            /* rexxjs-vm-cpus: 2 */\n\
            /* rexxjs-vm-base deb12 */\n\
            /* rexxjs-vm-base: x\n";
        let err = parse_plan(script).unwrap_err();
        let lines: Vec<usize> = err.problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![1, 2, 3, 4, 5, 6, 7, 8, 0], "{err}");
        assert!(err.to_string().contains("line 3 ingress-port"), "{err}");
    }

    #[test]
    fn directives_after_line_50_are_not_read() {
        let mut script = "\n".repeat(SCAN_LINES);
        script.push_str("/* rexxjs-vm-base: late */\n");
        let err = parse_plan(&script).unwrap_err();
        assert_eq!(err.problems.len(), 1);
        assert!(err.problems[0].message.contains("missing"));
        let mut script = "\n".repeat(SCAN_LINES - 1);
        script.push_str("/* rexxjs-vm-base: last */\n");
        assert_eq!(parse_plan(&script).unwrap().base, "last");
    }
}
