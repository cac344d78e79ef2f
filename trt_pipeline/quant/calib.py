"""Calibration tokens: the shipped calibration text, a local file, or seeded random ids.

Text is tokenized with the checkpoint's own `tokenizer.json` (the converter copies it there) and cut
into seeded non-overlapping windows (textdata.py), so no calibration token is seen twice and
results are reproducible.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..textdata import BUILTIN, random_ids, read_text, tokenize, windows


def calibration_ids(data: str, ckpt_dir: Path, vocab_size: int, samples: int, seq_len: int,
                    seed: int, key: str = "quantize.calib.data") -> torch.Tensor:
    """Calibration batch [samples, seq_len] from "builtin", "random" or a text file path."""
    if data == "random":
        return random_ids(samples, seq_len, vocab_size, seed)
    ids = tokenize(read_text(data, BUILTIN["calib"], key), ckpt_dir, vocab_size, key)
    return windows(ids, samples, seq_len, seed, key, "calibration text")
