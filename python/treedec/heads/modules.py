"""The head modules, their config, and saving / loading them."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .vocab import FREQUENCIES_NAME, check_frequencies, load_frequencies, save_frequencies

HEAD_KINDS = ("medusa", "hydra")
CONFIG_NAME = "heads.json"
WEIGHTS_NAME = "heads.safetensors"


@dataclass
class HeadsConfig:
    kind: str  # "medusa" | "hydra"
    num_heads: int  # K: tokens guessed ahead of the LM head's own
    hidden_size: int
    vocab_size: int
    num_blocks: int = 1  # residual SiLU blocks per head
    base_model: str = ""  # what they were trained on (a name, for the user)
    # False: every head reads through the base model's LM head (shared, frozen). True: each head
    # has its own [V, H] projection, initialised from the base one and trained (Medusa's original
    # layout; K x V x H more parameters)
    own_lm_head: bool = False

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"kind = {self.kind!r} must be one of {', '.join(map(repr, HEAD_KINDS))}")
        for name in ("num_heads", "hidden_size", "vocab_size", "num_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} = {value!r} must be an int >= 1")
        if not isinstance(self.own_lm_head, bool):
            raise ValueError(f"own_lm_head = {self.own_lm_head!r} must be True or False")


class ResidualBlock(nn.Module):
    """x + SiLU(W x + b), W zero-initialised, so an untrained head starts as the identity
    (head k then guesses what the LM head guesses, a reasonable start, as in Medusa)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class DraftHeads(nn.Module):
    """Base: `states(...)` gives each head's state; an LM head turns it into logits: the base
    model's (shared), or with `own_lm_head` each head's own (`lm_weight`)."""

    def __init__(self, config: HeadsConfig):
        super().__init__()
        self.config = config
        self.meta: dict = {}  # what `load` found beside the config: accuracies, training cost
        self.token_frequencies: torch.Tensor | None = None  # [V] in the training text (heads/vocab.py)
        self.lm_heads = None
        if config.own_lm_head:  # filled from the base LM head by `init_lm_heads` before training
            self.lm_heads = nn.ParameterList(
                nn.Parameter(torch.zeros(config.vocab_size, config.hidden_size)) for _ in range(config.num_heads)
            )

    def init_lm_heads(self, base_weight: torch.Tensor) -> None:
        """Own LM heads start as copies of the base model's [V, H] projection."""
        if self.lm_heads is not None:
            with torch.no_grad():
                for weight in self.lm_heads:
                    weight.copy_(base_weight)

    def lm_weight(self, head: int, base_weight: torch.Tensor) -> torch.Tensor:
        """The [V, H] projection head `head` (0-based) reads through."""
        return base_weight if self.lm_heads is None else self.lm_heads[head]


class MedusaHeads(DraftHeads):
    def __init__(self, config: HeadsConfig):
        super().__init__(config)
        self.heads = nn.ModuleList(
            nn.Sequential(*[ResidualBlock(config.hidden_size) for _ in range(config.num_blocks)])
            for _ in range(config.num_heads)
        )

    def states(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> [N, K, H]: head k's state guesses token t+1+k (k = 1..K)."""
        return torch.stack([head(hidden) for head in self.heads], dim=1)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks as `ops.draft_heads_topk` takes them: weights [K, L, H, H], biases [K, L, H]."""
        weights = torch.stack([torch.stack([block.linear.weight for block in head]) for head in self.heads])
        biases = torch.stack([torch.stack([block.linear.bias for block in head]) for head in self.heads])
        return weights.detach(), biases.detach()


class HydraHeads(DraftHeads):
    """Head k: s_k = blocks_k(W_k [s_{k-1}; e(x_{k})]), s_0 = h, x_1 the token the LM head chose
    from h (the step's root), x_k the token drafted from s_{k-1}; s_k guesses x_{k+1}."""

    def __init__(self, config: HeadsConfig):
        super().__init__(config)
        size = config.hidden_size
        self.inputs = nn.ModuleList(nn.Linear(2 * size, size) for _ in range(config.num_heads))
        for layer in self.inputs:  # start as "keep the state": [I, 0]
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
            with torch.no_grad():
                layer.weight[:, :size].copy_(torch.eye(size))
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResidualBlock(size) for _ in range(config.num_blocks)]) for _ in range(config.num_heads)
        )

    def stacked(self, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Head `head`'s blocks as `ops.draft_heads_topk` takes them: [1, L, H, H], [1, L, H]."""
        blocks = self.blocks[head]
        weights = torch.stack([block.linear.weight for block in blocks]).unsqueeze(0)
        biases = torch.stack([block.linear.bias for block in blocks]).unsqueeze(0)
        return weights.detach(), biases.detach()

    def step(self, head: int, state: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
        """One head over a frontier: state [N, H] (s_{k-1}), token_embedding [N, H] (e(x_k)) -> s_k.
        `head` is 0-based (head 0 guesses token t+2)."""
        return self.blocks[head](self.inputs[head](torch.cat([state, token_embedding], dim=-1)))

    def states(self, hidden: torch.Tensor, token_embeddings: torch.Tensor) -> torch.Tensor:
        """Teacher-forced (training): hidden [N, H], token_embeddings [N, K, H] (e(x_1) .. e(x_K))
        -> [N, K, H]."""
        state, out = hidden, []
        for head in range(self.config.num_heads):
            state = self.step(head, state, token_embeddings[:, head])
            out.append(state)
        return torch.stack(out, dim=1)


def build_heads(config: HeadsConfig) -> DraftHeads:
    return (MedusaHeads if config.kind == "medusa" else HydraHeads)(config)


def save(heads: DraftHeads, directory: str | Path, extra: dict | None = None,
         dtype: torch.dtype | None = None) -> Path:
    """Weights as safetensors (in `dtype`, default their own), the config (plus `extra`, e.g.
    accuracies) as JSON, and the token frequencies where the heads have them, in `directory`."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in heads.state_dict().items()},
              directory / WEIGHTS_NAME)
    (directory / CONFIG_NAME).write_text(json.dumps({**asdict(heads.config), **(extra or {})}, indent=2) + "\n")
    if heads.token_frequencies is not None:
        save_frequencies(heads.token_frequencies, directory)
    else:  # a file left by other heads would rank these heads' draft vocabulary
        (directory / FREQUENCIES_NAME).unlink(missing_ok=True)
    return directory


def load(directory: str | Path, dtype: torch.dtype | None = None, device=None) -> DraftHeads:
    """Heads saved by `save`; ValueError naming what is missing or does not fit."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.exists() or not weights_path.exists():
        raise ValueError(f"{directory} does not hold draft heads ({CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        raw = json.loads(config_path.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"a JSON object was expected, not {type(raw).__name__}")
        fields = HeadsConfig.__dataclass_fields__
        missing = sorted(name for name, f in fields.items() if f.default is MISSING and name not in raw)
        if missing:
            raise ValueError(f"{', '.join(missing)} missing")
        config = HeadsConfig(**{k: v for k, v in raw.items() if k in fields})
    except (UnicodeDecodeError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{config_path} is not a valid heads config: {error}") from None
    heads = build_heads(config)
    heads.meta = {k: v for k, v in raw.items() if k not in fields}  # training figures (accuracies, cost)
    state = load_file(weights_path)
    missing, unexpected = heads.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not match its config: missing {missing}, unexpected {unexpected}")
    heads.token_frequencies = load_frequencies(directory)
    check_frequencies(heads.token_frequencies, config.vocab_size, str(directory / FREQUENCIES_NAME))
    return heads.to(device=device, dtype=dtype).eval()
