"""SamplingParams and the per-step token choice: repetition penalty, temperature, top-k, top-p."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks for. temperature 0 = greedy; seed None = nondeterministic."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("temperature >= 0, 0 < top_p <= 1 and top_k >= 0 are required")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.seed is not None and self.seed < 0:
            raise ValueError("seed must be >= 0 (or None)")


def choose(logits: np.ndarray, seen: list[int], p: SamplingParams, rng: np.random.Generator
           ) -> int:
    """One token from float32 logits [V]. The repetition penalty is the CTRL/transformers one:
    seen tokens' positive logits are divided by it, negative ones multiplied."""
    x = logits.astype(np.float64, copy=True)
    if p.repetition_penalty != 1.0 and seen:
        idx = np.unique(np.asarray(seen, dtype=np.int64))
        vals = x[idx]
        x[idx] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if p.temperature == 0.0:
        return int(np.argmax(x))
    x = x / p.temperature
    if p.top_k and p.top_k < x.size:
        kth = np.partition(x, -p.top_k)[-p.top_k]
        x = np.where(x < kth, -np.inf, x)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cum, p.top_p) + 1)]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(probs.size, p=probs))
