"""The end-to-end benchmark's bookkeeping, on a tiny model (timings are not checked)."""

import pytest
import torch

from test_decoding import repetitive_prompt
from test_sampling import peaked_llama
from treedec.tools.benchmark import run_benchmark
from treedec.tools.prompts import Prompt


class ChatStub:
    """The one tokenizer call the benchmark makes: a fixed token prompt per text (another one for
    any other text, such as the warm-up's)."""

    def __init__(self, prompts: dict[str, list[int]]):
        self.prompts = prompts

    def apply_chat_template(self, messages, **kwargs):
        ids = torch.tensor([self.prompts.get(messages[0]["content"], repetitive_prompt(5, 9))])
        return _Batch(input_ids=ids, attention_mask=torch.ones_like(ids))


class _Batch(dict):
    def to(self, device):
        return _Batch({k: v.to(device) for k, v in self.items()})


def bench_script(name: str):
    """A script under bench/ (not a package) loaded as a module, so a test can patch its loader."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def setup():
    model = peaked_llama(seed=3)
    texts = {"a": repetitive_prompt(3, 12), "b": repetitive_prompt(4, 20)}
    prompts = [Prompt("writing", "a", "1"), Prompt("coding", "b", "2")]
    return model, ChatStub(texts), prompts


def test_greedy_report_checks_every_method_against_hf():
    model, tokenizer, prompts = setup()
    report = run_benchmark(model, tokenizer, prompts, ["auto", "none"], max_new_tokens=12, progress=False)
    assert report.methods == ["hf", "none", "auto"]
    summary = report.summary()
    assert all(summary[m]["identical"] == 2 for m in report.methods)
    assert " 2/2" in report.table().splitlines()[-1]
    assert not hasattr(model, "treedec")  # left unpatched
    # tau counts every forward that emitted tokens, each call's prefill included: 1 without drafts
    assert summary["hf"]["tau"] == summary["none"]["tau"] == 1.0 and summary["auto"]["tau"] >= 1.0
    assert [r.steps for r in report.runs if r.method == "hf"] == [11, 11]  # 12 tokens: the prefill's, 11 steps


def test_methods_do_not_share_what_they_learn(flat_step_costs):
    """Each method decodes with its own learned state: Token Recycling after `auto` on the same
    prompt takes exactly the steps it takes alone (sharing, it drafted from the table `auto` had
    just filled with that prompt's continuation), and the model keeps what it had learned before."""
    from treedec.patching import LearnedState, learned_state, set_learned_state

    def recycling_steps(methods):
        model, tokenizer, prompts = setup()
        before = LearnedState()
        set_learned_state(model, before)
        report = run_benchmark(model, tokenizer, prompts, methods, max_new_tokens=24, progress=False)
        assert learned_state(model) is before and not before.tables
        assert report.learned["recycling"].tables  # the method's own table, filled
        return [r.steps for r in report.runs if r.method == "recycling"]

    alone = recycling_steps(["recycling"])
    assert recycling_steps(["auto", "recycling"]) == alone
    assert recycling_steps(["recycling", "auto"]) == alone


def test_sampling_report_checks_treedec_methods_against_none():
    """Every treedec method samples with the same uniforms as drafter=None, and a tree never changes
    a sample: the report counts them identical; HF (another random stream) has no comparison."""
    model, tokenizer, prompts = setup()
    report = run_benchmark(model, tokenizer, prompts, ["recycling", "auto", "none"], max_new_tokens=12,
                           progress=False, sampling={"temperature": 0.8})
    summary = report.summary()
    assert summary["recycling"]["identical"] == summary["auto"]["identical"] == 2
    assert summary["hf"]["identical"] == 0
    last = report.table().splitlines()[-1]
    assert last.count(" 2/2") == 3 and "  -  " in last


def test_layerskip_runs_with_options_and_reports_its_drafting():
    """peaked_llama has 2 layers: skipping layer 1 drafts from layer 0 alone."""
    model, tokenizer, prompts = setup()
    options = {"layerskip": {"mode": "fixed", "skip_layers": [1], "stop_below": 0.0}}
    report = run_benchmark(model, tokenizer, prompts, ["layerskip"], max_new_tokens=12, progress=False,
                           options=options)
    assert report.summary()["layerskip"]["identical"] == 2
    drafting = report.to_json()["drafting"]["layerskip"]
    runs = [r for r in report.runs if r.method == "layerskip"]
    assert drafting["drafted"] == sum(r.drafted for r in runs) > 0
    assert 0 <= drafting["acceptance"] <= 1 and drafting["draft_seconds"] > 0
    assert "hf" not in report.to_json()["drafting"]


def _stub_cli(monkeypatch):
    """The CLI on a tiny model: its loader returns peaked_llama and a stub tokenizer."""
    import treedec.tools.cli
    import treedec.tools.prompts

    model, tokenizer, prompts = setup()
    monkeypatch.setattr(treedec.tools.cli, "_load", lambda *args: (model, tokenizer))
    monkeypatch.setattr(treedec.tools.prompts, "BUILTIN_PROMPTS", prompts)
    return model, treedec.tools.cli


def test_demo_command_runs_end_to_end(monkeypatch, capsys):
    model, cli = _stub_cli(monkeypatch)
    assert cli.main(["demo", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "all treedec outputs identical to HF greedy: yes" in out and "sampling" in out


def test_bench_e2e_command_with_layerskip_options(monkeypatch, capsys, tmp_path):
    import json

    model, cli = _stub_cli(monkeypatch)
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps({"category": c, "turns": [t], "question_id": i})
                                   for i, (c, t) in enumerate([("writing", "a"), ("coding", "b")])))
    options = json.dumps({"mode": "fixed", "skip_layers": [1], "stop_below": 0.0})
    out_json = tmp_path / "r.json"
    assert cli.main(["bench", "e2e", "--questions", str(questions), "--methods", "hf", "layerskip",
                     "--max-new-tokens", "8", "--layerskip-options", options, "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "layerskip: proposed" in out and "accepted" in out
    assert json.loads(out_json.read_text())["drafting"]["layerskip"]["drafted"] > 0
    assert cli.main(["bench", "e2e", "--questions", str(questions), "--layerskip-options", "{oops"]) == 2


def test_bench_e2e_with_heads_prints_the_tree_size_curve(monkeypatch, capsys, tmp_path):
    """With heads that carry per-rank accuracies, the bench prints expected tokens per step and per
    second at each tree size T, priced by the run's measured verify cost, and marks the best T."""
    import json

    from test_heads import random_heads
    from treedec.heads import save

    model, cli = _stub_cli(monkeypatch)
    accuracies = [[0.6, 0.2, 0.1], [0.4, 0.1, 0.05]]
    save(random_heads("medusa", model, num_heads=2), tmp_path / "m", extra={"rank_accuracy": accuracies})
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"category": "writing", "turns": ["a"], "question_id": 1}))
    assert cli.main(["bench", "e2e", "--questions", str(questions), "--methods", "hf", "medusa",
                     "--max-new-tokens", "8", "--medusa-heads", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "tokens/step" in out and "tokens/s" in out
    marked = [line for line in out.splitlines() if line.lstrip().startswith("->")]
    assert len(marked) == 1
    best = int(marked[0].split()[1])
    assert f"T={best} tree (rank paths)" in out


def test_batch_benchmark_script_on_a_tiny_model(monkeypatch, tmp_path, capsys):
    """bench/batch.py: HF and treedec on two calls per batch size, outputs checked against HF's."""
    import json

    batch = bench_script("batch")
    texts = {f"q{i}": repetitive_prompt(10 + i, 6 + 3 * i) for i in range(4)}
    tokenizer = ChatStub(texts)
    tokenizer.pad_token_id = 0
    model = peaked_llama(seed=3)
    monkeypatch.setattr(batch, "load_default_model", lambda: (model, tokenizer))
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps({"category": "writing", "turns": [t]}) for t in texts))
    out = tmp_path / "batch.json"
    monkeypatch.setattr("sys.argv", ["batch.py", "--questions", str(questions), "--batch-sizes", "1", "2",
                                     "--max-new-tokens", "12", "--json", str(out)])
    batch.main()
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["method"], r["call"]) for r in rows] == [
        (b, m, c) for b in (1, 2) for m in ("hf", "auto", "none") for c in ("first", "later")
    ]
    assert all(r["identical"] and r["tokens"] > 0 for r in rows)
    assert "NO" not in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["batch.py", "--questions", str(questions), "--batch-sizes", "3"])
    with pytest.raises(SystemExit):  # 2 x 3 prompts asked of 4
        batch.main()


def test_batch_benchmark_profiles_each_method_and_batch_size(monkeypatch, tmp_path, capsys):
    import json

    batch = bench_script("batch")
    texts = {f"q{i}": repetitive_prompt(10 + i, 6 + 3 * i) for i in range(4)}
    tokenizer = ChatStub(texts)
    tokenizer.pad_token_id = 0
    monkeypatch.setattr(batch, "load_default_model", lambda: (peaked_llama(seed=3), tokenizer))
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps({"category": "writing", "turns": [t]}) for t in texts))
    plot = tmp_path / "profile.png"
    monkeypatch.setattr("sys.argv", ["batch.py", "--questions", str(questions), "--batch-sizes", "1", "2",
                                     "--max-new-tokens", "8", "--methods", "none", "--profile",
                                     "--profile-plot", str(plot)])
    batch.main()
    out = capsys.readouterr().out
    table = out[out.index("Where each step's time goes"):].splitlines()
    assert "attention" in table[1] and [line.split()[:2] for line in table[2:4]] == [["none", "B=1"], ["none", "B=2"]]
    assert plot.stat().st_size > 0


def test_profiled_report_sums_each_methods_phases():
    from treedec import profiling
    from treedec.tools.benchmark import profile_table

    model, tokenizer, prompts = setup()
    report = run_benchmark(model, tokenizer, prompts, ["none", "lookup"], max_new_tokens=12, progress=False,
                           profile=True)
    assert all(r.identical for r in report.runs)
    profiles = report.profiles()
    assert list(profiles) == ["none", "lookup"]  # HF is not profiled
    runs = [r for r in report.runs if r.method == "lookup"]
    assert profiles["lookup"]["steps"] == sum(r.steps for r in runs)
    assert sum(profiles["lookup"]["seconds"].values()) == pytest.approx(profiles["lookup"]["step_seconds"])
    assert set(report.to_json()["profile"]) == {"none", "lookup"}
    lines = profile_table(profiles).splitlines()
    assert lines[0].split()[:len(profiling.PHASES)] == [p[:11] for p in profiling.PHASES]
    assert run_benchmark(model, tokenizer, prompts, ["none"], max_new_tokens=4, progress=False).profiles() == {}


def test_markdown_script_gives_the_spread_of_repeated_runs_and_their_profile(tmp_path, capsys):
    import json

    from treedec.tools.benchmark import save_json

    markdown = bench_script("e2e_markdown")
    model, tokenizer, prompts = setup()
    paths = []
    for i in range(2):
        report = run_benchmark(model, tokenizer, prompts, ["none"], max_new_tokens=6, progress=False, profile=True)
        paths.append(str(tmp_path / f"r{i}.json"))
        save_json(report, paths[-1])
    markdown.main(paths)
    out = capsys.readouterr().out
    overall = next(line for line in out.splitlines() if line.startswith("| **overall**"))
    speedups = [json.load(open(p))["summary"]["overall"]["none"]["speedup"] for p in paths]
    assert f"({min(speedups):.2f}-{max(speedups):.2f})" in overall and overall.endswith("| yes |")
    assert "2 run(s)" in out and "| none | " in out[out.index("ms per step"):]
    report = run_benchmark(model, tokenizer, prompts, ["lookup"], max_new_tokens=6, progress=False)
    save_json(report, str(tmp_path / "other.json"))
    with pytest.raises(SystemExit, match="differ in methods"):
        markdown.main([paths[0], str(tmp_path / "other.json")])


def test_eos_helpers_take_every_form_of_eos_token_id():
    from types import SimpleNamespace

    from treedec.tools.prompts import eos_ids, until_eos

    assert eos_ids(SimpleNamespace(eos_token_id=None)) == frozenset()
    assert eos_ids(SimpleNamespace(eos_token_id=2)) == {2}
    assert eos_ids(SimpleNamespace(eos_token_id=[2, 7])) == {2, 7}
    assert until_eos([5, 7, 2, 7], frozenset({2, 7})) == [5, 7]  # the first of any EOS id, kept
    assert until_eos([5, 6], frozenset({2})) == [5, 6]
    assert until_eos([], frozenset({2})) == []


def test_fixed_cost_tau_script_is_deterministic(monkeypatch, tmp_path, capsys):
    """bench/tau_fixed_cost.py: tau per drafter with the verify cost fixed, the same on every run
    (no step time is measured into it), and the model left as it came."""
    import json

    from treedec.patching import learned_state

    script = bench_script("tau_fixed_cost")
    texts = {f"q{i}": repetitive_prompt(3 + i, 12) for i in range(2)}
    model = peaked_llama(seed=3)
    monkeypatch.setattr(script, "load_default_model", lambda: (model, ChatStub(texts)))
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps({"category": c, "turns": [t]})
                                   for c, t in zip(("writing", "coding"), texts)))
    monkeypatch.setattr("sys.argv", ["tau_fixed_cost.py", "--questions", str(questions), "--methods", "auto",
                                     "lookup", "--max-new-tokens", "16"])
    first, second = script.main(), script.main()
    assert first == second and set(first) == {"auto", "lookup"} and all(r["tau"] >= 1.0 for r in first.values())
    assert all(set(r["per_category"]) == {"writing", "coding"} for r in first.values())
    assert "auto       tau " in capsys.readouterr().out
    # sizing off: every step verifies the drafter's whole tree, up to --fixed-nodes
    trees = []  # (T chosen, nodes of the largest trie)
    choose = script.sizing.choose

    def spy(tries, *args):
        chosen = choose(tries, *args)
        trees.append((chosen[0], max(map(len, tries))))
        return chosen

    monkeypatch.setattr(script.sizing, "choose", spy)
    out = tmp_path / "fixed.json"
    monkeypatch.setattr("sys.argv", ["tau_fixed_cost.py", "--questions", str(questions), "--methods", "recycling",
                                     "--max-new-tokens", "16", "--fixed-nodes", "16", "--json", str(out)])
    fixed = script.main()
    assert json.loads(out.read_text())["results"] == fixed and fixed["recycling"]["tau"] >= 1.0
    assert trees and max(t for t, _ in trees) == 16 and fixed["recycling"]["mean_tree_nodes"] > 1
    assert all(t == max(size for size in script.sizing.TREE_SIZES if size <= min(16, n)) for t, n in trees)
    assert not hasattr(model, "treedec") and learned_state(model) is None
    from treedec.tools.prompts import Prompt

    asked = [Prompt(c, t, str(i)) for i, (c, t) in enumerate(zip("aabab", "12345"))]
    measured, warmup = script.split_per_category(asked, 1)  # the first of each category is measured
    assert [p.text for p in measured] == ["1", "3"] and [p.text for p in warmup] == ["2", "4", "5"]
    assert script.FixedCost().cost(1, 6) == pytest.approx(0.078)
    # past the curve (work 2 x 64): CostCurve's extrapolation, the last segment's slope (51 ms / 16)
    assert script.FixedCost().cost(2, 64) == pytest.approx(0.255 + 0.051 / 16 * 64)


def test_shared_state_script_reproduces_the_old_benchmark(monkeypatch, tmp_path, capsys, flat_step_costs):
    """bench/e2e_shared_state.py runs bench e2e with one learned state for every method: there
    `auto` drafts each prompt after `recycling` filled their table from it, and takes fewer steps
    than with its own state (what the benchmark does now)."""
    import json

    import treedec.tools.benchmark

    script = bench_script("e2e_shared_state")
    _, cli = _stub_cli(monkeypatch)
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps({"category": c, "turns": [t]})
                                   for c, t in (("writing", "a"), ("coding", "b"))))
    steps = {}
    for name, run in (("shared", script.main), ("own", lambda argv: cli.main(["bench", "e2e", *argv]))):
        _, cli = _stub_cli(monkeypatch)  # a fresh model each time
        out = tmp_path / f"{name}.json"
        assert run(["--questions", str(questions), "--methods", "hf", "recycling", "auto",
                    "--max-new-tokens", "24", "--json", str(out)]) == 0
        steps[name] = [r["steps"] for r in json.loads(out.read_text())["runs"] if r["method"] == "auto"]
    assert sum(steps["shared"]) < sum(steps["own"])
    assert treedec.tools.benchmark.set_learned_state is treedec.patching.set_learned_state  # restored
