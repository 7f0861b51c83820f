//! Message headers: an ordered string map with typed accessors.
//!
//! Every header Surety writes has a `pub const` key in [`keys`]; the same keys
//! are listed in `docs/reference/headers.md`. Headers travel unchanged through
//! every hop: broker headers, outbox rows and dead-letter envelopes.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Header keys written or read by the Surety crates.
///
/// Keys are lower case, so they survive brokers and proxies that fold case.
pub mod keys {
    /// W3C Trace Context `traceparent`: the producer's span, parent of the consumer's.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C Trace Context `tracestate`: vendor-specific trace data.
    pub const TRACESTATE: &str = "tracestate";

    /// How many times this message has been handed to a handler, counting this
    /// time (1 on the first delivery). Written by retry layers when they
    /// republish a message for a delayed retry, so the count survives the
    /// broker and does not depend on which consumer instance receives it.
    pub const ATTEMPT: &str = "surety-attempt";
    /// On a command: the topic its reply goes to. Command/reply handlers
    /// (idempotent replies, saga participants) publish their reply there,
    /// with the command as the reply's cause.
    pub const REPLY_TO: &str = "surety-reply-to";
    /// Class of the last handler failure: `transient`, `permanent` or `poison`.
    pub const ERROR_CLASS: &str = "surety-error-class";
    /// Message of the last handler failure (truncated to a bounded length).
    pub const ERROR_MESSAGE: &str = "surety-error-message";
    /// Set by a transport on a message whose envelope could not be read from
    /// the broker's headers (see [`Envelope::undecodable`](crate::Envelope::undecodable)):
    /// why it failed. Such a message is poison; [`typed`](crate::consumer::typed)
    /// handlers never run for it.
    pub const DECODE_ERROR: &str = "surety-decode-error";
    /// The one consumer group a message is for (a replay of a dead letter
    /// goes back to the group that failed it). Other groups on the topic
    /// acknowledge it without handling it ([`addressed_to`](super::addressed_to)).
    /// Absent: every group.
    pub const REPLAY_GROUP: &str = "surety-replay-group";

    /// CloudEvents binary-mode attribute headers. Broker adapters carry the
    /// envelope's attributes in these headers when the broker has no native
    /// property for them (the names follow the CloudEvents Kafka binding).
    pub mod ce {
        /// `specversion`: always `1.0`.
        pub const SPECVERSION: &str = "ce_specversion";
        /// `id`: the message id.
        pub const ID: &str = "ce_id";
        /// `source`: who produced the message (a URI reference).
        pub const SOURCE: &str = "ce_source";
        /// `type`: the message type, e.g. `com.example.order.placed`.
        pub const TYPE: &str = "ce_type";
        /// `time`: when the message was produced, RFC 3339.
        pub const TIME: &str = "ce_time";
        /// `subject`: what the message is about, e.g. an order id.
        pub const SUBJECT: &str = "ce_subject";
        /// `datacontenttype`: media type of the payload.
        pub const CONTENT_TYPE: &str = "content-type";
        /// Extension `schemaversion`: version of the payload schema.
        pub const SCHEMA_VERSION: &str = "ce_schemaversion";
        /// Extension `partitionkey`: the ordering key.
        pub const PARTITION_KEY: &str = "ce_partitionkey";
        /// Extension `correlationid`: the conversation this message belongs to.
        pub const CORRELATION_ID: &str = "ce_correlationid";
        /// Extension `causationid`: id of the message that caused this one.
        pub const CAUSATION_ID: &str = "ce_causationid";

        /// Every attribute key, in a stable order.
        pub const ALL: [&str; 11] = [
            SPECVERSION,
            ID,
            SOURCE,
            TYPE,
            TIME,
            SUBJECT,
            CONTENT_TYPE,
            SCHEMA_VERSION,
            PARTITION_KEY,
            CORRELATION_ID,
            CAUSATION_ID,
        ];
    }
}

/// An ordered map of string headers.
///
/// Iteration is in key order, so encodings are deterministic.
///
/// ```
/// use surety_core::headers::{keys, Headers};
///
/// let mut headers = Headers::new();
/// headers.set_parsed(keys::ATTEMPT, 3u32);
/// assert_eq!(headers.parsed::<u32>(keys::ATTEMPT).unwrap(), Some(3));
/// assert_eq!(headers.get(keys::ATTEMPT), Some("3"));
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Headers(BTreeMap<String, String>);

/// A header was present but its value did not parse as the requested type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("header `{key}` has value {value:?}, which is not a valid {expected}")]
pub struct HeaderError {
    /// The header key.
    pub key: String,
    /// The value found.
    pub value: String,
    /// The type that was expected.
    pub expected: &'static str,
}

impl Headers {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Sets `key` to `value`, returning the previous value.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) -> Option<String> {
        self.0.insert(key.into(), value.into())
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.0.remove(key)
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no headers.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Iterates over `(key, value)` pairs in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Parses the value of `key` as `T`.
    ///
    /// Returns `Ok(None)` when the header is absent and a [`HeaderError`]
    /// when it is present but does not parse.
    pub fn parsed<T: FromStr>(&self, key: &str) -> Result<Option<T>, HeaderError> {
        match self.get(key) {
            None => Ok(None),
            Some(value) => value.parse().map(Some).map_err(|_| HeaderError {
                key: key.to_owned(),
                value: value.to_owned(),
                expected: std::any::type_name::<T>(),
            }),
        }
    }

    /// Sets `key` to the `Display` form of `value`.
    pub fn set_parsed<T: fmt::Display>(&mut self, key: impl Into<String>, value: T) {
        self.0.insert(key.into(), value.to_string());
    }

    /// The delivery attempt recorded in [`keys::ATTEMPT`], if present and valid.
    pub fn attempt(&self) -> Result<Option<u32>, HeaderError> {
        self.parsed(keys::ATTEMPT)
    }

    /// Records the delivery attempt in [`keys::ATTEMPT`].
    pub fn set_attempt(&mut self, attempt: u32) {
        self.set_parsed(keys::ATTEMPT, attempt);
    }

    /// The reply topic recorded in [`keys::REPLY_TO`], if present.
    pub fn reply_to(&self) -> Option<&str> {
        self.get(keys::REPLY_TO)
    }

    /// The W3C `traceparent`, if present.
    pub fn traceparent(&self) -> Option<&str> {
        self.get(keys::TRACEPARENT)
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.iter()).finish()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl<K: Into<String>, V: Into<String>> Extend<(K, V)> for Headers {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        self.0
            .extend(iter.into_iter().map(|(k, v)| (k.into(), v.into())));
    }
}

impl IntoIterator for Headers {
    type Item = (String, String);
    type IntoIter = std::collections::btree_map::IntoIter<String, String>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Whether a consumer in `group` should handle `envelope`: yes unless its
/// [`keys::REPLAY_GROUP`] header names another group. The core worker
/// acknowledges messages addressed to other groups without running the
/// handler.
///
/// ```
/// use surety_core::Envelope;
/// use surety_core::headers::{addressed_to, keys};
///
/// let mut env = Envelope::builder("/shop", "order.placed").build();
/// assert!(addressed_to(&env, "billing"));
/// env.headers.insert(keys::REPLAY_GROUP, "billing");
/// assert!(addressed_to(&env, "billing"));
/// assert!(!addressed_to(&env, "shipping"));
/// ```
pub fn addressed_to(envelope: &crate::Envelope, group: &str) -> bool {
    envelope
        .headers
        .get(keys::REPLAY_GROUP)
        .is_none_or(|g| g == group)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_typed_value_is_an_error_not_a_default() {
        let mut h = Headers::new();
        h.insert(keys::ATTEMPT, "three");
        let err = h.attempt().unwrap_err();
        assert_eq!(err.key, keys::ATTEMPT);
        assert_eq!(err.value, "three");
    }

    #[test]
    fn iteration_is_in_key_order() {
        let h: Headers = [("b", "2"), ("a", "1"), ("c", "3")].into_iter().collect();
        let keys: Vec<_> = h.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["a", "b", "c"]);
    }
}
