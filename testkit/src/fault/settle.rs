//! A settler that can fail an ack on purpose.

use std::fmt;
use std::sync::Arc;

use surety_core::{Result, Settle, TransportError, TransportErrorKind};

use super::shared::{MessageKey, Shared};
use super::stats::Fault;

/// Wraps the transport's settler; when armed, `ack` fails and drops the
/// inner settler unsettled so the transport redelivers the message.
pub(crate) struct FaultySettle {
    pub(crate) inner: Box<dyn Settle>,
    pub(crate) fail_ack: bool,
    pub(crate) shared: Arc<Shared>,
    pub(crate) message: MessageKey,
}

impl fmt::Debug for FaultySettle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultySettle")
            .field("inner", &self.inner)
            .field("fail_ack", &self.fail_ack)
            .field("message_id", &self.message.message_id)
            .finish()
    }
}

#[async_trait::async_trait]
impl Settle for FaultySettle {
    async fn ack(self: Box<Self>) -> Result<()> {
        let this = *self;
        if this.fail_ack && this.shared.fire_armed(Fault::AckFailed, &this.message) {
            // Not acknowledged: dropping the settler unsettled hands the
            // message back to the transport for redelivery.
            drop(this.inner);
            return Err(TransportError::new(
                TransportErrorKind::Ack,
                format!(
                    "injected fault: ack of message {} on {} failed; it was not acknowledged and will be redelivered",
                    this.message.message_id, this.message.topic
                ),
            ));
        }
        this.inner.ack().await
    }

    async fn nack(self: Box<Self>, requeue: bool) -> Result<()> {
        self.inner.nack(requeue).await
    }

    async fn reject(self: Box<Self>) -> Result<()> {
        self.inner.reject().await
    }
}
