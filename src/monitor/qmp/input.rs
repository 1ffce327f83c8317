//! A client's bytes up to the point a command would touch the VM: messages cut from the
//! stream, the envelope (`execute`, `arguments`, `id`) checked, `qmp_capabilities`'
//! arguments checked, and the reply messages built. The session (`session.rs`) runs exactly
//! these; they are public so that the `qmp` fuzz target drives the same code.

use serde_json::{json, Map, Value};

use super::args::Args;
use super::QmpError;

/// Largest message accepted (bytes of one JSON object).
pub const MAX_INPUT: usize = 1 << 20;

/// Cuts complete JSON values off the front of `buf`, in order with the syntax errors met
/// on the way. After an error parsing starts again at the next `{` (the start of the next
/// message, as QEMU's streamer resets after an error); an incomplete value stays in `buf`.
pub fn take_messages(buf: &mut Vec<u8>) -> Vec<Result<Value, String>> {
    let mut out = Vec::new();
    loop {
        let mut stream = serde_json::Deserializer::from_slice(buf).into_iter::<Value>();
        let mut failed = false;
        let consumed = loop {
            match stream.next() {
                None => break stream.byte_offset(),
                Some(Ok(v)) => out.push(Ok(v)),
                Some(Err(e)) if e.is_eof() => break stream.byte_offset(),
                Some(Err(e)) => {
                    out.push(Err(format!("JSON parse error, {e}")));
                    failed = true;
                    let at = stream.byte_offset();
                    let next = buf[at + 1..].iter().position(|&b| b == b'{');
                    break next.map_or(buf.len(), |k| at + 1 + k);
                }
            }
        };
        buf.drain(..consumed);
        if !failed {
            return out;
        }
    }
}

/// One message's command: its name and arguments (absent arguments are `None`).
pub type Request<'a> = (&'a str, Option<&'a Map<String, Value>>);

/// Checks a message's envelope: a JSON object with `execute` (a string), optional
/// `arguments` (an object) and optional `id`, nothing else.
///
/// # Errors
/// QEMU's `GenericError` for each way the envelope is wrong.
pub fn request(msg: &Value) -> Result<Request<'_>, QmpError> {
    let Value::Object(obj) = msg else {
        return Err(QmpError::generic("QMP input must be a JSON object"));
    };
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "execute" | "arguments" | "id"))
    {
        return Err(QmpError::generic(format!(
            "QMP input member '{k}' is unexpected"
        )));
    }
    let name = match obj.get("execute") {
        None => return Err(QmpError::generic("QMP input lacks member 'execute'")),
        Some(Value::String(s)) => s.as_str(),
        Some(_) => {
            return Err(QmpError::generic(
                "QMP input member 'execute' must be a string",
            ))
        }
    };
    match obj.get("arguments") {
        None => Ok((name, None)),
        Some(Value::Object(m)) => Ok((name, Some(m))),
        Some(_) => Err(QmpError::generic(
            "QMP input member 'arguments' must be an object",
        )),
    }
}

/// The `id` a reply to `msg` carries (a non-object message gets none).
pub fn id_of(msg: &Value) -> Option<&Value> {
    msg.as_object().and_then(|o| o.get("id"))
}

/// Checks `qmp_capabilities`' arguments (no capability is offered, so `enable` must be
/// empty).
///
/// # Errors
/// The capability asked for; an unexpected argument.
pub fn capabilities(a: &Args<'_>) -> Result<(), QmpError> {
    if let Some(first) = a.opt_any("enable").and_then(|v| v.as_array()?.first()) {
        return Err(QmpError::generic(format!(
            "Capability '{}' not available",
            first.as_str().unwrap_or_default()
        )));
    }
    a.finish()
}

/// The reply message: `{"return": V}` or `{"error": {...}}`, with the request's `id`.
pub fn reply(id: Option<&Value>, body: Result<Value, QmpError>) -> Value {
    let mut msg = match body {
        Ok(v) => json!({"return": v}),
        Err(e) => json!({"error": e.to_json()}),
    };
    if let Some(id) = id {
        msg["id"] = id.clone();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_cut_from_a_stream() {
        let mut buf = br#"{"execute": "a"}{"execute": "b"} {"exe"#.to_vec();
        let m = take_messages(&mut buf);
        assert_eq!(m.len(), 2);
        assert!(m.iter().all(Result::is_ok));
        assert_eq!(buf, b"{\"exe");
        buf.extend_from_slice(b"cute\": \"c\"}\n");
        let m = take_messages(&mut buf);
        assert_eq!(m[0].as_ref().unwrap()["execute"], "c");
        let mut bad = b"{\"execute\": }".to_vec();
        let m = take_messages(&mut bad);
        assert!(m[0].as_ref().unwrap_err().starts_with("JSON parse error"));
        assert!(bad.is_empty());
        // The rest of a broken message is skipped up to the next one.
        let mut tail = b"xx\"}{\"execute\": \"d\"}".to_vec();
        let m = take_messages(&mut tail);
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m[0].is_err());
        assert_eq!(m[1].as_ref().unwrap()["execute"], "d");
    }
}
