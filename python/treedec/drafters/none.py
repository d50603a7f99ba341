"""drafter=None: no drafts; treedec's own loop decodes one token per step."""

from .base import Drafter, DrafterSpec


class NoDrafter(Drafter):
    name = "none"


SPEC = DrafterSpec(None, (), lambda options, env: NoDrafter())
