//! The errors of projections.

use surety_core::{BoxError, Classify, ErrorClass, HandlerError, TransportError};

/// A projection runner or checkpoint store failed.
///
/// ```
/// use surety_core::Classify;
/// use surety_projection::ProjectionError;
///
/// let err = ProjectionError::Fenced { topic: "orders".into(), partition: 3 };
/// assert!(!err.class().is_retryable());
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// The database failed (a query error, a pool timeout, a lost
    /// connection). The transaction was rolled back; nothing moved.
    #[error("the projection store failed: {0}")]
    Store(#[source] BoxError),
    /// A migration of the checkpoint tables failed.
    #[error("the projection migration failed: {0}")]
    Migration(#[source] BoxError),
    /// The log failed.
    #[error("the projection source failed: {0}")]
    Source(#[from] TransportError),
    /// The stored checkpoint of a partition is not where this runner left
    /// it: another runner applied events of the partition since (a member
    /// that lost the partition in a rebalance and did not notice yet). The
    /// transaction was rolled back, so nothing was applied twice.
    #[error("the checkpoint of {topic}/{partition} was moved by another runner")]
    Fenced {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
    },
    /// A version change of a read model was refused (promoting a version
    /// that is not the shadow, rolling back with no previous version).
    #[error("{0}")]
    Version(String),
    /// An event could not be applied and retrying cannot help (a permanent
    /// or poison failure, or a transient one past its attempts). The
    /// runner stops at it; its position is not passed.
    #[error("event {topic}/{partition}@{offset} ({event_type}) could not be applied: {source}")]
    Apply {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The offset of the first event of the failed batch.
        offset: i64,
        /// Its type.
        event_type: String,
        /// The failure, with its class.
        #[source]
        source: HandlerError,
    },
}

impl ProjectionError {
    /// Wraps a database error.
    pub fn store(error: impl Into<BoxError>) -> Self {
        Self::Store(error.into())
    }
}

impl From<sqlx::Error> for ProjectionError {
    fn from(error: sqlx::Error) -> Self {
        Self::Store(Box::new(error))
    }
}

impl From<sqlx::migrate::MigrateError> for ProjectionError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        Self::Migration(Box::new(error))
    }
}

impl Classify for ProjectionError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::Store(_) => ErrorClass::TRANSIENT,
            Self::Source(e) => e.class(),
            Self::Migration(_) | Self::Fenced { .. } | Self::Version(_) => ErrorClass::Permanent,
            Self::Apply { source, .. } => source.class(),
        }
    }
}
