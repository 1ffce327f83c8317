//! QMP's migration commands over [`crate::migrate::Migrator`], QEMU 7.2's shapes:
//! `migrate` (with `resume`), `migrate-recover`, `migrate_cancel`, `query-migrate`, `migrate-set-capabilities`,
//! `query-migrate-capabilities`, `migrate-set-parameters`, `query-migrate-parameters`.

use serde_json::{json, Map, Value};

use super::args::Args;
use super::{QmpError, Reply};
use crate::migrate::params::{EXTRA_CAPABILITIES, QEMU_CAPABILITIES};
use crate::migrate::{self, MigrationInfo, Status};
use crate::monitor::Cx;

/// The integer parameters vmsnap uses, by QMP name.
const INT_PARAMETERS: &[&str] = &[
    "max-bandwidth",
    "downtime-limit",
    "throttle-trigger-threshold",
    "cpu-throttle-initial",
    "cpu-throttle-increment",
    "max-cpu-throttle",
];

fn generic(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(e.to_string())
}

/// `query-migrate`'s `MigrationInfo`: `{}` before any migration.
pub fn info_json(info: &MigrationInfo) -> Value {
    if info.status == Status::None {
        return json!({});
    }
    let mut v = json!({"status": info.status.name()});
    if let Status::Failed(why) = &info.status {
        v["error-desc"] = json!(why);
    }
    if !info.destination {
        v["total-time"] = json!(info.total_time_ms);
    }
    if let Some(d) = info.expected_downtime_ms {
        v["expected-downtime"] = json!(d);
    }
    if let Some(d) = info.downtime_ms {
        v["downtime"] = json!(d);
    }
    if let Some(d) = info.setup_ms {
        v["setup-time"] = json!(d);
    }
    if let Some(p) = info.cpu_throttle_percentage {
        v["cpu-throttle-percentage"] = json!(p);
    }
    if !info.socket_addresses.is_empty() {
        let a: Vec<Value> = info
            .socket_addresses
            .iter()
            .map(|s| json!({"type": "unix", "path": s}))
            .collect();
        v["socket-address"] = Value::Array(a);
    }
    if let Some(r) = &info.ram {
        v["ram"] = json!({
            "transferred": r.transferred, "remaining": r.remaining, "total": r.total,
            "duplicate": r.duplicate, "skipped": 0, "normal": r.normal,
            "normal-bytes": r.normal * r.page_size, "dirty-sync-count": r.dirty_sync_count,
            "page-size": r.page_size, "mbps": r.mbps, "pages-per-second": r.pages_per_second,
            "dirty-pages-rate": r.dirty_pages_rate, "precopy-bytes": r.precopy_bytes,
            "downtime-bytes": r.downtime_bytes, "postcopy-bytes": r.postcopy_bytes,
            "multifd-bytes": 0, "postcopy-requests": r.postcopy_requests,
        });
    }
    if let Some(d) = &info.disk {
        // QEMU fills the disk stats' transferred, remaining and total (block migration).
        v["disk"] =
            json!({"transferred": d.transferred, "remaining": d.remaining, "total": d.total});
    }
    v
}

fn set_capabilities(cx: Cx<'_>, a: &Args<'_>) -> Result<(), QmpError> {
    let caps = a.list("capabilities")?;
    a.finish()?;
    let mut parsed = Vec::with_capacity(caps.len());
    for c in caps {
        let (Some(name), Some(state)) = (
            c.get("capability").and_then(Value::as_str),
            c.get("state").and_then(Value::as_bool),
        ) else {
            return Err(QmpError::generic(
                "Invalid parameter type for 'capabilities[]', expected: object",
            ));
        };
        if !QEMU_CAPABILITIES.contains(&name) && !EXTRA_CAPABILITIES.contains(&name) {
            return Err(QmpError::generic(format!(
                "Parameter 'capability' does not accept value '{name}'"
            )));
        }
        parsed.push((name, state));
    }
    if cx.mig.is_active() {
        return Err(generic(migrate::CommandError::Busy));
    }
    for (name, state) in parsed {
        cx.mig
            .set_capability(name, if state { "on" } else { "off" })
            .map_err(generic)?;
    }
    Ok(())
}

fn set_parameters(cx: Cx<'_>, map: &Map<String, Value>) -> Result<(), QmpError> {
    let mut values = Vec::with_capacity(map.len());
    for (k, v) in map {
        if !INT_PARAMETERS.contains(&k.as_str()) {
            return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
        }
        let n = v.as_u64().ok_or_else(|| {
            QmpError::generic(format!(
                "Invalid parameter type for '{k}', expected: integer"
            ))
        })?;
        // HMP reads a bare max-bandwidth in MiB/s; QMP gives bytes per second.
        let text = if k == "max-bandwidth" {
            format!("{n}B")
        } else {
            n.to_string()
        };
        values.push((k.as_str(), text));
    }
    for (k, text) in values {
        cx.mig.set_parameter(k, &text).map_err(generic)?;
    }
    Ok(())
}

fn parameters_json(cx: Cx<'_>) -> Value {
    let p = cx.mig.parameters();
    json!({
        "max-bandwidth": p.max_bandwidth,
        "downtime-limit": p.downtime_limit_ms,
        "throttle-trigger-threshold": p.throttle_trigger_threshold,
        "cpu-throttle-initial": p.cpu_throttle_initial,
        "cpu-throttle-increment": p.cpu_throttle_increment,
        "max-cpu-throttle": p.max_cpu_throttle,
        "cpu-throttle-tailslow": false,
    })
}

/// Migration commands, or CommandNotFound for any other name.
pub fn dispatch(cx: Cx<'_>, name: &str, a: &Args<'_>) -> Result<Reply, QmpError> {
    let ok = Ok(Reply::Value(json!({})));
    match name {
        "migrate" => {
            let uri = a.str("uri")?;
            let blk = a.opt_bool("blk")? == Some(true);
            let resume = a.opt_bool("resume")? == Some(true);
            let _detach = a.opt_bool("detach")?;
            if a.opt_bool("inc")? == Some(true) {
                return Err(QmpError::generic("vmsnap: migrate 'inc' is not supported"));
            }
            a.finish()?;
            if cx.vm.pause_reason() == Some("inmigrate") {
                return Err(QmpError::generic(
                    "Guest is waiting for an incoming migration",
                ));
            }
            if resume {
                if blk {
                    return Err(QmpError::generic(
                        "vmsnap: migrate 'resume' cannot be combined with 'blk'",
                    ));
                }
                cx.mig.start_resume(uri).map_err(generic)?;
                super::note_migration(cx, Status::PostcopyRecover.name());
                return ok;
            }
            crate::snapshot::lazy::settle(cx.vm).map_err(generic)?;
            cx.mig.start_with(uri, blk).map_err(generic)?;
            super::note_migration(cx, Status::Setup.name());
            ok
        }
        "migrate-recover" => {
            let uri = a.str("uri")?;
            a.finish()?;
            cx.mig.recover(uri).map_err(generic)?;
            ok
        }
        "migrate-start-postcopy" => {
            a.finish()?;
            cx.mig.start_postcopy().map_err(generic)?;
            ok
        }
        "migrate_cancel" => {
            a.finish()?;
            cx.mig.cancel();
            ok
        }
        "query-migrate" => {
            a.finish()?;
            Ok(Reply::Value(info_json(&cx.mig.info())))
        }
        "migrate-set-capabilities" => {
            set_capabilities(cx, a)?;
            ok
        }
        "query-migrate-capabilities" => {
            a.finish()?;
            let caps = cx.mig.capabilities();
            let list: Vec<Value> = QEMU_CAPABILITIES
                .iter()
                .chain(EXTRA_CAPABILITIES)
                .map(|c| json!({"state": caps.is_on(c), "capability": c}))
                .collect();
            Ok(Reply::Value(Value::Array(list)))
        }
        "migrate-set-parameters" => {
            set_parameters(cx, a.all())?;
            ok
        }
        "query-migrate-parameters" => {
            a.finish()?;
            Ok(Reply::Value(parameters_json(cx)))
        }
        _ => Err(QmpError::not_found(name)),
    }
}
