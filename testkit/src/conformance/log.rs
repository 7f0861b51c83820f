//! The conformance suite for positioned log subscriptions
//! ([`LogSubscriber`]): one set of checks every log implementation (the
//! in-memory log, Kafka) runs.
//!
//! | check | needs |
//! |---|---|
//! | [`restart_from_stored_positions`] | |
//! | [`earliest_and_latest`] | |
//! | [`timestamp_start`] | [`timestamps`](LogCapabilities::timestamps) |
//! | [`caught_up_and_end_offsets`] | |
//! | [`revoke_and_assign_across_two_members`] | [`groups`](LogCapabilities::groups) |
//!
//! Every check uses a topic and groups of its own
//! (`surety-testkit.log.<check>.<role>.<uuid v7>`), publishes in batches
//! (every send of a batch in flight before the first confirmation is
//! awaited, as users' producers do), and keeps the positions itself, as a
//! caller of the capability does: nothing is acknowledged.
//!
//! ```
//! use std::time::Duration;
//! use surety_core::memory::MemoryLog;
//! use surety_testkit::conformance::log::{LogCapabilities, log_conformance};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let caps = LogCapabilities::default().receive_timeout(Duration::from_secs(5));
//! let report = log_conformance(|| async { MemoryLog::new() }, caps).await;
//! report.assert_ok();
//! # }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use futures::StreamExt;
use surety_core::log::{LogEvent, LogOptions, LogStream, LogSubscriber, StartPosition};
use surety_core::{Close, Envelope, Publisher, Receipt};
use tokio::time::Instant;
use uuid::Uuid;

use super::{CheckFailure, CheckResult, CheckStatus, Report};

/// The `source` of every message the suite publishes.
const SOURCE: &str = "/surety-testkit/log-conformance";

/// What a log implementation declares, and the suite's limits.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LogCapabilities {
    /// Records carry the broker's timestamp and a subscription can start at
    /// a time. Default: true.
    pub timestamps: bool,
    /// Several members of one group share the partitions, with revocation
    /// before reassignment. Default: true.
    pub groups: bool,
    /// [`Assigned`](LogEvent::Assigned) reports each partition's true end
    /// offset (tansu 0.6 reports the last batch's base offset + 1). When
    /// false, only the end reported by [`CaughtUp`](LogEvent::CaughtUp) is
    /// checked. Default: true.
    pub exact_end_offsets: bool,
    /// How many messages each check publishes (spread over 16 keys).
    /// Default: 200.
    pub messages: usize,
    /// How long a check waits for any one expected event. Default: 10 s.
    pub receive_timeout: Duration,
}

impl Default for LogCapabilities {
    fn default() -> Self {
        Self {
            timestamps: true,
            groups: true,
            exact_end_offsets: true,
            messages: 200,
            receive_timeout: Duration::from_secs(10),
        }
    }
}

impl LogCapabilities {
    /// Sets [`timestamps`](Self::timestamps).
    pub fn timestamps(mut self, yes: bool) -> Self {
        self.timestamps = yes;
        self
    }

    /// Sets [`groups`](Self::groups).
    pub fn groups(mut self, yes: bool) -> Self {
        self.groups = yes;
        self
    }

    /// Sets [`exact_end_offsets`](Self::exact_end_offsets).
    pub fn exact_end_offsets(mut self, yes: bool) -> Self {
        self.exact_end_offsets = yes;
        self
    }

    /// Sets [`messages`](Self::messages) (at least 20).
    pub fn messages(mut self, n: usize) -> Self {
        self.messages = n.max(20);
        self
    }

    /// Sets [`receive_timeout`](Self::receive_timeout).
    pub fn receive_timeout(mut self, limit: Duration) -> Self {
        self.receive_timeout = limit;
        self
    }
}

#[derive(Debug, Clone, Copy)]
enum Check {
    RestartFromStoredPositions,
    EarliestAndLatest,
    TimestampStart,
    CaughtUpAndEndOffsets,
    RevokeAndAssignAcrossTwoMembers,
}

impl Check {
    const ALL: [Self; 5] = [
        Self::RestartFromStoredPositions,
        Self::EarliestAndLatest,
        Self::TimestampStart,
        Self::CaughtUpAndEndOffsets,
        Self::RevokeAndAssignAcrossTwoMembers,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::RestartFromStoredPositions => "restart_from_stored_positions",
            Self::EarliestAndLatest => "earliest_and_latest",
            Self::TimestampStart => "timestamp_start",
            Self::CaughtUpAndEndOffsets => "caught_up_and_end_offsets",
            Self::RevokeAndAssignAcrossTwoMembers => "revoke_and_assign_across_two_members",
        }
    }

    fn missing_capability(self, caps: &LogCapabilities) -> Option<&'static str> {
        match self {
            Self::TimestampStart => (!caps.timestamps).then_some("timestamps"),
            Self::RevokeAndAssignAcrossTwoMembers => (!caps.groups).then_some("groups"),
            _ => None,
        }
    }

    async fn run<T>(self, log: &T, caps: &LogCapabilities) -> CheckResult
    where
        T: Publisher + LogSubscriber,
    {
        match self {
            Self::RestartFromStoredPositions => restart_from_stored_positions(log, caps).await,
            Self::EarliestAndLatest => earliest_and_latest(log, caps).await,
            Self::TimestampStart => timestamp_start(log, caps).await,
            Self::CaughtUpAndEndOffsets => caught_up_and_end_offsets(log, caps).await,
            Self::RevokeAndAssignAcrossTwoMembers => {
                revoke_and_assign_across_two_members(log, caps).await
            }
        }
    }
}

/// Runs every check against logs made by `make` (a new one per check,
/// closed afterwards), skipping those whose capability is not declared.
pub async fn log_conformance<T, F, Fut>(make: F, caps: LogCapabilities) -> Report
where
    F: Fn() -> Fut,
    Fut: Future<Output = T>,
    T: Publisher + LogSubscriber + Close + Send + Sync + 'static,
{
    let mut report = Report::for_suite("log");
    for check in Check::ALL {
        if let Some(capability) = check.missing_capability(&caps) {
            report.push(check.name(), CheckStatus::Skipped { capability });
            continue;
        }
        tracing::info!(check = check.name(), "running log conformance check");
        let log = make().await;
        let result = check.run(&log, &caps).await;
        if tokio::time::timeout(caps.receive_timeout, log.close())
            .await
            .is_err()
        {
            tracing::warn!(
                check = check.name(),
                "closing the log after the check timed out"
            );
        }
        if let Err(failure) = &result {
            tracing::warn!(%failure, "log conformance check failed");
        }
        report.push_result(check.name(), result);
    }
    report
}

/// A unique, broker-safe name for `role` in `check`.
fn name(check: &str, role: &str) -> String {
    format!(
        "surety-testkit.log.{}.{role}.{}",
        check.replace('_', "-"),
        Uuid::now_v7()
    )
}

/// `n` envelopes over 16 keys, numbered from `from` in their subject.
fn envelopes(from: usize, n: usize) -> Vec<Envelope> {
    (from..from + n)
        .map(|i| {
            Envelope::builder(SOURCE, "log.conformance")
                .partition_key(format!("key-{}", i % 16))
                .subject(i.to_string())
                .payload(i.to_string())
                .build()
        })
        .collect()
}

/// The number a suite message carries in its subject.
fn number(envelope: &Envelope) -> Option<usize> {
    envelope.subject.as_deref()?.parse().ok()
}

/// Publishes `envelopes` as one batch: every send, then every confirmation.
async fn publish_batch<T: Publisher>(
    check: &'static str,
    log: &T,
    topic: &str,
    envelopes: Vec<Envelope>,
) -> Result<Vec<Receipt>, CheckFailure> {
    let mut pending = Vec::with_capacity(envelopes.len());
    for envelope in envelopes {
        let sent = log.send(topic, envelope).await;
        pending.push(sent.map_err(|e| CheckFailure::new(check, "send to succeed", e))?);
    }
    let mut receipts = Vec::with_capacity(pending.len());
    for confirmation in pending {
        receipts.push(
            confirmation
                .await
                .map_err(|e| CheckFailure::new(check, "the publish to be confirmed", e))?,
        );
    }
    Ok(receipts)
}

async fn subscribe<T: LogSubscriber>(
    check: &'static str,
    log: &T,
    topic: &str,
    group: &str,
    start: StartPosition,
) -> Result<LogStream, CheckFailure> {
    log.subscribe_log(topic, group, LogOptions::start(start))
        .await
        .map_err(|e| CheckFailure::new(check, "subscribe_log to succeed", e))
}

/// The next event, within `limit`.
async fn next_event(
    check: &'static str,
    stream: &mut LogStream,
    limit: Duration,
    waiting_for: &str,
) -> Result<LogEvent, CheckFailure> {
    match tokio::time::timeout(limit, stream.next()).await {
        Ok(Some(Ok(event))) => Ok(event),
        Ok(Some(Err(e))) => Err(CheckFailure::new(
            check,
            waiting_for,
            format!("an error: {e}"),
        )),
        Ok(None) => Err(CheckFailure::new(check, waiting_for, "the stream end")),
        Err(_) => Err(CheckFailure::new(
            check,
            format!("{waiting_for} within {limit:?}"),
            "nothing",
        )),
    }
}

/// One reader's view: what it owns, where it stands, what it read.
#[derive(Default)]
struct Tracker {
    /// Next offset per owned partition that has a known position.
    positions: BTreeMap<i32, i64>,
    /// Partitions owned.
    owned: BTreeSet<i32>,
    /// Partitions assigned and not yet caught up.
    behind: BTreeSet<i32>,
    /// Every suite number read, in order.
    read: Vec<usize>,
    /// End offset reported per partition by CaughtUp.
    caught_up: BTreeMap<i32, i64>,
    /// End offsets reported at assignment.
    assigned_ends: BTreeMap<i32, i64>,
}

impl Tracker {
    /// Applies one event. `stored` is the callers' checkpoint store: on
    /// assignment a partition is sought to its stored position (absent
    /// ones start where the subscription's options say); each record
    /// stores its offset + 1.
    fn apply(
        &mut self,
        check: &'static str,
        event: LogEvent,
        stored: &mut HashMap<i32, i64>,
    ) -> CheckResult {
        match event {
            LogEvent::Assigned(assignment) => {
                for p in assignment.partitions() {
                    if let Some(&at) = stored.get(&p.partition) {
                        assignment.seek(p.partition, StartPosition::Offset(at));
                        self.positions.insert(p.partition, at);
                    } else {
                        self.positions.remove(&p.partition);
                    }
                    self.owned.insert(p.partition);
                    self.behind.insert(p.partition);
                    self.assigned_ends.insert(p.partition, p.end_offset);
                }
            }
            LogEvent::Revoked(partitions) => {
                for p in partitions {
                    self.positions.remove(&p);
                    self.owned.remove(&p);
                    self.behind.remove(&p);
                }
            }
            LogEvent::Record(record) => {
                let (p, offset) = (record.partition(), record.offset());
                if !self.owned.contains(&p) {
                    return Err(CheckFailure::new(
                        check,
                        "records only of assigned partitions",
                        format!("partition {p} offset {offset}, owning {:?}", self.owned),
                    ));
                }
                if let Some(&expected) = self.positions.get(&p)
                    && offset != expected
                {
                    return Err(CheckFailure::new(
                        check,
                        format!("partition {p} to continue at offset {expected}"),
                        format!("offset {offset} (records skipped or repeated)"),
                    ));
                }
                self.positions.insert(p, offset + 1);
                stored.insert(p, offset + 1);
                match number(record.envelope()) {
                    Some(n) => self.read.push(n),
                    None => {
                        return Err(CheckFailure::new(
                            check,
                            "only the suite's messages",
                            format!("{:?}", record.envelope()),
                        ));
                    }
                }
            }
            LogEvent::CaughtUp {
                partition,
                end_offset,
            } => {
                self.behind.remove(&partition);
                self.caught_up.insert(partition, end_offset);
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether it owns partitions and every one reported caught up.
    fn settled(&self) -> bool {
        !self.owned.is_empty() && self.behind.is_empty()
    }
}

/// Reads until `done` holds, failing after `limit` without an event.
async fn read_until(
    check: &'static str,
    stream: &mut LogStream,
    tracker: &mut Tracker,
    stored: &mut HashMap<i32, i64>,
    limit: Duration,
    waiting_for: &str,
    done: impl Fn(&Tracker) -> bool,
) -> CheckResult {
    while !done(tracker) {
        let event = next_event(check, stream, limit, waiting_for).await?;
        tracker.apply(check, event, stored)?;
    }
    Ok(())
}

/// Checks that `read` holds exactly the numbers of `expected`, each once.
fn exactly(check: &'static str, read: &[usize], expected: std::ops::Range<usize>) -> CheckResult {
    let mut sorted = read.to_vec();
    sorted.sort_unstable();
    let want: Vec<usize> = expected.clone().collect();
    if sorted == want {
        return Ok(());
    }
    let seen: BTreeSet<_> = sorted.iter().copied().collect();
    let missing: Vec<_> = want.iter().filter(|n| !seen.contains(n)).take(10).collect();
    let repeated: Vec<_> = sorted
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .take(10)
        .collect();
    Err(CheckFailure::new(
        check,
        format!("messages {expected:?} each exactly once"),
        format!(
            "{} read, missing (first 10) {missing:?}, repeated (first 10) {repeated:?}",
            read.len()
        ),
    ))
}

/// A reader that handled part of the log and stopped (its stream dropped)
/// starts again from the positions it stored, after more was published: it
/// reads exactly the rest, nothing skipped or repeated.
pub async fn restart_from_stored_positions<T>(log: &T, caps: &LogCapabilities) -> CheckResult
where
    T: Publisher + LogSubscriber,
{
    const CHECK: &str = "restart_from_stored_positions";
    let (topic, group) = (name(CHECK, "topic"), name(CHECK, "group"));
    let n = caps.messages;
    publish_batch(CHECK, log, &topic, envelopes(0, n)).await?;
    let mut stored = HashMap::new();
    let mut first = Tracker::default();
    {
        let mut stream = subscribe(CHECK, log, &topic, &group, StartPosition::Earliest).await?;
        read_until(
            CHECK,
            &mut stream,
            &mut first,
            &mut stored,
            caps.receive_timeout,
            "records",
            |t| t.read.len() >= n / 3,
        )
        .await?;
    }
    // More arrive while nobody reads.
    publish_batch(CHECK, log, &topic, envelopes(n, n / 2)).await?;
    let total = n + n / 2;
    let mut second = Tracker::default();
    let mut stream = subscribe(CHECK, log, &topic, &group, StartPosition::Earliest).await?;
    let already = first.read.len();
    read_until(
        CHECK,
        &mut stream,
        &mut second,
        &mut stored,
        caps.receive_timeout,
        "the rest of the records",
        |t| already + t.read.len() >= total && t.settled(),
    )
    .await?;
    let mut all = first.read;
    all.extend(&second.read);
    exactly(CHECK, &all, 0..total)
}

/// `Earliest` reads everything retained; `Latest` reads only what is
/// published after the subscription caught up.
pub async fn earliest_and_latest<T>(log: &T, caps: &LogCapabilities) -> CheckResult
where
    T: Publisher + LogSubscriber,
{
    const CHECK: &str = "earliest_and_latest";
    let topic = name(CHECK, "topic");
    let n = caps.messages;
    publish_batch(CHECK, log, &topic, envelopes(0, n)).await?;
    let mut stored = HashMap::new();
    let mut earliest = Tracker::default();
    let early = name(CHECK, "early");
    let mut stream = subscribe(CHECK, log, &topic, &early, StartPosition::Earliest).await?;
    read_until(
        CHECK,
        &mut stream,
        &mut earliest,
        &mut stored,
        caps.receive_timeout,
        "every record",
        |t| t.read.len() >= n && t.settled(),
    )
    .await?;
    exactly(CHECK, &earliest.read, 0..n)?;
    drop(stream);

    let mut stored = HashMap::new();
    let mut latest = Tracker::default();
    let late = name(CHECK, "late");
    let mut stream = subscribe(CHECK, log, &topic, &late, StartPosition::Latest).await?;
    read_until(
        CHECK,
        &mut stream,
        &mut latest,
        &mut stored,
        caps.receive_timeout,
        "caught up at the end",
        Tracker::settled,
    )
    .await?;
    if !latest.read.is_empty() {
        return Err(CheckFailure::new(
            CHECK,
            "no record from before the subscription with Latest",
            format!("{:?}", latest.read),
        ));
    }
    publish_batch(CHECK, log, &topic, envelopes(n, 10)).await?;
    read_until(
        CHECK,
        &mut stream,
        &mut latest,
        &mut stored,
        caps.receive_timeout,
        "the records published after",
        |t| t.read.len() >= 10,
    )
    .await?;
    exactly(CHECK, &latest.read, n..n + 10)
}

/// Records carry the broker's timestamp, and a start at a time reads
/// exactly the records stored at or after it.
pub async fn timestamp_start<T>(log: &T, caps: &LogCapabilities) -> CheckResult
where
    T: Publisher + LogSubscriber,
{
    const CHECK: &str = "timestamp_start";
    let topic = name(CHECK, "topic");
    let n = caps.messages / 2;
    publish_batch(CHECK, log, &topic, envelopes(0, n)).await?;
    // Learn the broker's timestamps of the first batch.
    let mut stored = HashMap::new();
    let mut learner = Tracker::default();
    let mut latest = None;
    let learn = name(CHECK, "learn");
    let mut stream = subscribe(CHECK, log, &topic, &learn, StartPosition::Earliest).await?;
    while learner.read.len() < n {
        let event = next_event(CHECK, &mut stream, caps.receive_timeout, "the first batch").await?;
        if let LogEvent::Record(record) = &event {
            let Some(ts) = record.timestamp() else {
                return Err(CheckFailure::new(
                    CHECK,
                    "a broker timestamp on every record",
                    format!("none on offset {}", record.offset()),
                ));
            };
            latest = latest.max(Some(ts));
        }
        learner.apply(CHECK, event, &mut stored)?;
    }
    drop(stream);
    let Some(latest) = latest else {
        return Err(CheckFailure::new(CHECK, "records", "none"));
    };
    // Brokers keep milliseconds: start one past the first batch's last.
    let start = latest + TimeDelta::milliseconds(1);
    let deadline = Instant::now() + caps.receive_timeout;
    while Utc::now() <= start + TimeDelta::milliseconds(1) && Instant::now() < deadline {
        // The clock has to pass `start` before the second batch is
        // published: a few milliseconds at most.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    publish_batch(CHECK, log, &topic, envelopes(n, n)).await?;
    let mut stored = HashMap::new();
    let mut tracker = Tracker::default();
    let from_time = name(CHECK, "from-time");
    let mut stream = subscribe(
        CHECK,
        log,
        &topic,
        &from_time,
        StartPosition::Timestamp(start),
    )
    .await?;
    read_until(
        CHECK,
        &mut stream,
        &mut tracker,
        &mut stored,
        caps.receive_timeout,
        "the second batch",
        |t| t.read.len() >= n && t.settled(),
    )
    .await?;
    exactly(CHECK, &tracker.read, n..2 * n)
}

/// Each assigned partition reports its end offset at assignment and once
/// caught up, after exactly the records before that end.
pub async fn caught_up_and_end_offsets<T>(log: &T, caps: &LogCapabilities) -> CheckResult
where
    T: Publisher + LogSubscriber,
{
    const CHECK: &str = "caught_up_and_end_offsets";
    let topic = name(CHECK, "topic");
    let n = caps.messages;
    let receipts = publish_batch(CHECK, log, &topic, envelopes(0, n)).await?;
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    for r in &receipts {
        if let (Some(p), Some(o)) = (r.partition, r.offset) {
            let end = ends.entry(p).or_default();
            *end = (*end).max(o + 1);
        }
    }
    let mut stored = HashMap::new();
    let mut tracker = Tracker::default();
    let mut per_partition: BTreeMap<i32, i64> = BTreeMap::new();
    let group = name(CHECK, "group");
    let mut stream = subscribe(CHECK, log, &topic, &group, StartPosition::Earliest).await?;
    while !(tracker.read.len() >= n && tracker.settled()) {
        let event = next_event(
            CHECK,
            &mut stream,
            caps.receive_timeout,
            "records and caught-up signals",
        )
        .await?;
        match &event {
            LogEvent::Record(r) => *per_partition.entry(r.partition()).or_default() += 1,
            LogEvent::CaughtUp {
                partition,
                end_offset,
            } => {
                let read = per_partition.get(partition).copied().unwrap_or(0);
                if read != *end_offset {
                    return Err(CheckFailure::new(
                        CHECK,
                        format!(
                            "partition {partition} caught up at {end_offset} after as many records"
                        ),
                        format!("{read} records read"),
                    ));
                }
            }
            _ => {}
        }
        tracker.apply(CHECK, event, &mut stored)?;
    }
    for (p, end) in &ends {
        let assigned_ok = !caps.exact_end_offsets || tracker.assigned_ends.get(p) == Some(end);
        if !assigned_ok || tracker.caught_up.get(p) != Some(end) {
            return Err(CheckFailure::new(
                CHECK,
                format!(
                    "partition {p} to report end offset {end} at assignment and when caught up"
                ),
                format!(
                    "{:?} and {:?}",
                    tracker.assigned_ends.get(p),
                    tracker.caught_up.get(p)
                ),
            ));
        }
    }
    exactly(CHECK, &tracker.read, 0..n)
}

/// Two members of one group: the second's arrival revokes partitions from
/// the first before the second is assigned them, and positions handed over
/// through the callers' store lose and repeat nothing.
pub async fn revoke_and_assign_across_two_members<T>(log: &T, caps: &LogCapabilities) -> CheckResult
where
    T: Publisher + LogSubscriber,
{
    const CHECK: &str = "revoke_and_assign_across_two_members";
    let (topic, group) = (name(CHECK, "topic"), name(CHECK, "group"));
    let n = caps.messages;
    publish_batch(CHECK, log, &topic, envelopes(0, n)).await?;
    // One store of positions, shared as a database would be.
    let mut stored = HashMap::new();
    let mut a = Tracker::default();
    let mut stream_a = subscribe(CHECK, log, &topic, &group, StartPosition::Earliest).await?;
    read_until(
        CHECK,
        &mut stream_a,
        &mut a,
        &mut stored,
        caps.receive_timeout,
        "member A to read the first batch",
        |t| t.read.len() >= n && t.settled(),
    )
    .await?;
    let partitions = a.owned.len();
    let mut b = Tracker::default();
    let mut stream_b = subscribe(CHECK, log, &topic, &group, StartPosition::Earliest).await?;
    // Assignments and revocations of both members, in the order seen.
    let mut history: Vec<(char, String)> = Vec::new();
    let mut published_second = false;
    let deadline = Instant::now() + caps.receive_timeout * 3;
    loop {
        let split = !b.owned.is_empty() && !a.owned.is_empty();
        if (split || partitions < 2) && !published_second {
            publish_batch(CHECK, log, &topic, envelopes(n, n)).await?;
            published_second = true;
        }
        if published_second && a.read.len() + b.read.len() >= 2 * n {
            break;
        }
        if Instant::now() > deadline {
            return Err(CheckFailure::new(
                CHECK,
                "both members to share the partitions and read everything",
                format!(
                    "A owns {:?}, B owns {:?}, {} + {} read; history {history:?}",
                    a.owned,
                    b.owned,
                    a.read.len(),
                    b.read.len()
                ),
            ));
        }
        let step = tokio::time::timeout(caps.receive_timeout, async {
            tokio::select! {
                e = stream_a.next() => ('A', e),
                e = stream_b.next() => ('B', e),
            }
        })
        .await;
        let (who, event) = match step {
            Ok((who, Some(Ok(event)))) => (who, event),
            Ok((who, Some(Err(e)))) => {
                return Err(CheckFailure::new(
                    CHECK,
                    format!("member {who} to keep reading"),
                    format!("an error: {e}"),
                ));
            }
            Ok((who, None)) => {
                return Err(CheckFailure::new(
                    CHECK,
                    format!("member {who} to keep reading"),
                    "its stream end",
                ));
            }
            Err(_) => continue,
        };
        match &event {
            LogEvent::Assigned(x) => {
                history.push((who, format!("assigned {:?}", x.partition_numbers())));
                // A partition goes to one member only after the other gave
                // it up.
                let other = if who == 'A' { &b } else { &a };
                for p in x.partition_numbers() {
                    if other.owned.contains(&p) {
                        return Err(CheckFailure::new(
                            CHECK,
                            format!(
                                "partition {p} assigned to {who} only after the other member's Revoked"
                            ),
                            format!("history {history:?}"),
                        ));
                    }
                }
            }
            LogEvent::Revoked(x) => history.push((who, format!("revoked {x:?}"))),
            _ => {}
        }
        let tracker = if who == 'A' { &mut a } else { &mut b };
        tracker.apply(CHECK, event, &mut stored)?;
    }
    let a_revoked = history
        .iter()
        .any(|(w, h)| *w == 'A' && h.starts_with("revoked"));
    if partitions >= 2 && (b.read.is_empty() || !a_revoked) {
        return Err(CheckFailure::new(
            CHECK,
            "member A to give up partitions and member B to read some",
            format!("history {history:?}, B read {}", b.read.len()),
        ));
    }
    let mut all = a.read;
    all.extend(&b.read);
    exactly(CHECK, &all, 0..2 * n)
}
