//! The error of every dedup store operation.

use std::time::Duration;

use surety_core::{BoxError, Classify, ErrorClass};

/// A dedup store operation failed.
///
/// Every variant but [`Corrupt`](Self::Corrupt) is
/// [transient](ErrorClass::Transient): the message is delivered again and
/// the claim is retried.
///
/// ```
/// use surety_core::Classify;
/// use surety_idempotency::StoreError;
///
/// let err = StoreError::LeaseLost { key: "/orders o-1".into() };
/// assert!(err.class().is_retryable());
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The lease token no longer holds the claim on `key`: the lease expired
    /// and another delivery took it over, the claim was released, or it was
    /// purged. The holder must not complete (fencing).
    #[error(
        "the claim on {key:?} is no longer held by this lease (it expired and was taken over, released or purged)"
    )]
    LeaseLost {
        /// The dedup key.
        key: String,
    },
    /// A bounded store has no room: every key it holds is claimed and none
    /// can be evicted.
    #[error("the dedup store is full: all {capacity} keys are claimed and none is completed")]
    Full {
        /// The store's capacity in keys.
        capacity: usize,
    },
    /// A stored value could not be read back (a reply that does not decode).
    #[error("the dedup store holds a value that cannot be read: {0}")]
    Corrupt(String),
    /// The backend failed; its [kind](surety_core::store::StoreErrorKind)
    /// decides the class (a lost connection or a pool timeout is transient,
    /// a constraint violation permanent).
    #[error("the dedup store failed: {0}")]
    Backend(#[source] surety_core::store::StoreError),
}

impl StoreError {
    /// Wraps a backend error of an unknown kind (transient).
    pub fn backend(error: impl Into<BoxError>) -> Self {
        Self::Backend(surety_core::store::StoreError::new(
            surety_core::store::StoreErrorKind::Other,
            error,
        ))
    }

    /// Whether this is [`LeaseLost`](Self::LeaseLost).
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, Self::LeaseLost { .. })
    }
}

impl Classify for StoreError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::Corrupt(_) => ErrorClass::Permanent,
            Self::Full { .. } => ErrorClass::Transient {
                retry_after: Some(Duration::from_secs(1)),
            },
            Self::LeaseLost { .. } => ErrorClass::TRANSIENT,
            Self::Backend(error) => error.class(),
        }
    }
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        Self::Backend(error.into())
    }
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        Self::Backend(error.into())
    }
}
