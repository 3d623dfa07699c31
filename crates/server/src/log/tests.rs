//! Unit tests of the log directory: lock, stream id, segments, reads by
//! sequence, retention, corruption.

use super::*;
use crate::wire::{EncodedPacketsBuilder, PacketFields};

fn options(dir: &Path) -> LogOptions {
    LogOptions {
        dir: dir.to_owned(),
        segment_bytes: 64 * 1024,
        retention_bytes: None,
        retention_age: None,
        fsync: FsyncPolicy::Never,
        fsync_interval: Duration::from_millis(100),
        io: crate::log::LogIo::Direct,
    }
}

fn batch(first: u64, count: usize, size: usize) -> Arc<SequencedBatch> {
    let payload = vec![first as u8; size];
    let mut builder = EncodedPacketsBuilder::with_capacity(count, 0, first);
    for index in 0..count {
        builder.push(&PacketFields {
            channel: crate::frame::Channel(index as u32),
            payload: &payload,
            digest: &[2; 32],
            source: "grpc/127.0.0.1:9",
            source_sequence: index as u64,
            received_unix_nanos: 7,
        });
    }
    Arc::new(builder.finish().stamp(first))
}

/// Writes `count` batches of `per` packets from sequence 1; returns the end.
fn fill(writer: &mut LogWriter, count: usize, per: usize, size: usize) -> u64 {
    let mut next = writer.end_sequence();
    for _ in 0..count {
        let batch = batch(next, per, size);
        next = batch.end_sequence();
        writer.write(&[batch]).expect("write");
    }
    next
}

/// Every sequence from `from` on, read back in order until the end.
fn read_all(log: &Log, mut from: u64) -> (Vec<u64>, u64) {
    let mut sequences = Vec::new();
    let mut skipped = 0;
    for _ in 0..10_000 {
        let read = log.read(from, 100_000).expect("read");
        skipped += read.skipped;
        for batch in &read.batches {
            for index in 0..batch.len() {
                let sequence = batch.first_sequence + index as u64;
                if sequence >= from {
                    sequences.push(sequence);
                }
            }
        }
        if read.resume_at == from {
            break;
        }
        from = read.resume_at;
    }
    (sequences, skipped)
}

#[test]
fn a_second_process_is_refused_with_the_holder_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = Log::open(options(dir.path()), Metrics::new()).expect("open");
    let Err(error) = Log::open(options(dir.path()), Metrics::new()) else {
        panic!("a second open must be refused");
    };
    let message = error.to_string();
    assert!(
        message.contains(&format!("pid {}", std::process::id())),
        "{message}"
    );
    drop(first);
    assert!(Log::open(options(dir.path()), Metrics::new()).is_ok());
}

#[test]
fn stream_id_and_numbering_survive_reopening() {
    let dir = tempfile::tempdir().expect("temp dir");
    let opened = Log::open(options(dir.path()), Metrics::new()).expect("open");
    let id = opened.log.stream_id().to_owned();
    assert!(id.starts_with("disk-") && id.len() <= 64, "{id}");
    assert_eq!(opened.next_sequence, 1);
    let mut writer = opened.writer;
    let end = fill(&mut writer, 40, 10, 500);
    drop((writer, opened.log));
    let again = Log::open(options(dir.path()), Metrics::new()).expect("reopen");
    assert_eq!(again.log.stream_id(), id);
    assert_eq!(again.next_sequence, end);
    assert_eq!(again.truncated_bytes, 0);
}

#[test]
fn reads_cross_segments_from_any_sequence_without_gap_or_duplicate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let opened = Log::open(options(dir.path()), Metrics::new()).expect("open");
    let mut writer = opened.writer;
    let end = fill(&mut writer, 200, 7, 300);
    assert!(opened.log.segments().len() > 3, "several segments");
    for from in [1, 2, 7, 8, 500, end - 1] {
        let (sequences, skipped) = read_all(&opened.log, from);
        assert_eq!(skipped, 0);
        assert_eq!(sequences, (from..end).collect::<Vec<_>>(), "from {from}");
    }
    let caught_up = opened.log.read(end, 1000).expect("read");
    assert!(caught_up.batches.is_empty() && caught_up.resume_at == end);
}

#[test]
fn retention_deletes_whole_old_segments_and_reads_report_the_skip() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut options = options(dir.path());
    options.retention_bytes = Some(200 * 1024);
    let opened = Log::open(options, Metrics::new()).expect("open");
    let mut writer = opened.writer;
    let end = fill(&mut writer, 300, 7, 300);
    let removed = writer.apply_retention();
    assert!(removed > 0);
    let log = &opened.log;
    assert!(log.retained_bytes() <= 200 * 1024 + 64 * 1024 + 4096);
    let first = log.first_sequence();
    assert!(first > 1);
    let (sequences, skipped) = read_all(log, 1);
    assert_eq!(skipped, first - 1, "what retention deleted is reported");
    assert_eq!(sequences, (first..end).collect::<Vec<_>>());
}

#[test]
fn a_corrupted_record_is_reported_and_skipped_never_delivered() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut options = options(dir.path());
    options.segment_bytes = 1 << 30;
    let opened = Log::open(options, Metrics::new()).expect("open");
    let mut writer = opened.writer;
    let end = fill(&mut writer, 100, 10, 1000);
    // Flip a byte in the middle of the segment.
    let path = segment::log_path(dir.path(), 1);
    let mut bytes = std::fs::read(&path).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xFF;
    std::fs::write(&path, &bytes).expect("write");
    let (sequences, skipped) = read_all(&opened.log, 1);
    assert!(skipped > 0, "the corrupted record is reported");
    assert_eq!(sequences.len() as u64 + skipped, end - 1);
    assert!(sequences.windows(2).all(|pair| pair[0] < pair[1]));
}

#[test]
fn a_damaged_record_with_an_intact_length_loses_only_its_own_packets() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut options = options(dir.path());
    options.segment_bytes = 1 << 30;
    let opened = Log::open(options, Metrics::new()).expect("open");
    let mut writer = opened.writer;
    let end = fill(&mut writer, 100, 10, 1000);
    let path = segment::log_path(dir.path(), 1);
    let mut bytes = std::fs::read(&path).expect("read");
    let file = File::open(&path).expect("open");
    // Record 50 holds sequences 491..501; flip a byte in its body.
    let mut offset = 0;
    for _ in 0..50 {
        offset += segment::read_record_at(&file, offset, bytes.len() as u64)
            .expect("record")
            .1 as u64;
    }
    let (batch, len) = segment::read_record_at(&file, offset, bytes.len() as u64).expect("record");
    assert_eq!(batch.first_sequence, 501);
    bytes[offset as usize + len - 100] ^= 0x01;
    std::fs::write(&path, &bytes).expect("write");
    for from in [1, 400, 495, 501] {
        let (sequences, skipped) = read_all(&opened.log, from);
        let expected: Vec<u64> = (from..end).filter(|s| !(501..511).contains(s)).collect();
        assert_eq!(sequences, expected, "from {from}");
        assert_eq!(skipped, 511 - from.max(501), "from {from}");
    }
    assert_eq!(opened.log.metrics.log_corrupt_records.get(), 4);
}

#[test]
fn a_rolled_back_write_leaves_no_trace_and_its_retry_lands_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut options = options(dir.path());
    options.segment_bytes = 1 << 30;
    let opened = Log::open(options.clone(), Metrics::new()).expect("open");
    let mut writer = opened.writer;
    // Past one index interval, so the rolled-back write adds an index entry.
    let end = fill(&mut writer, 14, 10, 500);
    // A write that "failed" after reaching the kernel (and adding an index
    // entry): rolled back, then retried.
    let big = batch(end, 200, 500);
    assert_eq!(
        writer.write(&[Arc::clone(&big)]).expect("write"),
        big.end_sequence()
    );
    writer.rollback().expect("rollback");
    assert_eq!(writer.end_sequence(), end);
    assert_eq!(opened.log.end_sequence(), end);
    let next = batch(end, 5, 500);
    writer.write(&[Arc::clone(&next)]).expect("retry");
    let after = fill(&mut writer, 300, 7, 300);
    drop(writer);
    let (sequences, skipped) = read_all(&opened.log, 1);
    assert_eq!((sequences, skipped), ((1..after).collect::<Vec<_>>(), 0));
    let metrics = Metrics::new();
    drop(opened.log);
    let again = Log::open(options, Arc::clone(&metrics)).expect("reopen");
    assert_eq!((again.next_sequence, again.truncated_bytes), (after, 0));
}

#[test]
fn one_write_never_spans_two_segments() {
    let dir = tempfile::tempdir().expect("temp dir");
    let opened = Log::open(options(dir.path()), Metrics::new()).expect("open");
    let mut writer = opened.writer;
    // 64 KiB segments; 40 batches of ~7 KiB are several segments' worth.
    let batches: Vec<_> = (0..40).map(|index| batch(1 + 5 * index, 5, 1400)).collect();
    let mut written = 0;
    let mut rounds = 0;
    while written < batches.len() {
        let end = writer.write(&batches[written..]).expect("write");
        written = batches.partition_point(|batch| batch.end_sequence() <= end);
        rounds += 1;
        assert!(rounds < 100);
    }
    assert!(rounds > 1, "the write stopped at a segment's end");
    assert_eq!(read_all(&opened.log, 1).0, (1..201).collect::<Vec<_>>());
}

#[test]
fn a_write_that_would_leave_a_gap_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let opened = Log::open(options(dir.path()), Metrics::new()).expect("open");
    let mut writer = opened.writer;
    let end = fill(&mut writer, 3, 4, 100);
    let error = writer
        .write(&[batch(end + 1, 4, 100)])
        .expect_err("a gap is refused");
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
    writer.rollback().expect("rollback");
    // Also within one write: the second batch does not continue the first.
    let error = writer
        .write(&[batch(end, 4, 100), batch(end + 5, 4, 100)])
        .expect_err("a gap is refused");
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
    writer.rollback().expect("rollback");
    let after = fill(&mut writer, 2, 4, 100);
    assert_eq!(
        read_all(&opened.log, 1),
        ((1..after).collect::<Vec<_>>(), 0)
    );
}

#[test]
fn sequences_missing_between_records_are_reported_not_skipped_silently() {
    let dir = tempfile::tempdir().expect("temp dir");
    let opened = Log::open(options(dir.path()), Metrics::new()).expect("open");
    let mut writer = opened.writer;
    let end = fill(&mut writer, 3, 4, 100);
    // Past the writer's own check, as a damaged log would be.
    writer
        .active
        .append(&batch(end + 10, 4, 100))
        .expect("append");
    writer.active.flush().expect("flush");
    writer.publish_active();
    let (sequences, skipped) = read_all(&opened.log, 1);
    let expected: Vec<u64> = (1..end).chain(end + 10..end + 14).collect();
    assert_eq!((sequences, skipped), (expected, 10));
    // A read starting inside the gap is told what it misses from there.
    let read = opened.log.read(end + 3, 100_000).expect("read");
    assert_eq!(read.skipped, 7);
    assert_eq!(read.batches[0].first_sequence, end + 10);
    // A read starting past it is told nothing.
    let read = opened.log.read(end + 11, 100_000).expect("read");
    assert_eq!(read.skipped, 0);
}

/// Offsets of the records in a segment file, walked by their headers.
fn record_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut at = 0;
    while at + 16 <= bytes.len() {
        offsets.push(at);
        let field = |from: usize| {
            u32::from_be_bytes([
                bytes[from],
                bytes[from + 1],
                bytes[from + 2],
                bytes[from + 3],
            ]) as usize
        };
        at += 32 + field(at + 8) * 8 + field(at + 12);
    }
    offsets
}

#[test]
fn a_record_whose_length_runs_past_the_segment_is_reported_not_read_forever() {
    let dir = tempfile::tempdir().expect("temp dir");
    let opened = Log::open(options(dir.path()), Metrics::new()).expect("open");
    let mut writer = opened.writer;
    let end = fill(&mut writer, 20, 4, 100);
    drop(writer);
    let path = segment::log_path(dir.path(), 1);
    let mut bytes = std::fs::read(&path).expect("read segment");
    let damaged = record_offsets(&bytes)[5];
    // Body length far past the file; the magic stays intact.
    bytes[damaged + 12..damaged + 16].copy_from_slice(&0x00ff_ffffu32.to_be_bytes());
    std::fs::write(&path, &bytes).expect("write segment");
    let (sequences, skipped) = read_all(&opened.log, 1);
    // Records 0..5 (4 packets each) read; everything after is reported.
    assert_eq!(sequences, (1..21).collect::<Vec<_>>());
    assert_eq!(skipped, end - 21);
    assert!(opened.log.metrics.log_corrupt_records.get() >= 1);
}

#[test]
fn a_segment_that_ends_before_the_next_one_begins_reports_the_difference() {
    let dir = tempfile::tempdir().expect("temp dir");
    let opened = Log::open(options(dir.path()), Metrics::new()).expect("open");
    let mut writer = opened.writer;
    let end = fill(&mut writer, 3, 4, 100);
    drop(writer);
    drop(opened.log);
    // A later segment whose first sequence leaves 5 sequences unstored.
    let mut later = SegmentWriter::create(dir.path(), end + 5, LogIo::Direct).expect("create");
    later.append(&batch(end + 5, 4, 100)).expect("append");
    later.flush().expect("flush");
    drop(later);
    let reopened = Log::open(options(dir.path()), Metrics::new()).expect("reopen");
    let (sequences, skipped) = read_all(&reopened.log, 1);
    let expected: Vec<u64> = (1..end).chain(end + 5..end + 9).collect();
    assert_eq!((sequences, skipped), (expected, 5));
}

/// An fsync running beside the writer covers what was written before it
/// began, never what the writer appended meanwhile; if it fails, the log is
/// cut back to the last good fsync, including what was appended meanwhile.
#[test]
fn a_background_fsync_covers_only_what_preceded_it_and_its_failure_rewinds() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut opened = Log::open(options(dir.path()), Metrics::new()).expect("log opens");
    let writer = &mut opened.writer;
    let first_end = fill(writer, 3, 4, 100);
    let job = writer.begin_sync().expect("begins");
    let later_end = fill(writer, 2, 4, 100);
    assert!(later_end > first_end);
    let durable = writer.finish_sync(job.run()).expect("fsync succeeds");
    assert_eq!(durable, first_end, "durable up to where the fsync began");

    let job = writer.begin_sync().expect("begins");
    let appended = fill(writer, 2, 4, 100);
    writer
        .failing_syncs
        .store(1, std::sync::atomic::Ordering::Release);
    writer
        .finish_sync(job.run())
        .expect_err("the injected failure");
    assert!(writer.take_sync_failed());
    assert_eq!(writer.rewind_to_synced(), first_end);
    assert_eq!(writer.end_sequence(), first_end);
    let (sequences, skipped) = read_all(&opened.log, 1);
    assert_eq!((sequences, skipped), ((1..first_end).collect(), 0));
    assert!(appended > later_end);
}

/// A background fsync that finishes after a segment roll (which fsyncs the
/// old segment itself) does not move the new segment's synced point.
#[test]
fn a_background_fsync_of_a_closed_segment_leaves_the_new_segment_alone() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut opened = Log::open(options(dir.path()), Metrics::new()).expect("log opens");
    let writer = &mut opened.writer;
    fill(writer, 1, 4, 100);
    let job = writer.begin_sync().expect("begins");
    // 64 KiB segments: write until a write starts a new one.
    let mut new_segment_start = None;
    for _ in 0..1_000 {
        let before = writer.end_sequence();
        let rolls = writer.needs_roll();
        fill(writer, 1, 8, 1_000);
        if rolls {
            new_segment_start = Some(before);
            break;
        }
    }
    let start = new_segment_start.expect("a segment rolled");
    fill(writer, 1, 4, 100);
    writer.finish_sync(job.run()).expect("fsync succeeds");
    // Cut back to the last good fsync: the roll's, at the new segment's start.
    assert_eq!(writer.rewind_to_synced(), start);
}
