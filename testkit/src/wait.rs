//! Waiting for a condition with a deadline.
//!
//! [`eventually`] polls a check until it holds and fails the test, naming
//! what it waited for, when the deadline passes first. The check is an async
//! closure returning `bool` (the condition holds) or `Option<T>` (`Some`
//! holds, and `eventually` returns the `T`); see [`Condition`].
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::time::Duration;
//! use surety_testkit::wait::eventually;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let polls = Arc::new(AtomicU32::new(0));
//! eventually(Duration::from_secs(5), "the third poll", || {
//!     let polls = polls.clone();
//!     async move { polls.fetch_add(1, Ordering::SeqCst) >= 2 }
//! })
//! .await;
//! let value = eventually(Duration::from_secs(5), "a value", || async { Some(7) }).await;
//! assert_eq!(value, 7);
//! # }
//! ```

use std::future::Future;
use std::time::Duration;

/// How often [`eventually`] polls.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// What a check of [`eventually`] returns: whether the awaited condition
/// holds, and the value it yields when it does.
pub trait Condition {
    /// What [`eventually`] returns once the condition holds.
    type Value;

    /// `Some` when the condition holds.
    fn holds(self) -> Option<Self::Value>;
}

impl Condition for bool {
    type Value = ();

    fn holds(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Condition for Option<T> {
    type Value = T;

    fn holds(self) -> Option<T> {
        self
    }
}

/// Runs `check` until its condition holds, every [`POLL_INTERVAL`], and
/// returns the condition's value.
///
/// # Panics
///
/// When the condition still does not hold once `deadline` has passed since
/// the first check, with "timed out after {deadline} waiting for {what}".
pub async fn eventually<F, Fut>(
    deadline: Duration,
    what: &str,
    check: F,
) -> <Fut::Output as Condition>::Value
where
    F: FnMut() -> Fut,
    Fut: Future<Output: Condition>,
{
    eventually_every(deadline, POLL_INTERVAL, what, check).await
}

/// [`eventually`], polling every `interval` instead of [`POLL_INTERVAL`].
///
/// # Panics
///
/// As [`eventually`].
pub async fn eventually_every<F, Fut>(
    deadline: Duration,
    interval: Duration,
    what: &str,
    mut check: F,
) -> <Fut::Output as Condition>::Value
where
    F: FnMut() -> Fut,
    Fut: Future<Output: Condition>,
{
    let started = tokio::time::Instant::now();
    loop {
        if let Some(value) = check().await.holds() {
            return value;
        }
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(interval).await;
    }
}
