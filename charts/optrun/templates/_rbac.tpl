{{/*
The operator's RBAC rules: exactly those of optrun/operator/rbac.py (a test compares the
rendered rules with that module). Each rule's why is written there.
*/}}

{{/* Rules on namespaced resources: in a Role per watched namespace, or in the ClusterRole. */}}
{{- define "optrun.rules.namespaced" -}}
- apiGroups: ["optrun.io"]
  resources: ["optimizationruns"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["optrun.io"]
  resources: ["optimizationruns/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "delete", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}

{{/* Rules on cluster-scoped resources: only when the operator watches every namespace. */}}
{{- define "optrun.rules.cluster" -}}
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
