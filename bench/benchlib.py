"""What bench/compare.py and bench/cluster.py share: settings from the
environment, the binaries, the processes they start and stop (packet-ingest
through .ci/cilib.py's Server, the same start-up as the CI checks), the bench
client runs, and the facts about the machine a report states.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".ci"))
import cilib  # noqa: E402

NAME = Path(sys.argv[0]).stem  # "compare", "cluster" or "compression", for log lines


def log(message):
    print(f"[{NAME} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def setting(name, default):
    return os.environ.get(name) or default


def tail(path, lines=3):
    try:
        return " ".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------- binaries and tools

BIN = None  # the packet-ingest binary; set by build_binaries
BENCH_BIN = None  # the load client, next to it


def build_binaries():
    """The release binaries ($PACKET_INGEST_BIN to use another server binary)."""
    global BIN, BENCH_BIN
    BIN = os.environ.get("PACKET_INGEST_BIN")
    if not BIN:
        log("building the release binary")
        # Both packages by name: the workspace builds only the server by default.
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "packet-ingest", "-p",
                        "packet-ingest-bench"], cwd=ROOT, stdout=sys.stderr, check=True)
        BIN = str(ROOT / "target" / "release" / "packet-ingest")
    BENCH_BIN = os.environ.get("PACKET_INGEST_BENCH_BIN") or str(Path(BIN).parent / "packet-ingest-bench")


def apt_install(packages):
    """Installs missing Debian packages, best effort: what fails is left out of the run."""
    if not packages:
        return
    log(f"installing {' '.join(packages)} (Debian packages)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    ok = subprocess.run(["apt-get", "update", "-qq"], stdout=sys.stderr).returncode == 0 and subprocess.run(
        ["apt-get", "install", "-y", "-qq", *packages], stdout=sys.stderr, env=env).returncode == 0
    if not ok:
        log(f"could not install {' '.join(packages)}; those parts will be missing")


def version(argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True).stdout.strip() or "none"
    except OSError:
        return "none"


# ---------------------------------------------------------------- processes

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(addr, seconds):
    host, port = addr.rsplit(":", 1)

    def connects():
        try:
            socket.create_connection((host, int(port)), 1).close()
            return True
        except OSError:
            return False

    return cilib.wait_until(connects, seconds, 0.2)


def descendants(pid):
    """Every process below `pid`, from /proc."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(pid):
    """CPU seconds (user + system, all threads) of `pid` so far; None if it is gone.
    The command name (field 2) may hold spaces: fields are counted after its ')'."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_steal_seconds():
    """CPU seconds the hypervisor gave other guests while this one wanted to run (steal), all cores."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def machine_busy_seconds():
    """CPU seconds the whole machine has been busy, all cores: user, nice, system, irq, softirq."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    return sum(int(fields[i]) for i in (1, 2, 3, 6, 7)) / os.sysconf("SC_CLK_TCK")


class Process:
    """A server other than packet-ingest (seed design, nats-server), its output in
    `log_path`; leaving the `with` block stops it (and `also_stop`)."""

    def __init__(self, argv, log_path):
        with open(log_path, "wb") as out:
            self.process = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT)
        self.pid = self.process.pid
        self.also_stop = []

    def running(self):
        return self.process.poll() is None

    def stop(self, timeout=10):
        if self.running():
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for pid in self.also_stop:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class PacketIngest(cilib.Server):
    """packet-ingest on loopback ports (cilib.Server), stopped (SIGTERM, bounded)
    when the `with` block ends."""

    def __init__(self, log_path, *args):
        super().__init__(log_path, *args, binary_path=BIN)

    def __exit__(self, *exc):
        self.stop(30)


# ---------------------------------------------------------------- bench runs

class Bench:
    """Runs of the load client; each leaves RESULTS/NAME.json (its --json) and NAME.err."""

    def __init__(self, results):
        self.results = Path(results)

    def run(self, name, *args, pids=(), timeout=None):
        """One bench run; its exit status (124: killed after `timeout` seconds)."""
        args = [str(a) for a in args]
        log(f"  {name}: {' '.join(args)}")
        argv = [BENCH_BIN, "--json", "--quiet", *[str(a) for pid in pids for a in ("--server-pid", pid)], *args]
        out, err = self.results / f"{name}.json", self.results / f"{name}.err"
        # The share of the machine's CPU time the hypervisor took meanwhile: on
        # a shared host it is what makes one run differ from the next.
        steal_before, t0 = machine_steal_seconds(), time.monotonic()
        with open(out, "w") as stdout, open(err, "w") as stderr:
            try:
                rc = subprocess.run(argv, stdout=stdout, stderr=stderr, timeout=timeout,
                                    env=dict(os.environ, RUST_LOG="warn")).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        machine_seconds = (time.monotonic() - t0) * len(os.sched_getaffinity(0))
        (self.results / f"{name}.steal").write_text(
            f"{(machine_steal_seconds() - steal_before) / machine_seconds if machine_seconds else 0:.4f}\n")
        if out.stat().st_size == 0:
            log(f"  {name} gave no result: {tail(err, 2)}")
            out.unlink()
        return rc


# ---------------------------------------------------------------- the report's facts

def commit(paths=(), note=" plus uncommitted changes"):
    """The commit measured, and whether `paths` (everything by default) differ from it."""
    head = version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    clean = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", *paths]).returncode == 0
    return head + ("" if clean else note)


def write_machine(results, started, **facts):
    """machine.txt: what report.py states about the run."""
    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    lines = {
        "cpu": cpu.group(1).strip() if cpu else "unknown",
        "cores": len(os.sched_getaffinity(0)),  # what nproc says
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "kernel": os.uname().release,
        **facts,
        "seconds": int(time.time() - started),
    }
    (Path(results) / "machine.txt").write_text("".join(f"{k}={v}\n" for k, v in lines.items()))

