//! `query-block` and `query-named-block-nodes`: every drive as one node (vmsnap has no graph
//! of protocol and format nodes), named by `--drive …,node-name=NAME` or `drive<i>`, with
//! QEMU 7.2's `BlockDeviceInfo`/`ImageInfo` members that vmsnap knows and the snapshots as
//! QEMU's `SnapshotInfo`.

use serde_json::{json, Value};

use crate::monitor::{node_name, Cx};

/// `BlockDeviceInfo` of every drive, in `--drive` order.
fn nodes(cx: Cx<'_>) -> Vec<Value> {
    let opened = cx.mig.drives();
    cx.vm.with_block_set(|set| {
        set.devices
            .iter_mut()
            .enumerate()
            .map(|(i, d)| {
                let file = opened
                    .get(i)
                    .map(|o| o.path.display().to_string())
                    .unwrap_or_default();
                let format = d.driver.format().name();
                let size = d.driver.size();
                let ro = d.driver.is_read_only();
                let snapshots: Vec<Value> = d
                    .driver
                    .snapshots()
                    .map(|s| s.snapshot_list())
                    .unwrap_or_default()
                    .iter()
                    .map(|s| {
                        let mut v = json!({
                            "id": s.id,
                            "name": s.name,
                            "vm-state-size": s.vm_state_size,
                            "date-sec": s.date_sec,
                            "date-nsec": s.date_nsec,
                            "vm-clock-sec": s.vm_clock_nsec / 1_000_000_000,
                            "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
                        });
                        if let Some(ic) = s.icount {
                            v["icount"] = json!(ic);
                        }
                        v
                    })
                    .collect();
                let mut image = json!({
                    "virtual-size": size,
                    "filename": file,
                    "format": format,
                    "dirty-flag": false,
                });
                if !snapshots.is_empty() {
                    image["snapshots"] = Value::Array(snapshots);
                }
                json!({
                    "iops_rd": 0, "detect_zeroes": "off", "image": image, "iops_wr": 0,
                    "ro": ro, "node-name": node_name(cx.nodes, i), "backing_file_depth": 0,
                    "drv": format, "iops": 0, "bps_wr": 0, "write_threshold": 0,
                    "encrypted": false, "bps": 0, "bps_rd": 0,
                    "cache": {"no-flush": false, "direct": false, "writeback": true},
                    "file": file,
                })
            })
            .collect()
    })
}

/// `query-named-block-nodes`.
pub fn named_nodes(cx: Cx<'_>) -> Value {
    Value::Array(nodes(cx))
}

/// `query-block`: one `BlockInfo` per drive, its node as `inserted`.
pub fn query_block(cx: Cx<'_>) -> Value {
    let list = nodes(cx)
        .into_iter()
        .enumerate()
        .map(|(i, node)| {
            json!({
                "io-status": "ok",
                "device": crate::vmm::drive_name(i),
                "locked": false,
                "removable": false,
                "inserted": node,
                "type": "unknown",
            })
        })
        .collect();
    Value::Array(list)
}
