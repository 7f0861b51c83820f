//! The relay killed with SIGKILL at random points, again and again, while
//! it relays 10,000 rows from a SQLite file: against RabbitMQ
//! (`SURETY_AMQP_URL`) and a Kafka-protocol broker
//! (`SURETY_KAFKA_BROKERS`).
//!
//! The relay runs in a child process: this test binary again, running only
//! [`child_relay`], which relays when `SURETY_OUTBOX_CRASH_DB` names a
//! database. The parent kills it 20 times at a random moment (seeded:
//! `SURETY_OUTBOX_CRASH_SEED` repeats a run), then lets a last child
//! finish. Afterwards every row arrived at least once, the first copies of
//! each key arrived in the order the rows were written, and the duplicates
//! (counted and printed) stay near the relay's window per kill: confirmed
//! rows are marked as they confirm, so every run makes progress, and each
//! restart retakes its predecessor's lease at once.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use surety_core::{Close, DeliveryStream, Envelope, Subscriber};
use surety_kafka::{KafkaConfig, KafkaTransport};
use surety_outbox::{OutboxStore, Relay, SqliteOutbox};
use surety_rabbitmq::{RabbitConfig, RabbitTransport};
use surety_testkit::process::{Child, Seeded, TestProcess};
use surety_testkit::services;
use surety_testkit::wait::eventually;

use common::{event, first_copies, numbers_by_key};

/// Rows written.
const ROWS: usize = 10_000;

/// Partition keys (each gets `ROWS / KEYS` rows, in order).
const KEYS: usize = 100;

/// Kills before the last child is let finish.
const KILLS: usize = 20;

/// A child runs this long at least, and at most this plus `KILL_SPREAD`,
/// before it is killed.
const KILL_AFTER: Duration = Duration::from_millis(100);
const KILL_SPREAD: u64 = 300;

/// Duplicates one kill may cause at most: the rows in flight (one per key)
/// and the confirmed rows not yet marked (a group of 64), with room.
const DUPLICATES_PER_KILL: usize = 250;

const DB: &str = "SURETY_OUTBOX_CRASH_DB";
const BROKER: &str = "SURETY_OUTBOX_CRASH_BROKER";
const SEED: &str = "SURETY_OUTBOX_CRASH_SEED";

/// A topic or group name no other test (or earlier run) uses.
fn unique(prefix: &str) -> String {
    format!("surety-outbox-test.{prefix}.{}", uuid::Uuid::now_v7())
}

fn kafka_config(brokers: String) -> KafkaConfig {
    KafkaConfig::new(brokers)
        .client_id("surety-outbox-crash")
        .create_missing_topics(3)
        .replication_factor(1)
        .consumer_property("auto.commit.interval.ms", "200")
        .consumer_property("heartbeat.interval.ms", "500")
        .consumer_property("session.timeout.ms", "6000")
        .consumer_property("auto.offset.reset", "earliest")
}

fn rabbit_config(url: String) -> RabbitConfig {
    RabbitConfig::new(url)
        .connection_name(unique("crash"))
        .confirm_timeout(Duration::from_secs(15))
        .outage_wait(Duration::from_secs(15))
}

async fn open(path: &std::path::Path) -> SqlitePool {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .expect("opens the SQLite file")
}

/// The relay process: does nothing unless the parent started it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_relay() {
    let Ok(path) = std::env::var(DB) else { return };
    let broker = std::env::var(BROKER).expect("the parent names the broker");
    let pool = open(std::path::Path::new(&path)).await;
    let store = SqliteOutbox::new(pool);
    let forever = std::future::pending::<()>();
    match broker.as_str() {
        "rabbitmq" => {
            let url = services::amqp_url().expect("the parent found RabbitMQ");
            let transport = RabbitTransport::connect(rabbit_config(url))
                .await
                .expect("connects to RabbitMQ");
            Relay::new(store, transport)
                .name("crash")
                .run(forever)
                .await;
        }
        _ => {
            let brokers = services::kafka_brokers().expect("the parent found Kafka");
            let transport = KafkaTransport::connect(kafka_config(brokers))
                .await
                .expect("connects to Kafka");
            Relay::new(store, transport)
                .name("crash")
                .run(forever)
                .await;
        }
    }
}

/// Writes the rows: key `k{i % KEYS}`, numbered in order per key, in
/// transactions of 500. Returns their ids.
async fn write_rows(pool: &SqlitePool, topic: &str) -> HashSet<String> {
    let mut ids = HashSet::new();
    for chunk in 0..ROWS / 500 {
        let mut tx = pool.begin().await.unwrap();
        for i in chunk * 500..(chunk + 1) * 500 {
            let envelope = event(&format!("k{}", i % KEYS), i / KEYS);
            SqliteOutbox::enqueue(&mut tx, topic, &envelope)
                .await
                .unwrap();
            ids.insert(envelope.id);
        }
        tx.commit().await.unwrap();
    }
    ids
}

fn spawn_child(broker: &str, path: &std::path::Path) -> Child {
    TestProcess::new("child_relay")
        .env(DB, path)
        .env(BROKER, broker)
        .spawn()
        .expect("starts the relay process")
}

/// Reads until every id in `expected` arrived and then nothing more for a
/// while (the duplicates come too); returns everything, in arrival order.
async fn read_all(stream: &mut DeliveryStream, expected: &HashSet<String>) -> Vec<Envelope> {
    let mut missing = expected.clone();
    let mut seen = Vec::new();
    loop {
        let idle = if missing.is_empty() {
            Duration::from_secs(3)
        } else {
            Duration::from_secs(60)
        };
        let Ok(next) = tokio::time::timeout(idle, stream.next()).await else {
            assert!(missing.is_empty(), "{} rows never arrived", missing.len());
            return seen;
        };
        let delivery = next.expect("the stream is open").expect("a delivery");
        let envelope = delivery.envelope().clone();
        delivery.ack().await.unwrap();
        missing.remove(&envelope.id);
        seen.push(envelope);
    }
}

async fn crash_loop<F, Fut>(broker: &str, topic: &str, read: F)
where
    F: FnOnce(HashSet<String>) -> Fut,
    Fut: std::future::Future<Output = Vec<Envelope>>,
{
    let mut rng = Seeded::from_env(SEED);
    println!("{broker}: {SEED}={}", rng.seed());

    let dir = std::env::temp_dir().join(format!("surety-crash-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("outbox.db");
    let pool = open(&path).await;
    surety_outbox::sqlite::migrate(&pool).await.unwrap();
    let expected = write_rows(&pool, topic).await;
    let store = SqliteOutbox::new(pool.clone());

    let mut left = Vec::new();
    for _ in 0..KILLS {
        let mut child = spawn_child(broker, &path);
        let after = KILL_AFTER + Duration::from_millis(rng.below(KILL_SPREAD));
        tokio::time::sleep(after).await;
        child.kill().await.expect("SIGKILL");
        left.push(store.backlog().await.unwrap().pending);
    }
    println!("{broker}: rows pending after each kill: {left:?}");
    // A last child finishes the rows.
    let mut child = spawn_child(broker, &path);
    eventually(
        Duration::from_secs(120),
        "the last relay to finish",
        || async { store.backlog().await.unwrap().pending == 0 },
    )
    .await;
    child.kill().await.expect("SIGKILL");

    let seen = read(expected.clone()).await;
    let strangers = seen.iter().filter(|e| !expected.contains(&e.id)).count();
    assert_eq!(strangers, 0, "messages that were never written");
    let mut copies: HashMap<&str, usize> = HashMap::new();
    for envelope in &seen {
        *copies.entry(envelope.id.as_str()).or_default() += 1;
    }
    let duplicates = seen.len() - expected.len();
    let most = copies.values().copied().max().unwrap_or(0);
    println!(
        "{broker}: {} deliveries of {ROWS} rows: {duplicates} duplicates over {KILLS} kills, \
         at most {most} copies of one row",
        seen.len()
    );
    let firsts = first_copies(seen);
    assert_eq!(firsts.len(), ROWS, "every row arrived");
    for (key, numbers) in numbers_by_key(&firsts) {
        assert_eq!(
            numbers,
            (0..ROWS / KEYS).collect::<Vec<_>>(),
            "the first copies of key {key}, in arrival order"
        );
    }
    assert!(
        duplicates <= KILLS * DUPLICATES_PER_KILL,
        "{duplicates} duplicates over {KILLS} kills"
    );
    assert!(
        most <= 6,
        "a row was published {most} times: the relay did not make progress between kills"
    );
    pool.close().await;
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_relay_killed_twenty_times_loses_nothing() {
    if std::env::var(DB).is_ok() {
        return;
    }
    let Some(url) = services::require(services::amqp_url()) else {
        return;
    };
    let transport = RabbitTransport::connect(rabbit_config(url))
        .await
        .expect("connects to RabbitMQ");
    let topic = unique("crash");
    // The group's queue exists before anything is published.
    let mut stream = transport.subscribe(&topic, "billing").await.unwrap();
    crash_loop("rabbitmq", &topic, |expected| async move {
        read_all(&mut stream, &expected).await
    })
    .await;
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_relay_killed_twenty_times_loses_nothing() {
    if std::env::var(DB).is_ok() {
        return;
    }
    let Some(brokers) = services::require(services::kafka_brokers()) else {
        return;
    };
    let transport = KafkaTransport::connect(kafka_config(brokers))
        .await
        .expect("connects to Kafka");
    let topic = unique("crash");
    // Creates the topic with its partitions; what the relay published is
    // read back afterwards from the start of the log, with positions kept
    // here (the log subscription repairs a broker fetch that skips past a
    // requested offset, which tansu does when a fetch starts inside a batch).
    drop(transport.subscribe(&topic, &unique("setup")).await.unwrap());
    let reader = transport.clone();
    let log_topic = topic.clone();
    crash_loop("kafka", &topic, |expected| async move {
        read_log(&reader, &log_topic, &expected).await
    })
    .await;
    transport.close().await.unwrap();
}

/// Reads `topic` from the earliest offset of every partition until every id
/// in `expected` arrived and every partition caught up; returns every
/// record, in arrival order per partition.
async fn read_log(
    transport: &KafkaTransport,
    topic: &str,
    expected: &HashSet<String>,
) -> Vec<Envelope> {
    use surety_core::log::{LogEvent, LogOptions, LogSubscriber, StartPosition};

    let mut stream = transport
        .subscribe_log(
            topic,
            &unique("check"),
            LogOptions::start(StartPosition::Earliest),
        )
        .await
        .unwrap();
    let mut missing = expected.clone();
    let mut seen = Vec::new();
    let mut behind: HashSet<i32> = HashSet::new();
    let mut assigned = false;
    while !(assigned && behind.is_empty() && missing.is_empty()) {
        let event = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .unwrap_or_else(|_| panic!("{} rows never arrived", missing.len()))
            .expect("the stream is open")
            .expect("an event");
        match event {
            LogEvent::Assigned(assignment) => {
                assigned = true;
                behind.extend(assignment.partition_numbers());
            }
            LogEvent::Record(record) => {
                missing.remove(&record.envelope().id);
                seen.push(record.envelope().clone());
            }
            LogEvent::CaughtUp { partition, .. } => {
                behind.remove(&partition);
            }
            _ => {}
        }
    }
    seen
}
