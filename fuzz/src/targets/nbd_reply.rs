//! `nbd_reply`: an NBD server's bytes as vmsnap's client reads them. The input is everything
//! the server sends, in order: the fixed-newstyle handshake (with the export's size and
//! flags), then one simple reply (and a read's data) per request. The client is a drive's
//! connection code (`block::storage::nbd::run_over`, the `nbd` crate under vmsnap's wire
//! layer) over an in-memory stream whose reads come from the input (its end is EOF) and
//! whose writes are dropped. Requests: the reads, writes, flush and trim a drive issues,
//! fixed, so that a reply's place in the input says which request it answers.

use std::io::{self, Read, Write};

use vmsnap::block::storage::nbd::{run_over, NbdError, NbdRequest};

/// The server's side: reads from the input, writes go nowhere.
struct Server<'a> {
    input: &'a [u8],
}

impl Read for Server<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Server<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the client asks, in order (the seeds answer an export of 1 MiB).
pub const REQUESTS: &[NbdRequest] = &[
    NbdRequest::Read {
        offset: 0,
        len: 4096,
    },
    NbdRequest::Write {
        offset: 4096,
        len: 4096,
    },
    NbdRequest::Flush,
    NbdRequest::Trim {
        offset: 0,
        end: 65536,
    },
    NbdRequest::Read {
        offset: (1 << 20) - 512,
        len: 512,
    },
    NbdRequest::Read {
        offset: 8192,
        len: 1024,
    },
];

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    let server = Server { input: data };
    let (info, results) = match run_over("nbd://fuzz/", server, "disk", REQUESTS) {
        Ok(r) => r,
        Err(e) => {
            assert!(matches!(e, NbdError::Handshake { .. }), "{e:?}");
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert_eq!(results.len(), REQUESTS.len());
    // Once a request failed the connection is lost: every later one fails too.
    if let Some(first) = results.iter().position(Result::is_err) {
        for r in &results[first..] {
            let e = r.as_ref().expect_err("a lost connection stays lost");
            assert!(!e.to_string().is_empty());
        }
    }
    let _ = info.size;
}
