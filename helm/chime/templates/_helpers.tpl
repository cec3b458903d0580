{{/* vim: set filetype=mustache: */}}

{{/* ---------------------------------------------------------------- names */}}

{{/* The chart name (nameOverride wins). */}}
{{- define "chime.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The base name of every resource: fullnameOverride, else the release name when it
already contains the chart name, else "<release>-<chart>". Truncated so that the
longest suffix ("-coordinator-headless", 21 characters) still fits in 63.
*/}}
{{- define "chime.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 42 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 42 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 42 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "chime.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "chime.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "chime.coordinator.fullname" -}}{{ include "chime.fullname" . }}-coordinator{{- end -}}
{{- define "chime.coordinator.headless" -}}{{ include "chime.fullname" . }}-coordinator-headless{{- end -}}
{{- define "chime.worker.fullname" -}}{{ include "chime.fullname" . }}-worker{{- end -}}
{{- define "chime.worker.metrics" -}}{{ include "chime.fullname" . }}-worker-metrics{{- end -}}
{{/* The shared pool's delivery service (worker.deliveries.enabled). */}}
{{- define "chime.deliveries.fullname" -}}{{ include "chime.fullname" . }}-deliveries{{- end -}}
{{/* The app with a chime worker sidecar: "<fullname>-<name>", short enough for the "-sidecar" and "-files" ConfigMaps. */}}
{{- define "chime.sidecarApp.fullname" -}}
{{- printf "%s-%s" (include "chime.fullname" .) .Values.sidecarApp.name | trunc 55 | trimSuffix "-" -}}
{{- end -}}
{{- define "chime.sidecarApp.sidecarConfigName" -}}{{ include "chime.sidecarApp.fullname" . }}-sidecar{{- end -}}
{{- define "chime.sidecarApp.filesName" -}}{{ include "chime.sidecarApp.fullname" . }}-files{{- end -}}
{{- define "chime.redis.fullname" -}}{{ include "chime.fullname" . }}-redis{{- end -}}
{{- define "chime.etcd.fullname" -}}{{ include "chime.fullname" . }}-etcd{{- end -}}
{{- define "chime.configName" -}}{{ include "chime.fullname" . }}-config{{- end -}}
{{/* Alert rules from values (alerts.*): the hook Job, its Secret (rules.json) and ConfigMap (client.toml). */}}
{{- define "chime.alerts.fullname" -}}{{ include "chime.fullname" . }}-alerts{{- end -}}
{{/* Configuration as values (apply.*): the hook Job, its Secret (objects.yaml) and ConfigMap (client.toml). */}}
{{- define "chime.apply.fullname" -}}{{ include "chime.fullname" . }}-apply{{- end -}}
{{- define "chime.secretName" -}}{{ include "chime.fullname" . }}{{- end -}}
{{/* Pods labelled "<fullname>-client: true" may reach the coordinators when networkPolicy.allowExternal is false. */}}
{{- define "chime.clientLabel" -}}{{ include "chime.fullname" . }}-client{{- end -}}

{{- define "chime.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "chime.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------- labels */}}

{{/* Kubernetes recommended labels plus commonLabels. Call with (dict "ctx" $ "component" "worker"). */}}
{{- define "chime.labels" -}}
{{- $ctx := .ctx -}}
helm.sh/chart: {{ include "chime.chart" $ctx }}
{{ include "chime.selectorLabels" . }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
app.kubernetes.io/part-of: chime
{{- with $ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Immutable selector labels. Call with (dict "ctx" $ "component" "worker"). */}}
{{- define "chime.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chime.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{/* metadata.annotations of every resource (commonAnnotations), with a leading newline or nothing. */}}
{{- define "chime.annotations" -}}
{{- with .Values.commonAnnotations -}}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------- images */}}

{{/* registry/repository:tag or @digest. Call with (dict "image" .Values.image "global" .Values.global "default" "0.1.0"). */}}
{{- define "chime.imageRef" -}}
{{- $registry := .image.registry -}}
{{- if and .global .global.imageRegistry -}}{{- $registry = .global.imageRegistry -}}{{- end -}}
{{- $repo := .image.repository -}}
{{- if $registry -}}{{- $repo = printf "%s/%s" $registry .image.repository -}}{{- end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $repo .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (toString (default .default .image.tag)) -}}
{{- end -}}
{{- end -}}

{{- define "chime.image" -}}
{{- include "chime.imageRef" (dict "image" .Values.image "global" .Values.global "default" .Chart.AppVersion) -}}
{{- end -}}

{{/* imagePullSecrets of a pod, from global and the image's own list. Call with (dict "ctx" $ "secrets" list). */}}
{{- define "chime.imagePullSecrets" -}}
{{- $names := list -}}
{{- range .ctx.Values.global.imagePullSecrets }}{{- $names = append $names . -}}{{- end -}}
{{- range .secrets }}{{- $names = append $names . -}}{{- end -}}
{{- if $names -}}
imagePullSecrets:
{{- range ($names | uniq) }}
  - name: {{ . }}
{{- end }}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------- scheduling */}}

{{/* Pod anti-affinity preset. Call with (dict "ctx" $ "component" "worker" "preset" "soft"). */}}
{{- define "chime.antiAffinity" -}}
{{- if eq .preset "soft" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "chime.selectorLabels" (dict "ctx" .ctx "component" .component) | nindent 12 }}
{{- else if eq .preset "hard" -}}
podAntiAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels:
          {{- include "chime.selectorLabels" (dict "ctx" .ctx "component" .component) | nindent 10 }}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------- stores */}}

{{/* Redis URL(s) without the password. */}}
{{- define "chime.redis.url" -}}
{{- if .Values.redis.bundled.enabled -}}
{{- printf "redis://%s.%s.svc.%s:6379/0" (include "chime.redis.fullname" .) (include "chime.namespace" .) .Values.clusterDomain -}}
{{- else -}}
{{- .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{- define "chime.redis.hasPassword" -}}
{{- if or .Values.redis.auth.existingSecret .Values.redis.auth.password -}}true{{- end -}}
{{- end -}}

{{- define "chime.redis.secretName" -}}
{{- default (include "chime.secretName" .) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{- define "chime.redis.secretKey" -}}
{{- if .Values.redis.auth.existingSecret -}}{{ .Values.redis.auth.existingSecretPasswordKey }}{{- else -}}redis-password{{- end -}}
{{- end -}}

{{/*
The Redis URL with "[user]:$(REDIS_PASSWORD)@" after each scheme: Kubernetes expands
$(REDIS_PASSWORD) from the env var defined before it, so the password never lands in
the ConfigMap.
*/}}
{{- define "chime.redis.urlWithPassword" -}}
{{- $auth := printf "${1}%s:$(REDIS_PASSWORD)@" .Values.redis.auth.username -}}
{{- regexReplaceAll "(rediss?://)" (include "chime.redis.url" .) $auth -}}
{{- end -}}

{{- define "chime.etcd.endpoints" -}}
{{- if .Values.etcd.bundled.enabled -}}
{{- printf "http://%s.%s.svc.%s:2379" (include "chime.etcd.fullname" .) (include "chime.namespace" .) .Values.clusterDomain -}}
{{- else -}}
{{- .Values.etcd.external.endpoints -}}
{{- end -}}
{{- end -}}

{{- define "chime.etcd.hasPassword" -}}
{{- if and .Values.etcd.auth.username (or .Values.etcd.auth.existingSecret .Values.etcd.auth.password) -}}true{{- end -}}
{{- end -}}

{{- define "chime.etcd.secretName" -}}
{{- default (include "chime.secretName" .) .Values.etcd.auth.existingSecret -}}
{{- end -}}

{{- define "chime.etcd.secretKey" -}}
{{- if .Values.etcd.auth.existingSecret -}}{{ .Values.etcd.auth.existingSecretPasswordKey }}{{- else -}}etcd-password{{- end -}}
{{- end -}}

{{/* Env vars that carry the store passwords from Secrets (nothing when there are none). */}}
{{- define "chime.storeEnv" -}}
{{- if include "chime.redis.hasPassword" . -}}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "chime.redis.secretName" . }}
      key: {{ include "chime.redis.secretKey" . }}
- name: CHIME_REDIS_URL
  value: {{ include "chime.redis.urlWithPassword" . | quote }}
{{ end -}}
{{- include "chime.etcdEnv" . -}}
{{- end -}}

{{/* The env var that carries the etcd password from a Secret (nothing without one). */}}
{{- define "chime.etcdEnv" -}}
{{- if include "chime.etcd.hasPassword" . -}}
- name: CHIME_ETCD_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "chime.etcd.secretName" . }}
      key: {{ include "chime.etcd.secretKey" . }}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------- coordinator addresses */}}

{{- define "chime.grpcScheme" -}}{{ if .Values.tls.enabled }}https{{ else }}http{{ end }}{{- end -}}

{{/* The stable DNS name of coordinator pod N's host (without the port). Call with (dict "ctx" $ "pod" "name-0"). */}}
{{- define "chime.coordinator.podHost" -}}
{{- printf "%s.%s.%s.svc.%s" .pod (include "chime.coordinator.headless" .ctx) (include "chime.namespace" .ctx) .ctx.Values.clusterDomain -}}
{{- end -}}

{{/* Every coordinator's gRPC endpoint, comma-separated: workers try each and follow the leader redirect. */}}
{{- define "chime.coordinator.endpoints" -}}
{{- $eps := list -}}
{{- range $i := until (int .Values.coordinator.replicaCount) -}}
{{- $host := include "chime.coordinator.podHost" (dict "ctx" $ "pod" (printf "%s-%d" (include "chime.coordinator.fullname" $) $i)) -}}
{{- $eps = append $eps (printf "%s://%s:%d" (include "chime.grpcScheme" $) $host (int $.Values.coordinator.containerPorts.grpc)) -}}
{{- end -}}
{{- join "," $eps -}}
{{- end -}}

{{/* The client Service's gRPC endpoint (any coordinator; followers forward admin calls). */}}
{{- define "chime.coordinator.clientEndpoint" -}}
{{- printf "%s://%s.%s.svc.%s:%d" (include "chime.grpcScheme" .) (include "chime.coordinator.fullname" .) (include "chime.namespace" .) .Values.clusterDomain (int .Values.coordinator.service.ports.grpc) -}}
{{- end -}}

{{/* ---------------------------------------------------------------- worker grace period */}}

{{/* Longest drain of a worker, whole seconds rounded up. */}}
{{- define "chime.worker.drainSeconds" -}}
{{- $ms := max (int64 .Values.worker.consumer.drainTimeoutMs) (int64 .Values.worker.drainTimeoutMs) -}}
{{- div (add $ms 999) 1000 -}}
{{- end -}}

{{/* The worker pods' terminationGracePeriodSeconds: preStop + drain + margin, unless set. */}}
{{- define "chime.worker.terminationGracePeriodSeconds" -}}
{{- if not (eq (toString .Values.worker.terminationGracePeriodSeconds) "") -}}
{{- int64 .Values.worker.terminationGracePeriodSeconds -}}
{{- else -}}
{{- add (int64 .Values.worker.preStopSleepSeconds) (int64 (include "chime.worker.drainSeconds" .)) (int64 .Values.worker.terminationGraceMarginSeconds) -}}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------- app with a sidecar */}}

{{/* The sidecars' queue family: their own, else the workers' (the one the coordinators' Queue API serves). */}}
{{- define "chime.sidecarApp.family" -}}
{{- default .Values.worker.queue.family .Values.sidecarApp.sidecar.queueFamily -}}
{{- end -}}

{{/* What the app dials: the sidecar's delivery service on loopback. */}}
{{- define "chime.sidecarApp.deliveriesUrl" -}}
{{- printf "http://127.0.0.1:%d" (int .Values.sidecarApp.sidecar.deliveriesPort) -}}
{{- end -}}

{{/* The sidecar's drain, whole seconds rounded up. */}}
{{- define "chime.sidecarApp.sidecarDrainSeconds" -}}
{{- div (add (int64 .Values.sidecarApp.sidecar.drainTimeoutMs) 999) 1000 -}}
{{- end -}}

{{/*
The app pods' terminationGracePeriodSeconds, unless set: the app's drain, then the
sidecar's (Kubernetes stops a native sidecar only once the app has exited, and without
native sidecars the sidecar's preStop waits out the app's drain), plus a margin.
*/}}
{{- define "chime.sidecarApp.terminationGracePeriodSeconds" -}}
{{- if not (eq (toString .Values.sidecarApp.terminationGracePeriodSeconds) "") -}}
{{- int64 .Values.sidecarApp.terminationGracePeriodSeconds -}}
{{- else -}}
{{- add (int64 .Values.sidecarApp.drainSeconds) (int64 (include "chime.sidecarApp.sidecarDrainSeconds" .)) (int64 .Values.sidecarApp.terminationGraceMarginSeconds) -}}
{{- end -}}
{{- end -}}

{{- define "chime.sidecarApp.image" -}}
{{- include "chime.imageRef" (dict "image" .Values.sidecarApp.image "global" .Values.global "default" "") -}}
{{- end -}}

{{/* ---------------------------------------------------------------- secrets and volumes */}}

{{- define "chime.tokenSecretName" -}}
{{- default (include "chime.secretName" .) .Values.auth.existingSecret -}}
{{- end -}}

{{/* The chart's own Secret is needed when it holds at least one key. */}}
{{- define "chime.needsSecret" -}}
{{- if or (and .Values.auth.enabled (not .Values.auth.existingSecret)) (and .Values.redis.auth.password (not .Values.redis.auth.existingSecret)) (and .Values.etcd.auth.username .Values.etcd.auth.password (not .Values.etcd.auth.existingSecret)) -}}true{{- end -}}
{{- end -}}

{{/*
A value of the chart's Secret, base64: the value given, else the one already in the
cluster (lookup, so upgrades keep generated tokens), else a new random one.
Call with (dict "ctx" $ "key" "admin-token" "value" .Values.auth.adminToken).
*/}}
{{- define "chime.secretValue" -}}
{{- if .value -}}
{{- .value | toString | b64enc -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" (include "chime.namespace" .ctx) (include "chime.secretName" .ctx) -}}
{{- if and $existing $existing.data (hasKey $existing.data .key) -}}
{{- index $existing.data .key -}}
{{- else -}}
{{- randAlphaNum 40 | b64enc -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Checksums that roll the pods when their configuration or secrets change. */}}
{{- define "chime.checksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end -}}

{{/* ---------------------------------------------------------------- alert rules */}}

{{/* "true" when the alert rules hook runs: rules given, a Secret of rules, or prune (an empty list then deletes every stored rule). */}}
{{- define "chime.alerts.enabled" -}}
{{- if or .Values.alerts.rules .Values.alerts.existingSecret .Values.alerts.prune -}}true{{- end -}}
{{- end -}}

{{/* The Secret whose key rules.json the hook applies. */}}
{{- define "chime.alerts.secretName" -}}
{{- default (include "chime.alerts.fullname" .) .Values.alerts.existingSecret -}}
{{- end -}}

{{/* rules.json of the chart's own Secret: alerts.rules as JSON. */}}
{{- define "chime.alerts.rulesJson" -}}
{{- toPrettyJson (default (list) .Values.alerts.rules) -}}
{{- end -}}

{{/*
The client configuration of the hooks' `chime alert` and `chime apply` (the CLI refuses
the coordinators' file: its [auth], [tls] and [coordinator] sections are not client
keys): the coordinators' [etcd], and their [queue], whose family alert rules'
scope.family must name. Call with (dict "ctx" $ "what" "the alert rules hook").
*/}}
{{- define "chime.hookClientToml" -}}
{{- $v := .ctx.Values -}}
# chime client configuration of {{ .what }}, rendered by the {{ include "chime.chart" .ctx }} chart:
# the coordinators' etcd and queue family. The etcd password comes from
# CHIME_ETCD_PASSWORD (a Secret), never from this file.

[etcd]
endpoints = {{ include "chime.etcd.endpoints" .ctx | include "chime.toml.str" }}
prefix = {{ include "chime.toml.str" $v.etcd.prefix }}
{{- if $v.etcd.auth.username }}
user = {{ include "chime.toml.str" $v.etcd.auth.username }}
{{- end }}

[queue]
prefix = {{ include "chime.toml.str" $v.config.keyPrefix }}
family = {{ include "chime.toml.str" $v.worker.queue.family }}
count = {{ int64 $v.worker.queue.count }}

[log]
format = {{ include "chime.toml.str" $v.config.logFormat }}
level = {{ include "chime.toml.str" $v.config.logLevel }}
{{- end -}}

{{/* The alert rules hook's client.toml. */}}
{{- define "chime.alerts.clientToml" -}}
{{- include "chime.hookClientToml" (dict "ctx" . "what" "the alert rules hook") -}}
{{- end -}}

{{/* ---------------------------------------------------------------- configuration as values */}}

{{/*
"true" when the configuration hook runs: objects given, a Secret of objects, or prune
(an empty list then deletes what the release's set applied before, and nothing else).
*/}}
{{- define "chime.apply.enabled" -}}
{{- if or .Values.apply.objects .Values.apply.existingSecret .Values.apply.prune -}}true{{- end -}}
{{- end -}}

{{/* The Secret whose key objects.yaml the hook applies. */}}
{{- define "chime.apply.secretName" -}}
{{- default (include "chime.apply.fullname" .) .Values.apply.existingSecret -}}
{{- end -}}

{{/* The set the hook applies as (chime apply --set): etcd remembers what it applied, for --prune. */}}
{{- define "chime.apply.set" -}}helm-{{ .Release.Name }}{{- end -}}

{{/*
objects.yaml of the chart's own Secret: apply.objects as YAML documents, the form
`chime export` prints (a comment line only when the list is empty).
*/}}
{{- define "chime.apply.objectsYaml" -}}
{{- $objs := default (list) .Values.apply.objects -}}
# apply.objects of release {{ .Release.Name }}: {{ len $objs }} object(s), applied as the set {{ include "chime.apply.set" . }}
{{- range $objs }}
---
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The configuration hook's client.toml. */}}
{{- define "chime.apply.clientToml" -}}
{{- include "chime.hookClientToml" (dict "ctx" . "what" "the configuration hook (apply.*)") -}}
{{- end -}}

{{/*
The coordinators' coordinator.min_period_ms when coordinator.extraEnv sets it
(CHIME_COORDINATOR_MIN_PERIOD_MS with a value; the last one wins, as in the pod), ""
otherwise: both then use the binary's default. `chime apply --min-period-ms` checks
schedules against it as the coordinators do.
*/}}
{{- define "chime.coordinator.minPeriodMs" -}}
{{- $ms := "" -}}
{{- range .Values.coordinator.extraEnv -}}
{{- if and (kindIs "map" .) (eq (toString .name) "CHIME_COORDINATOR_MIN_PERIOD_MS") (hasKey . "value") -}}
{{- $ms = toString .value -}}
{{- end -}}
{{- end -}}
{{- $ms -}}
{{- end -}}

{{/* ---------------------------------------------------------------- TOML */}}

{{/*
The [redis], [etcd], [queue] and [consumer] sections of a chime worker's TOML: the
workers' and the app sidecars' files share them. Call with
(dict "ctx" $ "family" "default" "drainMs" 25000).
*/}}
{{- define "chime.toml.workerQueue" -}}
{{- $v := .ctx.Values -}}
[redis]
url = {{ include "chime.redis.url" .ctx | include "chime.toml.str" }}
cluster = {{ and (not $v.redis.bundled.enabled) $v.redis.external.cluster }}
response_timeout_ms = {{ int64 $v.redis.responseTimeoutMs }}

[etcd]
endpoints = {{ include "chime.etcd.endpoints" .ctx | include "chime.toml.str" }}
prefix = {{ include "chime.toml.str" $v.etcd.prefix }}
{{- if $v.etcd.auth.username }}
user = {{ include "chime.toml.str" $v.etcd.auth.username }}
{{- end }}

[queue]
prefix = {{ include "chime.toml.str" $v.config.keyPrefix }}
family = {{ include "chime.toml.str" .family }}
count = {{ int64 $v.worker.queue.count }}

[consumer]
pollers = {{ int64 $v.worker.consumer.pollers }}
batch = {{ int64 $v.worker.consumer.batch }}
max_in_flight = {{ int64 $v.worker.consumer.maxInFlight }}
visibility_ms = {{ int64 $v.worker.consumer.visibilityMs }}
lease_ttl_ms = {{ int64 $v.worker.consumer.leaseTtlMs }}
merge_window_ms = {{ int64 $v.worker.consumer.mergeWindowMs }}
idle_sleep_max_ms = {{ int64 $v.worker.consumer.idleSleepMaxMs }}
drain_timeout_ms = {{ int64 .drainMs }}
retry_base_ms = {{ int64 $v.worker.consumer.retryBaseMs }}
retry_max_ms = {{ int64 $v.worker.consumer.retryMaxMs }}
{{- end -}}

{{/*
Who may present tokens to a delivery service: the worker token when auth is on, anyone
otherwise (auth.enabled false sets allow_unauthenticated everywhere).
*/}}
{{- define "chime.toml.deliveriesAuth" -}}
{{- if .Values.auth.enabled -}}
token_file = "/etc/chime/secrets/worker-token"
allow_unauthenticated = false
{{- else -}}
allow_unauthenticated = true
{{- end -}}
{{- end -}}

{{/* A TOML string (JSON strings are valid TOML basic strings). */}}
{{- define "chime.toml.str" -}}{{ toString . | toJson }}{{- end -}}

{{/* The [tracing] section of every chime process: spans over OTLP/gRPC to
config.tracing.otlpEndpoint (none when empty). */}}
{{- define "chime.toml.tracing" -}}
{{- with .Values.config.tracing }}
{{- if .otlpEndpoint }}
[tracing]
otlp_endpoint = {{ include "chime.toml.str" .otlpEndpoint }}
sample_ratio = {{ .sampleRatio | float64 }}
{{- end }}
{{- end }}
{{- end -}}

{{/* k=v,k2=v2 from a map, sorted by key. */}}
{{- define "chime.kvList" -}}
{{- $pairs := list -}}
{{- range $k, $v := . -}}{{- $pairs = append $pairs (printf "%s=%s" $k (toString $v)) -}}{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{/* Peers that may reach the coordinators and the metrics ports besides this release's pods (networkPolicy.allowExternal false). */}}
{{- define "chime.networkPolicy.extraPeers" -}}
- podSelector:
    matchLabels:
      {{ include "chime.clientLabel" . }}: "true"
{{- if .Values.networkPolicy.ingressNSMatchLabels }}
- namespaceSelector:
    matchLabels:
      {{- toYaml .Values.networkPolicy.ingressNSMatchLabels | nindent 6 }}
  {{- with .Values.networkPolicy.ingressNSPodMatchLabels }}
  podSelector:
    matchLabels:
      {{- toYaml . | nindent 6 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* ---------------------------------------------------------------- validation */}}

{{/* Refuses value combinations the schema cannot express. */}}
{{- define "chime.validateValues" -}}
{{- if and .Values.etcd.bundled.enabled (or .Values.etcd.auth.username .Values.etcd.auth.existingSecret) -}}
{{- fail "etcd.auth is for an external etcd: the bundled etcd (etcd.bundled.enabled) runs without authentication" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) -}}
{{- fail "tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret naming the coordinator Services)" -}}
{{- end -}}
{{- if and .Values.tests.enabled (not (has .Values.tests.handler .Values.worker.handlers)) -}}
{{- fail (printf "tests.handler %q is not among worker.handlers: the helm test's run would never start" .Values.tests.handler) -}}
{{- end -}}
{{- if not (eq (toString .Values.worker.terminationGracePeriodSeconds) "") -}}
{{- $min := add (int64 .Values.worker.preStopSleepSeconds) (int64 (include "chime.worker.drainSeconds" .)) -}}
{{- if le (int64 .Values.worker.terminationGracePeriodSeconds) $min -}}
{{- fail (printf "worker.terminationGracePeriodSeconds must exceed preStopSleepSeconds + the longest drain timeout (%d s), or a draining worker is killed" $min) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.alerts.rules .Values.alerts.existingSecret -}}
{{- fail "alerts.rules and alerts.existingSecret are exclusive: give the rules in values, or in the Secret's key rules.json" -}}
{{- end -}}
{{- $names := list -}}
{{- range $i, $r := .Values.alerts.rules -}}
{{- if has $r.name $names -}}
{{- fail (printf "alerts.rules[%d]: the name %q is given twice" $i $r.name) -}}
{{- end -}}
{{- $names = append $names $r.name -}}
{{- end -}}
{{- include "chime.apply.validate" . -}}
{{- if and .Values.worker.deliveries.enabled (not .Values.worker.queue.enabled) -}}
{{- fail "worker.deliveries.enabled needs worker.queue.enabled: the delivery service hands out the items the worker pops" -}}
{{- end -}}
{{- with .Values.sidecarApp -}}
{{- if .enabled -}}
{{- if not .image.repository -}}
{{- fail "sidecarApp.enabled needs sidecarApp.image.repository (and a tag or digest): the app's own image" -}}
{{- end -}}
{{- if not (or .image.tag .image.digest) -}}
{{- fail "sidecarApp.image.tag or sidecarApp.image.digest is required: pin the app's image" -}}
{{- end -}}
{{- if and .sidecar.native (not (semverCompare ">=1.29.0-0" $.Capabilities.KubeVersion.Version)) -}}
{{- fail (printf "sidecarApp.sidecar.native needs Kubernetes >= 1.29 (native sidecars; this cluster is %s): set sidecarApp.sidecar.native=false (helm template: pass --kube-version)" $.Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- if eq (int .sidecar.deliveriesPort) (int .sidecar.containerPorts.http) -}}
{{- fail "sidecarApp.sidecar.deliveriesPort and sidecarApp.sidecar.containerPorts.http must differ" -}}
{{- end -}}
{{- range .ports -}}
{{- if has (int .containerPort) (list (int $.Values.sidecarApp.sidecar.deliveriesPort) (int $.Values.sidecarApp.sidecar.containerPorts.http)) -}}
{{- fail (printf "sidecarApp.ports: port %d is the sidecar's (sidecarApp.sidecar.deliveriesPort / containerPorts.http); the containers of a pod share its ports" (int .containerPort)) -}}
{{- end -}}
{{- end -}}
{{- if not (eq (toString .terminationGracePeriodSeconds) "") -}}
{{- $min := add (int64 .drainSeconds) (int64 (include "chime.sidecarApp.sidecarDrainSeconds" $)) -}}
{{- if le (int64 .terminationGracePeriodSeconds) $min -}}
{{- fail (printf "sidecarApp.terminationGracePeriodSeconds must exceed drainSeconds + the sidecar's drain (%d s), or the sidecar is killed before the app's deliveries are settled" $min) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
apply.*: what the schema cannot say. Each object's key in etcd (jobs/<name> for jobs
and workflows, the setting's key, alerts/<name>) once, as chime apply requires; alert
rules in one place only (alerts.prune deletes every rule not in alerts.rules, so on
each upgrade it would delete those of apply.objects, which the next apply re-creates).
*/}}
{{- define "chime.apply.validate" -}}
{{- $a := .Values.apply -}}
{{- if and $a.objects $a.existingSecret -}}
{{- fail "apply.objects and apply.existingSecret are exclusive: give the objects in values, or in the Secret's key objects.yaml" -}}
{{- end -}}
{{- $seen := dict -}}
{{- $ruleNames := list -}}
{{- range .Values.alerts.rules }}{{ $ruleNames = append $ruleNames (toString .name) }}{{ end -}}
{{- range $i, $o := $a.objects -}}
{{- if not (kindIs "map" $o) -}}
{{- fail (printf "apply.objects[%d] is no map: each object is a map with a kind (job, workflow, setting or alert)" $i) -}}
{{- end -}}
{{- $kind := toString (get $o "kind") -}}
{{- if not (has $kind (list "job" "workflow" "setting" "alert")) -}}
{{- fail (printf "apply.objects[%d]: kind %q is none of job, workflow, setting, alert" $i (get $o "kind" | default "" | toString)) -}}
{{- end -}}
{{- $key := "" -}}
{{- $what := "" -}}
{{- if has $kind (list "job" "workflow") -}}
{{- $key = printf "jobs/%s" (toString (get $o "name")) -}}
{{- $what = printf "the job name %q (jobs and workflows share names)" (toString (get $o "name")) -}}
{{- else if eq $kind "setting" -}}
{{- $key = toString (get $o "key") | trim -}}
{{- $what = printf "the setting %q" $key -}}
{{- else -}}
{{- $key = printf "alerts/%s" (toString (get $o "name")) -}}
{{- $what = printf "the alert rule %q" (toString (get $o "name")) -}}
{{- if $.Values.alerts.prune -}}
{{- fail (printf "apply.objects[%d] is an alert rule, and alerts.prune deletes every rule not in alerts.rules on each upgrade: keep alert rules in one place (alerts.rules, or apply.objects with alerts.prune false)" $i) -}}
{{- end -}}
{{- if has (toString (get $o "name")) $ruleNames -}}
{{- fail (printf "apply.objects[%d]: the alert rule %q is in alerts.rules too: keep each rule in one place" $i (toString (get $o "name"))) -}}
{{- end -}}
{{- end -}}
{{- if hasKey $seen $key -}}
{{- fail (printf "apply.objects[%d]: %s is given twice (apply.objects[%d] too)" $i $what (index $seen $key)) -}}
{{- end -}}
{{- $_ := set $seen $key $i -}}
{{- end -}}
{{- with include "chime.coordinator.minPeriodMs" . -}}
{{- if and (include "chime.apply.enabled" $) (not (regexMatch "^[0-9]+$" .)) -}}
{{- fail (printf "coordinator.extraEnv: CHIME_COORDINATOR_MIN_PERIOD_MS %q is no whole number of milliseconds (the configuration hook passes it to chime apply --min-period-ms)" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
