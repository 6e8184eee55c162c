{{/* The data of the ConfigMaps in configmap.yaml, and the checksum that rolls a service's pods when its own settings change. */}}

{{- define "modalign.kafkaConfigData" -}}
{{- $connection := include "modalign.kafkaConnection" . | fromYaml }}
MODALIGN_KAFKA_BOOTSTRAP_SERVERS: {{ $connection.bootstrapServers | quote }}
MODALIGN_KAFKA_SECURITY_PROTOCOL: {{ $connection.securityProtocol | quote }}
MODALIGN_KAFKA_TOPIC_PREFIX: {{ .Values.kafka.topicPrefix | quote }}
MODALIGN_KAFKA_PARTITIONS: {{ .Values.kafka.partitions | quote }}
{{- $replication := include "modalign.kafkaReplication" . | fromYaml }}
MODALIGN_KAFKA_REPLICATION_FACTOR: {{ $replication.replicationFactor | quote }}
MODALIGN_KAFKA_MIN_INSYNC_REPLICAS: {{ $replication.minInsyncReplicas | quote }}
MODALIGN_KAFKA_RETENTION_DAYS: {{ .Values.kafka.retentionDays | quote }}
{{- if $connection.caSecret.name }}
MODALIGN_KAFKA_SSL_CAFILE: {{ printf "%s/ca.crt" (include "modalign.kafkaCaDir" .) | quote }}
{{- end }}
{{- if $connection.clientSecret.name }}
MODALIGN_KAFKA_SSL_CERTFILE: {{ printf "%s/tls.crt" (include "modalign.kafkaClientDir" .) | quote }}
MODALIGN_KAFKA_SSL_KEYFILE: {{ printf "%s/tls.key" (include "modalign.kafkaClientDir" .) | quote }}
{{- end }}
{{- with $connection.sasl.mechanism }}
MODALIGN_KAFKA_SASL_MECHANISM: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
Where a service finds the version it starts from: the shared volume, or the folder an S3 copy lands in
(KServe's storage initializer copies to /mnt/models; the chart's own to the same place under
modelStore.mountPath). Empty: it starts from its small built-in model (modelFromStore false).
Args: (dict "root" $ "component" NAME)
*/}}
{{- define "modalign.startModelDir" -}}
{{- $values := index .root.Values .component }}
{{- $store := .root.Values.modelStore }}
{{- if $values.modelFromStore }}
{{- if and (eq (include "modalign.servedByKServe" .) "true") (eq $store.type "s3") }}/mnt/models
{{- else }}{{ printf "%s/%s" $store.mountPath (index $store.initialVersions .component) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The model store the trainer publishes to, and the only place policy and reward load published versions from. */}}
{{- define "modalign.modelStoreLocation" -}}
{{- $store := .Values.modelStore }}
{{- ternary (include "modalign.s3StoreUri" .) $store.mountPath (eq $store.type "s3") }}
{{- end }}

{{/* Args: (dict "root" $ "component" NAME) */}}
{{- define "modalign.componentConfigData" -}}
{{- $root := .root }}
{{- $component := .component }}
{{- $values := index $root.Values $component }}
{{- $store := $root.Values.modelStore }}
{{- $startDir := include "modalign.startModelDir" . }}
{{- $facts := index (include "modalign.componentFacts" $root | fromYaml) $component }}
{{- if $facts.authenticates }}
{{ include "modalign.authConfigData" $root }}
{{- end }}
{{- if include "modalign.servesTls" . }}
{{- include "modalign.tlsConfigData" $root }}
{{- end }}
{{- if eq $component "policy" }}
MODALIGN_LISTEN: {{ printf "0.0.0.0:%d" (int $values.grpcPort) | quote }}
MODALIGN_METRICS_HOST: "0.0.0.0"
MODALIGN_METRICS_PORT: {{ $values.metricsPort | quote }}
{{- with $startDir }}
MODALIGN_MODEL_DIR: {{ . | quote }}
{{- end }}
MODALIGN_POLICY_VERSION: {{ include "modalign.initialPolicyVersion" $root | quote }}
MODALIGN_FOLLOW: {{ include "modalign.policyFollow" $root | quote }}
MODALIGN_MODEL_STORE: {{ include "modalign.modelStoreLocation" $root | quote }}
MODALIGN_BLOB_DIR: {{ $root.Values.blobStore.mountPath | quote }}
MODALIGN_DEVICE: {{ $values.device | quote }}
MODALIGN_HTTP_LISTEN: {{ printf "0.0.0.0:%d" (int $values.httpPort) | quote }}
{{- if $root.Values.feedback.enabled }}
{{- /* POST /v1/feedback goes on to the feedback service. */}}
MODALIGN_FEEDBACK_ADDRESS: {{ printf "%s:%d" (include "modalign.componentName" (dict "root" $root "component" "feedback")) (int $root.Values.feedback.grpcPort) | quote }}
{{- include "modalign.clientTlsConfigData" (dict "root" $root "prefix" "MODALIGN_FEEDBACK_TLS") }}
{{- end }}
{{- else if eq $component "feedback" }}
MODALIGN_LISTEN: {{ printf "0.0.0.0:%d" (int $values.grpcPort) | quote }}
MODALIGN_METRICS_HOST: "0.0.0.0"
MODALIGN_METRICS_PORT: {{ $values.metricsPort | quote }}
{{- else if eq $component "reward" }}
MODALIGN_HOST: "0.0.0.0"
MODALIGN_HTTP_PORT: {{ $values.httpPort | quote }}
MODALIGN_GRPC_PORT: {{ $values.grpcPort | quote }}
{{- with $startDir }}
MODALIGN_MODEL_DIR: {{ . | quote }}
{{- end }}
MODALIGN_MODEL_NAME: {{ $values.modelName | quote }}
MODALIGN_DEVICE: {{ $values.device | quote }}
MODALIGN_FOLLOW: {{ ternary "latest" "none" $values.followVersions | quote }}
MODALIGN_MODEL_STORE: {{ include "modalign.modelStoreLocation" $root | quote }}
{{- else if eq $component "trainer" }}
MODALIGN_METRICS_HOST: "0.0.0.0"
MODALIGN_METRICS_PORT: {{ $values.metricsPort | quote }}
MODALIGN_GROUP_ID: {{ $values.groupId | quote }}
MODALIGN_WORK_DIR: {{ include "modalign.trainerWorkDir" $root | quote }}
MODALIGN_MODEL_STORE: {{ include "modalign.modelStoreLocation" $root | quote }}
MODALIGN_BLOB_DIR: {{ $root.Values.blobStore.mountPath | quote }}
MODALIGN_LEARNER_ALGORITHM: {{ $values.algorithm | quote }}
MODALIGN_LEARNER_DEVICE: {{ $values.device | quote }}
{{- if $values.modelFromStore }}
MODALIGN_LEARNER_POLICY_MODEL_DIR: {{ printf "%s/%s" $store.mountPath $store.initialVersions.policy | quote }}
MODALIGN_LEARNER_REWARD_MODEL_DIR: {{ printf "%s/%s" $store.mountPath $store.initialVersions.reward | quote }}
{{- end }}
{{- else if eq $component "rollout" }}
{{- $policy := $root.Values.policy }}
{{- $reward := $root.Values.reward }}
MODALIGN_LISTEN: {{ printf "0.0.0.0:%d" (int $values.grpcPort) | quote }}
MODALIGN_METRICS_HOST: "0.0.0.0"
MODALIGN_METRICS_PORT: {{ $values.metricsPort | quote }}
MODALIGN_ROLLOUT_INITIAL_VERSION: {{ include "modalign.initialPolicyVersion" $root | quote }}
MODALIGN_ROLLOUT_STEPS: {{ join "," $values.steps | quote }}
MODALIGN_ROLLOUT_MIN_STEP_SECONDS: {{ $values.minStepSeconds | quote }}
MODALIGN_ROLLOUT_MAX_STEP_SECONDS: {{ $values.maxStepSeconds | quote }}
MODALIGN_ROLLOUT_MIN_SAMPLES: {{ $values.minSamples | quote }}
MODALIGN_ROLLOUT_REQUIRED_METRICS: {{ join "," $values.requiredMetrics | quote }}
MODALIGN_ROLLOUT_ALPHA: {{ $values.alpha | quote }}
MODALIGN_ROLLOUT_MAX_ERROR_RATE: {{ $values.maxErrorRate | quote }}
MODALIGN_ROLLOUT_MAX_P99_LATENCY_S: {{ $values.maxP99LatencySeconds | quote }}
MODALIGN_ROLLOUT_GUARD_MIN_REQUESTS: {{ $values.guardMinRequests | quote }}
{{- /* Every policy replica's /metrics, through the headless Service (services.yaml). */}}
MODALIGN_POLICY_METRICS: {{ printf "%s.%s.svc:%d" (include "modalign.policyMetricsServiceName" $root) $root.Release.Namespace (int $policy.metricsPort) | quote }}
{{- if and $values.scoreWithReward $reward.enabled }}
{{- $rewardArgs := dict "root" $root "component" "reward" }}
{{- if eq (include "modalign.servedByKServe" $rewardArgs) "true" }}
{{- /* KServe's predictor Service (port 80) in both its deployment modes. */}}
MODALIGN_REWARD_URL: {{ printf "%s-predictor.%s.svc:80" (include "modalign.componentName" $rewardArgs) $root.Release.Namespace | quote }}
{{- else }}
MODALIGN_REWARD_URL: {{ printf "%s.%s.svc:%d" (include "modalign.componentName" $rewardArgs) $root.Release.Namespace (int $reward.httpPort) | quote }}
{{- end }}
MODALIGN_REWARD_MODEL: {{ $reward.modelName | quote }}
{{- include "modalign.clientTlsConfigData" (dict "root" $root "prefix" "MODALIGN_REWARD_TLS") }}
{{- if not $root.Values.auth.insecure }}
{{- /* The controller scores with the reader token, from the tokens it mounts to authenticate its own callers. */}}
MODALIGN_REWARD_AUTH_TOKENS_FILE: {{ printf "%s/tokens.json" (include "modalign.authDir" $root) | quote }}
{{- end }}
{{- end }}
MODALIGN_BLOB_DIR: {{ $root.Values.blobStore.mountPath | quote }}
{{- if include "modalign.rolloutDrivesKServe" $root }}
MODALIGN_KSERVE_INFERENCE_SERVICE: {{ include "modalign.componentName" (dict "root" $root "component" "policy") | quote }}
MODALIGN_KSERVE_NAMESPACE: {{ $root.Release.Namespace | quote }}
{{- with include "modalign.startModelDir" (dict "root" $root "component" "policy") }}
MODALIGN_KSERVE_INITIAL_MODEL_DIR: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- if include "modalign.readsS3" . }}
{{- with $store.s3.endpoint }}
MODALIGN_S3_ENDPOINT_URL: {{ . | quote }}
{{- end }}
{{- with $store.s3.region }}
MODALIGN_S3_REGION: {{ . | quote }}
{{- end }}
MODALIGN_S3_CACHE_DIR: {{ include "modalign.s3CacheDir" $root | quote }}
{{- if $store.s3.allowPlaintext }}
MODALIGN_S3_ALLOW_PLAINTEXT: "true"
{{- end }}
{{- end }}
{{- range $flag, $value := $values.settings }}
{{ printf "MODALIGN_%s" ($flag | replace "." "_" | replace "-" "_" | upper) }}: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* Checksum of the settings a service reads (its ConfigMap, and the Kafka one if it uses Kafka). Args: (dict "root" $ "component" NAME) */}}
{{- define "modalign.configChecksum" -}}
{{- $settings := include "modalign.componentConfigData" . }}
{{- if include "modalign.usesKafka" . }}
{{- $settings = print $settings "\n" (include "modalign.kafkaConfigData" .root) }}
{{- end }}
{{- $settings | sha256sum }}
{{- end }}
