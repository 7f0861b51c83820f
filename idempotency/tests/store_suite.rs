//! Every dedup store passes the shared suite from surety-testkit.
#![cfg(all(feature = "sqlite", feature = "postgres"))]

mod common;

use std::time::Duration;

use surety_idempotency::{MemoryDedupStore, PostgresDedupStore, SqliteDedupStore};
use surety_testkit::idempotency_store::{SuiteOptions, dedup_store_suite};

#[tokio::test]
async fn memory_store_passes_the_suite() {
    let report = dedup_store_suite(
        || async { MemoryDedupStore::new() },
        SuiteOptions::default(),
    )
    .await;
    report.assert_ok();
}

#[tokio::test]
async fn sqlite_store_passes_the_suite() {
    let db = common::TempSqlite::new(4).await;
    let report = dedup_store_suite(
        || async { SqliteDedupStore::new(db.pool.clone()) },
        SuiteOptions::default(),
    )
    .await;
    report.assert_ok();
}

#[tokio::test]
async fn postgres_store_passes_the_suite() {
    let Some(db) = common::temp_schema(8).await else {
        return;
    };
    let report = dedup_store_suite(
        || async { PostgresDedupStore::new(db.pool.clone()) },
        SuiteOptions::default().lease(Duration::from_millis(400)),
    )
    .await;
    report.assert_ok();
    db.drop_schema().await;
}

#[tokio::test]
async fn migrations_run_again_without_harm_and_use_their_own_table() {
    let db = common::TempSqlite::new(1).await;
    surety_idempotency::sqlite::migrate(&db.pool).await.unwrap();
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM _surety_idempotency_migrations")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(recorded, 1);
    let shared: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sqlite_master WHERE name = '_sqlx_migrations'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        shared, 0,
        "the application's own migrations table is left alone"
    );

    if let Some(pg) = common::temp_schema(2).await {
        surety_idempotency::postgres::migrate(&pg.pool)
            .await
            .unwrap();
        let recorded: i64 =
            sqlx::query_scalar("SELECT count(*) FROM _surety_idempotency_migrations")
                .fetch_one(&pg.pool)
                .await
                .unwrap();
        assert_eq!(recorded, 1);
        pg.drop_schema().await;
    }
}

/// A store that forgets fencing: a stale holder's complete succeeds.
#[derive(Clone)]
struct Unfenced(MemoryDedupStore);

impl surety_idempotency::DedupStore for Unfenced {
    async fn claim(
        &self,
        key: &str,
        lease: Duration,
    ) -> Result<surety_idempotency::Claim, surety_idempotency::StoreError> {
        self.0.claim(key, lease).await
    }

    async fn extend(
        &self,
        key: &str,
        token: &surety_idempotency::LeaseToken,
        lease: Duration,
    ) -> Result<(), surety_idempotency::StoreError> {
        self.0.extend(key, token, lease).await
    }

    async fn complete(
        &self,
        key: &str,
        token: &surety_idempotency::LeaseToken,
        reply: Option<&[u8]>,
    ) -> Result<(), surety_idempotency::StoreError> {
        match self.0.complete(key, token, reply).await {
            Err(err) if err.is_lease_lost() => Ok(()),
            other => other,
        }
    }

    async fn release(
        &self,
        key: &str,
        token: &surety_idempotency::LeaseToken,
    ) -> Result<(), surety_idempotency::StoreError> {
        self.0.release(key, token).await
    }

    async fn purge(
        &self,
        older_than: Duration,
        limit: u32,
    ) -> Result<u64, surety_idempotency::StoreError> {
        self.0.purge(older_than, limit).await
    }

    async fn size(&self) -> Result<u64, surety_idempotency::StoreError> {
        self.0.size().await
    }
}

#[tokio::test]
async fn the_suite_catches_a_store_without_fencing() {
    let report = dedup_store_suite(
        || async { Unfenced(MemoryDedupStore::new()) },
        SuiteOptions::default().lease(Duration::from_millis(50)),
    )
    .await;
    let failed: Vec<_> = report.failures().iter().map(|f| f.check).collect();
    assert_eq!(
        failed,
        ["expired_lease_is_taken_over", "complete_is_fenced"],
        "{report}"
    );
}
