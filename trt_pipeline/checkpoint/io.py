"""Read and write the checkpoint: config.json + rank{N}.safetensors, streamed and atomic.

The writer is ours because the safetensors package writes only from a complete in-memory dict;
streaming one tensor at a time keeps conversion and quantization at about one model of memory.
Files it writes are read back by the safetensors package in the tests.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BadInput, Problem
from ..fsio import FILE_MODE, write_text_atomic
from .desc import ModelDesc

if TYPE_CHECKING:
    import torch

CONFIG = "config.json"
# Carried beside every checkpoint and engine: the runner reads only the engine dir.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                   "generation_config.json", "added_tokens.json")
ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int8": "I8", "int32": "I32",
             "int64": "I64", "uint8": "U8", "bool": "BOOL"}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "int32": 4, "int64": 8,
               "uint8": 1, "bool": 1}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the prefix: float16, int8, ...

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def expected_tensors(desc: ModelDesc) -> dict[str, TensorSpec]:
    """Every tensor of a tp=1 checkpoint, by name, as TensorRT-LLM 1.2.1 requires it
    (facts/trtllm.md §7 for names and shapes, §8 for W4A16_AWQ)."""
    dt = desc.dtype
    h = desc.hidden_size
    out: dict[str, TensorSpec] = {
        "transformer.vocab_embedding.weight": TensorSpec((desc.vocab_size, h), dt),
        "transformer.ln_f.weight": TensorSpec((h,), dt),
    }
    for i in range(desc.num_layers):
        p = f"transformer.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = TensorSpec((h,), dt)
        out[f"{p}.post_layernorm.weight"] = TensorSpec((h,), dt)
        if desc.qk_norm:
            out[f"{p}.attention.q_layernorm.weight"] = TensorSpec((desc.head_size,), dt)
            out[f"{p}.attention.k_layernorm.weight"] = TensorSpec((desc.head_size,), dt)
        if desc.attn_bias:
            qkv = desc.q_size + 2 * desc.kv_size
            out[f"{p}.attention.qkv.bias"] = TensorSpec((qkv,), dt)
        for lin in desc.layer_linears(i):
            out.update(_linear_tensors(desc, lin.name, lin.in_features, lin.out_features,
                                       lin.experts))
    if not desc.tie_word_embeddings:
        out.update(_linear_tensors(desc, "lm_head", h, desc.vocab_size, 0))
    return out


def _linear_tensors(desc: ModelDesc, name: str, fan_in: int, fan_out: int, experts: int
                    ) -> dict[str, TensorSpec]:
    lead = (experts,) if experts else ()
    dt = desc.dtype
    if name.endswith("router"):
        return {f"{name}.weight": TensorSpec((*lead, fan_out, fan_in), "float32")}
    q = desc.quant
    if not q.quantized(name):
        return {f"{name}.weight": TensorSpec((*lead, fan_out, fan_in), dt)}
    if q.algo == "W4A16_AWQ":
        t = {
            f"{name}.weight": TensorSpec((*lead, fan_out // 2, fan_in), "int8"),
            f"{name}.weights_scaling_factor": TensorSpec(
                (*lead, fan_out, fan_in // q.group_size), dt),
        }
        if q.pre_quant_scale:
            t[f"{name}.prequant_scaling_factor"] = TensorSpec((*lead, fan_in), dt)
        return t
    # W8A16 / W4A16 per-channel: WeightOnlyQuantLinear, weight [in, out] (int4: out/2 bytes).
    cols = fan_out // 2 if q.algo == "W4A16" else fan_out
    return {
        f"{name}.weight": TensorSpec((*lead, fan_in, cols), "int8"),
        f"{name}.per_channel_scale": TensorSpec((*lead, fan_out), dt),
    }


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy (hard-link when possible) the tokenizer files src has into dst; returns their names."""
    from ..fsio import link_or_copy

    names = [n for n in TOKENIZER_FILES if (Path(src) / n).is_file()]
    for n in names:
        if not (Path(dst) / n).exists():
            link_or_copy(Path(src) / n, Path(dst) / n)
    return names


def read_config(ckpt_dir: Path) -> dict[str, Any]:
    path = ckpt_dir / CONFIG
    if not path.is_file():
        raise BadInput([Problem("", f"no {CONFIG}: not a TensorRT-LLM checkpoint dir", None,
                                str(ckpt_dir))])
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise BadInput([Problem("", f"{CONFIG} is not JSON ({exc})", None, str(path))]) from None


def write_config(ckpt_dir: Path, config: dict[str, Any]) -> None:
    write_text_atomic(ckpt_dir / CONFIG, json.dumps(config, indent=2) + "\n")


class Checkpoint:
    """Lazy read access to a checkpoint directory (rank 0 unless told otherwise)."""

    def __init__(self, ckpt_dir: Path, rank: int = 0) -> None:
        from safetensors import safe_open

        self.dir = Path(ckpt_dir)
        self.config = read_config(self.dir)
        self.desc = ModelDesc.from_config(self.config)
        path = self.dir / rank_file(rank)
        if not path.is_file():
            raise BadInput([Problem("", f"missing {path.name}", None, str(self.dir))])
        try:
            self._file = safe_open(str(path), framework="pt")
        except Exception as exc:  # safetensors raises its own error types
            raise BadInput([Problem("", f"{path.name} is not a readable safetensors file "
                                    f"({exc})", None, str(path))]) from None
        self.names = set(self._file.keys())

    def get(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(f"{name} not in {self.dir}")
        return self._file.get_tensor(name)

    def has(self, name: str) -> bool:
        return name in self.names

    def spec(self, name: str) -> TensorSpec:
        """Shape and dtype from the file header, without reading the tensor."""
        sl = self._file.get_slice(name)
        dtype = {v: k for k, v in ST_DTYPES.items()}[sl.get_dtype()]
        return TensorSpec(tuple(sl.get_shape()), dtype)

    def contract_problems(self) -> list[Problem]:
        """Every tensor the config implies, with its shape and dtype (expected_tensors)."""
        out = []
        for name, want in expected_tensors(self.desc).items():
            if name not in self.names:
                out.append(Problem("checkpoint", f"missing tensor {name}", None, str(self.dir)))
            elif (got := self.spec(name)) != want:
                out.append(Problem("checkpoint", f"{name} is {list(got.shape)} {got.dtype}; "
                                   f"config.json implies {list(want.shape)} {want.dtype}", None,
                                   str(self.dir)))
        return out


class StreamWriter:
    """Write a safetensors file tensor by tensor: the header (known up front) first, then each
    tensor's bytes in declaration order. The file appears under its name only when complete."""

    def __init__(self, path: Path, specs: dict[str, TensorSpec], metadata: dict[str, str] | None
                 = None) -> None:
        self.path = Path(path)
        self.specs = specs
        self._order = list(specs)
        self._next = 0
        header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name in self._order:
            s = specs[name]
            header[name] = {"dtype": ST_DTYPES[s.dtype], "shape": list(s.shape),
                            "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        os.chmod(self._tmp, FILE_MODE)
        self._f = os.fdopen(fd, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    @property
    def pending(self) -> list[str]:
        return self._order[self._next:]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        if self._next >= len(self._order) or self._order[self._next] != name:
            want = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise ValueError(f"tensor {name} written out of order; expected {want}")
        spec = self.specs[name]
        got_dtype = str(tensor.dtype).removeprefix("torch.")
        if tuple(tensor.shape) != spec.shape or got_dtype != spec.dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {got_dtype}, "
                             f"expected {spec.shape} {spec.dtype}")
        t = tensor.detach().contiguous().cpu()
        if t.numel():
            self._f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        if self.pending:
            self.abort()
            raise ValueError(f"{len(self.pending)} tensors never written, first {self.pending[0]}")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        Path(self._tmp).unlink(missing_ok=True)

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
