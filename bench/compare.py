#!/usr/bin/env python3
"""Side-by-side benchmark on this machine, in one run, all driven by the same
`packet-ingest-bench` client:
  - single-core SHA-256 of the same bytes the server hashes (`openssl speed`),
  - packet-ingest (release build, loopback, --slow-subscriber block: lossless),
  - the seed-design peer (../shared/peers/seed_design/run, Python + grpcio),
  - nats-server (Debian package; no verification), with two NATS clients:
    `raw` (a protocol client as cheap as ours) and `async-nats`.
Then writes the tables into BENCHMARKS.md, between the compare.py GENERATED
markers (bench/report.py; the raw results stay in RESULTS_DIR).

usage: bench/compare.py      (from anywhere; about 5 minutes on 2 cores, plus the build)

Environment (defaults in brackets):
  DURATION [10s]        length of each packet-ingest and NATS throughput run (whole seconds)
  PACED_DURATION [10s]  length of each paced latency run
  RATE [50000]          paced rate, packets/s (1 KiB payloads)
  SEED_COUNT_64 [2500000], SEED_COUNT_1K [1200000], SEED_COUNT_64K [24000],
  SEED_COUNT_FANOUT [600000]
                        packets per seed-design run: it has no backpressure
                        (unbounded queues), so it gets a fixed count, sized
                        for a few seconds, instead of a duration
  SHA_SECONDS [2]       openssl speed time per size
  NATS_CLIENTS ["raw async-nats"]
  SKIP_SEED=1, SKIP_NATS=1   leave a target out
  PERF [1]              also profile packet-ingest (perf record -g) during an
                        extra 64 B and 64 KiB run, and list the top symbols
  PACKET_INGEST_BIN     use this binary instead of building target/release
  SHARED [../shared]    the shared directory (peers/), relative to the repo root
  OUT [BENCHMARKS.md]   where the tables go
  RESULTS_DIR [target/bench-compare]   raw JSON of every run
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import benchlib
import report
from benchlib import ROOT, log, setting

DURATION = setting("DURATION", "10s")
PACED_DURATION = setting("PACED_DURATION", "10s")
RATE = setting("RATE", "50000")
SEED_COUNTS = {k: int(setting(f"SEED_COUNT_{k}", v)) for k, v in
               (("64", "2500000"), ("1K", "1200000"), ("64K", "24000"), ("FANOUT", "600000"))}
SHA_SECONDS = setting("SHA_SECONDS", "2")
NATS_CLIENTS = setting("NATS_CLIENTS", "raw async-nats").split()
PERF = setting("PERF", "1") == "1"
# Suffixes of the alternated memory-mode / `--data-dir` pairs (fresh servers).
DISK_PAIRS = ("", "-2")
SKIP_SEED, SKIP_NATS = setting("SKIP_SEED", "0") == "1", setting("SKIP_NATS", "0") == "1"
SHARED = ROOT / setting("SHARED", "../shared")
OUT = ROOT / setting("OUT", "BENCHMARKS.md")
RESULTS = Path(os.environ.get("RESULTS_DIR") or ROOT / "target" / "bench-compare")

# The cases every target runs: (suffix, bench arguments). The seed design gets
# packet counts instead of durations (see above).
CASES = [
    ("64", ["--size", "64", "--duration", DURATION]),
    ("1k", ["--size", "1KiB", "--duration", DURATION]),
    ("64k", ["--size", "64KiB", "--duration", DURATION]),
    ("1k-4sub", ["--size", "1KiB", "--subscribers", "4", "--duration", DURATION]),
    ("64k-4prod", ["--size", "64KiB", "--producers", "4", "--duration", DURATION]),
    ("paced", ["--size", "1KiB", "--rate", RATE, "--duration", PACED_DURATION]),
]
SEED_CASES = [
    ("64", ["--size", "64", "--count", SEED_COUNTS["64"]]),
    ("1k", ["--size", "1KiB", "--count", SEED_COUNTS["1K"]]),
    ("64k", ["--size", "64KiB", "--count", SEED_COUNTS["64K"]]),
    ("1k-4sub", ["--size", "1KiB", "--subscribers", "4", "--count", SEED_COUNTS["FANOUT"]]),
    ("64k-4prod", ["--size", "64KiB", "--producers", "4", "--count", SEED_COUNTS["64K"] // 4]),
    ("paced", ["--size", "1KiB", "--rate", RATE, "--duration", PACED_DURATION]),
]


def profile_case(bench, name, pid, args):
    """bench.run under `perf record` of the server; keeps the top of `perf report`."""
    seconds = int(DURATION[:-1]) if re.fullmatch(r"\d+s", DURATION) else 5
    data = RESULTS / f"{name}.perf.data"
    with open(RESULTS / f"{name}.perf.err", "w") as err:
        perf = subprocess.Popen(["perf", "record", "-g", "-F", "499", "-p", str(pid), "-o", data, "--",
                                 "sleep", str(seconds - 1 if seconds > 2 else 1)], stdout=subprocess.DEVNULL, stderr=err)
    time.sleep(0.2)  # let perf attach before the load starts
    bench.run(name, *args)
    perf.wait()
    if data.exists() and data.stat().st_size:
        def report_lines(*sort):
            out = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", *sort, "-g", "none", "--stdio"],
                                 capture_output=True, text=True).stdout
            return [line.rstrip() for line in out.splitlines() if re.match(r" +[0-9]", line)]
        # Self time; `-g none` drops call chains; perf's empty IPC columns are cut.
        top = [re.sub(r"\s+-\s+-\s*$", "", line) for line in report_lines("dso,sym", "--percent-limit", "0.7")]
        (RESULTS / f"{name}.top.txt").write_text("".join(line + "\n" for line in top[:20]))
        (RESULTS / f"{name}.dso.txt").write_text("".join(line + "\n" for line in report_lines("dso")[:6]))


def sha256_speed():
    """Single-core SHA-256 of the bytes the server hashes: header bytes 0..12 plus
    the payload (76, 1036, 65548 bytes)."""
    log("openssl speed -evp sha256 (one core)")
    for nbytes in (76, 1036, 65548):
        out = subprocess.run(["openssl", "speed", "-evp", "sha256", "-bytes", str(nbytes), "-seconds", SHA_SECONDS,
                              "-mr"], capture_output=True, text=True).stdout
        rates = [line.split(":")[3] for line in out.splitlines() if line.startswith("+F:")]
        (RESULTS / f"sha256-{nbytes}.txt").write_text("".join(r + "\n" for r in rates))


def packet_ingest(bench):
    log("packet-ingest")
    with benchlib.PacketIngest(RESULTS / "packet-ingest.log", "--slow-subscriber", "block") as server:
        target = ["--target", "packet-ingest", "--ingest-addr", server.ingest, "--grpc-addr", server.grpc]
        for suffix, args in CASES:
            bench.run(f"pi-{suffix}", *target, *args, pids=[server.pid])
        # Publish next to TCP: the same 1 KiB packets through the RPC.
        bench.run("pi-1k-publish", *target, "--via", "publish", "--size", "1KiB", "--duration", DURATION,
                  pids=[server.pid])
        if PERF and shutil.which("perf"):
            for name, size in (("perf-64", "64"), ("perf-64k", "64KiB")):
                profile_case(bench, name, server.pid, [*target, "--size", size, "--duration", DURATION])
    # The durable stream (default fsync policy) next to memory mode, like for
    # like: each run on a fresh server (the memory-mode server above is warm
    # from the runs before: three runs in a row on one server here went 633 k,
    # 701 k, 730 k pkts/s), the two alternated twice so that drift in the
    # machine's speed hits both.
    data_dir = RESULTS / "data-dir"
    for pair in DISK_PAIRS:
        for name, extra in ((f"pi-fresh-1k{pair}", []), (f"pi-disk-1k{pair}", ["--data-dir", data_dir])):
            shutil.rmtree(data_dir, ignore_errors=True)
            with benchlib.PacketIngest(RESULTS / f"{name}.server.log", "--slow-subscriber", "block", *extra) as server:
                target = ["--target", "packet-ingest", "--ingest-addr", server.ingest, "--grpc-addr", server.grpc]
                bench.run(name, *target, "--size", "1KiB", "--duration", DURATION, pids=[server.pid])
    shutil.rmtree(data_dir, ignore_errors=True)


def seed_design(bench):
    run = SHARED / "peers" / "seed_design" / "run"
    if SKIP_SEED or not os.access(run, os.X_OK):
        return
    log("seed design")
    ingest, grpc = f"127.0.0.1:{benchlib.free_port()}", f"127.0.0.1:{benchlib.free_port()}"
    with benchlib.Process([run, "--ingest", ingest, "--grpc", grpc], RESULTS / "seed.log") as seed:
        if not (benchlib.wait_for_port(grpc, 60) and benchlib.wait_for_port(ingest, 10)):
            log(f"the seed design did not start: {benchlib.tail(RESULTS / 'seed.log')}")
            return
        # Its CPU is the main process plus the worker process (and any helper).
        pids = [seed.pid, *benchlib.descendants(seed.pid)]
        seed.also_stop = pids[1:]  # the worker outlives a SIGTERMed parent
        target = ["--target", "packet-ingest", "--ingest-addr", ingest, "--grpc-addr", grpc]
        for suffix, args in SEED_CASES:
            bench.run(f"seed-{suffix}", *target, *args, pids=pids)


def nats(bench):
    if SKIP_NATS or not shutil.which("nats-server"):
        return
    log("nats-server")
    port = benchlib.free_port()
    with benchlib.Process(["nats-server", "-a", "127.0.0.1", "-p", str(port)], RESULTS / "nats.log") as server:
        if not benchlib.wait_for_port(f"127.0.0.1:{port}", 10):
            log(f"nats-server did not start: {benchlib.tail(RESULTS / 'nats.log')}")
            return
        for client in NATS_CLIENTS:
            target = ["--target", "nats", "--nats-url", f"nats://127.0.0.1:{port}", "--nats-client", client]
            for suffix, args in CASES:
                bench.run(f"nats-{client}-{suffix}", *target, *args, pids=[server.pid])
    # JetStream with its file store, next to the durable stream.
    store = RESULTS / "jetstream"
    shutil.rmtree(store, ignore_errors=True)
    port = benchlib.free_port()
    with benchlib.Process(["nats-server", "-js", "-sd", str(store), "-a", "127.0.0.1", "-p", str(port)],
                          RESULTS / "jetstream.log") as server:
        if benchlib.wait_for_port(f"127.0.0.1:{port}", 10):
            bench.run("jetstream-1k", "--target", "jetstream", "--nats-url", f"nats://127.0.0.1:{port}",
                      "--size", "1KiB", "--duration", DURATION, pids=[server.pid])
    shutil.rmtree(store, ignore_errors=True)


def main():
    started = time.time()
    shutil.rmtree(RESULTS, ignore_errors=True)
    RESULTS.mkdir(parents=True)
    bench = benchlib.Bench(RESULTS)
    missing = [pkg for cmd, pkg, wanted in (("openssl", "openssl", True), ("nats-server", "nats-server", not SKIP_NATS),
                                             ("perf", "linux-perf", PERF)) if wanted and not shutil.which(cmd)]
    benchlib.apt_install(missing)
    if not SKIP_SEED and subprocess.run([sys.executable, "-c", "import grpc, grpc_tools"],
                                        capture_output=True).returncode != 0:
        log("pip install grpcio grpcio-tools (for the seed design)")
        if subprocess.run([sys.executable, "-m", "pip", "install", "-q", "grpcio", "grpcio-tools"]).returncode != 0:
            log("pip install failed; the seed design will be missing")

    if shutil.which("openssl"):
        sha256_speed()
    packet_ingest(bench)
    seed_design(bench)
    nats(bench)

    python = subprocess.run([sys.executable, "-c", 'import sys, grpc; print("Python %d.%d.%d" % sys.version_info[:3], '
                             '"grpcio", grpc.__version__)'], capture_output=True, text=True).stdout.strip()
    openssl = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.split()[:2] \
        if shutil.which("openssl") else []
    benchlib.write_machine(RESULTS, started, commit=benchlib.commit(("crates", "proto", "bench", "Cargo.toml", "Cargo.lock")),
                           nats=benchlib.version(["nats-server", "--version"]),
                           python=python or "none", openssl=" ".join(openssl),
                           settings=f"DURATION={DURATION} PACED_DURATION={PACED_DURATION} RATE={RATE} "
                                    + " ".join(f"SEED_COUNT_{k}={v}" for k, v in SEED_COUNTS.items()))
    report.render("compare", RESULTS, OUT)
    log(f"done in {time.time() - started:.0f} s; raw results in {RESULTS}")


if __name__ == "__main__":
    benchlib.build_binaries()
    main()
