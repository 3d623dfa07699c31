#!/usr/bin/env python3
"""Cluster mode against single-process mode on this machine, in one run, all
driven by the same `packet-ingest-bench` client (1 producer, 1 subscriber,
loopback, every server with --slow-subscriber block):
  - single:     one packet-ingest process, no NATS,
  - cluster-1:  one replica with --cluster-nats (producer and subscriber on it),
  - cluster-2:  two replicas on the same stream, producer on replica A and
                subscriber on replica B,
for 1 KiB and 64 B unpaced throughput and for 1 KiB paced at RATE (latency);
and, for the latency tail's origin, JetStream on its own paced at RATE with the
same client (acked publishes, an ordered consumer). Two bounds from the same
run: JetStream's own ceiling (alone, 64 KiB messages, unpaced), which cluster
mode cannot exceed since every packet goes through it; and what this machine's
kernel charges per byte written into fresh page cache, which nats-server's
file store pays for every byte it stores.
Every case gets its own nats-server with a fresh JetStream store directory
and its own stream name, so no run sees another's data. nats-server's CPU is
read from /proc/PID/stat around each run, beside the replicas' (the bench's
--server-pid). Then writes a section at the end of BENCHMARKS.md, between the
cluster.py GENERATED markers (bench/report.py; compare.py's section is left alone).

usage: bench/cluster.py      (from anywhere; 1-2 minutes on 2 cores, plus the build)

Environment (defaults in brackets):
  DURATION [5s]          length of each unpaced throughput run (whole seconds)
  PACED_DURATION [10s]   length of each paced latency run
  RATE [10000]           paced rate, packets/s (1 KiB payloads)
  DRAIN_TIMEOUT [5s]     bench --drain-timeout: how long a subscriber waits
                         without progress before the rest counts as lost
  CASE_TIMEOUT [60]      seconds on top of the duration before a stuck bench
                         run is killed and reported as such
  PACKET_INGEST_BIN      use this binary instead of building target/release
  OUT [BENCHMARKS.md]    where the section goes
  RESULTS_DIR [target/bench-cluster]   raw JSON and logs of every run
"""

import os
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import report
from benchlib import ROOT, cilib, log, setting

DURATION = setting("DURATION", "5s")
PACED_DURATION = setting("PACED_DURATION", "10s")
RATE = setting("RATE", "10000")
DRAIN_TIMEOUT = setting("DRAIN_TIMEOUT", "5s")
CASE_TIMEOUT = int(setting("CASE_TIMEOUT", "60"))
OUT = ROOT / setting("OUT", "BENCHMARKS.md")
RESULTS = Path(os.environ.get("RESULTS_DIR") or ROOT / "target" / "bench-cluster")
# The longest run, in whole seconds: what CASE_TIMEOUT is added to.
LONGEST = max(int(n) for n in re.findall(r"\d+", f"{DURATION} {PACED_DURATION}"))


class Case:
    """The processes of one case: at most one nats-server, and the replicas."""

    def __init__(self, name, scratch):
        self.name, self.scratch = name, scratch
        self.nats, self.nats_url, self.store = None, None, None
        self.replicas = []  # (name, benchlib.PacketIngest)

    def start_nats(self):
        """A nats-server with JetStream on a random port and a fresh store."""
        self.store = tempfile.mkdtemp(prefix=f"js-{self.name}.", dir=self.scratch)
        nats_log = RESULTS / f"{self.name}.nats.log"
        self.nats = benchlib.Process(["nats-server", "-a", "127.0.0.1", "-p", "-1", "-js", "-sd", self.store], nats_log)
        ready = lambda: "Server is ready" in nats_log.read_text(errors="replace")  # noqa: E731
        cilib.wait_until(lambda: ready() or not self.nats.running(), 10, 0.1)
        port = re.search(r"Listening for client connections on 127\.0\.0\.1:(\d+)", nats_log.read_text(errors="replace"))
        if not (ready() and port):
            log(f"  nats-server did not start: {benchlib.tail(nats_log)}")
            return False
        self.nats_url = f"nats://127.0.0.1:{port.group(1)}"
        return True

    def start_replica(self, name, *args):
        try:
            server = benchlib.PacketIngest(RESULTS / f"{self.name}.{name}.log", "--slow-subscriber", "block",
                                           "--shutdown-grace", "3s", *args)
        except cilib.Fatal as error:
            log(f"  packet-ingest {name} did not start: {error}")
            return False
        self.replicas.append((name, server))
        return True

    def start(self, setup):
        if setup == "single":
            return self.start_replica("A")
        if not self.start_nats():
            return False
        if setup == "jetstream":
            return True
        cluster = ("--cluster-nats", self.nats_url, "--cluster-stream", "BENCH_" + self.name.upper().replace("-", "_"))
        return self.start_replica("A", *cluster) and (setup == "cluster-1" or self.start_replica("B", *cluster))

    def stop(self):
        # Replicas first (they drain into NATS on SIGTERM), then nats-server.
        for _, server in self.replicas:
            server.stop(10)
        if self.nats:
            self.nats.stop(10)
        if self.store:
            shutil.rmtree(self.store, ignore_errors=True)


def run_case(bench, scratch, name, setup, *args):
    """Starts SETUP, runs the bench once, stops everything. Results: NAME.json (the
    bench's JSON), NAME.meta (exit status, nats-server CPU, who died), NAME.*.log."""
    meta = []
    case = Case(name, scratch)
    try:
        if not case.start(setup):
            meta.append("setup_failed=1")
            return
        if setup == "jetstream":
            # JetStream alone, same client: publishes with acks, an ordered consumer.
            target = ["--target", "jetstream", "--nats-url", case.nats_url]
        else:
            # Producer on replica A, subscriber on the last replica started (B in cluster-2).
            ingest, grpc = case.replicas[0][1].ingest, case.replicas[-1][1].grpc
            target = ["--target", "packet-ingest", "--ingest-addr", ingest, "--grpc-addr", grpc]
        nats_before = benchlib.cpu_seconds(case.nats.pid) if case.nats else None
        busy_before, t0 = benchlib.machine_busy_seconds(), time.time()
        rc = bench.run(name, *target, "--drain-timeout", DRAIN_TIMEOUT, *args,
                       pids=[s.pid for _, s in case.replicas], timeout=LONGEST + CASE_TIMEOUT)
        t1, busy_after = time.time(), benchlib.machine_busy_seconds()
        nats_after = benchlib.cpu_seconds(case.nats.pid) if case.nats else None
        meta += [f"rc={rc}", f"machine_busy_s={busy_after - busy_before:.2f}", f"bench_wall_s={t1 - t0:.2f}",
                 "target=" + " ".join(target)]
        if case.nats:
            nats_s = "" if nats_before is None or nats_after is None else f"{nats_after - nats_before:.2f}"
            meta.append(f"nats_s={nats_s}")
        meta += [f"died={who}" for who, server in case.replicas if not server.running()]
        if case.nats and not case.nats.running():
            meta.append("died=nats-server")
        if rc == 124:
            meta.append(f"timed_out={LONGEST + CASE_TIMEOUT}")
        if rc != 0:
            log(f"  {name}: bench exited {rc} {benchlib.tail(RESULTS / f'{name}.err', 2)}")
    finally:
        case.stop()
        (RESULTS / f"{name}.meta").write_text("".join(line + "\n" for line in meta))


# JetStream's own ceiling is measured with messages this large: its cost per
# message then hardly counts, only its cost per byte.
CEILING_SIZE = "64KiB"


def page_cache_cost(directory):
    """System CPU (ns per byte) and MB/s of writing 1 GiB in 4 MiB writes into
    a new file: every page is a fresh page-cache page, as in a file store that
    keeps what it writes cached (nats-server's). Then fsync and delete."""
    path = Path(directory) / "page-cache.tmp"
    chunk = os.urandom(4 << 20)
    count = 256
    before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    started = time.monotonic()
    with open(path, "wb") as f:
        for _ in range(count):
            f.write(chunk)
        f.flush()
        elapsed = time.monotonic() - started
        system = resource.getrusage(resource.RUSAGE_SELF).ru_stime - before
        os.fsync(f.fileno())
    path.unlink()
    written = count * len(chunk)
    return system * 1e9 / written, written / elapsed / 1e6


def main():
    started = time.time()
    shutil.rmtree(RESULTS, ignore_errors=True)
    RESULTS.mkdir(parents=True)
    if not shutil.which("nats-server"):
        benchlib.apt_install(["nats-server"])
    if not shutil.which("nats-server"):
        sys.exit("nats-server is needed for cluster mode")
    bench = benchlib.Bench(RESULTS)
    with tempfile.TemporaryDirectory(prefix="bench-cluster.") as scratch:
        ns_per_byte, mb_per_s = page_cache_cost(scratch)
        log(f"  fresh page cache: {ns_per_byte:.2f} ns of system CPU per byte, {mb_per_s:.0f} MB/s")
        for prefix, args in (("1k", ["--size", "1KiB", "--duration", DURATION]),
                             ("64", ["--size", "64", "--duration", DURATION]),
                             ("paced", ["--size", "1KiB", "--rate", RATE, "--duration", PACED_DURATION])):
            for setup in ("single", "cluster-1", "cluster-2"):
                run_case(bench, scratch, f"{prefix}-{setup}", setup, *args)
        # Where a latency tail comes from: JetStream on its own, paced alike.
        run_case(bench, scratch, "paced-jetstream", "jetstream", "--size", "1KiB", "--rate", RATE,
                 "--duration", PACED_DURATION)
        # The most JetStream itself delivers here: large messages, unpaced.
        run_case(bench, scratch, "ceiling-jetstream", "jetstream", "--size", CEILING_SIZE,
                 "--duration", DURATION)

    # Only changes to what the binary is built from count (not this run's own edit of BENCHMARKS.md).
    benchlib.write_machine(RESULTS, started,
                           commit=benchlib.commit(("crates", "proto", "Cargo.toml", "Cargo.lock"),
                                                  " plus uncommitted source changes"),
                           nats=benchlib.version(["nats-server", "--version"]),
                           settings=f"DURATION={DURATION} PACED_DURATION={PACED_DURATION} RATE={RATE} "
                                    f"DRAIN_TIMEOUT={DRAIN_TIMEOUT}",
                           ceiling_size=CEILING_SIZE,
                           page_cache_ns_per_byte=f"{ns_per_byte:.3f}",
                           page_cache_mb_per_s=f"{mb_per_s:.0f}")
    report.render("cluster", RESULTS, OUT)
    log(f"done in {time.time() - started:.0f} s; raw results in {RESULTS}")


if __name__ == "__main__":
    benchlib.build_binaries()
    main()
