#!/usr/bin/env bash
# End-to-end check of the example clients against a real packet-ingest server.
#
#   bash .ci/python-clients.sh            (from the repo root; builds nothing but the examples)
#
# Needs: the release binary ($PACKET_INGEST_BIN, default target/release/packet-ingest),
# python3 with pip (and venv), cargo for the Rust examples. It
#   - installs examples/python/requirements.txt with pip into a cached venv under
#     ${XDG_CACHE_HOME:-$HOME/.cache}/packet-ingest-ci and runs examples/python/gen.sh;
#   - builds crates/protocol/examples/rust_{producer,subscriber}.rs (cargo build --release --workspace --examples;
#     PACKET_INGEST_SKIP_EXAMPLES_BUILD=1 uses what is in target/release/examples);
#   - starts the server on 127.0.0.1:0 ports and reads the bound addresses from
#     its JSON "packet-ingest listening" log line;
#   - starts live subscribers (Python and Rust) and waits for their ready marker,
#     then runs, concurrently: producer.py (TCP), publisher.py (Publish), the Rust
#     producer over TCP and over Publish, a publisher with corrupt digests, a
#     producer of 1 MiB payloads; and, while they run, replaying subscribers
#     (--from 1: replay then live, across the seam) and a channel-filtered one;
#   - checks every subscriber got exactly the accepted packets: sequences
#     1..TOTAL with no gap and no duplicate, each source in order with the
#     payload it sent, digests verified, no `missed`; the Publish counts; the
#     Prometheus counters;
#   - SIGTERMs the server: a still-open follower must end with UNAVAILABLE and
#     the server must exit 0.
# Every wait is bounded; everything started is stopped on exit. The last line is
# "python-clients: N passed, M failed"; the exit status is non-zero on any failure.
# Knobs: PYCLIENTS_PACKETS (packets per producer, default 3000), KEEP_WORK=1 (keep logs).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BIN=${PACKET_INGEST_BIN:-target/release/packet-ingest}
N=${PYCLIENTS_PACKETS:-3000}
PYTHON=${PYTHON:-python3}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/packet-ingest-ci
EXAMPLES=target/release/examples
STARTED=$SECONDS

WORK=$(mktemp -d "${TMPDIR:-/tmp}/python-clients.XXXXXX")
PASSED=0
FAILED=0
SERVER_PID=
declare -a PIDS=()

log() { printf 'python-clients: %s\n' "$*"; }
summary() { printf 'python-clients: %d passed, %d failed\n' "$PASSED" "$FAILED"; }
pass() { PASSED=$((PASSED + 1)); log "ok   - $*"; }
fail() { FAILED=$((FAILED + 1)); log "FAIL - $*"; }
# A failure after which nothing else can be checked.
die() {
    fail "$*"
    exit 1
}

cleanup() {
    local status=$?
    set +e
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER_PID" 2>/dev/null
    fi
    wait 2>/dev/null
    if ((FAILED > 0 || status != 0)); then
        for f in "$WORK"/*.err "$WORK"/server.log; do
            [[ -s $f ]] || continue
            log "--- last lines of $(basename "$f")"
            tail -n 8 "$f" | cut -c1-400 >&2
        done
    fi
    if [[ ${KEEP_WORK:-} == 1 ]]; then log "logs kept in $WORK"; else rm -rf "$WORK"; fi
    ((FAILED == 0 && status != 0)) && FAILED=1
    log "took $((SECONDS - STARTED))s"
    summary
    ((FAILED == 0)) || exit 1
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits (bounded) until process $1 has exited; returns its status, 124 on timeout.
wait_exit() {
    local pid=$1 limit=$2 rc=0
    local deadline=$((SECONDS + limit))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            kill -KILL "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            return 124
        fi
        sleep 0.05
    done
    wait "$pid" || rc=$?
    return "$rc"
}

# Waits (bounded) until file $1 matches the extended regex $2, while process $3 lives.
wait_for_line() {
    local file=$1 pattern=$2 pid=$3 limit=$4
    local deadline=$((SECONDS + limit))
    until grep -Eq -- "$pattern" "$file" 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || grep -Eq -- "$pattern" "$file" 2>/dev/null || return 1
        ((SECONDS < deadline)) || return 1
        sleep 0.05
    done
}

# Starts a client in the background, bounded by `timeout`; stdout/stderr in $WORK/NAME.{out,err}.
declare -A JOB=()
start() {
    local name=$1
    shift
    timeout -k 5 120 "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    JOB[$name]=$!
    PIDS+=("$!")
}
# Waits for a client started with `start`; checks its exit status is $2.
finish() {
    local name=$1 want=${2:-0} rc=0
    wait_exit "${JOB[$name]}" 150 || rc=$?
    if ((rc == want)); then
        return 0
    fi
    fail "$name exited with status $rc, expected $want: $(tail -n 3 "$WORK/$name.err" | tr '\n' ' ' | cut -c1-300)"
    return 1
}

# --- setup ----------------------------------------------------------------------------

[[ -x $BIN ]] || die "no binary at $BIN: run 'cargo build --release' first (or set PACKET_INGEST_BIN)"
command -v "$PYTHON" >/dev/null || die "$PYTHON not found"

mkdir -p "$CACHE"
REQS=examples/python/requirements.txt
VENV=$CACHE/py-clients-$( (cat "$REQS"; "$PYTHON" --version 2>&1) | sha256sum | cut -c1-12)
if [[ ! -x $VENV/bin/python ]]; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV" || die "cannot create a venv with $PYTHON -m venv (install python3-venv)"
fi
PY=$VENV/bin/python
"$PY" -m pip install --quiet --disable-pip-version-check -r "$REQS" >"$WORK/pip.err" 2>&1 \
    || die "pip install -r $REQS failed: $(tail -n 3 "$WORK/pip.err")"
PYTHON="$PY" examples/python/gen.sh || die "examples/python/gen.sh failed"
"$PY" -c 'import sys; sys.path.insert(0, "examples/python/gen"); import packet_ingest_pb2_grpc' \
    || die "generated stubs do not import"
pass "pip install -r $REQS and gen.sh ($("$PY" -c 'import grpc; print("grpcio", grpc.__version__)'))"

if [[ ${PACKET_INGEST_SKIP_EXAMPLES_BUILD:-} != 1 ]]; then
    cargo build --release --workspace --examples --quiet 2>"$WORK/cargo.err" \
        || die "cargo build --release --examples failed: $(grep -m3 -E '^error' "$WORK/cargo.err")"
fi
[[ -x $EXAMPLES/rust_producer && -x $EXAMPLES/rust_subscriber ]] \
    || die "no Rust examples in $EXAMPLES"
pass "Rust examples built"

# The server must see none of the caller's PACKET_INGEST_* settings.
for var in $(compgen -e | grep '^PACKET_INGEST_' || true); do
    [[ $var == PACKET_INGEST_BIN ]] || unset "$var"
done

# --- server ---------------------------------------------------------------------------

RUST_LOG=info "$BIN" --grpc-addr 127.0.0.1:0 --ingest-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 \
    --log-format json --shutdown-grace 5s >"$WORK/server.out" 2>"$WORK/server.log" &
SERVER_PID=$!
if ! wait_for_line "$WORK/server.log" '"packet-ingest listening"' "$SERVER_PID" 30; then
    kill -0 "$SERVER_PID" 2>/dev/null || die "server exited before listening: $(tail -n 3 "$WORK/server.log" | cut -c1-300)"
    die "server did not log its listening addresses within 30s"
fi
read -r GRPC INGEST METRICS < <("$PY" - "$WORK/server.log" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    try:
        fields = json.loads(line).get("fields", {})
    except ValueError:
        continue
    if "grpc_addr" in fields:
        print(fields["grpc_addr"], fields["ingest_addr"], fields["metrics_addr"])
        break
EOF
)
[[ -n ${METRICS:-} ]] || die "cannot parse the listening line of the server log"
pass "server listening: grpc=$GRPC ingest=$INGEST metrics=$METRICS"

# --- traffic --------------------------------------------------------------------------

BIG=20          # 1 MiB payloads, exactly --max-payload
BAD_TOTAL=700   # published with every 7th digest spoiled: 600 accepted
BAD_ACCEPTED=600
TOTAL=$((4 * N + BAD_ACCEPTED + BIG))
FILTERED=$((N + BAD_ACCEPTED))   # channels 2 and 5
SUB=(examples/python/subscriber.py --addr "$GRPC" --timeout 100 --verify --no-gaps)
RSUB=("$EXAMPLES/rust_subscriber" --addr "http://$GRPC" --timeout 100 --verify --no-gaps)

# Live subscribers first: they must see everything from the first packet on.
start py_live "$PY" "${SUB[@]}" --count "$TOTAL"
start rs_live "${RSUB[@]}" --count "$TOTAL"
start py_follow "$PY" "${SUB[@]}" --quiet   # no --count: ends when the server shuts down
for name in py_live rs_live py_follow; do
    wait_for_line "$WORK/$name.err" '"ready"' "${JOB[$name]}" 30 \
        || die "$name did not report ready: $(tail -n 2 "$WORK/$name.err")"
done
pass "live subscribers ready"

start py_tcp "$PY" examples/python/producer.py --addr "$INGEST" --channel 1 --count "$N" --size 256
start py_pub "$PY" examples/python/publisher.py --addr "$GRPC" --channel 2 --count "$N" --size 100
start rs_tcp "$EXAMPLES/rust_producer" --addr "$INGEST" --channel 3 --count "$N" --size 1000
start rs_pub "$EXAMPLES/rust_producer" --via publish --addr "http://$GRPC" --channel 4 --count "$N" --size 50
start py_bad "$PY" examples/python/publisher.py --addr "$GRPC" --channel 5 --count "$BAD_TOTAL" --corrupt-every 7
start py_big "$PY" examples/python/producer.py --addr "$INGEST" --channel 6 --count "$BIG" --size 1048576
# Replaying subscribers join while the producers run: replay, then live, no seam.
start py_replay "$PY" "${SUB[@]}" --from 1 --count "$TOTAL"
start rs_replay "${RSUB[@]}" --from 1 --count "$TOTAL"
start py_filter "$PY" "${SUB[@]}" --from 1 --channel 2 --channel 5 --count "$FILTERED"

producers_ok=1
for name in py_tcp py_pub rs_tcp rs_pub py_bad py_big; do
    finish "$name" || producers_ok=0
done
((producers_ok)) && pass "6 producers finished ($((4 * N + BAD_TOTAL + BIG)) packets sent, $TOTAL valid)"

# Publish responses: counts, and last_sequence within range.
if "$PY" - "$WORK" "$N" "$TOTAL" "$BAD_TOTAL" "$BAD_ACCEPTED" <<'EOF' 2>"$WORK/publish.check"; then
import json, sys
work, n, total, bad_total, bad_accepted = sys.argv[1], *map(int, sys.argv[2:])
def response(name):
    with open(f"{work}/{name}.out") as f:
        return json.loads(f.read().strip().splitlines()[-1])
want = {"py_pub": (n, 0), "rs_pub": (n, 0), "py_bad": (bad_accepted, bad_total - bad_accepted)}
ok = True
for name, (accepted, rejected) in want.items():
    r = response(name)
    if (r["accepted"], r["rejected"]) != (accepted, rejected) or not accepted <= r["last_sequence"] <= total:
        print(f"{name}: got {r}, expected accepted={accepted} rejected={rejected}", file=sys.stderr)
        ok = False
sys.exit(0 if ok else 1)
EOF
    pass "Publish responses count accepted and rejected packets"
else
    fail "Publish responses: $(tr '\n' ';' <"$WORK/publish.check")"
fi

# Every subscriber with --count must exit 0 after exactly its packets.
for name in py_live rs_live py_replay rs_replay py_filter; do
    finish "$name" && pass "$name received its packets and exited 0"
done

# What they printed: completeness, order, and the payloads each source sent.
check_stream() {
    local name=$1 expected=$2 channels=$3
    if "$PY" - "$WORK/$name.out" "$expected" "$channels" "$N" "$BIG" <<'EOF' 2>"$WORK/$name.check"; then
import json, re, sys
from collections import defaultdict
path, expected, channels, n, big = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
want_channels = {int(c) for c in channels.split(",")} if channels != "all" else None
packets, errors = [], []
for line in open(path):
    obj = json.loads(line)
    if "missed" in obj:
        errors.append(f"server reported missed={obj['missed']}")
    else:
        packets.append(obj)
seqs = [p["sequence"] for p in packets]
if len(packets) != expected:
    errors.append(f"{len(packets)} packets, expected {expected}")
if any(b <= a for a, b in zip(seqs, seqs[1:])):
    errors.append("sequence not strictly increasing")
if want_channels is None and seqs != list(range(1, expected + 1)):
    errors.append("sequences are not exactly 1..TOTAL (gap or duplicate)")
per_source = defaultdict(list)
per_channel = defaultdict(int)
for p in packets:
    if want_channels is not None and p["channel"] not in want_channels:
        errors.append(f"packet {p['sequence']} on channel {p['channel']}, not subscribed")
    per_channel[p["channel"]] += 1
    per_source[p["source"]].append(p)
    m = re.match(r"(\d+):(\d+)\|", p.get("payload", ""))
    if not m or int(m.group(1)) != p["channel"] or int(m.group(2)) != p["source_sequence"]:
        errors.append(f"packet {p['sequence']}: payload {p.get('payload', '')[:20]!r} does not match "
                      f"channel {p['channel']} source_sequence {p['source_sequence']}")
    if p["channel"] == 6 and len(p["payload"]) != 1 << 20:
        errors.append(f"packet {p['sequence']}: big payload has {len(p['payload'])} bytes")
for source, ps in per_source.items():
    ss = [p["source_sequence"] for p in ps]
    if any(b <= a for a, b in zip(ss, ss[1:])):
        errors.append(f"{source}: source_sequence out of order")
    chan = ps[0]["channel"]
    if chan != 5 and ss != list(range(len(ss))):
        errors.append(f"{source}: source_sequence is not 0..{len(ss) - 1}")
    if chan == 5 and any((s + 1) % 7 == 0 for s in ss):
        errors.append(f"{source}: a packet with a spoiled digest was delivered")
want_per_channel = {1: n, 2: n, 3: n, 4: n, 5: 600, 6: big}
for c, count in want_per_channel.items():
    if (want_channels is None or c in want_channels) and per_channel[c] != count:
        errors.append(f"channel {c}: {per_channel[c]} packets, expected {count}")
for e in errors[:10]:
    print(e, file=sys.stderr)
sys.exit(1 if errors else 0)
EOF
        pass "$name: $expected packets, gap-free, in order, payloads as sent"
    else
        fail "$name: $(head -n 5 "$WORK/$name.check" | tr '\n' ';')"
    fi
}
check_stream py_live "$TOTAL" all
check_stream rs_live "$TOTAL" all
check_stream py_replay "$TOTAL" all
check_stream rs_replay "$TOTAL" all
check_stream py_filter "$FILTERED" 2,5

# Prometheus counters agree.
if "$PY" - "$METRICS" "$TOTAL" "$((BAD_TOTAL - BAD_ACCEPTED))" <<'EOF' 2>"$WORK/metrics.check"; then
import sys, urllib.request
addr, total, bad = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=10).read().decode()
values = {}
for line in text.splitlines():
    if line and not line.startswith("#"):
        name, _, value = line.rpartition(" ")
        values[name] = float(value)
want = {
    "packet_ingest_accepted_packets_total": total,
    'packet_ingest_rejected_packets_total{reason="digest_mismatch"}': bad,
    "packet_ingest_missed_packets_total": 0,
}
wrong = [f"{k}={values.get(k)} (want {v})" for k, v in want.items() if values.get(k) != v]
print("; ".join(wrong), file=sys.stderr)
sys.exit(1 if wrong else 0)
EOF
    pass "metrics: accepted=$TOTAL, digest_mismatch=$((BAD_TOTAL - BAD_ACCEPTED)), missed=0"
else
    fail "metrics: $(cat "$WORK/metrics.check")"
fi

# Stream identity: a resume within the stream works, one naming another stream is refused.
STREAM_ID=$(grep -o '"stream_id": "[^"]*"' "$WORK/py_live.err" | head -n 1 | cut -d'"' -f4)
if [[ -n $STREAM_ID ]]; then
    pass "subscriber saw stream_id $STREAM_ID"
    start py_same_stream "$PY" "${SUB[@]}" --from 1 --count 1 --stream-id "$STREAM_ID"
    start py_other_stream "$PY" "${SUB[@]}" --from 1 --count 1 --stream-id mem-not-this-one
    start rs_other_stream "${RSUB[@]}" --from 1 --count 1 --stream-id mem-not-this-one
    finish py_same_stream 0 && pass "resume with the current stream_id replays"
    if finish py_other_stream 6 && grep -q FAILED_PRECONDITION "$WORK/py_other_stream.err" \
        && finish rs_other_stream 6 && grep -q "$STREAM_ID" "$WORK/rs_other_stream.err"; then
        pass "resume naming another stream: FAILED_PRECONDITION naming $STREAM_ID (status 6, Python and Rust)"
    fi
else
    fail "no stream_id in the Python subscriber's ready line"
fi

# --- shutdown -------------------------------------------------------------------------

kill -TERM "$SERVER_PID"
rc=0
wait_exit "$SERVER_PID" 20 || rc=$?
SERVER_PID=
if ((rc == 0)); then pass "server exited 0 after SIGTERM"; else fail "server exited with status $rc after SIGTERM (124: still running after 20s)"; fi

rc=0
wait_exit "${JOB[py_follow]}" 20 || rc=$?
if ((rc == 1)) && grep -q 'UNAVAILABLE' "$WORK/py_follow.err" \
    && grep -q "\"received\": $TOTAL," "$WORK/py_follow.err"; then
    pass "following subscriber got all $TOTAL packets, then UNAVAILABLE at shutdown"
else
    fail "following subscriber: status $rc, $(tail -n 2 "$WORK/py_follow.err" | tr '\n' ' ')"
fi
