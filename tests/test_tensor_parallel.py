"""Tensor parallelism: a tiny Llama loaded with transformers' `tp_plan="auto"` on 2 ranks (torchrun,
gloo, CPU) decodes with treedec as it decodes unpatched, for every train-free drafter, layer-skip
and sampling, and every rank makes the same decisions (tree sizes and accept lengths per step),
including where trees are sized from measured times (which differ between ranks). So do OLMo 2,
whose plan gathers every KV head on every rank (its norm spans the heads), Gemma 2 (soft-caps,
hybrid sliding and global layers) and Qwen3-MoE (experts sharded by its plan)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from tp_worker import CASES

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
WORKER = Path(__file__).with_name("tp_worker.py")


# model type -> the KV heads each rank's cache holds (of 2): its shard, or all where the plan gathers them
CACHE_KV_HEADS = {"llama": 1, "olmo2": 2, "gemma2": 1, "qwen3_moe": 1}


@pytest.fixture(scope="module", params=sorted(CACHE_KV_HEADS))
def two_rank_results(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tp")
    if request.param == "llama":
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = transformers.LlamaForCausalLM(config).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(6.0)  # sharp distributions: drafts get accepted
    else:
        from test_model_types import build

        model = build(request.param, num_hidden_layers=3)
    model.save_pretrained(directory / "model")
    out = directory / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    # --standalone: torchrun picks a free port for its rendezvous itself
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               str(directory / "model"), str(out)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return request.param, json.loads(out.read_text())



@pytest.mark.parametrize("case", list(CASES))
def test_each_rank_decodes_as_the_unpatched_model(two_rank_results, case):
    model_type, two_rank_results = two_rank_results
    for rank, results in enumerate(two_rank_results):
        outcome = results[case]
        assert outcome["fallbacks"] == [], (rank, outcome["fallbacks"])
        assert outcome["equal"], (rank, case)
        assert outcome["cache_kv_heads"] == [CACHE_KV_HEADS[model_type]]
    drafter, _, _, timed = CASES[case]
    # drafts were accepted: the trees mattered (an early exit from the other families' random
    # models drafts nothing the full model accepts; the Llama's sharper head checks layer-skip)
    if drafter is not None and not timed and (drafter != "layerskip" or model_type == "llama"):
        assert two_rank_results[0][case]["tau"] > 1.0


@pytest.mark.parametrize("case", list(CASES))
def test_every_rank_makes_the_same_decisions(two_rank_results, case):
    """The same tree size and accept lengths at every step on both ranks (a mismatch would also
    have hung or failed the collectives)."""
    first, second = (results[case]["steps"] for results in two_rank_results[1])
    assert first and first == second
