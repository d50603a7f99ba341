"""At most one wait for the device per decode step (the loop's host.to_host), on the CPU.

No GPU runs here, so the test plays one: the model's outputs, and everything computed from them
(LM head, top-k, sampling, the ops' results), become `OnDevice` tensors, a CPU tensor subclass
that records every read of its values on the host (`.cpu()`, `.tolist()`, `.item()`, `.numpy()`,
`int()`, `float()`, `bool()`, `__index__`, numpy conversion, a copy into a host tensor). On a GPU each
such read is a synchronisation. The tokens and trees the loop builds on the host stay plain
tensors, as they would be. Each step may then make one read only, through `host.to_host` (one
wait on CUDA, however many tensors it carries). The GPU half, on real syncs, is in test_gpu.py.
"""

from __future__ import annotations

import traceback

import pytest
import torch

import test_model_types
import treedec
from helpers import on_prefill_done
from test_decoding import left_padded, repetitive_prompt
from treedec import host, profiling
from treedec.adapters import ModelAdapter
from treedec.attention import TreeStep
from treedec.ops import registry
from treedec.tools.models import tiny_llama

Tensor = torch.Tensor
HOST_READS = {Tensor.cpu: "cpu", Tensor.tolist: "tolist", Tensor.item: "item", Tensor.numpy: "numpy",
              Tensor.__int__: "int", Tensor.__float__: "float", Tensor.__bool__: "bool", Tensor.__index__: "index",
              Tensor.__array__: "array"}
HOST_WRITES = (Tensor.__setitem__, Tensor.copy_)


class OnDevice(Tensor):
    """A CPU tensor that stands for one on a GPU: host reads of its values are recorded in
    `reads` as (what, file:line of the caller)."""

    reads: list[tuple[str, str]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS:
            OnDevice.reads.append((HOST_READS[func], caller()))
            with torch._C.DisableTorchFunctionSubclass():
                result = func(*args, **kwargs)
            return result.as_subclass(Tensor) if isinstance(result, Tensor) else result
        if func in HOST_WRITES and type(args[0]) is not OnDevice and any(type(a) is OnDevice for a in args[1:]):
            OnDevice.reads.append(("copy to a host tensor", caller()))
        return super().__torch_function__(func, types, args, kwargs)


def caller() -> str:
    """file:line of the treedec code that made the read."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/treedec/" in frame.filename:
            return f"{frame.filename.split('/treedec/')[-1]}:{frame.lineno}"
    return "?"


def retyped(value, cls):
    """Tensors in `value` (one, or a list/tuple of them) as `cls`, sharing their storage."""
    if isinstance(value, Tensor):
        return value.as_subclass(cls)
    if isinstance(value, (list, tuple)):
        return type(value)(retyped(v, cls) for v in value)
    return value


def plain(value):
    return retyped(value, Tensor)


def on_device(value):
    return retyped(value, OnDevice)


def adapter_classes(cls=ModelAdapter):
    yield cls
    for sub in cls.__subclasses__():
        yield from adapter_classes(sub)


@pytest.fixture
def device_reads(monkeypatch):
    """Makes the model's outputs OnDevice and returns the recorded host reads per decode step:
    a list (the prefill's, which emits the first token, then one entry per step) of lists of
    (what, where)."""
    OnDevice.reads = []
    for cls in set(adapter_classes()):
        for name in ("forward", "forward_from"):
            if name in vars(cls):
                original = vars(cls)[name]
                monkeypatch.setattr(cls, name, lambda self, *a, _original=original, **k: on_device(
                    _original(self, *a, **k)))
    new_cache = ModelAdapter.new_cache

    def cache_on_device(self, *args, **kwargs):  # the KV buffers live on the device; the lengths on the host
        cache = new_cache(self, *args, **kwargs)
        cache.keys, cache.values = on_device(cache.keys), on_device(cache.values)
        return cache

    monkeypatch.setattr(ModelAdapter, "new_cache", cache_on_device)

    def step_on(self, device):  # the step's copy "on the device": host reads of it count too
        if "sim" not in self._per_device:
            self._per_device["sim"] = TreeStep(
                on_device(self.prefix_len), on_device(self.kv_start), on_device(self.tree_mask),
                None if self.cache_rows is None else on_device(self.cache_rows), self.profile, self)
        return self._per_device["sim"]

    monkeypatch.setattr(TreeStep, "on", step_on)
    run = registry.Op.run  # an op on device tensors gives device tensors (the kernels take plain ones)

    def run_on_device(self, backend, *args):
        device = any(isinstance(a, OnDevice) or (isinstance(a, (list, tuple)) and any(isinstance(v, OnDevice) for v in a))
                     for a in args)
        return on_device(run(self, backend, *plain(args))) if device else run(self, backend, *args)

    monkeypatch.setattr(registry.Op, "run", run_on_device)
    to_host = host.to_host

    def counted_to_host(*tensors):
        OnDevice.reads.append(("to_host", caller()))
        return to_host(*plain(tensors))

    monkeypatch.setattr(host, "to_host", counted_to_host)
    boundaries = []
    monkeypatch.setattr(profiling.NoProfile, "step_done", lambda self, seconds: boundaries.append(len(OnDevice.reads)))
    on_prefill_done(monkeypatch, lambda: boundaries.append(len(OnDevice.reads)))

    def per_step():
        starts = [0] + boundaries[:-1]
        tail = OnDevice.reads[boundaries[-1]:] if boundaries else OnDevice.reads
        assert not tail, f"host reads after the last step: {tail}"
        return [OnDevice.reads[a:b] for a, b in zip(starts, boundaries)]

    return per_step


def assert_one_wait_per_step(steps):
    assert steps, "no decode step ran"
    for number, reads in enumerate(steps):
        assert [what for what, _ in reads] == ["to_host"], f"step {number}: {reads}"


CALLS = {
    "greedy": dict(do_sample=False),
    "sample top_k=50": dict(do_sample=True, temperature=0.8),
    "sample full logits": dict(do_sample=True, top_k=0, top_p=0.9),
}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("drafter", [None, "lookup", "recycling", "auto"])
def test_one_host_wait_per_step(device_reads, flat_step_costs, drafter, call):
    model = treedec.patch(tiny_llama(seed=1), drafter=drafter)
    ids, mask = left_padded([repetitive_prompt(1, 13), repetitive_prompt(2, 6), [7]])
    torch.manual_seed(0)
    model.generate(ids, attention_mask=mask, max_new_tokens=24, **CALLS[call])
    steps = device_reads()
    assert len(steps) == model.treedec.last_stats["steps"] + 1  # the prefill, then the steps
    if drafter is not None:  # the steps verified trees, not one node each
        assert model.treedec.last_stats["mean_tree_nodes"] > 1
    assert_one_wait_per_step(steps)


@pytest.mark.parametrize("call", ["greedy", "sample top_k=50"])
@pytest.mark.parametrize("model_type", sorted(test_model_types.CONFIGS))
def test_one_host_wait_per_step_on_every_model_type(device_reads, flat_step_costs, model_type, call):
    """Soft-capped logits (Gemma 2/3: the fused top-k's tie flag rides with the ids), sliding
    windows' reference attention (its mask's length is read on the host), MoE layers."""
    model = treedec.patch(test_model_types.build(model_type), drafter="auto")
    ids, mask = left_padded(test_model_types.prompts(3))
    torch.manual_seed(0)
    model.generate(ids, attention_mask=mask, max_new_tokens=16, **CALLS[call])
    assert_one_wait_per_step(device_reads())


def test_spy_sees_a_stray_read(device_reads, monkeypatch):
    """The harness fails a loop that reads the device twice a step: one `bool()` added to the
    LM head's top-k shows up in every step (the fixture's device reads are real enough to fail)."""
    from treedec.adapters import base

    fused_topk = base.ModelAdapter.fused_topk

    def with_stray_read(self, hidden, k):
        values, ids, tie = fused_topk(self, hidden, k)
        bool((values > 0).any())
        return values, ids, tie

    monkeypatch.setattr(base.ModelAdapter, "fused_topk", with_stray_read)
    model = treedec.patch(tiny_llama(seed=1), drafter="auto")
    model.generate(torch.tensor([repetitive_prompt(3, 12)]), max_new_tokens=8, do_sample=False)
    steps = device_reads()
    assert steps and all(sorted(w for w, _ in reads) == ["bool", "to_host"] for reads in steps)
    with pytest.raises(AssertionError, match="bool"):
        assert_one_wait_per_step(steps)


@pytest.mark.parametrize("top_k", [0, 50])
def test_sampling_checks_still_fail_loudly(top_k):
    """The checks on the sampling distributions now reach the host with the step's tokens; NaN
    logits (an LM head of NaN) still stop the call with the op's ValueError, on the full-logits
    path and on the fused top-k one."""
    model = tiny_llama(seed=1)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    treedec.patch(model, drafter="auto")
    with pytest.raises(ValueError, match="NaN or inf"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=True, top_k=top_k)


def test_to_host_on_the_cpu_returns_the_tensors():
    a, b = torch.arange(5), torch.rand(2, 3)
    out = host.to_host(a, b)
    assert len(out) == 2 and torch.equal(out[0], a) and torch.equal(out[1], b)
