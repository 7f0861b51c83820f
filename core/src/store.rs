//! The error of a database-backed store, classified once for every crate.
//!
//! Every store in the family (dead letters, dedup keys, the outbox, saga
//! instances, projection checkpoints) fails with a [`StoreError`]: what kind
//! of failure it was ([`StoreErrorKind`], like `sqlx`'s own `kind()`) and
//! the underlying error. The kind decides the [class](ErrorClass): a dropped
//! connection, a timeout, an exhausted pool, a serialization failure or a
//! deadlock is worth retrying; a constraint violation or a row that does not
//! decode is not, and retrying it would only delay the dead letter.
//!
//! With the `sqlx` feature, `From<sqlx::Error>` does the mapping, reading
//! PostgreSQL's SQLSTATE and SQLite's result codes.
//!
//! ```
//! use surety_core::store::{StoreError, StoreErrorKind};
//! use surety_core::{Classify, ErrorClass};
//!
//! let lost = StoreError::new(StoreErrorKind::Connection, "connection reset by peer");
//! assert!(lost.class().is_retryable());
//! let duplicate = StoreError::new(StoreErrorKind::UniqueViolation, "duplicate key");
//! assert_eq!(duplicate.class(), ErrorClass::Permanent);
//! ```

use std::fmt;

use crate::error::{BoxError, Classify, ErrorClass};

/// What kind of store failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The connection failed or was lost (I/O, TLS, protocol, the server
    /// shutting down). Transient.
    Connection,
    /// A statement or lock wait timed out. Transient.
    Timeout,
    /// No connection was free in time, or the pool is closed. Transient.
    Pool,
    /// The transaction could not be serialized with a concurrent one
    /// (PostgreSQL `40001`), or SQLite was busy. Transient.
    Serialization,
    /// A deadlock was detected (PostgreSQL `40P01`), or an SQLite table was
    /// locked. Transient.
    Deadlock,
    /// A unique or primary key constraint was violated. Permanent.
    UniqueViolation,
    /// A foreign key constraint was violated. Permanent.
    ForeignKeyViolation,
    /// A not-null constraint was violated. Permanent.
    NotNullViolation,
    /// A check constraint was violated. Permanent.
    CheckViolation,
    /// A stored value could not be decoded (a column of the wrong type, a
    /// payload that does not parse). Permanent.
    Decode,
    /// The row the operation needs does not exist. Permanent.
    NotFound,
    /// The store is misconfigured (a bad URL, a failed migration).
    /// Permanent.
    Config,
    /// Any other database error. Transient: the retry bound ends it if it
    /// persists.
    Other,
}

impl StoreErrorKind {
    /// The class of a failure of this kind.
    pub fn class(self) -> ErrorClass {
        match self {
            Self::Connection
            | Self::Timeout
            | Self::Pool
            | Self::Serialization
            | Self::Deadlock
            | Self::Other => ErrorClass::TRANSIENT,
            Self::UniqueViolation
            | Self::ForeignKeyViolation
            | Self::NotNullViolation
            | Self::CheckViolation
            | Self::Decode
            | Self::NotFound
            | Self::Config => ErrorClass::Permanent,
        }
    }

    /// The stable snake_case name (`connection`, `unique_violation`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connection => "connection",
            Self::Timeout => "timeout",
            Self::Pool => "pool",
            Self::Serialization => "serialization",
            Self::Deadlock => "deadlock",
            Self::UniqueViolation => "unique_violation",
            Self::ForeignKeyViolation => "foreign_key_violation",
            Self::NotNullViolation => "not_null_violation",
            Self::CheckViolation => "check_violation",
            Self::Decode => "decode",
            Self::NotFound => "not_found",
            Self::Config => "config",
            Self::Other => "other",
        }
    }

    /// Whether this is a constraint violation of any sort.
    pub fn is_constraint(self) -> bool {
        matches!(
            self,
            Self::UniqueViolation
                | Self::ForeignKeyViolation
                | Self::NotNullViolation
                | Self::CheckViolation
        )
    }
}

impl fmt::Display for StoreErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A store operation failed: its [kind](StoreErrorKind) and the cause.
#[derive(Debug, thiserror::Error)]
#[error("store failed ({kind}): {source}")]
pub struct StoreError {
    kind: StoreErrorKind,
    #[source]
    source: BoxError,
}

impl StoreError {
    /// A failure of `kind` caused by `source`.
    pub fn new(kind: StoreErrorKind, source: impl Into<BoxError>) -> Self {
        Self {
            kind,
            source: source.into(),
        }
    }

    /// A stored value that cannot be decoded.
    pub fn decode(source: impl Into<BoxError>) -> Self {
        Self::new(StoreErrorKind::Decode, source)
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// The underlying error.
    pub fn source_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }
}

impl Classify for StoreError {
    fn class(&self) -> ErrorClass {
        self.kind.class()
    }
}

/// A migrator for one store's embedded migrations, `(version, description,
/// SQL)`, that records what ran in `table`: a table of the store's own, so
/// its versions never collide with another store's or the application's
/// (`_sqlx_migrations`). Every SQL store in the family migrates this way.
#[cfg(feature = "sqlx")]
pub fn migrator(
    table: &'static str,
    migrations: &[(i64, &'static str, &'static str)],
) -> sqlx::migrate::Migrator {
    use sqlx::migrate::{Migration, MigrationType, Migrator};
    let migrations = migrations
        .iter()
        .map(|&(version, description, sql)| {
            Migration::new(
                version,
                description.into(),
                MigrationType::Simple,
                sqlx::SqlStr::from_static(sql),
                false,
            )
        })
        .collect();
    let mut migrator = Migrator::with_migrations(migrations);
    migrator.dangerous_set_table_name(table);
    migrator
}

#[cfg(feature = "sqlx")]
mod sqlx_errors {
    use super::{StoreError, StoreErrorKind};

    impl From<sqlx::Error> for StoreError {
        fn from(error: sqlx::Error) -> Self {
            Self::new(kind_of(&error), error)
        }
    }

    impl From<sqlx::migrate::MigrateError> for StoreError {
        fn from(error: sqlx::migrate::MigrateError) -> Self {
            let kind = match &error {
                sqlx::migrate::MigrateError::Execute(inner)
                | sqlx::migrate::MigrateError::ExecuteMigration(inner, _) => match kind_of(inner) {
                    kind @ (StoreErrorKind::Connection
                    | StoreErrorKind::Timeout
                    | StoreErrorKind::Pool
                    | StoreErrorKind::Serialization
                    | StoreErrorKind::Deadlock) => kind,
                    _ => StoreErrorKind::Config,
                },
                _ => StoreErrorKind::Config,
            };
            Self::new(kind, error)
        }
    }

    /// The kind of an sqlx error.
    pub(super) fn kind_of(error: &sqlx::Error) -> StoreErrorKind {
        use sqlx::Error as E;
        match error {
            E::Io(_) | E::Tls(_) | E::Protocol(_) | E::WorkerCrashed => StoreErrorKind::Connection,
            E::PoolTimedOut | E::PoolClosed => StoreErrorKind::Pool,
            E::RowNotFound => StoreErrorKind::NotFound,
            E::TypeNotFound { .. }
            | E::ColumnIndexOutOfBounds { .. }
            | E::ColumnNotFound(_)
            | E::ColumnDecode { .. }
            | E::Decode(_)
            | E::Encode(_) => StoreErrorKind::Decode,
            E::Configuration(_) | E::Migrate(_) => StoreErrorKind::Config,
            E::Database(db) => database_kind(db.as_ref()),
            _ => StoreErrorKind::Other,
        }
    }

    fn database_kind(db: &dyn sqlx::error::DatabaseError) -> StoreErrorKind {
        use sqlx::error::ErrorKind;
        match db.kind() {
            ErrorKind::UniqueViolation => return StoreErrorKind::UniqueViolation,
            ErrorKind::ForeignKeyViolation => return StoreErrorKind::ForeignKeyViolation,
            ErrorKind::NotNullViolation => return StoreErrorKind::NotNullViolation,
            ErrorKind::CheckViolation => return StoreErrorKind::CheckViolation,
            _ => {}
        }
        let Some(code) = db.code() else {
            return StoreErrorKind::Other;
        };
        code_kind(&code)
    }

    /// PostgreSQL SQLSTATEs are five characters (often all digits);
    /// SQLite's (extended) result codes are shorter numbers whose low byte is
    /// the primary code.
    pub(super) fn code_kind(code: &str) -> StoreErrorKind {
        if code.len() < 5
            && let Ok(number) = code.parse::<u32>()
        {
            return match number & 0xff {
                5 => StoreErrorKind::Serialization,    // SQLITE_BUSY
                6 => StoreErrorKind::Deadlock,         // SQLITE_LOCKED
                10 | 14 => StoreErrorKind::Connection, // SQLITE_IOERR, SQLITE_CANTOPEN
                19 => StoreErrorKind::CheckViolation,  // SQLITE_CONSTRAINT, other sorts
                _ => StoreErrorKind::Other,
            };
        }
        match code {
            "40001" => StoreErrorKind::Serialization,
            "40P01" => StoreErrorKind::Deadlock,
            "57014" | "55P03" => StoreErrorKind::Timeout, // query_canceled, lock_not_available
            "22P02" | "22003" | "22007" | "22008" | "22021" | "22P05" => StoreErrorKind::Decode,
            "23505" => StoreErrorKind::UniqueViolation,
            "23503" => StoreErrorKind::ForeignKeyViolation,
            "23502" => StoreErrorKind::NotNullViolation,
            "23514" | "23P01" | "23000" | "23001" => StoreErrorKind::CheckViolation,
            _ if code.starts_with("08") || code.starts_with("57P") || code.starts_with("53") => {
                // connection exception, operator intervention (shutdown),
                // insufficient resources
                StoreErrorKind::Connection
            }
            _ => StoreErrorKind::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_decide_the_class() {
        for kind in [
            StoreErrorKind::Connection,
            StoreErrorKind::Timeout,
            StoreErrorKind::Pool,
            StoreErrorKind::Serialization,
            StoreErrorKind::Deadlock,
        ] {
            assert!(StoreError::new(kind, "x").class().is_retryable(), "{kind}");
        }
        for kind in [
            StoreErrorKind::UniqueViolation,
            StoreErrorKind::ForeignKeyViolation,
            StoreErrorKind::NotNullViolation,
            StoreErrorKind::CheckViolation,
            StoreErrorKind::Decode,
            StoreErrorKind::NotFound,
        ] {
            assert_eq!(
                StoreError::new(kind, "x").class(),
                ErrorClass::Permanent,
                "{kind}"
            );
        }
    }

    #[cfg(feature = "sqlx")]
    #[test]
    fn codes_map_to_kinds() {
        use sqlx_errors::code_kind;
        assert_eq!(code_kind("40001"), StoreErrorKind::Serialization);
        assert_eq!(code_kind("40P01"), StoreErrorKind::Deadlock);
        assert_eq!(code_kind("57P01"), StoreErrorKind::Connection);
        assert_eq!(code_kind("08006"), StoreErrorKind::Connection);
        assert_eq!(code_kind("23505"), StoreErrorKind::UniqueViolation);
        assert_eq!(code_kind("42601"), StoreErrorKind::Other);
        assert_eq!(code_kind("5"), StoreErrorKind::Serialization);
        assert_eq!(code_kind("517"), StoreErrorKind::Serialization);
        assert_eq!(code_kind("6"), StoreErrorKind::Deadlock);
        assert_eq!(code_kind("275"), StoreErrorKind::CheckViolation);
    }

    #[cfg(feature = "sqlx")]
    #[test]
    fn sqlx_errors_map_to_kinds() {
        let kind = |e: sqlx::Error| StoreError::from(e).kind();
        assert_eq!(kind(sqlx::Error::PoolTimedOut), StoreErrorKind::Pool);
        assert_eq!(kind(sqlx::Error::RowNotFound), StoreErrorKind::NotFound);
        assert_eq!(
            kind(sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into())),
            StoreErrorKind::Connection
        );
        assert_eq!(
            kind(sqlx::Error::ColumnNotFound("x".into())),
            StoreErrorKind::Decode
        );
    }
}
