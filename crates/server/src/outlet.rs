//! Where a producer's verified batches go: the local hub, or (cluster mode)
//! the shared JetStream stream, which feeds every replica's hub. Producers
//! hold an `Outlet` and never know which; cluster mode plugs in here and
//! nowhere else on a packet's path.

use std::sync::Arc;

use crate::{
    cluster::{Cluster, ClusterError, ClusterPublisher},
    hub::Hub,
    wire::EncodedPackets,
};

/// Why an outlet could not take a batch.
pub type OutletError = ClusterError;

/// Where verified packets go: the local hub, or the shared JetStream stream.
#[derive(Clone)]
pub enum Destination {
    Hub(Arc<Hub>),
    Cluster(Arc<Cluster>),
}

impl Destination {
    /// Per-connection publishing state.
    pub fn outlet(&self) -> Outlet {
        match self {
            Destination::Hub(hub) => Outlet::Hub {
                hub: Arc::clone(hub),
                last_sequence: None,
            },
            Destination::Cluster(cluster) => Outlet::Cluster(cluster.publisher()),
        }
    }
}

/// One producer's way into the hub (directly or through JetStream), in order.
pub enum Outlet {
    Hub {
        hub: Arc<Hub>,
        last_sequence: Option<u64>,
    },
    Cluster(ClusterPublisher),
}

impl Outlet {
    /// Publishes a verified batch's accepted packets (`source_sequences[i]`
    /// is packet `i`'s index on its source). May wait: that is backpressure.
    /// Returns the last sequence assigned, when already known.
    pub async fn publish(
        &mut self,
        accepted: EncodedPackets,
        source_sequences: &[u64],
    ) -> Result<Option<u64>, ClusterError> {
        match self {
            Outlet::Hub { hub, last_sequence } => {
                let range = hub.publish(accepted).await;
                if !range.is_empty() {
                    *last_sequence = Some(range.end - 1);
                }
                Ok(*last_sequence)
            }
            Outlet::Cluster(publisher) => publisher
                .publish(&accepted, source_sequences)
                .await
                .map(|()| None),
        }
    }

    /// Waits until everything published is stored; the last sequence assigned.
    pub async fn finish(&mut self) -> Result<Option<u64>, ClusterError> {
        match self {
            Outlet::Hub { last_sequence, .. } => Ok(*last_sequence),
            Outlet::Cluster(publisher) => publisher.finish().await,
        }
    }
}
