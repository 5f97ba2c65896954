"""What a classifier's logits (a *ForSequenceClassification checkpoint's head on the last token) tell a caller:
each class's probability and the likeliest class, by the names the model's config gives its classes."""

import math
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PretrainedConfig

from workers.engine.models.llama import classifies


@dataclass(frozen=True)
class Classes:
    """A classifier's classes: their names in the order of its logits, and how the logits become probabilities:
    as HF's config.problem_type trains them (vLLM reads it the same way). Unset, a softmax over the classes, or
    for a single class (a reward or relevance score) its sigmoid; "multi_label_classification", each class's own
    sigmoid; "regression", the raw scores."""

    labels: tuple[str, ...]
    problem_type: str | None = None


@dataclass(frozen=True)
class Classification:
    label: str  # the likeliest class's name
    probs: list[float]  # per class, in the order of Classes.labels


def classes_of(config: PretrainedConfig) -> Classes | None:
    """None for a model that does not classify; unnamed classes are LABEL_i, as HF names them."""
    if not classifies(config):
        return None
    return Classes(tuple(config.id2label[i] for i in range(config.num_labels)),
                   getattr(config, "problem_type", None))


def classified(logits: Sequence[float], classes: Classes) -> Classification:
    if classes.problem_type == "regression":
        probs = list(logits)
    elif classes.problem_type == "multi_label_classification" or len(logits) == 1:
        probs = [1.0 / (1.0 + math.exp(-v)) for v in logits]
    else:
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        probs = [e / sum(exps) for e in exps]
    return Classification(classes.labels[max(range(len(probs)), key=probs.__getitem__)], probs)
