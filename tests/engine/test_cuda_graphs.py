"""Decode steps padded to a ladder of batch sizes, as CUDA graphs replay them, give exactly the unpadded tokens.

On CPU the padded path runs eagerly (what a graph records): the same greedy tokens as the unpadded engine and as HF
transformers while the batch shrinks through the ladder (5 sequences: eager, above the largest size 4; then 4,
3 -> 4, 2, 1), and padding rows write only the padding block. The `gpu` tests replay real graphs, with the fused
small-batch projections, with them launched chained, and without (the engine picks whichever it measures
fastest; the tests force each): in float32 their tokens equal eager decode's and HF's on the same GPU; in bfloat16
they print the agreement with HF on the first NEW tokens of each prompt (random tiny models, so near-ties in the
logits are rare but possible).

The tiny models are conftest's, with a word-level tokenizer instead of SmolLM2's, so they build on a GPU machine
that lacks the embedded model.
"""

import dataclasses
import functools
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from cluster.bench.engine_roofline import agreement
from cluster.bench.random_model import write_tokenizer
from tests.conftest import build_tiny_model
from tests.hf_reference import hf_greedy
from tests.lora_adapters import ATTENTION, MLP, merged_model, write_adapter
from workers.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from workers.engine.layers import triton_projections
from workers.engine.layers.fusion import SmallBatchFusion
from workers.engine.llm import LLM
from workers.engine.sampling_params import SamplingParams

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
NEW = 16
# Lengths cross block boundaries and mistral's 64-token window; max tokens differ so the batch shrinks step by step.
PROMPT_LENS = [5, 16, 47, 70, 100]
MAX_TOKENS = [3, 7, 10, 13, NEW]
# (sequences, padded size) of each decode step those run through a ladder up to 4; the two 5-sequence steps are eager.
PADDED_STEPS = [(4, 4)] * 4 + [(3, 4)] * 3 + [(2, 2)] * 3 + [(1, 1)] * 3


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """`make(arch) -> folder`, each built once."""
    tokenizer = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(tokenizer, 49152, bos_token_id=1, eos_token_id=2)
    return functools.cache(lambda arch: build_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"), tokenizer))


def prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(49152) for _ in range(n)] for n in PROMPT_LENS]


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def generate(llm: LLM, batch: list[list[int]]) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(batch, [params(n) for n in MAX_TOKENS])]


def test_the_ladder_is_powers_of_two_to_8_then_multiples_of_16_then_the_largest_size():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(256) == [1, 2, 4, 8, *range(16, 257, 16)]


def test_the_cpu_engine_runs_eagerly_with_one_padding_block_past_the_schedulers(tiny_model):
    llm = LLM(str(tiny_model("llama")), num_kv_blocks=32, progress=False)
    runner = llm.engine.runner
    assert runner.decode_graphs is None
    assert runner.kv_caches[0][0].shape[0] == 33 and llm.engine.block_manager.num_blocks == 32


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3", "granite"])
def test_padded_decode_gives_the_unpadded_tokens_and_hfs(arch, tiny_model):
    path = tiny_model(arch)
    batch = prompts(1)
    unpadded = generate(LLM(str(path), num_kv_blocks=64, progress=False), batch)
    llm = LLM(str(path), num_kv_blocks=64, progress=False)
    llm.engine.runner.use_padded_decode(max_batch_size=4, capture=False)
    sizes = []
    prepare = llm.engine.runner.decode_graphs.prepare
    llm.engine.runner.decode_graphs.prepare = lambda seqs: sizes.append((len(seqs), prepare(seqs))) or sizes[-1][1]
    padded = generate(llm, batch)
    assert padded == unpadded
    assert padded == [hf_greedy(path, prompt, n) for prompt, n in zip(batch, MAX_TOKENS)]
    assert sizes == PADDED_STEPS


def test_padding_rows_write_the_padding_block_and_nothing_else(tiny_model):
    llm = LLM(str(tiny_model("llama")), num_kv_blocks=32, progress=False)
    runner = llm.engine.runner
    runner.use_padded_decode(max_batch_size=4, capture=False)
    graphs: DecodeGraphs = runner.decode_graphs
    seqs = [llm.engine._new_request(p, params(4), None, None).seq for p in prompts(2)[:3]]
    for i, seq in enumerate(seqs):  # each with its context in the cache up to its last token
        seq.block_table = list(range(8 * i, 8 * i + 8))
        seq.num_computed_tokens = seq.num_tokens - 1
    graphs.prepare(seqs + [seqs[0]])  # a 4-row step leaves a real row 3 behind
    before = [k.clone() for k, _ in runner.kv_caches]
    with torch.inference_mode():
        logits = graphs.forward(seqs)
    assert logits.shape == (3, 49152)
    assert graphs.slot_mapping[3] == 32 * 16 and graphs.context_lens[3] == 1 and graphs.block_tables[3, 0] == 32
    written = {(b, s) for k, old in zip((k for k, _ in runner.kv_caches), before)
               for b, s in (k != old).any(-1).any(-1).nonzero().tolist()}
    bs = runner.block_size
    assert written == {(seq.block_table[(seq.num_tokens - 1) // bs], (seq.num_tokens - 1) % bs) for seq in seqs} | {
        (32, 0)}


# -- real CUDA graphs ----------------------------------------------------------------------------------------


@functools.cache
def hf_on_gpu(path, dtype: torch.dtype):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to("cuda").eval()
    model.generation_config.eos_token_id = None  # exactly max_new_tokens, as the engine's ignore_eos
    return model


@torch.inference_mode()
def hf_greedy_on_gpu(path, dtype: torch.dtype, prompt: list[int], max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], device="cuda")
    out = hf_on_gpu(path, dtype).generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                           max_new_tokens=max_tokens)
    return out[0, len(prompt):].tolist()


# The ways the engine may run a small batch's projections (layers/fusion.py), by the names it logs them under.
WAYS = {"unfused": SmallBatchFusion(), "fused": SmallBatchFusion(triton_projections.BLOCK_M),
        "chained": SmallBatchFusion(triton_projections.BLOCK_M, chained=True)}


def gpu_llm(path, dtype: str, way: str | None = None, **kwargs) -> LLM:
    """An engine on the GPU; `way` overrides its measured choice of how to run the small-batch projections."""
    if way == "chained" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("chained launches (programmatic dependent launch) need sm_90 or later")
    llm = LLM(str(path), device="cuda", dtype=dtype, attention_backend="triton", num_kv_blocks=64, max_num_seqs=8,
              progress=False, **kwargs)
    if way is not None:
        force_fusion(llm, way)
    return llm


def force_fusion(llm: LLM, way: str) -> None:
    runner = llm.engine.runner
    runner.model.fusion.max_rows, runner.model.fusion.chained = WAYS[way].max_rows, WAYS[way].chained
    runner.decode_graphs.capture()


@gpu
@pytest.mark.gpu
def test_the_engine_keeps_the_way_of_running_small_batches_its_batch_1_graph_measured_fastest(tiny_model):
    runner = gpu_llm(tiny_model("llama"), "bfloat16").engine.runner
    times = runner.fusion_replay_ms
    expected = {"unfused", "fused"} | ({"chained"} if torch.cuda.get_device_capability() >= (9, 0) else set())
    assert set(times) == expected and all(ms is not None for ms in times.values()), times
    fastest = min(times, key=times.get)
    assert runner.small_batch_way == fastest and runner.model.fusion == WAYS[fastest]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cuda_graph_decode_equals_eager_decode_and_hf_in_float32(arch, way, tiny_model):
    path = tiny_model(arch)
    batch = prompts(3)
    eager = generate(gpu_llm(path, "float32", enforce_eager=True), batch)
    llm = gpu_llm(path, "float32", way)
    assert llm.engine.runner.decode_graphs.batch_sizes == [1, 2, 4, 8]
    graphed = generate(llm, batch)
    llm.engine.runner.use_padded_decode(max_batch_size=4, capture=True)  # 5 decodes run eagerly, then graphs
    force_fusion(llm, way)
    regraphed = generate(llm, batch)
    assert graphed == regraphed == eager
    assert graphed == [hf_greedy_on_gpu(path, torch.float32, p, n) for p, n in zip(batch, MAX_TOKENS)]
    assert llm.engine.runner.decode_graphs.num_replays == len(PADDED_STEPS)


@gpu
@pytest.mark.gpu
def test_prefixes_copied_back_from_pinned_host_memory_give_hfs_tokens_under_graphs(tiny_model):
    """On a GPU the host tier is pinned memory and its copies cross the bus. Four 48-token documents on a 12-block
    cache, asked about twice: the second round's prefixes come back from the host tier and feed graph decodes."""
    path = tiny_model("llama")
    llm = LLM(str(path), device="cuda", dtype="float32", attention_backend="triton", num_kv_blocks=12,
              kv_offload_gb=0.01, max_num_seqs=8, progress=False)
    rng = random.Random(30)
    docs = [[rng.randrange(49152) for _ in range(48)] for _ in range(4)]
    batch = [doc + tail for tail in ([1, 2, 3], [4, 5]) for doc in docs]
    ours = [llm.generate(prompt, params(NEW))[0].outputs[0].token_ids for prompt in batch]
    assert llm.engine.block_manager.num_reloaded_blocks >= 9
    assert ours == [hf_greedy_on_gpu(path, torch.float32, prompt, NEW) for prompt in batch]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cuda_graph_decode_in_bfloat16_agrees_with_hf_on_the_first_tokens(arch, way, tiny_model,
                                                                          record_property):
    path = tiny_model(arch)
    batch = [p for seed in range(4) for p in prompts(10 + seed)]
    llm = gpu_llm(path, "bfloat16", way)
    ours = [out.outputs[0].token_ids for out in llm.generate(batch, params(NEW))]
    hf = [hf_greedy_on_gpu(path, torch.bfloat16, prompt, NEW) for prompt in batch]
    match_pct, share = agreement(ours, hf)
    record_property("bf16_agreement", share)
    print(f"\n{arch} bfloat16, CUDA graphs (small-batch projections: {way}) vs HF on "
          f"the same GPU, first {NEW} tokens of {len(batch)} prompts: "
          f"{match_pct:.0f}% of prompts agree on all, {share:.0%} of tokens agree before the first difference")
    assert llm.engine.runner.decode_graphs.num_replays > 0
    assert share >= 0.5


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("loaded", ["at start", "added while running", "on demand, after dropping another"])
def test_lora_decode_steps_replay_graphs_of_their_own_and_equal_hf_on_the_merged_weights(tiny_model, tmp_path, loaded):
    """float32: a batch mixing the base model and an adapter gives HF's tokens on the merged weights for the
    adapter's requests and on the base weights for the others, its decode steps replaying the adapters' graphs
    (captured again when an adapter is added to a running engine, or loaded by a request that brings its folder
    and drops another: max_loras=1)."""
    path = tiny_model("llama")
    adapter = write_adapter(tmp_path / "adapter", path, ATTENTION + MLP, rank=4, alpha=8, seed=7, std=0.2)
    folder = None
    if loaded == "at start":
        llm = gpu_llm(path, "float32", lora_modules={"a": str(adapter.folder)})
    elif loaded == "added while running":
        llm = gpu_llm(path, "float32")
        llm.add_lora("a", str(adapter.folder))
    else:
        llm = gpu_llm(path, "float32", max_loras=1)
        other = write_adapter(tmp_path / "other", path, ATTENTION, rank=4, alpha=8, seed=8, std=0.2)
        llm.generate(prompts(1), dataclasses.replace(params(4), lora="b@1", lora_path=str(other.folder)))
        folder = str(adapter.folder)
    graphs = llm.engine.runner.decode_graphs
    assert set(graphs.lora_graphs) == set(graphs.graphs) == {1, 2, 4, 8}
    batch, loras = prompts(3), [None, "a", None, "a", "a"]
    outs = llm.generate(batch, [dataclasses.replace(params(n), lora=lora, lora_path=folder if lora else None)
                                for n, lora in zip(MAX_TOKENS, loras)])
    assert llm.engine.runner.lora.names == ("a",)
    merged = merged_model(adapter, path, tmp_path / "merged")
    assert [out.outputs[0].token_ids for out in outs] == [
        hf_greedy_on_gpu(merged if lora else path, torch.float32, p, n) for p, n, lora in zip(batch, MAX_TOKENS, loras)]
    assert graphs.num_replays > 0


@gpu
@pytest.mark.gpu
def test_prompt_logprobs_on_the_gpu_match_hf_and_the_decode_after_them_replays_graphs(tiny_model):
    """A prompt whose positions want logprobs runs eagerly (a graph computes the sampled rows' logits only); the
    decode steps after it replay graphs. float32: the logprobs within 2e-3 of HF's on the same GPU."""
    path = tiny_model("llama")
    prompt = prompts(5)[3]  # 70 tokens: several blocks
    llm = gpu_llm(path, "float32")
    out = llm.generate([prompt], SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True,
                                                prompt_logprobs=2))[0]
    with torch.inference_mode():
        logits = hf_on_gpu(path, torch.float32)(torch.tensor([prompt], device="cuda")).logits[0]
    reference = torch.log_softmax(logits.float(), dim=-1).cpu()
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for position, entry in enumerate(out.prompt_logprobs[1:]):
        assert prompt[position + 1] in entry
        assert all(abs(value - reference[position, token].item()) < 2e-3 for token, value in entry.items())
    assert out.outputs[0].token_ids == hf_greedy_on_gpu(path, torch.float32, prompt, NEW)
    assert llm.engine.runner.decode_graphs.num_replays == NEW - 1
