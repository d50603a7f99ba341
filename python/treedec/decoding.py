"""The decode loop: draft -> tree forward -> verify -> compact -> emit.

One `generate` call: prefill the prompt into a TreeCache and take each sequence's first token
from the prefill's last position (the prompt's last token is the first tree's root, verified as
a one-node tree, as HF takes its first token from its prefill), then repeat steps until every
sequence has finished. A step asks the drafter for candidates per
sequence, keeps the ones worth their cost (sizing.choose), runs the tree through the model in
one forward with tree attention, verifies greedily, keeps the accepted rows of the cache, and
emits the accepted tokens plus the bonus token. Sequences finish independently (EOS,
max_new_tokens, stopping criteria) and leave the batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import host, layers, ops, profiling, sizing
from .attention import TreeStep
from .adapters import ModelAdapter
from .cache import GROWTH_ROWS, TreeCache
from .drafters.base import Drafter, DraftRequest, DraftTrie, Proposal, StepOutcome
from .reference.tree import chain_tree_mask  # noqa: F401 (also imported from here: skipdecode, tests)
from .sampling import Sampler, in_sampling_order, typical_verify
from .stopping import BatchStopping

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
    steps: int = 0  # the loop's tree forwards (the prefill, which emits each sequence's first token, is not one)
    new_tokens: int = 0
    sequences: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    tree_nodes: int = 0  # summed over steps (T per step)
    # steps summed over the sequences taking part in them, the prefill's one each included: tau,
    # new_tokens / sequence_steps, is tokens per forward, 1.0 without drafts
    sequence_steps: int = 0
    draft_seconds: float = 0.0  # time the drafter spent proposing (running the model, for some)
    plain_steps: int = 0  # steps that did not draft because drafted steps were losing (sizing.DraftGate)
    profile: dict | None = None  # per-phase seconds (profiling.StepProfile.as_dict) when profiling

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "new_tokens": self.new_tokens,
            "tau": self.new_tokens / max(self.sequence_steps, 1),
            "seconds": self.seconds,
            "prefill_seconds": self.prefill_seconds,
            "mean_tree_nodes": self.tree_nodes / max(self.steps, 1),
            "draft_seconds": self.draft_seconds,
            "plain_steps": self.plain_steps,
            **({"profile": self.profile} if self.profile is not None else {}),
        }


@dataclass
class CallState:
    """What one generate call has emitted so far, per sequence id, and what ends it."""

    generated: list[list[int]]
    roots: list[int]  # each sequence's next root: its last emitted token (at first, its prompt's last)
    settled: set[int] = field(default_factory=set)  # sequences whose tokens are final
    stopping: BatchStopping | None = None  # the caller's stopping criteria over the batch
    streamed: int = 0  # tokens already pushed to the streamer (batch size 1)


def left_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Pad tokens before each left-padded prompt: int64 [B] on the CPU."""
    batch, length = input_ids.shape
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.int64)
    return length - attention_mask.cpu().long().sum(1)


def prompt_positions(length: int, padding: torch.Tensor) -> torch.Tensor:
    """Position ids of the first `length` columns of left-padded prompts (0 on padding): [B, length]."""
    return (torch.arange(length).view(1, -1) - padding.view(-1, 1)).clamp(min=0)


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
        adapter: ModelAdapter,
        drafter: Drafter,
        acceptance: sizing.AcceptanceModel,
        cost: sizing.CostCurve,
        max_nodes: int,
        cpu_linear: bool = True,
        profile: bool = False,
        routing: layers.LinearRouting | None = None,
        gate: sizing.DraftGate | None = None,
    ):
        self.adapter, self.drafter = adapter, drafter
        self.acceptance, self.cost, self.max_nodes = acceptance, cost, max_nodes
        # whether each step drafts at all: off for a while where drafted steps lose to plain ones
        self.gate = gate if gate is not None else sizing.DraftGate()
        self.cpu_linear = cpu_linear  # route few-row projections through ops.linear_rows (see layers)
        # where routed: which of the kernel and torch's linear runs each row count, measured
        self.routing = routing if routing is not None else layers.LinearRouting()
        self._routing_trials = False  # whether this call's projections are routed, so worth timing
        self.sampler: Sampler | None = None  # set per call from the request
        self.profiling = profile  # opt-in per-phase timing of each step (profiling.py)
        self.profile: profiling.NoProfile | profiling.StepProfile = profiling.NoProfile()

    # -- one call ----------------------------------------------------------------------------
    def generate(self, request: DecodeRequest) -> tuple[torch.Tensor, DecodeStats]:
        """The call's output, int64 [B, L + longest generation] on the CPU, and its figures."""
        linears = layers.routable_linears(self.adapter.decoder_layers) if self.cpu_linear else []
        self._routing_trials = bool(linears)
        with layers.routed(linears, self.routing), torch.inference_mode():
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
        self.profile = profiling.NoProfile()  # the profile is the steps': the prefill is not one
        input_ids = request.input_ids.cpu()
        batch, length = input_ids.shape
        padding = left_padding(input_ids, request.attention_mask)
        prompts = [input_ids[b, int(padding[b]) :].tolist() for b in range(batch)]
        if request.streamer is not None:
            request.streamer.put(input_ids)

        cache, (prompt_states, prompt_features, root_hidden, root_features) = self._prefill(
            input_ids, padding, request.max_new_tokens)
        # the state whose LM-head output is each prompt's first root (None for one-token prompts)
        prompt_hidden = None if prompt_states is None else prompt_states[:, -1].contiguous()

        call = CallState([[] for _ in range(batch)], [prompt[-1] for prompt in prompts])
        if request.stopping_criteria:
            call.stopping = BatchStopping(request.stopping_criteria, request.input_ids, request.max_new_tokens,
                                          request.pad_token_id, request.finished_rows_pad)
        self.drafter.start(prompts, prompt_hidden)
        if prompt_states is not None:
            self.drafter.prefilled(prompt_states, prompt_features)
        del prompt_states, prompt_features  # [B, L - 1, H]: a drafter that wants them keeps its own reference

        # The first step's root (each prompt's last token) went through the model with the rest of
        # the prompt: its one-node tree is verified from the prefill's last column, as HF takes its
        # first token from its prefill. A first step of its own would cost one more forward a call.
        active = list(range(batch))  # sequence ids of the cache's batch rows
        parents = torch.full((batch, 1), -1, dtype=torch.int32)
        tokens = input_ids[:, -1:].clone()
        verified = self._verified(root_hidden, root_features, parents, tokens, active, [0] * batch,
                                  torch.zeros(batch, 1, dtype=torch.int32))
        del root_hidden, root_features
        _, finished_rows = self._emit(request, call, active, parents, tokens, verified)
        stats.sequence_steps += batch  # the prefill emitted each sequence's first token
        active = self._without(cache, active, finished_rows)
        stats.prefill_seconds = time.perf_counter() - started

        self.profile = profile = profiling.new_profile(self.profiling, self.adapter.lm_head_device)
        while active:
            step_started = time.perf_counter()
            emitted = [len(call.generated[s]) for s in active]
            # trees up to what the cost curve has measured, or twice that
            max_nodes = min(self.max_nodes, self.cost.explored_nodes(len(active)))
            with profile.phase("drafting"):
                drafts = self.max_nodes > 1 and self.gate.opens(len(active))
                if drafts:
                    proposal = self._propose(cache, active, [call.roots[s] for s in active], emitted, max_nodes)
                else:
                    stats.plain_steps += self.max_nodes > 1
                    proposal = Proposal([DraftTrie(call.roots[s]) for s in active])
            stats.draft_seconds += time.perf_counter() - step_started
            tries, verify_start = proposal.tries, proposal.verify_start
            with_drafts = any(len(trie) > 1 for trie in tries)
            with profile.phase("tree_build"):
                if with_drafts:
                    num_nodes, kept, _ = sizing.choose(tries, self.acceptance, self.cost, max_nodes)
                else:
                    num_nodes, kept = 1, [[0]] * len(active)
                verify_started = time.perf_counter()  # the cost curve prices the tree, not the choosing
                parents, tokens = pack_tries(tries, kept, num_nodes)
            start = verify_start(kept, num_nodes) if verify_start is not None else None
            verified = self._verify_step(cache, parents, tokens, active, emitted, start)
            accept_len, accept_nodes = verified[0], verified[1]
            if with_drafts:
                with profile.phase("learning"):
                    self._learn_acceptance(tries, kept, accept_nodes)
            with profile.phase("compaction"):
                cache.compact(accept_nodes, accept_len)
            chunks, finished_rows = self._emit(request, call, active, parents, tokens, verified)
            stats.steps += 1
            stats.sequence_steps += len(active)
            stats.tree_nodes += num_nodes
            # every step prices its tree size (one-node steps too: the curve's first point, before
            # any draft is priced); drafting's own time is not the tree's
            verify_seconds = self.adapter.agreed_seconds(time.perf_counter() - verify_started)
            self.cost.record(len(active), num_nodes, verify_seconds)
            if with_drafts:  # the whole step, drafting included, against a plain step of this batch
                plain = self.cost.cost(len(active), 1) if self.cost.seconds else None
                self.gate.record(len(active), self.adapter.agreed_seconds(time.perf_counter() - step_started),
                                 sum(map(len, chunks)), plain)
            self.acceptance.next_step()
            if finished_rows:
                with profile.phase("compaction"):
                    active = self._without(cache, active, finished_rows)
            profile.step_done(time.perf_counter() - step_started)
        if request.streamer is not None:
            request.streamer.end()
        stats.new_tokens = sum(map(len, call.generated))
        stats.seconds = time.perf_counter() - started
        stats.profile = profile.as_dict()
        return call.generated, stats

    def _emit(self, request: DecodeRequest, call: CallState, active: list[int], parents: torch.Tensor,
              tokens: torch.Tensor, verified) -> tuple[list[list[int]], list[int]]:
        """Each row's accepted path and bonus token, cut at max_new_tokens, its first EOS and the
        caller's stopping criteria, join its sequence's output (and the streamer); the drafter
        observes the outcome. Returns the chunks emitted (one per row) and the rows whose sequences
        have finished."""
        accept_len, accept_nodes, bonus, topk, topk_probs, hidden, features = verified
        chunks = []
        for row, seq in enumerate(active):
            n = int(accept_len[row])
            path = accept_nodes[row, 1 : n + 1].long()
            chunk, done = self._limit(request, call.generated[seq], tokens[row, path].tolist() + [int(bonus[row])])
            call.generated[seq].extend(chunk)
            chunks.append(chunk)
            if done:
                call.settled.add(seq)
        if call.stopping is not None:  # may cut and settle any sequence, finished ones included
            call.settled |= call.stopping.update(call.generated, call.settled)
        if request.streamer is not None and len(call.generated[0]) > call.streamed:  # batch size 1: final tokens
            request.streamer.put(torch.tensor(call.generated[0][call.streamed :]))
            call.streamed = len(call.generated[0])
        with self.profile.phase("learning"):
            self.drafter.observe(StepOutcome(tokens, parents, topk, accept_len, accept_nodes, list(active),
                                             topk_probs, emitted=chunks, hidden=hidden, features=features))
        finished_rows = []
        for row, (seq, chunk) in enumerate(zip(active, chunks)):
            if seq in call.settled:
                finished_rows.append(row)
            else:  # its chunk is whole: only settled sequences are ever cut
                call.roots[seq] = chunk[-1]
        return chunks, finished_rows

    @staticmethod
    def _without(cache: TreeCache, active: list[int], finished_rows: list[int]) -> list[int]:
        """The active sequences but those in `finished_rows`, whose rows leave the cache."""
        if not finished_rows:
            return active
        keep = [r for r in range(len(active)) if r not in finished_rows]
        if keep:
            cache.select(torch.tensor(keep, dtype=torch.int64))
        return [active[r] for r in keep]

    # -- pieces --------------------------------------------------------------------------------
    def _propose(self, cache: TreeCache, active: list[int], roots: list[int], emitted: list[int],
                 max_nodes: int) -> Proposal:
        """The drafter's candidates for the batch, for a tree of at most `max_nodes`; a sampling
        call hands it the uniforms of the positions ahead (the tree never changes the output, so
        drafts may depend on them)."""
        uniforms = None
        if self.sampler is not None:
            uniforms = [self.sampler.ahead(seq, n, MAX_UNIFORMS_AHEAD) for seq, n in zip(active, emitted)]
        proposal = self.drafter.propose(DraftRequest(self.adapter, cache, list(active), roots, uniforms, max_nodes))
        proposal = proposal if isinstance(proposal, Proposal) else Proposal(list(proposal))
        if len(proposal.tries) != len(active):
            raise ValueError(f"drafter {self.drafter.name!r} proposed {len(proposal.tries)} tries for a batch of "
                             f"{len(active)} rows (one per row)")
        return proposal

    def _prefill(self, input_ids: torch.Tensor, padding: torch.Tensor, max_new_tokens: int):
        """Cache every prompt token, the last (the first step's root) included, as one causal chain.
        Returns the cache and, split at the prompt's last column: the normed last hidden state at
        the positions before it [B, L - 1, H] (its last column's LM-head output is the root) and the
        drafter's features there [B, L - 1, F], each None for one-token prompts (features also
        without feature layers); then the root's own [B, 1, H] and [B, 1, F] (or None)."""
        batch, length = input_ids.shape
        adapter = self.adapter
        tree_rows = max(self.max_nodes, 1) + 1
        cache = adapter.new_cache(padding, max_len=length + max_new_tokens + tree_rows,
                                  initial_len=length + min(max_new_tokens, GROWTH_ROWS) + tree_rows)
        step = TreeStep(cache.prefix_len.clone(), cache.kv_start.clone(), chain_tree_mask(batch, length), chain=True)
        cache.begin_step(length)
        with adapter.captured(self.drafter.feature_layers) as captured:
            hidden = adapter.forward(input_ids, prompt_positions(length, padding), cache, step)
        cache.advance(length)
        features = self._features(captured)
        root_features = None if features is None else features[:, -1:].contiguous()
        if length == 1:
            return cache, (None, None, hidden, root_features)
        return cache, (hidden[:, :-1], None if features is None else features[:, :-1], hidden[:, -1:].contiguous(),
                       root_features)

    def _features(self, captured: dict[int, torch.Tensor]) -> torch.Tensor | None:
        """The drafter's feature layers' outputs, concatenated in its order [B, T, F] (None: none)."""
        layers = self.drafter.feature_layers
        if not layers:
            return None
        missing = [i for i in layers if i not in captured]
        if missing:
            raise RuntimeError(f"decoder layers {missing} did not run in this forward; drafter "
                               f"{self.drafter.name!r} reads their outputs")
        return torch.cat([captured[i] for i in layers], dim=-1)

    def _verify_step(self, cache: TreeCache, parents: torch.Tensor, tokens: torch.Tensor,
                     sequences: list[int], emitted: list[int], start=None):
        """One tree forward and verification (greedy, or by sampling when the call samples).
        `sequences` (the rows' sequence ids) and `emitted` (tokens each has generated) place every
        node at its output position, whose uniform a sampling step uses. `start` (layer, residual)
        from the drafter: the nodes' first layers already ran, the forward starts at `layer`.
        Returns accept_len, accept_nodes, bonus (on the CPU), and what the drafter observes: the
        top-k ids after each node, when sampling their probabilities (None when greedy), and the
        last hidden state after each node [B, T, H], and the drafter's features there (or None)."""
        profile = self.profile
        with profile.phase("tree_build"):
            depth, tree_mask = ops.build_tree(parents)
            step = TreeStep(cache.prefix_len.clone(), cache.kv_start.clone(), tree_mask, profile=profile)
            positions = (cache.prefix_len - cache.kv_start).long().view(-1, 1) + depth.long()
            cache.begin_step(tokens.shape[1])
        rows = tokens.numel()
        trial = self._routing_trials and self.routing.start(rows)
        forward_started = time.perf_counter()
        with profile.phase("forward_other"), self.adapter.captured(self.drafter.feature_layers) as captured:
            if start is None:  # attention inside the forward is its own phase
                hidden = self.adapter.forward(tokens.clamp(min=0), positions, cache, step)
            else:
                hidden = self.adapter.forward_from(start[1], positions, cache, step, start[0])
        features = self._features(captured)
        if trial:  # CPU tensors (the only routed ones): the clock needs no synchronisation
            self.routing.finish(rows, self.adapter.agreed_seconds(time.perf_counter() - forward_started))
        return self._verified(hidden, features, parents, tokens, sequences, emitted, depth)

    def _verified(self, hidden: torch.Tensor, features: torch.Tensor | None, parents: torch.Tensor,
                  tokens: torch.Tensor, sequences: list[int], emitted: list[int], depth: torch.Tensor):
        """Verification of trees whose forward gave `hidden` [B, T, H] (and `features`): the
        LM head, then greedy acceptance, or sampling each node's target with the uniform of its
        output position (emitted + depth); returns what _verify_step does."""
        profile = self.profile
        if self.sampler is None:
            with profile.phase("lm_head"):
                topk = self.adapter.topk(hidden, max(self.drafter.topk, 1))
            with profile.phase("verify"):
                accept_len, accept_nodes, bonus = ops.verify_greedy(parents, tokens, topk[:, :, 0].contiguous())
            return accept_len, accept_nodes, bonus, topk, None, hidden, features
        with profile.phase("sampling"):  # the LM head inside it is timed as lm_head
            uniforms = self.sampler.node_uniforms(sequences, emitted, depth)
            dists, sampled = self._sample_nodes(hidden, uniforms)
            target, topk, topk_probs = sampled
            target = target.view(tokens.shape)
        with profile.phase("verify"):
            if self.sampler.typical is None:
                accept_len, accept_nodes, bonus = ops.verify_greedy(parents, tokens, target)
            else:  # opt-in and lossy: drafts the model finds plausible enough are kept too
                accept_len, accept_nodes, bonus = typical_verify(parents, tokens, target, dists,
                                                                 self.sampler.typical)
        return accept_len, accept_nodes, bonus, topk, topk_probs, hidden, features

    def _sample_nodes(self, hidden: torch.Tensor, uniforms: torch.Tensor):
        """Each node's sampling distribution (NodeDistributions, on the device) and, on the CPU,
        its target token (drawn with its uniform, int64 [B * T]) and the drafter's view (top-k
        ids int64 [B, T, k] and their sampling probabilities float32 [B, T, k]). The targets, the
        view, the sampling checks' verdict and the fused path's tie flag reach the host in one
        transfer (host.to_host): a GPU step waits once. A tie at the k-th logit (rare) discards
        the fused path's result and samples again from the full logits, a second wait."""
        dists, view, tie = self._node_distributions(hidden, full=False)
        sampled = self._sampled(dists, view, uniforms, tie)
        if sampled is None:
            dists, view, _ = self._node_distributions(hidden, full=True)
            sampled = self._sampled(dists, view, uniforms, None)
        return dists, sampled

    def _sampled(self, dists, view, uniforms: torch.Tensor, tie: torch.Tensor | None):
        """(target, view ids, view probs) on the CPU, or None when `tie` (a device flag) is set."""
        choice, found = ops.sample_tokens_deferred(dists.probs, uniforms.reshape(-1).to(dists.probs.device))
        flags = [f for f in (found, None if tie is None else tie.view(1).to(torch.int64)) if f is not None]
        batch, num_nodes = uniforms.shape
        ids, probs = view
        read = host.to_host(dists.token_ids(choice), ids.reshape(batch, num_nodes, -1),
                            probs.reshape(batch, num_nodes, -1).float(), *([torch.cat(flags)] if flags else []))
        target, view_ids, view_probs = read[:3]
        flags = read[3].tolist() if flags else []
        if tie is not None and flags[-1]:
            return None
        if found is not None:
            ops.raise_faults(flags[:4])
        return target, view_ids, view_probs

    def _node_distributions(self, hidden: torch.Tensor, full: bool):
        """Each node's sampling distribution (NodeDistributions), the drafter's view (top-k ids
        [B * T, k] and their sampling probabilities [B * T, k]) and, from the fused path, a device
        bool: whether a row's k-th and (k+1)-th logits tie (then HF keeps both and the full path
        must decide; None from the full path). All on the device.

        With HF's top_k set (its default is 50) and not `full`, they come from the fused LM-head
        top-k alone: the same distributions without [B, T, V] logits, warpers or softmax over the
        vocabulary. Else (`full`, no top_k, a kernel limit) from the full logits."""
        batch, num_nodes, _ = hidden.shape
        draft_k = max(self.drafter.topk, 1)
        top_k = self.sampler.top_k
        wanted = max((top_k or 0) + 1, draft_k)
        fused = self.adapter.fused_lm_head and top_k is not None and top_k + 1 <= self.adapter.vocab_size
        if fused and not full:
            with self.profile.phase("lm_head"):
                values, ids, rounded = self.adapter.fused_topk(hidden, wanted)
            ids = ids.reshape(batch * num_nodes, -1)
            probs, kept_ids, tie = self.sampler.subset_probs(values.reshape(batch * num_nodes, -1)[:, : top_k + 1],
                                                             ids[:, : top_k + 1])
            tie = tie if rounded is None else tie | rounded  # either makes the full logits decide
            # Ids past the top_k (the drafter may want more) have probability 0.
            view_probs = torch.nn.functional.pad(probs, (0, max(draft_k - top_k, 0)))[:, :draft_k]
            return in_sampling_order(probs, kept_ids), (ids[:, :draft_k], view_probs), tie
        with self.profile.phase("lm_head"):
            logits = self.adapter.logits(hidden)
        probs = self.sampler.probs(logits).reshape(batch * num_nodes, -1)
        # Ranked by logit: past top-p's nucleus every probability is 0, the logits still rank.
        view_ids = logits.reshape(batch * num_nodes, -1).topk(draft_k, dim=-1).indices
        return in_sampling_order(probs), (view_ids, probs.gather(1, view_ids)), None

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
