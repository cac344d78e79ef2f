"""Split a tp=1 checkpoint into TensorRT-LLM 1.2.1 tensor/pipeline-parallel ranks, and merge back.

Each rank tensor is a list of index ranges of one tp=1 tensor along one dim, so the split and its
inverse share one table and cannot disagree. The rules are those of TensorRT-LLM's own converters
(facts/trtllm.md §7; read in NVIDIA/TensorRT-LLM `tensorrt_llm/models/llama/convert.py` @0afa06ab
`load_weights_from_hf_model`, `tensorrt_llm/models/qwen/convert.py` `convert_hf_qwen`,
`tensorrt_llm/models/convert_utils.py` `split`/`dup_kv_weight`):
- qkv: q, k, v heads split separately and concatenated per rank; K/V heads duplicated when
  num_kv_heads < tp (`dup_kv_weight`); dense and proj split on their input dim; fc/gate on output.
- MoE (moe_tp = tp, moe_ep = 1): `mlp.fc` = concat([w3, w1]) is split per half along the expert
  intermediate dim, `mlp.proj` on it; the router and `shared_expert_gate` are replicated;
  `shared_expert.fc` = concat([up, gate]) is split per half like the experts.
- lm_head: zero-padded to a multiple of tp (`pad_vocab_size`) and split on vocab; a tied head is
  written from the embedding, which TensorRT-LLM shares only when shapes match (tp=1).
- Quantized tensors follow their linear: W4A16_AWQ `weight` [out/2, in], `weights_scaling_factor`
  [out, in/group] and `prequant_scaling_factor` [in] (split only for row-parallel layers);
  W8A16/W4A16 `weight` [in, out(/2)] and `per_channel_scale` [out] (replicated for row-parallel).
- Pipeline stages hold `Mapping.pp_layers` (even split) renumbered from 0; the embedding lives on
  the first stage, ln_f and lm_head on the last. Rank = pp_rank * tp_size + tp_rank.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BadInput, Problem
from .desc import ModelDesc, QuantDesc
from .io import (
    CONFIG,
    Checkpoint,
    StreamWriter,
    TensorSpec,
    expected_tensors,
    rank_file,
    read_config,
    write_config,
)

if TYPE_CHECKING:
    import torch

Range = tuple[int, int]
# Mapping.to_dict() fields of TensorRT-LLM 1.2.1 (facts/trtllm.md §6).
MAPPING_FIELDS = ("world_size", "gpus_per_node", "cp_size", "tp_size", "pp_size", "moe_tp_size",
                  "moe_ep_size", "moe_cluster_size", "attn_tp_size", "attn_cp_size", "cp_config",
                  "enable_attention_dp", "enable_lm_head_tp_in_adp")
# Linear suffix -> how its output ("column", "qkv", "halves") or input ("row") is split.
ROLES = {"attention.qkv": "qkv", "attention.dense": "row", "mlp.gate": "column",
         "mlp.proj": "row", "mlp.shared_expert.fc": "halves", "mlp.shared_expert.proj": "row",
         "lm_head": "vocab"}


@dataclass(frozen=True, slots=True)
class Piece:
    """One rank tensor: `source` (a tp=1 tensor) zero-padded on `dim` to `padded`, then the
    `ranges` of `dim` concatenated."""

    name: str
    source: str
    dim: int
    ranges: tuple[Range, ...]
    padded: int
    spec: TensorSpec


def split_checkpoint(src_dir: Path, out_dir: Path, tp_size: int, pp_size: int = 1
                     ) -> dict[str, Any]:
    """Write rank{N}.safetensors for every rank of tp_size x pp_size, one rank at a time, plus
    config.json with the 1.2.1 `mapping` and the source's other files (tokenizer)."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    cfg = read_config(src_dir)
    mapping = cfg.get("mapping") or {}
    if mapping.get("tp_size", 1) * mapping.get("pp_size", 1) != 1:
        raise BadInput([Problem("", f"already split (tp_size={mapping.get('tp_size')}, "
                                f"pp_size={mapping.get('pp_size')})",
                                "Split the tp=1 checkpoint, or merge this one first.",
                                str(src_dir))])
    out_cfg = with_mapping(cfg, tp_size, pp_size, str(src_dir))
    src = Checkpoint(src_dir)
    ranks = plan_ranks(as_stored(ModelDesc.from_config(cfg), src), tp_size, pp_size,
                       str(src_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    for r, pieces in enumerate(ranks):
        with StreamWriter(out_dir / rank_file(r), {p.name: p.spec for p in pieces}) as writer:
            for p in pieces:
                writer.write(p.name, cut(src.get(p.source), p))
    write_config(out_dir, out_cfg)
    for f in sorted(src_dir.iterdir()):
        if f.is_file() and f.name != CONFIG and not _is_rank_file(f.name):
            shutil.copy2(f, out_dir / f.name)
    return {"tp_size": tp_size, "pp_size": pp_size, "ranks": len(ranks),
            "tensors": sum(len(p) for p in ranks)}


def merge_ranks(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The tp=1 tensors of a split checkpoint (the exact inverse of split_checkpoint): copies
    that must agree (replicated tensors, duplicated K/V heads, a tied lm_head) are checked."""
    import torch

    ckpt_dir = Path(ckpt_dir)
    cfg = read_config(ckpt_dir)
    m = cfg.get("mapping") or {}
    desc = as_stored(ModelDesc.from_config(with_mapping(cfg, 1, 1, str(ckpt_dir))),
                     Checkpoint(ckpt_dir, 0))
    specs = expected_tensors(desc)
    ranks = plan_ranks(desc, m.get("tp_size", 1), m.get("pp_size", 1), str(ckpt_dir))
    length: dict[str, int] = {}
    for p in (p for pieces in ranks for p in pieces):
        length[p.source] = max(length.get(p.source, 0), p.padded)
    out: dict[str, torch.Tensor] = {}
    filled: dict[str, torch.Tensor] = {}
    for r, pieces in enumerate(ranks):
        ckpt = Checkpoint(ckpt_dir, r)
        for p in pieces:
            part = ckpt.get(p.name)
            if p.source not in out:
                shape = list(specs[p.source].shape)
                shape[p.dim] = length[p.source]
                out[p.source] = torch.zeros(shape, dtype=part.dtype)
                filled[p.source] = torch.zeros(length[p.source], dtype=torch.bool)
            _place(out[p.source], filled[p.source], part, p, ckpt_dir)
    return {name: out[name][tuple(slice(0, n) for n in spec.shape)].contiguous()
            for name, spec in specs.items()}


def merge_checkpoint(ckpt_dir: Path, out_dir: Path) -> Path:
    """Write the tp=1 checkpoint of a split one to out_dir (for the reference model)."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    cfg = with_mapping(read_config(ckpt_dir), 1, 1, str(ckpt_dir))
    tensors = merge_ranks(ckpt_dir)
    specs = {name: TensorSpec(tuple(t.shape), str(t.dtype).removeprefix("torch."))
             for name, t in tensors.items()}
    with StreamWriter(out_dir / rank_file(0), specs) as writer:
        for name in specs:
            writer.write(name, tensors.pop(name))
    write_config(out_dir, cfg)
    for f in sorted(ckpt_dir.iterdir()):
        if f.is_file() and f.name != CONFIG and not _is_rank_file(f.name):
            shutil.copy2(f, out_dir / f.name)
    return out_dir


def with_mapping(cfg: dict[str, Any], tp_size: int, pp_size: int, where: str) -> dict[str, Any]:
    """cfg with `mapping` for tp_size x pp_size: moe_tp = attn_tp = tp, moe_ep = 1 (what
    convert_checkpoint.py writes by default); the other fields are kept as converted."""
    mapping = dict(cfg.get("mapping") or {})
    absent = [f for f in MAPPING_FIELDS if f not in mapping]
    problems = []
    if absent:
        problems.append(Problem("mapping", f"missing {', '.join(absent)}",
                                "Convert the model again with this version of trt-pipeline.",
                                where))
    if mapping.get("cp_size", 1) != 1 or mapping.get("moe_ep_size", 1) != 1:
        problems.append(Problem("mapping", "context or expert parallelism is not supported here",
                                "Use a checkpoint with cp_size=1 and moe_ep_size=1.", where))
    if tp_size < 1 or pp_size < 1:
        problems.append(Problem("tp_size", f"got tp_size={tp_size}, pp_size={pp_size}",
                                "Use positive sizes.", where))
    if problems:
        raise BadInput(problems)
    mapping.update(world_size=tp_size * pp_size, tp_size=tp_size, pp_size=pp_size,
                   moe_tp_size=tp_size, moe_ep_size=1, attn_tp_size=tp_size)
    return {**json.loads(json.dumps(cfg)), "mapping": mapping}


def as_stored(desc: ModelDesc, ckpt: Checkpoint) -> ModelDesc:
    """The desc whose tensors `ckpt` holds. Per-channel weight-only checkpoints for trtllm-build
    keep float weights under their W8A16/W4A16 quant_algo (trtllm-build quantizes them itself;
    stages/quantize.py): those split, and merge, as float."""
    if desc.quant.algo not in ("W8A16", "W4A16"):
        return desc
    first = next((lin for lin in desc.linears() if desc.quant.quantized(lin.name)), None)
    if first is None or not ckpt.get(f"{first.name}.weight").is_floating_point():
        return desc
    return replace(desc, quant=QuantDesc())


def plan_ranks(desc: ModelDesc, tp: int, pp: int, where: str) -> list[list[Piece]]:
    """Every rank's pieces, in rank order; all divisibility problems are raised together."""
    specs = expected_tensors(desc)
    problems: dict[str, Problem] = {}
    if desc.num_layers % pp:
        problems["pp"] = Problem("pp_size", f"{desc.num_layers} layers do not split evenly into "
                                 f"{pp} pipeline stages", "Use a pp_size that divides them.", where)
    if desc.tie_word_embeddings and tp * pp > 1 and desc.quant.quantized("lm_head"):
        problems["tied"] = Problem("quantization.exclude_modules", "a tied lm_head is written as "
                                   "a float copy of the embedding on split ranks",
                                   "Quantize with lm_head excluded.", where)
    per_stage = desc.num_layers // pp
    if pp > 1 and per_stage:  # config.json is shared: exclude_modules must mean the same per stage
        moved = [lin.name for lin in desc.linears() if lin.name.startswith("transformer.layers.")
                 and desc.quant.quantized(lin.name)
                 != desc.quant.quantized(_renumber(lin.name, per_stage))]
        if moved:
            problems["exclude"] = Problem(
                "quantization.exclude_modules", f"names layers by index (e.g. {moved[0]}); "
                "pipeline stages renumber their layers from 0", "Use pp_size=1.", where)
    ranks: list[list[Piece]] = []
    for r in range(tp * pp):
        tp_rank, stage = r % tp, r // tp
        layers = range(stage * per_stage, (stage + 1) * per_stage)
        pieces = []
        for name, spec in specs.items():
            local = _local_name(name, layers, stage, pp)
            if local is not None:
                pieces.append(_piece(desc, local, name, spec, tp, tp_rank, problems, where))
        if stage == pp - 1 and desc.tie_word_embeddings and tp * pp > 1:
            emb = "transformer.vocab_embedding.weight"
            pieces.append(_piece(desc, "lm_head.weight", emb, specs[emb], tp, tp_rank, problems,
                                 where, role="vocab"))
        ranks.append(pieces)
    if problems:
        raise BadInput(problems.values())
    return ranks


def cut(t: torch.Tensor, p: Piece) -> torch.Tensor:
    """The rank tensor of piece p from its tp=1 source tensor t."""
    import torch

    if t.shape[p.dim] < p.padded:
        pad = list(t.shape)
        pad[p.dim] = p.padded - t.shape[p.dim]
        t = torch.cat([t, torch.zeros(pad, dtype=t.dtype)], dim=p.dim)
    parts = [t.narrow(p.dim, a, b - a) for a, b in p.ranges]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=p.dim)).contiguous()


def _place(out: torch.Tensor, filled: torch.Tensor, part: torch.Tensor, p: Piece,
           where: Path) -> None:
    import torch

    offset = 0
    for a, b in p.ranges:
        chunk = part.narrow(p.dim, offset, b - a)
        offset += b - a
        target = out.narrow(p.dim, a, b - a)
        seen = filled[a:b].nonzero().flatten()
        if len(seen) and not torch.equal(target.index_select(p.dim, seen),
                                         chunk.index_select(p.dim, seen)):
            raise BadInput([Problem("", f"{p.name} disagrees with another rank's copy of "
                                    f"{p.source}", "Split the tp=1 checkpoint again.",
                                    str(where))])
        target.copy_(chunk)
        filled[a:b] = True


def _renumber(name: str, per_stage: int) -> str:
    i, rest = name.removeprefix("transformer.layers.").split(".", 1)
    return f"transformer.layers.{int(i) % per_stage}.{rest}"


def _local_name(name: str, layers: range, stage: int, pp: int) -> str | None:
    """The name of tp=1 tensor `name` on pipeline stage `stage`, or None when it lives elsewhere."""
    if name.startswith("transformer.layers."):
        i = int(name.split(".")[2])
        return _renumber(name, len(layers)) if i in layers else None
    if name.startswith("transformer.vocab_embedding."):
        return name if stage == 0 else None
    return name if stage == pp - 1 else None  # ln_f, lm_head


def _piece(desc: ModelDesc, name: str, source: str, spec: TensorSpec, tp: int, rank: int,
           problems: dict[str, Problem], where: str, role: str | None = None) -> Piece:
    module, _, leaf = source.rpartition(".")
    role = role or _role(desc, module)
    dim, pack = (None, 1) if role == "replicate" else _axis(desc, module, leaf, spec, role)
    if dim is None:  # the whole tensor on every rank
        return Piece(name, source, 0, ((0, spec.shape[0]),), spec.shape[0], spec)
    dim %= len(spec.shape)
    n = spec.shape[dim]
    padded = n
    if role == "vocab":  # pad_vocab_size: zero rows up to a multiple of tp
        vocab = -(-desc.vocab_size // tp) * tp
        padded = vocab // pack if vocab % pack == 0 else -1
    ranges, why = _ranges(desc, role, padded, pack, tp, rank) if padded > 0 else \
        ((), f"the padded vocabulary cannot be packed in pairs for tp_size={tp}")
    if why:
        pattern = _pattern(source)
        problems.setdefault(f"{pattern}: {why}", Problem(
            "tp_size", f"{pattern} {list(spec.shape)}: {why}",
            _FIX.get(leaf, "Use a tp_size that divides the model's widths."), where))
        ranges, padded = ((0, n),), n
    shape = list(spec.shape)
    shape[dim] = sum(b - a for a, b in ranges)
    return Piece(name, source, dim, ranges, padded, TensorSpec(tuple(shape), spec.dtype))


_FIX = {"weights_scaling_factor": "Use a tp_size that leaves every row-parallel layer a whole "
        "number of quantization groups per rank, or quantize with a smaller quantize.group_size.",
        "prequant_scaling_factor": "Use a tp_size that divides the layer's input width."}


def _role(desc: ModelDesc, module: str) -> str:
    if module == "lm_head":
        return "vocab"
    suffix = module.split(".", 3)[-1] if module.startswith("transformer.layers.") else module
    if suffix == "mlp.fc":
        return "halves" if desc.moe else "column"
    return ROLES.get(suffix, "replicate")


def _axis(desc: ModelDesc, module: str, leaf: str, spec: TensorSpec, role: str
          ) -> tuple[int | None, int]:
    """(dim that the role cuts, stored rows per logical row on it as a divisor): the output dim
    for column/qkv/halves/vocab, the input dim for row; None when the tensor has no such dim."""
    quantized = spec.dtype == "int8" and desc.quant.quantized(module)
    awq = desc.quant.algo == "W4A16_AWQ"
    if leaf == "weight":
        if not quantized:
            return (-1 if role == "row" else -2), 1
        out_dim, in_dim = (-2, -1) if awq else (-1, -2)
        pack = 1 if desc.quant.algo == "W8A16" else 2
        return (in_dim, 1) if role == "row" else (out_dim, pack)
    if leaf in ("bias", "per_channel_scale"):
        return (None, 1) if role == "row" else (-1, 1)
    if leaf == "weights_scaling_factor":
        return (-1 if role == "row" else -2), 1
    if leaf == "prequant_scaling_factor":
        return (-1, 1) if role == "row" else (None, 1)
    return None, 1


def _ranges(desc: ModelDesc, role: str, n: int, pack: int, tp: int, rank: int
            ) -> tuple[tuple[Range, ...], str]:
    """Rank `rank`'s ranges of a dim of stored length n, or ((), why not)."""
    if role in ("column", "row", "vocab"):
        return ((rank * n // tp, (rank + 1) * n // tp),), "" if n % tp == 0 else \
            f"{n} is not divisible by tp_size={tp}"
    if role == "halves":
        h = n // 2
        if h % tp:
            return (), f"each half ({h}) is not divisible by tp_size={tp}"
        return tuple((o + rank * h // tp, o + (rank + 1) * h // tp) for o in (0, h)), ""
    hd, nq, nkv = desc.head_size, desc.num_heads, desc.num_kv_heads
    if hd % pack or nq % tp or (nkv % tp and tp % nkv):
        return (), (f"{nq} query / {nkv} key-value heads cannot be split over tp_size={tp}")
    q = (rank * nq // tp, (rank + 1) * nq // tp)
    kv_head = (rank * nkv // tp, (rank + 1) * nkv // tp) if nkv >= tp else \
        (rank // (tp // nkv), rank // (tp // nkv) + 1)
    heads = [q, (nq + kv_head[0], nq + kv_head[1]), (nq + nkv + kv_head[0], nq + nkv + kv_head[1])]
    return tuple((a * hd // pack, b * hd // pack) for a, b in heads), ""


def _pattern(name: str) -> str:
    parts = name.split(".")
    if name.startswith("transformer.layers."):
        parts[2] = "{i}"
    return ".".join(parts)


def _is_rank_file(name: str) -> bool:
    return name.startswith("rank") and name.endswith(".safetensors")
