"""The draft vocabulary: the tokens the heads may guess, the ones the model uses most in its training text.

A head's guess costs one pass over the [V, H] LM head per drafted row, and on a CPU that pass is
most of the drafting time. The model's own text uses a small part of its vocabulary, so the
heads read only the rows of its `size` most used tokens (FR-Spec, Zhao et al. 2025, does the
same for EAGLE's drafts). A guess outside that set is lost as a draft. The verify still decides
every token over the whole vocabulary, so the output does not change.

A token's frequency is its expected count under the model over the generated part of the
self-distillation text: the sum, over those positions, of the model's probability for it. Argmax
counts would rank only the few thousand tokens the text happens to contain and leave the rest
tied; the probabilities rank every token, and on held-out text they covered more of the model's
choices (94.3% against 93.5% at 16384 tokens of SmolLM2's 49152, 28k positions). `treedec
train-heads` saves them beside the heads as `token_frequencies.safetensors`.
"""

from __future__ import annotations

from pathlib import Path

import torch

FREQUENCIES_NAME = "token_frequencies.safetensors"
# The default draft vocabulary: the fewest tokens holding this much of the model's probability
# over the training text (SmolLM2: 16090 of 49152 tokens). `train-heads` trains over it and the
# drafter guesses from it. On Spec-Bench with the verify cost fixed, 8192, 16384 and 24576 tokens
# moved heads' tau by at most 0.044 from the whole vocabulary's, with no trend in the size
# (README, "Draft vocabulary").
DRAFT_MASS = 0.99


@torch.inference_mode()
def token_frequencies(examples, lm_head, chunk: int = 1024) -> torch.Tensor:
    """float64 [V]: the sum of softmax(lm_head(h)) over the generated positions of `examples`
    (`training.Example`: the states whose LM-head output is a generated token, from position
    generated_from - 1 to the one before the last)."""
    device = lm_head.weight.device
    total = torch.zeros(lm_head.weight.shape[0], dtype=torch.float64)
    for example in examples:
        states = example.hidden[max(example.generated_from - 1, 0) : -1]
        for i in range(0, states.shape[0], chunk):
            logits = lm_head(states[i : i + chunk].to(device, lm_head.weight.dtype)).float()
            total += torch.softmax(logits, dim=-1).sum(0).double().cpu()
    return total


def save_frequencies(frequencies: torch.Tensor, directory: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({"frequencies": frequencies.float().contiguous().cpu()}, Path(directory) / FREQUENCIES_NAME)


def load_frequencies(directory: str | Path) -> torch.Tensor | None:
    """The frequencies saved beside heads, or None (heads trained before they were saved)."""
    from safetensors.torch import load_file

    path = Path(directory) / FREQUENCIES_NAME
    return load_file(path)["frequencies"] if path.exists() else None


def check_frequencies(frequencies: torch.Tensor | None, vocab_size: int, source: str) -> None:
    """A ValueError unless `frequencies` (from `source`) is None or one per token of the vocabulary."""
    if frequencies is not None and frequencies.shape != (vocab_size,):
        raise ValueError(f"{source} holds {tuple(frequencies.shape)} frequencies; its heads' vocabulary has "
                         f"{vocab_size} tokens")


def draft_vocabulary(frequencies: torch.Tensor, size: int) -> torch.Tensor:
    """int64 [min(size, V)]: the ids of the `size` most frequent tokens (ties to the smaller id), in
    increasing id order, so that a tie between two guesses still goes to the smaller id, as over
    the whole vocabulary."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"draft_vocab = {size!r} must be an int >= 1")
    order = torch.sort(frequencies, descending=True, stable=True).indices  # equal: increasing id
    return order[:size].sort().values


def default_size(frequencies: torch.Tensor, mass: float) -> int:
    """The fewest most-frequent tokens that hold `mass` of the total frequency: 16090 of SmolLM2's
    49152 tokens hold 99% of its probability over the shipped heads' frequency text."""
    cumulative = torch.sort(frequencies.double(), descending=True).values.cumsum(0)
    if cumulative[-1] <= 0:  # nothing counted: no ranking to trust
        return frequencies.numel()
    return min(int((cumulative < mass * cumulative[-1]).sum()) + 1, frequencies.numel())


def vocabulary_positions(vocab_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int64 [vocab_size]: each token's position in `vocab_ids`, -1 for a token outside it."""
    positions = torch.full((vocab_size,), -1, dtype=torch.int64, device=vocab_ids.device)
    positions[vocab_ids] = torch.arange(len(vocab_ids), device=vocab_ids.device)
    return positions
