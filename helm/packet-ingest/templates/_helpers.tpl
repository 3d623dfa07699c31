{{/*
Chart name, truncated to the 63 characters a DNS label allows.
*/}}
{{- define "packet-ingest.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: release-chart, or just the release name when it
already contains the chart name.
*/}}
{{- define "packet-ingest.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "packet-ingest.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "packet-ingest.labels" -}}
helm.sh/chart: {{ include "packet-ingest.chart" . }}
{{ include "packet-ingest.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: packet-ingest
{{- end }}

{{- define "packet-ingest.selectorLabels" -}}
app.kubernetes.io/name: {{ include "packet-ingest.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "packet-ingest.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "packet-ingest.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "packet-ingest.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
host:port for a listen address; IPv6 hosts get brackets.
Usage: include "packet-ingest.addr" (list .Values.listenHost .Values.containerPorts.grpc)
*/}}
{{- define "packet-ingest.addr" -}}
{{- $host := index . 0 | toString }}
{{- $port := index . 1 | int }}
{{- if contains ":" $host }}
{{- printf "[%s]:%d" $host $port }}
{{- else }}
{{- printf "%s:%d" $host $port }}
{{- end }}
{{- end }}

{{/*
Milliseconds in a duration such as "10s", "500ms" or "1m30s" (units ms, s,
m, h; the humantime subset values.schema.json allows). Fails on anything
else, so a bad value is caught even with --skip-schema-validation.
Usage: include "packet-ingest.durationMillis" (list "config.shutdownGrace" .Values.config.shutdownGrace)
*/}}
{{- define "packet-ingest.durationMillis" -}}
{{- $what := index . 0 }}
{{- $d := index . 1 | toString | trim }}
{{- if not (regexMatch "^([0-9]+(ms|s|m|h))+$" $d) }}
{{- fail (printf "%s: %q is not a duration like \"10s\", \"500ms\" or \"1m30s\"" $what $d) }}
{{- end }}
{{- $ms := 0 }}
{{- range regexFindAll "[0-9]+(ms|s|m|h)" $d -1 }}
{{- $n := regexFind "^[0-9]+" . | atoi }}
{{- $unit := regexReplaceAll "^[0-9]+" . "" }}
{{- if eq $unit "ms" }}{{ $ms = add $ms $n }}
{{- else if eq $unit "s" }}{{ $ms = add $ms (mul $n 1000) }}
{{- else if eq $unit "m" }}{{ $ms = add $ms (mul $n 60000) }}
{{- else if eq $unit "h" }}{{ $ms = add $ms (mul $n 3600000) }}
{{- end }}
{{- end }}
{{- $ms }}
{{- end }}

{{/*
Whole seconds the pod needs before SIGKILL: preStop sleep + shutdownGrace,
rounded up.
*/}}
{{- define "packet-ingest.drainSeconds" -}}
{{- $ms := include "packet-ingest.durationMillis" (list "config.shutdownGrace" .Values.config.shutdownGrace) | int }}
{{- add (.Values.preStopSleepSeconds | int) (div (add $ms 999) 1000) }}
{{- end }}

{{- define "packet-ingest.terminationGracePeriodSeconds" -}}
{{- $drain := include "packet-ingest.drainSeconds" . | int }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $drain (.Values.terminationGraceExtraSeconds | int) }}
{{- else }}
{{- $set := .Values.terminationGracePeriodSeconds | int }}
{{- if le $set $drain }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds + config.shutdownGrace (%ds), or the pod is killed before it has drained" $set $drain) }}
{{- end }}
{{- $set }}
{{- end }}
{{- end }}

{{/*
Bytes in a Kubernetes memory quantity (plain, k/M/G/T, Ki/Mi/Gi/Ti);
empty when the format is not one of those (the check is then skipped).
*/}}
{{- define "packet-ingest.quantityBytes" -}}
{{- $q := . | toString | trim }}
{{- $m := regexFind "^[0-9]+" $q }}
{{- $suffix := trimPrefix $m $q }}
{{- $mult := dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 }}
{{- if and $m (hasKey $mult $suffix) }}
{{- mul ($m | int64) (get $mult $suffix) }}
{{- end }}
{{- end }}

{{/* The chart-managed Secret: fullname. */}}
{{- define "packet-ingest.secretName" -}}
{{- include "packet-ingest.fullname" . }}
{{- end }}

{{/* "true" when the chart must create its own Secret. */}}
{{- define "packet-ingest.createSecret" -}}
{{- $v := .Values }}
{{- if or (and $v.auth.enabled (not $v.auth.existingSecret)) (and $v.hmac.enabled (not $v.hmac.existingSecret)) (and $v.tls.enabled (not $v.tls.existingSecret)) (and $v.tls.enabled $v.tls.clientCA.enabled (not $v.tls.clientCA.existingSecret)) }}true{{ end }}
{{- end }}

{{/* "true" when cluster mode (NATS JetStream) is configured. */}}
{{- define "packet-ingest.clusterNatsEnabled" -}}
{{- if or .Values.clusterNats.url .Values.clusterNats.existingSecret }}true{{ end }}
{{- end }}

{{/* The StatefulSet's governing (headless) Service, persistence only. */}}
{{- define "packet-ingest.headlessServiceName" -}}
{{- printf "%s-headless" (include "packet-ingest.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{/*
--slow-subscriber as the chart passes it: config.slowSubscriber, or when that
is empty the binary's own default for the mode, written out: catch-up with
persistence (the durable stream), gap without.
*/}}
{{- define "packet-ingest.slowSubscriber" -}}
{{- if .Values.config.slowSubscriber }}
{{- .Values.config.slowSubscriber }}
{{- else }}
{{- ternary "catch-up" "gap" (.Values.persistence.enabled | default false) }}
{{- end }}
{{- end }}

{{/*
The fewest replicas the Deployment runs: autoscaling.minReplicas with the
HPA, replicaCount otherwise.
*/}}
{{- define "packet-ingest.minReplicas" -}}
{{- if .Values.autoscaling.enabled }}
{{- .Values.autoscaling.minReplicas | int }}
{{- else }}
{{- .Values.replicaCount | int }}
{{- end }}
{{- end }}

{{/*
Pods the PodDisruptionBudget lets an eviction take down out of N replicas,
computed like the disruption controller (percentages round up).
Usage: include "packet-ingest.pdbAllowed" (list .Values.podDisruptionBudget N)
*/}}
{{- define "packet-ingest.pdbAllowed" -}}
{{- $pdb := index . 0 }}
{{- $n := index . 1 | int }}
{{- $bound := $pdb.maxUnavailable }}
{{- if not (kindIs "invalid" $pdb.minAvailable) }}
{{- $bound = $pdb.minAvailable }}
{{- end }}
{{- $b := $bound | toString | trim }}
{{- $count := 0 }}
{{- if regexMatch "^[0-9]+%$" $b }}
{{- $count = div (add (mul (trimSuffix "%" $b | int) $n) 99) 100 }}
{{- else }}
{{- $count = $b | int }}
{{- end }}
{{- if not (kindIs "invalid" $pdb.minAvailable) }}
{{- max 0 (sub $n $count) }}
{{- else }}
{{- min $n $count }}
{{- end }}
{{- end }}

{{/* Directory where secret files are mounted. */}}
{{- define "packet-ingest.secretsDir" -}}/etc/packet-ingest{{- end }}

{{/* "grpc" or "http": how the kubelet probes the pod. */}}
{{- define "packet-ingest.probeMode" -}}
{{- if eq .Values.probes.mode "auto" }}
{{- ternary "http" "grpc" .Values.tls.enabled }}
{{- else }}
{{- .Values.probes.mode }}
{{- end }}
{{- end }}

{{/*
One probe. Usage: include "packet-ingest.probe" (list $ .Values.probes.readiness "packetingest.v1.Packets")
*/}}
{{- define "packet-ingest.probe" -}}
{{- $root := index . 0 }}
{{- $p := index . 1 }}
{{- $service := index . 2 }}
{{- if eq (include "packet-ingest.probeMode" $root) "grpc" }}
grpc:
  port: {{ $root.Values.containerPorts.grpc }}
  {{- if $service }}
  service: {{ $service }}
  {{- end }}
{{- else }}
httpGet:
  path: /healthz
  port: metrics
{{- end }}
initialDelaySeconds: {{ $p.initialDelaySeconds }}
periodSeconds: {{ $p.periodSeconds }}
timeoutSeconds: {{ $p.timeoutSeconds }}
failureThreshold: {{ $p.failureThreshold }}
{{- if hasKey $p "successThreshold" }}
successThreshold: {{ $p.successThreshold }}
{{- end }}
{{- end }}

{{/*
Checks that the schema cannot express. Rendered (empty) by deployment.yaml,
whichever workload (Deployment or StatefulSet) is rendered.
*/}}
{{- define "packet-ingest.validate" -}}
{{- $v := .Values }}
{{- if and $v.auth.enabled (not $v.auth.existingSecret) (not $v.auth.tokens) }}
{{- fail "auth.enabled needs auth.tokens or auth.existingSecret" }}
{{- end }}
{{- if and $v.hmac.enabled (not $v.hmac.existingSecret) (not $v.hmac.key) }}
{{- fail "hmac.enabled needs hmac.key or hmac.existingSecret" }}
{{- end }}
{{- if and $v.hmac.required (not $v.hmac.enabled) }}
{{- fail "hmac.required needs hmac.enabled (a key to check HMAC frames with)" }}
{{- end }}
{{- if and $v.tls.enabled (not $v.tls.existingSecret) (not (and $v.tls.cert $v.tls.key)) }}
{{- fail "tls.enabled needs tls.cert and tls.key, or tls.existingSecret" }}
{{- end }}
{{- if and $v.tls.enabled (eq $v.probes.mode "grpc") }}
{{- fail "probes.mode grpc cannot be used with tls.enabled: the kubelet's gRPC probe speaks plaintext only (use auto or http)" }}
{{- end }}
{{- if and $v.tls.clientCA.enabled (not $v.tls.enabled) }}
{{- fail "tls.clientCA.enabled needs tls.enabled" }}
{{- end }}
{{- if and $v.tls.clientCA.enabled (not $v.tls.clientCA.existingSecret) (not $v.tls.clientCA.cert) }}
{{- fail "tls.clientCA.enabled needs tls.clientCA.cert or tls.clientCA.existingSecret" }}
{{- end }}
{{- $nats := $v.clusterNats }}
{{- if and $nats.url $nats.existingSecret }}
{{- fail "set clusterNats.url or clusterNats.existingSecret, not both" }}
{{- end }}
{{- if and $nats.url (not (regexMatch "^(nats|tls)://[^\\s]+$" (toString $nats.url))) }}
{{- fail (printf "clusterNats.url %q is not a nats:// or tls:// URL" (toString $nats.url)) }}
{{- end }}
{{- if not (regexMatch "^[^\\s.*>/\\\\]+$" (toString $nats.stream)) }}
{{- fail (printf "clusterNats.stream %q is not a JetStream stream name (non-empty, without whitespace, '.', '*', '>', '/' or '\\')" (toString $nats.stream)) }}
{{- end }}
{{- /* The durable stream: one pod owns the log; checked before the cluster
rules so that these refusals name persistence. */}}
{{- $p := $v.persistence }}
{{- if $p.enabled }}
{{- $oneLog := "with persistence each replica would keep its own log on its own volume, with its own sequence numbers, history and stream id (and the binary locks its directory, one process per log), so subscribers would see different streams" }}
{{- if include "packet-ingest.clusterNatsEnabled" . }}
{{- fail "persistence.enabled cannot be used with clusterNats: in cluster mode NATS JetStream keeps the stream, and packet-ingest refuses --data-dir with --cluster-nats. Use one or the other" }}
{{- end }}
{{- if gt ($v.replicaCount | int) 1 }}
{{- fail (printf "replicaCount %d cannot be used with persistence.enabled (use 0 or 1): %s" ($v.replicaCount | int) $oneLog) }}
{{- end }}
{{- if $v.autoscaling.enabled }}
{{- fail (printf "autoscaling.enabled cannot be used with persistence.enabled: %s" $oneLog) }}
{{- end }}
{{- if and (not $p.existingClaim) (not (has "ReadWriteOnce" $p.accessModes)) (not (has "ReadWriteOncePod" $p.accessModes)) (not (has "ReadWriteMany" $p.accessModes)) }}
{{- fail (printf "persistence.accessModes %v cannot be written to: include ReadWriteOnce (the default), ReadWriteOncePod or ReadWriteMany" $p.accessModes) }}
{{- end }}
{{- if not (regexMatch "^/[^\\s]*$" (toString $p.mountPath)) }}
{{- fail (printf "persistence.mountPath %q must be an absolute path" (toString $p.mountPath)) }}
{{- end }}
{{- if has (trimSuffix "/" (toString $p.mountPath)) (list "" "/tmp" (include "packet-ingest.secretsDir" .)) }}
{{- fail (printf "persistence.mountPath %q is taken (/, /tmp and %s are mounted by the chart)" (toString $p.mountPath) (include "packet-ingest.secretsDir" .)) }}
{{- end }}
{{- if gt (len (include "packet-ingest.fullname" .)) 52 }}
{{- fail (printf "with persistence.enabled the release's full name %q must be at most 52 characters: the StatefulSet controller labels its pods with the name plus an 11-character revision hash, 63 characters at most (set fullnameOverride)" (include "packet-ingest.fullname" .)) }}
{{- end }}
{{- $fsyncMs := include "packet-ingest.durationMillis" (list "config.fsyncInterval" $v.config.fsyncInterval) | int }}
{{- if le $fsyncMs 0 }}
{{- fail "config.fsyncInterval must be more than 0" }}
{{- end }}
{{- $_ := include "packet-ingest.durationMillis" (list "config.retentionAge" $v.config.retentionAge) }}
{{- if lt ($v.config.segmentBytes | int64) 1048576 }}
{{- fail "config.segmentBytes must be at least 1 MiB (1048576)" }}
{{- end }}
{{- $size := "" }}
{{- if not $p.existingClaim }}
{{- $size = include "packet-ingest.quantityBytes" $p.size }}
{{- end }}
{{- $retained := add ($v.config.retentionBytes | int64) ($v.config.segmentBytes | int64) }}
{{- if and $size (gt ($v.config.retentionBytes | int64) 0) (gt ($retained | int64) ($size | int64)) }}
{{- fail (printf "config.retentionBytes + config.segmentBytes (%d bytes) must fit in persistence.size (%s = %s bytes): retention deletes whole segments and never the one being written, so the log grows to about that much; a full volume stops ingest" ($retained | int64) (toString $p.size) $size) }}
{{- end }}
{{- else if eq (toString $v.config.slowSubscriber) "catch-up" }}
{{- fail "config.slowSubscriber catch-up needs persistence.enabled: a slow subscriber catches up by reading the log on the volume, and without --data-dir packet-ingest refuses catch-up. Use gap, disconnect or block, or leave it empty (gap in memory mode)" }}
{{- end }}
{{- /* Several replicas only make sense when they share one stream. */}}
{{- $noSharing := "without cluster mode each replica is its own hub with its own sequence numbers, history and subscribers, so a subscriber would see only the packets that reached its own replica. Set clusterNats.url (or clusterNats.existingSecret) to a NATS server with JetStream, e.g. `helm install nats nats/nats --set config.jetstream.enabled=true` and clusterNats.url=nats://nats:4222" }}
{{- if not (include "packet-ingest.clusterNatsEnabled" .) }}
{{- if gt ($v.replicaCount | int) 1 }}
{{- fail (printf "replicaCount %d needs clusterNats (use 0 or 1 without it): %s" ($v.replicaCount | int) $noSharing) }}
{{- end }}
{{- if $v.autoscaling.enabled }}
{{- fail (printf "autoscaling.enabled needs clusterNats: %s" $noSharing) }}
{{- end }}
{{- end }}
{{- if $v.autoscaling.enabled }}
{{- $as := $v.autoscaling }}
{{- if lt ($as.minReplicas | int) 1 }}
{{- fail "autoscaling.minReplicas must be at least 1" }}
{{- end }}
{{- if gt ($as.minReplicas | int) ($as.maxReplicas | int) }}
{{- fail (printf "autoscaling.minReplicas (%d) must not exceed autoscaling.maxReplicas (%d)" ($as.minReplicas | int) ($as.maxReplicas | int)) }}
{{- end }}
{{- if and (not $as.targetCPUUtilizationPercentage) (not $as.targetMemoryUtilizationPercentage) }}
{{- fail "autoscaling.enabled needs targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" }}
{{- end }}
{{- $requests := dict }}
{{- if and $v.resources $v.resources.requests }}
{{- $requests = $v.resources.requests }}
{{- end }}
{{- if and $as.targetCPUUtilizationPercentage (not $requests.cpu) }}
{{- fail "autoscaling.targetCPUUtilizationPercentage needs resources.requests.cpu (utilization is a percentage of the request)" }}
{{- end }}
{{- if and $as.targetMemoryUtilizationPercentage (not $requests.memory) }}
{{- fail "autoscaling.targetMemoryUtilizationPercentage needs resources.requests.memory (utilization is a percentage of the request)" }}
{{- end }}
{{- end }}
{{- if and $v.podDisruptionBudget.enabled (kindIs "invalid" $v.podDisruptionBudget.minAvailable) (kindIs "invalid" $v.podDisruptionBudget.maxUnavailable) }}
{{- fail "podDisruptionBudget.enabled needs minAvailable or maxUnavailable" }}
{{- end }}
{{- $fewest := include "packet-ingest.minReplicas" . | int }}
{{- if and $v.podDisruptionBudget.enabled (gt $fewest 0) }}
{{- $pdb := $v.podDisruptionBudget }}
{{- if le (include "packet-ingest.pdbAllowed" (list $pdb $fewest) | int) 0 }}
{{- $bound := ternary (printf "maxUnavailable %v" $pdb.maxUnavailable) (printf "minAvailable %v" $pdb.minAvailable) (kindIs "invalid" $pdb.minAvailable) }}
{{- fail (printf "podDisruptionBudget %s allows no eviction with %d replica(s) (%s): node drains would hang. Use maxUnavailable: 1 (the default), or a minAvailable below the replica count" $bound $fewest (ternary "autoscaling.minReplicas" "replicaCount" $v.autoscaling.enabled)) }}
{{- end }}
{{- end }}
{{- if and (gt ($v.preStopSleepSeconds | int) 0) (semverCompare "<1.30.0-0" .Capabilities.KubeVersion.Version) }}
{{- fail "preStopSleepSeconds needs Kubernetes >= 1.30 (the preStop sleep action)" }}
{{- end }}
{{- range $k := list "blockTimeout" "heartbeat" "requestTimeout" "http2KeepaliveInterval" "http2KeepaliveTimeout" "ingestIdleTimeout" "frameTimeout" "grpcHandshakeTimeout" "publishIdleTimeout" }}
{{- $_ := include "packet-ingest.durationMillis" (list (printf "config.%s" $k) (get $v.config $k)) }}
{{- end }}
{{- $_ := include "packet-ingest.terminationGracePeriodSeconds" . }}
{{- $limit := "" }}
{{- if and $v.resources $v.resources.limits $v.resources.limits.memory }}
{{- $limit = include "packet-ingest.quantityBytes" $v.resources.limits.memory }}
{{- end }}
{{- $budgets := add ($v.config.memoryLimit | int64) ($v.config.ingestMemoryLimit | int64) }}
{{- if and $limit (ge ($budgets | int64) ($limit | int64)) }}
{{- fail (printf "config.memoryLimit + config.ingestMemoryLimit (%d bytes) must be below resources.limits.memory (%s = %s bytes): the service needs room beyond the packets it holds, or the kernel kills it instead of it shedding load" ($budgets | int64) (toString $v.resources.limits.memory) $limit) }}
{{- end }}
{{- if lt ($v.config.ingestMemoryLimit | int64) (mul 2 (add ($v.config.maxPayload | int64) 65536)) }}
{{- fail "config.ingestMemoryLimit must hold two frames: at least 2 x (maxPayload + 65536) bytes" }}
{{- end }}
{{- end }}
