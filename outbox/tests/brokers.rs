//! The relay against the real brokers, with the SQLite store: RabbitMQ
//! (`SURETY_AMQP_URL`: publisher confirms, mandatory publishes returned
//! when no queue is bound) and a Kafka-protocol broker
//! (`SURETY_KAFKA_BROKERS`: keyed records spread over partitions).

mod common;

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use surety_core::retry::Backoff;
use surety_core::{Close, DeliveryInfo, Envelope, Publisher, Subscriber};
use surety_kafka::{KafkaConfig, KafkaTransport};
use surety_outbox::metrics::OutboxMetrics;
use surety_outbox::{OutboxStore, Relay, SqliteOutbox};
use surety_rabbitmq::{RabbitConfig, RabbitTransport};
use surety_testkit::rabbitmq::Cleanup;
use surety_testkit::services;
use surety_testkit::wait::eventually_every;

use common::{Fixture, WAIT, event, first_copies, numbers_by_key, until_all};

/// The partition keys of the orders: few, so each has a long sequence.
const KEYS: [&str; 4] = ["order-1", "order-2", "order-3", "order-4"];

/// Events written per key.
const PER_KEY: usize = 50;

/// A topic or group name no other test (or earlier run) uses.
fn unique(prefix: &str) -> String {
    format!("surety-outbox-test.{prefix}.{}", uuid::Uuid::now_v7())
}

async fn rabbit(url: &str) -> RabbitTransport {
    let config = RabbitConfig::new(url)
        .connection_name(unique("conn"))
        .confirm_timeout(Duration::from_secs(15))
        .outage_wait(Duration::from_secs(15));
    RabbitTransport::connect(config)
        .await
        .expect("connects to RabbitMQ")
}

/// Writes events 0..[`PER_KEY`] of every key to `topic`, `per_tx` events
/// of each key per transaction, the keys interleaved; `extra` goes into
/// the middle transaction. Returns the ids written to `topic`.
async fn write_orders(
    fixture: &common::Sqlite,
    topic: &str,
    per_tx: usize,
    mut extra: Option<(&str, Envelope)>,
) -> HashSet<String> {
    let mut ids = HashSet::new();
    let transactions = PER_KEY / per_tx;
    for chunk in 0..transactions {
        let mut batch: Vec<(&str, Envelope)> = (0..per_tx)
            .flat_map(|i| {
                KEYS.iter()
                    .map(move |k| (topic, event(k, chunk * per_tx + i)))
            })
            .collect();
        ids.extend(batch.iter().map(|(_, envelope)| envelope.id.clone()));
        if chunk == transactions / 2
            && let Some(extra) = extra.take()
        {
            batch.insert(batch.len() / 2, extra);
        }
        fixture.write(&batch, true).await;
    }
    ids
}

/// What the relay's cycles did, added up.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    cycles: usize,
    sent: usize,
    retried: usize,
    parked: usize,
}

/// Runs relay cycles until no row is pending; returns what they did.
async fn drain<P: Publisher + Clone + 'static>(relay: &Relay<SqliteOutbox, P>) -> Totals {
    let totals = Cell::new(Totals::default());
    eventually_every(
        WAIT,
        Duration::from_millis(2),
        "an empty outbox",
        || async {
            let cycle = relay.run_once().await.unwrap();
            assert!(cycle.leader, "the only relay holds the lease");
            let mut sum = totals.get();
            sum.cycles += 1;
            sum.sent += cycle.sent;
            sum.retried += cycle.retried;
            sum.parked += cycle.parked;
            totals.set(sum);
            relay.store().backlog().await.unwrap().pending == 0
        },
    )
    .await;
    totals.get()
}

/// Asserts that exactly the messages `expected` arrived (repeats allowed)
/// and that each key's first copies came in the order they were written.
fn assert_complete_and_in_order(seen: &[(Envelope, DeliveryInfo)], expected: &HashSet<String>) {
    let strangers: Vec<&str> = seen
        .iter()
        .map(|(envelope, _)| envelope.id.as_str())
        .filter(|id| !expected.contains(*id))
        .collect();
    assert!(strangers.is_empty(), "unexpected messages: {strangers:?}");
    let firsts = first_copies(seen.iter().map(|(envelope, _)| envelope.clone()));
    assert_eq!(firsts.len(), expected.len());
    let by_key = numbers_by_key(&firsts);
    assert_eq!(by_key.len(), KEYS.len(), "{:?}", by_key.keys());
    for (key, numbers) in by_key {
        assert_eq!(
            numbers,
            (0..PER_KEY).collect::<Vec<_>>(),
            "the events of key {key}, in arrival order"
        );
    }
}

/// RabbitMQ: every committed row is published and confirmed once and each
/// key's rows arrive in the order they were written. A row for a topic no
/// queue is bound to is returned by the broker: it is retried, holding back
/// only the later rows of its key, and once a queue is bound it is
/// published, followed by the rest of its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_relays_in_key_order_and_holds_a_key_behind_an_unroutable_row() {
    let Some(url) = services::require(services::amqp_url()) else {
        return;
    };
    let transport = rabbit(&url).await;
    let topic = unique("orders");
    let nowhere = unique("nowhere");
    let _cleanup = Cleanup::new(&url)
        .queue(format!("{topic}.billing"))
        .queue(format!("{nowhere}.audit"));
    let mut orders = transport.subscribe(&topic, "billing").await.unwrap();

    let fixture = common::Sqlite::new().await;
    let lost = event(KEYS[1], 999);
    let expected = write_orders(&fixture, &topic, 5, Some((&nowhere, lost.clone()))).await;
    assert_eq!(expected.len(), KEYS.len() * PER_KEY);
    let metrics = OutboxMetrics::default();
    let relay = Relay::new(fixture.store(), transport.clone())
        .batch_size(64)
        .retry_backoff(Backoff::exponential(
            Duration::from_millis(10),
            Duration::from_millis(50),
        ))
        .metrics(metrics.clone());

    // Until a queue is bound, only the key of the unroutable row waits:
    // its later rows stay pending, everything else is sent.
    let pool = &fixture.0.pool;
    let lost_id = lost.id.as_str();
    let held = |after_lost: bool| async move {
        let sql = if after_lost {
            "SELECT COUNT(*) FROM surety_outbox WHERE partition_key = $1 AND seq > \
             (SELECT seq FROM surety_outbox WHERE message_id = $2)"
        } else {
            "SELECT COUNT(*) FROM surety_outbox WHERE status = 'pending' AND partition_key = $1 \
             AND seq >= (SELECT seq FROM surety_outbox WHERE message_id = $2)"
        };
        let count: i64 = sqlx::query_scalar(sql)
            .bind(KEYS[1])
            .bind(lost_id)
            .fetch_one(pool)
            .await
            .unwrap();
        count as u64
    };
    let behind = held(true).await;
    assert!(behind > 0, "the unroutable row has later rows of its key");
    eventually_every(
        WAIT,
        Duration::from_millis(2),
        "only the held key left",
        || async {
            relay.run_once().await.unwrap();
            let backlog = relay.store().backlog().await.unwrap();
            backlog.pending == behind + 1 && metrics.relayed_count("default", "retried") >= 2
        },
    )
    .await;
    assert_eq!(
        held(false).await,
        behind + 1,
        "the held rows are the lost one and its followers"
    );
    let errors = fixture.last_error("pending").await;
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].contains("no queue is bound") && errors[0].contains(&nowhere),
        "the waiting row says why: {errors:?}"
    );
    assert_eq!(relay.store().backlog().await.unwrap().parked, 0);

    // Bind a queue: the row goes out, then the rest of its key.
    let mut audit = transport.subscribe(&nowhere, "audit").await.unwrap();
    let totals = drain(&relay).await;
    assert_eq!(totals.parked, 0, "{totals:?}");
    assert_eq!(
        metrics.relayed_count("default", "sent"),
        expected.len() as u64 + 1
    );
    let seen = until_all(&mut orders, &expected).await;
    assert_complete_and_in_order(&seen, &expected);
    assert!(
        seen.iter().all(|(_, info)| info.topic == topic),
        "everything came from {topic}"
    );
    let late = until_all(&mut audit, &HashSet::from([lost.id.clone()])).await;
    assert_eq!(late[0].0.id, lost.id);

    drop(orders);
    drop(audit);
    transport.close().await.unwrap();
}

/// Kafka: the rows of four keys, relayed to a topic of three partitions,
/// all arrive; each key stays on one partition and its rows arrive in the
/// order they were written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_relays_in_key_order_across_partitions() {
    let Some(brokers) = services::require(services::kafka_brokers()) else {
        return;
    };
    let config = KafkaConfig::new(brokers)
        .client_id("surety-outbox-tests")
        .create_missing_topics(3)
        .replication_factor(1)
        .statistics_interval(Some(Duration::from_millis(200)))
        .consumer_property("auto.commit.interval.ms", "200")
        .consumer_property("heartbeat.interval.ms", "500")
        .consumer_property("session.timeout.ms", "6000")
        // The adapter's default, spelled out: a new group reads from the
        // start, so nothing relayed before the assignment is skipped.
        .consumer_property("auto.offset.reset", "earliest");
    let transport = KafkaTransport::connect(config)
        .await
        .expect("connects to Kafka");
    let topic = unique("orders");
    // Creates the topic, with its three partitions, and joins the group.
    let mut orders = transport
        .subscribe(&topic, &unique("billing"))
        .await
        .unwrap();

    let fixture = common::Sqlite::new().await;
    let expected = write_orders(&fixture, &topic, 5, None).await;
    let relay = Relay::new(fixture.store(), transport.clone());
    let totals = drain(&relay).await;
    assert_eq!(
        (totals.sent, totals.parked),
        (expected.len(), 0),
        "{totals:?}"
    );
    let backlog = fixture.store().backlog().await.unwrap();
    assert_eq!((backlog.pending, backlog.parked), (0, 0), "{backlog:?}");

    let seen = until_all(&mut orders, &expected).await;
    assert_complete_and_in_order(&seen, &expected);
    let mut partitions: HashMap<String, HashSet<i32>> = HashMap::new();
    for (envelope, info) in &seen {
        let key = envelope.partition_key.clone().expect("a keyed record");
        let partition = info.partition.expect("Kafka names the partition");
        partitions.entry(key).or_default().insert(partition);
    }
    for (key, on) in &partitions {
        assert_eq!(on.len(), 1, "key {key} was spread over partitions {on:?}");
    }
    let used: HashSet<i32> = partitions.values().flatten().copied().collect();
    assert!(used.len() > 1, "the keys all landed on partitions {used:?}");

    drop(orders);
    transport.close().await.unwrap();
}

/// RabbitMQ: `run` publishes rows as transactions commit while it runs;
/// on shutdown every row is confirmed and marked sent, and the lease is
/// handed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_run_relays_while_rows_are_written() {
    let Some(url) = services::require(services::amqp_url()) else {
        return;
    };
    let transport = rabbit(&url).await;
    let topic = unique("orders");
    let _cleanup = Cleanup::new(&url).queue(format!("{topic}.billing"));
    let mut orders = transport.subscribe(&topic, "billing").await.unwrap();

    let fixture = common::Sqlite::new().await;
    let metrics = OutboxMetrics::default();
    let relay = Relay::new(fixture.store(), transport.clone())
        .holder("a")
        .poll_interval(Duration::from_millis(10))
        .metrics(metrics.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(async move {
        stopped.await.ok();
    }));
    // 25 transactions committed while the relay runs.
    let expected = write_orders(&fixture, &topic, 2, None).await;

    let seen = until_all(&mut orders, &expected).await;
    assert_complete_and_in_order(&seen, &expected);
    stop.send(()).ok();
    tokio::time::timeout(WAIT, running)
        .await
        .expect("the relay stops")
        .unwrap();
    let backlog = fixture.store().backlog().await.unwrap();
    assert_eq!(
        (backlog.pending, backlog.parked),
        (0, 0),
        "every row was marked sent before the relay stopped: {backlog:?}"
    );
    assert_eq!(
        metrics.relayed_count("default", "sent"),
        expected.len() as u64
    );
    assert_eq!(metrics.relayed_count("default", "retried"), 0);
    let next = Relay::new(fixture.store(), transport.clone()).holder("b");
    assert!(
        next.run_once().await.unwrap().leader,
        "the lease was released"
    );

    drop(orders);
    transport.close().await.unwrap();
}
