//! What the outbox tests share: the two backends behind one [`Fixture`],
//! publishers that fail on purpose, and reading deliveries.
#![allow(dead_code, unreachable_pub)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use surety_core::memory::MemoryTransport;
use surety_core::{
    Confirmation, DeliveryInfo, DeliveryStream, Envelope, Publisher, Result, TransportError,
    TransportErrorKind,
};
use surety_outbox::{OutboxStore, PostgresOutbox, SqliteOutbox};
use surety_testkit::db::{TempSchema, TempSqlite};

/// How long a test waits for anything that should happen.
pub const WAIT: Duration = Duration::from_secs(30);

/// One backend: its store, and writes in a transaction of its own.
pub trait Fixture: Send + Sync {
    type Store: OutboxStore;

    fn store(&self) -> Self::Store;

    /// Enqueues `messages` in one transaction, then commits or rolls back.
    fn write(&self, messages: &[(&str, Envelope)], commit: bool)
    -> impl Future<Output = ()> + Send;

    /// Enqueues `messages` with one `enqueue_all` in one transaction,
    /// committed when that succeeds and rolled back when it fails.
    fn write_all(
        &self,
        messages: &[(&str, Envelope)],
    ) -> impl Future<Output = Result<(), surety_outbox::OutboxError>> + Send;

    /// Inserts a pending row whose stored headers are not JSON.
    fn write_corrupt(&self, topic: &str) -> impl Future<Output = ()> + Send;

    /// The `last_error` of the rows in `status` that have one, in seq order.
    fn last_error(&self, status: &str) -> impl Future<Output = Vec<String>> + Send;
}

const CORRUPT: &str = "INSERT INTO surety_outbox (message_id, topic, partition_key, headers, payload, created_at, next_attempt_at)
VALUES ('bad', $1, 'k-bad', '{not json', $2, 0, 0)";

const ERRORS: &str = "SELECT last_error FROM surety_outbox WHERE status = $1 AND last_error IS NOT NULL ORDER BY seq";

/// Implements [`Fixture`] for a backend wrapper whose `.0.pool` is its pool.
macro_rules! fixture {
    ($fixture:ident, $store:ident) => {
        impl Fixture for $fixture {
            type Store = $store;

            fn store(&self) -> $store {
                $store::new(self.0.pool.clone())
            }

            async fn write(&self, messages: &[(&str, Envelope)], commit: bool) {
                let mut tx = self.0.pool.begin().await.unwrap();
                for (topic, envelope) in messages {
                    $store::enqueue(&mut tx, topic, envelope).await.unwrap();
                }
                if commit {
                    tx.commit().await.unwrap();
                } else {
                    tx.rollback().await.unwrap();
                }
            }

            async fn write_all(
                &self,
                messages: &[(&str, Envelope)],
            ) -> Result<(), surety_outbox::OutboxError> {
                let borrowed: Vec<(&str, &Envelope)> =
                    messages.iter().map(|(topic, e)| (*topic, e)).collect();
                let mut tx = self.0.pool.begin().await.unwrap();
                match $store::enqueue_all(&mut tx, &borrowed).await {
                    Ok(()) => {
                        tx.commit().await.unwrap();
                        Ok(())
                    }
                    Err(error) => {
                        tx.rollback().await.unwrap();
                        Err(error)
                    }
                }
            }

            async fn write_corrupt(&self, topic: &str) {
                sqlx::query(CORRUPT)
                    .bind(topic)
                    .bind(b"x".to_vec())
                    .execute(&self.0.pool)
                    .await
                    .unwrap();
            }

            async fn last_error(&self, status: &str) -> Vec<String> {
                sqlx::query_scalar(ERRORS)
                    .bind(status)
                    .fetch_all(&self.0.pool)
                    .await
                    .unwrap()
            }
        }
    };
}

pub struct Sqlite(pub TempSqlite);

impl Sqlite {
    pub async fn new() -> Self {
        let db = TempSqlite::new(4, Duration::from_secs(10)).await;
        surety_outbox::sqlite::migrate(&db.pool).await.unwrap();
        Self(db)
    }
}

fixture!(Sqlite, SqliteOutbox);

pub struct Postgres(pub TempSchema);

impl Postgres {
    pub async fn new() -> Option<Self> {
        let db = TempSchema::new("surety_outbox", 4).await?;
        surety_outbox::postgres::migrate(&db.pool).await.unwrap();
        Some(Self(db))
    }
}

fixture!(Postgres, PostgresOutbox);

/// An order event number `n` of `key`.
pub fn event(key: &str, n: usize) -> Envelope {
    Envelope::builder("/shop", "order.changed")
        .partition_key(key)
        .header("n", n.to_string())
        .payload(format!(r#"{{"order":"{key}","n":{n}}}"#))
        .build()
}

/// How [`Flaky`] treats one send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fail {
    /// Never reaches the broker; the send fails (a lost connection).
    Lost,
    /// Reaches the broker, but the confirmation times out.
    Unconfirmed,
    /// The broker refuses the message itself, for good.
    Rejected,
    /// The broker cannot route it (nothing bound to the topic yet).
    Unroutable,
}

/// Picks how send number `n` to `topic` fails, if it does.
pub type Plan = Arc<dyn Fn(usize, &str) -> Option<Fail> + Send + Sync>;

/// A publisher over the in-memory transport that fails the sends `plan`
/// picks (by the send's number, from 0), and counts sends.
#[derive(Clone)]
pub struct Flaky {
    pub inner: MemoryTransport,
    pub sends: Arc<AtomicUsize>,
    plan: Plan,
}

impl Flaky {
    pub fn new(
        inner: MemoryTransport,
        plan: impl Fn(usize, &str) -> Option<Fail> + Send + Sync + 'static,
    ) -> Self {
        Self {
            inner,
            sends: Arc::new(AtomicUsize::new(0)),
            plan: Arc::new(plan),
        }
    }
}

impl Publisher for Flaky {
    async fn send(&self, topic: &str, envelope: Envelope) -> Result<Confirmation> {
        let n = self.sends.fetch_add(1, Ordering::SeqCst);
        match (self.plan)(n, topic) {
            None => self.inner.send(topic, envelope).await,
            Some(Fail::Lost) => Err(TransportError::new(
                TransportErrorKind::Connection,
                "connection lost",
            )),
            Some(Fail::Unconfirmed) => {
                self.inner.publish(topic, envelope).await?;
                Ok(Confirmation::new(async {
                    Err(TransportError::new(
                        TransportErrorKind::Timeout,
                        "no confirm in time",
                    ))
                }))
            }
            Some(Fail::Rejected) => Ok(Confirmation::new(async {
                Err(TransportError::new(
                    TransportErrorKind::Rejected,
                    "the message is too large",
                ))
            })),
            Some(Fail::Unroutable) => Ok(Confirmation::new(async {
                Err(TransportError::new(
                    TransportErrorKind::Unroutable,
                    "no queue is bound",
                ))
            })),
        }
    }
}

/// A switch a [`Flaky`] plan can read.
#[derive(Clone, Default)]
pub struct Switch(Arc<AtomicBool>);

impl Switch {
    pub fn on(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    pub fn set(&self, on: bool) {
        self.0.store(on, Ordering::SeqCst);
    }
}

/// Reads deliveries (acking each) until one with id `marker`; returns the
/// envelopes before it.
pub async fn until_marker(stream: &mut DeliveryStream, marker: &str) -> Vec<Envelope> {
    let mut seen = Vec::new();
    loop {
        let delivery = tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("a delivery in time")
            .expect("the stream is open")
            .expect("a delivery");
        let envelope = delivery.envelope().clone();
        delivery.ack().await.unwrap();
        if envelope.id == marker {
            return seen;
        }
        seen.push(envelope);
    }
}

/// Reads deliveries (acking each) until every id in `expected` was seen;
/// returns everything delivered, repeats included, in arrival order.
pub async fn until_all(
    stream: &mut DeliveryStream,
    expected: &HashSet<String>,
) -> Vec<(Envelope, DeliveryInfo)> {
    let mut missing = expected.clone();
    let mut seen = Vec::new();
    while !missing.is_empty() {
        let delivery = tokio::time::timeout(WAIT, stream.next())
            .await
            .unwrap_or_else(|_| panic!("{} messages never arrived", missing.len()))
            .expect("the stream is open")
            .expect("a delivery");
        let envelope = delivery.envelope().clone();
        let info = delivery.info().clone();
        delivery.ack().await.unwrap();
        missing.remove(&envelope.id);
        seen.push((envelope, info));
    }
    seen
}

/// The first copy of each message, in arrival order (at least once: a
/// message may come again, and only its first copy tells the order).
pub fn first_copies(envelopes: impl IntoIterator<Item = Envelope>) -> Vec<Envelope> {
    let mut ids = HashSet::new();
    envelopes
        .into_iter()
        .filter(|envelope| ids.insert(envelope.id.clone()))
        .collect()
}

/// Publishes a marker to `topic` straight through `transport` and returns
/// the envelopes `stream` delivers before it: everything the relay had
/// published to `topic` by then.
pub async fn published_before_marker(
    transport: &MemoryTransport,
    topic: &str,
    stream: &mut DeliveryStream,
) -> Vec<Envelope> {
    let marker = Envelope::builder("/test", "marker").build();
    transport.publish(topic, marker.clone()).await.unwrap();
    until_marker(stream, &marker.id).await
}

/// One `orders` event for each of `keys` keys (`k0`, `k1`, ...).
pub fn one_per_key(keys: usize) -> Vec<(&'static str, Envelope)> {
    (0..keys)
        .map(|n| ("orders", event(&format!("k{n}"), n)))
        .collect()
}

/// The `n` header of each envelope, by partition key, in arrival order.
pub fn numbers_by_key(envelopes: &[Envelope]) -> HashMap<String, Vec<usize>> {
    let mut by_key: HashMap<String, Vec<usize>> = HashMap::new();
    for envelope in envelopes {
        let key = envelope.partition_key.clone().unwrap_or_default();
        let n = envelope.headers.get("n").unwrap().parse().unwrap();
        by_key.entry(key).or_default().push(n);
    }
    by_key
}

/// Records what a closure saw, for assertions after the fact.
pub type Seen<T> = Arc<Mutex<Vec<T>>>;
