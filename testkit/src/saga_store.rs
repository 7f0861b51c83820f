//! The shared test suite for `surety-saga` stores (feature `saga`).
//!
//! Every [`SagaStore`] implementation (in-memory, SQLite, PostgreSQL,
//! yours) runs [`saga_store_suite`] with a function that makes a fresh,
//! empty store and a function that takes the ids of the commands the store
//! wrote for relaying since it was last called (the in-memory store's
//! `take_commands`, a SQL store's outbox rows), and asserts the [`Report`].
//! The checks drive a small payment saga through the
//! [`Orchestrator`] and read the store back through the port.
//!
//! | check | what it proves |
//! |---|---|
//! | [`start_and_transition`] | a start writes version 1 with its command; a second start of the id writes nothing; a transition moves the version on, and a finished instance holds no timers |
//! | [`stale_writes_conflict`] | a start of an existing id and a write against an old version fail with a conflict and change nothing |
//! | [`concurrent_starts`] | of concurrent starts of one id exactly one writes |
//! | [`timers_fire_once`] | due timers come in due order up to the limit; a timer fires once: the same firing again, or one overtaken by a reply, writes and sends nothing |
//! | [`history`] | history rows read back in order with their input, from-state, state, commands, timer due time and trace id, and replay to the stored state |
//! | [`noops`] | duplicate and late replies are one no-op record per (version, input, outcome) with a count, not a row each |
//! | [`listing`] | listing by saga, step, finished, age and stuck; counts by step; the audit trail in order |
//! | [`purge`] | only finished instances are purged, with their history and no-op records; a start of a purged id writes nothing |
//!
//! ```
//! use surety_saga::store::MemorySagaStore;
//! use surety_testkit::saga_store::saga_store_suite;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! saga_store_suite(
//!     || async { MemorySagaStore::new() },
//!     |store: MemorySagaStore| async move {
//!         store.take_commands().into_iter().map(|(_, c)| c.id).collect()
//!     },
//! )
//! .await
//! .assert_ok();
//! # }
//! ```

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use surety_saga::store::{AuditRecord, ListFilter, NoopRecord, SagaStore, StoreError};
use surety_saga::{Command, Input, OperatorAction, Orchestrator, Outcome, Saga, Transition};

use crate::conformance::{CheckFailure, CheckResult, Report};

/// Runs every check, each on a fresh store from `make`; `take_sent` hands
/// over the ids of the commands the store wrote since it was last called,
/// in write order.
pub async fn saga_store_suite<S, F, Fut, T, TFut>(make: F, take_sent: T) -> Report
where
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
    S: SagaStore + Clone + 'static,
    T: Fn(S) -> TFut,
    TFut: Future<Output = Vec<String>>,
{
    let mut report = Report::for_suite("saga store suite");
    macro_rules! run {
        ($check:ident) => {{
            let store = make().await;
            let sent = |store: &S| take_sent(store.clone());
            report.push_result(stringify!($check), $check(store.clone(), sent).await);
        }};
    }
    run!(start_and_transition);
    run!(stale_writes_conflict);
    run!(concurrent_starts);
    run!(timers_fire_once);
    run!(history);
    run!(noops);
    run!(listing);
    run!(purge);
    report
}

/// The saga the checks drive: `paying` sends `payment.charge` and sets the
/// timer `payment` (30 s); `paid` finishes it as `done`; the timer moves
/// it to `refunding`, which sends `payment.refund`; `refunded` ends it as
/// `cancelled`; the operator action `abort` cancels it at any step.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pay;

impl Saga for Pay {
    type State = String;
    type Message = String;

    fn name(&self) -> &str {
        "pay"
    }

    fn state_name<'a>(&'a self, state: &'a String) -> &'a str {
        state
    }

    fn is_finished(&self, state: &String) -> bool {
        state == "done" || state == "cancelled"
    }

    fn apply(&self, state: &String, input: &Input<String>) -> Transition<String> {
        match (state.as_str(), input) {
            ("paying", Input::Message(reply)) if reply == "paid" => Transition::to("done".into()),
            ("paying", Input::Timeout { .. }) => Transition::to("refunding".into()).command(
                Command::new("payments", "payment.refund", serde_json::json!({})),
            ),
            ("refunding", Input::Message(reply)) if reply == "refunded" => {
                Transition::to("cancelled".into())
            }
            (_, Input::Operator(action)) if action.action == "abort" => {
                Transition::to("cancelled".into())
            }
            _ => Transition::ignore(),
        }
    }
}

/// The start of a [`Pay`] instance: `paying`, the charge command and the
/// 30 s `payment` timer.
pub fn begin() -> Transition<String> {
    Transition::to("paying".to_owned())
        .command(Command::new(
            "payments",
            "payment.charge",
            serde_json::json!({ "cents": 4200 }),
        ))
        .set_timer("payment", Duration::from_secs(30))
}

fn paid() -> Input<String> {
    Input::Message("paid".to_owned())
}

fn fail(check: &'static str, expected: impl Debug, seen: impl Debug) -> CheckFailure {
    CheckFailure::new(check, format!("{expected:?}"), format!("{seen:?}"))
}

fn ensure_eq<T: PartialEq + Debug>(
    check: &'static str,
    what: &str,
    seen: T,
    expected: T,
) -> CheckResult {
    if seen == expected {
        Ok(())
    } else {
        Err(CheckFailure::new(
            check,
            format!("{what}: {expected:?}"),
            format!("{seen:?}"),
        ))
    }
}

fn ok<T, E: std::fmt::Display>(
    check: &'static str,
    what: &str,
    result: Result<T, E>,
) -> Result<T, CheckFailure> {
    result.map_err(|error| CheckFailure::new(check, format!("{what} to succeed"), error))
}

fn far_future() -> chrono::DateTime<Utc> {
    Utc::now() + chrono::Duration::days(365)
}

/// A start writes version 1 and its command; a second start writes
/// nothing; a transition moves the version on; a finished instance holds
/// no timers.
pub async fn start_and_transition<S, G, GF>(store: S, sent: G) -> CheckResult
where
    S: SagaStore + Clone,
    G: Fn(&S) -> GF,
    GF: Future<Output = Vec<String>>,
{
    const CHECK: &str = "start_and_transition";
    let saga = Orchestrator::new(Pay, store.clone());
    let started = ok(CHECK, "start", saga.start("o-1", begin()).await)?;
    if !matches!(started, Outcome::Applied { version: 1, .. }) {
        return Err(fail(CHECK, "applied at version 1", started));
    }
    ensure_eq(
        CHECK,
        "commands sent",
        sent(&store).await,
        vec!["pay:o-1:1:0".to_owned()],
    )?;
    let again = ok(CHECK, "second start", saga.start("o-1", begin()).await)?;
    ensure_eq(CHECK, "second start", again, Outcome::AlreadyStarted)?;
    ensure_eq(
        CHECK,
        "commands after a second start",
        sent(&store).await,
        vec![],
    )?;
    let record = ok(CHECK, "load", store.load("pay", "o-1").await)?
        .ok_or_else(|| fail(CHECK, "the instance", "none"))?;
    ensure_eq(CHECK, "version", record.version, 1)?;
    ensure_eq(
        CHECK,
        "state",
        record.state.clone(),
        serde_json::json!("paying"),
    )?;
    ensure_eq(CHECK, "state name", record.state_name.as_str(), "paying")?;
    ensure_eq(CHECK, "finished", record.finished, false)?;
    ensure_eq(CHECK, "state version", record.state_version, 1)?;

    let outcome = ok(CHECK, "handle", saga.handle("o-1", paid()).await)?;
    if !matches!(
        outcome,
        Outcome::Applied {
            version: 2,
            finished: true,
            ..
        }
    ) {
        return Err(fail(CHECK, "applied at version 2, finished", outcome));
    }
    ensure_eq(
        CHECK,
        "state",
        ok(CHECK, "state", saga.state("o-1").await)?,
        Some("done".to_owned()),
    )?;
    let timers = ok(
        CHECK,
        "due timers",
        store.due_timers("pay", far_future(), 10).await,
    )?;
    ensure_eq(CHECK, "timers of a finished instance", timers.len(), 0)?;
    let missing = ok(CHECK, "load", store.load("pay", "no-such-id").await)?;
    ensure_eq(CHECK, "an unknown id", missing, None)
}

/// A start of an existing id and a write against an old version conflict
/// and change nothing.
pub async fn stale_writes_conflict<S, G, GF>(store: S, sent: G) -> CheckResult
where
    S: SagaStore + Clone + 'static,
    G: Fn(&S) -> GF,
    GF: Future<Output = Vec<String>>,
{
    const CHECK: &str = "stale_writes_conflict";
    // A store that records each write so it can be written again.
    let recorded: Arc<std::sync::Mutex<Vec<surety_saga::store::Write>>> = Arc::default();
    let recorder = {
        let recorded = Arc::clone(&recorded);
        BeforeWrite::new(store.clone(), move |write| {
            if let Ok(mut writes) = recorded.lock() {
                writes.push(write.clone());
            }
            Box::pin(async {})
        })
    };
    let saga = Orchestrator::new(Pay, recorder);
    ok(CHECK, "start", saga.start("o-1", begin()).await)?;
    ok(CHECK, "handle", saga.handle("o-1", paid()).await)?;
    sent(&store).await;
    let writes = recorded
        .lock()
        .map_err(|_| fail(CHECK, "the recorded writes", "a poisoned lock"))?
        .clone();
    let [start, transition] = writes.as_slice() else {
        return Err(fail(CHECK, "two writes", writes.len()));
    };
    for (what, write) in [("the start again", start), ("version 2 again", transition)] {
        match store.write(write.clone()).await {
            Err(StoreError::Conflict { .. }) => {}
            other => return Err(fail(CHECK, format!("{what}: a conflict"), other)),
        }
    }
    let record = ok(CHECK, "load", store.load("pay", "o-1").await)?
        .ok_or_else(|| fail(CHECK, "the instance", "none"))?;
    ensure_eq(CHECK, "version", record.version, 2)?;
    let history = ok(CHECK, "history", store.history("pay", "o-1").await)?;
    ensure_eq(CHECK, "history rows", history.len(), 2)?;
    ensure_eq(
        CHECK,
        "commands after conflicts",
        sent(&store).await,
        vec![],
    )
}

/// Of concurrent starts of one id exactly one writes.
pub async fn concurrent_starts<S, G, GF>(store: S, sent: G) -> CheckResult
where
    S: SagaStore + Clone + 'static,
    G: Fn(&S) -> GF,
    GF: Future<Output = Vec<String>>,
{
    const CHECK: &str = "concurrent_starts";
    let saga = Arc::new(Orchestrator::new(Pay, store.clone()));
    let starts = (0..4).map(|_| {
        let saga = Arc::clone(&saga);
        async move { saga.start("o-1", begin()).await }
    });
    let mut applied = 0;
    for outcome in futures::future::join_all(starts).await {
        match ok(CHECK, "start", outcome)? {
            Outcome::Applied { .. } => applied += 1,
            Outcome::AlreadyStarted => {}
            other => return Err(fail(CHECK, "applied or already started", other)),
        }
    }
    ensure_eq(CHECK, "starts applied", applied, 1)?;
    ensure_eq(
        CHECK,
        "commands",
        sent(&store).await,
        vec!["pay:o-1:1:0".to_owned()],
    )
}

/// Due timers come in due order up to the limit; a timer fires once.
pub async fn timers_fire_once<S, G, GF>(store: S, sent: G) -> CheckResult
where
    S: SagaStore + Clone,
    G: Fn(&S) -> GF,
    GF: Future<Output = Vec<String>>,
{
    const CHECK: &str = "timers_fire_once";
    let saga = Orchestrator::new(Pay, store.clone());
    for id in ["slow", "paid"] {
        ok(CHECK, "start", saga.start(id, begin()).await)?;
    }
    sent(&store).await;
    let now = Utc::now();
    let early = ok(CHECK, "due timers", store.due_timers("pay", now, 10).await)?;
    ensure_eq(CHECK, "timers due now", early.len(), 0)?;
    let later = now + chrono::Duration::seconds(31);
    let first = ok(CHECK, "due timers", store.due_timers("pay", later, 1).await)?;
    ensure_eq(CHECK, "timers with limit 1", first.len(), 1)?;
    let polled = ok(
        CHECK,
        "due timers",
        store.due_timers("pay", later, 10).await,
    )?;
    if polled.windows(2).any(|w| w[0].due > w[1].due) {
        return Err(fail(CHECK, "timers in due order", polled));
    }
    let mut ids: Vec<&str> = polled.iter().map(|t| t.id.as_str()).collect();
    ids.sort_unstable();
    ensure_eq(CHECK, "due timers", ids, vec!["paid", "slow"])?;
    let other = ok(
        CHECK,
        "due timers",
        store.due_timers("other", later, 10).await,
    )?;
    ensure_eq(CHECK, "another saga's timers", other.len(), 0)?;

    // "paid" answers after its timer was polled: its firing is stale.
    ok(CHECK, "handle", saga.handle("paid", paid()).await)?;
    for timer in &polled {
        let outcome = ok(CHECK, "fire", saga.fire_timer(timer.clone(), later).await)?;
        let fired = matches!(outcome, Outcome::Applied { .. });
        if fired != (timer.id == "slow") {
            return Err(fail(
                CHECK,
                "slow fires, paid is stale",
                (&timer.id, outcome),
            ));
        }
    }
    ensure_eq(
        CHECK,
        "commands",
        sent(&store).await,
        vec!["pay:slow:2:0".to_owned()],
    )?;
    let slow = polled
        .iter()
        .find(|t| t.id == "slow")
        .ok_or_else(|| fail(CHECK, "slow's timer", "none"))?;
    // The same firing again (another poller) writes and sends nothing.
    let again = ok(
        CHECK,
        "fire again",
        saga.fire_timer(slow.clone(), later).await,
    )?;
    if matches!(again, Outcome::Applied { .. }) {
        return Err(fail(CHECK, "a second firing to write nothing", again));
    }
    ensure_eq(
        CHECK,
        "commands after a second firing",
        sent(&store).await,
        vec![],
    )?;
    let history = ok(CHECK, "history", store.history("pay", "slow").await)?;
    ensure_eq(CHECK, "history rows", history.len(), 2)?;
    ensure_eq(
        CHECK,
        "the fired timer's due time",
        history[1].timer_due,
        Some(slow.due),
    )?;
    let left = ok(CHECK, "due timers", saga.fire_due_timers(later, 10).await)?;
    ensure_eq(CHECK, "timers left", left.len(), 0)
}

/// History rows read back in order with everything they record, and
/// replay to the stored state.
pub async fn history<S, G, GF>(store: S, sent: G) -> CheckResult
where
    S: SagaStore + Clone,
    G: Fn(&S) -> GF,
    GF: Future<Output = Vec<String>>,
{
    const CHECK: &str = "history";
    let saga = Orchestrator::new(Pay, store.clone());
    ok(CHECK, "start", saga.start("o-1", begin()).await)?;
    let later = Utc::now() + chrono::Duration::seconds(31);
    ok(CHECK, "fire", saga.fire_due_timers(later, 10).await)?;
    let abort = OperatorAction::new("abort", "alice", "duplicate order");
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    ok(
        CHECK,
        "handle",
        saga.handle_traced("o-1", Input::Operator(abort.clone()), Some(trace))
            .await,
    )?;
    sent(&store).await;
    let rows = ok(CHECK, "history", store.history("pay", "o-1").await)?;
    ensure_eq(CHECK, "rows", rows.len(), 3)?;
    let versions: Vec<u64> = rows.iter().map(|r| r.version).collect();
    ensure_eq(CHECK, "versions", versions, vec![1, 2, 3])?;
    let from: Vec<Option<&str>> = rows.iter().map(|r| r.from_state.as_deref()).collect();
    ensure_eq(
        CHECK,
        "from states",
        from,
        vec![None, Some("paying"), Some("refunding")],
    )?;
    let to: Vec<&str> = rows.iter().map(|r| r.state_name.as_str()).collect();
    ensure_eq(
        CHECK,
        "to states",
        to,
        vec!["paying", "refunding", "cancelled"],
    )?;
    ensure_eq(CHECK, "start input", rows[0].input.clone(), None)?;
    ensure_eq(
        CHECK,
        "start state",
        rows[0].state.clone(),
        serde_json::json!("paying"),
    )?;
    let sent_by: Vec<Vec<(&str, &str, &str)>> = rows
        .iter()
        .map(|r| {
            r.commands
                .iter()
                .map(|c| (c.topic.as_str(), c.message_type.as_str(), c.id.as_str()))
                .collect()
        })
        .collect();
    ensure_eq(
        CHECK,
        "commands by row",
        sent_by,
        vec![
            vec![("payments", "payment.charge", "pay:o-1:1:0")],
            vec![("payments", "payment.refund", "pay:o-1:2:0")],
            vec![],
        ],
    )?;
    ensure_eq(
        CHECK,
        "timer due on the firing only",
        rows[0].timer_due.is_none() && rows[1].timer_due.is_some() && rows[2].timer_due.is_none(),
        true,
    )?;
    ensure_eq(CHECK, "trace id", rows[2].trace_id.as_deref(), Some(trace))?;
    ensure_eq(CHECK, "no trace id", rows[1].trace_id.as_deref(), None)?;
    // The firing is recorded at the time it was fired for.
    ensure_eq(
        CHECK,
        "the firing's time",
        rows[1].at.timestamp(),
        later.timestamp(),
    )?;
    let (initial, inputs) = ok(CHECK, "history", saga.history("o-1").await)?
        .ok_or_else(|| fail(CHECK, "a history", "none"))?;
    ensure_eq(
        CHECK,
        "inputs",
        inputs.clone(),
        vec![
            Input::Timeout {
                name: "payment".to_owned(),
            },
            Input::Operator(abort),
        ],
    )?;
    ensure_eq(
        CHECK,
        "replay",
        Some(surety_saga::replay(&Pay, initial, inputs)),
        ok(CHECK, "state", saga.state("o-1").await)?,
    )?;
    let none = ok(CHECK, "history", store.history("pay", "no-such-id").await)?;
    ensure_eq(CHECK, "an unknown id's history", none.len(), 0)
}

/// Duplicate and late replies are one counted no-op record each.
pub async fn noops<S, G, GF>(store: S, sent: G) -> CheckResult
where
    S: SagaStore + Clone,
    G: Fn(&S) -> GF,
    GF: Future<Output = Vec<String>>,
{
    const CHECK: &str = "noops";
    let saga = Orchestrator::new(Pay, store.clone());
    ok(CHECK, "start", saga.start("o-1", begin()).await)?;
    for _ in 0..3 {
        let ignored = ok(
            CHECK,
            "handle",
            saga.handle("o-1", Input::Message("refunded".into())).await,
        )?;
        ensure_eq(CHECK, "a reply for another step", ignored, Outcome::Ignored)?;
    }
    ok(CHECK, "handle", saga.handle("o-1", paid()).await)?;
    for _ in 0..20 {
        let late = ok(CHECK, "handle", saga.handle("o-1", paid()).await)?;
        ensure_eq(CHECK, "a duplicate after the end", late, Outcome::Finished)?;
    }
    sent(&store).await;
    let history = ok(CHECK, "history", store.history("pay", "o-1").await)?;
    ensure_eq(CHECK, "history rows", history.len(), 2)?;
    let noops = ok(CHECK, "noops", store.noops("pay", "o-1").await)?;
    let seen: Vec<(u64, &str, &str, u64)> = noops
        .iter()
        .map(|n| (n.version, n.input.as_str(), n.outcome.as_str(), n.count))
        .collect();
    ensure_eq(
        CHECK,
        "no-op records",
        seen,
        vec![(1, "refunded", "ignored", 3), (2, "paid", "finished", 20)],
    )?;
    if noops.iter().any(|n| n.first_at > n.last_at) {
        return Err(fail(CHECK, "first_at <= last_at", noops));
    }
    // Recorded directly: counts add up, the last trace id is kept.
    let at = Utc::now();
    let noop = NoopRecord::new(2, "paid", "finished", at, Some("t-1".to_owned()));
    ok(
        CHECK,
        "record_noop",
        store.record_noop("pay", "o-1", noop).await,
    )?;
    let noops = ok(CHECK, "noops", store.noops("pay", "o-1").await)?;
    let last = noops
        .last()
        .ok_or_else(|| fail(CHECK, "a record", "none"))?;
    ensure_eq(CHECK, "count", last.count, 21)?;
    ensure_eq(
        CHECK,
        "last trace id",
        last.trace_id.as_deref(),
        Some("t-1"),
    )?;
    let none = ok(CHECK, "noops", store.noops("pay", "no-such-id").await)?;
    ensure_eq(CHECK, "an unknown id's no-op records", none.len(), 0)
}

/// Listing by saga, step, finished, age and stuck; counts by step; the
/// audit trail in order.
pub async fn listing<S, G, GF>(store: S, sent: G) -> CheckResult
where
    S: SagaStore + Clone,
    G: Fn(&S) -> GF,
    GF: Future<Output = Vec<String>>,
{
    const CHECK: &str = "listing";
    let saga = Orchestrator::new(Pay, store.clone());
    for id in ["a", "b", "c"] {
        ok(CHECK, "start", saga.start(id, begin()).await)?;
    }
    ok(CHECK, "handle", saga.handle("b", paid()).await)?;
    sent(&store).await;
    let ids = |list: Vec<surety_saga::store::InstanceSummary>| {
        let mut ids: Vec<String> = list.into_iter().map(|i| i.id).collect();
        ids.sort();
        ids
    };
    let all = ok(CHECK, "list", store.list(&ListFilter::new(10)).await)?;
    if all.iter().any(|i| i.created_at > i.updated_at) {
        return Err(fail(CHECK, "created_at <= updated_at", all));
    }
    if let Some(b) = all.iter().find(|i| i.id == "b") {
        ensure_eq(
            CHECK,
            "b's state",
            b.state.clone(),
            serde_json::json!("done"),
        )?;
        ensure_eq(CHECK, "b's version", b.version, 2)?;
    }
    ensure_eq(
        CHECK,
        "all",
        ids(all),
        vec!["a".into(), "b".into(), "c".into()],
    )?;
    let limited = ok(CHECK, "list", store.list(&ListFilter::new(2)).await)?;
    ensure_eq(CHECK, "limit", limited.len(), 2)?;
    let mut filter = ListFilter::new(10);
    filter.saga = Some("other".into());
    ensure_eq(
        CHECK,
        "another saga",
        ids(ok(CHECK, "list", store.list(&filter).await)?),
        vec![],
    )?;
    let mut filter = ListFilter::new(10);
    filter.state_name = Some("paying".into());
    ensure_eq(
        CHECK,
        "by step",
        ids(ok(CHECK, "list", store.list(&filter).await)?),
        vec!["a".into(), "c".into()],
    )?;
    let mut filter = ListFilter::new(10);
    filter.finished = Some(true);
    filter.saga = Some("pay".into());
    ensure_eq(
        CHECK,
        "finished",
        ids(ok(CHECK, "list", store.list(&filter).await)?),
        vec!["b".into()],
    )?;
    let mut filter = ListFilter::new(10);
    filter.started_before = Some(Utc::now() - chrono::Duration::hours(1));
    ensure_eq(
        CHECK,
        "older than an hour",
        ids(ok(CHECK, "list", store.list(&filter).await)?),
        vec![],
    )?;
    let mut filter = ListFilter::new(10);
    filter.idle_since = Some(Utc::now() + chrono::Duration::seconds(1));
    ensure_eq(
        CHECK,
        "stuck",
        ids(ok(CHECK, "list", store.list(&filter).await)?),
        vec!["a".into(), "c".into()],
    )?;
    let mut filter = ListFilter::new(10);
    filter.idle_since = Some(Utc::now() - chrono::Duration::hours(1));
    ensure_eq(
        CHECK,
        "stuck for an hour",
        ids(ok(CHECK, "list", store.list(&filter).await)?),
        vec![],
    )?;

    let before = Utc::now() - chrono::Duration::hours(1);
    let counts = ok(
        CHECK,
        "unfinished counts",
        store.unfinished_counts("pay", before).await,
    )?;
    ensure_eq(
        CHECK,
        "counts, none idle",
        counts,
        vec![("paying".to_owned(), 2, 0)],
    )?;
    let after = Utc::now() + chrono::Duration::seconds(1);
    let counts = ok(
        CHECK,
        "unfinished counts",
        store.unfinished_counts("pay", after).await,
    )?;
    ensure_eq(
        CHECK,
        "counts, all idle",
        counts,
        vec![("paying".to_owned(), 2, 2)],
    )?;
    let counts = ok(
        CHECK,
        "unfinished counts",
        store.unfinished_counts("other", after).await,
    )?;
    ensure_eq(CHECK, "another saga's counts", counts.len(), 0)?;

    for (action, reason) in [("retry", "first"), ("resolve", "by hand")] {
        let entry = AuditRecord::new("pay", "a", "alice", action, reason);
        ok(CHECK, "audit", store.audit(entry).await)?;
    }
    let audit = ok(CHECK, "audit log", store.audit_log("pay", "a").await)?;
    let seen: Vec<(&str, &str, &str)> = audit
        .iter()
        .map(|a| (a.actor.as_str(), a.action.as_str(), a.reason.as_str()))
        .collect();
    ensure_eq(
        CHECK,
        "audit trail",
        seen,
        vec![("alice", "retry", "first"), ("alice", "resolve", "by hand")],
    )?;
    let other = ok(CHECK, "audit log", store.audit_log("pay", "b").await)?;
    ensure_eq(CHECK, "another instance's audit trail", other.len(), 0)
}

/// Only finished instances are purged, with their history and no-op
/// records; a start of a purged id writes nothing.
pub async fn purge<S, G, GF>(store: S, sent: G) -> CheckResult
where
    S: SagaStore + Clone,
    G: Fn(&S) -> GF,
    GF: Future<Output = Vec<String>>,
{
    const CHECK: &str = "purge";
    let saga = Orchestrator::new(Pay, store.clone());
    for id in ["running", "done"] {
        ok(CHECK, "start", saga.start(id, begin()).await)?;
    }
    ok(CHECK, "handle", saga.handle("done", paid()).await)?;
    ok(CHECK, "handle", saga.handle("done", paid()).await)?;
    sent(&store).await;
    let earlier = Utc::now() - chrono::Duration::hours(1);
    let purged = ok(
        CHECK,
        "purge",
        store.purge_finished("pay", earlier, 10).await,
    )?;
    ensure_eq(CHECK, "purged before the cut-off", purged, 0)?;
    let later = Utc::now() + chrono::Duration::seconds(1);
    let purged = ok(
        CHECK,
        "purge",
        store.purge_finished("other", later, 10).await,
    )?;
    ensure_eq(CHECK, "purged of another saga", purged, 0)?;
    let purged = ok(CHECK, "purge", store.purge_finished("pay", later, 10).await)?;
    ensure_eq(CHECK, "purged", purged, 1)?;
    ensure_eq(
        CHECK,
        "purged again",
        ok(CHECK, "purge", store.purge_finished("pay", later, 10).await)?,
        0,
    )?;
    ensure_eq(
        CHECK,
        "purged instance",
        ok(CHECK, "load", store.load("pay", "done").await)?.is_some(),
        false,
    )?;
    ensure_eq(
        CHECK,
        "purged history",
        ok(CHECK, "history", store.history("pay", "done").await)?.len(),
        0,
    )?;
    ensure_eq(
        CHECK,
        "purged no-op records",
        ok(CHECK, "noops", store.noops("pay", "done").await)?.len(),
        0,
    )?;
    ensure_eq(
        CHECK,
        "the running instance",
        ok(CHECK, "load", store.load("pay", "running").await)?.is_some(),
        true,
    )?;

    // The start delivered again after the purge.
    let again = ok(CHECK, "start", saga.start("done", begin()).await)?;
    ensure_eq(
        CHECK,
        "a start of a purged id",
        again,
        Outcome::AlreadyStarted,
    )?;
    ensure_eq(
        CHECK,
        "instance after the start",
        ok(CHECK, "load", store.load("pay", "done").await)?.is_some(),
        false,
    )?;
    ensure_eq(
        CHECK,
        "commands after the start",
        sent(&store).await,
        vec![],
    )?;
    let fresh = ok(CHECK, "start", saga.start("fresh", begin()).await)?;
    if !matches!(fresh, Outcome::Applied { .. }) {
        return Err(fail(CHECK, "another id starts", fresh));
    }
    Ok(())
}

/// What [`BeforeWrite`] runs before a write.
type WriteHook = Arc<
    dyn Fn(&surety_saga::store::Write) -> futures::future::BoxFuture<'static, ()> + Send + Sync,
>;

/// A store that runs a hook on every write before passing it on to the
/// store it wraps (everything else goes straight through): record the
/// writes, or hold one back until a test lets it go, so another writer
/// gets in between deterministically.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use surety_saga::store::MemorySagaStore;
/// use surety_testkit::saga_store::BeforeWrite;
///
/// let seen = Arc::new(Mutex::new(0));
/// let counted = Arc::clone(&seen);
/// let store = BeforeWrite::new(MemorySagaStore::new(), move |_write| {
///     *counted.lock().unwrap() += 1;
///     Box::pin(async {})
/// });
/// # let _ = store;
/// ```
#[derive(Clone)]
pub struct BeforeWrite<S> {
    inner: S,
    hook: WriteHook,
}

impl<S> BeforeWrite<S> {
    /// Wraps `inner`; `hook` sees each write first, and the write waits for
    /// the future it returns.
    pub fn new(
        inner: S,
        hook: impl Fn(&surety_saga::store::Write) -> futures::future::BoxFuture<'static, ()>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        Self {
            inner,
            hook: Arc::new(hook),
        }
    }
}

impl<S> std::fmt::Debug for BeforeWrite<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BeforeWrite").finish_non_exhaustive()
    }
}

impl<S: SagaStore> SagaStore for BeforeWrite<S> {
    async fn load(
        &self,
        saga: &str,
        id: &str,
    ) -> Result<Option<surety_saga::store::InstanceRecord>, StoreError> {
        self.inner.load(saga, id).await
    }

    async fn write(&self, write: surety_saga::store::Write) -> Result<(), StoreError> {
        (self.hook)(&write).await;
        self.inner.write(write).await
    }

    async fn due_timers(
        &self,
        saga: &str,
        now: chrono::DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<surety_saga::store::TimerRecord>, StoreError> {
        self.inner.due_timers(saga, now, limit).await
    }

    async fn delete_timer(
        &self,
        timer: &surety_saga::store::TimerRecord,
    ) -> Result<bool, StoreError> {
        self.inner.delete_timer(timer).await
    }

    async fn history(
        &self,
        saga: &str,
        id: &str,
    ) -> Result<Vec<surety_saga::store::HistoryRecord>, StoreError> {
        self.inner.history(saga, id).await
    }

    async fn record_noop(&self, saga: &str, id: &str, noop: NoopRecord) -> Result<(), StoreError> {
        self.inner.record_noop(saga, id, noop).await
    }

    async fn noops(&self, saga: &str, id: &str) -> Result<Vec<NoopRecord>, StoreError> {
        self.inner.noops(saga, id).await
    }

    async fn list(
        &self,
        filter: &ListFilter,
    ) -> Result<Vec<surety_saga::store::InstanceSummary>, StoreError> {
        self.inner.list(filter).await
    }

    async fn unfinished_counts(
        &self,
        saga: &str,
        idle_since: chrono::DateTime<Utc>,
    ) -> Result<Vec<(String, u64, u64)>, StoreError> {
        self.inner.unfinished_counts(saga, idle_since).await
    }

    async fn purge_finished(
        &self,
        saga: &str,
        before: chrono::DateTime<Utc>,
        limit: usize,
    ) -> Result<u64, StoreError> {
        self.inner.purge_finished(saga, before, limit).await
    }

    async fn audit(&self, entry: AuditRecord) -> Result<(), StoreError> {
        self.inner.audit(entry).await
    }

    async fn audit_log(&self, saga: &str, id: &str) -> Result<Vec<AuditRecord>, StoreError> {
        self.inner.audit_log(saga, id).await
    }
}
