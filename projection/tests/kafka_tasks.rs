//! The runner on the real Kafka-protocol broker, in one process: two runner
//! tasks (each with its own connection) share a topic's partitions, one is
//! aborted mid-batch (its consumer leaves the group as a stopping process
//! does),
//! and the read model equals the fold of the log; then the read model is
//! rebuilt into a shadow version while new events arrive, promoted, and the
//! promoted version equals the from-scratch fold.
//!
//! `SURETY_PROJECTION_KAFKA_EVENTS` sets the size of the log (default
//! 100,000).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::{Sqlite, SqlitePool, Transaction};
use surety_core::{Close, Envelope, HandlerError, Message, Publisher, Subscriber};
use surety_kafka::{KafkaConfig, KafkaTransport};
use surety_projection::{
    Applied, Projection, Rebuild, Runner, RunnerOptions, SqliteCheckpoints, VersionStore,
    versioned_name,
};
use surety_testkit::db::TempSqlite;
use surety_testkit::services;
use surety_testkit::wait::eventually;

const DEADLINE: Duration = Duration::from_secs(240);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Added {
    order_id: String,
    amount: i64,
    seq: i64,
}

impl Message for Added {
    const TYPE: &'static str = "test.order.added";
}

/// Totals per order, with the count of events, in `totals_v{version}`.
struct Totals {
    table: String,
}

impl Projection<Sqlite> for Totals {
    type Event = Added;

    fn name(&self) -> &str {
        "totals"
    }

    async fn apply(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        event: &Applied<Added>,
    ) -> Result<(), HandlerError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {} (order_id, total, events, last_seq) VALUES ($1, $2, 1, $3)
             ON CONFLICT (order_id) DO UPDATE SET total = total + excluded.total,
                 events = events + 1, last_seq = excluded.last_seq",
            self.table
        )))
        .bind(&event.event.order_id)
        .bind(event.event.amount)
        .bind(event.event.seq)
        .execute(&mut **tx)
        .await
        .map_err(HandlerError::transient)?;
        Ok(())
    }
}

type Model = BTreeMap<String, (i64, i64, i64)>;

async fn table(pool: &SqlitePool, version: u32) -> Model {
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT order_id, total, events, last_seq FROM totals_v{version}"
    )))
    .fetch_all(pool)
    .await
    .expect("the read model");
    rows.into_iter()
        .map(|(k, t, e, s)| (k, (t, e, s)))
        .collect()
}

fn config(brokers: &str) -> KafkaConfig {
    KafkaConfig::new(brokers)
        .client_id("surety-projection-test")
        .create_missing_topics(4)
        .replication_factor(1)
        .consumer_property("heartbeat.interval.ms", "500")
        .consumer_property("session.timeout.ms", "6000")
}

async fn publish(
    transport: &KafkaTransport,
    topic: &str,
    range: std::ops::Range<i64>,
    expected: &mut Model,
) {
    let mut confirmations = Vec::new();
    for seq in range {
        let order_id = format!("o-{}", seq % 97);
        let entry = expected.entry(order_id.clone()).or_insert((0, 0, 0));
        entry.0 += seq % 1000;
        entry.1 += 1;
        entry.2 = seq;
        let envelope = Envelope::message(
            "/test",
            &Added {
                order_id: order_id.clone(),
                amount: seq % 1000,
                seq,
            },
        )
        .expect("an envelope")
        .partition_key(order_id.as_str())
        .build();
        confirmations.push(transport.publish(topic, envelope));
        if confirmations.len() >= 1000 {
            for result in futures::future::join_all(confirmations.drain(..)).await {
                result.expect("published");
            }
        }
    }
    for result in futures::future::join_all(confirmations).await {
        result.expect("published");
    }
}

fn runner(
    transport: KafkaTransport,
    topic: &str,
    version: u32,
    store: &SqliteCheckpoints,
) -> Runner<KafkaTransport, Totals, SqliteCheckpoints> {
    Runner::new(
        transport,
        topic,
        format!("{topic}.totals@v{version}"),
        Totals {
            table: format!("totals_v{version}"),
        },
        store.clone(),
    )
    .options(
        RunnerOptions::default()
            .batch(500, Duration::from_millis(50))
            .checkpoint_name(versioned_name("totals", version)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_tasks_share_partitions_survive_an_abort_and_rebuild_a_large_log_on_kafka() {
    let Some(brokers) = services::require(services::kafka_brokers()) else {
        return;
    };
    let events: i64 = std::env::var("SURETY_PROJECTION_KAFKA_EVENTS")
        .ok()
        .and_then(|n| i64::from_str(&n).ok())
        .unwrap_or(100_000);
    let topic = format!("surety-projection-test.{}", uuid::Uuid::now_v7());
    let db = TempSqlite::new(4, Duration::from_secs(30)).await;
    surety_projection::sqlite::migrate(&db.pool)
        .await
        .expect("migrations");
    for version in 1..=2 {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE totals_v{version} (order_id TEXT PRIMARY KEY, total INTEGER NOT NULL,
             events INTEGER NOT NULL, last_seq INTEGER NOT NULL)"
        )))
        .execute(&db.pool)
        .await
        .expect("a read model table");
    }
    let store = SqliteCheckpoints::new(db.pool.clone());
    let producer = KafkaTransport::connect(config(&brokers))
        .await
        .expect("connects");
    let mut expected = Model::new();
    // Creates the topic with its partitions before anyone joins.
    drop(
        producer
            .subscribe(&topic, &format!("{topic}.setup"))
            .await
            .expect("the topic"),
    );
    publish(&producer, &topic, 0..events, &mut expected).await;

    // Two runners of version 1 share the partitions; one is killed while
    // it applies.
    let first = KafkaTransport::connect(config(&brokers))
        .await
        .expect("connects");
    let second = KafkaTransport::connect(config(&brokers))
        .await
        .expect("connects");
    let killed = runner(first.clone(), &topic, 1, &store);
    let killed_status = killed.status();
    let killed = tokio::spawn(killed.run());
    let survivor = tokio::spawn(runner(second.clone(), &topic, 1, &store).run());
    eventually(DEADLINE, "the first runner to apply a batch", || async {
        killed_status.batches() > 0
    })
    .await;
    killed.abort();
    let _ = killed.await;
    first.close().await.expect("closed");
    eventually(DEADLINE, "version 1 to equal the fold", || async {
        table(&db.pool, 1).await == expected
    })
    .await;

    // Rebuild version 2 while new events arrive and version 1 serves them.
    let rebuild = {
        let transport = KafkaTransport::connect(config(&brokers))
            .await
            .expect("connects");
        let topic = topic.clone();
        let store = store.clone();
        tokio::spawn(async move {
            let version = Rebuild::new(transport.clone(), topic, "totals", store)
                .options(RunnerOptions::default().batch(2000, Duration::from_millis(100)))
                .lag_threshold(500)
                .run(
                    "totals",
                    |v| Totals {
                        table: format!("totals_v{v}"),
                    },
                    |p| {
                        println!(
                            "rebuild v{}: {} applied, {} left, {:.0} events/s, eta {:?}",
                            p.version, p.applied, p.remaining, p.events_per_second, p.eta
                        );
                    },
                )
                .await;
            transport.close().await.expect("closed");
            version
        })
    };
    publish(&producer, &topic, events..events + 2000, &mut expected).await;
    assert_eq!(store.versions("totals").await.expect("versions").live, 1);
    let version = tokio::time::timeout(DEADLINE, rebuild)
        .await
        .expect("the rebuild to finish")
        .expect("the rebuild task")
        .expect("the rebuild");
    assert_eq!(version, 2);
    assert_eq!(store.versions("totals").await.expect("versions").live, 2);

    // The promoted version's live runner resumes where the rebuild stopped.
    let live = KafkaTransport::connect(config(&brokers))
        .await
        .expect("connects");
    let promoted = tokio::spawn(runner(live.clone(), &topic, 2, &store).run());
    eventually(
        DEADLINE,
        "version 2 to equal the from-scratch fold",
        || async { table(&db.pool, 2).await == expected },
    )
    .await;
    assert_eq!(table(&db.pool, 1).await, expected);
    assert!(
        !survivor.is_finished() && !promoted.is_finished(),
        "a runner stopped"
    );
    survivor.abort();
    promoted.abort();
    let _ = (survivor.await, promoted.await);
    second.close().await.expect("closed");
    live.close().await.expect("closed");
    producer.close().await.expect("closed");
    delete_topic(&brokers, &topic).await;
}

/// Deletes the test's topic (a failure is printed, never a panic).
async fn delete_topic(brokers: &str, topic: &str) {
    use surety_kafka::rdkafka::ClientConfig;
    use surety_kafka::rdkafka::admin::{AdminClient, AdminOptions};
    use surety_kafka::rdkafka::client::DefaultClientContext;

    let admin: Result<AdminClient<DefaultClientContext>, _> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create();
    let Ok(admin) = admin else {
        eprintln!("could not delete {topic}: no admin client");
        return;
    };
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    match tokio::time::timeout(
        Duration::from_secs(15),
        admin.delete_topics(&[topic], &options),
    )
    .await
    {
        Ok(Ok(_)) => {}
        other => eprintln!("could not delete {topic}: {other:?}"),
    }
}
