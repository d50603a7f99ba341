"""ops.gather_rows / ops.scatter_rows (layer-skip batching) on every CPU backend, against torch."""

import pytest
import torch

from treedec import _native, ops

BACKENDS = ["reference"] + (["cpp"] if _native.cpp() is not None else [])


def random_index(batch: int, count: int, seed: int, distinct: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if distinct:
        return torch.randperm(batch, generator=generator)[:count]
    return torch.randint(0, batch, (count,), generator=generator)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 2, 33), (17, 1, 576), (64, 3, 5, 2)])
@pytest.mark.parametrize("active", ["random", "all", "none", "one"])
def test_gather_then_scatter_match_torch(backend, dtype, shape, active, monkeypatch):
    monkeypatch.setenv("TREEDEC_BACKEND", backend)
    batch = shape[0]
    x = (torch.randn(shape) * 100).to(dtype)
    count = {"random": max(1, batch // 2), "all": batch, "none": 0, "one": 1}[active]
    index = random_index(batch, count, seed=batch + count, distinct=True)
    block = ops.gather_rows(x, index)
    assert block.shape == (count, *shape[1:]) and block.dtype == dtype and block.is_contiguous()
    assert torch.equal(block, x[index])
    update = (torch.randn(block.shape) * 100).to(dtype)
    expected = x.clone()
    expected[index] = update
    ops.scatter_rows(x, index, update)
    assert torch.equal(x, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_allows_repeats_and_strided_inputs(backend, monkeypatch):
    monkeypatch.setenv("TREEDEC_BACKEND", backend)
    x = torch.randn(9, 4, 6)
    index = torch.tensor([3, 3, 0, 8, 3])
    assert torch.equal(ops.gather_rows(x, index), x[index])
    strided = x[:, :, ::2]  # rows not contiguous: still right
    assert torch.equal(ops.gather_rows(strided, index), strided[index])
    transposed = x.transpose(1, 2)
    assert torch.equal(ops.gather_rows(transposed, index), transposed[index])


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_threads_on_large_rows(backend, monkeypatch):
    monkeypatch.setenv("TREEDEC_BACKEND", backend)
    monkeypatch.setenv("TREEDEC_CPU_THREADS", "3")
    x = torch.randn(40, 64, 1024)  # 10 MB: the C++ kernel copies with several threads
    index = random_index(40, 23, seed=1, distinct=True)
    assert torch.equal(ops.gather_rows(x, index), x[index])
    block = torch.randn(23, 64, 1024)
    expected = x.clone()
    expected[index] = block
    ops.scatter_rows(x, index, block)
    assert torch.equal(x, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "call,message",
    [
        (lambda x: ops.gather_rows(x, torch.tensor([0, 5])), r"index must lie in \[0, 5\)"),
        (lambda x: ops.gather_rows(x, torch.tensor([-1])), "index must lie"),
        (lambda x: ops.gather_rows(x, torch.tensor([0], dtype=torch.int32)), "dtype int32"),
        (lambda x: ops.gather_rows(x, torch.tensor([[0]])), "1 dimensions"),
        (lambda x: ops.scatter_rows(x, torch.tensor([1, 1]), torch.zeros(2, 3)), "distinct"),
        (lambda x: ops.scatter_rows(x, torch.tensor([1]), torch.zeros(1, 4)), "shape"),
        (lambda x: ops.scatter_rows(x, torch.tensor([1]), torch.zeros(1, 3, dtype=torch.float64)), "float64"),
        (lambda x: ops.scatter_rows(x.T.contiguous().T, torch.tensor([1]), torch.zeros(1, 3)), "contiguous"),
        (lambda x: ops.gather_rows(x[0, 0], torch.tensor([0])), "leading batch"),
    ],
)
def test_malformed_input_raises(backend, call, message, monkeypatch):
    monkeypatch.setenv("TREEDEC_BACKEND", backend)
    x = torch.randn(5, 3)
    before = x.clone()
    with pytest.raises(ValueError, match=message):
        call(x)
    assert torch.equal(x, before)  # nothing written


@pytest.mark.skipif(_native.cpp() is None, reason="treedec._C is not built")
def test_cpp_kernel_checks_indices_itself():
    """The kernel refuses bad indices even when called past the public checks."""
    from treedec.ops import _cpp

    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="kernel check"):
        _cpp.gather_rows(x, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="kernel check"):
        _cpp.scatter_rows(x, torch.tensor([2, 2]), torch.zeros(2, 3))
    before = x.clone()
    with pytest.raises(ValueError, match="kernel check"):
        _cpp.scatter_rows(x, torch.tensor([1, 7]), torch.zeros(2, 3))
    assert torch.equal(x, before)
