//! A real broker: RabbitMQ closes a consumer's connection after the
//! handler's effect committed and before the ack got through. The ack
//! fails, the broker delivers the message again, and the inbox turns the
//! redelivery into a duplicate: every effect is applied exactly once.
//!
//! Needs RabbitMQ (`SURETY_AMQP_URL`, and `rabbitmqctl` for node
//! `rabbit@localhost`) and PostgreSQL (`SURETY_POSTGRES_URL`). Only the
//! test's own connection (found by its unique name) is closed, so tests
//! running in parallel elsewhere are not disturbed.
#![cfg(all(feature = "sqlite", feature = "postgres"))]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use surety_core::consumer::{Incoming, Outcome, Response, Worker};
use surety_core::tower::ServiceBuilder;
use surety_core::{Close, Envelope, Publisher, Subscriber};
use surety_idempotency::{IdempotencyLayer, InboxTx, PostgresDedupStore, StoreError};
use surety_rabbitmq::lapin::options::QueueDeleteOptions;
use surety_rabbitmq::metrics::DeliveryOutcome;
use surety_rabbitmq::{RabbitConfig, RabbitMetrics, RabbitTransport, queue_name};
use surety_testkit::rabbitmq::Cleanup;
use surety_testkit::rabbitmqctl;
use surety_testkit::services::{amqp_url, require};
use surety_testkit::wait::eventually;
use tokio::sync::{Notify, oneshot};

/// How long anything that should happen may take.
const WAIT: Duration = Duration::from_secs(30);

/// Messages published; the one at [`CHOSEN`] loses its ack.
const COUNT: usize = 20;
const CHOSEN: usize = 7;

async fn effects(pool: &sqlx::PgPool) -> HashMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT message_id, count(*) FROM effects GROUP BY message_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

/// The chosen message's handler commits its effect, then holds the
/// delivery while the test has the broker close the consumer's connection
/// and waits for the transport to reconnect. The ack that follows fails;
/// the broker redelivers; the inbox finds the key done and acknowledges
/// the redelivery as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_after_a_lost_ack_is_not_applied_twice() {
    let Some(url) = require(amqp_url()) else {
        return;
    };
    let Some(db) = common::temp_schema(8).await else {
        return;
    };
    let store = PostgresDedupStore::new(db.pool.clone());
    // No unique key: an effect applied twice shows as two rows.
    sqlx::query("CREATE TABLE effects (message_id TEXT NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();

    let run = uuid::Uuid::now_v7();
    let connection = format!("surety-idempotency-test.conn.{run}");
    let topic = format!("surety-idempotency-test.lost-ack.{run}");
    let _cleanup = Cleanup::new(&url).queue(format!("{topic}.g"));
    let rabbit = RabbitMetrics::default();
    let transport = RabbitTransport::connect(
        RabbitConfig::new(&url)
            .connection_name(connection.clone())
            .prefetch(8)
            .confirm_timeout(Duration::from_secs(15))
            .outage_wait(Duration::from_secs(15))
            .metrics(rabbit.clone()),
    )
    .await
    .expect("connects to RabbitMQ");
    let deliveries = transport.subscribe(&topic, "g").await.unwrap();
    let mut ids = Vec::new();
    for n in 0..COUNT {
        let env = Envelope::builder("/test", "test.lost-ack")
            .payload(n.to_string())
            .build();
        ids.push(env.id.clone());
        transport.publish(&topic, env).await.unwrap();
    }
    let chosen = ids[CHOSEN].clone();

    // Every delivery the worker hands to the handler: (id, redelivered).
    let delivered = Arc::new(Mutex::new(Vec::<(String, bool)>::new()));
    // Runs of the inbox function (the effect), per message id.
    let runs = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let duplicates = Arc::new(AtomicU64::new(0));
    let (committed_tx, committed) = oneshot::channel::<()>();
    let committed_tx = Arc::new(Mutex::new(Some(committed_tx)));
    let release = Arc::new(Notify::new());

    let inbox = {
        let (chosen, runs, committed_tx, release) = (
            chosen.clone(),
            runs.clone(),
            committed_tx.clone(),
            release.clone(),
        );
        IdempotencyLayer::new(store.clone()).inbox(
            move |msg: Incoming, mut tx: InboxTx<PostgresDedupStore>| {
                let (chosen, runs, committed_tx, release) = (
                    chosen.clone(),
                    runs.clone(),
                    committed_tx.clone(),
                    release.clone(),
                );
                async move {
                    *runs
                        .lock()
                        .unwrap()
                        .entry(msg.envelope.id.clone())
                        .or_default() += 1;
                    sqlx::query("INSERT INTO effects (message_id) VALUES ($1)")
                        .bind(&msg.envelope.id)
                        .execute(&mut *tx)
                        .await?;
                    let done = tx.commit().await?;
                    if msg.envelope.id == chosen {
                        let signal = committed_tx.lock().unwrap().take();
                        if let Some(signal) = signal {
                            // The effect and the mark are committed; the
                            // ack has not been sent. Hold it until the
                            // connection it would go on is gone.
                            signal.send(()).ok();
                            release.notified().await;
                        }
                    }
                    Ok::<_, StoreError>(done)
                }
            },
        )
    };
    let handler = {
        let (delivered, duplicates) = (delivered.clone(), duplicates.clone());
        ServiceBuilder::new()
            .map_request(move |msg: Incoming| {
                delivered
                    .lock()
                    .unwrap()
                    .push((msg.envelope.id.clone(), msg.info.redelivered));
                msg
            })
            .map_response(move |response: Response| {
                if response.outcome == Outcome::Duplicate {
                    duplicates.fetch_add(1, Ordering::SeqCst);
                }
                response
            })
            .service(inbox)
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(Worker::new(handler).concurrency(4).run(deliveries, async {
        stopped.await.ok();
    }));

    tokio::time::timeout(WAIT, committed)
        .await
        .expect("the chosen message is handled within the deadline")
        .expect("the handler signals");
    assert_eq!(
        effects(&db.pool).await.get(&chosen),
        Some(&1),
        "the effect is committed before the connection goes"
    );
    let closing = connection.clone();
    assert_eq!(
        // Off the runtime's threads: the transport keeps running meanwhile.
        tokio::task::spawn_blocking(move || {
            rabbitmqctl::force_close_connection(&closing, "surety test: ack lost")
        })
        .await
        .expect("rabbitmqctl does not panic"),
        1,
        "the broker lists our connection"
    );
    eventually(WAIT, "the transport to reconnect", || {
        let rabbit = rabbit.clone();
        async move { rabbit.reconnects() >= 1 }
    })
    .await;
    // Let the handler finish: the worker acks on the dead channel.
    release.notify_one();

    let queue = queue_name(&topic, "g");
    eventually(WAIT, "every message to be handled and acknowledged", || {
        let (pool, delivered, queue, chosen) = (
            db.pool.clone(),
            delivered.clone(),
            queue.clone(),
            chosen.clone(),
        );
        async move {
            let redelivered = delivered
                .lock()
                .unwrap()
                .iter()
                .any(|(id, again)| *id == chosen && *again);
            redelivered
                && effects(&pool).await.len() == COUNT
                && tokio::task::spawn_blocking(move || rabbitmqctl::queue_depth(&queue))
                    .await
                    .expect("rabbitmqctl does not panic")
                    == Some(0)
        }
    })
    .await;
    stop.send(()).ok();
    let report = worker.await.unwrap();

    // The ack of the chosen message was lost, and the broker delivered it again.
    assert!(
        report.settle_failures >= 1,
        "the ack after the forced close fails: {report:?}"
    );
    assert!(rabbit.deliveries(&topic, "g", DeliveryOutcome::SettleFailed) >= 1);
    let delivered = delivered.lock().unwrap().clone();
    let copies: Vec<bool> = delivered
        .iter()
        .filter(|(id, _)| *id == chosen)
        .map(|(_, again)| *again)
        .collect();
    assert!(
        copies.len() >= 2 && !copies[0],
        "the chosen message was delivered again: {copies:?}"
    );
    assert!(
        copies[1..].iter().all(|again| *again),
        "every later copy is marked redelivered by the broker: {copies:?}"
    );
    assert_eq!(report.rejected, 0, "{report:?}");
    assert!(
        report.acked as usize >= COUNT,
        "every message is acked (the chosen one as its duplicate): {report:?}"
    );
    assert_eq!(
        (report.acked + report.requeued + report.settle_failures) as usize,
        delivered.len(),
        "every delivery was settled once: {report:?}"
    );

    // Exactly once: one effect per message, the chosen one included, and
    // the effect function ran once per message.
    let effects = effects(&db.pool).await;
    assert_eq!(effects.len(), COUNT, "every message has its effect");
    for (n, id) in ids.iter().enumerate() {
        assert_eq!(effects.get(id), Some(&1), "message {n}'s effect");
    }
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.get(&chosen), Some(&1), "the chosen effect ran once");
    assert!(
        runs.values().all(|&r| r == 1),
        "no effect function ran twice (a run that rolled back would show here): {runs:?}"
    );
    assert!(
        duplicates.load(Ordering::SeqCst) >= 1,
        "the redelivery was acknowledged as a duplicate"
    );

    let channel = transport.channel().await.unwrap();
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    transport.close().await.unwrap();
    db.drop_schema().await;
}
