"""Symmetric round-to-nearest weight quantization and the TensorRT-LLM tensors that carry it.

Group-wise INT4 (W4A16_AWQ, facts/trtllm.md §8): per [output row, group of `group_size` input
columns] scale = amax / 7, q = round(w / scale) clamped to [-8, 7], no zero point (ModelOpt's
INT4_AWQ_CFG is symmetric, facts/quantization.md §2.2). Stored as `weight` int8 [out/2, in], pairs
packed along the output dim, and `weights_scaling_factor` [out, in/group] in the model dtype.

Per-channel weight-only (W8A16 / W4A16) follows `trt_pipeline/checkpoint/io.py::_linear_tensors`:
`weight` int8 [in, out] (INT4: [in, out/2], pairs packed along out, low nibble = even column) and
`per_channel_scale` [out], scale = amax / 127 (or / 7). These bytes are the *unprocessed* row-major
layout. TensorRT-LLM itself stores something else, see the finding below.

TensorRT-LLM per-channel finding (NVIDIA/TensorRT-LLM as stored in the code index: its copies are
not tagged, so the v1.2.1 commit itself could not be pinned; this code is the same in every copy
read, 0.1x to 1.x):
- `tensorrt_llm/quantization/layers.py::WeightOnlyQuantLinear.__init__` (commit 2340c776): `weight`
  Parameter int8 (in_features, out_features * bits / 8), `per_channel_scale` (out_features,) in the
  model dtype. The shapes agree with io.py.
- `tensorrt_llm/models/convert_utils.py::weight_only_quantize` (commit 9b3c7124), used by the
  per-model `get_tllm_linear_weight` (e.g. `models/llama/convert.py`, 04a2cacb): `v = weight.t()`,
  then `torch.ops.trtllm.symmetric_quantize_last_axis_of_batched_matrix(v, int8 | quint4x2)`; the
  checkpoint stores its first output. `cpp/tensorrt_llm/thop/weightOnlyQuantOp.cpp::
  symmetric_quantize_helper` (23bc5b7c) returns {processed_quantized_weight, scales}, and
  `cpp/tensorrt_llm/kernels/cutlass_kernels/cutlass_preprocessors.cpp::symmetric_quantize` builds
  it with `preprocess_weights_for_mixed_gemm`: rows permuted for the *build GPU's* SM
  (`getSMVersion()`), sub-byte transpose, column interleave, +128 / +8 bias. So a TensorRT-LLM
  per-channel checkpoint holds SM-specific bytes, not row-major int8. (Its scale is amax / 128 or
  amax / 8, so the largest weight clips to 127 / 7; ours is amax / 127 or amax / 7.)
- `tensorrt_llm/models/modeling_utils.py::preprocess_perlayer_weights`, branch W4A16/W8A16, calls
  `convert_utils.weight_only_quantize_dict(..., plugin=True)`: a qkv/dense/fc/proj/gate `weight`
  that is not int8 is quantized there, at build time; an int8 one passes through untouched, i.e.
  it is taken as already preprocessed.
Consequence: the raw [in, out] int8 written here (io.py's layout, which the reference model and
the ONNX lowering read) would be misread by trtllm-build. A trtllm backend must convert each
per-channel `weight` on the build machine with `tensorrt_llm.quantization.functional.
preprocess_weights_for_mixed_gemm(weight, torch.int8 | torch.quint4x2, torch.float16)` (pure
PyTorch), or hand trtllm-build float weights and let `weight_only_quantize_dict` quantize them.
"""

from __future__ import annotations

import torch

from ..checkpoint.desc import QuantDesc
from ..checkpoint.layout import pack_int4

QMAX = {4: 7, 8: 127}


def _stored_scale(amax: torch.Tensor, qmax: int, dtype: torch.dtype) -> torch.Tensor:
    """amax / qmax as the checkpoint will hold it (model dtype), back in float32 so q is computed
    against exactly the scale the engine multiplies with."""
    tiny = torch.finfo(dtype).tiny
    return (amax / qmax).clamp(min=tiny).to(dtype).to(torch.float32)


def quantize_groupwise(w: torch.Tensor, group: int, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [.., out, in] -> (q int8 [.., out, in] in [-8, 7], scale [.., out, in/group] in dtype)."""
    g = w.float().unflatten(-1, (-1, group))
    scale = _stored_scale(g.abs().amax(-1), QMAX[4], dtype)
    q = torch.round(g / scale.unsqueeze(-1)).clamp(-8, 7).to(torch.int8)
    return q.flatten(-2), scale.to(dtype)


def fake_quantize_groupwise(w: torch.Tensor, group: int) -> torch.Tensor:
    """Quantize-dequantize in float32, for the AWQ searches (dtype rounding of scales ignored).
    Written with in-place ops: the scale search calls it 20 times per weight of every layer."""
    g = w.unflatten(-1, (-1, group))
    lo, hi = torch.aminmax(g, dim=-1, keepdim=True)
    scale = torch.maximum(-lo, hi).clamp_(min=1e-8).div_(QMAX[4])
    return g.div(scale).round_().clamp_(-8, 7).mul_(scale).flatten(-2)


def quantize_per_channel(w: torch.Tensor, bits: int, dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [.., out, in] -> (q int8 [.., out, in], scale [.., out] in dtype), one scale per row."""
    qmax = QMAX[bits]
    scale = _stored_scale(w.float().abs().amax(-1), qmax, dtype)
    q = torch.round(w.float() / scale.unsqueeze(-1)).clamp(-qmax - 1, qmax).to(torch.int8)
    return q, scale.to(dtype)


def linear_tensors(name: str, w: torch.Tensor, quant: QuantDesc, dtype: torch.dtype,
                   prequant: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear (float weight w [.., out, in], already
    multiplied by any AWQ scale whose inverse is `prequant` [.., in])."""
    if quant.algo == "W4A16_AWQ":
        q, scale = quantize_groupwise(w, quant.group_size, dtype)
        out = {f"{name}.weight": pack_int4(q, dim=-2), f"{name}.weights_scaling_factor": scale}
        if quant.pre_quant_scale:
            pqs = prequant if prequant is not None else torch.ones(w.shape[:-2] + w.shape[-1:])
            out[f"{name}.prequant_scaling_factor"] = pqs.to(dtype)
        return out
    if prequant is not None:
        raise ValueError(f"{name}: {quant.algo} has no pre-quant scale")
    if quant.algo in ("W8A16", "W4A16"):
        q, scale = quantize_per_channel(w, quant.bits, dtype)
        qt = q.transpose(-1, -2).contiguous()  # [.., in, out]
        weight = pack_int4(qt, dim=-1) if quant.bits == 4 else qt
        return {f"{name}.weight": weight, f"{name}.per_channel_scale": scale}
    raise ValueError(f"unsupported quant_algo {quant.algo!r}")
