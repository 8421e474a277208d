{{/* Names ---------------------------------------------------------------------- */}}

{{- define "kvrelay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-kvrelay, or the release name when it already contains the chart name. */}}
{{- define "kvrelay.fullname" -}}
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

{{/* Name of a component's objects: (dict "root" $ "component" "router"). Component
     suffixes are at most 16 characters ("router-headless"), so the base is cut to 47. */}}
{{- define "kvrelay.componentName" -}}
{{- printf "%s-%s" (include "kvrelay.fullname" .root | trunc 47 | trimSuffix "-") .component }}
{{- end }}

{{- define "kvrelay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels ---------------------------------------------------------------------- */}}

{{- define "kvrelay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvrelay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kvrelay.labels" -}}
helm.sh/chart: {{ include "kvrelay.chart" . }}
{{ include "kvrelay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kvrelay
{{- end }}

{{/* (dict "root" $ "component" "router") */}}
{{- define "kvrelay.componentSelectorLabels" -}}
{{ include "kvrelay.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "kvrelay.componentLabels" -}}
{{ include "kvrelay.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Settings ---------------------------------------------------------------------- */}}

{{- define "kvrelay.image" -}}
{{- printf "%s:%s" (required "image.repository is required" .Values.image.repository) (required "image.tag is required" (toString (default "" .Values.image.tag))) }}
{{- end }}

{{/* The --model folder. */}}
{{- define "kvrelay.modelPath" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) (required "model.dir is required" .Values.model.dir) }}
{{- end }}

{{/* Where workers dial the routers: dns:/// makes a worker resolve the headless Service
     name again and again and keep one registry stream per router pod address. */}}
{{- define "kvrelay.routerAddress" -}}
{{- printf "dns:///%s.%s.svc.%s:%d" (include "kvrelay.componentName" (dict "root" . "component" "router-headless")) .Release.Namespace .Values.clusterDomain (int .Values.router.port) }}
{{- end }}

{{/* A scalar for a flag file: integral numbers without an exponent (values.yaml numbers
     are float64, and 268435456 would otherwise print as 2.68435456e+08). */}}
{{- define "kvrelay.scalar" -}}
{{- if or (kindIs "map" .) (kindIs "slice" .) }}
{{- fail (printf "flag values must be scalars, got %v" .) }}
{{- else if and (kindIs "float64" .) (eq . (float64 (int64 .))) }}
{{- int64 . }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/* A byte count: a number, or a string with a binary suffix ("256Mi"); (dict "value" $v
     "name" "decode.kvBytes"). */}}
{{- define "kvrelay.bytes" -}}
{{- $v := .value }}
{{- if or (kindIs "float64" $v) (kindIs "int64" $v) (kindIs "int" $v) }}
{{- int64 $v }}
{{- else if and (kindIs "string" $v) (regexMatch "^[0-9]+(Ki|Mi|Gi|Ti)?$" $v) }}
{{- $units := dict "" 1 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 }}
{{- mul (regexFind "^[0-9]+" $v | int64) (get $units (regexReplaceAll "^[0-9]+" $v "")) }}
{{- else }}
{{- fail (printf "%s: %v is not a byte count (a number, or a number with Ki, Mi, Gi or Ti)" .name $v) }}
{{- end }}
{{- end }}

{{/* A count: a number (not a string, which int64 would turn into 0). */}}
{{- define "kvrelay.count" -}}
{{- if or (kindIs "float64" .value) (kindIs "int64" .value) (kindIs "int" .value) }}
{{- int64 .value }}
{{- else }}
{{- fail (printf "%s: %v is not a number" .name .value) }}
{{- end }}
{{- end }}

{{/* A flag file: (dict "flags" $mergedFlags "reserved" $chartOwned "user" $userFlags
     "section" "router"). One --name=value a line, sorted by name. */}}
{{- define "kvrelay.flagFile" -}}
{{- $instead := dict "model" "model.mountPath and model.dir" "model_id" "model.id"
      "block_size" "kv.blockSize" "kv_dtype" "kv.dtype"
      "threads" (printf "%s.threads" .section) "drain_seconds" (printf "%s.drainSeconds" .section)
      "device" (printf "%s.device" .section)
      "kv_bytes" (printf "%s.kvBytes" .section) "kv_blocks" (printf "%s.kvBlocks" .section)
      "listen" (printf "%s.port" .section) "metrics_listen" (printf "%s.metricsPort" .section) }}
{{- range $name := .reserved }}
{{- if hasKey $.user $name }}
{{- fail (printf "%s.flags.%s: the chart sets --%s itself (%s)" $.section $name $name (get $instead $name | default "per pod") ) }}
{{- end }}
{{- end }}
{{- $lines := list }}
{{- range $name, $value := .flags }}
{{- $lines = append $lines (printf "--%s=%s" $name (include "kvrelay.scalar" $value)) }}
{{- end }}
{{- join "\n" $lines }}
{{- end }}

{{/* Grace period: explicit, or the drain time plus a margin; never below the drain. */}}
{{- define "kvrelay.gracePeriod" -}}
{{- $drain := int (ceil .drain) }}
{{- if not (empty .explicit) }}
{{- if le (int .explicit) $drain }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%v) must exceed its drain time (%d s)" .section .explicit $drain) }}
{{- end }}
{{- int .explicit }}
{{- else }}
{{- add $drain 15 }}
{{- end }}
{{- end }}

{{/* Probes on the standard gRPC health service: (dict "port" 7001 "service" ""
     "timing" $probeValues). */}}
{{/* A probe of the gRPC health service: (dict "root" $ "port" 7001 "service" "" "timing"
     $timing). kubelet's gRPC probes speak plaintext only, so with security.tls.enabled
     it is an exec probe of `kvrelay health` over TLS (mTLS: with the pod's certificate). */}}
{{- define "kvrelay.grpcProbe" -}}
{{- $t := .root.Values.security.tls }}
{{- if $t.enabled }}
exec:
  command:
    - kvrelay
    - health
    - --server=127.0.0.1:{{ int .port }}
    {{- if .service }}
    - --service={{ .service }}
    {{- end }}
    - --tls-ca=/var/run/secrets/kvrelay/tls/ca.crt
    - --tls-cert=/var/run/secrets/kvrelay/tls/tls.crt
    - --tls-key=/var/run/secrets/kvrelay/tls/tls.key
    - --tls-server-name={{ $t.serverName }}
    - --timeout-seconds={{ int (default 5 .timing.timeoutSeconds) }}
{{- else }}
grpc:
  port: {{ int .port }}
  {{- if .service }}
  service: {{ .service | quote }}
  {{- end }}
{{- end }}
{{- with .timing }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The security flags every process gets (values.security). */}}
{{- define "kvrelay.securityArgs" -}}
{{- $s := .Values.security }}
{{- if $s.tls.enabled }}
{{- $_ := required "security.tls.secretName is required with security.tls.enabled (a Secret with tls.crt, tls.key and ca.crt, e.g. cert-manager's)" $s.tls.secretName }}
{{- $_ := required "security.tls.serverName is required with security.tls.enabled (a DNS name in the certificate that every pod checks its peers against)" $s.tls.serverName }}
- --tls_cert=/var/run/secrets/kvrelay/tls/tls.crt
- --tls_key=/var/run/secrets/kvrelay/tls/tls.key
- --tls_ca=/var/run/secrets/kvrelay/tls/ca.crt
- --tls_server_name={{ $s.tls.serverName }}
{{- if $s.tls.requireClientCert }}
- --tls_require_client_cert
{{- end }}
{{- end }}
{{- if $s.clusterToken.secretName }}
- --cluster_token_file=/var/run/secrets/kvrelay/token/{{ $s.clusterToken.key }}
{{- end }}
{{- end }}

{{/* Resources plus the optional GPU and RDMA device counts: (dict "c" $componentValues). */}}
{{- define "kvrelay.resources" -}}
{{- $r := deepCopy (default (dict) .c.resources) }}
{{- $limits := deepCopy (default (dict) $r.limits) }}
{{- if gt (int .c.gpu) 0 }}
{{- $_ := set $limits "nvidia.com/gpu" (int .c.gpu) }}
{{- end }}
{{- if gt (int .c.rdma.count) 0 }}
{{- $_ := set $limits (required "rdma.resource is required when rdma.count > 0" .c.rdma.resource) (int .c.rdma.count) }}
{{- end }}
{{- if $limits }}
{{- $_ := set $r "limits" $limits }}
{{- end }}
{{- toYaml $r }}
{{- end }}

{{/* Pod annotations: config checksum (restart on change), scrape annotations, user's. */}}
{{- define "kvrelay.podAnnotations" -}}
checksum/config: {{ include (print .root.Template.BasePath "/configmap.yaml") .root | sha256sum }}
{{- if .root.Values.metrics.scrapeAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .metricsPort | int | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The model volume. */}}
{{- define "kvrelay.modelVolume" -}}
- name: model
{{- if eq .Values.model.source "demo" }}
  emptyDir:
    sizeLimit: {{ .Values.model.demo.sizeLimit }}
{{- else if eq .Values.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "model.pvc.claimName is required with model.source=pvc" .Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" }}
  hostPath:
    path: {{ required "model.hostPath.path is required with model.source=hostPath" .Values.model.hostPath.path }}
    type: {{ .Values.model.hostPath.type }}
{{- else }}
{{- fail (printf "model.source must be demo, pvc or hostPath, got %q" .Values.model.source) }}
{{- end }}
{{- end }}

{{/* The init container writing the demo model (model.source=demo only). */}}
{{- define "kvrelay.modelInitContainers" -}}
{{- if eq .Values.model.source "demo" -}}
- name: make-model
  image: {{ include "kvrelay.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: [kvrelay, make-model]
  args:
    - --out={{ include "kvrelay.modelPath" . }}
    {{- range .Values.model.demo.args }}
    - {{ . | quote }}
    {{- end }}
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: {{ .Values.model.mountPath }}
{{- end }}
{{- end }}

{{/* Volume mounts every kvrelay container has. */}}
{{- define "kvrelay.volumeMounts" -}}
- name: config
  mountPath: /etc/kvrelay
  readOnly: true
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if .Values.security.tls.enabled }}
- name: tls
  mountPath: /var/run/secrets/kvrelay/tls
  readOnly: true
{{- end }}
{{- if .Values.security.clusterToken.secretName }}
- name: cluster-token
  mountPath: /var/run/secrets/kvrelay/token
  readOnly: true
{{- end }}
{{- end }}

{{- define "kvrelay.volumes" -}}
- name: config
  configMap:
    name: {{ include "kvrelay.fullname" . }}
{{ include "kvrelay.modelVolume" . }}
- name: tmp
  emptyDir: {}
{{- if .Values.security.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.security.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- with .Values.security.clusterToken.secretName }}
- name: cluster-token
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{/* PodDisruptionBudget spec: (dict "pdb" $pdbValues). */}}
{{- define "kvrelay.pdbBudget" -}}
{{- if not (empty .pdb.minAvailable) -}}
minAvailable: {{ .pdb.minAvailable }}
{{- else -}}
maxUnavailable: {{ .pdb.maxUnavailable }}
{{- end }}
{{- end }}
