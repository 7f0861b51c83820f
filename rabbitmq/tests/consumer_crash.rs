//! A consumer process killed with SIGKILL while it holds unacknowledged
//! deliveries: the broker delivers them to the next consumer.
//!
//! The crashing consumer is this test binary run again with
//! [`CHILD`] set, so that it runs only [`child_consumer_holds_deliveries`].

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{WAIT, cleanup, config, connect, next, unique, url};
use surety_core::{Close, Envelope, Publisher, Subscriber};
use surety_testkit::services;

/// Set in the child: `topic|group|count`.
const CHILD: &str = "SURETY_RABBITMQ_CRASH_CHILD";
/// What the child prints once it holds its deliveries.
const HOLDING: &str = "surety-child: holding";

/// In the child: take `count` deliveries, never settle them, and wait to be
/// killed. Run only by the parent test, as a child process; run on its own
/// (`--include-ignored`) it skips, or fails under
/// `SURETY_REQUIRE_SERVICES`, rather than pass without testing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs only as the child process of deliveries_held_by_a_killed_consumer_are_redelivered"]
async fn child_consumer_holds_deliveries() {
    let Some(spec) = services::require(services::var(CHILD)) else {
        return;
    };
    let Some(url) = url() else { return };
    let mut parts = spec.split('|');
    let (Some(topic), Some(group), Some(count)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("bad {CHILD}: {spec}");
    };
    let count: usize = count.parse().expect("a count");
    let transport = connect(config(&url)).await;
    let mut stream = transport.subscribe(topic, group).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..count {
        held.push(next(&mut stream).await);
    }
    println!("{HOLDING} {}", held.len());
    // The parent kills this process; the sleep only bounds an orphan.
    tokio::time::sleep(Duration::from_secs(60)).await;
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_held_by_a_killed_consumer_are_redelivered() {
    const COUNT: usize = 10;
    if std::env::var(CHILD).is_ok() {
        return;
    }
    let Some(url) = url() else { return };
    let transport = connect(config(&url)).await;
    let topic = unique("crash");
    let _cleanup = cleanup(&url, &topic, &["g"]);
    drop(transport.subscribe(&topic, "g").await.unwrap());
    let mut ids = HashSet::new();
    for n in 0..COUNT {
        let env = Envelope::builder("/test", "test.crash")
            .payload(n.to_string())
            .build();
        ids.insert(env.id.clone());
        transport.publish(&topic, env).await.unwrap();
    }

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_consumer_holds_deliveries",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD, format!("{topic}|g|{COUNT}"))
        .env(services::AMQP_URL, &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the child starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let reader = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.starts_with(HOLDING))
    });
    let holding = tokio::time::timeout(WAIT, reader).await;
    if !matches!(holding, Ok(Ok(true))) {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the child never held the deliveries: {holding:?}");
    }
    // SIGKILL: no clean-up, no nack, the socket just closes.
    child.kill().expect("SIGKILL");
    let status = child.wait().unwrap();
    assert!(!status.success(), "the child was killed");

    let mut stream = transport.subscribe(&topic, "g").await.unwrap();
    while !ids.is_empty() {
        let delivery = next(&mut stream).await;
        assert!(ids.remove(&delivery.envelope().id), "delivered twice");
        assert!(
            delivery.info().redelivered,
            "the broker knows it delivered it before"
        );
        delivery.ack().await.unwrap();
    }
    transport.close().await.unwrap();
}
