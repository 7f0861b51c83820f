//! The relay: reads pending rows in order, publishes them through any
//! [`Publisher`], and marks a row sent only once the broker confirmed it.
//!
//! # Order
//!
//! Rows are read in `seq` order and grouped by partition key. With
//! [`in_flight_per_key`](Relay::in_flight_per_key) at 1 (the default), one
//! row of each key is on its way at a time: the next row of a key is sent
//! as soon as the previous one is confirmed, so a failed publish can never
//! be overtaken by a later row of its key. Rows of different keys, and rows
//! without a key, are in flight together, so many keys are published as
//! fast as the broker confirms.
//!
//! A cycle reads the next batch while the tail of the current one is
//! still being confirmed (up to 16 reads a cycle), so the broker is not
//! left idle between batches; rows of a key read ahead wait behind that
//! key's rows already in the cycle, and a key that failed in the cycle
//! takes none. The reads and the statements marking rows sent run beside
//! the sends: a confirmation that arrives meanwhile sends its key's next
//! row at once, so the window of rows in flight stays full while the
//! store answers.
//!
//! A failed row is retried with exponential backoff and jitter; until it is
//! sent, the later rows of its key wait, and only they: the store reads
//! only rows that are not behind a waiting row of their key. That includes
//! failures an operator fixes (nothing bound to the topic yet, a missing
//! topic): the key resumes, in order, once they are fixed. A row that
//! retrying cannot help (the broker refused the message itself: too large,
//! invalid; a stored row that no longer decodes) or that used up
//! [`max_attempts`](Relay::max_attempts) is *parked*: set aside for an
//! operator ([`OutboxStore::requeue_parked`]), while the rest of its key
//! goes on. A send that finds the broker unreachable ends the cycle's
//! sending (what is in flight is still awaited), so an outage costs one
//! connection timeout per cycle, not one per key.
//!
//! # One relay at a time
//!
//! Every relay instance with the same [`name`](Relay::name) competes for one
//! lease row; only the holder publishes, the others stand by and take over
//! when the holder stops (it releases the lease) or dies (its lease
//! expires). The lease runs on the database's clock, so relays whose clocks
//! disagree still agree on the holder, and it carries an epoch raised by
//! every takeover: the holder's marks, retries and parks are fenced by it
//! in the statement itself (see [`Lease`]), and it checks before every
//! send that its lease is known to run (by the time the database granted,
//! counted on its monotonic clock from before it asked, less a margin),
//! renewing it as it goes. A holder that stalled past its lease, or was
//! replaced, therefore sends and marks nothing more once it resumes. The
//! default holder identity is `host/relay-name`: a relay restarted after a
//! crash retakes its own lease at once, fencing its dead predecessor. Keep
//! the lease longer than the transport's confirmation timeout (30 s by
//! default for both adapters; the lease is 60 s): a stall inside a send
//! itself cannot be fenced.
//!
//! # Delivery
//!
//! At least once: a relay that dies after the broker confirmed a row but
//! before marking it sent publishes it again. Confirmed rows are marked as
//! they confirm, in groups (every 64 rows, or 20 ms after the first), so a
//! relay killed over and over still makes progress, and each kill
//! republishes at most the rows in flight and those confirmed but not yet
//! marked: the group being written and the one gathering behind it (about
//! two groups; more only while the store is slow to answer). The message
//! keeps its id, so consumers deduplicate (surety-idempotency).

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use surety_core::retry::Backoff;
use surety_core::{Classify as _, Envelope, Publisher, TransportError, TransportErrorKind};
use tokio::time::Instant;

use crate::error::OutboxError;
use crate::metrics::OutboxMetrics;
use crate::store::{Lease, OutboxRow, OutboxStore};

/// What one [`Relay::run_once`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Cycle {
    /// Whether this relay held the lease (a standby does nothing else).
    pub leader: bool,
    /// Pending rows read.
    pub fetched: usize,
    /// Rows confirmed by the broker and marked sent.
    pub sent: usize,
    /// Rows that failed and will be tried again later.
    pub retried: usize,
    /// Rows set aside for an operator.
    pub parked: usize,
}

/// Publishes the rows of an [`OutboxStore`] through a [`Publisher`].
///
/// ```
/// use sqlx::sqlite::SqlitePoolOptions;
/// use surety_core::{Envelope, Subscriber, memory::MemoryTransport};
/// use surety_outbox::{Relay, SqliteOutbox};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
/// surety_outbox::sqlite::migrate(&pool).await?;
/// let transport = MemoryTransport::new();
/// let mut orders = transport.subscribe("orders", "billing").await?;
///
/// let mut tx = pool.begin().await?;
/// let event = Envelope::builder("/shop", "order.placed").partition_key("o-1").build();
/// SqliteOutbox::enqueue(&mut tx, "orders", &event).await?;
/// tx.commit().await?;
///
/// let relay = Relay::new(SqliteOutbox::new(pool), transport.clone());
/// let cycle = relay.run_once().await?;
/// assert_eq!(cycle.sent, 1);
/// # use futures::StreamExt;
/// let delivery = orders.next().await.unwrap()?;
/// assert_eq!(delivery.envelope().id, event.id);
/// # Ok(()) }
/// ```
///
/// A clone is another instance of the relay: it gets a holder identity of
/// its own and competes for the lease like a relay in another process.
#[derive(Debug)]
pub struct Relay<S, P> {
    store: S,
    publisher: P,
    name: String,
    holder: String,
    /// Whether `holder` is the default identity (host and relay name),
    /// which follows the name.
    default_holder: bool,
    clock: fn() -> SystemTime,
    batch_size: usize,
    poll_interval: Duration,
    lease: Duration,
    in_flight_per_key: usize,
    backoff: Backoff,
    metrics: Option<OutboxMetrics>,
    /// The lease this instance holds, and the epoch it last held.
    state: Mutex<LeaseState>,
}

/// What an instance knows of its lease.
#[derive(Debug, Default)]
struct LeaseState {
    /// The lease it holds (`None`: it does not).
    held: Option<Held>,
    /// The epoch it last held, even after losing it: an instance whose
    /// epoch has moved on never retakes a running lease, even under its
    /// own holder identity.
    epoch: Option<i64>,
}

/// A lease held, with when it was last renewed and until when it is known
/// to run (by this process's monotonic clock, from before the statement
/// that granted it, less a margin).
#[derive(Debug, Clone)]
struct Held {
    lease: Lease,
    renewed: Instant,
    valid_until: Instant,
}

impl<S: Clone, P: Clone> Clone for Relay<S, P> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            publisher: self.publisher.clone(),
            name: self.name.clone(),
            holder: uuid::Uuid::now_v7().to_string(),
            default_holder: false,
            clock: self.clock,
            batch_size: self.batch_size,
            poll_interval: self.poll_interval,
            lease: self.lease,
            in_flight_per_key: self.in_flight_per_key,
            backoff: self.backoff,
            metrics: self.metrics.clone(),
            state: Mutex::new(LeaseState::default()),
        }
    }
}

impl<S: OutboxStore, P: Publisher + 'static> Relay<S, P> {
    /// A relay named `default` over `store`, publishing through `publisher`:
    /// batches of 1024 rows, a 100 ms poll, a 60 s lease, one row in flight
    /// per key, retries from 100 ms doubling to 30 s without an attempt
    /// bound. Its holder identity is this host's name and the relay's
    /// name (see [`holder`](Self::holder)).
    pub fn new(store: S, publisher: P) -> Self {
        Self {
            store,
            publisher,
            name: "default".into(),
            holder: default_holder("default"),
            default_holder: true,
            clock: SystemTime::now,
            batch_size: 1024,
            poll_interval: Duration::from_millis(100),
            lease: Duration::from_secs(60),
            in_flight_per_key: 1,
            backoff: Backoff::exponential(Duration::from_millis(100), Duration::from_secs(30)),
            metrics: None,
            state: Mutex::new(LeaseState::default()),
        }
    }

    /// The relay's name: the instances sharing a name share one lease.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        if let Some(metrics) = &self.metrics {
            // Series created under the old name move to the new one.
            metrics.forget(&self.name);
            metrics.relay(&name);
        }
        self.name = name;
        if self.default_holder {
            self.holder = default_holder(&self.name);
        }
        self
    }

    /// This instance's identity in the lease. By default it is stable:
    /// this host's name and the relay's name (`host/name`), so a relay
    /// that restarts after a crash retakes its own lease at once (its dead
    /// predecessor is fenced off by the new epoch) instead of waiting for
    /// it to expire. Run two instances of one relay name on the same host
    /// with holders of their own: the one started last would otherwise
    /// take the lease from the other. (A clone of a relay gets a fresh
    /// UUID.)
    pub fn holder(mut self, holder: impl Into<String>) -> Self {
        self.holder = holder.into();
        self.default_holder = false;
        self
    }

    /// The wall clock the relay schedules retries and reads due rows with
    /// (default [`SystemTime::now`]; for tests). The lease does not use
    /// it: it runs on the database's clock, so relays whose clocks
    /// disagree still agree on who holds it.
    pub fn clock(mut self, clock: fn() -> SystemTime) -> Self {
        self.clock = clock;
        self
    }

    /// Rows read per cycle (at least 1).
    pub fn batch_size(mut self, rows: usize) -> Self {
        self.batch_size = rows.max(1);
        self
    }

    /// How long [`run`](Self::run) waits when the outbox is empty.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How long the lease lasts without renewal (at least 1 s).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_secs(1));
        self
    }

    /// Rows of one key in flight at once (at least 1). Above 1, a failed
    /// row may be overtaken by later rows of its key that were already on
    /// their way; use it only where the transport keeps the order of one
    /// key's sends (Kafka's idempotent producer) and throughput matters
    /// more: with few keys, or to keep more rows in flight on Kafka (see
    /// `docs/benchmarks.md`).
    pub fn in_flight_per_key(mut self, rows: usize) -> Self {
        self.in_flight_per_key = rows.max(1);
        self
    }

    /// The backoff of failed rows (default: 100 ms doubling to 30 s, with
    /// jitter, without an attempt bound). A bound on the backoff parks a row
    /// after that many failed publishes; a backoff without one keeps the
    /// bound set before (by [`max_attempts`](Self::max_attempts)).
    pub fn retry_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = match (backoff.attempts(), self.backoff.attempts()) {
            (None, Some(bound)) => backoff.max_attempts(bound),
            _ => backoff,
        };
        self
    }

    /// Parks a row after `attempts` failed publishes (default: retry
    /// transient failures without bound); the same as a bound on
    /// [`retry_backoff`](Self::retry_backoff).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.backoff = self.backoff.max_attempts(attempts);
        self
    }

    /// Records relay outcomes and the backlog in `metrics`. Every series
    /// of this relay exists from now on (at zero until something happens).
    pub fn metrics(mut self, metrics: OutboxMetrics) -> Self {
        metrics.relay(&self.name);
        self.metrics = Some(metrics);
        self
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Runs cycles until `shutdown` completes, then gives up the lease.
    ///
    /// When `shutdown` completes during a cycle, the cycle sends nothing
    /// more, waits for the confirmations of what it sent (each bounded by
    /// the transport's confirmation timeout) and marks those rows sent.
    /// Abort the task to stop at once: rows confirmed but not yet marked
    /// are then published again, and a standby waits for the lease to run
    /// out before it takes over (a restart of the same relay, with the same
    /// holder identity, takes it at once). Store failures are logged and
    /// retried after the poll interval; they do not end the relay.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let stopping = AtomicBool::new(false);
        let mut stopped = false;
        let mut last_refresh: Option<Instant> = None;
        // Since when this instance waits for the lease (`None` while it
        // leads).
        let mut waiting_since = Some(Instant::now());
        loop {
            if stopped || (&mut shutdown).now_or_never().is_some() {
                break;
            }
            let cycle = {
                let mut cycle = std::pin::pin!(self.cycle(&stopping));
                tokio::select! {
                    biased;
                    cycle = &mut cycle => cycle,
                    () = &mut shutdown => {
                        // Finish what is in flight, send nothing more.
                        stopped = true;
                        stopping.store(true, Ordering::SeqCst);
                        cycle.await
                    }
                }
            };
            match (&cycle, waiting_since) {
                (Ok(cycle), Some(since)) if cycle.leader => {
                    let waited = since.elapsed();
                    tracing::info!(relay = %self.name, holder = %self.holder, ?waited, "took the outbox lease");
                    if let Some(metrics) = &self.metrics {
                        metrics.set_lease_wait(&self.name, waited);
                    }
                    waiting_since = None;
                }
                (Ok(cycle), None) if !cycle.leader => waiting_since = Some(Instant::now()),
                _ => {}
            }
            let wait = match cycle {
                // A standby tries the lease every second (a read, unless
                // the lease is free), so a released lease is taken over
                // within a second.
                Ok(cycle) if !cycle.leader => self.poll_interval.max(STANDBY_POLL),
                // A full batch that moved: more may be waiting.
                Ok(cycle)
                    if cycle.fetched >= self.batch_size
                        && cycle.sent + cycle.retried + cycle.parked > 0 =>
                {
                    Duration::ZERO
                }
                Ok(_) => self.poll_interval,
                Err(err) => {
                    tracing::warn!(relay = %self.name, error = %err, "outbox relay cycle failed");
                    self.poll_interval
                }
            };
            if stopped {
                break;
            }
            if last_refresh.is_none_or(|at| at.elapsed() >= REFRESH) {
                self.refresh_metrics().await;
                last_refresh = Some(Instant::now());
            }
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
        let held = self.take_held();
        if let Some(held) = held
            && let Err(err) = self.store.release_lease(&held.lease).await
        {
            tracing::warn!(relay = %self.name, error = %err, "could not release the outbox lease");
        }
        if let Some(metrics) = &self.metrics {
            metrics.set_leader(&self.name, false);
        }
    }

    /// One cycle: take or renew the lease, read a batch and publish it.
    ///
    /// # Errors
    ///
    /// [`OutboxError::Store`] when the store fails; rows confirmed before
    /// the failure may be published again by the next cycle.
    pub async fn run_once(&self) -> Result<Cycle, OutboxError> {
        self.cycle(&AtomicBool::new(false)).await
    }

    async fn cycle(&self, stopping: &AtomicBool) -> Result<Cycle, OutboxError> {
        // Every cycle starts by asking the database, so an instance that
        // stalled, or whose lease a restart under its identity took over,
        // finds out before it reads a batch.
        self.expire_local();
        let leader = self.still_leading().await;
        if let Some(metrics) = &self.metrics {
            metrics.set_leader(&self.name, matches!(leader, Ok(true)));
        }
        let mut cycle = Cycle {
            leader: leader?,
            ..Cycle::default()
        };
        // The lease this cycle's writes are fenced with: renewals keep its
        // epoch; once another instance took over, they change nothing.
        let Some(fence) = self.held().map(|held| held.lease) else {
            cycle.leader = false;
            return Ok(cycle);
        };
        if !cycle.leader {
            return Ok(cycle);
        }
        let rows = self.store.pending(self.batch_size).await?;
        let mut marks = Marks::default();
        let result = self
            .publish_batch(rows, &fence, &mut cycle, &mut marks, stopping)
            .await;
        // Whatever happened, what the broker confirmed is marked sent.
        self.flush(&fence, &mut marks, &mut cycle).await?;
        if let Some(metrics) = &self.metrics {
            metrics.set_leader(&self.name, cycle.leader);
        }
        result.map(|()| cycle)
    }

    /// Publishes the batch `rows` read: up to `in_flight_per_key` rows of
    /// every key at once, and the next row of a key as soon as one of its
    /// rows is confirmed. A failed row takes the rest of its key out of the
    /// cycle. Confirmed rows are marked sent as they confirm, in groups
    /// (every [`MARK_EVERY`] rows, or [`MARK_AFTER`] after the first
    /// unmarked one), so a relay killed in a crash loop still makes
    /// progress. One mark statement runs at a time, beside the sends: the
    /// rows confirmed meanwhile go into the next one.
    ///
    /// Reads overlap confirmations: once fewer rows of the batch wait to be
    /// sent than are in flight, at most half a batch is outstanding (so
    /// that a read brings at least half a batch of new rows) and the last
    /// read was full, the next batch is read (up to [`MAX_READS`] per
    /// cycle) while the current one's confirmations arrive and refill the
    /// window. Its rows that this cycle already has are left out (by seq:
    /// rows confirmed but not marked yet too); the others join their key's
    /// queue behind the rows of that key still waiting or in flight, so
    /// each key stays in order, and a key that failed in this cycle, even
    /// while the read was under way, takes no more rows.
    ///
    /// Sending stops (what is in flight is still awaited) when the lease is
    /// lost or a mark finds it fenced, when `stopping` is set, or when a
    /// send finds the broker unreachable.
    async fn publish_batch(
        &self,
        rows: Vec<OutboxRow>,
        fence: &Lease,
        cycle: &mut Cycle,
        marks: &mut Marks,
        stopping: &AtomicBool,
    ) -> Result<(), OutboxError> {
        let mut batch = Batch::default();
        let mut in_flight: FuturesUnordered<Confirming> = FuturesUnordered::new();
        let mut more = rows.len() >= self.batch_size;
        let mut reads = 1;
        let touched = self.merge(rows, fence, cycle, &mut batch).await?;
        let mut sending = true;
        // Groups are in the order of their first row, so the first sends
        // follow the outbox's order.
        for g in touched {
            if !sending {
                break;
            }
            sending = self
                .fill(g, &mut batch, &mut in_flight, fence, cycle, stopping)
                .await?;
        }
        // Renew the lease while confirmations are awaited, too. One timer,
        // reset after each renewal (sends renew as well; an early wake-up
        // finds nothing to do).
        let mut renewal = std::pin::pin!(tokio::time::sleep_until(self.renew_at()));
        let mut mark_timer = std::pin::pin!(tokio::time::sleep(MARK_AFTER));
        // The read of the next batch under way, if any: it runs beside the
        // confirmations, which go on refilling the window meanwhile.
        let mut reading: Option<Reading> = None;
        loop {
            // The rows a read would return again: in flight and waiting
            // (the confirmed ones are being marked beside it).
            let outstanding = in_flight.len() + batch.queued;
            if reading.is_none()
                && sending
                && more
                && reads < MAX_READS
                && batch.queued <= in_flight.len()
                && outstanding <= self.batch_size / 2
            {
                // The tail of this batch is in flight: read the next one
                // now rather than after the last confirmation. The read
                // follows the marking of the rows confirmed so far, which
                // keeps them out of it (rows it returns that the cycle
                // already has are left out by seq in any case).
                if !self.may_send(stopping, cycle).await? {
                    sending = false;
                    continue;
                }
                self.start_mark(fence, marks);
                let marking = marks.writing.take();
                reads += 1;
                let store = self.store.clone();
                let limit = self.batch_size;
                reading = Some(
                    async move {
                        let marked = match marking {
                            Some(marking) => Some(marking.await),
                            None => None,
                        };
                        (marked, store.pending(limit).await)
                    }
                    .boxed(),
                );
            }
            if in_flight.is_empty() && reading.is_none() {
                return Ok(());
            }
            let event = tokio::select! {
                next = in_flight.next(), if !in_flight.is_empty() => match next {
                    Some(confirmed) => Event::Confirmed(confirmed),
                    None => continue,
                },
                rows = async {
                    match reading.as_mut() {
                        Some(read) => read.await,
                        None => std::future::pending().await,
                    }
                }, if reading.is_some() => Event::Read(rows),
                done = async {
                    match marks.writing.as_mut() {
                        Some(write) => write.await,
                        None => std::future::pending().await,
                    }
                }, if marks.writing.is_some() => Event::Marked(done),
                () = &mut renewal, if cycle.leader => Event::Renew,
                () = &mut mark_timer, if !marks.seqs.is_empty() && marks.writing.is_none() => {
                    Event::MarkDue
                }
            };
            match event {
                Event::Renew => {
                    cycle.leader = self.still_leading().await?;
                    renewal.as_mut().reset(self.renew_at());
                }
                Event::MarkDue => self.start_mark(fence, marks),
                Event::Marked(done) => {
                    marks.writing = None;
                    self.written(fence, marks, done, cycle)?;
                    if marks.seqs.len() >= MARK_EVERY {
                        self.start_mark(fence, marks);
                    }
                }
                Event::Read((marked, rows)) => {
                    reading = None;
                    if let Some(done) = marked {
                        self.written(fence, marks, done, cycle)?;
                    }
                    let rows = rows?;
                    let (full, before) = (rows.len() >= self.batch_size, cycle.fetched);
                    let touched = self.merge(rows, fence, cycle, &mut batch).await?;
                    // A read that found nothing new (only rows in flight)
                    // waits for the next cycle.
                    more = full && cycle.fetched > before;
                    for g in touched {
                        if !sending {
                            break;
                        }
                        sending = self
                            .fill(g, &mut batch, &mut in_flight, fence, cycle, stopping)
                            .await?;
                    }
                }
                Event::Confirmed((g, seq, attempts, outcome)) => {
                    batch.in_flight_of[g] -= 1;
                    match outcome {
                        Ok(()) => {
                            if marks.seqs.is_empty() {
                                mark_timer.as_mut().reset(Instant::now() + MARK_AFTER);
                            }
                            marks.seqs.push(seq);
                            if marks.seqs.len() >= MARK_EVERY {
                                self.start_mark(fence, marks);
                            }
                            if sending {
                                sending = self
                                    .fill(g, &mut batch, &mut in_flight, fence, cycle, stopping)
                                    .await?;
                            }
                        }
                        Err(err) => {
                            // The rest of this key waits for the failed row.
                            batch.block(g);
                            self.failed(fence, seq, attempts + 1, &err, cycle).await?;
                        }
                    }
                }
            }
        }
    }

    /// Adds the rows of a read to `batch`: rows it already has are left
    /// out, corrupt rows parked, the others appended to their key's group
    /// (a new one for a new key or a keyless row) unless the key failed in
    /// this cycle. Returns the groups that gained rows, in the order of
    /// their first new row.
    async fn merge(
        &self,
        rows: Vec<OutboxRow>,
        fence: &Lease,
        cycle: &mut Cycle,
        batch: &mut Batch,
    ) -> Result<Vec<usize>, OutboxError> {
        let rows: Vec<OutboxRow> = rows
            .into_iter()
            .filter(|row| batch.seen.insert(row.seq))
            .collect();
        cycle.fetched += rows.len();
        let mut touched = Vec::new();
        for planned in plan(rows, (self.clock)()) {
            match planned {
                Planned::Corrupt(seq, reason) => {
                    self.store.park(fence, seq, &reason).await?;
                    tracing::error!(relay = %self.name, seq, reason = %reason, "parked an outbox row that does not decode");
                    self.count("parked", 1);
                    cycle.parked += 1;
                }
                Planned::Group { key, rows } => {
                    if let Some(g) = batch.add(key, rows) {
                        touched.push(g);
                    }
                }
            }
        }
        Ok(touched)
    }

    /// Sends rows of group `g` until `in_flight_per_key` of them are in
    /// flight or none is left. Returns whether sending goes on: `false`
    /// when the lease is lost, the relay is stopping, or a send found the
    /// broker unreachable. A send that fails takes the rest of the group
    /// out of the cycle.
    async fn fill(
        &self,
        g: usize,
        batch: &mut Batch,
        in_flight: &mut FuturesUnordered<Confirming>,
        fence: &Lease,
        cycle: &mut Cycle,
        stopping: &AtomicBool,
    ) -> Result<bool, OutboxError> {
        while batch.in_flight_of[g] < self.in_flight_per_key {
            if batch.queues[g].is_empty() {
                break;
            }
            if !self.may_send(stopping, cycle).await? {
                return Ok(false);
            }
            let Some(row) = batch.pop(g) else {
                break;
            };
            match self.send(g, row).await {
                Ok(confirming) => {
                    batch.in_flight_of[g] += 1;
                    in_flight.push(confirming);
                }
                Err((seq, attempts, err)) => {
                    batch.block(g);
                    let go_on = !is_unreachable(&err);
                    self.failed(fence, seq, attempts + 1, &err, cycle).await?;
                    return Ok(go_on);
                }
            }
        }
        Ok(true)
    }

    /// Starts marking the confirmed rows in `marks` sent, in one
    /// statement fenced by the cycle's lease, unless one is under way (the
    /// rows confirmed meanwhile wait for the next one). The statement runs
    /// beside the sends and confirmations.
    fn start_mark(&self, fence: &Lease, marks: &mut Marks) {
        if marks.writing.is_some() || marks.seqs.is_empty() {
            return;
        }
        let seqs = std::mem::take(&mut marks.seqs);
        let store = self.store.clone();
        let fence = fence.clone();
        marks.writing = Some(
            async move {
                let marked = store.mark_sent(&fence, &seqs).await;
                (seqs, marked)
            }
            .boxed(),
        );
    }

    /// Accounts for a mark statement over `confirmed` rows that marked
    /// `marked`. Fewer rows marked than confirmed means another instance
    /// took the lease over: this one sends nothing more.
    fn marked(&self, fence: &Lease, confirmed: usize, marked: u64, cycle: &mut Cycle) {
        let marked_rows = usize::try_from(marked).unwrap_or(usize::MAX);
        cycle.sent += marked_rows;
        self.count("sent", marked);
        if marked_rows < confirmed {
            tracing::warn!(
                relay = %self.name,
                epoch = fence.epoch,
                confirmed,
                marked,
                "the outbox lease was taken over; marking and sending no more"
            );
            cycle.leader = false;
            self.lose_lease();
        }
    }

    /// Accounts for a mark statement that ran beside the sends. When it
    /// failed, its rows go back to `marks` (the end of the cycle tries
    /// them again) and the error ends the cycle.
    fn written(
        &self,
        fence: &Lease,
        marks: &mut Marks,
        (seqs, marked): Written,
        cycle: &mut Cycle,
    ) -> Result<(), OutboxError> {
        match marked {
            Ok(marked) => {
                self.marked(fence, seqs.len(), marked, cycle);
                Ok(())
            }
            Err(err) => {
                marks.seqs.extend(seqs);
                Err(err)
            }
        }
    }

    /// Marks every confirmed row in `marks` sent: waits for the statement
    /// under way, then marks the rest in one more.
    async fn flush(
        &self,
        fence: &Lease,
        marks: &mut Marks,
        cycle: &mut Cycle,
    ) -> Result<(), OutboxError> {
        if let Some(writing) = marks.writing.take() {
            let done = writing.await;
            self.written(fence, marks, done, cycle)?;
        }
        if marks.seqs.is_empty() {
            return Ok(());
        }
        let seqs = std::mem::take(&mut marks.seqs);
        let marked = self.store.mark_sent(fence, &seqs).await?;
        self.marked(fence, seqs.len(), marked, cycle);
        Ok(())
    }

    /// Whether another row may be sent: the relay is not stopping and
    /// still holds the lease (renewed when due; known to run by the
    /// database's clock, with a margin).
    async fn may_send(
        &self,
        stopping: &AtomicBool,
        cycle: &mut Cycle,
    ) -> Result<bool, OutboxError> {
        if stopping.load(Ordering::SeqCst) || !cycle.leader {
            return Ok(false);
        }
        cycle.leader = self.still_leading().await?;
        Ok(cycle.leader)
    }

    /// When the lease is next due for renewal.
    fn renew_at(&self) -> Instant {
        self.held()
            .map_or_else(Instant::now, |held| held.renewed + self.lease / 3)
    }

    /// Whether this instance holds the lease, renewing it once a third of
    /// it has passed since the last renewal, or when it is no longer known
    /// to run (and taking it when it is free).
    async fn still_leading(&self) -> Result<bool, OutboxError> {
        let now = Instant::now();
        let (was_leading, epoch) =
            {
                // Checked under the lock, without copying the lease: this runs
                // before every send.
                let state = self.lock_state();
                if state.held.as_ref().is_some_and(|held| {
                    now < held.renewed + self.lease / 3 && now < held.valid_until
                }) {
                    return Ok(true);
                }
                (state.held.is_some(), state.epoch)
            };
        let asked = Instant::now();
        let granted = self
            .store
            .acquire_lease(&self.name, &self.holder, epoch, self.lease)
            .await
            .inspect_err(|_| self.lock_state().held = None)?;
        let leading = granted.is_some();
        {
            let mut state = self.lock_state();
            state.held = granted.map(|lease| {
                state.epoch = Some(lease.epoch);
                // Known to run from when the statement was sent (the
                // database counted from later), less a margin for clock
                // rates.
                let runs = lease.remaining.min(self.lease);
                Held {
                    valid_until: asked + runs.saturating_sub(self.lease / 10),
                    renewed: asked,
                    lease,
                }
            });
        }
        if was_leading && !leading {
            tracing::warn!(relay = %self.name, "lost the outbox lease; sending no more");
        }
        Ok(leading)
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, LeaseState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn held(&self) -> Option<Held> {
        self.lock_state().held.clone()
    }

    fn take_held(&self) -> Option<Held> {
        self.lock_state().held.take()
    }

    /// Forgets when the held lease was renewed, so the next check asks the
    /// database (and renews it).
    fn expire_local(&self) {
        if let Some(held) = self.lock_state().held.as_mut() {
            held.valid_until = Instant::now();
        }
    }

    fn lose_lease(&self) {
        self.lock_state().held = None;
    }

    /// Sends one row of group `g`. On success, the future yields its
    /// outcome; a send that fails at once gives the row back.
    async fn send(&self, g: usize, row: Ready) -> Result<Confirming, (i64, u32, TransportError)> {
        let (seq, attempts) = (row.seq, row.attempts);
        let confirmation = self
            .publisher
            .send(&row.topic, row.envelope)
            .await
            .map_err(|err| (seq, attempts, err))?;
        Ok(async move { (g, seq, attempts, confirmation.await.map(|_| ())) }.boxed())
    }

    /// Records a failed attempt: the row is retried after its backoff, or
    /// parked when the broker refused the message itself or the attempts
    /// are used up. Nothing is recorded once the lease is lost (the new
    /// holder owns the row).
    async fn failed(
        &self,
        fence: &Lease,
        seq: i64,
        attempts: u32,
        err: &TransportError,
        cycle: &mut Cycle,
    ) -> Result<(), OutboxError> {
        if !cycle.leader {
            return Ok(());
        }
        let exhausted = !self.backoff.allows_retry_after(attempts);
        // A permanent error (the broker refused the message itself, a bad
        // configuration) does not go away by waiting. An unroutable message
        // is the exception: its binding may be declared later, so it waits.
        let hopeless = !err.class().is_retryable() && err.kind() != TransportErrorKind::Unroutable;
        if hopeless || exhausted {
            self.store.park(fence, seq, &err.to_string()).await?;
            tracing::error!(relay = %self.name, seq, attempts, error = %err, "parked an outbox row");
            self.count("parked", 1);
            cycle.parked += 1;
        } else {
            let delay = self.backoff.delay(attempts);
            let now = (self.clock)();
            let at = now.checked_add(delay).unwrap_or(now);
            self.store
                .retry_later(fence, seq, &err.to_string(), at)
                .await?;
            tracing::warn!(relay = %self.name, seq, attempts, ?delay, error = %err, "outbox publish failed; retrying later");
            self.count("retried", 1);
            cycle.retried += 1;
        }
        Ok(())
    }

    fn count(&self, outcome: &str, n: u64) {
        if let Some(metrics) = &self.metrics {
            metrics.relayed(&self.name, outcome, n);
        }
    }

    async fn refresh_metrics(&self) {
        let Some(metrics) = &self.metrics else { return };
        match self.store.backlog().await {
            Ok(backlog) => metrics.set_backlog(&self.name, &backlog),
            Err(err) => {
                tracing::debug!(relay = %self.name, error = %err, "could not read the outbox backlog");
            }
        }
    }
}

/// Whether a failed send means the broker cannot be reached now: the cycle
/// then sends nothing more.
fn is_unreachable(err: &TransportError) -> bool {
    matches!(
        err.kind(),
        TransportErrorKind::Connection | TransportErrorKind::Closed | TransportErrorKind::Timeout
    )
}

/// Reads per cycle, at most (the first and the overlapping ones): a cycle
/// ends now and then, so that [`Relay::run`] refreshes its gauges.
const MAX_READS: usize = 16;

/// A sent row's confirmation: its group, seq, attempts and outcome.
type Confirming =
    futures::future::BoxFuture<'static, (usize, i64, u32, Result<(), TransportError>)>;

/// The rows of one cycle, by group (one per key, one per keyless row).
#[derive(Debug, Default)]
struct Batch {
    /// Rows of each group waiting to be sent, in seq order.
    queues: Vec<VecDeque<Ready>>,
    /// Rows of each group in flight.
    in_flight_of: Vec<usize>,
    /// Each group's key.
    keys: Vec<Option<String>>,
    /// The group of each key.
    by_key: HashMap<String, usize>,
    /// Keys that failed in this cycle: they take no more rows.
    blocked: HashSet<String>,
    /// Every row read in this cycle.
    seen: HashSet<i64>,
    /// Rows waiting to be sent, over every group.
    queued: usize,
}

impl Batch {
    /// Appends `rows` of `key` to its group (a new group for a new key or
    /// no key); `None` when there are none or the key failed.
    fn add(&mut self, key: Option<String>, rows: Vec<Ready>) -> Option<usize> {
        if rows.is_empty() || key.as_ref().is_some_and(|k| self.blocked.contains(k)) {
            return None;
        }
        let existing = key.as_ref().and_then(|k| self.by_key.get(k).copied());
        let g = match existing {
            Some(g) => g,
            None => {
                let g = self.queues.len();
                if let Some(k) = &key {
                    self.by_key.insert(k.clone(), g);
                }
                self.queues.push(VecDeque::new());
                self.in_flight_of.push(0);
                self.keys.push(key);
                g
            }
        };
        self.queued += rows.len();
        self.queues[g].extend(rows);
        Some(g)
    }

    /// The next row of group `g`.
    fn pop(&mut self, g: usize) -> Option<Ready> {
        let row = self.queues[g].pop_front()?;
        self.queued -= 1;
        Some(row)
    }

    /// Takes group `g` out of the cycle after a failure: its waiting rows
    /// are dropped (they stay pending) and its key takes no more rows.
    fn block(&mut self, g: usize) {
        self.queued -= self.queues[g].len();
        self.queues[g].clear();
        if let Some(key) = &self.keys[g] {
            self.blocked.insert(key.clone());
        }
    }
}

/// Confirmed rows marked sent in one statement, at most.
const MARK_EVERY: usize = 64;

/// How long a confirmed row waits at most to be marked sent (with the
/// others confirmed meanwhile).
const MARK_AFTER: Duration = Duration::from_millis(20);

/// Confirmed rows not yet marked sent.
#[derive(Default)]
struct Marks {
    /// Confirmed rows no statement marks yet.
    seqs: Vec<i64>,
    /// The mark statement under way, if any.
    writing: Option<Writing>,
}

/// A mark statement under way: the rows it marks and what it marked.
type Writing = futures::future::BoxFuture<'static, Written>;

/// A mark statement's rows and what it marked.
type Written = (Vec<i64>, Result<u64, OutboxError>);

/// A read of pending rows under way, after the mark statement that was
/// under way when it started (the read's output carries that one's).
type Reading = futures::future::BoxFuture<'static, ReadOutput>;

/// What a read brings: the outcome of the mark statement it followed, if
/// any, and the rows.
type ReadOutput = (Option<Written>, Result<Vec<OutboxRow>, OutboxError>);

/// What the publishing loop woke up for.
enum Event {
    /// A sent row's confirmation (or failure) came in.
    Confirmed((usize, i64, u32, Result<(), TransportError>)),
    /// The read under way returned (with the mark it followed).
    Read(ReadOutput),
    /// The mark statement under way finished.
    Marked(Written),
    /// The lease is due for renewal.
    Renew,
    /// The oldest unmarked confirmation waited [`MARK_AFTER`].
    MarkDue,
}

/// The default holder identity: this host's name and the relay's name.
fn default_holder(relay: &str) -> String {
    format!("{}/{relay}", surety_core::host::host_name())
}

/// How often a standby [`Relay::run`] tries to take the lease (at least).
const STANDBY_POLL: Duration = Duration::from_secs(1);

/// How often [`Relay::run`] refreshes the backlog gauges while busy.
const REFRESH: Duration = Duration::from_secs(1);

/// A row ready to be published.
#[derive(Debug)]
struct Ready {
    seq: i64,
    topic: String,
    attempts: u32,
    envelope: Envelope,
}

/// A batch, sorted into what the relay publishes.
enum Planned {
    /// The due rows of one key (or one keyless row), in seq order.
    Group {
        /// Their key.
        key: Option<String>,
        /// The rows.
        rows: Vec<Ready>,
    },
    /// A row whose message does not decode, with the reason.
    Corrupt(i64, String),
}

/// Groups the due rows of a batch by key, in seq order. A key whose first
/// pending row is not due yet is skipped entirely, so nothing overtakes a
/// row waiting for its retry.
fn plan(rows: Vec<OutboxRow>, now: SystemTime) -> Vec<Planned> {
    let mut planned = Vec::new();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    let mut waiting: HashSet<String> = HashSet::new();
    for row in rows {
        if let Some(key) = &row.partition_key {
            if waiting.contains(key) {
                continue;
            }
            if !row.is_due(now) {
                waiting.insert(key.clone());
                continue;
            }
        } else if !row.is_due(now) {
            continue;
        }
        let envelope = match row.message {
            Ok(envelope) => envelope,
            Err(reason) => {
                planned.push(Planned::Corrupt(row.seq, reason));
                continue;
            }
        };
        let entry = Ready {
            seq: row.seq,
            topic: row.topic,
            attempts: row.attempts,
            envelope,
        };
        match row.partition_key {
            Some(key) => match by_key.get(&key) {
                Some(&i) => {
                    if let Planned::Group { rows, .. } = &mut planned[i] {
                        rows.push(entry);
                    }
                }
                None => {
                    by_key.insert(key.clone(), planned.len());
                    planned.push(Planned::Group {
                        key: Some(key),
                        rows: vec![entry],
                    });
                }
            },
            None => planned.push(Planned::Group {
                key: None,
                rows: vec![entry],
            }),
        }
    }
    planned
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64, key: Option<&str>, due: bool) -> OutboxRow {
        let now = SystemTime::now();
        OutboxRow {
            seq,
            topic: "t".into(),
            partition_key: key.map(Into::into),
            attempts: 0,
            next_attempt_at: if due {
                now - Duration::from_secs(1)
            } else {
                now + Duration::from_secs(60)
            },
            message: Ok(Envelope::builder("/s", "e").build()),
        }
    }

    fn seqs(planned: &[Planned]) -> Vec<Vec<i64>> {
        planned
            .iter()
            .map(|p| match p {
                Planned::Group { rows, .. } => rows.iter().map(|r| r.seq).collect(),
                Planned::Corrupt(s, _) => vec![-s],
            })
            .collect()
    }

    #[test]
    fn rows_group_by_key_in_order_and_a_waiting_row_holds_its_key() {
        let rows = vec![
            row(1, Some("a"), true),
            row(2, Some("b"), false),
            row(3, None, true),
            row(4, Some("a"), true),
            row(5, Some("b"), true),
            row(6, None, false),
            row(7, Some("c"), true),
        ];
        let planned = plan(rows, SystemTime::now());
        assert_eq!(seqs(&planned), vec![vec![1, 4], vec![3], vec![7]]);
    }

    #[test]
    fn a_corrupt_row_is_set_apart_without_holding_its_key() {
        let mut bad = row(1, Some("a"), true);
        bad.message = Err("stored headers: eof".into());
        let planned = plan(vec![bad, row(2, Some("a"), true)], SystemTime::now());
        assert_eq!(seqs(&planned), vec![vec![-1], vec![2]]);
    }
}
