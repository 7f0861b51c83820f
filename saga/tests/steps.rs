//! The checkout step-list definition, given/when/then, and a property test
//! over reply orders, duplicates, late replies, lost messages, timeouts and
//! crashes, driven through the orchestrator on the in-memory store.
//! Deadlines may pass while commands are still in flight, so a step's
//! command can reach its participant after the step's compensation.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::Utc;
use proptest::prelude::*;
use surety_saga::checkout::{self, Deadlines};
use surety_saga::participant::{self, Gate, MemoryTombstones};
use surety_saga::steps::{DEADLINE, Status, StepReply, StepState, Steps, actions};
use surety_saga::store::MemorySagaStore;
use surety_saga::{Command, Input, OperatorAction, Orchestrator, Saga, Transition};

fn saga() -> Steps {
    checkout::definition(Deadlines::default())
}

fn reply(kind: &str) -> Input<StepReply> {
    Input::Message(StepReply::new(kind))
}

fn timeout() -> Input<StepReply> {
    Input::Timeout {
        name: DEADLINE.into(),
    }
}

fn operator(action: &str) -> Input<StepReply> {
    Input::Operator(OperatorAction::new(
        action,
        "alice",
        "checked with the customer",
    ))
}

/// Given the inputs so far (from the start), the instance's state.
fn given(inputs: &[Input<StepReply>]) -> StepState {
    let saga = saga();
    let start = saga.begin(serde_json::json!({"order": "o-1", "cents": 4200}));
    let mut state = start.state().cloned().expect("the start moves");
    for input in inputs {
        if let Some(next) = saga.apply(&state, input).state() {
            state = next.clone();
        }
    }
    state
}

fn when(state: &StepState, input: Input<StepReply>) -> Transition<StepState> {
    saga().apply(state, &input)
}

fn sent(transition: &Transition<StepState>) -> Vec<(&str, &str)> {
    transition
        .commands()
        .iter()
        .map(|c| (c.topic.as_str(), c.message_type.as_str()))
        .collect()
}

fn status(transition: &Transition<StepState>) -> Status {
    transition.state().expect("a transition").status.clone()
}

#[test]
fn the_start_charges_the_payment_with_a_deadline() {
    let start = saga().begin(serde_json::json!({"order": "o-1"}));
    assert_eq!(sent(&start), [("payments", "payment.charge")]);
    assert_eq!(start.commands()[0].key.as_deref(), Some("do:payment:0"));
    assert_eq!(start.commands()[0].payload["order"], "o-1");
    assert_eq!(
        start.timers_set(),
        [(DEADLINE.to_owned(), Duration::from_secs(30))]
    );
}

#[test]
fn happy_path_moves_step_by_step_and_completes() {
    let then = when(&given(&[]), reply("payment.charged"));
    assert_eq!(sent(&then), [("inventory", "inventory.reserve")]);
    let then = when(
        &given(&[reply("payment.charged")]),
        reply("inventory.reserved"),
    );
    assert_eq!(sent(&then), [("shipping", "shipping.book")]);
    let state = given(&[reply("payment.charged"), reply("inventory.reserved")]);
    let then = when(&state, reply("shipping.booked"));
    assert_eq!(status(&then), Status::Completed);
    assert!(then.commands().is_empty());
    assert_eq!(then.timers_cancelled(), [DEADLINE.to_owned()]);
    assert!(saga().is_finished(then.state().unwrap()));
}

#[test]
fn payment_declined_ends_compensated_with_nothing_to_undo() {
    let then = when(&given(&[]), reply("payment.declined"));
    assert_eq!(status(&then), Status::Compensated);
    assert!(then.commands().is_empty());
    assert_eq!(
        then.state().unwrap().failure.as_deref(),
        Some("payment: payment.declined")
    );
}

#[test]
fn out_of_stock_refunds_the_payment() {
    let state = given(&[reply("payment.charged")]);
    let then = when(&state, reply("inventory.out-of-stock"));
    assert_eq!(sent(&then), [("payments", "payment.refund")]);
    assert_eq!(
        status(&then),
        Status::Compensating {
            step: 0,
            attempt: 1
        }
    );
    let state = given(&[reply("payment.charged"), reply("inventory.out-of-stock")]);
    assert_eq!(
        status(&when(&state, reply("payment.refunded"))),
        Status::Compensated
    );
}

#[test]
fn shipping_timeouts_retry_with_the_same_id_then_release_and_refund() {
    let at_shipping = [reply("payment.charged"), reply("inventory.reserved")];
    let retry = when(&given(&at_shipping), timeout());
    assert_eq!(sent(&retry), [("shipping", "shipping.book")]);
    assert_eq!(retry.commands()[0].key.as_deref(), Some("do:shipping:0"));

    let mut inputs = at_shipping.to_vec();
    inputs.extend([timeout(), timeout()]);
    let then = when(&given(&inputs), timeout());
    // The booking may have been made: cancel it (a no-op if not), then
    // release and refund.
    assert_eq!(sent(&then), [("shipping", "shipping.cancel")]);
    inputs.extend([timeout(), reply("shipping.cancelled")]);
    let then = when(
        &given(&inputs[..inputs.len() - 1]),
        reply("shipping.cancelled"),
    );
    assert_eq!(sent(&then), [("inventory", "inventory.release")]);
    let then = when(&given(&inputs), reply("inventory.released"));
    assert_eq!(sent(&then), [("payments", "payment.refund")]);
    inputs.push(reply("inventory.released"));
    assert_eq!(
        status(&when(&given(&inputs), reply("payment.refunded"))),
        Status::Compensated
    );
}

#[test]
fn a_payment_that_times_out_is_refunded_to_be_sure() {
    let then = when(&given(&[timeout(), timeout()]), timeout());
    assert_eq!(sent(&then), [("payments", "payment.refund")]);
}

#[test]
fn an_error_reply_ends_the_step_at_once_and_compensates_what_was_done() {
    // The participant's idempotency layer stored the error for this
    // command id: sending the same id again would only get it again.
    let state = given(&[reply("payment.charged")]);
    let then = when(&state, reply("inventory.reserve.error"));
    // The reservation failed: only the payment is undone.
    assert_eq!(sent(&then), [("payments", "payment.refund")]);
    assert_eq!(
        then.state().unwrap().failure.as_deref(),
        Some("inventory: inventory.reserve.error (final for this command)")
    );
    // Also when it answers a re-send after a deadline.
    let inputs = [reply("payment.charged"), timeout()];
    let then = when(&given(&inputs), reply("inventory.reserve.error"));
    assert_eq!(sent(&then), [("payments", "payment.refund")]);
}

#[test]
fn a_compensation_that_fails_waits_for_an_operator_whose_retry_completes_it() {
    let mut inputs = vec![reply("payment.charged"), reply("inventory.out-of-stock")];
    // No reply: the refund is sent again, same id.
    assert_eq!(
        sent(&when(&given(&inputs), timeout())),
        [("payments", "payment.refund")]
    );
    inputs.push(timeout());
    // An error reply is final for that command: no more automatic sends.
    let then = when(&given(&inputs), reply("payment.refund.error"));
    assert_eq!(status(&then), Status::CompensationFailed { step: 0 });
    assert!(then.commands().is_empty());
    inputs.push(reply("payment.refund.error"));
    let stuck = given(&inputs);
    assert!(!saga().is_finished(&stuck), "it waits for an operator");
    assert!(when(&stuck, timeout()).is_ignored());
    assert!(when(&stuck, reply("payment.refund.error")).is_ignored());
    // A late confirmation of the refund finishes the compensation.
    assert_eq!(
        status(&when(&stuck, reply("payment.refunded"))),
        Status::Compensated
    );

    let retry = when(&stuck, operator(actions::RETRY));
    assert_eq!(sent(&retry), [("payments", "payment.refund")]);
    assert_eq!(
        retry.commands()[0].key.as_deref(),
        Some("undo:payment:1"),
        "an operator retry is a new command"
    );
    inputs.push(operator(actions::RETRY));
    assert_eq!(
        status(&when(&given(&inputs), reply("payment.refunded"))),
        Status::Compensated
    );
}

#[test]
fn a_compensation_without_replies_fails_when_its_attempts_are_spent() {
    // Three attempts by default: two deadlines re-send, the third gives up.
    let inputs = [
        reply("payment.charged"),
        reply("inventory.out-of-stock"),
        timeout(),
    ];
    assert_eq!(
        status(&when(&given(&inputs), timeout())),
        Status::Compensating {
            step: 0,
            attempt: 3
        }
    );
    let inputs = [inputs.as_slice(), &[timeout()]].concat();
    assert_eq!(
        status(&when(&given(&inputs), timeout())),
        Status::CompensationFailed { step: 0 }
    );
}

#[test]
fn late_and_duplicate_replies_are_ignored() {
    let state = given(&[reply("payment.charged")]);
    assert!(when(&state, reply("payment.charged")).is_ignored());
    assert!(when(&state, reply("shipping.booked")).is_ignored());
    let compensating = given(&[reply("payment.charged"), reply("inventory.out-of-stock")]);
    assert!(when(&compensating, reply("inventory.reserved")).is_ignored());
    assert!(when(&compensating, reply("payment.charged")).is_ignored());
}

#[test]
fn operators_force_compensation_or_resolve() {
    let state = given(&[reply("payment.charged")]);
    let then = when(&state, operator(actions::COMPENSATE));
    // The reservation may have happened: it is released, then the payment refunded.
    assert_eq!(sent(&then), [("inventory", "inventory.release")]);
    let then = when(&state, operator(actions::RESOLVE));
    assert_eq!(status(&then), Status::Resolved);
    assert!(
        then.state()
            .unwrap()
            .failure
            .as_deref()
            .unwrap()
            .contains("checked with the customer")
    );
    assert!(when(&state, operator("dance")).is_ignored());
}

#[test]
fn reply_types_cover_every_reply_once() {
    let types = saga().reply_types();
    for kind in [
        "payment.charged",
        "payment.declined",
        "payment.charge.error",
        "payment.refunded",
        "payment.refund.error",
        "inventory.out-of-stock",
        "shipping.booked",
    ] {
        assert!(types.iter().any(|t| t == kind), "{kind} in {types:?}");
    }
    let unique: BTreeSet<_> = types.iter().collect();
    assert_eq!(unique.len(), types.len());
}

#[test]
fn mermaid_shows_steps_failures_and_compensations() {
    let diagram = saga().mermaid();
    assert!(diagram.starts_with("stateDiagram-v2\n"));
    for line in [
        "[*] --> payment",
        "payment --> inventory : payment.charged",
        "inventory --> compensating_payment : inventory.out-of-stock",
        "shipping --> compensating_shipping : no reply, attempts spent",
        "shipping --> compensating_inventory : shipping.book.error",
        "compensating_inventory --> compensating_payment : inventory.released",
        "compensating_payment --> compensated : payment.refunded",
        "compensating_payment --> compensation_failed : payment.refund.error / no reply, attempts spent",
        "completed --> [*]",
    ] {
        assert!(diagram.contains(line), "{line:?} in\n{diagram}");
    }
}

// ---- the property test ----------------------------------------------------

/// How a participant answers a command type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Success,
    /// A business failure (declined, out of stock, unavailable).
    Decline,
    /// An error reply, every time.
    Error,
}

fn answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        4 => Just(Answer::Success),
        1 => Just(Answer::Decline),
        1 => Just(Answer::Error),
    ]
}

#[derive(Clone, Debug)]
struct Scenario {
    charge: Answer,
    reserve: Answer,
    book: Answer,
    /// Whether refunds and releases fail every time.
    compensation_fails: bool,
    ops: Vec<Op>,
}

/// What the network and the orchestrator do next to the message at an
/// index of the in-flight list.
#[derive(Clone, Copy, Debug)]
enum Op {
    Deliver(usize),
    /// Delivered twice (a redelivery).
    Duplicate(usize),
    /// Lost: never delivered.
    Lose(usize),
    /// Handled, then the process dies before the ack: handled again after
    /// the restart.
    Crash(usize),
    /// Deadlines pass: every due timer fires (with no command in flight:
    /// deadlines are longer than a command's delivery; replies may be late).
    Fire,
    /// Deadlines pass while commands are still in flight (a slow queue):
    /// a step's command may then arrive after its compensation.
    FireEarly,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<usize>().prop_map(Op::Deliver),
        1 => any::<usize>().prop_map(Op::Duplicate),
        1 => any::<usize>().prop_map(Op::Lose),
        1 => any::<usize>().prop_map(Op::Crash),
        1 => Just(Op::Fire),
        1 => Just(Op::FireEarly),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        answer(),
        answer(),
        answer(),
        prop::bool::weighted(0.2),
        prop::collection::vec(op(), 0..60),
    )
        .prop_map(
            |(charge, reserve, book, compensation_fails, ops)| Scenario {
                charge,
                reserve,
                book,
                compensation_fails,
                ops,
            },
        )
}

#[derive(Clone, Debug)]
enum Msg {
    Command(Box<surety_core::Envelope>),
    Reply(StepReply),
}

/// The participants: each applies a message id once and replays its reply
/// to a duplicate, error replies included (an idempotent consumer). A
/// compensation records a tombstone first (the participant helper's
/// [`participant::check`]), and a step's command after its compensation is
/// a recorded no-op: no reply, nothing applied.
#[derive(Debug, Default)]
struct Participants {
    replies: BTreeMap<String, Option<StepReply>>,
    tombstones: MemoryTombstones,
    /// Commands answered as already compensated, by type.
    tombstoned: Vec<String>,
    /// Effects applied, by command type, with the message ids.
    applied: BTreeMap<String, Vec<String>>,
    charged: bool,
    reserved: bool,
    booked: bool,
}

impl Participants {
    async fn handle(
        &mut self,
        scenario: &Scenario,
        envelope: &surety_core::Envelope,
    ) -> Option<StepReply> {
        if let Some(reply) = self.replies.get(&envelope.id) {
            return reply.clone();
        }
        let kind = envelope.event_type.as_str();
        let gate = participant::check(&self.tombstones, envelope)
            .await
            .expect("in-memory tombstones do not fail");
        if gate == Gate::AlreadyCompensated {
            self.tombstoned.push(kind.to_owned());
            self.replies.insert(envelope.id.clone(), None);
            return None;
        }
        let (answer, ok, declined) = match kind {
            "payment.charge" => (scenario.charge, "payment.charged", "payment.declined"),
            "inventory.reserve" => (
                scenario.reserve,
                "inventory.reserved",
                "inventory.out-of-stock",
            ),
            "shipping.book" => (scenario.book, "shipping.booked", "shipping.unavailable"),
            "payment.refund" | "inventory.release" | "shipping.cancel"
                if scenario.compensation_fails =>
            {
                (Answer::Error, "", "")
            }
            "payment.refund" => (Answer::Success, "payment.refunded", ""),
            "inventory.release" => (Answer::Success, "inventory.released", ""),
            "shipping.cancel" => (Answer::Success, "shipping.cancelled", ""),
            other => panic!("unexpected command {other}"),
        };
        let reply = match answer {
            Answer::Error => {
                let error = StepReply::new(format!("{kind}.error"));
                self.replies
                    .insert(envelope.id.clone(), Some(error.clone()));
                return Some(error);
            }
            Answer::Decline => StepReply::new(declined),
            Answer::Success => {
                match kind {
                    "payment.charge" => self.charged = true,
                    "inventory.reserve" => self.reserved = true,
                    "shipping.book" => self.booked = true,
                    // A refund or release of nothing is a no-op.
                    "payment.refund" => self.charged = false,
                    "inventory.release" => self.reserved = false,
                    "shipping.cancel" => self.booked = false,
                    _ => {}
                }
                StepReply::new(ok)
            }
        };
        self.applied
            .entry(kind.to_owned())
            .or_default()
            .push(envelope.id.clone());
        self.replies
            .insert(envelope.id.clone(), Some(reply.clone()));
        Some(reply)
    }
}

struct World {
    orchestrator: Orchestrator<Steps, MemorySagaStore>,
    store: MemorySagaStore,
    in_flight: Vec<Msg>,
    participants: Participants,
    /// Every command sent, as (type, id).
    sent: Vec<(String, String)>,
    clock: chrono::DateTime<Utc>,
}

impl World {
    fn collect(&mut self) {
        for (topic, envelope) in self.store.take_commands() {
            self.sent
                .push((envelope.event_type.clone(), envelope.id.clone()));
            let _ = topic;
            self.in_flight.push(Msg::Command(Box::new(envelope)));
        }
    }

    async fn deliver(&mut self, msg: Msg, scenario: &Scenario) {
        match msg {
            Msg::Command(envelope) => {
                if let Some(reply) = self.participants.handle(scenario, &envelope).await {
                    self.in_flight.push(Msg::Reply(reply));
                }
            }
            Msg::Reply(reply) => {
                self.orchestrator
                    .handle("o-1", Input::Message(reply))
                    .await
                    .expect("the in-memory store does not fail");
            }
        }
        self.collect();
    }

    async fn fire(&mut self) {
        self.clock += chrono::Duration::days(1);
        self.orchestrator
            .fire_due_timers(self.clock, 100)
            .await
            .expect("the in-memory store does not fail");
        self.collect();
    }

    /// The network settles: everything in flight arrives, deadlines pass
    /// until nothing is pending.
    async fn settle(&mut self, scenario: &Scenario) {
        for _ in 0..1_000 {
            if !self.in_flight.is_empty() {
                let msg = self.in_flight.remove(0);
                self.deliver(msg, scenario).await;
            } else if !self.store.timers().is_empty() {
                self.fire().await;
            } else {
                break;
            }
        }
    }

    fn commands_in_flight(&self) -> bool {
        self.in_flight.iter().any(|m| matches!(m, Msg::Command(..)))
    }
}

async fn run(scenario: Scenario) -> (StepState, World) {
    let store = MemorySagaStore::new();
    let orchestrator = Orchestrator::new(saga(), store.clone());
    let start = orchestrator
        .saga()
        .begin(serde_json::json!({"order": "o-1"}));
    orchestrator.start("o-1", start).await.expect("starts");
    let mut world = World {
        orchestrator,
        store,
        in_flight: Vec::new(),
        participants: Participants::default(),
        sent: Vec::new(),
        clock: Utc::now(),
    };
    world.collect();
    for op in &scenario.ops {
        let len = world.in_flight.len();
        match *op {
            Op::Fire => {
                if !world.commands_in_flight() {
                    world.fire().await;
                }
            }
            Op::FireEarly => world.fire().await,
            _ if len == 0 => {}
            Op::Deliver(i) => {
                let msg = world.in_flight.remove(i % len);
                world.deliver(msg, &scenario).await;
            }
            Op::Duplicate(i) | Op::Crash(i) => {
                let msg = world.in_flight.remove(i % len);
                world.deliver(msg.clone(), &scenario).await;
                world.deliver(msg, &scenario).await;
            }
            Op::Lose(i) => {
                world.in_flight.remove(i % len);
            }
        }
    }
    world.settle(&scenario).await;
    let state = world
        .orchestrator
        .state("o-1")
        .await
        .expect("loads")
        .expect("exists");
    (state, world)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_checkout_ends_completed_or_fully_compensated(scenario in scenario()) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (state, world) = runtime.block_on(run(scenario.clone()));
        let p = &world.participants;
        prop_assert!(world.in_flight.is_empty() && world.store.timers().is_empty());

        // No command was sent under two ids (every re-send is a retry the
        // participant deduplicates), and no participant applied one twice.
        let mut ids: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (kind, id) in &world.sent {
            ids.entry(kind).or_default().insert(id);
        }
        for (kind, ids) in &ids {
            prop_assert_eq!(ids.len(), 1, "{} sent under {:?}", kind, ids);
        }
        for (kind, applied) in &p.applied {
            prop_assert_eq!(applied.len(), 1, "{} applied {:?}", kind, applied);
        }

        match &state.status {
            Status::Completed => {
                // Never half, never both.
                prop_assert!(p.charged && p.reserved && p.booked);
                prop_assert!(!p.applied.contains_key("payment.refund"));
                prop_assert!(!p.applied.contains_key("inventory.release"));
                prop_assert_eq!(scenario.charge, Answer::Success);
            }
            Status::Compensated => {
                prop_assert!(!p.charged && !p.reserved && !p.booked, "{:?}", p);
                prop_assert!(state.failure.is_some());
            }
            Status::CompensationFailed { .. } => {
                // Every send of a compensation failed or was lost; something
                // taken is held until an operator acts.
                prop_assert!(!state.undo.is_empty());
                prop_assert!(!p.charged || state.undo.contains(&0), "{:?}", p);
                prop_assert!(!p.reserved || state.undo.contains(&1), "{:?}", p);
                prop_assert!(!p.booked || state.undo.contains(&2), "{:?}", p);
            }
            other => prop_assert!(false, "ended {:?}", other),
        }
        // The stored state is the replay of the recorded inputs.
        let (initial, inputs) = runtime
            .block_on(world.orchestrator.history("o-1"))
            .unwrap()
            .unwrap();
        prop_assert_eq!(surety_saga::replay(&saga(), initial, inputs), state.clone());

        if let Status::CompensationFailed { .. } = state.status {
            // An operator retries; with a participant that works again, the
            // compensation completes and nothing stays taken.
            let mut world = world;
            let fixed = Scenario { compensation_fails: false, ..scenario };
            let state = runtime.block_on(async {
                world
                    .orchestrator
                    .handle("o-1", operator(actions::RETRY))
                    .await
                    .unwrap();
                world.collect();
                world.settle(&fixed).await;
                world.orchestrator.state("o-1").await.unwrap().unwrap()
            });
            let p = &world.participants;
            prop_assert_eq!(&state.status, &Status::Compensated);
            prop_assert!(!p.charged && !p.reserved && !p.booked, "{:?}", p);
        }
    }
}

#[test]
fn keyed_commands_keep_their_id_across_resends() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = MemorySagaStore::new();
        let orchestrator = Orchestrator::new(saga(), store.clone()).reply_to("checkout.replies");
        let start = orchestrator
            .saga()
            .begin(serde_json::json!({"order": "o-9"}));
        orchestrator.start("o-9", start).await.unwrap();
        let first = store.take_commands();
        let later = Utc::now() + chrono::Duration::days(1);
        orchestrator.fire_due_timers(later, 10).await.unwrap();
        let second = store.take_commands();
        assert_eq!(first[0].1.id, "checkout:o-9:do:payment:0");
        assert_eq!(second[0].1.id, first[0].1.id);
        assert_eq!(first[0].1.reply_to(), Some("checkout.replies"));
        assert_eq!(first[0].1.correlation_id.as_deref(), Some("o-9"));
        let _ = Command::new("x", "y", serde_json::Value::Null);
    });
}

#[test]
fn in_flight_instances_drain_on_the_version_they_started_on() {
    use surety_saga::steps::{Step, Versions};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let v1 = saga();
        // Version 2 checks for fraud first: step 0 means something else.
        let v2 = Steps::new(checkout::NAME)
            .version(2)
            .step(Step::new("fraud", "fraud", "fraud.check").replies("fraud.cleared"))
            .step(Step::new("payment", "payments", "payment.charge").replies("payment.charged"));
        let store = MemorySagaStore::new();
        let old = Orchestrator::new(v1.clone(), store.clone());
        old.start("o-old", v1.begin(serde_json::json!({})))
            .await
            .unwrap();
        store.take_commands();

        // Deployed: new instances start on v2, o-old keeps running on v1.
        let new = Orchestrator::new(Versions::new(v2.clone()).draining(v1), store.clone());
        new.start("o-new", new.saga().begin(serde_json::json!({})))
            .await
            .unwrap();
        assert_eq!(store.take_commands()[0].1.event_type, "fraud.check");
        new.handle("o-old", reply("payment.charged")).await.unwrap();
        assert_eq!(store.take_commands()[0].1.event_type, "inventory.reserve");
        let state = new.state("o-old").await.unwrap().unwrap();
        assert_eq!(state.definition, 1);
        assert_eq!(new.saga().state_name(&state), "inventory");

        // Without v1 loaded, its instances take no input rather than run on v2.
        let only_v2 = Orchestrator::new(Versions::new(v2), store.clone());
        assert_eq!(
            only_v2
                .handle("o-old", reply("inventory.reserved"))
                .await
                .unwrap(),
            surety_saga::Outcome::Ignored
        );
    });
    // A state stored before versions existed is version 1.
    let mut stored = serde_json::to_value(given(&[])).unwrap();
    stored.as_object_mut().unwrap().remove("definition");
    let state: StepState = serde_json::from_value(stored).unwrap();
    assert_eq!(state.definition, 1);
}

#[test]
fn metrics_count_starts_ends_steps_and_observe_stuck_instances() {
    use prometheus_client::registry::Registry;
    use surety_saga::metrics::SagaMetrics;
    use surety_saga::store::SagaStore;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut registry = Registry::default();
        let metrics = SagaMetrics::register(&mut registry);
        let store = MemorySagaStore::new();
        let saga = Orchestrator::new(self::saga(), store.clone()).metrics(metrics.clone());
        // The saga's series exist at zero before its first input.
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for series in [
            r#"surety_saga_inputs_total{saga="checkout",outcome="unknown"} 0"#,
            r#"surety_saga_conflicts_total{saga="checkout"} 0"#,
            r#"surety_saga_timeouts_total{saga="checkout",outcome="stale"} 0"#,
            r#"surety_saga_stuck{saga="checkout"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == series), "{series} in:\n{text}");
        }
        for id in ["a", "b", "c"] {
            saga.start(id, saga.saga().begin(serde_json::json!({})))
                .await
                .unwrap();
        }
        saga.handle("a", reply("payment.declined")).await.unwrap();
        saga.handle("b", reply("payment.charged")).await.unwrap();
        saga.handle("b", reply("payment.charged")).await.unwrap();
        assert_eq!(metrics.started_count("checkout"), 3);
        assert_eq!(metrics.finished_count("checkout", "compensated"), 1);
        assert_eq!(
            metrics.inputs_count("checkout", "ignored"),
            1,
            "the duplicate"
        );
        assert_eq!(metrics.duplicate_replies_count("checkout"), 1);
        saga.handle("a", reply("payment.declined")).await.unwrap();
        assert_eq!(
            metrics.duplicate_replies_count("checkout"),
            2,
            "late, finished"
        );

        let counts = store
            .unfinished_counts("checkout", Utc::now())
            .await
            .unwrap();
        metrics.observe("checkout", &counts);
        assert_eq!(metrics.instances_count("checkout", "payment"), 1);
        assert_eq!(metrics.instances_count("checkout", "inventory"), 1);
        assert_eq!(metrics.stuck_count("checkout"), 2);
        // "c" moves on: its old step drops to 0.
        saga.handle("c", reply("payment.charged")).await.unwrap();
        let counts = store
            .unfinished_counts("checkout", Utc::now() - chrono::Duration::hours(1))
            .await
            .unwrap();
        metrics.observe("checkout", &counts);
        assert_eq!(metrics.instances_count("checkout", "payment"), 0);
        assert_eq!(metrics.instances_count("checkout", "inventory"), 2);
        assert_eq!(metrics.stuck_count("checkout"), 0);

        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                "surety_saga_step_duration_seconds_count{saga=\"checkout\",state=\"payment\"} 3"
            ),
            "{text}"
        );
    });
}

#[test]
fn stored_states_of_an_older_schema_are_upcast_before_they_decode() {
    use surety_core::upcast::Upcasters;
    use surety_saga::store::SagaStore;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = MemorySagaStore::new();
        let v1 = Orchestrator::new(saga(), store.clone());
        v1.start("o-1", saga().begin(serde_json::json!({"total": 4200})))
            .await
            .unwrap();
        store.take_commands();
        let upcasters = || {
            Upcasters::new().current_version("checkout.state", 2).step(
                "checkout.state",
                1,
                |mut state| {
                    state["data"]["cents"] = state["data"]["total"].take();
                    state
                },
            )
        };
        let v2 = Orchestrator::new(saga(), store.clone()).upcast_state(upcasters());
        assert_eq!(v2.state("o-1").await.unwrap().unwrap().data["cents"], 4200);
        v2.handle("o-1", reply("payment.charged")).await.unwrap();
        // The command carries the upcast data; the row is at version 2 now.
        let sent = store.take_commands();
        let payload: serde_json::Value = sent[0].1.decode().unwrap();
        assert_eq!(payload["cents"], 4200);
        assert_eq!(
            store
                .load("checkout", "o-1")
                .await
                .unwrap()
                .unwrap()
                .state_version,
            2
        );
        // A state from a newer schema than this orchestrator knows is an
        // error, never decoded as if it were current.
        let old = Orchestrator::new(saga(), store.clone())
            .upcast_state(Upcasters::new().current_version("checkout.state", 1));
        let error = old.state("o-1").await.unwrap_err();
        assert!(
            matches!(error, surety_saga::SagaError::Upcast { .. }),
            "{error}"
        );
    });
}

/// An orchestrator decides the next input to an instance it wrote last
/// without reading it back; when another orchestrator has moved the
/// instance on since, the write conflicts and the input is decided again
/// on the stored record, also when the remembered step would have ignored
/// it.
#[test]
fn a_remembered_instance_moved_on_elsewhere_is_read_again() {
    use surety_saga::Outcome;
    use surety_saga::store::SagaStore;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = MemorySagaStore::new();
        let here = Orchestrator::new(self::saga(), store.clone());
        let there = Orchestrator::new(self::saga(), store.clone());
        here.start("o-1", here.saga().begin(serde_json::json!({})))
            .await
            .unwrap();
        // `there` moves the instance on: payment done, inventory next.
        assert!(matches!(
            there.handle("o-1", reply("payment.charged")).await.unwrap(),
            Outcome::Applied { .. }
        ));
        // `here` remembers the payment step, where this reply is ignored;
        // it is applied on the stored record instead.
        assert!(matches!(
            here.handle("o-1", reply("inventory.reserved"))
                .await
                .unwrap(),
            Outcome::Applied { .. }
        ));
        let stored = store.load("checkout", "o-1").await.unwrap().unwrap();
        assert_eq!(
            (stored.version, stored.state_name.as_str()),
            (3, "shipping")
        );
        // `there` still remembers the inventory step, which takes a
        // duplicate of the inventory reply: the write conflicts, and on the
        // stored record the duplicate is late and changes nothing.
        assert!(matches!(
            there
                .handle("o-1", reply("inventory.reserved"))
                .await
                .unwrap(),
            Outcome::Ignored
        ));
        assert!(matches!(
            there.handle("o-1", reply("shipping.booked")).await.unwrap(),
            Outcome::Applied { finished: true, .. }
        ));
        let stored = store.load("checkout", "o-1").await.unwrap().unwrap();
        assert_eq!(
            (stored.version, stored.state_name.as_str()),
            (4, "completed")
        );
        // Nothing was applied twice: one history row per input.
        assert_eq!(store.history("checkout", "o-1").await.unwrap().len(), 4);
    });
}
