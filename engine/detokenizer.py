"""A request's output text, built token by token, and its stop strings.

The family's TokenStream turns each new id into the text that is now final (a partial UTF-8
character or an open image span waits for the ids that complete it), so a step costs one id's
worth of decoding, not a decode of the whole output. Stop strings are looked for only where a match
could not have been seen before: in the text added since the last check plus the last
(longest stop string - 1) characters before it, and in the provisional text still held back. The
earliest match wins, as if the whole text were searched every step.

A streaming consumer is handed text up to `len(text) - (longest stop string - 1)` while the request
runs (vLLM's stop buffer): those last characters might become the start of a stop string and be cut.
So the deltas a consumer receives always concatenate to the final text.
"""

from __future__ import annotations

from .models.base import TokenStream


class Detokenizer:
    def __init__(self, stream: TokenStream, stop: list[str]):
        self.stream, self.stop = stream, stop
        self.text = ""  # final text so far (cut at a stop string once one matched)
        self.hold = max(map(len, stop)) - 1 if stop else 0
        self.searched = 0  # offset in `text` up to which stop strings have been looked for

    def push(self, token_id: int) -> None:
        self.text += self.stream.push(token_id)

    def find_stop(self) -> tuple[int, str] | None:
        """(offset, stop string) of the earliest stop string in the text so far, or None."""
        current = self.text + self.stream.pending()
        start = max(0, self.searched - self.hold)
        hits = [(at, s) for s in self.stop if (at := current.find(s, start)) >= 0]
        self.searched = len(self.text)  # the pending part may still change: it is searched again
        return min(hits) if hits else None

    def finish(self, cut: int | None = None) -> None:
        """Flush what the stream held back; with `cut`, end the text there (before a stop string)."""
        self.text += self.stream.finish()
        if cut is not None:
            self.text = self.text[:cut]

    def visible_text(self, finished: bool) -> str:
        """The text a consumer may see now."""
        if finished or not self.hold:
            return self.text
        return self.text[: max(0, len(self.text) - self.hold)]
