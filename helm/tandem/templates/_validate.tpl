{{/*
Checks across values that values.schema.json cannot express; each failure names the values to change. Rendered once,
at the top of rayservice.yaml, so `helm install`, `helm upgrade` and `helm template` stop on it (`helm lint` only
logs a `fail`).
*/}}

{{- define "tandem.validatePool" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- $pool := index $root.Values $name -}}
{{- $auto := $pool.autoscaling -}}
{{- if $auto.enabled -}}
{{- if gt (int $auto.minReplicas) (int $auto.maxReplicas) -}}
{{- fail (printf "%s.autoscaling.minReplicas (%d) must be <= %s.autoscaling.maxReplicas (%d)" $name (int $auto.minReplicas) $name (int $auto.maxReplicas)) -}}
{{- end -}}
{{- if or (lt (int $pool.replicas) (int $auto.minReplicas)) (gt (int $pool.replicas) (int $auto.maxReplicas)) -}}
{{- fail (printf "%s.replicas (%d) is the initial count when autoscaling: it must be between %s.autoscaling.minReplicas (%d) and maxReplicas (%d)" $name (int $pool.replicas) $name (int $auto.minReplicas) (int $auto.maxReplicas)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A Kubernetes CPU quantity ("8", 8, "7500m") as a float; -1 when absent. */}}
{{- define "tandem.cpuQuantity" -}}
{{- $cpu := . -}}
{{- if kindIs "invalid" $cpu -}}-1
{{- else if hasSuffix "m" (toString $cpu) -}}{{- divf (trimSuffix "m" (toString $cpu) | float64) 1000 -}}
{{- else -}}{{- toString $cpu | float64 -}}
{{- end -}}
{{- end -}}

{{- define "tandem.validateWorkers" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- $pool := index $root.Values $name -}}
{{- $e := $root.Values.engine -}}
{{- $tp := int $e.tensorParallelSize -}}
{{- if eq $e.device "cuda" -}}
{{- if lt (int $pool.gpusPerPod) $tp -}}
{{- fail (printf "%s.gpusPerPod (%d) must be >= engine.tensorParallelSize (%d): the ranks of a TP group share one pod (a STRICT_PACK placement group)" $name (int $pool.gpusPerPod) $tp) -}}
{{- end -}}
{{- if ne (mod (int $pool.gpusPerPod) $tp) 0 -}}
{{- fail (printf "%s.gpusPerPod (%d) must be a multiple of engine.tensorParallelSize (%d): a pod holds whole TP groups, the rest of its GPUs would sit idle" $name (int $pool.gpusPerPod) $tp) -}}
{{- end -}}
{{- end -}}
{{- $limits := default dict $pool.resources.limits -}}
{{- $cpu := include "tandem.cpuQuantity" (index $limits "cpu") | float64 -}}
{{- if lt $cpu 0.0 -}}
{{- fail (printf "%s.resources.limits.cpu is required: KubeRay makes it Ray's CPU count on the pod (without it Ray counts the node's cores)" $name) -}}
{{- end -}}
{{- $groups := int (include "tandem.groupsPerPod" (list $root $name)) -}}
{{- $needed := mulf $groups (addf 0.1 (mulf $tp $e.numCpusPerRank)) -}}
{{- if lt $cpu $needed -}}
{{- fail (printf "%s.resources.limits.cpu (%v) is below what its %d TP group(s) per pod reserve in Ray: %v (0.1 + engine.tensorParallelSize x engine.numCpusPerRank each)" $name (index $limits "cpu") $groups $needed) -}}
{{- end -}}
{{- end -}}

{{- define "tandem.validate" -}}
{{- $v := .Values -}}
{{- range $image := list (list "image.tag" $v.image.tag) (list "redis.image.tag" $v.redis.image.tag) -}}
{{- if eq (index $image 1) "latest" -}}
{{- fail (printf "%s: use a fixed tag, not latest (every Ray pod must run the same image, and a restart must not change it)" (index $image 0)) -}}
{{- end -}}
{{- end -}}
{{- if and $v.tls.enabled (not $v.tls.secretName) -}}
{{- fail "tls.enabled is true but tls.secretName is empty: name a kubernetes.io/tls Secret holding tls.crt and tls.key (e.g. `kubectl create secret tls tandem-tls --cert=server.crt --key=server.key`), or set tls.enabled=false" -}}
{{- end -}}
{{- if and $v.tls.clientCA.enabled (not $v.tls.enabled) -}}
{{- fail "tls.clientCA.enabled (mutual TLS) needs tls.enabled=true and tls.secretName" -}}
{{- end -}}
{{- if and $v.apiKey.enabled (not $v.apiKey.value) (not $v.apiKey.existingSecret) -}}
{{- fail "apiKey.enabled is true but no key is given: set apiKey.existingSecret (a Secret holding the key under apiKey.key) or apiKey.value, or apiKey.enabled=false to serve without a key" -}}
{{- end -}}
{{- if and $v.model.pvc.claimName $v.model.hostPath -}}
{{- fail "model.pvc.claimName and model.hostPath are both set: the model volume is one of them" -}}
{{- end -}}
{{- if not (or $v.model.pvc.claimName $v.model.hostPath) -}}
{{- fail "no model volume: set model.pvc.claimName (a PVC holding the models) or model.hostPath" -}}
{{- end -}}
{{- if and $v.redis.enabled $v.redis.external.url -}}
{{- fail "redis.external.url is set while redis.enabled is true: set redis.enabled=false to use the external Redis" -}}
{{- end -}}
{{- if not (or $v.redis.enabled $v.redis.external.url) -}}
{{- fail "redis.enabled is false: set redis.external.url (redis://host:6379/0) to the Redis that holds the KV-block index" -}}
{{- end -}}
{{- if eq (int $v.api.grpcPort) (int $v.api.httpPort) -}}
{{- fail (printf "api.grpcPort and api.httpPort must differ (both %d)" (int $v.api.grpcPort)) -}}
{{- end -}}
{{- if lt (include "tandem.cpuQuantity" (index (default dict $v.head.resources.limits) "cpu") | float64) 0.0 -}}
{{- fail "head.resources.limits.cpu is required: KubeRay makes it Ray's CPU count on the head pod, where the ingress replicas run" -}}
{{- end -}}
{{- range $pool := list "ingress" "prefill" "decode" -}}
{{- include "tandem.validatePool" (list $ $pool) -}}
{{- end -}}
{{- range $pool := splitList " " (include "tandem.workerPools" .) -}}
{{- include "tandem.validateWorkers" (list $ $pool) -}}
{{- end -}}
{{- end -}}
