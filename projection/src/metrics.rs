//! Prometheus metrics of projection runners, registered into a
//! caller-owned registry (the surety-core pattern; see
//! `docs/reference/metrics.md`).
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `surety_projection_applied_total` | counter | `projection` | events committed (types it does not read included) |
//! | `surety_projection_parked_total` | counter | `projection` | events parked (failed, or behind a failed event of their key) |
//! | `surety_projection_batch_size` | histogram | `projection` | events per committed batch |
//! | `surety_projection_lag_events` | gauge | `projection`, `topic`, `partition` | end of the partition as last seen minus the committed position |
//! | `surety_projection_lag_seconds` | gauge | `projection`, `topic`, `partition` | age of the last committed event while the lag in events is above 0; 0 when caught up |
//! | `surety_projection_checkpoint_age_seconds` | gauge | `projection`, `topic`, `partition` | time since the checkpoint last moved |
//! | `surety_projection_rebuild_progress_ratio` | gauge | `projection` | a rebuild's applied / (applied + remaining) |
//! | `surety_projection_rebuild_events_per_second` | gauge | `projection` | a rebuild's rate |
//! | `surety_projection_heartbeat_timestamp_seconds` | gauge | `projection` | when the runner's loop last turned (liveness, whatever the lag) |
//!
//! The runner refreshes the gauges after each batch and about once a
//! second.
//!
//! ```
//! use prometheus_client::registry::Registry;
//! use surety_projection::metrics::ProjectionMetrics;
//!
//! let mut registry = Registry::default();
//! let metrics = ProjectionMetrics::register(&mut registry);
//! metrics.applied("order_summary", 500);
//! let mut text = String::new();
//! prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
//! assert!(text.contains(r#"surety_projection_applied_total{projection="order_summary"} 500"#));
//! ```

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use surety_core::metrics::PREFIX;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProjectionLabels {
    projection: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    projection: String,
    topic: String,
    partition: i32,
}

type FloatGauge = Gauge<f64, AtomicU64>;

fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 4.0, 8))
}

/// The metrics of projection runners. Cheap to clone (the families are
/// shared).
#[derive(Clone, Debug)]
pub struct ProjectionMetrics {
    applied: Family<ProjectionLabels, Counter>,
    parked: Family<ProjectionLabels, Counter>,
    batch_size: Family<ProjectionLabels, Histogram, fn() -> Histogram>,
    lag_events: Family<PartitionLabels, Gauge>,
    lag_seconds: Family<PartitionLabels, FloatGauge>,
    checkpoint_age: Family<PartitionLabels, FloatGauge>,
    rebuild_progress: Family<ProjectionLabels, FloatGauge>,
    rebuild_rate: Family<ProjectionLabels, FloatGauge>,
    heartbeat: Family<ProjectionLabels, FloatGauge>,
}

impl Default for ProjectionMetrics {
    fn default() -> Self {
        Self {
            applied: Family::default(),
            parked: Family::default(),
            batch_size: Family::new_with_constructor(batch_histogram),
            lag_events: Family::default(),
            lag_seconds: Family::default(),
            checkpoint_age: Family::default(),
            rebuild_progress: Family::default(),
            rebuild_rate: Family::default(),
            heartbeat: Family::default(),
        }
    }
}

fn labels(projection: &str) -> ProjectionLabels {
    ProjectionLabels {
        projection: projection.into(),
    }
}

fn partition_labels(projection: &str, topic: &str, partition: i32) -> PartitionLabels {
    PartitionLabels {
        projection: projection.into(),
        topic: topic.into(),
        partition,
    }
}

impl ProjectionMetrics {
    /// Creates the metrics and registers them under `surety_projection_`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let registry = registry.sub_registry_with_prefix(PREFIX);
        let registry = registry.sub_registry_with_prefix("projection");
        registry.register(
            "applied",
            "Projection events committed",
            metrics.applied.clone(),
        );
        registry.register("parked", "Projection events parked", metrics.parked.clone());
        registry.register(
            "batch_size",
            "Events per committed projection batch",
            metrics.batch_size.clone(),
        );
        registry.register(
            "lag_events",
            "End of the partition minus the committed position",
            metrics.lag_events.clone(),
        );
        registry.register(
            "lag_seconds",
            "Age of the last committed event while behind",
            metrics.lag_seconds.clone(),
        );
        registry.register(
            "checkpoint_age_seconds",
            "Time since the checkpoint last moved",
            metrics.checkpoint_age.clone(),
        );
        registry.register(
            "rebuild_progress_ratio",
            "A rebuild's applied / (applied + remaining)",
            metrics.rebuild_progress.clone(),
        );
        registry.register(
            "rebuild_events_per_second",
            "A rebuild's rate",
            metrics.rebuild_rate.clone(),
        );
        registry.register(
            "heartbeat_timestamp_seconds",
            "When the runner's loop last turned",
            metrics.heartbeat.clone(),
        );
        metrics
    }

    /// Creates the series of `projection` at zero (its counters, batch
    /// sizes and heartbeat; the per-partition gauges come with the
    /// partitions); a runner does this when it starts.
    pub fn projection(&self, projection: &str) {
        let labels = labels(projection);
        let _ = self.applied.get_or_create(&labels);
        let _ = self.parked.get_or_create(&labels);
        let _ = self.batch_size.get_or_create(&labels);
        let _ = self.heartbeat.get_or_create(&labels);
    }

    /// Counts `n` events of `projection` committed.
    pub fn applied(&self, projection: &str, n: u64) {
        self.applied.get_or_create(&labels(projection)).inc_by(n);
    }

    /// The events of `projection` committed.
    pub fn applied_count(&self, projection: &str) -> u64 {
        self.applied.get_or_create(&labels(projection)).get()
    }

    /// Counts `n` events of `projection` parked.
    pub fn parked(&self, projection: &str, n: u64) {
        self.parked.get_or_create(&labels(projection)).inc_by(n);
    }

    /// Records a committed batch of `size` events.
    pub fn batch(&self, projection: &str, size: usize) {
        self.batch_size
            .get_or_create(&labels(projection))
            .observe(size as f64);
    }

    /// Sets a partition's lag, in events and seconds.
    pub fn set_lag(
        &self,
        projection: &str,
        topic: &str,
        partition: i32,
        events: i64,
        seconds: f64,
    ) {
        let labels = partition_labels(projection, topic, partition);
        self.lag_events.get_or_create(&labels).set(events);
        self.lag_seconds.get_or_create(&labels).set(seconds);
    }

    /// The lag in events of a partition.
    pub fn lag_events(&self, projection: &str, topic: &str, partition: i32) -> i64 {
        self.lag_events
            .get_or_create(&partition_labels(projection, topic, partition))
            .get()
    }

    /// Sets the time since a partition's checkpoint moved.
    pub fn set_checkpoint_age(&self, projection: &str, topic: &str, partition: i32, seconds: f64) {
        self.checkpoint_age
            .get_or_create(&partition_labels(projection, topic, partition))
            .set(seconds);
    }

    /// Sets a rebuild's progress.
    pub fn set_rebuild(&self, projection: &str, ratio: f64, events_per_second: f64) {
        self.rebuild_progress
            .get_or_create(&labels(projection))
            .set(ratio);
        self.rebuild_rate
            .get_or_create(&labels(projection))
            .set(events_per_second);
    }

    /// The last rebuild progress ratio of `projection`.
    pub fn rebuild_progress(&self, projection: &str) -> f64 {
        self.rebuild_progress
            .get_or_create(&labels(projection))
            .get()
    }

    /// Records that the runner of `projection` is alive now.
    pub fn heartbeat(&self, projection: &str) {
        let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
        self.heartbeat.get_or_create(&labels(projection)).set(now);
    }

    /// When the runner of `projection` last turned (Unix seconds, 0 never).
    pub fn last_heartbeat(&self, projection: &str) -> f64 {
        self.heartbeat.get_or_create(&labels(projection)).get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_projections_series_exist_at_zero_once_created() {
        let mut registry = Registry::default();
        let metrics = ProjectionMetrics::register(&mut registry);
        metrics.projection("totals@v2");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        for series in [
            r#"surety_projection_applied_total{projection="totals@v2"} 0"#,
            r#"surety_projection_parked_total{projection="totals@v2"} 0"#,
            r#"surety_projection_batch_size_count{projection="totals@v2"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == series), "{series} in:\n{text}");
        }
    }
}
