{{/*
Names. Kubernetes names are limited to 63 characters; suffixes ("-worker", "-migrate")
are added to the full name, so it is cut at 50.
*/}}
{{- define "session-orchestrator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 50 | trimSuffix "-" }}
{{- end }}

{{- define "session-orchestrator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "session-orchestrator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "session-orchestrator.labels" -}}
helm.sh/chart: {{ include "session-orchestrator.chart" . }}
{{ include "session-orchestrator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: session-orchestrator
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "session-orchestrator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "session-orchestrator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels of one component. Call with (dict "root" $ "component" "beat"); worker pools add
"pool" (the pool's name), which keeps the selectors of their Deployments apart.
*/}}
{{- define "session-orchestrator.componentLabels" -}}
{{ include "session-orchestrator.labels" .root }}
{{ include "session-orchestrator.componentOnlyLabels" . }}
{{- end }}

{{- define "session-orchestrator.componentSelectorLabels" -}}
{{ include "session-orchestrator.selectorLabels" .root }}
{{ include "session-orchestrator.componentOnlyLabels" . }}
{{- end }}

{{- define "session-orchestrator.componentOnlyLabels" -}}
app.kubernetes.io/component: {{ .component }}
{{- with .pool }}
session-orchestrator/worker-pool: {{ . }}
{{- end }}
{{- end }}

{{/* The image reference: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "session-orchestrator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "session-orchestrator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "session-orchestrator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
ORCHESTRATOR_BROKER_URL: secrets.brokerUrl, or secrets.brokerUrls as kombu's failover list.
*/}}
{{- define "session-orchestrator.brokerUrl" -}}
{{- if .Values.secrets.brokerUrls }}{{ join ";" .Values.secrets.brokerUrls }}{{ else }}{{ .Values.secrets.brokerUrl }}{{ end }}
{{- end }}

{{/*
The Secret the workloads read: existingSecret, or the one this chart makes. Fails with a
clear message when neither the values nor existingSecret are given, or when both are.
*/}}
{{- define "session-orchestrator.secretName" -}}
{{- $s := .Values.secrets }}
{{- if $s.existingSecret }}
{{- if or $s.databaseUrl $s.brokerUrl $s.brokerUrls $s.deepbrainAppId $s.deepbrainUserKey }}
{{- fail "secrets.existingSecret is set: leave secrets.databaseUrl, brokerUrl, brokerUrls, deepbrainAppId and deepbrainUserKey empty (they would be ignored)" }}
{{- end }}
{{- $s.existingSecret }}
{{- else }}
{{- $_ := required "secrets.databaseUrl is required (or set secrets.existingSecret)" $s.databaseUrl }}
{{- if and $s.brokerUrl $s.brokerUrls }}
{{- fail "secrets.brokerUrl and secrets.brokerUrls are both set: give the cluster's nodes in brokerUrls only" }}
{{- end }}
{{- $_ := required "secrets.brokerUrl (or brokerUrls) is required (or set secrets.existingSecret)" (include "session-orchestrator.brokerUrl" .) }}
{{- $_ := required "secrets.deepbrainAppId is required (or set secrets.existingSecret)" $s.deepbrainAppId }}
{{- $_ := required "secrets.deepbrainUserKey is required (or set secrets.existingSecret)" $s.deepbrainUserKey }}
{{- include "session-orchestrator.fullname" . }}
{{- end }}
{{- end }}

{{/* The simulator's in-cluster URL. */}}
{{- define "session-orchestrator.simulatorUrl" -}}
{{- printf "http://%s-simulator.%s.svc:%d" (include "session-orchestrator.fullname" .) .Release.Namespace (int .Values.simulator.service.port) }}
{{- end }}

{{/*
Non-secret settings as a YAML map of variable name to string. The ConfigMap renders it;
the migration hook Job, which runs before the ConfigMap exists, inlines it.
*/}}
{{- define "session-orchestrator.configData" -}}
{{- $c := .Values.config }}
{{- $o := .Values.otel }}
{{- $d := dict
  "ORCHESTRATOR_STATE_DIR" "/tmp"
  "ORCHESTRATOR_LOG_LEVEL" $c.logLevel
  "ORCHESTRATOR_LOG_FORMAT" $c.logFormat
  "ORCHESTRATOR_MAX_CONCURRENT_SESSIONS" (int $c.maxConcurrentSessions | toString)
  "ORCHESTRATOR_REAPER_INTERVAL_SECONDS" ($c.reaperIntervalSeconds | toString)
  "ORCHESTRATOR_RECONCILE_INTERVAL_SECONDS" ($c.reconcileIntervalSeconds | toString)
  "ORCHESTRATOR_ORPHAN_GRACE_SECONDS" ($c.orphanGraceSeconds | toString)
  "ORCHESTRATOR_START_TIMEOUT_SECONDS" ($c.startTimeoutSeconds | toString)
  "ORCHESTRATOR_VENDOR_TIMEOUT_SECONDS" ($c.vendorTimeoutSeconds | toString)
  "ORCHESTRATOR_MAX_SESSION_MINUTES" (int $c.maxSessionMinutes | toString)
  "ORCHESTRATOR_STOP_RETRY_SECONDS" ($c.stopRetrySeconds | toString)
  "ORCHESTRATOR_EARLY_STOP_RETENTION_SECONDS" ($c.earlyStopRetentionSeconds | toString)
  "ORCHESTRATOR_DB_POOL_SIZE" (int $c.dbPoolSize | toString)
  "ORCHESTRATOR_HEARTBEAT_MAX_AGE_SECONDS" ($c.heartbeatMaxAgeSeconds | toString)
  "ORCHESTRATOR_QUEUE_TYPE" $c.queueType
  "ORCHESTRATOR_DELIVERY_LIMIT" (int $c.deliveryLimit | toString)
  "ORCHESTRATOR_PUBLISH_TIMEOUT_SECONDS" ($c.publishTimeoutSeconds | toString)
  "OTEL_SERVICE_NAME" $o.serviceName
  "OTEL_EXPORTER_OTLP_PROTOCOL" $o.protocol
  "OTEL_SDK_DISABLED" ($o.sdkDisabled | toString)
}}
{{- with .Values.accounts.existingSecret }}
{{- $_ := set $d "ORCHESTRATOR_ACCOUNTS_DIR" $.Values.accounts.mountPath }}
{{- end }}
{{- range $name, $m := .Values.accounts.metadata }}
{{- $prefix := printf "ORCHESTRATOR_ACCOUNT_%s_" ($name | replace "-" "_" | upper) }}
{{- if hasKey $m "cap" }}
{{- $_ := set $d (print $prefix "CAP") (int $m.cap | toString) }}
{{- end }}
{{- if hasKey $m "weight" }}
{{- $_ := set $d (print $prefix "WEIGHT") ($m.weight | toString) }}
{{- end }}
{{- if $m.labels }}
{{- $pairs := list }}
{{- range $key := keys $m.labels | sortAlpha }}
{{- $pairs = append $pairs (printf "%s=%s" $key (index $m.labels $key)) }}
{{- end }}
{{- $_ := set $d (print $prefix "LABELS") (join "," $pairs) }}
{{- end }}
{{- end }}
{{- $baseUrl := $c.deepbrainBaseUrl }}
{{- if and (not $baseUrl) .Values.simulator.enabled }}
{{- $baseUrl = include "session-orchestrator.simulatorUrl" . }}
{{- end }}
{{- with $baseUrl }}
{{- $_ := set $d "ORCHESTRATOR_DEEPBRAIN_BASE_URL" . }}
{{- end }}
{{- with $o.endpoint }}
{{- $_ := set $d "OTEL_EXPORTER_OTLP_ENDPOINT" . }}
{{- end }}
{{- /* Exporters left empty are the application's default: otlp when an endpoint is set. */}}
{{- with $o.tracesExporter }}
{{- $_ := set $d "OTEL_TRACES_EXPORTER" . }}
{{- end }}
{{- $metrics := $o.metricsExporter }}
{{- $prom := .Values.metrics.prometheus }}
{{- if $prom.enabled }}
{{- $base := $metrics | default (ternary "otlp" "" (ne $o.endpoint "")) }}
{{- $metrics = ternary "prometheus" (printf "%s,prometheus" $base) (or (eq $base "") (eq $base "none")) }}
{{- $_ := set $d "OTEL_EXPORTER_PROMETHEUS_HOST" "0.0.0.0" }}
{{- $_ := set $d "OTEL_EXPORTER_PROMETHEUS_PORT" ($prom.port | toString) }}
{{- end }}
{{- with $metrics }}
{{- $_ := set $d "OTEL_METRICS_EXPORTER" . }}
{{- end }}
{{- with $o.resourceAttributes }}
{{- $_ := set $d "OTEL_RESOURCE_ATTRIBUTES" . }}
{{- end }}
{{- /* otel.extraEnv last: it may override the OTEL_* defaults above. */}}
{{- range $name, $value := $o.extraEnv }}
{{- $_ := set $d $name ($value | toString) }}
{{- end }}
{{- toYaml $d }}
{{- end }}

{{/*
Secret-backed variables. Call with (dict "root" $ "secretName" "..." "only" (list "databaseUrl")),
"only" optional (default: all four).
*/}}
{{- define "session-orchestrator.secretEnv" -}}
{{- $keys := .root.Values.secrets.keys }}
{{- $vars := dict "databaseUrl" "ORCHESTRATOR_DATABASE_URL" "brokerUrl" "ORCHESTRATOR_BROKER_URL" "deepbrainAppId" "ORCHESTRATOR_DEEPBRAIN_APP_ID" "deepbrainUserKey" "ORCHESTRATOR_DEEPBRAIN_USER_KEY" }}
{{- $only := .only | default (list "databaseUrl" "brokerUrl" "deepbrainAppId" "deepbrainUserKey") }}
{{- range $field := $only }}
- name: {{ get $vars $field }}
  valueFrom:
    secretKeyRef:
      name: {{ $.secretName }}
      key: {{ get $keys $field }}
{{- end }}
{{- end }}

{{/*
Environment of the worker and beat containers: the ConfigMap, the secrets the role needs
(each gets only its own: beat only talks to the broker), extras. Call with
(dict "root" $ "only" (list "brokerUrl")); "only" optional (default: all four).
*/}}
{{- define "session-orchestrator.env" -}}
{{- $root := .root -}}
env:
{{- include "session-orchestrator.secretEnv" (dict "root" $root "secretName" (include "session-orchestrator.secretName" $root) "only" .only) }}
{{- with $root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
envFrom:
- configMapRef:
    name: {{ include "session-orchestrator.fullname" $root }}
{{- with $root.Values.extraEnvFrom }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Pod spec fields shared by every pod. Call with (dict "root" $), adding "serviceAccountName"
to run as another account than the release's (the migration hook does).
*/}}
{{- define "session-orchestrator.podCommon" -}}
{{- $v := .root.Values -}}
serviceAccountName: {{ .serviceAccountName | default (include "session-orchestrator.serviceAccountName" .root) }}
automountServiceAccountToken: {{ $v.serviceAccount.automountServiceAccountToken }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $v.podSecurityContext | nindent 2 }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The writable /tmp every container gets (the root filesystem is read-only), and the
extraVolumes/extraVolumeMounts of the values.
*/}}
{{- define "session-orchestrator.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "session-orchestrator.tmpVolumeMount" -}}
- name: tmp
  mountPath: /tmp
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The /metrics port of worker and beat containers, when metrics.prometheus is on. */}}
{{- define "session-orchestrator.metricsPort" -}}
{{- if .Values.metrics.prometheus.enabled }}
ports:
  - name: metrics
    containerPort: {{ .Values.metrics.prometheus.port }}
    protocol: TCP
{{- end }}
{{- end }}

{{/* The pod label the metrics Service selects (worker and beat pods). */}}
{{- define "session-orchestrator.metricsPodLabel" -}}
{{- if .Values.metrics.prometheus.enabled }}
session-orchestrator/metrics: "true"
{{- end }}
{{- end }}

{{/* Checksums that roll the pods when settings or chart-made secrets change. */}}
{{- define "session-orchestrator.checksums" -}}
checksum/config: {{ include "session-orchestrator.configData" . | sha256sum }}
{{- if not .Values.secrets.existingSecret }}
checksum/secret: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}
{{- end }}

{{/*
Exec probes for a process with a heartbeat file. Call with
(dict "probes" .Values.worker.probes "role" "worker").
*/}}
{{- define "session-orchestrator.heartbeatProbes" -}}
{{- $cmd := list "orchestrator" "health" .role -}}
{{- range $kind := list "startup" "liveness" "readiness" }}
{{- $p := get $.probes $kind }}
{{- if $p.enabled }}
{{ $kind }}Probe:
  exec:
    command:
      {{- toYaml $cmd | nindent 6 }}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ $p.failureThreshold }}
{{- end }}
{{- end }}
{{- end }}
