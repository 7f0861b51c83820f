//! Mapping librdkafka errors onto core's portable [`TransportErrorKind`].

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use surety_core::{TransportError, TransportErrorKind};

/// The portable kind of a librdkafka error code.
///
/// Transient broker and network conditions are `Timeout` or `Connection`
/// (retrying can help); problems with the message itself are `Rejected`;
/// missing topics, authorization and configuration problems are `Config`.
pub(crate) fn kind_of_code(code: RDKafkaErrorCode) -> TransportErrorKind {
    use RDKafkaErrorCode as C;
    use TransportErrorKind as K;
    match code {
        C::QueueFull
        | C::MessageTimedOut
        | C::RequestTimedOut
        | C::OperationTimedOut
        | C::TimedOutQueue => K::Timeout,
        C::BrokerTransportFailure
        | C::AllBrokersDown
        | C::Resolve
        | C::NetworkException
        | C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::BrokerNotAvailable
        | C::ReplicaNotAvailable
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
        | C::CoordinatorNotAvailable
        | C::CoordinatorLoadInProgress
        | C::NotCoordinator
        | C::WaitingForCoordinator
        | C::KafkaStorageError
        | C::SSL
        | C::ThrottlingQuotaExceeded
        | C::PreferredLeaderNotAvailable
        | C::FencedLeaderEpoch
        | C::UnknownLeaderEpoch => K::Connection,
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::InvalidMessage
        | C::BadMessage
        | C::MessageBatchTooLarge
        | C::InvalidRecord
        | C::InvalidTimestamp
        | C::UnsupportedForMessageFormat
        | C::BadCompression
        | C::UnsupportedCompressionType => K::Rejected,
        C::UnknownTopicOrPartition
        | C::UnknownTopic
        | C::UnknownPartition
        | C::InvalidTopic
        | C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::SaslAuthenticationFailed
        | C::Authentication
        | C::InvalidArgument
        | C::InvalidConfig
        | C::InvalidGroupId
        | C::InvalidRequiredAcks
        | C::InvalidPartitions
        | C::InvalidReplicationFactor
        | C::PolicyViolation
        | C::UnsupportedVersion
        | C::UnsupportedFeature
        | C::UnknownTopicId => K::Config,
        C::PurgeQueue | C::PurgeInflight | C::DestroyBroker => K::Closed,
        _ => K::Other,
    }
}

/// The portable kind of a librdkafka error.
pub(crate) fn kind_of(err: &KafkaError) -> TransportErrorKind {
    match err {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) | KafkaError::Nul(_) => {
            TransportErrorKind::Config
        }
        KafkaError::Subscription(_) => TransportErrorKind::Config,
        KafkaError::Canceled => TransportErrorKind::Closed,
        other => other
            .rdkafka_error_code()
            .map_or(TransportErrorKind::Other, kind_of_code),
    }
}

/// Wraps a librdkafka error with `context` ("publishing to topic orders").
pub(crate) fn transport_error(context: impl std::fmt::Display, err: KafkaError) -> TransportError {
    let kind = kind_of(&err);
    TransportError::new(kind, format!("{context}: {err}")).with_source(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_kinds_that_classify_sensibly() {
        use surety_core::{Classify, ErrorClass};
        let cases = [
            (RDKafkaErrorCode::QueueFull, TransportErrorKind::Timeout),
            (
                RDKafkaErrorCode::MessageTimedOut,
                TransportErrorKind::Timeout,
            ),
            (
                RDKafkaErrorCode::AllBrokersDown,
                TransportErrorKind::Connection,
            ),
            (
                RDKafkaErrorCode::MessageSizeTooLarge,
                TransportErrorKind::Rejected,
            ),
            (
                RDKafkaErrorCode::UnknownTopicOrPartition,
                TransportErrorKind::Config,
            ),
            (RDKafkaErrorCode::PurgeQueue, TransportErrorKind::Closed),
        ];
        for (code, kind) in cases {
            let err = transport_error("op", KafkaError::MessageProduction(code));
            assert_eq!(err.kind(), kind, "{code:?}");
            let retryable = matches!(
                kind,
                TransportErrorKind::Timeout
                    | TransportErrorKind::Connection
                    | TransportErrorKind::Closed
            );
            assert_eq!(err.class().is_retryable(), retryable, "{code:?}");
            if !retryable {
                assert_eq!(err.class(), ErrorClass::Permanent);
            }
        }
    }
}
