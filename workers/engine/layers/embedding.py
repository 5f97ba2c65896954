"""The vocabulary-parallel token embedding, which read the other way is also the LM head.

The vocabulary is cut into contiguous slices of ceil(V / size) rows, one per rank, so any vocabulary size
works: the last slice may be short, and its padding rows are zero and cut from the gathered logits.
"""

import torch
import torch.nn.functional as F
from torch import nn

from workers.engine.layers.weights import WeightSource, check_shape
from workers.engine.parallel import TensorParallel, all_gather_last_dim, all_reduce


class VocabParallelEmbedding(nn.Module):
    """`forward` embeds token ids; `logits` projects hidden states back onto the vocabulary.

    Embedding: a rank looks up only the ids in its slice, writes zeros for the rest, and an all-reduce sums the
    one non-zero row per token. LM head: a rank computes its slice of the logits and an all-gather assembles
    them; only rank 0 samples from them. For the few sampled rows of a step the collective's latency, not its
    bytes, is the cost, so a gather to rank 0 alone would save nothing. A tied model calls its embedding's
    `logits`; an untied one holds a second instance as its lm_head.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.num_embeddings = num_embeddings
        per_rank = -(-num_embeddings // tp.size)
        self.vocab_start = min(tp.rank * per_rank, num_embeddings)
        self.vocab_end = min(self.vocab_start + per_rank, num_embeddings)
        self.weight = nn.Parameter(torch.empty(per_rank, embedding_dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        x = F.embedding((input_ids - self.vocab_start).masked_fill(outside, 0), self.weight)
        return all_reduce(x.masked_fill_(outside.unsqueeze(-1), 0), self.tp)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if self.tp.size == 1:
            return logits
        return all_gather_last_dim(logits, self.tp)[..., :self.num_embeddings]

    def weight_loader(self, param: nn.Parameter, source: WeightSource) -> None:
        check_shape(source, (self.num_embeddings, param.shape[1]))
        n = self.vocab_end - self.vocab_start
        param.data[:n].copy_(source[self.vocab_start:self.vocab_end])
        param.data[n:].zero_()
