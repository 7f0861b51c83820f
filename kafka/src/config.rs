//! [`KafkaConfig`]: where the brokers are and how the adapter behaves.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::config::RDKafkaLogLevel;
use surety_core::{TransportError, TransportErrorKind};

use crate::metrics::KafkaMetrics;

/// The longest delivery timeout: librdkafka's limit for
/// `message.timeout.ms`, `i32::MAX` milliseconds (about 24.8 days). The
/// setter clamps to it; a longer value set on the field directly is a
/// config error at connect.
pub(crate) const MAX_DELIVERY_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

/// The longest connect timeout: librdkafka's limit for the request timeout
/// of admin operations (topic creation), one hour. Clamped and checked as
/// [`MAX_DELIVERY_TIMEOUT`].
pub(crate) const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(3600);

/// librdkafka properties the adapter sets itself, because its guarantees
/// depend on them. Setting one through [`KafkaConfig::property`] (or the
/// producer and consumer variants) is a [`Config`](TransportErrorKind::Config)
/// error at [`connect`](crate::KafkaTransport::connect).
pub const MANAGED_PROPERTIES: [&str; 10] = [
    "bootstrap.servers",
    "client.id",
    "enable.idempotence",
    "acks",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "statistics.interval.ms",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
];

/// How to reach the Kafka cluster and how the adapter behaves.
///
/// Build one with [`KafkaConfig::new`] and the builder methods; every field
/// has a default suited to production except the bootstrap servers.
///
/// ```
/// use std::time::Duration;
/// use surety_kafka::KafkaConfig;
///
/// let config = KafkaConfig::new("127.0.0.1:9092")
///     .client_id("checkout")
///     .delivery_timeout(Duration::from_secs(10))
///     .consumer_property("auto.commit.interval.ms", "1000")
///     .create_missing_topics(3);
/// assert_eq!(config.create_missing_topics, Some(3));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list (librdkafka `bootstrap.servers`).
    pub bootstrap_servers: String,
    /// The client id sent to the brokers (default `surety`). Consumers add
    /// their group to it.
    pub client_id: String,
    /// Extra librdkafka properties for every client (producer, consumers,
    /// admin), e.g. `security.protocol` or `sasl.*`.
    pub properties: BTreeMap<String, String>,
    /// Extra librdkafka properties for the producer only, e.g. `linger.ms`
    /// or `compression.type`.
    pub producer_properties: BTreeMap<String, String>,
    /// Extra librdkafka properties for consumers only, e.g.
    /// `auto.commit.interval.ms`, `session.timeout.ms` or
    /// `auto.offset.reset` (the adapter's default is `earliest`).
    pub consumer_properties: BTreeMap<String, String>,
    /// How long the producer tries to deliver a message before its
    /// confirmation fails with [`Timeout`](TransportErrorKind::Timeout)
    /// (librdkafka `message.timeout.ms`; default 30 s; at most librdkafka's
    /// limit of `i32::MAX` milliseconds, about 24.8 days).
    pub delivery_timeout: Duration,
    /// How long [`connect`](crate::KafkaTransport::connect), topic checks and
    /// topic creation wait for the cluster to answer (default 10 s; at most
    /// librdkafka's limit for admin requests, one hour).
    pub connect_timeout: Duration,
    /// How often librdkafka reports statistics, from which the lag, committed
    /// offset and high watermark gauges are taken (default 5 s; `None`
    /// disables statistics and leaves those gauges empty).
    pub statistics_interval: Option<Duration>,
    /// Create a topic that does not exist, with this many partitions, when
    /// publishing to it or subscribing to it. Off by default: a missing topic
    /// is then a [`Config`](TransportErrorKind::Config) error naming it.
    pub create_missing_topics: Option<i32>,
    /// Replication factor of created topics (default: the broker's default).
    pub replication_factor: Option<i32>,
    /// How many deliveries each subscription buffers ahead of the
    /// application (default 256). While the buffer is full the consumer
    /// takes nothing more from librdkafka, whose own prefetch queue then
    /// fills and stops fetching (bounded by the `queued.min.messages` and
    /// `queued.max.messages.kbytes` consumer properties).
    pub consumer_buffer: usize,
    /// How long a full buffer may go without the application taking a
    /// delivery before the consumer pauses its partitions (default 1 s).
    ///
    /// Paused, the consumer polls again, so that rebalances and statistics
    /// are served and `max.poll.interval.ms` is never exceeded, without
    /// taking more messages. A pause discards what librdkafka had fetched,
    /// so the consumer resumes only once the application has drained half
    /// of the buffer. Each pause counts in
    /// [`KafkaMetrics::consumer_pauses`]. Until then a rebalance waits for
    /// the consumer's next poll: at most this long.
    pub pause_after: Duration,
    /// How long [`subscribe`](surety_core::Subscriber::subscribe) waits for
    /// the consumer to join its group and receive its first assignment
    /// (default 30 s).
    pub group_join_timeout: Duration,
    /// After a subscription's stream is dropped, how long the consumer stays
    /// in the group so that deliveries still being handled can be settled
    /// (default 30 s, like the worker's shutdown grace).
    pub drain_timeout: Duration,
    /// Where the adapter records its metrics (default: unregistered).
    pub metrics: KafkaMetrics,
}

impl KafkaConfig {
    /// A configuration for the cluster at `bootstrap_servers`.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            client_id: "surety".to_owned(),
            properties: BTreeMap::new(),
            producer_properties: BTreeMap::new(),
            consumer_properties: BTreeMap::new(),
            delivery_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            statistics_interval: Some(Duration::from_secs(5)),
            create_missing_topics: None,
            replication_factor: None,
            consumer_buffer: 256,
            pause_after: Duration::from_secs(1),
            group_join_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            metrics: KafkaMetrics::default(),
        }
    }

    /// Sets the client id.
    pub fn client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = client_id.into();
        self
    }

    /// Adds a librdkafka property for every client.
    pub fn property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// Adds a librdkafka property for the producer.
    pub fn producer_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.producer_properties.insert(key.into(), value.into());
        self
    }

    /// Adds a librdkafka property for consumers.
    pub fn consumer_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.consumer_properties.insert(key.into(), value.into());
        self
    }

    /// Sets the delivery timeout; a longer one than librdkafka's limit
    /// (`i32::MAX` milliseconds, about 24.8 days) is taken as the limit.
    pub fn delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout.min(MAX_DELIVERY_TIMEOUT);
        self
    }

    /// Sets the connect timeout; a longer one than librdkafka's limit for
    /// admin requests (one hour) is taken as the limit.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout.min(MAX_CONNECT_TIMEOUT);
        self
    }

    /// Sets the statistics interval (`None` disables statistics).
    pub fn statistics_interval(mut self, interval: Option<Duration>) -> Self {
        self.statistics_interval = interval;
        self
    }

    /// Creates missing topics with `partitions` partitions.
    pub fn create_missing_topics(mut self, partitions: i32) -> Self {
        self.create_missing_topics = Some(partitions);
        self
    }

    /// Sets the replication factor of created topics.
    pub fn replication_factor(mut self, replicas: i32) -> Self {
        self.replication_factor = Some(replicas);
        self
    }

    /// Sets the per-subscription buffer (0 is taken as 1).
    pub fn consumer_buffer(mut self, deliveries: usize) -> Self {
        self.consumer_buffer = deliveries.max(1);
        self
    }

    /// Sets how long a full buffer waits for the application before the
    /// consumer pauses its partitions.
    pub fn pause_after(mut self, period: Duration) -> Self {
        self.pause_after = period;
        self
    }

    /// Sets how long a subscription waits to join its group.
    pub fn group_join_timeout(mut self, timeout: Duration) -> Self {
        self.group_join_timeout = timeout;
        self
    }

    /// Sets how long a dropped subscription waits for in-flight settlements.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Records metrics into `metrics` (see [`KafkaMetrics::register`]).
    pub fn metrics(mut self, metrics: KafkaMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Checks what librdkafka cannot: names, numbers, managed properties.
    pub(crate) fn validate(&self) -> Result<(), TransportError> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err(config_error("bootstrap servers must not be empty"));
        }
        if self.client_id.is_empty() {
            return Err(config_error("client id must not be empty"));
        }
        for map in [
            &self.properties,
            &self.producer_properties,
            &self.consumer_properties,
        ] {
            if let Some(key) = map
                .keys()
                .find(|k| MANAGED_PROPERTIES.contains(&k.as_str()))
            {
                return Err(config_error(format!(
                    "librdkafka property {key:?} is managed by surety-kafka; \
                     use the KafkaConfig field instead"
                )));
            }
        }
        if matches!(self.create_missing_topics, Some(p) if p < 1) {
            return Err(config_error(
                "create_missing_topics needs at least 1 partition",
            ));
        }
        if matches!(self.replication_factor, Some(r) if r < 1) {
            return Err(config_error("replication factor must be at least 1"));
        }
        if self.delivery_timeout.is_zero() {
            return Err(config_error("delivery timeout must not be zero"));
        }
        for (name, timeout, max) in [
            (
                "delivery timeout",
                self.delivery_timeout,
                MAX_DELIVERY_TIMEOUT,
            ),
            ("connect timeout", self.connect_timeout, MAX_CONNECT_TIMEOUT),
        ] {
            if timeout > max {
                return Err(config_error(format!(
                    "{name} {timeout:?} is longer than librdkafka's limit of {max:?}"
                )));
            }
        }
        Ok(())
    }

    fn base(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        // Hand every line librdkafka writes to `tracing`, which filters; it
        // writes debug lines only for the contexts in its `debug` property.
        config.set_log_level(RDKafkaLogLevel::Debug);
        config
            .set("bootstrap.servers", &self.bootstrap_servers)
            .set("client.id", &self.client_id);
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }

    /// The producer's librdkafka configuration.
    pub(crate) fn producer(&self) -> ClientConfig {
        let mut config = self.base();
        for (key, value) in &self.producer_properties {
            config.set(key, value);
        }
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", millis(self.delivery_timeout));
        config
    }

    /// The admin client's librdkafka configuration.
    pub(crate) fn admin(&self) -> ClientConfig {
        self.base()
    }

    /// A consumer's librdkafka configuration for `group`.
    pub(crate) fn consumer(&self, group: &str) -> ClientConfig {
        let mut config = self.base();
        config
            .set("client.id", format!("{}-{group}", self.client_id))
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false");
        for (key, value) in &self.consumer_properties {
            config.set(key, value);
        }
        config
            .set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false");
        if let Some(interval) = self.statistics_interval {
            config.set(
                "statistics.interval.ms",
                millis(interval.max(Duration::from_millis(1))),
            );
        }
        config
    }
}

fn millis(d: Duration) -> String {
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .min(i32::MAX as u64)
        .to_string()
}

pub(crate) fn config_error(message: impl Into<String>) -> TransportError {
    TransportError::new(TransportErrorKind::Config, message)
}

pub(crate) use surety_core::transport::deadline_after;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn managed_properties_are_refused() {
        let err = KafkaConfig::new("localhost:9092")
            .consumer_property("enable.auto.commit", "false")
            .validate()
            .unwrap_err();
        assert_eq!(err.kind(), TransportErrorKind::Config);
        assert!(err.to_string().contains("enable.auto.commit"));
    }

    #[test]
    fn consumers_store_offsets_only_when_told() {
        let config = KafkaConfig::new("localhost:9092")
            .consumer_property("auto.offset.reset", "latest")
            .consumer("billing");
        assert_eq!(config.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(config.get("enable.auto.commit"), Some("true"));
        assert_eq!(config.get("group.id"), Some("billing"));
        assert_eq!(config.get("auto.offset.reset"), Some("latest"));
        let producer = KafkaConfig::new("localhost:9092").producer();
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        assert_eq!(producer.get("acks"), Some("all"));
    }

    #[test]
    fn timeouts_of_duration_max_are_clamped_or_refused_never_a_panic() {
        let config = KafkaConfig::new("localhost:9092")
            .delivery_timeout(Duration::MAX)
            .connect_timeout(Duration::MAX)
            .drain_timeout(Duration::MAX)
            .pause_after(Duration::MAX);
        assert_eq!(config.delivery_timeout, MAX_DELIVERY_TIMEOUT);
        assert_eq!(config.connect_timeout, MAX_CONNECT_TIMEOUT);
        config.validate().unwrap();
        assert_eq!(
            config.producer().get("message.timeout.ms"),
            Some("2147483647")
        );
        // The consumer's drain and pause deadlines are taken this way.
        assert!(deadline_after(config.drain_timeout) > tokio::time::Instant::now());
        assert!(deadline_after(config.pause_after) > tokio::time::Instant::now());

        let mut direct = KafkaConfig::new("localhost:9092");
        direct.connect_timeout = Duration::MAX;
        let err = direct.validate().unwrap_err();
        assert_eq!(err.kind(), TransportErrorKind::Config);
        assert!(err.to_string().contains("connect timeout"), "{err}");
    }

    #[test]
    fn empty_servers_are_a_config_error() {
        let err = KafkaConfig::new(" ").validate().unwrap_err();
        assert_eq!(err.kind(), TransportErrorKind::Config);
    }
}
