//! Provisioning: run a script inside a fresh VM and get its output and exit status back.
//!
//! The script travels in a NoCloud seed ([`super::cidata`]) as part of a `user-data` wrapper
//! that cowclone writes: the wrapper decodes the script (base64, so any bytes survive), runs it
//! with stdin closed, and writes the result to the guest's second serial port, which qemu
//! records in `result.log` in the run directory:
//!
//! ```text
//! COWCLONE-RESULT-BEGIN
//! <the script's stdout and stderr, base64>
//! COWCLONE-RESULT-END <exit status>
//! ```
//!
//! cowclone waits (within the timeout) for the end line or for the VM to stop, then stops the
//! VM (ACPI powerdown, then quit) unless asked to keep it running.

use std::fs;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use imagefmt::ImageFormat;
use serde::Serialize;

use super::cidata;
use super::qemu::{QemuDriver, Stopped};
use super::spec::{ExtraDrive, VmSpec};
use super::VmError;

/// The line that opens a result.
pub const BEGIN: &str = "COWCLONE-RESULT-BEGIN";
/// The line that closes a result, followed by the exit status.
pub const END: &str = "COWCLONE-RESULT-END";
/// Default limit for a whole provisioning run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// How to provision.
#[derive(Debug, Clone)]
pub struct ProvisionOptions {
    /// Limit for boot plus script.
    pub timeout: Duration,
    /// Leave the VM running afterwards.
    pub keep_running: bool,
    /// How long the stop waits for the guest to power off before quitting qemu.
    pub stop_timeout: Duration,
}

impl Default for ProvisionOptions {
    fn default() -> Self {
        ProvisionOptions {
            timeout: DEFAULT_TIMEOUT,
            keep_running: false,
            stop_timeout: super::qemu::DEFAULT_STOP_TIMEOUT,
        }
    }
}

/// What a provisioning run produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Provisioned {
    /// The script's stdout and stderr, interleaved as written.
    #[serde(serialize_with = "lossy")]
    pub output: Vec<u8>,
    /// The script's exit status.
    pub exit_status: i32,
    /// How the VM was stopped (`None`: it was kept running).
    pub stopped: Option<Stopped>,
    /// Where the guest console went.
    pub serial_log: PathBuf,
    /// Wall time from start to result, in milliseconds.
    pub elapsed_ms: u128,
}

fn lossy<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(bytes))
}

/// The `user-data` wrapper that runs `script` and reports on `/dev/ttyS1`.
pub fn wrapper(script: &[u8]) -> String {
    let encoded = STANDARD.encode(script);
    let mut lines = String::new();
    for chunk in encoded.as_bytes().chunks(76) {
        lines.push_str(&String::from_utf8_lossy(chunk));
        lines.push('\n');
    }
    format!(
        "#!/bin/sh\n\
         # cowclone provision wrapper: runs the script below and reports its output and exit\n\
         # status on the second serial port.\n\
         dir=$(mktemp -d 2>/dev/null || echo /tmp)\n\
         base64 -d > \"$dir/script\" <<'COWCLONE_SCRIPT'\n\
         {lines}COWCLONE_SCRIPT\n\
         chmod 700 \"$dir/script\"\n\
         \"$dir/script\" < /dev/null > \"$dir/output\" 2>&1\n\
         status=$?\n\
         stty -F /dev/ttyS1 raw -echo 2>/dev/null\n\
         {{ echo {BEGIN}; base64 < \"$dir/output\"; echo \"{END} $status\"; }} > /dev/ttyS1\n"
    )
}

/// The result in a result log, once complete: `(output, exit status)`.
pub fn parse_result(log: &[u8]) -> Option<Result<(Vec<u8>, i32), String>> {
    let text = String::from_utf8_lossy(log);
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    let begin = lines.iter().rposition(|l| *l == BEGIN)?;
    let (end, status) = lines[begin..]
        .iter()
        .enumerate()
        .find_map(|(i, l)| l.strip_prefix(END).map(|rest| (begin + i, rest.trim())))?;
    let Ok(status) = status.parse::<i32>() else {
        return Some(Err(format!("bad exit status {status:?}")));
    };
    let encoded: String = lines[begin + 1..end].concat();
    Some(
        STANDARD
            .decode(encoded.as_bytes())
            .map(|output| (output, status))
            .map_err(|e| format!("undecodable output: {e}")),
    )
}

/// Boots `spec` (its disks already cloned) with `script` in a cidata seed, waits for the
/// result, and stops the VM unless `options.keep_running`.
pub fn provision(
    driver: &QemuDriver<'_>,
    mut spec: VmSpec,
    script: &[u8],
    options: &ProvisionOptions,
) -> Result<Provisioned, VmError> {
    fs::create_dir_all(&spec.run_dir)
        .map_err(VmError::io("creating the run directory", &spec.run_dir))?;
    let seed = spec.run_dir.join("cidata.img");
    let result_log = spec.run_dir.join("result.log");
    for stale in [&seed, &result_log] {
        let _ = fs::remove_file(stale);
    }
    let meta_data = format!(
        "instance-id: cowclone-{}-{}\nlocal-hostname: {}\n",
        spec.name,
        super::runner::now_ns(),
        spec.name
    );
    cidata::write_seed(
        &seed,
        &[
            ("user-data", wrapper(script).as_bytes()),
            ("meta-data", meta_data.as_bytes()),
        ],
    )?;
    spec.extra_drives.push(ExtraDrive {
        path: seed,
        format: ImageFormat::Raw,
        read_only: true,
    });
    spec.extra_serial_logs.push(result_log.clone());
    let started_at = Instant::now();
    driver.start(&spec)?;
    let result = loop {
        let log = fs::read(&result_log).unwrap_or_default();
        if let Some(result) = parse_result(&log) {
            break result.map_err(VmError::BadResult);
        }
        if driver.live_pid(&spec).is_none() {
            // The VM stopped: one last look, the port may have been written just before.
            let log = fs::read(&result_log).unwrap_or_default();
            break match parse_result(&log) {
                Some(result) => result.map_err(VmError::BadResult),
                None => Err(VmError::NoResult {
                    log: spec.serial_log(),
                }),
            };
        }
        if started_at.elapsed() >= options.timeout {
            break Err(VmError::GuestTimedOut {
                seconds: options.timeout.as_secs(),
                log: spec.serial_log(),
            });
        }
        thread::sleep(Duration::from_millis(100));
    };
    let elapsed_ms = started_at.elapsed().as_millis();
    let stopped = if options.keep_running && result.is_ok() {
        None
    } else {
        Some(driver.stop(&spec, options.stop_timeout)?)
    };
    let (output, exit_status) = result?;
    Ok(Provisioned {
        output,
        exit_status,
        stopped,
        serial_log: spec.serial_log(),
        elapsed_ms,
    })
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    #[test]
    fn the_wrapper_runs_the_script_and_its_result_parses_back() {
        // Run the wrapper on the host with /dev/ttyS1 swapped for a file: the protocol end to end.
        let dir = tempfile::tempdir().unwrap();
        let port = dir.path().join("port");
        let script = b"#!/bin/sh\nprintf 'out \\001\\377\\n'\necho err >&2\nexit 7\n";
        let wrapper = wrapper(script).replace("/dev/ttyS1", &port.to_string_lossy());
        let status = Command::new("sh").arg("-c").arg(&wrapper).status().unwrap();
        assert!(status.success());
        let log = fs::read(&port).unwrap();
        let (output, code) = parse_result(&log).unwrap().unwrap();
        assert_eq!(output, b"out \x01\xff\nerr\n");
        assert_eq!(code, 7);
    }

    #[test]
    fn results_are_found_among_noise_and_incomplete_ones_are_not() {
        let log = b"junk\r\nCOWCLONE-RESULT-BEGIN\r\naGk=\r\nCOWCLONE-RESULT-END 0\r\n";
        assert_eq!(parse_result(log), Some(Ok((b"hi".to_vec(), 0))));
        assert_eq!(parse_result(b"COWCLONE-RESULT-BEGIN\naGk=\n"), None);
        assert_eq!(parse_result(b""), None);
        assert!(matches!(
            parse_result(b"COWCLONE-RESULT-BEGIN\n!!\nCOWCLONE-RESULT-END 1\n"),
            Some(Err(_))
        ));
        assert!(matches!(
            parse_result(b"COWCLONE-RESULT-BEGIN\nCOWCLONE-RESULT-END x\n"),
            Some(Err(_))
        ));
    }
}
