//! Retry policies: how often a failure is retried, how long to wait, and
//! where the wait happens.
//!
//! A [`RetryPolicy`] holds one [`Schedule`] per [error class](ErrorClass).
//! By default transient failures are retried with exponential backoff and
//! jitter, and permanent and poison failures are never retried. The
//! decision is a pure function, [`RetryPolicy::decide`], of the class and the
//! attempt number, so it is cheap and easy to test.
//!
//! ```
//! use std::time::Duration;
//! use surety_core::ErrorClass;
//! use surety_dlq::policy::{Backoff, Decision, RetryMode, RetryPolicy};
//!
//! let policy = RetryPolicy::new()
//!     .max_attempts(3)
//!     .backoff(Backoff::exponential(Duration::from_millis(100), Duration::from_secs(10)).without_jitter())
//!     .mode(RetryMode::InPlace);
//!
//! // Attempt 1 failed transiently: try again after 100 ms.
//! assert_eq!(
//!     policy.decide(ErrorClass::TRANSIENT, 1),
//!     Decision::Retry { next_attempt: 2, delay: Duration::from_millis(100), mode: RetryMode::InPlace },
//! );
//! // Attempt 3 was the last one.
//! assert!(policy.decide(ErrorClass::TRANSIENT, 3).is_dead_letter());
//! // Permanent failures are never retried.
//! assert!(policy.decide(ErrorClass::Permanent, 1).is_dead_letter());
//! ```

use std::time::Duration;

use surety_core::ErrorClass;
pub use surety_core::retry::Backoff;

/// Where a retry waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryMode {
    /// In the consumer, holding the delivery: the layer sleeps and calls the
    /// handler again. For short delays (lock conflicts, brief timeouts). A
    /// crash loses the in-place count; the broker redelivers the message at
    /// the attempt it was delivered with.
    InPlace,
    /// Through the broker: the layer republishes a copy with
    /// `surety-attempt` incremented to a retry destination (a RabbitMQ TTL
    /// queue, a Kafka retry topic) and acknowledges the original. For long
    /// delays; the consumer is free meanwhile.
    Delayed,
}

impl RetryMode {
    /// The stable lower-case name: `in_place` or `delayed` (the `mode`
    /// metric label).
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::InPlace => "in_place",
            Self::Delayed => "delayed",
        }
    }
}

/// How one error class is retried: a [`Backoff`] whose attempt bound is the
/// class's bound, and where retries wait.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    backoff: Backoff,
    mode: RetryMode,
}

impl Schedule {
    /// Up to `max_attempts` attempts in all (the first delivery counts; 0 is
    /// taken as 1), default backoff, delayed through the broker.
    pub fn new(max_attempts: u32) -> Self {
        Self {
            backoff: Backoff::default().max_attempts(max_attempts),
            mode: RetryMode::Delayed,
        }
    }

    /// One attempt: never retried.
    pub fn never() -> Self {
        Self::new(1)
    }

    /// Sets the attempt bound (0 is taken as 1).
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.backoff = self.backoff.max_attempts(max_attempts);
        self
    }

    /// Sets the backoff. Its attempt bound, if it has one, becomes the
    /// schedule's; without one the schedule keeps its bound.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        let attempts = backoff.attempts().or(self.backoff.attempts()).unwrap_or(1);
        self.backoff = backoff.max_attempts(attempts);
        self
    }

    /// Sets where retries wait.
    pub fn mode(mut self, mode: RetryMode) -> Self {
        self.mode = mode;
        self
    }

    /// The attempt bound, the first attempt included.
    pub fn attempts(&self) -> u32 {
        self.backoff.attempts().unwrap_or(1)
    }

    /// The backoff, bounded by [`attempts`](Self::attempts).
    pub fn retry_backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// Where retries wait.
    pub fn retry_mode(&self) -> RetryMode {
        self.mode
    }
}

/// Why a message is dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterReason {
    /// The failure's class is not retried by the policy (permanent and
    /// poison, unless their schedule allows more than one attempt).
    NotRetryable,
    /// Every allowed attempt failed (a transient failure with an attempt
    /// bound of 1 included).
    AttemptsExhausted,
    /// The broker dead-lettered it (read from RabbitMQ's `x-death`).
    Broker,
}

impl DeadLetterReason {
    /// The stable lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::NotRetryable => "not_retryable",
            Self::AttemptsExhausted => "attempts_exhausted",
            Self::Broker => "broker",
        }
    }

    /// Parses [`as_str`](Self::as_str).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "not_retryable" => Some(Self::NotRetryable),
            "attempts_exhausted" => Some(Self::AttemptsExhausted),
            "broker" => Some(Self::Broker),
            _ => None,
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Try again: attempt `next_attempt`, after `delay`, waiting as `mode` says.
    Retry {
        /// The attempt number of the retry.
        next_attempt: u32,
        /// How long to wait before it.
        delay: Duration,
        /// Where to wait.
        mode: RetryMode,
    },
    /// Stop: dead-letter the message.
    DeadLetter(DeadLetterReason),
}

impl Decision {
    /// Whether this is [`Decision::DeadLetter`].
    pub fn is_dead_letter(&self) -> bool {
        matches!(self, Self::DeadLetter(_))
    }
}

/// A retry policy: one [`Schedule`] per error class.
///
/// Defaults: transient failures get 5 attempts with [`Backoff::default`]
/// through the broker ([`RetryMode::Delayed`]); permanent and poison
/// failures are never retried. [`class`](Self::class) overrides a class, for
/// example to give poison messages a few delayed attempts during a rolling
/// deploy that brings a new schema version.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    transient: Schedule,
    permanent: Schedule,
    poison: Schedule,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl RetryPolicy {
    /// The default policy (see the type's docs).
    pub fn new() -> Self {
        Self {
            transient: Schedule::new(5),
            permanent: Schedule::never(),
            poison: Schedule::never(),
        }
    }

    /// Short in-process retries: `max_attempts` attempts, 50 ms doubling to
    /// 1 s with jitter, [`RetryMode::InPlace`].
    pub fn in_place(max_attempts: u32) -> Self {
        Self::new()
            .max_attempts(max_attempts)
            .backoff(Backoff::exponential(
                Duration::from_millis(50),
                Duration::from_secs(1),
            ))
            .mode(RetryMode::InPlace)
    }

    /// No retries at all: every failure is dead-lettered at once.
    pub fn never() -> Self {
        Self::new().max_attempts(1)
    }

    /// Sets the attempt bound of transient failures.
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.transient = self.transient.max_attempts(max_attempts);
        self
    }

    /// Sets the backoff of transient failures.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.transient = self.transient.backoff(backoff);
        self
    }

    /// Sets where transient failures wait.
    pub fn mode(mut self, mode: RetryMode) -> Self {
        self.transient = self.transient.mode(mode);
        self
    }

    /// Replaces the schedule of `class` (the `retry_after` of a transient
    /// class is ignored here).
    pub fn class(mut self, class: ErrorClass, schedule: Schedule) -> Self {
        *self.slot(class) = schedule;
        self
    }

    fn slot(&mut self, class: ErrorClass) -> &mut Schedule {
        match class {
            ErrorClass::Transient { .. } => &mut self.transient,
            ErrorClass::Permanent => &mut self.permanent,
            ErrorClass::Poison => &mut self.poison,
        }
    }

    /// The schedule of `class`.
    pub fn schedule(&self, class: ErrorClass) -> &Schedule {
        match class {
            ErrorClass::Transient { .. } => &self.transient,
            ErrorClass::Permanent => &self.permanent,
            ErrorClass::Poison => &self.poison,
        }
    }

    /// The largest delay any schedule can choose.
    pub fn max_delay(&self) -> Duration {
        [&self.transient, &self.permanent, &self.poison]
            .iter()
            .map(|s| s.backoff.max_delay())
            .max()
            .unwrap_or_default()
    }

    /// What to do after attempt `attempt` (from 1) failed with `class`.
    ///
    /// A transient failure's `retry_after` hint is taken as the minimum
    /// delay, still capped by the schedule's maximum delay.
    pub fn decide(&self, class: ErrorClass, attempt: u32) -> Decision {
        let schedule = self.schedule(class);
        let attempt = attempt.max(1);
        if attempt >= schedule.attempts() {
            return Decision::DeadLetter(if schedule.attempts() <= 1 && !class.is_retryable() {
                DeadLetterReason::NotRetryable
            } else {
                DeadLetterReason::AttemptsExhausted
            });
        }
        let mut delay = schedule.backoff.delay(attempt);
        if let ErrorClass::Transient {
            retry_after: Some(hint),
        } = class
        {
            delay = delay.max(hint).min(schedule.backoff.max_delay());
        }
        Decision::Retry {
            next_attempt: attempt + 1,
            delay,
            mode: schedule.mode,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_a_minimum_under_the_cap() {
        let policy = RetryPolicy::new().backoff(
            Backoff::exponential(Duration::from_millis(10), Duration::from_secs(1))
                .without_jitter(),
        );
        let hinted = ErrorClass::Transient {
            retry_after: Some(Duration::from_millis(500)),
        };
        assert!(
            matches!(policy.decide(hinted, 1), Decision::Retry { delay, .. } if delay == Duration::from_millis(500))
        );
        let huge = ErrorClass::Transient {
            retry_after: Some(Duration::from_secs(3600)),
        };
        assert!(
            matches!(policy.decide(huge, 1), Decision::Retry { delay, .. } if delay == Duration::from_secs(1))
        );
    }

    #[test]
    fn classes_can_be_overridden() {
        let policy = RetryPolicy::new().class(ErrorClass::Poison, Schedule::new(3));
        assert!(!policy.decide(ErrorClass::Poison, 1).is_dead_letter());
        assert_eq!(
            policy.decide(ErrorClass::Poison, 3),
            Decision::DeadLetter(DeadLetterReason::AttemptsExhausted)
        );
        assert_eq!(
            policy.decide(ErrorClass::Permanent, 1),
            Decision::DeadLetter(DeadLetterReason::NotRetryable)
        );
    }
}
