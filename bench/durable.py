#!/usr/bin/env python3
"""The durable stream (`--data-dir`) on this machine, in one run, all driven by
the same `packet-ingest-bench` client (1 KiB payloads, one producer, one
subscriber; lossless: memory mode with `--slow-subscriber block`, --data-dir
with its default, `catch-up`):
  - disk:       what the data directory's filesystem takes, sequential writes
                with an fsync every 64 MiB (the physical bound of a log),
  - memory:     packet-ingest without --data-dir (and its latency paced at
                LIVE_RATE, the baseline of the paced catch-up case),
  - data-dir:   packet-ingest with --data-dir and the default --fsync interval,
                on an empty log, then a second run on the log the first left;
                then with memory mode's `block` policy, with the default
                `--log-io direct` and with `--log-io buffered`; then memory
                mode and --data-dir once more, each on a fresh server (the
                0.8x goal is judged on both pairs),
  - jetstream:  nats-server -js (file store), acked publishes, ordered consumer,
  - catch-up:   a --data-dir server filled with CATCHUP_PACKETS packets of 1 KiB;
                a live run alone, then the same live run with a subscriber
                reading CATCHUP_PACKETS from sequence 1 (rust_subscriber)
                started 1 s in: its rate of log read, and the live rate beside
                it; once with live traffic as fast as it goes, once paced at
                LIVE_RATE (then also the live latency with and without),
  - start-up:   a log of START_LOG_GIB GiB (64 KiB packets), then kill -9 and
                START_RESTARTS restarts: exec to the "listening" line.
Disk writes during each packet-ingest run come from /proc/diskstats (all
disks). Then writes a section into BENCHMARKS.md between the durable.py
GENERATED markers (bench/report.py).

usage: bench/durable.py      (from anywhere; about 3 minutes on 2 cores, plus the build)

Environment (defaults in brackets):
  DURATION [10s]           length of each throughput and live run
  CATCHUP_PACKETS [1048576]  packets in the log the catch-up subscriber reads
  LIVE_RATE [100000]       packets/s of the paced live traffic beside a catch-up
  START_LOG_GIB [4]        size of the log for the start-up case
  START_RESTARTS [3]
  SCRATCH [the repo's target/]  where data directories go (a real disk, not tmpfs)
  PACKET_INGEST_BIN        use this binary instead of building target/release
  OUT [BENCHMARKS.md]      where the section goes
  RESULTS_DIR [target/bench-durable]   raw JSON, facts and logs of every run
"""

import datetime
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import benchlib
import report
from benchlib import ROOT, cilib, log, setting

DURATION = setting("DURATION", "10s")
CATCHUP_PACKETS = int(setting("CATCHUP_PACKETS", "1048576"))
LIVE_RATE = int(setting("LIVE_RATE", "100000"))
START_LOG_GIB = int(setting("START_LOG_GIB", "4"))
START_RESTARTS = int(setting("START_RESTARTS", "3"))
SCRATCH = Path(setting("SCRATCH", str(ROOT / "target")))
OUT = ROOT / setting("OUT", "BENCHMARKS.md")
RESULTS = Path(os.environ.get("RESULTS_DIR") or ROOT / "target" / "bench-durable")
SUBSCRIBER = None  # the rust_subscriber example, built next to the binaries
BENCH = None  # the benchlib.Bench of this run
FACTS = {}


def fact(key, value):
    FACTS[key] = value
    log(f"  {key} = {value}")


def disk_bytes(field):
    """Bytes read (field 5) or written (field 9) on all whole disks so far
    (/proc/diskstats counts 512-byte sectors)."""
    total = 0
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        name = fields[2]
        if re.fullmatch(r"(vd|sd|xvd|hd)[a-z]+|nvme\d+n\d+", name):
            total += int(fields[field]) * 512
    return total


def disk_written_bytes():
    return disk_bytes(9)


def metric(server, name):
    """One counter or gauge from the server's /metrics (summed over labels)."""
    text = urllib.request.urlopen(f"http://{server.metrics}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def disk_speed(directory):
    """Sequential write MB/s of `directory`'s filesystem: 2 GiB in 4 MiB writes,
    fsync every 64 MiB (as a log with group commit would), each synced range
    then dropped from the page cache (as packet-ingest's log does, so that
    writing reuses pages: on a VM a fresh page's first touch can cost more
    than the disk)."""
    path = Path(directory) / "disk-speed.tmp"
    chunk = os.urandom(4 << 20)
    started = time.monotonic()
    with open(path, "wb") as f:
        for index in range(512):
            f.write(chunk)
            if index % 16 == 15:
                f.flush()
                os.fsync(f.fileno())
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    elapsed = time.monotonic() - started
    path.unlink()
    return (512 * len(chunk)) / elapsed / 1e6


def bench_run(bench, name, server, *args, size="1KiB"):
    before = disk_written_bytes()
    read_before = metric(server, "packet_ingest_log_read_bytes_total")
    t0 = time.monotonic()
    rc = bench.run(name, "--ingest-addr", server.ingest, "--grpc-addr", server.grpc, "--size", size, *args,
                   pids=[server.pid], timeout=600)
    elapsed = time.monotonic() - t0
    fact(f"{name}.disk_mb_per_s", f"{(disk_written_bytes() - before) / elapsed / 1e6:.0f}")
    read = metric(server, "packet_ingest_log_read_bytes_total") - read_before
    fact(f"{name}.log_read_mb_per_s", f"{read / elapsed / 1e6:.0f}")
    if rc != 0:
        log(f"  {name}: bench exited {rc} {benchlib.tail(RESULTS / f'{name}.err', 2)}")
    return rc


def data_dir_server(name, directory, *args):
    # The default policy with a log: catch-up (lossless, and producers never
    # wait for a subscriber; in block mode they would wait for the catch-up one).
    return benchlib.PacketIngest(RESULTS / f"{name}.server.log", "--data-dir", directory, *args)


def throughput(bench, scratch):
    with benchlib.PacketIngest(RESULTS / "memory.server.log", "--slow-subscriber", "block") as server:
        bench_run(bench, "memory", server, "--duration", DURATION)
        # The latency of memory mode at the paced catch-up case's live rate, beside it.
        bench_run(bench, "memory-paced", server, "--duration", DURATION, "--rate", str(LIVE_RATE))
    directory = Path(scratch) / "throughput"
    with data_dir_server("data-dir", directory) as server:
        bench_run(bench, "data-dir", server, "--duration", DURATION)
        bench_run(bench, "data-dir-again", server, "--duration", DURATION)
    shutil.rmtree(directory, ignore_errors=True)
    # The log's own cost: memory mode's policy, producers wait for the
    # subscriber, so it never falls off the ring and reads the log.
    with data_dir_server("data-dir-block", directory, "--slow-subscriber", "block") as server:
        bench_run(bench, "data-dir-block", server, "--duration", DURATION)
    shutil.rmtree(directory, ignore_errors=True)
    # What the log's O_DIRECT writes buy: the same, every write through the page cache.
    with data_dir_server("data-dir-buffered", directory, "--slow-subscriber", "block", "--log-io", "buffered") as server:
        bench_run(bench, "data-dir-buffered", server, "--duration", DURATION)
    shutil.rmtree(directory, ignore_errors=True)
    # The goal's pair once more, each on a fresh server as above: the verdict
    # is on the two pairs' sums, so drift in the machine's speed hits both.
    with benchlib.PacketIngest(RESULTS / "memory-2.server.log", "--slow-subscriber", "block") as server:
        bench_run(bench, "memory-2", server, "--duration", DURATION)
    with data_dir_server("data-dir-2", directory) as server:
        bench_run(bench, "data-dir-2", server, "--duration", DURATION)
    shutil.rmtree(directory, ignore_errors=True)
    if not shutil.which("nats-server"):
        benchlib.apt_install(["nats-server"])
    if not shutil.which("nats-server"):
        log("  no nats-server: the JetStream case is left out")
        return
    store = Path(scratch) / "jetstream"
    nats_log = RESULTS / "jetstream.nats.log"
    with benchlib.Process(["nats-server", "-a", "127.0.0.1", "-p", "-1", "-js", "-sd", store], nats_log) as nats:
        ready = lambda: "Server is ready" in nats_log.read_text(errors="replace")  # noqa: E731
        cilib.wait_until(lambda: ready() or not nats.running(), 10, 0.1)
        port = re.search(r"Listening for client connections on 127\.0\.0\.1:(\d+)", nats_log.read_text(errors="replace"))
        if not (ready() and port):
            log(f"  nats-server did not start: {benchlib.tail(nats_log)}")
            return
        before = disk_written_bytes()
        t0 = time.monotonic()
        bench.run("jetstream", "--target", "jetstream", "--nats-url", f"nats://127.0.0.1:{port.group(1)}",
                  "--size", "1KiB", "--duration", DURATION, pids=[nats.pid], timeout=600)
        fact("jetstream.disk_mb_per_s", f"{(disk_written_bytes() - before) / (time.monotonic() - t0) / 1e6:.0f}")
    shutil.rmtree(store, ignore_errors=True)


def catch_up(bench, scratch):
    directory = Path(scratch) / "catch-up"
    with data_dir_server("catch-up", directory) as server:
        bench_run(bench, "catch-up-fill", server, "--count", CATCHUP_PACKETS)
        # What one packet takes in the log (record, framing, index), to turn the
        # catch-up subscriber's packets into bytes of log it read.
        log_bytes = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        fact("catch_up.log_bytes_per_packet", f"{log_bytes / CATCHUP_PACKETS:.1f}")
        # Live traffic as fast as the machine takes it, then paced at LIVE_RATE
        # (room left for the catch-up; its latency shows what the catch-up costs it).
        catch_up_beside_live(server, log_bytes, "", [])
        catch_up_beside_live(server, log_bytes, "paced-", ["--rate", str(LIVE_RATE)])
    shutil.rmtree(directory, ignore_errors=True)


def catch_up_beside_live(server, log_bytes, prefix, live_args):
    """A live run alone, then the same with a subscriber reading CATCHUP_PACKETS
    from sequence 1 started 1 s in. Facts under `{prefix}catch_up.`; bench
    results `{prefix}live-alone` and `{prefix}live-with-catch-up`."""
    key = prefix.replace("-", "_") + "catch_up"
    # Let earlier writes reach the disk, so the live runs start alike.
    subprocess.run(["sync"])
    bench_run(BENCH, f"{prefix}live-alone", server, "--duration", DURATION, *live_args)
    subprocess.run(["sync"])
    read_before = metric(server, "packet_ingest_log_read_bytes_total")
    argv = [SUBSCRIBER, "--addr", f"http://{server.grpc}", "--from", "1", "--count", str(CATCHUP_PACKETS),
            "--quiet", "--no-gaps", "--timeout", "300"]
    seconds = int(DURATION.rstrip("s"))
    live = subprocess.Popen([benchlib.BENCH_BIN, "--json", "--quiet", "--server-pid", str(server.pid),
                             "--ingest-addr", server.ingest, "--grpc-addr", server.grpc, "--size", "1KiB",
                             "--duration", DURATION, *live_args],
                            stdout=open(RESULTS / f"{prefix}live-with-catch-up.json", "w"),
                            stderr=open(RESULTS / f"{prefix}live-with-catch-up.err", "w"),
                            env=dict(os.environ, RUST_LOG="warn"))
    time.sleep(1)
    t0 = time.monotonic()
    busy_before = benchlib.machine_busy_seconds()
    disk_before = (disk_bytes(5), disk_bytes(9))
    # Only waited-for children count: the catch-up client, not the live bench still running.
    child_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    catcher = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=open(RESULTS / f"{prefix}catch-up.err", "w"),
                             timeout=seconds + 300)
    elapsed = time.monotonic() - t0
    child_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = benchlib.machine_busy_seconds() - busy_before
    disk_read, disk_written = disk_bytes(5) - disk_before[0], disk_bytes(9) - disk_before[1]
    client = (child_after.ru_utime + child_after.ru_stime) - (child_before.ru_utime + child_before.ru_stime)
    read = metric(server, "packet_ingest_log_read_bytes_total") - read_before
    live.wait(timeout=seconds + 120)
    fact(f"{key}.rc", catcher.returncode)
    fact(f"{key}.packets", CATCHUP_PACKETS)
    fact(f"{key}.seconds", f"{elapsed:.2f}")
    fact(f"{key}.log_read_bytes", int(read))
    fact(f"{key}.own_mb_per_s", f"{log_bytes / elapsed / 1e6:.0f}")
    fact(f"{key}.client_cores", f"{client / elapsed:.2f}")
    fact(f"{key}.machine_busy_cores", f"{busy / elapsed:.2f}")
    fact(f"{key}.disk_read_mb_per_s", f"{disk_read / elapsed / 1e6:.0f}")
    fact(f"{key}.disk_write_mb_per_s", f"{disk_written / elapsed / 1e6:.0f}")
    fact(f"{key}.overlapped_live", "yes" if elapsed < seconds - 1 else "no (it outlasted the live run)")


def listening_delay(log_path, exec_wall):
    """Seconds from exec to the listening line's own timestamp."""
    for line in Path(log_path).read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("fields", {}).get("message") == cilib.LISTENING:
            stamp = datetime.datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()
            return stamp - exec_wall
    return None


def start_up(bench, scratch):
    directory = Path(scratch) / "start-up"
    count = START_LOG_GIB * (1 << 30) // (64 << 10)
    server = data_dir_server("start-up-fill", directory)
    try:
        bench_run(bench, "start-up-fill", server, "--count", count, size="64KiB")
        server.process.kill()  # kill -9: recovery must scan the tail, not the log
        server.process.wait()
        log_bytes = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        fact("start_up.log_bytes", log_bytes)
        for restart in range(START_RESTARTS):
            name = f"start-up-{restart + 1}"
            exec_wall = time.time()
            server = data_dir_server(name, directory)
            fact(f"{name}.ms", f"{listening_delay(RESULTS / f'{name}.server.log', exec_wall) * 1000:.0f}")
            fact(f"{name}.scanned_bytes", int(metric(server, "packet_ingest_log_recovery_scanned_bytes")))
            server.process.kill()
            server.process.wait()
    finally:
        server.kill()
        shutil.rmtree(directory, ignore_errors=True)


def main():
    global SUBSCRIBER, BENCH
    started = time.time()
    shutil.rmtree(RESULTS, ignore_errors=True)
    RESULTS.mkdir(parents=True)
    SUBSCRIBER = str(Path(benchlib.BIN).parent / "examples" / "rust_subscriber")
    if not os.path.exists(SUBSCRIBER):
        log("building the rust_subscriber example")
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "packet-ingest-protocol", "--example",
                        "rust_subscriber"], cwd=ROOT, stdout=sys.stderr, check=True)
        SUBSCRIBER = str(ROOT / "target" / "release" / "examples" / "rust_subscriber")
    bench = BENCH = benchlib.Bench(RESULTS)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-durable.", dir=SCRATCH) as scratch:
        fact("disk.write_mb_per_s", f"{disk_speed(scratch):.0f}")
        throughput(bench, scratch)
        catch_up(bench, scratch)
        start_up(bench, scratch)
    (RESULTS / "facts.txt").write_text("".join(f"{k}={v}\n" for k, v in FACTS.items()))
    benchlib.write_machine(RESULTS, started,
                           commit=benchlib.commit(("crates", "proto", "Cargo.toml", "Cargo.lock"),
                                                  " plus uncommitted source changes"),
                           nats=benchlib.version(["nats-server", "--version"]),
                           settings=f"DURATION={DURATION} CATCHUP_PACKETS={CATCHUP_PACKETS} "
                                    f"LIVE_RATE={LIVE_RATE} START_LOG_GIB={START_LOG_GIB} START_RESTARTS={START_RESTARTS}")
    report.render("durable", RESULTS, OUT)
    log(f"done in {time.time() - started:.0f} s; raw results in {RESULTS}")


if __name__ == "__main__":
    benchlib.build_binaries()
    main()
