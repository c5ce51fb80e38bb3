//! A minimal QMP client: qemu's JSON control protocol on the clone's unix socket. Enough to
//! power a guest down, quit, and ask whether it runs.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::{io, Result, VmError};

/// A connected QMP session (capabilities negotiated).
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to the socket at `path`, reads the greeting and enters command mode.
    pub fn connect(path: &Path) -> Result<Qmp> {
        let stream =
            UnixStream::connect(path).map_err(io(format!("connecting to {}", path.display())))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io("setting the QMP timeout"))?;
        let writer = stream.try_clone().map_err(io("cloning the QMP socket"))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(VmError::Qmp(format!("no greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs `command` (with `arguments`) and returns its `return` value; events received while
    /// waiting are skipped.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        writeln!(self.writer, "{request}").map_err(io(format!("sending QMP {command}")))?;
        loop {
            let message = self.read_message()?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                return Err(VmError::Qmp(format!("{command}: {error}")));
            }
        }
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(io("reading from QMP"))?;
        if n == 0 {
            return Err(VmError::Qmp("connection closed".into()));
        }
        serde_json::from_str(&line).map_err(|e| VmError::Qmp(format!("bad message {line:?}: {e}")))
    }
}
