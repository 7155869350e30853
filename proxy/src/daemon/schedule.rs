//! When to sync: kube-proxy's bounded-frequency runner, as a pure state machine over
//! [`Instant`]s (the loop sleeps until [`Schedule::next_attempt`] and asks [`Schedule::take`]).
//!
//! - A token bucket limits syncs to one per `min_interval` on average, with `burst` back to back
//!   after a quiet spell (kube-proxy: `minSyncPeriod`, burst 2). Changes that arrive while no
//!   token is available are merged into the next sync.
//! - A full sync (rewrite everything, repairing drift) is due every `period`, at start, after a
//!   failure and on demand (SIGHUP, configuration reload).
//! - After a failure the next attempt, a full sync, waits an exponential backoff (1s doubling,
//!   capped at `period`); new changes do not cut the wait short.

use std::time::Duration;

use tokio::time::Instant;

const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// What kind of sync to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    /// Re-apply the whole plan.
    Full,
    /// Apply the plan diff of the changed services.
    Partial,
}

#[derive(Debug, Clone)]
pub struct Schedule {
    min_interval: Duration,
    period: Duration,
    burst: u32,
    /// The token bucket as time credit: one token is `min_interval` of it, the bucket holds
    /// `burst` tokens (integer arithmetic, so a token is never a rounding error short).
    credit: Duration,
    refilled_at: Instant,
    next_full: Instant,
    full_requested: bool,
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl Schedule {
    /// A schedule whose first sync (a full one) is due at once.
    pub fn new(now: Instant, min_interval: Duration, period: Duration, burst: u32) -> Self {
        let burst = burst.max(1);
        Self {
            min_interval,
            period,
            burst,
            credit: min_interval * burst,
            refilled_at: now,
            next_full: now,
            full_requested: true,
            retry_at: None,
            backoff: FIRST_BACKOFF,
        }
    }

    pub fn set_periods(&mut self, now: Instant, min_interval: Duration, period: Duration, burst: u32) {
        self.refill(now);
        self.min_interval = min_interval;
        self.burst = burst.max(1);
        self.credit = self.credit.min(self.capacity());
        if period != self.period {
            self.next_full = self.next_full.min(now + period);
            self.period = period;
        }
    }

    fn capacity(&self) -> Duration {
        self.min_interval * self.burst
    }

    fn credit_at(&self, now: Instant) -> Duration {
        (self.credit + now.saturating_duration_since(self.refilled_at)).min(self.capacity())
    }

    fn refill(&mut self, now: Instant) {
        self.credit = self.credit_at(now);
        self.refilled_at = now;
    }

    /// When a token is available.
    fn token_at(&self, now: Instant) -> Instant {
        now + self.min_interval.saturating_sub(self.credit_at(now))
    }

    fn due_at(&self, now: Instant, pending: bool) -> Instant {
        match self.retry_at {
            Some(t) => t,
            None if self.full_requested || pending => now,
            None => self.next_full,
        }
    }

    /// When the loop should wake to sync, given whether changes are pending.
    pub fn next_attempt(&self, now: Instant, pending: bool) -> Instant {
        self.due_at(now, pending).max(self.token_at(now))
    }

    /// The sync to run now, if one is due and allowed; takes a token.
    pub fn take(&mut self, now: Instant, pending: bool) -> Option<SyncKind> {
        if self.due_at(now, pending) > now {
            return None;
        }
        self.refill(now);
        if self.credit < self.min_interval {
            return None;
        }
        self.credit -= self.min_interval;
        let full = self.full_requested || self.retry_at.is_some() || now >= self.next_full;
        Some(if full { SyncKind::Full } else { SyncKind::Partial })
    }

    pub fn succeeded(&mut self, started: Instant, kind: SyncKind) {
        if kind == SyncKind::Full {
            self.next_full = started + self.period;
            self.full_requested = false;
        }
        self.retry_at = None;
        self.backoff = FIRST_BACKOFF;
    }

    /// Records a failure; returns how long until the retry.
    pub fn failed(&mut self, now: Instant) -> Duration {
        let wait = self.backoff;
        self.retry_at = Some(now + wait);
        self.full_requested = true;
        self.backoff = (self.backoff * 2).min(self.period.max(FIRST_BACKOFF));
        wait
    }

    /// Asks for a full sync as soon as a token allows (SIGHUP), also ending a backoff wait.
    pub fn request_full(&mut self) {
        self.full_requested = true;
        self.retry_at = None;
    }

    pub fn period(&self) -> Duration {
        self.period
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn schedule(t0: Instant) -> Schedule {
        Schedule::new(t0, 1000 * MS, 30_000 * MS, 2)
    }

    #[test]
    fn the_first_sync_is_full_and_immediate() {
        let t0 = Instant::now();
        let mut s = schedule(t0);
        assert_eq!(s.next_attempt(t0, false), t0);
        assert_eq!(s.take(t0, false), Some(SyncKind::Full));
        s.succeeded(t0, SyncKind::Full);
        assert_eq!(s.next_attempt(t0, false), t0 + 30_000 * MS, "nothing pending: the periodic resync");
    }

    #[test]
    fn a_burst_of_two_then_one_sync_per_min_interval() {
        let t0 = Instant::now();
        let mut s = schedule(t0);
        assert_eq!(s.take(t0, true), Some(SyncKind::Full));
        s.succeeded(t0, SyncKind::Full);
        assert_eq!(s.take(t0, true), Some(SyncKind::Partial), "second token of the burst");
        s.succeeded(t0, SyncKind::Partial);
        assert_eq!(s.take(t0 + 10 * MS, true), None, "bucket empty");
        assert_eq!(s.next_attempt(t0 + 10 * MS, true), t0 + 1000 * MS);
        assert_eq!(s.take(t0 + 1000 * MS, true), Some(SyncKind::Partial));
        assert_eq!(s.take(t0 + 1500 * MS, true), None);
        assert_eq!(s.next_attempt(t0 + 1500 * MS, true), t0 + 2000 * MS);
    }

    #[test]
    fn the_periodic_sync_is_full() {
        let t0 = Instant::now();
        let mut s = schedule(t0);
        s.take(t0, false);
        s.succeeded(t0, SyncKind::Full);
        assert_eq!(s.take(t0 + 29_999 * MS, false), None);
        assert_eq!(s.take(t0 + 30_000 * MS, false), Some(SyncKind::Full));
        // A partial sync due when the full one is also due becomes full.
        s.succeeded(t0 + 30_000 * MS, SyncKind::Full);
        assert_eq!(s.take(t0 + 60_000 * MS, true), Some(SyncKind::Full));
    }

    #[test]
    fn failures_back_off_exponentially_with_full_syncs_that_changes_do_not_hurry() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0, Duration::ZERO, 5000 * MS, 2);
        s.take(t0, false);
        assert_eq!(s.failed(t0), 1000 * MS);
        assert_eq!(s.take(t0 + 500 * MS, true), None, "pending changes wait for the backoff");
        assert_eq!(s.next_attempt(t0 + 500 * MS, true), t0 + 1000 * MS);
        let t1 = t0 + 1000 * MS;
        assert_eq!(s.take(t1, false), Some(SyncKind::Full));
        assert_eq!(s.failed(t1), 2000 * MS);
        let t2 = t1 + 2000 * MS;
        assert_eq!(s.take(t2, false), Some(SyncKind::Full));
        assert_eq!(s.failed(t2), 4000 * MS);
        let t3 = t2 + 4000 * MS;
        s.take(t3, false);
        assert_eq!(s.failed(t3), 5000 * MS, "capped at the sync period");
        let t4 = t3 + 5000 * MS;
        assert_eq!(s.take(t4, false), Some(SyncKind::Full));
        s.succeeded(t4, SyncKind::Full);
        assert_eq!(s.take(t4, true), Some(SyncKind::Partial), "back to normal");
        s.take(t4, false);
        assert_eq!(s.failed(t4), 1000 * MS, "the backoff starts over");
    }

    #[test]
    fn a_full_sync_on_request_ends_a_backoff() {
        let t0 = Instant::now();
        let mut s = schedule(t0);
        s.take(t0, false);
        s.failed(t0);
        s.request_full();
        assert_eq!(s.take(t0 + 10 * MS, false), Some(SyncKind::Full));
    }

    #[test]
    fn a_shorter_period_brings_the_next_full_sync_forward() {
        let t0 = Instant::now();
        let mut s = schedule(t0);
        s.take(t0, false);
        s.succeeded(t0, SyncKind::Full);
        s.set_periods(t0, 1000 * MS, 2000 * MS, 2);
        assert_eq!(s.next_attempt(t0, false), t0 + 2000 * MS);
    }
}
