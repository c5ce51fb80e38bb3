//! A minimal QMP client: JSON objects, one per line, over qemu's control socket. After the
//! greeting and `qmp_capabilities`, each command gets one `return` or `error` reply; events
//! that arrive in between are skipped.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::VmError;

/// Longest reply line accepted (qemu's replies to the commands used here are far smaller).
const MAX_LINE: usize = 1 << 20;

/// An open QMP session in command mode.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to `socket`, reads the greeting and enters command mode; every read and write
    /// waits at most `timeout`.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Qmp, VmError> {
        let fail = |step: &'static str| {
            move |e: std::io::Error| VmError::Qmp {
                step,
                detail: e.to_string(),
            }
        };
        let stream = UnixStream::connect(socket).map_err(fail("connect"))?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(fail("connect"))?;
        let writer = stream.try_clone().map_err(fail("connect"))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message("greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(VmError::Qmp {
                step: "greeting",
                detail: format!("not a QMP greeting: {greeting}"),
            });
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs `command` (with `arguments`) and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, VmError> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| VmError::Qmp {
                step: "send",
                detail: e.to_string(),
            })?;
        loop {
            let mut reply = self.read_message("reply")?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(value) = reply.get_mut("return") {
                return Ok(value.take());
            }
            let detail = reply
                .pointer("/error/desc")
                .and_then(Value::as_str)
                .map_or_else(|| reply.to_string(), str::to_owned);
            return Err(VmError::Qmp {
                step: "command",
                detail: format!("{command}: {detail}"),
            });
        }
    }

    fn read_message(&mut self, step: &'static str) -> Result<Value, VmError> {
        let mut line = String::new();
        let read = (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .map_err(|e| VmError::Qmp {
                step,
                detail: e.to_string(),
            })?;
        if read == 0 {
            return Err(VmError::Qmp {
                step,
                detail: "the connection closed".into(),
            });
        }
        serde_json::from_str(&line).map_err(|e| VmError::Qmp {
            step,
            detail: format!("not JSON ({e}): {}", line.trim_end()),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;
    use std::thread;

    use super::*;

    /// A fake qemu: greets, then answers each command from `answers` in order.
    fn serve(
        listener: UnixListener,
        answers: Vec<&'static str>,
    ) -> thread::JoinHandle<Vec<String>> {
        thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut out = stream.try_clone().unwrap();
            out.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .unwrap();
            let mut requests = Vec::new();
            for (line, answer) in BufReader::new(stream).lines().zip(answers) {
                requests.push(line.unwrap());
                out.write_all(answer.as_bytes()).unwrap();
            }
            requests
        })
    }

    #[test]
    fn commands_get_their_replies_and_events_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let server = serve(
            UnixListener::bind(&socket).unwrap(),
            vec![
                "{\"return\": {}}\n",
                "{\"event\": \"POWERDOWN\"}\n{\"return\": {\"status\": \"running\", \"running\": true}}\n",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n",
            ],
        );
        let mut qmp = Qmp::connect(&socket, Duration::from_secs(5)).unwrap();
        let status = qmp.execute("query-status", None).unwrap();
        assert_eq!(status["status"], "running");
        let err = qmp.execute("quit", Some(json!({"x": 1}))).unwrap_err();
        assert!(err.to_string().contains("quit: nope"), "{err}");
        drop(qmp);
        let requests = server.join().unwrap();
        assert_eq!(requests[0], r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(requests[2], r#"{"arguments":{"x":1},"execute":"quit"}"#);
    }
}
