//! Backoff: how long to wait before the next attempt, for every retry loop
//! in the family.
//!
//! One [`Backoff`] value describes exponential growth from a minimum delay
//! to a cap, with optional jitter and an optional bound on the number of
//! attempts. Every crate waits with it: the worker after subscription
//! errors, the [`Host`](crate::host::Host) between subscribe attempts, the
//! DLQ layer's retry policy, the outbox relay's row retries and the RabbitMQ
//! adapter's reconnects. Delays are computed by [`backon`].
//!
//! ```
//! use std::time::Duration;
//! use surety_core::retry::Backoff;
//!
//! let backoff = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(2))
//!     .without_jitter()
//!     .max_attempts(4);
//! // Retry 1 waits the minimum; each next one twice as long, up to the cap.
//! assert_eq!(backoff.delay(1).as_millis(), 100);
//! assert_eq!(backoff.delay(3).as_millis(), 400);
//! assert_eq!(backoff.delay(100), Duration::from_secs(2));
//! // Four attempts in all: three waits between them.
//! assert_eq!(backoff.delays().count(), 3);
//! ```

use std::time::Duration;

use backon::BackoffBuilder as _;

/// Exponential backoff with optional jitter and an optional attempt bound.
///
/// The delay before retry `n` (from 1) is `min_delay * factor^(n-1)`, capped
/// at `max_delay`; with jitter a random extra of up to 100 % is added (the
/// delay stays in `[d, 2d)`), and the result is capped at `max_delay` again.
///
/// [`max_attempts`](Self::max_attempts) counts the first attempt: a bound of
/// 3 allows two retries. Without a bound, [`delays`](Self::delays) never
/// ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    min_delay: Duration,
    max_delay: Duration,
    factor: f32,
    jitter: bool,
    max_attempts: Option<u32>,
}

impl Backoff {
    /// Doubling from `min_delay` up to `max_delay`, with jitter, unbounded.
    pub fn exponential(min_delay: Duration, max_delay: Duration) -> Self {
        Self {
            min_delay,
            max_delay: max_delay.max(min_delay),
            factor: 2.0,
            jitter: true,
            max_attempts: None,
        }
    }

    /// The same delay every time, without jitter, unbounded.
    pub fn constant(delay: Duration) -> Self {
        Self {
            min_delay: delay,
            max_delay: delay,
            factor: 1.0,
            jitter: false,
            max_attempts: None,
        }
    }

    /// Sets the growth factor (values below 1 are taken as 1; a value that
    /// is not finite as 2).
    pub fn factor(mut self, factor: f32) -> Self {
        self.factor = if factor.is_finite() {
            factor.max(1.0)
        } else {
            2.0
        };
        self
    }

    /// Disables jitter: delays are exact.
    pub fn without_jitter(mut self) -> Self {
        self.jitter = false;
        self
    }

    /// Enables jitter.
    pub fn with_jitter(mut self) -> Self {
        self.jitter = true;
        self
    }

    /// Bounds the attempts, the first one included (0 is taken as 1: no
    /// retry).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts.max(1));
        self
    }

    /// Removes the attempt bound.
    pub fn unbounded(mut self) -> Self {
        self.max_attempts = None;
        self
    }

    /// The attempt bound, the first attempt included, if there is one.
    pub fn attempts(&self) -> Option<u32> {
        self.max_attempts
    }

    /// The smallest delay.
    pub fn min_delay(&self) -> Duration {
        self.min_delay
    }

    /// The largest delay.
    pub fn max_delay(&self) -> Duration {
        self.max_delay
    }

    /// Whether an attempt after `attempt` (from 1) is within the bound.
    pub fn allows_retry_after(&self, attempt: u32) -> bool {
        self.max_attempts.is_none_or(|max| attempt < max)
    }

    fn builder(&self) -> backon::ExponentialBuilder {
        let builder = backon::ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_factor(self.factor)
            .without_max_times();
        if self.jitter {
            builder.with_jitter()
        } else {
            builder
        }
    }

    /// The delay before retry `retry` (from 1; 0 is taken as 1). The attempt
    /// bound does not apply here; see [`allows_retry_after`](Self::allows_retry_after).
    pub fn delay(&self, retry: u32) -> Duration {
        let index = retry.max(1) as usize - 1;
        // Past the point where the delay reached the cap, further steps
        // change nothing: stop iterating there.
        let steps = index.min(64);
        self.builder()
            .build()
            .nth(steps)
            .unwrap_or(self.max_delay)
            .min(self.max_delay)
    }

    /// The delays between consecutive attempts, in order: one fewer than
    /// the attempt bound, or for ever without one.
    pub fn delays(&self) -> Delays {
        Delays {
            inner: self.builder().build(),
            max_delay: self.max_delay,
            left: self.max_attempts.map(|max| max.saturating_sub(1)),
        }
    }
}

impl Default for Backoff {
    /// 1 s doubling to 5 min, with jitter, unbounded.
    fn default() -> Self {
        Self::exponential(Duration::from_secs(1), Duration::from_secs(300))
    }
}

/// The delays of a [`Backoff`], made by [`Backoff::delays`].
#[derive(Debug)]
pub struct Delays {
    inner: backon::ExponentialBackoff,
    max_delay: Duration,
    left: Option<u32>,
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if let Some(left) = &mut self.left {
            if *left == 0 {
                return None;
            }
            *left -= 1;
        }
        Some(
            self.inner
                .next()
                .unwrap_or(self.max_delay)
                .min(self.max_delay),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn millis(d: Duration) -> u64 {
        // backon computes in f32: compare rounded milliseconds.
        (d.as_secs_f64() * 1000.0).round() as u64
    }

    #[test]
    fn delays_grow_and_stay_capped() {
        let backoff = Backoff::exponential(Duration::from_millis(10), Duration::from_millis(200))
            .without_jitter();
        let delays: Vec<_> = (1..=8).map(|n| millis(backoff.delay(n))).collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 200, 200, 200]);
        assert_eq!(backoff.delay(u32::MAX), Duration::from_millis(200));
        let iterated: Vec<_> = backoff.delays().take(8).map(millis).collect();
        assert_eq!(iterated, delays);
    }

    #[test]
    fn jitter_stays_within_one_step_and_the_cap() {
        let backoff = Backoff::exponential(Duration::from_millis(10), Duration::from_millis(100));
        for _ in 0..200 {
            let d = backoff.delay(2);
            assert!(
                d >= Duration::from_micros(19_900) && d < Duration::from_millis(40),
                "{d:?}"
            );
            assert!(backoff.delay(10) <= Duration::from_millis(100));
        }
        assert!(
            backoff
                .delays()
                .take(50)
                .all(|d| d <= Duration::from_millis(100))
        );
    }

    #[test]
    fn the_bound_counts_the_first_attempt() {
        let backoff = Backoff::constant(Duration::from_millis(5)).max_attempts(3);
        assert_eq!(backoff.delays().count(), 2);
        assert!(backoff.allows_retry_after(2));
        assert!(!backoff.allows_retry_after(3));
        assert_eq!(
            Backoff::constant(Duration::ZERO)
                .max_attempts(0)
                .delays()
                .count(),
            0
        );
        assert!(Backoff::default().allows_retry_after(u32::MAX - 1));
        assert_eq!(Backoff::default().delays().take(100).count(), 100);
    }

    #[test]
    fn odd_factors_are_tamed() {
        let base = Backoff::exponential(Duration::from_millis(10), Duration::from_secs(1))
            .without_jitter();
        assert_eq!(base.factor(0.5).delay(3), Duration::from_millis(10));
        assert_eq!(millis(base.factor(f32::NAN).delay(2)), 20);
    }
}
