//! NBD servers for the tests: `qemu-nbd -f raw` on a qcow2 file (so vmsnap, not the server,
//! interprets the qcow2), over a Unix socket or TCP on loopback, and a proxy in front of a
//! server that cuts or stalls the connection after a given number of bytes (the server
//! "going away" at a chosen point, without timing luck).
#![allow(dead_code)]

pub mod netns;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How the server listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `nbd+unix:///?socket=PATH`.
    Unix,
    /// `nbd://127.0.0.1:PORT/`.
    Tcp,
}

/// A running `qemu-nbd -f raw -t` serving one file; killed on drop.
#[derive(Debug)]
pub struct QemuNbd {
    child: Option<Child>,
    uri: String,
    file: PathBuf,
    transport: Transport,
    sock: PathBuf,
    port: u16,
    /// `--shared=N`: clients served at once (qemu-nbd's default: 1); above 1, the server
    /// advertises multi-conn.
    shared: Option<u32>,
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl QemuNbd {
    /// Serves `file` (raw, persistent: the server outlives each client). The socket goes in
    /// the file's directory.
    pub fn start(file: &Path, transport: Transport) -> Self {
        Self::start_shared(file, transport, None)
    }

    /// As [`QemuNbd::start`], serving up to `shared` clients at once (0: any number).
    pub fn start_shared(file: &Path, transport: Transport, shared: Option<u32>) -> Self {
        let sock = file.with_extension("nbd.sock");
        let port = match transport {
            Transport::Unix => 0,
            Transport::Tcp => free_port(),
        };
        let mut s = QemuNbd {
            child: None,
            uri: String::new(),
            file: file.to_path_buf(),
            transport,
            sock,
            port,
            shared,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.sock);
        let mut c = Command::new("qemu-nbd");
        c.args(["-f", "raw", "-t", "--cache=writeback"]);
        if let Some(n) = self.shared {
            c.arg(format!("--shared={n}"));
        }
        match self.transport {
            Transport::Unix => {
                c.arg("-k").arg(&self.sock);
                self.uri = format!("nbd+unix:///?socket={}", self.sock.display());
            }
            Transport::Tcp => {
                c.args(["-b", "127.0.0.1", "-p", &self.port.to_string()]);
                self.uri = format!("nbd://127.0.0.1:{}/", self.port);
            }
        }
        c.arg(&self.file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        self.child = Some(c.spawn().expect("qemu-nbd"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let up = match self.transport {
                Transport::Unix => UnixStream::connect(&self.sock).is_ok(),
                Transport::Tcp => TcpStream::connect(("127.0.0.1", self.port)).is_ok(),
            };
            if up {
                return;
            }
            assert!(Instant::now() < deadline, "qemu-nbd did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The URI vmsnap opens.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The Unix socket path (Unix transport).
    pub fn socket(&self) -> &Path {
        &self.sock
    }

    /// Stops the server (it flushes and releases the file's locks).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM: qemu-nbd closes the image cleanly.
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Kills the server at once (the host "goes away").
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same address after [`QemuNbd::kill`] or [`QemuNbd::stop`].
    pub fn respawn(&mut self) {
        self.spawn();
    }

    /// Starts it again on the same address.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What the proxy does once `after` bytes went from the client to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Close both connections (the server went away).
    Close,
    /// Stop forwarding but keep the sockets open (the server hangs).
    Stall,
}

/// A Unix-socket proxy in front of a server's Unix socket; the cut counts the bytes of all
/// its clients together.
#[derive(Debug)]
pub struct Proxy {
    sock: PathBuf,
    /// Bytes forwarded from clients to the server so far.
    pub sent: Arc<AtomicU64>,
    limit: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// Listens on `sock`, forwarding to `server`; after `after` client bytes it does `cut`
    /// (`u64::MAX`: never).
    pub fn start(sock: &Path, server: &Path, after: u64, cut: Cut) -> Self {
        let _ = std::fs::remove_file(sock);
        let l = UnixListener::bind(sock).unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        let limit = Arc::new(AtomicU64::new(after));
        let stop = Arc::new(AtomicBool::new(false));
        let (server, sent2, stop2) = (server.to_path_buf(), sent.clone(), stop.clone());
        let limit2 = limit.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(client) = c else { return };
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(up) = UnixStream::connect(&server) else {
                    return;
                };
                let (c2, u2) = (client.try_clone().unwrap(), up.try_clone().unwrap());
                let (limit3, sent3) = (limit2.clone(), sent2.clone());
                // Each client on threads of its own (a multi-conn client has several at
                // once); the meter counts them all.
                std::thread::spawn(move || {
                    // server -> client, unmetered
                    let back = std::thread::spawn(move || copy_plain(u2, c2));
                    copy_metered(client, up, &limit3, cut, &sent3);
                    let _ = back.join();
                });
            }
        });
        Proxy {
            sock: sock.to_path_buf(),
            sent,
            limit,
            stop,
        }
    }

    /// Cuts once `more` further bytes have gone from the client to the server.
    pub fn cut_after(&self, more: u64) {
        let now = self.sent.load(Ordering::SeqCst);
        self.limit.store(now.saturating_add(more), Ordering::SeqCst);
    }

    /// The URI of the proxied export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }
}

fn copy_plain(mut from: UnixStream, mut to: UnixStream) {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

fn copy_metered(
    mut from: UnixStream,
    mut to: UnixStream,
    limit: &AtomicU64,
    cut: Cut,
    sent: &AtomicU64,
) {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let done = sent.load(Ordering::SeqCst);
        let left = limit.load(Ordering::SeqCst).saturating_sub(done);
        if left == 0 {
            match cut {
                Cut::Close => {
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                }
                Cut::Stall => {
                    // Keep both ends open, forward nothing, until the client gives up.
                    let mut sink = [0u8; 1 << 16];
                    while matches!(from.read(&mut sink), Ok(n) if n > 0) {}
                    let _ = to.shutdown(std::net::Shutdown::Both);
                }
            }
            return;
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        match from.read(&mut buf[..want]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                sent.fetch_add(n as u64, Ordering::SeqCst);
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}
