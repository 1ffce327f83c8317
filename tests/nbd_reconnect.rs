//! Reconnecting to an NBD server that went away (`reconnect-delay`, formats/nbd.md): against a
//! real `qemu-nbd` killed and started again on the same address, a request finds the new
//! server and goes on when everything written before was flushed; after unflushed writes,
//! reads go on until the first write, which is refused with the reason; a server that stays away fails the
//! request within the delay; multi-conn links drop their extra connections and go on.

mod common;
mod nbd_support;

use std::time::{Duration, Instant};

use nbd_support::{QemuNbd, Transport};
use vmsnap::block::storage::{set_reconnect_delay, NbdStorage};
use vmsnap::block::Storage;

const MIB: usize = 1 << 20;

fn tools(test: &str) -> bool {
    common::require(test, &["qemu-nbd"])
}

/// A 32 MiB export file of a repeating pattern, and the server on it.
fn served(dir: &std::path::Path, transport: Transport, shared: Option<u32>) -> (QemuNbd, Vec<u8>) {
    let data: Vec<u8> = (0..32 * MIB).map(|i| (i % 251) as u8).collect();
    let p = dir.join("export.raw");
    std::fs::write(&p, &data).unwrap();
    (QemuNbd::start_shared(&p, transport, shared), data)
}

/// Kills the server now and starts it again on the same address after `after`.
fn bounce(srv: QemuNbd, after: Duration) -> std::thread::JoinHandle<QemuNbd> {
    let mut srv = srv;
    srv.kill();
    std::thread::spawn(move || {
        std::thread::sleep(after);
        srv.respawn();
        srv
    })
}

fn read(st: &NbdStorage, off: usize, len: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    st.read_at(off as u64, &mut b).map(|()| b)
}

#[test]
fn a_server_back_within_the_delay_is_dialed_again_and_nothing_is_lost() {
    if !tools("a_server_back_within_the_delay_is_dialed_again_and_nothing_is_lost") {
        return;
    }
    for transport in [Transport::Unix, Transport::Tcp] {
        let dir = tempfile::tempdir().unwrap();
        let (srv, data) = served(dir.path(), transport, None);
        set_reconnect_delay(srv.uri(), Duration::from_secs(20));
        let st = NbdStorage::open(srv.uri(), true).unwrap();
        st.write_at(MIB as u64, &[0xa5; 65536]).unwrap();
        st.flush().unwrap();
        let back = bounce(srv, Duration::from_millis(700));
        // Far from anything read before, so that the server is asked.
        let t = Instant::now();
        let got = read(&st, 20 * MIB, 4096).unwrap();
        assert_eq!(got, data[20 * MIB..20 * MIB + 4096]);
        assert!(
            t.elapsed() >= Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        let srv = back.join().unwrap();
        // Writes go on: nothing acknowledged was unflushed at the loss.
        st.write_at(2 * MIB as u64, &[0x5a; 65536]).unwrap();
        st.flush().unwrap();
        let file = std::fs::read(dir.path().join("export.raw")).unwrap();
        assert!(file[MIB..MIB + 65536].iter().all(|&b| b == 0xa5));
        assert!(file[2 * MIB..2 * MIB + 65536].iter().all(|&b| b == 0x5a));
        drop(st);
        drop(srv);
    }
}

#[test]
fn after_unflushed_writes_a_reconnect_serves_reads_and_refuses_writes() {
    if !tools("after_unflushed_writes_a_reconnect_serves_reads_and_refuses_writes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (srv, data) = served(dir.path(), Transport::Unix, None);
    set_reconnect_delay(srv.uri(), Duration::from_secs(20));
    let st = NbdStorage::open(srv.uri(), true).unwrap();
    st.write_at(MIB as u64, &[0xa5; 65536]).unwrap();
    // A read elsewhere waits for the queued write: it is acknowledged, not flushed.
    read(&st, 10 * MIB, 4096).unwrap();
    let back = bounce(srv, Duration::from_millis(300));
    assert_eq!(
        read(&st, 20 * MIB, 4096).unwrap(),
        data[20 * MIB..20 * MIB + 4096]
    );
    let _srv = back.join().unwrap();
    let w = st
        .write_at(3 * MIB as u64, &[1; 4096])
        .and_then(|()| st.flush())
        .unwrap_err()
        .to_string();
    assert!(w.contains("not yet flushed"), "{w}");
    assert!(w.contains("vmsnap check"), "{w}");
    // The refusal stays (as any write error does, for the flush that follows).
    let f = st.flush().unwrap_err().to_string();
    assert!(f.contains("not yet flushed"), "{f}");
}

#[test]
fn a_server_that_stays_away_fails_the_request_within_the_delay() {
    if !tools("a_server_that_stays_away_fails_the_request_within_the_delay") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut srv, _) = served(dir.path(), Transport::Unix, None);
    set_reconnect_delay(srv.uri(), Duration::from_secs(1));
    let st = NbdStorage::open(srv.uri(), false).unwrap();
    read(&st, 0, 4096).unwrap();
    srv.kill();
    let t = Instant::now();
    let e = read(&st, 20 * MIB, 4096).unwrap_err().to_string();
    let took = t.elapsed();
    assert!(e.contains("reconnecting failed"), "{e}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // Later requests try once more, quickly, and find the server when it is back.
    srv.respawn();
    read(&st, 21 * MIB, 4096).unwrap();
}

#[test]
fn a_multi_conn_link_drops_its_extra_connections_and_goes_on() {
    if !tools("a_multi_conn_link_drops_its_extra_connections_and_goes_on") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (srv, data) = served(dir.path(), Transport::Unix, Some(4));
    set_reconnect_delay(srv.uri(), Duration::from_secs(20));
    let st = NbdStorage::open(srv.uri(), true).unwrap();
    // Large reads until the extra connections are open.
    let deadline = Instant::now() + Duration::from_secs(10);
    while st.connections() < 2 {
        assert!(Instant::now() < deadline, "no extra connection opened");
        read(&st, 0, 16 * MIB).unwrap();
    }
    st.write_at(4 * MIB as u64, &vec![7u8; 8 * MIB]).unwrap();
    st.flush().unwrap();
    let back = bounce(srv, Duration::from_millis(300));
    let got = read(&st, 16 * MIB, 16 * MIB).unwrap();
    assert_eq!(got, data[16 * MIB..32 * MIB]);
    let _srv = back.join().unwrap();
    st.write_at(12 * MIB as u64, &vec![9u8; 4 * MIB]).unwrap();
    st.flush().unwrap();
    let file = std::fs::read(dir.path().join("export.raw")).unwrap();
    assert!(file[4 * MIB..12 * MIB].iter().all(|&b| b == 7));
    assert!(file[12 * MIB..16 * MIB].iter().all(|&b| b == 9));
}

#[test]
fn a_paused_vm_goes_on_after_its_nbd_server_is_restarted() {
    let what = "a_paused_vm_goes_on_after_its_nbd_server_is_restarted";
    if !common::kvm(what) || !common::require(what, &["qemu-nbd", "qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    common::qemu_img(&["create", "-q", "-f", "qcow2", common::s(&img), "64M"]).ok();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    let mut srv = QemuNbd::start(&img, Transport::Unix);
    let drive = format!("file={},format=qcow2,reconnect-delay=20", srv.uri());
    let mut vm = common::run_vm::RunVm::start(dir.path(), &[drive], 1, None, 1);
    vm.wait_past(3);
    // `stop` flushes the disks (as QEMU's does): what the guest wrote is on the server.
    let (r, st) = vm.cmd("stop");
    assert_eq!((r.as_str(), st.as_str()), ("", "paused"));
    srv.kill();
    std::thread::sleep(Duration::from_millis(300));
    srv.respawn();
    let (r, st) = vm.cmd("cont");
    assert_eq!((r.as_str(), st.as_str()), ("", "running"));
    let t = vm.last_tick().unwrap_or(0);
    vm.wait_past(t + 3);
    vm.ok("savevm s1");
    let serial = vm.serial_text();
    assert!(!serial.contains("DISK ERROR"), "{serial}");
    vm.quit();
    srv.stop();
    common::run_vm::assert_check(&img);
    let list = common::qemu_img(&["snapshot", "-l", common::s(&img)]).stdout;
    assert!(list.contains(" s1 "), "{list}");
}
