//! Prometheus metrics of the outbox relay, registered into a caller-owned
//! registry (the surety-core pattern; see `docs/reference/metrics.md`).
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `surety_outbox_relayed_total` | counter | `relay`, `outcome` (`sent`, `retried`, `parked`) | rows the relay finished, by outcome |
//! | `surety_outbox_backlog` | gauge | `relay` | pending rows |
//! | `surety_outbox_parked` | gauge | `relay` | parked rows, waiting for an operator |
//! | `surety_outbox_oldest_pending_age_seconds` | gauge | `relay` | age of the oldest pending row (0 when none) |
//! | `surety_outbox_relay_leader` | gauge | `relay` | 1 while this instance holds the relay's lease |
//! | `surety_outbox_lease_wait_seconds` | gauge | `relay` | how long this instance last waited before it took the lease (0: at once) |
//!
//! The gauges are refreshed by [`Relay::run`](crate::Relay::run) about once
//! a second.
//!
//! ```
//! use prometheus_client::registry::Registry;
//! use surety_outbox::metrics::OutboxMetrics;
//!
//! let mut registry = Registry::default();
//! let metrics = OutboxMetrics::register(&mut registry);
//! metrics.relayed("orders", "sent", 3);
//! let mut text = String::new();
//! prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
//! assert!(text.contains(r#"surety_outbox_relayed_total{relay="orders",outcome="sent"} 3"#));
//! ```

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use surety_core::metrics::PREFIX;

use crate::store::Backlog;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RelayLabels {
    relay: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    relay: String,
    outcome: String,
}

/// The outbox relay's metrics. Cheap to clone (the families are shared).
#[derive(Clone, Debug, Default)]
pub struct OutboxMetrics {
    relayed: Family<OutcomeLabels, Counter>,
    backlog: Family<RelayLabels, Gauge>,
    parked: Family<RelayLabels, Gauge>,
    oldest: Family<RelayLabels, Gauge<f64, AtomicU64>>,
    leader: Family<RelayLabels, Gauge>,
    lease_wait: Family<RelayLabels, Gauge<f64, AtomicU64>>,
}

/// Every `outcome` of `surety_outbox_relayed_total`.
const RELAYED_OUTCOMES: [&str; 3] = ["sent", "retried", "parked"];

impl OutboxMetrics {
    /// Creates the metrics and registers them under `surety_outbox_`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let registry = registry.sub_registry_with_prefix(PREFIX);
        let registry = registry.sub_registry_with_prefix("outbox");
        registry.register(
            "relayed",
            "Outbox rows the relay finished, by outcome",
            metrics.relayed.clone(),
        );
        registry.register("backlog", "Pending outbox rows", metrics.backlog.clone());
        registry.register(
            "parked",
            "Parked outbox rows, waiting for an operator",
            metrics.parked.clone(),
        );
        registry.register(
            "oldest_pending_age_seconds",
            "Age of the oldest pending outbox row",
            metrics.oldest.clone(),
        );
        registry.register(
            "relay_leader",
            "1 while this instance holds the relay's lease",
            metrics.leader.clone(),
        );
        registry.register(
            "lease_wait_seconds",
            "How long this instance last waited before it took the relay's lease",
            metrics.lease_wait.clone(),
        );
        metrics
    }

    /// Counts `n` rows of relay `relay` finished with `outcome`.
    pub fn relayed(&self, relay: &str, outcome: &str, n: u64) {
        self.relayed
            .get_or_create(&OutcomeLabels {
                relay: relay.into(),
                outcome: outcome.into(),
            })
            .inc_by(n);
    }

    /// Creates every series of relay `relay` at zero (its counters by
    /// outcome and its gauges), so a dashboard or an alert on parked rows
    /// sees a 0, not a missing series; [`Relay::metrics`](crate::Relay::metrics)
    /// does this when it is given the metrics.
    pub fn relay(&self, relay: &str) {
        for outcome in RELAYED_OUTCOMES {
            self.relayed(relay, outcome, 0);
        }
        let labels = RelayLabels {
            relay: relay.into(),
        };
        let _ = self.backlog.get_or_create(&labels);
        let _ = self.parked.get_or_create(&labels);
        let _ = self.oldest.get_or_create(&labels);
        let _ = self.leader.get_or_create(&labels);
        let _ = self.lease_wait.get_or_create(&labels);
    }

    /// Removes every series of relay `relay` (a relay renamed after it was
    /// given the metrics).
    pub(crate) fn forget(&self, relay: &str) {
        for outcome in RELAYED_OUTCOMES {
            self.relayed.remove(&OutcomeLabels {
                relay: relay.into(),
                outcome: outcome.into(),
            });
        }
        let labels = RelayLabels {
            relay: relay.into(),
        };
        self.backlog.remove(&labels);
        self.parked.remove(&labels);
        self.oldest.remove(&labels);
        self.leader.remove(&labels);
        self.lease_wait.remove(&labels);
    }

    /// Sets the backlog gauges of relay `relay`.
    pub fn set_backlog(&self, relay: &str, backlog: &Backlog) {
        let labels = RelayLabels {
            relay: relay.into(),
        };
        self.backlog
            .get_or_create(&labels)
            .set(i64::try_from(backlog.pending).unwrap_or(i64::MAX));
        self.parked
            .get_or_create(&labels)
            .set(i64::try_from(backlog.parked).unwrap_or(i64::MAX));
        self.oldest
            .get_or_create(&labels)
            .set(backlog.oldest_pending.map_or(0.0, |age| age.as_secs_f64()));
    }

    /// Sets whether this instance leads relay `relay`.
    pub fn set_leader(&self, relay: &str, leader: bool) {
        self.leader
            .get_or_create(&RelayLabels {
                relay: relay.into(),
            })
            .set(i64::from(leader));
    }

    /// Records how long this instance waited (as a standby, or for a dead
    /// holder's lease to run out) before it took relay `relay`'s lease.
    pub fn set_lease_wait(&self, relay: &str, waited: std::time::Duration) {
        self.lease_wait
            .get_or_create(&RelayLabels {
                relay: relay.into(),
            })
            .set(waited.as_secs_f64());
    }

    /// The last lease wait of relay `relay`, in seconds.
    pub fn lease_wait(&self, relay: &str) -> f64 {
        self.lease_wait
            .get_or_create(&RelayLabels {
                relay: relay.into(),
            })
            .get()
    }

    /// The count of rows of relay `relay` finished with `outcome`.
    pub fn relayed_count(&self, relay: &str, outcome: &str) -> u64 {
        self.relayed
            .get_or_create(&OutcomeLabels {
                relay: relay.into(),
                outcome: outcome.into(),
            })
            .get()
    }
}
