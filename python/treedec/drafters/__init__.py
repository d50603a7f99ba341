"""Drafters: where candidate tokens come from. One module per drafter behind `base.Drafter`."""

from __future__ import annotations

import inspect

from ..options import bool_option, int_option
from .auto import AutoDrafter
from .base import Drafter, DraftTrie, StepOutcome
from .heads import HeadsDrafter
from .layerskip import LayerSkipDrafter
from .layerskip import OPTIONS as LAYERSKIP_OPTIONS
from .lookup import LookupDrafter
from .none import NoDrafter
from .recycling import RecyclingDrafter, RecyclingTable

DRAFTERS = ("auto", "lookup", "recycling", "layerskip", "medusa", "hydra", None)
HEADS_OPTIONS = ("heads", "widths", "context", "draft_vocab")
LOOKUP_OPTIONS = tuple(inspect.signature(LookupDrafter).parameters)
RECYCLING_OPTIONS = ("recycling_width", "template_nodes", "max_depth")


def drafter_options(name: str | None) -> tuple[str, ...]:
    """Option names a drafter accepts (passed to `treedec.patch(model, drafter=name, **options)`)."""
    return {
        None: (),
        "lookup": LOOKUP_OPTIONS,
        "recycling": RECYCLING_OPTIONS,
        "auto": LOOKUP_OPTIONS + RECYCLING_OPTIONS,
        "layerskip": LAYERSKIP_OPTIONS,
        "medusa": HEADS_OPTIONS,
        "hydra": HEADS_OPTIONS,
    }[name]


def check_drafter_name(name) -> None:
    if name not in DRAFTERS:
        raise ValueError(f"unknown drafter {name!r}; choose one of {', '.join(map(repr, DRAFTERS))}")


def make_drafter(name: str | None, options: dict, vocab_size: int, tables: dict,
                 num_layers: int | None = None) -> Drafter:
    """Build a drafter; `tables` is per-model storage so Token Recycling's table outlives the call.
    `num_layers` (the model's decoder layers, where known) checks layer-skipping's layer options."""
    check_drafter_name(name)
    if name is None:
        return NoDrafter()
    if name in ("medusa", "hydra"):
        context = bool_option("context", options.get("context", True))
        return HeadsDrafter(_heads_for(name, options.get("heads"), tables), options.get("widths"),
                            make_drafter("auto", {}, vocab_size, tables) if context else None,
                            draft_vocab=options.get("draft_vocab"))
    if name == "layerskip":  # its skip-set search result lives in the model's tables
        drafter = LayerSkipDrafter(tables, **{k: v for k, v in options.items() if k in LAYERSKIP_OPTIONS})
        if num_layers is not None:
            drafter.check_layers(num_layers)
        return drafter
    lookup_kwargs = {k: v for k, v in options.items() if k in LOOKUP_OPTIONS}
    if name in ("recycling", "auto"):
        width = int_option("recycling_width", options.get("recycling_width", 8))
        table = tables.get(("recycling", width))
        if table is None:
            table = tables[("recycling", width)] = RecyclingTable(vocab_size, width)
        recycling = RecyclingDrafter(table, int_option("template_nodes", options.get("template_nodes", 40)),
                                     int_option("max_depth", options.get("max_depth", 6)))
        if name == "recycling":
            return recycling
        return AutoDrafter(LookupDrafter(**lookup_kwargs), recycling)
    return LookupDrafter(**lookup_kwargs)


def _heads_for(kind: str, path, tables: dict):
    """Heads loaded from `path` once per model (kept in its tables)."""
    from ..heads import load

    if path is None:
        raise ValueError(
            f"drafter={kind!r} needs heads=PATH: a directory written by `treedec train-heads --kind {kind}`"
        )
    key = ("heads", str(path))
    if key not in tables:
        heads = load(path)
        if heads.config.kind != kind:
            raise ValueError(f"{path} holds {heads.config.kind} heads, not {kind}")
        tables[key] = heads
    return tables[key]


__all__ = [
    "DRAFTERS",
    "AutoDrafter",
    "DraftTrie",
    "Drafter",
    "HeadsDrafter",
    "LayerSkipDrafter",
    "LookupDrafter",
    "NoDrafter",
    "RecyclingDrafter",
    "RecyclingTable",
    "StepOutcome",
    "check_drafter_name",
    "drafter_options",
    "make_drafter",
]
