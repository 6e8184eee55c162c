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
servesTls: its API listeners take --tls.* (tls.enabled puts them on TLS; /metrics on a port of its own
stays plain HTTP).
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
  servesTls: true
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
  servesTls: true
reward:
  command: reward
  workload: Deployment
  httpReadyPath: /v2/health/ready
  httpLivePath: /v2/health/live
  httpProbePort: http
  ports:
    - {name: http, key: httpPort, appProtocol: http}
    - {name: grpc, key: grpcPort, appProtocol: grpc}
  # /metrics on the REST port, where KServe serves it: with tls.enabled it is scraped over HTTPS.
  metricsPortName: http
  # Only to follow published versions (reward.followVersions).
  usesKafka: false
  usesModelStore: true
  usesBlobStore: false
  authenticates: true
  servesTls: true
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
  servesTls: true
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

{{/*
Replication of the modalign topics (and, with Strimzi, of Kafka's internal ones): kafka.replicationFactor
and kafka.minInsyncReplicas, or where empty 3 and 2 on a Strimzi cluster of three brokers or more (as many
replicas as brokers up to 3, min ISR one less, at least 1) and 1 and 1 on an external one.
*/}}
{{- define "modalign.kafkaReplication" -}}
{{- $kafka := .Values.kafka }}
{{- $strimzi := eq $kafka.mode "strimzi" }}
{{- $replication := $kafka.replicationFactor | default (ternary (min 3 $kafka.strimzi.replicas) 1 $strimzi) | int }}
{{- $minIsr := $kafka.minInsyncReplicas | default (ternary (max 1 (sub $replication 1)) 1 $strimzi) | int }}
replicationFactor: {{ $replication }}
minInsyncReplicas: {{ $minIsr }}
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
Refuses combinations that cannot work, or that would weaken security without being asked to, with what
to change: topics need at least min ISR replicas, and Strimzi as many brokers as replicas; the rollout controller, when it drives the policy's InferenceService, owns its canary share;
a plaintext S3 endpoint needs modelStore.s3.allowPlaintext; TLS needs a certificate for every service.
*/}}
{{- define "modalign.validate" -}}
{{- $replication := include "modalign.kafkaReplication" . | fromYaml }}
{{- if gt $replication.minInsyncReplicas $replication.replicationFactor }}
{{- fail (printf "kafka.minInsyncReplicas %v is more than kafka.replicationFactor %v: no write could ever be acknowledged" $replication.minInsyncReplicas $replication.replicationFactor) }}
{{- end }}
{{- if and (eq .Values.kafka.mode "strimzi") (gt (int $replication.replicationFactor) (int .Values.kafka.strimzi.replicas)) }}
{{- fail (printf "kafka.replicationFactor %v is more than the %v brokers of kafka.strimzi.replicas: the topics could not be created" $replication.replicationFactor .Values.kafka.strimzi.replicas) }}
{{- end }}
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
{{- $s3 := .Values.modelStore.s3 }}
{{- if and (eq .Values.modelStore.type "s3") (hasPrefix "http://" $s3.endpoint) (not $s3.allowPlaintext) }}
{{- fail (printf "modelStore.s3.endpoint %s is plaintext HTTP: S3 request signatures and every model file would cross the network unencrypted. Give an https:// endpoint, or set modelStore.s3.allowPlaintext true to accept that" $s3.endpoint) }}
{{- end }}
{{- include "modalign.validateTls" . }}
{{- end }}

{{- define "modalign.validateTls" -}}
{{- $root := . }}
{{- $tls := .Values.tls }}
{{- if and $tls.mutual (not $tls.enabled) }}
{{- fail "tls.mutual asks every caller for a certificate over TLS: set tls.enabled too" }}
{{- end }}
{{- if $tls.enabled }}
{{- $certManager := $tls.certManager }}
{{- if and $certManager.enabled (not $certManager.issuerRef.name) }}
{{- fail "tls.certManager.enabled: name the Issuer or ClusterIssuer that signs the services' certificates in tls.certManager.issuerRef.name" }}
{{- end }}
{{- if and $certManager.enabled (or $tls.secretName $tls.secrets) }}
{{- fail "tls.certManager.enabled issues every service's certificate into a Secret of its own: unset tls.secretName and tls.secrets, or tls.certManager.enabled" }}
{{- end }}
{{- range $component := include "modalign.components" . | fromJsonArray }}
{{- $args := dict "root" $root "component" $component }}
{{- if and (index $root.Values $component).enabled (include "modalign.servesTls" $args) }}
{{- if include "modalign.servedByKServe" $args }}
{{- fail (printf "tls.enabled cannot be combined with %s.kserve.enabled: KServe (through Knative's queue-proxy in Serverless mode) reaches and probes the predictor's container over plaintext, so a container serving TLS would get no traffic. Encrypt KServe's traffic with Knative's or a service mesh's TLS and leave tls.enabled false, or run the %s service as a Deployment (%s.kserve.enabled false)" $component $component $component) }}
{{- end }}
{{- if not (include "modalign.tlsSecretName" $args) }}
{{- fail (printf "tls.enabled: the %s service has no certificate: give tls.secrets.%s or tls.secretName (a Secret with tls.crt, tls.key and ca.crt), or set tls.certManager.enabled" $component $component) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (include "modalign.metricsNeedClientCertificate" .) (not (include "modalign.metricsClientSecret" .)) }}
{{- fail "tls.mutual: Prometheus needs a client certificate to scrape the reward service's /metrics, which shares its REST port: give tls.metricsClientSecret (a Secret with tls.crt and tls.key from the services' CA), or set tls.certManager.enabled, or monitoring.serviceMonitor.enabled false" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The component's S3 key pair (modalign.s3SecretName), as every AWS client reads it; none without a Secret. Args: (dict "root" $ "component" NAME) */}}
{{- define "modalign.s3Credentials" -}}
{{- $s3 := .root.Values.modelStore.s3 }}
{{- with include "modalign.s3SecretName" . }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: {{ $s3.accessKeyIdKey }}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: {{ $s3.secretAccessKeyKey }}}
{{- end }}
{{- end }}

{{/* Env of KServe's storage initializer for S3 (its documented variables). Args: (dict "root" $ "component" NAME) */}}
{{- define "modalign.s3Env" -}}
{{- $s3 := .root.Values.modelStore.s3 }}
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

{{/* Where a service that serves TLS finds its Secret's files: tls.crt, tls.key and ca.crt. */}}
{{- define "modalign.tlsDir" -}}/etc/modalign/tls{{- end }}

{{/* Does the component serve its APIs over TLS (tls.enabled)? Args: (dict "root" $ "component" NAME) */}}
{{- define "modalign.servesTls" -}}
{{- $facts := index (include "modalign.componentFacts" .root | fromYaml) .component }}
{{- if and .root.Values.tls.enabled $facts.servesTls }}true{{- end }}
{{- end }}

{{/*
Is the component's /metrics on one of its TLS API ports (the reward service's, on its REST port), so
that Prometheus scrapes it over HTTPS? Every other service serves /metrics, plain, on a port named
metrics of its own. Args: (dict "root" $ "component" NAME)
*/}}
{{- define "modalign.metricsOverTls" -}}
{{- $facts := index (include "modalign.componentFacts" .root | fromYaml) .component }}
{{- if and (include "modalign.servesTls" .) (ne $facts.metricsPortName "metrics") }}true{{- end }}
{{- end }}

{{/*
The Secret of a TLS service's certificate: the one cert-manager fills for the chart's Certificate
(certificates.yaml), else tls.secrets.<component>, else the shared tls.secretName.
Args: (dict "root" $ "component" NAME)
*/}}
{{- define "modalign.tlsSecretName" -}}
{{- $tls := .root.Values.tls }}
{{- if $tls.certManager.enabled }}
{{- printf "%s-tls" (include "modalign.componentName" .) | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- index $tls.secrets .component | default $tls.secretName }}
{{- end }}
{{- end }}

{{/* The settings of a TLS service's listeners: its certificate and, under tls.mutual, the CA its callers' certificates must chain to. */}}
{{- define "modalign.tlsConfigData" -}}
{{- $dir := include "modalign.tlsDir" . }}
MODALIGN_TLS_CERT: {{ printf "%s/tls.crt" $dir | quote }}
MODALIGN_TLS_KEY: {{ printf "%s/tls.key" $dir | quote }}
{{- if .Values.tls.mutual }}
MODALIGN_TLS_CLIENT_CA: {{ printf "%s/ca.crt" $dir | quote }}
{{- end }}
{{- end }}

{{/*
How a service calls another over TLS (the policy the feedback service: --feedback-tls.*; the rollout
controller the reward service: --reward-tls.*, by prefix): it verifies the other's certificate against
the ca.crt of its own Secret, every certificate coming from one CA, and under tls.mutual presents its
own certificate. Args: (dict "root" $ "prefix" "MODALIGN_FEEDBACK_TLS")
*/}}
{{- define "modalign.clientTlsConfigData" -}}
{{- if .root.Values.tls.enabled }}
{{- $dir := include "modalign.tlsDir" .root }}
{{ .prefix }}_CA: {{ printf "%s/ca.crt" $dir | quote }}
{{- if .root.Values.tls.mutual }}
{{ .prefix }}_CERT: {{ printf "%s/tls.crt" $dir | quote }}
{{ .prefix }}_KEY: {{ printf "%s/tls.key" $dir | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Does Prometheus need a client certificate: under tls.mutual, to scrape the reward service's /metrics,
which shares its REST port (modalign.metricsOverTls)?
*/}}
{{- define "modalign.metricsNeedClientCertificate" -}}
{{- if and .Values.tls.mutual .Values.monitoring.serviceMonitor.enabled .Values.reward.enabled (include "modalign.metricsOverTls" (dict "root" . "component" "reward")) }}true{{- end }}
{{- end }}

{{/* The Secret of that client certificate: tls.metricsClientSecret, or the one the chart has cert-manager issue (certificates.yaml). */}}
{{- define "modalign.metricsClientSecret" -}}
{{- $tls := .Values.tls }}
{{- if include "modalign.metricsNeedClientCertificate" . }}
{{- $tls.metricsClientSecret | default (ternary (printf "%s-metrics-client-tls" (include "modalign.fullname" .)) "" $tls.certManager.enabled) }}
{{- end }}
{{- end }}

{{/*
The Secret of the S3 key pair a component uses (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY): the trainer,
the store's one writer, modelStore.s3.secretName; every other pod, which only reads, the readers'.
Empty: no key pair, the pods get their credentials from a workload identity (serviceAccount.annotations,
trainer.serviceAccount.annotations). Args: (dict "root" $ "component" NAME)
*/}}
{{- define "modalign.s3SecretName" -}}
{{- $facts := index (include "modalign.componentFacts" .root | fromYaml) .component }}
{{- if $facts.writesModelStore }}{{ .root.Values.modelStore.s3.secretName }}{{ else }}{{ include "modalign.s3ReaderSecretName" .root }}{{ end }}
{{- end }}

{{/* The readers' S3 Secret: modelStore.s3.readerSecretName, or secretName when that is empty (the readers then hold the write key too). */}}
{{- define "modalign.s3ReaderSecretName" -}}
{{- .Values.modelStore.s3.readerSecretName | default .Values.modelStore.s3.secretName }}
{{- end }}

{{/*
The trainer's ServiceAccount. On S3 it is the store's one writer, so it runs as an account of its own
that a workload identity (trainer.serviceAccount.annotations, e.g. an IAM role for service accounts)
can let write while the others' (serviceAccount) only reads; on a volume the shared one.
*/}}
{{- define "modalign.trainerServiceAccountName" -}}
{{- if ne .Values.modelStore.type "s3" }}
{{- include "modalign.serviceAccountName" . }}
{{- else if .Values.serviceAccount.create }}
{{- .Values.trainer.serviceAccount.name | default (include "modalign.componentName" (dict "root" . "component" "trainer")) }}
{{- else }}
{{- .Values.trainer.serviceAccount.name | default (include "modalign.serviceAccountName" .) }}
{{- end }}
{{- end }}

{{/* What every Certificate of the chart shares (certificates.yaml): its issuer, lifetime and key. */}}
{{- define "modalign.certificateSpec" -}}
{{- $certManager := .Values.tls.certManager -}}
issuerRef:
  {{- toYaml $certManager.issuerRef | nindent 2 }}
duration: {{ $certManager.duration }}
renewBefore: {{ $certManager.renewBefore }}
privateKey:
  {{- toYaml $certManager.privateKey | nindent 2 }}
{{- end }}

{{/*
grpcurl's flags to reach a service port-forwarded to localhost (NOTES.txt): -plaintext, or under TLS the
CA and the name in the service's certificate (and, under tls.mutual, a client certificate of that CA).
Args: (dict "root" $ "component" NAME)
*/}}
{{- define "modalign.grpcurlFlags" -}}
{{- if include "modalign.servesTls" . -}}
-cacert ca.crt -servername {{ include "modalign.componentName" . }}{{ if .root.Values.tls.mutual }} -cert tls.crt -key tls.key{{ end }}
{{- else -}}
-plaintext
{{- end }}
{{- end }}
