//! Where outbox rows live: the [`OutboxStore`] port the relay reads through,
//! and its SQLite and PostgreSQL implementations.
//!
//! Both backends share one schema (`surety_outbox`, `surety_outbox_relay`,
//! created by their `migrate`) and the same statements. Row times are Unix
//! milliseconds from the clock of the process that writes them; the lease
//! runs on the database's clock (see [`Lease`]).

use std::future::Future;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
use std::time::UNIX_EPOCH;
use std::time::{Duration, SystemTime};

use surety_core::Envelope;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
use surety_core::Headers;

use crate::error::OutboxError;

#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql;
#[cfg(feature = "sqlite")]
pub mod sqlite;

/// One pending outbox row, as the relay reads it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OutboxRow {
    /// The row's position in the outbox: rows are relayed in this order.
    pub seq: i64,
    /// Where the message goes.
    pub topic: String,
    /// The message's partition key: rows with the same key keep their order.
    pub partition_key: Option<String>,
    /// Failed publish attempts so far.
    pub attempts: u32,
    /// When the row may be published (again).
    pub next_attempt_at: SystemTime,
    /// The message, or why the stored row cannot be read back as one (the
    /// relay parks such a row).
    pub message: Result<Envelope, String>,
}

impl OutboxRow {
    /// A row as a store read it (for stores outside this crate).
    pub fn new(
        seq: i64,
        topic: String,
        partition_key: Option<String>,
        attempts: u32,
        next_attempt_at: SystemTime,
        message: Result<Envelope, String>,
    ) -> Self {
        Self {
            seq,
            topic,
            partition_key,
            attempts,
            next_attempt_at,
            message,
        }
    }

    /// Whether the row may be published at `now`.
    pub fn is_due(&self, now: SystemTime) -> bool {
        self.next_attempt_at <= now
    }
}

/// How much the relay has left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Backlog {
    /// Rows waiting to be published.
    pub pending: u64,
    /// Rows set aside after a permanent failure, waiting for an operator.
    pub parked: u64,
    /// Age of the oldest pending row.
    pub oldest_pending: Option<Duration>,
}

/// A relay instance's lease, as the database granted it.
///
/// The lease of a relay name is one row: holder, expiry and *epoch*. The
/// expiry is computed with the database's clock (PostgreSQL's
/// `clock_timestamp()`, the clock of the machine that runs SQLite), so
/// relays whose own clocks disagree still agree on when it runs out. Every
/// takeover raises the epoch, and the relay's writes
/// ([`mark_sent`](OutboxStore::mark_sent), [`retry_later`](OutboxStore::retry_later),
/// [`park`](OutboxStore::park)) carry the lease they were made under: the
/// statement changes nothing unless the lease row still names that holder
/// at that epoch. A holder that stalled past its lease, or whose clock is
/// wrong, can no longer mark anything once another instance took over.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lease {
    /// The relay name the lease is for.
    pub relay: String,
    /// The holder identity that has it.
    pub holder: String,
    /// Raised by every takeover; writes under an older epoch are fenced.
    pub epoch: i64,
    /// How long the lease runs from when the database granted it.
    pub remaining: Duration,
}

impl Lease {
    /// A lease as a store granted it (for stores outside this crate).
    pub fn new(relay: String, holder: String, epoch: i64, remaining: Duration) -> Self {
        Self {
            relay,
            holder,
            epoch,
            remaining,
        }
    }
}

/// Rows one mark statement covers at most (the relay marks in smaller
/// groups as confirmations arrive).
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) const MARK_CHUNK: usize = 1000;

/// The storage port of the outbox relay.
///
/// Implemented by [`SqliteOutbox`](crate::SqliteOutbox) and
/// [`PostgresOutbox`](crate::PostgresOutbox); messages are written with
/// their `enqueue`, inside the caller's transaction.
pub trait OutboxStore: Clone + Send + Sync + 'static {
    /// Up to `limit` pending rows that may be published now, in `seq`
    /// order: due, and not behind an earlier row of their key that waits
    /// for its retry.
    fn pending(
        &self,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<OutboxRow>, OutboxError>> + Send;

    /// Marks the rows `seqs` sent (the broker confirmed them), if `lease`
    /// is still the relay's current lease; returns how many rows it marked.
    /// Fenced (the lease row names another holder or a later epoch), it
    /// marks nothing and returns 0.
    fn mark_sent(
        &self,
        lease: &Lease,
        seqs: &[i64],
    ) -> impl Future<Output = Result<u64, OutboxError>> + Send;

    /// Records a failed attempt of row `seq` and when to try it again
    /// (nothing when `lease` is fenced).
    fn retry_later(
        &self,
        lease: &Lease,
        seq: i64,
        error: &str,
        at: SystemTime,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send;

    /// Sets row `seq` aside after a failure that retrying cannot fix
    /// (nothing when `lease` is fenced).
    fn park(
        &self,
        lease: &Lease,
        seq: i64,
        error: &str,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send;

    /// Takes or renews the lease of relay `relay` for `holder`, for `lease`
    /// from now by the database's clock; `None` while another holder's
    /// lease runs.
    ///
    /// `held_epoch` is the epoch this instance last held (`None` for an
    /// instance that never held the lease). With the same holder and epoch
    /// the lease is renewed and keeps its epoch. A fresh instance
    /// (`held_epoch` `None`) with the holder identity of the current lease
    /// takes it at once: it is the same relay restarted, and its dead
    /// predecessor is fenced. An instance whose epoch has moved on takes it
    /// only once it has expired. Every takeover raises the epoch.
    fn acquire_lease(
        &self,
        relay: &str,
        holder: &str,
        held_epoch: Option<i64>,
        lease: Duration,
    ) -> impl Future<Output = Result<Option<Lease>, OutboxError>> + Send;

    /// Gives the lease up at once, if it is still `lease` (the epoch is
    /// kept, so the next holder's is higher).
    fn release_lease(&self, lease: &Lease) -> impl Future<Output = Result<(), OutboxError>> + Send;

    /// Pending and parked counts, and the oldest pending row's age.
    fn backlog(&self) -> impl Future<Output = Result<Backlog, OutboxError>> + Send;

    /// Puts every parked row back to pending with its attempts reset (an
    /// operator action, once the cause is fixed); returns how many.
    fn requeue_parked(&self) -> impl Future<Output = Result<u64, OutboxError>> + Send;

    /// Deletes up to `limit` rows sent before `older_than` ago; returns how
    /// many.
    fn purge_sent(
        &self,
        older_than: Duration,
        limit: u64,
    ) -> impl Future<Output = Result<u64, OutboxError>> + Send;
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
/// What `enqueue` writes for one message: the envelope in binary mode
/// (CloudEvents headers plus the payload), with the current trace context
/// when the envelope carries none.
pub(crate) struct NewRow {
    pub(crate) message_id: String,
    pub(crate) partition_key: Option<String>,
    pub(crate) headers: String,
    pub(crate) payload: Vec<u8>,
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
impl NewRow {
    pub(crate) fn new(topic: &str, envelope: &Envelope) -> Result<Self, OutboxError> {
        if topic.is_empty() {
            return Err(OutboxError::InvalidMessage("the topic is empty".into()));
        }
        let (mut headers, payload) = envelope.to_binary();
        if headers
            .get(surety_core::headers::keys::TRACEPARENT)
            .is_none()
        {
            surety_core::trace::inject_current(&mut headers);
        }
        let headers = serde_json::to_string(&headers)
            .map_err(|err| OutboxError::InvalidMessage(format!("headers: {err}")))?;
        Ok(Self {
            message_id: envelope.id.clone(),
            partition_key: envelope.partition_key.clone(),
            headers,
            payload: payload.to_vec(),
        })
    }
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
/// Reads a stored row's message back.
pub(crate) fn decode_message(headers: &str, payload: Vec<u8>) -> Result<Envelope, String> {
    let headers: Headers =
        serde_json::from_str(headers).map_err(|err| format!("stored headers: {err}"))?;
    Envelope::from_binary(headers, payload.into()).map_err(|err| format!("stored message: {err}"))
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
/// `time` in Unix milliseconds (0 before the epoch, saturated far after).
pub(crate) fn to_millis(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
/// Unix milliseconds as a time (negative values as the epoch).
pub(crate) fn from_millis(millis: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(millis).unwrap_or(0))
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
/// A duration in milliseconds, saturated.
pub(crate) fn duration_millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(all(test, any(feature = "sqlite", feature = "postgres")))]
mod tests {
    use super::*;

    #[test]
    fn millis_round_trip_and_saturate() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(from_millis(to_millis(t)), t);
        assert_eq!(to_millis(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert_eq!(from_millis(-5), UNIX_EPOCH);
        assert_eq!(duration_millis(Duration::MAX), i64::MAX);
    }

    #[test]
    fn a_row_reads_back_as_the_same_message() {
        let envelope = Envelope::builder("/shop", "order.placed")
            .partition_key("o-1")
            .correlation_id("c-1")
            .header("tenant", "acme")
            .payload(r#"{"id":"o-1"}"#)
            .build();
        let row = NewRow::new("orders", &envelope).unwrap();
        assert_eq!(row.partition_key.as_deref(), Some("o-1"));
        let back = decode_message(&row.headers, row.payload).unwrap();
        assert_eq!(back, envelope);
    }

    #[test]
    fn an_empty_topic_or_a_corrupt_row_is_a_typed_error() {
        let envelope = Envelope::builder("/shop", "order.placed").build();
        assert!(matches!(
            NewRow::new("", &envelope),
            Err(OutboxError::InvalidMessage(_))
        ));
        let err = decode_message("{not json", Vec::new()).unwrap_err();
        assert!(err.contains("stored headers"), "{err}");
        let err = decode_message("{}", Vec::new()).unwrap_err();
        assert!(err.contains("stored message"), "{err}");
    }
}
