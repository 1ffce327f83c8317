//! QEMU's migration stream: the codec shared by savevm, loadvm, migration and the inspector.
#![deny(unsafe_code)]
