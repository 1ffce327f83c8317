//! A misbehaving NBD server (a few lines of protocol in this test, serving a real qcow2 image
//! from memory) and what vmsnap does with it: a reply with the wrong handle or magic, a short
//! read, a reply longer than asked, an error reply, a server that stops answering (bounded by
//! the timeout), and a server that cannot flush. Each is refused with a clear error, never a
//! panic or a hang.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{qemu_img, require, run, s, vmsnap_bin};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    WrongHandle,
    BadMagic,
    ShortRead,
    TooLong,
    ErrorReply,
    Silent,
    NoFlush,
}

const REQ_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;

/// Serves `image` on `sock`; the second READ overall (the first is the format probe) gets
/// the misbehaviour.
fn serve(sock: &Path, image: Vec<u8>, mode: Mode) {
    let l = UnixListener::bind(sock).unwrap();
    let image = Arc::new(image);
    let reads = Arc::new(AtomicU32::new(0));
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let (image, reads) = (image.clone(), reads.clone());
            std::thread::spawn(move || {
                let _ = connection(c, &image, mode, &reads);
            });
        }
    });
}

fn connection(
    mut c: UnixStream,
    image: &[u8],
    mode: Mode,
    reads: &AtomicU32,
) -> std::io::Result<()> {
    c.write_all(b"NBDMAGICIHAVEOPT")?;
    c.write_all(&1u16.to_be_bytes())?; // FIXED_NEWSTYLE
    let mut b4 = [0u8; 4];
    c.read_exact(&mut b4)?; // client flags
    let mut opt = [0u8; 16];
    c.read_exact(&mut opt)?; // IHAVEOPT, option, length
    let len = u32::from_be_bytes(opt[12..16].try_into().unwrap()) as usize;
    let mut name = vec![0u8; len];
    c.read_exact(&mut name)?;
    // HAS_FLAGS | SEND_FLUSH, or HAS_FLAGS only.
    let flags: u16 = if mode == Mode::NoFlush { 1 } else { 1 | 4 };
    c.write_all(&(image.len() as u64).to_be_bytes())?;
    c.write_all(&flags.to_be_bytes())?;
    c.write_all(&[0u8; 124])?;
    loop {
        let mut req = [0u8; 28];
        c.read_exact(&mut req)?;
        assert_eq!(u32::from_be_bytes(req[0..4].try_into().unwrap()), REQ_MAGIC);
        let kind = u16::from_be_bytes(req[6..8].try_into().unwrap());
        let handle = u64::from_be_bytes(req[8..16].try_into().unwrap());
        let off = u64::from_be_bytes(req[16..24].try_into().unwrap()) as usize;
        let len = u32::from_be_bytes(req[24..28].try_into().unwrap()) as usize;
        let reply = |c: &mut UnixStream, magic: u32, err: u32, h: u64| -> std::io::Result<()> {
            let mut r = Vec::with_capacity(16);
            r.extend_from_slice(&magic.to_be_bytes());
            r.extend_from_slice(&err.to_be_bytes());
            r.extend_from_slice(&h.to_be_bytes());
            c.write_all(&r)
        };
        match kind {
            0 => {
                let data = &image[off..off + len];
                let nth = reads.fetch_add(1, Ordering::SeqCst) + 1;
                if nth < 2 || mode == Mode::NoFlush {
                    reply(&mut c, REPLY_MAGIC, 0, handle)?;
                    c.write_all(data)?;
                    continue;
                }
                match mode {
                    Mode::WrongHandle => {
                        reply(&mut c, REPLY_MAGIC, 0, handle ^ 0x7)?;
                        c.write_all(data)?;
                    }
                    Mode::BadMagic => {
                        reply(&mut c, 0x1234_5678, 0, handle)?;
                        c.write_all(data)?;
                    }
                    Mode::ShortRead => {
                        reply(&mut c, REPLY_MAGIC, 0, handle)?;
                        c.write_all(&data[..len / 2])?;
                        return Ok(());
                    }
                    Mode::TooLong => {
                        reply(&mut c, REPLY_MAGIC, 0, handle)?;
                        c.write_all(data)?;
                        c.write_all(&[0xee; 4096])?;
                    }
                    Mode::ErrorReply => reply(&mut c, REPLY_MAGIC, 5, handle)?,
                    Mode::Silent => {
                        std::thread::sleep(Duration::from_secs(60));
                        return Ok(());
                    }
                    Mode::NoFlush => unreachable!(),
                }
            }
            1 => {
                let mut sink = vec![0u8; len];
                c.read_exact(&mut sink)?;
                reply(&mut c, REPLY_MAGIC, 0, handle)?;
            }
            2 => return Ok(()),
            _ => reply(&mut c, REPLY_MAGIC, 0, handle)?,
        }
    }
}

#[test]
fn bad_replies_are_refused_with_clear_errors() {
    if !require("bad_replies_are_refused_with_clear_errors", &["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "16M"]).ok();
    qemu_img(&["snapshot", "-c", "snap", s(&img)]).ok();
    let mut bytes = std::fs::read(&img).unwrap();
    bytes.resize(4 << 20, 0);
    let cases = [
        (Mode::WrongHandle, "Unexpected handle"),
        (Mode::BadMagic, "Invalid signature"),
        (Mode::ShortRead, "NBD read"),
        (Mode::TooLong, "NBD read"),
        (Mode::ErrorReply, "EIO"),
        (Mode::Silent, "no answer within the timeout"),
    ];
    for (i, (mode, want)) in cases.into_iter().enumerate() {
        let sock = dir.path().join(format!("bad{i}.sock"));
        serve(&sock, bytes.clone(), mode);
        let uri = format!("nbd+unix:///?socket={}", s(&sock));
        let t = Instant::now();
        let r = std::process::Command::new(vmsnap_bin())
            .args(["snapshot", "-l", &uri])
            .env("VMSNAP_NBD_TIMEOUT", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert!(
            matches!(r.status.code(), Some(c) if c != 0 && c != 101),
            "{mode:?}: {r:?}"
        );
        assert!(!stderr.contains("panicked"), "{mode:?}: {stderr}");
        assert!(
            stderr.contains(want),
            "{mode:?}: want '{want}' in: {stderr}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{mode:?} took {:?}",
            t.elapsed()
        );
    }
}

#[test]
fn a_server_that_cannot_flush_is_refused_for_writing() {
    if !require(
        "a_server_that_cannot_flush_is_refused_for_writing",
        &["qemu-img"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "16M"]).ok();
    let mut bytes = std::fs::read(&img).unwrap();
    bytes.resize(4 << 20, 0);
    let sock = dir.path().join("noflush.sock");
    serve(&sock, bytes, Mode::NoFlush);
    let uri = format!("nbd+unix:///?socket={}", s(&sock));
    // Reading needs no flush.
    let r = run(vmsnap_bin(), &["info", &uri]).ok();
    assert!(r.stdout.contains("file format: qcow2"), "{r:#?}");
    let r = run(vmsnap_bin(), &["snapshot", "-c", "x", &uri]).fails_cleanly();
    assert!(r.stderr.contains("does not support flush"), "{r:#?}");
}
