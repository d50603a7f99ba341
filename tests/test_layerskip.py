"""drafter="layerskip": lossless in every mode, the cache after each step equals plain decoding's,
the SWIFT search finds layers that do nothing, and bad options fail clearly."""

import pytest
import torch

import treedec
from helpers import Tries, spy_proposals
from test_decoding import left_padded, repetitive_prompt
from treedec.drafters import layerskip
from treedec.drafters.layer_search import draft_cost_ratio, expected_gain, search
from treedec.tools.models import tiny_llama

# swift with a generous search budget: its result must not depend on how busy the machine is
# exit without branching: every step's tree is the drafted chain, which the verification reuses
MODES = [("fixed", {"skip_layers": [2, 3]}), ("exit", {"exit_layer": 2}),
         ("exit", {"exit_layer": 2, "branch_below": 0.0}), ("swift", {"search_seconds": 60})]


def peaked(seed: int, num_layers: int = 4, idle_layers=()):
    """A tiny Llama with sharp distributions (drafts get accepted); `idle_layers` add nothing to
    the residual stream (their output projections are zero), so skipping them changes nothing."""
    model = tiny_llama(seed=seed, num_layers=num_layers)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
        for index in idle_layers:
            model.model.layers[index].self_attn.o_proj.weight.zero_()
            model.model.layers[index].mlp.down_proj.weight.zero_()
    return model


def prompts_of_three():
    return left_padded([repetitive_prompt(0, 21), repetitive_prompt(1, 33), repetitive_prompt(2, 17)])


@pytest.mark.parametrize("mode,options", MODES)
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_is_lossless_in_every_mode(mode, options, batch, flat_step_costs):
    model = peaked(seed=3, num_layers=6, idle_layers=(2, 3))
    ids, mask = prompts_of_three()
    ids, mask = ids[:batch], mask[:batch]
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    treedec.patch(model, drafter="layerskip", mode=mode, stop_below=0.0, **options)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    assert torch.equal(got, expected)
    stats = model.treedec.last_stats
    assert stats["layerskip_drafted"] > 0 and stats["draft_seconds"] > 0
    if mode != "exit":  # skipping idle layers drafts exactly what the model says
        assert stats["tau"] > 1.5 and stats["layerskip_acceptance"] > 0.3
    elif options.get("branch_below") == 0.0:  # chain steps ran only the layers after the exit
        assert stats["layerskip_reused_steps"] > 0


@pytest.mark.parametrize("options", [dict(mode="fixed", skip_layers=[1]), dict(mode="exit", exit_layer=3,
                                                                              branch_below=0.0)])
def test_sampling_is_exact_with_layerskip(options):
    from test_sampling import sample_token_by_token

    model = peaked(seed=5, num_layers=4, idle_layers=(1,) if options["mode"] == "fixed" else (3,))
    prompts = [repetitive_prompt(3, 11), repetitive_prompt(4, 19)]
    ids, mask = left_padded(prompts)
    torch.manual_seed(11)
    expected = sample_token_by_token(model, prompts, 20, eos=2, pad=0, temperature=0.8, top_k=10)
    treedec.patch(model, drafter="layerskip", stop_below=0.0, **options)
    torch.manual_seed(11)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=True, temperature=0.8, top_k=10)
    assert torch.equal(got, expected)
    if options["mode"] == "exit":  # the sampled verification started at the exit layer
        assert model.treedec.last_stats["layerskip_reused_steps"] > 0


def test_eos_and_max_new_tokens_inside_drafted_chains():
    model = peaked(seed=7, num_layers=4, idle_layers=(1, 2))
    ids, mask = prompts_of_three()
    for new in (1, 2, 7):
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=5)
        treedec.patch(model, drafter="layerskip", mode="fixed", skip_layers=[1, 2], stop_below=0.0)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=5)
        treedec.unpatch(model)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("options", [dict(mode="fixed", skip_layers=[2]),
                                     dict(mode="exit", exit_layer=3, branch_below=0.0)])
def test_cache_after_every_step_equals_plain_decoding(options, monkeypatch, flat_step_costs):
    """Draft forwards write rows past the committed prefix for the layers they run; after each
    step's verification and compaction, every committed row of every layer must hold what a plain
    forward over the same tokens computes. In exit mode the verification reuses the drafts' rows
    of the first layers instead of rewriting them: they must be right too."""
    model = peaked(seed=3, num_layers=4, idle_layers=(2,) if options["mode"] == "fixed" else (3,))
    ids, mask = prompts_of_three()
    snapshots = []  # (sequence ids, committed rows, keys and values per layer) at each step's start
    original = layerskip.LayerSkipDrafter.propose

    def spy(self, request):
        cache = request.cache
        snapshots.append((list(request.rows), cache.prefix_len.clone(), cache.kv_start.clone(),
                          [k.clone() for k in cache.keys], [v.clone() for v in cache.values]))
        return original(self, request)

    monkeypatch.setattr(layerskip.LayerSkipDrafter, "propose", spy)
    treedec.patch(model, drafter="layerskip", stop_below=0.0, **options)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    assert model.treedec.last_stats["tau"] > 1.5  # drafts were accepted, so compaction moved rows
    if options["mode"] == "exit":
        assert model.treedec.last_stats["layerskip_reused_steps"] > 3
    treedec.unpatch(model)

    full_mask = torch.cat([mask, torch.ones(out.shape[0], out.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
    positions = (full_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = model(out, attention_mask=full_mask, position_ids=positions, use_cache=True).past_key_values
    assert len(snapshots) > 3
    for rows, prefix_len, kv_start, keys, values in snapshots:
        for batch_row, seq in enumerate(rows):
            lo, hi = int(kv_start[batch_row]), int(prefix_len[batch_row])
            for layer in range(len(keys)):
                want_k = plain.layers[layer].keys[seq, :, lo:hi]
                want_v = plain.layers[layer].values[seq, :, lo:hi]
                torch.testing.assert_close(keys[layer][batch_row, :, lo:hi], want_k, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(values[layer][batch_row, :, lo:hi], want_v, atol=1e-5, rtol=1e-4)


def test_swift_search_skips_the_layers_that_do_nothing():
    model = treedec.patch(peaked(seed=4, num_layers=8, idle_layers=(3, 4, 5)), drafter="layerskip")
    adapter = model.treedec.adapter
    window = torch.tensor(repetitive_prompt(9, 32))
    plan = search(adapter, window, depth=4, budget_seconds=30.0)
    skipped = plan.skipped(adapter.num_layers)
    assert plan.agreement == 1.0 and set(skipped) == {3, 4, 5}
    assert all(plan.layer_scores[i] == 1.0 for i in (3, 4, 5)) and plan.forwards == 1 + 6 + 4
    assert plan.expected_gain == pytest.approx(expected_gain(1.0, draft_cost_ratio(adapter, 5), 4))


def test_swift_drafts_with_the_found_set_and_searches_once_per_model(flat_step_costs):
    model = peaked(seed=4, num_layers=8, idle_layers=(3, 4, 5))
    ids, mask = prompts_of_three()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    treedec.patch(model, drafter="layerskip", stop_below=0.0)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False), expected)
    first = model.treedec.last_stats
    assert first["layerskip_search_seconds"] > 0 and first["layerskip_kept_layers"] == [0, 1, 2, 6, 7]
    assert first["tau"] > 2
    treedec.patch(model, drafter="layerskip", stop_below=0.0)  # re-patching keeps what the model learned
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False), expected)
    assert model.treedec.last_stats["layerskip_search_seconds"] == 0.0


def test_swift_drafts_nothing_when_no_set_pays():
    model = peaked(seed=6, num_layers=6)  # every layer matters in a random model
    ids = torch.tensor([repetitive_prompt(5, 30)])
    expected = model.generate(ids, max_new_tokens=12, do_sample=False)
    treedec.patch(model, drafter="layerskip")
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), expected)
    stats = model.treedec.last_stats  # the best set tried agreed on 2/3 of tokens: modelled at 0.6x
    assert stats["layerskip_kept_layers"] is None and stats["layerskip_expected_gain"] < 1.05
    assert stats["layerskip_drafted"] == 0 and stats["mean_tree_nodes"] == 1.0


def test_search_budget_bounds_its_cost():
    model = treedec.patch(peaked(seed=4, num_layers=8), drafter="layerskip")
    plan = search(model.treedec.adapter, torch.tensor(repetitive_prompt(1, 32)), depth=4, budget_seconds=0.0)
    assert plan.forwards <= 2 and plan.kept is None


def test_short_prompts_wait_for_enough_tokens_to_search():
    model = peaked(seed=4, num_layers=8, idle_layers=(3, 4, 5))
    ids = torch.tensor([[5, 6, 7]])
    expected = model.generate(ids, max_new_tokens=30, do_sample=False)
    treedec.patch(model, drafter="layerskip", stop_below=0.0)
    assert torch.equal(model.generate(ids, max_new_tokens=30, do_sample=False), expected)
    assert model.treedec.last_stats["layerskip_kept_layers"] == [0, 1, 2, 6, 7]  # searched mid-call


def test_stop_below_one_drafts_nothing_and_branching_adds_siblings(monkeypatch):
    model = peaked(seed=3, num_layers=4, idle_layers=(2,))
    ids = torch.tensor([repetitive_prompt(0, 20)])
    treedec.patch(model, drafter="layerskip", mode="fixed", skip_layers=[2], stop_below=1.0)
    model.generate(ids, max_new_tokens=10, do_sample=False)
    assert model.treedec.last_stats["layerskip_drafted"] == 0
    tries = Tries(spy_proposals(monkeypatch, layerskip.LayerSkipDrafter))
    treedec.patch(model, drafter="layerskip", mode="fixed", skip_layers=[2], stop_below=0.0,
                  branch_below=1.0, branch_k=3, draft_depth=2)
    model.generate(ids, max_new_tokens=10, do_sample=False)
    first = tries[0]
    assert len(first) == 1 + 2 * 3  # two depths, three candidates each (the chain follows the top-1)
    assert [key[2] for key in first.keys[1:4]] == [1, 2, 0]


@pytest.mark.parametrize(
    "options,message",
    [
        ({"mode": "medusa"}, "mode"),
        ({"mode": "swift", "skip_layers": [1]}, "skip_layers"),
        ({"mode": "fixed"}, "skip_layers"),
        ({"mode": "fixed", "skip_layers": "1,2"}, "skip_layers"),
        ({"mode": "fixed", "skip_layers": []}, "non-empty list"),
        ({"mode": "fixed", "skip_layers": [[1], []]}, "non-empty list"),
        ({"mode": "fixed", "skip_layers": [1.0]}, "skip_layers"),
        ({"draft_depth": True}, "draft_depth"),
        ({"draft_depth": 2.5}, "draft_depth"),
        ({"reuse_kv": 1}, "reuse_kv"),
        ({"mode": "swift", "exit_layer": 3}, "exit_layer"),
        ({"stop_below": 1.5}, "stop_below"),
        ({"branch_k": 0}, "branch_k"),
        ({"draft_depth": 0}, "draft_depth"),
        ({"search_seconds": -1}, "search_seconds"),
        ({"recycling_width": 4}, "unknown option"),
    ],
)
def test_bad_options_raise_at_patch(options, message):
    with pytest.raises(ValueError, match=message):
        treedec.patch(tiny_llama(), drafter="layerskip", **options)


@pytest.mark.parametrize("options", [{"mode": "fixed", "skip_layers": [0, 1]}, {"mode": "fixed", "skip_layers": [7]},
                                     {"mode": "exit", "exit_layer": 2}])
def test_layer_indices_outside_the_model_raise_at_patch(options):
    model = tiny_llama(num_layers=2)
    with pytest.raises(ValueError, match="layer"):
        treedec.patch(model, drafter="layerskip", **options)
    assert not hasattr(model, "treedec")


def test_sequences_with_their_own_skip_sets_draft_as_if_alone(monkeypatch):
    """Layer-skip batching: one batch, three skip sets; each sequence drafts what it drafts alone."""
    model = peaked(seed=3, num_layers=6, idle_layers=(2, 3))
    ids, mask = prompts_of_three()
    sets = [[2, 3], [1], [2, 4]]
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    proposed = spy_proposals(monkeypatch, layerskip.LayerSkipDrafter)
    treedec.patch(model, drafter="layerskip", mode="fixed", skip_layers=sets, stop_below=0.0, draft_depth=3)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False), expected)
    batched = {}
    for seq, trie in proposed:  # each sequence's first draft tree
        batched.setdefault(seq, list(trie.tokens))
    for seq, skipped in enumerate(sets):
        proposed.clear()
        alone = ids[seq : seq + 1, int((mask[seq] == 0).sum()) :]
        treedec.patch(model, drafter="layerskip", mode="fixed", skip_layers=skipped, stop_below=0.0, draft_depth=3)
        model.generate(alone, max_new_tokens=16, do_sample=False)
        assert list(proposed[0][1].tokens) == batched[seq]  # the first step's draft tree, token for token


def test_per_sequence_sets_must_match_the_batch():
    model = treedec.patch(peaked(seed=3), drafter="layerskip", mode="fixed", skip_layers=[[1], [2]])
    ids, mask = prompts_of_three()
    with pytest.raises(ValueError, match="2 skip sets for a batch of 3"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)


def test_forward_rows_equals_each_row_alone():
    """ModelAdapter.forward_rows with per-row layer sets against plain forwards of each row with
    its own layers; all rows active is the plain forward; KV is written only for running rows."""
    from treedec.attention import TreeStep
    from treedec.cache import TreeCache
    from treedec.decoding import chain_tree_mask

    model = treedec.patch(peaked(seed=2, num_layers=5), drafter=None)
    adapter = model.treedec.adapter
    tokens = torch.tensor([[5, 9, 11], [7, 3, 2], [4, 4, 8]])
    positions = torch.arange(3).expand(3, -1)

    def fresh():
        cache = TreeCache(5, 3, 2, 16, max_len=8, dtype=torch.float32, devices=torch.device("cpu"))
        cache.begin_step(3)
        return cache, TreeStep(cache.prefix_len.clone(), cache.kv_start.clone(), chain_tree_mask(3, 3))

    active = torch.ones(5, 3, dtype=torch.bool)
    active[[1, 3], 0] = False  # row 0 skips layers 1 and 3
    active[:, 2] = False  # row 2 runs nothing
    active[2, 1] = False  # row 1 skips layer 2
    with torch.inference_mode():
        cache, step = fresh()
        got = adapter.forward_rows(tokens, positions, cache, step, active)
        for row in (0, 1):
            kept = tuple(int(i) for i in active[:, row].nonzero().flatten())
            alone_cache, alone_step = fresh()
            want = adapter.forward(tokens, positions, alone_cache, alone_step, layers=adapter.layer_subset(kept))
            torch.testing.assert_close(got[row], want[row], atol=1e-5, rtol=1e-5)
            for layer in range(5):
                written = cache.keys[layer][row, :, :3]
                if active[layer, row]:
                    torch.testing.assert_close(written, alone_cache.keys[layer][row, :, :3], atol=1e-5, rtol=1e-5)
                else:
                    assert torch.count_nonzero(written) == 0
        assert all(torch.count_nonzero(k[2]) == 0 for k in cache.keys)  # row 2 wrote no KV
        embedded = adapter.norm(adapter.embed(tokens[2:3]))
        torch.testing.assert_close(got[2:3], embedded)  # and kept its (normed) embedding
        full_cache, full_step = fresh()
        full = adapter.forward(tokens, positions, full_cache, full_step)
        cache, step = fresh()
        torch.testing.assert_close(adapter.forward_rows(tokens, positions, cache, step, torch.ones(5, 3, dtype=torch.bool)),
                                   full, atol=1e-5, rtol=1e-5)


def test_exit_mode_reuse_writes_what_a_full_verify_writes():
    """reuse_kv=False verifies every tree in full; with reuse (the default) the chain steps start at
    the exit layer. Same tokens either way, batch and EOS included; branching steps fall back."""
    model = peaked(seed=7, num_layers=5, idle_layers=(3, 4))
    ids, mask = prompts_of_three()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=28, do_sample=False, eos_token_id=5)
    runs = {}
    for reuse, branch_below in ((False, 0.0), (True, 0.0), (True, 1.0)):  # 1.0: every depth branches
        treedec.patch(model, drafter="layerskip", mode="exit", exit_layer=3, stop_below=0.0, reuse_kv=reuse,
                      branch_below=branch_below)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=28, do_sample=False, eos_token_id=5)
        assert torch.equal(got, expected), (reuse, branch_below)
        runs[reuse, branch_below] = model.treedec.last_stats["layerskip_reused_steps"]
        treedec.unpatch(model)
    assert runs[False, 0.0] == 0 and runs[True, 0.0] > 3
    with pytest.raises(ValueError, match="reuse_kv"):
        treedec.patch(model, drafter="layerskip", mode="exit", reuse_kv="yes")


def test_forward_from_the_exit_layer_equals_the_full_forward():
    """Layers 0..E-1 with forward_rows(normed=False), then forward_from(E) on the same cache rows:
    the full forward's output and KV."""
    from treedec.attention import TreeStep
    from treedec.cache import TreeCache
    from treedec.decoding import chain_tree_mask

    model = treedec.patch(peaked(seed=2, num_layers=5), drafter=None)
    adapter = model.treedec.adapter
    tokens = torch.tensor([[5, 9, 11], [7, 3, 2]])
    positions = torch.arange(3).expand(2, -1)

    def fresh():
        cache = TreeCache(5, 2, 2, 16, max_len=8, dtype=torch.float32, devices=torch.device("cpu"))
        cache.begin_step(3)
        return cache, TreeStep(cache.prefix_len.clone(), cache.kv_start.clone(), chain_tree_mask(2, 3))

    with torch.inference_mode():
        full_cache, full_step = fresh()
        want = adapter.forward(tokens, positions, full_cache, full_step)
        cache, step = fresh()
        first = torch.zeros(5, 2, dtype=torch.bool)
        first[:2] = True
        residual = adapter.forward_rows(tokens, positions, cache, step, first, normed=False)
        got = adapter.forward_from(residual, positions, cache, step, start=2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for layer in range(5):
        torch.testing.assert_close(cache.keys[layer][:, :, :3], full_cache.keys[layer][:, :, :3])
        torch.testing.assert_close(cache.values[layer][:, :, :3], full_cache.values[layer][:, :, :3])
    with pytest.raises(ValueError, match="start"):
        adapter.forward_from(residual, positions, cache, step, start=5)
