"""One rank of tests/test_tensor_parallel.py, under torchrun with gloo on the CPU.

Loads the saved tiny model with transformers' tensor parallelism, decodes each case unpatched and
patched, records every verify step's tree size and accept lengths on this rank, and writes, from
rank 0, every rank's results to the JSON file named on the command line.
"""

import json
import sys
import warnings

import torch
import torch.distributed as dist
import transformers

sys.path.insert(0, __import__("os").path.dirname(__file__))
import treedec  # noqa: E402
from test_decoding import left_padded, repetitive_prompt  # noqa: E402
from test_sampling import sample_token_by_token  # noqa: E402
from treedec import decoding  # noqa: E402

# name -> (drafter, options, sampling settings or None, timed). Timed cases size trees from each
# rank's measured step times, agreed on (treedec.parallel), so whether they draft depends on the
# machine; the others price every tree size alike and always draft (as tests' flat_step_costs).
CASES = {
    "none": (None, {}, None, True),
    "lookup": ("lookup", {}, None, True),
    "auto": ("auto", {}, None, True),
    "layerskip-swift": ("layerskip", {"search_seconds": 2.0, "search_tokens": 16}, None, True),
    "lookup-flat": ("lookup", {}, None, False),
    "recycling-flat": ("recycling", {}, None, False),
    "layerskip-exit-flat": ("layerskip", {"mode": "exit", "exit_layer": 1}, None, False),
    "sampling-auto-flat": ("auto", {}, {"temperature": 0.8}, False),
}


def decisions_spy(log: list, heads: set):
    """Records each verify step's (tree size, accept lengths) on this rank, and the KV heads its
    cache's layers hold."""
    original = decoding.TreeDecoder._verify_step

    def spy(self, cache, parents, tokens, *args, **kwargs):
        out = original(self, cache, parents, tokens, *args, **kwargs)
        log.append([int(tokens.shape[1]), [int(n) for n in out[0]]])
        heads.update(int(keys.shape[1]) for keys in cache.keys)
        return out

    decoding.TreeDecoder._verify_step = spy


def flat_costs(flat: bool) -> None:
    from treedec import sizing

    if not hasattr(sizing.CostCurve, "_measured"):
        sizing.CostCurve._measured = (sizing.CostCurve.explored_nodes, sizing.CostCurve.cost, sizing.DraftGate.opens)
    explored, cost, opens = sizing.CostCurve._measured
    if flat:
        explored, cost = (lambda self, batch_size: max(sizing.TREE_SIZES)), (lambda self, batch_size, nodes: 1.0)
        opens = lambda self, batch_size: True  # noqa: E731
    sizing.CostCurve.explored_nodes, sizing.CostCurve.cost, sizing.DraftGate.opens = explored, cost, opens


def main(model_dir: str, out_path: str) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, distributed_config=transformers.DistributedConfig(tp_plan="auto"), dtype=torch.float32).eval()
    rank = dist.get_rank()
    rows = [repetitive_prompt(21, 9), repetitive_prompt(22, 14), [5, 7, 9, 5, 7]]
    ids, mask = left_padded(rows)
    log: list = []
    heads: set = set()
    decisions_spy(log, heads)
    results = {}
    for name, (drafter, options, sampling, timed) in CASES.items():
        flat_costs(not timed)
        if sampling is None:
            expected = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
        else:
            torch.manual_seed(3)
            expected = sample_token_by_token(model, rows, 24, eos=2, pad=0, **sampling)
        treedec.patch(model, drafter=drafter, **options)
        log.clear()
        heads.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if sampling is None:
                got = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
            else:
                torch.manual_seed(3)
                got = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=True, **sampling)
        fallbacks = [str(w.message) for w in caught if "falling back" in str(w.message)]
        results[name] = {"equal": bool(torch.equal(got, expected)), "fallbacks": fallbacks, "steps": list(log),
                         "tau": model.treedec.last_stats.get("tau"),
                         "cache_kv_heads": sorted(heads)}
        treedec.unpatch(model)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
