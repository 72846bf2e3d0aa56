{{/*
The operator's RBAC rules: exactly optrun/operator/rbac.py RULES, where each rule's why is
written (a test compares the rendered rules with that module). The same rules serve the
ClusterRole (every namespace) and each namespace's Role; in a Role the cluster-scoped
clusterkopfpeerings grant nothing.
*/}}
{{- define "optrun.rules" -}}
- apiGroups: ["optrun.io"]
  resources: ["optimizationruns"]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: ["optrun.io"]
  resources: ["optimizationruns/status"]
  verbs: ["patch"]
- apiGroups: ["optrun.io"]
  resources: ["optimizationruns/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings", "kopfpeerings"]
  verbs: ["list", "watch", "patch"]
{{- end }}
