"""The decode loop with the Triton kernels (tree attention, LM-head top-k) under the interpreter.

TRITON_INTERPRET=1 must be set before Triton's kernels are first imported; treedec imports them
lazily, on first use, so setting it at the top of this module is early enough.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import treedec  # noqa: E402
from test_decoding import left_padded, repetitive_prompt  # noqa: E402
from treedec import ops  # noqa: E402
from treedec.tools.models import tiny_llama  # noqa: E402


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("TREEDEC_BACKEND", "triton")
    if ops.choose_backend(torch.device("cpu"), "tree_attention") != "triton":
        pytest.skip("Triton kernels are not available in this install")
    yield


@pytest.mark.parametrize("drafter", ["auto", None])
def test_lossless_with_triton_attention_and_lm_head(triton_backend, drafter, monkeypatch):
    """Lossless, and the loop's per-layer attention calls skip the op's one value check (its read of
    prefix_len would make a GPU wait at every layer; the cache checks each step once)."""
    from treedec.ops import attention as attention_op

    checked = []
    real = attention_op._check_arguments
    monkeypatch.setattr(attention_op, "_check_arguments", lambda *args: checked.append(args[-1]) or real(*args))
    model = tiny_llama(seed=11)
    ids, mask = left_padded([repetitive_prompt(13, 7), repetitive_prompt(14, 15), [9, 4]])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    treedec.patch(model, drafter=drafter)
    assert ops.choose_backend(torch.device("cpu"), "lm_head_topk") == "triton"
    calls = []
    kernel = attention_op.TREE_ATTENTION.implementation("triton")
    monkeypatch.setitem(attention_op.TREE_ATTENTION.implementations, "triton",
                        lambda *args: calls.append(1) or kernel(*args))
    got = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    assert torch.equal(got, expected)
    assert calls and len(checked) == len(calls) and not any(checked)  # shapes checked, values never


@pytest.mark.parametrize("model_type", ["mistral", "gemma2"])
def test_sliding_window_and_softcap_layers_run_the_kernel_losslessly(triton_backend, model_type, monkeypatch,
                                                                     flat_step_costs):
    """Mistral with a 5-row window and Gemma 2 (hybrid window/global layers and the attention
    soft-cap) decode HF's tokens past the window with every tree attention in the Triton kernel,
    which receives the layers' windows and soft-caps."""
    from test_model_types import SLIDING, build, greedy_pair

    from treedec.ops import attention as attention_op

    model = build(model_type, **SLIDING[model_type](5))
    calls = []
    kernel = attention_op.TREE_ATTENTION.implementation("triton")
    monkeypatch.setitem(attention_op.TREE_ATTENTION.implementations, "triton",
                        lambda *args: calls.append(args[-2:]) or kernel(*args))
    expected, got = greedy_pair(model, [repetitive_prompt(21, 9), repetitive_prompt(22, 14)], drafter="lookup",
                                max_new_tokens=20)
    assert torch.equal(got, expected)
    assert model.treedec.last_stats["tau"] > 1.0
    windows, softcaps = {w for w, _ in calls}, {c for _, c in calls}
    assert 5 in windows
    if model_type == "gemma2":
        assert None in windows and softcaps == {model.config.attn_logit_softcapping}
