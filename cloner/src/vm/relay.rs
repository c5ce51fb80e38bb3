//! The egress relay: one guest connection to one allowed host endpoint.
//!
//! qemu's user networking can forward a guest connection (`guestfwd`) either to a character
//! device, which qemu connects once when the VM starts (it refuses to start if the endpoint is
//! down, and every guest connection then shares that one stream), or to a command it runs per
//! connection with the connection on the command's stdin and stdout. cowclone uses the second:
//! the command is `cowclone relay HOST PORT`, which connects to HOST:PORT and copies bytes both
//! ways until both sides are done.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::thread;
use std::time::Duration;

/// How long connecting to the endpoint may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The subcommand word the relay program takes before HOST and PORT.
pub const SUBCOMMAND: &str = "relay";

/// Connects to `host:port` and relays: bytes from `input` go to the endpoint (whose write side
/// is shut down at end of input), bytes from the endpoint go to `output`, until the endpoint
/// closes.
pub fn relay(
    host: &str,
    port: u16,
    mut input: impl Read + Send + 'static,
    mut output: impl Write,
) -> io::Result<()> {
    let mut last_error = io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"));
    let mut stream = None;
    for address in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&address, CONNECT_TIMEOUT) {
            Ok(connected) => {
                stream = Some(connected);
                break;
            }
            Err(e) => last_error = e,
        }
    }
    let stream = stream.ok_or(last_error)?;
    let mut upstream = stream.try_clone()?;
    let sender = thread::spawn(move || {
        let copied = io::copy(&mut input, &mut upstream);
        // End of the guest's data: tell the endpoint, so that request/response protocols finish.
        let _ = upstream.shutdown(Shutdown::Write);
        copied
    });
    let mut downstream = stream;
    let received = io::copy(&mut downstream, &mut output).and_then(|_| output.flush());
    // The sender ends when the guest closes its side; do not wait for it once the endpoint is
    // done, unless it already finished.
    if sender.is_finished() {
        let _ = sender.join();
    }
    received
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn bytes_flow_both_ways_and_end_of_input_reaches_the_endpoint() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            // Reads to end of input: only returns if the relay shut its write side down.
            (&conn).read_to_end(&mut request).unwrap();
            let mut reply = b"got: ".to_vec();
            reply.extend_from_slice(&request);
            (&conn).write_all(&reply).unwrap();
        });
        let mut output = Vec::new();
        relay(
            "127.0.0.1",
            port,
            io::Cursor::new(b"ping\n".to_vec()),
            &mut output,
        )
        .unwrap();
        server.join().unwrap();
        assert_eq!(output.lines().next().unwrap().unwrap(), "got: ping");
    }

    #[test]
    fn a_closed_endpoint_is_an_error() {
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let mut output = Vec::new();
        assert!(relay("127.0.0.1", port, io::empty(), &mut output).is_err());
        assert!(output.is_empty());
    }
}
