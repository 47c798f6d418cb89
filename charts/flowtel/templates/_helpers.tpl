{{- define "flowtel.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "flowtel.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "flowtel.labels" -}}
{{ include "flowtel.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "flowtel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "flowtel.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "flowtel.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- /* (list $ shard): the release's name, with -shard-<k> when there are several shards. */}}
{{- define "flowtel.shardName" -}}
{{- $root := index . 0 -}}
{{- if gt (int $root.Values.shards) 1 -}}
{{- printf "%s-shard-%d" (include "flowtel.fullname" $root | trunc 55 | trimSuffix "-") (index . 1) -}}
{{- else -}}
{{- include "flowtel.fullname" $root -}}
{{- end -}}
{{- end -}}

{{- /* (list $ shard): the label telling shards' pods apart; none with one shard, so its selector never changes. */}}
{{- define "flowtel.shardLabel" -}}
{{- if gt (int (index . 0).Values.shards) 1 -}}
flowtel.dev/operator-shard: {{ index . 1 | quote }}
{{- end -}}
{{- end -}}
