//! Where a producer's verified batches go: the local hub, or (cluster mode)
//! the shared JetStream stream, which feeds every replica's hub. Producers
//! hold an `Outlet` and never know which; cluster mode plugs in here and
//! nowhere else on a packet's path.

use std::sync::Arc;

use tokio::sync::watch;

use crate::{
    cluster::{Cluster, ClusterError, ClusterPublisher, Placed, Stored},
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

/// How far a producer's packets are durable, for acknowledgements: the
/// hub's durable end (sequences), or in cluster mode what JetStream has
/// acknowledged of this producer's batches.
#[derive(Clone, Debug)]
pub enum Durable {
    Hub(watch::Receiver<u64>),
    Cluster(watch::Receiver<Stored>),
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
    /// Publishes a verified batch's accepted packets. May wait: that is
    /// backpressure. Says where the batch stands: the last sequence known
    /// and what `durable()` must reach for the batch to be durable.
    pub async fn publish(&mut self, accepted: EncodedPackets) -> Result<Placed, ClusterError> {
        match self {
            Outlet::Hub { hub, last_sequence } => {
                let range = hub.publish(accepted).await;
                let durable_at = (!range.is_empty()).then_some(range.end);
                if !range.is_empty() {
                    *last_sequence = Some(range.end - 1);
                }
                Ok(Placed {
                    last_sequence: *last_sequence,
                    durable_at,
                })
            }
            Outlet::Cluster(publisher) => publisher.publish(accepted).await,
        }
    }

    /// What acknowledgements wait on.
    pub fn durable(&self) -> Durable {
        match self {
            Outlet::Hub { hub, .. } => Durable::Hub(hub.durable()),
            Outlet::Cluster(publisher) => Durable::Cluster(publisher.progress()),
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
