"""The routing baselines `tandem bench routing` compares the prefix-cache-aware router (router/request_router.py)
against: round-robin, SGLang's cache_aware policy and Ray's PrefixCacheAffinityRouter. Serve's default
power-of-two router is Serve's own and needs nothing here.

Both cache-aware baselines guess each replica's cache from the prompts they sent it, in a prefix tree of the
prompt's "text", instead of knowing it (our router reads the exact block hashes the groups report). Here the text
is the prompt's token ids, one token per character: prefix matching over token ids is the same as over the text
they decode to, and costs no detokenizing. A match is counted in tokens, and `cache_salt` is ignored, as both
originals ignore it.

Each policy is a pure function of (candidate ids, text, tree, loads) with ties broken by sorted replica id, so
the tests can state exact choices; the `RequestRouter` subclasses only feed them. Load is the number of requests
this router sent a replica that have not completed: SGLang's worker load, and the stand-in for the queue length
Ray's router probes. The tree learns a prompt when Serve dispatches it (`on_request_routed`, as Ray's router
does), under the replica that took it. Every router returns the chosen replica as the first tier and the other
candidates as the second, so a full replica falls through to the least-queued of the rest (Serve's choice).
"""

from collections import Counter, OrderedDict
from collections.abc import Hashable, Mapping, Sequence

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

Text = Sequence[Hashable]  # a str, or a prompt's token ids: any sequence of "characters"


class _Node:
    __slots__ = ("parent", "key", "children", "owners")

    def __init__(self, parent: "_Node | None", key: Hashable) -> None:
        self.parent = parent
        self.key = key
        self.children: dict[Hashable, _Node] = {}
        self.owners: set[str] = set()  # the workers this character was sent to under this prefix


class PrefixTree:
    """A character trie shared by all workers; each node records which workers it was inserted for.

    A worker's size is the number of nodes it owns (its distinct prefix characters), the "tree size" both
    originals balance on. Ownership is closed under prefixes, so a worker's longest match is the depth of the
    deepest node it owns on the text's path. Each worker keeps its nodes in least-recently-inserted order, and an
    insert touches its path leaf first, so a node is always older than its ancestors: evicting from the oldest end
    removes leaves only, one character at a time, O(1) each.
    """

    def __init__(self) -> None:
        self._root = _Node(None, None)
        self._lru: dict[str, OrderedDict[_Node, None]] = {}  # worker -> its nodes, least recently used first

    def insert(self, text: Text, worker: str) -> None:
        """Records that `worker` was sent `text`, making its whole path the worker's most recently used."""
        path, node = [], self._root
        for char in text:
            child = node.children.get(char)
            if child is None:
                child = node.children[char] = _Node(node, char)
            path.append(node := child)
        if not path:
            return
        lru = self._lru.setdefault(worker, OrderedDict())
        for node in reversed(path):
            node.owners.add(worker)
            lru[node] = None
            lru.move_to_end(node)

    def longest_match(self, text: Text) -> dict[str, int]:
        """Worker -> the length of the longest prefix of `text` it was sent; workers matching nothing are absent."""
        matched: dict[str, int] = {}
        node = self._root
        for depth, char in enumerate(text, 1):
            node = node.children.get(char)
            if node is None:
                break
            for worker in node.owners:
                matched[worker] = depth
        return matched

    def size(self, worker: str) -> int:
        """The characters `worker` holds in the tree (shared prefixes counted once)."""
        return len(self._lru.get(worker, ()))

    def evict(self, worker: str, max_chars: int) -> None:
        """Drops `worker`'s least recently used characters until it holds at most `max_chars`."""
        lru = self._lru.get(worker)
        while lru and len(lru) > max_chars:
            node, _ = lru.popitem(last=False)
            node.owners.discard(worker)
            if not node.owners:  # no worker owns it, so none owns a child either: the node is a leaf
                del node.parent.children[node.key]
        if lru is not None and not lru:
            del self._lru[worker]


def choose_round_robin(candidates: Sequence[str], last: str | None) -> str:
    """The first candidate after `last` in id order, wrapping around; a replica joining or leaving does not
    restart the cycle."""
    ordered = _ordered(candidates)
    return next((w for w in ordered if last is not None and w > last), ordered[0])


def choose_sglang_cache_aware(candidates: Sequence[str], text: Text, tree: PrefixTree, loads: Mapping[str, int],
                              balance_abs_threshold: int = 64, balance_rel_threshold: float = 1.5,
                              cache_threshold: float = 0.3) -> str:
    """SGLang's cache_aware rule (sgl-router/src/policies/cache_aware.rs). Load is imbalanced when both
    max - min > balance_abs_threshold and max > balance_rel_threshold * min: then the least loaded worker.
    Otherwise the worker with the longest prefix match if it covers more than cache_threshold of the text, else
    the one holding the fewest characters (the most room)."""
    ordered = _ordered(candidates)
    load = {w: loads.get(w, 0) for w in ordered}
    highest, lowest = max(load.values()), min(load.values())
    if highest - lowest > balance_abs_threshold and highest > balance_rel_threshold * lowest:
        return min(ordered, key=load.__getitem__)
    matched = tree.longest_match(text)
    best = max(ordered, key=lambda w: matched.get(w, 0))
    if text and matched.get(best, 0) / len(text) > cache_threshold:
        return best
    return min(ordered, key=tree.size)


def choose_prefix_affinity(candidates: Sequence[str], text: Text, tree: PrefixTree, queue_lens: Mapping[str, int],
                           imbalanced_threshold: float = 10, match_rate_threshold: float = 0.1) -> str:
    """Ray's PrefixCacheAffinityRouter. With balanced queues (max - min <= imbalanced_threshold) it narrows the
    candidates to those with the longest match if that covers at least match_rate_threshold of the text, else to
    those holding the fewest characters; Serve then takes the shortest queue among them, as here. With imbalanced
    queues Ray falls back to power-of-two choices (two random replicas, the shorter queue); this takes the
    shortest queue of all instead, so the choice is deterministic."""
    ordered = _ordered(candidates)
    queue = {w: queue_lens.get(w, 0) for w in ordered}
    if max(queue.values()) - min(queue.values()) > imbalanced_threshold:
        return min(ordered, key=queue.__getitem__)
    matched = tree.longest_match(text)
    longest = max(matched.get(w, 0) for w in ordered)
    if text and longest / len(text) >= match_rate_threshold:
        narrowed = [w for w in ordered if matched.get(w, 0) == longest]
    else:
        smallest = min(tree.size(w) for w in ordered)
        narrowed = [w for w in ordered if tree.size(w) == smallest]
    return min(narrowed, key=queue.__getitem__)


def _ordered(candidates: Sequence[str]) -> list[str]:
    if not candidates:
        raise ValueError("no candidate workers to choose from")
    return sorted(candidates)


def request_text(pending_request: PendingRequest | None) -> Text | None:
    """The prompt of a `prefill` or `generate` call, whose first argument is its token ids (or its text);
    None for calls that carry no prompt (`generate_prefilled`'s handoff)."""
    if pending_request is None or not pending_request.args:
        return None
    prompt = pending_request.args[0]
    return prompt if isinstance(prompt, (str, list, tuple)) else None


def _tiers(candidates: list[RunningReplica], chosen: str) -> list[list[RunningReplica]]:
    """The chosen replica first, then the others as one tier for Serve to fall through to."""
    ordered = sorted(candidates, key=lambda r: r.replica_id.unique_id)
    return [[r for r in ordered if r.replica_id.unique_id == chosen],
            [r for r in ordered if r.replica_id.unique_id != chosen]]


class RoundRobinRouter(RequestRouter):
    """Each request to the next replica in id order."""

    def initialize_state(self) -> None:
        self._last: str | None = None

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        self._last = choose_round_robin([r.replica_id.unique_id for r in candidate_replicas], self._last)
        return _tiers(candidate_replicas, self._last)


class _TreeRouter(RequestRouter):
    """What the two cache-aware baselines share: the prefix tree of what each replica was sent, bounded to
    `max_tree_chars` tokens per replica (Ray's 400,000-character default at about 4 characters a token), and the
    requests in flight per replica."""

    def _init_tree(self, max_tree_chars: int) -> None:
        if max_tree_chars < 1:
            raise ValueError(f"max_tree_chars must be >= 1 (got {max_tree_chars!r})")
        self.tree = PrefixTree()
        self.max_tree_chars = max_tree_chars
        self._replica_of: dict[str, str] = {}  # internal request id -> replica it was sent to
        self.in_flight: Counter[str] = Counter()

    def _choose(self, candidates: list[str], text: Text) -> str:
        raise NotImplementedError

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        text = request_text(pending_request)
        if text is None:
            return [candidate_replicas]
        return _tiers(candidate_replicas, self._choose([r.replica_id.unique_id for r in candidate_replicas], text))

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        replica = replica_id.unique_id
        self._replica_of[pending_request.metadata.internal_request_id] = replica
        self.in_flight[replica] += 1
        text = request_text(pending_request)
        if text is not None:
            self.tree.insert(text, replica)
            self.tree.evict(replica, self.max_tree_chars)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        replica = self._replica_of.pop(internal_request_id, None)  # None: rejected, never routed
        if replica is not None:
            self.in_flight[replica] -= 1
            if not self.in_flight[replica]:
                del self.in_flight[replica]


class SGLangCacheAwareRouter(_TreeRouter):
    """SGLang's cache_aware policy (choose_sglang_cache_aware) on the requests in flight per replica."""

    def initialize_state(self, balance_abs_threshold: int = 64, balance_rel_threshold: float = 1.5,
                         cache_threshold: float = 0.3, max_tree_chars: int = 100_000) -> None:
        if balance_abs_threshold < 0 or balance_rel_threshold < 0 or not 0 <= cache_threshold <= 1:
            raise ValueError(f"thresholds must be >= 0 and cache_threshold in [0, 1] (got {balance_abs_threshold!r}, "
                             f"{balance_rel_threshold!r}, {cache_threshold!r})")
        self._init_tree(max_tree_chars)
        self.thresholds = dict(balance_abs_threshold=balance_abs_threshold,
                               balance_rel_threshold=balance_rel_threshold, cache_threshold=cache_threshold)

    def _choose(self, candidates: list[str], text: Text) -> str:
        return choose_sglang_cache_aware(candidates, text, self.tree, self.in_flight, **self.thresholds)


class PrefixTreeRouter(_TreeRouter):
    """Ray's PrefixCacheAffinityRouter (choose_prefix_affinity), with the requests in flight per replica as the
    queue length."""

    def initialize_state(self, imbalanced_threshold: float = 10, match_rate_threshold: float = 0.1,
                         max_tree_chars: int = 100_000) -> None:
        if imbalanced_threshold < 0 or not 0 <= match_rate_threshold <= 1:
            raise ValueError(f"imbalanced_threshold must be >= 0 and match_rate_threshold in [0, 1] "
                             f"(got {imbalanced_threshold!r}, {match_rate_threshold!r})")
        self._init_tree(max_tree_chars)
        self.thresholds = dict(imbalanced_threshold=imbalanced_threshold, match_rate_threshold=match_rate_threshold)

    def _choose(self, candidates: list[str], text: Text) -> str:
        return choose_prefix_affinity(candidates, text, self.tree, self.in_flight, **self.thresholds)
