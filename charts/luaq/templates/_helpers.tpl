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

{{/* Every object's: the release's, and what the object is (app.kubernetes.io/component). */}}
{{- define "luaq.commonLabels" -}}
helm.sh/chart: {{ include "luaq.chart" . }}
app.kubernetes.io/name: {{ include "luaq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: luaq
{{- end }}

{{/* The operator's objects. */}}
{{- define "luaq.labels" -}}
{{ include "luaq.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The CRD's. */}}
{{- define "luaq.crdLabels" -}}
{{ include "luaq.commonLabels" . }}
app.kubernetes.io/component: crds
{{- end }}

{{/* The operator's pods; the workers' are `app.kubernetes.io/name: luaq-worker`. */}}
{{- define "luaq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "luaq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
The operator's pods: its labels and podLabels, which may add labels and replace the chart's
others but never its selector's (values.schema.json refuses them).
*/}}
{{- define "luaq.podLabels" -}}
{{- $chart := include "luaq.labels" . | fromYaml }}
{{- $own := .Values.podLabels | default dict }}
{{- toYaml (merge (include "luaq.selectorLabels" . | fromYaml) (deepCopy $own) $chart) }}
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

{{/*
The luaq image: image.repository, its registry replaced by global.imageRegistry (or prefixed
with it, for a repository without one), then @image.digest or :image.tag (the appVersion when
empty). A registry is the repository's first part when it holds a dot or a colon or is
localhost, as Docker reads it: ghcr.io/luaq/luaq's is ghcr.io, luaq/luaq has none.
*/}}
{{- define "luaq.image" -}}
{{- $image := .Values.image }}
{{- $repository := $image.repository }}
{{- $registry := dig "imageRegistry" "" (.Values.global | default dict) }}
{{- if $registry }}
{{- $parts := splitList "/" $repository }}
{{- $first := first $parts }}
{{- if and (gt (len $parts) 1) (or (contains "." $first) (contains ":" $first) (eq "localhost" $first)) }}
{{- $repository = rest $parts | join "/" }}
{{- end }}
{{- $repository = printf "%s/%s" (trimSuffix "/" $registry) $repository }}
{{- end }}
{{- if $image.digest }}
{{- printf "%s@%s" $repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (default .Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/* The workers' image, the operator's --image: operator.workerImage as it is, or the luaq image. */}}
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

{{/*
A Prometheus duration (1m30s, 500ms, 2h) in milliseconds, to compare two of them.
*/}}
{{- define "luaq.milliseconds" -}}
{{- $units := dict "y" 31536000000 "w" 604800000 "d" 86400000 "h" 3600000 "m" 60000 "s" 1000 "ms" 1 }}
{{- $total := 0 }}
{{- range regexFindAll "[0-9]+(ms|[ywdhms])" (toString .) -1 }}
{{- $total = add $total (mul (regexFind "^[0-9]+" . | atoi) (get $units (regexReplaceAll "^[0-9]+" . ""))) }}
{{- end }}
{{- $total }}
{{- end }}

{{/*
What the monitors of metrics.monitor share, for one endpoint: the interval, a scrape timeout,
the targets' own labels kept, and the relabelings. `queueconsumer` (a worker target's meta
label holding its QueueConsumer's name) becomes the `queueconsumer` label, always, and the
job, unless metrics.jobLabel names a label for it.
*/}}
{{- define "luaq.endpoint" -}}
{{- $metrics := .root.Values.metrics }}
interval: {{ $metrics.interval }}
{{- with $metrics.scrapeTimeout }}
{{- if gt (include "luaq.milliseconds" . | int64) (include "luaq.milliseconds" $metrics.interval | int64) }}
{{- fail (printf "metrics.scrapeTimeout (%s) must not be longer than metrics.interval (%s): Prometheus refuses such a scrape" . $metrics.interval) }}
{{- end }}
scrapeTimeout: {{ . }}
{{- end }}
# the targets' labels win over the ones Prometheus adds: the operator's and the workers'
# `namespace` is a QueueConsumer's, not exported_namespace
honorLabels: true
{{- $relabelings := list }}
{{- with .queueconsumer }}
{{- if not $metrics.jobLabel }}
{{- $relabelings = append $relabelings (dict "sourceLabels" (list .) "regex" "(.+)" "targetLabel" "job" "action" "replace") }}
{{- end }}
{{- $relabelings = append $relabelings (dict "sourceLabels" (list .) "regex" "(.+)" "targetLabel" "queueconsumer" "action" "replace") }}
{{- end }}
{{- $relabelings = concat $relabelings ($metrics.relabelings | default list) }}
{{- with $relabelings }}
relabelings:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $metrics.metricRelabelings }}
metricRelabelings:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
