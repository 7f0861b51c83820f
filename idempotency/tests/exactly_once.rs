//! Property: for any interleaving of duplicated, reordered, dropped and
//! concurrent deliveries across several workers, every message's effect is
//! applied exactly once, no two deliveries of a message run at the same
//! time, and every delivery of a command that is acknowledged publishes the
//! original reply.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use proptest::prelude::*;
use surety_core::consumer::{Incoming, Outcome, Output, Worker, handler_fn};
use surety_core::memory::MemoryTransport;
use surety_core::tower::{Layer, ServiceExt, service_fn};
use surety_core::{Envelope, Publisher, Subscriber, Transient};
use surety_idempotency::{IdempotencyLayer, LeasePolicy, MemoryDedupStore};
use surety_testkit::fault::{FaultPlan, FaultyTransport};

const TOPIC: &str = "work";
const GROUP: &str = "handlers";
const REPLIES: &str = "replies";

#[derive(Debug, Clone)]
struct Msg {
    command: bool,
    keyed: bool,
    extra_copies: u8,
    fail_first: bool,
    work_ms: u8,
}

#[derive(Debug, Clone)]
struct Scenario {
    seed: u64,
    messages: Vec<Msg>,
    workers: usize,
    concurrency: usize,
    drop: f64,
    duplicate: f64,
    reorder: f64,
    fail_ack: f64,
    busy_wait_ms: u64,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let msg = (
        any::<bool>(),
        any::<bool>(),
        0u8..3,
        prop::bool::weighted(0.2),
        0u8..4,
    )
        .prop_map(|(command, keyed, extra_copies, fail_first, work_ms)| Msg {
            command,
            keyed,
            extra_copies,
            fail_first,
            work_ms,
        });
    (
        any::<u64>(),
        prop::collection::vec(msg, 1..12),
        1usize..4,
        1usize..4,
        0.0..0.3f64,
        0.0..0.5f64,
        0.0..0.3f64,
        0.0..0.3f64,
        prop_oneof![Just(0u64), Just(20), Just(200)],
    )
        .prop_map(
            |(
                seed,
                messages,
                workers,
                concurrency,
                drop,
                duplicate,
                reorder,
                fail_ack,
                busy_wait_ms,
            )| {
                Scenario {
                    seed,
                    messages,
                    workers,
                    concurrency,
                    drop,
                    duplicate,
                    reorder,
                    fail_ack,
                    busy_wait_ms,
                }
            },
        )
}

#[derive(Default)]
struct Ledger {
    /// Effects applied, by message id.
    effects: HashMap<String, u32>,
    /// Handler runs in progress, by message id.
    running: HashMap<String, u32>,
    /// A message whose handler ran twice at the same time.
    overlapped: Option<String>,
    /// Messages whose first run already failed.
    failed_once: HashSet<String>,
    /// Deliveries the idempotent handler finished with `Ok`, by message id.
    acked: HashMap<String, u32>,
}

async fn run(s: Scenario) -> Result<(), TestCaseError> {
    let transport = MemoryTransport::new();
    let plan = FaultPlan::new(s.seed)
        .drop(s.drop)
        .duplicate(s.duplicate)
        .reorder(s.reorder)
        .reorder_window(Duration::from_millis(5))
        .fail_ack(s.fail_ack)
        .max_forced_redeliveries(3);
    let faulty = FaultyTransport::new(transport.clone(), plan);
    let mut replies = transport.subscribe(REPLIES, "requester").await.unwrap();

    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let fail_first: HashSet<usize> = s
        .messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.fail_first)
        .map(|(i, _)| i)
        .collect();
    let work: HashMap<usize, u8> = s
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| (i, m.work_ms))
        .collect();
    let (fail_first, work) = (Arc::new(fail_first), Arc::new(work));

    let handler = {
        let ledger = Arc::clone(&ledger);
        handler_fn(move |msg: Incoming| {
            let (ledger, fail_first, work) = (
                Arc::clone(&ledger),
                Arc::clone(&fail_first),
                Arc::clone(&work),
            );
            async move {
                let id = msg.envelope.id.clone();
                let index: usize = msg
                    .envelope
                    .subject
                    .as_deref()
                    .unwrap_or("0")
                    .parse()
                    .unwrap_or(0);
                {
                    let mut l = ledger.lock().unwrap();
                    let running = l.running.entry(id.clone()).or_default();
                    *running += 1;
                    if *running > 1 {
                        l.overlapped = Some(id.clone());
                    }
                }
                tokio::time::sleep(Duration::from_millis(u64::from(work[&index]))).await;
                let mut l = ledger.lock().unwrap();
                *l.running.entry(id.clone()).or_default() -= 1;
                if fail_first.contains(&index) && l.failed_once.insert(id.clone()) {
                    return Err(Transient::new("injected failure before the effect"));
                }
                *l.effects.entry(id.clone()).or_default() += 1;
                drop(l);
                if msg.envelope.event_type != "command" {
                    return Ok(None);
                }
                // A fresh reply id per run: a second run would be visible.
                let reply = msg.envelope.caused_by("/handler", "reply").build();
                Ok(Some(Output::new(REPLIES, reply)))
            }
        })
    };
    let policy =
        LeasePolicy::new(Duration::from_secs(30)).busy_wait(Duration::from_millis(s.busy_wait_ms));
    let idempotent = IdempotencyLayer::new(MemoryDedupStore::new())
        .policy(policy)
        .layer(handler);
    let counted = {
        let ledger = Arc::clone(&ledger);
        service_fn(move |msg: Incoming| {
            let (ledger, idempotent) = (Arc::clone(&ledger), idempotent.clone());
            async move {
                let id = msg.envelope.id.clone();
                let result = idempotent.oneshot(msg).await;
                if matches!(
                    result.as_ref().map(|r| r.outcome),
                    Ok(Outcome::Handled | Outcome::Duplicate)
                ) {
                    *ledger.lock().unwrap().acked.entry(id).or_default() += 1;
                }
                result
            }
        })
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut workers = Vec::new();
    for _ in 0..s.workers {
        let deliveries = faulty.subscribe(TOPIC, GROUP).await.unwrap();
        let mut stop = stop_rx.clone();
        let worker = Worker::new(counted.clone())
            .emit_to(transport.clone())
            .concurrency(s.concurrency)
            .max_deliveries(1_000)
            .max_retry_after(Duration::from_millis(20));
        workers.push(tokio::spawn(worker.run(deliveries, async move {
            let _ = stop.wait_for(|stop| *stop).await;
        })));
    }

    let mut published: Vec<(Envelope, u32)> = Vec::new();
    for (i, m) in s.messages.iter().enumerate() {
        let mut env = Envelope::builder("/test", if m.command { "command" } else { "event" })
            .subject(i.to_string());
        if m.keyed {
            env = env.partition_key(format!("k{}", i % 3));
        }
        let env = env.build();
        for _ in 0..=m.extra_copies {
            faulty.publish(TOPIC, env.clone()).await.unwrap();
        }
        published.push((env, 1 + u32::from(m.extra_copies)));
    }

    // Quiescence: every copy settled and every message applied.
    common::wait_until(
        "every delivery to be settled",
        Duration::from_secs(30),
        || {
            transport.depth(TOPIC, GROUP) == 0
                && ledger.lock().unwrap().effects.len() == published.len()
        },
    )
    .await;
    stop_tx.send(true).unwrap();
    for worker in workers {
        worker.await.unwrap();
    }

    let expected_replies = {
        let ledger = ledger.lock().unwrap();
        prop_assert_eq!(
            ledger.overlapped.as_ref(),
            None,
            "two runs of one message overlapped"
        );
        prop_assert!(
            transport.rejected(TOPIC, GROUP).is_empty(),
            "nothing is rejected"
        );
        let mut expected_replies = 0;
        for (env, copies) in &published {
            prop_assert_eq!(
                ledger.effects.get(&env.id).copied(),
                Some(1),
                "effect of {}",
                env.subject.as_deref().unwrap_or("")
            );
            let acked = ledger.acked.get(&env.id).copied().unwrap_or(0);
            prop_assert!(
                acked >= *copies,
                "each of the {} copies is acknowledged; saw {}",
                copies,
                acked
            );
            if env.event_type == "command" {
                expected_replies += acked;
            }
        }
        expected_replies
    };

    // Every acknowledged command delivery published the one original reply.
    let mut by_command: HashMap<String, Vec<Envelope>> = HashMap::new();
    for _ in 0..expected_replies {
        let reply = tokio::time::timeout(Duration::from_secs(5), replies.next())
            .await
            .expect("a reply for every acknowledged command delivery")
            .expect("reply stream open")
            .unwrap();
        let env = reply.envelope().clone();
        reply.ack().await.unwrap();
        by_command
            .entry(env.causation_id.clone().unwrap_or_default())
            .or_default()
            .push(env);
    }
    prop_assert_eq!(transport.depth(REPLIES, "requester"), 0, "no extra replies");
    for (env, _) in published.iter().filter(|(e, _)| e.event_type == "command") {
        let replies = by_command.get(&env.id).cloned().unwrap_or_default();
        prop_assert!(!replies.is_empty(), "command {} got a reply", env.id);
        prop_assert!(
            replies.iter().all(|r| r == &replies[0]),
            "every reply to {} is the original",
            env.id
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 32,
        max_shrink_iters: 64,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("regressions"),
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_effect_happens_exactly_once(s in scenario()) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run(s))?;
    }
}
