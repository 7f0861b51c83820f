//! [`TransportError`]: the errors of the transport ports.

use std::error::Error as StdError;
use std::fmt;

use super::{BoxError, Classify, ErrorClass};

/// What went wrong in a transport operation, independent of the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransportErrorKind {
    /// The transport (or this publisher/subscription) was closed.
    Closed,
    /// The broker could not route the message to any queue (for example an
    /// AMQP `mandatory` publish that came back).
    Unroutable,
    /// The broker refused to take responsibility for the message (a negative
    /// publisher confirm).
    Nacked,
    /// No confirmation arrived in time. The message may or may not have been
    /// stored: publish again and let consumers deduplicate.
    Timeout,
    /// The connection to the broker failed or was lost.
    Connection,
    /// The configuration is invalid (bad URL, unknown topic, missing queue).
    Config,
    /// The broker rejected the message itself (too large, invalid).
    Rejected,
    /// Acknowledging a delivery failed; the broker will redeliver it.
    Ack,
    /// Anything else.
    Other,
}

impl TransportErrorKind {
    /// The stable lower-case name, used as a metric label value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Unroutable => "unroutable",
            Self::Nacked => "nacked",
            Self::Timeout => "timeout",
            Self::Connection => "connection",
            Self::Config => "config",
            Self::Rejected => "rejected",
            Self::Ack => "ack",
            Self::Other => "other",
        }
    }
}

impl fmt::Display for TransportErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error from a [`Publisher`](crate::Publisher), a
/// [`Subscriber`](crate::Subscriber) or a [`Delivery`](crate::Delivery)
/// acknowledgement, with a portable [`kind`](Self::kind).
#[derive(Debug)]
pub struct TransportError {
    kind: TransportErrorKind,
    message: String,
    source: Option<BoxError>,
}

impl TransportError {
    /// A new error of `kind` with a human-readable message.
    pub fn new(kind: TransportErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying (driver) error.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// A [`TransportErrorKind::Closed`] error.
    pub fn closed(what: impl Into<String>) -> Self {
        Self::new(TransportErrorKind::Closed, what)
    }

    /// The portable kind.
    pub fn kind(&self) -> TransportErrorKind {
        self.kind
    }
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.kind)
    }
}

impl StdError for TransportError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

impl Classify for TransportError {
    fn class(&self) -> ErrorClass {
        match self.kind {
            TransportErrorKind::Unroutable
            | TransportErrorKind::Config
            | TransportErrorKind::Rejected => ErrorClass::Permanent,
            _ => ErrorClass::TRANSIENT,
        }
    }
}

/// `Result` with [`TransportError`] as the default error.
pub type Result<T, E = TransportError> = std::result::Result<T, E>;
