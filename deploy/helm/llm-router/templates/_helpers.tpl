{{/* Names, labels and the wiring shared by the templates. */}}

{{- define "llm-router.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "llm-router.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "llm-router.agentsName" -}}
{{- printf "%s-agent" (include "llm-router.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "llm-router.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "llm-router.labels" -}}
{{ include "llm-router.commonLabels" . }}
app.kubernetes.io/name: {{ include "llm-router.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "llm-router.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-router.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: router
{{- end -}}

{{- define "llm-router.agentSelectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-router.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end -}}

{{- define "llm-router.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "llm-router.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "llm-router.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .chart.AppVersion) -}}
{{- end -}}

{{- define "llm-router.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets -}}
imagePullSecrets:
{{- toYaml . | nindent 2 }}
{{- end -}}
{{- end -}}

{{/* The Secret the pods read keys from: the user's, or the chart's. */}}
{{- define "llm-router.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "llm-router.fullname" .) -}}
{{- end -}}

{{- define "llm-router.postgres" -}}
{{- if eq .Values.database.type "postgres" }}true{{ end -}}
{{- end -}}

{{/* More than one router process may run at once: replicas, or an autoscaler. */}}
{{- define "llm-router.scaled" -}}
{{- if or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1) }}true{{ end -}}
{{- end -}}

{{/* The router Service's in-cluster URL (what agents announce to). */}}
{{- define "llm-router.url" -}}
{{- printf "http://%s.%s.svc:%d" (include "llm-router.fullname" .) .Release.Namespace (int .Values.service.port) -}}
{{- end -}}

{{/* Refuse values that cannot work, with a message naming the fix. */}}
{{- define "llm-router.validate" -}}
{{- if and (include "llm-router.scaled" .) (not (include "llm-router.postgres" .)) -}}
{{- fail "several router replicas (replicaCount > 1 or autoscaling.enabled) need database.type=postgres: a SQLite file cannot be shared" -}}
{{- end -}}
{{- if and (include "llm-router.postgres" .) (not .Values.database.url) (not .Values.secrets.existingSecret) -}}
{{- fail "database.type=postgres needs database.url, or secrets.existingSecret with a DATABASE_URL key" -}}
{{- end -}}
{{- if and .Values.redis.enabled (not .Values.redis.url) (not .Values.secrets.existingSecret) -}}
{{- fail "redis.enabled needs redis.url, or secrets.existingSecret with a REDIS_URL key" -}}
{{- end -}}
{{- if and .Values.agents.enabled (not .Values.secrets.agentToken) (not .Values.secrets.existingSecret) -}}
{{- fail "agents.enabled needs secrets.agentToken (ROUTER_AGENT_TOKEN), or secrets.existingSecret with that key" -}}
{{- end -}}
{{- end -}}
