"""Print a Markdown table from `treedec bench e2e --json` output (the README's results table).

    python bench/e2e_markdown.py bench/results/e2e_cpu_fp32.json
"""

import json
import sys


def main(path: str) -> None:
    data = json.load(open(path))
    methods = [m for m in data["methods"] if m != "hf"]
    head = "| category | prompts | HF tok/s | " + " | ".join(
        f"{m} x" + ("" if m == "hf_pld" else " / tau / step ms") for m in methods) + " | lossless |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for category, rows in data["summary"].items():
        hf = rows["hf"]
        cells = []
        for m in methods:
            r = rows[m]
            cells.append(f"{r['speedup']:.2f}" if m == "hf_pld" else
                         f"{r['speedup']:.2f} / {r['tau']:.2f} / {r['step_ms']:.0f}")
        same = all(rows[m]["identical"] == rows[m]["prompts"] for m in methods if m != "hf_pld")
        name = f"**{category}**" if category == "overall" else category
        print(f"| {name} | {hf['prompts']} | {hf['tokens_per_s']:.1f} | " + " | ".join(cells)
              + f" | {'yes' if same else 'NO'} |")
    meta = data["meta"]
    print(f"\n{meta.get('dtype')}, {meta.get('threads')} threads, max_new_tokens={meta.get('max_new_tokens')}, "
          f"torch {meta.get('torch')}")


if __name__ == "__main__":
    main(sys.argv[1])
