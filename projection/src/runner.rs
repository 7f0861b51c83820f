//! [`Runner`]: reads a positioned log and applies its events to a
//! [`Projection`] in batches, with the positions in the same transaction.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use surety_core::log::{LogEvent, LogOptions, LogRecord, LogSubscriber, StartPosition};
use surety_core::upcast::Upcasters;
use surety_core::{Classify, HandlerError};
use tokio::time::Instant;

use crate::error::ProjectionError;
use crate::metrics::ProjectionMetrics;
use crate::projection::{Applied, EventSet, Mode, Projection};
use crate::store::{CheckpointStore, Parked};
use surety_core::DeliveryInfo;
use surety_core::Envelope;
use surety_dlq::DeadLetter;
use surety_dlq::policy::DeadLetterReason;
use surety_dlq::store::DlqStore;

/// How a [`Runner`] batches, parallelises and retries.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RunnerOptions {
    /// A batch is applied once it holds this many events. Default 500.
    pub batch_size: usize,
    /// ... or once its first event waited this long. Default 100 ms.
    pub batch_time: Duration,
    /// Lanes applying a batch concurrently, each in its own transaction;
    /// one key's events always go to the same lane, in order. Default 1
    /// (one transaction per batch, positions in it).
    pub parallelism: usize,
    /// Where a partition without a stored checkpoint starts. Default
    /// [`StartPosition::Earliest`].
    pub start: StartPosition,
    /// Attempts at a batch that fails transiently before the runner gives
    /// up. Default 5.
    pub max_attempts: u32,
    /// The delay before the second attempt; it doubles each time, up to
    /// ten times. Default 50 ms.
    pub retry_delay: Duration,
    /// Live or rebuilding (passed to the projection with each event).
    /// Default [`Mode::Live`].
    pub mode: Mode,
    /// The name the checkpoints are stored under; default the projection's
    /// [name](Projection::name). A rebuild runs the same projection under
    /// another checkpoint name.
    pub checkpoint_name: Option<String>,
}

impl Default for RunnerOptions {
    fn default() -> Self {
        Self {
            batch_size: 500,
            batch_time: Duration::from_millis(100),
            parallelism: 1,
            start: StartPosition::Earliest,
            max_attempts: 5,
            retry_delay: Duration::from_millis(50),
            mode: Mode::Live,
            checkpoint_name: None,
        }
    }
}

impl RunnerOptions {
    /// Batches of up to `size` events, or what came within `time`.
    pub fn batch(mut self, size: usize, time: Duration) -> Self {
        self.batch_size = size.max(1);
        self.batch_time = time;
        self
    }

    /// `lanes` concurrent lanes per batch (at least 1).
    pub fn parallelism(mut self, lanes: usize) -> Self {
        self.parallelism = lanes.max(1);
        self
    }

    /// Where partitions without a checkpoint start.
    pub fn start(mut self, start: StartPosition) -> Self {
        self.start = start;
        self
    }

    /// Stores the checkpoints under `name` instead of the projection's name.
    pub fn checkpoint_name(mut self, name: impl Into<String>) -> Self {
        self.checkpoint_name = Some(name.into());
        self
    }

    /// Runs in `mode`.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Up to `attempts` attempts at a transiently failing batch, the second
    /// after `delay`.
    pub fn retry(mut self, attempts: u32, delay: Duration) -> Self {
        self.max_attempts = attempts.max(1);
        self.retry_delay = delay;
        self
    }
}

/// What a running [`Runner`] has done, shared with whoever holds a clone.
#[derive(Debug, Clone, Default)]
pub struct RunnerStatus {
    inner: Arc<Mutex<StatusInner>>,
}

#[derive(Debug, Default)]
struct StatusInner {
    applied: u64,
    batches: u64,
    positions: HashMap<i32, i64>,
    ends: HashMap<i32, i64>,
    caught_up: BTreeSet<i32>,
}

impl RunnerStatus {
    fn with<T>(&self, f: impl FnOnce(&mut StatusInner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Events committed (decoded events of other types included).
    pub fn applied(&self) -> u64 {
        self.with(|s| s.applied)
    }

    /// Batches committed.
    pub fn batches(&self) -> u64 {
        self.with(|s| s.batches)
    }

    /// The committed position (next offset) of each partition this runner
    /// holds.
    pub fn positions(&self) -> HashMap<i32, i64> {
        self.with(|s| s.positions.clone())
    }

    /// Whether every partition this runner holds has been read to the end
    /// the log reported when it caught up, and committed there.
    pub fn caught_up(&self) -> bool {
        self.with(|s| {
            !s.positions.is_empty()
                && s.positions.keys().all(|p| {
                    s.caught_up.contains(p)
                        && s.ends.get(p).is_some_and(|end| s.positions[p] >= *end)
                })
        })
    }

    /// Whether every partition this runner holds reached the end of its
    /// partition once, and the lag left in all of them together is at most
    /// `events`.
    pub fn caught_up_within(&self, events: u64) -> bool {
        let lag: i64 = self.lag().values().sum();
        self.with(|s| {
            !s.positions.is_empty() && s.positions.keys().all(|p| s.caught_up.contains(p))
        }) && u64::try_from(lag).unwrap_or(0) <= events
    }

    /// The lag in events of each partition this runner holds: the end the
    /// log last reported minus the committed position.
    pub fn lag(&self) -> HashMap<i32, i64> {
        self.with(|s| {
            s.positions
                .iter()
                .map(|(p, pos)| (*p, s.ends.get(p).map_or(0, |end| (end - pos).max(0))))
                .collect()
        })
    }
}

/// Where the runner stands in one partition it holds.
#[derive(Debug, Default)]
struct Partition {
    /// The stored checkpoint (what the next save expects to find).
    stored: Option<i64>,
    /// Offsets at or past `stored` already applied (by a lane).
    applied: BTreeSet<i64>,
    /// One past the last offset taken in (buffered or skipped).
    seen_next: Option<i64>,
    /// When the checkpoint last moved (or the partition was assigned).
    moved_at: Option<Instant>,
    /// The log timestamp of the last committed record.
    committed_time: Option<chrono::DateTime<chrono::Utc>>,
}

/// What one lane applies in one transaction.
struct Lane<E> {
    /// The decoded events, in order.
    events: Vec<Applied<E>>,
    /// Every offset the lane accounts for (events of other types included).
    offsets: Vec<(i32, i64)>,
    /// The first record's partition, offset and type, to name a failure.
    first: Option<(i32, i64, String)>,
}

impl<E> Default for Lane<E> {
    fn default() -> Self {
        Self {
            events: Vec::new(),
            offsets: Vec::new(),
            first: None,
        }
    }
}

/// Drives a [`Projection`] from a positioned log.
///
/// The runner joins `group` on `topic` through any [`LogSubscriber`] (the
/// in-memory log, Kafka through surety-kafka); on each assignment it loads
/// the stored checkpoints and seeks there (partitions without one start at
/// [`RunnerOptions::start`]). It decodes each record through the
/// [`Upcasters`], batches them by count and time, applies each batch in one
/// transaction per lane and stores each partition's next offset in the same
/// transaction. Records at offsets already applied (a redelivery, a replay
/// after a seek) are skipped, so an event is applied exactly once whatever
/// the crashes, restarts and rebalances.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # use sqlx::{Sqlite, Transaction};
/// # use surety_core::{HandlerError, Message};
/// # use surety_projection::{Applied, Projection};
/// use std::time::Duration;
/// use surety_core::memory::MemoryLog;
/// use surety_core::{Envelope, Publisher};
/// use surety_projection::{Runner, RunnerOptions, SqliteCheckpoints};
/// # #[derive(Serialize, Deserialize)]
/// # struct OrderPlaced { cents: i64 }
/// # impl Message for OrderPlaced { const TYPE: &'static str = "order.placed"; }
/// # struct Revenue;
/// # impl Projection<Sqlite> for Revenue {
/// #     type Event = OrderPlaced;
/// #     fn name(&self) -> &str { "revenue" }
/// #     async fn apply(&self, tx: &mut Transaction<'static, Sqlite>, e: &Applied<OrderPlaced>) -> Result<(), HandlerError> {
/// #         sqlx::query("UPDATE revenue SET cents = cents + $1").bind(e.event.cents)
/// #             .execute(&mut **tx).await.map_err(HandlerError::transient)?;
/// #         Ok(())
/// #     }
/// # }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = sqlx::SqlitePool::connect("sqlite::memory:").await?;
/// surety_projection::sqlite::migrate(&pool).await?;
/// sqlx::query("CREATE TABLE revenue (cents INTEGER NOT NULL); INSERT INTO revenue VALUES (0)")
///     .execute(&pool).await?;
///
/// let log = MemoryLog::with_partitions(2);
/// for cents in [100, 250] {
///     let event = Envelope::builder("/shop", "order.placed").payload(format!(r#"{{"cents":{cents}}}"#)).build();
///     log.publish("orders", event).await?;
/// }
///
/// let runner = Runner::new(log.clone(), "orders", "revenue", Revenue, SqliteCheckpoints::new(pool.clone()))
///     .options(RunnerOptions::default().batch(100, Duration::from_millis(10)));
/// let status = runner.status();
/// let task = tokio::spawn(runner.run());
/// while !status.caught_up() { tokio::time::sleep(Duration::from_millis(5)).await; }
/// task.abort();
///
/// let cents: i64 = sqlx::query_scalar("SELECT cents FROM revenue").fetch_one(&pool).await?;
/// assert_eq!(cents, 350);
/// # Ok(()) }
/// ```
pub struct Runner<L, P, S> {
    log: L,
    topic: String,
    group: String,
    projection: Arc<P>,
    store: S,
    upcasters: Arc<Upcasters>,
    options: RunnerOptions,
    status: RunnerStatus,
    dlq: Option<Arc<dyn DlqStore>>,
    metrics: Option<ProjectionMetrics>,
}

impl<L, P, S> std::fmt::Debug for Runner<L, P, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<L, P, S> Runner<L, P, S>
where
    L: LogSubscriber,
    S: CheckpointStore,
    P: Projection<S::Db>,
{
    /// A runner of `projection` over `topic`, as a member of `group`,
    /// storing its checkpoints in `store` (the read model's database).
    pub fn new(
        log: L,
        topic: impl Into<String>,
        group: impl Into<String>,
        projection: P,
        store: S,
    ) -> Self {
        Self {
            log,
            topic: topic.into(),
            group: group.into(),
            projection: Arc::new(projection),
            store,
            upcasters: Arc::new(Upcasters::new()),
            options: RunnerOptions::default(),
            status: RunnerStatus::default(),
            dlq: None,
            metrics: None,
        }
    }

    /// Reports to `metrics` (labelled with the checkpoint name).
    pub fn metrics(mut self, metrics: ProjectionMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Parks events that cannot be applied instead of stopping: an event
    /// whose failure is permanent or poison (or transient past its
    /// attempts) is written to `dlq` as a dead letter and parked under its
    /// key with the failure, in the transaction that moves past it; later
    /// events of the same key are parked behind it (in order) while every
    /// other key goes on. [`replay_parked`] applies a key's parked events
    /// once the cause is fixed.
    pub fn park_to(mut self, dlq: Arc<dyn DlqStore>) -> Self {
        self.dlq = Some(dlq);
        self
    }

    /// Decodes through `upcasters` (default: none, every event at its
    /// current version).
    pub fn upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = Arc::new(upcasters);
        self
    }

    /// Sets the options.
    pub fn options(mut self, options: RunnerOptions) -> Self {
        self.options = options;
        self
    }

    /// A handle on what the runner has done, for readiness and tests.
    pub fn status(&self) -> RunnerStatus {
        self.status.clone()
    }

    fn checkpoint_name(&self) -> &str {
        self.options
            .checkpoint_name
            .as_deref()
            .unwrap_or_else(|| self.projection.name())
    }

    /// Runs until the log's stream ends.
    ///
    /// # Errors
    ///
    /// When the log or the store fails past the retries, when an event
    /// cannot be applied, or when another runner moved a checkpoint of a
    /// partition this one holds ([`ProjectionError::Fenced`]). Nothing is
    /// committed past the failure: run again to resume.
    pub async fn run(self) -> Result<(), ProjectionError> {
        self.run_until(std::future::pending()).await
    }

    /// Runs until `shutdown` completes (then applies what it holds) or the
    /// log's stream ends.
    ///
    /// # Errors
    ///
    /// As [`run`](Self::run).
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ProjectionError> {
        if let Some(metrics) = &self.metrics {
            metrics.projection(self.checkpoint_name());
        }
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            match self.session(shutdown.as_mut()).await {
                Err(ProjectionError::Fenced { topic, partition }) => {
                    // Another runner applied events of a partition this one
                    // held (it lost the partition without noticing, or read
                    // its checkpoint just before the other's commit). Leave
                    // the group and join again, reloading every checkpoint.
                    tracing::warn!(%topic, partition, "projection checkpoint moved by another runner; rejoining");
                }
                other => return other,
            }
        }
    }

    /// One membership of the group: from joining to the end of the stream,
    /// the shutdown or an error.
    async fn session(
        &self,
        mut shutdown: std::pin::Pin<&mut (impl Future<Output = ()> + Send)>,
    ) -> Result<(), ProjectionError> {
        let mut stream = self
            .log
            .subscribe_log(
                &self.topic,
                &self.group,
                LogOptions::start(self.options.start),
            )
            .await?;
        let mut parts: HashMap<i32, Partition> = HashMap::new();
        let mut pending: Vec<LogRecord> = Vec::new();
        let mut deadline: Option<Instant> = None;
        let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let timer = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = &mut shutdown => {
                    return self.flush(&mut parts, &mut pending).await;
                }
                _ = heartbeat.tick() => {
                    self.refresh_metrics(&parts);
                }
                () = timer => {
                    deadline = None;
                    self.flush(&mut parts, &mut pending).await?;
                }
                event = stream.next() => match event {
                    None => return self.flush(&mut parts, &mut pending).await,
                    Some(Err(error)) => {
                        self.flush(&mut parts, &mut pending).await?;
                        return Err(error.into());
                    }
                    Some(Ok(LogEvent::Assigned(assignment))) => {
                        for assigned in assignment.partitions() {
                            let checkpoint = self
                                .store
                                .load(self.checkpoint_name(), &self.topic, assigned.partition)
                                .await?;
                            let start = checkpoint
                                .next_offset
                                .map_or(self.options.start, StartPosition::Offset);
                            assignment.seek(assigned.partition, start);
                            self.status.with(|s| {
                                s.ends.insert(assigned.partition, assigned.end_offset);
                                s.caught_up.remove(&assigned.partition);
                                if let Some(next) = checkpoint.next_offset {
                                    s.positions.insert(assigned.partition, next);
                                } else {
                                    s.positions.insert(assigned.partition, assigned.earliest_offset);
                                }
                            });
                            parts.insert(
                                assigned.partition,
                                Partition {
                                    stored: checkpoint.next_offset,
                                    seen_next: checkpoint.next_offset,
                                    applied: checkpoint.applied,
                                    moved_at: Some(Instant::now()),
                                    committed_time: None,
                                },
                            );
                        }
                    }
                    Some(Ok(LogEvent::Revoked(revoked))) => {
                        deadline = None;
                        self.flush(&mut parts, &mut pending).await?;
                        for partition in revoked {
                            parts.remove(&partition);
                            self.status.with(|s| {
                                s.positions.remove(&partition);
                                s.ends.remove(&partition);
                                s.caught_up.remove(&partition);
                            });
                        }
                    }
                    Some(Ok(LogEvent::CaughtUp { partition, end_offset })) => {
                        self.status.with(|s| {
                            s.caught_up.insert(partition);
                            let end = s.ends.entry(partition).or_default();
                            *end = (*end).max(end_offset);
                        });
                    }
                    Some(Ok(LogEvent::Record(record))) => {
                        let Some(part) = parts.get_mut(&record.partition()) else {
                            continue;
                        };
                        let offset = record.offset();
                        if part.seen_next.is_some_and(|next| offset < next) {
                            continue; // a redelivery of a record taken in already
                        }
                        part.seen_next = Some(offset + 1);
                        self.status.with(|s| {
                            let end = s.ends.entry(record.partition()).or_default();
                            *end = (*end).max(offset + 1);
                        });
                        if part.applied.contains(&offset) {
                            // Applied by a lane before a restart: nothing to
                            // apply, but the checkpoint must still pass it.
                            deadline.get_or_insert_with(|| Instant::now() + self.options.batch_time);
                            continue;
                        }
                        pending.push(record);
                        if pending.len() == 1 {
                            deadline = Some(Instant::now() + self.options.batch_time);
                        }
                        if pending.len() >= self.options.batch_size {
                            deadline = None;
                            self.flush(&mut parts, &mut pending).await?;
                        }
                    }
                    Some(Ok(_)) => {}
                }
            }
        }
    }

    /// Applies what is pending and moves every partition's checkpoint to
    /// what was taken in.
    async fn flush(
        &self,
        parts: &mut HashMap<i32, Partition>,
        pending: &mut Vec<LogRecord>,
    ) -> Result<(), ProjectionError> {
        let mut moves = moves_of(parts);
        if moves.is_empty() && pending.is_empty() {
            return Ok(());
        }
        let records = std::mem::take(pending);
        let count = records.len() as u64;
        let lanes = self.options.parallelism.max(1);
        let name = self.checkpoint_name();
        let mut parked_keys = match &self.dlq {
            Some(_) => self.store.parked_keys(name, &self.topic).await?,
            None => HashSet::new(),
        };
        // Keys parked before this batch: an event the decoding below parks
        // holds back the later events of its key, not the earlier ones
        // still in the lanes.
        let parked_before = parked_keys.clone();
        let mut parks: Vec<Parked> = Vec::new();
        let mut by_lane: Vec<Lane<P::Event>> = (0..lanes).map(|_| Lane::default()).collect();
        let mut times: HashMap<i32, chrono::DateTime<chrono::Utc>> = HashMap::new();
        for record in records {
            let partition = record.partition();
            let offset = record.offset();
            if let Some(time) = record.timestamp() {
                times.insert(partition, time);
            }
            let key = key_of(record.envelope());
            let event_type = record.envelope().event_type.clone();
            if self.dlq.is_some() && parked_keys.contains(&key) {
                let (envelope, info) = record.into_parts();
                parks.push(self.parked(&envelope, &info, key, &behind()));
                continue;
            }
            let backup = self
                .dlq
                .is_some()
                .then(|| (record.envelope().clone(), record.info().clone()));
            let applied = match (self.decode(record), backup) {
                (Ok(applied), _) => applied,
                (Err(ProjectionError::Apply { source, .. }), Some((envelope, info))) => {
                    let park = self.parked(&envelope, &info, key.clone(), &source);
                    self.dead_letter(&park).await?;
                    parks.push(park);
                    parked_keys.insert(key);
                    continue;
                }
                (Err(error), _) => return Err(error),
            };
            let lane = if lanes == 1 {
                0
            } else {
                let mut hasher = DefaultHasher::new();
                key.hash(&mut hasher);
                (hasher.finish() % lanes as u64) as usize
            };
            let lane = &mut by_lane[lane];
            lane.first.get_or_insert((partition, offset, event_type));
            lane.offsets.push((partition, offset));
            lane.events.extend(applied);
        }

        let mut parked = parks.len();
        if lanes == 1 {
            let lane = by_lane.pop().unwrap_or_default();
            match self
                .retrying(|| self.apply_lane(&lane, Some(&moves), &parks))
                .await
            {
                Ok(()) => {}
                Err(error) if self.parks(&error) => {
                    parked += self.one_by_one(&lane, parked_before).await?;
                    let empty = Lane::default();
                    self.retrying(|| self.apply_lane(&empty, Some(&moves), &parks))
                        .await?;
                }
                Err(error) => return Err(error),
            }
        } else {
            let parked_before = &parked_before;
            let results = futures::future::join_all(
                by_lane
                    .iter()
                    .filter(|lane| !lane.offsets.is_empty())
                    .map(|lane| async move {
                        let result = match self.retrying(|| self.apply_lane(lane, None, &[])).await
                        {
                            Err(error) if self.parks(&error) => {
                                self.one_by_one(lane, parked_before.clone()).await
                            }
                            other => other.map(|()| 0),
                        };
                        (lane, result)
                    }),
            )
            .await;
            let mut failure = None;
            for (lane, result) in results {
                match result {
                    Ok(n) => {
                        parked += n;
                        for (partition, offset) in &lane.offsets {
                            if let Some(part) = parts.get_mut(partition) {
                                part.applied.insert(*offset);
                            }
                        }
                    }
                    Err(error) => failure = failure.or(Some(error)),
                }
            }
            if let Some(error) = failure {
                return Err(error);
            }
            moves = moves_of(parts);
            let empty = Lane::default();
            self.retrying(|| self.apply_lane(&empty, Some(&moves), &parks))
                .await?;
        }
        for (partition, _, next, _) in &moves {
            if let Some(part) = parts.get_mut(partition) {
                part.stored = Some(*next);
                part.applied = part.applied.split_off(next);
                part.moved_at = Some(Instant::now());
                if let Some(time) = times.get(partition) {
                    part.committed_time = Some(*time);
                }
            }
        }
        self.status.with(|s| {
            s.applied += count;
            s.batches += 1;
            for (partition, _, next, _) in &moves {
                s.positions.insert(*partition, *next);
            }
        });
        if let Some(metrics) = &self.metrics {
            let name = self.checkpoint_name();
            metrics.applied(name, count);
            metrics.batch(name, count as usize);
            if parked > 0 {
                metrics.parked(name, parked as u64);
            }
        }
        self.refresh_metrics(parts);
        Ok(())
    }

    /// Sets the lag, checkpoint age and heartbeat gauges.
    fn refresh_metrics(&self, parts: &HashMap<i32, Partition>) {
        let Some(metrics) = &self.metrics else {
            return;
        };
        let name = self.checkpoint_name();
        metrics.heartbeat(name);
        let lags = self.status.lag();
        let now = chrono::Utc::now();
        for (partition, part) in parts {
            let lag = lags.get(partition).copied().unwrap_or(0);
            let seconds = match (lag > 0, part.committed_time) {
                (true, Some(time)) => (now - time).num_milliseconds().max(0) as f64 / 1000.0,
                _ => 0.0,
            };
            metrics.set_lag(name, &self.topic, *partition, lag, seconds);
            let age = part.moved_at.map_or(0.0, |at| at.elapsed().as_secs_f64());
            metrics.set_checkpoint_age(name, &self.topic, *partition, age);
        }
    }

    fn decode(&self, record: LogRecord) -> Result<Option<Applied<P::Event>>, ProjectionError> {
        let partition = record.partition();
        let offset = record.offset();
        let timestamp = record.timestamp();
        let (envelope, _) = record.into_parts();
        let event = P::Event::decode(&self.upcasters, &envelope).map_err(|error| {
            ProjectionError::Apply {
                topic: self.topic.clone(),
                partition,
                offset,
                event_type: envelope.event_type.clone(),
                source: HandlerError::with_class(error.class(), error),
            }
        })?;
        Ok(event.map(|event| Applied {
            event,
            envelope,
            topic: self.topic.clone(),
            partition,
            offset,
            timestamp,
            mode: self.options.mode,
        }))
    }

    /// One transaction: the lane's events, then either the checkpoint moves
    /// or the lane's offsets marked applied.
    async fn apply_lane(
        &self,
        lane: &Lane<P::Event>,
        moves: Option<&[Move]>,
        parks: &[Parked],
    ) -> Result<(), ProjectionError> {
        let name = self.checkpoint_name();
        let mut tx = self.store.begin().await?;
        for park in parks {
            S::park(&mut tx, name, &self.topic, park).await?;
        }
        if !lane.events.is_empty()
            && let Err(source) = self.projection.apply_batch(&mut tx, &lane.events).await
        {
            let (partition, offset, event_type) = lane.first.clone().unwrap_or_default();
            return Err(ProjectionError::Apply {
                topic: self.topic.clone(),
                partition,
                offset,
                event_type,
                source,
            });
        }
        match moves {
            Some(moves) => {
                for (partition, expected, next, known) in moves {
                    S::save(
                        &mut tx,
                        name,
                        &self.topic,
                        *partition,
                        *expected,
                        *next,
                        *known,
                    )
                    .await?;
                }
            }
            None => {
                let mut by_partition: HashMap<i32, Vec<i64>> = HashMap::new();
                for (partition, offset) in &lane.offsets {
                    by_partition.entry(*partition).or_default().push(*offset);
                }
                for (partition, offsets) in by_partition {
                    S::mark_applied(&mut tx, name, &self.topic, partition, &offsets).await?;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Whether `error` parks the event rather than stopping the runner.
    fn parks(&self, error: &ProjectionError) -> bool {
        self.dlq.is_some() && matches!(error, ProjectionError::Apply { .. })
    }

    fn parked(
        &self,
        envelope: &Envelope,
        info: &DeliveryInfo,
        key: String,
        error: &HandlerError,
    ) -> Parked {
        let letter = DeadLetter::new(
            envelope,
            info,
            error,
            DeadLetterReason::NotRetryable,
            1,
            self.checkpoint_name(),
            &surety_core::host::host_name(),
        );
        Parked {
            key,
            partition: info.partition.unwrap_or_default(),
            offset: info.offset.unwrap_or_default(),
            letter,
        }
    }

    /// Writes the dead letter of the event that failed (not of those parked
    /// behind it).
    async fn dead_letter(&self, park: &Parked) -> Result<(), ProjectionError> {
        if let Some(dlq) = &self.dlq {
            dlq.put(&park.letter)
                .await
                .map_err(ProjectionError::store)?;
        }
        Ok(())
    }

    /// Applies a lane that failed event by event, each in its own
    /// transaction with its offset marked applied, parking the one that
    /// fails and every later event of its key.
    async fn one_by_one(
        &self,
        lane: &Lane<P::Event>,
        mut parked_keys: HashSet<String>,
    ) -> Result<usize, ProjectionError> {
        let name = self.checkpoint_name();
        let mut parked = 0;
        for event in &lane.events {
            let key = key_of(&event.envelope);
            let info = info_of(event, &self.group);
            let park = if parked_keys.contains(&key) {
                Some(self.parked(&event.envelope, &info, key, &behind()))
            } else {
                let result = self
                    .retrying(|| async {
                        let mut tx = self.store.begin().await?;
                        if let Err(source) = self
                            .projection
                            .apply_batch(&mut tx, std::slice::from_ref(event))
                            .await
                        {
                            return Err(ProjectionError::Apply {
                                topic: self.topic.clone(),
                                partition: event.partition,
                                offset: event.offset,
                                event_type: event.envelope.event_type.clone(),
                                source,
                            });
                        }
                        S::mark_applied(
                            &mut tx,
                            name,
                            &self.topic,
                            event.partition,
                            &[event.offset],
                        )
                        .await?;
                        tx.commit().await?;
                        Ok(())
                    })
                    .await;
                match result {
                    Ok(()) => None,
                    Err(ProjectionError::Apply { source, .. }) => {
                        let park = self.parked(&event.envelope, &info, key.clone(), &source);
                        self.dead_letter(&park).await?;
                        parked_keys.insert(key);
                        Some(park)
                    }
                    Err(error) => return Err(error),
                }
            };
            if let Some(park) = park {
                parked += 1;
                tracing::warn!(
                    topic = %self.topic,
                    partition = park.partition,
                    offset = park.offset,
                    key = %park.key,
                    "projection event parked"
                );
                self.retrying(|| async {
                    let mut tx = self.store.begin().await?;
                    S::park(&mut tx, name, &self.topic, &park).await?;
                    S::mark_applied(&mut tx, name, &self.topic, park.partition, &[park.offset])
                        .await?;
                    tx.commit().await?;
                    Ok(())
                })
                .await?;
            }
        }
        Ok(parked)
    }

    async fn retrying<'a, F, Fut>(&'a self, mut attempt: F) -> Result<(), ProjectionError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), ProjectionError>> + 'a,
    {
        let mut delay = self.options.retry_delay;
        let mut attempts = 0;
        loop {
            attempts += 1;
            match attempt().await {
                Ok(()) => return Ok(()),
                Err(error) => {
                    let class = error.class();
                    if !class.is_retryable() || attempts >= self.options.max_attempts {
                        return Err(error);
                    }
                    tracing::warn!(%error, attempts, "projection batch failed; retrying");
                    let hint = match class {
                        surety_core::ErrorClass::Transient { retry_after } => retry_after,
                        _ => None,
                    };
                    tokio::time::sleep(hint.unwrap_or(delay).max(delay)).await;
                    delay = (delay * 2).min(self.options.retry_delay * 1024);
                }
            }
        }
    }
}

/// A checkpoint move: partition, the stored offset expected, the new one,
/// and how many offsets below the new one this runner knows applied by
/// lanes.
type Move = (i32, Option<i64>, i64, u64);

/// The checkpoint moves up to what each partition took in.
fn moves_of(parts: &HashMap<i32, Partition>) -> Vec<Move> {
    parts
        .iter()
        .filter_map(|(p, part)| {
            let next = part.seen_next?;
            (part.stored != Some(next)).then(|| {
                let known = part.applied.range(..next).count() as u64;
                (*p, part.stored, next, known)
            })
        })
        .collect()
}

/// The key events are ordered and parked by: the partition key, or the
/// envelope id when there is none (such an event holds back nothing).
fn key_of(envelope: &Envelope) -> String {
    envelope
        .partition_key
        .clone()
        .unwrap_or_else(|| envelope.id.clone())
}

/// The failure recorded for an event parked behind an earlier one.
fn behind() -> HandlerError {
    HandlerError::permanent("an earlier event of this key is parked")
}

fn info_of<E>(event: &Applied<E>, group: &str) -> DeliveryInfo {
    let mut info = DeliveryInfo::new("log", event.topic.clone(), group.to_owned());
    info.partition = Some(event.partition);
    info.offset = Some(event.offset);
    info.timestamp = event.timestamp;
    info
}

/// Applies the parked events of `key` in order, in one transaction that
/// also removes them from the parked set, once the cause of the failure is
/// fixed; returns how many were applied. The runner parks later events of
/// the key while any of its events is parked, so replaying the key again
/// after a runner parked more of them keeps their order.
///
/// # Errors
///
/// When an event still fails (nothing is applied or removed then) or the
/// store fails.
pub async fn replay_parked<P, S>(
    projection: &P,
    store: &S,
    upcasters: &Upcasters,
    topic: &str,
    checkpoint_name: &str,
    key: &str,
) -> Result<usize, ProjectionError>
where
    S: CheckpointStore,
    P: Projection<S::Db>,
{
    let parked = store.parked(checkpoint_name, topic, key).await?;
    let mut tx = store.begin().await?;
    for park in &parked {
        let envelope = park.letter.envelope.clone();
        let fail = |source: HandlerError| ProjectionError::Apply {
            topic: topic.to_owned(),
            partition: park.partition,
            offset: park.offset,
            event_type: envelope.event_type.clone(),
            source,
        };
        let event = P::Event::decode(upcasters, &envelope)
            .map_err(|error| fail(HandlerError::with_class(error.class(), error)))?;
        if let Some(event) = event {
            let applied = Applied {
                event,
                envelope: envelope.clone(),
                topic: topic.to_owned(),
                partition: park.partition,
                offset: park.offset,
                timestamp: None,
                mode: Mode::Live,
            };
            projection
                .apply_batch(&mut tx, std::slice::from_ref(&applied))
                .await
                .map_err(fail)?;
        }
        S::unpark(&mut tx, checkpoint_name, topic, park.partition, park.offset).await?;
    }
    tx.commit().await?;
    Ok(parked.len())
}
