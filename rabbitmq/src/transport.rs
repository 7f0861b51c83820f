//! [`RabbitTransport`]: the connection, its recovery and [`Close`].

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicCancelOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties, Event, ExchangeKind};
use surety_core::retry::Backoff;
use surety_core::{Close, Result, TransportError, TransportErrorKind};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::config::{RabbitConfig, deadline_after};
use crate::error::from_lapin;
use crate::publish::PublisherState;
use crate::subscribe::SubscriptionShared;

/// How long `close` waits for each consumer cancellation and for the
/// connection to close.
const CLOSE_STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a waiter re-checks a recovering connection whose error carried
/// no recovery notifier.
pub(crate) const RECOVERY_POLL: Duration = Duration::from_millis(50);

/// A RabbitMQ transport: one AMQP connection implementing core's
/// [`Publisher`](surety_core::Publisher), [`Subscriber`](surety_core::Subscriber)
/// and [`Close`]. Cheap to clone; clones share the connection.
///
/// Topics are routing keys on one durable topic exchange
/// ([`RabbitConfig::exchange`]); a consumer group is a durable queue named
/// `{topic}.{group}` (see [`queue_name`](crate::queue_name)) bound to its
/// topic. Publishes are mandatory and confirmed; deliveries are
/// acknowledged manually.
///
/// The connection recovers by itself (lapin's automatic recovery): channels,
/// the exchange, queues, bindings, prefetch and consumers are restored,
/// publishes wait up to [`RabbitConfig::outage_wait`] for it and
/// subscriptions resume. When lapin's recovery stalls, the transport opens
/// a new connection after [`RabbitConfig::recovery_stall_timeout`].
///
/// ```no_run
/// use futures::StreamExt;
/// use surety_core::{Close, Envelope, Publisher, Subscriber};
/// use surety_rabbitmq::{RabbitConfig, RabbitTransport};
///
/// # #[tokio::main] async fn main() -> surety_core::Result<()> {
/// let transport = RabbitTransport::connect(RabbitConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f")).await?;
/// let mut deliveries = transport.subscribe("orders", "billing").await?;
/// transport.publish("orders", Envelope::builder("/shop", "order.placed").build()).await?;
/// let delivery = deliveries.next().await.expect("delivered")?;
/// delivery.ack().await?;
/// transport.close().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RabbitTransport {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: RabbitConfig,
    uri: AMQPUri,
    properties: ConnectionProperties,
    /// The current connection; replaced when lapin's recovery stalls.
    connection: RwLock<Arc<Connection>>,
    /// Bumped each time the connection is replaced.
    pub(crate) generation: watch::Sender<u64>,
    pub(crate) closed: watch::Sender<bool>,
    pub(crate) publisher: tokio::sync::Mutex<PublisherState>,
    pub(crate) window: Arc<Semaphore>,
    pub(crate) subscriptions: Mutex<Vec<Weak<SubscriptionShared>>>,
    pub(crate) exchange: ShortString,
}

impl fmt::Debug for RabbitTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitTransport")
            .field("exchange", &self.inner.config.exchange)
            .field("connection", self.connection().status())
            .field("generation", &*self.inner.generation.borrow())
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

fn config_error(message: impl Into<String>) -> TransportError {
    TransportError::new(TransportErrorKind::Config, message)
}

/// `host:port` of the URL: what error messages name (never the password).
fn redacted(uri: &AMQPUri) -> String {
    format!("{}:{}", uri.authority.host.as_str(), uri.authority.port)
}

impl RabbitTransport {
    /// Connects to the broker, declares the exchange and opens the
    /// publisher channel (in confirm mode).
    ///
    /// Fails with [`Config`](TransportErrorKind::Config) for a URL that does
    /// not parse, a refused login or an exchange that exists with another
    /// type, and with [`Connection`](TransportErrorKind::Connection) when the
    /// broker cannot be reached within [`RabbitConfig::connect_timeout`].
    pub async fn connect(config: RabbitConfig) -> Result<Self> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(config_error(
                "RabbitTransport::connect must be called within a Tokio runtime",
            ));
        }
        let mut uri: AMQPUri = config
            .url
            .parse()
            .map_err(|err: String| config_error(format!("invalid AMQP URL: {err}")))?;
        if uri.query.heartbeat.is_none() {
            let seconds = config.heartbeat.as_secs().clamp(1, u64::from(u16::MAX));
            uri.query.heartbeat = u16::try_from(seconds).ok();
        }
        let exchange = ShortString::try_new(config.exchange.clone())
            .map_err(|_| config_error("the exchange name is longer than 255 bytes"))?;
        if config.exchange.is_empty() {
            return Err(config_error(
                "the exchange name must not be empty (the default exchange cannot be bound)",
            ));
        }
        let mut properties = ConnectionProperties::default()
            .enable_auto_recover()
            .configure_backoff({
                let max_delay = config.reconnect_max_delay.max(Duration::from_millis(100));
                let attempts = config.reconnect_attempts;
                move |backoff| {
                    backoff
                        .with_min_delay(Duration::from_millis(100))
                        .with_max_delay(max_delay)
                        .with_max_times(attempts)
                }
            });
        if let Some(name) = &config.connection_name {
            properties = properties.with_connection_name(name.clone().into());
        }
        let (connection, channel) =
            open_connection(&uri, &properties, &exchange, config.connect_timeout).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|err| from_lapin("enabling publisher confirms", err))?;

        let (closed, _) = watch::channel(false);
        let (generation, _) = watch::channel(0);
        let window = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
        let publisher = PublisherState::new(channel, 0, config.metrics.clone());
        let inner = Arc::new(Inner {
            config,
            uri,
            properties,
            connection: RwLock::new(Arc::new(connection)),
            generation,
            closed,
            publisher: tokio::sync::Mutex::new(publisher),
            window,
            subscriptions: Mutex::new(Vec::new()),
            exchange,
        });
        let transport = Self { inner };
        transport.watch_events(0);
        tokio::spawn(supervise(Arc::downgrade(&transport.inner)));
        Ok(transport)
    }

    /// The configuration the transport was connected with.
    pub fn config(&self) -> &RabbitConfig {
        &self.inner.config
    }

    /// The underlying lapin connection, for what the ports do not cover.
    ///
    /// This is the current connection: when lapin's own recovery stalls the
    /// transport replaces it (see [`RabbitConfig::recovery_stall_timeout`]),
    /// so do not hold on to it.
    pub fn connection(&self) -> Arc<Connection> {
        self.inner
            .connection
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The current connection and its generation.
    pub(crate) fn current(&self) -> (Arc<Connection>, u64) {
        let connection = self.connection();
        (connection, *self.inner.generation.borrow())
    }

    /// Follows the events of the connection of `generation`.
    fn watch_events(&self, generation: u64) {
        tokio::spawn(watch_events(
            self.connection().events_listener(),
            self.inner.closed.subscribe(),
            self.inner.generation.subscribe(),
            generation,
            self.inner.config.metrics.clone(),
        ));
    }

    /// Opens a new channel on the connection, e.g. to declare topology with
    /// the [`topology`](crate::topology) helpers. Channels opened here are
    /// recovered with the connection, with the topology declared on them.
    pub async fn channel(&self) -> Result<Channel> {
        self.ensure_open()?;
        self.connection()
            .create_channel()
            .await
            .map_err(|err| from_lapin("opening a channel", err))
    }

    /// Whether [`close`](Close::close) was called.
    pub fn is_closed(&self) -> bool {
        *self.inner.closed.borrow()
    }

    pub(crate) fn ensure_open(&self) -> Result<()> {
        if self.is_closed() {
            Err(TransportError::closed("the RabbitMQ transport is closed"))
        } else {
            Ok(())
        }
    }

    pub(crate) fn subscriptions(&self) -> MutexGuard<'_, Vec<Weak<SubscriptionShared>>> {
        self.inner
            .subscriptions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

async fn declare_exchange(channel: &Channel, exchange: ShortString) -> Result<()> {
    channel
        .exchange_declare(
            exchange,
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|err| from_lapin("declaring the exchange", err))
}

/// Follows one connection's events: recoveries and flow control. Ends
/// when the transport closes or the connection is replaced.
async fn watch_events(
    events: impl futures::Stream<Item = Event> + Send + 'static,
    mut closed: watch::Receiver<bool>,
    mut generation: watch::Receiver<u64>,
    mine: u64,
    metrics: crate::RabbitMetrics,
) {
    let mut events = std::pin::pin!(events);
    loop {
        tokio::select! {
            _ = closed.wait_for(|closed| *closed) => break,
            _ = generation.wait_for(|current| *current != mine) => break,
            event = events.next() => match event {
                None => break,
                // The connection was opened before this listener existed:
                // every `Connected` seen here is a recovery.
                Some(Event::Connected) => {
                    tracing::info!("RabbitMQ connection recovered");
                    metrics.reconnected();
                    metrics.set_blocked(false);
                }
                Some(Event::ConnectionBlocked(reason)) => {
                    tracing::warn!(%reason, "RabbitMQ blocked the connection");
                    metrics.set_blocked(true);
                }
                Some(Event::ConnectionUnblocked) => {
                    tracing::info!("RabbitMQ unblocked the connection");
                    metrics.set_blocked(false);
                }
                Some(Event::Error(error)) if error.is_amqp_soft_error() => {
                    tracing::debug!(%error, "RabbitMQ closed a channel");
                }
                Some(Event::Error(error)) => {
                    tracing::warn!(%error, "RabbitMQ connection error");
                }
                Some(_) => {}
            }
        }
    }
}

/// Opens a connection and a channel on it, declaring the exchange there.
async fn open_connection(
    uri: &AMQPUri,
    properties: &ConnectionProperties,
    exchange: &ShortString,
    timeout: Duration,
) -> Result<(Connection, Channel)> {
    let deadline = deadline_after(timeout);
    let target = redacted(uri);
    // A plain TCP probe first: lapin retries the initial connect with the
    // reconnect schedule, which would outlive the connect timeout in a
    // background thread when the broker is not there at all.
    probe(uri, deadline).await?;
    let connect = Connection::connect_uri(uri.clone(), properties.clone());
    let connection = match tokio::time::timeout_at(deadline, connect).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(err)) => {
            return Err(from_lapin(
                &format!("connecting to RabbitMQ at {target}"),
                err,
            ));
        }
        Err(_) => {
            return Err(TransportError::new(
                TransportErrorKind::Connection,
                format!(
                    "RabbitMQ at {target} did not complete the AMQP handshake within {timeout:?}"
                ),
            ));
        }
    };
    let channel = connection
        .create_channel()
        .await
        .map_err(|err| from_lapin("opening the publisher channel", err))?;
    declare_exchange(&channel, exchange.clone()).await?;
    Ok((connection, channel))
}

/// Whether the broker accepts TCP connections (by `deadline`).
async fn probe(uri: &AMQPUri, deadline: Instant) -> Result<()> {
    let target = redacted(uri);
    let connect = tokio::net::TcpStream::connect((uri.authority.host.clone(), uri.authority.port));
    match tokio::time::timeout_at(deadline, connect).await {
        Ok(Ok(stream)) => {
            drop(stream);
            Ok(())
        }
        Ok(Err(err)) => Err(TransportError::new(
            TransportErrorKind::Connection,
            format!("cannot reach RabbitMQ at {target}: {err}"),
        )
        .with_source(err)),
        Err(_) => Err(TransportError::new(
            TransportErrorKind::Connection,
            format!("RabbitMQ at {target} did not accept a connection in time"),
        )),
    }
}

/// How often the supervisor looks at the connection.
const SUPERVISE_EVERY: Duration = Duration::from_millis(500);

/// Replaces the connection when lapin's recovery stalls: the connection has
/// been down for [`RabbitConfig::recovery_stall_timeout`] although the
/// broker accepts TCP connections, or lapin gave up on it. Retries with
/// exponential backoff until it succeeds or the transport is closed.
async fn supervise(inner: Weak<Inner>) {
    let Some(mut closed) = inner.upgrade().map(|i| i.closed.subscribe()) else {
        return;
    };
    let mut stalled_since: Option<Instant> = None;
    let mut retry_at = Instant::now();
    let mut delays = None;
    loop {
        tokio::select! {
            _ = closed.wait_for(|closed| *closed) => return,
            () = tokio::time::sleep(SUPERVISE_EVERY) => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        let transport = RabbitTransport { inner };
        let status = transport.connection().status().clone();
        if status.connected() {
            stalled_since = None;
            delays = None;
            continue;
        }
        let since = *stalled_since.get_or_insert_with(Instant::now);
        let config = &transport.inner.config;
        let given_up = !(status.reconnecting() || status.connecting());
        if (!given_up && since.elapsed() < config.recovery_stall_timeout)
            || Instant::now() < retry_at
        {
            continue;
        }
        match transport.replace_connection().await {
            Ok(()) => {
                stalled_since = None;
                delays = None;
            }
            Err(err) => {
                let delays = delays.get_or_insert_with(|| {
                    Backoff::exponential(
                        Duration::from_millis(500),
                        config.reconnect_max_delay.max(Duration::from_secs(1)),
                    )
                    .delays()
                });
                let delay = delays.next().unwrap_or(config.reconnect_max_delay);
                tracing::debug!(error = %err, ?delay, "replacing the RabbitMQ connection failed");
                retry_at = deadline_after(delay);
            }
        }
    }
}

impl RabbitTransport {
    /// Opens a new connection and makes it the current one.
    async fn replace_connection(&self) -> Result<()> {
        let inner = &self.inner;
        probe(&inner.uri, Instant::now() + Duration::from_secs(1)).await?;
        let (connection, channel) = open_connection(
            &inner.uri,
            &inner.properties,
            &inner.exchange,
            inner.config.connect_timeout,
        )
        .await?;
        // The publisher opens its own channel on the new connection.
        drop(channel);
        if self.is_closed() {
            let _ = connection.close(200, "surety: closed".into()).await;
            return Ok(());
        }
        let generation = {
            let mut current = inner
                .connection
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            *current = Arc::new(connection);
            let mut next = 0;
            inner.generation.send_modify(|g| {
                *g += 1;
                next = *g;
            });
            next
        };
        tracing::warn!(
            generation,
            "lapin's recovery stalled; replaced the RabbitMQ connection"
        );
        inner.config.metrics.reconnected();
        self.watch_events(generation);
        Ok(())
    }
}

impl Close for RabbitTransport {
    /// Closes the transport: later publishes fail with `Closed`, every
    /// subscription stream ends, consumers are cancelled, publishes already
    /// sent get up to the confirm timeout to be confirmed, then the
    /// connection is closed (the broker requeues unacknowledged deliveries).
    /// Idempotent.
    async fn close(&self) -> Result<()> {
        if self.inner.closed.send_replace(true) {
            return Ok(());
        }
        let subscriptions: Vec<_> = self
            .subscriptions()
            .drain(..)
            .filter_map(|s| s.upgrade())
            .collect();
        for sub in subscriptions {
            let cancel = sub
                .channel
                .basic_cancel(sub.consumer_tag.clone(), BasicCancelOptions::default());
            let _ = tokio::time::timeout(CLOSE_STEP_TIMEOUT, cancel).await;
        }
        // Let confirms already on their way arrive.
        let window = self.inner.config.max_in_flight.max(1);
        let permits = u32::try_from(window).unwrap_or(u32::MAX);
        let connection = self.connection();
        if connection.status().connected() {
            let _ = tokio::time::timeout(
                self.inner.config.confirm_timeout,
                self.inner.window.acquire_many(permits),
            )
            .await;
        }
        self.inner.window.close();
        let connection = self.connection();
        if connection.status().connected() {
            let close = connection.close(200, "surety: closed".into());
            match tokio::time::timeout(CLOSE_STEP_TIMEOUT, close).await {
                Ok(Err(err)) => tracing::debug!(error = %err, "closing the RabbitMQ connection"),
                Err(_) => tracing::warn!("the RabbitMQ connection did not close in time"),
                Ok(Ok(())) => {}
            }
        }
        Ok(())
    }
}

/// Waits until `channel` is usable again after `error`, or until the
/// connection is replaced (a new `generation`), for at most until
/// `deadline` (`None`: as long as it takes). Returns the error when the
/// channel will not come back.
pub(crate) async fn wait_for_recovery(
    connection: &Connection,
    channel: &Channel,
    error: lapin::Error,
    deadline: Option<Instant>,
    generation: &mut watch::Receiver<u64>,
) -> std::result::Result<(), WaitError> {
    let mine = *generation.borrow_and_update();
    let recovered = async {
        let error = match channel.wait_for_recovery(error).await {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        // No notifier on this error: follow the states.
        loop {
            if channel.status().connected() {
                return Ok(());
            }
            let recovering = channel.status().reconnecting()
                || connection.status().reconnecting()
                || connection.status().connecting();
            if !recovering {
                return Err(WaitError::Gone(error));
            }
            tokio::time::sleep(RECOVERY_POLL).await;
        }
    };
    let replaced = async {
        let _ = generation.wait_for(|g| *g != mine).await;
        Ok(())
    };
    let either = async {
        tokio::select! {
            result = recovered => result,
            result = replaced => result,
        }
    };
    match deadline {
        None => either.await,
        Some(deadline) => tokio::time::timeout_at(deadline, either)
            .await
            .unwrap_or(Err(WaitError::TimedOut)),
    }
}

/// Why [`wait_for_recovery`] gave up.
#[derive(Debug)]
pub(crate) enum WaitError {
    /// The channel will not come back.
    Gone(lapin::Error),
    /// The deadline passed first.
    TimedOut,
}
