//! The envelope on the wire: AMQP properties plus CloudEvents binary-mode
//! headers.
//!
//! Publishing writes every header of [`Envelope::to_binary`] as an AMQP
//! string field, so every attribute round-trips exactly, and also fills in
//! the AMQP properties that tools and other clients read (`message_id`,
//! `correlation_id`, `content_type`, `timestamp`, `type`, `app_id`,
//! persistent `delivery_mode`).
//!
//! Consuming reads the headers back with [`Envelope::from_binary`]. For a
//! message from a foreign producer the missing attributes are taken from the
//! AMQP properties (`message_id` → id, `type` → type, `app_id` → source,
//! falling back to `rabbitmq://{queue}`, `timestamp` → time, ...). A message
//! that still has no id or type becomes [`Envelope::undecodable`]: it flows
//! to the handler pipeline as poison, with a stable id, never dropped.
//!
//! Header values that are not strings are rendered as strings; tables and
//! arrays (RabbitMQ's `x-death`) as JSON. The broker's `x-delivery-count`
//! becomes [`DeliveryInfo::delivery_count`](surety_core::DeliveryInfo) and
//! is removed from the headers, and so is the adapter's own count,
//! [`X_SURETY_DELIVERIES`].

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use sha2::{Digest, Sha256};
use surety_core::headers::keys;
use surety_core::{Envelope, Headers, TransportError, TransportErrorKind};

/// The quorum-queue header counting earlier delivery attempts.
pub const X_DELIVERY_COUNT: &str = "x-delivery-count";

/// The adapter's own count of earlier delivery attempts, written when it
/// returns a message to a queue that does not count deliveries (a classic
/// queue) by publishing a copy to the queue's tail; see
/// [`DeliveryInfo::delivery_count`](surety_core::DeliveryInfo::delivery_count)
/// and ADR 0013. It is not part of the envelope.
pub const X_SURETY_DELIVERIES: &str = "x-surety-deliveries";

/// AMQP `delivery_mode` for persistent messages.
const PERSISTENT: u8 = 2;

/// A short string if `value` fits in 255 bytes.
fn short(value: &str) -> Option<ShortString> {
    ShortString::try_new(value).ok()
}

/// The AMQP properties and body for `envelope`.
///
/// Fails with [`TransportErrorKind::Rejected`] when a header key is longer
/// than AMQP allows (255 bytes). Attributes too long for an AMQP property are
/// left out of the property (they still travel in the headers).
pub(crate) fn encode(envelope: &Envelope) -> Result<(BasicProperties, Bytes), TransportError> {
    let (headers, payload) = envelope.to_binary();
    let mut table = FieldTable::default();
    for (key, value) in headers {
        let key = ShortString::try_new(key).map_err(|err| {
            TransportError::new(
                TransportErrorKind::Rejected,
                "a header key is longer than the 255 bytes AMQP allows",
            )
            .with_source(err.to_string())
        })?;
        table.insert(key, AMQPValue::LongString(LongString::from(value)));
    }
    let mut props = BasicProperties::default()
        .with_headers(table)
        .with_delivery_mode(PERSISTENT);
    if let Some(id) = short(&envelope.id) {
        props = props.with_message_id(id);
    }
    if let Some(kind) = short(&envelope.event_type) {
        props = props.with_type(kind);
    }
    if let Some(source) = short(&envelope.source) {
        props = props.with_app_id(source);
    }
    if let Some(content_type) = short(&envelope.content_type) {
        props = props.with_content_type(content_type);
    }
    if let Some(correlation) = envelope.correlation_id.as_deref().and_then(short) {
        props = props.with_correlation_id(correlation);
    }
    if let Ok(seconds) = u64::try_from(envelope.time.timestamp()) {
        props = props.with_timestamp(seconds);
    }
    Ok((props, payload))
}

/// The string form of a header value. Tables and arrays (such as RabbitMQ's
/// `x-death`) become JSON.
fn value_to_string(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(t) => t.to_string(),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
        AMQPValue::DecimalValue(_) | AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) => {
            to_json(value).to_string()
        }
        AMQPValue::Void => return None,
    })
}

/// The JSON form of a header value: tables are objects, arrays arrays,
/// timestamps seconds, numbers numbers.
fn to_json(value: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Timestamp(n) => Value::from(*n),
        AMQPValue::Float(n) => Value::from(*n),
        AMQPValue::Double(n) => Value::from(*n),
        AMQPValue::DecimalValue(d) => {
            Value::from(f64::from(d.value) / 10f64.powi(i32::from(d.scale)))
        }
        AMQPValue::ShortString(s) => Value::from(s.as_str()),
        AMQPValue::LongString(s) => Value::from(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::ByteArray(b) => Value::from(String::from_utf8_lossy(b.as_slice())),
        AMQPValue::FieldArray(items) => {
            Value::Array(items.as_slice().iter().map(to_json).collect())
        }
        AMQPValue::FieldTable(table) => Value::Object(
            table
                .into_iter()
                .map(|(k, v)| (k.as_str().to_owned(), to_json(v)))
                .collect(),
        ),
        AMQPValue::Void => Value::Null,
    }
}

fn value_to_u32(value: &AMQPValue) -> Option<u32> {
    match value {
        AMQPValue::ShortShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u32::from(*n)),
        AMQPValue::ShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u32::from(*n)),
        AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(*n),
        AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::Timestamp(n) => u32::try_from(*n).ok(),
        other => value_to_string(other)?.parse().ok(),
    }
}

/// A message read from a queue.
#[derive(Debug)]
pub(crate) struct Decoded {
    /// The envelope (possibly [undecodable](Envelope::undecodable)).
    pub(crate) envelope: Envelope,
    /// The broker's `x-delivery-count` (earlier delivery attempts), when present.
    pub(crate) x_delivery_count: Option<u32>,
    /// The adapter's [`X_SURETY_DELIVERIES`] (earlier delivery attempts),
    /// when present and a number.
    pub(crate) surety_deliveries: Option<u32>,
}

/// Reads the envelope of a message consumed from `queue`.
pub(crate) fn decode(queue: &str, props: &BasicProperties, payload: Bytes) -> Decoded {
    let mut headers = Headers::new();
    let mut x_delivery_count = None;
    let mut surety_deliveries = None;
    if let Some(table) = props.headers() {
        for (key, value) in table {
            if key.as_str() == X_DELIVERY_COUNT {
                x_delivery_count = value_to_u32(value);
                continue;
            }
            if key.as_str() == X_SURETY_DELIVERIES {
                surety_deliveries = value_to_u32(value);
                continue;
            }
            if let Some(value) = value_to_string(value) {
                headers.insert(key.as_str(), value);
            }
        }
    }
    let raw = headers.clone();
    fill_from_properties(&mut headers, props, queue);
    let envelope = match Envelope::from_binary(headers, payload.clone()) {
        Ok(envelope) => envelope,
        Err(err) => {
            let id = props
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned())
                .filter(|id| !id.is_empty())
                .unwrap_or_else(|| format!("{queue}:{}", fingerprint(&raw, &payload)));
            Envelope::undecodable(source_of(queue), id, raw, payload, &err)
        }
    };
    Decoded {
        envelope,
        x_delivery_count,
        surety_deliveries,
    }
}

fn source_of(queue: &str) -> String {
    format!("rabbitmq://{queue}")
}

/// Fills the attributes a foreign producer left out from the AMQP
/// properties. Attributes present in the headers always win.
fn fill_from_properties(headers: &mut Headers, props: &BasicProperties, queue: &str) {
    fn fill(headers: &mut Headers, key: &str, value: Option<String>) {
        if !headers.contains(key)
            && let Some(value) = value.filter(|v| !v.is_empty())
        {
            headers.insert(key, value);
        }
    }
    let prop = |p: &Option<ShortString>| p.as_ref().map(|s| s.as_str().to_owned());
    fill(headers, keys::ce::ID, prop(props.message_id()));
    fill(headers, keys::ce::TYPE, prop(props.kind()));
    fill(headers, keys::ce::CONTENT_TYPE, prop(props.content_type()));
    fill(
        headers,
        keys::ce::CORRELATION_ID,
        prop(props.correlation_id()),
    );
    fill(
        headers,
        keys::ce::TIME,
        props
            .timestamp()
            .and_then(|t| i64::try_from(t).ok())
            .and_then(|t| DateTime::<Utc>::from_timestamp(t, 0))
            .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
    );
    // Only a message that otherwise has an identity gets a default source:
    // without id and type it stays undecodable.
    if headers.contains(keys::ce::ID) && headers.contains(keys::ce::TYPE) {
        fill(
            headers,
            keys::ce::SOURCE,
            prop(props.app_id()).or_else(|| Some(source_of(queue))),
        );
    }
}

/// A stable fingerprint of an undecodable message: SHA-256 of its payload
/// and of its headers except the broker's own (`x-*`, which change on every
/// redelivery), as 32 hex digits.
fn fingerprint(headers: &Headers, payload: &[u8]) -> String {
    let mut hash = Sha256::new();
    for (key, value) in headers.iter().filter(|(k, _)| !k.starts_with("x-")) {
        hash.update((key.len() as u64).to_be_bytes());
        hash.update(key.as_bytes());
        hash.update((value.len() as u64).to_be_bytes());
        hash.update(value.as_bytes());
    }
    hash.update(payload);
    hash.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The identity of a published message as seen in a returned message:
/// routing key and `ce_id` header.
pub(crate) fn identity_of(routing_key: &str, props: &BasicProperties) -> (String, String) {
    let id = props
        .headers()
        .as_ref()
        .and_then(|t| t.inner().get(keys::ce::ID))
        .and_then(value_to_string)
        .unwrap_or_default();
    (routing_key.to_owned(), id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use surety_core::envelope::UNDECODABLE_TYPE;

    fn round_trip(env: &Envelope) -> Envelope {
        let (props, payload) = encode(env).unwrap();
        decode("orders.billing", &props, payload).envelope
    }

    #[test]
    fn every_attribute_round_trips() {
        let env = Envelope::builder("/orders", "order.placed")
            .subject("o-1")
            .partition_key("o-1")
            .correlation_id("c-1")
            .causation_id("m-0")
            .schema_version(3)
            .content_type("application/avro")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .header("surety-attempt", "2")
            .payload(vec![0u8, 159, 146, 150])
            .build();
        assert_eq!(round_trip(&env), env);
    }

    #[test]
    fn properties_mirror_the_envelope() {
        let env = Envelope::builder("/orders", "order.placed")
            .correlation_id("c-1")
            .build();
        let (props, _) = encode(&env).unwrap();
        assert_eq!(props.message_id().as_ref().unwrap().as_str(), env.id);
        assert_eq!(props.kind().as_ref().unwrap().as_str(), "order.placed");
        assert_eq!(props.app_id().as_ref().unwrap().as_str(), "/orders");
        assert_eq!(props.correlation_id().as_ref().unwrap().as_str(), "c-1");
        assert_eq!(*props.delivery_mode(), Some(PERSISTENT));
        assert_eq!(*props.timestamp(), Some(env.time.timestamp() as u64));
    }

    #[test]
    fn long_attributes_stay_in_headers_only() {
        let long = "x".repeat(300);
        let env = Envelope::builder("/orders", "t").id(long.clone()).build();
        let (props, payload) = encode(&env).unwrap();
        assert!(props.message_id().is_none());
        assert_eq!(decode("q", &props, payload).envelope.id, long);
    }

    #[test]
    fn long_header_keys_are_rejected_not_panics() {
        let env = Envelope::builder("/orders", "t")
            .header("k".repeat(300), "v")
            .build();
        let err = encode(&env).unwrap_err();
        assert_eq!(err.kind(), TransportErrorKind::Rejected);
    }

    #[test]
    fn foreign_messages_are_read_from_properties() {
        let props = BasicProperties::default()
            .with_message_id("m-42".into())
            .with_type("legacy.event".into())
            .with_timestamp(1_700_000_000)
            .with_content_type("text/plain".into());
        let env = decode("legacy.q", &props, Bytes::from_static(b"hi")).envelope;
        assert_eq!(env.id, "m-42");
        assert_eq!(env.event_type, "legacy.event");
        assert_eq!(env.source, "rabbitmq://legacy.q");
        assert_eq!(env.content_type, "text/plain");
        assert_eq!(env.time.timestamp(), 1_700_000_000);
        assert!(env.decode_error().is_none());
    }

    #[test]
    fn unreadable_messages_become_poison_with_a_stable_id() {
        let mut table = FieldTable::default();
        table.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        table.insert("foo".into(), AMQPValue::LongString("bar".into()));
        let props = BasicProperties::default().with_headers(table);
        let first = decode("q", &props, Bytes::from_static(b"\xff\x00"));
        assert_eq!(first.x_delivery_count, Some(2));
        assert_eq!(first.envelope.event_type, UNDECODABLE_TYPE);
        assert!(first.envelope.decode_error().is_some());
        assert_eq!(first.envelope.headers.get("foo"), Some("bar"));
        assert_eq!(&first.envelope.payload[..], b"\xff\x00");

        // A redelivery (new x-delivery-count) keeps the id.
        let mut table = FieldTable::default();
        table.insert("x-delivery-count".into(), AMQPValue::LongLongInt(3));
        table.insert("foo".into(), AMQPValue::LongString("bar".into()));
        let props = BasicProperties::default().with_headers(table);
        let again = decode("q", &props, Bytes::from_static(b"\xff\x00"));
        assert_eq!(again.envelope.id, first.envelope.id);
        assert!(first.envelope.id.starts_with("q:"));

        // A different payload gets a different id.
        let other = decode("q", &props, Bytes::from_static(b"other"));
        assert_ne!(other.envelope.id, first.envelope.id);

        // With a message id, that is the id.
        let props = BasicProperties::default().with_message_id("m-1".into());
        let env = decode("q", &props, Bytes::new()).envelope;
        assert_eq!(env.id, "m-1");
        assert_eq!(env.event_type, UNDECODABLE_TYPE);
    }

    #[test]
    fn x_death_becomes_json() {
        let mut death = FieldTable::default();
        death.insert("count".into(), AMQPValue::LongLongInt(3));
        death.insert("reason".into(), AMQPValue::LongString("rejected".into()));
        death.insert(
            "queue".into(),
            AMQPValue::LongString("orders.billing".into()),
        );
        death.insert("time".into(), AMQPValue::Timestamp(1_700_000_000));
        death.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(vec![AMQPValue::LongString("orders".into())].into()),
        );
        let env = Envelope::builder("/orders", "t").build();
        let (props, payload) = encode(&env).unwrap();
        let mut table = props.headers().clone().unwrap();
        table.insert(
            "x-death".into(),
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
        );
        let decoded = decode("q", &props.with_headers(table), payload).envelope;
        let json: serde_json::Value =
            serde_json::from_str(decoded.headers.get("x-death").unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!([{
                "count": 3, "reason": "rejected", "queue": "orders.billing",
                "time": 1_700_000_000u64, "routing-keys": ["orders"]
            }])
        );
    }

    #[test]
    fn malformed_time_is_poison_not_a_panic() {
        let env = Envelope::builder("/orders", "t").build();
        let (props, payload) = encode(&env).unwrap();
        let mut table = props.headers().clone().unwrap();
        table.insert(
            keys::ce::TIME.into(),
            AMQPValue::LongString("yesterday".into()),
        );
        let props = props.with_headers(table);
        let decoded = decode("q", &props, payload).envelope;
        assert_eq!(decoded.event_type, UNDECODABLE_TYPE);
        assert_eq!(
            decoded.id, env.id,
            "the message id property is the stable id"
        );
    }
}
