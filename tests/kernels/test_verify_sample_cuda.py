"""treedec._cuda.sample_tokens (csrc/cuda/sample_tokens.cu), and ops.verify_sample on CUDA
tensors, against treedec.reference on the CPU.

GPU only: skipped without a CUDA device or without the built extension. The kernel sums in a
different order than torch.cumsum, so a token may differ only where the threshold falls within
rounding of a CDF step: never on these inputs in practice, so equality is asserted.
"""

import pytest
import torch

from treedec import ops, reference
from helpers import make_parents  # noqa: E402

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
try:
    from treedec import _cuda
except ImportError as error:  # pragma: no cover - depends on the build
    pytest.skip(f"treedec._cuda is not built ({error})", allow_module_level=True)


def top_k_rows(rows: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Unnormalised rows with exact zeros (never all zero)."""
    probs = torch.rand(rows, vocab, generator=generator) ** 3
    probs = torch.where(torch.rand(rows, vocab, generator=generator) < 0.6, probs, 0.0)
    probs[:, vocab // 2] += 1e-3
    return probs * 7.0


def cuda_sample_tokens(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    rows, vocab = probs.shape
    probs, uniforms = probs.cuda().contiguous(), uniforms.cuda().contiguous()
    tokens = torch.full((rows,), -7, dtype=torch.int64, device="cuda")
    _cuda.sample_tokens(probs.data_ptr(), uniforms.data_ptr(), tokens.data_ptr(), rows, vocab,
                        torch.cuda.current_stream().cuda_stream)  # fmt: skip
    torch.cuda.synchronize()
    return tokens.cpu()


@pytest.mark.parametrize("rows", (1, 7, 512))
@pytest.mark.parametrize("vocab", (1, 5, 97, 1000, 1023, 1025, 49152, 151936))
def test_sample_tokens_matches_reference(rows, vocab):
    generator = torch.Generator().manual_seed(rows * 7 + vocab)
    probs = top_k_rows(rows, vocab, generator)
    uniforms = torch.rand(rows, generator=generator)
    uniforms[0] = 0.0
    uniforms[-1] = 1.0 - 2.0**-24
    assert torch.equal(cuda_sample_tokens(probs, uniforms), reference.sample_tokens(probs, uniforms))


def test_sample_tokens_fallback():
    """uniform 1.0 (unchecked call): no running sum exceeds the total, so the last positive
    weight, or V - 1 for a row without one."""
    probs = torch.zeros(3, 3000)
    probs[0, [5, 2999 - 7]] = 0.5
    probs[2, 0] = 1.0
    assert cuda_sample_tokens(probs, torch.ones(3)).tolist() == [2992, 2999, 0]


@pytest.mark.parametrize("batch", (1, 3, 5))
@pytest.mark.parametrize("num_nodes", (1, 2, 7, 33, 100))
@pytest.mark.parametrize("vocab", (5, 1000))
@pytest.mark.parametrize("shape", ("chain", "star", "random"))
def test_verify_sample_matches_reference(monkeypatch, batch, num_nodes, vocab, shape):
    monkeypatch.setenv("TREEDEC_BACKEND", "cuda")
    generator = torch.Generator().manual_seed(batch * 100000 + num_nodes * 1000 + vocab)
    parents = make_parents(batch, num_nodes, shape, generator)
    probs = top_k_rows(batch * num_nodes, vocab, generator).view(batch, num_nodes, vocab)
    tokens = torch.randint(0, 3, (batch, num_nodes), generator=generator)
    tokens[torch.rand(batch, num_nodes, generator=generator) < 0.1] = -1
    uniforms = torch.rand(batch, num_nodes, generator=generator)
    expected = reference.verify_sample(parents, tokens, probs, uniforms)
    got = ops.verify_sample(parents.cuda(), tokens.cuda(), probs.cuda(), uniforms.cuda())
    for a, b in zip(got, expected):
        assert a.is_cuda and torch.equal(a.cpu(), b)
