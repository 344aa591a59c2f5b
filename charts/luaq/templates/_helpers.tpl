{{/* The chart's name, or nameOverride. */}}
{{- define "luaq.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name, for its objects: at most 63 characters (DNS names), the release name
alone when it already holds the chart's name.
*/}}
{{- define "luaq.fullname" -}}
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

{{- define "luaq.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "luaq.labels" -}}
helm.sh/chart: {{ include "luaq.chart" . }}
{{ include "luaq.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: luaq
{{- end }}

{{/* The operator's pods; the workers' are `app.kubernetes.io/name: luaq-worker`. */}}
{{- define "luaq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "luaq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* What the operator renders on its workers' pods and Services (luaq.operator.render). */}}
{{- define "luaq.workerSelectorLabels" -}}
app.kubernetes.io/name: luaq-worker
app.kubernetes.io/managed-by: luaq-operator
{{- end }}

{{- define "luaq.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "luaq.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name: the ServiceAccount to use when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "luaq.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "luaq.workerImage" -}}
{{- default (include "luaq.image" .) .Values.operator.workerImage }}
{{- end }}

{{/* Where the workers run: a namespaceSelector for their monitors. */}}
{{- define "luaq.workerNamespaces" -}}
{{- if .Values.operator.watchNamespaces -}}
matchNames:
  {{- toYaml .Values.operator.watchNamespaces | nindent 2 }}
{{- else -}}
any: true
{{- end }}
{{- end }}

{{/*
A quantity value as the operator's flag takes it: a string as it is, a whole number (from
`--set`, or unquoted in a values file) without the exponent Go gives a large float
(1073741824, not 1.073741824e+09) unless it is too large for an integer (1e+20 stays).
*/}}
{{- define "luaq.quantity" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) (lt . 1e15) }}
{{- . | int64 }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}
