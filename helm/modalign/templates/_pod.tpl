{{/*
The pod spec of a service, shared by its Deployment and its KServe InferenceService predictor (whose
pod fields sit inline in spec.predictor). Args: (dict "root" $ "component" NAME "kserve" BOOL)
*/}}
{{- define "modalign.podSpec" -}}
{{- $root := .root }}
{{- $component := .component }}
{{- $kserve := .kserve }}
{{- $values := index $root.Values $component }}
{{- $facts := index (include "modalign.componentFacts" $root | fromYaml) $component }}
{{- $store := $root.Values.modelStore }}
{{- $mountsModelStore := and $facts.usesModelStore $values.modelFromStore (not $kserve) }}
{{- $copiesFromS3 := and $mountsModelStore (eq $store.type "s3") }}
serviceAccountName: {{ include "modalign.serviceAccountName" $root }}
automountServiceAccountToken: false
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ $values.terminationGracePeriodSeconds }}
{{- include "modalign.scheduling" $values }}
{{- if $copiesFromS3 }}
initContainers:
  # KServe's storage initializer copies the served model version from S3 into the pod.
  - name: storage-initializer
    image: {{ $store.storageInitializer.image }}
    args:
      - {{ include "modalign.modelStorageUri" $root | quote }}
      - {{ printf "%s/%s" $store.mountPath $store.currentVersionPath | quote }}
    env:
      {{- include "modalign.s3Env" $root | nindent 6 }}
    resources:
      {{- toYaml $store.storageInitializer.resources | nindent 6 }}
    securityContext:
      {{- toYaml $root.Values.containerSecurityContext | nindent 6 }}
    volumeMounts:
      - {name: models, mountPath: {{ $store.mountPath }}}
      - {name: tmp, mountPath: /tmp}
{{- end }}
containers:
  - name: {{ ternary "kserve-container" $component $kserve }}
    image: {{ include "modalign.image" (dict "root" $root "component" $component) }}
    imagePullPolicy: {{ $root.Values.images.pullPolicy }}
    args: [{{ $facts.command | quote }}]
    envFrom:
      {{- if $facts.usesKafka }}
      - configMapRef:
          name: {{ include "modalign.fullname" $root }}-kafka
      {{- end }}
      - configMapRef:
          name: {{ include "modalign.componentName" (dict "root" $root "component" $component) }}
    {{- $env := "" }}
    {{- if $facts.usesKafka }}
    {{- $env = include "modalign.kafkaSecretEnv" $root }}
    {{- end }}
    {{- if and $kserve $facts.usesModelStore $values.modelFromStore }}
    {{- /* KServe injects its storage initializer for a container with STORAGE_URI. */}}
    {{- $env = printf "%s\n- name: STORAGE_URI\n  value: %s" $env (include "modalign.modelStorageUri" $root | quote) }}
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
      {{- else if $facts.grpcHealthService }}
      - {name: grpc, containerPort: {{ $values.grpcPort }}, protocol: TCP}
      - {name: metrics, containerPort: {{ $values.metricsPort }}, protocol: TCP}
      {{- else }}
      - {name: http, containerPort: {{ $values.httpPort }}, protocol: TCP}
      - {name: grpc, containerPort: {{ $values.grpcPort }}, protocol: TCP}
      {{- end }}
    {{- if $facts.grpcHealthService }}
    {{- $grpcProbe := dict "port" (int $values.grpcPort) "service" $facts.grpcHealthService }}
    {{- if not $kserve }}
    startupProbe:
      grpc: {{ toJson $grpcProbe }}
      periodSeconds: 10
      failureThreshold: {{ $values.startupFailureThreshold }}
    livenessProbe:
      grpc: {{ toJson (dict "port" (int $values.grpcPort) "service" "") }}
      periodSeconds: 10
      timeoutSeconds: 5
      failureThreshold: 3
    {{- end }}
    readinessProbe:
      grpc: {{ toJson $grpcProbe }}
      periodSeconds: 5
      timeoutSeconds: 3
      failureThreshold: 2
    {{- else }}
    {{- if not $kserve }}
    startupProbe:
      httpGet: {path: {{ $facts.httpReadyPath }}, port: http}
      periodSeconds: 10
      failureThreshold: {{ $values.startupFailureThreshold }}
    livenessProbe:
      httpGet: {path: {{ $facts.httpLivePath }}, port: http}
      periodSeconds: 10
      timeoutSeconds: 5
      failureThreshold: 3
    {{- end }}
    readinessProbe:
      httpGet: {path: {{ $facts.httpReadyPath }}{{ if not $kserve }}, port: http{{ end }}}
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
      {{- if $mountsModelStore }}
      - {name: models, mountPath: {{ $store.mountPath }}, readOnly: {{ not $copiesFromS3 }}}
      {{- end }}
      {{- if $facts.usesBlobStore }}
      - {name: blobs, mountPath: {{ $root.Values.blobStore.mountPath }}}
      {{- end }}
      {{- if $facts.usesKafka }}
      {{- with include "modalign.kafkaVolumeMounts" $root | trim }}
      {{- . | nindent 6 }}
      {{- end }}
      {{- end }}
volumes:
  - {name: tmp, emptyDir: {}}
  # Hugging Face, torch and Triton caches (XDG_CACHE_HOME of the image's user).
  - {name: cache, emptyDir: {}}
  {{- if $copiesFromS3 }}
  - {name: models, emptyDir: {}}
  {{- else if $mountsModelStore }}
  - name: models
    persistentVolumeClaim:
      claimName: {{ include "modalign.modelStoreClaim" $root }}
      readOnly: true
  {{- end }}
  {{- if $facts.usesBlobStore }}
  - name: blobs
    persistentVolumeClaim:
      claimName: {{ include "modalign.blobStoreClaim" $root }}
  {{- end }}
  {{- if $facts.usesKafka }}
  {{- with include "modalign.kafkaVolumes" $root | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  {{- end }}
{{- end }}
