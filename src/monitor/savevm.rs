//! The monitor's `savevm [-l] [TAG]` and `info savevm`: both forms of savevm record their
//! figures for `info savevm` (status, bytes, total time, the guest's pause).

use std::time::Instant;

use crate::snapshot::live::{self, LiveOptions};
use crate::snapshot::save_info::{self, SaveInfo, SaveStatus};
use crate::snapshot::{self, ProgressFn, SaveOptions};

use super::Cx;

/// QEMU's message for a savevm while a migration runs (`QERR_MIGRATION_ACTIVE`).
pub const MIGRATION_ACTIVE: &str = "There's a migration process in progress";

/// Runs `savevm [-l] [TAG]`; `live` for `-l`. The reply is empty on success.
pub fn savevm(
    cx: Cx<'_>,
    tag: Option<&str>,
    live: bool,
    progress: ProgressFn<'_>,
) -> Result<String, String> {
    let lz4 = cx.mig.capabilities().lz4();
    if live {
        if cx.mig.is_active() {
            return Err(MIGRATION_ACTIVE.to_string());
        }
        let opts = LiveOptions {
            lz4,
            ..LiveOptions::default()
        };
        return live::savevm_live(cx.vm, tag, &opts, progress, &mut save_info::publish)
            .map(|_| String::new())
            .map_err(|e| format!("Error: {e}"));
    }
    plain(cx, tag, &SaveOptions { lz4 }, progress).map_err(|e| format!("Error: {e}"))
}

/// Plain (stop-the-world) savevm, its figures recorded: the guest's pause is the whole save
/// when it was running.
fn plain(
    cx: Cx<'_>,
    tag: Option<&str>,
    opts: &SaveOptions,
    progress: ProgressFn<'_>,
) -> snapshot::Result<String> {
    let start = Instant::now();
    let was_running = cx.vm.status() == crate::vmm::VmStatus::Running;
    let mut info = SaveInfo::setup(tag.unwrap_or(""), false);
    save_info::publish(&info);
    let r = snapshot::savevm_with_options(cx.vm, tag, opts, progress);
    let elapsed = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    info.total_time_ms = elapsed;
    match &r {
        Ok(s) => {
            info.status = SaveStatus::Completed;
            info.tag.clone_from(&s.name);
            info.bytes = s.vm_state_size;
            info.downtime_ms = Some(if was_running { elapsed } else { 0 });
        }
        Err(e) => {
            info.status = SaveStatus::Failed;
            info.error = Some(e.to_string());
        }
    }
    save_info::publish(&info);
    r.map(|_| String::new())
}

/// `info savevm`.
pub fn info_savevm() -> String {
    save_info::info_savevm()
}
