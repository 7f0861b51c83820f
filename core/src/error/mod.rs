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

impl Classify for std::convert::Infallible {
    fn class(&self) -> ErrorClass {
        match *self {}
    }
}

mod classes;
mod handler;
mod transport;

pub use classes::{Permanent, Poison, Transient};
pub use handler::{HandlerError, panic_message};
pub use transport::{Result, TransportError, TransportErrorKind};

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
