//! Stream identity (SPEC §7): which stream a server serves, so a client that
//! resumes can tell a continuation of its stream from a different one.

use std::sync::Arc;

/// Which stream this server serves (SPEC §7).
#[derive(Clone, Debug)]
pub struct StreamIdentity {
    pub id: Arc<str>,
    /// Survives restarts (`--data-dir` or cluster mode).
    pub durable: bool,
}

impl StreamIdentity {
    /// A new random id: memory mode, where every process start is a new stream.
    pub fn ephemeral() -> Self {
        let random: u128 = rand::random();
        StreamIdentity {
            id: Arc::from(format!("mem-{random:032x}")),
            durable: false,
        }
    }
}
