//! Shared helpers for the surety-dlq integration tests.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::time::Duration;

use surety_dlq::store::{PostgresDlqStore, SqliteDlqStore, StoreError};

/// Waits until `condition` holds, polling every 2 ms, and panics with
/// `what` after `deadline` (`surety_testkit::wait::eventually_every`).
pub async fn eventually<F, Fut>(deadline: Duration, what: &str, condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    surety_testkit::wait::eventually_every(deadline, Duration::from_millis(2), what, condition)
        .await;
}

/// Runs a worker until `stop` is sent; returns the join handle.
pub fn spawn_worker<S>(
    worker: surety_core::consumer::Worker<S>,
    deliveries: surety_core::DeliveryStream,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<surety_core::consumer::WorkerReport>,
)
where
    S: surety_core::consumer::Handler,
{
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(worker.run(deliveries, async {
        stopped.await.ok();
    }));
    (stop, handle)
}

/// Opens (creating if missing) the SQLite database at `url` in WAL mode and
/// migrates it: a store as a service would set one up.
pub async fn open_sqlite(url: &str) -> Result<SqliteDlqStore, StoreError> {
    use std::str::FromStr;
    use surety_dlq::sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
    let options = SqliteConnectOptions::from_str(url)
        .map_err(StoreError::backend)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .connect_with(options)
        .await
        .map_err(StoreError::backend)?;
    surety_dlq::store::sqlite::migrate(&pool).await?;
    Ok(SqliteDlqStore::new(pool))
}

/// Connects to the PostgreSQL database at `url` and migrates it.
pub async fn open_postgres(url: &str) -> Result<PostgresDlqStore, StoreError> {
    let pool = surety_dlq::sqlx::PgPool::connect(url)
        .await
        .map_err(StoreError::backend)?;
    surety_dlq::store::postgres::migrate(&pool).await?;
    Ok(PostgresDlqStore::new(pool))
}
