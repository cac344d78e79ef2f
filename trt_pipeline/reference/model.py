"""The executable specification of the checkpoint: a plain PyTorch decoder that runs it on a CPU.

It reads the same ModelDesc as the quantizer and the ONNX lowering. Quantized linears are
dequantized on load (checkpoint/layout.py), so the quantizer's error is measured exactly as the
engines will compute it. Tests prove it against Hugging Face transformers for every family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint.desc import ModelDesc
from ..checkpoint.io import Checkpoint
from ..checkpoint.layout import dequantize_linear

QUANT_SUFFIXES = ("weights_scaling_factor", "prequant_scaling_factor", "per_channel_scale")


def load_weights(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, prefix: str = ""
                 ) -> dict[str, torch.Tensor]:
    """Tensors (all, or those under `prefix`, e.g. one layer) as float `dtype`, quantized
    linears dequantized."""
    desc = ckpt.desc
    out: dict[str, torch.Tensor] = {}
    for name in sorted(n for n in ckpt.names if n.startswith(prefix)):
        module, _, leaf = name.rpartition(".")
        if leaf in QUANT_SUFFIXES:
            continue
        if leaf == "weight" and desc.quant.quantized(module) and ckpt.get(name).dtype == torch.int8:
            parts = {k: ckpt.get(f"{module}.{k}") for k in ("weight", *QUANT_SUFFIXES)
                     if ckpt.has(f"{module}.{k}")}
            out[name] = dequantize_linear(parts, desc.quant, dtype)
        else:
            out[name] = ckpt.get(name).to(dtype)
    return out


def rope_inv_freq(desc: ModelDesc) -> torch.Tensor:
    """Inverse frequencies of the half-split (GPT-NeoX) rotation, with the family's scaling."""
    d = desc.head_size
    inv = 1.0 / (desc.rotary_base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = desc.rotary_scaling
    if s and s.get("type") == "linear":
        inv = inv / s["factor"]
    elif s and s.get("type") == "llama3":
        # Llama 3.1 frequency-dependent scaling (transformers _compute_llama3_parameters).
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * torch.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(is_mid, mid, scaled)
    return inv.to(torch.float32)


def rope_cos_sin(desc: ModelDesc, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, S, head_size/2] for int positions [B, S]."""
    freqs = positions.to(torch.float32)[..., None] * rope_inv_freq(desc)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D]; cos/sin [B, S, D/2]; rotate_half convention."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@dataclass
class KVCache:
    """Per-layer keys and values [B, n_kv, T, D]; `valid` [B, T] marks real (unpadded) tokens."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    valid: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.valid is None else self.valid.shape[1]


class ReferenceModel:
    """The whole model in memory; the quantizer uses the per-layer functions below instead."""

    def __init__(self, desc: ModelDesc, weights: dict[str, torch.Tensor],
                 dtype: torch.dtype = torch.float32) -> None:
        self.desc = desc
        self.w = weights
        self.dtype = dtype

    @classmethod
    def load(cls, ckpt_dir: Path | str, dtype: torch.dtype = torch.float32) -> ReferenceModel:
        ckpt = Checkpoint(Path(ckpt_dir))
        return cls(ckpt.desc, load_weights(ckpt, dtype), dtype)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                valid: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits [B, S, V] (float32) for input_ids [B, S] appended to `cache` (updated in place).
        `valid` [B, S] marks real tokens (False for left padding); `last_only` gives [B, 1, V]
        (the head over one position instead of the whole prompt)."""
        d = self.desc
        cache = cache if cache is not None else KVCache()
        if not cache.keys:
            cache.keys = [None] * d.num_layers
            cache.values = [None] * d.num_layers
        ctx = Context.make(d, input_ids.shape, cache.valid, valid)
        h = embed(self.w, input_ids)
        for i in range(d.num_layers):
            kv = (cache.keys[i], cache.values[i])
            h, (cache.keys[i], cache.values[i]) = decoder_layer(d, self.w, i, h, ctx, kv)
        cache.valid = ctx.valid
        return lm_head(d, self.w, h[:, -1:] if last_only else h)


@dataclass(frozen=True)
class Context:
    """What every layer of one forward step shares: RoPE tables, the attention mask, validity."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor  # [B, 1, S, T] bool, True = attend
    valid: torch.Tensor  # [B, T] bool

    @classmethod
    def make(cls, desc: ModelDesc, shape: torch.Size | tuple[int, int],
             past_valid: torch.Tensor | None, valid: torch.Tensor | None) -> Context:
        b, s = shape
        new_valid = valid if valid is not None else torch.ones(b, s, dtype=torch.bool)
        all_valid = new_valid if past_valid is None else torch.cat([past_valid, new_valid], 1)
        positions = (all_valid.long().cumsum(1) - 1).clamp(min=0)[:, -s:]
        cos, sin = rope_cos_sin(desc, positions)
        t = all_valid.shape[1]
        causal = torch.ones(s, t, dtype=torch.bool).tril(t - s)
        return cls(cos, sin, causal[None, None] & all_valid[:, None, None, :], all_valid)


KV = tuple[torch.Tensor | None, torch.Tensor | None]


def embed(w: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    return F.embedding(input_ids, w["transformer.vocab_embedding.weight"])


def lm_head(desc: ModelDesc, w: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    h = rms_norm(h, w["transformer.ln_f.weight"], desc.norm_epsilon)
    head = w.get("lm_head.weight", w["transformer.vocab_embedding.weight"])
    return (h @ head.T).to(torch.float32)


def decoder_layer(d: ModelDesc, w: dict[str, torch.Tensor], i: int, h: torch.Tensor,
                  ctx: Context, kv: KV = (None, None)) -> tuple[torch.Tensor, KV]:
    """One decoder layer; `w` needs only this layer's tensors. Returns (h, updated k/v)."""
    p = f"transformer.layers.{i}"
    x = rms_norm(h, w[f"{p}.input_layernorm.weight"], d.norm_epsilon)
    a, kv = attention(d, w, i, x, ctx, kv)
    h = h + a
    x = rms_norm(h, w[f"{p}.post_layernorm.weight"], d.norm_epsilon)
    return h + (moe(d, w, i, x) if d.moe else mlp(w, f"{p}.mlp", x)), kv


def attention(d: ModelDesc, w: dict[str, torch.Tensor], i: int, x: torch.Tensor, ctx: Context,
              kv: KV = (None, None)) -> tuple[torch.Tensor, KV]:
    p = f"transformer.layers.{i}.attention"
    b, s, _ = x.shape
    qkv = x @ w[f"{p}.qkv.weight"].T
    if f"{p}.qkv.bias" in w:
        qkv = qkv + w[f"{p}.qkv.bias"]
    q, k, v = qkv.split([d.q_size, d.kv_size, d.kv_size], dim=-1)
    q = q.view(b, s, d.num_heads, d.head_size).transpose(1, 2)
    k = k.view(b, s, d.num_kv_heads, d.head_size).transpose(1, 2)
    v = v.view(b, s, d.num_kv_heads, d.head_size).transpose(1, 2)
    if d.qk_norm == "before_rope":
        q, k = _qk_norm(d, w, p, q, k)
    q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
    if d.qk_norm == "after_rope":
        q, k = _qk_norm(d, w, p, q, k)
    if kv[0] is not None:
        k = torch.cat([kv[0], k], dim=2)
        v = torch.cat([kv[1], v], dim=2)
    # enable_gqa: query heads share their KV head without materializing repeated K/V per step
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, enable_gqa=True)
    out = out.transpose(1, 2).reshape(b, s, d.q_size)
    return out @ w[f"{p}.dense.weight"].T, (k, v)


def _qk_norm(d: ModelDesc, w: dict[str, torch.Tensor], p: str, q: torch.Tensor, k: torch.Tensor):
    return (rms_norm(q, w[f"{p}.q_layernorm.weight"], d.norm_epsilon),
            rms_norm(k, w[f"{p}.k_layernorm.weight"], d.norm_epsilon))


def mlp(w: dict[str, torch.Tensor], p: str, x: torch.Tensor) -> torch.Tensor:
    """Dense gated MLP: fc is the activated branch, gate the linear one (facts §7)."""
    return (F.silu(x @ w[f"{p}.fc.weight"].T) * (x @ w[f"{p}.gate.weight"].T)
            ) @ w[f"{p}.proj.weight"].T


def moe(d: ModelDesc, w: dict[str, torch.Tensor], i: int, x: torch.Tensor) -> torch.Tensor:
    p, m = f"transformer.layers.{i}.mlp", d.moe
    assert m is not None
    flat = x.reshape(-1, x.shape[-1])
    logits = flat.to(torch.float32) @ w[f"{p}.router.weight"].to(torch.float32).T
    weights, experts = route(logits, m.top_k, m.normalization)
    out = torch.zeros_like(flat)
    fc, proj = w[f"{p}.fc.weight"], w[f"{p}.proj.weight"]
    for e in experts.unique().tolist():
        rows, slot = (experts == e).nonzero(as_tuple=True)
        out[rows] += weights[rows, slot, None].to(x.dtype) * expert_mlp(flat[rows], fc[e], proj[e])
    if m.shared_intermediate_size:
        shared = expert_mlp(flat, w[f"{p}.shared_expert.fc.weight"],
                            w[f"{p}.shared_expert.proj.weight"])
        if m.shared_gate:
            shared = torch.sigmoid(flat @ w[f"{p}.shared_expert_gate.weight"].T) * shared
        out = out + shared
    return out.view_as(x)


def route(logits: torch.Tensor, top_k: int, normalization: str
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k], expert ids [T, k]) from fp32 router logits [T, E].
    renormalize: top-k of the logits, softmax over the k; none: softmax over all, then top-k."""
    if normalization == "renormalize":
        top, idx = logits.topk(top_k, dim=-1)
        return top.softmax(-1), idx
    probs = logits.softmax(-1)
    top, idx = probs.topk(top_k, dim=-1)
    return top, idx


def expert_mlp(x: torch.Tensor, fc: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """MoE/shared expert: fc = [up; gate] (first half linear, second activated; facts §7)."""
    up, gate = (x @ fc.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ proj.T


@torch.no_grad()
def greedy(model: ReferenceModel, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding with the KV cache; returns only the new tokens [B, N]."""
    cache = KVCache()
    logits = model.forward(input_ids, cache)
    out = []
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(max_new_tokens):
        out.append(nxt)
        if len(out) == max_new_tokens:
            break
        logits = model.forward(nxt, cache)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
    return torch.cat(out, dim=1)
