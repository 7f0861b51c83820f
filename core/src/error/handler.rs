//! [`HandlerError`]: what the consumer pipeline carries for a failed handler.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use super::{BoxError, Classify, ErrorClass};

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
