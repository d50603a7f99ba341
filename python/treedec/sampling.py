"""Sampling through trees: the target distribution at every tree node, and the random numbers.

HF samples one position at a time: logits -> fp32 -> its logits warpers (temperature, top-k,
top-p, min-p, typical, epsilon, eta; in that order) -> softmax -> multinomial. These warpers
depend only on the scores of the position, not on the tokens before it, so applying HF's own
warper objects to each tree node's logits row gives that node exactly the distribution HF would
sample from there. Each node's target token is then drawn by inverse CDF with the uniform of the
output position after it (`treedec.ops.sample_tokens`), walking the tokens in sampling order
(the 16 most probable first, see `in_sampling_order`), and greedy verification keeps the drafts
equal to their parent's target (`treedec.ops.verify_sample` is the two together): every emitted
token has exactly HF's distribution, and the tree never changes which token a position gets.
Because of that, drafters may look at the uniforms before drafting (`DraftRequest.uniforms`).

Processors that read the path (repetition penalty, no-repeat n-grams, bad words, ...) are not
applied to trees: patching falls back to HF's `generate` for them, with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops


def unsupported_reason(config) -> str | None:
    """Why sampling with this GenerationConfig cannot go through treedec, or None."""
    if getattr(config, "top_h", None) is not None:
        return "top_h is set (its warper is not applied to trees yet)"
    return None


def build_warpers(config) -> list:
    """HF's sampling warpers for `config`, in the order `GenerationMixin._get_logits_processor`
    builds them for num_beams == 1 (min_tokens_to_keep = 1)."""
    from transformers.generation import logits_process as lp

    warpers = []
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(lp.TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        warpers.append(lp.TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(lp.TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    if getattr(config, "min_p", None) is not None:
        warpers.append(lp.MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
    if config.typical_p is not None and config.typical_p < 1.0:
        warpers.append(lp.TypicalLogitsWarper(mass=config.typical_p, min_tokens_to_keep=1))
    if config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0:
        warpers.append(lp.EpsilonLogitsWarper(epsilon=config.epsilon_cutoff, min_tokens_to_keep=1))
    if config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0:
        warpers.append(lp.EtaLogitsWarper(epsilon=config.eta_cutoff, min_tokens_to_keep=1))
    return warpers


def _top_k_class():
    from transformers.generation.logits_process import TopKLogitsWarper

    return TopKLogitsWarper


UNIFORM_CHUNK = 256  # output positions whose uniforms are drawn at a time, for the whole batch


class PositionUniforms:
    """One U[0, 1) draw per (sequence, output position), drawn as the call reaches the positions.

    A generator of its own, seeded once at the start of the call from torch's default generator
    (or `generator`), draws them UNIFORM_CHUNK positions at a time for the whole batch, always in
    the same order: position n of sequence b gets the same value however many steps reached it,
    and a call asking for a million new tokens holds only the chunks it reached.
    """

    def __init__(self, batch: int, max_new_tokens: int, generator: torch.Generator | None = None):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self._generator = torch.Generator().manual_seed(seed)
        self.limit = max_new_tokens
        self._table = torch.empty(batch, 0)  # float32 [B, capacity], the first `_drawn` columns drawn
        self._drawn = 0

    def upto(self, positions: int) -> torch.Tensor:
        """float32 [B, min(positions, max_new_tokens)]: the uniforms of the first positions."""
        positions = min(positions, self.limit)
        if positions > self._drawn:
            chunks = -(-(positions - self._drawn) // UNIFORM_CHUNK)
            if self._drawn + chunks * UNIFORM_CHUNK > self._table.shape[1]:  # double: O(positions) copying
                grown = self._table.new_empty(self._table.shape[0], max(2 * self._table.shape[1],
                                                                        self._drawn + chunks * UNIFORM_CHUNK))
                grown[:, : self._drawn] = self._table[:, : self._drawn]
                self._table = grown
            for _ in range(chunks):
                self._table[:, self._drawn : self._drawn + UNIFORM_CHUNK] = torch.rand(
                    self._table.shape[0], UNIFORM_CHUNK, generator=self._generator)
                self._drawn += UNIFORM_CHUNK
        return self._table[:, :positions]


@dataclass
class Sampler:
    """What a sampling decode needs besides the model: HF's warpers and the random numbers.

    Every generated position gets one uniform (PositionUniforms): position n of sequence b uses
    the same value whatever the tree. A token depends only on its context and its position's
    uniform, never on the draft tree or on how many steps the call took, so `torch.manual_seed`
    / `transformers.set_seed` make runs repeat exactly even though tree sizes follow measured
    step times.
    """

    warpers: list
    top_k: int | None = None  # HF's top_k when set: only the k best logits can be sampled
    typical: TypicalAcceptance | None = None  # opt-in lossy acceptance; None: exact
    generator: torch.Generator | None = None
    uniforms: PositionUniforms | None = None  # set by `start`

    def start(self, batch: int, max_new_tokens: int) -> None:
        self.uniforms = PositionUniforms(batch, max_new_tokens, self.generator)

    def ahead(self, seq: int, emitted: int, count: int) -> list[float]:
        """The uniforms of sequence `seq`'s next `count` positions (fewer near max_new_tokens)."""
        return self.uniforms.upto(emitted + count)[seq, emitted:].tolist()

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, T, V] -> float32 probabilities [B, T, V] after the warpers (rows sum to 1)."""
        batch, num_nodes, vocab = logits.shape
        scores = self._warp(logits.reshape(batch * num_nodes, vocab).float(), self.warpers)
        return torch.softmax(scores, dim=-1).view(batch, num_nodes, vocab)

    @staticmethod
    def _warp(scores: torch.Tensor, warpers: list) -> torch.Tensor:
        """scores float32 [N, K] through HF warpers, which ignore input_ids but want one row per score row."""
        dummy_ids = torch.zeros(scores.shape[0], 1, dtype=torch.long, device=scores.device)
        for warper in warpers:
            scores = warper(dummy_ids, scores)
        return scores

    def subset_probs(self, values: torch.Tensor, ids: torch.Tensor):
        """The same distributions from the k = top_k best logits alone, without full logits.

        values float32 [N, k + 1] (descending) and ids int64 [N, k + 1] from a fused LM-head top-k.
        Every token outside the top k has probability 0 under HF's top-k, and the warpers after
        it (top-p, min-p, typical, epsilon, eta) and the temperature before it give the same
        result on the k kept scores as on the full row. Returns (probs [N, k], ids [N, k]) in the
        order of `values`, and a bool tensor on their device: whether a row's k-th and (k+1)-th
        logits tie, since HF then keeps both and the result must be discarded for the full path's
        (a flag, not a branch here: reading it would make a GPU's host wait for the device).
        """
        k = values.shape[1] - 1
        tie = (values[:, k] == values[:, k - 1]).any()
        scores = self._warp(values[:, :k], [w for w in self.warpers if not isinstance(w, _top_k_class())])
        return torch.softmax(scores, dim=-1), ids[:, :k], tie

    def node_uniforms(self, sequences: list[int], generated: list[int], depth: torch.Tensor) -> torch.Tensor:
        """float32 [B, T]: node i of row b gets the uniform of output position generated[b] + depth[b, i]
        (positions past the end are never emitted; they reuse the last one)."""
        last = self.uniforms.limit - 1
        index = (torch.tensor(generated).view(-1, 1) + depth.long()).clamp(max=last)
        return self.uniforms.upto(int(index.max()) + 1)[sequences].gather(1, index)


HEAD_SIZE = 16


def in_sampling_order(probs: torch.Tensor, ids: torch.Tensor | None = None) -> NodeDistributions:
    """Lay out each row in the order inverse-CDF sampling walks it: the HEAD_SIZE most probable
    tokens first, most probable first, then every other token in vocabulary order.

    probs float32 [N, K]; ids int64 [N, K] (the columns' vocabulary ids, any order) or None when
    the K columns are the whole vocabulary. Any order that depends only on the distribution
    samples exactly; this one makes a uniform u pick the top token when u < p(top), the second
    when p(top) <= u < p(top) + p(second), and so on: a drafter that knows a position's uniform and
    roughly knows its distribution can then guess the sampled token (see drafters.recycling).
    """
    if ids is not None:  # the tail walks vocabulary order, whatever order the columns came in
        order = ids.argsort(dim=-1)
        probs, ids = probs.gather(1, order), ids.gather(1, order)
    head_probs, head_columns = probs.topk(min(HEAD_SIZE, probs.shape[1]), dim=-1)
    tail = probs.scatter(1, head_columns, 0.0)
    head_ids = head_columns if ids is None else ids.gather(1, head_columns)
    return NodeDistributions(torch.cat([head_probs, tail], dim=1), head_ids, ids)


@dataclass
class NodeDistributions:
    """Every tree node's sampling distribution in sampling order, rows in node order (b * T + i).

    probs float32 [N, m + K]: columns [0, m) are the m most probable tokens (descending), whose
    ids are head_ids int64 [N, m]; columns [m, m + K) are the K tokens of the row in vocabulary
    order with the head's entries zeroed: tail_ids int64 [N, K], or None when the K are the whole
    vocabulary (column m + j is token j). Build it with `in_sampling_order`.
    """

    probs: torch.Tensor
    head_ids: torch.Tensor
    tail_ids: torch.Tensor | None

    @property
    def head_size(self) -> int:
        return self.head_ids.shape[1]

    def token_ids(self, columns: torch.Tensor) -> torch.Tensor:
        """Column index per row -> vocabulary id per row, int64 [N]."""
        m = self.head_size
        columns = columns.view(-1, 1).to(self.head_ids.device)
        head = self.head_ids.gather(1, columns.clamp(max=m - 1))
        tail = (columns - m).clamp(min=0)
        if self.tail_ids is not None:
            tail = self.tail_ids.gather(1, tail)
        return torch.where(columns < m, head, tail).view(-1)

    def prob_of(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """probs of `tokens` [M] under rows `rows` [M] (0 for padding and for tokens outside the row)."""
        m = self.head_size
        safe = tokens.clamp(min=0).to(self.probs.device).view(-1, 1)
        rows = rows.to(self.probs.device)
        found = (self.probs[rows, :m] * (self.head_ids[rows] == safe)).sum(1)
        if self.tail_ids is None:
            found = found + self.probs[rows, m + safe.view(-1)]
        else:
            found = found + (self.probs[rows, m:] * (self.tail_ids[rows] == safe)).sum(1)
        return torch.where(tokens.to(found.device) >= 0, found, torch.zeros_like(found)).cpu()

    def entropy(self) -> torch.Tensor:
        """Shannon entropy per row (nats), float32 [N], on the CPU."""
        p = self.probs
        return -(p * torch.log(p.clamp(min=1e-30))).sum(1).cpu()


@dataclass
class TypicalAcceptance:
    """Medusa's typical acceptance, LOSSY: a draft token x after node u is also accepted when
    p_u(x) > min(posterior_threshold, posterior_alpha * exp(-H(p_u))), with p_u the sampling
    distribution at u (warpers applied) and H its entropy. Longer accepted paths, but the output
    no longer has the model's distribution. Off unless asked for (`acceptance="typical"`)."""

    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3


def typical_verify(parents: torch.Tensor, tokens: torch.Tensor, target: torch.Tensor,
                   dists: NodeDistributions, rule: TypicalAcceptance):
    """Greedy verification against `target`, plus typical acceptance (see TypicalAcceptance).
    All [B, T] on the CPU; returns accept_len, accept_nodes, bonus as verify_greedy does.

    A plausible draft is verified as if it were its parent's target: greedy verification then
    accepts it whenever its parent is accepted, and keeps its usual rule for the rest (deepest
    path, ties to the smallest index, bonus = target of the deepest node). The caller emits the
    drafts it proposed, so only the verification sees the substitution."""
    batch, num_nodes = parents.shape
    parent_rows = (torch.arange(batch).view(-1, 1) * num_nodes + parents.long().clamp(min=0)).view(-1)
    token_prob = dists.prob_of(parent_rows, tokens.reshape(-1)).view(batch, num_nodes)
    entropy = dists.entropy().view(batch, num_nodes)
    threshold = torch.minimum(torch.full_like(entropy, rule.posterior_threshold),
                              rule.posterior_alpha * torch.exp(-entropy))
    parent_index = parents.long().clamp(min=0)
    plausible = (token_prob > threshold.gather(1, parent_index)) & (tokens >= 0)
    plausible[:, 0] = False  # the root is no draft
    as_verified = torch.where(plausible, target.gather(1, parent_index), tokens)
    return ops.verify_greedy(parents, as_verified, target)
