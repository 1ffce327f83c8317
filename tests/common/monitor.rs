//! A `vmsnap run` monitor on its unix socket, as the tests drive it: every command is
//! followed by `info status`, whose `VM status:` line ends the command's reply.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A connected monitor.
pub struct Monitor {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Monitor {
    /// Connects once `sock` appears (for up to 20 s) and reads the banner. While it waits it
    /// asks `exited` whether the VMM died (Some: why), and panics with that.
    pub fn connect(sock: &Path, mut exited: impl FnMut() -> Option<String>) -> Monitor {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e) => {
                    if let Some(why) = exited() {
                        panic!("vmsnap run exited before its monitor came up: {why}");
                    }
                    assert!(
                        start.elapsed() < Duration::from_secs(20),
                        "monitor socket {} never appeared: {e}",
                        sock.display()
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut banner = String::new();
        reader.read_line(&mut banner).unwrap();
        assert!(banner.contains("monitor"), "{banner}");
        Monitor { stream, reader }
    }

    /// Sends a command; returns its reply and the VM status after it.
    pub fn cmd(&mut self, line: &str) -> (String, String) {
        write!(self.stream, "{line}\ninfo status\n").unwrap();
        let mut reply = String::new();
        loop {
            let mut l = String::new();
            let n = self.reader.read_line(&mut l).unwrap();
            assert!(n > 0, "monitor closed after '{line}'; got: {reply}");
            if let Some(st) = l.trim_end().strip_prefix("VM status: ") {
                return (reply, st.to_string());
            }
            reply.push_str(&l);
        }
    }

    /// [`Monitor::cmd`], with descriptor `fd` sent (SCM_RIGHTS) along with the command's
    /// bytes, as a client passes one for `getfd`.
    pub fn cmd_with_fd(&mut self, line: &str, fd: std::os::fd::BorrowedFd<'_>) -> (String, String) {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::os::fd::AsRawFd;
        let bytes = format!("{line}\n");
        let iov = [std::io::IoSlice::new(bytes.as_bytes())];
        let fds = [fd.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let n = sendmsg::<()>(
            self.stream.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert_eq!(n, bytes.len());
        self.cmd("")
    }

    /// [`Monitor::cmd`], asserting that the reply carries no error.
    pub fn ok(&mut self, line: &str) -> String {
        let (r, _) = self.cmd(line);
        assert!(!r.contains("Error"), "'{line}' failed: {r}");
        r
    }

    /// Sends `line` without waiting for anything (a command the test interrupts).
    pub fn send(&mut self, line: &str) {
        writeln!(self.stream, "{line}").unwrap();
    }

    /// Everything the monitor still sends until it closes (the reply of a command that ends
    /// the process, such as `save FILE`).
    pub fn read_to_end(&mut self) -> String {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut self.reader, &mut out);
        out
    }

    /// Sends `quit` (no status follows it).
    pub fn quit(&mut self) {
        self.send("quit");
    }
}
