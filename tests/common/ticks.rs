//! The counter guest's `tick N` lines, and the rule for a guest that moved between two VMMs.
//!
//! N is the guest's tick counter, which the timer interrupt increments. The user loop handles
//! the ticks one by one (two interrupts within one round give two rounds), so the printed ticks
//! count on by exactly one whatever the host's load or a throttle does to the vCPU. A repeat, a
//! step back or a jump means lost or stale guest memory.

/// Ticks of the complete lines of `text` (a line cut by a stop is left out).
pub fn ticks_of(text: &str) -> Vec<u64> {
    let complete = text.rfind('\n').map_or("", |i| &text[..i]);
    complete
        .lines()
        .filter_map(|l| l.strip_prefix("tick "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// Asserts that the ticks of `text` count on by one.
pub fn assert_counts_on(what: &str, text: &str) {
    let ticks = ticks_of(text);
    for w in ticks.windows(2) {
        assert!(
            w[1] == w[0] + 1,
            "{what}: ticks go from {} to {}:\n{}",
            w[0],
            w[1],
            tail(text)
        );
    }
}

/// The source's serial output followed by the destination's must count on by one (a tick line
/// cut by the stop is completed by the destination), and the destination must print at least
/// one tick. Returns the source's last and the destination's first tick.
pub fn assert_continues(src: &str, dst: &str) -> (u64, u64) {
    let last_src = *ticks_of(src).last().expect("no tick on the source");
    let first_dst = *ticks_of(dst).first().expect("no tick on the destination");
    assert_counts_on("source", src);
    assert_counts_on("destination", dst);
    // The seam: the source's cut line completed by the destination must fit the count too.
    assert_counts_on("source then destination", &format!("{src}{dst}"));
    let cut = !src.is_empty() && !src.ends_with('\n');
    let want = last_src + 1 + u64::from(cut);
    assert!(
        first_dst == want,
        "destination must continue the count: source's last tick {last_src}, destination's \
         first {first_dst}\nSOURCE:\n{}\nDESTINATION:\n{}",
        tail(src),
        tail(dst)
    );
    (last_src, first_dst)
}

fn tail(text: &str) -> &str {
    let mut start = text.len().saturating_sub(300);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// The counter guest's disk record `{magic, N, !N}` in sector 1 of snapshot `tag` of `image`
/// (read with `qemu-img convert` into `dir`): its N, or `None` when the sector holds none.
pub fn snapshot_disk_record(
    dir: &std::path::Path,
    image: &std::path::Path,
    tag: &str,
) -> Option<u64> {
    const REC_MAGIC: u64 = 0x524e_5443_4b43_4954;
    let raw = dir.join(format!("{tag}.raw"));
    let out = std::process::Command::new("qemu-img")
        .args([
            "convert",
            "-l",
            &format!("snapshot.name={tag}"),
            "-O",
            "raw",
        ])
        .args([image, &raw])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let data = std::fs::read(&raw).unwrap();
    let w = |i: usize| u64::from_le_bytes(data[512 + i * 8..520 + i * 8].try_into().unwrap());
    (w(0) == REC_MAGIC && w(2) == !w(1)).then(|| w(1))
}

/// Asserts that a snapshot's disk record and its RAM are one instant: the record on disk is
/// the one the guest noted last (`disk_n`, 0 for none), or tick `last`'s when the guest was
/// stopped between that write's completion and noting it (it writes at ticks divisible by 4,
/// then stores `disk_n`; resumed, its next instruction notes it).
pub fn assert_one_instant(on_disk: Option<u64>, last: u64, disk_n: u64) {
    let noted = (disk_n > 0).then_some(disk_n);
    let unnoted = (last % 4 == 0 && last > disk_n).then_some(last);
    assert!(
        on_disk == noted || (unnoted.is_some() && on_disk == unnoted),
        "disk record {on_disk:?}, guest's disk_n {disk_n}, last tick {last}"
    );
}
