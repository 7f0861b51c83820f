//! Dead-letter sinks: where [`DlqLayer`](crate::DlqLayer) writes a dead
//! letter before it acknowledges the original.
//!
//! [`TopicSink`] publishes the dead letter ([`DeadLetter::to_envelope`]) to a
//! DLQ topic or queue through any core [`Publisher`] and waits for the
//! broker's confirmation; [`StoreSink`] puts it into a [`DlqStore`]. Write
//! your own by implementing [`DeadLetterSink`].

use std::fmt;
use std::sync::Arc;

use surety_core::{BoxError, BoxPublisher, Publisher};

use crate::letter::DeadLetter;
use crate::store::DlqStore;

/// A dead-letter write failed; the layer leaves the original to be
/// redelivered.
#[derive(Debug, thiserror::Error)]
#[error("dead-letter sink `{sink}` failed: {source}")]
pub struct SinkError {
    /// The sink's name.
    pub sink: String,
    /// What went wrong.
    #[source]
    pub source: BoxError,
}

impl SinkError {
    /// A failure of `sink`.
    pub fn new(sink: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self {
            sink: sink.into(),
            source: source.into(),
        }
    }
}

/// Somewhere dead letters go. A write must be durable when it returns `Ok`:
/// the original message is acknowledged right after.
///
/// ```
/// use std::sync::Mutex;
/// use surety_dlq::sink::{DeadLetterSink, SinkError};
/// use surety_dlq::DeadLetter;
///
/// /// Logs dead letters (not durable: for illustration only).
/// #[derive(Debug, Default)]
/// struct LogSink(Mutex<Vec<String>>);
///
/// #[async_trait::async_trait]
/// impl DeadLetterSink for LogSink {
///     fn name(&self) -> &str { "log" }
///     async fn write(&self, letter: &DeadLetter) -> Result<(), SinkError> {
///         self.0.lock().unwrap().push(format!("{} {}", letter.id, letter.error.message));
///         Ok(())
///     }
/// }
///
/// let layer = surety_dlq::DlqLayer::new("billing").sink(LogSink::default());
/// # let _ = layer;
/// ```
#[async_trait::async_trait]
pub trait DeadLetterSink: Send + Sync + fmt::Debug + 'static {
    /// A short name for logs and the `sink` metric label.
    fn name(&self) -> &str;

    /// Writes `letter` durably.
    async fn write(&self, letter: &DeadLetter) -> Result<(), SinkError>;
}

type TopicFn = dyn Fn(&DeadLetter) -> String + Send + Sync;

/// Publishes dead letters to a DLQ topic (or queue) and waits for the
/// broker's confirmation.
///
/// The message is [`DeadLetter::to_envelope`]: the original envelope, same
/// id, key and payload, with the `surety-dlq-*` headers.
#[derive(Clone)]
pub struct TopicSink {
    publisher: BoxPublisher,
    topic: Arc<TopicFn>,
}

impl TopicSink {
    /// Publishes every dead letter to `topic`.
    pub fn new(publisher: impl Publisher + 'static, topic: impl Into<String>) -> Self {
        let topic = topic.into();
        Self::with_route(publisher, move |_| topic.clone())
    }

    /// Publishes each dead letter to the topic `route` returns for it (for
    /// example `format!("{}.dlq", letter.source.topic)`).
    pub fn with_route(
        publisher: impl Publisher + 'static,
        route: impl Fn(&DeadLetter) -> String + Send + Sync + 'static,
    ) -> Self {
        Self {
            publisher: BoxPublisher::borrowed(publisher),
            topic: Arc::new(route),
        }
    }
}

impl fmt::Debug for TopicSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopicSink").finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl DeadLetterSink for TopicSink {
    fn name(&self) -> &str {
        "topic"
    }

    async fn write(&self, letter: &DeadLetter) -> Result<(), SinkError> {
        let topic = (self.topic)(letter);
        self.publisher
            .publish(&topic, letter.to_envelope())
            .await
            .map(|_| ())
            .map_err(|e| SinkError::new(format!("topic {topic}"), e))
    }
}

/// Puts dead letters into a [`DlqStore`].
#[derive(Debug, Clone)]
pub struct StoreSink {
    store: Arc<dyn DlqStore>,
}

impl StoreSink {
    /// Writes to `store`.
    pub fn new(store: Arc<dyn DlqStore>) -> Self {
        Self { store }
    }
}

#[async_trait::async_trait]
impl DeadLetterSink for StoreSink {
    fn name(&self) -> &str {
        "store"
    }

    async fn write(&self, letter: &DeadLetter) -> Result<(), SinkError> {
        self.store
            .put(letter)
            .await
            .map_err(|e| SinkError::new("store", e))
    }
}
