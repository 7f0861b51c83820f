//! Error classes and the errors of the transport ports.
//!
//! Every failure in Surety is one of three [`ErrorClass`]es, and that class
//! alone decides what happens to the message:
//!
//! | class | meaning | what happens |
//! |---|---|---|
//! | [`Transient`](ErrorClass::Transient) | retrying may help (timeout, broker down, lock conflict) | retried, bounded |
//! | [`Permanent`](ErrorClass::Permanent) | the message is valid but can never succeed (validation) | dead-lettered at once |
//! | [`Poison`](ErrorClass::Poison) | the message cannot even be decoded | dead-lettered before any handler runs |
//!
//! Handlers return their own error types and implement [`Classify`] for them,
//! or return the plain [`Transient`], [`Permanent`] and [`Poison`] wrappers.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

/// A boxed error that can cross threads.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What kind of failure an error is, and therefore what to do with the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Retrying may succeed. `retry_after` is a hint from the failure itself
    /// (a `Retry-After`, a lock timeout); retry policies take it as a minimum.
    Transient {
        /// The earliest moment a retry makes sense, if the failure knows it.
        retry_after: Option<Duration>,
    },
    /// The message was understood but can never be handled (a validation
    /// failure, a business rule). Retrying cannot help.
    Permanent,
    /// The message cannot be decoded. It never reaches a handler.
    Poison,
}

impl ErrorClass {
    /// A transient class with no retry hint.
    pub const TRANSIENT: Self = Self::Transient { retry_after: None };

    /// The stable lower-case name: `transient`, `permanent` or `poison`.
    ///
    /// This is the value of the `surety-error-class` header and of the
    /// `error_class` metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Transient { .. } => "transient",
            Self::Permanent => "permanent",
            Self::Poison => "poison",
        }
    }

    /// Whether retrying can help.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }

    /// Parses the name produced by [`as_str`](Self::as_str).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "transient" => Some(Self::TRANSIENT),
            "permanent" => Some(Self::Permanent),
            "poison" => Some(Self::Poison),
            _ => None,
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Transient {
                retry_after: Some(d),
            } => write!(f, "transient (retry after {d:?})"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// Decides the [`ErrorClass`] of an error.
///
/// Implement it for your handler's error type; the consumer pipeline calls it
/// to choose between retry and dead-letter.
///
/// ```
/// use std::time::Duration;
/// use surety_core::{Classify, ErrorClass};
///
/// #[derive(Debug, thiserror::Error)]
/// enum PaymentError {
///     #[error("card declined")]
///     Declined,
///     #[error("payment provider unavailable")]
///     Unavailable,
/// }
///
/// impl Classify for PaymentError {
///     fn class(&self) -> ErrorClass {
///         match self {
///             PaymentError::Declined => ErrorClass::Permanent,
///             PaymentError::Unavailable => ErrorClass::Transient {
///                 retry_after: Some(Duration::from_secs(5)),
///             },
///         }
///     }
/// }
///
/// assert!(!PaymentError::Declined.class().is_retryable());
/// assert!(PaymentError::Unavailable.class().is_retryable());
/// ```
pub trait Classify {
    /// The class of this error.
    fn class(&self) -> ErrorClass;
}

impl<T: Classify + ?Sized> Classify for &T {
    fn class(&self) -> ErrorClass {
        (**self).class()
    }
}

impl<T: Classify + ?Sized> Classify for Box<T> {
    fn class(&self) -> ErrorClass {
        (**self).class()
    }
}

impl Classify for std::io::Error {
    fn class(&self) -> ErrorClass {
        use std::io::ErrorKind::*;
        match self.kind() {
            InvalidData | UnexpectedEof => ErrorClass::Poison,
            InvalidInput | NotFound | PermissionDenied | Unsupported | AlreadyExists => {
                ErrorClass::Permanent
            }
            _ => ErrorClass::TRANSIENT,
        }
    }
}

impl Classify for serde_json::Error {
    fn class(&self) -> ErrorClass {
        match self.classify() {
            serde_json::error::Category::Io => ErrorClass::TRANSIENT,
            serde_json::error::Category::Syntax
            | serde_json::error::Category::Data
            | serde_json::error::Category::Eof => ErrorClass::Poison,
        }
    }
}

impl Classify for tokio::time::error::Elapsed {
    fn class(&self) -> ErrorClass {
        ErrorClass::TRANSIENT
    }
}

macro_rules! plain_class {
    ($(#[$doc:meta])* $name:ident, $class:expr) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name {
            source: BoxError,
        }

        impl $name {
            /// Wraps any error, or a message (`&str`/`String`).
            pub fn new(source: impl Into<BoxError>) -> Self {
                Self { source: source.into() }
            }

            /// The wrapped error.
            pub fn into_inner(self) -> BoxError {
                self.source
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.source, f)
            }
        }

        impl StdError for $name {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                self.source.source()
            }
        }
    };
}

plain_class!(
    /// An error that is [`ErrorClass::Permanent`]: the message is valid but
    /// will never be handled successfully.
    ///
    /// ```
    /// use surety_core::{Classify, ErrorClass, Permanent};
    /// let err = Permanent::new("quantity must be positive");
    /// assert_eq!(err.class(), ErrorClass::Permanent);
    /// ```
    Permanent,
    ErrorClass::Permanent
);

impl Classify for Permanent {
    fn class(&self) -> ErrorClass {
        ErrorClass::Permanent
    }
}

plain_class!(
    /// An error that is [`ErrorClass::Poison`]: the message cannot be decoded.
    Poison,
    ErrorClass::Poison
);

impl Classify for Poison {
    fn class(&self) -> ErrorClass {
        ErrorClass::Poison
    }
}

/// An error that is [`ErrorClass::Transient`], optionally with a retry hint.
///
/// ```
/// use std::time::Duration;
/// use surety_core::{Classify, ErrorClass, Transient};
/// let err = Transient::new("inventory service busy").retry_after(Duration::from_secs(2));
/// assert_eq!(err.class(), ErrorClass::Transient { retry_after: Some(Duration::from_secs(2)) });
/// ```
#[derive(Debug)]
pub struct Transient {
    source: BoxError,
    retry_after: Option<Duration>,
}

impl Transient {
    /// Wraps any error, or a message (`&str`/`String`).
    pub fn new(source: impl Into<BoxError>) -> Self {
        Self {
            source: source.into(),
            retry_after: None,
        }
    }

    /// Sets the earliest time a retry makes sense.
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// The wrapped error.
    pub fn into_inner(self) -> BoxError {
        self.source
    }
}

impl fmt::Display for Transient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl StdError for Transient {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source.source()
    }
}

impl Classify for Transient {
    fn class(&self) -> ErrorClass {
        ErrorClass::Transient {
            retry_after: self.retry_after,
        }
    }
}

/// A handler failure: an error together with its class.
///
/// The consumer pipeline works with this type; handlers usually return their
/// own [`Classify`] error and the pipeline converts it with
/// [`HandlerError::new`].
#[derive(Debug)]
pub struct HandlerError {
    class: ErrorClass,
    source: BoxError,
    unavailable: bool,
}

impl HandlerError {
    /// Wraps a classified error, keeping its class.
    ///
    /// A `HandlerError` passed in is returned as it is, not wrapped again, so
    /// handlers can return `HandlerError` themselves.
    pub fn new<E>(error: E) -> Self
    where
        E: Classify + StdError + Send + Sync + 'static,
    {
        let class = error.class();
        let boxed: BoxError = Box::new(error);
        match boxed.downcast::<HandlerError>() {
            Ok(already) => *already,
            Err(source) => Self {
                class,
                source,
                unavailable: false,
            },
        }
    }

    /// Wraps any error with an explicit class.
    pub fn with_class(class: ErrorClass, source: impl Into<BoxError>) -> Self {
        Self {
            class,
            source: source.into(),
            unavailable: false,
        }
    }

    /// The pipeline could not record this message's outcome (a dead-letter
    /// store or a retry destination is down): the message is not at fault.
    /// The error is transient, and a [`Worker`](crate::consumer::Worker)
    /// requeues it whatever its delivery count, so that it is neither
    /// rejected nor lost while the pipeline recovers.
    pub fn unavailable(source: impl Into<BoxError>) -> Self {
        Self {
            unavailable: true,
            ..Self::with_class(ErrorClass::TRANSIENT, source)
        }
    }

    /// Whether this is an [`unavailable`](Self::unavailable) error.
    pub fn is_unavailable(&self) -> bool {
        self.unavailable
    }

    /// Sets the retry hint of a transient error; other classes are unchanged.
    pub fn retry_after(mut self, delay: Duration) -> Self {
        if let ErrorClass::Transient { retry_after } = &mut self.class {
            *retry_after = Some(delay);
        }
        self
    }

    /// A transient failure.
    pub fn transient(source: impl Into<BoxError>) -> Self {
        Self::with_class(ErrorClass::TRANSIENT, source)
    }

    /// A permanent failure.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self::with_class(ErrorClass::Permanent, source)
    }

    /// A poison message.
    pub fn poison(source: impl Into<BoxError>) -> Self {
        Self::with_class(ErrorClass::Poison, source)
    }

    /// The wrapped error.
    pub fn inner(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.source
    }

    /// The error message followed by its `source()` chain, joined with `: `,
    /// cut to at most `max_len` bytes (on a character boundary).
    pub fn chain_message(&self, max_len: usize) -> String {
        let mut out = self.source.to_string();
        let mut next = self.source.source();
        while let Some(err) = next {
            out.push_str(": ");
            out.push_str(&err.to_string());
            next = err.source();
        }
        truncate_on_char_boundary(&mut out, max_len);
        out
    }
}

/// The message of a caught panic payload (`&str` or `String` payloads; a
/// placeholder for anything else), prefixed with `handler panicked: `.
///
/// ```
/// let panic = std::panic::catch_unwind(|| panic!("index {} out of range", 7)).unwrap_err();
/// assert_eq!(surety_core::error::panic_message(&*panic), "handler panicked: index 7 out of range");
/// ```
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let detail = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("non-string panic payload");
    format!("handler panicked: {detail}")
}

fn truncate_on_char_boundary(s: &mut String, max_len: usize) {
    if s.len() > max_len {
        let mut end = max_len;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failure: {}", self.class.as_str(), self.source)
    }
}

impl StdError for HandlerError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

impl Classify for HandlerError {
    fn class(&self) -> ErrorClass {
        self.class
    }
}

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

impl Classify for std::convert::Infallible {
    fn class(&self) -> ErrorClass {
        match *self {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names_round_trip() {
        for class in [
            ErrorClass::TRANSIENT,
            ErrorClass::Permanent,
            ErrorClass::Poison,
        ] {
            assert_eq!(ErrorClass::from_name(class.as_str()), Some(class));
        }
        assert_eq!(ErrorClass::from_name("fatal"), None);
    }

    #[test]
    fn json_syntax_errors_are_poison() {
        let err = serde_json::from_slice::<serde_json::Value>(b"{nope").unwrap_err();
        assert_eq!(err.class(), ErrorClass::Poison);
    }

    #[test]
    fn io_errors_split_by_kind() {
        use std::io::{Error, ErrorKind};
        assert!(
            Error::from(ErrorKind::ConnectionReset)
                .class()
                .is_retryable()
        );
        assert!(Error::from(ErrorKind::TimedOut).class().is_retryable());
        assert_eq!(
            Error::from(ErrorKind::InvalidInput).class(),
            ErrorClass::Permanent
        );
        assert_eq!(
            Error::from(ErrorKind::InvalidData).class(),
            ErrorClass::Poison
        );
    }

    #[test]
    fn chain_message_includes_sources_and_is_bounded() {
        let inner = std::io::Error::other("disk full");
        let outer =
            TransportError::new(TransportErrorKind::Connection, "write failed").with_source(inner);
        let err = HandlerError::new(outer);
        assert_eq!(err.class(), ErrorClass::TRANSIENT);
        assert_eq!(
            err.chain_message(1000),
            "write failed (connection): disk full"
        );
        assert_eq!(err.chain_message(5), "write");
        // Never splits a multi-byte character.
        let err = HandlerError::permanent("ééé");
        assert_eq!(err.chain_message(3), "é");
    }

    #[test]
    fn wrapping_a_handler_error_keeps_it_as_it_is() {
        let inner = HandlerError::unavailable("dlq down").retry_after(Duration::from_secs(1));
        let again = HandlerError::new(inner);
        assert!(again.is_unavailable());
        assert_eq!(
            again.class(),
            ErrorClass::Transient {
                retry_after: Some(Duration::from_secs(1))
            }
        );
        assert_eq!(again.chain_message(100), "dlq down");
        assert_eq!(
            HandlerError::permanent("x")
                .retry_after(Duration::from_secs(1))
                .class(),
            ErrorClass::Permanent
        );
    }

    #[test]
    fn transport_kinds_classify_sensibly() {
        let unroutable = TransportError::new(TransportErrorKind::Unroutable, "no queue");
        assert_eq!(unroutable.class(), ErrorClass::Permanent);
        let timeout = TransportError::new(TransportErrorKind::Timeout, "no confirm");
        assert!(timeout.class().is_retryable());
    }
}
