//! Several requests in flight over NBD (formats/nbd.md, "Client"): large reads and writes go
//! over up to four connections when the server advertises multi-conn (`qemu-nbd --shared`
//! above 1), the connections beyond the first are given back when idle (so a server's client
//! limit lets the next host in), and the background read-ahead never serves bytes older than
//! a write — checked against a real `qemu-nbd` and the file it serves.

mod common;
mod nbd_support;

use std::path::Path;
use std::time::{Duration, Instant};

use nbd_support::{QemuNbd, Transport};
use vmsnap::block::storage::NbdStorage;
use vmsnap::block::Storage;

const MIB: usize = 1 << 20;

fn tools(test: &str) -> bool {
    common::require(test, &["qemu-nbd"])
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A file of `len` pseudo-random bytes.
fn export_file(dir: &Path, len: usize, seed: u64) -> (std::path::PathBuf, Vec<u8>) {
    let data = Rng(seed).bytes(len);
    let p = dir.join("export.raw");
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

/// Issues large reads until the storage has `want` connections open, or `limit` passes.
fn wait_for_connections(st: &NbdStorage, want: usize, limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    let mut buf = vec![0u8; 8 * MIB];
    loop {
        st.read_at(0, &mut buf).unwrap();
        let n = st.connections();
        if n == want || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (without requests) until the storage is back to `want` connections.
fn wait_idle(st: &NbdStorage, want: usize, limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    while st.connections() != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    st.connections()
}

#[test]
fn large_requests_spread_over_connections_when_the_server_allows_it() {
    if !tools("large_requests_spread_over_connections_when_the_server_allows_it") {
        return;
    }
    for transport in [Transport::Unix, Transport::Tcp] {
        let dir = tempfile::tempdir().unwrap();
        let (file, mut model) = export_file(dir.path(), 64 * MIB, 7);
        let srv = QemuNbd::start_shared(&file, transport, Some(4));
        let st = NbdStorage::open(srv.uri(), true).unwrap();
        assert_eq!(st.connections(), 1, "one connection until a large request");
        assert_eq!(
            wait_for_connections(&st, 4, Duration::from_secs(10)),
            4,
            "{transport:?}: a multi-conn server gets four connections"
        );
        // Reads over all four give the file's bytes, at any alignment.
        let mut buf = vec![0u8; 32 * MIB + 4097];
        st.read_at(3 * MIB as u64 + 5, &mut buf).unwrap();
        assert!(
            buf == model[3 * MIB + 5..3 * MIB + 5 + buf.len()],
            "{transport:?}"
        );
        // A large unaligned write lands whole once flushed.
        let data = Rng(99).bytes(16 * MIB + 12345);
        let at = 8 * MIB + 777;
        st.write_at(at as u64, &data).unwrap();
        st.flush().unwrap();
        model[at..at + data.len()].copy_from_slice(&data);
        assert!(
            std::fs::read(&file).unwrap() == model,
            "{transport:?}: file after flush"
        );
        let mut back = vec![0u8; data.len()];
        st.read_at(at as u64, &mut back).unwrap();
        assert!(back == data, "{transport:?}: read back");
        // Unused, the extra connections are closed again.
        assert_eq!(
            wait_idle(&st, 1, Duration::from_secs(10)),
            1,
            "{transport:?}"
        );
    }
}

#[test]
fn one_connection_when_the_server_serves_one_client() {
    if !tools("one_connection_when_the_server_serves_one_client") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (file, model) = export_file(dir.path(), 32 * MIB, 8);
    // qemu-nbd's default: one client, no multi-conn advertised.
    let srv = QemuNbd::start(&file, Transport::Unix);
    let st = NbdStorage::open(srv.uri(), true).unwrap();
    let t = Instant::now();
    let mut buf = vec![0u8; 24 * MIB];
    for _ in 0..4 {
        st.read_at(MIB as u64, &mut buf).unwrap();
        assert!(buf == model[MIB..25 * MIB]);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(st.connections(), 1);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn a_client_limit_is_respected_and_its_slots_are_given_back_when_idle() {
    if !tools("a_client_limit_is_respected_and_its_slots_are_given_back_when_idle") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (file, model) = export_file(dir.path(), 32 * MIB, 9);
    // Two clients at once (multi-conn advertised): this process gets two, and its attempts
    // beyond the limit never hold up a request.
    let srv = QemuNbd::start_shared(&file, Transport::Unix, Some(2));
    let st = NbdStorage::open(srv.uri(), false).unwrap();
    let mut buf = vec![0u8; 16 * MIB];
    let deadline = Instant::now() + Duration::from_secs(6);
    while Instant::now() < deadline {
        let t = Instant::now();
        st.read_at(0, &mut buf).unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "a read waited {:?} (for a connection the server does not take?)",
            t.elapsed()
        );
        assert!(buf == model[..16 * MIB]);
        assert!(st.connections() <= 2, "{}", st.connections());
    }
    assert_eq!(st.connections(), 2);
    // Another host connects while this one stays open but idle: it gets in once the extra
    // connection is given back.
    let t = Instant::now();
    let mut other = std::os::unix::net::UnixStream::connect(srv.socket()).unwrap();
    other
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let e = nbd::client::handshake(&mut other, b"").expect("the other host's handshake");
    assert_eq!(e.size, 32 * MIB as u64);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(st.connections(), 1);
    // The first host still reads (on its first connection).
    st.read_at(5, &mut buf[..4096]).unwrap();
    assert!(buf[..4096] == model[5..4101]);
}

#[test]
fn reads_see_every_write_while_reading_ahead() {
    if !tools("reads_see_every_write_while_reading_ahead") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (file, mut model) = export_file(dir.path(), 64 * MIB, 10);
    let srv = QemuNbd::start_shared(&file, Transport::Unix, Some(4));
    let st = NbdStorage::open(srv.uri(), true).unwrap();
    let mut rng = Rng(0x5eed);
    // A sequential reader in 64 KiB pieces (as loadvm's stream reader), with writes now and
    // then anywhere in the next 24 MiB (the current window, the one fetched ahead, beyond),
    // an occasional large read (split over the connections) and a read elsewhere.
    let piece = 64 << 10;
    let mut pos = 0usize;
    let mut buf = vec![0u8; piece];
    let mut step = 0u32;
    while pos + piece <= 48 * MIB {
        st.read_at(pos as u64, &mut buf).unwrap();
        assert!(
            buf == model[pos..pos + piece],
            "step {step}: read at {pos:#x}"
        );
        pos += piece;
        step += 1;
        match rng.below(16) {
            0 | 1 => {
                let len = 1 + rng.below(MIB);
                let at = (pos + rng.below(24 * MIB)).min(model.len() - len);
                let data = rng.bytes(len);
                st.write_at(at as u64, &data).unwrap();
                model[at..at + len].copy_from_slice(&data);
            }
            2 => {
                let len = 2 * MIB + rng.below(4 * MIB);
                let at = rng.below(model.len() - len);
                let mut big = vec![0u8; len];
                st.read_at(at as u64, &mut big).unwrap();
                assert!(
                    big == model[at..at + len],
                    "step {step}: large read at {at:#x}"
                );
            }
            3 => {
                let mut small = [0u8; 512];
                let at = rng.below(model.len() - 512);
                st.read_at(at as u64, &mut small).unwrap();
                assert!(
                    small[..] == model[at..at + 512],
                    "step {step}: read at {at:#x}"
                );
            }
            _ => {}
        }
    }
    st.flush().unwrap();
    assert!(
        std::fs::read(&file).unwrap() == model,
        "the file after the flush"
    );
}

#[test]
fn a_long_write_in_pieces_lands_whole() {
    if !tools("a_long_write_in_pieces_lands_whole") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (file, mut model) = export_file(dir.path(), 160 * MIB, 11);
    let srv = QemuNbd::start_shared(&file, Transport::Tcp, Some(4));
    let st = NbdStorage::open(srv.uri(), true).unwrap();
    // As savevm writes VM state: 8 MiB pieces through the write-behind queue, each split
    // over the connections, at an offset that is not piece-aligned.
    let mut rng = Rng(12);
    for at in (0..150 * MIB).step_by(8 * MIB) {
        let data = rng.bytes(8 * MIB);
        st.write_at(at as u64 + 3, &data).unwrap();
        model[at + 3..at + 3 + data.len()].copy_from_slice(&data);
    }
    st.flush().unwrap();
    assert!(st.connections() > 1);
    assert!(
        std::fs::read(&file).unwrap() == model,
        "the file after the flush"
    );
}
