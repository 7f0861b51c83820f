//! A small payment saga the store tests share: typed states and replies,
//! one command, one timer.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use serde::{Deserialize, Serialize};
use surety_saga::{Command, Input, Saga, Transition};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    Paying,
    Refunding,
    Done,
    Cancelled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Paid,
    Refunded,
}

pub struct Pay;

impl Saga for Pay {
    type State = Step;
    type Message = Reply;
    fn name(&self) -> &str {
        "pay"
    }

    fn state_name<'a>(&'a self, state: &'a Step) -> &'a str {
        match state {
            Step::Paying => "paying",
            Step::Refunding => "refunding",
            Step::Done => "done",
            Step::Cancelled => "cancelled",
        }
    }

    fn is_finished(&self, state: &Step) -> bool {
        matches!(state, Step::Done | Step::Cancelled)
    }

    fn apply(&self, state: &Step, input: &Input<Reply>) -> Transition<Step> {
        match (state, input) {
            (Step::Paying, Input::Message(Reply::Paid)) => Transition::to(Step::Done),
            (Step::Paying, Input::Timeout { .. }) => Transition::to(Step::Refunding).command(
                Command::new("payments", "payment.refund", serde_json::json!({})),
            ),
            (Step::Refunding, Input::Message(Reply::Refunded)) => Transition::to(Step::Cancelled),
            (_, Input::Operator(action)) if action.action == "abort" => {
                Transition::to(Step::Cancelled)
            }
            _ => Transition::ignore(),
        }
    }
}

pub fn begin() -> Transition<Step> {
    Transition::to(Step::Paying)
        .command(Command::new(
            "payments",
            "payment.charge",
            serde_json::json!({ "cents": 4200 }),
        ))
        .set_timer("payment", Duration::from_secs(30))
}
