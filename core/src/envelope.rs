//! The message envelope shared by every Surety crate.

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Serialize, de::DeserializeOwned};

use crate::codec::{CONTENT_TYPE_JSON, DecodeError, JsonCodec, PayloadCodec};
use crate::consumer::Output;
use crate::error::{Classify, ErrorClass};
use crate::headers::{Headers, keys};

/// The event type of an envelope made by [`Envelope::undecodable`].
pub const UNDECODABLE_TYPE: &str = "surety.undecodable";

/// The CloudEvents spec version the envelope follows.
pub const SPEC_VERSION: &str = "1.0";

/// A payload type with a stable name and schema version.
///
/// Implementing it lets [`Envelope::message`] fill in `type`, schema version,
/// content type and payload in one call.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use surety_core::{Envelope, Message};
///
/// #[derive(Serialize, Deserialize)]
/// struct OrderPlaced { order_id: String, total_cents: u64 }
///
/// impl Message for OrderPlaced {
///     const TYPE: &'static str = "com.example.order.placed";
///     const SCHEMA_VERSION: u32 = 2;
/// }
///
/// let env = Envelope::message("/orders", &OrderPlaced { order_id: "o-1".into(), total_cents: 4200 })
///     .unwrap()
///     .partition_key("o-1")
///     .build();
/// assert_eq!(env.event_type, "com.example.order.placed");
/// assert_eq!(env.schema_version, 2);
/// let back: OrderPlaced = env.decode().unwrap();
/// assert_eq!(back.total_cents, 4200);
/// ```
pub trait Message: Serialize + DeserializeOwned {
    /// The CloudEvents `type`, e.g. `com.example.order.placed`.
    const TYPE: &'static str;
    /// The payload schema version; bump it when the shape changes.
    const SCHEMA_VERSION: u32 = 1;
}

/// One message: CloudEvents 1.0 attributes, Surety's extensions, headers and
/// an opaque payload.
///
/// `source` + `id` identify a message for deduplication. Build one with
/// [`Envelope::builder`] or [`Envelope::message`].
///
/// Fields are public for reading and editing; the struct is
/// `#[non_exhaustive]` so new attributes can be added without breaking users.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Envelope {
    /// CloudEvents `id`. Unique within `source`; a UUIDv7 by default.
    pub id: String,
    /// CloudEvents `source`: who produced the message, a URI reference such
    /// as `/orders` or `urn:example:order-service`.
    pub source: String,
    /// CloudEvents `type`.
    pub event_type: String,
    /// CloudEvents `time`: when the message was produced.
    pub time: DateTime<Utc>,
    /// CloudEvents `datacontenttype`: media type of the payload.
    pub content_type: String,
    /// Version of the payload schema (extension `schemaversion`).
    pub schema_version: u32,
    /// CloudEvents `subject`: what the message is about.
    pub subject: Option<String>,
    /// Ordering key (extension `partitionkey`): messages with the same key
    /// are delivered in publish order.
    pub partition_key: Option<String>,
    /// Conversation id shared by every message of one business flow.
    pub correlation_id: Option<String>,
    /// Id of the message that caused this one.
    pub causation_id: Option<String>,
    /// Everything else: trace context, retry bookkeeping, user headers.
    pub headers: Headers,
    /// The payload, opaque to the transport.
    pub payload: Bytes,
}

/// Why [`Envelope::reply`] could not build a reply. Always
/// [permanent](ErrorClass::Permanent): the request cannot be answered, however
/// often it is retried.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplyError {
    /// The request names no reply-to topic.
    #[error("message {request_id} asks for no reply (it has no surety-reply-to header)")]
    NoReplyTo {
        /// The request's id.
        request_id: String,
    },
    /// The reply's payload could not be encoded.
    #[error("the reply cannot be encoded: {0}")]
    Encode(#[source] serde_json::Error),
}

impl Classify for ReplyError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Permanent
    }
}

impl From<ReplyError> for crate::error::HandlerError {
    /// A reply that cannot be made is a permanent failure of the request.
    fn from(error: ReplyError) -> Self {
        Self::new(error)
    }
}

impl Envelope {
    /// A builder for a message of `event_type` from `source`.
    pub fn builder(source: impl Into<String>, event_type: impl Into<String>) -> EnvelopeBuilder {
        EnvelopeBuilder {
            env: Envelope {
                id: new_id(),
                source: source.into(),
                event_type: event_type.into(),
                time: Utc::now(),
                content_type: CONTENT_TYPE_JSON.to_owned(),
                schema_version: 1,
                subject: None,
                partition_key: None,
                correlation_id: None,
                causation_id: None,
                headers: Headers::new(),
                payload: Bytes::new(),
            },
        }
    }

    /// A builder with `type`, schema version and a JSON payload taken from a
    /// [`Message`].
    pub fn message<M: Message>(
        source: impl Into<String>,
        message: &M,
    ) -> Result<EnvelopeBuilder, serde_json::Error> {
        let payload = JsonCodec.encode(message)?;
        Ok(Self::builder(source, M::TYPE)
            .schema_version(M::SCHEMA_VERSION)
            .content_type(JsonCodec.content_type())
            .payload(payload))
    }

    /// Decodes the payload as JSON.
    ///
    /// A failure is a [`DecodeError`], which classifies as
    /// [poison](crate::ErrorClass::Poison).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        self.decode_with(&JsonCodec)
    }

    /// Decodes the payload with `codec`, checking the content type first.
    pub fn decode_with<T: DeserializeOwned, C: PayloadCodec>(
        &self,
        codec: &C,
    ) -> Result<T, DecodeError> {
        if let Some(error) = self.decode_error() {
            return Err(DecodeError::Envelope(error.to_owned()));
        }
        if !codec.accepts(&self.content_type) {
            return Err(DecodeError::ContentType {
                found: self.content_type.clone(),
                expected: codec.content_type().to_owned(),
            });
        }
        codec.decode(&self.payload)
    }

    /// A builder for a message caused by `self`: it inherits the correlation
    /// id (or uses `self.id` when `self` has none) and takes `self.id` as its
    /// causation id. Trace context is not copied: the publishing span injects
    /// its own.
    pub fn caused_by(
        &self,
        source: impl Into<String>,
        event_type: impl Into<String>,
    ) -> EnvelopeBuilder {
        Self::builder(source, event_type).caused_by(self)
    }

    /// The topic replies to this message go to (the [`keys::REPLY_TO`]
    /// header, set by [`EnvelopeBuilder::reply_to`]).
    pub fn reply_to(&self) -> Option<&str> {
        self.headers.reply_to()
    }

    /// A reply to this request, as an [`Output`] a handler returns: `message`
    /// from `source`, addressed to the request's [reply-to](Self::reply_to)
    /// topic, correlated with the request (see [`caused_by`](Self::caused_by))
    /// and with the request's partition key, so the replies of one
    /// conversation stay in order.
    ///
    /// A request without a reply-to topic is a [`ReplyError`], which is
    /// [permanent](crate::ErrorClass::Permanent): a handler can return it
    /// with `?`.
    ///
    /// ```
    /// use serde::{Deserialize, Serialize};
    /// use surety_core::{Envelope, Message};
    ///
    /// #[derive(Serialize, Deserialize)]
    /// struct Capture { order_id: String }
    /// impl Message for Capture { const TYPE: &'static str = "payment.capture"; }
    /// #[derive(Serialize, Deserialize)]
    /// struct Captured { order_id: String }
    /// impl Message for Captured { const TYPE: &'static str = "payment.captured"; }
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let request = Envelope::message("/checkout", &Capture { order_id: "o-1".into() })?
    ///     .reply_to("checkout.replies")
    ///     .partition_key("o-1")
    ///     .build();
    /// let reply = request.reply("/payments", &Captured { order_id: "o-1".into() })?;
    /// assert_eq!(reply.destination, "checkout.replies");
    /// assert_eq!(reply.envelope.causation_id.as_deref(), Some(request.id.as_str()));
    /// assert_eq!(reply.envelope.partition_key.as_deref(), Some("o-1"));
    ///
    /// let no_reply_to = Envelope::builder("/checkout", "payment.capture").build();
    /// assert!(no_reply_to.reply("/payments", &Captured { order_id: "o-1".into() }).is_err());
    /// # Ok(()) }
    /// ```
    pub fn reply<M: Message>(
        &self,
        source: impl Into<String>,
        message: &M,
    ) -> Result<Output, ReplyError> {
        let destination = self.reply_to().ok_or_else(|| ReplyError::NoReplyTo {
            request_id: self.id.clone(),
        })?;
        let mut reply = Self::message(source, message)
            .map_err(ReplyError::Encode)?
            .caused_by(self);
        if let Some(key) = &self.partition_key {
            reply = reply.partition_key(key.clone());
        }
        Ok(Output::new(destination, reply.build()))
    }

    /// The deduplication key: `source` and `id` joined by a space (a space
    /// cannot occur in a URI reference, so the join is unambiguous).
    pub fn dedup_key(&self) -> String {
        format!("{} {}", self.source, self.id)
    }

    /// Maps the envelope onto broker headers and a payload (CloudEvents binary
    /// mode): the attributes go into the `ce_*` headers of
    /// [`keys::ce`] next to the user headers.
    pub fn to_binary(&self) -> (Headers, Bytes) {
        let mut headers = Headers::new();
        self.for_each_binary_header(|key, value| {
            headers.insert(key, value);
        });
        (headers, self.payload.clone())
    }

    /// Calls `visit` with each header of the [binary form](Self::to_binary),
    /// without building a [`Headers`] map: for transports that copy headers
    /// into their own record type. The headers are the same, though not in
    /// the same order (user headers first, then the attributes): an
    /// attribute wins over a user header of the same name.
    ///
    /// ```
    /// use surety_core::Envelope;
    /// use surety_core::headers::keys;
    ///
    /// let env = Envelope::builder("/shop", "order.placed").header("tenant", "t-1").build();
    /// // A transport's own record headers.
    /// let mut record: Vec<(String, Vec<u8>)> = Vec::new();
    /// env.for_each_binary_header(|key, value| record.push((key.to_owned(), value.into())));
    ///
    /// assert_eq!(record.len(), env.to_binary().0.len());
    /// assert!(record.contains(&("tenant".into(), b"t-1".to_vec())));
    /// assert!(record.contains(&(keys::ce::ID.into(), env.id.clone().into_bytes())));
    /// ```
    pub fn for_each_binary_header(&self, mut visit: impl FnMut(&str, &str)) {
        let optional = [
            (keys::ce::SUBJECT, &self.subject),
            (keys::ce::PARTITION_KEY, &self.partition_key),
            (keys::ce::CORRELATION_ID, &self.correlation_id),
            (keys::ce::CAUSATION_ID, &self.causation_id),
        ];
        let set_here = |key: &str| {
            matches!(
                key,
                keys::ce::SPECVERSION
                    | keys::ce::ID
                    | keys::ce::SOURCE
                    | keys::ce::TYPE
                    | keys::ce::TIME
                    | keys::ce::CONTENT_TYPE
                    | keys::ce::SCHEMA_VERSION
            ) || optional
                .iter()
                .any(|(name, value)| *name == key && value.is_some())
        };
        for (key, value) in self.headers.iter() {
            if !set_here(key) {
                visit(key, value);
            }
        }
        visit(keys::ce::SPECVERSION, SPEC_VERSION);
        visit(keys::ce::ID, &self.id);
        visit(keys::ce::SOURCE, &self.source);
        visit(keys::ce::TYPE, &self.event_type);
        visit(
            keys::ce::TIME,
            &self.time.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        );
        visit(keys::ce::CONTENT_TYPE, &self.content_type);
        visit(keys::ce::SCHEMA_VERSION, &self.schema_version.to_string());
        for (key, value) in optional {
            if let Some(value) = value {
                visit(key, value);
            }
        }
    }

    /// An envelope for a broker message whose attributes could not be read
    /// (a foreign producer, corrupted headers), so that it can still flow
    /// through the pipeline and be dead-lettered as poison with its raw
    /// headers and payload intact.
    ///
    /// `id` should be stable across redeliveries (for example
    /// `topic/partition/offset`, or the broker's message id); `source` names
    /// where it was read (for example `kafka://orders`). The event type is
    /// [`UNDECODABLE_TYPE`] and [`keys::DECODE_ERROR`] holds `error`.
    ///
    /// ```
    /// use surety_core::{Envelope, Headers};
    /// use surety_core::headers::keys;
    ///
    /// let err = Envelope::from_binary(Headers::new(), "raw".into()).unwrap_err();
    /// let env = Envelope::undecodable("kafka://orders", "orders/0/42", Headers::new(), "raw".into(), &err);
    /// assert!(env.decode_error().unwrap().contains(keys::ce::ID));
    /// assert!(env.decode::<serde_json::Value>().is_err());
    /// ```
    pub fn undecodable(
        source: impl Into<String>,
        id: impl Into<String>,
        headers: Headers,
        payload: Bytes,
        error: &dyn std::fmt::Display,
    ) -> Self {
        let mut env = Self::builder(source, UNDECODABLE_TYPE)
            .id(id)
            .content_type("application/octet-stream")
            .headers(headers)
            .payload(payload)
            .build();
        env.headers.insert(keys::DECODE_ERROR, error.to_string());
        env
    }

    /// Why the transport could not read this message's envelope, if it could
    /// not (see [`undecodable`](Self::undecodable)).
    pub fn decode_error(&self) -> Option<&str> {
        self.headers.get(keys::DECODE_ERROR)
    }

    /// Rebuilds an envelope from broker headers and a payload written by
    /// [`to_binary`](Self::to_binary).
    ///
    /// Missing or malformed required attributes (`ce_id`, `ce_source`,
    /// `ce_type`) are a [`DecodeError`]: such a message is poison. Missing
    /// optional attributes take their defaults (time: now, content type:
    /// JSON, schema version: 1).
    pub fn from_binary(headers: Headers, payload: Bytes) -> Result<Self, DecodeError> {
        Self::from_binary_or_return(headers, payload).map_err(|failed| failed.0)
    }

    /// [`from_binary`](Self::from_binary), except that a failure hands the
    /// headers and the payload back as they came, with the error: a
    /// transport that turns an unreadable message into an
    /// [undecodable](Self::undecodable) envelope needs no copy of them
    /// beforehand.
    ///
    /// ```
    /// use surety_core::{Envelope, Headers};
    ///
    /// let mut headers = Headers::new();
    /// headers.insert("ce_id", "1");
    /// let (error, headers, _payload) =
    ///     Envelope::from_binary_or_return(headers, bytes::Bytes::new()).unwrap_err();
    /// assert!(error.to_string().contains("ce_source"));
    /// assert_eq!(headers.get("ce_id"), Some("1"));
    /// ```
    #[allow(clippy::result_large_err)]
    pub fn from_binary_or_return(
        mut headers: Headers,
        payload: Bytes,
    ) -> Result<Self, (DecodeError, Headers, Bytes)> {
        // Everything that can fail is checked on the borrowed headers first,
        // so that a failure returns them untouched.
        let (time, schema_version) = match check_binary(&headers) {
            Ok(parsed) => parsed,
            Err(err) => return Err((err, headers, payload)),
        };
        let mut take = |key: &'static str| headers.remove(key).unwrap_or_default();
        let id = take(keys::ce::ID);
        let source = take(keys::ce::SOURCE);
        let event_type = take(keys::ce::TYPE);
        headers.remove(keys::ce::TIME);
        headers.remove(keys::ce::SCHEMA_VERSION);
        headers.remove(keys::ce::SPECVERSION);
        Ok(Envelope {
            id,
            source,
            event_type,
            time,
            content_type: headers
                .remove(keys::ce::CONTENT_TYPE)
                .unwrap_or_else(|| CONTENT_TYPE_JSON.to_owned()),
            schema_version,
            subject: headers.remove(keys::ce::SUBJECT),
            partition_key: headers.remove(keys::ce::PARTITION_KEY),
            correlation_id: headers.remove(keys::ce::CORRELATION_ID),
            causation_id: headers.remove(keys::ce::CAUSATION_ID),
            headers,
            payload,
        })
    }

    /// [`from_binary_or_return`](Self::from_binary_or_return) from the
    /// headers as a transport reads them off a record, name and value, in
    /// order: the same result as inserting the pairs into [`Headers`] (a
    /// later pair with the same name wins) and decoding those, but the
    /// CloudEvents attributes go straight to the envelope's fields, so only
    /// the other headers' names are allocated and no attribute is inserted
    /// into the map to be removed again. A failure hands back every header.
    ///
    /// ```
    /// use surety_core::Envelope;
    ///
    /// let pairs = [("ce_id", "1"), ("ce_source", "s"), ("ce_type", "t"), ("x", "y")];
    /// let envelope = Envelope::from_binary_pairs(
    ///     pairs.map(|(k, v)| (k, v.to_owned())),
    ///     bytes::Bytes::new(),
    /// )
    /// .unwrap();
    /// assert_eq!(envelope.id, "1");
    /// assert_eq!(envelope.headers.get("x"), Some("y"));
    /// assert_eq!(envelope.headers.get("ce_id"), None);
    /// ```
    #[allow(clippy::result_large_err)]
    pub fn from_binary_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, String)>,
        payload: Bytes,
    ) -> Result<Self, (DecodeError, Headers, Bytes)> {
        let mut attributes: [Option<String>; keys::ce::ALL.len()] = Default::default();
        let mut headers = Headers::new();
        for (key, value) in pairs {
            match attribute_slot(key) {
                Some(slot) => attributes[slot] = Some(value),
                None => {
                    headers.insert(key, value);
                }
            }
        }
        let checked = check_attributes(|key| {
            attribute_slot(key).and_then(|slot| attributes[slot].as_deref())
        });
        let (time, schema_version) = match checked {
            Ok(parsed) => parsed,
            Err(err) => {
                for (key, value) in keys::ce::ALL.iter().zip(attributes) {
                    if let Some(value) = value {
                        headers.insert(*key, value);
                    }
                }
                return Err((err, headers, payload));
            }
        };
        let mut take =
            |key: &'static str| attribute_slot(key).and_then(|slot| attributes[slot].take());
        Ok(Envelope {
            id: take(keys::ce::ID).unwrap_or_default(),
            source: take(keys::ce::SOURCE).unwrap_or_default(),
            event_type: take(keys::ce::TYPE).unwrap_or_default(),
            time,
            content_type: take(keys::ce::CONTENT_TYPE)
                .unwrap_or_else(|| CONTENT_TYPE_JSON.to_owned()),
            schema_version,
            subject: take(keys::ce::SUBJECT),
            partition_key: take(keys::ce::PARTITION_KEY),
            correlation_id: take(keys::ce::CORRELATION_ID),
            causation_id: take(keys::ce::CAUSATION_ID),
            headers,
            payload,
        })
    }
}

/// The checks of [`Envelope::from_binary`] on borrowed headers: the
/// required attributes are present and not empty; the time (now when
/// absent) and the schema version (1 when absent), parsed.
fn check_binary(headers: &Headers) -> Result<(DateTime<Utc>, u32), DecodeError> {
    check_attributes(|key| headers.get(key))
}

/// [`check_binary`] with the attributes read through `get`.
fn check_attributes<'h>(
    get: impl Fn(&'static str) -> Option<&'h str>,
) -> Result<(DateTime<Utc>, u32), DecodeError> {
    let headers = Getter(get);
    for key in [keys::ce::ID, keys::ce::SOURCE, keys::ce::TYPE] {
        if headers.get(key).is_none_or(str::is_empty) {
            return Err(DecodeError::MissingAttribute(key));
        }
    }
    let time = match headers.get(keys::ce::TIME) {
        None => Utc::now(),
        Some(t) => DateTime::parse_from_rfc3339(t)
            .map_err(|_| DecodeError::InvalidAttribute {
                key: keys::ce::TIME,
                value: t.to_owned(),
            })?
            .with_timezone(&Utc),
    };
    let schema_version = match headers.get(keys::ce::SCHEMA_VERSION) {
        None => 1,
        Some(v) => v.parse().map_err(|_| DecodeError::InvalidAttribute {
            key: keys::ce::SCHEMA_VERSION,
            value: v.to_owned(),
        })?,
    };
    Ok((time, schema_version))
}

/// Reads attributes by key (lets [`check_attributes`] read like
/// [`check_binary`] did on [`Headers`]).
struct Getter<F>(F);

impl<'h, F: Fn(&'static str) -> Option<&'h str>> Getter<F> {
    fn get(&self, key: &'static str) -> Option<&'h str> {
        (self.0)(key)
    }
}

/// Where each key of [`keys::ce::ALL`] is, `None` for any other key.
fn attribute_slot(key: &str) -> Option<usize> {
    if !key.starts_with("ce_") && key != keys::ce::CONTENT_TYPE {
        return None;
    }
    keys::ce::ALL.iter().position(|k| *k == key)
}

/// A new message id: a UUIDv7, so ids sort by creation time.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Builds an [`Envelope`]. Created by [`Envelope::builder`].
#[derive(Debug, Clone)]
#[must_use = "call .build() to get the envelope"]
pub struct EnvelopeBuilder {
    env: Envelope,
}

impl EnvelopeBuilder {
    /// Sets the id (default: a new UUIDv7). Use a stable id derived from the
    /// business operation when a retry of the producer must produce the same
    /// message.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.env.id = id.into();
        self
    }

    /// Sets the production time (default: now).
    pub fn time(mut self, time: DateTime<Utc>) -> Self {
        self.env.time = time;
        self
    }

    /// Sets the payload content type (default: `application/json`).
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.env.content_type = content_type.into();
        self
    }

    /// Sets the schema version (default: 1).
    pub fn schema_version(mut self, version: u32) -> Self {
        self.env.schema_version = version;
        self
    }

    /// Sets the subject.
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.env.subject = Some(subject.into());
        self
    }

    /// Sets the ordering key.
    pub fn partition_key(mut self, key: impl Into<String>) -> Self {
        self.env.partition_key = Some(key.into());
        self
    }

    /// Sets the correlation id.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.env.correlation_id = Some(id.into());
        self
    }

    /// Sets the causation id.
    pub fn causation_id(mut self, id: impl Into<String>) -> Self {
        self.env.causation_id = Some(id.into());
        self
    }

    /// Marks the message as caused by `cause`: copies its correlation id
    /// (or takes its id when it has none) and sets the causation id to its id.
    pub fn caused_by(mut self, cause: &Envelope) -> Self {
        self.env.correlation_id = Some(
            cause
                .correlation_id
                .clone()
                .unwrap_or_else(|| cause.id.clone()),
        );
        self.env.causation_id = Some(cause.id.clone());
        self
    }

    /// Asks for replies on `topic` (the [`keys::REPLY_TO`] header); a
    /// handler answers with [`Envelope::reply`].
    pub fn reply_to(self, topic: impl Into<String>) -> Self {
        self.header(keys::REPLY_TO, topic)
    }

    /// Adds a header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.headers.insert(key, value);
        self
    }

    /// Replaces all headers.
    pub fn headers(mut self, headers: Headers) -> Self {
        self.env.headers = headers;
        self
    }

    /// Sets the raw payload.
    pub fn payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.env.payload = payload.into();
        self
    }

    /// Sets a JSON payload and the JSON content type.
    pub fn json<T: Serialize + ?Sized>(self, value: &T) -> Result<Self, serde_json::Error> {
        let payload = JsonCodec.encode(value)?;
        Ok(self.content_type(CONTENT_TYPE_JSON).payload(payload))
    }

    /// The envelope.
    pub fn build(self) -> Envelope {
        self.env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caused_by_starts_or_continues_a_conversation() {
        let first = Envelope::builder("/orders", "order.placed").build();
        let second = first.caused_by("/payments", "payment.requested").build();
        assert_eq!(second.correlation_id.as_deref(), Some(first.id.as_str()));
        assert_eq!(second.causation_id.as_deref(), Some(first.id.as_str()));

        let third = second.caused_by("/payments", "payment.captured").build();
        assert_eq!(third.correlation_id.as_deref(), Some(first.id.as_str()));
        assert_eq!(third.causation_id.as_deref(), Some(second.id.as_str()));
    }

    #[test]
    fn binary_mode_round_trips() {
        let env = Envelope::builder("/orders", "order.placed")
            .subject("o-1")
            .partition_key("o-1")
            .correlation_id("c-1")
            .header("x-tenant", "acme")
            .payload(&b"\x00\xffbinary"[..])
            .content_type("application/octet-stream")
            .build();
        let (headers, payload) = env.to_binary();
        assert_eq!(headers.get(keys::ce::ID), Some(env.id.as_str()));
        assert_eq!(Envelope::from_binary(headers, payload).unwrap(), env);
    }

    #[test]
    fn decoding_from_pairs_matches_decoding_the_header_map() {
        let envelope = Envelope::builder("/orders", "order.placed")
            .subject("o-1")
            .partition_key("k")
            .header("trace", "t-1")
            .payload(Bytes::from_static(b"{}"))
            .build();
        let (headers, payload) = envelope.to_binary();
        let mut pairs: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        // A later header with the same name wins, as in the map.
        pairs.push(("ce_subject".to_owned(), "o-2".to_owned()));
        pairs.push(("trace".to_owned(), "t-2".to_owned()));
        let mut map = Headers::new();
        for (k, v) in &pairs {
            map.insert(k.clone(), v.clone());
        }
        let borrowed = || pairs.iter().map(|(k, v)| (k.as_str(), v.clone()));
        let from_pairs = Envelope::from_binary_pairs(borrowed(), payload.clone()).unwrap();
        let from_map = Envelope::from_binary(map.clone(), payload.clone()).unwrap();
        assert_eq!(from_pairs, from_map);
        assert_eq!(from_pairs.subject.as_deref(), Some("o-2"));
        assert_eq!(from_pairs.headers.get("trace"), Some("t-2"));

        // A failure hands back every header, attributes included.
        let without_source = || borrowed().filter(|(k, _)| *k != keys::ce::SOURCE);
        let (error, returned, _) =
            Envelope::from_binary_pairs(without_source(), payload.clone()).unwrap_err();
        let mut expected = map;
        expected.remove(keys::ce::SOURCE);
        assert!(matches!(error, DecodeError::MissingAttribute(key) if key == keys::ce::SOURCE));
        assert_eq!(returned, expected);
    }

    #[test]
    fn binary_mode_without_id_is_poison() {
        let env = Envelope::builder("/orders", "order.placed").build();
        let (mut headers, payload) = env.to_binary();
        headers.remove(keys::ce::ID);
        let err = Envelope::from_binary(headers, payload).unwrap_err();
        assert!(matches!(err, DecodeError::MissingAttribute(k) if k == keys::ce::ID));
        assert_eq!(crate::Classify::class(&err), crate::ErrorClass::Poison);
    }

    #[test]
    fn decode_checks_content_type() {
        let env = Envelope::builder("/x", "t")
            .content_type("application/avro")
            .payload("{}")
            .build();
        let err = env.decode::<serde_json::Value>().unwrap_err();
        assert!(matches!(err, DecodeError::ContentType { .. }), "{err}");
    }
}
