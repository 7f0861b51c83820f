//! A service as users write one: three handlers on two topics (a router
//! with two message types, and a typed handler) and the outbox relay that
//! feeds them, all run by one `Host` and stopped by one shutdown signal.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use surety_core::consumer::{Incoming, Router, Worker, typed};
use surety_core::host::{Host, State};
use surety_core::memory::MemoryTransport;
use surety_core::{Envelope, Message};
use surety_outbox::{Relay, SqliteOutbox};
use surety_testkit::db::TempSqlite;
use surety_testkit::wait::eventually_every;

#[derive(serde::Serialize, serde::Deserialize)]
struct OrderPlaced {
    order_id: String,
}
impl Message for OrderPlaced {
    const TYPE: &'static str = "shop.order.placed";
}

#[derive(serde::Serialize, serde::Deserialize)]
struct OrderCancelled {
    order_id: String,
}
impl Message for OrderCancelled {
    const TYPE: &'static str = "shop.order.cancelled";
}

#[derive(serde::Serialize, serde::Deserialize)]
struct PaymentCaptured {
    order_id: String,
}
impl Message for PaymentCaptured {
    const TYPE: &'static str = "shop.payment.captured";
}

type Seen = Arc<Mutex<Vec<String>>>;

fn note(seen: &Seen, what: String) {
    seen.lock().unwrap().push(what);
}

#[tokio::test]
async fn three_handlers_on_two_topics_and_a_relay_stop_together() {
    let db = TempSqlite::new(4, Duration::from_secs(10)).await;
    surety_outbox::sqlite::migrate(&db.pool).await.unwrap();
    let outbox = SqliteOutbox::new(db.pool.clone());
    let transport = MemoryTransport::new();

    // The business transaction writes its events into the outbox.
    let mut tx = db.pool.begin().await.unwrap();
    let rows: [(&str, Envelope); 3] = [
        (
            "orders",
            Envelope::message(
                "/shop",
                &OrderPlaced {
                    order_id: "o-1".into(),
                },
            )
            .unwrap()
            .partition_key("o-1")
            .build(),
        ),
        (
            "payments",
            Envelope::message(
                "/shop",
                &PaymentCaptured {
                    order_id: "o-1".into(),
                },
            )
            .unwrap()
            .partition_key("o-1")
            .build(),
        ),
        (
            "orders",
            Envelope::message(
                "/shop",
                &OrderCancelled {
                    order_id: "o-2".into(),
                },
            )
            .unwrap()
            .partition_key("o-2")
            .build(),
        ),
    ];
    for (topic, envelope) in &rows {
        SqliteOutbox::enqueue(&mut tx, topic, envelope)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();

    let seen: Seen = Arc::default();
    let orders = {
        let (placed, cancelled) = (Arc::clone(&seen), Arc::clone(&seen));
        Router::new()
            .on(move |order: OrderPlaced, _msg: Incoming| {
                let seen = Arc::clone(&placed);
                async move {
                    note(&seen, format!("placed {}", order.order_id));
                    Ok::<_, std::convert::Infallible>(())
                }
            })
            .on(move |order: OrderCancelled, _msg: Incoming| {
                let seen = Arc::clone(&cancelled);
                async move {
                    note(&seen, format!("cancelled {}", order.order_id));
                    Ok::<_, std::convert::Infallible>(())
                }
            })
    };
    let payments = {
        let seen = Arc::clone(&seen);
        typed(move |payment: PaymentCaptured, _msg: Incoming| {
            let seen = Arc::clone(&seen);
            async move {
                note(&seen, format!("captured {}", payment.order_id));
                Ok::<_, std::convert::Infallible>(())
            }
        })
    };
    let relay = Relay::new(outbox.clone(), transport.clone())
        .name("shop")
        .poll_interval(Duration::from_millis(10));
    let host = Host::new()
        .grace(Duration::from_secs(5))
        .consume(
            transport.clone(),
            "orders",
            "shop",
            Worker::new(orders).concurrency(4),
        )
        .consume(transport.clone(), "payments", "shop", Worker::new(payments))
        .task("outbox-relay", move |shutdown| relay.run(shutdown.wait()));
    let health = host.health();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(host.run(async {
        stopped.await.ok();
    }));

    eventually_every(
        Duration::from_secs(10),
        Duration::from_millis(5),
        "every event relayed and handled",
        || async { seen.lock().unwrap().len() == 3 },
    )
    .await;
    assert!(health.is_ready() && health.is_live(), "{health:?}");

    stop.send(()).ok();
    let report = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the host stops within its grace period")
        .unwrap();
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    assert_eq!(seen, ["cancelled o-2", "captured o-1", "placed o-1"]);
    assert_eq!(report.total().handled, 3);
    assert!(report.abandoned.is_empty(), "{report:?}");
    assert!(
        health
            .parts()
            .iter()
            .all(|(_, state)| *state == State::Stopped),
        "{health:?}"
    );
    assert_eq!(
        surety_outbox::OutboxStore::backlog(&outbox)
            .await
            .unwrap()
            .pending,
        0
    );
}

/// A handler's outputs written with its own transaction are relayed in
/// order; rolled back, they are not.
#[tokio::test]
async fn outputs_enqueued_in_the_handler_s_transaction_are_relayed() {
    use futures::StreamExt;
    use surety_core::Subscriber;
    use surety_core::consumer::Output;

    let db = TempSqlite::new(4, Duration::from_secs(10)).await;
    surety_outbox::sqlite::migrate(&db.pool).await.unwrap();
    let outbox = SqliteOutbox::new(db.pool.clone());
    let transport = MemoryTransport::new();
    let mut replies = transport
        .subscribe("checkout.replies", "checkout")
        .await
        .unwrap();

    let request = Envelope::builder("/checkout", "payment.capture")
        .reply_to("checkout.replies")
        .build();
    let reply = request
        .reply(
            "/payments",
            &PaymentCaptured {
                order_id: "o-1".into(),
            },
        )
        .unwrap();
    let audit = Output::new(
        "audit",
        request.caused_by("/payments", "payment.audited").build(),
    );
    let mut tx = db.pool.begin().await.unwrap();
    SqliteOutbox::enqueue_outputs(&mut tx, &[reply.clone(), audit.clone()])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut rolled_back = db.pool.begin().await.unwrap();
    SqliteOutbox::enqueue_outputs(&mut rolled_back, &[audit])
        .await
        .unwrap();
    rolled_back.rollback().await.unwrap();

    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM surety_outbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 2, "the rolled-back transaction wrote nothing");

    let relay = Relay::new(outbox.clone(), transport.clone()).name("outputs");
    relay.run_once().await.unwrap();
    let delivered = replies.next().await.unwrap().unwrap();
    assert_eq!(delivered.envelope().id, reply.envelope.id);
    assert_eq!(
        surety_outbox::OutboxStore::backlog(&outbox)
            .await
            .unwrap()
            .pending,
        0
    );
}
