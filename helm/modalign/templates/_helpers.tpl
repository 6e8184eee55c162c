{{/*
Names, labels and the pieces every modalign pod shares. A service is a "component": its values live
under .Values.<component>; the templates that render per-service resources range over
"modalign.components", so a new service (the rollout controller) slots in by adding its
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
{{- list "policy" "feedback" "reward" "trainer" "rollout" | toJson }}
{{- end }}

{{/*
Facts of each service's code (not choices): the `modalign` subcommand, how it reports health, its ports
(name, and the key of its values that holds the number), which port serves /metrics, what it reads.
workload: the kind that runs it; stateless services are Deployments (or KServe InferenceServices),
the trainer a StatefulSet (see trainer.yaml). singleton: exactly one pod, never two at once (replicas 1,
strategy Recreate, no autoscaler or disruption budget).
*/}}
{{- define "modalign.componentFacts" -}}
policy:
  command: policy
  workload: Deployment
  grpcHealthService: modalign.v1.PolicyService
  ports:
    - {name: grpc, key: grpcPort, appProtocol: grpc}
    # The OpenAI-compatible HTTP API (/v1/chat/completions, /v1/feedback, /v1/models).
    - {name: http, key: httpPort, appProtocol: http}
    - {name: metrics, key: metricsPort, appProtocol: http}
  metricsPortName: metrics
  httpLivePath: /healthz
  httpProbePort: http
  usesKafka: true
  usesModelStore: true
  usesBlobStore: true
  authenticates: true
feedback:
  command: feedback
  workload: Deployment
  grpcHealthService: modalign.v1.FeedbackService
  ports:
    - {name: grpc, key: grpcPort, appProtocol: grpc}
    - {name: metrics, key: metricsPort, appProtocol: http}
  metricsPortName: metrics
  usesKafka: true
  usesModelStore: false
  usesBlobStore: false
  authenticates: true
reward:
  command: reward
  workload: Deployment
  httpReadyPath: /v2/health/ready
  httpLivePath: /v2/health/live
  httpProbePort: http
  ports:
    - {name: http, key: httpPort, appProtocol: http}
    - {name: grpc, key: grpcPort, appProtocol: grpc}
  metricsPortName: http
  # Only to follow published versions (reward.followVersions).
  usesKafka: false
  usesModelStore: true
  usesBlobStore: false
  authenticates: true
trainer:
  command: trainer
  workload: StatefulSet
  # It serves nothing but /metrics: the probes ask that server, which starts once the models are
  # loaded and the Kafka consumers are assigned.
  httpReadyPath: /metrics
  httpLivePath: /metrics
  httpProbePort: metrics
  ports:
    - {name: metrics, key: metricsPort, appProtocol: http}
  metricsPortName: metrics
  usesKafka: true
  usesModelStore: true
  writesModelStore: true
  usesBlobStore: true
rollout:
  command: rollout
  workload: Deployment
  # A single leader: a second controller fences the first through Kafka transactions.
  singleton: true
  grpcHealthService: modalign.v1.RolloutService
  ports:
    - {name: grpc, key: grpcPort, appProtocol: grpc}
    - {name: metrics, key: metricsPort, appProtocol: http}
  authenticates: true
  metricsPortName: metrics
  usesKafka: true
  usesModelStore: false
  # It reads the prompts' images to have the reward model score canary and stable responses.
  usesBlobStore: true
{{- end }}

{{/*
The name the services give the policy's starting model: the policy's --policy-version, the controller's
--rollout.initial-version, and the parent the trainer gives its first version.
*/}}
{{- define "modalign.initialPolicyVersion" -}}v0{{- end }}

{{/*
Does the rollout controller drive the policy's KServe InferenceService (--kserve.inference-service)?
So it does whenever both run: KServe then splits traffic between revisions, each serving one version.
*/}}
{{- define "modalign.rolloutDrivesKServe" -}}
{{- if and .Values.rollout.enabled .Values.policy.enabled .Values.policy.kserve.enabled }}true{{- end }}
{{- end }}

{{/* The policy's --follow: none under a controller-driven InferenceService (its revision's version only), else policy.follow. */}}
{{- define "modalign.policyFollow" -}}
{{- ternary "none" .Values.policy.follow (eq (include "modalign.rolloutDrivesKServe" .) "true") }}
{{- end }}

{{/*
Does the component load the versions the trainer publishes while it runs? The reward service with
followVersions; the policy when it follows the rollout or the latest version, or when the controller
names a published version's folder in its InferenceService. Args: (dict "root" $ "component" NAME)
*/}}
{{- define "modalign.followsVersions" -}}
{{- if eq .component "policy" }}
{{- if or (ne (include "modalign.policyFollow" .root) "none") (include "modalign.rolloutDrivesKServe" .root) }}true{{- end }}
{{- else }}
{{- $values := index .root.Values .component }}
{{- if $values.followVersions }}true{{- end }}
{{- end }}
{{- end }}

{{/* Does the component read Kafka: by its code, or (reward) to follow published versions? Args: (dict "root" $ "component" NAME) */}}
{{- define "modalign.usesKafka" -}}
{{- $facts := index (include "modalign.componentFacts" .root | fromYaml) .component }}
{{- $values := index .root.Values .component }}
{{- if or $facts.usesKafka (include "modalign.followsVersions" .) }}true{{- end }}
{{- end }}

{{/*
Does the component read the model store: its starting model (modelFromStore), the versions the trainer
publishes (followVersions), or (the trainer) both ways? Args: (dict "root" $ "component" NAME)
*/}}
{{- define "modalign.usesModelStore" -}}
{{- $facts := index (include "modalign.componentFacts" .root | fromYaml) .component }}
{{- $values := index .root.Values .component }}
{{- if and $facts.usesModelStore (or $values.modelFromStore (include "modalign.followsVersions" .) $facts.writesModelStore) }}true{{- end }}
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
  {{- if and $tls $kafka.strimzi.acls }}
  {{- /* Each pod mounts its own KafkaUser's Secret here (modalign.kafkaVolumes). */}}
  name: per-component
  certificateKey: user.crt
  privateKeyKey: user.key
  {{- else }}
  name: ""
  {{- end }}
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

{{/* Args: the root context. */}}
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

{{/* Args: (dict "root" $ "component" NAME): with Strimzi ACLs, the client certificate is the component's own KafkaUser's. */}}
{{- define "modalign.kafkaVolumes" -}}
{{- $connection := include "modalign.kafkaConnection" .root | fromYaml }}
{{- $clientSecret := $connection.clientSecret.name }}
{{- if eq $clientSecret "per-component" }}
{{- $clientSecret = include "modalign.componentName" . }}
{{- end }}
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
    secretName: {{ $clientSecret }}
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

{{/* The S3 store's root, s3://bucket/prefix: where the trainer publishes. */}}
{{- define "modalign.s3StoreUri" -}}
{{- $s3 := .Values.modelStore.s3 }}
{{- list (printf "s3://%s" $s3.bucket) ($s3.prefix | trimAll "/") | compact | join "/" }}
{{- end }}

{{/* The S3 URI of a starting version, as KServe's storage initializer takes it. Args: (dict "root" $ "kind" "policy"|"reward") */}}
{{- define "modalign.modelStorageUri" -}}
{{- printf "%s/%s" (include "modalign.s3StoreUri" .root) (index .root.Values.modelStore.initialVersions .kind) }}
{{- end }}

{{/*
Does the component talk to an S3 model store itself: the trainer publishing into it, or a service
loading the versions it publishes (fetched into a local cache)? Args: (dict "root" $ "component" NAME)
*/}}
{{- define "modalign.readsS3" -}}
{{- $facts := index (include "modalign.componentFacts" .root | fromYaml) .component }}
{{- if and (eq .root.Values.modelStore.type "s3") $facts.usesModelStore (or $facts.writesModelStore (include "modalign.followsVersions" .)) }}true{{- end }}
{{- end }}

{{/* The TCP port of the S3 endpoint: its own, else 80 (http://) or 443 (https://, and AWS S3). */}}
{{- define "modalign.s3Port" -}}
{{- $endpoint := .Values.modelStore.s3.endpoint }}
{{- $hostPort := $endpoint | trimPrefix "https://" | trimPrefix "http://" | splitList "/" | first }}
{{- if contains ":" $hostPort }}{{ splitList ":" $hostPort | last }}{{ else }}{{ ternary 80 443 (hasPrefix "http://" $endpoint) }}{{ end }}
{{- end }}

{{/* Where services that load versions from S3 keep their verified copies: in the models emptyDir. */}}
{{- define "modalign.s3CacheDir" -}}{{ .Values.modelStore.mountPath }}/cache{{- end }}

{{/*
Refuses combinations that cannot work, with what to change: the rollout controller, when it drives
the policy's InferenceService, owns its canary share.
*/}}
{{- define "modalign.validate" -}}
{{- if and (eq .Values.kafka.mode "strimzi") .Values.kafka.strimzi.acls (ne .Values.kafka.strimzi.listener "tls") }}
{{- fail "kafka.strimzi.acls authenticates each service by its TLS client certificate: set kafka.strimzi.listener tls (or acls false)" }}
{{- end }}
{{- if and .Values.auth.insecure (or .Values.auth.tokensSecret .Values.auth.jwt.publicKeySecret) }}
{{- fail "auth.insecure turns authentication off: unset auth.tokensSecret and auth.jwt.publicKeySecret, or auth.insecure" }}
{{- end }}
{{- if and (include "modalign.rolloutDrivesKServe" .) (not (kindIs "invalid" .Values.policy.kserve.canaryTrafficPercent)) }}
{{- fail "the rollout controller sets the canaryTrafficPercent of the policy's InferenceService step by step: leave policy.kserve.canaryTrafficPercent null (or set rollout.enabled false to set it yourself)" }}
{{- end }}
{{- $rollout := .Values.rollout }}
{{- if $rollout.enabled }}
{{- $previous := 0 }}
{{- range $step := $rollout.steps }}
{{- if le (int $step) $previous }}
{{- fail (printf "rollout.steps must increase, step by step, got %s" (toJson $rollout.steps)) }}
{{- end }}
{{- $previous = int $step }}
{{- end }}
{{- if and (has "reward" $rollout.requiredMetrics) (not (and $rollout.scoreWithReward .Values.reward.enabled)) }}
{{- fail "rollout.requiredMetrics names reward, which needs the reward service (reward.enabled) and rollout.scoreWithReward" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The S3 key pair from modelStore.s3.secretName, as every AWS client reads it. */}}
{{- define "modalign.s3Credentials" -}}
{{- $s3 := .Values.modelStore.s3 }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ $s3.secretName }}, key: {{ $s3.accessKeyIdKey }}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ $s3.secretName }}, key: {{ $s3.secretAccessKeyKey }}}
{{- end }}

{{/* Env of KServe's storage initializer for S3 (its documented variables). */}}
{{- define "modalign.s3Env" -}}
{{- $s3 := .Values.modelStore.s3 }}
{{- include "modalign.s3Credentials" . }}
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

{{/* The trainer's work directory (its checkpoint): the mount point of its persistent volume. */}}
{{- define "modalign.trainerWorkDir" -}}/var/lib/modalign/trainer{{- end }}

{{/* The distinct ports of Kafka's bootstrap servers, as a JSON list of integers. */}}
{{- define "modalign.kafkaPorts" -}}
{{- $connection := include "modalign.kafkaConnection" . | fromYaml }}
{{- $ports := list }}
{{- range $server := splitList "," $connection.bootstrapServers }}
{{- $ports = append $ports (regexFind "[0-9]+$" (trim $server) | int) }}
{{- end }}
{{- $ports | uniq | toJson }}
{{- end }}

{{/*
PromQL: how many times a counter went up within a window, per series. increase() alone misses the
first events of a labelled counter, which the services create at its first event (already at 1, with
no earlier 0 to rise from): a series that did not exist a window ago counts its whole value.
Args: (dict "selector" SELECTOR "window" DURATION)
*/}}
{{- define "modalign.events" -}}
({{ .selector }} unless {{ .selector }} offset {{ .window }}) or increase({{ .selector }}[{{ .window }}])
{{- end }}

{{/* The headless Service of the policy pods' /metrics, which the rollout controller resolves to every replica. */}}
{{- define "modalign.policyMetricsServiceName" -}}
{{- printf "%s-metrics" (include "modalign.componentName" (dict "root" . "component" "policy")) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* A NetworkPolicyPeer list item: the rollout controller's pod. */}}
{{- define "modalign.policyPeer" -}}
- podSelector:
    matchLabels:
      {{- include "modalign.componentSelectorLabels" (dict "root" . "component" "policy") | nindent 6 }}
{{- end }}

{{- define "modalign.rolloutPeer" -}}
- podSelector:
    matchLabels:
      {{- include "modalign.componentSelectorLabels" (dict "root" . "component" "rollout") | nindent 6 }}
{{- end }}

{{/*
The predictor annotations through which the rollout controller tells a controller-driven policy
InferenceService which version its new revision serves (services/rollout/kserve.py). The chart writes
the starting version at install; on upgrades it writes back what the controller last set (lookup), so
an upgrade neither rolls the policy back to its starting version nor conflicts with the controller's
writes. (helm template and --dry-run cannot look up: they show the starting version.)
*/}}
{{- define "modalign.policyVersionAnnotations" -}}
{{- $name := include "modalign.componentName" (dict "root" . "component" "policy") }}
{{- $live := lookup "serving.kserve.io/v1beta1" "InferenceService" .Release.Namespace $name }}
{{- $liveAnnotations := dig "spec" "predictor" "annotations" dict ($live | default dict) }}
{{- $annotations := dict }}
{{- if hasKey $liveAnnotations "modalign.dev/policy-version" }}
{{- $_ := set $annotations "modalign.dev/policy-version" (index $liveAnnotations "modalign.dev/policy-version") }}
{{- with index $liveAnnotations "modalign.dev/policy-model-dir" }}
{{- $_ := set $annotations "modalign.dev/policy-model-dir" . }}
{{- end }}
{{- else }}
{{- $_ := set $annotations "modalign.dev/policy-version" (include "modalign.initialPolicyVersion" .) }}
{{- with include "modalign.startModelDir" (dict "root" . "component" "policy") }}
{{- $_ := set $annotations "modalign.dev/policy-model-dir" . }}
{{- end }}
{{- end }}
{{- toYaml $annotations }}
{{- end }}

{{/*
Env of a controller-driven policy InferenceService's container: the version and model folder of its
revision, from the annotations above (the downward API; env wins over the ConfigMap's values). Knative
(KServe Serverless mode) accepts fieldRef only with its feature flag kubernetes.podspec-fieldref enabled.
*/}}
{{- define "modalign.policyVersionEnv" -}}
- name: MODALIGN_POLICY_VERSION
  valueFrom:
    fieldRef: {fieldPath: "metadata.annotations['modalign.dev/policy-version']"}
- name: MODALIGN_MODEL_DIR
  valueFrom:
    fieldRef: {fieldPath: "metadata.annotations['modalign.dev/policy-model-dir']"}
{{- end }}

{{/* The Secret of the services' bearer tokens: auth.tokensSecret, or the chart's own (auth.yaml). */}}
{{- define "modalign.tokensSecret" -}}
{{- .Values.auth.tokensSecret | default (printf "%s-tokens" (include "modalign.fullname" .)) }}
{{- end }}

{{/* Where a service that authenticates its callers finds the tokens (and the JWT key). */}}
{{- define "modalign.authDir" -}}/etc/modalign/auth{{- end }}
{{- define "modalign.jwtDir" -}}/etc/modalign/jwt{{- end }}

{{/* The auth settings of a service that authenticates its callers. */}}
{{- define "modalign.authConfigData" -}}
{{- $auth := .Values.auth }}
{{- if $auth.insecure }}
MODALIGN_AUTH_INSECURE: "true"
{{- else }}
MODALIGN_AUTH_TOKENS_FILE: {{ printf "%s/tokens.json" (include "modalign.authDir" .) | quote }}
{{- if $auth.jwt.publicKeySecret }}
MODALIGN_AUTH_JWT_PUBLIC_KEY: {{ printf "%s/public.pem" (include "modalign.jwtDir" .) | quote }}
MODALIGN_AUTH_JWT_AUDIENCE: {{ $auth.jwt.audience | quote }}
MODALIGN_AUTH_JWT_ISSUER: {{ $auth.jwt.issuer | quote }}
{{- end }}
MODALIGN_AUTH_FRONT_ENDS: {{ join "," $auth.frontEnds | quote }}
{{- end }}
{{- end }}

{{/*
What each service may do on Kafka, as the KafkaUser ACLs of Strimzi mode grant it (strimzi.yaml): the
topics it reads and writes (names without the prefix), its consumer group and its transactional id.
Every service may also Describe every modalign topic (checking at start that they exist).
*/}}
{{- define "modalign.kafkaAccess" -}}
policy:
  read: [policy-versions, rollout]
  write: [generations]
feedback:
  read: [feedback, generations]
  write: [feedback]
reward:
  read: [policy-versions]
  write: []
trainer:
  read: [generations, feedback, policy-versions, rollout]
  write: [feedback.dlq, policy-versions]
  group: {{ .Values.trainer.groupId }}
rollout:
  read: [generations, feedback, policy-versions, rollout]
  write: [rollout]
  transactionalId: rollout-controller
{{- end }}
