"""The CPU reference model as a runtime: runs a checkpoint dir; builds nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..reference.model import KVCache, ReferenceModel


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


def open_runtime(engine_dir: Path, runtime: dict[str, Any]) -> ReferenceStep:
    return ReferenceStep(ReferenceModel.load(Path(engine_dir) / runtime.get("checkpoint", ".")))
