//! Live migration of the counter guest over `fd:` (issue 15): the source gets one end of a
//! socketpair through `getfd` (SCM_RIGHTS on its monitor socket) and migrates with
//! `migrate fd:NAME`; the destination reads a pipe it inherited (`--incoming fd:0`). The
//! test relays socket → pipe. The same run has the xbzrle capability on while the guest
//! re-dirties the first qword of its pages: `info migrate` shows XBZRLE pages, and the
//! destination's ticks continue the source's and its RAM check passes.
mod common;
use common::run_vm::{assert_check, command_with_memory, create_qcow2, kvm_and_qemu_img, RunVm};
use common::ticks::assert_continues;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::info_field as field;

#[test]
fn getfd_errors_are_qemus() {
    if !kvm_and_qemu_img("getfd_errors_are_qemus") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    create_qcow2(&img);
    let drive = format!("file={},format=qcow2", img.display());
    let mut vm = RunVm::start(dir.path(), &[drive], 1, None, 0);
    let (r, _) = vm.cmd("getfd mig");
    assert_eq!(
        r.trim(),
        "Error: No file descriptor supplied via SCM_RIGHTS"
    );
    let (r, _) = vm.cmd("closefd mig");
    assert_eq!(r.trim(), "Error: File descriptor named 'mig' not found");
    let devnull = std::fs::File::open("/dev/null").unwrap();
    let (r, _) = vm.cmd_with_fd("getfd 0mig", devnull.as_fd());
    assert_eq!(
        r.trim(),
        "Error: Parameter 'fdname' expects a name not starting with a digit"
    );
    let (r, _) = vm.cmd_with_fd("getfd mig", devnull.as_fd());
    assert_eq!(r, "");
    assert_eq!(vm.ok("closefd mig"), "");
    // A name nobody passed: the migration fails with QEMU's words, the guest runs on.
    let (r, st) = vm.cmd("migrate fd:nosuch");
    assert!(
        r.contains("File descriptor named 'nosuch' has not been found"),
        "{r}"
    );
    assert_eq!(st, "running");
    vm.quit();
}

#[test]
fn counter_guest_migrates_over_fd_with_xbzrle() {
    if !kvm_and_qemu_img("counter_guest_migrates_over_fd_with_xbzrle") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    create_qcow2(&img);
    let drive = format!("file={},format=qcow2", img.display());
    let mut src = RunVm::start_with(
        dir.path(),
        std::slice::from_ref(&drive),
        1,
        None,
        0,
        &["--memory", "32M", "--dirty-rate", "20"],
    );
    src.wait_past(10);

    // Destination: stdin is the read end of a pipe.
    // Close-on-exec: the destination must not hold the write end (it reads to EOF).
    let (pipe_r, pipe_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let mut cmd = command_with_memory(dir.path(), &[drive], 1, None, 1, "32M");
    cmd.args(["--incoming", "fd:0"]).stdin(Stdio::from(pipe_r));
    let mut dst = RunVm::spawn(cmd, dir.path(), 1);
    assert_eq!(dst.cmd("").1, "paused (inmigrate)");

    // Source: one end of a socketpair through getfd; the test relays the other end into
    // the pipe, and closes both once the source has shut its side down.
    let (ours, theirs) = UnixStream::pair().unwrap();
    let (r, _) = src.cmd_with_fd("getfd mig", theirs.as_fd());
    assert_eq!(r, "");
    drop(theirs);
    let relay = std::thread::spawn(move || {
        let mut ours = ours;
        let mut w = std::fs::File::from(pipe_w);
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            let n = ours.read(&mut buf).unwrap();
            if n == 0 {
                return total;
            }
            w.write_all(&buf[..n]).unwrap();
            total += n as u64;
        }
    });

    // Capped so that pages go out in several rounds and re-dirtied pages hit the cache.
    src.ok("migrate_set_capability xbzrle on");
    src.ok("migrate_set_parameter xbzrle-cache-size 16M");
    src.ok("migrate_set_parameter max-bandwidth 16M");
    let caps = src.ok("info migrate_capabilities");
    assert!(caps.starts_with("xbzrle: on\n"), "{caps}");
    assert_eq!(src.ok("migrate -d fd:mig"), "");
    let start = Instant::now();
    let info = loop {
        let info = src.ok("info migrate");
        if info.contains("xbzrle pages:") && field(&info, "xbzrle pages:") > 0 {
            break info;
        }
        assert!(!info.contains("failed"), "{info}");
        assert!(start.elapsed() < Duration::from_secs(60), "{info}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(info.contains("cache size: 16777216 bytes"), "{info}");
    // Let it converge.
    src.ok("migrate_set_parameter max-bandwidth 10G");
    let info = loop {
        let info = src.ok("info migrate");
        if info.contains("Migration status: completed") {
            break info;
        }
        assert!(!info.contains("failed"), "{info}");
        assert!(start.elapsed() < Duration::from_secs(90), "{info}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let xpages = field(&info, "xbzrle pages:");
    let xbytes = field(&info, "xbzrle transferred:");
    eprintln!(
        "xbzrle pages {xpages}, {xbytes} kbytes; cache miss {}; overflow {}",
        field(&info, "xbzrle cache miss:"),
        field(&info, "xbzrle overflow:")
    );
    assert!(xpages > 0, "{info}");
    let sent = relay.join().unwrap();
    assert!(sent > 0);

    let src_text = src.serial_text();
    let start = Instant::now();
    while dst.cmd("").1 == "paused (inmigrate)" {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            dst.ok("info migrate")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (info, st) = dst.cmd("info migrate");
    assert_eq!(st, "running", "{info}");
    let dst_text = dst.wait_check();
    assert!(dst_text.contains("CHECK OK"), "{dst_text}");
    assert_continues(&src_text, &dst_text);
    assert_eq!(dst.cmd("").1, "running");
    src.quit();
    dst.quit();
    assert_check(&img);
}
