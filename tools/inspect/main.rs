//! vmsnap-inspect: decode QEMU migration streams and snapshot VM state.

fn main() {}
