"""drafter="medusa" / "hydra": trained draft heads on the model's last hidden state (treedec.heads).

Each step the heads read the hidden state whose LM-head output was the root (the previous step's
last accepted node, or the prefill's last position) and guess the tokens after the root:
- medusa: head k's top `widths[k]` tokens at depth k+1, under every kept node of depth k (the
  heads do not see the path, so every branch of a depth gets the same guesses);
- hydra: depth by depth over the frontier, head k reading each node's own state and token, so
  each branch gets its own guesses (one batched call per depth over all frontier nodes).
With measured per-rank accuracies in the heads' config (what `treedec train-heads` saves) and no
`widths` given, both draft the static tree with the largest expected accepted length instead of
a full `widths` product (heads/tree.py).
Node keys are (kind, depth, rank, confidence): the loop learns each one's acceptance and keeps
the nodes worth their cost, as with every drafter. `confidence` is the bin of the head's own
probability for the guess (softmax over its top-k logits, CONFIDENCE_EDGES), so the same tree
position is kept on a step where the head is sure and pruned where it is not: the static tree
becomes a per-step one without any extra model call (EAGLE-2's observation that a draft's
confidence predicts its acceptance).

With a `context` drafter (option `context`, default True: drafter="auto", lookup matches and Token
Recycling), each step's tree is the context drafter's with the heads' nodes merged in: the heads
guess where the text has no match, the context where the heads are unsure, and the sizer keeps
whichever nodes earn their cost.

The heads guess among the most frequent tokens of their training text, and each guess reads only
those rows of the LM head instead of all V (heads/vocab.py). Option `draft_vocab=N` keeps N
tokens. By default, heads that carry token frequencies keep the tokens holding DRAFT_MASS of the
model's probability, and heads without them keep the whole vocabulary. Heads trained over a draft
vocabulary (`draft_vocab` in their config) keep at most those tokens, by default and for N alike.
"""

from __future__ import annotations

import torch

from .. import ops
from ..heads import DraftHeads
from ..heads.tree import best_tree
from ..heads.vocab import DRAFT_MASS, check_frequencies, default_size, draft_vocabulary
from ..options import bool_option, is_int
from . import auto  # the context drafter
from .base import Drafter, DrafterEnv, DrafterSpec, DraftRequest, DraftTrie, merged_with_context

DEFAULT_WIDTHS = (4, 2, 2, 1, 1, 1, 1, 1)
STATIC_TREE_NODES = 48  # the loop's sizer then keeps the T worth their measured cost
# Hydra pays a head call per depth over every frontier node, so it drafts only the first
# HYDRA_SLACK x (the nodes the sizer recently kept) + 2 of the static tree (a prefix of the best
# tree is the best smaller tree), at least HYDRA_MIN_NODES
HYDRA_SLACK, HYDRA_MIN_NODES = 2.0, 4
# An fp32 model's heads draft in bf16: the LM-head pass that dominates drafting reads half the
# bytes (drafting fell from 0.10x/0.27x of the rest of decoding to 0.07x/0.18x on the CPU, README),
# and a draft is only a guess the fp32 verify checks, so the output does not change. It costs a
# bf16 copy of the LM head (V x H x 2 bytes).
DRAFT_DTYPES = {torch.float32: torch.bfloat16}
# Bins of a guess's probability among its head's top-k (renormalised over those k: an upper bound
# of its probability, and the kernel streams no normaliser). 7 bins x depth x rank keys.
CONFIDENCE_EDGES = torch.tensor([0.1, 0.2, 0.35, 0.5, 0.7, 0.85])


def confidence_bins(values: torch.Tensor) -> torch.Tensor:
    """Top-k logits [..., k] on the CPU -> each guess's confidence bin, int64 [..., k] (0 = least
    sure). The drafter copies the k logits back beside the ids and bins them there: on a GPU that is
    one small copy per step, not a copy of the edges plus two more kernel launches."""
    probs = torch.softmax(values.float(), dim=-1)
    return torch.bucketize(probs, CONFIDENCE_EDGES, right=True)


class HeadsDrafter(Drafter):
    def __init__(self, heads: DraftHeads, widths: tuple[int, ...] | None = None, context: Drafter | None = None,
                 draft_vocab: int | None = None):
        given_widths = widths
        self.context = context
        if context is not None:  # the context drafter's needs become this drafter's
            self.topk = context.topk
        self.heads = heads
        self.kind = heads.config.kind
        self.name = self.kind
        widths = tuple(widths) if isinstance(widths, (list, tuple)) else widths
        if widths is None:
            widths = DEFAULT_WIDTHS[: heads.config.num_heads]
        if (not isinstance(widths, tuple) or not widths or len(widths) > heads.config.num_heads
                or not all(is_int(w) and w >= 1 for w in widths)):
            raise ValueError(f"widths = {widths!r} must be 1 to {heads.config.num_heads} ints >= 1 (one per head)")
        self.widths = tuple(int(w) for w in widths)
        # Heads with measured per-rank accuracies and no widths given: the static tree with the
        # largest expected accepted length (heads/tree.py); rank paths, parents first. Medusa's
        # guesses are the same under every node of a depth, Hydra's follow each node's path.
        accuracies = heads.meta.get("rank_accuracy")
        self.paths = None
        if accuracies and given_widths is None:
            self.paths = best_tree(accuracies, STATIC_TREE_NODES)
            self.widths = (max(path[-1] for path in self.paths) + 1,) * max(len(path) for path in self.paths)
        # the ids the heads may guess (None: all); the LM-head rows are picked on the model's device
        self.vocab_ids = self._draft_vocabulary(draft_vocab)
        self.drafted = self.accepted = 0
        self.kept = float(STATIC_TREE_NODES)  # moving average of the verified nodes per sequence
        # [sequences, H]: each sequence's last hidden state whose LM-head output was its root (the
        # prompt's last position, then each step's deepest accepted node); None before one exists
        self.root_hidden: torch.Tensor | None = None
        self.sequences = 0
        self._checked = False

    def _draft_vocabulary(self, draft_vocab: int | None) -> torch.Tensor | None:
        """The ids of the draft vocabulary (heads/vocab.py), None for the whole vocabulary."""
        frequencies, vocab_size, widest = self.heads.token_frequencies, self.heads.config.vocab_size, max(self.widths)
        check_frequencies(frequencies, vocab_size, "token_frequencies")
        # heads trained over a draft vocabulary (train-heads since 2026-11-28) never learned to rank
        # the tokens outside it: their logits there are untrained, so no larger set may be drafted
        trained = self.heads.meta.get("draft_vocab")
        given = draft_vocab is not None
        if draft_vocab is None:
            if frequencies is None:
                return None
            draft_vocab = max(min(default_size(frequencies, DRAFT_MASS), trained or vocab_size), widest)
        if not is_int(draft_vocab) or draft_vocab < widest:
            raise ValueError(f"draft_vocab = {draft_vocab!r} must be an int of at least {widest}, the most guesses the "
                             "heads take at one depth (or None: the default)")
        if trained is not None and draft_vocab > trained:
            asked = f"draft_vocab = {draft_vocab}" if given else f"widths of up to {widest} guesses a depth"
            raise ValueError(f"{asked}: these heads were trained over their {trained} most frequent tokens and cannot "
                             f"rank the rest; use at most {trained} (or train them with a larger "
                             "`train-heads --draft-vocab`)")
        draft_vocab = int(draft_vocab)
        if draft_vocab >= vocab_size:
            return None
        if frequencies is None:
            raise ValueError(f"draft_vocab = {draft_vocab} needs heads saved with their token frequencies "
                             "(heads/vocab.py; `treedec train-heads` writes them); these heads have none")
        return draft_vocabulary(frequencies, draft_vocab)

    def start(self, prompts, hidden=None) -> None:
        self.drafted = self.accepted = 0  # candidate nodes verified, tokens accepted (this call)
        self.sequences = len(prompts)
        self.root_hidden = hidden
        if self.context is not None:
            self.context.start(prompts, hidden)

    def propose(self, request: DraftRequest) -> list[DraftTrie]:
        drafted = [DraftTrie(root) for root in request.roots]
        if self.root_hidden is not None:  # none yet after a one-token prompt: nothing to read
            rows = torch.tensor(request.rows, device=self.root_hidden.device)
            self._draft(request.adapter, self.root_hidden[rows], request.rows, dict(zip(request.rows, drafted)))
        return drafted if self.context is None else merged_with_context(self.context, request, drafted)

    def observe(self, outcome) -> None:
        # drafted = the candidates the sizer kept and the model verified (the proposals it pruned
        # cost nothing), so the acceptance reported is the verified nodes' rate
        verified = (outcome.tokens[:, 1:] >= 0).sum(1)
        self.drafted += int(verified.sum())
        self.accepted += int(outcome.accept_len.sum())
        self.kept = 0.8 * self.kept + 0.2 * float(verified.float().mean())
        if outcome.hidden is not None:  # the state each row's next root (the bonus) came from
            device = outcome.hidden.device
            fresh = outcome.hidden[torch.arange(len(outcome.rows), device=device), outcome.last_accepted().to(device)]
            if self.root_hidden is None:
                self.root_hidden = fresh.new_zeros(self.sequences, fresh.shape[-1])
            self.root_hidden[torch.tensor(outcome.rows, device=device)] = fresh
        if self.context is not None:
            self.context.observe(outcome)

    def report(self) -> dict:
        return {"drafted": self.drafted, "draft_acceptance": self.accepted / self.drafted if self.drafted else None,
                "draft_vocab": self.heads.config.vocab_size if self.vocab_ids is None else len(self.vocab_ids)}

    @torch.inference_mode()
    def _draft(self, adapter, hidden: torch.Tensor, rows: list[int], tries: dict[int, DraftTrie]) -> None:
        """The heads' guesses from hidden [B, H] (the rows' root states) into tries[seq]."""
        self._check(adapter, hidden)
        hidden = hidden.to(self._dtype)
        if self.kind == "medusa":  # every head at once, no [B, K, V] logits
            weights, biases = self._stacked
            width = max(self.widths)
            if self.heads.lm_heads is None:
                values, ids, _ = ops.draft_heads_topk(hidden, weights, biases, self._lm_weights[0], width)
            else:  # each head through its own LM head: one call per head
                per_head = [ops.draft_heads_topk(hidden, weights[k : k + 1], biases[k : k + 1], self._lm_weights[k],
                                                 width)
                            for k in range(weights.shape[0])]
                values = torch.cat([out[0] for out in per_head], dim=1)
                ids = torch.cat([out[1] for out in per_head], dim=1)
            ids, bins = self._vocab_ids(ids).cpu(), confidence_bins(values.cpu())
            for b, seq in enumerate(rows):
                if self.paths is not None:
                    node_of = {(): 0}
                    for path in self.paths:
                        depth, rank = len(path) - 1, path[-1]
                        key = (self.kind, depth + 1, rank, int(bins[b, depth, rank]))
                        node_of[path] = tries[seq].child(node_of[path[:-1]], int(ids[b, depth, rank]), key)
                    continue
                level = [0]
                for depth, width in enumerate(self.widths):
                    level = [tries[seq].child(parent, int(ids[b, depth, rank]),
                                              (self.kind, depth + 1, rank, int(bins[b, depth, rank])))
                             for parent in level for rank in range(width)]
        else:
            self._hydra(adapter, hidden, rows, [tries[seq].root_token for seq in rows], tries)

    def _hydra(self, adapter, hidden, rows, roots, tries) -> None:
        device = hidden.device
        # which ranks to expand under a node, by its rank path: the static tree's, or every rank
        # below the depth's width
        if self.paths is not None:
            nodes = max(HYDRA_MIN_NODES, int(HYDRA_SLACK * self.kept) + 2)
            children: dict[tuple[int, ...], list[int]] = {}
            for path in self.paths[:nodes]:
                children.setdefault(path[:-1], []).append(path[-1])
        # frontier: (batch row, trie node, token at that node, rank path); states [F, H] in order
        frontier = [(b, 0, root, ()) for b, root in enumerate(roots)]
        states = hidden
        for depth, width in enumerate(self.widths):  # one call per depth over the whole frontier
            if self.paths is not None:
                keep = [f for f, node in enumerate(frontier) if node[3] in children]
                if not keep:
                    break
                frontier = [frontier[f] for f in keep]
                states = states[torch.tensor(keep, device=device)]
            tokens = torch.tensor([node[2] for node in frontier], device=device)
            joined = self.heads.inputs[depth](torch.cat([states, adapter.embed(tokens).to(states.dtype)], dim=-1))
            weights, biases = self._stacked[depth]
            values, ids, states = ops.draft_heads_topk(joined, weights, biases, self._lm_weights[depth], width)
            ids, bins, states = self._vocab_ids(ids[:, 0]).cpu(), confidence_bins(values[:, 0].cpu()), states[:, 0]
            next_frontier, parents = [], []
            for f, (b, node, _, path) in enumerate(frontier):
                for rank in (children[path] if self.paths is not None else range(width)):
                    token = int(ids[f, rank])
                    key = (self.kind, depth + 1, rank, int(bins[f, rank]))
                    child = tries[rows[b]].child(node, token, key)
                    next_frontier.append((b, child, token, path + (rank,)))
                    parents.append(f)
            frontier = next_frontier
            states = states[torch.tensor(parents, device=device)]

    def _vocab_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary positions -> token ids."""
        return ids if self._rows is None else self._rows[ids]

    def _check(self, adapter, hidden) -> None:
        if self._checked:
            return
        config = self.heads.config
        if config.hidden_size != hidden.shape[-1] or config.vocab_size != adapter.vocab_size:
            raise ValueError(
                f"these {config.kind} heads were trained for hidden size {config.hidden_size} and vocabulary "
                f"{config.vocab_size}; the model has {hidden.shape[-1]} and {adapter.vocab_size}"
            )
        on_cpu_or_cuda = hidden.device.type in ("cpu", "cuda")  # where the bf16 kernels are
        self._dtype = DRAFT_DTYPES.get(hidden.dtype, hidden.dtype) if on_cpu_or_cuda else hidden.dtype
        self.heads.to(device=hidden.device, dtype=self._dtype)
        # [V', H] per head: the model's LM head (shared) or the head's own, restricted to the draft
        # vocabulary; a copy only where the dtype or the rows differ
        self._rows = rows = None if self.vocab_ids is None else self.vocab_ids.to(hidden.device)
        base = adapter.lm_head_weight.detach()
        weights = [self.heads.lm_weight(k, base).detach() for k in range(config.num_heads)]
        weights = [weight if rows is None else weight[rows] for weight in weights]
        if self.heads.lm_heads is None:  # one shared copy, in the drafting dtype
            weights = [weights[0].to(self._dtype)] * config.num_heads
        self._lm_weights = weights
        if self.kind == "medusa":
            self._stacked = self.heads.stacked()
        else:
            self._stacked = [self.heads.stacked(depth) for depth in range(len(self.widths))]
        self._checked = True


OPTIONS = ("heads", "widths", "context", "draft_vocab")


def _builder(kind: str):
    def build(options: dict, env: DrafterEnv) -> HeadsDrafter:
        context = bool_option("context", options.get("context", True))
        return HeadsDrafter(_heads_for(kind, options.get("heads"), env.tables), options.get("widths"),
                            auto.SPEC.build({}, env) if context else None, draft_vocab=options.get("draft_vocab"))

    return build


def _heads_for(kind: str, path, tables: dict) -> DraftHeads:
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


MEDUSA = DrafterSpec("medusa", OPTIONS, _builder("medusa"))
HYDRA = DrafterSpec("hydra", OPTIONS, _builder("hydra"))
