#!/usr/bin/env python3
"""What gRPC compression costs and saves, in one run on this machine: one
packet-ingest (release build, loopback, `--compression gzip,zstd`,
`--slow-subscriber block`: lossless) driven by `packet-ingest-bench` with
1 KiB payloads of two kinds:
  - text:   log lines with varying values (`--payload text`), which compress
            the way real text payloads do,
  - random: random bytes (`--payload random`), which do not compress,
each with Subscribe responses uncompressed, gzip and zstd (one producer, one
subscriber), plus text with 4 subscribers sharing one compressed encoding per
batch. The subscribers count the bytes their sockets read (HTTP/2 framing
included); the server's CPU comes from /proc. Then writes a section into
BENCHMARKS.md, between the compression.py GENERATED markers (bench/report.py).

usage: bench/compression.py      (from anywhere; about 1 minute on 2 cores, plus the build)

Environment (defaults in brackets):
  DURATION [5s]          length of each run
  PACKET_INGEST_BIN      use this binary instead of building target/release
  OUT [BENCHMARKS.md]    where the section goes
  RESULTS_DIR [target/bench-compression]   raw JSON and the server log of every run
"""

import os
import shutil
import time
from pathlib import Path

import benchlib
import report
from benchlib import ROOT, log, setting

DURATION = setting("DURATION", "5s")
OUT = ROOT / setting("OUT", "BENCHMARKS.md")
RESULTS = Path(os.environ.get("RESULTS_DIR") or ROOT / "target" / "bench-compression")


def main():
    started = time.time()
    shutil.rmtree(RESULTS, ignore_errors=True)
    RESULTS.mkdir(parents=True)
    bench = benchlib.Bench(RESULTS)
    cases = [(f"{payload}-{compression}", payload, compression, 1)
             for payload in report.COMPRESSION_PAYLOADS for compression in report.COMPRESSIONS]
    cases += [(f"text-{compression}-4sub", "text", compression, 4) for compression in report.COMPRESSIONS]
    for name, payload, compression, subscribers in cases:
        # A fresh server per case, so one case's history or allocator state
        # cannot carry into the next.
        with benchlib.PacketIngest(RESULTS / f"{name}.server.log", "--compression", "gzip,zstd",
                                   "--slow-subscriber", "block") as server:
            rc = bench.run(name, "--ingest-addr", server.ingest, "--grpc-addr", server.grpc,
                           "--size", "1KiB", "--duration", DURATION, "--payload", payload,
                           "--compression", compression, "--subscribers", subscribers, pids=[server.pid])
        if rc != 0:
            log(f"  {name}: bench exited {rc} {benchlib.tail(RESULTS / f'{name}.err', 2)}")
    benchlib.write_machine(RESULTS, started,
                           commit=benchlib.commit(("crates", "proto", "Cargo.toml", "Cargo.lock"),
                                                  " plus uncommitted source changes"),
                           settings=f"DURATION={DURATION}")
    report.render("compression", RESULTS, OUT)
    log(f"done in {time.time() - started:.0f} s; raw results in {RESULTS}")


if __name__ == "__main__":
    benchlib.build_binaries()
    main()
