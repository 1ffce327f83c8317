//! QMP commands by name, each answering with QEMU 7.2's return shape and errors.

use serde_json::{json, Value};

use super::args::Args;
use super::{block_info, migrate_cmds, QmpCx, QmpError, Reply};
use crate::migrate::fd_registry::{self, FdError};
use crate::monitor::snapshot_jobs::{self, Kind, Target};
use crate::monitor::{events, hmp, incoming, jobs, Outcome};
use crate::snapshot::lazy::LoadMode;
use crate::vmm::VmStatus;

/// QEMU's version whose QMP shapes vmsnap follows.
pub const QEMU_VERSION: (u32, u32, u32) = (7, 2, 0);

/// Every command vmsnap answers (`query-commands`).
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "query-status",
    "stop",
    "cont",
    "quit",
    "human-monitor-command",
    "query-block",
    "query-named-block-nodes",
    "snapshot-save",
    "snapshot-load",
    "snapshot-delete",
    "x-vmsnap-snapshot-save-live",
    "x-vmsnap-snapshot-load",
    "query-jobs",
    "job-dismiss",
    "job-cancel",
    "migrate",
    "migrate_cancel",
    "migrate-start-postcopy",
    "migrate-recover",
    "query-migrate",
    "migrate-set-capabilities",
    "query-migrate-capabilities",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "migrate-incoming",
    "getfd",
    "closefd",
    "calc-dirty-rate",
    "query-dirty-rate",
];

/// `query-version`'s value (also the greeting's `version`).
pub fn version() -> Value {
    let (major, minor, micro) = QEMU_VERSION;
    json!({
        "qemu": {"micro": micro, "minor": minor, "major": major},
        "package": format!("vmsnap {}", env!("CARGO_PKG_VERSION")),
    })
}

/// QEMU's `RunState` name of the VM.
pub fn run_state(q: &QmpCx<'_>) -> &'static str {
    match q.cx.vm.status() {
        VmStatus::Running => "running",
        VmStatus::Paused => q.cx.vm.pause_reason().unwrap_or("paused"),
        VmStatus::Failed(_) => "internal-error",
    }
}

/// Runs an HMP line; its reply text, with QEMU's `\r\n` line ends.
fn hmp_line(q: &QmpCx<'_>, line: &str) -> Result<String, Reply> {
    let out = match hmp::execute(q.cx, line) {
        Outcome::Continue(r) => r,
        Outcome::Quit(_) => return Err(Reply::Quit),
    };
    events::sync_run_state(q.cx.vm);
    if out.is_empty() {
        return Ok(String::new());
    }
    Ok(format!("{}\r\n", out.replace('\n', "\r\n")))
}

/// `stop`/`cont` through the HMP core: any reply text is an error.
fn run_control(q: &QmpCx<'_>, line: &str) -> Result<Reply, QmpError> {
    match hmp_line(q, line) {
        Ok(r) if r.is_empty() => Ok(Reply::Value(json!({}))),
        Ok(r) => Err(QmpError::generic(
            r.trim_end().trim_start_matches("Error: ").to_string(),
        )),
        Err(quit) => Ok(quit),
    }
}

/// vmsnap's own options of a snapshot job (the `x-vmsnap-` commands).
#[derive(Debug, Clone, Copy, Default)]
struct Extra {
    live: bool,
    mode_arg: bool,
}

fn snapshot_job(q: &QmpCx<'_>, a: &Args<'_>, kind: Kind) -> Result<Reply, QmpError> {
    snapshot_job_with(q, a, kind, Extra::default())
}

fn snapshot_job_with(
    q: &QmpCx<'_>,
    a: &Args<'_>,
    kind: Kind,
    extra: Extra,
) -> Result<Reply, QmpError> {
    let id = a.str("job-id")?.to_string();
    let tag = a.str("tag")?.to_string();
    let vmstate = match kind {
        Kind::Delete => None,
        _ => Some(a.str("vmstate")?.to_string()),
    };
    let devices = a.str_list("devices")?;
    let mode = match extra.mode_arg {
        true => match a.opt_str("mode")? {
            None | Some("lazy") => LoadMode::Lazy,
            Some("eager") => LoadMode::Eager,
            Some(other) => {
                return Err(QmpError::generic(format!(
                    "Parameter 'mode' does not accept value '{other}'"
                )))
            }
        },
        false => LoadMode::Lazy,
    };
    a.finish()?;
    let name = match kind {
        Kind::Save => "snapshot-save",
        Kind::Load => "snapshot-load",
        Kind::Delete => "snapshot-delete",
    };
    jobs::create(&id, name).map_err(|e| QmpError::generic(e.to_string()))?;
    let cx = q.cx;
    let target = Target {
        tag,
        devices,
        vmstate,
        live: extra.live,
        mode,
    };
    q.run_job(Box::new(move || {
        events::hold(true);
        jobs::run(&id, || snapshot_jobs::work(cx, kind, &target));
        events::hold(false);
    }));
    Ok(Reply::Value(json!({})))
}

/// Runs command `name` with its arguments.
pub fn dispatch(q: &mut QmpCx<'_>, name: &str, a: &Args<'_>) -> Result<Reply, QmpError> {
    let ok = || Ok(Reply::Value(json!({})));
    let job_err = |e: jobs::JobError| QmpError::generic(e.to_string());
    match name {
        "query-version" => {
            a.finish()?;
            Ok(Reply::Value(version()))
        }
        "query-commands" => {
            a.finish()?;
            let list: Vec<Value> = COMMANDS.iter().map(|c| json!({"name": c})).collect();
            Ok(Reply::Value(Value::Array(list)))
        }
        "query-status" => {
            a.finish()?;
            let running = q.cx.vm.status() == VmStatus::Running;
            Ok(Reply::Value(json!({
                "status": run_state(q),
                "singlestep": false,
                "running": running,
            })))
        }
        "stop" => {
            a.finish()?;
            let r = run_control(q, "stop")?;
            // QEMU's stop turns a failed load's restore-vm state into plain paused.
            if q.cx.vm.pause_reason() == Some("restore-vm") {
                q.cx.vm.set_pause_reason(None);
            }
            Ok(r)
        }
        "cont" => {
            a.finish()?;
            run_control(q, "cont")
        }
        "quit" => {
            a.finish()?;
            Ok(Reply::Quit)
        }
        "human-monitor-command" => {
            let line = a.str("command-line")?;
            let _cpu = a.opt_any("cpu-index");
            a.finish()?;
            match hmp_line(q, line) {
                Ok(r) => Ok(Reply::Value(json!(r))),
                Err(quit) => Ok(quit),
            }
        }
        "query-block" => {
            a.finish()?;
            Ok(Reply::Value(block_info::query_block(q.cx)))
        }
        "query-named-block-nodes" => {
            let _flat = a.opt_bool("flat")?;
            a.finish()?;
            Ok(Reply::Value(block_info::named_nodes(q.cx)))
        }
        "snapshot-save" => snapshot_job(q, a, Kind::Save),
        "snapshot-load" => snapshot_job(q, a, Kind::Load),
        "snapshot-delete" => snapshot_job(q, a, Kind::Delete),
        "x-vmsnap-snapshot-save-live" => snapshot_job_with(
            q,
            a,
            Kind::Save,
            Extra {
                live: true,
                ..Extra::default()
            },
        ),
        "x-vmsnap-snapshot-load" => snapshot_job_with(
            q,
            a,
            Kind::Load,
            Extra {
                mode_arg: true,
                ..Extra::default()
            },
        ),
        "query-jobs" => {
            a.finish()?;
            Ok(Reply::Value(jobs::query()))
        }
        "job-dismiss" => {
            let id = a.str("id")?;
            a.finish()?;
            jobs::dismiss(id).map_err(job_err)?;
            ok()
        }
        "job-cancel" => {
            let id = a.str("id")?;
            let _force = a.opt_bool("force")?;
            a.finish()?;
            jobs::cancel(id).map_err(job_err)?;
            ok()
        }
        "migrate-incoming" => {
            let uri = a.str("uri")?;
            a.finish()?;
            let listener = incoming::start_deferred(q.cx, uri).map_err(QmpError::generic)?;
            let cx = q.cx;
            q.run_job(Box::new(move || incoming::receive(cx, listener)));
            ok()
        }
        "getfd" => {
            let fdname = a.str("fdname")?;
            a.finish()?;
            let fd = q
                .received
                .pop()
                .ok_or_else(|| QmpError::generic(FdError::NoneSupplied.to_string()))?;
            fd_registry::insert(fdname, fd).map_err(|e| QmpError::generic(e.to_string()))?;
            ok()
        }
        "closefd" => {
            let fdname = a.str("fdname")?;
            a.finish()?;
            fd_registry::closefd(fdname).map_err(|e| QmpError::generic(e.to_string()))?;
            ok()
        }
        _ => match crate::monitor::dirty_rate_cmds::qmp(q.cx, name, a) {
            Some(r) => r.map(Reply::Value),
            None => migrate_cmds::dispatch(q.cx, name, a),
        },
    }
}
