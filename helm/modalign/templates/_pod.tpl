{{/*
The pod spec of a service, shared by its Deployment or StatefulSet and its KServe InferenceService
predictor (whose pod fields sit inline in spec.predictor). Args: (dict "root" $ "component" NAME "kserve" BOOL)

The model store: on a PVC every pod that uses it mounts it at modelStore.mountPath, read-only except the
trainer's, which publishes into it; published versions are named by file:// path, so the path must be
the same in every pod. On S3 a service's starting versions are copied in at start, by the chart's
storage-initializer init containers or (InferenceServices) by KServe's, into an emptyDir at
modelStore.mountPath; the trainer publishes to S3 itself, and services that follow its versions fetch
each into a verified cache in that emptyDir; the trainer with the key pair that writes, every other
pod with the one that only reads (modalign.s3SecretName), or each by its ServiceAccount's workload identity.
*/}}
{{- define "modalign.podSpec" -}}
{{- $root := .root }}
{{- $component := .component }}
{{- $kserve := .kserve }}
{{- $args := dict "root" $root "component" $component }}
{{- $values := index $root.Values $component }}
{{- $facts := index (include "modalign.componentFacts" $root | fromYaml) $component }}
{{- $store := $root.Values.modelStore }}
{{- $usesKafka := eq (include "modalign.usesKafka" $args) "true" }}
{{- $usesStore := eq (include "modalign.usesModelStore" $args) "true" }}
{{- $mountsStoreVolume := and $usesStore (eq $store.type "pvc") }}
{{- $onS3 := and $usesStore (eq $store.type "s3") }}
{{- $readsS3 := eq (include "modalign.readsS3" $args) "true" }}
{{- /* The starting versions the chart's init containers copy from S3: the trainer starts from both. */}}
{{- $startKinds := list }}
{{- if and $onS3 $values.modelFromStore (not $kserve) }}
{{- $startKinds = ternary (list "policy" "reward") (list $component) (eq $component "trainer") }}
{{- end }}
{{- $kserveCopiesFromS3 := and $onS3 $kserve }}
{{- $drivesKServe := eq (include "modalign.rolloutDrivesKServe" $root) "true" }}
{{- $servesTls := eq (include "modalign.servesTls" $args) "true" }}
{{- if and (eq $component "rollout") $drivesKServe }}
{{- /* The one pod that calls the Kubernetes API: its own account, allowed to patch the policy's InferenceService (serviceaccount.yaml). */}}
serviceAccountName: {{ include "modalign.componentName" $args }}
automountServiceAccountToken: true
{{- else }}
serviceAccountName: {{ ternary (include "modalign.trainerServiceAccountName" $root) (include "modalign.serviceAccountName" $root) (eq $component "trainer") }}
automountServiceAccountToken: false
{{- end }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ $values.terminationGracePeriodSeconds }}
{{- include "modalign.scheduling" $values }}
{{- with $startKinds }}
initContainers:
  {{- range $kind := . }}
  # KServe's storage initializer copies the starting {{ $kind }} version from S3 into the pod.
  - name: storage-initializer-{{ $kind }}
    image: {{ $store.storageInitializer.image }}
    args:
      - {{ include "modalign.modelStorageUri" (dict "root" $root "kind" $kind) | quote }}
      - {{ printf "%s/%s" $store.mountPath (index $store.initialVersions $kind) | quote }}
    {{- with include "modalign.s3Env" $args | trim }}
    env:
      {{- . | nindent 6 }}
    {{- end }}
    resources:
      {{- toYaml $store.storageInitializer.resources | nindent 6 }}
    securityContext:
      {{- toYaml $root.Values.containerSecurityContext | nindent 6 }}
    volumeMounts:
      - {name: models, mountPath: {{ $store.mountPath }}}
      - {name: tmp, mountPath: /tmp}
  {{- end }}
{{- end }}
containers:
  - name: {{ ternary "kserve-container" $component $kserve }}
    image: {{ include "modalign.image" (dict "root" $root "component" $component) }}
    imagePullPolicy: {{ $root.Values.images.pullPolicy }}
    args: [{{ $facts.command | quote }}]
    envFrom:
      {{- if $usesKafka }}
      - configMapRef:
          name: {{ include "modalign.fullname" $root }}-kafka
      {{- end }}
      - configMapRef:
          name: {{ include "modalign.componentName" $args }}
    {{- $env := "" }}
    {{- if $usesKafka }}
    {{- $env = include "modalign.kafkaSecretEnv" $root }}
    {{- end }}
    {{- if and $kserveCopiesFromS3 $values.modelFromStore }}
    {{- /* KServe injects its storage initializer for a container with STORAGE_URI. */}}
    {{- $env = printf "%s\n- name: STORAGE_URI\n  value: %s" $env (include "modalign.modelStorageUri" (dict "root" $root "kind" $component) | quote) }}
    {{- end }}
    {{- if $readsS3 }}
    {{- $env = printf "%s\n%s" $env (include "modalign.s3Credentials" $args) }}
    {{- end }}
    {{- if and $kserve (eq $component "policy") $drivesKServe }}
    {{- $env = printf "%s\n%s" $env (include "modalign.policyVersionEnv" $root) }}
    {{- end }}
    {{- with $values.extraEnv }}
    {{- $env = printf "%s\n%s" $env (toYaml .) }}
    {{- end }}
    {{- with trim $env }}
    env:
      {{- . | nindent 6 }}
    {{- end }}
    ports:
      {{- if $kserve }}
      {{- /* Knative routes one port per container: h2c for gRPC, http1 for REST. */}}
      {{- if $facts.grpcHealthService }}
      - {name: h2c, containerPort: {{ $values.grpcPort }}, protocol: TCP}
      {{- else }}
      - {name: http1, containerPort: {{ $values.httpPort }}, protocol: TCP}
      {{- end }}
      {{- else }}
      {{- range $port := $facts.ports }}
      - {name: {{ $port.name }}, containerPort: {{ index $values $port.key }}, protocol: TCP}
      {{- end }}
      {{- end }}
    {{- /* What every probe of this container shares: whether its API ports serve TLS (modalign.probeHandler). */}}
    {{- $probe := dict "secure" $servesTls "mutual" $root.Values.tls.mutual }}
    {{- if $facts.grpcHealthService }}
    {{- $grpcProbe := merge (dict "port" "grpc" "grpc" (dict "port" (int $values.grpcPort) "service" $facts.grpcHealthService)) $probe }}
    {{- if not $kserve }}
    startupProbe:
      {{- include "modalign.probeHandler" $grpcProbe | nindent 6 }}
      periodSeconds: 10
      failureThreshold: {{ $values.startupFailureThreshold }}
    livenessProbe:
      {{- if $facts.httpLivePath }}
      {{- /* The policy serves gRPC and HTTP from one process: ready by gRPC, alive by HTTP, so both are watched. */}}
      {{- include "modalign.probeHandler" (merge (dict "port" $facts.httpProbePort "path" $facts.httpLivePath) $probe) | nindent 6 }}
      {{- else }}
      {{- include "modalign.probeHandler" (merge (dict "port" "grpc" "grpc" (dict "port" (int $values.grpcPort) "service" "")) $probe) | nindent 6 }}
      {{- end }}
      periodSeconds: 10
      timeoutSeconds: 5
      failureThreshold: 3
    {{- end }}
    readinessProbe:
      {{- include "modalign.probeHandler" $grpcProbe | nindent 6 }}
      periodSeconds: 5
      timeoutSeconds: 3
      failureThreshold: 2
    {{- else }}
    {{- if not $kserve }}
    startupProbe:
      {{- include "modalign.probeHandler" (merge (dict "port" $facts.httpProbePort "path" $facts.httpReadyPath) $probe) | nindent 6 }}
      periodSeconds: 10
      failureThreshold: {{ $values.startupFailureThreshold }}
    livenessProbe:
      {{- include "modalign.probeHandler" (merge (dict "port" $facts.httpProbePort "path" $facts.httpLivePath) $probe) | nindent 6 }}
      periodSeconds: 10
      timeoutSeconds: 5
      failureThreshold: 3
    {{- end }}
    readinessProbe:
      {{- /* Under KServe the port is Knative's to fill in. */}}
      {{- include "modalign.probeHandler" (merge (dict "port" (ternary "" $facts.httpProbePort $kserve) "path" $facts.httpReadyPath) $probe) | nindent 6 }}
      periodSeconds: 5
      timeoutSeconds: 3
      failureThreshold: 2
    {{- end }}
    resources:
      {{- include "modalign.resources" $values | nindent 6 }}
    securityContext:
      {{- toYaml $root.Values.containerSecurityContext | nindent 6 }}
    volumeMounts:
      - {name: tmp, mountPath: /tmp}
      - {name: cache, mountPath: /home/modalign/.cache}
      {{- $storeEmptyDir := or $startKinds $readsS3 }}
      {{- if or $mountsStoreVolume $storeEmptyDir }}
      - {name: models, mountPath: {{ $store.mountPath }}, readOnly: {{ not (or $storeEmptyDir $facts.writesModelStore) }}}
      {{- end }}
      {{- if $facts.usesBlobStore }}
      {{- /* The policy writes the prompts' images; the trainer only reads them. */}}
      - {name: blobs, mountPath: {{ $root.Values.blobStore.mountPath }}{{ if ne $component "policy" }}, readOnly: true{{ end }}}
      {{- end }}
      {{- if eq $facts.workload "StatefulSet" }}
      - {name: work, mountPath: {{ include "modalign.trainerWorkDir" $root }}}
      {{- end }}
      {{- if $usesKafka }}
      {{- with include "modalign.kafkaVolumeMounts" $root | trim }}
      {{- . | nindent 6 }}
      {{- end }}
      {{- end }}
      {{- if and $facts.authenticates (not $root.Values.auth.insecure) }}
      {{- /* Whole Secret volumes, not subPath: an edited Secret reaches the running pod. */}}
      - {name: auth, mountPath: {{ include "modalign.authDir" $root }}, readOnly: true}
      {{- if $root.Values.auth.jwt.publicKeySecret }}
      - {name: jwt, mountPath: {{ include "modalign.jwtDir" $root }}, readOnly: true}
      {{- end }}
      {{- end }}
      {{- if $servesTls }}
      {{- /* The whole Secret too: a renewed certificate reaches the running pod, which re-reads the files. */}}
      - {name: tls, mountPath: {{ include "modalign.tlsDir" $root }}, readOnly: true}
      {{- end }}
volumes:
  - {name: tmp, emptyDir: {}}
  # Hugging Face, torch and Triton caches (XDG_CACHE_HOME of the image's user).
  - {name: cache, emptyDir: {}}
  {{- if or $startKinds $readsS3 }}
  # Starting versions copied from S3, and the verified copies of published ones.
  - {name: models, emptyDir: {}}
  {{- else if $mountsStoreVolume }}
  - name: models
    persistentVolumeClaim:
      claimName: {{ include "modalign.modelStoreClaim" $root }}
      {{- if not $facts.writesModelStore }}
      readOnly: true
      {{- end }}
  {{- end }}
  {{- if and $facts.authenticates (not $root.Values.auth.insecure) }}
  # The callers' bearer tokens (auth.tokensSecret, or the chart's own); readable by fsGroup only.
  - name: auth
    secret: {secretName: {{ include "modalign.tokensSecret" $root }}, defaultMode: 0440}
  {{- with $root.Values.auth.jwt.publicKeySecret }}
  - name: jwt
    secret: {secretName: {{ . }}, defaultMode: 0440}
  {{- end }}
  {{- end }}
  {{- if $servesTls }}
  # The service's certificate, its key (readable by fsGroup only) and the CA (tls).
  - name: tls
    secret: {secretName: {{ include "modalign.tlsSecretName" $args }}, defaultMode: 0440}
  {{- end }}
  {{- if $facts.usesBlobStore }}
  - name: blobs
    persistentVolumeClaim:
      claimName: {{ include "modalign.blobStoreClaim" $root }}
      {{- if ne $component "policy" }}
      readOnly: true
      {{- end }}
  {{- end }}
  {{- if $usesKafka }}
  {{- with include "modalign.kafkaVolumes" $args | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  {{- end }}
  {{- /* The trainer's work volume: a claim per pod from the StatefulSet's volumeClaimTemplates, unless one of these. */}}
  {{- if eq $facts.workload "StatefulSet" }}
  {{- if not $values.persistence.enabled }}
  - {name: work, emptyDir: {}}
  {{- else if $values.persistence.existingClaim }}
  - name: work
    persistentVolumeClaim:
      claimName: {{ $values.persistence.existingClaim }}
  {{- end }}
  {{- end }}
{{- end }}

{{/*
The handler of a probe on one of a service's ports: a gRPC health check (grpc: its port and service)
or an HTTP GET of path. With tls.enabled (secure) kubelet cannot run either as such: its gRPC probes
speak only plaintext, and its HTTPS probes present no client certificate. So a TLS port is probed by an
HTTPS GET (kubelet does not verify the certificate) where it serves HTTP, and by a TCP connect where it
serves gRPC or, under tls.mutual, refuses a handshake without a client certificate. A TCP connect is
a sound start and readiness signal for these services: each opens its API port only once its model is
loaded and its servicer built, the moment before it reports SERVING (what `modalign up` waits for
under TLS too), and a stopping pod leaves its Service's endpoints whatever it reports while it drains.
What it cannot see is a process hung with its port open; the policy's HTTPS liveness probe still does
(unless mutual). An exec probe running a TLS health client would see it too, but would start a Python
interpreter every few seconds in every pod; a plaintext health port would need the services to serve one.
Args: (dict "port" NAME "grpc" (dict "port" N "service" S) | "path" PATH, "secure" BOOL "mutual" BOOL);
an empty port leaves it out (KServe fills it in).
*/}}
{{- define "modalign.probeHandler" -}}
{{- if and .secure (or .grpc .mutual) -}}
tcpSocket: {port: {{ .port }}}
{{- else if .grpc -}}
grpc: {{ toJson .grpc }}
{{- else -}}
httpGet: {path: {{ .path }}{{ with .port }}, port: {{ . }}{{ end }}{{ if .secure }}, scheme: HTTPS{{ end }}}
{{- end }}
{{- end }}
