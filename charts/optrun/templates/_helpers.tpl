{{/*
Names and labels shared by every template (the cert-manager chart's conventions).
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "optrun.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release-qualified name, cut to 63 characters (the DNS label limit of most names):
fullnameOverride, else "<release>" when it already contains the chart name, else
"<release>-<chart>".
*/}}
{{- define "optrun.fullname" -}}
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

{{/* "<fullname>-<suffix>", still within 63 characters. */}}
{{- define "optrun.suffixed" -}}
{{- $suffix := index . 1 }}
{{- printf "%s-%s" (include "optrun.fullname" (index . 0) | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{- define "optrun.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object the chart makes. */}}
{{- define "optrun.labels" -}}
helm.sh/chart: {{ include "optrun.chart" . }}
{{ include "optrun.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: optrun
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The operator pods' selector; never changes across upgrades (a Deployment's selector is immutable). */}}
{{- define "optrun.selectorLabels" -}}
app.kubernetes.io/name: {{ include "optrun.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
The runtime pods' labels, as the operator sets them (optrun/operator/builders.py labels()):
what the PodMonitor selects.
*/}}
{{- define "optrun.runtimeSelectorLabels" -}}
app.kubernetes.io/name: optrun
app.kubernetes.io/component: runtime
app.kubernetes.io/managed-by: optrun-operator
{{- end }}

{{- define "optrun.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "optrun.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image reference: repository:tag, or repository@digest when a digest is set. */}}
{{- define "optrun.image" -}}
{{- $img := index . 0 }}
{{- $appVersion := index . 1 }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default $appVersion $img.tag) }}
{{- end }}
{{- end }}

{{/*
"true" when the operator handles every namespace (a ClusterRole, a ClusterKopfPeering), else
empty. Cluster-wide is asked for explicitly (operator.clusterWide): an empty namespace list
alone never grants pod create and delete everywhere.
*/}}
{{- define "optrun.clusterwide" -}}
{{- $op := .Values.operator }}
{{- if and $op.clusterWide $op.namespaces }}
{{- fail (printf "operator.namespaces is %s and operator.clusterWide is true: set operator.clusterWide=false to handle runs only in those namespaces, or empty operator.namespaces to handle every namespace" (toJson $op.namespaces)) }}
{{- end }}
{{- if and (not $op.clusterWide) (not $op.namespaces) }}
{{- fail "operator.clusterWide is false and operator.namespaces is empty: list the namespaces whose OptimizationRuns the operator handles (operator.namespaces={ml-team-a,ml-team-b}), or set operator.clusterWide=true" }}
{{- end }}
{{- if $op.clusterWide }}true{{ end }}
{{- end }}

{{/*
Labels of a prometheus-operator object: monitoring.labels (what a Prometheus selects on, e.g.
kube-prometheus-stack's release label), then the object's own, which win on a clash.
Called with (list . <the object's labels>).
*/}}
{{- define "optrun.monitoringLabels" -}}
{{- $root := index . 0 }}
{{- $labels := merge (dict) (index . 1 | default dict) ($root.Values.monitoring.labels | default dict) }}
{{- with $labels }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/* Peering is on whenever it is asked for or more than one replica runs. */}}
{{- define "optrun.peering" -}}
{{- if or .Values.operator.peering.enabled (gt (int .Values.replicaCount) 1) }}true{{ end }}
{{- end }}

{{/* The ValidatingWebhookConfiguration's name (cluster-scoped: the release namespace keeps two installs apart). */}}
{{- define "optrun.webhookConfiguration" -}}
{{- printf "%s-%s" (include "optrun.fullname" .) .Release.Namespace | trunc 253 | trimSuffix "-" }}
{{- end }}
