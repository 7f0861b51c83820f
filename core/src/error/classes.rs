//! The plain classified errors: [`Transient`], [`Permanent`], [`Poison`].

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use super::{BoxError, Classify, ErrorClass};

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
