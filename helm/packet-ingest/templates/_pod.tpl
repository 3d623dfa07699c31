{{/*
The pod template of the Deployment (memory mode) and of the StatefulSet
(persistence.enabled). Usage: include "packet-ingest.podTemplate" .
*/}}
{{- define "packet-ingest.podTemplate" -}}
{{- $secretsDir := include "packet-ingest.secretsDir" . }}
{{- $natsEnabled := include "packet-ingest.clusterNatsEnabled" . }}
{{- $persistence := .Values.persistence }}
{{- $c := .Values.config -}}
metadata:
  {{- if or (include "packet-ingest.createSecret" .) .Values.podAnnotations }}
  annotations:
    {{- if include "packet-ingest.createSecret" . }}
    # Roll the pods when the chart-managed Secret changes.
    checksum/secret: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
    {{- end }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  labels:
    {{- include "packet-ingest.labels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "packet-ingest.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automount }}
  # Service links would inject PACKET_INGEST_SERVICE_HOST, PACKET_INGEST_PORT, ...
  # into the service's own PACKET_INGEST_* configuration namespace.
  enableServiceLinks: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- $psc := deepCopy (.Values.podSecurityContext | default dict) }}
    {{- if and $persistence.enabled (kindIs "invalid" $psc.fsGroup) }}
    {{- /* The volume must be writable by the non-root user. */}}
    {{- $_ := set $psc "fsGroup" ($psc.runAsGroup | default 65532) }}
    {{- end }}
    {{- toYaml $psc | nindent 4 }}
  terminationGracePeriodSeconds: {{ include "packet-ingest.terminationGracePeriodSeconds" . }}
  containers:
    - name: packet-ingest
      image: {{ include "packet-ingest.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      ports:
        - name: grpc
          containerPort: {{ .Values.containerPorts.grpc }}
          protocol: TCP
        - name: ingest
          containerPort: {{ .Values.containerPorts.ingest }}
          protocol: TCP
        - name: metrics
          containerPort: {{ .Values.containerPorts.metrics }}
          protocol: TCP
      env:
        - name: PACKET_INGEST_GRPC_ADDR
          value: {{ include "packet-ingest.addr" (list .Values.listenHost .Values.containerPorts.grpc) | quote }}
        - name: PACKET_INGEST_INGEST_ADDR
          value: {{ include "packet-ingest.addr" (list .Values.listenHost .Values.containerPorts.ingest) | quote }}
        - name: PACKET_INGEST_METRICS_ADDR
          value: {{ include "packet-ingest.addr" (list .Values.listenHost .Values.containerPorts.metrics) | quote }}
        - name: PACKET_INGEST_MAX_PAYLOAD
          value: {{ $c.maxPayload | int64 | quote }}
        - name: PACKET_INGEST_MAX_CONNECTIONS
          value: {{ $c.maxConnections | int64 | quote }}
        - name: PACKET_INGEST_INGEST_IDLE_TIMEOUT
          value: {{ $c.ingestIdleTimeout | quote }}
        - name: PACKET_INGEST_FRAME_TIMEOUT
          value: {{ $c.frameTimeout | quote }}
        - name: PACKET_INGEST_INGEST_MEMORY_LIMIT
          value: {{ $c.ingestMemoryLimit | int64 | quote }}
        - name: PACKET_INGEST_MAX_GRPC_CONNECTIONS
          value: {{ $c.maxGrpcConnections | int64 | quote }}
        - name: PACKET_INGEST_GRPC_HANDSHAKE_TIMEOUT
          value: {{ $c.grpcHandshakeTimeout | quote }}
        - name: PACKET_INGEST_MAX_STREAMS_PER_CONNECTION
          value: {{ $c.maxStreamsPerConnection | int64 | quote }}
        - name: PACKET_INGEST_MAX_SUBSCRIBERS
          value: {{ $c.maxSubscribers | int64 | quote }}
        - name: PACKET_INGEST_MAX_PUBLISHERS
          value: {{ $c.maxPublishers | int64 | quote }}
        - name: PACKET_INGEST_PUBLISH_IDLE_TIMEOUT
          value: {{ $c.publishIdleTimeout | quote }}
        - name: PACKET_INGEST_MAX_FILTER_CHANNELS
          value: {{ $c.maxFilterChannels | int64 | quote }}
        {{- with $c.corsOrigins }}
        - name: PACKET_INGEST_CORS_ORIGIN
          value: {{ join "," . | quote }}
        {{- end }}
        {{- with $c.compression }}
        - name: PACKET_INGEST_COMPRESSION
          value: {{ join "," . | quote }}
        {{- end }}
        {{- with $c.otlpEndpoint }}
        - name: PACKET_INGEST_OTLP_ENDPOINT
          value: {{ . | quote }}
        {{- end }}
        - name: PACKET_INGEST_SUBSCRIBER_BUFFER
          value: {{ $c.subscriberBuffer | int64 | quote }}
        - name: PACKET_INGEST_HISTORY
          value: {{ $c.history | int64 | quote }}
        - name: PACKET_INGEST_MEMORY_LIMIT
          value: {{ $c.memoryLimit | int64 | quote }}
        - name: PACKET_INGEST_SLOW_SUBSCRIBER
          value: {{ include "packet-ingest.slowSubscriber" . | quote }}
        - name: PACKET_INGEST_BLOCK_TIMEOUT
          value: {{ $c.blockTimeout | quote }}
        - name: PACKET_INGEST_HEARTBEAT
          value: {{ $c.heartbeat | quote }}
        - name: PACKET_INGEST_SHUTDOWN_GRACE
          value: {{ $c.shutdownGrace | quote }}
        - name: PACKET_INGEST_LOG_FORMAT
          value: {{ $c.logFormat | quote }}
        - name: RUST_LOG
          value: {{ $c.logLevel | quote }}
        - name: PACKET_INGEST_VERIFY_THREADS
          value: {{ $c.verifyThreads | int64 | quote }}
        - name: PACKET_INGEST_CONCURRENCY_LIMIT
          value: {{ $c.concurrencyLimit | int64 | quote }}
        - name: PACKET_INGEST_REQUEST_TIMEOUT
          value: {{ $c.requestTimeout | quote }}
        - name: PACKET_INGEST_LOAD_SHED
          value: {{ $c.loadShed | toString | quote }}
        - name: PACKET_INGEST_HTTP2_KEEPALIVE_INTERVAL
          value: {{ $c.http2KeepaliveInterval | quote }}
        - name: PACKET_INGEST_HTTP2_KEEPALIVE_TIMEOUT
          value: {{ $c.http2KeepaliveTimeout | quote }}
        - name: PACKET_INGEST_REQUIRE_HMAC
          value: {{ .Values.hmac.required | toString | quote }}
        {{- if $persistence.enabled }}
        - name: PACKET_INGEST_DATA_DIR
          value: {{ $persistence.mountPath | quote }}
        - name: PACKET_INGEST_RETENTION_BYTES
          value: {{ $c.retentionBytes | int64 | quote }}
        - name: PACKET_INGEST_RETENTION_AGE
          value: {{ $c.retentionAge | quote }}
        - name: PACKET_INGEST_FSYNC
          value: {{ $c.fsync | quote }}
        - name: PACKET_INGEST_FSYNC_INTERVAL
          value: {{ $c.fsyncInterval | quote }}
        - name: PACKET_INGEST_LOG_IO
          value: {{ $c.logIo | quote }}
        - name: PACKET_INGEST_SEGMENT_BYTES
          value: {{ $c.segmentBytes | int64 | quote }}
        {{- end }}
        {{- if .Values.auth.enabled }}
        - name: PACKET_INGEST_AUTH_TOKEN_FILE
          value: {{ printf "%s/auth/tokens" $secretsDir | quote }}
        {{- end }}
        {{- if .Values.hmac.enabled }}
        - name: PACKET_INGEST_HMAC_KEY_FILE
          value: {{ printf "%s/hmac/key" $secretsDir | quote }}
        {{- end }}
        {{- if .Values.tls.enabled }}
        - name: PACKET_INGEST_TLS_CERT
          value: {{ printf "%s/tls/tls.crt" $secretsDir | quote }}
        - name: PACKET_INGEST_TLS_KEY
          value: {{ printf "%s/tls/tls.key" $secretsDir | quote }}
        {{- if .Values.tls.clientCA.enabled }}
        - name: PACKET_INGEST_TLS_CLIENT_CA
          value: {{ printf "%s/tls/client-ca.crt" $secretsDir | quote }}
        {{- end }}
        {{- end }}
        {{- if $natsEnabled }}
        - name: PACKET_INGEST_CLUSTER_NATS
          {{- if .Values.clusterNats.existingSecret }}
          valueFrom:
            secretKeyRef:
              name: {{ .Values.clusterNats.existingSecret }}
              key: {{ .Values.clusterNats.existingSecretKey }}
          {{- else }}
          value: {{ .Values.clusterNats.url | quote }}
          {{- end }}
        - name: PACKET_INGEST_CLUSTER_STREAM
          value: {{ .Values.clusterNats.stream | quote }}
        - name: PACKET_INGEST_CLUSTER_MAX_AGE
          value: {{ .Values.clusterNats.maxAge | quote }}
        - name: PACKET_INGEST_CLUSTER_MAX_BYTES
          value: {{ .Values.clusterNats.maxBytes | quote }}
        - name: PACKET_INGEST_CLUSTER_MAX_LAG
          value: {{ .Values.clusterNats.maxLag | toString | quote }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if .Values.probes.startup.enabled }}
      startupProbe:
        {{- include "packet-ingest.probe" (list $ .Values.probes.startup "") | trim | nindent 8 }}
      {{- end }}
      {{- if .Values.probes.liveness.enabled }}
      livenessProbe:
        {{- include "packet-ingest.probe" (list $ .Values.probes.liveness "") | trim | nindent 8 }}
      {{- end }}
      {{- if .Values.probes.readiness.enabled }}
      readinessProbe:
        {{- include "packet-ingest.probe" (list $ .Values.probes.readiness "packetingest.v1.Packets") | trim | nindent 8 }}
      {{- end }}
      {{- if gt (.Values.preStopSleepSeconds | int) 0 }}
      lifecycle:
        preStop:
          sleep:
            seconds: {{ .Values.preStopSleepSeconds }}
      {{- end }}
      {{- with .Values.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        {{- if $persistence.enabled }}
        - name: data
          mountPath: {{ $persistence.mountPath }}
        {{- end }}
        {{- if or .Values.auth.enabled .Values.hmac.enabled .Values.tls.enabled }}
        - name: secrets
          mountPath: {{ $secretsDir }}
          readOnly: true
        {{- end }}
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        {{- with .Values.tmpDir.medium }}
        medium: {{ . }}
        {{- end }}
        {{- with .Values.tmpDir.sizeLimit }}
        sizeLimit: {{ . }}
        {{- end }}
    {{- if and $persistence.enabled $persistence.existingClaim }}
    - name: data
      persistentVolumeClaim:
        claimName: {{ $persistence.existingClaim }}
    {{- end }}
    {{- if or .Values.auth.enabled .Values.hmac.enabled .Values.tls.enabled }}
    - name: secrets
      projected:
        defaultMode: 288 # 0440: owner and fsGroup may read
        sources:
          {{- if .Values.auth.enabled }}
          - secret:
              name: {{ .Values.auth.existingSecret | default (include "packet-ingest.secretName" .) }}
              items:
                - key: {{ ternary .Values.auth.existingSecretKey "auth-tokens" (ne .Values.auth.existingSecret "") }}
                  path: auth/tokens
          {{- end }}
          {{- if .Values.hmac.enabled }}
          - secret:
              name: {{ .Values.hmac.existingSecret | default (include "packet-ingest.secretName" .) }}
              items:
                - key: {{ ternary .Values.hmac.existingSecretKey "hmac-key" (ne .Values.hmac.existingSecret "") }}
                  path: hmac/key
          {{- end }}
          {{- if .Values.tls.enabled }}
          - secret:
              name: {{ .Values.tls.existingSecret | default (include "packet-ingest.secretName" .) }}
              items:
                - key: tls.crt
                  path: tls/tls.crt
                - key: tls.key
                  path: tls/tls.key
          {{- if .Values.tls.clientCA.enabled }}
          - secret:
              name: {{ .Values.tls.clientCA.existingSecret | default (include "packet-ingest.secretName" .) }}
              items:
                - key: {{ ternary .Values.tls.clientCA.existingSecretKey "client-ca.crt" (ne .Values.tls.clientCA.existingSecret "") }}
                  path: tls/client-ca.crt
          {{- end }}
          {{- end }}
    {{- end }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- range . }}
    {{- $tsc := deepCopy . }}
    {{- if not $tsc.labelSelector }}
    {{- $_ := set $tsc "labelSelector" (dict "matchLabels" (include "packet-ingest.selectorLabels" $ | fromYaml)) }}
    {{- end }}
    {{- toYaml (list $tsc) | nindent 4 }}
    {{- end }}
  {{- end }}
{{- end }}
