//! Helpers shared by the integration tests: the broker's address, unique
//! names, deadlines and `rabbitmqctl`.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use surety_core::{Delivery, DeliveryStream};
use surety_rabbitmq::{RabbitConfig, RabbitTransport};
use surety_testkit::services;

/// How long a test waits for anything that should happen.
pub const WAIT: Duration = Duration::from_secs(20);

/// The broker URL, or `None` (after printing why) when the test is skipped.
pub fn url() -> Option<String> {
    services::require(services::amqp_url())
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    format!("surety-rabbitmq-test.{prefix}.{}", uuid::Uuid::now_v7())
}

/// A config for `url` with a unique connection name and short timeouts.
pub fn config(url: &str) -> RabbitConfig {
    RabbitConfig::new(url)
        .connection_name(unique("conn"))
        .confirm_timeout(Duration::from_secs(15))
        .outage_wait(Duration::from_secs(15))
}

pub async fn connect(config: RabbitConfig) -> RabbitTransport {
    RabbitTransport::connect(config)
        .await
        .expect("connects to RabbitMQ")
}

/// The next delivery, failing the test after [`WAIT`].
pub async fn next(stream: &mut DeliveryStream) -> Delivery {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("a delivery within the deadline")
        .expect("the stream is open")
        .expect("a delivery, not an error")
}

/// Asserts that nothing is delivered for `period`.
pub async fn nothing_for(stream: &mut DeliveryStream, period: Duration) {
    if let Ok(Some(item)) = tokio::time::timeout(period, stream.next()).await {
        panic!(
            "expected no delivery, got {:?}",
            item.map(|d| d.envelope().clone())
        );
    }
}

/// Polls `condition` until it holds, failing after `deadline`.
pub async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = tokio::time::Instant::now();
    loop {
        if condition().await {
            return;
        }
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `rabbitmqctl -n rabbit@localhost args...`, returning stdout.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let output = Command::new("rabbitmqctl")
        .arg("-n")
        .arg("rabbit@localhost")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Closes, on the broker's side, the connections named `name` (their
/// `connection_name` client property); returns how many there were.
pub fn force_close_connection(name: &str) -> usize {
    let listing = rabbitmqctl(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "pid",
        "client_properties",
    ]);
    let mut closed = 0;
    for line in listing.lines().filter(|line| line.contains(name)) {
        if let Some(pid) = line.split_whitespace().next() {
            rabbitmqctl(&["close_connection", pid, "surety test: forced close"]);
            closed += 1;
        }
    }
    closed
}

/// Messages in `queue`, as the broker counts them (ready + unacknowledged).
pub fn queue_depth(queue: &str) -> Option<u64> {
    let listing = rabbitmqctl(&[
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "messages",
    ]);
    listing.lines().find_map(|line| {
        let mut cols = line.split('\t');
        (cols.next()? == queue).then(|| cols.next()?.trim().parse().ok())?
    })
}
