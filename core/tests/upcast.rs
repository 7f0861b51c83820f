//! Upcasting a sample `order.placed` event through three schema versions:
//! golden payloads of every version decode into the current struct, a future
//! version and a broken chain fail permanently (never dropped), upcasting is
//! idempotent at the current version, and the layer does the same in a
//! running worker.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use surety_core::consumer::{Incoming, Worker, typed};
use surety_core::memory::MemoryTransport;
use surety_core::upcast::{UpcastError, UpcastLayer, Upcasters};
use surety_core::{Classify, Envelope, ErrorClass, Message, Publisher, Subscriber};
use surety_testkit::wait::eventually;

const DEADLINE: Duration = Duration::from_secs(10);

/// The current (version 3) shape of the sample event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
    customer_id: String,
    total: Money,
    channel: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Money {
    cents: u64,
    currency: String,
}

impl Message for OrderPlaced {
    const TYPE: &'static str = "com.example.order.placed";
    const SCHEMA_VERSION: u32 = 3;
}

/// The chain a service reading version 3 registers.
fn upcasters() -> Upcasters {
    Upcasters::new()
        .current::<OrderPlaced>()
        // v1 -> v2: `amount` in major units becomes `total_cents`; every v1
        // order was in euros.
        .try_step(OrderPlaced::TYPE, 1, |mut v1: Value| {
            let amount = v1["amount"]
                .as_f64()
                .ok_or("v1 field `amount` is not a number")?;
            let cents = (amount * 100.0).round();
            if !(0.0..=u64::MAX as f64).contains(&cents) {
                return Err(format!("v1 amount {amount} is out of range"));
            }
            let fields = v1.as_object_mut().ok_or("v1 payload is not an object")?;
            fields.remove("amount");
            fields.insert("total_cents".into(), json!(cents as u64));
            fields.insert("currency".into(), json!("EUR"));
            Ok(v1)
        })
        // v2 -> v3: `customer` is renamed, the total becomes a money object,
        // and orders before v3 all came from the web shop.
        .step(OrderPlaced::TYPE, 2, |v2| {
            json!({
                "order_id": v2["order_id"],
                "customer_id": v2["customer"],
                "total": { "cents": v2["total_cents"], "currency": v2["currency"] },
                "channel": "web",
            })
        })
}

fn expected() -> OrderPlaced {
    OrderPlaced {
        order_id: "o-1017".into(),
        customer_id: "c-42".into(),
        total: Money {
            cents: 4250,
            currency: "EUR".into(),
        },
        channel: "web".into(),
    }
}

fn golden(version: u32) -> Vec<u8> {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests",
        "golden",
        &format!("order_placed.v{version}.json"),
    ]
    .iter()
    .collect();
    std::fs::read(&path).unwrap_or_else(|err| panic!("reading {}: {err}", path.display()))
}

fn envelope(version: u32, payload: impl Into<surety_core::bytes::Bytes>) -> Envelope {
    Envelope::builder("/orders", OrderPlaced::TYPE)
        .schema_version(version)
        .partition_key("o-1017")
        .payload(payload)
        .build()
}

#[test]
fn every_golden_version_decodes_into_the_current_struct() {
    let upcasters = upcasters();
    for version in 1..=OrderPlaced::SCHEMA_VERSION {
        let env = envelope(version, golden(version));
        let decoded: OrderPlaced = upcasters
            .decode(&env)
            .unwrap_or_else(|err| panic!("version {version}: {err}"));
        assert_eq!(decoded, expected(), "version {version}");

        let mut upcast = env.clone();
        upcasters.upcast(&mut upcast).unwrap();
        assert_eq!(upcast.schema_version, OrderPlaced::SCHEMA_VERSION);
        assert_eq!(upcast.decode::<OrderPlaced>().unwrap(), expected());
        // Everything but the payload and its version is kept.
        assert_eq!(
            (upcast.id, upcast.source, upcast.partition_key, upcast.time),
            (env.id, env.source, env.partition_key, env.time)
        );
    }
}

#[test]
fn the_current_golden_file_is_what_the_current_struct_writes() {
    let written: Value = serde_json::to_value(expected()).unwrap();
    let golden: Value = serde_json::from_slice(&golden(OrderPlaced::SCHEMA_VERSION)).unwrap();
    assert_eq!(written, golden);
}

#[test]
fn a_future_version_fails_permanently_and_says_so() {
    let env = envelope(4, golden(4));
    let err = upcasters().decode::<OrderPlaced>(&env).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Permanent);
    assert!(matches!(
        err,
        UpcastError::FutureVersion {
            found: 4,
            current: 3,
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        "com.example.order.placed payload has schema version 4, newer than version 3 this service reads"
    );

    let mut kept = env.clone();
    assert!(upcasters().upcast(&mut kept).is_err());
    assert_eq!(kept, env, "the message is left intact for dead-lettering");
}

#[test]
fn a_version_with_no_path_fails_permanently_and_says_so() {
    // A service that dropped the v1 step: v2 payloads still read, v1 fail.
    let without_v1 = Upcasters::new()
        .current::<OrderPlaced>()
        .step(OrderPlaced::TYPE, 2, |v| v);
    let err = without_v1
        .decode::<OrderPlaced>(&envelope(1, golden(1)))
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Permanent);
    assert_eq!(
        err.to_string(),
        "com.example.order.placed payload has schema version 1 and no upcaster leads to version 3 (missing step from version 1)"
    );

    // Version 0 was never written; nothing leads from it either.
    let err = upcasters()
        .decode::<OrderPlaced>(&envelope(0, "{}"))
        .unwrap_err();
    assert!(matches!(err, UpcastError::NoPath { missing: 0, .. }));
}

#[test]
fn a_step_that_cannot_read_its_payload_fails_permanently() {
    let env = envelope(1, r#"{"order_id":"o-1","customer":"c","amount":"lots"}"#);
    let err = upcasters().decode::<OrderPlaced>(&env).unwrap_err();
    assert_eq!(err.class(), ErrorClass::Permanent);
    assert_eq!(
        err.to_string(),
        "upcasting com.example.order.placed from schema version 1 failed: v1 field `amount` is not a number"
    );
}

fn money() -> impl Strategy<Value = Money> {
    (any::<u64>(), "[A-Z]{3}").prop_map(|(cents, currency)| Money { cents, currency })
}

fn order() -> impl Strategy<Value = OrderPlaced> {
    (".{0,20}", ".{0,20}", money(), ".{0,10}").prop_map(
        |(order_id, customer_id, total, channel)| OrderPlaced {
            order_id,
            customer_id,
            total,
            channel,
        },
    )
}

proptest! {
    /// At the current version upcasting changes nothing, not even the
    /// payload's bytes; and an upcast envelope is at the current version, so
    /// upcasting it again changes nothing either.
    #[test]
    fn upcasting_is_idempotent_at_the_current_version(
        order in order(),
        customer in ".{0,20}",
        cents in 0u64..1_000_000_000,
    ) {
        let upcasters = upcasters();
        let current = Envelope::message("/orders", &order).unwrap().build();
        let mut again = current.clone();
        upcasters.upcast(&mut again).unwrap();
        prop_assert_eq!(&again, &current);

        let v2 = envelope(2, json!({
            "order_id": order.order_id,
            "customer": customer,
            "total_cents": cents,
            "currency": "EUR",
        }).to_string());
        let mut once = v2;
        upcasters.upcast(&mut once).unwrap();
        let mut twice = once.clone();
        upcasters.upcast(&mut twice).unwrap();
        prop_assert_eq!(&twice, &once);
        prop_assert_eq!(once.decode::<OrderPlaced>().unwrap().total.cents, cents);
    }
}

#[tokio::test]
async fn the_layer_upcasts_old_messages_and_rejects_future_ones_in_a_worker() {
    let transport = MemoryTransport::new();
    let deliveries = transport.subscribe("orders", "billing").await.unwrap();
    for version in [1, 2, 3, 4] {
        transport
            .publish("orders", envelope(version, golden(version)))
            .await
            .unwrap();
    }

    let seen = Arc::new(Mutex::new(Vec::new()));
    let handled = seen.clone();
    let handler = typed(move |order: OrderPlaced, msg: Incoming| {
        handled
            .lock()
            .unwrap()
            .push((msg.envelope.schema_version, order));
        async { Ok::<_, std::convert::Infallible>(()) }
    });
    let service = surety_core::tower::Layer::layer(&UpcastLayer::new(upcasters()), handler);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(Worker::new(service).run(deliveries, async {
        stopped.await.ok();
    }));

    let rejected = eventually(DEADLINE, "the v4 message to be rejected", || async {
        let rejected = transport.rejected("orders", "billing");
        (!rejected.is_empty() && seen.lock().unwrap().len() == 3).then_some(rejected)
    })
    .await;
    stop.send(()).unwrap();
    let report = worker.await.unwrap();

    assert_eq!(report.rejected, 1);
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].schema_version, 4);
    assert_eq!(rejected[0].payload, golden(4));
    let seen = seen.lock().unwrap();
    assert!(
        seen.iter()
            .all(|(version, order)| *version == 3 && *order == expected()),
        "{seen:?}"
    );
}
