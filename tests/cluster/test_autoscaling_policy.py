"""The autoscaling policy as a function of its signals: Serve's own AutoscalingContext objects in, replica counts
out. The pools grow on prefill backlog (in seconds at the measured speed), KV usage and step time; the decode pool
follows the prefill pool up; shrinking waits out the delay and goes one replica at a time."""

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingContext

from cluster.autoscaling import AutoscalingTargets, PoolAutoscaler

APP = "tandem"


def context(name: str, replicas: int, *, target: int | None = None, now: float = 1000.0, state: dict | None = None,
            **signals: float):
    deployment = DeploymentID(name=name, app_name=APP)
    running = [ReplicaID(unique_id=f"{name}-{i}", deployment_id=deployment) for i in range(replicas)]
    metrics = {signal: {r: value for r in running} for signal, value in signals.items()}
    return AutoscalingContext(
        deployment_id=deployment, deployment_name=name, app_name=APP, current_num_replicas=replicas,
        target_num_replicas=target or replicas, running_replicas=running, total_num_requests=0.0,
        total_queued_requests=0.0,
        aggregated_metrics=metrics, raw_metrics={}, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8, policy_state=state or {}, last_scale_up_time=None,
        last_scale_down_time=None, current_time=now, config=None)


def decide(policy: PoolAutoscaler, *contexts) -> dict[str, int]:
    decisions, _ = policy({ctx.deployment_id: ctx for ctx in contexts})
    return {deployment.name: n for deployment, n in decisions.items()}


IDLE_DECODE = dict(kv_usage=0.1, step_s=0.02, queued_prefill_tokens=0.0)


def test_prefill_grows_with_its_backlog_in_seconds_at_the_measured_speed():
    policy = PoolAutoscaler(prefill_backlog_s=2.0)
    # 2 replicas x 6000 queued tokens at 1000 tokens/s = 12 s of work: 6 replicas keep it at 2 s each.
    got = decide(policy, context("prefill", 2, queued_prefill_tokens=6000.0, prefill_tokens_per_s=1000.0),
                 context("decode", 2, **IDLE_DECODE))
    assert got["prefill"] == 6


def test_the_decode_pool_follows_the_prefill_pool_up_in_proportion():
    policy = PoolAutoscaler(prefill_backlog_s=2.0)
    got = decide(policy, context("prefill", 2, queued_prefill_tokens=4000.0, prefill_tokens_per_s=1000.0),
                 context("decode", 3, **IDLE_DECODE))
    assert got == {"prefill": 4, "decode": 6}


def test_decode_grows_on_kv_usage_and_on_step_time():
    policy = PoolAutoscaler(decode_kv_usage=0.5, decode_step_s=0.05)
    idle_prefill = context("prefill", 1, queued_prefill_tokens=0.0, prefill_tokens_per_s=1000.0)
    assert decide(policy, idle_prefill, context("decode", 2, kv_usage=0.9, step_s=0.02))["decode"] == 4
    assert decide(policy, idle_prefill, context("decode", 2, kv_usage=0.1, step_s=0.15))["decode"] == 6


def test_a_unified_decode_pool_also_grows_on_its_prefill_backlog():
    got = decide(PoolAutoscaler(prefill_backlog_s=1.0),
                 context("decode", 1, kv_usage=0.1, queued_prefill_tokens=3000.0, prefill_tokens_per_s=1000.0))
    assert got == {"decode": 3}


def test_without_a_measured_speed_a_backlog_holds_the_pool_where_it_is():
    got = decide(PoolAutoscaler(), context("prefill", 2, queued_prefill_tokens=5000.0),
                 context("decode", 1, **IDLE_DECODE))
    assert got["prefill"] == 2


def test_shrinking_waits_for_the_delay_then_goes_one_replica_at_a_time():
    policy = PoolAutoscaler(downscale_delay_s=30.0)
    idle = dict(kv_usage=0.0, queued_prefill_tokens=0.0)
    decisions, state = policy({ctx.deployment_id: ctx for ctx in [context("decode", 4, now=0.0, **idle)]})
    assert list(decisions.values()) == [4]
    [decode_state] = state.values()
    assert decide(policy, context("decode", 4, now=20.0, state=decode_state, **idle)) == {"decode": 4}
    assert decide(policy, context("decode", 4, now=31.0, state=decode_state, **idle)) == {"decode": 3}


def test_a_busy_reading_restarts_the_downscale_delay():
    policy = PoolAutoscaler(downscale_delay_s=30.0)
    _, state = policy({c.deployment_id: c for c in [context("decode", 2, now=0.0, kv_usage=0.0)]})
    _, state = policy({c.deployment_id: c for c in [context("decode", 2, now=10.0, state=next(iter(state.values())),
                                                            kv_usage=0.7)]})
    got = decide(policy, context("decode", 2, now=31.0, state=next(iter(state.values())), kv_usage=0.0))
    assert got == {"decode": 2}


@pytest.mark.parametrize("bad", [dict(prefill_backlog_s=0), dict(decode_kv_usage=1.5), dict(downscale_delay_s=-1)])
def test_bad_targets_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        AutoscalingTargets(**bad)


def test_a_replica_still_starting_is_not_cancelled_when_the_burst_ends_first():
    # Two were asked for, one runs, the load is gone: the target holds for the downscale delay.
    policy = PoolAutoscaler(downscale_delay_s=30.0)
    assert decide(policy, context("decode", 1, target=2, kv_usage=0.0, queued_prefill_tokens=0.0)) == {"decode": 2}
