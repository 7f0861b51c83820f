//! The shared test suite for `surety-idempotency` dedup stores: one set of
//! checks that the in-memory, SQLite and PostgreSQL stores, and yours, pass.
//!
//! A store test calls [`dedup_store_suite`] with a function that makes the
//! store and asserts the [`StoreReport`]. Each check is also a public
//! function taking a store, for running one on its own.
//!
//! | check | contract |
//! |---|---|
//! | [`claim_acquires_once`] | a new key is acquired; a second claim is busy with the rest of the lease |
//! | [`complete_stores_the_reply`] | a completed key is done with its reply, byte for byte (or none) |
//! | [`release_frees_the_key`] | a released key is acquired again at once, with a new token |
//! | [`expired_lease_is_taken_over`] | an expired lease is taken over; the stale token can neither complete nor extend, and its release leaves the new claim alone |
//! | [`extend_keeps_the_lease`] | an extended lease outlives its first expiry |
//! | [`complete_is_fenced`] | completing again with the holder's token succeeds; with another token it fails |
//! | [`concurrent_claims_acquire_once`] | of many concurrent claims on a new key exactly one is acquired |
//! | [`purge_removes_old_keys_only`] | purge deletes old completed keys and long-expired claims, never young keys or live claims, at most `limit` per call |
//! | [`size_counts_keys`] | the size counts claimed and completed keys |
//!
//! # Running against a shared database
//!
//! Every check uses keys of its own (`surety-testkit/<check>/<uuid v7>`),
//! so the suite can run again and again against one long-lived database
//! and next to other tests. The purge check deletes old keys of other tests
//! in the same table: give the suite a table of its own (a fresh schema, a
//! fresh SQLite file) when other tests depend on old keys. Lease timing
//! uses real time: leases of [`SuiteOptions::lease`] (default 300 ms), and
//! every wait has a deadline.
//!
//! ```
//! use surety_idempotency::MemoryDedupStore;
//! use surety_testkit::idempotency_store::{dedup_store_suite, SuiteOptions};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let report = dedup_store_suite(|| async { MemoryDedupStore::new() }, SuiteOptions::default()).await;
//! report.assert_ok();
//! assert_eq!(report.passed().len(), 9);
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::time::Duration;

use surety_idempotency::{Claim, DedupStore, Lease, StoreError};
use tokio::time::Instant;

use crate::conformance::{CheckFailure, Report};

/// The result of one check.
pub type CheckResult = Result<(), CheckFailure>;

/// Timing of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SuiteOptions {
    /// The lease the expiry checks use (default 300 ms). Longer for stores
    /// whose clock is coarse or whose round trips are slow.
    pub lease: Duration,
    /// How long a check waits for something that must happen (default 10 s).
    pub deadline: Duration,
}

impl Default for SuiteOptions {
    fn default() -> Self {
        Self {
            lease: Duration::from_millis(300),
            deadline: Duration::from_secs(10),
        }
    }
}

impl SuiteOptions {
    /// Sets the lease the expiry checks use.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets how long a check waits for something that must happen.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }
}

/// What [`dedup_store_suite`] found: every check, in order, and how it
/// ended. `Display` prints one line per check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreReport {
    // Every check passes or fails (none is skipped); the lines are printed
    // the way the transport conformance report prints them.
    checks: Report,
}

impl StoreReport {
    /// The names of the checks that passed.
    pub fn passed(&self) -> Vec<&'static str> {
        self.checks.passed()
    }

    /// The checks that failed.
    pub fn failures(&self) -> Vec<&CheckFailure> {
        self.checks.failures()
    }

    /// Whether every check passed.
    pub fn is_ok(&self) -> bool {
        self.checks.is_ok()
    }

    /// Panics with the whole report when a check failed.
    #[track_caller]
    pub fn assert_ok(&self) {
        if !self.is_ok() {
            panic!("{self}");
        }
    }
}

impl fmt::Display for StoreReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "dedup store suite: {} passed, {} failed",
            self.passed().len(),
            self.failures().len()
        )?;
        self.checks.write_outcomes(f)
    }
}

/// Runs every check, each against a store from `make`.
pub async fn dedup_store_suite<S, F, Fut>(make: F, options: SuiteOptions) -> StoreReport
where
    S: DedupStore,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    let mut report = StoreReport::default();
    macro_rules! run {
        ($($check:ident),* $(,)?) => {$(
            let store = make().await;
            let result = match tokio::time::timeout(
                options.deadline * 3,
                $check(&store, &options),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => Err(CheckFailure::new(
                    stringify!($check),
                    "the check to finish",
                    format!("it still ran after {:?}", options.deadline * 3),
                )),
            };
            if let Err(failure) = &result {
                tracing::warn!(%failure, "dedup store check failed");
            }
            report.checks.push_result(stringify!($check), result);
        )*};
    }
    run!(
        claim_acquires_once,
        complete_stores_the_reply,
        release_frees_the_key,
        expired_lease_is_taken_over,
        extend_keeps_the_lease,
        complete_is_fenced,
        concurrent_claims_acquire_once,
        purge_removes_old_keys_only,
        size_counts_keys,
    );
    report
}

fn key(check: &str) -> String {
    format!("surety-testkit/{check}/{}", uuid::Uuid::now_v7())
}

fn fail(check: &'static str, expected: impl fmt::Display, seen: impl fmt::Debug) -> CheckFailure {
    CheckFailure::new(check, expected, format!("{seen:?}"))
}

async fn claim<S: DedupStore>(
    check: &'static str,
    store: &S,
    key: &str,
    lease: Duration,
) -> Result<Claim, CheckFailure> {
    store
        .claim(key, lease)
        .await
        .map_err(|e| fail(check, format!("claim({key:?}) to succeed"), e))
}

async fn acquire<S: DedupStore>(
    check: &'static str,
    store: &S,
    key: &str,
    lease: Duration,
) -> Result<Lease, CheckFailure> {
    match claim(check, store, key, lease).await? {
        Claim::Acquired(lease) => Ok(lease),
        other => Err(fail(check, format!("claim({key:?}) to be acquired"), other)),
    }
}

/// Claims `key` until it is acquired (a lease expiring), up to the deadline.
async fn acquire_within<S: DedupStore>(
    check: &'static str,
    store: &S,
    key: &str,
    options: &SuiteOptions,
) -> Result<Lease, CheckFailure> {
    let deadline = Instant::now() + options.deadline;
    loop {
        match claim(check, store, key, options.lease).await? {
            Claim::Acquired(lease) => return Ok(lease),
            Claim::Busy { retry_after } if Instant::now() < deadline => {
                tokio::time::sleep(
                    retry_after.clamp(Duration::from_millis(5), Duration::from_millis(50)),
                )
                .await;
            }
            other => {
                return Err(fail(
                    check,
                    format!(
                        "the lease on {key:?} to expire within {:?}",
                        options.deadline
                    ),
                    other,
                ));
            }
        }
    }
}

/// Passes when `result` is a `LeaseLost` error; fails with `expected` otherwise.
fn lease_lost(check: &'static str, result: Result<(), StoreError>, expected: &str) -> CheckResult {
    match result {
        Err(e) if e.is_lease_lost() => Ok(()),
        other => Err(fail(check, expected, other)),
    }
}

fn ensure(check: &'static str, ok: bool, expected: &str, seen: impl fmt::Debug) -> CheckResult {
    if ok {
        Ok(())
    } else {
        Err(fail(check, expected, seen))
    }
}

const LONG: Duration = Duration::from_secs(60);

/// A new key is acquired, not as a takeover; a second claim is busy and
/// its `retry_after` is at most the lease.
pub async fn claim_acquires_once<S: DedupStore>(store: &S, _: &SuiteOptions) -> CheckResult {
    const CHECK: &str = "claim_acquires_once";
    let k = key(CHECK);
    let lease = acquire(CHECK, store, &k, LONG).await?;
    ensure(
        CHECK,
        !lease.took_over,
        "a new key not to be a takeover",
        &lease,
    )?;
    match claim(CHECK, store, &k, LONG).await? {
        Claim::Busy { retry_after } => ensure(
            CHECK,
            retry_after > Duration::ZERO && retry_after <= LONG,
            "retry_after within the lease",
            retry_after,
        ),
        other => Err(fail(CHECK, "a second claim to be busy", other)),
    }
}

/// A completed key answers done with the reply it was completed with,
/// binary bytes intact, or with no reply.
pub async fn complete_stores_the_reply<S: DedupStore>(store: &S, _: &SuiteOptions) -> CheckResult {
    const CHECK: &str = "complete_stores_the_reply";
    let reply: &[u8] = b"\x00\xff{\"reply\":\"\xc3\xa9\"}\x00";
    for stored in [Some(reply), None] {
        let k = key(CHECK);
        let lease = acquire(CHECK, store, &k, LONG).await?;
        store
            .complete(&k, &lease.token, stored)
            .await
            .map_err(|e| fail(CHECK, "complete to succeed", e))?;
        for _ in 0..2 {
            match claim(CHECK, store, &k, LONG).await? {
                Claim::Done { reply } => ensure(
                    CHECK,
                    reply.as_deref() == stored,
                    &format!("the stored reply {stored:?}"),
                    &reply,
                )?,
                other => return Err(fail(CHECK, "a completed key to be done", other)),
            }
        }
    }
    Ok(())
}

/// A released key is acquired again at once with a new token, not as a
/// takeover.
pub async fn release_frees_the_key<S: DedupStore>(store: &S, _: &SuiteOptions) -> CheckResult {
    const CHECK: &str = "release_frees_the_key";
    let k = key(CHECK);
    let first = acquire(CHECK, store, &k, LONG).await?;
    store
        .release(&k, &first.token)
        .await
        .map_err(|e| fail(CHECK, "release to succeed", e))?;
    let second = acquire(CHECK, store, &k, LONG).await?;
    ensure(CHECK, second.token != first.token, "a new token", &second)?;
    ensure(
        CHECK,
        !second.took_over,
        "no takeover after a release",
        &second,
    )
}

/// An expired lease is taken over (`took_over`); the stale holder can
/// neither complete nor extend, its release leaves the new claim alone, and
/// the new holder completes.
pub async fn expired_lease_is_taken_over<S: DedupStore>(
    store: &S,
    options: &SuiteOptions,
) -> CheckResult {
    const CHECK: &str = "expired_lease_is_taken_over";
    let k = key(CHECK);
    let stale = acquire(CHECK, store, &k, options.lease).await?;
    let fresh = acquire_within(CHECK, store, &k, options).await?;
    ensure(
        CHECK,
        fresh.took_over,
        "the second claim to be a takeover",
        &fresh,
    )?;
    ensure(CHECK, fresh.token != stale.token, "a new token", &fresh)?;
    lease_lost(
        CHECK,
        store.complete(&k, &stale.token, Some(b"stale")).await,
        "the stale holder's complete to fail with LeaseLost",
    )?;
    lease_lost(
        CHECK,
        store.extend(&k, &stale.token, LONG).await,
        "the stale holder's extend to fail with LeaseLost",
    )?;
    store
        .release(&k, &stale.token)
        .await
        .map_err(|e| fail(CHECK, "a stale release to be harmless", e))?;
    match claim(CHECK, store, &k, LONG).await? {
        Claim::Busy { .. } => {}
        other => {
            return Err(fail(
                CHECK,
                "the new claim to survive a stale release",
                other,
            ));
        }
    }
    store
        .complete(&k, &fresh.token, Some(b"fresh"))
        .await
        .map_err(|e| fail(CHECK, "the new holder's complete to succeed", e))?;
    match claim(CHECK, store, &k, LONG).await? {
        Claim::Done { reply } if reply.as_deref() == Some(&b"fresh"[..]) => Ok(()),
        other => Err(fail(CHECK, "done with the new holder's reply", other)),
    }
}

/// A lease extended before it expires is still held after its first
/// expiry.
pub async fn extend_keeps_the_lease<S: DedupStore>(
    store: &S,
    options: &SuiteOptions,
) -> CheckResult {
    const CHECK: &str = "extend_keeps_the_lease";
    let k = key(CHECK);
    let started = Instant::now();
    let lease = acquire(CHECK, store, &k, options.lease).await?;
    store
        .extend(&k, &lease.token, LONG)
        .await
        .map_err(|e| fail(CHECK, "extend to succeed", e))?;
    tokio::time::sleep_until(started + options.lease * 2).await;
    match claim(CHECK, store, &k, LONG).await? {
        Claim::Busy { .. } => {}
        other => return Err(fail(CHECK, "the extended lease to be held", other)),
    }
    store
        .complete(&k, &lease.token, None)
        .await
        .map_err(|e| fail(CHECK, "the holder to complete after extending", e))
}

/// Completing again with the holder's token succeeds (the last reply
/// wins); completing with a token that never held the key fails with
/// `LeaseLost`, before and after completion.
pub async fn complete_is_fenced<S: DedupStore>(store: &S, _: &SuiteOptions) -> CheckResult {
    const CHECK: &str = "complete_is_fenced";
    let k = key(CHECK);
    let lease = acquire(CHECK, store, &k, LONG).await?;
    let other_key = key(CHECK);
    let stranger = acquire(CHECK, store, &other_key, LONG).await?.token;
    lease_lost(
        CHECK,
        store.complete(&k, &stranger, None).await,
        "a foreign token's complete to fail with LeaseLost",
    )?;
    for reply in [&b"first"[..], b"again"] {
        store
            .complete(&k, &lease.token, Some(reply))
            .await
            .map_err(|e| fail(CHECK, "the holder's complete to succeed, twice", e))?;
    }
    lease_lost(
        CHECK,
        store.complete(&k, &stranger, Some(b"twice")).await,
        "a foreign token's complete of a done key to fail",
    )?;
    match claim(CHECK, store, &k, LONG).await? {
        Claim::Done { reply } if reply.as_deref() == Some(&b"again"[..]) => Ok(()),
        other => Err(fail(CHECK, "done with the holder's last reply", other)),
    }
}

/// Of 16 concurrent claims on a new key, exactly one is acquired and the
/// others are busy.
pub async fn concurrent_claims_acquire_once<S: DedupStore>(
    store: &S,
    _: &SuiteOptions,
) -> CheckResult {
    const CHECK: &str = "concurrent_claims_acquire_once";
    let k = key(CHECK);
    let claims = futures::future::join_all((0..16).map(|_| store.claim(&k, LONG))).await;
    let mut acquired = 0;
    for claim in claims {
        match claim {
            Ok(Claim::Acquired(_)) => acquired += 1,
            Ok(Claim::Busy { .. }) => {}
            other => return Err(fail(CHECK, "every claim to be acquired or busy", other)),
        }
    }
    ensure(CHECK, acquired == 1, "exactly one claim acquired", acquired)
}

/// Purge deletes keys completed longer ago than `older_than` and claims
/// whose lease expired longer ago, but never a young completed key or a
/// live claim; one call deletes at most `limit`.
pub async fn purge_removes_old_keys_only<S: DedupStore>(
    store: &S,
    options: &SuiteOptions,
) -> CheckResult {
    const CHECK: &str = "purge_removes_old_keys_only";
    let old: Vec<String> = (0..3).map(|_| key(CHECK)).collect();
    for k in &old {
        let lease = acquire(CHECK, store, k, LONG).await?;
        store
            .complete(k, &lease.token, None)
            .await
            .map_err(|e| fail(CHECK, "complete to succeed", e))?;
    }
    let abandoned = key(CHECK);
    acquire(CHECK, store, &abandoned, Duration::from_millis(1)).await?;
    let live = key(CHECK);
    acquire(CHECK, store, &live, LONG).await?;

    // Age the old keys past the retention; the young key stays a second
    // younger than it, however slowly the purges below run.
    let retention = (options.lease * 3).max(Duration::from_secs(1));
    tokio::time::sleep(retention + options.lease).await;
    let young = key(CHECK);
    let lease = acquire(CHECK, store, &young, LONG).await?;
    store
        .complete(&young, &lease.token, None)
        .await
        .map_err(|e| fail(CHECK, "complete to succeed", e))?;

    let first = store
        .purge(retention, 1)
        .await
        .map_err(|e| fail(CHECK, "purge to succeed", e))?;
    ensure(
        CHECK,
        first == 1,
        "purge with limit 1 to delete one key",
        first,
    )?;
    let deadline = Instant::now() + options.deadline;
    loop {
        let deleted = store
            .purge(retention, 100)
            .await
            .map_err(|e| fail(CHECK, "purge to succeed", e))?;
        if deleted == 0 || Instant::now() > deadline {
            break;
        }
    }
    for k in old.iter().chain([&abandoned]) {
        match claim(CHECK, store, k, LONG).await? {
            Claim::Acquired(lease) if !lease.took_over => {}
            other => return Err(fail(CHECK, format!("{k:?} to be purged"), other)),
        }
    }
    match claim(CHECK, store, &young, LONG).await? {
        Claim::Done { .. } => {}
        other => return Err(fail(CHECK, "a young completed key to survive purge", other)),
    }
    match claim(CHECK, store, &live, LONG).await? {
        Claim::Busy { .. } => Ok(()),
        other => Err(fail(CHECK, "a live claim to survive purge", other)),
    }
}

/// The size grows by one for each new claimed or completed key.
pub async fn size_counts_keys<S: DedupStore>(store: &S, _: &SuiteOptions) -> CheckResult {
    const CHECK: &str = "size_counts_keys";
    let size = || async {
        store
            .size()
            .await
            .map_err(|e| fail(CHECK, "size to succeed", e))
    };
    let before = size().await?;
    let done = key(CHECK);
    let lease = acquire(CHECK, store, &done, LONG).await?;
    store
        .complete(&done, &lease.token, None)
        .await
        .map_err(|e| fail(CHECK, "complete to succeed", e))?;
    acquire(CHECK, store, &key(CHECK), LONG).await?;
    let after = size().await?;
    // Other tests may share the store: it grew by at least our two keys.
    ensure(
        CHECK,
        after >= before + 2,
        "the size to grow by two",
        (before, after),
    )
}
