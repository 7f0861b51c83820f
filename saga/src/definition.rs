//! The pure part of a saga: its definition, its inputs and the transition it
//! decides on. Nothing here does I/O, reads the clock or draws random ids, so
//! a definition is tested with given/when/then and property tests.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A saga definition: `(state, input) -> transition`, with no I/O.
///
/// The state is your own type and carries both the named step (an enum
/// variant) and the data the saga has gathered. The
/// [`Orchestrator`](crate::Orchestrator) loads it, applies one [`Input`] at a time and
/// stores what [`Saga::apply`] decided.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use surety_saga::{Command, Input, Saga, Transition};
///
/// #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// enum Payment { Requested, Paid, Refunded }
///
/// #[derive(Clone, Debug, Serialize, Deserialize)]
/// enum Reply { Charged, Declined }
///
/// struct Pay;
/// impl Saga for Pay {
///     type State = Payment;
///     type Message = Reply;
///     fn name(&self) -> &str { "pay" }
///     fn state_name<'a>(&'a self, state: &'a Payment) -> &'a str {
///         match state { Payment::Requested => "requested", Payment::Paid => "paid", Payment::Refunded => "refunded" }
///     }
///     fn is_finished(&self, state: &Payment) -> bool { !matches!(state, Payment::Requested) }
///     fn apply(&self, state: &Payment, input: &Input<Reply>) -> Transition<Payment> {
///         match (state, input) {
///             (Payment::Requested, Input::Message(Reply::Charged)) => Transition::to(Payment::Paid),
///             (Payment::Requested, Input::Message(Reply::Declined)) => Transition::to(Payment::Refunded)
///                 .command(Command::new("orders", "order.cancel", serde_json::json!({}))),
///             _ => Transition::ignore(),
///         }
///     }
/// }
///
/// let next = Pay.apply(&Payment::Requested, &Input::Message(Reply::Declined));
/// assert_eq!(next.state(), Some(&Payment::Refunded));
/// assert_eq!(next.commands().len(), 1);
/// ```
pub trait Saga: Send + Sync {
    /// The saga's state: the step it is at and the data it holds.
    type State: Serialize + DeserializeOwned + Clone + Send + Sync;
    /// The replies and events the saga reacts to, already decoded.
    type Message: Serialize + DeserializeOwned + Clone + Send + Sync;
    /// A stable name; instances are stored under it.
    fn name(&self) -> &str;

    /// The name of the step `state` is at (history rows and metrics).
    fn state_name<'a>(&'a self, state: &'a Self::State) -> &'a str;

    /// Whether `state` is final: a finished saga takes no more inputs and its
    /// pending timers are dropped.
    fn is_finished(&self, state: &Self::State) -> bool;

    /// Decides what `input` does to an instance at `state`. Must be pure:
    /// the same state and input always give the same transition, so that a
    /// recorded history replays to the same state ([`replay`]).
    fn apply(&self, state: &Self::State, input: &Input<Self::Message>) -> Transition<Self::State>;
}

/// One input to a saga instance. Every kind is recorded in the instance's
/// history, operator actions included, so a history replays.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Input<M> {
    /// A reply or event, decoded into the saga's message type.
    Message(M),
    /// A timer set by an earlier transition fell due.
    Timeout {
        /// The timer's name, as given to [`Transition::set_timer`].
        name: String,
    },
    /// An operator acted on the instance (retry a step, compensate, abort).
    Operator(OperatorAction),
}

/// An operator's action on a saga instance, recorded like any other input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorAction {
    /// What the operator asked for, e.g. `abort`, `retry-step`, `compensate`.
    pub action: String,
    /// Who asked (for the audit trail).
    pub actor: String,
    /// Why, in the operator's words.
    pub reason: String,
}

impl OperatorAction {
    /// An action by `actor` for `reason`.
    pub fn new(
        action: impl Into<String>,
        actor: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            action: action.into(),
            actor: actor.into(),
            reason: reason.into(),
        }
    }
}

/// A command a transition sends. The orchestrator turns it into an
/// [`Envelope`](surety_core::Envelope) whose id is derived from the saga id,
/// the instance version and the command's index, and whose correlation id is
/// the saga id, so replies find their way back and a re-sent command keeps
/// its id (consumers deduplicate it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Where the command goes (queue or topic).
    pub topic: String,
    /// The message type (CloudEvents `type`).
    pub message_type: String,
    /// The payload, encoded as JSON.
    pub payload: serde_json::Value,
    /// A stable key for the command within its saga instance: with one,
    /// the message id is `<saga>:<saga id>:<key>`, so re-sending the
    /// command (a retry after a deadline) keeps its id and the participant
    /// deduplicates it. Without one, the id is
    /// `<saga>:<saga id>:<version>:<index>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// The header that carries a keyed command's [key](Command#structfield.key)
/// (for a [`Steps`](crate::steps::Steps) definition `do:<step>:<generation>`
/// or `undo:<step>:<generation>`), so a participant can tell a step's
/// command from its compensation; see [`participant`](crate::participant).
pub const COMMAND_KEY_HEADER: &str = "surety-saga-command-key";

impl Command {
    /// A command of `message_type` with a JSON `payload` to `topic`.
    pub fn new(
        topic: impl Into<String>,
        message_type: impl Into<String>,
        payload: serde_json::Value,
    ) -> Self {
        Self {
            topic: topic.into(),
            message_type: message_type.into(),
            payload,
            key: None,
        }
    }

    /// Gives the command a stable key (see [`Command::key`](Self#structfield.key)):
    /// every send under the same key carries the same message id.
    pub fn keyed(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
}

/// What an input does to an instance: the next state, the commands to send
/// and the timers to set or cancel. [`Transition::ignore`] leaves the instance
/// untouched (nothing is written): use it for inputs that are late or
/// duplicated.
#[derive(Clone, Debug, PartialEq)]
#[must_use]
pub struct Transition<S> {
    pub(crate) state: Option<S>,
    pub(crate) commands: Vec<Command>,
    pub(crate) set_timers: Vec<(String, Duration)>,
    pub(crate) cancel_timers: Vec<String>,
}

impl<S> Transition<S> {
    /// Moves the instance to `state`.
    pub fn to(state: S) -> Self {
        Self {
            state: Some(state),
            commands: Vec::new(),
            set_timers: Vec::new(),
            cancel_timers: Vec::new(),
        }
    }

    /// The input does not concern the instance: nothing is written or sent.
    pub fn ignore() -> Self {
        Self {
            state: None,
            commands: Vec::new(),
            set_timers: Vec::new(),
            cancel_timers: Vec::new(),
        }
    }

    /// Sends `command` once the transition is stored.
    pub fn command(mut self, command: Command) -> Self {
        self.commands.push(command);
        self
    }

    /// Sets (or resets) the timer `name` to fall due `after` from now; it
    /// comes back as [`Input::Timeout`].
    pub fn set_timer(mut self, name: impl Into<String>, after: Duration) -> Self {
        self.set_timers.push((name.into(), after));
        self
    }

    /// Cancels the timer `name`, if set.
    pub fn cancel_timer(mut self, name: impl Into<String>) -> Self {
        self.cancel_timers.push(name.into());
        self
    }

    /// The next state, or `None` when the input is ignored.
    pub fn state(&self) -> Option<&S> {
        self.state.as_ref()
    }

    /// The commands to send.
    pub fn commands(&self) -> &[Command] {
        &self.commands
    }

    /// The timers to set, by name, with their delay.
    pub fn timers_set(&self) -> &[(String, Duration)] {
        &self.set_timers
    }

    /// The timers to cancel, by name.
    pub fn timers_cancelled(&self) -> &[String] {
        &self.cancel_timers
    }

    /// Whether the input is ignored.
    pub fn is_ignored(&self) -> bool {
        self.state.is_none()
    }
}

/// Replays a recorded history from `initial`: the state the orchestrator
/// stored after those inputs, computed again from the pure definition.
/// Inputs the definition ignores leave the state as it is; inputs after the
/// saga finished are skipped, as the orchestrator skips them.
pub fn replay<S: Saga>(
    saga: &S,
    initial: S::State,
    inputs: impl IntoIterator<Item = Input<S::Message>>,
) -> S::State {
    let mut state = initial;
    for input in inputs {
        if saga.is_finished(&state) {
            break;
        }
        if let Some(next) = saga.apply(&state, &input).state {
            state = next;
        }
    }
    state
}
