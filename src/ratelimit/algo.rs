//! The limiting algorithms as pure functions of a small state and the time
//! (microseconds since the Unix epoch, UTC): GCRA throttles, calendar
//! windows and sliding windows. The local backend keeps these states in
//! memory; the Redis backend's Lua script keeps the same states on the
//! server and applies the same arithmetic, and its answers are turned into
//! a [`Check`] by the same functions here, so both backends agree.

/// One second in microseconds.
pub const SEC: u64 = 1_000_000;

/// A calendar window, aligned in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Calendar {
    Minute,
    Hour,
    Day,
    Month,
}

/// What a limit counts and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algo {
    /// GCRA: one unit every `interval` µs, at most `burst` at once.
    Gcra { interval: u64, burst: u64 },
    /// At most `quota` units per calendar window.
    Window { cal: Calendar, quota: u64 },
    /// At most `quota` units in any `len` µs (sliding-window counter
    /// approximation: the previous fixed window weighted by its overlap).
    Sliding { len: u64, quota: u64 },
}

/// A limit's state for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Theoretical arrival time (µs).
    Gcra { tat: u64 },
    /// Units counted in the window starting at `start`.
    Window { start: u64, count: u64 },
    /// Fixed windows of `len`: `prev` in window `idx - 1`, `cur` in `idx`.
    Sliding { idx: u64, prev: u64, cur: u64 },
}

/// The answer of a limit for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    pub allowed: bool,
    /// Units still available after this request.
    pub remaining: u64,
    /// µs until the limit is back to full (`t` of the `RateLimit` header).
    pub reset: u64,
    /// When refused: µs until a request of the same cost could pass.
    pub retry: u64,
}

impl Algo {
    pub fn initial(&self, now: u64) -> State {
        match *self {
            Algo::Gcra { .. } => State::Gcra { tat: now },
            Algo::Window { cal, .. } => State::Window {
                start: cal.bounds(now).0,
                count: 0,
            },
            Algo::Sliding { len, .. } => State::Sliding {
                idx: now / len,
                prev: 0,
                cur: 0,
            },
        }
    }

    /// The quota `q` of the `RateLimit-Policy` header: the burst of a
    /// throttle, the quota of a window.
    pub fn quota(&self) -> u64 {
        match *self {
            Algo::Gcra { burst, .. } => burst,
            Algo::Window { quota, .. } | Algo::Sliding { quota, .. } => quota,
        }
    }

    /// The window `w` of the `RateLimit-Policy` header, in seconds: for a
    /// throttle, the time to earn the whole burst back.
    pub fn window_secs(&self, now: u64) -> u64 {
        match *self {
            Algo::Gcra { interval, burst } => interval.saturating_mul(burst).div_ceil(SEC).max(1),
            Algo::Window { cal, .. } => {
                let (a, b) = cal.bounds(now);
                (b - a) / SEC
            }
            Algo::Sliding { len, .. } => len.div_ceil(SEC).max(1),
        }
    }

    /// Brings `st` to the present (a new window, an old TAT) without
    /// counting anything; returns the units available now.
    pub fn available(&self, st: &mut State, now: u64) -> u64 {
        self.roll(st, now);
        match (*self, *st) {
            (Algo::Gcra { interval, burst }, State::Gcra { tat }) => {
                let tau = interval.saturating_mul(burst);
                let used = tat.saturating_sub(now);
                tau.saturating_sub(used) / interval
            }
            (Algo::Window { quota, .. }, State::Window { count, .. }) => {
                quota.saturating_sub(count)
            }
            (Algo::Sliding { len, quota }, State::Sliding { prev, cur, .. }) => {
                quota.saturating_sub(sliding_estimate(len, now, prev, cur))
            }
            _ => 0,
        }
    }

    /// Counts `n` units whether or not they fit (a reservation, a debt).
    pub fn add(&self, st: &mut State, now: u64, n: u64) {
        self.roll(st, now);
        match (self, st) {
            (Algo::Gcra { interval, .. }, State::Gcra { tat }) => {
                *tat = (*tat).max(now).saturating_add(interval.saturating_mul(n))
            }
            (_, State::Window { count, .. }) => *count = count.saturating_add(n),
            (_, State::Sliding { cur, .. }) => *cur = cur.saturating_add(n),
            _ => {}
        }
    }

    /// Takes back `n` units counted by [`Algo::add`] (another limit of the
    /// same request refused it).
    pub fn refund(&self, st: &mut State, now: u64, n: u64) {
        self.roll(st, now);
        match (self, st) {
            (Algo::Gcra { interval, .. }, State::Gcra { tat }) => {
                *tat = tat.saturating_sub(interval.saturating_mul(n)).max(now)
            }
            (_, State::Window { count, .. }) => *count = count.saturating_sub(n),
            (_, State::Sliding { cur, .. }) => *cur = cur.saturating_sub(n),
            _ => {}
        }
    }

    /// Decides a request of `cost` units: counted when it fits.
    pub fn check(&self, st: &mut State, now: u64, cost: u64) -> Check {
        let available = self.available(st, now);
        let allowed = cost <= available;
        if allowed {
            self.add(st, now, cost);
        }
        let mut c = self.report(st, now);
        c.allowed = allowed;
        if !allowed {
            c.retry = self.retry_after(st, now, cost);
        }
        c
    }

    /// The headers' view of a state (no request counted).
    pub fn report(&self, st: &mut State, now: u64) -> Check {
        let remaining = self.available(st, now);
        let reset = match (*self, *st) {
            (Algo::Gcra { .. }, State::Gcra { tat }) => tat.saturating_sub(now),
            (Algo::Window { cal, .. }, State::Window { .. }) => cal.bounds(now).1 - now,
            (Algo::Sliding { len, .. }, State::Sliding { prev, cur, .. }) => {
                // Back to full once both counted windows have slid out.
                let end_of_cur = (now / len + 1) * len;
                if cur > 0 {
                    end_of_cur + len - now
                } else if prev > 0 {
                    end_of_cur - now
                } else {
                    0
                }
            }
            _ => 0,
        };
        Check {
            allowed: true,
            remaining,
            reset,
            retry: 0,
        }
    }

    /// µs until a request of `cost` units could pass (never 0 when it
    /// cannot pass now).
    pub fn retry_after(&self, st: &mut State, now: u64, cost: u64) -> u64 {
        self.roll(st, now);
        match (*self, *st) {
            (Algo::Gcra { interval, burst }, State::Gcra { tat }) => {
                let tau = interval.saturating_mul(burst);
                let allow_at = tat
                    .max(now)
                    .saturating_add(interval.saturating_mul(cost))
                    .saturating_sub(tau);
                if cost > burst {
                    // Never fits: report a full window.
                    tau.max(1)
                } else {
                    allow_at.saturating_sub(now).max(1)
                }
            }
            (Algo::Window { cal, .. }, State::Window { .. }) => (cal.bounds(now).1 - now).max(1),
            (Algo::Sliding { len, quota }, State::Sliding { prev, cur, .. }) => {
                sliding_retry(len, quota, now, prev, cur, cost)
            }
            _ => SEC,
        }
    }

    /// Moves a state into the current window (calendar and sliding).
    fn roll(&self, st: &mut State, now: u64) {
        match (*self, st) {
            (Algo::Window { cal, .. }, State::Window { start, count }) => {
                let s = cal.bounds(now).0;
                if *start != s {
                    *start = s;
                    *count = 0;
                }
            }
            (Algo::Sliding { len, .. }, State::Sliding { idx, prev, cur }) => {
                let i = now / len;
                if i == *idx + 1 {
                    *prev = *cur;
                    *cur = 0;
                } else if i != *idx {
                    *prev = 0;
                    *cur = 0;
                }
                *idx = i;
            }
            _ => {}
        }
    }

    /// When a state is back to its initial value (an idle key can be
    /// forgotten then), in µs.
    pub fn idle_at(&self, st: &State) -> u64 {
        match (*self, *st) {
            (_, State::Gcra { tat }) => tat,
            (Algo::Window { cal, .. }, State::Window { start, .. }) => cal.bounds(start).1,
            (Algo::Sliding { len, .. }, State::Sliding { idx, .. }) => (idx + 2) * len,
            _ => 0,
        }
    }

    /// A copy of this limit for one of `n` instances (the local fallback
    /// when Redis is unavailable): the quota (or burst) divided by `n`,
    /// the throttle's interval multiplied by `n`; never below one unit.
    pub fn divided(&self, n: u64) -> Algo {
        let n = n.max(1);
        match *self {
            Algo::Gcra { interval, burst } => Algo::Gcra {
                interval: interval.saturating_mul(n),
                burst: (burst / n).max(1),
            },
            Algo::Window { cal, quota } => Algo::Window {
                cal,
                quota: (quota / n).max(1),
            },
            Algo::Sliding { len, quota } => Algo::Sliding {
                len,
                quota: (quota / n).max(1),
            },
        }
    }
}

/// `prev` weighted by the share of the previous window still inside the
/// sliding window, plus `cur`, rounded up.
pub fn sliding_estimate(len: u64, now: u64, prev: u64, cur: u64) -> u64 {
    let elapsed = now % len;
    let weighted = (prev as u128 * (len - elapsed) as u128).div_ceil(len as u128) as u64;
    weighted.saturating_add(cur)
}

fn sliding_retry(len: u64, quota: u64, now: u64, prev: u64, cur: u64, cost: u64) -> u64 {
    if cost > quota {
        return len;
    }
    let start = now / len * len;
    let elapsed = now - start;
    // Within this window the estimate falls as `prev` slides out: find the
    // first µs where prev·(len−e)/len + cur + cost ≤ quota.
    if cur + cost <= quota && prev > 0 {
        let room = quota - cur - cost; // prev·(len−e)/len ≤ room
        let e = len - (room as u128 * len as u128 / prev as u128).min(len as u128) as u64;
        if e > elapsed {
            return e - elapsed;
        }
        return 1;
    }
    // Next window: `cur` becomes the previous window.
    let to_next = len - elapsed;
    if cur == 0 {
        return to_next.max(1);
    }
    let room = quota - cost;
    let e = len - (room as u128 * len as u128 / cur as u128).min(len as u128) as u64;
    to_next + e
}

impl Calendar {
    /// The window containing `t` (µs): its start and end.
    pub fn bounds(self, t: u64) -> (u64, u64) {
        let step = match self {
            Calendar::Minute => 60 * SEC,
            Calendar::Hour => 3600 * SEC,
            Calendar::Day => 86_400 * SEC,
            Calendar::Month => {
                let days = (t / (86_400 * SEC)) as i64;
                let (y, m, _) = civil_from_days(days);
                let start = days_from_civil(y, m, 1) as u64 * 86_400 * SEC;
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                let end = days_from_civil(ny, nm, 1) as u64 * 86_400 * SEC;
                return (start, end);
            }
        };
        let start = t / step * step;
        (start, start + step)
    }
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) → days since 1970-01-01.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i64, m: u32, d: u32, secs: u64) -> u64 {
        days_from_civil(y, m, d) as u64 * 86_400 * SEC + secs * SEC
    }

    #[test]
    fn gcra_admits_the_burst_then_one_per_interval() {
        // 20 per second, burst 40.
        let a = Algo::Gcra {
            interval: SEC / 20,
            burst: 40,
        };
        let t0 = 1_700_000_000 * SEC;
        let mut st = a.initial(t0);
        for i in 0..40 {
            let c = a.check(&mut st, t0, 1);
            assert!(c.allowed, "request {i}");
            assert_eq!(c.remaining, 39 - i);
        }
        let c = a.check(&mut st, t0, 1);
        assert!(!c.allowed);
        assert_eq!(c.retry, SEC / 20);
        // Not quite one interval later: still refused; at it: one more.
        assert!(!a.check(&mut st, t0 + SEC / 20 - 1, 1).allowed);
        assert!(a.check(&mut st, t0 + SEC / 20, 1).allowed);
        assert!(!a.check(&mut st, t0 + SEC / 20, 1).allowed);
        // After two idle seconds the whole burst is back.
        let t = t0 + 3 * SEC;
        assert_eq!(a.report(&mut st, t).remaining, 40);
        assert_eq!(a.report(&mut st, t).reset, 0);
    }

    #[test]
    fn gcra_costs() {
        let a = Algo::Gcra {
            interval: SEC / 10,
            burst: 10,
        };
        let t0 = 5 * SEC;
        let mut st = a.initial(t0);
        assert!(a.check(&mut st, t0, 5).allowed);
        assert!(a.check(&mut st, t0, 5).allowed);
        let c = a.check(&mut st, t0, 5);
        assert!(!c.allowed);
        assert_eq!(c.retry, SEC / 2);
        // A cost above the burst never fits.
        let mut st = a.initial(t0);
        assert!(!a.check(&mut st, t0, 11).allowed);
        // Refunds give the units back.
        let mut st = a.initial(t0);
        assert!(a.check(&mut st, t0, 10).allowed);
        a.refund(&mut st, t0, 4);
        assert_eq!(a.available(&mut st, t0), 4);
    }

    #[test]
    fn calendar_windows_are_exact_and_roll_over_in_utc() {
        let a = Algo::Window {
            cal: Calendar::Day,
            quota: 3,
        };
        let t = at(2024, 3, 10, 86_399); // 23:59:59 UTC
        let mut st = a.initial(t);
        for _ in 0..3 {
            assert!(a.check(&mut st, t, 1).allowed);
        }
        let c = a.check(&mut st, t, 1);
        assert!(!c.allowed);
        assert_eq!(c.retry, SEC);
        assert_eq!(c.reset, SEC);
        // Midnight UTC: a new day.
        let c = a.check(&mut st, at(2024, 3, 11, 0), 1);
        assert!(c.allowed);
        assert_eq!(c.remaining, 2);

        let m = Algo::Window {
            cal: Calendar::Minute,
            quota: 2,
        };
        let t = 120 * SEC + 59 * SEC;
        let mut st = m.initial(t);
        assert!(m.check(&mut st, t, 2).allowed);
        assert!(!m.check(&mut st, t + SEC - 1, 1).allowed);
        assert!(m.check(&mut st, t + SEC, 1).allowed);
        let h = Algo::Window {
            cal: Calendar::Hour,
            quota: 1,
        };
        assert_eq!(
            Calendar::Hour.bounds(3 * 3600 * SEC + 5),
            (10_800 * SEC, 14_400 * SEC)
        );
        assert_eq!(h.window_secs(0), 3600);
    }

    #[test]
    fn month_windows_follow_the_calendar() {
        // February of a leap year, December → January.
        assert_eq!(
            Calendar::Month.bounds(at(2024, 2, 15, 100)),
            (at(2024, 2, 1, 0), at(2024, 3, 1, 0))
        );
        assert_eq!(
            Calendar::Month.bounds(at(2023, 12, 31, 86_399)),
            (at(2023, 12, 1, 0), at(2024, 1, 1, 0))
        );
        assert_eq!(
            civil_from_days(days_from_civil(2100, 2, 28) + 1),
            (2100, 3, 1)
        );
        let a = Algo::Window {
            cal: Calendar::Month,
            quota: 2,
        };
        let t = at(2023, 12, 31, 86_399);
        let mut st = a.initial(t);
        assert!(a.check(&mut st, t, 2).allowed);
        let c = a.check(&mut st, t, 1);
        assert!(!c.allowed);
        assert_eq!(c.retry, SEC);
        assert_eq!(a.window_secs(t), 31 * 86_400);
        assert!(a.check(&mut st, at(2024, 1, 1, 0), 1).allowed);
        assert_eq!(a.window_secs(at(2024, 2, 1, 0)), 29 * 86_400);
    }

    #[test]
    fn sliding_windows_weigh_the_previous_window() {
        let len = 60 * SEC;
        let a = Algo::Sliding { len, quota: 10 };
        let t0 = 600 * SEC; // a window boundary
        let mut st = a.initial(t0);
        for _ in 0..10 {
            assert!(a.check(&mut st, t0 + 30 * SEC, 1).allowed);
        }
        let c = a.check(&mut st, t0 + 30 * SEC, 1);
        assert!(!c.allowed);
        // Next window, 6 s in: 10 × 54/60 = 9 still count → 1 fits.
        let t = t0 + len + 6 * SEC;
        assert_eq!(a.available(&mut st, t), 1);
        assert!(a.check(&mut st, t, 1).allowed);
        let c = a.check(&mut st, t, 1);
        assert!(!c.allowed);
        // prev·(len−e)/len + 1 + 1 ≤ 10 → e ≥ 12 s: 6 s from now.
        assert_eq!(c.retry, 6 * SEC);
        assert!(!a.check(&mut st, t + 6 * SEC - SEC / 2, 1).allowed);
        assert!(a.check(&mut st, t + 6 * SEC, 1).allowed);
        // Two windows later everything has slid out.
        assert_eq!(a.available(&mut st, t0 + 3 * len), 10);
    }

    #[test]
    fn divided_limits_for_the_fallback() {
        let a = Algo::Window {
            cal: Calendar::Day,
            quota: 100,
        };
        assert_eq!(a.divided(3).quota(), 33);
        let g = Algo::Gcra {
            interval: SEC / 20,
            burst: 30,
        };
        assert_eq!(
            g.divided(3),
            Algo::Gcra {
                interval: 150_000,
                burst: 10
            }
        );
        assert_eq!(a.divided(1000).quota(), 1);
    }
}
