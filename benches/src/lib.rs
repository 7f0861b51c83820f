//! Shared fixtures for the Surety benchmarks: a realistic order payload and
//! envelopes that look like the ones a service actually sends.
//!
//! The benchmarks themselves live in `benches/`:
//!
//! - `envelope`: structured JSON, binary (headers) mode and typed payloads;
//! - `propagation`: W3C trace-context inject/extract and typed headers;
//! - `memory_transport`: publish -> ack throughput on the in-memory
//!   transport, raw and through the consumer `Worker`;
//! - `kafka_throughput` and `rabbitmq_throughput`: the side-by-side load
//!   harness ([`load`]): adapter against raw rdkafka / raw lapin on the same
//!   broker, publish and consume, printed as ratios (results in
//!   `docs/benchmarks.md`).
//!
//! Run them with `cargo bench -p surety-benches`, or once each as a smoke
//! test with `cargo test -p surety-benches --benches`.

pub mod load;

use serde::{Deserialize, Serialize};
use surety_core::headers::keys;
use surety_core::{Envelope, Message};

/// The W3C `traceparent` used by every fixture.
pub const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A realistic domain event: ten top-level fields, nested line items and an
/// address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderPlaced {
    /// The order's id.
    pub order_id: String,
    /// Who placed it.
    pub customer_id: String,
    /// When it was placed, RFC 3339.
    pub placed_at: String,
    /// ISO 4217 currency code.
    pub currency: String,
    /// Order total in minor units.
    pub total_cents: u64,
    /// What was ordered.
    pub items: Vec<LineItem>,
    /// Where it goes.
    pub shipping_address: Address,
    /// Whether express shipping was chosen.
    pub express: bool,
    /// A coupon code, if any.
    pub coupon: Option<String>,
    /// The sales channel (`web`, `app`, ...).
    pub channel: String,
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineItem {
    /// The stock-keeping unit.
    pub sku: String,
    /// How many.
    pub quantity: u32,
    /// Price of one, in minor units.
    pub unit_price_cents: u64,
}

/// A postal address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Address {
    /// Street and number.
    pub line1: String,
    /// City.
    pub city: String,
    /// Postal code.
    pub postal_code: String,
    /// ISO 3166-1 alpha-2 country code.
    pub country: String,
}

impl Message for OrderPlaced {
    const TYPE: &'static str = "com.example.shop.order.placed";
    const SCHEMA_VERSION: u32 = 3;
}

/// A sample order with three line items.
pub fn sample_order() -> OrderPlaced {
    OrderPlaced {
        order_id: "o-2024-000123".into(),
        customer_id: "c-98765".into(),
        placed_at: "2025-06-01T12:34:56.789Z".into(),
        currency: "EUR".into(),
        total_cents: 12_497,
        items: vec![
            LineItem {
                sku: "SKU-RED-MUG".into(),
                quantity: 2,
                unit_price_cents: 1_299,
            },
            LineItem {
                sku: "SKU-BLUE-CUP".into(),
                quantity: 1,
                unit_price_cents: 899,
            },
            LineItem {
                sku: "SKU-GREEN-BOWL".into(),
                quantity: 4,
                unit_price_cents: 2_250,
            },
        ],
        shipping_address: Address {
            line1: "Hauptstrasse 42".into(),
            city: "Berlin".into(),
            postal_code: "10115".into(),
            country: "DE".into(),
        },
        express: true,
        coupon: Some("SUMMER10".into()),
        channel: "web".into(),
    }
}

/// An envelope as a service sends it: the sample order as payload, subject,
/// partition key, correlation id, trace context and a tenant header.
pub fn sample_envelope() -> Envelope {
    let order = sample_order();
    Envelope::message("/shop/checkout", &order)
        .expect("the sample order serializes")
        .subject(order.order_id.clone())
        .partition_key(order.order_id.clone())
        .correlation_id("c-checkout-5f2e")
        .header(keys::TRACEPARENT, TRACEPARENT)
        .header("x-tenant", "acme")
        .build()
}

/// `n` envelopes with distinct ids and `keys` distinct partition keys (or
/// none when `keys` is 0), for transport benchmarks.
pub fn envelopes(n: usize, keys: usize) -> Vec<Envelope> {
    let template = sample_envelope();
    (0..n)
        .map(|i| {
            let mut env = template.clone();
            env.id = format!("m-{i}");
            env.partition_key = (keys > 0).then(|| format!("k-{}", i % keys));
            env
        })
        .collect()
}

/// A settler that does nothing, for benches that measure the consumer
/// pipeline without a transport.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopSettle;

#[async_trait::async_trait]
impl surety_core::Settle for NoopSettle {
    async fn ack(self: Box<Self>) -> surety_core::Result<()> {
        Ok(())
    }
    async fn nack(self: Box<Self>, _requeue: bool) -> surety_core::Result<()> {
        Ok(())
    }
    async fn reject(self: Box<Self>) -> surety_core::Result<()> {
        Ok(())
    }
}

/// `batch` as a stream of ready deliveries from `orders`/`fulfilment`,
/// settled by [`NoopSettle`].
pub fn ready_deliveries(batch: Vec<Envelope>) -> surety_core::DeliveryStream {
    use futures::StreamExt;
    let info = surety_core::DeliveryInfo::new("memory", "orders", "fulfilment");
    futures::stream::iter(batch.into_iter().map(move |env| {
        Ok(surety_core::Delivery::new(
            env,
            info.clone(),
            Box::new(NoopSettle),
        ))
    }))
    .boxed()
}
