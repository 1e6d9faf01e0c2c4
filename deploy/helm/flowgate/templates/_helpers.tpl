{{/* Chart name. */}}
{{- define "flowgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name (release-chart, unless the release already says flowgate). */}}
{{- define "flowgate.fullname" -}}
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

{{- define "flowgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flowgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "flowgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "flowgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "flowgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "flowgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Deployment, or StatefulSet when the spool is on a PVC per pod. */}}
{{- define "flowgate.workloadKind" -}}
{{- if and .Values.spool.enabled .Values.spool.persistence.enabled }}StatefulSet{{ else }}Deployment{{ end }}
{{- end }}

{{/* The StatefulSet's governing Service: headless, one DNS name per pod. */}}
{{- define "flowgate.headlessServiceName" -}}
{{- printf "%s-headless" (include "flowgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The native `sleep` preStop action exists from Kubernetes 1.30 on; below, exec sleep (the image has coreutils). */}}
{{- define "flowgate.preStop" -}}
{{- $seconds := int .Values.shutdown.preStopSleepSeconds }}
{{- if semverCompare ">=1.30.0-0" .Capabilities.KubeVersion.Version }}
sleep:
  seconds: {{ $seconds }}
{{- else }}
exec:
  command: ["sleep", "{{ $seconds }}"]
{{- end }}
{{- end }}

{{/* The kubelet's SIGKILL deadline: preStop + flowgate's own grace + margin. */}}
{{- define "flowgate.terminationGracePeriodSeconds" -}}
{{- add (int .Values.shutdown.preStopSleepSeconds) (int .Values.shutdown.graceSeconds) (int .Values.shutdown.marginSeconds) }}
{{- end }}

{{/* Fails the render on inconsistent values; included by the workload. */}}
{{- define "flowgate.validate" -}}
{{- $mode := .Values.autoscaling.mode }}
{{- if not (has $mode (list "none" "keda" "hpa")) }}
{{- fail (printf "autoscaling.mode must be none, keda or hpa (got %q)" $mode) }}
{{- end }}
{{- if and (ne $mode "none") (empty .Values.autoscaling.queues) }}
{{- fail "autoscaling.queues: name at least one input queue to scale on" }}
{{- end }}
{{- if and (ne $mode "none") (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- if .Values.partitioning.enabled }}
{{- if ne (include "flowgate.workloadKind" .) "StatefulSet" }}
{{- fail "partitioning.enabled takes each pod's index from its StatefulSet ordinal: enable spool.persistence (the StatefulSet)" }}
{{- end }}
{{- if ne $mode "none" }}
{{- fail "partitioning.enabled shares the partitions among replicaCount pods: set autoscaling.mode to none" }}
{{- end }}
{{- end }}
{{- if and (eq $mode "keda") (empty .Values.amqp.existingSecret) }}
{{- fail "autoscaling.mode=keda reads the broker URL from amqp.existingSecret: set it" }}
{{- end }}
{{- if and .Values.management.enabled (eq (int .Values.management.port) (int .Values.http.port)) }}
{{- fail "management.port must differ from http.port: the management API has its own listener" }}
{{- end }}
{{- if lt (int .Values.shutdown.graceSeconds) 1 }}
{{- fail "shutdown.graceSeconds must be at least 1" }}
{{- end }}
{{- if lt (int .Values.shutdown.marginSeconds) 5 }}
{{- fail "shutdown.marginSeconds must be at least 5: flowgate still closes channels and connections after its grace" }}
{{- end }}
{{- range .Values.autoscaling.queues }}
{{- if or (empty .name) (lt (int .queueLength) 1) }}
{{- fail "autoscaling.queues[]: each needs a name and a queueLength >= 1" }}
{{- end }}
{{- end }}
{{- end }}
