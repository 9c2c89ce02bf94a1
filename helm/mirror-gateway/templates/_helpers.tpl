{{/* Names and labels. */}}
{{- define "mirror-gateway.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mirror-gateway.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "mirror-gateway.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "mirror-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "mirror-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mirror-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mirror-gateway.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "mirror-gateway.adminSecretName" -}}
{{- .Values.adminToken.existingSecret | default (printf "%s-admin" (include "mirror-gateway.fullname" .)) }}
{{- end }}

{{- define "mirror-gateway.geoipClaimName" -}}
{{- .Values.geoip.existingClaim | default (printf "%s-geoip" (include "mirror-gateway.fullname" .)) }}
{{- end }}

{{- define "mirror-gateway.nodeAgentClaimName" -}}
{{- .Values.nodeAgent.existingClaim | default (printf "%s-node-data" (include "mirror-gateway.fullname" .)) }}
{{- end }}

{{/* Where things are mounted in the gateway's pods. */}}
{{- define "mirror-gateway.configDir" -}}/etc/mirror-gateway{{- end }}
{{- define "mirror-gateway.geoipDir" -}}/var/lib/mirror-gateway/geoip{{- end }}
{{- define "mirror-gateway.redisCaDir" -}}/etc/mirror-gateway/redis-ca{{- end }}
{{- define "mirror-gateway.httpPort" -}}8080{{- end }}

{{/*
The gateway config: the operator's `config` with what the chart owns laid over it (listener,
metrics listener, GeoIP paths, Redis). The admin token and Redis passwords come from Secrets
through the environment, never from here.
*/}}
{{- define "mirror-gateway.gatewayConfig" -}}
{{- $config := deepCopy (.Values.config | default dict) -}}
{{- $server := mergeOverwrite (get $config "server" | default dict) (dict "host" "0.0.0.0" "port" (include "mirror-gateway.httpPort" . | int) "drain_s" .Values.drainSeconds) -}}
{{- $_ := set $config "server" $server -}}
{{- if .Values.metrics.enabled -}}
{{- $_ := set $config "metrics" (dict "enabled" true "host" "0.0.0.0" "port" (.Values.metrics.port | int)) -}}
{{- else -}}
{{- $_ := set $config "metrics" (dict "enabled" false) -}}
{{- end -}}
{{- if .Values.geoip.enabled -}}
{{- $geoip := get $config "geoip" | default dict -}}
{{- $_ := set $geoip "city_db" (printf "%s/%s" (include "mirror-gateway.geoipDir" .) .Values.geoip.cityFile) -}}
{{- if .Values.geoip.asnFile -}}
{{- $_ := set $geoip "asn_db" (printf "%s/%s" (include "mirror-gateway.geoipDir" .) .Values.geoip.asnFile) -}}
{{- end -}}
{{- $_ := set $config "geoip" $geoip -}}
{{- end -}}
{{- $redis := dict "key_prefix" .Values.redis.keyPrefix -}}
{{- if .Values.redis.url -}}
{{- $_ := set $redis "url" .Values.redis.url -}}
{{- else if .Values.redis.sentinel.enabled -}}
{{- $s := .Values.redis.sentinel -}}
{{- $sentinel := dict "master_name" $s.masterName "addresses" $s.addresses "db" ($s.db | int) "tls" $s.tls -}}
{{- if $s.tlsCaSecret -}}
{{- $_ := set $sentinel "tls_ca_file" (printf "%s/ca.crt" (include "mirror-gateway.redisCaDir" .)) -}}
{{- end -}}
{{- $_ := set $redis "sentinel" $sentinel -}}
{{- end -}}
{{- $_ := set $config "redis" $redis -}}
{{- toYaml $config -}}
{{- end }}

{{/* The node agent's node.yaml: the operator's nodeAgent.config plus root and token_file. */}}
{{- define "mirror-gateway.nodeAgentConfig" -}}
{{- $config := deepCopy (.Values.nodeAgent.config | default dict) -}}
{{- $_ := set $config "root" .Values.nodeAgent.root -}}
{{- if .Values.nodeAgent.tokenSecret.name -}}
{{- $_ := set $config "token_file" (printf "/etc/mirror-node/token/%s" .Values.nodeAgent.tokenSecret.key) -}}
{{- end -}}
{{- toYaml $config -}}
{{- end }}

{{- define "mirror-gateway.nodeAgentImage" -}}
{{- $repo := .Values.nodeAgent.image.repository | default .Values.image.repository -}}
{{- $tag := .Values.nodeAgent.image.tag | default (.Values.image.tag | default .Chart.AppVersion) -}}
{{- printf "%s:%s" $repo $tag }}
{{- end }}
