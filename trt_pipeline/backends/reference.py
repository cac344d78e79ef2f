"""The CPU reference model as a runtime: runs a checkpoint dir; builds nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..reference.model import KVCache, ReferenceModel
from .rebatch import ArrayOps, Rows, join_rows, keep_rows

TORCH_OPS = ArrayOps(cat=lambda xs, axis: torch.cat(list(xs), axis),
                     zeros=lambda shape, like: like.new_zeros(shape))


class ReferenceStep:
    """StepModel over ReferenceModel (float32 on the CPU, quantized weights dequantized)."""

    runtime = "reference"

    def __init__(self, model: ReferenceModel) -> None:
        self.model = model
        self.vocab_size = model.desc.vocab_size
        self.max_seq_len = model.desc.max_position_embeddings
        self.max_batch_size = 1 << 16

    def new_cache(self, batch: int) -> KVCache:
        return KVCache()

    def step(self, input_ids: np.ndarray, cache: KVCache, valid: np.ndarray,
             last_only: bool = False) -> np.ndarray:
        logits = self.model.forward(torch.from_numpy(input_ids).long(), cache,
                                    torch.from_numpy(valid).bool(), last_only)
        return logits.numpy()

    def keep(self, cache: KVCache, rows: list[int]) -> KVCache:
        """In-flight batching (backends/rebatch.py): the cache of `rows` only."""
        return _cache(keep_rows(_rows(cache), rows))

    def join(self, caches: list[KVCache]) -> KVCache:
        """In-flight batching: one cache with the rows of every cache in order."""
        return _cache(join_rows([_rows(c) for c in caches], TORCH_OPS))


def _rows(c: KVCache) -> Rows[torch.Tensor]:
    assert c.valid is not None, "an empty cache has no rows"
    return Rows(list(c.keys), list(c.values), c.valid)


def _cache(r: Rows[torch.Tensor]) -> KVCache:
    return KVCache(r.keys, r.values, r.valid)


def open_runtime(engine_dir: Path, runtime: dict[str, Any]) -> ReferenceStep:
    return ReferenceStep(ReferenceModel.load(Path(engine_dir) / runtime.get("checkpoint", ".")))
