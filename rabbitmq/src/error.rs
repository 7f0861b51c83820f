//! Mapping lapin's errors onto core's portable [`TransportErrorKind`].

use lapin::ErrorKind;
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use surety_core::{TransportError, TransportErrorKind};

/// The portable kind of a lapin error.
///
/// | lapin | kind |
/// |---|---|
/// | broker refused: not found, precondition failed (queue arguments differ), access refused, resource locked, not allowed, invalid path (vhost) | `Config` |
/// | content too large | `Rejected` |
/// | anything about the socket, the connection or channel state, heartbeats, other protocol errors | `Connection` |
/// | the rest | `Other` |
pub(crate) fn kind_of(err: &lapin::Error) -> TransportErrorKind {
    match err.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(
                AMQPSoftError::NOTFOUND
                | AMQPSoftError::PRECONDITIONFAILED
                | AMQPSoftError::ACCESSREFUSED
                | AMQPSoftError::RESOURCELOCKED,
            )
            | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED | AMQPHardError::INVALIDPATH) => {
                TransportErrorKind::Config
            }
            AMQPErrorKind::Soft(AMQPSoftError::CONTENTTOOLARGE) => TransportErrorKind::Rejected,
            _ => TransportErrorKind::Connection,
        },
        ErrorKind::IOError(_)
        | ErrorKind::RuntimeShutdownError(_)
        | ErrorKind::InvalidConnectionState(_)
        | ErrorKind::InvalidChannelState(..)
        | ErrorKind::InvalidChannel(_)
        | ErrorKind::MissingHeartbeatError
        | ErrorKind::ChannelsLimitReached
        | ErrorKind::ParsingError(_)
        | ErrorKind::SerialisationError(_) => TransportErrorKind::Connection,
        ErrorKind::AuthProviderError(_) | ErrorKind::InvalidProtocolVersion(_) => {
            TransportErrorKind::Config
        }
        _ => TransportErrorKind::Other,
    }
}

/// A [`TransportError`] for `err`, which happened while doing `what`.
pub(crate) fn from_lapin(what: &str, err: lapin::Error) -> TransportError {
    TransportError::new(kind_of(&err), format!("{what}: {err}")).with_source(err)
}
