#!/usr/bin/env bash
# Cluster mode against single-process mode on this machine, in one run, all
# driven by the same `packet-ingest-bench` client (1 producer, 1 subscriber,
# loopback, every server with --slow-subscriber block):
#   - single:     one packet-ingest process, no NATS,
#   - cluster-1:  one replica with --cluster-nats (producer and subscriber on it),
#   - cluster-2:  two replicas on the same stream, producer on replica A and
#                 subscriber on replica B,
# for 1 KiB and 64 B unpaced throughput and for 1 KiB paced at RATE (latency).
# Every case gets its own nats-server with a fresh JetStream store directory
# and its own stream name, so no run sees another's data. nats-server's CPU is
# read from /proc/PID/stat around each run, beside the replicas' (the bench's
# --server-pid). Then writes a section at the end of BENCHMARKS.md, between
# the cluster.sh GENERATED markers (the compare.sh section is left alone).
#
# usage: bench/cluster.sh      (from anywhere; 1–2 minutes on 2 cores, plus the build)
#
# Environment (defaults in brackets):
#   DURATION [5s]          length of each unpaced throughput run (whole seconds)
#   PACED_DURATION [10s]   length of each paced latency run
#   RATE [10000]           paced rate, packets/s (1 KiB payloads)
#   DRAIN_TIMEOUT [5s]     bench --drain-timeout: how long a subscriber waits
#                          without progress before the rest counts as lost
#   CASE_TIMEOUT [60]      seconds on top of the duration before a stuck bench
#                          run is killed and reported as such
#   PACKET_INGEST_BIN      use this binary instead of building target/release
#   OUT [BENCHMARKS.md]    where the section goes
#   RESULTS_DIR [target/bench-cluster]   raw JSON and logs of every run
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

DURATION=${DURATION:-5s}
PACED_DURATION=${PACED_DURATION:-10s}
RATE=${RATE:-10000}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-5s}
CASE_TIMEOUT=${CASE_TIMEOUT:-60}
OUT=${OUT:-BENCHMARKS.md}
results=${RESULTS_DIR:-$root/target/bench-cluster}

log() { printf '[cluster %s] %s\n' "$(date +%T)" "$*" >&2; }
started_at=$(date +%s)

rm -rf "$results"
mkdir -p "$results"
scratch=$(mktemp -d "${TMPDIR:-/tmp}/bench-cluster.XXXXXX")

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
if ! command -v nats-server >/dev/null; then
  log "installing nats-server (Debian package)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server; } >&2 || true
fi
command -v nats-server >/dev/null || { log "nats-server is needed for cluster mode"; exit 1; }

clk_tck=$(getconf CLK_TCK)

# CPU seconds (user + system, all threads) of PID so far; empty if it is gone.
# The command name (field 2) may hold spaces: fields are counted after its ')'.
cpu_seconds() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  stat=${stat##*) }
  awk -v hz="$clk_tck" '{ printf "%.2f\n", ($12 + $13) / hz }' <<<"$stat"
}

# CPU seconds the whole machine has been busy, all cores: user, nice, system, irq, softirq.
machine_busy_seconds() {
  awk -v hz="$clk_tck" '/^cpu / { busy = $2 + $3 + $4 + $7 + $8; printf "%.2f\n", busy / hz }' /proc/stat
}

# --- processes of the current case ---------------------------------------------
nats_pid=
nats_url=
store=
replica_pids=()
replica_names=()

stop_case() {
  local pid deadline pids=("${replica_pids[@]}")
  # Replicas first (they drain into NATS on SIGTERM), then nats-server.
  [ -z "$nats_pid" ] || pids+=("$nats_pid")
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  replica_pids=()
  replica_names=()
  nats_pid=
  nats_url=
  [ -z "$store" ] || rm -rf "$store"
  store=
}
cleanup() {
  stop_case
  rm -rf "$scratch"
}
trap cleanup EXIT

# start_nats CASE: a nats-server with JetStream on a random port and a fresh store.
start_nats() {
  local case=$1 nats_log=$results/$1.nats.log port=''
  store=$(mktemp -d "$scratch/js-$case.XXXXXX")
  nats-server -a 127.0.0.1 -p -1 -js -sd "$store" >"$nats_log" 2>&1 &
  nats_pid=$!
  for _ in $(seq 1 100); do
    if grep -q 'Server is ready' "$nats_log"; then
      port=$(sed -n 's/.*Listening for client connections on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$nats_log" | head -n 1)
      break
    fi
    kill -0 "$nats_pid" 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$port" ]; then
    log "  nats-server did not start: $(tail -n 3 "$nats_log" | tr '\n' ' ')"
    return 1
  fi
  nats_url=nats://127.0.0.1:$port
}

# start_replica CASE NAME [SERVER-ARGS...]: one packet-ingest process; sets $addrs
# to "GRPC INGEST" from its "packet-ingest listening" log line.
start_replica() {
  local case=$1 name=$2 pi_log=$results/$1.$2.log pid
  shift 2
  RUST_LOG=info "$bin" --grpc-addr 127.0.0.1:0 --ingest-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 \
    --slow-subscriber block --shutdown-grace 3s --log-format json "$@" >/dev/null 2>"$pi_log" &
  pid=$!
  replica_pids+=("$pid")
  replica_names+=("$name")
  addrs=
  for _ in $(seq 1 150); do
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
    [ -n "$addrs" ] && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  log "  packet-ingest $name did not start: $(tail -n 3 "$pi_log" | tr '\n' ' ')"
  return 1
}

# run_case CASE SETUP BENCH-ARGS...: start SETUP (single, cluster-1, cluster-2),
# run the bench once, stop everything. Results: CASE.json (the bench's JSON),
# CASE.meta (exit status, nats-server CPU, who died), CASE.*.log.
run_case() {
  local case=$1 setup=$2 seconds ingest grpc a_ingest='' rc=0 nats_before='' nats_after='' busy_before busy_after t0 t1 stream pid
  shift 2
  local meta=$results/$case.meta
  : >"$meta"
  log "$case ($setup): $*"
  stream=BENCH_$(tr 'a-z-' 'A-Z_' <<<"$case")
  if ! case $setup in
    single)
      start_replica "$case" A
      ;;
    cluster-1)
      start_nats "$case" &&
        start_replica "$case" A --cluster-nats "$nats_url" --cluster-stream "$stream"
      ;;
    cluster-2)
      start_nats "$case" &&
        start_replica "$case" A --cluster-nats "$nats_url" --cluster-stream "$stream" &&
        { read -r _ a_ingest <<<"$addrs"; start_replica "$case" B --cluster-nats "$nats_url" --cluster-stream "$stream"; }
      ;;
  esac; then
    echo "setup_failed=1" >>"$meta"
    stop_case
    return 0
  fi
  read -r grpc ingest <<<"$addrs"
  # Producer on replica A, subscriber on the last replica started (B in cluster-2).
  [ "$setup" != cluster-2 ] || ingest=$a_ingest
  local pid_args=()
  for pid in "${replica_pids[@]}"; do pid_args+=(--server-pid "$pid"); done
  seconds=$(grep -o '[0-9]*' <<<"${PACED_DURATION} ${DURATION}" | sort -n | tail -n 1)
  [ -z "$nats_pid" ] || nats_before=$(cpu_seconds "$nats_pid")
  busy_before=$(machine_busy_seconds)
  t0=$(date +%s.%N)
  RUST_LOG=warn timeout -k 5 "$((seconds + CASE_TIMEOUT))" "$bench_bin" --json --quiet \
    --target packet-ingest --ingest-addr "$ingest" --grpc-addr "$grpc" \
    --drain-timeout "$DRAIN_TIMEOUT" "${pid_args[@]}" "$@" \
    >"$results/$case.json" 2>"$results/$case.err" || rc=$?
  t1=$(date +%s.%N)
  busy_after=$(machine_busy_seconds)
  [ -z "$nats_pid" ] || nats_after=$(cpu_seconds "$nats_pid")
  {
    echo "rc=$rc"
    echo "machine_busy_s=$(awk -v a="$busy_before" -v b="$busy_after" 'BEGIN { printf "%.2f", b - a }')"
    echo "bench_wall_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')"
    echo "ingest=$ingest grpc=$grpc"
    [ -z "$nats_pid" ] || echo "nats_s=$(awk -v a="$nats_before" -v b="$nats_after" 'BEGIN { if (a == "" || b == "") print ""; else printf "%.2f", b - a }')"
    local i
    for i in "${!replica_pids[@]}"; do
      kill -0 "${replica_pids[$i]}" 2>/dev/null || echo "died=${replica_names[$i]}"
    done
    [ -z "$nats_pid" ] || kill -0 "$nats_pid" 2>/dev/null || echo "died=nats-server"
    [ "$rc" != 124 ] && [ "$rc" != 137 ] || echo "timed_out=$((seconds + CASE_TIMEOUT))"
  } >>"$meta"
  [ -s "$results/$case.json" ] || rm -f "$results/$case.json"
  if [ "$rc" != 0 ]; then
    log "  $case: bench exited $rc $(tail -n 2 "$results/$case.err" | tr '\n' ' ')"
  fi
  stop_case
}

# --- the cases -----------------------------------------------------------------
for setup in single cluster-1 cluster-2; do
  run_case "1k-$setup" "$setup" --size 1KiB --duration "$DURATION"
done
for setup in single cluster-1 cluster-2; do
  run_case "64-$setup" "$setup" --size 64 --duration "$DURATION"
done
for setup in single cluster-1 cluster-2; do
  run_case "paced-$setup" "$setup" --size 1KiB --rate "$RATE" --duration "$PACED_DURATION"
done

# --- the report ----------------------------------------------------------------
{
  echo "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "cores=$(nproc)"
  echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "kernel=$(uname -r)"
  # Only changes to what the binary is built from count (not this file's own edits to BENCHMARKS.md).
  echo "commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src proto build.rs Cargo.toml Cargo.lock 2>/dev/null || echo ' plus uncommitted source changes')"
  echo "nats=$(nats-server --version 2>/dev/null || echo none)"
  echo "seconds=$(($(date +%s) - started_at))"
  echo "settings=DURATION=$DURATION PACED_DURATION=$PACED_DURATION RATE=$RATE DRAIN_TIMEOUT=$DRAIN_TIMEOUT"
} >"$results/machine.txt"

python3 - "$results" "$OUT" <<'PYTHON'
import json, os, sys

results, out = sys.argv[1], sys.argv[2]
machine = dict(line.rstrip("\n").split("=", 1) for line in open(os.path.join(results, "machine.txt")) if "=" in line)
SETUPS = [
    ("single", "single process"),
    ("cluster-1", "cluster, 1 replica"),
    ("cluster-2", "cluster, 2 replicas (A → B)"),
]

def load(case):
    try:
        with open(os.path.join(results, case + ".json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def meta(case):
    values = {}
    try:
        for line in open(os.path.join(results, case + ".meta")):
            key, _, value = line.rstrip("\n").partition("=")
            values.setdefault(key, []).append(value)
    except OSError:
        pass
    return values

def first(values, key):
    return (values.get(key) or [None])[0]

def log_problems(case):
    """WARN/ERROR lines of the replicas' logs and [WRN]/[ERR] lines of nats-server's."""
    found = {}
    for name in ("A", "B"):
        try:
            lines = open(os.path.join(results, f"{case}.{name}.log"), errors="replace")
        except OSError:
            continue
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("level") in ("WARN", "ERROR"):
                message = entry.get("fields", {}).get("message", "?")
                key = f"replica {name} {entry['level']}: {message}"
                found[key] = found.get(key, 0) + 1
    try:
        for line in open(os.path.join(results, f"{case}.nats.log"), errors="replace"):
            for tag in ("[WRN]", "[ERR]", "[FTL]"):
                if tag in line:
                    message = line.split(tag, 1)[1].strip()
                    key = f"nats-server {tag} {message[:120]}"
                    found[key] = found.get(key, 0) + 1
    except OSError:
        pass
    return found

def si(value):
    if value is None:
        return "n/a"
    for scale, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= scale:
            scaled = value / scale
            digits = 2 if scaled < 10 else (1 if scaled < 100 else 0)
            return f"{scaled:.{digits}f}{suffix}"
    return f"{value:.0f}"

def us(value):
    if value is None:
        return "n/a"
    return f"{value / 1000:.2f} ms" if value >= 1000 else f"{value:.0f} µs"

def status(case):
    """'ok', or what went wrong, precisely."""
    r, m = load(case), meta(case)
    problems = []
    if first(m, "setup_failed"):
        return "**setup failed** (see the logs)"
    if first(m, "timed_out"):
        problems.append(f"bench killed after {first(m, 'timed_out')} s")
    for who in m.get("died", []):
        problems.append(f"{who} exited during the run")
    rc = first(m, "rc")
    if r is None:
        problems.append(f"no result (bench exit {rc})")
        return "**" + "; ".join(problems) + "**"
    if not r["complete"]:
        sent = r["sent"]["packets"]
        parts = [f"delivered {r['delivered']['packets']:,} of {sent:,}"]
        for key in ("lost", "missed", "order_errors", "payload_errors"):
            if r.get(key):
                parts.append(f"{key.replace('_', ' ')} {r[key]:,}")
        errors = [s.get("error") for s in r.get("subscriber", []) if s.get("error")]
        if errors:
            parts.append("; ".join(errors))
        problems.append("incomplete: " + ", ".join(parts))
    if rc not in (None, "0"):
        problems.append(f"bench exit {rc}")
    if problems:
        return "**" + "; ".join(problems) + "**"
    return "ok, lossless, in order"

def ratio(value, reference):
    if value is None or reference in (None, 0):
        return "n/a"
    return f"{value / reference:.2f}×"

def throughput(r, kind):
    if r is None:
        return None
    return r["delivered"]["pkts_per_s" if kind == "pkts" else "mb_per_s"]

def latency(r, key):
    if r is None:
        return None
    return (r.get("latency_us") or {}).get(key)

def usable(case):
    """A figure is only shown as a result when the run completed."""
    r = load(case)
    return r if r is not None and r["complete"] and first(meta(case), "rc") == "0" else None

lines = []
w = lines.append
w("## Cluster mode vs single process (`bench/cluster.sh`)")
w("")
w(f"Measured {machine.get('date')} on **{machine.get('cpu')}**, **{machine.get('cores')} cores** "
  f"(Linux {machine.get('kernel')}); packet-ingest {machine.get('commit')}, {machine.get('nats')} "
  f"(`-js`, file store). The whole script took {machine.get('seconds')} s.")
w("")
w(f"Reproduce: `bench/cluster.sh` (this run: `{machine.get('settings')}`).")
w("")
w("One producer (TCP ingest) and one subscriber (gRPC), loopback, the same `packet-ingest-bench` client, "
  "every server with `--slow-subscriber block`. *Single process*: one packet-ingest, no NATS. "
  "*Cluster, 1 replica*: one packet-ingest with `--cluster-nats`, producer and subscriber on it. "
  "*Cluster, 2 replicas*: two packet-ingest processes on the same JetStream stream, the producer on "
  "replica A and the subscriber on replica B. Each case has its own nats-server, fresh JetStream store "
  "directory and stream name. **All processes (nats-server, the replicas and the load client) share "
  f"the same {machine.get('cores')} cores**, so a cluster here pays for NATS and the extra replica "
  "out of the same CPU the single process has to itself; the ratios are what cluster mode costs on one "
  "machine, not what it scales to across machines.")
w("")
w("Each ratio is the cluster figure divided by the single-process figure of this same run "
  "(throughput: below 1× is slower; latency: above 1× is slower). A failed or incomplete run is "
  "reported instead of a figure.")
w("")
w("| case | single process | cluster, 1 replica | ratio | cluster, 2 replicas (A → B) | ratio |")
w("|---|---|---|---|---|---|")

def row(label, prefix, get, fmt):
    ref_r = usable(f"{prefix}-single")
    ref = get(ref_r)
    cells = [label]
    for setup, _ in SETUPS:
        case = f"{prefix}-{setup}"
        r = usable(case)
        if r is None:
            cells.append(status(case))
            if setup != "single":
                cells.append("n/a")
            continue
        cells.append(fmt(get(r)))
        if setup != "single":
            cells.append(ratio(get(r), ref))
    w("| " + " | ".join(cells) + " |")

row("1 KiB, delivered pkts/s", "1k", lambda r: throughput(r, "pkts"), si)
row("1 KiB, delivered MB/s", "1k", lambda r: throughput(r, "mb"), lambda v: f"{v:,.0f} MB/s")
row("64 B, delivered pkts/s", "64", lambda r: throughput(r, "pkts"), si)
rate = machine.get("settings", "").split("RATE=")[-1].split()[0]
row(f"1 KiB paced at {int(rate):,} pkts/s: p50", "paced", lambda r: latency(r, "p50"), us)
row("  p99", "paced", lambda r: latency(r, "p99"), us)
row("  p99.9", "paced", lambda r: latency(r, "p999"), us)
row("  max", "paced", lambda r: latency(r, "max"), us)
w("")

w("### Every run: completeness, CPU, problems")
w("")
w("CPU from `/proc/PID/stat` (user + system, all threads) over each run; cores = CPU seconds ÷ the bench's "
  "measuring window (start to the sample after the last delivery). Replicas: the bench's `--server-pid` "
  "(A and B summed). nats-server: read by the script just before and after the bench process, so it "
  "also holds the few milliseconds of connection set-up and teardown. µs/pkt = replicas + nats-server "
  "CPU ÷ packets sent. Sent = the producer's rate into replica A; in cluster mode the producer is only "
  "held back by JetStream publish acks, not by the subscriber, so it can run ahead of delivery; "
  "*lag at end* = the subscriber's last delivery minus the producer's last send. "
  "*Other load* = the whole machine's busy CPU (`/proc/stat`) over the bench process's lifetime minus "
  "what the replicas, nats-server and the load client used: other processes on this shared machine "
  "(near 0 means the run was undisturbed).")
w("")
w("| run | status | sent pkts/s | delivered pkts/s | lag at end | replicas | nats-server | load client | replicas + nats µs/pkt | other load | log warnings |")
w("|---|---|---|---|---|---|---|---|---|---|---|")
for prefix, label in (("1k", "1 KiB"), ("64", "64 B"), ("paced", "1 KiB paced")):
    for setup, setup_label in SETUPS:
        case = f"{prefix}-{setup}"
        r, m = load(case), meta(case)
        problems = log_problems(case)
        warn = "; ".join(f"{k} (×{v})" for k, v in sorted(problems.items())) or "none"
        if r is None:
            w(f"| {label}, {setup_label} | {status(case)} | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | {warn} |")
            continue
        cpu = r["cpu"]
        wall = cpu.get("wall_s") or 0
        server_s = cpu.get("server_s")
        nats_s = first(m, "nats_s")
        nats_s = float(nats_s) if nats_s not in (None, "") else None
        def cores(seconds):
            return "n/a" if seconds is None or not wall else f"{seconds / wall:.2f} cores"
        total = None if server_s is None else server_s + (nats_s or 0)
        per_pkt = "n/a" if total is None or not r["sent"]["packets"] else f"{total * 1e6 / r['sent']['packets']:.2f}"
        nats_cell = "—" if setup == "single" else cores(nats_s)
        busy, script_wall = first(m, "machine_busy_s"), first(m, "bench_wall_s")
        other = "n/a"
        if busy and script_wall and server_s is not None and cpu.get("bench_s") is not None:
            rest = float(busy) - server_s - (nats_s or 0) - cpu["bench_s"]
            other = f"{max(0.0, rest) / float(script_wall):.2f} cores"
        lag = max(0.0, r["delivered"]["elapsed_s"] - r["sent"]["elapsed_s"])
        w(f"| {label}, {setup_label} | {status(case)} | {si(r['sent']['pkts_per_s'])} | {si(r['delivered']['pkts_per_s'])} | {lag:.2f} s "
          f"| {cores(server_s)} | {nats_cell} | {cores(cpu.get('bench_s'))} | {per_pkt} | {other} | {warn} |")
w("")
w("Raw JSON, the servers' and nats-server's logs of every run: `target/bench-cluster/`.")

generated = "\n".join(lines)
begin, end = "<!-- BEGIN GENERATED by bench/cluster.sh -->", "<!-- END GENERATED by bench/cluster.sh -->"
try:
    text = open(out).read()
except OSError:
    text = "# Benchmarks\n"
if begin in text and end in text:
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    text = f"{head}{begin}\n{generated}\n{end}{tail}"
else:
    text = text.rstrip("\n") + f"\n\n{begin}\n{generated}\n{end}\n"
with open(out, "w") as f:
    f.write(text)
print(f"wrote {out}", file=sys.stderr)
PYTHON
log "done in $(($(date +%s) - started_at)) s; raw results in $results"
