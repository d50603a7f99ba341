"""`treedec demo | info | audit | train-heads | train-drafter | bench e2e | bench skipdecode`.

Every argument is checked before anything loads: a user error prints one line, `treedec: error:
...`, and exits with status 2 (argparse's own errors exit 2 too), with no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class UsageError(Exception):
    """A bad argument: printed as one line, exit status 2."""


def _load(dtype_name: str, threads: int, device: str = "cpu"):
    from .models import load_default_model

    torch.set_num_threads(threads)
    dtype = DTYPES[dtype_name]
    print(f"loading the embedded SmolLM2-135M-Instruct ({dtype_name}, {device}, {threads} threads) ...", flush=True)
    model, tokenizer = load_default_model(dtype=dtype)
    return model.to(device), tokenizer


# -- argument checks, all before any model loads ------------------------------------------------
# (flag, attribute, lowest value) for the ints that must be at least something
INT_BOUNDS = (("--max-new-tokens", "max_new_tokens", 1), ("--threads", "threads", 1),
              ("--limit-per-category", "limit_per_category", 1), ("--top-k", "top_k", 0),
              ("--heads", "heads", 1), ("--tokens", "tokens", 1), ("--samples", "samples", 0),
              ("--collect-batch", "collect_batch", 1), ("--collect-batch-tokens", "collect_batch_tokens", 1),
              ("--blocks", "blocks", 1), ("--epochs", "epochs", 1), ("--batch-size", "batch_size", 1),
              ("--positions", "positions", 1), ("--draws", "draws", 2), ("--ttt-steps", "ttt_steps", 1),
              ("--batch-tokens", "batch_tokens", 16), ("--prompt-context", "prompt_context", 0),
              ("--max-prompt-tokens", "max_prompt_tokens", 1))
# (flag, attribute, low, high, low excluded) for the floats
FLOAT_BOUNDS = (("--temperature", "temperature", 0.0, float("inf"), True), ("--top-p", "top_p", 0.0, 1.0, True),
                ("--lr", "lr", 0.0, float("inf"), True), ("--collect-minutes", "collect_minutes", 0.0, float("inf"), True))


def _check_bounds(args) -> None:
    from ..options import int_option, number_option

    try:
        for flag, name, low in INT_BOUNDS:
            if getattr(args, name, None) is not None:
                int_option(flag, getattr(args, name), low)
        for flag, name, low, high, low_open in FLOAT_BOUNDS:
            if getattr(args, name, None) is not None:
                number_option(flag, getattr(args, name), low, high, low_open)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _check_device(device: str) -> None:
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a device: cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r}: treedec runs on cpu or cuda")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is available here")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _check_output(flag: str, path: str | None) -> None:
    """A file the command will write at its end: its folder must exist and be writable now."""
    if path is None:
        return
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name")
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: the directory {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {path}: the directory {folder} is not writable")


def _questions(path: str, limit_per_category: int | None):
    """The Spec-Bench questions of `path`, or a UsageError saying what is wrong with the file."""
    from .prompts import load_questions

    try:
        prompts = load_questions(path, limit_per_category)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(f"--questions: {error}") from None
    if not prompts:
        raise UsageError(f"--questions: no questions in {path}")
    return prompts


def _json_options(flag: str, text: str | None) -> dict:
    if not text:
        return {}
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{flag} is not JSON: {error}") from None
    if not isinstance(parsed, dict):
        raise UsageError(f"{flag} must be a JSON object of treedec.patch options, not {type(parsed).__name__}")
    return parsed


def _heads_dir(flag: str, path: str, kind: str) -> str:
    from ..heads import load

    try:
        heads = load(path)
    except ValueError as error:
        raise UsageError(f"{flag}: {error}") from None
    if heads.config.kind != kind:
        raise UsageError(f"{flag} {path} holds {heads.config.kind} heads, not {kind}")
    return path


def _method_options(methods: list[str], options: dict[str, dict]) -> None:
    """treedec.patch's checks of each method's options that need no model."""
    from .benchmark import TREEDEC_METHODS
    from ..patching import check_options_before_loading

    for method in methods:
        if method in TREEDEC_METHODS:
            try:
                check_options_before_loading(TREEDEC_METHODS[method], options.get(method, {}))
            except ValueError as error:
                raise UsageError(f"{method}: {error}") from None


def _patchable(model, methods: list[str], options: dict[str, dict]) -> None:
    """Each method patches the loaded model (layer indices, heads that fit it), before any timing."""
    from .benchmark import check_methods

    try:
        check_methods(model, methods, options)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _check_model_dir(path: str | None) -> None:
    """A Hugging Face model directory: a folder with its config.json."""
    if path is not None and not (Path(path) / "config.json").is_file():
        raise UsageError(f"--model {path} is not a model directory (no config.json in it)")


def _check_common(args) -> None:
    _check_bounds(args)
    _check_device(args.device)


def _sampling(args) -> dict | None:
    if not args.sample:
        return None
    settings = {"temperature": args.temperature}
    if args.top_p is not None:
        settings["top_p"] = args.top_p
    if args.top_k is not None:
        settings["top_k"] = args.top_k
    return settings


def _mode(args) -> str:
    settings = _sampling(args)
    return "greedy" if settings is None else "sampling " + ", ".join(f"{k}={v}" for k, v in settings.items())


def _where(args) -> str:
    if args.device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(args.device))
    return f"{args.threads} CPU threads"


def _has_shipped_heads(kind: str, model) -> bool:
    from ..heads.shipped import shipped_heads

    try:
        shipped_heads(kind, model)
    except ValueError:
        return False
    return True


def cmd_demo(args) -> int:
    from .benchmark import ALL_METHODS, OPT_IN_METHODS, run_benchmark
    from .prompts import BUILTIN_PROMPTS

    _check_common(args)
    model, tokenizer = _load(args.dtype, args.threads, args.device)
    # layerskip drafts nothing on this model (README, "Layer skipping"); the heads run where
    # shipped ones fit the model
    methods = [m for m in ALL_METHODS
               if m != "layerskip" and (m not in OPT_IN_METHODS or _has_shipped_heads(m, model))]
    report = run_benchmark(model, tokenizer, list(BUILTIN_PROMPTS), methods, args.max_new_tokens)
    print()
    print(f"treedec demo: {len(BUILTIN_PROMPTS)} built-in prompts, greedy, max_new_tokens={args.max_new_tokens}, "
          f"{args.dtype}, {_where(args)}")
    print("x = speedup over HF generate; same = outputs identical to HF greedy\n")
    print(report.table())
    rows = report.summary()
    lossless = all(r["identical"] == r["prompts"] for m, r in rows.items() if m != "hf_pld")
    print("\nall treedec outputs identical to HF greedy:", "yes" if lossless else "NO")
    if any(m in OPT_IN_METHODS for m in methods):
        print("(the shipped heads trained on these built-in prompts among others; README's heads figures are on "
              "prompts they never saw)")

    settings = _sampling(args) or {"temperature": args.temperature}
    sampled = run_benchmark(model, tokenizer, list(BUILTIN_PROMPTS), ["hf", "none", "auto"], args.max_new_tokens,
                            sampling=settings)
    print(f"\nthe same prompts, sampling ({', '.join(f'{k}={v}' for k, v in settings.items())}): "
          "x = tokens/s over HF sampling; same = samples identical to drafter=None's (the tree never changes "
          "a sample); the distribution is the model's (tests/test_sampling.py)\n")
    print(sampled.table())
    return 0 if lossless else 1


def cmd_info(args) -> int:
    import transformers

    from .. import __version__, ops
    from ..ops import _triton

    print(f"treedec       {__version__}")
    print(f"python        {platform.python_version()} ({platform.machine()})")
    print(f"torch         {torch.__version__} (threads {torch.get_num_threads()})")
    print(f"transformers  {transformers.__version__}")
    try:
        import triton

        print(f"triton        {triton.__version__}")
    except ImportError:
        print("triton        not installed")
    cuda = torch.cuda.is_available()
    print(f"cuda          {torch.cuda.get_device_name(0) if cuda else 'not available'}")
    print(f"TREEDEC_BACKEND={ops.requested_backend()}")
    print("backends:     " + ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in ops.available_backends().items()))
    for device in ["cpu"] + (["cuda"] if cuda else []):
        print(f"{device} ops (the backend each op runs on, and where it hands the reference a call):")
        for name, op in ops.OPS.items():
            print(f"  {name:<17} {op.describe(torch.device(device))}")
    for what, error in _triton.load_errors().items():
        print(f"triton: {what} did not load: {error}")
    return 0


def cmd_bench_e2e(args) -> int:
    from .benchmark import plot_profile, plot_speedups, profile_table, run_benchmark, save_json

    _check_common(args)
    _check_output("--json", args.json)
    _check_output("--plot", args.plot)
    _check_output("--profile-plot", args.profile_plot)
    if args.profile_plot and not args.profile:
        raise UsageError("--profile-plot needs --profile")
    prompts = _questions(args.questions, args.limit_per_category)
    options: dict[str, dict] = {"medusa": {}, "hydra": {}, "eagle": {}}
    for flag, methods in (("--layerskip-options", ("layerskip",)), ("--heads-options", ("medusa", "hydra")),
                          ("--eagle-options", ("eagle",))):
        parsed = _json_options(flag, getattr(args, flag[2:].replace("-", "_")))
        for method in methods:
            options.setdefault(method, {}).update(parsed)
    for method, flag, path in (("medusa", "--medusa-heads", args.medusa_heads), ("hydra", "--hydra-heads", args.hydra_heads)):
        if path:
            options[method]["heads"] = _heads_dir(flag, path, method)
    if args.eagle_drafter:
        if not (Path(args.eagle_drafter) / "config.json").is_file():
            raise UsageError(f"--eagle-drafter {args.eagle_drafter} is not a drafter directory (no config.json)")
        options["eagle"]["drafter_path"] = args.eagle_drafter
    for flag, given, methods in (("--heads-options", args.heads_options, ("medusa", "hydra")),
                                 ("--eagle-options", args.eagle_options, ("eagle",)),
                                 ("--eagle-drafter", args.eagle_drafter, ("eagle",)),
                                 ("--layerskip-options", args.layerskip_options, ("layerskip",)),
                                 ("--medusa-heads", args.medusa_heads, ("medusa",)),
                                 ("--hydra-heads", args.hydra_heads, ("hydra",))):
        if given and not set(methods) & set(args.methods):
            raise UsageError(f"{flag} applies to {' or '.join(methods)}, which --methods does not run")
    _method_options(args.methods, options)
    model, tokenizer = _load(args.dtype, args.threads, args.device)
    _patchable(model, args.methods, options)
    report = run_benchmark(model, tokenizer, prompts, args.methods, args.max_new_tokens, sampling=_sampling(args),
                           options=options, profile=args.profile)
    report.meta.update(questions=str(args.questions), limit_per_category=args.limit_per_category)
    print()
    print(f"Spec-Bench e2e: {len(prompts)} prompts, {_mode(args)}, max_new_tokens={args.max_new_tokens}, "
          f"{args.dtype}, {_where(args)}")
    same = ("same = samples identical to drafter=None's (same seed, so the same uniforms)" if args.sample
            else "same = outputs identical to HF greedy")
    print(f"x = tokens/s over HF generate's; {same}\n")
    print(report.table())
    _print_drafting(report, model.config.num_hidden_layers)
    differing = [] if args.sample else [r for r in report.runs if not r.identical]
    for run in differing:
        print(f"  {run.method} differs from HF on {run.category} question {run.question_id}: first at generated "
              f"token {run.first_diff}, where HF's top-2 logit gap is {run.logit_gap:.3g}")
    if args.profile:
        print("\nWhere each step's time goes (ms per step, summed over the prompts' steps):")
        print(profile_table(report.profiles()))
    if args.json:
        save_json(report, args.json)
        print(f"\nwrote {args.json}")
    if args.profile_plot:
        try:
            plot_profile(report.profiles(), args.profile_plot, f"{len(prompts)} prompts, {_mode(args)}, {_where(args)}")
            print(f"wrote {args.profile_plot}")
        except ImportError:
            print("matplotlib is not installed; no plot (pip install matplotlib)", file=sys.stderr)
    if args.plot:
        try:
            plot_speedups(report, args.plot)
            print(f"wrote {args.plot}")
        except ImportError:
            print("matplotlib is not installed; no plot (pip install matplotlib)", file=sys.stderr)
    return 0


def cmd_audit(args) -> int:
    from ..auditing import audit
    from .benchmark import TREEDEC_METHODS, encode_prompt

    _check_common(args)
    _check_output("--json", args.json)
    prompts = _questions(args.questions, args.limit_per_category)
    options = _json_options("--options", args.options)
    _method_options([args.drafter], {args.drafter: options})
    _check_model_dir(args.model)
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(args.threads)
        dtype = DTYPES[args.dtype]
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval().to(args.device)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    else:
        model, tokenizer = _load(args.dtype, args.threads, args.device)
    _patchable(model, [args.drafter], {args.drafter: options})
    chat = getattr(tokenizer, "chat_template", None) is not None
    encoded = [encode_prompt(tokenizer, p) if chat else tokenizer(p.text, return_tensors="pt") for p in prompts]
    encoded = [{k: v.to(args.device) for k, v in e.items()} for e in encoded]
    print(f"auditing drafter={TREEDEC_METHODS[args.drafter]!r} against HF on {len(prompts)} prompts "
          f"({args.dtype}, {_where(args)}): greedy, max_new_tokens={args.max_new_tokens}"
          + (f"; sampling {_sampling(args)}, {args.draws} draws x {args.positions} positions" if args.sample else ""),
          flush=True)
    report = audit(model, encoded, drafter=TREEDEC_METHODS[args.drafter], max_new_tokens=args.max_new_tokens,
                   sampling=_sampling(args), samples=args.draws, positions=args.positions,
                   labels=[f"{p.category} {p.question_id}" for p in prompts], **options)
    print(report.table())
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({**report.to_json(), "questions": str(args.questions)}, handle, indent=1)
        print(f"wrote {args.json}")
    return 0 if report.ok else 1


def _print_drafting(report, num_layers: int) -> None:
    """Model drafters' own figures (drafted, accepted, drafting time) and layerskip's search."""
    for method, found in report.to_json()["drafting"].items():
        if not found["drafted"]:
            print(f"{method}: proposed nothing")
            continue
        print(f"{method}: proposed {found['drafted']} candidate tokens, {found['acceptance']:.1%} of them accepted; "
              f"drafting took "
              f"{found['draft_seconds']:.1f} s, {found['draft_to_verify']:.2f}x the rest of decoding")
    if "layerskip" in report.learned:
        _print_layerskip_search(report.learned["layerskip"].tables, num_layers)
    for learned in report.learned.values():  # each method's own (only heads methods load heads)
        _print_heads_tree_curve(learned)


def _print_heads_tree_curve(learned) -> None:
    """For the heads a method used (`learned`: its patching.LearnedState): their static tree's
    expected tokens per step at each size T, the method's measured verify cost at T (batch 1), and
    the T with the most expected tokens per second."""
    from ..heads.tree import best_tree, size_curve
    from ..sizing import TREE_SIZES

    if not learned.cost.covers(1):
        return
    for key, heads in learned.tables.items():
        accuracies = heads.meta.get("rank_accuracy") if key[0] == "heads" else None
        if not accuracies:
            continue
        rows = size_curve(accuracies, lambda size: learned.cost.cost(1, size), TREE_SIZES)
        best = max(rows, key=lambda row: row[3])
        print(f"{heads.config.kind} heads ({key[1]}): static tree from held-out per-rank accuracies, against this "
              "run's measured verify cost (batch 1):")
        print("      T  tokens/step  step ms  tokens/s")
        for size, tokens, seconds, rate in rows:
            print(f"  {'->' if size == best[0] else '  '}{size:>4}  {tokens:>11.2f}  {seconds * 1e3:>7.2f}  {rate:>8.1f}")
        paths = best_tree(accuracies, best[0] - 1)
        print(f"  T={best[0]} tree (rank paths): " + " ".join("(" + ",".join(map(str, p)) + ")" for p in paths))


def _print_layerskip_search(tables: dict, num_layers: int) -> None:
    """What the per-model SWIFT search decided (it runs once, in the benchmark's warm-up)."""
    for key, plan in tables.items():
        if key[:2] != ("layerskip", "swift"):
            continue
        skipped = plan.skipped(num_layers) if plan.kept is not None else None
        best = "" if plan.agreement is None else (
            f"; the best set tried agreed on {plan.agreement:.1%} of tokens, modelled at {plan.expected_gain:.2f}x")
        print(f"layerskip search: {plan.forwards} forwards in {plan.seconds:.1f} s; "
              f"{'skips layers ' + str(skipped) if skipped else 'drafts nothing (no set pays)'}{best}")


def cmd_bench_skipdecode(args) -> int:
    from .skipdecode import compare

    _check_common(args)
    prompts = _questions(args.questions, args.limit_per_category)
    schedules = []
    for text in args.exits:
        try:
            first, last = (int(part) for part in text.split(":"))
        except ValueError:
            raise UsageError(f"--exits takes FIRST:LAST layer pairs, got {text!r}") from None
        schedules.append((first, last))
    model, tokenizer = _load(args.dtype, args.threads, args.device)
    print("SkipDecode is LOSSY: its tokens are not the model's greedy output. Agreement says how far they differ.")
    for result in compare(model, tokenizer, prompts, schedules, args.max_new_tokens):
        print(result.row())
    return 0


def _writer(model, args, reader=None):
    """A copy of `model` in --writer-dtype to write the training text (heads_training.collect's
    `writer`), or None, and the model writes it: when that is the model's own dtype, or when the
    text is already collected in --out (a rerun resumes from it, so no copy is made). `reader`, a
    copy already made in that dtype, is shared instead of making another."""
    from .heads_training import DATA_NAME

    dtype = DTYPES[args.writer_dtype]
    if dtype == next(model.parameters()).dtype or (Path(args.out) / DATA_NAME).exists():
        return None
    if reader is not None and next(reader.parameters()).dtype == dtype:
        return reader
    return _copy_in(model, dtype)


def _reader(model, args):
    """train-drafter's copy of `model` in --feature-dtype, which computes the features and targets
    (eagle_training.train_eagle's `reader`), or None where that is the model's own dtype."""
    dtype = DTYPES[args.feature_dtype]
    return None if dtype == next(model.parameters()).dtype else _copy_in(model, dtype)


def _copy_in(model, dtype: torch.dtype):
    import copy

    return copy.deepcopy(model).to(dtype)


def _training_setup(args):
    """The model to train a drafter for and the training prompts, encoded as `bench e2e` encodes
    them (train-heads, train-drafter): the Spec-Bench questions of --questions without the ones
    `bench e2e` measures (unless --include-bench-prompts) and the built-in instructions,
    round-robin over categories so that a collection that stops early still covers them all."""
    from .benchmark import encode_prompt
    from .prompts import BUILTIN_PROMPTS

    questions = _questions(args.questions, None)
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")  # TF32 on GPUs that have it: drafters train the same, faster
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval().to(args.device)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        name = str(args.model)
    else:
        model, tokenizer = _load("fp32", args.threads, args.device)
        name = "SmolLM2-135M-Instruct (embedded)"
    if not args.include_bench_prompts:
        # `bench e2e` measures the first question of each category: a drafter that trained on its
        # continuations would be measured on text it memorised
        measured = set(_questions(args.questions, 1))
        questions = [q for q in questions if q not in measured]
        print(f"left out the {len(measured)} prompts `treedec bench e2e` measures on (--include-bench-prompts keeps them)")
    by_category: dict[str, list] = {}
    for prompt in questions + list(BUILTIN_PROMPTS):
        by_category.setdefault(prompt.category, []).append(prompt)
    queues = list(by_category.values())
    prompts = [queue[i] for i in range(max(map(len, queues))) for queue in queues if i < len(queue)]
    chat = getattr(tokenizer, "chat_template", None) is not None
    prompt_ids = [encode_prompt(tokenizer, prompt)["input_ids"][0].tolist() if chat
                  else list(tokenizer(prompt.text)["input_ids"]) for prompt in prompts]
    if args.max_prompt_tokens is not None:
        # a long prompt costs the collection a forward over all of it per continuation (summaries
        # and RAG run to 1.5k tokens, about 80% of a CPU collection's time for a third of the prompts)
        kept = [ids for ids in prompt_ids if len(ids) <= args.max_prompt_tokens]
        print(f"left out {len(prompt_ids) - len(kept)} of {len(prompt_ids)} prompts longer than "
              f"{args.max_prompt_tokens} tokens (--max-prompt-tokens)")
        prompt_ids = kept
    if not prompt_ids:
        raise UsageError("no training prompts are left (a larger --max-prompt-tokens, or more --questions)")
    return model, tokenizer, name, prompt_ids


def cmd_train_heads(args) -> int:
    from .heads_training import RANKS, resume_conflict, train_heads

    _check_common(args)
    draft_vocab = args.draft_vocab
    if draft_vocab is not None and draft_vocab != "all":
        if not draft_vocab.isdigit() or int(draft_vocab) < RANKS:
            raise UsageError(f"--draft-vocab must be 'all' or an int >= {RANKS} (got {draft_vocab!r})")
        draft_vocab = int(draft_vocab)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file; give a directory")
    conflict = resume_conflict(args.out, args.kind, args.heads, args.blocks, args.own_lm_head)
    if conflict is not None:
        raise UsageError(f"--out: {conflict}")
    _check_model_dir(args.model)
    model, tokenizer, name, prompt_ids = _training_setup(args)
    print(f"training {args.heads} {args.kind} heads on {name} ({args.device}): {args.tokens} self-distilled tokens "
          f"from {len(prompt_ids)} prompts (greedy + {args.samples} sampled each), {args.epochs} epochs "
          f"-> {args.out}")
    _, reports = train_heads(model, prompt_ids, args.kind, args.heads, args.tokens, args.out, args.epochs, args.lr,
                             args.batch_size, args.max_new_tokens, base_model=name, samples=args.samples,
                             temperature=args.temperature, collect_batch=args.collect_batch,
                             num_blocks=args.blocks,
                             collect_seconds=None if args.collect_minutes is None else 60 * args.collect_minutes,
                             save_dtype=DTYPES[args.save_dtype],
                             command=" ".join(["treedec", *args.argv]), own_lm_head=args.own_lm_head,
                             soft_targets=args.soft_targets, collect_batch_tokens=args.collect_batch_tokens,
                             draft_vocab=model.config.vocab_size if draft_vocab == "all" else draft_vocab,
                             writer=_writer(model, args))
    if reports:
        last = reports[-1]
        print(f"saved to {args.out}: loss {last.loss:.3f}, top-1 per head "
              + ", ".join(f"{a:.1%}" for a in last.top1))
    return 0


def cmd_train_drafter(args) -> int:
    from .eagle_training import train_eagle

    _check_common(args)
    if args.draft_vocab < 8:  # (train-heads' --draft-vocab also takes "all": not among INT_BOUNDS)
        raise UsageError(f"--draft-vocab must be at least 8 (got {args.draft_vocab})")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file; give a directory")
    _check_model_dir(args.model)
    model, _, name, prompt_ids = _training_setup(args)
    reader = _reader(model, args)
    print(f"training an {args.kind} drafter for {name} ({args.device}): {args.tokens} self-distilled tokens from "
          f"{len(prompt_ids)} prompts (greedy + {args.samples} sampled each), {args.epochs} epochs, "
          f"{args.ttt_steps} training-time-test steps -> {args.out}")
    _, reports = train_eagle(model, prompt_ids, args.out, args.tokens, args.epochs, args.lr, args.batch_tokens,
                             args.ttt_steps, args.draft_vocab, args.max_new_tokens, args.samples, args.temperature,
                             args.collect_batch,
                             None if args.collect_minutes is None else 60 * args.collect_minutes, base_model=name,
                             command=" ".join(["treedec", *args.argv]),
                             save_dtype=DTYPES[args.save_dtype], collect_batch_tokens=args.collect_batch_tokens,
                             writer=_writer(model, args, reader), train_dtype=DTYPES[args.train_dtype],
                             prompt_context=args.prompt_context, reader=reader)
    if reports:
        print(f"saved to {args.out}: loss {reports[-1]['loss']:.3f}, top-1 per step "
              + ", ".join(f"{a:.1%}" for a in reports[-1]["step_accuracy"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .benchmark import ALL_METHODS, OPT_IN_METHODS
    from .prompts import SPEC_BENCH_DEV

    parser = argparse.ArgumentParser(prog="treedec", description="Lossless tree speculative decoding for HF models")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, max_new_tokens):
        p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
        p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
        p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
        p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
        p.add_argument("--sample", action="store_true", help="sample (do_sample=True) instead of greedy")
        p.add_argument("--temperature", type=float, default=0.7, help="with --sample (default 0.7)")
        p.add_argument("--top-p", type=float, default=None, help="with --sample")
        p.add_argument("--top-k", type=int, default=None, help="with --sample (default: the model's)")

    def distillation_arguments(p):
        """What train-heads and train-drafter share: the model, the prompts, the collection of its
        text (heads_training.collect), where it runs and how the result is saved."""
        p.add_argument("--model", help="a Hugging Face model directory (default: the embedded SmolLM2-135M)")
        p.add_argument("--questions", default=str(SPEC_BENCH_DEV),
                       help="JSONL of prompts (Spec-Bench format), used with the built-in instructions (default: "
                            "the Spec-Bench dev half shipped with treedec)")
        p.add_argument("--include-bench-prompts", action="store_true",
                       help="also train on the prompts `bench e2e` measures (left out by default)")
        p.add_argument("--samples", type=int, default=0,
                       help="sampled continuations per prompt, after the greedy one (default 0)")
        p.add_argument("--temperature", type=float, default=0.8, help="for the sampled continuations (default 0.8)")
        p.add_argument("--collect-batch", type=int, default=32, help="prompts per generate call (default 32)")
        p.add_argument("--collect-minutes", type=float, default=None,
                       help="start no new generate batch after this long (default: no limit)")
        p.add_argument("--collect-batch-tokens", type=int, default=None,
                       help="a generate call also stops growing before rows x (longest prompt + "
                            "--max-new-tokens) passes this (default: no limit): large batches of "
                            "short prompts without running out of memory on long ones")
        p.add_argument("--max-prompt-tokens", type=int, default=None,
                       help="leave out training prompts longer than this (default: none left out); long prompts "
                            "cost the collection most of its time on a CPU")
        p.add_argument("--writer-dtype", choices=tuple(DTYPES), default="fp32",
                       help="the text is written by a copy of the model in this dtype (bf16: faster on CPUs and GPUs "
                            "with bf16 matmuls); the targets are the fp32 model's own argmax (train-drafter: see "
                            "--feature-dtype; default fp32)")
        p.add_argument("--max-new-tokens", type=int, default=128, help="per continuation while collecting")
        p.add_argument("--save-dtype", choices=tuple(DTYPES), default="fp32", help="of the saved weights")
        p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: where collection and training run")
        p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))

    demo = sub.add_parser("demo", help="built-in prompts on the embedded model: HF vs treedec drafters")
    common(demo, 96)
    demo.set_defaults(func=cmd_demo)

    info = sub.add_parser("info", help="versions and available kernel backends")
    info.set_defaults(func=cmd_info)

    check = sub.add_parser("audit", help="HF's generate and treedec's side by side: identical, near-ties, defects")
    check.add_argument("--drafter", choices=[m for m in ALL_METHODS if m not in ("hf", "hf_pld")], default="auto",
                       help="the treedec method to audit (default auto; none: no drafts)")
    check.add_argument("--options", help='JSON of treedec.patch options, e.g. \'{"max_tree_nodes": 16}\'')
    check.add_argument("--model", help="a Hugging Face model directory (default: the embedded SmolLM2-135M)")
    check.add_argument("--questions", default=str(SPEC_BENCH_DEV),
                       help="Spec-Bench question.jsonl (default: the dev half shipped with treedec)")
    check.add_argument("--limit-per-category", type=int, default=1)
    check.add_argument("--draws", type=int, default=256, help="with --sample: draws per prompt and side")
    check.add_argument("--positions", type=int, default=4, help="with --sample: generated positions tested")
    check.add_argument("--json", help="write the report here")
    common(check, 64)
    check.set_defaults(func=cmd_audit)

    train = sub.add_parser("train-heads", help="train Medusa/Hydra draft heads by self-distillation")
    train.add_argument("--kind", choices=("medusa", "hydra"), required=True)
    train.add_argument("--heads", type=int, default=4, help="number of heads K (default 4)")
    train.add_argument("--tokens", type=int, default=20000, help="self-distilled tokens to collect (default 20000)")
    train.add_argument("--out", required=True, help="directory for the heads, the collected data and checkpoints")
    train.add_argument("--blocks", type=int, default=1, help="residual blocks per head (default 1)")
    train.add_argument("--own-lm-head", action="store_true",
                       help="each head gets its own LM head, initialised from the model's and trained "
                            "(K x vocab x hidden more parameters; default: the model's, shared and frozen)")
    train.add_argument("--soft-targets", action="store_true",
                       help="learn the model's whole next-token distribution at each target, not only its "
                            "argmax (one more LM-head pass per batch; reported loss stays the argmax's)")
    train.add_argument("--draft-vocab", default=None,
                       help="train over the N most frequent tokens of the collected text; the heads then draft "
                            "from at most these (default: the fewest holding 99%% of the model's probability "
                            "there, which the drafter also keeps by default; 'all': the whole vocabulary)")
    train.add_argument("--epochs", type=int, default=3)
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine decay; default 1e-3)")
    train.add_argument("--batch-size", type=int, default=64)
    distillation_arguments(train)
    train.set_defaults(func=cmd_train_heads)

    drafter = sub.add_parser("train-drafter", help="train an EAGLE-3 drafter by self-distillation")
    drafter.add_argument("--kind", choices=("eagle3",), required=True)
    drafter.add_argument("--out", required=True, help="directory for the drafter (SpecForge's EAGLE-3 format), the "
                                                      "collected text and checkpoints; a rerun resumes there")
    drafter.add_argument("--tokens", type=int, default=50000, help="self-distilled tokens to collect (default 50000)")
    drafter.add_argument("--draft-vocab", type=int, default=8192,
                         help="draft vocabulary: the N tokens most often the model's choice in the text (default 8192)")
    drafter.add_argument("--ttt-steps", type=int, default=5,
                         help="training-time-test steps: the draft depths trained on the drafter's own outputs "
                              "(default 5)")
    drafter.add_argument("--epochs", type=int, default=3)
    drafter.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine decay; default 1e-3)")
    drafter.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per batch (default 4096)")
    drafter.add_argument("--prompt-context", type=int, default=64,
                         help="prompt positions a training sequence keeps before its generated text (default 64)")
    drafter.add_argument("--train-dtype", choices=tuple(DTYPES), default="bf16",
                         help="the drafter's forward and backward: bf16 autocast (fp32 weights and optimizer; "
                              "default) or fp32")
    drafter.add_argument("--feature-dtype", choices=tuple(DTYPES), default="fp32",
                         help="the features the drafter reads and the argmax it learns come from a copy of the "
                              "model in this dtype, in collection and training (bf16: about 3.5x faster on a CPU "
                              "with bf16 matmuls; default fp32, the model's own)")
    distillation_arguments(drafter)
    drafter.set_defaults(func=cmd_train_drafter)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    e2e = bench_sub.add_parser("e2e", help="end-to-end decoding speed on Spec-Bench questions")
    e2e.add_argument("--questions", default=str(SPEC_BENCH_DEV),
                     help="Spec-Bench question.jsonl (default: the dev half shipped with treedec)")
    e2e.add_argument("--limit-per-category", type=int, default=None)
    e2e.add_argument("--methods", nargs="+", choices=ALL_METHODS,
                     default=[m for m in ALL_METHODS if m not in OPT_IN_METHODS])
    e2e.add_argument("--json", help="write per-prompt results and the summary here")
    e2e.add_argument("--plot", help="write a bar chart of speedup per category here (PNG)")
    e2e.add_argument("--profile", action="store_true",
                     help="record where each treedec step's time goes (drafting, tree build, attention, the rest of "
                          "the forward, LM head, sampling, verify, compaction, learning, host) and print it per method")
    e2e.add_argument("--profile-plot", help="with --profile: write a stacked bar of ms per step per phase here (PNG)")
    e2e.add_argument("--medusa-heads", help="heads directory for the medusa method (treedec train-heads)")
    e2e.add_argument("--hydra-heads", help="heads directory for the hydra method")
    e2e.add_argument("--heads-options", help='JSON of treedec.patch options for medusa and hydra, e.g. '
                     '\'{"context": false}\'')
    e2e.add_argument("--eagle-drafter", help="drafter directory for the eagle method (EAGLE-3 or EAGLE-1/2; default: "
                                             "the shipped one, embedded model only)")
    e2e.add_argument("--eagle-options", help='JSON of treedec.patch options for eagle, e.g. \'{"tree_width": 6}\'')
    e2e.add_argument("--layerskip-options", help='JSON of treedec.patch options for layerskip, e.g. '
                     '\'{"mode": "fixed", "skip_layers": [17]}\'')
    common(e2e, 128)
    e2e.set_defaults(func=cmd_bench_e2e)
    skip = bench_sub.add_parser("skipdecode", help="SkipDecode (lossy early exit): agreement with greedy, and speed")
    skip.add_argument("--questions", default=str(SPEC_BENCH_DEV),
                      help="Spec-Bench question.jsonl (default: the dev half shipped with treedec)")
    skip.add_argument("--limit-per-category", type=int, default=1)
    skip.add_argument("--exits", nargs="+", default=["30:24", "30:18"],
                      help="FIRST:LAST exit layers, one schedule each (linear, never increasing)")
    skip.add_argument("--max-new-tokens", type=int, default=64)
    skip.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    skip.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    skip.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    skip.set_defaults(func=cmd_bench_skipdecode)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse's own errors (status 2) and --help (0)
        return stop.code if isinstance(stop.code, int) else 0
    args.argv = argv  # what the user typed, recorded where results are saved (train-heads)
    try:
        return args.func(args)
    except UsageError as error:
        print(f"treedec: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
