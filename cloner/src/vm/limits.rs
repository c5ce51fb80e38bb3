//! Operator limits: the most a clone may ask for — memory, CPUs, run time, and the egress
//! endpoints it may reach — set by the operator in a TOML file; `start` and `provision` refuse a
//! plan beyond them, naming the limit and the file that sets it.
//!
//! The file is `$COWCLONE_CONFIG` if set, else `config.toml` in the XDG config directory
//! (`$XDG_CONFIG_HOME/cowclone/config.toml`, by default `~/.config/cowclone/config.toml`).
//! Without a file, no operator limit applies (the plan's own bounds still do: memory 16M–1T,
//! 1–256 CPUs, run time 1 s–7 days, any egress endpoint).
//!
//! ```toml
//! [limits]
//! max-memory = "4G"          # a size, as for --memory
//! max-cpus = 4
//! max-run-time = "30m"       # seconds, or 30s / 5m / 1h
//! allowed-egress = ["10.0.2.2:3128", "mirror.example.org:443"]   # HOST:PORT, exact
//! ```
//!
//! A plan without a run time of its own gets the provision default, shortened to `max-run-time`
//! if that is lower. `start` runs a VM until it is stopped, so `max-run-time` concerns
//! `provision` only. Unknown keys are errors (a misspelt limit must not pass silently).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::spec::Egress;
use super::{Result, VmError};

/// The environment variable naming the configuration file (tests, and operators who keep it
/// elsewhere).
pub const CONFIG_ENV: &str = "COWCLONE_CONFIG";
/// Largest configuration file read.
const MAX_CONFIG: u64 = 1 << 20;

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    limits: LimitsFile,
}

/// `[limits]` as written (sizes and durations as text or numbers).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct LimitsFile {
    max_memory: Option<toml::Value>,
    max_cpus: Option<u32>,
    max_run_time: Option<toml::Value>,
    allowed_egress: Option<Vec<String>>,
}

/// The operator's limits, parsed and validated. The default sets none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Most guest memory, bytes.
    pub max_memory: Option<u64>,
    /// Most guest CPUs.
    pub max_cpus: Option<u32>,
    /// Longest run time (`provision`).
    pub max_run_time: Option<Duration>,
    /// The only egress endpoints allowed (`None`: any).
    pub allowed_egress: Option<Vec<(String, u16)>>,
    /// The file that set them, for messages.
    pub source: Option<PathBuf>,
}

/// What a clone asks for, checked by [`Limits::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    /// Guest memory, bytes.
    pub memory: u64,
    /// Guest CPUs.
    pub cpus: u32,
    /// Run time asked for, if any.
    pub run_time: Option<Duration>,
    /// Egress policy.
    pub egress: &'a Egress,
}

impl Limits {
    /// The configuration file's path: `$COWCLONE_CONFIG`, else the XDG config directory's
    /// `cowclone/config.toml` (`None` if there is no config directory).
    pub fn config_path() -> Option<PathBuf> {
        if let Some(path) = std::env::var_os(CONFIG_ENV).filter(|p| !p.is_empty()) {
            return Some(PathBuf::from(path));
        }
        dirs::config_dir().map(|d| d.join("cowclone").join("config.toml"))
    }

    /// Loads the operator's limits from [`Limits::config_path`]; no limits if the default file
    /// does not exist. A file named by `$COWCLONE_CONFIG` must exist.
    pub fn load() -> Result<Limits> {
        let explicit = std::env::var_os(CONFIG_ENV).is_some_and(|p| !p.is_empty());
        let Some(path) = Limits::config_path() else {
            return Ok(Limits::default());
        };
        match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Limits::default())
            }
            Err(e) => return Err(super::io(format!("reading {}", path.display()))(e)),
            Ok(meta) if meta.len() > MAX_CONFIG => {
                return Err(VmError::Invalid(format!(
                    "{} is larger than {MAX_CONFIG} bytes",
                    path.display()
                )))
            }
            Ok(_) => {}
        }
        let text = std::fs::read_to_string(&path)
            .map_err(super::io(format!("reading {}", path.display())))?;
        Limits::parse(&text, &path)
    }

    /// Parses the text of the configuration file at `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Limits> {
        let invalid = |what: String| VmError::Invalid(format!("{}: {what}", path.display()));
        let file: ConfigFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let limits = file.limits;
        let text_of = |value: &toml::Value| match value {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Integer(n) => Some(n.to_string()),
            _ => None,
        };
        let max_memory = limits
            .max_memory
            .as_ref()
            .map(|v| {
                let text = text_of(v).ok_or_else(|| invalid("max-memory: not a size".into()))?;
                crate::plan::parse_memory(&text).map_err(|e| invalid(format!("max-memory: {e}")))
            })
            .transpose()?;
        let max_cpus = limits
            .max_cpus
            .map(|n| {
                crate::plan::parse_cpus(&n.to_string())
                    .map_err(|e| invalid(format!("max-cpus: {e}")))
            })
            .transpose()?;
        let max_run_time = limits
            .max_run_time
            .as_ref()
            .map(|v| {
                let text =
                    text_of(v).ok_or_else(|| invalid("max-run-time: not a duration".into()))?;
                crate::plan::parse_timeout(&text)
                    .map(Duration::from_secs)
                    .map_err(|e| invalid(format!("max-run-time: {e}")))
            })
            .transpose()?;
        let allowed_egress = match limits.allowed_egress {
            None => None,
            Some(list) if list.is_empty() => Some(Vec::new()),
            Some(list) => match format!("allow:{}", list.join(",")).parse::<Egress>() {
                Ok(Egress::Allow(endpoints)) => Some(endpoints),
                _ => {
                    return Err(invalid(format!(
                        "allowed-egress: expected HOST:PORT entries, found {list:?}"
                    )))
                }
            },
        };
        Ok(Limits {
            max_memory,
            max_cpus,
            max_run_time,
            allowed_egress,
            source: Some(path.to_owned()),
        })
    }

    /// Refuses `request` if it goes beyond a limit, naming the limit and the file.
    pub fn check(&self, request: &Request<'_>) -> Result<()> {
        let refuse = |asked: String, limit: String| {
            let file = self
                .source
                .as_deref()
                .map_or_else(|| "(built in)".to_owned(), |p| p.display().to_string());
            Err(VmError::Limit { asked, limit, file })
        };
        if let Some(max) = self.max_memory.filter(|&max| request.memory > max) {
            return refuse(
                format!("memory {} MiB", request.memory.div_ceil(1 << 20)),
                format!("max-memory = {} MiB", max / (1 << 20)),
            );
        }
        if let Some(max) = self.max_cpus.filter(|&max| request.cpus > max) {
            return refuse(
                format!("{} CPUs", request.cpus),
                format!("max-cpus = {max}"),
            );
        }
        if let (Some(max), Some(asked)) = (self.max_run_time, request.run_time) {
            if asked > max {
                return refuse(
                    format!("run time {} s", asked.as_secs()),
                    format!("max-run-time = {} s", max.as_secs()),
                );
            }
        }
        if let (Some(allowed), Egress::Allow(asked)) = (&self.allowed_egress, request.egress) {
            for (host, port) in asked {
                if !allowed.iter().any(|(h, p)| h == host && p == port) {
                    let list: Vec<String> =
                        allowed.iter().map(|(h, p)| format!("{h}:{p}")).collect();
                    return refuse(
                        format!("egress to {host}:{port}"),
                        format!("allowed-egress = {list:?}"),
                    );
                }
            }
        }
        Ok(())
    }

    /// The run time for a plan that asks for `asked` (if anything), `default` otherwise:
    /// the default is shortened to `max-run-time` if that is lower.
    pub fn run_time(&self, asked: Option<Duration>, default: Duration) -> Duration {
        asked.unwrap_or_else(|| self.max_run_time.map_or(default, |max| default.min(max)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(memory: u64, cpus: u32, egress: &Egress) -> Request<'_> {
        Request {
            memory,
            cpus,
            run_time: None,
            egress,
        }
    }

    #[test]
    fn limits_parse_and_refuse_naming_the_limit_and_the_file() {
        let path = Path::new("/etc/cowclone.toml");
        let limits = Limits::parse(
            "[limits]\nmax-memory = \"1G\"\nmax-cpus = 2\nmax-run-time = \"5m\"\n\
             allowed-egress = [\"10.0.2.2:3128\"]\n",
            path,
        )
        .unwrap();
        assert_eq!(limits.max_memory, Some(1 << 30));
        assert_eq!(limits.max_run_time, Some(Duration::from_secs(300)));
        let deny = Egress::Deny;
        limits.check(&request(1 << 30, 2, &deny)).unwrap();
        let e = limits
            .check(&request(2 << 30, 1, &deny))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("memory 2048 MiB") && e.contains("max-memory = 1024 MiB"),
            "{e}"
        );
        assert!(e.contains("/etc/cowclone.toml"), "{e}");
        let e = limits.check(&request(1, 3, &deny)).unwrap_err().to_string();
        assert!(e.contains("max-cpus = 2"), "{e}");
        let ok = Egress::Allow(vec![("10.0.2.2".into(), 3128)]);
        limits.check(&request(1, 1, &ok)).unwrap();
        let other = Egress::Allow(vec![("10.0.2.2".into(), 80)]);
        let e = limits
            .check(&request(1, 1, &other))
            .unwrap_err()
            .to_string();
        assert!(e.contains("egress to 10.0.2.2:80"), "{e}");
        let mut long = request(1, 1, &deny);
        long.run_time = Some(Duration::from_secs(301));
        let e = limits.check(&long).unwrap_err().to_string();
        assert!(e.contains("max-run-time = 300 s"), "{e}");
        // The default run time is shortened to the limit; an asked one is kept.
        let default = Duration::from_secs(600);
        assert_eq!(limits.run_time(None, default), Duration::from_secs(300));
        let asked = Some(Duration::from_secs(10));
        assert_eq!(limits.run_time(asked, default), Duration::from_secs(10));
        // No file: no limits.
        Limits::default()
            .check(&request(1 << 40, 256, &other))
            .unwrap();
    }

    #[test]
    fn bad_files_are_errors_naming_the_file() {
        let path = Path::new("/x/config.toml");
        for text in [
            "[limits]\nmax-memroy = \"1G\"\n",
            "[limits]\nmax-memory = \"lots\"\n",
            "[limits]\nmax-cpus = 0\n",
            "[limits]\nmax-run-time = \"forever\"\n",
            "[limits]\nallowed-egress = [\"nohost\"]\n",
            "[other]\n",
            "not toml",
        ] {
            let e = Limits::parse(text, path).unwrap_err().to_string();
            assert!(e.starts_with("/x/config.toml: "), "{text:?}: {e}");
        }
        assert_eq!(Limits::parse("", path).unwrap().max_memory, None);
    }
}
