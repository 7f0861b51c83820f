//! Prometheus metrics of surety-dlq, registered into a caller-owned
//! registry (the surety-core pattern; see `docs/reference/metrics.md`).
//!
//! Counters are recorded by [`DlqLayer`](crate::DlqLayer) and
//! [`Replayer`](crate::Replayer); the depth and age gauges come from a
//! [`DlqStore`]: run [`DlqMetrics::watch`] as a background task (a
//! [`Host`](surety_core::host::Host) task) and they follow the store, whoever
//! writes to it. [`DlqMetrics::refresh`] reads them once.
//!
//! ```
//! use prometheus_client::registry::Registry;
//! use surety_core::{DeliveryInfo, Envelope, HandlerError};
//! use surety_dlq::metrics::DlqMetrics;
//! use surety_dlq::policy::DeadLetterReason;
//! use surety_dlq::store::{DlqStore, MemoryDlqStore};
//! use surety_dlq::DeadLetter;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut registry = Registry::default();
//! let metrics = DlqMetrics::register(&mut registry);
//!
//! let store = MemoryDlqStore::new();
//! let info = DeliveryInfo::new("memory", "orders", "billing");
//! let letter = DeadLetter::new(&Envelope::builder("/shop", "order.placed").build(), &info,
//!     &HandlerError::poison("bad JSON"), DeadLetterReason::NotRetryable, 1, "billing", "host");
//! store.put(&letter).await?;
//! metrics.refresh(&store).await?;
//!
//! let mut text = String::new();
//! prometheus_client::encoding::text::encode(&mut text, &registry)?;
//! assert!(text.contains(r#"surety_dlq_depth{messaging_system="memory",messaging_destination_name="orders",messaging_consumer_group_name="billing",error_class="poison"} 1"#));
//! # Ok(()) }
//! ```

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::Utc;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use surety_core::DeliveryInfo;
use surety_core::metrics::PREFIX;

use crate::store::{DlqStore, StoreError};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    messaging_system: String,
    messaging_destination_name: String,
    messaging_consumer_group_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    messaging_system: String,
    messaging_destination_name: String,
    messaging_consumer_group_name: String,
    error_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    messaging_system: String,
    messaging_destination_name: String,
    messaging_consumer_group_name: String,
    error_class: String,
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabels {
    sink: String,
}

/// surety-dlq's metrics. Clones share the same series.
#[derive(Clone, Debug, Default)]
pub struct DlqMetrics {
    depth: Family<ClassLabels, Gauge>,
    oldest_age: Family<SourceLabels, Gauge<f64, AtomicU64>>,
    dead_lettered: Family<ClassLabels, Counter>,
    retries: Family<RetryLabels, Counter>,
    replays: Family<OutcomeLabels, Counter>,
    sink_failures: Family<SinkLabels, Counter>,
    seen: Arc<Mutex<Seen>>,
}

/// Every `error_class` of a dead letter: the handler's error classes, and
/// `unknown` for what the broker dead-lettered itself.
pub(crate) const ERROR_CLASSES: [&str; 4] = ["transient", "permanent", "poison", "unknown"];

/// Every `outcome` of `dlq_replays`.
const REPLAY_OUTCOMES: [&str; 6] = [
    "published",
    "failed",
    "skipped",
    "dry_run",
    "resolved",
    "parked",
];

#[derive(Debug, Default)]
struct Seen {
    depth: HashSet<ClassLabels>,
    oldest: HashSet<SourceLabels>,
}

impl DlqMetrics {
    /// Creates the metrics and registers them in `registry` under `surety_`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let registry = registry.sub_registry_with_prefix(PREFIX);
        registry.register(
            "dlq_depth",
            "Dead letters waiting (status dead or parked), by source and error class",
            metrics.depth.clone(),
        );
        registry.register(
            "dlq_oldest_age_seconds",
            "Time since the oldest waiting dead letter of a source was dead-lettered",
            metrics.oldest_age.clone(),
        );
        // Counter names carry no `_total`: the exposition format adds it.
        registry.register(
            "dlq_dead_lettered",
            "Messages dead-lettered, by source and error class",
            metrics.dead_lettered.clone(),
        );
        registry.register(
            "dlq_retries_scheduled",
            "Retries scheduled, by source, error class and mode (in_place, delayed)",
            metrics.retries.clone(),
        );
        registry.register(
            "dlq_replays",
            "Dead letters replayed, by outcome (published, failed, skipped, dry_run, resolved, parked)",
            metrics.replays.clone(),
        );
        registry.register(
            "dlq_sink_failures",
            "Failed writes to a dead-letter sink or retry destination (the original is redelivered)",
            metrics.sink_failures.clone(),
        );
        for outcome in REPLAY_OUTCOMES {
            let _ = metrics.replays.get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            });
        }
        metrics
    }

    /// Creates the failure series of `sinks` (sink names, and `retry` for a
    /// retry destination) at zero; a [`DlqLayer`](crate::DlqLayer) does
    /// this when it wraps a handler.
    pub(crate) fn sinks<'a>(&self, sinks: impl IntoIterator<Item = &'a str>) {
        for sink in sinks {
            let _ = self.sink_failures.get_or_create(&SinkLabels {
                sink: sink.to_owned(),
            });
        }
    }

    /// Creates the counters of the source `info` names at zero: dead
    /// letters of every class, and retries of transient failures in both
    /// modes. A [`DlqLayer`](crate::DlqLayer) does this on a source's first
    /// delivery.
    pub(crate) fn source(&self, info: &DeliveryInfo) {
        for class in ERROR_CLASSES {
            let _ = self.dead_lettered.get_or_create(&class_labels(info, class));
        }
        for mode in ["in_place", "delayed"] {
            let _ = self.retries.get_or_create(&RetryLabels {
                messaging_system: info.system.to_owned(),
                messaging_destination_name: info.topic.clone(),
                messaging_consumer_group_name: info.group.clone(),
                error_class: "transient".to_owned(),
                mode: mode.to_owned(),
            });
        }
    }

    /// Counts one dead-lettered message.
    pub fn dead_lettered(&self, info: &DeliveryInfo, class: &str) {
        self.dead_lettered
            .get_or_create(&class_labels(info, class))
            .inc();
    }

    /// Counts one scheduled retry.
    pub fn retry_scheduled(&self, info: &DeliveryInfo, class: &str, mode: &str) {
        self.retries
            .get_or_create(&RetryLabels {
                messaging_system: info.system.to_owned(),
                messaging_destination_name: info.topic.clone(),
                messaging_consumer_group_name: info.group.clone(),
                error_class: class.to_owned(),
                mode: mode.to_owned(),
            })
            .inc();
    }

    /// Counts one replay with `outcome`.
    pub fn replayed(&self, outcome: &str) {
        self.replays
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Counts one failed sink write.
    pub fn sink_failed(&self, sink: &str) {
        self.sink_failures
            .get_or_create(&SinkLabels {
                sink: sink.to_owned(),
            })
            .inc();
    }

    /// Keeps the depth and oldest-age gauges current: refreshes them from
    /// `store` every `every` (at least once a second) until `shutdown`
    /// resolves. A failed read is logged and tried again at the next tick;
    /// the gauges keep their last values meanwhile.
    ///
    /// ```
    /// use std::time::Duration;
    /// use surety_core::host::Host;
    /// use surety_dlq::DlqMetrics;
    /// use surety_dlq::store::MemoryDlqStore;
    ///
    /// let mut registry = prometheus_client::registry::Registry::default();
    /// let metrics = DlqMetrics::register(&mut registry);
    /// let store = MemoryDlqStore::new();
    /// let host = Host::new().task("dlq-depth", move |shutdown| async move {
    ///     metrics.watch(&store, Duration::from_secs(15), shutdown.wait()).await;
    /// });
    /// # let _ = host;
    /// ```
    pub async fn watch(
        &self,
        store: &dyn DlqStore,
        every: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let every = every.max(Duration::from_secs(1));
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = ticks.tick() => {
                    if let Err(err) = self.refresh(store).await {
                        tracing::warn!(error = %err, "reading the DLQ depth failed; trying again at the next tick");
                    }
                }
            }
        }
    }

    /// Sets the depth and oldest-age gauges from `store`, once. Series of
    /// sources that emptied since the last refresh drop to 0.
    pub async fn refresh(&self, store: &dyn DlqStore) -> Result<(), StoreError> {
        let rows = store.depth().await?;
        let now = Utc::now();
        let mut depth_now = HashSet::new();
        let mut oldest_now: std::collections::HashMap<SourceLabels, chrono::DateTime<Utc>> =
            std::collections::HashMap::new();
        for row in rows {
            let labels = ClassLabels {
                messaging_system: row.system.clone(),
                messaging_destination_name: row.topic.clone(),
                messaging_consumer_group_name: row.group.clone(),
                error_class: row.class.as_str().to_owned(),
            };
            self.depth
                .get_or_create(&labels)
                .set(i64::try_from(row.count).unwrap_or(i64::MAX));
            depth_now.insert(labels);
            let source = SourceLabels {
                messaging_system: row.system,
                messaging_destination_name: row.topic,
                messaging_consumer_group_name: row.group,
            };
            let oldest = oldest_now.entry(source).or_insert(row.oldest);
            *oldest = (*oldest).min(row.oldest);
        }
        for (source, oldest) in &oldest_now {
            let age = (now - *oldest).to_std().unwrap_or_default().as_secs_f64();
            self.oldest_age.get_or_create(source).set(age);
        }
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        for gone in seen.depth.difference(&depth_now) {
            self.depth.get_or_create(gone).set(0);
        }
        for gone in seen.oldest.iter().filter(|s| !oldest_now.contains_key(*s)) {
            self.oldest_age.get_or_create(gone).set(0.0);
        }
        seen.depth = depth_now;
        seen.oldest = oldest_now.into_keys().collect();
        Ok(())
    }
}

fn class_labels(info: &DeliveryInfo, class: &str) -> ClassLabels {
    ClassLabels {
        messaging_system: info.system.to_owned(),
        messaging_destination_name: info.topic.clone(),
        messaging_consumer_group_name: info.group.clone(),
        error_class: class.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::letter::{DeadLetter, Event, Status};
    use crate::policy::DeadLetterReason;
    use crate::store::{MemoryDlqStore, Transition};
    use surety_core::{Envelope, HandlerError};

    fn encode(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    #[tokio::test]
    async fn depth_drops_to_zero_when_a_source_empties_and_counters_get_total() {
        let mut registry = Registry::default();
        let metrics = DlqMetrics::register(&mut registry);
        let store = MemoryDlqStore::new();
        let info = DeliveryInfo::new("memory", "orders", "billing");
        let letter = DeadLetter::new(
            &Envelope::builder("/s", "t").build(),
            &info,
            &HandlerError::permanent("no"),
            DeadLetterReason::NotRetryable,
            1,
            "billing",
            "h",
        );
        store.put(&letter).await.unwrap();
        metrics.dead_lettered(&info, "permanent");
        metrics.refresh(&store).await.unwrap();
        let depth = r#"surety_dlq_depth{messaging_system="memory",messaging_destination_name="orders",messaging_consumer_group_name="billing",error_class="permanent"}"#;
        let text = encode(&registry);
        assert!(text.contains(&format!("{depth} 1")), "{text}");
        assert!(text.contains("surety_dlq_dead_lettered_total{"), "{text}");
        assert!(text.contains("surety_dlq_oldest_age_seconds{"), "{text}");

        let discard = Transition::new(
            [Status::Dead],
            Event::new("ops", "discarded", Status::Discarded),
        );
        store.transition(&letter.id, &discard).await.unwrap();
        metrics.refresh(&store).await.unwrap();
        let text = encode(&registry);
        assert!(text.contains(&format!("{depth} 0")), "{text}");
    }
}
