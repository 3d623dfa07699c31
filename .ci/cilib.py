"""What the Python checks in .ci/ and the benchmark runners in bench/ share.

- ``Checks``: counts checks, prints ``ok   - ...`` / ``FAIL - ...`` lines and
  ends with the one line ``.ci/run`` sums up: ``NAME: N passed, M failed``.
- ``venv``: a virtualenv under ``target/ci/`` with pinned PyPI packages
  (CI caches nothing outside the repository; ``cargo clean`` drops it).
- ``Server``: the packet-ingest binary on ``127.0.0.1:0`` ports, its addresses
  read from its JSON ``packet-ingest listening`` log line (the same dance as
  ``crates/server/tests/common/process.rs``, for scripts); ``stop`` sends
  SIGTERM and waits, bounded. Shell scripts, which start the binary
  themselves, read the listening line with ``python3 .ci/cilib.py listening``.
- ``wait_until``: bounded polling, for states that have no event to wait on
  (a line appearing in another process's output file).

Standard library only: every script runs on the system python3 first.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "target" / "ci"
DEFAULT_BIN = ROOT / "target" / "release" / "packet-ingest"


class Fatal(Exception):
    """A failure after which nothing else can be checked."""


class Checks:
    """Pass/fail bookkeeping with one closing summary line."""

    def __init__(self, name):
        self.name = name
        self.passed = 0
        self.failed = 0
        self.started = time.monotonic()

    def log(self, message):
        print(f"{self.name}: {message}", flush=True)

    def ok(self, message):
        self.passed += 1
        self.log(f"ok   - {message}")

    def fail(self, message, detail=None):
        self.failed += 1
        self.log(f"FAIL - {message}")
        if detail:
            for line in str(detail).rstrip().splitlines()[:60]:
                print(f"      {line[:400]}", flush=True)

    def check(self, condition, message, detail=None):
        """Counts one check; returns whether it held."""
        if condition:
            self.ok(message)
        else:
            self.fail(message, detail)
        return bool(condition)

    def run(self, body):
        """Runs body(self), then the summary; exits non-zero on any failure."""
        try:
            body(self)
        except Fatal as error:
            self.fail(str(error))
        except KeyboardInterrupt:
            self.fail("interrupted")
        except Exception:  # a bug in the check itself: still end with the summary
            traceback.print_exc()
            self.fail("the check itself failed (traceback above)")
        self.log(f"took {time.monotonic() - self.started:.0f}s")
        print(f"{self.name}: {self.passed} passed, {self.failed} failed", flush=True)
        sys.exit(1 if self.failed else 0)


def venv(name, *requirements, requirements_file=None):
    """Python of a virtualenv with `requirements` installed; built once, reused
    while the requirements (and this Python) stay the same."""
    spec = "\n".join(requirements)
    if requirements_file:
        spec += "\n" + Path(requirements_file).read_text()
    key = hashlib.sha256(f"{spec}\n{sys.version}".encode()).hexdigest()[:12]
    path = CACHE / f"venv-{name}-{key}"
    python = path / "bin" / "python"
    done = path / ".installed"
    if not done.exists():
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        quiet = ["--quiet", "--disable-pip-version-check", "--no-input"]
        extra = ["-r", str(requirements_file)] if requirements_file else []
        for argv in (
            [sys.executable, "-m", "venv", str(path)],
            [str(python), "-m", "pip", "install", *quiet, *requirements, *extra],
        ):
            result = subprocess.run(argv, capture_output=True, text=True, timeout=900)
            if result.returncode != 0:
                raise Fatal(f"{' '.join(argv[:4])} ...: {result.stderr.strip()[-600:]}")
        done.touch()
    return str(python)


def wait_until(condition, seconds, interval=0.05):
    """Polls `condition` until it holds (True) or `seconds` pass (False)."""
    deadline = time.monotonic() + seconds
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def binary():
    """The release binary under test: $PACKET_INGEST_BIN or target/release."""
    path = Path(os.environ.get("PACKET_INGEST_BIN") or DEFAULT_BIN)
    if not os.access(path, os.X_OK):
        raise Fatal(f"no binary at {path}: run 'cargo build --release' (or set PACKET_INGEST_BIN)")
    return str(path.resolve())


def clean_env(**extra):
    """The caller's environment minus every PACKET_INGEST_* setting (the server
    must only see the flags it is given), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACKET_INGEST_")}
    env.update(extra)
    return env


LISTENING = "packet-ingest listening"


def listening_fields(log_path):
    """The fields of the server's JSON listening line, once it is in the log."""
    try:
        with open(log_path, errors="replace") as log:
            for line in log:
                try:
                    fields = json.loads(line).get("fields", {})
                except ValueError:
                    continue  # not JSON, or a line half written
                if fields.get("message") == LISTENING:
                    return fields
    except OSError:
        pass
    return None


def wait_listening(log_path, alive, seconds):
    """The listening line's fields; None if `alive()` turns false or time runs out."""
    found = {}

    def done():
        found["fields"] = listening_fields(log_path)
        return found["fields"] is not None or not alive()

    wait_until(done, seconds)
    return found["fields"]


class Server:
    """packet-ingest on loopback ports; `grpc`, `ingest`, `metrics` are the bound
    "HOST:PORT" addresses, `stream_id` the stream it announced."""

    def __init__(self, log_path, *args, binary_path=None, start_timeout=30):
        self.log_path = Path(log_path)
        argv = [
            binary_path or binary(),
            "--grpc-addr", "127.0.0.1:0",
            "--ingest-addr", "127.0.0.1:0",
            "--metrics-addr", "127.0.0.1:0",
            "--log-format", "json",
            *args,
        ]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=clean_env(RUST_LOG="info"),  # the listening line is at INFO
            )
        self.pid = self.process.pid
        fields = wait_listening(self.log_path, self.running, start_timeout)
        if fields is None:
            self.kill()
            why = "exited" if self.process.returncode is not None else f"did not listen within {start_timeout}s"
            raise Fatal(f"packet-ingest {why}: {self.log_tail()}")
        self.grpc = fields["grpc_addr"]
        self.ingest = fields["ingest_addr"]
        self.metrics = fields["metrics_addr"]
        self.stream_id = fields.get("stream_id")

    def log_tail(self, lines=3):
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(line[:300] for line in text.splitlines()[-lines:])

    def running(self):
        return self.process.poll() is None

    def stop(self, timeout=20):
        """SIGTERM, then the exit status; None (after SIGKILL) if it took longer."""
        if self.running():
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self):
        if self.running():
            self.process.kill()
        self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def _pid_alive(pid):
    """A process that exists and is not a zombie (exited, not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


if __name__ == "__main__":
    # For shell scripts, which start the server themselves (to signal it):
    #   python3 .ci/cilib.py listening LOG PID [SECONDS]
    # waits for the listening line in LOG while PID runs and prints
    # "GRPC INGEST METRICS STREAM_ID"; status 1 if it never comes.
    if len(sys.argv) not in (4, 5) or sys.argv[1] != "listening":
        sys.exit("usage: cilib.py listening LOG PID [SECONDS]")
    pid, seconds = int(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) == 5 else 30
    fields = wait_listening(sys.argv[2], lambda: _pid_alive(pid), seconds)
    if fields is None:
        sys.exit(f"packet-ingest (pid {pid}) did not log its listening line: it exited, or took over {seconds:.0f}s")
    print(fields["grpc_addr"], fields["ingest_addr"], fields["metrics_addr"], fields.get("stream_id", "-"))
