//! Helpers for transport adapters: what every [`Subscriber`](crate::Subscriber)
//! and [`Publisher`](crate::Publisher) implementation needs the same way
//! (the attempt of a delivery, the settle error, name checks, deadlines that
//! never overflow). Applications do not need this module.

use std::time::Duration;

use tokio::time::Instant;

use crate::envelope::Envelope;
use crate::error::{Result, TransportError};
use crate::port::DeliveryInfo;

/// The attempt number of a delivery; see [`Delivery::attempt`](crate::Delivery::attempt).
///
/// ```
/// use surety_core::transport::attempt_of;
/// use surety_core::{DeliveryInfo, Envelope};
///
/// let mut envelope = Envelope::builder("/shop", "order.placed").build();
/// envelope.headers.set_attempt(1);
/// let mut info = DeliveryInfo::new("rabbitmq", "orders", "billing");
/// info.delivery_count = Some(4);
/// // A producer's `surety-attempt: 1` does not pin the attempt.
/// assert_eq!(attempt_of(&envelope, &info), 4);
/// envelope.headers.set_attempt(7);
/// assert_eq!(attempt_of(&envelope, &info), 7);
/// ```
pub fn attempt_of(envelope: &Envelope, info: &DeliveryInfo) -> u32 {
    let from_header = envelope.headers.attempt().ok().flatten().unwrap_or(0);
    let from_transport = info
        .delivery_count
        .unwrap_or(if info.redelivered { 2 } else { 1 });
    from_header.max(from_transport).max(1)
}

/// The error for a settle operation that failed because the delivery's
/// channel or subscription is gone.
pub fn settle_failed(what: &str) -> TransportError {
    TransportError::new(
        crate::TransportErrorKind::Ack,
        format!("{what}: the delivery can no longer be settled and will be redelivered"),
    )
}

/// Checks that a topic or consumer group name is not empty: transports call
/// it before they use a name, and get a
/// [`Config`](crate::TransportErrorKind::Config) error naming `what`
/// (`"topic"`, `"group"`) otherwise.
///
/// ```
/// use surety_core::TransportErrorKind;
/// use surety_core::transport::require_name;
///
/// assert!(require_name("topic", "orders").is_ok());
/// let err = require_name("group", "").unwrap_err();
/// assert_eq!(err.kind(), TransportErrorKind::Config);
/// assert!(err.to_string().contains("group name must not be empty"));
/// ```
pub fn require_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        Err(TransportError::new(
            crate::TransportErrorKind::Config,
            format!("{what} name must not be empty"),
        ))
    } else {
        Ok(())
    }
}

/// The instant `after` from now, or about 30 years from now when `after` is
/// too large to add (a `Duration::MAX` timeout means "never"), as tokio's
/// own timers do. Never panics.
///
/// ```
/// use std::time::Duration;
/// use surety_core::transport::deadline_after;
///
/// let never = deadline_after(Duration::MAX);
/// assert!(never > tokio::time::Instant::now() + Duration::from_secs(86_400 * 365));
/// ```
pub fn deadline_after(after: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

/// What [`deadline_after`] falls back to: about 30 years.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);
