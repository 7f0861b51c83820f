//! The relay on both backends (SQLite, and PostgreSQL from
//! `SURETY_POSTGRES_URL`), publishing through the in-memory transport,
//! with failures injected by the publisher.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use surety_core::memory::MemoryTransport;
use surety_core::retry::Backoff;
use surety_core::{Envelope, Publisher, Subscriber};
use surety_outbox::metrics::OutboxMetrics;
use surety_outbox::{Backlog, Lease, OutboxError, OutboxRow, OutboxStore, Relay};
use surety_testkit::wait::eventually_every;

use common::{
    Fail, Fixture, Flaky, Switch, WAIT, event, numbers_by_key, one_per_key, published_before_marker,
};

/// Runs relay cycles until no row is pending.
async fn drain<F: Fixture, P: Publisher + Clone + 'static>(
    fixture: &F,
    relay: &Relay<F::Store, P>,
) {
    let store = fixture.store();
    eventually_every(
        WAIT,
        Duration::from_millis(2),
        "an empty outbox",
        || async {
            relay.run_once().await.unwrap();
            store.backlog().await.unwrap().pending == 0
        },
    )
    .await;
}

/// Committed rows are published once, with the message as written; a
/// rolled-back transaction publishes nothing.
async fn commit_publishes_and_rollback_does_not(fixture: impl Fixture) {
    let transport = MemoryTransport::new();
    let mut orders = transport.subscribe("orders", "billing").await.unwrap();
    let placed = Envelope::builder("/shop", "order.placed")
        .partition_key("o-1")
        .correlation_id("checkout-1")
        .header("tenant", "acme")
        .payload(r#"{"id":"o-1","total":42}"#)
        .build();
    let paid = event("o-1", 2);
    fixture
        .write(
            &[("orders", placed.clone()), ("orders", paid.clone())],
            true,
        )
        .await;
    let phantom = event("o-2", 1);
    fixture.write(&[("orders", phantom.clone())], false).await;

    let mut registry = surety_core::prometheus_client::registry::Registry::default();
    let metrics = OutboxMetrics::register(&mut registry);
    let relay = Relay::new(fixture.store(), transport.clone()).metrics(metrics.clone());
    // Every outcome is a series before anything happens.
    let mut text = String::new();
    surety_core::prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for series in [
        r#"surety_outbox_relayed_total{relay="default",outcome="parked"} 0"#,
        r#"surety_outbox_parked{relay="default"} 0"#,
        r#"surety_outbox_relay_leader{relay="default"} 0"#,
    ] {
        assert!(text.lines().any(|l| l == series), "{series} in:\n{text}");
    }
    let cycle = relay.run_once().await.unwrap();
    assert!(cycle.leader);
    assert_eq!((cycle.fetched, cycle.sent), (2, 2), "{cycle:?}");
    let again = relay.run_once().await.unwrap();
    assert_eq!(
        (again.fetched, again.sent),
        (0, 0),
        "sent rows are not read again"
    );
    assert_eq!(metrics.relayed_count("default", "sent"), 2);

    let seen = published_before_marker(&transport, "orders", &mut orders).await;
    let ids: Vec<&str> = seen.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, [placed.id.as_str(), paid.id.as_str()]);
    let got = &seen[0];
    assert_eq!(got.event_type, placed.event_type);
    assert_eq!(got.payload, placed.payload);
    assert_eq!(got.partition_key, placed.partition_key);
    assert_eq!(got.correlation_id, placed.correlation_id);
    assert_eq!(got.headers.get("tenant"), Some("acme"));
    let backlog = fixture.store().backlog().await.unwrap();
    assert_eq!((backlog.pending, backlog.parked), (0, 0));
}

/// Sends fail (lost before the broker, or unconfirmed after it), yet every
/// row arrives and each key's rows arrive in the order they were written:
/// a repeat comes right after its first copy, never after a later row.
async fn per_key_order_survives_failed_publishes(fixture: impl Fixture) {
    let transport = MemoryTransport::new();
    let mut orders = transport.subscribe("orders", "billing").await.unwrap();
    let keys = ["a", "b", "c", "d", "e"];
    for chunk in 0..6 {
        let batch: Vec<(&str, Envelope)> = (0..5)
            .flat_map(|i| {
                keys.iter()
                    .map(move |k| ("orders", event(k, chunk * 5 + i)))
            })
            .collect();
        fixture.write(&batch, true).await;
    }
    let publisher = Flaky::new(transport.clone(), |n, _| match n % 7 {
        2 => Some(Fail::Lost),
        5 => Some(Fail::Unconfirmed),
        _ => None,
    });
    let relay = Relay::new(fixture.store(), publisher.clone())
        .batch_size(16)
        .retry_backoff(Backoff::exponential(
            Duration::from_millis(1),
            Duration::from_millis(4),
        ));
    drain(&fixture, &relay).await;

    let seen = published_before_marker(&transport, "orders", &mut orders).await;
    assert!(seen.len() >= 150, "{} deliveries", seen.len());
    for (key, mut numbers) in numbers_by_key(&seen) {
        numbers.dedup();
        assert_eq!(numbers, (0..30).collect::<Vec<_>>(), "key {key}");
    }
    assert!(
        publisher.sends.load(std::sync::atomic::Ordering::SeqCst) > 150,
        "failures were injected"
    );
}

/// One cycle reads the next batch while the current one's confirmations
/// arrive: far more rows than a batch go out in one `run_once`, each once
/// and each key in the order written.
async fn a_cycle_reads_ahead_and_keeps_each_keys_order(fixture: impl Fixture) {
    let transport = MemoryTransport::new();
    let mut orders = transport.subscribe("orders", "billing").await.unwrap();
    let keys = ["a", "b", "c", "d", "e"];
    let batch: Vec<(&str, Envelope)> = (0..20)
        .flat_map(|i| keys.iter().map(move |k| ("orders", event(k, i))))
        .collect();
    fixture.write(&batch, true).await;
    let relay = Relay::new(fixture.store(), transport.clone()).batch_size(32);
    let cycle = relay.run_once().await.unwrap();
    assert!(cycle.fetched > 32, "one read only: {cycle:?}");
    assert_eq!(cycle.sent, cycle.fetched, "{cycle:?}");
    drain(&fixture, &relay).await;

    let seen = published_before_marker(&transport, "orders", &mut orders).await;
    assert_eq!(seen.len(), 100, "each row once");
    for (key, numbers) in numbers_by_key(&seen) {
        assert_eq!(numbers, (0..20).collect::<Vec<_>>(), "key {key}");
    }
}

/// A row the broker cannot take is parked with the reason, and the rest of
/// its key goes on; requeued after the fix, it is published.
async fn a_rejected_row_is_parked_and_requeued(fixture: impl Fixture) {
    let transport = MemoryTransport::new();
    let mut orders = transport.subscribe("orders", "billing").await.unwrap();
    let mut nowhere = transport.subscribe("nowhere", "audit").await.unwrap();
    let fixed = Switch::default();
    let plan_fixed = fixed.clone();
    let publisher = Flaky::new(transport.clone(), move |_, topic| {
        (topic == "nowhere" && !plan_fixed.on()).then_some(Fail::Rejected)
    });
    let (first, lost, third) = (event("k", 1), event("k", 2), event("k", 3));
    fixture
        .write(
            &[
                ("orders", first.clone()),
                ("nowhere", lost.clone()),
                ("orders", third.clone()),
            ],
            true,
        )
        .await;
    let relay = Relay::new(fixture.store(), publisher);
    let mut sent = 0;
    let mut parked = 0;
    for _ in 0..3 {
        let cycle = relay.run_once().await.unwrap();
        sent += cycle.sent;
        parked += cycle.parked;
    }
    assert_eq!((sent, parked), (2, 1));
    let store = fixture.store();
    assert_eq!(store.backlog().await.unwrap().parked, 1);
    let errors = fixture.last_error("parked").await;
    assert_eq!(errors.len(), 1);
    assert!(errors[0].contains("too large"), "{errors:?}");

    let ids: Vec<String> = published_before_marker(&transport, "orders", &mut orders)
        .await
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, [first.id.clone(), third.id.clone()]);

    fixed.set(true);
    assert_eq!(store.requeue_parked().await.unwrap(), 1);
    assert_eq!(relay.run_once().await.unwrap().sent, 1);
    let ids: Vec<String> = published_before_marker(&transport, "nowhere", &mut nowhere)
        .await
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, [lost.id]);
}

/// A stored row that no longer decodes is parked with the reason; the
/// rows after it are published.
async fn a_corrupt_row_is_parked(fixture: impl Fixture) {
    let transport = MemoryTransport::new();
    fixture.write_corrupt("orders").await;
    fixture.write(&[("orders", event("k", 1))], true).await;
    let relay = Relay::new(fixture.store(), transport);
    let cycle = relay.run_once().await.unwrap();
    assert_eq!((cycle.sent, cycle.parked), (1, 1), "{cycle:?}");
    let errors = fixture.last_error("parked").await;
    assert!(errors[0].contains("stored headers"), "{errors:?}");
}

/// Transient failures are retried up to the bound, then the row is parked.
async fn retries_are_bounded_when_asked(fixture: impl Fixture) {
    let transport = MemoryTransport::new();
    let publisher = Flaky::new(transport, |_, _| Some(Fail::Lost));
    fixture.write(&[("orders", event("k", 1))], true).await;
    let relay = Relay::new(fixture.store(), publisher.clone())
        .max_attempts(3)
        .retry_backoff(Backoff::exponential(
            Duration::from_millis(1),
            Duration::from_millis(2),
        ));
    let store = fixture.store();
    eventually_every(
        WAIT,
        Duration::from_millis(2),
        "the row to be parked",
        || async {
            relay.run_once().await.unwrap();
            store.backlog().await.unwrap().parked == 1
        },
    )
    .await;
    assert_eq!(publisher.sends.load(std::sync::atomic::Ordering::SeqCst), 3);
    let errors = fixture.last_error("parked").await;
    assert!(errors[0].contains("connection lost"), "{errors:?}");
}

/// Only the lease holder publishes; a standby takes over when the holder
/// stops (it releases the lease) and when it dies (the lease expires).
async fn one_relay_at_a_time(fixture: impl Fixture) {
    let transport = MemoryTransport::new();
    let a = Relay::new(fixture.store(), transport.clone()).holder("a");
    let b = Relay::new(fixture.store(), transport.clone())
        .holder("b")
        .lease(Duration::from_secs(1));
    fixture.write(&[("orders", event("k", 1))], true).await;
    assert_eq!(a.run_once().await.unwrap().sent, 1);
    fixture.write(&[("orders", event("k", 2))], true).await;
    let standby = b.run_once().await.unwrap();
    assert!(!standby.leader);
    assert_eq!((standby.fetched, standby.sent), (0, 0));

    // A stops: its lease is released and B leads at once.
    a.run(async {}).await;
    let took_over = b.run_once().await.unwrap();
    assert!(took_over.leader);
    assert_eq!(took_over.sent, 1);

    // B dies holding a 1 s lease: a new instance waits, then takes over.
    let a = Relay::new(fixture.store(), transport.clone()).holder("a");
    fixture.write(&[("orders", event("k", 3))], true).await;
    assert!(!a.run_once().await.unwrap().leader, "B's lease still runs");
    let sent = eventually_every(
        WAIT,
        Duration::from_millis(50),
        "A to take over",
        || async {
            let cycle = a.run_once().await.unwrap();
            cycle.leader.then_some(cycle.sent)
        },
    )
    .await;
    assert_eq!(sent, 1);
}

/// `run` publishes rows as they are committed, keeps the gauges fresh, and
/// on shutdown hands the lease over at once.
async fn run_publishes_until_shutdown(fixture: impl Fixture) {
    let transport = MemoryTransport::new();
    let mut orders = transport.subscribe("orders", "billing").await.unwrap();
    let metrics = OutboxMetrics::default();
    let relay = Relay::new(fixture.store(), transport.clone())
        .holder("a")
        .poll_interval(Duration::from_millis(10))
        .metrics(metrics.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(async move {
        stopped.await.ok();
    }));
    for n in 0..20 {
        fixture.write(&[("orders", event("k", n))], true).await;
    }
    let mut numbers = Vec::new();
    while numbers.len() < 20 {
        let delivery = tokio::time::timeout(WAIT, futures::StreamExt::next(&mut orders))
            .await
            .expect("a delivery in time")
            .expect("the stream is open")
            .expect("a delivery");
        numbers.push(delivery.envelope().headers.get("n").unwrap().to_owned());
        delivery.ack().await.unwrap();
    }
    let expected: Vec<String> = (0..20).map(|n| n.to_string()).collect();
    assert_eq!(numbers, expected);
    stop.send(()).ok();
    tokio::time::timeout(WAIT, running)
        .await
        .expect("the relay stops")
        .unwrap();
    assert_eq!(metrics.relayed_count("default", "sent"), 20);
    let next = Relay::new(fixture.store(), transport).holder("b");
    assert!(
        next.run_once().await.unwrap().leader,
        "the lease was released"
    );
}

/// A key whose rows fail holds back only itself: with a batch smaller than
/// its backlog, the other keys' rows are still read and published.
async fn a_failing_key_does_not_hold_back_the_others(fixture: impl Fixture) {
    let transport = MemoryTransport::new();
    let mut orders = transport.subscribe("orders", "billing").await.unwrap();
    let publisher = Flaky::new(transport.clone(), |_, topic| {
        (topic == "down").then_some(Fail::Lost)
    });
    let stuck: Vec<(&str, Envelope)> = (0..8).map(|n| ("down", event("a", n))).collect();
    fixture.write(&stuck, true).await;
    let other = event("b", 0);
    fixture.write(&[("orders", other.clone())], true).await;
    let relay = Relay::new(fixture.store(), publisher)
        .batch_size(8)
        .retry_backoff(Backoff::exponential(
            Duration::from_secs(60),
            Duration::from_secs(60),
        ));
    let mut cycles = Vec::new();
    for _ in 0..3 {
        cycles.push(relay.run_once().await.unwrap());
    }
    let sent: usize = cycles.iter().map(|c| c.sent).sum();
    assert_eq!(sent, 1, "{cycles:?}");
    assert_eq!(
        cycles[0].retried, 1,
        "only the head of the stuck key was tried"
    );
    let ids: Vec<String> = published_before_marker(&transport, "orders", &mut orders)
        .await
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, [other.id]);
    assert_eq!(fixture.store().backlog().await.unwrap().pending, 8);
}

/// A cycle that sends slowly renews its lease as it goes, so a standby
/// polling all along never leads and nothing is published twice.
async fn a_slow_cycle_keeps_its_lease(fixture: impl Fixture) {
    let transport = MemoryTransport::new();
    let mut orders = transport.subscribe("orders", "billing").await.unwrap();
    fixture.write(&one_per_key(10), true).await;
    let slow = Slow(transport.clone());
    let a = Relay::new(fixture.store(), slow.clone())
        .holder("a")
        .lease(Duration::from_secs(1));
    let b = Relay::new(fixture.store(), slow)
        .holder("b")
        .lease(Duration::from_secs(1));
    // A holds the lease before the standby starts polling.
    assert!(
        fixture
            .store()
            .acquire_lease("default", "a", None, Duration::from_secs(1))
            .await
            .unwrap()
            .is_some()
    );
    let cycle = a.run_once();
    let standby = async {
        let mut led = 0;
        let started = tokio::time::Instant::now();
        // Well past the lease: the cycle takes about 10 x 300 ms.
        while started.elapsed() < Duration::from_secs(4) {
            let cycle = b.run_once().await.unwrap();
            led += usize::from(cycle.leader && cycle.sent > 0);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        led
    };
    let (cycle, led) = tokio::join!(cycle, standby);
    assert_eq!(cycle.unwrap().sent, 10);
    assert_eq!(led, 0, "the standby published while the holder was sending");
    let seen = published_before_marker(&transport, "orders", &mut orders).await;
    assert_eq!(seen.len(), 10);
}

/// A publisher whose every send takes 300 ms to be handed over.
#[derive(Clone)]
struct Slow(MemoryTransport);

impl Publisher for Slow {
    async fn send(
        &self,
        topic: &str,
        envelope: Envelope,
    ) -> surety_core::Result<surety_core::Confirmation> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.0.send(topic, envelope).await
    }
}

/// A row the broker cannot route yet (nothing bound to its topic) is
/// retried, not parked: it holds back the later rows of its key, the other
/// keys go on, and once the topic is routable the key resumes in order.
async fn an_unroutable_row_holds_its_key_until_routable(fixture: impl Fixture) {
    let transport = MemoryTransport::new();
    let mut orders = transport.subscribe("orders", "billing").await.unwrap();
    let routable = Switch::default();
    let plan_routable = routable.clone();
    let publisher = Flaky::new(transport.clone(), move |_, topic| {
        (topic == "audit" && !plan_routable.on()).then_some(Fail::Unroutable)
    });
    fixture
        .write(
            &[
                ("orders", event("a", 0)),
                ("audit", event("a", 1)),
                ("orders", event("a", 2)),
                ("orders", event("b", 0)),
            ],
            true,
        )
        .await;
    let relay = Relay::new(fixture.store(), publisher).retry_backoff(Backoff::exponential(
        Duration::from_millis(1),
        Duration::from_millis(2),
    ));
    let store = fixture.store();
    eventually_every(WAIT, Duration::from_millis(2), "two retries", || async {
        relay.run_once().await.unwrap();
        let backlog = store.backlog().await.unwrap();
        backlog.pending == 2 && fixture.last_error("pending").await.len() == 1
    })
    .await;
    assert_eq!(store.backlog().await.unwrap().parked, 0);
    routable.set(true);
    drain(&fixture, &relay).await;
    let seen = published_before_marker(&transport, "orders", &mut orders).await;
    let by_key = numbers_by_key(&seen);
    assert_eq!(by_key["a"], [0, 2]);
    assert_eq!(by_key["b"], [0]);
}

/// A send that finds the broker unreachable ends the cycle's sending: the
/// relay does not wait out a connection timeout for every key in turn.
async fn an_unreachable_broker_ends_the_cycle(fixture: impl Fixture) {
    let publisher = Flaky::new(MemoryTransport::new(), |_, _| Some(Fail::Lost));
    fixture.write(&one_per_key(20), true).await;
    let relay = Relay::new(fixture.store(), publisher.clone());
    let cycle = relay.run_once().await.unwrap();
    assert_eq!((cycle.sent, cycle.retried), (0, 1), "{cycle:?}");
    assert_eq!(publisher.sends.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(fixture.store().backlog().await.unwrap().pending, 20);
}

/// Shutdown during a cycle stops new sends at once; what was sent is
/// awaited and marked sent, the rest stays pending for the next leader.
async fn shutdown_stops_a_cycle_between_sends(fixture: impl Fixture) {
    let transport = MemoryTransport::new();
    let mut orders = transport.subscribe("orders", "billing").await.unwrap();
    fixture.write(&one_per_key(10), true).await;
    let relay = Relay::new(fixture.store(), Slow(transport.clone()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(async move {
        stopped.await.ok();
    }));
    let first = tokio::time::timeout(WAIT, futures::StreamExt::next(&mut orders))
        .await
        .expect("a delivery in time")
        .expect("the stream is open")
        .expect("a delivery");
    first.ack().await.unwrap();
    stop.send(()).ok();
    tokio::time::timeout(WAIT, running)
        .await
        .expect("the relay stops")
        .unwrap();
    let pending = fixture.store().backlog().await.unwrap().pending;
    assert!(
        pending > 0,
        "the cycle did not send all ten rows after shutdown"
    );
    let delivered = 1 + published_before_marker(&transport, "orders", &mut orders)
        .await
        .len();
    assert_eq!(
        delivered as u64 + pending,
        10,
        "every sent row was marked sent"
    );
}

/// Several rows written with one statement come out in order; a batch
/// with an invalid message writes none of its rows.
async fn enqueue_all_writes_every_row_in_order_or_none(fixture: impl Fixture) {
    let transport = MemoryTransport::new();
    let mut orders = transport.subscribe("orders", "billing").await.unwrap();
    let written: Vec<(&str, Envelope)> = (1..=5).map(|n| ("orders", event("o-1", n))).collect();
    fixture.write_all(&written).await.unwrap();
    let refused = fixture
        .write_all(&[("orders", event("o-2", 1)), ("", event("o-2", 2))])
        .await;
    assert!(
        matches!(refused, Err(surety_outbox::OutboxError::InvalidMessage(_))),
        "{refused:?}"
    );
    let relay = Relay::new(fixture.store(), transport.clone());
    let cycle = relay.run_once().await.unwrap();
    assert_eq!((cycle.fetched, cycle.sent), (5, 5), "{cycle:?}");
    let seen = published_before_marker(&transport, "orders", &mut orders).await;
    let ids: Vec<&str> = seen.iter().map(|e| e.id.as_str()).collect();
    let expected: Vec<&str> = written.iter().map(|(_, e)| e.id.as_str()).collect();
    assert_eq!(ids, expected);
}

macro_rules! suite {
    ($backend:ident, $fixture:expr) => {
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn enqueue_all_writes_every_row_in_order_or_none() {
                let Some(fixture) = $fixture else { return };
                super::enqueue_all_writes_every_row_in_order_or_none(fixture).await;
            }

            #[tokio::test]
            async fn commit_publishes_and_rollback_does_not() {
                let Some(fixture) = $fixture else { return };
                super::commit_publishes_and_rollback_does_not(fixture).await;
            }

            #[tokio::test]
            async fn per_key_order_survives_failed_publishes() {
                let Some(fixture) = $fixture else { return };
                super::per_key_order_survives_failed_publishes(fixture).await;
            }

            #[tokio::test]
            async fn a_cycle_reads_ahead_and_keeps_each_keys_order() {
                let Some(fixture) = $fixture else { return };
                super::a_cycle_reads_ahead_and_keeps_each_keys_order(fixture).await;
            }

            #[tokio::test]
            async fn a_rejected_row_is_parked_and_requeued() {
                let Some(fixture) = $fixture else { return };
                super::a_rejected_row_is_parked_and_requeued(fixture).await;
            }

            #[tokio::test]
            async fn a_corrupt_row_is_parked() {
                let Some(fixture) = $fixture else { return };
                super::a_corrupt_row_is_parked(fixture).await;
            }

            #[tokio::test]
            async fn retries_are_bounded_when_asked() {
                let Some(fixture) = $fixture else { return };
                super::retries_are_bounded_when_asked(fixture).await;
            }

            #[tokio::test]
            async fn run_publishes_until_shutdown() {
                let Some(fixture) = $fixture else { return };
                super::run_publishes_until_shutdown(fixture).await;
            }

            #[tokio::test]
            async fn a_failing_key_does_not_hold_back_the_others() {
                let Some(fixture) = $fixture else { return };
                super::a_failing_key_does_not_hold_back_the_others(fixture).await;
            }

            #[tokio::test]
            async fn a_slow_cycle_keeps_its_lease() {
                let Some(fixture) = $fixture else { return };
                super::a_slow_cycle_keeps_its_lease(fixture).await;
            }

            #[tokio::test]
            async fn an_unroutable_row_holds_its_key_until_routable() {
                let Some(fixture) = $fixture else { return };
                super::an_unroutable_row_holds_its_key_until_routable(fixture).await;
            }

            #[tokio::test]
            async fn an_unreachable_broker_ends_the_cycle() {
                let Some(fixture) = $fixture else { return };
                super::an_unreachable_broker_ends_the_cycle(fixture).await;
            }

            #[tokio::test]
            async fn shutdown_stops_a_cycle_between_sends() {
                let Some(fixture) = $fixture else { return };
                super::shutdown_stops_a_cycle_between_sends(fixture).await;
            }

            #[tokio::test]
            async fn one_relay_at_a_time() {
                let Some(fixture) = $fixture else { return };
                super::one_relay_at_a_time(fixture).await;
            }
        }
    };
}

suite!(sqlite, Some(common::Sqlite::new().await));
suite!(postgres, common::Postgres::new().await);

/// A stored column that does not read back (invalid UTF-8 in the headers
/// on SQLite) parks that row with the reason; it does not fail every cycle.
#[tokio::test]
async fn an_unreadable_column_parks_the_row() {
    let fixture = common::Sqlite::new().await;
    sqlx::query(
        "INSERT INTO surety_outbox (message_id, topic, partition_key, headers, payload, created_at, next_attempt_at)
         VALUES ('bad', 'orders', 'k', CAST(X'FFFE' AS TEXT), X'00', 0, 0)",
    )
    .execute(&fixture.0.pool)
    .await
    .unwrap();
    fixture.write(&[("orders", event("k", 1))], true).await;
    let relay = Relay::new(fixture.store(), MemoryTransport::new());
    let cycle = relay.run_once().await.unwrap();
    assert_eq!((cycle.sent, cycle.parked), (1, 1), "{cycle:?}");
    let errors = fixture.last_error("parked").await;
    assert!(errors[0].contains("stored headers"), "{errors:?}");
}

/// A clone is another instance: it does not share the original's lease.
#[tokio::test]
async fn a_clone_competes_for_the_lease() {
    let fixture = common::Sqlite::new().await;
    let relay = Relay::new(fixture.store(), MemoryTransport::new());
    assert!(relay.run_once().await.unwrap().leader);
    assert!(!relay.clone().run_once().await.unwrap().leader);
}

/// A relay that fails to mark its confirmed rows (it crashed, or the
/// database went away between the confirm and the mark) publishes them
/// again, with the same message ids: at least once, never lost.
#[tokio::test]
async fn a_failed_mark_publishes_again_with_the_same_ids() {
    let fixture = common::Sqlite::new().await;
    let transport = MemoryTransport::new();
    let mut orders = transport.subscribe("orders", "billing").await.unwrap();
    fixture.write(&one_per_key(3), true).await;
    let store = MarkFailsOnce {
        inner: fixture.store(),
        failed: Arc::new(AtomicBool::new(false)),
    };
    let relay = Relay::new(store, transport.clone());
    assert!(relay.run_once().await.is_err(), "the mark failed");
    assert_eq!(relay.run_once().await.unwrap().sent, 3);
    let seen = published_before_marker(&transport, "orders", &mut orders).await;
    let ids: Vec<&str> = seen.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), 6, "{ids:?}");
    assert_eq!(ids[..3], ids[3..], "the same messages, again");
    assert_eq!(fixture.store().backlog().await.unwrap().pending, 0);
}

/// A store whose first `mark_sent` fails.
#[derive(Clone)]
struct MarkFailsOnce<S> {
    inner: S,
    failed: Arc<AtomicBool>,
}

impl<S: OutboxStore> OutboxStore for MarkFailsOnce<S> {
    async fn pending(&self, limit: usize) -> Result<Vec<OutboxRow>, OutboxError> {
        self.inner.pending(limit).await
    }

    async fn mark_sent(&self, lease: &Lease, seqs: &[i64]) -> Result<u64, OutboxError> {
        if !self.failed.swap(true, Ordering::SeqCst) {
            return Err(OutboxError::store("the connection was lost"));
        }
        self.inner.mark_sent(lease, seqs).await
    }

    async fn retry_later(
        &self,
        lease: &Lease,
        seq: i64,
        error: &str,
        at: SystemTime,
    ) -> Result<(), OutboxError> {
        self.inner.retry_later(lease, seq, error, at).await
    }

    async fn park(&self, lease: &Lease, seq: i64, error: &str) -> Result<(), OutboxError> {
        self.inner.park(lease, seq, error).await
    }

    async fn acquire_lease(
        &self,
        relay: &str,
        holder: &str,
        held_epoch: Option<i64>,
        lease: Duration,
    ) -> Result<Option<Lease>, OutboxError> {
        self.inner
            .acquire_lease(relay, holder, held_epoch, lease)
            .await
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), OutboxError> {
        self.inner.release_lease(lease).await
    }

    async fn backlog(&self) -> Result<Backlog, OutboxError> {
        self.inner.backlog().await
    }

    async fn requeue_parked(&self) -> Result<u64, OutboxError> {
        self.inner.requeue_parked().await
    }

    async fn purge_sent(&self, older_than: Duration, limit: u64) -> Result<u64, OutboxError> {
        self.inner.purge_sent(older_than, limit).await
    }
}
