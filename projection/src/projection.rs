//! The [`Projection`] trait: typed events applied to a read model inside
//! its own transaction.

use std::future::Future;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use sqlx::{Database, Transaction};
use surety_core::upcast::{UpcastError, Upcasters};
use surety_core::{Envelope, HandlerError, Message};

/// The events a projection reads, decoded from envelopes after upcasting.
///
/// Every [`Message`] is one (it decodes envelopes of its own type and
/// passes over the rest); a projection over several event types implements
/// it for an enum of them.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use surety_core::upcast::{UpcastError, Upcasters};
/// use surety_core::{Envelope, Message};
/// use surety_projection::EventSet;
///
/// #[derive(Serialize, Deserialize)]
/// struct Placed { order_id: String }
/// impl Message for Placed { const TYPE: &'static str = "order.placed"; }
/// #[derive(Serialize, Deserialize)]
/// struct Cancelled { order_id: String }
/// impl Message for Cancelled { const TYPE: &'static str = "order.cancelled"; }
///
/// enum OrderEvent { Placed(Placed), Cancelled(Cancelled) }
/// impl EventSet for OrderEvent {
///     fn decode(upcasters: &Upcasters, envelope: &Envelope) -> Result<Option<Self>, UpcastError> {
///         Ok(match envelope.event_type.as_str() {
///             Placed::TYPE => Some(Self::Placed(upcasters.decode(envelope)?)),
///             Cancelled::TYPE => Some(Self::Cancelled(upcasters.decode(envelope)?)),
///             _ => None,
///         })
///     }
/// }
///
/// let env = Envelope::builder("/shop", "order.cancelled").payload(r#"{"order_id":"o-1"}"#).build();
/// let decoded = OrderEvent::decode(&Upcasters::new(), &env)?;
/// assert!(matches!(decoded, Some(OrderEvent::Cancelled(c)) if c.order_id == "o-1"));
/// # Ok::<(), UpcastError>(())
/// ```
pub trait EventSet: Sized + Send + Sync + 'static {
    /// The event in `envelope`, brought to its current version by
    /// `upcasters`; `None` for a type the projection does not read (its
    /// position is passed all the same).
    ///
    /// # Errors
    ///
    /// An [`UpcastError`] when the payload cannot be brought up or decoded
    /// (permanent or poison; the event is never skipped silently).
    fn decode(upcasters: &Upcasters, envelope: &Envelope) -> Result<Option<Self>, UpcastError>;
}

impl<M> EventSet for M
where
    M: Message + DeserializeOwned + Send + Sync + 'static,
{
    fn decode(upcasters: &Upcasters, envelope: &Envelope) -> Result<Option<Self>, UpcastError> {
        if envelope.event_type != M::TYPE {
            return Ok(None);
        }
        upcasters.decode(envelope).map(Some)
    }
}

/// How the runner that applies an event is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// Serving: the read model is the live one.
    Live,
    /// Rebuilding a version of the read model that does not serve yet:
    /// side effects (emails, outgoing commands) must be suppressed.
    Rebuild,
}

/// One decoded event, with where it came from.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Applied<E> {
    /// The event, at its current schema version.
    pub event: E,
    /// The envelope it came in (upcast: its payload is at the current
    /// version).
    pub envelope: Envelope,
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The offset in the partition.
    pub offset: i64,
    /// The log's timestamp of the record, when the log gives one.
    pub timestamp: Option<DateTime<Utc>>,
    /// Live or rebuilding.
    pub mode: Mode,
}

/// A read model built from events: [`apply`](Self::apply) writes one event's
/// effect in the read model's transaction, in which the runner then stores
/// the position, so effect and position commit together.
///
/// `apply` must change the read model only through `tx`, and must not
/// depend on anything but the read model and the event (a rebuild replays
/// the same events and must reach the same state). Return a transient
/// [`HandlerError`] for a failure worth retrying (the whole batch is rolled
/// back and retried), a permanent or poison one for an event that can never
/// be applied.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use sqlx::{Sqlite, Transaction};
/// use surety_core::{HandlerError, Message};
/// use surety_projection::{Applied, Projection};
///
/// #[derive(Serialize, Deserialize)]
/// struct OrderPlaced { order_id: String, cents: i64 }
/// impl Message for OrderPlaced { const TYPE: &'static str = "order.placed"; }
///
/// struct Revenue;
/// impl Projection<Sqlite> for Revenue {
///     type Event = OrderPlaced;
///     fn name(&self) -> &str { "revenue" }
///     async fn apply(
///         &self,
///         tx: &mut Transaction<'static, Sqlite>,
///         event: &Applied<OrderPlaced>,
///     ) -> Result<(), HandlerError> {
///         sqlx::query("UPDATE revenue SET cents = cents + $1")
///             .bind(event.event.cents)
///             .execute(&mut **tx)
///             .await
///             .map_err(HandlerError::transient)?;
///         Ok(())
///     }
/// }
/// ```
pub trait Projection<DB: Database>: Send + Sync + 'static {
    /// The events it reads.
    type Event: EventSet;

    /// The projection's stable name: its checkpoints are stored under it.
    fn name(&self) -> &str;

    /// Applies one event inside `tx`.
    fn apply(
        &self,
        tx: &mut Transaction<'static, DB>,
        event: &Applied<Self::Event>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Applies a batch of events, in order, inside one transaction. The
    /// default calls [`apply`](Self::apply) for each; override it to write a
    /// batch at once (one multi-row upsert).
    fn apply_batch(
        &self,
        tx: &mut Transaction<'static, DB>,
        events: &[Applied<Self::Event>],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async move {
            for event in events {
                self.apply(tx, event).await?;
            }
            Ok(())
        }
    }
}
