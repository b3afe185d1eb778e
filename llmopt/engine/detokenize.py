"""Streaming text out of token ids: UTF-8-safe deltas and stop strings that cut exactly.

Byte-level tokenizers split multi-byte characters across tokens; decoding a prefix then shows
U+FFFD where the character is incomplete. The detokenizer decodes a short window of recent
tokens twice (without and with the new ones) and releases the difference only once it no longer
ends in an incomplete character, so no delta ever carries a broken character and the work per
token stays constant.

The stop matcher holds back the tail of the text that could still grow into a stop string, and
when one appears, ends the text right before it.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-6:])  # a little context so the first word decodes as it would mid-text
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens))

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text (possibly empty)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""  # an incomplete character (or a token that renders as nothing yet)
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """At the end of a sequence: whatever is still held back, even an incomplete character."""
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""


class StopMatcher:
    """Accumulates text; releases what can no longer be part of a stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.text = ""  # everything received so far
        self.released = 0  # how much of it has been released

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text that may be released now, whether a stop string was found)."""
        self.text += delta
        if self.stops:
            search_from = max(0, self.released - max(len(s) for s in self.stops) + 1)
            hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
            if hits:
                end = min(hits)
                out = self.text[self.released : end]
                self.text = self.text[:end]
                self.released = end
                return out, True
        safe = len(self.text) - self._held_back()
        out = self.text[self.released : safe]
        self.released = max(self.released, safe)
        return out, False

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def finish(self) -> str:
        """The sequence ended for another reason: release the held-back tail."""
        out = self.text[self.released :]
        self.released = len(self.text)
        return out
