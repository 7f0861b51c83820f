//! Every DLQ store passes the shared suite in `surety_testkit::dlq_store`.

mod common;

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use surety_dlq::store::{DlqStore, Filter, MemoryDlqStore, PostgresDlqStore, SqliteDlqStore};
use surety_testkit::dlq_store::{dlq_store_suite, sample_letter};
use surety_testkit::services;

#[tokio::test]
async fn memory_store_passes_the_suite() {
    dlq_store_suite(|| async { MemoryDlqStore::new() })
        .await
        .assert_ok();
}

#[tokio::test]
async fn sqlite_in_memory_store_passes_the_suite() {
    dlq_store_suite(|| async { SqliteDlqStore::in_memory().await.expect("sqlite") })
        .await
        .assert_ok();
}

/// A file database with a pool of several connections: concurrent
/// transitions really race.
#[tokio::test]
async fn sqlite_file_store_passes_the_suite() {
    let dir = std::env::temp_dir().join(format!("surety-dlq-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let counter = std::sync::atomic::AtomicU32::new(0);
    let report = dlq_store_suite(|| {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let url = format!("sqlite://{}", dir.join(format!("dlq-{n}.db")).display());
        async move { common::open_sqlite(&url).await.expect("sqlite file") }
    })
    .await;
    std::fs::remove_dir_all(&dir).ok();
    report.assert_ok();
}

#[tokio::test]
async fn sqlite_migrations_are_idempotent_and_data_survives_reopening() {
    let dir = std::env::temp_dir().join(format!("surety-dlq-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let url = format!("sqlite://{}", dir.join("dlq.db").display());
    let letter = sample_letter(
        1,
        ("memory", "orders", "g"),
        "h",
        surety_core::ErrorClass::Poison,
        "x",
    );
    {
        let store = common::open_sqlite(&url).await.expect("open");
        surety_dlq::store::sqlite::migrate(store.pool())
            .await
            .expect("migrate twice");
        store.put(&letter).await.expect("put");
        store.pool().close().await;
    }
    let store = common::open_sqlite(&url).await.expect("reopen");
    assert_eq!(store.get(&letter.id).await.expect("get"), Some(letter));
    assert_eq!(store.count(&Filter::new()).await.expect("count"), 1);
    std::fs::remove_dir_all(&dir).ok();
}

/// A PostgreSQL store in a schema of its own, so runs are isolated and can
/// repeat and run in parallel.
async fn postgres_store(url: &str) -> PostgresDlqStore {
    let schema = format!("surety_dlq_test_{}", uuid::Uuid::now_v7().simple());
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .expect("postgres");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin)
        .await
        .expect("create schema");
    admin.close().await;
    let options = PgConnectOptions::from_str(url)
        .expect("postgres url")
        .options([("search_path", schema.as_str())]);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .expect("postgres");
    surety_dlq::store::postgres::migrate(&pool)
        .await
        .expect("migrate");
    PostgresDlqStore::new(pool)
}

#[tokio::test]
async fn postgres_store_passes_the_suite() {
    let Some(url) = services::require(services::postgres_url()) else {
        return;
    };
    dlq_store_suite(|| postgres_store(&url)).await.assert_ok();
}

#[tokio::test]
async fn postgres_migrations_are_idempotent_and_concurrent_safe() {
    let Some(url) = services::require(services::postgres_url()) else {
        return;
    };
    let store = postgres_store(&url).await;
    let (a, b) = tokio::join!(
        surety_dlq::store::postgres::migrate(store.pool()),
        surety_dlq::store::postgres::migrate(store.pool())
    );
    a.expect("first");
    b.expect("second");
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM surety_dlq_migrations")
        .fetch_all(store.pool())
        .await
        .expect("versions");
    assert_eq!(versions, [1, 2]);
}

/// The suite is not vacuous: a store whose transitions ignore the current
/// status, or whose text search is case-sensitive, fails it.
#[tokio::test]
async fn the_suite_catches_broken_stores() {
    use surety_dlq::DeadLetter;
    use surety_dlq::job::Job;
    use surety_dlq::store::{AuditEntry, Depth, Page, PageRequest, StoreError, Transition};

    #[derive(Debug, Default)]
    struct Broken(MemoryDlqStore);

    #[async_trait::async_trait]
    impl DlqStore for Broken {
        async fn put(&self, letter: &DeadLetter) -> Result<(), StoreError> {
            self.0.put(letter).await
        }
        async fn get(&self, id: &str) -> Result<Option<DeadLetter>, StoreError> {
            self.0.get(id).await
        }
        async fn list(
            &self,
            filter: &Filter,
            page: &PageRequest,
        ) -> Result<Page<DeadLetter>, StoreError> {
            // Case-sensitive text search.
            let mut without_text = filter.clone();
            without_text.text = None;
            let mut page = self.0.list(&without_text, page).await?;
            if let Some(text) = &filter.text {
                page.items
                    .retain(|l| l.search_text().contains(text.as_str()));
            }
            Ok(page)
        }
        async fn count(&self, filter: &Filter) -> Result<u64, StoreError> {
            self.0.count(filter).await
        }
        async fn transition(
            &self,
            id: &str,
            t: &Transition,
        ) -> Result<Option<DeadLetter>, StoreError> {
            // Ignores the allowed statuses.
            let mut any = t.clone();
            any.from = surety_dlq::Status::ALL.to_vec();
            self.0.transition(id, &any).await
        }
        async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
            self.0.append_audit(entry).await
        }
        async fn audit_log(&self, page: &PageRequest) -> Result<Page<AuditEntry>, StoreError> {
            self.0.audit_log(page).await
        }
        async fn depth(&self) -> Result<Vec<Depth>, StoreError> {
            self.0.depth().await
        }
        async fn put_job(&self, job: &Job) -> Result<(), StoreError> {
            self.0.put_job(job).await
        }
        async fn get_job(&self, id: &str) -> Result<Option<Job>, StoreError> {
            self.0.get_job(id).await
        }
        async fn unfinished_jobs(&self) -> Result<Vec<Job>, StoreError> {
            self.0.unfinished_jobs().await
        }
    }

    let report = dlq_store_suite(|| async { Broken::default() }).await;
    let failed: Vec<_> = report.failures().iter().map(|f| f.check).collect();
    assert_eq!(failed, ["filters", "transitions"], "{report}");
}

/// Jobs and the audit entry they rewrite work on PostgreSQL: a replay job
/// records its intent, finishes, and leaves one finished audit entry; an
/// unfinished job is listed for resumption until it finishes.
#[tokio::test]
async fn postgres_keeps_jobs_and_rewrites_their_audit_entry() {
    use futures::StreamExt;
    use surety_core::Subscriber;
    use surety_dlq::store::PageRequest;
    use surety_dlq::{ReplayRequest, Replayer, Started, Status};

    let Some(url) = services::require(services::postgres_url()) else {
        return;
    };
    let store = std::sync::Arc::new(postgres_store(&url).await);
    let letter = sample_letter(
        1,
        ("memory", "orders", "g"),
        "h",
        surety_core::ErrorClass::Permanent,
        "x",
    );
    store.put(&letter).await.expect("put");
    let transport = surety_core::memory::MemoryTransport::new();
    let mut orders = transport.subscribe("orders", "g").await.expect("subscribe");
    let replayer = Replayer::new(store.clone(), transport.clone());
    let Started::Job(job) = replayer
        .start_replay(ReplayRequest::filter("ops", Filter::new().topic("orders")).reason("fixed"))
        .await
        .expect("start")
    else {
        panic!("not a dry run");
    };
    let unfinished = store.unfinished_jobs().await.expect("unfinished");
    assert_eq!(unfinished.len(), 1);
    assert_eq!(unfinished[0].ids, std::slice::from_ref(&letter.id));
    let audit = store
        .audit_log(&PageRequest::first(5))
        .await
        .expect("audit");
    assert_eq!(audit.items.len(), 1);
    assert!(!audit.items[0].finished);

    let done = replayer.resume().await.expect("resume");
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].id, job.id);
    assert!(orders.next().await.is_some(), "published");
    assert!(
        store
            .unfinished_jobs()
            .await
            .expect("unfinished")
            .is_empty()
    );
    let stored = store.get_job(&job.id).await.expect("get_job").expect("job");
    assert!(stored.finished);
    assert_eq!(stored.done, std::slice::from_ref(&letter.id));
    let audit = store
        .audit_log(&PageRequest::first(5))
        .await
        .expect("audit");
    assert_eq!(audit.items.len(), 1, "rewritten, not appended");
    assert!(audit.items[0].finished);
    assert_eq!(audit.items[0].succeeded, std::slice::from_ref(&letter.id));
    let now = store.get(&letter.id).await.expect("get").expect("letter");
    assert_eq!(now.status, Status::Replayed);
    assert_eq!(now.replay_count, 1);
}
