"""Our checkpoints against the TensorRT-LLM 1.2.1 contract as recorded in facts/trtllm.md §6-§7,
read back with the safetensors package and compared with the Hugging Face tensors directly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import FAMILY_NAMES

# facts/trtllm.md §6 common fields and §6 mapping fields (1.2.1)
COMMON_FIELDS = {"architecture", "dtype", "logits_dtype", "vocab_size", "hidden_size",
                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_size",
                 "intermediate_size", "hidden_act", "norm_epsilon", "position_embedding_type",
                 "max_position_embeddings", "rotary_embedding_dim", "use_parallel_embedding",
                 "embedding_sharding_dim", "qk_layernorm", "mapping", "quantization",
                 "rotary_base", "rotary_scaling", "attn_bias", "mlp_bias", "tie_word_embeddings"}
MAPPING_FIELDS = {"world_size", "gpus_per_node", "cp_size", "tp_size", "pp_size", "moe_tp_size",
                  "moe_ep_size", "moe_cluster_size", "attn_tp_size", "attn_cp_size", "cp_config",
                  "enable_attention_dp", "enable_lm_head_tp_in_adp"}
QUANT_FIELDS = {"quant_algo", "kv_cache_quant_algo", "group_size", "has_zero_point",
                "pre_quant_scale", "exclude_modules"}
# facts §6: `architecture` is the HF name TensorRT-LLM's MODEL_MAP is keyed by; hidden_act is
# swiglu for MoE; Qwen2 has attn_bias, Qwen3 qk_layernorm; Qwen MoE normalization NONE (0).
EXPECTED = {
    "llama": dict(architecture="LlamaForCausalLM", hidden_act="silu", attn_bias=False),
    "qwen2": dict(architecture="Qwen2ForCausalLM", hidden_act="silu", attn_bias=True),
    "qwen3": dict(architecture="Qwen3ForCausalLM", hidden_act="silu", qk_layernorm=True),
    "hunyuan": dict(architecture="HunYuanDenseV1ForCausalLM", hidden_act="silu"),
    "mixtral": dict(architecture="MixtralForCausalLM", hidden_act="swiglu"),
    "qwen2_moe": dict(architecture="Qwen2MoeForCausalLM", hidden_act="swiglu", attn_bias=True),
}


def hf_tensor(hf_dir, name):
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        return f.get_tensor(name)


def ckpt_tensors(ckpt_dir):
    with safe_open(str(ckpt_dir / "rank0.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_config_fields(family, tiny_ckpt):
    cfg = json.loads((tiny_ckpt[family] / "config.json").read_text())
    assert set(cfg) >= COMMON_FIELDS
    assert set(cfg["mapping"]) == MAPPING_FIELDS and cfg["mapping"]["tp_size"] == 1
    assert set(cfg["quantization"]) == QUANT_FIELDS and cfg["quantization"]["quant_algo"] is None
    assert cfg["position_embedding_type"] == "rope_gpt_neox" and cfg["logits_dtype"] == "float32"
    for key, value in EXPECTED[family].items():
        assert cfg[key] == value, key
    if family in ("mixtral", "qwen2_moe"):
        moe = cfg["moe"]
        assert moe["num_experts"] == 4 and moe["top_k"] == 2
        assert moe["normalization_mode"] == (1 if family == "mixtral" else 0)


def test_dense_names_and_fc_gate_swap(tiny_hf, tiny_ckpt):
    """fc <- gate_proj (activated), gate <- up_proj, qkv = [q; k; v] (facts §7)."""
    hf, t = tiny_hf["llama"], ckpt_tensors(tiny_ckpt["llama"])
    p, q = "transformer.layers.1", "model.layers.1"
    assert torch.equal(t[f"{p}.mlp.fc.weight"], hf_tensor(hf, f"{q}.mlp.gate_proj.weight"))
    assert torch.equal(t[f"{p}.mlp.gate.weight"], hf_tensor(hf, f"{q}.mlp.up_proj.weight"))
    assert torch.equal(t[f"{p}.mlp.proj.weight"], hf_tensor(hf, f"{q}.mlp.down_proj.weight"))
    qkv = torch.cat([hf_tensor(hf, f"{q}.self_attn.{x}_proj.weight") for x in "qkv"])
    assert torch.equal(t[f"{p}.attention.qkv.weight"], qkv)
    assert torch.equal(t[f"{p}.post_layernorm.weight"],
                       hf_tensor(hf, f"{q}.post_attention_layernorm.weight"))
    assert torch.equal(t["lm_head.weight"], hf_tensor(hf, "lm_head.weight"))


def test_tied_embedding_is_stored_once(tiny_ckpt):
    for family in ("qwen2", "qwen3", "hunyuan"):
        t = ckpt_tensors(tiny_ckpt[family])
        assert "lm_head.weight" not in t and "transformer.vocab_embedding.weight" in t


def test_qwen_biases_and_qk_norm_names(tiny_hf, tiny_ckpt):
    t = ckpt_tensors(tiny_ckpt["qwen2"])
    bias = torch.cat([hf_tensor(tiny_hf["qwen2"], f"model.layers.0.self_attn.{x}_proj.bias")
                      for x in "qkv"])
    assert torch.equal(t["transformer.layers.0.attention.qkv.bias"], bias)
    t = ckpt_tensors(tiny_ckpt["hunyuan"])
    assert torch.equal(t["transformer.layers.0.attention.k_layernorm.weight"],
                       hf_tensor(tiny_hf["hunyuan"],
                                 "model.layers.0.self_attn.key_layernorm.weight"))
    cfg = json.loads((tiny_ckpt["hunyuan"] / "config.json").read_text())
    assert cfg["trt_pipeline"]["qk_norm_position"] == "after_rope"
    assert cfg["trt_pipeline"]["backends"] == ["onnx", "rtx"]


def test_mixtral_experts_stacked_up_then_gate_and_router_fp32(tiny_hf, tiny_ckpt):
    """fc [E, 2I, H] = concat([w3 (up), w1 (gate)]); proj [E, H, I] = w2; router float32."""
    hf, t = tiny_hf["mixtral"], ckpt_tensors(tiny_ckpt["mixtral"])
    fc = t["transformer.layers.0.mlp.fc.weight"]
    assert fc.shape == (4, 256, 256)
    for e in range(4):
        q = f"model.layers.0.block_sparse_moe.experts.{e}"
        assert torch.equal(fc[e, :128], hf_tensor(hf, f"{q}.w3.weight"))
        assert torch.equal(fc[e, 128:], hf_tensor(hf, f"{q}.w1.weight"))
        assert torch.equal(t["transformer.layers.0.mlp.proj.weight"][e],
                           hf_tensor(hf, f"{q}.w2.weight"))
    assert t["transformer.layers.0.mlp.router.weight"].dtype == torch.float32


def test_qwen2_moe_shared_expert(tiny_hf, tiny_ckpt):
    hf, t = tiny_hf["qwen2_moe"], ckpt_tensors(tiny_ckpt["qwen2_moe"])
    shared = t["transformer.layers.1.mlp.shared_expert.fc.weight"]
    q = "model.layers.1.mlp.shared_expert"
    assert torch.equal(shared, torch.cat([hf_tensor(hf, f"{q}.up_proj.weight"),
                                          hf_tensor(hf, f"{q}.gate_proj.weight")]))
    assert t["transformer.layers.1.mlp.shared_expert_gate.weight"].shape == (1, 256)


def test_float16_conversion_dtypes(tiny_hf, tmp_path):
    from trt_pipeline.families.apply import convert_checkpoint

    convert_checkpoint(tiny_hf["mixtral"], tmp_path / "c", "float16")
    t = ckpt_tensors(tmp_path / "c")
    assert t["transformer.layers.0.mlp.router.weight"].dtype == torch.float32
    assert {v.dtype for k, v in t.items() if "router" not in k} == {torch.float16}
