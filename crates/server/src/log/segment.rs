//! One segment of the log: its record format, appending, reading, and the
//! recovery scan of a segment's tail.
//!
//! A segment is `<first sequence, 20 digits>.log`, a run of records, each one
//! numbered batch exactly as it is delivered:
//!
//! ```text
//! offset size
//! 0      4    magic "PIL1"
//! 4      4    CRC32C of bytes 8..end of record
//! 8      4    packets in the batch
//! 12     4    body length
//! 16     8    first sequence
//! 24     8    received_unix_nanos of the oldest packet
//! 32     8×n  per packet: channel (u32), end offset of its record in the body (u32)
//! ..     len  body: the batch's `SubscribeResponse.packets` records
//! ```
//!
//! all integers big-endian. Next to it, `<first sequence>.idx` is a sparse
//! index: (first sequence, offset) of one record every `INDEX_EVERY` bytes,
//! so a read seeks close to any sequence and recovery scans only the tail.

use std::{
    fs::{File, OpenOptions},
    io::Read,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use bytes::Bytes;

use crate::{frame::Channel, wire::SequencedBatch};

pub const MAGIC: [u8; 4] = *b"PIL1";
pub const HEADER_LEN: usize = 32;
const ENTRY_LEN: usize = 8;
const INDEX_ENTRY_LEN: usize = 16;
/// Log bytes between two index entries.
pub const INDEX_EVERY: u64 = 64 * 1024;

pub fn log_path(dir: &Path, first_sequence: u64) -> PathBuf {
    dir.join(format!("{first_sequence:020}.log"))
}

pub fn index_path(dir: &Path, first_sequence: u64) -> PathBuf {
    dir.join(format!("{first_sequence:020}.idx"))
}

/// The first sequence a segment file name stands for.
pub fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    (digits.len() == 20).then(|| digits.parse().ok()).flatten()
}

/// A record's header, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub crc: u32,
    pub count: u32,
    pub body_len: u32,
    pub first_sequence: u64,
    pub received_unix_nanos: i64,
}

impl RecordHeader {
    pub fn record_len(&self) -> usize {
        HEADER_LEN + self.count as usize * ENTRY_LEN + self.body_len as usize
    }

    pub fn end_sequence(&self) -> u64 {
        self.first_sequence + u64::from(self.count)
    }

    fn parse(bytes: &[u8]) -> Option<RecordHeader> {
        if bytes.len() < HEADER_LEN || bytes[0..4] != MAGIC {
            return None;
        }
        let u32_at = |at: usize| {
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let u64_at = |at: usize| {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(raw)
        };
        let header = RecordHeader {
            crc: u32_at(4),
            count: u32_at(8),
            body_len: u32_at(12),
            first_sequence: u64_at(16),
            received_unix_nanos: u64_at(24) as i64,
        };
        (header.count > 0).then_some(header)
    }
}

/// Encodes a batch's header and entries (the body follows them as is).
pub fn encode_head(batch: &SequencedBatch) -> Vec<u8> {
    let count = batch.len();
    let mut head = Vec::with_capacity(HEADER_LEN + count * ENTRY_LEN);
    head.extend_from_slice(&MAGIC);
    head.extend_from_slice(&[0; 4]); // CRC, filled in below
    head.extend_from_slice(&(count as u32).to_be_bytes());
    head.extend_from_slice(&(batch.body().len() as u32).to_be_bytes());
    head.extend_from_slice(&batch.first_sequence.to_be_bytes());
    head.extend_from_slice(&batch.received_unix_nanos().to_be_bytes());
    for (channel, end) in batch.entries() {
        head.extend_from_slice(&channel.0.to_be_bytes());
        head.extend_from_slice(&end.to_be_bytes());
    }
    let crc = record_crc(&[&head[8..], batch.body()]);
    head[4..8].copy_from_slice(&crc.to_be_bytes());
    head
}

/// CRC-32C (Castagnoli) of `parts` one after the other: the record
/// checksum. `crc-fast` rather than the `crc32c` crate: where the CPU has
/// VPCLMULQDQ it folds 64 bytes an instruction, 2.2x the throughput on a
/// cached 16 KiB buffer here (54 against 23 GB/s). In the server, whose
/// batches are no longer in cache when the writer sums them, it took the
/// checksum from 4.4 % to 3.0 % of the CPU in a 1 KiB `--data-dir` profile.
/// Same function, so logs written before read back (tested against
/// `crc32c` below).
fn record_crc(parts: &[&[u8]]) -> u32 {
    let mut digest = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    for part in parts {
        digest.update(part);
    }
    // A 32-bit CRC in the low half.
    digest.finalize() as u32
}

/// Why a record could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record at offset {offset} is cut short")]
    Truncated { offset: u64 },
    #[error("record at offset {offset} has a bad header")]
    BadHeader { offset: u64 },
    #[error("record at offset {offset} fails its checksum")]
    Checksum { offset: u64 },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Decodes the record at the front of `buf` (read from `offset`). On success,
/// the batch (its body shares `buf`) and the record's length.
pub fn decode_record(buf: &Bytes, offset: u64) -> Result<(SequencedBatch, usize), RecordError> {
    if buf.len() < HEADER_LEN {
        return Err(RecordError::Truncated { offset });
    }
    let header = RecordHeader::parse(buf).ok_or(RecordError::BadHeader { offset })?;
    let len = header.record_len();
    if buf.len() < len {
        return Err(RecordError::Truncated { offset });
    }
    if record_crc(&[&buf[8..len]]) != header.crc {
        return Err(RecordError::Checksum { offset });
    }
    let entries_end = HEADER_LEN + header.count as usize * ENTRY_LEN;
    let entries = buf[HEADER_LEN..entries_end]
        .chunks_exact(ENTRY_LEN)
        .map(|entry| {
            (
                Channel(u32::from_be_bytes([entry[0], entry[1], entry[2], entry[3]])),
                u32::from_be_bytes([entry[4], entry[5], entry[6], entry[7]]),
            )
        });
    let batch = SequencedBatch::from_parts(
        header.first_sequence,
        buf.slice(entries_end..len),
        entries,
        header.received_unix_nanos,
    )
    .ok_or(RecordError::BadHeader { offset })?;
    Ok((batch, len))
}

/// How the active segment's bytes reach the file (`--log-io`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogIo {
    /// Full staging buffers O_DIRECT: whole blocks from an aligned buffer
    /// straight to the disk, past the page cache; smaller writes buffered
    /// (all buffered where the filesystem refuses O_DIRECT).
    Direct,
    /// Through the page cache, whose copies are dropped once synced.
    Buffered,
}

/// The alignment O_DIRECT asks of file offsets, lengths and memory: 4096
/// covers disks with 512-byte and with 4 KiB logical blocks.
pub const BLOCK: usize = 4096;

/// A fixed-size byte buffer that starts on a `BLOCK` boundary, as O_DIRECT
/// requires of the memory it writes from: a `Vec` one block larger, used
/// from its first aligned byte (no `unsafe`, no allocator tricks).
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + BLOCK];
        let address = raw.as_ptr().addr();
        let start = (BLOCK - address % BLOCK) % BLOCK;
        AlignedBuf { raw, start }
    }

    fn bytes(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.raw.len() - BLOCK]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        let end = self.start + self.raw.len() - BLOCK;
        &mut self.raw[self.start..end]
    }
}

/// The active segment, appended to by the log writer.
///
/// Appends collect in a staging buffer and go to the kernel with positional
/// writes (`flush`), so a failed write (disk full) is undone exactly by
/// `truncate_to`: the staged bytes are dropped, the file cut back, and the
/// next write lands at the valid end. (A `BufWriter` would keep the bytes a
/// failed flush did not write and put them in front of the retried ones.)
///
/// With `LogIo::Direct` the file is also opened O_DIRECT, for full staging
/// buffers. Buffered writes cost the server a copy into fresh page-cache
/// pages, ext4's per-page work and, once synced, writing back and dropping
/// those pages (`drop_cached`): 16 % of the server's CPU in a 1 KiB
/// `--data-dir` profile (`pwrite` 10.7 %, `fdatasync` 2.9 %, `fadvise`
/// 2.7 %), where memory mode needs none of it. Direct writes skip all
/// three. O_DIRECT writes whole aligned blocks from aligned memory, so the
/// staging buffer is block-aligned and starts at the block that holds the
/// segment's end: a buffered write writes from there and keeps that partial
/// block staged, to be written again, completed, by the next write (the same
/// bytes over what was written, so a torn rewrite cannot damage an earlier
/// record), and a full buffer is whole blocks at a block boundary. Where the
/// filesystem refuses O_DIRECT (at open or at a write), the segment's writer
/// goes on buffered and logs a warning.
pub struct SegmentWriter {
    pub first_sequence: u64,
    pub end_sequence: u64,
    /// Bytes appended (after `flush`, all handed to the kernel).
    pub len: u64,
    path: PathBuf,
    log: File,
    /// The same file opened O_DIRECT, for large writes (`DIRECT_MIN_BYTES`).
    direct: Option<File>,
    /// Appended bytes not yet written, after (direct) the written part of
    /// the block they continue; `staging[..staged]` belongs at `staged_at`.
    staging: AlignedBuf,
    staged: usize,
    staged_at: u64,
    /// Bytes handed to the kernel: the file is valid up to here.
    written: u64,
    /// Of those, bytes written O_DIRECT.
    direct_bytes: u64,
    index: File,
    /// The segment's index entries (sequence, offset), written or not.
    entries: Vec<(u64, u64)>,
    /// How many of `entries` are in the index file.
    entries_written: usize,
    /// Bytes from the start whose page-cache copies were released
    /// (`release_cached`).
    released: u64,
}

/// Staged bytes past which `append` writes them out already (a multiple of
/// `BLOCK`, so a full buffer is written whole).
const STAGING_BYTES: usize = 1 << 20;

/// Writes smaller than this go through the page cache even with an O_DIRECT
/// handle: only a full staging buffer goes direct, which happens when the
/// writer is behind (at full speed the average write was 0.92 MB). A direct
/// write returns when the disk has it, and deliveries wait for the write;
/// on ext4 one can also wait for a running fsync's journal commit. At a
/// paced 100 k packets/s of 1 KiB (writes of ~90 KB) a 128-256 KiB
/// threshold sent 0.3-30 % of writes direct and moved p99 from 2.2-3.0 ms
/// to 4.2-5.0 ms; with this one none go direct and p99 stays 2.9-3.0 ms.
const DIRECT_MIN_BYTES: usize = STAGING_BYTES;
const _: () = assert!(STAGING_BYTES.is_multiple_of(BLOCK));

/// Opens a segment file for writing: a buffered handle (which also reads
/// the file back), and, if asked and the filesystem allows it (tmpfs before
/// Linux 6.6, for one, does not), an O_DIRECT one.
fn open_log_file(path: &Path, create: bool, io: LogIo) -> std::io::Result<(File, Option<File>)> {
    let open = |create: bool, flags: rustix::fs::OFlags| {
        OpenOptions::new()
            .create(create)
            .truncate(create)
            .write(true)
            .read(true)
            .custom_flags(flags.bits() as i32)
            .open(path)
    };
    let buffered = open(create, rustix::fs::OFlags::empty())?;
    if io == LogIo::Buffered {
        return Ok((buffered, None));
    }
    match open(false, rustix::fs::OFlags::DIRECT) {
        Ok(direct) => Ok((buffered, Some(direct))),
        Err(error) if error.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
            tracing::warn!(path = %path.display(), "the filesystem refuses O_DIRECT; the log writes through the page cache");
            Ok((buffered, None))
        }
        Err(error) => Err(error),
    }
}

impl SegmentWriter {
    /// Creates a new, empty segment whose first record will be `first_sequence`.
    pub fn create(dir: &Path, first_sequence: u64, io: LogIo) -> std::io::Result<SegmentWriter> {
        let path = log_path(dir, first_sequence);
        let (log, direct) = open_log_file(&path, true, io)?;
        let index = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(index_path(dir, first_sequence))?;
        Ok(SegmentWriter {
            first_sequence,
            end_sequence: first_sequence,
            len: 0,
            path,
            log,
            direct,
            staging: AlignedBuf::new(STAGING_BYTES),
            staged: 0,
            staged_at: 0,
            written: 0,
            direct_bytes: 0,
            index,
            entries: Vec::new(),
            entries_written: 0,
            released: 0,
        })
    }

    /// Reopens a recovered segment for appending at `len` (its valid end).
    pub fn reopen(dir: &Path, recovered: &Recovered, io: LogIo) -> std::io::Result<SegmentWriter> {
        let path = log_path(dir, recovered.first_sequence);
        let (log, direct) = open_log_file(&path, false, io)?;
        let index = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(index_path(dir, recovered.first_sequence))?;
        // Rewrite the index from what recovery found valid.
        index.set_len(0)?;
        index.write_all_at(&encode_entries(&recovered.index), 0)?;
        let mut writer = SegmentWriter {
            first_sequence: recovered.first_sequence,
            end_sequence: recovered.end_sequence,
            len: recovered.len,
            path,
            log,
            direct,
            staging: AlignedBuf::new(STAGING_BYTES),
            staged: 0,
            staged_at: recovered.len,
            written: recovered.len,
            direct_bytes: 0,
            index,
            entries: recovered.index.clone(),
            entries_written: recovered.index.len(),
            released: 0,
        };
        writer.log.set_len(recovered.len)?;
        writer.stage_partial_block();
        Ok(writer)
    }

    /// Whether the segment's large writes go O_DIRECT.
    pub fn direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Bytes this writer wrote O_DIRECT.
    pub fn direct_bytes(&self) -> u64 {
        self.direct_bytes
    }

    /// Appends one batch (staged; `flush` hands it to the kernel).
    pub fn append(&mut self, batch: &SequencedBatch) -> std::io::Result<()> {
        let offset = self.len;
        if self
            .entries
            .last()
            .is_none_or(|(_, last)| offset - last >= INDEX_EVERY)
        {
            self.entries.push((batch.first_sequence, offset));
        }
        let head = encode_head(batch);
        self.stage(&head)?;
        self.stage(batch.body())?;
        self.len += (head.len() + batch.body().len()) as u64;
        self.end_sequence = batch.end_sequence();
        Ok(())
    }

    /// Copies `bytes` into the staging buffer, writing it out whenever full.
    fn stage(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            if self.staged == STAGING_BYTES {
                self.write_staged()?;
            }
            let take = bytes.len().min(STAGING_BYTES - self.staged);
            self.staging.bytes_mut()[self.staged..self.staged + take]
                .copy_from_slice(&bytes[..take]);
            self.staged += take;
            bytes = &bytes[take..];
        }
        Ok(())
    }

    /// Writes the staged bytes at `staged_at`: O_DIRECT when the buffer is
    /// full, else through the page cache. With an O_DIRECT handle the
    /// partial last block stays staged, so the next write starts on a block
    /// boundary.
    fn write_staged(&mut self) -> std::io::Result<()> {
        let end = self.staged_at + self.staged as u64;
        if end == self.written {
            return Ok(());
        }
        let staged = self.staged;
        let mut wrote_direct = false;
        if let Some(direct) = self.direct.as_ref().filter(|_| staged >= DIRECT_MIN_BYTES) {
            // Whole blocks at a block boundary: `staged_at` is one, and a
            // full buffer is a multiple of `BLOCK`.
            match direct.write_all_at(&self.staging.bytes()[..staged], self.staged_at) {
                Ok(()) => {
                    wrote_direct = true;
                    self.direct_bytes += staged as u64;
                }
                Err(error)
                    if error.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) =>
                {
                    // The filesystem took O_DIRECT at open but not this write
                    // (an alignment it wants larger): go on through the page
                    // cache. Whatever this write did is rewritten below.
                    tracing::warn!(path = %self.path.display(), %error, "O_DIRECT write refused; the log writes through the page cache");
                    self.direct = None;
                }
                Err(error) => return Err(error),
            }
        }
        if !wrote_direct {
            self.log
                .write_all_at(&self.staging.bytes()[..staged], self.staged_at)?;
        }
        self.written = end;
        let keep_from = if self.direct.is_some() {
            staged - staged % BLOCK
        } else {
            staged
        };
        self.staging.bytes_mut().copy_within(keep_from..staged, 0);
        self.staged -= keep_from;
        self.staged_at += keep_from as u64;
        Ok(())
    }

    /// With an O_DIRECT handle: stages the written part of the block that
    /// holds the end (`written`), read back from the file, so the next
    /// write starts on a block boundary. If it cannot be read, the writer
    /// goes on buffered rather than write that block without it.
    fn stage_partial_block(&mut self) {
        let partial = if self.direct.is_some() {
            (self.written % BLOCK as u64) as usize
        } else {
            0
        };
        self.staged_at = self.written - partial as u64;
        self.staged = 0;
        if partial == 0 {
            return;
        }
        match self
            .log
            .read_exact_at(&mut self.staging.bytes_mut()[..partial], self.staged_at)
        {
            Ok(()) => self.staged = partial,
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "cannot read back the log's last block; the log writes through the page cache");
                self.direct = None;
                self.staged_at = self.written;
            }
        }
    }

    /// Hands everything appended to the kernel (survives `kill -9`).
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.write_staged()?;
        if self.entries_written < self.entries.len() {
            let bytes = encode_entries(&self.entries[self.entries_written..]);
            self.index
                .write_all_at(&bytes, (self.entries_written * INDEX_ENTRY_LEN) as u64)?;
            self.entries_written = self.entries.len();
        }
        Ok(())
    }

    /// `flush`, then asks the disk to keep it (survives a power loss), then
    /// releases the cached pages of what is now on disk but `CACHED_TAIL`.
    pub fn sync(&mut self) -> std::io::Result<()> {
        self.flush()?;
        self.log.sync_data()?;
        self.release_cached(self.release_after_sync());
        Ok(())
    }

    /// Where the cached pages may go once what is written is on disk: all
    /// but the newest `CACHED_TAIL` bytes.
    pub fn release_after_sync(&self) -> u64 {
        self.written.saturating_sub(CACHED_TAIL)
    }

    /// For an fsync on another thread while appends go on: everything
    /// appended so far handed to the kernel, and a second handle on the file
    /// (an fsync through it covers what was written before it started).
    pub fn sync_handle(&mut self) -> std::io::Result<File> {
        self.flush()?;
        self.log.try_clone()
    }

    /// Where the page cache was released up to (`release_cached`).
    pub fn released(&self) -> u64 {
        self.released
    }

    /// Records that another handle released the cached pages up to `end`.
    pub fn note_released(&mut self, end: u64) {
        self.released = self.released.max(end);
    }

    /// Releases the cached pages of bytes up to `end` (`drop_cached`). Only
    /// written and synced bytes: dirty pages would not go.
    pub fn release_cached(&mut self, end: u64) {
        if end > self.released {
            drop_cached(&self.log, self.released, end);
            self.released = end;
        }
    }

    /// Drops whatever was appended after `len` (a failed write's leftovers):
    /// pending bytes, bytes the kernel got, and index entries past it.
    pub fn truncate_to(&mut self, len: u64, end_sequence: u64) -> std::io::Result<()> {
        // The in-memory state first: even if cutting the file fails, the
        // next write goes to `len` and overwrites what lies there.
        self.staged = 0;
        self.staged_at = len;
        self.len = len;
        self.written = len;
        self.released = self.released.min(len);
        self.end_sequence = end_sequence;
        let keep = self.entries.partition_point(|(_, offset)| *offset < len);
        self.entries.truncate(keep);
        self.entries_written = self.entries_written.min(keep);
        let cut = self.log.set_len(len);
        // The bytes before `len` are valid whether or not the cut worked.
        self.stage_partial_block();
        cut?;
        self.index
            .set_len((self.entries_written * INDEX_ENTRY_LEN) as u64)
    }
}

#[cfg(test)]
impl SegmentWriter {
    /// Tests: zeroes what was written after `len`, as a failed writeback
    /// that lost its pages would leave it.
    pub fn lose_bytes_after(&mut self, len: u64) -> std::io::Result<()> {
        if self.written > len {
            let zeros = vec![0u8; (self.written - len) as usize];
            self.log.write_all_at(&zeros, len)?;
        }
        Ok(())
    }
}

/// The newest log bytes kept in the page cache: readers just behind the
/// memory ring read them from there (the ring keeps `--history` packets,
/// as little as 4 MiB of 64 B ones).
pub const CACHED_TAIL: u64 = 16 << 20;

/// Tells the kernel it may drop the page cache's copy of `start..end` of a
/// log file (`POSIX_FADV_DONTNEED`: clean pages go at once). Done for all but
/// the newest `CACHED_TAIL` bytes, once fsynced (with direct writes only
/// pages that readers brought in are there to go), and after each catch-up
/// read of older bytes. The newest batches are in the memory ring, and a catch-up
/// read far behind is one sequential pass, so a cached copy would be memory
/// that `--memory-limit` cannot see and a pod's memory cgroup counts, while
/// writing and reading would keep taking fresh pages instead of reusing these
/// (the reasoning of PostgreSQL's ring buffers for bulk scans). Measured on a
/// 2-core VM, where a fresh page's first touch is expensive: 1 KiB
/// `--data-dir` ingest went from ~0.40× to ~0.7× memory mode (the page-cache
/// copy, `copy_folio_from_iter_atomic`, had been 37 % of the server's CPU),
/// and sequential reads of a 2 GiB file from ~0.6-1.1 to ~2.5-3 GB/s. Advice
/// only: a failure costs memory, nothing else, so it is logged and not retried.
pub fn drop_cached(file: &File, start: u64, end: u64) {
    let Some(len) = std::num::NonZeroU64::new(end.saturating_sub(start)) else {
        return;
    };
    if let Err(error) = rustix::fs::fadvise(file, start, Some(len), rustix::fs::Advice::DontNeed) {
        tracing::debug!(%error, "cannot release the log's cached pages");
    }
}

fn encode_entries(entries: &[(u64, u64)]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(entries.len() * INDEX_ENTRY_LEN);
    for (sequence, offset) in entries {
        bytes.extend_from_slice(&sequence.to_be_bytes());
        bytes.extend_from_slice(&offset.to_be_bytes());
    }
    bytes
}

/// What recovery found in a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovered {
    pub first_sequence: u64,
    pub end_sequence: u64,
    /// The valid length: everything after it was cut.
    pub len: u64,
    pub truncated_bytes: u64,
    pub index: Vec<(u64, u64)>,
    /// Bytes of the segment read to find its valid end (what makes start-up
    /// time independent of the log's size: at most about one index interval
    /// and two records).
    pub scanned_bytes: u64,
}

/// Reads a segment's index file; entries past `max_offset` are dropped.
pub fn read_index(dir: &Path, first_sequence: u64, max_offset: u64) -> Vec<(u64, u64)> {
    let mut bytes = Vec::new();
    if File::open(index_path(dir, first_sequence))
        .and_then(|mut file| file.read_to_end(&mut bytes))
        .is_err()
    {
        return Vec::new();
    }
    let mut entries: Vec<(u64, u64)> = Vec::new();
    for chunk in bytes.chunks_exact(INDEX_ENTRY_LEN) {
        let mut sequence = [0u8; 8];
        let mut offset = [0u8; 8];
        sequence.copy_from_slice(&chunk[..8]);
        offset.copy_from_slice(&chunk[8..]);
        let entry = (u64::from_be_bytes(sequence), u64::from_be_bytes(offset));
        // Keep only entries that increase: anything else is a torn write.
        if entry.1 >= max_offset
            || entries
                .last()
                .is_some_and(|last| last.0 >= entry.0 || last.1 >= entry.1)
        {
            break;
        }
        entries.push(entry);
    }
    entries
}

/// Finds the valid end of the segment starting at `first_sequence`, scanning
/// only from its last index entry (so start-up does not grow with the log),
/// and cuts a torn tail.
pub fn recover_tail(dir: &Path, first_sequence: u64) -> Result<Recovered, RecordError> {
    let path = log_path(dir, first_sequence);
    let file = File::open(&path)?;
    let file_len = file.metadata()?.len();
    let mut index = read_index(dir, first_sequence, file_len);
    let mut scanned = 0;
    // Walk back from the last index entry until one is a valid record.
    let (mut offset, mut sequence) = loop {
        let Some(&(sequence, offset)) = index.last() else {
            break (0, first_sequence);
        };
        match read_record_counted(&file, offset, file_len, &mut scanned) {
            Ok((batch, _)) if batch.first_sequence == sequence => break (offset, sequence),
            _ => {
                index.pop();
            }
        }
    };
    while offset < file_len {
        match read_record_counted(&file, offset, file_len, &mut scanned) {
            Ok((batch, len)) if batch.first_sequence == sequence => {
                offset += len as u64;
                sequence = batch.end_sequence();
            }
            _ => break,
        }
    }
    Ok(Recovered {
        first_sequence,
        end_sequence: sequence,
        len: offset,
        truncated_bytes: file_len - offset,
        index,
        scanned_bytes: scanned,
    })
}

/// After a damaged record at `offset`: the offset and first sequence of the
/// record that follows it, if the damaged record's header still gives a
/// length and the record there is intact. `None` when the damage leaves the
/// next record unknown (the caller skips further, to an index entry).
pub fn intact_record_after(file: &File, offset: u64, file_len: u64) -> Option<(u64, u64)> {
    let mut header = [0u8; HEADER_LEN];
    file.read_exact_at(&mut header, offset).ok()?;
    let next = offset.checked_add(RecordHeader::parse(&header)?.record_len() as u64)?;
    if next >= file_len {
        return None;
    }
    let (batch, _) = read_record_at(file, next, file_len).ok()?;
    Some((next, batch.first_sequence))
}

/// Reads the one record at `offset` (at most `file_len`).
pub fn read_record_at(
    file: &File,
    offset: u64,
    file_len: u64,
) -> Result<(SequencedBatch, usize), RecordError> {
    read_record_counted(file, offset, file_len, &mut 0)
}

/// `read_record_at`, adding the bytes it read to `scanned`.
fn read_record_counted(
    file: &File,
    offset: u64,
    file_len: u64,
    scanned: &mut u64,
) -> Result<(SequencedBatch, usize), RecordError> {
    let mut header = [0u8; HEADER_LEN];
    if file_len.saturating_sub(offset) < HEADER_LEN as u64 {
        return Err(RecordError::Truncated { offset });
    }
    file.read_exact_at(&mut header, offset)?;
    let Some(parsed) = RecordHeader::parse(&header) else {
        *scanned += HEADER_LEN as u64;
        return Err(RecordError::BadHeader { offset });
    };
    let len = parsed.record_len();
    if file_len - offset < len as u64 {
        *scanned += HEADER_LEN as u64;
        return Err(RecordError::Truncated { offset });
    }
    let mut record = vec![0u8; len];
    file.read_exact_at(&mut record, offset)?;
    // The header again, with the rest: counted once.
    *scanned += len as u64;
    decode_record(&Bytes::from(record), offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{EncodedPacketsBuilder, PacketFields};
    use std::io::Write;

    pub(crate) fn batch(first: u64, count: usize, size: usize) -> SequencedBatch {
        let payload = vec![0x5A; size];
        let mut builder = EncodedPacketsBuilder::with_capacity(count, 0, first);
        for index in 0..count {
            builder.push(&PacketFields {
                channel: Channel(index as u32 % 3),
                payload: &payload,
                digest: &[1; 32],
                source: "tcp/127.0.0.1:1",
                source_sequence: index as u64,
                received_unix_nanos: 1_000 + index as i64,
            });
        }
        builder.finish().stamp(first)
    }

    fn same(a: &SequencedBatch, b: &SequencedBatch) {
        assert_eq!(a.first_sequence, b.first_sequence);
        assert_eq!(a.body(), b.body());
        assert_eq!(
            a.entries().collect::<Vec<_>>(),
            b.entries().collect::<Vec<_>>()
        );
        assert_eq!(a.received_unix_nanos(), b.received_unix_nanos());
    }

    #[test]
    fn records_read_back_exactly_as_written() {
        for io in [LogIo::Direct, LogIo::Buffered] {
            let dir = tempfile::tempdir().expect("temp dir");
            let mut writer = SegmentWriter::create(dir.path(), 1, io).expect("create");
            let batches: Vec<SequencedBatch> = (0..50)
                .scan(1, |next, index| {
                    let batch = batch(*next, 1 + index % 7, 1000 * (index % 5));
                    *next = batch.end_sequence();
                    Some(batch)
                })
                .collect();
            for batch in &batches {
                writer.append(batch).expect("append");
            }
            writer.sync().expect("sync");
            let len = writer.len;
            let file = File::open(log_path(dir.path(), 1)).expect("open");
            assert_eq!(file.metadata().expect("metadata").len(), len, "{io:?}");
            let mut offset = 0;
            for batch in &batches {
                let (read, record_len) = read_record_at(&file, offset, len).expect("read");
                same(batch, &read);
                offset += record_len as u64;
            }
            assert_eq!(offset, len);
            let recovered = recover_tail(dir.path(), 1).expect("recover");
            assert_eq!(
                recovered.end_sequence,
                batches.last().expect("batches").end_sequence()
            );
            assert_eq!((recovered.len, recovered.truncated_bytes), (len, 0));
            assert!(
                recovered.index.len() > 1,
                "sparse index written: {:?}",
                recovered.index
            );
        }
    }

    #[test]
    fn a_torn_tail_is_cut_at_every_possible_length() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut writer = SegmentWriter::create(dir.path(), 10, LogIo::Buffered).expect("create");
        writer.append(&batch(10, 3, 100)).expect("append");
        writer.append(&batch(13, 2, 100)).expect("append");
        writer.sync().expect("sync");
        let path = log_path(dir.path(), 10);
        let whole = std::fs::read(&path).expect("read");
        let first_len = read_record_at(&File::open(&path).expect("open"), 0, whole.len() as u64)
            .expect("first")
            .1;
        for cut in first_len..whole.len() {
            std::fs::write(&path, &whole[..cut]).expect("write");
            let recovered = recover_tail(dir.path(), 10).expect("recover");
            assert_eq!(recovered.len, first_len as u64, "cut at {cut}");
            assert_eq!(recovered.end_sequence, 13);
            assert_eq!(recovered.truncated_bytes, (cut - first_len) as u64);
        }
    }

    /// Direct writes (aligned staging, full buffers O_DIRECT, the partial
    /// block written again) against plain buffered writes of the same appends:
    /// whatever the sizes and where flushes and cut-backs fall, the file holds
    /// the same bytes up to the segment's length, and recovery finds it.
    #[test]
    fn direct_writes_leave_the_same_file_as_buffered_writes() {
        use proptest::prelude::*;

        #[derive(Clone, Debug)]
        enum Op {
            Append { count: usize, size: usize },
            Flush,
            CutBack { records: usize },
            Reopen,
        }
        let op = prop_oneof![
            4 => (1usize..5, prop_oneof![0usize..600, 4000usize..5000, 300_000usize..400_000])
                .prop_map(|(count, size)| Op::Append { count, size }),
            2 => Just(Op::Flush),
            1 => (1usize..4).prop_map(|records| Op::CutBack { records }),
            1 => Just(Op::Reopen),
        ];
        let config = ProptestConfig {
            cases: 24,
            ..ProptestConfig::default()
        };
        proptest!(config, |(ops in proptest::collection::vec(op, 1..24))| {
            let direct_dir = tempfile::tempdir().expect("temp dir");
            let buffered_dir = tempfile::tempdir().expect("temp dir");
            let mut writers = [
                SegmentWriter::create(direct_dir.path(), 1, LogIo::Direct).expect("create"),
                SegmentWriter::create(buffered_dir.path(), 1, LogIo::Buffered).expect("create"),
            ];
            let dirs = [direct_dir.path(), buffered_dir.path()];
            // (offset, end sequence) after each record appended.
            let mut ends: Vec<(u64, u64)> = vec![(0, 1)];
            let mut direct_bytes = 0;
            // Bytes appended since the last flush: a full buffer's worth must
            // have gone direct.
            let (mut since_flush, mut filled) = (0, false);
            for op in ops {
                match op {
                    Op::Append { count, size } => {
                        let (_, next) = *ends.last().expect("ends");
                        let batch = batch(next, count, size);
                        for writer in &mut writers {
                            writer.append(&batch).expect("append");
                        }
                        since_flush += writers[0].len - ends.last().expect("ends").0;
                        filled |= since_flush >= STAGING_BYTES as u64;
                        ends.push((writers[0].len, batch.end_sequence()));
                    }
                    Op::Flush => {
                        since_flush = 0;
                        for writer in &mut writers {
                            writer.flush().expect("flush");
                        }
                    }
                    Op::CutBack { records } => {
                        since_flush = 0;
                        for writer in &mut writers {
                            writer.flush().expect("flush");
                        }
                        let keep = ends.len().saturating_sub(records).max(1);
                        ends.truncate(keep);
                        let (len, end) = *ends.last().expect("ends");
                        for writer in &mut writers {
                            writer.truncate_to(len, end).expect("truncate");
                        }
                    }
                    Op::Reopen => {
                        since_flush = 0;
                        for (writer, dir) in writers.iter_mut().zip(dirs) {
                            writer.flush().expect("flush");
                            direct_bytes += writer.direct_bytes();
                            let recovered = recover_tail(dir, 1).expect("recover");
                            prop_assert_eq!(recovered.truncated_bytes, 0);
                            let io = if writer.direct() { LogIo::Direct } else { LogIo::Buffered };
                            *writer = SegmentWriter::reopen(dir, &recovered, io).expect("reopen");
                        }
                    }
                }
            }
            for writer in &mut writers {
                writer.flush().expect("flush");
            }
            prop_assert!(writers[0].direct() && !writers[1].direct());
            direct_bytes += writers[0].direct_bytes() + writers[1].direct_bytes();
            // Full buffers went direct (and only in the direct writer).
            prop_assert_eq!(writers[1].direct_bytes(), 0);
            prop_assert!(direct_bytes > 0 || !filled, "a full buffer went direct");
            let (len, end) = *ends.last().expect("ends");
            let direct = std::fs::read(log_path(direct_dir.path(), 1)).expect("read");
            let buffered = std::fs::read(log_path(buffered_dir.path(), 1)).expect("read");
            prop_assert_eq!(buffered.len() as u64, len);
            prop_assert!(direct == buffered, "the same bytes");
            for dir in dirs {
                let recovered = recover_tail(dir, 1).expect("recover");
                prop_assert_eq!((recovered.len, recovered.end_sequence, recovered.truncated_bytes), (len, end, 0));
            }
        });
    }

    #[test]
    fn the_record_checksum_is_crc32c_however_the_bytes_are_split() {
        use proptest::prelude::*;
        proptest!(|(bytes in proptest::collection::vec(any::<u8>(), 0..70_000), cut in any::<prop::sample::Index>())| {
            let cut = cut.index(bytes.len() + 1);
            let expected = crc32c::crc32c(&bytes);
            prop_assert_eq!(record_crc(&[&bytes]), expected);
            prop_assert_eq!(record_crc(&[&bytes[..cut], &bytes[cut..]]), expected);
        });
        // The standard check value of CRC-32C.
        assert_eq!(record_crc(&[b"123456789"]), 0xE306_9283);
    }

    #[test]
    fn a_flipped_byte_fails_the_checksum() {
        let original = batch(1, 4, 64);
        let mut bytes = encode_head(&original);
        bytes.extend_from_slice(original.body());
        for at in 8..bytes.len() {
            let mut corrupt = bytes.clone();
            corrupt[at] ^= 0x40;
            assert!(
                decode_record(&Bytes::from(corrupt), 0).is_err(),
                "byte {at}"
            );
        }
        let (read, _) = decode_record(&Bytes::from(bytes), 0).expect("intact");
        same(&original, &read);
    }

    #[test]
    fn a_reopened_segment_continues_after_its_valid_end() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut writer = SegmentWriter::create(dir.path(), 1, LogIo::Direct).expect("create");
        writer.append(&batch(1, 2, 10)).expect("append");
        writer.flush().expect("flush");
        drop(writer);
        // Garbage after the record, as a crash mid-write leaves it.
        let path = log_path(dir.path(), 1);
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(b"PIL1 half a header").expect("write");
        let recovered = recover_tail(dir.path(), 1).expect("recover");
        let mut writer =
            SegmentWriter::reopen(dir.path(), &recovered, LogIo::Direct).expect("reopen");
        writer.append(&batch(3, 1, 10)).expect("append");
        writer.flush().expect("flush");
        let again = recover_tail(dir.path(), 1).expect("recover");
        assert_eq!((again.end_sequence, again.truncated_bytes), (4, 0));
    }

    #[test]
    fn a_sync_releases_all_but_the_cached_tail_and_records_still_read_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut writer = SegmentWriter::create(dir.path(), 1, LogIo::Direct).expect("create");
        let mut next = 1;
        let mut written = Vec::new();
        // A little more than the tail kept cached, in 1 MiB batches.
        while writer.len <= CACHED_TAIL + (2 << 20) {
            let batch = batch(next, 16, 64 * 1024);
            next = batch.end_sequence();
            writer.append(&batch).expect("append");
            written.push(batch);
        }
        writer.sync().expect("sync");
        assert_eq!(writer.released, writer.len - CACHED_TAIL);
        // Cut back into the released part: what is released never lies past the end.
        let (cut_len, cut_end) = (writer.released - 4096, written[0].end_sequence());
        writer.truncate_to(cut_len, cut_end).expect("truncate");
        assert_eq!(writer.released, cut_len);
        writer.release_cached(cut_len);
        assert_eq!(writer.released, cut_len);
        // What the kernel may have dropped is read again from the file.
        let file = File::open(log_path(dir.path(), 1)).expect("open");
        let (first, _) = read_record_at(&file, 0, cut_len).expect("first record");
        same(&first, &written[0]);
    }
}
