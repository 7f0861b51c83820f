//! The one mapping from database errors to store error kinds, on real
//! databases: what every store in the family reports.

use std::time::Duration;

use sqlx::{Connection as _, Executor as _};
use surety_core::store::{StoreError, StoreErrorKind};
use surety_core::{Classify, ErrorClass};
use surety_testkit::db::{TempSchema, TempSqlite};

const TABLE: &str =
    "CREATE TABLE items (id BIGINT PRIMARY KEY, name TEXT NOT NULL CHECK (name <> ''))";

fn classify(error: sqlx::Error) -> (StoreErrorKind, ErrorClass) {
    let error = StoreError::from(error);
    (error.kind(), error.class())
}

/// Statements that violate a constraint of [`TABLE`] once row 1 exists,
/// and the kind each must map to.
const VIOLATIONS: [(&str, StoreErrorKind); 3] = [
    (
        "INSERT INTO items VALUES (1, 'b')",
        StoreErrorKind::UniqueViolation,
    ),
    (
        "INSERT INTO items VALUES (2, '')",
        StoreErrorKind::CheckViolation,
    ),
    (
        "INSERT INTO items VALUES (3, NULL)",
        StoreErrorKind::NotNullViolation,
    ),
];

fn assert_permanent(
    statement: &str,
    result: Result<impl std::fmt::Debug, sqlx::Error>,
    kind: StoreErrorKind,
) {
    let error = result.expect_err(statement);
    assert_eq!(
        classify(error),
        (kind, ErrorClass::Permanent),
        "{statement}"
    );
}

#[tokio::test]
async fn sqlite_constraint_violations_are_permanent() {
    let db = TempSqlite::new(2, Duration::from_secs(5)).await;
    db.pool.execute(TABLE).await.expect("table");
    db.pool
        .execute("INSERT INTO items VALUES (1, 'a')")
        .await
        .expect("first row");
    for (statement, kind) in VIOLATIONS {
        assert_permanent(statement, db.pool.execute(statement).await, kind);
    }
}

#[tokio::test]
async fn sqlite_lost_and_busy_connections_are_transient() {
    let db = TempSqlite::new(2, Duration::ZERO).await;
    db.pool.execute(TABLE).await.expect("table");
    // Another writer holds the database: busy, try again later.
    let mut holder = db.pool.acquire().await.expect("a connection");
    holder
        .execute("BEGIN IMMEDIATE")
        .await
        .expect("the write lock");
    let busy = db
        .pool
        .execute("INSERT INTO items VALUES (1, 'a')")
        .await
        .expect_err("the database is locked");
    let (kind, class) = classify(busy);
    assert!(class.is_retryable(), "{kind}");
    assert_eq!(kind, StoreErrorKind::Serialization);
    holder.execute("ROLLBACK").await.expect("rollback");
    drop(holder);
    // The pool is gone (the service is shutting down): transient.
    db.pool.close().await;
    let closed = sqlx::query("SELECT 1")
        .execute(&db.pool)
        .await
        .expect_err("a closed pool");
    assert_eq!(
        classify(closed),
        (StoreErrorKind::Pool, ErrorClass::TRANSIENT)
    );
}

#[tokio::test]
async fn postgres_constraint_violations_are_permanent() {
    let Some(schema) = TempSchema::new("surety_store_errors", 2).await else {
        return;
    };
    schema.pool.execute(TABLE).await.expect("table");
    schema
        .pool
        .execute("INSERT INTO items VALUES (1, 'a')")
        .await
        .expect("first row");
    for (statement, kind) in VIOLATIONS {
        assert_permanent(statement, schema.pool.execute(statement).await, kind);
    }
    let statement = "SELECT 'x'::bigint";
    assert_permanent(
        statement,
        schema.pool.execute(statement).await,
        StoreErrorKind::Decode,
    );
    schema.drop_schema().await;
}

#[tokio::test]
async fn postgres_dropped_connections_and_deadlocks_are_transient() {
    let Some(schema) = TempSchema::new("surety_store_errors", 3).await else {
        return;
    };
    schema.pool.execute(TABLE).await.expect("table");
    // The server drops the connection (a failover, an administrator).
    let mut victim = schema.pool.acquire().await.expect("a connection");
    let (pid,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()")
        .fetch_one(&mut *victim)
        .await
        .expect("pid");
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(&schema.pool)
        .await
        .expect("terminate");
    let dropped = sqlx::query("SELECT 1")
        .execute(&mut *victim)
        .await
        .expect_err("the connection was dropped");
    let (kind, class) = classify(dropped);
    assert_eq!(kind, StoreErrorKind::Connection);
    assert!(class.is_retryable());
    let _ = victim.detach().close_hard().await;

    // Two transactions wait for each other's row: one is the deadlock victim.
    schema
        .pool
        .execute("INSERT INTO items VALUES (1, 'a'), (2, 'b')")
        .await
        .expect("rows");
    let mut a = schema.pool.begin().await.expect("a");
    let mut b = schema.pool.begin().await.expect("b");
    a.execute("UPDATE items SET name = 'a1' WHERE id = 1")
        .await
        .expect("a locks 1");
    b.execute("UPDATE items SET name = 'b2' WHERE id = 2")
        .await
        .expect("b locks 2");
    let (first, second) = tokio::join!(
        a.execute("UPDATE items SET name = 'a2' WHERE id = 2"),
        b.execute("UPDATE items SET name = 'b1' WHERE id = 1"),
    );
    let failed = match (first, second) {
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => e,
        other => panic!("exactly one deadlock victim, got {other:?}"),
    };
    assert_eq!(
        classify(failed),
        (StoreErrorKind::Deadlock, ErrorClass::TRANSIENT)
    );
    drop((a, b));
    schema.drop_schema().await;
}
