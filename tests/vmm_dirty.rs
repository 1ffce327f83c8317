//! The counter guest's memory dirtying and vCPU throttling under KVM: the guest dirties the
//! pages it is told to, at about the rate asked for, and a throttled vCPU handles fewer ticks
//! and dirties less, while pause, resume and exit keep working.
mod common;

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmsnap::vmm::devices::{SerialCapture, SerialOut};
use vmsnap::vmm::guest::counter;
use vmsnap::vmm::{Guest, Vm, VmConfig};

const MEM: u64 = 64 << 20;

fn vm_dirtying(mib_per_s: u64, cap: &SerialCapture) -> (Vm, counter::DirtyParams) {
    let vm = Vm::new(VmConfig {
        mem_size: MEM,
        vcpus: 1,
        drives: Vec::new(),
        serial: SerialOut::Capture(cap.clone()),
        guest: Guest::Counter,
    })
    .unwrap();
    let params = counter::set_dirty_rate(vm.guest_memory(), mib_per_s)
        .unwrap()
        .unwrap();
    (vm, params)
}

fn word(vm: &Vm, addr: u64) -> u64 {
    vm.guest_memory().read_obj(GuestAddress(addr)).unwrap()
}

/// (handled ticks, dirtied pages) over `d` of running.
fn progress_over(vm: &Vm, d: Duration) -> (u64, u64) {
    let (t0, p0) = (
        word(vm, counter::LAST_ADDR),
        word(vm, counter::DIRTY_TOTAL_ADDR),
    );
    std::thread::sleep(d);
    (
        word(vm, counter::LAST_ADDR) - t0,
        word(vm, counter::DIRTY_TOTAL_ADDR) - p0,
    )
}

#[test]
fn guest_dirties_pages_at_the_rate_asked_for_and_checks_ok() {
    if !common::kvm(module_path!()) {
        return;
    }
    let cap = SerialCapture::default();
    let (vm, params) = vm_dirtying(40, &cap);
    assert_eq!(params.pages_per_tick, 103); // 40 MiB/s = 10240 pages/s, 102.4 per tick
    vm.start();
    std::thread::sleep(Duration::from_millis(300));
    let (ticks, pages) = progress_over(&vm, Duration::from_secs(1));
    assert!(ticks > 0, "guest does not tick: {}", cap.text());
    // One batch per handled tick (a round may be under way at either end of the window).
    assert_eq!(pages % params.pages_per_tick, 0);
    assert!(
        pages <= (ticks + 1) * params.pages_per_tick,
        "{pages} pages, {ticks} ticks"
    );
    // Near 100 Hz on an idle host; generous for a busy 2-core machine.
    assert!(pages > 10240 / 4, "only {pages} pages dirtied in 1 s");
    vm.request_check();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cap.text().contains("CHECK OK") {
        assert!(Instant::now() < deadline, "no CHECK OK: {}", cap.text());
        std::thread::sleep(Duration::from_millis(20));
    }
    vm.pause().unwrap();
    assert!(!cap.text().contains("CHECK FAIL"), "{}", cap.text());
    // Every page the guest passed holds a tick number; pages beyond the cursor's first lap
    // are untouched (zero) unless it wrapped.
    let total = word(&vm, counter::DIRTY_TOTAL_ADDR);
    let area_pages = (params.end - params.start) / 0x1000;
    let last = word(&vm, counter::LAST_ADDR);
    let first = vm
        .guest_memory()
        .read_obj::<u64>(GuestAddress(params.start));
    assert!(matches!(first, Ok(n) if n >= 1 && n <= last));
    if total < area_pages {
        // The count is added before a tick's batch, the cursor stored after it: a pause can
        // fall in between.
        let cursor = word(&vm, counter::DIRTY_CURSOR_ADDR);
        let end = params.start + total * 0x1000;
        assert!(
            cursor == end || cursor + params.pages_per_tick * 0x1000 == end,
            "cursor {cursor:#x}, pages counted up to {end:#x}"
        );
        let read = |a: u64| vm.guest_memory().read_obj::<u64>(GuestAddress(a)).unwrap();
        if cursor > params.start {
            let before = read(cursor - 0x1000);
            assert!(before >= 1 && before <= last);
        }
        assert_eq!(read(end), 0, "page beyond the counted ones was written");
    }
    assert_eq!(word(&vm, counter::CHECK_FAILS_ADDR), 0);
}

#[test]
fn throttling_slows_the_guest_and_pause_resume_still_work() {
    if !common::kvm(module_path!()) {
        return;
    }
    let cap = SerialCapture::default();
    let (vm, params) = vm_dirtying(20, &cap);
    vm.start();
    std::thread::sleep(Duration::from_millis(300));
    let (free_ticks, free_pages) = progress_over(&vm, Duration::from_secs(1));
    assert!(free_ticks > 20, "guest too slow to measure: {free_ticks}");
    assert_eq!(free_pages % params.pages_per_tick, 0);
    assert!(free_pages <= (free_ticks + 1) * params.pages_per_tick);

    vm.set_throttle(90);
    std::thread::sleep(Duration::from_millis(200));
    let (slow_ticks, slow_pages) = progress_over(&vm, Duration::from_secs(1));
    eprintln!("ticks per second: {free_ticks} unthrottled, {slow_ticks} at 90 %");
    // Run 10 ms, sleep 90 ms: at most ~2 ticks per 100 ms cycle instead of 10.
    assert!(
        slow_ticks * 2 < free_ticks,
        "throttled {slow_ticks} vs free {free_ticks}"
    );
    assert!(
        slow_ticks > 0,
        "a 90 % throttle must still let the guest run"
    );
    assert!(slow_pages * 2 < free_pages);

    // Pause is prompt even at 99 % (the sleep is 990 ms), and so is resume.
    vm.set_throttle(99);
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    vm.pause().unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "pause took {:?}",
        t.elapsed()
    );
    let parked = word(&vm, counter::LAST_ADDR);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(word(&vm, counter::LAST_ADDR), parked, "paused guest ran");
    vm.resume();

    vm.set_throttle(0);
    std::thread::sleep(Duration::from_millis(200));
    let (back_ticks, _) = progress_over(&vm, Duration::from_secs(1));
    assert!(
        back_ticks * 2 > free_ticks,
        "unthrottled again: {back_ticks} vs {free_ticks}"
    );
    vm.request_check();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cap.text().contains("CHECK OK") {
        assert!(Instant::now() < deadline, "no CHECK OK: {}", cap.text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!cap.text().contains("CHECK FAIL"));
    let mut vm = vm;
    let t = Instant::now();
    vm.set_throttle(99);
    std::thread::sleep(Duration::from_millis(50));
    vm.shutdown();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "exit took {:?}",
        t.elapsed()
    );
}

/// The benchmark's QEMU guest (tools/bench/guest/dirty.elf) is what its build script makes
/// from the committed source.
#[test]
fn bench_guest_binary_matches_its_source() {
    let Some(built) = common::rebuild("tools/bench/guest/build.sh") else {
        return;
    };
    let root = env!("CARGO_MANIFEST_DIR");
    let committed = std::fs::read(format!("{root}/tools/bench/guest/dirty.elf")).unwrap();
    assert!(
        built == committed,
        "tools/bench/guest/dirty.elf is stale: run tools/bench/guest/build.sh"
    );
    // A multiboot header (magic 0x1badb002) within the first 8 KiB, as QEMU's -kernel needs.
    let magic = 0x1bad_b002u32.to_le_bytes();
    assert!(committed[..committed.len().min(8192)]
        .windows(4)
        .any(|w| w == magic));
}

#[test]
fn run_refuses_a_dirty_rate_without_ram_to_dirty() {
    if !common::kvm(module_path!()) {
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmsnap"))
        .args(["run", "-m", "2M", "--dirty-rate", "10", "--serial", "none"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("guest needs at least 0x201000 bytes of RAM, the VM has 0x200000"),
        "{err}"
    );
}
