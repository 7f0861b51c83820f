//! Prometheus metrics, registered per crate without a global registry.
//!
//! Every Surety crate follows the same pattern: a cheap-to-clone `Metrics`
//! value whose `register` adds the crate's metrics to a caller-owned
//! [`Registry`] under the `surety_` prefix, and which the crate's runners
//! take as an argument. Label names follow the OpenTelemetry messaging
//! conventions with dots turned into underscores (`messaging_system`,
//! `messaging_destination_name`, `messaging_consumer_group_name`).
//! The full list is in `docs/reference/metrics.md`.
//!
//! ```
//! use prometheus_client::registry::Registry;
//! use surety_core::metrics::Metrics;
//!
//! let mut registry = Registry::default();
//! let metrics = Metrics::register(&mut registry);
//! metrics.published("memory", "orders", "confirmed");
//!
//! let mut text = String::new();
//! prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
//! assert!(text.contains(r#"surety_messages_published_total{messaging_system="memory",messaging_destination_name="orders",outcome="confirmed"} 1"#));
//! ```

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The prefix of every Surety metric.
pub const PREFIX: &str = "surety";

/// Labels of the publish counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PublishLabels {
    messaging_system: String,
    messaging_destination_name: String,
    outcome: String,
}

/// Labels of the consume counter and the handler histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConsumeLabels {
    messaging_system: String,
    messaging_destination_name: String,
    messaging_consumer_group_name: String,
    outcome: String,
}

/// Builds handler-duration histograms: 1 ms to about 33 s.
#[derive(Clone, Copy, Debug, Default)]
struct DurationBuckets;

impl MetricConstructor<Histogram> for DurationBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(exponential_buckets(0.001, 2.0, 16))
    }
}

/// surety-core's metrics: publish outcomes, consume outcomes and handler
/// durations. Clones share the same series.
#[derive(Clone, Debug)]
pub struct Metrics {
    published: Family<PublishLabels, Counter>,
    consumed: Family<ConsumeLabels, Counter>,
    handler_duration: Family<ConsumeLabels, Histogram, DurationBuckets>,
}

impl Default for Metrics {
    /// Metrics that are recorded but not registered anywhere.
    fn default() -> Self {
        Self {
            published: Family::default(),
            consumed: Family::default(),
            handler_duration: Family::new_with_constructor(DurationBuckets),
        }
    }
}

impl Metrics {
    /// Creates the metrics and registers them in `registry` under `surety_`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let registry = registry.sub_registry_with_prefix(PREFIX);
        registry.register(
            "messages_published",
            "Messages published, by outcome (confirmed, or the transport error kind)",
            metrics.published.clone(),
        );
        registry.register(
            "messages_consumed",
            "Deliveries settled by a worker, by outcome (acked, requeued, rejected, settle_failed)",
            metrics.consumed.clone(),
        );
        registry.register(
            "handler_duration_seconds",
            "Time spent in the handler per delivery, by result (ok, transient, permanent, poison)",
            metrics.handler_duration.clone(),
        );
        metrics
    }

    /// Counts one publish with `outcome`.
    pub fn published(&self, system: &str, topic: &str, outcome: &str) {
        self.published
            .get_or_create(&PublishLabels {
                messaging_system: system.to_owned(),
                messaging_destination_name: topic.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Counts one settled delivery with `outcome`.
    pub fn consumed(&self, system: &str, topic: &str, group: &str, outcome: &str) {
        self.consumed
            .get_or_create(&consume_labels(system, topic, group, outcome))
            .inc();
    }

    /// Records one handler run that took `elapsed` and ended with `result`.
    pub fn handler_finished(
        &self,
        system: &str,
        topic: &str,
        group: &str,
        result: &str,
        elapsed: Duration,
    ) {
        self.handler_duration
            .get_or_create(&consume_labels(system, topic, group, result))
            .observe(elapsed.as_secs_f64());
    }
}

/// What a worker settles a delivery as (`messages_consumed`).
const CONSUMED_OUTCOMES: [&str; 8] = [
    "handled",
    "duplicate",
    "ignored",
    "retry_scheduled",
    "dead_lettered",
    "requeued",
    "rejected",
    "settle_failed",
];

/// How a handler run ends (`handler_duration_seconds`).
const HANDLER_RESULTS: [&str; 4] = ["ok", "transient", "permanent", "poison"];

/// The consumers (system, topic, group) a worker or a layer has seen, so
/// that it creates a consumer's series on its first delivery only.
#[derive(Debug, Default)]
pub struct SeenConsumers(Vec<(&'static str, String, String)>);

impl SeenConsumers {
    /// Whether `info`'s consumer is new here (and remembers it).
    pub fn first_sight(&mut self, info: &crate::DeliveryInfo) -> bool {
        let known = self.0.iter().any(|(system, topic, group)| {
            *system == info.system && *topic == info.topic && *group == info.group
        });
        if !known {
            self.0
                .push((info.system, info.topic.clone(), info.group.clone()));
        }
        !known
    }
}

impl Metrics {
    /// Creates every series of the consumer `(system, topic, group)` at
    /// zero: a dashboard or an alert on `rejected` sees a 0, not a missing
    /// series, from the consumer's start.
    pub fn consumer(&self, system: &str, topic: &str, group: &str) {
        for outcome in CONSUMED_OUTCOMES {
            let _ = self
                .consumed
                .get_or_create(&consume_labels(system, topic, group, outcome));
        }
        for result in HANDLER_RESULTS {
            let _ = self
                .handler_duration
                .get_or_create(&consume_labels(system, topic, group, result));
        }
    }

    /// [`consumer`](Self::consumer) for the consumer a delivery came from,
    /// once per consumer in `seen` (a worker's first delivery, in practice).
    pub(crate) fn consumer_seen(&self, seen: &mut SeenConsumers, info: &crate::DeliveryInfo) {
        if seen.first_sight(info) {
            self.consumer(info.system, &info.topic, &info.group);
        }
    }
}

fn consume_labels(system: &str, topic: &str, group: &str, outcome: &str) -> ConsumeLabels {
    ConsumeLabels {
        messaging_system: system.to_owned(),
        messaging_destination_name: topic.to_owned(),
        messaging_consumer_group_name: group.to_owned(),
        outcome: outcome.to_owned(),
    }
}
