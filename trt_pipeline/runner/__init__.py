"""Runner: one generate() over every runtime, reading only an engine dir (or a checkpoint dir).

Requests are batched with left padding; each step feeds one token per sequence to the runtime's
KV cache and samples per request (runner/sampling.py). Tokens stream out as TokenEvents with the
text they add, so the CLI, the server and the bench all see the same stream.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import open_runtime
from ..errors import BadInput, Problem
from ..manifest import MANIFEST, is_engine_dir, read_engine_manifest
from .detok import IncrementalDecoder
from .sampling import SamplingParams, choose
from .step import StepModel

__all__ = ["Runner", "SamplingParams", "TokenEvent"]


@dataclass(frozen=True)
class TokenEvent:
    request: int
    token_id: int
    text: str
    index: int
    finished: bool
    finish_reason: str | None = None  # "stop" (EOS, stop id or string) or "length"


class Runner:
    def __init__(self, model: StepModel, tokenizer: Any | None, eos_ids: set[int],
                 info: dict[str, Any]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.info = info

    @classmethod
    def open(cls, path: str | Path) -> Runner:
        """An engine dir (its manifest says which runtime) or a TensorRT-LLM checkpoint dir
        (run by the CPU reference model)."""
        path = Path(path)
        if is_engine_dir(path):
            manifest = read_engine_manifest(path)
            runtime, info = manifest.runtime, {"recipe": manifest.recipe,
                                               "backend": manifest.backend}
        elif (path / "config.json").is_file() and "architecture" in json.loads(
                (path / "config.json").read_text()):
            runtime, info = {"kind": "reference"}, {"backend": "reference"}
        else:
            raise BadInput([Problem("ENGINE_DIR", f"{path} is neither an engine dir (no engine "
                                    f"{MANIFEST}) nor a TensorRT-LLM checkpoint", None)])
        model = open_runtime(path, runtime)
        tokenizer = _load_tokenizer(path)
        info.update(runtime=model.runtime, path=str(path))
        return cls(model, tokenizer, _eos_ids(path, tokenizer), info)

    def encode(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids of a prompt; with chat, the tokenizer's own chat template is applied."""
        if not chat:
            return list(self._tokenizer("prompt").encode(prompt, add_special_tokens=True))
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        return self.apply_chat(messages, "--chat")

    def apply_chat(self, messages: list[dict[str, str]], key: str = "messages") -> list[int]:
        """Token ids of a conversation through the tokenizer's own chat template."""
        tokenizer = self._tokenizer(key)
        if not getattr(tokenizer, "chat_template", None):
            raise BadInput([Problem(key, "the tokenizer has no chat template",
                                    "Send a plain prompt instead.")])
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))

    def _tokenizer(self, key: str) -> Any:
        if self.tokenizer is None:
            raise BadInput([Problem(key, "this engine dir has no tokenizer",
                                    "Pass token ids instead of text.")])
        return self.tokenizer

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True) if self.tokenizer else ""

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> Iterator[TokenEvent]:
        """Stream tokens of every request; batches of at most the runtime's max_batch_size."""
        params = params or SamplingParams()
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError("one SamplingParams per prompt, or one for all")
        for p, ids in zip(plist, prompts, strict=True):
            if not ids:
                raise BadInput([Problem("prompt", "empty prompt", None)])
            if len(ids) + p.max_new_tokens > self.model.max_seq_len:
                raise BadInput([Problem("max_new_tokens", f"prompt ({len(ids)}) + max_new_tokens "
                                        f"({p.max_new_tokens}) exceeds the engine's max_seq_len "
                                        f"{self.model.max_seq_len}", None)])
        size = self.model.max_batch_size
        run = self._generated_batch if hasattr(self.model, "stream") else self._batch
        for start in range(0, len(prompts), size):
            yield from run(list(prompts[start:start + size]), plist[start:start + size], start)

    def _generated_batch(self, prompts: list[Sequence[int]], params: list[SamplingParams],
                         offset: int) -> Iterator[TokenEvent]:
        """For runtimes that own the decoding loop (TensorRT-LLM's executor): one call per
        distinct SamplingParams; EOS and sampling happen there, stop strings here."""
        from ..backends.trtllm import Request

        eos = min(self.eos_ids) if self.eos_ids else 0
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else None
        for p in dict.fromkeys(params):
            rows = [i for i, q in enumerate(params) if q == p]
            request = Request(max_new_tokens=p.max_new_tokens,
                              end_id=-1 if p.ignore_eos else eos,
                              pad_id=eos if pad is None else pad, temperature=p.temperature,
                              top_k=p.top_k, top_p=p.top_p,
                              repetition_penalty=p.repetition_penalty, seed=p.seed or 0)
            streams = {i: _Stream(self, list(prompts[i]), p) for i in rows}
            for outputs in self.model.stream([list(prompts[i]) for i in rows], request):
                for i, ids in zip(rows, outputs, strict=True):
                    s = streams[i]
                    for token in ids[len(s.out):]:
                        if not s.done:
                            yield s.accept(token, offset + i)
            for i, s in streams.items():  # the executor stopped it (EOS) without our knowing
                if not s.done:
                    s.done = True
                    yield TokenEvent(offset + i, s.out[-1] if s.out else -1, "",
                                     len(s.out) - 1, True, "stop")

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else None
        return 0 if pad is None else pad

    def _batch(self, prompts: list[Sequence[int]], params: list[SamplingParams], offset: int
               ) -> Iterator[TokenEvent]:
        b, pad = len(prompts), self.pad_id
        ids, valid = left_padded(prompts, pad)
        streams = [_Stream(self, list(p), params[i]) for i, p in enumerate(prompts)]
        cache = self.model.new_cache(b)
        logits = self.model.step(ids, cache, valid, last_only=True)[:, -1]
        while True:
            nxt = np.full((b, 1), pad, dtype=np.int64)
            alive = np.zeros((b, 1), dtype=bool)
            for i, s in enumerate(streams):
                if s.done:
                    continue
                event = s.advance(logits[i], offset + i)
                yield event
                if not event.finished:
                    nxt[i, 0], alive[i, 0] = event.token_id, True
            if not alive.any():
                return
            logits = self.model.step(nxt, cache, alive, last_only=True)[:, -1]


def left_padded(prompts: Sequence[Sequence[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, W] int64, valid [B, W] bool) with each prompt right-aligned."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, dtype=np.int64)
    valid = np.zeros((len(prompts), width), dtype=bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        valid[i, width - len(p):] = True
    return ids, valid


class _Stream:
    """One request's state: sampling RNG, generated ids, text, stop checks. While a stop string
    could still complete, the text that could begin it is held back (as vLLM does), so a
    stream never sends part of a stop string; joined, its events are the final text."""

    def __init__(self, runner: Runner, prompt: list[int], params: SamplingParams) -> None:
        self.runner, self.params = runner, params
        self.seen = list(prompt)
        self.out: list[int] = []
        self.text = ""  # the output's text so far (cut at a stop string)
        self.sent = 0  # how much of it events carried
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.done = False
        self.rng = np.random.default_rng(params.seed)
        self.detok = IncrementalDecoder(runner.decode, prompt)

    def advance(self, logits: np.ndarray, request: int) -> TokenEvent:
        return self.accept(choose(logits, self.seen, self.params, self.rng), request)

    def accept(self, token: int, request: int) -> TokenEvent:
        p = self.params
        self.seen.append(token)
        self.out.append(token)
        reason = None
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.runner.eos_ids):
            reason = "stop"
        elif len(self.out) >= p.max_new_tokens:
            reason = "length"
        start = len(self.text)
        self.text += self.detok.push(token, final=reason is not None)
        # a stop string can only newly match where it overlaps the new text
        cuts = [c for c in (self.text.find(s, max(0, start - len(s) + 1)) for s in p.stop if s)
                if c != -1]
        if cuts:
            self.text, reason = self.text[:min(cuts)], "stop"
        end = len(self.text) if reason is not None else len(self.text) - self.holdback
        delta = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        self.done = reason is not None
        return TokenEvent(request, token, delta, len(self.out) - 1, self.done, reason)


def _load_tokenizer(path: Path) -> Any | None:
    if not (path / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def _eos_ids(path: Path, tokenizer: Any | None) -> set[int]:
    ids: set[int] = set()
    gen = path / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
