"""Draft heads (medusa, hydra): modules, save/load, lossless decoding with them, training."""

import pytest
import torch

import treedec
from helpers import Tries, spy_proposals
from test_decoding import left_padded, repetitive_prompt
from test_layerskip import peaked
from treedec.heads import HeadsConfig, build_heads, load, save
from treedec.tools.models import tiny_llama


def random_heads(kind: str, model, num_heads: int = 3, seed: int = 0):
    """Heads with random (not identity) blocks, so drafts vary and get rejected too."""
    config = HeadsConfig(kind, num_heads, model.config.hidden_size, model.config.vocab_size, base_model="tiny")
    heads = build_heads(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in heads.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return heads


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_head_states_shapes_and_identity_start(kind):
    heads = build_heads(HeadsConfig(kind, 4, 16, 50))
    hidden = torch.randn(5, 16)
    if kind == "medusa":
        states = heads.states(hidden)
    else:
        states = heads.states(hidden, torch.randn(5, 4, 16))
    assert states.shape == (5, 4, 16)
    torch.testing.assert_close(states[:, 2], hidden)  # untrained heads keep the state (Medusa's start)


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_save_load_round_trip(kind, tmp_path):
    model = peaked(seed=1)
    heads = random_heads(kind, model)
    save(heads, tmp_path / "h", extra={"top1": [0.5, 0.25, 0.1]})
    loaded = load(tmp_path / "h")
    assert type(loaded) is type(heads) and loaded.config == heads.config
    for (name, a), (_, b) in zip(heads.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="does not hold draft heads"):
        load(tmp_path / "nothing")


def test_bad_configs_and_options_raise(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        HeadsConfig("eagle", 2, 8, 8)
    with pytest.raises(ValueError, match="num_heads"):
        HeadsConfig("medusa", 0, 8, 8)
    with pytest.raises(ValueError, match="heads=PATH"):
        treedec.patch(peaked(seed=1), drafter="medusa")
    model = peaked(seed=1)
    save(random_heads("hydra", model), tmp_path / "hydra")
    with pytest.raises(ValueError, match="holds hydra heads, not medusa"):
        treedec.patch(model, drafter="medusa", heads=tmp_path / "hydra")
    with pytest.raises(ValueError, match="widths"):
        treedec.patch(model, drafter="hydra", heads=tmp_path / "hydra", widths=[2, 2, 2, 2])
    other = build_heads(HeadsConfig("medusa", 2, 32, model.config.vocab_size))
    save(other, tmp_path / "wide")
    treedec.patch(model, drafter="medusa", heads=tmp_path / "wide")
    with pytest.raises(ValueError, match="hidden size 32"):
        model.generate(torch.tensor([repetitive_prompt(1, 12)]), max_new_tokens=4, do_sample=False)


@pytest.mark.parametrize("context", [False, True])
@pytest.mark.parametrize("kind", ["medusa", "hydra"])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_is_lossless_with_random_heads(kind, batch, context, tmp_path, flat_step_costs):
    model = peaked(seed=3)
    save(random_heads(kind, model, seed=batch), tmp_path / kind)
    ids, mask = left_padded([repetitive_prompt(0, 21), repetitive_prompt(1, 9), [7]])
    ids, mask = ids[:batch], mask[:batch]
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    treedec.patch(model, drafter=kind, heads=tmp_path / kind, context=context)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False), expected)
    stats = model.treedec.last_stats
    assert stats["mean_tree_nodes"] > 1 and stats["drafted"] > 0  # the heads' drafts reached the verifier
    assert 0 <= stats["draft_acceptance"] <= 1


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_an_fp32_models_heads_draft_in_bf16(kind, tmp_path, flat_step_costs):
    """The drafts (not the verify) run in bf16 on an fp32 model; the output stays the fp32 model's."""
    from treedec.patching import learned_tables

    model = peaked(seed=3)
    save(random_heads(kind, model, seed=2), tmp_path / kind)
    ids = torch.tensor([repetitive_prompt(0, 21)])
    expected = model.generate(ids, max_new_tokens=30, do_sample=False)
    treedec.patch(model, drafter=kind, heads=tmp_path / kind)
    assert torch.equal(model.generate(ids, max_new_tokens=30, do_sample=False), expected)
    heads = [table for key, table in learned_tables(model).items() if key[0] == "heads"]
    assert len(heads) == 1 and {p.dtype for p in heads[0].parameters()} == {torch.bfloat16}
    assert model.lm_head.weight.dtype == torch.float32 and model.treedec.last_stats["drafted"] > 0


@pytest.mark.parametrize("context", [False, True])
@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_sampling_is_exact_with_heads(kind, context, tmp_path):
    from test_sampling import sample_token_by_token

    model = peaked(seed=5)
    save(random_heads(kind, model), tmp_path / kind)
    prompts = [repetitive_prompt(3, 11), repetitive_prompt(4, 19)]
    ids, mask = left_padded(prompts)
    torch.manual_seed(11)
    expected = sample_token_by_token(model, prompts, 20, eos=2, pad=0, temperature=0.8, top_k=10)
    treedec.patch(model, drafter=kind, heads=tmp_path / kind, context=context)
    torch.manual_seed(11)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=True, temperature=0.8, top_k=10)
    assert torch.equal(got, expected)


def test_hydra_branches_follow_their_path(monkeypatch, tmp_path):
    """Medusa gives every branch of a depth the same guesses; Hydra's depend on the branch."""
    from treedec.drafters import heads as heads_drafter

    model = peaked(seed=3)
    found = {}
    for kind in ("medusa", "hydra"):
        heads = random_heads(kind, model, seed=7)
        if kind == "hydra":  # the tiny model's embeddings are small (std 0.02): make them count
            size = model.config.hidden_size
            with torch.no_grad():
                for layer in heads.inputs:
                    layer.weight[:, size:].mul_(300.0)
        save(heads, tmp_path / kind)
        proposed = spy_proposals(monkeypatch, heads_drafter.HeadsDrafter)
        treedec.patch(model, drafter=kind, heads=tmp_path / kind, widths=[3, 2], context=False)
        model.generate(torch.tensor([repetitive_prompt(2, 15)]), max_new_tokens=3, do_sample=False)
        trie = proposed[0][1]
        assert len(trie) == 1 + 3 + 6
        found[kind] = [tuple(trie.tokens[i] for i in range(len(trie)) if trie.parents[i] == parent)
                       for parent in (1, 2, 3)]
        monkeypatch.undo()
    assert len(set(found["medusa"])) == 1  # the same two guesses under each depth-1 node
    assert len(set(found["hydra"])) > 1


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_a_few_training_steps_reduce_the_loss_and_resume(kind, tmp_path):
    from treedec.tools.heads_training import train_heads

    model = peaked(seed=4)
    prompts = [repetitive_prompt(s, 10) for s in range(4)]
    heads, reports = train_heads(model, prompts, kind, num_heads=2, tokens=120, out=tmp_path / kind, epochs=3,
                                 lr=3e-3, batch_size=16, max_new_tokens=40, base_model="tiny", progress=False)
    assert len(reports) == 3 and reports[-1].loss < reports[0].loss
    assert all(0 <= a <= b <= 1 for a, b in zip(reports[-1].top1, reports[-1].top5))
    loaded = load(tmp_path / kind)
    assert loaded.config.kind == kind and loaded.config.num_heads == 2
    # resuming: the data and the checkpoint are reused, two more epochs continue from epoch 3
    _, more = train_heads(model, prompts, kind, num_heads=2, tokens=120, out=tmp_path / kind, epochs=5,
                          lr=3e-3, batch_size=16, progress=False)
    assert [r.epoch for r in more] == [1, 2, 3, 4, 5] and more[2].loss == reports[2].loss
    ids = torch.tensor([repetitive_prompt(1, 10)])
    expected = model.generate(ids, max_new_tokens=20, do_sample=False)
    treedec.patch(model, drafter=kind, heads=tmp_path / kind)
    assert torch.equal(model.generate(ids, max_new_tokens=20, do_sample=False), expected)


def test_training_into_a_directory_of_other_heads_is_a_clear_error(tmp_path):
    from treedec.tools.heads_training import CHECKPOINT_NAME, train_heads

    model = peaked(seed=4)
    prompts = [repetitive_prompt(s, 10) for s in range(4)]
    settings = dict(tokens=60, epochs=1, batch_size=16, max_new_tokens=20, progress=False)
    train_heads(model, prompts, "medusa", num_heads=2, out=tmp_path, **settings)
    for kind, heads, message in (("hydra", 2, "kind 'medusa' \\(asked for 'hydra'\\)"),
                                 ("medusa", 3, "num_heads 2 \\(asked for 3\\)")):
        with pytest.raises(ValueError, match=f"{tmp_path} holds other heads: {message}"):
            train_heads(model, prompts, kind, num_heads=heads, out=tmp_path, **settings)
    (tmp_path / "heads.json").unlink()  # the checkpoint alone still tells
    with pytest.raises(ValueError, match=f"{tmp_path / CHECKPOINT_NAME} holds heads of another kind"):
        train_heads(model, prompts, "hydra", num_heads=2, out=tmp_path, **settings)


def test_training_targets_are_the_tokens_after_the_root():
    """h_t's LM-head token is t+1 (the root at decode time); head k (0-based) learns token t+2+k,
    and Hydra's head k reads token t+1+k."""
    from treedec.tools.heads_training import Example, flatten

    tokens = torch.arange(10, 20)
    example = Example(tokens, torch.arange(10).float().view(10, 1).expand(10, 3), generated_from=4)
    positions = flatten([example], 3)
    hidden, targets, inputs = positions.hidden, positions.targets, positions.inputs
    for row in range(hidden.shape[0]):
        t = int(hidden[row, 0])
        assert t == 3 + row
        assert targets[row].tolist() == [int(tokens[i]) if i < 10 else -100 for i in (t + 2, t + 3, t + 4)]
        assert inputs[row].tolist() == [int(tokens[i]) if i < 10 else 0 for i in (t + 1, t + 2, t + 3)]
    assert hidden.shape[0] == 5  # positions 3..7
    # with the model's greedy choices recorded, head k learns greedy[t+1+k] (the argmax for token
    # t+2+k), not the text's token: sampled text's token may not be the one greedy decoding accepts
    example.greedy = torch.arange(100, 110)
    positions = flatten([example], 3)
    for row in range(positions.hidden.shape[0]):
        t = int(positions.hidden[row, 0])
        assert positions.targets[row].tolist() == [100 + i - 1 if i < 10 else -100 for i in (t + 2, t + 3, t + 4)]
        assert positions.inputs[row].tolist() == inputs[row].tolist()  # Hydra still reads the text


def test_soft_targets_read_the_state_whose_argmax_is_the_target():
    """teacher_rows[p, k] is the hidden state the LM head turns into token t+2+k: its argmax is
    exactly the greedy target, across examples of different lengths, with the prompt parts
    skipped."""
    from treedec.tools.heads_training import collect, flatten, greedy_tokens

    model = peaked(seed=4)
    examples = collect(model, [repetitive_prompt(s, 4 + 3 * s) for s in range(3)], tokens=10**6, max_new_tokens=9,
                       samples=1, temperature=1.5, batch_size=3, progress=False)
    positions = flatten(examples, 3)
    teacher_argmax = greedy_tokens(model, positions.states[positions.teacher_rows].flatten(0, 1)).view(-1, 3)
    valid = positions.targets != -100
    assert valid.sum() > 20 and (~valid).any()
    assert torch.equal(teacher_argmax[valid], positions.targets[valid])
    assert torch.equal(positions.hidden, torch.cat([e.hidden[max(e.generated_from - 1, 0) : len(e.tokens) - 2]
                                                    for e in examples]))


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_soft_target_training_reduces_the_argmax_loss(kind, tmp_path):
    from treedec.tools.heads_training import train_heads

    model = peaked(seed=4)
    prompts = [repetitive_prompt(s, 10) for s in range(4)]
    _, reports = train_heads(model, prompts, kind, num_heads=2, tokens=120, out=tmp_path, epochs=3, lr=3e-3,
                             batch_size=16, max_new_tokens=40, progress=False, soft_targets=True)
    assert reports[-1].loss < reports[0].loss
    assert "soft" in load(tmp_path).meta["targets"]


def test_collected_greedy_text_matches_the_recorded_greedy_choices():
    """Greedy continuations: the recorded argmax after each generated position is the next token.
    Sampled ones: they differ somewhere (else the targets would not need the argmax)."""
    from treedec.tools.heads_training import collect

    model = peaked(seed=4)
    prompts = [repetitive_prompt(s, 5 + s) for s in range(6)]
    examples = collect(model, prompts, tokens=10**6, max_new_tokens=16, samples=2, temperature=1.5,
                       batch_size=4, progress=False)
    assert len(examples) == 18
    greedy, sampled = examples[:6], examples[6:]
    for example in greedy:
        start = example.generated_from
        assert torch.equal(example.greedy[start - 1 : -1], example.tokens[start:])
    assert any(not torch.equal(e.greedy[e.generated_from - 1 : -1], e.tokens[e.generated_from:]) for e in sampled)


def test_collection_jobs_come_in_rounds_that_cover_every_prompt():
    """Greedy first (shortest prompt first), then sampled rounds: a collection cut short after any
    whole round has the same number of samples of every prompt."""
    from treedec.tools.heads_training import collection_jobs

    lengths = [5, 1, 3]
    jobs = collection_jobs(lengths, samples=5, batch_size=3)  # rounds of round(2 * 3 / 3) = 2 samples
    assert jobs[:3] == [(1, False), (2, False), (0, False)]
    sampled = jobs[3:]
    assert sampled[:6] == [(1, True), (1, True), (2, True), (2, True), (0, True), (0, True)]
    assert sampled[6:12] == sampled[:6] and sampled[12:] == [(1, True), (2, True), (0, True)]
    assert collection_jobs(lengths, samples=0, batch_size=3) == jobs[:3]
    # one round holds all of a prompt's samples when two batches would cover them anyway
    assert collection_jobs([2, 2], samples=3, batch_size=64)[2:] == [(0, True)] * 3 + [(1, True)] * 3


def test_collection_batches_keep_within_their_token_budget():
    from treedec.tools.heads_training import next_batch

    lengths = [10, 10, 10, 100, 100]
    jobs = [(0, False), (1, True), (2, True), (3, True), (4, True)]
    assert next_batch(jobs, 0, lengths, 8, 20, None) == 1  # greedy and sampled never share a call
    assert next_batch(jobs, 1, lengths, 8, 20, None) == 5
    assert next_batch(jobs, 1, lengths, 2, 20, None) == 3  # batch_size
    # 2 rows x (10 + 20) fit 60; a third row of length 100 would need 3 x 120
    assert next_batch(jobs, 1, lengths, 8, 20, 60) == 3
    assert next_batch(jobs, 1, lengths, 8, 20, 120 * 4) == 5
    assert next_batch(jobs, 3, lengths, 8, 20, 10) == 4  # one row over the budget still runs alone


def test_a_token_budget_changes_how_collection_batches_not_what_it_writes():
    from treedec.tools.heads_training import collect

    model = peaked(seed=4)
    prompts = [repetitive_prompt(s, 4 + 5 * s) for s in range(5)]
    whole = collect(model, prompts, tokens=10**6, max_new_tokens=12, batch_size=8, progress=False)
    budgeted = collect(model, prompts, tokens=10**6, max_new_tokens=12, batch_size=8, progress=False,
                       batch_tokens=2 * (4 + 5 * 2 + 12))
    assert [e.prompt for e in whole] == [e.prompt for e in budgeted] == list(range(5))
    for a, b in zip(whole, budgeted):
        assert torch.equal(a.tokens, b.tokens) and a.generated_from == b.generated_from
        torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="batch_tokens"):
        collect(model, prompts, tokens=10, batch_tokens=0, progress=False)


def test_train_heads_command_refuses_a_token_budget_below_one(tmp_path, capsys):
    import treedec.tools.cli

    assert treedec.tools.cli.main(["train-heads", "--kind", "medusa", "--out", str(tmp_path),
                             "--collect-batch-tokens", "0"]) == 2
    assert "--collect-batch-tokens = 0 must be an int >= 1" in capsys.readouterr().err
    for bad in ("7", "-3", "many"):
        assert treedec.tools.cli.main(["train-heads", "--kind", "medusa", "--out", str(tmp_path), "--draft-vocab", bad]) == 2
        assert "--draft-vocab must be 'all' or an int >= 8" in capsys.readouterr().err


def test_train_heads_command(monkeypatch, tmp_path, capsys):
    """`treedec train-heads` on a tiny model (the loader stubbed): heads, data and log land in --out."""
    import treedec.tools.cli
    from test_benchmark import ChatStub
    from treedec.tools.prompts import BUILTIN_PROMPTS

    model = peaked(seed=4)
    texts = {p.text: repetitive_prompt(i, 10) for i, p in enumerate(BUILTIN_PROMPTS)}
    stub = ChatStub({**texts, "hello": repetitive_prompt(9, 12)})
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"category": "writing", "turns": ["hello"]}\n')
    stub.chat_template = "stub"
    monkeypatch.setattr(treedec.tools.cli, "_load", lambda *args: (model, stub))
    out = tmp_path / "heads"
    assert treedec.tools.cli.main(["train-heads", "--kind", "hydra", "--heads", "2", "--tokens", "60", "--epochs", "1",
                             "--out", str(out), "--questions", str(tmp_path / "none.jsonl")]) == 2
    assert treedec.tools.cli.main(["train-heads", "--kind", "hydra", "--heads", "2", "--tokens", "60", "--epochs", "1",
                             "--max-new-tokens", "20", "--out", str(out), "--questions", str(questions),
                             "--draft-vocab", "all"]) == 0
    assert "saved to" in capsys.readouterr().out
    assert load(out).config.kind == "hydra" and load(out).meta["draft_vocab"] == model.config.vocab_size
    assert {p.name for p in out.iterdir()} >= {"heads.json", "heads.safetensors", "distill_data.pt", "checkpoint.pt",
                                               "train_log.json", "token_frequencies.safetensors"}
    # a probability per generated position of the training text: they sum to the positions
    frequencies = load(out).token_frequencies
    assert frequencies.shape == (model.config.vocab_size,)
    trained_on = float(load(out).meta["trained_on_tokens"])
    torch.testing.assert_close(float(frequencies.sum()), trained_on, rtol=1e-4, atol=0)


def test_best_tree_on_a_hand_computed_example():
    """Head 1: ranks 0.6, 0.2; head 2: 0.5, 0.3. Node probabilities: (0)=.6, (1)=.2, (0,0)=.3,
    (0,1)=.18, (1,0)=.1, (1,1)=.06. The best 3 nodes: (0), (0,0), (1) -> 1.1 expected tokens; the
    best 4 add (0,1) -> 1.28; no 4-node tree does better."""
    import itertools

    from treedec.heads.tree import best_tree, expected_accepted

    accuracies = [[0.6, 0.2], [0.5, 0.3]]
    assert best_tree(accuracies, 3) == [(0,), (0, 0), (1,)]
    assert expected_accepted(accuracies, best_tree(accuracies, 3)) == pytest.approx(1.1)
    four = best_tree(accuracies, 4)
    assert four == [(0,), (0, 0), (1,), (0, 1)] and expected_accepted(accuracies, four) == pytest.approx(1.28)
    nodes = [(0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1)]
    closed = [t for t in itertools.combinations(nodes, 4) if all(p[:-1] in t or len(p) == 1 for p in t)]
    assert max(expected_accepted(accuracies, list(t)) for t in closed) == pytest.approx(1.28)
    assert best_tree(accuracies, 100) == best_tree(accuracies, 6)  # at most every node
    with pytest.raises(ValueError):
        best_tree([[1.5]], 2)


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_heads_with_measured_accuracies_draft_the_static_tree(kind, monkeypatch, tmp_path):
    from treedec.drafters import heads as heads_drafter
    from treedec.heads.tree import best_tree

    model = peaked(seed=3)
    accuracies = [[0.5, 0.2, 0.1, 0.05], [0.3, 0.1, 0.05, 0.02], [0.2, 0.05, 0.02, 0.01]]
    save(random_heads(kind, model, seed=2), tmp_path / "m", extra={"rank_accuracy": accuracies})
    tries = Tries(spy_proposals(monkeypatch, heads_drafter.HeadsDrafter))
    ids = torch.tensor([repetitive_prompt(2, 15)])
    expected = model.generate(ids, max_new_tokens=12, do_sample=False)
    treedec.patch(model, drafter=kind, heads=tmp_path / "m", context=False)  # the heads' tree alone
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), expected)
    paths = best_tree(accuracies, heads_drafter.STATIC_TREE_NODES)
    trie = tries[0]
    # every node's rank path, from its key's rank and its parent's path: exactly the static tree
    node_paths = [()]
    for i in range(1, len(trie)):
        node_paths.append(node_paths[trie.parents[i]] + (trie.keys[i][2],))
        assert trie.keys[i][1] == len(node_paths[i])  # the key's depth
    assert sorted(node_paths[1:]) == sorted(paths)
    if kind == "medusa":  # Medusa drafts in the order the tree was built
        assert node_paths[1:] == paths
    # the key's last field is the guess's confidence bin: a lower rank under the same parent is
    # never less sure, and Medusa's guess at a (depth, rank) is one guess under every parent
    bins = {}
    for i in range(1, len(trie)):
        assert 0 <= trie.keys[i][3] <= len(heads_drafter.CONFIDENCE_EDGES)
        bins.setdefault((trie.parents[i], trie.keys[i][2]), trie.keys[i][3])
    for (parent, rank), confidence in bins.items():
        if (parent, rank + 1) in bins:
            assert confidence >= bins[(parent, rank + 1)]
    if kind == "medusa":
        assert len({(trie.keys[i][1:3], trie.keys[i][3]) for i in range(1, len(trie))}) == \
            len({trie.keys[i][1:3] for i in range(1, len(trie))})


def test_confidence_bins_of_top_k_logits():
    from treedec.drafters.heads import CONFIDENCE_EDGES, confidence_bins

    values = torch.tensor([[12.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 1.0, -30.0]])
    # probabilities renormalised over the k guesses: ~1, 1/3 each, 0.73 / 0.27 / ~0
    assert confidence_bins(values).tolist() == [[6, 0, 0], [2, 2, 2], [5, 2, 0]]
    assert confidence_bins(values.to(torch.bfloat16)).tolist() == [[6, 0, 0], [2, 2, 2], [5, 2, 0]]
    assert len(CONFIDENCE_EDGES) == 6 and bool((CONFIDENCE_EDGES.diff() > 0).all())


def test_the_sizer_keeps_a_sure_guess_and_prunes_an_unsure_one_at_the_same_position():
    """What the confidence bins are for: two steps draft the same tree position, one with a sure
    guess and one with an unsure one; with the rates the loop measured per bin, only the sure one
    is worth a larger verify."""
    from treedec import sizing
    from treedec.drafters.base import DraftTrie

    acceptance = sizing.AcceptanceModel()
    for step in range(40):
        acceptance.update(("medusa", 1, 0, 6), step % 10 != 0)  # 90% accepted
        acceptance.update(("medusa", 1, 0, 1), step % 10 == 0)  # 10%
    cost = sizing.CostCurve()
    for size, seconds in ((1, 1.0), (2, 1.3), (3, 1.4)):
        cost.record(1, size, seconds)
    for confidence, size in ((6, 2), (1, 1)):
        trie = DraftTrie(5)
        trie.child(0, 7, ("medusa", 1, 0, confidence))
        assert sizing.choose([trie], acceptance, cost, 8)[0] == size


def test_context_drafts_merge_into_the_heads_tree(monkeypatch, tmp_path):
    """With context=True each step's tree holds the context drafter's nodes (lookup, recycling) and
    the heads' (keys ("medusa", depth, rank, confidence bin)), a shared token once."""
    from treedec.drafters import heads as heads_drafter

    model = peaked(seed=3)
    save(random_heads("medusa", model, seed=2), tmp_path / "m")
    tries = Tries(spy_proposals(monkeypatch, heads_drafter.HeadsDrafter))
    ids = torch.tensor([repetitive_prompt(2, 30)])  # repetitive: lookup finds matches
    expected = model.generate(ids, max_new_tokens=16, do_sample=False)
    treedec.patch(model, drafter="medusa", heads=tmp_path / "m", context=True)
    assert torch.equal(model.generate(ids, max_new_tokens=16, do_sample=False), expected)
    kinds = {key[0] if isinstance(key, tuple) else key for trie in tries for key in trie.keys[1:]}
    assert "medusa" in kinds and len(kinds) > 1
    for trie in tries:  # no node has two children with the same token
        pairs = [(trie.parents[i], trie.tokens[i]) for i in range(1, len(trie))]
        assert len(pairs) == len(set(pairs))
    with pytest.raises(ValueError, match="context"):
        treedec.patch(model, drafter="medusa", heads=tmp_path / "m", context="yes")


def test_hydra_drafts_as_much_of_the_static_tree_as_the_sizer_keeps(monkeypatch, tmp_path):
    """Hydra's cost grows with its frontier: once the sizer keeps few nodes, it drafts a prefix of
    the static tree (the best smaller tree) sized from what was kept, not all 48 nodes."""
    from treedec.drafters import heads as heads_drafter
    from treedec.heads.tree import best_tree

    model = peaked(seed=3)
    accuracies = [[0.5, 0.2, 0.1, 0.05], [0.3, 0.1, 0.05, 0.02], [0.2, 0.05, 0.02, 0.01]]
    save(random_heads("hydra", model, seed=2), tmp_path / "h", extra={"rank_accuracy": accuracies})
    tries, kept = [], []
    original = heads_drafter.HeadsDrafter.propose

    def spy(self, request):
        kept.append(self.kept)  # what the tree's size is decided from
        tries.extend(original(self, request))
        return tries[-len(request.rows):]

    monkeypatch.setattr(heads_drafter.HeadsDrafter, "propose", spy)
    ids = torch.tensor([repetitive_prompt(2, 15)])
    expected = model.generate(ids, max_new_tokens=40, do_sample=False)
    treedec.patch(model, drafter="hydra", heads=tmp_path / "h", context=False)
    assert torch.equal(model.generate(ids, max_new_tokens=40, do_sample=False), expected)
    paths = best_tree(accuracies, heads_drafter.STATIC_TREE_NODES)
    for trie, average in zip(tries, kept):
        node_paths = [()]
        for i in range(1, len(trie)):
            node_paths.append(node_paths[trie.parents[i]] + (trie.keys[i][2],))
        allowed = max(heads_drafter.HYDRA_MIN_NODES, int(heads_drafter.HYDRA_SLACK * average) + 2)
        assert set(node_paths[1:]) == set(paths[:allowed])
    assert len(tries[0]) == 1 + len(paths) and min(map(len, tries)) < len(tries[0])


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_own_lm_heads_start_as_the_models_train_and_stay_lossless(kind, tmp_path, flat_step_costs):
    """own_lm_head: each head its own [V, H] projection, a copy of the model's at the start, then
    trained (the model's own stays untouched); saved, loaded and drafted with, losslessly."""
    from treedec.tools.heads_training import train_heads

    model = peaked(seed=4)
    base = model.get_output_embeddings().weight.detach().clone()
    prompts = [repetitive_prompt(s, 10) for s in range(4)]
    heads, reports = train_heads(model, prompts, kind, num_heads=2, tokens=120, out=tmp_path / kind, epochs=3,
                                 lr=3e-3, batch_size=16, max_new_tokens=40, progress=False, own_lm_head=True)
    assert reports[-1].loss < reports[0].loss
    assert torch.equal(model.get_output_embeddings().weight, base)
    loaded = load(tmp_path / kind)
    assert loaded.config.own_lm_head and len(loaded.lm_heads) == 2
    assert not torch.equal(loaded.lm_heads[0].float(), base)  # trained away from the copy
    fresh = build_heads(HeadsConfig(kind, 2, 64, 96, own_lm_head=True))
    fresh.init_lm_heads(base)
    assert all(torch.equal(weight, base) for weight in fresh.lm_heads)
    ids = torch.tensor([repetitive_prompt(1, 10)])
    expected = model.generate(ids, max_new_tokens=20, do_sample=False)
    treedec.patch(model, drafter=kind, heads=tmp_path / kind, context=False)
    assert torch.equal(model.generate(ids, max_new_tokens=20, do_sample=False), expected)
    assert model.treedec.last_stats["drafted"] > 0
    with pytest.raises(ValueError, match="own_lm_head"):
        HeadsConfig(kind, 2, 64, 96, own_lm_head="yes")


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_eos_and_max_new_tokens_inside_accepted_paths(kind, tmp_path):
    """Generation stops right after an EOS the tree accepted, and at max_new_tokens mid-path."""
    model = peaked(seed=3)
    save(random_heads(kind, model, seed=1), tmp_path / kind)
    ids, mask = left_padded([repetitive_prompt(0, 21), repetitive_prompt(1, 9), [7]])
    free = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)[0, ids.shape[1]:].tolist()
    eos = free[12]  # a token the model emits mid-run
    for new in (1, 2, 7, 30):
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=eos,
                                  pad_token_id=0)
        treedec.patch(model, drafter=kind, heads=tmp_path / kind)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=eos,
                             pad_token_id=0)
        treedec.unpatch(model)
        assert torch.equal(got, expected), new


def test_token_frequencies_rank_the_draft_vocabulary():
    """A token's frequency is the model's probability for it summed over the generated positions;
    the draft vocabulary is the most frequent ids, ties to the smaller id, in increasing id order."""
    from treedec.tools.heads_training import Example
    from treedec.heads.vocab import default_size, draft_vocabulary, token_frequencies

    lm_head = torch.nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(torch.eye(10) * 60.0)  # a one-hot state picks its token with probability ~1
    chosen = [9, 9, 4, 4, 1, 7, 8]  # the state at position t picks chosen[t]
    hidden = torch.nn.functional.one_hot(torch.tensor(chosen), 10).float()
    # generated from position 3: the states at 2..5 count (the last one's output is past the text)
    first = Example(torch.arange(7), hidden, 3)
    second = Example(torch.zeros(4, dtype=torch.int64), hidden[[5, 2, 2, 0]], 1)  # states 0..2 count
    frequencies = token_frequencies([first, second], lm_head, chunk=2)
    expected = torch.tensor([0, 1, 0, 0, 4, 0, 0, 2, 0, 0], dtype=torch.float64)  # 4, 4, 1, 7 then 7, 4, 4
    torch.testing.assert_close(frequencies, expected, atol=1e-6, rtol=0)
    assert draft_vocabulary(expected, 2).tolist() == [4, 7]
    assert draft_vocabulary(expected, 4).tolist() == [0, 1, 4, 7]  # then the smallest of the tied zeros
    assert draft_vocabulary(expected, 50).tolist() == list(range(10))
    assert default_size(expected, 0.5) == 1 and default_size(expected, 0.6) == 2  # 4/7, then 6/7 of the mass
    assert default_size(expected, 1.0) == 3 and default_size(torch.zeros(4), 0.99) == 4  # no ranking: all
    for size in (0, 2.5, True):
        with pytest.raises(ValueError, match="draft_vocab"):
            draft_vocabulary(expected, size)


def test_token_frequencies_round_trip_with_the_heads(tmp_path):
    from treedec.heads.vocab import save_frequencies

    model = peaked(seed=1)
    save(random_heads("medusa", model), tmp_path / "h")
    assert load(tmp_path / "h").token_frequencies is None  # heads saved before frequencies were
    frequencies = torch.rand(model.config.vocab_size)
    save_frequencies(frequencies, tmp_path / "h")
    assert torch.equal(load(tmp_path / "h").token_frequencies, frequencies)
    save_frequencies(frequencies[:5], tmp_path / "h")
    with pytest.raises(ValueError, match="holds \\(5,\\) frequencies"):
        load(tmp_path / "h")


@pytest.mark.parametrize("own_lm_head", [False, True])
@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_heads_guess_only_draft_vocabulary_tokens_and_stay_lossless(kind, own_lm_head, monkeypatch, tmp_path):
    """With draft_vocab=N the heads' nodes hold only the N most frequent tokens (ids mapped back
    from the LM head's rows), and the output is still the model's greedy text, batch 1 and 3;
    heads with their own LM heads read only those rows of theirs."""
    from treedec.drafters import heads as heads_drafter
    from treedec.heads.vocab import save_frequencies

    model = peaked(seed=3)
    vocab = model.config.vocab_size
    heads = random_heads(kind, model, seed=2)
    if own_lm_head:
        config = HeadsConfig(kind, 3, model.config.hidden_size, vocab, own_lm_head=True)
        heads = build_heads(config)
        heads.load_state_dict(random_heads(kind, model, seed=2).state_dict(), strict=False)
        heads.init_lm_heads(model.lm_head.weight.detach() * torch.linspace(0.5, 1.5, vocab)[:, None])
    save(heads, tmp_path / kind)
    frequencies = torch.rand(vocab, generator=torch.Generator().manual_seed(0))
    save_frequencies(frequencies, tmp_path / kind)
    allowed = set(torch.topk(frequencies, vocab // 3).indices.tolist())
    tries = Tries(spy_proposals(monkeypatch, heads_drafter.HeadsDrafter))
    ids, mask = left_padded([repetitive_prompt(0, 21), repetitive_prompt(1, 9), [7]])
    for batch in (1, 3):
        expected = model.generate(ids[:batch], attention_mask=mask[:batch], max_new_tokens=24, do_sample=False)
        treedec.patch(model, drafter=kind, heads=tmp_path / kind, context=False, draft_vocab=vocab // 3)
        out = model.generate(ids[:batch], attention_mask=mask[:batch], max_new_tokens=24, do_sample=False)
        assert torch.equal(out, expected) and model.treedec.last_stats["draft_vocab"] == vocab // 3
        treedec.unpatch(model)
    guessed = {trie.tokens[i] for trie in tries for i in range(1, len(trie))}
    assert guessed and guessed <= allowed
    # without draft_vocab: the tokens that hold DRAFT_MASS of the frequency (uniform-ish here: most)
    drafter = heads_drafter.HeadsDrafter(load(tmp_path / kind))
    size = drafter.vocab_ids.shape[0]
    top = torch.sort(frequencies.double(), descending=True).values
    assert top[: size - 1].sum() < heads_drafter.DRAFT_MASS * top.sum() <= top[:size].sum()
    assert heads_drafter.HeadsDrafter(load(tmp_path / kind), draft_vocab=7).vocab_ids.shape == (7,)


def test_draft_vocab_needs_frequencies_and_a_positive_size(tmp_path):
    model = peaked(seed=1)
    save(random_heads("medusa", model), tmp_path / "h")
    with pytest.raises(ValueError, match="token frequencies"):
        treedec.patch(model, drafter="medusa", heads=tmp_path / "h", draft_vocab=10)
    with pytest.raises(ValueError, match="draft_vocab"):
        treedec.patch(model, drafter="medusa", heads=tmp_path / "h", draft_vocab=0)
    treedec.patch(model, drafter="medusa", heads=tmp_path / "h", draft_vocab=model.config.vocab_size)  # all


def test_targets_outside_the_draft_vocabulary_are_misses_not_losses():
    """Training over a draft vocabulary: targets become positions in it; a token outside it (-1)
    adds nothing to the loss and counts as a miss of every rank; -100 (past the end) stays out."""
    import types

    from treedec.tools.heads_training import Positions, _Tally, argmax_loss, restrict_targets, soft_target_loss

    targets = torch.tensor([[5, -100], [7, 3]])
    unused = torch.zeros_like(targets)  # Hydra's inputs and the teacher rows play no part here
    positions = Positions(torch.zeros(2, 4), torch.arange(2), targets, unused, unused)
    mapped = restrict_targets(positions, torch.tensor([3, 5]), vocab_size=10).targets
    assert mapped.tolist() == [[1, -100], [-1, 0]]
    assert restrict_targets(positions, None, vocab_size=10) is positions
    logits = torch.full((2, 2, 8), -5.0)  # rank 0 is each row's target where there is one
    logits[0, 0, 1] = logits[1, 1, 0] = logits[1, 0, 4] = 5.0
    loss = argmax_loss(logits, mapped, "sum")
    expected = torch.nn.functional.cross_entropy(torch.stack([logits[0, 0], logits[1, 1]]), torch.tensor([1, 0]),
                                                 reduction="sum")
    torch.testing.assert_close(loss, expected)
    tally = _Tally(2)
    tally.add(logits, mapped, float(loss))
    mean, per_rank = tally.result()
    assert per_rank[:, 0].tolist() == [0.5, 1.0]  # head 1: one hit, one target outside the vocabulary
    torch.testing.assert_close(mean, float(expected) / 2)  # the loss is over the two targets in it
    # soft targets: the teacher over the vocabulary's rows, the same two targets
    lm_head = torch.nn.Linear(4, 10, bias=False)
    model = types.SimpleNamespace(get_output_embeddings=lambda: lm_head)
    states, small = torch.randn(2, 2, 4), torch.randn(2, 2, 2)
    teacher = torch.softmax(states @ lm_head.weight[[3, 5]].T, -1).detach()
    per_target = -(teacher * small.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(soft_target_loss(small, states, mapped, model, torch.tensor([3, 5])),
                               (per_target[0, 0] + per_target[1, 1]) / 2)


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_heads_trained_over_a_draft_vocabulary_draft_from_it(kind, monkeypatch, tmp_path):
    """train_heads(draft_vocab=N) trains over the N most frequent tokens of its text, says so in the
    config, and the drafter then guesses from those N by default (losslessly) and refuses more;
    by default it trains over the tokens holding DRAFT_MASS of the frequency."""
    from treedec.drafters import heads as heads_drafter
    from treedec.tools import heads_training as training
    from treedec.heads.vocab import DRAFT_MASS, default_size, draft_vocabulary

    model = peaked(seed=4)
    vocab = model.config.vocab_size
    prompts = [repetitive_prompt(s, 10) for s in range(4)]
    widths = []
    original = training.head_logits
    monkeypatch.setattr(training, "head_logits",
                        lambda *args: widths.append(original(*args).shape[-1]) or original(*args))
    heads, reports = training.train_heads(model, prompts, kind, num_heads=2, tokens=120, out=tmp_path / kind,
                                          epochs=3, lr=3e-3, batch_size=16, max_new_tokens=40, progress=False,
                                          draft_vocab=12)
    assert set(widths) == {12} and reports[-1].loss < reports[0].loss
    with pytest.raises(ValueError, match="trained over 12 tokens; this run asks for 13"):  # resuming
        training.train_heads(model, prompts, kind, num_heads=2, tokens=120, out=tmp_path / kind, epochs=4,
                             batch_size=16, max_new_tokens=40, progress=False, draft_vocab=13)
    loaded = load(tmp_path / kind)
    assert loaded.meta["draft_vocab"] == 12
    drafter = heads_drafter.HeadsDrafter(loaded, widths=(2, 2))
    assert torch.equal(drafter.vocab_ids, draft_vocabulary(loaded.token_frequencies, 12))
    ids = torch.tensor([repetitive_prompt(1, 10)])
    expected = model.generate(ids, max_new_tokens=20, do_sample=False)
    treedec.patch(model, drafter=kind, heads=tmp_path / kind, context=False)
    assert torch.equal(model.generate(ids, max_new_tokens=20, do_sample=False), expected)
    assert model.treedec.last_stats["draft_vocab"] == 12
    treedec.unpatch(model)
    with pytest.raises(ValueError, match="draft_vocab = 13: these heads were trained over their 12 most frequent"):
        treedec.patch(model, drafter=kind, heads=tmp_path / kind, draft_vocab=13)
    with pytest.raises(ValueError, match="widths of up to 16 guesses a depth: these heads were trained over their 12"):
        treedec.patch(model, drafter=kind, heads=tmp_path / kind, widths=[16])
    treedec.patch(model, drafter=kind, heads=tmp_path / kind, draft_vocab=8)  # a subset is fine
    treedec.unpatch(model)
    # the default size, and the whole vocabulary
    training.train_heads(model, prompts, kind, num_heads=2, tokens=120, out=tmp_path / "default", epochs=1,
                         batch_size=16, max_new_tokens=40, progress=False)
    frequencies = load(tmp_path / "default").token_frequencies
    assert load(tmp_path / "default").meta["draft_vocab"] == max(default_size(frequencies, DRAFT_MASS), 8)
    widths.clear()
    training.train_heads(model, prompts, kind, num_heads=2, tokens=120, out=tmp_path / "all", epochs=1,
                         batch_size=16, max_new_tokens=40, progress=False, draft_vocab=vocab + 5)
    assert set(widths) == {vocab} and load(tmp_path / "all").meta["draft_vocab"] == vocab
    # heads trained over every token draft from the default share of them, as the shipped ones do
    every = load(tmp_path / "all")
    share = default_size(every.token_frequencies, DRAFT_MASS)
    assert share < vocab and len(heads_drafter.HeadsDrafter(every, widths=(2, 2)).vocab_ids) == share
    for bad in (7, 0, 12.0, True):
        with pytest.raises(ValueError, match="draft_vocab"):
            training.train_heads(model, prompts, kind, num_heads=2, tokens=120, out=tmp_path / "bad", epochs=1,
                                 progress=False, draft_vocab=bad)


def test_shipped_heads_fit_in_20_mb_and_carry_token_frequencies():
    """Both kinds ship within the issue's 20 MB, each with the frequencies that pick its draft
    vocabulary: 16090 of SmolLM2's 49152 tokens hold 99% of the probability."""
    from treedec.drafters.heads import HeadsDrafter
    from treedec.heads.shipped import SHIPPED_DIR

    assert sum(f.stat().st_size for f in SHIPPED_DIR.rglob("*") if f.is_file()) <= 20 * 2**20
    for kind in ("medusa", "hydra"):
        heads = load(SHIPPED_DIR / kind)
        assert heads.token_frequencies.shape == (heads.config.vocab_size,) == (49152,)
        assert HeadsDrafter(heads).vocab_ids.shape == (16090,)


def test_medusa_guesses_are_the_top_of_the_draft_vocabulary(monkeypatch, tmp_path):
    """The first step's depth-1 guesses are the top 4 of head 1's logits over the draft vocabulary
    alone (within bf16 rounding: an fp32 model's heads draft in bf16), so positions in the LM
    head's restricted rows are mapped back to the right ids."""
    from treedec.drafters import heads as heads_drafter
    from treedec.heads.vocab import draft_vocabulary, save_frequencies

    model = peaked(seed=3)
    vocab = model.config.vocab_size
    heads = random_heads("medusa", model, seed=2)
    save(heads, tmp_path / "m")
    frequencies = torch.rand(vocab, generator=torch.Generator().manual_seed(1))
    save_frequencies(frequencies, tmp_path / "m")
    tries = Tries(spy_proposals(monkeypatch, heads_drafter.HeadsDrafter))
    ids = torch.tensor([repetitive_prompt(2, 15)])
    treedec.patch(model, drafter="medusa", heads=tmp_path / "m", context=False, widths=[4], draft_vocab=40)
    model.generate(ids, max_new_tokens=2, do_sample=False)
    with torch.no_grad():  # the first step's root is the prefill's token: the heads read the prompt's last state
        hidden = model.model(ids).last_hidden_state[:, -1]
        logits = heads.states(hidden)[0, 0] @ model.lm_head.weight.T
    allowed = draft_vocabulary(frequencies, 40)
    masked = torch.full_like(logits, float("-inf"))
    masked[allowed] = logits[allowed]
    fourth = masked.topk(4).values[-1]
    guessed = [tries[0].tokens[i] for i in range(1, len(tries[0]))]
    assert len(guessed) == 4 and set(guessed) <= set(allowed.tolist())
    assert all(masked[t] >= fourth - 0.02 * fourth.abs() for t in guessed)  # the mapping is right
    assert sorted(guessed) != sorted(logits.topk(4).indices.tolist())  # the restriction mattered here


def test_draft_vocab_below_the_widest_depth_raises(tmp_path):
    from treedec.heads.vocab import save_frequencies

    model = peaked(seed=1)
    save(random_heads("medusa", model), tmp_path / "h")
    save_frequencies(torch.rand(model.config.vocab_size), tmp_path / "h")
    with pytest.raises(ValueError, match="at least 4"):  # the default widths take 4 guesses at depth 1
        treedec.patch(model, drafter="medusa", heads=tmp_path / "h", draft_vocab=3)
    treedec.patch(model, drafter="medusa", heads=tmp_path / "h", draft_vocab=4)


def test_save_writes_the_frequencies_and_drops_stale_ones(tmp_path):
    model = peaked(seed=1)
    heads = random_heads("hydra", model)
    heads.token_frequencies = torch.rand(model.config.vocab_size)
    save(heads, tmp_path / "h")
    assert torch.equal(load(tmp_path / "h").token_frequencies, heads.token_frequencies)
    save(random_heads("hydra", model, seed=1), tmp_path / "h")  # other heads, no frequencies
    assert load(tmp_path / "h").token_frequencies is None


def test_a_model_is_recognised_by_its_weights_not_its_path():
    from treedec.heads.shipped import fingerprint, same_weights

    model = tiny_llama(seed=3)
    mine = fingerprint(model)
    assert same_weights(fingerprint(model.to(torch.bfloat16)), mine)  # another dtype: the same model
    model.float()
    with torch.no_grad():  # quantization-sized noise: still the same model
        weight = model.get_input_embeddings().weight
        weight.add_(0.05 * weight.std() * torch.randn_like(weight))
    assert same_weights(fingerprint(model), mine)
    assert not same_weights(fingerprint(tiny_llama(seed=4)), mine)  # same config, other weights
    assert not same_weights(fingerprint(tiny_llama(seed=3, intermediate_size=96)), mine)


def test_the_shipped_heads_are_refused_for_another_model():
    with pytest.raises(ValueError, match="the shipped heads are for the embedded SmolLM2-135M-Instruct only"):
        treedec.patch(tiny_llama(), drafter="medusa")


def test_heads_on_an_offloaded_lm_head_fall_back_naming_why(tmp_path):
    """The heads draft through the LM head's weight; accelerate's offloading leaves it on the meta
    device (loaded only inside the head's forward), so the call goes to HF, with HF's tokens."""
    from accelerate import cpu_offload

    model = peaked(seed=3)
    save(random_heads("medusa", model), tmp_path / "medusa")
    ids = torch.tensor([repetitive_prompt(0, 21)])
    expected = model.generate(ids, max_new_tokens=12, do_sample=False)
    cpu_offload(model, execution_device=torch.device("cpu"))
    treedec.patch(model, drafter="medusa", heads=tmp_path / "medusa")
    with pytest.warns(UserWarning, match="LM head's .V, H. weight.*offloaded"):
        assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), expected)


def test_a_writer_writes_the_text_and_the_model_gives_the_targets():
    """collect(writer=...): the text is the writer's (here a different model, so the two surely
    differ), the hidden states and argmax targets are the model's own at every position."""
    from treedec.tools.heads_training import collect, greedy_tokens, hidden_states

    model, writer = peaked(seed=4), peaked(seed=5)
    prompts = [repetitive_prompt(s, 5 + s) for s in range(3)]
    written = collect(model, prompts, tokens=10**6, max_new_tokens=12, batch_size=3, progress=False, writer=writer)
    own = collect(writer, prompts, tokens=10**6, max_new_tokens=12, batch_size=3, progress=False)
    assert [e.tokens.tolist() for e in written] == [e.tokens.tolist() for e in own]
    for example in written:
        hidden = hidden_states(model, [example.tokens])[0]
        torch.testing.assert_close(example.hidden, hidden, rtol=1e-4, atol=1e-4)
        assert torch.equal(example.greedy, greedy_tokens(model, hidden))
    # the model would have written other text: its argmax disagrees with the writer's text somewhere
    assert any(not torch.equal(e.greedy[e.generated_from - 1 : -1], e.tokens[e.generated_from:]) for e in written)
    assert not hasattr(writer, "treedec") and not hasattr(model, "treedec")  # patched for the collection only
