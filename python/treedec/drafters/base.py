"""The Drafter protocol, the candidate trie every drafter fills, and how drafters are declared.

Each step the decode loop hands the drafter a `DraftRequest` (the model adapter, the cache, the
batch rows and their roots, and when sampling the uniforms ahead) and gets back one `DraftTrie`
per row: candidate nodes under the root, each labelled with a `key` naming what kind of guess it
is (e.g. ("lookup", 3, 1): the first token after a 3-gram match). The loop keeps each key's
measured acceptance rate and keeps only the nodes worth their cost (see `treedec.sizing`), so
drafters may over-propose. After verification the drafter sees the `StepOutcome`: what was
verified and accepted, the tokens each row emitted, and the model's hidden states there. Whatever
a drafter remembers between steps (histories, tables, hidden states) it keeps itself.

The protocol is `start`, `propose`, `observe` (and `report` for figures); `topk` says how many of
the model's best tokens after each node the outcome carries. A drafter is declared once, with its
options, by a `DrafterSpec` (drafters/__init__.py holds the registry).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
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

    def merge(self, other: DraftTrie) -> None:
        """Add `other`'s nodes (same root) under this trie's; a token already here keeps its key."""
        merged = [0]  # other's node -> this trie's node
        for i in range(1, len(other)):
            merged.append(self.child(merged[other.parents[i]], other.tokens[i], other.keys[i]))


@dataclass
class DraftRequest:
    """One step's question to the drafter.

    adapter: the model (adapters.ModelAdapter), the only way a drafter may run it; cache: the
    KV rows (cache.TreeCache): a drafter may write after the committed prefix inside
    `cache.scratch()`, which the verification then writes over; rows: the loop's sequence ids of
    the batch rows (finished sequences leave the batch); roots: each row's root token, the last one
    emitted; uniforms: when the call samples, each row's uniforms of the positions ahead
    (uniforms[b][d] picks the sampled token at depth d + 1; a tree never changes a sample, so
    drafts may follow them, see sampling.in_sampling_order), None when greedy; max_nodes: the
    largest tree the loop may verify this step (its max_tree_nodes, and what the cost curve has
    explored for this batch size), None where unknown: a drafter need not propose many more
    candidates than that.
    """

    adapter: object
    cache: object
    rows: list[int]
    roots: list[int]
    uniforms: list[list[float]] | None = None
    max_nodes: int | None = None


@dataclass
class Proposal:
    """One DraftTrie per row, and optionally a head start for the verification:
    `verify_start(kept, num_nodes)` (kept: each row's trie nodes as the sizer packed them, root
    first) returns None to verify in full, or (layer, residual [B, T, H]) when the drafts already
    ran layers 0..layer-1 for exactly those nodes and wrote their KV into the step's rows, so the
    tree step starts at `layer` (layer skipping's exit mode)."""

    tries: list[DraftTrie]
    verify_start: Callable[[list[list[int]], int], tuple[int, torch.Tensor] | None] | None = None


@dataclass
class StepOutcome:
    """What one verification step decided, as the drafter sees it.

    tokens int64 [B, T] (the verified tree, -1 padding), parents int32 [B, T],
    topk int64 [B, T, k] (the model's top-k ids after each node, k = drafter.topk),
    accept_len int32 [B], accept_nodes int32 [B, T], `rows`: the loop's sequence ids of the
    batch rows, and when the call samples, topk_probs float32 [B, T, k]: the sampling
    probabilities of the topk ids (None when greedy). emitted[b]: the tokens row b emitted this
    step (the accepted drafts and the bonus, cut at EOS and the length limit); hidden [B, T, H]:
    the model's last hidden state after each node (node accept_nodes[b, accept_len[b]]'s is the
    one whose LM-head output is row b's next root).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    topk: torch.Tensor
    accept_len: torch.Tensor
    accept_nodes: torch.Tensor
    rows: list[int]
    topk_probs: torch.Tensor | None = None
    emitted: list[list[int]] = field(default_factory=list)
    hidden: torch.Tensor | None = None
    # [B, T, F]: the residual streams after the drafter's `feature_layers` at each node,
    # concatenated in that order (None when it names none)
    features: torch.Tensor | None = None

    def last_accepted(self) -> torch.Tensor:
        """int64 [B]: each row's deepest accepted node (its hidden state made the next root)."""
        return self.accept_nodes[torch.arange(self.accept_nodes.shape[0]), self.accept_len.long()].long()


class Drafter:
    """Base class: propose candidates for the batch, observe what was accepted."""

    name = "base"
    topk = 1  # how many of the model's best tokens after each verified node StepOutcome carries
    # decoder layers whose outputs the drafter reads (StepOutcome.features, `prefilled`): EAGLE-3's
    # low, middle and high layers; none by default, and then nothing is captured
    feature_layers: tuple[int, ...] = ()

    def start(self, prompts: list[list[int]], hidden: torch.Tensor | None = None) -> None:
        """A generate call begins: prompts[s] is sequence s's prompt (no padding); hidden [B, H] (or
        None for one-token prompts) the model's last hidden state over each prompt, whose LM-head
        output is the first root."""

    def prefilled(self, hidden: torch.Tensor, features: torch.Tensor | None) -> None:
        """After `start`, the prefill's states at every prompt position but the last (left padded
        as the call's input_ids, one column fewer): hidden [B, L - 1, H] the normed last hidden
        state, features [B, L - 1, F] as StepOutcome.features (None without feature_layers).
        Called only for prompts of two or more tokens."""

    def propose(self, request: DraftRequest) -> Proposal | list[DraftTrie]:
        """Candidates below each row's root (any size; the loop prunes): one trie per row."""
        return [DraftTrie(root) for root in request.roots]

    def observe(self, outcome: StepOutcome) -> None:
        """The verified trees, what was accepted and what each row emitted."""

    def report(self) -> dict:
        """Figures about the last call for `model.treedec.last_stats` (e.g. a search's cost)."""
        return {}


def merged_with_context(context: Drafter, request: DraftRequest, own: list[DraftTrie]) -> list[DraftTrie]:
    """The context drafter's tries for `request` with `own` (one per row) merged in: a token the
    context proposed keeps its key (the heads and eagle drafters' `context=True`)."""
    proposal = context.propose(request)
    tries = proposal.tries if isinstance(proposal, Proposal) else proposal
    for trie, mine in zip(tries, own):
        trie.merge(mine)
    return tries


class RowDrafter(Drafter):
    """A drafter that drafts for each sequence on its own, from the text it has seen: it keeps
    each sequence's history (prompt and emitted tokens) and proposes row by row."""

    def start(self, prompts, hidden=None) -> None:
        self.histories = [list(prompt) for prompt in prompts]

    def propose(self, request: DraftRequest) -> list[DraftTrie]:
        uniforms = request.uniforms or [None] * len(request.rows)
        return [self.propose_row(seq, root, ahead) for seq, root, ahead in zip(request.rows, request.roots, uniforms)]

    def propose_row(self, seq: int, root_token: int, uniforms: list[float] | None = None) -> DraftTrie:
        """Candidates below sequence `seq`'s root; `uniforms` as in DraftRequest (None: greedy)."""
        return DraftTrie(root_token)

    def observe(self, outcome: StepOutcome) -> None:
        for seq, tokens in zip(outcome.rows, outcome.emitted):
            self.extend(seq, tokens)

    def extend(self, seq: int, new_tokens: Sequence[int]) -> None:
        """Sequence `seq` emitted `new_tokens`."""
        self.histories[seq].extend(int(t) for t in new_tokens)


@dataclass(frozen=True)
class DrafterEnv:
    """What building a drafter may use: the model's vocabulary size and decoder layer count
    (None where unknown, before a model exists), and `tables`, storage kept per model across
    calls and patches (Token Recycling's table, loaded heads, layer skipping's search)."""

    vocab_size: int
    tables: dict
    num_layers: int | None = None


@dataclass(frozen=True)
class DrafterSpec:
    """A drafter declared once: the name `patch(drafter=...)` takes, the options it accepts, and
    how to build it from them (a ValueError for a bad value)."""

    name: str | None
    options: tuple[str, ...]
    build: Callable[[dict, DrafterEnv], Drafter]
