//! auto-converge: the CPU throttle QEMU would put on the guest, computed as QEMU computes it
//! (owner: engine). The helper owns no vCPUs, so the throttle is a request to the parent
//! (the `CPU_THROTTLE` event and `query-migrate`'s `cpu-throttle-percentage`): the share of
//! each vCPU's time the parent should keep it from running. Pure: the source feeds it the
//! dirty count of each bitmap sync and the bytes sent so far.

use std::time::{Duration, Instant};

/// The auto-converge parameters (QEMU's names, defaults and ranges).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ThrottleParams {
    /// `throttle-trigger-threshold`: a period whose dirtied bytes exceed this percentage
    /// of the bytes sent in it counts as "dirtying too fast" (1-100).
    pub trigger_threshold: u8,
    /// `cpu-throttle-initial`: the first throttle (1-99).
    pub initial: u8,
    /// `cpu-throttle-increment`: each later step (1-99).
    pub increment: u8,
    /// `cpu-throttle-tailslow`: late steps only as large as the dirty rate calls for.
    pub tailslow: bool,
    /// `max-cpu-throttle`: the ceiling (`cpu-throttle-initial` to 99).
    pub max: u8,
}

impl Default for ThrottleParams {
    fn default() -> Self {
        ThrottleParams {
            trigger_threshold: 50,
            initial: 20,
            increment: 10,
            tailslow: false,
            max: 99,
        }
    }
}

/// Why a parameter value was refused, in QEMU's words (`QERR_INVALID_PARAMETER_VALUE`).
pub(crate) fn check(p: &ThrottleParams) -> Result<(), String> {
    let bad = |name: &str, range: &str| Err(format!("Parameter '{name}' expects {range}"));
    if !(1..=100).contains(&p.trigger_threshold) {
        return bad(
            "throttle_trigger_threshold",
            "an integer in the range of 1 to 100",
        );
    }
    if !(1..=99).contains(&p.initial) {
        return bad("cpu_throttle_initial", "an integer in the range of 1 to 99");
    }
    if !(1..=99).contains(&p.increment) {
        return bad(
            "cpu_throttle_increment",
            "an integer in the range of 1 to 99",
        );
    }
    if p.max < p.initial || p.max > 99 {
        return bad(
            "max_cpu_throttle",
            "an integer in the range of cpu_throttle_initial to 99",
        );
    }
    Ok(())
}

/// QEMU looks at the dirty rate once a sync ends a period of more than a second.
const PERIOD: Duration = Duration::from_millis(1000);

/// The throttle state of one migration (QEMU's `RAMState` throttle fields and
/// `cpu_throttle_*`).
#[derive(Debug)]
pub(crate) struct AutoConverge {
    /// The throttle in force, percent; 0: none.
    pct: u8,
    /// Periods in a row that dirtied too fast (QEMU's `dirty_rate_high_cnt`).
    high: u8,
    period_start: Instant,
    dirty_pages: u64,
    sent_at_start: u64,
}

impl AutoConverge {
    /// Starts the first period at `now` with `sent` bytes sent so far.
    pub(crate) fn new(now: Instant, sent: u64) -> Self {
        AutoConverge {
            pct: 0,
            high: 0,
            period_start: now,
            dirty_pages: 0,
            sent_at_start: sent,
        }
    }

    /// The throttle in force, percent.
    #[cfg(test)]
    pub(crate) fn percentage(&self) -> u8 {
        self.pct
    }

    /// A bitmap sync at `now` found `dirty_pages` dirty pages of `page_size` bytes, with
    /// `sent` bytes sent in all: returns the new throttle when it changed
    /// (`migration_bitmap_sync` -> `migration_trigger_throttle` -> `mig_throttle_guest_down`).
    /// `p` is read at each sync, so a parameter change applies to a running migration.
    pub(crate) fn sync(
        &mut self,
        p: &ThrottleParams,
        now: Instant,
        dirty_pages: u64,
        page_size: u64,
        sent: u64,
    ) -> Option<u8> {
        self.dirty_pages = self.dirty_pages.saturating_add(dirty_pages);
        if now.saturating_duration_since(self.period_start) <= PERIOD {
            return None;
        }
        let sent_period = sent.saturating_sub(self.sent_at_start);
        let dirty_bytes = self.dirty_pages.saturating_mul(page_size);
        let threshold = sent_period.saturating_mul(p.trigger_threshold as u64) / 100;
        let before = self.pct;
        if dirty_bytes > threshold {
            self.high += 1;
            if self.high >= 2 {
                self.high = 0;
                self.step(p, dirty_bytes, threshold);
            }
        }
        self.period_start = now;
        self.dirty_pages = 0;
        self.sent_at_start = sent;
        (self.pct != before).then_some(self.pct)
    }

    /// QEMU's `mig_throttle_guest_down`.
    fn step(&mut self, p: &ThrottleParams, dirty_bytes: u64, threshold: u64) {
        if self.pct == 0 {
            self.pct = p.initial;
            return;
        }
        let inc = if p.tailslow {
            // The vCPU share that would bring the dirty rate down to the threshold; the
            // step is what separates it from today's share, at most the increment.
            let now = 100 - self.pct as u64;
            let ideal = (now as f64 * (threshold as f64 / dirty_bytes.max(1) as f64)) as u64;
            now.saturating_sub(ideal).min(p.increment as u64) as u8
        } else {
            p.increment
        };
        self.pct = self.pct.saturating_add(inc).min(p.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    fn later(t: Instant, ms: u64) -> Instant {
        t + Duration::from_millis(ms)
    }

    #[test]
    fn starts_after_two_fast_periods_then_steps_to_the_ceiling() {
        let t = Instant::now();
        let p = ThrottleParams {
            max: 45,
            ..Default::default()
        };
        let mut a = AutoConverge::new(t, 0);
        // 1 GiB dirtied per period, 100 MiB sent: far over 50%.
        let dirty = (1 << 30) / PAGE;
        let mut sent = 0;
        let mut seen = Vec::new();
        for i in 1..=10 {
            sent += 100 << 20;
            if let Some(v) = a.sync(&p, later(t, i * 1100), dirty, PAGE, sent) {
                seen.push(v);
            }
        }
        // Every second fast period: 20, 30, 40, then the ceiling 45.
        assert_eq!(seen, vec![20, 30, 40, 45]);
        assert_eq!(a.percentage(), 45);
    }

    #[test]
    fn syncs_within_a_second_accumulate_into_one_period() {
        let t = Instant::now();
        let p = ThrottleParams::default();
        let mut a = AutoConverge::new(t, 0);
        // Four syncs 300 ms apart: only the one past 1 s closes the period.
        for i in 1..=3 {
            assert_eq!(a.sync(&p, later(t, i * 300), 1000, PAGE, i * 1000), None);
        }
        assert_eq!(a.high, 0, "no period closed yet");
        assert_eq!(a.sync(&p, later(t, 1200), 1000, PAGE, 4000), None);
        assert_eq!(a.high, 1, "4000 pages dirtied vs 4000 bytes sent: too fast");
        assert_eq!(a.dirty_pages, 0, "the period's count starts again");
    }

    #[test]
    fn a_slow_period_does_not_count_and_threshold_is_a_percentage() {
        let t = Instant::now();
        let p = ThrottleParams {
            trigger_threshold: 50,
            ..Default::default()
        };
        let mut a = AutoConverge::new(t, 0);
        // 100 pages dirtied (409600 bytes) against 1 MB sent: 41%, under 50%.
        for i in 1..=6 {
            assert_eq!(
                a.sync(&p, later(t, i * 1100), 100, PAGE, i * 1_000_000),
                None,
                "period {i}"
            );
        }
        assert_eq!(a.percentage(), 0);
        // Over the threshold twice: the initial throttle.
        assert_eq!(a.sync(&p, later(t, 7700), 200, PAGE, 7_000_000), None);
        assert_eq!(a.sync(&p, later(t, 8800), 200, PAGE, 8_000_000), Some(20));
    }

    #[test]
    fn tailslow_steps_by_what_the_dirty_rate_calls_for() {
        let t = Instant::now();
        let p = ThrottleParams {
            tailslow: true,
            increment: 30,
            ..Default::default()
        };
        let mut a = AutoConverge::new(t, 0);
        // Sent 1000 pages' worth per period, dirtied 600: threshold 500 pages.
        let mut sent = 0;
        let mut step = |a: &mut AutoConverge, ms| {
            sent += 1000 * PAGE;
            a.sync(&p, later(t, ms), 600, PAGE, sent)
        };
        assert_eq!(step(&mut a, 1100), None);
        assert_eq!(step(&mut a, 2200), Some(20));
        assert_eq!(step(&mut a, 3300), None);
        // cpu now 80, ideal 80 * 500/600 = 66: a step of 14 (under the increment 30).
        assert_eq!(step(&mut a, 4400), Some(34));
    }

    #[test]
    fn qemu_ranges() {
        let ok = ThrottleParams::default();
        assert_eq!(check(&ok), Ok(()));
        let cases = [
            (
                ThrottleParams {
                    trigger_threshold: 0,
                    ..ok
                },
                "throttle_trigger_threshold",
            ),
            (
                ThrottleParams {
                    trigger_threshold: 101,
                    ..ok
                },
                "throttle_trigger_threshold",
            ),
            (ThrottleParams { initial: 0, ..ok }, "cpu_throttle_initial"),
            (
                ThrottleParams { initial: 100, ..ok },
                "cpu_throttle_initial",
            ),
            (
                ThrottleParams {
                    increment: 100,
                    ..ok
                },
                "cpu_throttle_increment",
            ),
            (
                ThrottleParams {
                    initial: 50,
                    max: 40,
                    ..ok
                },
                "max_cpu_throttle",
            ),
            (ThrottleParams { max: 100, ..ok }, "max_cpu_throttle"),
        ];
        for (p, name) in cases {
            let e = check(&p).expect_err(name);
            assert!(e.starts_with(&format!("Parameter '{name}' expects")), "{e}");
        }
    }
}
