{{/*
The Serve config of the RayService (serveConfigV2): the same dict as cluster/serve_config.py's
render_serve_config(config, kuberay=True), for the cluster config these values describe (tests/helm/test_chart.py
checks the two agree, and that Tandem's own config loader accepts the args).
*/}}

{{/* One pool's section of the cluster config (deploy/tandem.yaml's ingress:, prefill:, decode:). Args: (list $ "prefill"). */}}
{{- define "tandem.poolArgs" -}}
{{- $root := index . 0 -}}
{{- $name := index . 1 -}}
{{- $pool := index $root.Values $name -}}
{{- $auto := $pool.autoscaling -}}
{{- $args := dict "replicas" $pool.replicas "target_ongoing_requests" $auto.targetOngoingRequests
      "max_ongoing_requests" $pool.maxOngoingRequests "max_queued_requests" $pool.maxQueuedRequests
      "min_replicas" nil "max_replicas" nil -}}
{{- if $auto.enabled -}}
{{- $_ := set $args "min_replicas" $auto.minReplicas -}}
{{- $_ := set $args "max_replicas" $auto.maxReplicas -}}
{{- end -}}
{{- toJson $args -}}
{{- end -}}

{{/* The application's args: the whole cluster config, deploy/tandem.yaml's keys. */}}
{{- define "tandem.clusterConfig" -}}
{{- $v := .Values -}}
{{- $e := $v.engine -}}
{{- $api := dict "max_request_bytes" $v.api.maxRequestBytes "max_tokens" $v.api.maxTokens
      "max_stop_strings" $v.api.maxStopStrings "max_bad_words" $v.api.maxBadWords
      "max_cache_salt_chars" $v.api.maxCacheSaltChars
      "max_choices" $v.api.maxChoices "max_embedding_inputs" $v.api.maxEmbeddingInputs
      "response_ttl_s" $v.api.responseTtlS
      "response_store_url" ($v.api.responseStoreUrl | default nil) "tool_call_parser" $v.api.toolCallParser
      "reasoning_parser" $v.api.reasoningParser
      "max_concurrent_requests" $v.api.maxConcurrentRequests "allow_runtime_lora" $v.api.allowRuntimeLora
      "migration_limit" $v.api.migrationLimit "allowed_origins" ($v.api.allowedOrigins | default nil)
      "api_key" nil "tls_cert_file" nil "tls_key_file" nil "tls_client_ca_file" nil -}}
{{- if $v.tls.enabled -}}
{{- $_ := set $api "tls_cert_file" (printf "%s/tls.crt" (include "tandem.tlsDir" .)) -}}
{{- $_ := set $api "tls_key_file" (printf "%s/tls.key" (include "tandem.tlsDir" .)) -}}
{{- if $v.tls.clientCA.enabled -}}
{{- $_ := set $api "tls_client_ca_file" (printf "%s/ca.crt" (include "tandem.clientCADir" .)) -}}
{{- end -}}
{{- end -}}
{{- $routing := dict "compute_token" $v.routing.computeToken "queued_token" $v.routing.queuedToken
      "running_seq" $v.routing.runningSeq "transfer_block" $v.routing.transferBlock
      "local_compute_token" $v.routing.localComputeToken "kv_usage" $v.routing.kvUsage -}}
{{- $a := $v.autoscalingPolicy -}}
{{- $autoscaling := dict "prefill_backlog_s" $a.prefillBacklogS "decode_kv_usage" $a.decodeKvUsage
      "decode_step_s" $a.decodeStepS "downscale_delay_s" $a.downscaleDelayS
      "metrics_interval_s" $a.metricsIntervalS "look_back_s" $a.lookBackS -}}
{{- $config := dict
      "model" $v.model.path "served_model_name" $v.model.servedModelName
      "generation_config" $v.model.generationConfig "lora_modules" $v.model.loraModules
      "lora_dir" $v.model.loraDir "max_loras" $v.model.maxLoras
      "device" $e.device "dtype" $e.dtype "max_model_len" $e.maxModelLen "seed" $e.seed
      "tensor_parallel_size" $e.tensorParallelSize "num_cpus_per_rank" $e.numCpusPerRank
      "block_size" $e.blockSize "num_kv_blocks" $e.numKvBlocks "kv_cache_memory_gb" $e.kvCacheMemoryGb
      "gpu_memory_utilization" $e.gpuMemoryUtilization "enable_prefix_caching" $e.enablePrefixCaching
      "kv_offload_gb" $e.kvOffloadGb
      "max_num_seqs" $e.maxNumSeqs "max_num_batched_tokens" $e.maxNumBatchedTokens
      "enable_chunked_prefill" $e.enableChunkedPrefill "scheduling_policy" $e.schedulingPolicy
      "num_speculative_tokens" $e.numSpeculativeTokens
      "prompt_lookup_max" $e.promptLookupMax "prompt_lookup_min" $e.promptLookupMin "kv_lease_s" $e.kvLeaseS
      "kv_claim_s" $e.kvClaimS
      "kv_transfer_timeout_s" $e.kvTransferTimeoutS "max_kv_channels" $e.maxKvChannels
      "step_timeout_s" $e.stepTimeoutS
      "disaggregate" $v.disaggregate "prefill_router" $v.prefillRouter
      "conditional_disaggregation" $v.conditionalDisaggregation
      "ingress" (include "tandem.poolArgs" (list . "ingress") | fromJson)
      "prefill" (include "tandem.poolArgs" (list . "prefill") | fromJson)
      "decode" (include "tandem.poolArgs" (list . "decode") | fromJson)
      "routing" $routing "autoscaling" $autoscaling "redis_url" (include "tandem.redisUrl" .) "host" "0.0.0.0"
      "grpc_port" $v.api.grpcPort "http_port" $v.api.httpPort "api" $api -}}
{{- range $key, $value := $v.extraConfig -}}
{{- if not (hasKey $config $key) -}}
{{- $_ := set $config $key $value -}}
{{- else if and (kindIs "map" $value) (kindIs "map" (index $config $key)) -}}
{{- $section := index $config $key -}}
{{- range $inner, $innerValue := $value -}}
{{- if hasKey $section $inner -}}
{{- fail (printf "extraConfig.%s.%s: the chart sets %s.%s from its own values; set it there (values.yaml documents which)" $key $inner $key $inner) -}}
{{- end -}}
{{- $_ := set $section $inner $innerValue -}}
{{- end -}}
{{- else -}}
{{- fail (printf "extraConfig.%s: the chart sets %s from its own values; set it there (values.yaml documents which)" $key $key) -}}
{{- end -}}
{{- end -}}
{{- toJson $config -}}
{{- end -}}

{{/*
Deployment overrides that pin the ingress to the head pod and each pool to its worker group (custom resources the
groups advertise). Serve replaces ray_actor_options and placement_group_bundles wholesale, so these restate
cluster/app.py's: 0.1 CPU per replica, then one bundle per rank.
*/}}
{{- define "tandem.deployments" -}}
{{- $e := .Values.engine -}}
{{- $rank := dict "CPU" $e.numCpusPerRank -}}
{{- if eq $e.device "cuda" -}}{{- $_ := set $rank "GPU" 1 -}}{{- end -}}
{{- $deployments := list (dict "name" "ingress" "ray_actor_options" (dict "num_cpus" 0.1 "resources" (dict "tandem_ingress" 1))) -}}
{{- range $pool := splitList " " (include "tandem.workerPools" .) -}}
{{- $bundles := list (dict "CPU" 0.1 (printf "tandem_%s" $pool) 1) -}}
{{- range until (int $e.tensorParallelSize) -}}
{{- $bundles = append $bundles $rank -}}
{{- end -}}
{{- $deployments = append $deployments (dict "name" $pool "placement_group_bundles" $bundles) -}}
{{- end -}}
{{- toJson $deployments -}}
{{- end -}}

{{- define "tandem.serveConfig" -}}
{{- $http := dict "host" "0.0.0.0" "port" .Values.api.httpPort -}}
{{- if .Values.tls.enabled -}}
{{- $_ := set $http "ssl_certfile" (printf "%s/tls.crt" (include "tandem.tlsDir" .)) -}}
{{- $_ := set $http "ssl_keyfile" (printf "%s/tls.key" (include "tandem.tlsDir" .)) -}}
{{- end -}}
{{- $args := include "tandem.clusterConfig" . | fromJson -}}
{{- $app := dict "name" "tandem" "route_prefix" "/" "import_path" "cluster.app:app_builder"
      "args" $args "deployments" (include "tandem.deployments" . | fromJsonArray) -}}
{{- $pools := list "ingress" "decode" -}}
{{- if .Values.disaggregate -}}{{- $pools = append $pools "prefill" -}}{{- end -}}
{{- $autoscales := false -}}
{{- range $pool := $pools -}}
{{- if (index $.Values $pool).autoscaling.enabled -}}{{- $autoscales = true -}}{{- end -}}
{{- end -}}
{{- if $autoscales -}}
{{- $_ := set $app "autoscaling_policy" (dict "policy_function" "cluster.autoscaling:PoolAutoscaler"
      "policy_kwargs" $args.autoscaling) -}}
{{- end -}}
{{- dict "proxy_location" "HeadOnly" "http_options" $http "applications" (list $app) | toYaml -}}
{{- end -}}
