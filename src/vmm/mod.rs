//! A small KVM virtual machine monitor. The only module where `unsafe` is allowed.
