"""AWQ for one decoder layer: scale search per group of linears sharing an input, folding, clipping.

Follows llm-awq (facts/quantization.md §1.2-§1.4): s = mean|x|^alpha for alpha = i/20, i = 0..19,
clamped >= 1e-4 and divided by sqrt(max*min); the winner minimises the MSE of the inspected module's
output with the group's weights replaced by Q(W*s)/s. The quantizer is TensorRT-LLM's symmetric
INT4 (pack.py), not llm-awq's asymmetric one. Groups come from the layer's structure (ModelDesc),
never from a model name. 1/s is folded into the previous norm or linear rows when it can be; where
it cannot (v -> dense under GQA) it is carried as `prequant_scaling_factor`, as ModelOpt does for
o_proj. Readers of a norm's output that stay in float (MoE router, shared-expert gate) get their
input columns multiplied by s, so folding never changes the float model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from ..checkpoint.desc import ModelDesc, QuantDesc
from ..reference.model import Context, attention, mlp, moe, rms_norm, route
from .pack import fake_quantize_groupwise

N_GRID = 20  # alpha = i / N_GRID, i < N_GRID (llm-awq auto_scale)
CLIP_STEPS = 10  # shrink 1 - i/20 for i < 10, i.e. down to 0.55 (llm-awq auto_clip)
CLIP_ROWS = 4096  # output channels per clip batch; bounds memory, not results


@dataclass(frozen=True, slots=True)
class Ref:
    """A linear's weight, or one expert's slice of a stacked MoE weight."""

    name: str  # checkpoint prefix, e.g. transformer.layers.0.mlp.fc
    expert: int | None = None


@dataclass(frozen=True, slots=True)
class Fold:
    """Where 1/s goes: a norm weight, rows [start, stop) of a linear (and its bias), or a
    pre-quant scale on each scaled linear."""

    kind: Literal["norm", "rows", "prequant"]
    target: Ref | None = None
    rows: tuple[int, int] = (0, 0)


@dataclass(frozen=True, slots=True)
class Group:
    label: str
    linears: tuple[Ref, ...]
    fold: Fold
    feature: str  # key of the captured input
    inspect: Literal["attention", "mlp", "moe", "linear"]
    readers: tuple[str, ...] = ()  # float linears reading the same input (router, shared gate)


def layer_groups(d: ModelDesc, i: int) -> list[Group]:
    """The AWQ groups of layer i (facts/quantization.md §1.3; MoE as AutoAWQ's Mixtral/Qwen-MoE)."""
    p = f"transformer.layers.{i}"
    qkv, dense = Ref(f"{p}.attention.qkv"), Ref(f"{p}.attention.dense")
    v_rows = (d.q_size + d.kv_size, d.q_size + 2 * d.kv_size)
    # llm-awq PR #67: v -> o only when v_proj and o_proj have the same shape (no GQA).
    no_gqa = (d.kv_size, d.hidden_size) == (d.hidden_size, d.q_size)
    groups = [
        Group("attention.qkv", (qkv,), Fold("norm", Ref(f"{p}.input_layernorm")), "attn_in",
              "attention"),
        Group("attention.dense", (dense,),
              Fold("rows", qkv, v_rows) if no_gqa else Fold("prequant"), "dense_in", "linear"),
    ]
    post = Fold("norm", Ref(f"{p}.post_layernorm"))
    if d.moe is None:
        inter = d.intermediate_size
        return groups + [
            Group("mlp.fc+gate", (Ref(f"{p}.mlp.fc"), Ref(f"{p}.mlp.gate")), post, "mlp_in", "mlp"),
            # mlp.gate is up_proj, the linear branch: act(fc x) * (gate x / s) = out / s.
            Group("mlp.proj", (Ref(f"{p}.mlp.proj"),), Fold("rows", Ref(f"{p}.mlp.gate"),
                                                            (0, inter)), "proj_in", "linear"),
        ]
    m = d.moe
    first = (Ref(f"{p}.mlp.fc"),)
    readers = (f"{p}.mlp.router",)
    if m.shared_intermediate_size:
        first += (Ref(f"{p}.mlp.shared_expert.fc"),)
    if m.shared_gate:
        readers += (f"{p}.mlp.shared_expert_gate",)
    groups.append(Group("mlp.experts.fc", first, post, "mlp_in", "moe", readers))
    # Expert fc rows are [up; gate]: the first half is the linear branch.
    groups += [Group(f"mlp.experts.{e}.proj", (Ref(f"{p}.mlp.proj", e),),
                     Fold("rows", Ref(f"{p}.mlp.fc", e), (0, m.intermediate_size)),
                     f"proj_in.{e}", "linear") for e in range(m.num_experts)]
    if m.shared_intermediate_size:
        s = m.shared_intermediate_size
        groups.append(Group("mlp.shared_expert.proj", (Ref(f"{p}.mlp.shared_expert.proj"),),
                            Fold("rows", Ref(f"{p}.mlp.shared_expert.fc"), (0, s)),
                            "shared_proj_in", "linear"))
    return groups


@dataclass
class Features:
    """Calibration inputs of one layer's linears, from every calibration token: mean |x| per
    channel (the AWQ statistic) and per-group Gram matrices x_g^T x_g (the clip objective); plus a
    strided sample of rows and whole sequences for the scale search's loss."""

    group_size: int
    max_rows: int
    stat: dict[str, torch.Tensor] = field(default_factory=dict)
    gram: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    attn_in: torch.Tensor | None = None
    ctx: Context | None = None

    def add(self, key: str, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1])
        n = flat.shape[0]
        self.stat[key] = flat.abs().mean(0) if n else torch.zeros(flat.shape[-1])
        self.gram[key] = group_gram(flat, self.group_size)
        pick = torch.linspace(0, n - 1, min(n, self.max_rows)).round().long()
        self.rows[key] = flat[pick] if n else flat


def group_gram(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[in/g, g, g]: sum over rows of x_g x_g^T for each group g of input columns."""
    xg = x.unflatten(-1, (-1, group_size)).transpose(0, 1)  # [G, T, g]
    return xg.transpose(1, 2) @ xg


def weight_of(w: dict[str, torch.Tensor], ref: Ref) -> torch.Tensor:
    t = w[f"{ref.name}.weight"]
    return t if ref.expert is None else t[ref.expert]


def normalized_scale(stat: torch.Tensor, alpha: float) -> torch.Tensor:
    s = stat.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def _inspector(d: ModelDesc, i: int, group: Group, f: Features
               ) -> Callable[[dict[str, torch.Tensor], dict[Ref, torch.Tensor]], torch.Tensor]:
    """The output the search compares: f(layer weights, replaced group weights)."""
    x = f.rows[group.feature]

    def patched(w: dict[str, torch.Tensor], trial: dict[Ref, torch.Tensor]):
        return {**w, **{f"{r.name}.weight": t for r, t in trial.items()}}

    if group.inspect == "attention":
        return lambda w, t: attention(d, patched(w, t), i, f.attn_in, f.ctx)[0]
    if group.inspect == "mlp":
        return lambda w, t: mlp(patched(w, t), f"transformer.layers.{i}.mlp", x)
    if group.inspect == "moe":
        return lambda w, t: moe(d, patched(w, t), i, x)
    ref = group.linears[0]
    return lambda w, t: x @ t.get(ref, weight_of(w, ref)).T


def search_scale(d: ModelDesc, quant: QuantDesc, w: dict[str, torch.Tensor], i: int,
                 group: Group, f: Features) -> tuple[float, torch.Tensor] | None:
    """(alpha, s) minimising the inspected output's MSE, or None when nothing in the group is
    quantized or no calibration token reached it."""
    scaled = [r for r in group.linears if quant.quantized(r.name)]
    if not scaled or f.rows[group.feature].shape[0] == 0:
        return None
    run = _inspector(d, i, group, f)
    with torch.no_grad():
        reference = run(w, {})
        losses = []
        for k in range(N_GRID):
            s = normalized_scale(f.stat[group.feature], k / N_GRID)
            trial = {r: fake_quantize_groupwise(weight_of(w, r) * s, quant.group_size) / s
                     for r in scaled}
            losses.append(float((run(w, trial) - reference).pow(2).mean()))
    finite = [(loss, k) for k, loss in enumerate(losses) if loss == loss and loss != float("inf")]
    if not finite:
        raise RuntimeError(f"layer {i} {group.label}: no AWQ scale gave a finite loss")
    best = min(finite)[1] / N_GRID
    return best, normalized_scale(f.stat[group.feature], best)


def _set(w: dict[str, torch.Tensor], ref: Ref, value: torch.Tensor) -> None:
    """Replace a weight. An expert's slice is written into its stacked tensor in place (copying
    [E, ...] per expert would be quadratic in E), so `w` must own its stacked tensors."""
    if ref.expert is None:
        w[f"{ref.name}.weight"] = value
    else:
        w[f"{ref.name}.weight"][ref.expert] = value


def fold(w: dict[str, torch.Tensor], group: Group, s: torch.Tensor,
         prequant: dict[str, torch.Tensor]) -> None:
    """Apply s: scaled linears' input columns * s, 1/s into the fold target (or `prequant`), and
    float readers' columns * s. Exact for float weights: the layer's output does not change.
    Stacked expert weights in `w` are modified in place (see _set)."""
    for ref in group.linears:
        _set(w, ref, weight_of(w, ref) * s)
    for name in group.readers:
        w[f"{name}.weight"] = w[f"{name}.weight"] * s
    fd, target = group.fold, group.fold.target
    if fd.kind == "prequant":
        prequant.update({ref.name: 1.0 / s for ref in group.linears})
    elif target is None:
        raise ValueError(f"{group.label}: a {fd.kind} fold needs a target")
    elif fd.kind == "norm":
        w[f"{target.name}.weight"] = w[f"{target.name}.weight"] / s
    else:
        a, b = fd.rows
        t = weight_of(w, target).clone()
        t[a:b] = t[a:b] / s[:, None]
        _set(w, target, t)
        bias = f"{target.name}.bias"
        if bias in w:
            w[bias] = torch.cat([w[bias][:a], w[bias][a:b] / s, w[bias][b:]])


def clip_weight(w: torch.Tensor, gram: torch.Tensor, group_size: int,
                rows: tuple[int, int] | None = None) -> torch.Tensor:
    """llm-awq auto_clip: per (output row, group), the max |w| among amax*(1 - i/20), i < 10, that
    minimises the squared error of the group's partial dot products, summed over tokens; w is
    clamped to it. With the Gram matrix G = sum x_g x_g^T that error is d^T G d for d = Q(w) - w:
    exact over every calibration token, where llm-awq samples 512, and cheaper than a matmul
    over tokens."""
    a, b = rows or (0, w.shape[0])
    out = w.clone()
    for lo in range(a, b, CLIP_ROWS):
        hi = min(b, lo + CLIP_ROWS)
        wg = w[lo:hi].unflatten(-1, (-1, group_size)).transpose(0, 1)  # [G, co, g]
        amax = wg.abs().amax(-1, keepdim=True).clamp(min=1e-8)
        best_err = torch.full(amax.shape, float("inf"))
        best_max = amax.clone()
        for k in range(CLIP_STEPS):
            mx = amax * (1 - k / N_GRID)
            scale = mx / 7
            d = torch.round(wg.clamp(-mx, mx) / scale).clamp(-8, 7).mul_(scale).sub_(wg)
            err = ((d @ gram) * d).sum(-1, keepdim=True)  # [G, co, 1]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, mx, best_max)
        out[lo:hi] = wg.clamp(-best_max, best_max).transpose(0, 1).flatten(-2)
    return out


def capture(d: ModelDesc, w: dict[str, torch.Tensor], i: int, h: torch.Tensor, ctx: Context,
            f: Features, search_seqs: int) -> torch.Tensor:
    """One float forward of layer i over the whole calibration batch h [N, S, H], filling `f` with
    what the searches need. Returns the layer's float output: like llm-awq, the next layer is fed
    the output computed before any scaling or quantization (facts §1.2 outline, x = x_next), not
    the quantized layer's output."""
    p = f"transformer.layers.{i}"
    x = rms_norm(h, w[f"{p}.input_layernorm.weight"], d.norm_epsilon)
    # attention() ends with the dense matmul; an identity dense returns its input (one extra
    # q_size^2 matmul per token, ~18% of this forward at Hunyuan-0.5B shape).
    eye = torch.eye(d.q_size, dtype=x.dtype)
    pre_dense, _ = attention(d, {**w, f"{p}.attention.dense.weight": eye}, i, x, ctx)
    f.add("attn_in", x)
    f.add("dense_in", pre_dense)
    f.attn_in = x[:search_seqs]
    f.ctx = Context.make(d, f.attn_in.shape[:2], None, None)
    h = h + pre_dense @ w[f"{p}.attention.dense.weight"].T
    del x, pre_dense
    x = rms_norm(h, w[f"{p}.post_layernorm.weight"], d.norm_epsilon)
    f.add("mlp_in", x)
    if d.moe is None:
        fc, gate = x @ w[f"{p}.mlp.fc.weight"].T, x @ w[f"{p}.mlp.gate.weight"].T
        inner = F.silu(fc) * gate
        del fc, gate
        f.add("proj_in", inner)
        return h + inner @ w[f"{p}.mlp.proj.weight"].T
    _capture_experts(d, w, p, x.reshape(-1, x.shape[-1]), f)
    return h + moe(d, w, i, x)


def _capture_experts(d: ModelDesc, w: dict[str, torch.Tensor], p: str, x: torch.Tensor,
                     f: Features) -> None:
    """Per expert, the tokens routed to it (its fc input) and its activation (its proj input)."""
    m = d.moe
    logits = x.to(torch.float32) @ w[f"{p}.mlp.router.weight"].to(torch.float32).T
    _, chosen = route(logits, m.top_k, m.normalization)
    for e in range(m.num_experts):
        xe = x[(chosen == e).any(-1)]
        f.add(f"mlp_in.{e}", xe)
        up, gate = (xe @ w[f"{p}.mlp.fc.weight"][e].T).chunk(2, dim=-1)
        f.add(f"proj_in.{e}", F.silu(gate) * up)
    if m.shared_intermediate_size:
        up, gate = (x @ w[f"{p}.mlp.shared_expert.fc.weight"].T).chunk(2, dim=-1)
        f.add("shared_proj_in", F.silu(gate) * up)


def clip_layer(d: ModelDesc, quant: QuantDesc, w: dict[str, torch.Tensor], i: int,
               f: Features, scales: dict[Ref, torch.Tensor]) -> None:
    """Clip every quantized linear of the layer except q and k: for fused qkv only the v rows
    (facts §1.4: q/k are skipped because the q.k product makes clipping error hard to measure)."""
    v_rows = (d.q_size + d.kv_size, d.q_size + 2 * d.kv_size)
    for group in layer_groups(d, i):
        for ref in group.linears:
            if not quant.quantized(ref.name):
                continue
            rows = v_rows if ref.name.endswith("attention.qkv") else None
            stacked = ref.expert is None and weight_of(w, ref).dim() == 3
            parts = ([(Ref(ref.name, e), f"{group.feature}.{e}")
                      for e in range(weight_of(w, ref).shape[0])] if stacked
                     else [(ref, group.feature)])
            s = scales.get(ref)
            for one, key in parts:
                gram = f.gram[key]
                if s is not None:  # the linear now reads x / s
                    sg = s.unflatten(-1, (-1, quant.group_size))
                    gram = gram / (sg[:, :, None] * sg[:, None, :])
                _set(w, one, clip_weight(weight_of(w, one), gram, quant.group_size, rows))


def calibrate_layer(d: ModelDesc, quant: QuantDesc, w: dict[str, torch.Tensor], i: int,
                    h: torch.Tensor, ctx: Context, search_seqs: int, max_rows: int
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
    """AWQ on layer i in place on its float32 weights `w`: search and fold every group, then clip.
    Returns (next layer's input, pre-quant scales by linear, chosen alpha by group)."""
    f = Features(quant.group_size, max_rows)
    h_next = capture(d, w, i, h, ctx, f, search_seqs)
    w.update({k: t.clone() for k, t in w.items() if t.dim() == 3})  # see _set
    prequant: dict[str, torch.Tensor] = {}
    scales: dict[Ref, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for group in layer_groups(d, i):
        found = search_scale(d, quant, w, i, group, f)
        if found is None:
            continue
        alphas[group.label], s = found
        fold(w, group, s, prequant)
        scales.update({r: s for r in group.linears})
    clip_layer(d, quant, w, i, f, scales)
    return h_next, prequant, alphas
