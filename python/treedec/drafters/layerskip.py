"""drafter="layerskip": the model drafts for itself with some of its layers skipped.

Modes (option `mode`):
- "swift" (default): SWIFT. The layers to skip are searched for on the model's own recent tokens
  (`layer_search`), within `search_seconds`, once per model; later calls reuse the result.
- "exit": LayerSkip-style early exit: the draft runs layers [0, exit_layer), then the final norm
  and the LM head (meant for checkpoints trained for early exit). The verification then reuses
  the draft's work (option `reuse_kv`, default True): where the step's tree is the drafted chain,
  the chain nodes' KV of layers [0, exit_layer) is already in the cache rows the tree step
  writes, and their residual streams at exit_layer are kept, so the tree step runs only layers
  exit_layer.. (`ModelAdapter.forward_from`). One more draft forward per step gives the chain's
  last token its first layers too. A step whose tree is not that chain (a branch was kept, the
  model lacks the Llama-family layout) verifies in full.
- "fixed": the user's `skip_layers`.

Each step drafts a chain for every active sequence at once, one token per skipped-model forward.
A sequence stops drafting when its draft's top-1 probability (softmax over the 16 best logits)
falls below `stop_below` (Kangaroo's second early exit); where it is unsure (top-1 below
`branch_below`) the next `branch_k - 1` candidates join the tree as siblings. The verification
step runs the full model over the whole tree, so the output is the model's own.

KV: a draft forward writes keys and values only for the layers it runs, into the rows after the
committed prefix, the rows the tree step writes next. The verification step rewrites those rows
for every layer and compaction keeps the accepted ones, so the cache ends each step exactly as
plain decoding would leave it (tests/test_layerskip.py checks this).
"""

from __future__ import annotations

import torch

from ..attention import TreeStep
from ..options import bool_option, int_option, is_int, number_option
from .base import Drafter, DrafterEnv, DrafterSpec, DraftRequest, DraftTrie, Proposal
from .layer_search import SkipPlan, search

MODES = ("swift", "exit", "fixed")
OPTIONS = (
    "mode", "skip_layers", "exit_layer", "draft_depth", "stop_below", "branch_below", "branch_k",
    "search_seconds", "search_tokens", "reuse_kv",
)
MIN_SEARCH_TOKENS = 16  # below this a window says too little about a skip set
CONFIDENCE_K = 16


def _is_index_list(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(map(is_int, value))


class LayerSkipDrafter(Drafter):
    name = "layerskip"

    def __init__(
        self,
        tables: dict,
        mode: str = "swift",
        skip_layers=None,
        exit_layer: int | None = None,
        draft_depth: int = 4,
        stop_below: float = 0.3,
        branch_below: float = 0.6,
        branch_k: int = 2,
        search_seconds: float = 5.0,
        search_tokens: int = 32,
        reuse_kv: bool = True,
    ):
        if mode not in MODES:
            raise ValueError(f"mode = {mode!r} must be one of {', '.join(map(repr, MODES))}")
        if (skip_layers is not None) != (mode == "fixed"):
            raise ValueError("skip_layers is required by mode='fixed' and applies to it only")
        if exit_layer is not None and mode != "exit":
            raise ValueError("exit_layer applies to mode='exit' only")
        bool_option("reuse_kv", reuse_kv)
        self.per_sequence = None  # fixed mode with one skip set per sequence: [sorted set, ...]
        if skip_layers is not None:
            if _is_index_list(skip_layers):
                skip_layers = sorted({int(i) for i in skip_layers})
            elif isinstance(skip_layers, (list, tuple)) and skip_layers and all(map(_is_index_list, skip_layers)):
                self.per_sequence = [sorted({int(i) for i in s}) for s in skip_layers]
                skip_layers = sorted({i for s in self.per_sequence for i in s})
            else:
                raise ValueError(f"skip_layers = {skip_layers!r} must be a non-empty list of layer indices, or one "
                                 "such list per sequence")
        if exit_layer is not None:
            exit_layer = int_option("exit_layer", exit_layer)
        self.tables, self.mode = tables, mode
        self.skip_layers, self.exit_layer = skip_layers, exit_layer
        self.draft_depth = int_option("draft_depth", draft_depth)
        self.stop_below = number_option("stop_below", stop_below, 0.0, 1.0)
        self.branch_below = number_option("branch_below", branch_below, 0.0, 1.0)
        self.branch_k = int_option("branch_k", branch_k)
        self.search_seconds = number_option("search_seconds", search_seconds, 0.0)
        self.search_tokens = max(int_option("search_tokens", search_tokens), MIN_SEARCH_TOKENS)
        self.histories: list[list[int]] = []
        self.plan: SkipPlan | None = None
        self.searched_this_call = 0.0
        self.drafted = self.accepted = 0  # candidates drafted, tokens accepted (this call)
        self._layers = None  # the kept layers as a ModuleList, built once per plan
        self.reuse_kv = reuse_kv and mode == "exit"
        # exit mode with reuse, this step: residual streams at the exit layer, one [B, H] per chain
        # depth (depth 0 = the root), and how many chain nodes of each batch row were forwarded
        self.residuals: list[torch.Tensor] = []
        self.forwarded: list[int] = []
        self.chains: list[list[int]] = []  # each row's chain as trie nodes by depth (root first)
        self.reused_steps = 0

    # -- the Drafter protocol ----------------------------------------------------------------
    def start(self, prompts, hidden=None):
        self.histories = [list(p) for p in prompts]
        self.searched_this_call = 0.0
        self.drafted = self.accepted = 0
        self.reused_steps = 0

    def observe(self, outcome) -> None:
        self.accepted += int(outcome.accept_len.sum())
        for seq, tokens in zip(outcome.rows, outcome.emitted):
            self.histories[seq].extend(tokens)

    def report(self) -> dict:
        plan = self.plan
        found = {
            "drafted": self.drafted,  # generic keys every model drafter reports (bench e2e reads them)
            "draft_acceptance": self.accepted / self.drafted if self.drafted else None,
            "layerskip_mode": self.mode,
            "layerskip_drafted": self.drafted,
            "layerskip_acceptance": self.accepted / self.drafted if self.drafted else None,
            "layerskip_search_seconds": self.searched_this_call,
            "layerskip_reused_steps": self.reused_steps,  # verify steps that ran only layers >= exit
        }
        if plan is not None:
            found["layerskip_kept_layers"] = None if plan.kept is None else list(plan.kept)
            found["layerskip_search_agreement"] = plan.agreement
            found["layerskip_expected_gain"] = plan.expected_gain
        return found

    # -- drafting ------------------------------------------------------------------------------
    def propose(self, request: DraftRequest) -> Proposal:
        adapter, cache, rows = request.adapter, request.cache, request.rows
        tries = [DraftTrie(root) for root in request.roots]
        self.residuals, self.forwarded = [], []
        plan = self._plan_for(adapter, rows)
        if plan is None or plan.kept is None:
            return Proposal(tries)
        if self.per_sequence is not None:
            self._check_per_sequence(adapter)
        elif self._layers is None:
            self._layers = adapter.layer_subset(plan.kept)
        self._draft_chains(adapter, cache, rows, request.roots, dict(zip(rows, tries)))
        return Proposal(tries, self.verify_start if self.reuse_kv else None)

    def _kept_mask(self, adapter, rows: list[int], drafting: list[bool], dense: bool = False) -> torch.Tensor | None:
        """bool [L, B]: which layer runs for which batch row this draft forward (None: the plan's
        layers for every row, the plain forward's fast path, unless `dense`). Rows that stopped
        drafting run nothing, and with per-sequence skip sets each row runs its own layers."""
        if not dense and self.per_sequence is None and all(drafting):
            return None
        active = torch.zeros(adapter.num_layers, len(rows), dtype=torch.bool)
        shared = self.plan.skipped(adapter.num_layers)
        for b, seq in enumerate(rows):
            if drafting[b]:
                active[:, b] = True
                active[self.per_sequence[seq] if self.per_sequence is not None else shared, b] = False
        return active

    @torch.inference_mode()
    def _draft_chains(self, adapter, cache, rows, roots, tries) -> None:
        batch = len(rows)
        tokens = torch.tensor(roots, dtype=torch.int64).view(batch, 1)
        positions = (cache.prefix_len - cache.kv_start).long().view(batch, 1)
        node = [0] * batch
        drafting = [True] * batch
        batched = adapter.supports_row_subsets()
        reuse = self.reuse_kv and batched
        if reuse:
            self.forwarded = [0] * batch
            self.chains = [[0] for _ in range(batch)]  # each row's chain, as trie nodes by depth
        with cache.scratch():  # the tree step writes these rows again, for every layer
            for depth in range(1, self.draft_depth + 1):
                if not cache.fits(1):
                    reuse = False  # the chain's last token cannot be forwarded: verify in full
                    break
                hidden = self._draft_forward(adapter, cache, rows, tokens, positions, drafting, batched, reuse)
                # Confidence from the fused LM-head top-k: softmax over the CONFIDENCE_K best logits,
                # an upper bound on the full top-1 probability (the full softmax would cost another
                # pass over the vocabulary per draft token).
                values, ids = adapter.topk_values(hidden, max(CONFIDENCE_K, self.branch_k))
                top_p = torch.softmax(values[:, 0].float(), dim=-1).cpu()
                top_ids = ids[:, 0].cpu()
                for b, seq in enumerate(rows):
                    if not drafting[b]:
                        continue
                    if float(top_p[b, 0]) < self.stop_below:
                        drafting[b] = False
                        continue
                    trie = tries[seq]
                    ranks = self.branch_k if float(top_p[b, 0]) < self.branch_below else 1
                    for rank in range(1, ranks):
                        trie.child(node[b], int(top_ids[b, rank]), ("layerskip", depth, rank))
                    node[b] = trie.child(node[b], int(top_ids[b, 0]), ("layerskip", depth, 0))
                    if reuse:
                        self.chains[b].append(node[b])
                    self.drafted += ranks
                if not any(drafting):
                    break
                tokens = top_ids[:, :1].clone()
                positions = positions + 1
            else:  # the depth ran out with rows still drafting: their last token gets its first layers too
                if reuse and cache.fits(1):
                    self._draft_forward(adapter, cache, rows, tokens, positions, drafting, batched, reuse)

    def _draft_forward(self, adapter, cache, rows, tokens, positions, drafting, batched, reuse) -> torch.Tensor:
        """One draft token per row through the plan's layers, its KV written at the row after the
        rows drafted so far; the normed hidden state [B, 1, H]. With `reuse`, the residual stream
        at the exit layer is kept for the verification, and each drafting row's count of forwarded
        chain nodes grows by one."""
        one_node = torch.ones(len(rows), 1, 1, dtype=torch.int32)  # a node sees itself
        step = TreeStep(cache.prefix_len.clone(), cache.kv_start.clone(), one_node)
        cache.begin_step(1)
        active = self._kept_mask(adapter, rows, drafting, dense=reuse) if batched else None
        if reuse:  # exit mode: layers 0..E-1 for the drafting rows, stopped before the final norm
            residual = adapter.forward_rows(tokens, positions, cache, step, active, normed=False)
            self.residuals.append(residual[:, 0])
            for b, on in enumerate(drafting):
                self.forwarded[b] += int(on)
            hidden = adapter.norm(residual)
        elif active is None:
            hidden = adapter.forward(tokens, positions, cache, step, layers=self._layers)
        else:  # layer-skip batching: each layer on the rows that run it
            hidden = adapter.forward_rows(tokens, positions, cache, step, active)
        cache.advance(1)  # the next draft token attends to this one
        return hidden

    def verify_start(self, kept: list[list[int]], num_nodes: int):
        """(exit mode, reuse_kv) When every row's kept tree is a prefix of its drafted chain whose
        nodes all ran layers 0..E-1 in this step's drafts: (E, residual streams [B, T, H] entering
        layer E, zeros at padding nodes), so the tree step runs layers E.. only. Else None."""
        if not self.reuse_kv or not self.residuals:
            return None
        for b, nodes in enumerate(kept):
            if len(nodes) > self.forwarded[b] or nodes != self.chains[b][: len(nodes)]:
                return None
        drafted = torch.stack(self.residuals, dim=1)  # [B, forwards, H]
        residual = drafted.new_zeros(drafted.shape[0], num_nodes, drafted.shape[2])
        for b, nodes in enumerate(kept):
            residual[b, : len(nodes)] = drafted[b, : len(nodes)]
        self.reused_steps += 1
        return len(self.plan.kept), residual

    def _check_per_sequence(self, adapter) -> None:
        if not adapter.supports_row_subsets():
            raise ValueError("one skip set per sequence needs layer-skip batching, which this model's layout lacks")
        if len(self.per_sequence) != len(self.histories):
            raise ValueError(
                f"skip_layers has {len(self.per_sequence)} skip sets for a batch of {len(self.histories)} sequences"
            )

    def check_layers(self, num_layers: int) -> None:
        """A ValueError unless the layer options fit a model of `num_layers` decoder layers
        (`treedec.patch` calls it with the model's, so a bad index fails there, not in generate)."""
        if self.mode == "fixed":
            for skipped in self.per_sequence or [self.skip_layers]:
                bad = [i for i in skipped if not 0 <= i < num_layers]
                if bad or len(skipped) >= num_layers:
                    raise ValueError(
                        f"skip_layers = {skipped} must name some, not all, of the model's layers 0..{num_layers - 1}"
                    )
        if self.mode == "exit" and self.exit_layer is not None and self.exit_layer >= num_layers:
            raise ValueError(f"exit_layer = {self.exit_layer} must be below the model's {num_layers} layers")

    def _plan_for(self, adapter, rows: list[int]) -> SkipPlan | None:
        """The layers to run, from the mode: fixed and exit at once; swift from the per-model
        search, run once a sequence has enough tokens to score on."""
        if self.plan is not None:
            return self.plan
        num_layers = adapter.num_layers
        key = ("layerskip", self.mode, tuple(self.skip_layers or ()), self.exit_layer, self.draft_depth)
        cached = self.tables.get(key)
        if cached is not None:
            self.plan = cached
            return cached
        self.check_layers(num_layers)
        if self.mode == "fixed":
            plan = SkipPlan(tuple(i for i in range(num_layers) if i not in self.skip_layers))
        elif self.mode == "exit":
            plan = SkipPlan(tuple(range(self.exit_layer if self.exit_layer is not None else max(1, num_layers // 2))))
        else:
            history = max((self.histories[seq] for seq in rows), key=len)
            if len(history) < MIN_SEARCH_TOKENS:
                return None  # no draft until a sequence has something to score on
            window = torch.tensor(history[-self.search_tokens :], dtype=torch.int64)
            plan = search(adapter, window, self.draft_depth, self.search_seconds)
            self.searched_this_call += plan.seconds
        self.tables[key] = self.plan = plan
        return plan


def build(options: dict, env: DrafterEnv) -> LayerSkipDrafter:
    """The skip-set search's result lives in the model's tables; layer indices are checked against
    the model where its layer count is known."""
    drafter = LayerSkipDrafter(env.tables, **options)
    if env.num_layers is not None:
        drafter.check_layers(env.num_layers)
    return drafter


SPEC = DrafterSpec("layerskip", OPTIONS, build)
