{{/* Chart name, truncated to the 63 characters Kubernetes names allow. */}}
{{- define "featurewatch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name used for every object. */}}
{{- define "featurewatch.fullname" -}}
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

{{- define "featurewatch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "featurewatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "featurewatch.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "featurewatch.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "featurewatch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "featurewatch.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* image:tag; the default tag is the appVersion, "-cuda" when gpu.enabled. */}}
{{- define "featurewatch.image" -}}
{{- $tag := .Values.image.tag }}
{{- if not $tag }}
{{- $tag = .Chart.AppVersion }}
{{- if .Values.gpu.enabled }}
{{- $tag = printf "%s-cuda" $tag }}
{{- end }}
{{- end }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* Whether the chart's own Secret is needed (a Redis URL or API keys given as values). */}}
{{- define "featurewatch.ownSecret" -}}
{{- if or (and .Values.redis.url (not .Values.redis.existingSecret)) (and .Values.keys.apiKeys (not .Values.keys.existingSecret)) }}true{{ end }}
{{- end }}

{{/* More than one replica can run: external Redis required, PodDisruptionBudget useful. */}}
{{- define "featurewatch.multiReplica" -}}
{{- if or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled }}true{{ end }}
{{- end }}

{{/* Refuse values that would deploy something broken or leak secrets into plain env. */}}
{{- define "featurewatch.validate" -}}
{{- $reserved := dict "host" "the chart binds 0.0.0.0" "port" "the container port is fixed at 8000" "data_dir" "the chart mounts /data" "policy" "use policy.content" "redis_url" "use redis.url or redis.existingSecret" "api_keys" "use keys.apiKeys or keys.existingSecret" "otlp_endpoint" "use otel.endpoint" "otel_exporter" "use otel.exporter" "otel_capture_content" "use otel.captureContent" }}
{{- range $k, $v := .Values.settings }}
{{- if hasKey $reserved $k }}
{{- fail (printf "settings.%s: set by the chart (%s)" $k (get $reserved $k)) }}
{{- end }}
{{- end }}
{{- if and (include "featurewatch.multiReplica" .) (not (or .Values.redis.url .Values.redis.existingSecret)) }}
{{- fail "redis.url or redis.existingSecret is required when more than one replica can run (replicaCount > 1 or autoscaling.enabled): otherwise each pod keeps its own embedded audit trail" }}
{{- end }}
{{- if and .Values.dataVolume.existingClaim (include "featurewatch.multiReplica" .) }}
{{- fail "dataVolume.existingClaim works with one replica only (one data dir per pod)" }}
{{- end }}
{{- end }}
