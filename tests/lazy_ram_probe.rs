//! Probe: does userfaultfd missing-page handling catch every access to guest RAM on this
//! host — the guest's user-mode code (run natively), its kernel code (emulated by KVM under
//! kvm_pvm, which reads guest memory with copy_from_user) and KVM's get_user_pages when it
//! maps guest pages? The counter guest's RAM is dropped and served from a copy by the page
//! server while the background fill is held back; the guest must tick on, pass its RAM
//! check, and the fill must then complete.
mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryRegion};
use vmsnap::block::{open_image, BlockDriver, OpenOptions};
use vmsnap::vmm::devices::{SerialCapture, SerialOut};
use vmsnap::vmm::guest::counter;
use vmsnap::vmm::page_server::{LoadState, PageSink, PageSource, PageSourceError, PAGE};
use vmsnap::vmm::{Guest, Vm, VmConfig, VmStatus};

const MEM: u64 = 16 << 20;
const WAIT: Duration = Duration::from_secs(30);

fn disk(dir: &Path) -> Box<dyn BlockDriver> {
    let path = dir.join("disk0.raw");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    open_image(&path, OpenOptions::default()).unwrap()
}

/// Pages from a copy of RAM; the fill waits until `hold` has passed, so that everything the
/// guest touches before comes through faults.
struct Copy {
    ram: Vec<u8>,
    hold: Duration,
    fetched: AtomicU64,
}

impl PageSource for Copy {
    fn fetch(&self, offset: u64, buf: &mut [u8]) -> Result<bool, PageSourceError> {
        self.fetched.fetch_add(1, Ordering::Relaxed);
        let o = offset as usize;
        buf.copy_from_slice(&self.ram[o..o + PAGE as usize]);
        Ok(true)
    }

    fn fill(&self, sink: &mut PageSink<'_>) -> Result<(), PageSourceError> {
        std::thread::sleep(self.hold);
        for (i, chunk) in self.ram.chunks(64 * PAGE as usize).enumerate() {
            let off = i as u64 * 64 * PAGE;
            let zero = chunk.iter().all(|b| *b == 0);
            let data = if zero { None } else { Some(chunk) };
            if !sink(off, chunk.len() as u64, data) {
                return Ok(());
            }
        }
        Ok(())
    }
}

#[test]
fn faults_from_guest_user_kernel_and_kvm_are_served() {
    if !common::kvm(module_path!()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cap = SerialCapture::new();
    let vm = Vm::new(VmConfig {
        mem_size: MEM,
        vcpus: 1,
        drives: vec![disk(dir.path())],
        serial: SerialOut::Capture(cap.clone()),
        guest: Guest::Counter,
    })
    .unwrap();
    vm.start();
    let pos = cap.wait_for("tick 5\n", 0, WAIT).expect("ticks");
    vm.pause().unwrap();
    let state = vm.save_state().unwrap();
    let mut ram = vec![0u8; MEM as usize];
    vm.guest_memory()
        .read_slice(&mut ram, GuestAddress(0))
        .unwrap();
    let region = vm.guest_memory().iter().next().unwrap();
    assert_eq!(region.len(), MEM);
    let source = Arc::new(Copy {
        ram,
        hold: Duration::from_millis(1500),
        fetched: AtomicU64::new(0),
    });
    let status = vm
        .load_ram_lazily(source.clone(), Instant::now(), "probe")
        .unwrap();
    vm.restore_state(&state).unwrap();
    vm.request_check();
    vm.resume();
    // Within the hold, only faults bring pages in: the guest must still run and check.
    let p = cap.wait_for("CHECK OK\n", pos, WAIT);
    let during = status.report();
    assert!(p.is_some(), "status {:?}: {}", vm.status(), cap.text());
    assert!(source.fetched.load(Ordering::Relaxed) > 0);
    eprintln!(
        "probe: {} pages faulted in before the fill started ({:?})",
        source.fetched.load(Ordering::Relaxed),
        during
    );
    assert_eq!(vm.finish_lazy_ram(), Some(LoadState::Completed));
    let r = vm.ram_load_report().unwrap();
    assert_eq!((r.resident, r.total), (MEM / PAGE, MEM / PAGE));
    let p2 = cap
        .wait_for("tick", p.unwrap(), WAIT)
        .expect("ticks after the fill");
    cap.wait_for("tick", p2, WAIT)
        .expect("ticks after the fill");
    assert_eq!(vm.status(), VmStatus::Running);
    let out = cap.text();
    assert!(!out.contains("CHECK FAIL"), "{out}");
    let n: u64 = vm
        .guest_memory()
        .read_obj(GuestAddress(counter::TICKS_ADDR))
        .unwrap();
    assert!(n > 5);
}
