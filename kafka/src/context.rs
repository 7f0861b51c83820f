//! librdkafka callbacks: logs and errors into `tracing`, statistics into
//! metrics, rebalances into the offset tracker.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use prometheus_client::metrics::counter::Counter;
use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::{Notify, watch};

use crate::metrics::KafkaMetrics;
use crate::tracker::{Action, Tracker};

/// Forwards a librdkafka log line to `tracing`.
fn log_line(client: &str, level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "surety_kafka::librdkafka", client, facility, "{message}")
        }
        RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "surety_kafka::librdkafka", client, facility, "{message}")
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "surety_kafka::librdkafka", client, facility, "{message}")
        }
        RDKafkaLogLevel::Debug => {
            tracing::debug!(target: "surety_kafka::librdkafka", client, facility, "{message}")
        }
    }
}

/// The context of the producer and the admin client.
#[derive(Debug, Clone)]
pub(crate) struct ClientCtx {
    client: &'static str,
}

impl ClientCtx {
    pub(crate) fn new(client: &'static str) -> Self {
        Self { client }
    }
}

impl ClientContext for ClientCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_line(self.client, level, fac, log_message);
    }

    fn stats(&self, _statistics: Statistics) {}

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(client = self.client, error = %error, "librdkafka: {reason}");
    }
}

/// What a subscription's poll loop, its settlers, its stream and its
/// librdkafka callbacks share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) topic: String,
    pub(crate) group: String,
    tracker: Mutex<Tracker>,
    /// Wakes the poll loop: settlements left stores or seeks to apply.
    pub(crate) wake: Notify,
    pub(crate) metrics: KafkaMetrics,
    /// Counters every delivery touches, looked up once.
    pub(crate) counters: DeliveryCounters,
    /// Whether the consumer received its first assignment.
    pub(crate) joined: watch::Sender<bool>,
    /// Set when the application dropped the subscription's stream: the
    /// consumer is on its way out of the group.
    pub(crate) leaving: AtomicBool,
    /// Set once the consumer has left the group (closed).
    pub(crate) left: watch::Sender<bool>,
}

/// A subscription's per-delivery counters.
#[derive(Debug)]
pub(crate) struct DeliveryCounters {
    pub(crate) received: Counter,
    pub(crate) acked: Counter,
    pub(crate) nacked: Counter,
    pub(crate) rejected: Counter,
}

impl Shared {
    pub(crate) fn new(topic: &str, group: &str, metrics: KafkaMetrics) -> Self {
        metrics.subscribed(topic, group);
        Self {
            topic: topic.to_owned(),
            group: group.to_owned(),
            tracker: Mutex::new(Tracker::new()),
            wake: Notify::new(),
            counters: DeliveryCounters {
                received: metrics.received_counter(topic, group),
                acked: metrics.settled_counter(topic, group, "acked"),
                nacked: metrics.settled_counter(topic, group, "nacked"),
                rejected: metrics.settled_counter(topic, group, "rejected"),
            },
            metrics,
            joined: watch::Sender::new(false),
            leaving: AtomicBool::new(false),
            left: watch::Sender::new(false),
        }
    }

    pub(crate) fn tracker(&self) -> MutexGuard<'_, Tracker> {
        // The tracker's methods do not panic midway through an update; if a
        // caller panicked while holding the lock, the state is still whole.
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A partition list with the stores among `actions`.
    pub(crate) fn stores(&self, actions: &[Action]) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for action in actions {
            if let Action::Store { partition, offset } = *action
                && let Err(err) =
                    list.add_partition_offset(&self.topic, partition, Offset::Offset(offset))
            {
                tracing::warn!(error = %err, partition, offset, "cannot list an offset to store");
            }
        }
        list
    }

    fn partitions<'a>(&self, list: &'a TopicPartitionList) -> impl Iterator<Item = i32> + 'a {
        list.elements_for_topic(&self.topic)
            .into_iter()
            .map(|e| e.partition())
    }
}

/// The context of one subscription's consumer.
#[derive(Debug, Clone)]
pub(crate) struct ConsumerCtx {
    pub(crate) shared: Arc<Shared>,
}

impl ClientContext for ConsumerCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_line("consumer", level, fac, log_message);
    }

    fn stats(&self, statistics: Statistics) {
        let shared = &self.shared;
        let Some(topic) = statistics.topics.get(&shared.topic) else {
            return;
        };
        let tracker = shared.tracker();
        if tracker.is_closed() {
            return;
        }
        for (&partition, stats) in &topic.partitions {
            if partition >= 0 && tracker.is_assigned(partition) {
                shared
                    .metrics
                    .partition_stats(&shared.topic, &shared.group, stats);
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(
            topic = %self.shared.topic,
            group = %self.shared.group,
            error = %error,
            "librdkafka consumer: {reason}"
        );
    }
}

impl ConsumerContext for ConsumerCtx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let shared = &self.shared;
        match rebalance {
            Rebalance::Assign(list) => {
                let partitions: Vec<i32> = shared.partitions(list).collect();
                tracing::info!(topic = %shared.topic, group = %shared.group, ?partitions, "partitions assigned");
                shared.tracker().assign(partitions);
            }
            Rebalance::Revoke(list) => {
                let partitions: Vec<i32> = shared.partitions(list).collect();
                tracing::info!(topic = %shared.topic, group = %shared.group, ?partitions, "partitions revoked");
                // Store what settlements allowed so far, so that librdkafka's
                // commit of the revoked partitions (enable.auto.commit) has it.
                let actions = shared.tracker().revoke(partitions.iter().copied());
                let stores = shared.stores(&actions);
                if stores.count() > 0
                    && let Err(err) = rdkafka::consumer::Consumer::store_offsets(consumer, &stores)
                {
                    tracing::warn!(error = %err, "storing offsets of revoked partitions failed");
                }
                for partition in partitions {
                    shared
                        .metrics
                        .forget_partition(&shared.topic, &shared.group, partition);
                }
            }
            Rebalance::Error(err) => {
                tracing::warn!(topic = %shared.topic, group = %shared.group, error = %err, "rebalance failed");
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(_) = rebalance {
            self.shared.joined.send_replace(true);
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => tracing::debug!(
                topic = %self.shared.topic,
                group = %self.shared.group,
                offsets = ?offsets.to_topic_map(),
                "offsets committed"
            ),
            // Nothing stored since the last commit.
            Err(KafkaError::ConsumerCommit(rdkafka::error::RDKafkaErrorCode::NoOffset)) => {}
            Err(err) => tracing::warn!(
                topic = %self.shared.topic,
                group = %self.shared.group,
                error = %err,
                "committing offsets failed; they are committed again later"
            ),
        }
    }
}
