"""The engine on a CUDA device: lossless decoding with the native kernels in the loop, and one full
verify step (tree build, forward with Triton tree attention, LM-head top-k, verification, KV
compaction) captured in a CUDA graph and replayed. Skipped where no CUDA device is present."""

import pytest
import torch

import treedec
from helpers import make_parents, on_prefill_done
from test_decoding import left_padded, repetitive_prompt
from treedec import ops
from treedec.attention import TreeStep
from treedec.cache import TreeCache
from treedec.adapters import adapter_for
from treedec.decoding import chain_tree_mask
from treedec.tools.models import tiny_llama

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)


def native_backends_or_skip() -> None:
    """The point of these tests is the kernels: skip, naming what is missing, if they are not built."""
    cuda = torch.device("cuda")
    missing = [op for op, want in (("verify_greedy", "cuda"), ("compact_kv", "cuda"), ("tree_attention", "triton"),
                                   ("lm_head_topk", "triton")) if ops.choose_backend(cuda, op) != want]
    if missing:
        pytest.skip(f"no native CUDA kernel for {', '.join(missing)} in this install")


@pytest.mark.parametrize("fp32_lm_head", ["reference", "triton"])  # torch's GEMM + topk, or the fused kernel
@pytest.mark.parametrize("drafter", ["auto", "lookup", None])
def test_lossless_batch_on_gpu(drafter, fp32_lm_head, monkeypatch):
    native_backends_or_skip()
    if fp32_lm_head == "triton":  # the fused kernel for fp32 too: auto avoids it there by default
        monkeypatch.setattr(treedec.ops.lm_head.LM_HEAD_TOPK, "avoids", {})
    model = tiny_llama(seed=5).cuda()
    ids, mask = left_padded([repetitive_prompt(5, 9), repetitive_prompt(6, 23), [11, 4]])
    ids, mask = ids.cuda(), mask.cuda()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    treedec.patch(model, drafter=drafter)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    assert got.device == ids.device
    assert torch.equal(got, expected)
    assert model.treedec.last_stats["new_tokens"] == 3 * 40


def test_eos_inside_accepted_path_on_gpu():
    native_backends_or_skip()
    model = tiny_llama(seed=2).cuda()
    ids = torch.tensor([repetitive_prompt(2, 18)], device="cuda")
    free = model.generate(ids, max_new_tokens=30, do_sample=False)[0, ids.shape[1]:].tolist()
    eos = free[12]  # a token the model emits mid-run: generation must stop right after it
    expected = model.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=0)
    treedec.patch(model, drafter="auto")
    got = model.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)


# top_k 10: the fused top-k path (Triton, as fp32 runs it here only when forced); 0: full logits, CUDA sample_tokens
@pytest.mark.parametrize("top_k", [10, 0])
def test_sampling_equals_token_by_token_on_gpu(top_k, monkeypatch):
    from test_sampling import peaked_llama, sample_token_by_token

    native_backends_or_skip()
    monkeypatch.setattr(treedec.ops.lm_head.LM_HEAD_TOPK, "avoids", {})  # fp32 through the fused kernel
    model = peaked_llama(seed=3).cuda()
    prompts = [repetitive_prompt(3, 11), repetitive_prompt(4, 19), [7, 8]]
    ids, mask = left_padded(prompts)
    torch.manual_seed(11)
    expected = sample_token_by_token(model, prompts, 24, eos=2, pad=0, temperature=0.8, top_k=top_k)
    treedec.patch(model, drafter="auto")
    torch.manual_seed(11)
    got = model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=24, do_sample=True,
                         temperature=0.8, top_k=top_k)
    assert torch.equal(got.cpu(), expected)


# layer skipping on the GPU: per-sequence skip sets go through forward_rows (the row kernels), the
# others through plain partial forwards; each must write what greedy HF writes
@pytest.mark.parametrize("options", [dict(mode="fixed", skip_layers=[[2], [2, 3], [3]]),
                                     dict(mode="exit", exit_layer=4), dict(mode="swift")])
def test_layerskip_lossless_batch_on_gpu(options):
    from test_layerskip import peaked, prompts_of_three

    native_backends_or_skip()
    model = peaked(seed=3, num_layers=6, idle_layers=(2, 3)).cuda()
    ids, mask = prompts_of_three()
    ids, mask = ids.cuda(), mask.cuda()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    treedec.patch(model, drafter="layerskip", stop_below=0.0, **options)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False), expected)
    assert model.treedec.last_stats["layerskip_drafted"] > 0


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_heads_lossless_batch_on_gpu(kind, tmp_path):
    from test_heads import random_heads
    from test_layerskip import peaked
    from treedec.heads import save

    native_backends_or_skip()
    model = peaked(seed=3)
    save(random_heads(kind, model, seed=1), tmp_path / kind)
    model = model.cuda()
    ids, mask = left_padded([repetitive_prompt(0, 21), repetitive_prompt(1, 9), [7]])
    ids, mask = ids.cuda(), mask.cuda()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    treedec.patch(model, drafter=kind, heads=tmp_path / kind)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False), expected)
    assert model.treedec.last_stats["drafted"] > 0


class VerifyStep:
    """One decode step on static CUDA tensors (every sequence at the same prefix length, so the cache
    writes are slices and nothing reads back to the host)."""

    def __init__(self, model, batch: int, num_nodes: int, prompt_len: int):
        self.adapter = adapter_for(model)
        config = model.config
        head_dim = config.hidden_size // config.num_attention_heads
        self.cache = TreeCache(config.num_hidden_layers, batch, config.num_key_value_heads, head_dim,
                               max_len=prompt_len + num_nodes + 4, dtype=torch.float32, devices=torch.device("cuda"))
        prompt = torch.randint(3, config.vocab_size, (batch, prompt_len), device="cuda")
        prefill = TreeStep(self.cache.prefix_len.cuda(), self.cache.kv_start.cuda(),
                           chain_tree_mask(batch, prompt_len).cuda())
        self.cache.begin_step(prompt_len)
        with torch.no_grad():
            self.adapter.forward(prompt, torch.arange(prompt_len, device="cuda").expand(batch, -1), self.cache, prefill)
        self.cache.advance(prompt_len)
        self.cache.begin_step(num_nodes)  # every replay writes the same rows after the prompt
        self.prefix_len = self.cache.prefix_len.cuda()
        self.kv_start = self.cache.kv_start.cuda()
        self.parents = torch.zeros(batch, num_nodes, dtype=torch.int32, device="cuda")
        self.tokens = torch.zeros(batch, num_nodes, dtype=torch.int64, device="cuda")

    def set_inputs(self, parents: torch.Tensor, tokens: torch.Tensor) -> None:
        self.parents.copy_(parents)
        self.tokens.copy_(tokens)

    def run(self):
        depth, tree_mask = ops.build_tree(self.parents)
        step = TreeStep(self.prefix_len, self.kv_start, tree_mask)
        positions = (self.prefix_len - self.kv_start).long().view(-1, 1) + depth.long()
        hidden = self.adapter.forward(self.tokens.clamp(min=0), positions, self.cache, step)
        batch, num_nodes, width = hidden.shape
        _, ids = ops.lm_head_topk(hidden.reshape(-1, width), self.adapter.lm_head.weight, 1)
        target = ids.view(batch, num_nodes)
        accept_len, accept_nodes, bonus = ops.verify_greedy(self.parents, self.tokens, target)
        ops.compact_kv([*self.cache.keys, *self.cache.values], self.prefix_len, accept_nodes)
        return target, accept_len, accept_nodes, bonus

    def cache_rows(self) -> list[torch.Tensor]:
        return [t.clone() for t in (*self.cache.keys, *self.cache.values)]


def draft_inputs(verify: VerifyStep, seed: int):
    """A random tree whose first few chain nodes copy the model's own argmax, so some get accepted."""
    batch, num_nodes = verify.parents.shape
    gen = torch.Generator().manual_seed(seed)
    parents = make_parents(batch, num_nodes, "random", gen)
    tokens = torch.randint(3, 96, (batch, num_nodes), generator=gen)
    tokens[torch.rand(batch, num_nodes, generator=gen) < 0.1] = -1
    tokens[:, 0] = 5
    return parents, tokens


def test_verify_step_captures_and_replays_in_a_cuda_graph():
    native_backends_or_skip()
    torch.manual_seed(0)
    model = treedec.patch(tiny_llama(seed=9).cuda(), drafter=None)  # "treedec" attention
    verify = VerifyStep(model, batch=3, num_nodes=33, prompt_len=17)

    # Warm up on a side stream (Triton compiles, compaction's pointer array is built), as capture requires.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for seed in range(2):
            verify.set_inputs(*draft_inputs(verify, seed))
            verify.run()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = verify.run()

    for seed in (10, 11, 12):
        parents, tokens = draft_inputs(verify, seed)
        verify.set_inputs(parents, tokens)
        with torch.no_grad():
            root_argmax = verify.run()[0][:, 0].cpu()
        tokens[:, 1], parents[:, 1] = root_argmax, 0  # node 1 is now right: at least one acceptance
        verify.set_inputs(parents, tokens)
        with torch.no_grad():
            eager = verify.run()
        eager_cache = verify.cache_rows()

        graph.replay()
        torch.cuda.synchronize()
        for name, got, want in zip(("target", "accept_len", "accept_nodes", "bonus"), static_out, eager):
            assert torch.equal(got, want), name
        assert (static_out[1] >= 1).all()
        for got, want in zip(verify.cache_rows(), eager_cache):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# -- at most one device-to-host wait per decode step (test_host_transfers.py plays this on the CPU)

def cuda_host_reads(monkeypatch):
    """A TorchFunctionMode that records every blocking read of CUDA memory on the host (.cpu(),
    .tolist(), .item(), int/float/bool of a CUDA tensor, a blocking .to(cpu), a copy into a host
    tensor) outside host.to_host, each to_host call as one wait, and the decode steps' boundaries."""
    from torch.overrides import TorchFunctionMode

    from treedec import host, profiling

    tensor = torch.Tensor
    reads_of = {tensor.cpu, tensor.tolist, tensor.item, tensor.numpy, tensor.__int__, tensor.__float__,
                tensor.__bool__, tensor.__index__, tensor.__array__}
    events, boundaries, inside = [], [], [False]

    def to_cpu(args, kwargs) -> bool:
        targets = [a for a in args[1:] if isinstance(a, (str, torch.device))] + [kwargs.get("device")]
        return any(t is not None and torch.device(t).type == "cpu" for t in targets) and not kwargs.get("non_blocking")

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            first = args[0] if args and isinstance(args[0], tensor) else None
            if not inside[0] and first is not None:
                if first.is_cuda and (func in reads_of or (func is tensor.to and to_cpu(args, kwargs))):
                    events.append(getattr(func, "__name__", str(func)))
                elif (func in (tensor.copy_, tensor.__setitem__) and not first.is_cuda
                      and any(isinstance(a, tensor) and a.is_cuda for a in args[1:])):
                    events.append("copy to a host tensor")
            return func(*args, **kwargs)

    to_host = host.to_host

    def counted(*tensors):
        events.append("to_host")
        inside[0] = True
        try:
            return to_host(*tensors)
        finally:
            inside[0] = False

    monkeypatch.setattr(host, "to_host", counted)
    monkeypatch.setattr(profiling.NoProfile, "step_done", lambda self, seconds: boundaries.append(len(events)))
    on_prefill_done(monkeypatch, lambda: boundaries.append(len(events)))
    return Reads(), events, boundaries


@pytest.mark.parametrize("call", [dict(do_sample=False), dict(do_sample=True, temperature=0.8),
                                  dict(do_sample=True, top_k=0, top_p=0.9)])
@pytest.mark.parametrize("drafter", [None, "auto"])
def test_one_host_wait_per_step_on_gpu(drafter, call, monkeypatch):
    native_backends_or_skip()
    monkeypatch.setenv("TREEDEC_PINNED_READS", "1")  # opt-in until this test has passed on a GPU
    model = treedec.patch(tiny_llama(seed=1).cuda(), drafter=drafter)
    ids, mask = left_padded([repetitive_prompt(1, 13), repetitive_prompt(2, 6), [7]])
    ids, mask = ids.cuda(), mask.cuda()
    model.generate(ids, attention_mask=mask, max_new_tokens=8, **call)  # warm up (Triton compiles)
    mode, events, boundaries = cuda_host_reads(monkeypatch)
    with mode:
        model.generate(ids, attention_mask=mask, max_new_tokens=24, **call)
    assert len(boundaries) == model.treedec.last_stats["steps"] + 1 > 1  # the prefill, then the steps
    starts = [0] + boundaries[:-1]
    for number, (a, b) in enumerate(zip(starts, boundaries)):
        step = events[a:b]
        if number == 0:  # the prefill: the call's inputs reach the host first, then its one wait
            step = step[step.index("to_host"):] if "to_host" in step else step
        assert step == ["to_host"], f"{'prefill' if number == 0 else f'step {number - 1}'}: {events[a:b]}"
