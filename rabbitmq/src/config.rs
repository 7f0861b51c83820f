//! [`RabbitConfig`]: where the broker is and how the adapter behaves.

use std::time::Duration;

use crate::metrics::RabbitMetrics;

/// The default exchange name.
pub const DEFAULT_EXCHANGE: &str = "surety";
/// The default prefetch (unacknowledged deliveries per subscription).
pub const DEFAULT_PREFETCH: u16 = 64;
/// The default time a publisher confirm may take.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// The default time a publish waits for the connection to come back.
pub const DEFAULT_OUTAGE_WAIT: Duration = Duration::from_secs(30);
/// The default bound on publishes awaiting their confirm.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

/// The kind of queue [`subscribe`](surety_core::Subscriber::subscribe) declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum QueueType {
    /// A classic durable queue. The broker does not count deliveries, so the
    /// adapter does: a nack with requeue (or a delivery dropped unsettled)
    /// publishes a confirmed copy carrying the count
    /// ([`X_SURETY_DELIVERIES`](crate::X_SURETY_DELIVERIES)) to the queue's
    /// tail and acks the original, and
    /// [`DeliveryInfo::delivery_count`](surety_core::DeliveryInfo) reads it.
    /// The message comes back behind those published since.
    #[default]
    Classic,
    /// A replicated quorum queue. The broker counts deliveries (the
    /// `x-delivery-count` header), and with `delivery_limit` it dead-letters
    /// (or drops) a message after that many failed deliveries.
    Quorum {
        /// `x-delivery-limit`: returned deliveries after which the broker
        /// gives up on a message. `None` leaves the broker's default.
        delivery_limit: Option<u32>,
    },
}

/// Configuration of a [`RabbitTransport`](crate::RabbitTransport).
///
/// ```
/// use std::time::Duration;
/// use surety_rabbitmq::{QueueType, RabbitConfig};
///
/// let config = RabbitConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f")
///     .exchange("shop")
///     .prefetch(16)
///     .confirm_timeout(Duration::from_secs(10))
///     .queue_type(QueueType::Quorum { delivery_limit: Some(5) });
/// assert_eq!(config.exchange, "shop");
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RabbitConfig {
    /// The AMQP URL, e.g. `amqp://user:pass@host:5672/%2f`.
    pub url: String,
    /// The durable topic exchange every topic is a routing key on
    /// (default [`DEFAULT_EXCHANGE`]). Declared on connect.
    pub exchange: String,
    /// Unacknowledged deliveries the broker sends each subscription ahead
    /// (`basic.qos`, default [`DEFAULT_PREFETCH`]).
    pub prefetch: u16,
    /// How long a publish waits for the broker's confirm before it fails
    /// with [`Timeout`](surety_core::TransportErrorKind::Timeout)
    /// (default [`DEFAULT_CONFIRM_TIMEOUT`]).
    pub confirm_timeout: Duration,
    /// How long a publish waits for a lost connection to be recovered (or a
    /// blocked connection to be unblocked) before it fails with
    /// [`Connection`](surety_core::TransportErrorKind::Connection)
    /// (default [`DEFAULT_OUTAGE_WAIT`]).
    pub outage_wait: Duration,
    /// Publishes sent and not yet confirmed, per transport; `send` waits for
    /// room beyond it (default [`DEFAULT_MAX_IN_FLIGHT`]).
    pub max_in_flight: usize,
    /// The queue type declared for subscriptions (default classic).
    pub queue_type: QueueType,
    /// Declares subscription queues with `x-single-active-consumer`
    /// (default off): of the members of a group, only one receives
    /// deliveries and the others stand by until it leaves, so one
    /// partition key's messages are handled by one process at a time and in
    /// order across processes (with a worker, in order within it too).
    pub single_active_consumer: bool,
    /// How long [`connect`](crate::RabbitTransport::connect) may take before
    /// it fails with [`Connection`](surety_core::TransportErrorKind::Connection)
    /// (default 10 s).
    pub connect_timeout: Duration,
    /// Longest pause between two reconnect attempts (default 2 s; the first
    /// is 100 ms, doubling).
    pub reconnect_max_delay: Duration,
    /// Reconnect attempts before the connection is given up for good
    /// (default 1000: with the default delays, more than half an hour).
    pub reconnect_attempts: usize,
    /// The AMQP heartbeat interval asked for when the URL has no
    /// `heartbeat` parameter (default 10 s; the broker may lower it): how
    /// fast a silently dead connection is noticed.
    pub heartbeat: Duration,
    /// How long lapin's own recovery may leave the connection down while
    /// the broker accepts TCP connections again, before the transport gives
    /// up on that connection and opens a new one (default 10 s; see
    /// ADR 0004).
    pub recovery_stall_timeout: Duration,
    /// The connection name shown in the RabbitMQ management UI.
    pub connection_name: Option<String>,
    /// Where the adapter records its metrics (default: unregistered).
    pub metrics: RabbitMetrics,
}

impl RabbitConfig {
    /// The defaults for the broker at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            exchange: DEFAULT_EXCHANGE.to_owned(),
            prefetch: DEFAULT_PREFETCH,
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
            outage_wait: DEFAULT_OUTAGE_WAIT,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            queue_type: QueueType::Classic,
            single_active_consumer: false,
            connect_timeout: Duration::from_secs(10),
            reconnect_max_delay: Duration::from_secs(2),
            reconnect_attempts: 1000,
            heartbeat: Duration::from_secs(10),
            recovery_stall_timeout: Duration::from_secs(10),
            connection_name: None,
            metrics: RabbitMetrics::default(),
        }
    }

    /// Sets the exchange name.
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }

    /// Sets the prefetch (0 is taken as 1: an unlimited prefetch defeats
    /// backpressure).
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Sets the confirm timeout.
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// Sets how long publishes wait for a lost connection to come back.
    pub fn outage_wait(mut self, wait: Duration) -> Self {
        self.outage_wait = wait;
        self
    }

    /// Sets the bound on publishes awaiting their confirm (0 is taken as 1).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Sets the queue type declared for subscriptions.
    pub fn queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// Declares subscription queues with a single active consumer; see
    /// [`single_active_consumer`](Self::single_active_consumer). A queue
    /// declared without it earlier must be deleted first: RabbitMQ refuses
    /// to redeclare a queue with other arguments.
    pub fn single_active_consumer(mut self, on: bool) -> Self {
        self.single_active_consumer = on;
        self
    }

    /// Sets the connect timeout.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the reconnect schedule: the longest pause between attempts and
    /// how many attempts are made before giving up.
    pub fn reconnect(mut self, max_delay: Duration, attempts: usize) -> Self {
        self.reconnect_max_delay = max_delay;
        self.reconnect_attempts = attempts;
        self
    }

    /// Sets the heartbeat interval used when the URL does not set one (at
    /// least 1 s).
    pub fn heartbeat(mut self, interval: Duration) -> Self {
        self.heartbeat = interval.max(Duration::from_secs(1));
        self
    }

    /// Sets how long a stalled recovery is waited for before the transport
    /// replaces the connection.
    pub fn recovery_stall_timeout(mut self, timeout: Duration) -> Self {
        self.recovery_stall_timeout = timeout;
        self
    }

    /// Sets the connection name shown in the management UI.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// Records metrics into `metrics` (see [`RabbitMetrics::register`]).
    pub fn metrics(mut self, metrics: RabbitMetrics) -> Self {
        self.metrics = metrics;
        self
    }
}

pub(crate) use surety_core::transport::deadline_after;
