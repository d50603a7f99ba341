"""Where a decode step's time goes: an opt-in per-phase profile of the loop (`profile=True`).

The loop wraps each phase of a step in `profile.phase(name)`; with profiling off that is a shared
no-op context (a few hundred nanoseconds a phase), so the default loop pays nothing measurable.
With it on, each phase's wall time is summed over the call's steps and lands in
`model.treedec.last_stats["profile"]`, and `treedec bench e2e --profile` tabulates and plots it.

On a GPU a phase's kernels run asynchronously, so the profile synchronises the device at the end
of every phase: each phase is charged its own device work and the host's waits for it, at the
cost of the overlap an unprofiled step has. Profile to see where time goes, not to time the loop.
"""

from __future__ import annotations

import contextlib
import time

import torch

# In the order a step runs them. A phase timed inside another is charged to itself only (attention
# inside the verify forward, whose own time is then forward_other: projections, MLP, norms, rotary
# embedding; the LM head inside sampling). The drafter's own forwards count as drafting. `host` is
# what no phase covers: emitting tokens, stopping checks, the loop itself.
PHASES = (
    "drafting",      # drafter.propose (its model runs included, for layerskip and the heads)
    "tree_build",    # sizing.choose, packing the kept nodes, the ancestor mask, positions
    "attention",     # tree attention in every layer of the verify forward
    "forward_other", # the rest of the verify forward
    "lm_head",       # the LM head's top-k (greedy) or logits (sampling)
    "sampling",      # the nodes' sampling distributions and draws (sampling only)
    "verify",        # the accepted path and the bonus token
    "compaction",    # KV compaction and dropping finished rows
    "learning",      # the acceptance model's update and drafter.observe
    "host",          # the step's time outside every phase above
)

_NO_PHASE = contextlib.nullcontext()


class NoProfile:
    """The default: phases cost one shared no-op context."""

    enabled = False

    def phase(self, name: str):
        return _NO_PHASE

    def step_done(self, seconds: float) -> None:
        pass

    def as_dict(self) -> dict | None:
        return None


class StepProfile:
    """Sums each phase's wall time over a generate call's steps."""

    enabled = True

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.seconds = dict.fromkeys(PHASES, 0.0)  # each phase's own time, nested phases' excluded
        self._nested: list[float] = []  # per open phase: seconds of the phases timed inside it
        self.step_seconds = 0.0
        self.steps = 0

    @contextlib.contextmanager
    def phase(self, name: str):
        if name not in self.seconds:
            raise ValueError(f"unknown profile phase {name!r}; phases: {', '.join(PHASES)}")
        self._synchronize()
        started = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            self._synchronize()
            elapsed = time.perf_counter() - started
            self.seconds[name] += elapsed - self._nested.pop()
            if self._nested:
                self._nested[-1] += elapsed

    def _synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def step_done(self, seconds: float) -> None:
        """A step of `seconds` wall time ended; what its phases did not cover is `host`."""
        self.steps += 1
        self.step_seconds += seconds

    def as_dict(self) -> dict:
        """{"steps", "step_seconds", "seconds": {phase: seconds summed over steps}}."""
        seconds = dict(self.seconds)
        covered = sum(v for k, v in seconds.items() if k != "host")
        seconds["host"] = max(self.step_seconds - covered, 0.0)
        return {"steps": self.steps, "step_seconds": self.step_seconds, "seconds": seconds}


def new_profile(enabled: bool, device: torch.device) -> NoProfile | StepProfile:
    return StepProfile(device) if enabled else NoProfile()


def merge(profiles: list[dict]) -> dict:
    """Sum of several calls' profiles (as_dict outputs); empty ones (None) are skipped."""
    total = {"steps": 0, "step_seconds": 0.0, "seconds": dict.fromkeys(PHASES, 0.0)}
    for profile in profiles:
        if not profile:
            continue
        total["steps"] += profile["steps"]
        total["step_seconds"] += profile["step_seconds"]
        for phase, seconds in profile["seconds"].items():
            total["seconds"][phase] += seconds
    return total


def per_step_ms(profile: dict) -> dict[str, float]:
    """Each phase's mean milliseconds per step."""
    steps = max(profile["steps"], 1)
    return {phase: 1000 * seconds / steps for phase, seconds in profile["seconds"].items()}


def step_ms(profile: dict) -> float:
    """The mean milliseconds of a whole step (what the phases of per_step_ms add up to)."""
    return 1000 * profile["step_seconds"] / max(profile["steps"], 1)
