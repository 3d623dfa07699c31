//! The producer side of cluster mode: each connection's pipelined, in-order,
//! deduplicated publishing to JetStream (the cluster `Outlet`).

use std::{collections::VecDeque, sync::Arc, time::Duration};

use async_nats::{
    header::{HeaderMap, NATS_MESSAGE_ID},
    jetstream::context::PublishAckFuture,
};
use bytes::Bytes;

use super::{subject, Cluster, ClusterError, MAX_IN_FLIGHT, PUBLISH_ATTEMPTS};
use crate::wire::EncodedPackets;

/// Per-connection publishing: pipelined, acknowledged in order, retried by id.
pub struct ClusterPublisher {
    cluster: Arc<Cluster>,
    connection: u64,
    in_flight: VecDeque<Pending>,
    last_sequence: Option<u64>,
}

struct Pending {
    ack: PublishAckFuture,
    subject: String,
    message_id: String,
    body: Bytes,
}

impl ClusterPublisher {
    pub(super) fn new(cluster: Arc<Cluster>, connection: u64) -> Self {
        ClusterPublisher {
            cluster,
            connection,
            in_flight: VecDeque::new(),
            last_sequence: None,
        }
    }

    /// Sends every accepted packet of `batch`; waits only when too many acks are outstanding.
    /// `source_sequences[i]` is packet `i`'s index on its source (the dedupe id).
    pub async fn publish(
        &mut self,
        packets: &EncodedPackets,
        source_sequences: &[u64],
    ) -> Result<(), ClusterError> {
        for index in 0..packets.len() {
            let source_sequence = source_sequences.get(index).copied().unwrap_or_default();
            let message_id = format!(
                "{:x}.{}.{}",
                self.cluster.instance, self.connection, source_sequence
            );
            let subject = subject(packets.channel(index));
            let body = Bytes::copy_from_slice(packets.fields(index));
            let ack = self.send(&subject, &message_id, body.clone()).await?;
            self.in_flight.push_back(Pending {
                ack,
                subject,
                message_id,
                body,
            });
            while self.in_flight.len() > MAX_IN_FLIGHT {
                self.settle_oldest().await?;
            }
        }
        Ok(())
    }

    /// Waits for every outstanding ack; returns the last stored sequence.
    pub async fn finish(&mut self) -> Result<Option<u64>, ClusterError> {
        while !self.in_flight.is_empty() {
            self.settle_oldest().await?;
        }
        Ok(self.last_sequence)
    }

    async fn send(
        &self,
        subject: &str,
        message_id: &str,
        body: Bytes,
    ) -> Result<PublishAckFuture, ClusterError> {
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, message_id);
        self.cluster
            .jetstream
            .publish_with_headers(subject.to_owned(), headers, body)
            .await
            .map_err(|error| ClusterError::Publish(error.to_string()))
    }

    async fn settle_oldest(&mut self) -> Result<(), ClusterError> {
        let Some(pending) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let mut outcome = pending.ack.await.map_err(|error| error.to_string());
        let mut attempt = 1;
        while let Err(error) = &outcome {
            if attempt >= PUBLISH_ATTEMPTS {
                return Err(ClusterError::Publish(error.clone()));
            }
            tracing::debug!(%error, attempt, "JetStream publish not acknowledged; retrying with the same id");
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            attempt += 1;
            outcome = match self
                .send(&pending.subject, &pending.message_id, pending.body.clone())
                .await
            {
                Ok(ack) => ack.await.map_err(|error| error.to_string()),
                Err(error) => Err(error.to_string()),
            };
        }
        if let Ok(ack) = outcome {
            self.last_sequence = Some(ack.sequence);
        }
        Ok(())
    }
}
