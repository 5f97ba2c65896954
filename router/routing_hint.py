"""What the request routers need to know of a prompt, computed once by the ingress and passed along with the call
(`routing=` keyword) to the pools' request routers.

It lives apart from router/request_router.py on purpose: Serve ships a request router class to the replicas by
value (cloudpickle of its whole module), so a class defined in that module would arrive as a copy that the
ingress's instances are not instances of. Defined here, both sides import the same class.
"""

from dataclasses import dataclass

from workers.kv.hashing import BlockHash


@dataclass(frozen=True)
class RoutingHint:
    num_tokens: int
    block_hashes: list[BlockHash]  # of the prompt's full blocks, salted by its cache_salt


# A replica's routing stat (EngineServer.record_routing_stats) when its group can no longer serve: a rank died.
OUT_OF_SERVICE = "out_of_service"
# How often Serve asks each pool replica for its routing stats (request_routing_stats_period_s): the request routers
# know of a group that lost a rank within one period.
ROUTING_STATS_PERIOD_S = 1.0
