"""Qwen3 dense: per-head RMSNorm on q and k before RoPE (TensorRT-LLM qk_layernorm), no biases."""

from .rules import (
    ATTENTION_RULES,
    DENSE_MLP_RULES,
    MODEL_RULES,
    Family,
    dense_config,
    qk_norm_rules,
    sliding_window_check,
)


def _config(hf: dict) -> dict:
    return dense_config(hf, "Qwen3ForCausalLM", qk_layernorm=True, qwen_type="qwen3",
                        seq_length=hf.get("max_position_embeddings", 2048))


FAMILY = Family(
    name="qwen3",
    architectures=("Qwen3ForCausalLM",),
    model_types=("qwen3",),
    make_config=_config,
    model_rules=MODEL_RULES,
    layer_rules=ATTENTION_RULES + qk_norm_rules("q_norm", "k_norm") + DENSE_MLP_RULES,
    backends=("onnx", "rtx", "trtllm"),
    check=sliding_window_check,
)
