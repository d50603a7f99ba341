"""SWIFT's question for one model: which layers can a draft skip and still agree with the model?

Scores come from the model's own recent tokens: one forward of a window of them through the full
model gives its choices (argmax at each position); a forward with a candidate set of layers
skipped gives the draft's, and the score is how often they agree. The search is greedy and
bounded: every middle layer is scored alone (first and last layers always run), the layers whose
absence costs least are skipped together in growing numbers, and the set with the best expected
speed wins. That speed is a model of a chain draft of `depth` tokens accepted with the score's
probability each, drafted at the skipped model's cost, then verified at the full model's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

SKIP_FRACTIONS = (0.2, 0.3, 0.4, 0.5, 0.6)
SCORING_SHARE = 0.7  # of the budget for scoring single layers; the rest tries sets of them
MIN_GAIN = 1.05  # below this expected speed-up, drafting is not worth its cost: draft nothing


@dataclass
class SkipPlan:
    """A search's result: the layers a draft runs (None: do not draft) and what it cost."""

    kept: tuple[int, ...] | None
    agreement: float | None = None  # the kept set's top-1 agreement with the full model (searched plans)
    expected_gain: float | None = None  # searched plans: modelled speed over plain decoding
    seconds: float = 0.0
    forwards: int = 0
    layer_scores: dict[int, float] = field(default_factory=dict)  # agreement with one layer skipped

    def skipped(self, num_layers: int) -> list[int]:
        return [] if self.kept is None else [i for i in range(num_layers) if i not in self.kept]


def draft_cost_ratio(adapter, kept: int) -> float:
    """A draft token's cost over a full forward's, from parameter counts: the layers kept plus the
    LM head (a one-token forward on these machines is bound by reading weights)."""
    layer_params = adapter.layer_parameter_count()
    head_params = adapter.vocab_size * adapter.hidden_size
    full = adapter.num_layers * layer_params + head_params
    return (kept * layer_params + head_params) / full


def expected_gain(agreement: float, cost_ratio: float, depth: int) -> float:
    """Tokens per unit of time against plain decoding: a chain of `depth` drafts, each accepted
    with probability `agreement` given its parent was, costs depth * cost_ratio + 1 forwards and
    emits 1 + a + a^2 + ... + a^depth tokens."""
    tokens = sum(agreement**i for i in range(depth + 1))
    return tokens / (1.0 + depth * cost_ratio)


@torch.inference_mode()
def choices(adapter, window: torch.Tensor, kept: tuple[int, ...] | None) -> torch.Tensor:
    """The model's argmax after each token of `window` (int64 [W]), running only layers `kept`
    (None: all). A plain forward without cache, outside the tree loop's attention."""
    layers = None if kept is None else adapter.layer_subset(kept)
    hidden = adapter.hidden_states(window.view(1, -1), layers)
    return adapter.topk(hidden, 1)[0, :, 0]  # the fused LM-head top-1: no [W, V] logits


def search(adapter, window: torch.Tensor, depth: int, budget_seconds: float) -> SkipPlan:
    """The skip set for `adapter`'s model scored on `window` (int64 [W], the model's recent tokens);
    stops starting new forwards once `budget_seconds` have passed and decides with what it has."""
    started = time.perf_counter()
    num_layers = adapter.num_layers
    target = choices(adapter, window, None)
    forwards = 1

    def agreement(kept: tuple[int, ...]) -> float:
        nonlocal forwards
        forwards += 1
        return float((choices(adapter, window, kept) == target).float().mean())

    def elapsed() -> float:  # the same on every rank of a tensor-parallel model
        return adapter.agreed_seconds(time.perf_counter() - started)

    def out_of_time() -> bool:
        return elapsed() > budget_seconds

    middle = list(range(1, num_layers - 1))
    scores: dict[int, float] = {}
    for layer in middle:
        if elapsed() > SCORING_SHARE * budget_seconds:
            break  # keep the rest of the budget for trying sets
        scores[layer] = agreement(tuple(i for i in range(num_layers) if i != layer))
    order = sorted(scores, key=lambda layer: -scores[layer])  # least harmful to skip first
    best = SkipPlan(None, layer_scores=scores)  # the best set tried, drafted with only if it pays
    tried = set()
    for fraction in SKIP_FRACTIONS:
        count = min(len(order), max(1, round(fraction * num_layers)))
        if count in tried or out_of_time():
            continue
        tried.add(count)
        skipped = set(order[:count])
        kept = tuple(i for i in range(num_layers) if i not in skipped)
        score = agreement(kept)
        gain = expected_gain(score, draft_cost_ratio(adapter, len(kept)), depth)
        if best.expected_gain is None or gain > best.expected_gain:
            best = SkipPlan(kept, score, gain, layer_scores=scores)
    if best.expected_gain is None or best.expected_gain < MIN_GAIN:
        best.kept = None  # its figures stay, to say why nothing is drafted
    best.seconds, best.forwards = time.perf_counter() - started, forwards
    return best
