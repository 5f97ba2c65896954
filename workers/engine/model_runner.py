"""The only part of the engine that touches tensors: it owns the model, the KV cache and the sampler.

Each step it turns the scheduler's (sequence, number of new tokens) pairs into flat input tensors, runs one
forward pass over all of them, and samples a token for every sequence whose new tokens reach its end.

Decode-only batches can instead replay CUDA graphs (cuda_graphs.py), padded to a captured batch size; padding
rows write into one extra cache block past those the scheduler hands out.

Under tensor parallelism every rank holds one runner with its shard of the weights and of the KV heads. Rank 0's
runner sends each batch to the others as a step plan (step_plan.py) before running it; the followers run the same
forward pass on their mirrors of the requests and join the collectives, but only rank 0 samples.
"""

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoConfig, PretrainedConfig

from workers.engine.attention.backend import get_attention_backend
from workers.engine.attention.metadata import (
    AttentionMetadata,
    PrefillMeta,
    decode_buckets,
    pad_block_tables,
    slot_of,
)
from workers.engine.config import CacheConfig, EngineConfig
from workers.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes
from workers.engine.layers.fusion import SmallBatchFusion
from workers.engine.layers.rotary import RotaryEmbedding
from workers.engine.lora import LoRAAdapters
from workers.engine.model_store import resolve_model
from workers.engine.models.llama import LlamaForCausalLM, attention_scale_of, head_dim_of, sliding_window_of
from workers.engine.models.loader import load_weights
from workers.engine.parallel import TensorParallel, all_reduce, shard_heads
from workers.engine.sampler import Sampler, TokenHistory, make_generator, top_logprobs
from workers.engine.sequence import Sequence
from workers.engine.step_plan import CopyBlocks, DropAdapter, LoadAdapter, PlanWriter
from workers.engine.structured_output import token_bitmask

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "GraniteForCausalLM",
                           # their decoders alone, as embedding models ship them (models/loader.py)
                           "LlamaModel", "MistralModel", "Qwen2Model", "Qwen3Model",
                           # classifiers and reward models: a head of a few classes on the last token
                           "LlamaForSequenceClassification", "MistralForSequenceClassification",
                           "Qwen2ForSequenceClassification", "Qwen3ForSequenceClassification"}


@dataclass
class SampledToken:
    seq: Sequence
    token_id: int
    logprobs: dict[int, float] | None
    # The tokens after token_id that the same step yields: the sequence's guesses the model agreed with, then its
    # own pick where they stopped (speculative.py); and their logprobs when the request asks for them.
    more_token_ids: list[int] = field(default_factory=list)
    more_logprobs: list[dict[int, float] | None] = field(default_factory=list)


# Prompt positions whose vocabulary-wide logits exist at once, for prompt logprobs: 256 x 128k x 4 B = 128 MiB.
_PROMPT_LOGITS_ROWS = 256


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r} (choose from auto, {', '.join(dtypes)})")
    return dtypes[name]


def load_hf_config(model_dir: Path) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(model_dir)
    archs = set(getattr(config, "architectures", None) or [])
    if not archs & SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{model_dir}: architecture {sorted(archs)} is not supported "
                         f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})")
    return config


class ModelRunner:
    def __init__(self, config: EngineConfig, progress: bool = False, tp: TensorParallel = TensorParallel()):
        model_config, cache_config = config.model, config.cache
        self.model_dir = model_dir = resolve_model(model_config.model)
        self.hf_config = hf_config = load_hf_config(model_dir)
        self.max_model_len = max_model_len = min(model_config.max_model_len or hf_config.max_position_embeddings,
                                                 hf_config.max_position_embeddings)
        self.device = torch.device(model_config.device)
        self.dtype = resolve_dtype(model_config.dtype, self.device)
        self.block_size = cache_config.block_size
        self.tp = tp
        # Rank 0 of a group drives the others; a follower's runner is driven.
        self.followers = PlanWriter(tp) if tp.size > 1 and tp.is_driver else None
        self.num_kv_heads = shard_heads(hf_config.num_attention_heads, hf_config.num_key_value_heads, tp).num_kv_heads
        rotary = RotaryEmbedding(hf_config, head_dim_of(hf_config), max_model_len, self.device)
        backend = get_attention_backend(model_config.attention_backend, attention_scale_of(hf_config),
                                        sliding_window_of(hf_config), rotary)
        with torch.device("meta"):
            model = LlamaForCausalLM(hf_config, backend, tp)
        self.model = model.to(self.dtype).to_empty(device=self.device).eval()
        load_weights(self.model, model_dir, progress)
        # When the model last finished a layer: a step that keeps finishing layers is slow, not hung
        # (workers/stall_watch.py).
        self.last_progress = 0.0
        for layer in self.model.model.layers:
            layer.register_forward_hook(self._progressed)
        self.lora = LoRAAdapters(self.model, model_config.lora_modules, tp) if model_config.lora_modules else None
        self.num_kv_blocks = self._num_kv_blocks(cache_config)
        self.kv_caches = self._allocate_kv_cache()
        self.num_host_blocks = int(cache_config.kv_offload_gb * 2**30 // self._bytes_per_block()) \
            if cache_config.enable_prefix_caching else 0
        self.host_kv_caches = self._allocate_host_kv_cache()
        self.sampler = Sampler(model_config.seed)
        self.generators: dict[str, torch.Generator] = {}
        self.histories: dict[str, TokenHistory] = {}  # of requests whose params adjust their logits
        self.decode_graphs: DecodeGraphs | None = None
        # The batch-1 graph's time each way of running the small-batch projections (None: it failed to build), and
        # the way kept.
        self.fusion_replay_ms: dict[str, float | None] = {}
        self.small_batch_way: str | None = None
        if self._captures_graphs(config):
            self.use_padded_decode(min(model_config.max_graph_batch_size, config.scheduler.max_num_seqs), capture=True)

    def _captures_graphs(self, config: EngineConfig) -> bool:
        """On CUDA with the triton backend, at one rank, for a model that generates. The torch backend pads each
        decode's K/V to the longest context, which a graph would fix at the model's whole context length;
        collectives are left out of graphs."""
        return (self.device.type == "cuda" and not config.model.enforce_eager
                and config.model.attention_backend == "triton" and self.tp.size == 1 and self.model.generates)

    def use_padded_decode(self, max_batch_size: int, capture: bool) -> None:
        """Runs decode-only batches of up to max_batch_size sequences padded to the sizes of graph_batch_sizes:
        as CUDA graphs with `capture`, else eagerly (how CPU tests check the padding)."""
        self.decode_graphs = DecodeGraphs(self.model, self.kv_caches, padding_block=self.num_kv_blocks,
                                          block_size=self.block_size, max_context=self.max_model_len,
                                          batch_sizes=graph_batch_sizes(max_batch_size), lora=self.lora)
        if capture:
            start = time.monotonic()
            self.decode_graphs.capture()
            self._choose_small_batch_fusion()
            logger.info("captured decode CUDA graphs for batch sizes %s in %.1f s", self.decode_graphs.batch_sizes,
                        time.monotonic() - start)

    def _choose_small_batch_fusion(self) -> None:
        """Captures the graphs of the small batches again with the fused projections, then (on sm_90 and later)
        with the layer's launches chained as well (layers/fusion.py), times batch 1 each way and keeps the
        fastest, graphs and eager steps alike. A way that fails to build on this GPU (none of the projection
        kernel's configs fits its shared memory, say) is left out: they are optional."""
        from workers.engine.layers.triton_projections import BLOCK_M

        graphs, fusion = self.decode_graphs, self.model.fusion
        small = [b for b in graphs.batch_sizes if b <= BLOCK_M]
        ways = {"unfused": SmallBatchFusion(), "fused": SmallBatchFusion(BLOCK_M)}
        if torch.cuda.get_device_capability(self.device) >= (9, 0):
            ways["chained"] = SmallBatchFusion(BLOCK_M, chained=True)
        captured: dict[str, dict[int, torch.cuda.CUDAGraph]] = {}
        for name, way in ways.items():
            fusion.max_rows, fusion.chained = way.max_rows, way.chained
            try:
                if name != "unfused":  # those graphs are the ones just captured
                    graphs.capture(small, adapters=False)  # LoRA steps never run the fused kernels
                self.fusion_replay_ms[name] = graphs.replay_ms(small[0])
                captured[name] = {b: graphs.graphs[b] for b in small}
            except Exception:  # noqa: BLE001 - the unfused way always stands
                logger.warning("the %s small-batch projections failed to build on this GPU; leaving them out", name,
                               exc_info=True)
                self.fusion_replay_ms[name] = None
        self.small_batch_way = best = min(captured, key=self.fusion_replay_ms.get)
        fusion.max_rows, fusion.chained = ways[best].max_rows, ways[best].chained
        graphs.graphs.update(captured[best])
        logger.info("small-batch projections %s: a batch-%d decode graph takes %s", best, small[0],
                    ", ".join(f"{name} {'-' if ms is None else f'{ms:.3f} ms'}"
                              for name, ms in self.fusion_replay_ms.items()))

    def _bytes_per_block(self) -> int:
        c = self.hf_config
        return 2 * c.num_hidden_layers * self.block_size * self.num_kv_heads * head_dim_of(c) * self.dtype.itemsize

    def _num_kv_blocks(self, cache_config: CacheConfig) -> int:
        if cache_config.num_kv_blocks is not None:
            return cache_config.num_kv_blocks
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * cache_config.gpu_memory_utilization
        else:
            budget = cache_config.kv_cache_memory_gb * 2**30
        num_blocks = int(budget // self._bytes_per_block())
        # Ranks schedule in lockstep, so they must agree on the cache size even when their free memory differs.
        num_blocks = int(all_reduce(torch.tensor([num_blocks], device=self.device), self.tp, dist.ReduceOp.MIN))
        if num_blocks <= 0:
            raise ValueError("no memory left for the KV cache; lower the model size or raise the cache budget")
        return num_blocks

    def _allocate_kv_cache(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One block more than num_kv_blocks: the last one takes the writes of padded decode rows."""
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", self.num_kv_blocks, self.block_size,
                    self.num_kv_blocks * self._bytes_per_block() / 2**30)
        return self._kv_blocks(self.num_kv_blocks + 1, device=self.device)

    def _kv_blocks(self, num_blocks: int, **placement) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A K and a V tensor of `num_blocks` blocks for each layer; `placement`: torch.zeros' device or
        pin_memory."""
        shape = (num_blocks, self.block_size, self.num_kv_heads, head_dim_of(self.hf_config))
        return [(torch.zeros(shape, dtype=self.dtype, **placement), torch.zeros(shape, dtype=self.dtype, **placement))
                for _ in range(self.hf_config.num_hidden_layers)]

    def _progressed(self, *_) -> None:
        self.last_progress = time.monotonic()

    def _allocate_host_kv_cache(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The host tier (host_blocks.py): pinned on a GPU, so copies to and from it run at full bus speed."""
        if not self.num_host_blocks:
            return []
        logger.info("KV host tier: %d blocks (%.2f GiB)", self.num_host_blocks,
                    self.num_host_blocks * self._bytes_per_block() / 2**30)
        return self._kv_blocks(self.num_host_blocks, pin_memory=self.device.type == "cuda")

    @torch.inference_mode()
    def copy_blocks(self, copies: list[tuple[str, int, int]]) -> None:
        """Runs the block manager's copies between the KV cache and the host tier (rank 0 has the followers run
        them on their shards first). Consecutive copies one way run as one gather per layer and tensor; within
        such a run a destination written twice keeps the later copy, as running them one by one would."""
        if self.followers is not None:
            self.followers.send(CopyBlocks(copies))
        for direction, run in groupby(copies, key=lambda copy: copy[0]):
            latest = {dst: src for _, src, dst in run}
            src, dst = torch.tensor(list(latest.values())), torch.tensor(list(latest))
            for device_kv, host_kv in zip(self.kv_caches, self.host_kv_caches):
                for on_device, on_host in zip(device_kv, host_kv):
                    if direction == "out":
                        on_host.index_copy_(0, dst, on_device.index_select(0, src.to(self.device)).cpu())
                    else:
                        on_device.index_copy_(0, dst.to(self.device), on_host.index_select(0, src).to(self.device))

    def add_lora(self, name: str, folder: str) -> None:
        """Loads a LoRA adapter between steps (lora.py); rank 0 has the followers load their shards of it once its
        own loaded. Where decode steps replay CUDA graphs, those of steps with adapters' rows are captured again:
        the ones before read the adapter table this load replaced."""
        if self.lora is None:
            self.lora = LoRAAdapters(self.model, {}, self.tp)
        self.lora.add(name, folder)
        if self.followers is not None:
            self.followers.send(LoadAdapter(name, str(folder)))
        self._recapture_adapter_graphs()

    def remove_lora(self, name: str) -> None:
        """Drops a LoRA adapter between steps, on every rank; its requests must have ended."""
        self.lora.remove(name)
        if self.followers is not None:
            self.followers.send(DropAdapter(name))
        self._recapture_adapter_graphs()

    def _recapture_adapter_graphs(self) -> None:
        graphs = self.decode_graphs
        if graphs is not None:
            graphs.lora = self.lora
            if graphs.graphs:
                graphs.capture(base=False)

    def release(self, request_id: str) -> None:
        """Forget a finished request's random generator and token history (and, on rank 0, the followers' mirror
        of it)."""
        self.generators.pop(request_id, None)
        self.histories.pop(request_id, None)
        if self.followers is not None:
            self.followers.finish(request_id)

    @torch.inference_mode()
    def execute(self, batch: list[tuple[Sequence, int]], sample: bool = True) -> list[SampledToken]:
        """Runs one forward pass. A follower passes its mirrors and sample=False: it computes the logits (the
        vocab-parallel head gathers across ranks) but leaves the choice of tokens to rank 0."""
        if self.followers is not None:
            self.followers.step(batch)
        # Multi-token chunks first, then single-token decodes from the shortest context to the longest, so the
        # attention backend can batch decodes of similar length together.
        batch = sorted(batch, key=lambda item: (item[1] == 1, item[1] == 1 and item[0].num_computed_tokens))
        # A graph computes the logits of the rows that sample only, not of prompt positions that want logprobs, nor
        # the hidden states of embedding requests.
        if self.decode_graphs is not None and self.decode_graphs.can_run(batch) and \
                not any(seq.num_computed_tokens < seq.num_prompt_logprob_positions or seq.embed for seq, _ in batch):
            logits, seqs = self._padded_decode([seq for seq, _ in batch])
        else:
            logits, seqs = self._eager(batch, record=sample)
        if not seqs or not sample:
            return []
        if not any(seq.draft_token_ids for seq in seqs):
            return self._sample(logits, seqs)
        # A sequence with guesses has a row for its next token and one after each guess (speculative.py).
        plain, guessed, row = [], [], 0
        while row < len(seqs):
            seq = seqs[row]
            (guessed if seq.draft_token_ids else plain).append(row)
            row += 1 + len(seq.draft_token_ids)
        sampled = self._sample(logits[plain], [seqs[i] for i in plain]) if plain else []
        for row in guessed:
            seq, params = seqs[row], seqs[row].sampling_params
            rows = logits[row:row + 1 + len(seq.draft_token_ids)]
            tokens = self.sampler.verify(rows, params, self._generator(seq), seq.draft_token_ids)
            logprobs = [None] * len(tokens) if params.logprobs is None else \
                top_logprobs(rows[:len(tokens)], tokens, [params.logprobs] * len(tokens))
            sampled.append(SampledToken(seq, tokens[0], logprobs[0], tokens[1:], logprobs[1:]))
        return sampled

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
        """One token for each row, by its sequence's params."""
        params = [seq.sampling_params for seq in seqs]
        generators = [self._generator(seq) for seq in seqs]
        history = None
        if any(p.adjusts_logits for p in params):
            history = [self._history(seq) if seq.sampling_params.adjusts_logits else None for seq in seqs]
        allowed = None
        if any(seq.grammar is not None for seq in seqs):
            allowed = token_bitmask([seq.grammar for seq in seqs], [seq.output_token_ids for seq in seqs],
                                    self.hf_config.vocab_size)
        out = self.sampler(logits, params, generators, history, allowed)
        return [SampledToken(seq, tok, lp) for seq, tok, lp in zip(seqs, out.token_ids, out.logprobs)]

    def _eager(self, batch: list[tuple[Sequence, int]], record: bool) -> tuple[torch.Tensor | None, list[Sequence]]:
        """Logits of the sequences whose new tokens reach their end, and those sequences; with `record` (rank 0),
        the prompt logprobs of the positions computed are added to their sequences, and the embedding requests
        whose prompt ends in this step get their vectors."""
        input_ids, positions, meta, sample_rows, prompt_rows, embed_rows = self._prepare(batch)
        with self._adapters(batch):
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
        if prompt_rows:
            self._prompt_logprobs(hidden, prompt_rows, record)
        if embed_rows and record:
            self._embed(hidden, embed_rows)
        if not sample_rows:
            return None, []
        rows, seqs = zip(*sample_rows)
        return self.model.compute_logits(hidden[list(rows)]), list(seqs)

    def _embed(self, hidden: torch.Tensor, embed_rows: list[tuple[int, Sequence]]) -> None:
        """Last-token pooling, as decoder-only embedding models (e5-mistral) and vLLM's pooling runner for decoder
        models take it: under a causal mask only the last token's hidden state (after the final norm) has read the
        whole prompt. Normalized to unit length, as OpenAI's embeddings are; a classifier's head turns it into its
        logits per class instead, as HF's *ForSequenceClassification does. Every rank holds the whole hidden state
        (the layers' outputs are all-reduced), so rank 0 alone reads it."""
        rows = torch.tensor([row for row, _ in embed_rows], device=hidden.device)
        last = hidden.index_select(0, rows)
        if self.model.score is not None:
            vectors = self.model.score(last).float().cpu().tolist()
        else:
            vectors = torch.nn.functional.normalize(last.float(), dim=-1).cpu().tolist()
        for (_, seq), vector in zip(embed_rows, vectors):
            seq.embedding = vector

    @contextmanager
    def _adapters(self, batch: list[tuple[Sequence, int]]) -> Iterator[None]:
        """Where the step has rows of LoRA adapters, runs them under their adapters (lora.py)."""
        if self.lora is None or not any(seq.lora for seq, _ in batch):
            yield
            return
        with self.lora.rows(self.lora.slots(batch), self.model.fusion):
            yield

    def _padded_decode(self, seqs: list[Sequence]) -> tuple[torch.Tensor, list[Sequence]]:
        """As _eager, for a decode-only batch: a one-token chunk that does not end its prompt samples nothing."""
        logits = self.decode_graphs.forward(seqs)
        rows = [i for i, seq in enumerate(seqs) if seq.num_computed_tokens + 1 == seq.num_tokens]
        if len(rows) < len(seqs):
            return logits[rows], [seqs[i] for i in rows]
        return logits, seqs

    def _prompt_logprobs(self, hidden: torch.Tensor, prompt_rows: list[tuple[Sequence, int, int, int]],
                         record: bool) -> None:
        """Each (sequence, first row in `hidden`, first position, count) gives the logprobs of the prompt tokens
        after those positions, a slice of rows at a time so that a long prompt's vocabulary-wide logits never
        exist at once. Every rank computes the logits (the vocab-parallel head gathers across them); rank 0 keeps
        the ones a sequence lacks: a prompt computed again after a preemption has them already."""
        index = torch.cat([torch.arange(row, row + n) for _, row, _, n in prompt_rows]).to(hidden.device)
        positions = [(seq, p) for seq, _, first, n in prompt_rows for p in range(first, first + n)]
        for start in range(0, len(positions), _PROMPT_LOGITS_ROWS):
            logits = self.model.compute_logits(hidden[index[start:start + _PROMPT_LOGITS_ROWS]])
            if not record:
                continue
            new = [(i, seq, p) for i, (seq, p) in enumerate(positions[start:start + _PROMPT_LOGITS_ROWS])
                   if p >= len(seq.prompt_logprobs)]
            if not new:
                continue
            rows = torch.tensor([i for i, _, _ in new], device=logits.device)
            found = top_logprobs(logits.index_select(0, rows), [seq.token_ids[p + 1] for _, seq, p in new],
                                 [seq.sampling_params.prompt_logprobs for _, seq, _ in new])
            for (_, seq, _), entry in zip(new, found):
                seq.prompt_logprobs.append(entry)

    def skip_draw(self, seq: Sequence) -> None:
        """Advances a seeded, sampled request's generator past one token's draw (one that another group made)."""
        if seq.sampling_params.greedy:
            return
        generator = self._generator(seq)
        if generator is not None:
            self.sampler.skip_draw(self.hf_config.vocab_size, generator)

    def _history(self, seq: Sequence) -> TokenHistory:
        if seq.request_id not in self.histories:
            self.histories[seq.request_id] = TokenHistory(seq.prompt_token_ids, self.hf_config.vocab_size,
                                                          self.device, seq.end_token_ids,
                                                          seq.sampling_params.allowed_token_ids, seq.bad_words)
        return self.histories[seq.request_id].update(seq.output_token_ids)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        seed = seq.sampling_params.seed
        if seed is None:
            return None
        if seq.request_id not in self.generators:
            self.generators[seq.request_id] = make_generator(seed, self.device)
        return self.generators[seq.request_id]

    def _prepare(self, batch: list[tuple[Sequence, int]]):
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefills: list[PrefillMeta] = []
        decodes: list[Sequence] = []
        sample_rows: list[tuple[int, Sequence]] = []
        prompt_rows: list[tuple[Sequence, int, int, int]] = []
        embed_rows: list[tuple[int, Sequence]] = []
        for seq, n in batch:
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            query_start = len(input_ids)
            guesses = seq.draft_token_ids  # scheduled with its next token: n = 1 + len(guesses)
            input_ids.extend([seq.token_ids[start], *guesses] if guesses else seq.token_ids[start:end])
            table = seq.block_table
            if n == 1:
                # Plain ints: as tensor ops, the slots and positions of 256 decodes took 11 ms of every step on a
                # 2-core CPU; as ints, 0.1 ms.
                positions.append(start)
                slots.append(slot_of(table, start, bs))
                decodes.append(seq)
            else:
                positions.extend(range(start, end))
                slots.extend(slot_of(np.asarray(table), np.arange(start, end), bs).tolist())
                prefills.append(PrefillMeta(query_start, n, end, torch.tensor(table, dtype=torch.long,
                                                                              device=self.device)))
            if guesses:
                sample_rows.extend((query_start + i, seq) for i in range(n))
            elif end == seq.num_tokens:
                (embed_rows if seq.embed else sample_rows).append((len(input_ids) - 1, seq))
            upto = min(end, seq.num_prompt_logprob_positions)
            if start < upto:
                prompt_rows.append((seq, query_start, start, upto - start))
        num_prefill_tokens = sum(p.query_len for p in prefills)
        context_lens = [seq.num_computed_tokens + 1 for seq in decodes]
        max_blocks = max((len(seq.block_table) for seq in decodes), default=0)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            prefills=prefills,
            num_prefill_tokens=num_prefill_tokens,
            decode_block_tables=pad_block_tables([seq.block_table for seq in decodes], max_blocks, 0).to(self.device),
            decode_context_lens=torch.tensor(context_lens, dtype=torch.long, device=self.device),
            decode_buckets=decode_buckets(context_lens),
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        return ids, torch.tensor(positions, dtype=torch.long, device=self.device), meta, sample_rows, prompt_rows, \
            embed_rows
