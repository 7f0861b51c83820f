//! Which messages count as the same: [`KeyFn`].

use surety_core::HandlerError;
use surety_core::consumer::Incoming;

/// Computes the dedup key of a message: two deliveries with the same key
/// are the same message, and only the first is handled.
///
/// [`EnvelopeKey`] (the default) uses the envelope's `source` and `id`.
/// Any `Fn(&Incoming) -> Result<String, HandlerError>` is a key function
/// too, for keys taken from the business data, such as an order id and a
/// processing step. A key function that fails (a payload that does not
/// decode) fails the delivery with its error, before anything is claimed.
///
/// Keys share one namespace per store: when several consumers (different
/// groups, different handlers) use one store, put the consumer's name in
/// the key, or one consumer's first delivery makes the other's a duplicate.
///
/// ```
/// use serde::Deserialize;
/// use surety_core::{Envelope, DeliveryInfo, HandlerError};
/// use surety_core::consumer::Incoming;
/// use surety_idempotency::{EnvelopeKey, KeyFn};
///
/// #[derive(Deserialize)]
/// struct ReserveStock { order_id: String }
///
/// let by_order = |msg: &Incoming| -> Result<String, HandlerError> {
///     let cmd: ReserveStock = msg.envelope.decode().map_err(HandlerError::new)?;
///     Ok(format!("inventory/reserve/{}", cmd.order_id))
/// };
///
/// let env = Envelope::builder("/checkout", "stock.reserve")
///     .json(&serde_json::json!({ "order_id": "o-7" }))?
///     .build();
/// let msg = Incoming::new(env.clone(), DeliveryInfo::new("memory", "inventory", "reservations"));
/// assert_eq!(by_order.key(&msg)?, "inventory/reserve/o-7");
/// assert_eq!(EnvelopeKey.key(&msg)?, env.dedup_key());
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// ```
pub trait KeyFn: Send + Sync + 'static {
    /// The dedup key of `msg`.
    fn key(&self, msg: &Incoming) -> Result<String, HandlerError>;
}

/// The default key: [`Envelope::dedup_key`](surety_core::Envelope::dedup_key),
/// the envelope's `source` and `id`.
#[derive(Debug, Clone, Copy, Default)]
pub struct EnvelopeKey;

impl KeyFn for EnvelopeKey {
    fn key(&self, msg: &Incoming) -> Result<String, HandlerError> {
        // `Envelope::dedup_key` is `format!("{} {}", source, id)`; built
        // directly, it skips the formatting machinery on every delivery.
        let (source, id) = (&msg.envelope.source, &msg.envelope.id);
        let mut key = String::with_capacity(source.len() + 1 + id.len());
        key.push_str(source);
        key.push(' ');
        key.push_str(id);
        Ok(key)
    }
}

impl<F> KeyFn for F
where
    F: Fn(&Incoming) -> Result<String, HandlerError> + Send + Sync + 'static,
{
    fn key(&self, msg: &Incoming) -> Result<String, HandlerError> {
        self(msg)
    }
}

#[cfg(test)]
mod tests {
    use surety_core::{DeliveryInfo, Envelope};

    use super::*;

    #[test]
    fn the_envelope_key_is_the_envelopes_dedup_key() {
        for env in [
            Envelope::builder("/orders", "order.placed").build(),
            Envelope::builder("", "order.placed").id("").build(),
            Envelope::builder("urn:shop:orders", "order.placed")
                .id("o 7")
                .build(),
        ] {
            let msg = Incoming::new(env.clone(), DeliveryInfo::new("memory", "t", "g"));
            assert_eq!(EnvelopeKey.key(&msg).unwrap(), env.dedup_key());
        }
    }
}
