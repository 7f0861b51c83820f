//! Shared helpers of the integration tests.
#![allow(dead_code, unreachable_pub, unused_imports)]

#[cfg(all(feature = "sqlite", feature = "postgres"))]
mod db;

use std::time::Duration;

#[cfg(all(feature = "sqlite", feature = "postgres"))]
pub use db::*;
use tokio::time::Instant;

/// Waits until `condition` holds, checking every few milliseconds; panics
/// with `what` after `deadline`.
pub async fn wait_until(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !condition() {
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
