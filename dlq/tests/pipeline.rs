//! The DLQ layer under a real `Worker` on the in-memory transport: for any
//! sequence of handler outcomes, each message is acknowledged once —
//! handled or dead-lettered exactly once — within the attempt bound, and
//! permanent and poison failures are never retried.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{eventually, spawn_worker};
use futures::StreamExt;
use proptest::prelude::*;
use surety_core::consumer::{Handler, Incoming, Outcome, Worker, WorkerReport, handler_fn};
use surety_core::memory::MemoryTransport;
use surety_core::tower::Layer;
use surety_core::{
    Classify, Confirmation, DeliveryInfo, Envelope, ErrorClass, HandlerError, Headers, Publisher,
    Subscriber, TransportError, TransportErrorKind,
};
use surety_dlq::keys;
use surety_dlq::policy::DeadLetterReason;
use surety_dlq::sink::{DeadLetterSink, SinkError};
use surety_dlq::store::{DlqStore, Filter, MemoryDlqStore};
use surety_dlq::{Backoff, DeadLetter, DlqLayer, RetryMode, RetryPolicy};
use surety_testkit::handler::{HandlerTest, Recorder};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const DEADLINE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Ok,
    Transient,
    Permanent,
    Poison,
    Panic,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        1 => Just(Step::Ok),
        4 => Just(Step::Transient),
        1 => Just(Step::Permanent),
        1 => Just(Step::Poison),
        1 => Just(Step::Panic),
    ]
}

/// What each message id's handler calls saw: the attempt of every call.
type Calls = Arc<Mutex<HashMap<String, Vec<u32>>>>;

/// A handler that plays `scripts[id]`, one step per call (then succeeds).
fn scripted(
    scripts: Arc<HashMap<String, Vec<Step>>>,
    calls: Calls,
) -> impl surety_core::consumer::Handler {
    handler_fn(move |msg: Incoming| {
        let scripts = scripts.clone();
        let calls = calls.clone();
        async move {
            let n = {
                let mut calls = calls.lock().unwrap();
                let seen = calls.entry(msg.envelope.id.clone()).or_default();
                seen.push(msg.attempt);
                seen.len() - 1
            };
            let step = scripts
                .get(&msg.envelope.id)
                .and_then(|s| s.get(n).copied())
                .unwrap_or(Step::Ok);
            match step {
                Step::Ok => Ok(()),
                Step::Transient => Err(HandlerError::transient("database busy")),
                Step::Permanent => Err(HandlerError::permanent("order 42 has quantity 0")),
                Step::Poison => Err(HandlerError::poison("payload does not decode")),
                Step::Panic => panic!("index out of bounds"),
            }
        }
    })
}

/// The expected fate of a script under a bound of `max` attempts:
/// (calls, dead-letter class if any).
fn expected(script: &[Step], max: u32) -> (u32, Option<&'static str>) {
    for attempt in 1..=max {
        let step = script
            .get(attempt as usize - 1)
            .copied()
            .unwrap_or(Step::Ok);
        match step {
            Step::Ok => return (attempt, None),
            Step::Transient if attempt < max => continue,
            Step::Transient => return (attempt, Some("transient")),
            Step::Permanent | Step::Panic => return (attempt, Some("permanent")),
            Step::Poison => return (attempt, Some("poison")),
        }
    }
    unreachable!("max is at least 1")
}

struct Run {
    calls: HashMap<String, Vec<u32>>,
    letters: Vec<DeadLetter>,
    dlq_messages: Vec<Envelope>,
    report: WorkerReport,
    rejected: usize,
}

impl Run {
    /// The dead letter of message `id`; panics when there is none.
    fn letter(&self, id: &str) -> &DeadLetter {
        self.letters
            .iter()
            .find(|l| l.envelope.id == id)
            .expect("dead-lettered")
    }
}

/// Runs `handler` under a default worker on group `g` of `work`, and
/// publishes one message to `work`.
async fn run_on_one_message(
    transport: &MemoryTransport,
    handler: impl Handler,
) -> (oneshot::Sender<()>, JoinHandle<WorkerReport>) {
    let deliveries = transport.subscribe("work", "g").await.unwrap();
    let running = spawn_worker(Worker::new(handler), deliveries);
    transport
        .publish("work", Envelope::builder("/t", "t").build())
        .await
        .unwrap();
    running
}

async fn run_pipeline(
    scripts: Vec<Vec<Step>>,
    max: u32,
    mode: RetryMode,
    undecodable: bool,
) -> (Vec<String>, Run) {
    let transport = MemoryTransport::new();
    let store = MemoryDlqStore::new();
    let calls: Calls = Arc::default();
    let mut by_id = HashMap::new();
    let mut envelopes = Vec::new();
    for (n, script) in scripts.into_iter().enumerate() {
        let env = if undecodable && n == 0 {
            Envelope::undecodable(
                "memory://work",
                format!("work/{n}"),
                Headers::new(),
                "??".into(),
                &"missing ce_id",
            )
        } else {
            Envelope::builder("/test", "order.placed")
                .partition_key(format!("k{n}"))
                .build()
        };
        by_id.insert(env.id.clone(), script);
        envelopes.push(env);
    }
    let ids: Vec<String> = envelopes.iter().map(|e| e.id.clone()).collect();
    let policy = RetryPolicy::new()
        .max_attempts(max)
        .backoff(Backoff::exponential(
            Duration::from_millis(1),
            Duration::from_millis(3),
        ))
        .mode(mode);
    let layer = DlqLayer::new("orders-handler")
        .policy(policy)
        .retry_via(transport.clone(), |_: &Incoming, _: u32, _: Duration| {
            "work".to_owned()
        })
        .dead_letter_to(transport.clone(), "work.dlq")
        .store(store.clone());
    let handler = layer.layer(scripted(Arc::new(by_id), calls.clone()));
    let mut dlq = transport.subscribe("work.dlq", "ops").await.unwrap();
    let deliveries = transport.subscribe("work", "g").await.unwrap();
    let (stop, worker) = spawn_worker(Worker::new(handler).concurrency(4), deliveries);
    for env in envelopes {
        transport.publish("work", env).await.unwrap();
    }
    // Done when the work group holds nothing and every message was either
    // handled successfully or dead-lettered.
    let settled = {
        let (transport, store, calls, ids) =
            (transport.clone(), store.clone(), calls.clone(), ids.clone());
        move || {
            let (transport, store, calls, ids) =
                (transport.clone(), store.clone(), calls.clone(), ids.clone());
            async move {
                let letters = store.all();
                let calls = calls.lock().unwrap().clone();
                transport.depth("work", "g") == 0
                    && ids.iter().all(|id| {
                        letters.iter().any(|l| &l.envelope.id == id)
                            || calls.get(id).is_some_and(|c| !c.is_empty())
                    })
            }
        }
    };
    eventually(DEADLINE, "every message to settle", settled.clone()).await;
    // Handled messages may still have a last call in flight: wait until the
    // fates are final (a message with calls but no letter must be handled).
    eventually(DEADLINE, "the work group to drain", || async {
        transport.depth("work", "g") == 0
    })
    .await;
    stop.send(()).ok();
    let report = worker.await.unwrap();
    let mut dlq_messages = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(5), dlq.next()).await {
        dlq_messages.push(d.envelope().clone());
        d.ack().await.unwrap();
    }
    let calls = calls.lock().unwrap().clone();
    let run = Run {
        calls,
        letters: store.all(),
        dlq_messages,
        report,
        rejected: transport.rejected("work", "g").len(),
    };
    (ids, run)
}

fn check_run(
    ids: &[String],
    scripts: &[Vec<Step>],
    max: u32,
    mode: RetryMode,
    run: &Run,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(run.rejected, 0, "nothing is rejected to the broker");
    prop_assert_eq!(run.report.requeued, 0);
    prop_assert_eq!(run.report.settle_failures, 0);
    let mut deliveries = 0;
    for (id, script) in ids.iter().zip(scripts) {
        let (want_calls, want_class) = expected(script, max);
        let calls = run.calls.get(id).cloned().unwrap_or_default();
        prop_assert!(calls.len() as u32 <= max, "bound exceeded: {:?}", calls);
        let attempts: Vec<u32> = (1..=want_calls).collect();
        prop_assert_eq!(&calls, &attempts, "script {:?}", script);
        let letters: Vec<_> = run
            .letters
            .iter()
            .filter(|l| &l.envelope.id == id)
            .collect();
        let published: Vec<_> = run.dlq_messages.iter().filter(|e| &e.id == id).collect();
        match want_class {
            None => {
                prop_assert!(
                    letters.is_empty() && published.is_empty(),
                    "handled, not dead-lettered"
                );
            }
            Some(class) => {
                prop_assert_eq!(letters.len(), 1, "dead-lettered exactly once in the store");
                prop_assert_eq!(
                    published.len(),
                    1,
                    "dead-lettered exactly once on the DLQ topic"
                );
                let letter = letters[0];
                prop_assert_eq!(letter.error.class.as_str(), class);
                prop_assert_eq!(letter.attempts, want_calls);
                let reason = if class == "transient" {
                    DeadLetterReason::AttemptsExhausted
                } else {
                    DeadLetterReason::NotRetryable
                };
                prop_assert_eq!(letter.error.reason, reason);
                prop_assert!(letter.first_failed_at <= letter.last_failed_at);
                prop_assert!(
                    !letter.envelope.headers.contains(keys::ATTEMPT),
                    "bookkeeping stripped"
                );
                let back = DeadLetter::from_envelope(published[0]).unwrap();
                prop_assert_eq!(&back.id, &letter.id);
            }
        }
        deliveries += match mode {
            RetryMode::Delayed => u64::from(want_calls),
            RetryMode::InPlace => 1,
        };
    }
    prop_assert_eq!(
        run.report.acked,
        deliveries,
        "one ack per delivery, nothing else"
    );
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn every_message_is_acked_once_and_dead_lettered_at_most_once(
        scripts in prop::collection::vec(prop::collection::vec(step(), 0..8), 1..4),
        max in 1u32..6,
        delayed in any::<bool>(),
    ) {
        let mode = if delayed { RetryMode::Delayed } else { RetryMode::InPlace };
        let (ids, run) = runtime().block_on(run_pipeline(scripts.clone(), max, mode, false));
        check_run(&ids, &scripts, max, mode, &run)?;
    }
}

#[tokio::test]
async fn undecodable_messages_are_poison_before_the_handler_runs() {
    let (ids, run) = run_pipeline(vec![vec![], vec![]], 5, RetryMode::Delayed, true).await;
    assert!(!run.calls.contains_key(&ids[0]), "the handler never saw it");
    let letter = run.letter(&ids[0]);
    assert_eq!(letter.error.class, "poison");
    assert_eq!(letter.attempts, 1);
    assert!(
        letter.error.message.contains("missing ce_id"),
        "{}",
        letter.error.message
    );
    assert_eq!(letter.envelope.payload, "??", "raw payload kept");
    assert_eq!(run.calls[&ids[1]], [1], "the other message is handled");
}

#[tokio::test]
async fn panics_are_dead_lettered_with_their_message() {
    let (ids, run) = run_pipeline(
        vec![vec![Step::Transient, Step::Panic]],
        5,
        RetryMode::Delayed,
        false,
    )
    .await;
    let letter = run.letter(&ids[0]);
    assert_eq!(letter.error.class, "permanent");
    assert_eq!(
        letter.error.message,
        "handler panicked: index out of bounds"
    );
    assert_eq!(letter.attempts, 2);
}

/// Three consumers compete for one group; a message that always fails
/// transiently is tried exactly N times, with attempts 1..=N, however the
/// retries are spread over the consumers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_consumers_keep_the_attempt_count_exact() {
    const N: u32 = 5;
    let transport = MemoryTransport::new();
    let store = MemoryDlqStore::new();
    let calls: Calls = Arc::default();
    let scripts: HashMap<String, Vec<Step>> = HashMap::new();
    let scripts = Arc::new(scripts);
    let policy = RetryPolicy::new()
        .max_attempts(N)
        .backoff(Backoff::exponential(
            Duration::from_millis(1),
            Duration::from_millis(2),
        ));
    let layer = DlqLayer::new("h")
        .policy(policy)
        .retry_via(transport.clone(), |_: &Incoming, _: u32, _: Duration| {
            "work".to_owned()
        })
        .store(store.clone());
    // Every call fails transiently: scripts is empty, so use a handler of its own.
    let seen = calls.clone();
    let always_failing = handler_fn(move |msg: Incoming| {
        let seen = seen.clone();
        async move {
            seen.lock()
                .unwrap()
                .entry(msg.envelope.id.clone())
                .or_default()
                .push(msg.attempt);
            Err::<(), _>(HandlerError::transient("still down"))
        }
    });
    drop(scripts);
    let mut workers = Vec::new();
    for _ in 0..3 {
        let deliveries = transport.subscribe("work", "g").await.unwrap();
        let handler = layer.clone().layer(always_failing.clone());
        workers.push(spawn_worker(
            Worker::new(handler).concurrency(2),
            deliveries,
        ));
    }
    let mut ids = Vec::new();
    for n in 0..12 {
        let env = Envelope::builder("/t", "t")
            .partition_key(format!("k{}", n % 4))
            .build();
        ids.push(env.id.clone());
        transport.publish("work", env).await.unwrap();
    }
    eventually(DEADLINE, "all 12 dead-lettered", || {
        let store = store.clone();
        async move { store.count(&Filter::new()).await.unwrap() == 12 }
    })
    .await;
    eventually(DEADLINE, "the group to drain", || async {
        transport.depth("work", "g") == 0
    })
    .await;
    let mut acked = 0;
    for (stop, handle) in workers {
        stop.send(()).ok();
        acked += handle.await.unwrap().acked;
    }
    assert_eq!(
        acked,
        12 * u64::from(N),
        "N deliveries per message, each acked"
    );
    let calls = calls.lock().unwrap();
    for id in &ids {
        assert_eq!(calls[id], (1..=N).collect::<Vec<_>>(), "attempts of {id}");
    }
    for letter in store.all() {
        assert_eq!(letter.attempts, N);
        assert_eq!(letter.error.reason, DeadLetterReason::AttemptsExhausted);
    }
}

/// Delays grow from attempt to attempt, both for delayed retries (as passed
/// to the route) and in place (as measured between calls).
#[tokio::test]
async fn retry_delays_grow() {
    let store = MemoryDlqStore::new();
    let routed: Arc<Mutex<Vec<(u32, Duration)>>> = Arc::default();
    let log = routed.clone();
    let policy = RetryPolicy::new()
        .max_attempts(5)
        .backoff(Backoff::exponential(
            Duration::from_millis(10),
            Duration::from_secs(10),
        ));
    let recorder = Recorder::new();
    let layer = DlqLayer::new("h")
        .policy(policy.clone())
        .retry_via(
            recorder.clone(),
            move |_: &Incoming, attempt: u32, delay: Duration| {
                log.lock().unwrap().push((attempt, delay));
                "work".to_owned()
            },
        )
        .store(store.clone());
    let handler = layer.layer(handler_fn(|_msg: Incoming| async {
        Err::<(), _>(HandlerError::transient("down"))
    }));
    // Each delayed copy is delivered back in turn, as the broker would.
    let mut test = HandlerTest::new(handler).topic("work").group("g");
    let mut next = Envelope::builder("/t", "t").build();
    for attempt in 1..=5 {
        let then = test.deliver(next.clone()).await;
        assert_eq!(then.attempt(), attempt);
        if attempt < 5 {
            assert_eq!(then.outcome(), Some(Outcome::RetryScheduled));
            next = recorder.published("work").pop().expect("a retry copy");
        } else {
            assert_eq!(then.outcome(), Some(Outcome::DeadLettered));
        }
    }
    assert_eq!(store.count(&Filter::new()).await.unwrap(), 1);
    let routed = routed.lock().unwrap().clone();
    assert_eq!(
        routed.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
        [2, 3, 4, 5]
    );
    for pair in routed.windows(2) {
        assert!(pair[1].1 > pair[0].1, "delays must grow: {routed:?}");
    }

    // In place: the gaps between calls grow too.
    let times: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let t = times.clone();
    let in_place = DlqLayer::new("h2")
        .policy(policy.mode(RetryMode::InPlace))
        .store(MemoryDlqStore::new())
        .layer(handler_fn(move |_msg: Incoming| {
            t.lock().unwrap().push(Instant::now());
            async { Err::<(), _>(HandlerError::transient("down")) }
        }));
    use surety_core::tower::ServiceExt;
    let msg = Incoming::new(
        Envelope::builder("/t", "t").build(),
        surety_core::DeliveryInfo::new("memory", "w", "g"),
    );
    let outcome = in_place.oneshot(msg).await.unwrap();
    assert_eq!(
        outcome.outcome,
        surety_core::consumer::Outcome::DeadLettered
    );
    let times = times.lock().unwrap();
    assert_eq!(times.len(), 5);
    let gaps: Vec<_> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps[0] >= Duration::from_millis(10), "{gaps:?}");
    assert!(gaps[3] >= Duration::from_millis(80), "{gaps:?}");
}

/// A delayed-retry copy carries the attempt, the error and the first
/// failure time, and keeps the message's id and key.
#[tokio::test]
async fn retry_copies_carry_their_bookkeeping() {
    let recorder = Recorder::new();
    let layer = DlqLayer::new("h")
        .policy(RetryPolicy::new().max_attempts(3))
        .retry_via(
            recorder.clone(),
            |msg: &Incoming, attempt: u32, _: Duration| {
                format!("{}.retry.{attempt}", msg.info.topic)
            },
        )
        .store(MemoryDlqStore::new());
    let service = layer.layer(handler_fn(|_msg: Incoming| async {
        Err::<(), _>(HandlerError::transient("lock timeout"))
    }));
    let env = Envelope::builder("/t", "t").partition_key("k").build();
    let then = HandlerTest::new(service)
        .topic("work")
        .deliver(env.clone())
        .await;
    assert_eq!(then.outcome(), Some(Outcome::RetryScheduled));
    let copies = recorder.published("work.retry.2");
    assert_eq!(copies.len(), 1, "{:?}", recorder.all());
    let copy = Incoming::new(
        copies[0].clone(),
        DeliveryInfo::new("memory", "work.retry.2", "g"),
    );
    let h = &copy.envelope.headers;
    assert_eq!(copy.envelope.id, env.id);
    assert_eq!(copy.envelope.partition_key.as_deref(), Some("k"));
    assert_eq!(h.attempt().unwrap(), Some(2));
    assert_eq!(copy.attempt, 2);
    assert_eq!(h.get(keys::ERROR_CLASS), Some("transient"));
    assert_eq!(h.get(keys::ERROR_MESSAGE), Some("lock timeout"));
    assert!(h.contains(keys::FIRST_FAILED_AT));
    assert!(h.contains(keys::RETRY_AT));
}

/// A DLQ that is down until switched back on; counts the writes tried.
#[derive(Debug, Default)]
struct Outage {
    down: AtomicBool,
    tried: AtomicUsize,
}

impl Outage {
    fn down() -> Arc<Self> {
        let outage = Self::default();
        outage.down.store(true, Ordering::SeqCst);
        Arc::new(outage)
    }
}

#[derive(Debug, Clone)]
struct OutageSink(Arc<Outage>);

#[async_trait::async_trait]
impl DeadLetterSink for OutageSink {
    fn name(&self) -> &str {
        "outage"
    }
    async fn write(&self, _letter: &DeadLetter) -> Result<(), SinkError> {
        self.0.tried.fetch_add(1, Ordering::SeqCst);
        if self.0.down.load(Ordering::SeqCst) {
            return Err(SinkError::new("outage", "DLQ unavailable"));
        }
        Ok(())
    }
}

/// A publisher that fails while its outage lasts.
#[derive(Clone)]
struct OutagePublisher {
    inner: MemoryTransport,
    outage: Arc<Outage>,
}

impl Publisher for OutagePublisher {
    async fn send(&self, topic: &str, envelope: Envelope) -> surety_core::Result<Confirmation> {
        self.outage.tried.fetch_add(1, Ordering::SeqCst);
        if self.outage.down.load(Ordering::SeqCst) {
            return Err(TransportError::new(
                TransportErrorKind::Connection,
                "retry topic unavailable",
            ));
        }
        self.inner.send(topic, envelope).await
    }
}

/// The redelivery delay of the layers that cannot park a message.
const REDELIVER_AFTER: Duration = Duration::from_millis(250);

/// `err` is unavailable, retried after [`REDELIVER_AFTER`], with `cause` in
/// its chain.
fn assert_unavailable(err: &HandlerError, cause: &str) {
    assert!(err.is_unavailable(), "{err}");
    assert_eq!(
        err.class(),
        ErrorClass::Transient {
            retry_after: Some(REDELIVER_AFTER)
        }
    );
    assert!(err.chain_message(500).contains(cause), "{err}");
}

/// The layer's answer when it cannot park a message: unavailable (so the
/// worker requeues it whatever its delivery count), with the layer's
/// redelivery delay, and the message of the failed sink or publish.
#[tokio::test]
async fn an_unwritable_dead_letter_or_retry_is_unavailable() {
    let outage = Outage::down();
    let failing =
        || handler_fn(|_msg: Incoming| async { Err::<(), _>(HandlerError::transient("down")) });
    let msg = |attempt: u32| {
        let mut env = Envelope::builder("/t", "t").build();
        env.headers.set_attempt(attempt);
        env
    };
    let policy = RetryPolicy::new()
        .max_attempts(3)
        .backoff(Backoff::exponential(
            Duration::from_millis(1),
            Duration::from_millis(1),
        ))
        .mode(RetryMode::Delayed);

    // The dead-letter write fails (the last attempt).
    let layered = DlqLayer::new("h")
        .policy(policy.clone())
        .sink(OutageSink(outage.clone()))
        .redeliver_after(REDELIVER_AFTER)
        .layer(failing());
    let then = HandlerTest::new(layered)
        .topic("work")
        .deliver(msg(3))
        .await;
    assert_unavailable(then.error().expect("failed"), "DLQ unavailable");

    // The delayed-retry publish fails (an earlier attempt).
    let transport = MemoryTransport::new();
    let layered = DlqLayer::new("h")
        .policy(policy)
        .retry_via(
            OutagePublisher {
                inner: transport.clone(),
                outage: outage.clone(),
            },
            |_: &Incoming, _: u32, _: Duration| "work".to_owned(),
        )
        .store(MemoryDlqStore::new())
        .redeliver_after(REDELIVER_AFTER)
        .layer(failing());
    let then = HandlerTest::new(layered)
        .topic("work")
        .deliver(msg(1))
        .await;
    assert_unavailable(then.error().expect("failed"), "retry topic unavailable");
}

/// A DLQ outage that lasts longer than the worker's default delivery bound
/// (5): the original is requeued again and again, never rejected to the
/// broker, never acknowledged, never lost; once the DLQ is back it is
/// dead-lettered exactly once, with the handler's error as it was.
#[tokio::test]
async fn a_dlq_outage_longer_than_max_deliveries_ends_dead_lettered() {
    const DEFAULT_MAX_DELIVERIES: usize = 5;
    let transport = MemoryTransport::new();
    let store = MemoryDlqStore::new();
    let outage = Outage::down();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let layer = DlqLayer::new("h")
        .policy(RetryPolicy::never())
        .sink(OutageSink(outage.clone()))
        .store(store.clone())
        .redeliver_after(Duration::from_millis(1));
    let handler = layer.layer(handler_fn(move |_msg: Incoming| {
        counted.fetch_add(1, Ordering::SeqCst);
        async { Err::<(), _>(HandlerError::permanent("order 42 has quantity 0")) }
    }));
    let deliveries = transport.subscribe("work", "g").await.unwrap();
    // The worker's defaults: max_deliveries is 5.
    let (stop, worker) = spawn_worker(Worker::new(handler), deliveries);
    let env = Envelope::builder("/t", "t").build();
    let id = env.id.clone();
    transport.publish("work", env).await.unwrap();

    let outlasting = 3 * DEFAULT_MAX_DELIVERIES;
    eventually(DEADLINE, "the outage to outlast max_deliveries", || async {
        assert!(
            transport.rejected("work", "g").is_empty(),
            "rejected to the broker during the outage"
        );
        outage.tried.load(Ordering::SeqCst) > outlasting
    })
    .await;
    assert_eq!(transport.depth("work", "g"), 1, "still on the broker");
    assert!(
        store.all().is_empty(),
        "nothing is dead-lettered while the DLQ is down"
    );

    // The DLQ is back.
    outage.down.store(false, Ordering::SeqCst);
    eventually(DEADLINE, "the group to drain", || async {
        transport.depth("work", "g") == 0
    })
    .await;
    stop.send(()).ok();
    let report = worker.await.unwrap();
    assert_eq!(report.acked, 1, "{report:?}");
    assert_eq!(report.rejected, 0, "{report:?}");
    assert!(report.requeued as usize > outlasting, "{report:?}");
    assert!(transport.rejected("work", "g").is_empty());
    let letters = store.all();
    assert_eq!(letters.len(), 1, "dead-lettered once");
    let letter = &letters[0];
    assert_eq!(letter.envelope.id, id);
    assert_eq!(letter.error.class, "permanent");
    assert_eq!(
        letter.error.message, "order 42 has quantity 0",
        "not wrapped twice"
    );
    assert_eq!(letter.error.chain, ["order 42 has quantity 0"]);
    assert_eq!(
        calls.load(Ordering::SeqCst) as u64,
        report.requeued + 1,
        "the handler ran once per delivery"
    );
}

/// With no sink at all, a final failure is rejected to the broker's own
/// dead-letter destination rather than acknowledged.
#[tokio::test]
async fn without_a_sink_the_message_is_rejected_not_dropped() {
    let transport = MemoryTransport::new();
    let handler = DlqLayer::new("h")
        .policy(RetryPolicy::never())
        .layer(handler_fn(|_msg: Incoming| async {
            Err::<(), _>(HandlerError::permanent("invalid"))
        }));
    let (stop, worker) = run_on_one_message(&transport, handler).await;
    eventually(DEADLINE, "the broker to get the message back", || async {
        transport.rejected("work", "g").len() == 1
    })
    .await;
    stop.send(()).ok();
    assert_eq!(worker.await.unwrap().acked, 0);
}

/// The layer's counters exist at zero once it wraps a handler (sinks) and
/// from a source's first delivery (dead letters by class, retries): an
/// alert on poison messages or sink failures sees a 0, not a missing
/// series. Replay outcomes exist from registration.
#[tokio::test]
async fn dlq_series_exist_at_zero_before_the_first_failure() {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = surety_dlq::DlqMetrics::register(&mut registry);
    let handler = DlqLayer::new("billing")
        .metrics(metrics)
        .store(MemoryDlqStore::new())
        .layer(handler_fn(|_msg: Incoming| async {
            Ok::<(), HandlerError>(())
        }));
    let scrape = || {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    };
    let before = scrape();
    for series in [
        r#"surety_dlq_replays_total{outcome="resolved"} 0"#,
        r#"surety_dlq_sink_failures_total{sink="store"} 0"#,
    ] {
        assert!(
            before.lines().any(|l| l == series),
            "{series} in:\n{before}"
        );
    }
    let mut test = HandlerTest::new(handler).topic("orders").group("billing");
    let then = test.deliver(Envelope::builder("/t", "t").build()).await;
    assert_eq!(then.outcome(), Some(Outcome::Handled));
    let after = scrape();
    let source = r#"messaging_system="test",messaging_destination_name="orders",messaging_consumer_group_name="billing""#;
    for series in [
        format!(r#"surety_dlq_dead_lettered_total{{{source},error_class="poison"}} 0"#),
        format!(r#"surety_dlq_dead_lettered_total{{{source},error_class="transient"}} 0"#),
        format!(
            r#"surety_dlq_retries_scheduled_total{{{source},error_class="transient",mode="delayed"}} 0"#
        ),
    ] {
        assert!(after.lines().any(|l| *l == series), "{series} in:\n{after}");
    }
}
