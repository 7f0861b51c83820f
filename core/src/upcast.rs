//! Upcasting: bringing payloads written at an old schema version up to the
//! version a service reads, before typed decoding.
//!
//! A payload's shape changes over time; messages written at the old shape
//! still sit in queues, logs, outboxes and dead-letter stores. [`Upcasters`]
//! holds, for each event type, the current schema version and a chain of
//! steps, each converting a JSON payload from one version to the next. Before
//! a handler decodes a message, [`Upcasters::upcast`] walks the chain from the
//! envelope's `schema_version` to the current one and rewrites the payload.
//!
//! A payload that cannot be brought up is never dropped: a version newer than
//! the current one (a producer deployed ahead of this consumer) or a missing
//! step is an [`UpcastError`] of class [permanent](ErrorClass::Permanent),
//! whose message names the type, the version found and the version expected,
//! so the message is dead-lettered and can be replayed once the service
//! learns the new version.
//!
//! [`UpcastLayer`] does the same for every message in a consumer pipeline,
//! in front of any handler.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use serde_json::json;
//! use surety_core::upcast::Upcasters;
//! use surety_core::{Envelope, Message};
//!
//! /// Version 2 split `name` into `first` and `last`.
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! struct CustomerRegistered { first: String, last: String }
//! impl Message for CustomerRegistered {
//!     const TYPE: &'static str = "customer.registered";
//!     const SCHEMA_VERSION: u32 = 2;
//! }
//!
//! let upcasters = Upcasters::new()
//!     .current::<CustomerRegistered>()
//!     .step(CustomerRegistered::TYPE, 1, |mut v1| {
//!         let name = v1["name"].as_str().unwrap_or_default().to_owned();
//!         let (first, last) = name.split_once(' ').unwrap_or((&name, ""));
//!         v1["first"] = json!(first);
//!         v1["last"] = json!(last);
//!         v1
//!     });
//!
//! // A message written by the old producer, at version 1.
//! let mut old = Envelope::builder("/crm", "customer.registered")
//!     .schema_version(1)
//!     .payload(r#"{"name":"Ada Lovelace"}"#)
//!     .build();
//!
//! let customer: CustomerRegistered = upcasters.decode(&old)?;
//! assert_eq!(customer, CustomerRegistered { first: "Ada".into(), last: "Lovelace".into() });
//!
//! // Or rewrite the envelope itself.
//! upcasters.upcast(&mut old)?;
//! assert_eq!(old.schema_version, 2);
//!
//! // A message from a future version is an error, never silently dropped.
//! let future = Envelope::builder("/crm", "customer.registered").schema_version(3).payload("{}").build();
//! let err = upcasters.decode::<CustomerRegistered>(&future).unwrap_err();
//! assert_eq!(surety_core::Classify::class(&err), surety_core::ErrorClass::Permanent);
//! assert!(err.to_string().contains("customer.registered"));
//! # Ok::<(), surety_core::upcast::UpcastError>(())
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Ready;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::Either;
use serde_json::Value;
use tower::{Layer, Service};

use crate::codec::{DecodeError, JsonCodec, PayloadCodec};
use crate::consumer::Incoming;
use crate::envelope::{Envelope, Message};
use crate::error::{BoxError, Classify, ErrorClass, HandlerError};

/// One step of a chain: converts a JSON payload from one schema version to
/// the next.
type Step = Arc<dyn Fn(Value) -> Result<Value, BoxError> + Send + Sync>;

/// The registry of upcasting steps, keyed by `(event type, from version)`,
/// and of the current schema version of each event type.
///
/// Build it once at start-up and share it (it is cheap to clone). Types with
/// no current version registered are left untouched by
/// [`upcast`](Self::upcast). Steps work on JSON payloads
/// (`application/json` and `application/*+json`).
///
/// See the [module documentation](self) for an example.
#[derive(Clone, Default)]
pub struct Upcasters {
    current: HashMap<String, u32>,
    steps: HashMap<(String, u32), Step>,
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut steps: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        for (event_type, from) in self.steps.keys() {
            steps.entry(event_type).or_default().push(*from);
        }
        for froms in steps.values_mut() {
            froms.sort_unstable();
        }
        let current: BTreeMap<&str, u32> = self
            .current
            .iter()
            .map(|(event_type, version)| (event_type.as_str(), *version))
            .collect();
        f.debug_struct("Upcasters")
            .field("current", &current)
            .field("steps", &steps)
            .finish()
    }
}

impl Upcasters {
    /// An empty registry: every envelope passes through untouched.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `M::TYPE` with `M::SCHEMA_VERSION` as its current version.
    pub fn current<M: Message>(self) -> Self {
        self.current_version(M::TYPE, M::SCHEMA_VERSION)
    }

    /// Registers `version` as the current schema version of `event_type`:
    /// envelopes of that type are brought up to it.
    pub fn current_version(mut self, event_type: impl Into<String>, version: u32) -> Self {
        self.current.insert(event_type.into(), version);
        self
    }

    /// Adds the step that converts an `event_type` payload from
    /// `from_version` to `from_version + 1`. A second step for the same key
    /// replaces the first.
    pub fn step<F>(self, event_type: impl Into<String>, from_version: u32, step: F) -> Self
    where
        F: Fn(Value) -> Value + Send + Sync + 'static,
    {
        self.try_step(event_type, from_version, move |payload| {
            Ok::<_, BoxError>(step(payload))
        })
    }

    /// Like [`step`](Self::step), for a conversion that can fail (a field the
    /// step needs is missing, a value does not parse). A failure makes the
    /// upcast fail with [`UpcastError::Step`], which is permanent.
    pub fn try_step<F, E>(
        mut self,
        event_type: impl Into<String>,
        from_version: u32,
        step: F,
    ) -> Self
    where
        F: Fn(Value) -> Result<Value, E> + Send + Sync + 'static,
        E: Into<BoxError>,
    {
        let step: Step = Arc::new(move |payload| step(payload).map_err(Into::into));
        self.steps.insert((event_type.into(), from_version), step);
        self
    }

    /// The current schema version registered for `event_type`, if any.
    pub fn current_version_of(&self, event_type: &str) -> Option<u32> {
        self.current.get(event_type).copied()
    }

    /// Brings `envelope` to the current version of its type: rewrites the
    /// payload through the chain and sets `schema_version`.
    ///
    /// An envelope of an unregistered type, or already at the current
    /// version, is left exactly as it is (payload bytes included). On error
    /// the envelope is unchanged.
    pub fn upcast(&self, envelope: &mut Envelope) -> Result<(), UpcastError> {
        let Some(current) = self.current_version_of(&envelope.event_type) else {
            return Ok(());
        };
        if envelope.schema_version == current {
            return Ok(());
        }
        let payload = self.upcast_payload_to(envelope, current)?;
        envelope.payload = JsonCodec
            .encode(&payload)
            .map_err(|err| UpcastError::Step {
                event_type: envelope.event_type.clone(),
                from: current.saturating_sub(1),
                source: Box::new(err),
            })?;
        envelope.schema_version = current;
        Ok(())
    }

    /// Decodes the payload of `envelope` as `M`, through the chain of
    /// `M::TYPE` up to `M::SCHEMA_VERSION`. The envelope is not changed.
    ///
    /// An envelope of another type is an [`UpcastError::WrongType`]; a payload
    /// that does not decode as `M` once upcast is an
    /// [`UpcastError::Decode`] (poison).
    pub fn decode<M: Message>(&self, envelope: &Envelope) -> Result<M, UpcastError> {
        if envelope.event_type != M::TYPE {
            return Err(UpcastError::WrongType {
                found: envelope.event_type.clone(),
                expected: M::TYPE,
            });
        }
        if envelope.schema_version == M::SCHEMA_VERSION {
            return envelope.decode().map_err(UpcastError::Decode);
        }
        let payload = self.upcast_payload_to(envelope, M::SCHEMA_VERSION)?;
        serde_json::from_value(payload).map_err(|err| UpcastError::Decode(DecodeError::Json(err)))
    }

    /// The payload of `envelope` as JSON, brought from its schema version to
    /// `target`.
    fn upcast_payload_to(&self, envelope: &Envelope, target: u32) -> Result<Value, UpcastError> {
        let event_type = &envelope.event_type;
        let found = envelope.schema_version;
        if found > target {
            return Err(UpcastError::FutureVersion {
                event_type: event_type.clone(),
                found,
                current: target,
            });
        }
        // Find every step before touching the payload, so a missing one is
        // reported as such whatever the payload holds.
        let steps = (found..target)
            .map(|from| {
                self.steps
                    .get(&(event_type.clone(), from))
                    .ok_or_else(|| UpcastError::NoPath {
                        event_type: event_type.clone(),
                        found,
                        current: target,
                        missing: from,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut payload: Value = envelope.decode().map_err(UpcastError::Decode)?;
        for (from, step) in (found..target).zip(steps) {
            payload = step(payload).map_err(|source| UpcastError::Step {
                event_type: event_type.clone(),
                from,
                source,
            })?;
        }
        Ok(payload)
    }
}

/// Why a payload could not be brought to the version a service reads.
///
/// [`FutureVersion`](Self::FutureVersion), [`NoPath`](Self::NoPath),
/// [`Step`](Self::Step) and [`WrongType`](Self::WrongType) are
/// [permanent](ErrorClass::Permanent): the message is intact, this service
/// cannot read it yet, and retrying will not change that; dead-letter it and
/// replay it once the service knows the version. [`Decode`](Self::Decode) is
/// [poison](ErrorClass::Poison), like any payload that does not decode.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpcastError {
    /// The payload was written at a version newer than the current one.
    #[error(
        "{event_type} payload has schema version {found}, newer than version {current} this service reads"
    )]
    FutureVersion {
        /// The event type.
        event_type: String,
        /// The envelope's schema version.
        found: u32,
        /// The current (expected) version.
        current: u32,
    },
    /// A step of the chain is not registered.
    #[error(
        "{event_type} payload has schema version {found} and no upcaster leads to version {current} (missing step from version {missing})"
    )]
    NoPath {
        /// The event type.
        event_type: String,
        /// The envelope's schema version.
        found: u32,
        /// The current (expected) version.
        current: u32,
        /// The version with no step to the next one.
        missing: u32,
    },
    /// A step failed on this payload.
    #[error("upcasting {event_type} from schema version {from} failed: {source}")]
    Step {
        /// The event type.
        event_type: String,
        /// The version the failing step converts from.
        from: u32,
        /// What the step reported.
        source: BoxError,
    },
    /// The envelope is not of the type being decoded.
    #[error("a {found} message cannot be decoded as {expected}")]
    WrongType {
        /// The envelope's type.
        found: String,
        /// The type asked for.
        expected: &'static str,
    },
    /// The payload does not decode (before or after upcasting).
    #[error(transparent)]
    Decode(DecodeError),
}

impl Classify for UpcastError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::Decode(_) => ErrorClass::Poison,
            _ => ErrorClass::Permanent,
        }
    }
}

/// Upcasts every message before the handler it wraps (see [`Upcast`]).
///
/// ```
/// use surety_core::consumer::{handler_fn, Incoming};
/// use surety_core::tower::{Layer, Service, ServiceExt};
/// use surety_core::upcast::{UpcastLayer, Upcasters};
/// use surety_core::{Classify, DeliveryInfo, Envelope, ErrorClass};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let upcasters = Upcasters::new()
///     .current_version("order.placed", 2)
///     .step("order.placed", 1, |mut v| { v["currency"] = "EUR".into(); v });
/// let handler = handler_fn(|msg: Incoming| async move {
///     // The handler sees version 2 only.
///     assert_eq!(msg.envelope.schema_version, 2);
///     Ok::<_, std::convert::Infallible>(())
/// });
/// let mut service = UpcastLayer::new(upcasters).layer(handler);
///
/// let info = DeliveryInfo::new("memory", "orders", "billing");
/// let old = Envelope::builder("/shop", "order.placed").schema_version(1).payload("{}").build();
/// service.ready().await.unwrap().call(Incoming::new(old, info.clone())).await.unwrap();
///
/// let future = Envelope::builder("/shop", "order.placed").schema_version(3).payload("{}").build();
/// let err = service.ready().await.unwrap().call(Incoming::new(future, info)).await.unwrap_err();
/// assert_eq!(err.class(), ErrorClass::Permanent);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct UpcastLayer {
    upcasters: Arc<Upcasters>,
}

impl UpcastLayer {
    /// A layer that upcasts with `upcasters`.
    pub fn new(upcasters: Upcasters) -> Self {
        Self {
            upcasters: Arc::new(upcasters),
        }
    }
}

impl<S> Layer<S> for UpcastLayer {
    type Service = Upcast<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Upcast {
            inner,
            upcasters: Arc::clone(&self.upcasters),
        }
    }
}

/// A handler that receives every message at the current schema version of
/// its type.
///
/// It rewrites `incoming.envelope` with [`Upcasters::upcast`] and calls the
/// inner service; an [`UpcastError`] fails the message as a
/// [`HandlerError`] of the error's class (permanent, or poison for a payload
/// that is not JSON), and the inner service does not run. Messages of
/// unregistered types pass through unchanged. The response type is the
/// inner service's.
#[derive(Debug, Clone)]
pub struct Upcast<S> {
    inner: S,
    upcasters: Arc<Upcasters>,
}

impl<S> Upcast<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The registry in use.
    pub fn upcasters(&self) -> &Upcasters {
        &self.upcasters
    }
}

impl<S> Service<Incoming> for Upcast<S>
where
    S: Service<Incoming, Error = HandlerError>,
{
    type Response = S::Response;
    type Error = HandlerError;
    type Future = Either<Ready<Result<S::Response, HandlerError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut msg: Incoming) -> Self::Future {
        match self.upcasters.upcast(&mut msg.envelope) {
            Ok(()) => Either::Right(self.inner.call(msg)),
            Err(err) => Either::Left(std::future::ready(Err(HandlerError::new(err)))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};
    use serde_json::json;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Renamed {
        name: String,
    }

    impl Message for Renamed {
        const TYPE: &'static str = "test.renamed";
        const SCHEMA_VERSION: u32 = 3;
    }

    fn registry() -> Upcasters {
        Upcasters::new()
            .current::<Renamed>()
            .step(Renamed::TYPE, 1, |v| json!({ "full_name": v["n"] }))
            .step(Renamed::TYPE, 2, |v| json!({ "name": v["full_name"] }))
    }

    fn at(version: u32, payload: Value) -> Envelope {
        Envelope::builder("/test", Renamed::TYPE)
            .schema_version(version)
            .payload(payload.to_string())
            .build()
    }

    #[test]
    fn walks_every_step_and_sets_the_version() {
        let mut env = at(1, json!({ "n": "ada" }));
        registry().upcast(&mut env).unwrap();
        assert_eq!(env.schema_version, 3);
        assert_eq!(env.decode::<Renamed>().unwrap().name, "ada");
        let mut env = at(2, json!({ "full_name": "bob" }));
        registry().upcast(&mut env).unwrap();
        assert_eq!(env.decode::<Renamed>().unwrap().name, "bob");
    }

    #[test]
    fn unknown_types_and_current_versions_pass_through_untouched() {
        let other = Envelope::builder("/test", "test.other")
            .schema_version(7)
            .payload("not even json")
            .build();
        let mut env = other.clone();
        registry().upcast(&mut env).unwrap();
        assert_eq!(env, other);

        let current = at(3, json!({ "name": "x" }));
        let mut env = current.clone();
        registry().upcast(&mut env).unwrap();
        assert_eq!(env, current);
    }

    #[test]
    fn future_versions_are_permanent_and_named() {
        let mut env = at(4, json!({ "name": "x" }));
        let before = env.clone();
        let err = registry().upcast(&mut env).unwrap_err();
        assert_eq!(err.class(), ErrorClass::Permanent);
        assert_eq!(
            err.to_string(),
            "test.renamed payload has schema version 4, newer than version 3 this service reads"
        );
        assert_eq!(env, before, "a failed upcast leaves the envelope as it was");
    }

    #[test]
    fn missing_steps_are_permanent_and_named() {
        let upcasters = Upcasters::new()
            .current::<Renamed>()
            .step(Renamed::TYPE, 2, |v| v);
        let err = upcasters
            .decode::<Renamed>(&at(1, json!({ "n": "x" })))
            .unwrap_err();
        assert_eq!(err.class(), ErrorClass::Permanent);
        let message = err.to_string();
        for part in ["test.renamed", "version 1", "version 3"] {
            assert!(message.contains(part), "{message:?} names {part}");
        }
    }

    #[test]
    fn failing_steps_are_permanent_and_bad_payloads_poison() {
        let upcasters = Upcasters::new()
            .current_version("t", 2)
            .try_step("t", 1, |v: Value| {
                v.get("id").cloned().ok_or("field `id` is missing")
            });
        let mut env = Envelope::builder("/s", "t").payload("{}").build();
        let err = upcasters.upcast(&mut env).unwrap_err();
        assert_eq!(err.class(), ErrorClass::Permanent);
        assert_eq!(
            err.to_string(),
            "upcasting t from schema version 1 failed: field `id` is missing"
        );

        let mut env = Envelope::builder("/s", "t").payload("{nope").build();
        let err = upcasters.upcast(&mut env).unwrap_err();
        assert_eq!(err.class(), ErrorClass::Poison);
    }

    #[test]
    fn decode_refuses_other_types() {
        let env = Envelope::builder("/s", "test.other")
            .payload(r#"{"name":"x"}"#)
            .build();
        let err = registry().decode::<Renamed>(&env).unwrap_err();
        assert_eq!(err.class(), ErrorClass::Permanent);
        assert_eq!(
            err.to_string(),
            "a test.other message cannot be decoded as test.renamed"
        );
    }

    #[test]
    fn debug_lists_types_and_steps() {
        assert_eq!(
            format!("{:?}", registry()),
            r#"Upcasters { current: {"test.renamed": 3}, steps: {"test.renamed": [1, 2]} }"#
        );
    }

    #[test]
    fn public_types_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Upcasters>();
        check::<UpcastLayer>();
        check::<Upcast<()>>();
        check::<UpcastError>();
    }
}
