//! What failed: the class, the reason, the message, and the fingerprint that groups alike failures.

use crate::policy::DeadLetterReason;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use surety_core::{ErrorClass, HandlerError};

use super::*;

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

pub(crate) fn hex(bytes: &[u8]) -> String {
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
