"""Tiny random Hugging Face models of every family, made from configs (nothing downloaded).

Each keeps the real model's quirks: GQA, head_dim != hidden/heads, tied or untied heads, QK norm,
the RoPE variant, biases, shared experts. Widths are multiples of 128 where group-128 INT4
must apply.
"""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5)


def _configs():
    import transformers as tf

    return {
        "llama": tf.LlamaConfig(
            **COMMON, intermediate_size=384, head_dim=64, tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64}),
        "qwen2": tf.Qwen2Config(**COMMON, intermediate_size=384, tie_word_embeddings=True,
                                rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        "qwen3": tf.Qwen3Config(**COMMON, intermediate_size=384, head_dim=128,
                                tie_word_embeddings=True),
        "hunyuan": tf.HunYuanDenseV1Config(
            **COMMON, intermediate_size=384, head_dim=128, use_qk_norm=True,
            tie_word_embeddings=True,
            rope_scaling={"type": "dynamic", "alpha": 1000.0, "factor": 1.0}),
        "mixtral": tf.MixtralConfig(**COMMON, intermediate_size=128, num_local_experts=4,
                                    num_experts_per_tok=2, tie_word_embeddings=False),
        "qwen2_moe": tf.Qwen2MoeConfig(
            **COMMON, intermediate_size=384, moe_intermediate_size=128,
            shared_expert_intermediate_size=256, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=False, tie_word_embeddings=False),
    }


FAMILY_NAMES = ("llama", "qwen2", "qwen3", "hunyuan", "mixtral", "qwen2_moe")


def make_tiny(family: str, out: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Save a tiny random model of `family` to `out` (safetensors) and return the directory."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _configs()[family]
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger than init so layers matter and logits spread out
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    return out
