"""drafter="eagle": the published checkpoint formats, the vocabulary maps, lossless decoding,
and training (the training-time test unrolls what decoding drafts)."""

import json

import pytest
import torch
from safetensors.torch import save_file

import treedec
from test_decoding import left_padded, repetitive_prompt
from test_sampling import sample_token_by_token
from treedec.adapters import adapter_for
from treedec.drafters.base import DraftRequest, DrafterEnv
from treedec.drafters.eagle import EagleDrafter
from treedec.eagle import load, save
from treedec.tools.eagle_training import train_eagle, unrolled
from treedec.tools.models import tiny_llama

HIDDEN, HEADS, KV_HEADS, INTERMEDIATE, VOCAB = 64, 4, 2, 96, 96
LAYERS = 4


def target(seed: int = 0):
    return tiny_llama(seed=seed, num_layers=LAYERS, vocab_size=VOCAB)


def write_eagle3(directory, draft_ids: list[int], dtype=torch.bfloat16, seed: int = 0, aux=(0, 1, 3), prefix="",
                 **changes):
    """An EAGLE-3 checkpoint written by hand as SpecForge writes one (names, shapes, dtypes, d2t's
    offsets), not through treedec's own `save`."""
    g = torch.Generator().manual_seed(seed)
    head_dim = HIDDEN // HEADS

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.2).to(dtype)

    d2t = torch.tensor(draft_ids) - torch.arange(len(draft_ids))  # target id = draft id + d2t[draft id]
    t2d = torch.zeros(VOCAB, dtype=torch.bool)
    t2d[draft_ids] = True
    weights = {
        "fc.weight": rand(HIDDEN, 3 * HIDDEN),
        "midlayer.self_attn.q_proj.weight": rand(HEADS * head_dim, 2 * HIDDEN),
        "midlayer.self_attn.k_proj.weight": rand(KV_HEADS * head_dim, 2 * HIDDEN),
        "midlayer.self_attn.v_proj.weight": rand(KV_HEADS * head_dim, 2 * HIDDEN),
        "midlayer.self_attn.o_proj.weight": rand(HIDDEN, HEADS * head_dim),
        "midlayer.input_layernorm.weight": torch.ones(HIDDEN, dtype=dtype),
        "midlayer.hidden_norm.weight": torch.ones(HIDDEN, dtype=dtype),
        "midlayer.post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=dtype),
        "midlayer.mlp.gate_proj.weight": rand(INTERMEDIATE, HIDDEN),
        "midlayer.mlp.up_proj.weight": rand(INTERMEDIATE, HIDDEN),
        "midlayer.mlp.down_proj.weight": rand(HIDDEN, INTERMEDIATE),
        "norm.weight": torch.ones(HIDDEN, dtype=dtype),
        "lm_head.weight": rand(len(draft_ids), HIDDEN),
        "d2t": d2t,
        "t2d": t2d,
    }
    weights.update(changes.pop("weights", {}))
    for name in changes.pop("drop", ()):
        del weights[name]
    config = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTERMEDIATE, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "num_hidden_layers": 1, "vocab_size": VOCAB, "draft_vocab_size": len(draft_ids),
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 512,
              "torch_dtype": "bfloat16", "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(aux)}, **changes}
    directory.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.contiguous() for k, v in weights.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def write_eagle1(directory, seed: int = 0, with_embedding: bool = False):
    """An EAGLE-1/2 checkpoint as SafeAILab's cnets.py saves one: fc over [embedding, feature] with
    a bias, `layers.0.*` without input_layernorm, pytorch_model.bin, a Llama config."""
    g = torch.Generator().manual_seed(seed)
    head_dim = HIDDEN // HEADS

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    weights = {
        "fc.weight": rand(HIDDEN, 2 * HIDDEN), "fc.bias": rand(HIDDEN),
        "layers.0.self_attn.q_proj.weight": rand(HEADS * head_dim, HIDDEN),
        "layers.0.self_attn.k_proj.weight": rand(KV_HEADS * head_dim, HIDDEN),
        "layers.0.self_attn.v_proj.weight": rand(KV_HEADS * head_dim, HIDDEN),
        "layers.0.self_attn.o_proj.weight": rand(HIDDEN, HEADS * head_dim),
        "layers.0.post_attention_layernorm.weight": torch.ones(HIDDEN),
        "layers.0.mlp.gate_proj.weight": rand(INTERMEDIATE, HIDDEN),
        "layers.0.mlp.up_proj.weight": rand(INTERMEDIATE, HIDDEN),
        "layers.0.mlp.down_proj.weight": rand(HIDDEN, INTERMEDIATE),
    }
    if with_embedding:
        weights["embed_tokens.weight"] = rand(VOCAB, HIDDEN)
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 512, "bias": True}
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(weights, directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps(config))
    return directory


DRAFT_IDS = sorted(torch.randperm(VOCAB, generator=torch.Generator().manual_seed(3))[:40].tolist())


def test_eagle3_checkpoint_loads_with_its_vocabulary_maps(tmp_path):
    draft = load(write_eagle3(tmp_path / "e3", DRAFT_IDS))
    assert draft.config.kind == "eagle3" and draft.config.aux_layers == (0, 1, 3)
    assert draft.config.draft_vocab_size == 40 and draft.fc.weight.dtype == torch.bfloat16
    assert draft.target_ids(torch.arange(40)).tolist() == DRAFT_IDS
    positions = draft.draft_positions()
    assert positions[DRAFT_IDS].tolist() == list(range(40))
    assert int((positions >= 0).sum()) == 40
    # a leading "model." on every name (some exports) reads the same
    again = load(write_eagle3(tmp_path / "prefixed", DRAFT_IDS, prefix="model."))
    for (name, a), (_, b) in zip(draft.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_eagle1_checkpoint_loads(tmp_path):
    draft = load(write_eagle1(tmp_path / "e1"))
    assert draft.config.kind == "eagle1" and draft.config.fc_bias and draft.embed_tokens is None
    assert not hasattr(draft.layer, "input_layernorm")
    assert load(write_eagle1(tmp_path / "emb", with_embedding=True)).embed_tokens is not None


def test_save_round_trip_keeps_the_format(tmp_path):
    draft = load(write_eagle3(tmp_path / "e3", DRAFT_IDS, dtype=torch.float32))
    save(draft, tmp_path / "copy", extra={"command": "test"})
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 40
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 3]
    copy = load(tmp_path / "copy")
    assert copy.config == draft.config
    for (name, a), (_, b) in zip(draft.state_dict().items(), copy.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("case, match", [
    (dict(drop=["midlayer.hidden_norm.weight"]), "lacks .*midlayer.hidden_norm.weight"),
    (dict(weights={"extra.weight": torch.zeros(2)}), "does not expect .*extra.weight"),
    (dict(weights={"fc.weight": torch.zeros(HIDDEN, 2 * HIDDEN, dtype=torch.bfloat16)}), "fc.weight has shape"),
    (dict(weights={"d2t": torch.full((40,), VOCAB)}), "outside the vocabulary"),
    (dict(weights={"d2t": -torch.arange(40)}), "same target id"),
    (dict(weights={"t2d": torch.ones(VOCAB, dtype=torch.bool)}), "t2d does not mark"),
])
def test_malformed_checkpoints_raise(tmp_path, case, match):
    with pytest.raises(ValueError, match=match):
        load(write_eagle3(tmp_path / "bad", DRAFT_IDS, **case))


def test_bad_paths_and_options_raise(tmp_path):
    model = target()
    with pytest.raises(ValueError, match="drafter_path"):
        treedec.patch(model, drafter="eagle")
    with pytest.raises(ValueError, match="not a drafter directory"):
        treedec.patch(model, drafter="eagle", drafter_path=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no drafter weights"):
        load(tmp_path / "empty")
    path = write_eagle3(tmp_path / "e3", DRAFT_IDS)
    with pytest.raises(ValueError, match="tree_width"):
        treedec.patch(model, drafter="eagle", drafter_path=path, tree_width=0)
    with pytest.raises(ValueError, match="reads layers"):
        treedec.patch(model, drafter="eagle", drafter_path=write_eagle3(tmp_path / "deep", DRAFT_IDS, aux=(0, 1, 9)))
    wide = tiny_llama(num_layers=LAYERS, vocab_size=VOCAB, hidden_size=32, num_attention_heads=2,
                      num_key_value_heads=1)
    treedec.patch(wide, drafter="eagle", drafter_path=path)
    with pytest.raises(ValueError, match="trained for hidden size 64"):
        wide.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)


def hf_and_eagle(model, drafter_path, ids, mask=None, max_new_tokens=30, **options):
    """The unpatched model's greedy output, then drafter="eagle"'s (the model is unpatched again
    after), and that call's last_stats."""
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
    treedec.patch(model, drafter="eagle", drafter_path=drafter_path, **options)
    try:
        got = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
        return expected, got, model.treedec.last_stats
    finally:
        treedec.unpatch(model)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny target and an EAGLE-3 drafter trained on its own text (seconds): drafts get accepted."""
    model = target(seed=2)
    prompts = [repetitive_prompt(seed, 10 + seed % 7) for seed in range(40)]
    out = tmp_path_factory.mktemp("eagle") / "drafter"
    train_eagle(model, prompts, out, tokens=2500, epochs=3, lr=3e-3, batch_tokens=512, ttt_steps=3, draft_vocab=64,
                max_new_tokens=40, progress=False)
    return model, out


def test_training_records_and_resumes(trained):
    _, out = trained
    config = json.loads((out / "config.json").read_text())
    record = config["treedec"]
    assert record["epochs"] == 3 and len(record["step_accuracy"]) == 3 and record["trained_on_tokens"] > 0
    assert (out / "distill_data.pt").exists() and (out / "eagle_checkpoint.pt").exists()
    log = json.loads((out / "train_log.json").read_text())
    assert log[-1]["step_accuracy"][0] > 0.3  # it learned the tiny model's text (random: ~1/64)


def test_a_rerun_resumes_without_training_again(trained, capsys):
    model, out = trained
    before = load(out).state_dict()
    train_eagle(model, [[5, 6, 7]], out, tokens=2500, epochs=3, lr=3e-3, batch_tokens=512, ttt_steps=3,
                draft_vocab=64, max_new_tokens=40, progress=True)
    printed = capsys.readouterr().out
    assert "reusing" in printed and "resuming after epoch 3" in printed
    for name, tensor in load(out).state_dict().items():
        assert torch.equal(tensor, before[name]), name


@pytest.mark.parametrize("batch", [1, 3])
def test_trained_drafter_is_lossless_and_accepted(trained, batch, flat_step_costs):
    model, out = trained
    rows = [repetitive_prompt(50 + b, 9 + 3 * b) for b in range(batch)]
    ids, mask = left_padded(rows)
    expected, got, stats = hf_and_eagle(model, out, ids, mask)
    assert torch.equal(got, expected)
    # a drafter of random weights gets tau 1.06-1.07 on these prompts, this one 1.25 (B=1) and 1.64 (B=3)
    assert stats["tau"] > 1.15 and stats["draft_acceptance"] > 0


@pytest.mark.parametrize("max_new_tokens", [1, 2, 7])
def test_eos_inside_an_accepted_path_and_length_limits(trained, max_new_tokens):
    """The tiny model's text repeats, so accepted paths are long: an EOS id that the drafts and the
    model agree on ends the sequence inside a path, exactly where HF ends it."""
    model, out = trained
    ids = torch.tensor([repetitive_prompt(51, 12)])
    plain = model.generate(ids, max_new_tokens=20, do_sample=False)[0, 12:].tolist()
    eos = plain[5]  # a token the model emits mid-generation
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
    expected = model.generate(ids, **kwargs)
    treedec.patch(model, drafter="eagle", drafter_path=out)
    try:
        assert torch.equal(model.generate(ids, **kwargs), expected)
        assert torch.equal(model.generate(ids, **{**kwargs, "max_new_tokens": 20}),
                           treedec.unpatch(model).generate(ids, **{**kwargs, "max_new_tokens": 20}))
    finally:
        if hasattr(model, "treedec"):
            treedec.unpatch(model)


def test_sampling_equals_token_by_token_sampling(trained, flat_step_costs):
    model, out = trained
    rows = [repetitive_prompt(60 + b, 8 + 2 * b) for b in range(3)]
    ids, mask = left_padded(rows)
    torch.manual_seed(5)
    expected = sample_token_by_token(model, rows, 16, eos=2, pad=0, temperature=0.8)
    treedec.patch(model, drafter="eagle", drafter_path=out)
    try:
        torch.manual_seed(5)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=True, temperature=0.8)
    finally:
        treedec.unpatch(model)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("layout", ["eagle3", "eagle1", "eagle1-own-embedding"])
def test_published_layouts_decode_losslessly(tmp_path, layout):
    """Random drafters of each layout: their drafts are mostly rejected, the output never changes."""
    model = target(seed=1)
    if layout == "eagle3":
        path = write_eagle3(tmp_path / layout, DRAFT_IDS)
    else:
        path = write_eagle1(tmp_path / layout, with_embedding=layout.endswith("embedding"))
    rows = [repetitive_prompt(70 + b, 7 + 4 * b) for b in range(3)]
    ids, mask = left_padded(rows)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    one = model.generate(ids[:1, -7:], max_new_tokens=20, do_sample=False)
    treedec.patch(model, drafter="eagle", drafter_path=path, tree_width=3, tree_depth=3)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False), expected)
    assert model.treedec.last_stats["drafted"] > 0
    assert torch.equal(model.generate(ids[:1, -7:], max_new_tokens=20, do_sample=False), one)
    # a one-token prompt has no feature before its root: its first step drafts nothing
    single = treedec.unpatch(model).generate(torch.tensor([[9]]), max_new_tokens=8, do_sample=False)
    treedec.patch(model, drafter="eagle", drafter_path=path)
    assert torch.equal(model.generate(torch.tensor([[9]]), max_new_tokens=8, do_sample=False), single)


def test_training_time_test_unrolls_what_decoding_drafts(trained, monkeypatch):
    """A chain drafted with tree_width=1 is the drafter's own greedy guesses; the training-time test,
    teacher-forced with those tokens, must compute the same hidden state at each step as the
    drafter did at each depth: same entries attended, same positions (the training is of the
    drafter that decodes)."""
    model, out = trained
    draft = load(out).float()
    monkeypatch.setattr("treedec.drafters.eagle.DRAFT_DTYPES", {})  # draft in fp32, as the training test runs
    drafter = EagleDrafter(draft, LAYERS, width=1, depth=4, max_candidates=4)
    layer_outputs = []  # each draft-layer call's new outputs [B, N, H]: the committed chain, then depths 1..3
    original = drafter._layer
    monkeypatch.setattr(drafter, "_layer", lambda *a, **k: (lambda r: (layer_outputs.append(r[0]), r)[1])(original(*a, **k)))
    adapter = adapter_for(model)
    prompt = repetitive_prompt(80, 11)
    with adapter.captured(drafter.feature_layers) as captured, torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([prompt[:-1]])).last_hidden_state
    features = torch.cat([captured[i] for i in drafter.feature_layers], dim=-1)
    drafter.start([prompt])
    drafter.prefilled(hidden, features)
    trie = drafter.propose(DraftRequest(adapter, None, [0], [prompt[-1]]))[0]
    chain = trie.tokens[1:]
    assert trie.parents == [-1, 0, 1, 2, 3] and len(chain) == 4 and len(layer_outputs) == 4
    # the training-time test over prompt + chain, read at position i = len(prompt) - 2 (the root's entry)
    tokens = torch.tensor([prompt + chain])
    length = tokens.shape[1]
    padded = torch.zeros(1, length, features.shape[-1])
    padded[:, : features.shape[1]] = features
    embed = model.get_input_embeddings()
    embeddings = []
    for step in range(4):
        shifted = torch.zeros_like(tokens)
        shifted[:, : length - step - 1] = tokens[:, step + 1 :]
        embeddings.append(embed(shifted).detach())
    with torch.no_grad():
        outputs = unrolled(draft, embeddings, padded)
    i = len(prompt) - 2
    torch.testing.assert_close(outputs[0][0, : i + 1], layer_outputs[0][0], rtol=1e-4, atol=1e-5)
    for step in range(1, 4):
        torch.testing.assert_close(outputs[step][0, i], layer_outputs[step][0, 0], rtol=1e-4, atol=1e-5)
    predicted = [int(draft.target_ids(draft.draft_logits(out[0, i]).argmax())) for out in outputs]
    assert predicted == chain


def test_training_windows_keep_the_generated_text_and_some_prompt():
    """batch_of with a short prompt_context: the same features, tokens, targets and trained
    positions as the whole sequence's, from prompt_context positions before the generated text."""
    from treedec.eagle import default_aux_layers
    from treedec.tools.eagle_training import batch_of, packed, window
    from treedec.tools.heads_training import collect

    model = target(seed=2)
    layers = default_aux_layers(LAYERS)
    examples = collect(model, [repetitive_prompt(s, 12 + 5 * s) for s in range(3)], tokens=10**6, max_new_tokens=8,
                       batch_size=3, progress=False)
    whole = batch_of(model, examples, layers, prompt_context=10**6)
    cut = batch_of(model, examples, layers, prompt_context=4)
    for row, example in enumerate(examples):
        kept = window(example, 4)
        assert kept.start == example.generated_from - 5 and kept.stop == len(example.tokens)
        length = kept.stop - kept.start
        torch.testing.assert_close(cut.features[row, :length], whole.features[row, kept])
        for name in ("tokens", "argmax", "trains"):
            assert torch.equal(getattr(cut, name)[row, :length], getattr(whole, name)[row, kept]), name
        assert not cut.trains[row, length:].any() and cut.trains[row].sum() == whole.trains[row].sum() > 0
    assert window(examples[0], 10**6).start == 0
    # batches are packed by the windows' lengths: three windows of 13 fit one 40-token batch
    assert [len(b) for b in packed(examples, 40, None, prompt_context=4)] == [3]


def test_bf16_training_learns_and_a_bad_dtype_is_refused(tmp_path):
    model = target(seed=2)
    prompts = [repetitive_prompt(seed, 10 + seed % 7) for seed in range(40)]
    with pytest.raises(ValueError, match="train_dtype"):
        train_eagle(model, prompts, tmp_path / "bad", tokens=100, epochs=1, train_dtype=torch.float16, progress=False)
    assert not (tmp_path / "bad").exists()  # refused before collecting anything
    _, reports = train_eagle(model, prompts, tmp_path / "bf16", tokens=2500, epochs=3, lr=3e-3, batch_tokens=512,
                             ttt_steps=3, draft_vocab=64, max_new_tokens=40, progress=False,
                             train_dtype=torch.bfloat16)
    assert reports[-1]["step_accuracy"][0] > 0.3  # as the fp32 fixture's (random: ~1/64)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["treedec"]["train_dtype"] == "bfloat16"


def test_an_fp32_model_drafts_in_bf16_and_stays_lossless(trained):
    """The drafter of an fp32 model runs in bf16 (half the bytes a level); the output is still HF's."""
    model, out = trained
    expected, got, _ = hf_and_eagle(model, out, torch.tensor([repetitive_prompt(52, 10)]), max_new_tokens=20)
    assert torch.equal(got, expected)
    built = EagleDrafter(load(out).float(), LAYERS)
    built._check(adapter_for(model))
    assert built._checked[1] == torch.bfloat16 and next(built.draft.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("context", [None, False])
def test_context_drafts_merge_by_default(trained, monkeypatch, context):
    """By default the tree also holds drafter="auto"'s candidates (lookup, recycling keys);
    context=False drafts the EAGLE tree alone. Both stay lossless."""
    from helpers import spy_proposals

    model, out = trained
    found = spy_proposals(monkeypatch, EagleDrafter)
    treedec.patching.set_learned_state(model, None)  # a fresh layer gate: its first steps run the layer
    options = {} if context is None else {"context": context}
    expected, got, _ = hf_and_eagle(model, out, torch.tensor([repetitive_prompt(53, 14)]), max_new_tokens=24,
                                    **options)
    assert torch.equal(got, expected)
    kinds = {key[0] for _, trie in found for key in trie.keys[1:]}
    assert "eagle" in kinds
    assert (kinds - {"eagle"}) if context is None else kinds == {"eagle"}


def test_layer_gate_runs_the_cheaper_kind_and_backs_off():
    """The kind in use runs; after `backoff` steps the other runs `evidence` steps, and the seconds
    per token of the two windows decide: a winner takes over, a loser doubles the backoff."""
    from treedec.drafters.eagle import LayerGate

    gate = LayerGate(evidence=2, first_backoff=3, max_backoff=6)
    cost = {True: 0.10, False: 0.06}  # seconds per step; each step emits 2 tokens: context-only is cheaper
    kinds = []
    for _ in range(40):
        layer = gate.runs_layer()
        kinds.append(layer)
        gate.record(layer, cost[layer], 2)
    # 2 layer steps, a 2-step context trial that wins, then mostly context with layer re-trials
    assert kinds[:4] == [True, True, False, False] and gate.current is False and gate.switches == 1
    later = kinds[4:]
    assert later.count(True) < later.count(False) / 2 and True in later
    assert gate.backoff == 6  # the layer kept losing: 3 -> 6 (the maximum)
    cost[True] = 0.01  # now the layer pays: its next trial wins it back
    for _ in range(20):
        layer = gate.runs_layer()
        gate.record(layer, cost[layer], 2)
    assert gate.current is True and gate.switches == 2


@pytest.mark.parametrize("first", [True, False])
def test_steps_without_the_draft_layer_commit_later_and_stay_lossless(trained, monkeypatch, flat_step_costs, first):
    """A gate that skips the layer every other step: the entries of the skipped steps commit on
    the next step that runs it, the drafts still get accepted, and the output is HF's. A gate kept
    from earlier calls may skip the first step too: the prompt's entries then wait with the rest."""
    from treedec.drafters.eagle import LayerGate

    model, out = trained

    class Alternate(LayerGate):
        calls = 0

        def runs_layer(self):
            Alternate.calls += 1
            return (Alternate.calls % 2 == 1) == first

    monkeypatch.setattr("treedec.drafters.eagle.LayerGate", Alternate)
    treedec.patching.set_learned_state(model, None)  # no gate kept from an earlier test's calls
    ids, mask = left_padded([repetitive_prompt(54 + b, 9 + 3 * b) for b in range(2)])
    expected, got, stats = hf_and_eagle(model, out, ids, mask)
    assert torch.equal(got, expected)
    assert stats["draft_layer_steps"] > 2 and stats["context_only_steps"] > 2
    assert abs(stats["draft_layer_steps"] - stats["context_only_steps"]) <= 1  # the stub's alternation
    assert stats["draft_acceptance"] > 0


def test_the_gate_times_only_steps_the_drafter_proposed(trained):
    """A step the loop kept plain (its own draft gate, B >= 17) gets an outcome but no proposal:
    the interval from the last proposal then spans several steps and is not recorded."""
    from treedec.drafters import auto
    from treedec.drafters.eagle import LayerGate

    recorded = []

    class Spy(LayerGate):
        def record(self, layer, seconds, tokens):
            recorded.append((layer, tokens))

    model, out = trained
    drafter = EagleDrafter(load(out), LAYERS, context=auto.SPEC.build({}, DrafterEnv(VOCAB, {})),
                           gate=Spy())
    drafter._step = [True, 0.0, None]
    drafter._count_step(3)
    assert drafter._step[2] == 3  # one proposal, one outcome: a step
    drafter._count_step(1)
    assert drafter._step is None  # a second outcome: dropped
    drafter._count_step(2)
    assert drafter._step is None and recorded == []


def test_a_reader_gives_the_features_and_targets_and_the_model_writes(tmp_path, monkeypatch):
    """train_eagle(reader=...): the text is still the model's own greedy continuation, while the
    argmax targets and the features (in collection and in every training batch) are the reader's.
    Here the reader is a different model, so each source is told apart."""
    from treedec.tools import eagle_training
    from treedec.tools.heads_training import DATA_NAME

    model, reader = target(seed=2), target(seed=3)
    prompts = [repetitive_prompt(seed, 10 + seed % 7) for seed in range(20)]
    featured_by = set()
    batch_of = eagle_training.batch_of
    monkeypatch.setattr(eagle_training, "batch_of", lambda m, *a, **k: featured_by.add(id(m)) or batch_of(m, *a, **k))
    train_eagle(model, prompts, tmp_path, tokens=300, epochs=1, batch_tokens=512, ttt_steps=2, draft_vocab=32,
                max_new_tokens=12, progress=False, reader=reader.to(torch.bfloat16))
    assert featured_by == {id(reader)}
    examples = torch.load(tmp_path / DATA_NAME, weights_only=False)
    assert examples and len(examples) >= len(prompts)  # every prompt's greedy continuation first
    for example in examples[: len(prompts)]:
        sequence, start = example["tokens"], example["generated_from"]
        prompt = sequence[:start].view(1, -1)
        own = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=len(sequence) - start,
                             do_sample=False, min_new_tokens=len(sequence) - start)[0]
        assert torch.equal(own, sequence)  # the model wrote it
        with torch.no_grad():
            readers, models = (m(sequence.view(1, -1)).logits[0].argmax(-1) for m in (reader, model))
        # the reader's argmax (bf16 rounding may differ between batch shapes at a near tie), not the model's
        assert (example["greedy"] == readers).float().mean() > 0.95
        assert (example["greedy"] == models).float().mean() < 0.9
    assert json.loads((tmp_path / "config.json").read_text())["treedec"]["feature_dtype"] == "bfloat16"


def test_the_shipped_drafter_fits_in_20_mb_and_records_its_training():
    """SpecForge's EAGLE-3 format, bf16, for SmolLM2-135M-Instruct (hidden 576, 49152 tokens),
    with the command and data that trained it and the fingerprint that matches it to the model."""
    from treedec.eagle.shipped import SHIPPED_DIR
    from treedec.heads.shipped import FINGERPRINT_KEY

    assert sum(f.stat().st_size for f in SHIPPED_DIR.rglob("*") if f.is_file()) <= 20 * 2**20
    config = json.loads((SHIPPED_DIR / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    record = config["treedec"]
    assert record["command"].startswith("treedec train-drafter --kind eagle3") and FINGERPRINT_KEY in record
    assert record["trained_on_tokens"] > 100_000 and len(record["step_accuracy"]) == record["ttt_steps"]
    draft = load(SHIPPED_DIR)
    assert (draft.config.kind, draft.config.target_hidden_size, draft.config.vocab_size) == ("eagle3", 576, 49152)
    assert draft.lm_head.weight.dtype == torch.bfloat16


def test_the_shipped_drafter_is_refused_for_another_model():
    with pytest.raises(ValueError, match="needs drafter_path=DIR for this model"):
        treedec.patch(target(), drafter="eagle")
