"""The heads that ship inside the package, for the embedded SmolLM2-135M-Instruct only.

They live in `weights/<kind>/` (heads.json + heads.safetensors, bf16, and
token_frequencies.safetensors for the draft vocabulary) and were trained by `treedec train-heads`
on a GPU (the command is in each heads.json's `command`, and in README; the frequencies' origin
is in its `token_frequencies_from`).

A model is recognised as the one they were trained on by its weights, not by the path it was
loaded from: heads.json holds the base model's `fingerprint` (a few config fields and a probe of
its token embedding), which `train-heads` writes for every model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .modules import CONFIG_NAME, WEIGHTS_NAME

SHIPPED_DIR = Path(__file__).parent / "weights"  # data, not a package: beside this module
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
FINGERPRINT_KEY = "base_fingerprint"
FINGERPRINT_CONFIG = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "vocab_size")
PROBE_ROWS, PROBE_COLUMNS = 16, 16
# Relative L2 distance between two probes that still counts as the same weights: bf16 rounding is
# about 0.004, 4-bit quantization error below 0.15; unrelated weights of the same scale sit near 1.4.
PROBE_TOLERANCE = 0.25


def fingerprint(model) -> dict:
    """What recognises `model` whatever its dtype, device or path: config fields, and the first
    PROBE_COLUMNS entries of PROBE_ROWS evenly spaced rows of its token embedding (float32)."""
    weight = model.get_input_embeddings().weight
    if weight.device.type == "meta":
        raise ValueError("the model's token embedding is on the meta device (offloaded); its weights cannot be read")
    rows = torch.linspace(0, weight.shape[0] - 1, PROBE_ROWS).round().long()
    with torch.no_grad():
        probe = weight[rows.to(weight.device), :PROBE_COLUMNS].float().cpu()
    return {"config": {name: getattr(model.config, name, None) for name in FINGERPRINT_CONFIG},
            "embedding_probe": probe.tolist()}


def same_weights(found: dict, expected: dict) -> bool:
    """Whether two fingerprints name the same model (within PROBE_TOLERANCE)."""
    if found["config"] != expected["config"]:
        return False
    a, b = torch.tensor(found["embedding_probe"]), torch.tensor(expected["embedding_probe"])
    return a.shape == b.shape and float((a - b).norm()) <= PROBE_TOLERANCE * float(b.norm())


def shipped_heads(kind: str, model) -> Path:
    """The shipped `kind` heads' directory when `model` is the embedded model (recognised by its
    weights); a ValueError saying how to get heads otherwise."""
    directory = SHIPPED_DIR / kind
    train = f"`treedec train-heads --kind {kind} --model PATH --out DIR`"
    if not (directory / CONFIG_NAME).exists() or not (directory / WEIGHTS_NAME).exists():
        raise ValueError(f"drafter={kind!r} needs heads=PATH (this install ships no {kind} heads); train them with "
                         f"{train}")
    expected = json.loads((directory / CONFIG_NAME).read_text())[FINGERPRINT_KEY]
    try:
        fits = same_weights(fingerprint(model), expected)
    except ValueError as error:
        raise ValueError(f"drafter={kind!r} needs heads=PATH for this model: {error}") from None
    if not fits:
        raise ValueError(f"drafter={kind!r} needs heads=PATH for this model: the shipped heads are for the embedded "
                         f"{EMBEDDED_NAME} only; train heads for yours with {train}")
    return directory
