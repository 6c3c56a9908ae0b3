{{/* ---------------------------------------------------------------------------------------------------
Names and labels (the standard app.kubernetes.io conventions).
--------------------------------------------------------------------------------------------------- */}}

{{- define "qwen2-cluster.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped name. 52 characters at most: suffixes such as "-ray-head" and a StatefulSet pod's
ordinal and controller-revision label must still fit in 63. */}}
{{- define "qwen2-cluster.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "qwen2-cluster.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "qwen2-cluster.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qwen2-cluster.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "qwen2-cluster.labels" -}}
helm.sh/chart: {{ include "qwen2-cluster.chart" . }}
{{ include "qwen2-cluster.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: qwen2-cluster
{{- end }}

{{/* Selector labels of one component (head | worker). Call with (dict "ctx" $ "component" "head"). */}}
{{- define "qwen2-cluster.componentSelectorLabels" -}}
{{ include "qwen2-cluster.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "qwen2-cluster.componentLabels" -}}
{{ include "qwen2-cluster.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "qwen2-cluster.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "qwen2-cluster.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "qwen2-cluster.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "qwen2-cluster.rayHeadService" -}}
{{- printf "%s-ray-head" (include "qwen2-cluster.fullname" .) }}
{{- end }}

{{/* host:port of the Ray GCS the workers join. */}}
{{- define "qwen2-cluster.rayHeadAddress" -}}
{{- printf "%s.%s.svc.%s:%d" (include "qwen2-cluster.rayHeadService" .) .Release.Namespace .Values.clusterDomain (int .Values.ray.ports.gcs) }}
{{- end }}

{{- define "qwen2-cluster.grpcServiceHost" -}}
{{- printf "%s.%s.svc.%s" (include "qwen2-cluster.fullname" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------------------
The layout: checks the schema cannot express, and the worker count.
--------------------------------------------------------------------------------------------------- */}}

{{- define "qwen2-cluster.validate" -}}
{{- $tp := int .Values.tensorParallelSize }}
{{- $pp := int .Values.pipelineParallelSize }}
{{- $g := int .Values.gpusPerNode }}
{{- if gt $tp $g }}
{{- fail (printf "tensorParallelSize=%d > gpusPerNode=%d: a tensor-parallel group (one pipeline stage) must sit on one node" $tp $g) }}
{{- end }}
{{- if ne (mod $g $tp) 0 }}
{{- fail (printf "gpusPerNode=%d is not a multiple of tensorParallelSize=%d: a node would hold part of a stage and leave GPUs idle" $g $tp) }}
{{- end }}
{{- if ne (mod (mul $tp $pp) $g) 0 }}
{{- fail (printf "tensorParallelSize x pipelineParallelSize = %d is not a multiple of gpusPerNode=%d: the last worker would hold idle GPUs" (mul $tp $pp) $g) }}
{{- end }}
{{- if and (eq .Values.model.source "existingClaim") (not .Values.model.existingClaim) }}
{{- fail "model.source=existingClaim needs model.existingClaim" }}
{{- end }}
{{- if and (eq .Values.model.source "hostPath") (not .Values.model.hostPath) }}
{{- fail "model.source=hostPath needs model.hostPath" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) }}
{{- fail "tls.enabled needs tls.secretName (a kubernetes.io/tls Secret)" }}
{{- end }}
{{- if and .Values.tls.clientCA.enabled (not .Values.tls.enabled) }}
{{- fail "tls.clientCA.enabled needs tls.enabled" }}
{{- end }}
{{- if .Values.serve.http.enabled }}
{{- $http := int .Values.serve.http.port }}
{{- $rp := .Values.ray.ports }}
{{- $taken := dict "serve.port" .Values.serve.port "serve.metricsPort" .Values.serve.metricsPort "ray.ports.gcs" $rp.gcs "ray.ports.client" $rp.client "ray.ports.dashboard" $rp.dashboard "ray.ports.nodeManager" $rp.nodeManager "ray.ports.objectManager" $rp.objectManager "ray.ports.runtimeEnvAgent" $rp.runtimeEnvAgent "ray.ports.dashboardAgentGrpc" $rp.dashboardAgentGrpc "ray.ports.dashboardAgentListen" $rp.dashboardAgentListen "ray.ports.metricsExport" $rp.metricsExport }}
{{- range $k, $v := $taken }}
{{- if eq (int $v) $http }}
{{- fail (printf "serve.http.port=%d is also %s: the router's HTTP API needs a port of its own" $http $k) }}
{{- end }}
{{- end }}
{{- if and (ge $http (int $rp.minWorker)) (le $http (int $rp.maxWorker)) }}
{{- fail (printf "serve.http.port=%d is in Ray's worker port range %d-%d" $http (int $rp.minWorker) (int $rp.maxWorker)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Worker pods: TP x PP / gpusPerNode. */}}
{{- define "qwen2-cluster.workerReplicas" -}}
{{- include "qwen2-cluster.validate" . }}
{{- div (mul (int .Values.tensorParallelSize) (int .Values.pipelineParallelSize)) (int .Values.gpusPerNode) }}
{{- end }}

{{/* Ray CPUs per worker: its ranks' CPU bundles (gpusPerNode x cpusPerRank), rounded up. */}}
{{- define "qwen2-cluster.workerRayCpus" -}}
{{- $need := mulf (float64 .Values.gpusPerNode) (float64 .Values.serve.cpusPerRank) }}
{{- int (ceil $need) }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------------------
Model volume.
--------------------------------------------------------------------------------------------------- */}}

{{- define "qwen2-cluster.modelClaimName" -}}
{{- if eq .Values.model.source "existingClaim" }}
{{- .Values.model.existingClaim }}
{{- else }}
{{- printf "%s-model" (include "qwen2-cluster.fullname" .) }}
{{- end }}
{{- end }}

{{- define "qwen2-cluster.modelPath" -}}
{{- $root := trimSuffix "/" .Values.model.mountPath }}
{{- if .Values.model.subdir }}
{{- printf "%s/%s" $root (trimAll "/" .Values.model.subdir) }}
{{- else }}
{{- $root }}
{{- end }}
{{- end }}

{{- define "qwen2-cluster.modelVolume" -}}
- name: model
{{- if eq .Values.model.source "hostPath" }}
  hostPath:
    path: {{ .Values.model.hostPath }}
    type: Directory
{{- else }}
  persistentVolumeClaim:
    claimName: {{ include "qwen2-cluster.modelClaimName" . }}
    readOnly: true
{{- end }}
{{- end }}

{{- define "qwen2-cluster.modelVolumeMount" -}}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}

{{/* Volumes every Ray pod has: the model, /dev/shm, /tmp. Call with (dict "ctx" $ "shmSize" ...). */}}
{{- define "qwen2-cluster.commonVolumes" -}}
{{ include "qwen2-cluster.modelVolume" .ctx }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .ctx.Values.tmpSizeLimit }}
{{- end }}

{{- define "qwen2-cluster.commonVolumeMounts" -}}
{{ include "qwen2-cluster.modelVolumeMount" . }}
- name: dshm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* ---------------------------------------------------------------------------------------------------
Secrets' names.
--------------------------------------------------------------------------------------------------- */}}

{{- define "qwen2-cluster.rayAuthSecretName" -}}
{{- default (printf "%s-ray-auth" (include "qwen2-cluster.fullname" .)) .Values.ray.auth.existingSecret }}
{{- end }}

{{- define "qwen2-cluster.authSecretName" -}}
{{- default (printf "%s-auth" (include "qwen2-cluster.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "qwen2-cluster.clientCASecretName" -}}
{{- default .Values.tls.secretName .Values.tls.clientCA.secretName }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------------------
Environment of every Ray container.
--------------------------------------------------------------------------------------------------- */}}

{{- define "qwen2-cluster.env" -}}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: HOME
  value: /tmp
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- if .Values.ray.auth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "qwen2-cluster.rayAuthSecretName" . }}
      key: {{ .Values.ray.auth.secretKey }}
{{- end }}
{{- range $k, $v := .Values.env }}
- name: {{ $k }}
  value: {{ $v | toString | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------------------
Ray start flags. The same ports on head and workers; the head adds its own.
--------------------------------------------------------------------------------------------------- */}}

{{- define "qwen2-cluster.rayPortArgs" -}}
{{- $p := .Values.ray.ports }}
{{- $a := list (printf "--node-manager-port=%d" (int $p.nodeManager)) (printf "--object-manager-port=%d" (int $p.objectManager)) (printf "--runtime-env-agent-port=%d" (int $p.runtimeEnvAgent)) (printf "--dashboard-agent-grpc-port=%d" (int $p.dashboardAgentGrpc)) (printf "--dashboard-agent-listen-port=%d" (int $p.dashboardAgentListen)) (printf "--metrics-export-port=%d" (int $p.metricsExport)) (printf "--min-worker-port=%d" (int $p.minWorker)) (printf "--max-worker-port=%d" (int $p.maxWorker)) }}
{{- if .Values.ray.objectStoreMemoryBytes }}
{{- $a = append $a (printf "--object-store-memory=%d" (int64 .Values.ray.objectStoreMemoryBytes)) }}
{{- end }}
{{- toYaml $a }}
{{- end }}

{{/* `ray start --head` flags (a YAML list). */}}
{{- define "qwen2-cluster.rayHeadArgs" -}}
{{- $p := .Values.ray.ports }}
{{- $a := list "start" "--head" (printf "--port=%d" (int $p.gcs)) "--node-ip-address=$(POD_IP)" "--num-cpus=0" "--num-gpus=0" (printf "--ray-client-server-port=%d" (int $p.client)) "--disable-usage-stats" }}
{{- if .Values.ray.dashboard.enabled }}
{{- $a = concat $a (list "--include-dashboard=true" "--dashboard-host=0.0.0.0" (printf "--dashboard-port=%d" (int $p.dashboard))) }}
{{- else }}
{{- $a = append $a "--include-dashboard=false" }}
{{- end }}
{{- $a = concat $a (fromYamlArray (include "qwen2-cluster.rayPortArgs" .)) .Values.ray.headStartArgs }}
{{- toYaml $a }}
{{- end }}

{{/* `ray start` flags of a worker (a YAML list). */}}
{{- define "qwen2-cluster.rayWorkerArgs" -}}
{{- $a := list "start" (printf "--address=%s" (include "qwen2-cluster.rayHeadAddress" .)) "--node-ip-address=$(POD_IP)" (printf "--num-gpus=%d" (int .Values.gpusPerNode)) (printf "--num-cpus=%s" (include "qwen2-cluster.workerRayCpus" .)) "--disable-usage-stats" }}
{{- $a = concat $a (fromYamlArray (include "qwen2-cluster.rayPortArgs" .)) .Values.ray.workerStartArgs (list "--block") }}
{{- toYaml $a }}
{{- end }}

{{/* ---------------------------------------------------------------------------------------------------
The router: `qwen2-cluster serve` args (a YAML list, parsed by the tests with the CLI's own parser).
--------------------------------------------------------------------------------------------------- */}}

{{- define "qwen2-cluster.serveArgs" -}}
{{- $s := .Values.serve }}
{{- $a := list "serve"
    "--model" (include "qwen2-cluster.modelPath" .)
    "--host" "0.0.0.0"
    "--port" (toString (int $s.port))
    "--metrics-port" (toString (int $s.metricsPort))
    "--http-port" (ternary (toString (int $s.http.port)) "0" (not (not $s.http.enabled)))
    "--ray-address" (printf "$(POD_IP):%d" (int .Values.ray.ports.gcs))
    "--device" "cuda"
    "--tensor-parallel-size" (toString (int .Values.tensorParallelSize))
    "--pipeline-parallel-size" (toString (int .Values.pipelineParallelSize))
    "--dtype" $s.dtype
    "--block-size" (toString (int $s.blockSize))
    "--gpu-memory-utilization" (toString $s.gpuMemoryUtilization)
    "--cpus-per-rank" (toString $s.cpusPerRank)
    "--placement-timeout" (toString (int $s.placementTimeoutSeconds))
    "--step-timeout" (toString (int $s.stepTimeoutSeconds))
    "--max-num-seqs" (toString (int $s.maxNumSeqs))
    "--max-num-batched-tokens" (toString (int $s.maxNumBatchedTokens))
    "--max-waiting" (toString (int $s.maxWaiting))
    "--max-new-tokens-limit" (toString (int $s.maxNewTokensLimit))
    "--rope-scaling-mode" $s.ropeScalingMode
    "--max-message-bytes" (toString (int64 $s.maxMessageBytes))
    "--drain-timeout" (toString (int $s.drainTimeoutSeconds)) }}
{{- if $s.maxModelLen }}
{{- $a = concat $a (list "--max-model-len" (toString (int64 $s.maxModelLen))) }}
{{- end }}
{{- if $s.maxConcurrentRpcs }}
{{- $a = concat $a (list "--max-concurrent-rpcs" (toString (int64 $s.maxConcurrentRpcs))) }}
{{- end }}
{{- if $s.rendezvousHost }}
{{- $a = concat $a (list "--rendezvous-host" $s.rendezvousHost) }}
{{- end }}
{{- if $s.servedModelName }}
{{- $a = concat $a (list "--served-model-name" $s.servedModelName) }}
{{- end }}
{{- if .Values.tls.enabled }}
{{- $a = concat $a (list "--tls-cert-file" "/etc/qwen2/tls/tls.crt" "--tls-key-file" "/etc/qwen2/tls/tls.key") }}
{{- if .Values.tls.clientCA.enabled }}
{{- $a = concat $a (list "--tls-client-ca-file" (printf "/etc/qwen2/client-ca/%s" .Values.tls.clientCA.key)) }}
{{- end }}
{{- end }}
{{- if .Values.auth.enabled }}
{{- $a = concat $a (list "--auth-token-file" (printf "/etc/qwen2/auth/%s" .Values.auth.secretKey)) }}
{{- end }}
{{- $a = concat $a .Values.serve.extraArgs }}
{{- toYaml $a }}
{{- end }}

{{/* The router's gRPC probe handler. Plaintext: Kubernetes-native grpc probes (grpc.health.v1). TLS: kubelet's
grpc probe cannot speak TLS, so `qwen2-client health` over TLS against 127.0.0.1 (a TCP check under mutual
TLS without a probe client certificate). */}}
{{- define "qwen2-cluster.routerProbeHandler" -}}
{{- $port := int .Values.serve.port }}
{{- if not .Values.tls.enabled }}
grpc:
  port: {{ $port }}
{{- else if and .Values.tls.clientCA.enabled (not .Values.tls.clientCA.probeClientSecret) }}
tcpSocket:
  port: {{ $port }}
{{- else }}
{{- $cmd := list "qwen2-client" "--target" (printf "127.0.0.1:%d" $port) "--ca" (printf "/etc/qwen2/tls/%s" .Values.tls.caKey) "--server-name" (default (include "qwen2-cluster.grpcServiceHost" .) .Values.tls.serverName) }}
{{- if .Values.tls.clientCA.enabled }}
{{- $cmd = concat $cmd (list "--cert" "/etc/qwen2/probe-client/tls.crt" "--key" "/etc/qwen2/probe-client/tls.key") }}
{{- end }}
{{- $cmd = concat $cmd (list "--timeout" "4" "--retries" "1" "health") }}
exec:
  command:
    {{- toYaml $cmd | nindent 4 }}
{{- end }}
{{- end }}

{{/* Whether readiness is GET /health on the HTTP port: while the HTTP API is on, except under mutual TLS (the
kubelet presents no client certificate). Its 200/503 follows the same serving state as grpc.health.v1. */}}
{{- define "qwen2-cluster.httpReadiness" -}}
{{- if and .Values.serve.http.enabled (not (and .Values.tls.enabled .Values.tls.clientCA.enabled)) }}true{{ end }}
{{- end }}

{{/* Startup and liveness: the gRPC handler. Readiness: the HTTP API's /health where httpReadiness says so (HTTPS
under TLS: the kubelet does not verify the certificate), else the gRPC handler. */}}
{{- define "qwen2-cluster.routerProbes" -}}
{{- $h := .Values.head }}
{{- $handler := include "qwen2-cluster.routerProbeHandler" . | trim }}
{{- $ready := $handler }}
{{- if include "qwen2-cluster.httpReadiness" . }}
{{- $ready = printf "httpGet:\n  path: /health\n  port: %d\n  scheme: %s" (int .Values.serve.http.port) (ternary "HTTPS" "HTTP" (not (not .Values.tls.enabled))) }}
{{- end }}
{{- $window := add (int .Values.serve.placementTimeoutSeconds) (int $h.startupProbe.loadSeconds) }}
{{- $period := int $h.startupProbe.periodSeconds }}
startupProbe:
  {{- $handler | nindent 2 }}
  periodSeconds: {{ $period }}
  timeoutSeconds: {{ $h.startupProbe.timeoutSeconds }}
  failureThreshold: {{ div (add $window $period -1) $period }}
readinessProbe:
  {{- $ready | nindent 2 }}
  periodSeconds: {{ $h.readinessProbe.periodSeconds }}
  timeoutSeconds: {{ $h.readinessProbe.timeoutSeconds }}
  failureThreshold: {{ $h.readinessProbe.failureThreshold }}
livenessProbe:
  {{- $handler | nindent 2 }}
  periodSeconds: {{ $h.livenessProbe.periodSeconds }}
  timeoutSeconds: {{ $h.livenessProbe.timeoutSeconds }}
  failureThreshold: {{ $h.livenessProbe.failureThreshold }}
{{- end }}

{{/* Probes of a Ray-only container on its local raylet: the node's dashboard agent (bound to the pod IP) answers
/api/local_raylet_healthz with 200 only while its raylet is alive. Liveness restarts a wedged node; readiness
keeps a node that lost its raylet out of the endpoints. (KubeRay's own check, without needing wget.) */}}
{{- define "qwen2-cluster.rayletProbes" -}}
{{- $p := .Values.worker.rayletProbe }}
livenessProbe:
  httpGet:
    path: /api/local_raylet_healthz
    port: {{ int .Values.ray.ports.dashboardAgentListen }}
  initialDelaySeconds: {{ $p.initialDelaySeconds }}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ $p.failureThreshold }}
readinessProbe:
  httpGet:
    path: /api/local_raylet_healthz
    port: {{ int .Values.ray.ports.dashboardAgentListen }}
  initialDelaySeconds: 5
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: 3
{{- end }}

{{/* Router-only volumes (TLS, client CA, probe client certificate, auth token) and their mounts. */}}
{{- define "qwen2-cluster.routerVolumes" -}}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    defaultMode: 0440
{{- if .Values.tls.clientCA.enabled }}
- name: client-ca
  secret:
    secretName: {{ include "qwen2-cluster.clientCASecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.tls.clientCA.key }}
        path: {{ .Values.tls.clientCA.key }}
{{- if .Values.tls.clientCA.probeClientSecret }}
- name: probe-client
  secret:
    secretName: {{ .Values.tls.clientCA.probeClientSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.auth.enabled }}
- name: auth-token
  secret:
    secretName: {{ include "qwen2-cluster.authSecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.auth.secretKey }}
        path: {{ .Values.auth.secretKey }}
{{- end }}
{{- end }}

{{- define "qwen2-cluster.routerVolumeMounts" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/qwen2/tls
  readOnly: true
{{- if .Values.tls.clientCA.enabled }}
- name: client-ca
  mountPath: /etc/qwen2/client-ca
  readOnly: true
{{- if .Values.tls.clientCA.probeClientSecret }}
- name: probe-client
  mountPath: /etc/qwen2/probe-client
  readOnly: true
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.auth.enabled }}
- name: auth-token
  mountPath: /etc/qwen2/auth
  readOnly: true
{{- end }}
{{- end }}

{{/* The router container's ports. */}}
{{- define "qwen2-cluster.routerPorts" -}}
- name: grpc
  containerPort: {{ int .Values.serve.port }}
  protocol: TCP
- name: metrics
  containerPort: {{ int .Values.serve.metricsPort }}
  protocol: TCP
{{- if .Values.serve.http.enabled }}
- name: http
  containerPort: {{ int .Values.serve.http.port }}
  protocol: TCP
{{- end }}
{{- end }}

{{/* Ray ports a node listens on (containerPort entries; informational, names for the Services). */}}
{{- define "qwen2-cluster.rayHeadPorts" -}}
- name: gcs
  containerPort: {{ int .Values.ray.ports.gcs }}
  protocol: TCP
- name: ray-client
  containerPort: {{ int .Values.ray.ports.client }}
  protocol: TCP
{{- if .Values.ray.dashboard.enabled }}
- name: dashboard
  containerPort: {{ int .Values.ray.ports.dashboard }}
  protocol: TCP
{{- end }}
{{- end }}

{{- define "qwen2-cluster.rayNodePorts" -}}
- name: node-manager
  containerPort: {{ int .Values.ray.ports.nodeManager }}
  protocol: TCP
- name: object-manager
  containerPort: {{ int .Values.ray.ports.objectManager }}
  protocol: TCP
- name: agent-http
  containerPort: {{ int .Values.ray.ports.dashboardAgentListen }}
  protocol: TCP
{{- end }}

{{/* Scheduling fields of one role. Call with (dict "ctx" $ "role" .Values.head "component" "head"). */}}
{{- define "qwen2-cluster.scheduling" -}}
{{- with .role.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .role.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $anti := default "none" .role.podAntiAffinity }}
{{- $affinity := deepCopy (default dict .role.affinity) }}
{{- $mine := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" (fromYaml (include "qwen2-cluster.componentSelectorLabels" (dict "ctx" .ctx "component" .component)))) }}
{{- if eq $anti "hard" }}
{{- $_ := set $affinity "podAntiAffinity" (dict "requiredDuringSchedulingIgnoredDuringExecution" (list $mine)) }}
{{- else if eq $anti "soft" }}
{{- $_ := set $affinity "podAntiAffinity" (dict "preferredDuringSchedulingIgnoredDuringExecution" (list (dict "weight" 100 "podAffinityTerm" $mine))) }}
{{- end }}
{{- with $affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .role.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .role.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .role.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- end }}

{{/* Pod-level fields shared by every pod of the release. */}}
{{- define "qwen2-cluster.podCommon" -}}
serviceAccountName: {{ include "qwen2-cluster.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/* The head container's script: start the Ray head (no GPUs, no CPUs: no rank lands here), then exec the
router, which receives the container's args ("$@" = serve ...) and SIGTERM directly. */}}
{{- define "qwen2-cluster.headScript" -}}
set -eu
ray {{ range $i, $a := fromYamlArray (include "qwen2-cluster.rayHeadArgs" .) }}{{ if $i }} {{ end }}{{ squote $a }}{{ end }}
exec qwen2-cluster "$@"
{{- end }}

{{/* KubeRay mode: the router is a sidecar of the ray-head container; it waits for the GCS on the pod's own
address, then execs the router. */}}
{{- define "qwen2-cluster.routerSidecarScript" -}}
set -eu
python3 -c 'import os, socket, time
address = (os.environ["POD_IP"], {{ int .Values.ray.ports.gcs }})
while True:
    try:
        socket.create_connection(address, timeout=3).close()
        break
    except OSError as e:
        print("waiting for the Ray head at %s:%d: %s" % (address + (e,)), flush=True)
        time.sleep(3)
time.sleep(5)'
exec qwen2-cluster "$@"
{{- end }}

{{/* Worker init container: wait until the Ray head's GCS answers before `ray start` (which gives up). */}}
{{- define "qwen2-cluster.waitForHeadScript" -}}
import os, socket, time
host, port = os.environ["RAY_HEAD_HOST"], int(os.environ["RAY_HEAD_PORT"])
while True:
    try:
        socket.create_connection((host, port), timeout=3).close()
        break
    except OSError as e:
        print("waiting for the Ray head at %s:%d: %s" % (host, port, e), flush=True)
        time.sleep(3)
{{- end }}

{{/* The container securityContext, with a role's additions. */}}
{{- define "qwen2-cluster.containerSecurityContext" -}}
{{- toYaml .Values.securityContext }}
{{- end }}

{{/* A worker's resources: values' CPU/memory plus gpusPerNode GPUs (and extraResources) in requests and limits. */}}
{{- define "qwen2-cluster.workerResources" -}}
{{- $r := deepCopy (default dict .Values.worker.resources) }}
{{- $req := default dict $r.requests }}
{{- $lim := default dict $r.limits }}
{{- $_ := set $req .Values.gpuResourceName (int .Values.gpusPerNode) }}
{{- $_ := set $lim .Values.gpuResourceName (int .Values.gpusPerNode) }}
{{- range $k, $v := .Values.worker.extraResources }}
{{- $_ := set $req $k $v }}
{{- $_ := set $lim $k $v }}
{{- end }}
{{- $_ := set $r "requests" $req }}
{{- $_ := set $r "limits" $lim }}
{{- toYaml $r }}
{{- end }}

{{/* KubeRay rayStartParams from the same `ray start` flags as the plain mode ("--key=value" -> key: "value"). */}}
{{- define "qwen2-cluster.rayStartParams" -}}
{{- $params := dict }}
{{- range .args }}
{{- if hasPrefix "--" . }}
{{- $kv := splitn "=" 2 (trimPrefix "--" .) }}
{{- if and (ne $kv._0 "node-ip-address") (ne $kv._0 "address") (ne $kv._0 "head") (ne $kv._0 "block") (ne $kv._0 "disable-usage-stats") }}
{{- $_ := set $params $kv._0 (toString (default "true" $kv._1)) }}
{{- end }}
{{- end }}
{{- end }}
{{- toYaml $params }}
{{- end }}
