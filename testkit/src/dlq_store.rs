//! The shared test suite for `surety-dlq` stores (feature `dlq`).
//!
//! Every [`DlqStore`] implementation — in-memory, SQLite, PostgreSQL,
//! yours — runs [`dlq_store_suite`] with a function that makes a fresh,
//! empty store, and asserts the [`Report`]. The checks compare the store's
//! answers with the reference semantics in `surety-dlq`
//! ([`Filter::matches`], [`Transition::apply`], [`DeadLetter::merge`]).
//!
//! | check | what it proves |
//! |---|---|
//! | [`round_trip`] | a dead letter reads back equal, field for field; unknown ids are `None` |
//! | [`put_merges`] | putting the same id again merges (first failure kept, newest failure, larger replay count, histories joined) and keeps its place in listings |
//! | [`filters`] | every filter field, alone and combined, selects exactly what `Filter::matches` selects, in insertion order; `count` agrees; text search is case-insensitive and treats `%` and `_` literally |
//! | [`paging`] | pages partition the results without gaps or repeats; foreign cursors are an error |
//! | [`transitions`] | status changes happen only from the allowed statuses, count replays, append history, and of concurrent changes exactly one wins |
//! | [`audit_log`] | audit entries read back equal, newest first, paged |
//! | [`depth`] | waiting dead letters (dead, parked) are counted by source and class, with the oldest time |
//! | [`jobs`] | replay jobs read back equal and are listed until finished; an audit entry appended again with its id is replaced, not duplicated |
//!
//! ```
//! use surety_dlq::store::MemoryDlqStore;
//! use surety_testkit::dlq_store::dlq_store_suite;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! dlq_store_suite(|| async { MemoryDlqStore::new() }).await.assert_ok();
//! # }
//! ```

use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use surety_core::{DeliveryInfo, Envelope, ErrorClass, HandlerError};
use surety_dlq::policy::DeadLetterReason;
use surety_dlq::store::{
    AuditEntry, AuditSelection, DlqStore, Filter, PageRequest, StoreError, Transition,
};
use surety_dlq::{DeadLetter, Event, FailureClass, Status};

use crate::conformance::{CheckFailure, CheckResult, Report};

/// Runs every check, each on a fresh store from `make`.
pub async fn dlq_store_suite<S, F, Fut>(make: F) -> Report
where
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
    S: DlqStore + 'static,
{
    let mut report = Report::for_suite("dlq store suite");
    macro_rules! run {
        ($check:ident) => {{
            let store: Arc<dyn DlqStore> = Arc::new(make().await);
            report.push_result(stringify!($check), $check(store).await);
        }};
    }
    run!(round_trip);
    run!(put_merges);
    run!(filters);
    run!(paging);
    run!(transitions);
    run!(audit_log);
    run!(depth);
    run!(jobs);
    report
}

fn store_err(check: &'static str, what: &str, err: StoreError) -> CheckFailure {
    CheckFailure::new(check, format!("{what} to succeed"), err)
}

fn base_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0)
        .single()
        .unwrap_or_else(Utc::now)
}

/// A dead letter of message `n` failing in `handler` with `class` and
/// `message`, consumed from `system`/`topic`/`group`.
pub fn sample_letter(
    n: u32,
    source: (&'static str, &str, &str),
    handler: &str,
    class: ErrorClass,
    message: &str,
) -> DeadLetter {
    let env = Envelope::builder("/testkit", "order.placed")
        .id(format!("msg-{n}-{}", uuid::Uuid::now_v7()))
        .partition_key(format!("key-{n}"))
        .subject(format!("order-{n}"))
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .header("x-tenant", "acme")
        .payload(vec![0u8, 159, 146, 150, n as u8])
        .content_type("application/octet-stream")
        .build();
    let mut info = DeliveryInfo::new(source.0, source.1, source.2);
    info.partition = Some(n as i32 % 3);
    info.offset = Some(i64::from(n) * 10);
    let err = HandlerError::with_class(class, message.to_owned());
    let reason = if class.is_retryable() {
        DeadLetterReason::AttemptsExhausted
    } else {
        DeadLetterReason::NotRetryable
    };
    let mut letter = DeadLetter::new(&env, &info, &err, reason, 3, handler, "testkit-host");
    let t = base_time() + Duration::minutes(i64::from(n));
    letter.first_failed_at = t - Duration::seconds(30);
    letter.last_failed_at = t;
    letter.dead_lettered_at = t;
    letter
}

async fn put_all(check: &'static str, store: &dyn DlqStore, letters: &[DeadLetter]) -> CheckResult {
    for letter in letters {
        store
            .put(letter)
            .await
            .map_err(|e| store_err(check, "put", e))?;
    }
    Ok(())
}

fn ids(letters: &[DeadLetter]) -> Vec<String> {
    letters.iter().map(|l| l.id.clone()).collect()
}

async fn list_all(
    check: &'static str,
    store: &dyn DlqStore,
    filter: &Filter,
    page_size: u32,
) -> Result<Vec<DeadLetter>, CheckFailure> {
    let mut out = Vec::new();
    let mut page = PageRequest::first(page_size);
    for _ in 0..10_000 {
        let result = store
            .list(filter, &page)
            .await
            .map_err(|e| store_err(check, "list", e))?;
        if result.items.len() > page_size as usize {
            return Err(CheckFailure::new(
                check,
                format!("at most {page_size} items per page"),
                result.items.len(),
            ));
        }
        out.extend(result.items);
        match result.next {
            Some(next) => page = PageRequest::after(page_size, next),
            None => return Ok(out),
        }
    }
    Err(CheckFailure::new(
        check,
        "paging to end",
        "more than 10000 pages",
    ))
}

/// A dead letter reads back equal; unknown ids are `None`.
pub async fn round_trip(store: Arc<dyn DlqStore>) -> CheckResult {
    const CHECK: &str = "round_trip";
    let mut letter = sample_letter(
        1,
        ("kafka", "orders", "billing"),
        "billing",
        ErrorClass::TRANSIENT,
        "db down: timeout",
    );
    letter.push_event(Event::new("alice", "note", Status::Dead).reason("looked at it"));
    put_all(CHECK, &*store, std::slice::from_ref(&letter)).await?;
    let back = store
        .get(&letter.id)
        .await
        .map_err(|e| store_err(CHECK, "get", e))?;
    if back.as_ref() != Some(&letter) {
        return Err(CheckFailure::new(
            CHECK,
            format!("{letter:?}"),
            format!("{back:?}"),
        ));
    }
    let missing = store
        .get("no-such-id")
        .await
        .map_err(|e| store_err(CHECK, "get", e))?;
    if missing.is_some() {
        return Err(CheckFailure::new(
            CHECK,
            "None for an unknown id",
            "a record",
        ));
    }
    Ok(())
}

/// Putting the same id again merges and keeps the record's place.
pub async fn put_merges(store: Arc<dyn DlqStore>) -> CheckResult {
    const CHECK: &str = "put_merges";
    let first = sample_letter(
        1,
        ("memory", "orders", "billing"),
        "billing",
        ErrorClass::Permanent,
        "bad order 1",
    );
    let other = sample_letter(
        2,
        ("memory", "orders", "billing"),
        "billing",
        ErrorClass::Permanent,
        "bad order 2",
    );
    let mut again = first.clone();
    again.error.message = "bad order 1, again".into();
    again.first_failed_at = first.first_failed_at + Duration::hours(1);
    again.last_failed_at = first.last_failed_at + Duration::hours(1);
    again.replay_count = 2;
    again.status = Status::Parked;
    again.history = vec![Event::new("billing@h", "dead_lettered", Status::Parked)];
    put_all(
        CHECK,
        &*store,
        &[first.clone(), other.clone(), again.clone()],
    )
    .await?;

    let mut expected = first.clone();
    expected.merge(again.clone());
    let back = store
        .get(&first.id)
        .await
        .map_err(|e| store_err(CHECK, "get", e))?;
    let Some(back) = back else {
        return Err(CheckFailure::new(CHECK, "the merged record", "None"));
    };
    if back != expected {
        return Err(CheckFailure::new(
            CHECK,
            format!("{expected:?}"),
            format!("{back:?}"),
        ));
    }
    if back.first_failed_at != first.first_failed_at
        || back.replay_count != 2
        || back.history.len() != first.history.len() + 1
        || back.status != Status::Parked
    {
        return Err(CheckFailure::new(
            CHECK,
            "first failure kept, replay count 2, histories joined, status parked",
            format!("{back:?}"),
        ));
    }
    let listed = ids(&list_all(CHECK, &*store, &Filter::new(), 10).await?);
    if listed != [first.id.clone(), other.id.clone()] {
        return Err(CheckFailure::new(
            CHECK,
            "one record per id, in first-insertion order",
            format!("{listed:?}"),
        ));
    }
    Ok(())
}

fn filter_letters() -> Vec<DeadLetter> {
    let mut letters = vec![
        sample_letter(
            1,
            ("kafka", "orders", "billing"),
            "billing",
            ErrorClass::TRANSIENT,
            "Payment gateway timeout after 30s",
        ),
        sample_letter(
            2,
            ("kafka", "orders", "shipping"),
            "shipping",
            ErrorClass::Permanent,
            "address 100% invalid",
        ),
        sample_letter(
            3,
            ("rabbitmq", "payments", "billing"),
            "billing",
            ErrorClass::Poison,
            "payload does not decode",
        ),
        sample_letter(
            4,
            ("rabbitmq", "orders", "billing"),
            "billing",
            ErrorClass::Permanent,
            "customer_id missing",
        ),
        sample_letter(
            5,
            ("memory", "orders", "billing"),
            "billing",
            ErrorClass::TRANSIENT,
            "payment GATEWAY timeout after 45s",
        ),
        sample_letter(
            6,
            ("kafka", "orders", "billing"),
            "audit",
            ErrorClass::Permanent,
            "customerXid missing",
        ),
    ];
    letters[3].status = Status::Parked;
    letters[5].status = Status::Discarded;
    letters
}

/// Every filter field selects what `Filter::matches` selects.
pub async fn filters(store: Arc<dyn DlqStore>) -> CheckResult {
    const CHECK: &str = "filters";
    let letters = filter_letters();
    put_all(CHECK, &*store, &letters).await?;
    let t = base_time();
    let fingerprint = letters[0].fingerprint.clone();
    let cases = vec![
        Filter::new(),
        Filter::new().system("kafka"),
        Filter::new().topic("orders"),
        Filter::new().group("billing"),
        Filter::new().class(FailureClass::Permanent),
        Filter::new()
            .class(FailureClass::Transient)
            .topic("orders")
            .system("memory"),
        Filter::new().fingerprint(fingerprint),
        Filter::new().handler("billing"),
        Filter::new().status([Status::Parked, Status::Discarded]),
        Filter::new().between(Some(t + Duration::minutes(2)), None),
        Filter::new().between(None, Some(t + Duration::minutes(3))),
        Filter::new().between(
            Some(t + Duration::minutes(2)),
            Some(t + Duration::minutes(5)),
        ),
        Filter::new().text("gateway TIMEOUT"),
        Filter::new().text("100%"),
        Filter::new().text("customer_id"),
        Filter::new().text("order-3"),
        Filter::new().text("no such text"),
        Filter::new()
            .group("billing")
            .class(FailureClass::Permanent)
            .status([Status::Parked]),
    ];
    let mut expected_sizes = Vec::new();
    for filter in &cases {
        let expected: Vec<String> = letters
            .iter()
            .filter(|l| filter.matches(l))
            .map(|l| l.id.clone())
            .collect();
        expected_sizes.push(expected.len());
        let got = ids(&list_all(CHECK, &*store, filter, 100).await?);
        if got != expected {
            return Err(CheckFailure::new(
                CHECK,
                format!("{filter:?} to select {expected:?}"),
                format!("{got:?}"),
            ));
        }
        let count = store
            .count(filter)
            .await
            .map_err(|e| store_err(CHECK, "count", e))?;
        if count != expected.len() as u64 {
            return Err(CheckFailure::new(
                CHECK,
                format!("count of {filter:?} = {}", expected.len()),
                count,
            ));
        }
    }
    // The reference semantics themselves: the cases above must not be vacuous.
    let sizes_ok = expected_sizes[0] == 6
        && expected_sizes[12] == 2
        && expected_sizes[13] == 1
        && expected_sizes[14] == 1
        && expected_sizes[16] == 0;
    if !sizes_ok {
        return Err(CheckFailure::new(
            CHECK,
            "the sample filters to select 6, 2, 1, 1, 0",
            format!("{expected_sizes:?}"),
        ));
    }
    Ok(())
}

/// Pages partition the results; foreign cursors are an error.
pub async fn paging(store: Arc<dyn DlqStore>) -> CheckResult {
    const CHECK: &str = "paging";
    let letters: Vec<_> = (0..25)
        .map(|n| {
            let class = if n % 2 == 0 {
                ErrorClass::Permanent
            } else {
                ErrorClass::Poison
            };
            sample_letter(n, ("memory", "orders", "g"), "h", class, "failure")
        })
        .collect();
    put_all(CHECK, &*store, &letters).await?;
    for size in [1, 7, 25, 100] {
        let got = ids(&list_all(CHECK, &*store, &Filter::new(), size).await?);
        if got != ids(&letters) {
            return Err(CheckFailure::new(
                CHECK,
                format!("pages of {size} to list all 25 in order"),
                format!("{got:?}"),
            ));
        }
    }
    let poison = Filter::new().class(FailureClass::Poison);
    let got = ids(&list_all(CHECK, &*store, &poison, 4).await?);
    let expected: Vec<_> = letters
        .iter()
        .filter(|l| poison.matches(l))
        .map(|l| l.id.clone())
        .collect();
    if got != expected {
        return Err(CheckFailure::new(
            CHECK,
            "filtered pages to list the 12 poison letters",
            format!("{got:?}"),
        ));
    }
    let first = store
        .list(&Filter::new(), &PageRequest::first(7))
        .await
        .map_err(|e| store_err(CHECK, "list", e))?;
    if first.items.len() != 7 || first.next.is_none() {
        return Err(CheckFailure::new(
            CHECK,
            "a first page of 7 with a cursor",
            format!("{} items, next {:?}", first.items.len(), first.next),
        ));
    }
    match store
        .list(&Filter::new(), &PageRequest::after(7, "not-a-cursor"))
        .await
    {
        Err(StoreError::InvalidCursor(_)) => Ok(()),
        other => Err(CheckFailure::new(
            CHECK,
            "InvalidCursor for a foreign cursor",
            format!("{other:?}"),
        )),
    }
}

/// Status changes are conditional, counted and recorded; one of concurrent
/// changes wins.
pub async fn transitions(store: Arc<dyn DlqStore>) -> CheckResult {
    const CHECK: &str = "transitions";
    let letter = sample_letter(
        1,
        ("memory", "orders", "g"),
        "h",
        ErrorClass::Permanent,
        "bad",
    );
    let racer = sample_letter(
        2,
        ("memory", "orders", "g"),
        "h",
        ErrorClass::Permanent,
        "bad",
    );
    put_all(CHECK, &*store, &[letter.clone(), racer.clone()]).await?;

    let replay = Transition::new(
        [Status::Dead],
        Event::new("alice", "replayed", Status::Replayed).reason("fixed"),
    )
    .replay();
    let updated = store
        .transition(&letter.id, &replay)
        .await
        .map_err(|e| store_err(CHECK, "transition", e))?;
    let mut expected = letter.clone();
    replay.apply(&mut expected);
    match &updated {
        Some(u) if *u == expected => {}
        other => {
            return Err(CheckFailure::new(
                CHECK,
                format!("{expected:?}"),
                format!("{other:?}"),
            ));
        }
    }
    let stored = store
        .get(&letter.id)
        .await
        .map_err(|e| store_err(CHECK, "get", e))?;
    if stored.as_ref() != Some(&expected) || expected.replay_count != 1 {
        return Err(CheckFailure::new(
            CHECK,
            "the transition to be stored with replay count 1",
            format!("{stored:?}"),
        ));
    }
    let again = store
        .transition(&letter.id, &replay)
        .await
        .map_err(|e| store_err(CHECK, "transition", e))?;
    if again.is_some() {
        return Err(CheckFailure::new(
            CHECK,
            "no transition from replayed when only dead is allowed",
            "a transition",
        ));
    }
    let unknown = store
        .transition("no-such-id", &replay)
        .await
        .map_err(|e| store_err(CHECK, "transition", e))?;
    if unknown.is_some() {
        return Err(CheckFailure::new(
            CHECK,
            "None for an unknown id",
            "a transition",
        ));
    }
    let by_status = store
        .count(&Filter::new().status([Status::Replayed]))
        .await
        .map_err(|e| store_err(CHECK, "count", e))?;
    if by_status != 1 {
        return Err(CheckFailure::new(
            CHECK,
            "the new status to be filterable",
            by_status,
        ));
    }

    let discard = Transition::new(
        [Status::Dead],
        Event::new("bob", "discarded", Status::Discarded).reason("obsolete"),
    );
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let store = store.clone();
        let discard = discard.clone();
        let id = racer.id.clone();
        tasks.spawn(async move { store.transition(&id, &discard).await });
    }
    let mut winners = 0;
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(Some(_))) => winners += 1,
            Ok(Ok(None)) => {}
            Ok(Err(e)) => return Err(store_err(CHECK, "a concurrent transition", e)),
            Err(e) => return Err(CheckFailure::new(CHECK, "the task to finish", e)),
        }
    }
    if winners != 1 {
        return Err(CheckFailure::new(
            CHECK,
            "exactly one of 8 concurrent transitions to win",
            winners,
        ));
    }
    Ok(())
}

/// Audit entries read back equal, newest first, paged.
pub async fn audit_log(store: Arc<dyn DlqStore>) -> CheckResult {
    const CHECK: &str = "audit_log";
    let mut entries = Vec::new();
    for n in 0..5 {
        let mut entry = AuditEntry::new(
            format!("operator-{n}"),
            if n % 2 == 0 { "replay" } else { "discard" },
        );
        entry.reason = Some(format!("reason {n}"));
        let mut selection = AuditSelection::default();
        if n % 2 == 0 {
            selection.ids = vec![format!("id-{n}")];
        } else {
            selection.filter = Some(Filter::new().class(FailureClass::Poison).text("x"));
        }
        entry.selection = selection;
        entry.succeeded = vec![format!("id-{n}")];
        entry.at = base_time() + Duration::seconds(n);
        store
            .append_audit(&entry)
            .await
            .map_err(|e| store_err(CHECK, "append_audit", e))?;
        entries.push(entry);
    }
    let mut got = Vec::new();
    let mut page = PageRequest::first(2);
    loop {
        let result = store
            .audit_log(&page)
            .await
            .map_err(|e| store_err(CHECK, "audit_log", e))?;
        if result.items.len() > 2 {
            return Err(CheckFailure::new(
                CHECK,
                "pages of at most 2",
                result.items.len(),
            ));
        }
        got.extend(result.items);
        match result.next {
            Some(next) => page = PageRequest::after(2, next),
            None => break,
        }
        if got.len() > entries.len() {
            break;
        }
    }
    let expected: Vec<_> = entries.into_iter().rev().collect();
    if got != expected {
        return Err(CheckFailure::new(
            CHECK,
            format!("{expected:?}"),
            format!("{got:?}"),
        ));
    }
    Ok(())
}

/// Waiting dead letters are counted by source and class.
pub async fn depth(store: Arc<dyn DlqStore>) -> CheckResult {
    const CHECK: &str = "depth";
    let mut letters = vec![
        sample_letter(
            1,
            ("kafka", "orders", "billing"),
            "h",
            ErrorClass::Permanent,
            "a",
        ),
        sample_letter(
            2,
            ("kafka", "orders", "billing"),
            "h",
            ErrorClass::Permanent,
            "b",
        ),
        sample_letter(
            3,
            ("kafka", "orders", "billing"),
            "h",
            ErrorClass::Poison,
            "c",
        ),
        sample_letter(
            4,
            ("rabbitmq", "orders", "billing"),
            "h",
            ErrorClass::Permanent,
            "d",
        ),
        sample_letter(
            5,
            ("kafka", "orders", "billing"),
            "h",
            ErrorClass::Permanent,
            "e",
        ),
        sample_letter(
            6,
            ("kafka", "orders", "billing"),
            "h",
            ErrorClass::Permanent,
            "f",
        ),
    ];
    letters[1].status = Status::Parked;
    letters[4].status = Status::Discarded;
    letters[5].status = Status::Resolved;
    put_all(CHECK, &*store, &letters).await?;
    let rows = store
        .depth()
        .await
        .map_err(|e| store_err(CHECK, "depth", e))?;
    let mut got: Vec<_> = rows
        .iter()
        .map(|d| (d.system.clone(), d.class, d.count, d.oldest))
        .collect();
    got.sort();
    let mut expected = vec![
        (
            "kafka".to_owned(),
            FailureClass::Permanent,
            2,
            letters[0].dead_lettered_at,
        ),
        (
            "kafka".to_owned(),
            FailureClass::Poison,
            1,
            letters[2].dead_lettered_at,
        ),
        (
            "rabbitmq".to_owned(),
            FailureClass::Permanent,
            1,
            letters[3].dead_lettered_at,
        ),
    ];
    expected.sort();
    if got != expected
        || rows
            .iter()
            .any(|d| d.topic != "orders" || d.group != "billing")
    {
        return Err(CheckFailure::new(
            CHECK,
            format!("{expected:?}"),
            format!("{rows:?}"),
        ));
    }
    Ok(())
}

/// Jobs round-trip and are listed until finished; an audit entry appended
/// again with the same id replaces the first, in its place (a replay job
/// writes its intent first and its outcome last).
pub async fn jobs(store: Arc<dyn DlqStore>) -> CheckResult {
    const CHECK: &str = "jobs";
    let letter = sample_letter(
        1,
        ("memory", "orders", "billing"),
        "h",
        ErrorClass::Permanent,
        "x",
    );
    put_all(CHECK, &*store, std::slice::from_ref(&letter)).await?;
    let replayer =
        surety_dlq::Replayer::new(store.clone(), surety_core::memory::MemoryTransport::new());
    let started = replayer
        .start_replay(surety_dlq::ReplayRequest::ids("ops", [letter.id.clone()]))
        .await
        .map_err(|e| CheckFailure::new(CHECK, "start_replay to succeed", e))?;
    let surety_dlq::Started::Job(job) = started else {
        return Err(CheckFailure::new(CHECK, "a job", "a dry run"));
    };
    let stored = store
        .get_job(&job.id)
        .await
        .map_err(|e| store_err(CHECK, "get_job", e))?;
    if stored.as_ref() != Some(&*job) {
        return Err(CheckFailure::new(
            CHECK,
            format!("{job:?}"),
            format!("{stored:?}"),
        ));
    }
    let unfinished = store
        .unfinished_jobs()
        .await
        .map_err(|e| store_err(CHECK, "unfinished_jobs", e))?;
    if unfinished.iter().map(|j| &j.id).collect::<Vec<_>>() != [&job.id] {
        return Err(CheckFailure::new(
            CHECK,
            "the started job listed as unfinished",
            format!("{unfinished:?}"),
        ));
    }
    let finished = replayer
        .run(*job)
        .await
        .map_err(|e| CheckFailure::new(CHECK, "the job to run", e))?;
    let unfinished = store
        .unfinished_jobs()
        .await
        .map_err(|e| store_err(CHECK, "unfinished_jobs", e))?;
    if !unfinished.is_empty() {
        return Err(CheckFailure::new(
            CHECK,
            "no unfinished job",
            format!("{unfinished:?}"),
        ));
    }
    let audit = store
        .audit_log(&PageRequest::first(10))
        .await
        .map_err(|e| store_err(CHECK, "audit_log", e))?
        .items;
    if audit.len() != 1 || !audit[0].finished || audit[0].succeeded != finished.done {
        return Err(CheckFailure::new(
            CHECK,
            "one finished audit entry with the job's outcome",
            format!("{audit:?}"),
        ));
    }
    Ok(())
}
