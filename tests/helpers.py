"""Shared test helpers: random trees and an oracle drafter."""

from __future__ import annotations

import random

import torch

from treedec.drafters.base import DraftTrie, RowDrafter


def random_parents(num_nodes: int, rng: random.Random) -> list[int]:
    return [-1] + [rng.randrange(i) for i in range(1, num_nodes)]


def chain(num_nodes: int) -> list[int]:
    return list(range(-1, num_nodes - 1))


def star(num_nodes: int) -> list[int]:
    return [-1] + [0] * (num_nodes - 1)


def batch_parents(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int32)


def make_parents(batch: int, num_nodes: int, shape: str, generator: torch.Generator) -> torch.Tensor:
    """int32 [B, T]: chain (i-1), star (0) or random (uniform in [0, i)); each row its own tree."""
    index = torch.arange(num_nodes)
    if shape == "chain":
        parents = (index - 1).expand(batch, -1).clone()
    elif shape == "star":
        parents = torch.zeros(batch, num_nodes, dtype=torch.int64)
    else:
        upper = index.clamp(min=1).expand(batch, -1).to(torch.float64)
        parents = (torch.rand(batch, num_nodes, generator=generator, dtype=torch.float64) * upper).long()
    parents[:, 0] = -1
    return parents.to(torch.int32).contiguous()


class OracleDrafter(RowDrafter):
    """Proposes the known continuation of each sequence as a chain, plus a wrong sibling at every
    depth: every step accepts a long chunk, so EOS and length limits land inside accepted paths."""

    name = "oracle"

    def __init__(self, continuations: list[list[int]], depth: int = 8, vocab_size: int = 96):
        self.continuations, self.depth, self.vocab_size = continuations, depth, vocab_size
        self.emitted: list[int] = []

    def start(self, prompts, hidden=None):
        self.emitted = [0] * len(prompts)

    def extend(self, seq, new_tokens):
        self.emitted[seq] += len(new_tokens)

    def propose_row(self, seq: int, root_token: int, uniforms=None) -> DraftTrie:
        trie = DraftTrie(root_token)
        future = self.continuations[seq][self.emitted[seq] :][: self.depth]  # the root's child comes next
        node = 0
        for depth, token in enumerate(future, start=1):
            wrong = (token + 1) % self.vocab_size
            trie.child(node, wrong, ("oracle-wrong", depth))
            node = trie.child(node, token, ("oracle", depth))
        return trie


def spy_proposals(monkeypatch, drafter_class) -> list:
    """Records every (sequence id, trie) `drafter_class.propose` returns, in order: the whole
    batch's tries of each step, row by row."""
    from treedec.drafters.base import Proposal

    found = []
    original = drafter_class.propose

    def spy(self, request):
        proposal = original(self, request)
        found.extend(zip(request.rows, proposal.tries if isinstance(proposal, Proposal) else proposal))
        return proposal

    monkeypatch.setattr(drafter_class, "propose", spy)
    return found


class Tries:
    """The tries of `spy_proposals`'s records, as a list (in proposal order)."""

    def __init__(self, found: list):
        self.found = found

    def __getitem__(self, index):
        return self.found[index][1]

    def __iter__(self):
        return (trie for _, trie in self.found)

    def __len__(self):
        return len(self.found)


def on_prefill_done(monkeypatch, callback) -> None:
    """Calls `callback()` when a decode call's prefill has emitted its first token: the loop makes
    the steps' profile (profiling.new_profile) right then, so a spy can split the prefill's host
    reads from the first step's."""
    from treedec import profiling

    new_profile = profiling.new_profile

    def marked(*args):
        callback()
        return new_profile(*args)

    monkeypatch.setattr(profiling, "new_profile", marked)
