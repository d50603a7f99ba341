"""Stopping criteria called as HF's generate calls them, for a batch whose rows advance unevenly.

HF calls the criteria once per generated position n, with the whole batch: input_ids [B, L + n]
and scores=None (HF passes scores only with output_scores, where treedec falls back). A row that
stopped before n holds pad_token_id from there when the call stops at an EOS id; otherwise it
holds the tokens it went on generating, since HF stops only when every row has stopped. The rows
of a tree-decoding batch reach position n at different steps, so `BatchStopping` calls the
criteria for n once every row has reached n or has settled before it: stateful and batch-aware
criteria see HF's calls, in HF's order, and stop the rows HF stops where HF stops them.
"""

from __future__ import annotations

import torch


class BatchStopping:
    def __init__(self, criteria: list, input_ids: torch.Tensor, max_new_tokens: int, pad_token_id: int,
                 finished_rows_pad: bool):
        """`input_ids` [B, L] as the caller passed them (left padding included; the criteria get
        them on their device); `finished_rows_pad`: whether a stopped row is padded (see above)."""
        self.criteria = list(criteria)
        batch, self.prompt_len = input_ids.shape
        self.device = input_ids.device
        # [B, >= L + n]: what HF's input_ids hold at position n, pad beyond each row's tokens; it
        # grows as positions are reached (doubling, up to L + max_new_tokens), not reserved up front
        self.max_len = self.prompt_len + max_new_tokens
        self.ids = torch.full((batch, min(self.max_len, 2 * self.prompt_len + 64)), pad_token_id, dtype=torch.int64)
        self.ids[:, : self.prompt_len] = input_ids.cpu()
        self.written = [0] * batch  # generated tokens of each row copied into `ids`
        self.pad_token_id = pad_token_id
        self.finished_rows_pad = finished_rows_pad
        self.checked = 0  # positions the criteria have been called for
        self.stopped = [False] * batch  # rows the criteria stopped (HF's unfinished_sequences, negated)

    def update(self, generated: list[list[int]], settled: set[int]) -> set[int]:
        """Call the criteria for every position that each row has reached or settled before.

        generated[b]: row b's tokens so far (cut in place where the criteria stop it); settled: the
        rows whose tokens are final (EOS, max_new_tokens, stopped here). Returns the rows this call
        settled."""
        newly: set[int] = set()
        while True:
            n = self.checked + 1
            lagging = any(len(tokens) < n and row not in settled and row not in newly
                          for row, tokens in enumerate(generated))
            if lagging or not any(len(tokens) >= n for tokens in generated):  # not there yet, or HF had stopped
                return newly
            self._write(generated, n)
            done = self._call(self.ids[:, : self.prompt_len + n].to(self.device))
            self.checked = n
            for row in done.nonzero().view(-1).tolist():
                if self.stopped[row] or len(generated[row]) < n:  # stopped before, or padded since
                    continue
                self.stopped[row] = True
                if self.finished_rows_pad:
                    self._cut(generated, row, n)
                    newly.add(row)
            if not self.finished_rows_pad and all(self.stopped):  # HF's loop ends here for every row
                for row in range(len(generated)):
                    self._cut(generated, row, n)
                    newly.add(row)

    def _call(self, input_ids: torch.Tensor) -> torch.Tensor:
        """bool [B] on the CPU: HF's StoppingCriteriaList call, the criteria's answers or-ed
        (each may give a bool tensor [B] or a Python bool)."""
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for criterion in self.criteria:
            done = done | criterion(input_ids, None)
        return done.view(-1).cpu()

    def _write(self, generated: list[list[int]], n: int) -> None:
        if self.prompt_len + n > self.ids.shape[1]:
            grown = self.ids.new_full((self.ids.shape[0], min(self.max_len, 2 * self.ids.shape[1])), self.pad_token_id)
            grown[:, : self.ids.shape[1]] = self.ids
            self.ids = grown
        for row, tokens in enumerate(generated):
            end = min(len(tokens), n)
            if end > self.written[row]:
                start = self.prompt_len + self.written[row]
                self.ids[row, start : self.prompt_len + end] = torch.tensor(tokens[self.written[row] : end])
                self.written[row] = end

    def _cut(self, generated: list[list[int]], row: int, n: int) -> None:
        del generated[row][n:]
        self.ids[row, self.prompt_len + n :] = self.pad_token_id
        self.written[row] = min(self.written[row], n)
