//! A store selects exactly what `Filter::matches` says, for any text:
//! control characters (NUL included), SQL wildcards and escapes, and case,
//! on SQLite and on real PostgreSQL. A bulk replay or discard acts on this
//! selection, so a difference would act on letters nobody chose.

use std::str::FromStr;

use proptest::prelude::*;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use surety_core::{DeliveryInfo, Envelope, HandlerError};
use surety_dlq::policy::DeadLetterReason;
use surety_dlq::store::{DlqStore, Filter, PageRequest, PostgresDlqStore, SqliteDlqStore};
use surety_dlq::{DeadLetter, Status};
use surety_testkit::services;

/// Text built from the characters that have tripped SQL before.
fn tricky(nul: bool) -> impl Strategy<Value = String> {
    let mut chars = vec![
        "a", "B", "%", "_", "\\", "'", "\"", "\n", "\r", "\t", "\u{1}", "Σ", "ß", "İ", "[", "*",
    ];
    if nul {
        chars.push("\0");
    }
    proptest::collection::vec(proptest::sample::select(chars), 0..6).prop_map(|v| v.concat())
}

fn letter(n: usize, topic: &str, message: &str, subject: &str) -> DeadLetter {
    let env = Envelope::builder("/shop", "order.placed")
        .subject(subject.to_owned())
        .payload("{}")
        .build();
    let group = if n.is_multiple_of(2) {
        "billing"
    } else {
        "shipping"
    };
    DeadLetter::new(
        &env,
        &DeliveryInfo::new("memory", topic, group),
        &HandlerError::permanent(message.to_owned()),
        DeadLetterReason::NotRetryable,
        1,
        "h",
        "host",
    )
}

#[derive(Debug, Clone)]
struct Case {
    texts: Vec<(String, String)>,
    needle: String,
    group: Option<bool>,
    statuses: Vec<Status>,
}

fn case(nul: bool) -> impl Strategy<Value = Case> {
    (
        proptest::collection::vec((tricky(nul), tricky(nul)), 1..6),
        tricky(true),
        proptest::option::of(any::<bool>()),
        proptest::collection::vec(proptest::sample::select(Status::ALL.to_vec()), 0..40),
    )
        .prop_map(|(texts, needle, group, statuses)| Case {
            texts,
            needle,
            group,
            statuses,
        })
}

/// Puts the case's letters under a fresh topic and compares the store's
/// selection (list, count) with the matcher's.
async fn check(store: &dyn DlqStore, case: &Case) -> Result<(), TestCaseError> {
    let topic = format!("props-{}", uuid::Uuid::now_v7());
    let mut letters = Vec::new();
    for (n, (message, subject)) in case.texts.iter().enumerate() {
        let l = letter(n, &topic, message, subject);
        store
            .put(&l)
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        letters.push(l);
    }
    let mut filter = Filter::new().topic(topic).text(case.needle.clone());
    if let Some(billing) = case.group {
        filter = filter.group(if billing { "billing" } else { "shipping" });
    }
    filter.status = case.statuses.clone();
    let mut expected: Vec<String> = letters
        .iter()
        .filter(|l| filter.matches(l))
        .map(|l| l.id.clone())
        .collect();
    expected.sort();
    expected.dedup();
    let page = store
        .list(&filter, &PageRequest::first(100))
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut got: Vec<String> = page.items.iter().map(|l| l.id.clone()).collect();
    got.sort();
    prop_assert_eq!(&got, &expected, "list with {:?}", filter);
    let count = store
        .count(&filter)
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(count, expected.len() as u64, "count with {:?}", filter);
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn sqlite_selects_exactly_what_the_filter_matches() {
    let rt = runtime();
    let store = rt
        .block_on(SqliteDlqStore::in_memory())
        .expect("sqlite store");
    proptest!(ProptestConfig::with_cases(200), |(c in case(true))| {
        rt.block_on(check(&store, &c))?;
    });
}

#[test]
fn postgres_selects_exactly_what_the_filter_matches() {
    let Some(url) = services::require(services::postgres_url()) else {
        return;
    };
    let rt = runtime();
    let schema = format!("surety_dlq_props_{}", uuid::Uuid::now_v7().simple());
    let store = rt.block_on(async {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .expect("postgres");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&admin)
            .await
            .expect("create schema");
        admin.close().await;
        let options = PgConnectOptions::from_str(&url)
            .expect("postgres url")
            .options([("search_path", schema.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .expect("postgres");
        surety_dlq::store::postgres::migrate(&pool)
            .await
            .expect("migrate");
        PostgresDlqStore::new(pool)
    });
    // PostgreSQL text cannot hold NUL: letters without it, filters with it.
    proptest!(ProptestConfig::with_cases(100), |(c in case(false))| {
        rt.block_on(check(&store, &c))?;
    });
    rt.block_on(async {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(store.pool())
            .await
            .ok();
    });
}
