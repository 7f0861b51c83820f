//! Payload codecs and the JSON form of an [`Envelope`].
//!
//! Decoding never panics: every failure is a [`DecodeError`], which
//! classifies as [poison](crate::ErrorClass::Poison) so the consumer pipeline
//! dead-letters the message before any handler runs.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::envelope::{Envelope, SPEC_VERSION};
use crate::error::{Classify, ErrorClass};
use crate::headers::Headers;

/// The JSON media type.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// A message could not be decoded. Always [poison](ErrorClass::Poison).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The payload is not valid for the target type. The JSON error is part
    /// of the message (not a `source`), so it is reported once.
    #[error("payload does not decode: {0}")]
    Json(serde_json::Error),
    /// The payload's content type is not one this codec reads.
    #[error("content type {found:?} cannot be decoded by a codec for {expected:?}")]
    ContentType {
        /// The envelope's content type.
        found: String,
        /// What the codec reads.
        expected: String,
    },
    /// The transport could not read the message's envelope (see
    /// [`Envelope::undecodable`]).
    #[error("the message's envelope could not be read: {0}")]
    Envelope(String),
    /// A required envelope attribute is missing.
    #[error("envelope attribute `{0}` is missing")]
    MissingAttribute(&'static str),
    /// An envelope attribute has an invalid value.
    #[error("envelope attribute `{key}` has invalid value {value:?}")]
    InvalidAttribute {
        /// The attribute.
        key: &'static str,
        /// The value found.
        value: String,
    },
}

impl From<serde_json::Error> for DecodeError {
    fn from(err: serde_json::Error) -> Self {
        Self::Json(err)
    }
}

impl Classify for DecodeError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Poison
    }
}

/// Turns typed payloads into bytes and back.
///
/// [`JsonCodec`] is the default. A codec for another format (Avro, protobuf)
/// implements this trait and is passed to [`Envelope::decode_with`].
///
/// ```
/// use surety_core::codec::{JsonCodec, PayloadCodec};
///
/// let bytes = JsonCodec.encode(&vec![1, 2, 3]).unwrap();
/// let back: Vec<u8> = JsonCodec.decode(&bytes).unwrap();
/// assert_eq!(back, [1, 2, 3]);
/// assert!(JsonCodec.decode::<Vec<u8>>(b"\xff").is_err());
/// ```
pub trait PayloadCodec: Send + Sync {
    /// The media type this codec writes.
    fn content_type(&self) -> &str;

    /// Whether this codec reads payloads of `content_type`.
    fn accepts(&self, content_type: &str) -> bool {
        media_type(content_type).eq_ignore_ascii_case(self.content_type())
    }

    /// Encodes a value.
    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes, serde_json::Error>;

    /// Decodes a value. Never panics, whatever the bytes.
    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, DecodeError>;
}

/// The part of a content type before any `;` parameters.
fn media_type(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

/// JSON through `serde_json`. Accepts `application/json` and any
/// `application/*+json` content type.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonCodec;

impl PayloadCodec for JsonCodec {
    fn content_type(&self) -> &str {
        CONTENT_TYPE_JSON
    }

    fn accepts(&self, content_type: &str) -> bool {
        let media = media_type(content_type).to_ascii_lowercase();
        media == CONTENT_TYPE_JSON
            || (media.starts_with("application/") && media.ends_with("+json"))
    }

    fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes, serde_json::Error> {
        serde_json::to_vec(value).map(Bytes::from)
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, DecodeError> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

/// The JSON form of an envelope (CloudEvents structured mode, with the
/// payload in `data_base64` so any bytes survive).
#[derive(Serialize, Deserialize)]
struct StructuredEnvelope {
    specversion: String,
    id: String,
    source: String,
    #[serde(rename = "type")]
    event_type: String,
    time: DateTime<Utc>,
    datacontenttype: String,
    schemaversion: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    partitionkey: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    correlationid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    causationid: Option<String>,
    #[serde(default, skip_serializing_if = "Headers::is_empty")]
    headers: Headers,
    data_base64: String,
}

/// Envelopes serialize as CloudEvents 1.0 structured JSON with Surety's
/// extensions (`schemaversion`, `partitionkey`, `correlationid`,
/// `causationid`), a `headers` object and the payload base64-encoded in
/// `data_base64`. Outbox rows and dead-letter records store this form.
///
/// ```
/// use surety_core::Envelope;
/// let env = Envelope::builder("/orders", "order.placed").payload("{}").build();
/// let json = serde_json::to_string(&env).unwrap();
/// assert!(json.contains(r#""specversion":"1.0""#));
/// let back: Envelope = serde_json::from_str(&json).unwrap();
/// assert_eq!(back, env);
/// ```
impl Serialize for Envelope {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        StructuredEnvelope {
            specversion: SPEC_VERSION.to_owned(),
            id: self.id.clone(),
            source: self.source.clone(),
            event_type: self.event_type.clone(),
            time: self.time,
            datacontenttype: self.content_type.clone(),
            schemaversion: self.schema_version,
            subject: self.subject.clone(),
            partitionkey: self.partition_key.clone(),
            correlationid: self.correlation_id.clone(),
            causationid: self.causation_id.clone(),
            headers: self.headers.clone(),
            data_base64: BASE64.encode(&self.payload),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Envelope {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = StructuredEnvelope::deserialize(deserializer)?;
        if s.specversion != SPEC_VERSION {
            return Err(D::Error::custom(format!(
                "unsupported specversion {:?}",
                s.specversion
            )));
        }
        let payload = BASE64
            .decode(s.data_base64.as_bytes())
            .map_err(|e| D::Error::custom(format!("data_base64: {e}")))?;
        let mut env = Envelope::builder(s.source, s.event_type)
            .id(s.id)
            .time(s.time)
            .content_type(s.datacontenttype)
            .schema_version(s.schemaversion)
            .headers(s.headers)
            .payload(payload)
            .build();
        env.subject = s.subject;
        env.partition_key = s.partitionkey;
        env.correlation_id = s.correlationid;
        env.causation_id = s.causationid;
        Ok(env)
    }
}

impl Envelope {
    /// The envelope as structured JSON bytes.
    pub fn to_json(&self) -> Bytes {
        // Serializing plain strings, integers and a string map cannot fail.
        serde_json::to_vec(self)
            .map(Bytes::from)
            .unwrap_or_default()
    }

    /// Parses structured JSON bytes. Any malformed input is a [`DecodeError`].
    pub fn from_json(bytes: &[u8]) -> Result<Self, DecodeError> {
        JsonCodec.decode(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_codec_accepts_json_media_types() {
        assert!(JsonCodec.accepts("application/json"));
        assert!(JsonCodec.accepts("application/json; charset=utf-8"));
        assert!(JsonCodec.accepts("application/cloudevents+json"));
        assert!(!JsonCodec.accepts("text/plain"));
        assert!(!JsonCodec.accepts(""));
    }

    #[test]
    fn decode_errors_are_reported_once_in_a_chain() {
        let err = JsonCodec.decode::<u32>(b"\"three\"").unwrap_err();
        let chain = crate::HandlerError::new(err).chain_message(1024);
        assert_eq!(chain.matches("expected u32").count(), 1, "{chain}");
    }

    #[test]
    fn wrong_specversion_is_rejected() {
        let env = Envelope::builder("/s", "t").build();
        let json = String::from_utf8(env.to_json().to_vec())
            .unwrap()
            .replace("\"1.0\"", "\"0.3\"");
        let err = Envelope::from_json(json.as_bytes()).unwrap_err();
        assert_eq!(err.class(), ErrorClass::Poison);
    }
}
