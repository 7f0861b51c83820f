//! The broker stops (`rabbitmqctl stop_app`) and starts again while a
//! publisher sends 10,000 messages with confirms.
//!
//! This binary stops the broker, so it holds only tests that may: they run
//! one at a time (a lock) and a guard starts the broker again even when a
//! test fails.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{WAIT, config, connect, unique, url};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use surety_core::{Close, Envelope, Publisher, Subscriber, TransportErrorKind};
use surety_rabbitmq::metrics::PublishOutcome;
use surety_rabbitmq::{RabbitMetrics, queue_name};
use surety_testkit::rabbitmqctl::{self, queue_depth};
use surety_testkit::wait::eventually;

/// Serializes the tests of this binary.
static BROKER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts the broker's application again when dropped, whatever happened.
struct StartAppOnDrop;

impl Drop for StartAppOnDrop {
    fn drop(&mut self) {
        let status = std::process::Command::new("rabbitmqctl")
            .args(["-n", "rabbit@localhost", "start_app"])
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!(
                "could not start RabbitMQ again: run `rabbitmqctl -n rabbit@localhost start_app`"
            );
        }
    }
}

async fn ctl(args: &'static [&'static str]) {
    tokio::task::spawn_blocking(move || rabbitmqctl::run(args))
        .await
        .expect("rabbitmqctl task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_publishes_survive_a_broker_restart() {
    const COUNT: usize = 10_000;
    let Some(url) = url() else { return };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let _serial = BROKER.lock().await;
    let metrics = RabbitMetrics::default();
    let transport = connect(
        config(&url)
            .metrics(metrics.clone())
            .max_in_flight(256)
            .outage_wait(Duration::from_secs(60))
            .confirm_timeout(Duration::from_secs(30))
            // lapin's recovery sometimes stalls after a connection reset:
            // replace the connection sooner than the default 10 s.
            .recovery_stall_timeout(Duration::from_secs(4)),
    )
    .await;
    let topic = unique("outage");
    // Declare and bind the durable queue, then leave it to fill up.
    drop(transport.subscribe(&topic, "g").await.unwrap());

    // The publisher sends without waiting for each confirm. The broker stops
    // once a fifth is confirmed, usually with sends and confirms in flight;
    // the publisher holds at half way until the broker is down, so the
    // second half is sent during the outage or after it.
    let (down_tx, mut down_rx) = tokio::sync::watch::channel(false);
    let confirmed = Arc::new(AtomicUsize::new(0));
    let publisher = {
        let transport = transport.clone();
        let topic = topic.clone();
        let confirmed = confirmed.clone();
        tokio::spawn(async move {
            let mut ok: HashSet<String> = HashSet::new();
            let mut failed: Vec<Envelope> = Vec::new();
            let mut pending = FuturesUnordered::new();
            for n in 0..COUNT {
                if n == COUNT / 2 {
                    down_rx
                        .wait_for(|down| *down)
                        .await
                        .expect("the test stops the broker");
                } else if n > COUNT / 5 && n < COUNT / 2 && n % 5 == 0 {
                    // Pace the second fifth so that the broker usually stops
                    // while sends and confirms are in flight.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let env = Envelope::builder("/test", "test.outage")
                    .payload(n.to_string())
                    .build();
                match transport.send(&topic, env.clone()).await {
                    Ok(confirmation) => pending.push(async move { (env, confirmation.await) }),
                    Err(err) => {
                        assert_ne!(err.kind(), TransportErrorKind::Unroutable);
                        failed.push(env);
                    }
                }
                while let Some(Some((env, result))) =
                    futures::FutureExt::now_or_never(pending.next())
                {
                    record(env, result, &mut ok, &mut failed, &confirmed);
                }
            }
            while let Some((env, result)) = pending.next().await {
                record(env, result, &mut ok, &mut failed, &confirmed);
            }
            (ok, failed)
        })
    };

    eventually(WAIT, "a fifth to be confirmed", || {
        let confirmed = confirmed.clone();
        async move { confirmed.load(Ordering::SeqCst) >= COUNT / 5 }
    })
    .await;
    let restart = StartAppOnDrop;
    ctl(&["stop_app"]).await;
    eventually(WAIT, "the client to notice", || async {
        !transport.connection().status().connected()
    })
    .await;
    down_tx.send(true).unwrap();
    // The outage (every wait while the broker is down is bounded, so that
    // the guard always gets to start it again): sends wait meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    ctl(&["start_app"]).await;
    drop(restart);

    let (mut ok, failed) = tokio::time::timeout(Duration::from_secs(60), publisher)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the publisher did not finish: {transport:?} {:?}",
                transport.connection()
            )
        })
        .expect("publisher task");
    let first_pass = ok.clone();
    assert!(metrics.reconnects() >= 1, "the connection was recovered");
    eprintln!(
        "confirmed {} on the first attempt, {} failed and are published again",
        ok.len(),
        failed.len()
    );
    // Publish again what was not confirmed: at least once, consumers dedup.
    for env in failed {
        let id = env.id.clone();
        transport
            .publish(&topic, env)
            .await
            .expect("publishing works again after the restart");
        ok.insert(id);
    }
    assert_eq!(ok.len(), COUNT);
    assert_eq!(
        metrics.publishes(&topic, PublishOutcome::Confirmed) as usize,
        COUNT,
        "every success was counted as confirmed"
    );

    // Every confirmed message is there.
    let mut stream = transport.subscribe(&topic, "g").await.unwrap();
    let mut missing = ok.clone();
    let mut duplicates = 0;
    while !missing.is_empty() {
        let delivery = tokio::time::timeout(WAIT, stream.next())
            .await
            .unwrap_or_else(|_| panic!("{} confirmed messages never arrived", missing.len()))
            .expect("stream open")
            .expect("delivery");
        if !missing.remove(&delivery.envelope().id) {
            duplicates += 1;
        }
        delivery.ack().await.unwrap();
    }
    assert!(
        first_pass.iter().all(|id| !missing.contains(id)),
        "a message confirmed before the restart was lost"
    );
    // What is left are copies of messages published again: the broker had
    // stored the first attempt but its confirm was lost with the connection.
    let queue = queue_name(&topic, "g");
    let started = std::time::Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_millis(500), stream.next()).await {
            Ok(Some(Ok(delivery))) => {
                assert!(
                    ok.contains(&delivery.envelope().id),
                    "a message nobody published"
                );
                duplicates += 1;
                delivery.ack().await.unwrap();
            }
            _ if queue_depth(&queue) == Some(0) => break,
            _ => assert!(started.elapsed() < WAIT, "the queue did not drain"),
        }
    }
    eprintln!("{duplicates} duplicates (stored, but their confirm was lost with the connection)");
    transport.close().await.unwrap();
}

fn record(
    env: Envelope,
    result: surety_core::Result<surety_core::Receipt>,
    ok: &mut HashSet<String>,
    failed: &mut Vec<Envelope>,
    confirmed: &AtomicUsize,
) {
    match result {
        Ok(_) => {
            ok.insert(env.id);
            confirmed.fetch_add(1, Ordering::SeqCst);
        }
        Err(err) => {
            assert!(
                matches!(
                    err.kind(),
                    TransportErrorKind::Connection | TransportErrorKind::Timeout
                ),
                "unexpected failure: {err}"
            );
            failed.push(env);
        }
    }
}
