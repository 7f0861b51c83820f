//! The reference checkout as a step-list saga: take the payment, reserve
//! the stock, book the shipping; undo in reverse when a step fails.
//!
//! The tests of this crate and the checkout example run this definition.
//!
//! | step | command (queue) | success | business failure | compensation (reply) |
//! |---|---|---|---|---|
//! | `payment` | `payment.charge` (`payments`) | `payment.charged` | `payment.declined` | `payment.refund` (`payment.refunded`) |
//! | `inventory` | `inventory.reserve` (`inventory`) | `inventory.reserved` | `inventory.out-of-stock` | `inventory.release` (`inventory.released`) |
//! | `shipping` | `shipping.book` (`shipping`) | `shipping.booked` | `shipping.unavailable` | `shipping.cancel` (`shipping.cancelled`) |
//!
//! Each command's error reply is `<command>.error`. The last step has a
//! compensation too: it only runs when the booking timed out (its reply
//! may have been lost after the booking was made), and cancelling a
//! booking that does not exist is a no-op for the participant.
//!
//! ```
//! use surety_saga::checkout;
//!
//! let saga = checkout::definition(checkout::Deadlines::default());
//! assert_eq!(saga.steps().len(), 3);
//! assert!(saga.mermaid().contains("payment --> inventory"));
//! ```

use std::time::Duration;

use crate::steps::{Compensation, RetryPolicy, Step, Steps};

/// The saga's name.
pub const NAME: &str = "checkout";
/// The payment participant's command queue.
pub const PAYMENTS: &str = "payments";
/// The inventory participant's command queue.
pub const INVENTORY: &str = "inventory";
/// The shipping participant's command queue.
pub const SHIPPING: &str = "shipping";

/// The deadline of each step and compensation, and how often each is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadlines {
    /// How long each step waits for its reply before a re-send.
    pub step: Duration,
    /// How long each compensation waits for its reply before a re-send.
    pub compensation: Duration,
    /// Sends of each step's command.
    pub step_attempts: u32,
    /// Sends of each compensation.
    pub compensation_attempts: u32,
}

impl Default for Deadlines {
    /// 30 s per step and per compensation, 3 sends each.
    fn default() -> Self {
        Self {
            step: Duration::from_secs(30),
            compensation: Duration::from_secs(30),
            step_attempts: 3,
            compensation_attempts: 3,
        }
    }
}

/// The checkout definition with `deadlines`, queues named by [`PAYMENTS`],
/// [`INVENTORY`] and [`SHIPPING`].
pub fn definition(deadlines: Deadlines) -> Steps {
    definition_on(deadlines, PAYMENTS, INVENTORY, SHIPPING)
}

/// The checkout definition with its own queue names (tests give each run
/// unique queues).
pub fn definition_on(
    deadlines: Deadlines,
    payments: &str,
    inventory: &str,
    shipping: &str,
) -> Steps {
    let step = |name: &str, topic: &str, command: &str| {
        Step::new(name, topic, command)
            .retry(RetryPolicy::attempts(deadlines.step_attempts))
            .deadline(deadlines.step)
    };
    let undo = |topic: &str, command: &str, reply: &str| {
        Compensation::new(topic, command)
            .replies(reply)
            .retry(RetryPolicy::attempts(deadlines.compensation_attempts))
            .deadline(deadlines.compensation)
    };
    Steps::new(NAME)
        .step(
            step("payment", payments, "payment.charge")
                .replies("payment.charged")
                .fails_on("payment.declined")
                .compensate(undo(payments, "payment.refund", "payment.refunded")),
        )
        .step(
            step("inventory", inventory, "inventory.reserve")
                .replies("inventory.reserved")
                .fails_on("inventory.out-of-stock")
                .compensate(undo(inventory, "inventory.release", "inventory.released")),
        )
        .step(
            step("shipping", shipping, "shipping.book")
                .replies("shipping.booked")
                .fails_on("shipping.unavailable")
                .compensate(undo(shipping, "shipping.cancel", "shipping.cancelled")),
        )
}
