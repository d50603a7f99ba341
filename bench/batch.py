"""Batched greedy decoding on the embedded model: HF `generate` against treedec, per batch size.

    python bench/batch.py [--batch-sizes 1 8 32]
        [--max-new-tokens 64] [--methods auto none] [--threads 2] [--device cuda] [--json OUT]
        [--profile] [--profile-plot PNG]

For each batch size B, two calls of B Spec-Bench first turns each (the 2B shortest, chat
template, left padded), by the unpatched model and by each treedec drafter, patched with nothing
learned yet (treedec keeps what it learns about a model across calls and patches). The first call
starts with nothing measured (its trees grow as its steps measure the cost curve); the later
call, on the next B prompts, reuses what it learned, as every later call on a model does. Reported per
call: new tokens per second (tokens up to each row's EOS, the same count for both), the ratio to
HF on the same prompts in the same run, tau, and whether the output equals HF's token for token.
Batches of different sizes hold different prompts: compare methods within a batch size.
`--profile` also records where each treedec step's time goes (the later call's, per method and
batch size) and prints it as a table; `--profile-plot` draws it as stacked bars.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path, and bench/kernels.py would then
# stand in for the `kernels` package that transformers imports when it is installed: drop it.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

import treedec  # noqa: E402
from treedec import patching  # noqa: E402
from treedec.tools.benchmark import encode_prompt, plot_profile, profile_table  # noqa: E402
from treedec.tools.models import load_default_model  # noqa: E402
from treedec.tools.prompts import SPEC_BENCH_DEV, eos_ids, left_pad, load_questions, until_eos  # noqa: E402


def new_tokens(out: torch.Tensor, width: int, eos: frozenset[int]) -> int:
    """Tokens each row generated up to and including its first EOS (HF pads after it)."""
    return sum(len(until_eos(row, eos)) for row in out[:, width:].tolist())


def timed_generate(model, ids, mask, max_new_tokens: int, pad: int) -> tuple[torch.Tensor, float]:
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out.cpu(), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", default=str(SPEC_BENCH_DEV),
                        help="Spec-Bench question.jsonl (default: the dev half shipped with treedec)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=["auto", "none"], help="treedec drafters ('none': no drafts)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="where the model runs (e.g. cuda)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--profile", action="store_true", help="record and print each step's time per phase")
    parser.add_argument("--profile-plot", help="with --profile: a stacked bar per method and batch size (PNG)")
    args = parser.parse_args()
    if args.profile_plot and not args.profile:
        parser.error("--profile-plot needs --profile")
    if args.threads:
        torch.set_num_threads(args.threads)
    if min(args.batch_sizes) < 1 or args.max_new_tokens < 1:
        parser.error("batch sizes and --max-new-tokens must be at least 1")

    model, tokenizer = load_default_model()
    model.to(args.device)
    eos = eos_ids(model.generation_config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    encoded = sorted((encode_prompt(tokenizer, p)["input_ids"][0].tolist() for p in load_questions(args.questions)),
                     key=len)
    if 2 * max(args.batch_sizes) > len(encoded):
        parser.error(f"{args.questions} has {len(encoded)} questions; the largest batch needs {2 * max(args.batch_sizes)}")

    rows, profiles = [], {}
    print(f"{'B':>3}  {'method':<10} {'call':<6} {'tok/s':>7} {'x HF':>6} {'tau':>5}  identical")
    for batch in args.batch_sizes:
        # the first call decodes one set of prompts, the later call the next set (similar lengths):
        # what it reuses is what the loop learned, not the text it has already seen
        calls = {"first": left_pad(encoded[:batch], pad), "later": left_pad(encoded[batch : 2 * batch], pad)}
        expected, counts, hf_rates = {}, {}, {}
        for call, (ids, mask) in calls.items():
            expected[call], seconds = timed_generate(model, ids, mask, args.max_new_tokens, pad)
            counts[call] = new_tokens(expected[call], ids.shape[1], eos)
            hf_rates[call] = counts[call] / seconds
            rows.append(dict(batch=batch, method="hf", call=call, tokens=counts[call], seconds=seconds,
                             tokens_per_s=hf_rates[call], speedup=1.0, tau=1.0, identical=True))
            print(f"{batch:>3}  {'hf':<10} {call:<6} {hf_rates[call]:>7.1f} {1.0:>6.2f} {1.0:>5.2f}  -")
        for method in args.methods:
            patching.set_learned_state(model, None)  # nothing learned by an earlier batch or method
            treedec.patch(model, drafter=None if method == "none" else method, profile=args.profile)
            try:
                for call, (ids, mask) in calls.items():
                    out, seconds = timed_generate(model, ids, mask, args.max_new_tokens, pad)
                    stats = model.treedec.last_stats
                    rate = counts[call] / seconds
                    identical = bool(torch.equal(out, expected[call]))
                    rows.append(dict(batch=batch, method=method, call=call, tokens=counts[call], seconds=seconds,
                                     tokens_per_s=rate, speedup=rate / hf_rates[call], tau=stats["tau"],
                                     identical=identical, profile=stats.get("profile")))
                    if args.profile and call == "later":
                        profiles[f"{method} B={batch}"] = stats["profile"]
                    print(f"{batch:>3}  {method:<10} {call:<6} {rate:>7.1f} {rate / hf_rates[call]:>6.2f} "
                          f"{stats['tau']:>5.2f}  {'yes' if identical else 'NO'}")
            finally:
                treedec.unpatch(model)
    if profiles:
        print("\nWhere each step's time goes (ms per step, the later call):")
        print(profile_table(profiles))
    if args.profile_plot:
        plot_profile(profiles, args.profile_plot, f"bench/batch.py, max_new_tokens={args.max_new_tokens}")
        print(f"wrote {args.profile_plot}")
    if args.json:
        meta = dict(max_new_tokens=args.max_new_tokens, threads=torch.get_num_threads(), torch=torch.__version__,
                    device=torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
                    questions=args.questions, command=" ".join(["python", *sys.argv]))
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
