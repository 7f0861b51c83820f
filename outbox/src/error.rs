//! The errors of the outbox.

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
    /// The database failed (a query error, a pool timeout, a lost
    /// connection). The caller's transaction should be rolled back.
    #[error("the outbox store failed: {0}")]
    Store(#[source] BoxError),
    /// A migration of the outbox tables failed (a database that cannot be
    /// reached fails here too; a changed or broken migration needs a fix,
    /// not a retry).
    #[error("the outbox migration failed: {0}")]
    Migration(#[source] BoxError),
}

impl OutboxError {
    /// Wraps a database error.
    pub fn store(error: impl Into<BoxError>) -> Self {
        Self::Store(error.into())
    }
}

impl From<sqlx::Error> for OutboxError {
    fn from(error: sqlx::Error) -> Self {
        Self::Store(Box::new(error))
    }
}

impl From<sqlx::migrate::MigrateError> for OutboxError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        Self::Migration(Box::new(error))
    }
}

impl Classify for OutboxError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::InvalidMessage(_) | Self::Migration(_) => ErrorClass::Permanent,
            Self::Store(_) => ErrorClass::TRANSIENT,
        }
    }
}
