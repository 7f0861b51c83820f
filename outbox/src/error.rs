//! The errors of the outbox.

use surety_core::store::{StoreError, StoreErrorKind};
use surety_core::{BoxError, Classify, ErrorClass};

/// An outbox operation failed.
///
/// ```
/// use surety_core::Classify;
/// use surety_outbox::OutboxError;
///
/// let err = OutboxError::InvalidMessage("the topic is empty".into());
/// assert!(!err.class().is_retryable());
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// The message cannot be written to the outbox (an empty topic, headers
    /// that cannot be stored). Nothing was written.
    #[error("the message cannot be written to the outbox: {0}")]
    InvalidMessage(String),
    /// The database failed. Its [kind](StoreErrorKind) says whether a retry
    /// can help (a lost connection, a pool timeout) or not (a constraint
    /// violation). The caller's transaction should be rolled back.
    #[error("the outbox store failed: {0}")]
    Store(#[source] StoreError),
    /// A migration of the outbox tables failed (a database that cannot be
    /// reached fails here too; a changed or broken migration needs a fix,
    /// not a retry).
    #[error("the outbox migration failed: {0}")]
    Migration(#[source] StoreError),
}

impl OutboxError {
    /// Wraps a database error of an unknown kind (transient).
    pub fn store(error: impl Into<BoxError>) -> Self {
        Self::Store(StoreError::new(StoreErrorKind::Other, error))
    }
}

impl From<StoreError> for OutboxError {
    fn from(error: StoreError) -> Self {
        Self::Store(error)
    }
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
impl From<sqlx::Error> for OutboxError {
    fn from(error: sqlx::Error) -> Self {
        Self::Store(error.into())
    }
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
impl From<sqlx::migrate::MigrateError> for OutboxError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        Self::Migration(error.into())
    }
}

impl Classify for OutboxError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::InvalidMessage(_) => ErrorClass::Permanent,
            Self::Store(error) | Self::Migration(error) => error.class(),
        }
    }
}
