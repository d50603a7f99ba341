"""Trained draft heads: small modules on the model's last hidden state that guess the next tokens.

- "medusa": K independent heads; head k maps the hidden state h_t (the one whose LM-head output is
  token t+1) through residual SiLU blocks to a state whose LM-head output guesses token t+1+k.
- "hydra": sequentially dependent heads; head k also sees the embedding of the token drafted just
  before it on its path (for head 1, token t+1 itself), and the state of head k-1, so its guess
  follows the branch it extends.

Both share the base model's LM head (frozen); only the blocks train. Heads are saved as
safetensors weights next to a JSON config (`save` / `load`), with the tokens' frequencies in
their training text, which rank the draft vocabulary (`vocab`).
"""

from .modules import HEAD_KINDS, DraftHeads, HeadsConfig, HydraHeads, MedusaHeads, build_heads, load, save

__all__ = ["HEAD_KINDS", "DraftHeads", "HeadsConfig", "HydraHeads", "MedusaHeads", "build_heads", "load", "save"]
