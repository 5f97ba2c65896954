{{/* Names, labels and the small computed values the templates share. */}}

{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tandem.fullname" -}}
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

{{/* KubeRay names the RayCluster, its pods and Services after the RayService, with suffixes: keep room for them. */}}
{{- define "tandem.rayServiceName" -}}
{{- include "tandem.fullname" . | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "tandem.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: tandem
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/*
Selector labels of the Ray pods of this release. KubeRay adds its own labels to the pods (ray.io/*, and its
app.kubernetes.io/name and created-by), so these select by instance, part-of and component, which it leaves alone.
*/}}
{{- define "tandem.raySelectorLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: tandem
{{- end -}}

{{/*
Labels of the Ray pod templates: no chart or app version, since any change to the pod templates makes KubeRay replace
the whole Ray cluster (upgradeStrategy NewCluster); a chart upgrade that changes nothing else should not.
*/}}
{{- define "tandem.podLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: tandem
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "tandem.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "tandem.redisName" -}}
{{- printf "%s-redis" (include "tandem.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tandem.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s.%s.svc:6379/0" (include "tandem.redisName" .) .Release.Namespace -}}
{{- else -}}
{{- .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{- define "tandem.apiKeySecretName" -}}
{{- if .Values.apiKey.value -}}
{{- printf "%s-api-key" (include "tandem.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- .Values.apiKey.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* The worker pools that get a KubeRay worker group: decode always, prefill when disaggregated. */}}
{{- define "tandem.workerPools" -}}
{{- if .Values.disaggregate -}}prefill decode{{- else -}}decode{{- end -}}
{{- end -}}

{{/* TP groups one worker pod of a pool holds: gpusPerPod / TP size on GPU, one on CPU. Args: (list $ "prefill"). */}}
{{- define "tandem.groupsPerPod" -}}
{{- $root := index . 0 -}}
{{- $pool := index $root.Values (index . 1) -}}
{{- if eq $root.Values.engine.device "cuda" -}}
{{- div (int $pool.gpusPerPod) (int $root.Values.engine.tensorParallelSize) -}}
{{- else -}}
1
{{- end -}}
{{- end -}}

{{/*
A worker group's pod counts as JSON {"replicas", "min", "max"}: enough pods for the pool's Serve replicas (TP groups),
rounded up to whole pods; with autoscaling, the Ray autoscaler moves the count between min and max.
Args: (list $ "prefill").
*/}}
{{- define "tandem.workerPods" -}}
{{- $root := index . 0 -}}
{{- $pool := index $root.Values (index . 1) -}}
{{- $per := int (include "tandem.groupsPerPod" .) -}}
{{- $replicas := div (add (int $pool.replicas) (sub $per 1)) $per -}}
{{- if $pool.autoscaling.enabled -}}
{{- $min := div (add (int $pool.autoscaling.minReplicas) (sub $per 1)) $per -}}
{{- $max := div (add (int $pool.autoscaling.maxReplicas) (sub $per 1)) $per -}}
{{- dict "replicas" $replicas "min" $min "max" $max | toJson -}}
{{- else -}}
{{- dict "replicas" $replicas "min" $replicas "max" $replicas | toJson -}}
{{- end -}}
{{- end -}}

{{/*
Ray's start parameter for a custom resource: KubeRay passes the value to `ray start --resources=...`, so it is JSON
wrapped in quotes. Args: (dict "name" value).
*/}}
{{- define "tandem.rayResources" -}}
{{- printf "\"%s\"" (toJson . | replace "\"" "\\\"") | squote -}}
{{- end -}}

{{/* Where the TLS Secrets are mounted; the cluster config's api.tls_* point here. */}}
{{- define "tandem.tlsDir" -}}/etc/tandem/tls{{- end -}}
{{- define "tandem.clientCADir" -}}/etc/tandem/client-ca{{- end -}}

{{/* Volumes every Ray pod mounts: the models, the TLS Secrets, and a memory-backed /dev/shm. Args: (list $ shmSize). */}}
{{- define "tandem.volumes" -}}
{{- $root := index . 0 -}}
{{- $v := $root.Values -}}
- name: models
{{- if $v.model.pvc.claimName }}
  persistentVolumeClaim:
    claimName: {{ $v.model.pvc.claimName }}
    readOnly: true
{{- else }}
  hostPath:
    path: {{ $v.model.hostPath }}
    type: Directory
{{- end }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ index . 1 }}
{{- if $v.tls.enabled }}
- name: tls
  secret:
    secretName: {{ $v.tls.secretName }}
    defaultMode: 0440
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
{{- if $v.tls.clientCA.enabled }}
- name: client-ca
  secret:
    secretName: {{ default $v.tls.secretName $v.tls.clientCA.secretName }}
    defaultMode: 0440
    items:
      - {key: {{ $v.tls.clientCA.key }}, path: ca.crt}
{{- end }}
{{- end }}
{{- end -}}

{{- define "tandem.volumeMounts" -}}
- {name: models, mountPath: /models, readOnly: true}
- {name: dshm, mountPath: /dev/shm}
{{- if .Values.tls.enabled }}
- {name: tls, mountPath: {{ include "tandem.tlsDir" . }}, readOnly: true}
{{- if .Values.tls.clientCA.enabled }}
- {name: client-ca, mountPath: {{ include "tandem.clientCADir" . }}, readOnly: true}
{{- end }}
{{- end }}
{{- end -}}

{{/* The pod spec fields every Ray pod shares. Args: (list $ poolValues). */}}
{{- define "tandem.podCommon" -}}
{{- $root := index . 0 -}}
{{- $pool := index . 1 -}}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $root.Values.podSecurityContext | nindent 2 }}
{{- with $pool.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $pool.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $pool.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  {{- include "tandem.volumes" (list $root $pool.shmSize) | nindent 2 }}
{{- end -}}

{{/*
The worker pods' probes. KubeRay's default readiness probe of a RayService worker also asks Serve's HTTP proxy on the
serving port over plain HTTP; here the proxy runs on the head pod only (and speaks TLS when tls.enabled), so that
probe would never pass. These check the pod's raylet, as KubeRay's own probe does first.
*/}}
{{- define "tandem.workerProbes" -}}
{{- $check := list "bash" "-c" "wget --tries 1 -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success" -}}
readinessProbe:
  exec:
    command: {{ toJson $check }}
  initialDelaySeconds: 10
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 10
livenessProbe:
  exec:
    command: {{ toJson $check }}
  initialDelaySeconds: 30
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 120
{{- end -}}
