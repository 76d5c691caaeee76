{{/* The release's full name, at most 63 characters. */}}
{{- define "kubetune.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The labels the operator puts on every trainer pod (see kubetune/controller/build.py). */}}
{{- define "kubetune.trainerSelector" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/component: trainer
app.kubernetes.io/managed-by: kubetune-operator
{{- end -}}

{{/* What the operator may do with the API, in the namespaces it watches (docs/operator.md). */}}
{{- define "kubetune.namespacedRules" -}}
{{- /* create and delete: the FineTuneJobs a FineTuneSchedule stamps, and removes past its
       history limits (or replaces, with concurrencyPolicy Replace). */}}
- apiGroups: ["kubetune.dev"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: ["kubetune.dev"]
  resources: ["finetuneschedules"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["kubetune.dev"]
  resources: ["finetunejobs/status", "finetuneschedules/status"]
  verbs: ["patch"]
{{- /* blockOwnerDeletion on the children needs this where OwnerReferencesPermissionEnforcement
       is on (OpenShift). */}}
- apiGroups: ["kubetune.dev"]
  resources: ["finetunejobs/finalizers", "finetuneschedules/finalizers"]
  verbs: ["update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "delete"]
{{- /* The headless Service through which the pods of a distributed run meet. */}}
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if .Values.readStorageSecrets }}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}
{{- end -}}

{{/* An image reference from {repository, tag, digest}: repository@digest when a digest is set,
else repository:tag, the tag defaulting to the chart's appVersion. Called with (list VALUES APPVERSION). */}}
{{- define "kubetune.image" -}}
{{- $image := index . 0 -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository ($image.tag | default (index . 1)) -}}
{{- end -}}
{{- end -}}

{{/* The admission policies' namespaces: those the operator watches, when it watches a list. */}}
{{- define "kubetune.admissionNamespaces" -}}
{{- if .Values.watchNamespaces }}
namespaceSelector:
  matchExpressions:
    - key: kubernetes.io/metadata.name
      operator: In
      values: {{ toJson .Values.watchNamespaces }}
{{- end }}
{{- end }}
