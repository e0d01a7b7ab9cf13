{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "kvcache-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of every object: release-chart unless the release name already contains it. */}}
{{- define "kvcache-operator.fullname" -}}
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

{{- define "kvcache-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kvcache-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvcache-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kvcache-operator.labels" -}}
helm.sh/chart: {{ include "kvcache-operator.chart" . }}
{{ include "kvcache-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kvcache-operator
{{- end }}

{{- define "kvcache-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kvcache-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kvcache-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "kvcache-operator.webhookService" -}}
{{- printf "%s-webhook" (include "kvcache-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The ValidatingWebhookConfiguration: managed by the operator, or rendered for cert-manager. */}}
{{- define "kvcache-operator.webhookConfiguration" -}}
{{- printf "%s.kvcache.dev" (include "kvcache-operator.fullname" .) }}
{{- end }}

{{- define "kvcache-operator.peeringName" -}}
{{- default (include "kvcache-operator.fullname" .) .Values.ha.peeringName }}
{{- end }}

{{/*
RBAC rules from files/rbac-rules.yaml (generated from kvcache_operator/rbac.py), selected the way
rbac.rules_for() selects them ("webhook" rules: the operator manages its webhook configuration). Arguments: root, namespaced (watchNamespaces set), scope
("cluster": rules for the ClusterRole, "namespaced": rules for each Role).
*/}}
{{- define "kvcache-operator.rbacRules" -}}
{{- $root := .root }}
{{- $namespaced := .namespaced }}
{{- $table := $root.Files.Get "files/rbac-rules.yaml" | fromYaml }}
{{- range $table.rules }}
{{- $selected := eq .when "always" }}
{{- if and (eq .when "peering") $root.Values.ha.enabled }}
{{- $selected = eq (eq .resource "kopfpeerings") $namespaced }}
{{- end }}
{{- if eq .when "webhook" }}
{{- $selected = and $root.Values.webhook.enabled (not $root.Values.webhook.certManager.enabled) }}
{{- end }}
{{- $wanted := or (not $namespaced) (eq .scope $.scope) }}
{{- if and $selected $wanted }}
- apiGroups: [{{ .apiGroup | quote }}]
  resources: [{{ .resource | quote }}]
  verbs: [{{ range $i, $v := .verbs }}{{ if $i }}, {{ end }}{{ $v | quote }}{{ end }}]
{{- end }}
{{- end }}
{{- end }}
