{{/*
The operator's configuration as OPTRUN_OPERATOR_* environment variables: one per field of
optrun/operator/config.py OperatorConfig (lists as JSON). A test renders these and validates
them with that model, so a renamed field fails the chart's tests, not a cluster.
*/}}
{{- define "optrun.operatorEnv" -}}
{{- $op := .Values.operator -}}
- name: OPTRUN_OPERATOR_NAMESPACES
  value: {{ toJson (default (list) $op.namespaces) | quote }}
- name: OPTRUN_OPERATOR_RUNTIME_IMAGE
  value: {{ include "optrun.image" (list $op.runtime.image .Chart.AppVersion) | quote }}
- name: OPTRUN_OPERATOR_IMAGE_PULL_POLICY
  value: {{ $op.runtime.image.pullPolicy | quote }}
- name: OPTRUN_OPERATOR_RUNTIME_METRICS_PORT
  value: {{ $op.runtime.metricsPort | quote }}
- name: OPTRUN_OPERATOR_TERMINATION_GRACE_SECONDS
  value: {{ $op.runtime.terminationGracePeriodSeconds | quote }}
- name: OPTRUN_OPERATOR_RUNTIME_STARTUP_SECONDS
  value: {{ $op.runtime.startupSeconds | quote }}
- name: OPTRUN_OPERATOR_RUNTIME_METRICS_ADDRESS
  value: {{ $op.runtime.metricsAddress | quote }}
- name: OPTRUN_OPERATOR_GPU_RESOURCE
  value: {{ $op.gpu.resource | quote }}
- name: OPTRUN_OPERATOR_GPU_PRODUCT_LABEL
  value: {{ $op.gpu.productLabel | quote }}
- name: OPTRUN_OPERATOR_DEFAULT_TOLERATIONS
  value: {{ toJson (default (list) $op.gpu.tolerations) | quote }}
- name: OPTRUN_OPERATOR_SCRAPE_INTERVAL_SECONDS
  value: {{ $op.scrapeIntervalSeconds | quote }}
- name: OPTRUN_OPERATOR_SCRAPE_TIMEOUT_SECONDS
  value: {{ $op.scrapeTimeoutSeconds | quote }}
- name: OPTRUN_OPERATOR_LIVE_GATE_GRACE_SECONDS
  value: {{ $op.liveGateGraceSeconds | quote }}
- name: OPTRUN_OPERATOR_STATUS_BATCH_SECONDS
  value: {{ $op.statusBatchSeconds | quote }}
- name: OPTRUN_OPERATOR_WORKERS
  value: {{ $op.workers | quote }}
- name: OPTRUN_OPERATOR_API_TIMEOUT_SECONDS
  value: {{ $op.apiTimeoutSeconds | quote }}
- name: OPTRUN_OPERATOR_API_RETRY_MAX_SECONDS
  value: {{ $op.apiRetryMaxSeconds | quote }}
- name: OPTRUN_OPERATOR_METRICS_PORT
  value: {{ .Values.ports.metrics | quote }}
- name: OPTRUN_OPERATOR_HEALTH_PORT
  value: {{ .Values.ports.health | quote }}
- name: OPTRUN_OPERATOR_PEERING_NAME
  value: {{ $op.peering.name | quote }}
- name: OPTRUN_OPERATOR_PEERING_MODE
  # mandatory: the chart creates the peering object, so a replica that cannot find it is broken.
  value: {{ ternary "mandatory" "standalone" (not (not $op.peering.enabled)) | quote }}
- name: OPTRUN_OPERATOR_PEERING_LIFETIME_SECONDS
  value: {{ $op.peering.lifetimeSeconds | quote }}
- name: OPTRUN_OPERATOR_RETRY_BACKOFF_SECONDS
  value: {{ $op.retries.backoffSeconds | quote }}
- name: OPTRUN_OPERATOR_RETRY_BACKOFF_MAX_SECONDS
  value: {{ $op.retries.backoffMaxSeconds | quote }}
- name: OPTRUN_OPERATOR_IMAGE_PULL_TIMEOUT_SECONDS
  value: {{ $op.retries.imagePullTimeoutSeconds | quote }}
- name: OPTRUN_OPERATOR_RENDEZVOUS_PORT
  value: {{ $op.rendezvous.port | quote }}
- name: OPTRUN_OPERATOR_RENDEZVOUS_TIMEOUT_SECONDS
  value: {{ $op.rendezvous.timeoutSeconds | quote }}
{{- $hook := .Values.webhook }}
- name: OPTRUN_OPERATOR_WEBHOOK
  # serve: the chart installs the configuration, the Service and the certificate (webhook-*.yaml).
  value: {{ ternary "serve" "off" (not (not $hook.enabled)) | quote }}
- name: OPTRUN_OPERATOR_WEBHOOK_PORT
  value: {{ $hook.port | quote }}
- name: OPTRUN_OPERATOR_WEBHOOK_ADDRESS
  value: "0.0.0.0"
- name: OPTRUN_OPERATOR_WEBHOOK_HOST
  value: {{ printf "%s.%s.svc" (include "optrun.suffixed" (list . "webhook")) .Release.Namespace | quote }}
- name: OPTRUN_OPERATOR_WEBHOOK_CERT_DIR
  value: /etc/optrun/webhook
- name: OPTRUN_OPERATOR_WEBHOOK_CONFIGURATION
  value: {{ include "optrun.webhookConfiguration" . | quote }}
- name: OPTRUN_OPERATOR_WEBHOOK_FAILURE_POLICY
  value: {{ $hook.failurePolicy | quote }}
{{- end }}
