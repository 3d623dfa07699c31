//! Errors a client can cause or observe, and the one place they become gRPC
//! status codes. Every message says what happened and what to do about it.

use std::time::Duration;

use tonic::{Code, Status};

use crate::hub::{SubscribeError, SubscriptionEnd};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Subscribe(#[from] SubscribeError),
    #[error(transparent)]
    SubscriptionEnded(#[from] SubscriptionEnd),
    #[error("too many open Subscribe streams (limit {limit}, --max-subscribers); retry later")]
    TooManySubscribers { limit: usize },
    #[error("too many open Publish streams (limit {limit}, --max-publishers); retry later or send on the TCP port")]
    TooManyPublishers { limit: usize },
    #[error("the Subscribe filter names {count} channels, more than the {limit} allowed (--max-filter-channels); subscribe to fewer, or to all (no filter)")]
    FilterTooLarge { count: usize, limit: usize },
    #[error("stream_id {requested:?} is not this server's stream {current:?} (it restarted without its data, or this is another deployment); resubscribe live, or from StreamInfo.first_sequence, with stream_id {current:?}")]
    StreamMismatch { requested: String, current: String },
    #[error(
        "no request message arrived within {0:?}; send the request message right after the headers"
    )]
    RequestTimeout(Duration),
    #[error("the call ended before its request message")]
    MissingRequest,
    #[error("no Publish message arrived for {0:?} (--publish-idle-timeout); packets before that were accepted, open a new stream to send more")]
    PublishIdle(Duration),
    #[error("this Publish stream sent nothing for a while and was closed to make room for another (--max-publishers); packets before were accepted, open a new stream to send more")]
    PublishDisplaced,
    #[error("payload of {length} bytes is over the limit of {max} bytes (--max-payload); packets before it were accepted")]
    PayloadTooLong { length: usize, max: u32 },
    #[error("packet is HMAC-flagged but this server has no HMAC key (--hmac-key-file); packets before it were accepted")]
    HmacNotConfigured,
    #[error("this token may not {0} (its line in --auth-token-file says what it may do)")]
    PermissionDenied(String),
    #[error("the server is shutting down; reconnect to another replica or retry")]
    ShuttingDown,
    #[error("packets could not be stored in the cluster stream: {0}; packets before them were accepted, retry the rest")]
    Cluster(#[from] crate::cluster::ClusterError),
}

impl ServiceError {
    /// Label for `requests_refused{reason}`, for refusals that are limits.
    pub fn refusal_reason(&self) -> Option<&'static str> {
        match self {
            ServiceError::TooManySubscribers { .. } => Some("max_subscribers"),
            ServiceError::TooManyPublishers { .. } => Some("max_publishers"),
            ServiceError::FilterTooLarge { .. } => Some("max_filter_channels"),
            ServiceError::StreamMismatch { .. } => Some("stream_mismatch"),
            ServiceError::RequestTimeout(_) => Some("request_timeout"),
            ServiceError::PublishIdle(_) => Some("publish_idle"),
            ServiceError::PublishDisplaced => Some("publish_displaced"),
            ServiceError::PermissionDenied(_) => Some("permission_denied"),
            _ => None,
        }
    }
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Status {
        let code = match &error {
            ServiceError::Subscribe(SubscribeError::OutOfRange { .. }) => Code::OutOfRange,
            ServiceError::Subscribe(SubscribeError::ShuttingDown) => Code::Unavailable,
            ServiceError::SubscriptionEnded(
                SubscriptionEnd::ShuttingDown | SubscriptionEnd::LogUnreadable(_),
            ) => Code::Unavailable,
            ServiceError::SubscriptionEnded(
                SubscriptionEnd::Lagged { .. }
                | SubscriptionEnd::Stuck(_)
                | SubscriptionEnd::HoldingMemory,
            ) => Code::ResourceExhausted,
            ServiceError::TooManySubscribers { .. }
            | ServiceError::TooManyPublishers { .. }
            | ServiceError::PublishDisplaced => Code::ResourceExhausted,
            ServiceError::FilterTooLarge { .. }
            | ServiceError::PayloadTooLong { .. }
            | ServiceError::MissingRequest => Code::InvalidArgument,
            ServiceError::StreamMismatch { .. } | ServiceError::HmacNotConfigured => {
                Code::FailedPrecondition
            }
            ServiceError::RequestTimeout(_) | ServiceError::PublishIdle(_) => {
                Code::DeadlineExceeded
            }
            ServiceError::PermissionDenied(_) => Code::PermissionDenied,
            ServiceError::ShuttingDown | ServiceError::Cluster(_) => Code::Unavailable,
        };
        Status::new(code, error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_the_contracted_code() {
        let cases: Vec<(ServiceError, Code)> = vec![
            (
                SubscribeError::OutOfRange {
                    requested: 10,
                    next: 3,
                }
                .into(),
                Code::OutOfRange,
            ),
            (SubscribeError::ShuttingDown.into(), Code::Unavailable),
            (SubscriptionEnd::ShuttingDown.into(), Code::Unavailable),
            (
                SubscriptionEnd::Lagged {
                    behind: 5,
                    retained: 2,
                }
                .into(),
                Code::ResourceExhausted,
            ),
            (
                SubscriptionEnd::Stuck(Duration::from_secs(5)).into(),
                Code::ResourceExhausted,
            ),
            (
                SubscriptionEnd::HoldingMemory.into(),
                Code::ResourceExhausted,
            ),
            (
                ServiceError::TooManySubscribers { limit: 1 },
                Code::ResourceExhausted,
            ),
            (
                ServiceError::TooManyPublishers { limit: 1 },
                Code::ResourceExhausted,
            ),
            (
                ServiceError::FilterTooLarge { count: 9, limit: 8 },
                Code::InvalidArgument,
            ),
            (
                ServiceError::StreamMismatch {
                    requested: "a".into(),
                    current: "b".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                ServiceError::RequestTimeout(Duration::from_secs(1)),
                Code::DeadlineExceeded,
            ),
            (ServiceError::MissingRequest, Code::InvalidArgument),
            (
                ServiceError::PublishIdle(Duration::from_secs(1)),
                Code::DeadlineExceeded,
            ),
            (ServiceError::PublishDisplaced, Code::ResourceExhausted),
            (
                ServiceError::PayloadTooLong { length: 9, max: 8 },
                Code::InvalidArgument,
            ),
            (ServiceError::HmacNotConfigured, Code::FailedPrecondition),
            (
                ServiceError::PermissionDenied("publish to channel 3".into()),
                Code::PermissionDenied,
            ),
            (ServiceError::ShuttingDown, Code::Unavailable),
        ];
        for (error, code) in cases {
            let status = Status::from(error);
            assert_eq!(status.code(), code);
            assert!(!status.message().is_empty());
        }
    }

    #[test]
    fn a_stream_mismatch_names_the_current_stream() {
        let status = Status::from(ServiceError::StreamMismatch {
            requested: "old".into(),
            current: "new-id".into(),
        });
        assert!(status.message().contains("new-id"));
        assert!(status.message().contains("first_sequence"));
    }
}
