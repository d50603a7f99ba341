"""ops.draft_heads_topk against the reference (and the heads module), CPU backends.

The Triton backend joins them on CPU tensors when the run sets TRITON_INTERPRET=1 (its own tests,
interpreter and GPU, are in test_triton.py)."""

import os

import pytest
import torch

from treedec import _native, ops, reference
from treedec.heads import HeadsConfig, build_heads
from treedec.ops.heads import DRAFT_HEADS_TOPK

BACKENDS = ["reference"] + (["cpp"] if _native.cpp() is not None else [])
if os.environ.get("TRITON_INTERPRET") == "1" and DRAFT_HEADS_TOPK.implements("triton"):
    BACKENDS.append("triton")


def inputs(rows, heads, blocks, width, vocab, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=generator).to(dtype)
    weights = (torch.randn(heads, blocks, width, width, generator=generator) / width**0.5).to(dtype)
    biases = (torch.randn(heads, blocks, width, generator=generator) * 0.1).to(dtype)
    lm_weight = (torch.randn(vocab, width, generator=generator) / width**0.5).to(dtype)
    return hidden, weights, biases, lm_weight


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows,heads,blocks,width,vocab,k", [(1, 1, 1, 8, 5, 1), (3, 4, 1, 33, 1000, 8),
                                                             (7, 2, 2, 64, 257, 3), (16, 5, 1, 17, 49, 49)])
def test_fp32_matches_reference(backend, rows, heads, blocks, width, vocab, k, monkeypatch):
    monkeypatch.setenv("TREEDEC_BACKEND", backend)
    args = inputs(rows, heads, blocks, width, vocab, torch.float32, seed=rows + vocab)
    values, ids, states = ops.draft_heads_topk(*args, k)
    want_values, want_ids, want_states = reference.draft_heads_topk(*args, k)
    assert values.shape == (rows, heads, k) and ids.dtype == torch.int64 and states.shape == (rows, heads, width)
    torch.testing.assert_close(states, want_states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values, want_values, atol=1e-4, rtol=1e-4)
    gaps = (want_values[..., :-1] - want_values[..., 1:]).abs()
    if k == 1 or bool((gaps > 1e-3).all()):  # ids agree wherever no two logits nearly tie
        assert torch.equal(ids, want_ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_runs_and_ranks_like_the_reference(backend, monkeypatch):
    monkeypatch.setenv("TREEDEC_BACKEND", backend)
    args = inputs(5, 3, 1, 64, 300, torch.bfloat16, seed=3)
    values, ids, _ = ops.draft_heads_topk(*args, 4)
    want_values, _, _ = reference.draft_heads_topk(*args, 4)
    torch.testing.assert_close(values, want_values, atol=0.1, rtol=0.02)
    assert ids.min() >= 0 and ids.max() < 300


def test_medusa_heads_module_agrees():
    heads = build_heads(HeadsConfig("medusa", 3, 16, 40, num_blocks=2))
    with torch.no_grad():
        for parameter in heads.parameters():
            parameter.normal_(0, 0.2)
    weights, biases = heads.stacked()
    hidden = torch.randn(4, 16)
    lm_weight = torch.randn(40, 16)
    _, ids, states = ops.draft_heads_topk(hidden, weights, biases, lm_weight, 2)
    torch.testing.assert_close(states, heads.states(hidden), atol=1e-5, rtol=1e-5)
    assert torch.equal(ids[..., 0], (heads.states(hidden) @ lm_weight.T).argmax(-1))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: (a[0].double(), *a[1:]), "dtype"),
        (lambda a: (a[0], a[1][:, :, :, :5], *a[2:]), "weights has shape"),
        (lambda a: (a[0], a[1], a[2][:1], a[3]), "biases has shape"),
        (lambda a: (a[0], a[1].bfloat16(), a[2], a[3]), "must be"),
        (lambda a: (a[0], a[1], a[2], a[3][:, :3]), "width"),
    ],
)
def test_malformed_input_raises(change, message):
    args = change(inputs(2, 2, 1, 8, 20, torch.float32, seed=1))
    with pytest.raises(ValueError, match=message):
        ops.draft_heads_topk(*args, 2)
    with pytest.raises(ValueError, match="k = 21"):
        ops.draft_heads_topk(*inputs(2, 2, 1, 8, 20, torch.float32, seed=1), 21)
