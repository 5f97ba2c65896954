"""One application-level autoscaling policy for both pools, on the signals each pool's work is made of.

Serve's default counts ongoing requests, which is blind to what an LLM replica is short of: a prefill replica is
behind by the uncached prompt tokens queued on it (a 4k-token prompt is not one 40-token prompt), a decode replica
runs out of KV cache or gets slow per token long before its request count says so. Each pool replica reports
(workers/server.py `record_autoscaling_stats`, averaged by Serve over `look_back_s`) its queued prefill tokens,
its measured prefill speed, its KV usage and its step time, and this policy sizes the pools from them:

    prefill   ceil(backlog_s / prefill_backlog_s)   backlog_s = queued prompt tokens / measured tokens per second
    decode    ceil(current x max(KV usage / decode_kv_usage, step time / decode_step_s))  (and, in unified mode,
              the prefill backlog rule too, since the decode pool prefills)

The two pools move together: when the prefill pool grows by a factor, the decode pool is grown by the same factor
at once, because the prompts being prefilled now are the decodes of a few seconds from now. Growing happens on
the first reading that asks for it; shrinking only after every reading for `downscale_delay_s` asked for fewer,
and then by one replica at a time, so a lull does not throw away warm prefix caches. Serve applies min/max.

The policy is a class Serve instantiates with the `autoscaling:` section of the cluster config as keyword
arguments: the application's policy in the Serve config (cluster/serve_config.py), which `tandem serve` and the
Helm chart deploy, and each pool's own policy besides (all `serve.run` can take), where the pools then scale
independently. Serve's own upscale/downscale delays are off for the pools: the smoothing is here.
"""

import logging
import math
import time
from dataclasses import dataclass, field, fields
from typing import Any

logger = logging.getLogger(__name__)


AUTOSCALING_POLICY = "cluster.autoscaling:PoolAutoscaler"


def _field(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"help": doc})


@dataclass(frozen=True)
class AutoscalingTargets:
    """What the autoscaler keeps each pool at; the pools' min/max replicas bound it (prefill.min_replicas, ...)."""

    prefill_backlog_s: float = _field(2.0, "seconds of queued prompt work per prefill replica, at its measured "
                                           "prefill speed, before another is added")
    decode_kv_usage: float = _field(0.7, "KV cache share a decode replica may fill before another is added")
    decode_step_s: float | None = _field(None, "decode step time (inter-token latency) a decode replica may "
                                               "reach before another is added (null: KV usage only)")
    downscale_delay_s: float = _field(120.0, "how long every reading must ask for fewer replicas before one goes")
    metrics_interval_s: float = _field(2.0, "how often replicas report their signals")
    look_back_s: float = _field(10.0, "the window Serve averages the signals over")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and value <= 0 and f.name != "downscale_delay_s":
                raise ValueError(f"{f.name} must be > 0 (got {value!r})")
        if self.downscale_delay_s < 0:
            raise ValueError(f"downscale_delay_s must be >= 0 (got {self.downscale_delay_s!r})")
        if self.decode_kv_usage > 1:
            raise ValueError(f"decode_kv_usage must be <= 1 (got {self.decode_kv_usage!r})")


class PoolAutoscaler:
    """Serve's application-level policy: called with every autoscaling deployment's context, returns the replica
    count each should have and the state to keep until the next call."""

    def __init__(self, **targets: Any):
        self.targets = AutoscalingTargets(**targets)

    def __call__(self, contexts):
        """Serve calls it with every deployment's context when it is the application's policy (a Serve config's
        `autoscaling_policy`), or with one deployment's context as that deployment's own policy (`serve.run`,
        where the pools then scale independently)."""
        if not isinstance(contexts, dict):
            decisions, state = self._decide({contexts.deployment_id: contexts})
            return decisions[contexts.deployment_id], state[contexts.deployment_id]
        return self._decide(contexts)

    def _decide(self, contexts: dict) -> tuple[dict, dict]:
        by_name = {deployment_id.name: (deployment_id, ctx) for deployment_id, ctx in contexts.items()}
        wanted = {name: self._wanted(name, ctx, "prefill" not in by_name) for name, (_, ctx) in by_name.items()
                  if name in ("prefill", "decode")}
        if "prefill" in wanted and "decode" in wanted:
            current = by_name["prefill"][1].current_num_replicas
            if current and wanted["prefill"] > current:
                decode_now = by_name["decode"][1].current_num_replicas
                wanted["decode"] = max(wanted["decode"], math.ceil(decode_now * wanted["prefill"] / current))
        decisions, state = {}, {}
        for name, (deployment_id, ctx) in by_name.items():
            if name in wanted:
                decisions[deployment_id], state[deployment_id] = self._smoothed(name, ctx, wanted[name])
            else:  # the ingress, when it autoscales: Serve's own policy on ongoing requests suits it
                from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

                decisions[deployment_id], state[deployment_id] = replica_queue_length_autoscaling_policy(ctx)
        return decisions, state

    def _wanted(self, name: str, ctx, unified: bool) -> int:
        """The replica count the latest signals ask for, before smoothing."""
        signals = _means(ctx)
        current = max(ctx.current_num_replicas, 1)
        counts = [1]
        if name == "prefill" or (name == "decode" and unified):
            counts.append(self._for_backlog(signals, current))
        if name == "decode":
            counts.append(math.ceil(current * signals.get("kv_usage", 0.0) / self.targets.decode_kv_usage))
            if self.targets.decode_step_s is not None and "step_s" in signals:
                counts.append(math.ceil(current * signals["step_s"] / self.targets.decode_step_s))
        return max(counts)

    def _for_backlog(self, signals: dict[str, float], current: int) -> int:
        queued = signals.get("queued_prefill_tokens", 0.0) * current  # the mean per replica, times replicas
        speed = signals.get("prefill_tokens_per_s")
        if not queued:
            return 1
        if not speed:  # nothing computed yet to measure the speed by: hold
            return current
        return math.ceil(queued / speed / self.targets.prefill_backlog_s)

    def _smoothed(self, name: str, ctx, wanted: int) -> tuple[int, dict]:
        """Grow at once; shrink by one after `downscale_delay_s` of readings that all asked for fewer. Measured
        against the target (not the running count), so a replica still starting is not cancelled."""
        current = ctx.target_num_replicas
        now = ctx.current_time if ctx.current_time is not None else time.time()
        state = dict(ctx.policy_state or {})
        if wanted >= current:
            state.pop("below_since", None)
            if wanted > current:
                logger.info("autoscaling %s: %d -> %d replicas", name, current, wanted)
            return wanted, state
        below_since = state.setdefault("below_since", now)
        if now - below_since < self.targets.downscale_delay_s:
            return current, state
        state["below_since"] = now  # the next step down waits a full delay again
        logger.info("autoscaling %s: %d -> %d replicas", name, current, current - 1)
        return current - 1, state


def _means(ctx) -> dict[str, float]:
    """Each custom signal averaged over the running replicas (Serve already averaged each over its window)."""
    means = {}
    for name, by_replica in (ctx.aggregated_metrics or {}).items():
        values = [v for v in by_replica.values() if v is not None]
        if values:
            means[name] = sum(values) / len(values)
    return means
