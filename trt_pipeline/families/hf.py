"""A Hugging Face model directory as a lazy tensor source: safetensors only, never pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint.io import TOKENIZER_FILES
from ..errors import BadInput, Problem

if TYPE_CHECKING:
    import torch

PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")

def read_hf_config(model_dir: Path, key: str = "model.source") -> dict[str, Any]:
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise BadInput([Problem(key, f"{model_dir} is not a directory", None)])
    if not path.is_file():
        raise BadInput([Problem(key, f"{model_dir} has no config.json",
                                "Point model.source at a Hugging Face model directory.")])
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput([Problem(key, f"config.json is not valid JSON ({exc})", None,
                                str(path))]) from None
    if not isinstance(cfg, dict):
        raise BadInput([Problem(key, "config.json is not a JSON object", None, str(path))])
    archs, model_type = cfg.get("architectures"), cfg.get("model_type")
    if archs is not None and not (isinstance(archs, list)
                                  and all(isinstance(a, str) for a in archs)):
        raise BadInput([Problem(key, f"config.json architectures: got {archs!r}; expected a list "
                                "of class names", None, str(path))])
    if model_type is not None and not isinstance(model_type, str):
        raise BadInput([Problem(key, f"config.json model_type: got {model_type!r}; expected a "
                                "string", None, str(path))])
    if qc := cfg.get("quantization_config"):
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise BadInput([Problem(key, f"already quantized ({method}) Hugging Face checkpoint",
                                "Use the float checkpoint; quantize with quantize.method.",
                                str(path))])
    return cfg


class HFSource:
    """Tensor names, shapes and lazy reads over one or many safetensors shards."""

    def __init__(self, model_dir: Path) -> None:
        from safetensors import safe_open

        self.dir = Path(model_dir)
        self.config = read_hf_config(self.dir)
        shards = self._shards()
        self._files: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        for shard in shards:
            try:
                f = safe_open(str(self.dir / shard), framework="pt")
            except Exception as exc:  # safetensors' own error types
                raise BadInput([Problem("model.source", f"{shard} is not a readable safetensors "
                                        f"file ({exc})", "Re-download the shard.",
                                        str(self.dir / shard))]) from None
            self._files[shard] = f
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                self._where[name] = shard

    def _shards(self) -> list[str]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise BadInput([Problem("model.source", f"bad safetensors index ({exc})", None,
                                        str(index))]) from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (self.dir / s).is_file()]
            if missing:
                raise BadInput([Problem("model.source", f"missing shard {m}",
                                        "Re-download the model.", str(self.dir))
                                for m in missing])
            return shards
        shards = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if shards:
            return shards
        pickles = [p.name for pat in PICKLE_PATTERNS for p in self.dir.glob(pat)]
        if pickles:
            raise BadInput([Problem("model.source", f"weights only in pickle format "
                                    f"({pickles[0]}); pickle can run code and is never loaded",
                                    "Convert them to safetensors with a tool you trust.",
                                    str(self.dir))])
        raise BadInput([Problem("model.source", "no *.safetensors weights", None, str(self.dir))])

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._files[self._where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return str(self._files[self._where[name]].get_slice(name).get_dtype())

    def get(self, name: str) -> torch.Tensor:
        return self._files[self._where[name]].get_tensor(name)

    def shard_of(self, name: str) -> str:
        return self._where[name]

    def tokenizer_files(self) -> list[Path]:
        return [self.dir / n for n in TOKENIZER_FILES if (self.dir / n).is_file()]
