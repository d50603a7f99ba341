"""N-gram lookup in the prompt and the generated text (prompt lookup decoding, as a tree).

The last n tokens are looked up among earlier positions of the same sequence, for n from
`max_ngram` down to `min_ngram`; the continuations of up to `max_matches` matches (most recent
first) are merged into one trie, so diverging continuations become branches.
"""

from __future__ import annotations

from ..options import int_option
from .base import DrafterSpec, DraftTrie, RowDrafter

MAX_KEY_DEPTH = 8
OPTIONS = ("min_ngram", "max_ngram", "max_matches", "max_draft_len")


class LookupDrafter(RowDrafter):
    name = "lookup"

    def __init__(self, min_ngram: int = 1, max_ngram: int = 4, max_matches: int = 4, max_draft_len: int = 10):
        min_ngram, max_ngram = int_option("min_ngram", min_ngram), int_option("max_ngram", max_ngram)
        if min_ngram > max_ngram:
            raise ValueError(f"lookup needs 1 <= min_ngram <= max_ngram; got {min_ngram}, {max_ngram}")
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self.max_matches = int_option("max_matches", max_matches)
        self.max_draft_len = int_option("max_draft_len", max_draft_len)
        self.histories: list[list[int]] = []
        self.index: list[dict[tuple[int, ...], list[int]]] = []  # n-gram -> positions right after it

    def start(self, prompts: list[list[int]], hidden=None) -> None:
        self.histories = [[] for _ in prompts]
        self.index = [{} for _ in prompts]
        for seq, prompt in enumerate(prompts):
            self.extend(seq, prompt)

    def extend(self, seq: int, new_tokens) -> None:
        history, index = self.histories[seq], self.index[seq]
        for token in new_tokens:
            history.append(int(token))
            end = len(history)
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                index.setdefault(tuple(history[end - n : end]), []).append(end)

    def propose_row(self, seq: int, root_token: int, uniforms=None) -> DraftTrie:
        history, index = self.histories[seq], self.index[seq]
        trie = DraftTrie(root_token)
        end = len(history)
        taken = 0
        seen_starts: set[int] = set()
        for n in range(min(self.max_ngram, end), self.min_ngram - 1, -1):
            for start in reversed(index.get(tuple(history[end - n :]), ())):
                if start >= end or start in seen_starts:  # the suffix itself, or already used by a longer match
                    continue
                seen_starts.add(start)
                continuation = history[start : start + self.max_draft_len]
                keys = [("lookup", n, min(d, MAX_KEY_DEPTH)) for d in range(1, len(continuation) + 1)]
                trie.add_path(continuation, keys)
                taken += 1
                if taken >= self.max_matches:
                    return trie
        return trie


SPEC = DrafterSpec("lookup", OPTIONS, lambda options, env: LookupDrafter(**options))
