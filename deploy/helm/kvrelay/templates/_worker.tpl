{{/* A worker Deployment: (dict "root" $ "role" "prefill"|"decode"). */}}
{{- define "kvrelay.worker.deployment" -}}
{{- $root := .root }}
{{- $role := .role }}
{{- $v := $root.Values }}
{{- $c := index $v $role }}
{{- $component := dict "root" $root "component" $role }}
{{- $diskTier := gt (include "kvrelay.bytes" (dict "value" $c.kvTiers.disk.bytes "name" (printf "%s.kvTiers.disk.bytes" $role)) | int64) 0 }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "kvrelay.componentName" $component }}
  labels:
    {{- include "kvrelay.componentLabels" $component | nindent 4 }}
spec:
  replicas: {{ int $c.replicas }}
  {{- with $c.strategy }}
  strategy:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "kvrelay.componentSelectorLabels" $component | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "kvrelay.componentSelectorLabels" $component | nindent 8 }}
        {{- with $c.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        {{- include "kvrelay.podAnnotations" (dict "root" $root "metricsPort" $c.metricsPort "extra" $c.podAnnotations) | nindent 8 }}
    spec:
      automountServiceAccountToken: false
      {{- with $v.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $c.runtimeClassName }}
      runtimeClassName: {{ . }}
      {{- end }}
      securityContext:
        {{- toYaml $v.podSecurityContext | nindent 8 }}
      # Above --drain_seconds: running work finishes before SIGKILL.
      terminationGracePeriodSeconds: {{ include "kvrelay.gracePeriod" (dict "drain" $c.drainSeconds "explicit" $c.terminationGracePeriodSeconds "section" $role) }}
      {{- with (include "kvrelay.modelInitContainers" $root) }}
      initContainers:
        {{- . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ $role }}
          image: {{ include "kvrelay.image" $root }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          command: [kvrelay-{{ $role }}]
          args:
            - --flagfile=/etc/kvrelay/{{ $role }}.flags
            - --listen=0.0.0.0:{{ int $c.port }}
            - --metrics_listen=0.0.0.0:{{ int $c.metricsPort }}
            - --advertise_host=$(POD_IP)
            - --worker_id=$(POD_NAME)
            - --router={{ include "kvrelay.routerAddress" $root }}
            {{- include "kvrelay.securityArgs" $root | nindent 12 }}
            {{- range $c.extraArgs }}
            - {{ . | quote }}
            {{- end }}
          env:
            - name: POD_IP
              valueFrom:
                fieldRef:
                  fieldPath: status.podIP
            - name: POD_NAME
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
            {{- range $name, $value := $v.ucx.env }}
            - name: {{ $name }}
              value: {{ include "kvrelay.scalar" $value | quote }}
            {{- end }}
            {{- with $c.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - name: grpc
              containerPort: {{ int $c.port }}
              protocol: TCP
            - name: metrics
              containerPort: {{ int $c.metricsPort }}
              protocol: TCP
          # The server listens once the model is loaded and the KV pool allocated.
          startupProbe:
            {{- include "kvrelay.grpcProbe" (dict "root" $root "port" $c.port "service" "" "timing" $c.probes.startup) | nindent 12 }}
          readinessProbe:
            {{- include "kvrelay.grpcProbe" (dict "root" $root "port" $c.port "service" "" "timing" $c.probes.readiness) | nindent 12 }}
          livenessProbe:
            {{- include "kvrelay.grpcProbe" (dict "root" $root "port" $c.port "service" "" "timing" $c.probes.liveness) | nindent 12 }}
          resources:
            {{- include "kvrelay.resources" (dict "c" $c) | nindent 12 }}
          securityContext:
            {{- toYaml (default $v.containerSecurityContext $c.securityContext) | nindent 12 }}
          volumeMounts:
            {{- include "kvrelay.volumeMounts" $root | nindent 12 }}
            {{- if $diskTier }}
            - name: kv-tier
              mountPath: /var/lib/kvrelay/kv-tier
            {{- end }}
      volumes:
        {{- include "kvrelay.volumes" $root | nindent 8 }}
        {{- if $diskTier }}
        # The disk KV tier's block files (--kv_disk_dir).
        - name: kv-tier
          {{- if $c.kvTiers.disk.existingClaim }}
          persistentVolumeClaim:
            claimName: {{ $c.kvTiers.disk.existingClaim }}
          {{- else }}
          emptyDir: {}
          {{- end }}
        {{- end }}
      {{- with $c.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $c.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $c.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $c.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
