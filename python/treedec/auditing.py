"""`treedec.audit`: unpatched and patched `generate` side by side, prompt by prompt.

Divergence bugs recur in every speculative engine, and a user should not have to take "lossless"
on trust. Greedy: each prompt is identical to HF's output, or the report names the first
generated position that differs and HF's top-2 logit gap there, read against the rounding of the
model's dtype: a near-tie (a gap a different reduction order can flip, as a T-node verify's
matmul shape gives) is floating-point noise, a wider gap is a defect. Sampling: both sides draw
`samples` continuations of each prompt, and a chi-square test of homogeneity compares the
distributions of the first `positions` generated tokens, position by position.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import torch

from .options import int_option, number_option
from .patching import patch, unpatch

# A sampling position whose p-value falls below ALPHA / (number of tests) marks the prompt as
# differing (Bonferroni over positions and prompts: false alarms stay below ALPHA per audit).
ALPHA = 0.01
MIN_EXPECTED = 5  # categories expected fewer times are pooled, as the chi-square approximation needs


@dataclass
class GreedyAudit:
    prompt: int  # index into the audited prompts
    prompt_tokens: int
    identical: bool
    verdict: str  # "identical" | "near-tie" | "defect" | "fell back: <reason>"
    hf_tokens: int = 0  # generated tokens, each side
    treedec_tokens: int = 0
    first_diff: int | None = None  # first generated position that differs
    logit_gap: float | None = None  # HF's top-2 logit gap there
    tie_tolerance: float | None = None  # the largest gap rounding explains in this dtype


@dataclass
class PositionTest:
    position: int  # 1: the first generated token
    chi2: float
    dof: int
    p_value: float


@dataclass
class SamplingAudit:
    prompt: int
    samples: int
    positions: list[PositionTest]
    verdict: str  # "consistent" | "differs" | "fell back: <reason>"


@dataclass
class AuditReport:
    drafter: str | None
    options: dict
    max_new_tokens: int
    dtype: str
    greedy: list[GreedyAudit] = field(default_factory=list)
    sampling: list[SamplingAudit] = field(default_factory=list)
    sampling_settings: dict | None = None
    labels: list[str] = field(default_factory=list)  # what each prompt is (e.g. "coding 81"); default its index

    def label(self, prompt: int) -> str:
        return self.labels[prompt] if prompt < len(self.labels) else str(prompt)

    @property
    def ok(self) -> bool:
        """No defect and no differing distribution (near-ties and fallbacks are not defects)."""
        return all(g.verdict != "defect" for g in self.greedy) and all(s.verdict != "differs" for s in self.sampling)

    def table(self) -> str:
        lines = []
        width = max([len(self.label(i)) for i in range(len(self.greedy) + len(self.sampling))] + [6])
        if self.greedy:
            lines.append(f"greedy    {'prompt':<{width}}  tokens  verdict")
            for g in self.greedy:
                where = "" if g.first_diff is None else (
                    f" at generated token {g.first_diff}: HF's top-2 logit gap {g.logit_gap:.3g} "
                    f"(rounding explains up to {g.tie_tolerance:.3g})")
                lines.append(f"          {self.label(g.prompt):<{width}}  {g.treedec_tokens:>6}  {g.verdict}{where}")
            identical = sum(g.identical for g in self.greedy)
            lines.append(f"          {identical}/{len(self.greedy)} identical to HF greedy")
        if self.sampling:
            lines.append(f"sampling  {'prompt':<{width}}  draws  lowest p over positions  verdict   {self.sampling_settings}")
            for s in self.sampling:
                low = min((t.p_value for t in s.positions), default=float("nan"))
                lines.append(f"          {self.label(s.prompt):<{width}}  {s.samples:>5}  {low:>23.3g}  {s.verdict}")
        lines.append("audit: " + ("no defect found" if self.ok else "DEFECT: treedec's output differs from HF's"))
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def audit(model, prompts, drafter="auto", max_new_tokens: int = 64, tokenizer=None, sampling: dict | None = None,
          samples: int = 256, positions: int = 4, greedy: bool = True, labels: list[str] | None = None,
          **options) -> AuditReport:
    """Run HF's `generate` and treedec's on each prompt and report where they differ.

    prompts: token-id lists, tensors [L] or [1, L], dicts with input_ids (and attention_mask),
    or strings (with `tokenizer`). `drafter` and `options` are treedec.patch's. `sampling`: HF
    sampling settings (e.g. {"temperature": 0.7}) to also test the distributions of the first
    `positions` tokens from `samples` draws per side; None tests greedy only. `labels` name the
    prompts in the table. The model leaves as it came (patched again with its own drafter if it
    was patched)."""
    max_new_tokens = int_option("max_new_tokens", max_new_tokens)
    samples, positions = int_option("samples", samples, 2), int_option("positions", positions)
    if sampling is not None:
        number_option("temperature", sampling.get("temperature", 1.0), 0.0, low_open=True)
    encoded = [_encode(prompt, tokenizer) for prompt in prompts]
    previous = model.treedec if hasattr(model, "treedec") else None
    if previous is not None:
        unpatch(model)
    report = AuditReport(drafter if not hasattr(drafter, "name") else drafter.name, dict(options), max_new_tokens,
                         str(next(model.parameters()).dtype), sampling_settings=sampling, labels=list(labels or []))
    try:
        if greedy:
            for index, (ids, mask) in enumerate(encoded):
                report.greedy.append(_greedy(model, index, ids, mask, max_new_tokens, drafter, options))
        if sampling is not None:
            tests = len(encoded) * positions
            for index, (ids, mask) in enumerate(encoded):
                report.sampling.append(_sampling(model, index, ids, mask, sampling, samples, positions, tests,
                                                 drafter, options))
    finally:
        if hasattr(model, "treedec"):
            unpatch(model)
        if previous is not None:
            patch(model, previous.drafter, **previous.options)
    return report


def _encode(prompt, tokenizer) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("text prompts need tokenizer=")
        prompt = tokenizer(prompt, return_tensors="pt")
    if isinstance(prompt, dict) or hasattr(prompt, "keys"):
        ids, mask = prompt["input_ids"], prompt.get("attention_mask")
    else:
        ids, mask = prompt, None
    ids = torch.as_tensor(ids)
    ids = ids.view(1, -1) if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"each prompt is one sequence; got input_ids of shape {tuple(ids.shape)}")
    return ids, None if mask is None else torch.as_tensor(mask).view(1, -1)


def _treedec_generate(model, drafter, options: dict, *args, **kwargs):
    """The patched model's output, and why it fell back to HF (None when treedec decoded)."""
    patch(model, drafter, **options)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model.generate(*args, **kwargs)
        reason = None
        if not model.treedec.last_stats:
            found = [str(w.message) for w in caught if "falling back" in str(w.message)]
            reason = found[0].split(": ", 2)[-1] if found else "treedec fell back to HF"
    finally:
        unpatch(model)
    return out, reason


def _greedy(model, index, ids, mask, max_new_tokens, drafter, options) -> GreedyAudit:
    kwargs = dict(attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
    expected = model.generate(ids, **kwargs)[0, ids.shape[1]:].tolist()
    got, fell_back = _treedec_generate(model, drafter, options, ids, **kwargs)
    got = got[0, ids.shape[1]:].tolist()
    found = GreedyAudit(index, ids.shape[1], got == expected, "identical", len(expected), len(got))
    if fell_back is not None:
        found.verdict = f"fell back: {fell_back}"
        return found
    if found.identical:
        return found
    found.first_diff = diff = first_difference(got, expected)
    if diff < min(len(got), len(expected)):  # two different tokens at one position
        found.logit_gap, found.tie_tolerance = logit_gap(model, ids, mask, expected[:diff])
        found.verdict = "near-tie" if found.logit_gap <= found.tie_tolerance else "defect"
    else:  # one stopped where the other went on: no tie explains a length
        found.logit_gap, found.tie_tolerance, found.verdict = float("nan"), float("nan"), "defect"
    return found


def first_difference(got: list[int], expected: list[int]) -> int | None:
    """The first position where two token lists differ (the shorter one's length when one is the
    other's start), or None when they are equal."""
    for i, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            return i
    return None if len(got) == len(expected) else min(len(got), len(expected))


@torch.no_grad()
def logit_gap(model, ids, mask, common: list[int]) -> tuple[float, float]:
    """The unpatched model's top-2 logit gap after the prompt `ids` [1, L] (its `mask` or None)
    and `common`, and the largest gap that rounding in the model's dtype explains: two units in
    the last place of the top logit in 16-bit dtypes (the logits themselves are rounded there),
    1e-4 of it in float32 (kernels' reduction orders)."""
    device = next(model.parameters()).device
    full = torch.cat([ids.to(device), torch.tensor([common], dtype=ids.dtype, device=device)], dim=1)
    if mask is not None:
        mask = torch.cat([mask.to(device), mask.new_ones(1, len(common), device=device)], dim=1)
    top2 = model(full, attention_mask=mask).logits[0, -1].float().topk(2).values
    top = abs(float(top2[0]))
    dtype = next(model.parameters()).dtype
    if dtype in (torch.float16, torch.bfloat16):
        tolerance = 2 * torch.finfo(dtype).eps * 2 ** math.floor(math.log2(max(top, 1e-30)))
    else:
        tolerance = 1e-4 * max(1.0, top)
    return float(top2[0] - top2[1]), tolerance


def _sampling(model, index, ids, mask, settings, samples, positions, tests, drafter, options) -> SamplingAudit:
    batch = ids.expand(samples, -1)
    batch_mask = None if mask is None else mask.expand(samples, -1)
    kwargs = dict(attention_mask=batch_mask, max_new_tokens=positions, do_sample=True, **settings)
    expected = model.generate(batch, **kwargs)[:, ids.shape[1]:]
    got, fell_back = _treedec_generate(model, drafter, options, batch, **kwargs)
    got = got[:, ids.shape[1]:]
    if fell_back is not None:
        return SamplingAudit(index, samples, [], f"fell back: {fell_back}")
    tests_here = []
    for position in range(positions):
        a = expected[:, position] if position < expected.shape[1] else torch.full((samples,), -1)
        b = got[:, position] if position < got.shape[1] else torch.full((samples,), -1)
        tests_here.append(PositionTest(position + 1, *homogeneity(a, b)))
    differs = any(t.p_value < ALPHA / tests for t in tests_here)
    return SamplingAudit(index, samples, tests_here, "differs" if differs else "consistent")


def homogeneity(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int, float]:
    """Chi-square test that two samples of token ids (int [N] each) come from one distribution:
    (statistic, degrees of freedom, p-value). Tokens expected fewer than MIN_EXPECTED times in
    either sample are pooled into one category."""
    tokens, inverse = torch.unique(torch.cat([a.reshape(-1), b.reshape(-1)]), return_inverse=True)
    counts = torch.zeros(2, len(tokens), dtype=torch.float64)
    counts[0].index_add_(0, inverse[: a.numel()], torch.ones(a.numel(), dtype=torch.float64))
    counts[1].index_add_(0, inverse[a.numel():], torch.ones(b.numel(), dtype=torch.float64))
    share = counts.sum(1, keepdim=True) / counts.sum()
    expected = share * counts.sum(0, keepdim=True)
    rare = (expected < MIN_EXPECTED).any(0)
    if bool(rare.any()):
        counts = torch.cat([counts[:, ~rare], counts[:, rare].sum(1, keepdim=True)], dim=1)
        counts = counts[:, counts.sum(0) > 0]
        expected = share * counts.sum(0, keepdim=True)
    dof = counts.shape[1] - 1
    if dof == 0:  # one category: both samples agree entirely
        return 0.0, 0, 1.0
    statistic = float(((counts - expected) ** 2 / expected).sum())
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                            torch.tensor(statistic / 2, dtype=torch.float64)))
    return statistic, dof, p_value
