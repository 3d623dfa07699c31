#!/usr/bin/env bash
# Side-by-side benchmark on this machine, in one run, all driven by the same
# `packet-ingest-bench` client:
#   - single-core SHA-256 of the same bytes the server hashes (`openssl speed`),
#   - packet-ingest (release build, loopback, --slow-subscriber block: lossless),
#   - the seed-design peer (../shared/peers/seed_design/run, Python + grpcio),
#   - nats-server (Debian package; no verification), with two NATS clients:
#     `raw` (a protocol client as cheap as ours) and `async-nats`.
# Then writes the tables into BENCHMARKS.md, between the GENERATED markers.
#
# usage: bench/compare.sh      (from anywhere; about 5 minutes on 2 cores, plus the build)
#
# Environment (defaults in brackets):
#   DURATION [10s]        length of each packet-ingest and NATS throughput run (whole seconds)
#   PACED_DURATION [10s]  length of each paced latency run
#   RATE [50000]          paced rate, packets/s (1 KiB payloads)
#   SEED_COUNT_64 [2500000], SEED_COUNT_1K [1200000], SEED_COUNT_64K [24000],
#   SEED_COUNT_FANOUT [600000]
#                         packets per seed-design run: it has no backpressure
#                         (unbounded queues), so it gets a fixed count, sized
#                         for a few seconds, instead of a duration
#   SHA_SECONDS [2]       openssl speed time per size
#   NATS_CLIENTS ["raw async-nats"]
#   SKIP_SEED=1, SKIP_NATS=1   leave a target out
#   PERF [1]              also profile packet-ingest (perf record -g) during an
#                         extra 64 B and 64 KiB run, and list the top symbols
#   PACKET_INGEST_BIN     use this binary instead of building target/release
#   SHARED [../shared]    the shared directory (peers/), relative to the repo root
#   OUT [BENCHMARKS.md]   where the tables go
#   RESULTS_DIR [target/bench-compare]   raw JSON of every run
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

DURATION=${DURATION:-10s}
PACED_DURATION=${PACED_DURATION:-10s}
RATE=${RATE:-50000}
SEED_COUNT_64=${SEED_COUNT_64:-2500000}
SEED_COUNT_1K=${SEED_COUNT_1K:-1200000}
SEED_COUNT_64K=${SEED_COUNT_64K:-24000}
SEED_COUNT_FANOUT=${SEED_COUNT_FANOUT:-600000}
SHA_SECONDS=${SHA_SECONDS:-2}
NATS_CLIENTS=${NATS_CLIENTS:-raw async-nats}
PERF=${PERF:-1}
SHARED=${SHARED:-../shared}
OUT=${OUT:-BENCHMARKS.md}
results=${RESULTS_DIR:-$root/target/bench-compare}
case "$SHARED" in /*) ;; *) SHARED=$root/$SHARED ;; esac

log() { printf '[compare %s] %s\n' "$(date +%T)" "$*" >&2; }
started_at=$(date +%s)

rm -rf "$results"
mkdir -p "$results"

# --- build and prerequisites -------------------------------------------------
if [ -n "${PACKET_INGEST_BIN:-}" ]; then
  bin=$PACKET_INGEST_BIN
else
  log "building the release binary"
  cargo build --release --locked --bin packet-ingest --bin packet-ingest-bench >&2
  bin=$root/target/release/packet-ingest
fi
# The load client is its own binary, next to the server's.
bench_bin=${PACKET_INGEST_BENCH_BIN:-$(dirname "$bin")/packet-ingest-bench}

missing=()
command -v openssl >/dev/null || missing+=(openssl)
[ "${SKIP_NATS:-0}" = 1 ] || command -v nats-server >/dev/null || missing+=(nats-server)
[ "$PERF" != 1 ] || command -v perf >/dev/null || missing+=(linux-perf)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} (Debian packages)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >&2 ||
    log "could not install ${missing[*]}; those parts will be missing"
fi
if [ "${SKIP_SEED:-0}" != 1 ] && ! python3 -c 'import grpc, grpc_tools' 2>/dev/null; then
  log "pip install grpcio grpcio-tools (for the seed design)"
  python3 -m pip install -q grpcio grpcio-tools >&2 || log "pip install failed; the seed design will be missing"
fi

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for_port() { # host port seconds
  local deadline=$((SECONDS + $3))
  until python3 -c 'import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 1)' "$1" "$2" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.2
  done
}

descendants() {
  local child
  for child in $(ps --ppid "$1" -o pid= 2>/dev/null); do
    echo "$child"
    descendants "$child"
  done
}

# The server under test: its pid, and every process whose CPU counts as its.
server_pid=
server_pids=()
stop_server() {
  [ -n "$server_pid" ] || return 0
  local pids=("${server_pids[@]}")
  kill -TERM "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  # The seed design's worker process outlives a SIGTERMed parent.
  for pid in "${pids[@]}"; do
    [ "$pid" = "$server_pid" ] || kill -TERM "$pid" 2>/dev/null || true
  done
  server_pid=
  server_pids=()
}
trap stop_server EXIT

pid_args() {
  local pid
  for pid in "${server_pids[@]}"; do printf -- '--server-pid\n%s\n' "$pid"; done
}

# run_case NAME BENCH-ARGS...: one bench run, its JSON in $results/NAME.json.
run_case() {
  local name=$1
  shift
  local pids
  mapfile -t pids < <(pid_args)
  log "  $name: $*"
  RUST_LOG=warn "$bench_bin" --json --quiet "${pids[@]}" "$@" \
    >"$results/$name.json" 2>"$results/$name.err" || true
  if [ ! -s "$results/$name.json" ]; then
    log "  $name gave no result: $(tail -n 2 "$results/$name.err" | tr '\n' ' ')"
    rm -f "$results/$name.json"
  fi
}

# profile_case NAME BENCH-ARGS...: run_case under `perf record` of the server.
profile_case() {
  local name=$1
  shift
  local seconds=${DURATION%s}
  [[ $seconds =~ ^[0-9]+$ ]] || seconds=5
  perf record -g -F 499 -p "$server_pid" -o "$results/$name.perf.data" -- sleep "$((seconds > 2 ? seconds - 1 : 1))" \
    >/dev/null 2>"$results/$name.perf.err" &
  local perf_pid=$!
  sleep 0.2
  run_case "$name" "$@"
  wait "$perf_pid" || true
  if [ -s "$results/$name.perf.data" ]; then
    # Self time; `-g none` drops call chains, the sed drops perf's empty IPC columns.
    perf report -i "$results/$name.perf.data" --no-children --sort dso,sym -g none --stdio \
      --percent-limit 0.7 2>/dev/null | grep -E '^ +[0-9]' |
      sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//; s/[[:space:]]+$//' | head -n 20 >"$results/$name.top.txt" || true
    perf report -i "$results/$name.perf.data" --no-children --sort dso -g none --stdio 2>/dev/null |
      grep -E '^ +[0-9]' | sed -E 's/[[:space:]]+$//' | head -n 6 >"$results/$name.dso.txt" || true
  fi
}

# --- single-core SHA-256 -----------------------------------------------------
# The server hashes header bytes 0..12 plus the payload: 76, 1036, 65548 bytes.
if command -v openssl >/dev/null; then
  log "openssl speed -evp sha256 (one core)"
  for bytes in 76 1036 65548; do
    openssl speed -evp sha256 -bytes "$bytes" -seconds "$SHA_SECONDS" -mr 2>/dev/null |
      awk -F: '/^\+F:/ { print $4 }' >"$results/sha256-$bytes.txt" || true
  done
fi

# --- packet-ingest -----------------------------------------------------------
log "packet-ingest"
pi_log=$results/packet-ingest.log
RUST_LOG=info "$bin" --grpc-addr 127.0.0.1:0 --ingest-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 \
  --slow-subscriber block --log-format json >/dev/null 2>"$pi_log" &
server_pid=$!
server_pids=("$server_pid")
addrs=
for _ in $(seq 1 100); do
  addrs=$(python3 -c '
import json, sys
for line in open(sys.argv[1], errors="replace"):
    try:
        fields = json.loads(line).get("fields", {})
    except ValueError:
        continue
    if fields.get("message") == "packet-ingest listening":
        print(fields["grpc_addr"], fields["ingest_addr"])
        break
' "$pi_log")
  [ -n "$addrs" ] && break
  sleep 0.1
done
if [ -z "$addrs" ]; then
  log "packet-ingest did not start: $(tail -n 3 "$pi_log")"
  exit 1
fi
read -r grpc ingest <<<"$addrs"
pi=(--target packet-ingest --ingest-addr "$ingest" --grpc-addr "$grpc")
run_case pi-64 "${pi[@]}" --size 64 --duration "$DURATION"
run_case pi-1k "${pi[@]}" --size 1KiB --duration "$DURATION"
run_case pi-64k "${pi[@]}" --size 64KiB --duration "$DURATION"
run_case pi-1k-4sub "${pi[@]}" --size 1KiB --subscribers 4 --duration "$DURATION"
run_case pi-64k-4prod "${pi[@]}" --size 64KiB --producers 4 --duration "$DURATION"
run_case pi-paced "${pi[@]}" --size 1KiB --rate "$RATE" --duration "$PACED_DURATION"
if [ "$PERF" = 1 ] && command -v perf >/dev/null; then
  profile_case perf-64 "${pi[@]}" --size 64 --duration "$DURATION"
  profile_case perf-64k "${pi[@]}" --size 64KiB --duration "$DURATION"
fi
stop_server

# --- the seed design ---------------------------------------------------------
if [ "${SKIP_SEED:-0}" != 1 ] && [ -x "$SHARED/peers/seed_design/run" ]; then
  log "seed design"
  ingest=127.0.0.1:$(free_port)
  grpc=127.0.0.1:$(free_port)
  "$SHARED/peers/seed_design/run" --ingest "$ingest" --grpc "$grpc" >"$results/seed.log" 2>&1 &
  server_pid=$!
  server_pids=("$server_pid")
  if wait_for_port 127.0.0.1 "${grpc##*:}" 60 && wait_for_port 127.0.0.1 "${ingest##*:}" 10; then
    # Its CPU is the main process plus the worker process (and any helper).
    mapfile -t -O 1 server_pids < <(descendants "$server_pid")
    seed=(--target packet-ingest --ingest-addr "$ingest" --grpc-addr "$grpc")
    run_case seed-64 "${seed[@]}" --size 64 --count "$SEED_COUNT_64"
    run_case seed-1k "${seed[@]}" --size 1KiB --count "$SEED_COUNT_1K"
    run_case seed-64k "${seed[@]}" --size 64KiB --count "$SEED_COUNT_64K"
    run_case seed-1k-4sub "${seed[@]}" --size 1KiB --subscribers 4 --count "$SEED_COUNT_FANOUT"
    run_case seed-64k-4prod "${seed[@]}" --size 64KiB --producers 4 --count "$((SEED_COUNT_64K / 4))"
    run_case seed-paced "${seed[@]}" --size 1KiB --rate "$RATE" --duration "$PACED_DURATION"
  else
    log "the seed design did not start: $(tail -n 3 "$results/seed.log" | tr '\n' ' ')"
  fi
  stop_server
fi

# --- nats-server -------------------------------------------------------------
if [ "${SKIP_NATS:-0}" != 1 ] && command -v nats-server >/dev/null; then
  log "nats-server"
  port=$(free_port)
  nats-server -a 127.0.0.1 -p "$port" >"$results/nats.log" 2>&1 &
  server_pid=$!
  server_pids=("$server_pid")
  if wait_for_port 127.0.0.1 "$port" 10; then
    for client in $NATS_CLIENTS; do
      nats=(--target nats --nats-url "nats://127.0.0.1:$port" --nats-client "$client")
      run_case "nats-$client-64" "${nats[@]}" --size 64 --duration "$DURATION"
      run_case "nats-$client-1k" "${nats[@]}" --size 1KiB --duration "$DURATION"
      run_case "nats-$client-64k" "${nats[@]}" --size 64KiB --duration "$DURATION"
      run_case "nats-$client-1k-4sub" "${nats[@]}" --size 1KiB --subscribers 4 --duration "$DURATION"
      run_case "nats-$client-64k-4prod" "${nats[@]}" --size 64KiB --producers 4 --duration "$DURATION"
      run_case "nats-$client-paced" "${nats[@]}" --size 1KiB --rate "$RATE" --duration "$PACED_DURATION"
    done
  else
    log "nats-server did not start: $(tail -n 3 "$results/nats.log" | tr '\n' ' ')"
  fi
  stop_server
fi

# --- the report --------------------------------------------------------------
{
  echo "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "cores=$(nproc)"
  echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "kernel=$(uname -r)"
  echo "commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- 2>/dev/null || echo ' plus uncommitted changes')"
  echo "nats=$(nats-server --version 2>/dev/null || echo none)"
  echo "python=$(python3 -c 'import sys, grpc; print("Python %d.%d.%d" % sys.version_info[:3], "grpcio", grpc.__version__)' 2>/dev/null || echo none)"
  echo "openssl=$(openssl version 2>/dev/null | cut -d' ' -f1-2)"
  echo "seconds=$(($(date +%s) - started_at))"
  echo "settings=DURATION=$DURATION PACED_DURATION=$PACED_DURATION RATE=$RATE SEED_COUNT_64=$SEED_COUNT_64 SEED_COUNT_1K=$SEED_COUNT_1K SEED_COUNT_64K=$SEED_COUNT_64K SEED_COUNT_FANOUT=$SEED_COUNT_FANOUT"
} >"$results/machine.txt"

python3 - "$results" "$OUT" <<'PYTHON'
import json, os, re, sys

results, out = sys.argv[1], sys.argv[2]
machine = dict(line.rstrip("\n").split("=", 1) for line in open(os.path.join(results, "machine.txt")) if "=" in line)

def load(name):
    try:
        with open(os.path.join(results, name + ".json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def sha(nbytes):
    try:
        return float(open(os.path.join(results, f"sha256-{nbytes}.txt")).read().split()[0])
    except (OSError, ValueError, IndexError):
        return None

def si(value, unit=""):
    """Three significant figures: 4.34 M, 538 k, 62.1 k."""
    if value is None:
        return "n/a"
    for scale, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= scale:
            scaled = value / scale
            digits = 2 if scaled < 10 else (1 if scaled < 100 else 0)
            return f"{scaled:.{digits}f}{suffix}{unit}"
    return f"{value:.0f} {unit}".rstrip()

def mb(value):
    return "n/a" if value is None else f"{value:,.0f} MB/s"

def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b

def fmt_ratio(value):
    return "n/a" if value is None else f"{value:.2f}×"

def loss(result):
    """Loss beside a rate: packets sent but not delivered to every subscriber."""
    if result is None:
        return ""
    sent = result["sent"]["packets"] * max(1, result["subscribers"])
    lost = result["lost"] + result["missed"]
    if result["complete"]:
        return "lossless"
    share = 100.0 * lost / sent if sent else 0.0
    extra = "" if lost else " (incomplete: " + "; ".join(
        str(s.get("error")) for s in result["subscriber"] if s.get("error")) + ")"
    return f"**lost {lost:,} ({share:.1f} %)**{extra}"

# What each case reports: pkts/s or MB/s (delivered, all subscribers together).
CASES = [
    ("64", "64 B, delivered pkts/s", "pkts", 76),
    ("1k", "1 KiB, delivered pkts/s", "pkts", 1036),
    ("64k", "64 KiB, delivered MB/s", "mb", 65548),
    ("1k-4sub", "1 KiB × 4 subscribers, aggregate delivered pkts/s", "pkts", None),
    ("64k-4prod", "64 KiB × 4 producers, delivered MB/s", "mb", None),
]

def figure(result, kind):
    if result is None:
        return None
    return result["delivered"]["pkts_per_s" if kind == "pkts" else "mb_per_s"]

def cell(result, kind, reference=None):
    if result is None:
        return "n/a"
    value = figure(result, kind)
    text = si(value) if kind == "pkts" else mb(value)
    parts = [text]
    if reference is not None:
        parts.append(f"(packet-ingest is {fmt_ratio(ratio(reference, value))})")
    parts.append(loss(result))
    return " ".join(p for p in parts if p)

clients = [c for c in ("raw", "async-nats") if any(load(f"nats-{c}-{k}") for k, *_ in CASES)]
lines = []
w = lines.append
w(f"Measured {machine.get('date')} on **{machine.get('cpu')}**, **{machine.get('cores')} cores** "
  f"(Linux {machine.get('kernel')}); packet-ingest {machine.get('commit')}, {machine.get('nats')}, "
  f"{machine.get('python')}, {machine.get('openssl')}. The whole script took {machine.get('seconds')} s.")
w("")
w(f"Reproduce: `bench/compare.sh` (this run: `{machine.get('settings')}`).")
w("")
w("### Throughput")
w("")
w("One producer and one subscriber unless noted, loopback, payload bytes (MB = 10⁶ B). "
  "packet-ingest runs with `--slow-subscriber block`, so its figures are lossless or marked. "
  "Each ratio is packet-ingest's figure divided by that column's, from this one run.")
w("")
header = ["case", "packet-ingest", "seed design"] + [f"nats-server ({c} client)" for c in clients] + ["SHA-256, 1 core (openssl)"]
w("| " + " | ".join(header) + " |")
w("|" + "---|" * len(header))
for key, label, kind, sha_bytes in CASES:
    pi = load(f"pi-{key}")
    ref = figure(pi, kind)
    row = [label, cell(pi, kind), cell(load(f"seed-{key}"), kind, ref)]
    for c in clients:
        row.append(cell(load(f"nats-{c}-{key}"), kind, ref))
    rate = sha(sha_bytes) if sha_bytes else None
    if rate is None:
        row.append("")
    elif kind == "pkts":
        row.append(f"{si(rate / sha_bytes)} hashes/s of {sha_bytes} B")
    else:
        row.append(f"{mb(rate / 1e6)} of {sha_bytes} B (packet-ingest is {fmt_ratio(ratio(ref, rate / 1e6))})")
    w("| " + " | ".join(row) + " |")
w("")

w("### Latency at a paced rate")
w("")
w("1 KiB payloads at the paced rate; the producer writes its send time (unix ns) into the payload "
  "and the subscriber subtracts it on arrival: ingest → verification → fan-out → delivery.")
w("")
w("| target | delivered pkts/s | p50 | p99 | p99.9 | max |")
w("|---|---|---|---|---|---|")
def lat_row(name, label):
    r = load(name)
    if r is None:
        return
    lat = r.get("latency_us") or {}
    def us(key):
        v = lat.get(key)
        return "n/a" if v is None else (f"{v / 1000:.2f} ms" if v >= 1000 else f"{v:.0f} µs")
    w(f"| {label} | {si(r['delivered']['pkts_per_s'])} {loss(r)} | {us('p50')} | {us('p99')} | {us('p999')} | {us('max')} |")
lat_row("pi-paced", "packet-ingest")
lat_row("seed-paced", "seed design")
for c in clients:
    lat_row(f"nats-{c}-paced", f"nats-server ({c} client)")
w("")

w("### CPU")
w("")
w("From `/proc/PID/stat` over each run (`--server-pid`; the seed design's worker process included). "
  "Cores = CPU seconds ÷ wall seconds; µs per packet = server CPU ÷ packets ingested. "
  "The load client is this same machine's `packet-ingest-bench` process.")
w("")
cpu_header = ["case"]
targets = [("pi", "packet-ingest"), ("seed", "seed design")] + [(f"nats-{c}", f"nats ({c})") for c in clients]
for _, label in targets:
    cpu_header += [f"{label}: server", f"{label}: client"]
w("| " + " | ".join(cpu_header) + " |")
w("|" + "---|" * len(cpu_header))
for key, label, kind, _ in CASES + [("paced", "paced 1 KiB", "pkts", None)]:
    row = [label.split(",")[0]]
    for prefix, _ in targets:
        r = load(f"{prefix}-{key}")
        if r is None:
            row += ["n/a", "n/a"]
            continue
        cpu = r["cpu"]
        server = "n/a" if cpu.get("server_cores") is None else f"{cpu['server_cores']:.2f} cores, {cpu['server_us_per_sent_packet']:.2f} µs/pkt"
        client = "n/a" if cpu.get("bench_cores") is None else f"{cpu['bench_cores']:.2f} cores, {cpu['bench_us_per_delivered_packet']:.2f} µs/pkt"
        row += [server, client]
    w("| " + " | ".join(row) + " |")
w("")

# Targets from issue 6.
def nats_detail(key, kind):
    parts = []
    for c in clients:
        r = load(f"nats-{c}-{key}")
        if r is not None:
            v = figure(r, kind)
            parts.append(f"{c}: {si(v) if kind == 'pkts' else mb(v)} {loss(r)}")
    return "; ".join(parts)

def verdict(ok):
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")

# Issue 6 names async-nats as the NATS client ("the same client code"); the raw
# client is the stricter reference. Each NATS target gets a verdict against both.
def nats_verdicts(ref, key, kind, need, ok):
    ratios, verdicts = [], []
    for c in ("async-nats", "raw"):
        v = figure(load(f"nats-{c}-{key}"), kind)
        if v is None:
            continue
        r = ratio(ref, v)
        ratios.append(f"{fmt_ratio(r)} vs {c}")
        verdicts.append(f"{verdict(None if r is None else (r >= need and ok))} vs {c}")
    return "; ".join(ratios) or "n/a", "; ".join(verdicts) or "n/a"

w("### Targets (issue 6)")
w("")
w("| target | measured | ratio | verdict |")
w("|---|---|---|---|")
pi64, pi1k, pi64k = load("pi-64"), load("pi-1k"), load("pi-64k")
for key, kind, pi, need_nats, need_seed, label in (
    ("64", "pkts", pi64, 2.0, 7.0, "64 B"),
    ("1k", "pkts", pi1k, 1.2, 4.0, "1 KiB"),
):
    ref = figure(pi, kind)
    lossless = pi is not None and pi["complete"]
    extra = " with zero loss" if key == "64" else ""
    ratios, verdicts = nats_verdicts(ref, key, kind, need_nats, lossless)
    w(f"| {label}: ≥ {need_nats}× NATS{extra} | packet-ingest {si(ref)} ({loss(pi)}); NATS {nats_detail(key, kind)} "
      f"| {ratios} | {verdicts} |")
    seed = figure(load(f"seed-{key}"), kind)
    r = ratio(ref, seed)
    w(f"| {label}: ≥ {need_seed}× the seed design | {si(ref)} vs {si(seed)} | {fmt_ratio(r)} | {verdict(None if r is None else r >= need_seed)} |")
sha64k = sha(65548)
ref = figure(pi64k, "mb")
r = ratio(ref, sha64k / 1e6 if sha64k else None)
w(f"| 64 KiB: delivered MB/s ≥ 0.6× single-core SHA-256 | {mb(ref)} vs {mb(sha64k / 1e6 if sha64k else None)} | {fmt_ratio(r)} | {verdict(None if r is None else (r >= 0.6 and pi64k['complete']))} |")
fan = load("pi-1k-4sub")
ref = figure(fan, "pkts")
ratios, verdicts = nats_verdicts(ref, "1k-4sub", "pkts", 1.4, fan is not None and fan["complete"])
w(f"| 1 KiB × 4 subscribers: aggregate ≥ 1.4× NATS | {si(ref)} ({loss(fan)}); NATS {nats_detail('1k-4sub', 'pkts')} | {ratios} | {verdicts} |")
paced = load("pi-paced")
p99 = (paced or {}).get("latency_us", {}) or {}
p99 = p99.get("p99")
w(f"| p99 ingest → delivery < 1 ms at {machine.get('settings', '').split('RATE=')[-1].split()[0]} pkts/s | "
  f"p99 {'n/a' if p99 is None else f'{p99:.0f} µs'} | {fmt_ratio(None if p99 is None else p99 / 1000)} of 1 ms | {verdict(None if p99 is None else (p99 < 1000 and paced['complete']))} |")
four = load("pi-64k-4prod")
cores = (four or {}).get("cpu", {}).get("server_cores")
ref4, ref1 = figure(four, "mb"), figure(pi64k, "mb")
ok = None if cores is None or ref4 is None or ref1 is None else (cores > 1.3 and ref4 >= ref1 and four["complete"])
w(f"| 4 producers × 64 KiB: server > 1.3 cores and MB/s ≥ the 1-producer figure | "
  f"{'n/a' if cores is None else f'{cores:.2f} cores'}, {mb(ref4)} vs {mb(ref1)} | {fmt_ratio(ratio(ref4, ref1))} of 1 producer | {verdict(ok)} |")
w("")

profiles = []
for name, label in (("perf-64", "64 B"), ("perf-64k", "64 KiB")):
    try:
        top = open(os.path.join(results, name + ".top.txt")).read().rstrip()
        dso = open(os.path.join(results, name + ".dso.txt")).read().rstrip()
    except OSError:
        continue
    r = load(name)
    profiles.append((label, top, dso, r))
if profiles:
    w("### Where packet-ingest's CPU goes")
    w("")
    w("`perf record -g -F 499` of the server during an extra run of each size (not the measured one), "
      "`perf report --no-children`: self time by binary and the top symbols.")
    for label, top, dso, r in profiles:
        w("")
        run = "" if r is None else f" (that run: {si(r['delivered']['pkts_per_s'])} pkts/s, {mb(r['delivered']['mb_per_s'])})"
        w(f"{label}{run}:")
        w("")
        w("```")
        w(dso)
        w("")
        w(top)
        w("```")
    w("")

generated = "\n".join(lines)
begin, end = "<!-- BEGIN GENERATED by bench/compare.sh -->", "<!-- END GENERATED -->"
try:
    text = open(out).read()
except OSError:
    text = ""
if begin in text and end in text:
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    text = f"{head}{begin}\n{generated}\n{end}{tail}"
else:
    text = f"# Benchmarks\n\n{begin}\n{generated}\n{end}\n"
with open(out, "w") as f:
    f.write(text)
print(f"wrote {out}", file=sys.stderr)
PYTHON
log "done in $(($(date +%s) - started_at)) s; raw results in $results"
