"""The decode loop: draft -> tree forward -> verify -> compact -> emit.

One `generate` call: prefill the prompt (all but its last token) into a TreeCache, then
repeat steps until every sequence has finished. A step asks the drafter for candidates per
sequence, keeps the ones worth their cost (sizing.choose), runs the tree through the model in
one forward with tree attention, verifies greedily, keeps the accepted rows of the cache, and
emits the accepted tokens plus the bonus token. Sequences finish independently (EOS,
max_new_tokens, stopping criteria) and leave the batch.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from . import compat, layers, ops, reference, sizing
from .attention import TreeStep
from .cache import GROWTH_ROWS, TreeCache
from .drafters.base import Drafter, DraftTrie, StepOutcome
from .reference.tree import pack_bits
from .sampling import Sampler, in_sampling_order, typical_verify
from .stopping import BatchStopping

CALIBRATION_SIZES = (1, 2, 4, 8, 16, 32, 64)
# A calibration times sizes up to this many nodes over the whole batch (and at least T = 2), and
# stops at the first that costs CALIBRATION_MAX_RATIO x a 1-node step: a batch of 32 on a CPU
# would otherwise spend seconds timing trees its sizer never keeps (see _calibrate).
CALIBRATION_MAX_WORK = 256
CALIBRATION_MAX_RATIO = 2.0
MAX_UNIFORMS_AHEAD = 32  # deeper than any drafter's tree


@dataclass
class DecodeRequest:
    """A validated generate call. input_ids int64 [B, L], left padded; attention_mask [B, L] or None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    max_new_tokens: int
    eos_token_ids: frozenset[int]
    pad_token_id: int
    stopping_criteria: list = field(default_factory=list)  # the caller's, called as HF calls them (stopping.py)
    # whether a row stopped by a criterion is padded from there (HF does when it stops at an EOS
    # id), or keeps generating until every row has stopped
    finished_rows_pad: bool = True
    streamer: object | None = None
    sampler: Sampler | None = None  # None: greedy


@dataclass
class DecodeStats:
    steps: int = 0
    new_tokens: int = 0
    sequences: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    tree_nodes: int = 0  # summed over steps (T per step)
    sequence_steps: int = 0  # steps summed over the sequences taking part in them
    draft_seconds: float = 0.0  # time a model drafter (layer skipping) spent drafting

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "new_tokens": self.new_tokens,
            "tau": self.new_tokens / max(self.sequence_steps, 1),
            "seconds": self.seconds,
            "prefill_seconds": self.prefill_seconds,
            "mean_tree_nodes": self.tree_nodes / max(self.steps, 1),
            "draft_seconds": self.draft_seconds,
        }


class ModelRunner:
    """The model's pieces the loop calls, resolved once per patched model."""

    def __init__(self, model: torch.nn.Module, cache_kwarg: str):
        self.model = model
        self.base = getattr(model, model.base_model_prefix)
        self.cache_kwarg = cache_kwarg
        config = model.config
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.vocab_size = config.vocab_size
        self.refresh()

    def refresh(self) -> None:
        """Read the LM head again (each generate call does): it may have been replaced, hooked or
        wrapped since `patch`. Only a plain bias-free nn.Linear that nothing hooks runs through the
        fused top-k kernel; any other head runs as the module it is (its hooks, bias, LoRA or own
        forward included), full logits, then top-k."""
        self.lm_head = self.model.get_output_embeddings()
        self.fused_lm_head = plain_linear(self.lm_head)

    @property
    def lm_head_weight(self) -> torch.Tensor | None:
        """The LM head's [V, H] weight where it has one (draft heads read it to draft)."""
        weight = getattr(self.lm_head, "weight", None)
        return weight if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None

    def layer_devices(self) -> list[torch.device]:
        """Each layer's cache lives where its attention weights live (device_map may split them)."""
        return [layer.self_attn.k_proj.weight.device for layer in self.base.layers]

    def new_cache(self, padding: torch.Tensor, max_len: int, initial_len: int | None = None) -> TreeCache:
        """An empty TreeCache for this model: one row per sequence, `padding` int64 [B] left-pad
        rows each (never read), `initial_len` rows (None: all) growing up to `max_len` as steps
        need them, each layer's buffers on its device."""
        dtype = next(self.base.parameters()).dtype
        cache = TreeCache(self.num_layers, padding.shape[0], self.num_kv_heads, self.head_dim, max_len=max_len,
                          dtype=dtype, devices=self.layer_devices(), initial_len=initial_len)
        cache.kv_start = padding.to(torch.int32)
        return cache

    def input_device(self) -> torch.device:
        return self.base.embed_tokens.weight.device

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: TreeCache, step: TreeStep,
                layers: torch.nn.ModuleList | None = None):
        """tokens int64 [B, T] (no -1), positions int64 [B, T] -> last hidden state [B, T, H].

        `layers` (a subset of the decoder layers, in order; see `layer_subset`) runs only those, as
        a layer-skipping drafter does: each keeps its own layer index, so it reads and writes its
        own cache layer, and the final norm still applies."""
        device = self.input_device()
        kwargs = {self.cache_kwarg: cache}
        with self.only_layers(layers):
            out = self.base(
                input_ids=tokens.to(device),
                position_ids=positions.to(device),
                # A prepared 4D mask is handed to attention untouched: transformers builds none of its own.
                attention_mask=step.tree_mask.unsqueeze(1).to(device),
                use_cache=True,
                treedec_step=step,
                **kwargs,
            )
        return out.last_hidden_state

    def supports_row_subsets(self) -> bool:
        """`forward_rows` runs the decoder layers itself: it needs the Llama-family layout."""
        return all(hasattr(self.base, name) for name in ("embed_tokens", "rotary_emb", "layers", "norm"))

    def forward_rows(self, tokens: torch.Tensor, positions: torch.Tensor, cache: TreeCache, step: TreeStep,
                     active: torch.Tensor, normed: bool = True) -> torch.Tensor:
        """Like `forward`, but layer l runs only on the batch rows where active[l] (bool [L, B]) is
        true: layer-skip batching, for rows with different skip sets or exit layers. Each such
        layer gathers its rows into a dense block (ops.gather_rows), runs on it, writes KV for those
        rows alone, and scatters the block back (ops.scatter_rows); the other rows keep their
        hidden state, as if the layer were skipped. Returns the normed last hidden state [B, T, H]
        (`normed=False`: the residual stream before the final norm)."""
        self._check_row_subsets()
        batch = tokens.shape[0]
        if tuple(active.shape) != (self.num_layers, batch):
            raise ValueError(f"active has shape {tuple(active.shape)}; expected ({self.num_layers}, {batch})")
        hidden = self.base.embed_tokens(tokens.to(self.input_device())).contiguous()
        hidden = self._run_layers(hidden, positions, cache, step, active)
        return self.base.norm(hidden) if normed else hidden

    def forward_from(self, residual: torch.Tensor, positions: torch.Tensor, cache: TreeCache, step: TreeStep,
                     start: int) -> torch.Tensor:
        """The decoder layers start..L-1 over `residual` [B, T, H] (the residual stream entering
        layer `start`), then the final norm: a step whose first `start` layers already ran (their
        KV is in the cache's step rows) runs only the rest. Returns the normed last hidden state."""
        self._check_row_subsets()
        if not 0 <= start < self.num_layers:
            raise ValueError(f"start = {start} must be a layer index 0..{self.num_layers - 1}")
        active = torch.zeros(self.num_layers, residual.shape[0], dtype=torch.bool)
        active[start:] = True
        hidden = self._run_layers(residual.to(self.input_device()).contiguous(), positions, cache, step, active)
        return self.base.norm(hidden)

    def _check_row_subsets(self) -> None:
        if not self.supports_row_subsets():
            raise ValueError(f"{type(self.base).__name__} lacks the Llama-family layout that running layer "
                             "subsets per row needs")

    def _run_layers(self, hidden: torch.Tensor, positions: torch.Tensor, cache: TreeCache, step: TreeStep,
                    active: torch.Tensor) -> torch.Tensor:
        """Layer l over the rows where active[l]; the residual stream after the last layer (no norm)."""
        base = self.base
        batch = hidden.shape[0]
        position_ids = positions.to(hidden.device)
        cos, sin = base.rotary_emb(hidden, position_ids=position_ids)
        mask = step.tree_mask.unsqueeze(1).to(hidden.device)
        for index, layer in enumerate(base.layers):
            rows = active[index].nonzero().flatten()
            if rows.numel() == 0:
                continue
            cache_kwarg = {compat.cache_kwarg_name(layer): cache}
            if rows.numel() == batch:
                hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=position_ids,
                               use_cache=True, treedec_step=step, **cache_kwarg)
                continue
            on_device = rows.to(hidden.device)
            with cache.writing_rows(rows):
                block = layer(ops.gather_rows(hidden, on_device), attention_mask=mask[on_device],
                              position_embeddings=(cos[on_device], sin[on_device]),
                              position_ids=position_ids[on_device], use_cache=True, treedec_step=step.subset(rows),
                              **cache_kwarg)
            hidden = hidden.contiguous()
            ops.scatter_rows(hidden, on_device, block.contiguous())
        return hidden

    @contextlib.contextmanager
    def only_layers(self, layers: torch.nn.ModuleList | None):
        """Within the block the base model runs `layers` (None: all of them)."""
        if layers is None:
            yield
            return
        full = self.base.layers
        self.base._modules["layers"] = layers
        try:
            yield
        finally:
            self.base._modules["layers"] = full

    def layer_subset(self, kept: tuple[int, ...]) -> torch.nn.ModuleList:
        """The decoder layers at indices `kept` (ascending), as `forward(layers=...)` takes them."""
        return torch.nn.ModuleList([self.base.layers[i] for i in kept])

    def topk(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        """hidden [B, T, H] -> the LM head's top-k ids int64 [B, T, k] on the CPU (k=1: greedy's argmax)."""
        return self.topk_values(hidden, k)[1].cpu()

    def topk_values(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, T, H] -> fp32 logits [B, T, k] (descending) and their ids int64 [B, T, k]."""
        batch, num_nodes, width = hidden.shape
        if not self.fused_lm_head:
            return reference.topk_of_logits(self.logits(hidden).float(), k)
        weight = self.lm_head.weight
        values, ids = ops.lm_head_topk(hidden.reshape(batch * num_nodes, width).to(weight.device), weight, k)
        return values.view(batch, num_nodes, k), ids.view(batch, num_nodes, k)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, H] -> full logits [B, T, V] in the model's dtype, from the LM head module
        (sampling needs them all)."""
        device = next(self.lm_head.parameters(), hidden).device
        return self.lm_head(hidden.to(device))


def plain_linear(module: torch.nn.Module) -> bool:
    """A bias-free nn.Linear (not a subclass) with resident weights that no hook, instance forward
    or parametrization changes: its logits are exactly `hidden @ weight.T`."""
    from torch.nn.modules import module as torch_module

    return (type(module) is torch.nn.Linear and module.bias is None and "forward" not in module.__dict__
            and not module._forward_hooks and not module._forward_pre_hooks
            and not torch_module._global_forward_hooks and not torch_module._global_forward_pre_hooks
            and module.weight.device.type != "meta")


def left_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Pad tokens before each left-padded prompt: int64 [B] on the CPU."""
    batch, length = input_ids.shape
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.int64)
    return length - attention_mask.cpu().long().sum(1)


def prompt_positions(length: int, padding: torch.Tensor) -> torch.Tensor:
    """Position ids of the first `length` columns of left-padded prompts (0 on padding): [B, length]."""
    return (torch.arange(length).view(1, -1) - padding.view(-1, 1)).clamp(min=0)


def chain_tree_mask(batch: int, num_nodes: int) -> torch.Tensor:
    """Packed ancestor mask of a chain (a causal block) without walking the tree: int32 [B, T, W]."""
    index = torch.arange(num_nodes)
    return pack_bits(index.view(1, -1) <= index.view(-1, 1)).expand(batch, -1, -1).contiguous()


def pack_tries(tries: list[DraftTrie], kept: list[list[int]], num_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept trie nodes -> parents int32 [B, T], tokens int64 [B, T]; short rows get padding nodes
    (token -1, parent 0) so every sequence has T nodes."""
    parents = torch.zeros(len(tries), num_nodes, dtype=torch.int32)
    tokens = torch.full((len(tries), num_nodes), -1, dtype=torch.int64)
    parents[:, 0] = -1
    for row, (trie, nodes) in enumerate(zip(tries, kept)):
        position = {node: i for i, node in enumerate(nodes)}
        parents[row, 1 : len(nodes)] = torch.tensor([position[trie.parents[n]] for n in nodes[1:]], dtype=torch.int32)
        tokens[row, : len(nodes)] = torch.tensor([trie.tokens[n] for n in nodes], dtype=torch.int64)
    return parents, tokens


class TreeDecoder:
    """Runs one generate call; the long-lived pieces (drafter, acceptance, cost) belong to the model state."""

    def __init__(
        self,
        runner: ModelRunner,
        drafter: Drafter,
        acceptance: sizing.AcceptanceModel,
        cost: sizing.CostCurve,
        max_nodes: int,
        cpu_linear: bool = True,
    ):
        self.runner, self.drafter = runner, drafter
        self.acceptance, self.cost, self.max_nodes = acceptance, cost, max_nodes
        self.cpu_linear = cpu_linear  # route few-row projections through ops.linear_rows (see layers)
        self.sampler: Sampler | None = None  # set per call from the request
        # [B, H] per active row: the last hidden state whose LM-head output was the row's root (the
        # prefill's last position, then each step's last accepted node); None before one exists.
        self.context_hidden: torch.Tensor | None = None
        self._verify_hidden: torch.Tensor | None = None

    # -- one call ----------------------------------------------------------------------------
    def generate(self, request: DecodeRequest) -> tuple[torch.Tensor, DecodeStats]:
        """The call's output, int64 [B, L + longest generation] on the CPU, and its figures."""
        linears = layers.routable_linears(self.runner.base.layers) if self.cpu_linear else []
        with layers.routed(linears), torch.inference_mode():
            generated, stats = self._decode(request)
        # built outside inference mode: HF returns an ordinary tensor, one users may write into
        # or use in autograd (log-probs of a generation)
        return self._assemble(request.input_ids.cpu(), generated, request.pad_token_id), stats

    def _decode(self, request: DecodeRequest) -> tuple[list[list[int]], DecodeStats]:
        started = time.perf_counter()
        self.sampler = request.sampler
        if self.sampler is not None:
            self.sampler.start(request.input_ids.shape[0], request.max_new_tokens)
        stats = DecodeStats(sequences=request.input_ids.shape[0])
        input_ids = request.input_ids.cpu()
        batch, length = input_ids.shape
        padding = left_padding(input_ids, request.attention_mask)
        prompts = [input_ids[b, int(padding[b]) :].tolist() for b in range(batch)]
        if request.streamer is not None:
            request.streamer.put(input_ids)

        cache = self._prefill(input_ids, padding, request.max_new_tokens)
        stats.prefill_seconds = time.perf_counter() - started

        generated: list[list[int]] = [[] for _ in range(batch)]
        roots = [prompt[-1] for prompt in prompts]
        active = list(range(batch))  # sequence ids of the cache's batch rows
        settled: set[int] = set()  # sequences whose tokens are final
        stopping = None
        if request.stopping_criteria:
            stopping = BatchStopping(request.stopping_criteria, request.input_ids, request.max_new_tokens,
                                     request.pad_token_id, request.finished_rows_pad)
        streamed = 0  # tokens already pushed to the streamer (batch size 1)
        self.drafter.start(prompts)
        with_drafts = self.max_nodes > 1 and self.drafter.name != "none"
        while active:
            if with_drafts and not self.cost.covers(len(active)):
                self._calibrate(cache, len(active))  # kept out of the step's time
            step_started = time.perf_counter()
            emitted = [len(generated[s]) for s in active]
            draft_seconds = 0.0
            if with_drafts and self.drafter.uses_model:
                self.drafter.draft_batch(self.runner, cache, active, [roots[s] for s in active],
                                         hidden=self.context_hidden)
                draft_seconds = time.perf_counter() - step_started
                stats.draft_seconds += draft_seconds
            if with_drafts:
                tries = [self._propose(s, roots[s], n) for s, n in zip(active, emitted)]
                num_nodes, kept, _ = sizing.choose(tries, self.acceptance, self.cost, self.max_nodes)
            else:
                tries = [DraftTrie(roots[s]) for s in active]
                num_nodes, kept = 1, [[0]] * len(active)
            parents, tokens = pack_tries(tries, kept, num_nodes)
            start = self.drafter.verify_start(kept, num_nodes) if with_drafts and self.drafter.uses_model else None
            verified = self._verify_step(cache, parents, tokens, active, emitted, start)
            accept_len, accept_nodes, bonus, topk, topk_probs = verified
            if self.drafter.uses_model:  # the state each row's next root (the bonus) came from
                last = accept_nodes[torch.arange(len(active)), accept_len.long()].long()
                device = self._verify_hidden.device
                self.context_hidden = self._verify_hidden[torch.arange(len(active), device=device), last.to(device)]

            self.drafter.observe(
                StepOutcome(tokens, parents, topk, accept_len, accept_nodes, list(active), topk_probs)
            )
            if with_drafts:
                self._learn_acceptance(tries, kept, accept_nodes)
            cache.compact(accept_nodes, accept_len)

            chunks = []
            for row, seq in enumerate(active):
                n = int(accept_len[row])
                path = accept_nodes[row, 1 : n + 1].long()
                chunk, done = self._limit(request, generated[seq], tokens[row, path].tolist() + [int(bonus[row])])
                generated[seq].extend(chunk)
                chunks.append(chunk)
                if done:
                    settled.add(seq)
            if stopping is not None:  # may cut and settle any sequence, finished ones included
                settled |= stopping.update(generated, settled)
            if request.streamer is not None and len(generated[0]) > streamed:  # batch size 1: final tokens
                request.streamer.put(torch.tensor(generated[0][streamed:]))
                streamed = len(generated[0])
            finished_rows = []
            for row, (seq, chunk) in enumerate(zip(active, chunks)):
                if seq in settled:
                    finished_rows.append(row)
                else:  # its chunk is whole: only settled sequences are ever cut
                    roots[seq] = chunk[-1]
                    self.drafter.extend(seq, chunk)
            stats.steps += 1
            stats.sequence_steps += len(active)
            stats.tree_nodes += num_nodes
            if with_drafts:
                # the cost curve prices tree sizes: a model drafter's own time is not the tree's
                self.cost.record(len(active), num_nodes, time.perf_counter() - step_started - draft_seconds)
                self.acceptance.next_step()
            if finished_rows:
                keep = [r for r in range(len(active)) if r not in finished_rows]
                active = [active[r] for r in keep]
                if active:
                    cache.select(torch.tensor(keep, dtype=torch.int64))
                    if self.context_hidden is not None:
                        self.context_hidden = self.context_hidden[torch.tensor(keep, device=self.context_hidden.device)]
        if request.streamer is not None:
            request.streamer.end()
        stats.new_tokens = sum(map(len, generated))
        stats.seconds = time.perf_counter() - started
        return generated, stats

    # -- pieces --------------------------------------------------------------------------------
    def _propose(self, seq: int, root: int, emitted: int) -> DraftTrie:
        """The drafter's candidates; a sampling call hands drafters that want them the uniforms
        of the positions ahead (the tree never changes the output, so drafts may depend on them)."""
        if self.sampler is None or not self.drafter.wants_uniforms:
            return self.drafter.propose(seq, root)
        return self.drafter.propose(seq, root, uniforms=self.sampler.ahead(seq, emitted, MAX_UNIFORMS_AHEAD))

    def _prefill(self, input_ids: torch.Tensor, padding: torch.Tensor, max_new_tokens: int) -> TreeCache:
        """Cache every prompt token but the last (the first step's root) as one causal chain."""
        batch, length = input_ids.shape
        runner = self.runner
        tree_rows = max(self.max_nodes, 1) + 1
        cache = runner.new_cache(padding, max_len=length + max_new_tokens + tree_rows,
                                 initial_len=length + min(max_new_tokens, GROWTH_ROWS) + tree_rows)
        if length > 1:
            prefill_len = length - 1
            step = TreeStep(cache.prefix_len.clone(), cache.kv_start.clone(), chain_tree_mask(batch, prefill_len))
            positions = prompt_positions(prefill_len, padding)
            cache.begin_step(prefill_len)
            hidden = runner.forward(input_ids[:, :prefill_len], positions, cache, step)
            cache.advance(prefill_len)
            self.context_hidden = hidden[:, -1]  # it predicted each prompt's last token, the first root
        return cache

    def _verify_step(self, cache: TreeCache, parents: torch.Tensor, tokens: torch.Tensor,
                     sequences: list[int] | None = None, emitted: list[int] | None = None, start=None):
        """One tree forward and verification (greedy, or by sampling when the call samples).
        `sequences` (the rows' sequence ids) and `emitted` (tokens each has generated) place every
        node at its output position, whose uniform a sampling step uses. `start` (layer, residual)
        from the drafter: the nodes' first layers already ran, the forward starts at `layer`.
        Returns accept_len, accept_nodes, bonus (on the CPU), and what the drafter observes: the
        top-k ids after each node and, when sampling, their probabilities (None when greedy)."""
        depth, tree_mask = ops.build_tree(parents)
        step = TreeStep(cache.prefix_len.clone(), cache.kv_start.clone(), tree_mask)
        positions = (cache.prefix_len - cache.kv_start).long().view(-1, 1) + depth.long()
        cache.begin_step(tokens.shape[1])
        if start is None:
            hidden = self.runner.forward(tokens.clamp(min=0), positions, cache, step)
        else:
            hidden = self.runner.forward_from(start[1], positions, cache, step, start[0])
        self._verify_hidden = hidden  # [B, T, H]: model drafters continue from the accepted path's end
        if self.sampler is None:
            topk = self.runner.topk(hidden, max(self.drafter.topk, 1))
            accept_len, accept_nodes, bonus = ops.verify_greedy(parents, tokens, topk[:, :, 0].contiguous())
            return accept_len, accept_nodes, bonus, topk, None
        batch = tokens.shape[0]
        sequences = list(range(batch)) if sequences is None else sequences
        emitted = [0] * batch if emitted is None else emitted
        uniforms = self.sampler.node_uniforms(sequences, emitted, depth)
        dists, (topk, topk_probs) = self._node_distributions(hidden)
        choice = ops.sample_tokens(dists.probs, uniforms.reshape(-1).to(dists.probs.device))
        target = dists.token_ids(choice).view(tokens.shape).cpu()
        if self.sampler.typical is None:
            accept_len, accept_nodes, bonus = ops.verify_greedy(parents, tokens, target)
        else:  # opt-in and lossy: drafts the model finds plausible enough are kept too
            accept_len, accept_nodes, bonus = typical_verify(parents, tokens, target, dists, self.sampler.typical)
        return accept_len, accept_nodes, bonus, topk, topk_probs

    def _node_distributions(self, hidden: torch.Tensor):
        """Each node's sampling distribution (NodeDistributions), and the drafter's view: the
        top-k ids int64 [B, T, k] and their sampling probabilities float32 [B, T, k], on the CPU.

        With HF's top_k set (its default is 50) they come from the fused LM-head top-k alone: the
        same distributions without [B, T, V] logits, warpers or softmax over the vocabulary. Else
        (no top_k, a tie at the k-th logit, a kernel limit) from the full logits."""
        batch, num_nodes, _ = hidden.shape
        draft_k = max(self.drafter.topk, 1)
        top_k = self.sampler.top_k
        wanted = max((top_k or 0) + 1, draft_k)
        fused = self.runner.fused_lm_head and top_k is not None and top_k + 1 <= self.runner.vocab_size
        if fused:
            weight = self.runner.lm_head.weight
            if ops.lm_head_backend(weight.device, weight.dtype) == "triton":
                fused = wanted <= 16  # the Triton kernel keeps at most 16 per row
        if fused:
            values, ids = self.runner.topk_values(hidden, wanted)
            ids = ids.reshape(batch * num_nodes, -1)
            subset = self.sampler.subset_probs(values.reshape(batch * num_nodes, -1)[:, : top_k + 1],
                                               ids[:, : top_k + 1])
            if subset is not None:
                probs, kept_ids = subset
                # Ids past the top_k (the drafter may want more) have probability 0.
                view_probs = torch.nn.functional.pad(probs, (0, max(draft_k - top_k, 0)))[:, :draft_k]
                view = (ids[:, :draft_k], view_probs)
                return in_sampling_order(probs, kept_ids), self._drafter_view(view, batch, num_nodes)
        logits = self.runner.logits(hidden)
        probs = self.sampler.probs(logits).reshape(batch * num_nodes, -1)
        # Ranked by logit: past top-p's nucleus every probability is 0, the logits still rank.
        view_ids = logits.reshape(batch * num_nodes, -1).topk(draft_k, dim=-1).indices
        view = (view_ids, probs.gather(1, view_ids))
        return in_sampling_order(probs), self._drafter_view(view, batch, num_nodes)

    @staticmethod
    def _drafter_view(view, batch: int, num_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, probs = view
        return ids.reshape(batch, num_nodes, -1).cpu(), probs.reshape(batch, num_nodes, -1).float().cpu()

    def _calibrate(self, cache: TreeCache, batch: int, repeats: int = 3) -> None:
        """Time a verify at a few tree sizes on the live cache, best of `repeats` each (nothing is
        committed: rows written after the prefix are overwritten by the next real step). Sizes
        grow until one costs CALIBRATION_MAX_RATIO x the 1-node step: larger trees rarely pay
        there, and extrapolation prices them until a real step measures one."""
        sizes = [s for s in CALIBRATION_SIZES
                 if s <= max(self.max_nodes, 1) and (s <= 2 or batch * s <= CALIBRATION_MAX_WORK)]
        for size in sizes:
            parents = torch.arange(-1, size - 1, dtype=torch.int32).expand(batch, -1).contiguous()
            tokens = torch.zeros(batch, size, dtype=torch.int64)
            best = float("inf")
            for _ in range(repeats):
                started = time.perf_counter()
                self._verify_step(cache, parents, tokens)
                best = min(best, time.perf_counter() - started)
            self.cost.record(batch, size, best)
            if size == 1:
                one_node = best
            elif best > CALIBRATION_MAX_RATIO * one_node:
                break

    def _learn_acceptance(self, tries: list[DraftTrie], kept: list[list[int]], accept_nodes: torch.Tensor) -> None:
        """Each kept node whose parent was accepted is one trial of its key."""
        for row, (trie, nodes) in enumerate(zip(tries, kept)):
            accepted_rows = {int(i) for i in accept_nodes[row].tolist() if i >= 0}
            for i, node in enumerate(nodes[1:], start=1):
                parent_row = nodes.index(trie.parents[node])
                if parent_row in accepted_rows:
                    self.acceptance.update(trie.keys[node], i in accepted_rows)

    @staticmethod
    def _limit(request: DecodeRequest, generated: list[int], chunk: list[int]) -> tuple[list[int], bool]:
        """Cut a chunk at max_new_tokens and at the first EOS (kept); whether the sequence is done.
        (The caller's stopping criteria run over the whole batch: stopping.BatchStopping.)"""
        room = request.max_new_tokens - len(generated)
        done = len(chunk) >= room
        chunk = chunk[:room]
        for i, token in enumerate(chunk):
            if token in request.eos_token_ids:
                return chunk[: i + 1], True
        return chunk, done

    @staticmethod
    def _assemble(input_ids: torch.Tensor, generated: list[list[int]], pad_token_id: int) -> torch.Tensor:
        """[B, L + longest generation], shorter generations padded with pad_token_id, as HF returns."""
        longest = max(len(g) for g in generated)
        out = torch.full((input_ids.shape[0], input_ids.shape[1] + longest), pad_token_id, dtype=torch.int64)
        out[:, : input_ids.shape[1]] = input_ids
        for b, tokens in enumerate(generated):
            out[b, input_ids.shape[1] : input_ids.shape[1] + len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
        return out
