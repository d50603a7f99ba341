"""drafter=None: no drafts; treedec's own loop decodes one token per step."""

from .base import Drafter


class NoDrafter(Drafter):
    name = "none"
