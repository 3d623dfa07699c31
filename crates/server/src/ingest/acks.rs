//! Producer acknowledgements on a TCP connection (SPEC §9): once a frame
//! asks for them (flag bit 1), the connection tells the producer, in
//! 28-byte `PA` records, how many of its frames are settled — accepted and
//! durable, or rejected.
//!
//! Settlement follows the order of the frames: a batch's frames settle when
//! its accepted packets are durable (the hub's durable end passes them; in
//! cluster mode, when JetStream has acknowledged the batch). A
//! separate task writes the records, coalesced to one per `COALESCE` at
//! most, so a producer that never reads them holds one 28-byte record of
//! ours, never the connection's read side.

use std::{collections::VecDeque, time::Duration};

use packet_ingest_protocol::ack::Ack;
use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    sync::watch,
    task::JoinHandle,
};

use crate::{outlet::Durable, producer::Published};

/// Acknowledgements are written at most this often (and at least this soon).
const COALESCE: Duration = Duration::from_millis(10);
/// How long a closing connection waits for its last record to be written.
const LAST_WRITE: Duration = Duration::from_secs(5);

/// A published batch whose frames are not settled yet.
struct Unsettled {
    /// Frames of this connection up to and including this batch.
    frames_end: u64,
    durable_at: u64,
    last_sequence: Option<u64>,
    rejected_total: u64,
}

/// One connection's acknowledgement state.
pub(super) struct Acks<W> {
    /// The write half, until acknowledgements are asked for.
    write: Option<W>,
    durable: Option<Durable>,
    state: watch::Sender<Ack>,
    task: Option<JoinHandle<()>>,
    pending: VecDeque<Unsettled>,
    frames: u64,
    rejected: u64,
    /// A batch was dropped (outlet failure): nothing after it ever settles.
    stuck: bool,
}

impl<W: AsyncWrite + Unpin + Send + 'static> Acks<W> {
    pub(super) fn new(write: W, durable: Option<Durable>) -> Self {
        Acks {
            write: Some(write),
            durable,
            state: watch::Sender::new(Ack::default()),
            task: None,
            pending: VecDeque::new(),
            frames: 0,
            rejected: 0,
            stuck: false,
        }
    }

    /// Starts writing acknowledgements (the producer asked for them).
    pub(super) fn enable(&mut self) {
        if let Some(write) = self.write.take() {
            self.task = Some(tokio::spawn(write_acks(write, self.state.subscribe())));
        }
    }

    /// Records a published batch; settles what is already durable.
    pub(super) fn note(&mut self, published: &Published) {
        self.frames += published.frames;
        self.rejected += published.rejected;
        if published.dropped {
            self.stuck = true;
        }
        if self.stuck {
            return;
        }
        self.pending.push_back(Unsettled {
            frames_end: self.frames,
            durable_at: published.durable_at.unwrap_or(0),
            last_sequence: published.last_sequence,
            rejected_total: self.rejected,
        });
        self.settle();
    }

    pub(super) fn has_pending(&self) -> bool {
        !self.pending.is_empty() && self.durable.is_some()
    }

    /// Waits until the durable end moves (only while something is pending).
    pub(super) async fn durable_moved(&mut self) {
        let changed = match &mut self.durable {
            Some(Durable::Hub(durable)) => durable.changed().await,
            Some(Durable::Cluster(stored)) => stored.changed().await,
            None => std::future::pending().await,
        };
        if changed.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Settles every pending batch the durable end has passed.
    pub(super) fn settle(&mut self) {
        // In cluster mode a batch's sequences are known only once stored:
        // the settled frames' last sequence is the connection's last stored.
        let (durable, stored_last) = match &self.durable {
            None => (u64::MAX, None),
            Some(Durable::Hub(durable)) => (*durable.borrow(), None),
            Some(Durable::Cluster(stored)) => {
                let stored = stored.borrow();
                (stored.batches, Some(stored.last_sequence))
            }
        };
        let mut settled = None;
        while let Some(front) = self.pending.front() {
            if front.durable_at > durable {
                break;
            }
            settled = self.pending.pop_front();
        }
        if let Some(batch) = settled {
            self.state.send_replace(Ack {
                settled: batch.frames_end,
                last_sequence: stored_last.unwrap_or(batch.last_sequence).unwrap_or(0),
                rejected: batch.rejected_total,
            });
        }
    }

    /// Sends the last state and waits (bounded) for it to be written.
    pub(super) async fn finish(self) {
        let Acks { state, task, .. } = self;
        drop(state);
        if let Some(task) = task {
            let _ = tokio::time::timeout(LAST_WRITE, task).await;
        }
    }
}

/// Writes the newest acknowledgement whenever it changes, at most one per
/// `COALESCE`; the last one is written when the connection is done.
async fn write_acks<W: AsyncWrite + Unpin>(mut write: W, mut state: watch::Receiver<Ack>) {
    let mut written = Ack::default();
    loop {
        let open = state.changed().await.is_ok();
        let ack = *state.borrow_and_update();
        if ack != written {
            if write.write_all(&ack.encode()).await.is_err() {
                return;
            }
            written = ack;
        }
        if !open {
            let _ = write.flush().await;
            return;
        }
        tokio::time::sleep(COALESCE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use packet_ingest_protocol::ack::ACK_LEN;
    use tokio::io::AsyncReadExt;

    fn published(
        frames: u64,
        rejected: u64,
        last: Option<u64>,
        durable_at: Option<u64>,
    ) -> Published {
        Published {
            frames,
            rejected,
            last_sequence: last,
            durable_at,
            dropped: false,
        }
    }

    async fn last_record(read: &mut tokio::io::DuplexStream) -> Ack {
        let mut record = [0u8; ACK_LEN];
        read.read_exact(&mut record).await.expect("a record");
        Ack::decode(&record).expect("valid record")
    }

    #[tokio::test]
    async fn frames_settle_in_order_once_durable() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let (durable_tx, durable_rx) = watch::channel(1u64);
        let mut acks = Acks::new(ours, Some(Durable::Hub(durable_rx)));
        acks.enable();
        acks.note(&published(3, 1, Some(2), Some(3)));
        acks.note(&published(2, 0, Some(4), Some(5)));
        assert!(acks.has_pending());
        durable_tx.send_replace(3);
        acks.settle();
        assert_eq!(
            last_record(&mut theirs).await,
            Ack {
                settled: 3,
                last_sequence: 2,
                rejected: 1
            }
        );
        durable_tx.send_replace(5);
        acks.settle();
        assert!(!acks.has_pending());
        acks.finish().await;
        assert_eq!(
            last_record(&mut theirs).await,
            Ack {
                settled: 5,
                last_sequence: 4,
                rejected: 1
            }
        );
    }

    #[tokio::test]
    async fn a_dropped_batch_stops_settlement() {
        let (ours, _theirs) = tokio::io::duplex(1024);
        let mut acks = Acks::new(ours, None);
        acks.note(&published(1, 0, Some(1), None));
        let mut dropped = published(5, 0, Some(1), None);
        dropped.dropped = true;
        acks.note(&dropped);
        acks.note(&published(1, 0, Some(2), None));
        assert_eq!(acks.state.borrow().settled, 1);
    }
}
