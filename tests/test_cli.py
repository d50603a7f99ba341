"""The command line checks every argument before it loads anything: a user error is one line on
stderr and exit status 2, never a traceback, and never after minutes of benchmarking."""

import json

import pytest
import torch

import treedec.tools.cli as cli


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a command gets as far as loading a model or running the benchmark."""
    def refuse(*args, **kwargs):
        raise AssertionError("the command loaded a model before checking its arguments")

    monkeypatch.setattr(cli, "_load", refuse)
    import treedec.tools.benchmark

    monkeypatch.setattr(treedec.tools.benchmark, "run_benchmark", refuse)


@pytest.fixture
def questions(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"category": "writing", "turns": ["hello"], "question_id": 1}) + "\n")
    return str(path)


def one_error_line(capsys, expected: str) -> None:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("treedec: error: ") and expected in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.parametrize("arguments, expected", [
    (["--json", "/no/such/dir/x.json"], "the directory /no/such/dir does not exist"),
    (["--plot", "/no/such/dir/x.png"], "the directory /no/such/dir does not exist"),
    (["--profile-plot", "x.png"], "--profile-plot needs --profile"),
    (["--profile", "--profile-plot", "/no/such/dir/x.png"], "the directory /no/such/dir does not exist"),
    (["--max-new-tokens", "0"], "--max-new-tokens = 0 must be an int >= 1"),
    (["--threads", "0"], "--threads = 0 must be an int >= 1"),
    (["--limit-per-category", "0"], "--limit-per-category = 0 must be an int >= 1"),
    (["--device", "banana"], "--device 'banana' is not a device"),
    (["--device", "meta"], "treedec runs on cpu or cuda"),
    (["--sample", "--temperature", "0"], "--temperature = 0.0 must be a number in (0.0, inf]"),
    (["--sample", "--top-p", "1.5"], "--top-p = 1.5 must be a number in (0.0, 1.0]"),
    (["--medusa-heads", "/missing"], "--medusa-heads: /missing does not hold draft heads"),
    (["--heads-options", "{oops"], "--heads-options is not JSON"),
    (["--heads-options", "[1, 2]"], "--heads-options must be a JSON object"),
    (["--layerskip-options", '{"mode": "fixed", "skip_layers": []}', "--methods", "layerskip"], "non-empty list"),
    (["--layerskip-options", '{"modes": "fixed"}', "--methods", "layerskip"], "unknown option(s) modes"),
    (["--heads-options", '{"widths": "x"}', "--methods", "hf", "medusa"], "widths = 'x' must be"),
    (["--heads-options", '{"widths": [2]}'], "--heads-options applies to medusa or hydra"),
])
def test_bench_e2e_refuses_bad_arguments_before_loading(no_model, questions, capsys, arguments, expected):
    assert cli.main(["bench", "e2e", "--questions", questions, *arguments]) == 2
    one_error_line(capsys, expected)


def test_bench_e2e_refuses_heads_of_the_other_kind(no_model, questions, capsys, tmp_path):
    from treedec.heads import HeadsConfig, build_heads, save

    save(build_heads(HeadsConfig("hydra", 2, 64, 96)), tmp_path / "h")
    assert cli.main(["bench", "e2e", "--questions", questions, "--medusa-heads", str(tmp_path / "h")]) == 2
    one_error_line(capsys, "holds hydra heads, not medusa")


@pytest.mark.parametrize("content, expected", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "is not UTF-8 text of JSON lines"),
    (b'{"category": "writing"}\n', "q.jsonl:1 is not a Spec-Bench question"),
    (b"\n\n", "no questions in"),
])
def test_a_questions_file_that_is_not_one_is_one_line(no_model, tmp_path, capsys, content, expected):
    path = tmp_path / "q.jsonl"
    path.write_bytes(content)
    assert cli.main(["bench", "e2e", "--questions", str(path)]) == 2
    one_error_line(capsys, expected)
    assert cli.main(["bench", "e2e", "--questions", str(tmp_path / "none.jsonl")]) == 2
    one_error_line(capsys, "does not exist")


def test_a_bad_option_value_that_needs_the_model_fails_before_any_timing(monkeypatch, questions, capsys):
    """skip_layers past the model's layers: only the loaded model can tell, and it tells before HF runs."""
    from treedec.tools.models import tiny_llama
    import treedec.tools.benchmark

    monkeypatch.setattr(cli, "_load", lambda *args: (tiny_llama(num_layers=2), None))

    def refuse(*args, **kwargs):
        raise AssertionError("the benchmark ran before the methods' options were checked")

    monkeypatch.setattr(treedec.tools.benchmark, "run_benchmark", refuse)
    options = json.dumps({"mode": "fixed", "skip_layers": [5]})
    assert cli.main(["bench", "e2e", "--questions", questions, "--methods", "hf", "layerskip",
                     "--layerskip-options", options]) == 2
    one_error_line(capsys, "skip_layers = [5] must name some, not all, of the model's layers 0..1")


def test_argparse_errors_exit_2_without_a_traceback(capsys):
    assert cli.main(["bench", "e2e", "--threads", "two"]) == 2
    assert "invalid int value" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0


@pytest.mark.parametrize("arguments, expected", [
    (["--exits", "30-24"], "--exits takes FIRST:LAST layer pairs"),
    (["--max-new-tokens", "-1"], "--max-new-tokens = -1 must be an int >= 1"),
])
def test_bench_skipdecode_refuses_bad_arguments_before_loading(no_model, questions, capsys, arguments, expected):
    assert cli.main(["bench", "skipdecode", "--questions", questions, *arguments]) == 2
    one_error_line(capsys, expected)


def test_demo_refuses_bad_arguments_before_loading(no_model, capsys):
    assert cli.main(["demo", "--threads", "0"]) == 2
    one_error_line(capsys, "--threads = 0 must be an int >= 1")


@pytest.mark.parametrize("arguments, expected", [
    (["--tokens", "0"], "--tokens = 0 must be an int >= 1"),
    (["--epochs", "0"], "--epochs = 0 must be an int >= 1"),
    (["--lr", "0"], "--lr = 0.0 must be a number in (0.0, inf]"),
    (["--collect-minutes", "-1"], "--collect-minutes = -1.0 must be a number"),
    (["--model", "/no/such/model"], "--model /no/such/model is not a model directory"),
    (["--model", "/tmp"], "--model /tmp is not a model directory (no config.json in it)"),
    (["--questions", "/no/such.jsonl"], "does not exist"),
])
def test_train_heads_refuses_bad_arguments_before_loading(no_model, tmp_path, capsys, arguments, expected):
    assert cli.main(["train-heads", "--kind", "medusa", "--out", str(tmp_path / "out"), *arguments]) == 2
    one_error_line(capsys, expected)


def test_train_heads_into_a_directory_of_the_other_kind_is_refused_before_loading(no_model, tmp_path, capsys):
    from treedec.heads import HeadsConfig, build_heads, save

    save(build_heads(HeadsConfig("medusa", 4, 64, 96)), tmp_path)
    assert cli.main(["train-heads", "--kind", "hydra", "--out", str(tmp_path)]) == 2
    one_error_line(capsys, "holds other heads: kind 'medusa' (asked for 'hydra')")
    (tmp_path / "file").write_text("")
    assert cli.main(["train-heads", "--kind", "hydra", "--out", str(tmp_path / "file")]) == 2
    one_error_line(capsys, "is a file; give a directory")


def test_audit_command_on_a_tiny_model(monkeypatch, tmp_path, capsys):
    from test_benchmark import setup

    model, tokenizer, _ = setup()
    tokenizer.chat_template = "stub"
    monkeypatch.setattr(cli, "_load", lambda *args: (model, tokenizer))
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps({"category": c, "turns": [t], "question_id": i})
                              for i, (c, t) in enumerate([("writing", "a"), ("coding", "b")])))
    out = tmp_path / "audit.json"
    assert cli.main(["audit", "--questions", str(path), "--drafter", "lookup", "--max-new-tokens", "10",
                     "--sample", "--draws", "64", "--positions", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "writing 0" in printed and "2/2 identical to HF greedy" in printed and "no defect found" in printed
    saved = json.loads(out.read_text())
    assert saved["ok"] and len(saved["greedy"]) == 2 and len(saved["sampling"]) == 2


@pytest.mark.parametrize("arguments, expected", [
    (["--draws", "1", "--sample"], "--draws = 1 must be an int >= 2"),
    (["--options", '{"max_tree_nodes": 0}'], "max_tree_nodes = 0"),
    (["--drafter", "lookup", "--options", '{"recycling_width": 2}'], "unknown option(s) recycling_width"),
    (["--json", "/no/such/dir/a.json"], "does not exist"),
    (["--drafter", "medusa", "--options", '{"widths": "x"}'], "widths = 'x' must be"),
])
def test_audit_refuses_bad_arguments_before_loading(no_model, questions, capsys, arguments, expected):
    assert cli.main(["audit", "--questions", questions, *arguments]) == 2
    one_error_line(capsys, expected)


def test_info_prints_every_ops_decision_on_this_machine(monkeypatch, capsys):
    from treedec import ops

    monkeypatch.setenv("TREEDEC_BACKEND", "auto")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name, op in ops.OPS.items():
        assert f"  {name:<17} {op.describe(torch.device('cpu'))}\n" in out
    monkeypatch.setenv("TREEDEC_BACKEND", "reference")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "TREEDEC_BACKEND=reference" in out and all(f"  {name:<17} reference\n" in out for name in ops.OPS)


@pytest.mark.parametrize("arguments, expected", [
    (["--tokens", "0"], "--tokens = 0 must be an int >= 1"),
    (["--ttt-steps", "0"], "--ttt-steps = 0 must be an int >= 1"),
    (["--draft-vocab", "4"], "--draft-vocab must be at least 8"),
    (["--batch-tokens", "8"], "--batch-tokens = 8 must be an int >= 16"),
    (["--prompt-context", "-1"], "--prompt-context = -1 must be an int >= 0"),
    (["--collect-batch-tokens", "0"], "--collect-batch-tokens = 0 must be an int >= 1"),
    (["--model", "/tmp"], "--model /tmp is not a model directory (no config.json in it)"),
    (["--questions", "/no/such.jsonl"], "does not exist"),
])
def test_train_drafter_refuses_bad_arguments_before_loading(no_model, tmp_path, capsys, arguments, expected):
    assert cli.main(["train-drafter", "--kind", "eagle3", "--out", str(tmp_path / "out"), *arguments]) == 2
    one_error_line(capsys, expected)


@pytest.mark.parametrize("arguments, expected", [
    (["--eagle-drafter", "/missing", "--methods", "eagle"], "--eagle-drafter /missing is not a drafter directory"),
    (["--eagle-options", '{"tree_width": 2}'], "--eagle-options applies to eagle"),
])
def test_bench_e2e_refuses_bad_eagle_arguments_before_loading(no_model, questions, capsys, arguments, expected):
    assert cli.main(["bench", "e2e", "--questions", questions, *arguments]) == 2
    one_error_line(capsys, expected)


def test_train_drafters_writer_and_reader_share_one_copy_of_a_dtype(tmp_path):
    """--writer-dtype and --feature-dtype: a copy per dtype other than the model's, one copy when
    both name the same dtype, none for the model's own (and no writer when the text is collected)."""
    from types import SimpleNamespace

    from treedec.tools.cli import _reader, _writer
    from treedec.tools.heads_training import DATA_NAME
    from treedec.tools.models import tiny_llama

    model = tiny_llama()

    def copies(writer_dtype, feature_dtype):
        args = SimpleNamespace(writer_dtype=writer_dtype, feature_dtype=feature_dtype, out=str(tmp_path))
        reader = _reader(model, args)
        return _writer(model, args, reader), reader

    assert copies("fp32", "fp32") == (None, None)
    writer, reader = copies("bf16", "bf16")
    assert writer is reader and next(reader.parameters()).dtype == torch.bfloat16
    writer, reader = copies("fp32", "bf16")
    assert writer is None and next(reader.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # copies, the model is left as it was
    (tmp_path / DATA_NAME).write_bytes(b"")
    assert copies("bf16", "bf16")[0] is None  # the text is collected already: no writer
