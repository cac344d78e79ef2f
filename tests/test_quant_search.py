"""The AWQ searches themselves, against an independent numpy oracle.

A synthetic layer whose inputs have a few huge-activation channels (the salient channels of the
AWQ paper, facts/quantization.md §1.1): the scale search must pick alpha > 0, its loss at every
grid point must equal a numpy re-derivation of the llm-awq objective (§1.2), and the scales must
beat plain round-to-nearest by a clear margin. The clip search (§1.4) must pick, per (row, group),
the shrink a brute-force numpy search picks, never touch q/k, and beat no clipping. MoE calibration
must see exactly the tokens the router sends to each expert.

The INT4 quantizer in the oracle is the symmetric TensorRT-LLM one the checkpoint stores
(facts/trtllm.md §8: scale = amax / 7 per [row, 128 inputs], q = round(w / scale) in [-8, 7]),
not llm-awq's asymmetric one (facts/quantization.md §1.5); the search objective is llm-awq's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from trt_pipeline.checkpoint.desc import ModelDesc, QuantDesc
from trt_pipeline.checkpoint.io import expected_tensors
from trt_pipeline.quant import awq
from trt_pipeline.quant.awq import (
    Features,
    calibrate_layer,
    capture,
    clip_layer,
    clip_weight,
    group_gram,
    layer_groups,
    search_scale,
)
from trt_pipeline.reference.model import Context

G = 128
QUANT = QuantDesc(algo="W4A16_AWQ", group_size=G, pre_quant_scale=True)
OUTLIERS = [5, 77, 200]  # input channels with ~40x the activation magnitude of the rest
ALPHAS = [i / 20 for i in range(20)]  # facts §1.2: i/20, i = 0..19 (1.0 never tried)
P = "transformer.layers.0"


def dense_desc(**changes) -> ModelDesc:
    cfg = {"architecture": "LlamaForCausalLM", "dtype": "float32", "vocab_size": 512,
           "hidden_size": 256, "num_hidden_layers": 1, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_size": 64, "intermediate_size": 256,
           "max_position_embeddings": 512,
           "quantization": {"quant_algo": "W4A16_AWQ", "group_size": G,
                            "pre_quant_scale": True}}
    return ModelDesc.from_config({**cfg, **changes})


def random_weights(d: ModelDesc, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, spec in expected_tensors(dataclasses.replace(d, quant=QuantDesc())).items():
        if name.startswith("transformer.layers.0."):
            t = torch.randn(spec.shape, generator=g)
            out[name] = 1 + 0.1 * t if "layernorm" in name else 0.05 * t
    return out


def outlier_inputs(n: int = 512, width: int = 256, seed: int = 1) -> torch.Tensor:
    x = torch.randn(n, width, generator=torch.Generator().manual_seed(seed))
    x[:, OUTLIERS] *= 40.0
    return x


# ---- the numpy oracle -------------------------------------------------------------------------

def np_q4(w: np.ndarray) -> np.ndarray:
    """Symmetric INT4 per [row, 128 inputs]: scale = amax / 7, q = round(w / scale) in [-8, 7]."""
    g = w.reshape(*w.shape[:-1], -1, G)
    scale = np.maximum(np.abs(g).max(-1, keepdims=True), 1e-8) / 7
    return (np.clip(np.round(g / scale), -8, 7) * scale).reshape(w.shape)


def np_scale(x: np.ndarray, alpha: float) -> np.ndarray:
    """facts §1.2: s = mean|x|^alpha over calibration tokens, clamped >= 1e-4, / sqrt(max*min)."""
    s = np.maximum(np.abs(x).mean(0) ** alpha, 1e-4)
    return s / np.sqrt(s.max() * s.min())


def np_silu(z: np.ndarray) -> np.ndarray:
    return z / (1 + np.exp(-z))


def np_mlp(x: np.ndarray, fc: np.ndarray, gate: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """Dense gated MLP (facts/trtllm.md §7): fc is the activated branch, gate the linear one."""
    return (np_silu(x @ fc.T) * (x @ gate.T)) @ proj.T


# The two kinds of group: a norm feeding two linears (loss on the whole MLP output) and a linear
# alone (loss on its own output), as facts §1.3 describes.
CASES = {
    "mlp.fc+gate": ("mlp_in", ("fc", "gate")),
    "mlp.proj": ("proj_in", ("proj",)),
}


def np_output(label: str, x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    if label == "mlp.fc+gate":
        return np_mlp(x, w["fc"], w["gate"], w["proj"])
    return x @ w["proj"].T


def np_group_error(label: str, x: np.ndarray, w: dict[str, np.ndarray], s: np.ndarray) -> float:
    """Output MSE vs float with the group's weights replaced by Q(W * s) and their input by x / s
    (s = 1 is plain round-to-nearest)."""
    scaled = CASES[label][1]
    trial = {k: np_q4(v * s) if k in scaled else v for k, v in w.items()}
    return float(((np_output(label, x / s, trial) - np_output(label, x, w)) ** 2).mean())


def setup_group(label: str):
    d = dense_desc()
    w = random_weights(d)
    feature = CASES[label][0]
    x = outlier_inputs()
    f = Features(G, max_rows=x.shape[0])  # every token in the loss sample: an exact oracle
    f.add(feature, x)
    group = {g.label: g for g in layer_groups(d, 0)}[label]
    w_np = {k: w[f"{P}.mlp.{k}.weight"].double().numpy() for k in ("fc", "gate", "proj")}
    return d, w, f, group, x.double().numpy(), w_np


@pytest.mark.parametrize("label", list(CASES))
def test_scale_search_matches_the_numpy_objective(label, monkeypatch):
    d, w, f, group, x, w_np = setup_group(label)
    outputs: list[torch.Tensor] = []
    inspector = awq._inspector

    def spy(*args):  # records the inspected output of every call: reference, then each alpha
        run = inspector(*args)
        return lambda weights, trial: outputs.append(run(weights, trial)) or outputs[-1]

    monkeypatch.setattr(awq, "_inspector", spy)
    alpha, s = search_scale(d, QUANT, w, 0, group, f)
    assert len(outputs) == 1 + len(ALPHAS)
    got = [float((o - outputs[0]).double().pow(2).mean()) for o in outputs[1:]]
    want = [np_group_error(label, x, w_np, np_scale(x, a)) for a in ALPHAS]
    np.testing.assert_allclose(got, want, rtol=2e-3)
    best = int(np.argmin(want))
    assert alpha == ALPHAS[best]
    # argmin is clear of its neighbours, so the check above is not decided by rounding noise
    assert want[best] < 0.99 * min(want[:best] + want[best + 1:])
    assert alpha > 0
    np.testing.assert_allclose(s.double().numpy(), np_scale(x, alpha), rtol=1e-5)


@pytest.mark.parametrize("label", list(CASES))
def test_awq_scales_beat_round_to_nearest(label):
    d, w, f, group, x, w_np = setup_group(label)
    alpha, s = search_scale(d, QUANT, w, 0, group, f)
    assert alpha > 0
    s = s.double().numpy()
    assert s[OUTLIERS].min() > np.delete(s, OUTLIERS).max()  # salient channels scaled up
    awq_err = np_group_error(label, x, w_np, s)
    rtn_err = np_group_error(label, x, w_np, np.ones_like(s))
    assert awq_err < 0.9 * rtn_err, (awq_err, rtn_err)


# ---- clip search (facts §1.4) -----------------------------------------------------------------

def np_clip(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Brute force: per (row, group) the max in amax * (1 - i/20), i < 10, minimising the summed
    squared error of the group's partial dot products over all tokens; w clamped to it."""
    out = w.copy()
    for c in range(0, w.shape[1], G):
        wg, xg = w[:, c:c + G], x[:, c:c + G]
        amax = np.maximum(np.abs(wg).max(-1, keepdims=True), 1e-8)
        cands = [amax * (1 - i / 20) for i in range(10)]
        errs = np.stack([((xg @ (np_q4(np.clip(wg, -m, m)) - wg).T) ** 2).sum(0)
                         for m in cands])  # [10, rows]
        best = np.stack(cands)[errs.argmin(0), np.arange(w.shape[0])]  # first minimum wins
        out[:, c:c + G] = np.clip(wg, -best, best)
    return out


def outlier_weight(rows: int = 32, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = 0.05 * torch.randn(rows, 256, generator=g)
    w[:, 3] = 1.0  # one huge weight per group row: a full-range scale wastes the INT4 grid on it
    w[::2, 130] = -0.8
    return w


def test_clip_search_equals_brute_force_and_beats_no_clip():
    w = outlier_weight()
    x = torch.randn(300, 256, generator=torch.Generator().manual_seed(6))
    clipped = clip_weight(w, group_gram(x, G), G)
    want = np_clip(w.double().numpy(), x.double().numpy())
    np.testing.assert_allclose(clipped.double().numpy(), want, rtol=1e-5, atol=1e-7)
    assert (clipped.abs().amax(-1) < 1.0).float().mean() > 0.8  # the outliers were trimmed
    x_np, w_np = x.double().numpy(), w.double().numpy()

    def err(weight: np.ndarray) -> float:
        return float(((x_np @ (np_q4(weight) - w_np).T) ** 2).mean())

    assert err(want) < 0.9 * err(w_np)


def test_clip_layer_skips_q_and_k_and_clips_the_rest():
    d = dense_desc()
    w = random_weights(d)
    linears = {"attention.qkv": "attn_in", "attention.dense": "dense_in", "mlp.fc": "mlp_in",
               "mlp.gate": "mlp_in", "mlp.proj": "proj_in"}
    for name in linears:
        w[f"{P}.{name}.weight"][:, 3] = 1.0  # an outlier in every row of every linear
    before = {k: t.double().numpy() for k, t in w.items()}
    f = Features(G, max_rows=64)
    g = torch.Generator().manual_seed(2)
    xs = {key: torch.randn(200, 256, generator=g) for key in set(linears.values())}
    for key, x in xs.items():
        f.add(key, x)
    clip_layer(d, QUANT, w, 0, f, {})
    qk = d.q_size + d.kv_size  # qkv rows [0, q + kv) are q and k; v follows (facts §1.4)
    for name, key in linears.items():
        got, old = w[f"{P}.{name}.weight"].double().numpy(), before[f"{P}.{name}.weight"]
        x = xs[key].double().numpy()
        if name == "attention.qkv":
            np.testing.assert_array_equal(got[:qk], old[:qk])
            got, old = got[qk:], old[qk:]
        np.testing.assert_allclose(got, np_clip(old, x), rtol=1e-5, atol=1e-7, err_msg=name)
        assert (np.abs(got).max(-1) < 1.0).any(), name  # clipping did happen here


# ---- MoE: statistics come from the routed tokens only ------------------------------------------

def moe_desc() -> ModelDesc:
    return dense_desc(architecture="MixtralForCausalLM", intermediate_size=128,
                      moe={"num_experts": 4, "top_k": 2, "normalization_mode": 1})


def test_moe_experts_see_exactly_their_routed_tokens():
    """Router, in fp32 on the post-norm input x: channel 0 is constant, so expert 1's logit 20 x0
    always wins, expert 3's -20 x0 always loses, and the sign of channel 1 picks expert 0 or 2 as
    the second (top_k = 2). Expert 3 receives no token: no statistics, no search, no change."""
    d = moe_desc()
    w = random_weights(d)
    n, hidden = 2 * 48, d.hidden_size
    router = torch.zeros(4, hidden)
    router[:, 0] = torch.tensor([10.0, 20.0, 10.0, -20.0])
    router[0, 1], router[2, 1] = 1.0, -1.0
    w[f"{P}.mlp.router.weight"] = router
    w[f"{P}.attention.dense.weight"] = torch.zeros_like(w[f"{P}.attention.dense.weight"])
    w[f"{P}.post_layernorm.weight"] = torch.ones(hidden)
    g = torch.Generator().manual_seed(8)
    h = torch.randn(2, n // 2, hidden, generator=g)
    h[..., 0] = 3.0
    h[..., 1] = torch.where(torch.arange(n // 2) % 3 == 0, 1.0, -1.0) * (0.5 + torch.rand(
        2, n // 2, generator=g))
    ctx = Context.make(d, (2, n // 2), None, None)
    f = Features(G, max_rows=4 * n)
    capture(d, w, 0, h, ctx, f, search_seqs=2)

    # numpy: dense = 0 leaves h unchanged, so x = rms_norm(h) (post-norm weight 1)
    hn = h.double().numpy().reshape(n, hidden)
    x = hn / np.sqrt((hn ** 2).mean(-1, keepdims=True) + d.norm_epsilon)
    logits = x @ router.double().numpy().T
    top2 = np.argsort(-logits, -1)[:, :2]
    routed = {e: (top2 == e).any(-1) for e in range(4)}
    assert routed[1].all() and not routed[3].any()
    assert 0 < routed[0].sum() < n and (routed[0] ^ routed[2]).all()
    fc = w[f"{P}.mlp.fc.weight"].double().numpy()
    for e in range(3):
        xe = x[routed[e]]
        np.testing.assert_allclose(f.stat[f"mlp_in.{e}"].double().numpy(), np.abs(xe).mean(0),
                                   rtol=1e-4, atol=1e-6)
        up, gate = np.split(xe @ fc[e].T, 2, axis=-1)  # fc = [up; gate] (facts/trtllm.md §7)
        np.testing.assert_allclose(f.stat[f"proj_in.{e}"].double().numpy(),
                                   np.abs(np_silu(gate) * up).mean(0), rtol=1e-4, atol=1e-6)
        assert f.rows[f"proj_in.{e}"].shape[0] == routed[e].sum()
    assert f.rows["mlp_in.3"].shape[0] == 0 and f.rows["proj_in.3"].shape[0] == 0
    assert not f.stat["mlp_in.3"].any() and not f.gram["mlp_in.3"].any()
    # the experts' shared first group still uses every token (all experts read the same norm)
    np.testing.assert_allclose(f.stat["mlp_in"].double().numpy(), np.abs(x).mean(0), rtol=1e-4,
                               atol=1e-6)

    proj3 = w[f"{P}.mlp.proj.weight"][3].clone()
    fc3 = w[f"{P}.mlp.fc.weight"][3].clone()
    _, _, alphas = calibrate_layer(d, QUANT, w, 0, h, ctx, search_seqs=2, max_rows=4 * n)
    assert {f"mlp.experts.{e}.proj" for e in range(3)} <= set(alphas)
    assert "mlp.experts.3.proj" not in alphas
    assert torch.equal(w[f"{P}.mlp.proj.weight"][3], proj3)  # no scale, nothing to clip against
    # expert 3's fc moved only by the shared group's column scale, not by clipping or row folds
    s = np_scale(x, alphas["mlp.experts.fc"])
    np.testing.assert_allclose(w[f"{P}.mlp.fc.weight"][3].double().numpy(),
                               fc3.double().numpy() * s, rtol=1e-5, atol=1e-7)
