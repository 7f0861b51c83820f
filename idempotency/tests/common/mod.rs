//! Shared helpers of the integration tests.
#![allow(dead_code, unreachable_pub, unused_imports)]

#[cfg(all(feature = "sqlite", feature = "postgres"))]
mod db;

use std::time::Duration;

#[cfg(all(feature = "sqlite", feature = "postgres"))]
pub use db::*;

/// Waits until `condition` holds, checking every few milliseconds; panics
/// with `what` after `deadline`.
pub async fn wait_until(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) {
    surety_testkit::wait::eventually_every(deadline, Duration::from_millis(5), what, || {
        std::future::ready(condition())
    })
    .await;
}
