//! The durable stream under `--data-dir` (SPEC §9): an append-only log of
//! numbered batches, stored exactly as they are delivered.
//!
//! The usual design (Kafka's log segments, the NATS file store): segment
//! files of records, each record one batch with a CRC32C, a sparse index per
//! segment, retention by deleting whole segments, and recovery that scans
//! only the tail of the last segment (so start-up time does not grow with the
//! log). Written by hand because the crates that offer an embedded log store
//! their own framing and would need the batch copied out of and back into
//! the delivered encoding; here a record *is* the delivered bytes, and a
//! catch-up read hands slices of one large read straight to subscribers.
//!
//! The hub drives this module (see `hub::persist`): one writer task appends
//! what the hub numbered, and subscribers that are behind the memory ring read
//! from here. This module knows nothing of either.
//!
//! - [`segment`]: the record format, appending, reading, the tail scan.
//! - this module: the directory (lock, stream id, segment list), the writer
//!   (rolling, syncing, retention) and reads by sequence.

pub mod segment;

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use bytes::Bytes;

use crate::{metrics::Metrics, wire::SequencedBatch};
pub use segment::LogIo;
use segment::{RecordError, SegmentWriter};

/// When appended batches are made durable (SPEC §9).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FsyncPolicy {
    /// fsync after every write: acknowledged packets survive a power loss.
    Always,
    /// fsync every `--fsync-interval` (group commit): acknowledged packets
    /// survive a power loss; acknowledgements wait for the next fsync.
    Interval,
    /// Never fsync: acknowledged packets survive `kill -9` (they are in the
    /// kernel), not a power loss.
    Never,
}

#[derive(Clone, Debug)]
pub struct LogOptions {
    pub dir: PathBuf,
    /// A segment is closed and a new one started past this size.
    pub segment_bytes: u64,
    pub retention_bytes: Option<u64>,
    pub retention_age: Option<Duration>,
    pub fsync: FsyncPolicy,
    pub fsync_interval: Duration,
    pub io: LogIo,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("--data-dir {dir} is in use by another packet-ingest ({holder}); stop it first or use another directory")]
    Locked { dir: PathBuf, holder: String },
    #[error("--data-dir {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("--data-dir {dir}: segment {segment} cannot be recovered: {source}")]
    Recovery {
        dir: PathBuf,
        segment: u64,
        source: RecordError,
    },
}

/// One segment as the log keeps track of it.
#[derive(Clone, Copy, Debug)]
struct SegmentMeta {
    first_sequence: u64,
    /// One past its last sequence (what the writer has flushed, for the active one).
    end_sequence: u64,
    len: u64,
    /// When it was last written (retention by age).
    modified: SystemTime,
}

/// The shared, read side of the log.
pub struct Log {
    options: LogOptions,
    stream_id: String,
    segments: RwLock<Vec<SegmentMeta>>,
    metrics: Arc<Metrics>,
    /// Holds the directory lock while the process lives.
    _lock: File,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.options.dir)
            .field("stream_id", &self.stream_id)
            .finish()
    }
}

/// A log just opened: the shared handle, its only writer, and what recovery did.
pub struct Opened {
    pub log: Arc<Log>,
    pub writer: LogWriter,
    /// The sequence the next accepted packet gets.
    pub next_sequence: u64,
    pub truncated_bytes: u64,
    /// Bytes recovery read to find the valid end (see `segment::Recovered`).
    pub scanned_bytes: u64,
}

const LOCK_FILE: &str = "LOCK";
const STREAM_ID_FILE: &str = "stream-id";

/// Takes the directory's lock; a second process gets the holder's name.
fn lock(dir: &Path) -> Result<File, LogError> {
    let io = |source| LogError::Io {
        dir: dir.to_owned(),
        source,
    };
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(LogError::Locked {
                dir: dir.to_owned(),
                holder: match holder.trim() {
                    "" => "holder unknown".to_owned(),
                    holder => holder.to_owned(),
                },
            });
        }
        Err(std::fs::TryLockError::Error(error)) => return Err(io(error)),
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    file.set_len(0).map_err(io)?;
    file.write_all_at(
        format!("pid {} on {}", std::process::id(), host.trim()).as_bytes(),
        0,
    )
    .map_err(io)?;
    Ok(file)
}

/// The directory's stream id, created with it (SPEC §7).
fn stream_id(dir: &Path) -> Result<String, LogError> {
    let path = dir.join(STREAM_ID_FILE);
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() && id.len() <= 64 {
            return Ok(id.to_owned());
        }
    }
    let random: u128 = rand::random();
    let id = format!("disk-{random:032x}");
    // Written whole then renamed, so a crash never leaves half an id.
    let temporary = dir.join(format!("{STREAM_ID_FILE}.tmp"));
    let io = |source| LogError::Io {
        dir: dir.to_owned(),
        source,
    };
    let mut file = File::create(&temporary).map_err(io)?;
    file.write_all(id.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&temporary, &path).map_err(io)?;
    File::open(dir).and_then(|dir| dir.sync_all()).map_err(io)?;
    Ok(id)
}

impl Log {
    /// Opens (or creates) the log in `options.dir`: takes the lock, reads the
    /// stream id, lists the segments and recovers the last one's tail.
    pub fn open(options: LogOptions, metrics: Arc<Metrics>) -> Result<Opened, LogError> {
        let dir = options.dir.clone();
        let io = |source| LogError::Io {
            dir: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let lock = lock(&dir)?;
        let stream_id = stream_id(&dir)?;
        let mut firsts: Vec<u64> = std::fs::read_dir(&dir)
            .map_err(io)?
            .filter_map(|entry| segment::parse_name(&entry.ok()?.file_name().to_string_lossy()))
            .collect();
        firsts.sort_unstable();
        let mut segments = Vec::with_capacity(firsts.len());
        for (position, first) in firsts.iter().enumerate() {
            let metadata = std::fs::metadata(segment::log_path(&dir, *first)).map_err(io)?;
            // A sealed segment ends where the next begins.
            let end = firsts.get(position + 1).copied().unwrap_or(*first);
            segments.push(SegmentMeta {
                first_sequence: *first,
                end_sequence: end,
                len: metadata.len(),
                modified: metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
        let (writer_segment, truncated_bytes, scanned_bytes) = match segments.last_mut() {
            Some(last) => {
                let recovered =
                    segment::recover_tail(&dir, last.first_sequence).map_err(|source| {
                        LogError::Recovery {
                            dir: dir.clone(),
                            segment: last.first_sequence,
                            source,
                        }
                    })?;
                last.end_sequence = recovered.end_sequence;
                last.len = recovered.len;
                let writer = SegmentWriter::reopen(&dir, &recovered, options.io).map_err(io)?;
                (writer, recovered.truncated_bytes, recovered.scanned_bytes)
            }
            None => {
                let writer = SegmentWriter::create(&dir, 1, options.io).map_err(io)?;
                segments.push(SegmentMeta {
                    first_sequence: 1,
                    end_sequence: 1,
                    len: 0,
                    modified: SystemTime::now(),
                });
                (writer, 0, 0)
            }
        };
        if truncated_bytes > 0 {
            tracing::warn!(
                bytes = truncated_bytes,
                segment = writer_segment.first_sequence,
                "cut a torn tail off the log (a write the last run did not finish)"
            );
            metrics.log_truncated_bytes.inc_by(truncated_bytes);
        }
        let next_sequence = writer_segment.end_sequence;
        metrics.log_recovery_scanned_bytes.set(scanned_bytes as i64);
        tracing::info!(
            dir = %dir.display(),
            segments = segments.len(),
            next_sequence,
            scanned_bytes,
            truncated_bytes,
            direct_io = writer_segment.direct(),
            "log opened"
        );
        let log = Arc::new(Log {
            options,
            stream_id,
            segments: RwLock::new(segments),
            metrics,
            _lock: lock,
        });
        log.publish_gauges();
        let writer = LogWriter {
            log: Arc::clone(&log),
            undo: (writer_segment.len, writer_segment.end_sequence),
            synced: (writer_segment.len, writer_segment.end_sequence),
            sync_failed: false,
            active: writer_segment,
            #[cfg(test)]
            failing_syncs: Arc::default(),
            #[cfg(test)]
            sync_gate: Arc::default(),
        };
        Ok(Opened {
            log,
            writer,
            next_sequence,
            truncated_bytes,
            scanned_bytes,
        })
    }

    pub fn stream_id(&self) -> &str {
        &self.stream_id
    }

    pub fn options(&self) -> &LogOptions {
        &self.options
    }

    fn segments(&self) -> std::sync::RwLockReadGuard<'_, Vec<SegmentMeta>> {
        self.segments
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The oldest sequence still on disk.
    pub fn first_sequence(&self) -> u64 {
        self.segments()
            .first()
            .map_or(1, |segment| segment.first_sequence)
    }

    /// One past the newest sequence written.
    pub fn end_sequence(&self) -> u64 {
        self.segments()
            .last()
            .map_or(1, |segment| segment.end_sequence)
    }

    /// When the oldest packet on disk was received (0 if none).
    pub fn oldest_received_unix_nanos(&self) -> i64 {
        let Some(first) = self.segments().first().copied() else {
            return 0;
        };
        let path = segment::log_path(&self.options.dir, first.first_sequence);
        let mut header = [0u8; segment::HEADER_LEN];
        match File::open(path).and_then(|file| file.read_exact_at(&mut header, 0)) {
            Ok(()) => i64::from_be_bytes([
                header[24], header[25], header[26], header[27], header[28], header[29], header[30],
                header[31],
            ]),
            Err(_) => 0,
        }
    }

    pub fn retained_bytes(&self) -> u64 {
        self.segments().iter().map(|segment| segment.len).sum()
    }

    fn publish_gauges(&self) {
        let segments = self.segments();
        self.metrics
            .log_bytes
            .set(segments.iter().map(|segment| segment.len).sum::<u64>() as i64);
        self.metrics.log_segments.set(segments.len() as i64);
        self.metrics
            .log_first_sequence
            .set(segments.first().map_or(1, |segment| segment.first_sequence) as i64);
    }

    /// Reads batches from `from` on, about `max_bytes` of them (at least one
    /// record), from one segment. Blocking: call it off the reactor.
    pub fn read(&self, from: u64, max_bytes: usize) -> Result<LogRead, std::io::Error> {
        let (segment, next_first) = {
            let segments = self.segments();
            let position = segments.partition_point(|segment| segment.end_sequence <= from);
            match segments.get(position) {
                None => {
                    return Ok(LogRead {
                        batches: Vec::new(),
                        skipped: 0,
                        resume_at: from,
                    })
                }
                Some(segment) if segment.first_sequence > from => {
                    // Deleted by retention: skip to what is left.
                    return Ok(LogRead {
                        batches: Vec::new(),
                        skipped: segment.first_sequence - from,
                        resume_at: segment.first_sequence,
                    });
                }
                Some(segment) => (
                    *segment,
                    segments.get(position + 1).map(|next| next.first_sequence),
                ),
            }
        };
        let dir = &self.options.dir;
        let file = match File::open(segment::log_path(dir, segment.first_sequence)) {
            Ok(file) => file,
            // Retention removed it since: what follows is still there.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let resume_at = next_first.unwrap_or(segment.end_sequence);
                return Ok(LogRead {
                    batches: Vec::new(),
                    skipped: resume_at.saturating_sub(from),
                    resume_at,
                });
            }
            Err(error) => return Err(error),
        };
        let index = segment::read_index(dir, segment.first_sequence, segment.len);
        // Where the read starts, and the sequence its first record starts with.
        let (mut offset, mut expected) = index
            .partition_point(|(sequence, _)| *sequence <= from)
            .checked_sub(1)
            .map_or((0, segment.first_sequence), |position| {
                (index[position].1, index[position].0)
            });
        // One large sequential read; records are sliced out of it.
        let want = (max_bytes as u64)
            .max(1 << 16)
            .min(segment.len - offset.min(segment.len));
        let mut buf = Vec::with_capacity(want as usize);
        let got = read_fully_at(&file, &mut buf, offset, want)?;
        // Only the log's newest bytes stay cached (see `segment::drop_cached`).
        let read_end = offset + got as u64;
        if next_first.is_some() || read_end + segment::CACHED_TAIL <= segment.len {
            segment::drop_cached(&file, offset, read_end);
        }
        self.metrics.log_read_bytes.inc_by(got as u64);
        buf.truncate(got);
        let mut chunk = Bytes::from(buf);
        let mut read = LogRead {
            batches: Vec::new(),
            skipped: 0,
            resume_at: from,
        };
        while offset < segment.len {
            let decoded = match segment::decode_record(&chunk, offset) {
                Err(RecordError::Truncated { .. }) if read.batches.is_empty() => {
                    // A record larger than what was read: read it alone. Whole
                    // records end at `segment.len`, so one that runs past it
                    // has a damaged length: corruption, not a short read.
                    match segment::read_record_at(&file, offset, segment.len) {
                        Err(RecordError::Truncated { offset }) => {
                            Err(RecordError::BadHeader { offset })
                        }
                        decoded => decoded,
                    }
                }
                decoded => decoded,
            };
            match decoded {
                Ok((batch, len)) => {
                    offset += len as u64;
                    // Sequences missing between records (the writer refuses
                    // gaps, so only a damaged log has one) are reported as
                    // missed, never skipped silently.
                    let wanted_from = read.resume_at;
                    if read.skip_to(batch.first_sequence) > 0 {
                        self.metrics.log_corrupt_records.inc();
                        tracing::error!(
                            segment = segment.first_sequence,
                            lost = ?(wanted_from..batch.first_sequence),
                            "the log skips sequences"
                        );
                    }
                    expected = batch.end_sequence();
                    if chunk.len() >= len {
                        let _ = chunk.split_to(len);
                    } else {
                        chunk.clear();
                    }
                    if batch.end_sequence() > from {
                        read.resume_at = batch.end_sequence();
                        read.batches.push(batch);
                    }
                }
                // The read ended mid-record: the next read starts there.
                Err(RecordError::Truncated { .. }) => break,
                // Corruption after some good records: deliver those first;
                // the next read starts at the damaged record, so the loss is
                // reported (`missed`) with the packets that follow it.
                Err(_) if !read.batches.is_empty() => break,
                Err(error) => {
                    // Corruption: report it, never deliver it, go on after it.
                    // If its header still gives its length and the record
                    // there is intact and continues the numbering, only this
                    // record is lost: skip exactly its sequences.
                    let resync = segment::intact_record_after(&file, offset, segment.len)
                        .filter(|(_, next)| *next > expected && *next <= segment.end_sequence);
                    if let Some((next_offset, next)) = resync {
                        // Reported once per reader that wanted it (a later read
                        // from an index entry before it passes it silently).
                        if read.skip_to(next) > 0 {
                            self.metrics.log_corrupt_records.inc();
                            tracing::error!(
                                %error,
                                segment = segment.first_sequence,
                                lost = ?(expected..next),
                                "log record fails its checks; skipping it"
                            );
                        }
                        let len = (next_offset - offset) as usize;
                        if chunk.len() >= len {
                            let _ = chunk.split_to(len);
                        } else {
                            chunk.clear();
                        }
                        offset = next_offset;
                        expected = next;
                        continue;
                    }
                    self.metrics.log_corrupt_records.inc();
                    let resume_at = index
                        .iter()
                        .find(|(_, at)| *at > offset)
                        .map(|(sequence, _)| *sequence)
                        .or(next_first)
                        .unwrap_or(segment.end_sequence);
                    tracing::error!(
                        %error,
                        segment = segment.first_sequence,
                        skipped_to = resume_at,
                        "log record fails its checks; skipping it"
                    );
                    read.skip_to(resume_at);
                    break;
                }
            }
            if chunk.is_empty() && !read.batches.is_empty() {
                break;
            }
        }
        if offset >= segment.len && read.batches.is_empty() && read.resume_at == from {
            // The segment's records end before the sequences it stands for
            // (a damaged log): report the rest of it as missed, or the reader
            // would ask for the same sequence forever.
            let resume_at = next_first.unwrap_or(segment.end_sequence);
            if read.skip_to(resume_at) > 0 {
                self.metrics.log_corrupt_records.inc();
                tracing::error!(
                    segment = segment.first_sequence,
                    lost = ?(from..resume_at),
                    "the log's segment ends early"
                );
            }
        }
        Ok(read)
    }
}

/// Reads `len` bytes at `offset` into `buf`'s spare capacity, fewer if the
/// file ends first. `read_to_end` reads straight into the spare capacity
/// without zeroing it first (a 4 MiB memset per catch-up read otherwise).
fn read_fully_at(file: &File, buf: &mut Vec<u8>, offset: u64, len: u64) -> std::io::Result<usize> {
    let mut reader = file;
    reader.seek(SeekFrom::Start(offset))?;
    reader.take(len).read_to_end(buf)
}

/// What one `Log::read` found.
#[derive(Debug, Default)]
pub struct LogRead {
    /// Whole batches; the first may start before the sequence asked for.
    pub batches: Vec<SequencedBatch>,
    /// Sequences that are gone (retention) or unreadable (corruption).
    pub skipped: u64,
    /// Where the next read continues.
    pub resume_at: u64,
}

impl LogRead {
    /// Reports everything from where this read stands up to `to` as lost
    /// (a damaged log); returns how many sequences that is (0 if none).
    fn skip_to(&mut self, to: u64) -> u64 {
        let lost = to.saturating_sub(self.resume_at);
        self.skipped += lost;
        self.resume_at = self.resume_at.max(to);
        lost
    }
}

/// Where an fsync started: the active segment (its first sequence), its
/// length and end sequence then.
#[derive(Clone, Copy, Debug)]
struct SyncPoint {
    segment: u64,
    len: u64,
    end_sequence: u64,
}

/// An fsync taken by `LogWriter::begin_sync`, to run on a blocking thread
/// beside the writer: deliveries wait for writes, never for the disk.
#[derive(Debug)]
pub struct SyncJob {
    file: File,
    point: SyncPoint,
    /// The range whose cached pages go once it is on disk (`drop_cached`).
    release: (u64, u64),
    #[cfg(test)]
    gate: Arc<SyncGate>,
}

/// What a `SyncJob` found, for `LogWriter::finish_sync`.
#[derive(Debug)]
pub struct SyncDone {
    point: SyncPoint,
    result: std::io::Result<()>,
    /// Where the cached pages were released up to, if `result` is `Ok`.
    released_to: u64,
}

impl SyncJob {
    /// fsyncs, then releases the cached pages that are now on disk.
    pub fn run(self) -> SyncDone {
        #[cfg(test)]
        self.gate.pass();
        let result = self.file.sync_data();
        if result.is_ok() {
            segment::drop_cached(&self.file, self.release.0, self.release.1);
        }
        SyncDone {
            point: self.point,
            result,
            released_to: self.release.1,
        }
    }
}

/// The only writer of the log, owned by the hub's writer task.
pub struct LogWriter {
    log: Arc<Log>,
    active: SegmentWriter,
    /// Where the last `write` started in the active segment (len, end
    /// sequence): what `rollback` returns to.
    undo: (u64, u64),
    /// Where the active segment was when an fsync last succeeded (len, end
    /// sequence): what `rewind_to_synced` returns to.
    synced: (u64, u64),
    /// An fsync failed since `take_sync_failed` was last asked (in `sync`,
    /// or in the one a segment roll does).
    sync_failed: bool,
    /// Tests: how many of the next syncs fail (as fsync can, with EIO).
    #[cfg(test)]
    pub failing_syncs: Arc<std::sync::atomic::AtomicU32>,
    /// Tests: holds background fsyncs (`SyncJob::run`) as a slow disk would.
    #[cfg(test)]
    pub sync_gate: Arc<SyncGate>,
}

/// Tests: a gate every background fsync passes before it starts; `hold`
/// keeps them waiting (a slow disk) until `release`.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct SyncGate {
    held: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
    /// Notified each time an fsync reaches the gate.
    pub reached: tokio::sync::Notify,
}

#[cfg(test)]
impl SyncGate {
    pub fn hold(&self) {
        *self
            .held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = true;
    }

    pub fn release(&self) {
        *self
            .held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = false;
        self.opened.notify_all();
    }

    fn pass(&self) {
        self.reached.notify_one();
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        while *held {
            held = self
                .opened
                .wait(held)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

impl LogWriter {
    pub fn log(&self) -> &Arc<Log> {
        &self.log
    }

    /// The sequence the next batch written must start with.
    pub fn end_sequence(&self) -> u64 {
        self.active.end_sequence
    }

    /// Appends batches from the front of `batches` and hands them to the
    /// kernel; returns the end sequence written, which may stop short of the
    /// last batch: one write never spans two segments (a full segment is
    /// closed at the start of the next write), so a failed write is undone
    /// within one file. On error, call `rollback`.
    pub fn write(&mut self, batches: &[Arc<SequencedBatch>]) -> std::io::Result<u64> {
        // Set before and after a roll: a failed roll leaves the old segment as it was.
        self.undo = (self.active.len, self.active.end_sequence);
        // A gap would be read back as a silent skip: refuse it (the writer
        // then pauses ingest and health says why). Checked before a roll, so
        // a new segment never starts past the old one's end.
        let mut end = self.active.end_sequence;
        for batch in batches {
            if batch.first_sequence != end {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "batch {} does not continue the log at {end}",
                        batch.first_sequence
                    ),
                ));
            }
            end = batch.end_sequence();
        }
        if !batches.is_empty() && self.active.len >= self.log.options.segment_bytes {
            self.roll()?;
            self.undo = (self.active.len, self.active.end_sequence);
        }
        let direct_before = self.active.direct_bytes();
        for batch in batches {
            if self.active.len >= self.log.options.segment_bytes {
                break;
            }
            self.active.append(batch)?;
        }
        self.active.flush()?;
        self.log
            .metrics
            .log_direct_write_bytes
            .inc_by(self.active.direct_bytes() - direct_before);
        self.publish_active();
        Ok(self.active.end_sequence)
    }

    /// The active segment's size and end, for readers and the gauges.
    fn publish_active(&self) {
        let mut segments = self
            .log
            .segments
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(last) = segments.last_mut() {
            last.end_sequence = self.active.end_sequence;
            last.len = self.active.len;
            last.modified = SystemTime::now();
        }
        drop(segments);
        self.log.publish_gauges();
    }

    /// Makes everything written survive a power loss.
    pub fn sync(&mut self) -> std::io::Result<()> {
        #[cfg(test)]
        self.inject_sync_failure()?;
        if let Err(error) = self.active.sync() {
            self.sync_failed = true;
            return Err(error);
        }
        self.synced = (self.active.len, self.active.end_sequence);
        Ok(())
    }

    /// Tests: fails this fsync if `failing_syncs` says so, as Linux may
    /// fail one: the pages of the failed writeback are lost.
    #[cfg(test)]
    fn inject_sync_failure(&mut self) -> std::io::Result<()> {
        let fails = self
            .failing_syncs
            .fetch_update(
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
                |left| left.checked_sub(1),
            )
            .is_ok();
        if !fails {
            return Ok(());
        }
        self.active.flush()?;
        self.active.lose_bytes_after(self.synced.0)?;
        self.sync_failed = true;
        Err(std::io::Error::other("injected fsync failure"))
    }

    /// Whether the next `write` starts a new segment (which fsyncs the
    /// active one first, on the writer's thread).
    pub fn needs_roll(&self) -> bool {
        self.active.len >= self.log.options.segment_bytes
    }

    /// Starts an fsync of everything written so far that runs on its own
    /// thread (`SyncJob::run`) while this writer goes on appending; hand
    /// its result to `finish_sync`. The caller must not `write` a segment
    /// roll while it runs (`needs_roll`): a roll's own fsync succeeding
    /// would hide this one failing.
    pub fn begin_sync(&mut self) -> std::io::Result<SyncJob> {
        let file = self.active.sync_handle()?;
        Ok(SyncJob {
            file,
            point: SyncPoint {
                segment: self.active.first_sequence,
                len: self.active.len,
                end_sequence: self.active.end_sequence,
            },
            release: (self.active.released(), self.active.release_after_sync()),
            #[cfg(test)]
            gate: Arc::clone(&self.sync_gate),
        })
    }

    /// Takes the result of a `SyncJob`: on success returns the sequence up
    /// to which the log is now durable. On failure it is as if `sync` had
    /// failed (`take_sync_failed`, then `rewind_to_synced`).
    pub fn finish_sync(&mut self, done: SyncDone) -> std::io::Result<u64> {
        #[cfg(test)]
        self.inject_sync_failure()?;
        if let Err(error) = done.result {
            self.sync_failed = true;
            return Err(error);
        }
        let point = done.point;
        if point.segment == self.active.first_sequence && point.len >= self.synced.0 {
            self.synced = (point.len, point.end_sequence);
            self.active.note_released(done.released_to);
        }
        Ok(point.end_sequence)
    }

    /// Whether an fsync failed since the last call: then what was written
    /// since the last good one must be written again (`rewind_to_synced`).
    pub fn take_sync_failed(&mut self) -> bool {
        std::mem::take(&mut self.sync_failed)
    }

    /// Undoes the last `write` (it or the sync right after it failed): its
    /// bytes are dropped from the active segment, so retrying it appends them
    /// once. Only after a `write`: what earlier writes appended is already
    /// readable and must stay.
    pub fn rollback(&mut self) -> std::io::Result<()> {
        self.cut_back_to(self.undo)
    }

    /// Cuts the active segment back to `(len, end sequence)` and tells readers.
    fn cut_back_to(&mut self, (len, end_sequence): (u64, u64)) -> std::io::Result<()> {
        let result = self.active.truncate_to(len, end_sequence);
        self.publish_active();
        result
    }

    /// After a failed fsync: what was written since the last good one may
    /// not be on disk, and a later fsync that succeeds would not say so
    /// (Linux may drop the pages of a failed writeback). It is cut from the
    /// active segment, to be written again. Returns the sequence to write
    /// from (even if cutting the file fails, the next write lands there).
    pub fn rewind_to_synced(&mut self) -> u64 {
        if let Err(error) = self.cut_back_to(self.synced) {
            tracing::error!(%error, "cannot cut the log back to its last fsync");
        }
        self.undo = self.synced;
        self.synced.1
    }

    /// Closes the active segment and starts the next at its end.
    fn roll(&mut self) -> std::io::Result<()> {
        let first_sequence = self.active.end_sequence;
        // The old segment is complete on disk before the new one exists.
        self.sync()?;
        self.active.release_cached(self.active.len);
        let next =
            SegmentWriter::create(&self.log.options.dir, first_sequence, self.log.options.io)?;
        File::open(&self.log.options.dir)?.sync_all()?;
        self.active = next;
        self.synced = (0, first_sequence);
        let mut segments = self
            .log
            .segments
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        segments.push(SegmentMeta {
            first_sequence,
            end_sequence: first_sequence,
            len: 0,
            modified: SystemTime::now(),
        });
        Ok(())
    }

    /// Deletes whole segments, oldest first, beyond `--retention-bytes` or
    /// older than `--retention-age`; never the active one. Returns how many.
    pub fn apply_retention(&mut self) -> usize {
        let options = &self.log.options;
        let now = SystemTime::now();
        let mut removed = Vec::new();
        {
            let mut segments = self
                .log
                .segments
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let mut total: u64 = segments.iter().map(|segment| segment.len).sum();
            while segments.len() > 1 {
                let oldest = segments[0];
                let over_bytes = options.retention_bytes.is_some_and(|limit| total > limit);
                let too_old = options.retention_age.is_some_and(|age| {
                    now.duration_since(oldest.modified).unwrap_or_default() > age
                });
                if !(over_bytes || too_old) {
                    break;
                }
                total -= oldest.len;
                removed.push(segments.remove(0));
            }
        }
        for segment in &removed {
            // Readers with the file open keep reading it; new readers skip it.
            let _ = std::fs::remove_file(segment::log_path(&options.dir, segment.first_sequence));
            let _ = std::fs::remove_file(segment::index_path(&options.dir, segment.first_sequence));
            tracing::info!(
                first = segment.first_sequence,
                end = segment.end_sequence,
                bytes = segment.len,
                "retention deleted a log segment"
            );
        }
        if !removed.is_empty() {
            self.log.publish_gauges();
        }
        removed.len()
    }
}

#[cfg(test)]
mod tests;
