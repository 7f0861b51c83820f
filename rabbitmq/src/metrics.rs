//! Prometheus metrics of the RabbitMQ adapter.
//!
//! Registered like every Surety crate's metrics (see
//! [`surety_core::metrics`]): [`RabbitMetrics::register`] adds them to a
//! registry you own, under the `surety_` prefix, with OpenTelemetry
//! messaging label names.
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `surety_rabbitmq_publishes_total` | counter | `messaging_system`, `messaging_destination_name`, `outcome` | publishes by outcome: `confirmed`, `nacked`, `returned` (unroutable), `timed_out`, `failed` (connection lost, closed, refused) |
//! | `surety_rabbitmq_deliveries_total` | counter | `messaging_system`, `messaging_destination_name`, `messaging_consumer_group_name`, `outcome` | deliveries by what happened to them: `consumed` (handed to the subscriber), `acked`, `nacked` (requeued, including dropped deliveries), `rejected` (and nacks without requeue), `settle_failed` (the channel was gone: the broker redelivers) |
//! | `surety_rabbitmq_reconnects_total` | counter | `messaging_system` | connections recovered after a loss |
//! | `surety_rabbitmq_confirms_in_flight` | gauge | `messaging_system` | publishes sent and not yet confirmed |
//! | `surety_rabbitmq_connection_blocked` | gauge | `messaging_system` | 1 while the broker blocks publishing (resource alarm) |
//!
//! ```
//! use prometheus_client::registry::Registry;
//! use surety_rabbitmq::RabbitMetrics;
//!
//! let mut registry = Registry::default();
//! let metrics = RabbitMetrics::register(&mut registry);
//! # let _ = metrics;
//! let mut text = String::new();
//! prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
//! assert!(text.contains("surety_rabbitmq_reconnects_total"));
//! ```

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use surety_core::metrics::PREFIX;

use crate::SYSTEM;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PublishLabels {
    messaging_system: &'static str,
    messaging_destination_name: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    messaging_system: &'static str,
    messaging_destination_name: String,
    messaging_consumer_group_name: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SystemLabels {
    messaging_system: &'static str,
}

const SYSTEM_LABELS: SystemLabels = SystemLabels {
    messaging_system: SYSTEM,
};

/// How a publish ended, as counted in `surety_rabbitmq_publishes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PublishOutcome {
    /// The broker confirmed the message.
    Confirmed,
    /// The broker refused it (negative confirm).
    Nacked,
    /// No queue was bound for it: it came back as unroutable.
    Returned,
    /// No confirm arrived within the confirm timeout.
    TimedOut,
    /// The connection was lost, the transport closed or the broker refused
    /// the publish before confirming.
    Failed,
}

impl PublishOutcome {
    const ALL: [Self; 5] = [
        Self::Confirmed,
        Self::Nacked,
        Self::Returned,
        Self::TimedOut,
        Self::Failed,
    ];

    /// The `outcome` label value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Confirmed => "confirmed",
            Self::Nacked => "nacked",
            Self::Returned => "returned",
            Self::TimedOut => "timed_out",
            Self::Failed => "failed",
        }
    }
}

/// What happened to a delivery, as counted in `surety_rabbitmq_deliveries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeliveryOutcome {
    /// Handed to the subscriber.
    Consumed,
    /// Acknowledged.
    Acked,
    /// Returned to the queue (a nack with requeue or a dropped delivery).
    Nacked,
    /// Rejected or nacked without requeue: dropped or dead-lettered.
    Rejected,
    /// The settlement could not reach the broker; it redelivers the message.
    SettleFailed,
}

impl DeliveryOutcome {
    const ALL: [Self; 5] = [
        Self::Consumed,
        Self::Acked,
        Self::Nacked,
        Self::Rejected,
        Self::SettleFailed,
    ];

    /// The `outcome` label value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Consumed => "consumed",
            Self::Acked => "acked",
            Self::Nacked => "nacked",
            Self::Rejected => "rejected",
            Self::SettleFailed => "settle_failed",
        }
    }
}

/// The adapter's metrics. Clones share the same series.
#[derive(Clone, Debug, Default)]
pub struct RabbitMetrics {
    publishes: Family<PublishLabels, Counter>,
    deliveries: Family<DeliveryLabels, Counter>,
    reconnects: Family<SystemLabels, Counter>,
    in_flight: Family<SystemLabels, Gauge>,
    blocked: Family<SystemLabels, Gauge>,
}

impl RabbitMetrics {
    /// Creates the metrics and registers them in `registry` under `surety_`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let registry = registry.sub_registry_with_prefix(PREFIX);
        registry.register(
            "rabbitmq_publishes",
            "RabbitMQ publishes by outcome (confirmed, nacked, returned, timed_out, failed)",
            metrics.publishes.clone(),
        );
        registry.register(
            "rabbitmq_deliveries",
            "RabbitMQ deliveries by outcome (consumed, acked, nacked, rejected, settle_failed)",
            metrics.deliveries.clone(),
        );
        registry.register(
            "rabbitmq_reconnects",
            "RabbitMQ connections recovered after a loss",
            metrics.reconnects.clone(),
        );
        registry.register(
            "rabbitmq_confirms_in_flight",
            "RabbitMQ publishes sent and not yet confirmed",
            metrics.in_flight.clone(),
        );
        registry.register(
            "rabbitmq_connection_blocked",
            "1 while the RabbitMQ broker blocks publishing on the connection",
            metrics.blocked.clone(),
        );
        // Show the gauges and the reconnect counter from the start.
        let _ = metrics.reconnects.get_or_create(&SYSTEM_LABELS);
        let _ = metrics.in_flight.get_or_create(&SYSTEM_LABELS);
        let _ = metrics.blocked.get_or_create(&SYSTEM_LABELS);
        metrics
    }

    /// Counts one publish to `topic` with `outcome`.
    pub fn published(&self, topic: &str, outcome: PublishOutcome) {
        self.publishes
            .get_or_create(&PublishLabels {
                messaging_system: SYSTEM,
                messaging_destination_name: topic.to_owned(),
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// Counts one delivery event.
    pub fn delivery(&self, topic: &str, group: &str, outcome: DeliveryOutcome) {
        self.deliveries
            .get_or_create(&DeliveryLabels {
                messaging_system: SYSTEM,
                messaging_destination_name: topic.to_owned(),
                messaging_consumer_group_name: group.to_owned(),
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// The count of publishes to `topic` with `outcome` so far.
    pub fn publishes(&self, topic: &str, outcome: PublishOutcome) -> u64 {
        self.publishes
            .get_or_create(&PublishLabels {
                messaging_system: SYSTEM,
                messaging_destination_name: topic.to_owned(),
                outcome: outcome.as_str(),
            })
            .get()
    }

    /// The count of deliveries on `topic`/`group` with `outcome` so far.
    pub fn deliveries(&self, topic: &str, group: &str, outcome: DeliveryOutcome) -> u64 {
        self.deliveries
            .get_or_create(&DeliveryLabels {
                messaging_system: SYSTEM,
                messaging_destination_name: topic.to_owned(),
                messaging_consumer_group_name: group.to_owned(),
                outcome: outcome.as_str(),
            })
            .get()
    }

    /// Connections recovered so far.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.get_or_create(&SYSTEM_LABELS).get()
    }

    /// Publishes awaiting their confirm now.
    pub fn confirms_in_flight(&self) -> i64 {
        self.in_flight.get_or_create(&SYSTEM_LABELS).get()
    }

    /// Whether the broker blocks the connection now.
    pub fn connection_blocked(&self) -> bool {
        self.blocked.get_or_create(&SYSTEM_LABELS).get() != 0
    }

    /// Creates every publish series of `topic` at zero (on its first
    /// publish through a publisher channel).
    pub(crate) fn publishing_to(&self, topic: &str) {
        for outcome in PublishOutcome::ALL {
            let _ = self.publishes.get_or_create(&PublishLabels {
                messaging_system: SYSTEM,
                messaging_destination_name: topic.to_owned(),
                outcome: outcome.as_str(),
            });
        }
    }

    /// Creates every delivery series of `topic`/`group` at zero (when the
    /// subscription opens).
    pub(crate) fn subscribed(&self, topic: &str, group: &str) {
        for outcome in DeliveryOutcome::ALL {
            let _ = self.deliveries.get_or_create(&DeliveryLabels {
                messaging_system: SYSTEM,
                messaging_destination_name: topic.to_owned(),
                messaging_consumer_group_name: group.to_owned(),
                outcome: outcome.as_str(),
            });
        }
    }

    pub(crate) fn reconnected(&self) {
        self.reconnects.get_or_create(&SYSTEM_LABELS).inc();
    }

    pub(crate) fn in_flight_add(&self, n: i64) {
        self.in_flight.get_or_create(&SYSTEM_LABELS).inc_by(n);
    }

    pub(crate) fn set_blocked(&self, blocked: bool) {
        self.blocked
            .get_or_create(&SYSTEM_LABELS)
            .set(i64::from(blocked));
    }
}
