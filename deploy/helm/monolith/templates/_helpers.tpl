{{/* Names, labels and the pod pieces every workload shares. */}}

{{- define "monolith.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's base name: <release>-<chart>, or just <release> when it already contains the chart's name. */}}
{{- define "monolith.fullname" -}}
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

{{/* A component's object name: (dict "root" $ "component" "serving"). Kept under 52 characters so StatefulSet pod names with a controller-revision hash stay under 63. */}}
{{- define "monolith.componentName" -}}
{{- printf "%s-%s" (include "monolith.fullname" .root) .component | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{- define "monolith.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: only stable ones (matchLabels are immutable on StatefulSets and Deployments). */}}
{{- define "monolith.selectorLabels" -}}
app.kubernetes.io/name: {{ include "monolith.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Every object's labels, per Helm's guide. */}}
{{- define "monolith.labels" -}}
{{ include "monolith.selectorLabels" . }}
helm.sh/chart: {{ include "monolith.chart" .root }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: monolith
{{- end -}}

{{/* An object's metadata block: name, namespace and labels. (dict "root" $ "component" "x" "name" "optional-override") */}}
{{- define "monolith.metadata" -}}
name: {{ default (include "monolith.componentName" .) .name }}
namespace: {{ .root.Release.Namespace }}
labels:
  {{- include "monolith.labels" . | nindent 2 }}
{{- end -}}

{{- define "monolith.image" -}}
{{- $image := .Values.image -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Headless Service names (each StatefulSet's serviceName). */}}
{{- define "monolith.headless" -}}
{{- printf "%s-headless" (include "monolith.componentName" .) -}}
{{- end -}}

{{/* host:port of pod <index> of a StatefulSet behind its headless Service: (dict "root" $ "component" "x" "index" 0 "port" 1) */}}
{{- define "monolith.podAddress" -}}
{{- printf "%s-%d.%s.%s.svc:%d" (include "monolith.componentName" .) (int .index) (include "monolith.headless" .) .root.Release.Namespace (int .port) -}}
{{- end -}}

{{/* Comma-separated addresses of every shard of one embedding-PS role, in shard order. */}}
{{- define "monolith.embeddingPsAddresses" -}}
{{- $root := .root -}}
{{- $component := .component -}}
{{- $addresses := list -}}
{{- range $i := until (int $root.Values.embeddingPs.shards) -}}
{{- $addresses = append $addresses (include "monolith.podAddress" (dict "root" $root "component" $component "index" $i "port" $root.Values.embeddingPs.port)) -}}
{{- end -}}
{{- join "," $addresses -}}
{{- end -}}

{{- define "monolith.densePsAddress" -}}
{{- include "monolith.podAddress" (dict "root" . "component" "dense-ps" "index" 0 "port" .Values.densePs.port) -}}
{{- end -}}

{{/* The NATS URL(s) every streams client dials: the external one, or every pod of the chart's cluster. */}}
{{- define "monolith.natsUrl" -}}
{{- if .Values.nats.external.url -}}
{{- .Values.nats.external.url -}}
{{- else -}}
{{- $root := . -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.nats.replicas) -}}
{{- $urls = append $urls (printf "nats://%s" (include "monolith.podAddress" (dict "root" $root "component" "nats" "index" $i "port" 4222))) -}}
{{- end -}}
{{- join "," $urls -}}
{{- end -}}
{{- end -}}

{{/* The flags every role that touches the streams takes. */}}
{{- define "monolith.streamsArgs" -}}
- --nats
- {{ include "monolith.natsUrl" . | quote }}
- --partitions
- {{ .Values.streams.partitions | quote }}
- --duplicate-window
- {{ .Values.streams.duplicateWindow | quote }}
- --stream-replicas
- {{ include "monolith.streamReplicas" . | quote }}
{{- if .Values.nats.tls.enabled }}
- --nats-tls-ca
- /etc/nats-tls/ca.crt
{{- end }}
{{- end -}}

{{/* Copies of each stream: streams.replicas, or (0) the chart's NATS cluster size, 1 with an external NATS. */}}
{{- define "monolith.streamReplicas" -}}
{{- if .Values.streams.replicas -}}
{{- .Values.streams.replicas -}}
{{- else if .Values.nats.external.url -}}
1
{{- else -}}
{{- .Values.nats.replicas -}}
{{- end -}}
{{- end -}}

{{/* A role's server flags: port, metrics port and message limit. (dict "port" 1 "metricsPort" 2 "root" $) */}}
{{- define "monolith.serverArgs" -}}
- --port
- {{ .port | quote }}
- --metrics-port
- {{ .metricsPort | quote }}
- --max-message-mb
- {{ .root.Values.maxMessageMb | quote }}
{{- end -}}

{{/* The shard or replica index of a StatefulSet pod, from the label Kubernetes sets (1.28+); args use it as $(POD_INDEX). */}}
{{- define "monolith.podIndexEnv" -}}
- name: POD_INDEX
  valueFrom:
    fieldRef:
      fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
{{- end -}}

{{/* Pod-level settings every workload shares. */}}
{{- define "monolith.podSpecCommon" -}}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile:
    type: RuntimeDefault
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Container-level settings every container shares: non-root, read-only root, no capabilities. */}}
{{- define "monolith.containerCommon" -}}
image: {{ include "monolith.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
securityContext:
  allowPrivilegeEscalation: false
  privileged: false
  readOnlyRootFilesystem: true
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  capabilities:
    drop: [ALL]
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* Volumes every role pod mounts: the model config and a scratch /tmp (numba's kernel cache, matplotlib). */}}
{{- define "monolith.roleVolumes" -}}
- name: model
  configMap:
    name: {{ include "monolith.componentName" (dict "root" . "component" "model") }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- include "monolith.natsTlsVolume" . }}
{{- end -}}

{{/* NATS's TLS Secret (nats.tls): its ca.crt for every client, its tls.crt/tls.key for the servers. */}}
{{- define "monolith.natsTlsVolume" -}}
{{- if .Values.nats.tls.enabled }}
- name: nats-tls
  secret:
    secretName: {{ .Values.nats.tls.secretName }}
{{- end }}
{{- end -}}

{{- define "monolith.natsTlsVolumeMount" -}}
{{- if .Values.nats.tls.enabled }}
- name: nats-tls
  mountPath: /etc/nats-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "monolith.roleVolumeMounts" -}}
- name: model
  mountPath: /etc/monolith
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- include "monolith.natsTlsVolumeMount" . }}
{{- end -}}

{{/* A native gRPC probe on the whole server's health ("" service), which reports SERVING only once the role is ready. */}}
{{- define "monolith.grpcProbes" -}}
startupProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 5
  failureThreshold: {{ .startupFailureThreshold | default 60 }}
readinessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 10
  failureThreshold: 6
{{- end -}}

{{/* TLS of a role product backends call (serving, the joiner), from its `tls` values
({enabled, secretName}): the check, the flags, the probes (Kubernetes' gRPC probe speaks
plaintext only: with TLS on, the port is probed for a listener and readiness comes from /metrics
answering), the mount and the Secret volume. Each takes a dict with "tls" (the values); the
check also "component", the probes "port" and "metricsPort", the rest "indent" (they write
nothing at all when TLS is off). */}}
{{- define "monolith.tlsCheck" -}}
{{- if and .tls.enabled (not .tls.secretName) -}}
{{- fail (printf "%s.tls.enabled needs %s.tls.secretName (a kubernetes.io/tls Secret)" .component .component) -}}
{{- end -}}
{{- end -}}

{{- define "monolith.tlsArgs" -}}
{{- if .tls.enabled -}}
{{- "- --tls-cert\n- /etc/monolith-tls/tls.crt\n- --tls-key\n- /etc/monolith-tls/tls.key" | nindent (int .indent) -}}
{{- end -}}
{{- end -}}

{{- define "monolith.tlsVolumeMount" -}}
{{- if .tls.enabled -}}
{{- "- name: tls\n  mountPath: /etc/monolith-tls\n  readOnly: true" | nindent (int .indent) -}}
{{- end -}}
{{- end -}}

{{- define "monolith.tlsVolume" -}}
{{- if .tls.enabled -}}
{{- printf "- name: tls\n  secret:\n    secretName: %s" .tls.secretName | nindent (int .indent) -}}
{{- end -}}
{{- end -}}

{{- define "monolith.probes" -}}
{{- if .tls.enabled -}}
startupProbe:
  tcpSocket:
    port: {{ .port }}
  periodSeconds: 5
  failureThreshold: 60
readinessProbe:
  httpGet:
    path: /metrics
    port: {{ .metricsPort }}
  periodSeconds: 5
livenessProbe:
  tcpSocket:
    port: {{ .port }}
  periodSeconds: 10
  failureThreshold: 6
{{- else -}}
{{- include "monolith.grpcProbes" (dict "port" .port) }}
{{- end -}}
{{- end -}}

{{/* A workload's pod annotations: a config change rolls its pods. */}}
{{- define "monolith.podAnnotations" -}}
checksum/model: {{ default (.Files.Get "files/model.yaml") .Values.model.config | sha256sum }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* A StatefulSet's headless Service (its serviceName): one DNS name per pod, published before
pods are ready so peers can dial a shard that is still loading. (dict "root" $ "component" "x" "ports" (list (dict "name" "grpc" "port" 1))) */}}
{{- define "monolith.headlessService" -}}
apiVersion: v1
kind: Service
metadata:
  {{- include "monolith.metadata" (dict "root" .root "component" .component "name" (include "monolith.headless" .)) | nindent 2 }}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  selector:
    {{- include "monolith.selectorLabels" . | nindent 4 }}
  ports:
    {{- range .ports }}
    - name: {{ .name }}
      port: {{ .port }}
      targetPort: {{ .name }}
      {{- if eq .name "grpc" }}
      appProtocol: grpc
      {{- end }}
    {{- end }}
{{- end -}}

{{/* The components this release runs (those with pods), in start order. */}}
{{- define "monolith.components" -}}
{{- $components := list "embedding-ps-training" "embedding-ps-serving" "dense-ps" "joiner" "trainer" "serving" -}}
{{- if not .Values.nats.external.url -}}{{- $components = prepend $components "nats" -}}{{- end -}}
{{- if .Values.controller.enabled -}}{{- $components = append $components "controller" -}}{{- end -}}
{{- toJson $components -}}
{{- end -}}

{{/* Probes of a parameter server that may start awaiting a restore (--restore-required, with the
controller): alive while its /metrics answers, ready only once it reports SERVING (restored).
Without the controller it is SERVING at once and the plain gRPC probes apply.
(dict "root" $ "port" 1 "metricsPort" 2 "startupFailureThreshold" 60) */}}
{{- define "monolith.stateProbes" -}}
{{- if .root.Values.controller.enabled -}}
startupProbe:
  httpGet:
    path: /metrics
    port: {{ .metricsPort }}
  periodSeconds: 5
  failureThreshold: {{ .startupFailureThreshold | default 60 }}
readinessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  httpGet:
    path: /metrics
    port: {{ .metricsPort }}
  periodSeconds: 10
  failureThreshold: 6
{{- else -}}
{{ include "monolith.grpcProbes" . }}
{{- end -}}
{{- end -}}
