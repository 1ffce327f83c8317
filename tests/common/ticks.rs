//! The counter guest's `tick N` lines, and the rule for a guest that moved between two VMMs.
//!
//! N is the guest's tick counter, which the timer interrupt increments; the user loop prints
//! it once per round. A guest that runs freely prints every N; a heavily throttled vCPU gets
//! its pending interrupt as soon as it runs again and may take two within one round, which
//! shows as a step of 2, on the source while throttled and on the destination's first round.
//! A repeat, a step back or a longer jump means lost or stale guest memory.

/// Ticks of the complete lines of `text` (a line cut by a stop is left out).
pub fn ticks_of(text: &str) -> Vec<u64> {
    let complete = text.rfind('\n').map_or("", |i| &text[..i]);
    complete
        .lines()
        .filter_map(|l| l.strip_prefix("tick "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// How far apart two consecutive ticks may be.
#[derive(Clone, Copy, Debug)]
pub enum Steps {
    /// A freely running guest: every tick is printed.
    Every,
    /// A throttled guest: two ticks may fall into one round of its loop.
    Throttled,
}

impl Steps {
    fn max(self) -> u64 {
        match self {
            Steps::Every => 1,
            Steps::Throttled => 2,
        }
    }
}

/// Asserts that the ticks of `text` count on by at most `steps`.
pub fn assert_counts_on(what: &str, text: &str, steps: Steps) {
    let ticks = ticks_of(text);
    for w in ticks.windows(2) {
        assert!(
            w[1] > w[0] && w[1] - w[0] <= steps.max(),
            "{what}: ticks go from {} to {}:\n{}",
            w[0],
            w[1],
            tail(text)
        );
    }
}

/// The source's serial output followed by the destination's must count on (a tick line cut
/// by the stop is completed by the destination, which is one more step), and the destination
/// must print at least one tick. Returns the source's last and the destination's first tick.
pub fn assert_continues(src: &str, dst: &str, steps: Steps) -> (u64, u64) {
    let last_src = *ticks_of(src).last().expect("no tick on the source");
    let first_dst = *ticks_of(dst).first().expect("no tick on the destination");
    assert_counts_on("source", src, steps);
    assert_counts_on("destination", dst, steps);
    // The seam: the source's cut line completed by the destination must fit the count too.
    assert_counts_on("source then destination", &format!("{src}{dst}"), steps);
    let cut = !src.is_empty() && !src.ends_with('\n');
    let most = last_src + steps.max() + u64::from(cut);
    assert!(
        first_dst > last_src && first_dst <= most,
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
