//! A [`Publisher`] wrapper that traces and counts every publish.

use std::fmt;

use tracing::Instrument;

use crate::envelope::Envelope;
use crate::error::Result;
use crate::metrics::Metrics;
use crate::port::{Close, Confirmation, Publisher};
use crate::trace;

/// Wraps a publisher: each publish runs in a producer span (see
/// [`trace::publish_span`]) whose context is injected into the envelope's
/// headers, and its outcome is counted in [`Metrics`] (`confirmed`, or the
/// [`TransportErrorKind`](crate::TransportErrorKind) name).
///
/// ```
/// use surety_core::{Envelope, Publisher, Instrumented, memory::MemoryTransport};
/// use surety_core::metrics::Metrics;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> surety_core::Result<()> {
/// let publisher = Instrumented::new(MemoryTransport::new(), "memory", Metrics::default());
/// publisher.publish("orders", Envelope::builder("/orders", "order.placed").build()).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Instrumented<P> {
    inner: P,
    system: &'static str,
    metrics: Metrics,
}

impl<P> Instrumented<P> {
    /// Wraps `inner`, a publisher for the messaging system `system`
    /// (`rabbitmq`, `kafka`, `memory`).
    pub fn new(inner: P, system: &'static str, metrics: Metrics) -> Self {
        Self {
            inner,
            system,
            metrics,
        }
    }

    /// The wrapped publisher.
    pub fn get_ref(&self) -> &P {
        &self.inner
    }

    /// Unwraps.
    pub fn into_inner(self) -> P {
        self.inner
    }
}

impl<P> fmt::Debug for Instrumented<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Instrumented")
            .field("system", &self.system)
            .finish_non_exhaustive()
    }
}

impl<P: Publisher> Publisher for Instrumented<P> {
    async fn send(&self, topic: &str, mut envelope: Envelope) -> Result<Confirmation> {
        let span = trace::publish_span(self.system, topic, &envelope);
        let sent = async {
            trace::inject_current(&mut envelope.headers);
            self.inner.send(topic, envelope).await
        }
        .instrument(span.clone())
        .await;
        let (metrics, system, topic) = (self.metrics.clone(), self.system, topic.to_owned());
        match sent {
            Err(err) => {
                metrics.published(system, &topic, err.kind().as_str());
                Err(err)
            }
            Ok(confirmation) => Ok(Confirmation::new(
                async move {
                    let result = confirmation.await;
                    let outcome = match &result {
                        Ok(_) => "confirmed",
                        Err(err) => err.kind().as_str(),
                    };
                    metrics.published(system, &topic, outcome);
                    result
                }
                .instrument(span),
            )),
        }
    }
}

impl<P: Close> Close for Instrumented<P> {
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}
