//! The lease on both backends (SQLite, and PostgreSQL from
//! `SURETY_POSTGRES_URL`): it runs on the database's clock, so relays with
//! skewed clocks agree on who holds it; every takeover raises its epoch,
//! and a former holder (stalled past its lease) can neither send nor mark
//! once another instance took over; a restarted relay retakes its own
//! lease at once.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use prometheus_client::registry::Registry;
use surety_core::memory::MemoryTransport;
use surety_core::{Confirmation, Envelope, Publisher, Subscriber};
use surety_outbox::metrics::OutboxMetrics;
use surety_outbox::{Backlog, Lease, OutboxError, OutboxRow, OutboxStore, Relay};
use surety_testkit::wait::eventually;
use tokio::sync::watch;

use common::{Fixture, WAIT, event, one_per_key, published_before_marker};

fn ten_minutes_ahead() -> SystemTime {
    SystemTime::now() + Duration::from_secs(600)
}

fn ten_minutes_behind() -> SystemTime {
    SystemTime::now() - Duration::from_secs(600)
}

/// Relays whose clocks run ten minutes ahead or behind neither take a
/// running lease nor lose one they hold: the lease runs on the database's
/// clock, not on theirs.
async fn skewed_clocks_agree_on_the_lease(fixture: impl Fixture) {
    let transport = MemoryTransport::new();
    let mut orders = transport.subscribe("orders", "billing").await.unwrap();
    let behind = Relay::new(fixture.store(), transport.clone())
        .holder("behind")
        .clock(ten_minutes_behind);
    let ahead = Relay::new(fixture.store(), transport.clone())
        .holder("ahead")
        .clock(ten_minutes_ahead);
    let right = Relay::new(fixture.store(), transport.clone()).holder("right");

    // The relay with the slow clock takes the lease: it runs 60 s from the
    // database's now, not from its own.
    assert!(behind.run_once().await.unwrap().leader);
    assert!(
        !ahead.run_once().await.unwrap().leader,
        "a fast clock took a running lease"
    );
    assert!(!right.run_once().await.unwrap().leader);

    // The one with the fast clock, once it holds the lease, keeps it too.
    let ahead2 = Relay::new(fixture.store(), transport.clone())
        .name("second")
        .holder("ahead")
        .clock(ten_minutes_ahead);
    let behind2 = Relay::new(fixture.store(), transport.clone())
        .name("second")
        .holder("behind")
        .clock(ten_minutes_behind);
    assert!(ahead2.run_once().await.unwrap().leader);
    assert!(!behind2.run_once().await.unwrap().leader);

    // Only the holder publishes.
    fixture.write(&one_per_key(3), true).await;
    assert_eq!(ahead.run_once().await.unwrap().sent, 0);
    assert_eq!(behind.run_once().await.unwrap().sent, 3);
    let seen = published_before_marker(&transport, "orders", &mut orders).await;
    assert_eq!(seen.len(), 3);
}

/// A leader stalled on a confirmation past its lease is overtaken by a
/// standby; when it resumes, its mark is fenced (the rows stay the new
/// holder's to mark) and it sends nothing more.
async fn a_leader_paused_past_its_lease_is_fenced(fixture: impl Fixture) {
    let transport = MemoryTransport::new();
    let mut orders = transport.subscribe("orders", "billing").await.unwrap();
    fixture
        .write(
            &[
                ("orders", event("k", 0)),
                ("orders", event("k", 1)),
                ("orders", event("k", 2)),
            ],
            true,
        )
        .await;
    let paused = Paused::new(transport.clone());
    let old = Relay::new(
        Stalling {
            inner: fixture.store(),
            paused: paused.clone(),
        },
        paused.clone(),
    )
    .holder("old")
    .lease(Duration::from_secs(1));
    let new = Relay::new(fixture.store(), transport.clone())
        .holder("new")
        .lease(Duration::from_secs(1));
    let stalled = tokio::spawn(async move { old.run_once().await });
    // The old leader sent its first row and waits for the confirmation.
    eventually(WAIT, "the old leader's first send", || async {
        paused.sends.load(Ordering::SeqCst) == 1
    })
    .await;
    // Past its lease, the standby takes over and relays everything.
    eventually(WAIT, "the new leader relays every row", || async {
        let cycle = new.run_once().await.unwrap();
        cycle.leader && fixture.store().backlog().await.unwrap().pending == 0
    })
    .await;
    // The old leader resumes: its confirmation arrives, its mark is fenced
    // and it sends nothing more.
    paused.resume.send_replace(true);
    let cycle = stalled.await.unwrap().unwrap();
    assert_eq!(cycle.sent, 0, "a fenced leader marked rows: {cycle:?}");
    assert!(!cycle.leader);
    assert_eq!(
        paused.sends.load(Ordering::SeqCst),
        1,
        "a fenced leader sent again"
    );
    let seen = published_before_marker(&transport, "orders", &mut orders).await;
    let numbers: Vec<&str> = seen
        .iter()
        .map(|e| e.headers.get("n").unwrap_or_default())
        .collect();
    // The old leader's row 0, then the new leader's 0, 1, 2.
    assert_eq!(numbers, ["0", "0", "1", "2"]);
}

/// The store's writes carry the lease: once another holder took over,
/// marking, retrying and parking under the old lease change nothing.
async fn stale_lease_writes_change_nothing(fixture: impl Fixture) {
    let store = fixture.store();
    fixture.write(&one_per_key(2), true).await;
    let short = Duration::from_secs(1);
    let first = store
        .acquire_lease("fenced", "a", None, short)
        .await
        .unwrap()
        .unwrap();
    let seqs: Vec<i64> = store
        .pending(10)
        .await
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    // Another holder cannot take a running lease.
    assert!(
        store
            .acquire_lease("fenced", "b", None, short)
            .await
            .unwrap()
            .is_none()
    );
    // Once it ran out (by the database's clock), it can, at a higher epoch.
    let second = eventually(WAIT, "the lease to run out", || async {
        store
            .acquire_lease("fenced", "b", None, short)
            .await
            .unwrap()
    })
    .await;
    assert!(second.epoch > first.epoch);
    assert_eq!(store.mark_sent(&first, &seqs).await.unwrap(), 0);
    store
        .retry_later(&first, seqs[0], "late", SystemTime::now())
        .await
        .unwrap();
    store.park(&first, seqs[1], "late").await.unwrap();
    assert_eq!(store.backlog().await.unwrap().pending, 2);
    assert!(fixture.last_error("pending").await.is_empty());
    // The old holder's renewal fails while the new lease runs.
    assert!(
        store
            .acquire_lease("fenced", "a", Some(first.epoch), short)
            .await
            .unwrap()
            .is_none()
    );
    // The new holder marks.
    assert_eq!(store.mark_sent(&second, &seqs).await.unwrap(), 2);
    // A released lease is free at once, and the epoch still rises.
    store.release_lease(&second).await.unwrap();
    let third = store
        .acquire_lease("fenced", "a", Some(first.epoch), short)
        .await
        .unwrap()
        .unwrap();
    assert!(third.epoch > second.epoch);
}

/// A relay killed without releasing its lease and started again (same
/// host, same name: the same default holder identity) takes the lease back
/// at once instead of waiting out its predecessor's 60 s, reports the wait,
/// and fences the predecessor off.
async fn a_restarted_relay_retakes_its_lease_at_once(fixture: impl Fixture) {
    let transport = MemoryTransport::new();
    let mut orders = transport.subscribe("orders", "billing").await.unwrap();
    let crashed = Relay::new(fixture.store(), transport.clone()).name("orders");
    assert!(crashed.run_once().await.unwrap().leader);
    // It dies holding the lease (no release), with rows still to send.
    fixture.write(&one_per_key(5), true).await;

    let mut registry = Registry::default();
    let metrics = OutboxMetrics::register(&mut registry);
    let restarted = Relay::new(fixture.store(), transport.clone())
        .name("orders")
        .metrics(metrics.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(restarted.run(async move {
        stopped.await.ok();
    }));
    let store = fixture.store();
    // Well within the 60 s lease.
    eventually(
        Duration::from_secs(10),
        "the restarted relay to send",
        || async { store.backlog().await.unwrap().pending == 0 },
    )
    .await;
    assert!(
        metrics.lease_wait("orders") < 5.0,
        "{}",
        metrics.lease_wait("orders")
    );
    // The predecessor (had it only stalled) is fenced off.
    assert!(!crashed.run_once().await.unwrap().leader);
    stop.send(()).ok();
    running.await.unwrap();
    let seen = published_before_marker(&transport, "orders", &mut orders).await;
    assert_eq!(seen.len(), 5);
}

/// A publisher whose first send's confirmation waits until the test
/// resumes it (a leader stalled mid-batch); it counts sends.
#[derive(Clone)]
struct Paused {
    inner: MemoryTransport,
    sends: Arc<AtomicUsize>,
    resume: Arc<watch::Sender<bool>>,
}

impl Paused {
    fn new(inner: MemoryTransport) -> Self {
        Self {
            inner,
            sends: Arc::new(AtomicUsize::new(0)),
            resume: Arc::new(watch::Sender::new(false)),
        }
    }

    /// Waits while the relay is stalled: after its first send, until the
    /// test resumes it.
    async fn stalled(&self) {
        if self.sends.load(Ordering::SeqCst) > 0 {
            let mut resumed = self.resume.subscribe();
            resumed.wait_for(|resumed| *resumed).await.ok();
        }
    }
}

impl Publisher for Paused {
    async fn send(&self, topic: &str, envelope: Envelope) -> surety_core::Result<Confirmation> {
        self.stalled().await;
        let n = self.sends.fetch_add(1, Ordering::SeqCst);
        let confirmation = self.inner.send(topic, envelope).await?;
        if n > 0 {
            return Ok(confirmation);
        }
        let stalled = self.clone();
        Ok(Confirmation::new(async move {
            stalled.stalled().await;
            confirmation.await
        }))
    }
}

/// The store of a relay stalled with its publisher (a paused process): the
/// lease renewal waits too.
#[derive(Clone)]
struct Stalling<S> {
    inner: S,
    paused: Paused,
}

impl<S: OutboxStore> OutboxStore for Stalling<S> {
    async fn pending(&self, limit: usize) -> Result<Vec<OutboxRow>, OutboxError> {
        self.inner.pending(limit).await
    }

    async fn mark_sent(&self, lease: &Lease, seqs: &[i64]) -> Result<u64, OutboxError> {
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
        self.paused.stalled().await;
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

macro_rules! suite {
    ($backend:ident, $fixture:expr) => {
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn skewed_clocks_agree_on_the_lease() {
                let Some(fixture) = $fixture else { return };
                super::skewed_clocks_agree_on_the_lease(fixture).await;
            }

            #[tokio::test]
            async fn a_leader_paused_past_its_lease_is_fenced() {
                let Some(fixture) = $fixture else { return };
                super::a_leader_paused_past_its_lease_is_fenced(fixture).await;
            }

            #[tokio::test]
            async fn stale_lease_writes_change_nothing() {
                let Some(fixture) = $fixture else { return };
                super::stale_lease_writes_change_nothing(fixture).await;
            }

            #[tokio::test]
            async fn a_restarted_relay_retakes_its_lease_at_once() {
                let Some(fixture) = $fixture else { return };
                super::a_restarted_relay_retakes_its_lease_at_once(fixture).await;
            }
        }
    };
}

suite!(sqlite, Some(common::Sqlite::new().await));
suite!(postgres, common::Postgres::new().await);
