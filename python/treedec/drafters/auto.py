"""drafter="auto": lookup matches first, Token Recycling fills the rest of the tree."""

from __future__ import annotations

from .base import Drafter, DraftTrie, StepOutcome
from .lookup import LookupDrafter
from .recycling import RecyclingDrafter


class AutoDrafter(Drafter):
    name = "auto"
    wants_uniforms = True

    def __init__(self, lookup: LookupDrafter, recycling: RecyclingDrafter):
        self.lookup, self.recycling = lookup, recycling
        self.topk = recycling.topk

    def start(self, histories):
        self.lookup.start(histories)
        self.recycling.start(histories)

    def extend(self, seq, new_tokens):
        self.lookup.extend(seq, new_tokens)

    def propose(self, seq: int, root_token: int, uniforms: list[float] | None = None) -> DraftTrie:
        trie = self.lookup.propose(seq, root_token)
        self.recycling.label_coupling(trie, uniforms)
        self.recycling.expand(trie, uniforms)  # existing lookup nodes keep their keys; new branches are recycling's
        return trie

    def observe(self, outcome: StepOutcome) -> None:
        self.recycling.observe(outcome)
