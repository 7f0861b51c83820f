//! A dead letter in broker headers and back: `surety-dlq-*` headers, RabbitMQ's `x-death`.

use crate::keys;
use crate::policy::DeadLetterReason;
use chrono::{DateTime, SecondsFormat, Utc};
use surety_core::Envelope;

use super::*;

pub(super) fn from_dlq_headers(env: &Envelope) -> Result<DeadLetter, LetterError> {
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

pub(super) fn from_x_death(env: &Envelope, x_death: &str) -> Result<DeadLetter, LetterError> {
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
