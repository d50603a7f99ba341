"""The Drafter protocol and the candidate trie every drafter fills.

Each step the decode loop asks the drafter for a `DraftTrie` per sequence: candidate nodes under
the root, each labelled with a `key` naming what kind of guess it is (e.g. ("lookup", 3, 1):
the first token after a 3-gram match). The loop keeps each key's measured acceptance rate and
keeps only the nodes worth their cost (see `treedec.sizing`), so drafters may over-propose.
After verification the drafter sees the outcome through `observe`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class DraftTrie:
    """Candidate nodes below a root in topological order; node 0 is the root (token = last emitted)."""

    root_token: int
    parents: list[int] = field(default_factory=lambda: [-1])
    tokens: list[int] = field(default_factory=list)
    keys: list[Hashable] = field(default_factory=lambda: [None])
    _children: list[dict[int, int]] = field(default_factory=lambda: [{}])

    def __post_init__(self):
        if not self.tokens:
            self.tokens = [self.root_token]

    def __len__(self) -> int:
        return len(self.parents)

    def child(self, node: int, token: int, key: Hashable) -> int:
        """Index of `node`'s child with `token`, added with `key` if new (an existing node keeps its key)."""
        found = self._children[node].get(token)
        if found is not None:
            return found
        index = len(self.parents)
        self.parents.append(node)
        self.tokens.append(token)
        self.keys.append(key)
        self._children.append({})
        self._children[node][token] = index
        return index

    def add_path(self, tokens: Sequence[int], keys: Sequence[Hashable], start: int = 0) -> None:
        node = start
        for token, key in zip(tokens, keys):
            node = self.child(node, int(token), key)


@dataclass
class StepOutcome:
    """What one verification step decided, as the drafter sees it.

    tokens int64 [B, T] (the verified tree, -1 padding), parents int32 [B, T],
    topk int64 [B, T, k] (the model's top-k ids after each node, k = drafter.topk),
    accept_len int32 [B], accept_nodes int32 [B, T], `rows`: the loop's sequence ids of the
    batch rows (finished sequences leave the batch, so row b is sequence rows[b]), and when the
    call samples, topk_probs float32 [B, T, k]: the sampling probabilities of the topk ids (None
    when greedy).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    topk: torch.Tensor
    accept_len: torch.Tensor
    accept_nodes: torch.Tensor
    rows: list[int]
    topk_probs: torch.Tensor | None = None


class Drafter:
    """Base class: propose candidates per sequence, observe what was accepted."""

    name = "base"
    topk = 1  # top-k ids the drafter wants to see after each verified node
    # True: when a call samples, `propose` also gets `uniforms`, the random numbers that will pick
    # the tokens at depths 1, 2, ... below the root (see treedec.sampling.in_sampling_order).
    wants_uniforms = False
    # True: the drafter runs the model itself (layer skipping). Each step the loop first calls
    # `draft_batch` for all active sequences, then `propose` per sequence as usual.
    uses_model = False

    def start(self, histories: list[list[int]]) -> None:
        """A generate call begins; histories[s] is sequence s's prompt (no padding)."""

    def extend(self, seq: int, new_tokens: Sequence[int]) -> None:
        """Sequence `seq` emitted `new_tokens` (its history grew by them)."""

    def propose(self, seq: int, root_token: int) -> DraftTrie:
        """Candidates below the root for sequence `seq` (any size; the loop prunes).
        Drafters with `wants_uniforms` take a keyword `uniforms: list[float] | None` too:
        uniforms[d] picks the sampled token at depth d + 1 (it may be shorter than the tree)."""
        return DraftTrie(root_token)

    def observe(self, outcome: StepOutcome) -> None:
        """The verified tree and the model's top-k after each of its nodes."""

    def draft_batch(self, adapter, cache, rows: list[int], roots: list[int], hidden=None) -> None:
        """(`uses_model` drafters) Draft for the sequences `rows` (the cache's batch rows, in
        order) whose roots are `roots`, with `adapter` (adapters.ModelAdapter) over `cache`
        (cache.TreeCache). `hidden` [B, H] (or None) is the model's last hidden state whose LM-head
        output was each root, what draft heads read. Whatever it writes past the committed rows,
        it must leave `cache.prefix_len` as it found it: the verification step overwrites them."""

    def verify_start(self, kept: list[list[int]], num_nodes: int):
        """(`uses_model` drafters) Called after the tree is chosen (`kept`: each row's trie nodes,
        root first, as packed into `num_nodes`): None to verify in full, or (layer, residual [B, T,
        H]) when the drafts already ran layers 0..layer-1 for exactly these nodes and wrote their
        KV into the step's rows, so the tree step starts there (layerskip's exit mode)."""
        return None

    def report(self) -> dict:
        """Figures about the last call for `model.treedec.last_stats` (e.g. a search's cost)."""
        return {}
