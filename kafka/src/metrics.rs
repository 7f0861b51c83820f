//! Prometheus metrics of the Kafka adapter.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rdkafka::statistics::Partition;

/// Labels of publish counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicOutcome {
    messaging_destination_name: String,
    outcome: String,
}

/// Labels of per-group counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    messaging_destination_name: String,
    messaging_consumer_group_name: String,
}

/// Labels of settlement counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupOutcome {
    messaging_destination_name: String,
    messaging_consumer_group_name: String,
    outcome: String,
}

/// Labels of per-partition gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    messaging_destination_name: String,
    messaging_consumer_group_name: String,
    messaging_destination_partition_id: String,
}

fn partition_labels(topic: &str, group: &str, partition: i32) -> PartitionLabels {
    PartitionLabels {
        messaging_destination_name: topic.to_owned(),
        messaging_consumer_group_name: group.to_owned(),
        messaging_destination_partition_id: partition.to_string(),
    }
}

/// The adapter's metrics. Clones share the same series; pass one to
/// [`KafkaConfig::metrics`](crate::KafkaConfig::metrics).
///
/// | metric | type | labels |
/// |---|---|---|
/// | `surety_kafka_messages_sent_total` | counter | `messaging_destination_name`, `outcome` (`confirmed` or the error kind) |
/// | `surety_kafka_messages_received_total` | counter | `messaging_destination_name`, `messaging_consumer_group_name` |
/// | `surety_kafka_messages_settled_total` | counter | `messaging_destination_name`, `messaging_consumer_group_name`, `outcome` (`acked`, `nacked`, `rejected`, `dropped`, `refused`) |
/// | `surety_kafka_consumer_pauses_total` | counter | `messaging_destination_name`, `messaging_consumer_group_name` |
/// | `surety_kafka_consumer_stalls_total` | counter | `messaging_destination_name`, `messaging_consumer_group_name`, `messaging_destination_partition_id` |
/// | `surety_kafka_consumer_lag` | gauge | `messaging_destination_name`, `messaging_consumer_group_name`, `messaging_destination_partition_id` |
/// | `surety_kafka_committed_offset` | gauge | same |
/// | `surety_kafka_high_watermark` | gauge | same |
///
/// The gauges come from librdkafka's statistics (see
/// [`KafkaConfig::statistics_interval`](crate::KafkaConfig::statistics_interval)),
/// for the partitions currently assigned to a subscription of this process.
///
/// ```
/// use prometheus_client::registry::Registry;
/// use surety_kafka::KafkaMetrics;
///
/// let mut registry = Registry::default();
/// let metrics = KafkaMetrics::register(&mut registry);
/// let config = surety_kafka::KafkaConfig::new("127.0.0.1:9092").metrics(metrics.clone());
/// # let _ = config;
///
/// // Gauges exist only for partitions assigned to a subscription here.
/// assert_eq!(metrics.consumer_lag("orders", "billing", 0), None);
/// assert_eq!(metrics.consumer_pauses("orders", "billing"), 0);
/// ```
#[derive(Clone, Debug, Default)]
pub struct KafkaMetrics {
    sent: Family<TopicOutcome, Counter>,
    received: Family<GroupLabels, Counter>,
    settled: Family<GroupOutcome, Counter>,
    paused: Family<GroupLabels, Counter>,
    stalls: Family<PartitionLabels, Counter>,
    lag: Family<PartitionLabels, Gauge>,
    committed: Family<PartitionLabels, Gauge>,
    high_watermark: Family<PartitionLabels, Gauge>,
}

impl KafkaMetrics {
    /// Creates the metrics and registers them in `registry` under `surety_`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        let registry = registry.sub_registry_with_prefix(surety_core::metrics::PREFIX);
        registry.register(
            "kafka_messages_sent",
            "Messages sent by the Kafka producer, by outcome (confirmed, or the transport error kind)",
            metrics.sent.clone(),
        );
        registry.register(
            "kafka_messages_received",
            "Messages handed to the application by Kafka subscriptions (redeliveries included)",
            metrics.received.clone(),
        );
        registry.register(
            "kafka_messages_settled",
            "Kafka deliveries settled, by outcome (acked, nacked, rejected, dropped, refused)",
            metrics.settled.clone(),
        );
        registry.register(
            "kafka_consumer_pauses",
            "Times a subscription paused fetching because the application fell behind its buffer",
            metrics.paused.clone(),
        );
        registry.register(
            "kafka_consumer_stalls",
            "Times a message to be redelivered could not be fetched again (the seek did not take, or retention deleted it) and the partition's stored offset was held below it",
            metrics.stalls.clone(),
        );
        registry.register(
            "kafka_consumer_lag",
            "Messages in the partition after the group's position (the offset stored after final settlements, else the committed offset), from librdkafka statistics",
            metrics.lag.clone(),
        );
        registry.register(
            "kafka_committed_offset",
            "The group's committed offset for the partition, from librdkafka statistics",
            metrics.committed.clone(),
        );
        registry.register(
            "kafka_high_watermark",
            "The partition's high watermark as last seen by the consumer, from librdkafka statistics",
            metrics.high_watermark.clone(),
        );
        metrics
    }

    /// The last consumer lag reported for a partition of `topic` consumed by
    /// `group` in this process, if statistics reported one.
    pub fn consumer_lag(&self, topic: &str, group: &str, partition: i32) -> Option<i64> {
        self.lag
            .get(&partition_labels(topic, group, partition))
            .map(|g| g.get())
    }

    /// The last committed offset reported for a partition, if any.
    pub fn committed_offset(&self, topic: &str, group: &str, partition: i32) -> Option<i64> {
        self.committed
            .get(&partition_labels(topic, group, partition))
            .map(|g| g.get())
    }

    /// The last high watermark reported for a partition, if any.
    pub fn high_watermark(&self, topic: &str, group: &str, partition: i32) -> Option<i64> {
        self.high_watermark
            .get(&partition_labels(topic, group, partition))
            .map(|g| g.get())
    }

    pub(crate) fn sent(&self, topic: &str, outcome: &str) {
        self.sent_counter(topic, outcome).inc();
    }

    /// The counter of `outcome` for `topic`, to keep and increment without
    /// looking the labels up again.
    pub(crate) fn sent_counter(&self, topic: &str, outcome: &str) -> Counter {
        self.sent
            .get_or_create(&TopicOutcome {
                messaging_destination_name: topic.to_owned(),
                outcome: outcome.to_owned(),
            })
            .clone()
    }

    /// The counter of deliveries received by `group` from `topic`.
    pub(crate) fn received_counter(&self, topic: &str, group: &str) -> Counter {
        self.received
            .get_or_create(&GroupLabels {
                messaging_destination_name: topic.to_owned(),
                messaging_consumer_group_name: group.to_owned(),
            })
            .clone()
    }

    /// The counter of `outcome` settlements of `group` on `topic`.
    pub(crate) fn settled_counter(&self, topic: &str, group: &str, outcome: &str) -> Counter {
        self.settled
            .get_or_create(&GroupOutcome {
                messaging_destination_name: topic.to_owned(),
                messaging_consumer_group_name: group.to_owned(),
                outcome: outcome.to_owned(),
            })
            .clone()
    }

    pub(crate) fn settled(&self, topic: &str, group: &str, outcome: &str) {
        self.settled
            .get_or_create(&GroupOutcome {
                messaging_destination_name: topic.to_owned(),
                messaging_consumer_group_name: group.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// How often the subscription of `group` to `topic` paused fetching
    /// because the application fell behind.
    pub fn consumer_pauses(&self, topic: &str, group: &str) -> u64 {
        self.paused
            .get(&GroupLabels {
                messaging_destination_name: topic.to_owned(),
                messaging_consumer_group_name: group.to_owned(),
            })
            .map_or(0, |c| c.get())
    }

    /// How often a message to be redelivered on `partition` could not be
    /// fetched again, so that the partition's stored offset is held below
    /// it (see the [crate docs](crate#delivery-guarantees)).
    pub fn consumer_stalls(&self, topic: &str, group: &str, partition: i32) -> u64 {
        self.stalls
            .get(&partition_labels(topic, group, partition))
            .map_or(0, |c| c.get())
    }

    pub(crate) fn stall(&self, topic: &str, group: &str, partition: i32) {
        self.stalls
            .get_or_create(&partition_labels(topic, group, partition))
            .inc();
    }

    /// Creates the subscription's counters at zero: deliveries, every
    /// settlement outcome and pauses (stalls come per partition, as they
    /// happen).
    pub(crate) fn subscribed(&self, topic: &str, group: &str) {
        let _ = self.received_counter(topic, group);
        for outcome in ["acked", "rejected", "nacked", "dropped", "refused"] {
            let _ = self.settled_counter(topic, group, outcome);
        }
        let _ = self.paused.get_or_create(&GroupLabels {
            messaging_destination_name: topic.to_owned(),
            messaging_consumer_group_name: group.to_owned(),
        });
    }

    pub(crate) fn pause(&self, topic: &str, group: &str) {
        self.paused
            .get_or_create(&GroupLabels {
                messaging_destination_name: topic.to_owned(),
                messaging_consumer_group_name: group.to_owned(),
            })
            .inc();
    }

    /// Records one partition's statistics.
    pub(crate) fn partition_stats(&self, topic: &str, group: &str, stats: &Partition) {
        let labels = partition_labels(topic, group, stats.partition);
        if let Some(lag) = lag_of(stats) {
            self.lag.get_or_create(&labels).set(lag);
        }
        if stats.committed_offset >= 0 {
            self.committed
                .get_or_create(&labels)
                .set(stats.committed_offset);
        }
        if stats.hi_offset >= 0 {
            self.high_watermark
                .get_or_create(&labels)
                .set(stats.hi_offset);
        }
    }

    /// Forgets a partition that is no longer assigned here.
    pub(crate) fn forget_partition(&self, topic: &str, group: &str, partition: i32) {
        let labels = partition_labels(topic, group, partition);
        self.lag.remove(&labels);
        self.committed.remove(&labels);
        self.high_watermark.remove(&labels);
    }
}

/// The lag of a partition: messages after the group's position. The position
/// is the stored offset (this consumer's finally settled position) when
/// there is one, else the committed offset, else the partition's start (the
/// adapter resets new groups to `earliest`).
fn lag_of(p: &Partition) -> Option<i64> {
    if p.consumer_lag_stored >= 0 {
        Some(p.consumer_lag_stored)
    } else if p.consumer_lag >= 0 {
        Some(p.consumer_lag)
    } else if p.committed_offset < 0 && p.hi_offset >= 0 && p.lo_offset >= 0 {
        Some((p.hi_offset - p.lo_offset).max(0))
    } else {
        None
    }
}
