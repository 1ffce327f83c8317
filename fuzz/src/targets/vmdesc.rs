//! `vmdesc`: the VM description JSON at the end of a stream (QEMU's `vmdesc`), parsed into
//! device descriptions, and printed back as QEMU and analyze-migration.py print it.

use vmsnap::migration::vmdesc::{to_python_json, to_qemu_json, VmDesc};

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    if let Ok(d) = VmDesc::parse(data) {
        let _ = to_python_json(&d.json);
        let _ = to_qemu_json(&d.json);
        for dev in &d.devices {
            let _ = d.device(&dev.name, dev.instance_id);
        }
    }
}
