//! The consume side of a faulty transport: drops, delays, reorders and
//! arms failed acks on the deliveries of a subscription.

use std::collections::VecDeque;
use std::sync::Arc;

use futures::StreamExt;
use surety_core::{Delivery, DeliveryStream, Result};

use super::settle::FaultySettle;
use super::shared::{MessageKey, Shared};
use super::stats::Fault;

struct FaultyStream {
    inner: DeliveryStream,
    /// The inner stream ended; it must not be polled again.
    finished: bool,
    /// Items decided on and waiting to be yielded, in order.
    ready: VecDeque<Result<Delivery>>,
    /// A delivery held back behind the next one.
    held: Option<Delivery>,
    shared: Arc<Shared>,
    topic: String,
    group: String,
}

/// Wraps a subscription's stream with the consume-side faults of `shared`.
pub(crate) fn wrap(
    inner: DeliveryStream,
    shared: Arc<Shared>,
    topic: &str,
    group: &str,
) -> DeliveryStream {
    let state = FaultyStream {
        inner,
        finished: false,
        ready: VecDeque::new(),
        held: None,
        shared,
        topic: topic.to_owned(),
        group: group.to_owned(),
    };
    futures::stream::unfold(state, |mut state| async move {
        let item = state.next().await?;
        Some((item, state))
    })
    // Keeps answering `None` once ended, instead of panicking when polled again.
    .fuse()
    .boxed()
}

impl FaultyStream {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Some(item);
            }
            if self.finished {
                return self.held.take().map(Ok);
            }
            let next = if self.held.is_some() {
                match tokio::time::timeout(self.shared.plan.reorder_window, self.inner.next()).await
                {
                    Ok(next) => next,
                    Err(_) => {
                        // Nothing came to overtake the held delivery.
                        self.ready.extend(self.held.take().map(Ok));
                        continue;
                    }
                }
            } else {
                self.inner.next().await
            };
            match next {
                None => self.finished = true,
                Some(Err(err)) => return Some(Err(err)),
                Some(Ok(delivery)) => self.inject(delivery).await,
            }
        }
    }

    /// Decides the faults for one delivery, in a fixed order: drop, delay,
    /// fail ack, reorder.
    async fn inject(&mut self, delivery: Delivery) {
        let plan = &self.shared.plan;
        let message = MessageKey::new(&self.topic, &self.group, delivery.envelope());
        if self
            .shared
            .force_redelivery(plan.drop, Fault::Dropped, &message)
        {
            // Unsettled: the transport delivers it again.
            drop(delivery);
            // A transport that redelivers at once would otherwise keep this
            // poll busy for as long as drops keep firing.
            tokio::task::yield_now().await;
            return;
        }
        if let Some(delay) = self.shared.delay(
            plan.delay_delivery,
            plan.max_delivery_delay,
            Fault::DeliveryDelayed,
            &message.topic,
            &message.message_id,
        ) {
            tokio::time::sleep(delay).await;
        }
        let fail_ack = self.shared.arm(plan.fail_ack, &message);
        let (envelope, info, settle) = delivery.into_parts();
        let settle = FaultySettle {
            inner: settle,
            fail_ack,
            shared: Arc::clone(&self.shared),
            message: message.clone(),
        };
        let delivery = Delivery::new(envelope, info, Box::new(settle));
        if self.held.is_none() && self.shared.chance(plan.reorder) {
            self.held = Some(delivery);
            return;
        }
        self.ready.push_back(Ok(delivery));
        if let Some(held) = self.held.take() {
            // Recorded only now: a held delivery that nothing overtook
            // within the window was not reordered.
            self.shared
                .record(Fault::Reordered, &self.topic, &held.envelope().id);
            self.ready.push_back(Ok(held));
        }
    }
}
