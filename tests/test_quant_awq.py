"""AWQ groups and folding: groups follow the structure, and folding scales into norms, rows and
pre-quant scales leaves the float model's logits unchanged (router and shared gate compensated)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from tiny_models import FAMILY_NAMES

from trt_pipeline.checkpoint.desc import ModelDesc
from trt_pipeline.checkpoint.io import Checkpoint, expected_tensors
from trt_pipeline.quant.awq import clip_weight, fold, group_gram, layer_groups, weight_of
from trt_pipeline.quant.pack import fake_quantize_groupwise
from trt_pipeline.reference.model import Context, ReferenceModel, decoder_layer, load_weights

IDS = torch.randint(0, 512, (2, 23), generator=torch.Generator().manual_seed(3))


def fold_everything(desc: ModelDesc, w: dict[str, torch.Tensor], drop_readers: bool = False
                    ) -> dict[str, torch.Tensor]:
    """Fold a random positive scale for every group of every layer; pre-quant scales are applied
    as the reference's dequantize_linear applies them (to the weight's input columns)."""
    g = torch.Generator().manual_seed(7)
    w = {k: t.clone() for k, t in w.items()}  # fold writes expert slices in place
    prequant: dict[str, torch.Tensor] = {}
    for i in range(desc.num_layers):
        for group in layer_groups(desc, i):
            if drop_readers:
                group = dataclasses.replace(group, readers=())
            n = weight_of(w, group.linears[0]).shape[-1]
            fold(w, group, torch.exp(0.7 * torch.randn(n, generator=g)), prequant)
    for name, pq in prequant.items():
        w[f"{name}.weight"] = w[f"{name}.weight"] * pq
    return w


def random_weights(desc: ModelDesc, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, spec in expected_tensors(desc).items():
        t = torch.randn(spec.shape, generator=g)
        out[name] = 1 + 0.1 * t if "layernorm" in name or "ln_f" in name else 0.08 * t
    return out


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_folding_leaves_float_logits_unchanged(family, tiny_ckpt):
    ckpt = Checkpoint(tiny_ckpt[family])
    w = load_weights(ckpt, torch.float32)
    before = ReferenceModel(ckpt.desc, w).forward(IDS)
    folded = fold_everything(ckpt.desc, w)
    changed = [n for n in w if not torch.equal(w[n], folded[n])]
    assert len(changed) > 4 * ckpt.desc.num_layers  # the scales really moved weights around
    after = ReferenceModel(ckpt.desc, folded).forward(IDS)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_router_and_shared_gate_need_the_compensation(family, tiny_ckpt):
    """Without multiplying the router's (and shared gate's) columns by s, folding into
    post_layernorm would change routing: the compensation above is what keeps logits equal."""
    ckpt = Checkpoint(tiny_ckpt[family])
    w = load_weights(ckpt, torch.float32)
    before = ReferenceModel(ckpt.desc, w).forward(IDS)
    after = ReferenceModel(ckpt.desc, fold_everything(ckpt.desc, w, drop_readers=True)
                           ).forward(IDS)
    assert (after - before).abs().max() > 1e-2


def test_groups_follow_structure(tiny_ckpt):
    llama = Checkpoint(tiny_ckpt["llama"]).desc  # GQA: 4 heads, 2 kv heads
    groups = {g.label: g for g in layer_groups(llama, 1)}
    assert list(groups) == ["attention.qkv", "attention.dense", "mlp.fc+gate", "mlp.proj"]
    assert groups["attention.qkv"].fold.target.name == "transformer.layers.1.input_layernorm"
    assert groups["attention.dense"].fold.kind == "prequant"
    assert groups["mlp.proj"].fold.target.name == "transformer.layers.1.mlp.gate"
    moe = Checkpoint(tiny_ckpt["qwen2_moe"]).desc
    labels = [g.label for g in layer_groups(moe, 0)]
    assert labels == ["attention.qkv", "attention.dense", "mlp.experts.fc",
                      *[f"mlp.experts.{e}.proj" for e in range(4)], "mlp.shared_expert.proj"]
    first = layer_groups(moe, 0)[2]
    assert first.readers == ("transformer.layers.0.mlp.router",
                             "transformer.layers.0.mlp.shared_expert_gate")
    assert [r.name for r in first.linears] == ["transformer.layers.0.mlp.fc",
                                               "transformer.layers.0.mlp.shared_expert.fc"]


def test_without_gqa_dense_scale_folds_into_v_rows_and_bias(tiny_ckpt):
    """v_proj and o_proj of equal shape (llm-awq's rule): 1/s goes into the last kv_size rows of
    the fused qkv and its bias; the layer's float output does not move."""
    cfg = copy.deepcopy(Checkpoint(tiny_ckpt["qwen2"]).config)  # qwen2 has a qkv bias
    cfg.update(num_key_value_heads=cfg["num_attention_heads"],
               head_size=cfg["hidden_size"] // cfg["num_attention_heads"])
    desc = ModelDesc.from_config(cfg)
    dense = layer_groups(desc, 0)[1]
    assert dense.fold.kind == "rows"
    assert dense.fold.rows == (2 * desc.hidden_size, 3 * desc.hidden_size)
    w = random_weights(desc)
    h = torch.randn(2, 11, desc.hidden_size, generator=torch.Generator().manual_seed(4))
    ctx = Context.make(desc, (2, 11), None, None)
    before, _ = decoder_layer(desc, w, 0, h, ctx)
    folded = fold_everything(desc, w)
    assert not torch.equal(folded["transformer.layers.0.attention.qkv.bias"],
                           w["transformer.layers.0.attention.qkv.bias"])
    after, _ = decoder_layer(desc, folded, 0, h, ctx)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_gram_error_equals_the_token_sum():
    """d^T G d per group is the squared error of the group's partial dot products over tokens."""
    g = torch.Generator().manual_seed(6)
    x, d = torch.randn(50, 256, generator=g), torch.randn(3, 256, generator=g)
    gram = group_gram(x, 128)  # [2, 128, 128]
    dg = d.unflatten(-1, (2, 128)).transpose(0, 1)  # [2, 3, 128]
    by_gram = ((dg @ gram) * dg).sum(-1)
    by_tokens = torch.stack([((x[:, k * 128:(k + 1) * 128] @ d[:, k * 128:(k + 1) * 128].T) ** 2
                              ).sum(0) for k in range(2)])
    torch.testing.assert_close(by_gram, by_tokens, rtol=1e-4, atol=1e-3)


def test_clip_never_loses_to_no_clip_and_trims_outliers():
    g = torch.Generator().manual_seed(5)
    w = 0.05 * torch.randn(64, 256, generator=g)
    w[:, 3] = 1.0  # one outlier column: a full-range scale would waste the grid on it
    x = torch.randn(600, 256, generator=g)
    x[:, 3] *= 0.01  # ...and it barely matters to the output

    def group_mse(weight):
        q = fake_quantize_groupwise(weight, 128)
        return ((x @ q.T - x @ w.T) ** 2).mean()

    gram = group_gram(x, 128)
    clipped = clip_weight(w, gram, 128)
    assert clipped.abs().max() < 1.0
    assert group_mse(clipped) < group_mse(w)
    untouched = clip_weight(w, gram, 128, rows=(0, 32))
    assert torch.equal(untouched[32:], w[32:])
