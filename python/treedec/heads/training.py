"""Self-distillation for draft heads: the base model writes the text, the heads learn to guess it.

1. `collect`: the model continues each prompt greedily (through treedec's lossless loop, which
   is faster than HF's and writes the same tokens) until `tokens` new tokens are gathered.
2. `hidden_states`: one plain forward per sequence gives the last hidden state at every position
   (what the heads read at decode time: the normed state the LM head turns into the next token).
3. `train`: head k at position t learns the model's own token t+1+k (cross-entropy through the
   frozen LM head). Hydra heads are teacher-forced with the true tokens t+1 .. t+k.

Only positions in the generated part are used: that is the model's own text, the distribution the
heads meet when drafting. Every 10th sequence is held out: the reported loss and accuracies (and
the static tree built from them) come from text the heads never trained on. Everything is resumable: the collected data and a checkpoint after each
epoch live in the output directory.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .modules import DraftHeads, HeadsConfig, build_heads, save

DATA_NAME = "distill_data.pt"
RANKS = 8  # per-rank accuracies kept for the static tree (heads/tree.py)
HOLD_OUT = 10  # every 10th collected sequence measures accuracy instead of training
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class Example:
    """One sequence: tokens int64 [L] (prompt then the model's continuation), hidden [L, H], and
    where the continuation starts."""

    tokens: torch.Tensor
    hidden: torch.Tensor
    generated_from: int


@dataclass
class EpochReport:
    epoch: int
    loss: float
    top1: list[float] = field(default_factory=list)  # per head
    top5: list[float] = field(default_factory=list)
    rank_accuracy: list[list[float]] = field(default_factory=list)  # [head][rank < RANKS]: rank r right
    seconds: float = 0.0


@torch.inference_mode()
def collect(model, prompt_ids: list[list[int]], tokens: int, max_new_tokens: int = 128,
            progress: bool = True) -> list[Example]:
    """Greedy continuations of the prompts, in order, until `tokens` new ones (or the prompts run out)."""
    import treedec

    patched = hasattr(model, "treedec")
    if not patched:
        treedec.patch(model, drafter="auto")
    examples: list[Example] = []
    gathered = 0
    bar = tqdm(total=tokens, desc="self-distillation: generating", unit="tok", disable=not progress)
    try:
        index = 0
        # one pass over the prompts: greedy continuations of a prompt seen again would repeat
        while gathered < tokens and index < len(prompt_ids):
            prompt = prompt_ids[index]
            index += 1
            ids = torch.tensor([prompt])
            out = model.generate(ids, max_new_tokens=min(max_new_tokens, tokens - gathered + 1), do_sample=False)
            new = out.shape[1] - ids.shape[1]
            if new < 2:
                continue
            sequence = out[0].cpu()
            examples.append(Example(sequence, hidden_states(model, sequence), len(prompt)))
            gathered += new
            bar.update(new)
    finally:
        bar.close()
        if not patched:
            treedec.unpatch(model)
    if gathered < tokens and progress:
        print(f"the {len(prompt_ids)} prompts gave {gathered} of the {tokens} tokens asked for "
              "(more prompts or a larger --max-new-tokens give more)")
    return examples


@torch.inference_mode()
def hidden_states(model, sequence: torch.Tensor) -> torch.Tensor:
    """The last (normed) hidden state at every position of `sequence` (int64 [L]) -> [L, H], CPU."""
    base = getattr(model, model.base_model_prefix)
    device = next(model.parameters()).device
    return base(input_ids=sequence.view(1, -1).to(device), use_cache=False).last_hidden_state[0].float().cpu()


def _batches(examples: list[Example], num_heads: int, batch_size: int, generator: torch.Generator):
    """Shuffled (example, position) pairs of the generated part, as (hidden [N, H], targets
    [N, K] with -100 past a sequence's end, token ids [N, K] for Hydra's teacher forcing)."""
    pairs = []
    for e, example in enumerate(examples):
        last = len(example.tokens) - 3  # position t needs token t+2, head 1's target
        pairs += [(e, t) for t in range(max(example.generated_from - 1, 0), last + 1)]
    order = torch.randperm(len(pairs), generator=generator).tolist()
    for start in range(0, len(order), batch_size):
        chosen = [pairs[i] for i in order[start : start + batch_size]]
        hidden = torch.stack([examples[e].hidden[t] for e, t in chosen])
        targets = torch.full((len(chosen), num_heads), -100, dtype=torch.int64)
        inputs = torch.zeros((len(chosen), num_heads), dtype=torch.int64)
        for row, (e, t) in enumerate(chosen):
            tokens = examples[e].tokens
            for k in range(num_heads):  # h_t's LM-head token is t+1 (the root); head k guesses t+2+k
                if t + 1 + k < len(tokens):
                    inputs[row, k] = tokens[t + 1 + k]  # Hydra's head k reads the token before its own
                if t + 2 + k < len(tokens):
                    targets[row, k] = tokens[t + 2 + k]
        yield hidden, targets, inputs


def head_logits(heads: DraftHeads, model, hidden: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """[N, K, V] logits of every head (hidden [N, H]; inputs [N, K]: token t+1+k for Hydra)."""
    lm_head = model.get_output_embeddings()
    if heads.config.kind == "medusa":
        states = heads.states(hidden)
    else:
        embed = getattr(model, model.base_model_prefix).embed_tokens
        states = heads.states(hidden, embed(inputs).float())
    return torch.nn.functional.linear(states, lm_head.weight.float())


class _Tally:
    """Loss and per-head per-rank hits summed over batches (training and evaluation alike)."""

    def __init__(self, num_heads: int):
        self.hits, self.counts = torch.zeros(num_heads, RANKS), torch.zeros(num_heads)
        self.loss = self.rows = 0.0

    @torch.no_grad()
    def add(self, logits: torch.Tensor, targets: torch.Tensor, loss_sum: float) -> None:
        valid = targets != -100
        ranked = logits.topk(RANKS, dim=-1).indices  # [N, K, RANKS]
        self.hits += ((ranked == targets.unsqueeze(-1)) & valid.unsqueeze(-1)).sum(0).float()
        self.counts += valid.sum(0).float()
        self.loss, self.rows = self.loss + loss_sum, self.rows + int(valid.sum())

    def result(self) -> tuple[float, torch.Tensor]:
        """Mean loss per target, and accuracy per head and rank [K, RANKS]."""
        return self.loss / max(self.rows, 1), self.hits / self.counts.clamp(min=1).unsqueeze(-1)


@torch.no_grad()
def evaluate(heads: DraftHeads, model, examples: list[Example], batch_size: int = 64) -> tuple[float, torch.Tensor]:
    """Loss and per-head per-rank accuracy [K, RANKS] on `examples` (held-out sequences)."""
    num_heads = heads.config.num_heads
    tally = _Tally(num_heads)
    was_training = heads.training
    heads.eval()
    for hidden, targets, inputs in _batches(examples, num_heads, batch_size, torch.Generator().manual_seed(0)):
        logits = head_logits(heads, model, hidden, inputs)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        tally.add(logits, targets, float(loss))
    heads.train(was_training)
    return tally.result()


def train(heads: DraftHeads, model, examples: list[Example], epochs: int = 3, lr: float = 1e-3,
          batch_size: int = 64, seed: int = 0, out: Path | None = None, progress: bool = True,
          held_out: list[Example] | None = None) -> list[EpochReport]:
    """Train `heads` on `examples`; with `out`, a checkpoint after every epoch and resuming from one.
    With `held_out`, each epoch's reported loss and accuracies are measured on those sequences
    (the training set's would flatter heads that memorise)."""
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    start_epoch, reports = 0, []
    checkpoint = None if out is None else Path(out) / CHECKPOINT_NAME
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, reports = state["epoch"], [EpochReport(**r) for r in state["reports"]]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    heads.train()
    num_heads = heads.config.num_heads
    for epoch in range(start_epoch, epochs):
        began = time.perf_counter()
        generator = torch.Generator().manual_seed(seed + epoch)
        tally = _Tally(num_heads)
        batches = list(_batches(examples, num_heads, batch_size, generator))
        for hidden, targets, inputs in tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress):
            logits = head_logits(heads, model, hidden, inputs)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                     ignore_index=-100)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            tally.add(logits, targets, float(loss.detach()) * int((targets != -100).sum()))
        epoch_loss, per_rank = tally.result()
        if held_out:
            epoch_loss, per_rank = evaluate(heads, model, held_out, batch_size)
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
                        "reports": [r.__dict__ for r in reports]}, checkpoint)
    heads.eval()
    return reports


def train_heads(model, prompt_ids: list[list[int]], kind: str, num_heads: int, tokens: int, out: str | Path,
                epochs: int = 3, lr: float = 1e-3, batch_size: int = 64, max_new_tokens: int = 128,
                base_model: str = "", progress: bool = True) -> tuple[DraftHeads, list[EpochReport]]:
    """The whole recipe: collect (or reuse collected data in `out`), train, save heads + config."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_path = out / DATA_NAME
    began = time.perf_counter()
    if data_path.exists():
        examples = [Example(**e) for e in torch.load(data_path, weights_only=False)]
        if progress:
            print(f"reusing {len(examples)} collected sequences from {data_path}")
    else:
        examples = collect(model, prompt_ids, tokens, max_new_tokens, progress)
        torch.save([e.__dict__ for e in examples], data_path)
    collected_seconds = time.perf_counter() - began
    config = HeadsConfig(kind, num_heads, model.config.hidden_size, model.config.vocab_size, base_model=base_model)
    heads = build_heads(config)
    # every HOLD_OUT-th sequence is kept out of training and measures the accuracies
    held_out = examples[::HOLD_OUT] if len(examples) >= 2 * HOLD_OUT else []
    training = [e for i, e in enumerate(examples) if not held_out or i % HOLD_OUT]
    reports = train(heads, model, training, epochs, lr, batch_size, out=out, progress=progress, held_out=held_out)
    generated = sum(len(e.tokens) - e.generated_from for e in examples)
    extra = {
        "trained_on_tokens": generated,
        "accuracy_on": "held-out sequences" if held_out else "training sequences",
        "epochs": epochs,
        "collect_seconds": round(collected_seconds, 1),
        "train_seconds": round(sum(r.seconds for r in reports), 1),
        "top1": reports[-1].top1 if reports else [],
        "top5": reports[-1].top5 if reports else [],
        "rank_accuracy": reports[-1].rank_accuracy if reports else [],
        "loss": reports[-1].loss if reports else None,
    }
    save(heads, out, extra)
    (out / "train_log.json").write_text(json.dumps([r.__dict__ for r in reports], indent=2) + "\n")
    return heads, reports
