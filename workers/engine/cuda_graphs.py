"""Decode steps as CUDA graphs: one graph per batch size of a ladder, each step padded up to the next captured size.

A decode step launches a few hundred small kernels whose launch costs, more than their work, bound small batches;
a graph launches them all at once. A graph replays fixed addresses and shapes, so each step's inputs (token ids,
positions, slot mapping, block tables, context lengths) are copied into static buffers sized for the largest
graph, and a batch of n sequences runs the graph of the smallest captured size b >= n.

The b - n padding rows decode token 0 at position 0: their K/V go to the cache's padding block, one block past the
blocks the scheduler hands out, and they attend over that block alone, so they never touch a sequence's blocks.
Every step rewrites its padding rows: rows left over from a larger earlier batch would otherwise write into blocks
that may now belong to another sequence. The attention grid is fixed at capture, so a graph splits each context
into as many partitions as `max_context` tokens would take, and the decode kernel sizes them to each sequence's own
length.

With LoRA adapters each size has a second graph, for steps with an adapter's rows: it reads each row's adapter
from one more static buffer (padding rows: none) and runs every adapter's ranks the way a mixed eager step does
(lora.py), so one graph serves any mix. Steps of the base model alone keep the graphs without them.

A graph records `run`, the eager padded step; CPU tests run that without graphs to check the padding.
"""

import torch

from workers.engine.attention.metadata import AttentionMetadata, pad_block_tables, slot_of
from workers.engine.lora import LoRAAdapters
from workers.engine.sequence import Sequence


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 below max_batch_size, then max_batch_size itself: a batch pads by at
    most 15 rows, which costs little beside the weights every step reads anyway."""
    return [b for b in (1, 2, 4, 8) if b < max_batch_size] + list(range(16, max_batch_size, 16)) + [max_batch_size]


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 padding_block: int, block_size: int, max_context: int, batch_sizes: list[int],
                 lora: LoRAAdapters | None = None):
        self.model = model
        self.lora = lora
        self.kv_caches = kv_caches
        self.padding_block = padding_block
        self.block_size = block_size
        self.max_context = max_context
        self.batch_sizes = batch_sizes
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.lora_graphs: dict[int, torch.cuda.CUDAGraph] = {}  # with LoRA adapters: the steps with their rows
        self.num_replays = 0  # steps a graph ran, for logs and tests
        rows, device = batch_sizes[-1], kv_caches[0][0].device
        # Token ids, positions, slot mapping, context lengths and LoRA adapter slots, one row each, so a step copies
        # them in at once.
        self._inputs = torch.empty((5, rows), dtype=torch.long, device=device)
        self.input_ids, self.positions, self.slot_mapping, self.context_lens, self.adapter_slots = self._inputs
        self.block_tables = torch.empty((rows, -(-max_context // block_size)), dtype=torch.long, device=device)
        weight = next(model.parameters())
        self.logits = torch.zeros((rows, model.config.vocab_size), dtype=weight.dtype, device=device)
        self._pad_all()

    def can_run(self, batch: list[tuple[Sequence, int]]) -> bool:
        """Decode-only batches (one new token per sequence) up to the largest captured size."""
        return len(batch) <= self.batch_sizes[-1] and all(n == 1 for _, n in batch)

    def forward(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits [len(seqs), vocab] of one decode step: a view of the static buffer, valid until the next step."""
        size = self.prepare(seqs)
        adapters = any(seq.lora for seq in seqs)
        graph = (self.lora_graphs if adapters else self.graphs).get(size)
        if graph is None:
            self.run(size, adapters)
        else:
            graph.replay()
            self.num_replays += 1
        return self.logits[:len(seqs)]

    def prepare(self, seqs: list[Sequence]) -> int:
        """Copies the batch into the static buffers, padded to the next captured size, and returns that size."""
        size, bs = next(b for b in self.batch_sizes if b >= len(seqs)), self.block_size
        pad = size - len(seqs)
        positions = [seq.num_computed_tokens for seq in seqs]
        adapter_slots = [-1] * len(seqs) if self.lora is None else [self.lora.slot_of(seq.lora) for seq in seqs]
        self._inputs[:, :size].copy_(torch.tensor([
            [seq.token_ids[p] for seq, p in zip(seqs, positions)] + [0] * pad,
            positions + [0] * pad,
            [slot_of(seq.block_table, p, bs) for seq, p in zip(seqs, positions)] + [self._padding_slot] * pad,
            [p + 1 for p in positions] + [1] * pad,
            adapter_slots + [-1] * pad,
        ]))
        # Table columns past a row's own blocks keep older values: the kernels read no block past a context's end.
        width = max(len(seq.block_table) for seq in seqs)
        self.block_tables[:size, :width].copy_(pad_block_tables([seq.block_table for seq in seqs], width,
                                                                self.padding_block, rows=size))
        return size

    def run(self, size: int, adapters: bool = False) -> torch.Tensor:
        """The model on the first `size` rows of the static buffers, its logits copied into the static logits;
        with `adapters`, each row under the LoRA adapter its slot names."""
        if adapters:
            with self.lora.rows(self.adapter_slots[:size], self.model.fusion):
                return self.run(size)
        meta = AttentionMetadata(slot_mapping=self.slot_mapping[:size], prefills=[], num_prefill_tokens=0,
                                 decode_block_tables=self.block_tables[:size],
                                 decode_context_lens=self.context_lens[:size],
                                 decode_buckets=[(0, size, self.max_context)],
                                 chained=self.model.fusion.chains(self.input_ids[:size]))
        hidden = self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, meta)
        return self.logits[:size].copy_(self.model.compute_logits(hidden))

    @torch.inference_mode()
    def capture(self, sizes: list[int] | None = None, adapters: bool = True, base: bool = True) -> None:
        """Captures the given batch sizes (all by default) on padding rows alone, largest first, so the smaller
        graphs reuse the largest one's memory pool: the base model's (with `base`) and, with LoRA adapters (and
        `adapters`), those of steps with adapters' rows. A size captured before is replaced."""
        self._pad_all()
        pool = torch.cuda.graph_pool_handle()
        kinds = ([(False, self.graphs)] if base else []) + (
            [(True, self.lora_graphs)] if adapters and self.lora is not None else [])
        for size in sorted(sizes or self.batch_sizes, reverse=True):
            for with_adapters, graphs in kinds:
                # First outside the capture: Triton compiles and tunes, cuBLAS picks its kernels, workspaces grow.
                self.run(size, with_adapters)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.run(size, with_adapters)
                graphs[size] = graph

    def replay_ms(self, size: int, repeats: int = 50) -> float:
        """Device milliseconds of one replay of the graph of `size` on what the static buffers hold (padding rows
        unless a step was prepared), replayed back to back between two CUDA events: its kernels and the gaps
        between them, without the host's part of a step."""
        graph = self.graphs[size]
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / repeats

    @property
    def _padding_slot(self) -> int:
        return self.padding_block * self.block_size

    def _pad_all(self) -> None:
        """Makes every row a padding row: token 0 at position 0, in the padding block's first slot, no adapter."""
        self._inputs.copy_(torch.tensor([0, 0, self._padding_slot, 1, -1])[:, None])
        self.block_tables.fill_(self.padding_block)
