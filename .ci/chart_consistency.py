"""What no schema can check in one rendering of the chart: that the values
reach the manifests the way the service needs them.

``Rendering(flags, values, docs).problems()`` lists what is wrong (empty: all
good) in the manifests `docs` rendered from `values` (the chart's values.yaml
merged with the case's file). `flags` are the service's flags; each is read
from PACKET_INGEST_<FLAG>. The workload is the Deployment, or with
persistence.enabled the StatefulSet (its volume, data directory and headless
Service are checked too). Used by chart_check.py for every case and
Kubernetes version; needs PyYAML only to load its inputs.
"""

import re


def env_name(flag):
    """--grpc-addr -> PACKET_INGEST_GRPC_ADDR"""
    return "PACKET_INGEST_" + flag.upper().replace("-", "_")


def merge(base, over):
    """Helm's values merge: maps merge recursively, null deletes a key."""
    out = dict(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def millis(duration):
    """A humantime duration of the chart's subset ("1m30s", "500ms") in ms."""
    if not re.fullmatch(r"(?:\d+(?:ms|s|m|h))+", duration):
        raise ValueError("bad duration %r" % duration)
    unit = {"ms": 1, "s": 1000, "m": 60000, "h": 3600000}
    return sum(int(n) * unit[u] for n, u in re.findall(r"(\d+)(ms|s|m|h)", duration))


def quantity(q):
    """A Kubernetes memory quantity in bytes (None for what this does not parse)."""
    m = re.fullmatch(r"(\d+)(|k|M|G|T|Ki|Mi|Gi|Ti)", str(q))
    mult = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return int(m.group(1)) * mult[m.group(2)] if m else None


def subset(small, big):
    return all(big.get(k) == v for k, v in (small or {}).items())


def scaled(v, n):
    """minAvailable / maxUnavailable at n replicas; percentages round up, like
    the disruption controller."""
    if isinstance(v, str) and v.endswith("%"):
        return -(-int(v[:-1]) * n // 100)
    return int(v)


def snake(key):
    """config.maxPayload -> MAX_PAYLOAD"""
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).upper()


# Flags of the durable stream: set (from persistence.mountPath and config.*)
# only with persistence.enabled, left out in memory mode.
PERSISTENCE_FLAGS = ("data-dir", "retention-bytes", "retention-age", "fsync", "fsync-interval", "log-io", "segment-bytes")

# Flags of cluster mode set from clusterNats.* (key) only when it is enabled.
CLUSTER_FLAGS = ("cluster-max-age", "cluster-max-bytes", "cluster-max-lag")
CLUSTER_KEYS = {"cluster-max-age": "maxAge", "cluster-max-bytes": "maxBytes", "cluster-max-lag": "maxLag"}

# Flags set from a mounted Secret, from clusterNats or only with persistence,
# rather than always from config.*.
CONDITIONAL_FLAGS = ("hmac-key-file", "auth-token-file", "tls-cert", "tls-key", "tls-client-ca",
                     "cluster-nats", "cluster-stream", "cors-origin", "compression", "otlp-endpoint") + CLUSTER_FLAGS + PERSISTENCE_FLAGS

# The config.* keys behind PERSISTENCE_FLAGS (all but data-dir).
PERSISTENCE_CONFIG = ("retentionBytes", "retentionAge", "fsync", "fsyncInterval", "logIo", "segmentBytes")

# Labels that change with every chart or image version; a StatefulSet's claim
# templates cannot change after install, so they must not carry them.
VERSIONED_LABELS = ("helm.sh/chart", "app.kubernetes.io/version")


class Rendering:
    def __init__(self, flags, values, docs):
        self.flags, self.values, self.docs = flags, values, [d for d in docs if d]
        self.errors = []
        self.persistent = bool((values.get("persistence") or {}).get("enabled"))
        self.kind = "StatefulSet" if self.persistent else "Deployment"
        workloads = self.kinds("Deployment") + self.kinds("StatefulSet")
        self.check([w["kind"] for w in workloads] == [self.kind],
                   "expected exactly one %s (persistence.enabled=%s), got %s"
                   % (self.kind, self.persistent, [w["kind"] for w in workloads]))
        self.dep = workloads[0]  # the workload: Deployment, or StatefulSet with persistence
        self.fullname = self.dep["metadata"]["name"]
        self.pod = self.dep["spec"]["template"]
        self.spec = self.pod["spec"]
        self.ctr = next(c for c in self.spec["containers"] if c["name"] == "packet-ingest")
        self.ports = {p["name"]: p["containerPort"] for p in self.ctr["ports"]}
        self.resources = self.ctr.get("resources", {})
        self.env = {}
        for e in self.ctr.get("env", []):
            self.check(e["name"] not in self.env, "env %s set twice" % e["name"])
            self.env[e["name"]] = e.get("value", e.get("valueFrom"))
        nats = values["clusterNats"]
        self.cluster = bool(nats.get("url") or nats.get("existingSecret"))

    def kinds(self, kind):
        return [d for d in self.docs if d.get("kind") == kind]

    def check(self, condition, message):
        if not condition:
            self.errors.append(message)
        return condition

    def problems(self):
        for section in (self.workload, self.security, self.environment, self.secret_files, self.probes,
                        self.shutdown_and_memory, self.service, self.persistence, self.replicas,
                        self.disruption_budget, self.service_monitors, self.test_pod):
            section()
        return self.errors

    def env_set(self):
        """The PACKET_INGEST_* variables this rendering sets."""
        return {k for k in self.env if k.startswith("PACKET_INGEST_")}

    def service_monitor_objects(self):
        return self.kinds("ServiceMonitor")

    # ------------------------------------------------------------ the sections

    def workload(self):
        check, values, dep = self.check, self.values, self.dep
        pod_labels = self.pod["metadata"]["labels"]
        check(subset(dep["spec"]["selector"]["matchLabels"], pod_labels), "%s selector does not match its pod labels" % self.kind)
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                    "app.kubernetes.io/managed-by", "helm.sh/chart"):
            check(key in dep["metadata"]["labels"], "%s lacks label %s" % (self.kind, key))
        check(self.spec.get("enableServiceLinks") is False,
              "enableServiceLinks must be false (service links inject PACKET_INGEST_* variables)")
        check(set(self.ports) == {"grpc", "ingest", "metrics"}, "container ports are %s" % sorted(self.ports))
        for name in ("grpc", "ingest", "metrics"):
            check(self.ports.get(name) == values["containerPorts"][name], "container port %s is not containerPorts.%s" % (name, name))

    def security(self):
        check = self.check
        psc, csc = self.spec.get("securityContext", {}), self.ctr.get("securityContext", {})
        check(psc.get("runAsNonRoot") is True and csc.get("runAsNonRoot") is True, "runAsNonRoot not set")
        check(psc.get("runAsUser") == 65532 and csc.get("runAsUser") == 65532, "runAsUser is not 65532")
        check(csc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation is not false")
        check(csc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem is not true")
        check("ALL" in csc.get("capabilities", {}).get("drop", []), "capabilities do not drop ALL")
        check((csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault",
              "seccompProfile is not RuntimeDefault")
        check(self.resources.get("requests") and self.resources.get("limits"), "resources need requests and limits")

    def environment(self):
        """Exactly the expected PACKET_INGEST_* variables, with the values' values."""
        check, values, env = self.check, self.values, self.env
        expected = {env_name(f) for f in self.flags if f not in CONDITIONAL_FLAGS}
        if values["auth"]["enabled"]:
            expected.add(env_name("auth-token-file"))
        if values["hmac"]["enabled"]:
            expected.add(env_name("hmac-key-file"))
        if values["tls"]["enabled"]:
            expected |= {env_name("tls-cert"), env_name("tls-key")}
            if values["tls"]["clientCA"]["enabled"]:
                expected.add(env_name("tls-client-ca"))
        if self.cluster:
            expected |= {env_name("cluster-nats"), env_name("cluster-stream")}
            expected |= {env_name(f) for f in CLUSTER_FLAGS}
        if self.persistent:
            expected |= {env_name(f) for f in PERSISTENCE_FLAGS}
        if values["config"].get("corsOrigins"):
            expected.add(env_name("cors-origin"))
        if values["config"].get("compression"):
            expected.add(env_name("compression"))
        if values["config"].get("otlpEndpoint"):
            expected.add(env_name("otlp-endpoint"))
        got = self.env_set()
        check(got == expected, "PACKET_INGEST_* variables: missing %s, unexpected %s" % (sorted(expected - got), sorted(got - expected)))

        for k, v in values["config"].items():
            name = "RUST_LOG" if k == "logLevel" else "PACKET_INGEST_" + snake(k)
            if k in PERSISTENCE_CONFIG and not self.persistent:
                check(name not in env, "config.%s gives %s in memory mode (no --data-dir)" % (k, name))
                continue
            if k == "otlpEndpoint":
                # Empty: no tracing, and the variable is left out.
                name = env_name("otlp-endpoint")
                check(env.get(name) == (v or None), "config.otlpEndpoint=%r should give %s=%r, got %r" % (v, name, v or None, env.get(name)))
                continue
            if k in ("corsOrigins", "compression"):
                # A list, comma-joined; none: the variable is left out.
                name = env_name("cors-origin" if k == "corsOrigins" else "compression")
                want = ",".join(v) if v else None
                check(env.get(name) == want, "config.%s=%r should give %s=%r, got %r" % (k, v, name, want, env.get(name)))
                continue
            want = ("true" if v else "false") if isinstance(v, bool) else str(v)
            if k == "slowSubscriber" and not v:
                # Empty: the binary's default for the mode, written out.
                want = "catch-up" if self.persistent else "gap"
            check(env.get(name) == want, "config.%s=%r should give %s=%r, got %r" % (k, v, name, want, env.get(name)))
        if env.get(env_name("slow-subscriber")) == "catch-up":
            check(self.persistent, "--slow-subscriber catch-up without persistence: the binary refuses it without --data-dir")
        check(env.get(env_name("require-hmac")) == ("true" if values["hmac"]["required"] else "false"), "hmac.required not passed")
        host = values["listenHost"]
        for flag, key in (("grpc-addr", "grpc"), ("ingest-addr", "ingest"), ("metrics-addr", "metrics")):
            h = "[%s]" % host if ":" in host else host
            check(env.get(env_name(flag)) == "%s:%d" % (h, values["containerPorts"][key]),
                  "%s is %r" % (env_name(flag), env.get(env_name(flag))))
        if self.cluster:
            nats = values["clusterNats"]
            url = env.get(env_name("cluster-nats"))
            if nats.get("existingSecret"):
                ref = url.get("secretKeyRef") if isinstance(url, dict) else None
                check(ref == {"name": nats["existingSecret"], "key": nats["existingSecretKey"]}, "cluster NATS secretKeyRef is %r" % (ref,))
            else:
                check(url == nats["url"], "cluster NATS url is %r, expected %r" % (url, nats["url"]))
            stream = env.get(env_name("cluster-stream"))
            check(stream == nats["stream"], "cluster stream is %r, expected %r" % (stream, nats["stream"]))
            for flag, key in CLUSTER_KEYS.items():
                got = env.get(env_name(flag))
                check(got == str(nats[key]), "%s is %r, expected %r" % (env_name(flag), got, nats[key]))

    def secret_files(self):
        """Files behind the *_FILE / TLS variables are mounted from the right Secret keys."""
        check, values, env, fullname = self.check, self.values, self.env, self.fullname
        mounts = {m["mountPath"].rstrip("/"): m for m in self.ctr.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        check("/tmp" in mounts and "emptyDir" in volumes.get(mounts["/tmp"]["name"], {}), "/tmp is not a writable emptyDir")
        secrets = {s["metadata"]["name"]: s for s in self.kinds("Secret")}

        def source_of(path):
            for mp, m in mounts.items():
                if path.startswith(mp + "/"):
                    rel = path[len(mp) + 1:]
                    for src in volumes.get(m["name"], {}).get("projected", {}).get("sources", []):
                        for item in src.get("secret", {}).get("items", []):
                            if item["path"] == rel:
                                return src["secret"]["name"], item["key"]
            return None

        def check_file(flag, want_secret, want_key):
            path = env.get(env_name(flag))
            src = source_of(path) if isinstance(path, str) else None
            if check(src is not None, "%s=%r is not a file mounted from a Secret" % (env_name(flag), path)):
                check(src == (want_secret, want_key), "%s comes from %r, expected %r" % (env_name(flag), src, (want_secret, want_key)))
                if src[0] in secrets:
                    check(want_key in secrets[src[0]].get("data", {}), "chart Secret %s lacks key %s" % src)
                else:
                    check(src[0] == want_secret and want_secret != fullname,
                          "Secret %s is neither rendered nor an existingSecret" % src[0])

        for flag, section, own_key in (("auth-token-file", "auth", "auth-tokens"), ("hmac-key-file", "hmac", "hmac-key")):
            v = values[section]
            if v["enabled"]:
                check_file(flag, v["existingSecret"] or fullname, v["existingSecretKey"] if v["existingSecret"] else own_key)
        tls = values["tls"]
        if tls["enabled"]:
            check_file("tls-cert", tls["existingSecret"] or fullname, "tls.crt")
            check_file("tls-key", tls["existingSecret"] or fullname, "tls.key")
            ca = tls["clientCA"]
            if ca["enabled"]:
                check_file("tls-client-ca", ca["existingSecret"] or fullname,
                           ca["existingSecretKey"] if ca["existingSecret"] else "client-ca.crt")
        annotations = self.pod["metadata"].get("annotations") or {}
        check(("checksum/secret" in annotations) == (fullname in secrets), "checksum/secret annotation present iff the chart makes a Secret")

    def probes(self):
        """gRPC probes (readiness on the Packets service), or GET /healthz with TLS."""
        check = self.check
        mode = self.values["probes"]["mode"]
        if mode == "auto":
            mode = "http" if self.values["tls"]["enabled"] else "grpc"
        for name, service in (("livenessProbe", None), ("readinessProbe", "packetingest.v1.Packets"), ("startupProbe", None)):
            p = self.ctr.get(name)
            if not check(p is not None, "%s missing" % name):
                continue
            if mode == "grpc":
                g = p.get("grpc", {})
                check(g.get("port") == self.ports["grpc"], "%s gRPC port %r is not the gRPC container port" % (name, g.get("port")))
                check(g.get("service") == service, "%s gRPC service is %r, expected %r" % (name, g.get("service"), service))
            else:
                h = p.get("httpGet", {})
                check(h.get("path") == "/healthz" and h.get("port") in ("metrics", self.ports["metrics"]),
                      "%s is not GET /healthz on metrics" % name)

    def shutdown_and_memory(self):
        """The termination grace covers preStop sleep + shutdownGrace; the memory
        budget stays below the container limit."""
        check, env = self.check, self.env
        grace = millis(env[env_name("shutdown-grace")])
        sleep = ((self.ctr.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
        check(sleep == self.values["preStopSleepSeconds"], "preStop sleep is %r" % sleep)
        tgps = self.spec.get("terminationGracePeriodSeconds")
        check(isinstance(tgps, int) and tgps * 1000 > sleep * 1000 + grace,
              "terminationGracePeriodSeconds %r does not exceed preStop %ss + shutdownGrace %sms" % (tgps, sleep, grace))
        limit = quantity((self.resources.get("limits") or {}).get("memory", ""))
        if limit:
            check(int(env[env_name("memory-limit")]) < limit, "--memory-limit is not below the memory limit")

    def service(self):
        check, values = self.check, self.values
        services = self.kinds("Service")
        main = [s for s in services if s["metadata"]["name"] == self.fullname]
        others = [s["metadata"]["name"] for s in services if s["metadata"]["name"] != self.fullname]
        check(len(main) == 1, "expected one Service named %s, got %d" % (self.fullname, len(main)))
        check(len(others) == (1 if self.persistent else 0),
              "other Services %r: expected %s" % (others, "the StatefulSet's headless Service" if self.persistent else "none"))
        svc = self.svc = main[0] if main else services[0]
        check(subset(svc["spec"]["selector"], self.pod["metadata"]["labels"]) and svc["spec"]["selector"],
              "Service selector does not match the pods")
        sports = self.service_ports = {p["name"]: p for p in svc["spec"]["ports"]}
        check(set(sports) == {"grpc", "ingest", "metrics"}, "Service ports are %s" % sorted(sports))
        check(sports.get("grpc", {}).get("appProtocol") == "grpc", "gRPC Service port lacks appProtocol: grpc")
        for name, p in sports.items():
            check(p.get("targetPort") in self.ports or p.get("targetPort") in self.ports.values(),
                  "Service port %s targets %r" % (name, p.get("targetPort")))
            check(p.get("protocol") == "TCP", "Service port %s is not TCP" % name)
            check(p["port"] == values["service"]["ports"][name], "Service port %s is not service.ports.%s" % (name, name))
        if values["serviceAccount"]["create"]:
            sas = [s["metadata"]["name"] for s in self.kinds("ServiceAccount")]
            check(self.spec.get("serviceAccountName") in sas, "serviceAccountName does not name the rendered ServiceAccount")

    def persistence(self):
        """With persistence: a StatefulSet whose one pod mounts a writable
        volume (claim template or existing claim) at PACKET_INGEST_DATA_DIR,
        governed by a headless Service, rolled in place; nothing of it in
        memory mode."""
        check, dep = self.check, self.dep
        p = self.values.get("persistence") or {}
        mounts = {m["name"]: m for m in self.ctr.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        templates = dep["spec"].get("volumeClaimTemplates") or []
        if not self.persistent:
            check("data" not in mounts and "data" not in volumes and not templates,
                  "a data volume in memory mode")
            return
        spec = dep["spec"]
        # The volume, writable by the non-root user, where the binary keeps its log.
        mount = mounts.get("data")
        if check(mount is not None, "no data volume mounted"):
            check(mount["mountPath"] == p["mountPath"], "data volume mounted at %r, not persistence.mountPath %r"
                  % (mount["mountPath"], p["mountPath"]))
            check(not mount.get("readOnly"), "data volume mounted read-only")
            check(self.env.get(env_name("data-dir")) == mount["mountPath"],
                  "%s=%r is not the data volume's mount path %r" % (env_name("data-dir"), self.env.get(env_name("data-dir")),
                                                                    mount["mountPath"]))
        psc = self.spec.get("securityContext") or {}
        check(psc.get("fsGroup") is not None, "no fsGroup: the non-root user may not write to the volume")
        if p.get("existingClaim"):
            check(not templates, "volumeClaimTemplates with persistence.existingClaim")
            claim = (volumes.get("data") or {}).get("persistentVolumeClaim") or {}
            check(claim.get("claimName") == p["existingClaim"], "data volume claims %r, not persistence.existingClaim %r"
                  % (claim.get("claimName"), p["existingClaim"]))
        else:
            check("data" not in volumes, "a pod volume named data shadows the claim template")
            names = [t["metadata"]["name"] for t in templates]
            if check(names == ["data"], "volumeClaimTemplates are %r, expected [data]" % names):
                t = templates[0]
                ts = t["spec"]
                check(ts.get("accessModes") == p["accessModes"], "claim accessModes %r, expected %r" % (ts.get("accessModes"), p["accessModes"]))
                check(set(ts.get("accessModes") or []) & {"ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany"},
                      "claim accessModes %r allow no writes" % ts.get("accessModes"))
                check(str(ts["resources"]["requests"]["storage"]) == str(p["size"]),
                      "claim requests %r, expected persistence.size %r" % (ts["resources"]["requests"]["storage"], p["size"]))
                sc = {"": None, "-": ""}.get(p["storageClassName"], p["storageClassName"])
                check(ts.get("storageClassName") == sc, "claim storageClassName %r, expected %r" % (ts.get("storageClassName"), sc))
                check((t["metadata"].get("annotations") or {}) == (p.get("annotations") or {}), "claim annotations are not persistence.annotations")
                labels = t["metadata"].get("labels") or {}
                check(not any(k in labels for k in VERSIONED_LABELS),
                      "claim template labels %r carry a version: the next chart version could not be upgraded to" % sorted(labels))
        # Rolled in place, one pod at a time, and the headless Service it needs.
        check(spec.get("podManagementPolicy") == "OrderedReady", "podManagementPolicy is %r, expected OrderedReady"
              % spec.get("podManagementPolicy"))
        check((spec.get("updateStrategy") or {}).get("type") == "RollingUpdate", "updateStrategy is %r" % spec.get("updateStrategy"))
        check("strategy" not in spec, "a StatefulSet has no strategy (that is the Deployment's)")
        governing = [s for s in self.kinds("Service") if s["metadata"]["name"] == spec.get("serviceName")]
        if check(len(governing) == 1, "serviceName %r names no rendered Service" % spec.get("serviceName")):
            hs = governing[0]["spec"]
            check(hs.get("clusterIP") == "None", "the StatefulSet's Service %r is not headless" % spec.get("serviceName"))
            check(subset(hs.get("selector"), self.pod["metadata"]["labels"]) and hs.get("selector"),
                  "headless Service selector does not match the pods")
            check("metrics" not in {port["name"] for port in hs.get("ports", [])},
                  "headless Service has a metrics port: a ServiceMonitor would scrape the pod twice")

    def replicas(self):
        """More than one replica (or an autoscaler) only in cluster mode."""
        check, dep, res = self.check, self.dep, self.resources
        autoscaling = self.values["autoscaling"]
        hpas = self.kinds("HorizontalPodAutoscaler")
        check(len(hpas) == (1 if autoscaling["enabled"] else 0), "HorizontalPodAutoscaler count is %d" % len(hpas))
        if autoscaling["enabled"]:
            check("replicas" not in dep["spec"], "%s sets replicas while an HPA owns them" % self.kind)
            self.fewest = autoscaling["minReplicas"]
        else:
            check(dep["spec"].get("replicas") == self.values["replicaCount"],
                  "%s replicas %r is not replicaCount %r" % (self.kind, dep["spec"].get("replicas"), self.values["replicaCount"]))
            self.fewest = self.values["replicaCount"]
        if not self.cluster:
            check(not hpas, "a HorizontalPodAutoscaler without cluster NATS: replicas would not share packets")
            check(dep["spec"].get("replicas") in (0, 1),
                  "%s runs %r replicas without cluster NATS: replicas would not share packets" % (self.kind, dep["spec"].get("replicas")))
        if self.persistent:
            check(not self.cluster, "persistence with cluster NATS: the binary refuses --data-dir with --cluster-nats")
            check(not hpas, "a HorizontalPodAutoscaler with persistence: each replica would keep its own log")
            check(dep["spec"].get("replicas") in (0, 1),
                  "StatefulSet runs %r replicas: each would keep its own log and stream" % dep["spec"].get("replicas"))
        for hpa in hpas:
            spec = hpa["spec"]
            check(hpa["apiVersion"] == "autoscaling/v2", "HPA is not autoscaling/v2")
            check(hpa["metadata"].get("namespace") == dep["metadata"].get("namespace"), "HPA is not in the workload's namespace")
            ref = spec["scaleTargetRef"]
            check(ref == {"apiVersion": "apps/v1", "kind": self.kind, "name": self.fullname}, "HPA targets %r" % ref)
            check(spec["minReplicas"] == autoscaling["minReplicas"] and spec["maxReplicas"] == autoscaling["maxReplicas"],
                  "HPA replicas %r..%r, expected %r..%r" % (spec["minReplicas"], spec["maxReplicas"],
                                                            autoscaling["minReplicas"], autoscaling["maxReplicas"]))
            check(1 <= spec["minReplicas"] <= spec["maxReplicas"], "HPA min > max")
            targets = {m["resource"]["name"]: m["resource"]["target"] for m in spec.get("metrics", []) if m.get("type") == "Resource"}
            want = {n: v for n, v in (("cpu", autoscaling.get("targetCPUUtilizationPercentage")),
                                      ("memory", autoscaling.get("targetMemoryUtilizationPercentage"))) if v}
            check(targets == {n: {"type": "Utilization", "averageUtilization": v} for n, v in want.items()},
                  "HPA metrics %r, expected %r" % (targets, want))
            for n in targets:
                check((res.get("requests") or {}).get(n) is not None,
                      "HPA scales on %s utilization but the container requests no %s" % (n, n))
            check(spec.get("behavior", {}) == (autoscaling.get("behavior") or {}), "HPA behavior is not autoscaling.behavior")

    def disruption_budget(self):
        """The PDB selects the pods and lets at least one be evicted at the fewest replicas."""
        check = self.check
        pdbs = self.kinds("PodDisruptionBudget")
        check(len(pdbs) == (1 if self.values["podDisruptionBudget"]["enabled"] else 0), "PodDisruptionBudget count")
        for pdb in pdbs:
            spec, fewest = pdb["spec"], self.fewest
            check(subset(spec["selector"]["matchLabels"], self.pod["metadata"]["labels"]), "PDB selector does not match the pods")
            check(("minAvailable" in spec) != ("maxUnavailable" in spec), "PDB needs exactly one of minAvailable/maxUnavailable")
            if fewest > 0:
                if "minAvailable" in spec:
                    allowed = fewest - scaled(spec["minAvailable"], fewest)
                else:
                    allowed = min(fewest, scaled(spec["maxUnavailable"], fewest))
                check(allowed >= 1, "PDB %r allows no eviction with %d replica(s): node drains would hang" % (spec, fewest))

    def service_monitors(self):
        """Selection only; the schema is checked against the CRD by node."""
        check, svc = self.check, self.svc
        sms = self.kinds("ServiceMonitor")
        check(len(sms) == (1 if self.values["serviceMonitor"]["enabled"] else 0), "ServiceMonitor count")
        for sm in sms:
            check(sm["apiVersion"] == "monitoring.coreos.com/v1", "ServiceMonitor apiVersion")
            check(subset(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"]), "ServiceMonitor does not select the Service")
            for ep in sm["spec"]["endpoints"]:
                check(ep.get("port") in self.service_ports, "ServiceMonitor endpoint port %r is not a Service port" % ep.get("port"))
            if sm["metadata"].get("namespace") != svc["metadata"].get("namespace"):
                check(svc["metadata"].get("namespace") in sm["spec"].get("namespaceSelector", {}).get("matchNames", []),
                      "ServiceMonitor in another namespace does not select the Service's namespace")

    def test_pod(self):
        """The `helm test` pod checks health through the Service, locked down."""
        check = self.check
        tests = [d for d in self.kinds("Pod")
                 if "test" in str((d["metadata"].get("annotations") or {}).get("helm.sh/hook", "")).split(",")]
        check(len(tests) == (1 if self.values["tests"]["enabled"] else 0), "helm test pod count is %d" % len(tests))
        for t in tests:
            c = t["spec"]["containers"][0]
            args = c.get("args", [])
            want = "%s:%d" % (self.svc["metadata"]["name"], self.service_ports["grpc"]["port"])
            check(c["image"] == self.ctr["image"], "test pod uses another image")
            check(args[:3] == ["health", "--addr", want], "test pod args %r, expected health --addr %s" % (args, want))
            check(t["spec"].get("restartPolicy") == "Never", "test pod restartPolicy is not Never")
            check((c.get("securityContext") or {}).get("readOnlyRootFilesystem") is True, "test pod is not locked down")
