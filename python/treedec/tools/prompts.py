"""Prompts for the demo and the end-to-end benchmark: built-in ones and Spec-Bench JSONL files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

# The dev half of Spec-Bench's questions, shipped with the package (data/spec_bench/README.md).
SPEC_BENCH_DEV = Path(__file__).parent / "data" / "spec_bench" / "dev.jsonl"

# MT-bench's categories first, then Spec-Bench's task categories (the order tables are printed in).
CATEGORY_ORDER = (
    "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities",
    "translation", "summarization", "qa", "math_reasoning", "rag",
)


def eos_ids(generation_config) -> frozenset[int]:
    """The ids that end a generation (`eos_token_id`: None, one id, a list of them, or a tensor)."""
    eos = generation_config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset(int(e) for e in torch.as_tensor(eos).view(-1).tolist())


def until_eos(tokens: list[int], eos: frozenset[int]) -> list[int]:
    """`tokens` up to and including the first one in `eos` (all of them without one)."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


def left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token prompts as one batch, HF style: input_ids and attention_mask int64 [B, L], each prompt
    right-aligned after `pad` tokens (so every continuation starts at column L)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


@dataclass(frozen=True)
class Prompt:
    category: str
    text: str
    question_id: str = ""


BUILTIN_PROMPTS = (
    Prompt("writing", "Write a short, upbeat paragraph inviting neighbours to a community garden day."),
    Prompt("coding", "Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring."),
    Prompt("math", "A train travels 180 km in 2 hours and then 120 km in 1.5 hours. What is its average speed? "
                   "Explain step by step."),
    Prompt("extraction", "Extract every person and city from this text as a JSON list of objects with keys "
                         "'name' and 'city': Maria flew from Lisbon to Oslo to meet Tom, who lives in Oslo. "
                         "Later, Tom and Maria visited Anna in Berlin."),
    Prompt("summarization", "Summarize in two sentences: The city council met on Tuesday to discuss the new bike "
                            "lanes. Supporters said the lanes would make cycling safer and reduce traffic. "
                            "Opponents worried about losing parking spaces for local shops. After a long debate, "
                            "the council approved a six-month trial on two main streets."),
    Prompt("qa", "What is the boiling point of water at sea level in Celsius and in Fahrenheit?"),
)


def load_questions(path: str | Path, limit_per_category: int | None = None) -> list[Prompt]:
    """Spec-Bench question.jsonl: one object per line with `category` and `turns` (first turn used)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"questions file {path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text of JSON lines ({error.reason} at byte {error.start})") from None
    prompts: list[Prompt] = []
    taken: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            category, turn = record["category"], record["turns"][0]
            if not isinstance(category, str) or not isinstance(turn, str):
                raise TypeError("category and turns[0] must be strings")
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as error:
            raise ValueError(f"{path}:{number} is not a Spec-Bench question ({error})") from None
        if limit_per_category is not None and taken.get(category, 0) >= limit_per_category:
            continue
        taken[category] = taken.get(category, 0) + 1
        prompts.append(Prompt(category, turn, str(record.get("question_id", number))))
    order = {c: i for i, c in enumerate(CATEGORY_ORDER)}
    return sorted(prompts, key=lambda p: order.get(p.category, len(order)))
