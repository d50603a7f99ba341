"""Self-distillation for draft heads: the base model writes the text, the heads learn to guess it.

1. `collect`: the model continues each prompt (batched `generate`): once greedily (the text greedy
   decoding meets) and `samples` more times by sampling at `temperature` (more of the model's own
   text from the same prompts), until `tokens` new tokens are gathered.
2. `hidden_states`: one plain forward per batch of sequences gives the last hidden state at every
   position (what the heads read at decode time: the normed state the LM head turns into the next
   token).
3. `train`: head k at position t learns the model's greedy choice for token t+2+k given the text
   before it (cross-entropy through the frozen LM head; the LM head's own token t+1 is the step's
   root). In greedy text that is the next token itself; in sampled text it is the argmax at that
   position, not the sampled token, because greedy decoding accepts exactly the argmax. With
   `soft_targets`, the model's whole distribution there instead (its argmax and its near misses).
   Hydra heads are teacher-forced with the text's tokens t+1 .. t+1+k. AdamW with a cosine
   learning-rate decay over all epochs. The logits span only the draft vocabulary (heads/vocab.py),
   the tokens the drafter will guess from: about a third of the LM head's rows for SmolLM2, so a
   step costs about a third as much, and no gradient is spent on tokens the heads never draft.

Only positions in the generated part are used: that is the model's own text, the distribution the
heads meet when drafting. Every 10th prompt is held out, with all its continuations: the reported
loss and accuracies (and the static tree built from them) come from prompts the heads never
trained on. Everything is resumable: the collected data and a checkpoint after each epoch live in
the output directory. Collection and training run where the model is (`model.to("cuda")` first
for a GPU).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..heads.modules import CONFIG_NAME, DraftHeads, HeadsConfig, build_heads, save
from ..heads.shipped import FINGERPRINT_KEY, fingerprint
from ..heads.vocab import DRAFT_MASS, default_size, draft_vocabulary, token_frequencies, vocabulary_positions
from .prompts import eos_ids, left_pad, until_eos

DATA_NAME = "distill_data.pt"
RANKS = 8  # per-rank accuracies kept for the static tree (heads/tree.py)
HOLD_OUT = 10  # every 10th prompt measures accuracy instead of training
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class Example:
    """One sequence: tokens int64 [L] (prompt then the model's continuation), hidden [L, H], where
    the continuation starts, which prompt it continues (the held-out split is by prompt), and the
    model's greedy choice after every position, int64 [L] (None: take the text's next token)."""

    tokens: torch.Tensor
    hidden: torch.Tensor
    generated_from: int
    prompt: int = 0
    greedy: torch.Tensor | None = None


@dataclass
class EpochReport:
    epoch: int
    loss: float
    top1: list[float] = field(default_factory=list)  # per head
    top5: list[float] = field(default_factory=list)
    rank_accuracy: list[list[float]] = field(default_factory=list)  # [head][rank < RANKS]: rank r right
    seconds: float = 0.0


@torch.inference_mode()
def collect(model, prompt_ids: list[list[int]], tokens: int, max_new_tokens: int = 128, samples: int = 0,
            temperature: float = 0.8, batch_size: int = 32, seed: int = 0, progress: bool = True,
            max_seconds: float | None = None, batch_tokens: int | None = None, writer=None) -> list[Example]:
    """Continuations of the prompts until `tokens` new ones: every prompt greedily first, then
    `samples` rounds of sampled ones (plain multinomial at `temperature`), at most `batch_size`
    prompts per `generate` call. A continuation ends at the model's EOS (kept) or at
    `max_new_tokens`. With `max_seconds`, no new batch starts once that much time has gone. With
    `batch_tokens`, a batch also stops growing before rows x (its longest prompt + max_new_tokens)
    passes it: the KV cache and the attention of a batch of long prompts stay within memory, and
    short prompts still get full batches. With `writer` (a copy of the model in another dtype, a
    bf16 one on a CPU with bf16 matmuls) the writer writes the text, and `model` still gives every
    position's hidden state and argmax: the targets are the model's own, whatever wrote the text."""
    if samples < 0 or temperature <= 0 or batch_size < 1 or max_new_tokens < 2:
        raise ValueError(f"collect needs samples >= 0 (got {samples}), temperature > 0 (got {temperature}), "
                         f"batch_size >= 1 (got {batch_size}) and max_new_tokens >= 2 (got {max_new_tokens})")
    if batch_tokens is not None and batch_tokens < 1:
        raise ValueError(f"collect needs batch_tokens >= 1 or None (got {batch_tokens})")
    writer = model if writer is None else writer
    device = next(writer.parameters()).device
    # On a CPU treedec's own loop writes the same text faster than HF's generate (README, Results),
    # so an unpatched model is patched for the collection; on a GPU, large HF batches are used as is
    patched_here = device.type == "cpu" and not hasattr(writer, "treedec")
    if patched_here:
        import treedec

        treedec.patch(writer, drafter="auto")
    try:
        return _collect(model, writer, prompt_ids, tokens, max_new_tokens, samples, temperature, batch_size, seed,
                        progress, max_seconds, batch_tokens)
    finally:
        if patched_here:
            treedec.unpatch(writer)


def collection_jobs(prompt_lengths: list[int], samples: int, batch_size: int) -> list[tuple[int, bool]]:
    """(prompt, sampled) for every continuation, in the order they are generated: the greedy round,
    then the sampled ones in rounds of about two batches' worth (each prompt's samples of a round
    together). Within a round prompts go shortest first, so that a batch's prompts are of similar
    length (less left padding, a smaller cache for short ones); rounds make a time budget that ends
    collection early cut every prompt's samples alike, not the longest prompts' entirely."""
    by_length = sorted(range(len(prompt_lengths)), key=lambda p: prompt_lengths[p])
    jobs = [(p, False) for p in by_length]
    per_round = max(1, min(samples, round(2 * batch_size / max(len(prompt_lengths), 1))))
    for done in range(0, samples, per_round):
        jobs += [(p, True) for p in by_length for _ in range(min(per_round, samples - done))]
    return jobs


def next_batch(jobs: list[tuple[int, bool]], start: int, prompt_lengths: list[int], batch_size: int,
               max_new_tokens: int, batch_tokens: int | None) -> int:
    """End (exclusive) of the batch of jobs that starts at `start`: same-mode jobs (greedy and
    sampled calls cannot be mixed), at most `batch_size`, and within `batch_tokens` (see
    `collect`); a batch always has at least one job."""
    end, longest = start + 1, prompt_lengths[jobs[start][0]]
    while end < len(jobs) and end - start < batch_size and jobs[end][1] == jobs[start][1]:
        longest = max(longest, prompt_lengths[jobs[end][0]])
        if batch_tokens is not None and (end + 1 - start) * (longest + max_new_tokens) > batch_tokens:
            break
        end += 1
    return end


def _collect(model, writer, prompt_ids, tokens, max_new_tokens, samples, temperature, batch_size, seed, progress,
             max_seconds, batch_tokens) -> list[Example]:
    device = next(writer.parameters()).device
    eos = eos_ids(model.generation_config)
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else min(eos) if eos else 0
    lengths = [len(p) for p in prompt_ids]
    jobs = collection_jobs(lengths, samples, batch_size)
    torch.manual_seed(seed)  # HF's sampling draws from the global generator: reproducible rounds
    examples: list[Example] = []
    gathered = 0
    bar = tqdm(total=tokens, desc="self-distillation: generating", unit="tok", disable=not progress)
    start = 0
    began = time.perf_counter()
    while gathered < tokens and start < len(jobs):
        if max_seconds is not None and time.perf_counter() - began > max_seconds:
            if progress:
                print(f"collection stopped at its {max_seconds:.0f} s budget")
            break
        end = next_batch(jobs, start, lengths, batch_size, max_new_tokens, batch_tokens)
        batch, start = jobs[start:end], end
        prompts = [prompt_ids[p] for p, _ in batch]
        ids, mask = left_pad(prompts, pad)
        width = ids.shape[1]  # every continuation starts here
        sampled = batch[0][1]
        settings = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if sampled else \
            dict(do_sample=False)
        out = writer.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             pad_token_id=pad, **settings).cpu()
        sequences = []
        for row, ((p, _), prompt) in enumerate(zip(batch, prompts)):
            new = until_eos(out[row, width:].tolist(), eos)
            if len(new) >= 2:
                sequences.append((p, torch.tensor(prompt + new), len(prompt)))
        for (p, sequence, generated_from), hidden in zip(sequences, hidden_states(model, [s for _, s, _ in sequences])):
            examples.append(Example(sequence, hidden, generated_from, p, greedy_tokens(model, hidden)))
            count = len(sequence) - generated_from
            gathered += count
            bar.update(count)
    bar.close()
    if gathered < tokens and progress:
        print(f"the {len(prompt_ids)} prompts gave {gathered} of the {tokens} tokens asked for "
              "(more --samples, more prompts or a larger --max-new-tokens give more)")
    return examples


@torch.inference_mode()
def hidden_states(model, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
    """The last (normed) hidden state at every position of each sequence (int64 [L]) -> [L, H]
    each, fp32 on the CPU. One right-padded forward for all of them (padding at the end changes
    no earlier position)."""
    if not sequences:
        return []
    base = getattr(model, model.base_model_prefix)
    device = next(model.parameters()).device
    width = max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
        mask[row, : len(sequence)] = 1
    states = base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
    return [states[row, : len(s)].float().cpu() for row, s in enumerate(sequences)]


@torch.inference_mode()
def greedy_tokens(model, hidden: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """The LM head's argmax at every position of hidden [L, H] -> int64 [L], on the CPU."""
    lm_head = model.get_output_embeddings()
    device = lm_head.weight.device
    return torch.cat([lm_head(hidden[i : i + chunk].to(device, lm_head.weight.dtype)).argmax(-1).cpu()
                      for i in range(0, hidden.shape[0], chunk)])


@dataclass
class Positions:
    """Every training position of some examples, flattened. states [S, H]: each example's hidden
    states from its first position to its end; rows [P]: position t's row in `states` (what the
    heads read); targets [P, K]: the greedy choice for token t+2+k, -100 past a sequence's end;
    inputs [P, K]: the text's token t+1+k (Hydra's teacher forcing); teacher_rows [P, K]: the row
    of the state the LM head turns into token t+2+k, whose distribution soft targets learn (any
    row where the target is -100)."""

    states: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    inputs: torch.Tensor
    teacher_rows: torch.Tensor

    @property
    def hidden(self) -> torch.Tensor:
        """[P, H]: the state each position's heads read."""
        return self.states[self.rows]

    def to(self, device) -> "Positions":
        return Positions(self.states.to(device), self.rows.to(device), self.targets.to(device),
                         self.inputs.to(device), self.teacher_rows.to(device))


def flatten(examples: list[Example], num_heads: int) -> Positions:
    """The positions t of each example's generated part that have at least head 1's target:
    t from generated_from - 1 (whose LM-head token is the first generated one) to L - 3."""
    states, rows, targets, inputs = [], [], [], []
    stored = 0  # rows of `states` so far
    for example in examples:
        first, last = max(example.generated_from - 1, 0), len(example.tokens) - 3
        if last < first:
            continue
        # token i + j for position i and offset j, with -100 past the end
        padded = torch.cat([example.tokens, torch.full((num_heads + 2,), -100, dtype=torch.int64)])
        window = padded.unfold(0, num_heads + 2, 1)[first : last + 1]  # [P, K+2]: tokens t .. t+K+1
        states.append(example.hidden[first:])
        rows.append(stored + torch.arange(last + 1 - first))
        stored += len(example.tokens) - first
        if example.greedy is None:
            targets.append(window[:, 2:])
        else:  # greedy[i] is the choice for token i+1: head k's target is greedy[t+1+k]
            chosen = torch.cat([example.greedy, torch.full((num_heads + 2,), -100, dtype=torch.int64)])
            chosen = chosen.unfold(0, num_heads + 2, 1)[first : last + 1][:, 1:-1]
            targets.append(torch.where(window[:, 2:] == -100, -100, chosen))
        inputs.append(window[:, 1:-1].clamp(min=0))  # an input past the end only feeds an ignored target
    if not states:
        empty = torch.zeros(0, num_heads, dtype=torch.int64)
        return Positions(torch.zeros(0, 1), torch.zeros(0, dtype=torch.int64), empty, empty, empty)
    rows = torch.cat(rows)
    # token t+2+k is the LM head's output at t+1+k, one row per step down the example (clamped
    # into `states` where the target is past the end and ignored)
    teacher_rows = (rows.unsqueeze(1) + 1 + torch.arange(num_heads)).clamp(max=stored - 1)
    return Positions(torch.cat(states), rows, torch.cat(targets), torch.cat(inputs), teacher_rows)


def _batches(positions: Positions, batch_size: int, generator: torch.Generator | None):
    """(hidden, targets, inputs, teacher_rows) batches, shuffled with `generator` (in order without one)."""
    count = positions.rows.shape[0]
    order = torch.arange(count) if generator is None else torch.randperm(count, generator=generator)
    order = order.to(positions.rows.device)
    for start in range(0, count, batch_size):
        chosen = order[start : start + batch_size]
        yield (positions.states[positions.rows[chosen]], positions.targets[chosen], positions.inputs[chosen],
               positions.teacher_rows[chosen])


def head_logits(heads: DraftHeads, model, hidden: torch.Tensor, inputs: torch.Tensor,
                vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[N, K, V'] logits of every head (hidden [N, H]; inputs [N, K]: token t+1+k for Hydra) over
    the tokens `vocab_ids` (None: all V), in that order."""
    base_weight = model.get_output_embeddings().weight.float()

    def rows(weight: torch.Tensor) -> torch.Tensor:
        return weight if vocab_ids is None else weight[vocab_ids]

    if heads.config.kind == "medusa":
        states = heads.states(hidden)
    else:
        embed = getattr(model, model.base_model_prefix).embed_tokens
        states = heads.states(hidden, embed(inputs).float())
    if heads.lm_heads is None:  # every head through the one shared projection: one batched product
        return torch.nn.functional.linear(states, rows(base_weight))
    return torch.stack([torch.nn.functional.linear(states[:, k], rows(heads.lm_weight(k, base_weight)))
                        for k in range(heads.config.num_heads)], dim=1)


def argmax_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy against the targets that exist and lie in the vocabulary trained over
    (targets >= 0: -100 past a sequence's end, -1 a token outside the draft vocabulary)."""
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             torch.where(targets < 0, -100, targets).reshape(-1),
                                             ignore_index=-100, reduction=reduction)


class _Tally:
    """Loss and per-head per-rank hits summed over batches (training and evaluation alike). A
    target outside the draft vocabulary (-1) counts as a miss of every rank, as it is when drafting."""

    def __init__(self, num_heads: int):
        self.hits, self.counts = torch.zeros(num_heads, RANKS), torch.zeros(num_heads)  # on the CPU
        self.loss = self.rows = 0.0

    @torch.no_grad()
    def add(self, logits: torch.Tensor, targets: torch.Tensor, loss_sum: float) -> None:
        valid = targets != -100
        ranked = logits.topk(RANKS, dim=-1).indices  # [N, K, RANKS]
        self.hits += ((ranked == targets.unsqueeze(-1)) & valid.unsqueeze(-1)).sum(0).float().cpu()
        self.counts += valid.sum(0).float().cpu()
        self.loss, self.rows = self.loss + loss_sum, self.rows + int((targets >= 0).sum())

    def result(self) -> tuple[float, torch.Tensor]:
        """Mean loss per target, and accuracy per head and rank [K, RANKS]."""
        return self.loss / max(self.rows, 1), self.hits / self.counts.clamp(min=1).unsqueeze(-1)


@torch.no_grad()
def evaluate(heads: DraftHeads, model, positions: Positions, batch_size: int = 64,
             vocab_ids: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
    """Loss and per-head per-rank accuracy [K, RANKS] on `positions` (held-out prompts'), over the
    tokens `vocab_ids` (positions' targets already mapped into them, see `restrict_targets`)."""
    tally = _Tally(heads.config.num_heads)
    was_training = heads.training
    heads.eval()
    for hidden, targets, inputs, _ in _batches(positions, batch_size, None):
        logits = head_logits(heads, model, hidden, inputs, vocab_ids)
        tally.add(logits, targets, float(argmax_loss(logits, targets, "sum")))
    heads.train(was_training)
    return tally.result()


def _learning_rate(lr: float, step: int, total: int) -> float:
    """Cosine decay from `lr` to lr / 20 over `total` steps, after a 1% (at most 100-step) warmup."""
    warmup = min(100, max(total // 100, 1))
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def soft_target_loss(logits: torch.Tensor, teacher_states: torch.Tensor, targets: torch.Tensor, model,
                     vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of the heads' logits [N, K, V'] against the model's whole next-token
    distribution at each target (its LM head over teacher_states [N, K, H], renormalised over
    `vocab_ids`), over the targets that exist and lie in that vocabulary (targets >= 0, as for
    `argmax_loss`): the greedy target is that distribution's argmax, and the rest of it says which
    other tokens are near misses, which the lower ranks of a tree draft."""
    with torch.no_grad():
        weight = model.get_output_embeddings().weight.float()
        teacher = torch.nn.functional.linear(teacher_states, weight if vocab_ids is None else weight[vocab_ids])
        teacher = teacher.softmax(-1)
    per_target = -(teacher * logits.log_softmax(-1)).sum(-1)  # [N, K]
    valid = targets >= 0
    return (per_target * valid).sum() / valid.sum().clamp(min=1)


def restrict_targets(positions: Positions, vocab_ids: torch.Tensor | None, vocab_size: int) -> Positions:
    """Targets as positions in `vocab_ids` (-1 for a token outside it, -100 kept); as they are
    without a draft vocabulary."""
    if vocab_ids is None:
        return positions
    lookup = vocabulary_positions(vocab_ids.to(positions.targets.device), vocab_size)
    targets = positions.targets
    mapped = torch.where(targets >= 0, lookup[targets.clamp(min=0)], targets)
    return Positions(positions.states, positions.rows, mapped, positions.inputs, positions.teacher_rows)


def train(heads: DraftHeads, model, examples: list[Example], epochs: int = 3, lr: float = 1e-3,
          batch_size: int = 64, seed: int = 0, out: Path | None = None, progress: bool = True,
          held_out: list[Example] | None = None, after_epoch=None, soft_targets: bool = False,
          vocab_ids: torch.Tensor | None = None) -> list[EpochReport]:
    """Train `heads` (on the model's device) on `examples`; with `out`, a checkpoint after every
    epoch and resuming from one (the learning-rate schedule spans the `epochs` asked for now).
    With `held_out`, each epoch's reported loss and accuracies are measured on those sequences
    (the training set's would flatter heads that memorise). `after_epoch(reports)` runs after each.
    `soft_targets`: learn the model's whole distribution at each target (`soft_target_loss`)
    instead of its argmax alone; the reported loss stays the argmax's cross-entropy either way.
    `vocab_ids`: train over those tokens only, the draft vocabulary the drafter will guess from
    (heads/vocab.py): the LM-head pass, most of a step's work, reads only their rows, and a target
    outside them, which no draft can hit, is left out of the loss (and counted as a miss)."""
    device = next(model.parameters()).device
    heads.to(device=device, dtype=torch.float32)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    start_epoch, reports = 0, []
    vocab_size = model.get_output_embeddings().weight.shape[0]
    trained_over = vocab_size if vocab_ids is None else len(vocab_ids)
    checkpoint = None if out is None else Path(out) / CHECKPOINT_NAME
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False, map_location=device)
        # a checkpoint from before draft vocabularies trained over every token
        if state.get("draft_vocab", vocab_size) != trained_over:
            raise ValueError(f"{checkpoint} trained over {state.get('draft_vocab', vocab_size)} tokens; this run asks "
                             f"for {trained_over}: resume with the same draft vocabulary (train-heads --draft-vocab) "
                             "or train into a fresh directory")
        saved = {name: tuple(value.shape) for name, value in state["heads"].items()}
        wanted = {name: tuple(value.shape) for name, value in heads.state_dict().items()}
        if saved != wanted:
            raise ValueError(f"{checkpoint} holds heads of another kind or size than these {heads.config.kind} "
                             f"heads ({heads.config.num_heads} heads, {heads.config.num_blocks} blocks each); train "
                             "into a fresh directory, or resume with the options that wrote it")
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, reports = state["epoch"], [EpochReport(**r) for r in state["reports"]]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    heads.train()
    num_heads = heads.config.num_heads
    vocab_ids = None if vocab_ids is None else vocab_ids.to(device)
    positions = restrict_targets(flatten(examples, num_heads).to(device), vocab_ids, vocab_size)
    evaluation = restrict_targets(flatten(held_out, num_heads).to(device), vocab_ids, vocab_size) if held_out else None
    steps_per_epoch = math.ceil(positions.rows.shape[0] / batch_size)
    for epoch in range(start_epoch, epochs):
        began = time.perf_counter()
        generator = torch.Generator().manual_seed(seed + epoch)
        tally = _Tally(num_heads)
        batches = _batches(positions, batch_size, generator)
        for step, (hidden, targets, inputs, teacher_rows) in enumerate(tqdm(batches, total=steps_per_epoch,
                                                                            desc=f"epoch {epoch + 1}/{epochs}",
                                                                            disable=not progress)):
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(lr, epoch * steps_per_epoch + step, epochs * steps_per_epoch)
            logits = head_logits(heads, model, hidden, inputs, vocab_ids)
            hard = argmax_loss(logits, targets)
            loss = (soft_target_loss(logits, positions.states[teacher_rows], targets, model, vocab_ids)
                    if soft_targets else hard)
            counted = int((targets >= 0).sum())
            if counted:  # a batch whose targets all lie outside the vocabulary has nothing to learn
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            tally.add(logits, targets, float(hard.detach()) * counted if counted else 0.0)
        epoch_loss, per_rank = tally.result()
        if evaluation is not None:
            epoch_loss, per_rank = evaluate(heads, model, evaluation, batch_size, vocab_ids)
        report = EpochReport(epoch + 1, epoch_loss, per_rank[:, 0].tolist(), per_rank[:, :5].sum(-1).tolist(),
                             per_rank.tolist(), time.perf_counter() - began)
        reports.append(report)
        if progress:
            heads_line = "  ".join(f"head {k + 1}: {a:.1%}/{b:.1%}" for k, (a, b) in enumerate(zip(report.top1,
                                                                                                   report.top5)))
            where = "held-out" if held_out else "training"
            print(f"epoch {report.epoch}: {where} loss {report.loss:.3f}; top-1/top-5 {heads_line} "
                  f"({report.seconds:.0f} s)")
        if checkpoint is not None:
            torch.save({"heads": heads.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                        "reports": [r.__dict__ for r in reports], "draft_vocab": trained_over}, checkpoint)
        if after_epoch is not None:
            after_epoch(reports)
    heads.eval()
    return reports


def resume_conflict(out: str | Path, kind: str, num_heads: int, num_blocks: int, own_lm_head: bool) -> str | None:
    """Why a `train_heads` run with these settings cannot resume in `out` (heads of another kind or
    shape are there), or None: checked before any model is loaded."""
    config_path = Path(out) / CONFIG_NAME
    if not config_path.exists():
        return None
    try:
        saved = json.loads(config_path.read_text())
        found = {name: saved[name] for name in ("kind", "num_heads", "num_blocks", "own_lm_head")}
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        return f"{config_path} is not a heads config ({error!r}); train into a fresh directory"
    asked = {"kind": kind, "num_heads": num_heads, "num_blocks": num_blocks, "own_lm_head": own_lm_head}
    differing = [f"{name} {found[name]!r} (asked for {asked[name]!r})" for name in asked if found[name] != asked[name]]
    if differing:
        return (f"{out} holds other heads: {', '.join(differing)}; train into a fresh directory, or resume with the "
                "options that wrote it")
    return None


def split_held_out(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """(training, held-out): every HOLD_OUT-th prompt's continuations are held out, where there
    are at least 2 * HOLD_OUT prompts (fewer leave nothing to spare: all train)."""
    if len({e.prompt for e in examples}) < 2 * HOLD_OUT:
        return examples, []
    return [e for e in examples if e.prompt % HOLD_OUT], [e for e in examples if not e.prompt % HOLD_OUT]


def train_heads(model, prompt_ids: list[list[int]], kind: str, num_heads: int, tokens: int, out: str | Path,
                epochs: int = 3, lr: float = 1e-3, batch_size: int = 64, max_new_tokens: int = 128,
                base_model: str = "", progress: bool = True, samples: int = 0, temperature: float = 0.8,
                collect_batch: int = 32, num_blocks: int = 1, collect_seconds: float | None = None,
                save_dtype: torch.dtype = torch.float32, command: str = "",
                own_lm_head: bool = False, soft_targets: bool = False,
                collect_batch_tokens: int | None = None, draft_vocab: int | None = None,
                writer=None) -> tuple[DraftHeads, list[EpochReport]]:
    """The whole recipe: collect (or reuse collected data in `out`), train, save heads + config
    (weights in `save_dtype`; `command`, the command line that trained them, goes in the config).
    The heads train over their draft vocabulary (`train`): the `draft_vocab` most frequent tokens
    of the training text, by default the fewest that hold DRAFT_MASS of it, at least RANKS;
    `draft_vocab` >= V trains over the whole vocabulary. The size goes in the config as
    `draft_vocab`, which then caps the drafter's draft vocabulary."""
    if draft_vocab is not None and (not isinstance(draft_vocab, int) or isinstance(draft_vocab, bool)
                                    or draft_vocab < RANKS):
        raise ValueError(f"draft_vocab = {draft_vocab!r} must be an int of at least {RANKS} (the ranks whose "
                         "accuracy is measured) or None (the default)")
    conflict = resume_conflict(out, kind, num_heads, num_blocks, own_lm_head)
    if conflict is not None:
        raise ValueError(conflict)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_path = out / DATA_NAME
    began = time.perf_counter()
    if data_path.exists():
        # data saved before examples recorded their prompt: each sequence counts as its own prompt
        examples = [Example(**{"prompt": i, **e}) for i, e in enumerate(torch.load(data_path, weights_only=False))]
        if progress:
            print(f"reusing {len(examples)} collected sequences from {data_path}")
    else:
        examples = collect(model, prompt_ids, tokens, max_new_tokens, samples, temperature, collect_batch,
                           progress=progress, max_seconds=collect_seconds, batch_tokens=collect_batch_tokens,
                           writer=writer)
        torch.save([e.__dict__ for e in examples], data_path)
    collected_seconds = time.perf_counter() - began
    config = HeadsConfig(kind, num_heads, model.config.hidden_size, model.config.vocab_size, num_blocks=num_blocks,
                         base_model=base_model, own_lm_head=own_lm_head)
    heads = build_heads(config)
    heads.init_lm_heads(model.get_output_embeddings().weight.detach().float().cpu())  # a resumed run loads its own
    training, held_out = split_held_out(examples)
    generated = sum(len(e.tokens) - e.generated_from for e in training)
    # the draft vocabulary's ranking (heads/vocab.py)
    # float32, as saved: the drafter ranks the saved values, and float64 ties could rank differently
    heads.token_frequencies = token_frequencies(training, model.get_output_embeddings()).float()
    vocab_size = model.config.vocab_size
    default = max(default_size(heads.token_frequencies, DRAFT_MASS), RANKS)
    size = min(draft_vocab if draft_vocab is not None else default, vocab_size)
    vocab_ids = None if size >= vocab_size else draft_vocabulary(heads.token_frequencies, size)
    base_fingerprint = fingerprint(model)
    train_began = time.perf_counter()

    def save_heads(reports: list[EpochReport]) -> None:
        """After every epoch, so that a run cut short still leaves usable heads and their figures."""
        extra = {
            "command": command,
            "trained_on_tokens": generated,
            "accuracy_on": "held-out prompts" if held_out else "training sequences",
            "targets": "the model's distribution (soft)" if soft_targets else "the model's argmax",
            "held_out_tokens": sum(len(e.tokens) - e.generated_from for e in held_out),
            "draft_vocab": size,  # the tokens trained over: the drafter guesses from at most these
            "epochs": len(reports),
            "collect_seconds": round(collected_seconds, 1),
            "train_seconds": round(time.perf_counter() - train_began, 1),
            "device": str(next(model.parameters()).device),
            "top1": reports[-1].top1 if reports else [],
            "top5": reports[-1].top5 if reports else [],
            "rank_accuracy": reports[-1].rank_accuracy if reports else [],
            "loss": reports[-1].loss if reports else None,
            FINGERPRINT_KEY: base_fingerprint,  # recognises the base model by its weights (heads/shipped.py)
        }
        save(heads, out, extra, dtype=save_dtype)  # with the token frequencies
        (out / "train_log.json").write_text(json.dumps([r.__dict__ for r in reports], indent=2) + "\n")

    reports = train(heads, model, training, epochs, lr, batch_size, out=out, progress=progress, held_out=held_out,
                    after_epoch=save_heads, soft_targets=soft_targets, vocab_ids=vocab_ids)
    save_heads(reports)  # also where every epoch was done before (a resumed run with nothing left)
    return heads, reports
