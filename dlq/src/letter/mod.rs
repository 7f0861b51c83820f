//! The dead-letter envelope: a failed message with everything needed to
//! explain it and replay it.
//!
//! A [`DeadLetter`] is versioned ([`DeadLetter::VERSION`]) and serializes
//! with serde as documented in `docs/reference/dlq-envelope.md`. It maps
//! both ways to broker headers: [`DeadLetter::to_envelope`] is the original
//! envelope plus `surety-dlq-*` headers (what a DLQ topic or queue carries),
//! and [`DeadLetter::from_envelope`] reads one back, falling back to
//! RabbitMQ's `x-death` header for messages the broker dead-lettered itself.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use surety_core::{DeliveryInfo, Envelope, HandlerError, Headers};

use crate::keys;
use crate::policy::DeadLetterReason;

/// Bounds on the error text kept in a dead letter.
pub const MAX_MESSAGE_LEN: usize = 2048;
/// At most this many entries of the source chain are kept.
pub const MAX_CHAIN_LEN: usize = 16;
/// Each chain entry is cut to this many bytes.
pub const MAX_CHAIN_ENTRY_LEN: usize = 512;
/// At most this many history events are kept (the oldest are dropped).
pub const MAX_HISTORY_LEN: usize = 100;

/// Where a dead letter is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting for an operator.
    Dead,
    /// Claimed by a replay job that has not yet confirmed the publish. A
    /// job resumed after a crash publishes it again (same message id); it is
    /// never left out of a replay for good.
    Replaying,
    /// Sent back to its topic by a replay; waiting to learn how it went.
    Replayed,
    /// Failed too many replays: left out of replays by filter.
    Parked,
    /// Dropped by an operator, with a reason.
    Discarded,
    /// A replay was handled successfully.
    Resolved,
}

impl Status {
    /// Every status.
    pub const ALL: [Status; 6] = [
        Self::Dead,
        Self::Replaying,
        Self::Replayed,
        Self::Parked,
        Self::Discarded,
        Self::Resolved,
    ];

    /// The stable lower-case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Dead => "dead",
            Self::Replaying => "replaying",
            Self::Replayed => "replayed",
            Self::Parked => "parked",
            Self::Discarded => "discarded",
            Self::Resolved => "resolved",
        }
    }

    /// Parses [`as_str`](Self::as_str).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Whether the message still sits in the DLQ (counted in its depth).
    pub fn is_parked(&self) -> bool {
        matches!(self, Self::Dead | Self::Parked)
    }
}

mod failure;
mod headers;

pub(crate) use failure::hex;
pub use failure::{Failure, FailureClass, UnknownClass, fingerprint};
pub use headers::trace_id;
pub(crate) use headers::{first_failed_at, replay_count, rfc3339, strip_bookkeeping};
use headers::{from_dlq_headers, from_x_death};

/// Where the failed message was consumed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Source {
    /// The transport (`rabbitmq`, `kafka`, `memory`).
    pub system: String,
    /// The topic (or queue) it was consumed from.
    pub topic: String,
    /// The consumer group (or queue).
    pub group: String,
    /// The partition, on brokers that have them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<i32>,
    /// The offset, on brokers that have them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<i64>,
}

impl Source {
    /// A source with no partition or offset.
    pub fn new(
        system: impl Into<String>,
        topic: impl Into<String>,
        group: impl Into<String>,
    ) -> Self {
        Self {
            system: system.into(),
            topic: topic.into(),
            group: group.into(),
            partition: None,
            offset: None,
        }
    }
}

impl From<&DeliveryInfo> for Source {
    fn from(info: &DeliveryInfo) -> Self {
        Self {
            system: info.system.to_owned(),
            topic: info.topic.clone(),
            group: info.group.clone(),
            partition: info.partition,
            offset: info.offset,
        }
    }
}

/// Something that happened to a dead letter: it was dead-lettered, replayed,
/// discarded, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Event {
    /// When.
    pub at: DateTime<Utc>,
    /// Who: an operator for replays and discards, `handler@host` for
    /// dead-lettering and resolution.
    pub actor: String,
    /// What: `dead_lettered`, `replaying`, `replayed`, `replay_failed`,
    /// `discarded`, `resolved`.
    pub action: String,
    /// The operator's reason, or the error message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether the payload or headers were edited (replays).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub edited: bool,
    /// The status after the event.
    pub status: Status,
    /// The replay or discard job that acted ([`crate::job::Job`]), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
}

impl Event {
    /// An event now.
    pub fn new(actor: impl Into<String>, action: impl Into<String>, status: Status) -> Self {
        Self {
            at: Utc::now(),
            actor: actor.into(),
            action: action.into(),
            reason: None,
            edited: false,
            status,
            job: None,
        }
    }

    /// Records the job that acted.
    pub fn job(mut self, job: impl Into<String>) -> Self {
        self.job = Some(job.into());
        self
    }

    /// Sets the reason.
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// Marks the event as carrying an edit.
    pub fn edited(mut self, edited: bool) -> Self {
        self.edited = edited;
        self
    }
}

/// A dead-lettered message: the original envelope, the failure, where and
/// when it happened, and what has been done about it since.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Format version, [`DeadLetter::VERSION`].
    pub version: u32,
    /// Stable id: the same message failing in the same handler always gets
    /// the same id ([`DeadLetter::id_for`]).
    pub id: String,
    /// The message as its producer published it: id, key, payload and
    /// headers unchanged, minus the retry bookkeeping headers Surety added on
    /// the way ([`keys::is_bookkeeping`]), which live in the fields below.
    pub envelope: Envelope,
    /// The failure.
    pub error: Failure,
    /// How many attempts were made.
    pub attempts: u32,
    /// When the first attempt failed.
    pub first_failed_at: DateTime<Utc>,
    /// When the last attempt failed.
    pub last_failed_at: DateTime<Utc>,
    /// When it was dead-lettered.
    pub dead_lettered_at: DateTime<Utc>,
    /// Where it was consumed.
    pub source: Source,
    /// The handler that failed.
    pub handler: String,
    /// The host the handler ran on.
    pub host: String,
    /// The trace id of the message (from its `traceparent`), to find the
    /// failed processing in the tracing backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Grouping key: a hash of the handler, the class and the normalized
    /// error message ([`fingerprint`]).
    pub fingerprint: String,
    /// How many times it has been replayed.
    pub replay_count: u32,
    /// Where it is in its life.
    pub status: Status,
    /// What happened to it, oldest first (bounded, [`MAX_HISTORY_LEN`]).
    #[serde(default)]
    pub history: Vec<Event>,
}

/// A header could not be read back into a [`DeadLetter`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a dead letter: {0}")]
pub struct LetterError(pub String);

impl DeadLetter {
    /// The current format version.
    pub const VERSION: u32 = 1;

    /// The stable id of `envelope` failing in `handler`: a hash of the
    /// handler, the envelope's source and its id.
    pub fn id_for(handler: &str, envelope: &Envelope) -> String {
        let mut hash = Sha256::new();
        for part in [handler, &envelope.source, &envelope.id] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part.as_bytes());
        }
        hex(&hash.finalize()[..16])
    }

    /// A dead letter for a message that failed in `handler`.
    ///
    /// `envelope` is the message as delivered; its retry bookkeeping
    /// headers are read (`surety-first-failed-at`, `surety-replay-count`)
    /// and removed.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        envelope: &Envelope,
        info: &DeliveryInfo,
        error: &HandlerError,
        reason: DeadLetterReason,
        attempts: u32,
        handler: &str,
        host: &str,
    ) -> Self {
        let now = Utc::now();
        let first_failed_at = first_failed_at(envelope).unwrap_or(now).min(now);
        let id = Self::id_for(handler, envelope);
        // A replayed copy fans out to every group of its topic; its replay
        // count belongs to the dead letter it was replayed from only.
        let replay_count = if envelope.headers.get(keys::DLQ_ID) == Some(id.as_str()) {
            replay_count(envelope)
        } else {
            0
        };
        let failure = Failure::from_error(error, reason);
        let fingerprint = fingerprint(handler, failure.class.as_str(), &failure.message);
        let actor = format!("{handler}@{host}");
        let event =
            Event::new(actor, "dead_lettered", Status::Dead).reason(failure.message.clone());
        Self {
            version: Self::VERSION,
            id,
            trace_id: envelope.headers.traceparent().and_then(trace_id),
            envelope: strip_bookkeeping(envelope),
            error: failure,
            attempts: attempts.max(1),
            first_failed_at,
            last_failed_at: now,
            dead_lettered_at: now,
            source: Source::from(info),
            handler: handler.to_owned(),
            host: host.to_owned(),
            fingerprint,
            replay_count,
            status: Status::Dead,
            history: vec![event],
        }
    }

    /// Sets the status (and that of the last history event).
    pub fn with_status(mut self, status: Status) -> Self {
        self.status = status;
        if let Some(last) = self.history.last_mut() {
            last.status = status;
        }
        self
    }

    /// The `surety-dlq-*` headers (plus core's `surety-error-class` and
    /// `surety-error-message`) describing this dead letter.
    pub fn to_headers(&self) -> Headers {
        let mut h = Headers::new();
        h.set_parsed(keys::DLQ_VERSION, self.version);
        h.insert(keys::DLQ_ID, self.id.clone());
        h.insert(keys::ERROR_CLASS, self.error.class.as_str());
        h.insert(keys::ERROR_MESSAGE, self.error.message.clone());
        h.insert(keys::DLQ_REASON, self.error.reason.as_str());
        h.insert(
            keys::DLQ_ERROR_CHAIN,
            serde_json::to_string(&self.error.chain).unwrap_or_default(),
        );
        h.set_parsed(keys::DLQ_ATTEMPTS, self.attempts);
        h.insert(keys::DLQ_FIRST_FAILED_AT, rfc3339(self.first_failed_at));
        h.insert(keys::DLQ_LAST_FAILED_AT, rfc3339(self.last_failed_at));
        h.insert(keys::DLQ_DEAD_LETTERED_AT, rfc3339(self.dead_lettered_at));
        h.insert(keys::DLQ_SOURCE_SYSTEM, self.source.system.clone());
        h.insert(keys::DLQ_SOURCE_TOPIC, self.source.topic.clone());
        h.insert(keys::DLQ_SOURCE_GROUP, self.source.group.clone());
        if let Some(p) = self.source.partition {
            h.set_parsed(keys::DLQ_SOURCE_PARTITION, p);
        }
        if let Some(o) = self.source.offset {
            h.set_parsed(keys::DLQ_SOURCE_OFFSET, o);
        }
        h.insert(keys::DLQ_HANDLER, self.handler.clone());
        h.insert(keys::DLQ_HOST, self.host.clone());
        if let Some(t) = &self.trace_id {
            h.insert(keys::DLQ_TRACE_ID, t.clone());
        }
        h.insert(keys::DLQ_FINGERPRINT, self.fingerprint.clone());
        h.set_parsed(keys::DLQ_REPLAY_COUNT, self.replay_count);
        h
    }

    /// The message for a DLQ topic or queue: the original envelope (same id,
    /// key and payload) with [`to_headers`](Self::to_headers) added.
    pub fn to_envelope(&self) -> Envelope {
        let mut env = self.envelope.clone();
        env.headers.extend(self.to_headers());
        env
    }

    /// Reads a dead letter back from a message on a DLQ topic or queue.
    ///
    /// Messages written by [`to_envelope`](Self::to_envelope) round-trip
    /// (history aside, which headers do not carry). A message without
    /// `surety-dlq-*` headers but with RabbitMQ's `x-death` header (as a
    /// JSON string, see `docs/reference/dlq-envelope.md`) becomes a dead
    /// letter of class `unknown` and reason `broker`, with the queue, count
    /// and time from its most recent death. Anything else is an error.
    pub fn from_envelope(env: &Envelope) -> Result<Self, LetterError> {
        if env.headers.contains(keys::DLQ_ID) {
            return from_dlq_headers(env);
        }
        if let Some(x_death) = env.headers.get(keys::X_DEATH) {
            return from_x_death(env, x_death);
        }
        Err(LetterError(format!(
            "neither `{}` nor `{}` is present",
            keys::DLQ_ID,
            keys::X_DEATH
        )))
    }

    /// Appends `event`, keeping at most [`MAX_HISTORY_LEN`] events.
    pub fn push_event(&mut self, event: Event) {
        self.history.push(event);
        if self.history.len() > MAX_HISTORY_LEN {
            let excess = self.history.len() - MAX_HISTORY_LEN;
            self.history.drain(..excess);
        }
    }

    /// Merges `newer`, a later dead-lettering of the same message, into
    /// `self` (as stores do when the same id is put again): the newer
    /// failure, times, source and status win; the first failure time is the
    /// earliest; the replay count is the larger; histories are concatenated.
    pub fn merge(&mut self, newer: DeadLetter) {
        let mut history = std::mem::take(&mut self.history);
        let first = self.first_failed_at.min(newer.first_failed_at);
        let replays = self.replay_count.max(newer.replay_count);
        let new_events = newer.history.clone();
        *self = newer;
        self.first_failed_at = first;
        self.replay_count = replays;
        history.extend(new_events);
        self.history = Vec::new();
        for event in history {
            self.push_event(event);
        }
    }

    /// Lower-cased text that the `text` filter searches: error message,
    /// message id, type, subject, partition key, handler, fingerprint.
    pub fn search_text(&self) -> String {
        let env = &self.envelope;
        let parts = [
            Some(self.error.message.as_str()),
            Some(env.id.as_str()),
            Some(env.event_type.as_str()),
            env.subject.as_deref(),
            env.partition_key.as_deref(),
            Some(self.handler.as_str()),
            Some(self.fingerprint.as_str()),
        ];
        parts
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join("\n")
            .to_lowercase()
    }
}

#[cfg(test)]
mod tests {
    use super::failure::normalize;
    use super::*;
    use surety_core::{Permanent, TransportError, TransportErrorKind};

    fn letter() -> DeadLetter {
        let mut env = Envelope::builder("/orders", "order.placed")
            .partition_key("o-1")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .header("x-tenant", "acme")
            .payload("{}")
            .build();
        env.headers.set_attempt(3);
        env.headers
            .insert(keys::FIRST_FAILED_AT, "2024-01-01T00:00:00Z");
        let mut info = DeliveryInfo::new("kafka", "orders", "billing");
        info.partition = Some(2);
        info.offset = Some(42);
        let inner = std::io::Error::other("connection refused");
        let err = HandlerError::new(
            TransportError::new(TransportErrorKind::Connection, "db down").with_source(inner),
        );
        DeadLetter::new(
            &env,
            &info,
            &err,
            DeadLetterReason::AttemptsExhausted,
            3,
            "billing",
            "host-1",
        )
    }

    #[test]
    fn captures_the_failure_and_strips_bookkeeping() {
        let l = letter();
        assert_eq!(l.error.class, "transient");
        assert_eq!(
            l.error.chain,
            ["db down (connection)", "connection refused"]
        );
        assert_eq!(l.error.message, "db down (connection): connection refused");
        assert_eq!(
            l.trace_id.as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(l.first_failed_at.to_rfc3339(), "2024-01-01T00:00:00+00:00");
        assert_eq!(l.envelope.headers.get("x-tenant"), Some("acme"));
        assert!(!l.envelope.headers.contains(keys::ATTEMPT));
        assert!(!l.envelope.headers.contains(keys::FIRST_FAILED_AT));
        assert_eq!(l.source.partition, Some(2));
        assert_eq!(l.id.len(), 32);
    }

    #[test]
    fn headers_round_trip() {
        let l = letter();
        let back = DeadLetter::from_envelope(&l.to_envelope()).unwrap();
        let mut expected = l.clone();
        expected.history.clear();
        let mut back_cmp = back;
        // Headers carry microsecond times.
        back_cmp.first_failed_at = expected.first_failed_at;
        back_cmp.last_failed_at = expected.last_failed_at;
        back_cmp.dead_lettered_at = expected.dead_lettered_at;
        assert_eq!(back_cmp, expected);
    }

    #[test]
    fn x_death_is_read_when_there_are_no_dlq_headers() {
        let env = Envelope::builder("/orders", "order.placed")
            .header(
                keys::X_DEATH,
                r#"[{"count":3,"reason":"rejected","queue":"orders.billing","time":1700000000,"exchange":"surety","routing-keys":["orders"]}]"#,
            )
            .build();
        let l = DeadLetter::from_envelope(&env).unwrap();
        assert_eq!(l.error.reason, DeadLetterReason::Broker);
        assert_eq!(l.attempts, 3);
        assert_eq!(l.source.group, "orders.billing");
        assert_eq!(l.source.topic, "orders");
        assert_eq!(l.last_failed_at.timestamp(), 1_700_000_000);
        assert!(!l.envelope.headers.contains(keys::X_DEATH));
        assert!(DeadLetter::from_envelope(&Envelope::builder("/s", "t").build()).is_err());
        let bad = Envelope::builder("/s", "t")
            .header(keys::X_DEATH, "nope")
            .build();
        assert!(DeadLetter::from_envelope(&bad).is_err());
    }

    #[test]
    fn fingerprints_group_messages_that_differ_in_ids() {
        let a = fingerprint(
            "h",
            "permanent",
            "order 123e4567-e89b-12d3-a456-426614174000 has quantity 0",
        );
        let b = fingerprint(
            "h",
            "permanent",
            "Order 987e4567-e89b-12d3-a456-426614174999 has quantity 0",
        );
        let c = fingerprint("h", "permanent", "order x has no customer");
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(
            a,
            fingerprint("other", "permanent", "order 1 has quantity 0")
        );
        assert_eq!(normalize("Deadline 42ms exceeded"), "deadline #ms exceeded");
    }

    #[test]
    fn chains_are_bounded() {
        #[derive(Debug)]
        struct Deep(u32);
        impl std::fmt::Display for Deep {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "level {} {}", self.0, "x".repeat(1000))
            }
        }
        impl std::error::Error for Deep {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                None
            }
        }
        let err = HandlerError::new(Permanent::new(Deep(1)));
        let f = Failure::from_error(&err, DeadLetterReason::NotRetryable);
        assert!(f.chain.iter().all(|e| e.len() <= MAX_CHAIN_ENTRY_LEN));
        assert!(f.message.len() <= MAX_MESSAGE_LEN);
    }

    #[test]
    fn malformed_traceparents_have_no_trace_id() {
        assert_eq!(trace_id("garbage"), None);
        assert_eq!(
            trace_id("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
    }
}
