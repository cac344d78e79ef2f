"""Quantized tensor layouts of the checkpoint: int4 packing and dequantization back to float.

facts/trtllm.md §8: W4A16_AWQ `weight` is int8 [out/2, in] holding signed int4 pairs packed along
the OUTPUT dim (low nibble = even row), `weights_scaling_factor` [out, in/group], optional
`prequant_scaling_factor` [in] multiplying the activations. Weight-only per-channel (W8A16, W4A16)
store `weight` as [in, out] (int4: [in, out/2], packed along out) with `per_channel_scale` [out].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .desc import QuantDesc


def pack_int4(q: torch.Tensor, dim: int) -> torch.Tensor:
    """Signed int4 values in [-8, 7] -> int8 bytes, pairs along `dim`, low nibble = even index."""
    import torch

    dim = dim % q.dim()
    if q.shape[dim] % 2:
        raise ValueError(f"int4 packing needs an even size along dim {dim}, got {q.shape[dim]}")
    q = q.to(torch.int8)
    even = q.narrow(dim, 0, q.shape[dim] // 2 * 2)
    lo = even.unflatten(dim, (-1, 2)).select(dim + 1, 0)
    hi = even.unflatten(dim, (-1, 2)).select(dim + 1, 1)
    return ((lo & 0x0F) | (hi << 4)).to(torch.int8)


def unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of pack_int4: int8 bytes -> signed int4 values (as int8), doubling `dim`."""
    import torch

    dim = dim % packed.dim()
    b = packed.to(torch.int8)
    lo = (b << 4) >> 4  # arithmetic shifts sign-extend the nibbles
    hi = b >> 4
    return torch.stack([lo, hi], dim=dim + 1).flatten(dim, dim + 1)


def dequantize_linear(tensors: dict[str, torch.Tensor], quant: QuantDesc, dtype: torch.dtype
                      ) -> torch.Tensor:
    """The float weight [.., out, in] that a quantized linear computes with, the AWQ pre-quant
    scale folded into its input columns (x*s @ W^T == x @ (W*s)^T)."""
    w = tensors["weight"]
    if quant.algo == "W4A16_AWQ":
        q = unpack_int4(w, -2).to(dtype)  # [.., out, in]
        scale = tensors["weights_scaling_factor"].to(dtype)  # [.., out, in/g]
        weight = q * scale.repeat_interleave(quant.group_size, dim=-1)
        pqs = tensors.get("prequant_scaling_factor")
        if pqs is not None:
            weight = weight * pqs.to(dtype).unsqueeze(-2)
        return weight
    if quant.algo in ("W4A16", "W8A16"):
        q = unpack_int4(w, -1) if quant.algo == "W4A16" else w  # [.., in, out]
        weight = q.to(dtype) * tensors["per_channel_scale"].to(dtype).unsqueeze(-2)
        return weight.transpose(-1, -2)
    raise ValueError(f"unsupported quant_algo {quant.algo!r}")
