//! Every saga store passes the shared suite in `surety_testkit::saga_store`:
//! in memory, SQLite (a file with several connections, so concurrent
//! writers really race) and PostgreSQL. What only one backend has (its
//! outbox table, its connection errors) is tested in `sqlite.rs` and
//! `postgres.rs`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use surety_saga::postgres::{self, PostgresSagaStore};
use surety_saga::sqlite::{self, SqliteSagaStore};
use surety_saga::store::MemorySagaStore;
use surety_testkit::db::{TempSchema, TempSqlite};
use surety_testkit::saga_store::saga_store_suite;

/// The ids of the outbox rows written since the last call, taken out of
/// the outbox, in write order.
macro_rules! take_outbox {
    ($pool:expr) => {{
        let mut rows: Vec<(i64, String)> =
            sqlx::query_as("DELETE FROM surety_outbox RETURNING seq, message_id")
                .fetch_all($pool)
                .await
                .expect("the outbox answers");
        rows.sort();
        rows.into_iter().map(|(_, id)| id).collect::<Vec<String>>()
    }};
}

#[tokio::test]
async fn the_memory_store_passes_the_suite() {
    saga_store_suite(
        || async { MemorySagaStore::new() },
        |store: MemorySagaStore| async move {
            store
                .take_commands()
                .into_iter()
                .map(|(_, command)| command.id)
                .collect()
        },
    )
    .await
    .assert_ok();
}

#[tokio::test]
async fn the_sqlite_store_passes_the_suite() {
    let databases = Arc::new(Mutex::new(Vec::new()));
    let report = saga_store_suite(
        || {
            let databases = Arc::clone(&databases);
            async move {
                let db = TempSqlite::new(4, Duration::from_secs(5)).await;
                sqlite::migrate(&db.pool).await.unwrap();
                sqlite::migrate(&db.pool).await.unwrap();
                let store = SqliteSagaStore::new(db.pool.clone());
                databases.lock().unwrap().push(db);
                store
            }
        },
        |store: SqliteSagaStore| async move { take_outbox!(store.pool()) },
    )
    .await;
    databases.lock().unwrap().clear();
    report.assert_ok();
}

#[tokio::test]
async fn the_postgres_store_passes_the_suite() {
    if TempSchema::new("surety_saga_probe", 1)
        .await
        .map(|db| tokio::spawn(db.drop_schema()))
        .is_none()
    {
        return;
    }
    let schemas = Arc::new(Mutex::new(Vec::new()));
    let report = saga_store_suite(
        || {
            let schemas = Arc::clone(&schemas);
            async move {
                let db = TempSchema::new("surety_saga_suite", 4)
                    .await
                    .expect("PostgreSQL answered a moment ago");
                postgres::migrate(&db.pool).await.unwrap();
                postgres::migrate(&db.pool).await.unwrap();
                let store = PostgresSagaStore::new(db.pool.clone());
                schemas.lock().unwrap().push(db);
                store
            }
        },
        |store: PostgresSagaStore| async move { take_outbox!(store.pool()) },
    )
    .await;
    let schemas: Vec<TempSchema> = std::mem::take(&mut *schemas.lock().unwrap());
    for db in schemas {
        db.drop_schema().await;
    }
    report.assert_ok();
}
