//! Every past schema version of the sample order events, as producers put
//! them on the wire (`tests/golden/`), is projected through the upcaster
//! chain into the same order summary as the current version; a version from
//! the future stops the runner at its offset, which is never passed.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{Sqlite, Transaction};
use surety_core::memory::MemoryLog;
use surety_core::upcast::{UpcastError, Upcasters};
use surety_core::{Classify, Envelope, ErrorClass, HandlerError, Message, Publisher};
use surety_projection::{
    Applied, CheckpointStore, EventSet, Projection, ProjectionError, Runner, RunnerOptions,
    SqliteCheckpoints,
};
use surety_testkit::db::TempSqlite;
use surety_testkit::wait::eventually;

const DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
    customer_id: String,
    total: Money,
    channel: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Money {
    cents: i64,
    currency: String,
}

impl Message for OrderPlaced {
    const TYPE: &'static str = "com.example.order.placed";
    const SCHEMA_VERSION: u32 = 3;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderShipped {
    order_id: String,
    carrier: String,
    shipped_at: String,
}

impl Message for OrderShipped {
    const TYPE: &'static str = "com.example.order.shipped";
    const SCHEMA_VERSION: u32 = 2;
}

enum OrderEvent {
    Placed(OrderPlaced),
    Shipped(OrderShipped),
}

impl EventSet for OrderEvent {
    fn decode(upcasters: &Upcasters, envelope: &Envelope) -> Result<Option<Self>, UpcastError> {
        Ok(match envelope.event_type.as_str() {
            OrderPlaced::TYPE => Some(Self::Placed(upcasters.decode(envelope)?)),
            OrderShipped::TYPE => Some(Self::Shipped(upcasters.decode(envelope)?)),
            _ => None,
        })
    }
}

fn upcasters() -> Upcasters {
    Upcasters::new()
        .current::<OrderPlaced>()
        .current::<OrderShipped>()
        .try_step(OrderPlaced::TYPE, 1, |mut v1: Value| {
            let amount = v1["amount"]
                .as_f64()
                .ok_or("v1 field `amount` is not a number")?;
            let fields = v1.as_object_mut().ok_or("v1 payload is not an object")?;
            fields.remove("amount");
            fields.insert("total_cents".into(), json!((amount * 100.0).round() as i64));
            fields.insert("currency".into(), json!("EUR"));
            Ok::<_, String>(v1)
        })
        .step(OrderPlaced::TYPE, 2, |v2| {
            json!({
                "order_id": v2["order_id"],
                "customer_id": v2["customer"],
                "total": { "cents": v2["total_cents"], "currency": v2["currency"] },
                "channel": "web",
            })
        })
        .try_step(OrderShipped::TYPE, 1, |v1: Value| {
            let seconds = v1["shipped_at_unix"]
                .as_i64()
                .ok_or("v1 field `shipped_at_unix` is not an integer")?;
            let at = chrono::DateTime::from_timestamp(seconds, 0).ok_or("out of range")?;
            Ok::<_, String>(json!({
                "order_id": v1["order_id"],
                "carrier": v1["carrier_code"].as_str().unwrap_or_default().to_lowercase(),
                "shipped_at": at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            }))
        })
}

/// One row per order: who, how much, how it was shipped.
struct Summary;

impl Projection<Sqlite> for Summary {
    type Event = OrderEvent;

    fn name(&self) -> &str {
        "order_summary"
    }

    async fn apply(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        event: &Applied<OrderEvent>,
    ) -> Result<(), HandlerError> {
        let query = match &event.event {
            OrderEvent::Placed(placed) => sqlx::query(
                "INSERT INTO order_summary (order_id, customer_id, cents, currency, channel)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&placed.order_id)
            .bind(&placed.customer_id)
            .bind(placed.total.cents)
            .bind(&placed.total.currency)
            .bind(&placed.channel),
            OrderEvent::Shipped(shipped) => sqlx::query(
                "UPDATE order_summary SET carrier = $2, shipped_at = $3 WHERE order_id = $1",
            )
            .bind(&shipped.order_id)
            .bind(&shipped.carrier)
            .bind(&shipped.shipped_at),
        };
        query
            .execute(&mut **tx)
            .await
            .map_err(HandlerError::transient)?;
        Ok(())
    }
}

fn golden(name: &str, version: u32) -> Vec<u8> {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests",
        "golden",
        &format!("{name}.v{version}.json"),
    ]
    .iter()
    .collect();
    std::fs::read(&path).unwrap_or_else(|err| panic!("reading {}: {err}", path.display()))
}

/// The golden payload of `version`, for order `order_id`.
fn envelope(event_type: &str, name: &str, version: u32, order_id: &str) -> Envelope {
    let mut payload: Value = serde_json::from_slice(&golden(name, version)).expect("golden JSON");
    payload["order_id"] = json!(order_id);
    Envelope::builder("/orders", event_type)
        .schema_version(version)
        .partition_key(order_id)
        .payload(serde_json::to_vec(&payload).expect("JSON"))
        .build()
}

type Row = (String, i64, String, String, Option<String>, Option<String>);

async fn setup() -> (TempSqlite, MemoryLog) {
    let db = TempSqlite::new(2, Duration::from_secs(5)).await;
    surety_projection::sqlite::migrate(&db.pool)
        .await
        .expect("migrations");
    sqlx::query(
        "CREATE TABLE order_summary (order_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL,
         cents INTEGER NOT NULL, currency TEXT NOT NULL, channel TEXT NOT NULL,
         carrier TEXT, shipped_at TEXT)",
    )
    .execute(&db.pool)
    .await
    .expect("the read model table");
    (db, MemoryLog::with_partitions(2))
}

fn runner(log: &MemoryLog, db: &TempSqlite) -> Runner<MemoryLog, Summary, SqliteCheckpoints> {
    Runner::new(
        log.clone(),
        "orders",
        "summary",
        Summary,
        SqliteCheckpoints::new(db.pool.clone()),
    )
    .upcasters(upcasters())
    .options(RunnerOptions::default().batch(10, Duration::from_millis(5)))
}

#[tokio::test]
async fn every_past_version_projects_like_the_current_one() {
    let (db, log) = setup().await;
    let mut expected = Vec::new();
    for placed in 1..=OrderPlaced::SCHEMA_VERSION {
        for shipped in 1..=OrderShipped::SCHEMA_VERSION {
            let order_id = format!("o-p{placed}-s{shipped}");
            log.publish(
                "orders",
                envelope(OrderPlaced::TYPE, "order_placed", placed, &order_id),
            )
            .await
            .expect("published");
            log.publish(
                "orders",
                envelope(OrderShipped::TYPE, "order_shipped", shipped, &order_id),
            )
            .await
            .expect("published");
            expected.push((
                order_id,
                4250,
                "EUR".to_owned(),
                "web".to_owned(),
                Some("dhl".to_owned()),
                Some("2025-12-04T00:00:00Z".to_owned()),
            ));
        }
    }
    let runner = runner(&log, &db);
    let status = runner.status();
    let task = tokio::spawn(runner.run());
    eventually(DEADLINE, "the runner to catch up", || async {
        status.caught_up()
    })
    .await;
    task.abort();

    let rows: Vec<Row> = sqlx::query_as(
        "SELECT order_id, cents, currency, channel, carrier, shipped_at FROM order_summary ORDER BY order_id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("the read model");
    expected.sort();
    assert_eq!(rows, expected);
    let customers: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT customer_id FROM order_summary")
            .fetch_all(&db.pool)
            .await
            .expect("the read model");
    assert_eq!(customers, ["c-42"]);
}

#[tokio::test]
async fn a_future_version_stops_the_runner_at_its_offset() {
    let (db, log) = setup().await;
    for (version, order_id) in [(3, "o-1"), (4, "o-1"), (3, "o-2")] {
        let mut event = envelope(OrderPlaced::TYPE, "order_placed", version, order_id);
        event.partition_key = Some("same-partition".into());
        log.publish("orders", event).await.expect("published");
    }
    let err = tokio::time::timeout(DEADLINE, runner(&log, &db).run())
        .await
        .expect("the runner to stop")
        .expect_err("the future version to fail");
    assert_eq!(err.class(), ErrorClass::Permanent);
    assert!(
        matches!(&err, ProjectionError::Apply { offset: 1, event_type, .. } if event_type == OrderPlaced::TYPE),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("com.example.order.placed"),
        "{err}"
    );

    // Nothing of the failed batch is committed, and the position stops before it.
    let orders: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM order_summary")
        .fetch_one(&db.pool)
        .await
        .expect("the read model");
    let store = SqliteCheckpoints::new(db.pool.clone());
    let stored: Vec<(i32, i64)> = store
        .checkpoints("order_summary", "orders")
        .await
        .expect("checkpoints");
    assert!(stored.is_empty(), "{stored:?}");
    assert_eq!(
        orders, 0,
        "the batch with the future version was rolled back"
    );
}
