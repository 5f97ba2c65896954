"""Nothing that arrives over the network is unpickled or evaluated, and internal ports listen where they must.

Three kinds of check:
- static: an AST walk over every production module (cluster/, router/, workers/, proto/) fails on a call that
  deserializes into code (pickle/cloudpickle/dill/marshal loads, torch.load without weights_only=True, yaml.load
  without a safe loader, numpy.load with allow_pickle=True, torch.distributed's *_object collectives, which
  pickle, and eval/exec). The allowlist must stay empty unless an entry says why its data cannot come from the
  network. The checker is itself tested on a snippet, so a broken checker cannot pass silently.
- behaviour: hostile bytes on each network path (a pickle whose unpickling would create a file, garbage fields,
  undecodable text) are refused or ignored on that path, nothing runs, and the reader keeps working: KV events
  and load reports in Redis, the TP group's control messages, the KV channel's header.
- binding: the TCPStores (a TP group's rendezvous, a group's KV rendezvous) and the local redis-server listen
  on the address they advertise, never on every interface; gloo's pair sockets listen on the node's address;
  the gRPC endpoint listens where the config says (0.0.0.0 by default, as a public endpoint should).
"""

import ast
import asyncio
import datetime
import json
import pickle
import socket
import threading
import uuid
from pathlib import Path

import psutil
import pytest
import redis
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.config import ClusterConfig
from cluster.redis_server import LocalRedis
from cluster.serve_config import render_serve_config
from router.api_config import ApiConfig
from router.grpc_api import start_grpc_server
from router.kv_index import KVIndexFollower
from router.load_view import LoadView
from tests.engine.test_step_plan import two_ranks
from tests.kv.cache_traffic import BS, serve
from workers.engine.block_manager import BlockManager
from workers.engine.step_plan import PlanReader, Stop, broadcast_bytes, decode, encode
from workers.kv_commands import TransferError
from workers.kv_events import KVEventPublisher, KVKeys
from workers.kv_transfer import KVChannel, listen
from workers.rank import RankWorker

REPO = Path(__file__).resolve().parents[1]
PRODUCTION = ("cluster", "router", "workers", "proto")
WILDCARDS = {"0.0.0.0", "::"}

# -- static: no deserialization into code ------------------------------------------------------------------------

# Calls that turn bytes into objects by running code the bytes choose (or that run text as code).
UNSAFE = {
    *(f"{module}.{name}" for module in ("pickle", "_pickle", "cPickle", "cloudpickle", "ray.cloudpickle", "dill",
                                        "joblib") for name in ("load", "loads", "Unpickler")),
    "marshal.load", "marshal.loads", "shelve.open", "jsonpickle.decode", "pandas.read_pickle",
    "yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all",
    *(f"torch.distributed.{name}" for name in ("broadcast_object_list", "recv_object_list", "all_gather_object",
                                               "gather_object", "scatter_object_list")),
    "builtins.eval", "builtins.exec",
}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}

# "path:call" -> why its data can never come from the network. Keep it empty.
ALLOWED: dict[str, str] = {}


def unsafe_calls(source: str, path: str = "<snippet>") -> list[str]:
    """'path:line: call' for every unsafe deserialization in the module's source."""
    tree = ast.parse(source, path)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _qualified(node.func, aliases)
            if name is not None and _unsafe(name, node):
                found.append(f"{path}:{node.lineno}: {name}")
    return found


def _qualified(func: ast.expr, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    root = aliases.get(func.id, f"builtins.{func.id}" if not parts else func.id)
    return ".".join([root, *reversed(parts)])


def _unsafe(name: str, call: ast.Call) -> bool:
    keywords = {k.arg: k.value for k in call.keywords}
    if name in UNSAFE:
        return True
    if name in ("torch.load", "torch.serialization.load"):
        weights_only = keywords.get("weights_only")
        return not (isinstance(weights_only, ast.Constant) and weights_only.value is True)
    if name in ("yaml.load", "yaml.load_all"):
        loader = keywords.get("Loader", call.args[1] if len(call.args) > 1 else None)
        last = loader.attr if isinstance(loader, ast.Attribute) else getattr(loader, "id", None)
        return last not in SAFE_YAML_LOADERS
    if name == "numpy.load":
        allow = keywords.get("allow_pickle")
        return not (allow is None or isinstance(allow, ast.Constant) and allow.value is False)
    return False


def production_files() -> list[Path]:
    return sorted(p for folder in PRODUCTION for p in (REPO / folder).rglob("*.py"))


def test_the_checker_finds_every_unsafe_form_and_nothing_safe():
    snippet = """
import pickle, marshal, yaml, json
import pickle as p
import torch
import torch.distributed as dist
import numpy as np
from cloudpickle import loads as cloud_loads
from torch import load
pickle.loads(b"")                                   # 9
p.load(f)                                           # 10
cloud_loads(b"")                                    # 11
marshal.loads(b"")                                  # 12
torch.load(f)                                       # 13
torch.load(f, weights_only=False)                   # 14
load(f, map_location="cpu")                         # 15
yaml.load(s)                                        # 16
yaml.load(s, Loader=yaml.Loader)                    # 17
dist.broadcast_object_list(objs)                    # 18
eval(text)                                          # 19
exec(text)                                          # 20
np.load(f, allow_pickle=True)                       # 21
pickle.Unpickler(f).load()                          # 22
torch.load(f, weights_only=True)
load(f, weights_only=True)
yaml.load(s, Loader=yaml.SafeLoader)
yaml.safe_load(s)
json.loads(s)
np.load(f)
model.eval()
dist.broadcast(t, 0)
"""
    lines = [int(found.split(":")[1]) for found in unsafe_calls(snippet)]
    assert lines == list(range(9, 23))


def test_no_production_module_deserializes_into_code():
    files = production_files()
    assert len(files) > 50  # the walk sees the project
    found = [hit for path in files for hit in unsafe_calls(path.read_text(), str(path.relative_to(REPO)))]
    keys = {hit: f"{hit.split(':')[0]}:{hit.split(': ')[1]}" for hit in found}
    assert [hit for hit in found if keys[hit] not in ALLOWED] == []
    assert set(ALLOWED) <= set(keys.values()), "an allowlist entry no longer matches any call: remove it"


# -- behaviour: hostile bytes on each path ---------------------------------------------------------------------

class Trap:
    """Unpickling this creates `path`: if the file appears, something unpickled network bytes."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture
def trap(tmp_path) -> tuple[bytes, Path]:
    """(a pickle whose unpickling creates a file, that file); the trap is checked to work, then reset."""
    sentinel = tmp_path / "unpickled"
    payload = pickle.dumps(Trap(sentinel))
    pickle.loads(payload).close()
    assert sentinel.exists()
    sentinel.unlink()
    return payload, sentinel


@pytest.fixture
def namespace() -> str:
    return f"test:{uuid.uuid4().hex[:12]}"


def follow_past(redis_url: str, namespace: str, before_start: list[dict], after_start: list[dict]) -> None:
    """Writes `before_start` to the event stream, starts a router, writes `after_start`, then has a real group
    store blocks: the router must index them (one that stopped following on the garbage times out)."""
    client = redis.Redis.from_url(redis_url)
    events = KVKeys(namespace).events
    for entry in before_start:
        client.xadd(events, entry)
    publisher = KVEventPublisher(redis_url, "g0", namespace=namespace)
    publisher.start()
    bm = BlockManager(12, BS, kv_events=publisher)

    async def scenario():
        router = KVIndexFollower(redis_url, namespace=namespace, block_ms=50, liveness_interval_s=0.1)
        await router.start()
        try:
            for entry in after_start:
                client.xadd(events, entry)
            serve(bm, range(8), "after the garbage")
            assert publisher.flush()
            await router.wait_caught_up()
            assert router.index.blocks("g0") == set(bm.cached) and bm.cached
        finally:
            await router.stop()

    try:
        asyncio.run(scenario())
    finally:
        publisher.close()
        client.close()


def test_hostile_kv_events_are_skipped_and_the_index_keeps_following(redis_url, namespace, trap):
    payload, sentinel = trap
    good = {"group": "g0", "kind": "stored", "seq": 1, "hashes": b"\x01" * 32, "parent": b"", "ts": 0}
    hostile = [{"payload": payload}, good | {"group": payload}, good | {"kind": payload},
               good | {"seq": payload}, good | {"ts": payload}, good | {"hashes": payload},
               good | {"kind": "stored; FLUSHALL"}, {"group": "g0"}]
    follow_past(redis_url, namespace, [], hostile)
    assert not sentinel.exists()


def test_a_router_started_on_a_stream_with_hostile_entries_is_warm_and_follows(redis_url, namespace, trap):
    payload, sentinel = trap
    follow_past(redis_url, namespace, [{"kind": payload}], [{"group": payload, "seq": payload}])
    assert not sentinel.exists()


def test_load_reports_that_are_not_json_are_ignored(redis_url, namespace, trap):
    payload, sentinel = trap
    keys = KVKeys(namespace)
    client = redis.Redis.from_url(redis_url)
    client.sadd(keys.groups, "good", "pickled", "wrong-shape", "not-a-dict")
    client.set(keys.load("good"), b'{"role": "decode", "free_blocks": 3, "total_blocks": 4, '
                                  b'"queued_prefill_tokens": 0, "running_seqs": 1}')
    client.set(keys.load("pickled"), payload)
    client.set(keys.load("wrong-shape"), b'{"role": "decode", "free_blocks": "many"}')
    client.set(keys.load("not-a-dict"), b"[1, 2]")

    async def scenario():
        view = LoadView(redis_url, namespace=namespace)
        try:
            return await view.loads(), await view.reports()
        finally:
            await view.close()

    loads, reports = asyncio.run(scenario())
    client.close()
    assert [load.group_id for role in loads.values() for load in role] == ["good"]
    assert set(reports) <= {"good", "wrong-shape"} and "good" in reports
    assert not sentinel.exists()


def test_control_messages_refuse_a_pickle_without_running_it(trap):
    payload, sentinel = trap
    for hostile in (payload, b'{"Trap": ["x"]}', b'{"Sequence": ["r", [1], null]}', b"[" * 100_000 + b"]" * 100_000,
                    b'{"StepPlan": [{"ScheduledChunk": ["r"]}, []]}'):
        with pytest.raises(ValueError):
            decode(hostile)
    assert not sentinel.exists()


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(data=st.one_of(st.binary(max_size=300), st.text(max_size=200).map(str.encode),
                      st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                                   lambda inner: st.lists(inner, max_size=4)
                                   | st.dictionaries(st.sampled_from(["StepPlan", "ScheduledChunk", "Stop",
                                                                      "OpenChannel", "ChannelAddress", "x"]),
                                                     inner, max_size=2),
                                   max_leaves=12).map(lambda v: json.dumps(v).encode())))
def test_any_bytes_are_a_control_message_or_a_value_error(data):
    """Never another exception (a follower that got one would die with a confusing error)."""
    try:
        decode(data)
    except ValueError:
        pass


def test_a_follower_refuses_a_pickled_broadcast_and_keeps_reading(trap):
    payload, sentinel = trap

    def rank0(tp):
        broadcast_bytes(payload, tp)
        broadcast_bytes(encode(Stop()), tp)

    def rank1(tp):
        reader = PlanReader(tp)
        with pytest.raises(ValueError):
            reader.receive()
        return reader.receive()

    _, received = two_ranks(rank0, rank1)
    assert received == Stop() and not sentinel.exists()


def test_a_kv_peer_sending_a_pickle_as_its_header_is_refused(trap):
    payload, sentinel = trap
    caches = [(torch.zeros(4, BS, 2, 8), torch.zeros(4, BS, 2, 8))]
    store, address = listen("127.0.0.1", timeout=30)
    results: dict[str, object] = {}

    def sender():  # a peer speaking gloo on the channel's store, but sending a pickle where the header goes
        group = dist.ProcessGroupGloo(store, 0, 2, datetime.timedelta(seconds=30))
        header = torch.frombuffer(bytearray(payload[:56].ljust(56, b"\0")), dtype=torch.long)  # 7 int64, as ours
        group.send([header], 1, 0).wait()

    def receiver():
        channel = KVChannel.connect(address, torch.device("cpu"), timeout=30)
        try:
            channel.recv(caches, [0, 1])
        except TransferError as e:
            results["error"] = str(e)

    threads = [threading.Thread(target=sender), threading.Thread(target=receiver)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert "does not match" in results["error"]
    assert all(not k.any() and not v.any() for k, v in caches) and not sentinel.exists()


# -- binding -------------------------------------------------------------------------------------------------

def listening(pid: int | None = None) -> set[tuple[str, int]]:
    """(address, port) of the process's listening sockets; an IPv4-mapped IPv6 address as its IPv4 one."""
    return {(c.laddr.ip.removeprefix("::ffff:"), c.laddr.port)
            for c in psutil.Process(pid).net_connections("inet") if c.status == "LISTEN"}


def node_address() -> str:
    """An address of this machine other than loopback when it has one, so 'bound there only' is a real test."""
    candidates = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                  if a.family == socket.AF_INET and not a.address.startswith("127.")]
    return candidates[0] if candidates else "127.0.0.1"


@pytest.mark.parametrize("host", ["127.0.0.1", node_address()])
def test_a_kv_rendezvous_store_listens_only_on_its_address(host):
    store, address = listen(host, timeout=5)
    assert address.host == host
    assert [ip for ip, port in listening() if port == address.port] == [host]
    client = dist.TCPStore(address.host, address.port, is_master=False, timeout=datetime.timedelta(seconds=5))
    client.set("k", "v")
    assert store.get("k") == b"v"


def test_a_groups_rendezvous_store_listens_only_on_the_node_address():
    worker = RankWorker(config=None, rank=0, size=2, progress=False, kv_events=None)
    address = worker.rendezvous_address()
    assert [ip for ip, port in listening() if port == address.port] == [address.host]
    assert address.host not in WILDCARDS


def test_gloo_pair_sockets_listen_on_the_node_address_not_everywhere():
    """gloo's default device binds the address the host name resolves to (GLOO_SOCKET_IFNAME picks another)."""
    before = listening()
    seen: list[set] = []

    def rank0(tp):
        tp.cpu_group.barrier().wait()
        seen.append(listening() - before)
        tp.cpu_group.barrier().wait()

    two_ranks(rank0, lambda tp: [tp.cpu_group.barrier().wait() for _ in range(2)])
    [opened] = seen
    assert len(opened) >= 2  # the store and a pair each
    assert not {ip for ip, _ in opened} & WILDCARDS


def test_the_local_redis_listens_on_loopback_only():
    server = LocalRedis()
    try:
        assert listening(server._process.pid) == {("127.0.0.1", server.port)}
    finally:
        server.stop()


def test_the_grpc_endpoint_listens_on_the_configured_host():
    class Stub:
        api = ApiConfig()

    async def bound(host: str) -> set[str]:
        server = await start_grpc_server(Stub(), host, 0)
        try:
            return {ip for ip, port in listening() if port == server.port}
        finally:
            await server.server.stop(None)

    assert asyncio.run(bound("127.0.0.1")) == {"127.0.0.1"}
    assert ClusterConfig().host == "0.0.0.0"  # the public endpoint's documented default: every interface
    assert render_serve_config(ClusterConfig(host="127.0.0.1"))["http_options"]["host"] == "127.0.0.1"
