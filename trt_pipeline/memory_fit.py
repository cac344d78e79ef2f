"""Will the engine fit the target GPU? Device memory estimated before any build, what to change
when it does not, and the estimate next to TensorRT's own figures after a build.

The model is the lowered ONNX graph as TensorRT for RTX runs it (backends/onnx/lower.py):
- weights: every tensor once (a tied lm_head is the embedding table); INT4 = 0.5 B per value
  plus one scale of the engine dtype per group (per output channel when not grouped); float
  tensors at the engine dtype; MoE routers float32; every expert counted; plus the RoPE cos/sin
  tables of max_position_embeddings rows, which the graph holds as constants.
- KV cache: 2 (K, V) x layers x kv_heads x head_size x max_seq_len x max_batch_size x dtype. The
  graph's `present = Concat(past, new)` is a separate output, so a step holds past and present
  at once: the peak is two copies (the GPU runtime ping-pongs two full-size buffers).
- activations, for a prefill of max_batch_size x max_input_len tokens: (residual + normed
  hidden + the widest intermediate) per token; attention scores [B, heads, S, T] when the
  attention kernel materialises them (`SCORES_MATERIALISED`); the float16 logits before the Cast
  and the float32 logits output [B, S, vocab]; the bool mask input [B, 1, S, T] and the
  engine's own int32 copies of it.
- overhead: `OVERHEAD_BYTES`, a constant for the CUDA context and the TensorRT runtime (none on
  the `cpu` target, where ONNX Runtime runs the same graph in host memory).

A TensorRT-LLM engine (backend trtllm) is costed apart, per GPU of tp_size x pp_size
(facts/trtllm.md §4, §5, §7):
- weights: the same tensors, split evenly over the GPUs, except the vocab embedding, which every
  tensor-parallel rank holds whole (use_parallel_embedding false); a tied head is stored apart
  at tp > 1, split on vocab.
- KV cache: one paged pool (no past/present copies): layers / pp x ceil(kv_heads / tp) (K/V
  heads duplicated when fewer than tp).
- activations, sized by max_num_tokens (remove_input_padding packs a step's tokens; "activation
  memory scales with it"): (residual + normed hidden + the widest intermediate / tp) per token,
  the MoE plugin's permuted top_k copies instead of every expert; no attention scores (context
  FMHA) and no mask; logits of the last token per sequence only (gather_context_logits off), in
  the engine dtype and as float32 (logits_dtype).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .checkpoint.desc import ModelDesc, QuantDesc
from .errors import Problem
from .targets import TARGETS, Target

MiB, GiB = 2**20, 2**30
# CUDA context with lazy module loading (default on Linux since CUDA 12.2): 287,047,680 B
# measured by PyTorch (pytorch/pytorch#86509; 666,632,192 B eager), plus the TensorRT for RTX
# runtime and its JIT-compiled kernels, unmeasured (no GPU here): rounded up to 512 MiB.
OVERHEAD_BYTES = 512 * MiB
SAFETY_MARGIN = 0.10  # of VRAM: GeForce cards also drive a display; allocator fragmentation
KV_COPIES = 2  # past and present live together (module doc)
# The tiny SM86 builds' layer listings show one fused `_gemm_mha_v2` kernel per attention.
SCORES_MATERIALISED = False
# The SM86 layer listing turns the bool mask [B, 1, S, T] into two Int32 copies and a Bool one
# (kernel ReshReplConcNeqCastIotaEqlSeleOr): 9 bytes per mask element inside the engine.
MASK_INTERNAL_BYTES = 9
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
RTX_SMS = (75, 80, 86, 89, 120, 121)  # trt.ComputeCapability of TensorRT for RTX 1.7.1
FLOAT_BITS = 16  # weight_bits >= this means "float at the engine dtype"


@dataclass(frozen=True)
class FitRequest:
    """What an estimate was made for; suggestions re-estimate it with one knob changed."""

    desc: ModelDesc
    weight_bits: QuantDesc | Mapping[str, int]
    dtype: str
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    target: Target
    group_size: int = 128  # for a weight_bits mapping (-1: per output channel); a QuantDesc's own
    backend: str = "rtx"  # trtllm has a memory model of its own (module doc)
    max_num_tokens: int | None = None  # trtllm; None: default_max_num_tokens
    tp_size: int = 1
    pp_size: int = 1

    @property
    def gpus(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def num_tokens(self) -> int:
        return self.max_num_tokens or default_max_num_tokens(self.max_batch_size,
                                                             self.max_input_len)


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int  # per GPU, as are the other figures
    kv_cache_bytes: int  # one copy; the total counts kv_copies
    activations_bytes: int
    overhead_bytes: int
    breakdown: dict[str, int] = field(compare=False)
    request: FitRequest = field(compare=False)
    kv_copies: int = KV_COPIES  # 1 for trtllm's paged pool

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.kv_copies * self.kv_cache_bytes
                + self.activations_bytes + self.overhead_bytes)

    def as_dict(self) -> dict[str, int]:
        """The figures as recorded in an engine manifest."""
        return {"weights_bytes": self.weights_bytes, "kv_cache_bytes": self.kv_cache_bytes,
                "kv_copies": self.kv_copies, "activations_bytes": self.activations_bytes,
                "overhead_bytes": self.overhead_bytes, "total_bytes": self.total_bytes}

    def fits(self, target: Target | None = None, margin: float = SAFETY_MARGIN) -> bool:
        """Whether the total fits `target` (default: the one estimated for) less the margin."""
        return self.total_bytes <= usable_bytes(target or self.request.target, margin)


@dataclass(frozen=True, slots=True)
class Suggestion:
    setting: str  # recipe override, e.g. "build.max_seq_len=2048"
    effect: str
    total_bytes: int
    fits: bool


def usable_bytes(target: Target, margin: float = SAFETY_MARGIN) -> int:
    return int(target.vram_gib * GiB * (1 - margin))


def default_max_num_tokens(max_batch_size: int, max_input_len: int) -> int:
    """build.max_num_tokens when the recipe leaves it unset (never trtllm-build's 8192)."""
    return min(2048, max_batch_size * max_input_len)


def estimate(desc: ModelDesc, weight_bits: QuantDesc | Mapping[str, int] | None, dtype: str,
             max_batch_size: int, max_input_len: int, max_seq_len: int, target: Target,
             group_size: int = 128, *, backend: str = "rtx", max_num_tokens: int | None = None,
             tp_size: int = 1, pp_size: int = 1) -> MemoryEstimate:
    """Bytes the engine of `desc` needs on `target` (module doc), per GPU. `weight_bits`: a
    QuantDesc (None: the checkpoint's own), or fnmatch patterns over module names -> bits, first
    match wins, e.g. {"lm_head": 16, "*": 4}; >= 16 means float at `dtype`. `group_size` -1:
    one scale per output channel. max_num_tokens, tp_size and pp_size count for trtllm only."""
    req = FitRequest(desc, desc.quant if weight_bits is None else weight_bits, dtype,
                     max_batch_size, max_input_len, max_seq_len, target, group_size, backend,
                     max_num_tokens, tp_size, pp_size)
    return _estimate(req)


def _estimate(req: FitRequest) -> MemoryEstimate:
    if req.backend == "trtllm":
        return _estimate_trtllm(req)
    d, el = req.desc, DTYPE_BYTES[req.dtype]
    weights = _weights(req)
    b, s, t = req.max_batch_size, req.max_input_len, req.max_seq_len
    kv = 2 * d.num_layers * d.num_kv_heads * d.head_size * t * b * el
    acts = {"hidden": b * s * (2 * d.hidden_size + _widest(d)) * el,
            "attention_scores": b * d.num_heads * s * t * el if SCORES_MATERIALISED else 0,
            "logits_float16": b * s * d.vocab_size * el,
            "logits_output": b * s * d.vocab_size * 4, "mask": b * s * t,
            "mask_internal": b * s * t * MASK_INTERNAL_BYTES}
    breakdown = {**{f"weights.{k}": v for k, v in weights.items()},
                 **{f"activations.{k}": v for k, v in acts.items()}}
    overhead = 0 if req.target.kind == "cpu" else OVERHEAD_BYTES  # host memory, no CUDA
    return MemoryEstimate(sum(weights.values()), kv, sum(acts.values()), overhead, breakdown,
                          req)


def _estimate_trtllm(req: FitRequest) -> MemoryEstimate:
    """Per GPU of a TensorRT-LLM engine (module doc)."""
    d, el, tp = req.desc, DTYPE_BYTES[req.dtype], req.tp_size
    weights = {k: v if k == "embedding" else -(-v // req.gpus) for k, v in _weights(req).items()}
    if d.tie_word_embeddings and tp > 1:  # checkpoint/shard.py writes the head apart
        weights["lm_head"] += -(-d.vocab_size // tp) * d.hidden_size * el
    layers, kv_heads = -(-d.num_layers // req.pp_size), -(-d.num_kv_heads // tp)
    kv = 2 * layers * kv_heads * d.head_size * req.max_seq_len * req.max_batch_size * el
    acts = {"hidden": req.num_tokens * (2 * d.hidden_size + _widest_trtllm(d, tp)) * el,
            "logits": req.max_batch_size * d.vocab_size * (el + 4)}
    breakdown = {**{f"weights.{k}": v for k, v in weights.items()},
                 **{f"activations.{k}": v for k, v in acts.items()}}
    return MemoryEstimate(sum(weights.values()), kv, sum(acts.values()), OVERHEAD_BYTES,
                          breakdown, req, kv_copies=1)


def _widest_trtllm(d: ModelDesc, tp: int) -> int:
    """Per-token values beside the hidden state on one tensor-parallel rank; the MoE plugin
    permutes each token to its top_k experts only."""
    attn = (d.q_size + 2 * d.kv_size) // tp
    if d.moe is None:
        return max(attn, 3 * d.intermediate_size // tp)
    m = d.moe
    return max(attn, m.top_k * (2 * d.hidden_size + 3 * m.intermediate_size // tp)
               + 3 * m.shared_intermediate_size // tp)


def _widest(d: ModelDesc) -> int:
    """Per-token values live beside the hidden state at the widest point of a layer."""
    attn = d.q_size + 2 * d.kv_size
    if d.moe is None:
        return max(attn, 3 * d.intermediate_size)  # fc, gate and their product
    m = d.moe  # the lowering runs every expert and sums E outputs [T, H] at the end
    return max(attn, m.num_experts * d.hidden_size + 3 * m.intermediate_size
               + 3 * m.shared_intermediate_size)


def _weights(req: FitRequest) -> dict[str, int]:
    d, el = req.desc, DTYPE_BYTES[req.dtype]
    out = {"linears": 0, "router": 0, "embedding": 0, "lm_head": 0, "quant_scales": 0}
    for lin in d.linears():
        n = max(lin.experts, 1)
        if lin.name.endswith("router"):
            out["router"] += n * lin.in_features * lin.out_features * 4
            continue
        key = "lm_head" if lin.name == "lm_head" else "linears"
        vals, scales = _matrix(req, lin.name, lin.out_features, lin.in_features)
        out[key] += n * vals
        out["quant_scales"] += n * scales
        if isinstance(req.weight_bits, QuantDesc) and req.weight_bits.pre_quant_scale \
                and _bits(req, lin.name) < FLOAT_BITS:
            out["quant_scales"] += n * lin.in_features * el
    vals, scales = _matrix(req, "transformer.vocab_embedding", d.vocab_size, d.hidden_size)
    out["embedding"] = vals
    out["quant_scales"] += scales
    norms = d.num_layers * (2 * d.hidden_size + (2 * d.head_size if d.qk_norm else 0))
    biases = d.num_layers * (d.q_size + 2 * d.kv_size) if d.attn_bias else 0
    out["norms_biases"] = (norms + d.hidden_size + biases) * el
    out["rope"] = 2 * d.max_position_embeddings * (d.head_size // 2) * el
    return out


def _bits(req: FitRequest, module: str) -> int:
    wb = req.weight_bits
    if isinstance(wb, QuantDesc):
        return wb.bits if wb.quantized(module) else FLOAT_BITS
    return next((b for pat, b in wb.items() if fnmatch.fnmatchcase(module, pat)), FLOAT_BITS)


def _matrix(req: FitRequest, module: str, rows: int, cols: int) -> tuple[int, int]:
    """(value bytes, scale bytes) of one [rows, cols] weight (cols = the input axis)."""
    bits, el = _bits(req, module), DTYPE_BYTES[req.dtype]
    if bits >= FLOAT_BITS:
        return rows * cols * el, 0
    wb = req.weight_bits
    group = (wb.group_size if wb.per_group else cols) if isinstance(wb, QuantDesc) \
        else (cols if req.group_size == -1 else req.group_size)
    return rows * cols * bits // 8, rows * (cols // group) * el


def compare(est: MemoryEstimate, trt: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """The estimate beside TensorRT's build figures (build metrics["trt"]). TensorRT's activation
    memory excludes the engine's I/O (logits output, mask, KV), so it is compared with the
    estimate's internal part."""
    internal = est.activations_bytes - sum(est.breakdown.get(f"activations.{k}", 0)
                                           for k in ("logits_output", "mask"))
    out = {}
    for name, mine, key in (("weights", est.weights_bytes, "weights_bytes"),
                            ("activations", internal, "activation_bytes")):
        if key in trt:
            theirs = int(trt[key])
            out[name] = {"estimate": mine, "tensorrt": theirs,
                         "rel_diff": round((mine - theirs) / theirs, 4) if theirs else None}
    return out


def suggestions(est: MemoryEstimate, target: Target, quantize_method: str = "none",
                backend: str = "rtx", margin: float = SAFETY_MARGIN) -> list[Suggestion]:
    """One-knob changes that lower the total, largest effect first, then a bigger target. No
    quantized KV cache: no stage writes one (quant/quantize.py; plan.py refuses it)."""
    req, limit = est.request, usable_bytes(target, margin)
    out: list[Suggestion] = []
    int4 = _int4(req, backend) if quantize_method == "none" else None
    if int4 and "int4" in target.precisions:
        e = _estimate(replace(req, weight_bits=int4[2]))
        out.append(_suggest(int4[0], int4[1], e, limit))
    # the largest value that fits; else the floor, to show how far the knob goes
    for knob, floor in (("max_seq_len", req.max_input_len), ("max_batch_size", 1)):
        value = _largest_fitting(req, knob, 1, limit) or floor
        if value < getattr(req, knob):
            changed = _with(req, knob, value)
            setting = f"build.{knob}={value}"
            if changed.max_input_len < req.max_input_len:  # else validation refuses the recipe
                setting += f" build.max_input_len={changed.max_input_len}"
            out.append(_suggest(setting, f"from {getattr(req, knob)}", _estimate(changed),
                                limit))
    out.sort(key=lambda s: s.total_bytes)
    bigger = _bigger_target(est, target, backend, margin, int4)
    return out + ([bigger] if bigger else [])


def _int4(req: FitRequest, backend: str) -> tuple[str, str, QuantDesc]:
    """The INT4 change to suggest for a float model: AWQ g128, except for MoE on trtllm, where
    plan.py refuses awq and per-channel weight-only (W4A16, MoE plugin) is the supported way."""
    if backend == "trtllm" and req.desc.moe is not None:
        return ("quantize.method=rtn quantize.group_size=-1",
                "INT4 weight-only per channel (W4A16, lm_head float)",
                QuantDesc(algo="W4A16", exclude_modules=("lm_head",)))
    return ("quantize.method=awq", "INT4 weights (W4A16 g128, lm_head float)",
            QuantDesc(algo="W4A16_AWQ", group_size=128, exclude_modules=("lm_head",)))


def _suggest(setting: str, effect: str, e: MemoryEstimate, limit: int) -> Suggestion:
    return Suggestion(setting, effect, e.total_bytes, e.total_bytes <= limit)


def _with(req: FitRequest, knob: str, value: int) -> FitRequest:
    if knob == "max_seq_len":
        return replace(req, max_seq_len=value, max_input_len=min(req.max_input_len, value))
    return replace(req, **{knob: value})


def _largest_fitting(req: FitRequest, knob: str, lo: int, limit: int) -> int | None:
    """The largest value below the current one that fits (rounded down to a multiple of 256
    for sequence lengths above 256), or None when even `lo` does not."""
    hi = getattr(req, knob) - 1
    if hi < lo or _estimate(_with(req, knob, lo)).total_bytes > limit:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _estimate(_with(req, knob, mid)).total_bytes <= limit \
            else (lo, mid - 1)
    return lo - lo % 256 if knob == "max_seq_len" and lo > 256 else lo


def _bigger_target(est: MemoryEstimate, target: Target, backend: str, margin: float,
                   int4: tuple[str, str, QuantDesc] | None) -> Suggestion | None:
    """The smallest GeForce card that fits as is, else with INT4 weights (`int4`); then the
    same among data-centre GPUs (never for rtx, which builds for GeForce cards only)."""
    changes = [None, int4] if int4 else [None]
    totals = [est.total_bytes if c is None
              else _estimate(replace(est.request, weight_bits=c[2])).total_bytes for c in changes]
    pool = [t for t in TARGETS.values() if t.kind != "cpu" and t.vram_gib > target.vram_gib
            and (backend != "rtx" or (t.kind == "geforce" and t.sm in RTX_SMS))]
    ranked = sorted(((t, i) for t in pool for i in range(len(changes))),
                    key=lambda ti: (ti[0].kind != "geforce", ti[1], ti[0].vram_gib,
                                    -ti[0].bandwidth_gbs))
    for t, i in ranked:
        change = changes[i]
        if (change is None or "int4" in t.precisions) and totals[i] <= usable_bytes(t, margin):
            note = "" if change is None else f" with {change[0]}"
            return Suggestion(f"build.target={t.name}{note}", f"{t.vram_gib:g} GiB, sm{t.sm}",
                              totals[i], True)
    return None


def fit_problems(est: MemoryEstimate, target: Target, quantize_method: str = "none",
                 backend: str = "rtx", margin: float = SAFETY_MARGIN) -> list[Problem]:
    """[] when the estimate fits `target`; else one Problem: by how much, the breakdown, and the
    suggestions ranked by effect."""
    limit = usable_bytes(target, margin)
    if est.total_bytes <= limit:
        return []
    r = est.request
    parts = (f"weights {est.weights_bytes / GiB:.2f}, KV cache {est.kv_copies} x "
             f"{est.kv_cache_bytes / GiB:.2f}, activations {est.activations_bytes / GiB:.2f}, "
             f"overhead {est.overhead_bytes / GiB:.2f}")
    shape = f"batch {r.max_batch_size}, input {r.max_input_len}, seq {r.max_seq_len}"
    if r.backend == "trtllm":
        shape += f", {r.num_tokens} tokens"
    per_gpu = f" per GPU of {r.tp_size} x {r.pp_size} (tp x pp)" if r.gpus > 1 else ""
    msg = (f"{r.desc.architecture} ({r.dtype}, {shape}) needs {est.total_bytes / GiB:.2f} GiB"
           f"{per_gpu} "
           f"({parts}); {target.name} has {limit / GiB:.2f} GiB usable ({target.vram_gib:g} GiB "
           f"less a {margin:.0%} margin): {(est.total_bytes - limit) / GiB:.2f} GiB over")
    ranked = suggestions(est, target, quantize_method, backend, margin)
    fix = "; ".join(f"({i}) {s.setting}: {s.effect}, total {s.total_bytes / GiB:.2f} GiB"
                    f"{'' if s.fits else ', still too big alone'}"
                    for i, s in enumerate(ranked, 1))
    return [Problem("build.target", msg, f"Try, by effect: {fix}." if fix else None)]
