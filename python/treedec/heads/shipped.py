"""The heads that ship inside the package, for the embedded SmolLM2-135M-Instruct only.

They live in `weights/<kind>/` (heads.json + heads.safetensors, bf16, and
token_frequencies.safetensors for the draft vocabulary) and were trained by `treedec train-heads`
on a GPU (the command is in each heads.json's `command`, and in README; the frequencies' origin
is in its `token_frequencies_from`).
"""

from __future__ import annotations

import json
from pathlib import Path

from .modules import CONFIG_NAME, WEIGHTS_NAME

SHIPPED_DIR = Path(__file__).parent / "weights"  # data, not a package: beside this module
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def shipped_heads(kind: str, config) -> Path:
    """The shipped `kind` heads' directory when `config` (a transformers config) is the embedded
    model's; a ValueError saying how to get heads otherwise."""
    directory = SHIPPED_DIR / kind
    train = f"`treedec train-heads --kind {kind} --model PATH --out DIR`"
    if not (directory / CONFIG_NAME).exists() or not (directory / WEIGHTS_NAME).exists():
        raise ValueError(f"drafter={kind!r} needs heads=PATH (this install ships no {kind} heads); train them with "
                         f"{train}")
    meta = json.loads((directory / CONFIG_NAME).read_text())
    # the name is the directory the model was loaded from: the embedded model's cache copy, or a
    # checkout of the original SmolLM2-135M-Instruct (same architecture and vocabulary)
    name = str(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", ""))
    fits = (EMBEDDED_NAME in name and getattr(config, "hidden_size", None) == meta["hidden_size"]
            and getattr(config, "vocab_size", None) == meta["vocab_size"])
    if not fits:
        raise ValueError(f"drafter={kind!r} needs heads=PATH for this model: the shipped heads are for the embedded "
                         f"{EMBEDDED_NAME} only; train heads for yours with {train}")
    return directory
