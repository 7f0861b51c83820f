//! The transactional inbox on SQLite and PostgreSQL: the business write and
//! the processed mark commit or roll back together.
//!
//! Every test runs against both databases (PostgreSQL only when
//! `SURETY_POSTGRES_URL` is set), each in a database or schema of its own.
#![cfg(all(feature = "sqlite", feature = "postgres"))]

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use prometheus_client::registry::Registry;
use sqlx::Database;
use surety_core::consumer::{Incoming, Outcome, Output, Worker};
use surety_core::memory::MemoryTransport;
use surety_core::tower::ServiceExt;
use surety_core::{Classify, DeliveryInfo, Envelope, Publisher, Subscriber};
use surety_idempotency::{
    Claim, IdempotencyLayer, IdempotencyMetrics, InboxTx, LeasePolicy, Marked, PostgresDedupStore,
    SqliteDedupStore, StoreError, TransactionalStore,
};
use surety_testkit::fault::{FaultPlan, FaultyTransport};
use surety_testkit::wait::eventually;
use tokio::sync::Notify;

/// The business side of a test database: an `effects` table without a
/// unique key, so an effect applied twice shows as two rows.
trait Business: TransactionalStore {
    fn create(&self) -> impl Future<Output = ()> + Send;
    fn apply(
        conn: &mut <Self::Database as Database>::Connection,
        message_id: &str,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
    fn effects(&self, message_id: &str) -> impl Future<Output = i64> + Send;
    fn status(&self, key: &str) -> impl Future<Output = Option<String>> + Send;
    /// The database session of `conn`, when the backend shows who waits on
    /// whose locks (PostgreSQL's backend pid); `None` on SQLite, whose lock
    /// waits happen inside the library and cannot be seen from outside.
    fn session(
        conn: &mut <Self::Database as Database>::Connection,
    ) -> impl Future<Output = Option<i32>> + Send;
    /// How many sessions wait on a lock that `session` holds.
    fn waiting_on(&self, session: i32) -> impl Future<Output = i64> + Send;
}

impl Business for SqliteDedupStore {
    async fn create(&self) {
        sqlx::query("CREATE TABLE effects (message_id TEXT NOT NULL)")
            .execute(self.pool())
            .await
            .unwrap();
    }

    async fn apply(conn: &mut sqlx::SqliteConnection, message_id: &str) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO effects (message_id) VALUES (?1)")
            .bind(message_id)
            .execute(conn)
            .await
            .map(drop)
    }

    async fn effects(&self, message_id: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM effects WHERE message_id = ?1")
            .bind(message_id)
            .fetch_one(self.pool())
            .await
            .unwrap()
    }

    async fn status(&self, key: &str) -> Option<String> {
        sqlx::query_scalar("SELECT status FROM surety_idempotency WHERE key = ?1")
            .bind(key)
            .fetch_optional(self.pool())
            .await
            .unwrap()
    }

    async fn session(_: &mut sqlx::SqliteConnection) -> Option<i32> {
        None
    }

    async fn waiting_on(&self, _: i32) -> i64 {
        0
    }
}

impl Business for PostgresDedupStore {
    async fn create(&self) {
        sqlx::query("CREATE TABLE effects (message_id TEXT NOT NULL)")
            .execute(self.pool())
            .await
            .unwrap();
    }

    async fn apply(conn: &mut sqlx::PgConnection, message_id: &str) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO effects (message_id) VALUES ($1)")
            .bind(message_id)
            .execute(conn)
            .await
            .map(drop)
    }

    async fn effects(&self, message_id: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM effects WHERE message_id = $1")
            .bind(message_id)
            .fetch_one(self.pool())
            .await
            .unwrap()
    }

    async fn status(&self, key: &str) -> Option<String> {
        sqlx::query_scalar("SELECT status FROM surety_idempotency WHERE key = $1")
            .bind(key)
            .fetch_optional(self.pool())
            .await
            .unwrap()
    }

    async fn session(conn: &mut sqlx::PgConnection) -> Option<i32> {
        Some(
            sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(conn)
                .await
                .unwrap(),
        )
    }

    async fn waiting_on(&self, session: i32) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
        )
        .bind(session)
        .fetch_one(self.pool())
        .await
        .unwrap()
    }
}

/// Waits until a session waits on a lock that `session` holds.
async fn wait_blocked_on<S: Business>(store: &S, session: i32) {
    eventually(
        Duration::from_secs(10),
        "a transaction to wait on the open one's lock",
        || async { store.waiting_on(session).await > 0 },
    )
    .await;
}

/// Runs `$test` against a fresh SQLite database and a fresh PostgreSQL
/// schema.
macro_rules! on_both {
    ($test:ident) => {
        mod $test {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let db = common::TempSqlite::new(8).await;
                let store = SqliteDedupStore::new(db.pool.clone());
                store.create().await;
                super::$test(store).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some(db) = common::temp_schema(8).await else {
                    return;
                };
                let store = PostgresDedupStore::new(db.pool.clone());
                store.create().await;
                super::$test(store).await;
                db.drop_schema().await;
            }
        }
    };
}

fn incoming(env: &Envelope) -> Incoming {
    Incoming::new(
        env.clone(),
        DeliveryInfo::new("memory", "payments", "billing"),
    )
}

fn metric(registry: &Registry, name: &str) -> f64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

on_both!(a_rolled_back_transaction_leaves_no_mark_and_no_effect);
async fn a_rolled_back_transaction_leaves_no_mark_and_no_effect<S: Business>(store: S) {
    let runs = Arc::new(AtomicU32::new(0));
    let handler = {
        let runs = Arc::clone(&runs);
        IdempotencyLayer::new(store.clone())
            .policy(LeasePolicy::new(Duration::from_secs(600)))
            .inbox(move |msg: Incoming, mut tx: InboxTx<S>| {
                let runs = Arc::clone(&runs);
                async move {
                    S::apply(&mut tx, &msg.envelope.id).await?;
                    if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                        // Fails after the business write: the transaction is
                        // dropped, so the write rolls back.
                        return Err(StoreError::backend("payment provider timed out"));
                    }
                    tx.commit().await
                }
            })
    };
    let env = Envelope::builder("/orders", "payment.requested").build();
    let key = env.dedup_key();

    let err = handler.clone().oneshot(incoming(&env)).await.unwrap_err();
    assert!(err.class().is_retryable(), "{err}");
    assert_eq!(
        store.effects(&env.id).await,
        0,
        "the business write rolled back"
    );
    assert_eq!(
        store.status(&key).await,
        None,
        "no mark, and the claim was released"
    );

    assert_eq!(
        handler
            .clone()
            .oneshot(incoming(&env))
            .await
            .unwrap()
            .outcome,
        Outcome::Handled
    );
    assert_eq!(
        handler.oneshot(incoming(&env)).await.unwrap().outcome,
        Outcome::Duplicate
    );
    assert_eq!(store.effects(&env.id).await, 1);
    assert_eq!(store.status(&key).await.as_deref(), Some("done"));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

on_both!(a_worker_killed_after_its_business_write_applies_once_after_redelivery);
async fn a_worker_killed_after_its_business_write_applies_once_after_redelivery<S: Business>(
    store: S,
) {
    let mut registry = Registry::default();
    let metrics = IdempotencyMetrics::register(&mut registry);
    let written = Arc::new(Notify::new());
    let runs = Arc::new(AtomicU32::new(0));
    let handler = {
        let (written, runs) = (Arc::clone(&written), Arc::clone(&runs));
        IdempotencyLayer::new(store.clone())
            .policy(LeasePolicy::new(Duration::from_secs(60)))
            .metrics(metrics)
            .inbox(move |msg: Incoming, mut tx: InboxTx<S>| {
                let (written, runs) = (Arc::clone(&written), Arc::clone(&runs));
                async move {
                    S::apply(&mut tx, &msg.envelope.id).await?;
                    if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                        // Killed between the business write and the commit.
                        written.notify_one();
                        std::future::pending::<()>().await;
                    }
                    tx.commit().await
                }
            })
    };
    let env = Envelope::builder("/orders", "payment.requested").build();
    let doomed = tokio::spawn(handler.clone().oneshot(incoming(&env)));
    tokio::time::timeout(Duration::from_secs(10), written.notified())
        .await
        .unwrap();
    doomed.abort();
    assert!(doomed.await.unwrap_err().is_cancelled());

    // The claim died with the transaction: the redelivery runs at once,
    // without waiting for a lease.
    let redelivered = tokio::time::Instant::now();
    assert_eq!(
        handler
            .clone()
            .oneshot(incoming(&env))
            .await
            .unwrap()
            .outcome,
        Outcome::Handled
    );
    assert!(redelivered.elapsed() < Duration::from_secs(30));
    assert_eq!(
        handler.oneshot(incoming(&env)).await.unwrap().outcome,
        Outcome::Duplicate
    );
    assert_eq!(store.effects(&env.id).await, 1);
    assert_eq!(
        store.status(&env.dedup_key()).await.as_deref(),
        Some("done")
    );
    assert_eq!(
        metric(&registry, "surety_idempotency_lease_takeovers_total"),
        0.0
    );
    assert_eq!(metric(&registry, "surety_idempotency_processed_total"), 1.0);
    assert_eq!(
        metric(&registry, "surety_idempotency_duplicates_total"),
        1.0
    );
}

on_both!(a_stale_holder_s_transaction_cannot_commit);
async fn a_stale_holder_s_transaction_cannot_commit<S: Business>(store: S) {
    let key = format!("fencing/{}", uuid::Uuid::now_v7());
    let Claim::Acquired(stale) = store.claim(&key, Duration::from_millis(50)).await.unwrap() else {
        panic!("a new key is acquired");
    };
    // The stale holder stalls past its lease; another delivery takes over
    // and commits first.
    let fresh = loop {
        match store.claim(&key, Duration::from_secs(60)).await.unwrap() {
            Claim::Acquired(lease) => break lease,
            Claim::Busy { retry_after } => tokio::time::sleep(retry_after).await,
            other => panic!("{other:?}"),
        }
    };
    assert!(fresh.took_over);
    let mut tx = store.begin().await.unwrap();
    S::apply(&mut tx, &key).await.unwrap();
    store
        .complete_in(&mut tx, &key, &fresh.token, None)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // The stale holder's write and mark roll back together.
    let mut tx = store.begin().await.unwrap();
    S::apply(&mut tx, &key).await.unwrap();
    let err = store
        .complete_in(&mut tx, &key, &stale.token, None)
        .await
        .unwrap_err();
    assert!(err.is_lease_lost(), "{err}");
    tx.rollback().await.unwrap();
    assert_eq!(store.effects(&key).await, 1);
}

on_both!(a_concurrent_duplicate_waits_for_the_open_transaction);
async fn a_concurrent_duplicate_waits_for_the_open_transaction<S: Business>(store: S) {
    let stalled = Arc::new(Notify::new());
    let resume = Arc::new(Notify::new());
    let runs = Arc::new(AtomicU32::new(0));
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let session = Arc::new(Mutex::new(None));
    let handler = {
        let (stalled, resume, runs, fail, session) = (
            Arc::clone(&stalled),
            Arc::clone(&resume),
            Arc::clone(&runs),
            Arc::clone(&fail),
            Arc::clone(&session),
        );
        IdempotencyLayer::new(store.clone()).inbox(move |msg: Incoming, mut tx: InboxTx<S>| {
            let (stalled, resume, runs, fail, session) = (
                Arc::clone(&stalled),
                Arc::clone(&resume),
                Arc::clone(&runs),
                Arc::clone(&fail),
                Arc::clone(&session),
            );
            async move {
                S::apply(&mut tx, &msg.envelope.id).await?;
                if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                    let id = S::session(&mut tx).await;
                    *session.lock().unwrap() = id;
                    stalled.notify_one();
                    resume.notified().await;
                    if fail.load(Ordering::SeqCst) {
                        return Err(StoreError::backend("failed after the write"));
                    }
                }
                tx.commit().await
            }
        })
    };
    for first_commits in [true, false] {
        runs.store(0, Ordering::SeqCst);
        fail.store(!first_commits, Ordering::SeqCst);
        let env = Envelope::builder("/orders", "payment.requested").build();
        let first = tokio::spawn(handler.clone().oneshot(incoming(&env)));
        tokio::time::timeout(Duration::from_secs(10), stalled.notified())
            .await
            .unwrap();
        let second = tokio::spawn(handler.clone().oneshot(incoming(&env)));
        // PostgreSQL shows the duplicate waiting on the open transaction's
        // lock. SQLite's wait cannot be seen from outside; the outcomes
        // below show it there (a duplicate that did not wait would apply
        // the effect a second time).
        let first_session = *session.lock().unwrap();
        if let Some(first_session) = first_session {
            wait_blocked_on(&store, first_session).await;
            assert!(
                !second.is_finished(),
                "the duplicate waits for the open transaction"
            );
        }
        resume.notify_one();
        let first = tokio::time::timeout(Duration::from_secs(20), first)
            .await
            .unwrap()
            .unwrap();
        let second = tokio::time::timeout(Duration::from_secs(20), second)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if first_commits {
            assert_eq!(first.unwrap().outcome, Outcome::Handled);
            assert_eq!(second.outcome, Outcome::Duplicate);
        } else {
            assert!(first.is_err());
            assert_eq!(
                second.outcome,
                Outcome::Handled,
                "the duplicate runs once the first rolled back"
            );
        }
        assert_eq!(store.effects(&env.id).await, 1);
        assert_eq!(runs.load(Ordering::SeqCst), 2 - u32::from(first_commits));
    }
}

on_both!(mark_processed_lets_one_transaction_commit);
async fn mark_processed_lets_one_transaction_commit<S: Business>(store: S) {
    let key = format!("mark/{}", uuid::Uuid::now_v7());
    for expected in [Marked::First, Marked::Duplicate, Marked::Duplicate] {
        let mut tx = store.begin().await.unwrap();
        S::apply(&mut tx, &key).await.unwrap();
        let marked = store.mark_processed(&mut tx, &key).await.unwrap();
        assert_eq!(marked, expected);
        match marked {
            Marked::First => tx.commit().await.unwrap(),
            _ => tx.rollback().await.unwrap(),
        }
    }
    assert_eq!(store.effects(&key).await, 1);

    // A live claim from the layer makes a claim-less mark busy.
    let claimed = format!("mark/{}", uuid::Uuid::now_v7());
    let Claim::Acquired(_) = store
        .claim(&claimed, Duration::from_secs(60))
        .await
        .unwrap()
    else {
        panic!("a new key is acquired");
    };
    let mut tx = store.begin().await.unwrap();
    assert_eq!(
        store.mark_processed(&mut tx, &claimed).await.unwrap(),
        Marked::Busy
    );
    tx.rollback().await.unwrap();
}

/// PostgreSQL: two transactions marking the same key at once; the second
/// waits for the first and sees a duplicate if it committed, or marks the
/// key itself if it rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_concurrent_marks_commit_once() {
    let Some(db) = common::temp_schema(8).await else {
        return;
    };
    let store = PostgresDedupStore::new(db.pool.clone());
    store.create().await;
    for first_commits in [true, false] {
        let key = format!("race/{}", uuid::Uuid::now_v7());
        let mut first = store.begin().await.unwrap();
        PostgresDedupStore::apply(&mut first, &key).await.unwrap();
        let first_session = PostgresDedupStore::session(&mut first).await.unwrap();
        assert_eq!(
            store.mark_processed(&mut first, &key).await.unwrap(),
            Marked::First
        );

        let second = {
            let (store, key) = (store.clone(), key.clone());
            tokio::spawn(async move {
                let mut tx = store.begin().await.unwrap();
                PostgresDedupStore::apply(&mut tx, &key).await.unwrap();
                let marked = store.mark_processed(&mut tx, &key).await.unwrap();
                match marked {
                    Marked::First => tx.commit().await.unwrap(),
                    _ => tx.rollback().await.unwrap(),
                }
                marked
            })
        };
        // The second transaction is blocked on the first one's row.
        wait_blocked_on(&store, first_session).await;
        assert!(
            !second.is_finished(),
            "the second mark waits for the first transaction"
        );
        if first_commits {
            first.commit().await.unwrap();
            assert_eq!(second.await.unwrap(), Marked::Duplicate);
        } else {
            first.rollback().await.unwrap();
            assert_eq!(second.await.unwrap(), Marked::First);
        }
        assert_eq!(store.effects(&key).await, 1);
    }
    db.drop_schema().await;
}

on_both!(under_faults_and_crashes_every_effect_commits_once);
async fn under_faults_and_crashes_every_effect_commits_once<S: Business>(store: S) {
    for seed in [1, 2] {
        let transport = MemoryTransport::new();
        let plan = FaultPlan::new(seed)
            .drop(0.2)
            .duplicate(0.5)
            .reorder(0.2)
            .reorder_window(Duration::from_millis(5))
            .fail_ack(0.3)
            .max_forced_redeliveries(3);
        let faulty = FaultyTransport::new(transport.clone(), plan);
        let mut replies = transport.subscribe("replies", "requester").await.unwrap();
        let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let handler = {
            let runs = Arc::clone(&runs);
            IdempotencyLayer::new(store.clone())
                .policy(
                    LeasePolicy::new(Duration::from_secs(30)).busy_wait(Duration::from_millis(50)),
                )
                .inbox(move |msg: Incoming, mut tx: InboxTx<S>| {
                    let runs = Arc::clone(&runs);
                    async move {
                        S::apply(&mut tx, &msg.envelope.id).await?;
                        let run = {
                            let mut runs = runs.lock().unwrap();
                            let run = runs.entry(msg.envelope.id.clone()).or_default();
                            *run += 1;
                            *run
                        };
                        if run == 1 && msg.envelope.subject.as_deref() == Some("crashes") {
                            return Err(StoreError::backend("crashed before commit"));
                        }
                        let reply = msg.envelope.caused_by("/handler", "reply").build();
                        tx.commit_with_outputs(vec![Output::new("replies", reply)])
                            .await
                    }
                })
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut workers = Vec::new();
        for _ in 0..2 {
            let deliveries = faulty.subscribe("payments", "billing").await.unwrap();
            let mut stop = stop_rx.clone();
            workers.push(tokio::spawn(
                Worker::new(handler.clone())
                    .emit_to(transport.clone())
                    .concurrency(2)
                    .max_deliveries(1_000)
                    .max_retry_after(Duration::from_millis(20))
                    .run(deliveries, async move {
                        let _ = stop.wait_for(|stop| *stop).await;
                    }),
            ));
        }
        let mut messages = Vec::new();
        for i in 0..12 {
            let env = Envelope::builder("/orders", "payment.requested")
                .subject(if i % 3 == 0 { "crashes" } else { "fine" })
                .build();
            for _ in 0..(1 + i % 2) {
                faulty.publish("payments", env.clone()).await.unwrap();
            }
            messages.push(env);
        }
        common::wait_until(
            "every delivery to be settled",
            Duration::from_secs(60),
            || transport.depth("payments", "billing") == 0,
        )
        .await;
        stop_tx.send(true).unwrap();
        for worker in workers {
            worker.await.unwrap();
        }
        assert!(transport.rejected("payments", "billing").is_empty());
        let mut first_reply: HashMap<String, Envelope> = HashMap::new();
        // Every reply was published before the workers stopped: read up to
        // a marker published now rather than until a quiet moment.
        let marker = Envelope::builder("/test", "test.marker").build();
        transport.publish("replies", marker.clone()).await.unwrap();
        loop {
            let reply = tokio::time::timeout(Duration::from_secs(10), replies.next())
                .await
                .expect("the replies up to the marker")
                .expect("the replies stream is open")
                .unwrap();
            let env = reply.envelope().clone();
            reply.ack().await.unwrap();
            if env.id == marker.id {
                break;
            }
            let cause = env.causation_id.clone().unwrap();
            assert_eq!(
                first_reply.entry(cause).or_insert_with(|| env.clone()),
                &env,
                "a duplicate got the original reply"
            );
        }
        for env in &messages {
            assert_eq!(
                store.effects(&env.id).await,
                1,
                "seed {seed}: effect of {}",
                env.id
            );
            assert!(
                first_reply.contains_key(&env.id),
                "seed {seed}: {} got a reply",
                env.id
            );
        }
    }
}

on_both!(the_inbox_layer_commits_the_write_the_mark_and_the_outputs_together);
async fn the_inbox_layer_commits_the_write_the_mark_and_the_outputs_together<S: Business>(
    store: S,
) {
    use surety_core::HandlerError;
    use surety_core::consumer::handler_fn;
    use surety_core::tower::ServiceBuilder;
    use surety_idempotency::InboxTransaction;

    let runs = Arc::new(AtomicU32::new(0));
    let handler = {
        let runs = Arc::clone(&runs);
        handler_fn(move |msg: Incoming| {
            let runs = Arc::clone(&runs);
            async move {
                let inbox = InboxTransaction::<S>::of(&msg)?;
                let mut tx = inbox.lock().await?;
                S::apply(&mut tx, &msg.envelope.id)
                    .await
                    .map_err(HandlerError::transient)?;
                if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                    // Fails after its write: the write must not survive.
                    return Err(HandlerError::transient("the ledger timed out"));
                }
                let reply = msg
                    .envelope
                    .caused_by("/payments", "payment.captured")
                    .build();
                Ok(Output::new("checkout.replies", reply))
            }
        })
    };
    // The DLQ layer outside: each of its in-place retries runs in a fresh
    // transaction.
    let stack = ServiceBuilder::new()
        .layer(
            surety_dlq::DlqLayer::new("payments")
                .policy(surety_dlq::RetryPolicy::in_place(3))
                .store(surety_dlq::store::MemoryDlqStore::new()),
        )
        .layer(IdempotencyLayer::new(store.clone()).transactional())
        .service(handler);

    let env = Envelope::builder("/checkout", "payment.capture").build();
    let first = stack.clone().oneshot(incoming(&env)).await.unwrap();
    assert_eq!(first.outcome, Outcome::Handled);
    assert_eq!(first.outputs.len(), 1);
    assert_eq!(runs.load(Ordering::SeqCst), 2, "retried once in place");
    assert_eq!(
        store.effects(&env.id).await,
        1,
        "the failed run's write rolled back"
    );
    assert_eq!(
        store.status(&env.dedup_key()).await.as_deref(),
        Some("done")
    );

    let again = stack.oneshot(incoming(&env)).await.unwrap();
    assert_eq!(again.outcome, Outcome::Duplicate);
    assert_eq!(again.outputs, first.outputs, "the stored reply, same id");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(store.effects(&env.id).await, 1);
}
