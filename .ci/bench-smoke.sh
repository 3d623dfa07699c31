#!/usr/bin/env bash
# Smoke test of `packet-ingest bench`: a tiny run over real sockets that must be
# complete and in order. It never asserts timing (CI machines are shared).
#
# Builds nothing: uses target/release/packet-ingest, or $PACKET_INGEST_BIN.
# Starts a server on 127.0.0.1 port 0 (addresses read from its JSON log),
# runs TCP, Publish and paced benches, then SIGTERMs the server and expects exit 0.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${PACKET_INGEST_BIN:-target/release/packet-ingest}
if [ ! -x "$bin" ]; then
  echo "bench-smoke: $bin not found; run cargo build --release first" >&2
  exit 1
fi

work=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -KILL "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

fail() {
  echo "bench-smoke: FAILED: $*" >&2
  echo "--- server log (last 20 lines)" >&2
  tail -n 20 "$work/server.log" >&2 || true
  exit 1
}

# Block mode: lossless, so "complete" must hold whatever the machine's speed.
RUST_LOG=info "$bin" \
  --grpc-addr 127.0.0.1:0 --ingest-addr 127.0.0.1:0 --metrics-addr 127.0.0.1:0 \
  --slow-subscriber block --log-format json \
  >"$work/server.out" 2>"$work/server.log" &
server_pid=$!

# The listening line: fields.message == "packet-ingest listening".
addrs=
for _ in $(seq 1 100); do
  addrs=$(python3 - "$work/server.log" <<'EOF'
import json, sys
for line in open(sys.argv[1], errors="replace"):
    try:
        fields = json.loads(line).get("fields", {})
    except ValueError:
        continue
    if fields.get("message") == "packet-ingest listening":
        print(fields["grpc_addr"], fields["ingest_addr"])
        break
EOF
)
  [ -n "$addrs" ] && break
  kill -0 "$server_pid" 2>/dev/null || fail "server exited before listening"
  sleep 0.1
done
[ -n "$addrs" ] || fail "no 'packet-ingest listening' log line within 10s"
read -r grpc_addr ingest_addr <<<"$addrs"

# Runs one bench; checks its JSON: complete, no order errors, every packet at
# every subscriber. Prints "delivered/expected".
run_bench() {
  local name=$1 producers=$2 subscribers=$3 count=$4
  shift 4
  local out="$work/$name.json"
  if ! "$bin" bench --grpc-addr "$grpc_addr" --ingest-addr "$ingest_addr" \
      --producers "$producers" --subscribers "$subscribers" --count "$count" \
      --server-pid "$server_pid" --json --quiet "$@" >"$out" 2>"$work/$name.err"; then
    cat "$out" "$work/$name.err" >&2 || true
    fail "bench $name exited non-zero"
  fi
  python3 - "$out" "$((producers * subscribers * count))" <<'EOF' || fail "bench $name: $(cat "$out")"
import json, sys
result = json.load(open(sys.argv[1]))
expected = int(sys.argv[2])
delivered = result["delivered"]["packets"]
problems = []
if not result["complete"]:
    problems.append("not complete")
if result["order_errors"] != 0:
    problems.append(f"{result['order_errors']} order errors")
for key in ("lost", "missed", "payload_errors"):
    if result[key] != 0:
        problems.append(f"{key} {result[key]}")
if delivered != expected:
    problems.append(f"delivered {delivered} of {expected}")
if problems:
    sys.exit("; ".join(problems))
print(f"{delivered}/{expected}")
EOF
}

tcp=$(run_bench tcp 2 2 2000 --size 64)
publish=$(run_bench publish 2 2 2000 --size 64 --via publish)
large=$(run_bench large 2 1 200 --size 64KiB)
paced=$(run_bench paced 1 1 1000 --size 1KiB --rate 20000)

kill -TERM "$server_pid"
status=0
wait "$server_pid" || status=$?
server_pid=
[ "$status" -eq 0 ] || fail "server exited with status $status after SIGTERM"

echo "bench-smoke: ok: delivered tcp $tcp, publish $publish, 64KiB $large, paced $paced; 0 order errors; server exit 0 on SIGTERM"
