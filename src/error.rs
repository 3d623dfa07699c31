//! Errors a client can cause or observe, and the one place they become gRPC
//! status codes. Every message says what happened and what to do about it.

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
    #[error("payload of {length} bytes is over the limit of {max} bytes (--max-payload); packets before it were accepted")]
    PayloadTooLong { length: usize, max: u32 },
    #[error("request message is over the size limit (payload at most {max} bytes, --max-payload); packets before it were accepted")]
    MessageTooLarge { max: u32 },
    #[error("packet is HMAC-flagged but this server has no HMAC key (--hmac-key-file); packets before it were accepted")]
    HmacNotConfigured,
    #[error("the server is shutting down; reconnect to another replica or retry")]
    ShuttingDown,
    #[error("packets could not be stored in the cluster stream: {0}; packets before them were accepted, retry the rest")]
    Cluster(#[from] crate::cluster::ClusterError),
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Status {
        let code = match &error {
            ServiceError::Subscribe(SubscribeError::OutOfRange { .. }) => Code::OutOfRange,
            ServiceError::Subscribe(SubscribeError::ShuttingDown) => Code::Unavailable,
            ServiceError::SubscriptionEnded(SubscriptionEnd::ShuttingDown) => Code::Unavailable,
            ServiceError::SubscriptionEnded(
                SubscriptionEnd::Lagged { .. } | SubscriptionEnd::Stuck(_),
            ) => Code::ResourceExhausted,
            ServiceError::TooManySubscribers { .. } => Code::ResourceExhausted,
            ServiceError::PayloadTooLong { .. } | ServiceError::MessageTooLarge { .. } => {
                Code::InvalidArgument
            }
            ServiceError::HmacNotConfigured => Code::FailedPrecondition,
            ServiceError::ShuttingDown | ServiceError::Cluster(_) => Code::Unavailable,
        };
        Status::new(code, error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
                ServiceError::TooManySubscribers { limit: 1 },
                Code::ResourceExhausted,
            ),
            (
                ServiceError::PayloadTooLong { length: 9, max: 8 },
                Code::InvalidArgument,
            ),
            (ServiceError::ShuttingDown, Code::Unavailable),
        ];
        for (error, code) in cases {
            let status = Status::from(error);
            assert_eq!(status.code(), code);
            assert!(!status.message().is_empty());
        }
    }
}
