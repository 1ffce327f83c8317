//! The QMP protocol of `vmsnap run --qmp`: QEMU's own client (qemu.qmp) runs the `protocol`
//! scenario and a migration and sees what QEMU 7.2 gives (testdata/qmp/); a raw socket
//! checks negotiation, `id`, malformed and oversized input, events to several clients, TCP.
mod common;
use common::qmp::{
    assert_greeting, assert_steps_match, fixture, image_dir, sequence, start_with_qmp,
};
use common::run_vm::{assert_check, RunVm};
use common::ticks::assert_continues;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

static SERIAL: Mutex<()> = Mutex::new(());

fn start(dir: &Path, img: &Path, run: u32, extra: &[&str]) -> RunVm {
    let drives = [format!("file={},node-name=disk0", img.display())];
    start_with_qmp(dir, &drives, run, extra)
}

#[test]
fn qemu_client_sees_qemu_s_replies_and_errors() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((dir, img)) = image_dir(module_path!()) else {
        return;
    };
    let vm = start(dir.path(), &img, 1, &[]);
    vm.wait_past(2);
    let ours = sequence(&dir.path().join("qmp1.sock"), &["protocol"]);
    assert_greeting(&ours);
    assert_steps_match(&ours, &fixture("protocol"));
    vm.quit();
}

/// A raw QMP client: one JSON object per line from the server.
struct Raw {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Raw {
    fn connect(sock: &Path) -> (Raw, Value) {
        let w = UnixStream::connect(sock).unwrap();
        w.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut raw = Raw {
            r: BufReader::new(w.try_clone().unwrap()),
            w,
        };
        let greeting = raw.next();
        (raw, greeting)
    }

    fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).unwrap();
    }

    fn next(&mut self) -> Value {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l:?}"))
    }

    /// The next message that is not an event.
    fn reply(&mut self) -> Value {
        loop {
            let v = self.next();
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    fn event(&mut self, name: &str) -> Value {
        loop {
            let v = self.next();
            if v["event"] == name {
                return v;
            }
        }
    }
}

#[test]
fn negotiation_ids_bad_input_and_events_to_every_client() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((dir, img)) = image_dir(module_path!()) else {
        return;
    };
    let vm = start(dir.path(), &img, 1, &[]);
    let sock = dir.path().join("qmp1.sock");
    let (mut a, greeting) = Raw::connect(&sock);
    assert_eq!(greeting["QMP"]["capabilities"], json!([]));
    // Before negotiation every command is refused.
    a.send(br#"{"execute": "query-status", "id": 7}"#);
    assert_eq!(
        a.reply(),
        json!({"error": {"class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 7})
    );
    a.send(br#"{"execute": "qmp_capabilities", "id": "neg"}"#);
    assert_eq!(a.reply(), json!({"return": {}, "id": "neg"}));
    // Malformed input: answered, the session goes on.
    a.send(b"{\"execute\": }\n");
    let e = a.reply();
    assert_eq!(e["error"]["class"], "GenericError", "{e}");
    a.send(b"[1, 2]");
    assert_eq!(
        a.reply()["error"]["desc"],
        "QMP input must be a JSON object"
    );
    a.send(br#"{"arguments": {}}"#);
    assert_eq!(
        a.reply()["error"]["desc"],
        "QMP input lacks member 'execute'"
    );
    // An oversized message is refused without growing without bound.
    let big = format!("{{\"execute\": \"{}", "x".repeat(2 << 20));
    a.send(big.as_bytes());
    a.send(b"\"}");
    let e = a.reply();
    assert!(
        e["error"]["desc"].as_str().unwrap().contains("longer than"),
        "{e}"
    );
    // Whatever is left of the oversized message may give parse errors; a marker resyncs.
    a.send(br#"{"execute": "query-version", "id": "sync"}"#);
    loop {
        let r = a.reply();
        if r["id"] == "sync" {
            assert_eq!(r["return"]["qemu"]["major"], 7);
            break;
        }
    }
    // getfd: a descriptor sent with SCM_RIGHTS is kept under its name until closefd.
    {
        use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        use std::os::fd::AsFd;
        let (x, _y) = UnixStream::pair().unwrap();
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut anc = SendAncillaryBuffer::new(&mut space);
        let fds = [x.as_fd()];
        assert!(anc.push(SendAncillaryMessage::ScmRights(&fds)));
        let msg = br#"{"execute": "getfd", "arguments": {"fdname": "f1"}}"#;
        sendmsg(
            &a.w,
            &[std::io::IoSlice::new(msg)],
            &mut anc,
            SendFlags::empty(),
        )
        .unwrap();
        assert_eq!(a.reply(), json!({"return": {}}));
        a.send(br#"{"execute": "closefd", "arguments": {"fdname": "f1"}}"#);
        assert_eq!(a.reply(), json!({"return": {}}));
        a.send(br#"{"execute": "closefd", "arguments": {"fdname": "f1"}}"#);
        assert_eq!(
            a.reply()["error"]["desc"],
            "File descriptor named 'f1' not found"
        );
    }
    // A second client; both get the events of a stop made by the HMP monitor.
    let (mut b, _) = Raw::connect(&sock);
    b.send(br#"{"execute": "qmp_capabilities"}"#);
    assert_eq!(b.reply(), json!({"return": {}}));
    let mut vm = vm;
    vm.ok("stop");
    for c in [&mut a, &mut b] {
        let ev = c.event("STOP");
        assert!(
            ev["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000,
            "{ev}"
        );
        assert!(ev["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
    }
    b.send(br#"{"execute": "cont"}"#);
    assert_eq!(b.reply(), json!({"return": {}}));
    a.event("RESUME");
    // quit: SHUTDOWN, then the process ends cleanly.
    b.send(br#"{"execute": "quit"}"#);
    assert_eq!(b.reply(), json!({"return": {}}));
    let ev = a.event("SHUTDOWN");
    assert_eq!(
        ev["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    drop(vm);
    assert_check(&img);
}

#[test]
fn tcp_qmp_answers() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((dir, img)) = image_dir(module_path!()) else {
        return;
    };
    // A free port, then vmsnap listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let drives = [format!("file={}", img.display())];
    let qmp = format!("tcp:127.0.0.1:{port},server=on,wait=off");
    let vm = RunVm::start_with(dir.path(), &drives, 1, None, 1, &["--qmp", &qmp]);
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    assert!(l.contains("\"QMP\""), "{l}");
    (&s).write_all(br#"{"execute": "qmp_capabilities"}{"execute": "query-named-block-nodes"}"#)
        .unwrap();
    l.clear();
    r.read_line(&mut l).unwrap();
    l.clear();
    r.read_line(&mut l).unwrap();
    let v: Value = serde_json::from_str(&l).unwrap();
    let node = &v["return"][0];
    assert_eq!(node["node-name"], "drive0", "{v}");
    assert_eq!(node["drv"], "qcow2");
    assert_eq!(node["image"]["virtual-size"], 16 << 20);
    vm.quit();
}

#[test]
fn migrate_over_unix_to_a_deferred_destination_polls_to_completed_and_it_counts_on() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((dir, img)) = image_dir(module_path!()) else {
        return;
    };
    let uri = format!("unix:{}", dir.path().join("mig.sock").display());
    let src = start(dir.path(), &img, 1, &[]);
    // The destination learns its URI from QMP's migrate-incoming (`--incoming defer`).
    let dst = start(dir.path(), &img, 2, &["--incoming", "defer"]);
    let qmp2 = dir.path().join("qmp2.sock");
    let args = json!({ "uri": uri }).to_string();
    let r = sequence(&qmp2, &["cmd", "migrate-incoming", &args]);
    assert_eq!(r["steps"][0]["return"], json!({}), "{r:#}");
    let again = sequence(&qmp2, &["cmd", "migrate-incoming", &args]);
    assert_eq!(
        again["steps"][0]["error"]["desc"],
        "The incoming migration has already been started"
    );
    let st = sequence(&qmp2, &["cmd", "query-status", "{}"]);
    assert_eq!(st["steps"][0]["return"]["status"], "inmigrate");
    let not = sequence(
        &dir.path().join("qmp1.sock"),
        &["cmd", "migrate-incoming", &args],
    );
    assert_eq!(
        not["steps"][0]["error"]["desc"],
        "'-incoming' was not specified on the command line"
    );
    src.wait_past(3);
    let ours = sequence(&dir.path().join("qmp1.sock"), &["migrate", &uri]);
    let qemu = fixture("migrate");
    let polled = &ours["steps"][2];
    let statuses = polled["query-migrate statuses"].as_array().unwrap();
    assert_eq!(statuses.last(), Some(&json!("completed")), "{ours:#}");
    assert_eq!(polled["events"], qemu["steps"][2]["events"], "{ours:#}");
    assert_eq!(ours["steps"][3], qemu["steps"][3], "{ours:#}");
    // The destination runs on from the source's last tick.
    let start = Instant::now();
    while dst.ticks().len() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            dst.serial_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_continues(&src.serial_text(), &dst.serial_text());
    drop(src);
    dst.quit();
    assert_check(&img);
}
