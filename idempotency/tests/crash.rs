//! Crashes under the layer: a worker killed while holding a lease blocks
//! the key only until the lease expires, and the redelivery applies the
//! effect once (in-memory, SQLite and PostgreSQL stores); a handler that
//! fails releases its claim at once; renewal keeps a slow handler's claim.
#![cfg(all(feature = "sqlite", feature = "postgres"))]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use prometheus_client::registry::Registry;
use surety_core::consumer::{Incoming, Outcome, Response, Worker, handler_fn};
use surety_core::memory::MemoryTransport;
use surety_core::tower::{Layer, ServiceExt, service_fn};
use surety_core::{DeliveryInfo, Envelope, HandlerError, Publisher, Subscriber, Transient};
use surety_idempotency::{
    Claim, DedupStore, IdempotencyLayer, IdempotencyMetrics, LeasePolicy, MemoryDedupStore,
};
use tokio::sync::Notify;

fn metric(registry: &Registry, name: &str) -> f64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn incoming(env: &Envelope) -> Incoming {
    Incoming::new(
        env.clone(),
        DeliveryInfo::new("memory", "orders", "billing"),
    )
}

#[tokio::test]
async fn a_worker_killed_while_holding_a_lease_leads_to_one_effect_after_redelivery_memory() {
    killed_while_holding_a_lease(MemoryDedupStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_holding_a_lease_leads_to_one_effect_after_redelivery_sqlite() {
    let db = common::TempSqlite::new(4).await;
    killed_while_holding_a_lease(surety_idempotency::SqliteDedupStore::new(db.pool.clone())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_holding_a_lease_leads_to_one_effect_after_redelivery_postgres() {
    let Some(db) = common::temp_schema(4).await else {
        return;
    };
    killed_while_holding_a_lease(surety_idempotency::PostgresDedupStore::new(db.pool.clone()))
        .await;
    db.drop_schema().await;
}

async fn killed_while_holding_a_lease<St: DedupStore + Clone>(store: St) {
    let transport = MemoryTransport::new();
    let mut registry = Registry::default();
    let metrics = IdempotencyMetrics::register(&mut registry);
    let lease = Duration::from_secs(1);
    let layer = IdempotencyLayer::new(store.clone())
        .policy(LeasePolicy::new(lease).busy_wait(Duration::ZERO))
        .metrics(metrics);

    let effects = Arc::new(AtomicU32::new(0));
    let started = Arc::new(Notify::new());
    let runs = Arc::new(AtomicU32::new(0));
    let handler = {
        let (effects, started, runs) = (
            Arc::clone(&effects),
            Arc::clone(&started),
            Arc::clone(&runs),
        );
        handler_fn(move |_msg: Incoming| {
            let (effects, started, runs) = (
                Arc::clone(&effects),
                Arc::clone(&started),
                Arc::clone(&runs),
            );
            async move {
                if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                    // The first instance hangs before its effect and is killed.
                    started.notify_one();
                    std::future::pending::<()>().await;
                }
                effects.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(())
            }
        })
    };

    let first = tokio::spawn(Worker::new(layer.layer(handler.clone())).run(
        transport.subscribe("orders", "billing").await.unwrap(),
        std::future::pending(),
    ));
    let env = Envelope::builder("/orders", "payment.requested").build();
    transport.publish("orders", env.clone()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), started.notified())
        .await
        .unwrap();
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    assert!(
        matches!(
            store.claim(&env.dedup_key(), lease).await.unwrap(),
            Claim::Busy { .. }
        ),
        "the dead instance's lease still holds the key"
    );

    let killed_at = tokio::time::Instant::now();
    let second = tokio::spawn(
        Worker::new(layer.layer(handler))
            .max_retry_after(Duration::from_millis(50))
            .max_deliveries(1_000)
            .run(
                transport.subscribe("orders", "billing").await.unwrap(),
                std::future::pending(),
            ),
    );
    common::wait_until(
        "the redelivery to apply the effect",
        Duration::from_secs(10),
        || effects.load(Ordering::SeqCst) == 1 && transport.depth("orders", "billing") == 0,
    )
    .await;
    assert!(
        killed_at.elapsed() < Duration::from_secs(5),
        "the key was blocked only for the lease"
    );
    assert_eq!(
        metric(&registry, "surety_idempotency_lease_takeovers_total"),
        1.0
    );

    // Later duplicates are acknowledged without running the handler.
    transport.publish("orders", env).await.unwrap();
    common::wait_until(
        "the duplicate to be settled",
        Duration::from_secs(5),
        || transport.depth("orders", "billing") == 0,
    )
    .await;
    second.abort();
    assert_eq!(effects.load(Ordering::SeqCst), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert!(transport.rejected("orders", "billing").is_empty());
    assert!(metric(&registry, "surety_idempotency_duplicates_total") >= 1.0);
}

#[tokio::test]
async fn a_failed_handler_releases_its_claim_so_the_redelivery_runs_at_once() {
    let transport = MemoryTransport::new();
    // A lease far longer than the test: only a release lets the redelivery in.
    let layer = IdempotencyLayer::new(MemoryDedupStore::new())
        .policy(LeasePolicy::new(Duration::from_secs(600)).busy_wait(Duration::ZERO));
    let effects = Arc::new(AtomicU32::new(0));
    let handler = {
        let effects = Arc::clone(&effects);
        handler_fn(move |msg: Incoming| {
            let effects = Arc::clone(&effects);
            async move {
                if msg.attempt == 1 {
                    return Err(Transient::new("database unavailable"));
                }
                effects.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(Worker::new(layer.layer(handler)).run(
        transport.subscribe("orders", "billing").await.unwrap(),
        async {
            stopped.await.ok();
        },
    ));
    transport
        .publish(
            "orders",
            Envelope::builder("/orders", "order.placed").build(),
        )
        .await
        .unwrap();
    common::wait_until(
        "the second attempt to apply the effect",
        Duration::from_secs(10),
        || effects.load(Ordering::SeqCst) == 1 && transport.depth("orders", "billing") == 0,
    )
    .await;
    stop.send(()).ok();
    let report = worker.await.unwrap();
    assert_eq!((report.requeued, report.acked), (1, 1));
}

#[tokio::test]
async fn retry_scheduled_and_dead_lettered_outcomes_release_the_claim() {
    let store = MemoryDedupStore::new();
    for outcome in [Outcome::RetryScheduled, Outcome::DeadLettered] {
        let inner = service_fn(move |_msg: Incoming| async move {
            Ok::<_, HandlerError>(Response::outcome(outcome))
        });
        let handler = IdempotencyLayer::new(store.clone()).layer(inner);
        let env = Envelope::builder("/orders", "order.placed").build();
        for _ in 0..2 {
            // Not handled, so not a duplicate the second time either: a
            // retry or a replay from the dead-letter queue runs again.
            assert_eq!(
                handler
                    .clone()
                    .oneshot(incoming(&env))
                    .await
                    .unwrap()
                    .outcome,
                outcome
            );
        }
    }
    assert_eq!(store.size().await.unwrap(), 0);
}

#[tokio::test]
async fn renewal_keeps_a_slow_handler_s_claim() {
    let lease = Duration::from_millis(300);
    let store = MemoryDedupStore::new();
    let effects = Arc::new(AtomicU32::new(0));
    let handler = {
        let effects = Arc::clone(&effects);
        handler_fn(move |_msg: Incoming| {
            let effects = Arc::clone(&effects);
            async move {
                // Several leases long.
                tokio::time::sleep(Duration::from_millis(1_200)).await;
                effects.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(())
            }
        })
    };
    let handler = IdempotencyLayer::new(store.clone())
        .policy(LeasePolicy::new(lease).busy_wait(Duration::ZERO))
        .layer(handler);
    let env = Envelope::builder("/orders", "order.placed").build();
    let slow = tokio::spawn(handler.clone().oneshot(incoming(&env)));
    tokio::time::timeout(Duration::from_secs(5), async {
        while store.size().await.unwrap() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the slow run claims the key");
    // Duplicates keep arriving while the slow run goes on: all are busy.
    let mut busy = 0;
    while !slow.is_finished() {
        match handler.clone().oneshot(incoming(&env)).await {
            Err(err) => {
                assert!(
                    err.to_string()
                        .contains("being handled by another delivery"),
                    "{err}"
                );
                busy += 1;
            }
            Ok(response) => assert_eq!(response.outcome, Outcome::Duplicate),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(slow.await.unwrap().unwrap().outcome, Outcome::Handled);
    assert!(busy >= 5, "the duplicates found the key busy ({busy})");
    assert_eq!(effects.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_custom_key_makes_different_envelopes_the_same_message() {
    let effects = Arc::new(AtomicU32::new(0));
    let handler = {
        let effects = Arc::clone(&effects);
        handler_fn(move |_msg: Incoming| {
            let effects = Arc::clone(&effects);
            async move {
                effects.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(())
            }
        })
    };
    let by_subject = |msg: &Incoming| -> Result<String, HandlerError> {
        msg.envelope
            .subject
            .clone()
            .ok_or_else(|| HandlerError::permanent("no subject"))
    };
    let handler = IdempotencyLayer::new(MemoryDedupStore::new())
        .key(by_subject)
        .layer(handler);
    for _ in 0..3 {
        // Three producers' messages about one order, each with its own id.
        let env = Envelope::builder("/orders", "order.placed")
            .subject("o-1")
            .build();
        handler.clone().oneshot(incoming(&env)).await.unwrap();
    }
    let without = Envelope::builder("/orders", "order.placed").build();
    let err = handler.oneshot(incoming(&without)).await.unwrap_err();
    assert!(!surety_core::Classify::class(&err).is_retryable());
    assert_eq!(effects.load(Ordering::SeqCst), 1);
}

#[test]
fn public_types_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<MemoryDedupStore>();
    check::<IdempotencyMetrics>();
    check::<IdempotencyLayer<MemoryDedupStore>>();
    check::<
        surety_idempotency::Idempotent<
            surety_core::consumer::AckAll,
            MemoryDedupStore,
            surety_idempotency::EnvelopeKey,
        >,
    >();
    check::<surety_idempotency::StoreError>();
    check::<surety_idempotency::Cleanup<MemoryDedupStore>>();
    check::<surety_idempotency::SqliteDedupStore>();
    check::<surety_idempotency::PostgresDedupStore>();
    check::<surety_idempotency::InboxTx<surety_idempotency::PostgresDedupStore>>();
}
