//! Header keys written and read by surety-dlq.
//!
//! The retry bookkeeping keys of core ([`ATTEMPT`], [`ERROR_CLASS`],
//! [`ERROR_MESSAGE`]) are re-exported here so one module names every header
//! the DLQ layer touches. All keys are listed in
//! `docs/reference/headers.md`; the dead-letter keys are described field by
//! field in `docs/reference/dlq-envelope.md`.

pub use surety_core::headers::keys::{
    ATTEMPT, DECODE_ERROR, ERROR_CLASS, ERROR_MESSAGE, REPLAY_GROUP, TRACEPARENT,
};

/// When the message first failed (RFC 3339), carried on delayed-retry copies
/// so the dead letter knows the first failure time however many hops it took.
pub const FIRST_FAILED_AT: &str = "surety-first-failed-at";
/// When a delayed-retry copy is due (RFC 3339). A `DlqLayer` that receives
/// the copy earlier waits until then before calling the handler, so retry
/// topics without broker-side delays (Kafka, the in-memory transport) still
/// honour the backoff; after a RabbitMQ TTL queue the time has passed.
pub const RETRY_AT: &str = "surety-retry-at";
/// How many times an operator replayed this message, on replayed copies.
pub const REPLAY_COUNT: &str = "surety-replay-count";

/// Prefix of every dead-letter header.
pub const DLQ_PREFIX: &str = "surety-dlq-";
/// Version of the dead-letter format ([`DeadLetter::VERSION`](crate::DeadLetter::VERSION)).
pub const DLQ_VERSION: &str = "surety-dlq-version";
/// The dead letter's id (stable per handler and message); also set on
/// replayed copies so their outcome can be recorded against it.
pub const DLQ_ID: &str = "surety-dlq-id";
/// Why the message was dead-lettered: `not_retryable`, `attempts_exhausted`
/// or `broker`.
pub const DLQ_REASON: &str = "surety-dlq-reason";
/// The error's source chain as a JSON array of strings (bounded).
pub const DLQ_ERROR_CHAIN: &str = "surety-dlq-error-chain";
/// How many attempts were made.
pub const DLQ_ATTEMPTS: &str = "surety-dlq-attempts";
/// First failure time, RFC 3339.
pub const DLQ_FIRST_FAILED_AT: &str = "surety-dlq-first-failed-at";
/// Last failure time, RFC 3339.
pub const DLQ_LAST_FAILED_AT: &str = "surety-dlq-last-failed-at";
/// When the message was dead-lettered, RFC 3339.
pub const DLQ_DEAD_LETTERED_AT: &str = "surety-dlq-dead-lettered-at";
/// The transport it was consumed from (`rabbitmq`, `kafka`, `memory`).
pub const DLQ_SOURCE_SYSTEM: &str = "surety-dlq-source-system";
/// The topic (or queue) it was consumed from.
pub const DLQ_SOURCE_TOPIC: &str = "surety-dlq-source-topic";
/// The consumer group (or queue) that failed to handle it.
pub const DLQ_SOURCE_GROUP: &str = "surety-dlq-source-group";
/// The partition it was consumed from, if any.
pub const DLQ_SOURCE_PARTITION: &str = "surety-dlq-source-partition";
/// The offset it was consumed from, if any.
pub const DLQ_SOURCE_OFFSET: &str = "surety-dlq-source-offset";
/// The handler that failed.
pub const DLQ_HANDLER: &str = "surety-dlq-handler";
/// The host the handler ran on.
pub const DLQ_HOST: &str = "surety-dlq-host";
/// The trace id of the failed processing (from `traceparent`).
pub const DLQ_TRACE_ID: &str = "surety-dlq-trace-id";
/// Grouping key: same handler, same class, same normalized message.
pub const DLQ_FINGERPRINT: &str = "surety-dlq-fingerprint";
/// How many times the message had been replayed when it was dead-lettered.
pub const DLQ_REPLAY_COUNT: &str = "surety-dlq-replay-count";

/// RabbitMQ's dead-letter history header. When an adapter passes it on as
/// a header, its value is the JSON form of the AMQP array of tables.
pub const X_DEATH: &str = "x-death";

/// Whether `key` is retry or dead-letter bookkeeping written by Surety (and
/// therefore not part of the message as its producer published it).
pub fn is_bookkeeping(key: &str) -> bool {
    key == ATTEMPT
        || key == ERROR_CLASS
        || key == ERROR_MESSAGE
        || key == FIRST_FAILED_AT
        || key == RETRY_AT
        || key == REPLAY_COUNT
        || key == REPLAY_GROUP
        || key.starts_with(DLQ_PREFIX)
}
