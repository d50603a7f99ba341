"""SkipDecode (opt-in, LOSSY): greedy decoding where later tokens run fewer layers.

Not speculative decoding: nothing verifies these tokens, so the output is NOT the model's own
greedy output. The trade is speed against agreement with it; `compare` measures both.

Every sequence of the batch emits its t-th token through layers [0, exit_layers[t]) then the
final norm and the LM head: one exit point per position, shared by the batch, so the batch stays
dense. The schedule never increases along the sequence. A token that exits at layer e writes KV
for layers below e only, and every later token exits at or below e, so it never reads a layer
that an earlier token skipped: no KV is ever recomputed. The prompt runs the full model.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from .. import attention
from ..attention import TreeStep
from ..adapters import adapter_for
from ..decoding import chain_tree_mask, left_padding, prompt_positions


def exit_schedule(max_new_tokens: int, num_layers: int, first_exit: int | None = None,
                  last_exit: int | None = None) -> list[int]:
    """Exit layer of each generated token: linear from `first_exit` (default all layers) down to
    `last_exit` (default half of them), never increasing."""
    first = num_layers if first_exit is None else first_exit
    last = max(1, num_layers // 2) if last_exit is None else last_exit
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens = {max_new_tokens!r} must be an int >= 1")
    if not (isinstance(first, int) and isinstance(last, int) and 1 <= last <= first <= num_layers):
        raise ValueError(f"exit layers must satisfy 1 <= last_exit ({last}) <= first_exit ({first}) <= {num_layers}")
    if max_new_tokens == 1:
        return [first]
    step = (first - last) / (max_new_tokens - 1)
    return [int(round(first - step * t)) for t in range(max_new_tokens)]


@dataclass
class SkipDecodeOutput:
    sequences: torch.Tensor  # int64 [B, L + new], prompt then tokens (pad after EOS)
    exit_layers: list[int]  # the schedule used, one per generated position
    seconds: float


@contextlib.contextmanager
def _tree_attention(model):
    """The model's attention as treedec's backend for the block (a patched model has it already)."""
    original = model.config._attn_implementation
    if original == attention.ATTN_NAME:
        yield
        return
    attention.register()
    model.set_attn_implementation(attention.ATTN_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(original)


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
             first_exit: int | None = None, last_exit: int | None = None, eos_token_id: int | None = None,
             pad_token_id: int = 0) -> SkipDecodeOutput:
    """SkipDecode greedy generation (lossy; see the module docstring). input_ids int64 [B, L],
    left padded with attention_mask [B, L]."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.int64:
        raise ValueError("input_ids must be an int64 tensor [B, L]")
    with _tree_attention(model):
        return _generate(model, input_ids, attention_mask, max_new_tokens, first_exit, last_exit, eos_token_id,
                         pad_token_id)


def _generate(model, input_ids, attention_mask, max_new_tokens, first_exit, last_exit, eos_token_id,
              pad_token_id) -> SkipDecodeOutput:
    started = time.perf_counter()
    adapter = adapter_for(model)
    schedule = exit_schedule(max_new_tokens, adapter.num_layers, first_exit, last_exit)
    batch, length = input_ids.shape
    ids = input_ids.cpu()
    padding = left_padding(ids, attention_mask)
    cache = adapter.new_cache(padding, max_len=length + max_new_tokens)
    subsets: dict[int, torch.nn.ModuleList] = {}

    def forward(tokens: torch.Tensor, positions: torch.Tensor, exit_layer: int) -> torch.Tensor:
        steps = tokens.shape[1]
        step = TreeStep(cache.prefix_len.clone(), cache.kv_start.clone(), chain_tree_mask(batch, steps))
        cache.begin_step(steps)
        if exit_layer < adapter.num_layers and exit_layer not in subsets:
            subsets[exit_layer] = adapter.layer_subset(tuple(range(exit_layer)))
        hidden = adapter.forward(tokens, positions, cache, step, layers=subsets.get(exit_layer))
        cache.advance(steps)
        return adapter.topk(hidden[:, -1:], 1)[:, 0, 0]

    positions = prompt_positions(length, padding)
    token = forward(ids, positions, schedule[0])  # the prompt: no later token reads deeper layers
    done = torch.zeros(batch, dtype=torch.bool)
    generated = []
    next_position = (length - padding).view(-1, 1)
    for index, exit_layer in enumerate(schedule):
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        generated.append(token)
        if eos_token_id is not None:
            done |= token == eos_token_id
        if bool(done.all()) or index == len(schedule) - 1:
            break
        token = forward(token.view(-1, 1), next_position, exit_layer=schedule[index + 1])
        next_position = next_position + 1
    sequences = torch.cat([ids, torch.stack(generated, 1)], 1)
    return SkipDecodeOutput(sequences.to(input_ids.device), schedule[: len(generated)], time.perf_counter() - started)


@dataclass
class Comparison:
    """SkipDecode against the model's own greedy output, over a prompt set."""

    first_exit: int
    last_exit: int
    tokens: int  # generated positions compared
    agreeing: int  # positions where SkipDecode's token equals full greedy's
    prefix_tokens: int  # tokens before each prompt's first difference, summed
    seconds: float
    hf_seconds: float  # HF greedy on the same prompts, in the same run

    def row(self) -> str:
        return (f"exit {self.first_exit}->{self.last_exit}: agreement {self.agreeing / max(self.tokens, 1):.1%} "
                f"of positions, {self.prefix_tokens / max(self.tokens, 1):.1%} before the first difference, "
                f"{self.tokens / self.seconds:.1f} tok/s = {self.hf_seconds / self.seconds:.2f}x HF greedy")


def compare(model, tokenizer, prompts, schedules: list[tuple[int, int]], max_new_tokens: int = 64,
            progress: bool = True) -> list[Comparison]:
    """For each (first_exit, last_exit): SkipDecode on every prompt next to HF greedy (timed in the
    same loop), with how often the two agree."""
    from tqdm.auto import tqdm

    from .benchmark import encode_prompt

    results = [Comparison(first, last, 0, 0, 0, 0.0, 0.0) for first, last in schedules]
    for prompt in tqdm(prompts, desc="prompts", disable=not progress):
        inputs = encode_prompt(tokenizer, prompt)
        length = inputs["input_ids"].shape[1]
        began = time.perf_counter()
        full = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0, length:]
        hf_seconds = time.perf_counter() - began
        for result in results:
            out = generate(model, inputs["input_ids"], inputs.get("attention_mask"), len(full),
                           result.first_exit, result.last_exit)
            mine = out.sequences[0, length:]
            equal = (mine == full).tolist()
            result.tokens += len(equal)
            result.agreeing += sum(equal)
            result.prefix_tokens += equal.index(False) if False in equal else len(equal)
            result.seconds += out.seconds
            result.hf_seconds += hf_seconds * len(equal) / len(full)
    return results
