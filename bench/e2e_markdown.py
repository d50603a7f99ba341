"""Print a Markdown table from `treedec bench e2e --json` output (the README's results table).

    python bench/e2e_markdown.py bench/results/e2e_cpu_fp32.json
    python bench/e2e_markdown.py run1.json run2.json run3.json     # repeats of one command

With several runs of the same command, each cell is the mean speedup over the runs with its range
(min-max) and the mean tau; `lossless` holds only if every run's outputs were identical. Runs
made with `--profile` also get a table of the mean milliseconds per step in each phase.
"""

import json
import sys

from treedec import profiling


def speedup_cell(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ({min(values):.2f}-{max(values):.2f})"


def main(paths: list[str]) -> None:
    runs = [json.load(open(path)) for path in paths]
    first = runs[0]
    if any(run["methods"] != first["methods"] or list(run["summary"]) != list(first["summary"]) for run in runs):
        raise SystemExit("the runs differ in methods or categories: pass repeats of one command")
    methods = [m for m in first["methods"] if m != "hf"]
    spread = " (range)" if len(runs) > 1 else ""
    head = "| category | prompts | HF tok/s | " + " | ".join(
        f"{m} x{spread}" + ("" if m == "hf_pld" else " / tau / step ms") for m in methods) + " | lossless |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for category in first["summary"]:
        rows = [run["summary"][category] for run in runs]
        cells = []
        for m in methods:
            cell = speedup_cell([r[m]["speedup"] for r in rows])
            if m != "hf_pld":
                tau = sum(r[m]["tau"] for r in rows) / len(rows)
                step_ms = sum(r[m]["step_ms"] for r in rows) / len(rows)
                cell += f" / {tau:.2f} / {step_ms:.0f}"
            cells.append(cell)
        same = all(r[m]["identical"] == r[m]["prompts"] for r in rows for m in methods if m != "hf_pld")
        name = f"**{category}**" if category == "overall" else category
        hf_rate = sum(r["hf"]["tokens_per_s"] for r in rows) / len(rows)
        print(f"| {name} | {rows[0]['hf']['prompts']} | {hf_rate:.1f} | " + " | ".join(cells)
              + f" | {'yes' if same else 'NO'} |")
    meta = first["meta"]
    print(f"\n{meta.get('dtype')}, {meta.get('threads')} threads, max_new_tokens={meta.get('max_new_tokens')}, "
          f"torch {meta.get('torch')}, {len(runs)} run(s)")
    profiled = [m for m in methods if all(m in run.get("profile", {}) for run in runs)]
    if profiled:
        phases = list(first["profile"][profiled[0]]["seconds"])
        print("\nms per step in each phase (mean over the runs):\n")
        print("| method | " + " | ".join(phases) + " | step |")
        print("|" + "---|" * (len(phases) + 2))
        for m in profiled:
            per_run = [run["profile"][m] for run in runs]
            cells = [sum(profiling.per_step_ms(p)[phase] for p in per_run) / len(per_run) for phase in phases]
            step = sum(profiling.step_ms(p) for p in per_run) / len(per_run)
            print(f"| {m} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {step:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
