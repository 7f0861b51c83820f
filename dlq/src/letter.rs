//! The dead-letter envelope: a failed message with everything needed to
//! explain it and replay it.
//!
//! A [`DeadLetter`] is versioned ([`DeadLetter::VERSION`]) and serializes
//! with serde as documented in `docs/reference/dlq-envelope.md`. It maps
//! both ways to broker headers: [`DeadLetter::to_envelope`] is the original
//! envelope plus `surety-dlq-*` headers (what a DLQ topic or queue carries),
//! and [`DeadLetter::from_envelope`] reads one back, falling back to
//! RabbitMQ's `x-death` header for messages the broker dead-lettered itself.

use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use surety_core::{DeliveryInfo, Envelope, ErrorClass, HandlerError, Headers};

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

/// The class of the failure that dead-lettered a message: core's
/// `ErrorClass` (from `surety_core`) without its retry hint, or
/// `Unknown` for a message the broker dead-lettered on its own. Stored and
/// shown by its lower-case name.
///
/// ```
/// use surety_core::ErrorClass;
/// use surety_dlq::FailureClass;
///
/// assert_eq!(FailureClass::from(ErrorClass::TRANSIENT), FailureClass::Transient);
/// assert_eq!("poison".parse::<FailureClass>(), Ok(FailureClass::Poison));
/// assert!("fatal".parse::<FailureClass>().is_err());
/// assert_eq!(FailureClass::Permanent, "permanent");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureClass {
    /// Retrying might have helped; the attempts ran out.
    Transient,
    /// The message can never be handled as it is.
    Permanent,
    /// The message could not be decoded.
    Poison,
    /// The broker dead-lettered the message (a delivery limit, a TTL); the
    /// handler's verdict is not known.
    Unknown,
}

impl FailureClass {
    /// Every class, in order.
    pub const ALL: [Self; 4] = [
        Self::Transient,
        Self::Permanent,
        Self::Poison,
        Self::Unknown,
    ];

    /// The lower-case name: `transient`, `permanent`, `poison`, `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transient => "transient",
            Self::Permanent => "permanent",
            Self::Poison => "poison",
            Self::Unknown => "unknown",
        }
    }
}

impl From<surety_core::ErrorClass> for FailureClass {
    fn from(class: surety_core::ErrorClass) -> Self {
        match class {
            surety_core::ErrorClass::Transient { .. } => Self::Transient,
            surety_core::ErrorClass::Permanent => Self::Permanent,
            surety_core::ErrorClass::Poison => Self::Poison,
        }
    }
}

impl std::fmt::Display for FailureClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a [`FailureClass`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown class {0:?}; expected one of transient, permanent, poison, unknown")]
pub struct UnknownClass(pub String);

impl std::str::FromStr for FailureClass {
    type Err = UnknownClass;

    fn from_str(name: &str) -> Result<Self, UnknownClass> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == name)
            .ok_or_else(|| UnknownClass(name.to_owned()))
    }
}

impl PartialEq<str> for FailureClass {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for FailureClass {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// The failure that dead-lettered a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Failure {
    /// The class of the failure.
    pub class: FailureClass,
    /// Why the message was dead-lettered.
    pub reason: DeadLetterReason,
    /// The error message with its source chain, bounded
    /// ([`MAX_MESSAGE_LEN`]).
    pub message: String,
    /// The error and its sources, outermost first, bounded
    /// ([`MAX_CHAIN_LEN`] entries of [`MAX_CHAIN_ENTRY_LEN`] bytes).
    pub chain: Vec<String>,
}

impl Failure {
    /// The failure of `error`, dead-lettered for `reason`.
    pub fn from_error(error: &HandlerError, reason: DeadLetterReason) -> Self {
        let mut chain = Vec::new();
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error.inner());
        while let Some(err) = next {
            if chain.len() == MAX_CHAIN_LEN {
                break;
            }
            chain.push(truncate(err.to_string(), MAX_CHAIN_ENTRY_LEN));
            next = err.source();
        }
        Self {
            class: surety_core::Classify::class(error).into(),
            reason,
            message: error.chain_message(MAX_MESSAGE_LEN),
            chain,
        }
    }
}

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

fn from_dlq_headers(env: &Envelope) -> Result<DeadLetter, LetterError> {
    let h = &env.headers;
    let text = |key: &str| h.get(key).map(str::to_owned);
    let required = |key: &str| text(key).ok_or_else(|| LetterError(format!("`{key}` is missing")));
    let number = |key: &str| -> Result<Option<i64>, LetterError> {
        h.parsed::<i64>(key).map_err(|e| LetterError(e.to_string()))
    };
    let time = |key: &str| -> Result<Option<DateTime<Utc>>, LetterError> {
        h.get(key)
            .map(|v| {
                DateTime::parse_from_rfc3339(v)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|e| LetterError(format!("`{key}`: {e}")))
            })
            .transpose()
    };
    let version = number(keys::DLQ_VERSION)?.unwrap_or(1);
    if version != i64::from(DeadLetter::VERSION) {
        return Err(LetterError(format!("unsupported version {version}")));
    }
    let now = Utc::now();
    let reason = h
        .get(keys::DLQ_REASON)
        .and_then(DeadLetterReason::from_name)
        .unwrap_or(DeadLetterReason::NotRetryable);
    let chain = h
        .get(keys::DLQ_ERROR_CHAIN)
        .and_then(|v| serde_json::from_str::<Vec<String>>(v).ok())
        .unwrap_or_default();
    let last_failed_at = time(keys::DLQ_LAST_FAILED_AT)?.unwrap_or(now);
    let replay_count = number(keys::DLQ_REPLAY_COUNT)?.unwrap_or(0);
    Ok(DeadLetter {
        version: DeadLetter::VERSION,
        id: required(keys::DLQ_ID)?,
        envelope: strip_bookkeeping(env),
        error: Failure {
            class: text(keys::ERROR_CLASS)
                .and_then(|name| name.parse().ok())
                .unwrap_or(FailureClass::Unknown),
            reason,
            message: text(keys::ERROR_MESSAGE).unwrap_or_default(),
            chain,
        },
        attempts: u32::try_from(number(keys::DLQ_ATTEMPTS)?.unwrap_or(1)).unwrap_or(1),
        first_failed_at: time(keys::DLQ_FIRST_FAILED_AT)?.unwrap_or(last_failed_at),
        last_failed_at,
        dead_lettered_at: time(keys::DLQ_DEAD_LETTERED_AT)?.unwrap_or(last_failed_at),
        source: Source {
            system: text(keys::DLQ_SOURCE_SYSTEM).unwrap_or_default(),
            topic: text(keys::DLQ_SOURCE_TOPIC).unwrap_or_default(),
            group: text(keys::DLQ_SOURCE_GROUP).unwrap_or_default(),
            partition: number(keys::DLQ_SOURCE_PARTITION)?.and_then(|p| i32::try_from(p).ok()),
            offset: number(keys::DLQ_SOURCE_OFFSET)?,
        },
        handler: text(keys::DLQ_HANDLER).unwrap_or_default(),
        host: text(keys::DLQ_HOST).unwrap_or_default(),
        trace_id: text(keys::DLQ_TRACE_ID),
        fingerprint: text(keys::DLQ_FINGERPRINT).unwrap_or_default(),
        replay_count: u32::try_from(replay_count).unwrap_or(0),
        status: Status::Dead,
        history: Vec::new(),
    })
}

fn from_x_death(env: &Envelope, x_death: &str) -> Result<DeadLetter, LetterError> {
    let value: serde_json::Value = serde_json::from_str(x_death)
        .map_err(|e| LetterError(format!("`{}` is not JSON: {e}", keys::X_DEATH)))?;
    let latest = match &value {
        serde_json::Value::Array(deaths) => deaths.first(),
        obj @ serde_json::Value::Object(_) => Some(obj),
        _ => None,
    }
    .ok_or_else(|| LetterError(format!("`{}` holds no death", keys::X_DEATH)))?;
    let field = |name: &str| latest.get(name);
    let queue = field("queue").and_then(|v| v.as_str()).unwrap_or_default();
    let why = field("reason")
        .and_then(|v| v.as_str())
        .unwrap_or("unknown");
    let count = field("count").and_then(|v| v.as_u64()).unwrap_or(1);
    let routing_key = field("routing-keys")
        .and_then(|v| v.as_array())
        .and_then(|keys| keys.first())
        .and_then(|k| k.as_str())
        .unwrap_or(queue);
    let time = field("time").and_then(|t| match t {
        serde_json::Value::Number(n) => n.as_i64().and_then(|s| DateTime::from_timestamp(s, 0)),
        serde_json::Value::String(s) => DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.with_timezone(&Utc)),
        _ => None,
    });
    let at = time.unwrap_or_else(Utc::now);
    let handler = "rabbitmq".to_owned();
    let message = format!("RabbitMQ dead-lettered the message from queue `{queue}`: {why}");
    let mut envelope = strip_bookkeeping(env);
    envelope.headers.remove(keys::X_DEATH);
    Ok(DeadLetter {
        version: DeadLetter::VERSION,
        id: DeadLetter::id_for(&format!("rabbitmq:{queue}"), env),
        trace_id: env.headers.traceparent().and_then(trace_id),
        envelope,
        fingerprint: fingerprint(&handler, "unknown", &message),
        error: Failure {
            class: FailureClass::Unknown,
            reason: DeadLetterReason::Broker,
            chain: vec![message.clone()],
            message,
        },
        attempts: u32::try_from(count).unwrap_or(u32::MAX).max(1),
        first_failed_at: at,
        last_failed_at: at,
        dead_lettered_at: at,
        source: Source::new("rabbitmq", routing_key, queue),
        handler,
        host: String::new(),
        replay_count: 0,
        status: Status::Dead,
        history: Vec::new(),
    })
}

/// The envelope without Surety's retry and dead-letter bookkeeping headers.
pub(crate) fn strip_bookkeeping(env: &Envelope) -> Envelope {
    let mut env = env.clone();
    let keys_to_remove: Vec<String> = env
        .headers
        .iter()
        .filter(|(k, _)| keys::is_bookkeeping(k))
        .map(|(k, _)| k.to_owned())
        .collect();
    for key in keys_to_remove {
        env.headers.remove(&key);
    }
    env
}

/// The first failure time carried by a delayed-retry copy.
pub(crate) fn first_failed_at(env: &Envelope) -> Option<DateTime<Utc>> {
    env.headers
        .get(keys::FIRST_FAILED_AT)
        .and_then(|v| DateTime::parse_from_rfc3339(v).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// The replay count carried by a replayed copy (0 when absent or invalid).
pub(crate) fn replay_count(env: &Envelope) -> u32 {
    env.headers
        .parsed::<u32>(keys::REPLAY_COUNT)
        .ok()
        .flatten()
        .unwrap_or(0)
}

/// RFC 3339 with microseconds, UTC.
pub(crate) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The trace id of a W3C `traceparent` (`00-{trace id}-{span id}-{flags}`),
/// if it is well formed and not all zeros.
pub fn trace_id(traceparent: &str) -> Option<String> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span) = (parts.next()?, parts.next()?, parts.next()?);
    let flags = parts.next()?;
    let hex_of = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = hex_of(version, 2)
        && version != "ff"
        && hex_of(trace, 32)
        && hex_of(span, 16)
        && hex_of(flags, 2)
        && trace.bytes().any(|b| b != b'0');
    valid.then(|| trace.to_ascii_lowercase())
}

/// The grouping fingerprint of a failure: the first 16 hex digits of a
/// SHA-256 over the handler, the class and the normalized message (lower
/// case, every number, UUID or hash replaced by `#`), so failures that
/// differ only in ids and numbers group together.
pub fn fingerprint(handler: &str, class: &str, message: &str) -> String {
    let mut hash = Sha256::new();
    for part in [handler, class, &normalize(message)] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    hex(&hash.finalize()[..8])
}

/// Lower-cases `message` and replaces every run of hex digits and dashes
/// that contains a decimal digit (numbers, UUIDs, hashes) with `#`.
pub(crate) fn normalize(message: &str) -> String {
    let lower = message.to_lowercase();
    let mut out = String::with_capacity(lower.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.bytes().any(|b| b.is_ascii_digit()) {
            out.push('#');
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in lower.chars() {
        if c.is_ascii_hexdigit() || c == '-' {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

pub(crate) fn truncate(mut s: String, max_len: usize) -> String {
    if s.len() > max_len {
        let mut end = max_len;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// The host name: `HOSTNAME`, else the kernel's host name, else `unknown`.
pub(crate) fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

impl From<ErrorClass> for Failure {
    /// A failure of `class` with no message, for tests and imports.
    fn from(class: ErrorClass) -> Self {
        Self {
            class: class.into(),
            reason: if class.is_retryable() {
                DeadLetterReason::AttemptsExhausted
            } else {
                DeadLetterReason::NotRetryable
            },
            message: String::new(),
            chain: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
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
