{{/*
Names, labels and the pieces every modalign pod shares. A service is a "component": its values live
under .Values.<component>; the templates that render per-service resources range over
"modalign.components", so a new service (the trainer, the rollout controller) slots in by adding its
values block, an entry below, and its workload template.
*/}}

{{- define "modalign.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "modalign.fullname" -}}
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

{{- define "modalign.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Services the chart can run, in a stable order; the ones whose values say enabled: true run. */}}
{{- define "modalign.components" -}}
{{- list "policy" "feedback" "reward" | toJson }}
{{- end }}

{{/*
Facts of each service's code (not choices): the `modalign` subcommand, how it reports health, and
which port serves /metrics.
*/}}
{{- define "modalign.componentFacts" -}}
policy:
  command: policy
  grpcHealthService: modalign.v1.PolicyService
  metricsPortName: metrics
  usesKafka: true
  usesModelStore: true
  usesBlobStore: true
feedback:
  command: feedback
  grpcHealthService: modalign.v1.FeedbackService
  metricsPortName: metrics
  usesKafka: true
  usesModelStore: false
  usesBlobStore: false
reward:
  command: reward
  httpReadyPath: /v2/health/ready
  httpLivePath: /v2/health/live
  metricsPortName: http
  usesKafka: false
  usesModelStore: true
  usesBlobStore: false
{{- end }}

{{/* Is the component run by KServe rather than by a Deployment of this chart? Args: (dict "root" $ "component" NAME) */}}
{{- define "modalign.servedByKServe" -}}
{{- $values := index .root.Values .component }}
{{- if and $values.kserve $values.kserve.enabled }}true{{- end }}
{{- end }}

{{- define "modalign.labels" -}}
helm.sh/chart: {{ include "modalign.chart" . }}
{{ include "modalign.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: modalign
{{- end }}

{{- define "modalign.selectorLabels" -}}
app.kubernetes.io/name: {{ include "modalign.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Args: (dict "root" $ "component" NAME) */}}
{{- define "modalign.componentLabels" -}}
{{ include "modalign.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "modalign.componentSelectorLabels" -}}
{{ include "modalign.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "modalign.componentName" -}}
{{- printf "%s-%s" (include "modalign.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "modalign.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "modalign.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Uses GPUs? Args: component values. */}}
{{- define "modalign.usesGpu" -}}
{{- if and .gpu (gt (int .gpu.count) 0) }}true{{- end }}
{{- end }}

{{/* The CUDA build for GPU services, the CPU build otherwise. Args: (dict "root" $ "component" NAME) */}}
{{- define "modalign.image" -}}
{{- $values := index .root.Values .component }}
{{- $image := ternary .root.Values.images.cuda .root.Values.images.cpu (eq (include "modalign.usesGpu" $values) "true") }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default .root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/* Resource requests and limits, with the GPUs added to both (extended resources need them equal). Args: component values. */}}
{{- define "modalign.resources" -}}
{{- $resources := deepCopy (default dict .resources) }}
{{- if eq (include "modalign.usesGpu" .) "true" }}
{{- $_ := set $resources "requests" (merge (dict .gpu.resourceName (int .gpu.count)) (default dict $resources.requests)) }}
{{- $_ := set $resources "limits" (merge (dict .gpu.resourceName (int .gpu.count)) (default dict $resources.limits)) }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/* Scheduling fields of a pod spec. Args: component values. */}}
{{- define "modalign.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{- define "modalign.kafkaClusterName" -}}
{{- default (printf "%s-kafka" (include "modalign.fullname" .)) .Values.kafka.strimzi.clusterName }}
{{- end }}

{{/* Where the services reach Kafka and how they authenticate, whichever mode runs it. */}}
{{- define "modalign.kafkaConnection" -}}
{{- $kafka := .Values.kafka }}
{{- if eq $kafka.mode "strimzi" }}
{{- $tls := eq $kafka.strimzi.listener "tls" }}
bootstrapServers: {{ printf "%s-kafka-bootstrap.%s.svc:%d" (include "modalign.kafkaClusterName" .) .Release.Namespace (ternary 9093 9092 $tls) }}
securityProtocol: {{ ternary "SSL" "PLAINTEXT" $tls }}
caSecret:
  name: {{ ternary (printf "%s-cluster-ca-cert" (include "modalign.kafkaClusterName" .)) "" $tls }}
  key: ca.crt
clientSecret:
  name: ""
sasl:
  mechanism: ""
{{- else }}
bootstrapServers: {{ $kafka.external.bootstrapServers }}
securityProtocol: {{ $kafka.external.securityProtocol }}
caSecret:
  {{- toYaml $kafka.external.tls.caSecret | nindent 2 }}
clientSecret:
  {{- toYaml $kafka.external.tls.clientSecret | nindent 2 }}
sasl:
  {{- toYaml $kafka.external.sasl | nindent 2 }}
{{- end }}
{{- end }}

{{- define "modalign.kafkaCaDir" -}}/etc/modalign/kafka/ca{{- end }}
{{- define "modalign.kafkaClientDir" -}}/etc/modalign/kafka/client{{- end }}

{{/* Container env entries that come from Secrets: the SASL credentials. */}}
{{- define "modalign.kafkaSecretEnv" -}}
{{- $connection := include "modalign.kafkaConnection" . | fromYaml }}
{{- if $connection.sasl.mechanism }}
- name: MODALIGN_KAFKA_SASL_PLAIN_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $connection.sasl.secretName }}
      key: {{ $connection.sasl.usernameKey }}
- name: MODALIGN_KAFKA_SASL_PLAIN_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $connection.sasl.secretName }}
      key: {{ $connection.sasl.passwordKey }}
{{- end }}
{{- end }}

{{- define "modalign.kafkaVolumeMounts" -}}
{{- $connection := include "modalign.kafkaConnection" . | fromYaml }}
{{- if $connection.caSecret.name }}
- name: kafka-ca
  mountPath: {{ include "modalign.kafkaCaDir" . }}
  readOnly: true
{{- end }}
{{- if $connection.clientSecret.name }}
- name: kafka-client
  mountPath: {{ include "modalign.kafkaClientDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "modalign.kafkaVolumes" -}}
{{- $connection := include "modalign.kafkaConnection" . | fromYaml }}
{{- if $connection.caSecret.name }}
- name: kafka-ca
  secret:
    secretName: {{ $connection.caSecret.name }}
    items:
      - {key: {{ $connection.caSecret.key }}, path: ca.crt}
{{- end }}
{{- if $connection.clientSecret.name }}
- name: kafka-client
  secret:
    secretName: {{ $connection.clientSecret.name }}
    # The private key: readable by the pod's group (fsGroup) only.
    defaultMode: 0440
    items:
      - {key: {{ $connection.clientSecret.certificateKey }}, path: tls.crt}
      - {key: {{ $connection.clientSecret.privateKeyKey }}, path: tls.key}
{{- end }}
{{- end }}

{{- define "modalign.modelStoreClaim" -}}
{{- default (printf "%s-models" (include "modalign.fullname" .)) .Values.modelStore.pvc.existingClaim }}
{{- end }}

{{- define "modalign.blobStoreClaim" -}}
{{- default (printf "%s-blobs" (include "modalign.fullname" .)) .Values.blobStore.pvc.existingClaim }}
{{- end }}

{{/* The model-store URI of the served version, as KServe's storage initializer takes it. */}}
{{- define "modalign.modelStorageUri" -}}
{{- $store := .Values.modelStore }}
{{- if eq $store.type "s3" }}
{{- printf "s3://%s/%s" $store.s3.bucket (list $store.s3.prefix $store.currentVersionPath | compact | join "/") }}
{{- else }}
{{- printf "pvc://%s/%s" (include "modalign.modelStoreClaim" .) $store.currentVersionPath }}
{{- end }}
{{- end }}

{{/* Env of KServe's storage initializer for S3 (its documented variables). */}}
{{- define "modalign.s3Env" -}}
{{- $s3 := .Values.modelStore.s3 }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ $s3.secretName }}, key: {{ $s3.accessKeyIdKey }}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ $s3.secretName }}, key: {{ $s3.secretAccessKeyKey }}}
{{- with $s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
- name: S3_ENDPOINT
  value: {{ . | trimPrefix "https://" | trimPrefix "http://" | quote }}
- name: S3_USE_HTTPS
  value: {{ ternary "0" "1" (hasPrefix "http://" .) | quote }}
{{- end }}
{{- with $s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- end }}
