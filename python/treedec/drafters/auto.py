"""drafter="auto": lookup matches first, Token Recycling fills the rest of the tree."""

from __future__ import annotations

from . import lookup, recycling
from .base import DrafterEnv, DrafterSpec, DraftTrie, RowDrafter, StepOutcome
from .lookup import LookupDrafter
from .recycling import RecyclingDrafter

OPTIONS = lookup.OPTIONS + recycling.OPTIONS


class AutoDrafter(RowDrafter):
    name = "auto"

    def __init__(self, lookup: LookupDrafter, recycling: RecyclingDrafter):
        self.lookup, self.recycling = lookup, recycling
        self.topk = recycling.topk

    def start(self, prompts, hidden=None):
        self.lookup.start(prompts)
        self.recycling.start(prompts)

    def propose(self, request):
        self.recycling.bound(request.max_nodes)
        return super().propose(request)

    def propose_row(self, seq: int, root_token: int, uniforms: list[float] | None = None) -> DraftTrie:
        trie = self.lookup.propose_row(seq, root_token)
        self.recycling.label_coupling(trie, uniforms)
        self.recycling.expand(trie, uniforms)  # existing lookup nodes keep their keys; new branches are recycling's
        return trie

    def observe(self, outcome: StepOutcome) -> None:
        self.lookup.observe(outcome)
        self.recycling.observe(outcome)


def build(options: dict, env: DrafterEnv) -> AutoDrafter:
    return AutoDrafter(lookup.SPEC.build({k: v for k, v in options.items() if k in lookup.OPTIONS}, env),
                       recycling.SPEC.build({k: v for k, v in options.items() if k in recycling.OPTIONS}, env))


SPEC = DrafterSpec("auto", OPTIONS, build)
