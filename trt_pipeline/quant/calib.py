"""Calibration and evaluation tokens: local text or seeded random ids, never a download.

Text is tokenized with the checkpoint's own `tokenizer.json` (the converter copies it there) and cut
into non-overlapping windows, so no calibration token is seen twice and results are reproducible.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import BadInput, Problem

DATA = Path(__file__).resolve().parents[1] / "data"
BUILTIN = {"calib": DATA / "calib.txt", "heldout": DATA / "heldout.txt"}
TOKENIZER = "tokenizer.json"


def read_text(spec: str, builtin: Path, key: str) -> str:
    """The text a spec names: "builtin" (a shipped file) or a path; clear errors otherwise."""
    path = builtin if spec == "builtin" else Path(spec).expanduser()
    if not path.is_file():
        raise BadInput([Problem(key, f"{path} does not exist or is not a file",
                                f"Give a UTF-8 text file, builtin, or random ({key}=random).")])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput([Problem(key, f"{path} is not UTF-8 text ({exc.reason})", None)]) from None
    if not text.strip():
        raise BadInput([Problem(key, f"{path} is empty", "Give a file with text in it.")])
    return text


def tokenize(text: str, ckpt_dir: Path, vocab_size: int, key: str) -> torch.Tensor:
    """Token ids [n] of `text` with the checkpoint's tokenizer (no special tokens added)."""
    from tokenizers import Tokenizer

    path = Path(ckpt_dir) / TOKENIZER
    if not path.is_file():
        raise BadInput([Problem(key, f"text needs a tokenizer, but {ckpt_dir} has no {TOKENIZER}",
                                f"Set {key}=random (seeded random token ids) or convert the "
                                "model from a Hugging Face dir that has tokenizer.json.")])
    ids = torch.tensor(Tokenizer.from_file(str(path)).encode(text, add_special_tokens=False).ids,
                       dtype=torch.long)
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise BadInput([Problem(key, f"{path} produced token id {int(ids.max())}, but the model "
                                f"has vocab_size {vocab_size}", "Use the model's own tokenizer.")])
    return ids


def windows(ids: torch.Tensor, count: int, length: int, seed: int | None, key: str,
            source: str) -> torch.Tensor:
    """`count` non-overlapping windows [count, length] of ids; chosen at random with `seed`, or the
    first ones in order when seed is None."""
    available = ids.numel() // length
    if available < count:
        raise BadInput([Problem(key, f"{source} has {ids.numel()} tokens, {available} windows of "
                                f"{length}; {count} are needed",
                                "Use a longer text or fewer samples / a shorter seq_len.")])
    blocks = ids[: available * length].view(available, length)
    if seed is None:
        return blocks[:count].clone()
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))
    return blocks[order[:count]].clone()


def random_ids(count: int, length: int, vocab_size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (count, length),
                         generator=torch.Generator().manual_seed(seed))


def calibration_ids(data: str, ckpt_dir: Path, vocab_size: int, samples: int, seq_len: int,
                    seed: int, key: str = "quantize.calib.data") -> torch.Tensor:
    """Calibration batch [samples, seq_len] from "builtin", "random" or a text file path."""
    if data == "random":
        return random_ids(samples, seq_len, vocab_size, seed)
    ids = tokenize(read_text(data, BUILTIN["calib"], key), ckpt_dir, vocab_size, key)
    return windows(ids, samples, seq_len, seed, key, "calibration text")

