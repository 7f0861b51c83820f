//! [`IdempotencyMetrics`]: duplicates suppressed, first-time handling,
//! lease takeovers, busy keys, store latency, store size and evictions.

use std::future::Future;
use std::ops::Deref;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use surety_core::DeliveryInfo;
use surety_core::metrics::PREFIX;

/// Labels of the per-delivery counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConsumeLabels {
    messaging_system: String,
    messaging_destination_name: String,
    messaging_consumer_group_name: String,
}

impl ConsumeLabels {
    fn of(info: &DeliveryInfo) -> Self {
        Self {
            messaging_system: info.system.to_owned(),
            messaging_destination_name: info.topic.clone(),
            messaging_consumer_group_name: info.group.clone(),
        }
    }

    fn matches(&self, info: &DeliveryInfo) -> bool {
        self.messaging_destination_name == info.topic
            && self.messaging_consumer_group_name == info.group
            && self.messaging_system == info.system
    }
}

/// Labels of the store latency histogram: the consumer the operation
/// served (empty for the cleanup's and other operations outside a
/// delivery), the operation and its outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    messaging_system: String,
    messaging_destination_name: String,
    messaging_consumer_group_name: String,
    operation: &'static str,
    outcome: &'static str,
}

impl StoreLabels {
    fn of(consumer: Option<&ConsumeLabels>, operation: &'static str, ok: bool) -> Self {
        let (system, topic, group) =
            consumer.map_or((String::new(), String::new(), String::new()), |c| {
                (
                    c.messaging_system.clone(),
                    c.messaging_destination_name.clone(),
                    c.messaging_consumer_group_name.clone(),
                )
            });
        Self {
            messaging_system: system,
            messaging_destination_name: topic,
            messaging_consumer_group_name: group,
            operation,
            outcome: outcome(ok),
        }
    }
}

/// Store latency buckets: 0.1 ms doubling to about 3.3 s.
#[derive(Clone, Copy, Debug, Default)]
struct StoreBuckets;

impl MetricConstructor<Histogram> for StoreBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(exponential_buckets(0.000_1, 2.0, 16))
    }
}

/// surety-idempotency's metrics. Clones share the same series.
///
/// Register once with [`register`](Self::register) and hand clones to the
/// [`IdempotencyLayer`](crate::IdempotencyLayer) and the
/// [`Cleanup`](crate::Cleanup) task. The names are listed in
/// `docs/reference/metrics.md`.
///
/// ```
/// use prometheus_client::registry::Registry;
/// use surety_idempotency::IdempotencyMetrics;
///
/// let mut registry = Registry::default();
/// let metrics = IdempotencyMetrics::register(&mut registry);
/// metrics.set_store_size(42);
///
/// let mut text = String::new();
/// prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
/// assert!(text.contains("surety_idempotency_store_size 42"));
/// ```
#[derive(Clone, Debug)]
pub struct IdempotencyMetrics {
    duplicates: Family<ConsumeLabels, Counter>,
    processed: Family<ConsumeLabels, Counter>,
    lease_takeovers: Family<ConsumeLabels, Counter>,
    busy: Family<ConsumeLabels, Counter>,
    store_duration: Family<StoreLabels, Histogram, StoreBuckets>,
    store_size: Gauge,
    store_evictions: Counter,
    /// Series already looked up, so that recording a delivery neither
    /// allocates label sets nor hashes them.
    resolved: Arc<Resolved>,
}

impl Default for IdempotencyMetrics {
    /// Metrics that are recorded but not registered anywhere.
    fn default() -> Self {
        Self {
            duplicates: Family::default(),
            processed: Family::default(),
            lease_takeovers: Family::default(),
            busy: Family::default(),
            store_duration: Family::new_with_constructor(StoreBuckets),
            store_size: Gauge::default(),
            store_evictions: Counter::default(),
            resolved: Arc::default(),
        }
    }
}

/// A dedup store operation, as the `operation` label names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Claim,
    Extend,
    Complete,
    Release,
    Begin,
    Commit,
    Purge,
    Size,
}

impl Op {
    const ALL: [Op; 8] = [
        Op::Claim,
        Op::Extend,
        Op::Complete,
        Op::Release,
        Op::Begin,
        Op::Commit,
        Op::Purge,
        Op::Size,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Op::Claim => "claim",
            Op::Extend => "extend",
            Op::Complete => "complete",
            Op::Release => "release",
            Op::Begin => "begin",
            Op::Commit => "commit",
            Op::Purge => "purge",
            Op::Size => "size",
        }
    }

    /// The operations a delivery runs (the rest are the cleanup's).
    const PER_MESSAGE: [Op; 6] = [
        Op::Claim,
        Op::Extend,
        Op::Complete,
        Op::Release,
        Op::Begin,
        Op::Commit,
    ];

    fn named(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.as_str() == name)
    }
}

/// How many consumers (system, topic, group) get resolved counters; the
/// deliveries of further ones are counted through the label lookup.
const CONSUMER_SLOTS: usize = 16;

/// Pre-resolved handles into the metric families.
#[derive(Debug, Default)]
struct Resolved {
    /// `store_duration` outside a delivery, per operation, `[ok, error]`.
    store_duration: [[OnceLock<Histogram>; 2]; Op::ALL.len()],
    /// Counters per consumer, filled in order and never removed.
    consumers: [OnceLock<Arc<ConsumerSeries>>; CONSUMER_SLOTS],
    /// Serialises filling a consumer slot.
    adding: Mutex<()>,
}

/// The per-delivery series of one consumer: its counters and its store
/// latency per operation, each resolved once.
#[derive(Debug)]
pub(crate) struct ConsumerSeries {
    labels: ConsumeLabels,
    duplicates: OnceLock<Counter>,
    processed: OnceLock<Counter>,
    lease_takeovers: OnceLock<Counter>,
    busy: OnceLock<Counter>,
    /// `store_duration` per operation, `[ok, error]`.
    store: [[OnceLock<Histogram>; 2]; Op::ALL.len()],
}

impl ConsumerSeries {
    fn new(info: &DeliveryInfo) -> Self {
        Self {
            labels: ConsumeLabels::of(info),
            duplicates: OnceLock::new(),
            processed: OnceLock::new(),
            lease_takeovers: OnceLock::new(),
            busy: OnceLock::new(),
            store: Default::default(),
        }
    }

    /// Creates every series of the consumer at zero, so that a dashboard
    /// or an alert on takeovers or store errors sees a 0, not a missing
    /// series.
    fn create_all(&self, metrics: &IdempotencyMetrics) {
        for (slot, family) in [
            (&self.duplicates, &metrics.duplicates),
            (&self.processed, &metrics.processed),
            (&self.lease_takeovers, &metrics.lease_takeovers),
            (&self.busy, &metrics.busy),
        ] {
            let _ = slot.get_or_init(|| family.get_or_create(&self.labels).clone());
        }
        for op in Op::PER_MESSAGE {
            for ok in [true, false] {
                let _ = self.histogram(metrics, op, ok);
            }
        }
    }

    fn inc(&self, slot: &OnceLock<Counter>, family: &Family<ConsumeLabels, Counter>) {
        slot.get_or_init(|| family.get_or_create(&self.labels).clone())
            .inc();
    }

    fn histogram(&self, metrics: &IdempotencyMetrics, op: Op, ok: bool) -> &Histogram {
        // `Op::ALL` lists the variants in declaration order.
        self.store[op as usize][usize::from(!ok)].get_or_init(|| {
            metrics
                .store_duration
                .get_or_create(&StoreLabels::of(Some(&self.labels), op.as_str(), ok))
                .clone()
        })
    }
}

/// The counters of the consumer a delivery came from, looked up once per
/// delivery (see [`IdempotencyMetrics::series`]).
#[derive(Debug)]
pub(crate) struct Series<'a> {
    metrics: &'a IdempotencyMetrics,
    consumer: SeriesRef<'a>,
}

#[derive(Debug)]
enum SeriesRef<'a> {
    Resolved(&'a Arc<ConsumerSeries>),
    Own(Arc<ConsumerSeries>),
}

impl Deref for SeriesRef<'_> {
    type Target = Arc<ConsumerSeries>;

    fn deref(&self) -> &Arc<ConsumerSeries> {
        match self {
            SeriesRef::Resolved(series) => series,
            SeriesRef::Own(series) => series,
        }
    }
}

/// A consumer's counters as a delivery's future keeps them, without
/// borrowing the metrics (see [`IdempotencyMetrics::attach`]): a resolved
/// slot's, or, beyond [`CONSUMER_SLOTS`] consumers, its own.
#[derive(Clone, Debug)]
pub(crate) struct SeriesHandle(Arc<ConsumerSeries>);

impl Series<'_> {
    pub(crate) fn duplicate(&self) {
        self.consumer
            .inc(&self.consumer.duplicates, &self.metrics.duplicates);
    }

    pub(crate) fn processed(&self) {
        self.consumer
            .inc(&self.consumer.processed, &self.metrics.processed);
    }

    pub(crate) fn lease_takeover(&self) {
        self.consumer.inc(
            &self.consumer.lease_takeovers,
            &self.metrics.lease_takeovers,
        );
    }

    pub(crate) fn busy(&self) {
        self.consumer.inc(&self.consumer.busy, &self.metrics.busy);
    }

    /// Records a store operation of this consumer's that ended `ok` after
    /// `seconds`.
    pub(crate) fn observe(&self, op: Op, ok: bool, seconds: f64) {
        self.consumer
            .histogram(self.metrics, op, ok)
            .observe(seconds);
    }

    /// Runs a store operation of this consumer's and records its duration;
    /// without `clock`, with a duration of zero (see
    /// [`DedupStore::in_memory`](crate::DedupStore::in_memory)).
    pub(crate) async fn timed<T, E>(
        &self,
        op: Op,
        clock: bool,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        clocked(clock, fut, |ok, seconds| self.observe(op, ok, seconds)).await
    }

    /// These series as a handle that does not borrow the metrics (for an
    /// inbox transaction).
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    pub(crate) fn handle(&self) -> SeriesHandle {
        SeriesHandle(Arc::clone(&self.consumer))
    }
}

impl IdempotencyMetrics {
    /// Creates the metrics and registers them in `registry` under
    /// `surety_idempotency_`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let registry = registry
            .sub_registry_with_prefix(PREFIX)
            .sub_registry_with_prefix("idempotency");
        registry.register(
            "duplicates",
            "Deliveries of already handled messages, acknowledged without running the handler",
            metrics.duplicates.clone(),
        );
        registry.register(
            "processed",
            "Messages handled for the first time and marked done",
            metrics.processed.clone(),
        );
        registry.register(
            "lease_takeovers",
            "Claims that took over a key whose previous holder's lease had expired",
            metrics.lease_takeovers.clone(),
        );
        registry.register(
            "busy",
            "Deliveries sent back for later because another delivery of the same key held a live lease",
            metrics.busy.clone(),
        );
        registry.register(
            "store_duration_seconds",
            "Time spent in dedup store operations, by operation and outcome (ok, error)",
            metrics.store_duration.clone(),
        );
        // The cleanup's operations are series from the start, so a
        // dashboard or an alert on errors sees a zero, not a missing series;
        // a consumer's come with its first delivery.
        for op in [Op::Purge, Op::Size] {
            for ok in [true, false] {
                let _ = metrics.resolved_store(op, ok);
            }
        }
        registry.register(
            "store_size",
            "Keys held by the dedup store (claimed and done), as of the last cleanup run",
            metrics.store_size.clone(),
        );
        registry.register(
            "store_evictions",
            "Completed keys a full in-memory dedup store evicted before their time to make room",
            metrics.store_evictions.clone(),
        );
        metrics
    }

    /// The counters of the consumer `info` names: resolved once and kept
    /// for the first [`CONSUMER_SLOTS`] consumers, so that counting a
    /// delivery is an atomic increment.
    pub(crate) fn series(&self, info: &DeliveryInfo) -> Series<'_> {
        Series {
            metrics: self,
            consumer: SeriesRef::Own(self.handle(info).0),
        }
    }

    /// [`series`](Self::series) as a handle that does not borrow the
    /// metrics.
    pub(crate) fn handle(&self, info: &DeliveryInfo) -> SeriesHandle {
        let slots = &self.resolved.consumers;
        let resolved = || {
            slots
                .iter()
                .map_while(OnceLock::get)
                .find(|series| series.labels.matches(info))
                .map(|series| SeriesHandle(Arc::clone(series)))
        };
        if let Some(handle) = resolved() {
            return handle;
        }
        let _adding = self
            .resolved
            .adding
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(handle) = resolved() {
            return handle;
        }
        let series = Arc::new(ConsumerSeries::new(info));
        if let Some(free) = slots.iter().find(|slot| slot.get().is_none()) {
            // Beyond the slots, a consumer's series appear as they are
            // recorded, without a lookup per delivery to prime them.
            series.create_all(self);
            let _ = free.set(Arc::clone(&series));
        }
        SeriesHandle(series)
    }

    /// The counters a [`handle`](Self::handle) names.
    pub(crate) fn attach<'a>(&'a self, handle: &'a SeriesHandle) -> Series<'a> {
        Series {
            metrics: self,
            consumer: SeriesRef::Resolved(&handle.0),
        }
    }

    /// Counts a duplicate delivery that was acknowledged without running
    /// the handler.
    pub fn duplicate(&self, info: &DeliveryInfo) {
        self.series(info).duplicate();
    }

    /// Counts a message handled for the first time.
    pub fn processed(&self, info: &DeliveryInfo) {
        self.series(info).processed();
    }

    /// Counts a takeover of an expired lease.
    pub fn lease_takeover(&self, info: &DeliveryInfo) {
        self.series(info).lease_takeover();
    }

    /// Counts a delivery sent back because its key was busy.
    pub fn busy(&self, info: &DeliveryInfo) {
        self.series(info).busy();
    }

    /// Sets the store size gauge.
    pub fn set_store_size(&self, keys: u64) {
        self.store_size.set(i64::try_from(keys).unwrap_or(i64::MAX));
    }

    /// Counts `keys` completed keys evicted from a full store.
    /// [`MemoryDedupStore::metrics`](crate::MemoryDedupStore::metrics) does this
    /// itself.
    pub fn store_evicted(&self, keys: u64) {
        self.store_evictions.inc_by(keys);
    }

    /// Runs a store operation named `operation` and records its duration.
    pub async fn time<T, E>(
        &self,
        operation: &'static str,
        op: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let started = Instant::now();
        let result = op.await;
        let seconds = started.elapsed().as_secs_f64();
        match Op::named(operation) {
            Some(known) => self.observe(known, result.is_ok(), seconds),
            None => self
                .store_duration
                .get_or_create(&StoreLabels::of(None, operation, result.is_ok()))
                .observe(seconds),
        }
        result
    }

    /// [`time`](Self::time) for the crate's own operations outside a
    /// delivery, through pre-resolved series. Without `clock`, the
    /// operation is recorded with a duration of zero (see
    /// [`DedupStore::in_memory`](crate::DedupStore::in_memory)).
    pub(crate) async fn timed<T, E>(
        &self,
        op: Op,
        clock: bool,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        clocked(clock, fut, |ok, seconds| self.observe(op, ok, seconds)).await
    }

    pub(crate) fn observe(&self, op: Op, ok: bool, seconds: f64) {
        self.resolved_store(op, ok).observe(seconds);
    }

    fn resolved_store(&self, op: Op, ok: bool) -> &Histogram {
        // `Op::ALL` lists the variants in declaration order.
        self.resolved.store_duration[op as usize][usize::from(!ok)].get_or_init(|| {
            self.store_duration
                .get_or_create(&StoreLabels::of(None, op.as_str(), ok))
                .clone()
        })
    }
}

/// Runs `fut`, timed when `clock` says so (else recorded as taking no
/// time), and hands `record` whether it succeeded and how long it took.
async fn clocked<T, E>(
    clock: bool,
    fut: impl Future<Output = Result<T, E>>,
    record: impl FnOnce(bool, f64),
) -> Result<T, E> {
    let started = clock.then(Instant::now);
    let result = fut.await;
    record(
        result.is_ok(),
        started.map_or(0.0, |started| started.elapsed().as_secs_f64()),
    );
    result
}

fn outcome(ok: bool) -> &'static str {
    if ok { "ok" } else { "error" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposition(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    #[tokio::test]
    async fn resolved_series_count_like_the_families() {
        let mut registry = Registry::default();
        let metrics = IdempotencyMetrics::register(&mut registry);
        // More consumers than there are resolved slots.
        for n in 0..CONSUMER_SLOTS + 4 {
            let info = DeliveryInfo::new("memory", format!("topic-{n}"), "g");
            metrics.processed(&info);
            metrics.series(&info).processed();
        }
        metrics.lease_takeover(&DeliveryInfo::new("memory", "topic-0", "g"));
        let text = exposition(&registry);
        for n in 0..CONSUMER_SLOTS + 4 {
            let line = format!(
                "surety_idempotency_processed_total{{messaging_system=\"memory\",messaging_destination_name=\"topic-{n}\",messaging_consumer_group_name=\"g\"}} 2"
            );
            assert!(text.contains(&line), "{line} in\n{text}");
        }
        assert!(text.contains("surety_idempotency_lease_takeovers_total{messaging_system=\"memory\",messaging_destination_name=\"topic-0\",messaging_consumer_group_name=\"g\"} 1"));
        // A consumer with a slot has every series from its first delivery,
        // at zero; one beyond the slots gets them as they are recorded.
        let consumer = |n: usize| {
            format!(
                "messaging_system=\"memory\",messaging_destination_name=\"topic-{n}\",messaging_consumer_group_name=\"g\""
            )
        };
        for line in [
            format!("surety_idempotency_duplicates_total{{{}}} 0", consumer(0)),
            format!("surety_idempotency_busy_total{{{}}} 0", consumer(3)),
            format!(
                "surety_idempotency_store_duration_seconds_count{{{},operation=\"extend\",outcome=\"error\"}} 0",
                consumer(0)
            ),
        ] {
            assert!(text.contains(&line), "{line} in\n{text}");
        }
        let beyond = consumer(CONSUMER_SLOTS + 1);
        assert!(
            !text.contains(&format!("surety_idempotency_duplicates_total{{{beyond}}}")),
            "{text}"
        );

        // Store operations of a delivery carry its consumer; the others
        // (the cleanup's) carry empty consumer labels.
        let series = metrics.series(&DeliveryInfo::new("memory", "topic-0", "g"));
        series
            .timed(Op::Claim, false, async { Ok::<_, ()>(()) })
            .await
            .unwrap();
        series
            .timed(Op::Complete, true, async { Err::<(), _>(()) })
            .await
            .unwrap_err();
        metrics
            .time("purge", async { Ok::<_, ()>(()) })
            .await
            .unwrap();
        metrics
            .timed(Op::Purge, false, async { Ok::<_, ()>(()) })
            .await
            .unwrap();
        let text = exposition(&registry);
        let nobody = "messaging_system=\"\",messaging_destination_name=\"\",messaging_consumer_group_name=\"\"";
        for line in [
            format!(
                "surety_idempotency_store_duration_seconds_count{{{},operation=\"claim\",outcome=\"ok\"}} 1",
                consumer(0)
            ),
            format!(
                "surety_idempotency_store_duration_seconds_count{{{},operation=\"complete\",outcome=\"error\"}} 1",
                consumer(0)
            ),
            format!(
                "surety_idempotency_store_duration_seconds_count{{{nobody},operation=\"purge\",outcome=\"ok\"}} 2"
            ),
            // The cleanup's operations are there from registration.
            format!(
                "surety_idempotency_store_duration_seconds_count{{{nobody},operation=\"size\",outcome=\"error\"}} 0"
            ),
        ] {
            assert!(text.contains(&line), "{line} in\n{text}");
        }
    }
}
