"""Streaming text from token ids in constant time per token.

Decoding the whole output at every token costs O(n) per token (O(n^2) per request: at 4000
tokens about 1 ms per token, per request, on the host thread that feeds the GPU). Instead each
token decodes a short window: the ids since the last emitted boundary, after a few ids of
context, and emits what the window added (the technique of TGI's and vLLM's detokenizers).
The context starts with the prompt's last ids, so a first token that begins a word keeps its
space under SentencePiece-style (Metaspace) tokenizers, whose decode drops a leading space.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

PROMPT_CONTEXT = 4  # prompt ids decoded before the first new one


class IncrementalDecoder:
    """`push(id)` returns the text that id adds: joined, the pushes equal
    decode(prompt + ids) minus decode(prompt). Text that ends inside a character (a byte-level
    token split across ids) is held back until the character completes or `final` is set."""

    def __init__(self, decode: Callable[[Sequence[int]], str], prompt: Sequence[int]) -> None:
        self.decode = decode
        self.ids = list(prompt[-PROMPT_CONTEXT:])
        self.prefix = 0  # window start: context before the text not yet emitted
        self.read = len(self.ids)  # ids before this have had their text emitted

    def push(self, token: int, final: bool = False) -> str:
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return ""
        # the emitted window becomes the next one's context; ids before it are done with
        del self.ids[:self.prefix]
        self.prefix, self.read = self.read - self.prefix, len(self.ids)
        return after[len(before):]
