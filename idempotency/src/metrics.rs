//! [`IdempotencyMetrics`]: duplicates suppressed, first-time handling,
//! lease takeovers, busy keys, store latency and store size.

use std::future::Future;
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
}

/// Labels of the store latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    operation: &'static str,
    outcome: &'static str,
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
        }
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
        registry.register(
            "store_size",
            "Keys held by the dedup store (claimed and done), as of the last cleanup run",
            metrics.store_size.clone(),
        );
        metrics
    }

    /// Counts a duplicate delivery that was acknowledged without running
    /// the handler.
    pub fn duplicate(&self, info: &DeliveryInfo) {
        self.duplicates
            .get_or_create(&ConsumeLabels::of(info))
            .inc();
    }

    /// Counts a message handled for the first time.
    pub fn processed(&self, info: &DeliveryInfo) {
        self.processed.get_or_create(&ConsumeLabels::of(info)).inc();
    }

    /// Counts a takeover of an expired lease.
    pub fn lease_takeover(&self, info: &DeliveryInfo) {
        self.lease_takeovers
            .get_or_create(&ConsumeLabels::of(info))
            .inc();
    }

    /// Counts a delivery sent back because its key was busy.
    pub fn busy(&self, info: &DeliveryInfo) {
        self.busy.get_or_create(&ConsumeLabels::of(info)).inc();
    }

    /// Sets the store size gauge.
    pub fn set_store_size(&self, keys: u64) {
        self.store_size.set(i64::try_from(keys).unwrap_or(i64::MAX));
    }

    /// Runs a store operation named `operation` and records its duration.
    pub async fn time<T, E>(
        &self,
        operation: &'static str,
        op: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let started = Instant::now();
        let result = op.await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.store_duration
            .get_or_create(&StoreLabels { operation, outcome })
            .observe(started.elapsed().as_secs_f64());
        result
    }
}
