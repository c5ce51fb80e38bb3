//! One libvirt host reached through libvirt's remote protocol (`qemu+tcp://…`, `qemu+ssh://…`,
//! or `qemu:///system`): its storage pool and volumes, driven by `virsh --connect URI`. Nothing
//! but libvirtd runs on the host: volumes are created raw-sized (libvirt writes the file itself,
//! no qemu-img) and filled with `vol-upload --sparse`; a replica is verified by streaming it back
//! (`vol-download`) through SHA-256.
//!
//! The registry side (which host holds which replica and clone) is [`crate::registry::hosts`].

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::error::{RegistryError, Result};
use crate::vm::libvirt::Virsh;
use crate::vm::runner::Invocation;

/// Prefix of every volume cowclone makes in a host's pool (`gc` considers only these).
pub const VOLUME_PREFIX: &str = "cowclone-";

/// The volume name of base `base` (row id `id`: a base registered again under the same name
/// gets a new volume) on a host.
pub fn replica_volume(base: &str, id: i64) -> String {
    format!("{VOLUME_PREFIX}base-{id}-{base}")
}

/// The volume name of the remote clone `name`.
pub fn clone_volume(name: &str) -> String {
    format!("{VOLUME_PREFIX}clone-{name}.qcow2")
}

/// The file, in the pool's directory, that a remote clone's serial console is written to.
pub fn serial_volume(name: &str) -> String {
    format!("{VOLUME_PREFIX}serial-{name}.log")
}

/// A host's storage pool as `virsh` sees it.
#[derive(Debug, Clone)]
pub struct HostPool {
    /// The registered host name (for messages).
    pub host: String,
    /// Its libvirt URI.
    pub uri: String,
    /// The storage pool cowclone's volumes go to.
    pub pool: String,
}

impl HostPool {
    fn virsh(&self) -> Virsh {
        Virsh {
            connect: Some(self.uri.clone()),
        }
    }

    fn invocation(&self, args: &[&str]) -> Invocation {
        self.virsh().quiet(args)
    }

    fn remote_error(&self, step: &str, detail: impl Into<String>) -> RegistryError {
        RegistryError::Remote {
            host: self.host.clone(),
            step: step.to_owned(),
            detail: detail.into(),
        }
    }

    /// Runs `virsh ARGS` against the host; its stdout, or an error naming `step`.
    pub fn run(&self, step: &str, args: &[&str]) -> Result<String> {
        let invocation = self.invocation(args);
        tracing::debug!(command = %invocation.shell_line(), "running");
        let output = Command::new(&invocation.program)
            .args(&invocation.args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                self.remote_error(
                    step,
                    format!("cannot run virsh ({e}): install the Debian package libvirt-clients"),
                )
            })?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(self.remote_error(
                step,
                format!(
                    "`{}` failed: {}",
                    invocation.shell_line(),
                    one_line(&output.stderr)
                ),
            ))
        }
    }

    /// Checks that the host answers (`virsh version`), as [`RegistryError::HostUnreachable`].
    pub fn check_answers(&self) -> Result<()> {
        self.run("asking for its version", &["version"])
            .map(drop)
            .map_err(|e| match e {
                RegistryError::Remote { detail, .. } => RegistryError::HostUnreachable {
                    host: self.host.clone(),
                    uri: self.uri.clone(),
                    detail,
                },
                other => other,
            })
    }

    /// Whether the pool exists (`virsh pool-info`).
    pub fn pool_exists(&self) -> bool {
        self.run("pool-info", &["pool-info", &self.pool]).is_ok()
    }

    /// Defines, builds (mkdir), starts and autostarts a directory pool at `dir` on the host.
    pub fn create_dir_pool(&self, dir: &Path) -> Result<()> {
        let dir = dir.to_string_lossy();
        let step = "creating a directory pool";
        self.run(
            step,
            &["pool-define-as", &self.pool, "dir", "--target", &dir],
        )?;
        self.run(step, &["pool-build", &self.pool])?;
        self.run(step, &["pool-start", &self.pool])?;
        self.run(step, &["pool-autostart", &self.pool])?;
        Ok(())
    }

    /// Starts the pool if it is defined but inactive, and refreshes it.
    pub fn activate(&self) -> Result<()> {
        let info = self.run("pool-info", &["pool-info", &self.pool])?;
        let running = info
            .lines()
            .any(|l| l.starts_with("State:") && l.contains("running"));
        if !running {
            self.run("starting the pool", &["pool-start", &self.pool])?;
        }
        self.run("refreshing the pool", &["pool-refresh", &self.pool])
            .map(drop)
    }

    /// The pool's directory on the host (`<target><path>` of `virsh pool-dumpxml`).
    pub fn pool_dir(&self) -> Result<PathBuf> {
        let xml = self.run("reading the pool", &["pool-dumpxml", &self.pool])?;
        let start = xml.find("<target>").and_then(|t| {
            let rest = &xml[t..];
            let open = rest.find("<path>")? + "<path>".len();
            let close = rest.find("</path>")?;
            Some(rest[open..close].to_owned())
        });
        start
            .map(PathBuf::from)
            .ok_or_else(|| self.remote_error("reading the pool", "no <target><path> in its XML"))
    }

    /// The names of the pool's volumes.
    pub fn volumes(&self) -> Result<Vec<String>> {
        self.run("refreshing the pool", &["pool-refresh", &self.pool])?;
        let list = self.run("listing volumes", &["vol-list", &self.pool])?;
        Ok(list
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect())
    }

    /// Creates volume `volume` and uploads `file` into it, holes kept (`vol-create-as` with
    /// allocation 0, `vol-upload --sparse`); returns the volume's path on the host. A volume
    /// left at that name by an interrupted upload is deleted first.
    pub fn upload(&self, volume: &str, file: &Path) -> Result<PathBuf> {
        let size = std::fs::metadata(file)
            .map_err(RegistryError::io(format!("reading {}", file.display())))?
            .len();
        let _ = self.delete(volume);
        let step = format!("uploading {volume}");
        self.run(
            &step,
            &[
                "vol-create-as",
                &self.pool,
                volume,
                &size.to_string(),
                "--allocation",
                "0",
                "--format",
                "raw",
            ],
        )?;
        let uploaded = self.run(
            &step,
            &[
                "vol-upload",
                "--sparse",
                volume,
                &file.to_string_lossy(),
                "--pool",
                &self.pool,
            ],
        );
        if let Err(e) = uploaded {
            let _ = self.delete(volume);
            return Err(e);
        }
        self.path(volume)
    }

    /// The path of `volume` on the host.
    pub fn path(&self, volume: &str) -> Result<PathBuf> {
        let path = self.run(
            &format!("finding {volume}"),
            &["vol-path", volume, "--pool", &self.pool],
        )?;
        Ok(PathBuf::from(path.trim()))
    }

    /// Streams `volume` back from the host (`vol-download` to a pipe) through SHA-256: its
    /// digest (lowercase hex) and length in bytes.
    pub fn sha256(&self, volume: &str) -> Result<(String, u64)> {
        let step = format!("downloading {volume} to verify it");
        let invocation =
            self.invocation(&["vol-download", volume, "/dev/stdout", "--pool", &self.pool]);
        tracing::debug!(command = %invocation.shell_line(), "running");
        let mut child = Command::new(&invocation.program)
            .args(&invocation.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| self.remote_error(&step, format!("cannot run virsh: {e}")))?;
        let mut stdout = child.stdout.take().expect("piped");
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut len = 0u64;
        loop {
            let n = stdout
                .read(&mut buf)
                .map_err(|e| self.remote_error(&step, e.to_string()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            len += n as u64;
        }
        let output = child
            .wait_with_output()
            .map_err(|e| self.remote_error(&step, e.to_string()))?;
        if !output.status.success() {
            return Err(self.remote_error(&step, one_line(&output.stderr)));
        }
        let digest = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok((digest, len))
    }

    /// Deletes `volume` (an error if it is not there).
    pub fn delete(&self, volume: &str) -> Result<()> {
        self.run(
            &format!("deleting {volume}"),
            &["vol-delete", volume, "--pool", &self.pool],
        )
        .map(drop)
    }

    /// Deletes `volume` if the pool has it (after a refresh).
    pub fn delete_if_present(&self, volume: &str) -> Result<()> {
        if self.volumes()?.iter().any(|v| v == volume) {
            self.delete(volume)?;
        }
        Ok(())
    }

    /// The state of domain `name` as `virsh domstate` prints it (`running`, `shut off`, …), or
    /// `None` if the host has no such domain.
    pub fn domain_state(&self, name: &str) -> Result<Option<String>> {
        let list = self.run("listing domains", &["list", "--all", "--name"])?;
        if !list.lines().any(|l| l.trim() == name) {
            return Ok(None);
        }
        let state = self.run("asking a domain's state", &["domstate", name])?;
        Ok(Some(state.trim().to_owned()))
    }

    /// The [`Virsh`] command lines for domains on this host.
    pub fn domains(&self) -> Virsh {
        self.virsh()
    }
}

/// virsh's error output on one line (it prints `error: …` lines).
fn one_line(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .map(|l| l.trim().trim_start_matches("error: "))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(": ")
}

/// SHA-256 (lowercase hex) of a local file.
pub fn local_sha256(path: &Path) -> Result<String> {
    crate::fingerprint::sha256_file(path)
}

/// A token naming this process that survives pid reuse: `PID:START` where START is the
/// process's start time in clock ticks since boot (field 22 of `/proc/PID/stat`).
pub fn owner_token() -> String {
    let pid = std::process::id();
    format!("{pid}:{}", start_time(pid).unwrap_or(0))
}

/// Whether the process an [`owner_token`] names is still alive.
pub fn owner_alive(token: &str) -> bool {
    let Some((pid, start)) = token.split_once(':') else {
        return false;
    };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
        return false;
    };
    start_time(pid) == Some(start)
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_tokens_name_live_processes_only() {
        assert!(owner_alive(&owner_token()));
        let pid = std::process::id();
        let start = start_time(pid).unwrap();
        assert!(!owner_alive(&format!("{pid}:{}", start + 1)), "pid reused");
        assert!(!owner_alive("garbage"));
    }

    #[test]
    fn volume_names_carry_the_prefix() {
        for name in [
            replica_volume("deb12", 3),
            clone_volume("web-1"),
            serial_volume("w"),
        ] {
            assert!(name.starts_with(VOLUME_PREFIX), "{name}");
        }
    }
}
