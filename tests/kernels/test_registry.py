"""The op registry (treedec/ops/registry.py): every op declared once and registered as a custom op
with a fake; one decision per (op, device, arguments); every fallback logged and counted."""

import logging

import pytest
import torch

from treedec import ops, reference
from treedec.ops import registry
from treedec.ops.lm_head import LM_HEAD_TOPK
from treedec.ops.registry import Op, Rule

CPU = torch.device("cpu")


def example_arguments() -> dict[str, tuple]:
    """Small valid arguments for every op (without the backend), to run each custom op once."""
    generator = torch.Generator().manual_seed(3)
    parents = torch.tensor([[-1, 0, 0, 1, 1]], dtype=torch.int32)
    _, tree_mask = reference.build_tree(parents)
    hidden, weight = torch.randn(3, 16, generator=generator), torch.randn(40, 16, generator=generator)
    probs = torch.softmax(torch.randn(4, 9, generator=generator), -1)
    return {
        "tree_attention": (torch.randn(1, 2, 5, 8, generator=generator), torch.randn(1, 1, 9, 8, generator=generator),
                           torch.randn(1, 1, 9, 8, generator=generator), torch.tensor([3], dtype=torch.int32),
                           tree_mask, None, None, 4, 0.5),  # a window of 4 and a soft-cap of 0.5
        "compact_kv": ([torch.randn(1, 2, 9, 8, generator=generator) for _ in range(2)],
                       torch.tensor([3], dtype=torch.int32), torch.tensor([[0, 1, 3, -1, -1]], dtype=torch.int32)),
        "lm_head_topk": (hidden, weight, 4),
        "draft_heads_topk": (hidden, torch.randn(2, 1, 16, 16, generator=generator) * 0.1,
                             torch.zeros(2, 1, 16), weight, 3),
        "linear_rows": (hidden, torch.randn(7, 16, generator=generator), torch.randn(7, generator=generator)),
        "gather_rows": (hidden, torch.tensor([2, 0, 2])),
        "scatter_rows": (hidden.clone(), torch.tensor([1, 2]), torch.randn(2, 16, generator=generator)),
        "sample_tokens": (probs, torch.rand(4, generator=generator)),
        "build_tree": (parents,),
        "verify_greedy": (parents, torch.tensor([[5, 1, 2, 3, 4]]), torch.tensor([[1, 3, 9, 7, 0]])),
    }


def test_every_op_is_declared_once_and_every_example_covers_it():
    assert set(ops.OPS) == set(example_arguments())
    with pytest.raises(ValueError, match="declared twice"):
        Op("build_tree", "(Tensor parents, str backend) -> (Tensor, Tensor)", reference.build_tree, lambda p: p)


@pytest.mark.parametrize("name", sorted(example_arguments()))
def test_each_op_is_a_custom_op_with_a_fake_that_matches_every_backend(name):
    """opcheck runs the op eagerly, under the fake (shapes and dtypes only) and through the
    dispatcher's schema checks (mutations declared, no aliasing), for each backend on the CPU."""
    op = ops.OPS[name]
    assert hasattr(torch.ops.treedec, name)
    arguments = example_arguments()[name]
    for backend in ["reference"] + [b for b in ("cpp",) if registry.built(b) and op.implements(b)]:
        copy = tuple([t.clone() for t in a] if isinstance(a, list) else a.clone() if isinstance(a, torch.Tensor)
                     else a for a in arguments)
        torch.library.opcheck(getattr(torch.ops.treedec, name).default, (*copy, backend))


def test_auto_decisions_on_the_cpu(monkeypatch):
    monkeypatch.setenv("TREEDEC_BACKEND", "auto")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpp = registry.built("cpp")
    for name, op in ops.OPS.items():
        expected = "cpp" if cpp and op.implements("cpp") else "reference"
        assert op.backend(CPU) == expected, name
    assert ops.OPS["tree_attention"].backend(CPU) == "reference"  # no C++ attention kernel


@pytest.mark.skipif(not registry.built("cpp"), reason="the C++ extension is not built")
def test_a_declined_argument_goes_to_the_reference_logged_and_counted(caplog):
    hidden, weight = torch.randn(3, 16, dtype=torch.float16), torch.randn(40, 16, dtype=torch.float16)
    ops.reset_fallbacks()
    with caplog.at_level(logging.INFO, logger="treedec.ops"):
        assert LM_HEAD_TOPK.backend(CPU, hidden, weight, 4) == "reference"
        values, ids = ops.lm_head_topk(hidden, weight, 4)
        ops.lm_head_topk(hidden, weight, 4)
    key = ("lm_head_topk", "cpp", "no C++ kernel for torch.float16")
    assert ops.fallbacks()[key] == 3
    assert [r.getMessage() for r in caplog.records].count(
        "treedec.ops.lm_head_topk: cpp passed over for the reference: no C++ kernel for torch.float16") == 1
    expected_values, expected_ids = reference.lm_head_topk(hidden, weight, 4)
    assert torch.equal(ids, expected_ids) and torch.equal(values, expected_values)
    assert LM_HEAD_TOPK.backend(CPU, hidden.float(), weight.float(), 4) == "cpp"  # fp32 takes the kernel
    ops.reset_fallbacks()
    assert ops.fallbacks() == {}


@pytest.mark.skipif(not registry.built("cpp"), reason="the C++ extension is not built")
def test_strided_cache_rows_are_a_recorded_decision_not_a_silent_one():
    caches = [torch.randn(1, 2, 8, 9).transpose(2, 3) for _ in range(2)]  # [B, H, S, D], rows strided
    expected = [c.clone() for c in caches]
    prefix_len, accept_nodes = torch.tensor([3], dtype=torch.int32), torch.tensor([[0, 2, -1]], dtype=torch.int32)
    ops.reset_fallbacks()
    ops.compact_kv(caches, prefix_len, accept_nodes)
    reference.compact_kv(expected, prefix_len, accept_nodes)
    assert all(torch.equal(a, b) for a, b in zip(caches, expected))
    assert ops.fallbacks() == {("compact_kv", "cpp", "a cache's rows are strided (the kernel copies whole rows)"): 1}


def test_avoids_apply_only_under_auto(monkeypatch):
    """An `avoids` rule (the kernel runs but loses) passes a backend over under auto; a forced
    backend runs anyway. A `declines` rule (the kernel cannot) applies either way."""
    avoided = Rule("always", lambda *args: "the test avoids it")
    declined = Rule("k > 2", lambda hidden, weight, k: "k > 2" if k > 2 else None)
    monkeypatch.setattr(LM_HEAD_TOPK, "avoids", {"cpp": [avoided]})
    monkeypatch.setattr(LM_HEAD_TOPK, "declines", {"cpp": [declined]})
    if not registry.built("cpp"):
        pytest.skip("the C++ extension is not built")
    hidden, weight = torch.randn(3, 16), torch.randn(40, 16)
    monkeypatch.setenv("TREEDEC_BACKEND", "auto")
    assert LM_HEAD_TOPK.backend(CPU, hidden, weight, 2) == "reference"
    assert LM_HEAD_TOPK.describe(CPU) == "cpp (reference for k > 2; always)"
    monkeypatch.setenv("TREEDEC_BACKEND", "cpp")
    assert LM_HEAD_TOPK.backend(CPU, hidden, weight, 2) == "cpp"
    assert LM_HEAD_TOPK.backend(CPU, hidden, weight, 3) == "reference"
    assert LM_HEAD_TOPK.describe(CPU) == "cpp (reference for k > 2)"


def test_forced_backends(monkeypatch):
    monkeypatch.setenv("TREEDEC_BACKEND", "reference")
    assert all(op.backend(CPU) == "reference" for op in ops.OPS.values())
    if not registry.built("cuda"):
        monkeypatch.setenv("TREEDEC_BACKEND", "cuda")
        with pytest.raises(RuntimeError, match="TREEDEC_BACKEND=cuda was requested but that backend is not built"):
            ops.OPS["build_tree"].backend(CPU)
    if registry.built("cpp"):  # a backend that is built but has no kernel for the op: the reference
        monkeypatch.setenv("TREEDEC_BACKEND", "cpp")
        assert ops.OPS["tree_attention"].backend(CPU) == "reference"
    monkeypatch.setenv("TREEDEC_BACKEND", "fastest")
    with pytest.raises(ValueError, match="'fastest' is not one of auto, reference, cpp, cuda, triton"):
        ops.OPS["build_tree"].backend(CPU)


def test_triton_runs_on_the_cpu_only_under_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not registry.runs_on("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert registry.runs_on("triton", CPU)
    assert registry.runs_on("cuda", torch.device("cuda")) and not registry.runs_on("cuda", CPU)
    assert registry.runs_on("cpp", CPU) and not registry.runs_on("cpp", torch.device("cuda"))


def test_an_op_needs_a_tensor_to_decide_its_device():
    with pytest.raises(ValueError, match="needs a tensor argument"):
        ops.OPS["lm_head_topk"](3, 4)


def test_unknown_backend_in_a_declaration():
    with pytest.raises(ValueError, match="unknown backend"):
        Op("not_an_op", "(Tensor x, str backend) -> Tensor", lambda x: x, lambda x: x, metal=lambda x: x)
    assert "not_an_op" not in ops.OPS
