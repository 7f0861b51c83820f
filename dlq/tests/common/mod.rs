//! Shared helpers for the surety-dlq integration tests.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::time::Duration;

/// Waits until `condition` holds, polling every 2 ms, and panics with
/// `what` after `deadline` (`surety_testkit::wait::eventually_every`).
pub async fn eventually<F, Fut>(deadline: Duration, what: &str, condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    surety_testkit::wait::eventually_every(deadline, Duration::from_millis(2), what, condition)
        .await;
}

/// Runs a worker until `stop` is sent; returns the join handle.
pub fn spawn_worker<S>(
    worker: surety_core::consumer::Worker<S>,
    deliveries: surety_core::DeliveryStream,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<surety_core::consumer::WorkerReport>,
)
where
    S: surety_core::consumer::Handler,
{
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(worker.run(deliveries, async {
        stopped.await.ok();
    }));
    (stop, handle)
}
