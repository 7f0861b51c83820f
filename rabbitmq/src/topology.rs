//! Declaring reliable topology: work queues with a dead-letter queue, quorum
//! queues with a delivery limit, and a ladder of delayed-retry queues built
//! from message TTLs (no broker plugin).
//!
//! ```text
//!                 routing key = topic
//!  exchange ─────────────────────────────► work queue {q} ──reject / delivery limit──► {q}.dlx ──► {q}.dlq
//!     │                                        ▲
//!     │ routing key = {q}.retry.{n}            │ dead-lettered after the level's TTL,
//!     └──────────────► {q}.retry.{n} ──────────┘ through the default exchange to {q}
//! ```
//!
//! Everything is durable and declared idempotently: declare it at start-up,
//! before [`subscribe`](surety_core::Subscriber::subscribe). A queue that
//! already exists is left as it is by `subscribe` (it only binds and consumes
//! it), so the dead-letter arguments declared here stay in force.
//!
//! A retry level is a queue bound to the transport's exchange with its own
//! name as routing key, so a retry layer schedules a delayed redelivery with
//! a plain [`Publisher::publish`](surety_core::Publisher::publish) to
//! [`RetryLadder::topic`]: the message waits out the level's TTL and comes
//! back to the work queue only (not to the other groups of the topic).
//!
//! ```no_run
//! use std::time::Duration;
//! use surety_core::{Envelope, Publisher};
//! use surety_rabbitmq::topology::{RetryLadder, WorkQueue};
//! use surety_rabbitmq::{RabbitConfig, RabbitTransport};
//!
//! # #[tokio::main] async fn main() -> surety_core::Result<()> {
//! let transport = RabbitTransport::connect(RabbitConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f")).await?;
//! let channel = transport.channel().await?;
//! let work = WorkQueue::for_group("surety", "orders", "billing");
//! work.declare(&channel).await?;
//! let ladder = RetryLadder::new(work.name(), "surety", [Duration::from_secs(1), Duration::from_secs(30)]);
//! ladder.declare(&channel).await?;
//!
//! // Later, in a retry layer: try again in about 30 seconds.
//! let env = Envelope::builder("/orders", "order.placed").build();
//! transport.publish(&ladder.topic(2).expect("two levels"), env).await?;
//! # Ok(()) }
//! ```

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};
use surety_core::{Result, TransportError, TransportErrorKind};

use crate::config::QueueType;
use crate::error::from_lapin;
use crate::subscribe::queue_arguments;

fn short(what: &str, name: &str) -> Result<ShortString> {
    ShortString::try_new(name).map_err(|_| {
        TransportError::new(
            TransportErrorKind::Config,
            format!("{what} {name:?} is longer than the 255 bytes AMQP allows"),
        )
    })
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

fn millis(delay: Duration) -> AMQPValue {
    AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX))
}

async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> Result<()> {
    channel
        .queue_declare(short("queue", name)?, durable_queue(), args)
        .await
        .map(drop)
        .map_err(|err| from_lapin(&format!("declaring queue {name:?}"), err))
}

async fn bind_queue(channel: &Channel, queue: &str, exchange: &str, key: &str) -> Result<()> {
    channel
        .queue_bind(
            short("queue", queue)?,
            short("exchange", exchange)?,
            short("routing key", key)?,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|err| from_lapin(&format!("binding queue {queue:?} to {exchange:?}"), err))
}

async fn declare_exchange(channel: &Channel, name: &str, kind: ExchangeKind) -> Result<()> {
    channel
        .exchange_declare(
            short("exchange", name)?,
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|err| from_lapin(&format!("declaring exchange {name:?}"), err))
}

/// A durable work queue, optionally with a dead-letter exchange and queue.
///
/// Messages the consumer rejects (or nacks without requeue), and on quorum
/// queues messages over the delivery limit, go to the direct exchange
/// `{name}.dlx`, which routes them to the durable queue `{name}.dlq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkQueue {
    name: String,
    bindings: Vec<(String, String)>,
    queue_type: QueueType,
    dead_letter: bool,
}

impl WorkQueue {
    /// A classic work queue `name` with a dead-letter queue and no bindings.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            bindings: Vec::new(),
            queue_type: QueueType::Classic,
            dead_letter: true,
        }
    }

    /// The queue [`subscribe`](surety_core::Subscriber::subscribe) consumes
    /// for `group` on `topic` ([`queue_name`](crate::queue_name)), bound to
    /// `exchange` with routing key `topic`.
    pub fn for_group(exchange: &str, topic: &str, group: &str) -> Self {
        Self::new(crate::queue_name(topic, group)).bind(exchange, topic)
    }

    /// Adds a binding to `exchange` with `routing_key`.
    pub fn bind(mut self, exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        self.bindings.push((exchange.into(), routing_key.into()));
        self
    }

    /// Sets the queue type (a quorum queue may carry `x-delivery-limit`).
    pub fn queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// Declares no dead-letter exchange and queue: rejected messages are dropped.
    pub fn without_dead_letter(mut self) -> Self {
        self.dead_letter = false;
        self
    }

    /// The queue name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The dead-letter exchange, `{name}.dlx`.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.name)
    }

    /// The dead-letter queue, `{name}.dlq`.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dlq", self.name)
    }

    /// The arguments the work queue is declared with.
    pub fn arguments(&self) -> FieldTable {
        let mut args = queue_arguments(self.queue_type, false);
        if self.dead_letter {
            args.insert(
                "x-dead-letter-exchange".into(),
                long_string(&self.dead_letter_exchange()),
            );
            args.insert("x-dead-letter-routing-key".into(), long_string(&self.name));
        }
        args
    }

    /// Declares the dead-letter exchange and queue (unless disabled), the
    /// work queue and its bindings. Idempotent; fails with `Config` when the
    /// work queue exists with other arguments.
    pub async fn declare(&self, channel: &Channel) -> Result<()> {
        if self.dead_letter {
            let dlx = self.dead_letter_exchange();
            let dlq = self.dead_letter_queue();
            declare_exchange(channel, &dlx, ExchangeKind::Direct).await?;
            declare_queue(channel, &dlq, FieldTable::default()).await?;
            bind_queue(channel, &dlq, &dlx, &self.name).await?;
        }
        declare_queue(channel, &self.name, self.arguments()).await?;
        for (exchange, key) in &self.bindings {
            bind_queue(channel, &self.name, exchange, key).await?;
        }
        Ok(())
    }
}

/// Delayed redelivery without plugins: one durable queue per delay,
/// `{queue}.retry.{level}` (levels count from 1), with `x-message-ttl` set
/// to the delay and the default exchange as dead-letter exchange, routing
/// back to `queue`. Each level is bound to `exchange` with its own name as
/// routing key.
///
/// A TTL queue expires messages from its head only, so every message of a
/// level waits the same delay: give each delay its own level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryLadder {
    queue: String,
    exchange: String,
    delays: Vec<Duration>,
}

impl RetryLadder {
    /// A ladder for the work queue `queue` on `exchange` with one level per
    /// delay, in order.
    pub fn new(
        queue: impl Into<String>,
        exchange: impl Into<String>,
        delays: impl IntoIterator<Item = Duration>,
    ) -> Self {
        Self {
            queue: queue.into(),
            exchange: exchange.into(),
            delays: delays.into_iter().collect(),
        }
    }

    /// The number of levels.
    pub fn levels(&self) -> usize {
        self.delays.len()
    }

    /// The delay of `level` (from 1).
    pub fn delay(&self, level: usize) -> Option<Duration> {
        self.delays.get(level.checked_sub(1)?).copied()
    }

    /// The queue of `level` (from 1), `{queue}.retry.{level}`.
    pub fn level_queue(&self, level: usize) -> Option<String> {
        self.delay(level)?;
        Some(format!("{}.retry.{level}", self.queue))
    }

    /// The topic to publish to for a redelivery after `level`'s delay (the
    /// level's queue name, bound on the exchange).
    pub fn topic(&self, level: usize) -> Option<String> {
        self.level_queue(level)
    }

    /// The level for a message that failed its `attempt`-th delivery:
    /// attempt 1 waits at level 1, later attempts climb the ladder and stay
    /// on the last level. `None` for a ladder without levels.
    pub fn level_for_attempt(&self, attempt: u32) -> Option<usize> {
        if self.delays.is_empty() {
            return None;
        }
        let attempt = usize::try_from(attempt.max(1)).unwrap_or(usize::MAX);
        Some(attempt.min(self.delays.len()))
    }

    /// Declares every level and binds it to the exchange. Idempotent.
    pub async fn declare(&self, channel: &Channel) -> Result<()> {
        for (index, delay) in self.delays.iter().enumerate() {
            let level = format!("{}.retry.{}", self.queue, index + 1);
            let mut args = FieldTable::default();
            args.insert("x-message-ttl".into(), millis(*delay));
            args.insert("x-dead-letter-exchange".into(), long_string(""));
            args.insert("x-dead-letter-routing-key".into(), long_string(&self.queue));
            declare_queue(channel, &level, args).await?;
            bind_queue(channel, &level, &self.exchange, &level).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_queue() {
        let work = WorkQueue::for_group("surety", "orders", "billing");
        assert_eq!(work.name(), "orders.billing");
        assert_eq!(work.dead_letter_exchange(), "orders.billing.dlx");
        assert_eq!(work.dead_letter_queue(), "orders.billing.dlq");
        let args = work.arguments();
        assert!(args.contains_key("x-dead-letter-exchange"));
        assert!(
            !WorkQueue::new("q")
                .without_dead_letter()
                .arguments()
                .contains_key("x-dead-letter-exchange")
        );
    }

    #[test]
    fn quorum_queues_carry_the_delivery_limit() {
        let args = WorkQueue::new("q")
            .queue_type(QueueType::Quorum {
                delivery_limit: Some(3),
            })
            .arguments();
        assert_eq!(
            args.inner().get("x-queue-type"),
            Some(&AMQPValue::LongString("quorum".into()))
        );
        assert_eq!(
            args.inner().get("x-delivery-limit"),
            Some(&AMQPValue::LongLongInt(3))
        );
    }

    #[test]
    fn the_ladder_climbs_and_stays_on_the_last_level() {
        let ladder = RetryLadder::new(
            "q",
            "surety",
            [Duration::from_secs(1), Duration::from_secs(10)],
        );
        assert_eq!(ladder.level_queue(1).as_deref(), Some("q.retry.1"));
        assert_eq!(ladder.level_queue(3), None);
        assert_eq!(ladder.level_queue(0), None);
        assert_eq!(ladder.level_for_attempt(0), Some(1));
        assert_eq!(ladder.level_for_attempt(2), Some(2));
        assert_eq!(ladder.level_for_attempt(9), Some(2));
        assert_eq!(ladder.delay(2), Some(Duration::from_secs(10)));
        assert_eq!(RetryLadder::new("q", "x", []).level_for_attempt(1), None);
    }
}
