"""Launch-configuration sweep of the Triton tree-attention kernel on a GPU.

    python bench/tree_attention_configs.py [--deadline SECONDS] [--out CSV]

For a few shapes (the issue's target shape first), every configuration (BLOCK_M, BLOCK_N,
num_warps, num_stages, split count) is first checked against the torch reference, then timed from a
CUDA graph like bench/kernels.py (device time per call). Prints the default configuration's time
next to the fastest one's per shape and writes every row as CSV (shape, config, median_us, gbps,
max_err). The defaults in triton_kernels/tree_attention.py come from this table.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, repo root
from kernels import MODELS, Timer, random_parents, write_sweep  # noqa: E402

from treedec import reference  # noqa: E402
from triton_kernels import tree_attention as kernel  # noqa: E402

SHAPES = [  # (model, batch, tree nodes, prefix)
    ("llama3-8b", 1, 64, 4096),
    ("llama3-8b", 8, 64, 4096),
    ("llama-70b", 1, 64, 4096),
    ("smollm2-135m", 1, 64, 4096),
    ("llama3-8b", 8, 8, 4096),
    ("llama3-8b", 1, 128, 4096),
]


def configs(rows: int, splits_auto: int):
    block_ms = [16, 32] if rows <= 32 else [64, 128]
    split_choices = sorted({1, splits_auto, max(1, splits_auto // 2), 2 * splits_auto})
    for block_m, block_n, warps, stages, splits in itertools.product(
        block_ms, (32, 64, 128), (4, 8), (2, 3), split_choices
    ):
        yield {"block_m": block_m, "block_n": block_n, "num_warps": warps, "num_stages": stages, "num_splits": splits}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deadline", type=float, default=150.0, help="stop starting new configurations after this")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda", help="cpu only to smoke-test the script (TRITON_INTERPRET=1)")
    parser.add_argument("--out", type=Path, default=Path("tree_attention_configs.csv"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    start = time.time()
    timer = Timer(device)
    generator = torch.Generator().manual_seed(7)
    results = []
    for model, batch, num_nodes, prefix in SHAPES:
        q_heads, kv_heads, head_dim, _ = MODELS[model]
        capacity = prefix + num_nodes
        q = torch.randn(batch, q_heads, num_nodes, head_dim, dtype=torch.bfloat16, device=device)
        k = torch.randn(batch, kv_heads, capacity, head_dim, dtype=torch.bfloat16, device=device)
        v = torch.randn_like(k)
        prefix_len = torch.full((batch,), prefix, dtype=torch.int32)
        prefix_len[1::2] = prefix - prefix // 4
        prefix_len = prefix_len.to(device)
        parents = random_parents(batch, num_nodes, generator, device)
        _, tree_mask = reference.build_tree(parents)
        expected = reference.tree_attention(q.float(), k.float(), v.float(), prefix_len, tree_mask)
        kv_rows = int(prefix_len.sum()) + batch * num_nodes
        moved = 2 * kv_rows * kv_heads * head_dim * 2 + 2 * q.numel() * 2 + tree_mask.numel() * 4
        shape = f"{model},B={batch},T={num_nodes},prefix={prefix}"
        rows = (q_heads // kv_heads) * num_nodes
        block_d = max(16, 1 << (head_dim - 1).bit_length())
        block_m, _ = kernel._tile_config(device, q.dtype, rows, -(-rows // 64) * batch * kv_heads, block_d)
        m_blocks = -(-rows // block_m)
        splits_auto = kernel._choose_splits(device, m_blocks * batch * kv_heads, capacity, 64)
        candidates = [{"default": True}] + list(configs(rows, splits_auto))
        timer.reset()
        best = None
        for config in candidates:
            if time.time() - start > args.deadline:
                print(f"deadline reached in {shape}", flush=True)
                break
            options = {key: value for key, value in config.items() if key != "default"}

            def run(options=options):
                return kernel._launch(q, k, v, prefix_len, tree_mask, None, None, **options)

            try:
                error = (run().float() - expected).abs().max().item()
                times = [timer(run) for _ in range(args.repeats)]
            except Exception as failure:  # out of shared memory for this tile shape, say
                print(f"{shape} {config}: {type(failure).__name__}: {str(failure)[:100]}", flush=True)
                torch.cuda.synchronize()
                continue
            median = statistics.median(times)
            row = {
                "shape": shape,
                "config": "default" if config.get("default") else " ".join(f"{k}={v}" for k, v in options.items()),
                "median_us": round(median * 1e6, 2),
                "gbps": round(moved / median / 1e9, 1),
                "max_err": round(error, 4),
            }
            results.append(row)
            ok = error < 5e-2
            if config.get("default"):
                default = row
            elif ok and (best is None or row["median_us"] < best["median_us"]):
                best = row
            if not ok:
                print(f"{shape} {row['config']}: WRONG, max error {error}", flush=True)
        if best is not None:
            print(
                f"{shape:40s} default {default['median_us']:7.1f}us {default['gbps']:6.0f}GB/s | best "
                f"{best['median_us']:7.1f}us {best['gbps']:6.0f}GB/s [{best['config']}]",
                flush=True,
            )
    write_sweep(args.out, results, ["shape", "config", "median_us", "gbps", "max_err"], start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
