//! The runner on the real Kafka-protocol broker: two runner processes
//! share a topic's partitions as one consumer group, one is killed with
//! SIGKILL while it applies, and the read model equals the fold of the log;
//! then the read model is rebuilt into a shadow version while new events
//! arrive, promoted, and the promoted version equals the from-scratch fold.
//!
//! The killed process is then restarted, as a supervisor would; the group
//! rebalances and the read model equals the fold of the log.
//!
//! The runner processes are this test binary again, running only
//! [`child_runner`], which works when `SURETY_PROJECTION_KAFKA_CHILD_DB`
//! names the database (see `surety_testkit::process`).
//!
//! `SURETY_PROJECTION_KAFKA_EVENTS` sets the size of the log (default
//! 100,000).
//!
//! On tansu 0.6 the killed process is restarted only once the survivor has
//! logged the rejoin that follows the dead member's expiry; restarted
//! earlier, the new member can leave part of the log assigned to the dead
//! one for good (ADR 0017). `SURETY_PROJECTION_KAFKA_SHOW_CHILDREN=1`
//! shows the runner processes' logs (assignments, revocations).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{Sqlite, SqlitePool, Transaction};
use surety_core::{Close, Envelope, HandlerError, Message, Publisher, Subscriber};
use surety_kafka::{KafkaConfig, KafkaTransport};
use surety_projection::{
    Applied, Projection, Rebuild, Runner, RunnerOptions, SqliteCheckpoints, VersionStore,
    versioned_name,
};
use surety_testkit::db::TempSqlite;
use surety_testkit::process::{TestProcess, role};
use surety_testkit::services;
use surety_testkit::wait::eventually;

const DEADLINE: Duration = Duration::from_secs(120);
/// The database a child runner works on (set by the parent only).
const CHILD_DB: &str = "SURETY_PROJECTION_KAFKA_CHILD_DB";
/// The topic a child runner reads.
const CHILD_TOPIC: &str = "SURETY_PROJECTION_KAFKA_CHILD_TOPIC";
/// The child's name in the `progress` table.
const CHILD_NAME: &str = "SURETY_PROJECTION_KAFKA_CHILD_NAME";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Added {
    order_id: String,
    amount: i64,
    seq: i64,
}

impl Message for Added {
    const TYPE: &'static str = "test.order.added";
}

/// Totals per order, with the count of events, in `totals_v{version}`;
/// with a `runner` name, also the events each runner applied, in
/// `progress`.
struct Totals {
    table: String,
    runner: Option<String>,
}

impl Totals {
    fn new(version: u32) -> Self {
        Self {
            table: format!("totals_v{version}"),
            runner: None,
        }
    }
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

    async fn apply_batch(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        events: &[Applied<Added>],
    ) -> Result<(), HandlerError> {
        for event in events {
            self.apply(tx, event).await?;
        }
        if let Some(runner) = &self.runner {
            sqlx::query(
                "INSERT INTO progress (runner, events) VALUES ($1, $2)
                 ON CONFLICT (runner) DO UPDATE SET events = events + excluded.events",
            )
            .bind(runner)
            .bind(events.len() as i64)
            .execute(&mut **tx)
            .await
            .map_err(HandlerError::transient)?;
        }
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
    runner_of(transport, topic, version, Totals::new(version), store)
}

fn runner_of(
    transport: KafkaTransport,
    topic: &str,
    version: u32,
    projection: Totals,
    store: &SqliteCheckpoints,
) -> Runner<KafkaTransport, Totals, SqliteCheckpoints> {
    Runner::new(
        transport,
        topic,
        format!("{topic}.totals@v{version}"),
        projection,
        store.clone(),
    )
    .options(
        RunnerOptions::default()
            .batch(500, Duration::from_millis(50))
            .checkpoint_name(versioned_name("totals", version)),
    )
}

/// A runner process of version 1: does nothing unless the parent started
/// it; then runs until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_runner() {
    let Some(path) = role(CHILD_DB) else { return };
    // Shown with SURETY_PROJECTION_KAFKA_SHOW_CHILDREN (RUST_LOG filters).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    let topic = std::env::var(CHILD_TOPIC).expect("the parent names the topic");
    let name = std::env::var(CHILD_NAME).expect("the parent names the runner");
    let brokers = services::kafka_brokers().expect("the parent found Kafka");
    let options = SqliteConnectOptions::new()
        .filename(&path)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(30));
    let pool = SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .expect("the parent's database");
    let store = SqliteCheckpoints::new(pool);
    let transport = KafkaTransport::connect(config(&brokers))
        .await
        .expect("connects");
    let projection = Totals {
        runner: Some(name),
        ..Totals::new(1)
    };
    runner_of(transport, &topic, 1, projection, &store)
        .run()
        .await
        .expect("the runner runs until it is killed");
}

/// What each runner process applied, by name.
async fn progress(pool: &SqlitePool) -> BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>("SELECT runner, events FROM progress")
        .fetch_all(pool)
        .await
        .expect("the progress")
        .into_iter()
        .collect()
}

/// Each partition's checkpoint of `projection`, for a failure message.
async fn checkpoints(pool: &SqlitePool, projection: &str) -> Vec<(i64, i64)> {
    sqlx::query_as(
        "SELECT partition, next_offset FROM surety_projection_checkpoint
         WHERE projection = $1 ORDER BY partition",
    )
    .bind(projection)
    .fetch_all(pool)
    .await
    .expect("the checkpoints")
}

/// Waits until version `version` equals `expected`; on the deadline, fails
/// naming each partition's checkpoint and what each runner applied.
async fn await_fold(pool: &SqlitePool, version: u32, expected: &Model, what: &str) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if table(pool, version).await == *expected {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "{what}: version {version} is not the fold after {DEADLINE:?}; \
                 checkpoints (partition, next offset) {:?}, applied by runner {:?}",
                checkpoints(pool, &versioned_name("totals", version)).await,
                progress(pool).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runners_share_partitions_survive_a_kill_and_rebuild_a_large_log_on_kafka() {
    if role(CHILD_DB).is_some() {
        return;
    }
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
    sqlx::query("CREATE TABLE progress (runner TEXT PRIMARY KEY, events INTEGER NOT NULL)")
        .execute(&db.pool)
        .await
        .expect("the progress table");
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

    // Two runner processes of version 1 share the partitions; once both
    // apply, one is killed (SIGKILL) while the log is far from applied.
    let path = db.path();
    let child = |name: &str| {
        TestProcess::new("child_runner")
            .env(CHILD_DB, &path)
            .env(CHILD_TOPIC, &topic)
            .env(CHILD_NAME, name)
            .env("RUST_LOG", "info")
            .show_output(std::env::var_os("SURETY_PROJECTION_KAFKA_SHOW_CHILDREN").is_some())
            .capture_output(true)
            .spawn()
            .expect("starts a runner process")
    };
    let mut killed = child("killed");
    let mut survivor = child("survivor");
    let applied = eventually(DEADLINE, "both runner processes to apply", || async {
        let progress = progress(&db.pool).await;
        (progress.len() == 2).then(|| progress.values().sum::<i64>())
    })
    .await;
    killed.kill().await.expect("killed");
    println!(
        "killed a runner process after {applied} of {events} events were applied: {:?}",
        progress(&db.pool).await
    );
    assert!(
        applied < events,
        "the runner was killed after the whole log was applied"
    );
    // The killed process is restarted, as its supervisor would: it joins
    // the group as a new member, the group rebalances, and the partitions
    // the killed one held resume from their checkpoints (what it applied
    // without committing is applied again, once). On tansu 0.6 the restart
    // waits until the group has dropped the killed member: its coordinator
    // does that after the session timeout, on the survivor's heartbeat, and
    // has the survivor rejoin (it revokes and gets its old partitions back)
    // but assigns the dead member's partitions to no one until a member
    // joins; a member that joins before the dead one expired gets a share
    // of the partitions assigned to the dead one (ADR 0017).
    let (revoked, assigned) = (
        survivor.lines_containing("partitions revoked"),
        survivor.lines_containing("partitions assigned"),
    );
    eventually(
        DEADLINE,
        "the survivor to rejoin once the killed member expired",
        || async {
            survivor.lines_containing("partitions revoked") > revoked
                && survivor.lines_containing("partitions assigned") > assigned
        },
    )
    .await;
    let mut restarted = child("restarted");
    await_fold(&db.pool, 1, &expected, "after the kill").await;
    assert!(
        !survivor.exited() && !restarted.exited(),
        "a runner process stopped"
    );

    // Rebuild version 2 while new events arrive and version 1 (the
    // surviving process) serves them.
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
                .run("totals", Totals::new, |p| {
                    println!(
                        "rebuild v{}: {} applied, {} left, {:.0} events/s, eta {:?}",
                        p.version, p.applied, p.remaining, p.events_per_second, p.eta
                    );
                })
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
    await_fold(&db.pool, 2, &expected, "after the promotion").await;
    await_fold(
        &db.pool,
        1,
        &expected,
        "the old version, served by the survivor",
    )
    .await;
    assert!(
        !survivor.exited() && !restarted.exited() && !promoted.is_finished(),
        "a runner stopped"
    );
    survivor.kill().await.expect("stopped");
    restarted.kill().await.expect("stopped");
    promoted.abort();
    let _ = promoted.await;
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
