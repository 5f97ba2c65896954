"""What a classifier's logits (a *ForSequenceClassification checkpoint's head on the last token) tell a caller:
each class's probability and the likeliest class, by the names the model's config gives its classes."""

import math
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PretrainedConfig

from workers.engine.models.llama import classifies


@dataclass(frozen=True)
class Classification:
    label: str  # the likeliest class's name
    probs: list[float]  # per class, in the config's order


def class_labels(config: PretrainedConfig) -> tuple[str, ...]:
    """The classes' names in order (config.id2label; HF names unnamed ones LABEL_i); none for a model that does
    not classify."""
    if not classifies(config):
        return ()
    return tuple(config.id2label[i] for i in range(config.num_labels))


def classified(logits: Sequence[float], labels: Sequence[str]) -> Classification:
    """Softmax over the classes; a single class (a reward or relevance score) through a sigmoid instead, as vLLM's
    classify does, so its probability says how far the score is from 0."""
    if len(logits) == 1:
        probs = [1.0 / (1.0 + math.exp(-logits[0]))]
    else:
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        probs = [e / sum(exps) for e in exps]
    return Classification(labels[max(range(len(probs)), key=probs.__getitem__)], probs)
