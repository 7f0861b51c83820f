//! The replay path end to end on the in-memory transport: messages fail
//! and are dead-lettered, the handler is fixed, operators replay one and a
//! filtered group, the fixed handler processes them, the audit trail
//! records it, and a dry run changes nothing.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{eventually, spawn_worker};
use serde::{Deserialize, Serialize};
use surety_core::consumer::{Incoming, Worker, typed};
use surety_core::memory::MemoryTransport;
use surety_core::tower::Layer;
use surety_core::{Envelope, Message, Permanent, Publisher, Subscriber};
use surety_dlq::keys;
use surety_dlq::store::{DlqStore, Filter, PageRequest, SqliteDlqStore};
use surety_dlq::{
    DeadLetter, DiscardRequest, DlqLayer, Edit, ReplayRequest, Replayer, RetryPolicy, Selection,
    Status,
};

const DEADLINE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    order_id: String,
    customer: String,
}

impl Message for Order {
    const TYPE: &'static str = "order.placed";
}

/// What the handler saw when it succeeded: envelope id -> (order, replay count header).
type Handled = Arc<Mutex<HashMap<String, (Order, Option<String>, Option<String>)>>>;

struct Setup {
    transport: MemoryTransport,
    store: Arc<SqliteDlqStore>,
    fixed: Arc<AtomicBool>,
    handled: Handled,
    stop: tokio::sync::oneshot::Sender<()>,
    worker: tokio::task::JoinHandle<surety_core::consumer::WorkerReport>,
}

/// A worker whose handler rejects orders of customers starting with
/// `unknown-` until `fixed` is set, and those of `banned-` customers always.
async fn setup() -> Setup {
    let transport = MemoryTransport::new();
    let store = Arc::new(SqliteDlqStore::in_memory().await.unwrap());
    let fixed = Arc::new(AtomicBool::new(false));
    let handled: Handled = Arc::default();
    let (f, h) = (fixed.clone(), handled.clone());
    let handler = typed(move |order: Order, msg: Incoming| {
        let (fixed, handled) = (f.clone(), h.clone());
        async move {
            if order.customer.starts_with("banned-")
                || (order.customer.starts_with("unknown-") && !fixed.load(Ordering::SeqCst))
            {
                return Err(Permanent::new(format!(
                    "customer {} does not exist",
                    order.customer
                )));
            }
            let replays = msg
                .envelope
                .headers
                .get(keys::REPLAY_COUNT)
                .map(str::to_owned);
            let key = msg.envelope.partition_key.clone();
            handled
                .lock()
                .unwrap()
                .insert(msg.envelope.id.clone(), (order, replays, key));
            Ok(())
        }
    });
    let layer = DlqLayer::new("billing")
        .policy(RetryPolicy::in_place(2))
        .store(store.clone())
        .park_after_replays(2);
    let deliveries = transport.subscribe("orders", "billing").await.unwrap();
    let (stop, worker) = spawn_worker(Worker::new(layer.layer(handler)), deliveries);
    Setup {
        transport,
        store,
        fixed,
        handled,
        stop,
        worker,
    }
}

async fn publish(transport: &MemoryTransport, n: u32, customer: &str) -> String {
    let order = Order {
        order_id: format!("o-{n}"),
        customer: customer.to_owned(),
    };
    let env = Envelope::message("/shop", &order)
        .unwrap()
        .partition_key(format!("o-{n}"))
        .build();
    let id = env.id.clone();
    transport.publish("orders", env).await.unwrap();
    id
}

async fn letters(store: &SqliteDlqStore, filter: Filter) -> Vec<DeadLetter> {
    store
        .list(&filter, &PageRequest::first(1000))
        .await
        .unwrap()
        .items
}

/// Publishes a marker message and waits until it is handled: everything
/// published before it (to the same single consumer) was processed.
async fn barrier(s: &Setup) {
    let id = publish(&s.transport, 999_999, "marker").await;
    eventually(DEADLINE, "the marker to be handled", || {
        let handled = s.handled.clone();
        let id = id.clone();
        async move { handled.lock().unwrap().contains_key(&id) }
    })
    .await;
    s.handled.lock().unwrap().remove(&id);
}

#[tokio::test]
async fn replay_one_and_a_filtered_group_after_the_fix() {
    let s = setup().await;
    let mut unknown = Vec::new();
    for n in 0..4 {
        unknown.push(publish(&s.transport, n, &format!("unknown-{n}")).await);
    }
    let banned = publish(&s.transport, 10, "banned-1").await;
    eventually(DEADLINE, "five dead letters", || {
        let store = s.store.clone();
        async move { store.count(&Filter::new()).await.unwrap() == 5 }
    })
    .await;
    let all = letters(&s.store, Filter::new()).await;
    let unknown_fp = all
        .iter()
        .find(|l| l.envelope.id == unknown[0])
        .unwrap()
        .fingerprint
        .clone();
    let banned_letter = all
        .iter()
        .find(|l| l.envelope.id == banned)
        .unwrap()
        .clone();
    assert_ne!(
        unknown_fp, banned_letter.fingerprint,
        "different failures group apart"
    );
    assert_eq!(
        letters(&s.store, Filter::new().fingerprint(&unknown_fp))
            .await
            .len(),
        4,
        "the four unknown customers group together"
    );
    for l in &all {
        assert_eq!(l.error.class, "permanent");
        assert_eq!(l.attempts, 1, "permanent: no retry");
        assert_eq!(l.source.topic, "orders");
        assert_eq!(l.source.group, "billing");
        assert_eq!(l.handler, "billing");
    }

    let replayer = Replayer::new(s.store.clone(), s.transport.clone());

    // A dry run changes nothing: same records, no audit entry, nothing published.
    let before = letters(&s.store, Filter::new()).await;
    let dry = replayer
        .replay(
            ReplayRequest::filter("alice", Filter::new().fingerprint(&unknown_fp)).dry_run(true),
        )
        .await
        .unwrap();
    assert!(dry.dry_run);
    assert_eq!(dry.done.len(), 4);
    assert_eq!(dry.audit_id, None);
    barrier(&s).await;
    assert_eq!(
        letters(&s.store, Filter::new()).await,
        before,
        "dry run changed the store"
    );
    assert!(
        s.store
            .audit_log(&PageRequest::first(10))
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(
        s.handled.lock().unwrap().is_empty(),
        "dry run published something"
    );

    // The fix is deployed.
    s.fixed.store(true, Ordering::SeqCst);

    // Replay one, with an edited payload (which needs a reason).
    let first = before
        .iter()
        .find(|l| l.envelope.id == unknown[0])
        .unwrap()
        .clone();
    let edited = serde_json::to_vec(&Order {
        order_id: "o-0".into(),
        customer: "unknown-0-corrected".into(),
    })
    .unwrap();
    let without_reason = replayer
        .replay(
            ReplayRequest::ids("alice", [first.id.clone()])
                .edit(Edit::new().payload(edited.clone())),
        )
        .await;
    assert!(without_reason.is_err(), "an edit needs a reason");
    let one = replayer
        .replay(
            ReplayRequest::ids("alice", [first.id.clone()])
                .edit(Edit::new().payload(edited))
                .reason("customer id was mistyped"),
        )
        .await
        .unwrap();
    assert_eq!(one.done, std::slice::from_ref(&first.id));
    eventually(DEADLINE, "the replayed message to be resolved", || {
        let store = s.store.clone();
        let id = first.id.clone();
        async move { store.get(&id).await.unwrap().unwrap().status == Status::Resolved }
    })
    .await;
    {
        let handled = s.handled.lock().unwrap();
        let (order, replays, key) = &handled[&unknown[0]];
        assert_eq!(
            order.customer, "unknown-0-corrected",
            "the edit was applied"
        );
        assert_eq!(replays.as_deref(), Some("1"));
        assert_eq!(key.as_deref(), Some("o-0"), "same key");
    }

    // Replay the rest of the group by filter: only status `dead` is taken.
    let group = replayer
        .replay(
            ReplayRequest::filter("bob", Filter::new().fingerprint(&unknown_fp))
                .reason("customers imported"),
        )
        .await
        .unwrap();
    assert_eq!(group.done.len(), 3, "{group:?}");
    eventually(DEADLINE, "the group to be resolved", || {
        let store = s.store.clone();
        let fp = unknown_fp.clone();
        async move {
            store
                .count(&Filter::new().fingerprint(fp).status([Status::Resolved]))
                .await
                .unwrap()
                == 4
        }
    })
    .await;
    for id in &unknown {
        assert!(
            s.handled.lock().unwrap().contains_key(id),
            "same id {id} handled"
        );
    }
    // The banned customer was not part of the group.
    assert_eq!(
        s.store
            .get(&banned_letter.id)
            .await
            .unwrap()
            .unwrap()
            .status,
        Status::Dead
    );

    // The audit trail: newest first, who, why, what.
    let audit = s
        .store
        .audit_log(&PageRequest::first(10))
        .await
        .unwrap()
        .items;
    assert_eq!(audit.len(), 2);
    assert_eq!(audit[0].actor, "bob");
    assert_eq!(audit[0].action, "replay");
    assert_eq!(audit[0].reason.as_deref(), Some("customers imported"));
    assert_eq!(
        audit[0]
            .selection
            .filter
            .as_ref()
            .unwrap()
            .fingerprint
            .as_deref(),
        Some(unknown_fp.as_str())
    );
    assert_eq!(audit[0].succeeded.len(), 3);
    assert_eq!(audit[1].actor, "alice");
    assert!(audit[1].edited);
    assert_eq!(audit[1].succeeded, std::slice::from_ref(&first.id));
    // Each record's history tells its story.
    let resolved = s.store.get(&first.id).await.unwrap().unwrap();
    let actions: Vec<_> = resolved.history.iter().map(|e| e.action.as_str()).collect();
    // Claimed, published, then recorded as replayed, unless the copy was
    // handled first (then resolved straight from `replaying`).
    assert!(
        actions == ["dead_lettered", "replaying", "replayed", "resolved"]
            || actions == ["dead_lettered", "replaying", "resolved"],
        "{actions:?}"
    );
    assert_eq!(resolved.replay_count, 1);

    s.stop.send(()).ok();
    s.worker.await.unwrap();
}

/// A message that keeps failing after replays is parked after the
/// configured number, and replays by filter leave it alone.
#[tokio::test]
async fn failed_replays_park_the_message() {
    let s = setup().await;
    let id = publish(&s.transport, 1, "banned-7").await;
    eventually(DEADLINE, "dead-lettered", || {
        let store = s.store.clone();
        async move { store.count(&Filter::new()).await.unwrap() == 1 }
    })
    .await;
    let letter = letters(&s.store, Filter::new()).await.remove(0);
    assert_eq!(letter.envelope.id, id);
    let replayer = Replayer::new(s.store.clone(), s.transport.clone());
    for round in 1..=2u32 {
        let report = replayer
            .replay(ReplayRequest::ids("ops", [letter.id.clone()]))
            .await
            .unwrap();
        assert_eq!(report.done.len(), 1, "round {round}");
        let want = if round < 2 {
            Status::Dead
        } else {
            Status::Parked
        };
        eventually(DEADLINE, "the replay to fail again", || {
            let store = s.store.clone();
            let lid = letter.id.clone();
            async move {
                let l = store.get(&lid).await.unwrap().unwrap();
                l.status == want && l.replay_count == round
            }
        })
        .await;
    }
    let parked = s.store.get(&letter.id).await.unwrap().unwrap();
    assert_eq!(
        parked.first_failed_at, letter.first_failed_at,
        "first failure kept across replays"
    );
    let by_filter = replayer
        .replay(ReplayRequest::filter("ops", Filter::new()))
        .await
        .unwrap();
    assert!(
        by_filter.done.is_empty(),
        "parked messages are not replayed by filter"
    );

    // Discard needs a reason, and records it.
    assert!(
        replayer
            .discard(DiscardRequest::new(
                "ops",
                Selection::Ids(vec![letter.id.clone()]),
                " "
            ))
            .await
            .is_err()
    );
    let discarded = replayer
        .discard(DiscardRequest::new(
            "ops",
            Selection::Ids(vec![letter.id.clone()]),
            "customer is banned for good",
        ))
        .await
        .unwrap();
    assert_eq!(discarded.done, std::slice::from_ref(&letter.id));
    let l = s.store.get(&letter.id).await.unwrap().unwrap();
    assert_eq!(l.status, Status::Discarded);
    assert_eq!(
        l.history.last().unwrap().reason.as_deref(),
        Some("customer is banned for good")
    );
    let again = replayer
        .replay(ReplayRequest::ids("ops", [letter.id.clone()]))
        .await
        .unwrap();
    assert_eq!(again.skipped[0].reason, "status discarded");
    s.stop.send(()).ok();
    s.worker.await.unwrap();
}

/// Replays respect the rate limit.
#[tokio::test]
async fn replays_are_rate_limited() {
    let s = setup().await;
    for n in 0..6 {
        publish(&s.transport, n, "banned-x").await;
    }
    eventually(DEADLINE, "six dead letters", || {
        let store = s.store.clone();
        async move { store.count(&Filter::new()).await.unwrap() == 6 }
    })
    .await;
    let replayer = Replayer::new(s.store.clone(), s.transport.clone()).rate_limit(20);
    let started = Instant::now();
    let report = replayer
        .replay(ReplayRequest::filter("ops", Filter::new()))
        .await
        .unwrap();
    assert_eq!(report.done.len(), 6);
    // Six replays at 20/s: the first at once, then one every 50 ms.
    assert!(
        started.elapsed() >= Duration::from_millis(240),
        "{:?}",
        started.elapsed()
    );
    s.stop.send(()).ok();
    s.worker.await.unwrap();
}
