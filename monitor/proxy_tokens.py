"""Proxy mode: the local tokenization of a text that arrives in arbitrary pieces from an upstream server.

The monitor must read the tokens the local model would read for the whole text (what shadow scoring of
the finished text reads), but a word split across two deltas tokenizes differently from the whole word
("unbeliev" + "able"). So a token is *settled* only once text after it cannot change it: with a regex
pre-tokenizer (byte-level BPE: GPT-2, Llama 3, SmolLM, Qwen; Metaspace) tokens never cross pre-token
boundaries, and only the last two pre-tokens of the text so far can still change (the last may grow; the
one before may merge with it, e.g. "'" + "r" → "'re" once an "e" arrives). Everything before the start
of the second-to-last pre-token is settled, and the unsettled tail is re-tokenized alone on each delta
(regex matches after a match boundary depend only on the text from there on), so the work per delta is
O(tail), not O(text). `finish` settles the rest. For tokenizers without a pre-tokenizer the boundary
falls back to the third-to-last token (approximate: such tokenizers may merge across it).

Each settled token carries the text it completes, cut at character offsets: a multi-byte character split
over several byte tokens belongs to the last of them, so no text is released before every token covering
it has been monitored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FALLBACK_UNSETTLED = 3  # tokens kept open when the tokenizer has no pre-tokenizer to find boundaries


@dataclass(frozen=True)
class Settled:
    token_id: int
    text: str  # the text this token completes ("" inside a multi-byte character)


class IncrementalTokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # A normalizer changes lengths, so the pre-tokenizer's offsets would not index the raw text.
        plain = backend is not None and backend.normalizer is None
        self.pre = getattr(backend, "pre_tokenizer", None) if plain else None
        self.text = ""  # everything received
        self.anchor = 0  # characters of `text` covered by settled tokens
        self.count = 0  # tokens settled so far

    @property
    def pending(self) -> str:
        """Received text not yet covered by a settled token."""
        return self.text[self.anchor :]

    def push(self, delta: str) -> list[Settled]:
        """Add upstream text; returns the tokens that became settled (in order)."""
        self.text += delta
        return self._settle(final=False)

    def finish(self) -> list[Settled]:
        """The text is complete: every remaining token is settled."""
        return self._settle(final=True)

    def _settle(self, final: bool) -> list[Settled]:
        tail = self.pending
        if not tail:
            return []
        enc = self.tok(tail, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = list(enc["input_ids"])
        offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
        limit = len(tail) if final else self._boundary(tail, offsets)
        n = sum(1 for _, end in offsets if end <= limit) if not final else len(ids)
        if n == 0:
            return []
        out, cut = [], 0
        for i in range(n):
            # The settled tokens cover exactly tail[:limit]; any other token ends where the next starts
            # at the latest (tokens sharing a multi-byte character).
            end = limit if i == n - 1 else min(offsets[i][1], offsets[i + 1][0])
            end = max(end, cut)
            out.append(Settled(int(ids[i]), tail[cut:end]))
            cut = end
        self.anchor += limit
        self.count += n
        return out

    def _boundary(self, tail: str, offsets: list[tuple[int, int]]) -> int:
        """Characters of `tail` that later text cannot re-tokenize: up to the second-to-last pre-token."""
        if self.pre is not None:
            pieces = self.pre.pre_tokenize_str(tail)
            return int(pieces[-2][1][0]) if len(pieces) >= 2 else 0
        if len(offsets) <= FALLBACK_UNSETTLED:
            return 0
        return int(offsets[-FALLBACK_UNSETTLED][0])
