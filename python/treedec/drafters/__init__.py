"""Drafters: where candidate tokens come from. One module per drafter behind `base.Drafter`; each
declares itself once, name and options, with a `DrafterSpec`, and this registry lists them."""

from __future__ import annotations

from . import auto, eagle, heads, layerskip, lookup, none, recycling
from .auto import AutoDrafter
from .eagle import EagleDrafter
from .base import (Drafter, DrafterEnv, DrafterSpec, DraftRequest, DraftTrie, Proposal, RowDrafter,
                   StepOutcome)
from .heads import HeadsDrafter
from .layerskip import LayerSkipDrafter
from .lookup import LookupDrafter
from .none import NoDrafter
from .recycling import RecyclingDrafter, RecyclingTable

REGISTRY: dict[str | None, DrafterSpec] = {
    spec.name: spec for spec in (auto.SPEC, lookup.SPEC, recycling.SPEC, layerskip.SPEC, heads.MEDUSA, heads.HYDRA,
                                 eagle.SPEC, none.SPEC)
}
DRAFTERS = tuple(REGISTRY)


def check_drafter_name(name) -> None:
    if name not in REGISTRY:
        raise ValueError(f"unknown drafter {name!r}; choose one of {', '.join(map(repr, DRAFTERS))}")


def drafter_options(name: str | None) -> tuple[str, ...]:
    """Option names a drafter accepts (passed to `treedec.patch(model, drafter=name, **options)`)."""
    check_drafter_name(name)
    return REGISTRY[name].options


def make_drafter(name: str | None, options: dict, vocab_size: int, tables: dict,
                 num_layers: int | None = None) -> Drafter:
    """Build a drafter from its options (others, such as the loop's, are left out); `tables` is
    per-model storage so what a drafter learns outlives the call; `num_layers` (the model's
    decoder layers, where known) checks layer options."""
    check_drafter_name(name)
    spec = REGISTRY[name]
    own = {k: v for k, v in options.items() if k in spec.options}
    return spec.build(own, DrafterEnv(vocab_size, tables, num_layers))


__all__ = [
    "DRAFTERS",
    "REGISTRY",
    "AutoDrafter",
    "DraftRequest",
    "DraftTrie",
    "Drafter",
    "DrafterEnv",
    "DrafterSpec",
    "EagleDrafter",
    "HeadsDrafter",
    "LayerSkipDrafter",
    "LookupDrafter",
    "NoDrafter",
    "Proposal",
    "RecyclingDrafter",
    "RecyclingTable",
    "RowDrafter",
    "StepOutcome",
    "check_drafter_name",
    "drafter_options",
    "make_drafter",
]
