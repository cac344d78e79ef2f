"""The contract between the runner and a runtime: one forward step over a batch with a KV cache."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class StepModel(Protocol):
    runtime: str  # what actually runs it: reference, onnxruntime, tensorrt_rtx
    vocab_size: int
    max_seq_len: int
    max_batch_size: int

    def new_cache(self, batch: int) -> Any:
        """An empty KV cache for `batch` sequences."""

    def step(self, input_ids: np.ndarray, cache: Any, valid: np.ndarray,
             last_only: bool = False) -> np.ndarray:
        """Append input_ids [B, S] (int64; `valid` [B, S] False for left padding) to the cache and
        return float32 logits [B, S, V] ([B, 1, V] with last_only; a runtime may ignore it)."""
