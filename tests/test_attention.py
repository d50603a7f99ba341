"""Tree attention: every node's output equals plain causal attention over its own root path."""

import random

import pytest
import torch
import torch.nn.functional as F

from helpers import batch_parents, random_parents
from treedec.tools.models import tiny_llama
from treedec.ops import build_tree, tree_attention
from trees import Tree


def root_path(parents, node):
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


@pytest.mark.parametrize("num_nodes, q_heads, kv_heads", [(1, 2, 2), (7, 4, 2), (33, 3, 1)])
def test_branch_decomposition(num_nodes, q_heads, kv_heads):
    rng = random.Random(num_nodes)
    batch, dim, rows = 3, 16, 80
    prefix_len = torch.tensor([5, 20, 0], dtype=torch.int32)
    kv_start = torch.tensor([2, 0, 0], dtype=torch.int32)
    parents = [random_parents(num_nodes, rng) for _ in range(batch)]
    _, mask = build_tree(batch_parents(parents))
    q = torch.randn(batch, q_heads, num_nodes, dim)
    k = torch.randn(batch, kv_heads, rows, dim)
    v = torch.randn(batch, kv_heads, rows, dim)
    out = tree_attention(q, k, v, prefix_len, mask, kv_start)
    # check_values=False (the decode loop's per-layer call) runs the same computation
    torch.testing.assert_close(tree_attention(q, k, v, prefix_len, mask, kv_start, check_values=False), out,
                               rtol=0, atol=0)
    group = q_heads // kv_heads
    for b in range(batch):
        p = int(prefix_len[b])
        for i in range(num_nodes):
            visible = list(range(int(kv_start[b]), p)) + [p + j for j in root_path(parents[b], i)]
            keys = k[b, :, visible].repeat_interleave(group, 0)  # [Hq, n, D]
            values = v[b, :, visible].repeat_interleave(group, 0)
            expected = F.scaled_dot_product_attention(q[b, :, i : i + 1], keys, values)
            torch.testing.assert_close(out[b, :, i], expected[:, 0], atol=1e-5, rtol=1e-5)


def attention_over(q, keys, values, softcap):
    """q [H, 1, D] over keys/values [H, n, D]: plain attention, scores soft-capped if asked."""
    scores = q @ keys.transpose(1, 2) / q.shape[-1] ** 0.5
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return torch.softmax(scores, dim=-1) @ values


@pytest.mark.parametrize("shape", ["chain", "star", "random", "single"])
@pytest.mark.parametrize("window, softcap", [(1, None), (3, None), (8, None), (None, 0.7), (4, 0.7)])
def test_sliding_window_and_softcap_by_position(shape, window, softcap):
    """Node i of depth d after a prefix of p rows sits at position p + d (rows before kv_start
    are padding): it sees the rows fewer than `window` positions behind it, as HF's sliding mask."""
    rng = random.Random(hash((shape, window)) % 1000)
    num_nodes = {"chain": 11, "star": 6, "random": 13, "single": 1}[shape]
    batch, heads, dim, rows = 3, 2, 8, 40
    prefix_len = torch.tensor([9, 0, 14], dtype=torch.int32)
    kv_start = torch.tensor([3, 0, 0], dtype=torch.int32)
    make = {"chain": lambda: list(range(-1, num_nodes - 1)), "star": lambda: [-1] + [0] * (num_nodes - 1),
            "random": lambda: random_parents(num_nodes, rng), "single": lambda: [-1]}[shape]
    parents = [make() for _ in range(batch)]
    _, mask = build_tree(batch_parents(parents))
    q, k, v = torch.randn(batch, heads, num_nodes, dim), torch.randn(batch, heads, rows, dim), torch.randn(batch, heads, rows, dim)
    out = tree_attention(q, k, v, prefix_len, mask, kv_start, window=window, softcap=softcap)
    limit = window if window is not None else rows
    for b in range(batch):
        p = int(prefix_len[b])
        for i in range(num_nodes):
            path = root_path(parents[b], i)
            depth = len(path) - 1
            visible = [r for r in range(int(kv_start[b]), p) if p + depth - r < limit]
            visible += [p + j for d, j in enumerate(path) if depth - d < limit]
            expected = attention_over(q[b, :, i : i + 1], k[b, :, visible], v[b, :, visible], softcap)
            torch.testing.assert_close(out[b, :, i], expected[:, 0], atol=1e-5, rtol=1e-5)


def test_a_window_and_softcap_outside_the_loop_are_eager_attentions():
    """Without a tree step, a soft-capped layer (Gemma 2) attends as transformers' eager attention,
    which sdpa cannot: causal with the queries last, or over the bool mask given."""
    from treedec.attention import softcapped_forward

    q, k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    out = softcapped_forward(q, k, v, None, None, 0.5)  # [B, T, H, D]
    for i in range(3):
        expected = attention_over(q[0, :, i : i + 1], k[0, :, : 3 + i], v[0, :, : 3 + i], 0.5)
        torch.testing.assert_close(out[0, i], expected[:, 0], atol=1e-5, rtol=1e-5)
    bool_mask = torch.ones(2, 1, 3, 5, dtype=torch.bool)
    bool_mask[1, :, :, 0] = False
    out = softcapped_forward(q, k, v, bool_mask, None, 0.5)
    expected = attention_over(q[1, :, 2:3], k[1, :, 1:], v[1, :, 1:], 0.5)
    torch.testing.assert_close(out[1, 2], expected[:, 0], atol=1e-5, rtol=1e-5)


def test_bad_window_and_softcap_raise():
    q, kv = torch.randn(1, 2, 2, 8), torch.randn(1, 2, 10, 8)
    _, mask = build_tree(batch_parents([[-1, 0]]))
    prefix = torch.tensor([0], dtype=torch.int32)
    for window in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="window"):
            tree_attention(q, kv, kv, prefix, mask, window=window)
    for softcap in (0.0, -1.0):
        with pytest.raises(ValueError, match="softcap"):
            tree_attention(q, kv, kv, prefix, mask, softcap=softcap)


def test_bad_arguments_raise():
    q, kv = torch.randn(1, 3, 2, 8), torch.randn(1, 2, 10, 8)
    _, mask = build_tree(batch_parents([[-1, 0]]))
    with pytest.raises(ValueError, match="multiple"):
        tree_attention(q, kv, kv, torch.tensor([0], dtype=torch.int32), mask)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="fit in"):
        tree_attention(q, kv, kv, torch.tensor([9], dtype=torch.int32), mask)
    with pytest.raises(ValueError, match="tree_mask has shape"):
        tree_attention(q, kv, kv, torch.tensor([0], dtype=torch.int32), mask[:, :1])
    with pytest.raises(ValueError, match="tree_mask has shape"):  # shapes are checked either way
        tree_attention(q, kv, kv, torch.tensor([0], dtype=torch.int32), mask[:, :1], check_values=False)


def test_model_tree_forward_matches_plain_forward_per_path():
    """The whole model: logits of tree node i equal HF's logits for prompt + root path of i."""
    from treedec.attention import TreeStep, register
    from treedec.cache import TreeCache
    from treedec.compat import cache_kwarg_name

    model = tiny_llama(seed=3)
    register()
    prompt = torch.randint(3, 96, (1, 9))
    parents = [-1, 0, 0, 1, 1, 2, 4]
    tokens = [int(prompt[0, -1]), 5, 6, 7, 8, 9, 10]
    tree = Tree.from_parents(parents, tokens)
    config = model.config
    cache = TreeCache(config.num_hidden_layers, 1, config.num_key_value_heads, config.hidden_size // 4, 32,
                      torch.float32, torch.device("cpu"))
    base = model.model
    kwarg = cache_kwarg_name(base)
    model.set_attn_implementation("treedec")
    with torch.no_grad():
        prefill = prompt[:, :-1]
        _, chain_mask = build_tree(batch_parents([list(range(-1, prefill.shape[1] - 1))]))
        cache.begin_step(prefill.shape[1])
        base(input_ids=prefill, position_ids=torch.arange(prefill.shape[1]).view(1, -1),
             attention_mask=chain_mask.unsqueeze(1), use_cache=True,
             treedec_step=TreeStep(cache.prefix_len.clone(), cache.kv_start.clone(), chain_mask), **{kwarg: cache})
        cache.advance(prefill.shape[1])
        step = TreeStep(cache.prefix_len.clone(), cache.kv_start.clone(), tree.tree_mask)
        cache.begin_step(len(parents))
        hidden = base(input_ids=tree.tokens, position_ids=tree.positions(cache.prefix_len), use_cache=True,
                      attention_mask=tree.tree_mask.unsqueeze(1), treedec_step=step, **{kwarg: cache})
        tree_logits = model.lm_head(hidden.last_hidden_state)[0]
        model.set_attn_implementation("sdpa")
        for i in range(len(parents)):
            path = [tokens[n] for n in root_path(parents, i)][1:]
            ids = torch.cat([prompt, torch.tensor([path], dtype=torch.int64)], dim=1)
            expected = model(ids).logits[0, -1]
            torch.testing.assert_close(tree_logits[i], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_nodes, q_heads, kv_heads", [(1, 2, 2), (9, 4, 2), (37, 3, 1)])
def test_causal_reference_equals_the_dense_chain_mask(num_nodes, q_heads, kv_heads):
    """An unpadded prefill (a chain on an empty cache) takes SDPA's causal kernel; its output is
    the dense chain mask's, and a causal call over more rows than its own is refused."""
    from treedec import reference
    from treedec.reference.tree import chain_tree_mask

    torch.manual_seed(num_nodes)
    batch, dim = 2, 16
    q = torch.randn(batch, q_heads, num_nodes, dim)
    k, v = torch.randn(2, batch, kv_heads, num_nodes + 5, dim)
    prefix_len = torch.zeros(batch, dtype=torch.int32)
    mask = chain_tree_mask(batch, num_nodes)
    dense = reference.dense_tree_mask(prefix_len, mask, None, num_nodes, num_nodes)
    expected = reference.tree_attention(q, k, v, prefix_len, mask, dense_mask=dense)
    got = reference.tree_attention(q, k, v, prefix_len, mask, dense_mask=dense, causal=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    wider = reference.dense_tree_mask(prefix_len + 1, mask, None, num_nodes, num_nodes + 1)
    with pytest.raises(ValueError, match="causal"):
        reference.tree_attention(q, k, v, prefix_len + 1, mask, dense_mask=wider, causal=True)


def test_a_step_is_causal_only_as_an_unpadded_chain_on_an_empty_cache():
    from treedec.attention import TreeStep
    from treedec.reference.tree import chain_tree_mask

    zeros = torch.zeros(2, dtype=torch.int32)
    chain = chain_tree_mask(2, 6)
    assert TreeStep(zeros, zeros, chain, chain=True).causal(None)
    assert TreeStep(zeros, zeros, chain, chain=True).causal(6)
    assert not TreeStep(zeros, zeros, chain, chain=True).causal(5)  # the window cuts the chain
    assert not TreeStep(zeros, torch.tensor([0, 2], dtype=torch.int32), chain, chain=True).causal(None)  # padding
    assert not TreeStep(torch.tensor([3, 3], dtype=torch.int32), zeros, chain, chain=True).causal(None)  # a prefix
    assert not TreeStep(zeros, zeros, chain).causal(None)  # not declared a chain (a tree's mask)


@pytest.mark.parametrize("padded", [False, True])
def test_the_loop_prefills_with_the_causal_kernel_unless_padded(padded, monkeypatch):
    """treedec's prefill of an unpadded prompt runs SDPA's causal kernel in every layer, as HF's
    does; a left-padded batch's keeps the dense mask. The output is HF's either way."""
    import treedec
    from test_decoding import left_padded, repetitive_prompt
    from treedec.reference import attention as reference_attention

    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("is_causal", False))
        return sdpa(*args, **kwargs)

    model = tiny_llama(seed=4)
    prompts = [repetitive_prompt(4, 11), repetitive_prompt(5, 7)] if padded else [repetitive_prompt(4, 11)]
    ids, mask = left_padded(prompts)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    treedec.patch(model, drafter=None)
    monkeypatch.setattr(reference_attention.F, "scaled_dot_product_attention", spy)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)
    layers = model.config.num_hidden_layers
    assert calls.count(True) == (0 if padded else layers)
