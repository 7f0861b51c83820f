//! The publisher: confirm mode, mandatory publishes, a window of confirms in
//! flight and the reconciliation of returned messages.
//!
//! # Why a confirm driver
//!
//! lapin hands a returned (unroutable) message to whichever confirm the
//! broker's next `basic.ack` resolves. When the broker acknowledges several
//! publishes with one `multiple` ack, that may be another publish of the
//! batch than the one that came back. So every publish of a channel is
//! handed to one driver task which, when confirms resolve, collects the
//! whole batch, reads the identity (routing key and `ce_id`) of every
//! returned message in it, and only then decides which publishes were
//! unroutable. It waits for the batch to be complete by taking lapin's
//! acknowledgement lock (through `wait_for_confirms`, polled once), which
//! lapin holds while it resolves an ack frame. As lapin can still split one
//! ack frame over two batches, an acked publish without a return is answered
//! only after the next batch (or at once when nothing else is in flight).
//!
//! A return can also reach the driver before its own publish does: the
//! broker returns the message, lapin attaches the return to the confirm of
//! an earlier publish, and only then does `send` register the publish with
//! the driver. Returns therefore wait in [`Returns`] until their publish is
//! settled, even when nothing is in flight at the time; one that matches no
//! publish (its publish was abandoned with a lost connection) is dropped
//! after [`STRAY_RETURN_TTL`].

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{Channel, PublisherConfirm};
use surety_core::transport::require_name;
use surety_core::{
    Confirmation, Envelope, Publisher, Receipt, Result, TransportError, TransportErrorKind,
};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio::time::Instant;

use crate::codec;
use crate::config::deadline_after;
use crate::error::from_lapin;
use crate::metrics::{PublishOutcome, RabbitMetrics};
use crate::transport::{RabbitTransport, WaitError, wait_for_recovery};

/// Bound on the rounds a driver spends completing one batch.
const MAX_BATCH_ROUNDS: usize = 64;

type Identity = (String, String);

/// How long a return that matches no settled publish is kept.
const STRAY_RETURN_TTL: Duration = Duration::from_secs(300);

/// Returned messages not yet matched to their publish, by identity.
#[derive(Default)]
struct Returns(HashMap<Identity, (usize, Instant)>);

impl Returns {
    fn add(&mut self, identity: Identity) {
        let entry = self.0.entry(identity).or_insert((0, Instant::now()));
        entry.0 += 1;
        entry.1 = Instant::now();
    }

    fn contains(&self, identity: &Identity) -> bool {
        self.0.contains_key(identity)
    }

    /// Consumes one return of `identity`, if there is one.
    fn take(&mut self, identity: &Identity) -> bool {
        let Some(entry) = self.0.get_mut(identity) else {
            return false;
        };
        entry.0 -= 1;
        if entry.0 == 0 {
            self.0.remove(identity);
        }
        true
    }

    /// Drops returns that waited longer than [`STRAY_RETURN_TTL`].
    fn prune(&mut self) {
        self.0.retain(|_, (_, at)| at.elapsed() < STRAY_RETURN_TTL);
    }
}

/// What the driver needs to finish one publish.
struct Pending {
    topic: String,
    identity: Identity,
    reply: oneshot::Sender<Result<Receipt>>,
    _permit: OwnedSemaphorePermit,
}

struct Registration {
    pending: Pending,
    confirm: PublisherConfirm,
}

/// The publisher channel and its confirm driver.
pub(crate) struct PublisherState {
    channel: Channel,
    /// The generation of the connection the channel belongs to.
    generation: u64,
    driver: mpsc::UnboundedSender<Registration>,
    /// Dropped with the state: tells the driver to fail what is still in
    /// flight (the connection was replaced, its confirms will never come).
    _abandon: oneshot::Sender<()>,
    metrics: RabbitMetrics,
    /// The topics published to through this channel, whose publish series
    /// exist (see [`RabbitMetrics::publishing_to`]).
    topics: HashSet<String>,
}

impl fmt::Debug for PublisherState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublisherState")
            .field("channel", &self.channel.id())
            .finish_non_exhaustive()
    }
}

impl PublisherState {
    pub(crate) fn new(channel: Channel, generation: u64, metrics: RabbitMetrics) -> Self {
        let (driver, rx) = mpsc::unbounded_channel();
        let (abandon, abandoned) = oneshot::channel();
        tokio::spawn(drive(channel.clone(), rx, abandoned, metrics.clone()));
        Self {
            channel,
            generation,
            driver,
            _abandon: abandon,
            metrics,
            topics: HashSet::new(),
        }
    }

    /// Whether the channel is usable now or will be after a recovery.
    fn alive(&self) -> bool {
        let status = self.channel.status();
        status.connected() || status.reconnecting() || status.initializing()
    }
}

fn pending_error(kind: TransportErrorKind, message: impl Into<String>) -> TransportError {
    TransportError::new(kind, message)
}

impl RabbitTransport {
    /// Replaces a channel that was closed for good (the broker closed it,
    /// or recovery gave up on it) while the connection lives.
    async fn reopen_publisher(
        &self,
        state: &mut PublisherState,
        connection: &lapin::Connection,
        generation: u64,
    ) -> Result<()> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|err| from_lapin("reopening the publisher channel", err))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|err| from_lapin("enabling publisher confirms", err))?;
        *state = PublisherState::new(channel, generation, state.metrics.clone());
        Ok(())
    }

    fn failed(&self, topic: &str, err: TransportError) -> TransportError {
        self.inner
            .config
            .metrics
            .published(topic, PublishOutcome::Failed);
        err
    }
}

impl Publisher for RabbitTransport {
    /// Publishes `envelope` with routing key `topic` on the exchange
    /// (mandatory, persistent) once it is handed to the connection, and
    /// returns its pending confirm.
    ///
    /// While the connection is being recovered (or the broker blocks
    /// publishing) `send` waits, up to [`RabbitConfig::outage_wait`](crate::RabbitConfig::outage_wait),
    /// then fails with `Connection` (or `Timeout` if the message was queued
    /// but not yet written: it may still go out). The confirmation resolves
    /// with the receipt on a broker ack, `Unroutable` when no queue is bound
    /// for the topic, `Nacked` on a negative confirm, `Timeout` after
    /// [`RabbitConfig::confirm_timeout`](crate::RabbitConfig::confirm_timeout),
    /// and `Connection` when the connection was lost first. It never
    /// resolves `Ok` for a message the broker did not confirm.
    async fn send(&self, topic: &str, envelope: Envelope) -> Result<Confirmation> {
        self.ensure_open()?;
        let message = Outgoing::encode(topic, envelope)?;
        let config = &self.inner.config;
        let deadline = deadline_after(config.outage_wait);
        // One publisher at a time, so that sends keep their order.
        let Ok(mut state) = tokio::time::timeout_at(deadline, self.inner.publisher.lock()).await
        else {
            return Err(self.failed(
                topic,
                pending_error(
                    TransportErrorKind::Connection,
                    format!(
                        "earlier publishes waited {:?} for the connection",
                        config.outage_wait
                    ),
                ),
            ));
        };
        if !state.topics.contains(topic) {
            config.metrics.publishing_to(topic);
            state.topics.insert(topic.to_owned());
        }
        let mut attempt = Attempt {
            generations: self.inner.generation.subscribe(),
            reopened: false,
            permit: None,
            deadline,
        };
        loop {
            self.ensure_open()?;
            let Some(connection) = self.usable_channel(&mut state, &mut attempt, topic).await?
            else {
                continue;
            };
            if !self.reserve_room(&state, &mut attempt, topic).await? {
                continue;
            }
            let err = match self.write(&state, &mut attempt, &message).await? {
                Written::Confirm(confirm) => {
                    return self.register(state, &mut attempt, message, confirm);
                }
                Written::Replaced => continue,
                Written::Failed(err) => err,
            };
            self.ensure_open()?;
            self.recover(&state.channel, &connection, &mut attempt, topic, err)
                .await?;
        }
    }
}

/// A message ready for the wire.
struct Outgoing {
    routing_key: ShortString,
    properties: lapin::BasicProperties,
    payload: bytes::Bytes,
    /// The topic and the envelope's id.
    identity: Identity,
}

impl Outgoing {
    /// Checks the topic and encodes the envelope.
    fn encode(topic: &str, envelope: Envelope) -> Result<Self> {
        require_name("topic", topic)?;
        let routing_key = ShortString::try_new(topic).map_err(|_| {
            pending_error(
                TransportErrorKind::Config,
                "topic name is longer than the 255 bytes of an AMQP routing key",
            )
        })?;
        let (properties, payload) = codec::encode(&envelope)?;
        Ok(Self {
            routing_key,
            properties,
            payload,
            identity: (topic.to_owned(), envelope.id),
        })
    }
}

/// What one `send` carries from round to round while the connection comes
/// and goes.
struct Attempt {
    generations: tokio::sync::watch::Receiver<u64>,
    /// Whether this send replaced a closed channel already (it does so
    /// once).
    reopened: bool,
    /// Room in the window, taken once and kept across rounds.
    permit: Option<OwnedSemaphorePermit>,
    deadline: Instant,
}

/// How writing a message to the channel ended.
enum Written {
    Confirm(PublisherConfirm),
    /// The connection was replaced while the write waited: write again.
    Replaced,
    Failed(lapin::Error),
}

impl RabbitTransport {
    /// The current connection once the publisher's channel is on it and
    /// usable: reopens a channel the broker closed (once per send), or waits
    /// for a recovering connection. `None`: something changed, look again.
    async fn usable_channel(
        &self,
        state: &mut PublisherState,
        attempt: &mut Attempt,
        topic: &str,
    ) -> Result<Option<Arc<lapin::Connection>>> {
        let (connection, generation) = self.current();
        if state.generation == generation && state.alive() {
            return Ok(Some(connection));
        }
        if connection.status().connected() {
            if attempt.reopened {
                return Err(self.failed(
                    topic,
                    pending_error(
                        TransportErrorKind::Connection,
                        "the broker closed the publisher channel again",
                    ),
                ));
            }
            if let Err(err) = self.reopen_publisher(state, &connection, generation).await {
                return Err(self.failed(topic, err));
            }
            attempt.reopened = true;
            return Ok(Some(connection));
        }
        // Recovering (by lapin, or by the supervisor replacing the
        // connection): wait for either.
        let generations = &mut attempt.generations;
        let waited = tokio::time::timeout_at(attempt.deadline, async {
            while !connection.status().connected() {
                tokio::select! {
                    () = tokio::time::sleep(crate::transport::RECOVERY_POLL) => {}
                    _ = generations.wait_for(|g| *g != generation) => break,
                }
            }
        })
        .await;
        if waited.is_err() {
            return Err(self.failed(topic, outage(self.inner.config.outage_wait)));
        }
        Ok(None)
    }

    /// Takes room in the window if this send has none yet. Taken under the
    /// lock (so that sends keep their order) and after the state is fresh:
    /// a replaced connection's confirms free their room only when the
    /// publisher moves to the new one. `false`: the connection was replaced
    /// meanwhile, look again.
    async fn reserve_room(
        &self,
        state: &PublisherState,
        attempt: &mut Attempt,
        topic: &str,
    ) -> Result<bool> {
        if attempt.permit.is_some() {
            return Ok(true);
        }
        let config = &self.inner.config;
        let mine = state.generation;
        let acquire = self.inner.window.clone().acquire_owned();
        tokio::select! {
            acquired = tokio::time::timeout_at(attempt.deadline, acquire) => match acquired {
                Ok(Ok(acquired)) => {
                    attempt.permit = Some(acquired);
                    Ok(true)
                }
                Ok(Err(_)) => Err(TransportError::closed("the RabbitMQ transport is closed")),
                Err(_) => Err(self.failed(
                    topic,
                    pending_error(
                        TransportErrorKind::Timeout,
                        format!(
                            "{} publishes stayed unconfirmed for {:?}",
                            config.max_in_flight, config.outage_wait
                        ),
                    ),
                )),
            },
            _ = attempt.generations.wait_for(|g| *g != mine) => Ok(false),
        }
    }

    /// Writes `message` on the publisher's channel (mandatory, persistent).
    async fn write(
        &self,
        state: &PublisherState,
        attempt: &mut Attempt,
        message: &Outgoing,
    ) -> Result<Written> {
        let publish = state.channel.basic_publish(
            self.inner.exchange.clone(),
            message.routing_key.clone(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            &message.payload,
            message.properties.clone(),
        );
        let mine = state.generation;
        tokio::select! {
            written = tokio::time::timeout_at(attempt.deadline, publish) => match written {
                Ok(Ok(confirm)) => Ok(Written::Confirm(confirm)),
                Ok(Err(err)) => Ok(Written::Failed(err)),
                Err(_) => Err(self.failed(
                    &message.identity.0,
                    pending_error(
                        TransportErrorKind::Timeout,
                        format!(
                            "the message was not written within {:?} (connection blocked or \
                             recovering); it may still be published",
                            self.inner.config.outage_wait
                        ),
                    ),
                )),
            },
            // The connection was replaced while this publish waited on the
            // old one (whose IO had stalled): publish it again on the new
            // one. At worst the broker gets it twice.
            _ = attempt.generations.wait_for(|g| *g != mine) => Ok(Written::Replaced),
        }
    }

    /// Hands a written message's confirm to the driver and lets go of the
    /// publisher.
    fn register(
        &self,
        state: tokio::sync::MutexGuard<'_, PublisherState>,
        attempt: &mut Attempt,
        message: Outgoing,
        confirm: PublisherConfirm,
    ) -> Result<Confirmation> {
        let Some(permit) = attempt.permit.take() else {
            return Err(pending_error(
                TransportErrorKind::Other,
                "published without room in the window",
            ));
        };
        let (reply, replied) = oneshot::channel();
        let topic = message.identity.0.clone();
        let registration = Registration {
            pending: Pending {
                topic: topic.clone(),
                identity: message.identity,
                reply,
                _permit: permit,
            },
            confirm,
        };
        if state.driver.send(registration).is_err() {
            return Err(self.failed(
                &topic,
                pending_error(
                    TransportErrorKind::Connection,
                    "the publisher's confirm driver stopped",
                ),
            ));
        }
        self.inner.config.metrics.in_flight_add(1);
        drop(state);
        Ok(self.confirmation(&topic, replied))
    }

    /// Waits until a write that failed with `err` can be tried again on a
    /// recovered or replaced connection; fails when the connection does not
    /// come back in time, or the channel is gone for good after this send
    /// reopened it already.
    async fn recover(
        &self,
        channel: &Channel,
        connection: &lapin::Connection,
        attempt: &mut Attempt,
        topic: &str,
        err: lapin::Error,
    ) -> Result<()> {
        let channel = channel.clone();
        let waited = wait_for_recovery(
            connection,
            &channel,
            err,
            Some(attempt.deadline),
            &mut attempt.generations,
        )
        .await;
        match waited {
            // Recovered or replaced: the next round publishes again.
            Ok(()) => Ok(()),
            Err(WaitError::TimedOut) => {
                Err(self.failed(topic, outage(self.inner.config.outage_wait)))
            }
            Err(WaitError::Gone(err)) if attempt.reopened => {
                Err(self.failed(topic, from_lapin("publishing", err)))
            }
            // The channel is gone: the next round reopens it, or waits for
            // the connection.
            Err(WaitError::Gone(_)) => Ok(()),
        }
    }
}

fn outage(wait: std::time::Duration) -> TransportError {
    TransportError::new(
        TransportErrorKind::Connection,
        format!("the RabbitMQ connection did not come back within {wait:?}"),
    )
}

impl RabbitTransport {
    fn confirmation(
        &self,
        topic: &str,
        replied: oneshot::Receiver<Result<Receipt>>,
    ) -> Confirmation {
        let metrics = self.inner.config.metrics.clone();
        let timeout = self.inner.config.confirm_timeout;
        let topic = topic.to_owned();
        Confirmation::new(async move {
            match tokio::time::timeout(timeout, replied).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => {
                    metrics.published(&topic, PublishOutcome::Failed);
                    Err(pending_error(
                        TransportErrorKind::Connection,
                        "the publisher stopped before the broker confirmed",
                    ))
                }
                Err(_) => {
                    metrics.published(&topic, PublishOutcome::TimedOut);
                    Err(pending_error(
                        TransportErrorKind::Timeout,
                        format!(
                            "no publisher confirm within {timeout:?}; the message may or may not \
                             have been stored"
                        ),
                    ))
                }
            }
        })
    }
}

type Resolved = (Pending, lapin::Result<lapin::Confirmation>);

/// Resolves the publishes of one channel in batches; see the module docs.
/// When `abandoned` fires (the publisher moved to a new connection), fails
/// what is still in flight and stops.
async fn drive(
    channel: Channel,
    mut registrations: mpsc::UnboundedReceiver<Registration>,
    mut abandoned: oneshot::Receiver<()>,
    metrics: RabbitMetrics,
) {
    let mut in_flight: FuturesUnordered<BoxFuture<'static, (u64, Confirmed)>> =
        FuturesUnordered::new();
    let mut waiting: HashMap<u64, Pending> = HashMap::new();
    let mut next_key = 0u64;
    let mut returned = Returns::default();
    // Acked publishes whose return, if any, may still come with the next
    // batch: lapin can split one ack frame over two batches.
    let mut held: Vec<Pending> = Vec::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        tokio::select! {
            _ = &mut abandoned, if !waiting.is_empty() || open => {
                // Acked before the loss: answer them as the broker did.
                for pending in held.drain(..) {
                    settle(pending, Ok(()), &mut returned, &metrics);
                }
                // Drain what arrived, then fail everything still waiting.
                while let Ok(Registration { pending, .. }) = registrations.try_recv() {
                    waiting.insert(u64::MAX - waiting.len() as u64, pending);
                }
                for (_, pending) in waiting.drain() {
                    metrics.in_flight_add(-1);
                    if !pending.reply.is_closed() {
                        metrics.published(&pending.topic, PublishOutcome::Failed);
                    }
                    let _ = pending.reply.send(Err(pending_error(
                        TransportErrorKind::Connection,
                        "the connection was lost before the broker confirmed",
                    )));
                }
                return;
            }
            registration = registrations.recv(), if open => match registration {
                Some(Registration { pending, confirm }) => {
                    let key = next_key;
                    next_key += 1;
                    waiting.insert(key, pending);
                    in_flight.push(Box::pin(async move { (key, confirm.await) }));
                }
                None => open = false,
            },
            Some(first) = in_flight.next(), if !in_flight.is_empty() => {
                let mut batch = vec![first];
                for _ in 0..MAX_BATCH_ROUNDS {
                    // Wait for lapin to finish the ack frame it is resolving.
                    let _ = channel.wait_for_confirms().now_or_never();
                    let before = batch.len();
                    while let Some(Some(done)) = in_flight.next().now_or_never() {
                        batch.push(done);
                    }
                    if batch.len() == before {
                        break;
                    }
                }
                let batch = batch
                    .into_iter()
                    .filter_map(|(key, result)| Some((waiting.remove(&key)?, result)))
                    .collect();
                let last = in_flight.is_empty();
                held = finish_batch(batch, std::mem::take(&mut held), last, &mut returned, &metrics);
                if last {
                    returned.prune();
                }
            }
        }
    }
}

type Confirmed = lapin::Result<lapin::Confirmation>;

/// Settles a batch. Returns are matched first against the publishes held
/// from the previous batch, then against this batch; acked publishes of this
/// batch without a return are held for one more batch (or settled at once
/// when `last`), since lapin may attach their return to a later confirm.
fn finish_batch(
    batch: Vec<Resolved>,
    previous: Vec<Pending>,
    last: bool,
    returned: &mut Returns,
    metrics: &RabbitMetrics,
) -> Vec<Pending> {
    let mut outcomes = Vec::with_capacity(batch.len());
    for (pending, result) in batch {
        let outcome = match result {
            Ok(confirmation) => {
                let acked = confirmation.is_ack();
                let nacked = confirmation.is_nack();
                if let Some(message) = confirmation.take_message() {
                    let identity = codec::identity_of(
                        message.delivery.routing_key.as_str(),
                        &message.delivery.properties,
                    );
                    returned.add(identity);
                }
                if acked {
                    Ok(())
                } else if nacked {
                    Err(pending_error(
                        TransportErrorKind::Nacked,
                        "the broker refused the message (negative publisher confirm)",
                    ))
                } else {
                    Err(pending_error(
                        TransportErrorKind::Other,
                        "the broker did not confirm: confirms are not enabled on the channel",
                    ))
                }
            }
            Err(err) => Err(from_lapin(
                "the connection was lost before the broker confirmed",
                err,
            )),
        };
        outcomes.push((pending, outcome));
    }
    for pending in previous {
        settle(pending, Ok(()), returned, metrics);
    }
    let mut held = Vec::new();
    for (pending, outcome) in outcomes {
        let is_returned = returned.contains(&pending.identity);
        if outcome.is_ok() && !is_returned && !last {
            held.push(pending);
        } else {
            settle(pending, outcome, returned, metrics);
        }
    }
    held
}

/// Answers one publish, consuming a matching return if there is one.
fn settle(pending: Pending, outcome: Result<()>, returned: &mut Returns, metrics: &RabbitMetrics) {
    {
        metrics.in_flight_add(-1);
        let result = outcome.and_then(|()| {
            if returned.take(&pending.identity) {
                Err(pending_error(
                    TransportErrorKind::Unroutable,
                    format!(
                        "no queue is bound for topic {:?}: the broker returned the message",
                        pending.topic
                    ),
                ))
            } else {
                Ok(Receipt::new(pending.topic.clone()))
            }
        });
        let label = match &result {
            Ok(_) => PublishOutcome::Confirmed,
            Err(err) => match err.kind() {
                TransportErrorKind::Unroutable => PublishOutcome::Returned,
                TransportErrorKind::Nacked => PublishOutcome::Nacked,
                _ => PublishOutcome::Failed,
            },
        };
        // Counted only when someone still waits: a confirmation that timed
        // out was counted as such. Counted before the reply, so that the
        // count is there when the publisher wakes up.
        if !pending.reply.is_closed() {
            metrics.published(&pending.topic, label);
        }
        let _ = pending.reply.send(result);
    }
}
