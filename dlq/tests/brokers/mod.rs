//! Scenarios shared by the RabbitMQ and Kafka integration tests: the same
//! DLQ layer, worker and assertions on both brokers.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use surety_core::consumer::{Incoming, Worker, WorkerReport, typed};
use surety_core::tower::Layer;
use surety_core::{Envelope, HandlerError, Message, Publisher, Subscriber};
use surety_dlq::store::{DlqStore, Filter, MemoryDlqStore};
use surety_dlq::{Backoff, DeadLetter, DlqLayer, RetryMode, RetryPolicy};

/// How long a scenario may take on a real broker.
pub const DEADLINE: Duration = Duration::from_secs(90);

/// What the handler does with an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Fails transiently, every time.
    Transient,
    /// Fails permanently.
    Permanent,
    /// Not even sent as an order: the payload does not decode.
    Poison,
}

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    kind: Kind,
}

impl Message for Order {
    const TYPE: &'static str = "order.placed";
}

/// A retry route as a trait object.
pub type Route = dyn Fn(&Incoming, u32, Duration) -> String + Send + Sync;

/// Per message id: the attempt and time of every handler call.
type Calls = HashMap<String, Vec<(u32, Instant)>>;

/// Where a scenario runs.
pub struct Broker<T> {
    /// One transport per consumer (separate connections), the first also
    /// publishes.
    pub transports: Vec<T>,
    /// The work topic.
    pub topic: String,
    /// The consumer group.
    pub group: String,
    /// Where dead letters are published.
    pub dlq_topic: String,
    /// Other topics each consumer reads in the group (Kafka's retry topic).
    pub also_consume: Vec<String>,
    /// The first retry delay; later ones double.
    pub base_delay: Duration,
    /// The retry route: (message, next attempt, delay) -> topic.
    pub route: Arc<Route>,
}

/// What happened in a scenario.
pub struct Run {
    /// Per message id: the attempt and time of every handler call.
    pub calls: Calls,
    /// The dead letters in the store.
    pub letters: Vec<DeadLetter>,
    /// The dead letters read back from the DLQ topic.
    pub from_dlq_topic: Vec<DeadLetter>,
    /// Retries routed.
    pub retries: usize,
    /// The workers' reports.
    pub reports: Vec<WorkerReport>,
    /// The ids published.
    pub ids: Vec<String>,
}

/// Publishes `messages` orders of `kind` and runs `consumers` competing
/// workers with the DLQ layer (`max_attempts` delayed attempts, delays of
/// `broker.base_delay` doubling, without jitter) until every message is
/// dead-lettered.
pub async fn run<T>(
    broker: &Broker<T>,
    kind: Kind,
    messages: usize,
    consumers: usize,
    max_attempts: u32,
) -> Run
where
    T: Publisher + Subscriber + Clone + 'static,
{
    let publisher = broker.transports[0].clone();
    let store = MemoryDlqStore::new();
    let calls: Arc<Mutex<Calls>> = Arc::default();
    let retries = Arc::new(AtomicUsize::new(0));
    let route = broker.route.clone();
    let counted = retries.clone();
    let policy = RetryPolicy::new()
        .max_attempts(max_attempts)
        .backoff(Backoff::exponential(broker.base_delay, broker.base_delay * 8).without_jitter())
        .mode(RetryMode::Delayed);
    let layer = DlqLayer::new("billing")
        .policy(policy)
        .retry_via(
            publisher.clone(),
            move |msg: &Incoming, attempt: u32, delay: Duration| {
                counted.fetch_add(1, Ordering::SeqCst);
                route(msg, attempt, delay)
            },
        )
        .dead_letter_to(publisher.clone(), broker.dlq_topic.clone())
        .store(store.clone());
    let seen = calls.clone();
    let handler = typed(move |order: Order, msg: Incoming| {
        let seen = seen.clone();
        async move {
            seen.lock()
                .unwrap()
                .entry(msg.envelope.id.clone())
                .or_default()
                .push((msg.attempt, Instant::now()));
            match order.kind {
                Kind::Transient => Err(HandlerError::transient("inventory service unavailable")),
                Kind::Permanent => Err(HandlerError::permanent("order has quantity 0")),
                Kind::Poison => Ok(()),
            }
        }
    });
    let mut dlq = broker.transports[0]
        .subscribe(&broker.dlq_topic, "operators")
        .await
        .expect("subscribe to the DLQ");
    let mut workers = Vec::new();
    for transport in broker.transports.iter().take(consumers) {
        for topic in std::iter::once(&broker.topic).chain(&broker.also_consume) {
            let deliveries = transport
                .subscribe(topic, &broker.group)
                .await
                .expect("subscribe");
            let worker = Worker::new(layer.layer(handler.clone())).concurrency(4);
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            workers.push((
                stop,
                tokio::spawn(worker.run(deliveries, async {
                    stopped.await.ok();
                })),
            ));
        }
    }
    let mut ids = Vec::new();
    for n in 0..messages {
        let env = match kind {
            Kind::Poison => Envelope::builder("/shop", Order::TYPE)
                .payload("{not json")
                .build(),
            _ => Envelope::message("/shop", &Order { kind }).unwrap().build(),
        };
        let mut env = env;
        env.partition_key = Some(format!("order-{n}"));
        ids.push(env.id.clone());
        publisher
            .publish(&broker.topic, env)
            .await
            .expect("publish");
    }
    let started = Instant::now();
    loop {
        if store.count(&Filter::new()).await.unwrap() as usize >= messages {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "timed out waiting for {messages} dead letters"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut from_dlq_topic = Vec::new();
    while from_dlq_topic.len() < messages {
        let delivery = tokio::time::timeout(DEADLINE, dlq.next())
            .await
            .expect("a dead letter on the DLQ topic in time")
            .expect("the DLQ stream is open")
            .expect("a delivery");
        from_dlq_topic.push(DeadLetter::from_envelope(delivery.envelope()).expect("a dead letter"));
        delivery.ack().await.expect("ack");
    }
    let mut reports = Vec::new();
    for (stop, handle) in workers {
        stop.send(()).ok();
        reports.push(handle.await.expect("worker"));
    }
    let calls = calls.lock().unwrap().clone();
    Run {
        calls,
        letters: store.all(),
        from_dlq_topic,
        retries: retries.load(Ordering::SeqCst),
        reports,
        ids,
    }
}

/// A poison message: dead-lettered after 0 retries, the handler never ran.
pub fn assert_poison(run: &Run) {
    assert_eq!(run.retries, 0, "poison is never retried");
    assert!(
        run.calls.is_empty(),
        "the handler never ran: {:?}",
        run.calls.keys()
    );
    for letter in run.letters.iter().chain(&run.from_dlq_topic) {
        assert_eq!(letter.error.class, "poison");
        assert_eq!(letter.attempts, 1);
        assert!(run.ids.contains(&letter.envelope.id), "same message id");
    }
}

/// A permanent failure: dead-lettered after 0 retries.
pub fn assert_permanent(run: &Run) {
    assert_eq!(run.retries, 0, "permanent failures are never retried");
    for id in &run.ids {
        let attempts: Vec<u32> = run.calls[id].iter().map(|(a, _)| *a).collect();
        assert_eq!(attempts, [1], "called once");
    }
    for letter in run.letters.iter().chain(&run.from_dlq_topic) {
        assert_eq!(letter.error.class, "permanent");
        assert_eq!(letter.attempts, 1);
    }
}

/// A transient failure: tried `n` times (attempts 1..=n, whichever consumer
/// got each), with growing gaps, then dead-lettered with attempts `n`.
///
/// A broker may redeliver an attempt after a rebalance, before its offset
/// was committed. When that attempt's retry was already published, the
/// redelivery schedules it again and the chain forks: attempt numbers repeat
/// (`1, 2, 3, 2, 3, 4, 3, 4`), but every attempt follows one numbered one
/// lower and none goes past `n`. With `gaps_from` (one consumer, no
/// rebalance) the chain must be the plain `1..=n` with growing gaps.
pub fn assert_transient(run: &Run, n: u32, gaps_from: Option<Duration>) {
    assert_eq!(run.letters.len(), run.ids.len());
    for id in &run.ids {
        let calls = &run.calls[id];
        let attempts: Vec<u32> = calls.iter().map(|(a, _)| *a).collect();
        let mut distinct = attempts.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(
            distinct,
            (1..=n).collect::<Vec<_>>(),
            "attempts of {id}: {attempts:?}"
        );
        for (i, attempt) in attempts.iter().enumerate().filter(|(_, a)| **a > 1) {
            assert!(
                attempts[..i].contains(&(attempt - 1)),
                "attempt {attempt} of {id} ran before any attempt {}: {attempts:?}",
                attempt - 1
            );
        }
        if let Some(base) = gaps_from {
            let mut chain = attempts.clone();
            chain.dedup();
            assert_eq!(chain, (1..=n).collect::<Vec<_>>(), "attempts of {id}");
            let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1].1 - w[0].1).collect();
            for (i, gap) in gaps.iter().enumerate() {
                let floor = (base * (1 << i)).mul_f32(0.9);
                assert!(
                    *gap >= floor,
                    "gap {i} of {id} is {gap:?}, expected at least {floor:?}: {gaps:?}"
                );
            }
            for pair in gaps.windows(2) {
                assert!(pair[1] > pair[0], "gaps must grow: {gaps:?}");
            }
        }
    }
    for letter in run.letters.iter().chain(&run.from_dlq_topic) {
        assert_eq!(letter.error.class, "transient");
        assert_eq!(letter.attempts, n, "the attempt count is exact");
        assert!(letter.first_failed_at < letter.last_failed_at);
    }
}

/// How long the replay scenario watches the work topic after a dry run for
/// a message that must not come.
pub const QUIET: Duration = Duration::from_millis(1500);

/// An order of the replay scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CustomerOrder {
    customer: String,
}

impl Message for CustomerOrder {
    const TYPE: &'static str = "order.placed";
}

/// What the replay scenario's handler saw: per message id, one entry per
/// call with the `surety-replay-count` header and whether it succeeded.
type ReplayCalls = Arc<Mutex<HashMap<String, Vec<(Option<String>, bool)>>>>;

/// Reads the next delivery of `stream` within [`DEADLINE`], acks it and
/// returns its envelope.
async fn next_envelope(stream: &mut surety_core::DeliveryStream, what: &str) -> Envelope {
    let delivery = tokio::time::timeout(DEADLINE, stream.next())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap_or_else(|| panic!("the stream ended while waiting for {what}"))
        .unwrap_or_else(|e| panic!("a delivery error while waiting for {what}: {e}"));
    let envelope = delivery.envelope().clone();
    delivery.ack().await.expect("ack");
    envelope
}

/// Polls `condition` every 20 ms until it holds, failing after [`DEADLINE`].
async fn wait_for<F, Fut>(what: &str, condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    surety_testkit::wait::eventually_every(DEADLINE, Duration::from_millis(20), what, condition)
        .await;
}

/// The replay path end to end on a real broker.
///
/// A handler rejects orders of unknown customers (4 messages) and of a
/// banned one (1): all five are dead-lettered into a SQLite store and onto
/// the DLQ topic. A dry run (by filter and by id) changes nothing: the same
/// records, no audit entry, and nothing reaches the work topic (an observer
/// group on it sees nothing for [`QUIET`], then a marker published after
/// the dry run arrives first). The handler is fixed; one dead letter is
/// replayed by id and the rest of its group by fingerprint, through the
/// broker's own publisher: the fixed handler processes each (same id, same
/// key, replay count 1), the records become `resolved`, the banned one stays
/// `dead`, and the audit log says who replayed what and how it went.
pub async fn replay_after_fix<T>(broker: &Broker<T>)
where
    T: Publisher + Subscriber + Clone + 'static,
{
    use std::sync::atomic::AtomicBool;
    use surety_core::Permanent;
    use surety_dlq::store::{PageRequest, SqliteDlqStore};
    use surety_dlq::{ReplayRequest, Replayer, RetryPolicy, Status};

    let transport = broker.transports[0].clone();
    let run_id = uuid::Uuid::now_v7();
    let store = Arc::new(SqliteDlqStore::in_memory().await.expect("a SQLite store"));
    let fixed = Arc::new(AtomicBool::new(false));
    let calls: ReplayCalls = Arc::default();
    let keys: Arc<Mutex<HashMap<String, Option<String>>>> = Arc::default();
    let (f, c, k) = (fixed.clone(), calls.clone(), keys.clone());
    let handler = typed(move |order: CustomerOrder, msg: Incoming| {
        let (fixed, calls, keys) = (f.clone(), c.clone(), k.clone());
        async move {
            let failure = if order.customer.starts_with("banned-") {
                Some(format!("customer {} is banned", order.customer))
            } else if order.customer.starts_with("unknown-") && !fixed.load(Ordering::SeqCst) {
                Some(format!("customer {} does not exist", order.customer))
            } else {
                None
            };
            let replays = msg.envelope.headers.get(surety_dlq::keys::REPLAY_COUNT);
            calls
                .lock()
                .unwrap()
                .entry(msg.envelope.id.clone())
                .or_default()
                .push((replays.map(str::to_owned), failure.is_none()));
            if failure.is_none() {
                keys.lock()
                    .unwrap()
                    .insert(msg.envelope.id.clone(), msg.envelope.partition_key.clone());
            }
            failure.map_or(Ok(()), |f| Err(Permanent::new(f)))
        }
    });
    let layer = DlqLayer::new("billing")
        .policy(RetryPolicy::in_place(2))
        .dead_letter_to(transport.clone(), broker.dlq_topic.clone())
        .store(store.clone());

    // An independent group on the work topic sees everything published to it.
    let mut observer = transport
        .subscribe(&broker.topic, &format!("observer-{run_id}"))
        .await
        .expect("subscribe the observer");
    let mut dlq = transport
        .subscribe(&broker.dlq_topic, &format!("operators-{run_id}"))
        .await
        .expect("subscribe to the DLQ");
    let deliveries = transport
        .subscribe(&broker.topic, &broker.group)
        .await
        .expect("subscribe the worker");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(Worker::new(layer.layer(handler)).concurrency(4).run(
        deliveries,
        async {
            stopped.await.ok();
        },
    ));

    let publish = |customer: String, key: String| {
        let transport = transport.clone();
        let topic = broker.topic.clone();
        async move {
            let env = Envelope::message("/shop", &CustomerOrder { customer })
                .unwrap()
                .partition_key(key)
                .build();
            let id = env.id.clone();
            transport.publish(&topic, env).await.expect("publish");
            id
        }
    };
    let mut unknown = Vec::new();
    for n in 0..4 {
        unknown.push(publish(format!("unknown-{n}"), format!("order-{n}")).await);
    }
    let banned = publish("banned-1".to_owned(), "order-10".to_owned()).await;
    let mut published: Vec<String> = unknown.iter().chain([&banned]).cloned().collect();
    published.sort();

    // Five dead letters, in the store and on the DLQ topic.
    wait_for("five dead letters in the store", || {
        let store = store.clone();
        async move { store.count(&Filter::new()).await.unwrap() == 5 }
    })
    .await;
    let mut on_dlq_topic = Vec::new();
    for _ in 0..5 {
        let env = next_envelope(&mut dlq, "a dead letter on the DLQ topic").await;
        let letter = DeadLetter::from_envelope(&env).expect("a dead letter");
        assert_eq!(letter.error.class, "permanent");
        assert_eq!(letter.handler, "billing");
        on_dlq_topic.push(letter.envelope.id);
    }
    on_dlq_topic.sort();
    assert_eq!(on_dlq_topic, published, "every failure is on the DLQ topic");
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(next_envelope(&mut observer, "the originals").await.id);
    }
    seen.sort();
    assert_eq!(seen, published);

    let list = |filter: Filter| {
        let store = store.clone();
        async move {
            store
                .list(&filter, &PageRequest::first(500))
                .await
                .unwrap()
                .items
        }
    };
    let before = list(Filter::new()).await;
    let by_message = |id: &str| {
        before
            .iter()
            .find(|l| l.envelope.id == id)
            .unwrap_or_else(|| panic!("a dead letter for {id}"))
            .clone()
    };
    let first = by_message(&unknown[0]);
    let banned_letter = by_message(&banned);
    let fingerprint = first.fingerprint.clone();
    assert_ne!(fingerprint, banned_letter.fingerprint);
    for letter in &before {
        assert_eq!(letter.status, Status::Dead);
        assert_eq!(letter.source.topic, broker.topic);
        assert_eq!(letter.source.group, broker.group);
        assert_eq!(letter.attempts, 1, "permanent: never retried");
    }
    let group = list(Filter::new().fingerprint(&fingerprint)).await;
    let mut group_ids: Vec<String> = group.iter().map(|l| l.id.clone()).collect();
    group_ids.sort();
    assert_eq!(group_ids.len(), 4, "the unknown customers group together");
    let calls_before = calls.lock().unwrap().clone();

    let replayer = Replayer::new(store.clone(), transport.clone());

    // Dry runs change nothing.
    let dry = replayer
        .replay(
            ReplayRequest::filter("alice", Filter::new().fingerprint(&fingerprint))
                .reason("customers imported")
                .dry_run(true),
        )
        .await
        .expect("a dry run by filter");
    assert!(dry.dry_run);
    let mut dry_ids = dry.done.clone();
    dry_ids.sort();
    assert_eq!(
        dry_ids, group_ids,
        "the dry run names what a replay would take"
    );
    assert_eq!(dry.audit_id, None);
    let dry = replayer
        .replay(ReplayRequest::ids("alice", [first.id.clone()]).dry_run(true))
        .await
        .expect("a dry run by id");
    assert_eq!(dry.done, std::slice::from_ref(&first.id));
    assert_eq!(dry.audit_id, None);
    if let Ok(Some(delivery)) = tokio::time::timeout(QUIET, observer.next()).await {
        panic!(
            "a dry run published to the work topic: {:?}",
            delivery.map(|d| d.envelope().id.clone())
        );
    }
    let marker = publish("marker".to_owned(), "marker".to_owned()).await;
    assert_eq!(
        next_envelope(&mut observer, "the marker").await.id,
        marker,
        "nothing was published before the marker"
    );
    wait_for("the marker to be handled", || {
        let keys = keys.clone();
        let marker = marker.clone();
        async move { keys.lock().unwrap().contains_key(&marker) }
    })
    .await;
    assert_eq!(
        list(Filter::new()).await,
        before,
        "a dry run changed the store"
    );
    assert!(
        store
            .audit_log(&PageRequest::first(10))
            .await
            .unwrap()
            .items
            .is_empty(),
        "a dry run wrote an audit entry"
    );
    {
        let mut calls = calls.lock().unwrap().clone();
        calls.remove(&marker);
        assert_eq!(calls, calls_before, "the handler saw nothing new");
    }

    // The fix is deployed.
    fixed.store(true, Ordering::SeqCst);
    let resolved = |id: String| {
        let store = store.clone();
        move || {
            let (store, id) = (store.clone(), id.clone());
            async move { store.get(&id).await.unwrap().unwrap().status == Status::Resolved }
        }
    };

    // Replay one, by id.
    let one = replayer
        .replay(
            ReplayRequest::ids("alice", [first.id.clone()]).reason("customer unknown-0 created"),
        )
        .await
        .expect("replay one");
    assert_eq!(one.done, std::slice::from_ref(&first.id), "{one:?}");
    let copy = next_envelope(&mut observer, "the replayed copy").await;
    assert_eq!(copy.id, unknown[0], "a replay keeps the message id");
    assert_eq!(copy.partition_key.as_deref(), Some("order-0"));
    assert_eq!(copy.headers.get(surety_dlq::keys::REPLAY_COUNT), Some("1"));
    assert_eq!(
        copy.headers.get(surety_dlq::keys::DLQ_ID),
        Some(first.id.as_str())
    );
    wait_for(
        "the replayed message to be resolved",
        resolved(first.id.clone()),
    )
    .await;

    // Replay the rest of the group, by filter: the resolved one is not taken again.
    let rest = replayer
        .replay(
            ReplayRequest::filter("bob", Filter::new().fingerprint(&fingerprint))
                .reason("customers imported"),
        )
        .await
        .expect("replay a filtered group");
    let mut rest_ids = rest.done.clone();
    rest_ids.sort();
    let mut want: Vec<String> = group_ids
        .iter()
        .filter(|id| **id != first.id)
        .cloned()
        .collect();
    want.sort();
    assert_eq!(rest_ids, want, "{rest:?}");
    assert!(
        rest.failed.is_empty() && rest.skipped.is_empty(),
        "{rest:?}"
    );
    for id in &want {
        wait_for("the group to be resolved", resolved(id.clone())).await;
    }

    // The fixed handler processed every one of them, by id, as a replay.
    {
        let calls = calls.lock().unwrap();
        let keys = keys.lock().unwrap();
        for (n, id) in unknown.iter().enumerate() {
            assert_eq!(
                calls[id].last(),
                Some(&(Some("1".to_owned()), true)),
                "{id} handled as replay 1: {:?}",
                calls[id]
            );
            assert_eq!(
                keys[id].as_deref(),
                Some(format!("order-{n}").as_str()),
                "same key"
            );
        }
        assert!(
            !keys.contains_key(&banned),
            "the banned order was not replayed"
        );
        assert_eq!(calls[&banned].len(), 1);
    }
    let banned_now = store.get(&banned_letter.id).await.unwrap().unwrap();
    assert_eq!(banned_now.status, Status::Dead, "not part of the group");
    assert_eq!(banned_now.replay_count, 0);
    for id in &group_ids {
        let letter = store.get(id).await.unwrap().unwrap();
        let story: Vec<(&str, &str)> = letter
            .history
            .iter()
            .map(|e| (e.action.as_str(), e.actor.as_str()))
            .collect();
        let replayed_by = if *id == first.id { "alice" } else { "bob" };
        // Claimed, published and recorded (unless the copy was handled
        // before the replay recorded its publish), then resolved.
        assert!(story.len() == 3 || story.len() == 4, "{story:?}");
        assert_eq!(story[0].0, "dead_lettered");
        assert_eq!(story[1], ("replaying", replayed_by));
        if story.len() == 4 {
            assert_eq!(story[2], ("replayed", replayed_by));
        }
        let last = story[story.len() - 1];
        assert_eq!(last.0, "resolved");
        assert!(last.1.starts_with("billing@"), "{story:?}");
        assert_eq!(letter.replay_count, 1);
    }

    // The audit trail, newest first: who, why, what, and how it went.
    let audit = store
        .audit_log(&PageRequest::first(10))
        .await
        .unwrap()
        .items;
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert_eq!(audit[0].actor, "bob");
    assert_eq!(audit[0].action, "replay");
    assert_eq!(audit[0].reason.as_deref(), Some("customers imported"));
    assert_eq!(
        audit[0]
            .selection
            .filter
            .as_ref()
            .and_then(|f| f.fingerprint.as_deref()),
        Some(fingerprint.as_str())
    );
    let mut succeeded = audit[0].succeeded.clone();
    succeeded.sort();
    assert_eq!(succeeded, want);
    assert!(audit[0].failed.is_empty());
    assert_eq!(audit[1].actor, "alice");
    assert_eq!(audit[1].action, "replay");
    assert_eq!(
        audit[1].reason.as_deref(),
        Some("customer unknown-0 created")
    );
    assert_eq!(audit[1].selection.ids, std::slice::from_ref(&first.id));
    assert_eq!(audit[1].succeeded, std::slice::from_ref(&first.id));
    assert!(audit[1].failed.is_empty());
    assert!(audit[1].at <= audit[0].at);

    stop.send(()).ok();
    let report = worker.await.expect("worker");
    assert_eq!(report.rejected, 0, "{report:?}");
}

/// Three consumer groups on one topic; `billing` fails a message once (it
/// is dead-lettered), `shipping` and `analytics` handle it. A replay goes
/// back to `billing` alone: the other groups receive it and acknowledge it
/// without running their handlers (checked with a marker message behind it
/// on the same key). Replaying to every group is an explicit option.
pub async fn replay_goes_to_the_failed_group_only<T>(broker: &Broker<T>)
where
    T: Publisher + Subscriber + Clone + 'static,
{
    use surety_core::Permanent;
    use surety_core::consumer::handler_fn;
    use surety_dlq::store::SqliteDlqStore;
    use surety_dlq::{ReplayRequest, Replayer, Status};

    type Seen = Arc<Mutex<HashMap<(String, String), usize>>>;
    let transport = broker.transports[0].clone();
    let run_id = uuid::Uuid::now_v7();
    let store = Arc::new(SqliteDlqStore::in_memory().await.expect("a SQLite store"));
    let seen: Seen = Arc::default();
    let handled = |seen: &Seen, group: &str, id: &str| {
        *seen
            .lock()
            .unwrap()
            .get(&(group.to_owned(), id.to_owned()))
            .unwrap_or(&0)
    };
    let counting = |group: String, fail_first: bool| {
        let seen = seen.clone();
        handler_fn(move |msg: Incoming| {
            let (seen, group) = (seen.clone(), group.clone());
            async move {
                let mut seen = seen.lock().unwrap();
                let n = seen.entry((group, msg.envelope.id.clone())).or_default();
                *n += 1;
                if fail_first && *n == 1 && msg.envelope.event_type == "order.placed" {
                    return Err(Permanent::new("customer unknown"));
                }
                Ok(())
            }
        })
    };
    let billing = broker.group.clone();
    let shipping = format!("shipping-{run_id}");
    let analytics = format!("analytics-{run_id}");
    let mut stops = Vec::new();
    let mut workers = Vec::new();
    for group in [&billing, &shipping, &analytics] {
        let deliveries = transport
            .subscribe(&broker.topic, group)
            .await
            .expect("subscribe");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handler = counting(group.clone(), *group == billing);
        let stopped = async {
            stopped.await.ok();
        };
        if *group == billing {
            let layer = DlqLayer::new("billing")
                .policy(RetryPolicy::in_place(1))
                .store(store.clone());
            workers.push(tokio::spawn(async move {
                Worker::new(layer.layer(handler))
                    .run(deliveries, stopped)
                    .await;
            }));
        } else {
            workers.push(tokio::spawn(async move {
                Worker::new(handler).run(deliveries, stopped).await;
            }));
        }
        stops.push(stop);
    }
    let publish = |event_type: &'static str| {
        let transport = transport.clone();
        let topic = broker.topic.clone();
        async move {
            let env = Envelope::builder("/shop", event_type)
                .partition_key("order-1")
                .payload("{}")
                .build();
            let id = env.id.clone();
            transport.publish(&topic, env).await.expect("publish");
            id
        }
    };
    let deadline = Duration::from_secs(30);

    // First failure: billing dead-letters it, the others handle it once.
    let first = publish("order.placed").await;
    surety_testkit::wait::eventually(deadline, "billing to dead-letter it", || async {
        store
            .count(&Filter::new().status([Status::Dead]))
            .await
            .unwrap_or(0)
            == 1
    })
    .await;
    surety_testkit::wait::eventually(deadline, "the other groups to handle it", || async {
        handled(&seen, &shipping, &first) == 1 && handled(&seen, &analytics, &first) == 1
    })
    .await;

    // Replay (default): only billing handles it again.
    let replayer = Replayer::new(store.clone(), transport.clone());
    let report = replayer
        .replay(ReplayRequest::filter(
            "ops",
            Filter::new().topic(broker.topic.clone()),
        ))
        .await
        .expect("replay");
    assert_eq!(report.done.len(), 1, "{report:?}");
    let marker = publish("order.marker").await;
    surety_testkit::wait::eventually(deadline, "billing to handle the replay", || async {
        handled(&seen, &billing, &first) == 2
    })
    .await;
    surety_testkit::wait::eventually(deadline, "the marker behind the replay", || async {
        handled(&seen, &shipping, &marker) == 1 && handled(&seen, &analytics, &marker) == 1
    })
    .await;
    assert_eq!(
        handled(&seen, &shipping, &first),
        1,
        "shipping handled the replay"
    );
    assert_eq!(
        handled(&seen, &analytics, &first),
        1,
        "analytics handled the replay"
    );

    // Explicitly to every group: all three handle the second replay.
    let second = publish("order.placed").await;
    surety_testkit::wait::eventually(deadline, "billing to dead-letter the second", || async {
        store
            .count(&Filter::new().status([Status::Dead]))
            .await
            .unwrap_or(0)
            == 1
    })
    .await;
    let report = replayer
        .clone()
        .every_group(true)
        .replay(ReplayRequest::filter(
            "ops",
            Filter::new().topic(broker.topic.clone()),
        ))
        .await
        .expect("replay to every group");
    assert_eq!(report.done.len(), 1, "{report:?}");
    surety_testkit::wait::eventually(deadline, "every group to handle the replay", || async {
        handled(&seen, &billing, &second) == 2
            && handled(&seen, &shipping, &second) == 2
            && handled(&seen, &analytics, &second) == 2
    })
    .await;
    for stop in stops {
        stop.send(()).ok();
    }
    for worker in workers {
        worker.await.expect("worker");
    }
}
