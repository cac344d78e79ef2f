"""Text the package ships and token windows cut from it: calibration and held-out evaluation.

Local files or seeded random ids only, never a download. Text is tokenized with the model's own
tokenizer.json and cut into non-overlapping windows, so results are reproducible.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BadInput, Problem

if TYPE_CHECKING:
    import torch

DATA = Path(__file__).resolve().parent / "data"
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


def tokenize(text: str, model_dir: Path, vocab_size: int, key: str) -> torch.Tensor:
    """Token ids [n] of `text` with the model's tokenizer (no special tokens added)."""
    import torch
    from tokenizers import Tokenizer

    path = Path(model_dir) / TOKENIZER
    if not path.is_file():
        raise BadInput([Problem(key, f"text needs a tokenizer, but {model_dir} has no {TOKENIZER}",
                                f"Set {key}=random (seeded random token ids) or use a model "
                                "directory that has tokenizer.json.")])
    ids = torch.tensor(Tokenizer.from_file(str(path)).encode(text, add_special_tokens=False).ids,
                       dtype=torch.long)
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise BadInput([Problem(key, f"{path} produced token id {int(ids.max())}, but the model "
                                f"has vocab_size {vocab_size}", "Use the model's own tokenizer.")])
    return ids


def windows(ids: torch.Tensor, count: int, length: int, seed: int | None, key: str,
            source: str) -> torch.Tensor:
    """`count` non-overlapping windows [count, length] of ids; chosen at random with `seed`, or
    the first ones in order when seed is None."""
    import torch

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
    import torch

    return torch.randint(0, vocab_size, (count, length),
                         generator=torch.Generator().manual_seed(seed))


def eval_windows(text: str, model_dir: Path, vocab_size: int, tokens: int, window: int,
                 key: str) -> torch.Tensor:
    """Held-out evaluation windows [tokens // window, window] from the start of the text
    ("builtin" = data/heldout.txt, never used for calibration) or seeded random ids."""
    count = max(1, tokens // window)
    if text == "random":
        return random_ids(count, window, vocab_size, seed=1)
    ids = tokenize(read_text(text, BUILTIN["heldout"], key), model_dir, vocab_size, key)
    return windows(ids, count, window, None, key, "evaluation text")
