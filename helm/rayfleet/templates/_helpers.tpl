{{/* Names and labels follow KubeRay's ray-cluster chart. */}}
{{- define "rayfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The full name prefixes every object; it is the RayService's name, so KubeRay's limits apply. */}}
{{- define "rayfleet.fullname" -}}
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

{{- define "rayfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rayfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rayfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "rayfleet.labels" -}}
helm.sh/chart: {{ include "rayfleet.chart" . }}
{{ include "rayfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rayfleet
{{- end -}}

{{- define "rayfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "rayfleet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "rayfleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Ports of the rayfleet application (fixed by rayfleet's Serve app; Services map them to their own). */}}
{{- define "rayfleet.httpPort" -}}8000{{- end -}}
{{- define "rayfleet.grpcPort" -}}9000{{- end -}}
{{- define "rayfleet.metricsPort" -}}8080{{- end -}}

{{/* ---------------------------------------------------------------- Redis */}}

{{- define "rayfleet.redisHost" -}}
{{- if eq .Values.redis.mode "bundled" -}}
{{- printf "%s-redis.%s.svc" (include "rayfleet.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- (urlParse .Values.redis.external.url).hostname -}}
{{- end -}}
{{- end -}}

{{- define "rayfleet.redisPort" -}}
{{- $url := urlParse (default "redis://bundled" .Values.redis.external.url) -}}
{{- if or (eq .Values.redis.mode "bundled") (eq $url.host $url.hostname) -}}6379{{- else -}}{{- trimPrefix (printf "%s:" $url.hostname) $url.host -}}{{- end -}}
{{- end -}}

{{- define "rayfleet.redisScheme" -}}
{{- if eq .Values.redis.mode "bundled" -}}redis{{- else -}}{{- (urlParse .Values.redis.external.url).scheme -}}{{- end -}}
{{- end -}}

{{/* The Secret holding the Redis password, or "" for a Redis without one. */}}
{{- define "rayfleet.redisSecretName" -}}
{{- if .Values.redis.auth.existingSecret -}}
{{- .Values.redis.auth.existingSecret -}}
{{- else if eq .Values.redis.mode "bundled" -}}
{{- printf "%s-redis" (include "rayfleet.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "rayfleet.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "rayfleet.fullname" .)) .Values.apiKeys.existingSecret -}}
{{- end -}}

{{/* ---------------------------------------------------------------- the fleet spec */}}

{{/*
The fleet spec the Pods read: `fleet` with the fields the chart owns set by the chart. Args: root, fleet,
serving (the RayService cluster keeps its state in Redis; the RL job's cluster in memory).
*/}}
{{- define "rayfleet.fleetSpec" -}}
{{- $root := .root -}}
{{- $fleet := deepCopy .fleet -}}
{{- $ingress := deepCopy (default dict $fleet.ingress) -}}
{{- $_ := set $ingress "host" "0.0.0.0" -}}
{{- $_ = set $ingress "port" (include "rayfleet.httpPort" $root | int) -}}
{{- $_ = set $ingress "grpc_port" (include "rayfleet.grpcPort" $root | int) -}}
{{- if $root.Values.apiKeys.enabled -}}
{{- $_ = set $ingress "api_keys_env" "RAYFLEET_API_KEYS" -}}
{{- if $root.Values.apiKeys.adminSecretKey -}}
{{- $_ = set $ingress "admin_keys_env" "RAYFLEET_ADMIN_KEYS" -}}
{{- end -}}
{{- else -}}
{{- /* Serving without keys is a choice the spec states; the ingress logs it loudly at every start. */ -}}
{{- $_ = set $ingress "auth" "none" -}}
{{- end -}}
{{- $_ = set $fleet "ingress" $ingress -}}
{{- if .serving -}}
{{- /* Credentials stay out of the ConfigMap: RAYFLEET_STATE_STORE carries the same URL with the password. */ -}}
{{- $_ = set $fleet "state_store" (printf "%s://%s:%s/%d" (include "rayfleet.redisScheme" $root) (include "rayfleet.redisHost" $root) (include "rayfleet.redisPort" $root) (int $root.Values.redis.stateStoreDb)) -}}
{{- else -}}
{{- $_ = set $fleet "state_store" "memory://" -}}
{{- end -}}
{{- toYaml $fleet -}}
{{- end -}}

{{/* ---------------------------------------------------------------- Ray Pods */}}

{{/* Environment of every Ray container. Args: root, serving (bool: the RayService cluster). */}}
{{- define "rayfleet.rayEnv" -}}
{{- $root := .root -}}
- name: RAYFLEET_RAYCLUSTER_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.labels['ray.io/cluster']
- name: RAYFLEET_WORKER_GROUP
  valueFrom:
    fieldRef:
      fieldPath: metadata.labels['ray.io/group']
- name: RAYFLEET_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- if $root.Values.apiKeys.enabled }}
- name: RAYFLEET_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "rayfleet.apiKeysSecretName" $root }}
      key: {{ $root.Values.apiKeys.secretKey }}
{{- if $root.Values.apiKeys.adminSecretKey }}
- name: RAYFLEET_ADMIN_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "rayfleet.apiKeysSecretName" $root }}
      key: {{ $root.Values.apiKeys.adminSecretKey }}
{{- end }}
{{- end }}
{{- if .serving }}
{{- $secret := include "rayfleet.redisSecretName" $root }}
{{- $hostPort := printf "%s:%s/%d" (include "rayfleet.redisHost" $root) (include "rayfleet.redisPort" $root) (int $root.Values.redis.stateStoreDb) }}
{{- if $secret }}
{{- /* Not REDIS_PASSWORD: KubeRay rejects that variable on the head when GCS fault tolerance is on. */}}
- name: RAYFLEET_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $root.Values.redis.auth.secretKey }}
- name: RAYFLEET_STATE_STORE
  value: {{ printf "%s://:$(RAYFLEET_REDIS_PASSWORD)@%s" (include "rayfleet.redisScheme" $root) $hostPort | quote }}
{{- else }}
- name: RAYFLEET_STATE_STORE
  value: {{ printf "%s://%s" (include "rayfleet.redisScheme" $root) $hostPort | quote }}
{{- end }}
{{- end }}
{{- with $root.Values.env }}
{{ toYaml . }}
{{- end }}
{{- with .group.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The Pod template of one Ray group. Args: root, group (head or a worker group's values), head (bool),
serving (bool), configMap (the ConfigMap mounted at /etc/rayfleet). An accelerator adds the GPU limit,
the node affinity on accelerators.products and the GPU tolerations; a group's own `affinity` replaces the
generated one.
*/}}
{{- define "rayfleet.rayPodTemplate" -}}
{{- $root := .root -}}
{{- $group := .group -}}
{{- $accel := default dict $group.accelerator -}}
{{- $resources := deepCopy (default dict $group.resources) -}}
{{- if $accel.type -}}
{{- $limits := default dict $resources.limits -}}
{{- $_ := set $limits $root.Values.accelerators.resourceName (int (default 1 $accel.count)) -}}
{{- $_ = set $resources "limits" $limits -}}
{{- end -}}
metadata:
  labels:
    {{- include "rayfleet.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: ray
    {{- with $group.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $group.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "rayfleet.serviceAccountName" $root }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" .head }}
      image: {{ include "rayfleet.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      env:
        {{- include "rayfleet.rayEnv" . | nindent 8 }}
      ports:
        {{- if .head }}
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        {{- end }}
        - {name: serve, containerPort: {{ include "rayfleet.httpPort" $root }}}
        - {name: serve-grpc, containerPort: {{ include "rayfleet.grpcPort" $root }}}
        - {name: metrics, containerPort: {{ include "rayfleet.metricsPort" $root }}}
      {{- with $resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - {name: rayfleet-config, mountPath: /etc/rayfleet, readOnly: true}
        {{- if $group.shmSize }}
        - {name: dshm, mountPath: /dev/shm}
        {{- end }}
        {{- with $group.volumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with (merge (deepCopy (default dict $group.securityContext)) $root.Values.raySecurity.securityContext) }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
  volumes:
    - name: rayfleet-config
      configMap:
        name: {{ .configMap }}
    {{- if $group.shmSize }}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $group.shmSize }}
    {{- end }}
    {{- with $group.volumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $group.affinity }}
  affinity:
    {{- toYaml $group.affinity | nindent 4 }}
  {{- else if $accel.type }}
  affinity:
    nodeAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
        nodeSelectorTerms:
          - matchExpressions:
              - key: {{ $root.Values.accelerators.nodeLabel }}
                operator: In
                values:
                  {{- toYaml (index $root.Values.accelerators.products $accel.type) | nindent 18 }}
  {{- end }}
  {{- $tolerations := concat (default list $group.tolerations) (ternary $root.Values.accelerators.tolerations list (not (empty $accel.type))) }}
  {{- with $tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (merge (deepCopy (default dict $group.podSecurityContext)) $root.Values.raySecurity.podSecurityContext) }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* Ray resources a group declares (KubeRay's group `resources`): its accelerator type and `rayResources`. */}}
{{- define "rayfleet.rayResources" -}}
{{- $resources := dict -}}
{{- range $name, $quantity := (default dict .rayResources) -}}
{{- $_ := set $resources $name (toString $quantity) -}}
{{- end -}}
{{- with .accelerator -}}
{{- if .type -}}
{{- $_ := set $resources (printf "accelerator_type:%s" .type) "1" -}}
{{- end -}}
{{- end -}}
{{- if $resources -}}
{{- toYaml $resources -}}
{{- end -}}
{{- end -}}

{{- define "rayfleet.rayStartParams" -}}
{{- $params := dict -}}
{{- range $key, $value := (default dict .) -}}
{{- $_ := set $params $key (toString $value) -}}
{{- end -}}
{{- toYaml $params -}}
{{- end -}}

{{/*
The RayCluster spec shared by the RayService (serving: true) and the RL RayJob (serving: false).
Args: root, workerGroups, serving, configMap.
*/}}
{{- define "rayfleet.rayClusterSpec" -}}
{{- $root := .root -}}
{{- $serving := .serving -}}
rayVersion: {{ $root.Values.rayVersion | quote }}
enableInTreeAutoscaling: {{ $root.Values.autoscaler.enabled }}
{{- if $root.Values.autoscaler.enabled }}
autoscalerOptions:
  version: {{ $root.Values.autoscaler.version }}
  upscalingMode: {{ $root.Values.autoscaler.upscalingMode }}
  idleTimeoutSeconds: {{ int $root.Values.autoscaler.idleTimeoutSeconds }}
  {{- with $root.Values.autoscaler.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- if and $serving $root.Values.redis.gcsFaultTolerance }}
gcsFaultToleranceOptions:
  redisAddress: {{ printf "%s%s:%s" (ternary "rediss://" "" (eq (include "rayfleet.redisScheme" $root) "rediss")) (include "rayfleet.redisHost" $root) (include "rayfleet.redisPort" $root) | quote }}
  {{- with include "rayfleet.redisSecretName" $root }}
  redisPassword:
    valueFrom:
      secretKeyRef:
        name: {{ . }}
        key: {{ $root.Values.redis.auth.secretKey }}
  {{- end }}
{{- end }}
headGroupSpec:
  rayStartParams:
    {{- include "rayfleet.rayStartParams" $root.Values.head.rayStartParams | nindent 4 }}
  {{- with include "rayfleet.rayResources" $root.Values.head }}
  resources:
    {{- . | nindent 4 }}
  {{- end }}
  template:
    {{- include "rayfleet.rayPodTemplate" (dict "root" $root "group" $root.Values.head "head" true "serving" $serving "configMap" .configMap) | nindent 4 }}
workerGroupSpecs:
{{- $configMap := .configMap }}
{{- range $group := .workerGroups }}
  - groupName: {{ $group.name }}
    replicas: {{ int $group.replicas }}
    minReplicas: {{ int $group.minReplicas }}
    maxReplicas: {{ int $group.maxReplicas }}
    {{- with $group.idleTimeoutSeconds }}
    idleTimeoutSeconds: {{ int . }}
    {{- end }}
    rayStartParams:
      {{- include "rayfleet.rayStartParams" $group.rayStartParams | nindent 6 }}
    {{- with include "rayfleet.rayResources" $group }}
    resources:
      {{- . | nindent 6 }}
    {{- end }}
    template:
      {{- include "rayfleet.rayPodTemplate" (dict "root" $root "group" $group "head" false "serving" $serving "configMap" $configMap) | nindent 6 }}
{{- end }}
{{- end -}}

{{/* ---------------------------------------------------------------- checks values.schema.json cannot express */}}

{{- define "rayfleet.checkGroups" -}}
{{- $root := .root -}}
{{- $path := .path -}}
{{- $seen := dict -}}
{{- range $i, $group := .groups -}}
{{- $at := printf "%s[%d]" $path $i -}}
{{- if hasKey $seen $group.name -}}
{{- fail (printf "%s.name: %q is used by another worker group; names must be unique" $at $group.name) -}}
{{- end -}}
{{- $_ := set $seen $group.name true -}}
{{- if gt (int $group.minReplicas) (int $group.maxReplicas) -}}
{{- fail (printf "%s: minReplicas (%d) exceeds maxReplicas (%d)" $at (int $group.minReplicas) (int $group.maxReplicas)) -}}
{{- end -}}
{{- if or (lt (int $group.replicas) (int $group.minReplicas)) (gt (int $group.replicas) (int $group.maxReplicas)) -}}
{{- fail (printf "%s.replicas: %d is outside [minReplicas %d, maxReplicas %d]" $at (int $group.replicas) (int $group.minReplicas) (int $group.maxReplicas)) -}}
{{- end -}}
{{- with $group.accelerator -}}
{{- if and .type (not (hasKey $root.Values.accelerators.products .type)) -}}
{{- fail (printf "%s.accelerator.type: %q has no node label values in accelerators.products (known: %s)" $at .type (keys $root.Values.accelerators.products | sortAlpha | join ", ")) -}}
{{- end -}}
{{- end -}}
{{- include "rayfleet.checkRayStartParams" (dict "at" $at "group" $group) -}}
{{- end -}}
{{- end -}}

{{/* KubeRay rejects Ray resources in both rayStartParams and the group's `resources`, and labels in rayStartParams. */}}
{{- define "rayfleet.checkRayStartParams" -}}
{{- $params := default dict .group.rayStartParams -}}
{{- if hasKey $params "labels" -}}
{{- fail (printf "%s.rayStartParams.labels: KubeRay rejects Ray labels in rayStartParams; use podLabels for Kubernetes labels" .at) -}}
{{- end -}}
{{- if or .group.rayResources (and .group.accelerator .group.accelerator.type) -}}
{{- range $key := list "num-cpus" "num-gpus" "memory" "resources" -}}
{{- if hasKey $params $key -}}
{{- fail (printf "%s.rayStartParams.%s: KubeRay rejects it together with the group's Ray resources (accelerator, rayResources); put it in rayResources (CPU, GPU, memory or a custom resource)" $.at $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Every pool that asks for an accelerator type (or a GPU) must have a worker group that offers it. */}}
{{- define "rayfleet.checkPools" -}}
{{- $offered := dict -}}
{{- range .groups -}}
{{- with .accelerator -}}
{{- if .type -}}
{{- $_ := set $offered .type true -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $i, $pool := .fleet.pools -}}
{{- $resources := default dict $pool.resources -}}
{{- if and $resources.accelerator_type (not (hasKey $offered $resources.accelerator_type)) -}}
{{- fail (printf "fleet.pools[%d].resources.accelerator_type: no worker group offers %q (accelerator types of %s: %s)" $i $resources.accelerator_type $.path (keys $offered | sortAlpha | join ", " | default "none")) -}}
{{- end -}}
{{- if and $resources.num_gpus (not $offered) -}}
{{- fail (printf "fleet.pools[%d].resources.num_gpus: the pool needs GPUs but no worker group of %s has an accelerator" $i $.path) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "rayfleet.checkName" -}}
{{- $name := include "rayfleet.fullname" .root -}}
{{- $full := printf "%s%s" $name .suffix -}}
{{- if or (gt (len $full) 47) (not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $full)) -}}
{{- fail (printf "%s name %q: KubeRay requires at most 47 characters, lowercase letters, digits and '-', starting with a letter; set fullnameOverride" .kind $full) -}}
{{- end -}}
{{- end -}}
