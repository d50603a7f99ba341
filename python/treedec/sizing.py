"""How big each step's tree is: measured acceptance against measured cost.

`AcceptanceModel` keeps, per candidate key (see drafters.base), the rate at which a node of
that kind was accepted given that its parent was. A node's chance of being on the accepted
path is the product of the rates along its path; because siblings carry distinct tokens, at
most one of them is accepted, so the expected tokens a tree emits is 1 + the sum of those
path probabilities. `CostCurve` holds the measured step time of a verify by its work (batch
size x T nodes). `choose` picks the T (one of TREE_SIZES) with the most expected tokens per second for the whole batch,
which is T = 1 (no drafts) when drafts are not paying for themselves.
"""

from __future__ import annotations

from collections.abc import Hashable

from .drafters.base import DraftTrie

TREE_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64)
# A larger tree must beat the best smaller one by this factor in expected tokens per second:
# timings are noisy, and a tie should go to the cheaper, plainer step.
SIZE_MARGIN = 1.03


class AcceptanceModel:
    """Per-key conditional acceptance rate with a prior, forgetting old evidence step by step.

    Forgetting lets a key that was priced out (never proposed again) drift back to its prior,
    so the loop retries it now and then instead of freezing on one bad stretch.
    """

    def __init__(self, prior: float = 0.25, prior_weight: float = 2.0, decay: float = 0.995):
        self.prior, self.prior_weight, self.decay = prior, prior_weight, decay
        self.step = 0
        self._counts: dict[Hashable, list[float]] = {}  # key -> [accepted, seen, step of last update]

    def _decayed(self, key: Hashable) -> tuple[float, float]:
        entry = self._counts.get(key)
        if entry is None:
            return 0.0, 0.0
        fade = self.decay ** (self.step - entry[2])
        return entry[0] * fade, entry[1] * fade

    def rate(self, key: Hashable) -> float:
        accepted, seen = self._decayed(key)
        return (accepted + self.prior * self.prior_weight) / (seen + self.prior_weight)

    def update(self, key: Hashable, accepted: bool) -> None:
        acc, seen = self._decayed(key)
        self._counts[key] = [acc + float(accepted), seen + 1.0, self.step]

    def next_step(self) -> None:
        self.step += 1

    def snapshot(self) -> dict[str, float]:
        return {repr(k): round(self.rate(k), 3) for k in sorted(self._counts, key=repr)}


class CostCurve:
    """Step seconds of a verify, keyed by its work: batch size x T nodes, the median of the latest
    real steps at each work. Nothing is timed apart from decoding: the sizer may choose a tree of
    at most twice the largest work measured (`explored_nodes`), so the curve reaches larger trees
    a doubling per step, each measured by a step that also decodes. (An up-front calibration, best
    of three verifies at T = 1..64, cost about 1.1 s on a 2-core CPU: a first call with drafts was
    0.70x HF at B = 1 on a Xeon.) One curve for every batch size: a batch whose rows finish one by
    one (32, 31, ..., 1) is priced from what its neighbours measured. A sample over 3x the curve's
    current estimate (a GC pause, a busy neighbour) is dropped, so one outlier cannot price a size
    out; past the largest measured work the estimate is an extrapolation, and every sample is kept
    to correct it."""

    def __init__(self, window: int = 9, outlier_factor: float = 3.0):
        self.window, self.outlier_factor = window, outlier_factor
        self.samples: dict[int, list[float]] = {}  # batch size x T -> recent seconds
        self.seconds: dict[int, float] = {}  # batch size x T -> median of its samples

    def covers(self, batch_size: int) -> bool:
        """Whether the curve prices this batch's trees from measurements near them: its 1-node
        step is at most 2x the largest measured work. Smaller batches are priced by extrapolating
        down, which the step times of a CPU and a GPU both follow closely (cost grows about
        linearly with work on the one, hardly at all on the other)."""
        return bool(self.seconds) and batch_size <= 2 * max(self.seconds)

    def explored_nodes(self, batch_size: int) -> int:
        """The largest tree a `batch_size` step may have: work up to twice the largest measured
        (one node, no drafts, before anything is measured), since extrapolating far up can price a
        tree the hardware cannot afford. Priced optimistically inside that bound (see `cost`), a
        tree worth trying is tried, and its step corrects the curve."""
        if not self.seconds:
            return 1
        return max(1, 2 * max(self.seconds) // batch_size)

    def record(self, batch_size: int, num_nodes: int, seconds: float) -> None:
        work = batch_size * num_nodes
        measured = bool(self.seconds) and work <= max(self.seconds)
        if measured and seconds > self.outlier_factor * self.cost(batch_size, num_nodes):
            return
        recent = self.samples.setdefault(work, [])
        recent.append(seconds)
        del recent[: -self.window]
        self.seconds[work] = sorted(recent)[len(recent) // 2]

    def cost(self, batch_size: int, num_nodes: int) -> float:
        """Seconds of a `num_nodes` verify of `batch_size` rows: the measured points made
        non-decreasing in work (one noisy slow sample must not price a size out forever),
        interpolated linearly between them and extrapolated from the nearest two (below the
        smallest, to no less than half of it; above the largest, at no less than the mean slope)."""
        work = batch_size * num_nodes
        if not self.seconds:
            return float(work)  # nothing measured: proportional to work (explored_nodes allows 1 node)
        points = monotone(sorted(self.seconds.items()))
        below = [p for p in points if p[0] <= work]
        above = [p for p in points if p[0] > work]
        if below and below[-1][0] == work:
            return below[-1][1]
        if len(points) < 2:
            return points[0][1]
        if below and above:
            (w0, s0), (w1, s1) = below[-1], above[0]
        else:
            (w0, s0), (w1, s1) = (points[-2], points[-1]) if below else (points[0], points[1])
        slope = max((s1 - s0) / (w1 - w0), 0.0)
        if not above:  # past the largest measured work: at least the whole curve's mean slope, so
            # that two close noisy points at the top cannot price a much larger tree as nearly free
            (first_work, first_seconds), (last_work, last_seconds) = points[0], points[-1]
            slope = max(slope, (last_seconds - first_seconds) / (last_work - first_work))
            w0, s0 = last_work, last_seconds
        floor = points[0][1] if below else points[0][1] / 2
        return max(s0 + slope * (work - w0), floor)

    def as_dict(self) -> dict[int, float]:
        return dict(sorted(self.seconds.items()))


def batch_bucket(batch_size: int) -> int:
    """Batch sizes 1, 2, 3-4, 5-8, ..., 33-64, ... share a bucket: a batch whose rows finish one by
    one passes through many sizes, each too briefly to gather evidence of its own."""
    return (batch_size - 1).bit_length()


class DraftGate:
    """Whether a step drafts at all, per batch-size bucket (`batch_bucket`).

    The cost curve prices a tree's verify, and `choose` keeps only nodes worth it, but drafting
    itself (the drafter's proposals and choosing) costs time whatever is kept: Python per row,
    about 4 ms a step at B = 64 on a 2-core Xeon. Where drafts barely pay (a compute-bound batch,
    text no drafter predicts) trees of one or two nodes then lose to plain steps. So the gate
    compares, per bucket, the measured seconds per emitted token of drafted steps (whole steps)
    with a plain step's (the cost curve's one-node cost over the batch). Once at least `evidence`
    drafted steps average more than `1 + margin` times the plain cost, the next `backoff` steps
    of that bucket do not draft, as with drafter=None. The backoff doubles
    (up to `max_backoff`) while drafting keeps losing and resets when it wins; each reopening
    gathers fresh evidence."""

    def __init__(self, margin: float = 0.03, evidence: int = 3, first_backoff: int = 4, max_backoff: int = 64,
                 smoothing: float = 0.3, min_batch: int = 17):
        self.min_batch = min_batch
        self.margin, self.evidence, self.smoothing = margin, evidence, smoothing
        self.first_backoff, self.max_backoff = first_backoff, max_backoff
        self.per_token: dict[int, tuple[float, int]] = {}  # bucket -> (EMA seconds per token, steps)
        self.closed: dict[int, int] = {}  # bucket -> plain steps left before drafting again
        self.backoff: dict[int, int] = {}  # bucket -> the next closing's length
        self.closings = 0  # how often the gate closed (last_stats)

    def opens(self, batch_size: int) -> bool:
        """Whether this step of `batch_size` rows drafts (a closed gate counts the step down).
        Batches below `min_batch` always draft: at B = 1 on the Xeon the gate cost `auto` 1.28x ->
        1.18x HF (three e2e runs each, 2026-12-07), its noisy per-step evidence closing it where
        drafts paid; it is measured to help only at B = 64 (0.94x -> 1.10x)."""
        if batch_size < self.min_batch:
            return True
        bucket = batch_bucket(batch_size)
        left = self.closed.get(bucket, 0)
        if left > 0:
            self.closed[bucket] = left - 1
            return False
        return True

    def record(self, batch_size: int, seconds: float, tokens: int, plain_seconds: float | None) -> None:
        """A drafted step of `batch_size` rows took `seconds` and emitted `tokens`; a plain step of
        that batch costs `plain_seconds` (None: not measured yet, nothing to compare with)."""
        if batch_size < self.min_batch:  # these batches always draft (`opens`): nothing to keep
            return
        bucket = batch_bucket(batch_size)
        mean, steps = self.per_token.get(bucket, (0.0, 0))
        value = seconds / max(tokens, 1)
        mean = value if steps == 0 else (1 - self.smoothing) * mean + self.smoothing * value
        self.per_token[bucket] = (mean, steps + 1)
        if plain_seconds is None or steps + 1 < self.evidence:
            return
        if mean > (1 + self.margin) * plain_seconds / batch_size:
            length = self.backoff.get(bucket, self.first_backoff)
            self.closed[bucket] = length
            self.backoff[bucket] = min(2 * length, self.max_backoff)
            self.per_token.pop(bucket)
            self.closings += 1
        else:
            self.backoff[bucket] = self.first_backoff


def monotone(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Pool-adjacent-violators: the closest non-decreasing sequence of (T, seconds) values."""
    blocks: list[list[float]] = []  # [sum, count, first index]
    for i, (_, value) in enumerate(points):
        blocks.append([value, 1.0, i])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count, _ = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    values: list[float] = []
    for total, count, _ in blocks:
        values.extend([total / count] * int(count))
    return [(t, v) for (t, _), v in zip(points, values)]


def path_probabilities(trie: DraftTrie, acceptance: AcceptanceModel) -> list[float]:
    """P(node on the accepted path) for every trie node, root = 1."""
    probs = [1.0] * len(trie)
    for i in range(1, len(trie)):
        probs[i] = probs[trie.parents[i]] * acceptance.rate(trie.keys[i])
    return probs


def choose(
    tries: list[DraftTrie], acceptance: AcceptanceModel, cost: CostCurve, max_nodes: int
) -> tuple[int, list[list[int]], float]:
    """Pick the tree size and nodes: returns (T, per-trie kept node indices with the root first
    in topological order, expected tokens emitted per sequence)."""
    ranked = []  # per trie: non-root nodes by descending path probability (parents before children)
    gains = []  # per trie: gains[n] = expected accepted drafts when keeping the best n nodes
    for trie in tries:
        probs = path_probabilities(trie, acceptance)
        order = sorted(range(1, len(trie)), key=lambda i: (-probs[i], i))
        ranked.append(order)
        running = [0.0]
        for i in order:
            running.append(running[-1] + probs[i])
        gains.append(running)

    batch = len(tries)
    largest = max(len(t) for t in tries)
    best_size, best_rate, best_tokens = 1, -1.0, 1.0
    for size in TREE_SIZES:
        if size > max_nodes or (size > largest and size != 1):
            break
        tokens = sum(1.0 + g[min(size - 1, len(g) - 1)] for g in gains)
        rate = tokens / cost.cost(batch, size)
        if rate > best_rate * SIZE_MARGIN:
            best_size, best_rate, best_tokens = size, rate, tokens / batch
    kept = [[0] + sorted(order[: best_size - 1]) for order in ranked]
    return best_size, kept, best_tokens
