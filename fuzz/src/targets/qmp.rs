//! `qmp`: a QMP client's bytes as the monitor reads them, up to where a command would touch
//! the VM: messages cut from the stream (`take_messages`, in the chunks a session reads,
//! with its 1 MiB limit on one message), each message's envelope checked (`request`),
//! `qmp_capabilities`' arguments checked, and the argument accessors commands use run on
//! every command's arguments. Every error reply the session would send must be valid JSON
//! that reads back the same.

use serde_json::Value;
use vmsnap::monitor::qmp::args::Args;
use vmsnap::monitor::qmp::input::{capabilities, id_of, reply, request, take_messages, MAX_INPUT};
use vmsnap::monitor::qmp::QmpError;

/// The session's read size.
const CHUNK: usize = 64 << 10;

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    let mut buf = Vec::new();
    for chunk in data.chunks(CHUNK) {
        buf.extend_from_slice(chunk);
        for m in take_messages(&mut buf) {
            match m {
                Ok(msg) => message(&msg),
                Err(e) => check_reply(None, QmpError::generic(e)),
            }
        }
        if buf.len() > MAX_INPUT {
            buf.clear();
            let e = format!("JSON parse error, QMP input longer than {MAX_INPUT} bytes");
            check_reply(None, QmpError::generic(e));
        }
        assert!(buf.len() <= MAX_INPUT);
    }
}

fn message(msg: &Value) {
    let id = id_of(msg);
    let (name, map) = match request(msg) {
        Ok(r) => r,
        Err(e) => return check_reply(id, e),
    };
    let empty = serde_json::Map::new();
    let a = Args::new(map.unwrap_or(&empty));
    if name == "qmp_capabilities" {
        if let Err(e) = capabilities(&a) {
            check_reply(id, e);
        }
        return;
    }
    // The accessors the commands take their arguments with, on names they use.
    let errs = [
        a.str("command-line").err(),
        a.opt_str("uri").err(),
        a.opt_str("job-id").err(),
        a.opt_u64("value").err(),
        a.u64("calc-time").err(),
        a.opt_bool("detach").err(),
        a.str_list("devices").err(),
        a.list("capabilities").err(),
        a.finish().err(),
    ];
    let _ = a.opt_any("tag");
    let _ = a.all().len();
    for e in errs.into_iter().flatten() {
        check_reply(id, e);
    }
    check_reply(id, QmpError::not_found(name));
}

/// The error reply serialises to JSON that parses back to the same value.
fn check_reply(id: Option<&Value>, e: QmpError) {
    assert!(!e.class.is_empty() && !e.desc.is_empty(), "{e:?}");
    let msg = reply(id, Err(e));
    let text = serde_json::to_string(&msg).expect("a reply serialises");
    let back: Value = serde_json::from_str(&text).expect("a reply is valid JSON");
    assert_eq!(back, msg, "{text}");
    assert!(back["error"]["class"].is_string() && back["error"]["desc"].is_string());
}
