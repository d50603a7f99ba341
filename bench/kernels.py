"""Kernel microbenchmarks: every treedec op x every backend available here, with peers.

    python bench/kernels.py [--quick] [--device cpu|cuda] [--threads N] [--out CSV] [--fresh] [--plot]
    python bench/kernels.py --plot-only [--out CSV]

Each shape times its methods interleaved (A B C A B C ...) after a warm-up, and records the median
and the 20th/80th percentiles in microseconds, plus GB/s against the bytes the op must move at
least (its inputs read once and outputs written once; for compaction, the moved rows read and
written). Rows are appended to one CSV (schema: kernel, backend, device, shape, median_us, p20_us,
p80_us, gbps). Peers run in the same process and the same loop:

- tree_attention: the reference (dense mask built per call, then SDPA) and PyTorch SDPA with a
  prebuilt dense boolean mask (``sdpa_dense_mask``, what Medusa and EAGLE run);
- compact_kv: the reference and per-layer torch indexing (``torch_index_per_layer``: one gather/
  scatter per cache tensor, all sequences at once);
- lm_head_topk: ``torch.topk(hidden @ weight.T)`` at torch's thread count (``torch_matmul_topk``)
  and, on CPU, at one thread (``torch_matmul_topk_1thread``);
- linear_rows: torch's nn.Linear (``torch_linear``) over 30 distinct weights per call (one
  projection of every layer of SmolLM2, so each weight comes from memory, as in a decode step);
- draft_heads_topk: each head's blocks through torch (F.linear per head and block), then the full
  ``[N*K, V]`` logits and ``torch.topk`` (``torch_unfused``); on CUDA at the issue's target shape
  (K=4 heads, Llama-3-8B's H=4096 and V=128256, bf16), on CPU at SmolLM2's;
- layer_rows (layer-skip batching): a SmolLM2 decoder layer over all rows with a mask
  (``masked_all_rows``) against gather -> layer on the active rows -> scatter (``gathered_<backend>``);
- build_tree / verify_greedy / verify_sample: the reference. Native kernels appear twice: the backend alone
  (``cpp``) and behind the public, validating ``treedec.ops`` function (``cpp+ops``).

On CUDA each method is replayed from a CUDA graph where it can be captured (device time per call,
launch overhead excluded; see `Timer`); the references and the ``+ops`` paths are timed eagerly,
so their figures include the host's launch path. ``copy`` (a large device-to-device copy) gives the
memory system's ceiling for reading the GB/s column.

On a shared 2-core CPU the numbers are noisy: read ratios between methods of one shape.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path, and this file would then stand in
# for the `kernels` package that transformers imports (hub kernels): drop the directory.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from treedec import ops, reference  # noqa: E402
from treedec.ops import OPS, registry  # noqa: E402

ROOT = Path(__file__).resolve().parent
FIELDS = ["kernel", "backend", "device", "shape", "median_us", "p20_us", "p80_us", "gbps"]

# (name, query heads, kv heads, head dim, layers)
MODELS = {
    "smollm2-135m": (9, 3, 64, 30),
    "llama3-8b": (32, 8, 128, 32),
    "llama-70b": (64, 8, 128, 80),
}


# -- timing -------------------------------------------------------------------------------------


class Timer:
    """Seconds per call of a method.

    CPU: a host clock around one call. CUDA: a single call between two events mostly measures the
    host's launch path, not the kernel (a few-microsecond kernel hides behind tens of microseconds
    of Python), so each method is first captured GRAPH_CALLS times into a CUDA graph and one replay
    is timed with events, divided by GRAPH_CALLS: the device time per call. Methods that cannot be
    captured, the torch references (they read results back to the host), and the ``+ops``
    paths, whose point is the public functions' eager overhead, are timed eagerly: GRAPH_CALLS
    calls back to back between events. `how` records which; `reset` forgets the graphs of a shape.
    """

    GRAPH_CALLS = 20

    def __init__(self, device: torch.device):
        self.device = device
        self.graphs: dict = {}  # method -> its CUDA graph, or None when timed eagerly
        self.how: dict = {}  # method -> "graph" | "eager"

    def reset(self) -> None:
        self.graphs.clear()
        self.how.clear()

    def prepare(self, fn, capture: bool = True) -> None:
        """Capture fn (CUDA only); after a failed capture fn is timed eagerly."""
        if self.device.type != "cuda" or fn in self.graphs:
            return
        if not capture:
            self.graphs[fn], self.how[fn] = None, "eager"
            return
        graph = torch.cuda.CUDAGraph()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()  # warm-up on a side stream, as capture requires
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                for _ in range(self.GRAPH_CALLS):
                    fn()
            graph.replay()
            torch.cuda.synchronize()
            self.graphs[fn], self.how[fn] = graph, "graph"
        except Exception:  # a host sync or a host-memory copy inside fn: not capturable
            torch.cuda.synchronize()
            self.graphs[fn], self.how[fn] = None, "eager"

    def __call__(self, fn) -> float:
        if self.device.type != "cuda":
            begin = time.perf_counter()
            fn()
            return time.perf_counter() - begin
        self.prepare(fn)
        graph = self.graphs[fn]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if graph is not None:
            graph.replay()
        else:
            for _ in range(self.GRAPH_CALLS):
                fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / self.GRAPH_CALLS


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def measure(methods: dict, timer: Timer, repeats: int, budget_s: float) -> dict[str, list[float]]:
    """Interleaved timings of every method; stops early once budget_s has passed (at least 3 rounds)."""
    timer.reset()
    for name, fn in methods.items():  # warm-up (and first-call costs: allocation, JIT, page faults)
        fn()
        fn()
        # The references read back to the host (a failed capture is best not provoked) and the
        # +ops paths are about eager overhead: both are timed eagerly.
        timer.prepare(fn, capture=not (name == "reference" or name.endswith("+ops")))
    times = {name: [] for name in methods}
    started = time.perf_counter()
    for round_index in range(repeats):
        for name, fn in methods.items():
            times[name].append(timer(fn))
        if round_index >= 2 and time.perf_counter() - started > budget_s:
            break
    return times


# -- workloads ----------------------------------------------------------------------------------


def random_parents(batch: int, num_nodes: int, generator: torch.Generator, device) -> torch.Tensor:
    index = torch.arange(num_nodes).clamp(min=1).to(torch.float64)
    parents = (torch.rand(batch, num_nodes, generator=generator, dtype=torch.float64) * index).long()
    parents[:, 0] = -1
    return parents.to(torch.int32).to(device)


def native_backends(device: torch.device, op: str) -> list[str]:
    found = []
    for backend in ("cpp", "cuda", "triton"):
        if backend == "triton" and device.type == "cpu":
            continue  # the interpreter's timings mean nothing
        if registry.built(backend) and registry.runs_on(backend, device) and OPS[op].implements(backend):
            found.append(backend)
    return found


def forced(backend: str, fn):
    """fn run with TREEDEC_BACKEND=backend (for the public ops path)."""

    def call():
        previous = os.environ.get("TREEDEC_BACKEND")
        os.environ["TREEDEC_BACKEND"] = backend
        try:
            return fn()
        finally:
            if previous is None:
                del os.environ["TREEDEC_BACKEND"]
            else:
                os.environ["TREEDEC_BACKEND"] = previous

    return call


def bench_build_tree(device, quick):
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 8) if quick else (1, 8, 64):
        for num_nodes in (8, 64) if quick else (8, 32, 64, 128):
            parents = random_parents(batch, num_nodes, generator, device)
            words = (num_nodes + 31) // 32
            moved = batch * num_nodes * (4 + 4 + 4 * words)
            methods = {"reference": lambda: reference.build_tree(parents)}
            for backend in native_backends(device, "build_tree"):
                run = OPS["build_tree"].implementation(backend)
                methods[backend] = lambda run=run: run(parents)
                methods[f"{backend}+ops"] = forced(backend, lambda: ops.build_tree(parents))
            yield "build_tree", f"B={batch},T={num_nodes}", moved, methods


def bench_verify_greedy(device, quick):
    generator = torch.Generator().manual_seed(1)
    for batch in (1, 8) if quick else (1, 8, 64):
        for num_nodes in (8, 64) if quick else (8, 32, 64, 128):
            parents = random_parents(batch, num_nodes, generator, device)
            target = torch.randint(0, 4, (batch, num_nodes), generator=generator).to(device)
            parent_target = target.gather(1, parents.long().clamp(min=0))
            keep = torch.rand(batch, num_nodes, generator=generator).to(device) < 0.7
            tokens = torch.where(keep, parent_target, torch.full_like(parent_target, 7))
            moved = batch * num_nodes * (4 + 8 + 8 + 4) + batch * (4 + 8)
            methods = {"reference": lambda: reference.verify_greedy(parents, tokens, target)}
            for backend in native_backends(device, "verify_greedy"):
                run = OPS["verify_greedy"].implementation(backend)
                methods[backend] = lambda run=run: run(parents, tokens, target)
                methods[f"{backend}+ops"] = forced(backend, lambda: ops.verify_greedy(parents, tokens, target))
            yield "verify_greedy", f"B={batch},T={num_nodes}", moved, methods


def bench_verify_sample(device, quick):
    """Top-k style target rows over a real vocabulary; the native methods are the backend's
    sample_tokens then its verify_greedy, which is what ops.verify_sample runs."""
    generator = torch.Generator().manual_seed(2)
    vocab = 49152
    for batch in (1, 8) if quick else (1, 8, 64):
        for num_nodes in (8, 64) if quick else (8, 32, 64, 128):
            parents = random_parents(batch, num_nodes, generator, device)
            probs = torch.rand(batch, num_nodes, vocab, generator=generator) ** 8  # peaked, unnormalised
            probs = probs.to(device)
            tokens = probs.argmax(-1).gather(1, parents.long().clamp(min=0))  # likely drafts
            uniforms = torch.rand(batch, num_nodes, generator=generator).to(device)
            moved = batch * num_nodes * (4 + 8 + 4 * vocab + 4 + 4) + batch * (4 + 8)
            methods = {"reference": lambda: reference.verify_sample(parents, tokens, probs, uniforms)}
            for backend in native_backends(device, "sample_tokens"):
                sample = OPS["sample_tokens"].implementation(backend)
                greedy = OPS["verify_greedy"].implementation(backend)

                def run(sample=sample, greedy=greedy):
                    target = sample(probs.view(-1, vocab), uniforms.view(-1)).view(batch, num_nodes)
                    return greedy(parents, tokens, target)

                methods[backend] = run
                public = lambda: ops.verify_sample(parents, tokens, probs, uniforms)  # noqa: E731
                methods[f"{backend}+ops"] = forced(backend, public)
            yield "verify_sample", f"B={batch},T={num_nodes},V={vocab}", moved, methods


def torch_index_per_layer(caches, prefix_len, accept_nodes):
    """The peer: per cache tensor, one advanced-indexing gather and scatter over all sequences."""
    valid = accept_nodes >= 0
    batch_index, position = valid.nonzero(as_tuple=True)
    base = prefix_len.long()[batch_index]
    src = base + accept_nodes.long()[batch_index, position]
    dst = base + position
    for cache in caches:
        cache[batch_index, :, dst] = cache[batch_index, :, src]


def bench_compact_kv(device, quick):
    generator = torch.Generator().manual_seed(2)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    models = ["smollm2-135m"] if quick else list(MODELS)
    for model in models:
        _, kv_heads, head_dim, layers = MODELS[model]
        for batch in (1, 2, 4, 8):
            if model == "llama-70b" and batch > 4 and device.type == "cpu":
                continue
            num_nodes, prefix, accepted = 64, 512, 8
            capacity = prefix + num_nodes
            caches = [
                torch.randn(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device) for _ in range(2 * layers)
            ]
            prefix_len = torch.randint(prefix // 2, prefix + 1, (batch,), generator=generator, dtype=torch.int32)
            rows = []
            for _ in range(batch):
                chosen = torch.randperm(num_nodes - 1, generator=generator)[:accepted].sort().values + 1
                row = torch.full((num_nodes,), -1, dtype=torch.int32)
                row[0] = 0
                row[1 : accepted + 1] = chosen.to(torch.int32)
                rows.append(row)
            accept_nodes = torch.stack(rows).to(device)
            prefix_len = prefix_len.to(device)
            moved_rows = int(((accept_nodes >= 0) & (accept_nodes != torch.arange(num_nodes, device=device))).sum())
            moved = 2 * moved_rows * kv_heads * head_dim * caches[0].element_size() * len(caches)
            methods = {
                "reference": lambda: reference.compact_kv(caches, prefix_len, accept_nodes),
                "torch_index_per_layer": lambda: torch_index_per_layer(caches, prefix_len, accept_nodes),
            }
            for backend in native_backends(device, "compact_kv"):
                run = OPS["compact_kv"].implementation(backend)
                methods[backend] = lambda run=run: run(caches, prefix_len, accept_nodes)
                methods[f"{backend}+ops"] = forced(backend, lambda: ops.compact_kv(caches, prefix_len, accept_nodes))
            shape = f"{model},layers={layers},B={batch},Hkv={kv_heads},D={head_dim},T={num_nodes},accept={accepted},{str(dtype)[6:]}"
            yield "compact_kv", shape, moved, methods


def bench_lm_head_topk(device, quick):
    generator = torch.Generator().manual_seed(3)
    vocab, width = 49152, 576
    dtypes = (torch.float32, torch.bfloat16) if device.type == "cpu" else (torch.bfloat16, torch.float32)
    for dtype in dtypes:
        weight = (torch.randn(vocab, width, generator=generator) / width**0.5).to(dtype).to(device)
        for rows in (1, 8, 16, 32):
            for k in (1, 8) if not quick else (1,) if rows in (8, 16) else (1, 8):
                hidden = torch.randn(rows, width, generator=generator).to(dtype).to(device)
                moved = weight.numel() * weight.element_size() + hidden.numel() * hidden.element_size() + rows * k * 12
                methods = {"torch_matmul_topk": lambda: torch.topk((hidden @ weight.T).float(), k)}
                if device.type == "cpu" and torch.get_num_threads() > 1:

                    def one_thread():
                        threads = torch.get_num_threads()
                        torch.set_num_threads(1)
                        try:
                            torch.topk((hidden @ weight.T).float(), k)
                        finally:
                            torch.set_num_threads(threads)

                    methods["torch_matmul_topk_1thread"] = one_thread
                for backend in native_backends(device, "lm_head_topk"):
                    run = OPS["lm_head_topk"].implementation(backend)
                    methods[backend] = lambda run=run: run(hidden, weight, k)
                shape = f"N={rows},V={vocab},H={width},k={k},{str(dtype)[6:]}"
                yield "lm_head_topk", shape, moved, methods


def bench_linear_rows(device, quick):
    if device.type != "cpu":
        return  # a CPU kernel: CUDA tensors run torch
    generator = torch.Generator().manual_seed(5)
    layers = 30
    shapes = ((1536, 576), (576, 1536)) if not quick else ((1536, 576),)
    for dtype in (torch.float32, torch.bfloat16):
        for out, width in shapes:
            weights = [(torch.randn(out, width, generator=generator) / width**0.5).to(dtype) for _ in range(layers)]
            for rows in (1, 2, 4, 8, 16, 32):
                x = torch.randn(rows, width, generator=generator).to(dtype)
                moved = layers * (weights[0].numel() + (rows * (out + width))) * weights[0].element_size()
                methods = {"torch_linear": lambda x=x: [torch.nn.functional.linear(x, w) for w in weights]}
                for backend in native_backends(device, "linear_rows"):
                    run = OPS["linear_rows"].implementation(backend)
                    methods[backend] = lambda run=run, x=x: [run(x, w) for w in weights]
                shape = f"N={rows},O={out},H={width},{layers} weights,{str(dtype)[6:]}"
                yield "linear_rows", shape, moved, methods


def bench_draft_heads_topk(device, quick):
    """Medusa-style heads: K heads of L residual blocks, then each head's top-k over the vocabulary.
    GB/s counts the heads' weights and the LM head read once, plus inputs and outputs."""
    generator = torch.Generator().manual_seed(7)
    heads, blocks, k = 4, 1, 8
    if device.type == "cuda":
        shapes = [("llama3-8b", 4096, 128256, torch.bfloat16)]
        row_counts = (1, 8, 64) if not quick else (64,)
    else:  # the embedded model's heads, then (not with --quick: 1 GB of LM head) the GPU shape
        shapes = [("smollm2-135m", 576, 49152, dtype) for dtype in (torch.float32, torch.bfloat16)]
        shapes += [("llama3-8b", 4096, 128256, torch.bfloat16)] if not quick else []
        row_counts = (1, 8, 64) if not quick else (8,)
    for model, width, vocab, dtype in shapes:
        weights = (torch.randn(heads, blocks, width, width, generator=generator) / width**0.5).to(device, dtype)
        biases = (torch.randn(heads, blocks, width, generator=generator) * 0.1).to(device, dtype)
        lm_weight = (torch.randn(vocab, width, generator=generator) / width**0.5).to(device, dtype)
        for rows in row_counts:
            hidden = torch.randn(rows, width, generator=generator).to(device, dtype)
            element = hidden.element_size()
            moved = (weights.numel() + biases.numel() + lm_weight.numel() + hidden.numel()) * element
            moved += rows * heads * (width * element + k * 12)

            def torch_unfused(hidden=hidden):  # per-head blocks, [N*K, V] logits, torch.topk
                return reference.draft_heads_topk(hidden, weights, biases, lm_weight, k)

            methods = {"torch_unfused": torch_unfused}
            for backend in native_backends(device, "draft_heads_topk"):
                run = OPS["draft_heads_topk"].implementation(backend)
                methods[backend] = lambda run=run, hidden=hidden: run(hidden, weights, biases, lm_weight, k)
            shape = f"{model},N={rows},K={heads},L={blocks},H={width},V={vocab},k={k},{str(dtype)[6:]}"
            yield "draft_heads_topk", shape, moved, methods


def bench_layer_rows(device, quick):
    """Layer-skip batching: one SmolLM2-sized decoder layer over a batch where only some rows run
    it. Peer: the layer over every row, its output kept where a boolean mask says (``masked_all_rows``,
    what a batch without row gathering does). Native methods: gather the active rows (the backend's
    gather_rows), run the layer on that block, scatter it back. GB/s counts the rows moved."""
    from treedec.tools.models import tiny_llama

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    config = dict(vocab_size=64, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                  num_key_value_heads=3, num_layers=1)
    model = tiny_llama(seed=0, **config).to(device=device, dtype=dtype)
    layer, rotary = model.model.layers[0], model.model.rotary_emb
    generator = torch.Generator().manual_seed(6)
    grid = [(8, 1), (32, 4), (64, 8)] if quick else [(8, 1), (8, 8), (32, 1), (32, 4), (64, 1), (64, 8)]
    for batch, tokens in grid:
        for fraction in (0.25, 0.5) if not quick else (0.5,):
            x = torch.randn(batch, tokens, 576, generator=generator).to(device=device, dtype=dtype)
            count = max(1, round(batch * fraction))
            rows = torch.randperm(batch, generator=generator)[:count].sort().values.to(device)
            mask = torch.zeros(batch, dtype=torch.bool, device=device)
            mask[rows] = True
            positions = torch.arange(tokens, device=device).expand(batch, -1)
            cos, sin = rotary(x, position_ids=positions)

            def masked(x=x, mask=mask, cos=cos, sin=sin):
                with torch.inference_mode():
                    out = layer(x, attention_mask=None, position_embeddings=(cos, sin))
                    return torch.where(mask.view(-1, 1, 1), out, x)

            methods = {"masked_all_rows": masked}
            for backend in ["reference", *native_backends(device, "gather_rows")]:
                gather = OPS["gather_rows"].implementation(backend)
                scatter = OPS["scatter_rows"].implementation(backend)

                def batched(gather=gather, scatter=scatter, x=x, rows=rows, cos=cos, sin=sin):
                    with torch.inference_mode():
                        block = layer(gather(x, rows), attention_mask=None,
                                      position_embeddings=(gather(cos, rows), gather(sin, rows)))
                        scatter(x, rows, block)

                methods[f"gathered_{backend}"] = batched
            moved = 2 * count * tokens * 576 * x.element_size()
            shape = f"smollm2-layer,B={batch},T={tokens},active={count}/{batch},{str(dtype)[6:]}"
            yield "layer_rows", shape, moved, methods


def bench_tree_attention(device, quick):
    generator = torch.Generator().manual_seed(4)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if device.type == "cpu":
        grid = [("smollm2-135m", b, t, p) for b in (1, 4) for t in (8, 64) for p in (128, 1024)]
        if not quick:
            grid += [("smollm2-135m", 1, 64, 8192), ("llama3-8b", 1, 64, 1024), ("llama-70b", 1, 64, 1024)]
    else:
        grid = [(m, b, t, p) for m in MODELS for b in (1, 8) for t in (8, 64, 128) for p in (128, 1024, 4096, 8192)]
        grid += [(m, 64, 64, 1024) for m in MODELS]
    for model, batch, num_nodes, prefix in grid:
        q_heads, kv_heads, head_dim, _ = MODELS[model]
        capacity = prefix + num_nodes
        q = torch.randn(batch, q_heads, num_nodes, head_dim, dtype=dtype, device=device)
        k = torch.randn(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        v = torch.randn_like(k)
        prefix_len = torch.full((batch,), prefix, dtype=torch.int32)
        prefix_len[1::2] = prefix - prefix // 4  # ragged
        prefix_len = prefix_len.to(device)
        parents = random_parents(batch, num_nodes, generator, device)
        _, tree_mask = reference.build_tree(parents)
        dense = reference.dense_tree_mask(prefix_len, tree_mask, None, num_nodes, capacity)
        gqa = q_heads != kv_heads
        element = q.element_size()
        kv_rows = int(prefix_len.sum()) + batch * num_nodes
        moved = 2 * kv_rows * kv_heads * head_dim * element + 2 * q.numel() * element + tree_mask.numel() * 4
        methods = {
            "reference": lambda: reference.tree_attention(q, k, v, prefix_len, tree_mask),
            "sdpa_dense_mask": lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=dense, enable_gqa=gqa
            ),
        }
        for backend in native_backends(device, "tree_attention"):
            run = OPS["tree_attention"].implementation(backend)
            methods[backend] = lambda run=run: run(q, k, v, prefix_len, tree_mask, None, None)
        shape = f"{model},B={batch},Hq={q_heads},Hkv={kv_heads},D={head_dim},T={num_nodes},prefix={prefix},{str(dtype)[6:]}"
        yield "tree_attention", shape, moved, methods


def bench_copy(device, quick):
    """The memory system's ceiling: a large device-to-device copy (bytes read + written), so the
    kernels' GB/s can be read as a fraction of what this device can move."""
    numel = (64 if device.type == "cpu" else 512) * 2**20 // 4  # 64 MiB CPU, 512 MiB GPU, fp32
    source = torch.randn(numel, device=device)
    target = torch.empty_like(source)
    yield "copy", f"{numel * 4 // 2**20}MiB", 2 * numel * 4, {"torch_copy": lambda: target.copy_(source)}


BENCHES = {
    "copy": bench_copy,
    "build_tree": bench_build_tree,
    "verify_greedy": bench_verify_greedy,
    "verify_sample": bench_verify_sample,
    "compact_kv": bench_compact_kv,
    "lm_head_topk": bench_lm_head_topk,
    "linear_rows": bench_linear_rows,
    "draft_heads_topk": bench_draft_heads_topk,
    "layer_rows": bench_layer_rows,
    "tree_attention": bench_tree_attention,
}


# -- output -------------------------------------------------------------------------------------


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(",", " ")
    threads = torch.get_num_threads()
    return f"cpu({os.cpu_count()} cores,{threads} threads)"


def append_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def write_sweep(path: Path, rows: list[dict], fieldnames: list[str], started: float) -> None:
    """A launch sweep's rows (bench/*_configs.py) as a fresh CSV, and the line saying so."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} rows to {path} in {time.time() - started:.0f}s")


def plot(path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib, or the 'bench' extra); skipping the plot")
        return
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    kernels = sorted({row["kernel"] for row in rows})
    figure, axes = plt.subplots(len(kernels), 1, figsize=(14, 4.5 * len(kernels)), squeeze=False)
    for axis, kernel in zip(axes[:, 0], kernels):
        subset = [row for row in rows if row["kernel"] == kernel]
        shapes = list(dict.fromkeys(row["shape"] for row in subset))
        several_devices = len({row["device"] for row in subset}) > 1

        def series_of(row):
            return f"{row['backend']} [{row['device']}]" if several_devices else row["backend"]

        backends = list(dict.fromkeys(series_of(row) for row in subset))
        width = 0.8 / len(backends)
        for index, backend in enumerate(backends):
            latest = {row["shape"]: row for row in subset if series_of(row) == backend}  # last run wins
            xs = [i + index * width for i, s in enumerate(shapes) if s in latest]
            ys = [float(latest[s]["median_us"]) for s in shapes if s in latest]
            axis.bar(xs, ys, width=width, label=backend)
        axis.set_yscale("log")
        axis.set_title(f"{kernel} (median us, lower is better)")
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
        axis.set_xticklabels(shapes, rotation=30, ha="right", fontsize=6)
        axis.legend(fontsize=7)
    figure.tight_layout()
    out = path.with_suffix(".png")
    figure.savefig(out, dpi=110)
    print(f"plot written to {out}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller shapes (CPU-affordable)")
    parser.add_argument("--kernels", default=",".join(BENCHES), help="comma-separated subset of " + ",".join(BENCHES))
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per shape (default 25 CPU, 100 GPU)")
    parser.add_argument("--budget", type=float, default=None, help="seconds per shape before stopping early")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run")
    parser.add_argument("--out", type=Path, default=None, help="CSV to append to (default bench/results/kernels_<device>.csv)")
    parser.add_argument("--fresh", action="store_true", help="overwrite the CSV instead of appending")
    parser.add_argument("--plot", action="store_true", help="also plot the CSV (matplotlib) next to it as .png")
    parser.add_argument("--plot-only", action="store_true", help="plot the existing CSV without benchmarking")
    args = parser.parse_args(argv)

    unknown = [name for name in args.kernels.split(",") if name not in BENCHES]
    if unknown:
        parser.error(f"--kernels: unknown {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (25 if device.type == "cpu" else 100)
    budget = args.budget or (4.0 if device.type == "cpu" else 2.0)
    out = args.out or ROOT / "results" / f"kernels_{device.type}.csv"
    if args.plot_only:
        plot(out)
        return 0
    timer = Timer(device)
    label = device_label(device)
    print(f"# device: {label}; backends: {registry.available_backends()}; torch {torch.__version__}")
    if args.fresh and out.exists():
        out.unlink()
    total = 0
    for name in args.kernels.split(","):
        for kernel, shape, moved, methods in BENCHES[name](device, args.quick):
            times = measure(methods, timer, repeats, budget)
            rows, line = [], []
            for backend, values in times.items():
                median = statistics.median(values)
                row = {
                    "kernel": kernel,
                    "backend": backend,
                    "device": label,
                    "shape": shape,
                    "median_us": round(median * 1e6, 2),
                    "p20_us": round(percentile(values, 0.2) * 1e6, 2),
                    "p80_us": round(percentile(values, 0.8) * 1e6, 2),
                    "gbps": round(moved / median / 1e9, 3),
                }
                rows.append(row)
                how = timer.how.get(methods[backend])
                line.append(f"{backend}={row['median_us']:.1f}us" + (f"({how})" if how == "eager" else ""))
            append_rows(out, rows)  # shape by shape: a run cut short keeps what it measured
            total += len(rows)
            print(f"{kernel:15s} {shape:80s} " + "  ".join(line), flush=True)
    print(f"{total} rows {'written' if args.fresh else 'appended'} to {out}")
    if args.plot:
        plot(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
