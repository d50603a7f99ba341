"""Launch-configuration sweep of the Triton LM-head top-k (and the draft heads around it) on a GPU.

    python bench/lm_head_configs.py [--deadline SECONDS] [--before FILE] [--out CSV]

For each shape (the draft-head target first: 64 rows x 4 heads = 256 rows, H=4096, V=128256, k=8,
bf16), every configuration (a fused-kernel `LaunchConfig` or a cuBLAS-chunks `ChunkedConfig`) is
checked against torch (the same top-k ids as `torch.topk` of the fp32 logits, where no two logits
tie within rounding) and timed from a CUDA graph like bench/kernels.py. Peers in the same loop:
cuBLAS logits alone (`torch_logits`, the floor a fused kernel competes with; `torch_logits_fp32`,
the same written as fp32, as the chunked path's matmuls do), logits + `torch.topk`
(`torch_logits_topk`), and, with `--before`, an
earlier `triton_kernels/lm_head_topk.py` (e.g. `git show REV:triton_kernels/lm_head_topk.py`).
Then `draft_heads_topk` at the issue's shape (N=1/8/64 rows, K=4 heads, one block each) as
bench/kernels.py times it: torch unfused against the Triton blocks + LM-head top-k with the
default configuration and with the fastest one found. Writes every row as CSV.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, repo root
from kernels import Timer, write_sweep  # noqa: E402

from treedec import reference  # noqa: E402
import triton_kernels  # noqa: E402, F401  (the package, so that --before's relative imports resolve)
from triton_kernels import draft_heads, lm_head_chunked as chunked, lm_head_topk as kernel  # noqa: E402

WIDTH, VOCAB, HEADS, K = 4096, 128256, 4, 8
ROW_COUNTS = (256, 64, 32, 4)  # N*K for N = 64, 8, 1 draft rows; 64: a 64-node greedy verify's width




def launch(hidden, weight, k, config):
    """The fused kernel for a LaunchConfig, the cuBLAS-chunks path for a ChunkedConfig."""
    if isinstance(config, chunked.ChunkedConfig):
        return chunked.launch(hidden, weight, k, config)
    return kernel._launch(hidden, weight, k, config)

def configs(rows: int):
    """The default (the fused kernel) first, then the cuBLAS-chunks path at several chunk and
    segment shapes, then the fused kernel with pointer loads and other tiles (the deadline may cut
    the tail)."""
    Config, Chunked = kernel.LaunchConfig, chunked.ChunkedConfig
    fused = default = kernel.default_config(rows, torch.bfloat16, torch.device("cuda"))
    chunk_v = chunked.chunk_width(rows)
    candidates = [default, Chunked(chunk_v),
                  Chunked(chunk_v, block_r=8, block_s=1024), Chunked(chunk_v, block_r=32, block_s=256, num_warps=8),
                  Chunked(chunk_v * 2), dataclasses.replace(fused, tma=False)]
    if rows <= 64:
        candidates.append(dataclasses.replace(fused, num_stages=7 - fused.num_stages))  # 3 <-> 4
    else:
        candidates += [Config(128, 256, num_warps=8, num_stages=3, splits_per_sm=1, tma=True),
                       Config(128, 128, num_warps=8, num_stages=4, splits_per_sm=2, tma=True)]
    seen = set()
    for config in candidates:
        if config not in seen:
            seen.add(config)
            yield config


def load_before(path: Path):
    """An earlier lm_head_topk.py as a module inside triton_kernels (it imports `._launch`)."""
    spec = importlib.util.spec_from_file_location("triton_kernels._lm_head_topk_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def median_us(timer: Timer, fn, repeats: int) -> float:
    return statistics.median(timer(fn) for _ in range(repeats)) * 1e6


def main(argv=None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--deadline", type=float, default=200.0, help="start no configuration after")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--before", type=Path, help="an older lm_head_topk.py to time")
    parser.add_argument("--device", default="cuda", help="cpu: smoke test (TRITON_INTERPRET=1)")
    parser.add_argument("--small", action="store_true", help="CPU smoke test: tiny shapes, two configurations")
    parser.add_argument("--out", type=Path, default=Path("lm_head_configs.csv"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    start = time.time()
    timer = Timer(device)
    generator = torch.Generator().manual_seed(11)
    width, vocab, row_counts = (WIDTH, VOCAB, ROW_COUNTS) if not args.small else (64, 1000, (24,))
    dtype = torch.bfloat16
    weight = (torch.randn(vocab, width, generator=generator) / width**0.5).to(device, dtype)
    before = load_before(args.before) if args.before else None
    results, best_config = [], {}

    def record(shape, name, us, error=""):
        results.append({"shape": shape, "config": name, "median_us": round(us, 2), "note": error})

    for rows in row_counts:
        shape = f"rows={rows},H={width},V={vocab},k={K},bf16"
        hidden = torch.randn(rows, width, generator=generator).to(device, dtype)
        logits = hidden.float() @ weight.float().T
        top = torch.topk(logits, K + 1).values
        # rows whose k-th and (k+1)-th logits are apart by more than the kernel's rounding
        clear = (top[:, K - 1] - top[:, K]) > 1e-2
        expected = torch.topk(logits, K).indices.sort(dim=-1).values  # as a set: near-equal values may swap
        timer.reset()
        peers = {
            "torch_logits": lambda hidden=hidden: hidden @ weight.T,
            "torch_logits_topk": lambda hidden=hidden: torch.topk((hidden @ weight.T).float(), K),
        }
        if device.type == "cuda" and chunked.fp32_logits_available(device):  # what the chunked path's matmuls write
            peers["torch_logits_fp32"] = lambda hidden=hidden: torch.mm(hidden, weight.T, out_dtype=torch.float32)
        if before is not None:
            peers["before"] = lambda hidden=hidden: before.lm_head_topk(hidden, weight, K)
        for name, fn in peers.items():
            record(shape, name, median_us(timer, fn, args.repeats))
            print(f"{shape} {name}: {results[-1]['median_us']:.1f} us", flush=True)
        candidates = list(configs(rows)) if not args.small else [kernel.default_config(rows, dtype, device),
                                                                kernel.LaunchConfig(16, 64, splits_per_sm=3),
                                                                chunked.ChunkedConfig(300, block_s=64)]
        default = candidates[0]
        best = None
        for config in candidates:
            if time.time() - start > args.deadline:
                print(f"deadline reached in {shape}", flush=True)
                break

            def run(config=config, hidden=hidden):
                return launch(hidden, weight, K, config)

            try:
                ids = run()[1].sort(dim=-1).values
                wrong = int((ids[clear] != expected[clear]).any(dim=-1).sum())
                us = median_us(timer, run, args.repeats)
            except Exception as failure:  # out of shared memory for this tile shape, say
                print(f"{shape} {config}: {type(failure).__name__}: {str(failure)[:200]}", flush=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                continue
            name = ("default " if config == default else "") + str(config)
            note = f"WRONG ids in {wrong} rows" if wrong else ""
            record(shape, name, us, note)
            print(f"{shape} {name}: {us:.1f} us {note}", flush=True)
            if not wrong and (best is None or us < best[1]):
                best = (config, us)
        if best is not None:
            best_config[rows] = best[0]
            print(f"{shape} best: {best[1]:.1f} us {best[0]}", flush=True)

    # draft_heads_topk as bench/kernels.py times it, with the default and the fastest LM-head config
    weights = (torch.randn(HEADS, 1, width, width, generator=generator) / width**0.5).to(device, dtype)
    biases = (torch.randn(HEADS, 1, width, generator=generator) * 0.1).to(device, dtype)
    for rows in sorted({r // HEADS for r in row_counts if r % HEADS == 0 and r != 64}):
        hidden = torch.randn(rows, width, generator=generator).to(device, dtype)
        shape = f"draft_heads_topk,N={rows},K={HEADS},L=1,H={width},V={vocab},k={K},bf16"
        timer.reset()

        def torch_unfused(hidden=hidden):  # as bench/kernels.py times it
            return reference.draft_heads_topk(hidden, weights, biases, weight, K)

        def fused(config=None, hidden=hidden):
            states = draft_heads.head_states(hidden, weights, biases)
            return launch(states.view(-1, width), weight, K, config)

        methods = {"torch_unfused": torch_unfused, "triton_default": fused, "blocks_only":
                   lambda hidden=hidden: draft_heads.head_states(hidden, weights, biases)}
        if rows * HEADS in best_config:
            methods["triton_best"] = lambda config=best_config[rows * HEADS]: fused(config)
        times = {name: median_us(timer, fn, args.repeats) for name, fn in methods.items()}
        for name, us in times.items():
            record(shape, name, us)
        line = "  ".join(f"{name}={us:.1f}us" for name, us in times.items())
        speedups = "  ".join(f"{name}: {times['torch_unfused'] / times[name]:.2f}x" for name in times
                             if name.startswith("triton"))
        print(f"{shape} {line}  ({speedups} against torch_unfused)", flush=True)

    write_sweep(args.out, results, ["shape", "config", "median_us", "note"], start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
