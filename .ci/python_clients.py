#!/usr/bin/env python3
"""The example clients against the real release binary, all at once.

    python3 .ci/python_clients.py            (from anywhere)

Python clients (examples/python: grpcio, stubs from gen.sh) and the Rust ones
(crates/protocol/examples/rust_{producer,subscriber}.rs) against one server
started on 127.0.0.1:0 ports (cilib.Server):

- live subscribers (Python, Rust, and a Python follower with no --count) wait
  for their ready line; then, concurrently: producer.py (TCP), publisher.py
  (Publish), the Rust producer over TCP and over Publish, a publisher with
  every 7th digest spoiled, a producer of 1 MiB payloads; and, while they run,
  replaying subscribers (--from 1: replay, then live across the seam) and a
  channel-filtered one;
- every subscriber got exactly the accepted packets: sequences 1..TOTAL with
  no gap and no duplicate, each source in order with the payload it sent,
  digests verified (--verify), no `missed`; the Publish counts; the metrics;
- a resume naming the current stream_id replays, one naming another stream
  exits 6 (FAILED_PRECONDITION naming the current id), Python and Rust;
- SIGTERM: the server exits 0 and the follower, having received everything,
  ends with UNAVAILABLE.

Needs python3 with venv (grpcio comes from PyPI into target/ci/) and cargo
for the Rust examples (PACKET_INGEST_SKIP_EXAMPLES_BUILD=1 uses what is in
$PACKET_INGEST_EXAMPLES_DIR or target/release/examples). Every wait is bounded. Knobs: PYCLIENTS_PACKETS
(packets per producer, default 3000), KEEP_WORK=1 (keep the logs).
The last line is "python-clients: N passed, M failed".
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cilib  # noqa: E402
from cilib import ROOT, Fatal  # noqa: E402

N = int(os.environ.get("PYCLIENTS_PACKETS", "3000"))
BIG = 20  # 1 MiB payloads, exactly --max-payload
BAD_TOTAL, BAD_ACCEPTED = 700, 600  # every 7th digest spoiled
TOTAL = 4 * N + BAD_ACCEPTED + BIG
FILTERED = N + BAD_ACCEPTED  # channels 2 and 5
PER_CHANNEL = {1: N, 2: N, 3: N, 4: N, 5: BAD_ACCEPTED, 6: BIG}
EXAMPLES = Path(os.environ.get("PACKET_INGEST_EXAMPLES_DIR") or ROOT / "target" / "release" / "examples")
PYDIR = ROOT / "examples" / "python"
CLIENT_TIMEOUT = 150  # seconds any one client may run


class Clients:
    """Client processes in the background; output in WORK/NAME.out and .err."""

    def __init__(self, work):
        self.work = work
        self.procs = {}

    def start(self, name, *argv):
        with open(self.work / f"{name}.out", "w") as out, open(self.work / f"{name}.err", "w") as err:
            process = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        self.procs[name] = (process, time.monotonic() + CLIENT_TIMEOUT)

    def text(self, name, stream="err"):
        return (self.work / f"{name}.{stream}").read_text(errors="replace")

    def wait_ready(self, name):
        process, _ = self.procs[name]
        ready = lambda: '"ready"' in self.text(name)  # noqa: E731
        cilib.wait_until(lambda: ready() or process.poll() is not None, 30)
        if not ready():
            raise Fatal(f"{name} did not report ready: {self.text(name)[-300:]}")

    def finish(self, name, timeout=None):
        """Exit status of client `name` (None if it had to be killed)."""
        process, deadline = self.procs[name]
        try:
            return process.wait(timeout if timeout is not None else max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return None

    def expect_exit(self, checks, name, want=0):
        """Checks (counting failures only) that `name` exits with `want`."""
        rc = self.finish(name)
        if rc == want:
            return True
        tail = " ".join(self.text(name).splitlines()[-3:])[:300]
        checks.fail(f"{name} exited with status {rc}, expected {want}: {tail}")
        return False

    def kill_all(self):
        for process, _ in self.procs.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def stream_problems(path, expected, channels):
    """What is wrong with one subscriber's output (JSON lines), if anything."""
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
    if channels is None and seqs != list(range(1, expected + 1)):
        errors.append("sequences are not exactly 1..TOTAL (gap or duplicate)")
    per_source, per_channel = defaultdict(list), defaultdict(int)
    for p in packets:
        if channels is not None and p["channel"] not in channels:
            errors.append(f"packet {p['sequence']} on channel {p['channel']}, not subscribed")
        per_channel[p["channel"]] += 1
        per_source[p["source"]].append(p)
        # Producers write "<channel>:<index>|" first: the payload names its packet.
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
    for c, count in PER_CHANNEL.items():
        if (channels is None or c in channels) and per_channel[c] != count:
            errors.append(f"channel {c}: {per_channel[c]} packets, expected {count}")
    return errors[:10]


def metrics(addr):
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def main(checks):
    binary = cilib.binary()
    requirements = PYDIR / "requirements.txt"
    py = cilib.venv("py-clients", requirements_file=requirements)
    gen = subprocess.run(["bash", str(PYDIR / "gen.sh")], env=dict(os.environ, PYTHON=py),
                         capture_output=True, text=True)
    if gen.returncode != 0:
        raise Fatal(f"examples/python/gen.sh failed: {gen.stderr.strip()[-300:]}")
    probe = subprocess.run([py, "-c", "import sys; sys.path.insert(0, 'gen'); import packet_ingest_pb2_grpc, grpc;"
                            " print('grpcio', grpc.__version__)"], cwd=PYDIR, capture_output=True, text=True)
    if probe.returncode != 0:
        raise Fatal(f"generated stubs do not import: {probe.stderr.strip()[-300:]}")
    checks.ok(f"pip install -r {requirements.relative_to(ROOT)} and gen.sh ({probe.stdout.strip()})")

    if os.environ.get("PACKET_INGEST_SKIP_EXAMPLES_BUILD") != "1":
        build = subprocess.run(["cargo", "build", "--release", "--workspace", "--examples", "--quiet"],
                               cwd=ROOT, capture_output=True, text=True)
        if build.returncode != 0:
            raise Fatal(f"cargo build --release --examples failed: {build.stderr.strip()[-300:]}")
    rust_producer, rust_subscriber = EXAMPLES / "rust_producer", EXAMPLES / "rust_subscriber"
    if not (os.access(rust_producer, os.X_OK) and os.access(rust_subscriber, os.X_OK)):
        raise Fatal(f"no Rust examples in {EXAMPLES}")
    checks.ok("Rust examples built")

    work = Path(tempfile.mkdtemp(prefix="python-clients."))
    clients = Clients(work)
    server = None
    try:
        server = cilib.Server(work / "server.log", "--shutdown-grace", "5s", binary_path=binary)
        checks.ok(f"server listening: grpc={server.grpc} ingest={server.ingest} metrics={server.metrics}")
        traffic(checks, clients, server, py, rust_producer, rust_subscriber)
    finally:
        clients.kill_all()
        if server is not None:
            server.kill()
        if checks.failed:
            for log in sorted(work.glob("*.err")) + [work / "server.log"]:
                if log.exists() and log.stat().st_size:
                    print(f"--- last lines of {log.name}")
                    print("\n".join(line[:400] for line in log.read_text(errors="replace").splitlines()[-8:]))
        if os.environ.get("KEEP_WORK") == "1":
            checks.log(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def traffic(checks, clients, server, py, rust_producer, rust_subscriber):
    grpc, ingest = server.grpc, server.ingest
    sub = [py, PYDIR / "subscriber.py", "--addr", grpc, "--timeout", "100", "--verify", "--no-gaps"]
    rsub = [rust_subscriber, "--addr", f"http://{grpc}", "--timeout", "100", "--verify", "--no-gaps"]
    producer, publisher = [py, PYDIR / "producer.py"], [py, PYDIR / "publisher.py"]

    # Live subscribers first: they must see everything from the first packet on.
    clients.start("py_live", *sub, "--count", TOTAL)
    clients.start("rs_live", *rsub, "--count", TOTAL)
    clients.start("py_follow", *sub, "--quiet")  # no --count: ends when the server shuts down
    for name in ("py_live", "rs_live", "py_follow"):
        clients.wait_ready(name)
    checks.ok("live subscribers ready")

    clients.start("py_tcp", *producer, "--addr", ingest, "--channel", 1, "--count", N, "--size", 256)
    clients.start("py_pub", *publisher, "--addr", grpc, "--channel", 2, "--count", N, "--size", 100)
    clients.start("rs_tcp", rust_producer, "--addr", ingest, "--channel", 3, "--count", N, "--size", 1000)
    clients.start("rs_pub", rust_producer, "--via", "publish", "--addr", f"http://{grpc}",
                  "--channel", 4, "--count", N, "--size", 50)
    clients.start("py_bad", *publisher, "--addr", grpc, "--channel", 5, "--count", BAD_TOTAL, "--corrupt-every", 7)
    clients.start("py_big", *producer, "--addr", ingest, "--channel", 6, "--count", BIG, "--size", 1 << 20)
    # Replaying subscribers join while the producers run: replay, then live, no seam.
    clients.start("py_replay", *sub, "--from", 1, "--count", TOTAL)
    clients.start("rs_replay", *rsub, "--from", 1, "--count", TOTAL)
    clients.start("py_filter", *sub, "--from", 1, "--channel", 2, "--channel", 5, "--count", FILTERED)

    producers = ("py_tcp", "py_pub", "rs_tcp", "rs_pub", "py_bad", "py_big")
    if all([clients.expect_exit(checks, name) for name in producers]):
        checks.ok(f"6 producers finished ({4 * N + BAD_TOTAL + BIG} packets sent, {TOTAL} valid)")

    # Publish responses: counts, and last_sequence within range.
    wrong = []
    for name, (accepted, rejected) in {"py_pub": (N, 0), "rs_pub": (N, 0),
                                       "py_bad": (BAD_ACCEPTED, BAD_TOTAL - BAD_ACCEPTED)}.items():
        try:
            r = json.loads(clients.text(name, "out").strip().splitlines()[-1])
        except (ValueError, IndexError):
            r = {}
        if (r.get("accepted"), r.get("rejected")) != (accepted, rejected) \
                or not accepted <= r.get("last_sequence", -1) <= TOTAL:
            wrong.append(f"{name}: got {r}, expected accepted={accepted} rejected={rejected}")
    checks.check(not wrong, "Publish responses count accepted and rejected packets", "\n".join(wrong))

    # Every subscriber with --count exits 0 after exactly its packets, as sent.
    for name, expected, channels in (("py_live", TOTAL, None), ("rs_live", TOTAL, None),
                                     ("py_replay", TOTAL, None), ("rs_replay", TOTAL, None),
                                     ("py_filter", FILTERED, {2, 5})):
        if clients.expect_exit(checks, name):
            checks.ok(f"{name} received its packets and exited 0")
        problems = stream_problems(clients.work / f"{name}.out", expected, channels)
        checks.check(not problems, f"{name}: {expected} packets, gap-free, in order, payloads as sent",
                     "\n".join(problems))

    values = metrics(server.metrics)
    want = {"packet_ingest_accepted_packets_total": TOTAL,
            'packet_ingest_rejected_packets_total{reason="digest_mismatch"}': BAD_TOTAL - BAD_ACCEPTED,
            "packet_ingest_missed_packets_total": 0}
    wrong = [f"{k}={values.get(k)} (want {v})" for k, v in want.items() if values.get(k) != v]
    checks.check(not wrong, f"metrics: accepted={TOTAL}, digest_mismatch={BAD_TOTAL - BAD_ACCEPTED}, missed=0",
                 "; ".join(wrong))

    # Stream identity: a resume within the stream works, one naming another stream is refused.
    m = re.search(r'"stream_id": "([^"]*)"', clients.text("py_live"))
    stream_id = m.group(1) if m else None
    if checks.check(stream_id == server.stream_id, f"subscriber saw stream_id {stream_id}, the one the server logged"):
        clients.start("py_same_stream", *sub, "--from", 1, "--count", 1, "--stream-id", stream_id)
        clients.start("py_other_stream", *sub, "--from", 1, "--count", 1, "--stream-id", "mem-not-this-one")
        clients.start("rs_other_stream", *rsub, "--from", 1, "--count", 1, "--stream-id", "mem-not-this-one")
        if clients.expect_exit(checks, "py_same_stream", 0):
            checks.ok("resume with the current stream_id replays")
        if clients.expect_exit(checks, "py_other_stream", 6) and clients.expect_exit(checks, "rs_other_stream", 6):
            checks.check("FAILED_PRECONDITION" in clients.text("py_other_stream")
                         and stream_id in clients.text("rs_other_stream"),
                         f"resume naming another stream: FAILED_PRECONDITION naming {stream_id} "
                         "(status 6, Python and Rust)")

    rc = server.stop(20)
    checks.check(rc == 0, "server exits 0 on SIGTERM" + ("" if rc == 0 else f": status {rc} (None: still running after 20s)"))
    rc = clients.finish("py_follow", 20)
    follow = clients.text("py_follow")
    checks.check(rc == 1 and "UNAVAILABLE" in follow and f'"received": {TOTAL},' in follow,
                 f"following subscriber got all {TOTAL} packets, then UNAVAILABLE at shutdown (status {rc})",
                 "\n".join(follow.splitlines()[-2:]))


if __name__ == "__main__":
    cilib.Checks("python-clients").run(main)
