"""ops.linear_rows (C++): a linear layer for a few rows, against torch's nn.Linear."""

import pytest
import torch

from treedec import _native, layers, ops, reference

pytestmark = pytest.mark.skipif(_native.cpp() is None, reason="treedec._C is not built")


def isas(bf16: bool) -> list[str]:
    return list(_native.require_cpp().supported_isas(bf16))


def check_linear(x, weight, bias, got):
    """fp32: the float64 product to float32 rounding over H terms; bf16: one bf16 step of the result
    (both round float32 sums to bf16, and a sum near a rounding boundary may go either way)."""
    exact = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    assert got.dtype == x.dtype and got.shape == exact.shape
    scale = (x.double().abs() @ weight.double().abs().T).clamp(min=1e-30)
    if x.dtype == torch.float32:
        assert torch.all((got.double() - exact).abs() <= 1e-5 * scale + 1e-6)
    else:
        tolerance = 2**-7 * exact.abs() + 1e-2 * scale / x.shape[1] ** 0.5 + 1e-3
        assert torch.all((got.double() - exact).abs() <= tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, out, width", [(1, 1, 1), (2, 5, 7), (3, 192, 576), (7, 17, 33), (16, 1536, 576),
                                              (33, 40, 100), (6, 576, 1536)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_rows_matches_reference(dtype, rows, out, width, with_bias, monkeypatch):
    generator = torch.Generator().manual_seed(rows * 1000 + out + width)
    x = torch.randn(rows, width, generator=generator).to(dtype)
    weight = (torch.randn(out, width, generator=generator) / width**0.5).to(dtype)
    bias = torch.randn(out, generator=generator).to(dtype) if with_bias else None
    for isa in isas(dtype == torch.bfloat16):
        monkeypatch.setenv("TREEDEC_CPU_ISA", isa)
        for threads in ("1", "2", "5"):
            monkeypatch.setenv("TREEDEC_CPU_THREADS", threads)
            check_linear(x, weight, bias, ops.linear_rows(x, weight, bias))


def test_linear_rows_strided_inputs_nan_and_empty():
    generator = torch.Generator().manual_seed(3)
    wide = torch.randn(50, 70, generator=generator)
    weight = wide[:, 5:65]  # rows of a wider buffer
    x = torch.randn(4, 120, generator=generator)[:, ::2]  # a column stride: copied first
    check_linear(x, weight, None, ops.linear_rows(x, weight))
    x = torch.randn(8, 60, generator=generator)[::2]  # a row stride
    check_linear(x, weight, None, ops.linear_rows(x, weight))
    poisoned = x.clone()
    poisoned[1, 0] = float("nan")
    got = ops.linear_rows(poisoned, weight.contiguous())
    assert torch.isnan(got[1]).all() and not torch.isnan(got[[0, 2, 3]]).any()
    assert ops.linear_rows(torch.zeros(0, 60), weight.contiguous()).shape == (0, 50)


@pytest.mark.parametrize("args, message", [
    ((torch.randn(2, 3), torch.randn(4, 5)), "width"),
    ((torch.randn(2, 3), torch.randn(4, 3).bfloat16()), "dtype|bfloat16"),
    ((torch.randn(2, 3), torch.randn(4, 3), torch.randn(5)), "bias"),
    ((torch.randn(2, 3).half(), torch.randn(4, 3).half()), "dtype|float16"),
    ((torch.randn(2, 3, 1), torch.randn(4, 3)), "dim|shape"),
])
def test_linear_rows_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        ops.linear_rows(*args)


def test_reference_backend_is_nn_linear(monkeypatch):
    monkeypatch.setenv("TREEDEC_BACKEND", "reference")
    x, weight, bias = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    assert torch.equal(ops.linear_rows(x, weight, bias), reference.linear_rows(x, weight, bias))


def test_routing_is_scoped_and_only_for_few_rows(monkeypatch):
    """Inside `routed` a plain nn.Linear takes the kernel for at most MAX_ROWS rows (and torch
    for more, or with autograd on); outside it, and for wrapped modules, nothing changes."""
    calls = []
    real = ops.loop_linear_rows
    monkeypatch.setattr(ops, "loop_linear_rows",
                        lambda device: lambda *a: calls.append(a[0].shape[0]) or real(device)(*a))
    stack = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4, bias=False))
    hooked = torch.nn.Linear(4, 4)
    hooked.forward = lambda x: x  # something else owns this module's forward
    stack.append(hooked)
    modules = layers.routable_linears(stack)
    assert modules == [stack[0], stack[2]]
    x = torch.randn(2, 3, 8)
    want = stack(x)
    with torch.inference_mode(), layers.routed(modules):
        torch.testing.assert_close(stack(x), want, rtol=1e-5, atol=1e-6)
        assert calls == [6, 6]
        stack(torch.randn(layers.MAX_ROWS + 1, 8))
        assert calls == [6, 6]
    with layers.routed(modules):
        stack(x)  # autograd is on: torch's layer
    assert calls == [6, 6] and "forward" not in stack[0].__dict__
    stack(x)
    assert calls == [6, 6]


def test_decode_loop_routes_projections_unless_turned_off(monkeypatch):
    import treedec
    from treedec.tools.models import tiny_llama

    calls = []
    real = ops.loop_linear_rows
    monkeypatch.setattr(ops, "loop_linear_rows", lambda device: lambda *a: calls.append(1) or real(device)(*a))
    model = tiny_llama(seed=1)
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5]])
    want = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert not calls  # HF's own generate never uses it
    for cpu_linear, routed in ((True, True), (False, False)):
        calls.clear()
        treedec.patch(model, drafter="auto", cpu_linear=cpu_linear)
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), want)
        assert bool(calls) == routed
        assert all("forward" not in m.__dict__ for m in model.modules())  # restored after the call
    with pytest.raises(ValueError, match="cpu_linear"):
        treedec.patch(model, cpu_linear="yes")


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_the_loops_unchecked_linear_rows_is_the_ops_own(backend, monkeypatch):
    """ops.loop_linear_rows: what ops.linear_rows runs under TREEDEC_BACKEND, same results."""
    monkeypatch.setenv("TREEDEC_BACKEND", backend)
    run = ops.loop_linear_rows(torch.device("cpu"))
    generator = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 37, generator=generator).to(dtype)
        weight = torch.randn(11, 37, generator=generator).to(dtype)
        bias = torch.randn(11, generator=generator).to(dtype)
        torch.testing.assert_close(run(x, weight, bias), ops.linear_rows(x, weight, bias), rtol=0, atol=0)
        torch.testing.assert_close(run(x, weight), ops.linear_rows(x, weight), rtol=0, atol=0)
    if backend == "reference" or not ops.available_backends()["cpp"]:
        assert run is reference.linear_rows
