"""The EAGLE-3 drafter that ships inside the package, for the embedded SmolLM2-135M-Instruct only.

It lives in `weights/eagle3/` (config.json + model.safetensors, bf16), trained by `treedec
train-drafter` (its command, data and timings are in config.json under "treedec"). Like the shipped
heads, it is matched to a model by the model's weights (the fingerprint `train-drafter` records),
not by the path the model was loaded from.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..heads.shipped import EMBEDDED_NAME, FINGERPRINT_KEY, fingerprint, same_weights
from .checkpoint import CONFIG_NAME, WEIGHTS_NAMES

SHIPPED_DIR = Path(__file__).parent / "weights" / "eagle3"


def shipped_drafter(model) -> Path:
    """The shipped drafter's directory when `model` is the embedded model; a ValueError saying how
    to get a drafter otherwise."""
    train = "`treedec train-drafter --kind eagle3 --model PATH --out DIR`"
    if not (SHIPPED_DIR / CONFIG_NAME).exists() or not (SHIPPED_DIR / WEIGHTS_NAMES[0]).exists():
        raise ValueError(f"drafter='eagle' needs drafter_path=DIR (this install ships no EAGLE drafter); train one "
                         f"with {train}, or use a published EAGLE-3 checkpoint")
    expected = json.loads((SHIPPED_DIR / CONFIG_NAME).read_text()).get("treedec", {}).get(FINGERPRINT_KEY)
    try:
        fits = expected is not None and same_weights(fingerprint(model), expected)
    except ValueError as error:
        raise ValueError(f"drafter='eagle' needs drafter_path=DIR for this model: {error}") from None
    if not fits:
        raise ValueError(f"drafter='eagle' needs drafter_path=DIR for this model: the shipped drafter is for the "
                         f"embedded {EMBEDDED_NAME} only; train one for yours with {train}, or use a published "
                         "EAGLE-3 checkpoint (SpecForge's format)")
    return SHIPPED_DIR
