"""EAGLE draft models (EAGLE-3 and EAGLE-1/2): the model (model.py), the published checkpoint
formats (checkpoint.py) and the one shipped for the embedded model (shipped.py). The drafter that
runs them is drafters/eagle.py; `treedec train-drafter` (tools/eagle_training.py) trains them."""

from .checkpoint import load, save, vocabulary_maps
from .model import KINDS, EagleConfig, EagleDraft, default_aux_layers

__all__ = ["KINDS", "EagleConfig", "EagleDraft", "default_aux_layers", "load", "save", "vocabulary_maps"]
