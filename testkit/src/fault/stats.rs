//! What a [`FaultyTransport`](super::FaultyTransport) injected.

use std::fmt;
use std::time::Duration;

/// How many events [`FaultyTransport::events`](super::FaultyTransport::events)
/// keeps: the first this many faults are recorded, later ones are only
/// counted in [`FaultStats`].
pub const EVENT_LOG_LIMIT: usize = 10_000;

/// One injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Fault {
    /// A delivery was dropped unsettled before it reached the consumer.
    Dropped,
    /// A message was published twice.
    Duplicated,
    /// A delivery was held back behind the next one.
    Reordered,
    /// A publish was delayed by this long before it was sent.
    PublishDelayed(Duration),
    /// A delivery was delayed by this long before it was yielded.
    DeliveryDelayed(Duration),
    /// A publish failed without publishing.
    PublishFailed,
    /// An ack failed; the message was left unsettled and comes back.
    AckFailed,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dropped => f.write_str("dropped"),
            Self::Duplicated => f.write_str("duplicated"),
            Self::Reordered => f.write_str("reordered"),
            Self::PublishDelayed(d) => write!(f, "publish delayed by {d:?}"),
            Self::DeliveryDelayed(d) => write!(f, "delivery delayed by {d:?}"),
            Self::PublishFailed => f.write_str("publish failed"),
            Self::AckFailed => f.write_str("ack failed"),
        }
    }
}

/// A fault and the message it hit, as recorded by
/// [`FaultyTransport::events`](super::FaultyTransport::events).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct FaultEvent {
    /// What was injected.
    pub fault: Fault,
    /// The topic of the publish or delivery.
    pub topic: String,
    /// The envelope id of the message.
    pub message_id: String,
}

impl fmt::Display for FaultEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (message {} on {})",
            self.fault, self.message_id, self.topic
        )
    }
}

/// Counts of the faults a [`FaultyTransport`](super::FaultyTransport)
/// injected, by kind.
///
/// ```
/// use surety_testkit::fault::FaultStats;
///
/// let stats = FaultStats::default();
/// assert_eq!(stats.total(), 0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FaultStats {
    /// Deliveries dropped unsettled.
    pub dropped: u64,
    /// Messages published twice.
    pub duplicated: u64,
    /// Deliveries held back behind the next one.
    pub reordered: u64,
    /// Publishes delayed.
    pub publish_delayed: u64,
    /// Deliveries delayed.
    pub delivery_delayed: u64,
    /// Publishes failed.
    pub publish_failed: u64,
    /// Acks failed.
    pub ack_failed: u64,
}

impl FaultStats {
    /// All faults injected, of every kind.
    pub fn total(&self) -> u64 {
        self.dropped
            + self.duplicated
            + self.reordered
            + self.publish_delayed
            + self.delivery_delayed
            + self.publish_failed
            + self.ack_failed
    }

    pub(crate) fn count(&mut self, fault: Fault) {
        let counter = match fault {
            Fault::Dropped => &mut self.dropped,
            Fault::Duplicated => &mut self.duplicated,
            Fault::Reordered => &mut self.reordered,
            Fault::PublishDelayed(_) => &mut self.publish_delayed,
            Fault::DeliveryDelayed(_) => &mut self.delivery_delayed,
            Fault::PublishFailed => &mut self.publish_failed,
            Fault::AckFailed => &mut self.ack_failed,
        };
        *counter += 1;
    }
}

impl fmt::Display for FaultStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dropped {}, duplicated {}, reordered {}, publish delayed {}, delivery delayed {}, \
             publish failed {}, ack failed {}",
            self.dropped,
            self.duplicated,
            self.reordered,
            self.publish_delayed,
            self.delivery_delayed,
            self.publish_failed,
            self.ack_failed
        )
    }
}
