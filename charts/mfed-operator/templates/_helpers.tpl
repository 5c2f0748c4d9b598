{{/*
Template helpers, all namespaced under "mfed-operator." so a parent chart's helpers cannot clash.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "mfed-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The name prefix of every resource: fullnameOverride, or <release>-<name> unless the release already contains the name. */}}
{{- define "mfed-operator.fullname" -}}
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

{{/* name-version for the helm.sh/chart label. */}}
{{- define "mfed-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the operator Pod (stable across upgrades: never add to them). */}}
{{- define "mfed-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mfed-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The standard labels of every resource. */}}
{{- define "mfed-operator.labels" -}}
helm.sh/chart: {{ include "mfed-operator.chart" . }}
{{ include "mfed-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: mfed
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "mfed-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mfed-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
An image reference from {image, global, defaultTag}: [registry/]repository[:tag][@digest].
global.imageRegistry wins over image.registry (one switch for a private mirror).
*/}}
{{- define "mfed-operator.image" -}}
{{- $registry := default .image.registry .global.imageRegistry -}}
{{- $ref := .image.repository -}}
{{- if $registry -}}
{{- $ref = printf "%s/%s" (trimSuffix "/" $registry) $ref -}}
{{- end -}}
{{- $tag := default .defaultTag .image.tag -}}
{{- if $tag -}}
{{- $ref = printf "%s:%s" $ref $tag -}}
{{- end -}}
{{- if .image.digest -}}
{{- $ref = printf "%s@%s" $ref .image.digest -}}
{{- end -}}
{{- $ref -}}
{{- end -}}

{{/* The operator image reference. */}}
{{- define "mfed-operator.operatorImage" -}}
{{- include "mfed-operator.image" (dict "image" .Values.image "global" .Values.global "defaultTag" .Chart.AppVersion) -}}
{{- end -}}

{{/* The default trainer image reference. */}}
{{- define "mfed-operator.trainerImage" -}}
{{- include "mfed-operator.image" (dict "image" .Values.trainer.image "global" .Values.global "defaultTag" .Chart.AppVersion) -}}
{{- end -}}

{{/*
The operator's RBAC rules: exactly the API calls it makes (docs/operator-contract.md), shared by the
ClusterRole (cluster-wide) and the per-namespace Roles. tests/chart/test_rbac.py proves, from the
API requests of an end-to-end federation, that each call is granted and each verb here is used.
*/}}
{{- define "mfed-operator.rules" -}}
# Watch rounds; read one fresh before each reconciliation (get); kopf's finalizer and progress
# annotations (patch); the next round of a chain (create).
- apiGroups: ["mfed.dev"]
  resources: ["federationrounds"]
  verbs: ["get", "list", "watch", "patch", "create"]
- apiGroups: ["mfed.dev"]
  resources: ["federationrounds/status"]
  verbs: ["patch"]
# Jobs and chained rounds are owned by a round with blockOwnerDeletion: the API server's
# OwnerReferencesPermissionEnforcement admission checks `update` on the owner's finalizers.
- apiGroups: ["mfed.dev"]
  resources: ["federationrounds/finalizers"]
  verbs: ["update"]
# Watch SiteTasks; kopf's progress annotations (patch).
- apiGroups: ["mfed.dev"]
  resources: ["sitetasks"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["mfed.dev"]
  resources: ["sitetasks/status"]
  verbs: ["patch"]
# Site and init Jobs: watched, created, read back on a name clash, deleted when they straggle.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
{{- $secrets := include "mfed-operator.secretNames" . | fromJsonArray }}
{{- if $secrets }}
# The rounds' S3 credentials Secrets (their keys), by name only (rbac.secretNames): never every
# Secret of a namespace, let alone of the cluster.
- apiGroups: [""]
  resources: ["secrets"]
  resourceNames: {{ $secrets | toJson }}
  verbs: ["get"]
{{- else if .Values.watchNamespaces }}
# The rounds' S3 credentials Secret (its keys), any name, in the served namespaces only.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}
# The optional S3 CA bundle (spec.storage.caBundle).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get"]
# One Event per phase transition.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}


{{- /* The Secret names the operator may read: rbac.secretNames plus the default credentials
       Secret (trainer.s3.credentialsSecret), sorted and unique, as a JSON list. */}}
{{- define "mfed-operator.secretNames" -}}
{{- $names := .Values.rbac.secretNames | default list -}}
{{- with .Values.trainer.s3.credentialsSecret }}{{ $names = append $names . }}{{ end -}}
{{- $names | uniq | sortAlpha | toJson -}}
{{- end -}}
