"""Triton kernels (triton_kernels/) against treedec.reference.

On a machine without CUDA the kernels run on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, set below before triton is imported), at small odd sizes because the
interpreter is slow. With CUDA present the same cases run compiled on the GPU, and the
`gpu`-marked tests add realistic sizes and 16-bit dtypes.
"""

import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton`

import pytest  # noqa: E402

pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # triton_kernels/ lives at the repo root

from treedec import reference  # noqa: E402
from treedec.reference.tree import unpack_bits  # noqa: E402
from triton_kernels import draft_heads as draft_heads_mod  # noqa: E402
from triton_kernels import lm_head_topk as lm_head_mod  # noqa: E402
from triton_kernels import lm_head_chunked as chunked_mod  # noqa: E402
from triton_kernels.lm_head_chunked import chunk_width  # noqa: E402
from triton_kernels import tree_attention as attention_mod  # noqa: E402
from helpers import make_parents  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---------------------------------------------------------------------------------------------
# Inputs




def launch_lm_head(hidden, weight, k, config=None, num_splits=None):
    """The fused LM-head top-k kernel, or the cuBLAS-chunks path for a ChunkedConfig (an experiment
    lm_head_topk does not take)."""
    if isinstance(config, chunked_mod.ChunkedConfig):
        return chunked_mod.launch(hidden, weight, k, config)
    return lm_head_mod._launch(hidden, weight, k, config, num_splits)

def attention_inputs(batch, num_nodes, q_heads, kv_heads, head_dim, shape, left_pad, seed, max_prefix=70,
                     dtype=torch.float32, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    prefix_len = torch.randint(0, max_prefix + 1, (batch,), generator=gen, dtype=torch.int32)
    prefix_len[0] = max_prefix  # the longest sequence sets the cache length
    cache_len = max_prefix + num_nodes + 5
    kv_start = None
    if left_pad:
        kv_start = (torch.rand(batch, generator=gen) * (prefix_len.float() + 1)).to(torch.int32)
        if batch > 1:  # a prefill-style sequence whose pad reaches into the tree rows: some rows see nothing
            prefix_len[-1] = 3
            kv_start[-1] = 3 + min(num_nodes - 1, 4) + (num_nodes == 1)
    parents = make_parents(batch, num_nodes, shape, gen)
    _, tree_mask = reference.build_tree(parents)
    q = torch.randn(batch, q_heads, num_nodes, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, cache_len, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, cache_len, head_dim, generator=gen).to(dtype)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(q), to(k), to(v), to(prefix_len), to(tree_mask), to(kv_start)


def blind_rows(prefix_len, tree_mask, kv_start, num_nodes) -> torch.Tensor:
    """bool [B, T]: query rows that see no cache row (the reference opens them to everything)."""
    batch = prefix_len.shape[0]
    start = torch.zeros_like(prefix_len) if kv_start is None else kv_start
    nodes = torch.arange(num_nodes, device=prefix_len.device)
    tree_rows_ok = (prefix_len.view(batch, 1) + nodes) >= start.view(batch, 1)  # [B, T] (by tree node j)
    sees_tree = (unpack_bits(tree_mask, num_nodes) & tree_rows_ok.view(batch, 1, num_nodes)).any(-1)
    return ~(prefix_len > start).view(batch, 1) & ~sees_tree


def check_attention(out, q, k, v, prefix_len, tree_mask, kv_start, scale=None, atol=1e-5, rtol=1e-5, window=None,
                    softcap=None):
    expected = reference.tree_attention(q.float(), k.float(), v.float(), prefix_len, tree_mask, kv_start, scale,
                                        window=window, softcap=softcap)
    blind = blind_rows(prefix_len, tree_mask, kv_start, q.shape[2])  # [B, T]
    blind = blind.view(q.shape[0], 1, q.shape[2], 1).expand_as(out)
    assert torch.isfinite(out).all()
    assert (out[blind] == 0).all(), "a row that sees nothing must be zeros"
    torch.testing.assert_close(out.float()[~blind], expected[~blind], atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# tree_attention

ATTENTION_CASES = [
    (batch, num_nodes, heads, shape)
    for batch in (1, 3)
    for num_nodes in (1, 2, 7, 33)
    for heads in ((4, 2), (3, 3))
    for shape in ("chain", "star", "random")
]


@pytest.mark.parametrize("batch,num_nodes,heads,shape", ATTENTION_CASES)
def test_tree_attention_matches_reference(batch, num_nodes, heads, shape):
    seed = zlib.crc32(repr((batch, num_nodes, heads, shape)).encode())
    head_dim = 16 if (num_nodes + heads[0]) % 2 else 32
    left_pad = (seed % 2 == 0) or batch == 3 and shape == "random"
    inputs = attention_inputs(batch, num_nodes, *heads, head_dim, shape, left_pad, seed)
    out = attention_mod.tree_attention(*inputs)
    assert out.shape == inputs[0].shape and out.dtype == inputs[0].dtype
    check_attention(out, *inputs)


@pytest.mark.parametrize("num_nodes,heads,shape", [(64, (2, 1), "random"), (100, (3, 3), "chain"), (128, (4, 2), "star")])
def test_tree_attention_large_trees(num_nodes, heads, shape):
    inputs = attention_inputs(3, num_nodes, *heads, 16, shape, True, seed=num_nodes)
    check_attention(attention_mod.tree_attention(*inputs), *inputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tree_attention_16bit(dtype):
    inputs = attention_inputs(3, 33, 4, 2, 32, "random", True, seed=21, dtype=dtype)
    out = attention_mod.tree_attention(*inputs)
    assert out.dtype == dtype
    check_attention(out, *inputs, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("num_splits", [2, 3])
@pytest.mark.parametrize("num_nodes", [2, 33])
def test_tree_attention_split_kv(num_splits, num_nodes):
    inputs = attention_inputs(3, num_nodes, 4, 2, 16, "random", True, seed=11 + num_nodes + num_splits)
    out = attention_mod._launch(*inputs, scale=None, num_splits=num_splits)
    check_attention(out, *inputs)


def test_tree_attention_strided_q_scale_and_small_blocks():
    q, k, v, prefix_len, tree_mask, kv_start = attention_inputs(3, 7, 4, 2, 16, "random", True, seed=5)
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hq, T, D] view of a [B, T, Hq, D] buffer
    assert not q_strided.is_contiguous()
    out = attention_mod._launch(q_strided, k, v, prefix_len, tree_mask, kv_start, 0.3, block_m=16, block_n=16)
    check_attention(out, q, k, v, prefix_len, tree_mask, kv_start, scale=0.3)


def test_tree_attention_head_dim_not_power_of_two():
    inputs = attention_inputs(1, 7, 3, 3, 24, "random", False, seed=3)
    check_attention(attention_mod.tree_attention(*inputs), *inputs)


def test_tree_attention_no_prefix():
    q, k, v, prefix_len, tree_mask, kv_start = attention_inputs(3, 7, 4, 2, 16, "random", False, seed=8)
    prefix_len = torch.zeros_like(prefix_len)
    out = attention_mod.tree_attention(q, k, v, prefix_len, tree_mask, kv_start)
    check_attention(out, q, k, v, prefix_len, tree_mask, kv_start)


def test_tree_attention_ignores_garbage_outside_visible_rows():
    """NaN in rows a query may not see (pad rows, other branches, unused cache) must not leak."""
    q, k, v, prefix_len, tree_mask, kv_start = attention_inputs(3, 7, 4, 2, 16, "chain", True, seed=9)
    tree_mask = reference.build_tree(make_parents(3, 7, "star", torch.Generator().manual_seed(0)))[1].to(DEVICE)
    k2, v2 = k.clone(), v.clone()
    for b in range(3):
        start, prefix = int(kv_start[b]), int(prefix_len[b])
        for cache in (k2, v2):
            cache[b, :, : min(start, prefix)] = float("nan")
            cache[b, :, prefix + 7:] = float("nan")
    out = attention_mod.tree_attention(q, k2, v2, prefix_len, tree_mask, kv_start)
    check_attention(out, q, k, v, prefix_len, tree_mask, kv_start)


# Sliding windows (positions by depth: reference.dense_tree_mask) and Gemma 2's soft-cap

WINDOW_CASES = [
    (batch, num_nodes, shape, window, softcap)
    for batch, num_nodes in ((1, 1), (3, 7), (2, 33))
    for shape in ("chain", "star", "random")
    for window, softcap in ((1, None), (4, None), (37, None), (10**6, None), (None, 0.7), (9, 2.0))
]


@pytest.mark.parametrize("batch,num_nodes,shape,window,softcap", WINDOW_CASES)
def test_tree_attention_window_and_softcap_match_reference(batch, num_nodes, shape, window, softcap):
    """window 1 (each node sees only itself), windows that cut the prefix or the tree, one wider
    than everything, a soft-cap alone and with a window; left padding on every other case."""
    seed = zlib.crc32(repr((batch, num_nodes, shape, window, softcap)).encode())
    inputs = attention_inputs(batch, num_nodes, 4, 2, 16, shape, seed % 2 == 0, seed)
    out = attention_mod.tree_attention(*inputs, window=window, softcap=softcap)
    check_attention(out, *inputs, window=window, softcap=softcap)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_tree_attention_window_never_reads_rows_behind_it(num_splits):
    """Rows every node's window has passed hold NaN and must not leak (nor may the kernel read
    them in a way that does); split-KV divides only what the window keeps."""
    q, k, v, prefix_len, tree_mask, kv_start = attention_inputs(3, 9, 4, 2, 16, "random", False, seed=13)
    window = 20
    k2, v2 = k.clone(), v.clone()
    for b in range(3):
        for cache in (k2, v2):
            cache[b, :, : max(0, int(prefix_len[b]) - window + 1)] = float("nan")
    out = attention_mod._launch(q, k2, v2, prefix_len, tree_mask, kv_start, None, num_splits=num_splits,
                                window=window)
    check_attention(out, q, k, v, prefix_len, tree_mask, kv_start, window=window)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tree_attention_window_and_softcap_16bit_and_split(dtype):
    inputs = attention_inputs(3, 33, 4, 2, 32, "random", True, seed=23, dtype=dtype)
    for num_splits in (1, 2):
        out = attention_mod._launch(*inputs, scale=0.2, num_splits=num_splits, window=12, softcap=1.5)
        assert out.dtype == dtype
        check_attention(out, *inputs, scale=0.2, window=12, softcap=1.5, atol=2e-2, rtol=2e-2)


def test_node_depths_ignore_bits_past_the_tree():
    parents = make_parents(2, 37, "random", torch.Generator().manual_seed(4))
    depth, tree_mask = reference.build_tree(parents)
    padded = tree_mask.clone()
    padded[..., -1] |= torch.tensor(-(1 << 10), dtype=torch.int32)  # bits 42..63 of a 37-node tree's last word
    for mask in (tree_mask, padded):
        torch.testing.assert_close(attention_mod.node_depths(mask, 37), depth.to(torch.int32))


def test_windowed_layers_run_the_kernel_when_forced_and_the_reference_under_auto_on_a_gpu(monkeypatch):
    """ops.tree_attention passes the window and soft-cap to the kernel (forced here, as on a GPU
    once it has run there); under auto a GPU keeps them on the reference until then."""
    from types import SimpleNamespace

    from treedec import ops
    from treedec.ops.attention import TREE_ATTENTION, window_or_softcap_on_a_gpu

    inputs = attention_inputs(3, 7, 4, 2, 16, "random", True, seed=31)
    monkeypatch.setenv("TREEDEC_BACKEND", "triton")
    assert TREE_ATTENTION.backend(torch.device(DEVICE), *inputs, None, 5, 0.8) == "triton"
    calls = []
    kernel = TREE_ATTENTION.implementation("triton")
    monkeypatch.setitem(TREE_ATTENTION.implementations, "triton", lambda *a: calls.append(a[-2:]) or kernel(*a))
    out = ops.tree_attention(*inputs, window=5, softcap=0.8)
    assert calls == [(5, 0.8)]
    check_attention(out, *inputs, window=5, softcap=0.8)
    cuda_q = SimpleNamespace(device=torch.device("cuda"))
    assert window_or_softcap_on_a_gpu(cuda_q, *inputs[1:], None, 5, None) is not None
    assert window_or_softcap_on_a_gpu(cuda_q, *inputs[1:], None, None, 0.8) is not None
    assert window_or_softcap_on_a_gpu(cuda_q, *inputs[1:], None, None, None) is None


# ---------------------------------------------------------------------------------------------
# lm_head_topk


@pytest.mark.parametrize("num_rows", [1, 5])
@pytest.mark.parametrize("vocab", [300, 1000])
@pytest.mark.parametrize("k", [1, 4])
def test_lm_head_topk_matches_reference(num_rows, vocab, k):
    gen = torch.Generator().manual_seed(num_rows * 7919 + vocab + k)
    hidden_size = 40 if vocab == 300 else 64
    hidden = torch.randn(num_rows, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen)
    values, indices = lm_head_mod.lm_head_topk(hidden.to(DEVICE), weight.to(DEVICE), k)
    expected_values, expected_indices = reference.lm_head_topk(hidden, weight, k)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64 and values.shape == (num_rows, k)
    torch.testing.assert_close(values.cpu(), expected_values, atol=1e-4, rtol=1e-5)
    assert torch.equal(indices.cpu(), expected_indices)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_lm_head_topk_ties_go_to_smallest_index(num_splits):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 32, generator=gen)
    weight = torch.randn(500, 32, generator=gen)
    best = int((hidden[0] @ weight.T).argmax())
    weight[499] = weight[best]  # same logit, later tile and split
    weight[best + 1 if best + 1 < 499 else 0] = weight[best]
    values, indices = launch_lm_head(hidden.to(DEVICE), weight.to(DEVICE), 1, num_splits=num_splits)
    assert torch.equal(indices.cpu(), reference.lm_head_topk(hidden, weight, 1)[1])
    values, indices = launch_lm_head(hidden.to(DEVICE), weight.to(DEVICE), 3, num_splits=num_splits)
    tied = sorted({best, 499, best + 1 if best + 1 < 499 else 0})
    assert indices[0].tolist() == tied


def stable_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k with the kernel's order: value descending, equal values by increasing index."""
    values, indices = torch.sort(logits, dim=-1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def check_ties_and_infinities(k, num_splits, config=None, num_rows=7, dtype=torch.float32):
    """Small integer logits tie everywhere, across tiles and splits; some columns are -inf, so a
    top-16 reaches into -inf entries, and a NaN ranks as +inf. Every row must match a stable sort
    exactly: the running list replaces its worst entry, and taking a tile's entries in rank order
    has to hold for repeated and infinite values too."""
    gen = torch.Generator().manual_seed(k * 31 + num_splits)
    vocab, width = 777, 24
    hidden = torch.randint(0, 3, (num_rows, width), generator=gen).float()
    hidden[:, 0] = 1.0
    weight = torch.randint(-2, 3, (vocab, width), generator=gen).float()
    weight[:, 0] = 0.0
    weight[5:770, 0] = float("-inf")  # 12 finite columns and a NaN: a top-16 takes 3 -inf entries
    weight[770, 0] = float("nan")
    hidden[6, 1:] = 0.0  # row 6: every finite logit is 0
    logits = hidden @ weight.T
    logits = torch.where(logits.isnan(), torch.tensor(float("inf")), logits)
    # small integers: exact in bf16 too, and their sums in the kernel's fp32 accumulator
    values, indices = launch_lm_head(hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype), k, config, num_splits)
    expected_values, expected_indices = stable_topk(logits, k)
    assert k < 16 or expected_values[:, -1].isneginf().all()
    assert torch.equal(indices.cpu(), expected_indices)
    assert torch.equal(values.cpu(), expected_values)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's matmul meets the NaN
@pytest.mark.parametrize("k", [1, 5, 16])
@pytest.mark.parametrize("num_splits", [1, 3, 7])
def test_lm_head_topk_many_ties_and_infinities(k, num_splits):
    check_ties_and_infinities(k, num_splits)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("k", [3, 16])
def test_lm_head_topk_tma_loads_many_ties(k):
    """The tensor-descriptor (TMA) loads: bf16, out-of-range rows and columns read as zeros."""
    config = lm_head_mod.LaunchConfig(16, 64, block_h=16, tma=True)
    assert lm_head_mod._tma_ok(torch.zeros(7, 24, dtype=torch.bfloat16), torch.zeros(777, 24, dtype=torch.bfloat16))
    check_ties_and_infinities(k, 5, config, dtype=torch.bfloat16)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("k,dtype", [(1, torch.float32), (5, torch.bfloat16), (16, torch.float32)])
def test_lm_head_topk_chunked_many_ties(k, dtype):
    """The many-row path (matmul per vocabulary chunk, Triton top-k per segment, running merge):
    777 columns in chunks of 100 read in 32-wide segments, so ties and -inf entries cross
    segments and chunks, and the short last chunk has fewer segments than the others (a merge
    that read the earlier chunk's leftover candidates would repeat indices)."""
    config = chunked_mod.ChunkedConfig(chunk_v=100, block_r=4, block_s=32)
    check_ties_and_infinities(k, 1, config, dtype=dtype)


def test_lm_head_topk_chunked_matches_torch():
    """Random logits, 37 rows (a partial row block), a last chunk of one column."""
    gen = torch.Generator().manual_seed(12)
    hidden, weight = torch.randn(37, 48, generator=gen), torch.randn(1001, 48, generator=gen)
    config = chunked_mod.ChunkedConfig(chunk_v=200, block_r=16, block_s=64)
    values, indices = launch_lm_head(hidden.to(DEVICE), weight.to(DEVICE), 8, config)
    expected_values, expected_indices = torch.topk(hidden @ weight.T, 8)
    assert torch.equal(indices.cpu(), expected_indices)
    torch.testing.assert_close(values.cpu(), expected_values, atol=1e-4, rtol=1e-5)
    assert launch_lm_head(hidden[:0].to(DEVICE), weight.to(DEVICE), 8, config)[0].shape == (0, 8)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("k", [1, 8, 16])
@pytest.mark.parametrize("config", [(128, 128, 8, 1, False), (64, 128, 4, 2, False), (128, 256, 8, 1, True),
                                    (64, 128, 4, 2, True)], ids=str)
def test_lm_head_topk_many_ties_gpu(k, config):
    """The same on the GPU with the tile shapes bench/lm_head_configs.py sweeps, 200 rows, with
    pointer and TMA loads (bf16: TMA takes 16-bit tensors)."""
    block_r, block_v, warps, splits, tma = config
    launch = lm_head_mod.LaunchConfig(block_r, block_v, num_warps=warps, splits_per_sm=splits, tma=tma)
    check_ties_and_infinities(k, 3, launch, num_rows=200, dtype=torch.bfloat16)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("k", [1, 8, 16])
@pytest.mark.parametrize("config", [(100, 4, 32, 4), (300, 16, 64, 4), (4096, 32, 256, 8)], ids=str)
def test_lm_head_topk_chunked_many_ties_gpu(k, config):
    """The many-row path on the GPU: cuBLAS writes each chunk's fp32 logits."""
    chunk_v, block_r, block_s, warps = config
    launch = chunked_mod.ChunkedConfig(chunk_v, block_r=block_r, block_s=block_s, num_warps=warps)
    check_ties_and_infinities(k, 1, launch, num_rows=200, dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lm_head_topk_16bit(dtype):
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(5, 48, generator=gen).to(dtype)
    weight = torch.randn(700, 48, generator=gen).to(dtype)
    values, indices = lm_head_mod.lm_head_topk(hidden.to(DEVICE), weight.to(DEVICE), 4)
    logits = hidden.float() @ weight.float().T  # logits accumulated in fp32, as the kernel does
    expected_values, expected_indices = torch.topk(logits, 4)
    torch.testing.assert_close(values.cpu(), expected_values, atol=1e-3, rtol=1e-4)
    assert torch.equal(indices.cpu(), expected_indices)


def test_lm_head_topk_k16_and_nan_does_not_crash():
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 33, generator=gen)
    weight = torch.randn(400, 33, generator=gen)
    values, indices = launch_lm_head(hidden.to(DEVICE), weight.to(DEVICE), 16, num_splits=2)
    expected_values, expected_indices = torch.topk(hidden @ weight.T, 16)
    torch.testing.assert_close(values.cpu(), expected_values, atol=1e-4, rtol=1e-5)
    assert torch.equal(indices.cpu(), expected_indices)
    weight[123, 0] = float("nan")
    values, indices = lm_head_mod.lm_head_topk(hidden.to(DEVICE), weight.to(DEVICE), 2)
    assert ((indices >= 0) & (indices < 400)).all()
    assert (indices[:, 0] == 123).all()  # NaN ranks first, as argmax does


def test_lm_head_topk_backend_above_16_takes_the_reference(monkeypatch):
    """The kernel holds at most 16 values per row; the triton backend answers k > 16 with torch."""
    from treedec import ops

    monkeypatch.setenv("TREEDEC_BACKEND", "triton")
    gen = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(3, 24, generator=gen), torch.randn(37, 24, generator=gen)
    values, indices = ops.lm_head_topk(hidden.to(DEVICE), weight.to(DEVICE), 20)
    expected_values, expected_indices = reference.lm_head_topk(hidden, weight, 20)
    torch.testing.assert_close(values.cpu(), expected_values, atol=1e-4, rtol=1e-5)
    assert torch.equal(indices.cpu(), expected_indices)


# ---------------------------------------------------------------------------------------------
# draft_heads_topk: all heads' residual blocks per layer in one launch, then lm_head_topk


def heads_inputs(rows, heads, blocks, width, vocab, dtype, seed, device=DEVICE):
    """As tests/kernels/test_draft_heads.py builds them (scaled so states stay O(1))."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=gen)
    weights = torch.randn(heads, blocks, width, width, generator=gen) / width**0.5
    biases = torch.randn(heads, blocks, width, generator=gen) * 0.1
    lm_weight = torch.randn(vocab, width, generator=gen) / width**0.5
    return tuple(t.to(device=device, dtype=dtype) for t in (hidden, weights, biases, lm_weight))


def check_heads_topk(values, ids, states, lm_weight, k, atol=1e-4):
    """The LM-head pass on the kernel's own states: values are the fp32 logits' top-k, and every id
    is where its value sits (ids differ from torch.topk's only on ties)."""
    rows, heads, width = states.shape
    logits = (states.float().reshape(rows * heads, width) @ lm_weight.float().T).view(rows, heads, -1)
    torch.testing.assert_close(values, torch.topk(logits, k).values, atol=atol, rtol=1e-4)
    torch.testing.assert_close(logits.gather(2, ids), values, atol=atol, rtol=1e-4)
    assert ids.dtype == torch.int64 and ((ids >= 0) & (ids < lm_weight.shape[0])).all()


@pytest.mark.parametrize("rows,heads,blocks,width", [(3, 2, 1, 24), (3, 3, 2, 24), (1, 1, 1, 8), (17, 2, 3, 70)])
def test_head_states_match_reference(rows, heads, blocks, width):
    hidden, weights, biases, _ = heads_inputs(rows, heads, blocks, width, 5, torch.float32, seed=rows * width + blocks)
    states = draft_heads_mod.head_states(hidden, weights, biases)
    expected = reference.heads.head_states(hidden.cpu(), weights.cpu(), biases.cpu())
    assert states.shape == (rows, heads, width) and states.dtype == torch.float32 and states.is_contiguous()
    torch.testing.assert_close(states.cpu(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_states_16bit(dtype):
    """fp32 inside a block, rounded once per block: close to the fp32 reference of the same inputs."""
    hidden, weights, biases, _ = heads_inputs(5, 3, 2, 40, 5, dtype, seed=7)
    states = draft_heads_mod.head_states(hidden, weights, biases)
    assert states.dtype == dtype
    expected = reference.heads.head_states(hidden.float().cpu(), weights.float().cpu(), biases.float().cpu())
    torch.testing.assert_close(states.float().cpu(), expected, atol=3e-2, rtol=2e-2)


def test_head_states_strided_inputs_and_no_blocks():
    hidden, weights, biases, _ = heads_inputs(4, 2, 2, 24, 5, torch.float32, seed=9)
    wide = torch.randn(4, 48, device=DEVICE)
    wide[:, ::2] = hidden  # hidden as a strided view
    transposed = weights.transpose(2, 3).contiguous().transpose(2, 3)  # same values, (in, out) in memory
    states = draft_heads_mod._launch(wide[:, ::2], transposed, biases, block_o=16, block_i=16)
    expected = reference.heads.head_states(hidden.cpu(), weights.cpu(), biases.cpu())
    torch.testing.assert_close(states.cpu(), expected, atol=1e-5, rtol=1e-5)
    none = draft_heads_mod.head_states(hidden, weights[:, :0], biases[:, :0])
    assert torch.equal(none.cpu(), hidden.cpu()[:, None].expand(4, 2, 24))
    assert draft_heads_mod.head_states(hidden[:0], weights, biases).shape == (0, 2, 24)


@pytest.mark.parametrize("rows,heads,blocks,k", [(3, 2, 1, 1), (3, 3, 2, 4), (5, 2, 2, 20)])
def test_draft_heads_topk_backend_matches_reference(rows, heads, blocks, k, monkeypatch):
    """Through treedec.ops with TREEDEC_BACKEND=triton (k=20 > 16: the registry declines the kernel,
    a logged and counted decision)."""
    from treedec import ops

    monkeypatch.setenv("TREEDEC_BACKEND", "triton")
    args = heads_inputs(rows, heads, blocks, 24, 37, torch.float32, seed=rows + heads + k)
    decided = ops.heads.DRAFT_HEADS_TOPK.backend(args[0].device, *args, k)
    assert decided == ("triton" if k <= 16 else "reference")
    values, ids, states = ops.draft_heads_topk(*args, k)
    want_values, want_ids, want_states = reference.draft_heads_topk(*(t.cpu() for t in args), k)
    assert values.shape == ids.shape == (rows, heads, k) and states.shape == (rows, heads, 24)
    assert values.device == args[0].device
    torch.testing.assert_close(states.cpu(), want_states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values.cpu(), want_values, atol=1e-4, rtol=1e-4)
    gaps = (want_values[..., :-1] - want_values[..., 1:]).abs()
    if k == 1 or bool((gaps > 1e-3).all()):  # ids agree wherever no two logits nearly tie
        assert torch.equal(ids.cpu(), want_ids)
    check_heads_topk(values, ids, states, args[3], k)


def test_draft_heads_topk_backend_bf16(monkeypatch):
    from treedec import ops

    monkeypatch.setenv("TREEDEC_BACKEND", "triton")
    args = heads_inputs(3, 3, 2, 24, 37, torch.bfloat16, seed=12)
    values, ids, states = ops.draft_heads_topk(*args, 4)
    assert states.dtype == torch.bfloat16 and values.dtype == torch.float32
    want_values, _, want_states = reference.draft_heads_topk(*(t.cpu() for t in args), 4)
    torch.testing.assert_close(states.float().cpu(), want_states.float(), atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(values.cpu(), want_values, atol=0.1, rtol=0.02)
    check_heads_topk(values, ids, states, args[3], 4, atol=1e-3)


def test_draft_heads_backend_choice(monkeypatch):
    """On CUDA, auto runs the Triton kernels for bf16 and sends fp32 where lm_head_topk sends it."""
    from treedec.ops import heads

    cuda = torch.device("cuda")
    op = heads.DRAFT_HEADS_TOPK
    monkeypatch.delenv("TREEDEC_BACKEND", raising=False)
    args = heads_inputs(2, 2, 1, 24, 37, torch.bfloat16, seed=1)
    assert op.backend(cuda, *args, 4) == "triton"
    assert op.backend(cuda, *(t.float() for t in args), 4) == "reference"  # fp32 under auto
    monkeypatch.setenv("TREEDEC_BACKEND", "triton")
    assert op.backend(cuda, *(t.float() for t in args), 4) == "triton"  # forced: the kernel runs it
    assert op.implements("triton")


# ---------------------------------------------------------------------------------------------
# GPU only: realistic sizes, 16-bit dtypes, compiled kernels


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window,softcap", [(4096, None), (300, None), (None, 50.0), (1000, 50.0)])
@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_tree_attention_window_and_softcap_gpu(dtype, window, softcap, num_splits):
    """Gemma 2's shapes (8 query heads over 4, D = 256 would be wider; 128 here) and Mistral's
    4096-token window: the kernel against the reference on a GPU, before auto may run it there."""
    inputs = attention_inputs(4, 64, 8, 4, 128, "random", True, seed=7, max_prefix=3000, dtype=dtype, device="cuda")
    out = attention_mod._launch(*inputs, scale=None, num_splits=num_splits, window=window, softcap=softcap)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    check_attention(out, *inputs, atol=tol, rtol=tol, window=window, softcap=softcap)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "batch,num_nodes,heads,head_dim,max_prefix",
    [(1, 64, (32, 8), 128, 4096), (4, 100, (9, 3), 64, 700), (8, 1, (32, 8), 128, 2000), (2, 128, (8, 8), 128, 300)],
)
@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_tree_attention_gpu(dtype, batch, num_nodes, heads, head_dim, max_prefix, num_splits):
    inputs = attention_inputs(batch, num_nodes, *heads, head_dim, "random", True, seed=batch + num_nodes,
                              max_prefix=max_prefix, dtype=dtype, device="cuda")
    out = attention_mod._launch(*inputs, scale=None, num_splits=num_splits)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    check_attention(out, *inputs, atol=tol, rtol=tol)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_rows", [1, 8, 33, 200])  # 200: the 128-row tiles
@pytest.mark.parametrize("k", [1, 8, 16])
@pytest.mark.parametrize("chunked", [False, True], ids=["fused", "chunked"])
def test_lm_head_topk_gpu(dtype, num_rows, k, chunked):
    gen = torch.Generator().manual_seed(num_rows + k)
    hidden = torch.randn(num_rows, 576, generator=gen).to("cuda", dtype)
    weight = (torch.randn(49152, 576, generator=gen) * 0.05).to("cuda", dtype)
    config = chunked_mod.ChunkedConfig(chunk_width(num_rows)) if chunked else None
    values, indices = launch_lm_head(hidden, weight, k, config)
    logits = hidden.float() @ weight.float().T  # fp32 logits of the same inputs
    expected_values = torch.topk(logits, k).values
    torch.testing.assert_close(values, expected_values, atol=1e-3, rtol=1e-3)
    # indices up to near-ties: each chosen id's logit is its reported value
    torch.testing.assert_close(logits.gather(1, indices), values, atol=1e-3, rtol=1e-3)
    assert (indices.sort(1).values.diff(1) > 0).all() if k > 1 else True  # no repeats


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,heads,blocks,width,vocab", [(64, 4, 1, 4096, 32000), (9, 5, 2, 576, 49152)])
def test_draft_heads_topk_gpu(dtype, rows, heads, blocks, width, vocab, monkeypatch):
    from treedec import ops

    monkeypatch.setenv("TREEDEC_BACKEND", "triton")
    args = heads_inputs(rows, heads, blocks, width, vocab, dtype, seed=rows, device="cuda")
    values, ids, states = ops.draft_heads_topk(*args, 8)
    hidden, weights, biases, _ = (t.float() for t in args)
    expected = reference.heads.head_states(hidden, weights, biases)  # fp32 (TF32 off by default)
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(states.float(), expected, atol=tol, rtol=tol)
    check_heads_topk(values, ids, states, args[3], 8, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Compiled for real (no GPU needed): Triton's own ptxas builds the kernels for sm_90, which catches
# what the interpreter forgives (layouts, shared memory, constructs the compiler rejects).

AOT_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton_kernels import draft_heads as dh, lm_head_topk as lm, tree_attention as ta

    def build(fn, types, constexprs, **options):
        names = fn.arg_names
        signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
        source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in constexprs.items()})
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)

    for dtype, splits, window, softcap in (("bf16", 1, False, False), ("fp16", 4, False, False),
                                           ("bf16", 1, True, True), ("bf16", 4, True, False)):
        types = dict(q_ptr="*" + dtype, k_ptr="*" + dtype, v_ptr="*" + dtype, out_ptr="*" + dtype,
                     part_o_ptr="*fp32", part_lse_ptr="*fp32", prefix_len_ptr="*i32", kv_start_ptr="*i32",
                     tree_mask_ptr="*i32", depth_ptr="*i32", qk_scale="fp32", softcap="fp32")
        build(ta._tree_attention_kernel, types, dict(HAS_KV_START=True, SPLIT_KV=splits > 1, WINDOW=window,
              SOFTCAP=softcap, DOT_PRECISION="tf32", DOT_FP32=False, BLOCK_M=64, BLOCK_N=64, BLOCK_D=128),
              num_warps=4, num_stages=2)
    build(ta._combine_kernel, dict(part_o_ptr="*fp32", part_lse_ptr="*fp32", out_ptr="*bf16"),
          dict(SPLITS_P2=8, BLOCK_D=128), num_warps=2)
    lm_types = dict(hidden_ptr="*bf16", weight_ptr="*bf16", part_val_ptr="*fp32", part_idx_ptr="*i32")
    build(lm._lm_head_topk_kernel, lm_types, dict(hidden_desc=None, weight_desc=None, K=16, KP=16,
          DOT_PRECISION="tf32", DOT_FP32=False, BLOCK_R=16, BLOCK_V=128, BLOCK_H=64, TMA=False),
          num_warps=4, num_stages=3)
    try:  # the TMA loads: a descriptor's type as the launcher spells it
        import torch
        from triton.runtime.jit import mangle_type
        from triton.tools.tensor_descriptor import TensorDescriptor
        desc = lambda rows, box: mangle_type(TensorDescriptor.from_tensor(torch.empty(rows, 4096, dtype=torch.bfloat16), box))
        lm_types.update(hidden_desc=desc(256, [128, 64]), weight_desc=desc(1024, [128, 64]))
        build(lm._lm_head_topk_kernel, lm_types, dict(K=8, KP=8, DOT_PRECISION="tf32", DOT_FP32=False,
              BLOCK_R=128, BLOCK_V=128, BLOCK_H=64, TMA=True), num_warps=8,
              num_stages=4)
    except ImportError:
        print("no tensor descriptors in this triton")
    build(dh._head_block_kernel, dict(x_ptr="*bf16", weight_ptr="*bf16", bias_ptr="*bf16", out_ptr="*bf16"),
          dict(DOT_PRECISION="tf32", DOT_FP32=False, BLOCK_R=64, BLOCK_O=64, BLOCK_I=128), num_warps=8, num_stages=3)
    build(lm._merge_topk_kernel, dict(part_val_ptr="*fp32", part_idx_ptr="*i32", values_ptr="*fp32",
          indices_ptr="*i64"), dict(K=1, KP=2, BLOCK_E=512), num_warps=4)
    from triton_kernels import lm_head_chunked as ch
    build(ch._segment_topk_kernel, dict(logits_ptr="*fp32", part_val_ptr="*fp32", part_idx_ptr="*i32"),
          dict(K=8, KP=8, BLOCK_R=16, BLOCK_S=512), num_warps=4)
    for final in (False, True):
        build(ch._merge_running_kernel, dict(part_val_ptr="*fp32", part_idx_ptr="*i32", values_ptr="*fp32",
              indices_ptr="*i64"), dict(K=8, KP=8, BLOCK_E=256, FINAL=final), num_warps=4)
    print("compiled")
    """
)


def test_kernels_compile_for_sm90():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    repo = str(Path(__file__).resolve().parents[2])
    result = subprocess.run([sys.executable, "-c", AOT_SCRIPT, repo], capture_output=True, text=True, env=env,
                            timeout=300)
    if result.returncode and "ASTSource" in result.stderr and "ImportError" in result.stderr:
        pytest.skip("this triton has no ASTSource/GPUTarget compile API")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]


def test_launch_configuration_follows_the_h100_sweep(monkeypatch):
    """The tile/split rule that bench/tree_attention_configs.py measured (132 SMs): split the
    prefix to about one wave when the grid is small, 128-row tiles once 64-row ones fill the GPU."""
    monkeypatch.setattr(attention_mod, "_num_sms", lambda index: 132)
    cuda = torch.device("cuda", 0)
    # llama3-8b heads (group 4), T=64: 256 rows -> 4 tiles of 64 per kv head
    assert attention_mod._tile_config(cuda, torch.bfloat16, 256, 4 * 1 * 8, 128) == (64, 3)
    assert attention_mod._choose_splits(cuda, 4 * 1 * 8, 4160, 64) == 4  # 132 // 32
    assert attention_mod._tile_config(cuda, torch.bfloat16, 256, 4 * 8 * 8, 128) == (128, 3)
    assert attention_mod._choose_splits(cuda, 2 * 8 * 8, 4160, 64) == 1
    # fp32 and D=256 keep 64-row tiles and two stages; small trees keep small tiles
    assert attention_mod._tile_config(cuda, torch.float32, 256, 256, 128) == (64, 2)
    assert attention_mod._tile_config(cuda, torch.bfloat16, 256, 256, 256) == (64, 2)
    assert attention_mod._tile_config(cuda, torch.bfloat16, 24, 256, 64)[0] == 32
    # a short cache is not split below 4 tiles per split; the CPU never splits
    assert attention_mod._choose_splits(cuda, 9, 300, 64) == 1
    assert attention_mod._choose_splits(torch.device("cpu"), 1, 8192, 64) == 1
    assert attention_mod._warps_for(128, 128) == 8 and attention_mod._warps_for(64, 128) == 4


def test_lm_head_launch_configuration_follows_the_h200_sweep():
    """bench/lm_head_configs.py on an H200 (H=4096, V=128256, bf16): 128x128 tiles with 8 warps,
    4 stages and one program per SM past 64 rows (the cuBLAS-chunks path lost there); 64-row tiles
    with 4 stages up to 64; TMA loads for 16-bit rows on the GPU only; the CPU (interpreter) keeps
    pointer loads and 4 splits."""
    cuda, cpu, bf16 = torch.device("cuda", 0), torch.device("cpu"), torch.bfloat16
    big = lm_head_mod.default_config(256, bf16, cuda)
    assert (big.block_r, big.block_v, big.num_warps, big.num_stages) == (128, 128, 8, 4)
    assert (big.splits_per_sm, big.tma) == (1, True)
    mid = lm_head_mod.default_config(64, bf16, cuda)
    assert (mid.block_r, mid.num_warps, mid.num_stages, mid.splits_per_sm, mid.tma) == (64, 4, 4, 2, True)
    small = lm_head_mod.default_config(4, bf16, cuda)
    assert (small.block_r, small.num_stages, small.tma) == (16, 3, True)
    assert not lm_head_mod.default_config(256, torch.float32, cuda).tma
    assert lm_head_mod.default_config(256, torch.float32, cuda).block_v == 64
    on_cpu = lm_head_mod.default_config(256, bf16, cpu)
    assert (on_cpu.block_r, on_cpu.splits_per_sm, on_cpu.tma) == (64, 4, False)
    # TMA needs 16-byte aligned rows: an odd width or a strided view takes the pointer loads
    assert not lm_head_mod._tma_ok(torch.zeros(4, 33, dtype=bf16), torch.zeros(100, 33, dtype=bf16))
    assert not lm_head_mod._tma_ok(torch.zeros(4, 64, dtype=bf16)[:, ::2], torch.zeros(100, 32, dtype=bf16))
    assert not lm_head_mod._tma_ok(torch.zeros(4, 64), torch.zeros(100, 64))


def test_lm_head_chunk_width_holds_16_mb_of_fp32_logits():
    from triton_kernels import lm_head_chunked

    assert lm_head_chunked.chunk_width(256) == 16384  # 256 x 16384 x 4 bytes = 16 MB
    assert lm_head_chunked.chunk_width(65) == 32768  # 4M / 65 = 64527: the power of two below
    assert lm_head_chunked.chunk_width(1000) == 4096 and lm_head_chunked.chunk_width(1) == 65536
    for bad in (dict(block_s=500), dict(block_r=0), dict(num_warps=3), dict(chunk_v=0)):
        with pytest.raises(ValueError, match="must be"):
            lm_head_chunked.ChunkedConfig(**bad)


def test_lm_head_configs_script_runs_on_the_cpu(tmp_path):
    """bench/lm_head_configs.py's CPU smoke mode: it checks each configuration's ids against torch,
    times it, and writes the CSV the GPU stage reads (an id mismatch would show as WRONG)."""
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "configs.csv"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(repo / "python"))
    result = subprocess.run([sys.executable, str(repo / "bench" / "lm_head_configs.py"), "--device", "cpu",
                             "--small", "--repeats", "1", "--out", str(out)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = out.read_text().splitlines()
    assert rows[0] == "shape,config,median_us,note" and len(rows) >= 6
    assert "WRONG" not in result.stdout and "best:" in result.stdout


def test_fp32_lm_head_on_gpu_goes_to_torch(monkeypatch):
    """Measured on an H100: the fused kernel's fp32 path is slower than cuBLAS + topk, so auto
    sends fp32 to the reference there; bf16 and a forced backend keep the kernel."""
    from treedec.ops import lm_head

    cuda = torch.device("cuda")
    op = lm_head.LM_HEAD_TOPK
    monkeypatch.delenv("TREEDEC_BACKEND", raising=False)
    hidden, weight = torch.randn(3, 8), torch.randn(20, 8)
    assert op.backend(cuda, hidden, weight, 4) == "reference"
    assert op.backend(cuda, hidden.bfloat16(), weight.bfloat16(), 4) == "triton"
    monkeypatch.setenv("TREEDEC_BACKEND", "triton")
    assert op.backend(cuda, hidden, weight, 4) == "triton"


# ---------------------------------------------------------------------------------------------
# Row gather / scatter (layer-skip batching)

from triton_kernels import rows as rows_mod  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("shape,count", [((1, 1), 1), ((5, 3), 0), ((7, 2, 33), 3), ((9, 1100), 9), ((4, 3, 2), 2)])
def test_rows_gather_scatter_match_reference(dtype, shape, count):
    generator = torch.Generator().manual_seed(shape[0] * 10 + count)
    x = (torch.randn(shape, generator=generator) * 50).to(dtype).to(DEVICE)
    index = torch.randperm(shape[0], generator=generator)[:count].to(DEVICE)
    block = rows_mod.gather_rows(x, index)
    assert torch.equal(block.cpu(), reference.gather_rows(x.cpu(), index.cpu()))
    update = (torch.randn(block.shape, generator=generator) * 50).to(dtype).to(DEVICE)
    expected = x.cpu().clone()
    reference.scatter_rows(expected, index.cpu(), update.cpu())
    rows_mod.scatter_rows(x, index, update)
    assert torch.equal(x.cpu(), expected)


def test_rows_gather_with_repeats():
    x = torch.randn(6, 5).to(DEVICE)
    index = torch.tensor([2, 2, 5, 0]).to(DEVICE)
    assert torch.equal(rows_mod.gather_rows(x, index).cpu(), x.cpu()[index.cpu()])
