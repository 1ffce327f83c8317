//! QMP events: one process-wide hub (QEMU's events are global too) that every negotiated QMP
//! client subscribes to. Each event carries QEMU's `timestamp` (`seconds`, `microseconds`
//! since the epoch). `STOP`/`RESUME` are sent on run-state changes only, whoever caused them
//! (a QMP or HMP command, a snapshot job, a migration's final stop).

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::vmm::{Vm, VmStatus};

/// Where a client's events go (its socket, shared with its command replies).
pub type Sink = Arc<Mutex<Box<dyn Write + Send>>>;

#[derive(Default)]
struct Hub {
    clients: Vec<(u64, Sink)>,
    next_id: u64,
    running: Option<bool>,
}

static HUB: Mutex<Option<Hub>> = Mutex::new(None);

fn hub() -> MutexGuard<'static, Option<Hub>> {
    HUB.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes one JSON message and a newline to `sink`, as one write; false if the client is
/// gone.
pub fn send(sink: &Sink, msg: &Value) -> bool {
    let mut line = msg.to_string();
    line.push('\n');
    let mut w = sink.lock().unwrap_or_else(|e| e.into_inner());
    w.write_all(line.as_bytes())
        .and_then(|()| w.flush())
        .is_ok()
}

/// Adds a client; returns its id for [`unsubscribe`].
pub fn subscribe(sink: Sink) -> u64 {
    let mut g = hub();
    let h = g.get_or_insert_with(Hub::default);
    h.next_id += 1;
    let id = h.next_id;
    h.clients.push((id, sink));
    id
}

/// Removes a client.
pub fn unsubscribe(id: u64) {
    if let Some(h) = hub().as_mut() {
        h.clients.retain(|(i, _)| *i != id);
    }
}

/// QEMU's event timestamp.
fn timestamp() -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    json!({"seconds": now.as_secs(), "microseconds": now.subsec_micros()})
}

/// Sends event `name` (with `data`, if any) to every client; clients whose socket fails are
/// dropped.
pub fn emit(name: &str, data: Option<Value>) {
    let mut msg = json!({"event": name});
    if let Some(d) = data {
        msg["data"] = d;
    }
    msg["timestamp"] = timestamp();
    let clients: Vec<(u64, Sink)> = match hub().as_ref() {
        Some(h) => h.clients.clone(),
        None => return,
    };
    for (id, sink) in clients {
        if !send(&sink, &msg) {
            unsubscribe(id);
        }
    }
}

/// Reports the VM's run state: `STOP` when it went from running to stopped, `RESUME` the
/// other way (nothing when unchanged; the first call only records the state).
pub fn note_running(running: bool) {
    let changed = {
        let mut g = hub();
        let h = g.get_or_insert_with(Hub::default);
        let before = h.running.replace(running);
        before.is_some_and(|b| b != running)
    };
    if changed {
        emit(if running { "RESUME" } else { "STOP" }, None);
    }
}

/// [`note_running`] with the VM's current state.
pub fn sync_run_state(vm: &Vm) {
    note_running(vm.status() == VmStatus::Running);
}

static HOLD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// While held (a snapshot job runs and reports its own `STOP`/`RESUME`), [`poll_run_state`]
/// does not report the job's internal pauses.
pub fn hold(on: bool) {
    HOLD.store(on, std::sync::atomic::Ordering::SeqCst);
}

/// [`sync_run_state`] unless [`hold`] is on: for a poller that notices changes nobody
/// reported (a migration's final stop, a vCPU failure).
pub fn poll_run_state(vm: &Vm) {
    if !HOLD.load(std::sync::atomic::Ordering::SeqCst) {
        sync_run_state(vm);
    }
}
