//! What the broker tests share: the checkout over RabbitMQ with a SQL saga
//! store, its outbox relay, the reply consumer, the timer task and three
//! participants that record every effect they apply.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use surety_core::consumer::{Incoming, Response, Worker, handler_fn};
use surety_core::host::{Host, HostReport};
use surety_core::tower::ServiceBuilder;
use surety_core::{HandlerError, Permanent};
use surety_idempotency::IdempotencyLayer;
use surety_outbox::{OutboxStore, Relay};
use surety_rabbitmq::{RabbitConfig, RabbitTransport};
use surety_saga::checkout::{self, Deadlines};
use surety_saga::participant::{Answer, participant, reply};
use surety_saga::steps::{StepState, Steps};
use surety_saga::store::SagaStore;
use surety_saga::{Orchestrator, Saga, consumer};

/// How long a test waits for anything that should happen.
pub const WAIT: Duration = Duration::from_secs(60);

/// Queue names no other test (or earlier run) uses.
#[derive(Clone, Debug)]
pub struct Queues {
    pub prefix: String,
    pub payments: String,
    pub inventory: String,
    pub shipping: String,
    pub replies: String,
}

impl Queues {
    pub fn unique() -> Self {
        Self::with_prefix(format!("surety-saga-test.{}", uuid::Uuid::now_v7()))
    }

    pub fn with_prefix(prefix: String) -> Self {
        Self {
            payments: format!("{prefix}.payments"),
            inventory: format!("{prefix}.inventory"),
            shipping: format!("{prefix}.shipping"),
            replies: format!("{prefix}.replies"),
            prefix,
        }
    }
}

pub async fn rabbit(url: &str, name: &str) -> RabbitTransport {
    let config = RabbitConfig::new(url)
        .connection_name(format!("surety-saga-test.{name}.{}", uuid::Uuid::now_v7()))
        .confirm_timeout(Duration::from_secs(15))
        .outage_wait(Duration::from_secs(15));
    RabbitTransport::connect(config)
        .await
        .expect("connects to RabbitMQ")
}

/// Short deadlines so the timeout paths run in seconds: two sends per step
/// and per compensation.
pub fn deadlines() -> Deadlines {
    Deadlines {
        step: Duration::from_secs(2),
        compensation: Duration::from_secs(2),
        step_attempts: 2,
        compensation_attempts: 2,
    }
}

pub fn definition(queues: &Queues) -> Steps {
    definition_with(queues, deadlines())
}

pub fn definition_with(queues: &Queues, deadlines: Deadlines) -> Steps {
    checkout::definition_on(
        deadlines,
        &queues.payments,
        &queues.inventory,
        &queues.shipping,
    )
}

/// What the participants did: every effect applied, by (command type,
/// order), with how often; and a switch that makes refunds fail.
#[derive(Clone, Debug, Default)]
pub struct World {
    pub effects: Arc<Mutex<BTreeMap<(String, String), usize>>>,
    pub refunds_broken: Arc<AtomicBool>,
}

impl World {
    fn apply(&self, kind: &str, order: &str) {
        *self
            .effects
            .lock()
            .unwrap()
            .entry((kind.to_owned(), order.to_owned()))
            .or_default() += 1;
    }

    /// The effects applied for `order`, by command type.
    pub fn effects_of(&self, order: &str) -> BTreeMap<String, usize> {
        self.effects
            .lock()
            .unwrap()
            .iter()
            .filter(|((_, o), _)| o == order)
            .map(|((kind, _), n)| (kind.clone(), *n))
            .collect()
    }

    /// Every (command type, order) applied more than once.
    pub fn applied_twice(&self) -> Vec<(String, String)> {
        self.effects
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// The order's scenario, from the command payload: `happy`, `declined`,
/// `out-of-stock`, `ship-timeout` or `refund-fails` (out of stock, and the
/// refund fails while `refunds_broken`).
fn scenario(incoming: &Incoming) -> Result<(String, String), Permanent> {
    let data: serde_json::Value =
        serde_json::from_slice(&incoming.envelope.payload).map_err(Permanent::new)?;
    let order = data["order"].as_str().unwrap_or_default().to_owned();
    let scenario = data["scenario"].as_str().unwrap_or("happy").to_owned();
    Ok((order, scenario))
}

/// Adds the three participants (each idempotent with an in-memory dedup
/// store), the reply consumer and the timer task of `orchestrator`, and the
/// outbox relay of `outbox`, to `host`.
pub fn checkout_host<St, O>(
    host: Host,
    transport: &RabbitTransport,
    queues: &Queues,
    orchestrator: Arc<Orchestrator<Steps, St>>,
    outbox: O,
    world: &World,
    participants: bool,
) -> Host
where
    St: SagaStore + 'static,
    O: OutboxStore + Clone + 'static,
{
    let relay = Relay::new(outbox, transport.clone()).poll_interval(Duration::from_millis(20));
    let mut host = host
        .consume(
            transport.clone(),
            queues.replies.clone(),
            "checkout",
            Worker::new(consumer::reply_handler(Arc::clone(&orchestrator))).concurrency(16),
        )
        .task("relay", move |shutdown| relay.run(shutdown.wait()))
        .task(
            "timers",
            consumer::timer_task(orchestrator, Duration::from_millis(100), 100),
        );
    if participants {
        host = participants_on(host, transport, queues, world);
    }
    host
}

pub fn participants_on(
    host: Host,
    transport: &RabbitTransport,
    queues: &Queues,
    world: &World,
) -> Host {
    let dedup = || IdempotencyLayer::new(surety_idempotency::MemoryDedupStore::new());
    let w = world.clone();
    let payments = participant("/payments", move |incoming: Incoming| {
        let w = w.clone();
        async move {
            let (order, scenario) = scenario(&incoming)?;
            match incoming.envelope.event_type.as_str() {
                "payment.charge" if scenario == "declined" => Ok(Answer::declined(
                    "payment.declined",
                    serde_json::json!({"reason": "card declined"}),
                )),
                "payment.charge" => {
                    w.apply("payment.charge", &order);
                    Ok(Answer::done(
                        "payment.charged",
                        serde_json::json!({"charge": order}),
                    ))
                }
                "payment.refund" => {
                    if scenario == "refund-fails" && w.refunds_broken.load(Ordering::SeqCst) {
                        return Err(Permanent::new("the payment provider refuses refunds"));
                    }
                    w.apply("payment.refund", &order);
                    Ok(Answer::done("payment.refunded", serde_json::Value::Null))
                }
                other => Err(Permanent::new(format!("payments cannot {other}"))),
            }
        }
    });
    let w = world.clone();
    let inventory = participant("/inventory", move |incoming: Incoming| {
        let w = w.clone();
        async move {
            let (order, scenario) = scenario(&incoming)?;
            match incoming.envelope.event_type.as_str() {
                "inventory.reserve" if scenario == "out-of-stock" || scenario == "refund-fails" => {
                    Ok(Answer::declined(
                        "inventory.out-of-stock",
                        serde_json::Value::Null,
                    ))
                }
                "inventory.reserve" => {
                    w.apply("inventory.reserve", &order);
                    Ok(Answer::done("inventory.reserved", serde_json::Value::Null))
                }
                "inventory.release" => {
                    w.apply("inventory.release", &order);
                    Ok(Answer::done("inventory.released", serde_json::Value::Null))
                }
                other => Err(Permanent::new(format!("inventory cannot {other}"))),
            }
        }
    });
    // Shipping never answers a booking in the `ship-timeout` scenario.
    let w = world.clone();
    let shipping = handler_fn(move |incoming: Incoming| {
        let w = w.clone();
        async move {
            let (order, scenario) = scenario(&incoming).map_err(HandlerError::new)?;
            let request = &incoming.envelope;
            let answer = match request.event_type.as_str() {
                "shipping.book" if scenario == "ship-timeout" => return Ok(Response::handled()),
                "shipping.book" => {
                    w.apply("shipping.book", &order);
                    "shipping.booked"
                }
                // Nothing was booked: cancelling is a no-op.
                "shipping.cancel" => "shipping.cancelled",
                other => {
                    return Err(HandlerError::permanent(format!("shipping cannot {other}")));
                }
            };
            let output = reply(request, "/shipping", answer, &serde_json::Value::Null)?;
            Ok::<_, HandlerError>(Response::handled().emit(output))
        }
    });
    host.consume(
        transport.clone(),
        queues.payments.clone(),
        "payments",
        Worker::new(ServiceBuilder::new().layer(dedup()).service(payments))
            .concurrency(8)
            .emit_to(transport.clone()),
    )
    .consume(
        transport.clone(),
        queues.inventory.clone(),
        "inventory",
        Worker::new(ServiceBuilder::new().layer(dedup()).service(inventory))
            .concurrency(8)
            .emit_to(transport.clone()),
    )
    .consume(
        transport.clone(),
        queues.shipping.clone(),
        "shipping",
        Worker::new(ServiceBuilder::new().layer(dedup()).service(shipping))
            .concurrency(8)
            .emit_to(transport.clone()),
    )
}

/// A running host and the way to stop it.
pub struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<HostReport>,
}

impl Running {
    pub fn start(host: Host) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(host.grace(Duration::from_secs(5)).run(async {
            stopped.await.ok();
        }));
        Self { stop, handle }
    }

    pub async fn stop(self) -> HostReport {
        self.stop.send(()).ok();
        self.handle.await.expect("the host does not panic")
    }
}

/// Whether `state` is where the instance rests: finished, or waiting for an
/// operator.
pub fn at_rest(saga: &Steps, state: &StepState) -> bool {
    saga.is_finished(state)
        || matches!(
            state.status,
            surety_saga::steps::Status::CompensationFailed { .. }
        )
}

/// Every timer of instance `id` fired once: no two history rows record the
/// firing of the same timer (its name and the due time it was set to).
/// Returns how many timers fired.
pub async fn timers_fired_once<St: SagaStore>(store: &St, id: &str) -> usize {
    let history = store.history("checkout", id).await.expect("history loads");
    let mut fired = std::collections::BTreeSet::new();
    for row in &history {
        let Some(due) = row.timer_due else { continue };
        let name = row
            .input
            .as_ref()
            .and_then(|input| input["Timeout"]["name"].as_str())
            .unwrap_or_else(|| {
                panic!(
                    "{id}: version {} has a timer due but no timeout",
                    row.version
                )
            })
            .to_owned();
        assert!(
            fired.insert((name.clone(), due)),
            "{id}: timer {name} due {due} fired twice (again at version {})",
            row.version
        );
    }
    fired.len()
}

/// The three participants on their own connection (named `name`), running
/// and ready: they live through whatever the test does to the orchestrator.
pub async fn running_participants(
    url: &str,
    name: &str,
    queues: &Queues,
    world: &World,
) -> Running {
    let transport = rabbit(url, name).await;
    let participants = participants_on(Host::new(), &transport, queues, world);
    let health = participants.health();
    let running = Running::start(participants);
    surety_testkit::wait::eventually(
        Duration::from_secs(30),
        "the participants are ready",
        || async { health.is_ready() },
    )
    .await;
    running
}
