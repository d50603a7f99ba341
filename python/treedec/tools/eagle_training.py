"""`treedec train-drafter --kind eagle3`: an EAGLE-3 drafter by self-distillation, with EAGLE-3's
training-time test.

1. The model writes the text (heads_training.collect: greedy continuations of the prompts, then
   sampled ones), kept in the output directory so a rerun resumes from it.
2. One plain forward per batch of sequences gives the residual streams after the drafter's three
   layers at every position (the features it reads when decoding; kept in memory in bf16 for the
   later epochs, recomputed by every run, never written) and collection recorded the model's argmax
   there (the tokens greedy decoding accepts). Training reads each sequence's generated text and
   the `prompt_context` prompt positions before it (`window`). A `reader` (a bf16 copy of the
   model) may run these forwards and give the argmax instead of the model itself.
3. Training-time test, `ttt_steps` steps per position: step 0 pairs the features at position i
   with token i + 1 and learns the model's argmax after token i + 1; step k reads the drafter's own
   output of step k - 1 at i as its hidden state (what it drafts from when decoding), with token
   i + 1 + k, at position i + k, attending to step 0's entries up to i and to its own chain's
   entries of steps 1..k at i (the rows a depth-k tree node sees), and learns the argmax after
   token i + 1 + k. Step k's loss weighs 0.8^k. Cross-entropy over the draft vocabulary: the
   `draft_vocab` tokens most often the model's argmax in the training text (positions whose
   argmax lies outside it count for nothing). Only positions in the generated part train.
4. The target's embedding is shared (not saved: the target's is used when decoding); the drafter
   starts as the logit lens of its highest feature layer (`initialise`). AdamW, cosine decay, a checkpoint after each epoch (resumable), every 10th
   prompt held out for the reported per-step accuracy. With `train_dtype=torch.bfloat16` the
   drafter's forward and backward run under bf16 autocast (fp32 weights, optimizer and loss):
   2.5x faster a step on a 2-core Xeon with AMX, and the usual mixed precision on a GPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..eagle import EagleConfig, EagleDraft, default_aux_layers, save, vocabulary_maps
from ..heads.shipped import FINGERPRINT_KEY, fingerprint
from .heads_training import DATA_NAME, Example, collect, split_held_out

CHECKPOINT_NAME = "eagle_checkpoint.pt"
STEP_DECAY = 0.8  # step k's loss weight (EAGLE-3's)
DEFAULT_DRAFT_VOCAB = 8192


@dataclass
class Batch:
    """Right-padded sequences: features [B, L, F], tokens and argmax int64 [B, L], and `trains`
    bool [B, L]: whether position t's argmax (the token after t) is generated text."""

    features: torch.Tensor
    tokens: torch.Tensor
    argmax: torch.Tensor
    trains: torch.Tensor


def draft_config(model, draft_vocab: int, aux_layers: tuple[int, ...]) -> EagleConfig:
    """An EAGLE-3 layer shaped like one of the target's layers."""
    config = model.config
    rope = {key: getattr(config, key) for key in ("max_position_embeddings",) if getattr(config, key, None)}
    parameters = getattr(config, "rope_parameters", None) or {}
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        rope["rope_theta"] = float(theta)
    if parameters.get("rope_type", "default") != "default":
        rope["rope_scaling"] = {k: v for k, v in parameters.items() if k != "rope_theta"}
    return EagleConfig(kind="eagle3", hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                       num_attention_heads=config.num_attention_heads,
                       num_key_value_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                       head_dim=getattr(config, "head_dim", None), vocab_size=config.vocab_size,
                       draft_vocab_size=draft_vocab, target_hidden_size=config.hidden_size,
                       rms_norm_eps=getattr(config, "rms_norm_eps", 1e-5), aux_layers=aux_layers, rope=rope)


# prompt positions a training sequence keeps before its generated text: Spec-Bench's sampled
# continuations average about 150 tokens, so 64 keeps a training epoch mostly generated text
PROMPT_CONTEXT = 64


def window(example: Example, prompt_context: int) -> slice:
    """The positions of `example` that training reads: its generated text and at most
    `prompt_context` prompt positions before it. Long prompts (summaries, RAG) would otherwise fill
    the batches with positions that train nothing; the drafter's own attention then sees that much
    prompt (the features still come from the whole sequence)."""
    return slice(max(0, example.generated_from - 1 - prompt_context), len(example.tokens))


@torch.no_grad()  # not inference mode: the draft's autograd reads these tensors
def batch_of(model, examples: list[Example], layers: tuple[int, ...], cache: dict | None = None,
             prompt_context: int = PROMPT_CONTEXT) -> Batch:
    """`examples`' training windows (`window`), right-padded: the residual streams after `layers`
    at every position (one forward of the base model over the whole sequences `cache` lacks, kept
    there in bf16: epochs after the first read them instead of running the model again) and the
    argmax collection recorded."""
    device = next(model.parameters()).device
    windows = [window(e, prompt_context) for e in examples]
    width = max(w.stop - w.start for w in windows)
    tokens = torch.zeros(len(examples), width, dtype=torch.int64)
    argmax = torch.zeros_like(tokens)
    trains = torch.zeros(len(examples), width, dtype=torch.bool)
    for row, (example, kept) in enumerate(zip(examples, windows)):
        length = kept.stop - kept.start
        tokens[row, :length] = example.tokens[kept]
        greedy = example.greedy if example.greedy is not None else torch.cat((example.tokens[1:], example.tokens[-1:]))
        argmax[row, :length] = greedy[kept]
        trains[row, example.generated_from - 1 - kept.start : length - 1] = True
    cache = {} if cache is None else cache
    missing = [(e, w) for e, w in zip(examples, windows) if id(e) not in cache]
    if missing:  # padding at the end changes no earlier position
        longest = max(len(e.tokens) for e, _ in missing)
        ids = torch.zeros(len(missing), longest, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for row, (example, _) in enumerate(missing):
            ids[row, : len(example.tokens)] = example.tokens
            mask[row, : len(example.tokens)] = 1
        base = getattr(model, model.base_model_prefix)
        out = base(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                   use_cache=False)
        states = torch.cat([out.hidden_states[i + 1] for i in layers], dim=-1)  # [i + 1]: layer i's output
        for row, (example, kept) in enumerate(missing):
            cache[id(example)] = states[row, kept].to(torch.bfloat16)
    features = torch.zeros(len(examples), width, cache[id(examples[0])].shape[-1], device=device)
    for row, example in enumerate(examples):
        features[row, : len(cache[id(example)])] = cache[id(example)].float()
    return Batch(features, tokens.to(device), argmax.to(device), trains.to(device))


def packed(examples: list[Example], batch_tokens: int, generator: torch.Generator | None,
           prompt_context: int = PROMPT_CONTEXT) -> list[list[Example]]:
    """Examples in batches of about `batch_tokens` padded tokens of their training windows, similar
    lengths together; shuffled batch order when a generator is given."""
    sizes = [kept.stop - kept.start for kept in (window(e, prompt_context) for e in examples)]
    order = sorted(range(len(examples)), key=lambda i: sizes[i])
    batches, current, longest = [], [], 0
    for i in order:
        longest_if = max(longest, sizes[i])
        if current and longest_if * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, longest_if = [], sizes[i]
        current.append(examples[i])
        longest = longest_if
    if current:
        batches.append(current)
    if generator is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def initialise(draft: EagleDraft, model, vocab_ids: torch.Tensor) -> None:
    """Start the drafter as the logit lens of the highest feature layer: `fc` passes that layer's
    state through, attention's and the MLP's outputs start at zero (the layer is the identity), and
    the norm and the LM head are the model's own (its rows for the draft vocabulary). Step 0 then
    guesses what layer L - 4 would say, well above chance, and training starts from there."""
    hidden = draft.config.hidden_size
    with torch.no_grad():
        draft.fc.weight.zero_()
        draft.fc.weight[:, -hidden:] = torch.eye(hidden)
        draft.layer.self_attn.o_proj.weight.zero_()
        draft.layer.mlp.down_proj.weight.zero_()
        norm = getattr(getattr(model, model.base_model_prefix), "norm", None)
        if norm is not None and getattr(norm, "weight", None) is not None:
            draft.norm.weight.copy_(norm.weight.float())
        draft.lm_head.weight.copy_(model.get_output_embeddings().weight[vocab_ids.to(draft.fc.weight.device)].float())


def unrolled(draft: EagleDraft, embeddings: list[torch.Tensor], features: torch.Tensor) -> list[torch.Tensor]:
    """The training-time test's forward: step k's output [B, L, H] at every position i, from the
    features [B, L, F] and embeddings[k] [B, L, H] (the embedding of token i + 1 + k at i). Step k
    at i sits at position i + k and attends to step 0's entries up to i and to steps 1..k at i:
    exactly the rows a depth-k tree node sees when the drafter decodes (drafters/eagle.py)."""
    attention = draft.layer.self_attn
    batch_size, length, _ = features.shape
    device = features.device
    groups = attention.heads // attention.kv_heads
    scale = attention.head_dim ** -0.5
    index = torch.arange(length, device=device)
    causal = index.view(1, -1) <= index.view(-1, 1)  # [query, key]
    hidden = draft.project_features(features)
    keys, values, outputs = [], [], []  # keys, values per step [B, Hq, L, D]
    for step, embedded in enumerate(embeddings):
        x, residual = draft.inputs(embedded, hidden)
        cos, sin = draft.rotary_embeddings(x, (index + step).expand(batch_size, -1))
        q, k, v = attention.project(x, cos, sin)
        keys.append(k.repeat_interleave(groups, dim=1))
        values.append(v.repeat_interleave(groups, dim=1))
        scores = [(q @ keys[0].transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))]
        scores += [(q * keys[s]).sum(-1, keepdim=True) * scale for s in range(1, step + 1)]
        weights = torch.softmax(torch.cat(scores, dim=-1).float(), dim=-1).to(q.dtype)
        attended = weights[..., :length] @ values[0]
        for s in range(1, step + 1):
            attended = attended + weights[..., length + s - 1 : length + s] * values[s]
        hidden = draft.layer.finish(residual, attended)
        outputs.append(hidden)
    return outputs


def training_time_test(draft: EagleDraft, embed, batch: Batch, steps: int, draft_of: torch.Tensor):
    """Each step's loss (mean cross-entropy) and top-1 hits and counts over the batch, as the
    module docstring's step 3 describes."""
    length = batch.tokens.shape[1]
    embeddings, targets = [], []
    for step in range(steps):
        ahead = step + 1  # step k's input token at i is i + 1 + k; the argmax there is its target
        tokens = torch.zeros_like(batch.tokens)
        tokens[:, : length - ahead] = batch.tokens[:, ahead:]
        with torch.no_grad():
            embeddings.append(embed(tokens).float())
        # position i trains where position i + 1 + k's argmax is generated text (and in the draft vocabulary)
        target = torch.full_like(batch.tokens, -100)
        wanted = draft_of[batch.argmax[:, ahead:]]
        target[:, : length - ahead] = torch.where(batch.trains[:, ahead:] & (wanted >= 0), wanted, -100)
        targets.append(target)
    losses, hits, counts = [], [], []
    for hidden, target in zip(unrolled(draft, embeddings, batch.features), targets):
        logits = draft.draft_logits(hidden)
        kept = target >= 0
        losses.append(F.cross_entropy(logits[kept].float(), target[kept]) if kept.any() else logits.sum() * 0)
        hits.append(int((logits[kept].argmax(-1) == target[kept]).sum()))
        counts.append(int(kept.sum()))
    return losses, hits, counts


def draft_vocabulary(model, examples: list[Example], size: int) -> torch.Tensor:
    """The `size` token ids most often the model's argmax in the examples' generated text (then
    the lowest ids, to fill), ascending."""
    counts = torch.zeros(model.config.vocab_size, dtype=torch.float64)
    for example in examples:
        greedy = example.greedy if example.greedy is not None else example.tokens[1:]
        counts.index_add_(0, greedy[example.generated_from - 1 :], torch.ones(len(greedy) - example.generated_from + 1,
                                                                              dtype=torch.float64))
    counts += torch.linspace(1e-6, 0, counts.numel(), dtype=torch.float64)  # ties: lower ids first
    return counts.topk(size).indices.sort().values


def precision(device: torch.device, dtype: torch.dtype):
    """The context the drafter's training forward runs in: bf16 autocast, or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    if dtype != torch.bfloat16:
        raise ValueError(f"train_dtype must be torch.float32 or torch.bfloat16 (got {dtype})")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def evaluate(draft, embed, model, examples, layers, steps, draft_of, batch_tokens, cache=None,
             train_dtype: torch.dtype = torch.float32, prompt_context: int = PROMPT_CONTEXT) -> list[float]:
    """Per-step top-1 accuracy (teacher-forced) on `examples`."""
    hits, counts = [0] * steps, [0] * steps
    with torch.no_grad(), precision(next(draft.parameters()).device, train_dtype):
        for group in packed(examples, batch_tokens, None, prompt_context):
            batch = batch_of(model, group, layers, cache, prompt_context)
            _, h, c = training_time_test(draft, embed, batch, steps, draft_of)
            hits = [a + b for a, b in zip(hits, h)]
            counts = [a + b for a, b in zip(counts, c)]
    return [h / c if c else 0.0 for h, c in zip(hits, counts)]


def train_eagle(model, prompt_ids: list[list[int]], out: str | Path, tokens: int = 50000, epochs: int = 3,
                lr: float = 1e-3, batch_tokens: int = 4096, ttt_steps: int = 5,
                draft_vocab: int = DEFAULT_DRAFT_VOCAB, max_new_tokens: int = 128, samples: int = 0,
                temperature: float = 0.8, collect_batch: int = 32, collect_seconds: float | None = None,
                base_model: str = "", command: str = "", progress: bool = True,
                save_dtype: torch.dtype = torch.float32, seed: int = 0, collect_batch_tokens: int | None = None,
                writer=None, train_dtype: torch.dtype = torch.float32,
                prompt_context: int = PROMPT_CONTEXT, reader=None) -> tuple[EagleDraft, list[dict]]:
    """The whole recipe (module docstring); returns the drafter and one report per epoch. `writer`
    and `collect_batch_tokens`: see heads_training.collect; `prompt_context`: see `window`.
    `reader`: a copy of the model in another dtype (bf16) that computes the features and the argmax
    targets, in collection and in training (None: the model does). On a CPU with bf16 matmuls its
    forward is about 3.5x faster than fp32's; its rounding perturbs the features less than the noise
    EAGLE-1 adds to them on purpose, and the drafter still decodes from the model's own."""
    for name, value, least in (("tokens", tokens, 1), ("epochs", epochs, 0), ("batch_tokens", batch_tokens, 16),
                               ("ttt_steps", ttt_steps, 1), ("draft_vocab", draft_vocab, 8),
                               ("prompt_context", prompt_context, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} = {value!r} must be an int >= {least}")
    precision(torch.device("cpu"), train_dtype)  # a bad dtype fails before the collection
    features_from = reader or model  # what computes the features and the argmax targets
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    data_path = out / DATA_NAME
    if data_path.exists():
        examples = [Example(**e) for e in torch.load(data_path, weights_only=False)]
        if progress:
            print(f"reusing {len(examples)} collected sequences from {data_path}")
    else:
        examples = collect(features_from, prompt_ids, tokens, max_new_tokens, samples, temperature, collect_batch,
                           progress=progress, max_seconds=collect_seconds, batch_tokens=collect_batch_tokens,
                           writer=model if writer is None else writer)
        torch.save([e.__dict__ for e in examples], data_path)
    for example in examples:
        example.hidden = None  # the features are recomputed per batch; the last states are not needed
    collected_seconds = time.perf_counter() - began
    training, held_out = split_held_out(examples)
    if not training:
        raise ValueError("no text was collected to train on (more prompts or a larger max_new_tokens)")
    layers = default_aux_layers(model.config.num_hidden_layers)
    size = min(draft_vocab, model.config.vocab_size)
    config = draft_config(model, size, layers)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    draft = EagleDraft(config).to(device)
    vocab_ids = draft_vocabulary(model, training, size)
    d2t, t2d = vocabulary_maps(vocab_ids, model.config.vocab_size)
    with torch.no_grad():
        draft.d2t.copy_(d2t)
        draft.t2d.copy_(t2d)
    initialise(draft, model, vocab_ids)
    embed = model.get_input_embeddings()
    optimizer = torch.optim.AdamW(draft.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    total_steps = max(1, epochs * len(packed(training, batch_tokens, None, prompt_context)))
    reports: list[dict] = []
    checkpoint = out / CHECKPOINT_NAME
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        draft.load_state_dict(state["draft"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        reports = state["reports"]
        if progress:
            print(f"resuming after epoch {len(reports)} from {checkpoint}")
    draft_of = draft.draft_positions()
    features: dict = {}  # each example's features, from its first batch on (batch_of)
    trained_tokens = sum(len(e.tokens) - e.generated_from for e in training)
    fingerprinted = fingerprint(model)

    def write(reports):
        extra = {"command": command, "base_model": base_model, "trained_on_tokens": trained_tokens,
                 "held_out_tokens": sum(len(e.tokens) - e.generated_from for e in held_out),
                 "sequences": len(training), "epochs": len(reports), "ttt_steps": ttt_steps,
                 "prompt_context": prompt_context,
                 "accuracy_on": "held-out prompts" if held_out else "training sequences",
                 "step_accuracy": reports[-1]["step_accuracy"] if reports else [],
                 "collect_seconds": round(collected_seconds, 1),
                 "train_seconds": round(sum(r["seconds"] for r in reports), 1),  # every epoch's, resumed runs too
                 "device": str(device), "train_dtype": str(train_dtype).removeprefix("torch."),
                 "feature_dtype": str(next(features_from.parameters()).dtype).removeprefix("torch."),
                 FINGERPRINT_KEY: fingerprinted}
        save(draft, out, extra, dtype=save_dtype)
        (out / "train_log.json").write_text(json.dumps(reports, indent=2) + "\n")

    step_index = len(reports) * (total_steps // max(epochs, 1))
    for epoch in range(len(reports), epochs):
        started = time.perf_counter()
        draft.train()
        batches = packed(training, batch_tokens, generator, prompt_context)
        bar = tqdm(batches, desc=f"eagle3 epoch {epoch + 1}/{epochs}", disable=not progress)
        running = None
        for group in bar:
            for group_param in optimizer.param_groups:
                group_param["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(step_index / total_steps, 1.0)))
            batch = batch_of(features_from, group, layers, features, prompt_context)
            with precision(device, train_dtype):
                losses, _, _ = training_time_test(draft, embed, batch, ttt_steps, draft_of)
            weights = [STEP_DECAY ** k for k in range(ttt_steps)]
            loss = sum(w * l for w, l in zip(weights, losses)) / sum(weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(draft.parameters(), 0.5)
            optimizer.step()
            step_index += 1
            value = loss.item()
            running = value if running is None else 0.9 * running + 0.1 * value
            bar.set_postfix(loss=f"{running:.3f}")
        draft.eval()
        accuracy = evaluate(draft, embed, features_from, held_out or training, layers, ttt_steps, draft_of,
                            batch_tokens, features, train_dtype, prompt_context)
        reports.append({"epoch": epoch + 1, "loss": running, "step_accuracy": accuracy,
                        "seconds": round(time.perf_counter() - started, 1)})
        if progress:
            print(f"epoch {epoch + 1}: loss {running:.3f}, top-1 per step "
                  f"{', '.join(f'{a:.2f}' for a in accuracy)}")
        torch.save({"draft": draft.state_dict(), "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(), "reports": reports}, checkpoint)
        write(reports)
    write(reports)
    return draft.eval(), reports
