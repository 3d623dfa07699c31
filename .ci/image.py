#!/usr/bin/env python3
"""The container image, built without a daemon and run from its own root filesystem.

    python3 .ci/image.py            (from anywhere; as root, like CI)

- The binary: ``cargo build --release`` of packet-ingest with crt-static
  (static glibc: no loader, no shared library), symbols stripped, in its own
  target directory ``target/image/cargo`` so the ordinary release build is
  left alone. No ELF interpreter is checked.
- The image: the runtime stage of the ``Containerfile`` (``FROM scratch``,
  ``COPY --from=build``, ``LABEL``, ``USER``, ``EXPOSE``, ...) is read and
  applied with buildah on vfs storage under ``target/image/`` (no daemon,
  nothing pulled), then committed as an OCI layout, ``target/image/oci``,
  tagged with what the chart deploys by default (``image.tag``, else the
  chart's appVersion). The Containerfile's build stage must use the same
  cargo environment and arguments as this script, so the two stay one image.
- Equivalence and reproducibility: the same runtime stage through ``buildah
  build`` (what ``podman build`` runs), after a stand-in build stage holding
  this script's files at the same paths, must give the same layer digest and
  config; committing twice must give the same manifest digest.
- Its config against the chart and the workspace: numeric non-root user equal
  to the chart's runAsUser/runAsGroup, the entrypoint, the exposed ports equal
  to the chart's containerPorts, the OCI labels (version = workspace version =
  appVersion, licenses, revision = git HEAD), the stop signal, and the layer
  holding exactly the files the Containerfile copies. The compressed size is
  printed.
- The image run as a container: ``umoci unpack`` makes a runtime bundle (the
  image's root filesystem and a runtime config from its config), and runc
  runs it as the chart runs the pod (read-only root, no capabilities, no new
  privileges) with an empty ``/etc`` but for the hosts file and resolv.conf a
  runtime provides, in its own network namespace: ``packet-ingest --help``;
  then the entrypoint with no arguments serves on the image's ports as the
  image's user with no capabilities, ``packet-ingest health`` run inside the
  container answers SERVING by IP, by a name from the hosts file, and by a
  short Service name through the search list and a name server started in the
  container's network namespace (the static glibc resolves names), and
  ``runc kill TERM`` stops the server (pid 1) with status 0. Then the chart's
  persistence mode: a volume owned by the service user at
  ``/var/lib/packet-ingest`` and ``PACKET_INGEST_DATA_DIR``; ``send --ack``
  inside the container, a restart, and ``tail --from 1`` replays the packet
  under the same stream id.

Needs cargo, buildah, umoci and runc (Debian packages; ``.ci/run`` installs
them) and root (runc, chown in the image). PyYAML for the chart's values comes
from the venv chart_check.py uses. KEEP_WORK=1 keeps target/image/ as it is at
the end (it is reused, and cleaned, by the next run either way).
The last line is "image: N passed, M failed".
"""

import contextlib
import gzip
import hashlib
import io
import json
import os
import platform
import re
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cilib  # noqa: E402
from chart_check import KUBERNETES_VALIDATE  # noqa: E402
from cilib import ROOT, Fatal  # noqa: E402

CONTAINERFILE = ROOT / "Containerfile"
CHART = ROOT / "helm" / "packet-ingest"
WORK = ROOT / "target" / "image"
TARGET = f"{platform.machine()}-unknown-linux-gnu"
# The build: the Containerfile's build stage must say the same (checked).
CARGO_ENV = {
    "RUSTFLAGS": "-C target-feature=+crt-static",
    "CARGO_PROFILE_RELEASE_DEBUG": "0",
    "CARGO_PROFILE_RELEASE_STRIP": "symbols",
}
CARGO_ARGS = ["build", "--locked", "--release", "--target", TARGET, "-p", "packet-ingest", "--bin", "packet-ingest"]
CONTAINERFILE_CARGO = "cargo " + " ".join(CARGO_ARGS).replace(TARGET, '"$target"')
# What the runtime stage copies from the build stage, and where that is here.
BUILD_STAGE_PATHS = {
    "/out/packet-ingest": lambda: WORK / "cargo" / TARGET / "release" / "packet-ingest",
    "/etc/ssl/certs/ca-certificates.crt": lambda: Path("/etc/ssl/certs/ca-certificates.crt"),
    "/out/data/": lambda: WORK / "stage" / "data",
}
RUNTIME_INSTRUCTIONS = {"ARG", "LABEL", "COPY", "USER", "EXPOSE", "STOPSIGNAL", "ENTRYPOINT", "CMD", "ENV", "WORKDIR"}
HOSTNAME = "packet-ingest-image-test"  # resolved from the hosts file given to the container
# Resolved through DNS as in a pod: the short name, the namespace's search list,
# and a name server in the pod's network namespace (dns_responder).
SHORT_NAME = "ingest-packet-ingest"
DNS_NAME = f"{SHORT_NAME}.test.svc.cluster.local"
RESOLV_CONF = "search test.svc.cluster.local svc.cluster.local cluster.local\nnameserver 127.0.0.1\noptions ndots:5\n"
STEP_TIMEOUT = 60  # seconds for any one buildah/umoci/runc command


def in_tools_venv():
    """Re-runs this script in chart_check.py's venv, which has PyYAML."""
    python = cilib.venv("chart", KUBERNETES_VALIDATE)
    if Path(sys.prefix).resolve() != Path(python).parent.parent.resolve():
        os.execv(python, [python, __file__, *sys.argv[1:]])


def run(argv, timeout=STEP_TIMEOUT, **kwargs):
    """Runs argv; its CompletedProcess, or Fatal with its stderr."""
    argv = [str(a) for a in argv]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired:
        raise Fatal(f"{' '.join(argv[:4])} ... took over {timeout}s") from None
    except FileNotFoundError:
        raise Fatal(f"{argv[0]} is not installed (.ci/run installs buildah, umoci and runc)") from None
    if result.returncode != 0:
        raise Fatal(f"{' '.join(argv[:6])} ... exited {result.returncode}: {result.stderr.strip()[-800:]}")
    return result


# --- the Containerfile ------------------------------------------------------


def instructions(text):
    """(stage number, INSTRUCTION, rest) for each instruction, continuation
    lines joined and comments dropped (the subset this repository uses)."""
    out, stage, pending = [], -1, ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += " " + stripped
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        word, _, rest = pending.strip().partition(" ")
        pending = ""
        if word.upper() == "FROM":
            stage += 1
        out.append((stage, word.upper(), rest.strip()))
    return out


def substitute(text, args):
    """${NAME} and $NAME from the stage's ARGs."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), text)


class Runtime:
    """The last stage of the Containerfile, as buildah config and copy calls."""

    def __init__(self, text, build_args):
        parsed = instructions(text)
        last = max(stage for stage, _, _ in parsed)
        self.base = next(rest for stage, word, rest in parsed if stage == last and word == "FROM")
        self.build_stage = " ".join(rest for stage, word, rest in parsed if stage < last)
        self.arg_defaults, self.labels, self.env, self.copies = {}, {}, {}, []
        self.user = self.workdir = self.stop_signal = None
        self.ports, self.entrypoint, self.cmd = [], None, None
        args = {}
        for stage, word, rest in parsed:
            if stage != last or word == "FROM":
                continue
            if word not in RUNTIME_INSTRUCTIONS:
                raise Fatal(f"Containerfile: {word} in the runtime stage; .ci/image.py applies only "
                            f"{', '.join(sorted(RUNTIME_INSTRUCTIONS))}")
            if word == "ARG":
                name, _, default = rest.partition("=")
                self.arg_defaults[name] = shlex.split(default)[0] if default.strip() else ""
                args[name] = build_args.get(name, self.arg_defaults[name])
                continue
            rest = substitute(rest, args)
            if word in ("LABEL", "ENV"):
                pairs = dict(item.split("=", 1) for item in shlex.split(rest))
                (self.labels if word == "LABEL" else self.env).update(pairs)
            elif word == "COPY":
                words = shlex.split(rest)
                flags = dict(w[2:].split("=", 1) for w in words if w.startswith("--"))
                paths = [w for w in words if not w.startswith("--")]
                if flags.get("from") != "build" or len(paths) != 2:
                    raise Fatal(f"Containerfile: COPY {rest}: only COPY --from=build SRC DEST is applied")
                self.copies.append((paths[0], paths[1], flags.get("chown"), flags.get("chmod")))
            elif word == "USER":
                self.user = rest
            elif word == "EXPOSE":
                self.ports += [p if "/" in p else f"{p}/tcp" for p in rest.split()]
            elif word == "STOPSIGNAL":
                self.stop_signal = rest
            elif word == "WORKDIR":
                self.workdir = rest
            else:  # ENTRYPOINT, CMD: exec form only, there is no shell in the image
                try:
                    value = json.loads(rest)
                except ValueError:
                    raise Fatal(f"Containerfile: {word} {rest}: use the exec (JSON) form") from None
                if word == "ENTRYPOINT":
                    self.entrypoint = value
                else:
                    self.cmd = value

    def config_args(self):
        argv = []
        for key, value in self.labels.items():
            argv += ["--label", f"{key}={value}"]
        for key, value in self.env.items():
            argv += ["--env", f"{key}={value}"]
        for port in self.ports:
            argv += ["--port", port]
        if self.user:
            argv += ["--user", self.user]
        if self.workdir:
            argv += ["--workingdir", self.workdir]
        if self.stop_signal:
            argv += ["--stop-signal", self.stop_signal]
        if self.entrypoint is not None:
            argv += ["--entrypoint", json.dumps(self.entrypoint)]
        if self.cmd is not None:
            argv += ["--cmd", json.dumps(self.cmd)]
        return argv


# --- the binary ---------------------------------------------------------------


def elf_interpreter(path):
    """Whether the ELF file at `path` names a program interpreter (PT_INTERP):
    a binary without one loads no shared library."""
    with open(path, "rb") as elf:
        header = elf.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:
            raise Fatal(f"{path} is not a 64-bit ELF file")
        phoff, = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        elf.seek(phoff)
        table = elf.read(phentsize * phnum)
    return any(struct.unpack_from("<I", table, i * phentsize)[0] == 3 for i in range(phnum))


def build_binary(checks):
    started = time.monotonic()
    log = WORK / "cargo-build.log"
    env = dict(os.environ, CARGO_TARGET_DIR=str(WORK / "cargo"), **CARGO_ENV)
    with open(log, "w") as out:
        result = subprocess.run(["cargo", *CARGO_ARGS], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, timeout=3600)
    if result.returncode != 0:
        raise Fatal(f"cargo {' '.join(CARGO_ARGS)} failed: {log.read_text(errors='replace')[-1500:]}")
    binary = BUILD_STAGE_PATHS["/out/packet-ingest"]()
    checks.ok(f"static binary built in {time.monotonic() - started:.0f}s "
              f"({binary.stat().st_size / 2**20:.1f} MiB, {TARGET}, {CARGO_ENV['RUSTFLAGS']})")
    checks.check(not elf_interpreter(binary), "the binary has no ELF interpreter: statically linked")
    return binary


# --- the image ------------------------------------------------------------------


def buildah(*argv):
    storage = ["--root", WORK / "storage", "--runroot", WORK / "run", "--storage-driver", "vfs"]
    return run(["buildah", *storage, *argv]).stdout.strip()


def source_date_epoch():
    """The commit's time: the image's creation time, so a rebuild of the same
    commit is the same image."""
    result = subprocess.run(["git", "log", "-1", "--format=%ct"], cwd=ROOT, capture_output=True, text=True)
    return int(result.stdout.strip()) if result.returncode == 0 and result.stdout.strip() else 0


def build_image(checks, runtime, layout, tag):
    started = time.monotonic()
    data = BUILD_STAGE_PATHS["/out/data/"]()
    data.mkdir(parents=True, exist_ok=True)
    if runtime.base != "scratch":
        raise Fatal(f"Containerfile: the runtime stage is FROM {runtime.base}, not FROM scratch")
    container = buildah("from", "--name", "packet-ingest-image", "scratch")
    for src, dest, chown, chmod in runtime.copies:
        if src not in BUILD_STAGE_PATHS:
            raise Fatal(f"Containerfile: COPY --from=build {src}: .ci/image.py does not know where that is "
                        f"(BUILD_STAGE_PATHS)")
        host = BUILD_STAGE_PATHS[src]()
        options = (["--chown", chown] if chown else []) + (["--chmod", chmod] if chmod else [])
        buildah("copy", *options, container, f"{host}/" if src.endswith("/") else host, dest)
    buildah("config", *runtime.config_args(), container)
    buildah("commit", "--rm", "--format", "oci", "--disable-compression=false",
            "--timestamp", source_date_epoch(), container, f"oci:{layout}:{tag}")
    if checks is not None:
        checks.ok(f"buildah (vfs, no daemon) committed {layout.relative_to(ROOT)}:{tag} from the Containerfile's "
                  f"runtime stage in {time.monotonic() - started:.0f}s")


def build_with_bud(containerfile, build_args, layout, tag):
    """The Containerfile's runtime stage as `buildah build` (podman build)
    reads it, after a stand-in build stage holding this script's files at the
    same paths: the same layer and config as build_image's, or the script has
    drifted from the Containerfile."""
    context = WORK / "bud"
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    stand_in = ["FROM scratch AS build"]
    for number, (path, host) in enumerate(BUILD_STAGE_PATHS.items()):
        name = f"f{number}"
        if path.endswith("/"):
            shutil.copytree(host(), context / name)
            name += "/"
        else:
            shutil.copy2(host(), context / name)
        stand_in.append(f"COPY {name} {path}")
    lines = containerfile.splitlines()
    last_from = max(i for i, line in enumerate(lines) if line.strip().upper().startswith("FROM "))
    (context / "Containerfile").write_text("\n".join(stand_in + lines[last_from:]) + "\n")
    args = [arg for key, value in build_args.items() for arg in ("--build-arg", f"{key}={value}")]
    buildah("build", "--timestamp", source_date_epoch(), *args, "-f", context / "Containerfile",
            "-t", "localhost/packet-ingest-bud", context)
    buildah("push", "localhost/packet-ingest-bud", f"oci:{layout}:{tag}")
    return image_parts(layout)


def image_parts(layout):
    """(layer digests, config without history) of the image in `layout`."""
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(blob(layout, index["manifests"][0]["digest"]))
    config = json.loads(blob(layout, manifest["config"]["digest"]))
    config.pop("history", None)
    # buildah build gives an image FROM scratch the default PATH; the image
    # has nothing to find on it.
    if config["config"].get("Env") == ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]:
        del config["config"]["Env"]
    return [layer["digest"] for layer in manifest["layers"]], config


def check_equivalence(checks, bud, ours):
    """buildah build's image (layers, config) against this script's."""
    checks.check(bud[0] == ours[0], f"buildah build of the Containerfile's runtime stage: the same layer ({ours[0]})",
                 f"buildah build: {bud[0]}")
    checks.check(bud[1] == ours[1], "buildah build of the Containerfile's runtime stage: the same config",
                 "\n".join(f"{key}: buildah build {bud[1]['config'].get(key)!r}, "
                           f"this script {ours[1]['config'].get(key)!r}"
                           for key in {**bud[1]["config"], **ours[1]["config"]}
                           if bud[1]["config"].get(key) != ours[1]["config"].get(key))
                 or f"buildah build: {json.dumps(bud[1])[:500]}\nthis script: {json.dumps(ours[1])[:500]}")


def manifest_digest(layout):
    return json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]


def blob(layout, digest):
    algorithm, _, hexdigest = digest.partition(":")
    data = (layout / "blobs" / algorithm / hexdigest).read_bytes()
    if hashlib.sha256(data).hexdigest() != hexdigest:
        raise Fatal(f"blob {digest} does not match its digest")
    return data


def check_config(checks, layout, tag, want):
    """The committed image against what the chart and the workspace say."""
    index = json.loads((layout / "index.json").read_text())
    refs = [m.get("annotations", {}).get("org.opencontainers.image.ref.name") for m in index["manifests"]]
    checks.check(refs == [tag], f"the layout holds one image, tagged {tag} (helm image.tag default: appVersion)",
                 f"refs: {refs}")
    manifest = json.loads(blob(layout, index["manifests"][0]["digest"]))
    image = json.loads(blob(layout, manifest["config"]["digest"]))
    config = image.get("config", {})
    checks.check(image.get("os") == "linux" and image.get("architecture") == want["arch"],
                 f"platform linux/{want['arch']}", f"{image.get('os')}/{image.get('architecture')}")
    user = config.get("User", "")
    uid, _, gid = user.partition(":")
    checks.check(uid.isdigit() and gid.isdigit() and int(uid) != 0,
                 f"user {user!r}: numeric (no /etc/passwd in the image) and not root")
    checks.check(user == want["user"], f"user is the chart's runAsUser:runAsGroup ({want['user']})", f"got {user!r}")
    checks.check(config.get("Entrypoint") == ["/usr/local/bin/packet-ingest"] and not config.get("Cmd"),
                 "entrypoint [/usr/local/bin/packet-ingest], no Cmd",
                 f"Entrypoint {config.get('Entrypoint')}, Cmd {config.get('Cmd')}")
    ports = sorted(config.get("ExposedPorts", {}))
    checks.check(ports == want["ports"], f"exposed ports {ports} are the chart's containerPorts",
                 f"chart: {want['ports']}")
    checks.check(config.get("StopSignal") == "SIGTERM", "stop signal SIGTERM (the server drains on it)")
    labels = config.get("Labels", {})
    for key, value in want["labels"].items():
        checks.check(labels.get(f"org.opencontainers.image.{key}") == value,
                     f"label org.opencontainers.image.{key} = {value!r}",
                     f"got {labels.get(f'org.opencontainers.image.{key}')!r}")
    layers = manifest["layers"]
    checks.check(layers and all(layer["mediaType"].endswith("tar+gzip") for layer in layers),
                 f"{len(layers)} gzip-compressed layer(s)", [layer["mediaType"] for layer in layers])
    members = {}
    for layer in layers:
        with tarfile.open(fileobj=gzip.GzipFile(fileobj=io.BytesIO(blob(layout, layer["digest"])))) as tar:
            members.update({m.name.rstrip("/"): m for m in tar.getmembers()})
    files = {name: m for name, m in members.items() if not m.isdir() or name in want["files"]}
    checks.check(sorted(files) == sorted(want["files"]), f"the layers hold exactly {sorted(want['files'])}",
                 f"files and owned dirs: {sorted(files)}")
    for name, (mode, owner) in want["files"].items():
        member = members.get(name)
        got = (member.mode & 0o7777, f"{member.uid}:{member.gid}") if member else None
        checks.check(got == (mode, owner), f"{name}: mode {mode:o}, owner {owner}", f"got {got}")
    compressed = sum(layer["size"] for layer in layers)
    unpacked = sum(m.size for m in members.values())
    checks.log(f"image size: {compressed / 2**20:.1f} MiB compressed (layers), {unpacked / 2**20:.1f} MiB unpacked; "
               f"manifest {index['manifests'][0]['digest']}")
    return config


# --- the container ----------------------------------------------------------------


class Container:
    """The unpacked image run by runc, as the chart runs the pod."""

    def __init__(self, bundle, name):
        self.bundle, self.name = bundle, name
        self.state = WORK / "runc"
        self.spec = json.loads((bundle / "config.json").read_text())
        self.entrypoint = self.spec["process"]["args"]

    def runc(self, *argv, timeout=STEP_TIMEOUT, check=True, **kwargs):
        argv = ["runc", "--root", str(self.state), *map(str, argv)]
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check, **kwargs)
        except subprocess.CalledProcessError as error:
            raise Fatal(f"{' '.join(argv[3:6])} ... exited {error.returncode}: {error.stderr.strip()[-600:]}") from None
        except subprocess.TimeoutExpired:
            raise Fatal(f"{' '.join(argv[3:6])} ... took over {timeout}s") from None

    def write_spec(self, args, env=(), mounts=()):
        spec = json.loads(json.dumps(self.spec))
        process = spec["process"]
        process["terminal"] = False
        process["args"] = args
        process["env"] = [*process.get("env", []), *env]
        # The chart's securityContext: no capabilities, no privilege
        # escalation, read-only root filesystem.
        process["capabilities"] = {key: [] for key in ("bounding", "effective", "inheritable", "permitted", "ambient")}
        process["noNewPrivileges"] = True
        spec["root"]["readonly"] = True
        # An empty /etc but for the hosts file and resolv.conf a runtime
        # provides: in memory mode the binary reads nothing else there (no
        # passwd, nsswitch.conf or certificates). The cgroup mount is left out:
        # this machine's hybrid cgroup hierarchy is not the pod's concern.
        hosts, resolv = WORK / "hosts", WORK / "resolv.conf"
        hosts.write_text(f"127.0.0.1\tlocalhost {HOSTNAME}\n")
        resolv.write_text(RESOLV_CONF)
        spec["mounts"] = [m for m in spec["mounts"] if not m["destination"].startswith("/sys/fs/cgroup")] + [
            {"destination": "/etc", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "noexec", "ro"]},
            {"destination": "/etc/hosts", "type": "bind", "source": str(hosts), "options": ["rbind", "ro"]},
            {"destination": "/etc/resolv.conf", "type": "bind", "source": str(resolv), "options": ["rbind", "ro"]},
            *mounts,
        ]
        (self.bundle / "config.json").write_text(json.dumps(spec, indent=1))

    def exec(self, *argv, stdin=None, timeout=20):
        return self.runc("exec", self.name, self.entrypoint[0], *argv, check=False, input=stdin, timeout=timeout)

    @contextlib.contextmanager
    def serving(self, checks, what, env=(), mounts=()):
        """The entrypoint with no arguments (the image's defaults) serving in
        the container while the block runs; yields (listening fields, pid on
        this host). Then SIGTERM, and the server must exit 0."""
        self.write_spec(self.entrypoint, ["PACKET_INGEST_LOG_FORMAT=json", "RUST_LOG=info", *env], mounts)
        log = WORK / f"serve-{what.replace(' ', '-')}.log"
        with open(log, "wb") as out:
            argv = ["runc", "--root", str(self.state), "run", "--bundle", str(self.bundle), self.name]
            server = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            fields = cilib.wait_listening(log, lambda: server.poll() is None, 30)
            if fields is None:
                raise Fatal(f"{what}: the server in the container did not listen: "
                            f"{log.read_text(errors='replace')[-600:]}")
            yield fields, json.loads(self.runc("state", self.name).stdout)["pid"]
            self.runc("kill", self.name, "TERM")
            try:
                code = server.wait(30)
            except subprocess.TimeoutExpired:
                code = None
            checks.check(code == 0, f"{what}: SIGTERM to the container, the server (pid 1) exits 0 (got {code})",
                         log.read_text(errors="replace")[-600:])
        finally:
            if server.poll() is None:
                self.runc("kill", self.name, "KILL", check=False)
                server.wait(10)
            self.runc("delete", "--force", self.name, check=False)


def run_container(checks, layout, tag, config):
    bundle = WORK / "bundle"
    run(["umoci", "unpack", "--image", f"{layout}:{tag}", bundle])
    rootfs = bundle / "rootfs"
    data = rootfs / "var/lib/packet-ingest"
    checks.check(data.is_dir() and f"{data.stat().st_uid}:{data.stat().st_gid}" == config["User"],
                 f"umoci unpacked the image; /var/lib/packet-ingest belongs to {config['User']}")
    container = Container(bundle, f"packet-ingest-image-{os.getpid()}")
    spec_user = container.spec["process"]["user"]
    checks.check(f"{spec_user.get('uid')}:{spec_user.get('gid')}" == config["User"]
                 and container.entrypoint == config["Entrypoint"],
                 "the runtime config umoci made runs the entrypoint as the image's user",
                 json.dumps(container.spec["process"])[:400])

    container.write_spec([*container.entrypoint, "--help"])
    help_run = container.runc("run", "--bundle", bundle, container.name, check=False)
    checks.check(help_run.returncode == 0 and "--grpc-addr" in help_run.stdout,
                 "packet-ingest --help runs in the container (runc: read-only root, no capabilities, "
                 "/etc empty but hosts and resolv.conf)",
                 f"status {help_run.returncode}: {help_run.stderr[-400:]}{help_run.stdout[:200]}")
    container.runc("delete", "--force", container.name, check=False)

    with container.serving(checks, "memory mode") as (fields, pid):
        listening = [fields.get(k) for k in ("grpc_addr", "ingest_addr", "metrics_addr")]
        ports = sorted(f"{addr.rsplit(':', 1)[1]}/tcp" for addr in listening)
        checks.check(ports == sorted(config["ExposedPorts"]),
                     f"the entrypoint with no arguments serves on the exposed ports: {listening}")
        status = Path(f"/proc/{pid}/status").read_text()
        uid = re.search(r"^Uid:\s+(\d+)", status, re.M).group(1)
        gid = re.search(r"^Gid:\s+(\d+)", status, re.M).group(1)
        capabilities = re.search(r"^CapEff:\s+(\w+)", status, re.M).group(1)
        checks.check(f"{uid}:{gid}" == config["User"] and int(capabilities, 16) == 0,
                     f"the server runs as {uid}:{gid} with no capabilities (CapEff {capabilities})")
        dns = subprocess.Popen(["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, __file__,
                                "dns", DNS_NAME, "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            started = select.select([dns.stdout], [], [], 10)[0] and dns.stdout.readline().strip() == "ready"
            if not started:
                raise Fatal(f"the DNS responder did not start: {dns.stderr.read()[-400:]}")
            how = {"127.0.0.1:50051": "by IP", f"{HOSTNAME}:50051": "from /etc/hosts",
                   f"{SHORT_NAME}:50051": "through DNS, the search list and resolv.conf"}
            for addr, via in how.items():
                health = container.exec("health", "--addr", addr, "--service", "packetingest.v1.Packets")
                checks.check(health.returncode == 0 and health.stdout.strip() == "SERVING",
                             f"packet-ingest health --addr {addr} ({via}, inside the container): SERVING",
                             f"status {health.returncode}: {health.stdout.strip()} {health.stderr.strip()[-400:]}")
        finally:
            dns.kill()
            answered = [json.loads(line) for line in dns.communicate(timeout=10)[0].splitlines()]
        checks.check({"name": DNS_NAME, "type": 1, "found": True} in answered,
                     f"the static binary asked the name server for {DNS_NAME} (A)", answered)

    # The chart's persistence mode: a volume at /var/lib/packet-ingest (owned
    # by the service user, as fsGroup makes it) under the read-only root; a
    # packet acknowledged as durable is there after the container restarts.
    volume = WORK / "volume"
    volume.mkdir()
    uid, gid = (int(n) for n in config["User"].split(":"))
    os.chown(volume, uid, gid)
    durable = (["PACKET_INGEST_DATA_DIR=/var/lib/packet-ingest"],
               [{"destination": "/var/lib/packet-ingest", "type": "bind", "source": str(volume),
                 "options": ["rbind", "rw"]}])
    payload = f"durable-{os.getpid()}"
    with container.serving(checks, "durable mode", *durable) as (first, _):
        sent = container.exec("send", "--ack", "--channel", "3", stdin=payload + "\n")
        checks.check(sent.returncode == 0, "durable mode: packet-ingest send --ack (inside the container) succeeds",
                     f"status {sent.returncode}: {sent.stderr.strip()[-400:]}")
    owners = {f"{f.stat().st_uid}:{f.stat().st_gid}" for f in volume.rglob("*")}
    checks.check(owners == {config["User"]}, f"durable mode: the log on the volume belongs to {config['User']}",
                 f"owners: {owners}")
    with container.serving(checks, "durable mode, restarted", *durable) as (second, _):
        tail = container.exec("tail", "--from", "1", "--count", "1")
        lines = [json.loads(line) for line in tail.stdout.splitlines() if line.startswith("{")]
        got = next((line for line in lines if "sequence" in line), {})  # after a {"stream_id": ...} line
        checks.check(got.get("payload") == payload and got.get("sequence") == 1 and got.get("channel") == 3
                     and second.get("stream_id") == first.get("stream_id"),
                     "durable mode: after a restart, tail --from 1 replays the packet, same stream id",
                     f"status {tail.returncode}: {tail.stdout[:300]} {tail.stderr.strip()[-300:]}; stream ids "
                     f"{first.get('stream_id')} / {second.get('stream_id')}")


def dns_responder(name, seconds):
    """Answers A questions for `name` with 127.0.0.1 (other types: no data;
    other names: NXDOMAIN) on 127.0.0.1:53 of the network namespace it runs in,
    as a cluster's DNS would, for `seconds` at most; prints "ready", then each
    question as a JSON line. Run inside the container's namespace by nsenter."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 53))
    print("ready", flush=True)
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            query, peer = sock.recvfrom(512)
        except TimeoutError:
            return
        labels, end = [], 12
        while end < len(query) and query[end]:
            labels.append(query[end + 1:end + 1 + query[end]].decode(errors="replace"))
            end += 1 + query[end]
        if len(query) < end + 5:
            continue  # not a question this understands
        asked, qtype = ".".join(labels).lower(), struct.unpack_from(">H", query, end + 1)[0]
        found = asked == name
        answer = struct.pack(">HHHIH4s", 0xC00C, 1, 1, 5, 4, bytes([127, 0, 0, 1])) if found and qtype == 1 else b""
        header = struct.pack(">HHHHHH", struct.unpack_from(">H", query)[0], 0x8180 | (0 if found else 3),
                             1, 1 if answer else 0, 0, 0)
        sock.sendto(header + query[12:end + 5] + answer, peer)
        print(json.dumps({"name": asked, "type": qtype, "found": found}), flush=True)


# --- main -------------------------------------------------------------------------


def expectations(yaml):
    """What the image must be, from the workspace and the chart."""
    workspace = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    security = values["securityContext"]
    files = {
        "usr/local/bin/packet-ingest": (0o755, "0:0"),
        "etc/ssl/certs/ca-certificates.crt": (0o644, "0:0"),
        "var": (0o755, "0:0"),
        "var/lib": (0o755, "0:0"),
        "var/lib/packet-ingest": (0o755, f"{security['runAsUser']}:{security['runAsGroup']}"),
    }
    return {
        "version": workspace["version"],
        "app_version": str(chart["appVersion"]),
        "repository": values["image"]["repository"],
        "tag": values["image"]["tag"] or str(chart["appVersion"]),
        "user": f"{security['runAsUser']}:{security['runAsGroup']}",
        "ports": sorted(f"{port}/tcp" for port in values["containerPorts"].values()),
        "arch": {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine()),
        "labels": {
            "title": "packet-ingest",
            "version": workspace["version"],
            "licenses": workspace["license"],
            "revision": revision,
        },
        "files": files,
    }


def main(checks):
    import yaml

    want = expectations(yaml)
    build_args = {"VERSION": want["version"], "REVISION": want["labels"]["revision"]}
    runtime = Runtime(CONTAINERFILE.read_text(), build_args)
    checks.check(want["version"] == want["app_version"] == runtime.arg_defaults.get("VERSION"),
                 f"one version: workspace {want['version']}, chart appVersion {want['app_version']}, "
                 f"Containerfile ARG VERSION {runtime.arg_defaults.get('VERSION')}")
    checks.check(want["repository"] == "packet-ingest",
                 f"helm image.repository is {want['repository']!r}, the image's name")
    missing = [f"{k}={v}" for k, v in CARGO_ENV.items() if f'{k}="{v}"' not in runtime.build_stage
               and f"{k}={v}" not in runtime.build_stage]
    missing += [] if CONTAINERFILE_CARGO in runtime.build_stage else [CONTAINERFILE_CARGO]
    checks.check(not missing, "the Containerfile's build stage uses this script's cargo environment and arguments",
                 f"missing: {missing}")

    for stale in ("storage", "run", "oci", "oci-again", "oci-bud", "bud", "bundle", "stage", "runc", "volume"):
        shutil.rmtree(WORK / stale, ignore_errors=True)
    WORK.mkdir(parents=True, exist_ok=True)

    build_binary(checks)
    layout = WORK / "oci"
    build_image(checks, runtime, layout, want["tag"])
    # File times are clamped and the creation time is the commit's: the same
    # commit builds the same image, digest for digest.
    again = WORK / "oci-again"
    build_image(None, runtime, again, want["tag"])
    checks.check(manifest_digest(again) == manifest_digest(layout),
                 f"built twice, the same manifest digest ({manifest_digest(layout)})",
                 f"second build: {manifest_digest(again)}")
    check_equivalence(checks, build_with_bud(CONTAINERFILE.read_text(), build_args, WORK / "oci-bud", want["tag"]),
                      image_parts(layout))
    config = check_config(checks, layout, want["tag"], want)
    run_container(checks, layout, want["tag"], config)
    if not os.environ.get("KEEP_WORK"):
        for scratch in ("storage", "run", "oci-again", "oci-bud", "bud", "bundle", "stage", "runc", "volume"):
            shutil.rmtree(WORK / scratch, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["dns"]:  # the responder, started by run_container
        dns_responder(sys.argv[2], float(sys.argv[3]))
        sys.exit(0)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    in_tools_venv()
    cilib.Checks("image").run(main)
