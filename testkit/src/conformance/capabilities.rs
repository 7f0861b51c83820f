//! What a transport declares it can do, and the suite's time limits.

use std::time::Duration;

/// What a transport declares it can do, and how long the suite waits.
///
/// Checks that need a capability the transport does not declare are
/// skipped, not failed. [`Capabilities::default`] declares nothing beyond
/// the basics every transport must have (publish, consume, ack, reject,
/// fan-out to groups, close) and suits a real broker's latencies;
/// [`Capabilities::all`] declares everything (the in-memory transport).
///
/// ```
/// use std::time::Duration;
/// use surety_testkit::conformance::Capabilities;
///
/// // A broker that is ordered and redelivers on nack, but only redelivers
/// // dropped deliveries when the channel closes and reports no delivery
/// // count.
/// let caps = Capabilities::default()
///     .per_key_order(true)
///     .redelivers_on_nack(true)
///     .redelivered_flag(true)
///     .competing_consumers(true)
///     .receive_timeout(Duration::from_secs(20));
/// assert!(!caps.redelivers_dropped);
/// assert!(!caps.delivery_count);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Messages with the same partition key, published in order by one
    /// publisher, are delivered in that order.
    pub per_key_order: bool,
    /// `nack(requeue = true)` delivers the message again.
    pub redelivers_on_nack: bool,
    /// A delivery dropped without being settled is delivered again while the
    /// connection stays open. (RabbitMQ only redelivers when the channel
    /// closes, so its adapter may declare `false`.)
    pub redelivers_dropped: bool,
    /// A redelivery has [`DeliveryInfo::redelivered`](surety_core::DeliveryInfo::redelivered) set.
    pub redelivered_flag: bool,
    /// The broker reports [`DeliveryInfo::delivery_count`](surety_core::DeliveryInfo::delivery_count):
    /// `Some(1)` on the first delivery, `Some(2)` on the second.
    pub delivery_count: bool,
    /// Members of one group compete: each message goes to one of them.
    pub competing_consumers: bool,
    /// How long the suite waits for anything that should happen: a
    /// delivery, a publish confirmation, a settlement, a close (default 10 s).
    /// A transport that does not deliver fails within this time instead of
    /// hanging.
    pub receive_timeout: Duration,
    /// How long the suite watches for something that must *not* happen, such
    /// as a redelivery after an ack (default 1 s). Absence can only be shown
    /// by waiting: this is a bounded wait, and a longer one catches slower
    /// mistakes.
    pub quiet_period: Duration,
    /// How the names of the topics and groups the suite creates start
    /// (default `surety-testkit`): `{prefix}.{check}.{role}.{uuid}`. A
    /// prefix unique to the run lets the caller delete what the run created
    /// on a real broker.
    pub name_prefix: String,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self {
            per_key_order: false,
            redelivers_on_nack: false,
            redelivers_dropped: false,
            redelivered_flag: false,
            delivery_count: false,
            competing_consumers: false,
            receive_timeout: Duration::from_secs(10),
            quiet_period: Duration::from_secs(1),
            name_prefix: "surety-testkit".to_owned(),
        }
    }
}

impl Capabilities {
    /// Every capability declared, with the default time limits.
    pub fn all() -> Self {
        Self {
            per_key_order: true,
            redelivers_on_nack: true,
            redelivers_dropped: true,
            redelivered_flag: true,
            delivery_count: true,
            competing_consumers: true,
            ..Self::default()
        }
    }

    /// Declares per-key ordering.
    pub fn per_key_order(mut self, yes: bool) -> Self {
        self.per_key_order = yes;
        self
    }

    /// Declares redelivery on `nack(requeue = true)`.
    pub fn redelivers_on_nack(mut self, yes: bool) -> Self {
        self.redelivers_on_nack = yes;
        self
    }

    /// Declares redelivery of deliveries dropped unsettled.
    pub fn redelivers_dropped(mut self, yes: bool) -> Self {
        self.redelivers_dropped = yes;
        self
    }

    /// Declares that redeliveries carry the redelivered flag.
    pub fn redelivered_flag(mut self, yes: bool) -> Self {
        self.redelivered_flag = yes;
        self
    }

    /// Declares that the broker reports a delivery count.
    pub fn delivery_count(mut self, yes: bool) -> Self {
        self.delivery_count = yes;
        self
    }

    /// Declares competing consumers within a group.
    pub fn competing_consumers(mut self, yes: bool) -> Self {
        self.competing_consumers = yes;
        self
    }

    /// Sets how long the suite waits for what should happen.
    pub fn receive_timeout(mut self, timeout: Duration) -> Self {
        self.receive_timeout = timeout;
        self
    }

    /// Sets how long the suite watches for what must not happen.
    pub fn quiet_period(mut self, period: Duration) -> Self {
        self.quiet_period = period;
        self
    }

    /// Sets how the names of the suite's topics and groups start; keep to
    /// lower-case ASCII letters, digits, `-` and `.`.
    pub fn name_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.name_prefix = prefix.into();
        self
    }
}
